//! The reconcile decision as a pure function: from the job and its pods to the pods to create
//! and stop, the next status, the events to publish and when to look again.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::runtime::events::EventType;
use petl_crds::{
    ConditionType, FailureAction, LastRecovery, PetlJobSpec, PetlJobStatus, Phase, RestartCounts,
    WorkerCounts,
};

use super::ranks::{PodState, RankPod};

/// Everything the planner looks at.
#[derive(Clone, Debug)]
pub struct Observed<'a> {
    /// The job's spec.
    pub spec: &'a PetlJobSpec,
    /// The job's current status (default when it has none yet).
    pub status: &'a PetlJobStatus,
    /// metadata.generation.
    pub generation: Option<i64>,
    /// metadata.creationTimestamp.
    pub created: Option<Timestamp>,
    /// The job's worker pods.
    pub pods: &'a [RankPod],
    /// Ranks whose pod the operator stopped and has not replaced yet (the pod may be gone
    /// already); a missing pod of such a rank is not a new loss.
    pub awaiting_replacement: &'a BTreeSet<i32>,
    /// The time the decision is made at.
    pub now: Timestamp,
}

/// A pod to stop: labelled with `reason` first (so it is accounted once), then deleted unless
/// it is already terminating.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stop {
    /// Pod name.
    pub name: String,
    /// Pod UID, the delete precondition.
    pub uid: String,
    /// Rank of the pod.
    pub rank: i32,
    /// Value of the `petl.dev/stopped` label.
    pub reason: String,
    /// Delete it (false when it is already terminating).
    pub delete: bool,
    /// Create the rank's replacement as soon as the pod is gone.
    pub replace: bool,
}

/// One event to publish on the PetlJob.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JobEvent {
    /// Normal or Warning.
    pub type_: EventType,
    /// PascalCase reason, e.g. RankLost.
    pub reason: &'static str,
    /// Human-readable detail.
    pub note: String,
}

/// What the reconcile should do.
#[derive(Clone, Debug)]
pub struct Plan {
    /// Ranks whose pod is missing and must be created now.
    pub create: Vec<i32>,
    /// Pods to label and stop.
    pub stop: Vec<Stop>,
    /// The status to report.
    pub status: PetlJobStatus,
    /// Events to publish, in order.
    pub events: Vec<JobEvent>,
    /// Worker failures found this time, by failure-policy action.
    pub failures: Vec<FailureAction>,
    /// Look again after this long (a deadline or TTL expiry).
    pub requeue_after: Option<Duration>,
    /// The TTL after finishing expired: delete the PetlJob.
    pub delete_job: bool,
    /// A recovery finished this time, taking this many seconds.
    pub recovery_seconds: Option<f64>,
    /// Every worker became Ready for the first time, this many seconds after creation.
    pub time_to_running: Option<f64>,
}

/// Decide the next step for one job.
pub fn plan(o: &Observed) -> Plan {
    let mut p = Plan {
        create: Vec::new(),
        stop: Vec::new(),
        status: o.status.clone(),
        events: Vec::new(),
        failures: Vec::new(),
        requeue_after: None,
        delete_job: false,
        recovery_seconds: None,
        time_to_running: None,
    };
    p.status.observed_generation = o.generation;
    p.status.workers = Some(WorkerCounts {
        ready: count_ready(o.pods),
        total: o.spec.workers.replicas,
    });

    if o.status.is_finished() {
        finished(o, &mut p);
    } else if o.spec.suspend {
        suspended(o, &mut p);
    } else {
        active(o, &mut p);
    }
    p
}

/// Terminal state is sticky: never create pods again, stop stragglers, delete after the TTL.
fn finished(o: &Observed, p: &mut Plan) {
    stop_active_pods(o, p, "Finished");
    schedule_ttl(o, p);
}

/// `spec.suspend: true`: stop every worker and report Suspended (Kueue semantics).
fn suspended(o: &Observed, p: &mut Plan) {
    stop_active_pods(o, p, "Suspended");
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

/// Not suspended and not finished: keep one healthy pod per rank, account for failures, and
/// move the conditions along.
fn active(o: &Observed, p: &mut Plan) {
    let (observed, now) = (o.generation, time(o.now));
    let resuming = o.status.is_true(ConditionType::Suspended);
    if resuming {
        p.status.set_condition(
            ConditionType::Suspended,
            false,
            "JobResumed",
            "spec.suspend is false; worker pods are recreated",
            observed,
            now.clone(),
        );
        p.event(
            EventType::Normal,
            "Resumed",
            "spec.suspend is false; recreating the worker pods".into(),
        );
    }

    if deadline_passed(o, p) {
        return;
    }

    let started = o.status.start_time.is_some();
    let replicas = o.spec.workers.replicas;
    let by_rank = pods_by_rank(o.pods);
    let mut losses: Vec<(i32, FailureAction, String)> = Vec::new();
    let (mut ready, mut succeeded) = (0, 0);

    for rank in 0..replicas {
        let Some(pod) = by_rank.get(&rank) else {
            let expected_gone = !started || resuming || o.awaiting_replacement.contains(&rank);
            if !expected_gone {
                let action = o.spec.run_policy.classify(None, &[]);
                losses.push((rank, action, "its pod was deleted".into()));
            }
            p.create.push(rank);
            continue;
        };
        match (pod.state, pod.deleting) {
            (PodState::Active { .. } | PodState::Failed, true) => {
                if !pod.stopped_by_operator {
                    let action = o
                        .spec
                        .run_policy
                        .classify(pod.exit_code, &pod.condition_names());
                    losses.push((rank, action, describe_failure(pod)));
                    p.stop.push(stop(pod, &format!("{action:?}"), false, true));
                }
            }
            (PodState::Failed, false) => {
                let mut reason = "Replaced".to_string();
                if !pod.stopped_by_operator {
                    let action = o
                        .spec
                        .run_policy
                        .classify(pod.exit_code, &pod.condition_names());
                    losses.push((rank, action, describe_failure(pod)));
                    reason = format!("{action:?}");
                }
                p.stop.push(stop(pod, &reason, true, true));
            }
            (PodState::Succeeded, _) => succeeded += 1,
            (PodState::Active { ready: r }, false) => ready += i32::from(r),
        }
    }

    if account_failures(o, p, &losses) {
        return;
    }

    if succeeded == replicas {
        p.event(
            EventType::Normal,
            "Succeeded",
            format!("all {replicas} worker(s) exited 0"),
        );
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
        return;
    }

    creation_events(o, p, started, resuming);
    // Pods an earlier operator created before it could report them start the clock too.
    if p.status.start_time.is_none() && !(p.create.is_empty() && o.pods.is_empty()) {
        p.status.start_time = Some(now.clone());
    }
    track_recovery(o, p, &losses, ready);
    track_running(o, p, ready + succeeded);
    p.status.phase = Some(if p.status.is_true(ConditionType::Recovering) {
        Phase::Recovering
    } else if p.status.is_true(ConditionType::Running) {
        Phase::Running
    } else {
        Phase::Pending
    });
}

/// Fail the job with DeadlineExceeded once `activeDeadlineSeconds` have passed since the start
/// or the last resume; otherwise requeue at the exact deadline.
fn deadline_passed(o: &Observed, p: &mut Plan) -> bool {
    let Some(seconds) = o.spec.run_policy.active_deadline_seconds else {
        return false;
    };
    let resumed = p
        .status
        .condition(ConditionType::Suspended)
        .filter(|c| c.status == "False")
        .map(|c| c.last_transition_time.0);
    let Some(started) = o.status.start_time.as_ref().map(|t| t.0).max(resumed) else {
        // Not started yet: the clock starts with the first pods.
        p.requeue_at(o.now, o.now + Duration::from_secs(seconds as u64));
        return false;
    };
    // metav1.Time keeps whole seconds, so the true start lies in the second after the stored
    // one; counting from that second's end makes the deadline up to 1 s late, never early.
    let deadline = started + Duration::from_secs(seconds as u64 + 1);
    if o.now < deadline {
        p.requeue_at(o.now, deadline);
        return false;
    }
    fail(
        o,
        p,
        "DeadlineExceeded",
        format!("the job ran longer than spec.runPolicy.activeDeadlineSeconds ({seconds}s)"),
    );
    true
}

/// Count failures against the budget; fail the job on a FailJob action or an exhausted
/// budget. Returns whether the job failed.
fn account_failures(o: &Observed, p: &mut Plan, losses: &[(i32, FailureAction, String)]) -> bool {
    let mut restarts = p.status.restarts.clone().unwrap_or(RestartCounts {
        counted: 0,
        ignored: 0,
    });
    let mut fatal = None;
    for (rank, action, detail) in losses {
        p.failures.push(*action);
        match action {
            FailureAction::Count => restarts.counted += 1,
            FailureAction::Ignore => restarts.ignored += 1,
            FailureAction::FailJob => fatal = fatal.or(Some((*rank, detail.clone()))),
        }
        p.event(
            EventType::Warning,
            "RankLost",
            format!("rank {rank}: {detail}; failure policy action {action:?}"),
        );
    }
    p.status.restarts = Some(restarts.clone());
    if let Some((rank, detail)) = fatal {
        fail(
            o,
            p,
            "PodFailurePolicy",
            format!("rank {rank}: {detail}, a permanent error (failure policy action FailJob)"),
        );
        return true;
    }
    let limit = o.spec.run_policy.backoff_limit;
    if restarts.counted > limit {
        fail(
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

/// Publish PodsCreated for first starts and resumes, RankReplaced for replacements.
fn creation_events(o: &Observed, p: &mut Plan, started: bool, resuming: bool) {
    let replacing: Vec<i32> = p
        .stop
        .iter()
        .filter(|s| s.replace)
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

/// Recovering is True from the first lost rank until every rank is Ready again.
fn track_recovery(o: &Observed, p: &mut Plan, losses: &[(i32, FailureAction, String)], ready: i32) {
    let (observed, now) = (o.generation, time(o.now));
    let lost: Vec<i32> = losses.iter().map(|(r, _, _)| *r).collect();
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
    } else if recovering && ready == o.spec.workers.replicas {
        let since = s
            .condition(ConditionType::Recovering)
            .map(|c| c.last_transition_time.0);
        let seconds = since.map_or(0.0, |t| {
            (o.now - t)
                .total(k8s_openapi::jiff::Unit::Second)
                .unwrap_or(0.0)
        });
        if let Some(last) = s.last_recovery.as_mut() {
            last.seconds = seconds;
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

/// Running is True while every rank is Ready (or already finished).
fn track_running(o: &Observed, p: &mut Plan, ready_or_done: i32) {
    let (observed, now) = (o.generation, time(o.now));
    let replicas = o.spec.workers.replicas;
    let previous = p.status.condition(ConditionType::Running).cloned();
    let was_true = previous.as_ref().is_some_and(|c| c.status == "True");
    let never_ran = previous
        .as_ref()
        .is_none_or(|c| c.reason == "WorkersStarting");
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
    } else {
        let reason = if p.status.is_true(ConditionType::Recovering) {
            "Recovering"
        } else if never_ran {
            "WorkersStarting"
        } else {
            "WorkersNotReady"
        };
        let message = format!("{ready_or_done} of {replicas} workers Ready");
        p.status.set_condition(
            ConditionType::Running,
            false,
            reason,
            &message,
            observed,
            now,
        );
    }
}

/// Mark the job Failed (terminal), stop its pods and create nothing more.
fn fail(o: &Observed, p: &mut Plan, reason: &'static str, message: String) {
    let (observed, now) = (o.generation, time(o.now));
    p.create.clear();
    p.stop.retain(|s| !s.delete || !s.replace);
    for s in &mut p.stop {
        s.replace = false;
    }
    stop_active_pods(o, p, "Finished");
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

fn clear_recovering(s: &mut PetlJobStatus, observed: Option<i64>, now: Time, why: &str) {
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

/// Stop every pod still running, except those already being stopped by this plan.
fn stop_active_pods(o: &Observed, p: &mut Plan, reason: &str) {
    for pod in o.pods.iter().filter(|pod| pod.is_active()) {
        if !p.stop.iter().any(|s| s.uid == pod.uid) {
            p.stop.push(stop(pod, reason, true, false));
        }
    }
}

/// After `ttlSecondsAfterFinished`, delete the PetlJob; until then requeue at the expiry.
fn schedule_ttl(o: &Observed, p: &mut Plan) {
    let Some(ttl) = o.spec.run_policy.ttl_seconds_after_finished else {
        return;
    };
    let finished_at = p.status.completion_time.as_ref().map_or(o.now, |t| t.0);
    let expiry = finished_at + Duration::from_secs(ttl.max(0) as u64);
    if o.now >= expiry {
        p.delete_job = true;
    } else {
        p.requeue_at(o.now, expiry);
    }
}

impl Plan {
    fn event(&mut self, type_: EventType, reason: &'static str, note: String) {
        self.events.push(JobEvent {
            type_,
            reason,
            note,
        });
    }

    /// Requeue at `at` (rounded up to the next millisecond), keeping the earliest requeue.
    fn requeue_at(&mut self, now: Timestamp, at: Timestamp) {
        let wait = Duration::try_from(at - now).unwrap_or_default() + Duration::from_millis(1);
        self.requeue_after = Some(self.requeue_after.map_or(wait, |w| w.min(wait)));
    }
}

fn stop(pod: &RankPod, reason: &str, delete: bool, replace: bool) -> Stop {
    Stop {
        name: pod.name.clone(),
        uid: pod.uid.clone(),
        rank: pod.rank,
        reason: reason.into(),
        delete: delete && !pod.deleting,
        replace,
    }
}

/// One pod per rank; where a terminating pod and its replacement coexist, the live one wins.
fn pods_by_rank(pods: &[RankPod]) -> BTreeMap<i32, &RankPod> {
    let mut by_rank: BTreeMap<i32, &RankPod> = BTreeMap::new();
    for pod in pods {
        let keep_existing = by_rank.get(&pod.rank).is_some_and(|e| !e.deleting);
        if !keep_existing {
            by_rank.insert(pod.rank, pod);
        }
    }
    by_rank
}

fn count_ready(pods: &[RankPod]) -> i32 {
    pods.iter()
        .filter(|p| !p.deleting && p.state == PodState::Active { ready: true })
        .count() as i32
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

fn time(t: Timestamp) -> Time {
    Time(t)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures;
    use petl_crds::PetlJob;

    struct World {
        job: PetlJob,
        status: PetlJobStatus,
        pods: Vec<RankPod>,
        awaiting: BTreeSet<i32>,
        now: Timestamp,
    }

    impl World {
        fn new(replicas: i32) -> Self {
            Self {
                job: fixtures::job("j", replicas),
                status: PetlJobStatus::default(),
                pods: Vec::new(),
                awaiting: BTreeSet::new(),
                now: "2026-01-01T00:00:00Z".parse().unwrap(),
            }
        }
        fn plan(&self) -> Plan {
            plan(&Observed {
                spec: &self.job.spec,
                status: &self.status,
                generation: Some(1),
                created: Some(self.now),
                pods: &self.pods,
                awaiting_replacement: &self.awaiting,
                now: self.now,
            })
        }
        /// Plan, then pretend the plan was carried out: status written, stopped pods gone,
        /// created pods present and Ready.
        fn step(&mut self) -> Plan {
            let p = self.plan();
            self.status = p.status.clone();
            let stopped: Vec<String> = p
                .stop
                .iter()
                .filter(|s| s.delete)
                .map(|s| s.uid.clone())
                .collect();
            self.pods.retain(|pod| !stopped.contains(&pod.uid));
            let replaced = p
                .stop
                .iter()
                .filter(|s| s.replace && s.delete)
                .map(|s| s.rank);
            for rank in p.create.clone().into_iter().chain(replaced) {
                self.pods
                    .push(rank_pod(rank, PodState::Active { ready: true }));
            }
            p
        }
        fn set(&mut self, rank: i32, state: PodState, exit_code: Option<i32>, conditions: &[&str]) {
            let pod = self.pods.iter_mut().find(|p| p.rank == rank).unwrap();
            pod.state = state;
            pod.uid = format!("{}-x", pod.uid);
            pod.exit_code = exit_code;
            pod.true_conditions = conditions.iter().map(|c| c.to_string()).collect();
        }
        fn later(&mut self, seconds: u64) {
            self.now += Duration::from_secs(seconds);
        }
        fn reasons(p: &Plan) -> Vec<&'static str> {
            p.events.iter().map(|e| e.reason).collect()
        }
    }

    fn rank_pod(rank: i32, state: PodState) -> RankPod {
        RankPod {
            rank,
            name: format!("j-worker-{rank}"),
            uid: format!("uid-{rank}-{}", rand::random::<u32>()),
            state,
            deleting: false,
            stopped_by_operator: false,
            exit_code: None,
            true_conditions: Vec::new(),
        }
    }

    fn condition_reason(s: &PetlJobStatus, t: ConditionType) -> Option<String> {
        s.condition(t)
            .filter(|c| c.status == "True")
            .map(|c| c.reason.clone())
    }

    #[test]
    fn a_new_job_creates_every_rank_and_starts_the_clock() {
        let mut w = World::new(3);
        let p = w.step();
        assert_eq!(p.create, vec![0, 1, 2]);
        assert!(p.failures.is_empty());
        assert_eq!(World::reasons(&p), vec!["PodsCreated"]);
        assert!(w.status.start_time.is_some());
        assert_eq!(w.status.phase, Some(Phase::Pending));
        let p = w.step();
        assert!(p.create.is_empty());
        assert_eq!(w.status.phase, Some(Phase::Running));
        assert_eq!(p.time_to_running, Some(0.0));
    }

    #[test]
    fn pods_created_before_any_report_start_the_clock_and_are_no_loss() {
        let mut w = World::new(2);
        w.pods = vec![
            rank_pod(0, PodState::Active { ready: false }),
            rank_pod(1, PodState::Active { ready: false }),
        ];
        let p = w.step();
        assert!(p.create.is_empty());
        assert!(p.failures.is_empty());
        assert!(w.status.start_time.is_some());
        assert_eq!(w.status.phase, Some(Phase::Pending));
    }

    #[test]
    fn replaces_only_the_failed_rank_and_counts_it() {
        let mut w = World::new(3);
        w.step();
        w.step();
        w.set(1, PodState::Failed, Some(1), &[]);
        let p = w.step();
        assert!(p.create.is_empty());
        assert_eq!(p.stop.len(), 1);
        assert_eq!(
            (p.stop[0].rank, p.stop[0].replace, p.stop[0].reason.as_str()),
            (1, true, "Count")
        );
        assert_eq!(
            w.status.restarts,
            Some(RestartCounts {
                counted: 1,
                ignored: 0
            })
        );
        assert_eq!(w.status.phase, Some(Phase::Recovering));
        assert_eq!(World::reasons(&p), vec!["RankLost", "RankReplaced"]);
        w.later(7);
        let p = w.step();
        assert_eq!(p.recovery_seconds, Some(7.0));
        assert_eq!(w.status.recoveries, 1);
        assert_eq!(w.status.last_recovery.as_ref().unwrap().lost_ranks, vec![1]);
        assert_eq!(w.status.phase, Some(Phase::Running));
    }

    #[test]
    fn a_deleted_pod_is_a_lost_rank_but_an_awaited_one_is_not() {
        let mut w = World::new(2);
        w.step();
        w.step();
        w.pods.retain(|p| p.rank != 0);
        w.awaiting.insert(0);
        let p = w.plan();
        assert_eq!(p.create, vec![0]);
        assert!(
            p.failures.is_empty(),
            "an awaited replacement is not a new loss"
        );
        w.awaiting.clear();
        let p = w.plan();
        assert_eq!(p.create, vec![0]);
        assert_eq!(p.failures, vec![FailureAction::Count]);
    }

    #[test]
    fn disruptions_do_not_burn_the_budget() {
        let mut w = World::new(1);
        w.job.spec.run_policy.backoff_limit = 0;
        w.step();
        w.step();
        w.set(0, PodState::Failed, Some(137), &["DisruptionTarget"]);
        w.step();
        assert_eq!(
            w.status.restarts,
            Some(RestartCounts {
                counted: 0,
                ignored: 1
            })
        );
        assert!(!w.status.is_finished());
        w.set(0, PodState::Failed, Some(1), &[]);
        let p = w.step();
        assert_eq!(
            condition_reason(&w.status, ConditionType::Failed).as_deref(),
            Some("BackoffLimitExceeded")
        );
        assert!(p.create.is_empty() && p.stop.iter().all(|s| !s.replace));
    }

    #[test]
    fn exhausted_backoff_limit_fails_and_stays_failed() {
        let mut w = World::new(2);
        w.job.spec.run_policy.backoff_limit = 1;
        w.step();
        w.step();
        w.set(0, PodState::Failed, Some(1), &[]);
        w.step();
        assert!(!w.status.is_finished());
        w.set(0, PodState::Failed, Some(1), &[]);
        let p = w.step();
        assert_eq!(
            condition_reason(&w.status, ConditionType::Failed).as_deref(),
            Some("BackoffLimitExceeded")
        );
        assert_eq!(w.status.phase, Some(Phase::Failed));
        assert!(w.status.completion_time.is_some());
        assert!(
            p.stop.iter().any(|s| s.rank == 1 && s.reason == "Finished"),
            "the healthy rank is stopped"
        );
        w.pods.clear();
        let p = w.step();
        assert!(p.create.is_empty(), "a finished job never recreates pods");
    }

    #[test]
    fn permanent_exit_codes_fail_the_job_at_once() {
        let mut w = World::new(1);
        w.step();
        w.set(
            0,
            PodState::Failed,
            Some(petl_crds::exit_code::DATA_ERROR),
            &[],
        );
        w.step();
        assert_eq!(
            condition_reason(&w.status, ConditionType::Failed).as_deref(),
            Some("PodFailurePolicy")
        );
    }

    #[test]
    fn suspend_stops_pods_and_resume_recreates_them_without_counting() {
        let mut w = World::new(2);
        w.step();
        w.step();
        w.job.spec.suspend = true;
        let p = w.step();
        assert_eq!(p.stop.len(), 2);
        assert!(p.stop.iter().all(|s| s.reason == "Suspended" && !s.replace));
        assert_eq!(w.status.phase, Some(Phase::Suspended));
        assert_eq!(World::reasons(&p), vec!["Suspended"]);
        let again = w.step();
        assert!(again.events.is_empty(), "no event without a transition");
        w.job.spec.suspend = false;
        w.later(30);
        let p = w.step();
        assert_eq!(p.create, vec![0, 1]);
        assert!(p.failures.is_empty());
        assert_eq!(World::reasons(&p), vec!["Resumed", "PodsCreated"]);
        let suspended = w.status.condition(ConditionType::Suspended).unwrap();
        assert_eq!(
            (suspended.status.as_str(), suspended.reason.as_str()),
            ("False", "JobResumed")
        );
    }

    #[test]
    fn deadline_requeues_exactly_and_then_fails() {
        let mut w = World::new(1);
        w.job.spec.run_policy.active_deadline_seconds = Some(60);
        let p = w.step();
        assert_eq!(p.requeue_after, Some(Duration::from_millis(60_001)));
        w.later(45);
        let p = w.step();
        // 15 s left plus the second that metav1.Time truncates from the stored start.
        assert_eq!(p.requeue_after, Some(Duration::from_millis(16_001)));
        w.later(15);
        assert!(!w.status.is_finished(), "never early");
        let p = w.step();
        assert!(p.stop.is_empty());
        w.later(1);
        let p = w.step();
        assert_eq!(
            condition_reason(&w.status, ConditionType::Failed).as_deref(),
            Some("DeadlineExceeded")
        );
        assert_eq!(p.stop.len(), 1);
    }

    #[test]
    fn the_deadline_restarts_on_resume() {
        let mut w = World::new(1);
        w.job.spec.run_policy.active_deadline_seconds = Some(60);
        w.step();
        w.later(50);
        w.job.spec.suspend = true;
        w.step();
        w.later(100);
        w.job.spec.suspend = false;
        let p = w.step();
        assert!(!w.status.is_finished());
        assert_eq!(p.requeue_after, Some(Duration::from_millis(61_001)));
    }

    #[test]
    fn all_ranks_succeeding_completes_and_ttl_deletes_later() {
        let mut w = World::new(2);
        w.job.spec.run_policy.ttl_seconds_after_finished = Some(30);
        w.step();
        w.step();
        w.set(0, PodState::Succeeded, Some(0), &[]);
        w.step();
        assert!(!w.status.is_finished());
        w.set(1, PodState::Succeeded, Some(0), &[]);
        let p = w.step();
        assert_eq!(
            condition_reason(&w.status, ConditionType::Complete).as_deref(),
            Some("Succeeded")
        );
        assert_eq!(w.status.phase, Some(Phase::Succeeded));
        assert_eq!(p.requeue_after, Some(Duration::from_millis(30_001)));
        assert!(!p.delete_job);
        w.later(30);
        let p = w.step();
        assert!(p.delete_job);
        assert!(p.create.is_empty());
    }

    #[test]
    fn condition_times_move_only_on_transitions() {
        let mut w = World::new(1);
        w.step();
        w.step();
        let before = w
            .status
            .condition(ConditionType::Running)
            .unwrap()
            .last_transition_time
            .clone();
        w.later(10);
        w.step();
        let after = w
            .status
            .condition(ConditionType::Running)
            .unwrap()
            .last_transition_time
            .clone();
        assert_eq!(before, after);
    }

    #[test]
    fn a_pod_deleted_by_someone_else_is_accounted_once_while_terminating() {
        let mut w = World::new(1);
        w.step();
        w.step();
        w.pods[0].deleting = true;
        w.pods[0].true_conditions = vec!["DisruptionTarget".into()];
        let p = w.plan();
        assert_eq!(p.failures, vec![FailureAction::Ignore]);
        assert_eq!(p.stop.len(), 1);
        assert!(!p.stop[0].delete, "already terminating: only marked");
        w.pods[0].stopped_by_operator = true;
        let p = w.plan();
        assert!(p.failures.is_empty(), "a marked pod is never counted twice");
    }
}
