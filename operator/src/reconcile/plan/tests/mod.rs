//! The planner driven through whole job lifetimes by a stepping world: each step plans, then
//! pretends the plan was carried out (status written, stopped pods gone, created pods Ready).

use super::*;
use crate::fixtures;
use crate::reconcile::ranks::{AGENT_CONTAINER, Blocked, InPlaceRestarts, TRAINER_CONTAINER};
use petl_crds::{
    ArtifactStatus, LastRecovery, PetlJob, ProgressStatus, RestartCounts, SnapshotStatus,
};

mod refusals;
mod reports;

struct World {
    job: PetlJob,
    status: PetlJobStatus,
    pods: Vec<RankPod>,
    awaiting: BTreeSet<i32>,
    report: Option<WorkerReport>,
    refusal: Option<Refusal>,
    now: Timestamp,
}

impl World {
    fn new(replicas: i32) -> Self {
        Self {
            job: fixtures::job("j", replicas),
            status: PetlJobStatus::default(),
            pods: Vec::new(),
            awaiting: BTreeSet::new(),
            report: None,
            refusal: None,
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
            report: self.report.as_ref(),
            refusal: self.refusal.as_ref(),
            now: self.now,
        })
    }
    /// Plan, then pretend the plan was carried out: status written, restarts recorded,
    /// stopped pods gone, created pods present and Ready.
    fn step(&mut self) -> Plan {
        let p = self.plan();
        self.status = p.status.clone();
        for count in &p.count_restarts {
            let pod = self
                .pods
                .iter_mut()
                .find(|pod| pod.uid == count.uid)
                .unwrap();
            let restarts = pod
                .restarts
                .iter_mut()
                .find(|r| r.container == count.container)
                .unwrap();
            restarts.counted = count.restarts;
        }
        let stopped: Vec<String> = p
            .stop
            .iter()
            .filter(|s| s.deletes())
            .map(|s| s.uid.clone())
            .collect();
        self.pods.retain(|pod| !stopped.contains(&pod.uid));
        let replaced = p
            .stop
            .iter()
            .filter(|s| s.replaces() && s.deletes())
            .map(|s| s.rank);
        for rank in p.create.clone().into_iter().chain(replaced) {
            self.pods
                .push(rank_pod(rank, PodState::Active { ready: true }));
        }
        p
    }
    fn pod(&mut self, rank: i32) -> &mut RankPod {
        self.pods.iter_mut().find(|p| p.rank == rank).unwrap()
    }
    fn set(&mut self, rank: i32, state: PodState, exit_code: Option<i32>, conditions: &[&str]) {
        let pod = self.pod(rank);
        pod.state = state;
        pod.uid = format!("{}-x", pod.uid);
        pod.exit_code = exit_code;
        pod.true_conditions = conditions.iter().map(|c| c.to_string()).collect();
    }
    /// The trainer of `rank` restarted in place, `times` more times, last exiting `exit_code`.
    fn restart(&mut self, rank: i32, times: i32, exit_code: i32) {
        let trainer = &mut self.pod(rank).restarts[0];
        trainer.seen += times;
        trainer.last_exit_code = Some(exit_code);
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
        restarts: [TRAINER_CONTAINER, AGENT_CONTAINER]
            .map(|container| InPlaceRestarts {
                container,
                seen: 0,
                counted: 0,
                last_exit_code: None,
            })
            .into(),
        blocked: None,
        artifact: None,
        final_report: None,
        report_addr: None,
    }
}

fn condition_reason(s: &PetlJobStatus, t: ConditionType) -> Option<String> {
    s.condition(t)
        .filter(|c| c.status == "True")
        .map(|c| c.reason.clone())
}

fn running_reason(s: &PetlJobStatus) -> (String, String) {
    let c = s.condition(ConditionType::Running).unwrap();
    (c.status.clone(), c.reason.clone())
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
        (p.stop[0].rank, p.stop[0].replaces(), p.stop[0].reason),
        (1, true, StopReason::Lost(FailureAction::Count))
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
    assert!(p.create.is_empty() && p.stop.iter().all(|s| !s.replaces()));
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
        p.stop
            .iter()
            .any(|s| s.rank == 1 && s.reason == StopReason::Finished),
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
    assert!(
        p.stop
            .iter()
            .all(|s| s.reason == StopReason::Suspended && !s.replaces())
    );
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
    assert!(!p.stop[0].deletes(), "already terminating: only marked");
    w.pods[0].stopped_by_operator = true;
    let p = w.plan();
    assert!(p.failures.is_empty(), "a marked pod is never counted twice");
}

#[test]
fn a_trainer_restarted_in_place_is_counted_once_and_recovers_without_a_new_pod() {
    let mut w = World::new(2);
    w.step();
    w.step();
    w.restart(1, 1, petl_crds::exit_code::TEMP_FAIL);
    let p = w.step();
    assert!(p.create.is_empty() && p.stop.is_empty(), "the pod stays");
    assert_eq!(p.failures, vec![FailureAction::Count]);
    assert_eq!(p.count_restarts.len(), 1);
    assert_eq!(
        (p.count_restarts[0].container, p.count_restarts[0].restarts),
        (TRAINER_CONTAINER, 1)
    );
    assert_eq!(World::reasons(&p), vec!["RankRestarted"]);
    assert_eq!(w.status.restarts.as_ref().unwrap().counted, 1);
    assert_eq!(w.status.phase, Some(Phase::Recovering));
    assert_eq!(
        p.requeue_after,
        Some(Duration::from_secs(1)),
        "already Ready: look again to close the recovery"
    );
    w.later(2);
    let p = w.step();
    assert!(p.failures.is_empty(), "a restart is counted once");
    assert_eq!(World::reasons(&p), vec!["Recovered"]);
    assert_eq!(w.status.recoveries, 1);
    assert_eq!(w.status.last_recovery.as_ref().unwrap().lost_ranks, vec![1]);
    assert_eq!(w.status.phase, Some(Phase::Running));
}

#[test]
fn a_crash_loop_in_place_ends_at_the_backoff_limit() {
    let mut w = World::new(2);
    w.job.spec.run_policy.backoff_limit = 2;
    w.step();
    w.step();
    w.restart(0, 2, 1);
    w.step();
    assert!(
        !w.status.is_finished(),
        "2 restarts are within a limit of 2"
    );
    w.restart(0, 1, 1);
    let p = w.step();
    assert_eq!(
        condition_reason(&w.status, ConditionType::Failed).as_deref(),
        Some("BackoffLimitExceeded")
    );
    assert_eq!(w.status.restarts.as_ref().unwrap().counted, 3);
    assert_eq!(p.stop.len(), 2, "both ranks are stopped");
    assert!(p.stop.iter().all(|s| !s.replaces()));
}

#[test]
fn restarts_before_a_permanent_exit_are_counted_with_it() {
    let mut w = World::new(1);
    w.step();
    w.step();
    w.restart(0, 1, 1);
    w.set(0, PodState::Failed, Some(petl_crds::exit_code::CONFIG), &[]);
    let p = w.step();
    assert_eq!(
        p.failures,
        vec![FailureAction::Count, FailureAction::FailJob]
    );
    assert_eq!(
        condition_reason(&w.status, ConditionType::Failed).as_deref(),
        Some("PodFailurePolicy")
    );
    assert!(p.count_restarts.is_empty(), "the stop label commits them");
}

#[test]
fn agent_restarts_count_against_the_budget_too() {
    let mut w = World::new(1);
    w.step();
    w.step();
    let agent = &mut w.pod(0).restarts[1];
    agent.seen = 1;
    agent.last_exit_code = Some(1);
    let p = w.step();
    assert_eq!(p.failures, vec![FailureAction::Count]);
    assert_eq!(p.count_restarts[0].container, AGENT_CONTAINER);
}
