//! R²-Tuning's grounding task on real MNIST frames (`petl_trainer::grounding`), at a budget CI
//! affords: the block and heads on the last layer (the no-recurrence model, which escapes the
//! initial plateau soonest) find the queried digit's span on held-out clips (frames never seen in
//! training) far more often than the chance baselines; the full R² recurrence over 4 layers
//! trains (its loss falls). The budget at which R² itself grounds is measured by
//! `petl-bench-trainer --task grounding` (bench/README.md).
//! `cargo test -p petl-trainer --test grounding_mnist -- --nocapture` prints the numbers.

use std::time::Instant;

use petl_trainer::grounding::data::{ClipConfig, make_clips};
use petl_trainer::grounding::model::ModelConfig;
use petl_trainer::grounding::task::{TaskConfig, encode};
use petl_trainer::grounding::train::{TrainConfig, chance_scores, train_and_evaluate};
use petl_trainer::source::Resolver;

#[test]
fn the_block_grounds_the_queried_digit_far_above_chance_on_held_out_clips() {
    let started = Instant::now();
    let task = TaskConfig {
        train_images: 300,
        eval_images: 150,
        size: 56,
        layers: 4,
    };
    let encoded = encode(&task, &Resolver::from_env())
        .unwrap_or_else(|e| panic!("{e} (run scripts/setup/assets.sh)"));
    let clips = ClipConfig::default();
    let train = make_clips(&encoded.train.labels, 600, &clips, 1).unwrap();
    let eval = make_clips(&encoded.eval.labels, 150, &clips, 2).unwrap();
    let (uniform, fixed) = chance_scores(&train, &eval, clips.frames);
    let run = |layers: usize, steps: usize, batch: usize| {
        let model = ModelConfig {
            layers,
            ..ModelConfig::default()
        };
        let budget = TrainConfig {
            steps,
            batch,
            ..TrainConfig::default()
        };
        let eval = (&eval[..], &encoded.eval);
        train_and_evaluate(
            model,
            &budget,
            (&train, &encoded.train),
            eval,
            &encoded.queries,
        )
        .unwrap()
    };
    let last = run(1, 200, 16);
    let r2 = run(4, 10, 8);
    eprintln!(
        "encoding {:.1} s; chance R@1@0.5 {:.3} (uniform span), {:.3} (best fixed span); last \
         layer: R@1@0.5 {:.3} R@1@0.7 {:.3} mAP {:.3}, loss {:.3} → {:.3}, {:.3} s/step; R² \
         (4 layers, 10 steps): loss {:.3} → {:.3}, {:.3} s/step; {:.1} s in all",
        encoded.seconds,
        uniform.r1_at_05,
        fixed.r1_at_05,
        last.scores.r1_at_05,
        last.scores.r1_at_07,
        last.scores.map,
        last.first_loss,
        last.last_loss,
        last.step_seconds,
        r2.first_loss,
        r2.last_loss,
        r2.step_seconds,
        started.elapsed().as_secs_f64()
    );
    assert!(last.last_loss < last.first_loss, "the loss did not fall");
    assert!(r2.last_loss < r2.first_loss, "R²'s loss did not fall");
    let chance = uniform.r1_at_05.max(fixed.r1_at_05);
    assert!(
        last.scores.r1_at_05 > chance + 0.15,
        "R@1@0.5 {} is not clearly above chance {chance}",
        last.scores.r1_at_05
    );
}
