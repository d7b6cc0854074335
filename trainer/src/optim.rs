//! AdamW with decoupled weight decay, the learning-rate schedule (warm-up then constant, linear
//! or cosine decay) and global-norm gradient clipping.

use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var};
use petl_crds::Schedule;

use crate::{Error, Result, kernels};

/// Learning rate as a function of the step: linear warm-up to `peak`, then the schedule's decay
/// towards 0 at `total_steps`.
#[derive(Clone, Debug)]
pub struct LrSchedule {
    pub peak: f64,
    pub warmup_steps: u64,
    pub total_steps: u64,
    pub schedule: Schedule,
}

impl LrSchedule {
    /// The rate for 0-based `step`.
    pub fn at(&self, step: u64) -> f64 {
        if step < self.warmup_steps {
            return self.peak * (step + 1) as f64 / self.warmup_steps as f64;
        }
        let span = self.total_steps.saturating_sub(self.warmup_steps).max(1) as f64;
        let progress = ((step - self.warmup_steps) as f64 / span).clamp(0.0, 1.0);
        match self.schedule {
            Schedule::Constant => self.peak,
            Schedule::Linear => self.peak * (1.0 - progress),
            Schedule::Cosine => self.peak * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()),
        }
    }
}

/// AdamW (β₁ 0.9, β₂ 0.999, ε 1e-8): `θ ← θ − lr·(m̂/(√v̂+ε) + λ·θ)`.
pub struct AdamW {
    params: Vec<(String, Var)>,
    /// First and second moments, one pair per parameter, created on first use.
    moments: Vec<Option<(Tensor, Tensor)>>,
    pub weight_decay: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Updates applied so far (bias correction uses it).
    pub steps: u64,
}

/// What one optimiser step did.
#[derive(Clone, Copy, Debug)]
pub struct StepStats {
    /// Global L2 norm of the gradients before clipping.
    pub grad_norm: f64,
    /// Parameters that received a gradient.
    pub updated: usize,
}

impl AdamW {
    pub fn new(params: Vec<(String, Var)>, weight_decay: f64) -> Self {
        let n = params.len();
        Self {
            params,
            moments: vec![None; n],
            weight_decay,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            steps: 0,
        }
    }

    pub fn parameters(&self) -> &[(String, Var)] {
        &self.params
    }

    /// Clips the gradients to `max_norm` (0 = no clipping) and applies one update at rate `lr`.
    pub fn step(&mut self, grads: &GradStore, lr: f64, max_norm: f64) -> Result<StepStats> {
        let found: Vec<Option<Tensor>> = self
            .params
            .iter()
            .map(|(_, v)| grads.get(v.as_tensor()).map(|g| g.detach()))
            .collect();
        let mut sq = 0.0;
        for g in found.iter().flatten() {
            sq += match kernels::sum_of_squares(g) {
                Some(s) => s,
                None => g
                    .to_dtype(DType::F64)?
                    .sqr()?
                    .sum_all()?
                    .to_scalar::<f64>()?,
            };
        }
        let grad_norm = sq.sqrt();
        if !grad_norm.is_finite() {
            return Err(Error::Diverged { step: self.steps });
        }
        let clip = if max_norm > 0.0 && grad_norm > max_norm {
            max_norm / (grad_norm + 1e-6)
        } else {
            1.0
        };
        self.steps += 1;
        let t = self.steps as i32;
        let (b1, b2) = (self.beta1, self.beta2);
        let c1 = 1.0 - b1.powi(t);
        let c2 = 1.0 - b2.powi(t);
        let mut updated = 0;
        let fused = kernels::AdamWStep {
            clip: clip as f32,
            beta1: b1 as f32,
            beta2: b2 as f32,
            correct1: (1.0 / c1) as f32,
            correct2: (1.0 / c2) as f32,
            eps: self.eps as f32,
            lr: lr as f32,
            weight_decay: self.weight_decay as f32,
        };
        for (i, g) in found.into_iter().enumerate() {
            let Some(g) = g else { continue };
            let var = &self.params[i].1;
            let (m, v) = match self.moments[i].take() {
                Some(mv) => mv,
                None => (g.zeros_like()?, g.zeros_like()?),
            };
            // In place on the CPU: no temporaries, so no fresh pages for the embedding's 47 MB.
            if kernels::adamw_update(var.as_tensor(), &m, &v, &g, fused)? {
                self.moments[i] = Some((m, v));
                updated += 1;
                continue;
            }
            let g = if clip < 1.0 { (g * clip)? } else { g };
            let m = ((m * b1)? + (&g * (1.0 - b1))?)?;
            let v = ((v * b2)? + (g.sqr()? * (1.0 - b2))?)?;
            let theta = var.as_tensor().detach();
            let update = ((&m * (1.0 / c1))? / ((&v * (1.0 / c2))?.sqrt()? + self.eps)?)?;
            let decayed = if self.weight_decay > 0.0 {
                (&theta * (1.0 - lr * self.weight_decay))?
            } else {
                theta
            };
            var.set(&(decayed - (update * lr)?)?)?;
            self.moments[i] = Some((m, v));
            updated += 1;
        }
        Ok(StepStats { grad_norm, updated })
    }

    /// Named optimiser state (`adam_m/<param>`, `adam_v/<param>`) for snapshots: copies, since
    /// the next step updates the moments in place.
    pub fn state(&self) -> Result<Vec<(String, Tensor)>> {
        let mut out = Vec::new();
        for ((name, _), mv) in self.params.iter().zip(&self.moments) {
            if let Some((m, v)) = mv {
                out.push((format!("adam_m/{name}"), m.copy()?));
                out.push((format!("adam_v/{name}"), v.copy()?));
            }
        }
        Ok(out)
    }

    /// Restores moments written by [`AdamW::state`]; `steps` is the update count at that time.
    pub fn restore(&mut self, state: &[(String, Tensor)], steps: u64) -> Result<()> {
        let find = |key: String| {
            state
                .iter()
                .find(|(n, _)| *n == key)
                .map(|(_, t)| t.clone())
        };
        for (i, (name, var)) in self.params.iter().enumerate() {
            let m = find(format!("adam_m/{name}"));
            let v = find(format!("adam_v/{name}"));
            self.moments[i] = match (m, v) {
                (Some(m), Some(v)) if m.shape() == var.shape() && v.shape() == var.shape() => {
                    // Own copies: the step updates moments in place, and the snapshot keeps its own.
                    let own = |t: Tensor| t.to_dtype(var.dtype())?.contiguous()?.copy();
                    Some((own(m)?, own(v)?))
                }
                (None, None) => None,
                _ => {
                    return Err(Error::Config {
                        field: "snapshot".into(),
                        message: format!("optimiser state for {name} is incomplete or mis-shaped"),
                    });
                }
            };
        }
        self.steps = steps;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Tensor, Var};

    use super::*;

    /// Three steps of AdamW on `Σ (θ·w)²` for θ of `dtype`; the f32 run takes the fused kernel,
    /// the f64 run candle's composed ops.
    fn three_steps(dtype: DType) -> (Vec<f64>, AdamW) {
        let init: Vec<f32> = (0..5000)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 25.0)
            .collect();
        let w = Tensor::from_vec(
            (0..5000).map(|i| (i % 7) as f32 - 3.0).collect::<Vec<_>>(),
            5000,
            &Device::Cpu,
        )
        .unwrap()
        .to_dtype(dtype)
        .unwrap();
        let theta = Var::from_tensor(
            &Tensor::from_vec(init, 5000, &Device::Cpu)
                .unwrap()
                .to_dtype(dtype)
                .unwrap(),
        )
        .unwrap();
        let mut opt = AdamW::new(vec![("theta".into(), theta.clone())], 0.01);
        for _ in 0..3 {
            let loss = (theta.as_tensor() * &w)
                .unwrap()
                .sqr()
                .unwrap()
                .sum_all()
                .unwrap();
            let grads = loss.backward().unwrap();
            // A max norm below the gradient's, so clipping takes part.
            opt.step(&grads, 0.05, 1.0).unwrap();
        }
        let out = theta
            .as_tensor()
            .to_dtype(DType::F64)
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        (out, opt)
    }

    #[test]
    fn the_fused_cpu_update_matches_the_composed_one() {
        let (fused, _) = three_steps(DType::F32);
        let (composed, _) = three_steps(DType::F64);
        let worst = fused
            .iter()
            .zip(&composed)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f64::max);
        assert!(worst < 1e-5, "largest difference {worst}");
        assert!(fused.iter().zip(&composed).any(|(a, _)| a.abs() > 0.0));
    }

    #[test]
    fn a_taken_state_does_not_change_with_later_steps() {
        let (_, mut opt) = three_steps(DType::F32);
        let state = opt.state().unwrap();
        let before: Vec<Vec<f32>> = state.iter().map(|(_, t)| t.to_vec1().unwrap()).collect();
        let theta = opt.parameters()[0].1.clone();
        let grads = theta
            .as_tensor()
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        opt.step(&grads, 0.05, 0.0).unwrap();
        let after: Vec<Vec<f32>> = state.iter().map(|(_, t)| t.to_vec1().unwrap()).collect();
        assert_eq!(before, after);
        let moved: Vec<f32> = opt.state().unwrap()[0].1.to_vec1().unwrap();
        assert_ne!(moved, before[0]);
    }
}
