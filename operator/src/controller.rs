//! The kube-runtime Controller over PetlJobs: watches (PetlJobs filtered by generation, their
//! pods by label), the finalizer-wrapped reconcile, and the error policy.

use std::collections::{BTreeSet, HashMap};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{FutureExt, StreamExt};
use k8s_openapi::api::core::v1::Pod;
use kube::api::PartialObjectMeta;
use kube::runtime::controller::{self, Action, Controller};
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::runtime::{PredicateConfig, WatchStreamExt, predicates, reflector, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use petl_crds::PetlJob;
use tracing::{debug, info, instrument, warn};

use crate::metrics::Metrics;
use crate::reconcile::{self, ranks::JOB_LABEL};
use crate::{Config, Error, JOB_FINALIZER, Result};

/// What every reconcile gets.
pub struct Context {
    /// API client.
    pub client: Client,
    /// Publishes events on PetlJobs.
    pub recorder: Recorder,
    /// Operator metrics.
    pub metrics: Arc<Metrics>,
    /// The operator's flags.
    pub config: Config,
    /// Per job UID, ranks whose pod the operator stopped and has not replaced yet.
    pub(crate) awaiting: Mutex<HashMap<String, BTreeSet<i32>>>,
}

impl Context {
    /// A context reporting events as `petl-operator` (instance: the pod name when known).
    pub fn new(client: Client, config: Config, metrics: Arc<Metrics>) -> Self {
        let reporter = Reporter {
            controller: crate::FIELD_MANAGER.into(),
            instance: config.identity.clone(),
        };
        Self {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            metrics,
            config,
            awaiting: Mutex::new(HashMap::new()),
        }
    }
}

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
    let (jobs, pods): (Api<PetlJob>, Api<PartialObjectMeta<Pod>>) = match &ctx.config.namespace {
        Some(ns) => (
            Api::namespaced(client.clone(), ns),
            Api::namespaced(client, ns),
        ),
        None => (Api::all(client.clone()), Api::all(client)),
    };
    let (reader, writer) = reflector::store();
    let job_stream = watcher(jobs, watcher::Config::default().any_semantic())
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
        // Metadata-only pod watch: it only triggers reconciles, which read pods fresh.
        .owns(
            pods,
            watcher::Config::default().labels(JOB_LABEL).any_semantic(),
        )
        .with_config(config)
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx)
        .for_each(|result| async move {
            if let Err(e) = result {
                debug!(error = %e, "controller event");
            }
        });
    tokio::select! {
        _ = controller => {}
        _ = abandon_unstarted => debug!("stopped before the first PetlJob list"),
    }
    info!("the PetlJob controller stopped");
}
