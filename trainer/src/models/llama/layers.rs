//! The Llama layers on `tape`: weights that stay block-quantized or train in f32, bias-free
//! projections with LoRA (the shared [`nn::Linear`]), grouped-query causal attention and SwiGLU,
//! each owning its backward. RMSNorm and the rotary embeddings are [`nn::RmsNorm`] and
//! [`nn::Rope`]; the residual add is [`nn::residual`].

use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{D, DType, Device, Tensor};

use crate::models::backbone::LoraSite;
use crate::nn::{self, LoraDelta, QuantizedWeight};
use crate::tape::{attach, tracks};
use crate::{Error, Result};

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

    pub(super) fn dense(&self, device: &Device) -> Result<Tensor> {
        Ok(match self {
            Self::Quantized(q) => q.dequantize(device)?,
            Self::Dense(t) => t.clone(),
        })
    }
}

/// A bias-free projection `x·Wᵀ [+ LoRA]` named as in HF/PEFT (`model.layers.3.self_attn.q_proj`):
/// the shared [`nn::Linear`] over the dense or the block-quantized weight.
#[derive(Clone, Debug)]
pub struct Proj {
    pub name: String,
    pub weight: Weight,
    /// Set by a LoRA method; `None` otherwise.
    pub lora: Option<LoraDelta>,
    quantized: Option<QuantizedWeight>,
}

impl Proj {
    pub fn new(name: impl Into<String>, weight: Weight) -> Result<Self> {
        let quantized = match &weight {
            Weight::Quantized(q) => Some(QuantizedWeight::new(q.clone())?),
            Weight::Dense(_) => None,
        };
        Ok(Self {
            name: name.into(),
            weight,
            lora: None,
            quantized,
        })
    }

    pub fn in_features(&self) -> usize {
        self.weight.dims2().map(|d| d.1).unwrap_or(0)
    }

    pub fn out_features(&self) -> usize {
        self.weight.dims2().map(|d| d.0).unwrap_or(0)
    }

    /// On a quantized weight, the value comes from candle's quantized matmul and the node's
    /// backward gives `dx = g·dequantize(W)` (a transient f32 copy) plus the LoRA gradients, and
    /// never a gradient for `W`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let lora = self.lora.clone();
        match (&self.weight, &self.quantized) {
            (Weight::Quantized(_), Some(q)) => {
                if lora
                    .as_ref()
                    .and_then(|l| l.dropout.as_ref())
                    .is_some_and(|d| d.p > 0.0)
                {
                    return Err(Error::Config {
                        field: "method.lora.dropout".into(),
                        message: format!(
                            "{}: LoRA dropout on quantized weights is not supported; set it to 0",
                            self.name
                        ),
                    });
                }
                let linear = nn::Linear {
                    weight: q.clone(),
                    bias: None,
                    lora,
                };
                linear.forward(x)
            }
            (w, _) => {
                let dense = nn::Linear {
                    weight: w.dense(x.device())?,
                    bias: None,
                    lora,
                };
                dense.forward(x)
            }
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
    if !(tracks(q) || tracks(k) || tracks(v)) {
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
    if !(tracks(gate) || tracks(up)) {
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
