//! A step's gradient store holds the trainable parameters' gradients and nothing else, for every
//! registered method at its default settings on BERT and on the ViT. candle's own ops give every
//! input of a tracked op a gradient, frozen ones included, and those full-size tensors stay in
//! the store until the step ends (on the ViT's LayerScale residuals they once cost LoRA 38 MiB a
//! step); the tape's ops give gradients only where they flow.

use std::collections::HashSet;

use candle_core::{DType, Device, Tensor};
use petl_crds::MethodSpec;
use petl_trainer::methods::{self, REGISTERED};
use petl_trainer::models::Backbone;
use petl_trainer::models::bert::{self, Bert};
use petl_trainer::models::vit::{self, Vit};
use petl_trainer::tape;

/// Batches of 3 examples for each backbone: token ids or pixels, the mask, the labels.
fn inputs(vision: bool) -> (Tensor, Tensor) {
    let dev = &Device::Cpu;
    if vision {
        let pixels: Vec<f32> = (0..3 * 3 * 8 * 8)
            .map(|i| ((i * 37) % 17) as f32 / 17.0)
            .collect();
        let pixels = Tensor::from_vec(pixels, (3, 3, 8, 8), dev).unwrap();
        (pixels, Tensor::ones((3, 1), DType::U32, dev).unwrap())
    } else {
        let ids: Vec<u32> = (0..24u32).map(|i| (i * 7) % 50).collect();
        let ids = Tensor::from_vec(ids, (3, 8), dev).unwrap();
        (ids, Tensor::ones((3, 8), DType::U32, dev).unwrap())
    }
}

fn backbone(vision: bool) -> Box<dyn Backbone> {
    if vision {
        let config = vit::Config::with_shape(32, 2, 4, 4, 8);
        Box::new(Vit::random(config, 11, DType::F32, &Device::Cpu).unwrap())
    } else {
        let config = bert::Config::with_shape(50, 32, 2, 4, 64, 16);
        Box::new(Bert::random(config, 5, DType::F32, &Device::Cpu).unwrap())
    }
}

#[test]
fn a_step_keeps_gradients_of_trainable_parameters_only() {
    let labels = Tensor::from_vec(vec![0u32, 1, 1], 3, &Device::Cpu).unwrap();
    for vision in [false, true] {
        let (x, mask) = inputs(vision);
        for method_type in REGISTERED {
            let config = MethodSpec::of_type(*method_type).config();
            let method = methods::build(&config, backbone(vision), 2, 3)
                .unwrap_or_else(|e| panic!("{method_type:?} (vision {vision}): {e}"));
            method.set_training(true);
            let params: HashSet<_> = method
                .parameters()
                .iter()
                .map(|(_, v)| v.as_tensor().id())
                .collect();
            let logits = method.forward(&x, &mask).unwrap();
            let grads = tape::cross_entropy(&logits, &labels, None)
                .unwrap()
                .backward()
                .unwrap();
            let stray: Vec<_> = grads
                .get_ids()
                .filter(|id| !params.contains(id))
                .map(|id| grads.get_id(*id).unwrap().dims().to_vec())
                .collect();
            assert!(
                stray.is_empty(),
                "{method_type:?} (vision {vision}): gradients of non-parameters, shapes {stray:?}"
            );
        }
    }
}
