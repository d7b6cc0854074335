//! Rank 0's report for the operator (`GET /report`, crds' `WorkerReport`): progress, the newest
//! snapshot committed on every rank and how many losses it survives, and the recoveries.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use petl_crds::{LastRecovery, PetlJobSpec, ProgressStatus, SnapshotStatus};

use crate::manifest::RecoveryRecord;
use crate::metrics::TrainerMetrics;
use crate::train::StepInfo;

/// Keeps the served report (and the matching gauges) current.
pub struct ReportWriter {
    metrics: TrainerMetrics,
    /// k + m and m of the job's erasure coding at its world size.
    shards: i32,
    parity: i32,
    /// Examples per optimiser step over all ranks.
    global_batch: f64,
}

impl ReportWriter {
    pub fn new(metrics: TrainerMetrics, spec: &PetlJobSpec, world_size: usize) -> ReportWriter {
        let ec = spec
            .snapshot
            .erasure_coding_for(i32::try_from(world_size).unwrap_or(i32::MAX));
        ReportWriter {
            metrics,
            shards: ec.data_shards + ec.parity_shards,
            parity: ec.parity_shards,
            global_batch: f64::from(spec.training.batch_size.max(1)),
        }
    }

    fn update(&self, f: impl FnOnce(&mut petl_crds::report::WorkerReport)) {
        if let Ok(mut report) = self.metrics.report.lock() {
            f(&mut report);
        }
    }

    /// After every step.
    pub fn step(&self, info: &StepInfo) {
        let steps_per_second = info.samples_per_second / self.global_batch;
        let left = info.total_steps.saturating_sub(info.step) as f64;
        let eta = (steps_per_second > 0.0).then(|| (left / steps_per_second).round() as i64);
        if let Some(g) = info.committed {
            self.metrics.committed_generation.set(g as i64);
        }
        let (shards, parity) = (self.shards, self.parity);
        self.update(|report| {
            let eval_metric = report.progress.eval_metric;
            report.progress = ProgressStatus {
                step: info.step as i64,
                total_steps: info.total_steps as i64,
                epoch: i32::try_from(info.epoch).unwrap_or(i32::MAX),
                loss: Some(info.loss).filter(|l| l.is_finite()),
                eval_metric,
                samples_per_second: Some(info.samples_per_second),
                eta_seconds: eta,
                summary: None,
            };
            report.progress.refresh_summary();
            if let Some(g) = info.committed {
                let known = report
                    .snapshot
                    .as_ref()
                    .is_some_and(|s| s.generation == g as i64);
                if !known {
                    report.snapshot = Some(SnapshotStatus {
                        generation: g as i64,
                        // A generation is the step it holds.
                        step: g as i64,
                        committed_at: Some(Time(Timestamp::now())),
                        healthy_shards: shards,
                        tolerable_losses: parity,
                    });
                }
            }
        });
    }

    /// After an evaluation.
    pub fn eval(&self, metric: f64) {
        self.update(|report| report.progress.eval_metric = Some(metric));
    }

    /// After the ranks resumed from a snapshot.
    pub fn recovered(&self, record: &RecoveryRecord) {
        self.metrics.recoveries.inc();
        self.metrics.recovery_seconds.set(record.seconds);
        // The slowest tier any rank needed names the recovery.
        let source = ["durable", "peers", "local"]
            .into_iter()
            .find(|tier| record.tiers.iter().any(|t| t == tier));
        self.update(|report| {
            report.recoveries += 1;
            report.last_recovery = Some(LastRecovery {
                lost_ranks: record
                    .lost_ranks
                    .iter()
                    .map(|&r| i32::try_from(r).unwrap_or(i32::MAX))
                    .collect(),
                restored_generation: record.restored_generation as i64,
                seconds: record.seconds,
                source: source.map(str::to_string),
                finished_at: Some(Time(Timestamp::now())),
            });
            report.progress.step = record.restored_generation as i64;
            report.progress.refresh_summary();
        });
    }
}
