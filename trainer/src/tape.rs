//! The one autograd mechanism: every layer computes its forward value untracked, then attaches a
//! single graph node whose parents are only the tensors that need gradients and whose backward keeps
//! only what that backward reads (reference/candle-notes.md §3).
//!
//! The layers and functional ops built on it live in [`crate::nn`]; the models' own layers use it
//! too. Rules every layer follows, and every method relies on:
//! * a weight is trainable iff it is a candle `Var` (`is_variable()`); any other weight is frozen and
//!   never receives a gradient;
//! * an input that does not track (a detached tap, the untracked backbone's hidden states) never
//!   receives a gradient, so a ladder reading it stores only its own weight gradients;
//! * a node never holds an untracked tensor as a parent; what the backward needs is captured
//!   explicitly (detached handles share storage, so capturing costs no copy).

use std::sync::Mutex;

use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Shape, Storage, Tensor};

use crate::{Error, Result};

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

/// The three custom-op arities of [`Attached`]: each forward hands out the precomputed value, each
/// backward hands the closure's gradients out in parent order. `$s`/`$l` name the storage and
/// layout arguments, `$a` the parent arguments, `$grads` the gradient tuple built from `$it`.
macro_rules! attached_op {
    (
        $op:ident, $n:literal, [$($s:ident $l:ident),+], [$($a:ident),+], $grads:ty,
        |$it:ident| $out:expr
    ) => {
        impl $op for Attached {
            fn name(&self) -> &'static str {
                "attach"
            }
            fn cpu_fwd(
                &self,
                $($s: &CpuStorage, $l: &Layout),+
            ) -> candle_core::Result<(CpuStorage, Shape)> {
                self.cpu_value()
            }
            #[cfg(feature = "cuda")]
            fn cuda_fwd(
                &self,
                $($s: &candle_core::CudaStorage, $l: &Layout),+
            ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
                self.cuda_value()
            }
            fn bwd(
                &self,
                $($a: &Tensor,)+
                _res: &Tensor,
                g: &Tensor,
            ) -> candle_core::Result<$grads> {
                let mut $it = self.grads(g, $n)?.into_iter();
                Ok($out)
            }
        }
    };
}

attached_op!(CustomOp1, 1, [_s1 _l1], [_a1], Option<Tensor>, |it| it.next().flatten());
attached_op!(
    CustomOp2,
    2,
    [_s1 _l1, _s2 _l2],
    [_a1, _a2],
    (Option<Tensor>, Option<Tensor>),
    |it| (it.next().flatten(), it.next().flatten())
);
attached_op!(
    CustomOp3,
    3,
    [_s1 _l1, _s2 _l2, _s3 _l3],
    [_a1, _a2, _a3],
    (Option<Tensor>, Option<Tensor>, Option<Tensor>),
    |it| (it.next().flatten(), it.next().flatten(), it.next().flatten())
);

thread_local! {
    static NO_GRAD: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f` with graph building off on this thread (evaluation): layers save nothing and attach
/// no nodes, even over trainable weights. The previous setting comes back when `f` returns or
/// panics.
pub fn no_grad<T>(f: impl FnOnce() -> T) -> T {
    /// Puts the thread's previous setting back on drop, so an unwinding `f` restores it too.
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            NO_GRAD.with(|c| c.set(self.0));
        }
    }
    let _restore = Restore(NO_GRAD.with(|c| c.replace(true)));
    f()
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

#[cfg(test)]
mod tests {
    use candle_core::{Device, Var};

    use super::*;

    #[test]
    fn no_grad_is_restored_when_its_closure_panics() {
        let w = Var::zeros(2, candle_core::DType::F32, &Device::Cpu).unwrap();
        assert!(trainable(w.as_tensor()));
        let inner = no_grad(|| no_grad(|| trainable(w.as_tensor())));
        assert!(!inner);
        assert!(
            trainable(w.as_tensor()),
            "nested no_grad restores the setting"
        );
        let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            no_grad(|| -> () { panic!("a failing evaluation") })
        }));
        assert!(caught.is_err());
        assert!(
            trainable(w.as_tensor()),
            "gradients are back on after a panic inside no_grad"
        );
    }
}
