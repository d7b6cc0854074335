//! One training step of this rank: forward and loss on its slice of the global batch, backward,
//! then the sharded optimiser step with the other ranks.

use candle_core::DType;

use super::{Trainer, in_compute_pool, loss};
use crate::data::Batch;
use crate::nn::StepSeed;
use crate::sharding::{self, StepOutcome, StepRequest};
use crate::{Error, Result};

/// What a step needs besides the batch.
#[derive(Clone, Copy, Debug, Default)]
pub struct StepExtras {
    /// Position in the global batch of this rank's first example.
    pub first_example: usize,
    pub snapshot_ready: bool,
    pub committed: Option<u64>,
    pub stop: bool,
    /// Compare parameter digests in this step's exchange.
    pub check_replicas: bool,
}

impl Trainer {
    /// One optimiser step on `batch` (this rank's slice); returns the loss of the global batch and
    /// the gradient norm before clipping.
    pub fn train_step(&mut self, batch: &Batch, lr: f64) -> Result<(f64, f64)> {
        let outcome = self.step_with(batch, lr, StepExtras::default())?;
        Ok((outcome.agreed.loss, outcome.grad_norm))
    }

    /// One optimiser step with the snapshot and stop flags this rank brings to the exchange.
    pub(crate) fn step_with(
        &mut self,
        batch: &Batch,
        lr: f64,
        extras: StepExtras,
    ) -> Result<StepOutcome> {
        if batch.input_ids.device().is_cpu() {
            in_compute_pool(|| self.step_here(batch, lr, extras))
        } else {
            self.step_here(batch, lr, extras)
        }
    }

    fn step_here(&mut self, batch: &Batch, lr: f64, extras: StepExtras) -> Result<StepOutcome> {
        self.method.set_training(true);
        self.method.begin_step(StepSeed {
            step: self.step,
            first_example: extras.first_example as u64,
            examples: batch.len(),
        });
        let logits = self
            .method
            .forward(&batch.input_ids, &batch.attention_mask)?;
        let loss = loss(&logits, &batch.labels)?;
        drop(logits);
        let value = loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        // A non-finite loss is not returned here: every rank must learn it in the exchange and
        // stop together (one rank leaving alone would look like a lost peer to the others).
        let grads = loss.backward()?;
        drop(loss);
        let digest = extras
            .check_replicas
            .then(|| sharding::parameter_digest(self.optimizer.parameters()))
            .transpose()?;
        let request = StepRequest {
            loss: value,
            lr,
            max_norm: self.config.grad_clip,
            snapshot_ready: extras.snapshot_ready,
            committed: extras.committed,
            stop: extras.stop,
            digest,
            step: self.step,
        };
        let group = self
            .group
            .as_deref_mut()
            .ok_or_else(|| Error::Internal("a step without a group of ranks".into()))?;
        let outcome = sharding::step::step(&mut self.optimizer, group, grads, &request)?;
        self.step += 1;
        Ok(outcome)
    }
}
