//! The snapshot agent binary: runs next to a trainer as a native sidecar, one per rank.
//! Flags mirror the PetlJob's `snapshot` section; the job secret comes from a mounted file.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use petl_snapshot::agent::{self, AgentConfig, PeerList};
use petl_snapshot::auth::Secret;
use petl_snapshot::codec::{DEFAULT_STRIPE, Layout};
use petl_snapshot::durable::{DirStore, DurableStore};
use tokio::signal::unix::{SignalKind, signal};

/// In-memory erasure-coded snapshot agent of one rank.
#[derive(Parser, Debug)]
#[command(name = "petl-snapshot-agent", version)]
struct Args {
    /// This pod's rank.
    #[arg(long, env = "PETL_RANK")]
    rank: usize,
    /// Number of ranks in the job.
    #[arg(long, env = "PETL_WORLD_SIZE")]
    world_size: usize,
    /// Every rank's agent as host:port, comma-separated in rank order, or one pattern with
    /// {rank}, e.g. `myjob-worker-{rank}.myjob:7070`.
    #[arg(long, env = "PETL_SNAPSHOT_PEERS")]
    peers: String,
    /// Reed–Solomon data shards (k).
    #[arg(long, default_value_t = 2)]
    data_shards: usize,
    /// Reed–Solomon parity shards (m): this many ranks may be lost at once.
    #[arg(long, default_value_t = 1)]
    parity_shards: usize,
    /// Address for peer agents.
    #[arg(long, default_value = "0.0.0.0:7070")]
    listen: SocketAddr,
    /// Unix socket the trainer connects to (on a volume shared by both containers).
    #[arg(long, default_value = "/run/petl/snapshot.sock")]
    local_socket: PathBuf,
    /// The PetlJob's name; peers of another job are refused.
    #[arg(long, env = "PETL_JOB")]
    job: String,
    /// File holding the per-job secret (at least 16 bytes).
    #[arg(long)]
    secret_file: PathBuf,
    /// Directory (a mounted volume) for durable checkpoints; none disables tier 3.
    #[arg(long)]
    durable_dir: Option<PathBuf>,
    /// Write a durable checkpoint when generation % N == 0.
    #[arg(long, default_value_t = 100)]
    durable_every: u64,
    /// Address for /metrics and /healthz.
    #[arg(long)]
    metrics_addr: Option<SocketAddr>,
    /// Bytes per shard encoded at once.
    #[arg(long, default_value_t = DEFAULT_STRIPE)]
    stripe_bytes: usize,
    /// Largest frame accepted, in bytes.
    #[arg(long, default_value_t = 16 << 30)]
    max_frame_bytes: usize,
}

fn config(args: Args) -> petl_snapshot::Result<AgentConfig> {
    let layout = Layout::new(args.data_shards, args.parity_shards)?;
    let peers = PeerList::parse(&args.peers).resolve(args.world_size)?;
    let secret = Secret::from_file(&args.secret_file)?;
    let durable = match &args.durable_dir {
        Some(dir) => Some(Arc::new(DirStore::new(dir, &args.job)?) as Arc<dyn DurableStore>),
        None => None,
    };
    Ok(AgentConfig {
        rank: args.rank,
        world_size: args.world_size,
        peers,
        layout,
        listen: args.listen,
        local_socket: args.local_socket,
        job: args.job,
        secret,
        durable,
        durable_every: args.durable_every,
        metrics_addr: args.metrics_addr,
        stripe: args.stripe_bytes,
        max_frame: args.max_frame_bytes,
    })
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let result = config(Args::parse()).and_then(|cfg| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?
            .block_on(async {
                // Registered before serving, so a SIGTERM at any point after start is a clean stop.
                let mut term = signal(SignalKind::terminate())?;
                let stop = async move {
                    term.recv().await;
                    tracing::info!("SIGTERM: finishing the in-flight commit and durable write");
                };
                agent::run_until(cfg, stop).await
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
