//! The loop: steps until the step, epoch or wall-clock budget, evaluating every N steps and
//! comparing the ranks' parameters every few; resumable from wherever `restore` left it.

use std::time::{Duration, Instant};

use super::step::StepExtras;
use super::{Batches, Observer, Report, StepInfo, Stop, Trainer};
use crate::data::Batch;
use crate::optim::LrSchedule;
use crate::{Error, Result, memory};

impl Trainer {
    /// Trains from the current step until the step/epoch budget or `max_seconds`, evaluating on
    /// `valid` (every rank passes the whole validation set; each evaluates its share).
    ///
    /// A failed operation between ranks returns `Error::Collective` with the state mid-step:
    /// restore a snapshot, give the trainer a new group and call `fit` again.
    pub fn fit(
        &mut self,
        train: &dyn Batches,
        valid: &[Batch],
        observer: &mut dyn Observer,
    ) -> Result<Report> {
        let per_epoch = train.batches_per_epoch();
        if per_epoch == 0 {
            return Err(Error::Config {
                field: "dataset".into(),
                message: "no training batches; add rows or lower training.batchSize".into(),
            });
        }
        let total = self.config.total_steps(per_epoch);
        let schedule = LrSchedule {
            peak: self.config.learning_rate,
            warmup_steps: self.config.warmup_steps,
            total_steps: total,
            schedule: self.config.schedule,
        };
        let world = self.world_size();
        let started = Instant::now();
        let mut train_time = Duration::ZERO;
        let mut samples = 0usize;
        let mut recent = Vec::new();
        let mut peak = 0usize;
        let mut eval = None;
        let mut stop = Stop::Steps;
        while self.step < total {
            let epoch = self.step / per_epoch as u64;
            let batch = train.batch(epoch, (self.step % per_epoch as u64) as usize)?;
            let t0 = Instant::now();
            let lr = schedule.at(self.step);
            let device = batch.input_ids.device().clone();
            let snapshot = observer.snapshot_state();
            let every = self.config.divergence_check_every;
            let extras = StepExtras {
                first_example: train.first_example(),
                snapshot_ready: snapshot.ready,
                committed: snapshot.committed,
                stop: self
                    .config
                    .max_seconds
                    .is_some_and(|limit| started.elapsed().as_secs_f64() >= limit),
                check_replicas: every > 0 && self.step > 0 && self.step.is_multiple_of(every),
            };
            memory::begin_step(&device);
            let outcome = self.step_with(&batch, lr, extras)?;
            let step_peak = memory::step_peak(&device);
            train_time += t0.elapsed();
            samples += batch.len() * world;
            peak = peak.max(step_peak);
            recent.push(outcome.agreed.loss);
            if recent.len() > 10 {
                recent.remove(0);
            }
            let info = StepInfo {
                step: self.step,
                total_steps: total,
                epoch,
                loss: outcome.agreed.loss,
                lr,
                grad_norm: outcome.grad_norm,
                samples_per_second: samples as f64 / train_time.as_secs_f64().max(1e-9),
                peak_memory_bytes: step_peak,
                elapsed: started.elapsed(),
                snapshot_ready: outcome.agreed.snapshot_ready,
                committed: outcome.agreed.committed,
            };
            observer.on_step(&info, self)?;
            let every = self.config.eval_every_steps;
            if every > 0
                && self.step.is_multiple_of(every)
                && self.step < total
                && !valid.is_empty()
            {
                let e = self.evaluate(valid)?;
                observer.on_eval(self.step, &e)?;
                eval = Some(e);
            }
            if outcome.agreed.stop {
                stop = Stop::Seconds;
                break;
            }
        }
        self.check_replicas()?;
        if !valid.is_empty() {
            let e = self.evaluate(valid)?;
            observer.on_eval(self.step, &e)?;
            eval = Some(e);
        }
        Ok(Report {
            steps: self.step,
            final_loss: recent.iter().sum::<f64>() / recent.len().max(1) as f64,
            eval,
            trainable_parameters: self.method.trainable_parameters(),
            peak_memory_bytes: peak,
            samples_per_second: samples as f64 / train_time.as_secs_f64().max(1e-9),
            seconds: started.elapsed().as_secs_f64(),
            stop,
        })
    }
}
