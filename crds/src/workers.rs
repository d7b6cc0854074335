//! The worker pods (`spec.workers`): how many ranks and where they may run.
//! Placement fields stay mutable while suspended so a queue can inject them (Kueue).

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{ResourceRequirements, Toleration};
use kube::KubeSchema;
use serde::{Deserialize, Serialize};

/// The trainer pods, one per rank.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct WorkersSpec {
    /// Number of ranks (pods). Immutable once the job has started.
    #[serde(default = "default_replicas")]
    #[schemars(range(min = 1, max = 256))]
    pub replicas: i32,
    /// Container image with the petl-trainer and petl-snapshot binaries; the operator's
    /// --trainer-image default when unset. Immutable once the job has started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 512))]
    pub image: Option<String>,
    /// CPU/memory/GPU requests and limits of the trainer container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// Node labels a worker's node must have. Mutable only while suspended or before start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    pub node_selector: Option<BTreeMap<String, String>>,
    /// Tolerations of the worker pods. Mutable only while suspended or before start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    pub tolerations: Option<Vec<Toleration>>,
    /// PriorityClass of the worker pods. Mutable only while suspended or before start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub priority_class_name: Option<String>,
}

fn default_replicas() -> i32 {
    1
}

impl Default for WorkersSpec {
    fn default() -> Self {
        Self::replicas(default_replicas())
    }
}

impl WorkersSpec {
    /// `replicas` workers, everything else unset.
    pub fn replicas(replicas: i32) -> Self {
        Self {
            replicas,
            image: None,
            resources: None,
            node_selector: None,
            tolerations: None,
            priority_class_name: None,
        }
    }
}
