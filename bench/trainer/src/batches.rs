//! The token batches both sides train and validate on: tokenised and padded once by the trainer's
//! own data path, written to a JSON file, and read back by every child (ours and the peer).

use std::path::Path;

use anyhow::{Context, Result, bail};
use candle_core::{Device, Tensor};
use petl_trainer::data::{Batch, DataConfig, Dataset, Example, Task, UnknownLabels, Validation};
use serde::{Deserialize, Serialize};

/// What to cut from the dataset: `steps` training batches of `batch` rows and `valid` rows to score.
pub struct Budget {
    pub steps: usize,
    pub batch: usize,
    pub seq: usize,
    pub valid: usize,
}

/// How many training and validation examples a budget of `steps` batches of `batch` takes
/// from a split of `train` and `validation` examples (`what` names them in the error).
pub fn split_counts(
    train: usize,
    validation: usize,
    steps: usize,
    batch: usize,
    valid: usize,
    what: &str,
) -> Result<(usize, usize)> {
    let need = steps * batch;
    if train < need {
        bail!(
            "{train} training {what}, {need} needed for --steps {steps} --batch {batch}: lower one of them"
        );
    }
    Ok((need, valid.min(validation)))
}

/// The batches file's content; `peer.py` reads the same fields.
#[derive(Serialize, Deserialize)]
pub struct Batches {
    pub num_labels: usize,
    pub train: Vec<RawBatch>,
    pub valid: Vec<RawBatch>,
}

/// One padded batch, exactly as the trainer's batcher builds it.
#[derive(Serialize, Deserialize)]
pub struct RawBatch {
    pub input_ids: Vec<Vec<u32>>,
    pub attention_mask: Vec<Vec<u32>>,
    pub labels: Vec<u32>,
}

impl Batches {
    /// The first `steps × batch` training examples and the first `valid` validation examples of
    /// the job's split (the split is a fixed shuffle, so these are a random sample of both).
    pub fn from_dataset(model: &Path, data: &Path, budget: &Budget) -> Result<Self> {
        let config = DataConfig {
            path: data.to_path_buf(),
            format: None,
            task: Task::SequenceClassification,
            text_field: "text".into(),
            label_field: "category".into(),
            labels: vec!["fresh".into(), "rotten".into()],
            // The file also holds `plot` synopses, which are not reviews.
            unknown_labels: UnknownLabels::Skip,
            validation: Validation::Fraction(0.1),
            max_sequence_length: budget.seq,
            max_samples: None,
        };
        let dataset = Dataset::load(&config, &model.join("tokenizer.json"))
            .with_context(|| format!("loading {}", data.display()))?;
        let (need, valid) = split_counts(
            dataset.train.len(),
            dataset.validation.len(),
            budget.steps,
            budget.batch,
            budget.valid,
            "examples",
        )?;
        Ok(Self {
            num_labels: dataset.num_labels,
            train: pad_all(&dataset.train[..need], budget.batch, dataset.pad_id)?,
            valid: pad_all(&dataset.validation[..valid], budget.batch, dataset.pad_id)?,
        })
    }

    pub fn write(&self, path: &Path) -> Result<()> {
        std::fs::write(path, serde_json::to_vec(self)?)
            .with_context(|| format!("writing {}", path.display()))
    }

    pub fn read(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        serde_json::from_slice(&bytes).with_context(|| format!("parsing {}", path.display()))
    }

    /// Training and validation batches as the trainer's tensors.
    pub fn to_candle(&self) -> Result<(Vec<Batch>, Vec<Batch>)> {
        let convert = |raw: &[RawBatch]| -> Result<Vec<Batch>> {
            raw.iter().map(RawBatch::to_candle).collect()
        };
        Ok((convert(&self.train)?, convert(&self.valid)?))
    }
}

fn pad_all(examples: &[Example], batch: usize, pad_id: u32) -> Result<Vec<RawBatch>> {
    examples
        .chunks(batch)
        .map(|chunk| {
            let refs: Vec<&Example> = chunk.iter().collect();
            let b = Batch::pad(&refs, Task::SequenceClassification, pad_id, &Device::Cpu)?;
            Ok(RawBatch {
                input_ids: b.input_ids.to_vec2()?,
                attention_mask: b.attention_mask.to_vec2()?,
                labels: b.labels.to_vec1()?,
            })
        })
        .collect()
}

impl RawBatch {
    fn to_candle(&self) -> Result<Batch> {
        let rows = self.input_ids.len();
        let width = self.input_ids.first().map_or(0, Vec::len);
        let flat = |v: &[Vec<u32>]| v.iter().flatten().copied().collect::<Vec<u32>>();
        Ok(Batch {
            input_ids: Tensor::from_vec(flat(&self.input_ids), (rows, width), &Device::Cpu)?,
            attention_mask: Tensor::from_vec(
                flat(&self.attention_mask),
                (rows, width),
                &Device::Cpu,
            )?,
            labels: Tensor::from_vec(self.labels.clone(), rows, &Device::Cpu)?,
        })
    }
}
