//! The objects a PetlJob owns besides its pods, rendered from its spec: the job ConfigMap, the
//! headless peer Service and the snapshot-token Secret, and the names of them all.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service, ServicePort, ServiceSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::{Resource, ResourceExt};
use petl_crds::PetlJob;

use super::ranks::JOB_LABEL;
use crate::{Error, Result};

/// Where the rendered job is mounted; the trainer runs `petl train --config` on it.
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
/// Longest job name whose pod host names (`<job>-worker-<rank>`) fit a 63-character DNS label.
pub use petl_crds::rules::MAX_JOB_NAME;

/// Names of a job's children.
pub struct Names {
    /// PetlJob name.
    pub job: String,
    /// Namespace.
    pub namespace: String,
}

impl Names {
    /// Names for `job`.
    pub fn of(job: &PetlJob) -> Self {
        Self {
            job: job.name_any(),
            namespace: job.namespace().unwrap_or_else(|| "default".into()),
        }
    }

    /// Refuses a job name too long for its pods' host names (the CRD refuses such names at
    /// admission; this catches jobs admitted before that rule).
    pub(super) fn check_length(&self) -> Result<()> {
        if self.job.len() > MAX_JOB_NAME {
            return Err(Error::IllegalJob {
                field: "metadata.name",
                message: format!(
                    "{:?} is {} characters; worker host names <name>-worker-<rank> must fit 63, so use at most {MAX_JOB_NAME}",
                    self.job,
                    self.job.len()
                ),
            });
        }
        Ok(())
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
    /// Every rank's agent as the agent's `--peers` pattern (`{rank}` stands for the rank).
    pub fn peers_pattern(&self) -> String {
        format!(
            "{}.{}.{}.svc:{SNAPSHOT_PORT}",
            self.pod_pattern(),
            self.service(),
            self.namespace
        )
    }
    fn pod_pattern(&self) -> String {
        format!("{}-worker-{{rank}}", self.job)
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

pub(super) fn child_meta(job: &PetlJob, names: &Names, name: String) -> ObjectMeta {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures;

    #[test]
    fn config_map_holds_a_job_document_the_trainer_can_parse() {
        let job = fixtures::job("sst2", 2);
        let cm = config_map(&job, &Names::of(&job)).unwrap();
        let text = &cm.data.unwrap()[CONFIG_KEY];
        let parsed = PetlJob::from_yaml(text).unwrap();
        assert_eq!(parsed.spec, job.spec);
    }
}
