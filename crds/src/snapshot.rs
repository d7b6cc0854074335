//! How often training state is snapshotted and how it is protected (`spec.snapshot`).
//! k data + m parity Reed–Solomon shards over the workers; a durable copy every N snapshots.

use kube::KubeSchema;
use serde::{Deserialize, Serialize};

/// In-memory erasure-coded snapshots of the trainable state, plus an optional durable tier.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SnapshotSpec {
    /// Snapshot every this many optimiser steps. PETL state is small, so 1 is affordable.
    #[serde(default = "default_every_steps")]
    #[schemars(range(min = 1))]
    pub every_steps: i64,
    /// Shard layout. dataShards + parityShards must not exceed workers.replicas. When unset:
    /// parityShards = 1 and dataShards = replicas - 1 for 2 or more replicas, and a single local
    /// copy (1 data shard, no parity) for one replica.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub erasure_coding: Option<ErasureCoding>,
    /// A durable copy for recovery when more than parityShards workers are lost at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub durable: Option<DurableSpec>,
}

impl Default for SnapshotSpec {
    fn default() -> Self {
        Self {
            every_steps: default_every_steps(),
            erasure_coding: None,
            durable: None,
        }
    }
}

fn default_every_steps() -> i64 {
    1
}

/// Reed–Solomon layout: any dataShards of the dataShards + parityShards shards rebuild a snapshot.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ErasureCoding {
    /// k: shards needed to rebuild a snapshot.
    #[schemars(range(min = 1, max = 128))]
    pub data_shards: i32,
    /// m: how many shards (workers) may be lost at once without touching the durable tier.
    #[schemars(range(min = 0, max = 128))]
    pub parity_shards: i32,
}

/// The durable snapshot tier.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct DurableSpec {
    /// Where durable snapshots are written: file:///<absolute dir>, pvc://<claim>/<path> or s3://<bucket>/<prefix>.
    #[schemars(length(min = 1, max = 2048))]
    #[x_kube(validation = crate::rules::sink_uri())]
    pub uri: String,
    /// Write every this many in-memory snapshots (and always before suspend and at the end).
    #[serde(default = "default_every_snapshots")]
    #[schemars(range(min = 1))]
    pub every_snapshots: i64,
    /// Credentials for s3:// destinations.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_ref: Option<crate::SecretRef>,
}

fn default_every_snapshots() -> i64 {
    100
}

impl SnapshotSpec {
    /// The layout in force for `replicas` workers: the explicit one, or the documented default.
    pub fn erasure_coding_for(&self, replicas: i32) -> ErasureCoding {
        self.erasure_coding.unwrap_or(if replicas >= 2 {
            ErasureCoding {
                data_shards: replicas - 1,
                parity_shards: 1,
            }
        } else {
            ErasureCoding {
                data_shards: 1,
                parity_shards: 0,
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_layout_tolerates_one_loss_from_two_workers() {
        let ec = SnapshotSpec::default().erasure_coding_for(4);
        assert_eq!((ec.data_shards, ec.parity_shards), (3, 1));
        let ec = SnapshotSpec::default().erasure_coding_for(1);
        assert_eq!((ec.data_shards, ec.parity_shards), (1, 0));
    }
}
