//! What travels in frames: the wire kinds (one `#[repr(u8)]` enum, the only place their numbers
//! are written), restore tiers, error faults, shard headers, agent status, and [`Message`].

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::ProtocolError;
use crate::agreement::Agreement;

/// The kind byte of a frame: which [`Message`] its body holds. Kinds 1–13 travel between
/// agents, 20–28 only on a trainer's local socket.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Kind {
    Hello = 1,
    Challenge = 2,
    Proof = 3,
    StoreShard = 4,
    Ack = 5,
    Commit = 6,
    FetchShard = 7,
    Shard = 8,
    NotFound = 9,
    StatusQuery = 10,
    Status = 11,
    Error = 12,
    Rollback = 13,
    Put = 20,
    PutAck = 21,
    Agree = 22,
    Agreement = 23,
    Restore = 24,
    Restored = 25,
    WaitCommitted = 26,
    Committed = 27,
    PutFd = 28,
}

impl Kind {
    /// Every kind, in wire order.
    pub const ALL: [Kind; 22] = [
        Kind::Hello,
        Kind::Challenge,
        Kind::Proof,
        Kind::StoreShard,
        Kind::Ack,
        Kind::Commit,
        Kind::FetchShard,
        Kind::Shard,
        Kind::NotFound,
        Kind::StatusQuery,
        Kind::Status,
        Kind::Error,
        Kind::Rollback,
        Kind::Put,
        Kind::PutAck,
        Kind::Agree,
        Kind::Agreement,
        Kind::Restore,
        Kind::Restored,
        Kind::WaitCommitted,
        Kind::Committed,
        Kind::PutFd,
    ];
}

impl TryFrom<u8> for Kind {
    type Error = ProtocolError;

    fn try_from(byte: u8) -> Result<Kind, ProtocolError> {
        Kind::ALL
            .into_iter()
            .find(|k| *k as u8 == byte)
            .ok_or(ProtocolError::UnknownKind { kind: byte })
    }
}

impl std::fmt::Display for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self, f)
    }
}

/// Where a restored snapshot came from; tiers are tried in this order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[repr(u8)]
pub enum Tier {
    /// The local agent's copy (the trainer restarted, the agent lived).
    Local = 1,
    /// Rebuilt from k shards on peer agents (this pod was replaced).
    Peers = 2,
    /// The durable store (more than m ranks were lost).
    Durable = 3,
}

impl Tier {
    /// The tier tried after this one, if any.
    pub fn next(self) -> Option<Tier> {
        match self {
            Tier::Local => Some(Tier::Peers),
            Tier::Peers => Some(Tier::Durable),
            Tier::Durable => None,
        }
    }

    /// The tier's number, as in the `tier` label of `petl_snapshot_recoveries_total`.
    pub fn number(self) -> u8 {
        self as u8
    }
}

impl TryFrom<u8> for Tier {
    type Error = ProtocolError;

    fn try_from(byte: u8) -> Result<Tier, ProtocolError> {
        [Tier::Local, Tier::Peers, Tier::Durable]
            .into_iter()
            .find(|t| *t as u8 == byte)
            .ok_or(ProtocolError::UnknownTier { tier: byte })
    }
}

/// What kind of failure an `Error` frame reports, so that the receiver acts on a type, not on
/// the message text (see [`crate::Error::fault`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Fault {
    /// Anything without a more specific kind.
    Other = 0,
    /// The request broke the protocol.
    Protocol = 1,
    /// The request was well-formed, but its content was refused.
    Rejected = 2,
    /// Authentication failed.
    Auth = 3,
    /// Something (a peer, the agreement) did not answer in time: may succeed later.
    Timeout = 4,
    /// A peer could not be reached: may succeed later.
    Unreachable = 5,
    /// No generation can be agreed or restored.
    Recovery = 6,
}

impl Fault {
    /// Unknown codes read as `Other`: a newer peer's finer kind is still an error.
    pub fn from_code(code: u8) -> Fault {
        [
            Fault::Protocol,
            Fault::Rejected,
            Fault::Auth,
            Fault::Timeout,
            Fault::Unreachable,
            Fault::Recovery,
        ]
        .into_iter()
        .find(|f| *f as u8 == code)
        .unwrap_or(Fault::Other)
    }
}

/// Identifies one shard of one generation of one rank, and how to check it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ShardHeader {
    pub owner: u32,
    pub generation: u64,
    pub index: u32,
    pub data_shards: u16,
    pub parity_shards: u16,
    pub original_len: u64,
    /// BLAKE3 of the shard's bytes: checked at rest, and on the wire it binds the payload to
    /// the frame MAC, which then covers only the header.
    pub checksum: [u8; 32],
}

/// What one agent holds, as reported to a peer that computes the agreement.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentStatus {
    pub rank: u32,
    /// Generations of this rank's own state held as a full copy, with their commit state.
    pub own: Vec<(u64, bool)>,
    /// Shards of other ranks: (owner, generation, index, known committed).
    pub held: Vec<(u32, u64, u32, bool)>,
    /// Generations of this rank in the durable store.
    pub durable: Vec<u64>,
    /// No handoff is waiting and no generation is being encoded or sent.
    pub settled: bool,
}

/// Every message of the protocol.
#[derive(Clone, Debug, PartialEq)]
pub enum Message {
    Hello {
        job: String,
        rank: u32,
        nonce: [u8; 32],
    },
    Challenge {
        nonce: [u8; 32],
        proof: [u8; 32],
    },
    Proof {
        proof: [u8; 32],
    },
    StoreShard {
        header: ShardHeader,
        data: Bytes,
    },
    Ack,
    /// The owner saw every shard of `generation` acknowledged; newer ones it sent are void.
    Commit {
        owner: u32,
        generation: u64,
    },
    /// The owner resumes from `generation`; its newer generations are void.
    Rollback {
        owner: u32,
        generation: u64,
    },
    FetchShard {
        owner: u32,
        generation: u64,
        index: u32,
    },
    Shard {
        header: ShardHeader,
        data: Bytes,
    },
    NotFound,
    StatusQuery,
    Status(AgentStatus),
    /// The request failed; `fault` says how, `message` says why and what to do.
    Error {
        fault: Fault,
        message: String,
    },
    Put {
        snapshot: Bytes,
    },
    /// A snapshot of `len` bytes in a sealed memfd passed alongside the frame (see `handoff`).
    PutFd {
        len: u64,
    },
    PutAck {
        generation: u64,
        /// The agent's durable interval (0: no durable store), so the trainer's mailbox knows
        /// which handoffs every rank must deliver (see `mailbox`).
        durable_every: u64,
        /// The job's layout (k, m), so the trainer can report how many losses it survives.
        data_shards: u16,
        parity_shards: u16,
    },
    Agree {
        timeout_ms: u64,
    },
    Agreement(Option<Agreement>),
    /// Restore `generation` from the first tier at or after `from` that has it.
    Restore {
        generation: u64,
        from: Tier,
    },
    Restored {
        tier: Tier,
        snapshot: Bytes,
    },
    WaitCommitted {
        generation: u64,
        timeout_ms: u64,
    },
    Committed {
        /// Newest committed generation of this rank.
        newest: Option<u64>,
        /// The handed-over generation still being committed, if any: a generation neither
        /// committed nor pending will not be committed any more.
        pending: Option<u64>,
    },
}

impl Message {
    pub fn kind(&self) -> Kind {
        match self {
            Message::Hello { .. } => Kind::Hello,
            Message::Challenge { .. } => Kind::Challenge,
            Message::Proof { .. } => Kind::Proof,
            Message::StoreShard { .. } => Kind::StoreShard,
            Message::Ack => Kind::Ack,
            Message::Commit { .. } => Kind::Commit,
            Message::FetchShard { .. } => Kind::FetchShard,
            Message::Shard { .. } => Kind::Shard,
            Message::NotFound => Kind::NotFound,
            Message::StatusQuery => Kind::StatusQuery,
            Message::Status(_) => Kind::Status,
            Message::Error { .. } => Kind::Error,
            Message::Rollback { .. } => Kind::Rollback,
            Message::Put { .. } => Kind::Put,
            Message::PutAck { .. } => Kind::PutAck,
            Message::Agree { .. } => Kind::Agree,
            Message::Agreement(_) => Kind::Agreement,
            Message::Restore { .. } => Kind::Restore,
            Message::Restored { .. } => Kind::Restored,
            Message::WaitCommitted { .. } => Kind::WaitCommitted,
            Message::Committed { .. } => Kind::Committed,
            Message::PutFd { .. } => Kind::PutFd,
        }
    }

    /// An `Error` reply carrying `error`'s fault and message.
    pub fn error(error: &crate::Error) -> Message {
        Message::Error {
            fault: error.fault(),
            message: error.to_string(),
        }
    }

    /// `ProtocolError::Unexpected` for this message arriving where it does not belong.
    pub fn unexpected(&self, context: &'static str) -> ProtocolError {
        ProtocolError::Unexpected {
            got: self.kind(),
            context,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_reads_back_from_its_byte_and_no_two_share_one() {
        let mut seen = std::collections::HashSet::new();
        for kind in Kind::ALL {
            assert!(seen.insert(kind as u8), "{kind} reuses byte {}", kind as u8);
            assert_eq!(Kind::try_from(kind as u8).unwrap(), kind);
        }
    }

    #[test]
    fn an_unknown_kind_byte_is_rejected_as_such() {
        for byte in [0u8, 14, 19, 29, 255] {
            assert!(matches!(
                Kind::try_from(byte),
                Err(ProtocolError::UnknownKind { kind }) if kind == byte
            ));
        }
    }

    #[test]
    fn tiers_read_back_and_follow_each_other() {
        for tier in [Tier::Local, Tier::Peers, Tier::Durable] {
            assert_eq!(Tier::try_from(tier.number()).unwrap(), tier);
        }
        assert_eq!(Tier::Local.next(), Some(Tier::Peers));
        assert_eq!(Tier::Durable.next(), None);
        assert!(matches!(
            Tier::try_from(4),
            Err(ProtocolError::UnknownTier { tier: 4 })
        ));
    }
}
