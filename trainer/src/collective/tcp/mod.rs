//! The ranks of one job on the CPU, joined by TCP in a ring: persistent links authenticated
//! with the job secret, bandwidth-optimal reduce-scatter and all-gather, prompt failure.
//!
//! Each rank dials the next rank and accepts the previous one ([`rendezvous`]); each link
//! passes a mutual challenge–response ([`handshake`]) and then carries MAC'd frames ([`link`]);
//! the operations are ring passes ([`ring`]). Any error poisons the group: its links are shut
//! down, so the failure travels around the ring, and later calls fail at once with the same
//! error. Drop the group and connect again to recover.

mod handshake;
mod link;
mod rendezvous;
mod ring;

use std::net::{SocketAddr, TcpListener};
use std::time::Duration;

use candle_core::{DType, Device, Storage, Tensor};
use petl_snapshot::auth::Secret;

use super::{Collective, CollectiveError, Result};
use ring::Ring;

pub use ring::MAX_BYTES_MESSAGE;

/// Where the ranks are and how long to wait for them.
#[derive(Clone, Debug)]
pub struct TcpConfig {
    /// This rank, in `0..peers.len()`.
    pub rank: usize,
    /// `host:port` of every rank's listener, in rank order (the world size is its length).
    /// Names are resolved on every attempt, so a headless Service's name may start resolving
    /// only after the formation began.
    pub peers: Vec<String>,
    /// The address this rank listens on (by default every interface, at the port of its own entry).
    pub listen: SocketAddr,
    /// The job's name: ranks of another job are refused.
    pub job: String,
    /// The job's secret, which every rank proves it holds.
    pub secret: Secret,
    /// How long formation may take: this rank's neighbours must have answered by then.
    pub connect_deadline: Duration,
    /// How long a peer may send nothing during an operation before it counts as lost.
    pub op_timeout: Duration,
    /// SO_SNDBUF/SO_RCVBUF for the links; `None` leaves the kernel's autotuning.
    pub socket_buffer: Option<usize>,
}

impl TcpConfig {
    /// Default connect deadline: pods of one job may start minutes apart (image pulls).
    pub const DEFAULT_CONNECT_DEADLINE: Duration = Duration::from_secs(180);
    /// Default operation timeout: longer than any rank takes between two collective calls.
    pub const DEFAULT_OP_TIMEOUT: Duration = Duration::from_secs(120);
    /// Default socket buffers: several MiB in flight per link, so one chunk of a MiB-sized
    /// bucket moves without waiting for the receiver's window.
    pub const DEFAULT_SOCKET_BUFFER: usize = 4 << 20;

    /// A configuration with the default deadlines and buffers, listening on every interface at
    /// the port of `peers[rank]`.
    pub fn new(rank: usize, peers: Vec<String>, job: &str, secret: Secret) -> Result<TcpConfig> {
        let own = peers.get(rank).ok_or_else(|| {
            CollectiveError::Usage(format!(
                "rank {rank} is outside the peer list of {} ranks",
                peers.len()
            ))
        })?;
        let port = own
            .rsplit_once(':')
            .and_then(|(_, p)| p.parse::<u16>().ok())
            .ok_or_else(|| {
                CollectiveError::Usage(format!(
                    "peer {rank} is {own:?}, expected host:port (for example job-0.job:29500)"
                ))
            })?;
        Ok(TcpConfig {
            rank,
            peers,
            listen: SocketAddr::from(([0, 0, 0, 0], port)),
            job: job.to_string(),
            secret,
            connect_deadline: Self::DEFAULT_CONNECT_DEADLINE,
            op_timeout: Self::DEFAULT_OP_TIMEOUT,
            socket_buffer: Some(Self::DEFAULT_SOCKET_BUFFER),
        })
    }

    /// Ranks in the group.
    pub fn world_size(&self) -> usize {
        self.peers.len()
    }

    fn validate(&self) -> Result<()> {
        if self.peers.is_empty() || self.rank >= self.peers.len() {
            return Err(CollectiveError::Usage(format!(
                "rank {} does not fit a peer list of {} ranks",
                self.rank,
                self.peers.len()
            )));
        }
        if self.job.is_empty() || self.job.len() > 1024 {
            return Err(CollectiveError::Usage(format!(
                "the job name must have 1 to 1024 bytes, got {}",
                self.job.len()
            )));
        }
        Ok(())
    }
}

/// A group of ranks joined by TCP. See the module documentation.
#[derive(Debug)]
pub struct TcpCollective {
    rank: usize,
    world_size: usize,
    /// `None` in a group of one rank.
    ring: Option<Ring>,
    /// The first error; every later call fails with it.
    poisoned: Option<CollectiveError>,
    /// Chunk buffers kept between reduce-scatters, so their pages are not faulted in again.
    spare: Vec<Vec<f32>>,
}

impl TcpCollective {
    /// Binds a listener for [`TcpCollective::connect_on`]: re-bindable at once after an earlier
    /// group on the same port is dropped. Bind port 0 to let the system pick a free port.
    pub fn listen(address: SocketAddr, socket_buffer: Option<usize>) -> Result<TcpListener> {
        rendezvous::listen(address, socket_buffer).map_err(|source| CollectiveError::Listen {
            address: address.to_string(),
            source,
        })
    }

    /// Listens on `config.listen` and forms the group (see [`TcpCollective::connect_on`]).
    pub fn connect(config: TcpConfig) -> Result<TcpCollective> {
        let listener = Self::listen(config.listen, config.socket_buffer)?;
        Self::connect_on(listener, config)
    }

    /// Forms the group: links to the next and the previous rank, authenticated, checked by a
    /// round over the whole ring. Returns when every rank's links stand, or fails with
    /// `PeerUnreachable` (a neighbour did not answer within the deadline), `Auth` (another job
    /// or another secret) or `Usage` (the ranks were given different peer lists).
    pub fn connect_on(listener: TcpListener, config: TcpConfig) -> Result<TcpCollective> {
        config.validate()?;
        let world_size = config.world_size();
        let ring = if world_size == 1 {
            None
        } else {
            Some(rendezvous::form(&config, listener)?)
        };
        Ok(TcpCollective {
            rank: config.rank,
            world_size,
            ring,
            poisoned: None,
            spare: Vec::new(),
        })
    }

    /// Runs one operation; its failure poisons the group and shuts the links down.
    fn guarded<T>(&mut self, op: impl FnOnce(&mut Self) -> Result<T>) -> Result<T> {
        if let Some(error) = &self.poisoned {
            return Err(error.replay());
        }
        op(self).inspect_err(|error| {
            self.poisoned = Some(error.replay());
            if let Some(ring) = &self.ring {
                ring.shutdown();
            }
        })
    }
}

impl Drop for TcpCollective {
    fn drop(&mut self) {
        if let Some(ring) = &self.ring {
            ring.shutdown();
        }
    }
}

/// Calls `f` with the elements of a 1-D f32 tensor in host memory, without a copy when the
/// tensor already lives there contiguously.
fn with_host_f32<T>(tensor: &Tensor, f: impl FnOnce(&[f32]) -> Result<T>) -> Result<T> {
    if tensor.dtype() != DType::F32 || tensor.rank() != 1 {
        return Err(CollectiveError::Usage(format!(
            "collective tensors are 1-D f32, got {:?} of shape {:?}",
            tensor.dtype(),
            tensor.dims()
        )));
    }
    if !tensor.device().is_cpu() {
        return with_host_f32(&tensor.to_device(&Device::Cpu)?, f);
    }
    let (storage, layout) = tensor.storage_and_layout();
    let (Storage::Cpu(cpu), Some((start, end))) = (&*storage, layout.contiguous_offsets()) else {
        drop(storage);
        return with_host_f32(&tensor.contiguous()?.copy()?, f);
    };
    f(&cpu.as_slice::<f32>()?[start..end])
}

/// A tensor on `like`'s device holding `values`.
fn tensor_like(values: Vec<f32>, like: &Tensor) -> Result<Tensor> {
    let len = values.len();
    let host = Tensor::from_vec(values, len, &Device::Cpu)?;
    Ok(if like.device().is_cpu() {
        host
    } else {
        host.to_device(like.device())?
    })
}

impl Collective for TcpCollective {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world_size
    }

    fn reduce_scatter_sum(&mut self, input: &Tensor) -> Result<Tensor> {
        self.guarded(|this| {
            let size = this.world_size;
            let values = with_host_f32(input, |data| {
                if data.len() % size != 0 {
                    return Err(CollectiveError::Usage(format!(
                        "reduce_scatter_sum needs a multiple of the world size ({size}) elements, got {}",
                        data.len()
                    )));
                }
                match this.ring.as_mut() {
                    Some(ring) => ring.reduce_scatter(data, &mut this.spare),
                    None => Ok(data.to_vec()),
                }
            })?;
            tensor_like(values, input)
        })
    }

    fn all_gather(&mut self, chunk: &Tensor) -> Result<Tensor> {
        self.guarded(|this| {
            let values = with_host_f32(chunk, |data| match this.ring.as_mut() {
                Some(ring) => ring.all_gather(data),
                None => Ok(data.to_vec()),
            })?;
            tensor_like(values, chunk)
        })
    }

    fn all_gather_bytes(&mut self, mine: &[u8]) -> Result<Vec<Vec<u8>>> {
        self.guarded(|this| match this.ring.as_mut() {
            Some(ring) => ring.all_gather_bytes(mine),
            None => Ok(vec![mine.to_vec()]),
        })
    }
}
