//! Jobs the API server admits but the cluster cannot run as they are, on a real control plane
//! whose controller manager creates no ServiceAccounts: what waiting can fix is shown in a
//! condition and a Warning event while the operator retries; what it cannot ends the job Failed.

mod support;

use std::future::Future;
use std::sync::LazyLock;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Namespace, Pod, ServiceAccount};
use k8s_openapi::api::scheduling::v1::PriorityClass;
use kube::api::{DeleteParams, ObjectMeta, PostParams};
use kube::{Api, ResourceExt};
use petl_crds::{ConditionType, Phase};
use petl_tests::{ControlPlane, ControlPlaneOptions, DEFAULT_CONTROLLERS, PodStatusUpdate};
use serde_json::json;
use tokio::runtime::Runtime;
use tokio::sync::OnceCell;

use support::*;

static RUNTIME: LazyLock<Runtime> = LazyLock::new(|| {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
});
static CLUSTER: OnceCell<ControlPlane> = OnceCell::const_new();

fn run<F: Future>(test: F) -> F::Output {
    RUNTIME.block_on(test)
}

/// A control plane without the ServiceAccount controllers: a new namespace has no `default`
/// ServiceAccount until a test creates it.
async fn cluster() -> &'static ControlPlane {
    CLUSTER
        .get_or_init(|| async {
            let controllers = DEFAULT_CONTROLLERS
                .iter()
                .filter(|c| !c.starts_with("serviceaccount"))
                .map(|c| c.to_string())
                .collect();
            let cp = ControlPlane::start_with(ControlPlaneOptions {
                controllers,
                ..ControlPlaneOptions::default()
            })
            .await
            .expect("control plane starts");
            install_crd(&cp.client()).await;
            cp
        })
        .await
}

/// A namespace with no ServiceAccount in it.
async fn bare_namespace(cp: &ControlPlane, name: &str) -> String {
    let name = format!("{name}-{}", std::process::id());
    let namespace = Namespace {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            ..ObjectMeta::default()
        },
        ..Namespace::default()
    };
    Api::<Namespace>::all(cp.client())
        .create(&PostParams::default(), &namespace)
        .await
        .expect("namespace");
    name
}

async fn create_service_account(cp: &ControlPlane, ns: &str) {
    let account = ServiceAccount {
        metadata: ObjectMeta {
            name: Some("default".into()),
            ..ObjectMeta::default()
        },
        ..ServiceAccount::default()
    };
    Api::<ServiceAccount>::namespaced(cp.client(), ns)
        .create(&PostParams::default(), &account)
        .await
        .expect("ServiceAccount");
}

/// A namespace ready for pods, and an operator watching it.
async fn scene(base: &str) -> Scene<'_> {
    let cp = cluster().await;
    let ns = bare_namespace(cp, base).await;
    create_service_account(cp, &ns).await;
    Scene::in_namespace(cp, ns, |_| {}).await
}

fn running_reason(status: &petl_crds::PetlJobStatus) -> Option<(String, String)> {
    status
        .condition(ConditionType::Running)
        .map(|c| (c.reason.clone(), c.message.clone()))
}

#[test]
fn a_missing_service_account_holds_the_job_with_a_condition_until_it_exists() {
    run(async {
        let cp = cluster().await;
        if !cp.is_local() {
            eprintln!("skipped: needs a control plane that creates no ServiceAccounts");
            return;
        }
        let ns = bare_namespace(cp, "adm-no-sa").await;
        let scene = Scene::in_namespace(cp, ns, |_| {}).await;
        scene.create("nosa", 1, json!({})).await;
        let status = scene
            .wait_status("nosa", "the refusal in a condition", |s| {
                running_reason(s).is_some_and(|(r, _)| r == "CreateRefused")
            })
            .await;
        let (_, message) = running_reason(&status).unwrap();
        assert!(
            message.contains("serviceaccount") && message.contains("retrying in"),
            "{message}"
        );
        let note = scene.wait_event("nosa", "CreateRefused").await;
        assert!(note.contains("the pod of rank 0"), "{note}");
        assert!(scene.pods_by_rank("nosa").await.is_empty());
        assert!(!status.is_finished(), "waiting can fix it: no failure");

        create_service_account(cp, &scene.ns).await;
        // Retried with backoff (5 s, then 10 s, ...): the pod comes within the next attempts.
        scene.wait_pods("nosa", 1).await;
        scene
            .wait_status("nosa", "the refusal cleared", |s| {
                running_reason(s).is_some_and(|(r, _)| r != "CreateRefused")
            })
            .await;
        scene.finish().await;
    });
}

#[test]
fn a_missing_priority_class_waits_and_the_job_starts_once_it_exists() {
    run(async {
        let scene = scene("adm-prio").await;
        let class_name = format!("{}-train", scene.ns);
        let job = job(
            "prio",
            1,
            json!({}),
            json!({ "priorityClassName": class_name }),
        );
        scene.create_job(job).await;
        let status = scene
            .wait_status("prio", "the refusal in a condition", |s| {
                running_reason(s).is_some_and(|(r, _)| r == "CreateRefused")
            })
            .await;
        let (_, message) = running_reason(&status).unwrap();
        assert!(message.contains(&class_name), "{message}");
        scene.wait_event("prio", "CreateRefused").await;

        let classes: Api<PriorityClass> = Api::all(scene.cp.client());
        let class = PriorityClass {
            metadata: ObjectMeta {
                name: Some(class_name.clone()),
                ..Default::default()
            },
            value: Some(100),
            ..Default::default()
        };
        classes
            .create(&PostParams::default(), &class)
            .await
            .expect("priority class");
        scene.wait_pods("prio", 1).await;
        classes
            .delete(&class_name, &DeleteParams::default())
            .await
            .expect("priority class deleted");
        scene.finish().await;
    });
}

#[test]
fn a_pod_the_api_server_refuses_fails_the_job_with_its_reason() {
    run(async {
        let scene = scene("adm-invalid").await;
        // A toleration key with a space: the CRD's rules leave key syntax to the pod's
        // validation, which refuses it.
        let job = job(
            "bad",
            2,
            json!({}),
            json!({ "tolerations": [{ "key": "bad key", "operator": "Equal", "value": "x" }] }),
        );
        scene.create_job(job).await;
        let status = scene
            .wait_status("bad", "Failed", |s| failed_with(s, "RefusedByAPIServer"))
            .await;
        let message = &status.condition(ConditionType::Failed).unwrap().message;
        assert!(
            message.contains("was refused as invalid") && message.contains("tolerations"),
            "{message}"
        );
        assert_eq!(status.phase, Some(Phase::Failed));
        let note = scene.wait_event("bad", "RefusedByAPIServer").await;
        assert!(note.contains("tolerations"), "{note}");
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(scene.pods_by_rank("bad").await.is_empty());

        // Requests above limits: admitted (quantities are beyond the CRD's CEL budget), then
        // refused by the pod's validation, which ends the job with that reason.
        let greedy = support::job(
            "greedy",
            1,
            json!({}),
            json!({ "resources": { "requests": { "cpu": "2" }, "limits": { "cpu": "1" } } }),
        );
        scene.create_job(greedy).await;
        let status = scene
            .wait_status("greedy", "Failed", |s| failed_with(s, "RefusedByAPIServer"))
            .await;
        let message = &status.condition(ConditionType::Failed).unwrap().message;
        assert!(
            message.contains("must be less than or equal to cpu limit"),
            "{message}"
        );
        scene.wait_event("greedy", "RefusedByAPIServer").await;
        scene.finish().await;
    });
}

#[test]
fn a_pod_that_cannot_start_says_why_and_an_unparseable_image_fails_the_job() {
    run(async {
        let scene = scene("adm-blocked").await;
        scene.create("blk", 2, json!({})).await;
        scene.wait_pods("blk", 2).await;
        // What the kubelet reports for a missing Secret named by the spec, and the scheduler
        // for a missing PersistentVolumeClaim.
        scene
            .set_pod(
                "blk-worker-0",
                PodStatusUpdate::pending().container_waiting_because(
                    "trainer",
                    "CreateContainerConfigError",
                    "secret \"s3-creds\" not found",
                ),
            )
            .await;
        scene
            .set_pod(
                "blk-worker-1",
                PodStatusUpdate::pending().unschedulable(
                    "0/1 nodes are available: persistentvolumeclaim \"data\" not found",
                ),
            )
            .await;
        let status = scene
            .wait_status("blk", "the blocked reason", |s| {
                running_reason(s).is_some_and(|(r, _)| r == "CreateContainerConfigError")
            })
            .await;
        let (_, message) = running_reason(&status).unwrap();
        assert!(message.contains("s3-creds"), "{message}");
        let note = scene.wait_event("blk", "WorkerBlocked").await;
        assert!(note.contains("rank 0"), "{note}");
        assert!(
            !status.is_finished(),
            "the kubelet retries; waiting can fix it"
        );

        scene
            .set_pod(
                "blk-worker-0",
                PodStatusUpdate::pending().container_waiting_because(
                    "trainer",
                    "InvalidImageName",
                    "Failed to apply default image tag \"Bad Image\": couldn't parse image name",
                ),
            )
            .await;
        let status = scene
            .wait_status("blk", "Failed", |s| failed_with(s, "Unrunnable"))
            .await;
        let message = &status.condition(ConditionType::Failed).unwrap().message;
        assert!(message.contains("InvalidImageName"), "{message}");
        scene.finish().await;
    });
}

#[test]
fn a_pod_of_another_owner_holding_a_ranks_name_is_reported_until_it_goes() {
    run(async {
        let scene = scene("adm-taken").await;
        let squatter = Pod {
            metadata: ObjectMeta {
                name: Some("tk-worker-1".into()),
                ..ObjectMeta::default()
            },
            spec: Some(k8s_openapi::api::core::v1::PodSpec {
                containers: vec![k8s_openapi::api::core::v1::Container {
                    name: "c".into(),
                    image: Some("registry.example/other:1".into()),
                    ..Default::default()
                }],
                ..Default::default()
            }),
            ..Pod::default()
        };
        scene
            .pods
            .create(&PostParams::default(), &squatter)
            .await
            .expect("squatter");
        scene.create("tk", 2, json!({})).await;
        let status = scene
            .wait_status("tk", "the taken name in a condition", |s| {
                running_reason(s).is_some_and(|(r, _)| r == "PodNameTaken")
            })
            .await;
        let (_, message) = running_reason(&status).unwrap();
        assert!(message.contains("tk-worker-1"), "{message}");
        scene.wait_event("tk", "CreateRefused").await;

        scene
            .pods
            .delete("tk-worker-1", &DeleteParams::default().grace_period(0))
            .await
            .expect("squatter deleted");
        let pods = scene.wait_pods("tk", 2).await;
        assert!(
            pods[&1]
                .owner_references()
                .iter()
                .any(|o| o.kind == "PetlJob"),
            "rank 1 is the job's own pod now"
        );
        scene.finish().await;
    });
}
