//! The node's Service proxy: kube-proxy in iptables mode, so that pods reach Services' cluster
//! IPs, the `kubernetes` Service (the API server on the node IP) among them.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use crate::binaries::NodeBinaries;
use crate::error::{IoContext, Result};
use crate::node::network::{NODE_IP, POD_CIDR};
use crate::process::{Spawner, Supervised};

/// The KubeProxyConfiguration: iptables mode; node ports only on the node IP (never on the
/// machine's other interfaces) and not on localhost (no `route_localnet`); conntrack sysctls
/// left as they are (zeros); health and metrics on free loopback ports.
fn config(
    kubeconfig: &Path,
    node_name: &str,
    healthz_port: u16,
    metrics_port: u16,
) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
        "kind": "KubeProxyConfiguration",
        "clientConnection": {"kubeconfig": kubeconfig},
        "mode": "iptables",
        "clusterCIDR": POD_CIDR,
        "hostnameOverride": node_name,
        "healthzBindAddress": format!("127.0.0.1:{healthz_port}"),
        "metricsBindAddress": format!("127.0.0.1:{metrics_port}"),
        "nodePortAddresses": [format!("{NODE_IP}/32")],
        "iptables": {"localhostNodePorts": false},
        "conntrack": {
            "maxPerCore": 0,
            "min": 0,
            "tcpEstablishedTimeout": "0s",
            "tcpCloseWaitTimeout": "0s",
        },
    })
}

pub(crate) fn spawn(
    spawner: &Spawner,
    binaries: &NodeBinaries,
    dir: &Path,
    kubeconfig: &Path,
    node_name: &str,
    healthz_port: u16,
    metrics_port: u16,
) -> Result<Supervised> {
    let path = dir.join("kube-proxy-config.yaml");
    let yaml = serde_yaml::to_string(&config(kubeconfig, node_name, healthz_port, metrics_port))
        .map_err(|e| crate::Error::Io {
            what: "serialising the kube-proxy configuration".into(),
            source: std::io::Error::other(e),
        })?;
    std::fs::write(&path, yaml).context(|| format!("writing {}", path.display()))?;
    spawner.spawn(
        "kube-proxy",
        &binaries.kube_proxy,
        &[format!("--config={}", path.display()), "--v=1".into()],
        &dir.join("kube-proxy.log"),
    )
}

/// Whether kube-proxy has programmed the Services it knows (its healthz answers 200 once it
/// synced the rules).
pub(crate) async fn healthy(http: &reqwest::Client, healthz_port: u16) -> bool {
    let url = format!("http://127.0.0.1:{healthz_port}/healthz");
    matches!(
        http.get(url).timeout(Duration::from_secs(2)).send().await,
        Ok(response) if response.status().is_success()
    )
}

/// `kube-proxy --cleanup`: removes the rules and chains kube-proxy made (iptables and
/// nftables), also those of a kube-proxy that was killed. Returns a problem, if any.
pub(crate) fn cleanup(binaries: &NodeBinaries) -> Option<String> {
    match Command::new(&binaries.kube_proxy).arg("--cleanup").output() {
        Ok(out) if out.status.success() => None,
        Ok(out) => Some(format!(
            "kube-proxy --cleanup failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )),
        Err(e) => Some(format!("running kube-proxy --cleanup: {e}")),
    }
}
