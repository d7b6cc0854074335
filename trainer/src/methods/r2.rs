//! Reversed recurrent tuning (R²-Tuning, Liu et al., ECCV 2024): one small R² block, shared by the
//! frozen backbone's last k layers, runs from the last layer back to the earlier ones and refines
//! one state per layer; the head reads the state after layer 0. Backward runs through the block
//! only.
//!
//! The block itself lives in [`super::r2_block`] (shared with the video-grounding model in
//! `crate::grounding`); here `V_i` is the layer's tokens and `Q_i` its learnable query tokens
//! (classification has no text query), and `own(v)` is the backbone's own pooling where the paper
//! reads the frame's [CLS] token. The state is one position (a sentence or an image is one
//! "frame"), so the decoder's self-attention is its
//! value and output projections, and the positional encoding the paper adds to the queries is a
//! constant the cross-attention's query bias absorbs: neither is built. The backbone runs once
//! without a graph; a step keeps the k tapped states the token map reads and width-D tensors.

use candle_core::{Tensor, Var};
use petl_crds::R2Config;

use super::r2_block::{self, Block, BlockShape, On, Trainables};
use super::{Method, head::Head};
use crate::export::HeadFeatures;
use crate::init::Rng;
use crate::models::{Backbone, Pooling};
use crate::nn::{self, StepSeed};
use crate::{Error, Result};

pub struct R2 {
    backbone: Box<dyn Backbone>,
    /// Tapped layers, oldest first: the outputs of the backbone's last `k` blocks.
    taps: Vec<usize>,
    block: Block,
    /// Per tapped layer: its query tokens `(q, d)`.
    queries: Vec<Var>,
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
        let layers = r2_block::at_least_one(config.layers, "spec.method.r2.layers", "4")?;
        let dims = r2_block::at_least_one(config.dims, "spec.method.r2.dims", "128")?;
        let queries = r2_block::at_least_one(config.queries, "spec.method.r2.queries", "4")?;
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
        let mut t = Trainables(Vec::new());
        let shape = BlockShape {
            video_in: d,
            query_in: d,
            dims,
            layers: k,
            dropout: config.dropout,
            positions: false,
        };
        let block = Block::new(&shape, &mut rng, &on, seed, &mut t)?;
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
        for (i, q) in query_tokens.iter().enumerate() {
            t.0.push((format!("r2.query_tokens.{i}"), q.clone()));
        }
        let pooling = backbone.pooling();
        let head = Head::new(dims, num_labels, pooling, on.dtype, &on.device, &mut rng)?;
        Ok(Self {
            taps: (n + 1 - k..=n).collect(),
            backbone,
            block,
            queries: query_tokens,
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
        self.head.after(&self.params)
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
            let (nq, d) = self.queries[i].dims2()?;
            let q_tokens = self.queries[i]
                .as_tensor()
                .unsqueeze(0)?
                .broadcast_as((b, nq, d))?;
            let (v, q) = self.block.maps(i, &tokens, &q_tokens)?;
            drop(tokens);
            let o = self.block.pool(&q, &v, &token_bias)?;
            let own = self.pooling.apply(&v, &mask)?.unsqueeze(1)?;
            let s = self.block.merge(i, &own, &o, last.as_ref())?;
            let memory_bias = Tensor::zeros((b, 1, 1, nq), q.dtype(), q.device())?;
            last = Some(self.block.decode(&s, &q, &memory_bias, None)?);
        }
        let last = last.ok_or_else(|| Error::Internal("R² tapped no layer".into()))?;
        self.head.logits(&last.squeeze(1)?)
    }

    fn set_training(&self, training: bool) {
        self.block.set_training(training);
    }

    fn begin_step(&self, step: StepSeed) {
        self.block.begin_step(step);
    }
}
