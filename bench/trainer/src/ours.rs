//! Our side of one run, in a fresh process: load the backbone (MiniLM, or the DINOv2 ViT from its
//! ONNX file), build the method, train on the shared batches with the peak resident set measured,
//! then score the validation batches.

use std::path::Path;
use std::time::Instant;

use anyhow::{Result, bail};
use candle_core::{DType, Device};
use petl_crds::{MethodSpec, MethodType};
use petl_trainer::data::Batch;
use petl_trainer::memory;
use petl_trainer::methods::{self, Method};
use petl_trainer::models::bert::Bert;
use petl_trainer::models::vit::Vit;
use petl_trainer::optim::AdamW;
use petl_trainer::train::{self, TrainConfig, Trainer};

use crate::batches::Batches;
use crate::images;
use crate::peak_rss::PeakRss;
use crate::report::{self, Measured};

/// MiniLM on the token batches file: see [`train_and_score`].
pub fn run(method: &str, model: &Path, batches: &Path, lr: f64, phases: bool) -> Result<Measured> {
    let raw = Batches::read(batches)?;
    let (train, valid) = raw.to_candle()?;
    let num_labels = raw.num_labels;
    drop(raw);
    let backbone = Bert::load(model, DType::F32, &Device::Cpu)?;
    let method_impl = methods::for_bert(&config(method)?, backbone, num_labels, 42)?;
    train_and_score(method, method_impl, &train, &valid, lr, phases)
}

/// The ViT (`Vit::load` of the ONNX file, as `petl run` loads it) on the image batches file, with
/// the method settings of the example job `settings` when given (else the method's defaults): see
/// [`train_and_score`].
pub fn run_vit(
    method: &str,
    onnx: &Path,
    settings: Option<&Path>,
    batches: &Path,
    lr: f64,
    phases: bool,
) -> Result<Measured> {
    let config = match settings {
        Some(job) => {
            let (_, spec) = petl_trainer::cli::load_job(job)?;
            if spec.method.type_ != method.parse::<MethodType>()? {
                bail!("{} is not a {method} job", job.display());
            }
            spec.method.config()
        }
        None => config(method)?,
    };
    let (train, valid, num_labels) = images::read_batches(batches)?;
    let backbone = Vit::load(onnx, DType::F32, &Device::Cpu)?;
    let method_impl = methods::build(&config, Box::new(backbone), num_labels, 42)?;
    train_and_score(method, method_impl, &train, &valid, lr, phases)
}

/// Each method's defaults (LoRA: rank 8, alpha 16, query and value, no dropout: what peer.py
/// gives PEFT); a new method in the registry is benchmarked without an edit here.
fn config(method: &str) -> Result<petl_crds::MethodConfig> {
    Ok(MethodSpec::of_type(method.parse::<MethodType>()?).config())
}

/// Trains on every training batch and scores the validation ones. With `phases`, the step is
/// taken apart (forward, backward, optimiser) and timed per part instead of through
/// `Trainer::train_step`; for profiling only, the table's step times come from `train_step`.
fn train_and_score(
    method: &str,
    method_impl: Box<dyn Method>,
    train: &[Batch],
    valid: &[Batch],
    lr: f64,
    phases: bool,
) -> Result<Measured> {
    let trainable = method_impl.trainable_parameters();
    let mut trainer = Trainer::new(
        method_impl,
        TrainConfig::fixed_steps(train.len() as u64, lr, 42),
    );

    let rss = PeakRss::start()?;
    let base_heap = memory::current_bytes();
    memory::reset_peak();
    let (mut times, mut losses) = (Vec::new(), Vec::new());
    let mut phases = phases.then(|| Phases::new(trainer.method()));
    for batch in train {
        let start = Instant::now();
        let loss = match phases.as_mut() {
            Some(p) => p.step(trainer.method(), batch, lr)?,
            None => trainer.train_step(batch, lr)?.0,
        };
        times.push(start.elapsed().as_secs_f64());
        losses.push(loss);
    }
    let peak_rss = rss.delta_bytes()?;
    let peak_heap = memory::peak_bytes() as i64 - base_heap as i64;
    let eval = trainer.evaluate(valid)?;
    Ok(Measured {
        side: "ours".into(),
        method: method.into(),
        threads: candle_core::utils::get_num_threads(),
        trainable,
        steps: times.len(),
        peak_rss_delta_bytes: peak_rss,
        peak_heap_delta_bytes: Some(peak_heap),
        step_seconds: report::steady_mean(&times),
        first_step_seconds: times.first().copied().unwrap_or(f64::NAN),
        final_loss: losses.last().copied().unwrap_or(f64::NAN),
        valid_accuracy: eval.accuracy.unwrap_or(f64::NAN),
        phase_seconds: phases.map(|p| p.means()),
        pooled_max_abs_diff: None,
    })
}

/// `Trainer::train_step` in its three parts, each timed: forward with the loss, backward, and
/// AdamW with clipping (an optimiser of its own over the same `Var`s; the trainer's stays unused).
struct Phases {
    optimizer: AdamW,
    seconds: Vec<[f64; 3]>,
}

impl Phases {
    fn new(method: &dyn Method) -> Self {
        Self {
            optimizer: AdamW::new(method.parameters(), 0.0),
            seconds: Vec::new(),
        }
    }

    fn step(&mut self, method: &dyn Method, batch: &Batch, lr: f64) -> Result<f64> {
        method.set_training(true);
        let t0 = Instant::now();
        let logits = method.forward(&batch.input_ids, &batch.attention_mask)?;
        let loss = train::loss(&logits, &batch.labels)?;
        drop(logits);
        let value = loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        let t1 = Instant::now();
        let grads = loss.backward()?;
        drop(loss);
        let t2 = Instant::now();
        self.optimizer.step(&grads, lr, 1.0)?;
        let t3 = Instant::now();
        self.seconds
            .push([t1 - t0, t2 - t1, t3 - t2].map(|d| d.as_secs_f64()));
        Ok(value)
    }

    /// Mean seconds per part over steps 2..N (as the step time).
    fn means(&self) -> [f64; 3] {
        [0, 1, 2]
            .map(|i| report::steady_mean(&self.seconds.iter().map(|s| s[i]).collect::<Vec<_>>()))
    }
}
