//! The ViT as a [`Backbone`]: pixels ride where token ids do, and every [CLS] and patch token is a
//! real position, so the methods written for text (LoRA, LST, BitFit, the probe) run on images
//! unchanged.

use candle_core::{DType, Device, Tensor};

use super::backbone::{Backbone, LoraSite, Pooling, Shape};
use super::vit::Vit;
use crate::Result;
use crate::nn;

impl Backbone for Vit {
    fn shape(&self) -> Shape {
        Shape {
            hidden_size: self.config.hidden_size,
            num_layers: self.layers.len(),
            num_heads: self.config.num_attention_heads,
            intermediate_size: self.config.intermediate_size(),
            norm_eps: self.config.layer_norm_eps,
        }
    }

    fn dtype(&self) -> DType {
        Vit::dtype(self)
    }

    fn device(&self) -> &Device {
        Vit::device(self)
    }

    fn taps_through(
        &self,
        pixels: &Tensor,
        _attention_mask: &Tensor,
        blocks: usize,
    ) -> Result<Vec<Tensor>> {
        self.forward_hidden_through(pixels, blocks)
    }

    fn forward(&self, pixels: &Tensor, _attention_mask: &Tensor) -> Result<Tensor> {
        Vit::forward(self, pixels)
    }

    /// The mean over [CLS] and the patch tokens.
    fn pooling(&self) -> Pooling {
        Pooling::Mean
    }

    fn token_mask(&self, pixels: &Tensor, _attention_mask: &Tensor) -> Result<Tensor> {
        let (b, _, h, w) = pixels.dims4()?;
        let p = self.config.patch_size;
        Ok(Tensor::ones(
            (b, 1 + (h / p) * (w / p)),
            DType::U32,
            pixels.device(),
        )?)
    }

    fn linears_mut(&mut self) -> Vec<(String, &mut dyn LoraSite)> {
        Vit::linears_mut(self)
            .into_iter()
            .map(|(path, l)| (path, l as &mut dyn LoraSite))
            .collect()
    }

    fn parameters_mut(&mut self) -> Vec<(String, &mut Tensor)> {
        self.tensors_mut()
            .into_iter()
            .map(|(name, t, _)| (name, t))
            .collect()
    }

    /// The final LayerNorm.
    fn output_from_tap(&self, last: &Tensor) -> Result<Tensor> {
        self.layernorm.forward(last)
    }

    fn query_block(
        &self,
        layer: usize,
        queries: &Tensor,
        tokens: &Tensor,
        bias: &Tensor,
    ) -> Result<Tensor> {
        let block = super::backbone::block(&self.layers, layer)?;
        block.forward_reading(queries, Some(&tokens.detach()), bias)
    }

    fn run_block(&self, layer: usize, h: &Tensor, token_mask: &Tensor) -> Result<Tensor> {
        let block = super::backbone::block(&self.layers, layer)?;
        block.forward(h, &nn::attention_bias(token_mask, self.dtype())?)
    }
}
