//! The classification head every encoder method puts on top: mean pooling over real tokens, then a
//! trainable linear map to the class logits.

use candle_core::{Tensor, Var};

use crate::Result;
use crate::init::Rng;
use crate::models::bert::Bert;
use crate::tape::{self, Linear};

/// `logits = W · mean_pool(h) + b`, with `W` `(num_labels, width)`.
#[derive(Debug)]
pub struct Head {
    linear: Linear,
    weight: Var,
    bias: Var,
}

impl Head {
    pub fn new(width: usize, num_labels: usize, like: &Tensor, rng: &mut Rng) -> Result<Self> {
        let (dtype, device) = (like.dtype(), like.device());
        let weight = Var::from_tensor(&rng.linear_weight(num_labels, width, dtype, device)?)?;
        let bias = Var::from_tensor(&Tensor::zeros(num_labels, dtype, device)?)?;
        let linear = Linear::new(weight.as_tensor().clone(), Some(bias.as_tensor().clone()));
        Ok(Self {
            linear,
            weight,
            bias,
        })
    }

    /// A head over `backbone`'s hidden states, in its dtype and on its device.
    pub fn over(backbone: &Bert, num_labels: usize, rng: &mut Rng) -> Result<Self> {
        Self::new(
            backbone.hidden_size(),
            num_labels,
            &backbone.embeddings.word,
            rng,
        )
    }

    /// `h` `(B, T, width)`, `mask` `(B, T)` → `(B, num_labels)`.
    pub fn forward(&self, h: &Tensor, attention_mask: &Tensor) -> Result<Tensor> {
        self.linear.forward(&tape::mean_pool(h, attention_mask)?)
    }

    pub fn parameters(&self) -> Vec<(String, Var)> {
        vec![
            ("classifier.weight".into(), self.weight.clone()),
            ("classifier.bias".into(), self.bias.clone()),
        ]
    }
}
