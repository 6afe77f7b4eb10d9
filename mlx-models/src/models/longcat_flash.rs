//! LongCat-Flash (`longcat_flash`): each layer is two latent-attention sublayers, each
//! followed by a dense MLP, plus a "shortcut" mixture of experts that reads the first
//! MLP's input and is added at the end of the layer; some experts compute nothing.
//!
//! No [`DecoderSettings`](crate::transformer::DecoderSettings) describe this layout, so the
//! family is written here on the public blocks ([`LatentAttention`], [`Mlp`],
//! [`SparseMoe`], [`Norm`]):
//!
//! ```text
//! h  = x  + attn₀(norm_in₀(x))
//! m  = norm_post₀(h)
//! h  = h  + mlp₀(m);            shortcut = moe(m)
//! h  = h  + attn₁(norm_in₁(h))
//! out = h + mlp₁(norm_post₁(h)) + shortcut
//! ```
//!
//! - Latent attention as DeepSeek-V3's, always with query LoRA and RoPE on adjacent pairs;
//!   queries scaled by `(hidden / q_lora_rank)^0.5` and the normalized latent by
//!   `(hidden / kv_lora_rank)^0.5`.
//! - Router (`router.classifier`): softmax over the `n_routed_experts` experts and the
//!   `zero_expert_num` identity experts, the top `moe_topk` by probability plus
//!   `e_score_correction_bias`, weighted by probability times `routed_scaling_factor`.
//! - Each layer has two caches (one per attention sublayer).

use crate::cache::LayerCache;
use crate::config::ConfigFile;
use crate::error::{Error, Result};
use crate::family::{sanitize_experts, MlaConfig};
use crate::mla::{LatentAttention, MlaCache, MlaSettings};
use crate::mlp::{Activation, Mlp, MlpLayout, MlpSettings};
use crate::model::{LanguageModel, ModelInfo};
use crate::moe::{ExpertActivation, MoeSettings, RouterSettings, SparseMoe};
use crate::nn::{Embedding, Linear};
use crate::norm::{Norm, NormKind};
use crate::rope::{Rope, RopeConfig, RopeFields};
use crate::tap::Tap;
use crate::transformer::check_cache_len;
use crate::weights::{WeightPath, Weights};
use mlx_rs::Array;
use serde::Deserialize;

/// config.json fields, with the names of `LongcatFlashConfig`.
#[derive(Debug, Clone, Deserialize)]
pub struct Config {
    pub vocab_size: i32,
    pub hidden_size: i32,
    /// Layers, each with two attention sublayers.
    pub num_layers: usize,
    pub num_attention_heads: i32,
    /// The dense MLPs' width.
    pub ffn_hidden_size: i32,
    /// Each expert's width.
    pub expert_ffn_hidden_size: i32,
    pub n_routed_experts: i32,
    #[serde(default)]
    pub zero_expert_num: Option<i32>,
    #[serde(alias = "num_experts_per_tok")]
    pub moe_topk: i32,
    pub routed_scaling_factor: f64,
    #[serde(default)]
    pub router_bias: bool,
    pub hidden_act: String,
    pub rms_norm_eps: f64,
    pub max_position_embeddings: usize,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(flatten)]
    pub mla: MlaConfig,
    #[serde(flatten)]
    pub rope: RopeFields,
}

const DEFAULTS: &str = r#"{"vocab_size":131072,"hidden_size":6144,"num_layers":28,"num_attention_heads":64,"ffn_hidden_size":12288,"expert_ffn_hidden_size":2048,"n_routed_experts":512,"zero_expert_num":256,"moe_topk":12,"routed_scaling_factor":6.0,"hidden_act":"silu","rms_norm_eps":1e-5,"max_position_embeddings":131072,"tie_word_embeddings":false,"attention_bias":false,"kv_lora_rank":512,"q_lora_rank":1536,"qk_nope_head_dim":128,"qk_rope_head_dim":64,"v_head_dim":128}"#;

struct Layer {
    input_layernorm: [Norm; 2],
    self_attn: [LatentAttention; 2],
    post_attention_layernorm: [Norm; 2],
    mlps: [Mlp; 2],
    moe: SparseMoe,
}

impl Layer {
    fn forward(&self, x: &Array, cache: &mut [LayerCache], tap: &mut Tap) -> Result<Array> {
        let [cache0, cache1] = cache else {
            return Err(Error::Mlx(mlx_rs::error::Exception::custom(
                "a LongCat-Flash layer needs two caches",
            )));
        };
        let attn = self.self_attn[0].forward(&self.input_layernorm[0].forward(x)?, cache0, tap)?;
        let h = x.add(&attn)?;
        let m = self.post_attention_layernorm[0].forward(&h)?;
        let shortcut = self.moe.forward(&m, tap)?;
        let h = h.add(self.mlps[0].forward(&m, &mut Tap::off())?)?;
        let attn = self.self_attn[1].forward(&self.input_layernorm[1].forward(&h)?, cache1, tap)?;
        let h = h.add(&attn)?;
        let out = self.mlps[1].forward(
            &self.post_attention_layernorm[1].forward(&h)?,
            &mut Tap::off(),
        )?;
        Ok(h.add(&out)?.add(&shortcut)?)
    }
}

/// A loaded LongCat-Flash model.
pub struct LongcatFlash {
    embed_tokens: Embedding,
    layers: Vec<Layer>,
    norm: Norm,
    lm_head: Option<Linear>,
    rope: Rope,
    mla: MlaSettings,
    info: ModelInfo,
}

/// The registry's entry point.
pub fn load(config: &ConfigFile, mut weights: Weights) -> Result<Box<dyn LanguageModel>> {
    if let Some(g) = weights.root().tensor_parallel() {
        return Err(crate::error::Error::TensorParallel {
            ranks: g.size(),
            what: config.path.display().to_string(),
            message: "LongCat-Flash models have no tensor-parallel form yet".into(),
        });
    }
    let c: Config = config.parse_with_defaults(DEFAULTS)?;
    let h = c.hidden_size;
    let field_positive = |field: &str, v: i32| {
        config.ensure(v > 0, field, || format!("must be positive, found {v}"))
    };
    field_positive("hidden_size", h)?;
    field_positive("vocab_size", c.vocab_size)?;
    field_positive("n_routed_experts", c.n_routed_experts)?;
    let q_lora_rank = config.require("q_lora_rank", c.mla.q_lora_rank)?;
    let rope = Rope::new(RopeConfig {
        traditional: true,
        ..RopeConfig::from_fields(
            &c.rope,
            c.mla.qk_rope_head_dim,
            c.max_position_embeddings,
            10_000_000.0,
            &config.path,
        )?
    })?;
    let qk = f64::from(c.mla.qk_nope_head_dim + c.mla.qk_rope_head_dim);
    let mla = MlaSettings {
        num_heads: c.num_attention_heads,
        q_lora_rank: Some(q_lora_rank),
        kv_lora_rank: c.mla.kv_lora_rank,
        qk_nope_head_dim: c.mla.qk_nope_head_dim,
        qk_rope_head_dim: c.mla.qk_rope_head_dim,
        v_head_dim: c
            .mla
            .v_head_dim
            .unwrap_or(c.hidden_size / c.num_attention_heads.max(1)),
        scale: qk.powf(-0.5) as f32,
        bias: c.attention_bias,
        lora_norm_eps: 1e-6,
        query_scale: Some((f64::from(h) / f64::from(q_lora_rank)).sqrt() as f32),
        latent_scale: Some((f64::from(h) / f64::from(c.mla.kv_lora_rank)).sqrt() as f32),
        cache: MlaCache::Latent,
    };
    let act = Activation::from_config(config, "hidden_act", &c.hidden_act)?;
    let zero = c.zero_expert_num.unwrap_or(0);
    let moe = MoeSettings {
        router: RouterSettings {
            correction_bias: true,
            scaling_factor: Some(c.routed_scaling_factor as f32),
            bias: c.router_bias,
            ..RouterSettings::new(c.n_routed_experts + zero, c.moe_topk)
        },
        intermediate_size: c.expert_ffn_hidden_size,
        activation: ExpertActivation::Glu(act),
        expert_bias: false,
        zero_experts: zero,
        shared_expert: None,
        latent_size: None,
    };
    crate::transformer::check_moe(config, &moe)?;
    let mlp = MlpSettings {
        intermediate_size: c.ffn_hidden_size,
        layout: MlpLayout::Gated,
        activation: act,
        bias: false,
    };
    sanitize(&mut weights, &c)?;
    weights.eval()?;

    let w = weights.path("model");
    let norm =
        |p: &WeightPath, name: &str| Norm::load(&p.pp(name), NormKind::Rms, h, c.rms_norm_eps);
    let layers = (0..c.num_layers)
        .map(|i| {
            let l = w.pp(&format!("layers.{i}"));
            let pair = |name: &str, j: usize| l.pp(&format!("{name}.{j}"));
            Ok(Layer {
                input_layernorm: [
                    norm(&l, "input_layernorm.0")?,
                    norm(&l, "input_layernorm.1")?,
                ],
                self_attn: [
                    LatentAttention::load(&pair("self_attn", 0), h, &mla, rope.clone())?,
                    LatentAttention::load(&pair("self_attn", 1), h, &mla, rope.clone())?,
                ],
                post_attention_layernorm: [
                    norm(&l, "post_attention_layernorm.0")?,
                    norm(&l, "post_attention_layernorm.1")?,
                ],
                mlps: [
                    Mlp::load(&pair("mlps", 0), &mlp, h)?,
                    Mlp::load(&pair("mlps", 1), &mlp, h)?,
                ],
                moe: SparseMoe::load(&l.pp("mlp"), h, &moe)?,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let embed_tokens = Embedding::load(&w.pp("embed_tokens"), c.vocab_size, h)?;
    let final_norm = norm(&w, "norm")?;
    let lm_head = (!c.tie_word_embeddings)
        .then(|| Linear::load(&weights.path("lm_head"), h, c.vocab_size, false))
        .transpose()?;
    let inactive: usize = layers.iter().map(|l| l.moe.inactive_parameters(h)).sum();
    let info = ModelInfo {
        model_type: "longcat_flash".to_owned(),
        vocab_size: c.vocab_size,
        hidden_size: h,
        num_layers: c.num_layers,
        max_position_embeddings: c.max_position_embeddings,
        dtype: final_norm.dtype().unwrap_or(mlx_rs::Dtype::Float32),
        quantization: layers.first().and_then(|l| l.self_attn[0].quantization()),
        num_parameters: weights.num_parameters(),
        num_active_parameters: weights.num_parameters().saturating_sub(inactive),
    };
    weights.check_all_used()?;
    Ok(Box::new(LongcatFlash {
        embed_tokens,
        layers,
        norm: final_norm,
        lm_head,
        rope,
        mla,
        info,
    }))
}

/// Brings the checkpoint to the names the blocks load: the router as `gate`, experts
/// stacked, and the dead projections Transformers 5.23 writes for the identity experts
/// dropped.
fn sanitize(weights: &mut Weights, c: &Config) -> Result<()> {
    let routed = c.n_routed_experts;
    weights.rename(|name| {
        let dead = name.split(".mlp.experts.").nth(1).is_some_and(|rest| {
            rest.split('.')
                .next()
                .and_then(|i| i.parse::<i32>().ok())
                .is_some_and(|i| i >= routed)
        });
        (!dead).then(|| {
            name.replacen(".mlp.router.classifier.", ".mlp.gate.", 1)
                .replacen(
                    ".mlp.router.e_score_correction_bias",
                    ".mlp.gate.e_score_correction_bias",
                    1,
                )
        })
    });
    // Transformers 5's fused tensors hold rows for the identity experts too.
    let fused: Vec<String> = weights
        .names()
        .filter(|n| n.ends_with(".mlp.experts.gate_up_proj"))
        .map(str::to_owned)
        .collect();
    for name in fused {
        let t = weights.remove(&name).expect("listed above");
        let kept = t.take_axis(&mlx_rs::ops::arange::<_, i32>(0, routed, None)?, 0)?;
        weights.insert(name, kept);
    }
    sanitize_experts(
        weights,
        c.tie_word_embeddings,
        routed,
        None,
        &crate::models::qwen3_moe::QWEN_EXPERTS,
    )
}

impl LanguageModel for LongcatFlash {
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
        let h = self.norm.forward(&h)?;
        tap.record("norm", &h);
        let logits = match &self.lm_head {
            Some(head) => head.forward(&h)?,
            None => self.embed_tokens.as_linear(&h)?,
        };
        tap.record("logits", &logits);
        Ok(logits)
    }

    fn new_cache(&self) -> Vec<LayerCache> {
        (0..2 * self.layers.len())
            .map(|_| self.mla.new_cache())
            .collect()
    }

    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn rope(&self) -> Option<&Rope> {
        Some(&self.rope)
    }
}
