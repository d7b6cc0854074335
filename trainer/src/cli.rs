//! The command lines: `petl-trainer train --config <job>` (one rank, what worker pods run) and
//! `petl run <job>` (a PetlJob on this machine, no Kubernetes; with `replicas: N` it launches N
//! ranks and N snapshot agents as processes of its own binary); parsing, job loading, exit codes.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Args, Parser, Subcommand, ValueEnum};
use petl_crds::{PetlJob, PetlJobSpec};

use crate::device::DeviceChoice;
use crate::progress::{Display, init_logging};
use crate::run::fault::Fault;
use crate::run::ranks::{DEFAULT_TRAINER_PORT, Peers};
use crate::run::{RunOptions, run_job, termination_log};
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
    /// Run a PetlJob on this machine and write the adapter and manifest to spec.output.uri (or
    /// --output). With spec.workers.replicas > 1 it starts one trainer and one snapshot agent
    /// per rank, on loopback, and restarts any that dies.
    Run {
        /// The PetlJob manifest (YAML), as you would `kubectl apply` it.
        job: PathBuf,
        /// Write the adapter here instead of spec.output.uri: a local path (relative to the
        /// working directory, `~` for home), file:///abs or pvc://claim/path.
        #[arg(long)]
        output: Option<String>,
        /// Inject a fault to watch recovery: kill rank R at the end of step S (what=trainer:
        /// its trainer; agent: its snapshot agent; both: as a lost pod). Repeatable.
        #[arg(long = "kill", value_name = "rank=R,step=S[,what=trainer|agent|both]")]
        kill: Vec<Fault>,
        #[command(flatten)]
        common: CommonArgs,
    },
    /// One rank of a job (what `petl run` starts for each rank).
    #[command(hide = true)]
    Train(Box<RankArgs>),
    /// One rank's snapshot agent (what `petl run` starts for each rank).
    #[command(hide = true)]
    SnapshotAgent(Box<crate::launch::agent::AgentArgs>),
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
    Train(Box<RankArgs>),
}

/// How one rank of a job runs: which rank, where its peers and its snapshot agent are.
#[derive(Debug, Args)]
pub struct RankArgs {
    /// The rendered job: a whole PetlJob, or only its spec.
    #[arg(long, env = "PETL_CONFIG")]
    pub config: PathBuf,
    /// This worker's rank.
    #[arg(long, env = "PETL_RANK", default_value_t = 0)]
    pub rank: usize,
    /// How many ranks the job has.
    #[arg(long, env = "PETL_WORLD_SIZE", default_value_t = 1)]
    pub world_size: usize,
    /// Every rank's trainer, comma-separated in rank order: host names (the trainer port is
    /// added) or host:port.
    #[arg(long, env = "PETL_PEERS")]
    pub peers: Option<String>,
    /// The port this trainer listens on for its peers, and the port of a peer given without one.
    #[arg(long, env = "PETL_TRAINER_PORT", default_value_t = DEFAULT_TRAINER_PORT)]
    pub port: u16,
    /// The job's name; peers of another job are refused. Default: the job file's metadata.name.
    #[arg(long, env = "PETL_JOB")]
    pub job: Option<String>,
    /// File holding the job's secret (≥ 16 bytes), shared with the snapshot agents.
    #[arg(long, env = "PETL_SNAPSHOT_TOKEN_FILE")]
    pub secret_file: Option<PathBuf>,
    /// The snapshot agent's local socket. Default: /run/petl/snapshot.sock when /run/petl
    /// exists (the volume the agent shares with the trainer), else no snapshots.
    #[arg(long, env = "PETL_SNAPSHOT_SOCKET")]
    pub snapshot_socket: Option<PathBuf>,
    /// Train without snapshots even when an agent is there.
    #[arg(long)]
    pub no_snapshots: bool,
    /// Seconds to wait for every rank when the group forms, and for the agents to agree.
    #[arg(long, env = "PETL_CONNECT_TIMEOUT", default_value_t = 180)]
    pub connect_timeout: u64,
    /// Where rank 0 writes the published artifact as JSON. Default: /dev/termination-log when
    /// it exists and is writable.
    #[arg(long, env = "PETL_TERMINATION_LOG")]
    pub termination_log: Option<PathBuf>,
    /// Write the adapter here instead of spec.output.uri.
    #[arg(long)]
    pub output: Option<String>,
    /// An injected fault (`petl run --kill` passes it on).
    #[arg(long, hide = true)]
    pub fault: Option<Fault>,
    #[command(flatten)]
    pub common: CommonArgs,
}

/// Options both binaries share.
#[derive(Debug, Args, Clone)]
pub struct CommonArgs {
    /// Serve Prometheus metrics at http://<addr>/metrics and rank 0's report at /report
    /// (e.g. 127.0.0.1:9100).
    #[arg(long, env = "PETL_METRICS_ADDR")]
    pub metrics_addr: Option<SocketAddr>,
    /// Log line format; with `text` a terminal also gets a progress bar.
    #[arg(long, env = "PETL_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Without a progress bar, log a step line every this many steps (default: 50 lines a run).
    #[arg(long, env = "PETL_LOG_EVERY")]
    pub log_every: Option<u64>,
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

impl LogFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        }
    }
}

/// The `petl` binary's main.
pub fn petl_main() -> ExitCode {
    let started = Instant::now();
    match PetlCli::parse().command {
        PetlCommand::Run {
            job,
            output,
            kill,
            common,
        } => {
            init_logging(common.log_format == LogFormat::Json);
            let code = load_job(&job).and_then(|(name, spec)| {
                if spec.workers.replicas > 1 || !kill.is_empty() {
                    return crate::launch::run_local(&job, &name, &spec, output, &kill, &common);
                }
                let options = RunOptions {
                    output_override: output,
                    metrics_addr: common.metrics_addr,
                    device: common.device,
                    display: display(common.log_format),
                    log_every: common.log_every,
                    started,
                    ..RunOptions::single(&name)
                };
                run_job(&spec, &options).map(|outcome| {
                    print_artifact(&outcome);
                    0
                })
            });
            finish_code(code)
        }
        PetlCommand::Train(args) => train_main(*args, started),
        PetlCommand::SnapshotAgent(args) => crate::launch::agent::main(*args),
    }
}

/// The `petl-trainer` binary's main.
pub fn trainer_main() -> ExitCode {
    let started = Instant::now();
    let TrainerCommand::Train(args) = TrainerCli::parse().command;
    train_main(*args, started)
}

fn train_main(args: RankArgs, started: Instant) -> ExitCode {
    init_logging(args.common.log_format == LogFormat::Json);
    let outcome = load_job(&args.config).and_then(|(name, spec)| {
        let options = rank_options(args, name, started)?;
        run_job(&spec, &options)
    });
    finish_code(outcome.map(|outcome| {
        print_artifact(&outcome);
        0
    }))
}

/// The run options of one rank from its flags and environment.
fn rank_options(args: RankArgs, job_name: String, started: Instant) -> Result<RunOptions> {
    let job_name = args.job.unwrap_or(job_name);
    let peers = match (&args.peers, &args.secret_file) {
        (Some(list), Some(secret_file)) => Some(Peers {
            addresses: Peers::addresses_from(list, args.port),
            secret_file: secret_file.clone(),
            connect_deadline: Duration::from_secs(args.connect_timeout),
        }),
        (None, _) if args.world_size <= 1 => None,
        (None, _) => {
            return Err(Error::Config {
                field: "PETL_PEERS".into(),
                message: format!(
                    "rank {} of {} needs every rank's address: set --peers or PETL_PEERS",
                    args.rank, args.world_size
                ),
            });
        }
        (Some(_), None) => {
            return Err(Error::Config {
                field: "PETL_SNAPSHOT_TOKEN_FILE".into(),
                message: "the ranks authenticate each other with the job secret: set --secret-file or PETL_SNAPSHOT_TOKEN_FILE".into(),
            });
        }
    };
    let snapshot_socket = if args.no_snapshots {
        None
    } else {
        args.snapshot_socket.or_else(|| {
            Path::new("/run/petl")
                .is_dir()
                .then(|| PathBuf::from("/run/petl/snapshot.sock"))
        })
    };
    Ok(RunOptions {
        job_name,
        rank: args.rank,
        world_size: args.world_size,
        output_override: args.output,
        metrics_addr: args.common.metrics_addr,
        display: display(args.common.log_format),
        log_every: args.common.log_every,
        device: args.common.device,
        peers,
        snapshot_socket,
        connect_deadline: Duration::from_secs(args.connect_timeout),
        termination_log: termination_log(args.termination_log),
        fault: args.fault,
        started,
    })
}

fn display(format: LogFormat) -> Display {
    match format {
        LogFormat::Text => Display::Auto,
        LogFormat::Json => Display::Logs,
    }
}

/// Prints the artifact (as the operator records it in `status.artifact`) on stdout.
fn print_artifact(outcome: &crate::run::RunOutcome) {
    if let Some(artifact) = &outcome.artifact {
        println!(
            "{}",
            serde_json::to_string_pretty(artifact).unwrap_or_default()
        );
    }
}

/// The process's exit: 0, or the error's code after printing it.
fn finish_code(outcome: Result<u8>) -> ExitCode {
    match outcome {
        Ok(code) => ExitCode::from(code),
        Err(error) => {
            tracing::error!(error = %error, exit_code = error.exit_code(), "run failed");
            eprintln!("error: {error}");
            ExitCode::from(u8::try_from(error.exit_code()).unwrap_or(1))
        }
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
