//! The snapshot agent (sidecar): takes handoffs from its trainer, keeps the local copy, encodes
//! and spreads shards, commits, holds peers' shards, serves agreement and the three restore tiers.
//!
//! One module per side of its work: [`cli`] (flags, `main_with`), `local` (the trainer's socket),
//! `commit` (encode, spread, commit), `durable_writer` (checkpoints off the commit path),
//! `agree` (gathering every rank's status), `restore` (the tiers), `peers` (serving other
//! agents), `endpoint` (/metrics and /healthz). This file holds the shared state and start-up.

mod agree;
pub mod cli;
mod commit;
mod durable_writer;
mod endpoint;
mod local;
mod peers;
mod restore;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::net::{TcpListener, TcpStream, UnixListener};
use tokio::sync::{Notify, watch};

pub use cli::{AgentArgs, main_with};

use crate::auth::{self, Secret};
use crate::codec::Layout;
use crate::durable::DurableStore;
use crate::metrics::Metrics;
use crate::placement::Placement;
use crate::pool::BufferPool;
use crate::protocol::{AgentStatus, Conn, Kind, Message, ShardHeader};
use crate::store::Store;
use crate::{Error, Result};

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
const CALL_TIMEOUT: Duration = Duration::from_secs(20);
const NOTICE_TIMEOUT: Duration = Duration::from_secs(2);

/// Where the peers' agents listen: one address per rank, or one pattern with `{rank}` (a
/// headless Service's per-pod DNS name, e.g. `job-worker-{rank}.job:7070`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PeerList {
    Explicit(Vec<String>),
    Pattern(String),
}

impl PeerList {
    pub fn parse(spec: &str) -> PeerList {
        if spec.contains("{rank}") {
            PeerList::Pattern(spec.to_string())
        } else {
            PeerList::Explicit(spec.split(',').map(|s| s.trim().to_string()).collect())
        }
    }

    /// One `host:port` per rank.
    pub fn resolve(&self, world: usize) -> Result<Vec<String>> {
        let peers = match self {
            PeerList::Pattern(p) => (0..world)
                .map(|r| p.replace("{rank}", &r.to_string()))
                .collect(),
            PeerList::Explicit(list) => list.clone(),
        };
        if peers.len() != world || peers.iter().any(|p| !p.contains(':')) {
            return Err(Error::Config(format!(
                "--peers gives {} addresses for --world-size {world}; pass one host:port per rank, comma-separated, or a pattern with {{rank}}",
                peers.len()
            )));
        }
        Ok(peers)
    }
}

/// Everything an agent needs; [`AgentArgs::config`] fills it from flags.
#[derive(Clone)]
pub struct AgentConfig {
    pub rank: usize,
    pub world_size: usize,
    /// `host:port` of every rank's agent, this one's included.
    pub peers: Vec<String>,
    pub layout: Layout,
    pub listen: SocketAddr,
    pub local_socket: PathBuf,
    pub job: String,
    pub secret: Secret,
    pub durable: Option<Arc<dyn DurableStore>>,
    /// A durable checkpoint of the first handoff in every span of this many generations
    /// (generation / durable_every), so all ranks pick the same generations.
    pub durable_every: u64,
    pub metrics_addr: Option<SocketAddr>,
    /// Bytes per shard encoded at once (see `codec::DEFAULT_STRIPE`).
    pub stripe: usize,
    /// Largest frame body accepted from an authenticated peer or the trainer.
    pub max_frame: usize,
}

/// The state shared by every task of one agent.
struct Agent {
    cfg: AgentConfig,
    placement: Placement,
    store: Mutex<Store>,
    metrics: Metrics,
    /// One outgoing connection per peer, reused; `None` until (re)connected.
    links: Vec<tokio::sync::Mutex<Option<Conn<TcpStream>>>>,
    /// Buffers of received and parity shards, reused once their generation is pruned.
    pool: Arc<BufferPool>,
    handoff: Notify,
    committing: AtomicBool,
    committed: watch::Sender<Option<u64>>,
    durable_busy: AtomicBool,
    /// 1 + (generation / durable_every) of the last durable write started; 0 before any.
    durable_span: AtomicU64,
    durable_slot: Mutex<Option<(u64, Bytes)>>,
}

/// Longest wait on shutdown for the in-flight commit and durable checkpoint, under the 30 s a
/// Kubernetes pod gets between SIGTERM and SIGKILL by default.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(25);

/// Runs the agent until the process ends.
pub async fn run(cfg: AgentConfig) -> Result<()> {
    run_until(cfg, std::future::pending()).await
}

/// Runs the agent until `shutdown` completes (SIGTERM), then lets the generation being
/// committed and the durable checkpoint being written finish before returning, so a pod stopped
/// during a write still leaves that checkpoint on the volume.
pub async fn run_until(cfg: AgentConfig, shutdown: impl Future<Output = ()>) -> Result<()> {
    let placement = Placement::new(cfg.world_size, cfg.layout)?;
    if cfg.rank >= cfg.world_size || cfg.peers.len() != cfg.world_size {
        return Err(Error::Config(format!(
            "--rank {} with --world-size {} and {} peers; rank must be below the world size",
            cfg.rank,
            cfg.world_size,
            cfg.peers.len()
        )));
    }
    let peer_listener = TcpListener::bind(cfg.listen)
        .await
        .map_err(|e| Error::Config(format!("cannot listen on {}: {e}", cfg.listen)))?;
    // A socket file left by a previous agent of this pod would make bind fail.
    let _ = std::fs::remove_file(&cfg.local_socket);
    let local_listener = UnixListener::bind(&cfg.local_socket).map_err(|e| {
        Error::Config(format!(
            "cannot bind the local socket {}: {e}",
            cfg.local_socket.display()
        ))
    })?;
    let metrics_listener =
        match cfg.metrics_addr {
            Some(addr) => Some(TcpListener::bind(addr).await.map_err(|e| {
                Error::Config(format!("cannot listen on --metrics-addr {addr}: {e}"))
            })?),
            None => None,
        };
    let agent = Arc::new(Agent {
        links: (0..cfg.world_size)
            .map(|_| tokio::sync::Mutex::new(None))
            .collect(),
        placement,
        // Room for a generation's worth of shards in and out, freed by the next prune.
        pool: BufferPool::new(2 * cfg.layout.total()),
        store: Mutex::new(Store::default()),
        metrics: Metrics::default(),
        handoff: Notify::new(),
        committing: AtomicBool::new(false),
        committed: watch::channel(None).0,
        durable_busy: AtomicBool::new(false),
        durable_span: AtomicU64::new(0),
        durable_slot: Mutex::new(None),
        cfg,
    });
    tracing::info!(rank = agent.cfg.rank, listen = %agent.cfg.listen, "snapshot agent ready");
    if let Some(listener) = metrics_listener {
        tokio::spawn(endpoint::serve(agent.clone(), listener));
    }
    tokio::spawn(commit::commit_loop(agent.clone()));
    tokio::spawn(warm_links(agent.clone()));
    tokio::spawn(local::accept(agent.clone(), local_listener));
    tokio::select! {
        result = peers::accept(agent.clone(), peer_listener) => result,
        () = shutdown => {
            drain(&agent).await;
            let _ = std::fs::remove_file(&agent.cfg.local_socket);
            Ok(())
        }
    }
}

/// Waits (bounded) until no generation is being committed and no durable write is running or
/// waiting.
async fn drain(agent: &Agent) {
    let started = Instant::now();
    let busy = || {
        agent.committing.load(Ordering::SeqCst)
            || agent.durable_busy.load(Ordering::SeqCst)
            || agent.durable_slot.lock().expect("durable slot").is_some()
    };
    while busy() && started.elapsed() < DRAIN_TIMEOUT {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tracing::info!(
        rank = agent.cfg.rank,
        waited_ms = started.elapsed().as_millis() as u64,
        finished = !busy(),
        "snapshot agent stopping"
    );
}

impl Agent {
    fn rank(&self) -> u32 {
        self.cfg.rank as u32
    }

    fn status(&self) -> AgentStatus {
        let store = self.store.lock().expect("store lock");
        let mut status = store.status(self.rank());
        status.settled = !self.committing.load(Ordering::SeqCst) && store.pending_own().is_none();
        drop(store);
        if let Some(d) = &self.cfg.durable {
            status.durable = d.list(self.rank()).unwrap_or_default();
        }
        status
    }

    /// Keeps the committed-generation watch equal to the store, also when a handoff or a
    /// restore drops generations of an abandoned timeline.
    fn publish_committed(&self) {
        let newest = self
            .store
            .lock()
            .expect("store lock")
            .newest_committed_own();
        self.committed.send_if_modified(|c| {
            let changed = *c != newest;
            *c = newest;
            changed
        });
    }

    /// Frees what the store pruned (handed-over memfds, shard buffers) on a blocking thread,
    /// outside the store lock and off the path of the request that pruned it.
    fn free_released(&self) {
        let released = self.store.lock().expect("store lock").take_released();
        if !released.is_empty() {
            tokio::task::spawn_blocking(move || drop(released));
        }
    }

    fn refresh_shard_gauge(&self) {
        let held = self.store.lock().expect("store lock").shards_held();
        self.metrics.shards_held.set(held as i64);
    }

    /// Tells every holder of this rank's shards `msg` (best effort, [`NOTICE_TIMEOUT`] each);
    /// where this agent holds a shard itself, `local` applies it to its store instead.
    async fn notify_holders(&self, msg: Message, local: impl Fn(&mut Store)) {
        let notices = (0..self.cfg.layout.total()).map(|i| {
            let holder = self.placement.holder(self.cfg.rank, i);
            let (msg, local) = (&msg, &local);
            async move {
                if holder == self.cfg.rank {
                    local(&mut self.store.lock().expect("store lock"));
                } else {
                    let _ = self.call(holder, msg, NOTICE_TIMEOUT).await;
                }
            }
        });
        futures::future::join_all(notices).await;
    }

    /// One request–response to a peer on its reused link; a failed link is dropped so the
    /// next call reconnects.
    async fn call(&self, peer: usize, msg: &Message, timeout: Duration) -> Result<Message> {
        Ok(self.request(peer, Request::Message(msg), timeout).await?.0)
    }

    /// As [`Agent::call`], for a request that may be a shard hashed while it is sent; returns
    /// the reply and, for such a shard, its digest.
    async fn request(
        &self,
        peer: usize,
        request: Request<'_>,
        timeout: Duration,
    ) -> Result<(Message, Option<[u8; 32]>)> {
        let mut link = self.links[peer].lock().await;
        let attempt = async {
            if link.is_none() {
                *link = Some(self.dial(peer).await?);
            }
            let conn = link.as_mut().expect("just dialled");
            match request {
                Request::Message(msg) => Ok((conn.call(msg).await?, None)),
                Request::HashedShard(header, data) => {
                    let digest = conn.send_shard(header, data).await?;
                    Ok((conn.recv_reply().await?, Some(digest)))
                }
            }
        };
        let result = match tokio::time::timeout(timeout, attempt).await {
            Ok(Err(Error::Remote { fault, message, .. })) => Err(Error::Remote {
                from: format!("rank {peer} ({})", self.cfg.peers[peer]),
                fault,
                message,
            }),
            Ok(r) => r,
            Err(_) => Err(Error::Timeout {
                what: format!(
                    "rank {peer} ({}) did not answer {}",
                    self.cfg.peers[peer],
                    request.kind()
                ),
                after: timeout,
            }),
        };
        if result.is_err() {
            *link = None;
        }
        result
    }

    async fn dial(&self, peer: usize) -> Result<Conn<TcpStream>> {
        let addr = &self.cfg.peers[peer];
        let stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr))
            .await
            .map_err(|_| Error::Timeout {
                what: format!("connecting to rank {peer} at {addr}"),
                after: CONNECT_TIMEOUT,
            })?
            .map_err(|source| Error::Unreachable {
                what: format!("rank {peer} at {addr}"),
                source,
            })?;
        stream.set_nodelay(true)?;
        let mut conn = Conn::new(stream, self.cfg.max_frame).with_pool(self.pool.clone());
        auth::connect(&mut conn, &self.cfg.secret, &self.cfg.job, self.rank()).await?;
        Ok(conn)
    }
}

/// What [`Agent::request`] sends.
#[derive(Clone, Copy)]
enum Request<'a> {
    Message(&'a Message),
    /// A `StoreShard` whose digest is computed while it is sent (`Conn::send_shard`); the
    /// header's own checksum is ignored.
    HashedShard(&'a ShardHeader, &'a [u8]),
}

impl Request<'_> {
    fn kind(&self) -> Kind {
        match self {
            Request::Message(msg) => msg.kind(),
            Request::HashedShard(..) => Kind::StoreShard,
        }
    }
}

/// Dials every peer once they are up, so that the first commit does not pay for connections
/// and handshakes; peers still down after a while are dialled by the first call instead.
async fn warm_links(agent: Arc<Agent>) {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut cold: Vec<usize> = (0..agent.cfg.world_size)
        .filter(|&r| r != agent.cfg.rank)
        .collect();
    while !cold.is_empty() && Instant::now() < deadline {
        let mut still = Vec::new();
        for peer in cold {
            let mut link = agent.links[peer].lock().await;
            if link.is_none() {
                match agent.dial(peer).await {
                    Ok(conn) => *link = Some(conn),
                    Err(_) => still.push(peer),
                }
            }
        }
        cold = still;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Runs CPU-heavy or blocking work (hashing, Reed–Solomon, files) off the async workers.
async fn blocking<T: Send + 'static>(
    what: &'static str,
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|source| Error::Task { what, source })
}

/// Work over at most this many bytes runs on the calling worker: under a millisecond of
/// hashing or coding costs less than handing it to a blocking thread and waking back, which on
/// a loaded machine is a scheduling delay per hop on the commit's critical path.
const INLINE_BYTES: usize = 2 << 20;

/// As [`blocking`], but inline for work over at most [`INLINE_BYTES`] bytes.
async fn cpu<T: Send + 'static>(
    what: &'static str,
    bytes: usize,
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<T> {
    if bytes <= INLINE_BYTES {
        Ok(work())
    } else {
        blocking(what, work).await
    }
}
