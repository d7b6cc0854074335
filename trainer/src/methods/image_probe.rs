//! The linear probe (`head`) on the ViT: only the classification head trains, on the frozen
//! backbone's last hidden state (mean over [CLS] and patch tokens, the same head text uses).
//!
//! The `Method` trait still speaks of token ids: an image batch carries its normalised pixels
//! `(B, 3, H, W)` in `input_ids` (see `data::image::ImageBatches`) and a `(B, 1)` mask that is
//! not read.

use candle_core::{DType, Tensor, Var};

use super::{Method, head::Head};
use crate::Result;
use crate::init::Rng;
use crate::models::Pooling;
use crate::models::vit::Vit;

/// The frozen ViT under a trainable classification head.
pub struct ImageProbe {
    backbone: Vit,
    head: Head,
}

impl ImageProbe {
    pub fn new(backbone: Vit, num_labels: usize, seed: u64) -> Result<Self> {
        let mut rng = Rng::new(seed);
        let head = Head::new(
            backbone.hidden_size(),
            num_labels,
            Pooling::Mean,
            DType::F32,
            backbone.device(),
            &mut rng,
        )?;
        Ok(Self { backbone, head })
    }
}

impl Method for ImageProbe {
    fn name(&self) -> &'static str {
        "head"
    }

    fn parameters(&self) -> Vec<(String, Var)> {
        self.head.parameters()
    }

    fn forward(&self, pixels: &Tensor, _attention_mask: &Tensor) -> Result<Tensor> {
        // Nothing in the backbone is a `Var`, so its forward builds no graph and keeps nothing.
        let h = self.backbone.forward(pixels)?.to_dtype(DType::F32)?;
        let (b, t, _) = h.dims3()?;
        let every_token = Tensor::ones((b, t), DType::U32, h.device())?;
        self.head.forward(&h, &every_token)
    }
}
