//! Rotary position embeddings (HF's half-split layout, as Llama uses them).

use candle_core::{DType, Device, Tensor};

use crate::tape::{attach, tracks};
use crate::{Error, Result};

/// cos/sin tables of HF-style (half-split) rotary embeddings, `(positions, head_dim/2)`.
#[derive(Clone, Debug)]
pub struct Rope {
    cos: Tensor,
    sin: Tensor,
}

impl Rope {
    pub fn new(head_dim: usize, theta: f64, positions: usize, device: &Device) -> Result<Self> {
        let half = head_dim / 2;
        let inv: Vec<f32> = (0..half)
            .map(|i| (1.0 / theta.powf(2.0 * i as f64 / head_dim as f64)) as f32)
            .collect();
        let inv = Tensor::from_vec(inv, (1, half), device)?;
        let pos = Tensor::arange(0u32, positions as u32, device)?
            .to_dtype(DType::F32)?
            .reshape((positions, 1))?;
        let angles = pos.broadcast_mul(&inv)?;
        Ok(Self {
            cos: angles.cos()?,
            sin: angles.sin()?,
        })
    }

    /// `(B, T, heads·dh)` → rotated `(B, heads, T, dh)`. A rotation, so the backward is the
    /// rotation by the negated angle; the node saves nothing.
    pub fn apply(&self, x: &Tensor, heads: usize) -> Result<Tensor> {
        let (b, t, width) = x.dims3()?;
        let dh = width / heads;
        if t > self.cos.dim(0)? {
            return Err(Error::Config {
                field: "dataset.maxSequenceLength".into(),
                message: format!(
                    "{t} tokens exceed the model's {} positions (max_position_embeddings)",
                    self.cos.dim(0)?
                ),
            });
        }
        let cos = self.cos.narrow(0, 0, t)?;
        let sin = self.sin.narrow(0, 0, t)?;
        let xh = x
            .detach()
            .reshape((b, t, heads, dh))?
            .transpose(1, 2)?
            .contiguous()?;
        let y = candle_nn::rotary_emb::rope(&xh, &cos, &sin)?;
        if !tracks(x) {
            return Ok(y);
        }
        let neg_sin = sin.neg()?;
        attach(&[x], y, move |g| {
            let back = candle_nn::rotary_emb::rope(&g.contiguous()?, &cos, &neg_sin)?;
            Ok(vec![Some(
                back.transpose(1, 2)?.contiguous()?.reshape((b, t, width))?,
            )])
        })
    }
}
