//! The Llama decoder on the real SmolLM2-135M-Instruct Q4_1 GGUF (fetched by
//! `scripts/setup/assets.sh`; `PETL_SMOLLM2_GGUF` overrides the path).

use std::sync::OnceLock;

use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::Optimizer;
use petl_trainer::models::gguf::{self, FrozenFormat, Tokenizer};
use petl_trainer::models::llama::Llama;
use petl_trainer::nn::LoraDelta;

fn model(format: FrozenFormat) -> (Llama, Tokenizer) {
    let path = gguf::smollm2_path();
    Llama::from_gguf(&path, format, &Device::Cpu)
        .unwrap_or_else(|e| panic!("{e} (run scripts/setup/assets.sh first)"))
}

/// The chosen in-memory format, loaded once for the tests that only read it.
fn shared() -> &'static (Llama, Tokenizer) {
    static MODEL: OnceLock<(Llama, Tokenizer)> = OnceLock::new();
    MODEL.get_or_init(|| model(FrozenFormat::Requantize(GgmlDType::Q8_0)))
}

fn encode(tok: &Tokenizer, text: &str) -> Vec<u32> {
    tok.encode(text, false).unwrap().get_ids().to_vec()
}

#[test]
fn greedy_decode_knows_the_capital_of_france() {
    let (model, tok) = shared();
    let prompt = encode(tok, "The capital of France is");
    let out = model.generate_greedy(&prompt, 6, None).unwrap();
    let text = tok.decode(&out, true).unwrap();
    assert!(text.contains("Paris"), "continuation was {text:?}");
}

#[test]
fn gguf_tokenizer_round_trips_text() {
    let (_, tok) = shared();
    for text in [
        "The capital of France is Paris.",
        "  leading spaces, tabs\tand\nnewlines",
        "Ünïcödé — émojis 🙂 and numbers 12345",
    ] {
        let ids = encode(tok, text);
        assert!(!ids.is_empty());
        assert_eq!(tok.decode(&ids, false).unwrap(), text);
    }
    // Byte-level BPE merges common words (with their leading space) into single tokens, and
    // SmolLM2 splits numbers into single digits.
    assert_eq!(encode(tok, "The capital of France is").len(), 5);
    assert_eq!(encode(tok, "2024").len(), 4);
}

#[test]
fn lora_on_quantized_backbone_trains_only_adapters_and_lowers_loss() {
    let (mut model, tok) = model(FrozenFormat::Requantize(GgmlDType::Q8_0));
    let dev = Device::Cpu;
    let mut vars = Vec::new();
    let mut seed = 7u64;
    let mut uniform = move || {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((seed >> 33) as f32 / (1u64 << 31) as f32) - 0.5
    };
    for proj in model.projections_mut() {
        if !(proj.name.ends_with("q_proj") || proj.name.ends_with("v_proj")) {
            continue;
        }
        let (r, i, o) = (4, proj.in_features(), proj.out_features());
        let a: Vec<f32> = (0..r * i).map(|_| uniform() * 0.1).collect();
        let a = Var::from_tensor(&Tensor::from_vec(a, (r, i), &dev).unwrap()).unwrap();
        let b = Var::zeros((o, r), DType::F32, &dev).unwrap();
        proj.lora = Some(LoraDelta {
            a: a.as_tensor().clone(),
            b: b.as_tensor().clone(),
            scale: 2.0,
            dropout: None,
        });
        vars.push(a);
        vars.push(b);
    }
    assert_eq!(vars.len(), 2 * 2 * model.layers.len());

    let text = "Rust is a language empowering everyone to build reliable and efficient software.";
    let ids = encode(&tok, text);
    let ids = Tensor::new(ids.as_slice(), &dev)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let mut opt = candle_nn::AdamW::new(
        vars.clone(),
        candle_nn::ParamsAdamW {
            lr: 1e-2,
            ..Default::default()
        },
    )
    .unwrap();
    let mut losses = Vec::new();
    for step in 0..4 {
        let loss = model.causal_lm_loss(&ids, None).unwrap();
        losses.push(loss.to_scalar::<f32>().unwrap());
        let grads = loss.backward().unwrap();
        let lora_ids: Vec<_> = vars.iter().map(|v| v.id()).collect();
        for id in grads.get_ids() {
            assert!(
                lora_ids.contains(id),
                "a gradient exists for a non-LoRA tensor"
            );
        }
        if step == 0 {
            // B starts at zero, so the first step moves B only: its gradient must be non-zero.
            let b = vars[1].as_tensor();
            let g = grads.get(b).expect("no gradient for lora_B");
            assert!(
                g.abs()
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap()
                    > 0.0
            );
        }
        opt.step(&grads).unwrap();
    }
    assert!(losses[3] < losses[0] - 0.1, "loss did not drop: {losses:?}");
}
