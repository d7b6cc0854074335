//! Layers and functional ops on [`crate::tape`]: each computes its forward value untracked and
//! attaches one graph node whose backward keeps only what it reads.
//!
//! * layers: [`Linear`] (over a dense or a [`QuantizedWeight`], with [`LoraDelta`] and a fused
//!   [`Activation`]), [`Dropout`] (masks drawn per [`StepSeed`]), [`LayerNorm`], [`RmsNorm`],
//!   [`Rope`];
//! * functional ops: [`gelu`] and [`softmax`], [`attention`] and its [`attention_bias`],
//!   [`embedding_sum`], [`residual`] and [`scaled_residual`], [`mean_pool`], [`cross_entropy`].

use candle_core::{D, Tensor};

use crate::kernels;

mod activation;
mod attention;
mod dropout;
mod embedding;
mod linear;
mod loss;
mod norm;
mod pool;
mod residual;
mod rope;

pub use activation::{gelu, softmax};
pub use attention::{attention, attention_bias};
pub use dropout::{Dropout, StepSeed};
pub use embedding::embedding_sum;
pub use linear::{Activation, Linear, LinearWeight, LoraDelta, QuantizedWeight, WeightView};
pub use loss::cross_entropy;
pub use norm::{LayerNorm, RmsNorm};
pub use pool::mean_pool;
pub use residual::{residual, scaled_residual};
pub use rope::Rope;

/// `(..., n)` → `(rows, n)` and the leading dims to restore.
pub(crate) fn flat2(x: &Tensor) -> candle_core::Result<(Tensor, Vec<usize>)> {
    let dims = x.dims().to_vec();
    let n = *dims.last().unwrap_or(&1);
    let rows = x.elem_count() / n.max(1);
    Ok((x.reshape((rows, n))?, dims))
}

pub(crate) fn unflat(x: &Tensor, lead: &[usize]) -> candle_core::Result<Tensor> {
    let mut dims = lead[..lead.len() - 1].to_vec();
    dims.push(x.dim(D::Minus1)?);
    x.reshape(dims)
}

/// `Σ_rows x` (or `Σ_rows x⊙y`) of `(N, d)` matrices: a bias's (or a gain's) gradient.
pub(crate) fn column_sums(x: &Tensor, y: Option<&Tensor>) -> candle_core::Result<Tensor> {
    if let Some(fused) = kernels::sum_rows(x, y)? {
        return Ok(fused);
    }
    match y {
        Some(y) => (x * y)?.sum(0),
        None => x.sum(0),
    }
}
