//! What the operator reports (`status`): phase, standard conditions, progress, snapshots, artifact.
//! The condition helpers here are the one place conditions are read and written.

use std::fmt;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::KubeSchema;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Observed state of a PetlJob, written only by the operator.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct PetlJobStatus {
    /// One-word summary of the conditions, for `kubectl get`: Pending, Running, Recovering,
    /// Suspended, Succeeded or Failed. Automation should read the conditions instead.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<Phase>,
    /// Standard conditions: Suspended, Running, Recovering, SnapshotDegraded, ArtifactPublished,
    /// Complete, Failed. Complete and Failed are terminal and never revert.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    #[x_kube(merge_strategy = kube::core::ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,
    /// The metadata.generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Ready versus desired worker pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workers: Option<WorkerCounts>,
    /// Training progress reported by rank 0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<ProgressStatus>,
    /// The newest committed snapshot generation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<SnapshotStatus>,
    /// Completed recoveries (lost workers replaced and state restored) over the job's life.
    #[serde(default)]
    pub recoveries: i64,
    /// The most recent recovery.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_recovery: Option<LastRecovery>,
    /// Worker failures by failure-policy action.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restarts: Option<RestartCounts>,
    /// The published adapter, once the job succeeded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact: Option<ArtifactStatus>,
    /// When the operator first created worker pods. Set once; from then on the training-defining
    /// spec fields are immutable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<Time>,
    /// When the job reached Complete or Failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_time: Option<Time>,
}

/// Ready and desired worker counts.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub struct WorkerCounts {
    /// Workers whose pod is Ready.
    pub ready: i32,
    /// Desired workers (spec.workers.replicas).
    pub total: i32,
}

/// Training progress.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct ProgressStatus {
    /// Optimiser steps completed.
    pub step: i64,
    /// Steps the run will take in total.
    pub total_steps: i64,
    /// Current epoch (0-based).
    #[serde(default)]
    pub epoch: i32,
    /// Training loss averaged since the previous report.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss: Option<f64>,
    /// Latest evaluation result (accuracy for classification, perplexity for causal-lm).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eval_metric: Option<f64>,
    /// Training throughput over all workers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub samples_per_second: Option<f64>,
    /// Estimated seconds to the last step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eta_seconds: Option<i64>,
    /// "step/totalSteps (percent%)", shown in the Progress column; see ProgressStatus::summary.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub summary: Option<String>,
}

impl ProgressStatus {
    /// The Progress column text, e.g. `120/500 (24%)`.
    pub fn summary(step: i64, total_steps: i64) -> String {
        if total_steps <= 0 {
            return format!("{step}/?");
        }
        let percent = (step.clamp(0, total_steps) * 100) / total_steps;
        format!("{step}/{total_steps} ({percent}%)")
    }

    /// Recompute `summary` from `step` and `total_steps`.
    pub fn refresh_summary(&mut self) {
        self.summary = Some(Self::summary(self.step, self.total_steps));
    }
}

/// The newest committed snapshot.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct SnapshotStatus {
    /// Monotonic generation number of the newest snapshot committed on every worker.
    pub generation: i64,
    /// The training step that snapshot holds.
    pub step: i64,
    /// When it was committed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub committed_at: Option<Time>,
    /// Shards of that generation currently held by live workers.
    pub healthy_shards: i32,
    /// Further worker losses the snapshot survives (healthyShards - dataShards).
    pub tolerable_losses: i32,
}

/// The most recent recovery.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct LastRecovery {
    /// Ranks whose pods were replaced.
    #[serde(default)]
    pub lost_ranks: Vec<i32>,
    /// Snapshot generation training resumed from.
    pub restored_generation: i64,
    /// From the loss being noticed to training resuming.
    pub seconds: f64,
    /// The tier the state came from, as the trainer reported it: local (its own agent), peers
    /// (shards held by the other ranks) or durable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// When training resumed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<Time>,
}

/// Worker failures by failure-policy action.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub struct RestartCounts {
    /// Failures with action Count (compared with runPolicy.backoffLimit).
    pub counted: i32,
    /// Failures with action Ignore (disruptions).
    pub ignored: i32,
}

/// The published adapter.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct ArtifactStatus {
    /// Where it was written (spec.output.uri).
    pub uri: String,
    /// sha256:<hex> of the adapter tensor file.
    pub digest: String,
    /// Size of the adapter tensor file.
    pub size_bytes: i64,
    /// Trained parameter count.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trainable_parameters: Option<i64>,
    /// Peak trainer memory of rank 0 during training.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peak_memory_bytes: Option<i64>,
}

/// The printer-column summary of the conditions.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Phase {
    /// Accepted; workers not all running yet.
    Pending,
    /// All workers are training.
    Running,
    /// Replacing lost workers and restoring their state.
    Recovering,
    /// spec.suspend is true and no worker pods exist.
    Suspended,
    /// Finished; the adapter is published.
    Succeeded,
    /// Finished without an adapter.
    Failed,
}

impl Phase {
    /// The name as written in status.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Pending => "Pending",
            Phase::Running => "Running",
            Phase::Recovering => "Recovering",
            Phase::Suspended => "Suspended",
            Phase::Succeeded => "Succeeded",
            Phase::Failed => "Failed",
        }
    }

    /// Succeeded or Failed: nothing will change any more.
    pub fn is_terminal(self) -> bool {
        matches!(self, Phase::Succeeded | Phase::Failed)
    }
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The condition types a PetlJob reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ConditionType {
    /// True while spec.suspend is true and the workers are stopped.
    Suspended,
    /// True while every worker is training.
    Running,
    /// True while lost workers are being replaced and restored.
    Recovering,
    /// True while fewer shards than dataShards + parityShards of the newest snapshot are alive.
    SnapshotDegraded,
    /// True once the adapter is written and its digest recorded.
    ArtifactPublished,
    /// Terminal: training finished and the artifact is published.
    Complete,
    /// Terminal: the job failed (reason says why).
    Failed,
}

impl ConditionType {
    /// The `type` string in the condition.
    pub fn as_str(self) -> &'static str {
        match self {
            ConditionType::Suspended => "Suspended",
            ConditionType::Running => "Running",
            ConditionType::Recovering => "Recovering",
            ConditionType::SnapshotDegraded => "SnapshotDegraded",
            ConditionType::ArtifactPublished => "ArtifactPublished",
            ConditionType::Complete => "Complete",
            ConditionType::Failed => "Failed",
        }
    }
}

impl fmt::Display for ConditionType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl PetlJobStatus {
    /// The condition of type `type_`, if reported.
    pub fn condition(&self, type_: ConditionType) -> Option<&Condition> {
        self.conditions.iter().find(|c| c.type_ == type_.as_str())
    }

    /// Whether the condition is reported with status True.
    pub fn is_true(&self, type_: ConditionType) -> bool {
        self.condition(type_).is_some_and(|c| c.status == "True")
    }

    /// Complete or Failed is True.
    pub fn is_finished(&self) -> bool {
        self.is_true(ConditionType::Complete) || self.is_true(ConditionType::Failed)
    }

    /// Set a condition. `lastTransitionTime` moves to `now` only when the status flips, so
    /// repeated reconciles do not churn it. Returns whether anything changed.
    pub fn set_condition(
        &mut self,
        type_: ConditionType,
        status: bool,
        reason: &str,
        message: &str,
        observed_generation: Option<i64>,
        now: Time,
    ) -> bool {
        let status = if status { "True" } else { "False" };
        let new = |last_transition_time| Condition {
            type_: type_.as_str().into(),
            status: status.into(),
            reason: reason.into(),
            message: message.into(),
            observed_generation,
            last_transition_time,
        };
        match self
            .conditions
            .iter_mut()
            .find(|c| c.type_ == type_.as_str())
        {
            None => {
                self.conditions.push(new(now));
                true
            }
            Some(existing) => {
                let since = if existing.status == status {
                    existing.last_transition_time.clone()
                } else {
                    now
                };
                let updated = new(since);
                let changed = *existing != updated;
                *existing = updated;
                changed
            }
        }
    }

    /// The phase the conditions imply. Precedence: Failed, Succeeded (Complete), Suspended,
    /// Recovering, Running, else Pending.
    pub fn derive_phase(&self) -> Phase {
        use ConditionType as C;
        if self.is_true(C::Failed) {
            Phase::Failed
        } else if self.is_true(C::Complete) {
            Phase::Succeeded
        } else if self.is_true(C::Suspended) {
            Phase::Suspended
        } else if self.is_true(C::Recovering) {
            Phase::Recovering
        } else if self.is_true(C::Running) {
            Phase::Running
        } else {
            Phase::Pending
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: i64) -> Time {
        Time(k8s_openapi::jiff::Timestamp::from_second(secs).unwrap())
    }

    #[test]
    fn transition_time_moves_only_when_status_flips() {
        let mut s = PetlJobStatus::default();
        assert!(s.set_condition(
            ConditionType::Running,
            true,
            "PodsReady",
            "2/2",
            Some(1),
            at(10)
        ));
        assert!(!s.set_condition(
            ConditionType::Running,
            true,
            "PodsReady",
            "2/2",
            Some(1),
            at(20)
        ));
        assert_eq!(
            s.condition(ConditionType::Running)
                .unwrap()
                .last_transition_time,
            at(10)
        );
        assert!(s.set_condition(
            ConditionType::Running,
            true,
            "PodsReady",
            "2/2",
            Some(2),
            at(30)
        ));
        assert_eq!(
            s.condition(ConditionType::Running)
                .unwrap()
                .last_transition_time,
            at(10)
        );
        assert!(s.set_condition(
            ConditionType::Running,
            false,
            "RankLost",
            "1/2",
            Some(2),
            at(40)
        ));
        assert_eq!(
            s.condition(ConditionType::Running)
                .unwrap()
                .last_transition_time,
            at(40)
        );
    }

    #[test]
    fn terminal_conditions_win_the_phase() {
        let mut s = PetlJobStatus::default();
        assert_eq!(s.derive_phase(), Phase::Pending);
        s.set_condition(ConditionType::Running, true, "PodsReady", "", None, at(1));
        assert_eq!(s.derive_phase(), Phase::Running);
        s.set_condition(ConditionType::Recovering, true, "RankLost", "", None, at(2));
        assert_eq!(s.derive_phase(), Phase::Recovering);
        s.set_condition(
            ConditionType::Failed,
            true,
            "BackoffLimitExceeded",
            "",
            None,
            at(3),
        );
        assert_eq!(s.derive_phase(), Phase::Failed);
        assert!(s.is_finished());
    }

    #[test]
    fn summary_shows_step_total_and_percent() {
        assert_eq!(ProgressStatus::summary(120, 500), "120/500 (24%)");
        assert_eq!(ProgressStatus::summary(7, 0), "7/?");
    }
}
