//! The loop's peak-memory numbers without the counting allocator (this test binary does not
//! install it): every step reports the process's peak RSS, never 0, and the report holds the max.

use candle_core::{DType, Device, Tensor};
use petl_crds::{LstConfig, MethodConfig};
use petl_trainer::data::Batch;
use petl_trainer::memory::{self, Source};
use petl_trainer::methods;
use petl_trainer::models::bert::{Bert, Config};
use petl_trainer::train::{Observer, StepInfo, TrainConfig, Trainer};

struct Peaks(Vec<usize>);

impl Observer for Peaks {
    fn on_step(&mut self, info: &StepInfo, _: &mut Trainer) -> petl_trainer::Result<()> {
        self.0.push(info.peak_memory_bytes);
        Ok(())
    }
}

#[test]
fn every_step_reports_a_nonzero_peak_and_the_report_keeps_the_largest() {
    assert_eq!(memory::source(&Device::Cpu), Source::Rss);
    let config = Config::with_shape(50, 32, 2, 4, 64, 16);
    let bert = Bert::random(config, 1, DType::F32, &Device::Cpu).unwrap();
    let method = methods::for_bert(
        &MethodConfig::Lst(LstConfig {
            reduction: 4,
            ..Default::default()
        }),
        bert,
        2,
        1,
    )
    .unwrap();
    let batch = Batch {
        input_ids: Tensor::from_vec((0..32u32).map(|i| i % 50).collect(), (4, 8), &Device::Cpu)
            .unwrap(),
        attention_mask: Tensor::ones((4, 8), DType::U32, &Device::Cpu).unwrap(),
        labels: Tensor::from_vec(vec![0u32, 1, 0, 1], 4, &Device::Cpu).unwrap(),
    };
    let mut trainer = Trainer::new(method, TrainConfig::fixed_steps(3, 1e-3, 1));
    let mut peaks = Peaks(Vec::new());
    let report = trainer
        .fit(&vec![batch], &[], &mut peaks)
        .expect("three steps train");
    assert_eq!(peaks.0.len(), 3);
    assert!(peaks.0.iter().all(|&p| p > 0), "{:?}", peaks.0);
    assert_eq!(report.peak_memory_bytes, *peaks.0.iter().max().unwrap());
}
