//! A rank's part of a snapshot: the parameters of its pieces, their AdamW moments, the step,
//! the data cursor, the inputs of every random draw, and what a restore must check first
//! (world size, bucket layout, method, the parameters' names and shapes).

use candle_core::{DType, Tensor};
use petl_snapshot::{Dtype, NamedTensor, Snapshot};
use serde::{Deserialize, Serialize};

use super::optimizer::ShardedAdamW;
use crate::{Error, Result};

/// Name of the part that holds [`SliceMeta`] as JSON.
const META: &str = "petl/meta";

/// What must match between a snapshot and the job restoring it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SliceMeta {
    pub method: String,
    pub world_size: usize,
    pub rank: usize,
    pub bucket_elems: usize,
    /// [`super::Layout::fingerprint`]: parameter names and shapes, world size, bucket size.
    pub layout: String,
    /// Global batches per epoch: the data cursor means the same batches only if it matches.
    pub batches_per_epoch: u64,
}

/// Where the data stream stands after `step` steps.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataCursor {
    pub step: u64,
    pub epoch: u64,
    /// The next batch of `epoch`.
    pub index: u64,
}

impl DataCursor {
    pub fn at(step: u64, batches_per_epoch: u64) -> DataCursor {
        let per = batches_per_epoch.max(1);
        DataCursor {
            step,
            epoch: step / per,
            index: step % per,
        }
    }
}

/// The inputs every random draw of the run is a function of: dropout masks are drawn from
/// (seed, layer, step, example), the shuffle of epoch `e` from `seed + e`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RngInputs {
    pub seed: u64,
}

/// This rank's snapshot after `step` steps (generation = step).
pub fn to_snapshot(
    opt: &ShardedAdamW,
    step: u64,
    meta: &SliceMeta,
    rng: RngInputs,
) -> Result<Snapshot> {
    let mut tensors = Vec::with_capacity(3 * opt.layout().buckets.len() + 1);
    tensors.push(NamedTensor {
        name: META.into(),
        dtype: Dtype::U8,
        shape: vec![0],
        data: serde_json::to_vec(meta).map_err(|e| Error::Internal(e.to_string()))?,
    });
    tensors[0].shape = vec![tensors[0].data.len()];
    for b in 0..opt.layout().buckets.len() {
        let (m, v) = opt.moments(b);
        for (kind, t) in [("param", &opt.pack_owned(b)?), ("adam_m", m), ("adam_v", v)] {
            tensors.push(NamedTensor {
                name: format!("{kind}/{b}"),
                dtype: Dtype::F32,
                shape: vec![t.elem_count()],
                data: f32_bytes(t)?,
            });
        }
    }
    let cursor = DataCursor::at(step, meta.batches_per_epoch);
    Ok(Snapshot {
        generation: step,
        step,
        tensors,
        rng_state: serde_json::to_vec(&rng).map_err(|e| Error::Internal(e.to_string()))?,
        data_cursor: serde_json::to_vec(&cursor).map_err(|e| Error::Internal(e.to_string()))?,
    })
}

/// Puts `snapshot`'s pieces and moments back after checking that it was written by this job in
/// this configuration; returns the step it holds. The other ranks' pieces arrive with the
/// all-gather that follows ([`super::gather_parameters`]).
pub fn restore(
    opt: &mut ShardedAdamW,
    snapshot: &Snapshot,
    meta: &SliceMeta,
    rng: RngInputs,
) -> Result<u64> {
    let generation = snapshot.generation;
    let mismatch = |what: &str, found: String, expected: String| Error::SnapshotMismatch {
        generation,
        what: what.into(),
        found,
        expected,
    };
    let find = |name: &str| snapshot.tensors.iter().find(|t| t.name == name);
    let stored: SliceMeta = find(META)
        .and_then(|t| serde_json::from_slice(&t.data).ok())
        .ok_or_else(|| mismatch("format", "no trainer metadata".into(), "petl/meta".into()))?;
    for (what, found, expected) in [
        ("method", stored.method.clone(), meta.method.clone()),
        (
            "world size",
            stored.world_size.to_string(),
            meta.world_size.to_string(),
        ),
        ("rank", stored.rank.to_string(), meta.rank.to_string()),
        (
            "bucket size",
            stored.bucket_elems.to_string(),
            meta.bucket_elems.to_string(),
        ),
        (
            "parameter layout (names and shapes)",
            stored.layout.clone(),
            meta.layout.clone(),
        ),
        (
            "batches per epoch",
            stored.batches_per_epoch.to_string(),
            meta.batches_per_epoch.to_string(),
        ),
    ] {
        if found != expected {
            return Err(mismatch(what, found, expected));
        }
    }
    let stored_rng: Option<RngInputs> = serde_json::from_slice(&snapshot.rng_state).ok();
    if stored_rng != Some(rng) {
        return Err(mismatch(
            "seed",
            format!("{stored_rng:?}"),
            format!("{:?}", Some(rng)),
        ));
    }
    let cursor: Option<DataCursor> = serde_json::from_slice(&snapshot.data_cursor).ok();
    let expected = DataCursor::at(snapshot.step, meta.batches_per_epoch);
    if cursor != Some(expected) {
        return Err(mismatch(
            "data cursor",
            format!("{cursor:?}"),
            format!("{expected:?}"),
        ));
    }
    let device = opt
        .parameters()
        .first()
        .map(|(_, v)| v.device().clone())
        .unwrap_or(candle_core::Device::Cpu);
    for b in 0..opt.layout().buckets.len() {
        let len = opt.layout().buckets[b].piece_len;
        let part = |kind: &str| -> Result<Tensor> {
            let name = format!("{kind}/{b}");
            let t = find(&name).ok_or_else(|| {
                mismatch("contents", format!("no part {name}"), "every bucket".into())
            })?;
            if t.dtype != Dtype::F32 || t.shape != [len] {
                return Err(mismatch(
                    &name,
                    format!("{:?} {:?}", t.dtype, t.shape),
                    format!("F32 [{len}]"),
                ));
            }
            let values: Vec<f32> = t
                .data
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            Ok(Tensor::from_vec(values, len, &device)?)
        };
        let (params, m, v) = (part("param")?, part("adam_m")?, part("adam_v")?);
        opt.restore_piece(b, &params, m, v)?;
    }
    opt.steps = snapshot.step;
    Ok(snapshot.step)
}

/// The raw little-endian bytes of a 1-D f32 tensor.
fn f32_bytes(t: &Tensor) -> Result<Vec<u8>> {
    if let Some(bytes) =
        crate::kernels::with_f32(t, |v| bytemuck::cast_slice::<f32, u8>(v).to_vec())
    {
        return Ok(bytes);
    }
    let values = t.to_dtype(DType::F32)?.to_vec1::<f32>()?;
    Ok(bytemuck::cast_slice::<f32, u8>(&values).to_vec())
}
