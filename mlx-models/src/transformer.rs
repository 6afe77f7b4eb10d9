//! The decoder-only transformer most families are made of, assembled from plain settings.
//!
//! Families differ in a handful of choices — where the norms sit, whether q/k are
//! normalized, fused projections, soft-capping, multipliers, which layers slide, skip RoPE
//! or route their tokens to experts — so each model module reads its config.json into
//! [`DecoderSettings`] and this module does the rest, with the checkpoint's own weight
//! names.
//!
//! A layer is a token mixer (attention), a feed-forward (a dense [`Mlp`] or a
//! [`SparseMoe`]) and its cache ([`LayerCache`]), each chosen per layer by
//! [`LayerSettings`]. The blocks themselves live in their own modules
//! ([`crate::attention`], [`crate::mlp`], [`crate::moe`], [`crate::norm`]) and are public,
//! so a family these settings cannot describe is one hand-written file on the same blocks.

use crate::attention::Attention;
use crate::cache::{KvCache, LayerCache, RecurrentCache};
use crate::config::ConfigFile;
use crate::conv::ShortConv;
use crate::delta::{GatedDeltaNet, GatedDeltaNetSettings};
use crate::differential::Differential;
use crate::error::{Error, Result};
use crate::head::{HeadSettings, PredictionHead};
use crate::mla::{LatentAttention, MlaSettings};
use crate::mlp::Mlp;
use crate::model::{LanguageModel, ModelInfo};
use crate::moe::{MoeSettings, SparseMoe};
use crate::nn::{even_part, scale, softcap, Embedding, Linear, Split};
use crate::norm::{norm_opt, Norm};
use crate::positions::{LearnedPositions, Sinusoid, SinusoidalPositions};
use crate::rglru::RecurrentBlock;
use crate::rope::Rope;
use crate::ssm::{Mamba2Mixer, Mamba2Settings, MambaMixer, MambaSettings};
use crate::tap::Tap;
use crate::weights::{WeightPath, Weights};
use mlx_rs::Array;

pub use crate::attention::{AlibiSettings, AttentionSettings, QkNorm, QkvLayout};
pub use crate::mlp::{Activation, MlpLayout, MlpSettings};
pub use crate::norm::NormKind;

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
    /// Attention and MLP side by side on one norm: `x + attn(h) + mlp(h)` with
    /// `h = input_layernorm(x)` (Cohere, Phi).
    Parallel,
    /// Side by side on a norm each: `x + attn(input_layernorm(x)) +
    /// mlp(post_attention_layernorm(x))` (GPT-NeoX).
    ParallelTwoNorms,
    /// Each norm on the residual sum, which it replaces: `h = post_attention_layernorm(x +
    /// attn(x))`, then `post_feedforward_layernorm(h + mlp(h))` (the original Transformer's,
    /// OpenAI GPT's).
    PostResidual,
}

/// A layer's feed-forward block.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FeedForwardKind {
    /// The dense MLP of [`DecoderSettings::mlp`].
    #[default]
    Dense,
    /// The mixture of experts of [`DecoderSettings::moe`].
    Sparse,
    /// No feed-forward: the layer is its mixer alone (Mamba2, Nemotron-H).
    None,
}

/// A layer's token mixer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MixerKind {
    /// The attention of [`DecoderSettings::attention`].
    #[default]
    Attention,
    /// The multi-head latent attention of [`DecoderSettings::latent_attention`].
    LatentAttention,
    /// The Mamba2 state-space mixer of [`DecoderSettings::mamba2`] (weights under `mixer`).
    Mamba2,
    /// LFM2's gated short convolution of [`DecoderSettings::short_conv`] (under `conv`).
    ShortConv,
    /// The gated DeltaNet of [`DecoderSettings::gated_delta_net`] (under `linear_attn`).
    GatedDeltaNet,
    /// The Mamba (1) mixer of [`DecoderSettings::mamba`] (under `mixer`).
    Mamba,
    /// RecurrentGemma's recurrent block of [`DecoderSettings::rg_lru`] (under
    /// `temporal_block`).
    RgLru,
    /// No token mixing: the layer is its feed-forward alone (Nemotron-H's MLP layers).
    None,
}

/// What differs between the layers of one model.
#[derive(Debug, Clone, Default)]
pub struct LayerSettings {
    pub mixer: MixerKind,
    /// `None`: this layer uses no positional encoding (SmolLM3's NoPE layers).
    pub rope: Option<Rope>,
    /// Each query sees itself and `window - 1` earlier tokens.
    pub sliding_window: Option<i32>,
    /// Chunked local attention: each query sees the tokens of its own chunk of this many
    /// tokens, up to itself (Llama 4).
    pub attention_chunk: Option<i32>,
    pub feed_forward: FeedForwardKind,
    /// Experts per token on this layer where it differs from the MoE's (Hunyuan's per-layer
    /// `moe_topk`).
    pub top_k: Option<i32>,
    /// Whether this layer's `o_proj` has a bias, where it differs from the model's
    /// [`AttentionSettings::o_bias`] (GPT-NeoX-Japanese: the last layer's only). A layer
    /// that has one loads `self_attn.o_proj.bias` of `[hidden_size]` (missing or mis-shaped:
    /// an error naming it); one that has none refuses it as an unused weight.
    pub o_bias: Option<bool>,
    /// No norm before the mixer on this layer, whatever the placement (the ModernBERT
    /// decoder's first layer, whose input is the already normalized embedding).
    pub no_input_norm: bool,
}

impl LayerSettings {
    /// The empty cache this layer's mixer needs (`mla`: the model's latent attention).
    pub fn new_cache(&self, mla: Option<&MlaSettings>) -> LayerCache {
        match (self.mixer, mla) {
            (MixerKind::LatentAttention, Some(mla)) => return mla.new_cache(),
            (
                MixerKind::Mamba2
                | MixerKind::ShortConv
                | MixerKind::GatedDeltaNet
                | MixerKind::Mamba
                | MixerKind::RgLru,
                _,
            ) => return LayerCache::Recurrent(RecurrentCache::new()),
            (MixerKind::None, _) => return LayerCache::Stateless { offset: 0 },
            _ => {}
        }
        LayerCache::Kv(match (self.sliding_window, self.attention_chunk) {
            (Some(w), _) => KvCache::rotating(w),
            (None, Some(c)) => KvCache::chunked(c),
            (None, None) => KvCache::new(),
        })
    }
}

/// Everything that defines a decoder-only model besides its weights.
#[derive(Debug, Clone)]
pub struct DecoderSettings {
    pub model_type: String,
    pub vocab_size: i32,
    pub hidden_size: i32,
    pub max_position_embeddings: usize,
    pub attention: AttentionSettings,
    /// The dense MLP of the layers whose feed-forward is [`FeedForwardKind::Dense`].
    pub mlp: MlpSettings,
    /// The mixture of experts of the layers whose feed-forward is
    /// [`FeedForwardKind::Sparse`].
    pub moe: Option<MoeSettings>,
    /// The latent attention of the layers whose mixer is [`MixerKind::LatentAttention`].
    pub latent_attention: Option<MlaSettings>,
    /// The state-space mixer of the layers whose mixer is [`MixerKind::Mamba2`].
    pub mamba2: Option<Mamba2Settings>,
    /// The short convolution (kernel, bias) of the layers whose mixer is
    /// [`MixerKind::ShortConv`].
    pub short_conv: Option<(i32, bool)>,
    /// The gated DeltaNet of the layers whose mixer is [`MixerKind::GatedDeltaNet`].
    pub gated_delta_net: Option<GatedDeltaNetSettings>,
    /// The Mamba (1) mixer of the layers whose mixer is [`MixerKind::Mamba`].
    pub mamba: Option<MambaSettings>,
    /// The RG-LRU block (width, heads, conv kernel) of the layers whose mixer is
    /// [`MixerKind::RgLru`].
    pub rg_lru: Option<(i32, i32, i32)>,
    pub norm: NormKind,
    pub norm_eps: f64,
    pub norm_placement: NormPlacement,
    /// A norm after the last layer (`model.norm`); OpenAI GPT's post-norm layers have none.
    pub final_norm: bool,
    /// One entry per decoder layer.
    pub layers: Vec<LayerSettings>,
    /// Multiplies the embeddings, rounded to their dtype first (Gemma's `√hidden`, Granite).
    pub embedding_scale: Option<f32>,
    /// The final norm also normalizes the embeddings, before the first layer (NanoChat
    /// calls its one `norm` module twice).
    pub embedding_norm: bool,
    /// A norm of its own on the embeddings, before the first layer (`model.embed_layernorm`:
    /// BLOOM's `word_embeddings_layernorm`), of the model's norm kind.
    pub embedding_layernorm: bool,
    /// A norm before each output projection: `self_attn.attn_sub_norm` on the attention
    /// output (before `o_proj`), `mlp.ffn_sub_norm` on the MLP's hidden features (BitNet).
    pub sub_norms: bool,
    /// Learned absolute positions added to the embeddings (`model.embed_positions`, a row
    /// per position up to `max_position_embeddings`: GPT-2, GPT-BigCode).
    pub learned_positions: bool,
    /// The row of position 0 in the learned position table (OPT and BioGPT keep two rows
    /// before it: the table has `max_position_embeddings + 2`).
    pub position_offset: i32,
    /// Fixed sinusoidal positions added to the embeddings, computed, not loaded (XGLM,
    /// CTRL): [`SinusoidalPositions`].
    pub sinusoidal_positions: Option<Sinusoid>,
    /// Multiplies each sub-block's output before the residual add (Granite).
    pub residual_scale: Option<f32>,
    /// Multiplies the logits (Granite's `1 / logits_scaling`).
    pub logits_scale: Option<f32>,
    /// `cap * tanh(logits / cap)` (Gemma 2).
    pub final_logit_softcap: Option<f32>,
    /// The logits are returned in f32 whatever the model's dtype (Nemotron-H's
    /// `lm_head(h).float()`).
    pub logits_in_f32: bool,
    pub tie_word_embeddings: bool,
    /// The output layer has a bias (Phi-3.5-MoE's `lm_head_bias`).
    pub lm_head_bias: bool,
    /// A [`PredictionHead`] (`head.dense`, activation, `head.norm`) between the final norm
    /// and the output layer (the ModernBERT decoder's).
    pub prediction_head: Option<HeadSettings>,
    /// The residual stream is kept in f32 (Mamba's `residual_in_fp32`; changes nothing in
    /// an f32 model).
    pub residual_in_f32: bool,
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
            moe: None,
            latent_attention: None,
            mamba2: None,
            short_conv: None,
            gated_delta_net: None,
            mamba: None,
            rg_lru: None,
            norm: NormKind::Rms,
            norm_eps: 1e-6,
            norm_placement: NormPlacement::Pre,
            final_norm: true,
            layers,
            embedding_scale: None,
            embedding_norm: false,
            embedding_layernorm: false,
            sub_norms: false,
            learned_positions: false,
            position_offset: 0,
            sinusoidal_positions: None,
            residual_scale: None,
            logits_scale: None,
            final_logit_softcap: None,
            logits_in_f32: false,
            tie_word_embeddings: false,
            lm_head_bias: false,
            prediction_head: None,
            residual_in_f32: false,
        }
    }

    /// A model whose `layers` layers are each one recurrent mixer of `mixer` kind and
    /// nothing else (Mamba, Mamba2): no attention or MLP settings are ever loaded, and the
    /// context is unbounded. The family sets the mixer's settings on top.
    pub fn recurrent_only(
        model_type: &str,
        vocab_size: i32,
        hidden_size: i32,
        layers: usize,
        mixer: MixerKind,
    ) -> DecoderSettings {
        let layer = LayerSettings {
            mixer,
            feed_forward: FeedForwardKind::None,
            ..LayerSettings::default()
        };
        let unused_mlp = MlpSettings {
            intermediate_size: 1,
            layout: MlpLayout::Gated,
            activation: Activation::Silu,
            bias: false,
        };
        DecoderSettings::new(
            model_type,
            vocab_size,
            hidden_size,
            usize::MAX,
            AttentionSettings::new(1, 1, 1),
            unused_mlp,
            vec![layer; layers],
        )
    }

    /// Makes every layer's mixer the latent attention `mla`.
    pub fn with_latent_attention(mut self, mla: MlaSettings) -> Self {
        for layer in &mut self.layers {
            layer.mixer = MixerKind::LatentAttention;
        }
        self.latent_attention = Some(mla);
        self
    }

    /// Makes the layers `sparse(i)` picks mixture-of-experts layers with `moe`.
    pub fn with_moe(mut self, moe: MoeSettings, sparse: impl Fn(usize) -> bool) -> Self {
        for (i, layer) in self.layers.iter_mut().enumerate() {
            if sparse(i) {
                layer.feed_forward = FeedForwardKind::Sparse;
            }
        }
        self.moe = Some(moe);
        self
    }
}

/// Which attention a layer uses, as Transformers' `layer_types` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LayerType {
    /// Also read as `global` (GPT-Neo's `attention_layers`).
    #[serde(alias = "global")]
    FullAttention,
    /// Also read as `local` (GPT-Neo's `attention_layers`).
    #[serde(alias = "local")]
    SlidingAttention,
    /// Chunked local attention (Llama 4); the family sets the chunk.
    ChunkedAttention,
    /// A linear-attention (recurrent) layer (Qwen3-Next); the family sets its mixer.
    LinearAttention,
    /// A Mamba layer (Granite 4 hybrids); the family sets its mixer.
    Mamba,
    /// An attention layer, as Granite 4 hybrids name full attention.
    Attention,
    /// A gated short-convolution layer (LFM2's `conv`); the family sets its mixer.
    Conv,
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

    /// Layers 0, `period`, 2·`period`, … full attention, the others sliding (CWM).
    pub fn periodic_from_first(n: usize, period: i32) -> Vec<LayerType> {
        (0..n)
            .map(|i| {
                if period > 0 && i as i32 % period == 0 {
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
                ..LayerSettings::default()
            },
            LayerType::FullAttention
            | LayerType::ChunkedAttention
            | LayerType::LinearAttention
            | LayerType::Mamba
            | LayerType::Attention
            | LayerType::Conv => LayerSettings {
                rope: rope.cloned(),
                ..LayerSettings::default()
            },
        })
        .collect()
}

/// A layer's feed-forward block, as loaded.
#[derive(Debug, Clone)]
pub enum FeedForward {
    Dense(Box<Mlp>),
    Sparse(Box<SparseMoe>),
    None,
}

impl FeedForward {
    /// Loads the block `layer` names from `w`, with the model's MLP or MoE settings.
    pub fn load(w: &WeightPath, s: &DecoderSettings, layer: &LayerSettings) -> Result<Self> {
        Ok(match (layer.feed_forward, &s.moe) {
            (FeedForwardKind::Dense, _) => {
                let mut mlp = Mlp::load(w, &s.mlp, s.hidden_size)?;
                if s.sub_norms {
                    let width = s.mlp.intermediate_size;
                    let norm = Norm::load(&w.pp("ffn_sub_norm"), s.norm, width, s.norm_eps)?;
                    mlp = mlp.with_sub_norm(norm);
                }
                FeedForward::Dense(Box::new(mlp))
            }
            (FeedForwardKind::Sparse, Some(moe)) => {
                let mut moe = moe.clone();
                if let Some(k) = layer.top_k {
                    moe.router.top_k = k;
                }
                FeedForward::Sparse(Box::new(SparseMoe::load(w, s.hidden_size, &moe)?))
            }
            (FeedForwardKind::None, _) => FeedForward::None,
            (FeedForwardKind::Sparse, None) => {
                return Err(Error::Mlx(mlx_rs::error::Exception::custom(
                    "a sparse layer in a model without MoE settings",
                )))
            }
        })
    }

    pub fn forward(&self, x: &Array, tap: &mut Tap) -> Result<Array> {
        match self {
            FeedForward::Dense(mlp) => mlp.forward(x, tap),
            FeedForward::Sparse(moe) => moe.forward(x, tap),
            FeedForward::None => Ok(mlx_rs::ops::zeros_like(x)?),
        }
    }
}

/// A layer's token mixer, as loaded.
#[derive(Debug, Clone)]
pub enum Mixer {
    Attention(Attention),
    LatentAttention(LatentAttention),
    Mamba2(Mamba2Mixer),
    ShortConv(ShortConv),
    GatedDeltaNet(GatedDeltaNet),
    Mamba(MambaMixer),
    RgLru(RecurrentBlock),
    None,
}

impl Mixer {
    pub fn load(w: &WeightPath, s: &DecoderSettings, layer: &LayerSettings) -> Result<Self> {
        if let Some(g) = w.tensor_parallel() {
            if !matches!(layer.mixer, MixerKind::Attention | MixerKind::None) {
                return Err(Error::TensorParallel {
                    ranks: g.size(),
                    what: w.full_name(""),
                    message: format!(
                        "{:?} layers have no tensor-parallel form yet (attention only)",
                        layer.mixer
                    ),
                });
            }
            if s.sub_norms {
                // BitNet's norms run over the whole attention output and MLP features,
                // which the ranks hold in parts.
                return Err(Error::TensorParallel {
                    ranks: g.size(),
                    what: w.full_name("self_attn.attn_sub_norm"),
                    message: "a norm over features split across ranks has no tensor-parallel \
                              form"
                        .into(),
                });
            }
        }
        Ok(match (layer.mixer, &s.latent_attention, &layer.rope) {
            (MixerKind::Attention, _, _) => {
                let own;
                let settings = match layer.o_bias {
                    Some(o_bias) if o_bias != s.attention.o_bias => {
                        own = AttentionSettings {
                            o_bias,
                            ..s.attention.clone()
                        };
                        &own
                    }
                    _ => &s.attention,
                };
                let mut attention = Attention::load(
                    w,
                    s.hidden_size,
                    settings,
                    s.norm,
                    s.norm_eps,
                    layer.rope.clone(),
                )?;
                if s.sub_norms {
                    let a = &s.attention;
                    let width = a.num_heads * a.head_dim;
                    let norm = Norm::load(&w.pp("attn_sub_norm"), s.norm, width, s.norm_eps)?;
                    attention.sub_norm = Some(norm);
                }
                Mixer::Attention(attention)
            }
            (MixerKind::LatentAttention, Some(mla), Some(rope)) => {
                Mixer::LatentAttention(LatentAttention::load(w, s.hidden_size, mla, rope.clone())?)
            }
            (MixerKind::LatentAttention, _, _) => {
                return Err(Error::Mlx(mlx_rs::error::Exception::custom(
                    "a latent-attention layer needs latent-attention settings and a RoPE",
                )))
            }
            (MixerKind::Mamba2, _, _) => match &s.mamba2 {
                Some(m) => Mixer::Mamba2(Mamba2Mixer::load(w, s.hidden_size, m)?),
                None => {
                    return Err(Error::Mlx(mlx_rs::error::Exception::custom(
                        "a Mamba2 layer in a model without Mamba2 settings",
                    )))
                }
            },
            (MixerKind::ShortConv, _, _) => match s.short_conv {
                Some((kernel, bias)) => {
                    Mixer::ShortConv(ShortConv::load(w, s.hidden_size, kernel, bias)?)
                }
                None => {
                    return Err(Error::Mlx(mlx_rs::error::Exception::custom(
                        "a short-convolution layer in a model without its settings",
                    )))
                }
            },
            (MixerKind::GatedDeltaNet, _, _) => match &s.gated_delta_net {
                Some(d) => Mixer::GatedDeltaNet(GatedDeltaNet::load(w, s.hidden_size, d)?),
                None => {
                    return Err(Error::Mlx(mlx_rs::error::Exception::custom(
                        "a gated DeltaNet layer in a model without its settings",
                    )))
                }
            },
            (MixerKind::Mamba, _, _) => match &s.mamba {
                Some(m) => Mixer::Mamba(MambaMixer::load(w, s.hidden_size, m)?),
                None => {
                    return Err(Error::Mlx(mlx_rs::error::Exception::custom(
                        "a Mamba layer in a model without Mamba settings",
                    )))
                }
            },
            (MixerKind::RgLru, _, _) => match s.rg_lru {
                Some((width, heads, kernel)) => Mixer::RgLru(RecurrentBlock::load(
                    w,
                    s.hidden_size,
                    width,
                    heads,
                    kernel,
                )?),
                None => {
                    return Err(Error::Mlx(mlx_rs::error::Exception::custom(
                        "a recurrent block in a model without its settings",
                    )))
                }
            },
            (MixerKind::None, _, _) => Mixer::None,
        })
    }

    /// The checkpoint name of the mixer's weights under its layer.
    pub fn weight_path(kind: MixerKind) -> &'static str {
        match kind {
            MixerKind::Attention | MixerKind::LatentAttention => "self_attn",
            MixerKind::Mamba2 | MixerKind::Mamba => "mixer",
            MixerKind::RgLru => "temporal_block",
            MixerKind::ShortConv => "conv",
            MixerKind::GatedDeltaNet => "linear_attn",
            MixerKind::None => "",
        }
    }

    pub fn forward(&self, x: &Array, cache: &mut LayerCache, tap: &mut Tap) -> Result<Array> {
        match self {
            Mixer::Attention(attention) => attention.forward(x, cache.kv_mut()?, tap),
            Mixer::LatentAttention(mla) => mla.forward(x, cache, tap),
            Mixer::Mamba2(m) => m.forward(x, cache.recurrent_mut()?, tap),
            Mixer::ShortConv(c) => c.forward(x, cache.recurrent_mut()?),
            Mixer::GatedDeltaNet(d) => d.forward(x, cache.recurrent_mut()?),
            Mixer::Mamba(m) => m.forward(x, cache.recurrent_mut()?),
            Mixer::RgLru(r) => r.forward(x, cache.recurrent_mut()?),
            Mixer::None => {
                if let LayerCache::Stateless { offset } = cache {
                    *offset += x.dim(1);
                }
                Ok(mlx_rs::ops::zeros_like(x)?)
            }
        }
    }

    /// The quantization of the mixer's projections, if any.
    pub fn quantization(&self) -> Option<crate::nn::Quantization> {
        match self {
            Mixer::Attention(a) => a.qkv.first().weight.quantization(),
            Mixer::LatentAttention(mla) => mla.quantization(),
            Mixer::Mamba2(m) => m.in_proj.weight.quantization(),
            Mixer::ShortConv(c) => c.in_proj.weight.quantization(),
            Mixer::GatedDeltaNet(d) => d.out_proj.weight.quantization(),
            Mixer::Mamba(m) => m.in_proj.weight.quantization(),
            Mixer::RgLru(r) => r.linear_x.weight.quantization(),
            Mixer::None => None,
        }
    }
}

/// One decoder layer: attention and a feed-forward, with norms placed as the family
/// places them.
#[derive(Debug, Clone)]
pub struct DecoderLayer {
    pub self_attn: Mixer,
    pub mlp: FeedForward,
    /// Before attention (pre and sandwich placement).
    pub input_layernorm: Option<Norm>,
    /// After attention (post and sandwich), or before the MLP (pre); none in a layer
    /// without a feed-forward.
    pub post_attention_layernorm: Option<Norm>,
    /// Before the MLP (sandwich).
    pub pre_feedforward_layernorm: Option<Norm>,
    /// After the MLP (post and sandwich).
    pub post_feedforward_layernorm: Option<Norm>,
    pub placement: NormPlacement,
    pub residual_scale: Option<f32>,
    pub residual_in_f32: bool,
}

impl DecoderLayer {
    pub fn load(w: &WeightPath, s: &DecoderSettings, layer: &LayerSettings) -> Result<Self> {
        let norm = |name: &str| Norm::load(&w.pp(name), s.norm, s.hidden_size, s.norm_eps);
        let (pre, post) = match s.norm_placement {
            NormPlacement::Pre | NormPlacement::ParallelTwoNorms => (true, false),
            NormPlacement::Post | NormPlacement::PostResidual => (false, true),
            NormPlacement::Sandwich => (true, true),
            NormPlacement::Parallel => (true, false),
        };
        let one_norm = s.norm_placement == NormPlacement::Parallel;
        Ok(DecoderLayer {
            self_attn: Mixer::load(&w.pp(Mixer::weight_path(layer.mixer)), s, layer)?,
            mlp: FeedForward::load(&w.pp("mlp"), s, layer)?,
            input_layernorm: (pre && layer.mixer != MixerKind::None && !layer.no_input_norm)
                .then(|| norm("input_layernorm"))
                .transpose()?,
            post_attention_layernorm: (layer.feed_forward != FeedForwardKind::None && !one_norm)
                .then(|| norm("post_attention_layernorm"))
                .transpose()?,
            pre_feedforward_layernorm: (pre && post)
                .then(|| norm("pre_feedforward_layernorm"))
                .transpose()?,
            post_feedforward_layernorm: post
                .then(|| norm("post_feedforward_layernorm"))
                .transpose()?,
            placement: s.norm_placement,
            residual_scale: s.residual_scale,
            residual_in_f32: s.residual_in_f32,
        })
    }

    pub fn forward(&self, x: &Array, cache: &mut LayerCache, tap: &mut Tap) -> Result<Array> {
        if let (NormPlacement::PostResidual, Some(n1), Some(n2)) = (
            self.placement,
            &self.post_attention_layernorm,
            &self.post_feedforward_layernorm,
        ) {
            let attn = self.self_attn.forward(x, cache, tap)?;
            let h = n1.forward(&x.add(scale(&attn, self.residual_scale)?)?)?;
            tap.record("attention_residual", &h);
            let out = self.mlp.forward(&h, tap)?;
            return n2.forward(&h.add(scale(&out, self.residual_scale)?)?);
        }
        if let NormPlacement::Parallel | NormPlacement::ParallelTwoNorms = self.placement {
            if !matches!(self.mlp, FeedForward::None) && !matches!(self.self_attn, Mixer::None) {
                let h = norm_opt(&self.input_layernorm, x)?;
                let attn = self.self_attn.forward(&h, cache, tap)?;
                let mlp_in = match &self.post_attention_layernorm {
                    Some(n) => n.forward(x)?,
                    None => h,
                };
                let out = self.mlp.forward(&mlp_in, tap)?;
                return Ok(x
                    .add(scale(&attn, self.residual_scale)?)?
                    .add(scale(&out, self.residual_scale)?)?);
            }
        }
        let (attn_in, attn_out_norm, mlp_in_norm, mlp_out_norm) = match self.placement {
            NormPlacement::Parallel | NormPlacement::ParallelTwoNorms => (
                &self.input_layernorm,
                None,
                self.post_attention_layernorm.as_ref(),
                None,
            ),
            NormPlacement::Pre => (
                &self.input_layernorm,
                None,
                self.post_attention_layernorm.as_ref(),
                None,
            ),
            NormPlacement::Post | NormPlacement::PostResidual => (
                &None,
                self.post_attention_layernorm.as_ref(),
                None,
                self.post_feedforward_layernorm.as_ref(),
            ),
            NormPlacement::Sandwich => (
                &self.input_layernorm,
                self.post_attention_layernorm.as_ref(),
                self.pre_feedforward_layernorm.as_ref(),
                self.post_feedforward_layernorm.as_ref(),
            ),
        };
        // Layers of one sub-block: a mixer alone (Mamba2) or a feed-forward alone.
        if let FeedForward::None = self.mlp {
            let input = match attn_in {
                Some(n) => match n.dtype() {
                    Some(dtype) => n.forward(&x.as_dtype(dtype)?)?,
                    None => n.forward(x)?,
                },
                None => x.clone(),
            };
            let out = self.self_attn.forward(&input, cache, tap)?;
            let residual = if self.residual_in_f32 {
                x.as_dtype(mlx_rs::Dtype::Float32)?
            } else {
                x.clone()
            };
            return Ok(residual.add(scale(&out, self.residual_scale)?)?);
        }
        if let Mixer::None = self.self_attn {
            self.self_attn.forward(x, cache, tap)?;
            let out = self
                .mlp
                .forward(&norm_opt(&self.post_attention_layernorm, x)?, tap)?;
            return Ok(x.add(scale(&out, self.residual_scale)?)?);
        }
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
    embed_positions: Option<LearnedPositions>,
    sinusoidal_positions: Option<SinusoidalPositions>,
    embed_layernorm: Option<Norm>,
    layers: Vec<DecoderLayer>,
    /// The final norm (also the embeddings' with [`DecoderSettings::embedding_norm`]).
    norm: Option<Norm>,
    /// Between the final norm and the output layer.
    prediction_head: Option<PredictionHead>,
    lm_head: Option<Linear>,
    /// The bias of an output layer tied to the embeddings.
    tied_lm_head_bias: Option<Array>,
    settings: DecoderSettings,
    info: ModelInfo,
}

impl Decoder {
    /// Builds the model, taking each weight by its checkpoint name and checking its shape.
    pub fn new(settings: DecoderSettings, weights: &Weights) -> Result<Decoder> {
        let s = &settings;
        let w = weights.path("model");
        let embed_tokens = Embedding::load(&w.pp("embed_tokens"), s.vocab_size, s.hidden_size)?;
        let embed_positions = if s.learned_positions {
            let positions = i32::try_from(s.max_position_embeddings).map_err(|_| {
                Error::Mlx(mlx_rs::error::Exception::custom(format!(
                    "{} learned positions do not fit a table",
                    s.max_position_embeddings
                )))
            })?;
            Some(LearnedPositions::load_from_row(
                &w.pp("embed_positions"),
                positions,
                s.position_offset,
                s.hidden_size,
            )?)
        } else {
            None
        };
        let sinusoidal_positions = match s.sinusoidal_positions {
            Some(sinusoid) => {
                let positions = i32::try_from(s.max_position_embeddings).unwrap_or(i32::MAX);
                Some(SinusoidalPositions::new(
                    s.hidden_size,
                    positions,
                    sinusoid,
                )?)
            }
            None => None,
        };
        let embed_layernorm = s
            .embedding_layernorm
            .then(|| Norm::load(&w.pp("embed_layernorm"), s.norm, s.hidden_size, s.norm_eps))
            .transpose()?;
        let layers = s
            .layers
            .iter()
            .enumerate()
            .map(|(i, layer)| {
                let w = w.pp(&format!("layers.{i}"));
                let mut loaded = DecoderLayer::load(&w, s, layer)?;
                // Differential attention's λ depends on the layer's depth.
                if let (true, Mixer::Attention(attention)) =
                    (s.attention.differential, &mut loaded.self_attn)
                {
                    if let Some(g) = w.tensor_parallel() {
                        return Err(Error::TensorParallel {
                            ranks: g.size(),
                            what: w.full_name("self_attn"),
                            message: "differential attention pairs heads across ranks".into(),
                        });
                    }
                    let a = &attention.settings;
                    attention.differential = Some(Differential::load(
                        &w.pp("self_attn"),
                        weights.source(),
                        (a.num_heads, a.num_kv_heads, a.head_dim),
                        i,
                        s.norm_eps as f32,
                    )?);
                }
                Ok(loaded)
            })
            .collect::<Result<Vec<_>>>()?;
        let norm = (s.final_norm || s.embedding_norm)
            .then(|| Norm::load(&w.pp("norm"), s.norm, s.hidden_size, s.norm_eps))
            .transpose()?;
        // Under tensor parallelism the output layer is split over the vocabulary (when it
        // divides), each rank's logits gathered.
        let head_split = match weights.root().tensor_parallel() {
            Some(g) if s.vocab_size % g.size() == 0 => {
                let mine = even_part(s.vocab_size, g, "vocab_size")?;
                Split::OutputsGathered(vec![mine], g.clone())
            }
            _ => Split::Whole,
        };
        let prediction_head = s
            .prediction_head
            .map(|head| {
                PredictionHead::load(
                    &weights.path("head"),
                    &head,
                    s.hidden_size,
                    s.norm,
                    s.norm_eps,
                )
            })
            .transpose()?;
        let lm_head = if s.tie_word_embeddings {
            None
        } else {
            Some(Linear::load_split(
                &weights.path("lm_head"),
                s.hidden_size,
                s.vocab_size,
                s.lm_head_bias,
                &head_split,
            )?)
        };
        let tied_lm_head_bias = (s.tie_word_embeddings && s.lm_head_bias)
            .then(|| weights.path("lm_head").get("bias", &[s.vocab_size]))
            .transpose()?;
        let quantization = layers
            .first()
            .and_then(|l| l.self_attn.quantization())
            .or(embed_tokens.weight.quantization());
        let inactive: usize = layers
            .iter()
            .map(|l| match &l.mlp {
                FeedForward::Sparse(moe) => moe.inactive_parameters(s.hidden_size),
                FeedForward::Dense(_) | FeedForward::None => 0,
            })
            .sum();
        let info = ModelInfo {
            model_type: s.model_type.clone(),
            vocab_size: s.vocab_size,
            hidden_size: s.hidden_size,
            num_layers: layers.len(),
            max_position_embeddings: s.max_position_embeddings,
            dtype: norm
                .as_ref()
                .and_then(Norm::dtype)
                .unwrap_or(embed_tokens.weight.dtype()),
            quantization,
            num_parameters: weights.num_parameters(),
            num_active_parameters: weights.num_parameters().saturating_sub(inactive),
        };
        Ok(Decoder {
            embed_tokens,
            embed_positions,
            sinusoidal_positions,
            embed_layernorm,
            layers,
            norm,
            prediction_head,
            lm_head,
            tied_lm_head_bias,
            settings,
            info,
        })
    }

    pub fn settings(&self) -> &DecoderSettings {
        &self.settings
    }
}

impl LanguageModel for Decoder {
    fn forward(&self, tokens: &Array, cache: &mut [LayerCache], tap: &mut Tap) -> Result<Array> {
        check_cache_len(cache.len(), self.layers.len())?;
        let s = &self.settings;
        let h = self.embed_tokens.forward(tokens)?;
        let mut h = scale(&h, s.embedding_scale)?;
        if let Some(positions) = &self.embed_positions {
            h = positions.forward(&h, LayerCache::offset_of(cache)?)?;
        }
        if let Some(positions) = &self.sinusoidal_positions {
            h = positions.forward(&h, LayerCache::offset_of(cache)?)?;
        }
        if s.embedding_norm {
            h = norm_opt(&self.norm, &h)?;
        }
        if let Some(norm) = &self.embed_layernorm {
            // The rows as looked up (their dtype is what a conversion changes first).
            tap.record("embed_tokens", &h);
            h = norm.forward(&h)?;
        }
        tap.record("embeddings", &h);
        for (i, (layer, cache)) in self.layers.iter().zip(cache.iter_mut()).enumerate() {
            tap.scope(|| format!("layers.{i}."));
            h = layer.forward(&h, cache, tap)?;
            tap.scope(String::new);
            tap.record(&format!("layers.{i}"), &h);
        }
        let h = if s.final_norm {
            norm_opt(&self.norm, &h)?
        } else {
            h
        };
        tap.record("norm", &h);
        let h = match &self.prediction_head {
            Some(head) => {
                let h = head.forward(&h)?;
                tap.record("head", &h);
                h
            }
            None => h,
        };
        let logits = match &self.lm_head {
            Some(head) => head.forward(&h)?,
            None => self.embed_tokens.as_linear(&h)?,
        };
        let logits = match &self.tied_lm_head_bias {
            Some(bias) => logits.add(bias)?,
            None => logits,
        };
        let logits = softcap(&scale(&logits, s.logits_scale)?, s.final_logit_softcap)?;
        let logits = if s.logits_in_f32 {
            logits.as_dtype(mlx_rs::Dtype::Float32)?
        } else {
            logits
        };
        tap.record("logits", &logits);
        Ok(logits)
    }

    fn new_cache(&self) -> Vec<LayerCache> {
        self.settings
            .layers
            .iter()
            .map(|l| l.new_cache(self.settings.latent_attention.as_ref()))
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

    fn alibi(&self) -> bool {
        let s = &self.settings;
        s.attention.alibi.is_some()
            && self.embed_positions.is_none()
            && s.layers.iter().all(|l| l.rope.is_none())
    }

    fn local_rope(&self) -> Option<&Rope> {
        self.settings
            .layers
            .iter()
            .find(|l| l.sliding_window.is_some() && l.rope.is_some())
            .and_then(|l| l.rope.as_ref())
    }
}

/// Fails unless a forward pass got one cache per layer.
pub fn check_cache_len(caches: usize, layers: usize) -> Result<()> {
    if caches == layers {
        return Ok(());
    }
    Err(Error::Mlx(mlx_rs::error::Exception::custom(format!(
        "the cache has {caches} layers, the model {layers}: use the model's new_cache()"
    ))))
}

/// Drops what every family computes itself (`rotary_emb.inv_freq`) and the output layer of
/// tied checkpoints that store it anyway (`lm_head.weight`, quantized: with its `scales`
/// and `biases`); modules nested under `lm_head.` (the ModernBERT decoder's prediction
/// head, `lm_head.dense`) are no output layer and stay.
pub fn drop_computed_weights(weights: &mut Weights, tie_word_embeddings: bool) {
    weights.rename(|name| {
        // A tied output layer may still have a bias of its own (Phi).
        let tied_output = name
            .strip_prefix("lm_head.")
            .is_some_and(|leaf| !leaf.contains('.') && leaf != "bias");
        let drop = name.contains("rotary_emb.inv_freq") || (tie_word_embeddings && tied_output);
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
    if let Some(c) = settings
        .layers
        .iter()
        .filter_map(|l| l.attention_chunk)
        .find(|&c| c < 1)
    {
        config.ensure(false, "attention_chunk_size", || {
            format!("must be at least 1 token, found {c}")
        })?;
    }
    if settings.sinusoidal_positions.is_some() {
        let h = settings.hidden_size;
        config.ensure(h % 2 == 0 && h > 2, "hidden_size", || {
            format!("sinusoidal positions need an even width above 2, found {h}")
        })?;
    }
    if let Some(moe) = &settings.moe {
        check_moe(config, moe)?;
        for k in settings.layers.iter().filter_map(|l| l.top_k) {
            let mut moe = moe.clone();
            moe.router.top_k = k;
            check_moe(config, &moe)?;
        }
    }
    let model = Decoder::new(settings, &weights)?;
    weights.check_all_used()?;
    Ok(Box::new(model))
}

/// Checks the expert counts of a config.
pub fn check_moe(config: &ConfigFile, moe: &MoeSettings) -> Result<()> {
    let r = &moe.router;
    config.ensure(r.num_experts > 0, "num_experts", || {
        format!("must be positive, found {}", r.num_experts)
    })?;
    config.ensure(
        r.top_k > 0 && r.top_k <= r.num_experts,
        "num_experts_per_tok",
        || {
            format!(
                "must be between 1 and the {} experts, found {}",
                r.num_experts, r.top_k
            )
        },
    )?;
    if let Some(g) = r.groups {
        config.ensure(
            g.groups > 0 && r.num_experts % g.groups == 0,
            "n_group",
            || {
                format!(
                    "{} experts cannot be split into {} groups",
                    r.num_experts, g.groups
                )
            },
        )?;
        config.ensure(
            g.top_groups > 0 && g.top_groups <= g.groups,
            "topk_group",
            || {
                format!(
                    "must be between 1 and n_group {}, found {}",
                    g.groups, g.top_groups
                )
            },
        )?;
        config.ensure(
            g.groups == 1 || r.num_experts / g.groups >= 2,
            "n_group",
            || "each group needs at least 2 experts".to_owned(),
        )?;
    }
    if let crate::moe::Scoring::SparseMixer { .. } = r.scoring {
        config.ensure(r.top_k == 2, "num_experts_per_tok", || {
            format!("sparsemixer routing picks 2 experts, found {}", r.top_k)
        })?;
    }
    config.ensure(moe.intermediate_size > 0, "moe_intermediate_size", || {
        format!("must be positive, found {}", moe.intermediate_size)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{max_abs, random};
    use std::collections::HashMap;

    /// `(y - mean) / √(var + eps) · w + b` over the last axis.
    fn layer_norm(y: &Array, w: &Array, b: &Array, eps: f32) -> Array {
        let mean = y.mean_axis(-1, true).unwrap();
        let centered = y.subtract(&mean).unwrap();
        let var = centered.square().unwrap().mean_axis(-1, true).unwrap();
        let normed = centered
            .multiply(var.add(Array::from_f32(eps)).unwrap().rsqrt().unwrap())
            .unwrap();
        normed.multiply(w).unwrap().add(b).unwrap()
    }

    /// `x · wᵀ + b`.
    fn linear(x: &Array, w: &Array, b: &Array) -> Array {
        x.matmul(w.t()).unwrap().add(b).unwrap()
    }

    /// A post-residual layer (OpenAI GPT's) and no final norm, on one token, where
    /// attention is `o_proj(v_proj(x))`: the logits against the closed form
    /// `E · ln_2(h + mlp(h))`, `h = ln_1(x + attn(x))`.
    #[test]
    fn post_residual_layer_without_final_norm_matches_the_closed_form() {
        let (hidden, inter, vocab, eps) = (8, 16, 5, 1e-5);
        let mut tensors = HashMap::new();
        let mut put = |name: &str, shape: &[i32], seed: u64| {
            let t = random(shape, seed, 0.5);
            tensors.insert(name.to_owned(), t.clone());
            t
        };
        let embed = put("model.embed_tokens.weight", &[vocab, hidden], 1);
        let p = "model.layers.0.";
        for (i, m) in ["q_proj", "k_proj"].iter().enumerate() {
            put(
                &format!("{p}self_attn.{m}.weight"),
                &[hidden, hidden],
                10 + i as u64,
            );
            put(&format!("{p}self_attn.{m}.bias"), &[hidden], 20 + i as u64);
        }
        let wv = put(&format!("{p}self_attn.v_proj.weight"), &[hidden, hidden], 3);
        let bv = put(&format!("{p}self_attn.v_proj.bias"), &[hidden], 4);
        let wo = put(&format!("{p}self_attn.o_proj.weight"), &[hidden, hidden], 5);
        let bo = put(&format!("{p}self_attn.o_proj.bias"), &[hidden], 6);
        let wu = put(&format!("{p}mlp.up_proj.weight"), &[inter, hidden], 7);
        let bu = put(&format!("{p}mlp.up_proj.bias"), &[inter], 8);
        let wd = put(&format!("{p}mlp.down_proj.weight"), &[hidden, inter], 9);
        let bd = put(&format!("{p}mlp.down_proj.bias"), &[hidden], 30);
        let w1 = put(
            &format!("{p}post_attention_layernorm.weight"),
            &[hidden],
            31,
        );
        let b1 = put(&format!("{p}post_attention_layernorm.bias"), &[hidden], 32);
        let w2 = put(
            &format!("{p}post_feedforward_layernorm.weight"),
            &[hidden],
            33,
        );
        let b2 = put(
            &format!("{p}post_feedforward_layernorm.bias"),
            &[hidden],
            34,
        );
        let settings = DecoderSettings {
            norm: NormKind::Layer { bias: true },
            norm_eps: f64::from(eps),
            norm_placement: NormPlacement::PostResidual,
            final_norm: false,
            tie_word_embeddings: true,
            attention: AttentionSettings {
                qkv_bias: true,
                o_bias: true,
                ..AttentionSettings::new(2, 2, 4)
            },
            ..DecoderSettings::new(
                "test",
                vocab,
                hidden,
                16,
                AttentionSettings::new(2, 2, 4),
                MlpSettings {
                    intermediate_size: inter,
                    layout: MlpLayout::UpDown,
                    activation: Activation::Relu,
                    bias: true,
                },
                vec![LayerSettings::default()],
            )
        };
        let weights = Weights::new(tensors, "test");
        let model = Decoder::new(settings, &weights).unwrap();
        let token = 3;
        let logits = model
            .forward(
                &Array::from_slice(&[token], &[1, 1]),
                &mut model.new_cache(),
                &mut Tap::off(),
            )
            .unwrap();

        let x = embed
            .take_axis(Array::from_slice(&[token], &[1]), 0)
            .unwrap();
        let attn = linear(&linear(&x, &wv, &bv), &wo, &bo);
        let h = layer_norm(&x.add(&attn).unwrap(), &w1, &b1, eps);
        let up = mlx_rs::ops::maximum(linear(&h, &wu, &bu), Array::from_f32(0.0)).unwrap();
        let out = layer_norm(&h.add(linear(&up, &wd, &bd)).unwrap(), &w2, &b2, eps);
        let expected = out.matmul(embed.t()).unwrap();
        let err = max_abs(&logits.reshape(&[1, vocab]).unwrap(), &expected);
        assert!(err < 1e-5, "max-abs {err}");
    }
}
