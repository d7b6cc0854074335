//! Fused CPU kernels for the hot paths of `nn`'s layers: linear layers as one sum of products
//! started from the bias, per-head attention products on strided views, GELU with its derivative,
//! softmax with its scale and mask, LayerNorm, column sums, and AdamW's update in place.
//!
//! candle composes these from separate ops (GELU's derivative alone is ten passes, each a fresh
//! tensor), and on the CPU those passes, their allocations and page faults cost about as much as
//! the matmuls. Every function here answers `None` for anything but contiguous f32 CPU tensors;
//! the caller then composes candle ops, which is also the path on CUDA and for f64. The inner
//! loops are compiled for AVX-512 and AVX2 and picked at run time (`multiversion`); work is split
//! across rayon's pool, the one gemm already uses.

use candle_core::{CpuStorage, InplaceOp2, InplaceOp3, Layout, Storage, Tensor};
use multiversion::multiversion;
use rayon::prelude::*;

/// Below this many elements a kernel runs on the calling thread: splitting costs more.
const PARALLEL_MIN: usize = 32 * 1024;

/// The data of `t` when it is a contiguous f32 tensor in CPU memory.
pub(crate) fn with_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Option<R> {
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cpu(CpuStorage::F32(data)) = &*storage else {
        return None;
    };
    let (start, end) = layout.contiguous_offsets()?;
    Some(f(&data[start..end]))
}

/// The data of `t`, writable in place, when it is a contiguous f32 tensor in CPU memory; `None`
/// otherwise (the caller then takes candle's path). Writes reach every tensor sharing the
/// storage (a `Var` and its views). `f` must not touch `t`'s storage through another handle:
/// the storage is locked for writing while it runs.
pub(crate) fn with_f32_mut<R>(
    t: &Tensor,
    f: impl FnOnce(&mut [f32]) -> R,
) -> candle_core::Result<Option<R>> {
    let cpu_f32 = t.device().is_cpu() && t.dtype() == candle_core::DType::F32;
    if !cpu_f32 || !t.is_contiguous() {
        return Ok(None);
    }
    let mut out = None;
    let op = InPlace(std::cell::RefCell::new(Some(|data: &mut [f32]| {
        out = Some(f(data))
    })));
    t.inplace_op1(&op)?;
    drop(op);
    Ok(out)
}

/// The in-place op behind [`with_f32_mut`]: hands the storage's slice to a closure once.
struct InPlace<F>(std::cell::RefCell<Option<F>>);

impl<F: FnOnce(&mut [f32])> candle_core::InplaceOp1 for InPlace<F> {
    fn name(&self) -> &'static str {
        "with-f32-mut"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> candle_core::Result<()> {
        let data = f32_slice_mut(storage, layout)?;
        if let Some(f) = self.0.borrow_mut().take() {
            f(data);
        }
        Ok(())
    }
}

fn tensor_like(t: &Tensor, data: Vec<f32>) -> candle_core::Result<Tensor> {
    Tensor::from_vec(data, t.shape(), t.device())
}

/// Rows per parallel chunk so a chunk holds at least [`PARALLEL_MIN`] elements.
fn rows_per_chunk(width: usize, rows: usize) -> usize {
    if width * rows < 2 * PARALLEL_MIN {
        rows.max(1)
    } else {
        PARALLEL_MIN.div_ceil(width.max(1)).max(1)
    }
}

// ---------------------------------------------------------------------------------------------
// GELU

/// Exact GELU `x·Φ(x)` and, when asked, its derivative `Φ(x) + x·φ(x)`.
pub fn gelu(x: &Tensor, derivative: bool) -> candle_core::Result<Option<(Tensor, Option<Tensor>)>> {
    let Some((y, d)) = with_f32(x, |xs| {
        let mut y = vec![0f32; xs.len()];
        let mut d = vec![0f32; if derivative { xs.len() } else { 0 }];
        let chunk = rows_per_chunk(1, xs.len());
        if derivative {
            y.par_chunks_mut(chunk)
                .zip(d.par_chunks_mut(chunk))
                .zip(xs.par_chunks(chunk))
                .for_each(|((y, d), x)| gelu_with_derivative(x, y, d));
        } else {
            y.par_chunks_mut(chunk)
                .zip(xs.par_chunks(chunk))
                .for_each(|(y, x)| gelu_values(x, y));
        }
        (y, d)
    }) else {
        return Ok(None);
    };
    let d = if derivative {
        Some(tensor_like(x, d)?)
    } else {
        None
    };
    Ok(Some((tensor_like(x, y)?, d)))
}

const FRAC_1_SQRT_2: f32 = std::f32::consts::FRAC_1_SQRT_2;
/// 1/√(2π).
const FRAC_1_SQRT_2PI: f32 = 0.398_942_3;

#[multiversion(targets("x86_64+avx512f+avx512vl+avx512dq+avx512bw+fma", "x86_64+avx2+fma"))]
fn gelu_values(x: &[f32], y: &mut [f32]) {
    for (y, &x) in y.iter_mut().zip(x) {
        *y = x * 0.5 * (1.0 + erf(x * FRAC_1_SQRT_2));
    }
}

#[multiversion(targets("x86_64+avx512f+avx512vl+avx512dq+avx512bw+fma", "x86_64+avx2+fma"))]
fn gelu_with_derivative(x: &[f32], y: &mut [f32], d: &mut [f32]) {
    for ((y, d), &x) in y.iter_mut().zip(d.iter_mut()).zip(x) {
        let cdf = 0.5 * (1.0 + erf(x * FRAC_1_SQRT_2));
        let pdf = exp(-0.5 * x * x) * FRAC_1_SQRT_2PI;
        *y = x * cdf;
        *d = cdf + x * pdf;
    }
}

/// erf for f32 as a rational function on [-4, 4] (outside, erf is ±1 in f32); the polynomial
/// of Eigen's and XLA's vectorised erf, branch-free so the loops above vectorise.
#[inline(always)]
fn erf(x: f32) -> f32 {
    let x = x.clamp(-4.0, 4.0);
    let x2 = x * x;
    let mut p = x2.mul_add(-2.726_142_3e-10, 2.770_681_4e-8);
    p = x2.mul_add(p, -2.101_024e-6);
    p = x2.mul_add(p, -5.692_506_4e-5);
    p = x2.mul_add(p, -7.349_906_3e-4);
    p = x2.mul_add(p, -2.954_6e-3);
    p = x2.mul_add(p, -1.609_603_3e-2);
    let mut q = x2.mul_add(-1.456_607_2e-5, -2.133_740_6e-4);
    q = x2.mul_add(q, -1.682_827e-3);
    q = x2.mul_add(q, -7.373_329_2e-3);
    q = x2.mul_add(q, -1.426_474e-2);
    x * p / q
}

/// e^x for f32: range reduction by ln 2 and Cephes' expf polynomial (relative error ~1 ulp);
/// branch-free so the loops vectorise. NaN stays NaN, so divergence is still caught.
#[inline(always)]
fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Adding and subtracting 1.5·2²³ rounds to the nearest integer without a libm call.
    const ROUND: f32 = 12_582_912.0;
    let x = x.clamp(-87.0, 88.0);
    let n = x.mul_add(LOG2E, ROUND) - ROUND;
    let r = n.mul_add(-LN2_LO, n.mul_add(-LN2_HI, x));
    let mut p = r.mul_add(1.987_569_1e-4, 1.398_2e-3);
    p = r.mul_add(p, 8.333_452e-3);
    p = r.mul_add(p, 4.166_579_6e-2);
    p = r.mul_add(p, 0.166_666_65);
    p = r.mul_add(p, 0.5);
    let e = (r * r).mul_add(p, r + 1.0);
    e * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

// ---------------------------------------------------------------------------------------------
// Linear layers

/// One term `scale · a·op(b)` of [`matmul_sum`]: `a` `(M, K)`; `b` `(N, K)` used transposed (a
/// weight in `(out, in)` layout) or `(K, N)` used as is.
pub struct Term<'a> {
    pub a: &'a Tensor,
    pub b: &'a Tensor,
    pub b_transposed: bool,
    pub scale: f32,
}

/// `bias + Σ scale·a·op(b)` over `terms`, built in one buffer: it starts as the bias rows and
/// every product accumulates into it (gemm's `dst = dst + scale·a·b`), where candle would
/// allocate, read and write the output once more for the bias, for each extra product and for
/// each scale. A linear layer is one term; with LoRA it is two (`x·Wᵀ` and `s·(x·Aᵀ)·Bᵀ`), and so
/// is its input gradient (`g·W` and `s·(g·B)·A`). `None` when a tensor is not a contiguous f32
/// CPU matrix or the shapes do not chain.
pub fn matmul_sum(
    terms: &[Term<'_>],
    bias: Option<&Tensor>,
) -> candle_core::Result<Option<Tensor>> {
    let Some(first) = terms.first() else {
        return Ok(None);
    };
    let Some((rows, cols)) = term_shape(first) else {
        return Ok(None);
    };
    if terms.iter().any(|t| term_shape(t) != Some((rows, cols))) {
        return Ok(None);
    }
    let bias = match bias {
        Some(b) => match with_f32(b, <[f32]>::to_vec) {
            Some(v) if v.len() == cols => Some(v),
            _ => return Ok(None),
        },
        None => None,
    };
    let mut y: Vec<f32> = Vec::with_capacity(rows * cols);
    if let Some(b) = &bias {
        for _ in 0..rows {
            y.extend_from_slice(b);
        }
    }
    let threads = candle_core::utils::get_num_threads();
    let parallelism = if threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    for (i, term) in terms.iter().enumerate() {
        let inner = term.a.dim(1)?;
        let done = with_f32(term.a, |a| {
            with_f32(term.b, |b| {
                // b (N, K) transposed: element (k, n) at n·K + k; b (K, N): at k·N + n.
                let (b_cs, b_rs) = if term.b_transposed {
                    (inner as isize, 1)
                } else {
                    (1, cols as isize)
                };
                // SAFETY: a is rows×inner and b inner×cols (or its transpose), contiguous
                // (with_f32, term_shape); y holds or has capacity for rows×cols elements, all of
                // which the first product writes (it reads them only when the bias is there).
                unsafe {
                    gemm::gemm(
                        rows,
                        cols,
                        inner,
                        y.as_mut_ptr(),
                        1,
                        cols as isize,
                        i > 0 || bias.is_some(),
                        a.as_ptr(),
                        1,
                        inner as isize,
                        b.as_ptr(),
                        b_cs,
                        b_rs,
                        1.0,
                        term.scale,
                        false,
                        false,
                        false,
                        parallelism,
                    );
                    y.set_len(rows * cols);
                }
            })
        })
        .flatten();
        if done.is_none() {
            return Ok(None);
        }
    }
    Ok(Some(Tensor::from_vec(y, (rows, cols), first.a.device())?))
}

/// `(M, N)` of a term's product, when `a` and `b` chain.
fn term_shape(t: &Term<'_>) -> Option<(usize, usize)> {
    let (m, k) = t.a.dims2().ok()?;
    let (b0, b1) = t.b.dims2().ok()?;
    let (bk, n) = if t.b_transposed { (b1, b0) } else { (b0, b1) };
    (k == bk).then_some((m, n))
}

// ---------------------------------------------------------------------------------------------
// Column sums (bias and LayerNorm parameter gradients)

/// `Σ_rows x` of `x` `(N, d)`, or `Σ_rows x⊙y` when `y` is given: each thread sums a block of
/// rows into its own `d` partial sums, which are then added. candle's sum over dim 0 walks each
/// column with a stride of `d`.
pub fn sum_rows(x: &Tensor, y: Option<&Tensor>) -> candle_core::Result<Option<Tensor>> {
    let Ok((rows, width)) = x.dims2() else {
        return Ok(None);
    };
    if y.is_some_and(|y| y.dims() != x.dims()) {
        return Ok(None);
    }
    let sums = with_f32(x, |xs| {
        let product = |ys: Option<&[f32]>| {
            let chunk = rows_per_chunk(width, rows) * width;
            let partial = |i: usize| {
                let mut acc = vec![0f32; width];
                let x = &xs[i * chunk..xs.len().min((i + 1) * chunk)];
                let y = ys.map(|ys| &ys[i * chunk..ys.len().min((i + 1) * chunk)]);
                add_rows(x, y, &mut acc);
                acc
            };
            // Per-chunk partials added in chunk order: rayon's own reduce would add them in a
            // tree shaped by work stealing, and the bits would change from run to run.
            let partials: Vec<Vec<f32>> = (0..xs.len().div_ceil(chunk.max(1)))
                .into_par_iter()
                .map(partial)
                .collect();
            let mut sums = vec![0f32; width];
            for p in &partials {
                sums.iter_mut().zip(p).for_each(|(a, b)| *a += b);
            }
            sums
        };
        match y {
            Some(y) => with_f32(y, |ys| product(Some(ys))),
            None => Some(product(None)),
        }
    })
    .flatten();
    sums.map(|s| Tensor::from_vec(s, width, x.device()))
        .transpose()
}

#[multiversion(targets("x86_64+avx512f+avx512vl+avx512dq+avx512bw+fma", "x86_64+avx2+fma"))]
fn add_rows(x: &[f32], y: Option<&[f32]>, acc: &mut [f32]) {
    let width = acc.len();
    match y {
        Some(y) => {
            for (x, y) in x.chunks(width).zip(y.chunks(width)) {
                for ((a, &x), &y) in acc.iter_mut().zip(x).zip(y) {
                    *a = x.mul_add(y, *a);
                }
            }
        }
        None => {
            for x in x.chunks(width) {
                for (a, &x) in acc.iter_mut().zip(x) {
                    *a += x;
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Attention products

/// `A·B` for every (batch, head) pair of the 4-D views `a` `(B, H, M, K)` and `b` `(B, H, K, N)`,
/// whatever their strides: heads split out of `(B, T, H·dh)` by a reshape and transpose are read
/// in place, with no copy. The result is `(B, H, M, N)`, or with `merge_heads` `(B, M, H·N)`, the
/// heads back in the model's layout. The B·H small products are spread over the threads, one
/// product per thread at a time: each is too small for gemm to split, so candle runs them one
/// after another on one core.
pub fn matmul_per_head(
    a: &Tensor,
    b: &Tensor,
    merge_heads: bool,
) -> candle_core::Result<Option<Tensor>> {
    let (Ok((nb, nh, m, k)), Ok((nb2, nh2, k2, n))) = (a.dims4(), b.dims4()) else {
        return Ok(None);
    };
    if (nb, nh, k) != (nb2, nh2, k2) {
        return Ok(None);
    }
    let product = with_f32_view(a, |a_data, a_at| {
        with_f32_view(b, |b_data, b_at| {
            let len = nb * nh * m * n;
            let mut c: Vec<f32> = Vec::with_capacity(len);
            let (c_row, c_head, c_batch) = if merge_heads {
                (nh * n, n, m * nh * n)
            } else {
                (n, m * n, nh * m * n)
            };
            let dst = SharedMut(c.as_mut_ptr());
            (0..nb * nh).into_par_iter().for_each(|pair| {
                let (bi, hi) = (pair / nh, pair % nh);
                let (lhs, rhs) = (a_at.matrix(bi, hi), b_at.matrix(bi, hi));
                // SAFETY: `with_f32_view` checked that every element of both views lies inside
                // its storage; each pair writes its own m×n block of `c`'s capacity, and gemm
                // writes every element of it (read_dst false).
                unsafe {
                    gemm::gemm(
                        m,
                        n,
                        k,
                        dst.at(bi * c_batch + hi * c_head),
                        1,
                        c_row as isize,
                        false,
                        a_data.as_ptr().add(lhs),
                        a_at.strides[3] as isize,
                        a_at.strides[2] as isize,
                        b_data.as_ptr().add(rhs),
                        b_at.strides[3] as isize,
                        b_at.strides[2] as isize,
                        0.0,
                        1.0,
                        false,
                        false,
                        false,
                        gemm::Parallelism::None,
                    );
                }
            });
            // SAFETY: the products above wrote all `len` elements.
            unsafe { c.set_len(len) };
            c
        })
    })
    .flatten();
    let Some(c) = product else {
        return Ok(None);
    };
    let shape = if merge_heads {
        vec![nb, m, nh * n]
    } else {
        vec![nb, nh, m, n]
    };
    Ok(Some(Tensor::from_vec(c, shape, a.device())?))
}

/// Where a 4-D view's matrices start in its storage, and its strides.
struct View4 {
    offset: usize,
    strides: [usize; 4],
}

impl View4 {
    fn matrix(&self, batch: usize, head: usize) -> usize {
        self.offset + batch * self.strides[0] + head * self.strides[1]
    }
}

/// The whole f32 CPU storage behind a 4-D tensor and how its view sits in it, once every element
/// of the view is known to lie inside the storage.
fn with_f32_view<R>(t: &Tensor, f: impl FnOnce(&[f32], &View4) -> R) -> Option<R> {
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cpu(CpuStorage::F32(data)) = &*storage else {
        return None;
    };
    let strides: [usize; 4] = layout.stride().try_into().ok()?;
    let dims = layout.dims();
    if dims.contains(&0) {
        return None;
    }
    let last = layout.start_offset()
        + dims
            .iter()
            .zip(&strides)
            .map(|(d, s)| (d - 1) * s)
            .sum::<usize>();
    if last >= data.len() {
        return None;
    }
    let view = View4 {
        offset: layout.start_offset(),
        strides,
    };
    Some(f(data, &view))
}

/// A destination pointer shared by threads that write disjoint parts of it.
struct SharedMut(*mut f32);

// SAFETY: users write disjoint elements only (see `matmul_per_head`).
unsafe impl Send for SharedMut {}
unsafe impl Sync for SharedMut {}

impl SharedMut {
    /// A method rather than a field access, so closures capture the whole (Sync) wrapper.
    fn at(&self, offset: usize) -> *mut f32 {
        // SAFETY: callers stay inside the allocation.
        unsafe { self.0.add(offset) }
    }
}

// ---------------------------------------------------------------------------------------------
// Softmax

/// `softmax(x·scale + bias)` over the last dimension, for attention scores `(B, H, T, T)` with
/// an additive key mask `bias` of `B·T` values (`(B, 1, 1, T)`), or plain rows without one.
pub fn softmax(
    x: &Tensor,
    scale: f32,
    bias: Option<&Tensor>,
) -> candle_core::Result<Option<Tensor>> {
    let width = x.dim(candle_core::D::Minus1)?;
    let rows = x.elem_count() / width.max(1);
    // Only a key mask, one row per batch element (`(B, 1, 1, T)` against `(B, H, T, T)`), or one
    // row for all; any other broadcast goes to candle.
    let key_mask = |b: &Tensor| match (b.dims(), x.dims()) {
        ([nb, 1, 1, t], [xb, _, _, xt]) => nb == xb && t == xt,
        _ => b.elem_count() == width,
    };
    let bias_data = match bias {
        Some(b) if key_mask(b) => match with_f32(b, <[f32]>::to_vec) {
            Some(v) => Some(v),
            None => return Ok(None),
        },
        Some(_) => return Ok(None),
        None => None,
    };
    // Rows sharing one bias row: all heads and queries of a batch element.
    let rows_per_bias = match &bias_data {
        Some(b) => rows / (b.len() / width).max(1),
        None => rows,
    };
    let out = with_f32(x, |xs| {
        let mut y = vec![0f32; xs.len()];
        let chunk = rows_per_chunk(width, rows);
        y.par_chunks_mut(chunk * width)
            .zip(xs.par_chunks(chunk * width))
            .enumerate()
            .for_each(|(c, (y, x))| {
                for (i, (y, x)) in y.chunks_mut(width).zip(x.chunks(width)).enumerate() {
                    let row = c * chunk + i;
                    let b = bias_data
                        .as_deref()
                        .map(|b| &b[(row / rows_per_bias) * width..][..width]);
                    softmax_row(x, b, scale, y);
                }
            });
        y
    });
    out.map(|y| tensor_like(x, y)).transpose()
}

#[multiversion(targets("x86_64+avx512f+avx512vl+avx512dq+avx512bw+fma", "x86_64+avx2+fma"))]
fn softmax_row(x: &[f32], bias: Option<&[f32]>, scale: f32, y: &mut [f32]) {
    match bias {
        Some(b) => {
            for ((y, &x), &b) in y.iter_mut().zip(x).zip(b) {
                *y = x.mul_add(scale, b);
            }
        }
        None => {
            for (y, &x) in y.iter_mut().zip(x) {
                *y = x * scale;
            }
        }
    }
    let max = y.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0;
    for y in y.iter_mut() {
        *y = exp(*y - max);
        sum += *y;
    }
    let inv = 1.0 / sum;
    for y in y.iter_mut() {
        *y *= inv;
    }
}

/// The gradient of `softmax(x·scale + …)` with respect to `x`, from the output `p` and the
/// output gradient `g`: `scale · p ⊙ (g − Σ g⊙p)` row by row.
pub fn softmax_backward(p: &Tensor, g: &Tensor, scale: f32) -> candle_core::Result<Option<Tensor>> {
    if p.shape() != g.shape() {
        return Ok(None);
    }
    let width = p.dim(candle_core::D::Minus1)?;
    let rows = p.elem_count() / width.max(1);
    let out = with_f32(p, |ps| {
        with_f32(g, |gs| {
            let mut dx = vec![0f32; ps.len()];
            let chunk = rows_per_chunk(width, rows) * width;
            dx.par_chunks_mut(chunk)
                .zip(ps.par_chunks(chunk).zip(gs.par_chunks(chunk)))
                .for_each(|(dx, (p, g))| {
                    for ((dx, p), g) in dx
                        .chunks_mut(width)
                        .zip(p.chunks(width))
                        .zip(g.chunks(width))
                    {
                        softmax_backward_row(p, g, scale, dx);
                    }
                });
            dx
        })
    })
    .flatten();
    out.map(|dx| tensor_like(p, dx)).transpose()
}

#[multiversion(targets("x86_64+avx512f+avx512vl+avx512dq+avx512bw+fma", "x86_64+avx2+fma"))]
fn softmax_backward_row(p: &[f32], g: &[f32], scale: f32, dx: &mut [f32]) {
    let dot: f32 = p.iter().zip(g).map(|(p, g)| p * g).sum();
    for ((dx, &p), &g) in dx.iter_mut().zip(p).zip(g) {
        *dx = scale * p * (g - dot);
    }
}

// ---------------------------------------------------------------------------------------------
// LayerNorm

/// What a LayerNorm forward produces: the output, the normalised input and `1/σ` per row.
pub struct LayerNormed {
    pub y: Tensor,
    pub xhat: Tensor,
    /// `(rows..., 1)`, the shape `mean_keepdim` gives.
    pub rstd: Tensor,
}

/// `y = (x − μ)/σ · γ + β` over the last dimension, `σ = √(var + eps)`.
pub fn layer_norm(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    eps: f64,
) -> candle_core::Result<Option<LayerNormed>> {
    let width = x.dim(candle_core::D::Minus1)?;
    let rows = x.elem_count() / width.max(1);
    let params = with_f32(gamma, <[f32]>::to_vec).zip(with_f32(beta, <[f32]>::to_vec));
    let Some((gamma_v, beta_v)) = params else {
        return Ok(None);
    };
    if gamma_v.len() != width || beta_v.len() != width {
        return Ok(None);
    }
    let eps = eps as f32;
    let out = with_f32(x, |xs| {
        let mut y = vec![0f32; xs.len()];
        let mut xhat = vec![0f32; xs.len()];
        let mut rstd = vec![0f32; rows];
        let chunk = rows_per_chunk(width, rows);
        y.par_chunks_mut(chunk * width)
            .zip(xhat.par_chunks_mut(chunk * width))
            .zip(rstd.par_chunks_mut(chunk))
            .zip(xs.par_chunks(chunk * width))
            .for_each(|(((y, xhat), rstd), x)| {
                for (((y, xhat), rstd), x) in y
                    .chunks_mut(width)
                    .zip(xhat.chunks_mut(width))
                    .zip(rstd.iter_mut())
                    .zip(x.chunks(width))
                {
                    *rstd = layer_norm_row(x, &gamma_v, &beta_v, eps, xhat, y);
                }
            });
        (y, xhat, rstd)
    });
    let Some((y, xhat, rstd)) = out else {
        return Ok(None);
    };
    let mut rstd_dims = x.dims().to_vec();
    if let Some(last) = rstd_dims.last_mut() {
        *last = 1;
    }
    Ok(Some(LayerNormed {
        y: tensor_like(x, y)?,
        xhat: tensor_like(x, xhat)?,
        rstd: Tensor::from_vec(rstd, rstd_dims, x.device())?,
    }))
}

#[multiversion(targets("x86_64+avx512f+avx512vl+avx512dq+avx512bw+fma", "x86_64+avx2+fma"))]
fn layer_norm_row(
    x: &[f32],
    gamma: &[f32],
    beta: &[f32],
    eps: f32,
    xhat: &mut [f32],
    y: &mut [f32],
) -> f32 {
    let n = x.len() as f32;
    let mean = x.iter().sum::<f32>() / n;
    let var = x.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / n;
    let rstd = 1.0 / (var + eps).sqrt();
    for (((y, xh), &x), (&g, &b)) in y
        .iter_mut()
        .zip(xhat.iter_mut())
        .zip(x)
        .zip(gamma.iter().zip(beta))
    {
        *xh = (x - mean) * rstd;
        *y = xh.mul_add(g, b);
    }
    rstd
}

/// The input gradient of LayerNorm: `(γ⊙g − mean(γ⊙g) − x̂·mean(γ⊙g⊙x̂)) · rstd`, row by row.
pub fn layer_norm_backward(
    g: &Tensor,
    xhat: &Tensor,
    rstd: &Tensor,
    gamma: &Tensor,
) -> candle_core::Result<Option<Tensor>> {
    if g.shape() != xhat.shape() {
        return Ok(None);
    }
    let width = g.dim(candle_core::D::Minus1)?;
    let rows = g.elem_count() / width.max(1);
    let Some(gamma_v) = with_f32(gamma, <[f32]>::to_vec) else {
        return Ok(None);
    };
    let Some(rstd_v) = with_f32(rstd, <[f32]>::to_vec) else {
        return Ok(None);
    };
    if gamma_v.len() != width || rstd_v.len() != rows {
        return Ok(None);
    }
    let out = with_f32(g, |gs| {
        with_f32(xhat, |xs| {
            let mut dx = vec![0f32; gs.len()];
            let chunk = rows_per_chunk(width, rows);
            dx.par_chunks_mut(chunk * width)
                .zip(gs.par_chunks(chunk * width))
                .zip(xs.par_chunks(chunk * width))
                .zip(rstd_v.par_chunks(chunk))
                .for_each(|(((dx, g), xh), rstd)| {
                    for (((dx, g), xh), &rstd) in dx
                        .chunks_mut(width)
                        .zip(g.chunks(width))
                        .zip(xh.chunks(width))
                        .zip(rstd)
                    {
                        layer_norm_backward_row(g, xh, &gamma_v, rstd, dx);
                    }
                });
            dx
        })
    })
    .flatten();
    out.map(|dx| tensor_like(g, dx)).transpose()
}

#[multiversion(targets("x86_64+avx512f+avx512vl+avx512dq+avx512bw+fma", "x86_64+avx2+fma"))]
fn layer_norm_backward_row(g: &[f32], xhat: &[f32], gamma: &[f32], rstd: f32, dx: &mut [f32]) {
    let n = g.len() as f32;
    let (mut m1, mut m2) = (0.0f32, 0.0f32);
    for ((&g, &xh), &gm) in g.iter().zip(xhat).zip(gamma) {
        let d = g * gm;
        m1 += d;
        m2 += d * xh;
    }
    let (m1, m2) = (m1 / n, m2 / n);
    for (((dx, &g), &xh), &gm) in dx.iter_mut().zip(g).zip(xhat).zip(gamma) {
        *dx = (g * gm - m1 - xh * m2) * rstd;
    }
}

// ---------------------------------------------------------------------------------------------
// AdamW

/// `Σ g²` in f64, without a f64 copy of `g`.
pub fn sum_of_squares(g: &Tensor) -> Option<f64> {
    with_f32(g, sum_of_squares_of)
}

/// `Σ g²` in f64 over fixed chunks whose partial sums are added in order, so the bits do not
/// depend on how rayon's threads split the work.
pub fn sum_of_squares_of(gs: &[f32]) -> f64 {
    let chunk = rows_per_chunk(1, gs.len());
    let partials: Vec<f64> = gs.par_chunks(chunk).map(sum_sq).collect();
    partials.iter().sum()
}

#[multiversion(targets("x86_64+avx512f+avx512vl+avx512dq+avx512bw+fma", "x86_64+avx2+fma"))]
fn sum_sq(g: &[f32]) -> f64 {
    // f32 partial sums over short runs keep the loop vectorised; f64 carries the total.
    g.chunks(256)
        .map(|c| c.iter().map(|v| v * v).sum::<f32>() as f64)
        .sum()
}

/// One AdamW step's constants.
#[derive(Clone, Copy, Debug)]
pub struct AdamWStep {
    /// Factor applied to the gradient first (global-norm clipping; 1 when none).
    pub clip: f32,
    pub beta1: f32,
    pub beta2: f32,
    /// `1/(1 − β₁ᵗ)` and `1/(1 − β₂ᵗ)`.
    pub correct1: f32,
    pub correct2: f32,
    pub eps: f32,
    pub lr: f32,
    pub weight_decay: f32,
}

/// Updates `theta`, `m` and `v` in place from `grad` (all contiguous f32 CPU tensors of one
/// shape, `m` and `v` owning their storage). Returns false, changing nothing, for anything else.
pub fn adamw_update(
    theta: &Tensor,
    m: &Tensor,
    v: &Tensor,
    grad: &Tensor,
    step: AdamWStep,
) -> candle_core::Result<bool> {
    let all = [theta, m, v, grad];
    let cpu_f32 = all
        .iter()
        .all(|t| t.device().is_cpu() && t.dtype() == candle_core::DType::F32 && t.is_contiguous());
    if !cpu_f32 || all.iter().any(|t| t.shape() != theta.shape()) {
        return Ok(false);
    }
    m.inplace_op2(grad, &Moment::First(step))?;
    v.inplace_op2(grad, &Moment::Second(step))?;
    theta.inplace_op3(m, v, &Update(step))?;
    Ok(true)
}

/// The in-place moment updates `m ← β₁m + (1−β₁)ĝ` and `v ← β₂v + (1−β₂)ĝ²`, `ĝ = clip·g`.
enum Moment {
    First(AdamWStep),
    Second(AdamWStep),
}

/// The in-place parameter update `θ ← θ(1 − lr·λ) − lr·m̂/(√v̂ + ε)`.
struct Update(AdamWStep);

fn f32_slice_mut<'a>(s: &'a mut CpuStorage, l: &Layout) -> candle_core::Result<&'a mut [f32]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::F32(data), Some((a, b))) => Ok(&mut data[a..b]),
        _ => candle_core::bail!("adamw: expected a contiguous f32 tensor"),
    }
}

fn f32_slice<'a>(s: &'a CpuStorage, l: &Layout) -> candle_core::Result<&'a [f32]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::F32(data), Some((a, b))) => Ok(&data[a..b]),
        _ => candle_core::bail!("adamw: expected a contiguous f32 tensor"),
    }
}

impl InplaceOp2 for Moment {
    fn name(&self) -> &'static str {
        "adamw-moment"
    }

    fn cpu_fwd(
        &self,
        dst: &mut CpuStorage,
        dst_l: &Layout,
        g: &CpuStorage,
        g_l: &Layout,
    ) -> candle_core::Result<()> {
        let (m, g) = (f32_slice_mut(dst, dst_l)?, f32_slice(g, g_l)?);
        let chunk = rows_per_chunk(1, m.len());
        m.par_chunks_mut(chunk)
            .zip(g.par_chunks(chunk))
            .for_each(|(m, g)| match self {
                Moment::First(s) => first_moment(m, g, s.clip, s.beta1),
                Moment::Second(s) => second_moment(m, g, s.clip, s.beta2),
            });
        Ok(())
    }
}

#[multiversion(targets("x86_64+avx512f+avx512vl+avx512dq+avx512bw+fma", "x86_64+avx2+fma"))]
fn first_moment(m: &mut [f32], g: &[f32], clip: f32, beta: f32) {
    let keep = 1.0 - beta;
    for (m, &g) in m.iter_mut().zip(g) {
        *m = m.mul_add(beta, keep * clip * g);
    }
}

#[multiversion(targets("x86_64+avx512f+avx512vl+avx512dq+avx512bw+fma", "x86_64+avx2+fma"))]
fn second_moment(v: &mut [f32], g: &[f32], clip: f32, beta: f32) {
    let keep = 1.0 - beta;
    for (v, &g) in v.iter_mut().zip(g) {
        let g = clip * g;
        *v = v.mul_add(beta, keep * g * g);
    }
}

impl InplaceOp3 for Update {
    fn name(&self) -> &'static str {
        "adamw-update"
    }

    fn cpu_fwd(
        &self,
        dst: &mut CpuStorage,
        dst_l: &Layout,
        m: &CpuStorage,
        m_l: &Layout,
        v: &CpuStorage,
        v_l: &Layout,
    ) -> candle_core::Result<()> {
        let theta = f32_slice_mut(dst, dst_l)?;
        let (m, v) = (f32_slice(m, m_l)?, f32_slice(v, v_l)?);
        let chunk = rows_per_chunk(1, theta.len());
        theta
            .par_chunks_mut(chunk)
            .zip(m.par_chunks(chunk).zip(v.par_chunks(chunk)))
            .for_each(|(t, (m, v))| apply_update(t, m, v, &self.0));
        Ok(())
    }
}

/// AdamW on plain slices of one shape: `m`, `v` and `theta` updated in place from `grad` in one
/// pass, with exactly the arithmetic of [`adamw_update`]'s three passes. The sharded optimiser
/// runs it on the runs of a rank's piece, reading the parameters where the `Var`s keep them.
pub fn adamw_slices(theta: &mut [f32], m: &mut [f32], v: &mut [f32], grad: &[f32], s: AdamWStep) {
    let chunk = rows_per_chunk(1, theta.len());
    theta
        .par_chunks_mut(chunk)
        .zip(m.par_chunks_mut(chunk))
        .zip(v.par_chunks_mut(chunk))
        .zip(grad.par_chunks(chunk))
        .for_each(|(((t, m), v), g)| {
            first_moment(m, g, s.clip, s.beta1);
            second_moment(v, g, s.clip, s.beta2);
            apply_update(t, m, v, &s);
        });
}

#[multiversion(targets("x86_64+avx512f+avx512vl+avx512dq+avx512bw+fma", "x86_64+avx2+fma"))]
fn apply_update(theta: &mut [f32], m: &[f32], v: &[f32], s: &AdamWStep) {
    let decay = 1.0 - s.lr * s.weight_decay;
    for ((t, &m), &v) in theta.iter_mut().zip(m).zip(v) {
        let update = (m * s.correct1) / ((v * s.correct2).sqrt() + s.eps);
        *t = t.mul_add(decay, -s.lr * update);
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{D, DType, Device, Tensor};

    use super::*;

    fn random(shape: &[usize], seed: u64) -> Tensor {
        let mut rng = crate::init::Rng::new(seed);
        let n: usize = shape.iter().product();
        let data: Vec<f32> = (0..n).map(|_| (rng.uniform() as f32 - 0.5) * 8.0).collect();
        Tensor::from_vec(data, shape, &Device::Cpu).unwrap()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    #[test]
    fn erf_and_exp_match_the_reference_to_f32_precision() {
        let xs: Vec<f32> = (-6000..=6000).map(|i| i as f32 / 1000.0).collect();
        let reference = Tensor::new(xs.as_slice(), &Device::Cpu)
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap()
            .erf()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        for (&x, &want) in xs.iter().zip(&reference) {
            assert!(
                (erf(x) as f64 - want).abs() < 5e-7,
                "erf({x}) = {} want {want}",
                erf(x)
            );
        }
        for x in (-870..=870).map(|i| i as f32 / 10.0) {
            let want = (x as f64).exp();
            let rel = ((exp(x) as f64 - want) / want).abs();
            assert!(rel < 5e-7, "exp({x}) = {} want {want}", exp(x));
        }
        assert!(exp(f32::NAN).is_nan());
    }

    #[test]
    fn fused_gelu_and_its_derivative_match_candle() {
        let u = random(&[300, 257], 1);
        let (y, d) = gelu(&u, true).unwrap().unwrap();
        assert!(max_diff(&y, &u.gelu_erf().unwrap()) < 2e-6);
        let cdf = ((&u * std::f64::consts::FRAC_1_SQRT_2)
            .unwrap()
            .erf()
            .unwrap()
            + 1.0)
            .unwrap()
            * 0.5;
        let pdf = (u.sqr().unwrap() * -0.5).unwrap().exp().unwrap()
            * (1.0 / (2.0 * std::f64::consts::PI).sqrt());
        let want = (cdf.unwrap() + (&u * pdf.unwrap()).unwrap()).unwrap();
        assert!(max_diff(&d.unwrap(), &want) < 2e-6);
        let (y_only, none) = gelu(&u, false).unwrap().unwrap();
        assert!(none.is_none());
        assert_eq!(max_diff(&y, &y_only), 0.0);
    }

    #[test]
    fn gelu_declines_what_it_cannot_fuse() {
        let f64s = random(&[4, 4], 2).to_dtype(DType::F64).unwrap();
        assert!(gelu(&f64s, true).unwrap().is_none());
        let strided = random(&[4, 6], 3).t().unwrap();
        assert!(gelu(&strided, true).unwrap().is_none());
    }

    #[test]
    fn fused_softmax_with_scale_and_key_mask_matches_candle() {
        let (b, h, t) = (3, 4, 37);
        let scores = random(&[b, h, t, t], 4);
        let mask = random(&[b, 1, 1, t], 5)
            .ge(0.0)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap();
        let bias = ((mask - 1.0).unwrap() * 1e4).unwrap();
        let got = softmax(&scores, 0.25, Some(&bias)).unwrap().unwrap();
        let z = (&scores * 0.25).unwrap().broadcast_add(&bias).unwrap();
        let want = candle_nn::ops::softmax_last_dim(&z).unwrap();
        assert!(max_diff(&got, &want) < 1e-6);
        let per_query = random(&[b, 1, t, t], 24);
        assert!(softmax(&scores, 0.25, Some(&per_query)).unwrap().is_none());
        let plain = softmax(&scores, 1.0, None).unwrap().unwrap();
        let want = candle_nn::ops::softmax_last_dim(&scores).unwrap();
        assert!(max_diff(&plain, &want) < 1e-6);
    }

    #[test]
    fn fused_softmax_backward_matches_the_composed_formula() {
        let p = candle_nn::ops::softmax_last_dim(&random(&[70, 33], 6)).unwrap();
        let g = random(&[70, 33], 7);
        let got = softmax_backward(&p, &g, 0.5).unwrap().unwrap();
        let dot = (&g * &p).unwrap().sum_keepdim(D::Minus1).unwrap();
        let want = ((&p * g.broadcast_sub(&dot).unwrap()).unwrap() * 0.5).unwrap();
        assert!(max_diff(&got, &want) < 1e-5);
    }

    #[test]
    fn fused_layer_norm_and_its_input_gradient_match_the_composed_formula() {
        let x = random(&[2, 90, 48], 8);
        let gamma = random(&[48], 9);
        let beta = random(&[48], 10);
        let n = layer_norm(&x, &gamma, &beta, 1e-12).unwrap().unwrap();
        let mean = x.mean_keepdim(D::Minus1).unwrap();
        let xc = x.broadcast_sub(&mean).unwrap();
        let var = xc.sqr().unwrap().mean_keepdim(D::Minus1).unwrap();
        let rstd = (var + 1e-12).unwrap().sqrt().unwrap().recip().unwrap();
        let xhat = xc.broadcast_mul(&rstd).unwrap();
        let y = xhat
            .broadcast_mul(&gamma)
            .unwrap()
            .broadcast_add(&beta)
            .unwrap();
        assert!(max_diff(&n.y, &y) < 1e-4);
        assert!(max_diff(&n.xhat, &xhat) < 1e-5);
        assert_eq!(n.rstd.dims(), rstd.dims());

        let g = random(&[2, 90, 48], 11);
        let got = layer_norm_backward(&g, &n.xhat, &n.rstd, &gamma)
            .unwrap()
            .unwrap();
        let dxhat = g.broadcast_mul(&gamma).unwrap();
        let m1 = dxhat.mean_keepdim(D::Minus1).unwrap();
        let m2 = (&dxhat * &xhat).unwrap().mean_keepdim(D::Minus1).unwrap();
        let want = dxhat
            .broadcast_sub(&m1)
            .unwrap()
            .sub(&xhat.broadcast_mul(&m2).unwrap())
            .unwrap()
            .broadcast_mul(&rstd)
            .unwrap();
        assert!(max_diff(&got, &want) < 1e-4);
    }

    #[test]
    fn row_sums_match_candle_sum_over_rows() {
        let x = random(&[3000, 37], 21);
        let y = random(&[3000, 37], 22);
        let got = sum_rows(&x, None).unwrap().unwrap();
        assert!(max_diff(&got, &x.sum(0).unwrap()) < 1e-2);
        let got = sum_rows(&x, Some(&y)).unwrap().unwrap();
        let want = (&x * &y).unwrap().sum(0).unwrap();
        assert!(max_diff(&got, &want) < 1e-2);
        assert!(sum_rows(&x, Some(&y.t().unwrap())).unwrap().is_none());
    }

    #[test]
    fn a_sum_of_products_started_from_the_bias_matches_candle() {
        let x = random(&[130, 40], 18);
        let w = random(&[24, 40], 19);
        let b = random(&[24], 20);
        let a = random(&[4, 40], 21);
        let up = random(&[24, 4], 22);
        let term = |a, b, b_transposed, scale| Term {
            a,
            b,
            b_transposed,
            scale,
        };
        let xw = x.matmul(&w.t().unwrap()).unwrap();
        let got = matmul_sum(&[term(&x, &w, true, 1.0)], Some(&b))
            .unwrap()
            .unwrap();
        assert!(max_diff(&got, &xw.broadcast_add(&b).unwrap()) < 1e-4);
        let got = matmul_sum(&[term(&x, &w, true, 1.0)], None)
            .unwrap()
            .unwrap();
        assert!(max_diff(&got, &xw) < 1e-4);

        // A LoRA layer: x·Wᵀ + b + 2·(x·Aᵀ)·Bᵀ, and its input gradient g·W + 2·(g·B)·A.
        let t = x.matmul(&a.t().unwrap()).unwrap();
        let want = (xw.broadcast_add(&b).unwrap()
            + (t.matmul(&up.t().unwrap()).unwrap() * 2.0).unwrap())
        .unwrap();
        let got = matmul_sum(
            &[term(&x, &w, true, 1.0), term(&t, &up, true, 2.0)],
            Some(&b),
        )
        .unwrap()
        .unwrap();
        assert!(max_diff(&got, &want) < 1e-3);
        let g = random(&[130, 24], 23);
        let gb = g.matmul(&up).unwrap();
        let want = (g.matmul(&w).unwrap() + (gb.matmul(&a).unwrap() * 2.0).unwrap()).unwrap();
        let got = matmul_sum(&[term(&g, &w, false, 1.0), term(&gb, &a, false, 2.0)], None)
            .unwrap()
            .unwrap();
        assert!(max_diff(&got, &want) < 1e-3);

        let mismatched = [term(&x, &w, true, 1.0), term(&x, &w, false, 1.0)];
        assert!(matmul_sum(&mismatched, None).unwrap().is_none());
    }

    #[test]
    fn per_head_products_of_strided_views_match_candle() {
        let (b, t, h, dh) = (3, 17, 4, 8);
        let q = random(&[b, t, h * dh], 13);
        let k = random(&[b, t, h * dh], 14);
        let heads = |x: &Tensor| x.reshape((b, t, h, dh)).unwrap().transpose(1, 2).unwrap();
        let (qh, kh) = (heads(&q), heads(&k));
        let contiguous = |x: &Tensor| x.contiguous().unwrap();
        let want = contiguous(&qh)
            .matmul(&contiguous(&kh.t().unwrap()))
            .unwrap();
        let got = matmul_per_head(&qh, &kh.t().unwrap(), false)
            .unwrap()
            .unwrap();
        assert_eq!(got.dims(), want.dims());
        assert!(max_diff(&got, &want) < 1e-4);

        let p = random(&[b, h, t, t], 15);
        let want = p
            .matmul(&contiguous(&kh))
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .contiguous()
            .unwrap()
            .reshape((b, t, h * dh))
            .unwrap();
        let got = matmul_per_head(&p, &kh, true).unwrap().unwrap();
        assert_eq!(got.dims(), want.dims());
        assert!(max_diff(&got, &want) < 1e-4);
    }

    #[test]
    fn per_head_products_decline_mismatched_shapes() {
        let a = random(&[2, 3, 4, 5], 16);
        let b = random(&[2, 3, 6, 5], 17);
        assert!(matmul_per_head(&a, &b, false).unwrap().is_none());
    }

    #[test]
    fn parallel_sums_add_fixed_chunks_in_order_so_the_bits_never_change() {
        let g = random(&[300_001], 31);
        let data = g.to_vec1::<f32>().unwrap();
        let chunk = rows_per_chunk(1, data.len());
        let want = data.chunks(chunk).map(sum_sq).fold(0.0f64, |a, b| a + b);
        let x = random(&[5000, 33], 32);
        let rows = x.to_vec2::<f32>().unwrap();
        let per = rows_per_chunk(33, 5000);
        let mut columns = vec![0f32; 33];
        for block in rows.chunks(per) {
            let mut acc = vec![0f32; 33];
            for row in block {
                acc.iter_mut().zip(row).for_each(|(a, v)| *a += v);
            }
            columns.iter_mut().zip(&acc).for_each(|(c, a)| *c += a);
        }
        for _ in 0..5 {
            assert_eq!(sum_of_squares(&g).unwrap().to_bits(), want.to_bits());
            let got = sum_rows(&x, None)
                .unwrap()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            assert_eq!(got, columns);
        }
    }

    #[test]
    fn sum_of_squares_accumulates_in_f64() {
        let g = random(&[100_003], 12);
        let want = g
            .to_dtype(DType::F64)
            .unwrap()
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        let got = sum_of_squares(&g).unwrap();
        assert!(((got - want) / want).abs() < 1e-6, "{got} vs {want}");
    }
}
