//! The Llama decoder (SmolLM2, Llama 2/3 layout) on `tape`: frozen weights may stay block-quantized
//! in memory, trainable parts are f32, and every layer owns its backward.
//!
//! Loads HF checkpoints (`config.json` + `model.safetensors`, names as in HF) and llama.cpp GGUF
//! files (see `gguf`). Exposes the hooks methods need: per-layer hidden states from an untracked
//! forward, a tracked run over a range of layers, LoRA-capable projections under their PEFT names
//! (`model.layers.N.self_attn.q_proj`), and the causal-LM loss.

use std::collections::HashMap;
use std::ops::Range;
use std::path::Path;
use std::sync::Arc;

use candle_core::quantized::QTensor;
use candle_core::{D, DType, Device, Tensor};
use serde::Deserialize;

use crate::models::gguf::{self, FrozenFormat};
use crate::tape;
use crate::{Error, Result};

mod backbone;
mod layers;

pub use layers::{Proj, RmsNorm, Rope, Weight, attention, causal_bias, swiglu};

/// The fields of an HF Llama `config.json` this model reads.
#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct Config {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default)]
    pub num_key_value_heads: usize,
    #[serde(default)]
    pub head_dim: Option<usize>,
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    #[serde(default = "default_theta")]
    pub rope_theta: f64,
    pub vocab_size: usize,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default = "default_positions")]
    pub max_position_embeddings: usize,
}

fn default_eps() -> f64 {
    1e-5
}
fn default_theta() -> f64 {
    10_000.0
}
fn default_positions() -> usize {
    2048
}

impl Config {
    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads.max(1))
    }

    fn kv_heads(&self) -> usize {
        if self.num_key_value_heads == 0 {
            self.num_attention_heads
        } else {
            self.num_key_value_heads
        }
    }

    fn validate(&self, file: &str) -> Result<()> {
        let bad = |message: String| {
            Err(Error::Weights {
                file: file.to_string(),
                message,
            })
        };
        let (h, kv) = (self.num_attention_heads, self.kv_heads());
        if h == 0 || kv == 0 || h % kv != 0 {
            return bad(format!(
                "num_attention_heads {h} must be a positive multiple of num_key_value_heads {kv}"
            ));
        }
        if !self.head_dim().is_multiple_of(2) {
            return bad(format!(
                "head_dim {} must be even for RoPE",
                self.head_dim()
            ));
        }
        Ok(())
    }
}

/// One decoder block: pre-norm attention and pre-norm SwiGLU MLP, each added to the residual.
#[derive(Clone, Debug)]
pub struct DecoderLayer {
    pub input_layernorm: RmsNorm,
    pub q_proj: Proj,
    pub k_proj: Proj,
    pub v_proj: Proj,
    pub o_proj: Proj,
    pub post_attention_layernorm: RmsNorm,
    pub gate_proj: Proj,
    pub up_proj: Proj,
    pub down_proj: Proj,
    heads: usize,
    kv_heads: usize,
}

impl DecoderLayer {
    pub fn forward(&self, h: &Tensor, bias: &Tensor, rope: &Rope) -> Result<Tensor> {
        let x = self.input_layernorm.forward(h)?;
        let q = rope.apply(&self.q_proj.forward(&x)?, self.heads)?;
        let k = rope.apply(&self.k_proj.forward(&x)?, self.kv_heads)?;
        let v = self.v_proj.forward(&x)?;
        let ctx = attention(&q, &k, &v, bias)?;
        let h = tape::residual(h, &self.o_proj.forward(&ctx)?)?;
        let x = self.post_attention_layernorm.forward(&h)?;
        let m = swiglu(&self.gate_proj.forward(&x)?, &self.up_proj.forward(&x)?)?;
        tape::residual(&h, &self.down_proj.forward(&m)?)
    }

    pub fn projections(&self) -> [&Proj; 7] {
        [
            &self.q_proj,
            &self.k_proj,
            &self.v_proj,
            &self.o_proj,
            &self.gate_proj,
            &self.up_proj,
            &self.down_proj,
        ]
    }

    pub fn projections_mut(&mut self) -> [&mut Proj; 7] {
        [
            &mut self.q_proj,
            &mut self.k_proj,
            &mut self.v_proj,
            &mut self.o_proj,
            &mut self.gate_proj,
            &mut self.up_proj,
            &mut self.down_proj,
        ]
    }
}

/// Hidden states of every layer from an untracked forward.
pub struct Hidden {
    /// `L + 1` states `(B, T, d)`: the embeddings, then each block's output.
    pub layers: Vec<Tensor>,
    /// The last state after the final norm.
    pub last: Tensor,
}

/// The Llama decoder with its tied or separate LM head.
#[derive(Clone, Debug)]
pub struct Llama {
    pub config: Config,
    /// `model.embed_tokens.weight`, `(vocab, d)`.
    pub embed_tokens: Weight,
    pub layers: Vec<DecoderLayer>,
    pub norm: RmsNorm,
    pub lm_head: Proj,
    rope: Rope,
    device: Device,
}

impl Llama {
    /// Loads a llama.cpp GGUF file and its tokenizer; `format` picks the in-memory block format.
    pub fn from_gguf(
        path: &Path,
        format: FrozenFormat,
        device: &Device,
    ) -> Result<(Self, tokenizers::Tokenizer)> {
        let g = gguf::load(path, format, device)?;
        let model = Self::from_weights(g.config, g.weights, &path.display().to_string(), device)?;
        Ok((model, g.tokenizer))
    }

    /// Loads an HF checkpoint directory (`config.json`, `model.safetensors`). Weights stay dense
    /// f32 for `FrozenFormat::F32`/`AsStored`, or are quantized for `Requantize`.
    pub fn from_hf_dir(dir: &Path, format: FrozenFormat, device: &Device) -> Result<Self> {
        let config: Config = crate::read_json(&dir.join("config.json"))?;
        let weights_path = dir.join("model.safetensors");
        let file = weights_path.display().to_string();
        if !weights_path.exists() {
            return Err(Error::Missing {
                what: "model.safetensors".into(),
                path: file,
                fix: "point model.uri at a directory holding config.json and model.safetensors"
                    .into(),
            });
        }
        let tensors =
            candle_core::safetensors::load(&weights_path, device).map_err(|e| Error::Weights {
                file: file.clone(),
                message: e.to_string(),
            })?;
        let mut weights = HashMap::new();
        for (name, t) in tensors {
            let t = t.to_dtype(DType::F32)?;
            let fit = match format {
                FrozenFormat::Requantize(target) if t.rank() == 2 => {
                    gguf::fitting(target, t.dim(1)?)
                }
                _ => None,
            };
            let w = match fit {
                Some(target) => Weight::Quantized(Arc::new(QTensor::quantize(&t, target)?)),
                None => Weight::Dense(t),
            };
            weights.insert(name, w);
        }
        Self::from_weights(config, weights, &file, device)
    }

    /// Builds the model from HF-named weights.
    pub fn from_weights(
        config: Config,
        mut weights: HashMap<String, Weight>,
        file: &str,
        device: &Device,
    ) -> Result<Self> {
        config.validate(file)?;
        let (d, kv, dh) = (config.hidden_size, config.kv_heads(), config.head_dim());
        let heads = config.num_attention_heads;
        // Tied models (SmolLM2) ship no lm_head; the head then reads the embedding table.
        let has_head = weights.contains_key("lm_head.weight");
        let mut take = |name: &str, shape: &[usize]| -> Result<Weight> {
            let w = weights.remove(name).ok_or_else(|| Error::Weights {
                file: file.to_string(),
                message: format!("tensor {name} is missing"),
            })?;
            let dims = match &w {
                Weight::Quantized(q) => q.shape().dims().to_vec(),
                Weight::Dense(t) => t.dims().to_vec(),
            };
            if dims != shape {
                return Err(Error::Weights {
                    file: file.to_string(),
                    message: format!("tensor {name} has shape {dims:?}, expected {shape:?}"),
                });
            }
            Ok(w)
        };
        let norm = |w: Weight| -> Result<RmsNorm> {
            Ok(RmsNorm {
                weight: w.dense(device)?,
                eps: config.rms_norm_eps,
            })
        };
        let embed_tokens = take("model.embed_tokens.weight", &[config.vocab_size, d])?;
        let mut layers = Vec::with_capacity(config.num_hidden_layers);
        for i in 0..config.num_hidden_layers {
            let p = format!("model.layers.{i}");
            let mut proj = |part: &str, shape: &[usize]| -> Result<Proj> {
                let name = format!("{p}.{part}");
                Proj::new(name.clone(), take(&format!("{name}.weight"), shape)?)
            };
            let ff = config.intermediate_size;
            let q_proj = proj("self_attn.q_proj", &[heads * dh, d])?;
            let k_proj = proj("self_attn.k_proj", &[kv * dh, d])?;
            let v_proj = proj("self_attn.v_proj", &[kv * dh, d])?;
            let o_proj = proj("self_attn.o_proj", &[d, heads * dh])?;
            let gate_proj = proj("mlp.gate_proj", &[ff, d])?;
            let up_proj = proj("mlp.up_proj", &[ff, d])?;
            let down_proj = proj("mlp.down_proj", &[d, ff])?;
            layers.push(DecoderLayer {
                input_layernorm: norm(take(&format!("{p}.input_layernorm.weight"), &[d])?)?,
                post_attention_layernorm: norm(take(
                    &format!("{p}.post_attention_layernorm.weight"),
                    &[d],
                )?)?,
                q_proj,
                k_proj,
                v_proj,
                o_proj,
                gate_proj,
                up_proj,
                down_proj,
                heads,
                kv_heads: kv,
            });
        }
        let final_norm = norm(take("model.norm.weight", &[d])?)?;
        let head = if has_head {
            take("lm_head.weight", &[config.vocab_size, d])?
        } else {
            embed_tokens.clone()
        };
        let rope = Rope::new(
            dh,
            config.rope_theta,
            config.max_position_embeddings,
            device,
        )?;
        Ok(Self {
            lm_head: Proj::new("lm_head", head)?,
            config,
            embed_tokens,
            layers,
            norm: final_norm,
            rope,
            device: device.clone(),
        })
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Token embeddings `(B, T, d)` for `ids` `(B, T)` u32.
    pub fn embed(&self, ids: &Tensor) -> Result<Tensor> {
        match &self.embed_tokens {
            Weight::Quantized(q) => Ok(q.embedding(ids)?),
            Weight::Dense(table) => tape::embedding_sum(&[(ids, table)]),
        }
    }

    /// The attention bias for `T` tokens and an optional `(B, T)` 0/1 padding mask.
    pub fn bias(&self, t: usize, mask: Option<&Tensor>) -> Result<Tensor> {
        let group = self.config.num_attention_heads / self.config.kv_heads();
        causal_bias(t, group, mask, &self.device)
    }

    /// Runs blocks `range` on `h`, recording a graph wherever `h` or a weight tracks.
    pub fn run_layers(&self, range: Range<usize>, h: &Tensor, bias: &Tensor) -> Result<Tensor> {
        let mut h = h.clone();
        for layer in &self.layers[range] {
            h = layer.forward(&h, bias, &self.rope)?;
        }
        Ok(h)
    }

    /// Every block's hidden state without any graph (frozen-backbone methods read these).
    pub fn forward_hidden(&self, ids: &Tensor, mask: Option<&Tensor>) -> Result<Hidden> {
        let bias = self.bias(ids.dim(1)?, mask)?;
        let mut h = self.embed(ids)?.detach();
        let mut layers = vec![h.clone()];
        for layer in &self.layers {
            h = layer.forward(&h, &bias, &self.rope)?.detach();
            layers.push(h.clone());
        }
        let last = self.norm.forward(&h)?.detach();
        Ok(Hidden { layers, last })
    }

    /// Logits `(B, T, vocab)` of the full (tracked where anything trains) forward.
    pub fn forward(&self, ids: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        let bias = self.bias(ids.dim(1)?, mask)?;
        let h = self.embed(ids)?;
        let h = self.run_layers(0..self.layers.len(), &h, &bias)?;
        self.lm_head.forward(&self.norm.forward(&h)?)
    }

    /// Mean next-token cross-entropy over real tokens: position `t` predicts `ids[t+1]`, and a
    /// pair counts only where `mask` (0/1, `(B, T)`) marks both tokens real.
    pub fn causal_lm_loss(&self, ids: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        if t < 2 {
            return Err(Error::Config {
                field: "dataset.maxSequenceLength".into(),
                message: format!("causal-LM needs at least 2 tokens per row, got {t}"),
            });
        }
        let bias = self.bias(t, mask)?;
        let h = self.embed(ids)?;
        let h = self.run_layers(0..self.layers.len(), &h, &bias)?;
        let h = h.narrow(1, 0, t - 1)?;
        let logits = self
            .lm_head
            .forward(&self.norm.forward(&h)?)?
            .reshape((b * (t - 1), self.config.vocab_size))?;
        let labels = ids.narrow(1, 1, t - 1)?.flatten_all()?;
        let weights = match mask {
            Some(m) => {
                let m = m.to_dtype(DType::F32)?;
                Some((m.narrow(1, 1, t - 1)? * m.narrow(1, 0, t - 1)?)?.flatten_all()?)
            }
            None => None,
        };
        tape::cross_entropy(&logits, &labels, weights.as_ref())
    }

    /// Greedy decoding of `new_tokens` tokens after `prompt` (no KV cache: each step reruns the
    /// sequence, fine for the few tokens a smoke check needs). Stops at `eos`.
    pub fn generate_greedy(
        &self,
        prompt: &[u32],
        new_tokens: usize,
        eos: Option<u32>,
    ) -> Result<Vec<u32>> {
        let mut ids = prompt.to_vec();
        for _ in 0..new_tokens {
            let input = Tensor::new(ids.as_slice(), &self.device)?.unsqueeze(0)?;
            let logits = self.forward(&input, None)?;
            let last = logits.get(0)?.get(ids.len() - 1)?;
            let next = last.argmax(D::Minus1)?.to_scalar::<u32>()?;
            if Some(next) == eos {
                break;
            }
            ids.push(next);
        }
        Ok(ids[prompt.len()..].to_vec())
    }

    /// Every projection under its PEFT name, for LoRA target matching.
    pub fn projections_mut(&mut self) -> impl Iterator<Item = &mut Proj> {
        self.layers.iter_mut().flat_map(|l| l.projections_mut())
    }

    /// Bytes held by weights, by block format (what a frozen backbone costs in memory).
    pub fn weight_bytes(&self) -> HashMap<String, usize> {
        let mut out = HashMap::new();
        let mut add = |w: &Weight| {
            *out.entry(format!("{:?}", w.format())).or_insert(0) += w.bytes();
        };
        add(&self.embed_tokens);
        for l in &self.layers {
            for p in l.projections() {
                add(&p.weight);
            }
        }
        out
    }
}
