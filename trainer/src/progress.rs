//! Shows a run's progress: a progress bar on a terminal, structured log lines (tracing, text or
//! JSON) elsewhere, and the same numbers in the Prometheus gauges.

use std::io::IsTerminal;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};

use crate::metrics::TrainerMetrics;

/// How progress is shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Display {
    /// A progress bar when stderr is a terminal, log lines otherwise.
    Auto,
    /// Log lines only.
    Logs,
}

/// What one optimiser step reports.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepUpdate {
    pub step: u64,
    pub loss: f64,
    pub learning_rate: f64,
    pub samples_per_second: f64,
    pub peak_memory_bytes: u64,
}

/// Fans a run's updates out to the bar or the log, and to the metrics.
pub struct Progress {
    bar: Option<ProgressBar>,
    metrics: Option<TrainerMetrics>,
    total_steps: u64,
    /// Log every this many steps when there is no bar, so logs stay readable on long runs.
    log_every: u64,
}

impl Progress {
    /// A bar or log lines for `total_steps`; without a bar a step line every `log_every` steps
    /// (default: 50 lines a run) and at the last step.
    pub fn new(
        total_steps: u64,
        display: Display,
        log_every: Option<u64>,
        metrics: Option<TrainerMetrics>,
    ) -> Self {
        let bar = (display == Display::Auto && std::io::stderr().is_terminal()).then(|| {
            let bar = ProgressBar::new(total_steps);
            bar.set_style(
                ProgressStyle::with_template(
                    "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} steps  eta {eta}  {msg}",
                )
                .expect("a valid progress template"),
            );
            bar.enable_steady_tick(Duration::from_millis(250));
            bar
        });
        if let Some(metrics) = &metrics {
            metrics.total_steps.set(total_steps as i64);
        }
        Self {
            bar,
            metrics,
            total_steps,
            log_every: log_every.unwrap_or(total_steps / 50).max(1),
        }
    }

    pub fn step(&self, update: &StepUpdate) {
        if let Some(metrics) = &self.metrics {
            metrics.step.set(update.step as i64);
            metrics.loss.set(update.loss);
            metrics.learning_rate.set(update.learning_rate);
            metrics.samples_per_second.set(update.samples_per_second);
            // The gauge is the run's peak so far; a step reports only its own.
            let peak = metrics
                .peak_memory_bytes
                .get()
                .max(update.peak_memory_bytes as i64);
            metrics.peak_memory_bytes.set(peak);
        }
        match &self.bar {
            Some(bar) => {
                bar.set_position(update.step);
                bar.set_message(format!(
                    "loss {:.4}  {:.1} samples/s  peak {:.0} MiB",
                    update.loss,
                    update.samples_per_second,
                    update.peak_memory_bytes as f64 / (1 << 20) as f64
                ));
            }
            None if update.step.is_multiple_of(self.log_every)
                || update.step == self.total_steps =>
            {
                tracing::info!(
                    step = update.step,
                    total_steps = self.total_steps,
                    loss = update.loss,
                    learning_rate = update.learning_rate,
                    samples_per_second = update.samples_per_second,
                    peak_memory_bytes = update.peak_memory_bytes,
                    "step"
                );
            }
            None => {}
        }
    }

    pub fn eval(&self, step: u64, name: &str, value: f64) {
        if let Some(metrics) = &self.metrics {
            metrics.eval_metric.set(value);
        }
        match &self.bar {
            Some(bar) => bar.println(format!("step {step}: validation {name} {value:.4}")),
            None => tracing::info!(step, metric = name, value, "evaluation"),
        }
    }

    /// A line of its own above the bar (the log already has it as a structured line).
    pub fn note(&self, line: &str) {
        if let Some(bar) = &self.bar {
            bar.println(line);
        }
    }

    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish();
        }
    }
}

/// Installs the tracing subscriber: JSON lines or human-readable text on stderr, filtered by
/// `RUST_LOG` (default `info`).
pub fn init_logging(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    // A second call (tests) keeps the first subscriber.
    let _ = if json {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}
