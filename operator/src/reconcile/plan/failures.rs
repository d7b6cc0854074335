//! Losses and the failure budget: which ranks were lost (failed, vanished, deleted by someone
//! else, restarted in place), how the failure policy classifies each, and when the job fails.

use kube::runtime::events::EventType;
use petl_crds::{FailureAction, RestartCounts};

use super::{
    AfterStop, CountRestarts, Loss, Observed, Plan, StopReason, conditions, pods_by_rank, stop,
};
use crate::reconcile::ranks::{Blocked, PodState, RankPod};

/// What one look at the ranks found.
pub(super) struct Survey {
    /// Ranks lost since the last look.
    pub losses: Vec<Loss>,
    /// Ranks whose pod is Ready.
    pub ready: i32,
    /// Ranks whose trainer exited 0.
    pub succeeded: i32,
    /// Ranks whose pod cannot start, and why.
    pub blocked: Vec<(i32, Blocked)>,
}

/// Look at every rank: plan its pod's creation, replacement or restart accounting, and collect
/// what was lost.
pub(super) fn survey(o: &Observed, p: &mut Plan, started: bool, resuming: bool) -> Survey {
    let by_rank = pods_by_rank(o.pods);
    let mut found = Survey {
        losses: Vec::new(),
        ready: 0,
        succeeded: 0,
        blocked: Vec::new(),
    };
    for rank in 0..o.spec.workers.replicas {
        let Some(pod) = by_rank.get(&rank) else {
            let expected_gone = !started || resuming || o.awaiting_replacement.contains(&rank);
            if !expected_gone {
                found
                    .losses
                    .push(lost(o, rank, None, &[], "its pod was deleted".into()));
            }
            p.create.push(rank);
            continue;
        };
        match (pod.state, pod.deleting) {
            (PodState::Active { .. } | PodState::Failed, true) => {
                if !pod.stopped_by_operator {
                    let loss = pod_lost(o, pod, &mut found.losses);
                    p.stop
                        .push(stop(pod, StopReason::Lost(loss), AfterStop::Replace));
                }
            }
            (PodState::Failed, false) => {
                let reason = if pod.stopped_by_operator {
                    StopReason::Replaced
                } else {
                    StopReason::Lost(pod_lost(o, pod, &mut found.losses))
                };
                p.stop.push(stop(pod, reason, AfterStop::Replace));
            }
            (PodState::Succeeded, _) => found.succeeded += 1,
            (PodState::Active { ready }, false) => {
                found.ready += i32::from(ready);
                restarted_in_place(o, p, pod, &mut found.losses);
                if let Some(blocked) = &pod.blocked {
                    found.blocked.push((rank, blocked.clone()));
                }
            }
        }
    }
    found
}

/// A pod that failed or is being deleted: its restarts in place first (they happened before),
/// then the pod itself. Its stop label commits all of them. Returns the pod's classification.
fn pod_lost(o: &Observed, pod: &RankPod, losses: &mut Vec<Loss>) -> FailureAction {
    for restarts in &pod.restarts {
        for _ in 0..restarts.uncounted() {
            losses.push(restart_loss(
                o,
                pod.rank,
                restarts.container,
                restarts.last_exit_code,
            ));
        }
    }
    let loss = lost(
        o,
        pod.rank,
        pod.exit_code,
        &pod.condition_names(),
        describe_failure(pod),
    );
    let action = loss.action;
    losses.push(loss);
    action
}

/// Restarts in place of a running pod's containers since they were last counted; the count is
/// recorded on the pod before the status.
fn restarted_in_place(o: &Observed, p: &mut Plan, pod: &RankPod, losses: &mut Vec<Loss>) {
    if pod.stopped_by_operator {
        return;
    }
    for restarts in pod.restarts.iter().filter(|r| r.uncounted() > 0) {
        for _ in 0..restarts.uncounted() {
            losses.push(restart_loss(
                o,
                pod.rank,
                restarts.container,
                restarts.last_exit_code,
            ));
        }
        p.count_restarts.push(CountRestarts {
            name: pod.name.clone(),
            uid: pod.uid.clone(),
            container: restarts.container,
            restarts: restarts.seen,
        });
    }
}

fn restart_loss(o: &Observed, rank: i32, container: &str, exit_code: Option<i32>) -> Loss {
    let action = o.spec.run_policy.classify(exit_code, &[]);
    let code = exit_code.map_or_else(|| "unknown".into(), |c| c.to_string());
    Loss {
        rank,
        action,
        detail: format!("its {container} container restarted in place (exit code {code})"),
        in_place: true,
    }
}

fn lost(
    o: &Observed,
    rank: i32,
    exit_code: Option<i32>,
    conditions: &[&str],
    detail: String,
) -> Loss {
    Loss {
        rank,
        action: o.spec.run_policy.classify(exit_code, conditions),
        detail,
        in_place: false,
    }
}

/// Count losses against the budget; fail the job on a FailJob action or an exhausted budget.
/// Returns whether the job failed.
pub(super) fn account(o: &Observed, p: &mut Plan, losses: &[Loss]) -> bool {
    let mut restarts = p.status.restarts.clone().unwrap_or(RestartCounts {
        counted: 0,
        ignored: 0,
    });
    let mut fatal = None;
    for loss in losses {
        p.failures.push(loss.action);
        match loss.action {
            FailureAction::Count => restarts.counted += 1,
            FailureAction::Ignore => restarts.ignored += 1,
            FailureAction::FailJob => fatal = fatal.or(Some(loss)),
        }
        let reason = if loss.in_place {
            "RankRestarted"
        } else {
            "RankLost"
        };
        p.event(
            EventType::Warning,
            reason,
            format!(
                "rank {}: {}; failure policy action {:?}",
                loss.rank, loss.detail, loss.action
            ),
        );
    }
    p.status.restarts = Some(restarts.clone());
    if let Some(loss) = fatal {
        conditions::fail(
            o,
            p,
            "PodFailurePolicy",
            format!(
                "rank {}: {}, a permanent error (failure policy action FailJob)",
                loss.rank, loss.detail
            ),
        );
        return true;
    }
    let limit = o.spec.run_policy.backoff_limit;
    if restarts.counted > limit {
        conditions::fail(
            o,
            p,
            "BackoffLimitExceeded",
            format!(
                "{} counted worker failures exceed spec.runPolicy.backoffLimit ({limit})",
                restarts.counted
            ),
        );
        return true;
    }
    false
}

fn describe_failure(pod: &RankPod) -> String {
    let conditions = pod
        .condition_names()
        .into_iter()
        .filter(|c| *c != "Ready")
        .collect::<Vec<_>>();
    match (pod.exit_code, conditions.is_empty()) {
        (Some(code), true) => format!("its trainer exited with code {code}"),
        (Some(code), false) => {
            format!("its trainer exited with code {code} (pod conditions {conditions:?})")
        }
        (None, false) => format!("its pod stopped (pod conditions {conditions:?})"),
        (None, true) => "its pod stopped".into(),
    }
}
