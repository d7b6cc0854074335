//! Pod outcomes written through the status subresource, in place of a kubelet:
//! phase, per-container states with exit codes, and pod conditions.

use k8s_openapi::api::core::v1::{
    ContainerState, ContainerStateRunning, ContainerStateTerminated, ContainerStateWaiting,
    ContainerStatus, Pod, PodCondition, PodStatus,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams};
use kube::{Api, Client};

use crate::error::{Error, Result};

/// The status a test wants a pod to report, built up fluently:
///
/// ```no_run
/// # use petl_tests::PodStatusUpdate;
/// let preempted = PodStatusUpdate::failed()
///     .container_terminated("trainer", 137, "OOMKilled")
///     .disruption_target("PreemptionByScheduler");
/// ```
///
/// Container images are filled in from the pod's spec, so only names are given.
#[derive(Debug, Clone, Default)]
pub struct PodStatusUpdate {
    phase: String,
    reason: Option<String>,
    message: Option<String>,
    pod_ip: Option<String>,
    containers: Vec<ContainerOutcome>,
    init_containers: Vec<ContainerOutcome>,
    conditions: Vec<PodCondition>,
}

#[derive(Debug, Clone)]
struct ContainerOutcome {
    name: String,
    state: ContainerState,
    last_state: Option<ContainerState>,
    ready: bool,
    restart_count: i32,
}

impl PodStatusUpdate {
    /// A status with the given phase (`Pending`, `Running`, `Succeeded`, `Failed`).
    pub fn phase(phase: &str) -> Self {
        Self {
            phase: phase.to_string(),
            ..Self::default()
        }
    }

    pub fn pending() -> Self {
        Self::phase("Pending")
    }

    pub fn running() -> Self {
        Self::phase("Running")
    }

    pub fn succeeded() -> Self {
        Self::phase("Succeeded")
    }

    pub fn failed() -> Self {
        Self::phase("Failed")
    }

    /// Pod-level reason, e.g. `Evicted`.
    pub fn reason(mut self, reason: &str) -> Self {
        self.reason = Some(reason.to_string());
        self
    }

    pub fn message(mut self, message: &str) -> Self {
        self.message = Some(message.to_string());
        self
    }

    pub fn pod_ip(mut self, ip: &str) -> Self {
        self.pod_ip = Some(ip.to_string());
        self
    }

    /// Container `name` is running and ready.
    pub fn container_running(mut self, name: &str) -> Self {
        self.containers.push(running(name));
        self
    }

    /// Container `name` is waiting (e.g. `ContainerCreating`, `CrashLoopBackOff`).
    pub fn container_waiting(mut self, name: &str, reason: &str) -> Self {
        self.containers.push(waiting(name, reason));
        self
    }

    /// Container `name` is waiting for `reason`, which the kubelet explains with `message`
    /// (e.g. `CreateContainerConfigError`: `secret "s3" not found`).
    pub fn container_waiting_because(mut self, name: &str, reason: &str, message: &str) -> Self {
        let mut outcome = waiting(name, reason);
        if let Some(w) = outcome.state.waiting.as_mut() {
            w.message = Some(message.to_string());
        }
        self.containers.push(outcome);
        self
    }

    /// Container `name` exited with `exit_code` (`reason` e.g. `Completed`, `Error`, `OOMKilled`).
    pub fn container_terminated(mut self, name: &str, exit_code: i32, reason: &str) -> Self {
        self.containers.push(terminated(name, exit_code, reason));
        self
    }

    /// Init container `name` is running: how a native sidecar (restartPolicy
    /// Always init container) reports while the pod runs.
    pub fn init_container_running(mut self, name: &str) -> Self {
        self.init_containers.push(running(name));
        self
    }

    pub fn init_container_terminated(mut self, name: &str, exit_code: i32, reason: &str) -> Self {
        self.init_containers
            .push(terminated(name, exit_code, reason));
        self
    }

    /// Container `name` exited with `exit_code` and wrote `message` to its termination-message
    /// file (what the kubelet puts in `state.terminated.message`).
    pub fn container_terminated_with_message(
        mut self,
        name: &str,
        exit_code: i32,
        reason: &str,
        message: &str,
    ) -> Self {
        let mut outcome = terminated(name, exit_code, reason);
        if let Some(t) = outcome.state.terminated.as_mut() {
            t.message = Some(message.to_string());
        }
        self.containers.push(outcome);
        self
    }

    /// Container (or init container) `name` restarted in place `count` times, the last time
    /// after exiting with `exit_code` (its `restartCount` and `lastState.terminated`).
    pub fn restarted(mut self, name: &str, count: i32, exit_code: i32) -> Self {
        let last = terminated(name, exit_code, "Error").state;
        for outcome in self
            .containers
            .iter_mut()
            .chain(self.init_containers.iter_mut())
            .filter(|c| c.name == name)
        {
            outcome.restart_count = count;
            outcome.last_state = Some(last.clone());
        }
        self
    }

    /// Sets the restart count of the container (or init container) added last
    /// under `name`.
    pub fn restart_count(mut self, name: &str, count: i32) -> Self {
        for outcome in self
            .containers
            .iter_mut()
            .chain(self.init_containers.iter_mut())
            .filter(|c| c.name == name)
        {
            outcome.restart_count = count;
        }
        self
    }

    /// Adds a pod condition (`Ready`, `PodScheduled`, `DisruptionTarget`, ...).
    pub fn condition(mut self, type_: &str, status: bool, reason: &str) -> Self {
        self.conditions.retain(|c| c.type_ != type_);
        self.conditions.push(PodCondition {
            type_: type_.to_string(),
            status: if status { "True" } else { "False" }.to_string(),
            reason: Some(reason.to_string()).filter(|r| !r.is_empty()),
            last_transition_time: Some(Time(Timestamp::now())),
            ..PodCondition::default()
        });
        self
    }

    /// `PodScheduled` False with reason `Unschedulable`, as the scheduler reports a pod it
    /// cannot place, explained by `message`.
    pub fn unschedulable(mut self, message: &str) -> Self {
        self = self.condition("PodScheduled", false, "Unschedulable");
        if let Some(c) = self.conditions.last_mut() {
            c.message = Some(message.to_string());
        }
        self
    }

    /// `Ready` and `ContainersReady` true, as the kubelet reports a serving pod.
    pub fn ready(self) -> Self {
        self.condition("ContainersReady", true, "")
            .condition("Ready", true, "")
    }

    /// The `DisruptionTarget` condition the control plane sets before evicting or
    /// preempting a pod (`reason` e.g. `PreemptionByScheduler`, `EvictionByEvictionAPI`,
    /// `DeletionByTaintManager`, `TerminationByKubelet`).
    pub fn disruption_target(self, reason: &str) -> Self {
        self.condition("DisruptionTarget", true, reason)
    }

    /// The status object, with images taken from `pod`'s spec.
    pub fn to_status(&self, pod: &Pod) -> Result<PodStatus> {
        let spec = pod.spec.as_ref();
        let containers = spec.map(|s| s.containers.as_slice()).unwrap_or_default();
        let init_containers = spec
            .and_then(|s| s.init_containers.as_deref())
            .unwrap_or_default();
        let pod_name = pod.metadata.name.as_deref().unwrap_or_default();
        let statuses = |outcomes: &[ContainerOutcome],
                        declared: &[k8s_openapi::api::core::v1::Container],
                        kind: &str|
         -> Result<Vec<ContainerStatus>> {
            outcomes
                .iter()
                .map(|outcome| {
                    let container = declared
                        .iter()
                        .find(|c| c.name == outcome.name)
                        .ok_or_else(|| Error::PodStatus {
                            pod: pod_name.to_string(),
                            message: format!(
                                "it has no {kind} named {:?}; its {kind}s are {:?}",
                                outcome.name,
                                declared.iter().map(|c| c.name.as_str()).collect::<Vec<_>>()
                            ),
                        })?;
                    Ok(outcome.status(container.image.clone().unwrap_or_default()))
                })
                .collect()
        };
        Ok(PodStatus {
            phase: Some(self.phase.clone()),
            reason: self.reason.clone(),
            message: self.message.clone(),
            pod_ip: self.pod_ip.clone(),
            start_time: pod
                .status
                .as_ref()
                .and_then(|s| s.start_time.clone())
                .or_else(|| Some(Time(Timestamp::now()))),
            container_statuses: Some(statuses(&self.containers, containers, "container")?),
            init_container_statuses: Some(statuses(
                &self.init_containers,
                init_containers,
                "init container",
            )?)
            .filter(|s| !s.is_empty()),
            conditions: Some(self.conditions.clone()).filter(|c| !c.is_empty()),
            ..PodStatus::default()
        })
    }
}

impl ContainerOutcome {
    fn status(&self, image: String) -> ContainerStatus {
        ContainerStatus {
            name: self.name.clone(),
            image,
            image_id: String::new(),
            ready: self.ready,
            restart_count: self.restart_count,
            started: Some(self.state.running.is_some()),
            state: Some(self.state.clone()),
            last_state: self.last_state.clone(),
            ..ContainerStatus::default()
        }
    }
}

fn running(name: &str) -> ContainerOutcome {
    ContainerOutcome {
        name: name.to_string(),
        state: ContainerState {
            running: Some(ContainerStateRunning {
                started_at: Some(Time(Timestamp::now())),
            }),
            ..ContainerState::default()
        },
        last_state: None,
        ready: true,
        restart_count: 0,
    }
}

fn waiting(name: &str, reason: &str) -> ContainerOutcome {
    ContainerOutcome {
        name: name.to_string(),
        state: ContainerState {
            waiting: Some(ContainerStateWaiting {
                reason: Some(reason.to_string()),
                message: None,
            }),
            ..ContainerState::default()
        },
        last_state: None,
        ready: false,
        restart_count: 0,
    }
}

fn terminated(name: &str, exit_code: i32, reason: &str) -> ContainerOutcome {
    let now = Time(Timestamp::now());
    ContainerOutcome {
        name: name.to_string(),
        state: ContainerState {
            terminated: Some(ContainerStateTerminated {
                exit_code,
                reason: Some(reason.to_string()),
                started_at: Some(now.clone()),
                finished_at: Some(now),
                ..ContainerStateTerminated::default()
            }),
            ..ContainerState::default()
        },
        last_state: None,
        ready: false,
        restart_count: 0,
    }
}

/// Replaces the status of pod `namespace/name` with `update` (merge patch on
/// the status subresource; lists such as containerStatuses are replaced whole).
pub async fn set_pod_status(
    client: &Client,
    namespace: &str,
    name: &str,
    update: &PodStatusUpdate,
) -> Result<Pod> {
    let pods = Api::<Pod>::namespaced(client.clone(), namespace);
    let pod = pods.get(name).await?;
    let status = update.to_status(&pod)?;
    let patch = serde_json::json!({ "status": status });
    Ok(pods
        .patch_status(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await?)
}
