//! The local control plane is real: the API server serves, the controller manager
//! collects garbage, kubectl/helm/CRDs/pod-status helpers work, and nothing outlives it.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{ConfigMap, Container, Namespace, Pod, PodSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::{DeleteParams, ObjectMeta, PostParams};
use kube::{Api, Resource, ResourceExt};
use nix::sys::signal::killpg;
use nix::unistd::Pid;
use petl_tests::{ControlPlane, PodStatusUpdate};

async fn start() -> ControlPlane {
    match ControlPlane::start().await {
        Ok(cp) => {
            eprintln!(
                "control plane ready in {:.1}s",
                cp.startup_time().as_secs_f64()
            );
            cp
        }
        Err(e) => panic!("control plane did not start: {e}"),
    }
}

fn config_map(name: &str, owner: Option<&ConfigMap>) -> ConfigMap {
    ConfigMap {
        metadata: ObjectMeta {
            name: Some(name.into()),
            owner_references: owner.map(|o| {
                vec![OwnerReference {
                    api_version: "v1".into(),
                    kind: "ConfigMap".into(),
                    name: o.name_any(),
                    uid: o.meta().uid.clone().expect("a created object has a uid"),
                    ..OwnerReference::default()
                }]
            }),
            ..ObjectMeta::default()
        },
        data: Some(BTreeMap::from([("k".to_string(), "v".to_string())])),
        ..ConfigMap::default()
    }
}

#[tokio::test]
async fn serves_the_api_and_creates_unique_namespaces() {
    let cp = start().await;
    let version = cp.client().apiserver_version().await.unwrap();
    if cp.is_local() {
        assert_eq!(
            version.git_version,
            format!("v{}", petl_tests::KUBERNETES_VERSION)
        );
    }

    let a = cp.create_namespace("Serves the API").await.unwrap();
    let b = cp.create_namespace("Serves the API").await.unwrap();
    assert_ne!(a, b, "namespace names must be unique per call");
    assert!(a.starts_with("serves-the-api-"), "{a}");
    let namespaces = Api::<Namespace>::all(cp.client());
    assert!(namespaces.get_opt(&a).await.unwrap().is_some());

    let out = cp
        .kubectl(&["get", "namespace", &b, "-o", "jsonpath={.metadata.name}"])
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), b);
}

#[tokio::test]
async fn garbage_collects_a_config_map_after_its_owner_is_deleted() {
    let cp = start().await;
    let ns = cp.create_namespace("gc").await.unwrap();
    let maps = Api::<ConfigMap>::namespaced(cp.client(), &ns);
    let pp = PostParams::default();
    let owner = maps.create(&pp, &config_map("owner", None)).await.unwrap();
    maps.create(&pp, &config_map("dependent", Some(&owner)))
        .await
        .unwrap();
    maps.create(&pp, &config_map("bystander", None))
        .await
        .unwrap();

    maps.delete("owner", &DeleteParams::background())
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while maps.get_opt("dependent").await.unwrap().is_some() {
        assert!(
            Instant::now() < deadline,
            "dependent ConfigMap not garbage-collected within 60s\n{}",
            cp.logs_tail(30)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        maps.get_opt("bystander").await.unwrap().is_some(),
        "an object without owner must survive"
    );
}

#[tokio::test]
async fn teardown_leaves_no_processes_behind_even_after_a_panic() {
    let cp = start().await;
    if !cp.is_local() {
        return; // an external cluster is not ours to tear down
    }
    let pids = cp.pids();
    assert_eq!(pids.len(), 3);
    assert!(pids.iter().all(|&p| group_alive(p)));
    drop(cp);
    for pid in &pids {
        assert!(!group_alive(*pid), "process group {pid} survived drop");
    }

    // A test that panics while holding a control plane must not leak it either.
    let (tx, rx) = tokio::sync::oneshot::channel();
    let panicking = tokio::spawn(async move {
        let cp = ControlPlane::start().await.unwrap();
        tx.send(cp.pids()).unwrap();
        panic!("simulated test failure");
    });
    let pids = rx.await.unwrap();
    assert!(panicking.await.unwrap_err().is_panic());
    for pid in &pids {
        assert!(!group_alive(*pid), "process group {pid} survived a panic");
    }
}

#[tokio::test]
async fn sets_pod_outcomes_installs_crds_and_runs_helm() {
    let cp = start().await;
    let ns = cp.create_namespace("helpers").await.unwrap();

    // Pod outcomes through the status subresource.
    let pods = Api::<Pod>::namespaced(cp.client(), &ns);
    let pod = Pod {
        metadata: ObjectMeta {
            name: Some("worker-0".into()),
            ..ObjectMeta::default()
        },
        spec: Some(PodSpec {
            containers: vec![Container {
                name: "trainer".into(),
                image: Some("petl/trainer:test".into()),
                ..Container::default()
            }],
            ..PodSpec::default()
        }),
        ..Pod::default()
    };
    pods.create(&PostParams::default(), &pod).await.unwrap();
    let update = PodStatusUpdate::failed()
        .container_terminated("trainer", 137, "OOMKilled")
        .restart_count("trainer", 2)
        .disruption_target("PreemptionByScheduler");
    cp.set_pod_status(&ns, "worker-0", &update).await.unwrap();
    let status = pods.get("worker-0").await.unwrap().status.unwrap();
    assert_eq!(status.phase.as_deref(), Some("Failed"));
    let container = &status.container_statuses.unwrap()[0];
    assert_eq!(container.image, "petl/trainer:test");
    assert_eq!(container.restart_count, 2);
    let terminated = container
        .state
        .as_ref()
        .unwrap()
        .terminated
        .as_ref()
        .unwrap();
    assert_eq!(terminated.exit_code, 137);
    let disruption = status
        .conditions
        .unwrap()
        .into_iter()
        .find(|c| c.type_ == "DisruptionTarget")
        .expect("DisruptionTarget condition");
    assert_eq!(disruption.status, "True");
    assert_eq!(disruption.reason.as_deref(), Some("PreemptionByScheduler"));

    let wrong = PodStatusUpdate::running().container_running("no-such-container");
    let err = cp
        .set_pod_status(&ns, "worker-0", &wrong)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("no-such-container") && err.contains("trainer"),
        "{err}"
    );

    // CRDs: server-side applied and Established, then usable.
    let crd_dir = tempfile::tempdir().unwrap();
    std::fs::write(crd_dir.path().join("widgets.yaml"), WIDGET_CRD).unwrap();
    std::fs::write(crd_dir.path().join("README.md"), "not a CRD").unwrap();
    let names = cp.install_crds(crd_dir.path()).await.unwrap();
    assert_eq!(names, vec!["widgets.test.petl.dev".to_string()]);
    let out = cp.kubectl(&["get", "widgets", "-n", &ns]).await.unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Helm installs a chart into the cluster.
    let chart = tempfile::tempdir().unwrap();
    std::fs::create_dir(chart.path().join("templates")).unwrap();
    std::fs::write(
        chart.path().join("Chart.yaml"),
        "apiVersion: v2\nname: probe\nversion: 0.1.0\n",
    )
    .unwrap();
    std::fs::write(
        chart.path().join("templates/cm.yaml"),
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {{ .Release.Name }}-probe\ndata:\n  answer: {{ .Values.answer | quote }}\n",
    )
    .unwrap();
    std::fs::write(chart.path().join("values.yaml"), "answer: \"42\"\n").unwrap();
    let chart_path = chart.path().to_str().unwrap();
    let out = cp
        .helm(&[
            "install",
            "probe",
            chart_path,
            "-n",
            &ns,
            "--wait",
            "--timeout",
            "60s",
        ])
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let installed = Api::<ConfigMap>::namespaced(cp.client(), &ns)
        .get("probe-probe")
        .await
        .unwrap();
    assert_eq!(installed.data.unwrap()["answer"], "42");
}

const WIDGET_CRD: &str = r#"
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: widgets.test.petl.dev
spec:
  group: test.petl.dev
  names: {kind: Widget, plural: widgets, singular: widget}
  scope: Namespaced
  versions:
  - name: v1
    served: true
    storage: true
    schema:
      openAPIV3Schema:
        type: object
        x-kubernetes-preserve-unknown-fields: true
---
"#;

/// Whether any process of group `pgid` exists (signal 0 probes without sending).
fn group_alive(pgid: u32) -> bool {
    killpg(Pid::from_raw(pgid as i32), None).is_ok()
}
