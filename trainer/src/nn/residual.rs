//! Residual connections that give gradients only to the sides that track.

use candle_core::Tensor;

use super::flat2;
use crate::Result;
use crate::tape::{attach, tracks};

/// `h + a` (a residual connection) as one node: the gradient flows to whichever of the two
/// tracks. candle's `+` would also give an untracked side (a frozen embedding's output) a
/// full-size gradient that stays in the store until the step ends.
pub fn residual(h: &Tensor, a: &Tensor) -> Result<Tensor> {
    let value = (h.detach() + a.detach())?;
    let (need_dh, need_da) = (tracks(h), tracks(a));
    attach(&[h, a], value, move |g| {
        Ok(vec![need_dh.then(|| g.clone()), need_da.then(|| g.clone())])
    })
}

/// `h + a·s`, with `s` `(d,)` scaling the last dimension of `a` (a ViT block's LayerScale
/// residual), as one node. Built from candle's ops, a frozen `s` would still get a full-size
/// `(…, d)` gradient that no one reads and that stays in the gradient store, and the product
/// `a·s` would be kept for backward; here `a` is kept only when `s` trains.
pub fn scaled_residual(h: &Tensor, a: &Tensor, s: &Tensor) -> Result<Tensor> {
    let scale = s.detach();
    let value = (h.detach() + a.detach().broadcast_mul(&scale)?)?;
    let (need_dh, need_da) = (tracks(h), tracks(a));
    let saved_a = tracks(s).then(|| a.detach());
    attach(&[h, a, s], value, move |g| {
        let dh = need_dh.then(|| g.clone());
        let da = need_da.then(|| g.broadcast_mul(&scale)).transpose()?;
        let ds = match &saved_a {
            Some(a) => {
                let (prod, _) = flat2(&(g * a)?)?;
                Some(prod.sum(0)?)
            }
            None => None,
        };
        Ok(vec![dh, da, ds])
    })
}
