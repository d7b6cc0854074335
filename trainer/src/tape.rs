//! The one autograd mechanism: every layer computes its forward value untracked, then attaches a
//! single graph node whose parents are only the tensors that need gradients and whose backward keeps
//! only what that backward reads (reference/candle-notes.md §3).
//!
//! Rules every layer here follows, and every method relies on:
//! * a weight is trainable iff it is a candle `Var` (`is_variable()`); any other weight is frozen and
//!   never receives a gradient;
//! * an input that does not track (a detached tap, the untracked backbone's hidden states) never
//!   receives a gradient, so a ladder reading it stores only its own weight gradients;
//! * a node never holds an untracked tensor as a parent; what the backward needs is captured
//!   explicitly (detached handles share storage, so capturing costs no copy).

use std::sync::Mutex;

use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, CustomOp3, D, DType, Layout, Shape, Storage, Tensor,
};

use crate::{Error, Result, kernels};

/// A backward closure: gets the gradient of the node's output, returns one optional gradient per
/// parent handed to [`attach`], in the same order.
pub type Backward = Box<dyn Fn(&Tensor) -> candle_core::Result<Vec<Option<Tensor>>> + Send + Sync>;

/// Makes `value` the output of one graph node whose parents are the *tracked* tensors among
/// `parents`. `bwd` returns a gradient (or `None`) for every entry of `parents`; entries for
/// untracked parents are ignored. When nothing tracks, `value` comes back as is and no node exists.
/// At most three parents may track (candle's custom ops take one to three arguments).
pub fn attach(
    parents: &[&Tensor],
    value: Tensor,
    bwd: impl Fn(&Tensor) -> candle_core::Result<Vec<Option<Tensor>>> + Send + Sync + 'static,
) -> Result<Tensor> {
    let tracked: Vec<usize> = (0..parents.len()).filter(|&i| tracks(parents[i])).collect();
    if tracked.is_empty() {
        return Ok(value);
    }
    let picked = tracked.clone();
    let arity = parents.len();
    let bwd: Backward = Box::new(move |g| {
        let mut grads = bwd(g)?;
        if grads.len() != arity {
            candle_core::bail!(
                "attach: backward gave {} grads for {arity} parents",
                grads.len()
            );
        }
        Ok(picked.iter().map(|&i| grads[i].take()).collect())
    });
    let node = Attached {
        value: Mutex::new(Some(value.detach())),
        bwd,
    };
    let out = match tracked.as_slice() {
        [a] => parents[*a].apply_op1(node)?,
        [a, b] => parents[*a].apply_op2(parents[*b], node)?,
        [a, b, c] => parents[*a].apply_op3(parents[*b], parents[*c], node)?,
        _ => {
            return Err(Error::Internal(format!(
                "tape.attach: {} tracked parents; a node takes at most 3 (train fewer tensors in one layer)",
                tracked.len()
            )));
        }
    };
    Ok(out)
}

/// The custom op behind [`attach`]: its forward hands out the precomputed value, its backward runs
/// the layer's closure.
struct Attached {
    value: Mutex<Option<Tensor>>,
    bwd: Backward,
}

impl Attached {
    fn take(&self) -> candle_core::Result<Tensor> {
        let mut slot = self
            .value
            .lock()
            .map_err(|_| candle_core::Error::Msg("attach: poisoned value".into()))?;
        slot.take()
            .ok_or_else(|| candle_core::Error::Msg("attach: forward ran twice".into()))
    }

    /// One transient copy: no public candle API moves a storage out of a tensor.
    fn cpu_value(&self) -> candle_core::Result<(CpuStorage, Shape)> {
        let v = self.take()?;
        let v = if v.is_contiguous() {
            v
        } else {
            v.force_contiguous()?
        };
        let (storage, layout) = v.storage_and_layout();
        let Storage::Cpu(cpu) = &*storage else {
            candle_core::bail!("attach: value is not on the CPU")
        };
        let (o, n) = (layout.start_offset(), layout.shape().elem_count());
        let out = match cpu {
            CpuStorage::U8(s) => CpuStorage::U8(s[o..o + n].to_vec()),
            CpuStorage::U32(s) => CpuStorage::U32(s[o..o + n].to_vec()),
            CpuStorage::I64(s) => CpuStorage::I64(s[o..o + n].to_vec()),
            CpuStorage::BF16(s) => CpuStorage::BF16(s[o..o + n].to_vec()),
            CpuStorage::F16(s) => CpuStorage::F16(s[o..o + n].to_vec()),
            CpuStorage::F32(s) => CpuStorage::F32(s[o..o + n].to_vec()),
            CpuStorage::F64(s) => CpuStorage::F64(s[o..o + n].to_vec()),
            _ => candle_core::bail!("attach: unsupported dtype {:?}", v.dtype()),
        };
        Ok((out, layout.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_value(&self) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        let v = self.take()?.force_contiguous()?;
        let (storage, layout) = v.storage_and_layout();
        let Storage::Cuda(cuda) = &*storage else {
            candle_core::bail!("attach: value is not on the GPU")
        };
        Ok((cuda.try_clone(layout)?, layout.shape().clone()))
    }

    fn grads(&self, g: &Tensor, n: usize) -> candle_core::Result<Vec<Option<Tensor>>> {
        let grads = (self.bwd)(g)?;
        if grads.len() != n {
            candle_core::bail!("attach: expected {n} gradients, got {}", grads.len());
        }
        Ok(grads)
    }
}

impl CustomOp1 for Attached {
    fn name(&self) -> &'static str {
        "attach"
    }
    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        self.cpu_value()
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        self.cuda_value()
    }
    fn bwd(&self, _: &Tensor, _: &Tensor, g: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(self.grads(g, 1)?.pop().flatten())
    }
}

impl CustomOp2 for Attached {
    fn name(&self) -> &'static str {
        "attach"
    }
    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        self.cpu_value()
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        self.cuda_value()
    }
    fn bwd(
        &self,
        _: &Tensor,
        _: &Tensor,
        _: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let mut it = self.grads(g, 2)?.into_iter();
        Ok((it.next().flatten(), it.next().flatten()))
    }
}

impl CustomOp3 for Attached {
    fn name(&self) -> &'static str {
        "attach"
    }
    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        self.cpu_value()
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        self.cuda_value()
    }
    fn bwd(
        &self,
        _: &Tensor,
        _: &Tensor,
        _: &Tensor,
        _: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let mut it = self.grads(g, 3)?.into_iter();
        Ok((
            it.next().flatten(),
            it.next().flatten(),
            it.next().flatten(),
        ))
    }
}

thread_local! {
    static NO_GRAD: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f` with graph building off on this thread (evaluation): layers save nothing and attach
/// no nodes, even over trainable weights.
pub fn no_grad<T>(f: impl FnOnce() -> T) -> T {
    let before = NO_GRAD.with(|c| c.replace(true));
    let out = f();
    NO_GRAD.with(|c| c.set(before));
    out
}

fn grad_enabled() -> bool {
    !NO_GRAD.with(|c| c.get())
}

/// True when `t` is a trainable leaf (a `Var`) and gradients are on; only those get weight
/// gradients.
pub fn trainable(t: &Tensor) -> bool {
    grad_enabled() && t.is_variable()
}

/// True when a gradient must flow back into `t`.
pub fn tracks(t: &Tensor) -> bool {
    grad_enabled() && t.track_op()
}

/// `(..., n)` → `(rows, n)` and the leading dims to restore.
fn flat2(x: &Tensor) -> candle_core::Result<(Tensor, Vec<usize>)> {
    let dims = x.dims().to_vec();
    let n = *dims.last().unwrap_or(&1);
    let rows = x.elem_count() / n.max(1);
    Ok((x.reshape((rows, n))?, dims))
}

fn unflat(x: &Tensor, lead: &[usize]) -> candle_core::Result<Tensor> {
    let mut dims = lead[..lead.len() - 1].to_vec();
    dims.push(x.dim(D::Minus1)?);
    x.reshape(dims)
}

/// Nonlinearity fused into a [`Linear`] node, so the node saves its derivative, not its input.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    Identity,
    /// Exact GELU, `x·Φ(x)` (BERT's `gelu`).
    Gelu,
}

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

/// A low-rank update `scale · B·A·dropout(x)` next to a frozen weight (PEFT LoRA).
#[derive(Clone, Debug)]
pub struct LoraDelta {
    /// `(r, in)`, a `Var`.
    pub a: Tensor,
    /// `(out, r)`, a `Var`.
    pub b: Tensor,
    /// `alpha / r`.
    pub scale: f64,
    pub dropout: Option<Dropout>,
}

/// `y = act(x·Wᵀ + b [+ LoRA])`: one graph node whose backward computes exactly the gradients
/// the trainable parts need. A frozen weight gives `dx` only; a trainable one saves `x` for `dW`.
#[derive(Clone, Debug)]
pub struct Linear {
    /// `(out, in)`.
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    pub lora: Option<LoraDelta>,
}

impl Linear {
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self {
            weight,
            bias,
            lora: None,
        }
    }

    pub fn in_features(&self) -> usize {
        self.weight.dims()[1]
    }

    pub fn out_features(&self) -> usize {
        self.weight.dims()[0]
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_act(x, Activation::Identity)
    }

    /// The forward with a fused nonlinearity.
    pub fn forward_act(&self, x: &Tensor, act: Activation) -> Result<Tensor> {
        let (x2, lead) = flat2(&x.detach())?;
        let (w, b) = (self.weight.detach(), self.bias.as_ref().map(Tensor::detach));
        // LoRA's input (after dropout), its mask and its rank-r projection `t = x·Aᵀ`.
        let mut lora_state = None;
        if let Some(l) = &self.lora {
            let mask = match &l.dropout {
                Some(d) => d.mask(&x2)?,
                None => None,
            };
            let xd = match &mask {
                Some(m) => (&x2 * m)?,
                None => x2.clone(),
            };
            let t = xd.matmul(&l.a.detach().t()?)?;
            lora_state = Some((xd, mask, t));
        }
        let up = self.lora.as_ref().map(|l| l.b.detach());
        let low_rank = match (&self.lora, &lora_state, &up) {
            (Some(l), Some((_, _, t)), Some(up)) => Some((t, up, l.scale)),
            _ => None,
        };
        let u = linear_value(&x2, &w, b.as_ref(), low_rank)?;
        let need_dx = tracks(x);
        let need_dw = trainable(&self.weight);
        let need_db = self.bias.as_ref().is_some_and(trainable);
        let lora = self.lora.as_ref();
        let need_lora = lora.is_some_and(|l| trainable(&l.a) || trainable(&l.b));
        let need_any = need_dx || need_dw || need_db || need_lora;
        let (y, deriv) = match act {
            Activation::Identity => (u, None),
            Activation::Gelu => gelu_parts(&u, need_any)?,
        };
        let y = unflat(&y, &lead)?;
        if !need_any {
            return Ok(y);
        }

        let saved_x = need_dw.then_some(x2);
        let lora_parts = lora.map(|l| (l.a.detach(), l.b.detach(), l.scale));
        let lora_saved = if need_lora || need_dx {
            lora_state
        } else {
            None
        };
        let bwd = move |g: &Tensor| {
            let (g2, _) = flat2(g)?;
            let gu = match &deriv {
                Some(d) => (g2 * d)?,
                None => g2,
            };
            let dw = match &saved_x {
                Some(x2) => Some(gu.t()?.matmul(x2)?),
                None => None,
            };
            let db = if need_db {
                Some(column_sums(&gu, None)?)
            } else {
                None
            };
            let (mut da, mut dbl, mut low_rank) = (None, None, None);
            if let (Some((a, b, scale)), Some((xd, mask, t))) = (&lora_parts, &lora_saved) {
                let gb = gu.matmul(b)?; // (N, r)
                if need_lora {
                    da = Some((gb.t()?.matmul(xd)? * *scale)?);
                    dbl = Some((gu.t()?.matmul(t)? * *scale)?);
                }
                low_rank = Some((gb, a, *scale, mask.as_ref()));
            }
            let dx = if need_dx {
                Some(unflat(&input_gradient(&gu, &w, low_rank)?, &lead)?)
            } else {
                None
            };
            Ok(vec![dx, dw, db, da, dbl])
        };
        let bias = self.bias.clone().unwrap_or_else(|| self.weight.detach());
        let (a, b) = match lora {
            Some(l) => (l.a.clone(), l.b.clone()),
            None => (self.weight.detach(), self.weight.detach()),
        };
        attach(&[x, &self.weight, &bias, &a, &b], y, bwd)
    }
}

/// `x·Wᵀ + b [+ scale·t·Bᵀ]`, a linear layer's value with its LoRA term: one buffer on the CPU,
/// candle's ops elsewhere.
fn linear_value(
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    low_rank: Option<(&Tensor, &Tensor, f64)>,
) -> candle_core::Result<Tensor> {
    let mut terms = vec![kernels::Term {
        a: x,
        b: w,
        b_transposed: true,
        scale: 1.0,
    }];
    if let Some((t, up, scale)) = low_rank {
        terms.push(kernels::Term {
            a: t,
            b: up,
            b_transposed: true,
            scale: scale as f32,
        });
    }
    if let Some(u) = kernels::matmul_sum(&terms, b)? {
        return Ok(u);
    }
    let mut u = x.matmul(&w.t()?)?;
    if let Some(b) = b {
        u = u.broadcast_add(b)?;
    }
    if let Some((t, up, scale)) = low_rank {
        u = (u + (t.matmul(&up.t()?)? * scale)?)?;
    }
    Ok(u)
}

/// `g·W [+ (scale·(g·B)·A)⊙mask]`, a linear layer's input gradient; `low_rank` carries `g·B`,
/// `A`, the scale and LoRA's dropout mask.
fn input_gradient(
    g: &Tensor,
    w: &Tensor,
    low_rank: Option<(Tensor, &Tensor, f64, Option<&Tensor>)>,
) -> candle_core::Result<Tensor> {
    // A dropout mask applies to the LoRA term alone, so that sum cannot be one buffer.
    if low_rank
        .as_ref()
        .is_none_or(|(_, _, _, mask)| mask.is_none())
    {
        let mut terms = vec![kernels::Term {
            a: g,
            b: w,
            b_transposed: false,
            scale: 1.0,
        }];
        if let Some((gb, a, scale, _)) = &low_rank {
            terms.push(kernels::Term {
                a: gb,
                b: a,
                b_transposed: false,
                scale: *scale as f32,
            });
        }
        if let Some(dx) = kernels::matmul_sum(&terms, None)? {
            return Ok(dx);
        }
    }
    let mut dx = g.matmul(w)?;
    if let Some((gb, a, scale, mask)) = low_rank {
        let mut d = (gb.matmul(a)? * scale)?;
        if let Some(m) = mask {
            d = (d * m)?;
        }
        dx = (dx + d)?;
    }
    Ok(dx)
}

/// `Σ_rows x` (or `Σ_rows x⊙y`) of `(N, d)` matrices: a bias's (or a gain's) gradient.
fn column_sums(x: &Tensor, y: Option<&Tensor>) -> candle_core::Result<Tensor> {
    if let Some(fused) = kernels::sum_rows(x, y)? {
        return Ok(fused);
    }
    match y {
        Some(y) => (x * y)?.sum(0),
        None => x.sum(0),
    }
}

/// `Φ(u) + u·φ(u)`, the derivative of exact GELU.
fn gelu_derivative(u: &Tensor) -> candle_core::Result<Tensor> {
    let cdf = ((u * std::f64::consts::FRAC_1_SQRT_2)?.erf()? + 1.0)? * 0.5;
    let pdf = (u.sqr()? * -0.5)?.exp()? * (1.0 / (2.0 * std::f64::consts::PI).sqrt());
    cdf? + (u * pdf?)?
}

/// GELU of `u` and, when `derivative`, its derivative: one fused pass on the CPU, candle's ops
/// elsewhere.
fn gelu_parts(u: &Tensor, derivative: bool) -> candle_core::Result<(Tensor, Option<Tensor>)> {
    if let Some(fused) = kernels::gelu(u, derivative)? {
        return Ok(fused);
    }
    let d = if derivative {
        Some(gelu_derivative(u)?)
    } else {
        None
    };
    Ok((u.gelu_erf()?, d))
}

/// Exact GELU as a node that saves only its derivative.
pub fn gelu(x: &Tensor) -> Result<Tensor> {
    let (y, d) = gelu_parts(&x.detach(), tracks(x))?;
    let Some(d) = d else {
        return Ok(y);
    };
    attach(&[x], y, move |g| Ok(vec![Some((g * &d)?)]))
}

/// Softmax over the last dimension; saves its output only.
pub fn softmax(x: &Tensor) -> Result<Tensor> {
    let y = softmax_values(&x.detach(), 1.0, None)?;
    if !tracks(x) {
        return Ok(y);
    }
    let saved = y.clone();
    attach(&[x], y, move |g| {
        Ok(vec![Some(softmax_backward(&saved, g, 1.0)?)])
    })
}

/// `softmax(x·scale + bias)` over the last dimension, `bias` broadcast to `x`.
fn softmax_values(x: &Tensor, scale: f64, bias: Option<&Tensor>) -> candle_core::Result<Tensor> {
    if let Some(fused) = kernels::softmax(x, scale as f32, bias)? {
        return Ok(fused);
    }
    let mut x = if scale == 1.0 {
        x.clone()
    } else {
        (x * scale)?
    };
    if let Some(b) = bias {
        x = x.broadcast_add(b)?;
    }
    let max = x.max_keepdim(D::Minus1)?;
    let e = x.broadcast_sub(&max)?.exp()?;
    let sum = e.sum_keepdim(D::Minus1)?;
    e.broadcast_div(&sum)
}

/// The gradient of [`softmax_values`] with respect to `x`, from its output `y`.
fn softmax_backward(y: &Tensor, g: &Tensor, scale: f64) -> candle_core::Result<Tensor> {
    if let Some(fused) = kernels::softmax_backward(y, g, scale as f32)? {
        return Ok(fused);
    }
    let dot = (g * y)?.sum_keepdim(D::Minus1)?;
    let dx = (y * g.broadcast_sub(&dot)?)?;
    if scale == 1.0 { Ok(dx) } else { dx * scale }
}

/// LayerNorm over the last dimension with optional trainable gain and shift.
#[derive(Clone, Debug)]
pub struct LayerNorm {
    pub weight: Tensor,
    pub bias: Tensor,
    pub eps: f64,
}

impl LayerNorm {
    /// Saves the normalised input and the reciprocal standard deviation, never the raw input.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (y, xhat, rstd) = self.normalise(&x.detach())?;
        let need_dx = tracks(x);
        let need_dg = trainable(&self.weight);
        let need_db = trainable(&self.bias);
        if !(need_dx || need_dg || need_db) {
            return Ok(y);
        }
        let gamma = self.weight.detach();
        let saved_rstd = need_dx.then_some(rstd);
        let bwd = move |g: &Tensor| {
            let (g2, _) = flat2(g)?;
            let (xh2, _) = flat2(&xhat)?;
            let dg = if need_dg {
                Some(column_sums(&g2, Some(&xh2))?)
            } else {
                None
            };
            let db = if need_db {
                Some(column_sums(&g2, None)?)
            } else {
                None
            };
            let dx = match &saved_rstd {
                Some(rstd) => Some(layer_norm_backward(g, &xhat, rstd, &gamma)?),
                None => None,
            };
            Ok(vec![dx, dg, db])
        };
        attach(&[x, &self.weight, &self.bias], y, bwd)
    }

    /// The output, the normalised input and `1/σ` per row (kept dims).
    fn normalise(&self, x: &Tensor) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
        let (gamma, beta) = (self.weight.detach(), self.bias.detach());
        if let Some(n) = kernels::layer_norm(x, &gamma, &beta, self.eps)? {
            return Ok((n.y, n.xhat, n.rstd));
        }
        let mean = x.mean_keepdim(D::Minus1)?;
        let xc = x.broadcast_sub(&mean)?;
        let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
        let rstd = (var + self.eps)?.sqrt()?.recip()?;
        let xhat = xc.broadcast_mul(&rstd)?;
        let y = xhat.broadcast_mul(&gamma)?.broadcast_add(&beta)?;
        Ok((y, xhat, rstd))
    }
}

/// LayerNorm's input gradient from the output gradient, the normalised input and `1/σ`.
fn layer_norm_backward(
    g: &Tensor,
    xhat: &Tensor,
    rstd: &Tensor,
    gamma: &Tensor,
) -> candle_core::Result<Tensor> {
    if let Some(fused) = kernels::layer_norm_backward(g, xhat, rstd, gamma)? {
        return Ok(fused);
    }
    let dxhat = g.broadcast_mul(gamma)?;
    let m1 = dxhat.mean_keepdim(D::Minus1)?;
    let m2 = (&dxhat * xhat)?.mean_keepdim(D::Minus1)?;
    let inner = dxhat.broadcast_sub(&m1)?.sub(&xhat.broadcast_mul(&m2)?)?;
    inner.broadcast_mul(rstd)
}

/// Turns a `(B, T)` 0/1 attention mask into the additive `(B, 1, 1, T)` bias attention adds to
/// its scores (0 for real tokens, a large negative number for padding).
pub fn attention_bias(mask: &Tensor, dtype: DType) -> Result<Tensor> {
    let (b, t) = mask.dims2()?;
    let m = mask.to_dtype(dtype)?;
    let bias = ((m - 1.0)? * 1e4)?;
    Ok(bias.reshape((b, 1, 1, t))?)
}

/// Multi-head scaled dot-product attention of `(B, Tq, H·dh)` queries over `(B, Tk, H·dh)` keys
/// and values (`bias` over the `Tk` keys), as one node. Saves the attention probabilities; q, k
/// and v are the parents the graph holds anyway. Only the tracked inputs get gradients, so
/// queries reading untracked keys and values (VQT) cost no key or value gradient.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    bias: &Tensor,
    heads: usize,
) -> Result<Tensor> {
    let (b, _, d) = q.dims3()?;
    if d % heads != 0 {
        return Err(Error::Config {
            field: "num_attention_heads".into(),
            message: format!("width {d} is not divisible by {heads} heads"),
        });
    }
    let dh = d / heads;
    let scale = 1.0 / (dh as f64).sqrt();
    // `(B, T, H·dh)` seen as `(B, H, T, dh)`: a view, no copy.
    let split = move |x: &Tensor| -> candle_core::Result<Tensor> {
        x.reshape((b, x.dim(1)?, heads, dh))?.transpose(1, 2)
    };
    let (qd, kd, vd) = (q.detach(), k.detach(), v.detach());
    let (qh, kh, vh) = (split(&qd)?, split(&kd)?, split(&vd)?);
    let scores = per_head(&qh, &kh.t()?, false)?;
    let p = softmax_values(&scores, scale, Some(bias))?;
    let ctx = per_head(&p, &vh, true)?;
    drop((qh, kh, vh, scores));
    let need = [tracks(q), tracks(k), tracks(v)];
    if need == [false; 3] {
        return Ok(ctx);
    }
    let bwd = move |g: &Tensor| {
        let (qh, kh, vh) = (split(&qd)?, split(&kd)?, split(&vd)?);
        let gh = split(g)?;
        let dp = per_head(&gh, &vh.t()?, false)?;
        let dv = need[2].then(|| per_head(&p.t()?, &gh, true)).transpose()?;
        let ds = softmax_backward(&p, &dp, scale)?;
        let dq = need[0].then(|| per_head(&ds, &kh, true)).transpose()?;
        let dk = need[1].then(|| per_head(&ds.t()?, &qh, true)).transpose()?;
        Ok(vec![dq, dk, dv])
    };
    attach(&[q, k, v], ctx, bwd)
}

/// `a·b` per (batch, head) of `(B, H, M, K)` and `(B, H, K, N)` views, optionally with the heads
/// merged back into `(B, M, H·N)`.
fn per_head(a: &Tensor, b: &Tensor, merge_heads: bool) -> candle_core::Result<Tensor> {
    if let Some(fused) = kernels::matmul_per_head(a, b, merge_heads)? {
        return Ok(fused);
    }
    let c = a.contiguous()?.matmul(&b.contiguous()?)?;
    if !merge_heads {
        return Ok(c);
    }
    let (nb, nh, m, n) = c.dims4()?;
    c.transpose(1, 2)?.contiguous()?.reshape((nb, m, nh * n))
}

/// The sum of several embedding lookups (`ids` u32, `table` `(vocab, d)`), as one node that
/// scatters gradients into the trainable tables only.
pub fn embedding_sum(lookups: &[(&Tensor, &Tensor)]) -> Result<Tensor> {
    let mut value: Option<Tensor> = None;
    for (ids, table) in lookups {
        let flat = ids.flatten_all()?;
        let e = table.detach().index_select(&flat, 0)?;
        let mut dims = ids.dims().to_vec();
        dims.push(table.dim(1)?);
        let e = e.reshape(dims)?;
        value = Some(match value {
            Some(v) => (v + e)?,
            None => e,
        });
    }
    let value = value.ok_or_else(|| Error::Config {
        field: "embedding_sum".into(),
        message: "no lookups given".into(),
    })?;
    let saved: Vec<(Tensor, Option<Shape>)> = lookups
        .iter()
        .map(|(ids, table)| {
            Ok((
                ids.flatten_all()?,
                trainable(table).then(|| table.shape().clone()),
            ))
        })
        .collect::<candle_core::Result<_>>()?;
    let parents: Vec<&Tensor> = lookups.iter().map(|(_, t)| *t).collect();
    attach(&parents, value, move |g| {
        let (g2, _) = flat2(g)?;
        saved
            .iter()
            .map(|(ids, shape)| match shape {
                Some(s) => Ok(Some(
                    Tensor::zeros(s, g2.dtype(), g2.device())?.index_add(ids, &g2, 0)?,
                )),
                None => Ok(None),
            })
            .collect()
    })
}

/// Mean of `-log softmax(logits)[label]` over rows whose weight is 1 (`weights` `(N,)`, 0/1;
/// all rows when `None`). `logits` `(N, C)`, `labels` `(N,)` u32. The node saves the softmax.
pub fn cross_entropy(logits: &Tensor, labels: &Tensor, weights: Option<&Tensor>) -> Result<Tensor> {
    let (n, c) = logits.dims2()?;
    let ld = logits.detach();
    let shifted = ld.broadcast_sub(&ld.max_keepdim(1)?)?;
    let logp = shifted.broadcast_sub(&shifted.exp()?.sum_keepdim(1)?.log()?)?;
    let p = logp.exp()?;
    let labels = labels.flatten_all()?.to_dtype(DType::U32)?;
    let onehot = Tensor::arange(0u32, c as u32, logits.device())?
        .reshape((1, c))?
        .broadcast_as((n, c))?
        .broadcast_eq(&labels.reshape((n, 1))?)?
        .to_dtype(ld.dtype())?;
    let w = match weights {
        Some(w) => w.flatten_all()?.to_dtype(ld.dtype())?,
        None => Tensor::ones(n, ld.dtype(), ld.device())?,
    };
    let count = w
        .sum_all()?
        .to_dtype(DType::F64)?
        .to_scalar::<f64>()?
        .max(1.0);
    let logp_label = (logp * &onehot)?.sum(1)?;
    let loss = ((logp_label * &w)?.sum_all()? * (-1.0 / count))?;
    if !tracks(logits) {
        return Ok(loss);
    }
    attach(&[logits], loss, move |g| {
        let d = ((&p - &onehot)?.broadcast_mul(&w.reshape((n, 1))?)? * (1.0 / count))?;
        Ok(vec![Some(d.broadcast_mul(g)?)])
    })
}

/// `h + a` (a residual connection) as one node: the gradient flows to whichever of the two
/// tracks. candle's `+` would also give an untracked side (a frozen embedding's output) a
/// full-size gradient that stays in the store until the step ends.
pub fn residual(h: &Tensor, a: &Tensor) -> Result<Tensor> {
    let value = (h.detach() + a.detach())?;
    let (need_dh, need_da) = (tracks(h), tracks(a));
    attach(&[h, a], value, move |g| {
        Ok(vec![need_dh.then(|| g.clone()), need_da.then(|| g.clone())])
    })
}

/// `h + a·s`, with `s` `(d,)` scaling the last dimension of `a` (a ViT block's LayerScale
/// residual), as one node. Built from candle's ops, a frozen `s` would still get a full-size
/// `(…, d)` gradient that no one reads and that stays in the gradient store, and the product
/// `a·s` would be kept for backward; here `a` is kept only when `s` trains.
pub fn scaled_residual(h: &Tensor, a: &Tensor, s: &Tensor) -> Result<Tensor> {
    let scale = s.detach();
    let value = (h.detach() + a.detach().broadcast_mul(&scale)?)?;
    let (need_dh, need_da) = (tracks(h), tracks(a));
    let saved_a = tracks(s).then(|| a.detach());
    attach(&[h, a, s], value, move |g| {
        let dh = need_dh.then(|| g.clone());
        let da = need_da.then(|| g.broadcast_mul(&scale)).transpose()?;
        let ds = match &saved_a {
            Some(a) => {
                let (prod, _) = flat2(&(g * a)?)?;
                Some(prod.sum(0)?)
            }
            None => None,
        };
        Ok(vec![dh, da, ds])
    })
}

/// Mean over real tokens: `h` `(B, T, d)`, `mask` `(B, T)` 0/1 → `(B, d)`, as one node whose only
/// parent is `h`. Its backward needs just the per-token weights `mask / count`, so the mask never
/// enters the graph (built from candle's own ops, the mask would get a gradient of its own).
pub fn mean_pool(h: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let m = mask.to_dtype(h.dtype())?.unsqueeze(2)?;
    let count = m.sum_keepdim(1)?.clamp(1.0, f64::MAX)?;
    let weights = m.broadcast_div(&count)?;
    let value = h.detach().broadcast_mul(&weights)?.sum(1)?;
    attach(&[h], value, move |g| {
        Ok(vec![Some(g.unsqueeze(1)?.broadcast_mul(&weights)?)])
    })
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor};

    use super::*;

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
