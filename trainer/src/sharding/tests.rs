//! The sharding math against one rank: N ranks in an in-process group take the same steps as
//! one rank on the whole batch, and a rank's snapshot slice restores it bit for bit.

use candle_core::{DType, Device, Tensor, Var};

use super::slice::{self, RngInputs, SliceMeta};
use super::step::{StepRequest, gather_parameters, step};
use super::test_group::ThreadGroup;
use super::{ShardedAdamW, parameter_digest};
use crate::collective::{Collective, Solo};

/// Sizes chosen so that buckets of 7 cut parameters and pieces at odd places.
const SIZES: [usize; 3] = [5, 12, 4];
const EXAMPLES: usize = 8;

fn params() -> Vec<(String, Var)> {
    SIZES
        .iter()
        .enumerate()
        .map(|(i, &n)| {
            let values: Vec<f32> = (0..n)
                .map(|j| ((i * 7 + j * 3) % 11) as f32 / 10.0 - 0.5)
                .collect();
            let v = Var::from_tensor(&Tensor::from_vec(values, n, &Device::Cpu).unwrap()).unwrap();
            (format!("p{i}"), v)
        })
        .collect()
}

/// The inputs of example `e` for parameter `i`.
fn inputs(e: usize, i: usize) -> Tensor {
    let values: Vec<f32> = (0..SIZES[i])
        .map(|j| ((e * 5 + i * 3 + j) % 7) as f32 / 3.0 - 1.0)
        .collect();
    Tensor::from_vec(values, SIZES[i], &Device::Cpu).unwrap()
}

/// Mean over `examples` of `(Σ_i x_e,i · θ_i)²`, and its gradients.
fn loss_and_grads(
    params: &[(String, Var)],
    examples: std::ops::Range<usize>,
) -> (f64, candle_core::backprop::GradStore) {
    let n = examples.len() as f64;
    let mut total: Option<Tensor> = None;
    for e in examples {
        let mut dot: Option<Tensor> = None;
        for (i, (_, v)) in params.iter().enumerate() {
            let term = (v.as_tensor() * inputs(e, i)).unwrap().sum_all().unwrap();
            dot = Some(match dot {
                Some(d) => (d + term).unwrap(),
                None => term,
            });
        }
        let sq = dot.unwrap().sqr().unwrap();
        total = Some(match total {
            Some(t) => (t + sq).unwrap(),
            None => sq,
        });
    }
    let loss = (total.unwrap() / n).unwrap();
    let value = loss
        .to_dtype(DType::F64)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    (value, loss.backward().unwrap())
}

/// Trains `steps` steps as rank `rank` of `group`; returns the parameters and the losses.
fn train(
    group: &mut dyn Collective,
    steps: usize,
    bucket: usize,
) -> (Vec<Vec<f32>>, Vec<f64>, ShardedAdamW) {
    let (rank, world) = (group.rank(), group.world_size());
    let mut opt = ShardedAdamW::new(params(), 0.01, rank, world, bucket).unwrap();
    let slice = EXAMPLES / world;
    let mut losses = Vec::new();
    for s in 0..steps {
        let (loss, grads) = loss_and_grads(opt.parameters(), rank * slice..(rank + 1) * slice);
        let request = StepRequest {
            loss,
            lr: 0.05,
            // Below the gradient norm, so clipping takes part.
            max_norm: 0.5,
            step: s as u64,
            ..StepRequest::default()
        };
        let outcome = step(&mut opt, group, grads, &request).unwrap();
        losses.push(outcome.agreed.loss);
    }
    (values(&opt), losses, opt)
}

fn values(opt: &ShardedAdamW) -> Vec<Vec<f32>> {
    opt.parameters()
        .iter()
        .map(|(_, v)| v.as_tensor().to_vec1::<f32>().unwrap())
        .collect()
}

fn worst(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    a.iter()
        .flatten()
        .zip(b.iter().flatten())
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[test]
fn n_ranks_take_the_steps_one_rank_takes_on_the_whole_batch() {
    let (alone, alone_losses, _) = train(&mut Solo, 4, 7);
    for world in [2, 4] {
        let runs = ThreadGroup::run(world, |_, group| train(group, 4, 7));
        for (rank, (values, losses, _)) in runs.iter().enumerate() {
            // Every rank holds the same full parameters, bit for bit.
            assert_eq!(
                values, &runs[0].0,
                "world {world}: rank {rank} differs from rank 0"
            );
            for (a, b) in losses.iter().zip(&alone_losses) {
                assert!((a - b).abs() < 1e-5, "world {world}: loss {a} vs {b}");
            }
        }
        let d = worst(&runs[0].0, &alone);
        assert!(
            d < 1e-5,
            "world {world}: parameters differ from one rank's by {d}"
        );
        assert!(
            worst(
                &runs[0].0,
                &values(&ShardedAdamW::new(params(), 0.0, 0, 1, 7).unwrap())
            ) > 1e-3
        );
        // The same world size gives the same bits on every run.
        let again = ThreadGroup::run(world, |_, group| train(group, 4, 7));
        assert_eq!(again[0].0, runs[0].0);
    }
}

#[test]
fn each_rank_keeps_moments_for_its_pieces_only() {
    let sizes = ThreadGroup::run(4, |_, group| {
        let (_, _, opt) = train(group, 1, 7);
        (0..opt.layout().buckets.len())
            .map(|b| opt.moments(b).0.elem_count())
            .sum::<usize>()
    });
    let (_, _, one) = train(&mut Solo, 1, 7);
    let total: usize = (0..one.layout().buckets.len())
        .map(|b| one.moments(b).0.elem_count())
        .sum();
    assert_eq!(total, SIZES.iter().sum::<usize>());
    for owned in sizes {
        assert!(
            owned * 4 <= total + 4 * one.layout().buckets.len(),
            "{owned} of {total}"
        );
    }
}

fn meta(opt: &ShardedAdamW) -> SliceMeta {
    SliceMeta {
        method: "test".into(),
        world_size: opt.world_size(),
        rank: opt.rank(),
        bucket_elems: opt.layout().bucket_elems,
        layout: opt.layout().fingerprint(),
        batches_per_epoch: 10,
    }
}

#[test]
fn a_restored_slice_continues_bit_for_bit() {
    const RNG: RngInputs = RngInputs { seed: 3 };
    ThreadGroup::run(2, |rank, group| {
        let (_, _, mut original) = train(group, 3, 7);
        let snapshot = slice::to_snapshot(&original, 3, &meta(&original), RNG).unwrap();
        assert_eq!((snapshot.generation, snapshot.step), (3, 3));

        // A fresh optimiser whose parameters start elsewhere takes the slice back, and the
        // all-gather makes it whole.
        let mut restored = ShardedAdamW::new(params(), 0.01, rank, 2, 7).unwrap();
        for (_, v) in restored.parameters() {
            v.set(&v.as_tensor().ones_like().unwrap()).unwrap();
        }
        let m = meta(&restored);
        assert_eq!(
            slice::restore(&mut restored, &snapshot, &m, RNG).unwrap(),
            3
        );
        gather_parameters(&restored, group).unwrap();
        assert_eq!(values(&restored), values(&original));
        assert_eq!(
            parameter_digest(restored.parameters()).unwrap(),
            parameter_digest(original.parameters()).unwrap()
        );

        // One more step from each gives the same bits.
        for opt in [&mut original, &mut restored] {
            let (loss, grads) = loss_and_grads(opt.parameters(), rank * 4..rank * 4 + 4);
            let request = StepRequest {
                loss,
                lr: 0.05,
                max_norm: 0.5,
                step: 3,
                ..StepRequest::default()
            };
            step(opt, group, grads, &request).unwrap();
        }
        assert_eq!(values(&restored), values(&original));
    });
}

#[test]
fn a_slice_of_another_world_size_or_method_is_refused() {
    const RNG: RngInputs = RngInputs { seed: 3 };
    let (_, _, two) = ThreadGroup::run(2, |_, group| train(group, 1, 7)).remove(0);
    let snapshot = slice::to_snapshot(&two, 1, &meta(&two), RNG).unwrap();
    let mut one = ShardedAdamW::new(params(), 0.01, 0, 1, 7).unwrap();
    let one_meta = meta(&one);
    let err = slice::restore(&mut one, &snapshot, &one_meta, RNG).unwrap_err();
    assert!(
        err.to_string().contains("world size is 2, the job's is 1"),
        "{err}"
    );

    let mut same = ShardedAdamW::new(params(), 0.01, 0, 2, 7).unwrap();
    let mut other_method = meta(&same);
    other_method.method = "lora".into();
    let err = slice::restore(&mut same, &snapshot, &other_method, RNG).unwrap_err();
    assert!(
        matches!(err, crate::Error::SnapshotMismatch { .. }),
        "{err}"
    );
    let same_meta = meta(&same);
    let err = slice::restore(&mut same, &snapshot, &same_meta, RngInputs { seed: 4 }).unwrap_err();
    assert!(err.to_string().contains("seed"), "{err}");
}
