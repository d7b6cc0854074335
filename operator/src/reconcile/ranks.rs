//! What the operator sees of one rank: its pod's phase, readiness, exit code, in-place restarts,
//! what keeps it from starting, and what its trainer reported, read into plain facts.

use std::net::{IpAddr, SocketAddr};

use k8s_openapi::api::core::v1::{ContainerStatus, Pod};
use kube::ResourceExt;
use petl_crds::ArtifactStatus;
use petl_crds::report::{
    METRICS_PORT_NAME, TerminationMessage, WorkerReport, from_termination_message,
};

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
/// Name of the snapshot-agent native sidecar.
pub const AGENT_CONTAINER: &str = "snapshot-agent";
/// The containers whose restarts in place count against the job's failure budget.
pub const RESTARTING_CONTAINERS: [&str; 2] = [TRAINER_CONTAINER, AGENT_CONTAINER];

/// Annotation holding how many restarts in place of `container` the operator has counted; the
/// commit point of that count, as [`STOPPED_LABEL`] is for a stopped pod.
pub fn counted_restarts_annotation(container: &str) -> String {
    format!("petl.dev/counted-restarts-{container}")
}

/// Waiting reasons of a container that is on its normal way up.
const STARTING: [&str; 2] = ["ContainerCreating", "PodInitializing"];
/// Waiting reasons that no retry can cure: the image reference cannot even be parsed.
const PERMANENT: [&str; 1] = ["InvalidImageName"];

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

/// Restarts in place of one container: what the kubelet reports and what the operator counted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InPlaceRestarts {
    /// The container (trainer or snapshot agent).
    pub container: &'static str,
    /// `restartCount` in the container's status.
    pub seen: i32,
    /// Restarts already counted against the budget (the pod's annotation).
    pub counted: i32,
    /// Exit code of the container's last termination.
    pub last_exit_code: Option<i32>,
}

impl InPlaceRestarts {
    /// Restarts not counted yet.
    pub fn uncounted(&self) -> i32 {
        (self.seen - self.counted).max(0)
    }
}

/// Why an active pod does not run: what the scheduler or the kubelet reported.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Blocked {
    /// The scheduler's or kubelet's reason, e.g. `Unschedulable`, `ImagePullBackOff`,
    /// `CreateContainerConfigError`.
    pub reason: String,
    /// Its message, prefixed with the container it concerns.
    pub message: String,
    /// No retry can cure it (the job fails).
    pub permanent: bool,
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
    /// Restarts in place of the trainer and the snapshot agent.
    pub restarts: Vec<InPlaceRestarts>,
    /// What keeps the pod from running, if anything.
    pub blocked: Option<Blocked>,
    /// What the trainer published, from its termination message after exiting 0.
    pub artifact: Option<ArtifactStatus>,
    /// The trainer's final report, from the same termination message.
    pub final_report: Option<WorkerReport>,
    /// Where the trainer serves its report (pod IP and the `metrics` port), once it has an IP.
    pub report_addr: Option<SocketAddr>,
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
        let trainer = container_status(pod, TRAINER_CONTAINER);
        let (artifact, final_report) = match trainer.and_then(termination_message) {
            Some(m) => (Some(m.artifact), m.report),
            None => (None, None),
        };
        Some(Self {
            rank,
            name: pod.name_any(),
            uid: pod.uid().unwrap_or_default(),
            state,
            deleting: pod.metadata.deletion_timestamp.is_some(),
            stopped_by_operator: pod.labels().contains_key(STOPPED_LABEL),
            exit_code: trainer.and_then(exit_code),
            true_conditions,
            restarts: RESTARTING_CONTAINERS
                .iter()
                .map(|&c| restarts(pod, c))
                .collect(),
            blocked: (state == PodState::Active { ready: false })
                .then(|| blocked(pod))
                .flatten(),
            artifact,
            final_report,
            report_addr: report_addr(pod),
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

/// The status of container `name`, whether it is a regular or an init (sidecar) container.
fn container_status<'a>(pod: &'a Pod, name: &str) -> Option<&'a ContainerStatus> {
    let status = pod.status.as_ref()?;
    let regular = status.container_statuses.iter().flatten();
    let init = status.init_container_statuses.iter().flatten();
    regular.chain(init).find(|s| s.name == name)
}

/// A container's exit code: its current state if terminated, else its last termination.
fn exit_code(status: &ContainerStatus) -> Option<i32> {
    let current = status.state.as_ref().and_then(|s| s.terminated.as_ref());
    let last = status
        .last_state
        .as_ref()
        .and_then(|s| s.terminated.as_ref());
    current.or(last).map(|t| t.exit_code)
}

fn restarts(pod: &Pod, container: &'static str) -> InPlaceRestarts {
    let status = container_status(pod, container);
    let counted = pod
        .annotations()
        .get(&counted_restarts_annotation(container))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    InPlaceRestarts {
        container,
        seen: status.map_or(0, |s| s.restart_count),
        counted,
        last_exit_code: status
            .and_then(|s| s.last_state.as_ref())
            .and_then(|s| s.terminated.as_ref())
            .map(|t| t.exit_code),
    }
}

/// The scheduler's refusal or a container's waiting reason, when not the normal way up.
fn blocked(pod: &Pod) -> Option<Blocked> {
    let status = pod.status.as_ref()?;
    let unschedulable = status.conditions.iter().flatten().find(|c| {
        c.type_ == "PodScheduled"
            && c.status == "False"
            && c.reason.as_deref() == Some("Unschedulable")
    });
    if let Some(c) = unschedulable {
        return Some(Blocked {
            reason: "Unschedulable".into(),
            message: c.message.clone().unwrap_or_default(),
            permanent: false,
        });
    }
    RESTARTING_CONTAINERS.iter().find_map(|name| {
        let waiting = container_status(pod, name)?
            .state
            .as_ref()?
            .waiting
            .as_ref()?;
        let reason = waiting.reason.as_deref()?;
        if STARTING.contains(&reason) {
            return None;
        }
        Some(Blocked {
            reason: reason.into(),
            message: format!(
                "container {name}: {}",
                waiting.message.as_deref().unwrap_or(reason)
            ),
            permanent: PERMANENT.contains(&reason),
        })
    })
}

/// The trainer's termination message (artifact and final report), once it exited 0.
fn termination_message(status: &ContainerStatus) -> Option<TerminationMessage> {
    let terminated = status.state.as_ref()?.terminated.as_ref()?;
    if terminated.exit_code != 0 {
        return None;
    }
    from_termination_message(terminated.message.as_deref()?)
}

/// The pod IP and the trainer's `metrics` port.
fn report_addr(pod: &Pod) -> Option<SocketAddr> {
    let ip: IpAddr = pod.status.as_ref()?.pod_ip.as_deref()?.parse().ok()?;
    let trainer = pod
        .spec
        .as_ref()?
        .containers
        .iter()
        .find(|c| c.name == TRAINER_CONTAINER)?;
    let port = trainer
        .ports
        .iter()
        .flatten()
        .find(|p| p.name.as_deref() == Some(METRICS_PORT_NAME))?;
    Some(SocketAddr::new(
        ip,
        u16::try_from(port.container_port).ok()?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures;
    use k8s_openapi::api::core::v1::{ContainerState, ContainerStateWaiting, PodCondition};

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

    #[test]
    fn restarts_in_place_are_read_with_what_was_counted() {
        let mut pod = fixtures::restarted_pod("job", 1, 3, 75);
        pod.metadata.annotations =
            Some([(counted_restarts_annotation(TRAINER_CONTAINER), "2".into())].into());
        let rank = RankPod::from_pod(&pod).unwrap();
        let trainer = &rank.restarts[0];
        assert_eq!(
            (
                trainer.container,
                trainer.seen,
                trainer.counted,
                trainer.last_exit_code
            ),
            (TRAINER_CONTAINER, 3, 2, Some(75))
        );
        assert_eq!(trainer.uncounted(), 1);
        assert_eq!(rank.restarts[1].container, AGENT_CONTAINER);
        assert_eq!(rank.restarts[1].uncounted(), 0);
    }

    #[test]
    fn the_report_address_is_the_pod_ip_and_the_trainers_metrics_port() {
        let mut pod = fixtures::running_pod("job", 0, true);
        assert_eq!(
            RankPod::from_pod(&pod).unwrap().report_addr,
            None,
            "no IP yet"
        );
        pod.status.as_mut().unwrap().pod_ip = Some("10.1.2.3".into());
        let addr = RankPod::from_pod(&pod).unwrap().report_addr.unwrap();
        assert_eq!(addr.to_string(), "10.1.2.3:9100");
    }

    #[test]
    fn the_artifact_and_final_report_are_read_from_the_termination_message_of_a_clean_exit() {
        let message = r#"{"artifact":{"uri":"file:///out/a","digest":"sha256:ab","sizeBytes":7},
            "report":{"progress":{"step":50,"totalSteps":50},"recoveries":1}}"#;
        let pod = fixtures::succeeded_pod("job", 0, Some(message));
        let read = RankPod::from_pod(&pod).unwrap();
        let artifact = read.artifact.unwrap();
        assert_eq!(
            (artifact.digest.as_str(), artifact.size_bytes),
            ("sha256:ab", 7)
        );
        let report = read.final_report.unwrap();
        assert_eq!((report.progress.step, report.recoveries), (50, 1));
        let artifact_only =
            r#"{"artifact":{"uri":"file:///out/a","digest":"sha256:ab","sizeBytes":7}}"#;
        let pod = fixtures::succeeded_pod("job", 0, Some(artifact_only));
        let read = RankPod::from_pod(&pod).unwrap();
        assert!(read.artifact.is_some() && read.final_report.is_none());
        let garbled = fixtures::succeeded_pod("job", 0, Some("panicked at ..."));
        assert_eq!(RankPod::from_pod(&garbled).unwrap().artifact, None);
    }

    #[test]
    fn waiting_containers_and_unschedulable_pods_say_what_blocks_them() {
        let mut pod = fixtures::running_pod("job", 0, false);
        let status = pod.status.as_mut().unwrap();
        status.container_statuses = Some(vec![ContainerStatus {
            name: TRAINER_CONTAINER.into(),
            state: Some(ContainerState {
                waiting: Some(ContainerStateWaiting {
                    reason: Some("CreateContainerConfigError".into()),
                    message: Some("secret \"s3\" not found".into()),
                }),
                ..Default::default()
            }),
            ..Default::default()
        }]);
        let blocked = RankPod::from_pod(&pod).unwrap().blocked.unwrap();
        assert_eq!(blocked.reason, "CreateContainerConfigError");
        assert_eq!(
            blocked.message,
            "container trainer: secret \"s3\" not found"
        );
        assert!(!blocked.permanent);

        let status = pod.status.as_mut().unwrap();
        status.container_statuses.as_mut().unwrap()[0]
            .state
            .as_mut()
            .unwrap()
            .waiting
            .as_mut()
            .unwrap()
            .reason = Some("InvalidImageName".into());
        assert!(RankPod::from_pod(&pod).unwrap().blocked.unwrap().permanent);

        let mut pending = fixtures::running_pod("job", 0, false);
        pending.status.as_mut().unwrap().conditions = Some(vec![PodCondition {
            type_: "PodScheduled".into(),
            status: "False".into(),
            reason: Some("Unschedulable".into()),
            message: Some("persistentvolumeclaim \"data\" not found".into()),
            ..Default::default()
        }]);
        let blocked = RankPod::from_pod(&pending).unwrap().blocked.unwrap();
        assert_eq!(blocked.reason, "Unschedulable");
        assert!(blocked.message.contains("persistentvolumeclaim"));

        let creating = fixtures::running_pod("job", 0, false);
        assert_eq!(RankPod::from_pod(&creating).unwrap().blocked, None);
    }
}
