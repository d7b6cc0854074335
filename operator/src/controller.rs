//! The kube-runtime Controller over PetlJobs: watches (PetlJobs filtered by generation, their
//! pods, ConfigMaps and Services by label), the finalizer-wrapped reconcile, and the error policy.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures::{FutureExt, StreamExt};
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Service};
use kube::api::PartialObjectMeta;
use kube::runtime::controller::{self, Action, Controller};
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::runtime::reflector::Store;
use kube::runtime::{PredicateConfig, WatchStreamExt, predicates, reflector, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use petl_crds::PetlJob;
use tracing::{debug, info, instrument, warn};

use crate::context::{ChildStores, Context};
use crate::reconcile::{self, ranks::JOB_LABEL};
use crate::{Error, JOB_FINALIZER, Result};

/// Reconcile one PetlJob: the whole body runs inside the finalizer helper, so a deleted job
/// goes through [`reconcile::cleanup`] before it disappears.
#[instrument(skip(job, ctx), fields(job = %job.name_any(), namespace = job.namespace().unwrap_or_default()))]
pub async fn reconcile(job: Arc<PetlJob>, ctx: Arc<Context>) -> Result<Action> {
    let _timer = ctx.metrics.count_and_measure();
    if !job.spec.is_managed_by_petl() {
        debug!(managed_by = ?job.spec.managed_by, "managed by another controller; skipped");
        return Ok(Action::await_change());
    }
    let namespace = job.namespace().unwrap_or_else(|| "default".into());
    let api: Api<PetlJob> = Api::namespaced(ctx.client.clone(), &namespace);
    finalizer(&api, JOB_FINALIZER, job, |event| async {
        match event {
            Finalizer::Apply(job) => reconcile::apply(job, &ctx).await,
            Finalizer::Cleanup(job) => reconcile::cleanup(job, &ctx).await,
        }
    })
    .await
    .map_err(|e| Error::FinalizerError(Box::new(e)))
}

/// Count the failure and retry: soon for API errors, slowly for a job that cannot run as written.
pub fn error_policy(job: Arc<PetlJob>, error: &Error, ctx: Arc<Context>) -> Action {
    warn!(job = %job.name_any(), namespace = job.namespace().unwrap_or_default(), error = %error, "reconcile failed");
    ctx.metrics.reconcile_failed(error);
    let illegal = matches!(error, Error::FinalizerError(e) if matches!(e.as_ref(), kube::runtime::finalizer::Error::ApplyFailed(Error::IllegalJob { .. })));
    Action::requeue(if illegal {
        Duration::from_secs(60)
    } else {
        Duration::from_secs(5)
    })
}

/// What re-triggers a PetlJob reconcile: a new generation (spec edits, deletion), finalizer
/// changes or the deletion mark. Status writes, ours included, do not.
fn job_trigger(job: &PetlJob) -> Option<u64> {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    predicates::generation(job).hash(&mut h);
    predicates::finalizers(job).hash(&mut h);
    job.meta().deletion_timestamp.is_some().hash(&mut h);
    Some(h.finish())
}

/// Run the controller until `shutdown` resolves; in-flight reconciles finish first.
pub async fn run(ctx: Arc<Context>, shutdown: impl Future<Output = ()> + Send + Sync + 'static) {
    let client = ctx.client.clone();
    let jobs: Api<PetlJob> = scoped(&client, &ctx.config.namespace);
    let owned = || watcher::Config::default().labels(JOB_LABEL).any_semantic();
    let (config_maps, config_map_stream) =
        child_watch::<ConfigMap>(scoped(&client, &ctx.config.namespace), owned());
    // Pods are read fresh by each reconcile; their watch only triggers.
    let pods: Api<PartialObjectMeta<Pod>> = scoped(&client, &ctx.config.namespace);
    let (services, service_stream) =
        child_watch::<Service>(scoped(&client, &ctx.config.namespace), owned());
    ctx.set_child_stores(ChildStores {
        config_maps: Some(config_maps),
        services: Some(services),
    });
    // Rank 0's reports ask for reconciles of their jobs when they change.
    let reports = ctx.reports.triggers();
    let (reader, writer) = reflector::store();
    // PetlJobs are listed consistently (from etcd, not a possibly older API server cache): a
    // job's first reconcile trusts a cached copy without status to mean no operator reported.
    let job_stream = watcher(jobs, watcher::Config::default())
        .default_backoff()
        .modify(|job| job.managed_fields_mut().clear())
        .reflect(writer)
        .applied_objects()
        .predicate_filter(job_trigger, PredicateConfig::default());
    let config = controller::Config::default().concurrency(ctx.config.concurrency);
    info!(namespace = ?ctx.config.namespace, "starting the PetlJob controller");
    let shutdown = shutdown.boxed().shared();
    let store = reader.clone();
    // A graceful shutdown stops polling the PetlJob watch; if that comes before the store's
    // first list, the runner waits for readiness forever. No reconcile has run then (the
    // runner holds them until the store is ready), so dropping the controller is safe.
    let abandon_unstarted = {
        let shutdown = shutdown.clone();
        async move {
            shutdown.await;
            if store.wait_until_ready().now_or_never().is_some() {
                std::future::pending::<()>().await;
            }
        }
    };
    let controller = Controller::for_stream(job_stream, reader)
        .owns(pods, owned())
        // Deleting a ConfigMap or Service by hand re-triggers its job, which recreates it.
        .owns_stream(config_map_stream)
        .owns_stream(service_stream)
        .reconcile_on(reports)
        .with_config(config)
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx.clone())
        .for_each(|result| async move {
            if let Err(e) = result {
                debug!(error = %e, "controller event");
            }
        });
    tokio::select! {
        _ = controller => {}
        _ = abandon_unstarted => debug!("stopped before the first PetlJob list"),
    }
    ctx.set_child_stores(ChildStores::default());
    ctx.reports.stop_all();
    info!("the PetlJob controller stopped");
}

fn scoped<K>(client: &Client, namespace: &Option<String>) -> Api<K>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>,
{
    match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

/// A metadata-only watch of one kind of owned child, cached in a store the reconcile reads.
fn child_watch<K>(
    api: Api<PartialObjectMeta<K>>,
    config: watcher::Config,
) -> (
    Store<PartialObjectMeta<K>>,
    impl futures::Stream<Item = Result<PartialObjectMeta<K>, watcher::Error>> + Send + 'static,
)
where
    K: Resource<DynamicType = ()> + Clone + Send + Sync + std::fmt::Debug + 'static,
{
    let (reader, writer) = reflector::store();
    // An Api of PartialObjectMeta lists and watches metadata only.
    let stream = watcher(api, config)
        .default_backoff()
        .modify(|o| o.managed_fields_mut().clear())
        .reflect(writer)
        .touched_objects();
    (reader, stream)
}
