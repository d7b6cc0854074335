//! The PetlJob operator: reconciles PetlJobs into worker Pods, a headless Service, a ConfigMap
//! and a token Secret, and reports their lifecycle in status, events and Prometheus metrics.

pub mod config;
pub mod context;
pub mod controller;
pub mod leader;
pub mod metrics;
pub mod reconcile;
pub mod report;
pub mod runtime;
pub mod server;
pub mod telemetry;

#[cfg(test)]
mod fixtures;

pub use config::{Config, LogFormat};
pub use runtime::Operator;

/// The field manager of every server-side apply the operator makes.
pub const FIELD_MANAGER: &str = "petl-operator";

/// The finalizer that lets the operator stop a job's workers before the PetlJob goes away.
pub const JOB_FINALIZER: &str = "petl.dev/cleanup";

/// Everything that can make a reconcile or the operator fail. Variant names double as the
/// `error` label of `petl_operator_reconcile_errors_total`.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A request to the API server failed.
    #[error("Kubernetes API request failed: {0}")]
    KubeError(#[source] kube::Error),

    /// Adding or removing the finalizer, or the apply/cleanup inside it, failed.
    #[error("finalizer: {0}")]
    FinalizerError(#[source] Box<kube::runtime::finalizer::Error<Error>>),

    /// The job could not be rendered into the trainer's config file.
    #[error("cannot render the job config for the trainer: {0}")]
    SerializationError(#[source] serde_yaml::Error),

    /// The PetlJob cannot be run as written; the message names the field and the fix.
    #[error("{field}: {message}")]
    IllegalJob {
        /// The spec field at fault, e.g. `spec.workers.image`.
        field: &'static str,
        /// What is wrong and how to fix it.
        message: String,
    },

    /// The PetlJob CRD is not installed (or not readable with this identity).
    #[error(
        "cannot list PetlJobs ({0}); install the CRD first (kubectl apply -f charts/petl-operator/crds/) and check the operator's RBAC"
    )]
    CrdNotInstalled(#[source] kube::Error),

    /// Leader election on the coordination.k8s.io Lease failed.
    #[error("leader election on Lease {lease}: {source}")]
    LeaseError {
        /// namespace/name of the Lease.
        lease: String,
        /// What the lease manager reported.
        #[source]
        source: kube_lease_manager::LeaseManagerError,
    },

    /// The metrics/health HTTP server could not start.
    #[error("cannot serve metrics on {addr}: {source}; pick another --metrics-addr")]
    ServerError {
        /// The address from --metrics-addr.
        addr: String,
        /// The socket error.
        #[source]
        source: std::io::Error,
    },

    /// No Kubernetes client could be configured (no kubeconfig and not in a cluster).
    #[error("cannot configure a Kubernetes client: {0}; set KUBECONFIG or run inside a cluster")]
    ClientConfigError(#[source] kube::Error),
}

/// Results whose error is [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// The `error` metric label: the variant name, lower-cased, with the innermost cause of a
    /// finalizer error so an apply failure is told apart from a finalizer patch failure.
    pub fn metric_label(&self) -> String {
        use kube::runtime::finalizer::Error as Fin;
        match self {
            Error::KubeError(_) => "kubeerror".into(),
            Error::FinalizerError(inner) => match inner.as_ref() {
                Fin::ApplyFailed(e) => format!("finalizererror(applyfailed({}))", e.metric_label()),
                Fin::CleanupFailed(e) => {
                    format!("finalizererror(cleanupfailed({}))", e.metric_label())
                }
                Fin::AddFinalizer(_) => "finalizererror(addfinalizer)".into(),
                Fin::RemoveFinalizer(_) => "finalizererror(removefinalizer)".into(),
                Fin::UnnamedObject => "finalizererror(unnamedobject)".into(),
                Fin::InvalidFinalizer => "finalizererror(invalidfinalizer)".into(),
            },
            Error::SerializationError(_) => "serializationerror".into(),
            Error::IllegalJob { .. } => "illegaljob".into(),
            Error::CrdNotInstalled(_) => "crdnotinstalled".into(),
            Error::LeaseError { .. } => "leaseerror".into(),
            Error::ServerError { .. } => "servererror".into(),
            Error::ClientConfigError(_) => "clientconfigerror".into(),
        }
    }
}

impl From<kube::Error> for Error {
    fn from(e: kube::Error) -> Self {
        Error::KubeError(e)
    }
}
