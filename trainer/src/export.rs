//! Writes a trained adapter as safetensors (the PEFT layout for LoRA) and reads one back.
//! Files: `adapter_config.json`, `adapter_model.safetensors` (what changes in or beside the backbone)
//! and, for classification, `head.safetensors` (the head petl puts on top); the manifest comes last.
//!
//! The head is kept out of the PEFT file on purpose: petl's head is mean pooling over real tokens
//! and a linear layer, which no Hugging Face `*ForSequenceClassification` class computes (BERT's
//! puts its classifier after the [CLS] pooler). So the PEFT file says what it truly is, a
//! `FEATURE_EXTRACTION` adapter of the base `AutoModel`, and the head is applied to its output
//! (docs/trainer.md, "Loading an adapter in PyTorch"; bench/peft-check proves the logits agree).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor, Var};
use serde::{Deserialize, Serialize};

use crate::models::Pooling;
use crate::{Error, Result};

/// The weights file of every adapter.
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";
/// The configuration file of every adapter (PEFT's name).
pub const CONFIG_FILE: &str = "adapter_config.json";
/// The classification head of a sequence-classification adapter: `classifier.weight`
/// `(num_labels, width)` and `classifier.bias`, applied to the mean of the last hidden state over
/// real tokens.
pub const HEAD_FILE: &str = "head.safetensors";
/// Tensors under this prefix are the classification head.
const HEAD_PREFIX: &str = "classifier.";
/// PEFT stores a model's tensors under this prefix.
const PEFT_PREFIX: &str = "base_model.model.";

/// How the adapter is laid out on disk (`output.format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdapterFormat {
    /// LoRA in Hugging Face PEFT's layout (loads with `PeftModel.from_pretrained`); other
    /// methods, which PEFT does not know, are written as `Safetensors`.
    Peft,
    /// The trainer's own tensor names, unprefixed.
    Safetensors,
}

/// The LoRA settings PEFT's `adapter_config.json` records.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoraSettings {
    pub rank: usize,
    pub alpha: f64,
    pub dropout: f64,
    pub target_modules: Vec<String>,
}

/// What an adapter was trained for: decides PEFT's `task_type` and whether there is a head file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdapterTask {
    /// Mean pooling over real tokens, then `classifier` (in [`HEAD_FILE`]).
    SequenceClassification,
    /// Next-token prediction with the backbone's own output layer; no head of petl's.
    CausalLm,
}

impl AdapterTask {
    /// PEFT's `task_type` for the adapter file. A classification adapter's PEFT part is a
    /// feature extractor: it loads onto `AutoModel`, and the head is applied to its output.
    pub fn peft_task_type(self) -> &'static str {
        match self {
            Self::SequenceClassification => "FEATURE_EXTRACTION",
            Self::CausalLm => "CAUSAL_LM",
        }
    }
}

/// How the head in [`HEAD_FILE`] reads the backbone, recorded as `petl_head` in the config.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HeadInfo {
    /// `mean`: the last hidden state averaged over the positions where `attention_mask` is 1.
    pub pooling: String,
    /// The file holding `classifier.weight` and `classifier.bias`.
    pub weights: String,
    /// `logits = pooled · classifierᵀ + bias`, one logit per label in `dataset.labels` order.
    pub formula: String,
}

impl HeadInfo {
    fn of(features: HeadFeatures) -> Self {
        let (pooling, reads) = match features {
            HeadFeatures::Pooled(Pooling::Mean) => (
                "mean",
                "mean(last_hidden_state[attention_mask == 1])".to_string(),
            ),
            HeadFeatures::Pooled(Pooling::LastToken) => (
                "last_token",
                "last_hidden_state[last position where attention_mask == 1]".to_string(),
            ),
            HeadFeatures::Method(what) => ("method", format!("features, {what}")),
        };
        Self {
            pooling: pooling.into(),
            weights: HEAD_FILE.into(),
            formula: format!("logits = {reads} @ classifier.weight.T + classifier.bias"),
        }
    }
}

/// What a classification head reads, as its adapter's `petl_head` records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeadFeatures {
    /// The backbone's last hidden state (the base model's own output, adapter applied), pooled:
    /// what a PyTorch user recomputes from `AutoModel` (an image's positions are all real).
    Pooled(Pooling),
    /// Features the method computes itself (a side network's states, query tokens), described
    /// in a phrase; only petl's `Method::forward` computes them.
    Method(&'static str),
}

/// A trained adapter ready to write: the method's exportable tensors under the method's names.
///
/// LoRA tensors are named `[base_model.model.]<module path>.lora_A.weight` / `…lora_B.weight`
/// (A is `[r, in]`, B is `[out, r]`, as in PEFT); the head (`classifier.*`) goes to
/// [`HEAD_FILE`]; any other tensor is saved whole under its checkpoint name.
#[derive(Debug, Clone)]
pub struct Adapter {
    /// `full`, `lora`, `bitfit`, `lst` or `head`.
    pub method: String,
    pub tensors: Vec<(String, Tensor)>,
    pub lora: Option<LoraSettings>,
    /// The model URI, recorded as `base_model_name_or_path`.
    pub base_model: String,
    /// What it was trained for (decides PEFT's `task_type` and the head file).
    pub task: AdapterTask,
    /// What the classification head reads (ignored for other tasks).
    pub head_features: HeadFeatures,
    /// Method and training settings, kept verbatim in the config.
    pub hyperparameters: serde_json::Value,
}

/// The on-disk `adapter_config.json`: PEFT's fields for LoRA, plus petl's own.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct AdapterConfigFile {
    #[serde(skip_serializing_if = "Option::is_none")]
    peft_type: Option<String>,
    petl_method: String,
    petl_layout: String,
    task_type: String,
    /// The head petl applies on top of the backbone (classification only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    petl_head: Option<HeadInfo>,
    base_model_name_or_path: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    r: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    lora_alpha: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    lora_dropout: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    target_modules: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    modules_to_save: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    bias: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    fan_in_fan_out: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    inference_mode: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    init_lora_weights: Option<bool>,
    #[serde(default)]
    hyperparameters: serde_json::Value,
}

/// An adapter read back from disk, tensors keyed by [`canonical_name`].
#[derive(Debug, Clone)]
pub struct LoadedAdapter {
    pub method: String,
    pub tensors: HashMap<String, Tensor>,
    pub lora: Option<LoraSettings>,
    pub base_model: String,
    pub task_type: String,
    /// How the head reads the backbone, when the adapter has one.
    pub head: Option<HeadInfo>,
}

/// Writes the adapter's config and weights into `dir`; returns the files written.
pub fn write_adapter(dir: &Path, adapter: &Adapter, format: AdapterFormat) -> Result<Vec<PathBuf>> {
    let peft = format == AdapterFormat::Peft && adapter.method == "lora";
    if adapter.method == "lora" && adapter.lora.is_none() {
        return Err(Error::Config {
            field: "method.lora".into(),
            message: "a LoRA adapter needs its rank, alpha and target modules to be exported"
                .into(),
        });
    }
    let classification = adapter.task == AdapterTask::SequenceClassification;
    let mut tensors = HashMap::new();
    let mut head = HashMap::new();
    let mut modules_to_save = Vec::new();
    for (name, tensor) in &adapter.tensors {
        let module_path = canonical_name(name);
        // Written from the CPU so files are identical whatever device trained them.
        let tensor = tensor.to_device(&Device::Cpu)?;
        if classification && module_path.starts_with(HEAD_PREFIX) {
            head.insert(module_path.to_string(), tensor);
            continue;
        }
        let on_disk = if peft {
            if !is_lora_tensor(module_path)
                && let Some((module, _)) = module_path.rsplit_once('.')
                && !modules_to_save.iter().any(|m| m == module)
            {
                modules_to_save.push(module.to_string());
            }
            format!("{PEFT_PREFIX}{module_path}")
        } else {
            name.clone()
        };
        tensors.insert(on_disk, tensor);
    }
    if classification && head.is_empty() {
        return Err(Error::Internal(format!(
            "a {} classification adapter has no {HEAD_PREFIX}* tensors to write to {HEAD_FILE}",
            adapter.method
        )));
    }
    let config = config_file(adapter, peft, modules_to_save);
    let config_path = dir.join(CONFIG_FILE);
    let weights_path = dir.join(WEIGHTS_FILE);
    let head_path = dir.join(HEAD_FILE);
    let json = serde_json::to_vec_pretty(&config).map_err(|source| Error::Json {
        path: config_path.display().to_string(),
        source,
    })?;
    write_atomically(&config_path, |tmp| {
        std::fs::write(tmp, &json).map_err(io_error(tmp))
    })?;
    write_atomically(&weights_path, |tmp| {
        candle_core::safetensors::save(&tensors, tmp).map_err(Error::from)
    })?;
    let mut files = vec![config_path, weights_path];
    if classification {
        write_atomically(&head_path, |tmp| {
            candle_core::safetensors::save(&head, tmp).map_err(Error::from)
        })?;
        files.push(head_path);
    }
    Ok(files)
}

fn config_file(adapter: &Adapter, peft: bool, modules_to_save: Vec<String>) -> AdapterConfigFile {
    let lora = adapter.lora.as_ref().filter(|_| adapter.method == "lora");
    AdapterConfigFile {
        peft_type: lora.map(|_| "LORA".to_string()),
        petl_method: adapter.method.clone(),
        petl_layout: if peft { "peft" } else { "safetensors" }.to_string(),
        task_type: adapter.task.peft_task_type().to_string(),
        petl_head: (adapter.task == AdapterTask::SequenceClassification)
            .then(|| HeadInfo::of(adapter.head_features)),
        base_model_name_or_path: adapter.base_model.clone(),
        r: lora.map(|l| l.rank),
        lora_alpha: lora.map(|l| l.alpha),
        lora_dropout: lora.map(|l| l.dropout),
        target_modules: lora.map(|l| l.target_modules.clone()),
        modules_to_save: (peft && !modules_to_save.is_empty()).then_some(modules_to_save),
        bias: lora.map(|_| "none".to_string()),
        fan_in_fan_out: lora.map(|_| false),
        inference_mode: lora.map(|_| true),
        init_lora_weights: lora.map(|_| true),
        hyperparameters: adapter.hyperparameters.clone(),
    }
}

/// A tensor's name without PEFT's `base_model.model.` prefix: the key both layouts share.
pub fn canonical_name(name: &str) -> &str {
    name.strip_prefix(PEFT_PREFIX).unwrap_or(name)
}

fn is_lora_tensor(name: &str) -> bool {
    name.contains(".lora_A.") || name.contains(".lora_B.")
}

fn io_error(path: &Path) -> impl Fn(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.display().to_string(),
        source,
    }
}

/// Writes through a temporary sibling and renames, so a reader never sees half a file.
pub fn write_atomically(path: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{file_name}.tmp"));
    write(&tmp)?;
    std::fs::rename(&tmp, path).map_err(io_error(path))
}

/// Reads an adapter written by [`write_adapter`], or a PEFT LoRA adapter written by PEFT itself
/// (tensor names and shapes are checked against the config).
pub fn read_adapter(dir: &Path, device: &Device) -> Result<LoadedAdapter> {
    let config_path = dir.join(CONFIG_FILE);
    let weights_path = dir.join(WEIGHTS_FILE);
    let value: serde_json::Value = crate::read_json(&config_path)?;
    let config = parse_config(&config_path, value)?;
    if !weights_path.exists() {
        return Err(Error::Missing {
            what: "adapter weights".into(),
            path: weights_path.display().to_string(),
            fix: format!("an adapter directory holds {CONFIG_FILE} and {WEIGHTS_FILE}"),
        });
    }
    let stored = candle_core::safetensors::load(&weights_path, device)?;
    let peft = config.petl_layout == "peft";
    let mut tensors = HashMap::with_capacity(stored.len());
    for (name, tensor) in stored {
        if peft && !name.starts_with(PEFT_PREFIX) {
            return Err(weights_error(
                &weights_path,
                &name,
                "lacks the PEFT prefix base_model.model.",
            ));
        }
        let name = canonical_name(&name).to_string();
        // PEFT saves without the adapter name; a file saved with it still loads.
        tensors.insert(
            name.replace(".lora_A.default.", ".lora_A.")
                .replace(".lora_B.default.", ".lora_B."),
            tensor,
        );
    }
    // The head file (petl's own names); older adapters kept the head in the weights file.
    let head_path = dir.join(HEAD_FILE);
    if head_path.exists() {
        for (name, tensor) in candle_core::safetensors::load(&head_path, device)? {
            if !name.starts_with(HEAD_PREFIX) {
                return Err(weights_error(
                    &head_path,
                    &name,
                    &format!("is not a head tensor ({HEAD_PREFIX}*)"),
                ));
            }
            tensors.insert(name, tensor);
        }
    }
    let lora = match config.peft_type.as_deref() {
        Some("LORA") => Some(lora_settings(&config_path, &config)?),
        Some(other) => {
            return Err(Error::Config {
                field: format!("{}: peft_type", config_path.display()),
                message: format!("'{other}' adapters are not supported; only LORA"),
            });
        }
        None => None,
    };
    if let Some(lora) = &lora {
        check_lora_shapes(&weights_path, &tensors, lora.rank)?;
    }
    Ok(LoadedAdapter {
        method: config.petl_method,
        tensors,
        lora,
        base_model: config.base_model_name_or_path,
        task_type: config.task_type,
        head: config.petl_head,
    })
}

/// Accepts our config and PEFT's own (which has no petl_* fields).
fn parse_config(path: &Path, mut value: serde_json::Value) -> Result<AdapterConfigFile> {
    if let Some(object) = value.as_object_mut()
        && !object.contains_key("petl_method")
    {
        if object.get("peft_type").and_then(|v| v.as_str()) != Some("LORA") {
            return Err(Error::Config {
                field: format!("{}: peft_type", path.display()),
                message: "neither a petl adapter (petl_method) nor a PEFT LORA adapter".into(),
            });
        }
        object.insert("petl_method".into(), "lora".into());
        object.insert("petl_layout".into(), "peft".into());
        object.entry("task_type").or_insert("SEQ_CLS".into());
        object.entry("base_model_name_or_path").or_insert("".into());
    }
    serde_json::from_value(value).map_err(|source| Error::Json {
        path: path.display().to_string(),
        source,
    })
}

fn lora_settings(path: &Path, config: &AdapterConfigFile) -> Result<LoraSettings> {
    let missing = |field: &str| Error::Config {
        field: format!("{}: {field}", path.display()),
        message: "a LORA adapter config needs r, lora_alpha and target_modules".into(),
    };
    Ok(LoraSettings {
        rank: config.r.ok_or_else(|| missing("r"))?,
        alpha: config.lora_alpha.ok_or_else(|| missing("lora_alpha"))?,
        dropout: config.lora_dropout.unwrap_or(0.0),
        target_modules: config
            .target_modules
            .clone()
            .ok_or_else(|| missing("target_modules"))?,
    })
}

/// Every `lora_A` is `[r, in]` with a `lora_B` partner of shape `[out, r]`.
fn check_lora_shapes(path: &Path, tensors: &HashMap<String, Tensor>, rank: usize) -> Result<()> {
    for (name, a) in tensors.iter().filter(|(n, _)| n.contains(".lora_A.")) {
        let b_name = name.replace(".lora_A.", ".lora_B.");
        let b = tensors
            .get(&b_name)
            .ok_or_else(|| weights_error(path, name, &format!("has no partner {b_name}")))?;
        let (a_dims, b_dims) = (a.dims(), b.dims());
        if a_dims.len() != 2 || b_dims.len() != 2 || a_dims[0] != rank || b_dims[1] != rank {
            return Err(weights_error(
                path,
                name,
                &format!(
                    "shapes {a_dims:?} and {b_dims:?} do not fit r = {rank} ([r, in] and [out, r])"
                ),
            ));
        }
    }
    Ok(())
}

/// Copies a read-back adapter into a freshly built method's trainable tensors (matched by
/// [`canonical_name`]); every trainable tensor must be present with its shape.
pub fn load_into(
    parameters: &[(String, Var)],
    adapter: &LoadedAdapter,
    source: &Path,
) -> Result<()> {
    for (name, var) in parameters {
        let key = canonical_name(name);
        let file = source.join(if key.starts_with(HEAD_PREFIX) {
            HEAD_FILE
        } else {
            WEIGHTS_FILE
        });
        let stored = adapter.tensors.get(key).ok_or_else(|| {
            weights_error(
                &file,
                key,
                "is missing: the adapter was trained with another method or settings",
            )
        })?;
        if stored.dims() != var.dims() {
            return Err(weights_error(
                &file,
                key,
                &format!(
                    "has shape {:?}, the model expects {:?}",
                    stored.dims(),
                    var.dims()
                ),
            ));
        }
        var.set(&stored.to_dtype(var.dtype())?.to_device(var.device())?)?;
    }
    Ok(())
}

fn weights_error(path: &Path, tensor: &str, message: &str) -> Error {
    Error::Weights {
        file: path.display().to_string(),
        message: format!("tensor {tensor} {message}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lora_adapter() -> Adapter {
        let dev = Device::Cpu;
        let module = "encoder.layer.0.attention.self.query";
        Adapter {
            method: "lora".into(),
            tensors: vec![
                (
                    format!("{module}.lora_A.weight"),
                    Tensor::ones((4, 8), candle_core::DType::F32, &dev).unwrap(),
                ),
                (
                    format!("{module}.lora_B.weight"),
                    Tensor::zeros((8, 4), candle_core::DType::F32, &dev).unwrap(),
                ),
                (
                    "classifier.weight".into(),
                    Tensor::ones((2, 8), candle_core::DType::F32, &dev).unwrap(),
                ),
            ],
            lora: Some(LoraSettings {
                rank: 4,
                alpha: 8.0,
                dropout: 0.0,
                target_modules: vec!["query".into()],
            }),
            base_model: "pypi://x==1/m".into(),
            task: AdapterTask::SequenceClassification,
            head_features: HeadFeatures::Pooled(Pooling::Mean),
            hyperparameters: serde_json::json!({"rank": 4}),
        }
    }

    #[test]
    fn lora_is_written_in_peft_layout_and_read_back_under_our_names() {
        let dir = tempfile::tempdir().unwrap();
        write_adapter(dir.path(), &lora_adapter(), AdapterFormat::Peft).unwrap();
        let config: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.path().join(CONFIG_FILE)).unwrap()).unwrap();
        assert_eq!(config["peft_type"], "LORA");
        assert_eq!(config["r"], 4);
        assert_eq!(config["lora_alpha"], 8.0);
        assert_eq!(config["target_modules"], serde_json::json!(["query"]));
        // The PEFT file is a feature extractor of AutoModel; the head lives beside it.
        assert_eq!(config["task_type"], "FEATURE_EXTRACTION");
        assert!(config.get("modules_to_save").is_none(), "{config}");
        assert_eq!(config["petl_head"]["pooling"], "mean");
        assert_eq!(config["petl_head"]["weights"], HEAD_FILE);
        let raw =
            candle_core::safetensors::load(dir.path().join(WEIGHTS_FILE), &Device::Cpu).unwrap();
        assert!(
            raw.contains_key("base_model.model.encoder.layer.0.attention.self.query.lora_A.weight")
        );
        assert_eq!(raw.len(), 2, "only LoRA tensors in the PEFT file");
        let head =
            candle_core::safetensors::load(dir.path().join(HEAD_FILE), &Device::Cpu).unwrap();
        assert_eq!(head["classifier.weight"].dims(), &[2, 8]);
        let loaded = read_adapter(dir.path(), &Device::Cpu).unwrap();
        assert_eq!(loaded.method, "lora");
        assert_eq!(loaded.lora.unwrap().rank, 4);
        assert!(loaded.tensors.contains_key("classifier.weight"));
        assert!(
            loaded
                .tensors
                .contains_key("encoder.layer.0.attention.self.query.lora_B.weight")
        );
    }

    #[test]
    fn mismatched_lora_shapes_are_refused_naming_the_tensor() {
        let dir = tempfile::tempdir().unwrap();
        let mut adapter = lora_adapter();
        adapter.lora.as_mut().unwrap().rank = 3;
        write_adapter(dir.path(), &adapter, AdapterFormat::Peft).unwrap();
        let err = read_adapter(dir.path(), &Device::Cpu)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("lora_A.weight") && err.contains("r = 3"),
            "{err}"
        );
    }
}
