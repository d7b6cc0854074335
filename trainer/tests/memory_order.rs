//! Measured (not timed) step memory on one fixed batch: every side method (LST, VQT, UniPT,
//! R²-Tuning, SHERL) needs less than LoRA, which needs less than full fine-tuning, on MiniLM's
//! shape; on the ViT-S/14's shape LoRA and BitFit need less than full fine-tuning too.
//! One test in this binary, so no other test's allocations land in the counter.

use candle_core::{DType, Device, Tensor};
use petl_crds::{LoraConfig, LstConfig, MethodConfig, R2Config, UniptConfig, VqtConfig};
use petl_trainer::data::Batch;
use petl_trainer::init::Rng;
use petl_trainer::memory::{self, CountingAllocator};
use petl_trainer::methods;
use petl_trainer::models::Backbone;
use petl_trainer::models::bert::{Bert, Config};
use petl_trainer::models::vit::{self, Vit};
use petl_trainer::train::{TrainConfig, Trainer};

#[global_allocator]
static ALLOC: CountingAllocator = CountingAllocator;

/// MiniLM's shape (random weights: the memory of a step does not depend on their values).
fn minilm_shaped() -> Bert {
    let config = Config::with_shape(30522, 384, 6, 12, 1536, 512);
    Bert::random(config, 3, DType::F32, &Device::Cpu).unwrap()
}

fn fixed_batch() -> Batch {
    let (b, t) = (8, 64);
    let mut rng = Rng::new(9);
    let ids: Vec<u32> = (0..b * t)
        .map(|_| 1000 + (rng.uniform() * 20000.0) as u32)
        .collect();
    Batch {
        input_ids: Tensor::from_vec(ids, (b, t), &Device::Cpu).unwrap(),
        attention_mask: Tensor::ones((b, t), DType::U32, &Device::Cpu).unwrap(),
        labels: Tensor::from_vec(
            (0..b as u32).map(|i| i % 2).collect::<Vec<_>>(),
            b,
            &Device::Cpu,
        )
        .unwrap(),
    }
}

/// Peak heap bytes of one training step after a warm-up step (so optimiser moments and gemm's
/// pack buffers already exist), measured above the heap level before the method was built.
fn step_peak(config: &MethodConfig, batch: &Batch) -> (usize, usize) {
    step_peak_on(config, || Box::new(minilm_shaped()), batch)
}

fn step_peak_on(
    config: &MethodConfig,
    backbone: impl FnOnce() -> Box<dyn Backbone>,
    batch: &Batch,
) -> (usize, usize) {
    let before = memory::current_bytes();
    let method = methods::build(config, backbone(), 2, 1).unwrap();
    let mut trainer = Trainer::new(
        method,
        TrainConfig {
            max_steps: Some(2),
            epochs: None,
            max_seconds: None,
            learning_rate: 1e-4,
            weight_decay: 0.0,
            warmup_steps: 0,
            schedule: Default::default(),
            grad_clip: 1.0,
            seed: 1,
            eval_every_steps: 0,
            divergence_check_every: 0,
        },
    );
    trainer.train_step(batch, 1e-4).unwrap();
    let resting = memory::current_bytes();
    memory::reset_peak();
    trainer.train_step(batch, 1e-4).unwrap();
    let peak = memory::peak_bytes();
    (peak - before, peak - resting)
}

#[test]
fn side_methods_need_less_step_memory_than_lora_which_needs_less_than_full() {
    let batch = fixed_batch();
    let _ = step_peak(&MethodConfig::Lst(LstConfig::default()), &batch); // warm gemm's buffers
    let mib = |b: usize| b as f64 / (1 << 20) as f64;
    let mut peaks = Vec::new();
    for (name, config) in [
        ("full", MethodConfig::Full(Default::default())),
        ("lora", MethodConfig::Lora(LoraConfig::default())),
        ("bitfit", MethodConfig::Bitfit(Default::default())),
        ("lst", MethodConfig::Lst(LstConfig::default())),
        ("vqt", MethodConfig::Vqt(VqtConfig::default())),
        ("unipt", MethodConfig::Unipt(UniptConfig::default())),
        ("r2", MethodConfig::R2(R2Config::default())),
        (
            "sherl",
            MethodConfig::Sherl(petl_crds::SherlConfig::default()),
        ),
    ] {
        let (total, step) = step_peak(&config, &batch);
        eprintln!(
            "{name:>6}: peak {:7.1} MiB above start, {:7.1} MiB above the resting state",
            mib(total),
            mib(step)
        );
        peaks.push((name, total, step));
    }
    let total = |n: &str| peaks.iter().find(|p| p.0 == n).unwrap().1;
    let step = |n: &str| peaks.iter().find(|p| p.0 == n).unwrap().2;
    assert!(memory::is_counting());
    assert!(total("lst") < total("lora"), "{peaks:?}");
    assert!(total("vqt") < total("lora"), "{peaks:?}");
    assert!(step("vqt") < step("lora"), "{peaks:?}");
    assert!(total("lora") < total("full"), "{peaks:?}");
    assert!(step("lst") < step("lora"), "{peaks:?}");
    assert!(total("unipt") < total("lora"), "{peaks:?}");
    assert!(step("unipt") < step("lora"), "{peaks:?}");
    assert!(total("r2") < total("lora"), "{peaks:?}");
    assert!(step("r2") < step("lora"), "{peaks:?}");
    assert!(total("sherl") < total("lora"), "{peaks:?}");
    assert!(step("sherl") < step("lora"), "{peaks:?}");
    assert!(step("lora") < step("full"), "{peaks:?}");

    // The ViT-S/14's shape at 112 px (65 tokens), 4 images. LoRA's and BitFit's steps once kept
    // more than full fine-tuning's: candle's ops gave the frozen LayerScale vectors full-size
    // gradients (now the tape's `scaled_residual`).
    let images = image_batch(4, 112);
    let vit = || -> Box<dyn Backbone> {
        let config = vit::Config::with_shape(384, 12, 6, 14, 518);
        Box::new(Vit::random(config, 3, DType::F32, &Device::Cpu).unwrap())
    };
    let mut vit_steps = Vec::new();
    for (name, config) in [
        ("full", MethodConfig::Full(Default::default())),
        ("lora", MethodConfig::Lora(LoraConfig::default())),
        ("bitfit", MethodConfig::Bitfit(Default::default())),
    ] {
        let (_, step) = step_peak_on(&config, vit, &images);
        eprintln!(
            "vit {name:>6}: {:7.1} MiB above the resting state",
            mib(step)
        );
        vit_steps.push((name, step));
    }
    let step = |n: &str| vit_steps.iter().find(|p| p.0 == n).unwrap().1;
    // Measured: 102.6 and 103.2 MiB against full fine-tuning's 189.7 (0.54×); 147.2 and 147.9
    // (0.74×) while the LayerScale gradients were kept.
    assert!(
        (step("lora") as f64) < 0.65 * step("full") as f64,
        "{vit_steps:?}"
    );
    assert!(
        (step("bitfit") as f64) < 0.65 * step("full") as f64,
        "{vit_steps:?}"
    );
}

/// `b` random images of `px`² pixels in 2 classes.
fn image_batch(b: usize, px: usize) -> Batch {
    let mut rng = Rng::new(9);
    let pixels: Vec<f32> = (0..b * 3 * px * px).map(|_| rng.uniform() as f32).collect();
    Batch {
        input_ids: Tensor::from_vec(pixels, (b, 3, px, px), &Device::Cpu).unwrap(),
        attention_mask: Tensor::ones((b, 1), DType::U32, &Device::Cpu).unwrap(),
        labels: Tensor::from_vec(
            (0..b as u32).map(|i| i % 2).collect::<Vec<_>>(),
            b,
            &Device::Cpu,
        )
        .unwrap(),
    }
}
