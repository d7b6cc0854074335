//! LoRA: a trainable low-rank update `(alpha / r) · B·A` beside each targeted frozen linear, named
//! as PEFT names it (`base_model.model.<module>.lora_A.weight`) so adapters load in PEFT.

use candle_core::{Tensor, Var};
use petl_crds::LoraConfig;

use super::{Method, head::Head};
use crate::export::HeadFeatures;
use crate::init::Rng;
use crate::models::Backbone;
use crate::nn::{Dropout, LoraDelta, StepSeed};
use crate::{Error, Result};

pub struct Lora {
    backbone: Box<dyn Backbone>,
    /// PEFT module path and its (A, B).
    adapters: Vec<(String, Var, Var)>,
    dropouts: Vec<Dropout>,
    head: Head,
}

impl Lora {
    pub fn new(
        config: &LoraConfig,
        mut backbone: Box<dyn Backbone>,
        num_labels: usize,
        seed: u64,
    ) -> Result<Self> {
        let rank = usize::try_from(config.rank)
            .ok()
            .filter(|r| *r >= 1)
            .ok_or_else(|| Error::Config {
                field: "spec.method.lora.rank".into(),
                message: format!(
                    "{} is not a rank; use an integer ≥ 1 such as 8",
                    config.rank
                ),
            })?;
        if !(0.0..1.0).contains(&config.dropout) {
            return Err(Error::Config {
                field: "spec.method.lora.dropout".into(),
                message: format!("{} is outside [0, 1); use for example 0.05", config.dropout),
            });
        }
        let mut rng = Rng::new(seed);
        let scale = config.alpha / rank as f64;
        let mut adapters = Vec::new();
        let mut dropouts = Vec::new();
        let (dtype, device) = (backbone.dtype(), backbone.device().clone());
        for (path, linear) in backbone.linears_mut() {
            let leaf = path.rsplit('.').next().unwrap_or(&path);
            if !config.target_modules.iter().any(|t| t == leaf) {
                continue;
            }
            let (out, inp) = (linear.out_features(), linear.in_features());
            // PEFT's init: A kaiming-uniform (a = √5), B zero, so training starts at the backbone.
            let a = Var::from_tensor(&rng.linear_weight(rank, inp, dtype, &device)?)?;
            let b = Var::from_tensor(&Tensor::zeros((out, rank), dtype, &device)?)?;
            let dropout = (config.dropout > 0.0).then(|| {
                Dropout::new(config.dropout, seed.wrapping_add(adapters.len() as u64 + 1))
            });
            dropouts.extend(dropout.clone());
            linear.set_lora(LoraDelta {
                a: a.as_tensor().clone(),
                b: b.as_tensor().clone(),
                scale,
                dropout,
            });
            adapters.push((path, a, b));
        }
        if adapters.is_empty() {
            return Err(Error::Config {
                field: "spec.method.lora.targetModules".into(),
                message: format!(
                    "{:?} matches no linear layer; this backbone has {}",
                    config.target_modules,
                    backbone.linear_names().join(", ")
                ),
            });
        }
        let head = Head::over(backbone.as_ref(), num_labels, &mut rng)?;
        Ok(Self {
            backbone,
            adapters,
            dropouts,
            head,
        })
    }
}

impl Method for Lora {
    fn name(&self) -> &'static str {
        "lora"
    }

    fn head_features(&self) -> HeadFeatures {
        HeadFeatures::Pooled(self.backbone.pooling())
    }

    fn parameters(&self) -> Vec<(String, Var)> {
        let mut p = Vec::new();
        for (path, a, b) in &self.adapters {
            p.push((format!("base_model.model.{path}.lora_A.weight"), a.clone()));
            p.push((format!("base_model.model.{path}.lora_B.weight"), b.clone()));
        }
        p.extend(self.head.parameters());
        p
    }

    fn forward(&self, input_ids: &Tensor, attention_mask: &Tensor) -> Result<Tensor> {
        self.head
            .classify(self.backbone.as_ref(), input_ids, attention_mask)
    }

    fn set_training(&self, training: bool) {
        for d in &self.dropouts {
            d.set_active(training);
        }
    }

    fn begin_step(&self, step: StepSeed) {
        for d in &self.dropouts {
            d.begin_step(step);
        }
    }
}
