//! The ranks of one job on CUDA devices, joined by NCCL through cudarc: reduce-scatter and
//! all-gather run on GPU memory; the small exchanges ride on the TCP group that formed it.
//!
//! Formation: rank 0 draws NCCL's unique id and every rank receives it over the TCP group's
//! `all_gather_bytes` (authenticated with the job secret), then each rank joins the
//! communicator on its candle device's stream. The sums are NCCL's: for a fixed topology, NCCL
//! version and settings (`NCCL_ALGO`, `NCCL_PROTO`) the same inputs give the same bits. NCCL
//! reports a lost peer only through its own timeouts; a failed call poisons the group.

use candle_core::cuda::cudarc::driver::{CudaSlice, CudaView};
use candle_core::cuda::cudarc::nccl::safe::{Comm, Id, ReduceOp};
use candle_core::op::BackpropOp;
use candle_core::{CudaDevice, CudaStorage, DType, Device, Storage, Tensor};

use super::{Collective, CollectiveError, Result, TcpCollective};

/// NCCL's unique id is 128 bytes.
const ID_LEN: usize = 128;

/// A communicator that may move between threads.
struct Communicator(Comm);

// SAFETY: an NCCL communicator may be used from any host thread as long as no two calls on it
// run at once. `NcclCollective` reaches it only through `&mut self` and is not `Sync`, so calls
// are serialised; dropping it from another thread only aborts the communicator.
unsafe impl Send for Communicator {}

/// A group of ranks joined by NCCL, one CUDA device each.
pub struct NcclCollective {
    comm: Communicator,
    device: CudaDevice,
    /// Carries `all_gather_bytes` (host bytes) and kept the id's exchange authenticated.
    bootstrap: TcpCollective,
    poisoned: Option<CollectiveError>,
}

impl std::fmt::Debug for NcclCollective {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NcclCollective")
            .field("rank", &self.bootstrap.rank())
            .field("world_size", &self.bootstrap.world_size())
            .field("device", &self.device)
            .finish()
    }
}

fn nccl(what: &str, error: impl std::fmt::Debug) -> CollectiveError {
    CollectiveError::Nccl(format!("{what}: {error:?}"))
}

impl NcclCollective {
    /// Forms the NCCL communicator of `bootstrap`'s ranks on `device` (this rank's GPU).
    pub fn new(mut bootstrap: TcpCollective, device: &Device) -> Result<NcclCollective> {
        let device = device.as_cuda_device()?.clone();
        let (rank, size) = (bootstrap.rank(), bootstrap.world_size());
        let mine = if rank == 0 {
            let id = Id::new().map_err(|e| nccl("drawing the unique id", e))?;
            id.internal().iter().map(|&c| c as u8).collect()
        } else {
            Vec::new()
        };
        let ids = bootstrap.all_gather_bytes(&mine)?;
        let internal: [std::ffi::c_char; ID_LEN] = ids[0]
            .iter()
            .map(|&b| b as std::ffi::c_char)
            .collect::<Vec<_>>()
            .try_into()
            .map_err(|bytes: Vec<_>| CollectiveError::Protocol {
                rank: 0,
                reason: format!(
                    "sent an NCCL id of {} bytes, expected {ID_LEN}",
                    bytes.len()
                ),
            })?;
        let stream = device.cuda_stream();
        stream
            .context()
            .bind_to_thread()
            .map_err(|e| nccl("binding the CUDA context", e))?;
        let comm = Comm::from_rank(stream, rank, size, Id::uninit(internal))
            .map_err(|e| nccl("joining the communicator", e))?;
        Ok(NcclCollective {
            comm: Communicator(comm),
            device,
            bootstrap,
            poisoned: None,
        })
    }

    /// Runs one operation; its failure poisons the group: later calls fail at once with the
    /// same error (NCCL's communicator may be left mid-collective), as with the TCP group.
    fn guarded<T>(&mut self, op: impl FnOnce(&mut Self) -> Result<T>) -> Result<T> {
        if let Some(error) = &self.poisoned {
            return Err(error.replay());
        }
        // The trainer calls from its communication thread, not the one that formed the group:
        // cudarc's allocations and NCCL's launches need the device's context current here.
        let bound = self
            .device
            .cuda_stream()
            .context()
            .bind_to_thread()
            .map_err(|e| nccl("binding the CUDA context", e));
        bound
            .and_then(|()| op(self))
            .inspect_err(|error| self.poisoned = Some(error.replay()))
    }

    /// Runs `f` on the elements of a contiguous 1-D f32 tensor on this rank's device.
    fn with_view<T>(
        &self,
        tensor: &Tensor,
        f: impl FnOnce(&CudaView<'_, f32>) -> Result<T>,
    ) -> Result<T> {
        if tensor.dtype() != DType::F32
            || tensor.rank() != 1
            || !tensor
                .device()
                .same_device(&Device::Cuda(self.device.clone()))
        {
            return Err(CollectiveError::Usage(format!(
                "NCCL tensors are 1-D f32 on {:?}, got {:?} of shape {:?} on {:?}",
                self.device,
                tensor.dtype(),
                tensor.dims(),
                tensor.device()
            )));
        }
        let (storage, layout) = tensor.storage_and_layout();
        let (Storage::Cuda(cuda), Some((start, end))) = (&*storage, layout.contiguous_offsets())
        else {
            drop(storage);
            return self.with_view(&tensor.contiguous()?.copy()?, f);
        };
        f(&cuda.as_cuda_slice::<f32>()?.slice(start..end))
    }

    fn tensor(&self, slice: CudaSlice<f32>) -> Tensor {
        let len = slice.len();
        let storage = CudaStorage::wrap_cuda_slice(slice, self.device.clone());
        Tensor::from_storage(Storage::Cuda(storage), len, BackpropOp::none(), false)
    }
}

impl Collective for NcclCollective {
    fn rank(&self) -> usize {
        self.bootstrap.rank()
    }

    fn world_size(&self) -> usize {
        self.bootstrap.world_size()
    }

    fn reduce_scatter_sum(&mut self, input: &Tensor) -> Result<Tensor> {
        self.guarded(|this| {
            let size = this.world_size();
            let out = this.with_view(input, |view| {
                if view.len() % size != 0 {
                    return Err(CollectiveError::Usage(format!(
                        "reduce_scatter_sum needs a multiple of the world size ({size}) elements, got {}",
                        view.len()
                    )));
                }
                let mut out = this.device.alloc_zeros::<f32>(view.len() / size)?;
                this.comm
                    .0
                    .reduce_scatter(view, &mut out, &ReduceOp::Sum)
                    .map_err(|e| nccl("reduce-scatter", e))?;
                Ok(out)
            })?;
            Ok(this.tensor(out))
        })
    }

    fn all_gather(&mut self, chunk: &Tensor) -> Result<Tensor> {
        self.guarded(|this| {
            let size = this.world_size();
            let out = this.with_view(chunk, |view| {
                let mut out = this.device.alloc_zeros::<f32>(view.len() * size)?;
                this.comm
                    .0
                    .all_gather(view, &mut out)
                    .map_err(|e| nccl("all-gather", e))?;
                Ok(out)
            })?;
            Ok(this.tensor(out))
        })
    }

    fn all_gather_bytes(&mut self, mine: &[u8]) -> Result<Vec<Vec<u8>>> {
        self.guarded(|this| this.bootstrap.all_gather_bytes(mine))
    }
}
