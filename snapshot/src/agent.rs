//! The snapshot agent (sidecar): takes handoffs from its trainer, keeps the local copy, encodes
//! and spreads shards, commits, holds peers' shards, serves agreement and the three restore tiers.

use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::future::join_all;
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::sync::{Notify, watch};

use crate::agreement::{self, Agreement};
use crate::auth::{self, Secret};
use crate::codec::{self, Layout, Shard};
use crate::durable::{self, DurableStore};
use crate::handoff;
use crate::manifest;
use crate::metrics::Metrics;
use crate::placement::Placement;
use crate::pool::BufferPool;
use crate::protocol::{AgentStatus, Conn, Message, ShardHeader};
use crate::store::{KEEP_COMMITTED, OwnCopy, Store};
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

/// Everything an agent needs; the binary fills it from flags.
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
        tokio::spawn(serve_metrics(agent.clone(), listener));
    }
    tokio::spawn(commit_loop(agent.clone()));
    tokio::spawn(warm_links(agent.clone()));
    tokio::spawn(accept_local(agent.clone(), local_listener));
    tokio::select! {
        result = accept_peers(agent.clone(), peer_listener) => result,
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
        status.settled =
            !self.committing.load(Ordering::SeqCst) && store.next_to_commit().is_none();
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

    fn refresh_shard_gauge(&self) {
        let held = self.store.lock().expect("store lock").shards_held();
        self.metrics.shards_held.set(held as i64);
    }

    /// One request–response to a peer on its reused link; a failed link is dropped so the
    /// next call reconnects.
    async fn call(&self, peer: usize, msg: &Message, timeout: Duration) -> Result<Message> {
        let mut link = self.links[peer].lock().await;
        let attempt = async {
            if link.is_none() {
                *link = Some(self.dial(peer).await?);
            }
            link.as_mut().expect("just dialled").call(msg).await
        };
        let result = match tokio::time::timeout(timeout, attempt).await {
            Ok(r) => r,
            Err(_) => Err(Error::Agent(format!(
                "rank {peer} ({}) did not answer within {timeout:?}",
                self.cfg.peers[peer]
            ))),
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
            .map_err(|_| Error::Agent(format!("connecting to rank {peer} at {addr} timed out")))?
            .map_err(|e| Error::Agent(format!("cannot connect to rank {peer} at {addr}: {e}")))?;
        stream.set_nodelay(true)?;
        let mut conn = Conn::new(stream, self.cfg.max_frame).with_pool(self.pool.clone());
        auth::connect(&mut conn, &self.cfg.secret, &self.cfg.job, self.rank()).await?;
        Ok(conn)
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

// ---- the trainer's side: the local socket ----

async fn accept_local(agent: Arc<Agent>, listener: UnixListener) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                tokio::spawn(serve_local(agent.clone(), stream));
            }
            Err(e) => {
                tracing::warn!(error = %e, "local accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

async fn serve_local(agent: Arc<Agent>, stream: UnixStream) {
    let mut conn = Conn::new(stream, agent.cfg.max_frame);
    loop {
        let (msg, fd) = match conn.recv_local().await {
            Ok(received) => received,
            Err(Error::Protocol(m)) if m.contains("closed mid-frame") => return,
            Err(e) => {
                tracing::warn!(error = %e, "bad frame from the trainer");
                let _ = conn
                    .send(&Message::Error {
                        message: e.to_string(),
                    })
                    .await;
                return;
            }
        };
        let reply = match handle_local(&agent, msg, fd).await {
            Ok(reply) => reply,
            Err(e) => Message::Error {
                message: e.to_string(),
            },
        };
        if conn.send(&reply).await.is_err() {
            return;
        }
    }
}

async fn handle_local(agent: &Arc<Agent>, msg: Message, fd: Option<OwnedFd>) -> Result<Message> {
    match msg {
        Message::Put { snapshot } => take_handoff(agent, snapshot, None),
        Message::PutFd { len } => {
            let fd = fd.ok_or_else(|| {
                Error::Protocol("PutFd frame without a passed memfd descriptor".into())
            })?;
            if len > agent.cfg.max_frame as u64 {
                return Err(Error::Protocol(format!(
                    "handoff of {len} bytes exceeds --max-frame-bytes {}",
                    agent.cfg.max_frame
                )));
            }
            let len = len as usize;
            let padded_len = agent.cfg.layout.padded_len(len);
            let padded =
                tokio::task::spawn_blocking(move || handoff::map_padded(fd, len, padded_len))
                    .await
                    .map_err(|e| Error::Agent(format!("handoff mapper: {e}")))??;
            take_handoff(agent, padded.slice(..len), Some(padded))
        }
        Message::Agree { timeout_ms } => {
            let agreement = agree(agent, Duration::from_millis(timeout_ms)).await?;
            Ok(Message::Agreement(agreement))
        }
        Message::Restore {
            generation,
            from_tier,
        } => {
            let (tier, snapshot) = restore(agent, generation, from_tier).await?;
            Ok(Message::Restored { tier, snapshot })
        }
        Message::WaitCommitted {
            generation,
            timeout_ms,
        } => {
            let mut rx = agent.committed.subscribe();
            let wait = rx.wait_for(|c| c.is_some_and(|c| c >= generation));
            let _ = tokio::time::timeout(Duration::from_millis(timeout_ms), wait).await;
            Ok(Message::Committed {
                newest: *agent.committed.borrow(),
            })
        }
        Message::StatusQuery => Ok(Message::Status(agent.status())),
        other => Err(Error::Protocol(format!(
            "unexpected {} on the local socket",
            kind_name(&other)
        ))),
    }
}

/// Keeps a handed-over snapshot as the newest own copy and wakes the commit pipeline.
fn take_handoff(agent: &Arc<Agent>, snapshot: Bytes, padded: Option<Bytes>) -> Result<Message> {
    let generation = manifest::peek(&snapshot)?.generation;
    tracing::debug!(generation, bytes = snapshot.len(), "handoff taken");
    agent.metrics.snapshot_bytes.set(snapshot.len() as i64);
    agent
        .store
        .lock()
        .expect("store lock")
        .put_own(generation, snapshot.clone(), padded);
    agent.publish_committed();
    agent.handoff.notify_one();
    write_durable(agent, generation, snapshot);
    let durable_every = match agent.cfg.durable {
        Some(_) => agent.cfg.durable_every.max(1),
        None => 0,
    };
    Ok(Message::PutAck {
        generation,
        durable_every,
    })
}

fn kind_name(msg: &Message) -> String {
    let debug = format!("{msg:?}");
    debug
        .split([' ', '(', '{'])
        .next()
        .unwrap_or("?")
        .to_string()
}

// ---- the commit pipeline ----

async fn commit_loop(agent: Arc<Agent>) {
    loop {
        let notified = agent.handoff.notified();
        let next = agent.store.lock().expect("store lock").next_to_commit();
        let Some((generation, copy)) = next else {
            notified.await;
            continue;
        };
        agent.committing.store(true, Ordering::SeqCst);
        if let Err(e) = commit(&agent, generation, copy).await {
            tracing::info!(generation, error = %e, "generation not committed");
        }
        agent.committing.store(false, Ordering::SeqCst);
    }
}

/// Encodes one generation, stores every shard on its holder, and commits once all acknowledged.
/// Each shard is hashed and sent on its own, so hashing one overlaps sending another and the
/// data shards (slices of the handoff) leave while the parity is still being computed.
async fn commit(agent: &Arc<Agent>, generation: u64, copy: OwnCopy) -> Result<()> {
    let layout = agent.cfg.layout;
    let original_len = copy.bytes.len();
    let shard_len = layout.shard_len(original_len);
    let stripe = agent.cfg.stripe;
    let started = Instant::now();
    let padded = match copy.padded {
        Some(padded) => padded,
        None => blocking("padding", move || codec::pad(layout, copy.bytes)).await?,
    };
    let send_one = |index: usize, data: Bytes| async move {
        let (checksum, data) =
            blocking("checksum", move || (codec::shard_checksum(&data), data)).await?;
        let header = ShardHeader {
            owner: agent.rank(),
            generation,
            index: index as u32,
            data_shards: layout.data_shards as u16,
            parity_shards: layout.parity_shards as u16,
            original_len: original_len as u64,
            checksum,
        };
        store_shard(agent, header, data).await
    };
    let data_sends = join_all(
        (0..layout.data_shards)
            .map(|i| send_one(i, padded.slice(i * shard_len..(i + 1) * shard_len))),
    );
    let parity_sends = async {
        let input = padded.clone();
        let pool = agent.pool.clone();
        let parity = blocking("encoder", move || {
            let mut parity: Vec<Vec<u8>> = (0..layout.parity_shards)
                .map(|_| pool.take(shard_len))
                .collect();
            codec::encode_parity_into(layout, &input, shard_len, stripe, &mut parity)?;
            Ok::<_, Error>(
                parity
                    .into_iter()
                    .map(|p| pool.share(p))
                    .collect::<Vec<_>>(),
            )
        })
        .await??;
        agent
            .metrics
            .encode_seconds
            .observe(started.elapsed().as_secs_f64());
        let sends = parity
            .into_iter()
            .enumerate()
            .map(|(j, p)| send_one(layout.data_shards + j, p));
        Ok::<_, Error>(join_all(sends).await)
    };
    let (data_sent, parity_sent) = futures::join!(data_sends, parity_sends);
    for result in data_sent.into_iter().chain(parity_sent?) {
        result?;
    }
    let send_s = started.elapsed().as_secs_f64();
    agent.metrics.send_seconds.observe(send_s);
    if !agent
        .store
        .lock()
        .expect("store lock")
        .commit_own(generation)
    {
        return Err(Error::Agent(format!(
            "generation {generation} was replaced while sending"
        )));
    }
    let announcing = Instant::now();
    announce_commit(agent, generation).await;
    tracing::debug!(
        generation,
        encode_and_send_ms = send_s * 1e3,
        announce_ms = announcing.elapsed().as_secs_f64() * 1e3,
        "committed"
    );
    agent.metrics.generations_committed.inc();
    agent.metrics.committed_generation.set(generation as i64);
    agent.publish_committed();
    Ok(())
}

/// Runs CPU-heavy work (hashing, Reed–Solomon) off the async workers.
async fn blocking<T: Send + 'static>(
    what: &str,
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| Error::Agent(format!("{what} thread: {e}")))
}

/// Sends one shard to its holder until acknowledged, or gives up once a newer handoff makes
/// this generation moot (a dead holder would otherwise block every later commit).
async fn store_shard(agent: &Arc<Agent>, header: ShardHeader, data: Bytes) -> Result<()> {
    let holder = agent
        .placement
        .holder(agent.cfg.rank, header.index as usize);
    if holder == agent.cfg.rank {
        agent.store.lock().expect("store lock").hold(header, data);
        agent.refresh_shard_gauge();
        return Ok(());
    }
    let msg = Message::StoreShard { header, data };
    let mut backoff = Duration::from_millis(20);
    loop {
        match agent.call(holder, &msg, CALL_TIMEOUT).await {
            Ok(Message::Ack) => return Ok(()),
            Ok(other) => tracing::warn!(
                holder,
                reply = kind_name(&other),
                "unexpected reply to a shard"
            ),
            Err(e) => tracing::debug!(holder, error = %e, "shard not stored yet"),
        }
        let superseded = agent
            .store
            .lock()
            .expect("store lock")
            .next_to_commit()
            .is_none_or(|(g, _)| g != header.generation);
        if superseded {
            return Err(Error::Agent(format!(
                "generation {} superseded while rank {holder} was unreachable",
                header.generation
            )));
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_millis(500));
    }
}

/// Tells every holder the generation is committed. Holders that miss it keep the shard as
/// pending; the agreement still counts it while some agent knows of the commit.
async fn announce_commit(agent: &Arc<Agent>, generation: u64) {
    let owner = agent.rank();
    let notices = (0..agent.cfg.layout.total()).map(|i| {
        let holder = agent.placement.holder(agent.cfg.rank, i);
        async move {
            if holder == agent.cfg.rank {
                agent
                    .store
                    .lock()
                    .expect("store lock")
                    .commit_held(owner, generation);
            } else {
                let msg = Message::Commit { owner, generation };
                let _ = agent.call(holder, &msg, NOTICE_TIMEOUT).await;
            }
        }
    });
    join_all(notices).await;
}

/// Writes the first handoff of every span of `durable_every` generations to the durable store,
/// off the commit path. Taken at handoff rather than at commit so that every rank writes the
/// same generations even when the commit pipeline skips intermediate ones.
fn write_durable(agent: &Arc<Agent>, generation: u64, bytes: Bytes) {
    if agent.cfg.durable.is_none() {
        return;
    }
    let span = generation / agent.cfg.durable_every.max(1) + 1;
    if agent.durable_span.fetch_max(span, Ordering::SeqCst) >= span {
        return;
    }
    // One slot: while the volume is slow, a newer span replaces a waiting older one.
    *agent.durable_slot.lock().expect("durable slot") = Some((generation, bytes));
    if agent.durable_busy.swap(true, Ordering::SeqCst) {
        return;
    }
    let agent = agent.clone();
    tokio::task::spawn_blocking(move || {
        loop {
            let next = agent.durable_slot.lock().expect("durable slot").take();
            let Some((generation, bytes)) = next else {
                agent.durable_busy.store(false, Ordering::SeqCst);
                // A handoff may have filled the slot after the take and before the store.
                let refilled = agent.durable_slot.lock().expect("durable slot").is_some();
                if refilled && !agent.durable_busy.swap(true, Ordering::SeqCst) {
                    continue;
                }
                return;
            };
            write_one_durable(&agent, generation, &bytes);
        }
    });
}

fn write_one_durable(agent: &Agent, generation: u64, bytes: &[u8]) {
    let store = agent.cfg.durable.as_ref().expect("checked by the caller");
    match durable::write_and_retain(
        store.as_ref(),
        agent.rank(),
        generation,
        bytes,
        KEEP_COMMITTED,
    ) {
        Ok(()) => {
            agent.metrics.durable_writes.inc();
        }
        Err(e) => {
            agent.metrics.durable_failures.inc();
            tracing::warn!(generation, error = %e, "durable checkpoint failed");
        }
    }
}

// ---- agreement and restore ----

/// Gathers every rank's status once all are reachable and settled, then decides.
async fn agree(agent: &Arc<Agent>, timeout: Duration) -> Result<Option<Agreement>> {
    let deadline = Instant::now() + timeout;
    loop {
        let queries = (0..agent.cfg.world_size).map(|r| async move {
            if r == agent.cfg.rank {
                return Ok(agent.status());
            }
            match agent.call(r, &Message::StatusQuery, NOTICE_TIMEOUT).await? {
                Message::Status(s) if s.rank as usize == r => Ok(s),
                other => Err(Error::Protocol(format!(
                    "rank {r} answered a status query with {}",
                    kind_name(&other)
                ))),
            }
        });
        let results: Vec<Result<AgentStatus>> = join_all(queries).await;
        let waiting: Vec<String> = results
            .iter()
            .enumerate()
            .filter_map(|(r, s)| match s {
                Ok(s) if s.settled => None,
                Ok(_) => Some(format!("rank {r} is still committing")),
                Err(e) => Some(format!("rank {r}: {e}")),
            })
            .collect();
        if waiting.is_empty() {
            let statuses: Vec<AgentStatus> = results.into_iter().map(|s| s.expect("ok")).collect();
            return agreement::decide(&agent.placement, &statuses);
        }
        if Instant::now() >= deadline {
            return Err(Error::Recovery(format!(
                "no agreement within {timeout:?}: {}",
                waiting.join("; ")
            )));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Returns the encoded snapshot of this rank at `generation` from the first tier at or after
/// `from_tier` that has it. The trainer verifies every checksum and asks again from the next
/// tier when they fail.
async fn restore(agent: &Arc<Agent>, generation: u64, from_tier: u8) -> Result<(u8, Bytes)> {
    roll_back_to(agent, generation).await;
    if from_tier <= 1 {
        let copy = agent
            .store
            .lock()
            .expect("store lock")
            .own(generation)
            .cloned();
        if let Some(copy) = copy.filter(|c| c.committed) {
            agent.metrics.recovered(1);
            return Ok((1, copy.bytes));
        }
    }
    let mut reasons = Vec::new();
    if from_tier <= 2 {
        match rebuild_from_peers(agent, generation).await {
            Ok(bytes) => {
                agent
                    .store
                    .lock()
                    .expect("store lock")
                    .put_own_committed(generation, bytes.clone());
                agent.publish_committed();
                agent.metrics.recovered(2);
                return Ok((2, bytes));
            }
            Err(e) => reasons.push(format!("peers: {e}")),
        }
    }
    if let Some(store) = agent.cfg.durable.clone() {
        let rank = agent.rank();
        let found = tokio::task::spawn_blocking(move || store.get(rank, generation))
            .await
            .map_err(|e| Error::Agent(format!("durable reader: {e}")))??;
        if let Some(bytes) = found {
            let bytes = Bytes::from(bytes);
            agent
                .store
                .lock()
                .expect("store lock")
                .put_own_committed(generation, bytes.clone());
            agent.publish_committed();
            agent.metrics.recovered(3);
            return Ok((3, bytes));
        }
        reasons.push("durable: not stored".into());
    } else {
        reasons.push("durable: no --durable-dir".into());
    }
    Err(Error::Recovery(format!(
        "generation {generation} of rank {}: {}",
        agent.cfg.rank,
        reasons.join("; ")
    )))
}

/// Newer generations belong to a timeline the job abandons; they must not win a later agreement.
async fn roll_back_to(agent: &Arc<Agent>, generation: u64) {
    let owner = agent.rank();
    agent
        .store
        .lock()
        .expect("store lock")
        .rollback_own(generation);
    agent.publish_committed();
    let notices = (0..agent.cfg.layout.total()).map(|i| {
        let holder = agent.placement.holder(agent.cfg.rank, i);
        async move {
            if holder == agent.cfg.rank {
                agent
                    .store
                    .lock()
                    .expect("store lock")
                    .rollback_held(owner, generation);
            } else {
                let msg = Message::Rollback { owner, generation };
                let _ = agent.call(holder, &msg, NOTICE_TIMEOUT).await;
            }
        }
    });
    join_all(notices).await;
}

/// Tier 2: fetches this rank's shards from their holders, keeps the intact ones, decodes.
/// Data shards are asked for first: when all k arrive intact no parity moves and nothing is
/// decoded; parity is fetched only for what is missing.
async fn rebuild_from_peers(agent: &Arc<Agent>, generation: u64) -> Result<Bytes> {
    let layout = agent.cfg.layout;
    let owner = agent.rank();
    let mut shards: Vec<Shard> = Vec::new();
    let mut original_len = None;
    for wave in [0..layout.data_shards, layout.data_shards..layout.total()] {
        if shards.len() >= layout.data_shards {
            break;
        }
        let fetches = wave.map(|i| fetch_shard(agent, owner, generation, i));
        for (header, data) in join_all(fetches).await.into_iter().flatten() {
            let fits = header.owner == owner
                && header.generation == generation
                && header.data_shards as usize == layout.data_shards
                && header.parity_shards as usize == layout.parity_shards
                && original_len.is_none_or(|l| l == header.original_len);
            // The digest is checked by `codec::decode` (remote shards also on receipt).
            if fits {
                original_len = Some(header.original_len);
                shards.push(Shard {
                    index: header.index as usize,
                    checksum: header.checksum,
                    data,
                });
            }
        }
    }
    let original_len = original_len.ok_or_else(|| {
        Error::Recovery(format!(
            "no intact shard of generation {generation} on any peer"
        ))
    })?;
    let stripe = agent.cfg.stripe;
    let bytes = tokio::task::spawn_blocking(move || {
        codec::decode(layout, original_len as usize, &shards, stripe)
    })
    .await
    .map_err(|e| Error::Codec(format!("decoder thread: {e}")))??;
    let manifest = manifest::peek(&bytes)?;
    if manifest.generation != generation {
        return Err(Error::Recovery(format!(
            "shards of generation {generation} decode to generation {}",
            manifest.generation
        )));
    }
    Ok(Bytes::from(bytes))
}

async fn fetch_shard(
    agent: &Arc<Agent>,
    owner: u32,
    generation: u64,
    index: usize,
) -> Option<(ShardHeader, Bytes)> {
    let holder = agent.placement.holder(agent.cfg.rank, index);
    let (header, data) = if holder == agent.cfg.rank {
        let store = agent.store.lock().expect("store lock");
        let held = store.held(owner, generation)?;
        (held.header, held.data.clone())
    } else {
        let msg = Message::FetchShard {
            owner,
            generation,
            index: index as u32,
        };
        match agent.call(holder, &msg, CALL_TIMEOUT).await {
            Ok(Message::Shard { header, data }) => (header, data),
            _ => return None,
        }
    };
    (header.index as usize == index).then_some((header, data))
}

// ---- the peers' side ----

async fn accept_peers(agent: Arc<Agent>, listener: TcpListener) -> Result<()> {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let _ = stream.set_nodelay(true);
                tokio::spawn(serve_peer(agent.clone(), stream));
            }
            Err(e) => {
                tracing::warn!(error = %e, "peer accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

async fn serve_peer(agent: Arc<Agent>, stream: TcpStream) {
    let mut conn = Conn::new(stream, agent.cfg.max_frame).with_pool(agent.pool.clone());
    let handshake = auth::accept(&mut conn, &agent.cfg.secret, &agent.cfg.job);
    let peer = match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake).await {
        Ok(Ok(rank)) if (rank as usize) < agent.cfg.world_size => rank,
        Ok(Ok(rank)) => {
            agent.metrics.rejected("rank");
            tracing::warn!(rank, "peer claims a rank outside the job");
            return;
        }
        Ok(Err(e)) => {
            agent.metrics.rejected(if matches!(e, Error::Auth(_)) {
                "auth"
            } else {
                "handshake"
            });
            tracing::warn!(error = %e, "peer handshake refused");
            return;
        }
        Err(_) => {
            agent.metrics.rejected("handshake");
            return;
        }
    };
    loop {
        let msg = match conn.recv().await {
            Ok(msg) => msg,
            Err(Error::Protocol(m)) if m.contains("closed mid-frame") => return,
            Err(e @ Error::Checksum { .. }) => {
                // A whole, authenticated frame whose shard bytes miss their digest: the link
                // is intact, only this shard is refused.
                agent.metrics.rejected("content");
                tracing::warn!(peer, error = %e, "corrupted shard from a peer");
                let reply = Message::Error {
                    message: e.to_string(),
                };
                if conn.send(&reply).await.is_err() {
                    return;
                }
                continue;
            }
            Err(e) => {
                // The link's sequence is broken after a bad frame: answer, then close.
                agent.metrics.rejected(if matches!(e, Error::Auth(_)) {
                    "mac"
                } else {
                    "frame"
                });
                tracing::warn!(peer, error = %e, "bad frame from a peer");
                let _ = conn
                    .send(&Message::Error {
                        message: e.to_string(),
                    })
                    .await;
                return;
            }
        };
        let reply = match handle_peer(&agent, peer, msg) {
            Ok(reply) => reply,
            Err(e) => {
                agent.metrics.rejected("content");
                Message::Error {
                    message: e.to_string(),
                }
            }
        };
        if conn.send(&reply).await.is_err() {
            return;
        }
    }
}

fn handle_peer(agent: &Agent, peer: u32, msg: Message) -> Result<Message> {
    match msg {
        Message::StoreShard { header, data } => {
            check_shard(agent, peer, &header, &data)?;
            agent.store.lock().expect("store lock").hold(header, data);
            agent.refresh_shard_gauge();
            Ok(Message::Ack)
        }
        Message::Commit { owner, generation } => {
            check_owner(peer, owner)?;
            agent
                .store
                .lock()
                .expect("store lock")
                .commit_held(owner, generation);
            agent.refresh_shard_gauge();
            Ok(Message::Ack)
        }
        Message::Rollback { owner, generation } => {
            check_owner(peer, owner)?;
            agent
                .store
                .lock()
                .expect("store lock")
                .rollback_held(owner, generation);
            agent.refresh_shard_gauge();
            Ok(Message::Ack)
        }
        Message::FetchShard {
            owner,
            generation,
            index,
        } => {
            let store = agent.store.lock().expect("store lock");
            Ok(match store.held(owner, generation) {
                Some(h) if h.header.index == index => Message::Shard {
                    header: h.header,
                    data: h.data.clone(),
                },
                _ => Message::NotFound,
            })
        }
        Message::StatusQuery => Ok(Message::Status(agent.status())),
        other => Err(Error::Protocol(format!(
            "unexpected {} on a peer link",
            kind_name(&other)
        ))),
    }
}

fn check_owner(peer: u32, owner: u32) -> Result<()> {
    if peer != owner {
        return Err(Error::Protocol(format!(
            "rank {peer} spoke for rank {owner}'s generations"
        )));
    }
    Ok(())
}

/// A shard is stored only if it is the one this agent should hold, of the job's layout, with
/// the length its header implies (its bytes were checked against its digest on receipt).
fn check_shard(agent: &Agent, peer: u32, header: &ShardHeader, data: &[u8]) -> Result<()> {
    check_owner(peer, header.owner)?;
    let layout = agent.cfg.layout;
    if header.data_shards as usize != layout.data_shards
        || header.parity_shards as usize != layout.parity_shards
    {
        return Err(Error::Protocol(format!(
            "shard of layout {}+{}, this job uses {}+{}",
            header.data_shards, header.parity_shards, layout.data_shards, layout.parity_shards
        )));
    }
    let expected = agent
        .placement
        .index_held(header.owner as usize, agent.cfg.rank);
    if expected != Some(header.index as usize) {
        return Err(Error::Protocol(format!(
            "shard {} of rank {} does not belong on rank {} (expected {expected:?})",
            header.index, header.owner, agent.cfg.rank
        )));
    }
    let shard_len = layout.shard_len(header.original_len as usize);
    if data.len() != shard_len {
        return Err(Error::Protocol(format!(
            "shard of {} bytes, an original of {} bytes makes {shard_len}-byte shards",
            data.len(),
            header.original_len
        )));
    }
    // The bytes matched `header.checksum` as they arrived (`Conn::recv` hashes bound payloads).
    Ok(())
}

// ---- health and metrics ----

async fn serve_metrics(agent: Arc<Agent>, listener: TcpListener) {
    use axum::routing::get;
    let for_metrics = agent.clone();
    let app = axum::Router::new()
        .route(
            "/metrics",
            get(move || {
                let agent = for_metrics.clone();
                async move {
                    (
                        [(
                            axum::http::header::CONTENT_TYPE,
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        )],
                        agent.metrics.render(),
                    )
                }
            }),
        )
        .route(
            "/healthz",
            get(move || {
                let agent = agent.clone();
                async move {
                    let committed = *agent.committed.borrow();
                    format!(
                        "ok rank={} committed_generation={}\n",
                        agent.cfg.rank,
                        committed.map_or("none".to_string(), |g| g.to_string())
                    )
                }
            }),
        );
    if let Err(e) = axum::serve(listener, app).await {
        tracing::warn!(error = %e, "metrics server stopped");
    }
}
