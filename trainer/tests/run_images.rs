//! `petl run` on image jobs end to end, on the real DINOv2 ViT-S/14 and real images cut to tiny
//! budgets: `examples/head-vit-mnist.yaml` (the linear probe) publishes the head with a manifest
//! that pins the ONNX file; `examples/lora-vit-mnist.yaml` and `examples/lst-vit-textiles.yaml`
//! train LoRA and LST through the same `Method` code as text.

use std::path::Path;

use petl_crds::DatasetFormat;
use petl_trainer::cli::load_job;
use petl_trainer::export::read_adapter;
use petl_trainer::manifest::{Manifest, sha256_file};
use petl_trainer::run::{RunOptions, run_job};
use petl_trainer::source::Resolver;

#[test]
fn the_vit_mnist_example_trains_the_probe_and_publishes_it() {
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/head-vit-mnist.yaml");
    let (name, mut spec) = load_job(&example).unwrap();
    assert_eq!(spec.dataset.format, DatasetFormat::PixelCsv);
    let out = tempfile::tempdir().unwrap();
    spec.output.uri = format!("file://{}", out.path().display());
    spec.dataset.max_samples = Some(200);
    spec.training.epochs = None;
    spec.training.max_steps = Some(25);
    spec.training.warmup_steps = 0;
    spec.training.batch_size = 20;
    spec.training.learning_rate = 3e-2;

    let outcome = run_job(&spec, &RunOptions::single(&name)).unwrap();
    let manifest = Manifest::read(out.path()).unwrap();
    assert_eq!(manifest.method, "head");
    assert_eq!(manifest.metrics.steps, 25);
    assert_eq!(manifest.metrics.train_examples, 200);
    assert_eq!(manifest.trainable_parameters, 384 * 10 + 10);
    let accuracy = manifest.metrics.eval_metric.unwrap();
    eprintln!(
        "head on ViT-S/14, MNIST at 56 px: 25 steps of 20 images, validation accuracy {accuracy:.3} \
         on {} images ({:.1} s)",
        manifest.metrics.validation_examples, outcome.metrics.wall_seconds
    );
    // Ten classes: chance is 0.1; measured 0.435 after 500 images (the standardised full-batch
    // probe of vit_probe.rs reaches 0.77: this only shows the loop learns through the ViT).
    assert!(accuracy > 0.3, "validation accuracy {accuracy}");
    let onnx = Resolver::from_env().input(&spec.model.uri).unwrap();
    assert_eq!(
        manifest.base_model.digest,
        format!("sha256:{}", sha256_file(&onnx).unwrap())
    );
    for file in &manifest.files {
        assert_eq!(
            sha256_file(&out.path().join(&file.path)).unwrap(),
            file.sha256
        );
    }
}

fn example(
    file: &str,
    budget: impl FnOnce(&mut petl_crds::PetlJobSpec),
) -> (Manifest, tempfile::TempDir) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../examples")
        .join(file);
    let (name, mut spec) = load_job(&path).unwrap();
    let out = tempfile::tempdir().unwrap();
    spec.output.uri = format!("file://{}", out.path().display());
    spec.training.epochs = None;
    budget(&mut spec);
    let outcome = run_job(&spec, &RunOptions::single(&name)).unwrap();
    let manifest = Manifest::read(out.path()).unwrap();
    eprintln!(
        "{file}: {} steps, {} training images, validation accuracy {:?} on {}, {} trainable, \
         peak {:.1} MiB, {:.1} s",
        manifest.metrics.steps,
        manifest.metrics.train_examples,
        manifest.metrics.eval_metric,
        manifest.metrics.validation_examples,
        manifest.trainable_parameters,
        outcome.metrics.peak_memory_bytes as f64 / (1 << 20) as f64,
        outcome.metrics.wall_seconds
    );
    (manifest, out)
}

#[test]
fn lora_on_the_vit_trains_and_exports_peft_names_of_the_dinov2_modules() {
    let (manifest, out) = example("lora-vit-mnist.yaml", |spec| {
        spec.dataset.max_samples = Some(200);
        spec.training.max_steps = Some(20);
        spec.training.batch_size = 20;
    });
    assert_eq!(manifest.method, "lora");
    assert_eq!(manifest.metrics.steps, 20);
    // Ten classes: chance is 0.1.
    let accuracy = manifest.metrics.eval_metric.unwrap();
    assert!(accuracy > 0.3, "validation accuracy {accuracy}");
    let adapter = read_adapter(out.path(), &candle_core::Device::Cpu).unwrap();
    for layer in 0..12 {
        for module in ["query", "value"] {
            let a = format!("encoder.layer.{layer}.attention.attention.{module}.lora_A.weight");
            let shape = adapter
                .tensors
                .get(&a)
                .unwrap_or_else(|| panic!("{a}"))
                .dims();
            assert_eq!(shape, [8, 384], "{a}");
        }
    }
}

#[test]
fn lst_on_the_vit_trains_a_side_network_on_the_textile_photos() {
    let (manifest, _out) = example("lst-vit-textiles.yaml", |spec| {
        spec.dataset.max_samples = Some(150);
        spec.training.max_steps = Some(15);
        spec.training.batch_size = 10;
    });
    assert_eq!(manifest.method, "lst");
    assert_eq!(manifest.metrics.steps, 15);
    // Three classes: chance is 1/3.
    let accuracy = manifest.metrics.eval_metric.unwrap();
    assert!(accuracy > 0.45, "validation accuracy {accuracy}");
}
