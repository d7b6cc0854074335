//! Reads the weights of an ONNX file (its initializers) and the few graph facts a weight loader
//! needs (which node reads which initializer, the value of a constant), without running the graph.
//!
//! Only the protobuf fields petl reads are declared below; prost skips the others. So there is no
//! `protoc` and no generated code: `candle-onnx` compiles `onnx.proto3` in its build script with
//! `protoc`, which CI does not install.

use std::collections::HashMap;
use std::path::Path;

use bytes::Bytes;
use candle_core::{DType, Device, Tensor};
use prost::Message;

use crate::{Error, Result};

// ---- The subset of onnx.proto petl reads (field numbers from onnx/onnx.proto) ----------------

#[derive(Clone, PartialEq, prost::Message)]
struct ModelProto {
    #[prost(message, optional, tag = "7")]
    graph: Option<GraphProto>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct GraphProto {
    #[prost(message, repeated, tag = "1")]
    node: Vec<NodeProto>,
    #[prost(message, repeated, tag = "5")]
    initializer: Vec<TensorProto>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct NodeProto {
    #[prost(string, repeated, tag = "1")]
    input: Vec<String>,
    #[prost(string, repeated, tag = "2")]
    output: Vec<String>,
    #[prost(string, tag = "3")]
    name: String,
    #[prost(string, tag = "4")]
    op_type: String,
    #[prost(message, repeated, tag = "5")]
    attribute: Vec<AttributeProto>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct AttributeProto {
    #[prost(string, tag = "1")]
    name: String,
    #[prost(message, optional, tag = "5")]
    t: Option<TensorProto>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct TensorProto {
    #[prost(int64, repeated, tag = "1")]
    dims: Vec<i64>,
    #[prost(int32, tag = "2")]
    data_type: i32,
    #[prost(float, repeated, tag = "4")]
    float_data: Vec<f32>,
    #[prost(int64, repeated, tag = "7")]
    int64_data: Vec<i64>,
    #[prost(string, tag = "8")]
    name: String,
    /// Little-endian values; a slice of the file's buffer, not a copy.
    #[prost(bytes = "bytes", tag = "9")]
    raw_data: Bytes,
    #[prost(double, repeated, tag = "10")]
    double_data: Vec<f64>,
    /// 1 = EXTERNAL: the values live in another file.
    #[prost(int32, tag = "14")]
    data_location: i32,
}

// TensorProto.DataType values petl reads.
const FLOAT: i32 = 1;
const INT64: i32 = 7;
const DOUBLE: i32 = 11;

// ---- The graph as the loaders see it ----------------------------------------------------------

/// One operator of the graph: its name (the exporter's module path, e.g.
/// `/backbone/encoder/layer.0/mlp/fc1/MatMul`), type and the value names it reads and writes.
#[derive(Debug, Clone)]
pub struct Node {
    pub name: String,
    pub op_type: String,
    pub inputs: Vec<String>,
    pub outputs: Vec<String>,
}

/// An ONNX model's operators and weights, read once from its file.
pub struct OnnxGraph {
    path: String,
    nodes: Vec<Node>,
    initializers: HashMap<String, TensorProto>,
    /// The tensor each `Constant` node produces, by output name.
    constants: HashMap<String, TensorProto>,
}

impl OnnxGraph {
    /// Parses `path`; weights stay slices of the one file buffer until asked for.
    pub fn read(path: &Path) -> Result<Self> {
        let shown = path.display().to_string();
        let bytes = std::fs::read(path).map_err(|source| Error::Io {
            path: shown.clone(),
            source,
        })?;
        let model = ModelProto::decode(Bytes::from(bytes)).map_err(|e| Error::Weights {
            file: shown.clone(),
            message: format!("not an ONNX model ({e}); point model.uri at a .onnx file"),
        })?;
        let graph = model.graph.ok_or_else(|| Error::Weights {
            file: shown.clone(),
            message: "the ONNX model has no graph".into(),
        })?;
        let mut constants = HashMap::new();
        let mut nodes = Vec::with_capacity(graph.node.len());
        for n in graph.node {
            if n.op_type == "Constant"
                && let (Some(out), Some(value)) = (
                    n.output.first(),
                    n.attribute.iter().find(|a| a.name == "value"),
                )
                && let Some(t) = &value.t
            {
                constants.insert(out.clone(), t.clone());
            }
            nodes.push(Node {
                name: n.name,
                op_type: n.op_type,
                inputs: n.input,
                outputs: n.output,
            });
        }
        let initializers = graph
            .initializer
            .into_iter()
            .map(|t| (t.name.clone(), t))
            .collect();
        Ok(Self {
            path: shown,
            nodes,
            initializers,
            constants,
        })
    }

    /// The file the graph came from, for error messages.
    pub fn path(&self) -> &str {
        &self.path
    }

    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    /// Initializer names, in no particular order.
    pub fn initializer_names(&self) -> impl Iterator<Item = &str> {
        self.initializers.keys().map(String::as_str)
    }

    pub fn has_initializer(&self, name: &str) -> bool {
        self.initializers.contains_key(name)
    }

    /// The dimensions of initializer `name`, without reading its values.
    pub fn initializer_dims(&self, name: &str) -> Option<Vec<usize>> {
        self.initializers
            .get(name)
            .map(|t| t.dims.iter().map(|&d| d.max(0) as usize).collect())
    }

    /// Initializer `name` as an f32 tensor on `device`.
    pub fn initializer(&self, name: &str, device: &Device) -> Result<Tensor> {
        let t = self.initializers.get(name).ok_or_else(|| Error::Weights {
            file: self.path.clone(),
            message: format!("no initializer named {name}"),
        })?;
        self.to_tensor(t, name, device)
    }

    /// The values of the `Constant` node whose output is `output`, as f64 (shape dropped).
    pub fn constant(&self, output: &str) -> Option<Vec<f64>> {
        let t = self.constants.get(output)?;
        match t.data_type {
            INT64 if !t.int64_data.is_empty() => {
                Some(t.int64_data.iter().map(|&v| v as f64).collect())
            }
            INT64 => Some(
                t.raw_data
                    .chunks_exact(8)
                    .map(|c| i64::from_le_bytes(c.try_into().unwrap_or_default()) as f64)
                    .collect(),
            ),
            FLOAT | DOUBLE => self
                .to_tensor(t, output, &Device::Cpu)
                .ok()?
                .to_dtype(DType::F64)
                .ok()?
                .flatten_all()
                .ok()?
                .to_vec1()
                .ok(),
            _ => None,
        }
    }

    fn to_tensor(&self, t: &TensorProto, name: &str, device: &Device) -> Result<Tensor> {
        let bad = |message: String| Error::Weights {
            file: self.path.clone(),
            message: format!("initializer {name}: {message}"),
        };
        if t.data_location == 1 {
            return Err(bad(
                "its values are stored in an external file, which petl does not read; \
                 re-export the model with the weights inside the .onnx file"
                    .into(),
            ));
        }
        let dims: Vec<usize> = t.dims.iter().map(|&d| d.max(0) as usize).collect();
        let count: usize = dims.iter().product();
        let values: Vec<f32> = match t.data_type {
            FLOAT if !t.raw_data.is_empty() => t
                .raw_data
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            FLOAT => t.float_data.clone(),
            DOUBLE if !t.raw_data.is_empty() => t
                .raw_data
                .chunks_exact(8)
                .map(|c| f64::from_le_bytes(c.try_into().unwrap_or_default()) as f32)
                .collect(),
            DOUBLE => t.double_data.iter().map(|&v| v as f32).collect(),
            other => {
                return Err(bad(format!(
                    "data type {other} is not supported (petl reads float and double weights)"
                )));
            }
        };
        if values.len() != count {
            return Err(bad(format!(
                "holds {} values, its shape {dims:?} needs {count}",
                values.len()
            )));
        }
        Ok(Tensor::from_vec(values, dims, device)?)
    }

    /// Every initializer read by nodes of module `prefix` (a node-name prefix such as
    /// `/backbone/`) under the PyTorch module name it had before export:
    ///
    /// - named initializers (`backbone.layernorm.weight`) keep their name, minus `strip`;
    /// - a `Linear` weight that `torch.onnx` exported as an anonymous `onnx::MatMul_N` input,
    ///   stored `(in, out)`, becomes `<module path>.weight`, transposed back to `(out, in)`: node
    ///   `/backbone/encoder/layer.0/mlp/fc1/MatMul` gives `encoder.layer.0.mlp.fc1.weight`.
    ///
    /// Other anonymous initializers are left out; the caller finds them with [`Self::nodes`].
    pub fn module_weights(
        &self,
        prefix: &str,
        strip: &str,
        device: &Device,
    ) -> Result<HashMap<String, Tensor>> {
        let mut out = HashMap::new();
        for name in self.initializer_names() {
            if let Some(short) = name.strip_prefix(strip) {
                out.insert(short.to_string(), self.initializer(name, device)?);
            }
        }
        for node in &self.nodes {
            let Some(path) = node.name.strip_prefix(prefix) else {
                continue;
            };
            let Some(module) = path.strip_suffix("/MatMul") else {
                continue;
            };
            if node.op_type != "MatMul" {
                continue;
            }
            let Some(weight) = node.inputs.get(1).filter(|w| self.has_initializer(w)) else {
                continue;
            };
            let key = format!("{}.weight", module.replace('/', "."));
            out.insert(key, self.initializer(weight, device)?.t()?.contiguous()?);
        }
        Ok(out)
    }
}
