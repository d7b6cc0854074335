//! The R² block of R²-Tuning (Liu et al., ECCV 2024; the official code's
//! `models/adapter.py::R2Block`), shared by the classifier ([`super::r2`]) and the video-grounding
//! model (`crate::grounding::model`): the token and query maps, the query-modulated pooling, the
//! per-layer scale and gate, and the temporal decoder layer, with the tape nodes they need.
//!
//! Per tapped layer, i = k−1 … 0, with `V_i` the layer's tokens and `Q_i` its query tokens:
//! ```text
//! v = video_map(V_i)    q = query_map(Q_i)        LN, dropout, Linear(·, D), ReLU, LN, dropout, Linear(D, D)
//! o = max_queries(softmax_tokens(q_map(q)·v_map(v)ᵀ / √D) · v + q)
//! s = own(v) + tanh(scale_i) · o                  scale_i starts at 0
//! s = σ(gate_i) · s + (1 − σ(gate_i)) · last      for i < k−1; gate_i starts at 0
//! last = decoder(s, q)                            post-norm: cross-attention to q, self-attention, FFN
//! ```
//! The caller picks `own` (a frame's [CLS] token, or a sentence's pooled tokens) and how many
//! positions the state has: with one position the decoder's self-attention is its value and
//! output projections (its weight is 1) and no positional encoding is added; with several
//! ([`Block::new`]'s `positions`) it is full multi-head self-attention across positions and the
//! sine positional encoding is added to the queries and keys, as nncore's
//! `TransformerDecoderLayer` adds `q_pe`.

use candle_core::{DType, Device, Tensor, Var};

use super::make_trainable;
use crate::init::Rng;
use crate::nn::{self, Dropout, LayerNorm, Linear, StepSeed};
use crate::tape;
use crate::{Error, Result};

/// Attention heads of the decoder layer (the official config's 8), fewer when `dims` needs it.
const DECODER_HEADS: usize = 8;
/// Width of the decoder's FFN over `dims` (the official config's ratio 4).
const FFN_RATIO: usize = 4;

/// Where new tensors live and the ε of their LayerNorms.
pub(crate) struct On {
    pub dtype: DType,
    pub device: Device,
    pub eps: f64,
}

impl On {
    /// PyTorch's default `nn.Linear` (weight and bias `U(±1/√in)`).
    pub fn linear(&self, rng: &mut Rng, out: usize, inp: usize) -> Result<Linear> {
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
pub(crate) struct Trainables(pub Vec<(String, Var)>);

impl Trainables {
    pub fn tensor(&mut self, name: String, t: &mut Tensor) -> Result<()> {
        self.0.push((name, make_trainable(t)?));
        Ok(())
    }

    pub fn linear(&mut self, name: &str, l: &mut Linear) -> Result<()> {
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

/// The temporal decoder layer (post-norm, order cross-attention, self-attention, FFN; ReLU; no
/// drop-path). `self_qk`: the self-attention's query and key projections, absent when the state
/// has one position.
struct Decoder {
    cross: [Linear; 4],
    self_qk: Option<[Linear; 2]>,
    self_value: Linear,
    self_out: Linear,
    norms: [LayerNorm; 3],
    ffn_in: Linear,
    ffn_out: Linear,
    heads: usize,
}

impl Decoder {
    fn new(rng: &mut Rng, dims: usize, positions: bool, on: &On) -> Result<Self> {
        let heads = (1..=DECODER_HEADS.min(dims))
            .rev()
            .find(|h| dims.is_multiple_of(*h))
            .unwrap_or(1);
        let cross = [
            on.xavier(rng, dims, dims)?,
            on.xavier(rng, dims, dims)?,
            on.xavier(rng, dims, dims)?,
            on.xavier(rng, dims, dims)?,
        ];
        let self_qk = if positions {
            Some([on.xavier(rng, dims, dims)?, on.xavier(rng, dims, dims)?])
        } else {
            None
        };
        Ok(Self {
            cross,
            self_qk,
            self_value: on.xavier(rng, dims, dims)?,
            self_out: on.xavier(rng, dims, dims)?,
            norms: [on.norm(dims)?, on.norm(dims)?, on.norm(dims)?],
            ffn_in: on.linear(rng, FFN_RATIO * dims, dims)?,
            ffn_out: on.linear(rng, dims, FFN_RATIO * dims)?,
            heads,
        })
    }

    /// `x` `(B, T, D)` the refined state, `memory` `(B, q, D)` the mapped queries, `pe` `(1, T, D)`
    /// the positional encoding (with `self_qk` only).
    fn forward(
        &self,
        x: &Tensor,
        memory: &Tensor,
        memory_bias: &Tensor,
        pe: Option<&Tensor>,
    ) -> Result<Tensor> {
        let with_pe = |x: &Tensor| match pe {
            Some(pe) => add_constant(x, pe),
            None => Ok(x.clone()),
        };
        let [q, k, v, m] = &self.cross;
        let att = nn::attention(
            &q.forward(&with_pe(x)?)?,
            &k.forward(memory)?,
            &v.forward(memory)?,
            memory_bias,
            self.heads,
        )?;
        let x = self.norms[0].forward(&nn::residual(x, &m.forward(&att)?)?)?;
        let own = match &self.self_qk {
            Some([sq, sk]) => {
                let (b, t, _) = x.dims3()?;
                let keyed = with_pe(&x)?;
                let bias = Tensor::zeros((b, 1, 1, t), x.dtype(), x.device())?;
                let att = nn::attention(
                    &sq.forward(&keyed)?,
                    &sk.forward(&keyed)?,
                    &self.self_value.forward(&x)?,
                    &bias,
                    self.heads,
                )?;
                self.self_out.forward(&att)?
            }
            // Attention over one position: its weight is 1, so only the value path remains.
            None => self.self_out.forward(&self.self_value.forward(&x)?)?,
        };
        let x = self.norms[1].forward(&nn::residual(&x, &own)?)?;
        let ffn = self.ffn_out.forward(&relu(&self.ffn_in.forward(&x)?)?)?;
        self.norms[2].forward(&nn::residual(&x, &ffn)?)
    }

    fn train(&mut self, prefix: &str, t: &mut Trainables) -> Result<()> {
        for (name, l) in ["q", "k", "v", "m"].iter().zip(self.cross.iter_mut()) {
            t.linear(&format!("{prefix}.cross_att.{name}"), l)?;
        }
        if let Some([sq, sk]) = self.self_qk.as_mut() {
            t.linear(&format!("{prefix}.self_att.q"), sq)?;
            t.linear(&format!("{prefix}.self_att.k"), sk)?;
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

/// The block's shape.
pub(crate) struct BlockShape {
    /// Widths of the tokens the video map and the query map read.
    pub video_in: usize,
    pub query_in: usize,
    /// `D`.
    pub dims: usize,
    /// Tapped layers `k`.
    pub layers: usize,
    pub dropout: f64,
    /// Whether the state has several positions (frames): full self-attention in the decoder.
    pub positions: bool,
}

/// One R² block shared by all tapped layers, plus each layer's scale, gate and dropouts.
pub(crate) struct Block {
    video_map: Map,
    query_map: Map,
    v_map: Linear,
    q_map: Linear,
    decoder: Decoder,
    scales: Vec<Tensor>,
    gates: Vec<Tensor>,
    dropouts: Vec<Vec<Dropout>>,
}

impl Block {
    /// Draws the weights from `rng` (maps, pooling projections, decoder, in that order) and
    /// makes every tensor trainable under the official code's names (`r2.video_map.0.weight`, …,
    /// `r2.tem.*`, `r2.scale.i`, `r2.gate.i`), pushed onto `t`.
    pub fn new(
        shape: &BlockShape,
        rng: &mut Rng,
        on: &On,
        seed: u64,
        t: &mut Trainables,
    ) -> Result<Self> {
        let (dims, k) = (shape.dims, shape.layers);
        let mut video_map = Map::new(rng, shape.video_in, dims, on)?;
        let mut query_map = Map::new(rng, shape.query_in, dims, on)?;
        let mut v_map = on.linear(rng, dims, dims)?;
        let mut q_map = on.linear(rng, dims, dims)?;
        let mut decoder = Decoder::new(rng, dims, shape.positions, on)?;
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
                    .map(|j| Dropout::new(shape.dropout, seed.wrapping_add((4 * i + j + 1) as u64)))
                    .collect()
            })
            .collect();
        video_map.train("r2.video_map", t)?;
        query_map.train("r2.query_map", t)?;
        t.linear("r2.v_map", &mut v_map)?;
        t.linear("r2.q_map", &mut q_map)?;
        decoder.train("r2.tem", t)?;
        for (i, s) in scales.iter_mut().enumerate() {
            t.tensor(format!("r2.scale.{i}"), s)?;
        }
        for (i, g) in gates.iter_mut().enumerate() {
            t.tensor(format!("r2.gate.{i}"), g)?;
        }
        Ok(Self {
            video_map,
            query_map,
            v_map,
            q_map,
            decoder,
            scales,
            gates,
            dropouts,
        })
    }

    /// Layer `i`'s token map of `tokens` and query map of `queries` (with layer `i`'s dropouts).
    pub fn maps(&self, i: usize, tokens: &Tensor, queries: &Tensor) -> Result<(Tensor, Tensor)> {
        let drops = &self.dropouts[i];
        Ok((
            self.video_map.forward(tokens, &drops[..2])?,
            self.query_map.forward(queries, &drops[2..])?,
        ))
    }

    /// The query-modulated pooling of mapped tokens `v` `(N, P, D)` by mapped queries `q`
    /// `(N, q, D)`: one softmax head of width D over the tokens (`token_bias` over them), plus the
    /// queries, then the maximum over the queries: `(N, 1, D)`.
    pub fn pool(&self, q: &Tensor, v: &Tensor, token_bias: &Tensor) -> Result<Tensor> {
        let pooled = nn::attention(
            &self.q_map.forward(q)?,
            &self.v_map.forward(v)?,
            v,
            token_bias,
            1,
        )?;
        max_over_queries(&nn::residual(&pooled, q)?)
    }

    /// Layer `i`'s refined state: `own + tanh(scale_i)·o`, then mixed with the later layer's
    /// state `last` through `gate_i` (all `(B, T, D)`).
    pub fn merge(
        &self,
        i: usize,
        own: &Tensor,
        o: &Tensor,
        last: Option<&Tensor>,
    ) -> Result<Tensor> {
        let s = refine(own, o, &self.scales[i])?;
        match last {
            Some(prev) => gated_mix(&s, prev, &self.gates[i]),
            None => Ok(s),
        }
    }

    /// The decoder layer on the state `s` `(B, T, D)` reading the mapped queries `q` `(B, q, D)`.
    pub fn decode(
        &self,
        s: &Tensor,
        q: &Tensor,
        memory_bias: &Tensor,
        pe: Option<&Tensor>,
    ) -> Result<Tensor> {
        self.decoder.forward(s, q, memory_bias, pe)
    }

    pub fn set_training(&self, training: bool) {
        for d in self.dropouts.iter().flatten() {
            d.set_active(training);
        }
    }

    pub fn begin_step(&self, step: StepSeed) {
        for d in self.dropouts.iter().flatten() {
            d.begin_step(step);
        }
    }
}

/// The sine positional encoding of `t` positions, `(1, t, dims)`: positions `1..=t` normalised
/// to `(0, 2π]`, then `sin` on even and `cos` on odd channels at DETR's frequencies
/// (temperature 10 000), as nncore's `PositionalEncoding(normalize=True)`.
pub(crate) fn positional_encoding(
    t: usize,
    dims: usize,
    dtype: DType,
    device: &Device,
) -> Result<Tensor> {
    let mut values = Vec::with_capacity(t * dims);
    for p in 0..t {
        let pos = (p + 1) as f64 / t as f64 * std::f64::consts::TAU;
        for c in 0..dims {
            let freq = 10_000f64.powf((2 * (c / 2)) as f64 / dims as f64);
            let x = pos / freq;
            values.push(if c % 2 == 0 { x.sin() } else { x.cos() });
        }
    }
    Ok(Tensor::from_vec(values, (1, t, dims), device)?.to_dtype(dtype)?)
}

/// The value of a `(1,)` scalar parameter.
fn scalar(t: &Tensor) -> Result<f64> {
    Ok(t.detach()
        .to_dtype(DType::F64)?
        .flatten_all()?
        .to_vec1::<f64>()?[0])
}

/// `own + tanh(scale) · o` (`own` and `o` of one shape, `scale` `(1,)`), as one node (parents own,
/// o, scale); it saves `o` for the scale's gradient.
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
pub(crate) fn max_over_queries(x: &Tensor) -> Result<Tensor> {
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

/// `x + c` for a constant `c` broadcast to `x`'s shape, as one node over `x` alone.
fn add_constant(x: &Tensor, c: &Tensor) -> Result<Tensor> {
    let value = x.detach().broadcast_add(c)?;
    tape::attach(&[x], value, |g| Ok(vec![Some(g.clone())]))
}

/// `max(x, 0)` as one node that saves which entries passed (as bytes).
pub(crate) fn relu(x: &Tensor) -> Result<Tensor> {
    let y = x.detach().relu()?;
    if !tape::tracks(x) {
        return Ok(y);
    }
    let passed = y.gt(0.0)?;
    tape::attach(&[x], y, move |g| {
        Ok(vec![Some((g * passed.to_dtype(g.dtype())?)?)])
    })
}

/// The check every R² constructor makes of a count setting: at least 1.
pub(crate) fn at_least_one(value: i32, field: &str, example: &str) -> Result<usize> {
    usize::try_from(value)
        .ok()
        .filter(|v| *v >= 1)
        .ok_or_else(|| Error::Config {
            field: field.to_string(),
            message: format!("{value} must be at least 1 (e.g. {example})"),
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
