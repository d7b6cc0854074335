//! The planner driven through whole job lifetimes by a stepping world: each step plans, then
//! pretends the plan was carried out (status written, stopped pods gone, created pods Ready).

use super::*;
use crate::fixtures;
use crate::reconcile::ranks::{AGENT_CONTAINER, Blocked, InPlaceRestarts, TRAINER_CONTAINER};
use petl_crds::{
    ArtifactStatus, LastRecovery, PetlJob, ProgressStatus, RestartCounts, SnapshotStatus,
};

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

fn report(step: i64, generation: i64, healthy: i32) -> WorkerReport {
    WorkerReport {
        progress: ProgressStatus {
            step,
            total_steps: 50,
            loss: Some(0.5),
            samples_per_second: Some(12.0),
            eta_seconds: Some(20),
            ..ProgressStatus::default()
        },
        snapshot: Some(SnapshotStatus {
            generation,
            step: generation,
            committed_at: None,
            healthy_shards: healthy,
            tolerable_losses: healthy - 2,
        }),
        last_recovery: None,
        recoveries: 0,
    }
}

#[test]
fn rank_zeros_report_fills_progress_snapshot_and_snapshot_degraded() {
    let mut w = World::new(3);
    w.step();
    w.step();
    w.report = Some(report(10, 10, 3));
    w.step();
    let progress = w.status.progress.clone().unwrap();
    assert_eq!((progress.step, progress.total_steps), (10, 50));
    assert_eq!(progress.summary.as_deref(), Some("10/50 (20%)"));
    assert_eq!(w.status.snapshot.as_ref().unwrap().generation, 10);
    let degraded = w.status.condition(ConditionType::SnapshotDegraded).unwrap();
    assert_eq!(
        (degraded.status.as_str(), degraded.reason.as_str()),
        ("False", "ShardsHealthy")
    );
    w.report = Some(report(12, 12, 2));
    w.step();
    assert_eq!(
        condition_reason(&w.status, ConditionType::SnapshotDegraded).as_deref(),
        Some("ShardsLost")
    );
}

#[test]
fn a_recovery_takes_tier_and_generation_from_the_report_but_not_from_an_older_one() {
    let mut w = World::new(2);
    w.step();
    w.step();
    let older = LastRecovery {
        lost_ranks: vec![0],
        restored_generation: 4,
        seconds: 1.5,
        source: Some("local".into()),
        finished_at: None,
    };
    let mut with_older = report(10, 10, 2);
    with_older.last_recovery = Some(older);
    w.report = Some(with_older.clone());
    w.step();
    assert_eq!(
        w.status.last_recovery.as_ref().unwrap().restored_generation,
        4,
        "a recovery the operator did not see is recorded"
    );

    w.set(1, PodState::Failed, Some(137), &[]);
    w.step();
    let record = w.status.last_recovery.clone().unwrap();
    assert_eq!(
        (record.lost_ranks, record.restored_generation),
        (vec![1], 10)
    );
    assert_eq!(
        record.source, None,
        "the report still shows the older recovery"
    );

    let mut with_newer = report(11, 11, 2);
    with_newer.last_recovery = Some(LastRecovery {
        lost_ranks: vec![1],
        restored_generation: 10,
        seconds: 2.25,
        source: Some("peers".into()),
        finished_at: None,
    });
    w.report = Some(with_newer);
    w.later(5);
    w.step();
    let record = w.status.last_recovery.clone().unwrap();
    assert_eq!(
        record.lost_ranks,
        vec![1],
        "lost ranks as the operator saw them"
    );
    assert_eq!(record.source.as_deref(), Some("peers"));
    assert_eq!((record.restored_generation, record.seconds), (10, 2.25));
    assert_eq!(w.status.recoveries, 1);
}

#[test]
fn success_records_the_artifact_rank_zero_published() {
    let mut w = World::new(2);
    w.step();
    w.step();
    let artifact = ArtifactStatus {
        uri: "file:///out/a".into(),
        digest: "sha256:abc".into(),
        size_bytes: 42,
        trainable_parameters: Some(1000),
        peak_memory_bytes: None,
    };
    w.set(0, PodState::Succeeded, Some(0), &[]);
    w.pod(0).artifact = Some(artifact.clone());
    w.set(1, PodState::Succeeded, Some(0), &[]);
    let p = w.step();
    assert_eq!(w.status.artifact, Some(artifact));
    assert_eq!(
        condition_reason(&w.status, ConditionType::ArtifactPublished).as_deref(),
        Some("Published")
    );
    assert!(World::reasons(&p).contains(&"ArtifactPublished"));
    assert_eq!(w.status.phase, Some(Phase::Succeeded));
}

#[test]
fn a_job_that_ends_between_two_polls_still_gets_its_final_progress_and_recovery_tier() {
    let mut w = World::new(2);
    w.step();
    w.step();
    w.report = Some(report(10, 10, 2));
    w.step();
    w.set(1, PodState::Failed, Some(137), &[]);
    w.step();
    assert_eq!(w.status.last_recovery.as_ref().unwrap().source, None);
    // The job finishes before the next poll: only the termination message tells the end.
    w.report = None;
    let mut last_words = report(50, 49, 2);
    last_words.last_recovery = Some(LastRecovery {
        lost_ranks: vec![1],
        restored_generation: 10,
        seconds: 1.25,
        source: Some("peers".into()),
        finished_at: None,
    });
    w.set(0, PodState::Succeeded, Some(0), &[]);
    w.pod(0).final_report = Some(last_words);
    w.set(1, PodState::Succeeded, Some(0), &[]);
    w.step();
    assert_eq!(w.status.phase, Some(Phase::Succeeded));
    let progress = w.status.progress.clone().unwrap();
    assert_eq!((progress.step, progress.total_steps), (50, 50));
    let record = w.status.last_recovery.clone().unwrap();
    assert_eq!(record.source.as_deref(), Some("peers"));
    assert_eq!(
        (record.lost_ranks, record.restored_generation),
        (vec![1], 10)
    );
    assert_eq!(w.status.snapshot.as_ref().unwrap().generation, 49);
}

#[test]
fn success_without_an_artifact_says_so() {
    let mut w = World::new(1);
    w.step();
    w.step();
    w.set(0, PodState::Succeeded, Some(0), &[]);
    let p = w.step();
    assert_eq!(w.status.phase, Some(Phase::Succeeded));
    let c = w
        .status
        .condition(ConditionType::ArtifactPublished)
        .unwrap();
    assert_eq!(
        (c.status.as_str(), c.reason.as_str()),
        ("False", "NotReported")
    );
    assert!(World::reasons(&p).contains(&"ArtifactNotReported"));
}

fn refused(kind: RefusalKind, attempts: u32) -> Refusal {
    Refusal {
        what: "the pod of rank 0".into(),
        kind,
        message: "no".into(),
        attempts,
    }
}

#[test]
fn an_invalid_pod_or_an_unrunnable_spec_fails_the_job() {
    for (kind, reason) in [
        (RefusalKind::Invalid, "RefusedByAPIServer"),
        (RefusalKind::Unrunnable, "InvalidSpec"),
    ] {
        let mut w = World::new(1);
        w.step();
        w.pods.clear();
        w.awaiting.insert(0);
        w.refusal = Some(refused(kind, 1));
        let p = w.step();
        assert_eq!(
            condition_reason(&w.status, ConditionType::Failed).as_deref(),
            Some(reason)
        );
        assert!(p.create.is_empty());
        assert!(World::reasons(&p).contains(&reason));
    }
}

#[test]
fn a_forbidden_create_waits_with_a_condition_an_event_and_backoff() {
    let mut w = World::new(1);
    w.step();
    w.pods.clear();
    w.awaiting.insert(0);
    w.refusal = Some(refused(RefusalKind::Forbidden, 1));
    let p = w.plan();
    assert_eq!(p.create, vec![0], "tried again");
    assert_eq!(p.requeue_after, Some(Duration::from_secs(5)));
    assert_eq!(World::reasons(&p), vec!["CreateRefused"]);
    assert_eq!(
        running_reason(&p.status),
        ("False".into(), "CreateRefused".into())
    );
    w.status = p.status.clone();
    assert!(w.plan().events.is_empty(), "one event per attempt");
    w.refusal = Some(refused(RefusalKind::Forbidden, 4));
    let p = w.plan();
    assert_eq!(p.requeue_after, Some(Duration::from_secs(40)));
    assert_eq!(World::reasons(&p), vec!["CreateRefused"]);
    w.refusal = Some(refused(RefusalKind::Forbidden, 30));
    assert_eq!(w.plan().requeue_after, Some(Duration::from_secs(300)));
    w.refusal = Some(refused(RefusalKind::NameTaken, 1));
    assert_eq!(running_reason(&w.plan().status).1, "PodNameTaken");
}

#[test]
fn a_blocked_pod_shows_its_reason_with_one_warning() {
    let mut w = World::new(2);
    w.step();
    w.pod(1).state = PodState::Active { ready: false };
    w.pod(1).blocked = Some(Blocked {
        reason: "CreateContainerConfigError".into(),
        message: "container trainer: secret \"s3\" not found".into(),
        permanent: false,
    });
    let p = w.step();
    assert_eq!(
        running_reason(&w.status),
        ("False".into(), "CreateContainerConfigError".into())
    );
    let note = &p
        .events
        .iter()
        .find(|e| e.reason == "WorkerBlocked")
        .unwrap()
        .note;
    assert!(note.contains("rank 1") && note.contains("secret"), "{note}");
    assert!(
        w.step().events.is_empty(),
        "no second warning for the same cause"
    );
    assert!(!w.status.is_finished(), "the kubelet keeps retrying");
}

#[test]
fn an_image_name_that_cannot_parse_fails_the_job() {
    let mut w = World::new(1);
    w.step();
    w.pod(0).state = PodState::Active { ready: false };
    w.pod(0).blocked = Some(Blocked {
        reason: "InvalidImageName".into(),
        message: "container trainer: couldn't parse image name".into(),
        permanent: true,
    });
    w.step();
    let failed = w.status.condition(ConditionType::Failed).unwrap();
    assert_eq!(failed.reason, "Unrunnable");
    assert!(
        failed.message.contains("InvalidImageName"),
        "{}",
        failed.message
    );
}

#[test]
fn deadlines_and_ttls_centuries_away_do_not_overflow() {
    let mut w = World::new(1);
    w.job.spec.run_policy.active_deadline_seconds = Some(i64::MAX);
    w.job.spec.run_policy.ttl_seconds_after_finished = Some(i64::MAX);
    w.step();
    w.step();
    assert!(!w.status.is_finished());
    w.set(0, PodState::Succeeded, Some(0), &[]);
    let p = w.step();
    assert_eq!(w.status.phase, Some(Phase::Succeeded));
    assert!(!p.delete_job);
}
