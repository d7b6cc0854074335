//! The apply and cleanup paths of a PetlJob reconcile: read the pods, let the planner decide,
//! then carry the plan out against the API server and report it.

mod carry_out;
pub mod children;
pub mod plan;
pub mod pod;
pub mod pod_read;
pub mod ranks;
pub mod status;

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::jiff::Timestamp;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, Preconditions};
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::runtime::reflector::ObjectRef;
use kube::{Api, ResourceExt};
use petl_crds::{PetlJob, PetlJobStatus};
use serde_json::json;
use tracing::info;

use self::carry_out::{carry_out_pods, ensure_children, owned_by, stop_pod};
use self::children::Names;
use self::plan::{AfterStop, Observed, Plan, Removal, Stop, StopReason};
use self::pod_read::PodRead;
use self::ranks::{JOB_LABEL, PodState, RankPod};
use crate::context::Context;
use crate::{Error, FIELD_MANAGER, Result};

/// How often a job is looked at when nothing else triggers it (a safety net, not a clock).
const RESYNC: Duration = Duration::from_secs(600);

/// Bring the job's children and status in line with its spec.
pub async fn apply(cached: Arc<PetlJob>, ctx: &Context) -> Result<Action> {
    let names = Names::of(&cached);
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
    let report = ctx.reports.latest(&uid);
    let refusal = ctx.refusal(&uid);
    let plan = plan::plan(&Observed {
        spec: &job.spec,
        status: &status,
        generation: job.metadata.generation,
        created: job.metadata.creation_timestamp.as_ref().map(|t| t.0),
        pods: &pods,
        awaiting_replacement: &awaiting,
        report: report.as_ref(),
        refusal: refusal.as_ref(),
        now: Timestamp::now(),
    });

    let live = !status.is_finished() && !job.spec.suspend;
    let stale = status.observed_generation != job.metadata.generation
        || refusal.is_some()
        || ctx.children_missing(&names.namespace, &names.config_map(), &names.service());
    // A new pod mounts the ConfigMap and the Secret, so they are put back (if deleted by hand)
    // whenever a pod is created. Not first, though: the kubelet retries a pod's volumes until
    // their objects exist, so they go out beside the pods and the status write, off the path
    // of a new job's two round trips.
    let pods_due = !plan.create.is_empty() || plan.stop.iter().any(Stop::replaces);
    let children_due = (live && stale) || pods_due;
    let children = async {
        if children_due {
            ensure_children(&job, &names, ctx).await
        } else {
            Ok(None)
        }
    };
    let precondition = first.then(|| cached.resource_version()).flatten();
    let pods_then_status = async {
        let outcome = carry_out_pods(&plan, &pods, first, &job, &names, &pods_api, ctx).await?;
        if first && !outcome.taken.is_empty() {
            // Pods exist that this operator never saw (another one created them).
            info!(job = %names.job, namespace = %names.namespace, ranks = ?outcome.taken, "pods exist already; reading the job's pods");
            ctx.pods_written(&uid, PodRead::Consistent);
            return Ok((false, outcome.refusal));
        }
        for rank in outcome.taken {
            // The rank's previous pod still terminates; its deletion triggers the next attempt.
            ctx.await_replacement(&uid, rank);
        }
        let written = write_status(&job, &status, &plan.status, precondition, ctx).await?;
        if !written {
            // The job changed since the cached copy was taken (its status may hold more
            // than nothing).
            info!(job = %names.job, namespace = %names.namespace, "the job changed before its first status write; reading it again");
        }
        Ok::<_, Error>((written, outcome.refusal))
    };
    // Both run to the end: a failed child must not cancel a pod stop or create half-way.
    let (children, pods_and_status) = tokio::join!(children, pods_then_status);
    let (reported, pods_refusal) = pods_and_status?;
    let children_refusal = children?;
    let attempted = children_due || !plan.create.is_empty() || pods_due;
    let refused = pods_refusal.or(children_refusal);
    let newly_refused = refused.is_some() && refusal.is_none();
    if attempted {
        ctx.attempted(&uid, refused);
    }
    if !reported {
        // Plan again from the job and its pods as they are now.
        return Ok(Action::requeue(Duration::ZERO));
    }
    publish(&job, &uid, &plan, ctx);
    follow_rank_zero(&job, &uid, &plan, &pods, ctx);
    if newly_refused {
        // Show the refusal now; the plan that sees it sets the backoff.
        return Ok(Action::requeue(Duration::ZERO));
    }

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

/// Poll rank 0's report while the job runs (its live pod has an IP); stop otherwise.
fn follow_rank_zero(job: &PetlJob, uid: &str, plan: &Plan, pods: &[RankPod], ctx: &Context) {
    let running = !plan.status.is_finished() && !job.spec.suspend;
    let target = pods
        .iter()
        .filter(|p| p.rank == 0 && !p.deleting && matches!(p.state, PodState::Active { .. }))
        .find_map(|p| p.report_addr)
        .filter(|_| running);
    ctx.reports.follow(ObjectRef::from_obj(job), uid, target);
}

/// The job as the API server has it now, or None when it is gone or was recreated.
///
/// The reflector's copy can lag this operator's own last status write (a pod event may
/// trigger the next reconcile before the watch delivers it); planning from that stale status
/// would count the same transition twice and write an older status back. A copy that already
/// carries that write is used as is; otherwise the job is read from the API server.
async fn read_fresh(cached: &PetlJob, names: &Names, ctx: &Context) -> Result<Option<PetlJob>> {
    let uid = cached.uid().unwrap_or_default();
    let written = ctx.status_written(&uid);
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
                reason: StopReason::Deleted,
                removal: Removal::Delete,
                then: AfterStop::LeaveEmpty,
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
        ctx.pods_listed(&uid, PodRead::NotOlderThan(version));
    }
    Ok(pods
        .items
        .iter()
        .filter(|p| owned_by(p, &uid))
        .filter_map(RankPod::from_pod)
        .collect())
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
        ctx.note_status_write(&uid, updated.resource_version());
    }
    Ok(true)
}

/// Publish the plan's events and update metrics.
fn publish(job: &PetlJob, uid: &str, plan: &Plan, ctx: &Context) {
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
