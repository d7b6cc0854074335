//! The node's container runtime: containerd with its own root, state, socket and runc root,
//! started as PID 1 of new PID and mount namespaces so nothing it runs or mounts outlives it.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::binaries::NodeBinaries;
use crate::error::{Error, IoContext, Result};
use crate::process::{Spawner, Supervised};

/// The CRI plugin's namespace, the one the kubelet's containers and images live in.
pub(crate) const K8S_NAMESPACE: &str = "k8s.io";
const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// Host paths that containerd 1.6 and libcni use whatever the configuration says (shim
/// sockets, network namespace mounts, the CNI result cache). Inside the runtime's mount
/// namespace each gets a private tmpfs, so nothing lands on, or clashes with, the host's.
const PRIVATE_HOST_DIRS: &[&str] = &["/run/containerd", "/run/netns", "/var/lib/cni"];

/// Folders of one node's runtime, all under the node's temp dir.
#[derive(Clone)]
pub(crate) struct RuntimeDirs {
    pub(crate) root: PathBuf,
    pub(crate) state: PathBuf,
    pub(crate) socket: PathBuf,
    pub(crate) runc_root: PathBuf,
    pub(crate) cni_conf: PathBuf,
    pub(crate) cni_ipam: PathBuf,
    pub(crate) config: PathBuf,
}

impl RuntimeDirs {
    pub(crate) fn under(dir: &Path) -> Self {
        let base = dir.join("containerd");
        Self {
            root: base.join("root"),
            state: base.join("state"),
            socket: base.join("containerd.sock"),
            runc_root: base.join("runc"),
            cni_conf: base.join("net.d"),
            cni_ipam: base.join("ipam"),
            config: base.join("config.toml"),
        }
    }

    pub(crate) fn endpoint(&self) -> String {
        format!("unix://{}", self.socket.display())
    }
}

/// containerd's configuration (version 2, containerd 1.6): the CRI plugin with the locally
/// built sandbox image, `restrict_oom_score_adj` (the sandbox cannot lower its OOM score:
/// without it runc fails with "can't get final child's PID from pipe"), runc with cgroupfs and
/// its own root, and the CNI config folder. Plugins that would touch host paths are off.
pub(crate) fn config(dirs: &RuntimeDirs, binaries: &NodeBinaries, sandbox_image: &str) -> String {
    format!(
        r#"version = 2
root = "{root}"
state = "{state}"
disabled_plugins = [
  "io.containerd.internal.v1.opt",
  "io.containerd.snapshotter.v1.aufs",
  "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.snapshotter.v1.zfs",
  "io.containerd.tracing.processor.v1.otlp",
]

[grpc]
  address = "{socket}"

[ttrpc]
  address = ""

[debug]
  address = ""

[metrics]
  address = ""

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{sandbox_image}"
  restrict_oom_score_adj = true
  enable_selinux = false
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        BinaryName = "{runc}"
        Root = "{runc_root}"
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{cni_bin}"
    conf_dir = "{cni_conf}"
    max_conf_num = 1
"#,
        root = dirs.root.display(),
        state = dirs.state.display(),
        socket = dirs.socket.display(),
        runc = binaries.runc.display(),
        runc_root = dirs.runc_root.display(),
        cni_bin = binaries.cni_dir.display(),
        cni_conf = dirs.cni_conf.display(),
    )
}

/// Starts containerd as PID 1 of a new PID namespace in a new private mount namespace with
/// its own `/proc` (`--mount-proc`: containerd names a sandbox's network namespace
/// `/proc/<its pid>/task/<tid>/ns/net`, and its pid is 1 in there, so the host's `/proc` would
/// point it at the host's init). `unshare --kill-child` ties it to the harness (which gives `unshare` a parent-death
/// signal), and when it dies the kernel kills every shim and container in its PID namespace,
/// and the mount namespace — overlay roots, network namespace mounts, the kubelet's volume
/// mounts (the kubelet joins this namespace) — goes with the last of them.
pub(crate) fn spawn(
    spawner: &Spawner,
    binaries: &NodeBinaries,
    dirs: &RuntimeDirs,
    log: &Path,
) -> Result<Supervised> {
    for dir in [
        &dirs.root,
        &dirs.state,
        &dirs.runc_root,
        &dirs.cni_conf,
        &dirs.cni_ipam,
    ] {
        std::fs::create_dir_all(dir).context(|| format!("creating {}", dir.display()))?;
    }
    let mut script = String::from("set -e\n");
    for dir in PRIVATE_HOST_DIRS {
        script.push_str(&format!(
            "mkdir -p {dir} && mount -t tmpfs -o mode=0711 petl-node {dir}\n"
        ));
    }
    script.push_str(&format!(
        "exec {} --config {}\n",
        binaries.containerd.display(),
        dirs.config.display()
    ));
    let args = [
        "--mount",
        "--propagation",
        "private",
        "--pid",
        "--fork",
        "--mount-proc",
        "--kill-child",
        "--",
        "sh",
        "-c",
        &script,
    ]
    .map(String::from);
    spawner.spawn("containerd", Path::new("unshare"), &args, log)
}

/// The host PID of the process `unshare` started (containerd), whose mount namespace the
/// kubelet joins. Waits until it exists.
pub(crate) fn runtime_pid(unshare: &mut Supervised) -> Result<u32> {
    let deadline = Instant::now() + READY_TIMEOUT;
    let children = format!("/proc/{0}/task/{0}/children", unshare.pid());
    loop {
        unshare.ensure_running()?;
        if let Some(pid) = std::fs::read_to_string(&children)
            .ok()
            .and_then(|c| c.split_whitespace().next().and_then(|p| p.parse().ok()))
        {
            return Ok(pid);
        }
        if Instant::now() > deadline {
            return Err(Error::NotReady {
                component: "containerd".into(),
                seconds: READY_TIMEOUT.as_secs(),
                log_tail: unshare.log_tail(20),
            });
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits until containerd answers on its socket.
pub(crate) async fn wait_ready(
    process: &mut Supervised,
    binaries: &NodeBinaries,
    dirs: &RuntimeDirs,
) -> Result<()> {
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        process.ensure_running()?;
        if dirs.socket.exists() {
            let out = tokio::process::Command::new(&binaries.ctr)
                .arg("--address")
                .arg(&dirs.socket)
                .arg("version")
                .output()
                .await
                .context(|| format!("running {} version", binaries.ctr.display()))?;
            if out.status.success() {
                return Ok(());
            }
        }
        if Instant::now() > deadline {
            return Err(Error::NotReady {
                component: "containerd".into(),
                seconds: READY_TIMEOUT.as_secs(),
                log_tail: process.log_tail(30),
            });
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Imports OCI archives into the CRI namespace, unpacked for the overlayfs snapshotter, so
/// the kubelet finds them without a pull.
pub(crate) async fn import_images(
    binaries: &NodeBinaries,
    dirs: &RuntimeDirs,
    archives: &[PathBuf],
) -> Result<()> {
    for archive in archives {
        let out = tokio::process::Command::new(&binaries.ctr)
            .arg("--address")
            .arg(&dirs.socket)
            .args([
                "-n",
                K8S_NAMESPACE,
                "images",
                "import",
                "--snapshotter",
                "overlayfs",
            ])
            .arg(archive)
            .output()
            .await
            .context(|| format!("importing {}", archive.display()))?;
        if !out.status.success() {
            return Err(Error::Command {
                command: format!("ctr images import {}", archive.display()),
                status: out.status.to_string(),
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            });
        }
    }
    Ok(())
}

/// The names of the images in the CRI namespace.
pub(crate) fn image_names(binaries: &NodeBinaries, dirs: &RuntimeDirs) -> Result<Vec<String>> {
    let out = Command::new(&binaries.ctr)
        .arg("--address")
        .arg(&dirs.socket)
        .args(["-n", K8S_NAMESPACE, "images", "ls", "-q"])
        .output()
        .context(|| "listing images with ctr".to_string())?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect())
}
