//! The frozen encoders' features, computed once and cached in memory (R²-Tuning pre-extracts and
//! caches CLIP's features offline, `tools/extract_feat.py --k 4`): per image, every token of the
//! DINOv2 ViT's last `k` blocks; per digit, every token of MiniLM's last `k` layers on the query
//! "the digit seven". Both are 384 wide.

use candle_core::{Device, Tensor};

use crate::data::Tokenizer;
use crate::data::image::{ImageExample, image_batch};
use crate::models::bert::Bert;
use crate::models::vit::Vit;
use crate::tape;
use crate::{Error, Result};

/// The queries, by digit.
pub const DIGIT_NAMES: [&str; 10] = [
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
];

/// The query text for `digit`.
pub fn query_text(digit: u32) -> String {
    format!("the digit {}", DIGIT_NAMES[digit as usize % 10])
}

/// Every image's tokens after the backbone's last `k` blocks.
pub struct FrameFeatures {
    /// Oldest first: `(N, P, C)` per tapped block ([CLS] then the patches), untracked.
    pub layers: Vec<Tensor>,
    pub labels: Vec<u32>,
}

/// The ten queries' tokens after the text encoder's last `k` layers.
pub struct QueryFeatures {
    /// Oldest first: `(10, L, C)` per tapped layer, row `d` the query for digit `d`.
    pub layers: Vec<Tensor>,
}

/// Runs the frozen ViT (no graph) on `images` resized to `size` px, `chunk` images at a time,
/// and keeps every token of its last `k` blocks (before the final LayerNorm, as R²-Tuning reads
/// CLIP's residual stream before `ln_post`).
pub fn frame_features(
    vit: &Vit,
    images: &[ImageExample],
    size: usize,
    k: usize,
    chunk: usize,
) -> Result<FrameFeatures> {
    let blocks = vit.config.num_hidden_layers;
    check_k(k, blocks)?;
    let mut per_layer: Vec<Vec<Tensor>> = vec![Vec::new(); k];
    for part in images.chunks(chunk.max(1)) {
        let refs: Vec<&ImageExample> = part.iter().collect();
        let (pixels, _) = image_batch(&refs, size, vit.device())?;
        let states = tape::no_grad(|| vit.forward_hidden(&pixels))?;
        for (slot, state) in per_layer.iter_mut().zip(&states[blocks + 1 - k..]) {
            slot.push(state.clone());
        }
    }
    Ok(FrameFeatures {
        layers: per_layer
            .iter()
            .map(|parts| Ok(Tensor::cat(parts, 0)?))
            .collect::<Result<_>>()?,
        labels: images.iter().map(|e| e.label).collect(),
    })
}

/// Runs the frozen text encoder (no graph) on the ten queries and keeps every token of its last
/// `k` layers. The ten names are one word piece each in MiniLM's vocabulary, so the queries have
/// one length and need no padding; a tokenizer that splits them differently is refused.
pub fn query_features(bert: &Bert, tokenizer: &Tokenizer, k: usize) -> Result<QueryFeatures> {
    let layers = bert.layers.len();
    check_k(k, layers)?;
    let rows = (0..10u32).map(|d| (query_text(d), d)).collect();
    let encoded = tokenizer.encode(rows)?;
    let len = encoded[0].ids.len();
    if encoded.iter().any(|e| e.ids.len() != len) {
        return Err(Error::Data {
            file: "(tokenizer)".into(),
            line: None,
            field: "query".into(),
            message: format!(
                "the ten digit queries tokenise to different lengths ({:?}); the grounding task \
                 needs them of one length",
                encoded.iter().map(|e| e.ids.len()).collect::<Vec<_>>()
            ),
        });
    }
    let device: &Device = bert.device();
    let ids: Vec<u32> = encoded.iter().flat_map(|e| e.ids.clone()).collect();
    let ids = Tensor::from_vec(ids, (10, len), device)?;
    let mask = Tensor::ones((10, len), candle_core::DType::U32, device)?;
    let states = tape::no_grad(|| bert.forward_hidden(&ids, &mask))?;
    Ok(QueryFeatures {
        layers: states[layers + 1 - k..].to_vec(),
    })
}

/// Standardises every channel of every tapped layer with the mean and standard deviation over
/// `fit`'s tokens (all images, all positions), applied in place to `fit` and to each of `also`.
/// The ViT's residual stream carries a few channels hundreds of times larger than the rest, which
/// the block's first LayerNorm would otherwise let dominate every token.
pub fn standardise(fit: &mut [Tensor], also: &mut [&mut [Tensor]]) -> Result<()> {
    for (i, layer) in fit.iter_mut().enumerate() {
        let c = layer.dim(candle_core::D::Minus1)?;
        let rows = layer.reshape(((), c))?;
        let mean = rows.mean_keepdim(0)?;
        let std = rows
            .broadcast_sub(&mean)?
            .sqr()?
            .mean_keepdim(0)?
            .affine(1.0, 1e-6)?
            .sqrt()?;
        let apply = |x: &Tensor| -> Result<Tensor> {
            let dims = x.dims().to_vec();
            Ok(x.reshape(((), c))?
                .broadcast_sub(&mean)?
                .broadcast_div(&std)?
                .reshape(dims)?)
        };
        *layer = apply(layer)?;
        for other in also.iter_mut() {
            other[i] = apply(&other[i])?;
        }
    }
    Ok(())
}

fn check_k(k: usize, layers: usize) -> Result<()> {
    if k == 0 || k > layers {
        return Err(Error::Config {
            field: "grounding layers".into(),
            message: format!("{k} tapped layers of a {layers}-layer encoder (e.g. 4)"),
        });
    }
    Ok(())
}
