//! The linear layer: a frozen or trainable weight, an optional bias, an optional LoRA update and a
//! fused nonlinearity, as one node.

use candle_core::Tensor;

use super::activation::gelu_parts;
use super::{Dropout, column_sums, flat2, unflat};
use crate::tape::{attach, tracks, trainable};
use crate::{Result, kernels};

/// Nonlinearity fused into a [`Linear`] node, so the node saves its derivative, not its input.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    Identity,
    /// Exact GELU, `x·Φ(x)` (BERT's `gelu`).
    Gelu,
}

/// A low-rank update `scale · B·A·dropout(x)` next to a frozen weight (PEFT LoRA).
#[derive(Clone, Debug)]
pub struct LoraDelta {
    /// `(r, in)`, a `Var`.
    pub a: Tensor,
    /// `(out, r)`, a `Var`.
    pub b: Tensor,
    /// `alpha / r`.
    pub scale: f64,
    pub dropout: Option<Dropout>,
}

/// `y = act(x·Wᵀ + b [+ LoRA])`: one graph node whose backward computes exactly the gradients
/// the trainable parts need. A frozen weight gives `dx` only; a trainable one saves `x` for `dW`.
#[derive(Clone, Debug)]
pub struct Linear {
    /// `(out, in)`.
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    pub lora: Option<LoraDelta>,
}

impl Linear {
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self {
            weight,
            bias,
            lora: None,
        }
    }

    pub fn in_features(&self) -> usize {
        self.weight.dims()[1]
    }

    pub fn out_features(&self) -> usize {
        self.weight.dims()[0]
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_act(x, Activation::Identity)
    }

    /// The forward with a fused nonlinearity.
    pub fn forward_act(&self, x: &Tensor, act: Activation) -> Result<Tensor> {
        let (x2, lead) = flat2(&x.detach())?;
        let (w, b) = (self.weight.detach(), self.bias.as_ref().map(Tensor::detach));
        // LoRA's input (after dropout), its mask and its rank-r projection `t = x·Aᵀ`.
        let mut lora_state = None;
        if let Some(l) = &self.lora {
            let mask = match &l.dropout {
                Some(d) => d.mask(&x2)?,
                None => None,
            };
            let xd = match &mask {
                Some(m) => (&x2 * m)?,
                None => x2.clone(),
            };
            let t = xd.matmul(&l.a.detach().t()?)?;
            lora_state = Some((xd, mask, t));
        }
        let up = self.lora.as_ref().map(|l| l.b.detach());
        let low_rank = match (&self.lora, &lora_state, &up) {
            (Some(l), Some((_, _, t)), Some(up)) => Some((t, up, l.scale)),
            _ => None,
        };
        let u = linear_value(&x2, &w, b.as_ref(), low_rank)?;
        let need_dx = tracks(x);
        let need_dw = trainable(&self.weight);
        let need_db = self.bias.as_ref().is_some_and(trainable);
        let lora = self.lora.as_ref();
        let need_lora = lora.is_some_and(|l| trainable(&l.a) || trainable(&l.b));
        let need_any = need_dx || need_dw || need_db || need_lora;
        let (y, deriv) = match act {
            Activation::Identity => (u, None),
            Activation::Gelu => gelu_parts(&u, need_any)?,
        };
        let y = unflat(&y, &lead)?;
        if !need_any {
            return Ok(y);
        }

        let saved_x = need_dw.then_some(x2);
        let lora_parts = lora.map(|l| (l.a.detach(), l.b.detach(), l.scale));
        let lora_saved = if need_lora || need_dx {
            lora_state
        } else {
            None
        };
        let bwd = move |g: &Tensor| {
            let (g2, _) = flat2(g)?;
            let gu = match &deriv {
                Some(d) => (g2 * d)?,
                None => g2,
            };
            let dw = match &saved_x {
                Some(x2) => Some(gu.t()?.matmul(x2)?),
                None => None,
            };
            let db = if need_db {
                Some(column_sums(&gu, None)?)
            } else {
                None
            };
            let (mut da, mut dbl, mut low_rank) = (None, None, None);
            if let (Some((a, b, scale)), Some((xd, mask, t))) = (&lora_parts, &lora_saved) {
                let gb = gu.matmul(b)?; // (N, r)
                if need_lora {
                    da = Some((gb.t()?.matmul(xd)? * *scale)?);
                    dbl = Some((gu.t()?.matmul(t)? * *scale)?);
                }
                low_rank = Some((gb, a, *scale, mask.as_ref()));
            }
            let dx = if need_dx {
                Some(unflat(&input_gradient(&gu, &w, low_rank)?, &lead)?)
            } else {
                None
            };
            Ok(vec![dx, dw, db, da, dbl])
        };
        let bias = self.bias.clone().unwrap_or_else(|| self.weight.detach());
        let (a, b) = match lora {
            Some(l) => (l.a.clone(), l.b.clone()),
            None => (self.weight.detach(), self.weight.detach()),
        };
        attach(&[x, &self.weight, &bias, &a, &b], y, bwd)
    }
}

/// `x·Wᵀ + b [+ scale·t·Bᵀ]`, a linear layer's value with its LoRA term: one buffer on the CPU,
/// candle's ops elsewhere.
fn linear_value(
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    low_rank: Option<(&Tensor, &Tensor, f64)>,
) -> candle_core::Result<Tensor> {
    let mut terms = vec![kernels::Term {
        a: x,
        b: w,
        b_transposed: true,
        scale: 1.0,
    }];
    if let Some((t, up, scale)) = low_rank {
        terms.push(kernels::Term {
            a: t,
            b: up,
            b_transposed: true,
            scale: scale as f32,
        });
    }
    if let Some(u) = kernels::matmul_sum(&terms, b)? {
        return Ok(u);
    }
    let mut u = x.matmul(&w.t()?)?;
    if let Some(b) = b {
        u = u.broadcast_add(b)?;
    }
    if let Some((t, up, scale)) = low_rank {
        u = (u + (t.matmul(&up.t()?)? * scale)?)?;
    }
    Ok(u)
}

/// `g·W [+ (scale·(g·B)·A)⊙mask]`, a linear layer's input gradient; `low_rank` carries `g·B`,
/// `A`, the scale and LoRA's dropout mask.
fn input_gradient(
    g: &Tensor,
    w: &Tensor,
    low_rank: Option<(Tensor, &Tensor, f64, Option<&Tensor>)>,
) -> candle_core::Result<Tensor> {
    // A dropout mask applies to the LoRA term alone, so that sum cannot be one buffer.
    if low_rank
        .as_ref()
        .is_none_or(|(_, _, _, mask)| mask.is_none())
    {
        let mut terms = vec![kernels::Term {
            a: g,
            b: w,
            b_transposed: false,
            scale: 1.0,
        }];
        if let Some((gb, a, scale, _)) = &low_rank {
            terms.push(kernels::Term {
                a: gb,
                b: a,
                b_transposed: false,
                scale: *scale as f32,
            });
        }
        if let Some(dx) = kernels::matmul_sum(&terms, None)? {
            return Ok(dx);
        }
    }
    let mut dx = g.matmul(w)?;
    if let Some((gb, a, scale, mask)) = low_rank {
        let mut d = (gb.matmul(a)? * scale)?;
        if let Some(m) = mask {
            d = (d * m)?;
        }
        dx = (dx + d)?;
    }
    Ok(dx)
}
