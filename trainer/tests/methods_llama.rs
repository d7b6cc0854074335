//! LoRA, LST and UniPT through the same `Method` code as on BERT, on the real SmolLM2-135M-Instruct GGUF
//! (fetched by `scripts/setup/assets.sh`; Q4_1 in the file, Q8_0 in memory, frozen): only the
//! method's own parameters get gradients, and a few steps on one batch lower its loss. The
//! methods that would train the quantized weights refuse this backbone with a message.

use std::collections::HashSet;
use std::sync::OnceLock;

use candle_core::quantized::GgmlDType;
use candle_core::{Device, Tensor};
use petl_crds::{
    LoraConfig, LstConfig, MethodConfig, MethodSpec, MethodType, Schedule, UniptConfig,
};
use petl_trainer::data::Batch;
use petl_trainer::methods::{self, Method};
use petl_trainer::models::gguf::{self, FrozenFormat, Tokenizer};
use petl_trainer::models::llama::Llama;
use petl_trainer::tape;
use petl_trainer::train::{TrainConfig, Trainer};

/// The model, loaded once; each method gets a clone (the quantized weights are shared).
fn smollm2() -> &'static (Llama, Tokenizer) {
    static MODEL: OnceLock<(Llama, Tokenizer)> = OnceLock::new();
    MODEL.get_or_init(|| {
        let path = gguf::smollm2_path();
        Llama::from_gguf(
            &path,
            FrozenFormat::Requantize(GgmlDType::Q8_0),
            &Device::Cpu,
        )
        .unwrap_or_else(|e| panic!("{e} (run scripts/setup/assets.sh first)"))
    })
}

/// Four short reviews of different lengths (so rows are padded), two labels.
fn batch(tok: &Tokenizer) -> Batch {
    let rows = [
        ("A warm, funny and beautifully acted film.", 0u32),
        ("Dull.", 1),
        (
            "One of the best movies I have seen this year, truly moving.",
            0,
        ),
        ("The plot makes no sense and the jokes fall flat.", 1),
    ];
    let encoded: Vec<Vec<u32>> = rows
        .iter()
        .map(|(text, _)| tok.encode(*text, false).unwrap().get_ids().to_vec())
        .collect();
    let width = encoded.iter().map(Vec::len).max().unwrap();
    let (mut ids, mut mask) = (Vec::new(), Vec::new());
    for e in &encoded {
        ids.extend(
            e.iter()
                .copied()
                .chain(std::iter::repeat_n(0, width - e.len())),
        );
        mask.extend(
            std::iter::repeat_n(1u32, e.len()).chain(std::iter::repeat_n(0, width - e.len())),
        );
    }
    let dev = Device::Cpu;
    Batch {
        input_ids: Tensor::from_vec(ids, (rows.len(), width), &dev).unwrap(),
        attention_mask: Tensor::from_vec(mask, (rows.len(), width), &dev).unwrap(),
        labels: Tensor::from_vec(rows.iter().map(|r| r.1).collect::<Vec<_>>(), 4, &dev).unwrap(),
    }
}

fn build(config: &MethodConfig) -> Box<dyn Method> {
    let (model, _) = smollm2();
    methods::build(config, Box::new(model.clone()), 2, 7).unwrap()
}

/// One backward: the gradient store holds exactly the method's parameters, each of them.
fn assert_only_parameters_get_gradients(method: &dyn Method, batch: &Batch) {
    let logits = method
        .forward(&batch.input_ids, &batch.attention_mask)
        .unwrap();
    assert_eq!(logits.dims(), [4, 2]);
    let grads = tape::cross_entropy(&logits, &batch.labels, None)
        .unwrap()
        .backward()
        .unwrap();
    let params = method.parameters();
    for (name, v) in &params {
        assert!(grads.get(v.as_tensor()).is_some(), "{name} got no gradient");
    }
    let param_ids: HashSet<_> = params.iter().map(|(_, v)| v.as_tensor().id()).collect();
    let stored: HashSet<_> = grads.get_ids().copied().collect();
    assert_eq!(
        stored, param_ids,
        "the gradient store holds tensors that are not the method's parameters"
    );
}

/// Training losses of `steps` steps on the same batch.
fn train(method: Box<dyn Method>, batch: &Batch, steps: u64, lr: f64) -> Vec<f64> {
    let mut trainer = Trainer::new(
        method,
        TrainConfig {
            max_steps: Some(steps),
            epochs: None,
            max_seconds: None,
            learning_rate: lr,
            weight_decay: 0.0,
            warmup_steps: 0,
            schedule: Schedule::Constant,
            grad_clip: 1.0,
            seed: 7,
            eval_every_steps: 0,
            divergence_check_every: 0,
        },
    );
    (0..steps)
        .map(|_| trainer.train_step(batch, lr).unwrap().0)
        .collect()
}

#[test]
fn lora_on_quantized_smollm2_trains_only_its_adapters_and_lowers_the_loss() {
    let batch = batch(&smollm2().1);
    let config = MethodConfig::Lora(LoraConfig {
        rank: 4,
        target_modules: vec!["q_proj".into(), "v_proj".into()],
        ..Default::default()
    });
    let method = build(&config);
    let names: Vec<String> = method.parameters().into_iter().map(|(n, _)| n).collect();
    // 30 layers × (q, v) × (A, B), plus the head; PEFT's names for `LlamaModel`.
    assert_eq!(names.len(), 30 * 2 * 2 + 2);
    assert!(
        names.contains(&"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight".into())
    );
    assert_only_parameters_get_gradients(method.as_ref(), &batch);
    let losses = train(method, &batch, 6, 1e-2);
    eprintln!("LoRA on SmolLM2, training losses: {losses:?}");
    assert!(
        losses[5] < losses[0] - 0.1,
        "LoRA's loss did not fall: {losses:?}"
    );
}

#[test]
fn lst_on_quantized_smollm2_trains_only_its_side_network_and_lowers_the_loss() {
    let batch = batch(&smollm2().1);
    let config = MethodConfig::Lst(LstConfig {
        reduction: 8,
        // Six of the 30 layers keep the side network small and the test fast.
        layers: Some(vec![4, 9, 14, 19, 24, 29]),
        gate_init: 0.0,
        init_from_backbone: Some(false),
    });
    let method = build(&config);
    assert!(
        method
            .parameters()
            .iter()
            .all(|(n, _)| n.starts_with("side.") || n.starts_with("classifier."))
    );
    assert_only_parameters_get_gradients(method.as_ref(), &batch);
    let losses = train(method, &batch, 6, 3e-3);
    eprintln!("LST on SmolLM2, training losses: {losses:?}");
    assert!(
        losses[5] < losses[0] - 0.1,
        "LST's loss did not fall: {losses:?}"
    );
}

#[test]
fn unipt_on_quantized_smollm2_trains_only_its_parallel_network_and_lowers_the_loss() {
    let batch = batch(&smollm2().1);
    let method = build(&MethodConfig::Unipt(UniptConfig::default()));
    let names: Vec<String> = method.parameters().into_iter().map(|(n, _)| n).collect();
    // 31 taps × (linear weight, bias, norm gain, shift), the projection's four, the gate, the
    // up-projection's weight and bias, and the head.
    assert_eq!(names.len(), 31 * 4 + 4 + 1 + 2 + 2);
    assert!(
        names
            .iter()
            .all(|n| n.starts_with("unipt.") || n.starts_with("classifier."))
    );
    assert_only_parameters_get_gradients(method.as_ref(), &batch);
    let losses = train(method, &batch, 6, 3e-3);
    eprintln!("UniPT on SmolLM2, training losses: {losses:?}");
    assert!(
        losses[5] < losses[0] - 0.1,
        "UniPT's loss did not fall: {losses:?}"
    );
}

#[test]
fn methods_that_would_train_quantized_or_absent_tensors_refuse_by_name() {
    let (model, _) = smollm2();
    let refusal = |config: &MethodConfig| {
        methods::build(config, Box::new(model.clone()), 2, 7)
            .err()
            .unwrap_or_else(|| panic!("{:?} built on a quantized Llama", config.method_type()))
            .to_string()
    };
    let full = refusal(&MethodSpec::of_type(MethodType::Full).config());
    assert!(
        full.contains("block-quantized") && full.contains("embed_tokens"),
        "{full}"
    );
    let bitfit = refusal(&MethodSpec::of_type(MethodType::Bitfit).config());
    assert!(bitfit.contains("bias"), "{bitfit}");
    // LST's pruned initialisation copies BERT-style blocks, which Llama lacks: asked for, it is
    // refused; unset, LST starts its side network randomly.
    let lst = refusal(&MethodConfig::Lst(LstConfig {
        init_from_backbone: Some(true),
        ..LstConfig::default()
    }));
    assert!(lst.contains("initFromBackbone"), "{lst}");
    methods::build(
        &MethodSpec::of_type(MethodType::Lst).config(),
        Box::new(model.clone()),
        2,
        7,
    )
    .unwrap();
    // VQT runs query tokens through the blocks, which the Llama backbone does not offer.
    let vqt = methods::build(
        &MethodSpec::of_type(MethodType::Vqt).config(),
        Box::new(model.clone()),
        2,
        7,
    );
    assert!(
        matches!(vqt, Err(petl_trainer::Error::NoQueryBlocks { .. })),
        "VQT on Llama was not refused with NoQueryBlocks"
    );
    let lora = refusal(&MethodSpec::of_type(MethodType::Lora).config());
    assert!(
        lora.contains("q_proj"),
        "BERT's default targets must name Llama's: {lora}"
    );
}
