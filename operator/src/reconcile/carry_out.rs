//! Carrying a plan out against the API server: pods labelled, deleted and created, restarts
//! recorded as counted, the ConfigMap, Service and Secret applied, and refusals classified.

use either::Either;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret, Service};
use kube::api::{DeleteParams, Patch, PatchParams, PostParams, Preconditions};
use kube::{Api, ResourceExt};
use petl_crds::PetlJob;
use serde_json::json;

use super::children::{self, Names};
use super::plan::{CountRestarts, Plan, Refusal, RefusalKind, Stop};
use super::pod;
use super::pod_read::PodRead;
use super::ranks::{RankPod, STOPPED_LABEL, counted_restarts_annotation};
use crate::context::Context;
use crate::{Error, FIELD_MANAGER, Result};

/// What carrying out the plan's pod changes met.
pub struct PodOutcome {
    /// Ranks whose pod name was still taken by the rank's previous (terminating) pod.
    pub taken: Vec<i32>,
    /// The first refusal met, if any.
    pub refusal: Option<Refusal>,
}

/// Record counted restarts, stop the pods the plan stops, then create the ranks it creates and
/// the replacements whose predecessor is gone.
pub async fn carry_out_pods(
    plan: &Plan,
    pods: &[RankPod],
    first: bool,
    job: &PetlJob,
    names: &Names,
    api: &Api<Pod>,
    ctx: &Context,
) -> Result<PodOutcome> {
    let uid = job.uid().unwrap_or_default();
    let written = |read| ctx.pods_written(&uid, read);
    futures::future::try_join_all(
        plan.count_restarts
            .iter()
            .map(|count| count_restarts(api, count, &written)),
    )
    .await?;
    let mut replace_now = Vec::new();
    for stop in &plan.stop {
        let pod = pods.iter().find(|p| p.uid == stop.uid);
        let already_marked = pod.is_some_and(|p| p.stopped_by_operator);
        let gone = stop_pod(api, stop, already_marked, &written).await?;
        if stop.replaces() {
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
        let created = create_pod(job, names, rank, ctx, api, uid).await?;
        Ok::<_, Error>((rank, created))
    }))
    .await?;
    let mut outcome = PodOutcome {
        taken: Vec::new(),
        refusal: None,
    };
    for (rank, created) in created {
        match created {
            Created::Yes => {}
            Created::Refused(refusal) => {
                outcome.refusal = outcome.refusal.or(Some(refusal));
            }
            // Not ours: this job has no pod of the rank at all, yet the name is held.
            Created::Taken if !first && !pods.iter().any(|p| p.rank == rank) => {
                let refusal = Refusal {
                    what: format!("the pod {} of rank {rank}", names.pod(rank)),
                    kind: RefusalKind::NameTaken,
                    message: "a pod of that name exists that this PetlJob does not own; delete it"
                        .into(),
                    attempts: 1,
                };
                outcome.refusal = outcome.refusal.or(Some(refusal));
            }
            Created::Taken => outcome.taken.push(rank),
        }
    }
    Ok(outcome)
}

/// Server-side apply the ConfigMap and Service; create the token Secret once. Returns the
/// refusal that waiting or only a new job can cure; other failures are errors (retried soon).
pub async fn ensure_children(
    job: &PetlJob,
    names: &Names,
    ctx: &Context,
) -> Result<Option<Refusal>> {
    let cm = match children::config_map(job, names) {
        Ok(cm) => cm,
        Err(e) => return Ok(Some(unrunnable(names, &e))),
    };
    let service = children::service(job, names);
    let secret = children::secret(job, names);
    let client = &ctx.client;
    let params = PatchParams::apply(FIELD_MANAGER).force();
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &names.namespace);
    let svcs: Api<Service> = Api::namespaced(client.clone(), &names.namespace);
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &names.namespace);
    let post = PostParams {
        field_manager: Some(FIELD_MANAGER.into()),
        ..PostParams::default()
    };
    let (cm_patch, service_patch) = (Patch::Apply(&cm), Patch::Apply(&service));
    let (config_map_name, service_name) = (names.config_map(), names.service());
    let apply_config_map = async {
        let result = cms.patch(&config_map_name, &params, &cm_patch).await;
        refused(result, || format!("the ConfigMap {config_map_name}"))
    };
    let apply_service = async {
        let result = svcs.patch(&service_name, &params, &service_patch).await;
        refused(result, || format!("the Service {service_name}"))
    };
    // Created once: a conflict means it exists, and its token must not change under the pods.
    let create_secret = async {
        match secrets.create(&post, &secret).await {
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(None),
            result => refused(result, || format!("the Secret {}", names.secret())),
        }
    };
    let (a, b, c) = tokio::join!(apply_config_map, apply_service, create_secret);
    Ok(a?.or(b?).or(c?))
}

/// Ok(None) when the request went through; the refusal when the API server refused it for a
/// reason that is not transient; the error otherwise.
fn refused<T>(
    result: std::result::Result<T, kube::Error>,
    what: impl FnOnce() -> String,
) -> Result<Option<Refusal>> {
    match result {
        Ok(_) => Ok(None),
        Err(e) => match refusal_of(&e, what) {
            Some(refusal) => Ok(Some(refusal)),
            None => Err(e.into()),
        },
    }
}

/// How the API server refused a request, by status code: 400 and 422 are an invalid object,
/// 403 an admission check (ServiceAccount, PriorityClass, quota, policy) the cluster may yet
/// satisfy. Other failures (409, 5xx, the network) are not refusals.
fn refusal_of(error: &kube::Error, what: impl FnOnce() -> String) -> Option<Refusal> {
    let kube::Error::Api(status) = error else {
        return None;
    };
    let kind = match status.code {
        400 | 422 => RefusalKind::Invalid,
        403 => RefusalKind::Forbidden,
        _ => return None,
    };
    Some(Refusal {
        what: what(),
        kind,
        message: status.message.clone(),
        attempts: 1,
    })
}

fn unrunnable(names: &Names, error: &Error) -> Refusal {
    Refusal {
        what: format!("the PetlJob {}", names.job),
        kind: RefusalKind::Unrunnable,
        message: error.to_string(),
        attempts: 1,
    }
}

/// Record a container's restarts in place as counted (an annotation on its pod).
async fn count_restarts(
    api: &Api<Pod>,
    count: &CountRestarts,
    written: &impl Fn(PodRead),
) -> Result<()> {
    let annotation = counted_restarts_annotation(count.container);
    // The UID in the patch is a precondition: a replacement under the same name is left alone.
    let patch = json!({"metadata": {
        "uid": count.uid,
        "annotations": { annotation: count.restarts.to_string() },
    }});
    match api
        .patch(&count.name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
    {
        Ok(pod) => {
            written(version_of(&pod));
            Ok(())
        }
        Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Label the pod with why it is stopped (the accounting mark), then delete it. Returns
/// whether the pod is gone.
pub async fn stop_pod(
    api: &Api<Pod>,
    stop: &Stop,
    already_marked: bool,
    written: impl Fn(PodRead),
) -> Result<bool> {
    if !already_marked {
        let mark = json!({"metadata": {"labels": {STOPPED_LABEL: stop.reason.label()}}});
        match api
            .patch(&stop.name, &PatchParams::default(), &Patch::Merge(&mark))
            .await
        {
            Ok(pod) => written(version_of(&pod)),
            Err(kube::Error::Api(e)) if e.code == 404 => return Ok(true),
            Err(e) => return Err(e.into()),
        }
    }
    if !stop.deletes() {
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

/// What a pod create came to.
enum Created {
    /// The pod exists now.
    Yes,
    /// The name is taken.
    Taken,
    /// The pod could not be rendered, or the API server refused it.
    Refused(Refusal),
}

/// Create the pod of `rank`.
async fn create_pod(
    job: &PetlJob,
    names: &Names,
    rank: i32,
    ctx: &Context,
    api: &Api<Pod>,
    uid: &str,
) -> Result<Created> {
    let pod = match pod::pod(job, names, rank, &ctx.defaults) {
        Ok(pod) => pod,
        Err(e) => return Ok(Created::Refused(unrunnable(names, &e))),
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
            Ok(Created::Yes)
        }
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(Created::Taken),
        Err(e) => match refusal_of(&e, || format!("the pod of rank {rank}")) {
            Some(refusal) => Ok(Created::Refused(refusal)),
            None => Err(e.into()),
        },
    }
}

fn version_of(pod: &Pod) -> PodRead {
    pod.resource_version()
        .map_or(PodRead::Consistent, PodRead::NotOlderThan)
}

/// Whether `pod` is controlled by the job with UID `uid`.
pub fn owned_by(pod: &Pod, uid: &str) -> bool {
    pod.owner_references()
        .iter()
        .any(|o| o.uid == uid && o.controller == Some(true))
}
