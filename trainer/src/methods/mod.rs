//! Fine-tuning methods: each file turns a frozen backbone into trainable parameters and a forward
//! that builds only the graph its backward needs. This file holds the small trait they share and
//! the registry that maps each API method to its file. Methods see the backbone only through
//! [`Backbone`], so each runs on BERT, Llama and the ViT alike.

pub mod backbone_tuning;
pub mod head;
pub mod linear_probe;
pub mod lora;
pub mod lst;
pub mod r2;
pub(crate) mod r2_block;
pub mod sherl;
pub mod unipt;
pub mod vqt;

use candle_core::{Tensor, Var};
use petl_crds::{MethodConfig, MethodType};

use crate::Result;
use crate::export::HeadFeatures;
use crate::models::Backbone;
use crate::models::bert::Bert;
use crate::nn::StepSeed;
pub use backbone_tuning::{BackboneTuning, Selection};

/// One fine-tuning method bound to its backbone.
pub trait Method: Send {
    /// The method's name as written in `spec.method.type`.
    fn name(&self) -> &'static str;

    /// Every trainable tensor under a stable name (optimiser state and snapshots key on it).
    fn parameters(&self) -> Vec<(String, Var)>;

    /// Logits for a batch: `(B, C)` for sequence classification. Builds a graph only through
    /// what trains.
    fn forward(&self, input_ids: &Tensor, attention_mask: &Tensor) -> Result<Tensor>;

    /// Switches training-only behaviour (dropout) on or off.
    fn set_training(&self, _training: bool) {}

    /// Tells randomised layers (dropout) which step and examples the next forward trains on, so
    /// their draws depend on those alone.
    fn begin_step(&self, _step: StepSeed) {}

    /// The tensors an adapter file carries, under their published names (PEFT names for LoRA).
    fn exportable(&self) -> Vec<(String, Tensor)> {
        self.parameters()
            .into_iter()
            .map(|(n, v)| (n, v.as_tensor().detach()))
            .collect()
    }

    /// What the classification head reads, recorded in the adapter so a user knows what to
    /// compute before `classifier`.
    fn head_features(&self) -> HeadFeatures;

    /// Number of trainable scalars.
    fn trainable_parameters(&self) -> usize {
        self.parameters().iter().map(|(_, v)| v.elem_count()).sum()
    }
}

/// The registry: one line a method, from its `MethodType` (the API's table in `petl_crds`) to the
/// function in its file that builds it from its settings, a backbone, the number of labels and
/// a seed. The `match` it generates is exhaustive, so a method added to the API without a line
/// here does not compile.
macro_rules! registry {
    ($($variant:ident => $build:path),+ $(,)?) => {
        /// The methods the trainer builds, in registry order.
        pub const REGISTERED: &[MethodType] = &[$(MethodType::$variant),+];

        /// Builds the method `config` names on `backbone` with a `num_labels`-way
        /// classification head.
        pub fn build(
            config: &MethodConfig,
            backbone: Box<dyn Backbone>,
            num_labels: usize,
            seed: u64,
        ) -> Result<Box<dyn Method>> {
            Ok(match config {
                $(MethodConfig::$variant(c) => Box::new($build(c, backbone, num_labels, seed)?),)+
            })
        }
    };
}

registry! {
    Full => backbone_tuning::full,
    Lora => lora::Lora::new,
    Bitfit => backbone_tuning::bitfit,
    Lst => lst::Lst::new,
    Vqt => vqt::Vqt::new,
    Head => linear_probe::LinearProbe::new,
    Unipt => unipt::Unipt::new,
    R2 => r2::R2::new,
    Sherl => sherl::Sherl::new,
}

/// Builds the method `config` names on a BERT backbone ([`build`] with a boxed [`Bert`]).
pub fn for_bert(
    config: &MethodConfig,
    backbone: Bert,
    num_labels: usize,
    seed: u64,
) -> Result<Box<dyn Method>> {
    build(config, Box::new(backbone), num_labels, seed)
}

/// Makes `t` trainable: a `Var` copy replaces it in the model, and the `Var` is returned.
pub(crate) fn make_trainable(t: &mut Tensor) -> Result<Var> {
    let v = Var::from_tensor(t)?;
    *t = v.as_tensor().clone();
    Ok(v)
}
