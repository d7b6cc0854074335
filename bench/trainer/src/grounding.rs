//! `--task grounding`: R²-Tuning's video-grounding task built from real MNIST frames
//! (`petl_trainer::grounding`). The frozen DINOv2 ViT-S/14 and MiniLM encode the frames and the
//! ten queries once; then R² (the block recurrent over the last `k` layers) and the
//! no-recurrence baseline (the same block and heads on the last layer alone) train on the same
//! clips with the same budget, in this process, one after the other. The chance baselines
//! (a uniformly random span; the best fixed span on the training clips) are scored the same way.

use anyhow::{Context, Result};
use petl_trainer::grounding::data::{ClipConfig, make_clips};
use petl_trainer::grounding::metrics::Scores;
use petl_trainer::grounding::model::ModelConfig;
use petl_trainer::grounding::task::{TaskConfig, encode};
use petl_trainer::grounding::train::{TrainConfig, chance_scores, train_and_evaluate};
use petl_trainer::source::Resolver;

/// The grounding table's budget.
pub struct GroundingArgs {
    pub steps: usize,
    pub batch: usize,
    pub lr: f64,
    pub dims: usize,
    /// Tapped layers of each model trained (1: no recurrence).
    pub models: Vec<usize>,
    pub dropout: f64,
    /// Weight of the layer-wise calibration loss.
    pub calibration: f64,
    pub frames: usize,
    pub train_clips: usize,
    pub eval_clips: usize,
    pub train_images: usize,
    pub eval_images: usize,
    pub seed: u64,
}

fn row(name: &str, s: &Scores, rest: &str) {
    println!(
        "| {name} | {:.3} | {:.3} | {:.3} | {rest} |",
        s.r1_at_05, s.r1_at_07, s.map
    );
}

pub fn table(a: &GroundingArgs, load_before: &str) -> Result<()> {
    let task = TaskConfig {
        train_images: a.train_images,
        eval_images: a.eval_images,
        size: 56,
        layers: a.models.iter().copied().max().unwrap_or(1),
    };
    let encoded = encode(&task, &Resolver::from_env())
        .context("encoding the MNIST frames and the queries (run scripts/setup/assets.sh)")?;
    let clips = ClipConfig {
        frames: a.frames,
        min_span: 2,
        max_span: a.frames / 2,
    };
    let train = make_clips(&encoded.train.labels, a.train_clips, &clips, a.seed)?;
    let eval = make_clips(&encoded.eval.labels, a.eval_clips, &clips, a.seed + 1)?;
    let (uniform, fixed) = chance_scores(&train, &eval, a.frames);
    let budget = TrainConfig {
        steps: a.steps,
        batch: a.batch,
        learning_rate: a.lr,
        seed: a.seed,
        ..TrainConfig::default()
    };
    let mut runs = Vec::new();
    for &layers in &a.models {
        let name = match layers {
            1 => "no recurrence (last layer only)".to_string(),
            k => format!("R² (last {k} layers)"),
        };
        let model = ModelConfig {
            layers,
            dims: a.dims,
            dropout: a.dropout,
            calibration_weight: a.calibration,
            ..ModelConfig::default()
        };
        let outcome = train_and_evaluate(
            model,
            &budget,
            (&train, &encoded.train),
            (&eval, &encoded.eval),
            &encoded.queries,
        )
        .with_context(|| format!("training {name}"))?;
        eprintln!(
            "{name}: loss {:.3} → {:.3}, R@1@0.5 {:.3}",
            outcome.first_loss, outcome.last_loss, outcome.scores.r1_at_05
        );
        runs.push((name, outcome));
    }
    println!(
        "R²-Tuning grounding on real MNIST frames: clips of {} frames (one span of 2–{} frames shows \
         the queried digit), {} training clips over {} images, {} held-out clips over {} other \
         images; DINOv2 ViT-S/14 at 56 px and MiniLM frozen (features encoded once, {:.1} s); \
         {} steps × {} clips, AdamW lr {}, block width {}, calibration weight {}. Load before: {load_before}; after: {}",
        a.frames,
        a.frames / 2,
        a.train_clips,
        encoded.train.labels.len(),
        a.eval_clips,
        encoded.eval.labels.len(),
        encoded.seconds,
        a.steps,
        a.batch,
        a.lr,
        a.dims,
        a.calibration,
        super::load_average()
    );
    println!();
    println!("| model | R@1@0.5 | R@1@0.7 | mAP | trainable | step peak MiB | s/step |");
    println!("|---|---|---|---|---|---|---|");
    row("uniform random span (exact)", &uniform, "0 | – | –");
    row("best fixed span on the training clips", &fixed, "0 | – | –");
    for (name, o) in &runs {
        row(
            name,
            &o.scores,
            &format!(
                "{} | {:.1} | {:.3}",
                o.trainable,
                o.peak_bytes as f64 / (1 << 20) as f64,
                o.step_seconds
            ),
        );
    }
    Ok(())
}
