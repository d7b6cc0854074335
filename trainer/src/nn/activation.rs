//! Elementwise nonlinearities and softmax as nodes that save what their backward reads.

use candle_core::{D, Tensor};

use crate::tape::{attach, tracks};
use crate::{Result, kernels};

/// `Φ(u) + u·φ(u)`, the derivative of exact GELU.
fn gelu_derivative(u: &Tensor) -> candle_core::Result<Tensor> {
    let cdf = ((u * std::f64::consts::FRAC_1_SQRT_2)?.erf()? + 1.0)? * 0.5;
    let pdf = (u.sqr()? * -0.5)?.exp()? * (1.0 / (2.0 * std::f64::consts::PI).sqrt());
    cdf? + (u * pdf?)?
}

/// GELU of `u` and, when `derivative`, its derivative: one fused pass on the CPU, candle's ops
/// elsewhere.
pub(super) fn gelu_parts(
    u: &Tensor,
    derivative: bool,
) -> candle_core::Result<(Tensor, Option<Tensor>)> {
    if let Some(fused) = kernels::gelu(u, derivative)? {
        return Ok(fused);
    }
    let d = if derivative {
        Some(gelu_derivative(u)?)
    } else {
        None
    };
    Ok((u.gelu_erf()?, d))
}

/// Exact GELU as a node that saves only its derivative.
pub fn gelu(x: &Tensor) -> Result<Tensor> {
    let (y, d) = gelu_parts(&x.detach(), tracks(x))?;
    let Some(d) = d else {
        return Ok(y);
    };
    attach(&[x], y, move |g| Ok(vec![Some((g * &d)?)]))
}

/// Softmax over the last dimension; saves its output only.
pub fn softmax(x: &Tensor) -> Result<Tensor> {
    let y = softmax_values(&x.detach(), 1.0, None)?;
    if !tracks(x) {
        return Ok(y);
    }
    let saved = y.clone();
    attach(&[x], y, move |g| {
        Ok(vec![Some(softmax_backward(&saved, g, 1.0)?)])
    })
}

/// `softmax(x·scale + bias)` over the last dimension, `bias` broadcast to `x`.
pub(super) fn softmax_values(
    x: &Tensor,
    scale: f64,
    bias: Option<&Tensor>,
) -> candle_core::Result<Tensor> {
    if let Some(fused) = kernels::softmax(x, scale as f32, bias)? {
        return Ok(fused);
    }
    let mut x = if scale == 1.0 {
        x.clone()
    } else {
        (x * scale)?
    };
    if let Some(b) = bias {
        x = x.broadcast_add(b)?;
    }
    let max = x.max_keepdim(D::Minus1)?;
    let e = x.broadcast_sub(&max)?.exp()?;
    let sum = e.sum_keepdim(D::Minus1)?;
    e.broadcast_div(&sum)
}

/// The gradient of [`softmax_values`] with respect to `x`, from its output `y`.
pub(super) fn softmax_backward(y: &Tensor, g: &Tensor, scale: f64) -> candle_core::Result<Tensor> {
    if let Some(fused) = kernels::softmax_backward(y, g, scale as f32)? {
        return Ok(fused);
    }
    let dot = (g * y)?.sum_keepdim(D::Minus1)?;
    let dx = (y * g.broadcast_sub(&dot)?)?;
    if scale == 1.0 { Ok(dx) } else { dx * scale }
}
