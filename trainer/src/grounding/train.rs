//! Trains the grounding model on clips of cached features with the project's AdamW and scores it
//! on held-out clips; the chance baselines are scored the same way.

use std::time::Instant;

use super::data::{Clip, batch};
use super::features::{FrameFeatures, QueryFeatures};
use super::metrics::{self, Scored, Scores, Span};
use super::model::{Grounder, ModelConfig};
use crate::init::Rng;
use crate::nn::StepSeed;
use crate::optim::AdamW;
use crate::{Error, Result, memory};

/// The training budget.
#[derive(Clone, Copy, Debug)]
pub struct TrainConfig {
    pub steps: usize,
    /// Clips per step.
    pub batch: usize,
    pub learning_rate: f64,
    pub weight_decay: f64,
    /// Linear warm-up steps, then constant.
    pub warmup: usize,
    /// Global gradient-norm clip (0: none).
    pub grad_clip: f64,
    pub seed: u64,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            steps: 300,
            batch: 16,
            learning_rate: 1e-3,
            weight_decay: 1e-4,
            warmup: 20,
            grad_clip: 35.0,
            seed: 1,
        }
    }
}

/// What one trained model measured.
#[derive(Clone, Debug)]
pub struct Outcome {
    pub scores: Scores,
    pub trainable: usize,
    /// Highest step peak of heap bytes over the steps (0 when nothing measures it).
    pub peak_bytes: usize,
    /// Mean seconds a step (forward, backward, update).
    pub step_seconds: f64,
    /// Mean loss of the first and the last tenth of the steps.
    pub first_loss: f64,
    pub last_loss: f64,
}

/// Trains a fresh model of `model` on `train` clips (epochs of a seeded shuffle) and scores it
/// on `eval` clips.
pub fn train_and_evaluate(
    model: ModelConfig,
    config: &TrainConfig,
    train: (&[Clip], &FrameFeatures),
    eval: (&[Clip], &FrameFeatures),
    queries: &QueryFeatures,
) -> Result<Outcome> {
    let (train_clips, train_frames) = train;
    if train_clips.len() < config.batch || config.batch == 0 || config.steps == 0 {
        return Err(Error::Config {
            field: "grounding training".into(),
            message: format!(
                "{} training clips, batch {}, {} steps: need a non-empty batch that the clips fill",
                train_clips.len(),
                config.batch,
                config.steps
            ),
        });
    }
    let first = &train_frames.layers[0];
    let (video_in, query_in) = (first.dim(2)?, queries.layers[0].dim(2)?);
    let grounder = Grounder::new(
        model,
        video_in,
        query_in,
        first.dtype(),
        first.device(),
        config.seed,
    )?;
    let mut opt = AdamW::new(grounder.parameters(), config.weight_decay);
    let mut rng = Rng::new(config.seed.wrapping_add(1000));
    let mut order: Vec<usize> = Vec::new();
    let mut losses = Vec::with_capacity(config.steps);
    let (mut peak, mut seconds) = (0usize, 0.0);
    grounder.set_training(true);
    for step in 0..config.steps {
        if order.len() < config.batch {
            order = shuffled(train_clips.len(), &mut rng);
        }
        let picked: Vec<&Clip> = order
            .split_off(order.len() - config.batch)
            .into_iter()
            .map(|i| &train_clips[i])
            .collect();
        let b = batch(&picked, train_frames, queries)?;
        let device = first.device();
        memory::begin_step(device);
        let started = Instant::now();
        grounder.begin_step(StepSeed {
            step: step as u64,
            first_example: 0,
            examples: config.batch,
        });
        let loss = grounder.loss(&b)?;
        let value = loss.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?;
        if !value.is_finite() {
            return Err(Error::Diverged { step: step as u64 });
        }
        let grads = loss.backward()?;
        drop(loss);
        let lr = config.learning_rate * ((step + 1) as f64 / config.warmup.max(1) as f64).min(1.0);
        opt.step(&grads, lr, config.grad_clip)?;
        drop(grads);
        seconds += started.elapsed().as_secs_f64();
        peak = peak.max(memory::step_peak(device));
        losses.push(value);
    }
    grounder.set_training(false);
    let (eval_clips, eval_frames) = eval;
    let predictions = predict_all(&grounder, eval_clips, eval_frames, queries)?;
    let truth: Vec<Span> = eval_clips.iter().map(Clip::span).collect();
    let tenth = (losses.len() / 10).max(1);
    let mean = |xs: &[f64]| xs.iter().sum::<f64>() / xs.len() as f64;
    Ok(Outcome {
        scores: metrics::scores(&predictions, &truth),
        trainable: grounder.parameter_count(),
        peak_bytes: peak,
        step_seconds: seconds / config.steps as f64,
        first_loss: mean(&losses[..tenth]),
        last_loss: mean(&losses[losses.len() - tenth..]),
    })
}

/// Ranked predictions for every clip, 32 clips at a time.
pub fn predict_all(
    grounder: &Grounder,
    clips: &[Clip],
    frames: &FrameFeatures,
    queries: &QueryFeatures,
) -> Result<Vec<Vec<Scored>>> {
    let mut out = Vec::with_capacity(clips.len());
    for chunk in clips.chunks(32) {
        let refs: Vec<&Clip> = chunk.iter().collect();
        out.extend(grounder.predict(&batch(&refs, frames, queries)?)?);
    }
    Ok(out)
}

/// The two baselines that read neither the frames nor the query: one span drawn uniformly at
/// random (exact expectation), and the best fixed span on the training clips.
pub fn chance_scores(train: &[Clip], eval: &[Clip], frames: usize) -> (Scores, Scores) {
    let truth: Vec<Span> = eval.iter().map(Clip::span).collect();
    let train_truth: Vec<Span> = train.iter().map(Clip::span).collect();
    let fixed = metrics::best_fixed_span(&train_truth, frames);
    let ranked: Vec<Vec<Scored>> = truth
        .iter()
        .map(|_| {
            vec![Scored {
                span: fixed,
                score: 1.0,
            }]
        })
        .collect();
    (
        metrics::uniform_span_scores(&truth, frames),
        metrics::scores(&ranked, &truth),
    )
}

fn shuffled(n: usize, rng: &mut Rng) -> Vec<usize> {
    let mut v: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        let j = ((rng.uniform() * (i + 1) as f64) as usize).min(i);
        v.swap(i, j);
    }
    v
}
