//! Multi-head scaled dot-product attention and the padding bias it adds to its scores.

use candle_core::{DType, Tensor};

use super::activation::{softmax_backward, softmax_values};
use crate::tape::{attach, tracks};
use crate::{Error, Result, kernels};

/// Turns a `(B, T)` 0/1 attention mask into the additive `(B, 1, 1, T)` bias attention adds to
/// its scores (0 for real tokens, a large negative number for padding).
pub fn attention_bias(mask: &Tensor, dtype: DType) -> Result<Tensor> {
    let (b, t) = mask.dims2()?;
    let m = mask.to_dtype(dtype)?;
    let bias = ((m - 1.0)? * 1e4)?;
    Ok(bias.reshape((b, 1, 1, t))?)
}

/// Multi-head scaled dot-product attention of `(B, Tq, H·dh)` queries over `(B, Tk, H·dh)` keys
/// and values (`bias` over the `Tk` keys), as one node. Saves the attention probabilities; q, k
/// and v are the parents the graph holds anyway. Only the tracked inputs get gradients, so
/// queries reading untracked keys and values (VQT) cost no key or value gradient.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    bias: &Tensor,
    heads: usize,
) -> Result<Tensor> {
    let (b, _, d) = q.dims3()?;
    if d % heads != 0 {
        return Err(Error::Config {
            field: "num_attention_heads".into(),
            message: format!("width {d} is not divisible by {heads} heads"),
        });
    }
    let dh = d / heads;
    let scale = 1.0 / (dh as f64).sqrt();
    // `(B, T, H·dh)` seen as `(B, H, T, dh)`: a view, no copy.
    let split = move |x: &Tensor| -> candle_core::Result<Tensor> {
        x.reshape((b, x.dim(1)?, heads, dh))?.transpose(1, 2)
    };
    let (qd, kd, vd) = (q.detach(), k.detach(), v.detach());
    let (qh, kh, vh) = (split(&qd)?, split(&kd)?, split(&vd)?);
    let scores = per_head(&qh, &kh.t()?, false)?;
    let p = softmax_values(&scores, scale, Some(bias))?;
    let ctx = per_head(&p, &vh, true)?;
    drop((qh, kh, vh, scores));
    let need = [tracks(q), tracks(k), tracks(v)];
    if need == [false; 3] {
        return Ok(ctx);
    }
    let bwd = move |g: &Tensor| {
        let (qh, kh, vh) = (split(&qd)?, split(&kd)?, split(&vd)?);
        let gh = split(g)?;
        let dp = per_head(&gh, &vh.t()?, false)?;
        let dv = need[2].then(|| per_head(&p.t()?, &gh, true)).transpose()?;
        let ds = softmax_backward(&p, &dp, scale)?;
        let dq = need[0].then(|| per_head(&ds, &kh, true)).transpose()?;
        let dk = need[1].then(|| per_head(&ds.t()?, &qh, true)).transpose()?;
        Ok(vec![dq, dk, dv])
    };
    attach(&[q, k, v], ctx, bwd)
}

/// `a·b` per (batch, head) of `(B, H, M, K)` and `(B, H, K, N)` views, optionally with the heads
/// merged back into `(B, M, H·N)`.
fn per_head(a: &Tensor, b: &Tensor, merge_heads: bool) -> candle_core::Result<Tensor> {
    if let Some(fused) = kernels::matmul_per_head(a, b, merge_heads)? {
        return Ok(fused);
    }
    let c = a.contiguous()?.matmul(&b.contiguous()?)?;
    if !merge_heads {
        return Ok(c);
    }
    let (nb, nh, m, n) = c.dims4()?;
    c.transpose(1, 2)?.contiguous()?.reshape((nb, m, nh * n))
}
