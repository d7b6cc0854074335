//! The real node works end to end: petl's images run as pods, pods find each other through the
//! cluster DNS and talk TCP, reach the API server through the `kubernetes` Service, the host
//! reaches pods; teardown leaves nothing behind. (The chart on this node: e2e_operator.rs.)

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::panic::AssertUnwindSafe;
use std::path::Path;
use std::time::{Duration, Instant};

use futures::FutureExt;
use k8s_openapi::api::core::v1::{Node, Pod, Service};
use kube::api::{ListParams, PostParams};
use kube::{Api, Client};
use petl_tests::{Cluster, pod_logs, wait_pod_finished, wait_pod_ready};
use serde_json::json;

const POD_TIMEOUT: Duration = Duration::from_secs(180);

/// One cluster for every check: a node takes tens of seconds to start and one runs per machine
/// at a time. Each check is its own function, in its own namespace.
#[tokio::test]
async fn a_real_node_runs_petl_images_wires_pods_together_and_cleans_up() {
    let started = Instant::now();
    let cluster = match Cluster::start().await {
        Ok(cluster) => cluster,
        Err(e) => panic!("cluster did not start: {e}"),
    };
    eprintln!(
        "cluster ready in {:.1}s (control plane {:.1}s, node {:.1}s)",
        started.elapsed().as_secs_f64(),
        cluster.startup_time().as_secs_f64(),
        cluster
            .node()
            .map_or(0.0, |n| n.startup_time().as_secs_f64()),
    );

    let checks = async {
        step(
            "the node is Ready at its address",
            node_is_ready_at_its_address(&cluster),
        )
        .await;
        step(
            "the worker image runs petl-trainer",
            worker_image_prints_the_trainer_version(&cluster),
        )
        .await;
        step(
            "pods behind a headless Service resolve each other and exchange bytes",
            peers_resolve_each_other_and_exchange_bytes(&cluster),
        )
        .await;
        step(
            "a pod reaches the API server through the kubernetes Service",
            a_pod_reaches_the_api_server_with_its_service_account(&cluster),
        )
        .await;
        if cluster.node().is_some() {
            step(
                "the host reaches a pod IP",
                the_host_reaches_a_pod_ip(&cluster),
            )
            .await;
        }
    };
    // Print the components' logs when a check fails, then fail (the cluster outlives the
    // panic so that its logs can be read).
    if let Err(panic) = AssertUnwindSafe(checks).catch_unwind().await {
        eprintln!("{}", cluster.logs_tail(30));
        std::panic::resume_unwind(panic);
    }

    let Some(node) = cluster.node() else {
        return; // an external cluster: nothing of the host to check
    };
    let node_dir = node.dir().to_path_buf();
    let mut pids: Vec<u32> = node.pids();
    pids.push(node.runtime_pid());
    pids.extend(processes_in_node_cgroups());
    assert!(
        pids.len() > 6,
        "expected container processes in the node's cgroups, found only {pids:?}"
    );
    let netns_before = netns_entries();

    let stopped = cluster.stop().expect("a local cluster has a node");
    assert!(
        stopped.problems.is_empty(),
        "teardown reported problems: {:?}",
        stopped.problems
    );
    teardown_left_nothing_behind(&stopped, &pids, &node_dir, &netns_before);
}

async fn step(name: &str, check: impl std::future::Future<Output = ()>) {
    let started = Instant::now();
    check.await;
    eprintln!("ok: {name} ({:.1}s)", started.elapsed().as_secs_f64());
}

async fn node_is_ready_at_its_address(cluster: &Cluster) {
    let nodes = Api::<Node>::all(cluster.client())
        .list(&ListParams::default())
        .await
        .unwrap();
    assert!(!nodes.items.is_empty(), "the cluster has no nodes");
    let Some(local) = cluster.node() else {
        return;
    };
    let node = nodes
        .items
        .iter()
        .find(|n| n.metadata.name.as_deref() == Some(local.name()))
        .unwrap_or_else(|| panic!("no Node named {}", local.name()));
    let status = node
        .status
        .as_ref()
        .expect("a registered node has a status");
    let addresses: Vec<_> = status
        .addresses
        .iter()
        .flatten()
        .map(|a| (a.type_.as_str(), a.address.as_str()))
        .collect();
    assert!(
        addresses.contains(&("InternalIP", local.ip().to_string().as_str())),
        "{addresses:?}"
    );
    let info = status.node_info.as_ref().expect("node info");
    assert_eq!(
        info.kubelet_version,
        format!("v{}", petl_tests::KUBERNETES_VERSION)
    );
    assert!(
        info.container_runtime_version.starts_with("containerd://"),
        "{}",
        info.container_runtime_version
    );
    let images = local.image_names().unwrap();
    for image in [
        &cluster.images().operator,
        &cluster.images().worker,
        &cluster.images().probe,
    ] {
        assert!(
            images.contains(image),
            "{image} not in containerd: {images:?}"
        );
    }
}

async fn worker_image_prints_the_trainer_version(cluster: &Cluster) {
    let ns = cluster.create_namespace("worker-version").await.unwrap();
    let pod = pod(
        "version",
        &cluster.images().worker,
        &["petl-trainer", "--version"],
        json!({}),
    );
    let logs = run_to_completion(&cluster.client(), &ns, pod).await;
    assert_eq!(
        logs.trim(),
        format!("petl-trainer {}", env!("CARGO_PKG_VERSION"))
    );
}

async fn peers_resolve_each_other_and_exchange_bytes(cluster: &Cluster) {
    let client = cluster.client();
    let ns = cluster.create_namespace("peers").await.unwrap();
    let service: Service = serde_json::from_value(json!({
        "metadata": {"name": "peers"},
        "spec": {
            "clusterIP": "None",
            "selector": {"app": "peers"},
            "ports": [{"name": "exchange", "port": 7000}],
        },
    }))
    .unwrap();
    Api::<Service>::namespaced(client.clone(), &ns)
        .create(&PostParams::default(), &service)
        .await
        .unwrap();
    // Both name forms the operator's workers use: short (search domain) and fully qualified.
    let peer_names = [
        format!("rank-1.peers.{ns}.svc"),
        format!("rank-0.peers.{ns}.svc.cluster.local"),
    ];
    let pods = Api::<Pod>::namespaced(client.clone(), &ns);
    for (rank, peer) in peer_names.iter().enumerate() {
        let name = format!("rank-{rank}");
        let pod = pod(
            &name,
            &cluster.images().probe,
            &[
                "petl-probe",
                "exchange",
                "--port",
                "7000",
                "--name",
                &name,
                "--peer",
                &format!("{peer}:7000"),
            ],
            json!({"hostname": name, "subdomain": "peers"}),
        );
        let mut pod = pod;
        pod.metadata.labels = Some([("app".to_string(), "peers".to_string())].into());
        pods.create(&PostParams::default(), &pod).await.unwrap();
    }
    for rank in 0..2 {
        let name = format!("rank-{rank}");
        let logs = finished_logs(&client, &ns, &name).await;
        let other = 1 - rank;
        assert!(
            logs.contains(&format!("reply: rank-{other} got hello from {name}")),
            "{name}: {logs}"
        );
        assert!(
            logs.contains(&format!(": hello from rank-{other}")),
            "{name}: {logs}"
        );
    }
}

async fn a_pod_reaches_the_api_server_with_its_service_account(cluster: &Cluster) {
    let ns = cluster.create_namespace("in-cluster-api").await.unwrap();
    let pod = pod(
        "api",
        &cluster.images().probe,
        &["petl-probe", "api"],
        json!({}),
    );
    let logs = run_to_completion(&cluster.client(), &ns, pod).await;
    assert!(
        logs.contains(&format!("user: system:serviceaccount:{ns}:default")),
        "{logs}"
    );
    if cluster.is_local() {
        assert!(
            logs.contains(&format!("version: v{}", petl_tests::KUBERNETES_VERSION)),
            "{logs}"
        );
    }
}

async fn the_host_reaches_a_pod_ip(cluster: &Cluster) {
    let client = cluster.client();
    let ns = cluster.create_namespace("host-to-pod").await.unwrap();
    let pod = pod(
        "server",
        &cluster.images().probe,
        &["petl-probe", "serve", "--port", "7000", "--name", "server"],
        json!({}),
    );
    Api::<Pod>::namespaced(client.clone(), &ns)
        .create(&PostParams::default(), &pod)
        .await
        .unwrap();
    let pod = wait_pod_ready(&client, &ns, "server", POD_TIMEOUT)
        .await
        .unwrap();
    let ip = pod
        .status
        .and_then(|s| s.pod_ip)
        .expect("a running pod has an IP");
    // Ready means started, not yet listening: retry the connection briefly.
    let deadline = Instant::now() + Duration::from_secs(30);
    let stream = loop {
        match TcpStream::connect_timeout(
            &format!("{ip}:7000").parse().unwrap(),
            Duration::from_secs(2),
        ) {
            Ok(stream) => break stream,
            Err(e) if Instant::now() > deadline => panic!("connecting to {ip}:7000: {e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    };
    (&stream).write_all(b"from the host\n").unwrap();
    let mut reply = String::new();
    BufReader::new(&stream).read_line(&mut reply).unwrap();
    assert_eq!(reply.trim_end(), "server got from the host");
}

/// A pod that runs `command` in `image` once; `extra` is merged into its spec.
fn pod(name: &str, image: &str, command: &[&str], extra: serde_json::Value) -> Pod {
    let mut spec = json!({
        "restartPolicy": "Never",
        "terminationGracePeriodSeconds": 1,
        "containers": [{
            "name": "main",
            "image": image,
            "imagePullPolicy": "IfNotPresent",
            "command": command,
        }],
    });
    if let (Some(spec), Some(extra)) = (spec.as_object_mut(), extra.as_object()) {
        spec.extend(extra.clone());
    }
    serde_json::from_value(json!({"metadata": {"name": name}, "spec": spec})).unwrap()
}

async fn run_to_completion(client: &Client, ns: &str, pod: Pod) -> String {
    let name = pod.metadata.name.clone().unwrap();
    Api::<Pod>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &pod)
        .await
        .unwrap();
    finished_logs(client, ns, &name).await
}

/// Waits for the pod to end, asserts it succeeded, returns its logs.
async fn finished_logs(client: &Client, ns: &str, name: &str) -> String {
    let pod = wait_pod_finished(client, ns, name, POD_TIMEOUT)
        .await
        .unwrap();
    let logs = pod_logs(client, ns, name, None).await.unwrap();
    let phase = pod.status.as_ref().and_then(|s| s.phase.clone());
    assert_eq!(
        phase.as_deref(),
        Some("Succeeded"),
        "pod {ns}/{name} failed ({}); logs:\n{logs}",
        petl_tests::pods::describe(&pod)
    );
    logs
}

/// Pids of every process in the node's cgroups (containers, pause).
fn processes_in_node_cgroups() -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
                .is_ok_and(|c| c.contains("/petl-node/"))
        })
        .collect()
}

fn netns_entries() -> BTreeSet<String> {
    std::fs::read_dir("/run/netns")
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

fn teardown_left_nothing_behind(
    stopped: &petl_tests::Stopped,
    pids: &[u32],
    node_dir: &Path,
    netns_before: &BTreeSet<String>,
) {
    let alive: Vec<_> = pids
        .iter()
        .filter(|pid| std::path::Path::new(&format!("/proc/{pid}")).exists())
        .collect();
    assert!(alive.is_empty(), "processes outlived the node: {alive:?}");
    assert!(
        processes_in_node_cgroups().is_empty(),
        "processes left in the node's cgroups"
    );
    // The kernel frees the pods' network namespaces (and their veths) asynchronously.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let now = petl_tests::HostState::capture().unwrap();
        if now == stopped.before {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the host differs from before the node:\nbefore {:#?}\nnow {now:#?}",
            stopped.before
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let dir = node_dir.to_string_lossy();
    let left: Vec<_> = mounts
        .lines()
        .filter(|l| l.contains(dir.as_ref()))
        .collect();
    assert!(left.is_empty(), "mounts left behind: {left:?}");
    assert!(!node_dir.exists(), "{} still exists", node_dir.display());
    assert_eq!(
        &netns_entries(),
        netns_before,
        "network namespaces left behind"
    );
}
