//! Falcon-H1 (`falcon_h1`): every layer runs a Mamba2 mixer and attention side by side on
//! the same normed input and adds both to the residual, then a SwiGLU MLP; μP multipliers
//! throughout.
//!
//! No [`DecoderSettings`](crate::transformer::DecoderSettings) describe two mixers in
//! parallel, so the family is written here on the public blocks ([`Mamba2Mixer`],
//! [`Attention`], [`Mlp`], [`Norm`]):
//!
//! ```text
//! h   = input_layernorm(x)
//! x   = x + mamba(h) + attention(h)
//! out = x + feed_forward(pre_ff_layernorm(x))
//! ```
//!
//! - The multipliers (`embedding_multiplier`, `attention_in/out_multiplier`,
//!   `ssm_in/out_multiplier`, the per-section `ssm_multipliers` on `in_proj`'s output,
//!   `mlp_multipliers` on the gate and the down projection, `lm_head_multiplier`) are
//!   folded into the weights at load time, as mlx-lm's converter does; `key_multiplier`
//!   scales the attention scores. Checkpoints mlx-lm converted (conv weights
//!   `[channels, kernel, 1]`) come folded already, except for what mlx-lm leaves out
//!   (`v_proj`'s share of `attention_in_multiplier`, biases, `key_multiplier`), which is
//!   applied here.
//! - The Mamba2 mixer: `mamba_d_ssm` wide in `mamba_n_heads` heads, its output gated by
//!   `silu(z)`, through the gated RMSNorm when `mamba_rms_norm` (before or after the gate
//!   as `mamba_norm_before_gate` says); RoPE on every attention layer.
//! - Each layer has two caches: the mixer's recurrent state, then the attention's keys and
//!   values.

use crate::attention::{Attention, AttentionSettings};
use crate::cache::{KvCache, LayerCache, RecurrentCache};
use crate::config::ConfigFile;
use crate::error::{Error, Result};
use crate::mlp::{Activation, Mlp, MlpLayout, MlpSettings};
use crate::model::{LanguageModel, ModelInfo};
use crate::nn::{scale, Embedding, Linear};
use crate::norm::{Norm, NormKind};
use crate::rope::{Rope, RopeConfig, RopeFields};
use crate::ssm::{Mamba2Gate, Mamba2Mixer, Mamba2Settings};
use crate::tap::Tap;
use crate::transformer::{check_cache_len, check_heads, drop_computed_weights};
use crate::weights::Weights;
use mlx_rs::{Array, Dtype};
use serde::Deserialize;

/// config.json fields, with the names of `FalconH1Config`.
#[derive(Debug, Clone, Deserialize)]
pub struct Config {
    pub vocab_size: i32,
    pub hidden_size: i32,
    pub intermediate_size: i32,
    pub num_hidden_layers: usize,
    pub num_attention_heads: i32,
    #[serde(default)]
    pub num_key_value_heads: Option<i32>,
    #[serde(default)]
    pub head_dim: Option<i32>,
    pub hidden_act: String,
    pub rms_norm_eps: f64,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    pub attention_bias: bool,
    pub mlp_bias: bool,
    #[serde(default)]
    pub mamba_d_ssm: Option<i32>,
    pub mamba_n_heads: i32,
    /// A number, or "auto" (`mamba_d_ssm / mamba_n_heads`).
    pub mamba_d_head: serde_json::Value,
    pub mamba_n_groups: i32,
    pub mamba_d_state: i32,
    pub mamba_d_conv: i32,
    pub mamba_expand: i32,
    pub mamba_chunk_size: i32,
    pub mamba_conv_bias: bool,
    pub mamba_proj_bias: bool,
    pub mamba_norm_before_gate: bool,
    pub mamba_rms_norm: bool,
    pub projectors_bias: bool,
    #[serde(deserialize_with = "crate::config::f64_pair_or_non_finite")]
    pub time_step_limit: (f64, f64),
    pub lm_head_multiplier: f64,
    pub embedding_multiplier: f64,
    #[serde(default)]
    pub mlp_multipliers: Option<[f64; 2]>,
    pub key_multiplier: f64,
    pub attention_out_multiplier: f64,
    pub attention_in_multiplier: f64,
    /// For the z, x, B, C and dt sections of `in_proj`'s output.
    #[serde(default)]
    pub ssm_multipliers: Option<[f64; 5]>,
    pub ssm_in_multiplier: f64,
    pub ssm_out_multiplier: f64,
    #[serde(flatten)]
    pub rope: RopeFields,
}

/// Transformers' defaults for the fields config.json may leave out.
const DEFAULTS: &str = r#"{"vocab_size":128000,"tie_word_embeddings":false,"hidden_size":4096,"intermediate_size":14336,"num_hidden_layers":32,"num_attention_heads":32,"num_key_value_heads":8,"hidden_act":"silu","rms_norm_eps":1e-5,"max_position_embeddings":8192,"mamba_d_ssm":1024,"mamba_n_heads":128,"mamba_d_head":"auto","mamba_n_groups":1,"mamba_d_state":256,"mamba_d_conv":4,"mamba_expand":2,"mamba_chunk_size":256,"mamba_conv_bias":true,"mamba_proj_bias":false,"mamba_norm_before_gate":true,"mamba_rms_norm":false,"time_step_limit":[0.0,{"__float__":"Infinity"}],"projectors_bias":false,"lm_head_multiplier":1.0,"embedding_multiplier":1.0,"key_multiplier":1.0,"attention_out_multiplier":1.0,"attention_in_multiplier":1.0,"ssm_in_multiplier":1.0,"ssm_out_multiplier":1.0,"attention_bias":false,"mlp_bias":false}"#;

impl Config {
    /// The Mamba2 mixer of every layer.
    fn mamba2(&self, config: &ConfigFile) -> Result<Mamba2Settings> {
        let inner = self
            .mamba_d_ssm
            .unwrap_or(self.mamba_expand * self.hidden_size);
        let heads = self.mamba_n_heads;
        config.ensure(heads > 0 && inner % heads == 0, "mamba_n_heads", || {
            format!("{heads} heads cannot split mamba_d_ssm {inner}")
        })?;
        let head_dim = match &self.mamba_d_head {
            serde_json::Value::String(s) if s == "auto" => inner / heads,
            v => v.as_i64().map(|v| v as i32).ok_or_else(|| {
                Error::config(&config.path, "mamba_d_head", "must be a number or \"auto\"")
            })?,
        };
        config.ensure(head_dim * heads == inner, "mamba_d_head", || {
            format!("{heads} heads of {head_dim} do not make mamba_d_ssm {inner}")
        })?;
        config.ensure(
            self.mamba_n_groups > 0 && heads % self.mamba_n_groups == 0,
            "mamba_n_groups",
            || {
                format!(
                    "{heads} heads cannot be split into {} groups",
                    self.mamba_n_groups
                )
            },
        )?;
        for (field, value) in [
            ("mamba_d_state", self.mamba_d_state),
            ("mamba_d_conv", self.mamba_d_conv),
        ] {
            config.ensure(value > 0, field, || {
                format!("must be positive, found {value}")
            })?;
        }
        let gate = match (self.mamba_rms_norm, self.mamba_norm_before_gate) {
            (false, _) => Mamba2Gate::Silu,
            (true, false) => Mamba2Gate::NormAfterGate,
            (true, true) => Mamba2Gate::NormBeforeGate,
        };
        Ok(Mamba2Settings {
            num_heads: heads,
            head_dim,
            state_size: self.mamba_d_state,
            n_groups: self.mamba_n_groups,
            conv_kernel: self.mamba_d_conv,
            conv_bias: self.mamba_conv_bias,
            bias: self.mamba_proj_bias,
            out_bias: self.projectors_bias,
            chunk_size: self.mamba_chunk_size,
            time_step_limit: (
                self.time_step_limit.0 as f32,
                self.time_step_limit.1.min(f64::from(f32::MAX)) as f32,
            ),
            // Transformers' decoding step applies no limit.
            clamp_steps: false,
            norm_eps: self.rms_norm_eps,
            gate,
            chunked_prefill: true,
        })
    }

    /// The μP vector: each section of `in_proj`'s output (z, x, B, C, dt) times its
    /// `ssm_multipliers` entry.
    fn mup_vector(&self, s: &Mamba2Settings) -> Array {
        let m = self.ssm_multipliers.unwrap_or([1.0; 5]);
        let (inner, bc) = (s.intermediate_size(), s.n_groups * s.state_size);
        let sizes = [inner, inner, bc, bc, s.num_heads];
        let values: Vec<f32> = sizes
            .iter()
            .zip(m)
            .flat_map(|(&n, m)| std::iter::repeat_n(m as f32, n as usize))
            .collect();
        Array::from_slice(&values, &[values.len() as i32])
    }
}

struct Layer {
    input_layernorm: Norm,
    mamba: Mamba2Mixer,
    self_attn: Attention,
    pre_ff_layernorm: Norm,
    feed_forward: Mlp,
}

impl Layer {
    fn forward(&self, x: &Array, cache: &mut [LayerCache], tap: &mut Tap) -> Result<Array> {
        let [recurrent, kv] = cache else {
            return Err(Error::Mlx(mlx_rs::error::Exception::custom(
                "a Falcon-H1 layer needs two caches",
            )));
        };
        let h = self.input_layernorm.forward(x)?;
        let mamba = self.mamba.forward(&h, recurrent.recurrent_mut()?, tap)?;
        let attention = self.self_attn.forward(&h, kv.kv_mut()?, tap)?;
        let x = x.add(&mamba)?.add(&attention)?;
        tap.record("attention_residual", &x);
        let out = self
            .feed_forward
            .forward(&self.pre_ff_layernorm.forward(&x)?, tap)?;
        Ok(x.add(&out)?)
    }
}

/// A loaded Falcon-H1 model.
pub struct FalconH1 {
    embed_tokens: Embedding,
    layers: Vec<Layer>,
    final_layernorm: Norm,
    lm_head: Option<Linear>,
    /// `lm_head_multiplier / embedding_multiplier` on tied logits (the embeddings carry
    /// `embedding_multiplier`).
    logits_scale: Option<f32>,
    rope: Rope,
    info: ModelInfo,
}

/// The registry's entry point.
pub fn load(config: &ConfigFile, mut weights: Weights) -> Result<Box<dyn LanguageModel>> {
    if let Some(g) = weights.root().tensor_parallel() {
        return Err(crate::error::Error::TensorParallel {
            ranks: g.size(),
            what: config.path.display().to_string(),
            message: "Falcon-H1 models have no tensor-parallel form yet".into(),
        });
    }
    let c: Config = config.parse_with_defaults(DEFAULTS)?;
    let h = c.hidden_size;
    for (field, value) in [("hidden_size", h), ("vocab_size", c.vocab_size)] {
        config.ensure(value > 0, field, || {
            format!("must be positive, found {value}")
        })?;
    }
    let kv_heads = c.num_key_value_heads.unwrap_or(c.num_attention_heads);
    check_heads(config, c.num_attention_heads, kv_heads)?;
    if c.tie_word_embeddings {
        config.ensure(
            c.embedding_multiplier != 0.0,
            "embedding_multiplier",
            || "a tied model cannot divide its logits by 0".to_owned(),
        )?;
    }
    let head_dim = c.head_dim.unwrap_or(h / c.num_attention_heads);
    let rope = Rope::new(RopeConfig::from_fields(
        &c.rope,
        head_dim,
        c.max_position_embeddings,
        10_000.0,
        &config.path,
    )?)?;
    let attention = AttentionSettings {
        qkv_bias: c.attention_bias,
        o_bias: c.attention_bias,
        scale: (c.key_multiplier / f64::from(head_dim).sqrt()) as f32,
        ..AttentionSettings::new(c.num_attention_heads, kv_heads, head_dim)
    };
    let mamba2 = c.mamba2(config)?;
    let mlp = MlpSettings {
        intermediate_size: c.intermediate_size,
        layout: MlpLayout::Gated,
        activation: Activation::from_config(config, "hidden_act", &c.hidden_act)?,
        bias: c.mlp_bias,
    };
    drop_computed_weights(&mut weights, c.tie_word_embeddings);
    weights.rename(|name| (!name.ends_with(".mup_vector")).then(|| name.to_owned()));
    // The μP multipliers folded into the weights that follow or precede them, as mlx-lm's
    // converter does (a checkpoint it converted has that done already), and what it
    // leaves out.
    if !weights.converted_by_mlx_lm() {
        fold_matrices(&mut weights, &c, &mamba2)?;
    }
    fold_what_mlx_lm_leaves(&mut weights, &c, &mamba2)?;
    weights.eval()?;

    let w = weights.path("model");
    let norm = |name: &str| Norm::load(&w.pp(name), NormKind::Rms, h, c.rms_norm_eps);
    let layers = (0..c.num_hidden_layers)
        .map(|i| {
            let l = w.pp(&format!("layers.{i}"));
            Ok(Layer {
                input_layernorm: Norm::load(
                    &l.pp("input_layernorm"),
                    NormKind::Rms,
                    h,
                    c.rms_norm_eps,
                )?,
                mamba: Mamba2Mixer::load(&l.pp("mamba"), h, &mamba2)?,
                self_attn: Attention::load(
                    &l.pp("self_attn"),
                    h,
                    &attention,
                    NormKind::Rms,
                    c.rms_norm_eps,
                    Some(rope.clone()),
                )?,
                pre_ff_layernorm: Norm::load(
                    &l.pp("pre_ff_layernorm"),
                    NormKind::Rms,
                    h,
                    c.rms_norm_eps,
                )?,
                feed_forward: Mlp::load(&l.pp("feed_forward"), &mlp, h)?,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let embed_tokens = Embedding::load(&w.pp("embed_tokens"), c.vocab_size, h)?;
    let final_layernorm = norm("final_layernorm")?;
    let lm_head = (!c.tie_word_embeddings)
        .then(|| Linear::load(&weights.path("lm_head"), h, c.vocab_size, false))
        .transpose()?;
    let info = ModelInfo {
        model_type: "falcon_h1".to_owned(),
        vocab_size: c.vocab_size,
        hidden_size: h,
        num_layers: c.num_hidden_layers,
        max_position_embeddings: c.max_position_embeddings,
        dtype: final_layernorm.dtype().unwrap_or(mlx_rs::Dtype::Float32),
        quantization: layers
            .first()
            .and_then(|l| l.self_attn.qkv.first().weight.quantization()),
        num_parameters: weights.num_parameters(),
        num_active_parameters: weights.num_parameters(),
    };
    weights.check_all_used()?;
    Ok(Box::new(FalconH1 {
        embed_tokens,
        layers,
        final_layernorm,
        lm_head,
        logits_scale: c
            .tie_word_embeddings
            .then(|| (c.lm_head_multiplier / c.embedding_multiplier) as f32),
        rope,
        info,
    }))
}

/// What mlx-lm's converter does to a Falcon-H1 checkpoint's weights (and so what the
/// loader expects of one it converted): the weight matrices of `embed_tokens`, `lm_head`,
/// `q_proj`/`k_proj`, `o_proj`, `in_proj`, `out_proj`, `gate_proj` and `down_proj` times
/// their multipliers; biases and `v_proj` as they are.
pub fn fold_as_mlx_lm(weights: &mut Weights, config: &ConfigFile) -> Result<()> {
    let c: Config = config.parse_with_defaults(DEFAULTS)?;
    let mamba2 = c.mamba2(config)?;
    fold_matrices(weights, &c, &mamba2)
}

fn fold_matrices(weights: &mut Weights, c: &Config, mamba2: &Mamba2Settings) -> Result<()> {
    let [gate, down] = c.mlp_multipliers.unwrap_or([1.0, 1.0]);
    let scalar = |m: f64| Array::from_f32(m as f32);
    let in_proj = c
        .mup_vector(mamba2)
        .multiply(scalar(c.ssm_in_multiplier))?
        .expand_dims(-1)?;
    let names: Vec<String> = weights.names().map(str::to_owned).collect();
    for name in names {
        let factor = if name.ends_with("embed_tokens.weight") {
            scalar(c.embedding_multiplier)
        } else if name.ends_with("lm_head.weight") {
            scalar(c.lm_head_multiplier)
        } else if name.ends_with("q_proj.weight") || name.ends_with("k_proj.weight") {
            scalar(c.attention_in_multiplier)
        } else if name.ends_with("o_proj.weight") {
            scalar(c.attention_out_multiplier)
        } else if name.ends_with("out_proj.weight") {
            scalar(c.ssm_out_multiplier)
        } else if name.ends_with("gate_proj.weight") {
            scalar(gate)
        } else if name.ends_with("down_proj.weight") {
            scalar(down)
        } else if name.ends_with("in_proj.weight") {
            in_proj.clone()
        } else {
            continue;
        };
        multiply(weights, &name, &factor)?;
    }
    Ok(())
}

/// The multipliers mlx-lm's folding leaves out, which Transformers applies: `v_proj`'s
/// share of `attention_in_multiplier` (its matrix, quantized or not) and the biases of the
/// projections whose output a multiplier scales (`in_proj`'s by the μP vector).
fn fold_what_mlx_lm_leaves(
    weights: &mut Weights,
    c: &Config,
    mamba2: &Mamba2Settings,
) -> Result<()> {
    let [gate, down] = c.mlp_multipliers.unwrap_or([1.0, 1.0]);
    let scalar = |m: f64| Array::from_f32(m as f32);
    let mup = c.mup_vector(mamba2);
    let names: Vec<String> = weights.names().map(str::to_owned).collect();
    for name in names {
        let factor = if let Some(path) = name.strip_suffix("v_proj.weight") {
            // An affine-quantized matrix is `scales · q + biases`: scaling both scales it.
            let path = format!("{path}v_proj");
            if weights.contains(&format!("{path}.scales")) {
                let m = scalar(c.attention_in_multiplier);
                multiply(weights, &format!("{path}.scales"), &m)?;
                multiply(weights, &format!("{path}.biases"), &m)?;
                continue;
            }
            scalar(c.attention_in_multiplier)
        } else if name.ends_with("o_proj.bias") {
            scalar(c.attention_out_multiplier)
        } else if name.ends_with("out_proj.bias") {
            scalar(c.ssm_out_multiplier)
        } else if name.ends_with("gate_proj.bias") {
            scalar(gate)
        } else if name.ends_with("down_proj.bias") {
            scalar(down)
        } else if name.ends_with("in_proj.bias") {
            mup.clone()
        } else {
            continue;
        };
        multiply(weights, &name, &factor)?;
    }
    Ok(())
}

/// `weights[name] *= factor` in f32, kept in the tensor's dtype; nothing when absent.
fn multiply(weights: &mut Weights, name: &str, factor: &Array) -> Result<()> {
    let Some(t) = weights.remove(name) else {
        return Ok(());
    };
    let dtype = t.dtype();
    let scaled = t
        .as_dtype(Dtype::Float32)?
        .multiply(factor)?
        .as_dtype(dtype)?;
    weights.insert(name, scaled);
    Ok(())
}

impl LanguageModel for FalconH1 {
    fn forward(&self, tokens: &Array, cache: &mut [LayerCache], tap: &mut Tap) -> Result<Array> {
        check_cache_len(cache.len(), 2 * self.layers.len())?;
        let mut h = self.embed_tokens.forward(tokens)?;
        tap.record("embeddings", &h);
        for (i, (layer, cache)) in self.layers.iter().zip(cache.chunks_mut(2)).enumerate() {
            tap.scope(|| format!("layers.{i}."));
            h = layer.forward(&h, cache, tap)?;
            tap.scope(String::new);
            tap.record(&format!("layers.{i}"), &h);
        }
        let h = self.final_layernorm.forward(&h)?;
        tap.record("norm", &h);
        let logits = match &self.lm_head {
            Some(head) => head.forward(&h)?,
            None => self.embed_tokens.as_linear(&h)?,
        };
        let logits = scale(&logits, self.logits_scale)?;
        tap.record("logits", &logits);
        Ok(logits)
    }

    fn new_cache(&self) -> Vec<LayerCache> {
        self.layers
            .iter()
            .flat_map(|_| {
                [
                    LayerCache::Recurrent(RecurrentCache::new()),
                    LayerCache::Kv(KvCache::new()),
                ]
            })
            .collect()
    }

    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn rope(&self) -> Option<&Rope> {
        Some(&self.rope)
    }
}
