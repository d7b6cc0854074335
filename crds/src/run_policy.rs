//! Retry budget, deadlines, clean-up and the failure policy (`spec.runPolicy`).
//! The failure policy tells infrastructure disruptions and retryable exits from permanent errors.

use kube::KubeSchema;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::rules::rule;

/// Exit codes the trainer uses so the failure policy can tell permanent errors from transient ones
/// (BSD sysexits values).
pub mod exit_code {
    /// Bad command line or job configuration (EX_USAGE). Permanent.
    pub const USAGE: i32 = 64;
    /// Malformed input data, e.g. a label not in spec.dataset.labels (EX_DATAERR). Permanent.
    pub const DATA_ERROR: i32 = 65;
    /// The model or dataset does not exist at its URI (EX_NOINPUT). Permanent.
    pub const NO_INPUT: i32 = 66;
    /// An internal error of the trainer, a bug such as ranks whose parameters diverged
    /// (EX_SOFTWARE). Permanent: a retry runs into it again.
    pub const SOFTWARE: i32 = 70;
    /// A temporary failure, e.g. a peer or registry not reachable yet (EX_TEMPFAIL). Retryable.
    pub const TEMP_FAIL: i32 = 75;
    /// A configuration the trainer cannot run, e.g. an unsupported model architecture (EX_CONFIG). Permanent.
    pub const CONFIG: i32 = 78;
    /// The exit codes the default failure policy treats as permanent.
    pub const PERMANENT: [i32; 5] = [USAGE, DATA_ERROR, NO_INPUT, SOFTWARE, CONFIG];
}

/// The pod condition Kubernetes sets when it evicts or preempts a pod (node drain, preemption,
/// taint manager, node shutdown).
pub const DISRUPTION_TARGET: &str = "DisruptionTarget";

/// Retry budget, deadlines and clean-up.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RunPolicy {
    /// Worker failures counted by the failure policy (action Count) before the job fails with
    /// reason BackoffLimitExceeded. Mutable.
    #[serde(default = "default_backoff_limit")]
    #[schemars(range(min = 0, max = 1000))]
    pub backoff_limit: i32,
    /// Fail the job (reason DeadlineExceeded) after this many seconds running, counted from
    /// status.startTime excluding time spent suspended. Mutable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub active_deadline_seconds: Option<i64>,
    /// Delete the PetlJob (and its pods) this many seconds after it finished; kept forever when
    /// unset. Mutable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub ttl_seconds_after_finished: Option<i64>,
    /// How a worker failure is classified. Your rules are checked first, in order; then the
    /// default rules: Ignore on pod condition DisruptionTarget, FailJob on exit codes 64, 65, 66,
    /// 70 and 78; any other failure is Count.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure_policy: Option<FailurePolicy>,
}

impl Default for RunPolicy {
    fn default() -> Self {
        Self {
            backoff_limit: default_backoff_limit(),
            active_deadline_seconds: None,
            ttl_seconds_after_finished: None,
            failure_policy: None,
        }
    }
}

fn default_backoff_limit() -> i32 {
    3
}

/// Ordered rules; the first rule matching a failed worker decides the action.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct FailurePolicy {
    /// Rules checked in order before the default rules.
    #[serde(default)]
    #[schemars(length(max = 32))]
    pub rules: Vec<FailurePolicyRule>,
}

/// One rule: an action and exactly one matcher (exit codes or pod conditions).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = rule(
    "has(self.onExitCodes) != has(self.onPodConditions)",
    "each spec.runPolicy.failurePolicy.rules entry must set exactly one of onExitCodes or onPodConditions"
))]
pub struct FailurePolicyRule {
    /// What to do with a matching failure.
    pub action: FailureAction,
    /// Matches when the trainer container exited with one of these codes (1-255).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 255), inner(range(min = 1, max = 255)))]
    #[x_kube(merge_strategy = kube::core::ListMerge::Set)]
    pub on_exit_codes: Option<Vec<i32>>,
    /// Matches when the failed pod has one of these conditions with status True (e.g. DisruptionTarget).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 8), inner(length(min = 1, max = 316)))]
    #[x_kube(merge_strategy = kube::core::ListMerge::Set)]
    pub on_pod_conditions: Option<Vec<String>>,
}

/// What a failure does to the job.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailureAction {
    /// Replace the lost worker and recover; does not count against backoffLimit.
    Ignore,
    /// Replace the lost worker and recover; counts against backoffLimit.
    Count,
    /// Fail the whole job now (permanent error).
    FailJob,
}

impl FailurePolicy {
    /// The built-in rules that follow the user's rules.
    pub fn default_rules() -> Vec<FailurePolicyRule> {
        vec![
            FailurePolicyRule {
                action: FailureAction::Ignore,
                on_exit_codes: None,
                on_pod_conditions: Some(vec![DISRUPTION_TARGET.into()]),
            },
            FailurePolicyRule {
                action: FailureAction::FailJob,
                on_exit_codes: Some(exit_code::PERMANENT.to_vec()),
                on_pod_conditions: None,
            },
        ]
    }
}

impl RunPolicy {
    /// Classify one worker failure: the trainer's exit code (None when the pod vanished or the
    /// container never ran) and the pod's conditions that are True.
    pub fn classify(&self, exit_code: Option<i32>, true_pod_conditions: &[&str]) -> FailureAction {
        let user = self
            .failure_policy
            .iter()
            .flat_map(|p| p.rules.iter().cloned());
        user.chain(FailurePolicy::default_rules())
            .find(|rule| rule.matches(exit_code, true_pod_conditions))
            .map_or(FailureAction::Count, |rule| rule.action)
    }
}

impl FailurePolicyRule {
    /// Whether this rule applies to a failure.
    pub fn matches(&self, exit_code: Option<i32>, true_pod_conditions: &[&str]) -> bool {
        let by_code = match (&self.on_exit_codes, exit_code) {
            (Some(codes), Some(code)) => codes.contains(&code),
            _ => false,
        };
        let by_condition = self
            .on_pod_conditions
            .iter()
            .flatten()
            .any(|c| true_pod_conditions.contains(&c.as_str()));
        by_code || by_condition
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_policy_ignores_disruptions() {
        let p = RunPolicy::default();
        assert_eq!(
            p.classify(Some(137), &[DISRUPTION_TARGET]),
            FailureAction::Ignore
        );
        assert_eq!(
            p.classify(None, &["Ready", DISRUPTION_TARGET]),
            FailureAction::Ignore
        );
    }

    #[test]
    fn default_policy_fails_fast_on_permanent_exit_codes() {
        let p = RunPolicy::default();
        for code in exit_code::PERMANENT {
            assert_eq!(
                p.classify(Some(code), &[]),
                FailureAction::FailJob,
                "exit {code}"
            );
        }
    }

    #[test]
    fn default_policy_counts_everything_else() {
        let p = RunPolicy::default();
        assert_eq!(p.classify(Some(1), &[]), FailureAction::Count);
        assert_eq!(
            p.classify(Some(exit_code::TEMP_FAIL), &[]),
            FailureAction::Count
        );
        assert_eq!(p.classify(None, &[]), FailureAction::Count);
    }

    #[test]
    fn user_rules_take_precedence_over_defaults() {
        let p = RunPolicy {
            failure_policy: Some(FailurePolicy {
                rules: vec![
                    FailurePolicyRule {
                        action: FailureAction::Count,
                        on_exit_codes: None,
                        on_pod_conditions: Some(vec![DISRUPTION_TARGET.into()]),
                    },
                    FailurePolicyRule {
                        action: FailureAction::Ignore,
                        on_exit_codes: Some(vec![65]),
                        on_pod_conditions: None,
                    },
                ],
            }),
            ..RunPolicy::default()
        };
        assert_eq!(p.classify(None, &[DISRUPTION_TARGET]), FailureAction::Count);
        assert_eq!(p.classify(Some(65), &[]), FailureAction::Ignore);
        assert_eq!(p.classify(Some(78), &[]), FailureAction::FailJob);
    }
}
