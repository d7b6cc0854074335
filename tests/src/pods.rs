//! Waiting on pods that a real kubelet runs, and reading their logs; failures say what the pod
//! was doing (phase, container states and reasons) instead of only timing out.

use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use kube::api::LogParams;
use kube::{Api, Client};

use crate::error::{Error, Result};

const POLL: Duration = Duration::from_millis(250);
/// Container waiting reasons that no amount of waiting fixes.
const HOPELESS: &[&str] = &[
    "ErrImageNeverPull",
    "ErrImagePull",
    "ImagePullBackOff",
    "InvalidImageName",
    "CreateContainerConfigError",
    "CreateContainerError",
    "RunContainerError",
];

/// Waits until the pod's Ready condition is True. Fails early when the pod ended, or a
/// container cannot start (its image is missing, its config is invalid).
pub async fn wait_pod_ready(
    client: &Client,
    namespace: &str,
    name: &str,
    timeout: Duration,
) -> Result<Pod> {
    wait_for(client, namespace, name, timeout, "Ready", |pod| {
        if is_ready(pod) {
            return Ok(true);
        }
        if let Some(phase @ ("Succeeded" | "Failed")) = phase(pod) {
            return Err(format!("ended ({phase}) before it was ready"));
        }
        hopeless(pod).map_or(Ok(false), Err)
    })
    .await
}

/// Waits until the pod ended (phase Succeeded or Failed) and returns it; the caller checks
/// which. Fails early when a container cannot start.
pub async fn wait_pod_finished(
    client: &Client,
    namespace: &str,
    name: &str,
    timeout: Duration,
) -> Result<Pod> {
    wait_for(client, namespace, name, timeout, "finished", |pod| {
        if matches!(phase(pod), Some("Succeeded" | "Failed")) {
            return Ok(true);
        }
        hopeless(pod).map_or(Ok(false), Err)
    })
    .await
}

/// The logs of `container` (or the pod's only container), through the API server and the
/// kubelet, as `kubectl logs` reads them.
pub async fn pod_logs(
    client: &Client,
    namespace: &str,
    name: &str,
    container: Option<&str>,
) -> Result<String> {
    let params = LogParams {
        container: container.map(str::to_string),
        ..LogParams::default()
    };
    Ok(Api::<Pod>::namespaced(client.clone(), namespace)
        .logs(name, &params)
        .await?)
}

/// One line on what a pod is doing: phase, then each container's state and reason.
pub fn describe(pod: &Pod) -> String {
    let mut text = format!("phase {}", phase(pod).unwrap_or("unknown"));
    let statuses = pod.status.as_ref().into_iter().flat_map(|s| {
        s.init_container_statuses
            .iter()
            .flatten()
            .chain(s.container_statuses.iter().flatten())
    });
    for status in statuses {
        let state = status.state.as_ref();
        let detail = if let Some(w) = state.and_then(|s| s.waiting.as_ref()) {
            format!(
                "waiting ({}: {})",
                w.reason.as_deref().unwrap_or("-"),
                w.message.as_deref().unwrap_or("")
            )
        } else if let Some(t) = state.and_then(|s| s.terminated.as_ref()) {
            format!(
                "terminated (exit {}, {}: {})",
                t.exit_code,
                t.reason.as_deref().unwrap_or("-"),
                t.message.as_deref().unwrap_or("")
            )
        } else if state.and_then(|s| s.running.as_ref()).is_some() {
            format!("running (ready {})", status.ready)
        } else {
            "no state yet".to_string()
        };
        text.push_str(&format!("; {} {detail}", status.name));
    }
    if let Some(message) = pod.status.as_ref().and_then(|s| s.message.as_deref()) {
        text.push_str(&format!("; {message}"));
    }
    text
}

fn phase(pod: &Pod) -> Option<&str> {
    pod.status.as_ref().and_then(|s| s.phase.as_deref())
}

fn is_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// A reason the pod will never get further, if a container is stuck on one.
fn hopeless(pod: &Pod) -> Option<String> {
    let statuses = pod.status.as_ref()?;
    statuses
        .init_container_statuses
        .iter()
        .flatten()
        .chain(statuses.container_statuses.iter().flatten())
        .find_map(|c| {
            let waiting = c.state.as_ref()?.waiting.as_ref()?;
            let reason = waiting.reason.as_deref()?;
            HOPELESS.contains(&reason).then(|| {
                format!(
                    "container {} cannot start: {reason}: {}",
                    c.name,
                    waiting.message.as_deref().unwrap_or("")
                )
            })
        })
}

/// Polls the pod until `check` says done (`Ok(true)`) or hopeless (`Err(why)`).
async fn wait_for(
    client: &Client,
    namespace: &str,
    name: &str,
    timeout: Duration,
    what: &str,
    check: impl Fn(&Pod) -> std::result::Result<bool, String>,
) -> Result<Pod> {
    let pods = Api::<Pod>::namespaced(client.clone(), namespace);
    let deadline = Instant::now() + timeout;
    let mut last = None;
    loop {
        if let Some(pod) = pods.get_opt(name).await? {
            match check(&pod) {
                Ok(true) => return Ok(pod),
                Ok(false) => {}
                Err(why) => {
                    return Err(Error::Pod {
                        namespace: namespace.into(),
                        pod: name.into(),
                        message: format!("{why} ({})", describe(&pod)),
                    });
                }
            }
            last = Some(pod);
        }
        if Instant::now() > deadline {
            return Err(Error::Pod {
                namespace: namespace.into(),
                pod: name.into(),
                message: format!(
                    "not {what} within {}s ({})",
                    timeout.as_secs(),
                    last.as_ref().map_or("never created".into(), describe)
                ),
            });
        }
        tokio::time::sleep(POLL).await;
    }
}
