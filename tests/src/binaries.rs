//! Where the control-plane binaries live, and building them on first use.
//! The build itself is `scripts/setup/k8s.sh`; this module only finds or runs it.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::error::{Error, IoContext, Result};

/// Kubernetes release the harness runs; must match `K8S_VERSION` in `scripts/setup/k8s.sh`.
pub const KUBERNETES_VERSION: &str = "1.36.3";
/// Helm release; must match `HELM_VERSION` in `scripts/setup/k8s.sh`.
pub const HELM_VERSION: &str = "3.22.0";

/// Root of every cache the project keeps: `$PETL_CACHE_DIR`, else `~/.cache/petl`.
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("PETL_CACHE_DIR") {
        return PathBuf::from(dir);
    }
    let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("/root"), PathBuf::from);
    home.join(".cache/petl")
}

/// The setup script that builds the binaries, found from this crate's source tree.
pub fn setup_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/setup/k8s.sh")
}

/// Absolute paths of the executables the harness runs.
#[derive(Debug, Clone)]
pub struct Binaries {
    pub etcd: PathBuf,
    pub kube_apiserver: PathBuf,
    pub kube_controller_manager: PathBuf,
    pub kubectl: PathBuf,
    pub helm: PathBuf,
}

impl Binaries {
    /// Where `scripts/setup/k8s.sh` puts them (they may not exist yet).
    pub fn cached() -> Self {
        let k8s = cache_dir().join(format!("k8s-v{KUBERNETES_VERSION}/bin"));
        let helm = cache_dir().join(format!("helm-v{HELM_VERSION}/bin"));
        Self {
            etcd: k8s.join("etcd"),
            kube_apiserver: k8s.join("kube-apiserver"),
            kube_controller_manager: k8s.join("kube-controller-manager"),
            kubectl: k8s.join("kubectl"),
            helm: helm.join("helm"),
        }
    }

    fn all(&self) -> [&Path; 5] {
        [
            &self.etcd,
            &self.kube_apiserver,
            &self.kube_controller_manager,
            &self.kubectl,
            &self.helm,
        ]
    }

    pub fn missing(&self) -> Vec<&Path> {
        self.all().into_iter().filter(|p| !p.is_file()).collect()
    }

    /// The cached binaries, building them first when any is missing. The script
    /// takes a file lock, so test binaries that start at once build only once.
    /// Blocking: a cold build takes tens of minutes on two cores.
    pub fn ensure() -> Result<Self> {
        let binaries = Self::cached();
        if binaries.missing().is_empty() {
            return Ok(binaries);
        }
        run_setup(
            "control-plane binaries",
            setup_script(),
            binaries.missing().iter().map(|p| p.to_path_buf()).collect(),
            || binaries.missing().is_empty(),
        )?;
        Ok(binaries)
    }
}

/// CoreDNS release; must match `COREDNS_VERSION` in `scripts/setup/node.sh`.
pub const COREDNS_VERSION: &str = "1.15.0";

/// The executables of a node, beside the control plane's: the ones `scripts/setup/node.sh`
/// builds (kubelet, kube-scheduler, kube-proxy, CoreDNS) and the Debian packages it installs.
#[derive(Debug, Clone)]
pub struct NodeBinaries {
    pub kubelet: PathBuf,
    pub kube_scheduler: PathBuf,
    pub kube_proxy: PathBuf,
    pub coredns: PathBuf,
    pub containerd: PathBuf,
    pub ctr: PathBuf,
    pub runc: PathBuf,
    /// The bridge and host-local CNI plugins live here (Debian's `containernetworking-plugins`).
    pub cni_dir: PathBuf,
}

impl NodeBinaries {
    /// Where `scripts/setup/node.sh` and the Debian packages put them (they may not exist yet).
    pub fn cached() -> Self {
        let k8s = cache_dir().join(format!("k8s-v{KUBERNETES_VERSION}/bin"));
        Self {
            kubelet: k8s.join("kubelet"),
            kube_scheduler: k8s.join("kube-scheduler"),
            kube_proxy: k8s.join("kube-proxy"),
            coredns: cache_dir().join(format!("coredns-v{COREDNS_VERSION}/bin/coredns")),
            containerd: PathBuf::from("/usr/bin/containerd"),
            ctr: PathBuf::from("/usr/bin/ctr"),
            runc: PathBuf::from("/usr/sbin/runc"),
            cni_dir: PathBuf::from("/usr/lib/cni"),
        }
    }

    pub fn missing(&self) -> Vec<PathBuf> {
        let mut paths = vec![
            self.kubelet.clone(),
            self.kube_scheduler.clone(),
            self.kube_proxy.clone(),
            self.coredns.clone(),
            self.containerd.clone(),
            self.ctr.clone(),
            self.runc.clone(),
        ];
        paths.extend(["bridge", "host-local", "loopback"].map(|p| self.cni_dir.join(p)));
        paths.retain(|p| !p.is_file());
        paths
    }

    /// The node's executables, running `scripts/setup/node.sh` first when any is missing (it
    /// installs packages with apt-get and builds from the Go module proxy; blocking, minutes).
    pub fn ensure() -> Result<Self> {
        let binaries = Self::cached();
        if binaries.missing().is_empty() {
            return Ok(binaries);
        }
        run_setup(
            "node binaries",
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/setup/node.sh"),
            binaries.missing(),
            || binaries.missing().is_empty(),
        )?;
        Ok(binaries)
    }
}

/// Runs a setup script for binaries that are `missing`, then checks with `installed` that the
/// script left them in place.
fn run_setup(
    what: &str,
    script: PathBuf,
    missing: Vec<PathBuf>,
    installed: impl Fn() -> bool,
) -> Result<()> {
    let names: Vec<String> = missing.iter().map(|p| p.display().to_string()).collect();
    eprintln!(
        "petl-tests: {what} missing ({}); running {} (a first run builds from the Go module proxy)",
        names.join(", "),
        script.display()
    );
    let status = Command::new("bash")
        .arg(&script)
        .status()
        .context(|| format!("running {}", script.display()))?;
    if !status.success() || !installed() {
        return Err(Error::Setup {
            script,
            status: status.to_string(),
        });
    }
    Ok(())
}
