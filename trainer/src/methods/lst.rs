//! Ladder side tuning (LST): a narrow side network (width d/r) reads the frozen backbone's hidden
//! states through gated ladders; backward runs through the side network only.
//!
//! Per kept backbone layer i: `s = μ·s + (1-μ)·Down_i(h_i)`, `μ = σ(α_i / T)`, then side block i.
//! The backbone runs without a graph, so its weights never get gradients and its internals are
//! never saved; the ladders read detached taps and return no input gradients.

use candle_core::{DType, Device, IndexOp, Tensor, Var};
use petl_crds::LstConfig;

use super::{Method, head::Head, make_trainable};
use crate::export::HeadFeatures;
use crate::init::Rng;
use crate::models::Backbone;
use crate::models::bert::Layer;
use crate::nn::{self, LayerNorm, Linear};
use crate::tape;
use crate::{Error, Result};

/// Gate temperature from the LST code (`gate_T = 0.1`).
const GATE_TEMPERATURE: f64 = 0.1;

/// One rung: the ladder from backbone layer `source`, its gate, and the side block after it.
struct Rung {
    source: usize,
    ladder: Linear,
    alpha: Tensor,
    block: Layer,
}

pub struct Lst {
    backbone: Box<dyn Backbone>,
    first_down: Linear,
    rungs: Vec<Rung>,
    head: Head,
    params: Vec<(String, Var)>,
}

impl Lst {
    pub fn new(
        config: &LstConfig,
        backbone: Box<dyn Backbone>,
        num_labels: usize,
        seed: u64,
    ) -> Result<Self> {
        let d = backbone.hidden_size();
        let n_layers = backbone.num_layers();
        let reduction = usize::try_from(config.reduction)
            .ok()
            .filter(|r| *r >= 1 && d.is_multiple_of(*r))
            .ok_or_else(|| Error::Config {
                field: "spec.method.lst.reduction".into(),
                message: format!(
                    "{} must be ≥ 1 and divide the hidden size {d} (e.g. 8)",
                    config.reduction
                ),
            })?;
        let kept = kept_layers(config.layers.as_deref(), n_layers)?;
        // Unset: prune wherever the backbone allows it, so the default works on every backbone.
        let from_backbone = config
            .init_from_backbone
            .unwrap_or_else(|| can_prune(backbone.as_ref(), reduction));
        let side = SideShape::new(backbone.as_ref(), reduction, from_backbone)?;
        let mut rng = Rng::new(seed);
        let (dtype, device) = (backbone.dtype(), backbone.device().clone());
        // Pruned initialisation copies the backbone's own blocks into the side network, which
        // needs blocks of the side network's architecture.
        let sources = if from_backbone {
            Some(backbone.encoder_layers().ok_or_else(|| {
                Error::Config {
                    field: "spec.method.lst.initFromBackbone".into(),
                    message: "pruned initialisation copies post-LayerNorm encoder blocks (BERT), \
                          which this backbone does not have; set initFromBackbone: false"
                        .into(),
                }
            })?)
        } else {
            None
        };
        let pruner = sources
            .map(|layers| Pruner::new(layers, d, &device, &side))
            .transpose()?;

        let mut first_down = match &pruner {
            Some(p) => p.selection_ladder(d, dtype, &device)?,
            None => random_linear(&mut rng, side.width, d, dtype, &device)?,
        };
        let mut rungs = Vec::with_capacity(kept.len());
        for &i in &kept {
            let (ladder, block) = match &pruner {
                Some(p) => (
                    p.selection_ladder(d, dtype, &device)?,
                    p.pruned_layer(&p.layers[i])?,
                ),
                None => (
                    random_linear(&mut rng, side.width, d, dtype, &device)?,
                    random_layer(&mut rng, &side, backbone.norm_eps(), dtype, &device)?,
                ),
            };
            let alpha = Tensor::full(config.gate_init, 1, &device)?.to_dtype(dtype)?;
            rungs.push(Rung {
                source: i + 1,
                ladder,
                alpha,
                block,
            });
        }

        let mut params = Vec::new();
        for (name, t) in [(
            "side.first_downsample.weight".to_string(),
            &mut first_down.weight,
        )]
        .into_iter()
        .chain(
            first_down
                .bias
                .as_mut()
                .map(|b| ("side.first_downsample.bias".to_string(), b)),
        ) {
            params.push((name, make_trainable(t)?));
        }
        for rung in &mut rungs {
            let i = rung.source - 1;
            params.push((
                format!("side.downsamples.{i}.weight"),
                make_trainable(&mut rung.ladder.weight)?,
            ));
            if let Some(b) = rung.ladder.bias.as_mut() {
                params.push((format!("side.downsamples.{i}.bias"), make_trainable(b)?));
            }
            params.push((format!("side.gates.{i}"), make_trainable(&mut rung.alpha)?));
            for (name, t) in rung.block.parameters_mut() {
                params.push((format!("side.layer.{i}.{name}"), make_trainable(t)?));
            }
        }
        let head = Head::new(
            side.width,
            num_labels,
            backbone.pooling(),
            dtype,
            &device,
            &mut rng,
        )?;
        Ok(Self {
            backbone,
            first_down,
            rungs,
            head,
            params,
        })
    }
}

impl Method for Lst {
    fn name(&self) -> &'static str {
        "lst"
    }

    fn head_features(&self) -> HeadFeatures {
        HeadFeatures::Method(
            "the side network's last states (width hidden/reduction), pooled as the backbone pools",
        )
    }

    fn parameters(&self) -> Vec<(String, Var)> {
        self.head.after(&self.params)
    }

    fn forward(&self, input_ids: &Tensor, attention_mask: &Tensor) -> Result<Tensor> {
        let taps = self.backbone.taps(input_ids, attention_mask)?;
        // The side blocks attend over every real position, whatever the backbone's own mask.
        let mask = self.backbone.token_mask(input_ids, attention_mask)?;
        let bias = nn::attention_bias(&mask, self.backbone.dtype())?;
        let mut s = self.first_down.forward(&taps[0])?;
        for rung in &self.rungs {
            let down = rung.ladder.forward(&taps[rung.source])?;
            s = gated_mix(&s, &down, &rung.alpha)?;
            s = rung.block.forward(&s, &bias)?;
        }
        drop(taps);
        self.head.forward(&s, &mask)
    }
}

/// `μ·s + (1-μ)·down` with `μ = σ(α / T)`, as one node (parents s, down, α).
fn gated_mix(s: &Tensor, down: &Tensor, alpha: &Tensor) -> Result<Tensor> {
    let a = alpha
        .detach()
        .to_dtype(DType::F64)?
        .flatten_all()?
        .to_vec1::<f64>()?[0];
    let mu = 1.0 / (1.0 + (-a / GATE_TEMPERATURE).exp());
    let (sd, dd) = (s.detach(), down.detach());
    let value = ((&sd * mu)? + (&dd * (1.0 - mu))?)?;
    let need_alpha = tape::trainable(alpha);
    attach_mix(s, down, alpha, value, move |g| {
        let ds = (g * mu)?;
        let ddown = (g * (1.0 - mu))?;
        let dalpha = if need_alpha {
            let slope = mu * (1.0 - mu) / GATE_TEMPERATURE;
            Some(((g * (&sd - &dd)?)?.sum_all()? * slope)?.reshape(1)?)
        } else {
            None
        };
        Ok(vec![Some(ds), Some(ddown), dalpha])
    })
}

fn attach_mix(
    s: &Tensor,
    down: &Tensor,
    alpha: &Tensor,
    value: Tensor,
    bwd: impl Fn(&Tensor) -> candle_core::Result<Vec<Option<Tensor>>> + Send + Sync + 'static,
) -> Result<Tensor> {
    tape::attach(&[s, down, alpha], value, bwd)
}

/// Which backbone layers feed a rung: all, or the configured subset (sorted, deduplicated).
fn kept_layers(layers: Option<&[i32]>, n: usize) -> Result<Vec<usize>> {
    let Some(layers) = layers else {
        return Ok((0..n).collect());
    };
    let mut kept = Vec::with_capacity(layers.len());
    for &l in layers {
        let i = usize::try_from(l)
            .ok()
            .filter(|i| *i < n)
            .ok_or_else(|| Error::Config {
                field: "spec.method.lst.layers".into(),
                message: format!(
                    "layer {l} does not exist; the backbone has layers 0..{}",
                    n - 1
                ),
            })?;
        kept.push(i);
    }
    kept.sort_unstable();
    kept.dedup();
    if kept.is_empty() {
        return Err(Error::Config {
            field: "spec.method.lst.layers".into(),
            message: "keep at least one layer".into(),
        });
    }
    Ok(kept)
}

/// Whether pruned initialisation can start the side network on this backbone: it copies
/// post-LayerNorm encoder blocks and keeps their head count.
fn can_prune(backbone: &dyn Backbone, reduction: usize) -> bool {
    backbone.encoder_layers().is_some()
        && (backbone.hidden_size() / reduction).is_multiple_of(backbone.num_heads())
}

/// Side-network dimensions.
struct SideShape {
    width: usize,
    heads: usize,
    intermediate: usize,
}

impl SideShape {
    fn new(backbone: &dyn Backbone, reduction: usize, from_backbone: bool) -> Result<Self> {
        let heads = backbone.num_heads();
        let width = backbone.hidden_size() / reduction;
        // LST keeps the head count; pruning needs it, a random side net takes the nearest divisor.
        let heads = if width.is_multiple_of(heads) {
            heads
        } else if from_backbone {
            return Err(Error::Config {
                field: "spec.method.lst.reduction".into(),
                message: format!(
                    "side width {width} is not divisible by the backbone's {heads} heads, which \
                     pruned initialisation needs; pick another reduction or set \
                     initFromBackbone: false"
                ),
            });
        } else {
            (1..=heads.min(width))
                .rev()
                .find(|h| width.is_multiple_of(*h))
                .unwrap_or(1)
        };
        Ok(Self {
            width,
            heads,
            intermediate: (backbone.intermediate_size() / reduction).max(1),
        })
    }
}

fn random_linear(
    rng: &mut Rng,
    out: usize,
    inp: usize,
    dtype: DType,
    device: &Device,
) -> Result<Linear> {
    let w = rng.linear_weight(out, inp, dtype, device)?;
    let b = rng.uniform_tensor(out, 1.0 / (inp as f64).sqrt(), dtype, device)?;
    Ok(Linear::new(w, Some(b)))
}

fn random_layer(
    rng: &mut Rng,
    s: &SideShape,
    eps: f64,
    dtype: DType,
    device: &Device,
) -> Result<Layer> {
    let norm = || -> Result<LayerNorm> {
        Ok(LayerNorm {
            weight: Tensor::ones(s.width, dtype, device)?,
            bias: Tensor::zeros(s.width, dtype, device)?,
            eps,
        })
    };
    Ok(Layer {
        query: random_linear(rng, s.width, s.width, dtype, device)?,
        key: random_linear(rng, s.width, s.width, dtype, device)?,
        value: random_linear(rng, s.width, s.width, dtype, device)?,
        attention_output: random_linear(rng, s.width, s.width, dtype, device)?,
        attention_norm: norm()?,
        intermediate: random_linear(rng, s.intermediate, s.width, dtype, device)?,
        output: random_linear(rng, s.width, s.intermediate, dtype, device)?,
        output_norm: norm()?,
        heads: s.heads,
    })
}

/// Structured pruning of backbone blocks into side blocks, by weight magnitude (LST prunes by
/// Fisher information, which needs a full backward per sample; magnitude needs none).
///
/// One set of residual dimensions is kept for every layer (the largest LayerNorm gains summed over
/// layers), so a side block reads the dimensions the previous one wrote.
struct Pruner<'a> {
    /// The backbone's blocks the side blocks are pruned from.
    layers: &'a [Layer],
    residual: Tensor,
    residual_dims: usize,
    head_dims: usize,
    heads: usize,
    intermediate: usize,
}

impl<'a> Pruner<'a> {
    fn new(layers: &'a [Layer], d: usize, device: &Device, side: &SideShape) -> Result<Self> {
        let mut gain = Tensor::zeros(d, DType::F32, device)?;
        for layer in layers {
            for n in [&layer.attention_norm, &layer.output_norm] {
                gain = (gain + n.weight.to_dtype(DType::F32)?.abs()?)?;
            }
        }
        Ok(Self {
            layers,
            residual: top_k(&gain, side.width)?,
            residual_dims: side.width,
            head_dims: side.width / side.heads,
            heads: side.heads,
            intermediate: side.intermediate,
        })
    }

    /// A ladder that starts as the selection of the kept residual dimensions.
    fn selection_ladder(&self, d: usize, dtype: DType, device: &Device) -> Result<Linear> {
        let dims = self.residual.to_vec1::<u32>()?;
        let mut w = vec![0f32; self.residual_dims * d];
        for (row, &col) in dims.iter().enumerate() {
            w[row * d + col as usize] = 1.0;
        }
        let w = Tensor::from_vec(w, (self.residual_dims, d), device)?.to_dtype(dtype)?;
        Ok(Linear::new(
            w,
            Some(Tensor::zeros(self.residual_dims, dtype, device)?),
        ))
    }

    fn pruned_layer(&self, l: &Layer) -> Result<Layer> {
        let r = &self.residual;
        let rows_norm = |w: &Tensor| -> Result<Tensor> {
            Ok(w.to_dtype(DType::F32)?
                .index_select(r, 1)?
                .sqr()?
                .sum(1)?
                .sqrt()?)
        };
        let cols_norm = |w: &Tensor| -> Result<Tensor> {
            Ok(w.to_dtype(DType::F32)?
                .index_select(r, 0)?
                .sqr()?
                .sum(0)?
                .sqrt()?)
        };
        let qk_score = (rows_norm(&l.query.weight)? * rows_norm(&l.key.weight)?)?;
        let v_score = (rows_norm(&l.value.weight)? * cols_norm(&l.attention_output.weight)?)?;
        let ff_score = (rows_norm(&l.intermediate.weight)? * cols_norm(&l.output.weight)?)?;
        let qk = self.per_head(&qk_score)?;
        let v = self.per_head(&v_score)?;
        let ff = top_k(&ff_score, self.intermediate)?;
        Ok(Layer {
            query: prune_linear(&l.query, &qk, r)?,
            key: prune_linear(&l.key, &qk, r)?,
            value: prune_linear(&l.value, &v, r)?,
            attention_output: prune_linear(&l.attention_output, r, &v)?,
            attention_norm: prune_norm(&l.attention_norm, r)?,
            intermediate: prune_linear(&l.intermediate, &ff, r)?,
            output: prune_linear(&l.output, r, &ff)?,
            output_norm: prune_norm(&l.output_norm, r)?,
            heads: self.heads,
        })
    }

    /// The best `head_dims` dimensions inside each head, as absolute indices in head order.
    fn per_head(&self, score: &Tensor) -> Result<Tensor> {
        let dh = score.dim(0)? / self.heads;
        let mut picked = Vec::with_capacity(self.heads * self.head_dims);
        for h in 0..self.heads {
            let local = top_k(&score.i(h * dh..(h + 1) * dh)?, self.head_dims)?;
            picked.extend(
                local
                    .to_vec1::<u32>()?
                    .into_iter()
                    .map(|j| j + (h * dh) as u32),
            );
        }
        Ok(Tensor::from_vec(
            picked,
            self.heads * self.head_dims,
            score.device(),
        )?)
    }
}

/// Indices of the `k` largest entries, ascending by index (keeps the original order of dims).
fn top_k(score: &Tensor, k: usize) -> Result<Tensor> {
    let order = score.arg_sort_last_dim(false)?.to_vec1::<u32>()?;
    let mut idx: Vec<u32> = order.into_iter().take(k).collect();
    idx.sort_unstable();
    Ok(Tensor::from_vec(idx, k, score.device())?)
}

fn prune_linear(l: &Linear, rows: &Tensor, cols: &Tensor) -> Result<Linear> {
    let w = l.weight.index_select(rows, 0)?.index_select(cols, 1)?;
    let b = l
        .bias
        .as_ref()
        .map(|b| b.index_select(rows, 0))
        .transpose()?;
    Ok(Linear::new(w, b))
}

fn prune_norm(n: &LayerNorm, dims: &Tensor) -> Result<LayerNorm> {
    Ok(LayerNorm {
        weight: n.weight.index_select(dims, 0)?,
        bias: n.bias.index_select(dims, 0)?,
        eps: n.eps,
    })
}
