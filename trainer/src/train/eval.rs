//! The validation pass: each rank scores its share of the validation batches without a graph,
//! and the ranks add up their sums in rank order, so every rank reports the same metric.

use candle_core::{D, DType};

use super::{Evaluation, Trainer, loss};
use crate::data::{Batch, IGNORE_INDEX};
use crate::{Result, tape};

impl Trainer {
    /// Loss and accuracy (classification) or perplexity (causal LM) on `valid`, the whole
    /// validation set (rank `r` of `w` scores batches `r, r + w, …`).
    pub fn evaluate(&mut self, valid: &[Batch]) -> Result<Evaluation> {
        let (rank, world) = (self.rank(), self.world_size());
        self.method.set_training(false);
        let method = self.method.as_ref();
        let sums = tape::no_grad(|| -> Result<[f64; 5]> {
            let (mut loss_sum, mut count, mut correct, mut samples) = (0.0, 0.0, 0.0, 0.0);
            let mut causal = 0.0;
            for batch in valid.iter().skip(rank).step_by(world) {
                let logits = method.forward(&batch.input_ids, &batch.attention_mask)?;
                let weight = if batch.labels.rank() == 1 {
                    let predicted = logits.argmax(D::Minus1)?;
                    correct += predicted
                        .eq(&batch.labels.to_dtype(DType::U32)?)?
                        .to_dtype(DType::U32)?
                        .sum_all()?
                        .to_scalar::<u32>()? as f64;
                    batch.len() as f64
                } else {
                    causal = 1.0;
                    let (b, t) = batch.labels.dims2()?;
                    let targets = batch.labels.narrow(1, 1, t.saturating_sub(1))?;
                    targets
                        .ne(IGNORE_INDEX)?
                        .to_dtype(DType::F64)?
                        .sum_all()?
                        .to_scalar::<f64>()?
                        .min((b * t) as f64)
                };
                let l = loss(&logits, &batch.labels)?
                    .to_dtype(DType::F64)?
                    .to_scalar::<f64>()?;
                loss_sum += l * weight;
                count += weight;
                samples += batch.len() as f64;
            }
            Ok([loss_sum, count, correct, samples, causal])
        })?;
        let [loss_sum, count, correct, samples, causal] =
            match self.group()?.all_reduce_sum_f64(&sums)?[..] {
                [a, b, c, d, e] => [a, b, c, d, e],
                _ => sums,
            };
        let causal = causal > 0.0;
        let mean = loss_sum / count.max(1.0);
        Ok(Evaluation {
            loss: mean,
            accuracy: (!causal).then(|| correct / samples.max(1.0)),
            perplexity: causal.then(|| mean.exp()),
            samples: samples as usize,
        })
    }
}
