//! The cluster DNS: CoreDNS (built from the Go module proxy) as a host process on the node IP,
//! answering `cluster.local` names from the API server, as the kubelet's `clusterDNS`.

use std::path::Path;
use std::time::Duration;

use crate::binaries::NodeBinaries;
use crate::error::{IoContext, Result};
use crate::node::network::NODE_IP;
use crate::process::{Spawner, Supervised};

/// The zone the kubelet's `clusterDomain` names.
pub const CLUSTER_DOMAIN: &str = "cluster.local";

/// The Corefile: the kubernetes plugin for the cluster zone and reverse lookups (Services,
/// headless Services' pods by hostname, `pods insecure` for `1-2-3-4.ns.pod` names), no
/// caching (tests look names up right after creating them), nothing forwarded (no upstream
/// is reachable from pods here), and the `ready` endpoint the harness waits on.
fn corefile(kubeconfig: &Path, ready_port: u16) -> String {
    format!(
        r#".:53 {{
    bind {NODE_IP}
    errors
    ready 127.0.0.1:{ready_port}
    kubernetes {CLUSTER_DOMAIN} in-addr.arpa ip6.arpa {{
        kubeconfig {kubeconfig}
        pods insecure
        fallthrough in-addr.arpa ip6.arpa
        ttl 1
    }}
}}
"#,
        kubeconfig = kubeconfig.display(),
    )
}

pub(crate) fn spawn(
    spawner: &Spawner,
    binaries: &NodeBinaries,
    dir: &Path,
    kubeconfig: &Path,
    ready_port: u16,
) -> Result<Supervised> {
    let path = dir.join("Corefile");
    std::fs::write(&path, corefile(kubeconfig, ready_port))
        .context(|| format!("writing {}", path.display()))?;
    spawner.spawn(
        "coredns",
        &binaries.coredns,
        &["-conf".into(), path.display().to_string()],
        &dir.join("coredns.log"),
    )
}

/// Whether CoreDNS reports ready (its kubernetes plugin has synced with the API server).
pub(crate) async fn ready(http: &reqwest::Client, ready_port: u16) -> bool {
    let url = format!("http://127.0.0.1:{ready_port}/ready");
    matches!(
        http.get(url).timeout(Duration::from_secs(2)).send().await,
        Ok(response) if response.status().is_success()
    )
}
