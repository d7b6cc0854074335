//! What a method sees of a pretrained model: its shape, its taps (the hidden state after every
//! layer, from a forward that builds no graph), the forward a classifier reads and how it is
//! pooled, and the tensors and linears a method may make trainable. Methods are written against
//! this trait, so each runs on every backbone that implements it.

use candle_core::{DType, Device, Tensor};

use crate::models::bert;
use crate::nn::{self, LoraDelta};
use crate::tape;
use crate::{Error, Result};

/// A backbone's widths and depth: what side networks size themselves by.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Shape {
    pub hidden_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub intermediate_size: usize,
    pub norm_eps: f64,
}

/// A frozen pretrained model, as fine-tuning methods use it.
///
/// Inputs are token ids `(B, T)` and a 0/1 attention mask `(B, T)` whose real tokens come first
/// in every row (right padding, as `data::Batch` pads); a vision backbone takes normalised pixels
/// `(B, C, H, W)` in place of the ids (as `data::image::ImageBatches` carries them) and does not
/// read the mask. Methods pool and attend with [`Backbone::token_mask`], never with the input's
/// mask directly.
pub trait Backbone: Send {
    /// The backbone's widths and depth, read from its configuration.
    fn shape(&self) -> Shape;

    /// Width `d` of the hidden states.
    fn hidden_size(&self) -> usize {
        self.shape().hidden_size
    }

    /// Number of blocks `L`; [`Backbone::taps`] returns `L + 1` states.
    fn num_layers(&self) -> usize {
        self.shape().num_layers
    }

    /// Attention heads per block (a side network keeps the count when its width allows).
    fn num_heads(&self) -> usize {
        self.shape().num_heads
    }

    /// Width of a block's MLP.
    fn intermediate_size(&self) -> usize {
        self.shape().intermediate_size
    }

    /// The ε of the backbone's normalisation layers (side networks reuse it).
    fn norm_eps(&self) -> f64 {
        self.shape().norm_eps
    }

    /// The dtype trainable tensors are created in.
    fn dtype(&self) -> DType;

    fn device(&self) -> &Device;

    /// The `L + 1` hidden states `(B, T, d)`: the embeddings' output, then each block's output.
    /// Built without a graph (each state detached): what side networks and ladders read.
    fn taps(&self, input_ids: &Tensor, attention_mask: &Tensor) -> Result<Vec<Tensor>> {
        self.taps_through(input_ids, attention_mask, self.num_layers())
    }

    /// The first `blocks + 1` of [`Backbone::taps`]: the embeddings' output, then the outputs of
    /// blocks `0..blocks`; the later blocks are not run. A method that re-runs the last blocks
    /// itself (SHERL's late route) reads only the taps before them.
    fn taps_through(
        &self,
        input_ids: &Tensor,
        attention_mask: &Tensor,
        blocks: usize,
    ) -> Result<Vec<Tensor>>;

    /// The final hidden states `(B, T, d)` a classifier reads (after the final norm where the
    /// architecture has one), tracked wherever something in the backbone trains.
    fn forward(&self, input_ids: &Tensor, attention_mask: &Tensor) -> Result<Tensor>;

    /// How a classifier reduces [`Backbone::forward`]'s sequence to one vector per example.
    fn pooling(&self) -> Pooling;

    /// The 0/1 mask `(B, T)` over the positions of the states [`Backbone::taps`] and
    /// [`Backbone::forward`] return: what heads pool over and side networks attend to. A text
    /// backbone's states are its tokens, so this is the input's mask; a ViT's are [CLS] and the
    /// patch tokens, all real.
    fn token_mask(&self, _input: &Tensor, attention_mask: &Tensor) -> Result<Tensor> {
        Ok(attention_mask.clone())
    }

    /// Every linear LoRA may adapt, under its PEFT module path
    /// (`encoder.layer.0.attention.self.query`, `model.layers.0.self_attn.q_proj`).
    fn linears_mut(&mut self) -> Vec<(String, &mut dyn LoraSite)>;

    /// Every tensor a method may make trainable, under its checkpoint name. Tensors that cannot
    /// train (block-quantized weights) are not in it; [`Backbone::frozen_only`] names them.
    fn parameters_mut(&mut self) -> Vec<(String, &mut Tensor)>;

    /// Checkpoint names of the tensors that can never train here (block-quantized weights).
    fn frozen_only(&self) -> Vec<String> {
        Vec::new()
    }

    /// The blocks, when they are post-LayerNorm encoder blocks of the architecture side networks
    /// are built from ([`bert::Layer`]): LST's pruned initialisation copies from them. `None`
    /// for other architectures.
    fn encoder_layers(&self) -> Option<&[bert::Layer]> {
        None
    }

    /// [`Backbone::forward`]'s states computed from the last of [`Backbone::taps`] (the final
    /// norm where the architecture has one), so a method holding the taps need not run the
    /// backbone again.
    fn output_from_tap(&self, last: &Tensor) -> Result<Tensor>;

    /// Runs block `layer` on extra query tokens `queries` `(B, q, d)` that read the block's input
    /// `tokens` `(B, T, d)` (its tap) as keys and values, `bias` from [`nn::attention_bias`]
    /// over [`Backbone::token_mask`]. The tokens are detached and never read the queries, so the
    /// backbone's own states are unchanged and only the queries' path is tracked (VQT).
    fn query_block(
        &self,
        _layer: usize,
        _queries: &Tensor,
        _tokens: &Tensor,
        _bias: &Tensor,
    ) -> Result<Tensor> {
        let name = std::any::type_name::<Self>();
        Err(Error::NoQueryBlocks {
            backbone: name.rsplit("::").next().unwrap_or(name).to_string(),
        })
    }

    /// Runs block `layer` alone on `h` `(B, T, d)`, a state at that block's input, attending over
    /// the positions `token_mask` ([`Backbone::token_mask`]) marks real. The graph reaches `h`
    /// when `h` tracks, while frozen weights stay frozen: a method back-propagates through the
    /// pretrained block into its own output (SHERL's late route) without training the block.
    fn run_block(&self, layer: usize, h: &Tensor, token_mask: &Tensor) -> Result<Tensor>;

    /// The distinct last components of [`Backbone::linears_mut`]'s paths: the names LoRA's
    /// `targetModules` can match (for messages).
    fn linear_names(&mut self) -> Vec<String> {
        let mut names: Vec<String> = Vec::new();
        for (path, _) in self.linears_mut() {
            let leaf = path.rsplit('.').next().unwrap_or(&path).to_string();
            if !names.contains(&leaf) {
                names.push(leaf);
            }
        }
        names
    }
}

/// Block `layer` of `blocks`, or an error naming the range.
/// The frozen pass behind [`Backbone::taps_through`]: `embedded` (the embeddings' output) and
/// the outputs of the first `count` of `blocks`, each run by `run` and detached.
pub(crate) fn frozen_taps<L>(
    blocks: &[L],
    count: usize,
    embedded: Tensor,
    run: impl Fn(&L, &Tensor) -> Result<Tensor>,
) -> Result<Vec<Tensor>> {
    let blocks = blocks.get(..count).ok_or_else(|| {
        Error::Internal(format!(
            "taps through {count} blocks asked of a backbone with {}",
            blocks.len()
        ))
    })?;
    let mut h = embedded.detach();
    let mut states = Vec::with_capacity(count + 1);
    for block in blocks {
        let next = run(block, &h)?.detach();
        states.push(std::mem::replace(&mut h, next));
    }
    states.push(h);
    Ok(states)
}

pub(crate) fn block<L>(blocks: &[L], layer: usize) -> Result<&L> {
    blocks.get(layer).ok_or_else(|| Error::Config {
        field: "layer".into(),
        message: format!(
            "block {layer} does not exist; the backbone has {}",
            blocks.len()
        ),
    })
}

/// A linear layer a LoRA update can be attached to.
pub trait LoraSite {
    fn in_features(&self) -> usize;
    fn out_features(&self) -> usize;
    /// Attaches `delta` beside the frozen weight; the forward adds it from then on.
    fn set_lora(&mut self, delta: LoraDelta);
}

impl LoraSite for nn::Linear {
    fn in_features(&self) -> usize {
        nn::Linear::in_features(self)
    }
    fn out_features(&self) -> usize {
        nn::Linear::out_features(self)
    }
    fn set_lora(&mut self, delta: LoraDelta) {
        self.lora = Some(delta);
    }
}

/// How a classifier reduces hidden states `(B, T, d)` to one vector per example `(B, d)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pooling {
    /// The mean over real tokens: what sentence-transformers encoders (MiniLM) are trained for.
    Mean,
    /// The last real token: in a causal decoder the only position that has read the whole
    /// input (what Hugging Face's `LlamaForSequenceClassification` reads).
    LastToken,
}

impl Pooling {
    /// `h` `(B, T, d)`, `attention_mask` `(B, T)` → `(B, d)`, tracked when `h` is.
    pub fn apply(self, h: &Tensor, attention_mask: &Tensor) -> Result<Tensor> {
        match self {
            Self::Mean => nn::mean_pool(h, attention_mask),
            Self::LastToken => last_token(h, attention_mask),
        }
    }

    /// The name written into an adapter's head description.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Mean => "mean",
            Self::LastToken => "last_token",
        }
    }
}

/// The hidden state of each row's last real token, as one node whose backward scatters the
/// gradient back to that position (it saves only the row indices).
fn last_token(h: &Tensor, attention_mask: &Tensor) -> Result<Tensor> {
    let (b, t, d) = h.dims3()?;
    let lengths = attention_mask
        .to_dtype(DType::F32)?
        .sum(1)?
        .to_vec1::<f32>()?;
    let mut rows = Vec::with_capacity(b);
    for (i, n) in lengths.into_iter().enumerate() {
        if n < 1.0 {
            return Err(Error::Config {
                field: "dataset".into(),
                message: format!("example {i} of the batch has no real token to classify"),
            });
        }
        rows.push((i * t + n as usize - 1) as u32);
    }
    let rows = Tensor::from_vec(rows, b, h.device())?;
    let value = h.detach().reshape((b * t, d))?.index_select(&rows, 0)?;
    tape::attach(&[h], value, move |g| {
        let full = Tensor::zeros((b * t, d), g.dtype(), g.device())?.index_add(&rows, g, 0)?;
        Ok(vec![Some(full.reshape((b, t, d))?)])
    })
}
