//! Turns a job's dataset into tokenised training and validation examples, then into batches.
//! Reading formats lives in `read`, labels and splits here, shuffling, sharding and padding in `batches`.

mod batches;
pub mod image;
mod read;

use std::path::{Path, PathBuf};

use rand::SeedableRng;
use rand::seq::SliceRandom;

pub use batches::{Batch, Batcher, IGNORE_INDEX};
pub use read::format_from_extension;

use crate::{Error, Result};

/// The file formats the trainer reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Csv,
    Tsv,
    Jsonl,
    /// Orange's `.tab`: tab-separated, three header rows (names, types, flags).
    Tab,
    /// One document per line (causal LM).
    Text,
}

/// What the examples teach the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Task {
    SequenceClassification,
    CausalLm,
}

/// What to do with a row whose label is not in the job's label list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnknownLabels {
    Error,
    Skip,
}

/// Where the validation examples come from.
#[derive(Debug, Clone, PartialEq)]
pub enum Validation {
    /// A deterministic share of the training file (independent of the training seed).
    Fraction(f64),
    /// A separate file in the same format.
    File(PathBuf),
}

/// The dataset part of a job, with URIs already resolved to local files.
#[derive(Debug, Clone)]
pub struct DataConfig {
    pub path: PathBuf,
    /// `None` picks the format from the file extension.
    pub format: Option<Format>,
    pub task: Task,
    pub text_field: String,
    pub label_field: String,
    /// Class names in index order (sequence classification only).
    pub labels: Vec<String>,
    pub unknown_labels: UnknownLabels,
    pub validation: Validation,
    pub max_sequence_length: usize,
    /// Keep a deterministic random subset of this many training (and validation) examples.
    pub max_samples: Option<usize>,
}

/// One row as read from a file, before labels are checked or text is tokenised.
#[derive(Debug, Clone, PartialEq)]
pub struct RawRow {
    /// 1-based line where the row starts, for error messages.
    pub line: u64,
    pub text: String,
    pub label: Option<String>,
}

/// One tokenised example; `label` is the class index (unused for causal LM).
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    pub ids: Vec<u32>,
    pub label: u32,
}

/// Tokenised training and validation examples plus what batching needs to know.
#[derive(Debug, Clone)]
pub struct Dataset {
    pub task: Task,
    pub train: Vec<Example>,
    pub validation: Vec<Example>,
    pub num_labels: usize,
    pub pad_id: u32,
}

/// Seeds the split and subset so that they stay fixed when `training.seed` changes.
const SPLIT_SEED: u64 = 0x5eed_da7a;

impl Dataset {
    /// Reads, labels, splits and tokenises the dataset with the model's `tokenizer.json`.
    pub fn load(config: &DataConfig, tokenizer_file: &Path) -> Result<Self> {
        let tokenizer = Tokenizer::from_file(tokenizer_file, config.max_sequence_length)?;
        let (train_rows, validation_rows) = labelled_split(config)?;
        Ok(Self {
            task: config.task,
            train: tokenizer.encode(train_rows)?,
            validation: tokenizer.encode(validation_rows)?,
            num_labels: config.labels.len(),
            pad_id: tokenizer.pad_id,
        })
    }
}

/// Rows after label checks, as (text, class index), split into training and validation.
pub type LabelledRows = Vec<(String, u32)>;

/// Reads the file(s), checks labels and splits: the part of loading that needs no tokenizer.
pub fn labelled_split(config: &DataConfig) -> Result<(LabelledRows, LabelledRows)> {
    check_config(config)?;
    let train = read_labelled(&config.path, config)?;
    let validation = match &config.validation {
        Validation::File(path) => Some(read_labelled(path, config)?),
        Validation::Fraction(_) => None,
    };
    Ok(split_examples(
        train,
        validation,
        &config.validation,
        config.max_samples,
    ))
}

/// Splits examples of any kind into training and validation: a separate validation file's rows
/// (`file_validation`), or a held-out share of `train`; both in a fixed shuffled order, then cut
/// to `max_samples`.
pub(crate) fn split_examples<T>(
    mut train: Vec<T>,
    file_validation: Option<Vec<T>>,
    validation: &Validation,
    max_samples: Option<usize>,
) -> (Vec<T>, Vec<T>) {
    shuffle_fixed(&mut train);
    let mut validation = match (file_validation, validation) {
        (Some(mut rows), _) => {
            shuffle_fixed(&mut rows);
            rows
        }
        (None, Validation::Fraction(fraction)) => {
            let held_out = (train.len() as f64 * fraction).round() as usize;
            let held_out = held_out.min(train.len().saturating_sub(1));
            train.split_off(train.len() - held_out)
        }
        (None, Validation::File(_)) => Vec::new(),
    };
    if let Some(max) = max_samples {
        train.truncate(max);
        validation.truncate(max);
    }
    (train, validation)
}

/// The class index of a label: its position in `labels`, or the label itself when it is a
/// number below the class count (data labelled 0, 1, …).
pub(crate) fn class_index(labels: &[String], label: &str) -> Option<usize> {
    labels
        .iter()
        .position(|l| l == label)
        .or_else(|| label.parse::<usize>().ok().filter(|&i| i < labels.len()))
}

fn check_config(config: &DataConfig) -> Result<()> {
    let bad = |field: &str, message: &str| Error::Config {
        field: field.to_string(),
        message: message.to_string(),
    };
    if config.task == Task::SequenceClassification && config.labels.len() < 2 {
        return Err(bad(
            "dataset.labels",
            "give at least two class names, in index order (e.g. [fresh, rotten])",
        ));
    }
    if let Validation::Fraction(f) = config.validation
        && !(0.0..1.0).contains(&f)
    {
        return Err(bad(
            "dataset.validationFraction",
            "must be at least 0 and below 1 (e.g. 0.1)",
        ));
    }
    if config.max_sequence_length < 2 {
        return Err(bad("dataset.maxSequenceLength", "must be at least 2"));
    }
    if config.max_samples == Some(0) {
        return Err(bad("dataset.maxSamples", "must be at least 1 when set"));
    }
    Ok(())
}

/// A fixed permutation, so that the split and the subset do not depend on file order or seed.
fn shuffle_fixed<T>(rows: &mut [T]) {
    rows.shuffle(&mut rand::rngs::StdRng::seed_from_u64(SPLIT_SEED));
}

fn read_labelled(path: &Path, config: &DataConfig) -> Result<LabelledRows> {
    let label_field = match config.task {
        Task::SequenceClassification => Some(config.label_field.as_str()),
        Task::CausalLm => None,
    };
    // Causal-LM text files have no fields; structured files name the text field.
    let fields = read::Fields {
        text: &config.text_field,
        label: label_field,
    };
    let rows = read::read_rows(path, config.format, &fields)?;
    let mut labelled = Vec::with_capacity(rows.len());
    for row in rows {
        let Some(label) = row.label else {
            labelled.push((row.text, 0));
            continue;
        };
        match class_index(&config.labels, &label) {
            Some(index) => labelled.push((row.text, index as u32)),
            None if config.unknown_labels == UnknownLabels::Skip => {}
            None => {
                return Err(Error::Data {
                    file: path.display().to_string(),
                    line: Some(row.line),
                    field: config.label_field.clone(),
                    message: format!(
                        "label '{label}' is not in dataset.labels {:?}; add it there or set dataset.unknownLabels: skip",
                        config.labels
                    ),
                });
            }
        }
    }
    if labelled.is_empty() {
        return Err(Error::Data {
            file: path.display().to_string(),
            line: None,
            field: config.label_field.clone(),
            message: format!("no row has a label in dataset.labels {:?}", config.labels),
        });
    }
    Ok(labelled)
}

/// The model's `tokenizer.json` (or the tokenizer a `.gguf` file carries), with its fixed padding
/// turned off (batches pad dynamically) and truncation to the job's maximum sequence length.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    pub pad_id: u32,
}

impl Tokenizer {
    pub fn from_file(path: &Path, max_sequence_length: usize) -> Result<Self> {
        let fail = |message: String| Error::Data {
            file: path.display().to_string(),
            line: None,
            field: "(tokenizer)".into(),
            message,
        };
        let mut inner = if path.extension().is_some_and(|e| e == "gguf") {
            crate::models::gguf::read_tokenizer(path)?
        } else {
            tokenizers::Tokenizer::from_file(path)
                .map_err(|e| fail(format!("not a usable tokenizer.json: {e}")))?
        };
        let pad_id = inner
            .get_padding()
            .map(|p| p.pad_id)
            .or_else(|| inner.token_to_id("[PAD]"))
            .or_else(|| inner.token_to_id("<pad>"))
            .unwrap_or(0);
        inner.with_padding(None);
        inner
            .with_truncation(Some(tokenizers::TruncationParams {
                max_length: max_sequence_length,
                ..Default::default()
            }))
            .map_err(|e| fail(format!("cannot truncate to {max_sequence_length}: {e}")))?;
        Ok(Self { inner, pad_id })
    }

    /// Tokenises texts (with the model's special tokens) into examples.
    pub fn encode(&self, rows: LabelledRows) -> Result<Vec<Example>> {
        let (texts, labels): (Vec<String>, Vec<u32>) = rows.into_iter().unzip();
        let encodings = self
            .inner
            .encode_batch(texts, true)
            .map_err(|e| Error::Data {
                file: "(tokenizer)".into(),
                line: None,
                field: "text".into(),
                message: format!("tokenisation failed: {e}"),
            })?;
        Ok(encodings
            .into_iter()
            .zip(labels)
            .map(|(encoding, label)| Example {
                ids: encoding.get_ids().to_vec(),
                label,
            })
            .collect())
    }
}
