//! The image reader on small files written here: pixel rows and class folders load with their
//! labels, batches are ImageNet-normalised, and bad inputs fail naming the file, line and fix.

use std::path::Path;

use candle_core::Device;
use petl_trainer::data::image::{
    ImageDataConfig, ImageDataset, ImageFormat, LabelColumn, PixelRows, image_batch,
};
use petl_trainer::data::{UnknownLabels, Validation};

fn config(path: &Path, format: ImageFormat) -> ImageDataConfig {
    ImageDataConfig {
        path: path.to_path_buf(),
        format,
        labels: vec!["a".into(), "b".into()],
        unknown_labels: UnknownLabels::Error,
        validation: Validation::Fraction(0.0),
        max_samples: None,
        size: 8,
        pixel_rows: PixelRows::default(),
    }
}

/// Rows of 16 grayscale pixels (4×4) and a label, one row per `(label, value)`.
fn pixel_csv(dir: &Path, rows: &[(&str, &str)]) -> std::path::PathBuf {
    let path = dir.join("pixels.csv");
    let text: String = rows
        .iter()
        .map(|(label, v)| format!("{},{label}\n", vec![*v; 16].join(",")))
        .collect();
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn pixel_rows_load_as_resized_grayscale_with_their_labels() {
    let dir = tempfile::tempdir().unwrap();
    let path = pixel_csv(
        dir.path(),
        &[("a", "0"), ("b", "255"), ("1", "128"), ("0", "7")],
    );
    let data = ImageDataset::load(&config(&path, ImageFormat::PixelCsv)).unwrap();
    assert_eq!(data.train.len(), 4);
    let mut labels: Vec<u32> = data.train.iter().map(|e| e.label).collect();
    labels.sort();
    assert_eq!(labels, [0, 0, 1, 1]);
    let white = data.train.iter().find(|e| e.pixels[0] == 255).unwrap();
    assert_eq!((white.channels, white.pixels.len()), (1, 64));
    assert!(white.pixels.iter().all(|&p| p == 255));

    let (pixels, _) = image_batch(&[white], 8, &Device::Cpu).unwrap();
    assert_eq!(pixels.dims(), [1, 3, 8, 8]);
    let red: Vec<f32> = pixels.flatten_all().unwrap().to_vec1().unwrap();
    assert!((red[0] - (1.0 - 0.485) / 0.229).abs() < 1e-5);
    assert!((red[64] - (1.0 - 0.456) / 0.224).abs() < 1e-5);

    let mut first = config(&path, ImageFormat::PixelCsv);
    first.pixel_rows.label_column = LabelColumn::First;
    let err = ImageDataset::load(&first).unwrap_err().to_string();
    assert!(
        err.contains("pixel values must be numbers from 0 to 255"),
        "{err}"
    );
}

#[test]
fn bad_pixel_rows_name_the_line_and_the_fix() {
    let dir = tempfile::tempdir().unwrap();
    let path = pixel_csv(dir.path(), &[("a", "0"), ("b", "300")]);
    let err = ImageDataset::load(&config(&path, ImageFormat::PixelCsv))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("pixels.csv:2") && err.contains("0 to 255"),
        "{err}"
    );

    let path = pixel_csv(dir.path(), &[("a", "0"), ("zebra", "1")]);
    let err = ImageDataset::load(&config(&path, ImageFormat::PixelCsv))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("'zebra'") && err.contains("unknownLabels: skip"),
        "{err}"
    );

    let odd = dir.path().join("odd.csv");
    std::fs::write(&odd, "1,2,3,4,5,a\n").unwrap();
    let err = ImageDataset::load(&config(&odd, ImageFormat::PixelCsv))
        .unwrap_err()
        .to_string();
    assert!(err.contains("set dataset.image.width and height"), "{err}");
}

#[test]
fn class_folders_load_colour_images_and_refuse_unknown_classes() {
    let dir = tempfile::tempdir().unwrap();
    for (class, shade) in [("a", 10u8), ("b", 200), ("c", 90)] {
        std::fs::create_dir(dir.path().join(class)).unwrap();
        for i in 0..3u8 {
            let img = image::RgbImage::from_pixel(5, 7, image::Rgb([shade, shade + i, 3]));
            img.save(dir.path().join(class).join(format!("{i}.png")))
                .unwrap();
        }
        std::fs::write(dir.path().join(class).join("notes.txt"), "not an image").unwrap();
    }
    let err = ImageDataset::load(&config(dir.path(), ImageFormat::Folder))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("folder 'c'") && err.contains("unknownLabels: skip"),
        "{err}"
    );

    let mut skip = config(dir.path(), ImageFormat::Folder);
    skip.unknown_labels = UnknownLabels::Skip;
    skip.validation = Validation::Fraction(0.5);
    let data = ImageDataset::load(&skip).unwrap();
    assert_eq!((data.train.len(), data.validation.len()), (3, 3));
    let all: Vec<_> = data.train.iter().chain(&data.validation).collect();
    assert!(
        all.iter()
            .all(|e| e.channels == 3 && e.pixels.len() == 3 * 64)
    );
    for e in all {
        let expected = if e.label == 0 { 10 } else { 200 };
        assert_eq!(e.pixels[0], expected, "red plane of class {}", e.label);
        assert_eq!(e.pixels[2 * 64], 3, "blue plane");
    }
}
