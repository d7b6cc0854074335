//! Visual query tuning (VQT; Tu, Mai, Chao, CVPR 2023): every frozen block gets its own learnable
//! query tokens, which read the block's tokens as keys and values but are never read by them, so
//! the backbone's forward is unchanged. The head reads the pooled output beside every block's
//! processed queries.
//!
//! The backbone runs once without a graph ([`Backbone::taps`]); per block, the queries go through
//! [`Backbone::query_block`] against that block's detached input. Backward crosses the query
//! paths only: a step keeps each block's keys and values of the frozen tokens and the few query
//! tokens' own activations, never the backbone's internals (reference/methods.md §4).

use candle_core::{D, Tensor, Var};
use petl_crds::{VqtCombine, VqtConfig};

use super::{Method, head::Head};
use crate::export::HeadFeatures;
use crate::init::Rng;
use crate::models::Backbone;
use crate::tape::{self, Dropout, StepSeed};
use crate::{Error, Result};

/// The smallest norm a feature vector is divided by (PyTorch's `F.normalize` ε).
const NORM_EPS: f64 = 1e-12;

pub struct Vqt {
    backbone: Box<dyn Backbone>,
    /// Block i's query tokens, `(q, d)`.
    queries: Vec<Var>,
    /// Block i's dropout on its query tokens.
    dropouts: Vec<Dropout>,
    combine: VqtCombine,
    normalize: bool,
    head: Head,
}

impl Vqt {
    pub fn new(
        config: &VqtConfig,
        backbone: Box<dyn Backbone>,
        num_labels: usize,
        seed: u64,
    ) -> Result<Self> {
        let q = usize::try_from(config.queries)
            .ok()
            .filter(|q| *q >= 1)
            .ok_or_else(|| Error::Config {
                field: "spec.method.vqt.queries".into(),
                message: format!("{} must be at least 1 (e.g. 5)", config.queries),
            })?;
        if !(0.0..1.0).contains(&config.dropout) {
            return Err(Error::Config {
                field: "spec.method.vqt.dropout".into(),
                message: format!("{} must lie in [0, 0.9] (e.g. 0.1)", config.dropout),
            });
        }
        let (d, layers) = (backbone.hidden_size(), backbone.num_layers());
        let (dtype, device) = (backbone.dtype(), backbone.device().clone());
        // A backbone without query blocks is refused now, not at the first step.
        let probe = Tensor::zeros((1, 1, d), dtype, &device)?;
        let open = Tensor::zeros((1, 1, 1, 1), dtype, &device)?;
        backbone.query_block(0, &probe, &probe, &open)?;

        let mut rng = Rng::new(seed);
        // VPT's bound √(6 / (3·p² + d)) is √(3/d) for ViT-B/16 (3·16² = d = 768); written for any
        // width, since a text backbone has no patch size.
        let bound = (3.0 / d as f64).sqrt();
        let queries = (0..layers)
            .map(|_| {
                let t = rng.uniform_tensor((q, d), bound, dtype, &device)?;
                Ok(Var::from_tensor(&t)?)
            })
            .collect::<Result<Vec<_>>>()?;
        let dropouts = (0..layers)
            .map(|i| Dropout::new(config.dropout, seed.wrapping_add(i as u64 + 1)))
            .collect();
        let per_block = match config.combine {
            VqtCombine::Concat => q * d,
            VqtCombine::Mean => d,
        };
        let head = Head::new(
            d + layers * per_block,
            num_labels,
            backbone.pooling(),
            dtype,
            &device,
            &mut rng,
        )?;
        Ok(Self {
            backbone,
            queries,
            dropouts,
            combine: config.combine,
            normalize: config.normalize_features,
            head,
        })
    }

    /// One block's processed queries `(B, q, d)` as head features: `(B, q·d)` or `(B, d)`.
    fn summarise(&self, out: &Tensor) -> Result<Tensor> {
        let (b, q, d) = out.dims3()?;
        let f = match self.combine {
            VqtCombine::Concat => out.reshape((b, q * d))?,
            VqtCombine::Mean => out.mean(1)?,
        };
        self.normalised(&f)
    }

    fn normalised(&self, f: &Tensor) -> Result<Tensor> {
        if self.normalize {
            l2_normalise(f)
        } else {
            Ok(f.clone())
        }
    }
}

impl Method for Vqt {
    fn name(&self) -> &'static str {
        "vqt"
    }

    fn head_features(&self) -> HeadFeatures {
        HeadFeatures::Method(
            "the pooled backbone output beside every block's processed query tokens (`combine`)",
        )
    }

    fn parameters(&self) -> Vec<(String, Var)> {
        let mut p: Vec<(String, Var)> = self
            .queries
            .iter()
            .enumerate()
            .map(|(i, v)| (format!("query_tokens.{i}"), v.clone()))
            .collect();
        p.extend(self.head.parameters());
        p
    }

    fn forward(&self, input_ids: &Tensor, attention_mask: &Tensor) -> Result<Tensor> {
        let mut taps = self.backbone.taps(input_ids, attention_mask)?;
        // Queries read every real position, as the backbone's classifier pools over them.
        let mask = self.backbone.token_mask(input_ids, attention_mask)?;
        let bias = tape::attention_bias(&mask, self.backbone.dtype())?;
        let last = taps.pop().ok_or_else(|| {
            Error::Internal("the backbone returned no hidden states to read".into())
        })?;
        let pooled = self
            .backbone
            .pooling()
            .apply(&self.backbone.output_from_tap(&last)?, &mask)?;
        drop(last);
        let b = mask.dim(0)?;
        let mut features = Vec::with_capacity(self.queries.len() + 1);
        features.push(self.normalised(&pooled)?);
        // Block i reads tap i (its input); each tap is dropped once its block has run.
        for (i, ((queries, dropout), tokens)) in self
            .queries
            .iter()
            .zip(&self.dropouts)
            .zip(taps)
            .enumerate()
        {
            let (q, d) = queries.dims2()?;
            let x = queries.as_tensor().unsqueeze(0)?.broadcast_as((b, q, d))?;
            let x = dropout.forward(&x)?;
            let out = self.backbone.query_block(i, &x, &tokens, &bias)?;
            features.push(self.summarise(&out)?);
        }
        let pooled = features.remove(0);
        self.head.logits(&side_by_side(&pooled, &features)?)
    }

    fn set_training(&self, training: bool) {
        for d in &self.dropouts {
            d.set_active(training);
        }
    }

    fn begin_step(&self, step: StepSeed) {
        for d in &self.dropouts {
            d.begin_step(step);
        }
    }
}

/// The untracked pooled output `(B, p)` and the blocks' tracked query features `(B, fᵢ)` side by
/// side, as a node whose only parent is the queries' part: candle's own `cat` would store a
/// gradient for the pooled output too.
fn side_by_side(pooled: &Tensor, queries: &[Tensor]) -> Result<Tensor> {
    let queries = Tensor::cat(queries, 1)?;
    let value = Tensor::cat(&[&pooled.detach(), &queries.detach()], 1)?;
    let (p, f) = (pooled.dim(1)?, queries.dim(1)?);
    tape::attach(&[pooled, &queries], value, move |g| {
        Ok(vec![Some(g.narrow(1, 0, p)?), Some(g.narrow(1, p, f)?)])
    })
}

/// `x / max(‖x‖, ε)` over the last dimension, as one node that saves its output and the norms.
fn l2_normalise(x: &Tensor) -> Result<Tensor> {
    let xd = x.detach();
    let norm = xd
        .sqr()?
        .sum_keepdim(D::Minus1)?
        .sqrt()?
        .clamp(NORM_EPS, f64::MAX)?;
    let y = xd.broadcast_div(&norm)?;
    let saved = y.clone();
    tape::attach(&[x], y, move |g| {
        // d(x/‖x‖) = (g − y·⟨y, g⟩) / ‖x‖.
        let dot = (g * &saved)?.sum_keepdim(D::Minus1)?;
        let dx = g
            .broadcast_sub(&saved.broadcast_mul(&dot)?)?
            .broadcast_div(&norm)?;
        Ok(vec![Some(dx)])
    })
}
