//! The PetlJob operator against a real control plane (etcd + kube-apiserver + controller
//! manager): children, rank replacement, budgets, suspend, deadlines, TTL, restarts, leadership.

mod support;

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::LazyLock;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service};
use k8s_openapi::api::scheduling::v1::PriorityClass;
use kube::api::{DeleteParams, ObjectMeta, Patch, PatchParams, PostParams};
use kube::runtime::wait::{await_condition, conditions};
use kube::{Api, ResourceExt};
use petl_crds::{ConditionType, PetlJob, Phase};
use petl_operator::reconcile::children::Names;
use petl_operator::reconcile::pod::{self, WorkerDefaults};
use petl_operator::{Config, Operator};
use petl_tests::{ControlPlane, PodStatusUpdate, dashboard};
use serde_json::json;
use tokio::runtime::Runtime;
use tokio::sync::OnceCell;

use support::*;

/// One runtime and one control plane for the whole file; each test gets its own namespace and
/// its own operator watching only that namespace, so tests run side by side.
static RUNTIME: LazyLock<Runtime> = LazyLock::new(|| {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
});
static CLUSTER: OnceCell<ControlPlane> = OnceCell::const_new();

fn run<F: Future>(test: F) -> F::Output {
    RUNTIME.block_on(test)
}

async fn cluster() -> &'static ControlPlane {
    CLUSTER
        .get_or_init(|| async {
            let cp = ControlPlane::start().await.expect("control plane starts");
            install_crd(&cp.client()).await;
            cp
        })
        .await
}

#[test]
fn apply_creates_pods_service_configmap_and_secret_as_specified() {
    run(async {
        let scene = Scene::new(cluster().await, "op-children").await;
        let classes: Api<PriorityClass> = Api::all(scene.cp.client());
        let class_name = format!("{}-train", scene.ns);
        let class = PriorityClass {
            metadata: ObjectMeta {
                name: Some(class_name.clone()),
                ..Default::default()
            },
            value: Some(1000),
            ..Default::default()
        };
        classes
            .create(&PostParams::default(), &class)
            .await
            .expect("priority class");
        let workers = json!({
            "nodeSelector": { "pool": "gpu-a" },
            "tolerations": [{ "key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule" }],
            "resources": { "requests": { "cpu": "2", "memory": "4Gi" }, "limits": { "memory": "4Gi" } },
            "priorityClassName": class_name,
        });
        let j = job("sst2", 2, json!({}), workers);
        scene
            .jobs
            .create(&PostParams::default(), &j)
            .await
            .expect("create");
        let pods = scene.wait_pods("sst2", 2).await;

        let pod = &pods[&1];
        assert_eq!(pod.name_any(), "sst2-worker-1");
        assert_eq!(pod.labels()["petl.dev/job"], "sst2");
        assert_eq!(pod.labels()["petl.dev/rank"], "1");
        assert_eq!(env(pod, "trainer", "PETL_RANK").as_deref(), Some("1"));
        assert_eq!(env(pod, "trainer", "PETL_WORLD_SIZE").as_deref(), Some("2"));
        assert_eq!(env(pod, "trainer", "PETL_JOB").as_deref(), Some("sst2"));
        let peers = env(pod, "trainer", "PETL_PEERS").unwrap();
        assert!(
            peers.contains(&format!("sst2-worker-0.sst2-workers.{}.svc", scene.ns)),
            "{peers}"
        );
        let owner = &pod.owner_references()[0];
        assert_eq!(
            (owner.kind.as_str(), owner.controller),
            ("PetlJob", Some(true))
        );

        let spec = pod.spec.as_ref().unwrap();
        assert_eq!(spec.restart_policy.as_deref(), Some("Never"));
        let trainer = &spec.containers[0];
        assert_eq!(trainer.name, "trainer");
        assert_eq!(trainer.image.as_deref(), Some(IMAGE));
        assert_eq!(
            trainer.command.as_ref().unwrap().join(" "),
            "petl train --config /etc/petl/job.yaml --device cpu --metrics-addr 0.0.0.0:9100"
        );
        // The API server keeps the container restart rules (KEP-5307, ContainerRestartRules):
        // the trainer restarts in place on retryable exits only.
        assert_eq!(trainer.restart_policy.as_deref(), Some("Never"));
        let rules = trainer
            .restart_policy_rules
            .as_ref()
            .expect("the API server dropped the trainer's restartPolicyRules");
        let codes = rules[0].exit_codes.as_ref().unwrap();
        assert_eq!(
            (rules[0].action.as_str(), codes.operator.as_str()),
            ("Restart", "NotIn")
        );
        assert_eq!(codes.values.as_deref(), Some(&[0, 64, 65, 66, 70, 78][..]));
        assert_eq!(
            trainer.termination_message_path.as_deref(),
            Some("/dev/termination-log")
        );
        let agent = &spec.init_containers.as_ref().unwrap()[0];
        assert_eq!(agent.name, "snapshot-agent");
        assert_eq!(
            agent.restart_policy.as_deref(),
            Some("Always"),
            "native sidecar"
        );
        let agent_command = agent.command.clone().unwrap();
        assert_eq!(agent_command[..2], ["petl", "snapshot-agent"]);
        let rank_flag = agent_command.iter().position(|a| a == "--rank").unwrap();
        assert_eq!(agent_command[rank_flag + 1], "1");
        let peers_flag = agent_command.iter().position(|a| a == "--peers").unwrap();
        assert_eq!(
            agent_command[peers_flag + 1],
            format!("sst2-worker-{{rank}}.sst2-workers.{}.svc:7070", scene.ns)
        );
        assert!(agent_command.contains(&"--secret-file".to_string()));
        assert_eq!(agent.image.as_deref(), Some(IMAGE));
        for c in [trainer, agent] {
            let sc = c.security_context.as_ref().unwrap();
            assert_eq!(sc.read_only_root_filesystem, Some(true), "{}", c.name);
            assert_eq!(sc.allow_privilege_escalation, Some(false));
            assert_eq!(
                sc.capabilities.as_ref().unwrap().drop.as_deref(),
                Some(&["ALL".to_string()][..])
            );
            let mounts: Vec<&str> = c
                .volume_mounts
                .iter()
                .flatten()
                .map(|m| m.mount_path.as_str())
                .collect();
            assert!(
                mounts.contains(&"/var/run/petl/snapshot-token")
                    && mounts.contains(&"/scratch")
                    && mounts.contains(&"/run/petl"),
                "{mounts:?}"
            );
        }
        let psc = spec.security_context.as_ref().unwrap();
        assert_eq!(psc.run_as_non_root, Some(true));
        assert_eq!(
            psc.seccomp_profile.as_ref().unwrap().type_,
            "RuntimeDefault"
        );
        assert_eq!(spec.node_selector.as_ref().unwrap()["pool"], "gpu-a");
        assert_eq!(
            spec.tolerations.as_ref().unwrap()[0].key.as_deref(),
            Some("nvidia.com/gpu")
        );
        assert_eq!(
            spec.priority_class_name.as_deref(),
            Some(class_name.as_str())
        );
        let requests = trainer
            .resources
            .as_ref()
            .unwrap()
            .requests
            .as_ref()
            .unwrap();
        assert_eq!(requests["cpu"].0, "2");
        assert!(spec.volumes.iter().flatten().any(|v| v.empty_dir.is_some()));

        let svc = created(
            &Api::<Service>::namespaced(scene.cp.client(), &scene.ns),
            "sst2-workers",
        )
        .await;
        let svc_spec = svc.spec.unwrap();
        assert_eq!(svc_spec.cluster_ip.as_deref(), Some("None"), "headless");
        assert_eq!(svc_spec.publish_not_ready_addresses, Some(true));
        assert_eq!(spec.subdomain.as_deref(), Some("sst2-workers"));

        let cm = created(
            &Api::<ConfigMap>::namespaced(scene.cp.client(), &scene.ns),
            "sst2-config",
        )
        .await;
        let rendered = PetlJob::from_yaml(&cm.data.unwrap()["job.yaml"])
            .expect("the trainer can parse the rendered job");
        assert_eq!(rendered.spec.workers.replicas, 2);

        let secret = created(
            &Api::<Secret>::namespaced(scene.cp.client(), &scene.ns),
            "sst2-snapshot-token",
        )
        .await;
        let token = &secret.data.unwrap()["token"].0;
        assert_eq!(token.len(), 64, "32 random bytes, hex");
        assert_eq!(secret.metadata.owner_references.unwrap()[0].kind, "PetlJob");
        let status = scene
            .wait_status("sst2", "workers reported", |s| {
                s.workers.as_ref().is_some_and(|w| w.total == 2)
            })
            .await;
        assert_eq!(status.phase, Some(Phase::Pending));
        assert!(status.start_time.is_some());
        scene.wait_event("sst2", "PodsCreated").await;
        classes
            .delete(&class_name, &DeleteParams::default())
            .await
            .expect("priority class deleted");
        scene.finish().await;
    });
}

#[test]
fn replaces_only_the_failed_rank_and_counts_the_restart() {
    run(async {
        let scene = Scene::new(cluster().await, "op-replace").await;
        scene.create("rt", 3, json!({ "backoffLimit": 3 })).await;
        let pods = scene.all_ready("rt", 3).await;
        scene
            .wait_status("rt", "Running", |s| s.phase == Some(Phase::Running))
            .await;
        let uids: BTreeMap<i32, String> =
            pods.iter().map(|(r, p)| (*r, p.uid().unwrap())).collect();

        scene
            .set_pod(
                "rt-worker-1",
                PodStatusUpdate::failed().container_terminated("trainer", 1, "Error"),
            )
            .await;
        let replacement = scene.wait_replaced("rt", 1, &uids[&1]).await;
        let status = scene
            .wait_status("rt", "Recovering", |s| s.phase == Some(Phase::Recovering))
            .await;
        assert_eq!(
            status.restarts.as_ref().map(|r| (r.counted, r.ignored)),
            Some((1, 0))
        );
        let now = scene.pods_by_rank("rt").await;
        assert_eq!(now[&0].uid().unwrap(), uids[&0], "rank 0 untouched");
        assert_eq!(now[&2].uid().unwrap(), uids[&2], "rank 2 untouched");

        scene
            .set_pod(
                &replacement.name_any(),
                PodStatusUpdate::running()
                    .container_running("trainer")
                    .ready(),
            )
            .await;
        let status = scene
            .wait_status("rt", "recovered", |s| s.recoveries == 1)
            .await;
        assert_eq!(status.phase, Some(Phase::Running));
        assert_eq!(status.last_recovery.as_ref().unwrap().lost_ranks, vec![1]);
        assert_eq!(
            condition(&status, ConditionType::Recovering),
            Some(("False".into(), "Recovered".into()))
        );
        scene.wait_event("rt", "RankLost").await;
        scene.wait_event("rt", "RankReplaced").await;
        scene.wait_event("rt", "Recovered").await;

        // A deleted pod is a lost rank too.
        let uid0 = uids[&0].clone();
        scene
            .pods
            .delete("rt-worker-0", &DeleteParams::default())
            .await
            .expect("delete rank 0");
        scene.wait_replaced("rt", 0, &uid0).await;
        let status = scene
            .wait_status("rt", "second failure counted", |s| {
                s.restarts.as_ref().is_some_and(|r| r.counted == 2)
            })
            .await;
        assert!(!status.is_finished());
        assert_eq!(scene.pods_by_rank("rt").await.len(), 3);
        scene.finish().await;
    });
}

#[test]
fn exhausting_the_backoff_limit_fails_the_job_for_good() {
    run(async {
        let scene = Scene::new(cluster().await, "op-backoff").await;
        scene.create("bo", 2, json!({ "backoffLimit": 1 })).await;
        let pods = scene.all_ready("bo", 2).await;
        scene
            .set_pod(
                "bo-worker-0",
                PodStatusUpdate::failed().container_terminated("trainer", 1, "Error"),
            )
            .await;
        let second = scene.wait_replaced("bo", 0, &pods[&0].uid().unwrap()).await;
        scene
            .set_pod(
                &second.name_any(),
                PodStatusUpdate::failed().container_terminated("trainer", 1, "Error"),
            )
            .await;
        let status = scene
            .wait_status("bo", "Failed", |s| failed_with(s, "BackoffLimitExceeded"))
            .await;
        assert_eq!(status.phase, Some(Phase::Failed));
        assert_eq!(status.restarts.as_ref().unwrap().counted, 2);
        assert!(status.completion_time.is_some());
        scene.wait_event("bo", "BackoffLimitExceeded").await;

        // Terminal state is sticky: the healthy rank is stopped and nothing comes back.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let left = scene.pods_by_rank("bo").await;
        assert!(
            !left.contains_key(&1),
            "the healthy rank was stopped: {:?}",
            left.keys()
        );
        assert_eq!(
            left[&0].uid(),
            second.uid(),
            "the failed pod is kept for its logs, not replaced"
        );
        scene
            .pods
            .delete("bo-worker-0", &DeleteParams::default())
            .await
            .expect("delete");
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert!(
            scene.pods_by_rank("bo").await.is_empty(),
            "a failed job never recreates pods"
        );
        scene.finish().await;
    });
}

#[test]
fn a_disruption_does_not_burn_the_budget() {
    run(async {
        let scene = Scene::new(cluster().await, "op-disrupt").await;
        scene.create("dis", 1, json!({ "backoffLimit": 0 })).await;
        let pods = scene.all_ready("dis", 1).await;
        let evicted = PodStatusUpdate::failed()
            .container_terminated("trainer", 137, "Error")
            .disruption_target("EvictionByEvictionAPI");
        scene.set_pod("dis-worker-0", evicted).await;
        let replacement = scene
            .wait_replaced("dis", 0, &pods[&0].uid().unwrap())
            .await;
        let status = scene
            .wait_status("dis", "ignored", |s| {
                s.restarts.as_ref().is_some_and(|r| r.ignored == 1)
            })
            .await;
        assert_eq!(status.restarts.as_ref().unwrap().counted, 0);
        assert!(
            !status.is_finished(),
            "backoffLimit 0 is not burnt by a disruption"
        );

        // The same budget does stop an ordinary failure.
        scene
            .set_pod(
                &replacement.name_any(),
                PodStatusUpdate::failed().container_terminated("trainer", 1, "Error"),
            )
            .await;
        scene
            .wait_status("dis", "Failed", |s| failed_with(s, "BackoffLimitExceeded"))
            .await;
        scene.finish().await;
    });
}

#[test]
fn a_permanent_exit_code_fails_the_job_at_once() {
    run(async {
        let scene = Scene::new(cluster().await, "op-permanent").await;
        scene.create("perm", 2, json!({ "backoffLimit": 5 })).await;
        scene.all_ready("perm", 2).await;
        scene
            .set_pod(
                "perm-worker-1",
                PodStatusUpdate::failed().container_terminated("trainer", 65, "Error"),
            )
            .await;
        let status = scene
            .wait_status("perm", "Failed", |s| failed_with(s, "PodFailurePolicy"))
            .await;
        assert_eq!(status.restarts.as_ref().unwrap().counted, 0);
        scene.finish().await;
    });
}

#[test]
fn suspend_stops_the_pods_and_resume_recreates_them_with_new_placement() {
    run(async {
        let scene = Scene::new(cluster().await, "op-suspend").await;
        scene.create("sus", 2, json!({})).await;
        scene.all_ready("sus", 2).await;
        scene
            .wait_status("sus", "Running", |s| s.phase == Some(Phase::Running))
            .await;

        let patch = json!({ "spec": { "suspend": true } });
        scene
            .jobs
            .patch("sus", &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .expect("suspend");
        let status = scene
            .wait_status("sus", "Suspended", |s| s.phase == Some(Phase::Suspended))
            .await;
        assert_eq!(
            condition(&status, ConditionType::Suspended),
            Some(("True".into(), "JobSuspended".into()))
        );
        let deadline = Instant::now() + WAIT;
        while !scene.pods_by_rank("sus").await.is_empty() {
            assert!(
                Instant::now() < deadline,
                "pods still there while suspended"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        scene.wait_event("sus", "Suspended").await;

        // What Kueue does on admission: inject placement, then unsuspend.
        let patch = json!({ "spec": { "workers": { "nodeSelector": { "pool": "spot-b" } } } });
        scene
            .jobs
            .patch("sus", &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .expect("placement while suspended");
        let patch = json!({ "spec": { "suspend": false } });
        scene
            .jobs
            .patch("sus", &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .expect("resume");
        let pods = scene.wait_pods("sus", 2).await;
        for pod in pods.values() {
            assert_eq!(
                pod.spec.as_ref().unwrap().node_selector.as_ref().unwrap()["pool"],
                "spot-b"
            );
        }
        let status = scene
            .wait_status("sus", "resumed", |s| {
                condition(s, ConditionType::Suspended)
                    == Some(("False".into(), "JobResumed".into()))
            })
            .await;
        assert_eq!(
            status
                .restarts
                .as_ref()
                .map_or(0, |r| r.counted + r.ignored),
            0,
            "suspension is not a failure"
        );
        scene.wait_event("sus", "Resumed").await;
        scene.finish().await;
    });
}

#[test]
fn the_active_deadline_fails_the_job_with_deadline_exceeded() {
    run(async {
        let scene = Scene::new(cluster().await, "op-deadline").await;
        let started = Instant::now();
        scene
            .create("dl", 1, json!({ "activeDeadlineSeconds": 3 }))
            .await;
        scene.all_ready("dl", 1).await;
        let status = scene
            .wait_status("dl", "DeadlineExceeded", |s| {
                failed_with(s, "DeadlineExceeded")
            })
            .await;
        let waited = started.elapsed();
        assert!(
            waited >= Duration::from_secs(3),
            "failed after {waited:?}, before the deadline"
        );
        assert!(
            waited < Duration::from_secs(10),
            "the requeue should land at the deadline, took {waited:?}"
        );
        assert_eq!(status.phase, Some(Phase::Failed));
        let deadline = Instant::now() + WAIT;
        while !scene.pods_by_rank("dl").await.is_empty() {
            assert!(
                Instant::now() < deadline,
                "pods not stopped after the deadline"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        scene.wait_event("dl", "DeadlineExceeded").await;
        scene.finish().await;
    });
}

#[test]
fn all_ranks_succeeding_completes_the_job_and_ttl_deletes_it_with_its_children() {
    run(async {
        let scene = Scene::new(cluster().await, "op-ttl").await;
        scene
            .create("done", 2, json!({ "ttlSecondsAfterFinished": 2 }))
            .await;
        scene.all_ready("done", 2).await;
        scene
            .set_pod(
                "done-worker-0",
                PodStatusUpdate::succeeded().container_terminated("trainer", 0, "Completed"),
            )
            .await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(
            !scene.status("done").await.is_finished(),
            "one rank done is not the job done"
        );
        scene
            .set_pod(
                "done-worker-1",
                PodStatusUpdate::succeeded().container_terminated("trainer", 0, "Completed"),
            )
            .await;
        let status = scene
            .wait_status("done", "Complete", |s| s.phase == Some(Phase::Succeeded))
            .await;
        assert_eq!(
            condition(&status, ConditionType::Complete),
            Some(("True".into(), "Succeeded".into()))
        );
        assert!(status.completion_time.is_some());
        assert_eq!(
            scene.pods_by_rank("done").await.len(),
            2,
            "finished pods are not replaced"
        );
        scene.wait_event("done", "Succeeded").await;

        let uid = status_uid(&scene, "done").await;
        let gone = await_condition(scene.jobs.clone(), "done", conditions::is_deleted(&uid));
        tokio::time::timeout(WAIT, gone)
            .await
            .expect("TTL deleted the PetlJob")
            .expect("watch");
        let cms: Api<ConfigMap> = Api::namespaced(scene.cp.client(), &scene.ns);
        let deadline = Instant::now() + Duration::from_secs(60);
        while cms.get_opt("done-config").await.expect("get").is_some()
            || !scene.pods_by_rank("done").await.is_empty()
        {
            assert!(Instant::now() < deadline, "children not garbage-collected");
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        scene.finish().await;
    });
}

async fn status_uid(scene: &Scene<'_>, name: &str) -> String {
    match scene.jobs.get_opt(name).await.expect("get") {
        Some(job) => job.uid().unwrap(),
        None => String::new(),
    }
}

#[test]
fn a_restarted_operator_creates_no_duplicate_pods_and_keeps_counting() {
    run(async {
        let mut scene = Scene::new(cluster().await, "op-restart").await;
        scene.create("rs", 3, json!({ "backoffLimit": 5 })).await;
        let pods = scene.all_ready("rs", 3).await;
        scene
            .wait_status("rs", "Running", |s| s.phase == Some(Phase::Running))
            .await;
        scene.stop_operator().await;
        scene
            .set_pod(
                "rs-worker-2",
                PodStatusUpdate::failed().container_terminated("trainer", 1, "Error"),
            )
            .await;

        let operator = Operator::start(scene.cp.client(), operator_config(&scene.ns))
            .await
            .expect("restart");
        scene.operator = Some(operator);
        scene.wait_replaced("rs", 2, &pods[&2].uid().unwrap()).await;
        let status = scene
            .wait_status("rs", "counted once", |s| {
                s.restarts.as_ref().is_some_and(|r| r.counted == 1)
            })
            .await;
        assert_eq!(status.phase, Some(Phase::Recovering));
        tokio::time::sleep(Duration::from_secs(1)).await;
        let now = scene.pods_by_rank("rs").await;
        assert_eq!(now.len(), 3, "no duplicate pods");
        assert_eq!(now[&0].uid(), pods[&0].uid());
        assert_eq!(now[&1].uid(), pods[&1].uid());
        assert_eq!(
            scene.status("rs").await.restarts.unwrap().counted,
            1,
            "the failure is counted once"
        );
        scene.finish().await;
    });
}

#[test]
fn pods_an_operator_created_before_it_could_report_are_not_duplicated() {
    run(async {
        let mut scene = Scene::new(cluster().await, "op-unreported").await;
        scene.stop_operator().await;
        // What an operator stopped between creating rank 0's pod and writing status leaves.
        let job = scene.create("ur", 2, json!({})).await;
        let names = Names::of(&job);
        let defaults = WorkerDefaults::of(&operator_config(&scene.ns));
        let pod = pod::pod(&job, &names, 0, &defaults).expect("pod renders");
        let earlier = scene
            .pods
            .create(&PostParams::default(), &pod)
            .await
            .expect("rank 0 created");

        let operator = Operator::start(scene.cp.client(), operator_config(&scene.ns))
            .await
            .expect("operator starts");
        scene.operator = Some(operator);
        let pods = scene.wait_pods("ur", 2).await;
        assert_eq!(pods[&0].uid(), earlier.uid(), "rank 0 keeps its pod");
        let status = scene
            .wait_status("ur", "the first report", |s| {
                s.observed_generation.is_some() && s.start_time.is_some()
            })
            .await;
        assert_eq!(status.phase, Some(Phase::Pending));
        assert!(
            status
                .restarts
                .as_ref()
                .is_none_or(|r| r.counted == 0 && r.ignored == 0),
            "nothing was lost: {status:?}"
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(scene.pods_by_rank("ur").await.len(), 2, "no duplicate pods");
        scene.finish().await;
    });
}

/// Short, so a lease left behind by a stopped leader expires quickly.
const LEASE_SECONDS: u64 = 4;

/// An operator config that takes part in the election for `lease` as `id`.
fn elected(ns: &str, lease: &str, id: &str) -> Config {
    Config {
        leader_elect: true,
        lease_name: lease.into(),
        lease_duration_seconds: LEASE_SECONDS,
        lease_renew_grace_seconds: 2,
        identity: Some(id.into()),
        ..operator_config(ns)
    }
}

#[test]
fn two_operators_elect_one_leader_and_the_other_takes_over() {
    run(async {
        let mut scene = Scene::new(cluster().await, "op-leader").await;
        scene.stop_operator().await;
        let elected = |id: &str| elected(&scene.ns, "petl-operator-test", id);
        let a = Operator::start(scene.cp.client(), elected("a"))
            .await
            .expect("a starts");
        let b = Operator::start(scene.cp.client(), elected("b"))
            .await
            .expect("b starts");
        let leader_of = |ops: [&Operator; 2]| ops.map(|o| o.metrics.leader.get());
        eventually(WAIT, "no single leader", || async {
            leader_of([&a, &b]).iter().sum::<i64>() == 1
        })
        .await;
        let (leader, follower) = if a.metrics.leader.get() == 1 {
            (a, b)
        } else {
            (b, a)
        };
        scene.create("le", 2, json!({})).await;
        scene.all_ready("le", 2).await;
        scene
            .wait_status("le", "Running", |s| s.phase == Some(Phase::Running))
            .await;
        assert!(leader.metrics.reconciles.get() > 0);
        assert_eq!(
            follower.metrics.reconciles.get(),
            0,
            "the follower never reconciles"
        );
        assert_eq!(leader_of([&leader, &follower]), [1, 0]);

        leader.stop().await.expect("leader stops");
        // Scheduling slack on top of the lease duration, for a loaded 2-core CI machine.
        let takeover = Duration::from_secs(LEASE_SECONDS + 2);
        eventually(takeover, "the follower did not take over", || async {
            follower.metrics.leader.get() == 1
        })
        .await;
        let pods = scene.pods_by_rank("le").await;
        scene
            .set_pod(
                "le-worker-1",
                PodStatusUpdate::failed().container_terminated("trainer", 1, "Error"),
            )
            .await;
        scene.wait_replaced("le", 1, &pods[&1].uid().unwrap()).await;
        assert!(
            follower.metrics.reconciles.get() > 0,
            "the new leader reconciles"
        );
        scene.operator = Some(follower);
        scene.finish().await;
    });
}

#[test]
fn the_metrics_endpoint_exposes_reconcile_and_job_counters() {
    run(async {
        let scene = Scene::new(cluster().await, "op-metrics").await;
        scene.create("met", 1, json!({})).await;
        let pods = scene.all_ready("met", 1).await;
        scene
            .wait_status("met", "Running", |s| s.phase == Some(Phase::Running))
            .await;
        scene
            .set_pod(
                "met-worker-0",
                PodStatusUpdate::failed().container_terminated("trainer", 1, "Error"),
            )
            .await;
        let replacement = scene
            .wait_replaced("met", 0, &pods[&0].uid().unwrap())
            .await;
        scene
            .set_pod(
                &replacement.name_any(),
                PodStatusUpdate::running()
                    .container_running("trainer")
                    .ready(),
            )
            .await;
        scene
            .wait_status("met", "recovered", |s| s.recoveries == 1)
            .await;

        let addr = scene.operator.as_ref().unwrap().metrics_addr;
        let http = reqwest::Client::new();
        let text = http
            .get(format!("http://{addr}/metrics"))
            .send()
            .await
            .expect("GET /metrics")
            .text()
            .await
            .expect("body");
        let value = |prefix: &str| -> f64 {
            text.lines()
                .find(|l| l.starts_with(prefix))
                .and_then(|l| l.rsplit(' ').next())
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("no {prefix} in\n{text}"))
        };
        assert!(value("petl_operator_reconciles_total ") >= 3.0);
        assert!(value("petl_operator_reconcile_duration_seconds_count ") >= 3.0);
        assert_eq!(value("petl_operator_jobs{phase=\"Running\"} "), 1.0);
        assert_eq!(
            value("petl_operator_worker_failures_total{action=\"Count\"} "),
            1.0
        );
        assert_eq!(value("petl_operator_recoveries_total "), 1.0);
        assert_eq!(value("petl_operator_recovery_duration_seconds_count "), 1.0);
        assert_eq!(value("petl_operator_time_to_running_seconds_count "), 1.0);
        assert!(value("petl_operator_pods_created_total ") >= 2.0);
        assert_eq!(value("petl_operator_leader "), 1.0);

        // Every operator metric the chart's dashboard reads is one this scrape declares.
        let dashboard = std::fs::read_to_string(dashboard::chart_dashboard()).unwrap();
        let dashboard: serde_json::Value = serde_json::from_str(&dashboard).unwrap();
        let exported = dashboard::exported_names(&text);
        let read: Vec<String> = dashboard::metric_names_in_queries(&dashboard)
            .into_iter()
            .filter(|n| n.starts_with("petl_operator_"))
            .collect();
        assert!(read.len() >= 10, "{read:?}");
        for name in read {
            assert!(
                exported.contains(&name),
                "the dashboard reads {name}, which the operator does not export"
            );
        }
        for path in ["healthz", "readyz"] {
            let code = http
                .get(format!("http://{addr}/{path}"))
                .send()
                .await
                .expect("GET")
                .status();
            assert!(code.is_success(), "/{path}: {code}");
        }
        scene.finish().await;
    });
}

#[test]
fn children_deleted_by_hand_are_recreated_without_a_spec_change() {
    run(async {
        let scene = Scene::new(cluster().await, "op-heal").await;
        scene.create("heal", 2, json!({})).await;
        let pods = scene.all_ready("heal", 2).await;
        let cms: Api<ConfigMap> = Api::namespaced(scene.cp.client(), &scene.ns);
        let svcs: Api<Service> = Api::namespaced(scene.cp.client(), &scene.ns);
        let secrets: Api<Secret> = Api::namespaced(scene.cp.client(), &scene.ns);
        let (cm_uid, svc_uid) = (
            created(&cms, "heal-config").await.uid(),
            created(&svcs, "heal-workers").await.uid(),
        );

        // The ConfigMap and Service come back by themselves: their deletion is watched.
        cms.delete("heal-config", &DeleteParams::default())
            .await
            .expect("delete ConfigMap");
        svcs.delete("heal-workers", &DeleteParams::default())
            .await
            .expect("delete Service");
        eventually(
            WAIT,
            "the ConfigMap and Service were not recreated",
            || async {
                let cm = cms.get_opt("heal-config").await.expect("get ConfigMap");
                let svc = svcs.get_opt("heal-workers").await.expect("get Service");
                cm.is_some_and(|c| c.uid() != cm_uid) && svc.is_some_and(|s| s.uid() != svc_uid)
            },
        )
        .await;

        // The Secret is not watched (least privilege); a replacement pod needs it, so the
        // operator puts it back before creating one.
        secrets
            .delete("heal-snapshot-token", &DeleteParams::default())
            .await
            .expect("delete Secret");
        scene
            .set_pod(
                "heal-worker-1",
                PodStatusUpdate::failed().container_terminated("trainer", 1, "Error"),
            )
            .await;
        scene
            .wait_replaced("heal", 1, &pods[&1].uid().unwrap())
            .await;
        assert!(
            secrets
                .get_opt("heal-snapshot-token")
                .await
                .expect("get Secret")
                .is_some(),
            "the replacement pod's Secret was recreated"
        );
        scene.finish().await;
    });
}

#[test]
fn a_crashed_leader_is_replaced_once_its_lease_expires() {
    run(async {
        let mut scene = Scene::new(cluster().await, "op-crash").await;
        scene.stop_operator().await;
        let elected = |id: &str| elected(&scene.ns, "petl-operator-crash", id);
        let a = Operator::start(scene.cp.client(), elected("a"))
            .await
            .expect("a starts");
        eventually(WAIT, "a never became the leader", || async {
            a.metrics.leader.get() == 1
        })
        .await;
        let b = Operator::start(scene.cp.client(), elected("b"))
            .await
            .expect("b starts");
        scene.create("cr", 1, json!({})).await;
        let pods = scene.all_ready("cr", 1).await;

        // Crash: no release, so b must wait for the lease to run out.
        let crashed = Instant::now();
        a.abort();
        tokio::time::sleep(Duration::from_millis(1000)).await;
        assert_eq!(
            b.metrics.leader.get(),
            0,
            "b took over before the crashed leader's lease expired"
        );
        let takeover = Duration::from_secs(3 * LEASE_SECONDS).saturating_sub(crashed.elapsed());
        eventually(takeover, "b did not take over after the crash", || async {
            b.metrics.leader.get() == 1
        })
        .await;
        scene
            .set_pod(
                "cr-worker-0",
                PodStatusUpdate::failed().container_terminated("trainer", 1, "Error"),
            )
            .await;
        scene.wait_replaced("cr", 0, &pods[&0].uid().unwrap()).await;
        assert!(b.metrics.reconciles.get() > 0, "the new leader reconciles");
        scene.operator = Some(b);
        scene.finish().await;
    });
}

#[test]
fn an_operator_that_cannot_join_the_election_stops_and_is_not_ready() {
    run(async {
        let mut scene = Scene::new(cluster().await, "op-nolease").await;
        scene.stop_operator().await;
        let config = Config {
            leader_elect: true,
            lease_namespace: format!("{}-missing", scene.ns),
            ..operator_config(&scene.ns)
        };
        let mut op = Operator::start(scene.cp.client(), config)
            .await
            .expect("starts");
        let addr = op.metrics_addr;
        let err = tokio::time::timeout(WAIT, op.wait())
            .await
            .expect("the operator stops by itself")
            .expect_err("joining an election in a missing namespace fails");
        assert!(err.to_string().contains("missing"), "{err}");
        let code = reqwest::get(format!("http://{addr}/readyz"))
            .await
            .expect("GET /readyz")
            .status();
        assert_eq!(code, reqwest::StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(op.metrics.reconciles.get(), 0);
        drop(op);
        scene.finish().await;
    });
}

/// A stand-in for rank 0's trainer: serves `/report` with the step it is told, on loopback.
struct FakeRankZero {
    addr: std::net::SocketAddr,
    step: std::sync::Arc<std::sync::atomic::AtomicI64>,
}

impl FakeRankZero {
    async fn start() -> Self {
        use axum::extract::State;
        use std::sync::Arc;
        use std::sync::atomic::{AtomicI64, Ordering};
        let step = Arc::new(AtomicI64::new(5));
        let app = axum::Router::new()
            .route(
                petl_crds::report::REPORT_PATH,
                axum::routing::get(|State(step): State<Arc<AtomicI64>>| async move {
                    let step = step.load(Ordering::SeqCst);
                    axum::Json(json!({
                        "progress": { "step": step, "totalSteps": 50, "loss": 0.75,
                                      "samplesPerSecond": 31.5, "etaSeconds": 90 },
                        "snapshot": { "generation": step, "step": step,
                                      "healthyShards": 2, "tolerableLosses": 1 },
                        "lastRecovery": { "lostRanks": [1], "restoredGeneration": 3,
                                          "seconds": 1.25, "source": "peers" },
                        "recoveries": 1
                    }))
                }),
            )
            .with_state(step.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        Self { addr, step }
    }

    fn set_step(&self, step: i64) {
        self.step.store(step, std::sync::atomic::Ordering::SeqCst);
    }
}

#[test]
fn rank_zeros_report_and_artifact_reach_the_status() {
    run(async {
        let rank_zero = FakeRankZero::start().await;
        let port = rank_zero.addr.port();
        let scene = Scene::with(cluster().await, "op-report", |c| {
            c.worker_metrics_port = port;
        })
        .await;
        scene.create("rep", 2, json!({})).await;
        scene.all_ready("rep", 2).await;
        // The pod's IP as a kubelet reports it: here, the loopback the stand-in listens on.
        scene
            .set_pod(
                "rep-worker-0",
                PodStatusUpdate::running()
                    .container_running("trainer")
                    .ready()
                    .pod_ip("127.0.0.1"),
            )
            .await;
        let status = scene
            .wait_status("rep", "progress from rank 0", |s| {
                s.progress.as_ref().is_some_and(|p| p.step == 5)
            })
            .await;
        let progress = status.progress.unwrap();
        assert_eq!(progress.summary.as_deref(), Some("5/50 (10%)"));
        assert_eq!(progress.samples_per_second, Some(31.5));
        let snapshot = status.snapshot.unwrap();
        assert_eq!((snapshot.generation, snapshot.tolerable_losses), (5, 1));
        assert_eq!(
            condition(&scene.status("rep").await, ConditionType::SnapshotDegraded),
            Some(("False".into(), "ShardsHealthy".into()))
        );
        let recovery = status.last_recovery.unwrap();
        assert_eq!(recovery.source.as_deref(), Some("peers"));

        // The status follows the trainer within 15 s.
        rank_zero.set_step(9);
        let changed = Instant::now();
        scene
            .wait_status("rep", "progress 9", |s| {
                s.progress.as_ref().is_some_and(|p| p.step == 9)
            })
            .await;
        assert!(
            changed.elapsed() < Duration::from_secs(15),
            "progress took {:?}",
            changed.elapsed()
        );
        let table = scene
            .cp
            .kubectl(&["get", "pj", "rep", "-n", &scene.ns])
            .await
            .unwrap();
        let table = String::from_utf8_lossy(&table.stdout);
        assert!(
            table.contains("9/50 (18%)") && table.contains("0.75"),
            "{table}"
        );

        // Success: rank 0's termination message holds the published artifact (and its final
        // report, absent here: the polled one stands).
        let artifact = json!({"artifact": {
            "uri": "file:///tmp/petl-out", "digest": format!("sha256:{}", "ab".repeat(32)),
            "sizeBytes": 4096, "trainableParameters": 1234, "peakMemoryBytes": 99
        }});
        scene
            .set_pod(
                "rep-worker-0",
                PodStatusUpdate::succeeded().container_terminated_with_message(
                    "trainer",
                    0,
                    "Completed",
                    &artifact.to_string(),
                ),
            )
            .await;
        scene
            .set_pod(
                "rep-worker-1",
                PodStatusUpdate::succeeded().container_terminated("trainer", 0, "Completed"),
            )
            .await;
        let status = scene
            .wait_status("rep", "Succeeded", |s| s.phase == Some(Phase::Succeeded))
            .await;
        let published = status.artifact.clone().expect("status.artifact");
        assert_eq!(published.digest, format!("sha256:{}", "ab".repeat(32)));
        assert_eq!(
            (published.size_bytes, published.trainable_parameters),
            (4096, Some(1234))
        );
        assert_eq!(
            condition(&status, ConditionType::ArtifactPublished),
            Some(("True".into(), "Published".into()))
        );
        scene.wait_event("rep", "ArtifactPublished").await;
        let wide = scene
            .cp
            .kubectl(&["get", "pj", "rep", "-n", &scene.ns, "-o", "wide"])
            .await
            .unwrap();
        let wide = String::from_utf8_lossy(&wide.stdout);
        assert!(wide.contains(&published.digest), "{wide}");

        let addr = scene.operator.as_ref().unwrap().metrics_addr;
        let text = reqwest::get(format!("http://{addr}/metrics"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert!(
            text.lines()
                .any(|l| l.starts_with("petl_operator_report_polls_total{result=\"ok\"}")),
            "{text}"
        );
        scene.finish().await;
    });
}

#[test]
fn a_trainer_restarted_in_place_is_counted_and_a_crash_loop_ends_the_job() {
    run(async {
        let scene = Scene::new(cluster().await, "op-inplace").await;
        scene.create("ip", 2, json!({ "backoffLimit": 2 })).await;
        let pods = scene.all_ready("ip", 2).await;
        scene
            .wait_status("ip", "Running", |s| s.phase == Some(Phase::Running))
            .await;
        let restarted = |count: i32, code: i32| {
            PodStatusUpdate::running()
                .container_running("trainer")
                .restarted("trainer", count, code)
                .ready()
        };
        scene.set_pod("ip-worker-1", restarted(1, 75)).await;
        let status = scene
            .wait_status("ip", "a restart counted and recovered", |s| {
                s.restarts.as_ref().is_some_and(|r| r.counted == 1) && s.recoveries == 1
            })
            .await;
        assert_eq!(status.last_recovery.unwrap().lost_ranks, vec![1]);
        assert_eq!(status.phase, Some(Phase::Running));
        let now = scene.pods_by_rank("ip").await;
        assert_eq!(
            now[&1].uid(),
            pods[&1].uid(),
            "restarted in place, not replaced"
        );
        assert_eq!(
            now[&1].annotations()["petl.dev/counted-restarts-trainer"],
            "1"
        );
        let note = scene.wait_event("ip", "RankRestarted").await;
        assert!(note.contains("exit code 75"), "{note}");

        // A crash loop: two more restarts exceed backoffLimit 2.
        scene.set_pod("ip-worker-1", restarted(3, 1)).await;
        let status = scene
            .wait_status("ip", "Failed", |s| failed_with(s, "BackoffLimitExceeded"))
            .await;
        assert_eq!(status.restarts.unwrap().counted, 3);
        scene.wait_event("ip", "BackoffLimitExceeded").await;
        scene.finish().await;
    });
}
