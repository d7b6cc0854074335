//! R²-Tuning's grounding task on real MNIST frames (`petl_trainer::grounding`): after a small
//! budget the R² block finds the queried digit's span on held-out clips (frames never seen in
//! training) far more often than the chance baselines.
//! `cargo test -p petl-trainer --test grounding_mnist -- --nocapture` prints the numbers.

use std::time::Instant;

use petl_trainer::grounding::data::{ClipConfig, make_clips};
use petl_trainer::grounding::model::ModelConfig;
use petl_trainer::grounding::task::{TaskConfig, encode};
use petl_trainer::grounding::train::{TrainConfig, chance_scores, train_and_evaluate};
use petl_trainer::source::Resolver;

#[test]
fn r2_grounds_the_queried_digit_far_above_chance_on_held_out_clips() {
    let started = Instant::now();
    let task = TaskConfig {
        train_images: 400,
        eval_images: 200,
        size: 56,
        layers: 4,
    };
    let encoded = encode(&task, &Resolver::from_env())
        .unwrap_or_else(|e| panic!("{e} (run scripts/setup/assets.sh)"));
    let clips = ClipConfig::default();
    let train = make_clips(&encoded.train.labels, 800, &clips, 1).unwrap();
    let eval = make_clips(&encoded.eval.labels, 200, &clips, 2).unwrap();
    let (uniform, fixed) = chance_scores(&train, &eval, clips.frames);
    let budget = TrainConfig {
        steps: 150,
        batch: 16,
        ..TrainConfig::default()
    };
    let r2 = train_and_evaluate(
        ModelConfig::default(),
        &budget,
        (&train, &encoded.train),
        (&eval, &encoded.eval),
        &encoded.queries,
    )
    .unwrap();
    eprintln!(
        "encoding {:.1} s; chance R@1@0.5 {:.3} (uniform span), {:.3} (best fixed span); R² \
         R@1@0.5 {:.3} R@1@0.7 {:.3} mAP {:.3}, loss {:.3} → {:.3}, {:.3} s/step, {} trainable; \
         {:.1} s in all",
        encoded.seconds,
        uniform.r1_at_05,
        fixed.r1_at_05,
        r2.scores.r1_at_05,
        r2.scores.r1_at_07,
        r2.scores.map,
        r2.first_loss,
        r2.last_loss,
        r2.step_seconds,
        r2.trainable,
        started.elapsed().as_secs_f64()
    );
    assert!(r2.last_loss < r2.first_loss, "the loss did not fall");
    let chance = uniform.r1_at_05.max(fixed.r1_at_05);
    assert!(
        r2.scores.r1_at_05 > chance + 0.3,
        "R@1@0.5 {} is not clearly above chance {chance}",
        r2.scores.r1_at_05
    );
}
