//! The worker pods (`spec.workers`): how many ranks and where they may run.
//! Placement fields stay mutable while suspended so a queue can inject them (Kueue).

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{ResourceRequirements, Toleration};
use kube::KubeSchema;
use kube::core::Rule;
use schemars::{JsonSchema, Schema, SchemaGenerator};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::rules::{LABEL_KEY_RE, LABEL_VALUE_RE, rule_at};

/// The trainer pods, one per rank.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = no_resource_claims(),
    validation = node_selector_labels(),
    validation = tolerations_valid(),
)]
pub struct WorkersSpec {
    /// Number of ranks (pods). Immutable once the job has started.
    #[serde(default = "default_replicas")]
    #[schemars(range(min = 1, max = 256))]
    pub replicas: i32,
    /// Container image with the petl-trainer and petl-snapshot binaries; the operator's
    /// --trainer-image default when unset. Immutable once the job has started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 512))]
    #[x_kube(validation = crate::rules::image())]
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
    #[x_kube(validation = crate::rules::dns_subdomain("spec.workers.priorityClassName"))]
    pub priority_class_name: Option<String>,
}

// What a pod's validation would refuse in the node selector and tolerations is refused at
// admission instead, naming the field: a job the API server admits should not fail only when
// its first pod is created. Resource quantities are not checked here: rules over the
// `requests`/`limits` maps with `quantity()` cost 8–16 times the API server's per-rule CEL budget
// (and the CRD's total), so a pod refused for them (requests above limits, half a GPU) ends the
// job Failed with the API server's reason instead (docs/operator.md).

fn no_resource_claims() -> Rule {
    rule_at(
        "!has(self.resources) || !has(self.resources.claims)",
        "spec.workers.resources.claims is not supported: worker pods declare no resource claims",
        ".resources.claims",
    )
}

fn node_selector_labels() -> Rule {
    rule_at(
        &format!(
            "!has(self.nodeSelector) || self.nodeSelector.all(k, k.matches('{LABEL_KEY_RE}') && self.nodeSelector[k].matches('{LABEL_VALUE_RE}'))"
        ),
        "spec.workers.nodeSelector: keys must be label keys ([prefix/]name, the name at most 63 characters) and values label values (at most 63 letters, digits, '-', '_' or '.')",
        ".nodeSelector",
    )
}

fn tolerations_valid() -> Rule {
    rule_at(
        "!has(self.tolerations) || self.tolerations.all(t, (!has(t.operator) || t.operator in ['Exists', 'Equal']) && (!has(t.effect) || t.effect in ['', 'NoSchedule', 'PreferNoSchedule', 'NoExecute']) && (!has(t.operator) || t.operator != 'Exists' || !has(t.value) || t.value == '') && ((has(t.key) && t.key != '') || (has(t.operator) && t.operator == 'Exists')) && (!has(t.tolerationSeconds) || (has(t.effect) && t.effect == 'NoExecute')))",
        "spec.workers.tolerations: operator must be Exists or Equal and effect NoSchedule, PreferNoSchedule or NoExecute; Exists takes no value; an empty key needs operator Exists; tolerationSeconds needs effect NoExecute",
        ".tolerations",
    )
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

/// The extended resource a worker asks for to get an NVIDIA GPU.
pub const GPU_RESOURCE: &str = "nvidia.com/gpu";

impl WorkersSpec {
    /// Whether the trainer asks for at least one GPU (`nvidia.com/gpu` in its limits or requests),
    /// which puts it on the CUDA image with `--device cuda`.
    pub fn wants_gpu(&self) -> bool {
        let Some(resources) = &self.resources else {
            return false;
        };
        [&resources.limits, &resources.requests]
            .into_iter()
            .flatten()
            .filter_map(|amounts| amounts.get(GPU_RESOURCE))
            .any(|q| q.0.chars().any(|c| c.is_ascii_digit() && c != '0'))
    }

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

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::api::resource::Quantity;

    fn asking(section: &str, amount: &str) -> WorkersSpec {
        let amounts = BTreeMap::from([(GPU_RESOURCE.to_string(), Quantity(amount.into()))]);
        let resources = match section {
            "limits" => ResourceRequirements {
                limits: Some(amounts),
                ..Default::default()
            },
            _ => ResourceRequirements {
                requests: Some(amounts),
                ..Default::default()
            },
        };
        WorkersSpec {
            resources: Some(resources),
            ..WorkersSpec::default()
        }
    }

    #[test]
    fn a_gpu_in_limits_or_requests_makes_a_gpu_worker() {
        assert!(asking("limits", "1").wants_gpu());
        assert!(asking("requests", "2").wants_gpu());
        assert!(asking("limits", "10").wants_gpu());
        assert!(!asking("limits", "0").wants_gpu());
        assert!(!WorkersSpec::default().wants_gpu());
    }
}
