//! BitFit: only the bias terms (linear and LayerNorm shifts) train; the backward still runs
//! through every layer, but frozen linears give `dx` only and save no inputs.

use candle_core::{Tensor, Var};

use super::{Method, head::Head, make_trainable};
use crate::Result;
use crate::init::Rng;
use crate::models::bert::Bert;

pub struct BitFit {
    backbone: Bert,
    params: Vec<(String, Var)>,
    head: Head,
}

impl BitFit {
    pub fn new(mut backbone: Bert, num_labels: usize, seed: u64) -> Result<Self> {
        let params = backbone
            .parameters_mut()
            .into_iter()
            .filter(|(name, _)| name.ends_with(".bias"))
            .map(|(name, t)| Ok((name, make_trainable(t)?)))
            .collect::<Result<Vec<_>>>()?;
        let mut rng = Rng::new(seed);
        let head = Head::new(
            backbone.hidden_size(),
            num_labels,
            &backbone.embeddings.word,
            &mut rng,
        )?;
        Ok(Self {
            backbone,
            params,
            head,
        })
    }
}

impl Method for BitFit {
    fn name(&self) -> &'static str {
        "bitfit"
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
