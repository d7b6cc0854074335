//! The job's conditions through its life: suspend and resume, Running (and what blocks it),
//! Recovering, and the terminal Complete and Failed, with the events of each transition.

use kube::runtime::events::EventType;
use petl_crds::{ConditionType, LastRecovery, PetlJobStatus, Phase};

use super::{
    AfterStop, Loss, Observed, Plan, RefusalKind, StopReason, schedule_ttl, stop_active_pods, time,
};
use crate::reconcile::ranks::Blocked;

/// `spec.suspend` is true: Suspended, not Running, a recovery abandoned.
pub(super) fn suspend(o: &Observed, p: &mut Plan) {
    if !o.status.is_true(ConditionType::Suspended) {
        let stopping = p.stop.len();
        p.event(
            EventType::Normal,
            "Suspended",
            format!("spec.suspend is true; stopping {stopping} worker pod(s)"),
        );
    }
    let (observed, now) = (o.generation, time(o.now));
    let s = &mut p.status;
    s.set_condition(
        ConditionType::Suspended,
        true,
        "JobSuspended",
        "spec.suspend is true; worker pods are stopped",
        observed,
        now.clone(),
    );
    s.set_condition(
        ConditionType::Running,
        false,
        "Suspended",
        "the job is suspended",
        observed,
        now.clone(),
    );
    if s.is_true(ConditionType::Recovering) {
        s.set_condition(
            ConditionType::Recovering,
            false,
            "Suspended",
            "recovery abandoned: the job was suspended",
            observed,
            now,
        );
    }
    s.phase = Some(Phase::Suspended);
}

/// `spec.suspend` turned false: Suspended is False again and the pods come back.
pub(super) fn resume(o: &Observed, p: &mut Plan) {
    p.status.set_condition(
        ConditionType::Suspended,
        false,
        "JobResumed",
        "spec.suspend is false; worker pods are recreated",
        o.generation,
        time(o.now),
    );
    p.event(
        EventType::Normal,
        "Resumed",
        "spec.suspend is false; recreating the worker pods".into(),
    );
}

/// Every rank's trainer exited 0: Complete, with the artifact rank 0 published.
pub(super) fn complete(o: &Observed, p: &mut Plan) {
    let (observed, now) = (o.generation, time(o.now));
    let replicas = o.spec.workers.replicas;
    p.event(
        EventType::Normal,
        "Succeeded",
        format!("all {replicas} worker(s) exited 0"),
    );
    super::report::publish_artifact(o, p);
    let s = &mut p.status;
    s.set_condition(
        ConditionType::Complete,
        true,
        "Succeeded",
        "every worker exited 0",
        observed,
        now.clone(),
    );
    s.set_condition(
        ConditionType::Running,
        false,
        "Completed",
        "training finished",
        observed,
        now.clone(),
    );
    clear_recovering(s, observed, now.clone(), "training finished");
    s.phase = Some(Phase::Succeeded);
    s.completion_time = Some(now);
    schedule_ttl(o, p);
}

/// Mark the job Failed (terminal), stop its pods and create nothing more.
pub(super) fn fail(o: &Observed, p: &mut Plan, reason: &'static str, message: String) {
    let (observed, now) = (o.generation, time(o.now));
    p.create.clear();
    // Failed pods are kept for their logs; pods already terminating are still labelled.
    p.stop.retain(|s| !(s.deletes() && s.replaces()));
    for s in &mut p.stop {
        s.then = AfterStop::LeaveEmpty;
    }
    stop_active_pods(o, p, StopReason::Finished);
    p.event(EventType::Warning, reason, message.clone());
    let s = &mut p.status;
    s.set_condition(
        ConditionType::Failed,
        true,
        reason,
        &message,
        observed,
        now.clone(),
    );
    s.set_condition(
        ConditionType::Running,
        false,
        "Failed",
        "the job failed",
        observed,
        now.clone(),
    );
    clear_recovering(s, observed, now.clone(), "the job failed");
    s.phase = Some(Phase::Failed);
    s.completion_time = Some(now);
    schedule_ttl(o, p);
}

fn clear_recovering(
    s: &mut PetlJobStatus,
    observed: Option<i64>,
    now: k8s_openapi::apimachinery::pkg::apis::meta::v1::Time,
    why: &str,
) {
    if s.is_true(ConditionType::Recovering) {
        s.set_condition(
            ConditionType::Recovering,
            false,
            "Finished",
            why,
            observed,
            now,
        );
    }
}

/// Publish PodsCreated for first starts and resumes, RankReplaced for replacements.
pub(super) fn creation_events(o: &Observed, p: &mut Plan, started: bool, resuming: bool) {
    if o.refusal.is_some() {
        // A retry of a refused create: its own warning says what happens.
        return;
    }
    let replacing: Vec<i32> = p
        .stop
        .iter()
        .filter(|s| s.replaces())
        .map(|s| s.rank)
        .collect();
    if !p.create.is_empty() && (!started || resuming) {
        let n = p.create.len();
        p.event(
            EventType::Normal,
            "PodsCreated",
            format!("creating {n} worker pod(s) of {}", o.spec.workers.replicas),
        );
    } else {
        for rank in p.create.clone().into_iter().chain(replacing) {
            p.event(
                EventType::Normal,
                "RankReplaced",
                format!("creating a replacement pod for rank {rank}"),
            );
        }
    }
}

/// How long to wait before looking again at a rank that restarted in place and is Ready
/// already: nothing else would trigger the reconcile that ends its recovery.
const RECHECK_RECOVERED: std::time::Duration = std::time::Duration::from_secs(1);

/// Recovering is True from the first lost rank until every rank is Ready again.
pub(super) fn track_recovery(o: &Observed, p: &mut Plan, losses: &[Loss], ready: i32) {
    let (observed, now) = (o.generation, time(o.now));
    let mut lost: Vec<i32> = losses.iter().map(|l| l.rank).collect();
    lost.dedup();
    let all_ready = ready == o.spec.workers.replicas;
    let s = &mut p.status;
    let recovering = s.is_true(ConditionType::Recovering);
    if !lost.is_empty() {
        let mut record = match (&s.last_recovery, recovering) {
            (Some(last), true) => last.clone(),
            _ => LastRecovery {
                lost_ranks: Vec::new(),
                restored_generation: s.snapshot.as_ref().map_or(0, |snap| snap.generation),
                seconds: 0.0,
                source: None,
                finished_at: None,
            },
        };
        record.lost_ranks.extend(lost);
        record.lost_ranks.sort_unstable();
        record.lost_ranks.dedup();
        let message = format!("replacing lost ranks {:?}", record.lost_ranks);
        s.last_recovery = Some(record);
        s.set_condition(
            ConditionType::Recovering,
            true,
            "RanksLost",
            &message,
            observed,
            now,
        );
        if all_ready {
            p.requeue_in(RECHECK_RECOVERED);
        }
    } else if recovering && all_ready {
        let since = s
            .condition(ConditionType::Recovering)
            .map(|c| c.last_transition_time.0);
        let seconds = since.map_or(0.0, |t| {
            (o.now - t)
                .total(k8s_openapi::jiff::Unit::Second)
                .unwrap_or(0.0)
        });
        if let Some(last) = s.last_recovery.as_mut() {
            // The trainer's own measure, when its report had it, is the better one.
            if last.source.is_none() {
                last.seconds = seconds;
            }
            last.finished_at = Some(now.clone());
        }
        s.recoveries += 1;
        s.set_condition(
            ConditionType::Recovering,
            false,
            "Recovered",
            "every worker is Ready again",
            observed,
            now,
        );
        p.recovery_seconds = Some(seconds);
        p.event(
            EventType::Normal,
            "Recovered",
            format!("every worker is Ready again after {seconds:.1}s"),
        );
    }
}

/// Reasons of the Running condition that only a job that ran (or was suspended) can have.
const AFTER_FIRST_RUN: [&str; 6] = [
    "AllWorkersReady",
    "WorkersNotReady",
    "Recovering",
    "Suspended",
    "Completed",
    "Failed",
];

/// Running is True while every rank is Ready (or already finished). When it is not, the reason
/// says what the job waits for: a refused create, a pod the scheduler or kubelet cannot start,
/// a recovery, or the first start.
pub(super) fn track_running(
    o: &Observed,
    p: &mut Plan,
    ready_or_done: i32,
    blocked: &[(i32, Blocked)],
) {
    let (observed, now) = (o.generation, time(o.now));
    let replicas = o.spec.workers.replicas;
    let previous = p.status.condition(ConditionType::Running).cloned();
    let was_true = previous.as_ref().is_some_and(|c| c.status == "True");
    // Before the first run the condition only ever said starting, blocked or refused.
    let never_ran = previous.as_ref().is_none_or(|c| {
        !AFTER_FIRST_RUN.contains(&c.reason.as_str()) && p.status.last_recovery.is_none()
    });
    if ready_or_done == replicas {
        if !was_true {
            p.event(
                EventType::Normal,
                "Running",
                format!("all {replicas} worker(s) are Ready"),
            );
            if never_ran {
                p.time_to_running = o.created.map(|c| {
                    (o.now - c)
                        .total(k8s_openapi::jiff::Unit::Second)
                        .unwrap_or(0.0)
                });
            }
        }
        p.status.set_condition(
            ConditionType::Running,
            true,
            "AllWorkersReady",
            &format!("{replicas} of {replicas} workers Ready"),
            observed,
            now,
        );
        return;
    }
    let counts = format!("{ready_or_done} of {replicas} workers Ready");
    let (reason, message, warn) = if let Some(refusal) = o.refusal {
        let reason = match refusal.kind {
            RefusalKind::NameTaken => "PodNameTaken",
            _ => "CreateRefused",
        };
        let message = format!(
            "{counts}; {} was refused (attempt {}): {}; retrying in {}s",
            refusal.what,
            refusal.attempts,
            refusal.message,
            refusal.retry_after().as_secs()
        );
        (reason.to_string(), message, Some("CreateRefused"))
    } else if let Some((rank, b)) = blocked.first() {
        let message = format!("{counts}; rank {rank} is blocked: {}", b.message);
        (b.reason.clone(), message, Some("WorkerBlocked"))
    } else if p.status.is_true(ConditionType::Recovering) {
        ("Recovering".into(), counts, None)
    } else if never_ran {
        ("WorkersStarting".into(), counts, None)
    } else {
        ("WorkersNotReady".into(), counts, None)
    };
    if let Some(event) = warn {
        // Once per cause: a new reason, or a new attempt of a refused create.
        let same = previous
            .as_ref()
            .is_some_and(|c| c.reason == reason && (o.refusal.is_none() || c.message == message));
        if !same {
            p.event(EventType::Warning, event, message.clone());
        }
    }
    p.status.set_condition(
        ConditionType::Running,
        false,
        &reason,
        &message,
        observed,
        now,
    );
}
