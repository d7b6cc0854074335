//! What the operator sees of one rank: its pod's phase, readiness, exit code and conditions,
//! read from a worker Pod into the plain facts the planner decides on.

use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;

/// Label carrying the PetlJob name on every child.
pub const JOB_LABEL: &str = "petl.dev/job";
/// Label carrying the rank on worker pods.
pub const RANK_LABEL: &str = "petl.dev/rank";
/// Label the operator puts on a worker pod before it stops it, naming why (the failure-policy
/// action, `Suspended` or `Finished`). A labelled pod is never counted as a failure again, even
/// if the operator restarts while the pod is still terminating.
pub const STOPPED_LABEL: &str = "petl.dev/stopped";
/// Name of the trainer container, whose exit code the failure policy reads.
pub const TRAINER_CONTAINER: &str = "trainer";

/// Lifecycle of a worker pod as the planner needs it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PodState {
    /// Pending or Running; `ready` when the pod's Ready condition is True.
    Active {
        /// The Ready condition is True.
        ready: bool,
    },
    /// The trainer exited 0.
    Succeeded,
    /// The pod failed (trainer exit code non-zero, eviction, node loss).
    Failed,
}

/// One worker pod, reduced to what decides the job's next step.
#[derive(Clone, Debug, PartialEq)]
pub struct RankPod {
    /// The rank from the `petl.dev/rank` label.
    pub rank: i32,
    /// Pod name.
    pub name: String,
    /// Pod UID (deletes are preconditioned on it so a replacement is never deleted by mistake).
    pub uid: String,
    /// Phase and readiness.
    pub state: PodState,
    /// The pod has a deletionTimestamp.
    pub deleting: bool,
    /// The operator already stopped (and accounted for) this pod.
    pub stopped_by_operator: bool,
    /// The trainer container's exit code, when it terminated.
    pub exit_code: Option<i32>,
    /// Pod conditions whose status is True (e.g. DisruptionTarget).
    pub true_conditions: Vec<String>,
}

impl RankPod {
    /// Read a worker pod; `None` for pods without a valid rank label (not ours to judge).
    pub fn from_pod(pod: &Pod) -> Option<Self> {
        let rank = pod.labels().get(RANK_LABEL)?.parse::<i32>().ok()?;
        let status = pod.status.as_ref();
        let conditions = status.and_then(|s| s.conditions.as_ref());
        let true_conditions: Vec<String> = conditions
            .into_iter()
            .flatten()
            .filter(|c| c.status == "True")
            .map(|c| c.type_.clone())
            .collect();
        let ready = true_conditions.iter().any(|c| c == "Ready");
        let state = match status.and_then(|s| s.phase.as_deref()) {
            Some("Succeeded") => PodState::Succeeded,
            Some("Failed") => PodState::Failed,
            _ => PodState::Active { ready },
        };
        Some(Self {
            rank,
            name: pod.name_any(),
            uid: pod.uid().unwrap_or_default(),
            state,
            deleting: pod.metadata.deletion_timestamp.is_some(),
            stopped_by_operator: pod.labels().contains_key(STOPPED_LABEL),
            exit_code: trainer_exit_code(pod),
            true_conditions,
        })
    }

    /// Pending or Running and not being deleted.
    pub fn is_active(&self) -> bool {
        matches!(self.state, PodState::Active { .. }) && !self.deleting
    }

    /// The true conditions as `&str`, as the failure policy takes them.
    pub fn condition_names(&self) -> Vec<&str> {
        self.true_conditions.iter().map(String::as_str).collect()
    }
}

/// The trainer's exit code: its current state if terminated, else its last termination.
fn trainer_exit_code(pod: &Pod) -> Option<i32> {
    let statuses = pod.status.as_ref()?.container_statuses.as_ref()?;
    let trainer = statuses.iter().find(|s| s.name == TRAINER_CONTAINER)?;
    let current = trainer.state.as_ref().and_then(|s| s.terminated.as_ref());
    let last = trainer
        .last_state
        .as_ref()
        .and_then(|s| s.terminated.as_ref());
    current.or(last).map(|t| t.exit_code)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures;

    #[test]
    fn reads_rank_phase_exit_code_and_conditions() {
        let pod = fixtures::failed_pod("job", 2, 137, &["DisruptionTarget"]);
        let rank = RankPod::from_pod(&pod).unwrap();
        assert_eq!(rank.rank, 2);
        assert_eq!(rank.state, PodState::Failed);
        assert_eq!(rank.exit_code, Some(137));
        assert_eq!(rank.condition_names(), vec!["DisruptionTarget"]);
        assert!(!rank.stopped_by_operator);
    }

    #[test]
    fn ready_condition_makes_an_active_pod_ready() {
        let pod = fixtures::running_pod("job", 0, true);
        assert_eq!(
            RankPod::from_pod(&pod).unwrap().state,
            PodState::Active { ready: true }
        );
        let pod = fixtures::running_pod("job", 0, false);
        assert_eq!(
            RankPod::from_pod(&pod).unwrap().state,
            PodState::Active { ready: false }
        );
    }

    #[test]
    fn pods_without_a_rank_label_are_ignored() {
        let mut pod = fixtures::running_pod("job", 0, true);
        pod.metadata.labels.as_mut().unwrap().remove(RANK_LABEL);
        assert!(RankPod::from_pod(&pod).is_none());
    }
}
