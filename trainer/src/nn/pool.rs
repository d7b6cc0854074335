//! Pooling over tokens.

use candle_core::Tensor;

use crate::Result;
use crate::tape::attach;

/// Mean over real tokens: `h` `(B, T, d)`, `mask` `(B, T)` 0/1 → `(B, d)`, as one node whose only
/// parent is `h`. Its backward needs just the per-token weights `mask / count`, so the mask never
/// enters the graph (built from candle's own ops, the mask would get a gradient of its own).
pub fn mean_pool(h: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let m = mask.to_dtype(h.dtype())?.unsqueeze(2)?;
    let count = m.sum_keepdim(1)?.clamp(1.0, f64::MAX)?;
    let weights = m.broadcast_div(&count)?;
    let value = h.detach().broadcast_mul(&weights)?.sum(1)?;
    attach(&[h], value, move |g| {
        Ok(vec![Some(g.unsqueeze(1)?.broadcast_mul(&weights)?)])
    })
}
