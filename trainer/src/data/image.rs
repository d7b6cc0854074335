//! Image datasets: a folder of class subfolders of JPEG/PNG files, or CSV rows of pixel values
//! with a label column (MNIST-style). Images are decoded, resized to a square and kept as bytes;
//! a batch converts them to the backbone's input, normalised with the ImageNet mean and std.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use image::imageops::FilterType;
use image::{GrayImage, RgbImage};
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rayon::prelude::*;

use super::{Batch, UnknownLabels, Validation, class_index, split_examples};
use crate::{Error, Result};

/// Per-channel mean and standard deviation of ImageNet (RGB, on a 0–1 scale): the normalisation
/// DINOv2 and most ImageNet-trained backbones were trained with.
pub const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
pub const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];

/// How an image dataset is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageFormat {
    /// `<dir>/<class name>/<image>.{jpg,jpeg,png}`.
    Folder,
    /// CSV rows of a label and pixel values 0–255 (row-major; `r, g, b` per pixel for colour).
    PixelCsv,
}

/// Which column of a pixel row holds the label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LabelColumn {
    First,
    #[default]
    Last,
}

/// How to read pixel rows (`PixelCsv` only).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PixelRows {
    /// Image width and height; `None` takes a square from the number of pixel columns.
    pub shape: Option<(usize, usize)>,
    /// The first row names the columns and is skipped.
    pub header: bool,
    pub label_column: LabelColumn,
}

/// The dataset part of an image job, with URIs already resolved to local paths.
#[derive(Debug, Clone)]
pub struct ImageDataConfig {
    pub path: PathBuf,
    pub format: ImageFormat,
    /// Class names in index order; a folder name or a CSV label matches a name, or a number is
    /// taken as the index.
    pub labels: Vec<String>,
    pub unknown_labels: UnknownLabels,
    pub validation: Validation,
    pub max_samples: Option<usize>,
    /// Images are resized to `size × size` pixels.
    pub size: usize,
    pub pixel_rows: PixelRows,
}

/// One image, resized: `channels × size × size` bytes, channel-major (1 channel for grayscale).
#[derive(Debug, Clone, PartialEq)]
pub struct ImageExample {
    pub pixels: Vec<u8>,
    pub channels: usize,
    pub label: u32,
}

/// Decoded training and validation images.
#[derive(Debug, Clone)]
pub struct ImageDataset {
    pub train: Vec<ImageExample>,
    pub validation: Vec<ImageExample>,
    pub num_labels: usize,
    pub size: usize,
}

/// An image located but not yet decoded: a file, or a row's pixels.
#[derive(Debug, Clone)]
enum Pending {
    File(PathBuf),
    Row {
        line: u64,
        width: usize,
        height: usize,
        values: Vec<u8>,
    },
}

impl ImageDataset {
    /// Lists the images, checks labels, splits (the same fixed shuffle as text data), then
    /// decodes and resizes only the images kept.
    pub fn load(config: &ImageDataConfig) -> Result<Self> {
        check(config)?;
        let train = locate(&config.path, config)?;
        let validation = match &config.validation {
            Validation::File(path) => Some(locate(path, config)?),
            Validation::Fraction(_) => None,
        };
        let (train, validation) =
            split_examples(train, validation, &config.validation, config.max_samples);
        Ok(Self {
            train: decode_all(train, config.size)?,
            validation: decode_all(validation, config.size)?,
            num_labels: config.labels.len(),
            size: config.size,
        })
    }
}

fn check(config: &ImageDataConfig) -> Result<()> {
    let bad = |field: &str, message: &str| {
        Err(Error::Config {
            field: field.into(),
            message: message.into(),
        })
    };
    if config.labels.len() < 2 {
        return bad(
            "dataset.labels",
            "give at least two class names, in index order (e.g. [\"0\", \"1\", …] for digits)",
        );
    }
    if config.size == 0 {
        return bad("dataset.image.size", "must be at least 1");
    }
    if let Some((w, h)) = config.pixel_rows.shape
        && (w == 0 || h == 0)
    {
        return bad("dataset.image.width", "width and height must be at least 1");
    }
    Ok(())
}

fn data_error(path: &Path, line: Option<u64>, field: &str, message: impl Into<String>) -> Error {
    Error::Data {
        file: path.display().to_string(),
        line,
        field: field.into(),
        message: message.into(),
    }
}

/// Finds every image of `path` with its class index.
fn locate(path: &Path, config: &ImageDataConfig) -> Result<Vec<(Pending, u32)>> {
    let found = match config.format {
        ImageFormat::Folder => locate_folder(path, config)?,
        ImageFormat::PixelCsv => locate_rows(path, config)?,
    };
    if found.is_empty() {
        return Err(data_error(
            path,
            None,
            "dataset.labels",
            format!("no image has a label in dataset.labels {:?}", config.labels),
        ));
    }
    Ok(found)
}

fn locate_folder(dir: &Path, config: &ImageDataConfig) -> Result<Vec<(Pending, u32)>> {
    let io = |source| Error::Io {
        path: dir.display().to_string(),
        source,
    };
    if !dir.is_dir() {
        return Err(data_error(
            dir,
            None,
            "dataset.uri",
            "format image-folder needs a directory of class subfolders",
        ));
    }
    let mut classes: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(io)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_dir())
        .collect();
    classes.sort();
    let mut found = Vec::new();
    for class_dir in classes {
        let name = class_dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let Some(index) = class_index(&config.labels, &name) else {
            if config.unknown_labels == UnknownLabels::Skip {
                continue;
            }
            return Err(data_error(
                &class_dir,
                None,
                "dataset.labels",
                format!(
                    "folder '{name}' is not in dataset.labels {:?}; add it there or set dataset.unknownLabels: skip",
                    config.labels
                ),
            ));
        };
        let mut files: Vec<PathBuf> = std::fs::read_dir(&class_dir)
            .map_err(io)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| is_image_file(p))
            .collect();
        files.sort();
        found.extend(files.into_iter().map(|f| (Pending::File(f), index as u32)));
    }
    Ok(found)
}

fn is_image_file(path: &Path) -> bool {
    let ext = path
        .extension()
        .map(|e| e.to_string_lossy().to_lowercase())
        .unwrap_or_default();
    path.is_file() && matches!(ext.as_str(), "jpg" | "jpeg" | "png")
}

fn locate_rows(path: &Path, config: &ImageDataConfig) -> Result<Vec<(Pending, u32)>> {
    let reader = super::read::open_decompressed(path)?;
    let layout = &config.pixel_rows;
    let mut csv = csv::ReaderBuilder::new()
        .has_headers(layout.header)
        .from_reader(reader);
    let mut found = Vec::new();
    let mut shape = None;
    for (index, record) in csv.records().enumerate() {
        let record = record.map_err(|e| {
            let line = e.position().map(|p| p.line());
            data_error(path, line, "(row)", format!("malformed pixel row: {e}"))
        })?;
        let line = record.position().map_or(index as u64 + 1, |p| p.line());
        let n = record.len();
        if n < 2 {
            return Err(data_error(
                path,
                Some(line),
                "(row)",
                "a pixel row needs a label and pixels",
            ));
        }
        let (label, pixels) = match layout.label_column {
            LabelColumn::First => (&record[0], (1..n)),
            LabelColumn::Last => (&record[n - 1], (0..n - 1)),
        };
        let (width, height, channels) = match shape {
            Some(s) => s,
            None => {
                let (w, h) = row_shape(path, line, pixels.len(), layout.shape)?;
                *shape.insert((w, h, pixels.len() / (w * h)))
            }
        };
        let values = pixels
            .map(|i| pixel_value(&record[i]))
            .collect::<Option<Vec<u8>>>()
            .ok_or_else(|| {
                data_error(
                    path,
                    Some(line),
                    "(pixels)",
                    "pixel values must be numbers from 0 to 255",
                )
            })?;
        if values.len() != width * height * channels {
            return Err(data_error(
                path,
                Some(line),
                "(pixels)",
                format!(
                    "{} pixel values where the first row has {width}×{height}×{channels}",
                    values.len()
                ),
            ));
        }
        let label = label.trim();
        match class_index(&config.labels, label) {
            Some(i) => found.push((
                Pending::Row {
                    line,
                    width,
                    height,
                    values,
                },
                i as u32,
            )),
            None if config.unknown_labels == UnknownLabels::Skip => {}
            None => {
                return Err(data_error(
                    path,
                    Some(line),
                    "(label)",
                    format!(
                        "label '{label}' is not in dataset.labels {:?}; add it there or set dataset.unknownLabels: skip",
                        config.labels
                    ),
                ));
            }
        }
    }
    Ok(found)
}

/// The image shape of a row with `count` pixel values: the given one, or a square.
fn row_shape(
    path: &Path,
    line: u64,
    count: usize,
    given: Option<(usize, usize)>,
) -> Result<(usize, usize)> {
    if let Some((w, h)) = given {
        if count == w * h || count == 3 * w * h {
            return Ok((w, h));
        }
        return Err(data_error(
            path,
            Some(line),
            "dataset.image.width",
            format!("{count} pixel values fit neither {w}×{h} grayscale nor {w}×{h} RGB"),
        ));
    }
    let square = |n: usize| {
        let s = (n as f64).sqrt().round() as usize;
        (s * s == n && s > 0).then_some(s)
    };
    // 3·s² is never a square, so grayscale and RGB cannot be confused.
    match (
        square(count),
        count.is_multiple_of(3).then(|| square(count / 3)).flatten(),
    ) {
        (Some(s), _) | (None, Some(s)) => Ok((s, s)),
        (None, None) => Err(data_error(
            path,
            Some(line),
            "dataset.image.width",
            format!(
                "{count} pixel values are not a square image; set dataset.image.width and height"
            ),
        )),
    }
}

fn pixel_value(field: &str) -> Option<u8> {
    let v: f32 = field.trim().parse().ok()?;
    (0.0..=255.0).contains(&v).then(|| v.round() as u8)
}

/// Decodes and resizes every image, in parallel.
fn decode_all(items: Vec<(Pending, u32)>, size: usize) -> Result<Vec<ImageExample>> {
    items
        .into_par_iter()
        .map(|(pending, label)| {
            let (pixels, channels) = decode(&pending, size)?;
            Ok(ImageExample {
                pixels,
                channels,
                label,
            })
        })
        .collect()
}

fn decode(pending: &Pending, size: usize) -> Result<(Vec<u8>, usize)> {
    let s = size as u32;
    match pending {
        Pending::File(path) => {
            let img = image::open(path)
                .map_err(|e| data_error(path, None, "(image)", format!("cannot decode: {e}")))?;
            if img.color().has_color() {
                Ok((
                    planar_rgb(&image::imageops::resize(
                        &img.to_rgb8(),
                        s,
                        s,
                        FilterType::Triangle,
                    )),
                    3,
                ))
            } else {
                let gray = image::imageops::resize(&img.to_luma8(), s, s, FilterType::Triangle);
                Ok((gray.into_raw(), 1))
            }
        }
        Pending::Row {
            line,
            width,
            height,
            values,
        } => {
            let (w, h) = (*width as u32, *height as u32);
            let bad = || Error::Internal(format!("pixel row at line {line} does not fit {w}×{h}"));
            if values.len() == (w * h) as usize {
                let gray = GrayImage::from_raw(w, h, values.clone()).ok_or_else(bad)?;
                Ok((
                    image::imageops::resize(&gray, s, s, FilterType::Triangle).into_raw(),
                    1,
                ))
            } else {
                let rgb = RgbImage::from_raw(w, h, values.clone()).ok_or_else(bad)?;
                Ok((
                    planar_rgb(&image::imageops::resize(&rgb, s, s, FilterType::Triangle)),
                    3,
                ))
            }
        }
    }
}

/// `r g b r g b …` → `r r … g g … b b …`.
fn planar_rgb(img: &RgbImage) -> Vec<u8> {
    let n = (img.width() * img.height()) as usize;
    let mut out = vec![0u8; 3 * n];
    for (i, p) in img.pixels().enumerate() {
        for c in 0..3 {
            out[c * n + i] = p.0[c];
        }
    }
    out
}

/// A batch of images as the backbone's input: `(B, 3, size, size)` f32, ImageNet-normalised
/// (grayscale repeated over the three channels), and the `(B,)` u32 labels.
pub fn image_batch(
    examples: &[&ImageExample],
    size: usize,
    device: &Device,
) -> Result<(Tensor, Tensor)> {
    let plane = size * size;
    let mut pixels = Vec::with_capacity(examples.len() * 3 * plane);
    for e in examples {
        if e.pixels.len() != e.channels * plane {
            return Err(Error::Internal(format!(
                "an image of {} bytes in a batch of {size}×{size} images",
                e.pixels.len()
            )));
        }
        for c in 0..3 {
            let source = if e.channels == 1 { 0 } else { c };
            let (mean, std) = (IMAGENET_MEAN[c], IMAGENET_STD[c]);
            pixels.extend(
                e.pixels[source * plane..(source + 1) * plane]
                    .iter()
                    .map(|&v| (f32::from(v) / 255.0 - mean) / std),
            );
        }
    }
    let labels: Vec<u32> = examples.iter().map(|e| e.label).collect();
    let b = examples.len();
    Ok((
        Tensor::from_vec(pixels, (b, 3, size, size), device)?,
        Tensor::from_vec(labels, b, device)?,
    ))
}

/// A batch in the shape the training loop passes to a method: the pixels (see [`image_batch`])
/// travel in `input_ids`, `attention_mask` is `(B, 1)` ones, `labels` the class indices.
pub fn as_batch(examples: &[&ImageExample], size: usize, device: &Device) -> Result<Batch> {
    let (pixels, labels) = image_batch(examples, size, device)?;
    let mask = Tensor::ones((examples.len(), 1), DType::U32, device)?;
    Ok(Batch {
        input_ids: pixels,
        attention_mask: mask,
        labels,
    })
}

/// Deterministic image batches for one rank, with [`super::Batcher`]'s contract: global batch
/// `k` of epoch `e` is `[k·b, (k+1)·b)` of a permutation seeded by `seed + e` (the remainder
/// waits for another epoch), and rank `r` of `w` takes the contiguous slice `[r·b/w, (r+1)·b/w)`.
#[derive(Debug, Clone)]
pub struct ImageBatches<'a> {
    examples: &'a [ImageExample],
    size: usize,
    batch_size: usize,
    seed: u64,
    rank: usize,
    world_size: usize,
    device: Device,
}

impl<'a> ImageBatches<'a> {
    pub fn new(
        dataset: &'a ImageDataset,
        batch_size: usize,
        seed: u64,
        rank: usize,
        world_size: usize,
        device: &Device,
    ) -> Result<Self> {
        let bad = |message: String| Error::Config {
            field: "spec.training.batchSize".into(),
            message,
        };
        if batch_size == 0 || world_size == 0 || !batch_size.is_multiple_of(world_size) {
            return Err(bad(format!(
                "the global batch of {batch_size} must be at least 1 and split evenly over {world_size} workers"
            )));
        }
        if dataset.train.len() < batch_size {
            return Err(bad(format!(
                "{} training images cannot fill one batch of {batch_size}; lower batchSize or add images",
                dataset.train.len()
            )));
        }
        Ok(Self {
            examples: &dataset.train,
            size: dataset.size,
            batch_size,
            seed,
            rank,
            world_size,
            device: device.clone(),
        })
    }

    fn rank_batch_size(&self) -> usize {
        self.batch_size / self.world_size
    }
}

impl crate::train::Batches for ImageBatches<'_> {
    fn batches_per_epoch(&self) -> usize {
        self.examples.len() / self.batch_size
    }

    fn batch(&self, epoch: u64, index: usize) -> Result<Batch> {
        let mut order: Vec<usize> = (0..self.examples.len()).collect();
        order.shuffle(&mut StdRng::seed_from_u64(self.seed.wrapping_add(epoch)));
        let start = index * self.batch_size + self.first_example();
        let slice = order
            .get(start..start + self.rank_batch_size())
            .ok_or_else(|| Error::Internal(format!("batch {index} is past epoch {epoch}'s end")))?;
        let chunk: Vec<&ImageExample> = slice.iter().map(|&i| &self.examples[i]).collect();
        as_batch(&chunk, self.size, &self.device)
    }

    fn first_example(&self) -> usize {
        self.rank * self.rank_batch_size()
    }
}

/// The validation images in batches of `batch_size` (every rank scores its share).
pub fn validation_batches(
    dataset: &ImageDataset,
    batch_size: usize,
    device: &Device,
) -> Result<Vec<Batch>> {
    let refs: Vec<&ImageExample> = dataset.validation.iter().collect();
    refs.chunks(batch_size.max(1))
        .map(|chunk| as_batch(chunk, dataset.size, device))
        .collect()
}
