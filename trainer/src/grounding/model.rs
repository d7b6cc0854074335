//! R²-Tuning's grounding model on cached features: the R² block ([`crate::methods::r2_block`])
//! runs from the last tapped layer back to the first over the clip's `T` frames, each frame's
//! state refined by query-modulated pooling of its tokens, then a temporal decoder layer with
//! self-attention across frames (sine positional encoding) and cross-attention to the query.
//!
//! As the official code, the video tokens carry the two temporal endpoint features (TEF,
//! `[t/T, (t+1)/T]`) and the frame's own state is its [CLS] token. The heads are the paper's
//! class and boundary heads at the finest pyramid level only (the ConvPyramid is left out: clips
//! are 16–32 frames, not minutes): per frame a foreground logit (binary cross-entropy against
//! "this frame shows the queried digit"; the paper's focal loss) and the distances from the
//! frame's centre to the span's start and end in units of the clip (L1 on the foreground
//! frames). Of the paper's contrastive losses the layer-wise calibration is kept ([`calibration`]:
//! per tapped layer, each clip's mean foreground-frame state against the clips' mean query
//! tokens); the saliency NCE and the video-level calibration are left out. A frame's
//! prediction is the span its distances give, scored by its foreground probability; the spans
//! are ranked after non-maximum suppression.
//!
//! With `layers: 1` the same block and heads read the last layer alone: the "no recurrence"
//! baseline.

use candle_core::{D, DType, Device, Tensor, Var};

use super::data::ClipBatch;
use super::metrics::{MAX_PREDICTIONS, Scored, Span, nms};
use crate::init::Rng;
use crate::methods::r2_block::{Block, BlockShape, On, Trainables, positional_encoding};
use crate::nn::{Linear, StepSeed};
use crate::tape;
use crate::{Error, Result};

/// IoU above which a lower-scored span is suppressed.
pub const NMS_THRESHOLD: f64 = 0.7;

/// The model's shape.
#[derive(Clone, Copy, Debug)]
pub struct ModelConfig {
    /// Tapped layers `k` (the paper's 4; 1 is the no-recurrence baseline).
    pub layers: usize,
    /// Block width `D` (the paper's 256).
    pub dims: usize,
    /// Dropout in the token and query maps.
    pub dropout: f64,
    /// Weight of the boundary L1 loss against the foreground loss.
    pub boundary_weight: f64,
    /// Weight of the layer-wise calibration loss (0: off).
    pub calibration_weight: f64,
}

impl Default for ModelConfig {
    fn default() -> Self {
        Self {
            layers: 4,
            dims: 64,
            dropout: 0.1,
            boundary_weight: 1.0,
            calibration_weight: 0.1,
        }
    }
}

/// The R² block with grounding heads.
pub struct Grounder {
    block: Block,
    foreground: Linear,
    boundary: Linear,
    config: ModelConfig,
    params: Vec<(String, Var)>,
}

/// What a forward gives per frame.
pub struct FrameOutputs {
    /// `(B, T)` foreground logits.
    pub foreground: Tensor,
    /// `(B, T, 2)` distances from the frame's centre to the start and the end, in clips.
    pub boundary: Tensor,
    /// Per tapped layer (in the order the recurrence reads them): the merged frame states
    /// `(B, T, D)` the decoder reads, and the mean of the mapped query tokens `(B, D)`.
    pub layers: Vec<(Tensor, Tensor)>,
}

impl Grounder {
    /// `video_in`, `query_in`: widths of the cached frame and query tokens.
    pub fn new(
        config: ModelConfig,
        video_in: usize,
        query_in: usize,
        dtype: DType,
        device: &Device,
        seed: u64,
    ) -> Result<Self> {
        if config.layers == 0 || config.dims == 0 || !(0.0..=0.9).contains(&config.dropout) {
            return Err(Error::Config {
                field: "grounding model".into(),
                message: format!(
                    "layers {} and dims {} must be at least 1, dropout {} in [0, 0.9] (e.g. 4, \
                     64, 0.1)",
                    config.layers, config.dims, config.dropout
                ),
            });
        }
        let on = On {
            dtype,
            device: device.clone(),
            eps: 1e-5,
        };
        let shape = BlockShape {
            video_in: video_in + 2,
            query_in,
            dims: config.dims,
            layers: config.layers,
            dropout: config.dropout,
            positions: true,
        };
        let mut rng = Rng::new(seed);
        let mut t = Trainables(Vec::new());
        let block = Block::new(&shape, &mut rng, &on, seed, &mut t)?;
        let mut foreground = on.linear(&mut rng, 1, config.dims)?;
        let mut boundary = on.linear(&mut rng, 2, config.dims)?;
        t.linear("class_head", &mut foreground)?;
        t.linear("coord_head", &mut boundary)?;
        Ok(Self {
            block,
            foreground,
            boundary,
            config,
            params: t.0,
        })
    }

    pub fn parameters(&self) -> Vec<(String, Var)> {
        self.params.clone()
    }

    pub fn parameter_count(&self) -> usize {
        self.params.iter().map(|(_, v)| v.elem_count()).sum()
    }

    pub fn set_training(&self, training: bool) {
        self.block.set_training(training);
    }

    pub fn begin_step(&self, step: StepSeed) {
        self.block.begin_step(step);
    }

    /// The per-frame outputs for a batch whose `video` and `query` hold at least `layers` tapped
    /// layers (the last `layers` are read).
    pub fn forward(&self, batch: &ClipBatch) -> Result<FrameOutputs> {
        let k = self.config.layers;
        let (nv, nq) = (batch.video.len(), batch.query.len());
        if nv < k || nq < k {
            return Err(Error::Config {
                field: "grounding layers".into(),
                message: format!(
                    "the model reads {k} layers; the features hold {nv} (frames) and {nq} (query)"
                ),
            });
        }
        let (b, t, p, _) = batch.video[0].dims4()?;
        let (_, l, _) = batch.query[0].dims3()?;
        let (dtype, device) = (batch.video[0].dtype(), batch.video[0].device().clone());
        let d = self.config.dims;
        let tef = temporal_endpoints(b, t, p, dtype, &device)?;
        let pe = positional_encoding(t, d, dtype, &device)?;
        let token_bias = Tensor::zeros((b * t, 1, 1, p), dtype, &device)?;
        let memory_bias = Tensor::zeros((b, 1, 1, l), dtype, &device)?;
        let mut last: Option<Tensor> = None;
        let mut layers = Vec::with_capacity(k);
        // From the last tapped layer back to the first.
        for i in (0..k).rev() {
            let tokens = Tensor::cat(&[&batch.video[nv - k + i], &tef], D::Minus1)?;
            let (v, q) = self.block.maps(i, &tokens, &batch.query[nq - k + i])?;
            drop(tokens);
            let own = v.narrow(2, 0, 1)?.reshape((b, t, d))?;
            let frames = v.reshape((b * t, p, d))?;
            let per_frame_q = q
                .unsqueeze(1)?
                .broadcast_as((b, t, l, d))?
                .reshape((b * t, l, d))?;
            let o = self
                .block
                .pool(&per_frame_q, &frames, &token_bias)?
                .reshape((b, t, d))?;
            let s = self.block.merge(i, &own, &o, last.as_ref())?;
            last = Some(self.block.decode(&s, &q, &memory_bias, Some(&pe))?);
            layers.push((s, q.mean(1)?));
        }
        let last =
            last.ok_or_else(|| Error::Internal("the grounding model read no layer".into()))?;
        Ok(FrameOutputs {
            foreground: self.foreground.forward(&last)?.squeeze(2)?,
            boundary: self.boundary.forward(&last)?,
            layers,
        })
    }

    /// The training loss: mean binary cross-entropy of the foreground logits, plus
    /// `boundary_weight` × the mean L1 of the boundary distances over foreground frames, plus
    /// `calibration_weight` × the mean over the tapped layers of the calibration loss
    /// ([`calibration`]).
    pub fn loss(&self, batch: &ClipBatch) -> Result<Tensor> {
        let out = self.forward(batch)?;
        let (fg, bounds) = targets(batch, out.foreground.dtype(), out.foreground.device())?;
        let bce = bce_with_logits(&out.foreground, &fg)?;
        let l1 = masked_l1(&out.boundary, &bounds, &fg, self.config.boundary_weight)?;
        let value = (bce.detach() + l1.detach())?;
        let total = tape::attach(&[&bce, &l1], value, |g| {
            Ok(vec![Some(g.clone()), Some(g.clone())])
        })?;
        if self.config.calibration_weight == 0.0 {
            return Ok(total);
        }
        // The mean over the tapped layers, so that the weight means the same for any `layers`.
        let w = self.config.calibration_weight / out.layers.len() as f64;
        let mut sum = total;
        for (states, query) in &out.layers {
            let c = calibration(states, query, &fg, &batch.digits)?;
            sum = (sum + (c * w)?)?;
        }
        Ok(sum)
    }

    /// Ranked spans per clip (no graph): every frame's span, scored by its foreground
    /// probability, after non-maximum suppression, at most [`MAX_PREDICTIONS`].
    pub fn predict(&self, batch: &ClipBatch) -> Result<Vec<Vec<Scored>>> {
        let out = tape::no_grad(|| self.forward(batch))?;
        let scores = out.foreground.to_dtype(DType::F64)?.to_vec2::<f64>()?;
        let bounds = out.boundary.to_dtype(DType::F64)?.to_vec3::<f64>()?;
        let t = batch.frames as f64;
        Ok(scores
            .iter()
            .zip(&bounds)
            .map(|(s, b)| {
                let spans = s
                    .iter()
                    .zip(b)
                    .enumerate()
                    .map(|(f, (logit, d))| {
                        let centre = f as f64 + 0.5;
                        let start = (centre - d[0].max(0.0) * t).clamp(0.0, t);
                        let end = (centre + d[1].max(0.0) * t).clamp(0.0, t);
                        Scored {
                            span: Span::new(start, end.max(start)),
                            score: 1.0 / (1.0 + (-logit).exp()),
                        }
                    })
                    .collect();
                nms(spans, NMS_THRESHOLD, MAX_PREDICTIONS)
            })
            .collect())
    }
}

/// `(B, T, P, 2)`: every token of frame `t` carries `[t/T, (t+1)/T]`.
fn temporal_endpoints(
    b: usize,
    t: usize,
    p: usize,
    dtype: DType,
    device: &Device,
) -> Result<Tensor> {
    let values: Vec<f64> = (0..t)
        .flat_map(|f| [f as f64 / t as f64, (f + 1) as f64 / t as f64])
        .collect();
    Ok(Tensor::from_vec(values, (1, t, 1, 2), device)?
        .to_dtype(dtype)?
        .broadcast_as((b, t, p, 2))?
        .contiguous()?)
}

/// The foreground `(B, T)` 0/1 and the boundary targets `(B, T, 2)` (distances from each frame's
/// centre to the truth's start and end, in clips; meaningful on foreground frames only).
fn targets(batch: &ClipBatch, dtype: DType, device: &Device) -> Result<(Tensor, Tensor)> {
    let t = batch.frames;
    let (mut fg, mut bounds) = (Vec::new(), Vec::new());
    for span in &batch.spans {
        for f in 0..t {
            let centre = f as f64 + 0.5;
            fg.push(f64::from(u8::from(
                centre > span.start && centre < span.end,
            )));
            bounds.push((centre - span.start) / t as f64);
            bounds.push((span.end - centre) / t as f64);
        }
    }
    let b = batch.spans.len();
    Ok((
        Tensor::from_vec(fg, (b, t), device)?.to_dtype(dtype)?,
        Tensor::from_vec(bounds, (b, t, 2), device)?.to_dtype(dtype)?,
    ))
}

/// Temperature of the calibration loss's cosine similarities.
const CALIBRATION_TEMPERATURE: f64 = 0.07;

/// One layer's calibration loss, a supervised InfoNCE over the batch as R²-Tuning's layer-wise
/// contrastive calibration of video and query: each clip's video vector (the mean of its
/// foreground frames' states `(B, T, D)`, `fg` `(B, T)` 0/1) against every clip's query vector
/// (`query` `(B, D)`), cosine similarity over a temperature; the clips asking for the same digit
/// are the positives: `−log Σ_pos softmax`, averaged over the clips.
pub fn calibration(states: &Tensor, query: &Tensor, fg: &Tensor, digits: &[u32]) -> Result<Tensor> {
    let b = digits.len();
    let weights = fg.broadcast_div(&fg.sum_keepdim(1)?.maximum(1.0)?)?;
    let video = weights.unsqueeze(1)?.matmul(states)?.squeeze(1)?;
    let unit = |x: &Tensor| -> Result<Tensor> {
        let norm = x.sqr()?.sum_keepdim(1)?.affine(1.0, 1e-12)?.sqrt()?;
        Ok(x.broadcast_div(&norm)?)
    };
    let logits = (unit(&video)?.matmul(&unit(query)?.t()?)? / CALIBRATION_TEMPERATURE)?;
    let positives: Vec<f64> = digits
        .iter()
        .flat_map(|a| digits.iter().map(move |d| f64::from(u8::from(a == d))))
        .collect();
    let positives =
        Tensor::from_vec(positives, (b, b), states.device())?.to_dtype(states.dtype())?;
    // −log(Σ_pos e^x / Σ_all e^x), shifted by the row maximum, from candle's own ops:
    // `candle_nn::ops::softmax_last_dim` has no backward and silently returns an untracked
    // tensor, so a loss built on it trains nothing.
    let e = logits
        .broadcast_sub(&logits.max_keepdim(1)?.detach())?
        .exp()?;
    let hit = ((&e * positives)?.sum(1)?.log()? - e.sum(1)?.log()?)?;
    Ok((hit.mean_all()? * -1.0)?)
}

/// Mean of `softplus(x) − x·y` (binary cross-entropy with logits) as one node that saves
/// `σ(x) − y`.
pub fn bce_with_logits(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let x = logits.detach();
    let n = x.elem_count() as f64;
    // softplus(x) = max(x, 0) + log(1 + exp(−|x|)), stable for any x.
    let softplus = (x.relu()? + ((x.abs()?.neg()?.exp()? + 1.0)?.log()?))?;
    let value = ((softplus - (&x * targets)?)?.sum_all()? / n)?;
    if !tape::tracks(logits) {
        return Ok(value);
    }
    let residual = (sigmoid(&x)? - targets)?;
    tape::attach(&[logits], value, move |g| {
        Ok(vec![Some((residual.broadcast_mul(g)? / n)?)])
    })
}

/// `weight` × the mean over the rows `mask` marks of the mean absolute error of `pred` against
/// `target` (`(B, T, 2)`, `mask` `(B, T)` 0/1), as one node that saves the masked signs.
pub fn masked_l1(pred: &Tensor, target: &Tensor, mask: &Tensor, weight: f64) -> Result<Tensor> {
    let m = mask.unsqueeze(D::Minus1)?;
    let count = (mask.sum_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()?).max(1.0) * 2.0;
    let diff = (pred.detach() - target)?;
    let value =
        ((diff.abs()?.broadcast_mul(&m)?.sum_all()? * (weight / count))?).to_dtype(pred.dtype())?;
    if !tape::tracks(pred) {
        return Ok(value);
    }
    let signs = (diff.sign()?.broadcast_mul(&m)? * (weight / count))?;
    tape::attach(&[pred], value, move |g| {
        Ok(vec![Some(signs.broadcast_mul(g)?)])
    })
}

/// `1 / (1 + e^{−x})`.
fn sigmoid(x: &Tensor) -> candle_core::Result<Tensor> {
    (x.neg()?.exp()? + 1.0)?.recip()
}
