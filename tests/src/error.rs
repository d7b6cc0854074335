//! The one error type of the test harnesses.
//! Each variant names what failed and, where it helps, what to do about it.

use std::path::PathBuf;

/// Everything that can go wrong while starting or driving a test harness.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("setup script {script} failed ({status}); run it by hand to see why: bash {script}")]
    Setup { script: PathBuf, status: String },
    #[error("certificate generation failed: {0}")]
    Certificate(#[from] rcgen::Error),
    #[error("{component} did not become ready within {seconds}s; last log lines:\n{log_tail}")]
    NotReady {
        component: String,
        seconds: u64,
        log_tail: String,
    },
    #[error("{component} exited during startup ({status}); last log lines:\n{log_tail}")]
    Exited {
        component: String,
        status: String,
        log_tail: String,
    },
    #[error("kubeconfig {path}: {message}")]
    Kubeconfig { path: PathBuf, message: String },
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("waiting on the Kubernetes API: {0}")]
    Wait(#[from] kube::runtime::wait::Error),
    #[error("{file}: not valid YAML for a CustomResourceDefinition: {source}")]
    CrdYaml {
        file: PathBuf,
        #[source]
        source: serde_yaml::Error,
    },
    #[error("{what} did not happen within {seconds}s")]
    Timeout { what: String, seconds: u64 },
    #[error("{command} failed ({status}): {stderr}")]
    Command {
        command: String,
        status: String,
        stderr: String,
    },
    #[error("cannot set the status of pod {pod}: {message}")]
    PodStatus { pod: String, message: String },
    #[error("node: {message}")]
    Node { message: String },
    #[error("petl images: {message}")]
    Image { message: String },
    #[error("pod {namespace}/{pod}: {message}")]
    Pod {
        namespace: String,
        pod: String,
        message: String,
    },
    #[error("PetlJob {namespace}/{job}: {message}")]
    Job {
        namespace: String,
        job: String,
        message: String,
    },
    #[error("Prometheus HTTP API: {0}")]
    Http(#[from] reqwest::Error),
    #[error("Prometheus query {query:?} failed: {message}")]
    Query { query: String, message: String },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Attaches a description of the failed step to an I/O error.
pub(crate) trait IoContext<T> {
    fn context(self, what: impl FnOnce() -> String) -> Result<T>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn context(self, what: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|source| Error::Io {
            what: what(),
            source,
        })
    }
}
