//! Backbones the trainer can fine-tune, each defined on `nn` and `tape` so it exposes taps and
//! injection points and owns its backward. One file a model family; `backbone` is the trait methods see.

pub mod backbone;
pub mod bert;
pub mod gguf;
pub mod llama;
pub mod onnx;
pub mod vit;
mod vit_backbone;
mod vit_onnx;

pub use backbone::{Backbone, LoraSite, Pooling, Shape};
