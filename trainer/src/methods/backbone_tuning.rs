//! Methods that train a selection of the backbone's own tensors: full fine-tuning (all of them,
//! the memory baseline) and BitFit (the biases only; frozen linears give `dx` and save no inputs).

use candle_core::{Tensor, Var};
use petl_crds::{BitFitConfig, FullConfig};

use super::{Method, head::Head, make_trainable};
use crate::export::HeadFeatures;
use crate::init::Rng;
use crate::models::Backbone;
use crate::{Error, Result};

/// Full fine-tuning (`full`): every backbone tensor trains.
pub fn full(
    _: &FullConfig,
    backbone: Box<dyn Backbone>,
    num_labels: usize,
    seed: u64,
) -> Result<BackboneTuning> {
    BackboneTuning::new(backbone, Selection::All, num_labels, seed)
}

/// BitFit (`bitfit`): only the bias terms train.
pub fn bitfit(
    _: &BitFitConfig,
    backbone: Box<dyn Backbone>,
    num_labels: usize,
    seed: u64,
) -> Result<BackboneTuning> {
    BackboneTuning::new(backbone, Selection::Biases, num_labels, seed)
}

/// Which backbone tensors train.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Selection {
    /// Every weight, bias, norm and embedding table (`full`).
    All,
    /// The bias terms of linears and LayerNorm shifts (`bitfit`).
    Biases,
}

impl Selection {
    fn name(self) -> &'static str {
        match self {
            Self::All => "full",
            Self::Biases => "bitfit",
        }
    }

    fn what(self) -> &'static str {
        match self {
            Self::All => "trainable tensors",
            Self::Biases => "bias terms",
        }
    }

    fn picks(self, tensor_name: &str) -> bool {
        match self {
            Self::All => true,
            Self::Biases => tensor_name.ends_with(".bias"),
        }
    }
}

/// The backbone with the selected tensors trainable, under a classification head.
pub struct BackboneTuning {
    selection: Selection,
    backbone: Box<dyn Backbone>,
    params: Vec<(String, Var)>,
    head: Head,
}

impl BackboneTuning {
    pub fn new(
        mut backbone: Box<dyn Backbone>,
        selection: Selection,
        num_labels: usize,
        seed: u64,
    ) -> Result<Self> {
        if selection == Selection::All {
            let frozen = backbone.frozen_only();
            if let Some(first) = frozen.first() {
                return Err(Error::Config {
                    field: "spec.method.type".into(),
                    message: format!(
                        "full fine-tuning trains every weight, but {} of this backbone's are \
                         block-quantized ({first}, …) and cannot train; load it in f32 or \
                         choose lora, lst or head",
                        frozen.len()
                    ),
                });
            }
        }
        let params = backbone
            .parameters_mut()
            .into_iter()
            .filter(|(name, _)| selection.picks(name))
            .map(|(name, t)| Ok((name, make_trainable(t)?)))
            .collect::<Result<Vec<_>>>()?;
        if params.is_empty() {
            return Err(Error::Config {
                field: "spec.method.type".into(),
                message: format!(
                    "{} finds nothing to train: this backbone has no {}; choose lora, lst or head",
                    selection.name(),
                    selection.what()
                ),
            });
        }
        let mut rng = Rng::new(seed);
        let head = Head::over(backbone.as_ref(), num_labels, &mut rng)?;
        Ok(Self {
            selection,
            backbone,
            params,
            head,
        })
    }
}

impl Method for BackboneTuning {
    fn name(&self) -> &'static str {
        self.selection.name()
    }

    fn head_features(&self) -> HeadFeatures {
        HeadFeatures::Pooled(self.backbone.pooling())
    }

    fn parameters(&self) -> Vec<(String, Var)> {
        let mut p = self.params.clone();
        p.extend(self.head.parameters());
        p
    }

    fn forward(&self, input_ids: &Tensor, attention_mask: &Tensor) -> Result<Tensor> {
        self.head
            .classify(self.backbone.as_ref(), input_ids, attention_mask)
    }
}
