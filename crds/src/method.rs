//! Which parameters are trained and how (`spec.method`): a `type` plus the block for that type.
//!
//! Every method is one row of the table in `methods!` below: its `MethodType` variant, its YAML
//! name, the `MethodSpec` field that holds its settings and the settings type. The enum, the
//! settings fields, the CEL rule "a block only with its type", `MethodConfig` and its resolution
//! all come from that row. Adding a method = one settings struct + one row.

use std::fmt;
use std::str::FromStr;

use kube::KubeSchema;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::rules::rule;

/// Generates the method API from one table. Each row is
/// `/// docs` `Variant = "yaml-name" => field: SettingsType`; the docs become the variant's
/// documentation and its part of the `type` field's description.
macro_rules! methods {
    ($(
        $(#[doc = $doc:literal])+
        $variant:ident = $name:literal => $field:ident: $config:ty
    ),+ $(,)?) => {
        /// The fine-tuning method. Only the block named by `type` may be set; a missing block
        /// means that method's defaults.
        #[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
        #[serde(rename_all = "camelCase")]
        #[x_kube($(
            validation = rule(
                concat!("!has(self.", $name, ") || self.type == '", $name, "'"),
                concat!(
                    "spec.method.", $name, " may only be set when spec.method.type is ", $name,
                    "; remove it or set type: ", $name
                ),
            )
        ),+)]
        pub struct MethodSpec {
            #[doc = concat!("The method:", $("\n- ", $name, ":", $($doc,)+)+)]
            #[serde(rename = "type")]
            pub type_: MethodType,
            $(
                #[doc = concat!("Settings for type: ", $name, ".")]
                #[serde(rename = $name, default, skip_serializing_if = "Option::is_none")]
                pub $field: Option<$config>,
            )+
        }

        /// The method names accepted in `spec.method.type`.
        #[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub enum MethodType {
            $(
                $(#[doc = $doc])+
                #[serde(rename = $name)]
                $variant,
            )+
        }

        impl MethodType {
            /// Every method, in table order.
            pub const ALL: &'static [MethodType] = &[$(MethodType::$variant),+];

            /// The name as written in YAML.
            pub fn as_str(self) -> &'static str {
                match self {
                    $(MethodType::$variant => $name,)+
                }
            }

            /// The method's documentation: what it is and trains, in a sentence or two.
            pub fn summary(self) -> &'static str {
                match self {
                    $(MethodType::$variant => concat!($($doc),+).trim_ascii(),)+
                }
            }
        }

        /// The chosen method with its settings resolved (defaults filled in for a missing block).
        #[derive(Clone, Debug, PartialEq)]
        pub enum MethodConfig {
            $(
                $(#[doc = $doc])+
                $variant($config),
            )+
        }

        impl MethodConfig {
            /// The method these settings belong to.
            pub fn method_type(&self) -> MethodType {
                match self {
                    $(MethodConfig::$variant(_) => MethodType::$variant,)+
                }
            }
        }

        impl MethodSpec {
            /// The settings for `type`, taking that method's defaults when its block is absent.
            pub fn config(&self) -> MethodConfig {
                match self.type_ {
                    $(MethodType::$variant => {
                        MethodConfig::$variant(self.$field.clone().unwrap_or_default())
                    })+
                }
            }

            /// A spec for `type_` with no block (defaults apply).
            pub fn of_type(type_: MethodType) -> Self {
                Self { type_, $($field: None,)+ }
            }

            /// The methods whose settings block is present (valid specs have at most the one
            /// `type` names).
            pub fn blocks_present(&self) -> Vec<MethodType> {
                let mut present = Vec::new();
                $(if self.$field.is_some() {
                    present.push(MethodType::$variant);
                })+
                present
            }
        }
    };
}

methods! {
    /// Train every parameter (the baseline; the most memory).
    Full = "full" => full: FullConfig,
    /// Low-rank adapters on selected linear layers; the backbone stays frozen.
    Lora = "lora" => lora: LoraConfig,
    /// Train only the bias terms.
    Bitfit = "bitfit" => bitfit: BitFitConfig,
    /// Ladder side tuning: a small side network reads the frozen backbone's hidden states, so
    /// backward never touches the backbone.
    Lst = "lst" => lst: LstConfig,
    /// Visual query tuning: learnable query tokens in every block read the frozen tokens'
    /// keys and values without being read by them; the head reads the pooled output and every
    /// block's query outputs, so backward runs through the query paths only.
    Vqt = "vqt" => vqt: VqtConfig,
    /// Universal parallel tuning: a light network beside the frozen backbone weighs every layer's
    /// hidden states against the last layer's and adds what it gathers to the backbone's output,
    /// so backward never touches the backbone.
    Unipt = "unipt" => unipt: UniptConfig,
    /// SHERL: gated adapters read every early layer's hidden states, an anti-redundancy
    /// aggregation merges them, and the result runs through the backbone's last (frozen) layers;
    /// backward crosses only those late layers and the adapters.
    Sherl = "sherl" => sherl: SherlConfig,
    /// A linear probe: only the classification head trains, on the frozen backbone's pooled
    /// output; the floor every other method must beat.
    Head = "head" => head: HeadConfig,
    /// Reversed recurrent tuning (R²-Tuning): one small shared block reads the frozen backbone's
    /// last layers from the last back to earlier ones, refining one state per layer through
    /// learnable query tokens; the head reads that state, so backward never touches the backbone.
    R2 = "r2" => r2: R2Config,
}

impl fmt::Display for MethodType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A method name that is not in the table.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown method {name:?}; valid methods: {valid}")]
pub struct UnknownMethod {
    /// What was asked for.
    pub name: String,
    /// The accepted names, comma-separated.
    pub valid: String,
}

impl FromStr for MethodType {
    type Err = UnknownMethod;

    /// Parses a YAML method name (`lora`), as `spec.method.type` accepts it.
    fn from_str(name: &str) -> Result<Self, UnknownMethod> {
        MethodType::ALL
            .iter()
            .copied()
            .find(|m| m.as_str() == name)
            .ok_or_else(|| UnknownMethod {
                name: name.to_string(),
                valid: MethodType::ALL
                    .iter()
                    .map(|m| m.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
            })
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
    /// Initialise side layers from structurally pruned backbone weights (`true`) or randomly
    /// (`false`). Unset: pruned where the backbone allows it (post-LayerNorm encoder blocks, as in
    /// BERT-family models, and a side width divisible by the head count), random otherwise (the
    /// pre-norm ViT and Llama blocks).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init_from_backbone: Option<bool>,
}

impl Default for LstConfig {
    fn default() -> Self {
        Self {
            reduction: default_lst_reduction(),
            layers: None,
            gate_init: 0.0,
            init_from_backbone: None,
        }
    }
}

fn default_lst_reduction() -> i32 {
    8
}

/// Universal parallel tuning (UniPT): per-layer down-projections to width hidden/reduction, the
/// confidence aggregation of all layers against the last one, and an up-projection added to the
/// backbone's output.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct UniptConfig {
    /// Width of the parallel network = backbone hidden size / reduction (rounded down, at least
    /// 1). The default 4 gives MiniLM's 384 → 96.
    #[serde(default = "default_unipt_reduction")]
    #[schemars(range(min = 1, max = 64))]
    pub reduction: i32,
    /// Start the up-projection at zero, so training starts exactly from the linear probe on
    /// the backbone's output. Off by default: PyTorch's default init, as the UniPT code, trained
    /// better on Rotten Tomatoes (the rest of the network gets no gradient until it moves).
    #[serde(default)]
    pub zero_init_up: bool,
}

impl Default for UniptConfig {
    fn default() -> Self {
        Self {
            reduction: default_unipt_reduction(),
            zero_init_up: false,
        }
    }
}

fn default_unipt_reduction() -> i32 {
    4
}
fn default_true() -> bool {
    true
}

/// SHERL (Diao et al., ECCV 2024): the multi-tiered sensing adapter. Per early hidden state a
/// gated residual adapter to width hidden/reduction, an anti-redundancy aggregation over those
/// layers, a projection back to the hidden width, then the backbone's last `lateLayers` blocks
/// (frozen, back-propagated through).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SherlConfig {
    /// Adapter width = backbone hidden size / reduction (rounded down, at least 1). The default 8
    /// (LST's, which the SHERL code's T5 scripts reuse) gives MiniLM's 384 → 48.
    #[serde(default = "default_sherl_reduction")]
    #[schemars(range(min = 1, max = 64))]
    pub reduction: i32,
    /// How many of the backbone's last blocks re-run on the adapter's output (the late route),
    /// with gradients through them but not into their weights. The SHERL code uses 1; 0 puts the
    /// adapter's output straight on the head. Must be below the backbone's number of layers.
    #[serde(default = "default_sherl_late_layers")]
    #[schemars(range(min = 0, max = 64))]
    pub late_layers: i32,
}

impl Default for SherlConfig {
    fn default() -> Self {
        Self {
            reduction: default_sherl_reduction(),
            late_layers: default_sherl_late_layers(),
        }
    }
}

fn default_sherl_reduction() -> i32 {
    8
}
fn default_sherl_late_layers() -> i32 {
    1
}

/// Visual query tuning (Tu, Mai, Chao, CVPR 2023): `queries` learnable tokens per block; the
/// head reads the pooled output and each block's query outputs, combined as `combine` says.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct VqtConfig {
    /// Query tokens per block (the official code's default is 5; its VTAB runs use 1 to 20).
    #[serde(default = "default_vqt_queries")]
    #[schemars(range(min = 1, max = 64))]
    pub queries: i32,
    /// How each block's query outputs reach the head: `concat` keeps every query (head input
    /// hidden · (1 + layers · queries)), `mean` averages a block's queries (hidden · (1 + layers)).
    #[serde(default)]
    pub combine: VqtCombine,
    /// Dropout on the query tokens during training, in [0, 0.9] (the official code's 0.1).
    #[serde(default = "default_vqt_dropout")]
    #[schemars(range(min = 0.0, max = 0.9))]
    pub dropout: f64,
    /// L2-normalise the pooled output and each block's query features before the head.
    #[serde(default = "default_true")]
    pub normalize_features: bool,
}

impl Default for VqtConfig {
    fn default() -> Self {
        Self {
            queries: default_vqt_queries(),
            combine: VqtCombine::default(),
            dropout: default_vqt_dropout(),
            normalize_features: true,
        }
    }
}

/// How VQT combines a block's query outputs into head features.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum VqtCombine {
    /// Every query output of every block, side by side.
    #[default]
    Concat,
    /// The mean of each block's query outputs: a head input independent of `queries`.
    Mean,
}

fn default_vqt_queries() -> i32 {
    5
}
fn default_vqt_dropout() -> f64 {
    0.1
}

/// R²-Tuning (Liu et al., ECCV 2024): one R² block of width `dims`, shared by the backbone's last
/// `layers` layers and run from the last back to the earlier ones; `queries` learnable tokens per
/// layer take the place of the paper's text query.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct R2Config {
    /// How many of the backbone's last layers the block reads (the paper's k = 4); every layer
    /// when the backbone has fewer.
    #[serde(default = "default_r2_layers")]
    #[schemars(range(min = 1, max = 64))]
    pub layers: i32,
    /// Width of the R² block (the paper's 256 on CLIP; 128 by default, a third of MiniLM's 384).
    #[serde(default = "default_r2_dims")]
    #[schemars(range(min = 1, max = 1024))]
    pub dims: i32,
    /// Learnable query tokens per layer, read through the block's query map where the paper
    /// reads the text query's tokens.
    #[serde(default = "default_r2_queries")]
    #[schemars(range(min = 1, max = 64))]
    pub queries: i32,
    /// Dropout in the block's token and query maps during training, in [0, 0.9] (the paper's 0.5
    /// on cached CLIP features).
    #[serde(default = "default_r2_dropout")]
    #[schemars(range(min = 0.0, max = 0.9))]
    pub dropout: f64,
}

impl Default for R2Config {
    fn default() -> Self {
        Self {
            layers: default_r2_layers(),
            dims: default_r2_dims(),
            queries: default_r2_queries(),
            dropout: default_r2_dropout(),
        }
    }
}

fn default_r2_layers() -> i32 {
    4
}
fn default_r2_dims() -> i32 {
    128
}
fn default_r2_queries() -> i32 {
    4
}
fn default_r2_dropout() -> f64 {
    0.1
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

    #[test]
    fn every_method_has_one_name_for_type_block_and_parser() {
        for &m in MethodType::ALL {
            let name = m.as_str();
            assert_eq!(serde_json::to_value(m).unwrap(), name);
            assert_eq!(name.parse::<MethodType>(), Ok(m));
            let spec: MethodSpec =
                serde_json::from_value(serde_json::json!({"type": name, name: {}})).unwrap();
            assert_eq!(spec.blocks_present(), [m], "{name}");
            assert_eq!(spec.config().method_type(), m);
            assert!(!m.summary().is_empty() && !m.summary().starts_with(' '));
        }
    }

    #[test]
    fn unknown_name_lists_the_valid_ones() {
        let err = "lst2".parse::<MethodType>().unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("\"lst2\""), "{msg}");
        for m in MethodType::ALL {
            assert!(msg.contains(m.as_str()), "{msg}");
        }
    }

    #[test]
    fn schema_has_one_settings_rule_per_method() {
        let schema = serde_json::to_value(schemars::schema_for!(MethodSpec)).unwrap();
        let rules = schema["x-kubernetes-validations"].as_array().unwrap();
        assert_eq!(rules.len(), MethodType::ALL.len());
        for (m, r) in MethodType::ALL.iter().zip(rules) {
            let name = m.as_str();
            assert_eq!(
                r["rule"],
                format!("!has(self.{name}) || self.type == '{name}'")
            );
            assert!(schema["properties"][name].is_object(), "{name}");
        }
    }
}
