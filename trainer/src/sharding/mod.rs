//! ZeRO-1 data parallelism: every rank holds the full parameters, but each owns one piece of
//! every bucket of them and keeps the optimiser moments of that piece alone (memory 1/N).
//!
//! A step: backward on this rank's slice of the global batch → reduce-scatter of the gradients
//! (each rank receives its pieces summed over the ranks) → one small exchange (loss, norm,
//! snapshot readiness) → AdamW on the owned pieces → all-gather of the updated pieces. [`layout`]
//! says who owns what, [`optimizer`] does the arithmetic on pieces, [`step`] moves them,
//! [`exchange`] is the per-step agreement, [`slice`] is a rank's part of a snapshot.

pub mod exchange;
pub mod layout;
pub mod optimizer;
pub mod slice;
pub mod step;
#[cfg(test)]
pub(crate) mod test_group;
#[cfg(test)]
mod tests;

pub use layout::{DEFAULT_BUCKET_ELEMS, Layout};
pub use optimizer::ShardedAdamW;
pub use step::{StepOutcome, StepRequest, gather_parameters};

use candle_core::Var;

use crate::{Result, kernels};

/// BLAKE3 of every parameter's values in order: equal on every rank while the replicas agree.
pub fn parameter_digest(params: &[(String, Var)]) -> Result<[u8; 32]> {
    let mut hasher = blake3::Hasher::new();
    for (_, var) in params {
        let t = var.as_tensor();
        let hashed = kernels::with_f32(t, |values| {
            hasher.update(bytemuck::cast_slice(values));
        });
        if hashed.is_none() {
            let values = t
                .flatten_all()?
                .to_dtype(candle_core::DType::F32)?
                .to_vec1::<f32>()?;
            hasher.update(bytemuck::cast_slice(&values));
        }
    }
    Ok(*hasher.finalize().as_bytes())
}
