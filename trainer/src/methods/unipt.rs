//! Universal parallel tuning (UniPT, Diao et al., CVPR 2024): a light network beside the frozen
//! backbone reads every layer's hidden state, weighs the layers against the last one and adds
//! what it gathers to the backbone's output; backward runs through that network only.
//!
//! With `H_i` the `L + 1` taps and `m = d / reduction` (the UniPT code's
//! `adapter_for_transformer.py`, VSE∞ variant):
//! ```text
//! H_i' = LN(Down_i(H_i))                     anchor A = H_L',  a = mean(A)
//! M_i  = (l1norm_rows(relu(A·H_i'ᵀ ⊙ key mask)) + I) · H_i'      for i < L
//! c_i  = Gate(a ⊙ mean(H_i')),   w = softmax_i(c_i)             (per example, over layers)
//! out  = final + Up(relu(A + LN(Proj(Σ_i w_i M_i))))
//! ```
//! `final` is the backbone's own output (its last tap after its final norm), as the CLIP4Clip
//! variant adds the anchor back; the head reads `out`. The backbone runs once without a graph:
//! a step keeps the taps the `Down_i` read (for their weight gradients) and width-m tensors.

use candle_core::{D, DType, Device, Tensor, Var};
use petl_crds::UniptConfig;

use super::{Method, head::Head, make_trainable};
use crate::export::HeadFeatures;
use crate::init::Rng;
use crate::models::Backbone;
use crate::nn::{self, LayerNorm, Linear};
use crate::tape;
use crate::{Error, Result};

/// The ε of the UniPT code's `l1norm` (row sums of the relu'd scores).
const L1_EPS: f64 = 1e-8;

/// A linear to the parallel network's width followed by its LayerNorm (`Down_i`, `Proj`).
struct Projection {
    linear: Linear,
    norm: LayerNorm,
}

impl Projection {
    fn new(rng: &mut Rng, out: usize, inp: usize, eps: f64, on: &On) -> Result<Self> {
        Ok(Self {
            linear: random_linear(rng, out, inp, on)?,
            norm: LayerNorm {
                weight: Tensor::ones(out, on.dtype, &on.device)?,
                bias: Tensor::zeros(out, on.dtype, &on.device)?,
                eps,
            },
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.norm.forward(&self.linear.forward(x)?)
    }

    /// Makes the four tensors trainable under `prefix` (`{prefix}.0` the linear, `.1` the norm,
    /// as the UniPT code's `nn.Sequential` names them).
    fn train(&mut self, prefix: &str, params: &mut Vec<(String, Var)>) -> Result<()> {
        params.push((
            format!("{prefix}.0.weight"),
            make_trainable(&mut self.linear.weight)?,
        ));
        if let Some(b) = self.linear.bias.as_mut() {
            params.push((format!("{prefix}.0.bias"), make_trainable(b)?));
        }
        params.push((
            format!("{prefix}.1.weight"),
            make_trainable(&mut self.norm.weight)?,
        ));
        params.push((
            format!("{prefix}.1.bias"),
            make_trainable(&mut self.norm.bias)?,
        ));
        Ok(())
    }
}

/// Where new tensors live.
struct On {
    dtype: DType,
    device: Device,
}

pub struct Unipt {
    backbone: Box<dyn Backbone>,
    /// `Down_i` for every tap, the last one making the anchor.
    downsample: Vec<Projection>,
    projection: Projection,
    gate: Linear,
    upsample: Linear,
    head: Head,
    params: Vec<(String, Var)>,
}

impl Unipt {
    pub fn new(
        config: &UniptConfig,
        backbone: Box<dyn Backbone>,
        num_labels: usize,
        seed: u64,
    ) -> Result<Self> {
        let d = backbone.hidden_size();
        let width = usize::try_from(config.reduction)
            .ok()
            .filter(|r| *r >= 1)
            .map(|r| (d / r).max(1))
            .ok_or_else(|| Error::Config {
                field: "spec.method.unipt.reduction".into(),
                message: format!("{} must be at least 1 (e.g. 4)", config.reduction),
            })?;
        if backbone.num_layers() == 0 {
            return Err(Error::Config {
                field: "spec.model".into(),
                message: "UniPT weighs the backbone's layers against its last one; this backbone \
                          has no layers"
                    .into(),
            });
        }
        let on = On {
            dtype: backbone.dtype(),
            device: backbone.device().clone(),
        };
        let eps = backbone.norm_eps();
        let mut rng = Rng::new(seed);
        let mut downsample = (0..=backbone.num_layers())
            .map(|_| Projection::new(&mut rng, width, d, eps, &on))
            .collect::<Result<Vec<_>>>()?;
        let mut projection = Projection::new(&mut rng, width, width, eps, &on)?;
        // No bias: a bias shared by every layer's score cancels in the softmax over layers.
        let mut gate = random_linear(&mut rng, 1, width, &on)?;
        gate.bias = None;
        let mut upsample = if config.zero_init_up {
            Linear::new(
                Tensor::zeros((d, width), on.dtype, &on.device)?,
                Some(Tensor::zeros(d, on.dtype, &on.device)?),
            )
        } else {
            random_linear(&mut rng, d, width, &on)?
        };

        let mut params = Vec::new();
        for (i, down) in downsample.iter_mut().enumerate() {
            down.train(&format!("unipt.downsample_layers.{i}"), &mut params)?;
        }
        projection.train("unipt.projection_layer", &mut params)?;
        for (name, t) in [
            ("unipt.gate_layer.weight", &mut gate.weight),
            ("unipt.upsample_layer.1.weight", &mut upsample.weight),
        ] {
            params.push((name.into(), make_trainable(t)?));
        }
        if let Some(b) = upsample.bias.as_mut() {
            params.push(("unipt.upsample_layer.1.bias".into(), make_trainable(b)?));
        }
        let head = Head::over(backbone.as_ref(), num_labels, &mut rng)?;
        Ok(Self {
            backbone,
            downsample,
            projection,
            gate,
            upsample,
            head,
            params,
        })
    }
}

impl Method for Unipt {
    fn name(&self) -> &'static str {
        "unipt"
    }

    fn head_features(&self) -> HeadFeatures {
        HeadFeatures::Method(
            "the backbone's output plus UniPT's parallel network's, pooled as the backbone pools",
        )
    }

    fn parameters(&self) -> Vec<(String, Var)> {
        self.head.after(&self.params)
    }

    fn forward(&self, input: &Tensor, attention_mask: &Tensor) -> Result<Tensor> {
        let taps = self.backbone.taps(input, attention_mask)?;
        let mask = self.backbone.token_mask(input, attention_mask)?;
        let last = taps.len() - 1;
        let backbone_out = self.backbone.output_from_tap(&taps[last])?;
        let anchor = self.downsample[last].forward(&taps[last])?;
        let anchor_mean = nn::mean_pool(&anchor, &mask)?;
        let key_mask = mask.to_dtype(anchor.dtype())?.unsqueeze(1)?;
        let mut merged = Vec::with_capacity(last);
        let mut confidence = Vec::with_capacity(last);
        for (down, tap) in self.downsample.iter().zip(&taps[..last]) {
            let target = down.forward(tap)?;
            let target_mean = nn::mean_pool(&target, &mask)?;
            confidence.push(self.gate.forward(&product(&anchor_mean, &target_mean)?)?);
            merged.push(cross_attention(&anchor, &target, &key_mask)?);
        }
        drop(taps);
        // Softmax over the layers, per example (B, L).
        let weights = nn::softmax(&Tensor::cat(&confidence, 1)?)?;
        let mut mixed: Option<Tensor> = None;
        for (i, m) in merged.iter().enumerate() {
            let w = weights.narrow(1, i, 1)?;
            mixed = Some(weighted_add(mixed.as_ref(), &w, m)?);
        }
        let mixed = mixed.ok_or_else(|| Error::Internal("UniPT merged no layer".into()))?;
        let features = sum(&anchor, &self.projection.forward(&mixed)?)?;
        let update = self.upsample.forward(&relu(&features)?)?;
        let out = sum(&backbone_out, &update)?;
        self.head.forward(&out, &mask)
    }
}

/// The confidence aggregation's per-layer step, as one node (parents: the anchor and layer i's
/// projected states, both `(B, T, m)`; `key_mask` `(B, 1, T)` 0/1):
/// `M = (R / (Σ_k R + ε) + I) · X` with `R = relu(A·Xᵀ ⊙ key_mask)`.
/// Saves the normalised weights `(B, T, T)` and the row sums; A and X are the node's parents.
fn cross_attention(anchor: &Tensor, target: &Tensor, key_mask: &Tensor) -> Result<Tensor> {
    let (a, x) = (anchor.detach(), target.detach());
    let scores = a.matmul(&x.t()?)?.broadcast_mul(key_mask)?.relu()?;
    let rows = (scores.sum_keepdim(D::Minus1)? + L1_EPS)?;
    let weights = scores.broadcast_div(&rows)?;
    drop(scores);
    let value = (weights.matmul(&x)? + &x)?;
    tape::attach(&[anchor, target], value, move |g| {
        let g = g.contiguous()?;
        let dweights = g.matmul(&x.t()?)?;
        let dot = (&dweights * &weights)?.sum_keepdim(D::Minus1)?;
        // Only positive scores pass relu (masked keys score 0 and so are cut too).
        let positive = weights.gt(0.0)?.to_dtype(weights.dtype())?;
        let dscores = (dweights.broadcast_sub(&dot)?.broadcast_div(&rows)? * positive)?;
        let da = dscores.matmul(&x)?;
        let dx = ((weights.transpose(1, 2)?.matmul(&g)? + &g)?
            + dscores.transpose(1, 2)?.matmul(&a)?)?;
        Ok(vec![Some(da), Some(dx)])
    })
}

/// `acc + w ⊙ m` with `w` `(B, 1)` one layer's confidence, `m` `(B, T, m)` its merged states;
/// `acc` absent for the first layer. One node; it saves nothing beyond its parents.
fn weighted_add(acc: Option<&Tensor>, w: &Tensor, m: &Tensor) -> Result<Tensor> {
    let (wd, md) = (w.detach().unsqueeze(2)?, m.detach());
    let term = md.broadcast_mul(&wd)?;
    let value = match acc {
        Some(acc) => (acc.detach() + term)?,
        None => term,
    };
    let need_w = tape::tracks(w);
    let grads = move |g: &Tensor| -> candle_core::Result<(Tensor, Option<Tensor>, Tensor)> {
        let dw = if need_w {
            Some((g * &md)?.sum(D::Minus1)?.sum_keepdim(1)?)
        } else {
            None
        };
        Ok((g.clone(), dw, g.broadcast_mul(&wd)?))
    };
    match acc {
        Some(acc) => tape::attach(&[acc, w, m], value, move |g| {
            let (dacc, dw, dm) = grads(g)?;
            Ok(vec![Some(dacc), dw, Some(dm)])
        }),
        None => tape::attach(&[w, m], value, move |g| {
            let (_, dw, dm) = grads(g)?;
            Ok(vec![dw, Some(dm)])
        }),
    }
}

/// `a ⊙ b` as one node (parents a and b, which it reads back in its backward).
fn product(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let (ad, bd) = (a.detach(), b.detach());
    let value = (&ad * &bd)?;
    tape::attach(&[a, b], value, move |g| {
        Ok(vec![Some((g * &bd)?), Some((g * &ad)?)])
    })
}

/// `a + b` as one node that saves nothing (an untracked side, the backbone's output, gets no
/// gradient).
fn sum(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let value = (a.detach() + b.detach())?;
    tape::attach(&[a, b], value, |g| {
        Ok(vec![Some(g.clone()), Some(g.clone())])
    })
}

/// `max(x, 0)` as one node that keeps its output (the up-projection's input, kept anyway).
fn relu(x: &Tensor) -> Result<Tensor> {
    let y = x.detach().relu()?;
    let saved = y.clone();
    tape::attach(&[x], y, move |g| {
        Ok(vec![Some((g * saved.gt(0.0)?.to_dtype(g.dtype())?)?)])
    })
}

/// PyTorch's default `nn.Linear` init (weight and bias `U(±1/√in)`), as the UniPT code uses.
fn random_linear(rng: &mut Rng, out: usize, inp: usize, on: &On) -> Result<Linear> {
    let w = rng.linear_weight(out, inp, on.dtype, &on.device)?;
    let b = rng.uniform_tensor(out, 1.0 / (inp as f64).sqrt(), on.dtype, &on.device)?;
    Ok(Linear::new(w, Some(b)))
}
