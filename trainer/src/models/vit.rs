//! DINOv2 vision transformer (ViT-S/14 and its siblings) in the Hugging Face `Dinov2Model` layout,
//! built on `nn`: patch embedding, [CLS] token, position embeddings interpolated to the input's
//! patch grid, pre-norm blocks with layer scale, final LayerNorm.
//!
//! Weight names match the checkpoint (`encoder.layer.N.attention.attention.query.weight`), and are
//! written once, in [`Vit::visit`], which loading, random init and naming all walk. Loads a Hugging
//! Face directory (`config.json` + `model.safetensors`) or a `torch.onnx` export of one
//! (`vit_onnx`).

use std::collections::HashMap;
use std::ops::Range;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use serde::Deserialize;

use crate::nn::{self, Activation, LayerNorm, Linear};
use crate::tape;
use crate::{Error, Result};

/// The fields of a `Dinov2Config` (`config.json`) the backbone needs.
#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct Config {
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default = "default_mlp_ratio")]
    pub mlp_ratio: f64,
    pub patch_size: usize,
    /// The side of the square image the position table was trained for (`grid · patch_size`).
    pub image_size: usize,
    #[serde(default = "default_channels")]
    pub num_channels: usize,
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    #[serde(default = "default_act")]
    pub hidden_act: String,
    /// The initial layer-scale value (random init only; checkpoints carry their own).
    #[serde(default = "default_layerscale")]
    pub layerscale_value: f64,
    #[serde(default)]
    pub use_swiglu_ffn: bool,
}

fn default_mlp_ratio() -> f64 {
    4.0
}
fn default_channels() -> usize {
    3
}
fn default_eps() -> f64 {
    1e-6
}
fn default_act() -> String {
    "gelu".into()
}
fn default_layerscale() -> f64 {
    1.0
}

/// Standard deviation of Hugging Face's `initializer_range` for DINOv2, used by [`Vit::random`].
const INIT_STD: f64 = 0.02;

impl Config {
    /// A DINOv2 of the given shape with `config.json`'s defaults for the rest (MLP ratio 4, three
    /// channels, GELU, LayerNorm ε 1e-6): what tests build random models from.
    pub fn with_shape(
        hidden_size: usize,
        num_hidden_layers: usize,
        num_attention_heads: usize,
        patch_size: usize,
        image_size: usize,
    ) -> Self {
        Self {
            hidden_size,
            num_hidden_layers,
            num_attention_heads,
            mlp_ratio: default_mlp_ratio(),
            patch_size,
            image_size,
            num_channels: default_channels(),
            layer_norm_eps: default_eps(),
            hidden_act: default_act(),
            layerscale_value: default_layerscale(),
            use_swiglu_ffn: false,
        }
    }

    pub fn intermediate_size(&self) -> usize {
        (self.hidden_size as f64 * self.mlp_ratio).round() as usize
    }

    /// Patches per side of the position table.
    pub fn grid(&self) -> usize {
        self.image_size / self.patch_size
    }

    fn check(&self) -> Result<()> {
        let bad = |field: &str, message: String| {
            Err(Error::Config {
                field: format!("config.json {field}"),
                message,
            })
        };
        if self.hidden_act != "gelu" {
            return bad(
                "hidden_act",
                format!(
                    "{:?} is not supported; the DINOv2 backbone implements \"gelu\"",
                    self.hidden_act
                ),
            );
        }
        if self.use_swiglu_ffn {
            return bad(
                "use_swiglu_ffn",
                "the SwiGLU MLP (DINOv2 giant) is not supported".into(),
            );
        }
        if self.num_attention_heads == 0
            || !self.hidden_size.is_multiple_of(self.num_attention_heads)
        {
            return bad(
                "num_attention_heads",
                format!(
                    "{} heads do not divide hidden_size {}",
                    self.num_attention_heads, self.hidden_size
                ),
            );
        }
        if self.patch_size == 0 || !self.image_size.is_multiple_of(self.patch_size) {
            return bad(
                "image_size",
                format!(
                    "{} is not a multiple of patch_size {}",
                    self.image_size, self.patch_size
                ),
            );
        }
        Ok(())
    }
}

/// Patch projection (a stride-`p` convolution, held as a linear map over flattened
/// `(channel, row, column)` patches), the [CLS] token and the position table.
#[derive(Clone, Debug)]
pub struct Embeddings {
    /// `(1, 1, d)`.
    pub cls_token: Tensor,
    /// `(1, 1 + grid², d)`: the [CLS] position, then the patch grid row by row.
    pub position: Tensor,
    /// Weight `(d, C·p·p)`: the checkpoint's `(d, C, p, p)` convolution kernel, flattened.
    pub patch: Linear,
}

/// One pre-norm block: `x + λ₁·attn(norm1(x))`, then `x + λ₂·mlp(norm2(x))`.
#[derive(Clone, Debug)]
pub struct Layer {
    pub norm1: LayerNorm,
    pub query: Linear,
    pub key: Linear,
    pub value: Linear,
    pub attention_output: Linear,
    /// `(d,)`.
    pub layer_scale1: Tensor,
    pub norm2: LayerNorm,
    pub fc1: Linear,
    pub fc2: Linear,
    /// `(d,)`.
    pub layer_scale2: Tensor,
    pub heads: usize,
}

impl Layer {
    /// `h` `(B, T, d)`; `bias` the `(1, 1, 1, T)` zeros attention adds (no token is masked).
    pub fn forward(&self, h: &Tensor, bias: &Tensor) -> Result<Tensor> {
        self.forward_reading(h, None, bias)
    }

    /// The block on `h` with attention reading its keys and values from `context` `(B, T, d)`
    /// (`bias` over T) instead of `h`, when given: what VQT's query tokens go through.
    pub fn forward_reading(
        &self,
        h: &Tensor,
        context: Option<&Tensor>,
        bias: &Tensor,
    ) -> Result<Tensor> {
        let x = self.norm1.forward(h)?;
        let c = context.map(|c| self.norm1.forward(c)).transpose()?;
        let c = c.as_ref().unwrap_or(&x);
        let (q, k, v) = (
            self.query.forward(&x)?,
            self.key.forward(c)?,
            self.value.forward(c)?,
        );
        let ctx = nn::attention(&q, &k, &v, bias, self.heads)?;
        let a = self.attention_output.forward(&ctx)?;
        let h = nn::scaled_residual(h, &a, &self.layer_scale1)?;
        let m = self
            .fc1
            .forward_act(&self.norm2.forward(&h)?, Activation::Gelu)?;
        let m = self.fc2.forward(&m)?;
        nn::scaled_residual(&h, &m, &self.layer_scale2)
    }

    /// The block's linears under their checkpoint module names, relative to the block.
    pub fn linears_mut(&mut self) -> Vec<(&'static str, &mut Linear)> {
        self.parts_mut().0
    }

    /// The block's linears (named as in [`Layer::linears_mut`]), its two norms and its two
    /// layer-scale vectors, borrowed at once.
    fn parts_mut(&mut self) -> BlockParts<'_> {
        let Self {
            norm1,
            query,
            key,
            value,
            attention_output,
            layer_scale1,
            norm2,
            fc1,
            fc2,
            layer_scale2,
            heads: _,
        } = self;
        let linears = vec![
            ("attention.attention.query", query),
            ("attention.attention.key", key),
            ("attention.attention.value", value),
            ("attention.output.dense", attention_output),
            ("mlp.fc1", fc1),
            ("mlp.fc2", fc2),
        ];
        (linears, [norm1, norm2], [layer_scale1, layer_scale2])
    }
}

type BlockParts<'a> = (
    Vec<(&'static str, &'a mut Linear)>,
    [&'a mut LayerNorm; 2],
    [&'a mut Tensor; 2],
);

/// Which summary of the last hidden state a head reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pooling {
    /// The [CLS] token (Hugging Face's `pooler_output`).
    Cls,
    /// The mean of the patch tokens.
    MeanPatches,
}

/// What [`Vit::visit`] is asked to do with one tensor, so that init knows its role.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// A linear or convolution weight, a [CLS] token or a position table.
    Weight,
    /// A linear bias or a LayerNorm shift.
    Bias,
    /// A LayerNorm gain.
    Gain,
    /// A layer-scale vector.
    LayerScale,
}

/// A DINOv2 backbone whose weights are frozen until a method turns some of them into `Var`s.
#[derive(Clone, Debug)]
pub struct Vit {
    pub config: Config,
    pub embeddings: Embeddings,
    pub layers: Vec<Layer>,
    pub layernorm: LayerNorm,
}

impl Vit {
    /// Loads `path`: a `.onnx` export (`vit_onnx`), or a Hugging Face directory with
    /// `config.json` and `model.safetensors`.
    pub fn load(path: &Path, dtype: DType, device: &Device) -> Result<Self> {
        if path.extension().is_some_and(|e| e == "onnx") {
            let (config, weights) = super::vit_onnx::read(path, device)?;
            return Self::from_weights(config, &weights, &path.display().to_string(), dtype);
        }
        let config: Config = crate::read_json(&path.join("config.json"))?;
        let file = path.join("model.safetensors");
        if !file.is_file() {
            return Err(Error::Missing {
                what: "ViT weights".into(),
                path: file.display().to_string(),
                fix: "point model.uri at a .onnx file or a directory holding config.json and \
                      model.safetensors"
                    .into(),
            });
        }
        let weights = candle_core::safetensors::load(&file, device)?;
        Self::from_weights(config, &weights, &file.display().to_string(), dtype)
    }

    /// Builds the backbone from tensors under their checkpoint names (a `dinov2.` prefix, as in
    /// `Dinov2ForImageClassification`, is accepted). Tensors not named by the model are ignored.
    pub fn from_weights(
        config: Config,
        weights: &HashMap<String, Tensor>,
        file: &str,
        dtype: DType,
    ) -> Result<Self> {
        let device = weights
            .values()
            .next()
            .map(|t| t.device().clone())
            .unwrap_or(Device::Cpu);
        let mut vit = Self::zeros(config, dtype, &device)?;
        vit.visit(&mut |name, t, _| {
            let found = weights
                .get(name)
                .or_else(|| weights.get(&format!("dinov2.{name}")))
                .ok_or_else(|| Error::Weights {
                    file: file.to_string(),
                    message: format!("no tensor {name}; is this a DINOv2 checkpoint?"),
                })?;
            // The patch kernel `(d, C, p, p)` is held flattened.
            let found = if found.rank() == 4 {
                found.flatten_from(1)?
            } else {
                found.clone()
            };
            if found.dims() != t.dims() {
                return Err(Error::Weights {
                    file: file.to_string(),
                    message: format!(
                        "{name} has shape {:?}, the config implies {:?}",
                        found.dims(),
                        t.dims()
                    ),
                });
            }
            *t = found.to_dtype(dtype)?;
            Ok(())
        })?;
        Ok(vit)
    }

    /// A randomly initialised backbone as Hugging Face initialises one before pre-training:
    /// weights, tokens and positions with standard deviation 0.02 (uniform rather than truncated
    /// normal), zero biases, unit LayerNorm gains, layer scale `layerscale_value`.
    pub fn random(config: Config, seed: u64, dtype: DType, device: &Device) -> Result<Self> {
        let layerscale = config.layerscale_value;
        let mut vit = Self::zeros(config, dtype, device)?;
        let mut rng = crate::init::Rng::new(seed);
        let bound = INIT_STD * 3f64.sqrt();
        vit.visit(&mut |_, t, role| {
            *t = match role {
                Role::Weight => rng.uniform_tensor(t.dims(), bound, dtype, device)?,
                Role::Bias => t.zeros_like()?,
                Role::Gain => t.ones_like()?,
                Role::LayerScale => t.ones_like()?.affine(layerscale, 0.0)?,
            };
            Ok(())
        })?;
        Ok(vit)
    }

    /// Every tensor at its final shape, all zeros: the skeleton loading and init fill in.
    fn zeros(config: Config, dtype: DType, device: &Device) -> Result<Self> {
        config.check()?;
        let (d, ff, p, c) = (
            config.hidden_size,
            config.intermediate_size(),
            config.patch_size,
            config.num_channels,
        );
        let z = |shape: &[usize]| Tensor::zeros(shape, dtype, device);
        let linear = |out: usize, inp: usize| -> Result<Linear> {
            Ok(Linear::new(z(&[out, inp])?, Some(z(&[out])?)))
        };
        let norm = || -> Result<LayerNorm> {
            Ok(LayerNorm {
                weight: z(&[d])?,
                bias: z(&[d])?,
                eps: config.layer_norm_eps,
            })
        };
        let embeddings = Embeddings {
            cls_token: z(&[1, 1, d])?,
            position: z(&[1, 1 + config.grid() * config.grid(), d])?,
            patch: linear(d, c * p * p)?,
        };
        let layers = (0..config.num_hidden_layers)
            .map(|_| {
                Ok(Layer {
                    norm1: norm()?,
                    query: linear(d, d)?,
                    key: linear(d, d)?,
                    value: linear(d, d)?,
                    attention_output: linear(d, d)?,
                    layer_scale1: z(&[d])?,
                    norm2: norm()?,
                    fc1: linear(ff, d)?,
                    fc2: linear(d, ff)?,
                    layer_scale2: z(&[d])?,
                    heads: config.num_attention_heads,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            layernorm: norm()?,
            config,
            embeddings,
            layers,
        })
    }

    /// Every tensor under its checkpoint name, with its role: the one place the names are
    /// written.
    pub fn tensors_mut(&mut self) -> Vec<(String, &mut Tensor, Role)> {
        let mut out = Vec::new();
        let e = &mut self.embeddings;
        push_linear(
            &mut out,
            "embeddings.patch_embeddings.projection",
            &mut e.patch,
        );
        out.push((
            "embeddings.cls_token".into(),
            &mut e.cls_token,
            Role::Weight,
        ));
        out.push((
            "embeddings.position_embeddings".into(),
            &mut e.position,
            Role::Weight,
        ));
        for (i, layer) in self.layers.iter_mut().enumerate() {
            let p = format!("encoder.layer.{i}");
            let (linears, [norm1, norm2], scales) = layer.parts_mut();
            for (name, l) in linears {
                push_linear(&mut out, &format!("{p}.{name}"), l);
            }
            push_norm(&mut out, &format!("{p}.norm1"), norm1);
            push_norm(&mut out, &format!("{p}.norm2"), norm2);
            for (k, t) in scales.into_iter().enumerate() {
                out.push((
                    format!("{p}.layer_scale{}.lambda1", k + 1),
                    t,
                    Role::LayerScale,
                ));
            }
        }
        push_norm(&mut out, "layernorm", &mut self.layernorm);
        out
    }

    /// Calls `f` on every tensor of [`Vit::tensors_mut`].
    pub fn visit(&mut self, f: &mut Visitor) -> Result<()> {
        for (name, t, role) in self.tensors_mut() {
            f(&name, t, role)?;
        }
        Ok(())
    }

    /// Every tensor under its checkpoint name (handles to the model's tensors, not copies).
    pub fn parameters(&mut self) -> Vec<(String, Tensor)> {
        let mut out = Vec::new();
        let _ = self.visit(&mut |name, t, _| {
            out.push((name.to_string(), t.clone()));
            Ok(())
        });
        out
    }

    /// Every linear under its module path (`encoder.layer.N.attention.attention.query`).
    pub fn linears_mut(&mut self) -> Vec<(String, &mut Linear)> {
        let mut out = Vec::new();
        for (i, layer) in self.layers.iter_mut().enumerate() {
            for (name, l) in layer.linears_mut() {
                out.push((format!("encoder.layer.{i}.{name}"), l));
            }
        }
        out
    }

    /// Total number of backbone weights.
    pub fn parameter_count(&mut self) -> usize {
        self.parameters().iter().map(|(_, t)| t.elem_count()).sum()
    }

    pub fn hidden_size(&self) -> usize {
        self.config.hidden_size
    }

    pub fn dtype(&self) -> DType {
        self.embeddings.cls_token.dtype()
    }

    pub fn device(&self) -> &Device {
        self.embeddings.cls_token.device()
    }

    /// Patch tokens plus [CLS], with position embeddings: `pixels` `(B, C, H, W)`, normalised,
    /// `H` and `W` multiples of the patch size → `(B, 1 + (H/p)·(W/p), d)`.
    pub fn embed(&self, pixels: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = pixels.dims4()?;
        let (p, d) = (self.config.patch_size, self.config.hidden_size);
        if c != self.config.num_channels
            || !h.is_multiple_of(p)
            || !w.is_multiple_of(p)
            || h == 0
            || w == 0
        {
            return Err(Error::Config {
                field: "dataset.image.size".into(),
                message: format!(
                    "the backbone takes {} channels at a multiple of {p} pixels a side; got {c}×{h}×{w}",
                    self.config.num_channels
                ),
            });
        }
        let (gh, gw) = (h / p, w / p);
        // (B, C, gh, p, gw, p) → (B, gh, gw, C, p, p): each patch flattened in the kernel's order.
        let patches = pixels
            .to_dtype(self.dtype())?
            .reshape(vec![b, c, gh, p, gw, p])?
            .permute(vec![0, 2, 4, 1, 3, 5])?
            .reshape((b, gh * gw, c * p * p))?;
        let x = self.embeddings.patch.forward(&patches)?;
        let position = self.position_embeddings(gh, gw)?;
        prepend_and_place(&self.embeddings.cls_token, &x, &position, d)
    }

    /// The position table for a `gh × gw` patch grid, `(1, 1 + gh·gw, d)`: the trained grid
    /// resized bicubically (as `torch.nn.functional.interpolate(mode="bicubic",
    /// align_corners=False)`), the [CLS] position unchanged.
    pub fn position_embeddings(&self, gh: usize, gw: usize) -> Result<Tensor> {
        let pos = &self.embeddings.position;
        let (s, d) = (self.config.grid(), self.config.hidden_size);
        if (gh, gw) == (s, s) {
            return Ok(pos.clone());
        }
        let cls = pos.narrow(1, 0, 1)?;
        let grid = pos.narrow(1, 1, s * s)?.reshape((s, s * d))?;
        let (mh, mw) = (
            bicubic_matrix(s, gh, pos.dtype(), pos.device())?,
            bicubic_matrix(s, gw, pos.dtype(), pos.device())?,
        );
        // Rows first: (gh, s·d) seen as (gh, s, d); then columns, with the grid's axes swapped.
        let rows = mh.matmul(&grid)?.reshape((gh, s, d))?;
        let cols = rows.transpose(0, 1)?.contiguous()?.reshape((s, gh * d))?;
        let resized = mw
            .matmul(&cols)?
            .reshape((gw, gh, d))?
            .transpose(0, 1)?
            .contiguous()?
            .reshape((1, gh * gw, d))?;
        Ok(Tensor::cat(&[&cls, &resized], 1)?)
    }

    /// The `(1, 1, 1, T)` zero bias attention adds: every token attends to every token.
    fn attention_bias(&self, tokens: usize) -> Result<Tensor> {
        Ok(Tensor::zeros(
            (1, 1, 1, tokens),
            self.dtype(),
            self.device(),
        )?)
    }

    /// All `L + 1` hidden states (embeddings, then each block's output, before the final
    /// LayerNorm) with no graph: what side networks and ladders read. Each state is detached.
    pub fn forward_hidden(&self, pixels: &Tensor) -> Result<Vec<Tensor>> {
        self.forward_hidden_through(pixels, self.layers.len())
    }

    /// The embeddings' output and the outputs of the first `blocks` blocks, with no graph.
    pub fn forward_hidden_through(&self, pixels: &Tensor, blocks: usize) -> Result<Vec<Tensor>> {
        let h = self.embed(pixels)?;
        let bias = self.attention_bias(h.dim(1)?)?;
        crate::models::backbone::frozen_taps(&self.layers, blocks, h, |l, h| l.forward(h, &bias))
    }

    /// Runs `range` of the blocks on `h`, building a graph wherever something trains.
    pub fn run_layers(&self, range: Range<usize>, h: &Tensor) -> Result<Tensor> {
        if range.end > self.layers.len() {
            return Err(Error::Config {
                field: "layers".into(),
                message: format!(
                    "range {range:?} exceeds the model's {} layers",
                    self.layers.len()
                ),
            });
        }
        let bias = self.attention_bias(h.dim(1)?)?;
        let mut h = h.clone();
        for layer in &self.layers[range] {
            h = layer.forward(&h, &bias)?;
        }
        Ok(h)
    }

    /// The last hidden state after the final LayerNorm, `(B, 1 + N, d)` ([CLS] first).
    pub fn forward(&self, pixels: &Tensor) -> Result<Tensor> {
        let h = self.embed(pixels)?;
        let h = self.run_layers(0..self.layers.len(), &h)?;
        self.layernorm.forward(&h)
    }

    /// One `(B, d)` vector an image: the [CLS] token or the mean patch token.
    pub fn pooled(&self, pixels: &Tensor, pooling: Pooling) -> Result<Tensor> {
        let h = self.forward(pixels)?;
        Ok(match pooling {
            Pooling::Cls => h.narrow(1, 0, 1)?.squeeze(1)?,
            Pooling::MeanPatches => h.narrow(1, 1, h.dim(1)? - 1)?.mean(1)?,
        })
    }
}

type Visitor<'a> = dyn FnMut(&str, &mut Tensor, Role) -> Result<()> + 'a;

type Entry<'a> = (String, &'a mut Tensor, Role);

/// `[cls; x] + position` as one node: `cls` `(1, 1, d)` before the `(B, N, d)` patch tokens,
/// `position` `(1, 1 + N, d)` added to every example. Each input gets a gradient only if it
/// tracks (with candle's `cat` and `+`, a frozen [CLS] or position table beside trainable patch
/// tokens, as under BitFit, would get full-size gradients no one reads).
fn prepend_and_place(cls: &Tensor, x: &Tensor, position: &Tensor, d: usize) -> Result<Tensor> {
    let b = x.dim(0)?;
    let cls_b = cls.detach().broadcast_as((b, 1, d))?;
    let value = Tensor::cat(&[&cls_b, &x.detach()], 1)?.broadcast_add(&position.detach())?;
    let (need_cls, need_x, need_pos) = (tape::tracks(cls), tape::tracks(x), tape::tracks(position));
    tape::attach(&[cls, x, position], value, move |g| {
        let n = g.dim(1)? - 1;
        let dcls = need_cls
            .then(|| g.narrow(1, 0, 1)?.sum_keepdim(0))
            .transpose()?;
        let dx = need_x
            .then(|| g.narrow(1, 1, n)?.contiguous())
            .transpose()?;
        let dpos = need_pos.then(|| g.sum_keepdim(0)).transpose()?;
        Ok(vec![dcls, dx, dpos])
    })
}

fn push_linear<'a>(out: &mut Vec<Entry<'a>>, name: &str, l: &'a mut Linear) {
    out.push((format!("{name}.weight"), &mut l.weight, Role::Weight));
    if let Some(b) = l.bias.as_mut() {
        out.push((format!("{name}.bias"), b, Role::Bias));
    }
}

fn push_norm<'a>(out: &mut Vec<Entry<'a>>, name: &str, n: &'a mut LayerNorm) {
    out.push((format!("{name}.weight"), &mut n.weight, Role::Gain));
    out.push((format!("{name}.bias"), &mut n.bias, Role::Bias));
}

/// The `(output, input)` matrix of 1-D bicubic resampling (Keys, a = −0.75) with half-pixel
/// centres and edge-clamped taps: PyTorch's `bicubic` with `align_corners=False`, and ONNX
/// `Resize(mode=cubic, coordinate_transformation_mode=half_pixel)`.
pub fn bicubic_matrix(
    input: usize,
    output: usize,
    dtype: DType,
    device: &Device,
) -> Result<Tensor> {
    const A: f64 = -0.75;
    let near = |x: f64| ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0; // |x| ≤ 1
    let far = |x: f64| ((A * x - 5.0 * A) * x + 8.0 * A) * x - 4.0 * A; // 1 < |x| < 2
    let scale = input as f64 / output as f64;
    let mut m = vec![0f64; output * input];
    for (o, row) in m.chunks_mut(input).enumerate() {
        let src = (o as f64 + 0.5) * scale - 0.5;
        let base = src.floor();
        let t = src - base;
        let weights = [far(t + 1.0), near(t), near(1.0 - t), far(2.0 - t)];
        for (k, w) in weights.into_iter().enumerate() {
            let index = (base as i64 - 1 + k as i64).clamp(0, input as i64 - 1) as usize;
            row[index] += w;
        }
    }
    Ok(Tensor::from_vec(m, (output, input), device)?.to_dtype(dtype)?)
}
