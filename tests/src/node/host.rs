//! What a node changes on the host, and putting it back: the kernel settings, the bridge, the
//! iptables chains of its kubelet and kube-proxy, and its cgroups; also after a killed run.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::binaries::NodeBinaries;
use crate::error::{IoContext, Result};
use crate::node::kubelet::CGROUP_ROOT;
use crate::node::network::{self, IptablesChain};
use crate::node::proxy;

/// Kernel settings that the kubelet (its kernel tunables), the CNI bridge plugin (forwarding)
/// and the node itself (bridged traffic through iptables, for Service traffic between pods on
/// one bridge) change on the host; saved before the node starts, put back after it stops.
const SYSCTLS: &[&str] = &[
    "net/ipv4/ip_forward",
    "net/bridge/bridge-nf-call-iptables",
    "vm/overcommit_memory",
    "vm/panic_on_oom",
    "kernel/panic",
    "kernel/panic_on_oops",
    "kernel/keys/root_maxkeys",
    "kernel/keys/root_maxbytes",
];

/// What of the host a node touches, as it is at one moment: for teardown to put back, and for
/// tests to check that it did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostState {
    /// Network interfaces by name.
    pub links: BTreeSet<String>,
    /// iptables chains named `KUBE-*`, as `iptables|ip6tables TABLE CHAIN`.
    pub kube_chains: BTreeSet<String>,
    /// The kernel settings the kubelet, the CNI plugin and the node change, by `/proc/sys` path.
    pub sysctls: BTreeMap<String, String>,
    /// The node's cgroup folders (`<hierarchy>/petl-node`) that exist.
    pub cgroups: BTreeSet<PathBuf>,
}

impl HostState {
    pub fn capture() -> Result<Self> {
        let links = std::fs::read_dir("/sys/class/net")
            .context(|| "listing /sys/class/net".to_string())?
            .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
            .collect();
        let kube_chains = network::kube_chains()?
            .into_iter()
            .map(|c| c.to_string())
            .collect();
        let sysctls = SYSCTLS
            .iter()
            .filter_map(|key| read_sysctl(key).map(|value| (key.to_string(), value)))
            .collect();
        let cgroups = cgroup_hierarchies()
            .map(|h| h.join(CGROUP_ROOT))
            .filter(|p| p.exists())
            .collect();
        Ok(Self {
            links,
            kube_chains,
            sysctls,
            cgroups,
        })
    }
}

/// The host as it was before the node; [`HostChanges::restore`] (or dropping it) puts it back.
pub(crate) struct HostChanges {
    before: HostState,
    /// iptables chains named `KUBE-*` that existed before this node (left alone on teardown).
    chains_before: BTreeSet<IptablesChain>,
    binaries: NodeBinaries,
    restored: bool,
}

impl HostChanges {
    /// Removes what a node killed without teardown left behind (its bridge, kube-proxy's rules,
    /// its cgroups), saves the kernel settings and the iptables chains as they are, creates the
    /// bridge and turns on forwarding and bridged-traffic filtering. Call with the host lock
    /// held.
    pub(crate) fn apply(binaries: &NodeBinaries) -> Result<Self> {
        let leftovers: Vec<String> = proxy::cleanup(binaries)
            .into_iter()
            .chain(remove_cgroups())
            .collect();
        if !leftovers.is_empty() {
            eprintln!(
                "petl-tests: cleaning up after an earlier node: {}",
                leftovers.join("; ")
            );
        }
        let changes = Self {
            before: HostState::capture()?,
            chains_before: network::kube_chains()?,
            binaries: binaries.clone(),
            restored: false,
        };
        create_cgroups()?;
        network::create_bridge()?;
        write_sysctl("net/ipv4/ip_forward", "1")?;
        write_sysctl("net/bridge/bridge-nf-call-iptables", "1")?;
        Ok(changes)
    }

    /// The host as it was before the node started.
    pub(crate) fn before(&self) -> &HostState {
        &self.before
    }

    /// Puts the host back: kube-proxy's rules (`kube-proxy --cleanup`), any other new `KUBE-*`
    /// chain (the kubelet's), the cgroups, the bridge, the kernel settings. Call after every
    /// process of the node is gone. Best effort; returns what it could not undo. Idempotent.
    pub(crate) fn restore(&mut self) -> Vec<String> {
        if self.restored {
            return Vec::new();
        }
        self.restored = true;
        let mut problems: Vec<String> = proxy::cleanup(&self.binaries).into_iter().collect();
        match network::kube_chains() {
            Ok(now) => {
                let ours: Vec<_> = now.difference(&self.chains_before).cloned().collect();
                problems.extend(network::delete_chains(&ours));
            }
            Err(e) => problems.push(e.to_string()),
        }
        problems.extend(remove_cgroups());
        if let Err(e) = network::delete_bridge() {
            problems.push(e.to_string());
        }
        for (key, value) in &self.before.sysctls {
            if read_sysctl(key).as_deref() != Some(value.as_str())
                && let Err(e) = write_sysctl(key, value)
            {
                problems.push(e.to_string());
            }
        }
        problems
    }
}

impl Drop for HostChanges {
    fn drop(&mut self) {
        let problems = self.restore();
        if !problems.is_empty() {
            eprintln!(
                "petl-tests: could not put the host back:\n  {}",
                problems.join("\n  ")
            );
        }
    }
}

fn read_sysctl(key: &str) -> Option<String> {
    std::fs::read_to_string(Path::new("/proc/sys").join(key))
        .ok()
        .map(|v| v.trim().to_string())
}

fn write_sysctl(key: &str, value: &str) -> Result<()> {
    let path = Path::new("/proc/sys").join(key);
    std::fs::write(&path, value).context(|| format!("writing {value} to {}", path.display()))
}

/// Creates the kubelet's cgroup root ([`CGROUP_ROOT`]) in every hierarchy: the kubelet refuses
/// a `cgroupRoot` that does not exist. A new cpuset cgroup (v1) starts with no CPUs and no
/// memory nodes, so it gets its parent's.
fn create_cgroups() -> Result<()> {
    for hierarchy in cgroup_hierarchies() {
        let root = hierarchy.join(CGROUP_ROOT);
        std::fs::create_dir_all(&root).context(|| format!("creating cgroup {}", root.display()))?;
        for file in ["cpuset.cpus", "cpuset.mems"] {
            let parent = hierarchy.join(file);
            if let Ok(value) = std::fs::read_to_string(&parent) {
                let target = root.join(file);
                std::fs::write(&target, value.trim())
                    .context(|| format!("writing {}", target.display()))?;
            }
        }
    }
    Ok(())
}

/// Removes the kubelet's cgroup tree ([`CGROUP_ROOT`]) from every cgroup hierarchy,
/// deepest first. The processes in it are gone by now; a cgroup whose last task is still
/// exiting refuses removal for a moment, so each removal is retried briefly.
fn remove_cgroups() -> Vec<String> {
    let mut problems = Vec::new();
    for hierarchy in cgroup_hierarchies() {
        let root = hierarchy.join(CGROUP_ROOT);
        if !root.exists() {
            continue;
        }
        let mut dirs = Vec::new();
        collect_dirs(&root, &mut dirs);
        // Children come after their parents in `dirs`: remove from the end.
        for dir in dirs.iter().rev() {
            let deadline = Instant::now() + Duration::from_secs(5);
            loop {
                match std::fs::remove_dir(dir) {
                    Ok(()) => break,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
                    Err(e) if Instant::now() > deadline => {
                        problems.push(format!("removing cgroup {}: {e}", dir.display()));
                        break;
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(50)),
                }
            }
        }
    }
    problems
}

fn collect_dirs(dir: &Path, out: &mut Vec<PathBuf>) {
    out.push(dir.to_path_buf());
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                collect_dirs(&entry.path(), out);
            }
        }
    }
}

/// Mount points of every cgroup (v1) and cgroup2 hierarchy.
fn cgroup_hierarchies() -> impl Iterator<Item = PathBuf> {
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let points: Vec<PathBuf> = mounts
        .lines()
        .filter_map(|line| {
            // mountinfo: ID PARENT MAJ:MIN ROOT MOUNT-POINT ... - FSTYPE SOURCE OPTIONS
            let (left, right) = line.split_once(" - ")?;
            let fstype = right.split_whitespace().next()?;
            let mount_point = left.split_whitespace().nth(4)?;
            matches!(fstype, "cgroup" | "cgroup2").then(|| PathBuf::from(mount_point))
        })
        .collect();
    points.into_iter()
}
