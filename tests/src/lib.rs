//! Test harnesses shared by the integration tests: a real local Kubernetes control plane
//! (etcd, kube-apiserver, kube-controller-manager; kubectl and helm), a real node beside it
//! that runs petl's own images (containerd, kubelet, kube-scheduler, kube-proxy, CoreDNS),
//! and a real Prometheus.

pub mod binaries;
pub mod cluster;
pub mod control_plane;
pub mod dashboard;
pub mod e2e;
pub mod error;
pub mod images;
pub mod node;
mod pki;
mod pod_discovery;
pub mod pod_status;
pub mod pods;
mod process;
pub mod prometheus;
pub mod sample_job;

pub use binaries::{
    Binaries, COREDNS_VERSION, HELM_VERSION, KUBERNETES_VERSION, NodeBinaries, cache_dir,
};
pub use cluster::{CLUSTER_CONTROLLERS, Cluster};
pub use control_plane::{
    ControlPlane, ControlPlaneOptions, DEFAULT_CONTROLLERS, EXTERNAL_KUBECONFIG_ENV, repo_root,
};
pub use error::{Error, Result};
pub use images::{IMAGE_BINARIES_ENV, Images, SANDBOX_IMAGE};
pub use node::{HostState, Node, Stopped};
pub use pod_status::{PodStatusUpdate, set_pod_status};
pub use pods::{pod_logs, wait_pod_finished, wait_pod_ready};
pub use prometheus::{PodScrape, Prometheus, Sample};
pub use sample_job::sample_job;
