//! `petl run` for image-classification jobs: resolves the vision backbone and the image data,
//! then trains through the same loop, ranks, snapshots and publishing as text jobs. The backbone
//! is `models::vit`, as a `Backbone`, so every registered method runs on it.

use std::path::PathBuf;

use petl_crds::{DatasetFormat, ImageSpec, ModelFormat, PetlJobSpec};

use super::training::{Trained, drive, model_dtype};
use super::{RunOptions, positive};
use crate::data::image::{
    ImageBatches, ImageDataConfig, ImageDataset, ImageFormat, LabelColumn, PixelRows,
    validation_batches,
};
use crate::data::{UnknownLabels, Validation};
use crate::methods;
use crate::metrics::TrainerMetrics;
use crate::models::vit::Vit;
use crate::source::Resolver;
use crate::train::{TrainConfig, Trainer};
use crate::{Error, Result};

/// An image job's sources, resolved to local paths.
#[derive(Debug, Clone)]
pub struct ImageSources {
    /// A `.onnx` export or a Hugging Face DINOv2 directory.
    pub model: PathBuf,
    pub data: ImageDataConfig,
}

/// Resolves `spec.model` and `spec.dataset` of an image-classification job.
pub fn resolve(spec: &PetlJobSpec, resolver: &Resolver) -> Result<ImageSources> {
    if spec.model.format == ModelFormat::Gguf {
        return Err(Error::Config {
            field: "spec.model.format".into(),
            message: "image-classification needs a vision backbone: onnx (a DINOv2 export) or \
                      safetensors (a Hugging Face DINOv2 directory), not gguf"
                .into(),
        });
    }
    let model = resolver.input(&spec.model.uri)?;
    let dataset = &spec.dataset;
    let format = match dataset.format {
        DatasetFormat::ImageFolder => ImageFormat::Folder,
        DatasetFormat::PixelCsv => ImageFormat::PixelCsv,
        other => {
            return Err(Error::Config {
                field: "spec.dataset.format".into(),
                message: format!(
                    "{other:?} holds text; image-classification reads image-folder or pixel-csv"
                ),
            });
        }
    };
    let image = dataset.image.clone().unwrap_or_default();
    let shape = match (image.width, image.height) {
        (Some(w), Some(h)) => Some((
            positive(w.into(), "dataset.image.width")?,
            positive(h.into(), "dataset.image.height")?,
        )),
        _ => None,
    };
    let validation = match &dataset.validation_uri {
        Some(uri) => Validation::File(resolver.input(uri)?),
        None => Validation::Fraction(dataset.validation_fraction),
    };
    let data = ImageDataConfig {
        path: resolver.input(&dataset.uri)?,
        format,
        labels: dataset.labels.clone(),
        unknown_labels: match dataset.unknown_labels {
            petl_crds::UnknownLabels::Error => UnknownLabels::Error,
            petl_crds::UnknownLabels::Skip => UnknownLabels::Skip,
        },
        validation,
        max_samples: dataset
            .max_samples
            .map(|n| positive(n, "dataset.maxSamples"))
            .transpose()?,
        size: image_size(&image)?,
        pixel_rows: PixelRows {
            shape,
            header: image.header.unwrap_or(false),
            label_column: match image.label_column.unwrap_or_default() {
                petl_crds::LabelColumn::First => LabelColumn::First,
                petl_crds::LabelColumn::Last => LabelColumn::Last,
            },
        },
    };
    Ok(ImageSources { model, data })
}

fn image_size(image: &ImageSpec) -> Result<usize> {
    positive(image.size.into(), "dataset.image.size")
}

/// Trains this rank's share of an image job with the method `spec.method` names.
pub fn train(
    spec: &PetlJobSpec,
    options: &RunOptions,
    sources: &ImageSources,
    dataset: &ImageDataset,
    metrics: &TrainerMetrics,
) -> Result<(Trained, Trainer)> {
    let device = crate::device::open(options.device)?;
    let backbone = Vit::load(&sources.model, model_dtype(spec), &device)?;
    let config = TrainConfig::from_spec(&spec.training);
    let method = methods::build(
        &spec.method.config(),
        Box::new(backbone),
        dataset.num_labels,
        config.seed,
    )?;
    let batch_size = usize::try_from(spec.training.batch_size).unwrap_or(0);
    let batches = ImageBatches::new(
        dataset,
        batch_size,
        config.seed,
        options.rank,
        options.world_size,
        &device,
    )?;
    let validation = validation_batches(dataset, batch_size, &device)?;
    drive(spec, options, method, &batches, &validation, metrics)
}
