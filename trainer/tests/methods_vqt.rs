//! Visual query tuning's defining properties: backward reaches the query tokens and the head and
//! nothing else (no backbone tensor, no tap), and the queries leave the backbone's own states as
//! they were (the frozen tokens never attend to them).

use std::collections::HashSet;

use candle_core::{DType, Device, Tensor};
use petl_crds::{MethodConfig, VqtCombine, VqtConfig};
use petl_trainer::methods;
use petl_trainer::models::Backbone;
use petl_trainer::models::bert::{Bert, Config};
use petl_trainer::nn;

fn tiny_bert() -> Bert {
    let config = Config::with_shape(50, 32, 4, 4, 64, 16);
    Bert::random(config, 5, DType::F32, &Device::Cpu).unwrap()
}

fn batch() -> (Tensor, Tensor, Tensor) {
    let ids = Tensor::from_vec(
        (0..24u32).map(|i| (i * 7) % 50).collect::<Vec<_>>(),
        (3, 8),
        &Device::Cpu,
    )
    .unwrap();
    // The last row is padded: its queries must not read the padding.
    let mut mask = vec![1u32; 24];
    mask[21..].fill(0);
    let mask = Tensor::from_vec(mask, (3, 8), &Device::Cpu).unwrap();
    let labels = Tensor::from_vec(vec![0u32, 1, 1], 3, &Device::Cpu).unwrap();
    (ids, mask, labels)
}

#[test]
fn vqt_backward_reaches_only_the_query_tokens_and_the_head() {
    let bert = tiny_bert();
    // Tensor clones share ids with the method's backbone.
    let mut frozen_view = bert.clone();
    let config = VqtConfig {
        queries: 3,
        dropout: 0.0,
        ..VqtConfig::default()
    };
    let method = methods::for_bert(&MethodConfig::Vqt(config), bert, 2, 3).unwrap();
    let (ids, mask, labels) = batch();
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
    let params = method.parameters();
    // Four blocks of (3, 32) queries, and a head over 32 + 4·3·32 features.
    assert_eq!(params.len(), 4 + 2);
    assert_eq!(
        method.trainable_parameters(),
        4 * 3 * 32 + 2 * (32 + 4 * 96) + 2
    );
    let param_ids: HashSet<_> = params.iter().map(|(_, v)| v.as_tensor().id()).collect();
    for (name, v) in &params {
        assert!(grads.get(v.as_tensor()).is_some(), "{name} got no gradient");
    }
    let stored: HashSet<_> = grads.get_ids().copied().collect();
    assert_eq!(
        stored, param_ids,
        "the gradient store holds tensors that are not VQT's parameters"
    );
}

/// The query pass of a block is the block itself run on `[tokens; queries]` with the queries'
/// own rows of the attention masked out: the tokens' outputs match the plain block, and the
/// queries' outputs match those rows.
#[test]
fn a_query_block_is_the_block_with_the_queries_appended_but_unread() {
    let bert = tiny_bert();
    let (ids, mask, _) = batch();
    let taps = bert.taps(&ids, &mask).unwrap();
    let queries = petl_trainer::init::Rng::new(4)
        .uniform_tensor((3, 2, 32), 0.3, DType::F32, &Device::Cpu)
        .unwrap();
    let bias = nn::attention_bias(&mask, DType::F32).unwrap();
    let out = bert.query_block(1, &queries, &taps[1], &bias).unwrap();

    // Appended queries that no position may read: their key bias is -1e4, like padding.
    let joint = Tensor::cat(&[&taps[1], &queries], 1).unwrap();
    let unread = Tensor::zeros((3, 2), DType::U32, &Device::Cpu).unwrap();
    let joint_mask = Tensor::cat(&[&mask, &unread], 1).unwrap();
    let joint_bias = nn::attention_bias(&joint_mask, DType::F32).unwrap();
    let joint_out = bert.layers[1].forward(&joint, &joint_bias).unwrap();
    let diff = |a: &Tensor, b: &Tensor| {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    };
    assert!(diff(&joint_out.narrow(1, 0, 8).unwrap(), &taps[2]) < 1e-4);
    assert!(diff(&joint_out.narrow(1, 8, 2).unwrap(), &out) < 1e-4);
}

#[test]
fn mean_combine_makes_the_head_independent_of_the_query_count() {
    let build = |queries| {
        let config = VqtConfig {
            queries,
            combine: VqtCombine::Mean,
            ..VqtConfig::default()
        };
        methods::for_bert(&MethodConfig::Vqt(config), tiny_bert(), 2, 3).unwrap()
    };
    let head_width = |m: &dyn methods::Method| {
        let params = m.parameters();
        let (_, w) = params
            .iter()
            .find(|(n, _)| n == "classifier.weight")
            .unwrap();
        w.dims()[1]
    };
    assert_eq!(head_width(build(1).as_ref()), 32 * 5);
    assert_eq!(head_width(build(7).as_ref()), 32 * 5);
}
