//! Llama behind the [`Backbone`] trait the methods are written against.

use candle_core::{DType, Device, Tensor};

use super::{DecoderLayer, Llama, Weight};
use crate::Result;
use crate::models::backbone::{Backbone, LoraSite, Pooling, Shape};

/// Llama as a sequence classifier: the final-normed hidden states, pooled at the last real
/// token; its seven projections per layer for LoRA (PEFT paths `model.layers.N.self_attn.q_proj`);
/// dense tensors (norms, and weights kept in f32) for full fine-tuning. Block-quantized weights
/// never train. It has no bias terms and no post-LayerNorm encoder blocks, so BitFit and LST's
/// pruned initialisation do not apply.
impl Backbone for Llama {
    fn shape(&self) -> Shape {
        Shape {
            hidden_size: self.config.hidden_size,
            num_layers: self.layers.len(),
            num_heads: self.config.num_attention_heads,
            intermediate_size: self.config.intermediate_size,
            norm_eps: self.config.rms_norm_eps,
        }
    }

    fn dtype(&self) -> DType {
        // Trainable parts are f32 whatever block format the frozen weights use.
        DType::F32
    }

    fn device(&self) -> &Device {
        &self.device
    }

    fn taps_through(
        &self,
        input_ids: &Tensor,
        attention_mask: &Tensor,
        blocks: usize,
    ) -> Result<Vec<Tensor>> {
        let ids = input_ids.to_dtype(DType::U32)?;
        let bias = self.bias(ids.dim(1)?, Some(attention_mask))?;
        let h = self.embed(&ids)?;
        crate::models::backbone::frozen_taps(&self.layers, blocks, h, |l, h| {
            l.forward(h, &bias, &self.rope)
        })
    }

    fn forward(&self, input_ids: &Tensor, attention_mask: &Tensor) -> Result<Tensor> {
        let ids = input_ids.to_dtype(DType::U32)?;
        let bias = self.bias(ids.dim(1)?, Some(attention_mask))?;
        let h = self.embed(&ids)?;
        let h = self.run_layers(0..self.layers.len(), &h, &bias)?;
        self.norm.forward(&h)
    }

    fn pooling(&self) -> Pooling {
        Pooling::LastToken
    }

    fn output_from_tap(&self, last: &Tensor) -> Result<Tensor> {
        self.norm.forward(last)
    }

    fn run_block(&self, layer: usize, h: &Tensor, token_mask: &Tensor) -> Result<Tensor> {
        let block = crate::models::backbone::block(&self.layers, layer)?;
        let bias = self.bias(h.dim(1)?, Some(token_mask))?;
        block.forward(h, &bias, &self.rope)
    }

    fn linears_mut(&mut self) -> Vec<(String, &mut dyn LoraSite)> {
        self.projections_mut()
            .map(|p| (p.name.clone(), p as &mut dyn LoraSite))
            .collect()
    }

    fn parameters_mut(&mut self) -> Vec<(String, &mut Tensor)> {
        let mut out = Vec::new();
        if let Weight::Dense(t) = &mut self.embed_tokens {
            out.push(("model.embed_tokens.weight".to_string(), t));
        }
        for (i, layer) in self.layers.iter_mut().enumerate() {
            let DecoderLayer {
                input_layernorm,
                post_attention_layernorm,
                q_proj,
                k_proj,
                v_proj,
                o_proj,
                gate_proj,
                up_proj,
                down_proj,
                ..
            } = layer;
            out.push((
                format!("model.layers.{i}.input_layernorm.weight"),
                &mut input_layernorm.weight,
            ));
            for p in [q_proj, k_proj, v_proj, o_proj] {
                if let Weight::Dense(t) = &mut p.weight {
                    out.push((format!("{}.weight", p.name), t));
                }
            }
            out.push((
                format!("model.layers.{i}.post_attention_layernorm.weight"),
                &mut post_attention_layernorm.weight,
            ));
            for p in [gate_proj, up_proj, down_proj] {
                if let Weight::Dense(t) = &mut p.weight {
                    out.push((format!("{}.weight", p.name), t));
                }
            }
        }
        out.push(("model.norm.weight".to_string(), &mut self.norm.weight));
        out
    }

    fn frozen_only(&self) -> Vec<String> {
        let mut out = Vec::new();
        if let Weight::Quantized(_) = self.embed_tokens {
            out.push("model.embed_tokens.weight".to_string());
        }
        for layer in &self.layers {
            for p in layer.projections() {
                if let Weight::Quantized(_) = p.weight {
                    out.push(format!("{}.weight", p.name));
                }
            }
        }
        out
    }
}
