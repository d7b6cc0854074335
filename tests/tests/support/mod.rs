//! What the operator test binaries share: a namespace with its own in-process operator on a
//! real control plane (a `Scene`), the jobs they create, and waiting for what the operator does.
// Each test binary uses a part of this module.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::future::Future;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use kube::runtime::wait::{await_condition, conditions};
use kube::{Api, Client, CustomResourceExt, ResourceExt};
use petl_crds::{ConditionType, PetlJob, PetlJobStatus};
use petl_operator::{Config, Operator};
use petl_tests::{ControlPlane, PodStatusUpdate, sample_job};
use serde_json::json;

pub const WAIT: Duration = Duration::from_secs(30);
pub const IMAGE: &str = "registry.example/petl:test";

/// Install the PetlJob CRD as the code defines it and wait until it is served.
pub async fn install_crd(client: &Client) {
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
pub struct Scene<'a> {
    pub cp: &'a ControlPlane,
    pub ns: String,
    pub operator: Option<Operator>,
    pub jobs: Api<PetlJob>,
    pub pods: Api<Pod>,
}

impl<'a> Scene<'a> {
    /// A fresh namespace named after `base` with an operator watching only it.
    pub async fn new(cp: &'a ControlPlane, base: &str) -> Self {
        Self::with(cp, base, |_| {}).await
    }

    /// As [`Scene::new`], with the operator's flags adjusted by `adjust`.
    pub async fn with(cp: &'a ControlPlane, base: &str, adjust: impl FnOnce(&mut Config)) -> Self {
        let ns = cp.create_namespace(base).await.expect("namespace");
        Self::in_namespace(cp, ns, adjust).await
    }

    /// An operator watching the existing namespace `ns`.
    pub async fn in_namespace(
        cp: &'a ControlPlane,
        ns: String,
        adjust: impl FnOnce(&mut Config),
    ) -> Self {
        let mut config = operator_config(&ns);
        adjust(&mut config);
        let operator = Operator::start(cp.client(), config)
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

    pub async fn create(
        &self,
        name: &str,
        replicas: i32,
        run_policy: serde_json::Value,
    ) -> PetlJob {
        self.create_job(job(name, replicas, run_policy, json!({})))
            .await
    }

    pub async fn create_job(&self, job: PetlJob) -> PetlJob {
        self.jobs
            .create(&PostParams::default(), &job)
            .await
            .expect("PetlJob created")
    }

    pub async fn status(&self, name: &str) -> PetlJobStatus {
        self.jobs
            .get_status(name)
            .await
            .expect("get PetlJob")
            .status
            .unwrap_or_default()
    }

    /// Wait until the job's status satisfies `ok`, then return it.
    pub async fn wait_status(
        &self,
        name: &str,
        what: &str,
        ok: impl Fn(&PetlJobStatus) -> bool,
    ) -> PetlJobStatus {
        self.wait_status_for(name, what, WAIT, ok).await
    }

    /// [`Scene::wait_status`] with its own time limit.
    pub async fn wait_status_for(
        &self,
        name: &str,
        what: &str,
        limit: Duration,
        ok: impl Fn(&PetlJobStatus) -> bool,
    ) -> PetlJobStatus {
        let deadline = Instant::now() + limit;
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
    pub async fn pods_by_rank(&self, job: &str) -> BTreeMap<i32, Pod> {
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
    pub async fn wait_pods(&self, job: &str, n: usize) -> BTreeMap<i32, Pod> {
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
    pub async fn wait_replaced(&self, job: &str, rank: i32, old_uid: &str) -> Pod {
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

    pub async fn set_pod(&self, pod: &str, update: PodStatusUpdate) {
        self.cp
            .set_pod_status(&self.ns, pod, &update)
            .await
            .expect("pod status set");
    }

    pub async fn all_ready(&self, job: &str, n: usize) -> BTreeMap<i32, Pod> {
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

    /// The events on `job` as (reason, note), oldest first.
    pub async fn events(&self, job: &str) -> Vec<(String, String)> {
        let events: Api<Event> = Api::namespaced(self.cp.client(), &self.ns);
        let list = events
            .list(&ListParams::default())
            .await
            .expect("list events");
        list.items
            .into_iter()
            .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(job))
            .filter_map(|e| Some((e.reason?, e.note.unwrap_or_default())))
            .collect()
    }

    pub async fn event_reasons(&self, job: &str) -> Vec<String> {
        self.events(job).await.into_iter().map(|(r, _)| r).collect()
    }

    /// Wait for an event with `reason` on `job`; returns its note.
    pub async fn wait_event(&self, job: &str, reason: &str) -> String {
        let deadline = Instant::now() + WAIT;
        loop {
            let events = self.events(job).await;
            if let Some((_, note)) = events.iter().find(|(r, _)| r == reason) {
                return note.clone();
            }
            assert!(
                Instant::now() < deadline,
                "no {reason} event for {job}; have {events:?}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    pub async fn stop_operator(&mut self) {
        if let Some(op) = self.operator.take() {
            op.stop().await.expect("operator stops cleanly");
        }
    }

    pub async fn finish(mut self) {
        self.stop_operator().await;
    }
}

/// An operator watching only `ns`, with a default worker image.
pub fn operator_config(ns: &str) -> Config {
    Config {
        namespace: Some(ns.into()),
        lease_namespace: ns.into(),
        trainer_image: Some(IMAGE.into()),
        ..Config::local()
    }
}

/// The sample job with `replicas` workers, `run_policy`, and `workers` merged into its workers.
pub fn job(
    name: &str,
    replicas: i32,
    run_policy: serde_json::Value,
    workers: serde_json::Value,
) -> PetlJob {
    let mut workers_spec = json!({ "replicas": replicas, "image": IMAGE });
    merge(&mut workers_spec, workers);
    sample_job(name, workers_spec, run_policy)
}

pub fn merge(into: &mut serde_json::Value, from: serde_json::Value) {
    if let (Some(into), serde_json::Value::Object(from)) = (into.as_object_mut(), from) {
        into.extend(from);
    }
}

/// (status, reason) of condition `t`.
pub fn condition(status: &PetlJobStatus, t: ConditionType) -> Option<(String, String)> {
    status
        .condition(t)
        .map(|c| (c.status.clone(), c.reason.clone()))
}

pub fn failed_with(status: &PetlJobStatus, reason: &str) -> bool {
    condition(status, ConditionType::Failed) == Some(("True".into(), reason.into()))
}

/// The value of env var `name` in `container` (a container or init container) of `pod`.
pub fn env(pod: &Pod, container: &str, name: &str) -> Option<String> {
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

/// `name` once it exists. The operator sends a job's ConfigMap, Service and Secret beside its
/// pods, not before them, so they can land a moment after the pods.
pub async fn created<K>(api: &Api<K>, name: &str) -> K
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

/// Poll `done` every 100 ms until it holds; fail with `what` once `limit` has passed.
pub async fn eventually<F: Future<Output = bool>>(
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
