//! The Helm chart is valid: `helm lint` passes, everything `helm template` renders (CRD, RBAC,
//! admission policy, Deployment, Service, monitors, dashboard) is accepted by a real API server,
//! and a real `helm install`, `upgrade` and `uninstall` leave what they should.

use std::path::PathBuf;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec,
};
use kube::Api;
use kube::api::PostParams;
use petl_tests::{ControlPlane, repo_root};

fn chart() -> PathBuf {
    repo_root().join("charts/petl-operator")
}

/// The stdout of a command that must have succeeded.
fn stdout(output: &std::process::Output) -> String {
    assert!(
        output.status.success(),
        "command failed ({}): {}{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

async fn start() -> ControlPlane {
    ControlPlane::start()
        .await
        .unwrap_or_else(|e| panic!("control plane did not start: {e}"))
}

#[tokio::test]
async fn chart_lints_and_its_manifests_apply_to_the_api_server() {
    let cp = start().await;
    let chart = chart();
    let chart = chart.to_str().expect("utf-8 repo path");

    let lint = cp.helm(&["lint", "--strict", chart]).await.unwrap();
    assert!(
        stdout(&lint).contains("1 chart(s) linted, 0 chart(s) failed"),
        "{}",
        stdout(&lint)
    );
    let bad = cp
        .helm(&["lint", chart, "--set", "logFormat=xml"])
        .await
        .unwrap();
    let complaint =
        String::from_utf8_lossy(&bad.stdout).into_owned() + &String::from_utf8_lossy(&bad.stderr);
    assert!(
        !bad.status.success(),
        "values.schema.json must refuse logFormat=xml"
    );
    assert!(complaint.contains("logFormat"), "{complaint}");

    let ns = cp.create_namespace("helm-chart").await.unwrap();
    let rendered = cp
        .helm(&[
            "template",
            "petl",
            chart,
            "--namespace",
            &ns,
            "--include-crds",
        ])
        .await
        .unwrap();
    let manifests = cp.dir().join("rendered.yaml");
    std::fs::write(&manifests, stdout(&rendered)).unwrap();
    let manifests = manifests.to_str().unwrap();
    let applied = cp
        .kubectl(&[
            "apply",
            "--server-side",
            "--field-manager",
            "helm-test",
            "-n",
            &ns,
            "-f",
            manifests,
        ])
        .await
        .unwrap_or_else(|e| panic!("rendered chart refused by the API server: {e}"));
    let applied = stdout(&applied);
    for object in [
        "customresourcedefinition.apiextensions.k8s.io/petljobs.petl.dev",
        "serviceaccount/petl-petl-operator",
        "clusterrole.rbac.authorization.k8s.io/petl-petl-operator",
        "clusterrolebinding.rbac.authorization.k8s.io/petl-petl-operator",
        "role.rbac.authorization.k8s.io/petl-petl-operator-leader-election",
        "rolebinding.rbac.authorization.k8s.io/petl-petl-operator-leader-election",
        "service/petl-petl-operator-metrics",
        "deployment.apps/petl-petl-operator",
        "validatingadmissionpolicy.admissionregistration.k8s.io/petl-petl-operator-owned-objects",
        "validatingadmissionpolicybinding.admissionregistration.k8s.io/petl-petl-operator-owned-objects",
    ] {
        assert!(applied.contains(object), "{object} not applied:\n{applied}");
    }

    let deployment = Api::<Deployment>::namespaced(cp.client(), &ns)
        .get("petl-petl-operator")
        .await
        .unwrap();
    let spec = deployment.spec.unwrap();
    assert_eq!(spec.replicas, Some(2));
    let pod = spec.template.spec.unwrap();
    let container = &pod.containers[0];
    // Images are petl's own, at the chart's appVersion: never `latest`, never a placeholder.
    assert_eq!(
        container.image.as_deref(),
        Some("localhost/petl-operator:0.1.0")
    );
    let value = |name: &str| {
        container
            .env
            .iter()
            .flatten()
            .find(|e| e.name == name)
            .and_then(|e| e.value.clone())
    };
    assert_eq!(
        value("PETL_TRAINER_IMAGE").as_deref(),
        Some("localhost/petl-worker:0.1.0")
    );
    assert_eq!(
        value("PETL_TRAINER_CUDA_IMAGE").as_deref(),
        Some("localhost/petl-worker-cuda:0.1.0")
    );
    assert_eq!(value("PETL_WORKER_METRICS_PORT").as_deref(), Some("9100"));
    assert!(
        !stdout(&rendered).contains(":latest"),
        "no image of the chart is tagged latest"
    );
    let args = container.args.clone().unwrap_or_default();
    assert_eq!(
        args,
        [
            "--leader-elect",
            "--metrics-addr",
            "0.0.0.0:8080",
            "--log-format",
            "json"
        ]
    );
    let security = container.security_context.clone().unwrap();
    assert_eq!(security.read_only_root_filesystem, Some(true));
    assert_eq!(security.run_as_non_root, Some(true));
    assert_eq!(security.allow_privilege_escalation, Some(false));
    assert_eq!(
        security.capabilities.unwrap().drop,
        Some(vec!["ALL".to_string()])
    );
    assert_eq!(security.seccomp_profile.unwrap().type_, "RuntimeDefault");
    let env: Vec<_> = container.env.clone().unwrap_or_default();
    let from_field = |name: &str| {
        env.iter().find(|e| e.name == name).and_then(|e| {
            e.value_from
                .as_ref()?
                .field_ref
                .as_ref()
                .map(|f| f.field_path.clone())
        })
    };
    assert_eq!(from_field("POD_NAME").as_deref(), Some("metadata.name"));
    assert_eq!(
        from_field("POD_NAMESPACE").as_deref(),
        Some("metadata.namespace")
    );
    let probe_path = |p: &Option<k8s_openapi::api::core::v1::Probe>| {
        p.as_ref()
            .and_then(|p| p.http_get.as_ref())
            .and_then(|h| h.path.clone())
    };
    assert_eq!(
        probe_path(&container.liveness_probe).as_deref(),
        Some("/healthz")
    );
    assert_eq!(
        probe_path(&container.readiness_probe).as_deref(),
        Some("/readyz")
    );

    // Least privilege, checked by the API server's own authorizer.
    let account = format!("system:serviceaccount:{ns}:petl-petl-operator");
    let reviews = Api::<SubjectAccessReview>::all(cp.client());
    let can = |verb: &'static str, resource: &'static str, namespace: String| {
        let reviews = reviews.clone();
        let account = account.clone();
        let ns = ns.clone();
        async move {
            let (resource, subresource) = resource
                .split_once('/')
                .map_or((resource, None), |(r, s)| (r, Some(s)));
            let (resource, group) = resource.split_once('.').unwrap_or((resource, ""));
            let review = SubjectAccessReview {
                spec: SubjectAccessReviewSpec {
                    user: Some(account),
                    groups: Some(vec![
                        "system:serviceaccounts".into(),
                        format!("system:serviceaccounts:{ns}"),
                        "system:authenticated".into(),
                    ]),
                    resource_attributes: Some(ResourceAttributes {
                        verb: Some(verb.into()),
                        group: Some(group.into()),
                        resource: Some(resource.into()),
                        subresource: subresource.map(Into::into),
                        namespace: Some(namespace),
                        ..ResourceAttributes::default()
                    }),
                    ..SubjectAccessReviewSpec::default()
                },
                ..SubjectAccessReview::default()
            };
            let reviewed = reviews
                .create(&PostParams::default(), &review)
                .await
                .unwrap();
            reviewed
                .status
                .expect("a reviewed access review has a status")
                .allowed
        }
    };
    let elsewhere = "default".to_string();
    for (verb, resource) in [
        ("watch", "petljobs.petl.dev"),
        ("patch", "petljobs.petl.dev/status"),
        ("update", "petljobs.petl.dev/finalizers"),
        ("create", "pods"),
        ("delete", "pods"),
        ("create", "services"),
        ("watch", "configmaps"),
        ("create", "secrets"),
        ("create", "events.events.k8s.io"),
    ] {
        assert!(
            can(verb, resource, elsewhere.clone()).await,
            "operator cannot {verb} {resource}"
        );
    }
    for (verb, resource) in [
        ("list", "secrets"),
        ("watch", "secrets"),
        ("create", "deployments.apps"),
        ("create", "petljobs.petl.dev"),
        ("delete", "nodes"),
        ("create", "leases.coordination.k8s.io"),
    ] {
        assert!(
            !can(verb, resource, elsewhere.clone()).await,
            "operator may {verb} {resource}"
        );
    }
    assert!(
        can("create", "leases.coordination.k8s.io", ns.clone()).await,
        "no leader-election lease in its namespace"
    );
    // The lease manager gets, creates and patches its lease; it never updates it.
    assert!(can("patch", "leases.coordination.k8s.io", ns.clone()).await);
    assert!(!can("update", "leases.coordination.k8s.io", ns.clone()).await);
}

#[tokio::test]
async fn chart_renders_service_monitor_and_text_logs_on_request() {
    let cp = start().await;
    let chart = chart();
    let chart = chart.to_str().expect("utf-8 repo path");
    let rendered = cp
        .helm(&[
            "template",
            "petl",
            chart,
            "--set",
            "serviceMonitor.enabled=true",
            "--set",
            "logFormat=text",
            "--set",
            "leaderElection.enabled=false",
            "--set",
            "replicas=1",
        ])
        .await
        .unwrap();
    let text = stdout(&rendered);
    assert!(text.contains("kind: ServiceMonitor"), "{text}");
    assert!(text.contains("- \"text\""), "{text}");
    assert!(!text.contains("--leader-elect"), "{text}");
    assert!(!text.contains("kind: Role\n"), "{text}");
    let default = stdout(&cp.helm(&["template", "petl", chart]).await.unwrap());
    for kind in ["ServiceMonitor", "PodMonitor"] {
        assert!(
            !default.contains(&format!("kind: {kind}")),
            "{kind} must be off by default"
        );
    }
    assert!(
        !default.contains("petl.json"),
        "the dashboard is off by default"
    );

    // A registry in front of every image, and a pinned tag.
    let moved = stdout(
        &cp.helm(&[
            "template",
            "petl",
            chart,
            "--set",
            "image.registry=registry.example:5000/team",
            "--set",
            "image.tag=0.1.0-rc1",
        ])
        .await
        .unwrap(),
    );
    for image in [
        "registry.example:5000/team/petl-operator:0.1.0-rc1",
        "registry.example:5000/team/petl-worker:0.1.0-rc1",
        "registry.example:5000/team/petl-worker-cuda:0.1.0-rc1",
    ] {
        assert!(moved.contains(image), "{image} not in\n{moved}");
    }
    let latest = cp
        .helm(&["template", "petl", chart, "--set", "image.tag=latest"])
        .await
        .unwrap();
    assert!(
        !latest.status.success(),
        "values.schema.json must refuse the tag latest"
    );
}

#[tokio::test]
async fn chart_renders_a_pod_monitor_for_workers_and_a_dashboard_on_request() {
    let cp = start().await;
    let chart = chart();
    let chart = chart.to_str().expect("utf-8 repo path");
    let ns = cp.create_namespace("helm-monitoring").await.unwrap();
    let rendered = stdout(
        &cp.helm(&[
            "template",
            "petl",
            chart,
            "--namespace",
            &ns,
            "--set",
            "podMonitor.enabled=true",
            "--set",
            "grafanaDashboard.enabled=true",
        ])
        .await
        .unwrap(),
    );
    let documents: Vec<serde_yaml::Value> = serde_yaml::Deserializer::from_str(&rendered)
        .map(|d| serde::Deserialize::deserialize(d).unwrap())
        .filter(|v: &serde_yaml::Value| !v.is_null())
        .collect();
    let of_kind = |kind: &str| {
        documents
            .iter()
            .find(|d| d["kind"].as_str() == Some(kind))
            .unwrap_or_else(|| panic!("no {kind} rendered"))
    };
    let monitor = of_kind("PodMonitor");
    let ports: Vec<&str> = monitor["spec"]["podMetricsEndpoints"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|e| e["port"].as_str().unwrap())
        .collect();
    assert_eq!(ports, ["metrics", "agent-metrics"]);
    assert_eq!(
        monitor["spec"]["selector"]["matchLabels"]["app.kubernetes.io/managed-by"],
        "petl-operator"
    );
    let dashboard = documents
        .iter()
        .find(|d| {
            d["kind"].as_str() == Some("ConfigMap") && d["data"]["petl.json"].as_str().is_some()
        })
        .expect("the dashboard ConfigMap");
    assert_eq!(dashboard["metadata"]["labels"]["grafana_dashboard"], "1");
    let json: serde_json::Value =
        serde_json::from_str(dashboard["data"]["petl.json"].as_str().unwrap())
            .expect("the dashboard is JSON");
    let file: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(petl_tests::dashboard::chart_dashboard()).unwrap(),
    )
    .unwrap();
    assert_eq!(
        json, file,
        "the ConfigMap carries the chart's dashboard file"
    );

    // The API server takes the dashboard (the monitors need the Prometheus Operator's CRDs).
    let only_dashboard = cp.dir().join("dashboard.yaml");
    std::fs::write(&only_dashboard, serde_yaml::to_string(dashboard).unwrap()).unwrap();
    let applied = cp
        .kubectl(&[
            "apply",
            "--server-side",
            "-n",
            &ns,
            "-f",
            only_dashboard.to_str().unwrap(),
        ])
        .await
        .unwrap();
    stdout(&applied);
}

#[tokio::test]
async fn helm_install_upgrade_and_uninstall_leave_what_they_should() {
    let cp = start().await;
    let chart = chart();
    let chart = chart.to_str().expect("utf-8 repo path");
    let ns = cp.create_namespace("helm-release").await.unwrap();
    stdout(
        &cp.helm(&["install", "petl", chart, "--namespace", &ns])
            .await
            .unwrap(),
    );
    let deployments = Api::<Deployment>::namespaced(cp.client(), &ns);
    let args = |d: Deployment| {
        d.spec.unwrap().template.spec.unwrap().containers[0]
            .args
            .clone()
            .unwrap_or_default()
    };
    let installed = deployments.get("petl-petl-operator").await.unwrap();
    assert!(args(installed).contains(&"json".to_string()));

    stdout(
        &cp.helm(&[
            "upgrade",
            "petl",
            chart,
            "--namespace",
            &ns,
            "--set",
            "logFormat=text",
            "--set",
            "podMonitor.enabled=false",
        ])
        .await
        .unwrap(),
    );
    let upgraded = deployments.get("petl-petl-operator").await.unwrap();
    assert!(
        args(upgraded).contains(&"text".to_string()),
        "helm upgrade changed the value"
    );

    stdout(
        &cp.helm(&["uninstall", "petl", "--namespace", &ns])
            .await
            .unwrap(),
    );
    let left = cp
        .kubectl(&[
            "get",
            "deployments,services,serviceaccounts,roles,rolebindings,configmaps,secrets",
            "-n",
            &ns,
            "-l",
            "app.kubernetes.io/instance=petl",
            "-o",
            "name",
        ])
        .await
        .unwrap();
    assert_eq!(stdout(&left).trim(), "", "namespaced objects left behind");
    let cluster_wide = cp
        .kubectl(&[
            "get",
            "clusterroles,clusterrolebindings,validatingadmissionpolicies,validatingadmissionpolicybindings",
            "-l",
            "app.kubernetes.io/instance=petl",
            "-o",
            "name",
        ])
        .await
        .unwrap();
    assert_eq!(
        stdout(&cluster_wide).trim(),
        "",
        "cluster-wide objects left behind"
    );
    // Helm never deletes what it installed from crds/: the PetlJobs (users' data) outlive it.
    let crd = cp
        .kubectl(&["get", "crd", "petljobs.petl.dev", "-o", "name"])
        .await
        .unwrap();
    assert_eq!(
        stdout(&crd).trim(),
        "customresourcedefinition.apiextensions.k8s.io/petljobs.petl.dev"
    );
}
