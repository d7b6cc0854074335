//! One run's measurements (ours and the peer print the same JSON fields) and the table that puts
//! them side by side with the ratios and the targets.

use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct Measured {
    pub side: String,
    pub method: String,
    /// Compute threads the side ran with (candle's pool / torch.get_num_threads()).
    pub threads: usize,
    pub trainable: usize,
    pub steps: usize,
    /// VmHWM above the resting VmRSS over the training steps (see peak_rss.rs / peer.py).
    pub peak_rss_delta_bytes: i64,
    /// Our counting allocator's peak above its resting count (no peer equivalent).
    #[serde(default)]
    pub peak_heap_delta_bytes: Option<i64>,
    /// Mean over steps 2..N: the first step also allocates the optimiser state.
    pub step_seconds: f64,
    pub first_step_seconds: f64,
    pub final_loss: f64,
    pub valid_accuracy: f64,
    /// With --phases: mean seconds of forward (with the loss), backward, optimiser (with clipping).
    #[serde(default)]
    pub phase_seconds: Option<[f64; 3]>,
    /// Image peer only: max |petl's pooled features − the peer's| on the first training batch,
    /// before training (the two backbones agree).
    #[serde(default)]
    pub pooled_max_abs_diff: Option<f64>,
}

/// Mean step time leaving out the first step (optimiser-state allocation and cold caches).
pub fn steady_mean(times: &[f64]) -> f64 {
    let steady = if times.len() > 1 { &times[1..] } else { times };
    steady.iter().sum::<f64>() / steady.len().max(1) as f64
}

/// What the run was, for the table's header.
pub struct Setup {
    /// The first line: model, data and budget.
    pub title: String,
    /// Lines printed under the load line (the image tables' learning rates).
    pub notes: Vec<String>,
    pub load_before: String,
    pub load_after: String,
    pub wall_seconds: f64,
}

pub fn print_table(setup: &Setup, results: &[Measured]) {
    println!("{}", setup.title);
    println!(
        "load average before {} / after {}; whole bench {:.0} s",
        setup.load_before, setup.load_after, setup.wall_seconds
    );
    for note in &setup.notes {
        println!("{note}");
    }
    println!(
        "{:<8} {:<7} {:>7} {:>11} {:>13} {:>14} {:>8} {:>10} {:>10} {:>8}",
        "side",
        "method",
        "threads",
        "trainable",
        "peak RSS MiB",
        "peak heap MiB",
        "step s",
        "1st step s",
        "final loss",
        "val acc"
    );
    for m in results {
        println!(
            "{:<8} {:<7} {:>7} {:>11} {:>13.1} {:>14} {:>8.3} {:>10.3} {:>10.3} {:>8.3}",
            m.side,
            m.method,
            m.threads,
            m.trainable,
            mib(m.peak_rss_delta_bytes),
            m.peak_heap_delta_bytes
                .map_or("-".into(), |b| format!("{:.1}", mib(b))),
            m.step_seconds,
            m.first_step_seconds,
            m.final_loss,
            m.valid_accuracy
        );
    }
    let find = |side: &str, method: &str| {
        results
            .iter()
            .find(|m| m.side == side && m.method == method)
    };
    for m in results {
        if let Some(diff) = m.pooled_max_abs_diff {
            println!(
                "backbone check ({} {}, before training): max |pooled features ours − peer| on the first batch = {diff:.2e}",
                m.side, m.method
            );
        }
    }
    println!("ours / PyTorch+PEFT, same method:");
    for method in ["full", "lora", "head"] {
        if let (Some(o), Some(p)) = (find("ours", method), find("pytorch", method)) {
            println!(
                "  {method:<6} peak RSS {:.2}×   step time {:.2}×   accuracy {:+.3}",
                ratio(o.peak_rss_delta_bytes, p.peak_rss_delta_bytes),
                o.step_seconds / p.step_seconds,
                o.valid_accuracy - p.valid_accuracy
            );
        }
    }
    // The linear probe is the floor: a method no more accurate than it learned nothing from tuning.
    if let Some(probe) = find("ours", "head") {
        println!(
            "accuracy above our linear probe (head, {:.3}):",
            probe.valid_accuracy
        );
        for m in results.iter().filter(|m| m.method != "head") {
            println!(
                "  {:<8} {:<7} {:+.3}",
                m.side,
                m.method,
                m.valid_accuracy - probe.valid_accuracy
            );
        }
    }
    if results.iter().any(|m| m.phase_seconds.is_some()) {
        println!("step parts (--phases), seconds: forward+loss / backward / optimiser+clip");
        for m in results {
            if let Some([f, b, o]) = m.phase_seconds {
                println!("  {:<8} {:<7} {f:>7.3} {b:>7.3} {o:>7.3}", m.side, m.method);
            }
        }
    }
    println!("targets:");
    let lst = find("ours", "lst");
    if let (Some(l), Some(f)) = (lst, find("ours", "full")) {
        target(
            "LST peak RSS / our full FT",
            ratio(l.peak_rss_delta_bytes, f.peak_rss_delta_bytes),
            0.3,
        );
    }
    if let (Some(l), Some(p)) = (lst, find("pytorch", "lora")) {
        target(
            "LST peak RSS / PyTorch+PEFT LoRA",
            ratio(l.peak_rss_delta_bytes, p.peak_rss_delta_bytes),
            0.5,
        );
    }
    for method in ["full", "lora"] {
        if let (Some(o), Some(p)) = (find("ours", method), find("pytorch", method)) {
            target(
                &format!("our step time / PyTorch, {method}"),
                o.step_seconds / p.step_seconds,
                1.0,
            );
        }
    }
    // Issue 11's bar for every method against our own full FT and LoRA at the same budget:
    // accuracy within 2 points of full FT, peak memory ≤ 0.30× full FT's, step time ≤ LoRA's.
    let (Some(full), lora) = (find("ours", "full"), find("ours", "lora")) else {
        return;
    };
    println!("each method against our full FT (and LoRA's step time):");
    for m in results
        .iter()
        .filter(|m| m.side == "ours" && m.method != "full")
    {
        let accuracy = m.valid_accuracy - full.valid_accuracy;
        let memory = ratio(m.peak_rss_delta_bytes, full.peak_rss_delta_bytes);
        let step = lora.map(|l| m.step_seconds / l.step_seconds);
        println!(
            "  {:<7} accuracy {accuracy:+.3} (≥ -0.020: {})   peak RSS {memory:.2}× (≤ 0.30: {})   step {} (≤ 1.00: {})",
            m.method,
            verdict(accuracy >= -0.02),
            verdict(memory <= 0.3),
            step.map_or("-".into(), |s| format!("{s:.2}×")),
            step.map_or("-", |s| verdict(s <= 1.0)),
        );
    }
}

fn verdict(met: bool) -> &'static str {
    if met { "met" } else { "MISSED" }
}

fn target(what: &str, value: f64, limit: f64) {
    println!(
        "  {what:<34} {value:>5.2}×  (≤ {limit:.2}: {})",
        verdict(value <= limit)
    );
}

fn ratio(a: i64, b: i64) -> f64 {
    a as f64 / b as f64
}

fn mib(bytes: i64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}
