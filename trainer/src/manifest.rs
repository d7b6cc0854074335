//! The manifest that closes an output directory: what was trained on what, how it went, and
//! the sha256 and size of every file, so a consumer can verify the adapter before loading it.

use std::io::Read;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::export::write_atomically;
use crate::{Error, Result};

/// The manifest's file name; it is written last, so its presence means the output is complete.
pub const MANIFEST_FILE: &str = "manifest.json";

/// One file of the output.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FileEntry {
    /// Relative to the output directory.
    pub path: String,
    pub sha256: String,
    pub size_bytes: u64,
}

/// The frozen model the adapter belongs to.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BaseModel {
    pub uri: String,
    /// `sha256:<hex>` of the weight file.
    pub digest: String,
    pub weights_file: String,
}

/// How training went, from the trainer's report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Metrics {
    pub steps: u64,
    pub final_loss: Option<f64>,
    /// Validation accuracy (classification) or loss (causal LM), when evaluated.
    pub eval_metric: Option<f64>,
    pub eval_metric_name: Option<String>,
    pub train_examples: usize,
    pub validation_examples: usize,
    pub wall_seconds: f64,
    /// Training examples per second, evaluation excluded.
    #[serde(default)]
    pub samples_per_second: f64,
    /// Peak training memory of any step: live heap bytes (CPU) or device bytes in use (GPU).
    #[serde(default)]
    pub peak_memory_bytes: u64,
}

/// Everything a consumer needs to trust and use an output directory.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Manifest {
    pub manifest_version: u32,
    pub job: String,
    pub created_unix_seconds: u64,
    pub base_model: BaseModel,
    pub dataset_uri: String,
    pub method: String,
    /// The job's method and training blocks as given.
    pub hyperparameters: serde_json::Value,
    pub metrics: Metrics,
    pub trainable_parameters: u64,
    pub peak_memory_bytes: u64,
    pub files: Vec<FileEntry>,
    /// The recoveries rank 0 went through in the process that wrote this output.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub recoveries: Vec<RecoveryRecord>,
}

/// One recovery: lost ranks replaced, every rank restored the agreed generation and resumed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RecoveryRecord {
    /// The generation (= step) every rank resumed from.
    pub restored_generation: u64,
    /// Ranks whose trainer process was new: restarted in place or replaced.
    pub lost_ranks: Vec<usize>,
    /// Per rank, in rank order, where its state came from: `local`, `peers` or `durable`.
    pub tiers: Vec<String>,
    /// From the loss noticed (or the new process started) to training resumed, slowest rank.
    pub seconds: f64,
}

/// What the operator records in `status.artifact` once the manifest is written.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Artifact {
    pub uri: String,
    /// `sha256:<hex>` of `manifest.json`, which pins every other file by its own sha256.
    pub digest: String,
    /// All files, the manifest included.
    pub size_bytes: u64,
    pub trainable_parameters: u64,
    pub peak_memory_bytes: u64,
}

/// The sha256 of a file, streamed, as lower-case hex.
pub fn sha256_file(path: &Path) -> Result<String> {
    let io = |source| Error::Io {
        path: path.display().to_string(),
        source,
    };
    let mut file = std::fs::File::open(path).map_err(io)?;
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; 1 << 20];
    loop {
        let read = file.read(&mut buffer).map_err(io)?;
        if read == 0 {
            break;
        }
        hasher.update(&buffer[..read]);
    }
    Ok(hex::encode(hasher.finalize()))
}

/// Hashes and sizes `files` (all inside `dir`).
pub fn file_entries(dir: &Path, files: &[PathBuf]) -> Result<Vec<FileEntry>> {
    files
        .iter()
        .map(|file| {
            let size_bytes = std::fs::metadata(file)
                .map_err(|source| Error::Io {
                    path: file.display().to_string(),
                    source,
                })?
                .len();
            let path = file
                .strip_prefix(dir)
                .unwrap_or(file)
                .to_string_lossy()
                .into_owned();
            Ok(FileEntry {
                path,
                sha256: sha256_file(file)?,
                size_bytes,
            })
        })
        .collect()
}

impl Manifest {
    /// Writes `manifest.json` into `dir` and returns the artifact that describes the output.
    pub fn write(&self, dir: &Path, uri: &str) -> Result<Artifact> {
        let path = dir.join(MANIFEST_FILE);
        let json = serde_json::to_vec_pretty(self).map_err(|source| Error::Json {
            path: path.display().to_string(),
            source,
        })?;
        write_atomically(&path, |tmp| {
            std::fs::write(tmp, &json).map_err(|source| Error::Io {
                path: tmp.display().to_string(),
                source,
            })
        })?;
        Ok(Artifact {
            uri: uri.to_string(),
            digest: format!("sha256:{}", hex::encode(Sha256::digest(&json))),
            size_bytes: self.files.iter().map(|f| f.size_bytes).sum::<u64>() + json.len() as u64,
            trainable_parameters: self.trainable_parameters,
            peak_memory_bytes: self.peak_memory_bytes,
        })
    }

    /// Reads `manifest.json` from `dir`.
    pub fn read(dir: &Path) -> Result<Self> {
        let path = dir.join(MANIFEST_FILE);
        let text = std::fs::read(&path).map_err(|source| Error::Io {
            path: path.display().to_string(),
            source,
        })?;
        serde_json::from_slice(&text).map_err(|source| Error::Json {
            path: path.display().to_string(),
            source,
        })
    }

    /// Checks every listed file's size and sha256; names the first that differs.
    pub fn verify(&self, dir: &Path) -> Result<()> {
        for entry in &self.files {
            let path = dir.join(&entry.path);
            let actual = sha256_file(&path)?;
            if actual != entry.sha256 {
                return Err(Error::Weights {
                    file: path.display().to_string(),
                    message: format!(
                        "sha256 {actual} differs from the manifest's {}; the output was changed or truncated",
                        entry.sha256
                    ),
                });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sha256_matches_a_known_digest() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("abc");
        std::fs::write(&path, b"abc").unwrap();
        assert_eq!(
            sha256_file(&path).unwrap(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn verify_names_a_changed_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w");
        std::fs::write(&path, b"weights").unwrap();
        let manifest = Manifest {
            manifest_version: 1,
            job: "j".into(),
            created_unix_seconds: 0,
            base_model: BaseModel {
                uri: "m".into(),
                digest: "sha256:0".into(),
                weights_file: "model.safetensors".into(),
            },
            dataset_uri: "d".into(),
            method: "lst".into(),
            hyperparameters: serde_json::Value::Null,
            metrics: Metrics {
                steps: 1,
                final_loss: Some(0.5),
                eval_metric: None,
                eval_metric_name: None,
                train_examples: 1,
                validation_examples: 0,
                wall_seconds: 1.0,
                samples_per_second: 2.0,
                peak_memory_bytes: 100,
            },
            trainable_parameters: 10,
            peak_memory_bytes: 100,
            files: file_entries(dir.path(), std::slice::from_ref(&path)).unwrap(),
            recoveries: Vec::new(),
        };
        let artifact = manifest.write(dir.path(), "file:///x").unwrap();
        assert_eq!(
            artifact.size_bytes,
            7 + std::fs::metadata(dir.path().join(MANIFEST_FILE))
                .unwrap()
                .len()
        );
        let read = Manifest::read(dir.path()).unwrap();
        assert_eq!(read, manifest);
        read.verify(dir.path()).unwrap();
        std::fs::write(&path, b"weightz").unwrap();
        let err = read.verify(dir.path()).unwrap_err().to_string();
        assert!(err.contains("differs from the manifest"), "{err}");
    }
}
