//! Ladder side tuning's defining property: backward stops at the side network. No backbone tensor
//! and no tap gets a gradient; every side parameter does.

use std::collections::HashSet;

use candle_core::{DType, Device, Tensor};
use petl_crds::{LstConfig, MethodConfig};
use petl_trainer::methods;
use petl_trainer::models::bert::{Bert, Config};
use petl_trainer::models::vit::{self, Vit};
use petl_trainer::tape;

fn tiny_bert() -> Bert {
    let config = Config::with_shape(50, 32, 4, 4, 64, 16);
    Bert::random(config, 5, DType::F32, &Device::Cpu).unwrap()
}

#[test]
fn lst_backward_skips_frozen_weights() {
    let bert = tiny_bert();
    // Tensor clones share ids with the method's backbone.
    let mut frozen_view = bert.clone();
    let config = LstConfig {
        reduction: 4,
        layers: Some(vec![1, 3]),
        gate_init: 0.0,
        init_from_backbone: Some(true),
    };
    let method = methods::for_bert(&MethodConfig::Lst(config), bert, 2, 3).unwrap();
    let ids = Tensor::from_vec(
        (0..24u32).map(|i| (i * 7) % 50).collect::<Vec<_>>(),
        (3, 8),
        &Device::Cpu,
    )
    .unwrap();
    let mask = Tensor::ones((3, 8), DType::U32, &Device::Cpu).unwrap();
    let labels = Tensor::from_vec(vec![0u32, 1, 1], 3, &Device::Cpu).unwrap();
    let logits = method.forward(&ids, &mask).unwrap();
    let grads = tape::cross_entropy(&logits, &labels, None)
        .unwrap()
        .backward()
        .unwrap();

    for (name, t) in frozen_view.parameters_mut() {
        assert!(
            grads.get(t).is_none(),
            "backbone tensor {name} got a gradient"
        );
    }
    let params = method.parameters();
    let param_ids: HashSet<_> = params.iter().map(|(_, v)| v.as_tensor().id()).collect();
    for (name, v) in &params {
        assert!(
            grads.get(v.as_tensor()).is_some(),
            "side parameter {name} got no gradient"
        );
    }
    let stored: HashSet<_> = grads.get_ids().copied().collect();
    assert_eq!(
        stored, param_ids,
        "the gradient store holds tensors that are not side parameters"
    );
    // Two kept layers: two rungs, each with ladder weight+bias, gate and a 16-tensor block.
    assert_eq!(params.len(), 2 + 2 * (2 + 1 + 16) + 2);
}

#[test]
fn lst_rejects_layers_the_backbone_lacks() {
    let config = LstConfig {
        reduction: 4,
        layers: Some(vec![0, 9]),
        gate_init: 0.0,
        init_from_backbone: Some(true),
    };
    let err = methods::for_bert(&MethodConfig::Lst(config), tiny_bert(), 2, 3)
        .err()
        .expect("layer 9 of 4 must be rejected")
        .to_string();
    assert!(
        err.contains("spec.method.lst.layers") && err.contains('9'),
        "{err}"
    );
}

/// The parameters' values of the LST method `init` builds on `backbone`, by name.
fn lst_values(
    init: Option<bool>,
    backbone: Box<dyn petl_trainer::models::Backbone>,
) -> Vec<(String, Vec<f32>)> {
    let config = LstConfig {
        init_from_backbone: init,
        ..LstConfig::default()
    };
    let method = methods::build(&MethodConfig::Lst(config), backbone, 2, 3).unwrap();
    method
        .parameters()
        .into_iter()
        .map(|(name, v)| {
            let values = v
                .as_tensor()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            (name, values)
        })
        .collect()
}

#[test]
fn lst_initialisation_follows_the_backbone_when_unset() {
    // BERT's post-LayerNorm blocks can be pruned: unset means pruned, the same side network as
    // `initFromBackbone: true`, and not the random one.
    let pruned = lst_values(Some(true), Box::new(tiny_bert()));
    assert_eq!(lst_values(None, Box::new(tiny_bert())), pruned);
    assert_ne!(lst_values(Some(false), Box::new(tiny_bert())), pruned);

    // The ViT's pre-norm blocks cannot: unset builds the random side network, and asking for
    // pruning names the field.
    let vit = || {
        Vit::random(
            vit::Config::with_shape(32, 2, 4, 4, 8),
            11,
            DType::F32,
            &Device::Cpu,
        )
    };
    assert_eq!(
        lst_values(None, Box::new(vit().unwrap())),
        lst_values(Some(false), Box::new(vit().unwrap()))
    );
    let config = LstConfig {
        init_from_backbone: Some(true),
        ..LstConfig::default()
    };
    let err = methods::build(&MethodConfig::Lst(config), Box::new(vit().unwrap()), 2, 3)
        .err()
        .expect("pruning a ViT must be refused")
        .to_string();
    assert!(err.contains("spec.method.lst.initFromBackbone"), "{err}");
}
