//! Picks the in-memory block format of the frozen SmolLM2-135M weights by measuring: the file's
//! Q4_1 kept as is, re-quantised to Q8_0 or Q4K at load, and dense f32, on the same tokens.
//!
//! Per format: load time, weight bytes, heap after load, untracked forward time, one LoRA
//! training step (fwd + bwd) with its heap peak, and the logit error against the f32 copy of the
//! file's weights.

use std::time::Instant;

use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device, Tensor, Var};
use clap::Parser;
use petl_trainer::memory::{self, CountingAllocator};
use petl_trainer::models::gguf::{self, FrozenFormat};
use petl_trainer::models::llama::Llama;
use petl_trainer::nn::LoraDelta;

#[global_allocator]
static ALLOC: CountingAllocator = CountingAllocator;

#[derive(Parser, Debug)]
#[command(about = "SmolLM2-135M: Q4_1 as stored vs Q8_0 / Q4K / f32 in memory")]
struct Args {
    #[arg(long, default_value_t = 4)]
    batch: usize,
    #[arg(long, default_value_t = 64)]
    seq: usize,
    /// Timed repetitions (the median is reported).
    #[arg(long, default_value_t = 3)]
    reps: usize,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn mib(b: usize) -> f64 {
    b as f64 / (1024.0 * 1024.0)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let path = gguf::smollm2_path();
    let dev = Device::Cpu;
    // Token ids from the model's own tokenizer: a real English passage, repeated to fill T.
    let (_, tok) = Llama::from_gguf(&path, FrozenFormat::AsStored, &dev)?;
    let text = "The capital of France is Paris. It is known for the Eiffel Tower, its museums, \
                its cafés and the river Seine, which flows through the heart of the city. ";
    let one = tok
        .encode(text, false)
        .map_err(|e| e.to_string())?
        .get_ids()
        .to_vec();
    let ids: Vec<u32> = one
        .iter()
        .copied()
        .cycle()
        .take(args.batch * args.seq)
        .collect();
    let ids = Tensor::from_vec(ids, (args.batch, args.seq), &dev)?;
    drop(tok);

    let formats = [
        ("F32 (dequantised)", FrozenFormat::F32),
        ("Q4_1 (as stored)", FrozenFormat::AsStored),
        ("Q8_0", FrozenFormat::Requantize(GgmlDType::Q8_0)),
        (
            "Q4K (+Q8_0 where rows ≠ 256k)",
            FrozenFormat::Requantize(GgmlDType::Q4K),
        ),
    ];
    println!(
        "SmolLM2-135M-Instruct, batch {} × {} tokens, median of {} runs, {} threads",
        args.batch,
        args.seq,
        args.reps,
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    );
    println!(
        "{:<30} {:>7} {:>10} {:>10} {:>9} {:>10} {:>13} {:>11}",
        "format",
        "load s",
        "weights MiB",
        "heap MiB",
        "fwd s",
        "LoRA step s",
        "step peak MiB",
        "logit err"
    );
    let mut reference: Option<Tensor> = None;
    for (name, format) in formats {
        let before = memory::current_bytes();
        let start = Instant::now();
        let (mut model, _) = Llama::from_gguf(&path, format, &dev)?;
        let load = start.elapsed().as_secs_f64();
        let heap = memory::current_bytes().saturating_sub(before);
        let weights: usize = model.weight_bytes().values().sum();

        let mut fwd = Vec::new();
        let mut logits = None;
        for _ in 0..args.reps {
            let start = Instant::now();
            let l = model.forward(&ids, None)?;
            fwd.push(start.elapsed().as_secs_f64());
            logits = Some(l);
        }
        let logits = logits.ok_or("no repetitions")?;
        let err = match &reference {
            None => {
                reference = Some(logits.clone());
                0.0
            }
            Some(r) => {
                let d = (&logits - r)?.sqr()?.sum_all()?.to_scalar::<f32>()?.sqrt();
                d / r.sqr()?.sum_all()?.to_scalar::<f32>()?.sqrt()
            }
        };

        // LoRA r=8 on q_proj and v_proj, as a PEFT default run would train it.
        let mut vars = Vec::new();
        for proj in model.projections_mut() {
            if proj.name.ends_with("q_proj") || proj.name.ends_with("v_proj") {
                let (i, o) = (proj.in_features(), proj.out_features());
                let a = Var::from_tensor(&(Tensor::ones((8, i), DType::F32, &dev)? * 0.01)?)?;
                let b = Var::from_tensor(&(Tensor::ones((o, 8), DType::F32, &dev)? * 0.01)?)?;
                proj.lora = Some(LoraDelta {
                    a: a.as_tensor().clone(),
                    b: b.as_tensor().clone(),
                    scale: 2.0,
                    dropout: None,
                });
                vars.push((a, b));
            }
        }
        let mut steps = Vec::new();
        let mut peak = 0;
        for _ in 0..args.reps {
            let base = memory::current_bytes();
            memory::reset_peak();
            let start = Instant::now();
            let loss = model.causal_lm_loss(&ids, None)?;
            let grads = loss.backward()?;
            drop((loss, grads));
            steps.push(start.elapsed().as_secs_f64());
            peak = memory::peak_bytes().saturating_sub(base);
        }
        println!(
            "{:<30} {:>7.2} {:>10.1} {:>10.1} {:>9.3} {:>10.3} {:>13.1} {:>11.2e}",
            name,
            load,
            mib(weights),
            mib(heap),
            median(fwd),
            median(steps),
            mib(peak),
            err
        );
    }
    Ok(())
}
