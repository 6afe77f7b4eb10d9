//! The decoder-only transformer most families are made of, assembled from plain settings.
//!
//! Families differ in a handful of choices — where the norms sit, whether q/k are
//! normalized, fused projections, soft-capping, multipliers, which layers slide or skip
//! RoPE — so each model module reads its config.json into [`DecoderSettings`] and this
//! module does the rest, with the checkpoint's own weight names.

use crate::attention::{scaled_dot_product_attention, AttentionMask};
use crate::cache::KvCache;
use crate::config::ConfigFile;
use crate::error::{Error, Result};
use crate::models::{LanguageModel, ModelInfo};
use crate::nn::{scalar_like, Embedding, Linear};
use crate::rope::Rope;
use crate::tap::Tap;
use crate::weights::{WeightPath, Weights};
use mlx_rs::{ops, Array, Dtype};

/// The MLP nonlinearity, by the names Transformers' `ACT2FN` uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// `silu` / `swish`.
    Silu,
    /// Exact (erf) GELU: `gelu`.
    Gelu,
    /// GELU with the tanh approximation: `gelu_pytorch_tanh`, `gelu_new`.
    GeluTanh,
    Relu,
}

impl Activation {
    /// The activation `name` (a config value) stands for; `field` names it in errors.
    pub fn from_config(config: &ConfigFile, field: &str, name: &str) -> Result<Activation> {
        Ok(match name {
            "silu" | "swish" => Activation::Silu,
            "gelu" => Activation::Gelu,
            "gelu_pytorch_tanh" | "gelu_new" | "gelu_fast" => Activation::GeluTanh,
            "relu" => Activation::Relu,
            other => {
                return Err(Error::config(
                    &config.path,
                    field,
                    format!("activation `{other}` is not supported (silu, gelu, gelu_pytorch_tanh, gelu_new, relu)"),
                ))
            }
        })
    }

    /// Exact GELU read as its tanh approximation: Gemma checkpoints name `gelu` but were
    /// trained with the approximation, and Transformers reads them so.
    pub fn gelu_as_tanh(self) -> Activation {
        match self {
            Activation::Gelu => Activation::GeluTanh,
            other => other,
        }
    }

    /// Applies the activation; the result keeps `x`'s dtype. The GELUs are computed in f32
    /// (MLX's versions would promote bf16 input through their f32 constants; PyTorch
    /// computes them in f32 internally and rounds once).
    pub fn apply(self, x: &Array) -> Result<Array> {
        let in_f32 = |f: fn(&Array) -> mlx_rs::error::Result<Array>| -> Result<Array> {
            Ok(f(&x.as_dtype(Dtype::Float32)?)?.as_dtype(x.dtype())?)
        };
        match self {
            Activation::Silu => Ok(mlx_rs::nn::silu(x)?),
            Activation::Gelu => in_f32(|x| mlx_rs::nn::gelu(x)),
            Activation::GeluTanh => in_f32(|x| mlx_rs::nn::gelu_approximate(x)),
            Activation::Relu => Ok(mlx_rs::nn::relu(x)?),
        }
    }
}

/// How a norm layer normalizes and scales.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum NormKind {
    /// `x / rms(x) * w`.
    Rms,
    /// `x / rms(x) * (1 + w)`: the weight is stored as an offset from one (Gemma).
    RmsPlusOne,
    /// `(x - mean) / std * w + b`, with or without the bias `b`.
    Layer { bias: bool },
}

/// A loaded norm layer.
#[derive(Debug, Clone)]
pub struct Norm {
    weight: Array,
    bias: Option<Array>,
    eps: f32,
    layer_norm: bool,
}

impl Norm {
    /// Loads `weight` (and `bias`) of a norm over the last `dim` features.
    pub fn load(w: &WeightPath, kind: NormKind, dim: i32, eps: f64) -> Result<Norm> {
        let weight = w.get("weight", &[dim])?;
        let (weight, bias) = match kind {
            NormKind::Rms => (weight, None),
            NormKind::RmsPlusOne => {
                // Transformers adds the one in f32, then works in the activation dtype.
                let one = Array::from_f32(1.0);
                let dtype = weight.dtype();
                (
                    weight
                        .as_dtype(Dtype::Float32)?
                        .add(&one)?
                        .as_dtype(dtype)?,
                    None,
                )
            }
            NormKind::Layer { bias } => {
                let bias = if bias {
                    Some(w.get("bias", &[dim])?)
                } else {
                    None
                };
                (weight, bias)
            }
        };
        Ok(Norm {
            weight,
            bias,
            eps: eps as f32,
            layer_norm: matches!(kind, NormKind::Layer { .. }),
        })
    }

    pub fn forward(&self, x: &Array) -> Result<Array> {
        Ok(if self.layer_norm {
            mlx_rs::fast::layer_norm(x, Some(&self.weight), self.bias.as_ref(), self.eps)?
        } else {
            mlx_rs::fast::rms_norm(x, Some(&self.weight), self.eps)?
        })
    }

    pub fn dtype(&self) -> Dtype {
        self.weight.dtype()
    }
}

/// How the query/key/value projections are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QkvLayout {
    /// `q_proj`, `k_proj`, `v_proj`.
    Separate,
    /// One `qkv_proj` whose output rows are q, then k, then v (Phi-3).
    Fused,
}

/// Where queries and keys are RMS-normalized before RoPE.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QkNorm {
    None,
    /// Over each head's `head_dim` features (`q_norm`/`k_norm` of width `head_dim`: Qwen3, Gemma 3).
    PerHead,
    /// Over the whole projection (`q_norm` of width `heads * head_dim`: OLMo 2).
    Projection,
}

/// The attention block of every layer.
#[derive(Debug, Clone)]
pub struct AttentionSettings {
    pub num_heads: i32,
    pub num_kv_heads: i32,
    pub head_dim: i32,
    pub qkv_layout: QkvLayout,
    /// Bias on the q/k/v projections.
    pub qkv_bias: bool,
    /// Bias on `o_proj`.
    pub o_bias: bool,
    pub qk_norm: QkNorm,
    /// The norm kind of `q_norm`/`k_norm`; the model's norm kind when `None`.
    pub qk_norm_kind: Option<NormKind>,
    /// Multiplies `q kᵀ` (usually `head_dim^-0.5`).
    pub scale: f32,
    /// `cap * tanh(scores / cap)` before the softmax (Gemma 2).
    pub logit_softcap: Option<f32>,
}

impl AttentionSettings {
    /// Separate q/k/v projections without biases or q/k norms, scores scaled by
    /// `head_dim^-0.5`, no soft-capping: what a family changes, it sets on top of this.
    pub fn new(num_heads: i32, num_kv_heads: i32, head_dim: i32) -> AttentionSettings {
        AttentionSettings {
            num_heads,
            num_kv_heads,
            head_dim,
            qkv_layout: QkvLayout::Separate,
            qkv_bias: false,
            o_bias: false,
            qk_norm: QkNorm::None,
            qk_norm_kind: None,
            scale: (head_dim as f32).powf(-0.5),
            logit_softcap: None,
        }
    }
}

/// How the MLP's projections are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MlpLayout {
    /// `down_proj(act(gate_proj(x)) * up_proj(x))`.
    Gated,
    /// The same with one `gate_up_proj` whose rows are the gate, then the up projection (Phi-3).
    FusedGated,
    /// `c_proj(act(c_fc(x)))` (StarCoder 2).
    Plain,
}

/// The MLP of every layer.
#[derive(Debug, Clone)]
pub struct MlpSettings {
    pub intermediate_size: i32,
    pub layout: MlpLayout,
    pub activation: Activation,
    pub bias: bool,
}

/// Where a layer's norms sit around its two sub-blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NormPlacement {
    /// `x + attn(input_layernorm(x))`, then `x + mlp(post_attention_layernorm(x))` (Llama).
    Pre,
    /// `x + post_attention_layernorm(attn(x))`, then `x + post_feedforward_layernorm(mlp(x))` (OLMo 2).
    Post,
    /// Both: `x + post_attention_layernorm(attn(input_layernorm(x)))`, then
    /// `x + post_feedforward_layernorm(mlp(pre_feedforward_layernorm(x)))` (Gemma 2 and 3).
    Sandwich,
}

/// What differs between the layers of one model.
#[derive(Debug, Clone)]
pub struct LayerSettings {
    /// `None`: this layer uses no positional encoding (SmolLM3's NoPE layers).
    pub rope: Option<Rope>,
    /// Each query sees itself and `window - 1` earlier tokens.
    pub sliding_window: Option<i32>,
}

/// Everything that defines a decoder-only model besides its weights.
#[derive(Debug, Clone)]
pub struct DecoderSettings {
    pub model_type: String,
    pub vocab_size: i32,
    pub hidden_size: i32,
    pub max_position_embeddings: usize,
    pub attention: AttentionSettings,
    pub mlp: MlpSettings,
    pub norm: NormKind,
    pub norm_eps: f64,
    pub norm_placement: NormPlacement,
    /// One entry per decoder layer.
    pub layers: Vec<LayerSettings>,
    /// Multiplies the embeddings, rounded to their dtype first (Gemma's `√hidden`, Granite).
    pub embedding_scale: Option<f32>,
    /// Multiplies each sub-block's output before the residual add (Granite).
    pub residual_scale: Option<f32>,
    /// Multiplies the logits (Granite's `1 / logits_scaling`).
    pub logits_scale: Option<f32>,
    /// `cap * tanh(logits / cap)` (Gemma 2).
    pub final_logit_softcap: Option<f32>,
    pub tie_word_embeddings: bool,
}

impl DecoderSettings {
    /// Pre-norm RMSNorm blocks (eps 1e-6) with no scaling or capping anywhere and an
    /// untied output layer: what a family changes, it sets on top of this.
    pub fn new(
        model_type: &str,
        vocab_size: i32,
        hidden_size: i32,
        max_position_embeddings: usize,
        attention: AttentionSettings,
        mlp: MlpSettings,
        layers: Vec<LayerSettings>,
    ) -> DecoderSettings {
        DecoderSettings {
            model_type: model_type.to_owned(),
            vocab_size,
            hidden_size,
            max_position_embeddings,
            attention,
            mlp,
            norm: NormKind::Rms,
            norm_eps: 1e-6,
            norm_placement: NormPlacement::Pre,
            layers,
            embedding_scale: None,
            residual_scale: None,
            logits_scale: None,
            final_logit_softcap: None,
            tie_word_embeddings: false,
        }
    }
}

/// Which attention a layer uses, as Transformers' `layer_types` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LayerType {
    FullAttention,
    SlidingAttention,
}

impl LayerType {
    /// Every layer sliding when the config has a window (Mistral, Phi-3, StarCoder 2).
    pub fn all(n: usize, window: Option<i32>) -> Vec<LayerType> {
        let t = match window {
            Some(_) => LayerType::SlidingAttention,
            None => LayerType::FullAttention,
        };
        vec![t; n]
    }

    /// Sliding except every `period`-th layer (Gemma 2 with period 2, Gemma 3's
    /// `sliding_window_pattern`).
    pub fn periodic(n: usize, period: i32) -> Vec<LayerType> {
        (0..n)
            .map(|i| {
                if period > 0 && (i as i32 + 1) % period == 0 {
                    LayerType::FullAttention
                } else {
                    LayerType::SlidingAttention
                }
            })
            .collect()
    }

    /// Full below layer `start`, sliding from it on, when `enabled` (Qwen 2's
    /// `use_sliding_window` and `max_window_layers`).
    pub fn from_layer(n: usize, enabled: bool, start: i32) -> Vec<LayerType> {
        (0..n)
            .map(|i| {
                if enabled && i as i32 >= start {
                    LayerType::SlidingAttention
                } else {
                    LayerType::FullAttention
                }
            })
            .collect()
    }
}

impl LayerType {
    /// Sliding exactly where a layer has no RoPE, when `enabled` (SmolLM3).
    pub fn where_no_rope(uses_rope: &[bool], enabled: bool) -> Vec<LayerType> {
        uses_rope
            .iter()
            .map(|&rope| {
                if enabled && !rope {
                    LayerType::SlidingAttention
                } else {
                    LayerType::FullAttention
                }
            })
            .collect()
    }
}

/// Whether each layer uses RoPE, from a config's per-layer 0/1 list (SmolLM3's
/// `no_rope_layers`, 1 = RoPE) or, when it has none, every `interval`-th layer without.
pub fn rope_layers(n: usize, flags: Option<&[i32]>, interval: i32) -> Vec<bool> {
    match flags {
        Some(f) => f.iter().map(|&x| x != 0).collect(),
        None => (0..n)
            .map(|i| interval <= 0 || (i as i32 + 1) % interval != 0)
            .collect(),
    }
}

/// The settings of each layer from its type: sliding layers get `window` and `local_rope`
/// (when the family has a separate one), the others `rope`.
pub fn layers_by_type(
    types: &[LayerType],
    rope: Option<&Rope>,
    local_rope: Option<&Rope>,
    window: Option<i32>,
) -> Vec<LayerSettings> {
    types
        .iter()
        .map(|t| match t {
            LayerType::SlidingAttention => LayerSettings {
                rope: local_rope.or(rope).cloned(),
                sliding_window: window,
            },
            LayerType::FullAttention => LayerSettings {
                rope: rope.cloned(),
                sliding_window: None,
            },
        })
        .collect()
}

/// `x * value`, with `value` rounded to `x`'s dtype.
fn scale(x: &Array, value: Option<f32>) -> Result<Array> {
    match value {
        Some(v) => Ok(x.multiply(&scalar_like(v, x)?)?),
        None => Ok(x.clone()),
    }
}

/// `cap * tanh(x / cap)`.
fn softcap(x: &Array, cap: Option<f32>) -> Result<Array> {
    match cap {
        Some(c) => {
            let c = scalar_like(c, x)?;
            Ok(ops::tanh(&x.divide(&c)?)?.multiply(&c)?)
        }
        None => Ok(x.clone()),
    }
}

enum Qkv {
    Separate {
        q_proj: Linear,
        k_proj: Linear,
        v_proj: Linear,
    },
    Fused {
        qkv_proj: Linear,
    },
}

struct Attention {
    qkv: Qkv,
    o_proj: Linear,
    q_norm: Option<Norm>,
    k_norm: Option<Norm>,
    rope: Option<Rope>,
    settings: AttentionSettings,
}

impl Attention {
    fn load(w: &WeightPath, model: &DecoderSettings, layer: &LayerSettings) -> Result<Self> {
        let (s, hidden, eps) = (&model.attention, model.hidden_size, model.norm_eps);
        let kind = s.qk_norm_kind.unwrap_or(model.norm);
        let (q_dim, kv_dim) = (s.num_heads * s.head_dim, s.num_kv_heads * s.head_dim);
        let qkv = match s.qkv_layout {
            QkvLayout::Separate => Qkv::Separate {
                q_proj: Linear::load(&w.pp("q_proj"), hidden, q_dim, s.qkv_bias)?,
                k_proj: Linear::load(&w.pp("k_proj"), hidden, kv_dim, s.qkv_bias)?,
                v_proj: Linear::load(&w.pp("v_proj"), hidden, kv_dim, s.qkv_bias)?,
            },
            QkvLayout::Fused => Qkv::Fused {
                qkv_proj: Linear::load(&w.pp("qkv_proj"), hidden, q_dim + 2 * kv_dim, s.qkv_bias)?,
            },
        };
        let (q_norm_dim, k_norm_dim) = match s.qk_norm {
            QkNorm::None => (None, None),
            QkNorm::PerHead => (Some(s.head_dim), Some(s.head_dim)),
            QkNorm::Projection => (Some(q_dim), Some(kv_dim)),
        };
        let norm = |name: &str, dim: Option<i32>| {
            dim.map(|d| Norm::load(&w.pp(name), kind, d, eps))
                .transpose()
        };
        Ok(Attention {
            qkv,
            o_proj: Linear::load(&w.pp("o_proj"), q_dim, hidden, s.o_bias)?,
            q_norm: norm("q_norm", q_norm_dim)?,
            k_norm: norm("k_norm", k_norm_dim)?,
            rope: layer.rope.clone(),
            settings: s.clone(),
        })
    }

    fn project(&self, x: &Array) -> Result<(Array, Array, Array)> {
        match &self.qkv {
            Qkv::Separate {
                q_proj,
                k_proj,
                v_proj,
            } => Ok((q_proj.forward(x)?, k_proj.forward(x)?, v_proj.forward(x)?)),
            Qkv::Fused { qkv_proj } => {
                let s = &self.settings;
                let q_dim = s.num_heads * s.head_dim;
                let kv_dim = s.num_kv_heads * s.head_dim;
                let mut parts = qkv_proj
                    .forward(x)?
                    .split_at_indices(&[q_dim, q_dim + kv_dim], -1)?;
                let v = parts.pop();
                let k = parts.pop();
                let q = parts.pop();
                match (q, k, v) {
                    (Some(q), Some(k), Some(v)) => Ok((q, k, v)),
                    _ => unreachable!("split_at_indices with two indices gives three parts"),
                }
            }
        }
    }

    fn forward(&self, x: &Array, cache: &mut KvCache, tap: &mut Tap) -> Result<Array> {
        let s = &self.settings;
        let (batch, len) = (x.dim(0), x.dim(1));
        let (mut q, mut k, v) = self.project(x)?;
        if s.qk_norm == QkNorm::Projection {
            q = norm_opt(&self.q_norm, &q)?;
            k = norm_opt(&self.k_norm, &k)?;
        }
        let heads = |t: Array, n: i32| t.reshape(&[batch, len, n, s.head_dim]);
        let (mut q, mut k, v) = (
            heads(q, s.num_heads)?,
            heads(k, s.num_kv_heads)?,
            heads(v, s.num_kv_heads)?,
        );
        if s.qk_norm == QkNorm::PerHead {
            q = norm_opt(&self.q_norm, &q)?;
            k = norm_opt(&self.k_norm, &k)?;
        }
        let (q, k, v) = (q.swap_axes(1, 2)?, k.swap_axes(1, 2)?, v.swap_axes(1, 2)?);
        tap.record("self_attn.q", &q);
        tap.record("self_attn.k", &k);
        tap.record("self_attn.v", &v);

        let offset = cache.offset();
        let (q, k) = match &self.rope {
            Some(rope) => (rope.apply(&q, offset)?, rope.apply(&k, offset)?),
            None => (q, k),
        };
        tap.record("self_attn.rope_q", &q);
        tap.record("self_attn.rope_k", &k);

        let (k, v, mask) = cache.attend(k, v)?;
        let out = match s.logit_softcap {
            None => scaled_dot_product_attention(&q, &k, &v, s.scale, &mask)?,
            Some(cap) => softcapped_attention(&q, &k, &v, s.scale, cap, &mask)?,
        };
        tap.record("self_attn.sdpa", &out);
        let out = out.swap_axes(1, 2)?.reshape(&[batch, len, -1])?;
        let out = self.o_proj.forward(&out)?;
        tap.record("self_attn.o_proj", &out);
        Ok(out)
    }
}

fn norm_opt(norm: &Option<Norm>, x: &Array) -> Result<Array> {
    match norm {
        Some(n) => n.forward(x),
        None => Ok(x.clone()),
    }
}

/// Attention with soft-capped scores, spelled out (the fused kernel has no cap): scores in
/// the activation dtype, softmax in f32 as Transformers does.
fn softcapped_attention(
    q: &Array,
    k: &Array,
    v: &Array,
    scale: f32,
    cap: f32,
    mask: &AttentionMask,
) -> Result<Array> {
    let (batch, heads, len, head_dim) = (q.dim(0), q.dim(1), q.dim(2), q.dim(3));
    let kv_heads = k.dim(1);
    let groups = heads / kv_heads;
    // [b, kv_heads, groups, len, d] against [b, kv_heads, 1, keys, d].
    let q = q.reshape(&[batch, kv_heads, groups, len, head_dim])?;
    let k = k.expand_dims(2)?;
    let v = v.expand_dims(2)?;
    let scores = ops::matmul(&q, &k.swap_axes(-1, -2)?)?;
    let scores = scores.multiply(&scalar_like(scale, &scores)?)?;
    let scores = softcap(&scores, Some(cap))?;
    let scores = match additive_mask(mask, len, k.dim(-2), scores.dtype())? {
        Some(m) => scores.add(&m)?,
        None => scores,
    };
    let weights =
        ops::softmax_axis(&scores.as_dtype(Dtype::Float32)?, -1, None)?.as_dtype(q.dtype())?;
    Ok(ops::matmul(&weights, &v)?.reshape(&[batch, heads, len, head_dim])?)
}

/// The mask as an additive `[queries, keys]` array (`None`: every key is visible); a
/// causal mask is aligned to the last key, as the fused kernel aligns it.
fn additive_mask(mask: &AttentionMask, len: i32, keys: i32, dtype: Dtype) -> Result<Option<Array>> {
    match mask {
        AttentionMask::None => Ok(None),
        AttentionMask::Additive(m) => Ok(Some(m.as_dtype(dtype)?)),
        AttentionMask::Causal => {
            let offset = keys - len;
            let data: Vec<f32> = (0..len)
                .flat_map(|q| {
                    (0..keys).map(move |k| {
                        if k <= q + offset {
                            0.0
                        } else {
                            f32::NEG_INFINITY
                        }
                    })
                })
                .collect();
            Ok(Some(
                Array::from_slice(&data, &[len, keys]).as_dtype(dtype)?,
            ))
        }
    }
}

enum Mlp {
    Gated {
        gate_proj: Linear,
        up_proj: Linear,
        down_proj: Linear,
        act: Activation,
    },
    FusedGated {
        gate_up_proj: Linear,
        down_proj: Linear,
        act: Activation,
    },
    Plain {
        c_fc: Linear,
        c_proj: Linear,
        act: Activation,
    },
}

impl Mlp {
    fn load(w: &WeightPath, s: &MlpSettings, hidden: i32) -> Result<Self> {
        let (inter, bias, act) = (s.intermediate_size, s.bias, s.activation);
        Ok(match s.layout {
            MlpLayout::Gated => Mlp::Gated {
                gate_proj: Linear::load(&w.pp("gate_proj"), hidden, inter, bias)?,
                up_proj: Linear::load(&w.pp("up_proj"), hidden, inter, bias)?,
                down_proj: Linear::load(&w.pp("down_proj"), inter, hidden, bias)?,
                act,
            },
            MlpLayout::FusedGated => Mlp::FusedGated {
                gate_up_proj: Linear::load(&w.pp("gate_up_proj"), hidden, 2 * inter, bias)?,
                down_proj: Linear::load(&w.pp("down_proj"), inter, hidden, bias)?,
                act,
            },
            MlpLayout::Plain => Mlp::Plain {
                c_fc: Linear::load(&w.pp("c_fc"), hidden, inter, bias)?,
                c_proj: Linear::load(&w.pp("c_proj"), inter, hidden, bias)?,
                act,
            },
        })
    }

    fn forward(&self, x: &Array, tap: &mut Tap) -> Result<Array> {
        let hidden = match self {
            Mlp::Gated {
                gate_proj,
                up_proj,
                act,
                ..
            } => act
                .apply(&gate_proj.forward(x)?)?
                .multiply(up_proj.forward(x)?)?,
            Mlp::FusedGated {
                gate_up_proj, act, ..
            } => {
                let parts = gate_up_proj.forward(x)?.split_equal(2, -1)?;
                act.apply(&parts[0])?.multiply(&parts[1])?
            }
            Mlp::Plain { c_fc, act, .. } => act.apply(&c_fc.forward(x)?)?,
        };
        tap.record("mlp.hidden", &hidden);
        let out = match self {
            Mlp::Gated { down_proj, .. } | Mlp::FusedGated { down_proj, .. } => {
                down_proj.forward(&hidden)?
            }
            Mlp::Plain { c_proj, .. } => c_proj.forward(&hidden)?,
        };
        tap.record("mlp.out", &out);
        Ok(out)
    }
}

struct DecoderLayer {
    self_attn: Attention,
    mlp: Mlp,
    /// Before attention (pre and sandwich placement).
    input_layernorm: Option<Norm>,
    /// After attention (post and sandwich), or before the MLP (pre).
    post_attention_layernorm: Norm,
    /// Before the MLP (sandwich).
    pre_feedforward_layernorm: Option<Norm>,
    /// After the MLP (post and sandwich).
    post_feedforward_layernorm: Option<Norm>,
    placement: NormPlacement,
    residual_scale: Option<f32>,
}

impl DecoderLayer {
    fn load(w: &WeightPath, s: &DecoderSettings, layer: &LayerSettings) -> Result<Self> {
        let norm = |name: &str| Norm::load(&w.pp(name), s.norm, s.hidden_size, s.norm_eps);
        let (pre, post) = match s.norm_placement {
            NormPlacement::Pre => (true, false),
            NormPlacement::Post => (false, true),
            NormPlacement::Sandwich => (true, true),
        };
        Ok(DecoderLayer {
            self_attn: Attention::load(&w.pp("self_attn"), s, layer)?,
            mlp: Mlp::load(&w.pp("mlp"), &s.mlp, s.hidden_size)?,
            input_layernorm: pre.then(|| norm("input_layernorm")).transpose()?,
            post_attention_layernorm: norm("post_attention_layernorm")?,
            pre_feedforward_layernorm: (pre && post)
                .then(|| norm("pre_feedforward_layernorm"))
                .transpose()?,
            post_feedforward_layernorm: post
                .then(|| norm("post_feedforward_layernorm"))
                .transpose()?,
            placement: s.norm_placement,
            residual_scale: s.residual_scale,
        })
    }

    fn forward(&self, x: &Array, cache: &mut KvCache, tap: &mut Tap) -> Result<Array> {
        let (attn_in, attn_out_norm, mlp_in_norm, mlp_out_norm) = match self.placement {
            NormPlacement::Pre => (
                &self.input_layernorm,
                None,
                Some(&self.post_attention_layernorm),
                None,
            ),
            NormPlacement::Post => (
                &None,
                Some(&self.post_attention_layernorm),
                None,
                self.post_feedforward_layernorm.as_ref(),
            ),
            NormPlacement::Sandwich => (
                &self.input_layernorm,
                Some(&self.post_attention_layernorm),
                self.pre_feedforward_layernorm.as_ref(),
                self.post_feedforward_layernorm.as_ref(),
            ),
        };
        let normed = norm_opt(attn_in, x)?;
        let attn = self.self_attn.forward(&normed, cache, tap)?;
        let attn = match attn_out_norm {
            Some(n) => n.forward(&attn)?,
            None => attn,
        };
        let h = x.add(scale(&attn, self.residual_scale)?)?;
        tap.record("attention_residual", &h);
        let normed = match mlp_in_norm {
            Some(n) => n.forward(&h)?,
            None => h.clone(),
        };
        let out = self.mlp.forward(&normed, tap)?;
        let out = match mlp_out_norm {
            Some(n) => n.forward(&out)?,
            None => out,
        };
        Ok(h.add(scale(&out, self.residual_scale)?)?)
    }
}

/// A decoder-only language model built from [`DecoderSettings`]; weights under `model.`
/// and `lm_head.` as Transformers names them.
pub struct Decoder {
    embed_tokens: Embedding,
    layers: Vec<DecoderLayer>,
    norm: Norm,
    lm_head: Option<Linear>,
    settings: DecoderSettings,
    info: ModelInfo,
}

impl Decoder {
    /// Builds the model, taking each weight by its checkpoint name and checking its shape.
    pub fn new(settings: DecoderSettings, weights: &Weights) -> Result<Decoder> {
        let s = &settings;
        let w = weights.path("model");
        let embed_tokens = Embedding::load(&w.pp("embed_tokens"), s.vocab_size, s.hidden_size)?;
        let layers = s
            .layers
            .iter()
            .enumerate()
            .map(|(i, layer)| DecoderLayer::load(&w.pp(&format!("layers.{i}")), s, layer))
            .collect::<Result<Vec<_>>>()?;
        let norm = Norm::load(&w.pp("norm"), s.norm, s.hidden_size, s.norm_eps)?;
        let lm_head = if s.tie_word_embeddings {
            None
        } else {
            Some(Linear::load(
                &weights.path("lm_head"),
                s.hidden_size,
                s.vocab_size,
                false,
            )?)
        };
        let quantization = layers
            .first()
            .and_then(|l| match &l.self_attn.qkv {
                Qkv::Separate { q_proj, .. } => q_proj.weight.quantization(),
                Qkv::Fused { qkv_proj } => qkv_proj.weight.quantization(),
            })
            .or(embed_tokens.weight.quantization());
        let info = ModelInfo {
            model_type: s.model_type.clone(),
            vocab_size: s.vocab_size,
            hidden_size: s.hidden_size,
            num_layers: layers.len(),
            max_position_embeddings: s.max_position_embeddings,
            dtype: norm.dtype(),
            quantization,
            num_parameters: weights.num_parameters(),
        };
        Ok(Decoder {
            embed_tokens,
            layers,
            norm,
            lm_head,
            settings,
            info,
        })
    }

    pub fn settings(&self) -> &DecoderSettings {
        &self.settings
    }
}

impl LanguageModel for Decoder {
    fn forward(&self, tokens: &Array, cache: &mut [KvCache], tap: &mut Tap) -> Result<Array> {
        let s = &self.settings;
        let h = self.embed_tokens.forward(tokens)?;
        let mut h = scale(&h, s.embedding_scale)?;
        tap.record("embeddings", &h);
        for (i, (layer, cache)) in self.layers.iter().zip(cache.iter_mut()).enumerate() {
            tap.scope(|| format!("layers.{i}."));
            h = layer.forward(&h, cache, tap)?;
            tap.scope(String::new);
            tap.record(&format!("layers.{i}"), &h);
        }
        let h = self.norm.forward(&h)?;
        tap.record("norm", &h);
        let logits = match &self.lm_head {
            Some(head) => head.forward(&h)?,
            None => self.embed_tokens.as_linear(&h)?,
        };
        let logits = softcap(&scale(&logits, s.logits_scale)?, s.final_logit_softcap)?;
        tap.record("logits", &logits);
        Ok(logits)
    }

    fn new_cache(&self) -> Vec<KvCache> {
        self.settings
            .layers
            .iter()
            .map(|l| match l.sliding_window {
                Some(w) => KvCache::rotating(w),
                None => KvCache::new(),
            })
            .collect()
    }

    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn rope(&self) -> Option<&Rope> {
        let layers = &self.settings.layers;
        layers
            .iter()
            .find(|l| l.sliding_window.is_none() && l.rope.is_some())
            .or_else(|| layers.iter().find(|l| l.rope.is_some()))
            .and_then(|l| l.rope.as_ref())
    }

    fn local_rope(&self) -> Option<&Rope> {
        self.settings
            .layers
            .iter()
            .find(|l| l.sliding_window.is_some() && l.rope.is_some())
            .and_then(|l| l.rope.as_ref())
    }
}

/// Drops what every family computes itself (`rotary_emb.inv_freq`) and the output layer of
/// tied checkpoints that store it anyway.
pub fn drop_computed_weights(weights: &mut Weights, tie_word_embeddings: bool) {
    weights.rename(|name| {
        let drop = name.contains("rotary_emb.inv_freq")
            || (tie_word_embeddings && name.starts_with("lm_head."));
        (!drop).then(|| name.to_owned())
    });
}

/// Checks the head counts of a config: positive, and query heads grouped evenly over the
/// key/value heads.
pub fn check_heads(config: &ConfigFile, num_heads: i32, num_kv_heads: i32) -> Result<()> {
    config.ensure(
        num_heads > 0 && num_kv_heads > 0,
        "num_attention_heads",
        || "must be positive".to_owned(),
    )?;
    config.ensure(num_heads % num_kv_heads == 0, "num_key_value_heads", || {
        format!("{num_heads} query heads cannot be grouped over {num_kv_heads} key/value heads")
    })
}

/// Checks the head counts against `config`, builds the model and checks that every weight
/// of the checkpoint was used.
pub fn build(
    config: &ConfigFile,
    settings: DecoderSettings,
    weights: Weights,
) -> Result<Box<dyn LanguageModel>> {
    let a = &settings.attention;
    check_heads(config, a.num_heads, a.num_kv_heads)?;
    if let Some(w) = settings
        .layers
        .iter()
        .filter_map(|l| l.sliding_window)
        .find(|&w| w < 1)
    {
        config.ensure(false, "sliding_window", || {
            format!("must be at least 1 token, found {w}")
        })?;
    }
    let model = Decoder::new(settings, &weights)?;
    weights.check_all_used()?;
    Ok(Box::new(model))
}
