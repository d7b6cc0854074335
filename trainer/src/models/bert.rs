//! BERT-family encoder (BERT, MiniLM, …) loaded from the Hugging Face layout and built on `nn`:
//! per-layer hidden states without a graph, a tracked range of layers, PEFT-named linears.
//!
//! Weight names match the checkpoint (`encoder.layer.N.attention.self.query.weight`), with or
//! without the `bert.` prefix, so files load unchanged and LoRA `target_modules` match by suffix.

use std::ops::Range;
use std::path::Path;

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor};
use serde::Deserialize;

use crate::models::backbone::{Backbone, LoraSite, Pooling, Shape};
use crate::nn::{self, Activation, LayerNorm, Linear};
use crate::{Error, Result};

/// The fields of `config.json` the encoder needs.
#[derive(Clone, Debug, Deserialize)]
pub struct Config {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    #[serde(default = "default_act")]
    pub hidden_act: String,
    pub max_position_embeddings: usize,
    #[serde(default = "default_type_vocab")]
    pub type_vocab_size: usize,
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
}

impl Config {
    /// A BERT of the given shape with the defaults a `config.json` may leave out (GELU, two token
    /// types, LayerNorm ε 1e-12): what tests and benches build random models from.
    pub fn with_shape(
        vocab_size: usize,
        hidden_size: usize,
        num_hidden_layers: usize,
        num_attention_heads: usize,
        intermediate_size: usize,
        max_position_embeddings: usize,
    ) -> Self {
        Self {
            vocab_size,
            hidden_size,
            num_hidden_layers,
            num_attention_heads,
            intermediate_size,
            hidden_act: default_act(),
            max_position_embeddings,
            type_vocab_size: default_type_vocab(),
            layer_norm_eps: default_eps(),
        }
    }
}

fn default_act() -> String {
    "gelu".into()
}
fn default_type_vocab() -> usize {
    2
}
fn default_eps() -> f64 {
    1e-12
}

/// Word, position and token-type tables plus their LayerNorm.
#[derive(Clone, Debug)]
pub struct Embeddings {
    pub word: Tensor,
    pub position: Tensor,
    pub token_type: Tensor,
    pub norm: LayerNorm,
}

/// One post-LayerNorm transformer block.
#[derive(Clone, Debug)]
pub struct Layer {
    pub query: Linear,
    pub key: Linear,
    pub value: Linear,
    pub attention_output: Linear,
    pub attention_norm: LayerNorm,
    pub intermediate: Linear,
    pub output: Linear,
    pub output_norm: LayerNorm,
    pub heads: usize,
}

impl Layer {
    /// `h` `(B, T, d)`, `bias` from [`nn::attention_bias`].
    pub fn forward(&self, h: &Tensor, bias: &Tensor) -> Result<Tensor> {
        self.forward_reading(h, h, bias)
    }

    /// The block on `h` `(B, S, d)` with attention reading its keys and values from `context`
    /// `(B, T, d)` (`bias` over T) instead of `h` itself: what VQT's query tokens go through.
    pub fn forward_reading(&self, h: &Tensor, context: &Tensor, bias: &Tensor) -> Result<Tensor> {
        let q = self.query.forward(h)?;
        let k = self.key.forward(context)?;
        let v = self.value.forward(context)?;
        let ctx = nn::attention(&q, &k, &v, bias, self.heads)?;
        let a = self
            .attention_norm
            .forward(&nn::residual(h, &self.attention_output.forward(&ctx)?)?)?;
        let i = self.intermediate.forward_act(&a, Activation::Gelu)?;
        self.output_norm
            .forward(&nn::residual(&a, &self.output.forward(&i)?)?)
    }

    /// The block's linears under their checkpoint module names, relative to the block.
    pub fn linears_mut(&mut self) -> Vec<(&'static str, &mut Linear)> {
        vec![
            ("attention.self.query", &mut self.query),
            ("attention.self.key", &mut self.key),
            ("attention.self.value", &mut self.value),
            ("attention.output.dense", &mut self.attention_output),
            ("intermediate.dense", &mut self.intermediate),
            ("output.dense", &mut self.output),
        ]
    }

    /// Every tensor of the block under its checkpoint name, relative to the block.
    pub fn parameters_mut(&mut self) -> Vec<(String, &mut Tensor)> {
        let mut out = Vec::new();
        let Layer {
            query,
            key,
            value,
            attention_output,
            attention_norm,
            intermediate,
            output,
            output_norm,
            ..
        } = self;
        for (name, l) in [
            ("attention.self.query", query),
            ("attention.self.key", key),
            ("attention.self.value", value),
            ("attention.output.dense", attention_output),
            ("intermediate.dense", intermediate),
            ("output.dense", output),
        ] {
            out.push((format!("{name}.weight"), &mut l.weight));
            if let Some(b) = l.bias.as_mut() {
                out.push((format!("{name}.bias"), b));
            }
        }
        for (name, n) in [
            ("attention.output.LayerNorm", attention_norm),
            ("output.LayerNorm", output_norm),
        ] {
            out.push((format!("{name}.weight"), &mut n.weight));
            out.push((format!("{name}.bias"), &mut n.bias));
        }
        out
    }
}

/// A BERT encoder whose weights are frozen until a method turns some of them into `Var`s.
#[derive(Clone, Debug)]
pub struct Bert {
    pub config: Config,
    pub embeddings: Embeddings,
    pub layers: Vec<Layer>,
}

impl Bert {
    /// Loads `config.json` and `model.safetensors` from a Hugging Face model directory.
    pub fn load(dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        let config: Config = crate::read_json(&dir.join("config.json"))?;
        let weights = Weights::open(&dir.join("model.safetensors"), dtype, device)?;
        Self::from_weights(config, &weights)
    }

    fn from_weights(config: Config, w: &Weights) -> Result<Self> {
        if config.hidden_act != "gelu" {
            return Err(Error::Config {
                field: "config.json hidden_act".into(),
                message: format!(
                    "{:?} is not supported; the BERT backbone implements \"gelu\"",
                    config.hidden_act
                ),
            });
        }
        let (d, ff) = (config.hidden_size, config.intermediate_size);
        let eps = config.layer_norm_eps;
        let embeddings = Embeddings {
            word: w.get("embeddings.word_embeddings.weight", &[config.vocab_size, d])?,
            position: w.get(
                "embeddings.position_embeddings.weight",
                &[config.max_position_embeddings, d],
            )?,
            token_type: w.get(
                "embeddings.token_type_embeddings.weight",
                &[config.type_vocab_size, d],
            )?,
            norm: w.layer_norm("embeddings.LayerNorm", d, eps)?,
        };
        let layers = (0..config.num_hidden_layers)
            .map(|i| {
                let p = format!("encoder.layer.{i}");
                Ok(Layer {
                    query: w.linear(&format!("{p}.attention.self.query"), d, d)?,
                    key: w.linear(&format!("{p}.attention.self.key"), d, d)?,
                    value: w.linear(&format!("{p}.attention.self.value"), d, d)?,
                    attention_output: w.linear(&format!("{p}.attention.output.dense"), d, d)?,
                    attention_norm: w.layer_norm(
                        &format!("{p}.attention.output.LayerNorm"),
                        d,
                        eps,
                    )?,
                    intermediate: w.linear(&format!("{p}.intermediate.dense"), ff, d)?,
                    output: w.linear(&format!("{p}.output.dense"), d, ff)?,
                    output_norm: w.layer_norm(&format!("{p}.output.LayerNorm"), d, eps)?,
                    heads: config.num_attention_heads,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            config,
            embeddings,
            layers,
        })
    }

    /// A randomly initialised encoder of the given shape (tests and tiny experiments; real runs
    /// load a checkpoint).
    pub fn random(config: Config, seed: u64, dtype: DType, device: &Device) -> Result<Self> {
        let mut rng = crate::init::Rng::new(seed);
        let (d, ff, eps) = (
            config.hidden_size,
            config.intermediate_size,
            config.layer_norm_eps,
        );
        let mut linear = |out: usize, inp: usize| -> Result<Linear> {
            let w = rng.linear_weight(out, inp, dtype, device)?;
            let b = rng.uniform_tensor(out, 0.1, dtype, device)?;
            Ok(Linear::new(w, Some(b)))
        };
        let norm = |rng: &mut crate::init::Rng| -> Result<LayerNorm> {
            Ok(LayerNorm {
                weight: (rng.uniform_tensor(d, 0.2, dtype, device)? + 1.0)?,
                bias: rng.uniform_tensor(d, 0.1, dtype, device)?,
                eps,
            })
        };
        let mut layers = Vec::new();
        for _ in 0..config.num_hidden_layers {
            let (query, key, value) = (linear(d, d)?, linear(d, d)?, linear(d, d)?);
            let attention_output = linear(d, d)?;
            let (intermediate, output) = (linear(ff, d)?, linear(d, ff)?);
            layers.push(Layer {
                query,
                key,
                value,
                attention_output,
                attention_norm: LayerNorm {
                    weight: Tensor::ones(d, dtype, device)?,
                    bias: Tensor::zeros(d, dtype, device)?,
                    eps,
                },
                intermediate,
                output,
                output_norm: LayerNorm {
                    weight: Tensor::ones(d, dtype, device)?,
                    bias: Tensor::zeros(d, dtype, device)?,
                    eps,
                },
                heads: config.num_attention_heads,
            });
        }
        let mut rng = crate::init::Rng::new(seed ^ 0x5eed);
        for layer in &mut layers {
            layer.attention_norm = norm(&mut rng)?;
            layer.output_norm = norm(&mut rng)?;
        }
        let embeddings = Embeddings {
            word: rng.uniform_tensor((config.vocab_size, d), 1.0, dtype, device)?,
            position: rng.uniform_tensor(
                (config.max_position_embeddings, d),
                0.5,
                dtype,
                device,
            )?,
            token_type: rng.uniform_tensor((config.type_vocab_size, d), 0.5, dtype, device)?,
            norm: norm(&mut rng)?,
        };
        Ok(Self {
            config,
            embeddings,
            layers,
        })
    }

    pub fn hidden_size(&self) -> usize {
        self.config.hidden_size
    }

    pub fn dtype(&self) -> DType {
        self.embeddings.word.dtype()
    }

    pub fn device(&self) -> &Device {
        self.embeddings.word.device()
    }

    /// Token + position + type embeddings, normalised. `input_ids` `(B, T)` u32.
    pub fn embed(&self, input_ids: &Tensor) -> Result<Tensor> {
        let (b, t) = input_ids.dims2()?;
        if t > self.config.max_position_embeddings {
            return Err(Error::Config {
                field: "dataset.maxSequenceLength".into(),
                message: format!(
                    "{t} tokens exceed the model's {} positions; lower it",
                    self.config.max_position_embeddings
                ),
            });
        }
        let ids = input_ids.to_dtype(DType::U32)?;
        let positions = Tensor::arange(0u32, t as u32, ids.device())?
            .unsqueeze(0)?
            .broadcast_as((b, t))?
            .contiguous()?;
        let types = ids.zeros_like()?;
        let e = &self.embeddings;
        let x = nn::embedding_sum(&[
            (&ids, &e.word),
            (&positions, &e.position),
            (&types, &e.token_type),
        ])?;
        e.norm.forward(&x)
    }

    /// The additive attention bias for a `(B, T)` 0/1 mask, in the model's dtype.
    pub fn attention_bias(&self, attention_mask: &Tensor) -> Result<Tensor> {
        nn::attention_bias(attention_mask, self.dtype())
    }

    /// All `L + 1` hidden states (embeddings output, then each layer's output) with no graph:
    /// what side networks and ladders read. Each state is detached.
    pub fn forward_hidden(
        &self,
        input_ids: &Tensor,
        attention_mask: &Tensor,
    ) -> Result<Vec<Tensor>> {
        self.forward_hidden_through(input_ids, attention_mask, self.layers.len())
    }

    /// The embeddings' output and the outputs of the first `blocks` layers, with no graph.
    pub fn forward_hidden_through(
        &self,
        input_ids: &Tensor,
        attention_mask: &Tensor,
        blocks: usize,
    ) -> Result<Vec<Tensor>> {
        let bias = self.attention_bias(attention_mask)?;
        let h = self.embed(input_ids)?;
        crate::models::backbone::frozen_taps(&self.layers, blocks, h, |l, h| l.forward(h, &bias))
    }

    /// Runs `range` of the layers on `h`, building a graph wherever something trains.
    pub fn run_layers(&self, range: Range<usize>, h: &Tensor, bias: &Tensor) -> Result<Tensor> {
        if range.end > self.layers.len() {
            return Err(Error::Config {
                field: "layers".into(),
                message: format!(
                    "range {range:?} exceeds the model's {} layers",
                    self.layers.len()
                ),
            });
        }
        let mut h = h.clone();
        for layer in &self.layers[range] {
            h = layer.forward(&h, bias)?;
        }
        Ok(h)
    }

    /// The last hidden state `(B, T, d)`, tracked wherever something trains.
    pub fn forward(&self, input_ids: &Tensor, attention_mask: &Tensor) -> Result<Tensor> {
        let bias = self.attention_bias(attention_mask)?;
        let h = self.embed(input_ids)?;
        self.run_layers(0..self.layers.len(), &h, &bias)
    }

    /// Mean of the last hidden state over real tokens `(B, d)` (sentence-transformers pooling).
    pub fn mean_pooled(&self, input_ids: &Tensor, attention_mask: &Tensor) -> Result<Tensor> {
        let h = self.forward(input_ids, attention_mask)?;
        nn::mean_pool(&h, attention_mask)
    }

    /// The first token's last hidden state `(B, d)`.
    pub fn cls(&self, input_ids: &Tensor, attention_mask: &Tensor) -> Result<Tensor> {
        let h = self.forward(input_ids, attention_mask)?;
        Ok(h.narrow(1, 0, 1)?.squeeze(1)?)
    }

    /// Every linear under its PEFT module path (`encoder.layer.N.attention.self.query`).
    pub fn linears_mut(&mut self) -> Vec<(String, &mut Linear)> {
        let mut out = Vec::new();
        for (i, layer) in self.layers.iter_mut().enumerate() {
            for (name, l) in layer.linears_mut() {
                out.push((format!("encoder.layer.{i}.{name}"), l));
            }
        }
        out
    }

    /// Every tensor under its checkpoint name.
    pub fn parameters_mut(&mut self) -> Vec<(String, &mut Tensor)> {
        let e = &mut self.embeddings;
        let mut out: Vec<(String, &mut Tensor)> = vec![
            ("embeddings.word_embeddings.weight".into(), &mut e.word),
            (
                "embeddings.position_embeddings.weight".into(),
                &mut e.position,
            ),
            (
                "embeddings.token_type_embeddings.weight".into(),
                &mut e.token_type,
            ),
            ("embeddings.LayerNorm.weight".into(), &mut e.norm.weight),
            ("embeddings.LayerNorm.bias".into(), &mut e.norm.bias),
        ];
        for (i, layer) in self.layers.iter_mut().enumerate() {
            for (name, t) in layer.parameters_mut() {
                out.push((format!("encoder.layer.{i}.{name}"), t));
            }
        }
        out
    }

    /// Total number of backbone weights.
    pub fn parameter_count(&mut self) -> usize {
        self.parameters_mut()
            .iter()
            .map(|(_, t)| t.elem_count())
            .sum()
    }
}

/// BERT as methods see it: mean pooling (what sentence-transformers checkpoints such as MiniLM
/// are trained for), its six linears per layer for LoRA, every tensor for full fine-tuning and
/// BitFit, and its post-LayerNorm blocks for LST's pruned side network.
impl Backbone for Bert {
    fn shape(&self) -> Shape {
        Shape {
            hidden_size: self.config.hidden_size,
            num_layers: self.layers.len(),
            num_heads: self.config.num_attention_heads,
            intermediate_size: self.config.intermediate_size,
            norm_eps: self.config.layer_norm_eps,
        }
    }

    fn dtype(&self) -> DType {
        Bert::dtype(self)
    }

    fn device(&self) -> &Device {
        Bert::device(self)
    }

    fn taps_through(
        &self,
        input_ids: &Tensor,
        attention_mask: &Tensor,
        blocks: usize,
    ) -> Result<Vec<Tensor>> {
        self.forward_hidden_through(input_ids, attention_mask, blocks)
    }

    fn forward(&self, input_ids: &Tensor, attention_mask: &Tensor) -> Result<Tensor> {
        Bert::forward(self, input_ids, attention_mask)
    }

    fn pooling(&self) -> Pooling {
        Pooling::Mean
    }

    fn linears_mut(&mut self) -> Vec<(String, &mut dyn LoraSite)> {
        Bert::linears_mut(self)
            .into_iter()
            .map(|(path, l)| (path, l as &mut dyn LoraSite))
            .collect()
    }

    fn parameters_mut(&mut self) -> Vec<(String, &mut Tensor)> {
        Bert::parameters_mut(self)
    }

    fn encoder_layers(&self) -> Option<&[Layer]> {
        Some(&self.layers)
    }

    fn output_from_tap(&self, last: &Tensor) -> Result<Tensor> {
        Ok(last.clone())
    }

    fn query_block(
        &self,
        layer: usize,
        queries: &Tensor,
        tokens: &Tensor,
        bias: &Tensor,
    ) -> Result<Tensor> {
        let block = super::backbone::block(&self.layers, layer)?;
        block.forward_reading(queries, &tokens.detach(), bias)
    }

    fn run_block(&self, layer: usize, h: &Tensor, token_mask: &Tensor) -> Result<Tensor> {
        let block = super::backbone::block(&self.layers, layer)?;
        block.forward(h, &self.attention_bias(token_mask)?)
    }
}

/// The checkpoint, read tensor by tensor from the memory-mapped file.
struct Weights {
    file: MmapedSafetensors,
    path: String,
    dtype: DType,
    device: Device,
}

impl Weights {
    fn open(path: &Path, dtype: DType, device: &Device) -> Result<Self> {
        if !path.exists() {
            return Err(Error::Missing {
                what: "model weights".into(),
                path: path.display().to_string(),
                fix: "point model.uri at a directory holding model.safetensors".into(),
            });
        }
        // SAFETY: the file is opened read-only and not modified while the mapping lives.
        let file = unsafe { MmapedSafetensors::new(path) }?;
        Ok(Self {
            file,
            path: path.display().to_string(),
            dtype,
            device: device.clone(),
        })
    }

    /// Finds `name` with or without the `bert.` prefix (and old `gamma`/`beta` LayerNorm names).
    fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let legacy = name
            .strip_suffix("LayerNorm.weight")
            .map(|p| format!("{p}LayerNorm.gamma"))
            .or_else(|| {
                name.strip_suffix("LayerNorm.bias")
                    .map(|p| format!("{p}LayerNorm.beta"))
            });
        let mut candidates = vec![name.to_string(), format!("bert.{name}")];
        if let Some(l) = legacy {
            candidates.push(format!("bert.{l}"));
            candidates.push(l);
        }
        let found = candidates
            .iter()
            .find_map(|c| self.file.load(c, &self.device).ok());
        let t = found.ok_or_else(|| Error::Weights {
            file: self.path.clone(),
            message: format!(
                "no tensor {name} (also tried the bert. prefix); is this a BERT checkpoint?"
            ),
        })?;
        if t.dims() != shape {
            return Err(Error::Weights {
                file: self.path.clone(),
                message: format!(
                    "{name} has shape {:?}, config.json implies {shape:?}",
                    t.dims()
                ),
            });
        }
        Ok(t.to_dtype(self.dtype)?)
    }

    fn linear(&self, name: &str, out: usize, inp: usize) -> Result<Linear> {
        Ok(Linear::new(
            self.get(&format!("{name}.weight"), &[out, inp])?,
            Some(self.get(&format!("{name}.bias"), &[out])?),
        ))
    }

    fn layer_norm(&self, name: &str, d: usize, eps: f64) -> Result<LayerNorm> {
        Ok(LayerNorm {
            weight: self.get(&format!("{name}.weight"), &[d])?,
            bias: self.get(&format!("{name}.bias"), &[d])?,
            eps,
        })
    }
}
