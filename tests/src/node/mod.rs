//! A real single Kubernetes node beside a local control plane: containerd + runc, a CNI bridge,
//! kubelet, kube-scheduler, kube-proxy and CoreDNS, all children of the test, gone when it drops.

mod containerd;
pub mod dns;
mod host;
mod kubelet;
mod lock;
pub mod network;
mod proxy;

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Node as NodeObject;
use kube::Api;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tempfile::TempDir;

use crate::binaries::NodeBinaries;
use crate::control_plane::ControlPlane;
use crate::error::{Error, IoContext, Result};
use crate::images::SANDBOX_IMAGE;
use crate::process::{Spawner, Supervised, free_port};

pub(crate) use host::HostChanges;
pub use host::HostState;
pub(crate) use lock::HostLock;

/// The node's name (its `Node` object, `spec.nodeName` of its pods).
pub const NODE_NAME: &str = "petl-node";
/// How long the node may take to turn Ready, CoreDNS to sync and kube-proxy to program rules.
const READY_TIMEOUT: Duration = Duration::from_secs(180);
/// How long containerd's PID namespace may take to empty after containerd is killed.
const RUNTIME_EXIT_TIMEOUT: Duration = Duration::from_secs(30);
const POLL: Duration = Duration::from_millis(250);

/// A running node registered with a [`ControlPlane`]. Dropping it (also on panic) kills every
/// component and container, and removes the bridge, the iptables chains, the cgroups, the
/// kernel settings it changed and its temp dir; processes also die with the test binary.
pub struct Node {
    /// Killed first to last in this order (see `Drop`).
    kube_proxy: Supervised,
    coredns: Supervised,
    scheduler: Supervised,
    kubelet: Supervised,
    /// `unshare`, whose child (`runtime_pid`) is containerd, PID 1 of the runtime's namespaces.
    containerd: Supervised,
    runtime_pid: u32,
    _spawner: Spawner,
    binaries: NodeBinaries,
    runtime: containerd::RuntimeDirs,
    host: HostChanges,
    dir: TempDir,
    startup: Duration,
    /// Set once torn down: the pids above may then belong to other processes.
    stopped: bool,
    /// Released last, once everything host-global is gone (or handed to [`Stopped`]).
    lock: Option<HostLock>,
}

/// What [`Node::shutdown`] reports. Holds the machine's node lock until dropped, so a test can
/// look at the host before another node changes it.
pub struct Stopped {
    /// What teardown could not undo; empty when it left nothing behind.
    pub problems: Vec<String>,
    /// The host as it was before the node started.
    pub before: HostState,
    _lock: Option<HostLock>,
}

/// The ports and kubeconfigs a node's components get, fixed before any starts.
struct Wiring {
    kubelet_port: u16,
    kubelet_healthz_port: u16,
    proxy_healthz_port: u16,
    proxy_metrics_port: u16,
    dns_ready_port: u16,
    scheduler_port: u16,
    kubelet_kubeconfig: PathBuf,
    scheduler_kubeconfig: PathBuf,
    proxy_kubeconfig: PathBuf,
}

impl Node {
    /// Starts a node for `control_plane`, which must listen on [`network::NODE_IP`] (see
    /// [`crate::Cluster`], which arranges that). `lock` and `host` come from the caller,
    /// which took them before starting the control plane; `images` are OCI archives to import,
    /// among them the sandbox image [`SANDBOX_IMAGE`].
    pub(crate) async fn start(
        control_plane: &ControlPlane,
        binaries: NodeBinaries,
        lock: HostLock,
        host: HostChanges,
        images: &[PathBuf],
    ) -> Result<Self> {
        let started = Instant::now();
        let dir = tempfile::Builder::new()
            .prefix("petl-node-")
            .tempdir()
            .context(|| "creating a temp dir for the node".to_string())?;
        let runtime = containerd::RuntimeDirs::under(dir.path());
        std::fs::create_dir_all(&runtime.cni_conf)
            .context(|| format!("creating {}", runtime.cni_conf.display()))?;
        let cni = runtime.cni_conf.join("10-petl.conflist");
        std::fs::write(&cni, network::cni_config(&runtime.cni_ipam).to_string())
            .context(|| format!("writing {}", cni.display()))?;
        std::fs::write(
            &runtime.config,
            containerd::config(&runtime, &binaries, SANDBOX_IMAGE),
        )
        .context(|| format!("writing {}", runtime.config.display()))?;
        let wiring = Wiring {
            kubelet_port: free_port()?,
            kubelet_healthz_port: free_port()?,
            proxy_healthz_port: free_port()?,
            proxy_metrics_port: free_port()?,
            dns_ready_port: free_port()?,
            scheduler_port: free_port()?,
            kubelet_kubeconfig: control_plane
                .user_kubeconfig(&format!("system:node:{NODE_NAME}"), Some("system:nodes"))?,
            scheduler_kubeconfig: control_plane.user_kubeconfig("system:kube-scheduler", None)?,
            proxy_kubeconfig: control_plane.user_kubeconfig("system:kube-proxy", None)?,
        };
        let client_ca = control_plane
            .ca_certificate()
            .ok_or_else(|| Error::Node {
                message:
                    "a node needs a local control plane (its CA signs the node's certificates)"
                        .into(),
            })?
            .to_path_buf();

        let spawner = Spawner::new()?;
        let log = |name: &str| dir.path().join(format!("{name}.log"));
        let mut containerd_process =
            containerd::spawn(&spawner, &binaries, &runtime, &log("containerd"))?;
        let runtime_pid = containerd::runtime_pid(&mut containerd_process)?;
        containerd::wait_ready(&mut containerd_process, &binaries, &runtime).await?;
        // The images go in while the other components start.
        let import = {
            let (binaries, runtime, images) = (binaries.clone(), runtime.clone(), images.to_vec());
            tokio::spawn(
                async move { containerd::import_images(&binaries, &runtime, &images).await },
            )
        };

        let kubelet_setup = kubelet::KubeletSetup {
            dir: dir.path(),
            runtime_endpoint: &runtime.endpoint(),
            client_ca: &client_ca,
            port: wiring.kubelet_port,
            healthz_port: wiring.kubelet_healthz_port,
        };
        let kubelet = kubelet::spawn(
            &spawner,
            &binaries,
            &kubelet_setup,
            &wiring.kubelet_kubeconfig,
            NODE_NAME,
            runtime_pid,
        )?;
        let scheduler = spawner.spawn(
            "kube-scheduler",
            &binaries.kube_scheduler,
            &scheduler_args(&wiring),
            &log("kube-scheduler"),
        )?;
        let coredns = dns::spawn(
            &spawner,
            &binaries,
            dir.path(),
            control_plane.kubeconfig_path(),
            wiring.dns_ready_port,
        )?;
        let kube_proxy = proxy::spawn(
            &spawner,
            &binaries,
            dir.path(),
            &wiring.proxy_kubeconfig,
            NODE_NAME,
            wiring.proxy_healthz_port,
            wiring.proxy_metrics_port,
        )?;
        let mut node = Self {
            kube_proxy,
            coredns,
            scheduler,
            kubelet,
            containerd: containerd_process,
            runtime_pid,
            _spawner: spawner,
            binaries,
            runtime,
            host,
            dir,
            startup: Duration::ZERO,
            stopped: false,
            lock: Some(lock),
        };
        import.await.map_err(|e| Error::Io {
            what: "importing images into containerd".into(),
            source: std::io::Error::other(e),
        })??;
        node.wait_ready(control_plane, &wiring, started).await?;
        node.startup = started.elapsed();
        Ok(node)
    }

    /// The node's name, `petl-node`.
    pub fn name(&self) -> &str {
        NODE_NAME
    }

    /// The node's InternalIP: the pod bridge's gateway, where the API server, the kubelet and
    /// CoreDNS listen. The host reaches pod IPs through the bridge.
    pub fn ip(&self) -> Ipv4Addr {
        network::NODE_IP
    }

    /// The node's temp dir: `containerd.log`, `kubelet.log`, `kube-scheduler.log`,
    /// `kube-proxy.log`, `coredns.log`, configurations, the kubelet's root and pod logs.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Time from the start of [`Node::start`] until the node was Ready, CoreDNS synced,
    /// kube-proxy had programmed its rules and the images were imported.
    pub fn startup_time(&self) -> Duration {
        self.startup
    }

    /// Process ids of the components (each also its process group's id): kube-proxy,
    /// CoreDNS, kube-scheduler, kubelet, and `unshare` (whose child is containerd).
    pub fn pids(&self) -> Vec<u32> {
        [
            &self.kube_proxy,
            &self.coredns,
            &self.scheduler,
            &self.kubelet,
            &self.containerd,
        ]
        .iter()
        .map(|c| c.pid())
        .collect()
    }

    /// containerd's host PID: PID 1 of the namespaces that hold every container.
    pub fn runtime_pid(&self) -> u32 {
        self.runtime_pid
    }

    /// The last `lines` lines of each component's log.
    pub fn logs_tail(&self, lines: usize) -> String {
        [
            &self.containerd,
            &self.kubelet,
            &self.scheduler,
            &self.kube_proxy,
            &self.coredns,
        ]
        .iter()
        .map(|c| format!("--- {} ---\n{}", c.name, c.log_tail(lines)))
        .collect()
    }

    /// Imports more OCI archives (e.g. an image a test built) into the node's containerd.
    pub async fn import_images(&self, archives: &[PathBuf]) -> Result<()> {
        containerd::import_images(&self.binaries, &self.runtime, archives).await
    }

    /// Names of the images in the node's containerd (namespace `k8s.io`).
    pub fn image_names(&self) -> Result<Vec<String>> {
        containerd::image_names(&self.binaries, &self.runtime)
    }

    async fn wait_ready(
        &mut self,
        control_plane: &ControlPlane,
        wiring: &Wiring,
        started: Instant,
    ) -> Result<()> {
        let nodes = Api::<NodeObject>::all(control_plane.client());
        let http = reqwest::Client::new();
        let (mut node_ready, mut dns_ready, mut proxy_ready) = (false, false, false);
        loop {
            for process in [
                &mut self.containerd,
                &mut self.kubelet,
                &mut self.scheduler,
                &mut self.coredns,
                &mut self.kube_proxy,
            ] {
                process.ensure_running()?;
            }
            if !node_ready {
                node_ready = matches!(nodes.get_opt(NODE_NAME).await, Ok(Some(n)) if is_ready(&n));
            }
            if !dns_ready {
                dns_ready = dns::ready(&http, wiring.dns_ready_port).await;
            }
            if !proxy_ready {
                proxy_ready = proxy::healthy(&http, wiring.proxy_healthz_port).await;
            }
            if node_ready && dns_ready && proxy_ready {
                return Ok(());
            }
            if started.elapsed() > READY_TIMEOUT {
                let laggard = if !node_ready {
                    &self.kubelet
                } else if !dns_ready {
                    &self.coredns
                } else {
                    &self.kube_proxy
                };
                return Err(Error::NotReady {
                    component: laggard.name.clone(),
                    seconds: READY_TIMEOUT.as_secs(),
                    log_tail: format!("{}{}", laggard.log_tail(40), self.containerd.log_tail(10)),
                });
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Stops the node as dropping it does, and reports.
    pub fn shutdown(mut self) -> Stopped {
        let problems = self.stop();
        Stopped {
            problems,
            before: self.host.before().clone(),
            _lock: self.lock.take(),
        }
    }

    /// Stops everything, in an order that leaves nothing behind; returns what it could not
    /// undo. Runs once.
    fn stop(&mut self) -> Vec<String> {
        if self.stopped {
            return Vec::new();
        }
        self.stopped = true;
        for process in [
            &mut self.kube_proxy,
            &mut self.coredns,
            &mut self.scheduler,
            &mut self.kubelet,
        ] {
            process.kill();
        }
        // containerd is PID 1 of its PID namespace: when it dies the kernel kills every shim
        // and container in it, and `unshare` exits once it has reaped containerd, i.e. once
        // the namespace is empty. Only then are the mounts gone and the cgroups empty.
        let _ = kill(Pid::from_raw(self.runtime_pid as i32), Signal::SIGKILL);
        let mut problems = Vec::new();
        if !self.containerd.wait_exit(RUNTIME_EXIT_TIMEOUT) {
            problems.push(format!(
                "containerd's namespace did not empty within {}s",
                RUNTIME_EXIT_TIMEOUT.as_secs()
            ));
        }
        self.containerd.kill();
        problems.extend(self.host.restore());
        problems
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let problems = self.stop();
        if !problems.is_empty() {
            eprintln!(
                "petl-tests: node teardown left problems:\n  {}",
                problems.join("\n  ")
            );
        }
    }
}

fn scheduler_args(wiring: &Wiring) -> Vec<String> {
    let kubeconfig = wiring.scheduler_kubeconfig.display();
    vec![
        format!("--kubeconfig={kubeconfig}"),
        format!("--authentication-kubeconfig={kubeconfig}"),
        format!("--authorization-kubeconfig={kubeconfig}"),
        "--leader-elect=false".into(),
        "--bind-address=127.0.0.1".into(),
        format!("--secure-port={}", wiring.scheduler_port),
        "--v=1".into(),
    ]
}

fn is_ready(node: &NodeObject) -> bool {
    node.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|conditions| {
            conditions
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "True")
        })
}
