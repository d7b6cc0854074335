//! Cuts examples into batches: a seeded shuffle per epoch, global batches of similar lengths,
//! one contiguous slice of each per rank, and padding to the longest sequence of a slice.

use candle_core::{Device, Tensor};
use rand::SeedableRng;
use rand::seq::SliceRandom;

use super::{Example, Task};
use crate::Result;

/// Batches per length-sorted window of an epoch (see [`Batcher::epoch_order`]).
pub const GROUP_BATCHES: usize = 32;

/// Causal-LM label positions that carry no loss (padding) hold this value.
pub const IGNORE_INDEX: u32 = u32::MAX;

/// A padded batch.
///
/// - `input_ids`: (B, T) u32, padded with the tokenizer's pad id;
/// - `attention_mask`: (B, T) u32, 1 for a real token, 0 for padding;
/// - `labels`: (B,) u32 class indices for sequence classification; for causal LM (B, T) u32
///   equal to `input_ids` (not shifted: the loss predicts position t+1 from t) with
///   [`IGNORE_INDEX`] at padding positions.
#[derive(Debug, Clone)]
pub struct Batch {
    pub input_ids: Tensor,
    pub attention_mask: Tensor,
    pub labels: Tensor,
}

impl Batch {
    /// The number of sequences in the batch.
    pub fn len(&self) -> usize {
        self.input_ids.dims().first().copied().unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Pads `examples` to the longest one and stacks them.
    pub fn pad(examples: &[&Example], task: Task, pad_id: u32, device: &Device) -> Result<Self> {
        let rows = examples.len();
        let width = examples
            .iter()
            .map(|e| e.ids.len())
            .max()
            .unwrap_or(0)
            .max(1);
        let mut ids = Vec::with_capacity(rows * width);
        let mut mask = Vec::with_capacity(rows * width);
        let mut token_labels = Vec::with_capacity(rows * width);
        for example in examples {
            let padding = width - example.ids.len();
            ids.extend_from_slice(&example.ids);
            ids.extend(std::iter::repeat_n(pad_id, padding));
            mask.extend(std::iter::repeat_n(1u32, example.ids.len()));
            mask.extend(std::iter::repeat_n(0u32, padding));
            if task == Task::CausalLm {
                token_labels.extend_from_slice(&example.ids);
                token_labels.extend(std::iter::repeat_n(IGNORE_INDEX, padding));
            }
        }
        let labels = match task {
            Task::SequenceClassification => {
                let labels: Vec<u32> = examples.iter().map(|e| e.label).collect();
                Tensor::from_vec(labels, rows, device)?
            }
            Task::CausalLm => Tensor::from_vec(token_labels, (rows, width), device)?,
        };
        Ok(Self {
            input_ids: Tensor::from_vec(ids, (rows, width), device)?,
            attention_mask: Tensor::from_vec(mask, (rows, width), device)?,
            labels,
        })
    }
}

/// Deterministic batches for one rank of a data-parallel job.
///
/// `batch_size` is the *global* batch: step `s` of epoch `e` trains on the same `batch_size`
/// examples whatever the world size, and rank `r` of `w` takes the contiguous slice
/// `[r·b/w, (r+1)·b/w)` of it. Epoch `e` visits a permutation seeded by `seed + e`, cut into
/// `⌊n / batch_size⌋` full batches (the remainder waits for another epoch's shuffle), so every
/// step has a full batch on every rank. A batch is addressed by (epoch, index), so a restored
/// rank resumes from a cursor without replaying the data.
#[derive(Debug, Clone)]
pub struct Batcher<'a> {
    examples: &'a [Example],
    task: Task,
    pad_id: u32,
    batch_size: usize,
    seed: u64,
    rank: usize,
    world_size: usize,
}

impl<'a> Batcher<'a> {
    pub fn new(
        examples: &'a [Example],
        task: Task,
        pad_id: u32,
        batch_size: usize,
        seed: u64,
        rank: usize,
        world_size: usize,
    ) -> Result<Self> {
        let bad = |field: &str, message: String| crate::Error::Config {
            field: field.to_string(),
            message,
        };
        if batch_size == 0 {
            return Err(bad("training.batchSize", "must be at least 1".into()));
        }
        if world_size == 0 || rank >= world_size {
            return Err(bad(
                "rank",
                format!(
                    "rank {rank} is outside a world of {world_size} (set PETL_RANK < PETL_WORLD_SIZE)"
                ),
            ));
        }
        if !batch_size.is_multiple_of(world_size) {
            return Err(bad(
                "spec.training.batchSize",
                format!(
                    "the global batch of {batch_size} does not split evenly over spec.workers.replicas = {world_size}; make batchSize a multiple of replicas (e.g. {})",
                    batch_size.div_ceil(world_size) * world_size
                ),
            ));
        }
        if examples.len() < batch_size {
            return Err(bad(
                "spec.training.batchSize",
                format!(
                    "{} training examples cannot fill one batch of {batch_size}; lower batchSize or add rows",
                    examples.len()
                ),
            ));
        }
        Ok(Self {
            examples,
            task,
            pad_id,
            batch_size,
            seed,
            rank,
            world_size,
        })
    }

    /// Full global batches per epoch.
    pub fn batches_per_epoch(&self) -> usize {
        self.examples.len() / self.batch_size
    }

    /// Examples of each global batch this rank trains on.
    pub fn rank_batch_size(&self) -> usize {
        self.batch_size / self.world_size
    }

    /// Position in the global batch of this rank's first example.
    pub fn first_example(&self) -> usize {
        self.rank * self.rank_batch_size()
    }

    /// The example indices of `epoch`'s global batches, in visiting order (batch `k` is
    /// `[k·b, (k+1)·b)`).
    ///
    /// After the seeded shuffle, each window of [`GROUP_BATCHES`] batches is sorted by length,
    /// cut into batches, and those batches are shuffled again: a batch then holds sequences of
    /// similar length, so padding (which costs as much compute as real tokens) nearly vanishes,
    /// while which examples share a window, and the order of the batches, stay random.
    pub fn epoch_order(&self, epoch: u64) -> Vec<usize> {
        let mut order: Vec<usize> = (0..self.examples.len()).collect();
        let mut rng = rand::rngs::StdRng::seed_from_u64(self.seed.wrapping_add(epoch));
        order.shuffle(&mut rng);
        order.truncate(self.batches_per_epoch() * self.batch_size);
        let mut grouped = Vec::with_capacity(order.len());
        for window in order.chunks(self.batch_size * GROUP_BATCHES) {
            let mut window = window.to_vec();
            window.sort_by_key(|&i| self.examples[i].ids.len());
            let mut batches: Vec<&[usize]> = window.chunks(self.batch_size).collect();
            batches.shuffle(&mut rng);
            grouped.extend(batches.into_iter().flatten().copied());
        }
        grouped
    }

    /// This rank's slice of global batch `index` of `epoch`.
    pub fn batch(&self, epoch: u64, index: usize, device: &Device) -> Result<Batch> {
        let order = self.epoch_order(epoch);
        Batch::pad(&self.slice(&order, index), self.task, self.pad_id, device)
    }

    /// The examples of this rank's slice of global batch `index` in `order`.
    fn slice(&self, order: &[usize], index: usize) -> Vec<&Example> {
        let start = (index * self.batch_size + self.first_example()).min(order.len());
        let end = (start + self.rank_batch_size()).min(order.len());
        order[start..end]
            .iter()
            .map(|&i| &self.examples[i])
            .collect()
    }

    /// This rank's slice of every batch of `epoch`, in order.
    pub fn epoch(&self, epoch: u64, device: &Device) -> impl Iterator<Item = Result<Batch>> + '_ {
        let order = self.epoch_order(epoch);
        let device = device.clone();
        (0..self.batches_per_epoch()).map(move |index| {
            Batch::pad(&self.slice(&order, index), self.task, self.pad_id, &device)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn examples(n: usize) -> Vec<Example> {
        (0..n)
            .map(|i| Example {
                ids: vec![101; 1 + i % 5],
                label: (i % 2) as u32,
            })
            .collect()
    }

    #[test]
    fn pads_each_batch_to_its_longest_sequence() {
        let data = [
            Example {
                ids: vec![5, 6, 7],
                label: 1,
            },
            Example {
                ids: vec![8],
                label: 0,
            },
        ];
        let refs: Vec<&Example> = data.iter().collect();
        let batch = Batch::pad(&refs, Task::SequenceClassification, 0, &Device::Cpu).unwrap();
        assert_eq!(
            batch.input_ids.to_vec2::<u32>().unwrap(),
            [[5, 6, 7], [8, 0, 0]]
        );
        assert_eq!(
            batch.attention_mask.to_vec2::<u32>().unwrap(),
            [[1, 1, 1], [1, 0, 0]]
        );
        assert_eq!(batch.labels.to_vec1::<u32>().unwrap(), [1, 0]);
        let lm = Batch::pad(&refs, Task::CausalLm, 0, &Device::Cpu).unwrap();
        assert_eq!(
            lm.labels.to_vec2::<u32>().unwrap(),
            [[5, 6, 7], [8, IGNORE_INDEX, IGNORE_INDEX]]
        );
    }

    fn ids(batch: &Batch) -> Vec<Vec<u32>> {
        batch.input_ids.to_vec2::<u32>().unwrap()
    }

    /// Examples whose ids identify them: example `i` is `[i, i, …]` of length `1 + i % 5`.
    fn numbered(n: usize) -> Vec<Example> {
        (0..n)
            .map(|i| Example {
                ids: vec![i as u32 + 1; 1 + i % 5],
                label: (i % 2) as u32,
            })
            .collect()
    }

    #[test]
    fn every_world_size_splits_the_same_global_batches_into_contiguous_slices() {
        let data = numbered(103);
        let one = Batcher::new(&data, Task::SequenceClassification, 0, 8, 7, 0, 1).unwrap();
        assert_eq!(one.batches_per_epoch(), 12);
        for world in [2, 4] {
            for index in [0, 5, 11] {
                let whole: Vec<u32> = ids(&one.batch(3, index, &Device::Cpu).unwrap())
                    .iter()
                    .map(|row| row[0])
                    .collect();
                let mut joined = Vec::new();
                for rank in 0..world {
                    let b = Batcher::new(&data, Task::SequenceClassification, 0, 8, 7, rank, world)
                        .unwrap();
                    assert_eq!(b.batches_per_epoch(), 12);
                    assert_eq!(b.first_example(), rank * 8 / world);
                    let slice = b.batch(3, index, &Device::Cpu).unwrap();
                    assert_eq!(slice.len(), 8 / world);
                    joined.extend(ids(&slice).iter().map(|row| row[0]));
                }
                assert_eq!(joined, whole, "world {world}, batch {index}");
            }
        }
    }

    #[test]
    fn an_epoch_visits_distinct_examples_in_full_batches() {
        let data = examples(103);
        let order = Batcher::new(&data, Task::SequenceClassification, 0, 8, 7, 0, 1)
            .unwrap()
            .epoch_order(3);
        assert_eq!(order.len(), 96);
        let mut all = order.clone();
        all.sort_unstable();
        all.dedup();
        assert_eq!(all.len(), 96);
    }

    #[test]
    fn a_batch_that_does_not_split_over_the_ranks_is_refused_naming_both_fields() {
        let data = examples(40);
        let err = Batcher::new(&data, Task::SequenceClassification, 0, 10, 0, 0, 4).unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("batchSize") && text.contains("replicas") && text.contains("12"),
            "{text}"
        );
        let err = Batcher::new(&data, Task::SequenceClassification, 0, 64, 0, 0, 1).unwrap_err();
        assert!(err.to_string().contains("40 training examples"), "{err}");
    }

    #[test]
    fn shuffle_is_fixed_by_seed_and_epoch() {
        let data = examples(50);
        let batcher =
            |seed| Batcher::new(&data, Task::SequenceClassification, 0, 8, seed, 0, 1).unwrap();
        assert_eq!(batcher(1).epoch_order(0), batcher(1).epoch_order(0));
        assert_ne!(batcher(1).epoch_order(0), batcher(2).epoch_order(0));
        assert_ne!(batcher(1).epoch_order(0), batcher(1).epoch_order(1));
    }

    #[test]
    fn addressed_batch_equals_the_iterated_one() {
        let data = examples(30);
        let batcher = Batcher::new(&data, Task::SequenceClassification, 0, 8, 3, 1, 2).unwrap();
        let iterated: Vec<Batch> = batcher.epoch(2, &Device::Cpu).map(Result::unwrap).collect();
        assert_eq!(iterated.len(), batcher.batches_per_epoch());
        assert_eq!(iterated.len(), 3);
        assert!(iterated.iter().all(|b| b.len() == 4));
        let addressed = batcher.batch(2, 1, &Device::Cpu).unwrap();
        assert_eq!(ids(&addressed), ids(&iterated[1]));
    }

    #[test]
    fn batches_group_similar_lengths_and_still_visit_every_example_once() {
        let data: Vec<Example> = (0..1000)
            .map(|i| Example {
                ids: vec![101; 1 + (i * 37) % 60],
                label: 0,
            })
            .collect();
        let batcher = Batcher::new(&data, Task::SequenceClassification, 0, 16, 5, 0, 1).unwrap();
        let order = batcher.epoch_order(0);
        let mut seen = order.clone();
        seen.sort_unstable();
        seen.dedup();
        assert_eq!(seen.len(), 992);
        let padded: usize = order
            .chunks(16)
            .map(|b| b.len() * b.iter().map(|&i| data[i].ids.len()).max().unwrap())
            .sum();
        let real: usize = order.iter().map(|&i| data[i].ids.len()).sum();
        // Random batches of 16 from lengths 1..60 pad to ~57 on average (~1.9x the real tokens).
        assert!(
            (padded as f64) < 1.15 * real as f64,
            "padded {padded} vs {real}"
        );
        let first_lengths: Vec<usize> = (0..4).map(|k| data[order[k * 16]].ids.len()).collect();
        assert!(
            first_lengths.windows(2).any(|w| w[1] < w[0]),
            "batches are not in length order: {first_lengths:?}"
        );
    }

    #[test]
    fn rank_outside_the_world_is_a_clear_error() {
        let data = examples(10);
        let err = Batcher::new(&data, Task::CausalLm, 0, 2, 0, 2, 2).unwrap_err();
        assert!(err.to_string().contains("PETL_RANK"), "{err}");
    }
}
