//! The optimisation loop's budget and hyper-parameters (`spec.training`).
//! Exactly one of `epochs` and `maxSteps` bounds the run.

use kube::KubeSchema;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::rules::rule;

/// How long and how to train.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = rule("has(self.epochs) != has(self.maxSteps)", "spec.training must set exactly one of epochs or maxSteps"),
    // A static message: the API server prices `string(int)` in a messageExpression beyond the CRD budget.
    validation = rule(
        "!has(self.maxSteps) || self.warmupSteps < self.maxSteps",
        "spec.training.warmupSteps must be less than spec.training.maxSteps"
    ),
)]
pub struct TrainingSpec {
    /// Passes over the training data. Exactly one of epochs and maxSteps must be set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 100000))]
    pub epochs: Option<i32>,
    /// Optimiser steps (global, across all workers). Exactly one of epochs and maxSteps must be set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_steps: Option<i64>,
    /// Wall-clock training budget in seconds; the trainer stops at the next step boundary after it
    /// and publishes the adapter as if the step budget had been reached.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_seconds: Option<i64>,
    /// Global batch size (split evenly across workers.replicas).
    #[serde(default = "default_batch_size")]
    #[schemars(range(min = 1, max = 65536))]
    pub batch_size: i32,
    /// Peak learning rate. Must be greater than 0.
    #[serde(default = "default_learning_rate")]
    #[schemars(range(max = 10.0))]
    #[x_kube(validation = rule("self > 0.0", "spec.training.learningRate must be greater than 0 (for example 0.003)"))]
    pub learning_rate: f64,
    /// Decoupled (AdamW) weight decay.
    #[serde(default)]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub weight_decay: f64,
    /// Steps of linear warm-up from 0 to learningRate.
    #[serde(default)]
    #[schemars(range(min = 0))]
    pub warmup_steps: i64,
    /// Learning-rate schedule after warm-up.
    #[serde(default)]
    pub schedule: Schedule,
    /// Clip the global gradient L2 norm to this value; 0 disables clipping.
    #[serde(default = "default_grad_clip")]
    #[schemars(range(min = 0.0, max = 1000.0))]
    pub grad_clip: f64,
    /// The optimiser.
    #[serde(default)]
    pub optimizer: Optimizer,
    /// Seed for initialisation, shuffling and dropout; with the same seed a run is repeatable.
    #[serde(default = "default_seed")]
    #[schemars(range(min = 0))]
    pub seed: i64,
    /// Evaluate on the validation split every this many steps (and always at the end); 0 means only at the end.
    #[serde(default = "default_eval_every_steps")]
    #[schemars(range(min = 0))]
    pub eval_every_steps: i64,
}

fn default_batch_size() -> i32 {
    32
}
fn default_learning_rate() -> f64 {
    3e-3
}
fn default_grad_clip() -> f64 {
    1.0
}
fn default_seed() -> i64 {
    42
}
fn default_eval_every_steps() -> i64 {
    100
}

impl TrainingSpec {
    /// A spec bounded by `max_steps` with every other setting at its default.
    pub fn steps(max_steps: i64) -> Self {
        Self {
            epochs: None,
            max_steps: Some(max_steps),
            max_seconds: None,
            batch_size: default_batch_size(),
            learning_rate: default_learning_rate(),
            weight_decay: 0.0,
            warmup_steps: 0,
            schedule: Schedule::default(),
            grad_clip: default_grad_clip(),
            optimizer: Optimizer::default(),
            seed: default_seed(),
            eval_every_steps: default_eval_every_steps(),
        }
    }

    /// Total optimiser steps, given how many steps one epoch takes.
    pub fn total_steps(&self, steps_per_epoch: i64) -> i64 {
        match (self.max_steps, self.epochs) {
            (Some(steps), _) => steps,
            (None, Some(epochs)) => i64::from(epochs) * steps_per_epoch,
            (None, None) => steps_per_epoch,
        }
    }
}

/// Learning-rate schedule after warm-up.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum Schedule {
    /// Keep learningRate.
    #[default]
    Constant,
    /// Decay linearly to 0 at the last step.
    Linear,
    /// Cosine decay to 0 at the last step.
    Cosine,
}

/// Optimiser.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum Optimizer {
    /// Adam with decoupled weight decay (beta1 0.9, beta2 0.999, eps 1e-8).
    #[default]
    Adamw,
}
