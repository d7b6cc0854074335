//! The classification loss.

use candle_core::{DType, Tensor};

use crate::Result;
use crate::tape::{attach, tracks};

/// Mean of `-log softmax(logits)[label]` over rows whose weight is 1 (`weights` `(N,)`, 0/1;
/// all rows when `None`). `logits` `(N, C)`, `labels` `(N,)` u32. The node saves the softmax.
pub fn cross_entropy(logits: &Tensor, labels: &Tensor, weights: Option<&Tensor>) -> Result<Tensor> {
    let (n, c) = logits.dims2()?;
    let ld = logits.detach();
    let shifted = ld.broadcast_sub(&ld.max_keepdim(1)?)?;
    let logp = shifted.broadcast_sub(&shifted.exp()?.sum_keepdim(1)?.log()?)?;
    let p = logp.exp()?;
    let labels = labels.flatten_all()?.to_dtype(DType::U32)?;
    let onehot = Tensor::arange(0u32, c as u32, logits.device())?
        .reshape((1, c))?
        .broadcast_as((n, c))?
        .broadcast_eq(&labels.reshape((n, 1))?)?
        .to_dtype(ld.dtype())?;
    let w = match weights {
        Some(w) => w.flatten_all()?.to_dtype(ld.dtype())?,
        None => Tensor::ones(n, ld.dtype(), ld.device())?,
    };
    let count = w
        .sum_all()?
        .to_dtype(DType::F64)?
        .to_scalar::<f64>()?
        .max(1.0);
    let logp_label = (logp * &onehot)?.sum(1)?;
    let loss = ((logp_label * &w)?.sum_all()? * (-1.0 / count))?;
    if !tracks(logits) {
        return Ok(loss);
    }
    attach(&[logits], loss, move |g| {
        let d = ((&p - &onehot)?.broadcast_mul(&w.reshape((n, 1))?)? * (1.0 / count))?;
        Ok(vec![Some(d.broadcast_mul(g)?)])
    })
}
