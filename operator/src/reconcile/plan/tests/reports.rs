//! What the workers report becomes status: progress, snapshot health, recoveries and the
//! published artifact.

use super::*;

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
