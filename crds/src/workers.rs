//! The worker pods (`spec.workers`): how many ranks and where they may run.
//! Placement fields stay mutable while suspended so a queue can inject them (Kueue).

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{ResourceRequirements, Toleration};
use kube::KubeSchema;
use schemars::{JsonSchema, Schema, SchemaGenerator};
use serde::{Deserialize, Serialize};
use serde_json::Value;

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
    #[schemars(schema_with = "bounded::<Option<ResourceRequirements>>")]
    pub resources: Option<ResourceRequirements>,
    /// Node labels a worker's node must have. Mutable only while suspended or before start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "bounded::<Option<BTreeMap<String, String>>>")]
    pub node_selector: Option<BTreeMap<String, String>>,
    /// Tolerations of the worker pods. Mutable only while suspended or before start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "bounded::<Option<Vec<Toleration>>>")]
    pub tolerations: Option<Vec<Toleration>>,
    /// PriorityClass of the worker pods. Mutable only while suspended or before start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub priority_class_name: Option<String>,
}

/// Longest string accepted inside the Kubernetes types embedded here (a prefixed label key).
const MAX_STRING: u64 = 317;
/// Most entries accepted in a list or map inside them.
const MAX_ENTRIES: u64 = 64;

/// `T`'s schema with every string, list and map given an upper bound, so that the transition
/// rules comparing these fields stay inside the API server's CEL cost budget.
fn bounded<T: JsonSchema>(generator: &mut SchemaGenerator) -> Schema {
    let mut value = generator.subschema_for::<T>().to_value();
    bound(&mut value);
    Schema::try_from(value).expect("a bounded schema is still a schema")
}

fn bound(value: &mut Value) {
    match value {
        Value::Object(map) => {
            let is = |t: &str| match map.get("type") {
                Some(Value::String(s)) => s == t,
                Some(Value::Array(types)) => types.iter().any(|x| x == t),
                _ => false,
            };
            let (string, array, object) = (is("string"), is("array"), is("object"));
            if string && !map.contains_key("maxLength") && !map.contains_key("enum") {
                map.insert("maxLength".into(), MAX_STRING.into());
            }
            if array && !map.contains_key("maxItems") {
                map.insert("maxItems".into(), MAX_ENTRIES.into());
            }
            if object
                && map.contains_key("additionalProperties")
                && !map.contains_key("maxProperties")
            {
                map.insert("maxProperties".into(), MAX_ENTRIES.into());
            }
            map.values_mut().for_each(bound);
        }
        Value::Array(items) => items.iter_mut().for_each(bound),
        _ => {}
    }
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
