//! In-memory, erasure-coded snapshots of training state: the trainer hands its state to a local
//! agent (sidecar) that keeps a copy, spreads Reed–Solomon shards to peers and recovers in tiers.
//!
//! The pieces, in data-flow order: [`manifest`] (what a snapshot is and its checksums),
//! [`client`] (the trainer's side) with its [`mailbox`] (which handoffs are sent), [`handoff`]
//! (the sealed memfd it passes), [`agent`] (the sidecar), [`codec`] (striped Reed–Solomon),
//! [`placement`] (which rank holds which shard), [`protocol`] and [`auth`] (frames on the wire),
//! [`pool`] (recycled shard buffers), [`store`] (shards and copies in memory), [`agreement`] (the
//! generation every rank resumes from), [`durable`] (the fallback on a volume), [`metrics`].
//!
//! The trainer's whole use of the crate. Data-parallel ranks must snapshot the same
//! generations (or the agreement finds none common), so a snapshot step is gated: every rank
//! asks [`SnapshotClient::ready`], the ranks AND it over their collective, and only if all are
//! ready does every rank `put` that step (generation = step). `ready` never blocks.
//!
//! ```no_run
//! use std::time::Duration;
//! use petl_snapshot::{Dtype, NamedTensor, Snapshot, SnapshotClient};
//!
//! # fn all_ranks_agree(mine: bool) -> bool { mine }
//! let client = SnapshotClient::new("/run/petl/snapshot.sock");
//! // On start: resume from the generation all ranks agree on, if any.
//! if let Some((snapshot, tier)) = client.restore(Duration::from_secs(60))? {
//!     println!("resuming at step {} from {tier:?}", snapshot.step);
//! }
//! let step = 42;
//! // Every `everySteps`: if every rank is ready, hand the trainable state over, keep training.
//! if all_ranks_agree(client.ready()) {
//!     client.put(Snapshot {
//!         generation: step,
//!         step,
//!         tensors: vec![NamedTensor { name: "lora.a".into(), dtype: Dtype::F32, shape: vec![2], data: vec![0; 8] }],
//!         rng_state: vec![1, 2, 3],
//!         data_cursor: b"epoch=0;offset=1344".to_vec(),
//!     });
//! }
//! // For the job's status: the newest committed generation, and how many losses it survives.
//! let status = client.status();
//! let generation = status.last_committed.map(|c| c.generation);
//! let tolerates = status.layout.map(|l| l.parity_shards);
//! # Ok::<(), petl_snapshot::Error>(())
//! ```
//!
//! The agent is a library too, so another binary can offer it as a subcommand (`petl
//! snapshot-agent`) and re-execute itself to run one per rank; every flag of [`AgentArgs`] also
//! reads a `PETL_*` variable:
//!
//! ```no_run
//! #[derive(clap::Subcommand)]
//! enum Command {
//!     /// The snapshot agent of one rank.
//!     SnapshotAgent(petl_snapshot::AgentArgs),
//! }
//! # fn run(command: Command) -> std::process::ExitCode {
//! match command {
//!     // Outside any async runtime: the agent runs its own.
//!     Command::SnapshotAgent(args) => petl_snapshot::agent::main_with(args),
//! }
//! # }
//! ```
//!
//! Errors are [`Error`] variants; an error the agent reports over the socket arrives as
//! [`Error::Remote`] with its [`Fault`], and [`Error::temporary`] says whether trying again later
//! may help (a peer or the agent unreachable, a timeout).

pub mod agent;
pub mod agreement;
pub mod auth;
pub mod client;
pub mod codec;
pub mod durable;
pub mod handoff;
pub mod mailbox;
pub mod manifest;
pub mod metrics;
pub mod placement;
pub mod pool;
pub mod protocol;
pub mod store;

use std::sync::Arc;
use std::time::Duration;

pub use agent::{AgentArgs, AgentConfig, PeerList};
pub use agreement::{Agreement, Source};
pub use client::{ClientStatus, CommitRecord, SnapshotClient};
pub use codec::Layout;
pub use durable::{DirStore, DurableStore};
pub use manifest::{Dtype, NamedTensor, Snapshot};
pub use placement::Placement;
pub use protocol::{Fault, ProtocolError, Tier};

/// Every failure of this crate. Messages name the field, file or peer and, where one exists, the
/// fix; callers act on the variant (and [`Error::fault`], [`Error::temporary`]), never on the text.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// k, m or the world size do not fit together.
    #[error("layout: {0}")]
    Layout(String),
    /// A snapshot's manifest or part list is malformed.
    #[error("snapshot manifest: {0}")]
    Manifest(String),
    /// Stored or received bytes do not match their checksum; they are never restored.
    #[error("checksum mismatch in {part}: the bytes are corrupted and were not used")]
    Checksum { part: String },
    /// Reed–Solomon encode or decode failed (too few shards, wrong sizes).
    #[error("erasure codec: {0}")]
    Codec(String),
    /// A frame that breaks the wire protocol; the link it came on is closed.
    #[error("protocol: {0}")]
    Protocol(#[from] ProtocolError),
    /// A well-formed request whose content this side refuses; the link stays.
    #[error("refused: {0}")]
    Rejected(#[from] Rejection),
    /// A peer that is not of this job or does not know the job's secret.
    #[error("authentication: {0}")]
    Auth(String),
    /// The other side (the agent, a peer) answered the request with an error.
    #[error("{from} answered: {message}")]
    Remote {
        from: String,
        fault: Fault,
        message: String,
    },
    /// The agent or a peer could not be reached.
    #[error("cannot reach {what}: {source}")]
    Unreachable {
        what: String,
        #[source]
        source: std::io::Error,
    },
    /// Something did not happen within its time limit; `what` says what was awaited.
    #[error("timed out after {after:?}: {what}")]
    Timeout { what: String, after: Duration },
    /// A generation that stopped being committed because a newer one was handed over (or the
    /// job rolled back past it).
    #[error(
        "generation {generation} was superseded before it committed{}",
        unreachable.map_or(String::new(), |r| format!(" (rank {r} was unreachable)"))
    )]
    Superseded {
        generation: u64,
        unreachable: Option<usize>,
    },
    /// The memfd for a handoff could not be made (the client falls back to the socket).
    #[error("snapshot handoff: {what}: {source}")]
    Handoff {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    /// The last handoff to the agent failed; reported by `SnapshotClient::flush`.
    #[error("handing the snapshot to the agent failed: {0}")]
    HandoffFailed(#[source] Arc<Error>),
    /// A worker thread (hashing, coding, file I/O) panicked or was cancelled.
    #[error("{what} thread: {source}")]
    Task {
        what: &'static str,
        #[source]
        source: tokio::task::JoinError,
    },
    /// No generation can be agreed or restored.
    #[error("recovery: {0}")]
    Recovery(String),
    /// The durable store failed on a path.
    #[error("durable store {path}: {source}")]
    Durable {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// Bad configuration (flags, secret file).
    #[error("config: {0}")]
    Config(String),
    /// A socket or file failed.
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
}

impl Error {
    /// The kind an `Error` frame carries for this error, so the receiver keeps its type.
    pub fn fault(&self) -> Fault {
        match self {
            Error::Protocol(_) => Fault::Protocol,
            Error::Rejected(_) | Error::Checksum { .. } | Error::Manifest(_) => Fault::Rejected,
            Error::Auth(_) => Fault::Auth,
            Error::Timeout { .. } => Fault::Timeout,
            Error::Unreachable { .. } => Fault::Unreachable,
            Error::Recovery(_) => Fault::Recovery,
            Error::Remote { fault, .. } => *fault,
            Error::HandoffFailed(inner) => inner.fault(),
            Error::Layout(_)
            | Error::Codec(_)
            | Error::Superseded { .. }
            | Error::Handoff { .. }
            | Error::Task { .. }
            | Error::Durable { .. }
            | Error::Config(_)
            | Error::Io(_) => Fault::Other,
        }
    }

    /// Whether trying again later may succeed: something did not answer in time or could not
    /// be reached (here or, as reported, on the agent). A trainer maps this to a temporary exit.
    pub fn temporary(&self) -> bool {
        matches!(self.fault(), Fault::Timeout | Fault::Unreachable)
    }
}

/// Why this side refused the content of a well-formed request (the link stays up).
#[derive(Debug, thiserror::Error)]
pub enum Rejection {
    /// A peer sent a shard, commit or rollback for a rank other than its own.
    #[error("rank {peer} spoke for rank {owner}'s generations")]
    NotOwner { peer: u32, owner: u32 },
    /// A shard of another layout than the job's.
    #[error(
        "shard of layout {data_shards}+{parity_shards}, this job uses {job_data_shards}+{job_parity_shards}"
    )]
    WrongLayout {
        data_shards: u16,
        parity_shards: u16,
        job_data_shards: usize,
        job_parity_shards: usize,
    },
    /// A shard that placement does not assign to this agent.
    #[error(
        "shard {index} of rank {owner} does not belong on rank {holder} (expected {expected:?})"
    )]
    Misplaced {
        index: u32,
        owner: u32,
        holder: usize,
        expected: Option<usize>,
    },
    /// A shard whose length is not the one its original length implies.
    #[error(
        "shard of {len} bytes, an original of {original_len} bytes makes {expected}-byte shards"
    )]
    ShardLength {
        len: usize,
        original_len: u64,
        expected: usize,
    },
    /// A status query answered for another rank (a wrong `--peers` entry).
    #[error("rank {asked} answered a status query as rank {answered}; check --peers")]
    StatusOfAnotherRank { asked: usize, answered: u32 },
    /// A `PutFd` without its descriptor.
    #[error("PutFd frame without a passed memfd descriptor")]
    MissingDescriptor,
    /// The passed descriptor is not a memfd that can carry seals.
    #[error(
        "the handed-over descriptor is not a sealable memfd ({source}); trainer and agent versions differ?"
    )]
    NotMemfd {
        #[source]
        source: std::io::Error,
    },
    /// The memfd could still be changed by the trainer.
    #[error(
        "the handed-over memfd is not sealed against writes and shrinking (seals {seals}); the trainer could change the snapshot after the handoff"
    )]
    NotSealed { seals: String },
    /// The memfd's size is not the length the frame announced.
    #[error("the handoff says {said} bytes, the memfd holds {holds}")]
    HandoffLength { said: usize, holds: usize },
    /// A handoff larger than the agent accepts.
    #[error("handoff of {len} bytes exceeds --max-frame-bytes {limit}")]
    HandoffTooLarge { len: u64, limit: usize },
}

/// Result with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
