//! The command lines: `petl-trainer train --config <job>` (what worker pods run) and
//! `petl run <job>` (a PetlJob on this machine, no Kubernetes); parsing, job loading, exit codes.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand, ValueEnum};
use petl_crds::{PetlJob, PetlJobSpec, exit_code};

use crate::device::DeviceChoice;
use crate::progress::{Display, init_logging};
use crate::run::{RunOptions, run_job};
use crate::{Error, Result};

/// `petl`: run PetlJobs without a cluster.
#[derive(Debug, Parser)]
#[command(
    name = "petl",
    version,
    about = "Parameter- and memory-efficient fine-tuning jobs"
)]
pub struct PetlCli {
    #[command(subcommand)]
    pub command: PetlCommand,
}

#[derive(Debug, Subcommand)]
pub enum PetlCommand {
    /// Run a PetlJob on this machine (one rank) and write the adapter and manifest to
    /// spec.output.uri (or --output).
    Run {
        /// The PetlJob manifest (YAML), as you would `kubectl apply` it.
        job: PathBuf,
        /// Write the adapter here instead of spec.output.uri: a local path (relative to the
        /// working directory, `~` for home), file:///abs or pvc://claim/path.
        #[arg(long)]
        output: Option<String>,
        #[command(flatten)]
        common: CommonArgs,
    },
}

/// `petl-trainer`: the worker process of a PetlJob.
#[derive(Debug, Parser)]
#[command(
    name = "petl-trainer",
    version,
    about = "The petl trainer (one rank of a PetlJob)"
)]
pub struct TrainerCli {
    #[command(subcommand)]
    pub command: TrainerCommand,
}

#[derive(Debug, Subcommand)]
pub enum TrainerCommand {
    /// Train one rank of the job rendered at --config.
    Train {
        /// The rendered job: a whole PetlJob, or only its spec.
        #[arg(long, env = "PETL_CONFIG")]
        config: PathBuf,
        /// This worker's rank.
        #[arg(long, env = "PETL_RANK", default_value_t = 0)]
        rank: usize,
        /// How many ranks the job has.
        #[arg(long, env = "PETL_WORLD_SIZE", default_value_t = 1)]
        world_size: usize,
        #[command(flatten)]
        common: CommonArgs,
    },
}

/// Options both binaries share.
#[derive(Debug, Args)]
pub struct CommonArgs {
    /// Serve Prometheus metrics at http://<addr>/metrics (e.g. 127.0.0.1:9100).
    #[arg(long, env = "PETL_METRICS_ADDR")]
    pub metrics_addr: Option<SocketAddr>,
    /// Log line format; with `text` a terminal also gets a progress bar.
    #[arg(long, env = "PETL_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Where to train: auto (a CUDA GPU in a `cuda` build when one answers, else the CPU),
    /// cpu, cuda or cuda:N.
    #[arg(long, env = "PETL_DEVICE", default_value_t = DeviceChoice::Auto)]
    pub device: DeviceChoice,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// The `petl` binary's main.
pub fn petl_main() -> ExitCode {
    let cli = PetlCli::parse();
    let PetlCommand::Run {
        job,
        output,
        common,
    } = cli.command;
    init_logging(common.log_format == LogFormat::Json);
    finish(load_job(&job).and_then(|(name, spec)| {
        let options = RunOptions {
            job_name: name,
            rank: 0,
            world_size: 1,
            output_override: output,
            metrics_addr: common.metrics_addr,
            device: common.device,
            display: display(common.log_format),
        };
        run_job(&spec, &options)
    }))
}

/// The `petl-trainer` binary's main.
pub fn trainer_main() -> ExitCode {
    let cli = TrainerCli::parse();
    let TrainerCommand::Train {
        config,
        rank,
        world_size,
        common,
    } = cli.command;
    init_logging(common.log_format == LogFormat::Json);
    finish(load_job(&config).and_then(|(name, spec)| {
        let options = RunOptions {
            job_name: name,
            rank,
            world_size,
            output_override: None,
            metrics_addr: common.metrics_addr,
            device: common.device,
            display: display(common.log_format),
        };
        run_job(&spec, &options)
    }))
}

fn display(format: LogFormat) -> Display {
    match format {
        LogFormat::Text => Display::Auto,
        LogFormat::Json => Display::Logs,
    }
}

fn finish(outcome: Result<crate::run::RunOutcome>) -> ExitCode {
    match outcome {
        Ok(outcome) => {
            if let Some(artifact) = &outcome.artifact {
                println!(
                    "{}",
                    serde_json::to_string_pretty(artifact).unwrap_or_default()
                );
            }
            ExitCode::SUCCESS
        }
        Err(error) => {
            tracing::error!(error = %error, "run failed");
            eprintln!("error: {error}");
            ExitCode::from(exit_code_of(&error) as u8)
        }
    }
}

/// The exit code the operator's failure policy reads: permanent errors use the sysexits codes
/// it treats as FailJob, anything that may pass on retry uses EX_TEMPFAIL or 1.
pub fn exit_code_of(error: &Error) -> i32 {
    match error {
        Error::Job { .. } => exit_code::USAGE,
        Error::Config { .. } => exit_code::CONFIG,
        Error::Data { .. } | Error::Json { .. } => exit_code::DATA_ERROR,
        Error::Missing { .. } | Error::Weights { .. } => exit_code::NO_INPUT,
        Error::Source { message, .. }
            if message.contains("unreachable") || message.contains("pip download failed") =>
        {
            exit_code::TEMP_FAIL
        }
        Error::Source { message, .. } if message.contains("does not exist") => exit_code::NO_INPUT,
        Error::Source { .. } => exit_code::USAGE,
        _ => 1,
    }
}

/// Reads a job file: a whole PetlJob (its metadata.name names the run) or a bare spec. Fields
/// the API does not know are errors, so a typo is not silently ignored.
pub fn load_job(path: &Path) -> Result<(String, PetlJobSpec)> {
    let fail = |message: String| Error::Job {
        path: path.display().to_string(),
        message,
    };
    let text = std::fs::read_to_string(path).map_err(|e| {
        fail(format!(
            "cannot read the job file ({e}); give the path of a PetlJob YAML such as examples/lst-minilm-rotten-tomatoes.yaml"
        ))
    })?;
    let document: serde_yaml::Value =
        serde_yaml::from_str(&text).map_err(|e| fail(format!("invalid YAML: {e}")))?;
    let is_whole_job = document.get("kind").is_some() || document.get("spec").is_some();
    let name = document
        .get("metadata")
        .and_then(|m| m.get("name"))
        .and_then(|n| n.as_str())
        .unwrap_or_else(|| {
            path.file_stem()
                .and_then(|s| s.to_str())
                .unwrap_or("petl-job")
        })
        .to_string();
    let mut unknown = Vec::new();
    let spec = if is_whole_job {
        // The crds parser names a wrong apiVersion/kind; the second pass finds unknown fields.
        PetlJob::from_yaml_file(path).map_err(|e| fail(e.to_string()))?;
        let job: PetlJob =
            serde_ignored::deserialize(serde_yaml::Deserializer::from_str(&text), |p| {
                unknown.push(p.to_string())
            })
            .map_err(|e| fail(format!("not a valid PetlJob: {e}")))?;
        job.spec
    } else {
        serde_ignored::deserialize(serde_yaml::Deserializer::from_str(&text), |p| {
            unknown.push(format!("spec.{p}"))
        })
        .map_err(|e| fail(format!("not a valid PetlJob spec: {e}")))?
    };
    // Status and server-set metadata are legal in a YAML fetched from a cluster; apiVersion and
    // kind were checked by the crds parser above (the derived type reads them without serde).
    unknown.retain(|p| {
        !p.starts_with("status") && !p.starts_with("metadata") && p != "apiVersion" && p != "kind"
    });
    if !unknown.is_empty() {
        return Err(fail(format!(
            "unknown field{} {}: check the spelling against the PetlJob API (docs/trainer.md)",
            if unknown.len() > 1 { "s" } else { "" },
            unknown.join(", ")
        )));
    }
    Ok((name, spec))
}
