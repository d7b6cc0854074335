//! The worker pod of one rank: the trainer and its snapshot agent (a native sidecar), their
//! command lines and environment (the contracts of docs/trainer.md and docs/fault-tolerance.md),
//! volumes, placement and a locked-down security context.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMapVolumeSource, Container, ContainerPort, ContainerRestartRule,
    ContainerRestartRuleOnExitCodes, EmptyDirVolumeSource, EnvFromSource, EnvVar, EnvVarSource,
    PersistentVolumeClaimVolumeSource, Pod, PodSecurityContext, PodSpec, ResourceFieldSelector,
    ResourceRequirements, SeccompProfile, SecretEnvSource, SecretVolumeSource, SecurityContext,
    Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use petl_crds::report::METRICS_PORT_NAME;
use petl_crds::workers::GPU_RESOURCE;
use petl_crds::{FailureAction, PetlJob, RunPolicy, StorageUri};

use super::children::{
    CONFIG_PATH, Names, SNAPSHOT_PORT, TOKEN_DIR, TOKEN_KEY, TRAINER_PORT, child_meta, job_labels,
};
use super::ranks::{AGENT_CONTAINER, RANK_LABEL, TRAINER_CONTAINER};
use crate::{Error, Result};

/// The program both containers run: the `petl` binary of the worker image, whose hidden
/// subcommands `train` (one rank) and `snapshot-agent` (its agent) the pods use.
pub const PROGRAM: &str = "petl";
/// The trainer's subcommand (docs/trainer.md).
pub const TRAIN: &str = "train";
/// The snapshot agent's subcommand (docs/fault-tolerance.md, "Running the agent").
pub const SNAPSHOT_AGENT: &str = "snapshot-agent";
/// Default port of the trainer's `/metrics` and `/report`, the container port named `metrics`.
pub const TRAINER_METRICS_PORT: u16 = 9100;
/// Port of the snapshot agent's `/metrics`.
pub const AGENT_METRICS_PORT: i32 = 9101;
/// Name of the agent's metrics port (a PodMonitor scrapes `metrics` and this one).
pub const AGENT_METRICS_PORT_NAME: &str = "agent-metrics";
/// Directory shared by the trainer and its agent (an emptyDir: the root is read-only).
pub const RUN_DIR: &str = "/run/petl";
/// The agent's unix socket, where the trainer hands over and fetches its snapshots.
pub const SNAPSHOT_SOCKET: &str = "/run/petl/snapshot.sock";
/// Where the trainer writes the published artifact on success (its termination message).
pub const TERMINATION_MESSAGE_PATH: &str = "/dev/termination-log";
/// Where `pvc://<claim>/<path>` claims are mounted (`PETL_PVC_ROOT`).
pub const PVC_ROOT: &str = "/mnt/pvc";
/// Writable scratch space: the trainer's HOME (and so its cache).
pub const SCRATCH_DIR: &str = "/scratch";
/// Writable temporary files.
pub const TMP_DIR: &str = "/tmp";
/// UID/GID the workers run as (the distroless "nonroot" user).
const NON_ROOT_ID: i64 = 65532;

/// What the operator's flags decide for every worker pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkerDefaults {
    /// Image for jobs that do not set `spec.workers.image` (`--trainer-image`).
    pub image: Option<String>,
    /// Image of the trainer of GPU jobs that do not set `spec.workers.image`
    /// (`--trainer-cuda-image`).
    pub cuda_image: Option<String>,
    /// Port of the trainer's `/metrics` and `/report` (`--worker-metrics-port`).
    pub metrics_port: u16,
}

impl Default for WorkerDefaults {
    fn default() -> Self {
        Self {
            image: None,
            cuda_image: None,
            metrics_port: TRAINER_METRICS_PORT,
        }
    }
}

impl WorkerDefaults {
    /// The defaults the operator was started with.
    pub fn of(config: &crate::Config) -> Self {
        Self {
            image: config.trainer_image.clone(),
            cuda_image: config.trainer_cuda_image.clone(),
            metrics_port: config.worker_metrics_port,
        }
    }
}

/// The images of one job's two containers: the trainer's (CUDA for GPU jobs) and the agent's
/// (the CPU image: it needs no GPU, and the CUDA image need not carry it).
fn images<'a>(job: &'a PetlJob, defaults: &'a WorkerDefaults) -> Result<(&'a str, &'a str)> {
    let workers = &job.spec.workers;
    let cpu = workers.image.as_deref().or(defaults.image.as_deref());
    let cpu = cpu.ok_or_else(|| Error::IllegalJob {
        field: "spec.workers.image",
        message:
            "no worker image: set spec.workers.image or start the operator with --trainer-image"
                .into(),
    })?;
    if !workers.wants_gpu() || workers.image.is_some() {
        return Ok((cpu, cpu));
    }
    let cuda = defaults.cuda_image.as_deref().ok_or_else(|| Error::IllegalJob {
        field: "spec.workers.resources",
        message: format!(
            "asks for {GPU_RESOURCE} but the operator has no CUDA image: set spec.workers.image or start the operator with --trainer-cuda-image"
        ),
    })?;
    Ok((cuda, cpu))
}

/// The pod of one rank: the trainer, the snapshot agent as a native sidecar, the job's
/// placement and resources, and a locked-down security context.
pub fn pod(job: &PetlJob, names: &Names, rank: i32, defaults: &WorkerDefaults) -> Result<Pod> {
    let workers = &job.spec.workers;
    names.check_length()?;
    let (trainer_image, agent_image) = images(job, defaults)?;
    let mut labels = job_labels(names);
    labels.insert(RANK_LABEL.into(), rank.to_string());
    let mut metadata = child_meta(job, names, names.pod(rank));
    metadata.labels = Some(labels);

    let (pvc_volumes, pvc_mounts) = pvc_volumes(job);
    let mut mounts = vec![
        mount("config", "/etc/petl", true),
        mount("snapshot-token", TOKEN_DIR, true),
        mount("run", RUN_DIR, false),
        mount("scratch", SCRATCH_DIR, false),
        mount("tmp", TMP_DIR, false),
    ];
    mounts.extend(pvc_mounts);

    let trainer = Container {
        name: TRAINER_CONTAINER.into(),
        image: Some(trainer_image.into()),
        command: Some(trainer_command(job, defaults)),
        env: Some(trainer_env(names, rank, workers.replicas)),
        env_from: Some(secret_env(job)),
        ports: Some(vec![
            container_port("trainer", TRAINER_PORT),
            container_port(METRICS_PORT_NAME, i32::from(defaults.metrics_port)),
        ]),
        resources: workers.resources.clone(),
        volume_mounts: Some(mounts.clone()),
        security_context: Some(container_security()),
        // On success the trainer writes the published artifact here, as JSON (petl_crds::report).
        termination_message_path: Some(TERMINATION_MESSAGE_PATH.into()),
        termination_message_policy: Some("File".into()),
        // Retryable exits restart the trainer in place, where it restores from its own agent;
        // permanent ones (and success) end the pod. See docs/operator.md.
        restart_policy: Some("Never".into()),
        restart_policy_rules: restart_in_place(&job.spec.run_policy),
        ..Container::default()
    };
    let agent = Container {
        name: AGENT_CONTAINER.into(),
        image: Some(agent_image.into()),
        command: Some(agent_command(job, names, rank)),
        // Native sidecar: starts before the trainer, keeps running beside it, stops after it.
        restart_policy: Some("Always".into()),
        ports: Some(vec![
            container_port("snapshot", SNAPSHOT_PORT),
            container_port(AGENT_METRICS_PORT_NAME, AGENT_METRICS_PORT),
        ]),
        resources: Some(agent_resources()),
        volume_mounts: Some(mounts),
        security_context: Some(container_security()),
        ..Container::default()
    };

    let mut volumes = vec![
        Volume {
            name: "config".into(),
            config_map: Some(ConfigMapVolumeSource {
                name: names.config_map(),
                ..Default::default()
            }),
            ..Volume::default()
        },
        Volume {
            name: "snapshot-token".into(),
            secret: Some(SecretVolumeSource {
                secret_name: Some(names.secret()),
                default_mode: Some(0o440),
                ..Default::default()
            }),
            ..Volume::default()
        },
        empty_dir("run"),
        empty_dir("scratch"),
        empty_dir("tmp"),
    ];
    volumes.extend(pvc_volumes);

    Ok(Pod {
        metadata,
        spec: Some(PodSpec {
            hostname: Some(names.pod(rank)),
            subdomain: Some(names.service()),
            // Whatever the trainer's own rules do not restart in place fails the pod, which
            // the operator sees, classifies and replaces (see docs/operator.md).
            restart_policy: Some("Never".into()),
            init_containers: Some(vec![agent]),
            containers: vec![trainer],
            volumes: Some(volumes),
            node_selector: workers.node_selector.clone(),
            tolerations: workers.tolerations.clone(),
            priority_class_name: workers.priority_class_name.clone(),
            automount_service_account_token: Some(false),
            enable_service_links: Some(false),
            security_context: Some(PodSecurityContext {
                run_as_non_root: Some(true),
                run_as_user: Some(NON_ROOT_ID),
                run_as_group: Some(NON_ROOT_ID),
                fs_group: Some(NON_ROOT_ID),
                seccomp_profile: Some(SeccompProfile {
                    type_: "RuntimeDefault".into(),
                    ..Default::default()
                }),
                ..PodSecurityContext::default()
            }),
            ..PodSpec::default()
        }),
        status: None,
    })
}

/// The trainer's command line: the job file, the device (`cuda` when the job asks for
/// `nvidia.com/gpu`) and where it serves `/metrics` and rank 0's `/report`. The rest of its
/// configuration is environment ([`trainer_env`]).
fn trainer_command(job: &PetlJob, defaults: &WorkerDefaults) -> Vec<String> {
    let device = if job.spec.workers.wants_gpu() {
        "cuda"
    } else {
        "cpu"
    };
    [
        PROGRAM,
        TRAIN,
        "--config",
        CONFIG_PATH,
        "--device",
        device,
        "--metrics-addr",
        &format!("0.0.0.0:{}", defaults.metrics_port),
    ]
    .map(String::from)
    .into()
}

/// The agent's whole configuration as flags (docs/fault-tolerance.md, "Running the agent"); it
/// gets no environment, so nothing meant for the trainer can reach it.
fn agent_command(job: &PetlJob, names: &Names, rank: i32) -> Vec<String> {
    let spec = &job.spec;
    let replicas = spec.workers.replicas;
    let layout = spec.snapshot.erasure_coding_for(replicas);
    let mut command: Vec<String> = [
        PROGRAM,
        SNAPSHOT_AGENT,
        "--rank",
        &rank.to_string(),
        "--world-size",
        &replicas.to_string(),
        "--job",
        &names.job,
        "--peers",
        &names.peers_pattern(),
        "--data-shards",
        &layout.data_shards.to_string(),
        "--parity-shards",
        &layout.parity_shards.to_string(),
        "--listen",
        &format!("0.0.0.0:{SNAPSHOT_PORT}"),
        "--local-socket",
        SNAPSHOT_SOCKET,
        "--secret-file",
        &token_file(),
        "--metrics-addr",
        &format!("0.0.0.0:{AGENT_METRICS_PORT}"),
    ]
    .map(String::from)
    .into();
    if let Some(durable) = &spec.snapshot.durable
        && let Some(dir) = durable_dir(&durable.uri)
    {
        // The agent counts generations, one a snapshot, which the trainer takes every
        // everySteps steps; generations are numbered by step, so the span is in steps.
        let every = durable
            .every_snapshots
            .saturating_mul(spec.snapshot.every_steps)
            .max(1);
        command.extend([
            "--durable-dir".into(),
            dir,
            "--durable-every".into(),
            every.to_string(),
        ]);
    }
    command
}

/// The directory inside the pod that a durable URI names: the mounted claim's path for
/// `pvc://`, the path itself for `file://`; none for object stores (the agent has no client).
fn durable_dir(uri: &str) -> Option<String> {
    match StorageUri::parse_sink("spec.snapshot.durable.uri", uri).ok()? {
        StorageUri::File { path } => Some(path.display().to_string()),
        StorageUri::Pvc { claim, path } => Some(
            StorageUri::pvc_mount_path(&claim, &path)
                .display()
                .to_string()
                .trim_end_matches('/')
                .to_string(),
        ),
        _ => None,
    }
}

/// Container restart rules of the trainer: restart in place on every exit the failure policy
/// does not treat as permanent, never on success. `None` when no exit code is retryable.
pub fn restart_in_place(policy: &RunPolicy) -> Option<Vec<ContainerRestartRule>> {
    let permanent = |code: i32| policy.classify(Some(code), &[]) == FailureAction::FailJob;
    let (stay, restart): (Vec<i32>, Vec<i32>) = (0..=255).partition(|&c| c == 0 || permanent(c));
    if restart.is_empty() {
        return None;
    }
    // A rule holds at most 255 values: name the shorter side.
    let (operator, values) = if stay.len() <= restart.len() {
        ("NotIn", stay)
    } else {
        ("In", restart)
    };
    Some(vec![ContainerRestartRule {
        action: "Restart".into(),
        exit_codes: Some(ContainerRestartRuleOnExitCodes {
            operator: operator.into(),
            values: Some(values),
        }),
    }])
}

/// The job secret's file in both containers.
fn token_file() -> String {
    format!("{TOKEN_DIR}/{TOKEN_KEY}")
}

/// The trainer's environment (docs/trainer.md, `petl train`): who it is, every rank's trainer
/// host in rank order (the port is `PETL_TRAINER_PORT`, the Service's `trainer` port), the job
/// secret the ranks authenticate each other with, its agent's socket, where rank 0 writes the
/// published artifact, where `pvc://` claims are mounted, and its compute threads.
fn trainer_env(names: &Names, rank: i32, world_size: i32) -> Vec<EnvVar> {
    let peers: Vec<String> = (0..world_size).map(|r| names.peer_host(r)).collect();
    let var = |name: &str, value: String| EnvVar {
        name: name.into(),
        value: Some(value),
        ..EnvVar::default()
    };
    vec![
        var("PETL_JOB", names.job.clone()),
        var("PETL_RANK", rank.to_string()),
        var("PETL_WORLD_SIZE", world_size.to_string()),
        var("PETL_PEERS", peers.join(",")),
        var("PETL_TRAINER_PORT", TRAINER_PORT.to_string()),
        var("PETL_SNAPSHOT_TOKEN_FILE", token_file()),
        var("PETL_SNAPSHOT_SOCKET", SNAPSHOT_SOCKET.into()),
        var("PETL_TERMINATION_LOG", TERMINATION_MESSAGE_PATH.into()),
        var("PETL_PVC_ROOT", PVC_ROOT.into()),
        // The root filesystem is read-only; caches (~/.cache/petl) live on the scratch volume.
        var("HOME", SCRATCH_DIR.into()),
        compute_threads(),
    ]
}

/// The trainer's compute threads: its CPU limit rounded up (the node's allocatable CPUs when it
/// has none). Left alone, the trainer would start one thread per physical core of the node and
/// be throttled by its limit.
fn compute_threads() -> EnvVar {
    EnvVar {
        name: "RAYON_NUM_THREADS".into(),
        value_from: Some(EnvVarSource {
            resource_field_ref: Some(ResourceFieldSelector {
                container_name: Some(TRAINER_CONTAINER.into()),
                resource: "limits.cpu".into(),
                divisor: Some(Quantity("1".into())),
            }),
            ..Default::default()
        }),
        ..EnvVar::default()
    }
}

/// Credentials named by the spec's secretRefs, as environment variables of the trainer.
fn secret_env(job: &PetlJob) -> Vec<EnvFromSource> {
    let spec = &job.spec;
    let refs = [
        spec.model.secret_ref.as_ref(),
        spec.dataset.secret_ref.as_ref(),
        spec.output.secret_ref.as_ref(),
        spec.snapshot
            .durable
            .as_ref()
            .and_then(|d| d.secret_ref.as_ref()),
    ];
    let mut names: Vec<&str> = refs
        .into_iter()
        .flatten()
        .map(|r| r.name.as_str())
        .collect();
    names.sort_unstable();
    names.dedup();
    names
        .into_iter()
        .map(|name| EnvFromSource {
            secret_ref: Some(SecretEnvSource {
                name: name.into(),
                optional: Some(false),
            }),
            ..EnvFromSource::default()
        })
        .collect()
}

/// One volume per PersistentVolumeClaim named by a `pvc://` URI, mounted at `/mnt/pvc/<claim>`;
/// read-only unless the output or durable snapshots are written to it.
fn pvc_volumes(job: &PetlJob) -> (Vec<Volume>, Vec<VolumeMount>) {
    let spec = &job.spec;
    let sources = [
        Some(spec.model.uri.as_str()),
        Some(spec.dataset.uri.as_str()),
        spec.dataset.validation_uri.as_deref(),
    ];
    let sinks = [
        Some(spec.output.uri.as_str()),
        spec.snapshot.durable.as_ref().map(|d| d.uri.as_str()),
    ];
    let mut claims: BTreeMap<String, bool> = BTreeMap::new();
    for (uri, writable) in sources
        .iter()
        .map(|u| (u, false))
        .chain(sinks.iter().map(|u| (u, true)))
    {
        if let Some(claim) = uri.and_then(pvc_claim) {
            *claims.entry(claim).or_default() |= writable;
        }
    }
    claims
        .into_iter()
        .enumerate()
        .map(|(i, (claim, writable))| {
            let name = format!("pvc-{i}");
            let volume = Volume {
                name: name.clone(),
                persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                    claim_name: claim.clone(),
                    read_only: Some(!writable),
                }),
                ..Volume::default()
            };
            let path = StorageUri::pvc_mount_path(&claim, "").display().to_string();
            (volume, mount(&name, path.trim_end_matches('/'), !writable))
        })
        .unzip()
}

fn pvc_claim(uri: &str) -> Option<String> {
    let rest = uri.strip_prefix("pvc://")?;
    let claim = rest.split('/').next()?;
    (!claim.is_empty()).then(|| claim.to_string())
}

fn mount(name: &str, path: &str, read_only: bool) -> VolumeMount {
    VolumeMount {
        name: name.into(),
        mount_path: path.into(),
        read_only: Some(read_only),
        ..VolumeMount::default()
    }
}

fn empty_dir(name: &str) -> Volume {
    Volume {
        name: name.into(),
        empty_dir: Some(EmptyDirVolumeSource::default()),
        ..Volume::default()
    }
}

fn container_port(name: &str, port: i32) -> ContainerPort {
    ContainerPort {
        name: Some(name.into()),
        container_port: port,
        ..ContainerPort::default()
    }
}

fn container_security() -> SecurityContext {
    SecurityContext {
        allow_privilege_escalation: Some(false),
        read_only_root_filesystem: Some(true),
        run_as_non_root: Some(true),
        capabilities: Some(Capabilities {
            drop: Some(vec!["ALL".into()]),
            ..Capabilities::default()
        }),
        seccomp_profile: Some(SeccompProfile {
            type_: "RuntimeDefault".into(),
            ..Default::default()
        }),
        ..SecurityContext::default()
    }
}

/// The agent holds the shards of its peers in memory; it requests a little and is not capped,
/// so a memory limit never kills the redundancy the job relies on.
fn agent_resources() -> ResourceRequirements {
    ResourceRequirements {
        requests: Some(BTreeMap::from([
            ("cpu".to_string(), Quantity("100m".into())),
            ("memory".to_string(), Quantity("128Mi".into())),
        ])),
        ..ResourceRequirements::default()
    }
}

#[cfg(test)]
mod tests;
