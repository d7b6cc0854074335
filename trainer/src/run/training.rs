//! The bridge from a resolved job to trainer-core's loop: builds the backbone and method, feeds
//! it this rank's batches, and turns step and evaluation events into progress and metrics.

use candle_core::{DType, Device};
use petl_crds::{MethodConfig, ModelDtype, PetlJobSpec};

use super::{ResolvedSources, RunOptions};
use crate::data::{Batch, Batcher, Dataset, Task};
use crate::export::LoraSettings;
use crate::methods;
use crate::metrics::TrainerMetrics;
use crate::models::bert::Bert;
use crate::progress::{Progress, StepUpdate};
use crate::train::{Batches, Evaluation, Observer, StepInfo, TrainConfig, Trainer};
use crate::{Error, Result};

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
    pub trainable_parameters: u64,
    /// Peak training memory of any step (see [`crate::train::Report::peak_memory_bytes`]).
    pub peak_memory_bytes: u64,
    pub samples_per_second: f64,
}

/// This rank's training batches, addressed by (epoch, index).
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
}

/// Validation batches over the whole validation split (every rank evaluates all of it), cut from
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

/// Trains this rank and returns what publishing needs.
pub fn train(
    spec: &PetlJobSpec,
    options: &RunOptions,
    sources: &ResolvedSources,
    dataset: &Dataset,
    metrics: &TrainerMetrics,
) -> Result<Trained> {
    if dataset.task == Task::CausalLm {
        return Err(Error::Config {
            field: "spec.dataset.task".into(),
            message: "causal-lm jobs need a decoder backbone (GGUF/Llama), which `petl run` does not drive yet; use sequence-classification with a BERT-family model".into(),
        });
    }
    let device = crate::device::open(options.device)?;
    let dtype = match spec.model.dtype {
        ModelDtype::F32 => DType::F32,
        ModelDtype::Bf16 => DType::BF16,
        ModelDtype::F16 => DType::F16,
    };
    let backbone = Bert::load(&sources.model_dir, dtype, &device)?;
    let config = TrainConfig::from_spec(&spec.training);
    let method_config = spec.method.config();
    let method = methods::for_bert(&method_config, backbone, dataset.num_labels, config.seed)?;
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
    let total_steps = config.total_steps(batches.batches_per_epoch());
    let mut trainer = Trainer::new(method, config);
    let mut observer = ProgressObserver {
        progress: Progress::new(total_steps, options.display, Some(metrics.clone())),
    };
    let report = trainer.fit(&batches, &validation, &mut observer)?;
    observer.progress.finish();
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
    Ok(Trained {
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
        trainable_parameters: report.trainable_parameters as u64,
        peak_memory_bytes: report.peak_memory_bytes as u64,
        samples_per_second: report.samples_per_second,
    })
}

/// Forwards the loop's events to the progress display and the Prometheus gauges.
struct ProgressObserver {
    progress: Progress,
}

impl Observer for ProgressObserver {
    fn on_step(&mut self, info: &StepInfo, _trainer: &Trainer) -> Result<()> {
        self.progress.step(&StepUpdate {
            step: info.step,
            loss: info.loss,
            learning_rate: info.lr,
            samples_per_second: info.samples_per_second,
            peak_memory_bytes: info.peak_memory_bytes as u64,
        });
        Ok(())
    }

    fn on_eval(&mut self, step: u64, eval: &Evaluation) -> Result<()> {
        let name = if eval.accuracy.is_some() {
            "accuracy"
        } else {
            "perplexity"
        };
        self.progress.eval(step, name, eval.metric());
        Ok(())
    }
}
