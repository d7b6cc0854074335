//! The training loop: forward, loss, backward, then the sharded optimiser step across the ranks
//! (reduce-scatter, clip, AdamW on owned pieces, all-gather); evaluation every N steps; stops at
//! the step, epoch or wall-clock budget; hands out and takes back its slice for snapshots.
//!
//! [`Trainer`] (here) holds the method, the optimiser and the group; `fit` is the loop, `step`
//! one step, `eval` the validation pass.

mod eval;
mod fit;
mod step;

use std::time::Duration;

use candle_core::{DType, Tensor};
use petl_crds::{Schedule, TrainingSpec};
use petl_snapshot::Snapshot;

use crate::collective::{Collective, Solo};
use crate::data::{Batch, IGNORE_INDEX};
use crate::methods::Method;
use crate::nn;
use crate::sharding::slice::{self, RngInputs, SliceMeta};
use crate::sharding::{self, DEFAULT_BUCKET_ELEMS, ShardedAdamW};
use crate::{Error, Result};

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
    /// Compare the ranks' parameter digests every this many steps (and at the end); 0 = only
    /// at the end.
    pub divergence_check_every: u64,
}

/// How often the ranks compare parameter digests by default: a BLAKE3 of the trainable
/// parameters (1.2 MB for LST, 90 MB for full fine-tuning of MiniLM) is cheap at this interval.
pub const DIVERGENCE_CHECK_EVERY: u64 = 100;

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
            divergence_check_every: DIVERGENCE_CHECK_EVERY,
        }
    }

    /// A budget of `steps` steps at a constant `learning_rate`: no warmup, no weight decay,
    /// gradients clipped at norm 1, evaluation and the divergence check only at the end. What
    /// tests, examples and benchmarks train with; change a field with struct update syntax.
    pub fn fixed_steps(steps: u64, learning_rate: f64, seed: u64) -> Self {
        Self {
            max_steps: Some(steps),
            epochs: None,
            max_seconds: None,
            learning_rate,
            weight_decay: 0.0,
            warmup_steps: 0,
            schedule: Schedule::Constant,
            grad_clip: 1.0,
            seed,
            eval_every_steps: 0,
            divergence_check_every: 0,
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

/// This rank's slices of the global batches, addressed by (epoch, index), so a restored run
/// resumes at its cursor.
pub trait Batches {
    fn batches_per_epoch(&self) -> usize;
    fn batch(&self, epoch: u64, index: usize) -> Result<Batch>;
    /// Position in the global batch of this rank's first example (dropout draws per example).
    fn first_example(&self) -> usize {
        0
    }
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
    /// Training throughput of all ranks since the run (or resume) started, evaluation excluded.
    pub samples_per_second: f64,
    /// Peak bytes during this step: heap (counting allocator) or GPU memory in use.
    pub peak_memory_bytes: usize,
    pub elapsed: Duration,
    /// Every rank's snapshot agent was ready when the step's exchange ran: a snapshot of this
    /// step may be handed over now, and every rank decides alike.
    pub snapshot_ready: bool,
    /// The newest snapshot generation committed on every rank.
    pub committed: Option<u64>,
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

/// This rank's snapshot agent as the step's exchange reports it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SnapshotState {
    /// Nothing waiting or in flight: a handoff now would not queue behind another.
    pub ready: bool,
    /// The newest generation the agent committed.
    pub committed: Option<u64>,
}

/// Hooks for progress, metrics and snapshots.
pub trait Observer {
    /// Before each step's exchange: this rank's snapshot agent state.
    fn snapshot_state(&mut self) -> SnapshotState {
        SnapshotState::default()
    }
    /// After each optimiser step; `trainer` can produce this rank's snapshot via
    /// [`Trainer::snapshot`].
    fn on_step(&mut self, _info: &StepInfo, _trainer: &mut Trainer) -> Result<()> {
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
    /// Mean loss of the global batch over the last (up to) 10 steps.
    pub final_loss: f64,
    pub eval: Option<Evaluation>,
    pub trainable_parameters: usize,
    pub peak_memory_bytes: usize,
    pub samples_per_second: f64,
    pub seconds: f64,
    pub stop: Stop,
}

/// A method with its sharded optimiser, its group of ranks and its position.
pub struct Trainer {
    method: Box<dyn Method>,
    optimizer: ShardedAdamW,
    /// `None` between a failed collective operation and the next group (see `set_group`).
    group: Option<Box<dyn Collective>>,
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
    /// A trainer of one rank alone.
    pub fn new(method: Box<dyn Method>, config: TrainConfig) -> Self {
        Self::with_group(method, config, Box::new(Solo), DEFAULT_BUCKET_ELEMS)
            .expect("rank 0 of a one-rank group always has a layout")
    }

    /// A trainer of rank `group.rank()` of `group.world_size()`: its optimiser keeps moments for
    /// its pieces of buckets of `bucket_elems` scalars.
    pub fn with_group(
        method: Box<dyn Method>,
        config: TrainConfig,
        group: Box<dyn Collective>,
        bucket_elems: usize,
    ) -> Result<Self> {
        let mut trainer = Self::for_rank(
            method,
            config,
            group.rank(),
            group.world_size(),
            bucket_elems,
        )?;
        trainer.group = Some(group);
        Ok(trainer)
    }

    /// A trainer of rank `rank` of `world_size` that has no group yet: it can restore its slice
    /// of a snapshot before the ranks meet ([`Trainer::set_group`]).
    pub fn for_rank(
        method: Box<dyn Method>,
        config: TrainConfig,
        rank: usize,
        world_size: usize,
        bucket_elems: usize,
    ) -> Result<Self> {
        crate::memory::keep_freed_memory();
        let optimizer = ShardedAdamW::new(
            method.parameters(),
            config.weight_decay,
            rank,
            world_size,
            bucket_elems,
        )?;
        Ok(Self {
            method,
            optimizer,
            group: None,
            config,
            step: 0,
        })
    }

    pub fn method(&self) -> &dyn Method {
        self.method.as_ref()
    }

    pub fn optimizer(&self) -> &ShardedAdamW {
        &self.optimizer
    }

    /// Steps completed.
    pub fn step(&self) -> u64 {
        self.step
    }

    pub fn rank(&self) -> usize {
        self.optimizer.rank()
    }

    pub fn world_size(&self) -> usize {
        self.optimizer.world_size()
    }

    /// Drops the group (after one of its operations failed, its links are closed).
    pub fn drop_group(&mut self) {
        self.group = None;
    }

    /// Joins a new group of the same rank and world size.
    pub fn set_group(&mut self, group: Box<dyn Collective>) -> Result<()> {
        if group.rank() != self.rank() || group.world_size() != self.world_size() {
            return Err(Error::Internal(format!(
                "a group of rank {} of {} for a trainer laid out as rank {} of {}",
                group.rank(),
                group.world_size(),
                self.rank(),
                self.world_size()
            )));
        }
        self.group = Some(group);
        Ok(())
    }

    /// The group, or the error that a recovery must replace it first.
    pub fn group(&mut self) -> Result<&mut dyn Collective> {
        match self.group.as_deref_mut() {
            Some(group) => Ok(group),
            None => Err(Error::Internal(
                "no group of ranks: a failed one was dropped and none replaced it".into(),
            )),
        }
    }

    /// What a snapshot of this trainer must match to be restored.
    pub fn slice_meta(&self, batches_per_epoch: usize) -> SliceMeta {
        let layout = self.optimizer.layout();
        SliceMeta {
            method: self.method.name().to_string(),
            world_size: layout.world_size,
            rank: self.rank(),
            bucket_elems: layout.bucket_elems,
            layout: layout.fingerprint(),
            batches_per_epoch: batches_per_epoch as u64,
        }
    }

    fn rng_inputs(&self) -> RngInputs {
        RngInputs {
            seed: self.config.seed,
        }
    }

    /// This rank's slice of the state after the steps so far (generation = step): its pieces of
    /// the parameters, their moments, the data cursor, the random inputs.
    pub fn snapshot(&self, batches_per_epoch: usize) -> Result<Snapshot> {
        slice::to_snapshot(
            &self.optimizer,
            self.step,
            &self.slice_meta(batches_per_epoch),
            self.rng_inputs(),
        )
    }

    /// Takes this rank's slice back from `snapshot` after checking it belongs to this job. The
    /// parameters are whole again only after [`Trainer::synchronize`].
    pub fn restore(&mut self, snapshot: &Snapshot, batches_per_epoch: usize) -> Result<()> {
        let meta = self.slice_meta(batches_per_epoch);
        let rng = self.rng_inputs();
        self.step = slice::restore(&mut self.optimizer, snapshot, &meta, rng)?;
        Ok(())
    }

    /// All-gathers every rank's pieces of the parameters, so every rank holds the full model.
    pub fn synchronize(&mut self) -> Result<()> {
        let group = self
            .group
            .as_deref_mut()
            .ok_or_else(|| Error::Internal("synchronize without a group".into()))?;
        sharding::gather_parameters(&self.optimizer, group)
    }

    /// Compares every rank's parameter digest; fails naming the ranks that differ from rank 0.
    pub fn check_replicas(&mut self) -> Result<()> {
        let digest = sharding::parameter_digest(self.optimizer.parameters())?;
        let step = self.step;
        let all = self.group()?.all_gather_bytes(&digest)?;
        let differing: Vec<usize> = all
            .iter()
            .enumerate()
            .filter(|(_, d)| d[..] != all[0][..])
            .map(|(rank, _)| rank)
            .collect();
        if differing.is_empty() {
            Ok(())
        } else {
            Err(Error::ReplicasDiverged {
                step,
                ranks: differing,
            })
        }
    }

    /// Moves one scalar of this rank's first parameter, so that a test can watch the divergence
    /// check stop the job (`--kill …,what=perturb`). Never called in a normal run.
    pub fn perturb_for_test(&self) -> Result<()> {
        let Some((name, var)) = self.optimizer.parameters().first() else {
            return Ok(());
        };
        let flat = var.as_tensor().flatten_all()?;
        let first = flat.narrow(0, 0, 1)?;
        let moved = (first.to_dtype(DType::F32)? + 1e-3)?.to_dtype(var.dtype())?;
        flat.slice_set(&moved, 0, 0)?;
        tracing::warn!(parameter = %name, rank = self.rank(), "test fault: perturbed one scalar");
        Ok(())
    }
}

/// Cross-entropy for the task the labels imply: `(B,)` labels → classification over `(B, C)`
/// logits; `(B, T)` labels → next-token prediction over `(B, T, V)` logits, skipping
/// [`IGNORE_INDEX`] positions.
pub fn loss(logits: &Tensor, labels: &Tensor) -> Result<Tensor> {
    if labels.rank() == 1 {
        return nn::cross_entropy(logits, labels, None);
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
    nn::cross_entropy(&predictions, &safe, Some(&keep.to_dtype(DType::F32)?))
}
