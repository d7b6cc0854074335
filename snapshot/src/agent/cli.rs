//! The agent's command line, as a library: [`AgentArgs`] (every flag also read from a `PETL_*`
//! variable) and [`main_with`], so `petl-snapshot-agent` and `petl snapshot-agent` are the same.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use tokio::signal::unix::{SignalKind, signal};

use super::{AgentConfig, PeerList, run_until};
use crate::Result;
use crate::auth::Secret;
use crate::codec::{DEFAULT_STRIPE, Layout};
use crate::durable::{DirStore, DurableStore};

/// In-memory erasure-coded snapshot agent of one rank.
///
/// Derives `clap::Parser`, and so `clap::Args` too: another binary embeds it with
/// `#[command(flatten)]` or as a subcommand's arguments.
#[derive(clap::Parser, Debug, Clone)]
#[command(name = "petl-snapshot-agent", version)]
pub struct AgentArgs {
    /// This pod's rank.
    #[arg(long, env = "PETL_RANK")]
    pub rank: usize,
    /// Number of ranks in the job.
    #[arg(long, env = "PETL_WORLD_SIZE")]
    pub world_size: usize,
    /// Every rank's agent as host:port, comma-separated in rank order, or one pattern with
    /// {rank}, e.g. `myjob-worker-{rank}.myjob:7070`.
    #[arg(long, env = "PETL_SNAPSHOT_PEERS")]
    pub peers: String,
    /// Reed–Solomon data shards (k).
    #[arg(long, env = "PETL_SNAPSHOT_DATA_SHARDS", default_value_t = 2)]
    pub data_shards: usize,
    /// Reed–Solomon parity shards (m): this many ranks may be lost at once.
    #[arg(long, env = "PETL_SNAPSHOT_PARITY_SHARDS", default_value_t = 1)]
    pub parity_shards: usize,
    /// Address for peer agents.
    #[arg(long, env = "PETL_SNAPSHOT_LISTEN", default_value = "0.0.0.0:7070")]
    pub listen: SocketAddr,
    /// Unix socket the trainer connects to (on a volume shared by both containers).
    #[arg(
        long,
        env = "PETL_SNAPSHOT_SOCKET",
        default_value = "/run/petl/snapshot.sock"
    )]
    pub local_socket: PathBuf,
    /// The PetlJob's name; peers of another job are refused.
    #[arg(long, env = "PETL_JOB")]
    pub job: String,
    /// File holding the per-job secret (at least 16 bytes).
    #[arg(long, env = "PETL_SNAPSHOT_SECRET_FILE")]
    pub secret_file: PathBuf,
    /// Directory (a mounted volume) for durable checkpoints; none disables tier 3.
    #[arg(long, env = "PETL_SNAPSHOT_DURABLE_DIR")]
    pub durable_dir: Option<PathBuf>,
    /// Write a durable checkpoint of the first handoff in each span of N generations
    /// (generation / N). Generations are steps: pass snapshot.durable.everySnapshots ×
    /// snapshot.everySteps.
    #[arg(long, env = "PETL_SNAPSHOT_DURABLE_EVERY", default_value_t = 100)]
    pub durable_every: u64,
    /// Address for /metrics and /healthz.
    #[arg(long, env = "PETL_SNAPSHOT_METRICS_ADDR")]
    pub metrics_addr: Option<SocketAddr>,
    /// Bytes per shard encoded at once.
    #[arg(long, env = "PETL_SNAPSHOT_STRIPE_BYTES", default_value_t = DEFAULT_STRIPE)]
    pub stripe_bytes: usize,
    /// Largest frame accepted, in bytes.
    #[arg(long, env = "PETL_SNAPSHOT_MAX_FRAME_BYTES", default_value_t = 16 << 30)]
    pub max_frame_bytes: usize,
}

impl AgentArgs {
    /// Checks the flags and reads the secret file: what [`super::run_until`] takes.
    pub fn config(self) -> Result<AgentConfig> {
        let layout = Layout::new(self.data_shards, self.parity_shards)?;
        let peers = PeerList::parse(&self.peers).resolve(self.world_size)?;
        let secret = Secret::from_file(&self.secret_file)?;
        let durable = match &self.durable_dir {
            Some(dir) => Some(Arc::new(DirStore::new(dir, &self.job)?) as Arc<dyn DurableStore>),
            None => None,
        };
        Ok(AgentConfig {
            rank: self.rank,
            world_size: self.world_size,
            peers,
            layout,
            listen: self.listen,
            local_socket: self.local_socket,
            job: self.job,
            secret,
            durable,
            durable_every: self.durable_every,
            metrics_addr: self.metrics_addr,
            stripe: self.stripe_bytes,
            max_frame: self.max_frame_bytes,
        })
    }
}

/// Runs an agent as a whole program: logs to stderr (`RUST_LOG`, default `info`; kept if the
/// caller already set a subscriber), its own runtime, a clean stop on SIGTERM or SIGINT (the
/// commit in flight and the durable write finish). Call it outside any async runtime.
pub fn main_with(args: AgentArgs) -> ExitCode {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .try_init();
    let result = args.config().and_then(|cfg| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?
            .block_on(async {
                // Registered before serving, so a signal at any point after start is a clean stop.
                let mut term = signal(SignalKind::terminate())?;
                let mut interrupt = signal(SignalKind::interrupt())?;
                let stop = async move {
                    tokio::select! {
                        _ = term.recv() => {}
                        _ = interrupt.recv() => {}
                    }
                    tracing::info!("stopping: finishing the in-flight commit and durable write");
                };
                run_until(cfg, stop).await
            })
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("petl-snapshot-agent: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[test]
    fn every_flag_can_come_from_the_environment() {
        let command = <AgentArgs as clap::CommandFactory>::command();
        for arg in command.get_arguments() {
            let id = arg.get_id().as_str();
            if matches!(id, "help" | "version") {
                continue;
            }
            assert!(arg.get_env().is_some(), "--{id} has no PETL_* variable");
        }
    }

    #[test]
    fn flags_read_as_a_config() {
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("secret");
        std::fs::write(&secret, "a-secret-of-enough-length\n").unwrap();
        let args = AgentArgs::try_parse_from([
            "agent",
            "--rank=1",
            "--world-size=3",
            "--peers=h-{rank}:7070",
            "--data-shards=2",
            "--parity-shards=1",
            "--job=j",
            &format!("--secret-file={}", secret.display()),
            "--durable-every=7",
        ])
        .unwrap();
        let cfg = args.config().unwrap();
        assert_eq!(cfg.peers, ["h-0:7070", "h-1:7070", "h-2:7070"]);
        assert_eq!(cfg.layout, Layout::new(2, 1).unwrap());
        assert_eq!(cfg.durable_every, 7);
        assert!(cfg.durable.is_none());
    }
}
