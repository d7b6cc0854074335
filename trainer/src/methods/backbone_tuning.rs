//! Methods that train a selection of the backbone's own tensors: full fine-tuning (all of them,
//! the memory baseline) and BitFit (the biases only; frozen linears give `dx` and save no inputs).

use candle_core::{Tensor, Var};
use petl_crds::{BitFitConfig, FullConfig};

use super::{Method, head::Head, make_trainable};
use crate::Result;
use crate::init::Rng;
use crate::models::bert::Bert;

/// Full fine-tuning (`full`): every backbone tensor trains.
pub fn full(
    _: &FullConfig,
    backbone: Bert,
    num_labels: usize,
    seed: u64,
) -> Result<BackboneTuning> {
    BackboneTuning::new(backbone, Selection::All, num_labels, seed)
}

/// BitFit (`bitfit`): only the bias terms train.
pub fn bitfit(
    _: &BitFitConfig,
    backbone: Bert,
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
    backbone: Bert,
    params: Vec<(String, Var)>,
    head: Head,
}

impl BackboneTuning {
    pub fn new(
        mut backbone: Bert,
        selection: Selection,
        num_labels: usize,
        seed: u64,
    ) -> Result<Self> {
        let params = backbone
            .parameters_mut()
            .into_iter()
            .filter(|(name, _)| selection.picks(name))
            .map(|(name, t)| Ok((name, make_trainable(t)?)))
            .collect::<Result<Vec<_>>>()?;
        let mut rng = Rng::new(seed);
        let head = Head::over(&backbone, num_labels, &mut rng)?;
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

    fn parameters(&self) -> Vec<(String, Var)> {
        let mut p = self.params.clone();
        p.extend(self.head.parameters());
        p
    }

    fn forward(&self, input_ids: &Tensor, attention_mask: &Tensor) -> Result<Tensor> {
        let h = self.backbone.forward(input_ids, attention_mask)?;
        self.head.forward(&h, attention_mask)
    }
}
