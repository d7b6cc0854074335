//! The PetlJob API: types, defaults, validation rules, and the CRD generator.
//! Every crate that reads or writes a PetlJob (operator, trainer, tests) goes through these types.

pub mod job;
pub mod method;
pub mod output;
pub mod report;
pub mod rules;
pub mod run_policy;
pub mod snapshot;
pub mod source;
pub mod status;
pub mod training;
pub mod uri;
pub mod workers;

pub use job::{API_GROUP, API_VERSION, KIND, PetlJob, PetlJobSpec};
pub use method::SherlConfig;
pub use method::{
    BitFitConfig, FullConfig, HeadConfig, LoraConfig, LstConfig, MethodConfig, MethodSpec,
    MethodType, R2Config, UniptConfig, UnknownMethod, VqtCombine, VqtConfig,
};
pub use output::{OutputFormat, OutputSpec};
pub use report::WorkerReport;
pub use run_policy::{FailureAction, FailurePolicy, FailurePolicyRule, RunPolicy, exit_code};
pub use snapshot::{DurableSpec, ErasureCoding, SnapshotSpec};
pub use source::{
    DatasetFormat, DatasetSpec, ImageSpec, LabelColumn, ModelDtype, ModelFormat, ModelSpec,
    SecretRef, Task, UnknownLabels,
};
pub use status::{
    ArtifactStatus, ConditionType, LastRecovery, PetlJobStatus, Phase, ProgressStatus,
    RestartCounts, SnapshotStatus, WorkerCounts,
};
pub use training::{Optimizer, Schedule, TrainingSpec};
pub use uri::StorageUri;
pub use workers::WorkersSpec;

/// Everything that can go wrong when reading or interpreting a PetlJob outside the API server.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The document is not valid YAML or does not match the PetlJob schema.
    #[error("{source_name}: not a valid PetlJob: {message}")]
    Yaml {
        /// File name, or `<input>` when read from a string.
        source_name: String,
        /// serde_yaml's message, which names the field and the line/column.
        message: String,
    },
    /// The document is YAML for some other kind of object.
    #[error(
        "{source_name}: expected apiVersion {expected_api_version} and kind {expected_kind}, found apiVersion {api_version:?} kind {kind:?}"
    )]
    WrongKind {
        /// File name, or `<input>`.
        source_name: String,
        /// What the document says.
        api_version: String,
        /// What the document says.
        kind: String,
        /// Always `petl.dev/v1alpha1`.
        expected_api_version: &'static str,
        /// Always `PetlJob`.
        expected_kind: &'static str,
    },
    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A storage URI is malformed or uses a scheme that is not allowed for its field.
    #[error("{field}: invalid URI {uri:?}: {reason}; expected one of {expected}")]
    Uri {
        /// The spec field, e.g. `spec.model.uri`.
        field: String,
        /// The offending value.
        uri: String,
        /// What is wrong with it.
        reason: String,
        /// The accepted forms.
        expected: String,
    },
}
