//! The PetlJob operator against a real control plane (etcd + kube-apiserver + controller
//! manager): children, rank replacement, budgets, suspend, deadlines, TTL, restarts, leadership.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::LazyLock;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret, Service};
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::api::scheduling::v1::PriorityClass;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{DeleteParams, ListParams, ObjectMeta, Patch, PatchParams, PostParams};
use kube::runtime::wait::{await_condition, conditions};
use kube::{Api, Client, CustomResourceExt, ResourceExt};
use petl_crds::{ConditionType, PetlJob, PetlJobStatus, Phase};
use petl_operator::reconcile::children::{self, Names};
use petl_operator::{Config, Operator};
use petl_tests::{ControlPlane, PodStatusUpdate, sample_job};
use serde_json::json;
use tokio::runtime::Runtime;
use tokio::sync::OnceCell;

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
const WAIT: Duration = Duration::from_secs(30);
const IMAGE: &str = "registry.example/petl:test";

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

async fn install_crd(client: &Client) {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let crd = PetlJob::crd();
    let name = crd.name_any();
    crds.patch(
        &name,
        &PatchParams::apply("petl-tests").force(),
        &Patch::Apply(&crd),
    )
    .await
    .expect("CRD applies");
    let established = await_condition(crds, &name, conditions::is_crd_established());
    tokio::time::timeout(WAIT, established)
        .await
        .expect("CRD established in time")
        .expect("CRD watch");
}

/// A namespace, an operator scoped to it, and handy APIs.
struct Scene {
    cp: &'static ControlPlane,
    ns: String,
    operator: Option<Operator>,
    jobs: Api<PetlJob>,
    pods: Api<Pod>,
}

impl Scene {
    async fn new(base: &str) -> Self {
        let cp = cluster().await;
        let ns = cp.create_namespace(base).await.expect("namespace");
        let operator = Operator::start(cp.client(), operator_config(&ns))
            .await
            .expect("operator starts");
        Self {
            cp,
            jobs: Api::namespaced(cp.client(), &ns),
            pods: Api::namespaced(cp.client(), &ns),
            ns,
            operator: Some(operator),
        }
    }

    async fn create(&self, name: &str, replicas: i32, run_policy: serde_json::Value) -> PetlJob {
        let job = job(name, replicas, run_policy, json!({}));
        self.jobs
            .create(&PostParams::default(), &job)
            .await
            .expect("PetlJob created")
    }

    async fn status(&self, name: &str) -> PetlJobStatus {
        self.jobs
            .get_status(name)
            .await
            .expect("get PetlJob")
            .status
            .unwrap_or_default()
    }

    /// Wait until the job's status satisfies `ok`, then return it.
    async fn wait_status(
        &self,
        name: &str,
        what: &str,
        ok: impl Fn(&PetlJobStatus) -> bool,
    ) -> PetlJobStatus {
        let deadline = Instant::now() + WAIT;
        loop {
            let status = self.status(name).await;
            if ok(&status) {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; status: {status:#?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The job's worker pods by rank.
    async fn pods_by_rank(&self, job: &str) -> BTreeMap<i32, Pod> {
        let list = self
            .pods
            .list(&ListParams::default().labels(&format!("petl.dev/job={job}")))
            .await
            .expect("list pods");
        list.items
            .into_iter()
            .map(|p| (p.labels()["petl.dev/rank"].parse().expect("rank label"), p))
            .collect()
    }

    /// Wait until `job` has exactly `n` pods (ranks 0..n) without a deletionTimestamp.
    async fn wait_pods(&self, job: &str, n: usize) -> BTreeMap<i32, Pod> {
        let deadline = Instant::now() + WAIT;
        loop {
            let pods = self.pods_by_rank(job).await;
            if pods.len() == n
                && pods
                    .values()
                    .all(|p| p.metadata.deletion_timestamp.is_none())
            {
                return pods;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {n} pods of {job}; have {:?}",
                pods.keys()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Wait until rank `rank` of `job` has a pod whose UID differs from `old_uid`.
    async fn wait_replaced(&self, job: &str, rank: i32, old_uid: &str) -> Pod {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(pod) = self.pods_by_rank(job).await.remove(&rank)
                && pod.uid().as_deref() != Some(old_uid)
            {
                return pod;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for rank {rank} of {job} to be replaced"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn set_pod(&self, pod: &str, update: PodStatusUpdate) {
        self.cp
            .set_pod_status(&self.ns, pod, &update)
            .await
            .expect("pod status set");
    }

    async fn all_ready(&self, job: &str, n: usize) -> BTreeMap<i32, Pod> {
        let pods = self.wait_pods(job, n).await;
        for pod in pods.values() {
            self.set_pod(
                &pod.name_any(),
                PodStatusUpdate::running()
                    .container_running("trainer")
                    .ready(),
            )
            .await;
        }
        pods
    }

    async fn event_reasons(&self, job: &str) -> Vec<String> {
        let events: Api<Event> = Api::namespaced(self.cp.client(), &self.ns);
        let list = events
            .list(&ListParams::default())
            .await
            .expect("list events");
        list.items
            .into_iter()
            .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(job))
            .filter_map(|e| e.reason)
            .collect()
    }

    async fn wait_event(&self, job: &str, reason: &str) {
        let deadline = Instant::now() + WAIT;
        while !self.event_reasons(job).await.iter().any(|r| r == reason) {
            assert!(
                Instant::now() < deadline,
                "no {reason} event for {job}; have {:?}",
                self.event_reasons(job).await
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    async fn stop_operator(&mut self) {
        if let Some(op) = self.operator.take() {
            op.stop().await.expect("operator stops cleanly");
        }
    }

    async fn finish(mut self) {
        self.stop_operator().await;
    }
}

fn operator_config(ns: &str) -> Config {
    Config {
        namespace: Some(ns.into()),
        lease_namespace: ns.into(),
        trainer_image: Some(IMAGE.into()),
        ..Config::local()
    }
}

fn job(
    name: &str,
    replicas: i32,
    run_policy: serde_json::Value,
    workers: serde_json::Value,
) -> PetlJob {
    let mut workers_spec = json!({ "replicas": replicas, "image": IMAGE });
    merge(&mut workers_spec, workers);
    sample_job(name, workers_spec, run_policy)
}

fn merge(into: &mut serde_json::Value, from: serde_json::Value) {
    if let (Some(into), serde_json::Value::Object(from)) = (into.as_object_mut(), from) {
        into.extend(from);
    }
}

fn condition(status: &PetlJobStatus, t: ConditionType) -> Option<(String, String)> {
    status
        .condition(t)
        .map(|c| (c.status.clone(), c.reason.clone()))
}

fn failed_with(status: &PetlJobStatus, reason: &str) -> bool {
    condition(status, ConditionType::Failed) == Some(("True".into(), reason.into()))
}

fn env(pod: &Pod, container: &str, name: &str) -> Option<String> {
    let spec = pod.spec.as_ref()?;
    let all = spec
        .containers
        .iter()
        .chain(spec.init_containers.iter().flatten());
    let c = all.into_iter().find(|c| c.name == container)?;
    c.env
        .as_ref()?
        .iter()
        .find(|e| e.name == name)?
        .value
        .clone()
}

#[test]
fn apply_creates_pods_service_configmap_and_secret_as_specified() {
    run(async {
        let scene = Scene::new("op-children").await;
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
        assert_eq!(
            env(pod, "snapshot-agent", "PETL_RANK").as_deref(),
            Some("1")
        );
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
            "petl-trainer train --config /etc/petl/job.yaml"
        );
        let agent = &spec.init_containers.as_ref().unwrap()[0];
        assert_eq!(agent.name, "snapshot-agent");
        assert_eq!(
            agent.restart_policy.as_deref(),
            Some("Always"),
            "native sidecar"
        );
        assert_eq!(agent.command.as_ref().unwrap()[0], "petl-snapshot-agent");
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
                mounts.contains(&"/var/run/petl/snapshot-token") && mounts.contains(&"/scratch"),
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
        let scene = Scene::new("op-replace").await;
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
        let scene = Scene::new("op-backoff").await;
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
        let scene = Scene::new("op-disrupt").await;
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
        let scene = Scene::new("op-permanent").await;
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
        let scene = Scene::new("op-suspend").await;
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
        let scene = Scene::new("op-deadline").await;
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
        let scene = Scene::new("op-ttl").await;
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

async fn status_uid(scene: &Scene, name: &str) -> String {
    match scene.jobs.get_opt(name).await.expect("get") {
        Some(job) => job.uid().unwrap(),
        None => String::new(),
    }
}

#[test]
fn a_restarted_operator_creates_no_duplicate_pods_and_keeps_counting() {
    run(async {
        let mut scene = Scene::new("op-restart").await;
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
        let mut scene = Scene::new("op-unreported").await;
        scene.stop_operator().await;
        // What an operator stopped between creating rank 0's pod and writing status leaves.
        let job = scene.create("ur", 2, json!({})).await;
        let names = Names::of(&job).expect("short name");
        let pod = children::pod(&job, &names, 0, None).expect("pod renders");
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

/// Poll `done` every 100 ms until it holds; fail with `what` once `limit` has passed.
/// `name` once it exists. The operator sends a job's ConfigMap, Service and Secret beside its
/// pods, not before them, so they can land a moment after the pods.
async fn created<K>(api: &Api<K>, name: &str) -> K
where
    K: Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(found) = api.get_opt(name).await.expect(name) {
            return found;
        }
        assert!(
            Instant::now() < deadline,
            "{name} was not created within 10 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn eventually<F: Future<Output = bool>>(
    limit: Duration,
    what: &str,
    mut done: impl FnMut() -> F,
) {
    let deadline = Instant::now() + limit;
    while !done().await {
        assert!(Instant::now() < deadline, "{what} (waited {limit:?})");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[test]
fn two_operators_elect_one_leader_and_the_other_takes_over() {
    run(async {
        let mut scene = Scene::new("op-leader").await;
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
        let scene = Scene::new("op-metrics").await;
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
        let scene = Scene::new("op-heal").await;
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
        let mut scene = Scene::new("op-crash").await;
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
        let mut scene = Scene::new("op-nolease").await;
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
