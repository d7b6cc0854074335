//! Which parameters are trained and how (`spec.method`): a `type` plus the block for that type.
//! Adding a method = one `MethodType` variant, one config block, one CEL rule, one `MethodConfig` arm.

use std::fmt;

use kube::KubeSchema;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::rules::rule;

/// The fine-tuning method. Only the block named by `type` may be set; a missing block means that
/// method's defaults.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = rule("!has(self.full) || self.type == 'full'", "spec.method.full may only be set when spec.method.type is full; remove it or set type: full"),
    validation = rule("!has(self.lora) || self.type == 'lora'", "spec.method.lora may only be set when spec.method.type is lora; remove it or set type: lora"),
    validation = rule("!has(self.bitfit) || self.type == 'bitfit'", "spec.method.bitfit may only be set when spec.method.type is bitfit; remove it or set type: bitfit"),
    validation = rule("!has(self.lst) || self.type == 'lst'", "spec.method.lst may only be set when spec.method.type is lst; remove it or set type: lst"),
    validation = rule("!has(self.head) || self.type == 'head'", "spec.method.head may only be set when spec.method.type is head; remove it or set type: head"),
)]
pub struct MethodSpec {
    /// The method: full (all parameters), lora (low-rank adapters), bitfit (biases only), lst
    /// (ladder side tuning: a small side network reads the frozen backbone's hidden states, so
    /// backward never touches the backbone) or head (a linear probe: only the classification head
    /// trains, on the frozen backbone's pooled output; the floor every other method must beat).
    #[serde(rename = "type")]
    pub type_: MethodType,
    /// Settings for type: full.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub full: Option<FullConfig>,
    /// Settings for type: lora.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lora: Option<LoraConfig>,
    /// Settings for type: bitfit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bitfit: Option<BitFitConfig>,
    /// Settings for type: lst.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lst: Option<LstConfig>,
    /// Settings for type: head.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head: Option<HeadConfig>,
}

/// The method names accepted in `spec.method.type`.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[serde(rename_all = "lowercase")]
pub enum MethodType {
    /// Train every parameter (baseline).
    Full,
    /// Low-rank adapters on selected linear layers.
    Lora,
    /// Train only bias terms.
    Bitfit,
    /// Ladder side tuning.
    Lst,
    /// The classification head alone on the frozen backbone (a linear probe).
    Head,
}

impl MethodType {
    /// The name as written in YAML.
    pub fn as_str(self) -> &'static str {
        match self {
            MethodType::Full => "full",
            MethodType::Lora => "lora",
            MethodType::Bitfit => "bitfit",
            MethodType::Lst => "lst",
            MethodType::Head => "head",
        }
    }
}

impl fmt::Display for MethodType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Full fine-tuning has no settings; the block exists so every method has one.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub struct FullConfig {}

/// BitFit has no settings; the block exists so every method has one.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub struct BitFitConfig {}

/// The linear probe has no settings; the block exists so every method has one.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub struct HeadConfig {}

/// LoRA: W' = W + (alpha / rank) · B·A on each target module, A and B trained.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct LoraConfig {
    /// Rank r of the update B·A (A: r×in, B: out×r). Must be at least 1.
    #[serde(default = "default_lora_rank")]
    #[schemars(range(min = 1, max = 1024))]
    pub rank: i32,
    /// Scaling numerator: the update is multiplied by alpha / rank. Must be greater than 0.
    #[serde(default = "default_lora_alpha")]
    #[schemars(range(max = 4096.0))]
    #[x_kube(validation = rule("self > 0.0", "spec.method.lora.alpha must be greater than 0 (for example 16)"))]
    pub alpha: f64,
    /// Dropout applied to the adapter input during training, in [0, 0.9].
    #[serde(default)]
    #[schemars(range(min = 0.0, max = 0.9))]
    pub dropout: f64,
    /// Names of the linear layers to adapt, matched against the last component of the weight
    /// name (for BERT-family encoders: query, key, value, dense; for Llama: q_proj, k_proj, v_proj, o_proj).
    #[serde(default = "default_target_modules")]
    #[schemars(length(min = 1, max = 32), inner(length(min = 1, max = 64)))]
    #[x_kube(merge_strategy = kube::core::ListMerge::Set)]
    pub target_modules: Vec<String>,
}

impl Default for LoraConfig {
    fn default() -> Self {
        Self {
            rank: default_lora_rank(),
            alpha: default_lora_alpha(),
            dropout: 0.0,
            target_modules: default_target_modules(),
        }
    }
}

fn default_lora_rank() -> i32 {
    8
}
fn default_lora_alpha() -> f64 {
    16.0
}
fn default_target_modules() -> Vec<String> {
    vec!["query".into(), "value".into()]
}

/// Ladder side tuning: a side network of width hidden/reduction fed by gated per-layer taps.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct LstConfig {
    /// Side network width = backbone hidden size / reduction.
    #[serde(default = "default_lst_reduction")]
    #[schemars(range(min = 1, max = 64))]
    pub reduction: i32,
    /// Backbone layer indices (0-based) the side network taps; all layers when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 128), inner(range(min = 0, max = 1023)))]
    #[x_kube(merge_strategy = kube::core::ListMerge::Set)]
    pub layers: Option<Vec<i32>>,
    /// Initial value of the learned gates mixing backbone taps into the side network.
    #[serde(default)]
    #[schemars(range(min = -10.0, max = 10.0))]
    pub gate_init: f64,
    /// Initialise side layers from structurally pruned backbone weights rather than randomly.
    #[serde(default = "default_true")]
    pub init_from_backbone: bool,
}

impl Default for LstConfig {
    fn default() -> Self {
        Self {
            reduction: default_lst_reduction(),
            layers: None,
            gate_init: 0.0,
            init_from_backbone: true,
        }
    }
}

fn default_lst_reduction() -> i32 {
    8
}
fn default_true() -> bool {
    true
}

/// The chosen method with its settings resolved (defaults filled in for a missing block).
#[derive(Clone, Debug, PartialEq)]
pub enum MethodConfig {
    /// Full fine-tuning.
    Full(FullConfig),
    /// LoRA.
    Lora(LoraConfig),
    /// BitFit.
    Bitfit(BitFitConfig),
    /// Ladder side tuning.
    Lst(LstConfig),
    /// The classification head alone (a linear probe).
    Head(HeadConfig),
}

impl MethodSpec {
    /// The settings for `type`, taking that method's defaults when its block is absent.
    pub fn config(&self) -> MethodConfig {
        match self.type_ {
            MethodType::Full => MethodConfig::Full(self.full.clone().unwrap_or_default()),
            MethodType::Lora => MethodConfig::Lora(self.lora.clone().unwrap_or_default()),
            MethodType::Bitfit => MethodConfig::Bitfit(self.bitfit.clone().unwrap_or_default()),
            MethodType::Lst => MethodConfig::Lst(self.lst.clone().unwrap_or_default()),
            MethodType::Head => MethodConfig::Head(self.head.clone().unwrap_or_default()),
        }
    }

    /// A spec for `type_` with no block (defaults apply).
    pub fn of_type(type_: MethodType) -> Self {
        Self {
            type_,
            full: None,
            lora: None,
            bitfit: None,
            lst: None,
            head: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_block_resolves_to_method_defaults() {
        let spec = MethodSpec::of_type(MethodType::Lora);
        let MethodConfig::Lora(lora) = spec.config() else {
            panic!("lora spec resolved to another method");
        };
        assert_eq!((lora.rank, lora.alpha), (8, 16.0));
        assert_eq!(lora.target_modules, ["query", "value"]);
    }

    #[test]
    fn partial_lora_block_fills_defaults_from_serde() {
        let spec: MethodSpec =
            serde_json::from_str(r#"{"type":"lora","lora":{"rank":4}}"#).unwrap();
        let MethodConfig::Lora(lora) = spec.config() else {
            panic!("lora spec resolved to another method");
        };
        assert_eq!((lora.rank, lora.alpha), (4, 16.0));
    }
}
