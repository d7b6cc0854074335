//! The training loop: forward, loss, backward, clip, AdamW, schedule; evaluation every N steps;
//! stops at the step, epoch or wall-clock budget; exposes and restores its state for snapshots.

use std::time::{Duration, Instant};

use candle_core::{D, DType, Tensor};
use petl_crds::{Schedule, TrainingSpec};

use crate::data::{Batch, IGNORE_INDEX};
use crate::methods::Method;
use crate::optim::{AdamW, LrSchedule};
use crate::{Error, Result, memory, tape};

/// The loop's budget and hyper-parameters (from `spec.training`).
#[derive(Clone, Debug)]
pub struct TrainConfig {
    pub max_steps: Option<u64>,
    pub epochs: Option<u64>,
    pub max_seconds: Option<f64>,
    pub learning_rate: f64,
    pub weight_decay: f64,
    pub warmup_steps: u64,
    pub schedule: Schedule,
    /// Global gradient-norm limit; 0 disables clipping.
    pub grad_clip: f64,
    pub seed: u64,
    /// Evaluate every this many steps (and at the end); 0 = only at the end.
    pub eval_every_steps: u64,
}

impl TrainConfig {
    pub fn from_spec(spec: &TrainingSpec) -> Self {
        let non_negative = |v: i64| u64::try_from(v).unwrap_or(0);
        Self {
            max_steps: spec.max_steps.map(non_negative),
            epochs: spec.epochs.map(|e| non_negative(i64::from(e))),
            max_seconds: spec.max_seconds.map(|s| s as f64),
            learning_rate: spec.learning_rate,
            weight_decay: spec.weight_decay,
            warmup_steps: non_negative(spec.warmup_steps),
            schedule: spec.schedule,
            grad_clip: spec.grad_clip,
            seed: non_negative(spec.seed),
            eval_every_steps: non_negative(spec.eval_every_steps),
        }
    }

    /// Steps the run will take at most, given the epoch length.
    pub fn total_steps(&self, batches_per_epoch: usize) -> u64 {
        match (self.max_steps, self.epochs) {
            (Some(s), _) => s,
            (None, Some(e)) => e * batches_per_epoch as u64,
            (None, None) => batches_per_epoch as u64,
        }
    }
}

/// Training batches addressed by (epoch, index), so a restored run resumes at its cursor.
pub trait Batches {
    fn batches_per_epoch(&self) -> usize;
    fn batch(&self, epoch: u64, index: usize) -> Result<Batch>;
}

impl Batches for [Batch] {
    fn batches_per_epoch(&self) -> usize {
        self.len()
    }
    fn batch(&self, _epoch: u64, index: usize) -> Result<Batch> {
        Ok(self[index].clone())
    }
}

impl Batches for Vec<Batch> {
    fn batches_per_epoch(&self) -> usize {
        self.len()
    }
    fn batch(&self, epoch: u64, index: usize) -> Result<Batch> {
        self.as_slice().batch(epoch, index)
    }
}

/// What the observer sees after every step.
#[derive(Clone, Debug)]
pub struct StepInfo {
    /// Steps completed (1 after the first).
    pub step: u64,
    pub total_steps: u64,
    pub epoch: u64,
    pub loss: f64,
    pub lr: f64,
    pub grad_norm: f64,
    /// Training throughput since the run (or resume) started, evaluation excluded.
    pub samples_per_second: f64,
    /// Peak bytes during this step: heap (counting allocator) or GPU memory in use.
    pub peak_memory_bytes: usize,
    pub elapsed: Duration,
}

/// Validation result: accuracy for classification, perplexity for causal LM.
#[derive(Clone, Debug, PartialEq)]
pub struct Evaluation {
    pub loss: f64,
    pub accuracy: Option<f64>,
    pub perplexity: Option<f64>,
    pub samples: usize,
}

impl Evaluation {
    /// The number reported as `evalMetric`: accuracy, else perplexity.
    pub fn metric(&self) -> f64 {
        self.accuracy.or(self.perplexity).unwrap_or(self.loss)
    }
}

/// Hooks for progress, metrics and snapshots.
pub trait Observer {
    /// After each optimiser step; `trainer` can produce a snapshot via [`Trainer::state`].
    fn on_step(&mut self, _info: &StepInfo, _trainer: &Trainer) -> Result<()> {
        Ok(())
    }
    fn on_eval(&mut self, _step: u64, _eval: &Evaluation) -> Result<()> {
        Ok(())
    }
}

/// An observer that does nothing.
pub struct Quiet;
impl Observer for Quiet {}

/// Why the loop ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stop {
    Steps,
    Seconds,
}

/// The outcome of [`Trainer::fit`].
#[derive(Clone, Debug)]
pub struct Report {
    pub steps: u64,
    /// Mean loss over the last (up to) 10 steps.
    pub final_loss: f64,
    pub eval: Option<Evaluation>,
    pub trainable_parameters: usize,
    pub peak_memory_bytes: usize,
    pub samples_per_second: f64,
    pub seconds: f64,
    pub stop: Stop,
}

/// Everything needed to continue a run: step, data cursor, parameters, optimiser moments.
/// Tensor names: `param/<name>`, `adam_m/<name>`, `adam_v/<name>`.
#[derive(Clone, Debug)]
pub struct TrainingState {
    pub step: u64,
    pub tensors: Vec<(String, Tensor)>,
}

/// A method with its optimiser and position.
pub struct Trainer {
    method: Box<dyn Method>,
    optimizer: AdamW,
    config: TrainConfig,
    step: u64,
}

/// Runs `f` on a thread of the CPU compute pool (as many threads as candle uses), or here when the
/// pool cannot be started.
///
/// gemm and the fused kernels split their work over rayon. Called from a thread outside the pool,
/// each of those hundreds of splits per step is handed over to the pool while the caller sleeps
/// until it is woken; called from inside, a split is a fork the calling thread takes part in. On
/// 2 cores the bench's LoRA step went from 0.61 s to 0.55 s (mean of three runs each).
fn in_compute_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    static POOL: std::sync::OnceLock<Option<rayon::ThreadPool>> = std::sync::OnceLock::new();
    let pool = POOL.get_or_init(|| {
        rayon::ThreadPoolBuilder::new()
            .num_threads(candle_core::utils::get_num_threads())
            .thread_name(|i| format!("petl-compute-{i}"))
            .build()
            .ok()
    });
    match pool {
        Some(pool) => pool.install(f),
        None => f(),
    }
}

impl Trainer {
    pub fn new(method: Box<dyn Method>, config: TrainConfig) -> Self {
        crate::memory::keep_freed_memory();
        let optimizer = AdamW::new(method.parameters(), config.weight_decay);
        Self {
            method,
            optimizer,
            config,
            step: 0,
        }
    }

    pub fn method(&self) -> &dyn Method {
        self.method.as_ref()
    }

    pub fn step(&self) -> u64 {
        self.step
    }

    /// The current state, copied: the optimiser updates parameters and moments in place.
    pub fn state(&self) -> Result<TrainingState> {
        let mut tensors = Vec::new();
        for (n, v) in self.optimizer.parameters() {
            tensors.push((format!("param/{n}"), v.as_tensor().detach().copy()?));
        }
        tensors.extend(self.optimizer.state()?);
        Ok(TrainingState {
            step: self.step,
            tensors,
        })
    }

    /// Puts parameters, moments and step back as `state` recorded them.
    pub fn restore(&mut self, state: &TrainingState) -> Result<()> {
        for (name, var) in self.optimizer.parameters() {
            let key = format!("param/{name}");
            let t = state
                .tensors
                .iter()
                .find(|(n, _)| *n == key)
                .map(|(_, t)| t)
                .ok_or_else(|| Error::Config {
                    field: "snapshot".into(),
                    message: format!(
                        "no tensor {key}; the snapshot belongs to another method or model"
                    ),
                })?;
            if t.shape() != var.shape() {
                return Err(Error::Config {
                    field: "snapshot".into(),
                    message: format!(
                        "{key} has shape {:?}, the model needs {:?}",
                        t.dims(),
                        var.dims()
                    ),
                });
            }
            var.set(&t.to_dtype(var.dtype())?.to_device(var.device())?)?;
        }
        self.optimizer.restore(&state.tensors, state.step)?;
        self.step = state.step;
        Ok(())
    }

    /// Trains until the step/epoch budget or `max_seconds`, evaluating on `valid`.
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
        let started = Instant::now();
        let mut train_time = Duration::ZERO;
        let mut samples = 0usize;
        let mut recent = Vec::new();
        let mut peak = 0usize;
        let mut eval = None;
        let mut stop = Stop::Steps;
        while self.step < total {
            if let Some(limit) = self.config.max_seconds
                && started.elapsed().as_secs_f64() >= limit
            {
                stop = Stop::Seconds;
                break;
            }
            let epoch = self.step / per_epoch as u64;
            let batch = train.batch(epoch, (self.step % per_epoch as u64) as usize)?;
            let t0 = Instant::now();
            let lr = schedule.at(self.step);
            let device = batch.input_ids.device().clone();
            memory::begin_step(&device);
            let (loss, grad_norm) = self.train_step(&batch, lr)?;
            let step_peak = memory::step_peak(&device);
            train_time += t0.elapsed();
            self.step += 1;
            samples += batch.len();
            peak = peak.max(step_peak);
            recent.push(loss);
            if recent.len() > 10 {
                recent.remove(0);
            }
            let info = StepInfo {
                step: self.step,
                total_steps: total,
                epoch,
                loss,
                lr,
                grad_norm,
                samples_per_second: samples as f64 / train_time.as_secs_f64().max(1e-9),
                peak_memory_bytes: step_peak,
                elapsed: started.elapsed(),
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
        }
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

    /// One optimiser step on `batch`; returns the loss and the gradient norm before clipping.
    pub fn train_step(&mut self, batch: &Batch, lr: f64) -> Result<(f64, f64)> {
        if batch.input_ids.device().is_cpu() {
            in_compute_pool(|| self.train_step_here(batch, lr))
        } else {
            self.train_step_here(batch, lr)
        }
    }

    fn train_step_here(&mut self, batch: &Batch, lr: f64) -> Result<(f64, f64)> {
        self.method.set_training(true);
        let logits = self
            .method
            .forward(&batch.input_ids, &batch.attention_mask)?;
        let loss = loss(&logits, &batch.labels)?;
        drop(logits);
        let value = loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        if !value.is_finite() {
            return Err(Error::Diverged { step: self.step });
        }
        let grads = loss.backward()?;
        drop(loss);
        let stats = self.optimizer.step(&grads, lr, self.config.grad_clip)?;
        Ok((value, stats.grad_norm))
    }

    /// Loss and accuracy (classification) or perplexity (causal LM) on `valid`, without a graph.
    pub fn evaluate(&self, valid: &[Batch]) -> Result<Evaluation> {
        self.method.set_training(false);
        tape::no_grad(|| -> Result<Evaluation> {
            let (mut loss_sum, mut count, mut correct, mut samples) = (0.0, 0.0, 0usize, 0usize);
            let mut causal = false;
            for batch in valid {
                let logits = self
                    .method
                    .forward(&batch.input_ids, &batch.attention_mask)?;
                let weight = if batch.labels.rank() == 1 {
                    let predicted = logits.argmax(D::Minus1)?;
                    correct += predicted
                        .eq(&batch.labels.to_dtype(DType::U32)?)?
                        .to_dtype(DType::U32)?
                        .sum_all()?
                        .to_scalar::<u32>()? as usize;
                    batch.len() as f64
                } else {
                    causal = true;
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
                samples += batch.len();
            }
            let mean = loss_sum / count.max(1.0);
            Ok(Evaluation {
                loss: mean,
                accuracy: (!causal).then(|| correct as f64 / samples.max(1) as f64),
                perplexity: causal.then(|| mean.exp()),
                samples,
            })
        })
    }
}

/// Cross-entropy for the task the labels imply: `(B,)` labels → classification over `(B, C)`
/// logits; `(B, T)` labels → next-token prediction over `(B, T, V)` logits, skipping
/// [`IGNORE_INDEX`] positions.
pub fn loss(logits: &Tensor, labels: &Tensor) -> Result<Tensor> {
    if labels.rank() == 1 {
        return tape::cross_entropy(logits, labels, None);
    }
    let (b, t, v) = logits.dims3()?;
    if t < 2 {
        return Err(Error::Config {
            field: "dataset.maxSequenceLength".into(),
            message: "causal LM needs sequences of at least 2 tokens".into(),
        });
    }
    let predictions = logits.narrow(1, 0, t - 1)?.reshape((b * (t - 1), v))?;
    let targets = labels.narrow(1, 1, t - 1)?.flatten_all()?;
    let keep = targets.ne(IGNORE_INDEX)?;
    let safe = keep.where_cond(&targets, &targets.zeros_like()?)?;
    tape::cross_entropy(&predictions, &safe, Some(&keep.to_dtype(DType::F32)?))
}
