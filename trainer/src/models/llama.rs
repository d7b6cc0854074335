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

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{D, DType, Device, Module, Tensor};
use serde::Deserialize;

use crate::models::backbone::{Backbone, LoraSite, Pooling};
use crate::models::gguf::{self, FrozenFormat};
use crate::tape::{self, LoraDelta, attach};
use crate::{Error, Result};

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

/// A frozen or trainable weight: block-quantized (always frozen) or dense f32 (trainable iff it
/// is a `Var`).
#[derive(Clone, Debug)]
pub enum Weight {
    Quantized(Arc<QTensor>),
    Dense(Tensor),
}

impl Weight {
    /// `(rows, cols)` of a 2-D weight.
    pub fn dims2(&self) -> Result<(usize, usize)> {
        Ok(match self {
            Self::Quantized(q) => q.shape().dims2()?,
            Self::Dense(t) => t.dims2()?,
        })
    }

    /// Bytes the weight occupies in memory.
    pub fn bytes(&self) -> usize {
        match self {
            Self::Quantized(q) => q.storage_size_in_bytes(),
            Self::Dense(t) => t.elem_count() * t.dtype().size_in_bytes(),
        }
    }

    /// The block format (`F32` for dense weights).
    pub fn format(&self) -> GgmlDType {
        match self {
            Self::Quantized(q) => q.dtype(),
            Self::Dense(_) => GgmlDType::F32,
        }
    }

    fn dense(&self, device: &Device) -> Result<Tensor> {
        Ok(match self {
            Self::Quantized(q) => q.dequantize(device)?,
            Self::Dense(t) => t.clone(),
        })
    }
}

/// A bias-free projection `x·Wᵀ [+ LoRA]` named as in HF/PEFT (`model.layers.3.self_attn.q_proj`).
#[derive(Clone, Debug)]
pub struct Proj {
    pub name: String,
    pub weight: Weight,
    /// Set by a LoRA method; `None` otherwise.
    pub lora: Option<LoraDelta>,
    qmatmul: Option<Arc<QMatMul>>,
}

impl Proj {
    pub fn new(name: impl Into<String>, weight: Weight) -> Result<Self> {
        let qmatmul = match &weight {
            Weight::Quantized(q) => Some(Arc::new(QMatMul::from_arc(q.clone())?)),
            Weight::Dense(_) => None,
        };
        Ok(Self {
            name: name.into(),
            weight,
            lora: None,
            qmatmul,
        })
    }

    pub fn in_features(&self) -> usize {
        self.weight.dims2().map(|d| d.1).unwrap_or(0)
    }

    pub fn out_features(&self) -> usize {
        self.weight.dims2().map(|d| d.0).unwrap_or(0)
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match (&self.weight, &self.qmatmul) {
            (Weight::Quantized(q), Some(mm)) => self.forward_quantized(q, mm, x),
            (w, _) => {
                let dense = tape::Linear {
                    weight: w.dense(x.device())?,
                    bias: None,
                    lora: self.lora.clone(),
                };
                dense.forward(x)
            }
        }
    }

    /// The frozen block-quantized path: the value comes from candle's quantized matmul; the
    /// node's backward gives `dx = g·dequantize(W)` (a transient f32 copy) plus the LoRA
    /// gradients, and never a gradient for `W`.
    fn forward_quantized(&self, q: &Arc<QTensor>, mm: &QMatMul, x: &Tensor) -> Result<Tensor> {
        let (x2, lead) = rows(&x.detach())?;
        let mut u = mm.forward(&x2)?;
        let lora = self.lora.as_ref();
        let mut lora_state = None;
        if let Some(l) = lora {
            if l.dropout.as_ref().is_some_and(|d| d.p > 0.0) {
                return Err(Error::Config {
                    field: "method.lora.dropout".into(),
                    message: format!(
                        "{}: LoRA dropout on quantized weights is not supported; set it to 0",
                        self.name
                    ),
                });
            }
            let t = x2.matmul(&l.a.detach().t()?)?;
            u = (u + (t.matmul(&l.b.detach().t()?)? * l.scale)?)?;
            lora_state = Some((x2, t, l.a.detach(), l.b.detach(), l.scale));
        }
        let y = unrows(&u, &lead)?;
        let need_dx = x.track_op();
        let need_lora = lora.is_some_and(|l| tape::trainable(&l.a) || tape::trainable(&l.b));
        if !(need_dx || need_lora) {
            return Ok(y);
        }
        let q = q.clone();
        let bwd = move |g: &Tensor| {
            let (g2, _) = rows(g)?;
            let (mut da, mut db, mut dx) = (None, None, None);
            if need_dx {
                dx = Some(g2.matmul(&q.dequantize(g2.device())?)?);
            }
            if let Some((x2, t, a, b, scale)) = &lora_state {
                let gb = g2.matmul(b)?;
                if need_lora {
                    da = Some((gb.t()?.matmul(x2)? * *scale)?);
                    db = Some((g2.t()?.matmul(t)? * *scale)?);
                }
                if let Some(d) = dx.take() {
                    dx = Some((d + (gb.matmul(a)? * *scale)?)?);
                }
            }
            let dx = dx.map(|d| unrows(&d, &lead)).transpose()?;
            Ok(vec![dx, da, db])
        };
        match lora {
            Some(l) => attach(&[x, &l.a, &l.b], y, bwd),
            None => attach(&[x], y, move |g| Ok(vec![bwd(g)?.swap_remove(0)])),
        }
    }
}

impl LoraSite for Proj {
    fn in_features(&self) -> usize {
        Proj::in_features(self)
    }
    fn out_features(&self) -> usize {
        Proj::out_features(self)
    }
    fn set_lora(&mut self, delta: LoraDelta) {
        self.lora = Some(delta);
    }
}

/// `(..., n)` → `(rows, n)` and the dims to restore.
fn rows(x: &Tensor) -> candle_core::Result<(Tensor, Vec<usize>)> {
    let dims = x.dims().to_vec();
    let n = *dims.last().unwrap_or(&1);
    Ok((
        x.reshape((x.elem_count() / n.max(1), n))?.contiguous()?,
        dims,
    ))
}

fn unrows(x: &Tensor, lead: &[usize]) -> candle_core::Result<Tensor> {
    let mut dims = lead[..lead.len() - 1].to_vec();
    dims.push(x.dim(D::Minus1)?);
    x.reshape(dims)
}

/// RMSNorm `x / rms(x) · γ`; saves the normalised input and `1/rms`, never the raw input.
#[derive(Clone, Debug)]
pub struct RmsNorm {
    pub weight: Tensor,
    pub eps: f64,
}

impl RmsNorm {
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let xd = x.detach();
        let rstd = (xd.sqr()?.mean_keepdim(D::Minus1)? + self.eps)?
            .sqrt()?
            .recip()?;
        let xhat = xd.broadcast_mul(&rstd)?;
        let y = xhat.broadcast_mul(&self.weight.detach())?;
        let need_dx = x.track_op();
        let need_dw = tape::trainable(&self.weight);
        if !(need_dx || need_dw) {
            return Ok(y);
        }
        let gamma = self.weight.detach();
        let bwd = move |g: &Tensor| {
            let dw = if need_dw {
                let (g2, _) = rows(g)?;
                let (x2, _) = rows(&xhat)?;
                Some((g2 * x2)?.sum(0)?)
            } else {
                None
            };
            let dx = if need_dx {
                let gw = g.broadcast_mul(&gamma)?;
                let m = (&gw * &xhat)?.mean_keepdim(D::Minus1)?;
                Some(gw.sub(&xhat.broadcast_mul(&m)?)?.broadcast_mul(&rstd)?)
            } else {
                None
            };
            Ok(vec![dx, dw])
        };
        attach(&[x, &self.weight], y, bwd)
    }
}

/// cos/sin tables of HF-style (half-split) rotary embeddings, `(positions, head_dim/2)`.
#[derive(Clone, Debug)]
pub struct Rope {
    cos: Tensor,
    sin: Tensor,
}

impl Rope {
    pub fn new(head_dim: usize, theta: f64, positions: usize, device: &Device) -> Result<Self> {
        let half = head_dim / 2;
        let inv: Vec<f32> = (0..half)
            .map(|i| (1.0 / theta.powf(2.0 * i as f64 / head_dim as f64)) as f32)
            .collect();
        let inv = Tensor::from_vec(inv, (1, half), device)?;
        let pos = Tensor::arange(0u32, positions as u32, device)?
            .to_dtype(DType::F32)?
            .reshape((positions, 1))?;
        let angles = pos.broadcast_mul(&inv)?;
        Ok(Self {
            cos: angles.cos()?,
            sin: angles.sin()?,
        })
    }

    /// `(B, T, heads·dh)` → rotated `(B, heads, T, dh)`. A rotation, so the backward is the
    /// rotation by the negated angle; the node saves nothing.
    pub fn apply(&self, x: &Tensor, heads: usize) -> Result<Tensor> {
        let (b, t, width) = x.dims3()?;
        let dh = width / heads;
        if t > self.cos.dim(0)? {
            return Err(Error::Config {
                field: "dataset.maxSequenceLength".into(),
                message: format!(
                    "{t} tokens exceed the model's {} positions (max_position_embeddings)",
                    self.cos.dim(0)?
                ),
            });
        }
        let cos = self.cos.narrow(0, 0, t)?;
        let sin = self.sin.narrow(0, 0, t)?;
        let xh = x
            .detach()
            .reshape((b, t, heads, dh))?
            .transpose(1, 2)?
            .contiguous()?;
        let y = candle_nn::rotary_emb::rope(&xh, &cos, &sin)?;
        if !x.track_op() {
            return Ok(y);
        }
        let neg_sin = sin.neg()?;
        attach(&[x], y, move |g| {
            let back = candle_nn::rotary_emb::rope(&g.contiguous()?, &cos, &neg_sin)?;
            Ok(vec![Some(
                back.transpose(1, 2)?.contiguous()?.reshape((b, t, width))?,
            )])
        })
    }
}

/// Additive attention bias for grouped-query causal attention: `(1 or B, 1, G·T, T)` with 0 where
/// query row `r` (position `r mod T`) may see key `s` and `-1e9` where it may not (the future, or
/// a padding key when `mask` is given).
pub fn causal_bias(
    t: usize,
    group: usize,
    mask: Option<&Tensor>,
    device: &Device,
) -> Result<Tensor> {
    let mut v = vec![0f32; group * t * t];
    for r in 0..group * t {
        let pos = r % t;
        for s in pos + 1..t {
            v[r * t + s] = -1e9;
        }
    }
    let causal = Tensor::from_vec(v, (1, 1, group * t, t), device)?;
    Ok(match mask {
        Some(m) => {
            let (b, mt) = m.dims2()?;
            let keys = ((m.to_dtype(DType::F32)? - 1.0)? * 1e9)?.reshape((b, 1, 1, mt))?;
            causal.broadcast_add(&keys)?
        }
        None => causal,
    })
}

/// Causal grouped-query attention as one node. `q` `(B, H, T, dh)` and `k` `(B, KV, T, dh)` are
/// rotated; `v` is `(B, T, KV·dh)`. Query head `h` reads key/value head `h / (H/KV)` (HF's
/// `repeat_kv` order) without repeating K and V: the G query heads of a group are stacked along
/// the row axis. Saves the probabilities; returns `(B, T, H·dh)`.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, bias: &Tensor) -> Result<Tensor> {
    let (b, h, t, dh) = q.dims4()?;
    let kv = k.dim(1)?;
    let g = h / kv;
    let scale = 1.0 / (dh as f64).sqrt();
    let qg = q.detach().reshape((b, kv, g * t, dh))?;
    let kh = k.detach();
    let split_v = move |v: &Tensor| -> candle_core::Result<Tensor> {
        v.reshape((b, t, kv, dh))?.transpose(1, 2)?.contiguous()
    };
    let vh = split_v(&v.detach())?;
    let scores = (qg.matmul(&kh.t()?)? * scale)?.broadcast_add(bias)?;
    let p = candle_nn::ops::softmax_last_dim(&scores)?;
    drop(scores);
    let merge = move |x: &Tensor| -> candle_core::Result<Tensor> {
        x.reshape((b, h, t, dh))?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((b, t, h * dh))
    };
    let ctx = merge(&p.matmul(&vh)?)?;
    drop(vh);
    if !(q.track_op() || k.track_op() || v.track_op()) {
        return Ok(ctx);
    }
    let vd = v.detach();
    let bwd = move |grad: &Tensor| {
        let gh = grad
            .reshape((b, t, h, dh))?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((b, kv, g * t, dh))?;
        let vh = split_v(&vd)?;
        let dp = gh.matmul(&vh.t()?)?;
        let dv = p.t()?.matmul(&gh)?;
        let dot = (&dp * &p)?.sum_keepdim(D::Minus1)?;
        let ds = ((&p * dp.broadcast_sub(&dot)?)? * scale)?;
        let dq = ds.matmul(&kh)?.reshape((b, h, t, dh))?;
        let dk = ds.t()?.matmul(&qg)?;
        let dv = dv.transpose(1, 2)?.contiguous()?.reshape((b, t, kv * dh))?;
        Ok(vec![Some(dq), Some(dk), Some(dv)])
    };
    attach(&[q, k, v], ctx, bwd)
}

/// `silu(gate) · up` as one node; its parents are the two projections, which the graph holds
/// anyway, so the node saves nothing of its own.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    let (gd, ud) = (gate.detach(), up.detach());
    let y = (candle_nn::ops::silu(&gd)? * &ud)?;
    if !(gate.track_op() || up.track_op()) {
        return Ok(y);
    }
    attach(&[gate, up], y, move |g| {
        let s = candle_nn::ops::sigmoid(&gd)?;
        let silu = (&gd * &s)?;
        // d silu(z)/dz = σ(z)·(1 + z·(1 − σ(z)))
        let dsilu = (&s * ((&gd * (1.0 - &s)?)? + 1.0)?)?;
        let dgate = ((g * &ud)? * dsilu)?;
        let dup = (g * silu)?;
        Ok(vec![Some(dgate), Some(dup)])
    })
}

/// `h + delta` as a node: candle's own `add` stores a gradient for an untracked operand too (the
/// frozen embeddings under LoRA), which no backward reads and which stays in the gradient store.
pub fn residual(h: &Tensor, delta: &Tensor) -> Result<Tensor> {
    let y = (h.detach() + delta.detach())?;
    attach(&[h, delta], y, |g| {
        Ok(vec![Some(g.clone()), Some(g.clone())])
    })
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
        let h = residual(h, &self.o_proj.forward(&ctx)?)?;
        let x = self.post_attention_layernorm.forward(&h)?;
        let m = swiglu(&self.gate_proj.forward(&x)?, &self.up_proj.forward(&x)?)?;
        residual(&h, &self.down_proj.forward(&m)?)
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

/// Llama as a sequence classifier: the final-normed hidden states, pooled at the last real
/// token; its seven projections per layer for LoRA (PEFT paths `model.layers.N.self_attn.q_proj`);
/// dense tensors (norms, and weights kept in f32) for full fine-tuning. Block-quantized weights
/// never train. It has no bias terms and no post-LayerNorm encoder blocks, so BitFit and LST's
/// pruned initialisation do not apply.
impl Backbone for Llama {
    fn hidden_size(&self) -> usize {
        self.config.hidden_size
    }

    fn num_layers(&self) -> usize {
        self.layers.len()
    }

    fn num_heads(&self) -> usize {
        self.config.num_attention_heads
    }

    fn intermediate_size(&self) -> usize {
        self.config.intermediate_size
    }

    fn norm_eps(&self) -> f64 {
        self.config.rms_norm_eps
    }

    fn dtype(&self) -> DType {
        // Trainable parts are f32 whatever block format the frozen weights use.
        DType::F32
    }

    fn device(&self) -> &Device {
        &self.device
    }

    fn taps(&self, input_ids: &Tensor, attention_mask: &Tensor) -> Result<Vec<Tensor>> {
        let ids = input_ids.to_dtype(DType::U32)?;
        Ok(self.forward_hidden(&ids, Some(attention_mask))?.layers)
    }

    fn forward(&self, input_ids: &Tensor, attention_mask: &Tensor) -> Result<Tensor> {
        let ids = input_ids.to_dtype(DType::U32)?;
        let bias = self.bias(ids.dim(1)?, Some(attention_mask))?;
        let h = self.embed(&ids)?;
        let h = self.run_layers(0..self.layers.len(), &h, &bias)?;
        self.norm.forward(&h)
    }

    fn final_norm(&self, last_tap: &Tensor) -> Result<Tensor> {
        self.norm.forward(last_tap)
    }

    fn pooling(&self) -> Pooling {
        Pooling::LastToken
    }

    fn linears_mut(&mut self) -> Vec<(String, &mut dyn LoraSite)> {
        self.projections_mut()
            .map(|p| (p.name.clone(), p as &mut dyn LoraSite))
            .collect()
    }

    fn parameters_mut(&mut self) -> Vec<(String, &mut Tensor)> {
        let mut out = Vec::new();
        if let Weight::Dense(t) = &mut self.embed_tokens {
            out.push(("model.embed_tokens.weight".to_string(), t));
        }
        for (i, layer) in self.layers.iter_mut().enumerate() {
            let DecoderLayer {
                input_layernorm,
                post_attention_layernorm,
                q_proj,
                k_proj,
                v_proj,
                o_proj,
                gate_proj,
                up_proj,
                down_proj,
                ..
            } = layer;
            out.push((
                format!("model.layers.{i}.input_layernorm.weight"),
                &mut input_layernorm.weight,
            ));
            for p in [q_proj, k_proj, v_proj, o_proj] {
                if let Weight::Dense(t) = &mut p.weight {
                    out.push((format!("{}.weight", p.name), t));
                }
            }
            out.push((
                format!("model.layers.{i}.post_attention_layernorm.weight"),
                &mut post_attention_layernorm.weight,
            ));
            for p in [gate_proj, up_proj, down_proj] {
                if let Weight::Dense(t) = &mut p.weight {
                    out.push((format!("{}.weight", p.name), t));
                }
            }
        }
        out.push(("model.norm.weight".to_string(), &mut self.norm.weight));
        out
    }

    fn frozen_only(&self) -> Vec<String> {
        let mut out = Vec::new();
        if let Weight::Quantized(_) = self.embed_tokens {
            out.push("model.embed_tokens.weight".to_string());
        }
        for layer in &self.layers {
            for p in layer.projections() {
                if let Weight::Quantized(_) = p.weight {
                    out.push(format!("{}.weight", p.name));
                }
            }
        }
        out
    }
}
