//! What the workers told the operator, folded into the status: rank 0's report (progress, the
//! committed snapshot, the tier of the last recovery) and, at the end, the published artifact.

use kube::runtime::events::EventType;
use petl_crds::report::WorkerReport;
use petl_crds::{ConditionType, LastRecovery, SnapshotStatus};

use super::{Observed, Plan, time};
use crate::reconcile::pod::TERMINATION_MESSAGE_PATH;
use crate::reconcile::ranks::PodState;

/// Copy rank 0's latest report into the status.
pub(super) fn fold(o: &Observed, p: &mut Plan) {
    if let Some(report) = o.report {
        fold_report(o, p, report);
    }
}

fn fold_report(o: &Observed, p: &mut Plan, report: &WorkerReport) {
    let mut progress = report.progress.clone();
    progress.refresh_summary();
    p.status.progress = Some(progress);
    if let Some(snapshot) = &report.snapshot {
        p.status.snapshot = Some(snapshot.clone());
        degraded(o, p, snapshot);
    }
    if let Some(theirs) = &report.last_recovery {
        recovery(p, theirs);
    }
}

/// SnapshotDegraded is True while fewer than dataShards + parityShards shards of the newest
/// generation are held by live workers.
fn degraded(o: &Observed, p: &mut Plan, snapshot: &SnapshotStatus) {
    let layout = o.spec.snapshot.erasure_coding_for(o.spec.workers.replicas);
    let shards = layout.data_shards + layout.parity_shards;
    let generation = snapshot.generation;
    let (degraded, reason, message) = if snapshot.healthy_shards < shards {
        (
            true,
            "ShardsLost",
            format!(
                "{} of {shards} shards of generation {generation} are held by live workers; {} more loss(es) survivable",
                snapshot.healthy_shards, snapshot.tolerable_losses
            ),
        )
    } else {
        (
            false,
            "ShardsHealthy",
            format!("all {shards} shards of generation {generation} are held by live workers"),
        )
    };
    p.status.set_condition(
        ConditionType::SnapshotDegraded,
        degraded,
        reason,
        &message,
        o.generation,
        time(o.now),
    );
}

/// The tier, generation and duration of the recovery the operator saw, from the trainer's side.
/// A report still showing an earlier recovery restored an older generation than the one
/// committed when this loss was noticed, and is not taken.
fn recovery(p: &mut Plan, theirs: &LastRecovery) {
    match p.status.last_recovery.as_mut() {
        // A recovery the operator did not see (a restart faster than a reconcile, or before
        // this operator started).
        None => p.status.last_recovery = Some(theirs.clone()),
        Some(ours)
            if ours.source.is_none()
                && theirs.source.is_some()
                && theirs.restored_generation >= ours.restored_generation =>
        {
            ours.restored_generation = theirs.restored_generation;
            ours.source = theirs.source.clone();
            ours.seconds = theirs.seconds;
        }
        Some(_) => {}
    }
}

/// Every rank exited 0: fold rank 0's final report (a job can end between two polls), record
/// what it published (its termination message) and set ArtifactPublished, or say that nothing
/// was reported.
pub(super) fn publish_artifact(o: &Observed, p: &mut Plan) {
    let (observed, now) = (o.generation, time(o.now));
    let last_words = o
        .pods
        .iter()
        .filter(|pod| pod.rank == 0 && pod.state == PodState::Succeeded)
        .find_map(|pod| pod.final_report.as_ref());
    if let Some(report) = last_words {
        fold_report(o, p, report);
    }
    let artifact = o
        .pods
        .iter()
        .filter(|pod| pod.rank == 0 && pod.state == PodState::Succeeded)
        .find_map(|pod| pod.artifact.clone());
    match artifact {
        Some(artifact) => {
            let message = format!(
                "{} ({} bytes) at {}",
                artifact.digest, artifact.size_bytes, artifact.uri
            );
            p.event(EventType::Normal, "ArtifactPublished", message.clone());
            p.status.set_condition(
                ConditionType::ArtifactPublished,
                true,
                "Published",
                &message,
                observed,
                now,
            );
            p.status.artifact = Some(artifact);
        }
        None => {
            let message = format!(
                "rank 0 exited 0 without the published artifact as JSON in its termination message ({TERMINATION_MESSAGE_PATH})"
            );
            p.event(EventType::Warning, "ArtifactNotReported", message.clone());
            p.status.set_condition(
                ConditionType::ArtifactPublished,
                false,
                "NotReported",
                &message,
                observed,
                now,
            );
        }
    }
}
