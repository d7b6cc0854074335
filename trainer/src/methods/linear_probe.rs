//! The linear probe (`head`): only the classification head trains, on the frozen backbone's
//! output. It is the floor of every table: a method that does no better has learned nothing.

use candle_core::{Tensor, Var};
use petl_crds::HeadConfig;

use super::{Method, head::Head};
use crate::Result;
use crate::export::HeadFeatures;
use crate::init::Rng;
use crate::models::Backbone;

/// The frozen backbone under a trainable classification head.
pub struct LinearProbe {
    backbone: Box<dyn Backbone>,
    head: Head,
}

impl LinearProbe {
    pub fn new(
        _: &HeadConfig,
        backbone: Box<dyn Backbone>,
        num_labels: usize,
        seed: u64,
    ) -> Result<Self> {
        let mut rng = Rng::new(seed);
        let head = Head::over(backbone.as_ref(), num_labels, &mut rng)?;
        Ok(Self { backbone, head })
    }
}

impl Method for LinearProbe {
    fn name(&self) -> &'static str {
        "head"
    }

    fn head_features(&self) -> HeadFeatures {
        HeadFeatures::Pooled(self.backbone.pooling())
    }

    fn parameters(&self) -> Vec<(String, Var)> {
        self.head.parameters()
    }

    fn forward(&self, input_ids: &Tensor, attention_mask: &Tensor) -> Result<Tensor> {
        // Nothing in the backbone is a `Var`, so its forward builds no graph and keeps nothing.
        self.head
            .classify(self.backbone.as_ref(), input_ids, attention_mask)
    }
}
