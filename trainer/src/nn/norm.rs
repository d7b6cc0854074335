//! LayerNorm and RMSNorm over the last dimension.

use candle_core::{D, Tensor};

use super::{column_sums, flat2};
use crate::tape::{attach, tracks, trainable};
use crate::{Result, kernels};

/// LayerNorm over the last dimension with optional trainable gain and shift.
#[derive(Clone, Debug)]
pub struct LayerNorm {
    pub weight: Tensor,
    pub bias: Tensor,
    pub eps: f64,
}

impl LayerNorm {
    /// Saves the normalised input and the reciprocal standard deviation, never the raw input.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (y, xhat, rstd) = self.normalise(&x.detach())?;
        let need_dx = tracks(x);
        let need_dg = trainable(&self.weight);
        let need_db = trainable(&self.bias);
        if !(need_dx || need_dg || need_db) {
            return Ok(y);
        }
        let gamma = self.weight.detach();
        let saved_rstd = need_dx.then_some(rstd);
        let bwd = move |g: &Tensor| {
            let (g2, _) = flat2(g)?;
            let (xh2, _) = flat2(&xhat)?;
            let dg = if need_dg {
                Some(column_sums(&g2, Some(&xh2))?)
            } else {
                None
            };
            let db = if need_db {
                Some(column_sums(&g2, None)?)
            } else {
                None
            };
            let dx = match &saved_rstd {
                Some(rstd) => Some(layer_norm_backward(g, &xhat, rstd, &gamma)?),
                None => None,
            };
            Ok(vec![dx, dg, db])
        };
        attach(&[x, &self.weight, &self.bias], y, bwd)
    }

    /// The output, the normalised input and `1/σ` per row (kept dims).
    fn normalise(&self, x: &Tensor) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
        let (gamma, beta) = (self.weight.detach(), self.bias.detach());
        if let Some(n) = kernels::layer_norm(x, &gamma, &beta, self.eps)? {
            return Ok((n.y, n.xhat, n.rstd));
        }
        let mean = x.mean_keepdim(D::Minus1)?;
        let xc = x.broadcast_sub(&mean)?;
        let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
        let rstd = (var + self.eps)?.sqrt()?.recip()?;
        let xhat = xc.broadcast_mul(&rstd)?;
        let y = xhat.broadcast_mul(&gamma)?.broadcast_add(&beta)?;
        Ok((y, xhat, rstd))
    }
}

/// LayerNorm's input gradient from the output gradient, the normalised input and `1/σ`.
fn layer_norm_backward(
    g: &Tensor,
    xhat: &Tensor,
    rstd: &Tensor,
    gamma: &Tensor,
) -> candle_core::Result<Tensor> {
    if let Some(fused) = kernels::layer_norm_backward(g, xhat, rstd, gamma)? {
        return Ok(fused);
    }
    let dxhat = g.broadcast_mul(gamma)?;
    let m1 = dxhat.mean_keepdim(D::Minus1)?;
    let m2 = (&dxhat * xhat)?.mean_keepdim(D::Minus1)?;
    let inner = dxhat.broadcast_sub(&m1)?.sub(&xhat.broadcast_mul(&m2)?)?;
    inner.broadcast_mul(rstd)
}

/// RMSNorm `x / rms(x) · γ`; saves the normalised input and `1/rms`, never the raw input.
#[derive(Clone, Debug)]
pub struct RmsNorm {
    pub weight: Tensor,
    pub eps: f64,
}

impl RmsNorm {
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let xd = x.detach();
        let rstd = (xd.sqr()?.mean_keepdim(D::Minus1)? + self.eps)?
            .sqrt()?
            .recip()?;
        let xhat = xd.broadcast_mul(&rstd)?;
        let y = xhat.broadcast_mul(&self.weight.detach())?;
        let need_dx = tracks(x);
        let need_dw = trainable(&self.weight);
        if !(need_dx || need_dw) {
            return Ok(y);
        }
        let gamma = self.weight.detach();
        let bwd = move |g: &Tensor| {
            let dw = if need_dw {
                let (g2, _) = flat2(g)?;
                let (x2, _) = flat2(&xhat)?;
                Some((g2 * x2)?.sum(0)?)
            } else {
                None
            };
            let dx = if need_dx {
                let gw = g.broadcast_mul(&gamma)?;
                let m = (&gw * &xhat)?.mean_keepdim(D::Minus1)?;
                Some(gw.sub(&xhat.broadcast_mul(&m)?)?.broadcast_mul(&rstd)?)
            } else {
                None
            };
            Ok(vec![dx, dw])
        };
        attach(&[x, &self.weight], y, bwd)
    }
}
