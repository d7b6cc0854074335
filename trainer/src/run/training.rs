//! The bridge from a resolved job to the training loop: builds the backbone and method, joins the
//! ranks, restores the agreed snapshot, feeds this rank its slices of the global batches, and
//! recovers in place when a peer is lost; step events become progress, metrics, the worker
//! report, snapshots and (when asked) injected faults.

use std::time::Instant;

use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device};
use petl_crds::{MethodConfig, ModelDtype, PetlJobSpec};

use super::fault::{self, Fault, FaultKind};
use super::recovery::{self, Resume};
use super::report::ReportWriter;
use super::snapshots::SnapshotLink;
use super::{ResolvedSources, RunOptions, TextBackbone, ranks};
use crate::data::{Batch, Batcher, Dataset, Task};
use crate::export::{HeadFeatures, LoraSettings};
use crate::manifest::RecoveryRecord;
use crate::methods;
use crate::metrics::TrainerMetrics;
use crate::models::Backbone;
use crate::models::bert::Bert;
use crate::models::gguf::FrozenFormat;
use crate::models::llama::Llama;
use crate::progress::{Progress, StepUpdate};
use crate::sharding::DEFAULT_BUCKET_ELEMS;
use crate::train::{Batches, Evaluation, Observer, SnapshotState, StepInfo, TrainConfig, Trainer};
use crate::{Error, Result};

/// Recoveries one process attempts before it gives up and exits (temporary failure).
const MAX_RECOVERIES: usize = 20;

/// What training hands to publishing.
#[derive(Debug, Clone)]
pub struct Trained {
    pub steps: u64,
    pub final_loss: Option<f64>,
    pub eval_metric: Option<f64>,
    pub eval_metric_name: String,
    /// The method's exportable tensors.
    pub tensors: Vec<(String, candle_core::Tensor)>,
    pub lora: Option<LoraSettings>,
    /// What the classification head reads, for the adapter's head description.
    pub head_features: HeadFeatures,
    pub trainable_parameters: u64,
    /// Peak training memory of any step (see [`crate::train::Report::peak_memory_bytes`]).
    pub peak_memory_bytes: u64,
    pub samples_per_second: f64,
    /// The recoveries this process went through.
    pub recoveries: Vec<RecoveryRecord>,
}

/// This rank's slices of the global training batches, addressed by (epoch, index).
pub struct RankBatches<'a> {
    pub batcher: Batcher<'a>,
    pub device: Device,
}

impl Batches for RankBatches<'_> {
    fn batches_per_epoch(&self) -> usize {
        self.batcher.batches_per_epoch()
    }

    fn batch(&self, epoch: u64, index: usize) -> Result<Batch> {
        self.batcher.batch(epoch, index, &self.device)
    }

    fn first_example(&self) -> usize {
        self.batcher.first_example()
    }
}

/// Validation batches over the whole validation split (each rank scores its share), cut from
/// the examples sorted by length so a batch pads little: the metrics do not depend on the order,
/// and padding would otherwise cost a large share of every evaluation.
pub fn validation_batches(
    dataset: &Dataset,
    batch_size: usize,
    device: &Device,
) -> Result<Vec<Batch>> {
    let mut by_length: Vec<_> = dataset.validation.iter().collect();
    by_length.sort_by_key(|e| e.ids.len());
    by_length
        .chunks(batch_size.max(1))
        .map(|chunk| Batch::pad(chunk, dataset.task, dataset.pad_id, device))
        .collect()
}

/// Trains this rank and returns what publishing needs, with the trainer (still in its group,
/// for the barrier after publishing).
pub fn train(
    spec: &PetlJobSpec,
    options: &RunOptions,
    sources: &ResolvedSources,
    dataset: &Dataset,
    metrics: &TrainerMetrics,
) -> Result<(Trained, Trainer)> {
    if dataset.task == Task::CausalLm {
        return Err(Error::Config {
            field: "spec.dataset.task".into(),
            message: "causal-lm jobs are not trained by `petl run` yet; use sequence-classification (a BERT-family directory or a Llama GGUF file)".into(),
        });
    }
    let device = crate::device::open(options.device)?;
    let backbone: Box<dyn Backbone> = match sources.backbone {
        TextBackbone::Bert => Box::new(Bert::load(&sources.model_dir, model_dtype(spec), &device)?),
        // Frozen weights re-quantised to Q8_0 (candle's fast CPU kernel; rows that do not fit
        // a block keep theirs); trainable tensors are f32 whatever `spec.model.dtype` says.
        TextBackbone::Llama => Box::new(
            Llama::from_gguf(
                &sources.weights_file,
                FrozenFormat::Requantize(GgmlDType::Q8_0),
                &device,
            )?
            .0,
        ),
    };
    let config = TrainConfig::from_spec(&spec.training);
    let method_config = spec.method.config();
    let method = methods::build(&method_config, backbone, dataset.num_labels, config.seed)?;
    let batch_size = usize::try_from(spec.training.batch_size).unwrap_or(0);
    let batches = RankBatches {
        batcher: Batcher::new(
            &dataset.train,
            dataset.task,
            dataset.pad_id,
            batch_size,
            config.seed,
            options.rank,
            options.world_size,
        )?,
        device: device.clone(),
    };
    let validation = validation_batches(dataset, batch_size, &device)?;
    drive(spec, options, method, &batches, &validation, metrics)
}

/// The dtype `spec.model.dtype` asks the frozen backbone to be held in.
pub(super) fn model_dtype(spec: &PetlJobSpec) -> DType {
    match spec.model.dtype {
        ModelDtype::F32 => DType::F32,
        ModelDtype::Bf16 => DType::BF16,
        ModelDtype::F16 => DType::F16,
    }
}

/// Trains `method` on this rank's `batches` (whatever the backbone and data), joining the ranks,
/// restoring and snapshotting, and returns what publishing needs.
pub(super) fn drive(
    spec: &PetlJobSpec,
    options: &RunOptions,
    method: Box<dyn methods::Method>,
    batches: &dyn Batches,
    validation: &[Batch],
    metrics: &TrainerMetrics,
) -> Result<(Trained, Trainer)> {
    let config = TrainConfig::from_spec(&spec.training);
    let method_config = spec.method.config();
    let per_epoch = batches.batches_per_epoch();
    let total_steps = config.total_steps(per_epoch);
    let every_steps = u64::try_from(spec.snapshot.every_steps).unwrap_or(1);
    let link = options
        .snapshot_socket
        .as_deref()
        .map(|socket| SnapshotLink::new(socket, every_steps, options.connect_deadline));
    let connect = || {
        ranks::connect(
            options.rank,
            options.world_size,
            &options.job_name,
            options.peers.as_ref(),
        )
    };
    let mut trainer = Trainer::for_rank(
        method,
        config,
        options.rank,
        options.world_size,
        DEFAULT_BUCKET_ELEMS,
    )?;
    metrics.world_size.set(options.world_size as i64);
    let resume = Resume {
        link: link.as_ref(),
        connect: &connect,
        batches_per_epoch: per_epoch,
    };
    let mut records = Vec::new();
    let reporting = options.rank == 0;
    let mut observer = RankObserver {
        rank: options.rank,
        progress: reporting.then(|| {
            Progress::new(
                total_steps,
                options.display,
                options.log_every,
                Some(metrics.clone()),
            )
        }),
        report: ReportWriter::new(metrics.clone(), spec, options.world_size),
        link: link.as_ref(),
        batches_per_epoch: per_epoch,
        fault: options.fault,
    };
    // Start: the agreed generation (a restarted or replaced rank resumes it), or step 0.
    let mut start_retries = MAX_RECOVERIES;
    if let Some(record) = resume_with_retries(
        &mut trainer,
        &resume,
        true,
        options.started,
        &mut start_retries,
    )? {
        observer.recovered(&record);
        records.push(record);
    }
    let mut recoveries_left = MAX_RECOVERIES;
    let report = loop {
        match trainer.fit(batches, validation, &mut observer) {
            Ok(report) => break report,
            Err(Error::Collective(e)) if e.is_peer_lost() && recoveries_left > 0 => {
                let noticed = Instant::now();
                tracing::warn!(error = %e, step = trainer.step(), "lost a peer; recovering in place");
                if let Some(record) = resume_with_retries(
                    &mut trainer,
                    &resume,
                    false,
                    noticed,
                    &mut recoveries_left,
                )? {
                    observer.recovered(&record);
                    records.push(record);
                }
            }
            Err(e) => return Err(e),
        }
    };
    if let Some(progress) = &observer.progress {
        progress.finish();
    }
    tracing::info!(
        steps = report.steps,
        final_loss = report.final_loss,
        eval_metric = report.eval.as_ref().map(Evaluation::metric),
        seconds = report.seconds,
        samples_per_second = report.samples_per_second,
        peak_memory_bytes = report.peak_memory_bytes,
        stop = ?report.stop,
        "training finished"
    );
    let lora = match method_config {
        MethodConfig::Lora(c) => Some(LoraSettings {
            rank: usize::try_from(c.rank).unwrap_or(0),
            alpha: c.alpha,
            dropout: c.dropout,
            target_modules: c.target_modules.clone(),
        }),
        _ => None,
    };
    let method = trainer.method();
    let trained = Trained {
        steps: report.steps,
        final_loss: Some(report.final_loss).filter(|l| l.is_finite()),
        eval_metric: report.eval.as_ref().map(Evaluation::metric),
        eval_metric_name: match report.eval.as_ref().and_then(|e| e.accuracy) {
            Some(_) => "accuracy",
            None => "perplexity",
        }
        .to_string(),
        tensors: method.exportable(),
        lora,
        head_features: method.head_features(),
        trainable_parameters: report.trainable_parameters as u64,
        peak_memory_bytes: report.peak_memory_bytes as u64,
        samples_per_second: report.samples_per_second,
        recoveries: records,
    };
    Ok((trained, trainer))
}

/// [`recovery::resume`], tried again while a peer is lost during it (bounded by `left`).
fn resume_with_retries(
    trainer: &mut Trainer,
    resume: &Resume<'_>,
    new_process: bool,
    since: Instant,
    left: &mut usize,
) -> Result<Option<RecoveryRecord>> {
    loop {
        match recovery::resume(trainer, resume, new_process, since) {
            Err(Error::Collective(e)) if e.is_peer_lost() && *left > 0 => {
                *left -= 1;
                tracing::warn!(error = %e, "lost a peer while resuming; trying again");
            }
            other => return other,
        }
    }
}

/// Forwards the loop's events: progress and metrics (rank 0), the worker report, this rank's
/// snapshots, and an injected fault.
struct RankObserver<'a> {
    rank: usize,
    progress: Option<Progress>,
    report: ReportWriter,
    link: Option<&'a SnapshotLink>,
    batches_per_epoch: usize,
    fault: Option<Fault>,
}

impl RankObserver<'_> {
    fn recovered(&mut self, record: &RecoveryRecord) {
        let tiers: Vec<String> = record
            .tiers
            .iter()
            .enumerate()
            .map(|(rank, tier)| format!("rank {rank} {tier}"))
            .collect();
        let line = format!(
            "recovered at generation {} in {:.2} s (lost: {:?}; {})",
            record.restored_generation,
            record.seconds,
            record.lost_ranks,
            tiers.join(", ")
        );
        tracing::info!(
            restored_generation = record.restored_generation,
            lost_ranks = ?record.lost_ranks,
            tiers = ?record.tiers,
            seconds = record.seconds,
            "recovered"
        );
        if let Some(progress) = &self.progress {
            progress.note(&line);
        }
        self.report.recovered(record);
    }
}

impl Observer for RankObserver<'_> {
    fn snapshot_state(&mut self) -> SnapshotState {
        match self.link {
            Some(link) => SnapshotState {
                ready: link.ready(),
                committed: link.committed(),
            },
            None => SnapshotState::default(),
        }
    }

    fn on_step(&mut self, info: &StepInfo, trainer: &mut Trainer) -> Result<()> {
        if let Some(link) = self.link
            && info.snapshot_ready
            && info.step.is_multiple_of(link.every_steps)
        {
            link.put(trainer.snapshot(self.batches_per_epoch)?);
        }
        if let Some(progress) = &self.progress {
            progress.step(&StepUpdate {
                step: info.step,
                loss: info.loss,
                learning_rate: info.lr,
                samples_per_second: info.samples_per_second,
                peak_memory_bytes: info.peak_memory_bytes as u64,
            });
        }
        if self.rank == 0 {
            self.report.step(info);
        }
        if let Some(f) = self.fault
            && f.step <= info.step
        {
            if f.step == info.step {
                fault::strike(self.rank, &f);
            }
            if f.what == FaultKind::Perturb {
                // Again after every step: the next all-gather would otherwise heal it, as it
                // heals every scalar; a rank that keeps differing is what the check must catch.
                trainer.perturb_for_test()?;
            } else {
                self.fault = None;
            }
        }
        Ok(())
    }

    fn on_eval(&mut self, step: u64, eval: &Evaluation) -> Result<()> {
        let name = if eval.accuracy.is_some() {
            "accuracy"
        } else {
            "perplexity"
        };
        if let Some(progress) = &self.progress {
            progress.eval(step, name, eval.metric());
        }
        if self.rank == 0 {
            self.report.eval(eval.metric());
        }
        Ok(())
    }
}
