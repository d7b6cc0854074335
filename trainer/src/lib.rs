//! The trainer: backbones, methods, data, optimiser, export.
//! One autograd mechanism (`tape`) decides what every layer saves for backward.

// Core (trainer-core): the tape and its layers (nn), backbones, methods, optimiser, loop, memory
// accounting.
pub mod init;
pub mod kernels;
pub mod memory;
pub mod methods;
pub mod models;
pub mod nn;
pub mod optim;
pub mod sharding;
pub mod tape;
pub mod train;

// I/O (trainer-io) adds its modules here: data, source, export, manifest, cli, progress, metrics, run.
pub mod cli;
pub mod collective;
pub mod data;
pub mod device;
pub mod export;
pub mod grounding;
pub mod launch;
pub mod manifest;
pub mod metrics;
pub mod progress;
pub mod run;
pub mod source;

/// Everything that can go wrong in the trainer; messages name the file, field or tensor and the fix.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: invalid JSON: {source}")]
    Json {
        path: String,
        #[source]
        source: serde_json::Error,
    },
    /// A weight file lacks a tensor the model needs, or holds it with the wrong shape.
    #[error("{file}: {message}")]
    Weights { file: String, message: String },
    /// A method or training setting is out of range; names the field and the accepted values.
    #[error("invalid {field}: {message}")]
    Config { field: String, message: String },
    /// A model directory or asset is missing; says how to get it.
    #[error("{what} not found at {path}: {fix}")]
    Missing {
        what: String,
        path: String,
        fix: String,
    },
    /// The loss became NaN or infinite; the run cannot continue from this state.
    #[error(
        "loss is not finite at step {step}: lower training.learningRate or set training.gradClip"
    )]
    Diverged { step: u64 },
    /// A data file is empty, malformed or holds a value the job does not allow (trainer-io).
    #[error("{file}{}: {field}: {message}", line.map(|l| format!(":{l}")).unwrap_or_default())]
    Data {
        file: String,
        line: Option<u64>,
        field: String,
        message: String,
    },
    /// A model, dataset or output URI cannot be parsed or used as given (trainer-io).
    #[error("{uri}: {message}")]
    Source { uri: String, message: String },
    /// A URI names a file or package path that does not exist.
    #[error("{uri}: {message}")]
    SourceNotFound { uri: String, message: String },
    /// A URI's server (the hub, the package index) cannot be reached now; a retry may pass.
    #[error("{uri}: {message}")]
    SourceUnreachable { uri: String, message: String },
    /// An operation between ranks failed: a peer was lost or unreachable, or a protocol or
    /// setup error.
    #[error(transparent)]
    Collective(#[from] crate::collective::CollectiveError),
    /// The ranks hold different parameters: a bug in the trainer, never a silent fork.
    #[error(
        "replicas diverged before step {step}: rank(s) {ranks:?} hold parameters that differ from rank 0's; this is a bug, please report it"
    )]
    ReplicasDiverged { step: u64, ranks: Vec<usize> },
    /// A snapshot to restore was written by another configuration of the job.
    #[error(
        "snapshot generation {generation} does not fit this job: its {what} is {found}, the job's is {expected}; it was not used (clear the job's snapshots or restore the original spec)"
    )]
    SnapshotMismatch {
        generation: u64,
        what: String,
        found: String,
        expected: String,
    },
    /// A rank was lost before any snapshot was committed: the surviving ranks exit so that
    /// every rank starts over from step 0 in a new process.
    #[error(
        "a rank was lost before the first snapshot was committed; exiting so every rank starts over from step 0"
    )]
    NothingToRestore,
    /// The snapshot agent failed or could not be reached.
    #[error("snapshots: {0}")]
    Snapshot(#[from] petl_snapshot::Error),
    /// A method runs extra query tokens through the backbone's blocks (VQT), which this
    /// backbone does not implement.
    #[error(
        "the {backbone} backbone cannot run query tokens through its blocks, which spec.method.type vqt needs; use it with a BERT-family or ViT model, or pick another method (lst, lora)"
    )]
    NoQueryBlocks { backbone: String },
    /// A state the trainer cannot continue from: a bug, not a configuration problem.
    #[error("internal error: {0}; this is a bug, please report it")]
    Internal(String),
    /// A job file cannot be read, parsed or run as given (trainer-io).
    #[error("{path}: {message}")]
    Job { path: String, message: String },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// The exit code the operator's failure policy reads (`petl_crds::exit_code`): permanent
    /// errors use the sysexits codes it fails the job on, those a retry may cure EX_TEMPFAIL.
    pub fn exit_code(&self) -> i32 {
        use petl_crds::exit_code;
        match self {
            Error::Job { .. } | Error::Source { .. } => exit_code::USAGE,
            Error::Config { .. }
            | Error::Diverged { .. }
            | Error::SnapshotMismatch { .. }
            | Error::NoQueryBlocks { .. } => exit_code::CONFIG,
            Error::Data { .. } | Error::Json { .. } => exit_code::DATA_ERROR,
            Error::Missing { .. } | Error::Weights { .. } | Error::SourceNotFound { .. } => {
                exit_code::NO_INPUT
            }
            Error::SourceUnreachable { .. } | Error::NothingToRestore => exit_code::TEMP_FAIL,
            Error::Collective(e) if e.is_transient() => exit_code::TEMP_FAIL,
            Error::Collective(e) => match e {
                crate::collective::CollectiveError::Auth { .. }
                | crate::collective::CollectiveError::Usage(_) => exit_code::CONFIG,
                _ => exit_code::SOFTWARE,
            },
            Error::Snapshot(e) => match e {
                petl_snapshot::Error::Unreachable { .. }
                | petl_snapshot::Error::Timeout { .. }
                | petl_snapshot::Error::Io(_)
                | petl_snapshot::Error::Protocol(_)
                | petl_snapshot::Error::Remote { .. }
                | petl_snapshot::Error::HandoffFailed(_) => exit_code::TEMP_FAIL,
                petl_snapshot::Error::Config(_)
                | petl_snapshot::Error::Layout(_)
                | petl_snapshot::Error::Auth(_) => exit_code::CONFIG,
                _ => exit_code::SOFTWARE,
            },
            Error::ReplicasDiverged { .. } | Error::Internal(_) | Error::Candle(_) => {
                exit_code::SOFTWARE
            }
            Error::Io { .. } => 1,
        }
    }
}

/// Reads a JSON file (a model or adapter config); errors name the file.
pub(crate) fn read_json<T: serde::de::DeserializeOwned>(path: &std::path::Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
        path: path.display().to_string(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|source| Error::Json {
        path: path.display().to_string(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::collective::CollectiveError;
    use petl_crds::exit_code;

    #[test]
    fn exit_codes_follow_the_error_kind_not_its_message() {
        let source = |message: &str| (String::from("hf://x"), message.to_string());
        let (uri, message) = source("does not exist; unreachable");
        let cases = [
            (
                Error::Source {
                    uri: uri.clone(),
                    message: message.clone(),
                },
                exit_code::USAGE,
            ),
            (
                Error::SourceNotFound {
                    uri: uri.clone(),
                    message: message.clone(),
                },
                exit_code::NO_INPUT,
            ),
            (
                Error::SourceUnreachable {
                    uri,
                    message: "pip download failed".into(),
                },
                exit_code::TEMP_FAIL,
            ),
            (
                Error::Collective(CollectiveError::PeerUnreachable {
                    rank: 1,
                    address: "x:1".into(),
                    waited: std::time::Duration::from_secs(1),
                }),
                exit_code::TEMP_FAIL,
            ),
            (
                Error::Collective(CollectiveError::Protocol {
                    rank: 1,
                    reason: "x".into(),
                }),
                exit_code::SOFTWARE,
            ),
            (
                Error::ReplicasDiverged {
                    step: 3,
                    ranks: vec![1],
                },
                exit_code::SOFTWARE,
            ),
            (
                Error::Candle(candle_core::Error::Msg("shape".into())),
                exit_code::SOFTWARE,
            ),
            (
                Error::SnapshotMismatch {
                    generation: 1,
                    what: "world size".into(),
                    found: "2".into(),
                    expected: "4".into(),
                },
                exit_code::CONFIG,
            ),
            (Error::NothingToRestore, exit_code::TEMP_FAIL),
            (
                Error::Snapshot(petl_snapshot::Error::Unreachable {
                    what: "the agent".into(),
                    source: std::io::Error::other("gone"),
                }),
                exit_code::TEMP_FAIL,
            ),
        ];
        for (error, code) in cases {
            assert_eq!(error.exit_code(), code, "{error}");
        }
    }
}
