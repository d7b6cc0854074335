//! Every custom backward on the tape, and every method's trainable parameters, against central
//! finite differences in f64.

use candle_core::{DType, Device, Tensor, Var};
use petl_crds::{
    LoraConfig, LstConfig, MethodConfig, R2Config, UniptConfig, VqtCombine, VqtConfig,
};
use petl_trainer::init::Rng;
use petl_trainer::methods::{self, Method};
use petl_trainer::models::bert::{Bert, Config};
use petl_trainer::models::vit::{self, Vit};
use petl_trainer::nn::{self, Activation, Dropout, LayerNorm, Linear, LoraDelta};
use petl_trainer::tape;

const EPS: f64 = 1e-6;
const TOL: f64 = 1e-6;

fn rand(rng: &mut Rng, shape: &[usize], bound: f64) -> Tensor {
    rng.uniform_tensor(shape, bound, DType::F64, &Device::Cpu)
        .unwrap()
}

fn var(rng: &mut Rng, shape: &[usize], bound: f64) -> Var {
    Var::from_tensor(&rand(rng, shape, bound)).unwrap()
}

/// Compares the analytic gradient of `loss()` for every var with central differences on a few
/// entries of each; fails with the worst relative error.
fn check(vars: &[(&str, &Var)], loss: &dyn Fn() -> Tensor) {
    let scalar = |t: Tensor| t.to_scalar::<f64>().unwrap();
    let grads = loss().backward().unwrap();
    for (name, v) in vars {
        let g = grads
            .get(v.as_tensor())
            .unwrap_or_else(|| panic!("{name}: no gradient"))
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        let base = v
            .as_tensor()
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        let n = base.len();
        let picks: Vec<usize> = (0..n).step_by((n / 7).max(1)).chain([n - 1]).collect();
        for &i in &picks {
            let mut plus = base.clone();
            plus[i] += EPS;
            v.set(&Tensor::from_vec(plus, v.shape(), &Device::Cpu).unwrap())
                .unwrap();
            let lp = scalar(tape::no_grad(loss));
            let mut minus = base.clone();
            minus[i] -= EPS;
            v.set(&Tensor::from_vec(minus, v.shape(), &Device::Cpu).unwrap())
                .unwrap();
            let lm = scalar(tape::no_grad(loss));
            v.set(&Tensor::from_vec(base.clone(), v.shape(), &Device::Cpu).unwrap())
                .unwrap();
            let numeric = (lp - lm) / (2.0 * EPS);
            let err = (numeric - g[i]).abs() / (numeric.abs() + g[i].abs()).max(1e-3);
            assert!(
                err < TOL,
                "{name}[{i}]: analytic {} numeric {numeric} (rel {err:e})",
                g[i]
            );
        }
    }
}

/// `sum(out ⊙ R)` for a fixed random `R`, so every output element matters differently.
fn project(out: &Tensor, seed: u64) -> Tensor {
    let mut rng = Rng::new(seed);
    let r = rand(&mut rng, out.dims(), 1.0);
    (out * r).unwrap().sum_all().unwrap()
}

#[test]
fn layer_norm_backward_matches_finite_differences() {
    let mut rng = Rng::new(1);
    let x = var(&mut rng, &[2, 3, 8], 2.0);
    let ln = LayerNorm {
        weight: var(&mut rng, &[8], 1.0).as_tensor().clone(),
        bias: var(&mut rng, &[8], 1.0).as_tensor().clone(),
        eps: 1e-5,
    };
    let (w, b) = (
        Var::from_tensor(&ln.weight).unwrap(),
        Var::from_tensor(&ln.bias).unwrap(),
    );
    let ln = LayerNorm {
        weight: w.as_tensor().clone(),
        bias: b.as_tensor().clone(),
        eps: 1e-5,
    };
    check(&[("x", &x), ("gamma", &w), ("beta", &b)], &|| {
        project(&ln.forward(x.as_tensor()).unwrap(), 9)
    });
}

#[test]
fn softmax_and_gelu_backward_match_finite_differences() {
    let mut rng = Rng::new(2);
    let x = var(&mut rng, &[3, 5], 3.0);
    check(&[("x", &x)], &|| {
        project(&nn::softmax(x.as_tensor()).unwrap(), 3)
    });
    check(&[("x", &x)], &|| {
        project(&nn::gelu(x.as_tensor()).unwrap(), 4)
    });
}

#[test]
fn attention_backward_matches_finite_differences() {
    let mut rng = Rng::new(3);
    let (q, k, v) = (
        var(&mut rng, &[2, 4, 6], 1.0),
        var(&mut rng, &[2, 4, 6], 1.0),
        var(&mut rng, &[2, 4, 6], 1.0),
    );
    let mask = Tensor::from_vec(vec![1u32, 1, 1, 0, 1, 1, 1, 1], (2, 4), &Device::Cpu).unwrap();
    let bias = nn::attention_bias(&mask, DType::F64).unwrap();
    check(&[("q", &q), ("k", &k), ("v", &v)], &|| {
        let out = nn::attention(q.as_tensor(), k.as_tensor(), v.as_tensor(), &bias, 2).unwrap();
        project(&out, 5)
    });
}

#[test]
fn linear_backward_covers_weight_bias_input_and_fused_gelu() {
    let mut rng = Rng::new(4);
    let x = var(&mut rng, &[2, 3, 5], 1.0);
    let (w, b) = (var(&mut rng, &[4, 5], 1.0), var(&mut rng, &[4], 1.0));
    let lin = Linear::new(w.as_tensor().clone(), Some(b.as_tensor().clone()));
    for act in [Activation::Identity, Activation::Gelu] {
        check(&[("x", &x), ("w", &w), ("b", &b)], &|| {
            project(&lin.forward_act(x.as_tensor(), act).unwrap(), 6)
        });
    }
}

#[test]
fn lora_backward_gives_a_b_and_input_gradients_but_none_for_the_frozen_weight() {
    let mut rng = Rng::new(5);
    let x = var(&mut rng, &[2, 3, 5], 1.0);
    let frozen = rand(&mut rng, &[4, 5], 1.0);
    let (a, bb) = (var(&mut rng, &[2, 5], 1.0), var(&mut rng, &[4, 2], 1.0));
    let lin = Linear {
        weight: frozen.clone(),
        bias: Some(rand(&mut rng, &[4], 1.0)),
        lora: Some(LoraDelta {
            a: a.as_tensor().clone(),
            b: bb.as_tensor().clone(),
            scale: 2.0,
            dropout: Some(Dropout::new(0.3, 7)),
        }),
    };
    check(&[("x", &x), ("A", &a), ("B", &bb)], &|| {
        project(&lin.forward(x.as_tensor()).unwrap(), 7)
    });
    let grads = project(&lin.forward(x.as_tensor()).unwrap(), 7)
        .backward()
        .unwrap();
    assert!(
        grads.get(&frozen).is_none(),
        "frozen weight received a gradient"
    );
}

#[test]
fn embedding_and_cross_entropy_backward_match_finite_differences() {
    let mut rng = Rng::new(6);
    let table = var(&mut rng, &[7, 4], 1.0);
    let ids = Tensor::from_vec(vec![0u32, 3, 3, 6, 1, 0], (2, 3), &Device::Cpu).unwrap();
    check(&[("table", &table)], &|| {
        project(&nn::embedding_sum(&[(&ids, table.as_tensor())]).unwrap(), 8)
    });
    let logits = var(&mut rng, &[5, 3], 2.0);
    let labels = Tensor::from_vec(vec![0u32, 2, 1, 1, 0], 5, &Device::Cpu).unwrap();
    let weights = Tensor::from_vec(vec![1f64, 0., 1., 1., 1.], 5, &Device::Cpu).unwrap();
    check(&[("logits", &logits)], &|| {
        nn::cross_entropy(logits.as_tensor(), &labels, Some(&weights)).unwrap()
    });
}

#[test]
fn mean_pool_backward_matches_finite_differences_and_leaves_the_mask_out() {
    let mut rng = Rng::new(9);
    let h = var(&mut rng, &[2, 4, 3], 1.0);
    let mask = Tensor::from_vec(vec![1u32, 1, 0, 0, 1, 1, 1, 1], (2, 4), &Device::Cpu).unwrap();
    check(&[("h", &h)], &|| {
        project(&nn::mean_pool(h.as_tensor(), &mask).unwrap(), 10)
    });
    let grads = nn::mean_pool(h.as_tensor(), &mask)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let ids: Vec<_> = grads.get_ids().copied().collect();
    assert_eq!(ids, [h.as_tensor().id()], "only h may hold a gradient");
}

fn tiny_bert() -> Bert {
    tiny_bert_in(DType::F64)
}

fn tiny_bert_in(dtype: DType) -> Bert {
    let config = Config::with_shape(20, 16, 2, 4, 32, 8);
    Bert::random(config, 11, dtype, &Device::Cpu).unwrap()
}

fn tiny_batch() -> (Tensor, Tensor, Tensor) {
    let ids =
        Tensor::from_vec(vec![1u32, 5, 9, 2, 0, 3, 7, 7, 4, 1], (2, 5), &Device::Cpu).unwrap();
    let mask =
        Tensor::from_vec(vec![1u32, 1, 1, 1, 0, 1, 1, 1, 1, 1], (2, 5), &Device::Cpu).unwrap();
    let labels = Tensor::from_vec(vec![0u32, 2], 2, &Device::Cpu).unwrap();
    (ids, mask, labels)
}

fn check_method(method: &dyn Method) {
    let (ids, mask, labels) = tiny_batch();
    check_method_on(method, &ids, &mask, &labels);
}

fn check_method_on(method: &dyn Method, input: &Tensor, mask: &Tensor, labels: &Tensor) {
    let params = method.parameters();
    assert!(!params.is_empty());
    let named: Vec<(&str, &Var)> = params.iter().map(|(n, v)| (n.as_str(), v)).collect();
    check(&named, &|| {
        let logits = method.forward(input, mask).unwrap();
        nn::cross_entropy(&logits, labels, None).unwrap()
    });
}

#[test]
fn full_fine_tuning_gradients_match_finite_differences() {
    let m = methods::for_bert(&MethodConfig::Full(Default::default()), tiny_bert(), 3, 1).unwrap();
    check_method(m.as_ref());
}

#[test]
fn bitfit_gradients_match_finite_differences() {
    let m =
        methods::for_bert(&MethodConfig::Bitfit(Default::default()), tiny_bert(), 3, 1).unwrap();
    assert!(
        m.parameters()
            .iter()
            .all(|(n, _)| n.ends_with("bias") || n.starts_with("classifier"))
    );
    check_method(m.as_ref());
}

#[test]
fn lora_gradients_match_finite_differences() {
    let config = LoraConfig {
        rank: 2,
        alpha: 4.0,
        dropout: 0.0,
        target_modules: vec!["query".into(), "value".into(), "dense".into()],
    };
    let m = methods::for_bert(&MethodConfig::Lora(config), tiny_bert(), 3, 1).unwrap();
    // B starts at zero, which makes A's gradient zero; move B off zero to test A as well.
    let mut rng = Rng::new(3);
    for (name, v) in m.parameters() {
        if name.ends_with("lora_B.weight") {
            v.set(&rand(&mut rng, v.dims(), 0.5)).unwrap();
        }
    }
    check_method(m.as_ref());
}

#[test]
fn lst_gradients_match_finite_differences() {
    for init_from_backbone in [true, false] {
        let config = LstConfig {
            reduction: 2,
            layers: None,
            gate_init: 0.3,
            init_from_backbone: Some(init_from_backbone),
        };
        let m = methods::for_bert(&MethodConfig::Lst(config), tiny_bert(), 3, 1).unwrap();
        check_method(m.as_ref());
    }
}

/// VQT's settings for the checks: two queries a block, no dropout (the checks differentiate one
/// fixed function).
fn vqt(combine: VqtCombine, normalize_features: bool) -> MethodConfig {
    MethodConfig::Vqt(VqtConfig {
        queries: 2,
        combine,
        dropout: 0.0,
        normalize_features,
    })
}

#[test]
fn vqt_gradients_match_finite_differences() {
    for (combine, normalize) in [(VqtCombine::Concat, true), (VqtCombine::Mean, false)] {
        let m = methods::for_bert(&vqt(combine, normalize), tiny_bert(), 3, 1).unwrap();
        check_method(m.as_ref());
    }
}

/// SHERL's settings for the checks: width 16 / 2 = 8, `late` blocks re-run on the adapters'
/// output.
fn sherl(late_layers: i32) -> MethodConfig {
    MethodConfig::Sherl(petl_crds::SherlConfig {
        reduction: 2,
        late_layers,
    })
}

/// SHERL's adapters, aggregation, output gate and head, on BERT with the late route (one block)
/// and without it (the adapters read all three hidden states, so the redundancy term weighs two
/// shallow layers), and on the ViT. The gate starts at 0, which leaves the backbone's state out
/// of the sum; the checks move it off zero so that path is checked too. The late block passes
/// gradients back but takes none: no backbone tensor gets one.
#[test]
fn sherl_gradients_match_finite_differences() {
    let on_gate = |m: &dyn Method| {
        for (name, v) in m.parameters() {
            let start = match name.as_str() {
                "sherl.gate_params" => 0.03,
                "sherl.guide_block.fc_attn.bias" => 0.5,
                _ => continue,
            };
            v.set(&Tensor::full(start, 1, &Device::Cpu).unwrap())
                .unwrap();
        }
    };
    for late_layers in [1, 0] {
        let bert = tiny_bert();
        let mut frozen = bert.clone();
        let m = methods::for_bert(&sherl(late_layers), bert, 3, 1).unwrap();
        on_gate(m.as_ref());
        check_method(m.as_ref());
        let (ids, mask, labels) = tiny_batch();
        let logits = m.forward(&ids, &mask).unwrap();
        let grads = nn::cross_entropy(&logits, &labels, None)
            .unwrap()
            .backward()
            .unwrap();
        for (name, t) in frozen.parameters_mut() {
            assert!(
                grads.get(t).is_none(),
                "backbone tensor {name} got a gradient"
            );
        }
    }
    let (vit, pixels, mask, labels) = tiny_vit_and_images();
    let m = methods::build(&sherl(1), Box::new(vit), 3, 1).unwrap();
    on_gate(m.as_ref());
    check_method_on(m.as_ref(), &pixels, &mask, &labels);
}

/// The late route needs at least one early layer besides the one it replaces: on a two-layer
/// backbone, two late layers are refused naming the setting.
#[test]
fn sherl_refuses_a_late_route_as_deep_as_the_backbone() {
    match methods::for_bert(&sherl(2), tiny_bert(), 3, 1) {
        Err(petl_trainer::Error::Config { field, .. }) => {
            assert_eq!(field, "spec.method.sherl.lateLayers")
        }
        Err(e) => panic!("wrong error: {e}"),
        Ok(_) => panic!("a late route over every layer was accepted"),
    }
}

/// UniPT's up-projection starts at zero (as LoRA's B), which zeroes every other gradient of the
/// parallel network; R²'s per-layer scales start at zero too (tanh(0) = 0 cuts the query-modulated
/// pooling off). The checks move them off zero first.
fn starts_at_zero(name: &str) -> bool {
    name.ends_with("lora_B.weight")
        || name == "unipt.upsample_layer.1.weight"
        || name.starts_with("r2.scale.")
}

#[test]
fn unipt_gradients_match_finite_differences() {
    for zero_init_up in [true, false] {
        let config = UniptConfig {
            reduction: 2,
            zero_init_up,
        };
        let m = methods::for_bert(&MethodConfig::Unipt(config), tiny_bert(), 3, 1).unwrap();
        let mut rng = Rng::new(3);
        for (name, v) in m.parameters() {
            if starts_at_zero(&name) {
                v.set(&rand(&mut rng, v.dims(), 0.5)).unwrap();
            }
        }
        check_method(m.as_ref());
    }
}

/// R²-Tuning's settings for the checks: `layers` tapped layers, a block of width 8, two query
/// tokens a layer, no dropout.
fn r2(layers: i32) -> MethodConfig {
    MethodConfig::R2(R2Config {
        layers,
        dims: 8,
        queries: 2,
        dropout: 0.0,
    })
}

/// Moves every parameter `starts_at_zero` names off zero, so every gradient is checked.
fn off_zero(method: &dyn Method) {
    let mut rng = Rng::new(3);
    for (name, v) in method.parameters() {
        if starts_at_zero(&name) {
            let t = rand(&mut rng, v.dims(), 0.5).to_dtype(v.dtype()).unwrap();
            v.set(&t).unwrap();
        }
    }
}

/// One tapped layer (no gate), both of the tiny BERT's layers, and more than it has (clamped).
#[test]
fn r2_gradients_match_finite_differences() {
    for layers in [1, 2, 4] {
        let m = methods::for_bert(&r2(layers), tiny_bert(), 3, 1).unwrap();
        let gates = m
            .parameters()
            .iter()
            .filter(|(n, _)| n.starts_with("r2.gate."))
            .count();
        assert_eq!(gates, layers.min(2) as usize - 1, "layers {layers}");
        off_zero(m.as_ref());
        check_method(m.as_ref());
    }
}

/// The grounding model's R² block over frames (self-attention across 4 frames, the positional
/// encoding, TEF) with its heads and losses, on random cached features: 2 clips of 4 frames of 3
/// tokens (width 6), queries of 2 tokens (width 5), 1 and 3 tapped layers.
#[test]
fn grounding_block_gradients_match_finite_differences() {
    use petl_trainer::grounding::data::ClipBatch;
    use petl_trainer::grounding::metrics::Span;
    use petl_trainer::grounding::model::{Grounder, ModelConfig};
    for layers in [1, 3] {
        let config = ModelConfig {
            layers,
            dims: 8,
            dropout: 0.0,
            boundary_weight: 0.7,
            calibration_weight: 0.3,
        };
        let g = Grounder::new(config, 6, 5, DType::F64, &Device::Cpu, 2).unwrap();
        let mut rng = Rng::new(5);
        let batch = ClipBatch {
            video: (0..layers)
                .map(|_| rand(&mut rng, &[2, 4, 3, 6], 1.0))
                .collect(),
            query: (0..layers)
                .map(|_| rand(&mut rng, &[2, 2, 5], 1.0))
                .collect(),
            spans: vec![Span::new(1.0, 3.0), Span::new(0.0, 1.0)],
            digits: vec![3, 5],
            frames: 4,
        };
        for (name, v) in g.parameters() {
            if name.starts_with("r2.scale.") || name.starts_with("r2.gate.") {
                v.set(&rand(&mut rng, v.dims(), 0.5)).unwrap();
            }
        }
        let params = g.parameters();
        let vars: Vec<(&str, &Var)> = params.iter().map(|(n, v)| (n.as_str(), v)).collect();
        check(&vars, &|| g.loss(&batch).unwrap());
    }
}

/// Bad R² settings are refused with the field that holds them.
#[test]
fn r2_refuses_bad_settings_naming_the_field() {
    let bad = [
        (
            "spec.method.r2.layers",
            R2Config {
                layers: 0,
                ..R2Config::default()
            },
        ),
        (
            "spec.method.r2.dims",
            R2Config {
                dims: 0,
                ..R2Config::default()
            },
        ),
        (
            "spec.method.r2.queries",
            R2Config {
                queries: -1,
                ..R2Config::default()
            },
        ),
        (
            "spec.method.r2.dropout",
            R2Config {
                dropout: 1.0,
                ..R2Config::default()
            },
        ),
    ];
    for (expected, config) in bad {
        match methods::for_bert(&MethodConfig::R2(config), tiny_bert(), 3, 1) {
            Err(petl_trainer::Error::Config { field, .. }) => assert_eq!(field, expected),
            Err(e) => panic!("{expected}: wrong error: {e}"),
            Ok(_) => panic!("{expected}: a bad value was accepted"),
        }
    }
}

/// The f32 CPU path runs the fused kernels (`petl_trainer::kernels`); f64 runs candle's composed
/// ops, which the finite-difference checks above hold to 1e-6. Same model, same batch: every
/// method's gradients must agree to f32 precision.
#[test]
fn the_fused_f32_path_gives_every_method_the_composed_gradients() {
    let lora = LoraConfig {
        rank: 2,
        alpha: 4.0,
        dropout: 0.0,
        target_modules: vec!["query".into(), "value".into(), "dense".into()],
    };
    let lst = LstConfig {
        reduction: 2,
        layers: None,
        gate_init: 0.3,
        init_from_backbone: Some(true),
    };
    let configs = [
        MethodConfig::Full(Default::default()),
        MethodConfig::Bitfit(Default::default()),
        MethodConfig::Lora(lora),
        MethodConfig::Lst(lst),
        vqt(VqtCombine::Concat, true),
        MethodConfig::Unipt(UniptConfig {
            reduction: 2,
            zero_init_up: true,
        }),
        r2(2),
        sherl(1),
    ];
    let (ids, mask, labels) = tiny_batch();
    for config in &configs {
        let gradients = |dtype: DType| {
            let m = methods::for_bert(config, tiny_bert_in(dtype), 3, 1).unwrap();
            let mut rng = Rng::new(3);
            for (name, v) in m.parameters() {
                if starts_at_zero(&name) {
                    let b = rand(&mut rng, v.dims(), 0.5).to_dtype(dtype).unwrap();
                    v.set(&b).unwrap();
                }
            }
            let logits = m.forward(&ids, &mask).unwrap();
            let grads = nn::cross_entropy(&logits, &labels, None)
                .unwrap()
                .backward()
                .unwrap();
            m.parameters()
                .iter()
                .map(|(name, v)| {
                    let g = grads.get(v.as_tensor()).unwrap_or_else(|| panic!("{name}"));
                    let g = g.to_dtype(DType::F64).unwrap().flatten_all().unwrap();
                    (name.clone(), g.to_vec1::<f64>().unwrap())
                })
                .collect::<Vec<_>>()
        };
        for ((name, fused), (_, composed)) in
            gradients(DType::F32).iter().zip(gradients(DType::F64))
        {
            let scale = composed.iter().fold(1e-3, |m: f64, g| m.max(g.abs()));
            let worst = fused
                .iter()
                .zip(&composed)
                .map(|(a, b)| (a - b).abs() / scale)
                .fold(0.0, f64::max);
            assert!(
                worst < 1e-4,
                "{config:?} {name}: relative difference {worst}"
            );
        }
    }
}

/// A two-block ViT on 8×8 images in 4-pixel patches (four patch tokens and [CLS]), and a batch of
/// two such images in place of token ids.
fn tiny_vit_and_images() -> (Vit, Tensor, Tensor, Tensor) {
    let config = vit::Config::with_shape(16, 2, 4, 4, 8);
    let vit = Vit::random(config, 11, DType::F64, &Device::Cpu).unwrap();
    let pixels = rand(&mut Rng::new(5), &[2, 3, 8, 8], 1.0);
    let mask = Tensor::ones((2, 1), DType::U32, &Device::Cpu).unwrap();
    let labels = Tensor::from_vec(vec![1u32, 2], 2, &Device::Cpu).unwrap();
    (vit, pixels, mask, labels)
}

/// The methods written against `Backbone` run on the ViT unchanged, with pixels in place of ids.
#[test]
fn every_method_on_the_vit_matches_finite_differences() {
    let configs = [
        MethodConfig::Head(Default::default()),
        MethodConfig::Full(Default::default()),
        MethodConfig::Bitfit(Default::default()),
        MethodConfig::Lora(LoraConfig {
            rank: 2,
            alpha: 4.0,
            dropout: 0.0,
            target_modules: vec!["query".into(), "value".into(), "fc1".into()],
        }),
        MethodConfig::Lst(LstConfig {
            reduction: 2,
            layers: None,
            gate_init: 0.3,
            init_from_backbone: Some(false),
        }),
        vqt(VqtCombine::Concat, true),
        vqt(VqtCombine::Mean, false),
        MethodConfig::Unipt(UniptConfig {
            reduction: 2,
            zero_init_up: true,
        }),
        r2(2),
    ];
    for config in &configs {
        let (vit, pixels, mask, labels) = tiny_vit_and_images();
        let m = methods::build(config, Box::new(vit), 3, 1).unwrap();
        let mut rng = Rng::new(3);
        for (name, v) in m.parameters() {
            if starts_at_zero(&name) {
                v.set(&rand(&mut rng, v.dims(), 0.5)).unwrap();
            }
        }
        check_method_on(m.as_ref(), &pixels, &mask, &labels);
    }
}

/// UniPT adds its update to the backbone's output rebuilt from the taps; that must be exactly
/// what `Backbone::forward` gives, on post-norm BERT (no final norm) and the pre-norm ViT.
#[test]
fn the_last_tap_after_the_final_norm_is_the_backbone_output() {
    use petl_trainer::models::Backbone;
    let (vit, pixels, mask, _) = tiny_vit_and_images();
    let (ids, ids_mask, _) = tiny_batch();
    let bert = tiny_bert();
    let cases: [(&dyn Backbone, &Tensor, &Tensor); 2] =
        [(&vit, &pixels, &mask), (&bert, &ids, &ids_mask)];
    for (backbone, input, mask) in cases {
        let taps = backbone.taps(input, mask).unwrap();
        let rebuilt = backbone.output_from_tap(taps.last().unwrap()).unwrap();
        let direct = backbone.forward(input, mask).unwrap();
        let diff = (rebuilt - direct)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        assert!(diff < 1e-12, "{diff}");
    }
}

/// LST's pruned initialisation copies post-LayerNorm encoder blocks; the ViT's are pre-norm, so
/// asking for it names the setting to change instead of building something else.
#[test]
fn lst_pruned_init_on_the_vit_is_refused_naming_the_setting() {
    let (vit, ..) = tiny_vit_and_images();
    let config = MethodConfig::Lst(LstConfig {
        reduction: 2,
        layers: None,
        gate_init: 0.3,
        init_from_backbone: Some(true),
    });
    match methods::build(&config, Box::new(vit), 3, 1) {
        Err(petl_trainer::Error::Config { field, .. }) => {
            assert_eq!(field, "spec.method.lst.initFromBackbone")
        }
        Err(e) => panic!("wrong error: {e}"),
        Ok(_) => panic!("pruned init on a ViT was accepted"),
    }
}
