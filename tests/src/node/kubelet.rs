//! The node's kubelet: its configuration for this machine (cgroup v1, cgroupfs, a cgroup root of
//! its own, everything under the node's temp dir) and its start inside the runtime's namespace.

use std::path::{Path, PathBuf};

use crate::binaries::NodeBinaries;
use crate::error::{IoContext, Result};
use crate::node::network::NODE_IP;
use crate::process::{Spawner, Supervised};

/// The cgroup every pod's cgroup lives under, in each hierarchy; removed on teardown.
pub(crate) const CGROUP_ROOT: &str = "petl-node";

/// What the kubelet's configuration needs from the rest of the node.
pub(crate) struct KubeletSetup<'a> {
    pub(crate) dir: &'a Path,
    pub(crate) runtime_endpoint: &'a str,
    pub(crate) client_ca: &'a Path,
    pub(crate) port: u16,
    pub(crate) healthz_port: u16,
}

impl KubeletSetup<'_> {
    pub(crate) fn root_dir(&self) -> PathBuf {
        self.dir.join("kubelet")
    }

    pub(crate) fn pod_logs_dir(&self) -> PathBuf {
        self.dir.join("pod-logs")
    }

    /// The KubeletConfiguration. The choices that matter here:
    /// - `failCgroupV1: false`: this kernel has only cgroup v1 (kubelet >= 1.35 refuses it
    ///   otherwise); `cgroupDriver: cgroupfs` (no systemd), pods under [`CGROUP_ROOT`];
    /// - `failSwapOn: false`, and image garbage collection off, so a shared build machine's
    ///   disk use never evicts the images the tests imported;
    /// - authentication by client certificate (the control plane's CA) and webhook
    ///   authorization, as a real cluster's kubelet, so `kubectl logs/exec` go through RBAC;
    /// - the cluster DNS on the node IP (CoreDNS runs there as a host process), no host
    ///   resolv.conf (pods resolve cluster names only);
    /// - every path (root, pod logs, volume plugins) under the node's temp dir.
    pub(crate) fn config(&self) -> serde_json::Value {
        serde_json::json!({
            "apiVersion": "kubelet.config.k8s.io/v1beta1",
            "kind": "KubeletConfiguration",
            "failCgroupV1": false,
            "cgroupDriver": "cgroupfs",
            "cgroupsPerQOS": true,
            "cgroupRoot": format!("/{CGROUP_ROOT}"),
            "failSwapOn": false,
            "containerRuntimeEndpoint": self.runtime_endpoint,
            "address": NODE_IP.to_string(),
            "port": self.port,
            "readOnlyPort": 0,
            "healthzBindAddress": "127.0.0.1",
            "healthzPort": self.healthz_port,
            "authentication": {
                "anonymous": {"enabled": false},
                "webhook": {"enabled": true},
                "x509": {"clientCAFile": self.client_ca},
            },
            "authorization": {"mode": "Webhook"},
            "clusterDomain": "cluster.local",
            "clusterDNS": [NODE_IP.to_string()],
            "resolvConf": "",
            "podLogsDir": self.pod_logs_dir(),
            "volumePluginDir": self.dir.join("volume-plugins"),
            "imageGCHighThresholdPercent": 100,
            "imageGCLowThresholdPercent": 99,
            "evictionHard": {
                "memory.available": "100Mi",
                "nodefs.available": "1%",
                "imagefs.available": "1%",
                "nodefs.inodesFree": "1%",
            },
            "serializeImagePulls": false,
            "registerNode": true,
            "shutdownGracePeriod": "0s",
        })
    }
}

/// Starts the kubelet in the runtime's mount and PID namespaces (`nsenter --mount --pid`, which
/// forks the kubelet into them): the volumes it mounts for pods must be visible to containerd
/// and vanish with that namespace, and that namespace's `/proc` only describes its own PID
/// namespace (the kubelet reads `/proc/self`). It dies with containerd, PID 1 there.
pub(crate) fn spawn(
    spawner: &Spawner,
    binaries: &NodeBinaries,
    setup: &KubeletSetup<'_>,
    kubeconfig: &Path,
    node_name: &str,
    runtime_pid: u32,
) -> Result<Supervised> {
    let config_path = setup.dir.join("kubelet-config.yaml");
    let yaml = serde_yaml::to_string(&setup.config()).map_err(|e| crate::Error::Io {
        what: "serialising the kubelet configuration".into(),
        source: std::io::Error::other(e),
    })?;
    std::fs::write(&config_path, yaml).context(|| format!("writing {}", config_path.display()))?;
    for dir in [setup.root_dir(), setup.pod_logs_dir()] {
        std::fs::create_dir_all(&dir).context(|| format!("creating {}", dir.display()))?;
    }
    let args = vec![
        format!("--mount=/proc/{runtime_pid}/ns/mnt"),
        format!("--pid=/proc/{runtime_pid}/ns/pid"),
        "--".into(),
        binaries.kubelet.display().to_string(),
        format!("--config={}", config_path.display()),
        format!("--kubeconfig={}", kubeconfig.display()),
        format!("--root-dir={}", setup.root_dir().display()),
        format!("--cert-dir={}", setup.dir.join("kubelet-pki").display()),
        format!("--hostname-override={node_name}"),
        format!("--node-ip={NODE_IP}"),
        "--v=1".into(),
    ];
    spawner.spawn(
        "kubelet",
        Path::new("nsenter"),
        &args,
        &setup.dir.join("kubelet.log"),
    )
}
