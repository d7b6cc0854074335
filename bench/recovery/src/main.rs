//! Data parallelism and recovery measured through `petl run` on the real MiniLM and Rotten
//! Tomatoes: the step time with a snapshot every step against none, the time a killed rank costs
//! per recovery tier against restarting every rank from a durable checkpoint written every 100
//! steps, samples/s at 1 and 2 ranks, and peak memory per rank at 1, 2 and 4 ranks.
//!
//! Each number comes from a fresh `petl run` (the binary next to this one by default); run it
//! under `flock /tmp/petl-measure.lock` on a quiet machine.

mod job;
mod run;

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::Parser;

use job::Job;
use run::{Watched, run};

#[derive(Parser, Debug)]
#[command(about = "Snapshot overhead, recovery time per tier, scaling and memory of petl run")]
struct Args {
    /// The petl binary [default: `petl` next to this executable].
    #[arg(long)]
    petl: Option<PathBuf>,
    /// Sections to run.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "overhead,recovery,scaling,memory"
    )]
    sections: Vec<String>,
    /// Runs of each side of the overhead comparison (alternating).
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Steps of the overhead and scaling jobs.
    #[arg(long, default_value_t = 40)]
    steps: u64,
    /// Step at which the recovery runs kill ranks; the durable checkpoint is every 100 steps,
    /// so 150 makes the durable restart recompute 50 steps, its expected loss.
    #[arg(long, default_value_t = 150)]
    kill_step: u64,
    /// Jobs of the recovery section: `lst` (reduction 8), `lst-wide` (reduction 1).
    #[arg(long, value_delimiter = ',', default_value = "lst,lst-wide")]
    recovery_jobs: Vec<String>,
}

const LST: &str = "{ type: lst, lst: { reduction: 8 } }";
/// LST with a full-width side network: a per-rank state of tens of MiB.
const LST_WIDE: &str = "{ type: lst, lst: { reduction: 1 } }";
const LORA: &str = "{ type: lora, lora: { rank: 8, alpha: 16, targetModules: [query, value] } }";
const FULL: &str = "{ type: full }";

fn job(method: &str, replicas: usize, steps: u64) -> Job {
    Job {
        method: method.into(),
        replicas,
        steps,
        batch: 32,
        samples: 4000,
        every_steps: 1,
        durable_every: 100,
    }
}

fn main() -> Result<()> {
    let args = Args::parse();
    let petl = match &args.petl {
        Some(p) => p.clone(),
        None => std::env::current_exe()?
            .parent()
            .context("the executable's directory")?
            .join("petl"),
    };
    anyhow::ensure!(
        petl.is_file(),
        "{} not found: cargo build --release -p petl-trainer --bin petl",
        petl.display()
    );
    for section in &args.sections {
        match section.as_str() {
            "overhead" => overhead(&petl, &args)?,
            "recovery" => recovery(&petl, &args)?,
            "scaling" => scaling(&petl, &args)?,
            "memory" => memory(&petl)?,
            other => anyhow::bail!("unknown section {other}"),
        }
    }
    Ok(())
}

/// Step time of the real LST job on 2 ranks with a snapshot every step, and with none.
fn overhead(petl: &Path, args: &Args) -> Result<()> {
    println!(
        "== snapshot overhead: LST (reduction 8) on 2 ranks, batch 32, {} steps",
        args.steps
    );
    let with = job(LST, 2, args.steps);
    let without = Job {
        every_steps: 1_000_000_000,
        ..with.clone()
    };
    let (mut on, mut off) = (Vec::new(), Vec::new());
    let (mut cpu_on, mut cpu_off) = (Vec::new(), Vec::new());
    for i in 0..args.runs {
        // Alternate, so drifting machine load falls on both sides alike.
        for (side, job, times, cpu) in [
            ("every step", &with, &mut on, &mut cpu_on),
            ("none", &without, &mut off, &mut cpu_off),
        ] {
            let w = run(petl, job, &[], &[])?;
            let t = w.step_seconds(job.batch);
            println!(
                "  run {i} snapshots {side:10}: {t:.4} s/step, {:.1} CPU s in all",
                w.cpu_seconds
            );
            times.push(t);
            cpu.push(w.cpu_seconds);
        }
    }
    let (a, b) = (mean(&on), mean(&off));
    println!(
        "  mean: every step {a:.4} s, none {b:.4} s → overhead {:+.2} % (target < 2 %)",
        (a / b - 1.0) * 100.0
    );
    // CPU time is what snapshotting costs the machine, and other load barely moves it. Loading
    // costs both sides alike; a one-step run without snapshots measures it, so a training step's
    // CPU is what the run without snapshots spent beyond that, per further step.
    let one = run(
        petl,
        &Job {
            steps: 1,
            ..without.clone()
        },
        &[],
        &[],
    )?;
    let (ca, cb) = (mean(&cpu_on), mean(&cpu_off));
    let step_cpu = (cb - one.cpu_seconds) / (args.steps - 1) as f64;
    let extra = (ca - cb) / args.steps as f64;
    println!(
        "  CPU: every step {ca:.1} s, none {cb:.1} s, one step {:.1} s → a step {step_cpu:.3} CPU s, \
         snapshots {extra:+.3} CPU s/step = {:+.2} % (target < 2 %)",
        one.cpu_seconds,
        extra / step_cpu * 100.0
    );
    Ok(())
}

/// Time lost to killed ranks per tier, against all ranks restarting from the durable tier.
fn recovery(petl: &Path, args: &Args) -> Result<()> {
    let steps = args.kill_step + 10;
    for (key, name, method) in [
        ("lst", "LST (reduction 8)", LST),
        ("lst-wide", "LST (reduction 1)", LST_WIDE),
    ] {
        if !args.recovery_jobs.iter().any(|j| j == key) {
            continue;
        }
        let j = job(method, 2, steps);
        println!(
            "== time lost to a killed rank: {name} on 2 ranks, kill at step {}",
            args.kill_step
        );
        let kill = |rank: usize, what: &str| {
            vec![
                "--kill".to_string(),
                format!("rank={rank},step={},what={what}", args.kill_step),
            ]
        };
        let cases: [(&str, Vec<String>); 3] = [
            ("tier 1 (trainer killed)", kill(1, "trainer")),
            ("tier 2 (pod lost)", kill(1, "both")),
            (
                "every rank from the durable checkpoint",
                [kill(0, "both"), kill(1, "both")].concat(),
            ),
        ];
        let mut past = Vec::new();
        for (case, flags) in &cases {
            let w = run(petl, &j, flags, &[])?;
            let state = state_mib(&w, 2);
            let step = w.steady_step();
            let back = w.lost(args.kill_step).context("no fault seen")?;
            let record = w.manifest.recoveries.last();
            println!(
                "  {case:40} state {state:6.1} MiB/rank  step {step:.3} s  kill→past step {}: {back:6.2} s  tiers {:?}  restored {:?}",
                args.kill_step,
                record.map(|r| r.tiers.clone()),
                record.map(|r| r.restored_generation),
            );
            past.push(back);
        }
        println!(
            "  durable restart / tier 1 = {:.1}×, / tier 2 = {:.1}× (target ≥ 10×)",
            past[2] / past[0],
            past[2] / past[1]
        );
    }
    Ok(())
}

/// Samples per second of LST and LoRA at 1 and 2 ranks on this machine.
fn scaling(petl: &Path, args: &Args) -> Result<()> {
    println!("== samples/s, batch 32, {} steps", args.steps);
    for (name, method) in [("LST", LST), ("LoRA", LORA)] {
        let mut rates = Vec::new();
        for replicas in [1, 2] {
            let w = run(petl, &job(method, replicas, args.steps), &[], &[])?;
            rates.push(w.manifest.metrics.samples_per_second);
            println!(
                "  {name:5} {replicas} rank(s): {:8.1} samples/s",
                w.manifest.metrics.samples_per_second
            );
        }
        println!("  {name:5} 2 ranks / 1 rank = {:.2}×", rates[1] / rates[0]);
    }
    Ok(())
}

/// Peak memory of rank 0 for full fine-tuning and LoRA at 1, 2 and 4 ranks.
fn memory(petl: &Path) -> Result<()> {
    println!("== peak memory of rank 0 (heap, counting allocator), batch 8, 3 steps");
    for (name, method) in [("full", FULL), ("LoRA", LORA)] {
        for replicas in [1, 2, 4] {
            let j = Job {
                batch: 8,
                samples: 400,
                ..job(method, replicas, 3)
            };
            let w = run(petl, &j, &[], &[])?;
            let p = w.manifest.trainable_parameters as f64;
            println!(
                "  {name:5} {replicas} rank(s): measured peak {:8.1} MiB  optimiser moments 2·P/N·4 B = {:7.1} MiB/rank (computed from P)",
                w.manifest.peak_memory_bytes as f64 / MIB,
                2.0 * 4.0 * (p / replicas as f64).ceil() / MIB
            );
        }
    }
    Ok(())
}

const MIB: f64 = (1 << 20) as f64;

/// A rank's snapshot: its pieces of the parameters and both moments (f32).
fn state_mib(w: &Watched, replicas: usize) -> f64 {
    3.0 * 4.0 * w.manifest.trainable_parameters as f64 / replicas as f64 / MIB
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len().max(1) as f64
}
