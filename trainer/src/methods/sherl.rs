//! SHERL (Diao et al., ECCV 2024): light adapters read the frozen backbone's early hidden states,
//! an anti-redundancy aggregation merges them, and the merged state runs through the backbone's
//! own last blocks, which stay frozen but pass gradients back (the "late route").
//!
//! With `k` late blocks, `L` layers, taps `H_0..H_L` and `m = d / reduction` (the SHERL code's
//! `Sherl_Block`, `Downsample` and `Guidance`, CLIP-ViL variant):
//! ```text
//! F_i  = (fc2(z) + z) ⊙ σ(fc3(z)),  z = relu(fc1_i(H_i))        for i = 0..=L-k (width m)
//! deep = F_{L-k},  shallow F_0..F_{L-k-1}                      per token, over the layers j, l:
//! R_j  = Σ_l relu(cos(F_j, F_l))                                (redundancy among the shallow)
//! w_j  = l1norm_j(relu(fc_attn(F_j ⊙ deep)) / R_j)
//! G    = Σ_j w_j F_j + deep
//! h    = fc_out(relu(G)) + tanh(gate / 0.1) · H_{L-k}           (gate starts at 0)
//! out  = blocks L-k..L of the backbone on h, then its final norm; the head reads out
//! ```
//! The backbone runs once without a graph. A step keeps the L-k+1 taps the adapters read (for
//! their weight gradients), width-m tensors, and the activations of the k late blocks.

use std::ops::Range;

use candle_core::{D, Tensor, Var};
use petl_crds::SherlConfig;

use super::{Method, head::Head, make_trainable};
use crate::export::HeadFeatures;
use crate::init::Rng;
use crate::models::Backbone;
use crate::nn::Linear;
use crate::tape;
use crate::{Error, Result};

/// The output gate's temperature (the code's `gate_T`).
const GATE_TEMPERATURE: f64 = 0.1;
/// The ε the code adds to its L2 norms (cosine similarity) and to its L1 normalisation.
const NORM_EPS: f64 = 1e-6;

/// One early-route adapter, a gated residual MLP to width m (the code's `Downsample`).
struct Adapter {
    fc1: Linear,
    fc2: Linear,
    fc3: Linear,
}

impl Adapter {
    fn new(rng: &mut Rng, d: usize, m: usize, backbone: &dyn Backbone) -> Result<Self> {
        Ok(Self {
            fc1: random_linear(rng, m, d, backbone)?,
            fc2: random_linear(rng, m, m, backbone)?,
            fc3: random_linear(rng, m, m, backbone)?,
        })
    }

    /// `x` `(B, T, d)` → `(B, T, m)`.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let z = self.fc1.forward(x)?.relu()?;
        gated_residual(&z, &self.fc2.forward(&z)?, &self.fc3.forward(&z)?)
    }

    fn train(&mut self, prefix: &str, params: &mut Vec<(String, Var)>) -> Result<()> {
        for (name, l) in [
            ("fc1", &mut self.fc1),
            ("fc2", &mut self.fc2),
            ("fc3", &mut self.fc3),
        ] {
            train_linear(l, &format!("{prefix}.{name}"), params)?;
        }
        Ok(())
    }
}

pub struct Sherl {
    backbone: Box<dyn Backbone>,
    /// One adapter per tap the early route reads, `H_0..=H_{L-k}`.
    adapters: Vec<Adapter>,
    /// `fc_attn`: width m → one score per layer.
    attention: Linear,
    /// `fc_out`: width m → the backbone's width.
    output: Linear,
    /// `(1,)`, the output gate before `tanh(· / 0.1)`.
    gate: Tensor,
    /// The backbone's blocks the late route re-runs.
    late: Range<usize>,
    head: Head,
    params: Vec<(String, Var)>,
}

impl Sherl {
    pub fn new(
        config: &SherlConfig,
        backbone: Box<dyn Backbone>,
        num_labels: usize,
        seed: u64,
    ) -> Result<Self> {
        let (d, layers) = (backbone.hidden_size(), backbone.num_layers());
        let width = usize::try_from(config.reduction)
            .ok()
            .filter(|r| *r >= 1)
            .map(|r| (d / r).max(1))
            .ok_or_else(|| Error::Config {
                field: "spec.method.sherl.reduction".into(),
                message: format!("{} must be at least 1 (e.g. 8)", config.reduction),
            })?;
        // The aggregation weighs at least one early layer against the deep one, so the late
        // route leaves at least two taps before it.
        let k = usize::try_from(config.late_layers)
            .ok()
            .filter(|k| *k < layers)
            .ok_or_else(|| Error::Config {
                field: "spec.method.sherl.lateLayers".into(),
                message: format!(
                    "{} must be at least 0 and below the backbone's {layers} layers, so that \
                     the adapters read at least two hidden states before the late route (e.g. 1)",
                    config.late_layers
                ),
            })?;
        let mut rng = Rng::new(seed);
        let b = backbone.as_ref();
        let mut adapters = (0..=layers - k)
            .map(|_| Adapter::new(&mut rng, d, width, b))
            .collect::<Result<Vec<_>>>()?;
        let mut attention = random_linear(&mut rng, 1, width, b)?;
        let mut output = random_linear(&mut rng, d, width, b)?;
        let mut gate = Tensor::zeros(1, b.dtype(), b.device())?;

        let mut params = Vec::new();
        for (i, a) in adapters.iter_mut().enumerate() {
            a.train(&format!("sherl.hor_block.{i}"), &mut params)?;
        }
        train_linear(&mut attention, "sherl.guide_block.fc_attn", &mut params)?;
        params.push(("sherl.gate_params".into(), make_trainable(&mut gate)?));
        train_linear(&mut output, "sherl.fc_out", &mut params)?;
        let head = Head::over(b, num_labels, &mut rng)?;
        Ok(Self {
            backbone,
            adapters,
            attention,
            output,
            gate,
            late: layers - k..layers,
            head,
            params,
        })
    }
}

impl Method for Sherl {
    fn name(&self) -> &'static str {
        "sherl"
    }

    fn head_features(&self) -> HeadFeatures {
        HeadFeatures::Method(
            "the backbone's last `lateLayers` blocks and final norm re-run on SHERL's aggregated \
             states, pooled as the backbone pools",
        )
    }

    fn parameters(&self) -> Vec<(String, Var)> {
        self.head.after(&self.params)
    }

    fn forward(&self, input: &Tensor, attention_mask: &Tensor) -> Result<Tensor> {
        // The late blocks run once, with a graph, on the adapters' output: the frozen pass
        // stops before them.
        let mut taps = self
            .backbone
            .taps_through(input, attention_mask, self.late.start)?;
        let mask = self.backbone.token_mask(input, attention_mask)?;
        let mut features = self
            .adapters
            .iter()
            .zip(&taps)
            .map(|(a, tap)| a.forward(tap))
            .collect::<Result<Vec<_>>>()?;
        let skip = taps
            .pop()
            .ok_or_else(|| Error::Internal("the backbone returned no hidden states".into()))?;
        drop(taps);
        let deep = features
            .pop()
            .ok_or_else(|| Error::Internal("SHERL built no adapter".into()))?;
        // (B, T, K, m): the K shallow layers of each token side by side.
        let shallow = Tensor::stack(&features, 2)?;
        drop(features);
        let scores = self
            .attention
            .forward(&shallow.broadcast_mul(&deep.unsqueeze(2)?)?)?;
        let merged = aggregate(&shallow, &deep, &scores)?;
        let update = self.output.forward(&merged.relu()?)?;
        let mut h = gated_skip(&update, &self.gate, &skip)?;
        drop(skip);
        for layer in self.late.clone() {
            h = self.backbone.run_block(layer, &h, &mask)?;
        }
        let out = self.backbone.output_from_tap(&h)?;
        self.head.forward(&out, &mask)
    }
}

/// `(p2 + z) ⊙ σ(p3)` as one node (parents z, p2 = fc2(z), p3 = fc3(z)); saves the sigmoid.
fn gated_residual(z: &Tensor, p2: &Tensor, p3: &Tensor) -> Result<Tensor> {
    let (zd, p2d) = (z.detach(), p2.detach());
    let gate = (p3.detach().neg()?.exp()? + 1.0)?.recip()?;
    let value = ((&zd + &p2d)? * &gate)?;
    tape::attach(&[z, p2, p3], value, move |g| {
        let du = (g * &gate)?;
        let dgate = ((g * (&zd + &p2d)?)? * (&gate * (1.0 - &gate)?)?)?;
        Ok(vec![Some(du.clone()), Some(du), Some(dgate)])
    })
}

/// `update + tanh(gate / T) · skip` as one node (parents update and the gate; `skip`, an
/// untracked tap, is captured for the gate's gradient).
fn gated_skip(update: &Tensor, gate: &Tensor, skip: &Tensor) -> Result<Tensor> {
    let t = (gate.detach() / GATE_TEMPERATURE)?.tanh()?;
    let skip = skip.detach();
    let value = update.detach().broadcast_add(&skip.broadcast_mul(&t)?)?;
    tape::attach(&[update, gate], value, move |g| {
        let slope = ((1.0 - t.sqr()?)? / GATE_TEMPERATURE)?;
        let dgate = (g * &skip)?.sum_all()?.reshape(1)?.mul(&slope)?;
        Ok(vec![Some(g.clone()), Some(dgate)])
    })
}

/// The anti-redundancy aggregation (the code's `Guidance`) per token, as one node. Parents: the
/// shallow features `S` `(B, T, K, m)`, the deep one `D` `(B, T, m)` and the attention scores
/// `a` `(B, T, K, 1)`. Returns `G = Σ_j w_j S_j + D` `(B, T, m)` with
/// `w = l1norm(relu(a) / R)`, `R_j = Σ_l relu(cos(S_j, S_l))`. Saves per token the K weights,
/// their normaliser and the redundancies; the cosine map is recomputed from `S` in backward.
fn aggregate(shallow: &Tensor, deep: &Tensor, scores: &Tensor) -> Result<Tensor> {
    let (b, t, k, m) = shallow.dims4()?;
    let n = b * t;
    let s = shallow.detach().reshape((n, k, m))?;
    let a = scores.detach().reshape((n, k, 1))?;
    let (unit, _) = unit_rows(&s)?;
    let cosine = unit.matmul(&unit.t()?.contiguous()?)?;
    let redundancy = cosine.relu()?.sum_keepdim(D::Minus1)?;
    let raw = a.relu()?.div(&redundancy)?;
    let total = (raw.sum_keepdim(1)? + NORM_EPS)?;
    let w = raw.broadcast_div(&total)?;
    let value = (w.t()?.contiguous()?.matmul(&s)?.reshape((b, t, m))? + deep.detach())?;
    tape::attach(&[shallow, deep, scores], value, move |g| {
        let g3 = g.reshape((n, 1, m))?;
        // Through the weights' use: G = wᵀS + D.
        let dw = s.matmul(&g3.t()?.contiguous()?)?;
        let mut ds = w.matmul(&g3)?;
        // Through the L1 normalisation w = r / (Σr + ε).
        let dot = (&w * &dw)?.sum_keepdim(1)?;
        let draw = dw.broadcast_sub(&dot)?.broadcast_div(&total)?;
        let positive = |x: &Tensor| x.gt(0.0)?.to_dtype(x.dtype());
        let da = ((&draw * positive(&a)?)? / &redundancy)?;
        // Through r = relu(a) / R and R_j = Σ_l relu(cos_jl).
        let dred = ((&draw * &raw)?.neg()? / &redundancy)?;
        let (unit, norm) = unit_rows(&s)?;
        let cosine = unit.matmul(&unit.t()?.contiguous()?)?;
        let dcos = positive(&cosine)?.broadcast_mul(&dred)?;
        let dunit = (&dcos + dcos.t()?.contiguous()?)?.matmul(&unit)?;
        // Through unit = S / (‖S‖ + ε).
        let len = (&norm - NORM_EPS)?.clamp(1e-30, f64::MAX)?;
        let along = (&s * &dunit)?
            .sum_keepdim(D::Minus1)?
            .div(&(len * norm.sqr()?)?)?;
        ds = ((ds + dunit.broadcast_div(&norm)?)? - s.broadcast_mul(&along)?)?;
        Ok(vec![
            Some(ds.reshape((b, t, k, m))?),
            Some(g.clone()),
            Some(da.reshape((b, t, k, 1))?),
        ])
    })
}

/// Rows of `x` `(N, K, m)` divided by their L2 norm plus ε, and that norm plus ε `(N, K, 1)`.
fn unit_rows(x: &Tensor) -> candle_core::Result<(Tensor, Tensor)> {
    let norm = (x.sqr()?.sum_keepdim(D::Minus1)?.sqrt()? + NORM_EPS)?;
    Ok((x.broadcast_div(&norm)?, norm))
}

/// PyTorch's default `nn.Linear` init (weight and bias `U(±1/√in)`), as the SHERL code uses.
fn random_linear(rng: &mut Rng, out: usize, inp: usize, on: &dyn Backbone) -> Result<Linear> {
    let w = rng.linear_weight(out, inp, on.dtype(), on.device())?;
    let b = rng.uniform_tensor(out, 1.0 / (inp as f64).sqrt(), on.dtype(), on.device())?;
    Ok(Linear::new(w, Some(b)))
}

/// Makes a linear's weight and bias trainable as `{prefix}.weight` and `{prefix}.bias`.
fn train_linear(l: &mut Linear, prefix: &str, params: &mut Vec<(String, Var)>) -> Result<()> {
    params.push((format!("{prefix}.weight"), make_trainable(&mut l.weight)?));
    if let Some(b) = l.bias.as_mut() {
        params.push((format!("{prefix}.bias"), make_trainable(b)?));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Tensor, Var};

    use super::*;

    /// The aggregation's backward against central differences on every input entry, with
    /// features of both signs (so the cosine map has entries relu cuts) and scores mostly above
    /// zero (so the redundancy term carries weight). The method-level checks see it only through
    /// the adapters, where its share of the gradient is small.
    #[test]
    fn aggregation_backward_matches_finite_differences() {
        let mut rng = Rng::new(4);
        let mut rand = |shape: &[usize], shift: f64| {
            let t = rng
                .uniform_tensor(shape, 1.0, DType::F64, &Device::Cpu)
                .unwrap();
            Var::from_tensor(&(t + shift).unwrap()).unwrap()
        };
        let (s, d, a) = (
            rand(&[2, 3, 4, 5], 0.0),
            rand(&[2, 3, 5], 0.0),
            rand(&[2, 3, 4, 1], 0.6),
        );
        let r = rand(&[2, 3, 5], 0.0).as_tensor().detach();
        let loss = || {
            let g = aggregate(s.as_tensor(), d.as_tensor(), a.as_tensor()).unwrap();
            (g * &r).unwrap().sum_all().unwrap()
        };
        let grads = loss().backward().unwrap();
        for (name, v) in [("shallow", &s), ("deep", &d), ("scores", &a)] {
            let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f64>().unwrap();
            let g = flat(grads.get(v.as_tensor()).unwrap());
            let base = flat(v.as_tensor());
            let at = |i: usize, delta: f64| {
                let mut x = base.clone();
                x[i] += delta;
                v.set(&Tensor::from_vec(x, v.shape(), &Device::Cpu).unwrap())
                    .unwrap();
                tape::no_grad(loss).to_scalar::<f64>().unwrap()
            };
            for (i, analytic) in g.iter().enumerate() {
                let numeric = (at(i, 1e-6) - at(i, -1e-6)) / 2e-6;
                let err = (numeric - analytic).abs() / (numeric.abs() + analytic.abs()).max(1e-3);
                assert!(
                    err < 1e-6,
                    "{name}[{i}]: analytic {analytic} numeric {numeric}"
                );
            }
            v.set(&Tensor::from_vec(base, v.shape(), &Device::Cpu).unwrap())
                .unwrap();
        }
    }
}
