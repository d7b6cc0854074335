//! What the workers tell the operator, over channels that need no cluster rights: rank 0's
//! trainer serves a [`WorkerReport`] while it trains, and writes the [`ArtifactStatus`] it
//! published as its container's termination message when it succeeds.

use serde::{Deserialize, Serialize};

use crate::{ArtifactStatus, LastRecovery, ProgressStatus, SnapshotStatus};

/// Path of the report on rank 0's metrics port (`GET http://<pod IP>:<port>/report`).
pub const REPORT_PATH: &str = "/report";

/// Name of the trainer container's port that serves `/metrics` and [`REPORT_PATH`].
pub const METRICS_PORT_NAME: &str = "metrics";

/// Rank 0's view of the job while it trains. The operator copies it into `status.progress`,
/// `status.snapshot` and `status.lastRecovery`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct WorkerReport {
    pub progress: ProgressStatus,
    /// The newest snapshot generation committed by every rank; absent before the first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<SnapshotStatus>,
    /// The newest recovery the ranks went through (restored generation, tier as `source`:
    /// `local`, `peers` or `durable`, and the ranks that were lost).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_recovery: Option<LastRecovery>,
    /// Recoveries the ranks went through since this trainer process started.
    #[serde(default)]
    pub recoveries: i64,
}

/// What rank 0's trainer writes as its container's termination message when it succeeds: the
/// artifact it published and its final report. A job can finish between two polls of
/// [`REPORT_PATH`]; the final report still brings the last progress, snapshot and recovery
/// (with its tier) into the status.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct TerminationMessage {
    pub artifact: ArtifactStatus,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub report: Option<WorkerReport>,
}

/// Parses the trainer container's termination message.
pub fn from_termination_message(message: &str) -> Option<TerminationMessage> {
    serde_json::from_str(message.trim()).ok()
}
