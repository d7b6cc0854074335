//! The operator's command-line flags (each also readable from an environment variable).
//! The same struct configures the binary and the in-process operator that tests start.

use std::net::SocketAddr;
use std::time::Duration;

/// How log lines are written.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object a line, for log collectors.
    Json,
}

/// Flags of `petl-operator`.
#[derive(clap::Parser, Clone, Debug)]
#[command(
    name = "petl-operator",
    version,
    about = "Runs PetlJobs: worker pods, recovery, status, metrics"
)]
pub struct Config {
    /// Take part in leader election on a coordination.k8s.io Lease; only the holder reconciles.
    #[arg(long, env = "PETL_LEADER_ELECT")]
    pub leader_elect: bool,

    /// Where /metrics, /healthz and /readyz are served (port 0 picks a free port).
    #[arg(long, env = "PETL_METRICS_ADDR", default_value = "0.0.0.0:8080")]
    pub metrics_addr: SocketAddr,

    /// Log line format.
    #[arg(long, env = "PETL_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// Watch PetlJobs in this namespace only (default: all namespaces).
    #[arg(long, env = "PETL_WATCH_NAMESPACE")]
    pub namespace: Option<String>,

    /// Namespace of the leader-election Lease (in a cluster: the operator's own namespace).
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    pub lease_namespace: String,

    /// Name of the leader-election Lease.
    #[arg(long, env = "PETL_LEASE_NAME", default_value = "petl-operator")]
    pub lease_name: String,

    /// How long a lease is held without renewal before another replica may take it.
    #[arg(long, env = "PETL_LEASE_DURATION_SECONDS", default_value_t = 15)]
    pub lease_duration_seconds: u64,

    /// How long before expiry the holder renews (must be below --lease-duration-seconds).
    #[arg(long, env = "PETL_LEASE_RENEW_GRACE_SECONDS", default_value_t = 5)]
    pub lease_renew_grace_seconds: u64,

    /// This replica's identity in the Lease (default: the pod name, or host name plus a random suffix).
    #[arg(long, env = "POD_NAME")]
    pub identity: Option<String>,

    /// Worker image for jobs that do not set spec.workers.image (trainer and snapshot agent).
    #[arg(long, env = "PETL_TRAINER_IMAGE")]
    pub trainer_image: Option<String>,

    /// Trainer image for jobs that ask for nvidia.com/gpu and do not set spec.workers.image
    /// (their snapshot agent keeps --trainer-image).
    #[arg(long, env = "PETL_TRAINER_CUDA_IMAGE")]
    pub trainer_cuda_image: Option<String>,

    /// Port of the trainer's /metrics and /report in worker pods (the container port `metrics`).
    #[arg(long, env = "PETL_WORKER_METRICS_PORT", default_value_t = crate::reconcile::pod::TRAINER_METRICS_PORT)]
    pub worker_metrics_port: u16,

    /// Reconciles running at once (0 = unbounded); one job is never reconciled twice at once.
    #[arg(long, env = "PETL_CONCURRENCY", default_value_t = 16)]
    pub concurrency: u16,
}

impl Config {
    /// Defaults for an operator started inside a test or bench: loopback metrics on a free port,
    /// no leader election, text logs.
    pub fn local() -> Self {
        Self {
            leader_elect: false,
            metrics_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            log_format: LogFormat::Text,
            namespace: None,
            lease_namespace: "default".into(),
            lease_name: "petl-operator".into(),
            lease_duration_seconds: 15,
            lease_renew_grace_seconds: 5,
            identity: None,
            trainer_image: None,
            trainer_cuda_image: None,
            worker_metrics_port: crate::reconcile::pod::TRAINER_METRICS_PORT,
            concurrency: 16,
        }
    }

    /// The lease duration as a [`Duration`].
    pub fn lease_duration(&self) -> Duration {
        Duration::from_secs(self.lease_duration_seconds)
    }
}
