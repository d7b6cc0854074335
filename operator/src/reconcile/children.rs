//! The objects a PetlJob owns, rendered from its spec: the job ConfigMap, the headless peer
//! Service, the snapshot-token Secret and one worker Pod per rank.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMap, ConfigMapVolumeSource, Container, ContainerPort, EmptyDirVolumeSource,
    EnvFromSource, EnvVar, EnvVarSource, ObjectFieldSelector, PersistentVolumeClaimVolumeSource,
    Pod, PodSecurityContext, PodSpec, ResourceFieldSelector, ResourceRequirements, SeccompProfile,
    Secret, SecretEnvSource, SecretVolumeSource, SecurityContext, Service, ServicePort,
    ServiceSpec, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::{Resource, ResourceExt};
use petl_crds::{PetlJob, StorageUri};

use super::ranks::{JOB_LABEL, RANK_LABEL, TRAINER_CONTAINER};
use crate::{Error, Result};

/// Where the rendered job is mounted; the trainer runs `petl-trainer train --config` on it.
pub const CONFIG_PATH: &str = "/etc/petl/job.yaml";
/// The ConfigMap key holding the rendered job.
pub const CONFIG_KEY: &str = "job.yaml";
/// The Secret key holding the snapshot token.
pub const TOKEN_KEY: &str = "token";
/// Where the snapshot token is mounted in both containers.
pub const TOKEN_DIR: &str = "/var/run/petl/snapshot-token";
/// Port of the snapshot agent (peer shard traffic and the trainer's local hand-off).
pub const SNAPSHOT_PORT: i32 = 7070;
/// Port the trainers use to reach each other (gradient all-reduce).
pub const TRAINER_PORT: i32 = 29500;
/// Name of the snapshot-agent native sidecar.
pub const AGENT_CONTAINER: &str = "snapshot-agent";
/// UID/GID the workers run as (the distroless "nonroot" user).
const NON_ROOT_ID: i64 = 65532;
/// Longest job name whose pod host names (`<job>-worker-<rank>`) fit a 63-character DNS label.
pub const MAX_JOB_NAME: usize = 63 - "-worker-255".len();

/// Names of a job's children.
pub struct Names {
    /// PetlJob name.
    pub job: String,
    /// Namespace.
    pub namespace: String,
}

impl Names {
    /// Names for `job`; fails on a name too long for pod host names.
    pub fn of(job: &PetlJob) -> Result<Self> {
        let name = job.name_any();
        if name.len() > MAX_JOB_NAME {
            return Err(Error::IllegalJob {
                field: "metadata.name",
                message: format!(
                    "{name:?} is {} characters; worker host names <name>-worker-<rank> must fit 63, so use at most {MAX_JOB_NAME}",
                    name.len()
                ),
            });
        }
        Ok(Self {
            job: name,
            namespace: job.namespace().unwrap_or_else(|| "default".into()),
        })
    }
    /// The headless Service giving each rank a stable DNS name.
    pub fn service(&self) -> String {
        format!("{}-workers", self.job)
    }
    /// The ConfigMap with the rendered job.
    pub fn config_map(&self) -> String {
        format!("{}-config", self.job)
    }
    /// The Secret with the snapshot token.
    pub fn secret(&self) -> String {
        format!("{}-snapshot-token", self.job)
    }
    /// The pod of `rank`.
    pub fn pod(&self, rank: i32) -> String {
        format!("{}-worker-{rank}", self.job)
    }
    /// The DNS name of `rank` inside the cluster.
    pub fn peer_host(&self, rank: i32) -> String {
        format!(
            "{}.{}.{}.svc",
            self.pod(rank),
            self.service(),
            self.namespace
        )
    }
}

/// Labels every child carries.
pub fn job_labels(names: &Names) -> BTreeMap<String, String> {
    BTreeMap::from([
        (JOB_LABEL.to_string(), names.job.clone()),
        (
            "app.kubernetes.io/managed-by".to_string(),
            crate::FIELD_MANAGER.to_string(),
        ),
    ])
}

fn child_meta(job: &PetlJob, names: &Names, name: String) -> ObjectMeta {
    ObjectMeta {
        name: Some(name),
        namespace: Some(names.namespace.clone()),
        labels: Some(job_labels(names)),
        owner_references: job.controller_owner_ref(&()).map(|o| vec![o]),
        ..ObjectMeta::default()
    }
}

/// The ConfigMap holding the job as the trainer reads it (a whole PetlJob document).
pub fn config_map(job: &PetlJob, names: &Names) -> Result<ConfigMap> {
    let document = PetlJob {
        metadata: ObjectMeta {
            name: Some(names.job.clone()),
            namespace: Some(names.namespace.clone()),
            ..ObjectMeta::default()
        },
        spec: job.spec.clone(),
        status: None,
    };
    let yaml = serde_yaml::to_string(&document).map_err(Error::SerializationError)?;
    Ok(ConfigMap {
        metadata: child_meta(job, names, names.config_map()),
        data: Some(BTreeMap::from([(CONFIG_KEY.to_string(), yaml)])),
        ..ConfigMap::default()
    })
}

/// The headless Service: per-rank DNS records, published before pods are Ready so a
/// replacement rank can reach its peers while it restores.
pub fn service(job: &PetlJob, names: &Names) -> Service {
    let port = |name: &str, port: i32| ServicePort {
        name: Some(name.into()),
        port,
        ..ServicePort::default()
    };
    Service {
        metadata: child_meta(job, names, names.service()),
        spec: Some(ServiceSpec {
            cluster_ip: Some("None".into()),
            selector: Some(BTreeMap::from([(JOB_LABEL.to_string(), names.job.clone())])),
            publish_not_ready_addresses: Some(true),
            ports: Some(vec![
                port("snapshot", SNAPSHOT_PORT),
                port("trainer", TRAINER_PORT),
            ]),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    }
}

/// The Secret with a fresh random token that authenticates snapshot traffic between the
/// job's agents. Created once; never re-rendered (that would rotate the token under the pods).
pub fn secret(job: &PetlJob, names: &Names) -> Secret {
    let token: [u8; 32] = rand::random();
    Secret {
        metadata: child_meta(job, names, names.secret()),
        type_: Some("Opaque".into()),
        string_data: Some(BTreeMap::from([(
            TOKEN_KEY.to_string(),
            hex::encode(token),
        )])),
        ..Secret::default()
    }
}

/// The pod of one rank: the trainer, the snapshot agent as a native sidecar, the job's
/// placement and resources, and a locked-down security context.
pub fn pod(job: &PetlJob, names: &Names, rank: i32, default_image: Option<&str>) -> Result<Pod> {
    let workers = &job.spec.workers;
    let image = workers
        .image
        .as_deref()
        .or(default_image)
        .ok_or_else(|| Error::IllegalJob {
            field: "spec.workers.image",
            message:
                "no worker image: set spec.workers.image or start the operator with --trainer-image"
                    .into(),
        })?;
    let mut labels = job_labels(names);
    labels.insert(RANK_LABEL.into(), rank.to_string());
    let mut metadata = child_meta(job, names, names.pod(rank));
    metadata.labels = Some(labels);

    let (pvc_volumes, pvc_mounts) = pvc_volumes(job);
    let mut mounts = vec![
        mount("config", "/etc/petl", true),
        mount("snapshot-token", TOKEN_DIR, true),
        mount("scratch", "/scratch", false),
        mount("tmp", "/tmp", false),
    ];
    mounts.extend(pvc_mounts);
    let env = worker_env(names, rank, workers.replicas);

    let trainer = Container {
        name: TRAINER_CONTAINER.into(),
        image: Some(image.into()),
        command: Some(vec![
            "petl-trainer".into(),
            "train".into(),
            "--config".into(),
            CONFIG_PATH.into(),
        ]),
        env: Some([env.clone(), vec![compute_threads()]].concat()),
        env_from: Some(secret_env(job)),
        ports: Some(vec![container_port("trainer", TRAINER_PORT)]),
        resources: workers.resources.clone(),
        volume_mounts: Some(mounts.clone()),
        security_context: Some(container_security()),
        ..Container::default()
    };
    let agent = Container {
        name: AGENT_CONTAINER.into(),
        image: Some(image.into()),
        command: Some(vec!["petl-snapshot-agent".into()]),
        // Native sidecar: starts before the trainer, keeps running beside it, stops after it.
        restart_policy: Some("Always".into()),
        env: Some(env),
        ports: Some(vec![container_port("snapshot", SNAPSHOT_PORT)]),
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
        empty_dir("scratch"),
        empty_dir("tmp"),
    ];
    volumes.extend(pvc_volumes);

    Ok(Pod {
        metadata,
        spec: Some(PodSpec {
            hostname: Some(names.pod(rank)),
            subdomain: Some(names.service()),
            // Every trainer exit is seen by the operator's failure policy (see docs/operator.md).
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

fn worker_env(names: &Names, rank: i32, world_size: i32) -> Vec<EnvVar> {
    let peers: Vec<String> = (0..world_size).map(|r| names.peer_host(r)).collect();
    let var = |name: &str, value: String| EnvVar {
        name: name.into(),
        value: Some(value),
        ..EnvVar::default()
    };
    let field = |name: &str, path: &str| EnvVar {
        name: name.into(),
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: path.into(),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..EnvVar::default()
    };
    vec![
        var("PETL_JOB", names.job.clone()),
        var("PETL_NAMESPACE", names.namespace.clone()),
        var("PETL_RANK", rank.to_string()),
        var("PETL_WORLD_SIZE", world_size.to_string()),
        var(
            "PETL_PEER_SERVICE",
            format!("{}.{}.svc", names.service(), names.namespace),
        ),
        var("PETL_PEERS", peers.join(",")),
        var("PETL_CONFIG", CONFIG_PATH.into()),
        var("PETL_SNAPSHOT_PORT", SNAPSHOT_PORT.to_string()),
        var("PETL_SNAPSHOT_ADDR", format!("127.0.0.1:{SNAPSHOT_PORT}")),
        var(
            "PETL_SNAPSHOT_TOKEN_FILE",
            format!("{TOKEN_DIR}/{TOKEN_KEY}"),
        ),
        var("PETL_PVC_ROOT", "/mnt/pvc".into()),
        // The root filesystem is read-only; caches (~/.cache/petl) live on the scratch volume.
        var("HOME", "/scratch".into()),
        field("POD_NAME", "metadata.name"),
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
mod tests {
    use super::*;
    use crate::fixtures;

    #[test]
    fn worker_pod_carries_rank_identity_and_sidecar() {
        let job = fixtures::job("sst2", 3);
        let names = Names::of(&job).unwrap();
        let pod = pod(&job, &names, 1, None).unwrap();
        assert_eq!(pod.metadata.name.as_deref(), Some("sst2-worker-1"));
        assert_eq!(pod.labels()[RANK_LABEL], "1");
        assert_eq!(pod.labels()[JOB_LABEL], "sst2");
        let spec = pod.spec.unwrap();
        let env = spec.containers[0].env.clone().unwrap();
        let get = |n: &str| {
            env.iter()
                .find(|e| e.name == n)
                .and_then(|e| e.value.clone())
        };
        assert_eq!(get("PETL_RANK").as_deref(), Some("1"));
        assert_eq!(get("PETL_WORLD_SIZE").as_deref(), Some("3"));
        let threads = env
            .iter()
            .find(|e| e.name == "RAYON_NUM_THREADS")
            .and_then(|e| e.value_from.as_ref()?.resource_field_ref.as_ref())
            .expect("the trainer's threads follow its CPU limit");
        assert_eq!(threads.resource, "limits.cpu");
        assert_eq!(threads.container_name.as_deref(), Some(TRAINER_CONTAINER));
        assert!(
            get("PETL_PEERS")
                .unwrap()
                .contains("sst2-worker-2.sst2-workers.default.svc")
        );
        let agent = &spec.init_containers.unwrap()[0];
        assert_eq!(agent.name, AGENT_CONTAINER);
        assert_eq!(agent.restart_policy.as_deref(), Some("Always"));
        assert_eq!(spec.subdomain.as_deref(), Some("sst2-workers"));
    }

    #[test]
    fn missing_image_names_the_field_and_the_flag() {
        let mut job = fixtures::job("sst2", 1);
        job.spec.workers.image = None;
        let err = pod(&job, &Names::of(&job).unwrap(), 0, None)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("spec.workers.image") && err.contains("--trainer-image"),
            "{err}"
        );
        assert!(pod(&job, &Names::of(&job).unwrap(), 0, Some("img")).is_ok());
    }

    #[test]
    fn pvc_uris_become_mounts_writable_only_for_sinks() {
        let mut job = fixtures::job("sst2", 1);
        job.spec.model.uri = "pvc://models/minilm".into();
        job.spec.output.uri = "pvc://out/adapters".into();
        let (volumes, mounts) = pvc_volumes(&job);
        assert_eq!(volumes.len(), 2);
        let by_path = |p: &str| mounts.iter().find(|m| m.mount_path == p).unwrap().read_only;
        assert_eq!(by_path("/mnt/pvc/models"), Some(true));
        assert_eq!(by_path("/mnt/pvc/out"), Some(false));
    }

    #[test]
    fn config_map_holds_a_job_document_the_trainer_can_parse() {
        let job = fixtures::job("sst2", 2);
        let cm = config_map(&job, &Names::of(&job).unwrap()).unwrap();
        let text = &cm.data.unwrap()[CONFIG_KEY];
        let parsed = PetlJob::from_yaml(text).unwrap();
        assert_eq!(parsed.spec, job.spec);
    }

    #[test]
    fn overlong_job_names_are_refused_with_the_limit() {
        let job = fixtures::job(&"a".repeat(60), 1);
        let err = Names::of(&job).err().unwrap().to_string();
        assert!(err.contains("at most 52"), "{err}");
    }
}
