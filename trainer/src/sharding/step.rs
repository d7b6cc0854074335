//! One optimiser step across the ranks, after backward: reduce-scatter the gradients bucket by
//! bucket, agree on the loss, the global gradient norm and the snapshot state in one exchange,
//! run AdamW on the owned pieces, and all-gather the updated pieces into every rank's `Var`s.
//!
//! Bucket traffic runs on a communication thread while this thread packs the next bucket or
//! unpacks the previous one. candle's backward hands over every gradient at once, so the
//! reduce-scatter cannot start while backward still runs; the overlap is between packing,
//! updating and sending. The sums depend on the world size alone, never on timing.

use std::sync::mpsc;

use candle_core::Tensor;
use candle_core::backprop::GradStore;

use super::exchange::{self, RankReport, StepAgreement};
use super::optimizer::{Gradients, ShardedAdamW};
use crate::collective::{Collective, CollectiveError};
use crate::{Error, Result};

/// What this rank brings to a step besides its gradients.
#[derive(Clone, Debug, Default)]
pub struct StepRequest {
    /// Mean loss of this rank's slice.
    pub loss: f64,
    pub lr: f64,
    /// Global gradient-norm limit; 0 disables clipping.
    pub max_norm: f64,
    pub snapshot_ready: bool,
    pub committed: Option<u64>,
    pub stop: bool,
    /// Digest of the parameters before this update, on the steps that check for divergence.
    pub digest: Option<[u8; 32]>,
    /// Steps completed before this one (names the step in errors).
    pub step: u64,
}

/// What every rank knows after the step.
#[derive(Clone, Debug)]
pub struct StepOutcome {
    pub agreed: StepAgreement,
    /// Global L2 norm of the gradient of the global batch, before clipping.
    pub grad_norm: f64,
}

/// Runs the optimiser step for `grads` (this rank's backward) over `group`.
pub fn step(
    opt: &mut ShardedAdamW,
    group: &mut dyn Collective,
    grads: GradStore,
    request: &StepRequest,
) -> Result<StepOutcome> {
    let world = group.world_size();
    if world != opt.world_size() || group.rank() != opt.rank() {
        return Err(Error::Internal(format!(
            "the optimiser is laid out for rank {} of {}, the group is rank {} of {world}",
            opt.rank(),
            opt.world_size(),
            group.rank()
        )));
    }
    let direct = opt.gradients(&grads);
    drop(grads);
    let has_grad: Vec<bool> = direct.iter().map(Option::is_some).collect();
    if world == 1 {
        let gradients = Gradients::Direct(&direct);
        let (outcome, constants) = agree(opt, group, &gradients, request, 1.0)?;
        for b in 0..opt.layout().buckets.len() {
            opt.update(b, &gradients, &has_grad, constants)?;
        }
        return Ok(outcome);
    }
    let pieces = reduce_scatter(opt, group, &direct)?;
    // The whole gradients are no longer needed: only the reduced pieces (1/N of them) stay.
    drop(direct);
    let gradients = Gradients::Reduced(&pieces);
    let (outcome, constants) = agree(opt, group, &gradients, request, 1.0 / world as f64)?;
    update_and_gather(opt, group, &gradients, &has_grad, constants)?;
    Ok(outcome)
}

/// The step's exchange, the global norm and clipping: the outcome and the AdamW constants, the
/// gradient scaled by `scale` (1/N for a sum over N ranks) and the clip factor.
fn agree(
    opt: &mut ShardedAdamW,
    group: &mut dyn Collective,
    gradients: &Gradients<'_>,
    request: &StepRequest,
    scale: f64,
) -> Result<(StepOutcome, crate::kernels::AdamWStep)> {
    let mut sum_of_squares = 0.0;
    for b in 0..opt.layout().buckets.len() {
        sum_of_squares += opt.sum_of_squares(b, gradients)?;
    }
    let agreed = exchange::exchange(
        group,
        &RankReport {
            loss: request.loss,
            sum_of_squares,
            snapshot_ready: request.snapshot_ready,
            committed: request.committed,
            stop: request.stop,
            digest: request.digest,
        },
        request.step,
    )?;
    let grad_norm = (agreed.sum_of_squares * scale * scale).sqrt();
    if !agreed.loss.is_finite() || !grad_norm.is_finite() {
        return Err(Error::Diverged { step: request.step });
    }
    let clip = if request.max_norm > 0.0 && grad_norm > request.max_norm {
        request.max_norm / (grad_norm + 1e-6)
    } else {
        1.0
    };
    opt.begin_update();
    let constants = opt.step_constants(request.lr, clip * scale);
    Ok((StepOutcome { agreed, grad_norm }, constants))
}

/// Packs and reduce-scatters every bucket; returns this rank's summed piece of each.
fn reduce_scatter(
    opt: &ShardedAdamW,
    group: &mut dyn Collective,
    grads: &[Option<Tensor>],
) -> Result<Vec<Tensor>> {
    let buckets = opt.layout().buckets.len();
    with_comm(
        group,
        |g, t| g.reduce_scatter_sum(t),
        |comm| {
            let mut pieces = Vec::with_capacity(buckets);
            for b in 0..buckets {
                comm.send(opt.pack_gradients(b, grads)?)?;
                // One bucket in flight while the next one is packed.
                if b >= 1 {
                    pieces.push(comm.recv()?);
                }
            }
            if buckets > 0 {
                pieces.push(comm.recv()?);
            }
            Ok(pieces)
        },
    )
}

/// Updates each owned piece and all-gathers it, unpacking bucket `b − 1` while bucket `b` is on
/// the wire.
fn update_and_gather(
    opt: &mut ShardedAdamW,
    group: &mut dyn Collective,
    gradients: &Gradients<'_>,
    has_grad: &[bool],
    constants: crate::kernels::AdamWStep,
) -> Result<()> {
    let buckets = opt.layout().buckets.len();
    with_comm(
        group,
        |g, t| g.all_gather(t),
        |comm| {
            for b in 0..buckets {
                opt.update(b, gradients, has_grad, constants)?;
                comm.send(opt.pack_owned(b)?)?;
                if b >= 1 {
                    opt.unpack(b - 1, &comm.recv()?, false)?;
                }
            }
            if buckets > 0 {
                opt.unpack(buckets - 1, &comm.recv()?, false)?;
            }
            Ok(())
        },
    )
}

/// All-gathers every owned piece of the parameters into every rank's `Var`s (after a restore,
/// when each rank holds only its own pieces).
pub fn gather_parameters(opt: &ShardedAdamW, group: &mut dyn Collective) -> Result<()> {
    let buckets = opt.layout().buckets.len();
    if group.world_size() == 1 {
        return Ok(());
    }
    with_comm(
        group,
        |g, t| g.all_gather(t),
        |comm| {
            for b in 0..buckets {
                comm.send(opt.pack_owned(b)?)?;
                if b >= 1 {
                    opt.unpack(b - 1, &comm.recv()?, false)?;
                }
            }
            if buckets > 0 {
                opt.unpack(buckets - 1, &comm.recv()?, false)?;
            }
            Ok(())
        },
    )
}

/// The two ends of the communication thread.
struct Comm {
    requests: Option<mpsc::Sender<Tensor>>,
    results: mpsc::Receiver<std::result::Result<Tensor, CollectiveError>>,
}

impl Comm {
    fn send(&mut self, t: Tensor) -> Result<()> {
        let sent = self.requests.as_ref().map(|tx| tx.send(t).is_ok());
        if sent == Some(true) {
            return Ok(());
        }
        // The thread stopped after a failure: its error is waiting.
        Err(self.failure())
    }

    fn recv(&mut self) -> Result<Tensor> {
        match self.results.recv() {
            Ok(result) => Ok(result?),
            Err(_) => Err(Error::Internal(
                "the communication thread ended early".into(),
            )),
        }
    }

    fn failure(&mut self) -> Error {
        loop {
            match self.results.recv() {
                Ok(Err(e)) => return e.into(),
                Ok(Ok(_)) => continue,
                Err(_) => {
                    return Error::Internal("the communication thread ended early".into());
                }
            }
        }
    }
}

/// Runs `body` with a communication thread that applies `op` to each sent tensor, in order.
fn with_comm<R>(
    group: &mut dyn Collective,
    op: fn(&mut dyn Collective, &Tensor) -> std::result::Result<Tensor, CollectiveError>,
    body: impl FnOnce(&mut Comm) -> Result<R>,
) -> Result<R> {
    std::thread::scope(|scope| {
        let (requests, inbox) = mpsc::channel::<Tensor>();
        let (outbox, results) = mpsc::channel();
        let worker = std::thread::Builder::new()
            .name("petl-collective".into())
            .spawn_scoped(scope, move || {
                for t in inbox {
                    let result = op(&mut *group, &t);
                    let failed = result.is_err();
                    if outbox.send(result).is_err() || failed {
                        break;
                    }
                }
            })
            .map_err(|e| Error::Internal(format!("cannot start the communication thread: {e}")))?;
        let mut comm = Comm {
            requests: Some(requests),
            results,
        };
        let out = body(&mut comm);
        comm.requests = None;
        drop(comm);
        let _ = worker.join();
        out
    })
}
