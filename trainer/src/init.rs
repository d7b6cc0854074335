//! Seeded parameter initialisation: candle's CPU generator cannot be seeded, so every random
//! starting value is drawn here from a seeded generator and built with `Tensor::from_vec`.

use candle_core::{DType, Device, Shape, Tensor};
use rand::{Rng as _, SeedableRng, rngs::StdRng};

use crate::Result;

/// The trainer's one seeded random source.
#[derive(Debug)]
pub struct Rng(StdRng);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(StdRng::seed_from_u64(seed))
    }

    /// A draw from `[0, 1)`.
    pub fn uniform(&mut self) -> f64 {
        self.0.random::<f64>()
    }

    /// A tensor of `U(-bound, bound)` values.
    pub fn uniform_tensor(
        &mut self,
        shape: impl Into<Shape>,
        bound: f64,
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor> {
        let shape = shape.into();
        let values: Vec<f64> = (0..shape.elem_count())
            .map(|_| (self.uniform() * 2.0 - 1.0) * bound)
            .collect();
        Ok(Tensor::from_vec(values, shape, device)?.to_dtype(dtype)?)
    }

    /// PyTorch's default `nn.Linear` weight, `(out, in)`: `U(±1/√in)` (also LoRA A's kaiming
    /// uniform with `a = √5`).
    pub fn linear_weight(
        &mut self,
        out: usize,
        inp: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor> {
        self.uniform_tensor((out, inp), 1.0 / (inp as f64).sqrt(), dtype, device)
    }
}
