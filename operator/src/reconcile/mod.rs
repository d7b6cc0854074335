//! The apply and cleanup paths of a PetlJob reconcile: read the pods, let the planner decide,
//! then carry the plan out against the API server and report it.

pub mod children;
pub mod plan;
pub mod ranks;
pub mod status;

use std::collections::BTreeSet;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use either::Either;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret, Service};
use k8s_openapi::jiff::Timestamp;
use kube::api::{
    DeleteParams, ListParams, Patch, PatchParams, PostParams, Preconditions, VersionMatch,
};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType};
use kube::{Api, Resource, ResourceExt};
use petl_crds::{PetlJob, PetlJobStatus};
use serde_json::json;
use tracing::{info, warn};

use self::children::Names;
use self::plan::{Observed, Plan, Stop};
use self::ranks::{JOB_LABEL, RankPod, STOPPED_LABEL};
use crate::controller::Context;
use crate::{Error, FIELD_MANAGER, Result};

/// How often a job is looked at when nothing else triggers it (a safety net, not a clock).
const RESYNC: Duration = Duration::from_secs(600);

/// Bring the job's children and status in line with its spec.
pub async fn apply(cached: Arc<PetlJob>, ctx: &Context) -> Result<Action> {
    let names = Names::of(&cached)?;
    let uid = cached.uid().unwrap_or_default();
    let pods_api: Api<Pod> = Api::namespaced(ctx.client.clone(), &names.namespace);
    let first = ctx.first_look(&cached);
    let (job, pods) = if first {
        // Nothing to read: no operator has reported on the job, and this one wrote nothing of
        // it. Each create proves its rank has no pod yet (409 otherwise), and the status write
        // is conditional on the cached version, so a cache that was behind is caught either way.
        (cached.as_ref().clone(), Vec::new())
    } else {
        // Independent reads, so one round trip: pods are matched to this job by its UID.
        let (fresh, pods) = tokio::try_join!(
            read_fresh(&cached, &names, ctx),
            list_rank_pods(&pods_api, &names, &cached, ctx)
        )?;
        let Some(job) = fresh else {
            return Ok(Action::await_change());
        };
        (job, pods)
    };
    let status = job.status.clone().unwrap_or_default();

    let awaiting = ctx.awaiting_ranks(&uid, &pods);
    let plan = plan::plan(&Observed {
        spec: &job.spec,
        status: &status,
        generation: job.metadata.generation,
        created: job.metadata.creation_timestamp.as_ref().map(|t| t.0),
        pods: &pods,
        awaiting_replacement: &awaiting,
        now: Timestamp::now(),
    });

    let live = !status.is_finished() && !job.spec.suspend;
    let stale = status.observed_generation != job.metadata.generation
        || ctx.children_missing(&names.namespace, &names.config_map(), &names.service());
    // A new pod mounts the ConfigMap and the Secret, so they are put back (if deleted by hand)
    // whenever a pod is created. Not first, though: the kubelet retries a pod's volumes until
    // their objects exist, so they go out beside the pods and the status write, off the path
    // of a new job's two round trips.
    let pods_due = !plan.create.is_empty() || plan.stop.iter().any(|s| s.replace);
    let children = if (live && stale) || pods_due {
        Some(ensure_children_or_report(&job, &names, ctx)?)
    } else {
        None
    };
    let children = async {
        match children {
            Some(children) => children.await,
            None => Ok(()),
        }
    };
    let precondition = first.then(|| cached.resource_version()).flatten();
    let pods_then_status = async {
        let taken = carry_out_pods(&plan, &pods, &job, &names, &pods_api, ctx).await?;
        if first && !taken.is_empty() {
            // Pods exist that this operator never saw (another one created them).
            info!(job = %names.job, namespace = %names.namespace, ranks = ?taken, "pods exist already; reading the job's pods");
            ctx.pods_written(&uid, PodRead::Consistent);
            return Ok(false);
        }
        for rank in taken {
            // The rank's previous pod still terminates; its deletion triggers the next attempt.
            ctx.await_replacement(&uid, rank);
        }
        let written = write_status(&job, &status, &plan.status, precondition, ctx).await?;
        if !written {
            // The job changed since the cached copy was taken (its status may hold more
            // than nothing).
            info!(job = %names.job, namespace = %names.namespace, "the job changed before its first status write; reading it again");
        }
        Ok::<_, Error>(written)
    };
    // Both run to the end: a failed child must not cancel a pod stop or create half-way.
    let (children, reported) = tokio::join!(children, pods_then_status);
    if !reported? {
        // Plan again from the job and its pods as they are now.
        return Ok(Action::requeue(Duration::ZERO));
    }
    report(&job, &uid, &plan, ctx);
    children?;

    if plan.delete_job {
        info!(job = %names.job, namespace = %names.namespace, "ttlSecondsAfterFinished expired; deleting the PetlJob");
        let jobs: Api<PetlJob> = Api::namespaced(ctx.client.clone(), &names.namespace);
        let params = DeleteParams {
            preconditions: Some(Preconditions {
                uid: Some(uid),
                resource_version: None,
            }),
            ..DeleteParams::background()
        };
        match jobs.delete(&names.job, &params).await {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(e) => return Err(e.into()),
        }
        return Ok(Action::await_change());
    }
    Ok(Action::requeue(
        plan.requeue_after.map_or(RESYNC, |d| d.min(RESYNC)),
    ))
}

/// Stop the pods the plan stops, then create the ranks it creates and the replacements whose
/// predecessor is gone. Returns the ranks whose pod name was still taken.
async fn carry_out_pods(
    plan: &Plan,
    pods: &[RankPod],
    job: &PetlJob,
    names: &Names,
    pods_api: &Api<Pod>,
    ctx: &Context,
) -> Result<Vec<i32>> {
    let uid = job.uid().unwrap_or_default();
    let mut replace_now = Vec::new();
    for stop in &plan.stop {
        let pod = pods.iter().find(|p| p.uid == stop.uid);
        let gone = stop_pod(
            pods_api,
            stop,
            pod.is_some_and(|p| p.stopped_by_operator),
            |read| ctx.pods_written(&uid, read),
        )
        .await?;
        if stop.replace {
            if gone {
                replace_now.push(stop.rank);
            } else {
                ctx.await_replacement(&uid, stop.rank);
            }
        }
    }
    let creates = plan.create.iter().copied().chain(replace_now);
    let uid = uid.as_str();
    let created = futures::future::try_join_all(creates.map(|rank| async move {
        let created = create_pod(job, names, rank, ctx, pods_api, uid).await?;
        Ok::<_, Error>((rank, created))
    }))
    .await?;
    Ok(created
        .into_iter()
        .filter(|(_, created)| !created)
        .map(|(rank, _)| rank)
        .collect())
}

/// The job as the API server has it now, or None when it is gone or was recreated.
///
/// The reflector's copy can lag this operator's own last status write (a pod event may
/// trigger the next reconcile before the watch delivers it); planning from that stale status
/// would count the same transition twice and write an older status back. A copy that already
/// carries that write is used as is; otherwise the job is read from the API server.
async fn read_fresh(cached: &PetlJob, names: &Names, ctx: &Context) -> Result<Option<PetlJob>> {
    let uid = cached.uid().unwrap_or_default();
    let written = ctx.with_job(&uid, |m| m.status_version.clone());
    if written.is_some() && written == cached.resource_version() {
        return Ok(Some(cached.clone()));
    }
    let jobs: Api<PetlJob> = Api::namespaced(ctx.client.clone(), &names.namespace);
    match jobs.get_opt(&names.job).await? {
        Some(fresh) if fresh.uid() == cached.uid() => Ok(Some(fresh)),
        _ => Ok(None),
    }
}

/// The PetlJob is being deleted: stop its workers now (the other children follow through
/// garbage collection of their ownerReferences) and forget it.
pub async fn cleanup(job: Arc<PetlJob>, ctx: &Context) -> Result<Action> {
    let uid = job.uid().unwrap_or_default();
    let namespace = job.namespace().unwrap_or_else(|| "default".into());
    let pods_api: Api<Pod> = Api::namespaced(ctx.client.clone(), &namespace);
    let selector = format!("{JOB_LABEL}={}", job.name_any());
    let pods = pods_api
        .list(&ListParams::default().labels(&selector))
        .await?;
    let mut stopped = 0;
    for pod in pods
        .items
        .iter()
        .filter(|p| owned_by(p, &uid))
        .filter_map(RankPod::from_pod)
    {
        if pod.is_active() {
            let stop = Stop {
                name: pod.name.clone(),
                uid: pod.uid.clone(),
                rank: pod.rank,
                reason: "Deleted".into(),
                delete: true,
                replace: false,
            };
            stop_pod(&pods_api, &stop, pod.stopped_by_operator, |_| {}).await?;
            stopped += 1;
        }
    }
    ctx.forget(&uid);
    let note = format!("the PetlJob is being deleted; stopped {stopped} worker pod(s)");
    ctx.publish(&job, vec![(EventType::Normal, "Deleting".into(), note)]);
    Ok(Action::await_change())
}

/// Server-side apply the ConfigMap and Service; create the token Secret once. The objects
/// are rendered at once (telling the user on the PetlJob when its spec cannot be rendered);
/// the requests go out when the returned future runs.
fn ensure_children_or_report<'a>(
    job: &PetlJob,
    names: &Names,
    ctx: &'a Context,
) -> Result<impl Future<Output = Result<()>> + 'a> {
    let cm = children::config_map(job, names).inspect_err(|e| publish_invalid(job, ctx, e))?;
    let service = children::service(job, names);
    let secret = children::secret(job, names);
    let namespace = names.namespace.clone();
    let (config_map_name, service_name) = (names.config_map(), names.service());
    Ok(async move {
        let client = &ctx.client;
        let params = PatchParams::apply(FIELD_MANAGER).force();
        let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &namespace);
        let svcs: Api<Service> = Api::namespaced(client.clone(), &namespace);
        let secrets: Api<Secret> = Api::namespaced(client.clone(), &namespace);
        let post = PostParams {
            field_manager: Some(FIELD_MANAGER.into()),
            ..PostParams::default()
        };
        let (cm, service) = (Patch::Apply(&cm), Patch::Apply(&service));
        let apply_config_map = cms.patch(&config_map_name, &params, &cm);
        let apply_service = svcs.patch(&service_name, &params, &service);
        // Created once: a conflict means it exists, and its token must not change under the pods.
        let create_secret = async {
            match secrets.create(&post, &secret).await {
                Ok(_) => Ok(()),
                Err(kube::Error::Api(e)) if e.code == 409 => Ok(()),
                Err(e) => Err(e),
            }
        };
        tokio::try_join!(apply_config_map, apply_service, create_secret)?;
        Ok(())
    })
}

/// How fresh a list of a job's pods must be. A consistent list makes the API server wait until
/// its watch cache has caught up with etcd, which took ~90 ms here even when idle; the cache
/// served at once is enough whenever it provably holds this operator's own last change to the
/// job's pods (the changes a reconcile must never count twice). Pod changes made by others
/// reach the reconcile through the watch of that same cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PodRead {
    /// Any cached state: nothing of the job's pods was ever written (a job never reconciled).
    Any,
    /// At least as new as this resourceVersion, the operator's last write to the job's pods.
    NotOlderThan(String),
    /// Straight from etcd's current state: the last write left no version (a pod deleted at once).
    Consistent,
}

impl PodRead {
    fn params(&self, selector: &str) -> ListParams {
        let params = ListParams::default().labels(selector);
        match self {
            PodRead::Any => params.match_any(),
            PodRead::NotOlderThan(version) => {
                params.at(version).matching(VersionMatch::NotOlderThan)
            }
            PodRead::Consistent => params,
        }
    }

    /// The newer of two reads' demands (resourceVersions are etcd revisions, compared as numbers).
    fn newer(self, other: PodRead) -> PodRead {
        use PodRead::*;
        match (self, other) {
            (Consistent, _) | (_, Consistent) => Consistent,
            (Any, o) | (o, Any) => o,
            (NotOlderThan(a), NotOlderThan(b)) => match (a.parse::<u64>(), b.parse::<u64>()) {
                (Ok(x), Ok(y)) => NotOlderThan(if x >= y { a } else { b }),
                _ => Consistent,
            },
        }
    }
}

/// The job's worker pods (by label, and owned by this incarnation of the job).
async fn list_rank_pods(
    api: &Api<Pod>,
    names: &Names,
    job: &PetlJob,
    ctx: &Context,
) -> Result<Vec<RankPod>> {
    let uid = job.uid().unwrap_or_default();
    let selector = format!("{JOB_LABEL}={}", names.job);
    let pods = api.list(&ctx.pod_read(job).params(&selector)).await?;
    // What this list saw is the floor for the next one (the reconcile's own writes raise it).
    if let Some(version) = pods.metadata.resource_version.clone() {
        ctx.with_job(&uid, |m| m.pod_read = Some(PodRead::NotOlderThan(version)));
    }
    Ok(pods
        .items
        .iter()
        .filter(|p| owned_by(p, &uid))
        .filter_map(RankPod::from_pod)
        .collect())
}

fn version_of(pod: &Pod) -> PodRead {
    pod.resource_version()
        .map_or(PodRead::Consistent, PodRead::NotOlderThan)
}

fn owned_by(pod: &Pod, uid: &str) -> bool {
    pod.owner_references()
        .iter()
        .any(|o| o.uid == uid && o.controller == Some(true))
}

/// Label the pod with why it is stopped (the accounting mark), then delete it. Returns
/// whether the pod is gone.
async fn stop_pod(
    api: &Api<Pod>,
    stop: &Stop,
    already_marked: bool,
    written: impl Fn(PodRead),
) -> Result<bool> {
    if !already_marked {
        let mark = json!({"metadata": {"labels": {STOPPED_LABEL: stop.reason}}});
        match api
            .patch(&stop.name, &PatchParams::default(), &Patch::Merge(&mark))
            .await
        {
            Ok(pod) => written(version_of(&pod)),
            Err(kube::Error::Api(e)) if e.code == 404 => return Ok(true),
            Err(e) => return Err(e.into()),
        }
    }
    if !stop.delete {
        return Ok(false);
    }
    let params = DeleteParams {
        preconditions: Some(Preconditions {
            uid: Some(stop.uid.clone()),
            resource_version: None,
        }),
        ..DeleteParams::default()
    };
    match api.delete(&stop.name, &params).await {
        Ok(Either::Left(pod)) => {
            written(version_of(&pod));
            Ok(pod.metadata.deletion_timestamp.is_none() && pod.finalizers().is_empty())
        }
        Ok(Either::Right(_)) => {
            written(PodRead::Consistent);
            Ok(true)
        }
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(true),
        // 409: the precondition failed, a newer pod holds the name; it is not ours to stop.
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// Create the pod of `rank`; false when the name is taken.
async fn create_pod(
    job: &PetlJob,
    names: &Names,
    rank: i32,
    ctx: &Context,
    api: &Api<Pod>,
    uid: &str,
) -> Result<bool> {
    let pod = match children::pod(job, names, rank, ctx.config.trainer_image.as_deref()) {
        Ok(pod) => pod,
        Err(e) => {
            publish_invalid(job, ctx, &e);
            return Err(e);
        }
    };
    // A create, not an apply: it must fail while the rank's previous pod still terminates.
    let post = PostParams {
        field_manager: Some(FIELD_MANAGER.into()),
        ..PostParams::default()
    };
    match api.create(&post, &pod).await {
        Ok(created) => {
            ctx.pods_written(uid, version_of(&created));
            ctx.metrics.pods_created.inc();
            ctx.replaced(uid, rank);
            Ok(true)
        }
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// Write the operator's part of the status with server-side apply, only when it changed; with
/// a `precondition`, only while the job is still at that resourceVersion. Returns false when
/// the precondition failed.
async fn write_status(
    job: &PetlJob,
    old: &PetlJobStatus,
    new: &PetlJobStatus,
    precondition: Option<String>,
    ctx: &Context,
) -> Result<bool> {
    let (old, new) = (status::owned_fields(old), status::owned_fields(new));
    if old == new {
        return Ok(true);
    }
    let api: Api<PetlJob> =
        Api::namespaced(ctx.client.clone(), &job.namespace().unwrap_or_default());
    let mut patch =
        json!({ "apiVersion": petl_crds::API_VERSION, "kind": petl_crds::KIND, "status": new });
    if let Some(version) = precondition {
        patch["metadata"] = json!({ "resourceVersion": version });
    }
    let params = PatchParams::apply(FIELD_MANAGER).force();
    let updated = match api
        .patch_status(&job.name_any(), &params, &Patch::Apply(&patch))
        .await
    {
        Ok(updated) => updated,
        Err(kube::Error::Api(e)) if e.code == 409 => return Ok(false),
        Err(e) => return Err(e.into()),
    };
    if let Some(uid) = updated.uid() {
        ctx.with_job(&uid, |m| m.status_version = updated.resource_version());
    }
    Ok(true)
}

/// Publish the plan's events and update metrics.
fn report(job: &PetlJob, uid: &str, plan: &Plan, ctx: &Context) {
    for failure in &plan.failures {
        ctx.metrics.worker_failed(*failure);
    }
    if let Some(seconds) = plan.recovery_seconds {
        ctx.metrics.recoveries.inc();
        ctx.metrics.recovery_duration.observe(seconds);
    }
    if let Some(seconds) = plan.time_to_running {
        ctx.metrics.time_to_running.observe(seconds);
    }
    if let Some(phase) = plan.status.phase {
        ctx.metrics.set_phase(uid, phase);
    }
    for event in &plan.events {
        info!(job = %job.name_any(), reason = event.reason, note = %event.note, "transition");
    }
    let events = plan.events.iter();
    ctx.publish(
        job,
        events
            .map(|e| (e.type_, e.reason.to_string(), e.note.clone()))
            .collect(),
    );
}

fn publish_invalid(job: &PetlJob, ctx: &Context, e: &Error) {
    if matches!(e, Error::IllegalJob { .. }) {
        let event = (EventType::Warning, "InvalidSpec".into(), e.to_string());
        ctx.publish(job, vec![event]);
    }
}

impl Context {
    /// Publish events on `job`, in order, off the reconcile's path: events are best effort
    /// (failures are logged), and a reconcile must not wait on them.
    pub fn publish(&self, job: &PetlJob, events: Vec<(EventType, String, String)>) {
        if events.is_empty() {
            return;
        }
        let recorder = self.recorder.clone();
        let reference = job.object_ref(&());
        let name = job.name_any();
        tokio::spawn(async move {
            for (type_, reason, note) in events {
                let event = Event {
                    type_,
                    reason,
                    note: Some(note),
                    action: "Reconcile".into(),
                    secondary: None,
                };
                if let Err(e) = recorder.publish(&event, &reference).await {
                    warn!(job = %name, error = %e, "cannot publish event");
                }
            }
        });
    }

    /// Ranks stopped by the operator and not yet replaced: those in memory plus those whose
    /// labelled pod is still terminating (which survives an operator restart).
    /// Run `f` on what this operator remembers of job `uid` (created empty on first use).
    fn with_job<R>(&self, uid: &str, f: impl FnOnce(&mut JobMemory) -> R) -> R {
        let mut jobs = self.jobs.lock().unwrap_or_else(|p| p.into_inner());
        f(jobs.entry(uid.to_string()).or_default())
    }

    fn awaiting_ranks(&self, uid: &str, pods: &[RankPod]) -> BTreeSet<i32> {
        let mut ranks = self.with_job(uid, |m| m.awaiting.clone());
        ranks.extend(
            pods.iter()
                .filter(|p| p.deleting && p.stopped_by_operator)
                .map(|p| p.rank),
        );
        ranks
    }

    fn await_replacement(&self, uid: &str, rank: i32) {
        self.with_job(uid, |m| m.awaiting.insert(rank));
    }

    fn replaced(&self, uid: &str, rank: i32) {
        self.with_job(uid, |m| m.awaiting.remove(&rank));
    }

    /// Whether `job` can be reconciled without reading it or its pods: it has no status (no
    /// operator has reported on it), it is to run, and this operator has written nothing of it.
    fn first_look(&self, job: &PetlJob) -> bool {
        job.status.is_none()
            && !job.spec.suspend
            && self.with_job(&job.uid().unwrap_or_default(), |m| m.is_blank())
    }

    /// How fresh the next list of `job`'s pods must be.
    fn pod_read(&self, job: &PetlJob) -> PodRead {
        let uid = job.uid().unwrap_or_default();
        let never_reconciled = job
            .status
            .as_ref()
            .is_none_or(|s| s.observed_generation.is_none());
        match self.with_job(&uid, |m| m.pod_read.clone()) {
            Some(read) => read,
            None if never_reconciled => PodRead::Any,
            // Pods written by an earlier operator process, at versions this one never saw.
            None => PodRead::Consistent,
        }
    }

    /// Note a write to `uid`'s pods, so the next list sees it.
    fn pods_written(&self, uid: &str, read: PodRead) {
        self.with_job(uid, |m| {
            m.pod_read = Some(match m.pod_read.take() {
                Some(previous) => previous.newer(read),
                None => read,
            });
        });
    }

    fn forget(&self, uid: &str) {
        self.jobs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(uid);
        self.metrics.forget_job(uid);
    }
}

/// What the operator remembers of one job between its reconciles.
#[derive(Debug, Default)]
pub struct JobMemory {
    /// Ranks whose pod the operator stopped and has not replaced yet.
    awaiting: BTreeSet<i32>,
    /// The resourceVersion of the operator's last status write.
    status_version: Option<String>,
    /// How fresh the next list of the job's pods must be.
    pod_read: Option<PodRead>,
}

impl JobMemory {
    /// Nothing remembered: this operator has not written anything of the job.
    fn is_blank(&self) -> bool {
        self.awaiting.is_empty() && self.status_version.is_none() && self.pod_read.is_none()
    }
}

#[cfg(test)]
mod tests {
    use super::PodRead::{self, *};

    fn at(v: &str) -> PodRead {
        NotOlderThan(v.into())
    }

    #[test]
    fn the_newer_demand_wins_and_a_consistent_read_is_never_relaxed() {
        assert_eq!(at("100").newer(at("99")), at("100"));
        assert_eq!(at("99").newer(at("100")), at("100"));
        assert_eq!(Any.newer(at("7")), at("7"));
        assert_eq!(at("7").newer(Any), at("7"));
        assert_eq!(at("7").newer(Consistent), Consistent);
        assert_eq!(Consistent.newer(at("7")), Consistent);
        // Versions that are not numbers cannot be ordered: read consistently.
        assert_eq!(at("x").newer(at("7")), Consistent);
    }

    #[test]
    fn list_parameters_ask_for_the_demanded_freshness() {
        let any = Any.params("petl.dev/job=a");
        assert_eq!(any.resource_version.as_deref(), Some("0"));
        let floor = at("42").params("petl.dev/job=a");
        assert_eq!(floor.resource_version.as_deref(), Some("42"));
        assert_eq!(
            floor.version_match,
            Some(kube::api::VersionMatch::NotOlderThan)
        );
        let consistent = Consistent.params("petl.dev/job=a");
        assert_eq!(consistent.resource_version, None);
        assert_eq!(consistent.label_selector.as_deref(), Some("petl.dev/job=a"));
    }
}
