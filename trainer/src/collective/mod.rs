//! Traffic between the ranks of one job: the reduce-scatter of gradients, the all-gather of
//! updated parameters, and small exchanges (scalars, digests) — one trait, whatever the transport.
//!
//! Every operation sums or orders in a way that depends only on the world size, never on timing,
//! so the same job with the same world size produces the same bytes on every run.

#[cfg(feature = "cuda")]
pub mod nccl;
pub mod tcp;

use std::time::Duration;

use candle_core::Tensor;

#[cfg(feature = "cuda")]
pub use nccl::NcclCollective;
pub use tcp::{TcpCollective, TcpConfig};

/// Why an operation between ranks failed. The trainer's exit code and its recovery choice are
/// made from the variant, never from the message.
#[derive(Debug, thiserror::Error)]
pub enum CollectiveError {
    /// A peer did not answer within the start-up deadline (it may still be starting: retryable).
    #[error(
        "rank {rank} at {address} did not answer within {waited:?}; is its pod running and is the port reachable?"
    )]
    PeerUnreachable {
        rank: usize,
        address: String,
        waited: Duration,
    },
    /// An established link to a peer broke (the peer died or was restarted).
    #[error("the link to rank {rank} broke: {source}")]
    PeerLost {
        rank: usize,
        #[source]
        source: std::io::Error,
    },
    /// A peer sent nothing for longer than the operation deadline.
    #[error("rank {rank} sent nothing for {waited:?}")]
    Timeout { rank: usize, waited: Duration },
    /// A peer failed authentication: it is not of this job, or does not hold the job's secret.
    #[error("rank {rank} failed authentication: {reason}")]
    Auth { rank: usize, reason: String },
    /// A frame that breaks the protocol (wrong sizes, wrong sequence, a bad MAC after the handshake).
    #[error("protocol error with rank {rank}: {reason}")]
    Protocol { rank: usize, reason: String },
    /// This rank cannot listen for its peers (the address is taken or not this machine's).
    #[error("cannot listen for peers on {address}: {source}; is another process using the port?")]
    Listen {
        address: String,
        #[source]
        source: std::io::Error,
    },
    /// The ranks were given arguments that cannot work together (a caller's bug or a bad setup).
    #[error("invalid collective call: {0}")]
    Usage(String),
    /// The tensor side (copying to or from the device) failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// The NCCL library reported an error.
    #[error("NCCL: {0}")]
    Nccl(String),
}

impl CollectiveError {
    /// Whether rebuilding the group and resuming from the last snapshot can help: a peer was
    /// lost or slow, as opposed to a bug or a job misconfiguration.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            CollectiveError::PeerUnreachable { .. }
                | CollectiveError::PeerLost { .. }
                | CollectiveError::Timeout { .. }
        )
    }

    /// Whether a member of a formed group went away or went silent: the group is rebuilt and
    /// the job resumes from the last snapshot. Not a peer that never answered while the group
    /// formed: the connect deadline already waited for it, so that ends the process.
    pub fn is_peer_lost(&self) -> bool {
        matches!(
            self,
            CollectiveError::PeerLost { .. } | CollectiveError::Timeout { .. }
        )
    }

    /// A copy for later calls on a poisoned group: same variant, same fields (an I/O error's
    /// kind and message; a candle error becomes `Usage`).
    pub(crate) fn replay(&self) -> CollectiveError {
        use CollectiveError::*;
        match self {
            PeerUnreachable {
                rank,
                address,
                waited,
            } => PeerUnreachable {
                rank: *rank,
                address: address.clone(),
                waited: *waited,
            },
            PeerLost { rank, source } => PeerLost {
                rank: *rank,
                source: std::io::Error::new(source.kind(), source.to_string()),
            },
            Timeout { rank, waited } => Timeout {
                rank: *rank,
                waited: *waited,
            },
            Auth { rank, reason } => Auth {
                rank: *rank,
                reason: reason.clone(),
            },
            Protocol { rank, reason } => Protocol {
                rank: *rank,
                reason: reason.clone(),
            },
            Listen { address, source } => Listen {
                address: address.clone(),
                source: std::io::Error::new(source.kind(), source.to_string()),
            },
            Usage(why) => Usage(why.clone()),
            Candle(e) => Usage(format!("an earlier operation failed on its tensors: {e}")),
            Nccl(why) => Nccl(why.clone()),
        }
    }
}

pub type Result<T, E = CollectiveError> = std::result::Result<T, E>;

/// The operations data parallelism needs, over one group of `world_size` ranks.
///
/// Tensors are 1-D, contiguous, f32, on the rank's own device (host memory for TCP, GPU memory
/// for NCCL). Every rank calls the same operations in the same order with the same sizes.
pub trait Collective: Send {
    /// This rank, in `0..world_size`.
    fn rank(&self) -> usize;

    /// Ranks in the group.
    fn world_size(&self) -> usize;

    /// `input` holds `world_size × n` elements. Returns the `n` elements of this rank's chunk
    /// (`[rank·n, (rank+1)·n)`) summed over every rank, in an order fixed by the world size.
    fn reduce_scatter_sum(&mut self, input: &Tensor) -> Result<Tensor>;

    /// `chunk` holds `n` elements. Returns `world_size × n` elements, rank `r`'s chunk at
    /// `[r·n, (r+1)·n)`.
    fn all_gather(&mut self, chunk: &Tensor) -> Result<Tensor>;

    /// Every rank's bytes, in rank order (small messages: loss and norm scalars, digests, flags).
    fn all_gather_bytes(&mut self, mine: &[u8]) -> Result<Vec<Vec<u8>>>;

    /// Sums small f64 values over ranks, adding in rank order so every rank gets the same bits.
    fn all_reduce_sum_f64(&mut self, values: &[f64]) -> Result<Vec<f64>> {
        let mine: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        let all = self.all_gather_bytes(&mine)?;
        let mut sums = vec![0.0; values.len()];
        for (rank, bytes) in all.iter().enumerate() {
            if bytes.len() != mine.len() {
                return Err(CollectiveError::Protocol {
                    rank,
                    reason: format!(
                        "sent {} bytes for {} values, expected {}",
                        bytes.len(),
                        values.len(),
                        mine.len()
                    ),
                });
            }
            for (sum, value) in sums.iter_mut().zip(bytes.chunks_exact(8)) {
                *sum += f64::from_le_bytes(value.try_into().expect("8 bytes"));
            }
        }
        Ok(sums)
    }
}

/// The group of one rank alone: every operation is the identity, nothing is sent.
#[derive(Debug, Default)]
pub struct Solo;

impl Collective for Solo {
    fn rank(&self) -> usize {
        0
    }

    fn world_size(&self) -> usize {
        1
    }

    fn reduce_scatter_sum(&mut self, input: &Tensor) -> Result<Tensor> {
        Ok(input.clone())
    }

    fn all_gather(&mut self, chunk: &Tensor) -> Result<Tensor> {
        Ok(chunk.clone())
    }

    fn all_gather_bytes(&mut self, mine: &[u8]) -> Result<Vec<Vec<u8>>> {
        Ok(vec![mine.to_vec()])
    }
}
