//! Kubernetes pod discovery for the test Prometheus. Debian's Prometheus is built without
//! `kubernetes_sd_configs`, so the harness does what that discovery does: it lists pods through
//! the API server every second and writes them, one target per named container port (init
//! containers, where native sidecars live, included), with the `__meta_kubernetes_*` labels
//! Prometheus' own discovery gives, to a file that a `file_sd_configs` entry reads. The
//! relabelling a PodMonitor turns into then applies unchanged.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use k8s_openapi::api::core::v1::{Container, Pod};
use kube::api::ListParams;
use kube::{Api, Client};
use serde_json::{Value, json};

use crate::error::{Error, Result};

const REFRESH: Duration = Duration::from_secs(1);

/// A client for the API server of the kubeconfig at `path`.
pub(crate) async fn client(path: &Path) -> Result<Client> {
    let bad = |message: String| Error::Kubeconfig {
        path: path.to_path_buf(),
        message,
    };
    let kubeconfig = kube::config::Kubeconfig::read_from(path).map_err(|e| bad(e.to_string()))?;
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
        .await
        .map_err(|e| bad(e.to_string()))?;
    Ok(Client::try_from(config)?)
}

/// Writes the pods of `namespaces` (all when empty) to `file` every second, until aborted.
pub(crate) fn spawn(
    client: Client,
    namespaces: Vec<String>,
    file: PathBuf,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            match target_groups(&client, &namespaces).await {
                Ok(groups) => {
                    let tmp = file.with_extension("tmp");
                    let written = std::fs::write(&tmp, Value::Array(groups).to_string())
                        .and_then(|()| std::fs::rename(&tmp, &file));
                    if let Err(e) = written {
                        eprintln!("petl-tests: pod discovery: writing {}: {e}", file.display());
                    }
                }
                Err(e) => eprintln!("petl-tests: pod discovery: listing pods: {e}"),
            }
            tokio::time::sleep(REFRESH).await;
        }
    })
}

async fn target_groups(client: &Client, namespaces: &[String]) -> Result<Vec<Value>> {
    let mut pods = Vec::new();
    if namespaces.is_empty() {
        pods = Api::<Pod>::all(client.clone())
            .list(&ListParams::default())
            .await?
            .items;
    } else {
        for ns in namespaces {
            pods.extend(
                Api::<Pod>::namespaced(client.clone(), ns)
                    .list(&ListParams::default())
                    .await?
                    .items,
            );
        }
    }
    Ok(pods.iter().flat_map(pod_targets).collect())
}

/// One target group per named port of every container of `pod`, labelled as Prometheus'
/// Kubernetes discovery (role `pod`) labels it.
fn pod_targets(pod: &Pod) -> Vec<Value> {
    let Some(ip) = pod.status.as_ref().and_then(|s| s.pod_ip.clone()) else {
        return Vec::new();
    };
    let mut common = BTreeMap::new();
    common.insert(
        "__meta_kubernetes_namespace".to_string(),
        pod.metadata.namespace.clone().unwrap_or_default(),
    );
    common.insert(
        "__meta_kubernetes_pod_name".to_string(),
        pod.metadata.name.clone().unwrap_or_default(),
    );
    common.insert(
        "__meta_kubernetes_pod_phase".to_string(),
        pod.status
            .as_ref()
            .and_then(|s| s.phase.clone())
            .unwrap_or_default(),
    );
    common.insert("__meta_kubernetes_pod_ip".to_string(), ip.clone());
    for (name, value) in pod.metadata.labels.iter().flatten() {
        let name = crate::prometheus::label_name(name);
        common.insert(format!("__meta_kubernetes_pod_label_{name}"), value.clone());
        common.insert(
            format!("__meta_kubernetes_pod_labelpresent_{name}"),
            "true".to_string(),
        );
    }
    let Some(spec) = &pod.spec else {
        return Vec::new();
    };
    let containers = spec
        .init_containers
        .iter()
        .flatten()
        .map(|c| (c, true))
        .chain(spec.containers.iter().map(|c| (c, false)));
    let mut groups = Vec::new();
    for (container, init) in containers {
        for (port_name, port) in named_ports(container) {
            let mut labels = common.clone();
            labels.insert(
                "__meta_kubernetes_pod_container_name".into(),
                container.name.clone(),
            );
            labels.insert(
                "__meta_kubernetes_pod_container_port_name".into(),
                port_name,
            );
            labels.insert(
                "__meta_kubernetes_pod_container_port_number".into(),
                port.to_string(),
            );
            labels.insert(
                "__meta_kubernetes_pod_container_init".into(),
                init.to_string(),
            );
            groups.push(json!({"targets": [format!("{ip}:{port}")], "labels": labels}));
        }
    }
    groups
}

fn named_ports(container: &Container) -> Vec<(String, i32)> {
    container
        .ports
        .iter()
        .flatten()
        .filter_map(|p| Some((p.name.clone()?, p.container_port)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_named_port_of_every_container_is_a_target_with_discovery_labels() {
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": "j-worker-0", "namespace": "e2e",
                          "labels": {"petl.dev/job": "j", "app.kubernetes.io/name": "petl"}},
            "spec": {
                "initContainers": [{"name": "snapshot-agent",
                                     "ports": [{"name": "agent-metrics", "containerPort": 9101},
                                               {"containerPort": 7070}]}],
                "containers": [{"name": "trainer", "ports": [{"name": "metrics", "containerPort": 9100}]}]
            },
            "status": {"phase": "Running", "podIP": "10.244.0.7"}
        }))
        .unwrap();
        let groups = pod_targets(&pod);
        assert_eq!(groups.len(), 2, "{groups:?}");
        assert_eq!(groups[0]["targets"], json!(["10.244.0.7:9101"]));
        assert_eq!(
            groups[0]["labels"]["__meta_kubernetes_pod_container_name"],
            "snapshot-agent"
        );
        assert_eq!(
            groups[0]["labels"]["__meta_kubernetes_pod_container_init"],
            "true"
        );
        assert_eq!(groups[1]["targets"], json!(["10.244.0.7:9100"]));
        assert_eq!(
            groups[1]["labels"]["__meta_kubernetes_pod_label_petl_dev_job"],
            "j"
        );
        assert_eq!(
            groups[1]["labels"]["__meta_kubernetes_pod_labelpresent_app_kubernetes_io_name"],
            "true"
        );
        assert_eq!(
            groups[1]["labels"]["__meta_kubernetes_pod_phase"],
            "Running"
        );
    }

    #[test]
    fn a_pod_without_an_ip_is_no_target() {
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": "p", "namespace": "e2e"},
            "spec": {"containers": [{"name": "c", "ports": [{"name": "m", "containerPort": 1}]}]},
            "status": {"phase": "Pending"}
        }))
        .unwrap();
        assert!(pod_targets(&pod).is_empty());
    }
}
