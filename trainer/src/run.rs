//! Runs one rank of a PetlJob end to end: resolve the sources, load the data, join the other
//! ranks, train with the job's method (restoring and snapshotting through the agent), and (rank
//! 0) publish the adapter and its manifest to the output and the artifact as the container's
//! termination message.
//!
//! `training` drives the loop, `recovery` the (re)starts, `ranks` the group, `snapshots` the
//! agent, `report` rank 0's `/report`, `fault` injected faults.

pub mod fault;
pub mod images;
pub mod ranks;
mod recovery;
mod report;
pub mod snapshots;
mod training;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use petl_crds::{DatasetFormat, MethodType, ModelFormat, OutputFormat, PetlJobSpec};

use crate::data::image::ImageDataset;
use crate::data::{DataConfig, Dataset, Format, Task, UnknownLabels, Validation};
use crate::device::DeviceChoice;
use crate::export::{Adapter, AdapterFormat, AdapterTask, write_adapter};
use crate::manifest::{Artifact, BaseModel, Manifest, Metrics, file_entries, sha256_file};
use crate::metrics::TrainerMetrics;
use crate::progress::Display;
use crate::source::Resolver;
use crate::{Error, Result};
pub use training::{RankBatches, Trained, validation_batches};

/// How this process takes part in the job.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// `metadata.name`, recorded in the manifest; ranks of another job are refused.
    pub job_name: String,
    pub rank: usize,
    pub world_size: usize,
    /// Replaces `spec.output.uri` (`petl run --output`).
    pub output_override: Option<String>,
    pub metrics_addr: Option<SocketAddr>,
    pub display: Display,
    /// Log rank 0's step line every this many steps when there is no bar (`None`: 50 lines a
    /// run).
    pub log_every: Option<u64>,
    /// Where to train.
    pub device: DeviceChoice,
    /// The other ranks (required when `world_size > 1`).
    pub peers: Option<ranks::Peers>,
    /// This rank's snapshot agent; `None` trains without snapshots.
    pub snapshot_socket: Option<PathBuf>,
    /// How long forming the group and agreeing on a snapshot may take.
    pub connect_deadline: Duration,
    /// Where rank 0 writes the published artifact (the container's termination message).
    pub termination_log: Option<PathBuf>,
    /// A fault to inject into this rank (`petl run --kill`).
    pub fault: Option<fault::Fault>,
    /// When this process started (a replaced rank's recovery time counts from it).
    pub started: Instant,
}

impl RunOptions {
    /// One rank alone, no snapshots, logs only: what tests and benches use.
    pub fn single(job_name: &str) -> RunOptions {
        RunOptions {
            job_name: job_name.to_string(),
            rank: 0,
            world_size: 1,
            output_override: None,
            metrics_addr: None,
            display: Display::Logs,
            log_every: None,
            device: DeviceChoice::Cpu,
            peers: None,
            snapshot_socket: None,
            connect_deadline: ranks::DEFAULT_CONNECT_DEADLINE,
            termination_log: None,
            fault: None,
            started: Instant::now(),
        }
    }
}

/// What a finished rank leaves behind.
#[derive(Debug, Clone)]
pub struct RunOutcome {
    /// The published output (rank 0 only).
    pub artifact: Option<Artifact>,
    pub output_dir: Option<PathBuf>,
    pub metrics: Metrics,
}

/// The job's sources, resolved to local files.
#[derive(Debug, Clone)]
pub struct ResolvedSources {
    /// The model directory, or the GGUF file itself.
    pub model_dir: PathBuf,
    pub weights_file: PathBuf,
    /// `tokenizer.json`, or the GGUF file (its metadata carries the tokenizer).
    pub tokenizer_file: PathBuf,
    pub backbone: TextBackbone,
    pub data: DataConfig,
}

/// The text backbone a job's model files hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TextBackbone {
    /// A BERT-family encoder: a directory with config.json, model.safetensors, tokenizer.json.
    Bert,
    /// A Llama-family decoder in one GGUF file (weights block-quantized and frozen).
    Llama,
}

/// A job's sources: text (a BERT directory and a tokenised dataset) or images (a ViT and image
/// files).
enum Sources {
    Text(ResolvedSources),
    Image(images::ImageSources),
}

/// The weight file a manifest pins: the file itself, or a directory's `model.safetensors`.
fn weights_file_of(model: &Path) -> PathBuf {
    if model.is_dir() {
        model.join("model.safetensors")
    } else {
        model.to_path_buf()
    }
}

/// Resolves the model and dataset URIs and turns `spec.dataset` into a data configuration.
pub fn resolve_sources(spec: &PetlJobSpec, resolver: &Resolver) -> Result<ResolvedSources> {
    let model_dir = resolver.input(&spec.model.uri)?;
    let backbone = text_backbone(spec, &model_dir)?;
    let (weights_file, tokenizer_file) = match backbone {
        TextBackbone::Llama => (model_dir.clone(), model_dir.clone()),
        TextBackbone::Bert => (
            model_dir.join("model.safetensors"),
            model_dir.join("tokenizer.json"),
        ),
    };
    for (what, file) in [
        ("model weights", &weights_file),
        ("tokenizer", &tokenizer_file),
    ] {
        if !file.is_file() {
            return Err(Error::Missing {
                what: what.into(),
                path: file.display().to_string(),
                fix: match backbone {
                    TextBackbone::Bert => format!(
                        "spec.model.uri ({}) must name a directory with config.json, model.safetensors and tokenizer.json",
                        spec.model.uri
                    ),
                    TextBackbone::Llama => format!(
                        "spec.model.uri ({}) must name a .gguf file (spec.model.format gguf)",
                        spec.model.uri
                    ),
                },
            });
        }
    }
    let dataset = &spec.dataset;
    let validation = match &dataset.validation_uri {
        Some(uri) => Validation::File(resolver.input(uri)?),
        None => Validation::Fraction(dataset.validation_fraction),
    };
    let data = DataConfig {
        path: resolver.input(&dataset.uri)?,
        format: data_format(dataset.format)?,
        task: match dataset.task {
            petl_crds::Task::SequenceClassification => Task::SequenceClassification,
            petl_crds::Task::CausalLm => Task::CausalLm,
            petl_crds::Task::ImageClassification => return Err(image_task_unsupported()),
        },
        text_field: dataset.text_field.clone(),
        label_field: dataset.label_field.clone(),
        labels: dataset.labels.clone(),
        unknown_labels: match dataset.unknown_labels {
            petl_crds::UnknownLabels::Error => UnknownLabels::Error,
            petl_crds::UnknownLabels::Skip => UnknownLabels::Skip,
        },
        validation,
        max_sequence_length: positive(
            dataset.max_sequence_length.into(),
            "dataset.maxSequenceLength",
        )?,
        max_samples: dataset
            .max_samples
            .map(|n| positive(n, "dataset.maxSamples"))
            .transpose()?,
    };
    Ok(ResolvedSources {
        model_dir,
        weights_file,
        tokenizer_file,
        backbone,
        data,
    })
}

/// The text backbone `spec.model.format` names; `auto` reads a `.gguf` file as Llama and a
/// directory as BERT.
fn text_backbone(spec: &PetlJobSpec, model: &Path) -> Result<TextBackbone> {
    Ok(match spec.model.format {
        ModelFormat::Gguf => TextBackbone::Llama,
        ModelFormat::Safetensors => TextBackbone::Bert,
        ModelFormat::Auto if model.extension().is_some_and(|e| e == "gguf") => TextBackbone::Llama,
        ModelFormat::Auto => TextBackbone::Bert,
        ModelFormat::Onnx => {
            return Err(Error::Config {
                field: "spec.model.format".into(),
                message: "onnx holds a vision backbone, which only serves image-classification; \
                          use a safetensors directory or a gguf file for text"
                    .into(),
            });
        }
    })
}

fn data_format(format: DatasetFormat) -> Result<Option<Format>> {
    Ok(match format {
        DatasetFormat::Auto => None,
        DatasetFormat::Csv => Some(Format::Csv),
        DatasetFormat::Tsv => Some(Format::Tsv),
        DatasetFormat::Jsonl => Some(Format::Jsonl),
        DatasetFormat::Tab => Some(Format::Tab),
        DatasetFormat::Text => Some(Format::Text),
        DatasetFormat::ImageFolder | DatasetFormat::PixelCsv => {
            return Err(image_task_unsupported());
        }
    })
}

/// Text sources asked of an image job: its sources are `images::resolve`'s.
fn image_task_unsupported() -> Error {
    Error::Config {
        field: "spec.dataset.task".into(),
        message: "image-classification (formats image-folder, pixel-csv) has no tokenizer or \
                  text rows; its sources resolve through run::images::resolve"
            .into(),
    }
}

pub(crate) fn positive(value: i64, field: &str) -> Result<usize> {
    usize::try_from(value)
        .ok()
        .filter(|&v| v > 0)
        .ok_or_else(|| Error::Config {
            field: field.to_string(),
            message: format!("must be a positive number, got {value}"),
        })
}

/// The output directory: `--output` if given, else `spec.output.uri`.
pub fn output_dir(
    spec: &PetlJobSpec,
    options: &RunOptions,
    resolver: &Resolver,
) -> Result<(String, PathBuf)> {
    let uri = options
        .output_override
        .clone()
        .unwrap_or_else(|| spec.output.uri.clone());
    let dir = resolver.output(&uri)?;
    Ok((uri, dir))
}

/// Runs one rank of the job.
pub fn run_job(spec: &PetlJobSpec, options: &RunOptions) -> Result<RunOutcome> {
    let started = options.started;
    let resolver = Resolver::from_env();
    let sources = match spec.dataset.task {
        petl_crds::Task::ImageClassification => Sources::Image(images::resolve(spec, &resolver)?),
        _ => Sources::Text(resolve_sources(spec, &resolver)?),
    };
    // Resolve the output before training, so a bad output URI fails in seconds, not after it.
    let output = (options.rank == 0)
        .then(|| output_dir(spec, options, &resolver))
        .transpose()?;
    let metrics = TrainerMetrics::new();
    let serve = |train_examples: usize, validation_examples: usize| -> Result<()> {
        tracing::info!(
            job = %options.job_name,
            rank = options.rank,
            world_size = options.world_size,
            train_examples,
            validation_examples,
            "data loaded"
        );
        if let Some(addr) = options.metrics_addr {
            let bound = metrics.serve(addr)?;
            tracing::info!(%bound, "serving Prometheus metrics at /metrics");
        }
        Ok(())
    };
    // Image jobs resolve and load their own sources; the loop and publishing are shared.
    let (trained, mut trainer, examples, published_from) = match sources {
        Sources::Text(sources) => {
            let dataset = Dataset::load(&sources.data, &sources.tokenizer_file)?;
            serve(dataset.train.len(), dataset.validation.len())?;
            let (trained, trainer) = training::train(spec, options, &sources, &dataset, &metrics)?;
            let task = match sources.data.task {
                Task::SequenceClassification => AdapterTask::SequenceClassification,
                Task::CausalLm => AdapterTask::CausalLm,
            };
            let examples = (dataset.train.len(), dataset.validation.len());
            (trained, trainer, examples, (sources.weights_file, task))
        }
        Sources::Image(sources) => {
            let dataset = ImageDataset::load(&sources.data)?;
            serve(dataset.train.len(), dataset.validation.len())?;
            let (trained, trainer) = images::train(spec, options, &sources, &dataset, &metrics)?;
            let examples = (dataset.train.len(), dataset.validation.len());
            let weights = weights_file_of(&sources.model);
            (
                trained,
                trainer,
                examples,
                (weights, AdapterTask::SequenceClassification),
            )
        }
    };
    let (train_examples, validation_examples) = examples;
    let run_metrics = Metrics {
        steps: trained.steps,
        final_loss: trained.final_loss,
        eval_metric: trained.eval_metric,
        eval_metric_name: trained
            .eval_metric
            .map(|_| trained.eval_metric_name.clone()),
        train_examples,
        validation_examples,
        wall_seconds: started.elapsed().as_secs_f64(),
        samples_per_second: trained.samples_per_second,
        peak_memory_bytes: trained.peak_memory_bytes,
    };
    let published = match output {
        Some((uri, dir)) => {
            let (weights_file, task) = &published_from;
            let artifact = publish(
                spec,
                options,
                (weights_file.as_path(), *task),
                &trained,
                &run_metrics,
                &uri,
                &dir,
            )?;
            tracing::info!(uri = %artifact.uri, digest = %artifact.digest, "adapter published");
            if let Some(path) = &options.termination_log {
                let report = metrics.report.lock().ok().map(|r| r.clone());
                write_termination_message(path, &artifact, report);
            }
            Some((artifact, dir))
        }
        None => None,
    };
    // Every rank stays in the group until rank 0 has published: a rank lost while it writes can
    // still be recovered by the others.
    trainer
        .group()?
        .all_gather_bytes(&[u8::from(published.is_some())])?;
    let (artifact, output_dir) = published.unzip();
    Ok(RunOutcome {
        artifact,
        output_dir,
        metrics: run_metrics,
    })
}

/// Writes the artifact and the final report as the crds' `TerminationMessage` JSON to `path`,
/// for the operator to read from the pod's status. A failure is logged: the adapter is already
/// published.
fn write_termination_message(
    path: &Path,
    artifact: &Artifact,
    report: Option<petl_crds::report::WorkerReport>,
) {
    let artifact = petl_crds::ArtifactStatus {
        uri: artifact.uri.clone(),
        digest: artifact.digest.clone(),
        size_bytes: i64::try_from(artifact.size_bytes).unwrap_or(i64::MAX),
        trainable_parameters: i64::try_from(artifact.trainable_parameters).ok(),
        peak_memory_bytes: i64::try_from(artifact.peak_memory_bytes).ok(),
    };
    let message = petl_crds::report::TerminationMessage { artifact, report };
    let json = serde_json::to_string(&message).unwrap_or_default();
    match std::fs::write(path, json) {
        Ok(()) => {
            tracing::info!(path = %path.display(), "artifact written as the termination message")
        }
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "cannot write the termination message")
        }
    }
}

/// The termination-message path: the one given, else `/dev/termination-log` when it exists and
/// is writable (in a Kubernetes container), else none.
pub fn termination_log(given: Option<PathBuf>) -> Option<PathBuf> {
    if given.is_some() {
        return given;
    }
    let default = Path::new("/dev/termination-log");
    let writable = std::fs::OpenOptions::new()
        .append(true)
        .open(default)
        .is_ok();
    writable.then(|| default.to_path_buf())
}

/// Writes the adapter files, then the manifest that pins them.
fn publish(
    spec: &PetlJobSpec,
    options: &RunOptions,
    (weights_file, task): (&Path, AdapterTask),
    trained: &Trained,
    metrics: &Metrics,
    uri: &str,
    dir: &Path,
) -> Result<Artifact> {
    let hyperparameters = serde_json::json!({
        "method": spec.method,
        "training": spec.training,
        "maxSequenceLength": spec.dataset.max_sequence_length,
    });
    let adapter = Adapter {
        method: spec.method.type_.as_str().to_string(),
        tensors: trained.tensors.clone(),
        lora: trained.lora.clone(),
        base_model: spec.model.uri.clone(),
        task,
        head_features: trained.head_features,
        hyperparameters: hyperparameters.clone(),
    };
    let format = match spec.output.resolved_format(spec.method.type_) {
        OutputFormat::Peft if spec.method.type_ == MethodType::Lora => AdapterFormat::Peft,
        _ => AdapterFormat::Safetensors,
    };
    let files = write_adapter(dir, &adapter, format)?;
    let manifest = Manifest {
        manifest_version: 1,
        job: options.job_name.clone(),
        created_unix_seconds: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        base_model: BaseModel {
            uri: spec.model.uri.clone(),
            digest: format!("sha256:{}", sha256_file(weights_file)?),
            weights_file: weights_file
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
        },
        dataset_uri: spec.dataset.uri.clone(),
        method: adapter.method.clone(),
        hyperparameters,
        metrics: metrics.clone(),
        trainable_parameters: trained.trainable_parameters,
        peak_memory_bytes: trained.peak_memory_bytes,
        files: file_entries(dir, &files)?,
        recoveries: trained.recoveries.clone(),
    };
    manifest.write(dir, uri)
}
