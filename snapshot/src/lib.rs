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
//! The trainer's whole use of the crate:
//!
//! ```no_run
//! use std::time::Duration;
//! use petl_snapshot::{Dtype, NamedTensor, Snapshot, SnapshotClient};
//!
//! let client = SnapshotClient::new("/run/petl/snapshot.sock");
//! // On start: resume from the generation all ranks agree on, if any.
//! if let Some((snapshot, tier)) = client.restore(Duration::from_secs(60))? {
//!     println!("resuming at step {} from {tier:?}", snapshot.step);
//! }
//! // Every `everySteps`: hand the trainable state over and keep training.
//! client.put(Snapshot {
//!     generation: 42,
//!     step: 42,
//!     tensors: vec![NamedTensor { name: "lora.a".into(), dtype: Dtype::F32, shape: vec![2], data: vec![0; 8] }],
//!     rng_state: vec![1, 2, 3],
//!     data_cursor: b"epoch=0;offset=1344".to_vec(),
//! });
//! # Ok::<(), petl_snapshot::Error>(())
//! ```

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

pub use agent::{AgentConfig, PeerList};
pub use agreement::{Agreement, Source};
pub use client::{SnapshotClient, Tier};
pub use codec::Layout;
pub use durable::{DirStore, DurableStore};
pub use manifest::{Dtype, NamedTensor, Snapshot};
pub use placement::Placement;

/// Every failure of this crate. Messages name the field, file or peer and, where one exists, the fix.
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
    /// A frame that breaks the wire protocol (truncated, wrong version, wrong sizes).
    #[error("protocol: {0}")]
    Protocol(String),
    /// A peer that is not of this job or does not know the job's secret.
    #[error("authentication: {0}")]
    Auth(String),
    /// The agent answered with an error or could not be reached.
    #[error("agent: {0}")]
    Agent(String),
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

/// Result with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
