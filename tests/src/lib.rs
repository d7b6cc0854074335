//! Test harnesses shared by the integration tests: a real local Kubernetes control plane
//! (etcd, kube-apiserver, kube-controller-manager; kubectl and helm) and a real Prometheus.

pub mod binaries;
pub mod control_plane;
pub mod error;
mod pki;
pub mod pod_status;
mod process;
pub mod prometheus;
pub mod sample_job;

pub use binaries::{Binaries, HELM_VERSION, KUBERNETES_VERSION, cache_dir};
pub use control_plane::{
    ControlPlane, ControlPlaneOptions, DEFAULT_CONTROLLERS, EXTERNAL_KUBECONFIG_ENV, repo_root,
};
pub use error::{Error, Result};
pub use pod_status::{PodStatusUpdate, set_pod_status};
pub use prometheus::{Prometheus, Sample};
pub use sample_job::sample_job;
