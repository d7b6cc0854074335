//! The operator's chart on a real cluster: `helm install` runs two replicas from the operator
//! image (non-root, read-only root), they elect one leader, Prometheus scrapes both pods,
//! `helm upgrade` with a changed value rolls them, and `helm uninstall` takes everything of the
//! release away.

use std::collections::BTreeMap;
use std::panic::AssertUnwindSafe;
use std::time::{Duration, Instant};

use futures::FutureExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use kube::api::ListParams;
use kube::{Api, Client};
use petl_tests::e2e::Release;
use petl_tests::{Cluster, PodScrape, Prometheus};

const RELEASE: &str = "petl";
/// The operator's Lease name (its `--lease-name` default; the chart does not change it).
const LEASE: &str = "petl-operator";
const TIMEOUT: Duration = Duration::from_secs(180);
const POLL: Duration = Duration::from_millis(500);

#[tokio::test]
async fn helm_installs_upgrades_and_uninstalls_the_operator_which_elects_one_leader() {
    let cluster = Cluster::start()
        .await
        .unwrap_or_else(|e| panic!("cluster did not start: {e}"));
    let ns = cluster.create_namespace("petl-system").await.unwrap();
    let checks = async {
        let started = Instant::now();
        let release = Release::install(&cluster, RELEASE, &ns, &[])
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let pods = ready_operator_pods(&cluster, &ns, 2).await;
        eprintln!(
            "ok: helm install, 2 operator pods Ready ({:.0}s)",
            started.elapsed().as_secs_f64()
        );
        let leader = lease_holder(&cluster.client(), &ns, &pods).await;
        eprintln!("ok: {leader} holds the lease");
        if cluster.node().is_some() {
            prometheus_sees_one_leader(&cluster, &ns, &pods, &leader).await;
        } else {
            eprintln!(
                "skipped: Prometheus scrapes pod IPs, which only the local node routes to this machine"
            );
        }

        let started = Instant::now();
        release
            .upgrade(&cluster, &[("logLevel", "debug")])
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let upgraded = ready_operator_pods(&cluster, &ns, 2).await;
        for pod in &upgraded {
            assert_eq!(
                env(pod, "RUST_LOG").as_deref(),
                Some("debug"),
                "{}",
                name(pod)
            );
        }
        lease_holder(&cluster.client(), &ns, &upgraded).await;
        eprintln!(
            "ok: helm upgrade rolled both pods to the new value, one holds the lease ({:.0}s)",
            started.elapsed().as_secs_f64()
        );

        let started = Instant::now();
        release
            .uninstall(&cluster)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        nothing_of_the_release_is_left(&cluster, &ns).await;
        eprintln!(
            "ok: helm uninstall left nothing of the release ({:.0}s)",
            started.elapsed().as_secs_f64()
        );
    };
    if let Err(panic) = AssertUnwindSafe(checks).catch_unwind().await {
        eprintln!("{}", cluster.logs_tail(30));
        std::panic::resume_unwind(panic);
    }
}

/// Waits until exactly `count` operator pods exist, all Ready and none terminating, and checks
/// how each runs: the operator image, non-root, read-only root filesystem.
async fn ready_operator_pods(cluster: &Cluster, ns: &str, count: usize) -> Vec<Pod> {
    let api = Api::<Pod>::namespaced(cluster.client(), ns);
    let selector = format!("app.kubernetes.io/instance={RELEASE}");
    let deadline = Instant::now() + TIMEOUT;
    let pods = loop {
        let pods = api
            .list(&ListParams::default().labels(&selector))
            .await
            .unwrap()
            .items;
        let ready = pods
            .iter()
            .filter(|p| p.metadata.deletion_timestamp.is_none() && is_ready(p))
            .count();
        if pods.len() == count && ready == count {
            break pods;
        }
        assert!(
            Instant::now() < deadline,
            "not {count} Ready operator pods within {}s: {:?}",
            TIMEOUT.as_secs(),
            pods.iter()
                .map(|p| format!("{}: {}", name(p), petl_tests::pods::describe(p)))
                .collect::<Vec<_>>()
        );
        tokio::time::sleep(POLL).await;
    };
    for pod in &pods {
        let spec = pod.spec.as_ref().unwrap();
        let container = &spec.containers[0];
        assert_eq!(
            container.image.as_deref(),
            Some(cluster.images().operator.as_str())
        );
        let security = container
            .security_context
            .as_ref()
            .expect("a security context");
        assert_eq!(
            security.read_only_root_filesystem,
            Some(true),
            "{}",
            name(pod)
        );
        assert_eq!(
            security.allow_privilege_escalation,
            Some(false),
            "{}",
            name(pod)
        );
        let user = security
            .run_as_user
            .or(spec.security_context.as_ref().and_then(|s| s.run_as_user));
        assert!(user.is_some_and(|u| u != 0), "{} runs as root", name(pod));
    }
    pods
}

/// Waits until the Lease names one of `pods` as holder, and returns that pod's name.
async fn lease_holder(client: &Client, ns: &str, pods: &[Pod]) -> String {
    let leases = Api::<Lease>::namespaced(client.clone(), ns);
    let names: Vec<String> = pods.iter().map(name).collect();
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let holder = leases
            .get_opt(LEASE)
            .await
            .unwrap()
            .and_then(|l| l.spec)
            .and_then(|s| s.holder_identity);
        if let Some(holder) = holder.filter(|h| names.contains(h)) {
            return holder;
        }
        assert!(
            Instant::now() < deadline,
            "no pod of {names:?} holds Lease {ns}/{LEASE}"
        );
        tokio::time::sleep(POLL).await;
    }
}

/// Prometheus discovers the operator pods through the API server and scrapes each: both
/// report `petl_operator_leader`, and it is 1 for the Lease holder only.
async fn prometheus_sees_one_leader(cluster: &Cluster, ns: &str, pods: &[Pod], leader: &str) {
    let started = Instant::now();
    let deployment = Api::<Deployment>::namespaced(cluster.client(), ns)
        .list(&ListParams::default().labels(&format!("app.kubernetes.io/instance={RELEASE}")))
        .await
        .unwrap()
        .items
        .pop()
        .expect("the chart has a Deployment");
    let match_labels: BTreeMap<String, String> = deployment
        .spec
        .and_then(|s| s.selector.match_labels)
        .expect("the Deployment selects by labels");
    let scrape = PodScrape {
        job: "petl-operator".into(),
        namespaces: vec![ns.to_string()],
        match_labels,
        labels_present: Vec::new(),
        ports: vec!["metrics".into()],
    };
    let prometheus = Prometheus::start_pods(cluster.kubeconfig_path(), &[scrape])
        .await
        .unwrap();
    let query = format!("petl_operator_leader{{namespace=\"{ns}\"}}");
    let deadline = Instant::now() + Duration::from_secs(60);
    let samples = loop {
        let samples = prometheus.query(&query).await.unwrap();
        if samples.len() == pods.len() {
            break samples;
        }
        assert!(
            Instant::now() < deadline,
            "Prometheus did not scrape {} operator pods: {samples:?}; targets in {}",
            pods.len(),
            prometheus.dir().display()
        );
        tokio::time::sleep(POLL).await;
    };
    let leaders: Vec<&str> = samples
        .iter()
        .filter(|s| s.value == 1.0)
        .map(|s| s.labels["pod"].as_str())
        .collect();
    assert_eq!(leaders, [leader], "{samples:?}");
    eprintln!(
        "ok: Prometheus scraped both operator pods; only {leader} reports leadership ({:.0}s)",
        started.elapsed().as_secs_f64()
    );
}

/// After `helm uninstall`: no pod, Deployment, ReplicaSet, Service, ServiceAccount, Role(Binding)
/// or helm record of the release in its namespace, and no ClusterRole(Binding) of it. The CRD
/// stays, as helm keeps every CRD of a chart's crds/ folder (deleting it would delete every
/// PetlJob of every user). The operator's Lease is its own runtime record, not the chart's.
async fn nothing_of_the_release_is_left(cluster: &Cluster, ns: &str) {
    let client = cluster.client();
    let selector = format!("app.kubernetes.io/instance={RELEASE}");
    let params = ListParams::default().labels(&selector);
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let pods = Api::<Pod>::namespaced(client.clone(), ns)
            .list(&ListParams::default())
            .await
            .unwrap();
        if pods.items.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "operator pods outlived the release: {:?}",
            pods.items.iter().map(name).collect::<Vec<_>>()
        );
        tokio::time::sleep(POLL).await;
    }
    let kinds = [
        "deployments",
        "replicasets",
        "services",
        "serviceaccounts",
        "configmaps",
        "secrets",
        "roles",
        "rolebindings",
        "endpointslices",
    ];
    for kind in kinds {
        let out = cluster
            .kubectl(&["get", kind, "-n", ns, "-o", "name", "--ignore-not-found"])
            .await
            .unwrap();
        let left: Vec<String> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| !matches!(*l, "serviceaccount/default" | "configmap/kube-root-ca.crt"))
            .map(str::to_string)
            .collect();
        assert!(left.is_empty(), "left behind in {ns}: {left:?}");
    }
    let roles = Api::<ClusterRole>::all(client.clone())
        .list(&params)
        .await
        .unwrap();
    assert!(
        roles.items.is_empty(),
        "ClusterRoles left: {:?}",
        roles
            .items
            .iter()
            .map(|r| r.metadata.name.clone())
            .collect::<Vec<_>>()
    );
    let bindings = Api::<ClusterRoleBinding>::all(client.clone())
        .list(&params)
        .await
        .unwrap();
    assert!(
        bindings.items.is_empty(),
        "ClusterRoleBindings left: {:?}",
        bindings
            .items
            .iter()
            .map(|r| r.metadata.name.clone())
            .collect::<Vec<_>>()
    );
    let crd = cluster
        .kubectl(&["get", "crd", "petljobs.petl.dev", "-o", "name"])
        .await
        .unwrap();
    assert!(
        crd.status.success(),
        "helm keeps the chart's CRD on uninstall"
    );
}

fn name(pod: &Pod) -> String {
    pod.metadata.name.clone().unwrap_or_default()
}

fn is_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

fn env(pod: &Pod, variable: &str) -> Option<String> {
    pod.spec.as_ref()?.containers[0]
        .env
        .as_ref()?
        .iter()
        .find(|e| e.name == variable)?
        .value
        .clone()
}
