//! Llama, and the families that share its shape (`mistral`).
//!
//! Pre-norm decoder blocks: RMSNorm → grouped-query attention with RoPE → residual,
//! RMSNorm → SwiGLU MLP → residual; a final RMSNorm and the output layer (or the
//! embedding matrix when tied).

use super::{LanguageModel, ModelInfo};
use crate::attention::{scaled_dot_product_attention, AttentionMask};
use crate::cache::KvCache;
use crate::config::ConfigFile;
use crate::error::Result;
use crate::nn::{Embedding, Linear, RmsNorm};
use crate::rope::{Rope, RopeConfig, RopeFields};
use crate::tap::Tap;
use crate::weights::{WeightPath, Weights};
use mlx_rs::{nn::silu, Array};
use serde::Deserialize;

/// config.json fields, with Transformers' names and defaults.
#[derive(Debug, Clone, Deserialize)]
pub struct Config {
    pub model_type: String,
    pub vocab_size: i32,
    pub hidden_size: i32,
    pub intermediate_size: i32,
    pub num_hidden_layers: usize,
    pub num_attention_heads: i32,
    pub num_key_value_heads: Option<i32>,
    pub head_dim: Option<i32>,
    #[serde(default = "default_hidden_act")]
    pub hidden_act: String,
    #[serde(default = "default_max_position_embeddings")]
    pub max_position_embeddings: usize,
    #[serde(default = "default_rms_norm_eps")]
    pub rms_norm_eps: f64,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default)]
    pub mlp_bias: bool,
    /// Rotate adjacent pairs instead of halves (mlx-lm's field; Transformers checkpoints
    /// never need it).
    #[serde(default)]
    pub rope_traditional: bool,
    /// Mistral: each token attends to at most this many tokens.
    pub sliding_window: Option<i32>,
    #[serde(flatten)]
    pub rope: RopeFields,
}

fn default_hidden_act() -> String {
    "silu".to_owned()
}
fn default_max_position_embeddings() -> usize {
    2048
}
fn default_rms_norm_eps() -> f64 {
    1e-6
}

impl Config {
    fn num_kv_heads(&self) -> i32 {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    fn head_dim(&self) -> i32 {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads)
    }
}

struct Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    rope: Rope,
    num_heads: i32,
    num_kv_heads: i32,
    head_dim: i32,
    scale: f32,
    sliding_window: Option<i32>,
}

impl Attention {
    fn load(w: &WeightPath, cfg: &Config, rope: Rope) -> Result<Self> {
        let (heads, kv_heads, head_dim) =
            (cfg.num_attention_heads, cfg.num_kv_heads(), cfg.head_dim());
        let bias = cfg.attention_bias;
        Ok(Attention {
            q_proj: Linear::load(&w.pp("q_proj"), cfg.hidden_size, heads * head_dim, bias)?,
            k_proj: Linear::load(&w.pp("k_proj"), cfg.hidden_size, kv_heads * head_dim, bias)?,
            v_proj: Linear::load(&w.pp("v_proj"), cfg.hidden_size, kv_heads * head_dim, bias)?,
            o_proj: Linear::load(&w.pp("o_proj"), heads * head_dim, cfg.hidden_size, bias)?,
            rope,
            num_heads: heads,
            num_kv_heads: kv_heads,
            head_dim,
            scale: (head_dim as f32).powf(-0.5),
            sliding_window: cfg.sliding_window,
        })
    }

    fn forward(&self, x: &Array, cache: &mut KvCache, tap: &mut Tap) -> Result<Array> {
        let (batch, len) = (x.dim(0), x.dim(1));
        let heads = |t: Array, n: i32| -> Result<Array> {
            Ok(t.reshape(&[batch, len, n, self.head_dim])?
                .swap_axes(1, 2)?)
        };
        let q = heads(self.q_proj.forward(x)?, self.num_heads)?;
        let k = heads(self.k_proj.forward(x)?, self.num_kv_heads)?;
        let v = heads(self.v_proj.forward(x)?, self.num_kv_heads)?;
        tap.record("self_attn.q_proj", &q);
        tap.record("self_attn.k_proj", &k);
        tap.record("self_attn.v_proj", &v);

        let offset = cache.offset();
        let q = self.rope.apply(&q, offset)?;
        let k = self.rope.apply(&k, offset)?;
        tap.record("self_attn.rope_q", &q);
        tap.record("self_attn.rope_k", &k);

        let (k, v) = cache.update(k, v)?;
        let mask = AttentionMask::new(len, offset, self.sliding_window, q.dtype())?;
        let out = scaled_dot_product_attention(&q, &k, &v, self.scale, &mask)?;
        tap.record("self_attn.sdpa", &out);
        let out = out.swap_axes(1, 2)?.reshape(&[batch, len, -1])?;
        let out = self.o_proj.forward(&out)?;
        tap.record("self_attn.o_proj", &out);
        Ok(out)
    }
}

struct Mlp {
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
}

impl Mlp {
    fn load(w: &WeightPath, cfg: &Config) -> Result<Self> {
        let (hidden, inter, bias) = (cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias);
        Ok(Mlp {
            gate_proj: Linear::load(&w.pp("gate_proj"), hidden, inter, bias)?,
            up_proj: Linear::load(&w.pp("up_proj"), hidden, inter, bias)?,
            down_proj: Linear::load(&w.pp("down_proj"), inter, hidden, bias)?,
        })
    }

    fn forward(&self, x: &Array, tap: &mut Tap) -> Result<Array> {
        let gate = silu(self.gate_proj.forward(x)?)?;
        tap.record("mlp.act", &gate);
        let hidden = gate.multiply(self.up_proj.forward(x)?)?;
        tap.record("mlp.gate_up", &hidden);
        let out = self.down_proj.forward(&hidden)?;
        tap.record("mlp.down_proj", &out);
        Ok(out)
    }
}

struct DecoderLayer {
    self_attn: Attention,
    mlp: Mlp,
    input_layernorm: RmsNorm,
    post_attention_layernorm: RmsNorm,
}

impl DecoderLayer {
    fn load(w: &WeightPath, cfg: &Config, rope: Rope) -> Result<Self> {
        Ok(DecoderLayer {
            self_attn: Attention::load(&w.pp("self_attn"), cfg, rope)?,
            mlp: Mlp::load(&w.pp("mlp"), cfg)?,
            input_layernorm: RmsNorm::load(
                &w.pp("input_layernorm"),
                cfg.hidden_size,
                cfg.rms_norm_eps,
            )?,
            post_attention_layernorm: RmsNorm::load(
                &w.pp("post_attention_layernorm"),
                cfg.hidden_size,
                cfg.rms_norm_eps,
            )?,
        })
    }

    fn forward(&self, x: &Array, cache: &mut KvCache, tap: &mut Tap) -> Result<Array> {
        let normed = self.input_layernorm.forward(x)?;
        tap.record("input_layernorm", &normed);
        let h = x.add(self.self_attn.forward(&normed, cache, tap)?)?;
        tap.record("attention_residual", &h);
        let normed = self.post_attention_layernorm.forward(&h)?;
        tap.record("post_attention_layernorm", &normed);
        Ok(h.add(self.mlp.forward(&normed, tap)?)?)
    }
}

/// A Llama-family causal language model.
pub struct Model {
    embed_tokens: Embedding,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    lm_head: Option<Linear>,
    info: ModelInfo,
}

impl Model {
    /// Builds the model from sanitized weights.
    pub fn new(config: &ConfigFile, cfg: &Config, weights: &Weights) -> Result<Self> {
        let rope_config = RopeConfig {
            traditional: cfg.rope_traditional,
            ..RopeConfig::from_fields(
                &cfg.rope,
                cfg.head_dim(),
                cfg.max_position_embeddings,
                10_000.0,
                &config.path,
            )?
        };
        let rope = Rope::new(rope_config)?;
        let w = weights.path("model");
        let embed_tokens = Embedding::load(&w.pp("embed_tokens"), cfg.vocab_size, cfg.hidden_size)?;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| DecoderLayer::load(&w.pp(&format!("layers.{i}")), cfg, rope.clone()))
            .collect::<Result<Vec<_>>>()?;
        let norm = RmsNorm::load(&w.pp("norm"), cfg.hidden_size, cfg.rms_norm_eps)?;
        let lm_head = if cfg.tie_word_embeddings {
            None
        } else {
            Some(Linear::load(
                &weights.path("lm_head"),
                cfg.hidden_size,
                cfg.vocab_size,
                false,
            )?)
        };
        let info = ModelInfo {
            model_type: cfg.model_type.clone(),
            vocab_size: cfg.vocab_size,
            hidden_size: cfg.hidden_size,
            num_layers: cfg.num_hidden_layers,
            max_position_embeddings: cfg.max_position_embeddings,
            dtype: norm.weight.dtype(),
            quantization: layers
                .first()
                .and_then(|l| l.self_attn.q_proj.weight.quantization())
                .or(embed_tokens.weight.quantization()),
            num_parameters: weights.num_parameters(),
        };
        Ok(Model {
            embed_tokens,
            layers,
            norm,
            lm_head,
            info,
        })
    }
}

impl LanguageModel for Model {
    fn forward(&self, tokens: &Array, cache: &mut [KvCache], tap: &mut Tap) -> Result<Array> {
        let mut h = self.embed_tokens.forward(tokens)?;
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
        tap.record("logits", &logits);
        Ok(logits)
    }

    fn new_cache(&self) -> Vec<KvCache> {
        self.layers.iter().map(|_| KvCache::new()).collect()
    }

    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn rope(&self) -> Option<&Rope> {
        self.layers.first().map(|l| &l.self_attn.rope)
    }
}

/// Drops what the model computes itself (`rotary_emb.inv_freq`) and the output layer of
/// tied checkpoints that store it anyway.
pub fn sanitize(weights: &mut Weights, cfg: &Config) {
    weights.rename(|name| {
        let drop = name.contains("rotary_emb.inv_freq")
            || (cfg.tie_word_embeddings && name.starts_with("lm_head."));
        (!drop).then(|| name.to_owned())
    });
}

/// The registry's entry point.
pub fn load(config: &ConfigFile, mut weights: Weights) -> Result<Box<dyn LanguageModel>> {
    let cfg: Config = config.parse()?;
    config.ensure(cfg.hidden_act == "silu", "hidden_act", || {
        format!(
            "`{}` is not supported by the llama module (silu only)",
            cfg.hidden_act
        )
    })?;
    config.ensure(
        cfg.num_attention_heads > 0 && cfg.num_kv_heads() > 0,
        "num_attention_heads",
        || "must be positive".to_owned(),
    )?;
    config.ensure(
        cfg.num_attention_heads % cfg.num_kv_heads() == 0,
        "num_key_value_heads",
        || {
            format!(
                "{} query heads cannot be grouped over {} key/value heads",
                cfg.num_attention_heads,
                cfg.num_kv_heads()
            )
        },
    )?;
    sanitize(&mut weights, &cfg);
    let model = Model::new(config, &cfg, &weights)?;
    weights.check_all_used()?;
    Ok(Box::new(model))
}
