//! Where and how the trained adapter is published (`spec.output`).
//! The operator records the published artifact in `status.artifact`.

use kube::KubeSchema;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::MethodType;

/// The adapter destination.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct OutputSpec {
    /// Destination directory: file:///<absolute dir>, pvc://<claim>/<path> or s3://<bucket>/<prefix>.
    /// Rank 0 writes the adapter and a manifest.json (base model digest, method, metrics) there.
    #[schemars(length(min = 1, max = 2048))]
    #[x_kube(validation = crate::rules::sink_uri())]
    pub uri: String,
    /// File layout: peft (adapter_model.safetensors + adapter_config.json, LoRA only),
    /// safetensors (the trained tensors under their backbone names), or auto (peft for lora,
    /// safetensors otherwise).
    #[serde(default)]
    pub format: OutputFormat,
    /// Credentials for s3:// destinations.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_ref: Option<crate::SecretRef>,
}

/// Adapter file layout.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum OutputFormat {
    /// peft for lora, safetensors otherwise.
    #[default]
    Auto,
    /// Hugging Face PEFT layout (LoRA only).
    Peft,
    /// Plain safetensors.
    Safetensors,
}

impl OutputSpec {
    /// The concrete layout for a method (never `Auto`).
    pub fn resolved_format(&self, method: MethodType) -> OutputFormat {
        match (self.format, method) {
            (OutputFormat::Auto, MethodType::Lora) => OutputFormat::Peft,
            (OutputFormat::Auto, _) => OutputFormat::Safetensors,
            (explicit, _) => explicit,
        }
    }
}
