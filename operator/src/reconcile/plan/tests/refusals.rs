//! Specs the cluster cannot run end the job Failed; what waiting can fix shows a condition and
//! an event while it backs off; far-away deadlines do not overflow.

use super::*;

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
