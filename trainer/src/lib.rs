//! The trainer: backbones, methods, data, optimiser, export.
//! One autograd mechanism (`tape`) decides what every layer saves for backward.

// Core (trainer-core): the tape, backbones, methods, optimiser, loop, memory accounting.
pub mod init;
pub mod kernels;
pub mod memory;
pub mod methods;
pub mod models;
pub mod optim;
pub mod tape;
pub mod train;

// I/O (trainer-io) adds its modules here: data, source, export, manifest, cli, progress, metrics, run.
pub mod cli;
pub mod data;
pub mod device;
pub mod export;
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
    /// A model, dataset or output URI cannot be parsed or fetched (trainer-io).
    #[error("{uri}: {message}")]
    Source { uri: String, message: String },
    /// A job file cannot be read, parsed or run as given (trainer-io).
    #[error("{path}: {message}")]
    Job { path: String, message: String },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

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
