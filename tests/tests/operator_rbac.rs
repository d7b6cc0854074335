//! Least privilege, checked on a real API server with the chart as installed: what the
//! operator's ServiceAccount can and cannot do (`kubectl auth can-i --as`), the admission policy
//! that keeps its writes to PetlJobs' objects, and a whole job run by an operator acting as it.

mod support;

use std::time::Duration;

use k8s_openapi::api::core::v1::{ConfigMap, Container, Pod, PodSpec, Secret};
use kube::api::{DeleteParams, ObjectMeta, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client, ResourceExt};
use petl_crds::Phase;
use petl_operator::{Config, Operator};
use petl_tests::{ControlPlane, PodStatusUpdate, repo_root};
use serde_json::json;

use support::*;

const RELEASE: &str = "petl";
const ACCOUNT: &str = "petl-petl-operator";

/// Render the chart and apply it (CRD included) into `namespace`.
async fn install_chart(cp: &ControlPlane, namespace: &str) {
    let chart = repo_root().join("charts/petl-operator");
    let rendered = cp
        .helm(&[
            "template",
            RELEASE,
            chart.to_str().unwrap(),
            "--namespace",
            namespace,
            "--include-crds",
        ])
        .await
        .unwrap();
    assert!(
        rendered.status.success(),
        "{}",
        String::from_utf8_lossy(&rendered.stderr)
    );
    let file = cp.dir().join(format!("chart-{namespace}.yaml"));
    std::fs::write(&file, &rendered.stdout).unwrap();
    let applied = cp
        .kubectl(&[
            "apply",
            "--server-side",
            "-n",
            namespace,
            "-f",
            file.to_str().unwrap(),
        ])
        .await
        .unwrap();
    assert!(
        applied.status.success(),
        "{}",
        String::from_utf8_lossy(&applied.stderr)
    );
    let crd = cp
        .kubectl(&[
            "wait",
            "--for=condition=Established",
            "crd/petljobs.petl.dev",
            "--timeout=60s",
        ])
        .await
        .unwrap();
    assert!(crd.status.success());
}

fn user(release_ns: &str) -> String {
    format!("system:serviceaccount:{release_ns}:{ACCOUNT}")
}

/// `kubectl auth can-i <verb> <resource> [--subresource <sub>] -n <namespace> --as <the
/// operator>`; `resource` may name a subresource as `<resource>/<sub>` (which kubectl alone
/// would read as an object's name).
async fn can_i(cp: &ControlPlane, release_ns: &str, verb: &str, resource: &str, ns: &str) -> bool {
    let user = user(release_ns);
    let mut args = vec!["auth", "can-i", verb];
    match resource.split_once('/') {
        Some((resource, sub)) => args.extend([resource, "--subresource", sub]),
        None => args.push(resource),
    }
    args.extend(["-n", ns, "--as", &user]);
    let out = cp.kubectl(&args).await.unwrap();
    let answer = String::from_utf8_lossy(&out.stdout).trim().to_string();
    match answer.as_str() {
        "yes" => true,
        "no" => false,
        other => panic!(
            "kubectl auth can-i {verb} {resource}: {other:?} {}",
            String::from_utf8_lossy(&out.stderr)
        ),
    }
}

/// A client that acts as the operator's ServiceAccount (the admin impersonates it).
async fn as_operator(cp: &ControlPlane, release_ns: &str) -> Client {
    let kubeconfig = Kubeconfig::read_from(cp.kubeconfig_path()).unwrap();
    let mut config =
        kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
            .await
            .unwrap();
    config.auth_info.impersonate = Some(user(release_ns));
    config.auth_info.impersonate_groups = Some(vec![
        "system:serviceaccounts".into(),
        format!("system:serviceaccounts:{release_ns}"),
        "system:authenticated".into(),
    ]);
    Client::try_from(config).unwrap()
}

fn refusal(result: Result<impl std::fmt::Debug, kube::Error>) -> (u16, String) {
    match result {
        Err(kube::Error::Api(e)) => (e.code, e.message),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[tokio::test]
async fn the_operators_service_account_can_do_what_it_needs_and_nothing_more() {
    let cp = ControlPlane::start().await.expect("control plane starts");
    let release_ns = cp.create_namespace("petl-system").await.unwrap();
    install_chart(&cp, &release_ns).await;
    let jobs_ns = cp.create_namespace("rbac-jobs").await.unwrap();

    let needed = [
        ("get", "petljobs.petl.dev"),
        ("list", "petljobs.petl.dev"),
        ("watch", "petljobs.petl.dev"),
        ("patch", "petljobs.petl.dev"),
        ("delete", "petljobs.petl.dev"),
        ("patch", "petljobs.petl.dev/status"),
        ("update", "petljobs.petl.dev/finalizers"),
        ("list", "pods"),
        ("watch", "pods"),
        ("create", "pods"),
        ("patch", "pods"),
        ("delete", "pods"),
        ("watch", "configmaps"),
        ("patch", "configmaps"),
        ("watch", "services"),
        ("patch", "services"),
        ("create", "secrets"),
        ("create", "events.events.k8s.io"),
        ("patch", "events.events.k8s.io"),
    ];
    let mut wrong = Vec::new();
    for (verb, resource) in needed {
        if !can_i(&cp, &release_ns, verb, resource, &jobs_ns).await {
            wrong.push(format!("cannot {verb} {resource}"));
        }
    }
    let unneeded = [
        ("get", "secrets"),
        ("list", "secrets"),
        ("watch", "secrets"),
        ("update", "secrets"),
        ("patch", "secrets"),
        ("delete", "secrets"),
        ("get", "pods"),
        ("update", "pods"),
        ("update", "pods/status"),
        ("create", "pods/eviction"),
        ("create", "pods/exec"),
        ("get", "pods/log"),
        ("delete", "configmaps"),
        ("delete", "services"),
        ("update", "petljobs.petl.dev"),
        ("create", "petljobs.petl.dev"),
        ("update", "petljobs.petl.dev/status"),
        ("create", "events"),
        ("create", "deployments.apps"),
        ("create", "leases.coordination.k8s.io"),
        ("list", "nodes"),
        ("impersonate", "serviceaccounts"),
        ("create", "serviceaccounts/token"),
    ];
    for (verb, resource) in unneeded {
        if can_i(&cp, &release_ns, verb, resource, &jobs_ns).await {
            wrong.push(format!("may {verb} {resource}"));
        }
    }
    // Leader election: only Leases, only in its own namespace.
    for verb in ["get", "create", "patch"] {
        if !can_i(
            &cp,
            &release_ns,
            verb,
            "leases.coordination.k8s.io",
            &release_ns,
        )
        .await
        {
            wrong.push(format!("cannot {verb} its Lease"));
        }
    }
    if can_i(
        &cp,
        &release_ns,
        "update",
        "leases.coordination.k8s.io",
        &release_ns,
    )
    .await
    {
        wrong.push("may update Leases".into());
    }
    assert!(
        wrong.is_empty(),
        "the chart's RBAC is off:\n{}",
        wrong.join("\n")
    );

    // What RBAC allows, the admission policy narrows to the objects of PetlJobs.
    let operator = as_operator(&cp, &release_ns).await;
    let admin_secrets: Api<Secret> = Api::namespaced(cp.client(), &jobs_ns);
    let someone_elses = Secret {
        metadata: ObjectMeta {
            name: Some("db-password".into()),
            ..ObjectMeta::default()
        },
        string_data: Some([("password".to_string(), "hunter2".to_string())].into()),
        ..Secret::default()
    };
    admin_secrets
        .create(&PostParams::default(), &someone_elses)
        .await
        .unwrap();
    let secrets: Api<Secret> = Api::namespaced(operator.clone(), &jobs_ns);
    assert_eq!(
        refusal(secrets.get("db-password").await).0,
        403,
        "read a Secret"
    );
    assert_eq!(refusal(secrets.list(&Default::default()).await).0, 403);
    let unowned = Secret {
        metadata: ObjectMeta {
            name: Some("planted".into()),
            labels: Some([("petl.dev/job".to_string(), "x".to_string())].into()),
            ..ObjectMeta::default()
        },
        ..Secret::default()
    };
    let (code, message) = refusal(secrets.create(&PostParams::default(), &unowned).await);
    assert_eq!(code, 403, "{message}");
    assert!(message.contains("objects of PetlJobs"), "{message}");

    let config_maps: Api<ConfigMap> = Api::namespaced(operator.clone(), &jobs_ns);
    let unlabelled = ConfigMap {
        metadata: ObjectMeta {
            name: Some("not-a-job".into()),
            ..ObjectMeta::default()
        },
        ..ConfigMap::default()
    };
    let (code, message) = refusal(
        config_maps
            .patch(
                "not-a-job",
                &PatchParams::apply("petl-operator"),
                &Patch::Apply(&unlabelled),
            )
            .await,
    );
    assert_eq!(code, 403, "{message}");

    let admin_pods: Api<Pod> = Api::namespaced(cp.client(), &jobs_ns);
    let bystander = Pod {
        metadata: ObjectMeta {
            name: Some("bystander".into()),
            ..ObjectMeta::default()
        },
        spec: Some(PodSpec {
            containers: vec![Container {
                name: "c".into(),
                image: Some("registry.example/other:1".into()),
                ..Container::default()
            }],
            ..PodSpec::default()
        }),
        ..Pod::default()
    };
    admin_pods
        .create(&PostParams::default(), &bystander)
        .await
        .unwrap();
    let pods: Api<Pod> = Api::namespaced(operator.clone(), &jobs_ns);
    let (code, message) = refusal(pods.delete("bystander", &DeleteParams::default()).await);
    assert_eq!(code, 403, "delete a pod that is no job's: {message}");
    let adopt = json!({"metadata": {"labels": {"petl.dev/job": "x"}}});
    let (code, message) = refusal(
        pods.patch("bystander", &PatchParams::default(), &Patch::Merge(&adopt))
            .await,
    );
    assert_eq!(code, 403, "label a pod that is no job's: {message}");

    // Everything it needs: an operator acting as the ServiceAccount runs a job through its
    // whole life (children, status, events, a lost rank, a restart in place, success, TTL).
    let config = Config {
        namespace: Some(jobs_ns.clone()),
        leader_elect: true,
        lease_namespace: release_ns.clone(),
        trainer_image: Some(IMAGE.into()),
        ..Config::local()
    };
    let op = Operator::start(operator, config)
        .await
        .expect("the operator starts as its ServiceAccount");
    let mut scene = Scene {
        cp: &cp,
        ns: jobs_ns.clone(),
        operator: Some(op),
        jobs: Api::namespaced(cp.client(), &jobs_ns),
        pods: Api::namespaced(cp.client(), &jobs_ns),
    };
    scene
        .create("priv", 2, json!({ "ttlSecondsAfterFinished": 1 }))
        .await;
    let pods = scene.all_ready("priv", 2).await;
    scene
        .wait_status("priv", "Running", |s| s.phase == Some(Phase::Running))
        .await;
    created(
        &Api::<ConfigMap>::namespaced(cp.client(), &jobs_ns),
        "priv-config",
    )
    .await;
    created(&admin_secrets, "priv-snapshot-token").await;
    scene.wait_event("priv", "Running").await;

    scene
        .set_pod(
            "priv-worker-1",
            PodStatusUpdate::failed().container_terminated("trainer", 1, "Error"),
        )
        .await;
    let replacement = scene
        .wait_replaced("priv", 1, &pods[&1].uid().unwrap())
        .await;
    scene
        .set_pod(
            &replacement.name_any(),
            PodStatusUpdate::running()
                .container_running("trainer")
                .ready(),
        )
        .await;
    scene
        .set_pod(
            "priv-worker-0",
            PodStatusUpdate::running()
                .container_running("trainer")
                .restarted("trainer", 1, 75)
                .ready(),
        )
        .await;
    scene
        .wait_status("priv", "two losses counted", |s| {
            s.restarts.as_ref().is_some_and(|r| r.counted == 2)
        })
        .await;
    for rank in 0..2 {
        scene
            .set_pod(
                &format!("priv-worker-{rank}"),
                PodStatusUpdate::succeeded().container_terminated("trainer", 0, "Completed"),
            )
            .await;
    }
    let uid = scene.jobs.get("priv").await.unwrap().uid().unwrap();
    eventually(WAIT, "the TTL deleted the job", || async {
        match scene.jobs.get_opt("priv").await.unwrap() {
            None => true,
            Some(job) => job.uid().as_deref() != Some(uid.as_str()),
        }
    })
    .await;
    let metrics = scene.operator.as_ref().unwrap().metrics.encode();
    assert!(
        !metrics
            .lines()
            .filter(|l| l.starts_with("petl_operator_reconcile_errors_total{"))
            .any(|l| !l.ends_with(" 0")),
        "reconciles failed as the ServiceAccount:\n{metrics}"
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    scene.stop_operator().await;
}
