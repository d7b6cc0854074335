//! The classification head every method puts on top: the backbone's pooling (mean over real tokens
//! for encoders, the last real token for decoders), then a trainable linear map to the logits.

use candle_core::{DType, Device, Tensor, Var};

use crate::Result;
use crate::init::Rng;
use crate::models::{Backbone, Pooling};
use crate::nn::Linear;

/// `logits = W · pool(h) + b`, with `W` `(num_labels, width)`.
#[derive(Debug)]
pub struct Head {
    linear: Linear,
    weight: Var,
    bias: Var,
    pooling: Pooling,
}

impl Head {
    pub fn new(
        width: usize,
        num_labels: usize,
        pooling: Pooling,
        dtype: DType,
        device: &Device,
        rng: &mut Rng,
    ) -> Result<Self> {
        let weight = Var::from_tensor(&rng.linear_weight(num_labels, width, dtype, device)?)?;
        let bias = Var::from_tensor(&Tensor::zeros(num_labels, dtype, device)?)?;
        let linear = Linear::new(weight.as_tensor().clone(), Some(bias.as_tensor().clone()));
        Ok(Self {
            linear,
            weight,
            bias,
            pooling,
        })
    }

    /// A head over `backbone`'s hidden states, pooled as it says, in its dtype and on its device.
    pub fn over(backbone: &dyn Backbone, num_labels: usize, rng: &mut Rng) -> Result<Self> {
        Self::new(
            backbone.hidden_size(),
            num_labels,
            backbone.pooling(),
            backbone.dtype(),
            backbone.device(),
            rng,
        )
    }

    /// `h` `(B, T, width)`, `mask` `(B, T)` → `(B, num_labels)`.
    pub fn forward(&self, h: &Tensor, attention_mask: &Tensor) -> Result<Tensor> {
        self.logits(&self.pooling.apply(h, attention_mask)?)
    }

    /// Features already reduced to one vector an example, `(B, width)` → `(B, num_labels)`.
    pub fn logits(&self, features: &Tensor) -> Result<Tensor> {
        self.linear.forward(features)
    }

    /// Logits from `backbone`'s final states for `input`, pooled over the positions its
    /// [`Backbone::token_mask`] marks real.
    pub fn classify(
        &self,
        backbone: &dyn Backbone,
        input: &Tensor,
        attention_mask: &Tensor,
    ) -> Result<Tensor> {
        let h = backbone.forward(input, attention_mask)?;
        self.forward(&h, &backbone.token_mask(input, attention_mask)?)
    }

    pub fn parameters(&self) -> Vec<(String, Var)> {
        vec![
            ("classifier.weight".into(), self.weight.clone()),
            ("classifier.bias".into(), self.bias.clone()),
        ]
    }

    /// A method's own trainable tensors followed by the head's: what a side method's
    /// `Method::parameters` returns.
    pub fn after(&self, own: &[(String, Var)]) -> Vec<(String, Var)> {
        let mut p = own.to_vec();
        p.extend(self.parameters());
        p
    }
}
