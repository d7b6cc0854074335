//! The reconcile decision as a pure function: from the job, its pods, rank 0's report and the
//! API server's last refusal to the pods to create and stop, the next status, the events to
//! publish and when to look again.

mod conditions;
mod failures;
mod report;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::runtime::events::EventType;
use petl_crds::{
    ConditionType, FailureAction, PetlJobSpec, PetlJobStatus, Phase, WorkerCounts, WorkerReport,
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
    /// Rank 0's latest report, while the job runs.
    pub report: Option<&'a WorkerReport>,
    /// What the API server (or the operator's own rendering) refused last time, if the last
    /// attempt was refused.
    pub refusal: Option<&'a Refusal>,
    /// The time the decision is made at.
    pub now: Timestamp,
}

/// Why the last attempt to create one of the job's objects failed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    /// What was refused, e.g. `the pod of rank 1`.
    pub what: String,
    /// How it was refused, which decides between failing and waiting.
    pub kind: RefusalKind,
    /// The API server's (or the renderer's) message.
    pub message: String,
    /// Refusals in a row, for the backoff.
    pub attempts: u32,
}

/// The kinds of refusal, by what can cure them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RefusalKind {
    /// 422: the object is invalid; the same spec is refused every time, so the job fails.
    Invalid,
    /// The operator cannot render the job (no image, a name too long); the job fails.
    Unrunnable,
    /// 403 and the like: an admission check (a missing ServiceAccount or PriorityClass, a
    /// quota, a policy) that a change in the cluster can satisfy; retried with backoff.
    Forbidden,
    /// A pod this job does not own holds the rank's name; retried with backoff.
    NameTaken,
}

/// First wait after a refusal that waiting can cure; doubles each attempt.
const FIRST_RETRY: Duration = Duration::from_secs(5);
/// Longest wait between two attempts.
const LAST_RETRY: Duration = Duration::from_secs(300);

impl Refusal {
    /// How long to wait before the next attempt.
    pub fn retry_after(&self) -> Duration {
        let doublings = self.attempts.saturating_sub(1).min(16);
        (FIRST_RETRY * 2u32.pow(doublings)).min(LAST_RETRY)
    }

    /// Whether only a new job can cure it.
    pub fn is_permanent(&self) -> bool {
        matches!(self.kind, RefusalKind::Invalid | RefusalKind::Unrunnable)
    }
}

/// A pod to stop: labelled with `reason` first (so it is accounted once), then deleted unless
/// it is already terminating; its rank is replaced afterwards or left empty.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stop {
    /// Pod name.
    pub name: String,
    /// Pod UID, the delete precondition.
    pub uid: String,
    /// Rank of the pod.
    pub rank: i32,
    /// Why; the value of the `petl.dev/stopped` label.
    pub reason: StopReason,
    /// Whether the operator deletes it.
    pub removal: Removal,
    /// What becomes of its rank.
    pub then: AfterStop,
}

/// Why a pod is stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopReason {
    /// A failure, classified by the failure policy.
    Lost(FailureAction),
    /// Already accounted for (the operator stopped it before) and now replaced.
    Replaced,
    /// `spec.suspend` is true.
    Suspended,
    /// The job finished (Complete or Failed).
    Finished,
    /// The PetlJob is being deleted.
    Deleted,
}

impl StopReason {
    /// The `petl.dev/stopped` label value.
    pub fn label(self) -> &'static str {
        match self {
            StopReason::Lost(FailureAction::Count) => "Count",
            StopReason::Lost(FailureAction::Ignore) => "Ignore",
            StopReason::Lost(FailureAction::FailJob) => "FailJob",
            StopReason::Replaced => "Replaced",
            StopReason::Suspended => "Suspended",
            StopReason::Finished => "Finished",
            StopReason::Deleted => "Deleted",
        }
    }
}

/// Whether a stopped pod is deleted by the operator.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Removal {
    /// Delete it (preconditioned on its UID).
    Delete,
    /// It is terminating already; only label it.
    AlreadyTerminating,
}

/// What becomes of a stopped pod's rank.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AfterStop {
    /// Create the rank's replacement as soon as the pod is gone.
    Replace,
    /// Leave the rank without a pod.
    LeaveEmpty,
}

impl Stop {
    /// Whether the operator deletes the pod.
    pub fn deletes(&self) -> bool {
        self.removal == Removal::Delete
    }

    /// Whether the rank gets a replacement.
    pub fn replaces(&self) -> bool {
        self.then == AfterStop::Replace
    }
}

/// Restarts in place of one container, to be recorded on its pod as counted (the commit point
/// of counting them, before the status that counts them is written).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CountRestarts {
    /// Pod name.
    pub name: String,
    /// Pod UID, the patch's precondition.
    pub uid: String,
    /// The container that restarted.
    pub container: &'static str,
    /// Its restartCount, now all counted.
    pub restarts: i32,
}

/// One rank lost: its pod failed, vanished or is being deleted, or a container restarted in
/// place.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Loss {
    /// The rank.
    pub rank: i32,
    /// How the failure policy classified it.
    pub action: FailureAction,
    /// What happened, for events and messages.
    pub detail: String,
    /// The pod stays; a container restarted inside it.
    pub in_place: bool,
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
    /// Restarts in place to record as counted.
    pub count_restarts: Vec<CountRestarts>,
    /// The status to report.
    pub status: PetlJobStatus,
    /// Events to publish, in order.
    pub events: Vec<JobEvent>,
    /// Worker failures found this time, by failure-policy action.
    pub failures: Vec<FailureAction>,
    /// Look again after this long (a deadline, a TTL expiry, a retry).
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
        count_restarts: Vec::new(),
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
    stop_active_pods(o, p, StopReason::Finished);
    schedule_ttl(o, p);
}

/// `spec.suspend: true`: stop every worker and report Suspended (Kueue semantics).
fn suspended(o: &Observed, p: &mut Plan) {
    stop_active_pods(o, p, StopReason::Suspended);
    conditions::suspend(o, p);
}

/// Not suspended and not finished: keep one healthy pod per rank, account for failures, and
/// move the conditions along.
fn active(o: &Observed, p: &mut Plan) {
    let resuming = o.status.is_true(ConditionType::Suspended);
    if resuming {
        conditions::resume(o, p);
    }
    if deadline_passed(o, p) {
        return;
    }
    if let Some(refusal) = o.refusal.filter(|r| r.is_permanent()) {
        let (reason, how) = match refusal.kind {
            RefusalKind::Unrunnable => ("InvalidSpec", "cannot run"),
            _ => ("RefusedByAPIServer", "was refused as invalid"),
        };
        let message = format!("{} {how}: {}", refusal.what, refusal.message);
        conditions::fail(o, p, reason, message);
        return;
    }

    if let Some(refusal) = o.refusal {
        // Try again later, whether or not anything else triggers a reconcile.
        p.requeue_in(refusal.retry_after());
    }

    let started = o.status.start_time.is_some();
    let survey = failures::survey(o, p, started, resuming);
    if failures::account(o, p, &survey.losses) {
        return;
    }
    if let Some((rank, blocked)) = survey.blocked.iter().find(|(_, b)| b.permanent) {
        let message = format!(
            "rank {rank} cannot start ({}): {}",
            blocked.reason, blocked.message
        );
        conditions::fail(o, p, "Unrunnable", message);
        return;
    }
    report::fold(o, p);
    if survey.succeeded == o.spec.workers.replicas {
        conditions::complete(o, p);
        return;
    }

    conditions::creation_events(o, p, started, resuming);
    // Pods an earlier operator created before it could report them start the clock too.
    if p.status.start_time.is_none() && !(p.create.is_empty() && o.pods.is_empty()) {
        p.status.start_time = Some(time(o.now));
    }
    conditions::track_recovery(o, p, &survey.losses, survey.ready);
    conditions::track_running(o, p, survey.ready + survey.succeeded, &survey.blocked);
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
    let seconds = u64::try_from(seconds).unwrap_or(0);
    let resumed = p
        .status
        .condition(ConditionType::Suspended)
        .filter(|c| c.status == "False")
        .map(|c| c.last_transition_time.0);
    let Some(started) = o.status.start_time.as_ref().map(|t| t.0).max(resumed) else {
        // Not started yet: the clock starts with the first pods.
        p.requeue_at(o.now, later(o.now, seconds));
        return false;
    };
    // metav1.Time keeps whole seconds, so the true start lies in the second after the stored
    // one; counting from that second's end makes the deadline up to 1 s late, never early.
    let deadline = later(started, seconds.saturating_add(1));
    if o.now < deadline {
        p.requeue_at(o.now, deadline);
        return false;
    }
    conditions::fail(
        o,
        p,
        "DeadlineExceeded",
        format!("the job ran longer than spec.runPolicy.activeDeadlineSeconds ({seconds}s)"),
    );
    true
}

/// Stop every pod still running, except those already being stopped by this plan.
fn stop_active_pods(o: &Observed, p: &mut Plan, reason: StopReason) {
    for pod in o.pods.iter().filter(|pod| pod.is_active()) {
        if !p.stop.iter().any(|s| s.uid == pod.uid) {
            p.stop.push(stop(pod, reason, AfterStop::LeaveEmpty));
        }
    }
}

/// After `ttlSecondsAfterFinished`, delete the PetlJob; until then requeue at the expiry.
fn schedule_ttl(o: &Observed, p: &mut Plan) {
    let Some(ttl) = o.spec.run_policy.ttl_seconds_after_finished else {
        return;
    };
    let finished_at = p.status.completion_time.as_ref().map_or(o.now, |t| t.0);
    let expiry = later(finished_at, u64::try_from(ttl).unwrap_or(0));
    if o.now >= expiry {
        p.delete_job = true;
    } else {
        p.requeue_at(o.now, expiry);
    }
}

/// `at` plus `seconds`, saturating at the largest time there is (a deadline centuries away is
/// one that never comes, not an overflow).
fn later(at: Timestamp, seconds: u64) -> Timestamp {
    at.checked_add(Duration::from_secs(seconds))
        .unwrap_or(Timestamp::MAX)
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
        let wait = Duration::try_from(at.duration_since(now)).unwrap_or_default()
            + Duration::from_millis(1);
        self.requeue_in(wait);
    }

    /// Requeue after `wait`, keeping the earliest requeue.
    fn requeue_in(&mut self, wait: Duration) {
        self.requeue_after = Some(self.requeue_after.map_or(wait, |w| w.min(wait)));
    }
}

fn stop(pod: &RankPod, reason: StopReason, then: AfterStop) -> Stop {
    Stop {
        name: pod.name.clone(),
        uid: pod.uid.clone(),
        rank: pod.rank,
        reason,
        removal: if pod.deleting {
            Removal::AlreadyTerminating
        } else {
            Removal::Delete
        },
        then,
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

fn time(t: Timestamp) -> Time {
    Time(t)
}
