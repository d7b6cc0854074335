//! Reversed recurrent tuning (R²-Tuning, Liu et al., ECCV 2024): one small R² block, shared by the
//! frozen backbone's last k layers, runs from the last layer back to the earlier ones and refines
//! one state per layer; the head reads the state after layer 0. Backward runs through the block
//! only.
//!
//! Per tapped layer, i = k−1 … 0 (the official code's `models/adapter.py::R2Block`), with `V_i`
//! the layer's tokens and `Q_i` its learnable query tokens (classification has no text query):
//! ```text
//! v = video_map(V_i)    q = query_map(Q_i)        LN, dropout, Linear(·, D), ReLU, LN, dropout, Linear(D, D)
//! o = max_queries(softmax_tokens(q_map(q)·v_map(v)ᵀ / √D) · v + q)
//! s = pool(v) + tanh(scale_i) · o                 scale_i starts at 0
//! s = σ(gate_i) · s + (1 − σ(gate_i)) · last      for i < k−1; gate_i starts at 0
//! last = decoder(s, q)                            post-norm: cross-attention to q, self-attention, FFN
//! ```
//! `pool` is the backbone's own pooling where the paper reads the frame's [CLS] token. The state is
//! one position (a sentence or an image is one "frame"), so the decoder's self-attention is its
//! value and output projections, and the positional encoding the paper adds to the queries is a
//! constant the cross-attention's query bias absorbs: neither is built. The backbone runs once
//! without a graph; a step keeps the k tapped states the token map reads and width-D tensors.

use candle_core::{DType, Device, Tensor, Var};
use petl_crds::R2Config;

use super::{Method, head::Head, make_trainable};
use crate::export::HeadFeatures;
use crate::init::Rng;
use crate::models::{Backbone, Pooling};
use crate::nn::{self, Dropout, LayerNorm, Linear, StepSeed};
use crate::tape;
use crate::{Error, Result};

/// Attention heads of the decoder layer (the official config's 8), fewer when `dims` needs it.
const DECODER_HEADS: usize = 8;
/// Width of the decoder's FFN over `dims` (the official config's ratio 4).
const FFN_RATIO: usize = 4;

/// Where new tensors live and the ε of their LayerNorms.
struct On {
    dtype: DType,
    device: Device,
    eps: f64,
}

impl On {
    /// PyTorch's default `nn.Linear` (weight and bias `U(±1/√in)`).
    fn linear(&self, rng: &mut Rng, out: usize, inp: usize) -> Result<Linear> {
        let w = rng.linear_weight(out, inp, self.dtype, &self.device)?;
        let b = rng.uniform_tensor(out, 1.0 / (inp as f64).sqrt(), self.dtype, &self.device)?;
        Ok(Linear::new(w, Some(b)))
    }

    /// Xavier-uniform weight and zero bias, as the official config initialises attention.
    fn xavier(&self, rng: &mut Rng, out: usize, inp: usize) -> Result<Linear> {
        let bound = (6.0 / (inp + out) as f64).sqrt();
        let w = rng.uniform_tensor((out, inp), bound, self.dtype, &self.device)?;
        Ok(Linear::new(
            w,
            Some(Tensor::zeros(out, self.dtype, &self.device)?),
        ))
    }

    fn norm(&self, width: usize) -> Result<LayerNorm> {
        Ok(LayerNorm {
            weight: Tensor::ones(width, self.dtype, &self.device)?,
            bias: Tensor::zeros(width, self.dtype, &self.device)?,
            eps: self.eps,
        })
    }
}

/// The trainable tensors, collected under their names as the block makes them trainable.
struct Trainables(Vec<(String, Var)>);

impl Trainables {
    fn tensor(&mut self, name: String, t: &mut Tensor) -> Result<()> {
        self.0.push((name, make_trainable(t)?));
        Ok(())
    }

    fn linear(&mut self, name: &str, l: &mut Linear) -> Result<()> {
        self.0
            .push((format!("{name}.weight"), make_trainable(&mut l.weight)?));
        if let Some(b) = l.bias.as_mut() {
            self.0.push((format!("{name}.bias"), make_trainable(b)?));
        }
        Ok(())
    }

    fn norm(&mut self, name: &str, n: &mut LayerNorm) -> Result<()> {
        self.0
            .push((format!("{name}.weight"), make_trainable(&mut n.weight)?));
        self.0
            .push((format!("{name}.bias"), make_trainable(&mut n.bias)?));
        Ok(())
    }
}

/// `video_map` and `query_map`: LN, dropout, Linear(in, D), ReLU, LN, dropout, Linear(D, D).
struct Map {
    norm_in: LayerNorm,
    linear_in: Linear,
    norm_mid: LayerNorm,
    linear_out: Linear,
}

impl Map {
    fn new(rng: &mut Rng, inp: usize, dims: usize, on: &On) -> Result<Self> {
        Ok(Self {
            norm_in: on.norm(inp)?,
            linear_in: on.linear(rng, dims, inp)?,
            norm_mid: on.norm(dims)?,
            linear_out: on.linear(rng, dims, dims)?,
        })
    }

    /// `drops`: this layer's two dropouts (each layer draws its own masks).
    fn forward(&self, x: &Tensor, drops: &[Dropout]) -> Result<Tensor> {
        let h = drops[0].forward(&self.norm_in.forward(x)?)?;
        let h = relu(&self.linear_in.forward(&h)?)?;
        let h = drops[1].forward(&self.norm_mid.forward(&h)?)?;
        self.linear_out.forward(&h)
    }

    /// Named as the official code's `nn.Sequential` (0 LN, 2 Linear, 4 LN, 6 Linear).
    fn train(&mut self, prefix: &str, t: &mut Trainables) -> Result<()> {
        t.norm(&format!("{prefix}.0"), &mut self.norm_in)?;
        t.linear(&format!("{prefix}.2"), &mut self.linear_in)?;
        t.norm(&format!("{prefix}.4"), &mut self.norm_mid)?;
        t.linear(&format!("{prefix}.6"), &mut self.linear_out)
    }
}

/// The temporal decoder layer over the one-position state (post-norm, order cross-attention,
/// self-attention, FFN; ReLU; no drop-path).
struct Decoder {
    cross: [Linear; 4],
    self_value: Linear,
    self_out: Linear,
    norms: [LayerNorm; 3],
    ffn_in: Linear,
    ffn_out: Linear,
    heads: usize,
}

impl Decoder {
    fn new(rng: &mut Rng, dims: usize, on: &On) -> Result<Self> {
        let heads = (1..=DECODER_HEADS.min(dims))
            .rev()
            .find(|h| dims.is_multiple_of(*h))
            .unwrap_or(1);
        Ok(Self {
            cross: [
                on.xavier(rng, dims, dims)?,
                on.xavier(rng, dims, dims)?,
                on.xavier(rng, dims, dims)?,
                on.xavier(rng, dims, dims)?,
            ],
            self_value: on.xavier(rng, dims, dims)?,
            self_out: on.xavier(rng, dims, dims)?,
            norms: [on.norm(dims)?, on.norm(dims)?, on.norm(dims)?],
            ffn_in: on.linear(rng, FFN_RATIO * dims, dims)?,
            ffn_out: on.linear(rng, dims, FFN_RATIO * dims)?,
            heads,
        })
    }

    /// `x` `(B, 1, D)` the refined state, `memory` `(B, q, D)` the mapped queries.
    fn forward(&self, x: &Tensor, memory: &Tensor, memory_bias: &Tensor) -> Result<Tensor> {
        let [q, k, v, m] = &self.cross;
        let att = nn::attention(
            &q.forward(x)?,
            &k.forward(memory)?,
            &v.forward(memory)?,
            memory_bias,
            self.heads,
        )?;
        let x = self.norms[0].forward(&sum(x, &m.forward(&att)?)?)?;
        // Attention over one position: its weight is 1, so only the value path remains.
        let own = self.self_out.forward(&self.self_value.forward(&x)?)?;
        let x = self.norms[1].forward(&sum(&x, &own)?)?;
        let ffn = self.ffn_out.forward(&relu(&self.ffn_in.forward(&x)?)?)?;
        self.norms[2].forward(&sum(&x, &ffn)?)
    }

    fn train(&mut self, prefix: &str, t: &mut Trainables) -> Result<()> {
        for (name, l) in ["q", "k", "v", "m"].iter().zip(self.cross.iter_mut()) {
            t.linear(&format!("{prefix}.cross_att.{name}"), l)?;
        }
        t.linear(&format!("{prefix}.self_att.v"), &mut self.self_value)?;
        t.linear(&format!("{prefix}.self_att.m"), &mut self.self_out)?;
        for (i, n) in self.norms.iter_mut().enumerate() {
            t.norm(&format!("{prefix}.norm{}", i + 1), n)?;
        }
        t.linear(&format!("{prefix}.ffn.mapping.0"), &mut self.ffn_in)?;
        t.linear(&format!("{prefix}.ffn.mapping.2"), &mut self.ffn_out)
    }
}

pub struct R2 {
    backbone: Box<dyn Backbone>,
    /// Tapped layers, oldest first: the outputs of the backbone's last `k` blocks.
    taps: Vec<usize>,
    video_map: Map,
    query_map: Map,
    v_map: Linear,
    q_map: Linear,
    decoder: Decoder,
    /// Per tapped layer: its query tokens `(q, d)`, `scale_i` and (all but the last) `gate_i`,
    /// each `(1,)`, and the four dropouts of its two maps.
    queries: Vec<Var>,
    scales: Vec<Tensor>,
    gates: Vec<Tensor>,
    dropouts: Vec<Vec<Dropout>>,
    pooling: Pooling,
    head: Head,
    params: Vec<(String, Var)>,
}

impl R2 {
    pub fn new(
        config: &R2Config,
        backbone: Box<dyn Backbone>,
        num_labels: usize,
        seed: u64,
    ) -> Result<Self> {
        let at_least_one = |value: i32, field: &str, example: &str| {
            usize::try_from(value)
                .ok()
                .filter(|v| *v >= 1)
                .ok_or_else(|| Error::Config {
                    field: format!("spec.method.r2.{field}"),
                    message: format!("{value} must be at least 1 (e.g. {example})"),
                })
        };
        let layers = at_least_one(config.layers, "layers", "4")?;
        let dims = at_least_one(config.dims, "dims", "128")?;
        let queries = at_least_one(config.queries, "queries", "4")?;
        if !(0.0..=0.9).contains(&config.dropout) {
            return Err(Error::Config {
                field: "spec.method.r2.dropout".into(),
                message: format!("{} must lie in [0, 0.9] (e.g. 0.1)", config.dropout),
            });
        }
        let n = backbone.num_layers();
        if n == 0 {
            return Err(Error::Config {
                field: "spec.model".into(),
                message: "R²-Tuning reads the backbone's last layers; this backbone has none"
                    .into(),
            });
        }
        let k = layers.min(n);
        let on = On {
            dtype: backbone.dtype(),
            device: backbone.device().clone(),
            eps: backbone.norm_eps(),
        };
        let d = backbone.hidden_size();
        let mut rng = Rng::new(seed);
        let mut video_map = Map::new(&mut rng, d, dims, &on)?;
        let mut query_map = Map::new(&mut rng, d, dims, &on)?;
        let mut v_map = on.linear(&mut rng, dims, dims)?;
        let mut q_map = on.linear(&mut rng, dims, dims)?;
        let mut decoder = Decoder::new(&mut rng, dims, &on)?;
        // VQT's bound for query tokens (VPT's √(3/d) at ViT-B/16), written for any width.
        let bound = (3.0 / d as f64).sqrt();
        let query_tokens = (0..k)
            .map(|_| {
                Ok(Var::from_tensor(&rng.uniform_tensor(
                    (queries, d),
                    bound,
                    on.dtype,
                    &on.device,
                )?)?)
            })
            .collect::<Result<Vec<_>>>()?;
        let zero = || Tensor::zeros(1, on.dtype, &on.device);
        let mut scales = (0..k)
            .map(|_| zero())
            .collect::<candle_core::Result<Vec<_>>>()?;
        let mut gates = (1..k)
            .map(|_| zero())
            .collect::<candle_core::Result<Vec<_>>>()?;
        let dropouts = (0..k)
            .map(|i| {
                (0..4)
                    .map(|j| {
                        Dropout::new(config.dropout, seed.wrapping_add((4 * i + j + 1) as u64))
                    })
                    .collect()
            })
            .collect();

        let mut t = Trainables(Vec::new());
        video_map.train("r2.video_map", &mut t)?;
        query_map.train("r2.query_map", &mut t)?;
        t.linear("r2.v_map", &mut v_map)?;
        t.linear("r2.q_map", &mut q_map)?;
        decoder.train("r2.tem", &mut t)?;
        for (i, s) in scales.iter_mut().enumerate() {
            t.tensor(format!("r2.scale.{i}"), s)?;
        }
        for (i, g) in gates.iter_mut().enumerate() {
            t.tensor(format!("r2.gate.{i}"), g)?;
        }
        for (i, q) in query_tokens.iter().enumerate() {
            t.0.push((format!("r2.query_tokens.{i}"), q.clone()));
        }
        let pooling = backbone.pooling();
        let head = Head::new(dims, num_labels, pooling, on.dtype, &on.device, &mut rng)?;
        Ok(Self {
            taps: (n + 1 - k..=n).collect(),
            backbone,
            video_map,
            query_map,
            v_map,
            q_map,
            decoder,
            queries: query_tokens,
            scales,
            gates,
            dropouts,
            pooling,
            head,
            params: t.0,
        })
    }
}

impl Method for R2 {
    fn name(&self) -> &'static str {
        "r2"
    }

    fn head_features(&self) -> HeadFeatures {
        HeadFeatures::Method(
            "the R² block's state after its recurrence from the last tapped layer to the first",
        )
    }

    fn parameters(&self) -> Vec<(String, Var)> {
        let mut p = self.params.clone();
        p.extend(self.head.parameters());
        p
    }

    fn forward(&self, input: &Tensor, attention_mask: &Tensor) -> Result<Tensor> {
        let mut all = self.backbone.taps(input, attention_mask)?;
        let mut taps: Vec<Tensor> = self.taps.iter().map(|&i| all[i].clone()).collect();
        all.clear();
        let mask = self.backbone.token_mask(input, attention_mask)?;
        let token_bias = nn::attention_bias(&mask, self.backbone.dtype())?;
        let b = mask.dim(0)?;
        let mut last: Option<Tensor> = None;
        // The recurrence runs from the last tapped layer back to the first.
        for i in (0..taps.len()).rev() {
            let tokens = taps
                .pop()
                .ok_or_else(|| Error::Internal("R² ran out of taps".into()))?;
            let drops = &self.dropouts[i];
            let v = self.video_map.forward(&tokens, &drops[..2])?;
            drop(tokens);
            let (nq, d) = self.queries[i].dims2()?;
            let q_tokens = self.queries[i]
                .as_tensor()
                .unsqueeze(0)?
                .broadcast_as((b, nq, d))?;
            let q = self.query_map.forward(&q_tokens, &drops[2..])?;
            // Query-modulated pooling of the tokens: one softmax head of width D (scale 1/√D).
            let pooled = nn::attention(
                &self.q_map.forward(&q)?,
                &self.v_map.forward(&v)?,
                &v,
                &token_bias,
                1,
            )?;
            let o = max_over_queries(&sum(&pooled, &q)?)?;
            let own = self.pooling.apply(&v, &mask)?.unsqueeze(1)?;
            let mut s = refine(&own, &o, &self.scales[i])?;
            if let Some(prev) = &last {
                s = gated_mix(&s, prev, &self.gates[i])?;
            }
            let memory_bias = Tensor::zeros((b, 1, 1, nq), q.dtype(), q.device())?;
            last = Some(self.decoder.forward(&s, &q, &memory_bias)?);
        }
        let last = last.ok_or_else(|| Error::Internal("R² tapped no layer".into()))?;
        self.head.logits(&last.squeeze(1)?)
    }

    fn set_training(&self, training: bool) {
        for d in self.dropouts.iter().flatten() {
            d.set_active(training);
        }
    }

    fn begin_step(&self, step: StepSeed) {
        for d in self.dropouts.iter().flatten() {
            d.begin_step(step);
        }
    }
}

/// The value of a `(1,)` scalar parameter.
fn scalar(t: &Tensor) -> Result<f64> {
    Ok(t.detach()
        .to_dtype(DType::F64)?
        .flatten_all()?
        .to_vec1::<f64>()?[0])
}

/// `own + tanh(scale) · o` (all `(B, 1, D)` but `scale` `(1,)`), as one node (parents own, o,
/// scale); it saves `o` for the scale's gradient.
fn refine(own: &Tensor, o: &Tensor, scale: &Tensor) -> Result<Tensor> {
    let t = scalar(scale)?.tanh();
    let od = o.detach();
    let value = (own.detach() + (&od * t)?)?;
    let need_scale = tape::trainable(scale);
    tape::attach(&[own, o, scale], value, move |g| {
        let dscale = if need_scale {
            Some(((g * &od)?.sum_all()? * (1.0 - t * t))?.reshape(1)?)
        } else {
            None
        };
        Ok(vec![Some(g.clone()), Some((g * t)?), dscale])
    })
}

/// `σ(gate)·s + (1 − σ(gate))·last`, as one node (parents s, last, gate).
fn gated_mix(s: &Tensor, last: &Tensor, gate: &Tensor) -> Result<Tensor> {
    let mu = 1.0 / (1.0 + (-scalar(gate)?).exp());
    let (sd, ld) = (s.detach(), last.detach());
    let value = ((&sd * mu)? + (&ld * (1.0 - mu))?)?;
    let need_gate = tape::trainable(gate);
    tape::attach(&[s, last, gate], value, move |g| {
        let dgate = if need_gate {
            Some(((g * (&sd - &ld)?)?.sum_all()? * (mu * (1.0 - mu)))?.reshape(1)?)
        } else {
            None
        };
        Ok(vec![Some((g * mu)?), Some((g * (1.0 - mu))?), dgate])
    })
}

/// The maximum over the queries, `(B, q, D)` → `(B, 1, D)`, as one node that routes the gradient
/// to the first maximal query (it saves which one, as bytes).
fn max_over_queries(x: &Tensor) -> Result<Tensor> {
    let xd = x.detach();
    let q = xd.dim(1)?;
    let value = xd.max_keepdim(1)?;
    let first = xd.argmax_keepdim(1)?;
    let picked = Tensor::arange(0u32, q as u32, xd.device())?
        .reshape((1, q, 1))?
        .broadcast_eq(&first)?;
    drop(xd);
    tape::attach(&[x], value, move |g| {
        Ok(vec![Some(g.broadcast_mul(&picked.to_dtype(g.dtype())?)?)])
    })
}

/// `a + b` as one node that saves nothing.
fn sum(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let value = (a.detach() + b.detach())?;
    tape::attach(&[a, b], value, |g| {
        Ok(vec![Some(g.clone()), Some(g.clone())])
    })
}

/// `max(x, 0)` as one node that saves which entries passed (as bytes).
fn relu(x: &Tensor) -> Result<Tensor> {
    let y = x.detach().relu()?;
    if !tape::tracks(x) {
        return Ok(y);
    }
    let passed = y.gt(0.0)?;
    tape::attach(&[x], y, move |g| {
        Ok(vec![Some((g * passed.to_dtype(g.dtype())?)?)])
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_maximum_routes_its_gradient_to_the_first_largest_query() {
        let x = Var::from_tensor(
            &Tensor::from_vec(vec![1f64, 5., 3., 5., 2., 0.], (1, 3, 2), &Device::Cpu).unwrap(),
        )
        .unwrap();
        let y = max_over_queries(x.as_tensor()).unwrap();
        assert_eq!(y.flatten_all().unwrap().to_vec1::<f64>().unwrap(), [3., 5.]);
        let g = y.sum_all().unwrap().backward().unwrap();
        let dx = g.get(x.as_tensor()).unwrap().flatten_all().unwrap();
        assert_eq!(dx.to_vec1::<f64>().unwrap(), [0., 1., 1., 0., 0., 0.]);
    }
}
