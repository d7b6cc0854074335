//! Inverted dropout whose masks are a pure function of the layer, the step and the example.

use std::sync::Mutex;

use candle_core::Tensor;

use crate::Result;
use crate::tape::attach;

/// Which examples a training step sees, so dropout masks are a pure function of the step and the
/// example: a restored run, or the same job on another number of ranks, draws the same masks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StepSeed {
    /// Optimiser steps completed before this one.
    pub step: u64,
    /// Position in the global batch of this rank's first example.
    pub first_example: u64,
    /// Examples in this rank's batch (the leading dimension the layers see).
    pub examples: usize,
}

/// Inverted dropout, active only while training. A mask is drawn per example from a generator
/// seeded by (layer seed, step, the example's position in the global batch), row by row from the
/// first token: it does not depend on what came before (a restore loses that), on which rank
/// holds the example, or on how far the batch is padded.
#[derive(Clone, Debug)]
pub struct Dropout {
    pub p: f64,
    /// Identifies the layer (the job's seed mixed with the layer's index).
    seed: u64,
    state: std::sync::Arc<Mutex<DropoutState>>,
}

#[derive(Debug, Default)]
struct DropoutState {
    step: StepSeed,
    active: bool,
}

impl Dropout {
    pub fn new(p: f64, seed: u64) -> Self {
        Self {
            p,
            seed,
            state: std::sync::Arc::default(),
        }
    }

    /// Turns masking on (training) or off (evaluation).
    pub fn set_active(&self, active: bool) {
        if let Ok(mut s) = self.state.lock() {
            s.active = active;
        }
    }

    /// Sets the step and examples the next masks are drawn for.
    pub fn begin_step(&self, step: StepSeed) {
        if let Ok(mut s) = self.state.lock() {
            s.step = step;
        }
    }

    /// Inverted dropout of `x` as one node that saves only its mask (candle's `mul` would keep
    /// `x` too, and give the mask a gradient); `x` itself when inactive.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let Some(mask) = self.mask(x)? else {
            return Ok(x.clone());
        };
        let value = (x.detach() * &mask)?;
        attach(&[x], value, move |g| Ok(vec![Some((g * &mask)?)]))
    }

    /// A `{0, 1/(1-p)}` mask shaped like `x` (`(examples·T, features)` or any shape whose leading
    /// elements split evenly over the step's examples), or `None` when inactive or `p == 0`.
    pub(crate) fn mask(&self, x: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let s = self
            .state
            .lock()
            .map_err(|_| candle_core::Error::Msg("dropout: poisoned state".into()))?;
        if !s.active || self.p <= 0.0 {
            return Ok(None);
        }
        let keep = (1.0 / (1.0 - self.p)) as f32;
        let total = x.elem_count();
        let examples = s.step.examples.max(1);
        let per_example = if total.is_multiple_of(examples) {
            total / examples
        } else {
            total
        };
        let mut values = Vec::with_capacity(total);
        for e in 0..total / per_example.max(1) {
            let example = s.step.first_example + e as u64;
            let mut rng = crate::init::Rng::new(mask_seed(self.seed, s.step.step, example));
            values.extend((0..per_example).map(
                |_| {
                    if rng.uniform() < self.p { 0.0 } else { keep }
                },
            ));
        }
        let m = Tensor::from_vec(values, x.shape(), x.device())?.to_dtype(x.dtype())?;
        Ok(Some(m))
    }
}

/// One generator seed per (layer, step, example): SplitMix64's finaliser over their mix, so
/// neighbouring steps and examples get unrelated streams.
fn mask_seed(layer: u64, step: u64, example: u64) -> u64 {
    let mut z = layer
        ^ step.wrapping_mul(0x9E37_79B9_7F4A_7C15)
        ^ example.wrapping_mul(0xC2B2_AE3D_27D4_EB4F);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor};

    use super::*;
    use candle_core::DType;

    fn mask_rows(d: &Dropout, step: StepSeed, tokens: usize) -> Vec<Vec<f32>> {
        d.begin_step(step);
        let x = Tensor::zeros((step.examples * tokens, 16), DType::F32, &Device::Cpu).unwrap();
        let m = d.mask(&x).unwrap().unwrap();
        m.to_vec2::<f32>().unwrap()
    }

    #[test]
    fn dropout_masks_follow_the_example_not_the_rank_or_the_padding() {
        let d = Dropout::new(0.5, 11);
        d.set_active(true);
        let step = |first_example, examples| StepSeed {
            step: 4,
            first_example,
            examples,
        };
        // One rank with 4 examples padded to 6 tokens; two ranks with 2 each, padded to 3.
        let whole = mask_rows(&d, step(0, 4), 6);
        let second_half = mask_rows(&d, step(2, 2), 3);
        // Example 2's first three tokens are drawn alike in both.
        assert_eq!(whole[12..15], second_half[0..3]);
        assert_eq!(whole[18..21], second_half[3..6]);
        // Another step draws another mask; the same step draws the same one again.
        let again = mask_rows(&d, step(0, 4), 6);
        assert_eq!(whole, again);
        let later = mask_rows(
            &d,
            StepSeed {
                step: 5,
                ..step(0, 4)
            },
            6,
        );
        assert_ne!(whole, later);
        d.set_active(false);
        d.begin_step(step(0, 4));
        let x = Tensor::zeros((24, 16), DType::F32, &Device::Cpu).unwrap();
        assert!(d.mask(&x).unwrap().is_none());
    }
}
