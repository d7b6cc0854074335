//! AdamW over the pieces this rank owns: its slice of the optimiser moments, the packing of
//! gradients into buckets, the update of the owned scalars where the `Var`s keep them, and the
//! unpacking of the pieces other ranks updated.
//!
//! The parameters themselves are not copied into a separate master buffer: every rank holds the
//! full parameters anyway (ZeRO-1 shards the optimiser state), so the owned scalars are updated
//! in place in the `Var`s and only their packed copy travels. Contiguous f32 CPU tensors take the
//! fused kernel on slices; other devices and dtypes compose candle ops on views.

use candle_core::{DType, Tensor, Var};

use super::layout::{Layout, ParamInfo, Segment};
use crate::kernels::{self, AdamWStep};
use crate::{Error, Result};

/// Where the gradient of an owned segment is read from.
pub enum Gradients<'a> {
    /// One rank alone: straight from each parameter's gradient (no packing, no copy).
    Direct(&'a [Option<Tensor>]),
    /// Several ranks: the reduce-scattered piece of each bucket, summed over the ranks.
    Reduced(&'a [Tensor]),
}

/// AdamW (β₁ 0.9, β₂ 0.999, ε 1e-8, decoupled weight decay) on this rank's pieces.
pub struct ShardedAdamW {
    params: Vec<(String, Var)>,
    layout: Layout,
    rank: usize,
    /// Per bucket, the first and second moments of this rank's piece (f32, `piece_len` each).
    moments: Vec<(Tensor, Tensor)>,
    pub weight_decay: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Updates applied so far (bias correction uses it).
    pub steps: u64,
}

impl ShardedAdamW {
    /// Lays `params` out over `world_size` ranks in buckets of `bucket_elems` scalars; this rank
    /// keeps moments for its pieces only.
    pub fn new(
        params: Vec<(String, Var)>,
        weight_decay: f64,
        rank: usize,
        world_size: usize,
        bucket_elems: usize,
    ) -> Result<Self> {
        if rank >= world_size.max(1) {
            return Err(Error::Config {
                field: "rank".into(),
                message: format!("rank {rank} is outside a world of {world_size}"),
            });
        }
        let infos = params
            .iter()
            .map(|(name, v)| ParamInfo {
                name: name.clone(),
                shape: v.dims().to_vec(),
            })
            .collect();
        let layout = Layout::new(infos, world_size, bucket_elems);
        let device = params
            .first()
            .map(|(_, v)| v.device().clone())
            .unwrap_or(candle_core::Device::Cpu);
        let moments = layout
            .buckets
            .iter()
            .map(|b| {
                let zeros = || Tensor::zeros(b.piece_len, DType::F32, &device);
                Ok((zeros()?, zeros()?))
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            params,
            layout,
            rank,
            moments,
            weight_decay,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            steps: 0,
        })
    }

    pub fn parameters(&self) -> &[(String, Var)] {
        &self.params
    }

    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    pub fn world_size(&self) -> usize {
        self.layout.world_size
    }

    /// This rank's moments of bucket `b`.
    pub fn moments(&self, b: usize) -> &(Tensor, Tensor) {
        &self.moments[b]
    }

    /// Each parameter's gradient in `grads` (detached), `None` where it got none.
    pub fn gradients(&self, grads: &candle_core::backprop::GradStore) -> Vec<Option<Tensor>> {
        self.params
            .iter()
            .map(|(_, v)| grads.get(v.as_tensor()).map(Tensor::detach))
            .collect()
    }

    /// Bucket `b` of the gradients as one f32 vector of its padded length, every rank's piece in
    /// place; a missing gradient and the padding are zeros.
    pub fn pack_gradients(&self, b: usize, grads: &[Option<Tensor>]) -> Result<Tensor> {
        let bucket = &self.layout.buckets[b];
        let device = self.device();
        if device.is_cpu() {
            let mut out = vec![0f32; bucket.padded_len()];
            for (rank, piece) in bucket.pieces.iter().enumerate() {
                let base = rank * bucket.piece_len;
                for s in piece {
                    let Some(g) = &grads[s.param] else { continue };
                    let dst = &mut out[base + s.piece_offset..][..s.len];
                    if kernels::with_f32(g, |src| {
                        dst.copy_from_slice(&src[s.param_offset..][..s.len])
                    })
                    .is_none()
                    {
                        let src = segment_of(g, s)?.to_vec1::<f32>()?;
                        dst.copy_from_slice(&src);
                    }
                }
            }
            return Ok(Tensor::from_vec(out, bucket.padded_len(), &device)?);
        }
        let mut parts = Vec::new();
        for piece in &bucket.pieces {
            parts.extend(self.piece_parts(piece, bucket.piece_len, |s| {
                grads[s.param]
                    .as_ref()
                    .map(|g| segment_of(g, s))
                    .transpose()
            })?);
        }
        Ok(Tensor::cat(&parts, 0)?)
    }

    /// `Σ g²` of this rank's gradient for bucket `b`, before scaling.
    pub fn sum_of_squares(&self, b: usize, grads: &Gradients<'_>) -> Result<f64> {
        match grads {
            Gradients::Reduced(pieces) => sum_of_squares(&pieces[b]),
            Gradients::Direct(direct) => {
                let mut sum = 0.0;
                for s in self.owned(b) {
                    if let Some(g) = &direct[s.param] {
                        sum += match kernels::with_f32(g, |d| {
                            kernels::sum_of_squares_of(&d[s.param_offset..][..s.len])
                        }) {
                            Some(v) => v,
                            None => sum_of_squares(&segment_of(g, s)?)?,
                        };
                    }
                }
                Ok(sum)
            }
        }
    }

    /// Starts a new update: the bias-correction counter advances once per optimiser step.
    pub fn begin_update(&mut self) {
        self.steps += 1;
    }

    /// The constants of this update at rate `lr`, the gradient first multiplied by `scale`
    /// (clipping, and 1/N for a sum over N ranks).
    pub fn step_constants(&self, lr: f64, scale: f64) -> AdamWStep {
        let t = self.steps.max(1) as i32;
        AdamWStep {
            clip: scale as f32,
            beta1: self.beta1 as f32,
            beta2: self.beta2 as f32,
            correct1: (1.0 / (1.0 - self.beta1.powi(t))) as f32,
            correct2: (1.0 / (1.0 - self.beta2.powi(t))) as f32,
            eps: self.eps as f32,
            lr: lr as f32,
            weight_decay: self.weight_decay as f32,
        }
    }

    /// Applies AdamW to this rank's piece of bucket `b`. Segments of parameters that got no
    /// gradient this step (`has_grad`, the same on every rank) are left as they are.
    pub fn update(
        &mut self,
        b: usize,
        grads: &Gradients<'_>,
        has_grad: &[bool],
        step: AdamWStep,
    ) -> Result<()> {
        let segments: Vec<Segment> = self.owned(b).to_vec();
        let (m, v) = self.moments[b].clone();
        for s in segments.iter().filter(|s| has_grad[s.param]) {
            let (g, g_offset) = match grads {
                Gradients::Reduced(pieces) => (&pieces[b], s.piece_offset),
                Gradients::Direct(direct) => match &direct[s.param] {
                    Some(g) => (g, s.param_offset),
                    None => continue,
                },
            };
            let var = self.params[s.param].1.as_tensor();
            if ![var, &m, &v, g].iter().all(|t| cpu_f32(t)) {
                self.update_composed(s, &m, &v, g, g_offset, step)?;
                continue;
            }
            let missing = || Error::Internal("a CPU f32 tensor refused its slice".into());
            kernels::with_f32_mut(var, |theta| -> Result<()> {
                kernels::with_f32_mut(&m, |m| -> Result<()> {
                    kernels::with_f32_mut(&v, |v| -> Result<()> {
                        kernels::with_f32(g, |g| {
                            kernels::adamw_slices(
                                &mut theta[s.param_offset..][..s.len],
                                &mut m[s.piece_offset..][..s.len],
                                &mut v[s.piece_offset..][..s.len],
                                &g[g_offset..][..s.len],
                                step,
                            )
                        })
                        .ok_or_else(missing)
                    })?
                    .ok_or_else(missing)?
                })?
                .ok_or_else(missing)?
            })?
            .ok_or_else(missing)??;
        }
        Ok(())
    }

    /// The update of one segment with candle ops (GPU, other dtypes), written back in place.
    fn update_composed(
        &self,
        s: &Segment,
        m: &Tensor,
        v: &Tensor,
        g: &Tensor,
        g_offset: usize,
        step: AdamWStep,
    ) -> Result<()> {
        let var = self.params[s.param].1.as_tensor();
        let flat = var.flatten_all()?;
        let theta = flat
            .narrow(0, s.param_offset, s.len)?
            .to_dtype(DType::F32)?;
        let g = g
            .flatten_all()?
            .narrow(0, g_offset, s.len)?
            .to_dtype(DType::F32)?;
        let g = (g * step.clip as f64)?;
        let m_seg = m.narrow(0, s.piece_offset, s.len)?;
        let v_seg = v.narrow(0, s.piece_offset, s.len)?;
        let (b1, b2) = (step.beta1 as f64, step.beta2 as f64);
        let m_new = ((m_seg * b1)? + (&g * (1.0 - b1))?)?;
        let v_new = ((v_seg * b2)? + (g.sqr()? * (1.0 - b2))?)?;
        let update = ((&m_new * step.correct1 as f64)?
            / ((&v_new * step.correct2 as f64)?.sqrt()? + step.eps as f64)?)?;
        let decay = 1.0 - step.lr as f64 * step.weight_decay as f64;
        let theta = ((theta * decay)? - (update * step.lr as f64)?)?;
        m.slice_set(&m_new.contiguous()?, 0, s.piece_offset)?;
        v.slice_set(&v_new.contiguous()?, 0, s.piece_offset)?;
        flat.slice_set(
            &theta.to_dtype(var.dtype())?.contiguous()?,
            0,
            s.param_offset,
        )?;
        Ok(())
    }

    /// This rank's piece of bucket `b` of the parameters, packed (f32, `piece_len`, padding 0).
    pub fn pack_owned(&self, b: usize) -> Result<Tensor> {
        self.pack_piece(b, self.rank)
    }

    /// Rank `rank`'s piece of bucket `b` of this rank's parameters, packed.
    pub fn pack_piece(&self, b: usize, rank: usize) -> Result<Tensor> {
        let bucket = &self.layout.buckets[b];
        let piece = &bucket.pieces[rank];
        let device = self.device();
        if device.is_cpu() {
            let mut out = vec![0f32; bucket.piece_len];
            for s in piece {
                let var = self.params[s.param].1.as_tensor();
                let dst = &mut out[s.piece_offset..][..s.len];
                if kernels::with_f32(var, |src| {
                    dst.copy_from_slice(&src[s.param_offset..][..s.len])
                })
                .is_none()
                {
                    dst.copy_from_slice(&segment_of(var, s)?.to_vec1::<f32>()?);
                }
            }
            return Ok(Tensor::from_vec(out, bucket.piece_len, &device)?);
        }
        let parts = self.piece_parts(piece, bucket.piece_len, |s| {
            Ok(Some(segment_of(self.params[s.param].1.as_tensor(), s)?))
        })?;
        Ok(Tensor::cat(&parts, 0)?)
    }

    /// Writes the pieces of `gathered` (bucket `b`, every rank's piece in order) into the
    /// parameters; this rank's own piece is already in place and is skipped unless `all`.
    pub fn unpack(&self, b: usize, gathered: &Tensor, all: bool) -> Result<()> {
        let bucket = &self.layout.buckets[b];
        if gathered.dims() != [bucket.padded_len()] {
            return Err(Error::Internal(format!(
                "bucket {b} gathered as {:?}, its layout has {} scalars",
                gathered.dims(),
                bucket.padded_len()
            )));
        }
        for (rank, piece) in bucket.pieces.iter().enumerate() {
            if rank == self.rank && !all {
                continue;
            }
            self.write_piece(piece, gathered, rank * bucket.piece_len)?;
        }
        Ok(())
    }

    /// Writes the segments of `piece` from `src` (starting at `base`) into the parameters.
    fn write_piece(&self, piece: &[Segment], src: &Tensor, base: usize) -> Result<()> {
        let fast = kernels::with_f32(src, |src| -> Result<bool> {
            for s in piece {
                let var = self.params[s.param].1.as_tensor();
                let written = kernels::with_f32_mut(var, |dst| {
                    dst[s.param_offset..][..s.len]
                        .copy_from_slice(&src[base + s.piece_offset..][..s.len])
                })?;
                if written.is_none() {
                    return Ok(false);
                }
            }
            Ok(true)
        })
        .transpose()?;
        if fast == Some(true) {
            return Ok(());
        }
        for s in piece {
            let var = self.params[s.param].1.as_tensor();
            let part = src
                .narrow(0, base + s.piece_offset, s.len)?
                .to_dtype(var.dtype())?
                .contiguous()?;
            var.flatten_all()?.slice_set(&part, 0, s.param_offset)?;
        }
        Ok(())
    }

    /// Puts a restored piece of this rank (packed as [`Self::pack_owned`] gives it) back into
    /// the parameters, with its moments.
    pub fn restore_piece(&mut self, b: usize, params: &Tensor, m: Tensor, v: Tensor) -> Result<()> {
        let bucket = &self.layout.buckets[b];
        let len = bucket.piece_len;
        for (what, t) in [
            ("parameters", params),
            ("first moment", &m),
            ("second moment", &v),
        ] {
            if t.dims() != [len] {
                return Err(Error::Internal(format!(
                    "restored {what} of bucket {b} has shape {:?}, the layout needs [{len}]",
                    t.dims()
                )));
            }
        }
        let piece = bucket.pieces[self.rank].clone();
        self.write_piece(&piece, params, 0)?;
        let device = self.device();
        // Own storage: the moments are updated in place and the snapshot keeps its own bytes.
        let own = |t: Tensor| -> Result<Tensor> {
            Ok(t.to_dtype(DType::F32)?
                .to_device(&device)?
                .contiguous()?
                .copy()?)
        };
        self.moments[b] = (own(m)?, own(v)?);
        Ok(())
    }

    /// The segments of this rank's piece of bucket `b`.
    pub fn owned(&self, b: usize) -> &[Segment] {
        &self.layout.buckets[b].pieces[self.rank]
    }

    fn device(&self) -> candle_core::Device {
        self.params
            .first()
            .map(|(_, v)| v.device().clone())
            .unwrap_or(candle_core::Device::Cpu)
    }

    /// A piece as a list of f32 tensors to concatenate: each segment's values (`value`, zeros
    /// when it returns `None`), then the padding.
    fn piece_parts(
        &self,
        piece: &[Segment],
        piece_len: usize,
        mut value: impl FnMut(&Segment) -> Result<Option<Tensor>>,
    ) -> Result<Vec<Tensor>> {
        let device = self.device();
        let mut parts = Vec::with_capacity(piece.len() + 1);
        let mut filled = 0;
        for s in piece {
            parts.push(match value(s)? {
                Some(t) => t.to_dtype(DType::F32)?,
                None => Tensor::zeros(s.len, DType::F32, &device)?,
            });
            filled += s.len;
        }
        if filled < piece_len || parts.is_empty() {
            parts.push(Tensor::zeros(piece_len - filled, DType::F32, &device)?);
        }
        Ok(parts)
    }
}

/// Whether the fused kernels can work on `t` in place.
fn cpu_f32(t: &Tensor) -> bool {
    t.device().is_cpu() && t.dtype() == DType::F32 && t.is_contiguous()
}

/// The scalars of segment `s` in `t` (a parameter or its gradient), flattened.
fn segment_of(t: &Tensor, s: &Segment) -> Result<Tensor> {
    Ok(t.flatten_all()?
        .narrow(0, s.param_offset, s.len)?
        .to_dtype(DType::F32)?)
}

/// `Σ t²` in f64, in an order fixed by the length alone.
fn sum_of_squares(t: &Tensor) -> Result<f64> {
    match kernels::sum_of_squares(t) {
        Some(v) => Ok(v),
        None => Ok(t
            .to_dtype(DType::F64)?
            .sqr()?
            .sum_all()?
            .to_scalar::<f64>()?),
    }
}
