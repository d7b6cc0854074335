//! The part of a PetlJob's status the operator owns under server-side apply: all of it. What the
//! workers report (progress, snapshot, artifact) reaches the status through the operator too.

use petl_crds::{ConditionType, PetlJobStatus};
use serde_json::{Value, json};

/// Conditions the operator sets: every type a PetlJob reports. A condition of another type
/// (written by hand or by another tool) is left to its writer.
pub const OWNED_CONDITIONS: [ConditionType; 7] = [
    ConditionType::Suspended,
    ConditionType::Running,
    ConditionType::Recovering,
    ConditionType::SnapshotDegraded,
    ConditionType::ArtifactPublished,
    ConditionType::Complete,
    ConditionType::Failed,
];

/// The operator's fields of `status` as the JSON it applies.
pub fn owned_fields(status: &PetlJobStatus) -> Value {
    let conditions: Vec<_> = status
        .conditions
        .iter()
        .filter(|c| OWNED_CONDITIONS.iter().any(|t| t.as_str() == c.type_))
        .collect();
    let mut fields = json!({
        "phase": status.phase,
        "conditions": conditions,
        "observedGeneration": status.observed_generation,
        "workers": status.workers,
        "progress": status.progress,
        "snapshot": status.snapshot,
        "artifact": status.artifact,
        "recoveries": status.recoveries,
        "lastRecovery": status.last_recovery,
        "restarts": status.restarts,
        "startTime": status.start_time,
        "completionTime": status.completion_time,
    });
    // Leave unset fields out rather than applying nulls.
    if let Value::Object(map) = &mut fields {
        map.retain(|_, v| !v.is_null());
    }
    fields
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use k8s_openapi::jiff::Timestamp;

    #[test]
    fn conditions_of_other_writers_and_unset_fields_are_left_out() {
        let mut s = PetlJobStatus::default();
        let now = Time(Timestamp::now());
        s.set_condition(
            ConditionType::Running,
            true,
            "AllWorkersReady",
            "",
            Some(1),
            now.clone(),
        );
        s.set_condition(
            ConditionType::SnapshotDegraded,
            true,
            "ShardsLost",
            "",
            Some(1),
            now.clone(),
        );
        s.conditions
            .push(k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition {
                type_: "AuditedByHand".into(),
                status: "True".into(),
                reason: "Checked".into(),
                message: String::new(),
                observed_generation: None,
                last_transition_time: now,
            });
        s.progress = Some(Default::default());
        let v = owned_fields(&s);
        let types: Vec<&str> = v["conditions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["type"].as_str().unwrap())
            .collect();
        assert_eq!(types, vec!["Running", "SnapshotDegraded"]);
        assert!(v.get("progress").is_some(), "rank 0's progress is written");
        assert!(v.get("artifact").is_none());
        assert!(v.get("startTime").is_none());
    }
}
