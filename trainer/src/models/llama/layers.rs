//! The Llama layers on `tape`: weights that stay block-quantized or train in f32, bias-free
//! projections with LoRA, RMSNorm, rotary embeddings, grouped-query causal attention and SwiGLU,
//! each owning its backward (the residual add is the tape's).

use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{D, DType, Device, Module, Tensor};

use crate::models::backbone::LoraSite;
use crate::tape::{self, LoraDelta, attach};
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
