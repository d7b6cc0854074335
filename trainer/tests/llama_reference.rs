//! Our Llama forward against candle-transformers' `quantized_llama` on the real SmolLM2 GGUF.
//! Both run the file's exact weights in f32 (`CANDLE_DEQUANTIZE_ALL`, set before any model
//! loads; this file is its own test process), so they must agree to rounding: quantised kernels
//! would add activation-quantisation noise of a few percent that says nothing about structure.

use candle_core::quantized::gguf_file;
use candle_core::{Device, Tensor};
use petl_trainer::models::gguf::{self, FrozenFormat};
use petl_trainer::models::llama::Llama;

#[test]
fn logits_match_candle_quantized_llama() {
    // SAFETY: the only test in this process; nothing reads the environment concurrently.
    unsafe { std::env::set_var("CANDLE_DEQUANTIZE_ALL", "1") };
    let path = gguf::smollm2_path();
    let (ours, tok) = Llama::from_gguf(&path, FrozenFormat::F32, &Device::Cpu)
        .unwrap_or_else(|e| panic!("{e} (run scripts/setup/assets.sh first)"));
    let mut file = std::fs::File::open(&path).unwrap();
    let content = gguf_file::Content::read(&mut file).unwrap();
    let mut reference = candle_transformers::models::quantized_llama::ModelWeights::from_gguf(
        content,
        &mut file,
        &Device::Cpu,
    )
    .unwrap();

    let ids = tok
        .encode("The quick brown fox jumps over the lazy dog because", false)
        .unwrap()
        .get_ids()
        .to_vec();
    assert!(ids.len() > 5);
    let input = Tensor::new(ids.as_slice(), &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let expected = reference.forward(&input, 0).unwrap().squeeze(0).unwrap();
    let got = ours
        .forward(&input, None)
        .unwrap()
        .get(0)
        .unwrap()
        .get(ids.len() - 1)
        .unwrap();

    let norm = |t: &Tensor| {
        t.sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
            .sqrt()
    };
    let rel = norm(&(&got - &expected).unwrap()) / norm(&expected);
    assert!(rel < 1e-4, "relative L2 logit difference {rel}");
    let argmax = |t: &Tensor| t.argmax(0).unwrap().to_scalar::<u32>().unwrap();
    assert_eq!(argmax(&got), argmax(&expected));
}
