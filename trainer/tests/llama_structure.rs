//! The Llama decoder on small random checkpoints the tests write: HF safetensors and the same
//! weights as llama.cpp GGUF load to the same model, and every custom backward agrees with
//! candle's own autograd on a plain-op reference.

use std::collections::HashMap;
use std::path::Path;

use candle_core::quantized::{GgmlDType, QTensor, gguf_file};
use candle_core::{D, Device, Tensor, Var};
use petl_trainer::models::gguf::FrozenFormat;
use petl_trainer::models::llama::{Llama, Weight};

const VOCAB: usize = 48;

fn config() -> serde_json::Value {
    serde_json::json!({
        "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0, "vocab_size": VOCAB, "tie_word_embeddings": true,
        "max_position_embeddings": 64
    })
}

struct Lcg(u64);
impl Lcg {
    fn tensor(&mut self, shape: &[usize], scale: f32) -> Tensor {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n)
            .map(|_| {
                self.0 = self
                    .0
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                (((self.0 >> 33) as f32 / (1u64 << 31) as f32) - 0.5) * 2.0 * scale
            })
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }
}

/// HF-named random weights for `config()`.
fn random_weights() -> HashMap<String, Tensor> {
    let mut rng = Lcg(42);
    let mut w = HashMap::new();
    w.insert(
        "model.embed_tokens.weight".into(),
        rng.tensor(&[VOCAB, 32], 0.5),
    );
    w.insert(
        "model.norm.weight".into(),
        (rng.tensor(&[32], 0.2) + 1.0).unwrap(),
    );
    for i in 0..2 {
        let p = format!("model.layers.{i}");
        for (name, shape) in [
            ("self_attn.q_proj", [32, 32]),
            ("self_attn.k_proj", [16, 32]),
            ("self_attn.v_proj", [16, 32]),
            ("self_attn.o_proj", [32, 32]),
            ("mlp.gate_proj", [48, 32]),
            ("mlp.up_proj", [48, 32]),
            ("mlp.down_proj", [32, 48]),
        ] {
            w.insert(format!("{p}.{name}.weight"), rng.tensor(&shape, 0.3));
        }
        for n in ["input_layernorm", "post_attention_layernorm"] {
            w.insert(
                format!("{p}.{n}.weight"),
                (rng.tensor(&[32], 0.2) + 1.0).unwrap(),
            );
        }
    }
    w
}

fn write_hf(dir: &Path, weights: &HashMap<String, Tensor>) {
    std::fs::write(dir.join("config.json"), config().to_string()).unwrap();
    candle_core::safetensors::save(weights, dir.join("model.safetensors")).unwrap();
}

/// llama.cpp's converter: interleave the halves of each head so interleaved RoPE applies.
fn permute_for_gguf(w: &Tensor, heads: usize) -> Tensor {
    let (rows, cols) = w.dims2().unwrap();
    w.reshape((heads, 2, rows / heads / 2, cols))
        .unwrap()
        .transpose(1, 2)
        .unwrap()
        .contiguous()
        .unwrap()
        .reshape((rows, cols))
        .unwrap()
}

fn write_gguf(path: &Path, weights: &HashMap<String, Tensor>) {
    use gguf_file::Value;
    let gguf_name = |hf: &str| -> String {
        let map = [
            ("model.embed_tokens.weight", "token_embd.weight"),
            ("model.norm.weight", "output_norm.weight"),
        ];
        if let Some((_, g)) = map.iter().find(|(h, _)| *h == hf) {
            return g.to_string();
        }
        let rest = hf.strip_prefix("model.layers.").unwrap();
        let (i, part) = rest.split_once('.').unwrap();
        let part = match part {
            "input_layernorm.weight" => "attn_norm.weight",
            "post_attention_layernorm.weight" => "ffn_norm.weight",
            "self_attn.q_proj.weight" => "attn_q.weight",
            "self_attn.k_proj.weight" => "attn_k.weight",
            "self_attn.v_proj.weight" => "attn_v.weight",
            "self_attn.o_proj.weight" => "attn_output.weight",
            "mlp.gate_proj.weight" => "ffn_gate.weight",
            "mlp.up_proj.weight" => "ffn_up.weight",
            "mlp.down_proj.weight" => "ffn_down.weight",
            other => panic!("unmapped {other}"),
        };
        format!("blk.{i}.{part}")
    };
    let mut tensors = Vec::new();
    for (name, t) in weights {
        let t = if name.ends_with("q_proj.weight") {
            permute_for_gguf(t, 4)
        } else if name.ends_with("k_proj.weight") {
            permute_for_gguf(t, 2)
        } else {
            t.clone()
        };
        tensors.push((
            gguf_name(name),
            QTensor::quantize(&t, GgmlDType::F32).unwrap(),
        ));
    }
    let tokens: Vec<Value> = (0..VOCAB).map(|i| Value::String(format!("t{i}"))).collect();
    let meta: Vec<(&str, Value)> = vec![
        ("general.architecture", Value::String("llama".into())),
        ("llama.embedding_length", Value::U32(32)),
        ("llama.feed_forward_length", Value::U32(48)),
        ("llama.block_count", Value::U32(2)),
        ("llama.attention.head_count", Value::U32(4)),
        ("llama.attention.head_count_kv", Value::U32(2)),
        ("llama.attention.layer_norm_rms_epsilon", Value::F32(1e-5)),
        ("llama.rope.freq_base", Value::F32(10000.0)),
        ("llama.context_length", Value::U32(64)),
        ("tokenizer.ggml.model", Value::String("gpt2".into())),
        ("tokenizer.ggml.tokens", Value::Array(tokens)),
        ("tokenizer.ggml.merges", Value::Array(vec![])),
    ];
    let meta_refs: Vec<(&str, &Value)> = meta.iter().map(|(k, v)| (*k, v)).collect();
    let tensor_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut f = std::fs::File::create(path).unwrap();
    gguf_file::write(&mut f, &meta_refs, &tensor_refs).unwrap();
}

fn ids() -> Tensor {
    Tensor::new(
        &[[3u32, 17, 5, 40, 11, 2, 29], [7, 7, 1, 0, 45, 12, 30]],
        &Device::Cpu,
    )
    .unwrap()
}

fn max_rel_diff(a: &Tensor, b: &Tensor) -> f32 {
    let d = (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    let s = b
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    d / s.max(1e-12)
}

#[test]
fn hf_safetensors_and_gguf_of_the_same_weights_load_to_the_same_model() {
    let dir = tempfile::tempdir().unwrap();
    let weights = random_weights();
    write_hf(dir.path(), &weights);
    write_gguf(&dir.path().join("m.gguf"), &weights);

    let hf = Llama::from_hf_dir(dir.path(), FrozenFormat::F32, &Device::Cpu).unwrap();
    let (gg, _) = Llama::from_gguf(
        &dir.path().join("m.gguf"),
        FrozenFormat::AsStored,
        &Device::Cpu,
    )
    .unwrap();
    assert_eq!(hf.config, gg.config);
    let names = |m: &Llama| -> Vec<(String, usize, usize)> {
        m.layers
            .iter()
            .flat_map(|l| l.projections())
            .map(|p| (p.name.clone(), p.out_features(), p.in_features()))
            .collect()
    };
    assert_eq!(names(&hf), names(&gg));
    assert_eq!(names(&hf)[0].0, "model.layers.0.self_attn.q_proj");

    let a = hf.forward(&ids(), None).unwrap();
    let b = gg.forward(&ids(), None).unwrap();
    assert_eq!(a.dims(), &[2, 7, VOCAB]);
    assert!(
        max_rel_diff(&a, &b) < 1e-5,
        "GGUF rows were not un-permuted"
    );
}

#[test]
fn missing_tensor_is_named_in_the_error() {
    let dir = tempfile::tempdir().unwrap();
    let mut weights = random_weights();
    weights.remove("model.layers.1.mlp.up_proj.weight");
    write_hf(dir.path(), &weights);
    let err = Llama::from_hf_dir(dir.path(), FrozenFormat::F32, &Device::Cpu).unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("model.layers.1.mlp.up_proj.weight"), "{msg}");
    assert!(msg.contains("model.safetensors"), "{msg}");
}

/// The same decoder from plain differentiable candle ops (rope_slow, softmax, repeat of K/V),
/// all weights `Var`s: candle's autograd is the reference for our nodes' backward.
fn reference_forward(w: &HashMap<String, Var>, ids: &Tensor) -> Tensor {
    let g = |n: &str| w[n].as_tensor().clone();
    let rms = |x: &Tensor, gain: &Tensor| -> Tensor {
        let r = (x.sqr().unwrap().mean_keepdim(D::Minus1).unwrap() + 1e-5)
            .unwrap()
            .sqrt()
            .unwrap();
        x.broadcast_div(&r).unwrap().broadcast_mul(gain).unwrap()
    };
    let lin = |x: &Tensor, n: &str| x.broadcast_matmul(&g(n).t().unwrap()).unwrap();
    let (b, t) = ids.dims2().unwrap();
    let (dh, heads, kv) = (8, 4, 2);
    let inv: Vec<f32> = (0..dh / 2)
        .map(|i| 1.0 / 10000f32.powf(2.0 * i as f32 / dh as f32))
        .collect();
    let inv = Tensor::from_vec(inv, (1, dh / 2), &Device::Cpu).unwrap();
    let pos = Tensor::arange(0f32, t as f32, &Device::Cpu)
        .unwrap()
        .reshape((t, 1))
        .unwrap();
    let ang = pos.broadcast_mul(&inv).unwrap();
    let (cos, sin) = (ang.cos().unwrap(), ang.sin().unwrap());
    let mut mask = vec![0f32; t * t];
    for i in 0..t {
        for j in i + 1..t {
            mask[i * t + j] = f32::NEG_INFINITY;
        }
    }
    let mask = Tensor::from_vec(mask, (t, t), &Device::Cpu).unwrap();
    let emb = g("model.embed_tokens.weight");
    let mut h = emb
        .embedding(&ids.flatten_all().unwrap())
        .unwrap()
        .reshape((b, t, 32))
        .unwrap();
    for i in 0..2 {
        let p = format!("model.layers.{i}");
        let x = rms(&h, &g(&format!("{p}.input_layernorm.weight")));
        let split = |y: Tensor, n: usize| {
            y.reshape((b, t, n, dh))
                .unwrap()
                .transpose(1, 2)
                .unwrap()
                .contiguous()
                .unwrap()
        };
        let q = split(lin(&x, &format!("{p}.self_attn.q_proj.weight")), heads);
        let k = split(lin(&x, &format!("{p}.self_attn.k_proj.weight")), kv);
        let v = split(lin(&x, &format!("{p}.self_attn.v_proj.weight")), kv);
        let q = candle_nn::rotary_emb::rope_slow(&q, &cos, &sin).unwrap();
        let k = candle_nn::rotary_emb::rope_slow(&k, &cos, &sin).unwrap();
        let rep = |x: Tensor| {
            let x = x
                .unsqueeze(2)
                .unwrap()
                .broadcast_as((b, kv, 2, t, dh))
                .unwrap();
            x.contiguous().unwrap().reshape((b, heads, t, dh)).unwrap()
        };
        let (k, v) = (rep(k), rep(v));
        let s = (q.matmul(&k.t().unwrap()).unwrap() / (dh as f64).sqrt())
            .unwrap()
            .broadcast_add(&mask)
            .unwrap();
        let pr = candle_nn::ops::softmax(&s, D::Minus1).unwrap();
        let ctx = pr
            .matmul(&v)
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .reshape((b, t, 32))
            .unwrap();
        h = (h + lin(&ctx, &format!("{p}.self_attn.o_proj.weight"))).unwrap();
        let x = rms(&h, &g(&format!("{p}.post_attention_layernorm.weight")));
        let gate = lin(&x, &format!("{p}.mlp.gate_proj.weight"));
        let up = lin(&x, &format!("{p}.mlp.up_proj.weight"));
        let m = (candle_nn::ops::silu(&gate).unwrap() * up).unwrap();
        h = (h + lin(&m, &format!("{p}.mlp.down_proj.weight"))).unwrap();
    }
    let h = rms(&h, &g("model.norm.weight"));
    h.broadcast_matmul(&emb.t().unwrap()).unwrap()
}

#[test]
fn every_weight_gradient_matches_candle_autograd() {
    let weights = random_weights();
    let vars: HashMap<String, Var> = weights
        .iter()
        .map(|(k, t)| (k.clone(), Var::from_tensor(t).unwrap()))
        .collect();
    let as_weights: HashMap<String, Weight> = vars
        .iter()
        .map(|(k, v)| (k.clone(), Weight::Dense(v.as_tensor().clone())))
        .collect();
    let cfg: petl_trainer::models::llama::Config = serde_json::from_value(config()).unwrap();
    let ours = Llama::from_weights(cfg, as_weights, "test", &Device::Cpu).unwrap();

    // A loss that weights every logit differently, so every gradient path matters.
    let probe = Lcg(9).tensor(&[2, 7, VOCAB], 1.0);
    let loss_of = |logits: &Tensor| (logits * &probe).unwrap().sum_all().unwrap();
    let expected = reference_forward(&vars, &ids());
    let got = ours.forward(&ids(), None).unwrap();
    assert!(max_rel_diff(&got, &expected) < 1e-5);
    let g_ref = loss_of(&expected).backward().unwrap();
    let g_ours = loss_of(&got).backward().unwrap();
    for (name, v) in &vars {
        let a = g_ours
            .get(v.as_tensor())
            .unwrap_or_else(|| panic!("no gradient for {name}"));
        let b = g_ref.get(v.as_tensor()).unwrap();
        let rel = max_rel_diff(a, b);
        assert!(rel < 1e-4, "{name}: relative gradient error {rel}");
    }

    // The causal-LM loss is a mean of next-token cross-entropies: check it once by hand.
    let loss = ours
        .causal_lm_loss(&ids(), None)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    let logp = candle_nn::ops::log_softmax(&expected.narrow(1, 0, 6).unwrap(), D::Minus1).unwrap();
    let next = ids().narrow(1, 1, 6).unwrap().contiguous().unwrap();
    let picked = logp.gather(&next.unsqueeze(2).unwrap(), 2).unwrap();
    let want = -picked.mean_all().unwrap().to_scalar::<f32>().unwrap();
    assert!((loss - want).abs() < 1e-4, "{loss} vs {want}");
}

#[test]
fn quantized_frozen_weights_pass_gradients_to_the_input() {
    let dir = tempfile::tempdir().unwrap();
    write_hf(dir.path(), &random_weights());
    let dense = Llama::from_hf_dir(dir.path(), FrozenFormat::F32, &Device::Cpu).unwrap();
    let quant = Llama::from_hf_dir(
        dir.path(),
        FrozenFormat::Requantize(GgmlDType::Q8_0),
        &Device::Cpu,
    )
    .unwrap();
    assert_eq!(quant.layers[0].q_proj.weight.format(), GgmlDType::Q8_0);
    let h0 = Var::from_tensor(&Lcg(3).tensor(&[2, 7, 32], 1.0)).unwrap();
    let grad = |m: &Llama| {
        let bias = m.bias(7, None).unwrap();
        let out = m.run_layers(0..2, h0.as_tensor(), &bias).unwrap();
        let g = out.sqr().unwrap().sum_all().unwrap().backward().unwrap();
        g.get(h0.as_tensor()).unwrap().clone()
    };
    let rel = max_rel_diff(&grad(&quant), &grad(&dense));
    assert!(rel > 0.0 && rel < 5e-2, "Q8_0 input gradient off by {rel}");

    // An untracked forward records nothing, however many layers run.
    let hidden = quant.forward_hidden(&ids(), None).unwrap();
    assert_eq!(hidden.layers.len(), 3);
    assert!(hidden.layers.iter().all(|h| !h.track_op()) && !hidden.last.track_op());
}
