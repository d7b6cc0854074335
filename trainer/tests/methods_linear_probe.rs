//! The linear probe (`head`): only the classification head trains; the backbone gets no gradient
//! and nothing else is in the gradient store. (That it learns on real data:
//! methods_rotten_tomatoes.rs.)

use std::collections::HashSet;

use candle_core::{DType, Device, Tensor};
use petl_crds::{HeadConfig, MethodConfig};
use petl_trainer::methods;
use petl_trainer::models::bert::{Bert, Config};
use petl_trainer::nn;

#[test]
fn the_probe_trains_only_the_classifier() {
    let bert = Bert::random(
        Config::with_shape(50, 32, 4, 4, 64, 16),
        5,
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    let mut frozen_view = bert.clone();
    let method = methods::for_bert(&MethodConfig::Head(HeadConfig::default()), bert, 3, 3).unwrap();
    assert_eq!(method.name(), "head");
    let params = method.parameters();
    let names: Vec<&str> = params.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["classifier.weight", "classifier.bias"]);
    assert_eq!(method.trainable_parameters(), 3 * 32 + 3);

    let ids = Tensor::from_vec(
        (0..24u32).map(|i| (i * 7) % 50).collect::<Vec<_>>(),
        (3, 8),
        &Device::Cpu,
    )
    .unwrap();
    let mask = Tensor::from_vec(
        [1u32; 8]
            .into_iter()
            .chain([1, 1, 1, 1, 0, 0, 0, 0])
            .chain([1, 1, 1, 1, 1, 1, 0, 0])
            .collect::<Vec<_>>(),
        (3, 8),
        &Device::Cpu,
    )
    .unwrap();
    let labels = Tensor::from_vec(vec![0u32, 1, 2], 3, &Device::Cpu).unwrap();
    let logits = method.forward(&ids, &mask).unwrap();
    let grads = nn::cross_entropy(&logits, &labels, None)
        .unwrap()
        .backward()
        .unwrap();
    for (name, t) in frozen_view.parameters_mut() {
        assert!(
            grads.get(t).is_none(),
            "backbone tensor {name} got a gradient"
        );
    }
    let param_ids: HashSet<_> = params.iter().map(|(_, v)| v.as_tensor().id()).collect();
    let stored: HashSet<_> = grads.get_ids().copied().collect();
    assert_eq!(
        stored, param_ids,
        "only the head's two tensors get gradients"
    );
}
