//! A whole local cluster for end-to-end tests: a [`ControlPlane`] listening on the node IP, a
//! real [`Node`] that runs petl's own images, or an external cluster (kind) via the env var.

use std::net::IpAddr;
use std::ops::Deref;

use crate::binaries::NodeBinaries;
use crate::control_plane::{ControlPlane, ControlPlaneOptions, EXTERNAL_KUBECONFIG_ENV};
use crate::error::{Error, Result};
use crate::images::{self, Images};
use crate::node::{HostChanges, HostLock, Node, Stopped, network::NODE_IP};

/// kube-controller-manager's controllers on a cluster with a node: all that are on by default
/// in a real cluster (Deployments and ReplicaSets for the chart, EndpointSlices for CoreDNS
/// and kube-proxy, node lifecycle, pod GC, ...).
pub const CLUSTER_CONTROLLERS: &[&str] = &["*"];

/// A control plane and a node (or an external cluster); derefs to the [`ControlPlane`], so
/// `client()`, `kubectl()`, `helm()`, `create_namespace()` work as on a bare control plane.
/// Dropping it stops the node first (every container with it), then the control plane.
pub struct Cluster {
    node: Option<Node>,
    control_plane: ControlPlane,
    images: Images,
}

impl Cluster {
    /// A local control plane and node with petl's images loaded, or, when
    /// `$PETL_TEST_KUBECONFIG` is set, that cluster as it is (its images loaded beforehand,
    /// e.g. by `tests/e2e/kind.sh`).
    ///
    /// Locally this first installs and builds what is missing (`scripts/setup/node.sh`,
    /// `scripts/setup/base-image.sh`), compiles the images' binaries (`cargo build`, this test
    /// build's profile) and builds the images (`scripts/build-images.sh`); then takes the
    /// machine's node lock (one node per machine: a second cluster waits for the first to
    /// drop), and starts everything. Needs root.
    pub async fn start() -> Result<Self> {
        let images = Images::names()?;
        if std::env::var_os(EXTERNAL_KUBECONFIG_ENV).is_some() {
            return Ok(Self {
                node: None,
                control_plane: ControlPlane::start().await?,
                images,
            });
        }
        let (binaries, archives, lock, host) = blocking("preparing the node", || {
            let binaries = NodeBinaries::ensure()?;
            ensure_base_images()?;
            let archives = images::build()?;
            let lock = HostLock::acquire()?;
            let host = HostChanges::apply(&binaries)?;
            Ok((binaries, archives, lock, host))
        })
        .await?;
        let control_plane = ControlPlane::start_with(ControlPlaneOptions {
            controllers: CLUSTER_CONTROLLERS.iter().map(|c| c.to_string()).collect(),
            address: IpAddr::V4(NODE_IP),
        })
        .await?;
        let node = Node::start(&control_plane, binaries, lock, host, &archives).await?;
        Ok(Self {
            node: Some(node),
            control_plane,
            images,
        })
    }

    pub fn control_plane(&self) -> &ControlPlane {
        &self.control_plane
    }

    /// The local node; `None` on an external cluster.
    pub fn node(&self) -> Option<&Node> {
        self.node.as_ref()
    }

    /// The names of petl's images as this cluster knows them.
    pub fn images(&self) -> &Images {
        &self.images
    }

    /// Stops the node (as dropping the cluster does), then the control plane, and returns the
    /// node's report, which holds the node lock until dropped; `None` for an external cluster.
    pub fn stop(mut self) -> Option<Stopped> {
        let stopped = self.node.take().map(Node::shutdown);
        drop(self);
        stopped
    }

    /// Component logs of the control plane and the node, for a failing test's message.
    pub fn logs_tail(&self, lines: usize) -> String {
        let mut text = self.control_plane.logs_tail(lines);
        if let Some(node) = &self.node {
            text.push_str(&node.logs_tail(lines));
        }
        text
    }
}

impl Deref for Cluster {
    type Target = ControlPlane;

    fn deref(&self) -> &ControlPlane {
        &self.control_plane
    }
}

/// Runs `scripts/setup/base-image.sh` (returns at once when the base images exist).
fn ensure_base_images() -> Result<()> {
    let script = crate::control_plane::repo_root().join("scripts/setup/base-image.sh");
    let status = std::process::Command::new("bash")
        .arg(&script)
        .status()
        .map_err(|source| Error::Io {
            what: format!("running {}", script.display()),
            source,
        })?;
    if !status.success() {
        return Err(Error::Setup {
            script,
            status: status.to_string(),
        });
    }
    Ok(())
}

async fn blocking<T: Send + 'static>(
    what: &str,
    work: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| Error::Io {
            what: what.to_string(),
            source: std::io::Error::other(e),
        })?
}
