//! What every reconcile shares: the client, recorder, metrics and flags, the caches of owned
//! children, rank 0's reports, and what the operator remembers of each job between reconciles.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex, RwLock};

use k8s_openapi::api::core::v1::{ConfigMap, Service};
use kube::api::PartialObjectMeta;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Client, Resource, ResourceExt};
use petl_crds::PetlJob;
use tracing::warn;

use crate::Config;
use crate::metrics::Metrics;
use crate::reconcile::plan::Refusal;
use crate::reconcile::pod::WorkerDefaults;
use crate::reconcile::pod_read::PodRead;
use crate::reconcile::ranks::RankPod;
use crate::report::Reports;

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
    /// What the flags decide for every worker pod.
    pub defaults: WorkerDefaults,
    /// Rank 0's reports of the running jobs.
    pub reports: Reports,
    /// What this operator remembers of each job between reconciles, by job UID.
    jobs: Mutex<HashMap<String, JobMemory>>,
    /// The ConfigMaps and Services the current leadership term watches.
    children: RwLock<ChildStores>,
}

/// Metadata caches of the ConfigMaps and Services PetlJobs own, so a reconcile can tell that
/// one was deleted by hand without asking the API server on every reconcile.
#[derive(Clone, Default)]
pub struct ChildStores {
    /// Owned ConfigMaps.
    pub config_maps: Option<Store<PartialObjectMeta<ConfigMap>>>,
    /// Owned Services.
    pub services: Option<Store<PartialObjectMeta<Service>>>,
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
    /// The last attempt's refusal, while the refusals go on.
    refusal: Option<Refusal>,
}

impl JobMemory {
    /// Nothing remembered: this operator has not written anything of the job.
    fn is_blank(&self) -> bool {
        self.awaiting.is_empty() && self.status_version.is_none() && self.pod_read.is_none()
    }
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
            reports: Reports::new(metrics.clone()),
            metrics,
            defaults: WorkerDefaults::of(&config),
            config,
            jobs: Mutex::new(HashMap::new()),
            children: RwLock::new(ChildStores::default()),
        }
    }

    /// Use these caches of owned children (or none, when the controller stops).
    pub fn set_child_stores(&self, stores: ChildStores) {
        *self.children.write().unwrap_or_else(|e| e.into_inner()) = stores;
    }

    /// Whether the job's ConfigMap or Service is missing from the watch caches. Before the
    /// caches have listed once (or right after this operator created them) this says missing,
    /// which only costs an idempotent server-side apply.
    pub fn children_missing(&self, namespace: &str, config_map: &str, service: &str) -> bool {
        let stores = self
            .children
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        !cached(&stores.config_maps, namespace, config_map)
            || !cached(&stores.services, namespace, service)
    }

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

    /// Run `f` on what this operator remembers of job `uid` (created empty on first use).
    fn with_job<R>(&self, uid: &str, f: impl FnOnce(&mut JobMemory) -> R) -> R {
        let mut jobs = self.jobs.lock().unwrap_or_else(|p| p.into_inner());
        f(jobs.entry(uid.to_string()).or_default())
    }

    /// Ranks stopped by the operator and not yet replaced: those in memory plus those whose
    /// labelled pod is still terminating (which survives an operator restart).
    pub fn awaiting_ranks(&self, uid: &str, pods: &[RankPod]) -> BTreeSet<i32> {
        let mut ranks = self.with_job(uid, |m| m.awaiting.clone());
        ranks.extend(
            pods.iter()
                .filter(|p| p.deleting && p.stopped_by_operator)
                .map(|p| p.rank),
        );
        ranks
    }

    /// `rank`'s pod was stopped; its replacement is due once the pod is gone.
    pub fn await_replacement(&self, uid: &str, rank: i32) {
        self.with_job(uid, |m| m.awaiting.insert(rank));
    }

    /// `rank` has its replacement.
    pub fn replaced(&self, uid: &str, rank: i32) {
        self.with_job(uid, |m| m.awaiting.remove(&rank));
    }

    /// Whether `job` can be reconciled without reading it or its pods: it has no status (no
    /// operator has reported on it), it is to run, and this operator has written nothing of it.
    pub fn first_look(&self, job: &PetlJob) -> bool {
        job.status.is_none()
            && !job.spec.suspend
            && self.with_job(&job.uid().unwrap_or_default(), |m| m.is_blank())
    }

    /// How fresh the next list of `job`'s pods must be.
    pub fn pod_read(&self, job: &PetlJob) -> PodRead {
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

    /// A list of `uid`'s pods saw them at `read`: the next list need not be older.
    pub fn pods_listed(&self, uid: &str, read: PodRead) {
        self.with_job(uid, |m| m.pod_read = Some(read));
    }

    /// Note a write to `uid`'s pods, so the next list sees it.
    pub fn pods_written(&self, uid: &str, read: PodRead) {
        self.with_job(uid, |m| {
            m.pod_read = Some(match m.pod_read.take() {
                Some(previous) => previous.newer(read),
                None => read,
            });
        });
    }

    /// The resourceVersion of this operator's last status write of `uid`.
    pub fn status_written(&self, uid: &str) -> Option<String> {
        self.with_job(uid, |m| m.status_version.clone())
    }

    /// This operator wrote `uid`'s status, which is now at `version`.
    pub fn note_status_write(&self, uid: &str, version: Option<String>) {
        self.with_job(uid, |m| m.status_version = version);
    }

    /// The refusal of the last attempt to create `uid`'s objects, while they go on.
    pub fn refusal(&self, uid: &str) -> Option<Refusal> {
        self.with_job(uid, |m| m.refusal.clone())
    }

    /// What the last attempt to create `uid`'s objects met: a refusal (counted in a row with
    /// the ones before) or success (`None`, which ends the row).
    pub fn attempted(&self, uid: &str, refusal: Option<Refusal>) {
        self.with_job(uid, |m| {
            m.refusal = refusal.map(|mut r| {
                r.attempts = m.refusal.as_ref().map_or(0, |p| p.attempts) + 1;
                r
            });
        });
    }

    /// Forget job `uid` (it is being deleted).
    pub fn forget(&self, uid: &str) {
        self.jobs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(uid);
        self.reports.forget(uid);
        self.metrics.forget_job(uid);
    }
}

fn cached<K>(store: &Option<Store<PartialObjectMeta<K>>>, namespace: &str, name: &str) -> bool
where
    K: Resource<DynamicType = ()> + Clone,
{
    store
        .as_ref()
        .is_some_and(|s| s.get(&ObjectRef::new(name).within(namespace)).is_some())
}
