//! The linear layer: a frozen or trainable weight (dense, or frozen block-quantized), an optional
//! bias, an optional LoRA update and a fused nonlinearity, as one node.

use std::sync::Arc;

use candle_core::quantized::{QMatMul, QTensor};
use candle_core::{Module, Tensor};

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

/// A frozen block-quantized weight `(out, in)` and the quantized matmul candle runs over it.
#[derive(Clone, Debug)]
pub struct QuantizedWeight {
    pub tensor: Arc<QTensor>,
    matmul: Arc<QMatMul>,
}

impl QuantizedWeight {
    pub fn new(tensor: Arc<QTensor>) -> Result<Self> {
        let matmul = Arc::new(QMatMul::from_arc(tensor.clone())?);
        Ok(Self { tensor, matmul })
    }
}

/// What a [`Linear`] multiplies by: a dense tensor (trainable iff it is a `Var`) or a
/// [`QuantizedWeight`] (always frozen).
pub trait LinearWeight: Clone + std::fmt::Debug {
    fn view(&self) -> WeightView<'_>;
}

/// A [`LinearWeight`] as the layer reads it.
#[derive(Clone, Copy, Debug)]
pub enum WeightView<'a> {
    Dense(&'a Tensor),
    Quantized(&'a QuantizedWeight),
}

impl LinearWeight for Tensor {
    fn view(&self) -> WeightView<'_> {
        WeightView::Dense(self)
    }
}

impl LinearWeight for QuantizedWeight {
    fn view(&self) -> WeightView<'_> {
        WeightView::Quantized(self)
    }
}

/// `y = act(x·Wᵀ + b [+ LoRA])`: one graph node whose backward computes exactly the gradients
/// the trainable parts need. A frozen weight gives `dx` only; a trainable one saves `x` for `dW`.
/// `W` is a dense tensor, or a [`QuantizedWeight`] whose value comes from candle's quantized
/// matmul and whose `dx` multiplies by a transient dequantized copy.
#[derive(Clone, Debug)]
pub struct Linear<W: LinearWeight = Tensor> {
    /// `(out, in)`.
    pub weight: W,
    pub bias: Option<Tensor>,
    pub lora: Option<LoraDelta>,
}

impl<W: LinearWeight> Linear<W> {
    pub fn new(weight: W, bias: Option<Tensor>) -> Self {
        Self {
            weight,
            bias,
            lora: None,
        }
    }

    pub fn in_features(&self) -> usize {
        self.dims2().1
    }

    pub fn out_features(&self) -> usize {
        self.dims2().0
    }

    /// `(out, in)` of the weight.
    fn dims2(&self) -> (usize, usize) {
        let dims = match self.weight.view() {
            WeightView::Dense(w) => w.dims(),
            WeightView::Quantized(q) => q.tensor.shape().dims(),
        };
        (dims[0], dims[1])
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_act(x, Activation::Identity)
    }

    /// The forward with a fused nonlinearity.
    pub fn forward_act(&self, x: &Tensor, act: Activation) -> Result<Tensor> {
        let (x2, lead) = flat2(&x.detach())?;
        let view = self.weight.view();
        let w = match view {
            WeightView::Dense(w) => Frozen::Dense(w.detach()),
            WeightView::Quantized(q) => Frozen::Quantized(q.clone()),
        };
        let b = self.bias.as_ref().map(Tensor::detach);
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
        let u = w.value(&x2, b.as_ref(), low_rank)?;
        let need_dx = tracks(x);
        // A quantized weight is always frozen; it stands in the node by a detached handle.
        let (weight, need_dw) = match view {
            WeightView::Dense(w) => (w.clone(), trainable(w)),
            WeightView::Quantized(_) => (x.detach(), false),
        };
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
                Some(unflat(&w.input_gradient(&gu, low_rank)?, &lead)?)
            } else {
                None
            };
            Ok(vec![dx, dw, db, da, dbl])
        };
        let bias = self.bias.clone().unwrap_or_else(|| weight.detach());
        let (a, b) = match lora {
            Some(l) => (l.a.clone(), l.b.clone()),
            None => (weight.detach(), weight.detach()),
        };
        attach(&[x, &weight, &bias, &a, &b], y, bwd)
    }
}

/// The weight a node's value and input gradient multiply by (detached handles, owned by the
/// backward).
enum Frozen {
    Dense(Tensor),
    Quantized(QuantizedWeight),
}

impl Frozen {
    /// `x·Wᵀ + b [+ scale·t·Bᵀ]`.
    fn value(
        &self,
        x: &Tensor,
        b: Option<&Tensor>,
        low_rank: Option<(&Tensor, &Tensor, f64)>,
    ) -> candle_core::Result<Tensor> {
        match self {
            Self::Dense(w) => linear_value(x, w, b, low_rank),
            Self::Quantized(q) => add_bias_and_low_rank(q.matmul.forward(x)?, b, low_rank),
        }
    }

    /// `g·W [+ (scale·(g·B)·A)⊙mask]`.
    fn input_gradient(
        &self,
        g: &Tensor,
        low_rank: Option<(Tensor, &Tensor, f64, Option<&Tensor>)>,
    ) -> candle_core::Result<Tensor> {
        match self {
            Self::Dense(w) => input_gradient(g, w, low_rank),
            Self::Quantized(q) => {
                let dx = g.matmul(&q.tensor.dequantize(g.device())?)?;
                add_low_rank_gradient(dx, low_rank)
            }
        }
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
    add_bias_and_low_rank(x.matmul(&w.t()?)?, b, low_rank)
}

/// `u + b [+ scale·t·Bᵀ]` with candle's ops.
fn add_bias_and_low_rank(
    mut u: Tensor,
    b: Option<&Tensor>,
    low_rank: Option<(&Tensor, &Tensor, f64)>,
) -> candle_core::Result<Tensor> {
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
    add_low_rank_gradient(g.matmul(w)?, low_rank)
}

/// `dx [+ (scale·(g·B)·A)⊙mask]` with candle's ops.
fn add_low_rank_gradient(
    mut dx: Tensor,
    low_rank: Option<(Tensor, &Tensor, f64, Option<&Tensor>)>,
) -> candle_core::Result<Tensor> {
    if let Some((gb, a, scale, mask)) = low_rank {
        let mut d = (gb.matmul(a)? * scale)?;
        if let Some(m) = mask {
            d = (d * m)?;
        }
        dx = (dx + d)?;
    }
    Ok(dx)
}

#[cfg(test)]
mod tests {
    use candle_core::quantized::GgmlDType;
    use candle_core::{DType, Device, Var};

    use super::*;

    fn det(shape: &[usize], k: f64) -> Tensor {
        let n: usize = shape.iter().product();
        Tensor::arange(0u32, n as u32, &Device::Cpu)
            .and_then(|t| t.to_dtype(DType::F32))
            .and_then(|t| t.affine(k, 0.1))
            .and_then(|t| t.sin())
            .and_then(|t| t.reshape(shape))
            .unwrap()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .and_then(|d| d.abs())
            .and_then(|d| d.flatten_all())
            .and_then(|d| d.max(0))
            .and_then(|d| d.to_scalar::<f32>())
            .unwrap()
    }

    /// A quantized weight goes through the same LoRA node as a dense one: its LoRA and input
    /// gradients match those of its dequantized copy, and the weight itself gets none.
    #[test]
    fn quantized_weight_shares_the_lora_node_with_its_dense_copy() {
        let q = Arc::new(QTensor::quantize(&det(&[48, 64], 0.11), GgmlDType::Q8_0).unwrap());
        let dense = q.dequantize(&Device::Cpu).unwrap();
        let x = Var::from_tensor(&det(&[2, 5, 64], 0.37)).unwrap();
        let a = Var::from_tensor(&det(&[4, 64], 0.23)).unwrap();
        let b = Var::from_tensor(&det(&[48, 4], 0.53)).unwrap();
        let lora = LoraDelta {
            a: a.as_tensor().clone(),
            b: b.as_tensor().clone(),
            scale: 2.0,
            dropout: None,
        };
        let r = det(&[2, 5, 48], 0.71);
        let run = |y: Tensor| {
            let g = (&y * &r).unwrap().sum_all().unwrap().backward().unwrap();
            let grad = |t: &Tensor| g.get(t).unwrap().clone();
            (
                y,
                grad(x.as_tensor()),
                grad(a.as_tensor()),
                grad(b.as_tensor()),
            )
        };
        let quantized = Linear {
            weight: QuantizedWeight::new(q).unwrap(),
            bias: None,
            lora: Some(lora.clone()),
        };
        assert_eq!(
            (quantized.out_features(), quantized.in_features()),
            (48, 64)
        );
        let (yq, dxq, daq, dbq) = run(quantized.forward(x.as_tensor()).unwrap());
        let dense = Linear {
            weight: dense,
            bias: None,
            lora: Some(lora),
        };
        let (yd, dxd, dad, dbd) = run(dense.forward(x.as_tensor()).unwrap());
        // The value differs by the quantized matmul's rounding of `x`; the gradients only by the
        // order of summation.
        assert!(max_diff(&yq, &yd) < 5e-2, "{}", max_diff(&yq, &yd));
        for (q, d) in [(&dxq, &dxd), (&daq, &dad), (&dbq, &dbd)] {
            assert!(max_diff(q, d) < 1e-4, "{}", max_diff(q, d));
        }
    }
}
