//! Nemotron-H and Nemotron 3 (`nemotron_h`): a stack of pre-norm blocks, each one mixer
//! and a residual, the mixer given per block by `layers_block_type` (the Hub's
//! `hybrid_override_pattern`: `M` Mamba2, `*` attention, `E` mixture of experts, `-` MLP).
//!
//! - Mamba2 blocks ([`crate::ssm`]): the gated RMSNorm in `n_groups` groups; `dt` clamped
//!   below at `time_step_min`, as Transformers' chunked scan does.
//! - Attention blocks: grouped-query attention without RoPE or biases.
//! - MLP blocks and the shared expert: `down_proj(relu²(up_proj(x)))`, no gate.
//! - MoE blocks: DeepSeek-V3's grouped sigmoid routing with correction bias, renormalized
//!   (`norm_topk_prob`) and scaled (`routed_scaling_factor`); ungated relu² experts, inside
//!   `fc1_latent_proj`/`fc2_latent_proj` when `moe_latent_size` is set; a shared expert on
//!   the block input.
//! - The output layer is never tied to the embeddings (Transformers ties none).
//!
//! In the shared decoder a Mamba2 or attention block is a layer with no feed-forward, an
//! MLP or MoE block a layer with no mixer; `sanitize` gives each block's one norm the name
//! its position reads.

use crate::config::ConfigFile;
use crate::error::{Error, Result};
use crate::family::DecoderFamily;
use crate::model::LanguageModel;
use crate::moe::{ExpertActivation, ExpertGroups, GroupScore, MoeSettings, RouterSettings};
use crate::moe::{Scoring, SharedExpertSettings, SharedJoin};
use crate::ssm::{Mamba2Gate, Mamba2Settings};
use crate::transformer::{
    Activation, AttentionSettings, DecoderSettings, FeedForwardKind, LayerSettings, MixerKind,
    MlpLayout, MlpSettings,
};
use crate::weights::{layer_index, Weights};
use serde::Deserialize;

/// config.json fields, with the names of `NemotronHConfig` (its legacy `mamba_*` names are
/// read too).
#[derive(Debug, Clone, Deserialize)]
pub struct Config {
    pub vocab_size: i32,
    pub hidden_size: i32,
    /// One of `linear_attention` (or `mamba`), `full_attention` (or `attention`), `moe`,
    /// `mlp` per block.
    #[serde(default)]
    pub layers_block_type: Option<Vec<String>>,
    /// The same as one character per block: `M`, `*`, `E`, `-`.
    #[serde(default)]
    pub hybrid_override_pattern: Option<String>,
    pub num_attention_heads: i32,
    #[serde(default)]
    pub num_key_value_heads: Option<i32>,
    #[serde(default)]
    pub head_dim: Option<i32>,
    pub max_position_embeddings: usize,
    pub intermediate_size: i32,
    pub mlp_hidden_act: String,
    pub mlp_bias: bool,
    pub layer_norm_epsilon: f64,
    pub ssm_state_size: i32,
    pub mamba_num_heads: i32,
    pub mamba_head_dim: i32,
    pub mamba_hidden_act: String,
    pub n_groups: i32,
    pub conv_kernel: i32,
    pub use_conv_bias: bool,
    /// Bias on the Mamba2 projections (Transformers reads this, not `mamba_proj_bias`).
    pub use_bias: bool,
    pub chunk_size: i32,
    pub time_step_min: f64,
    pub n_routed_experts: i32,
    pub num_experts_per_tok: i32,
    pub moe_intermediate_size: i32,
    pub moe_shared_expert_intermediate_size: i32,
    #[serde(default)]
    pub moe_latent_size: Option<i32>,
    pub n_group: i32,
    pub topk_group: i32,
    pub norm_topk_prob: bool,
    pub routed_scaling_factor: f64,
}

/// Transformers' defaults for the fields config.json may leave out.
const DEFAULTS: &str = r#"{"vocab_size":131072,"hidden_size":4096,"num_attention_heads":32,"num_key_value_heads":8,"head_dim":128,"max_position_embeddings":4096,"intermediate_size":21504,"mlp_hidden_act":"relu2","mlp_bias":false,"layer_norm_epsilon":1e-5,"ssm_state_size":128,"mamba_num_heads":128,"mamba_head_dim":64,"mamba_hidden_act":"silu","n_groups":8,"conv_kernel":4,"use_conv_bias":true,"use_bias":false,"chunk_size":128,"time_step_min":0.001,"n_routed_experts":8,"num_experts_per_tok":2,"moe_intermediate_size":7688,"moe_shared_expert_intermediate_size":7688,"n_group":1,"topk_group":1,"norm_topk_prob":true,"routed_scaling_factor":1.0}"#;

/// The names older configs give some fields, and Transformers' names for them.
const LEGACY_NAMES: [(&str, &str); 5] = [
    ("mamba_n_groups", "n_groups"),
    ("mamba_d_conv", "conv_kernel"),
    ("mamba_chunk_size", "chunk_size"),
    ("mamba_conv_bias", "use_conv_bias"),
    ("mamba_dt_min", "time_step_min"),
];

/// One block's mixer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Block {
    Mamba,
    Attention,
    Moe,
    Mlp,
}

impl Config {
    /// Each block's kind, from `layers_block_type` or else `hybrid_override_pattern`.
    fn blocks(&self, config: &ConfigFile) -> Result<Vec<Block>> {
        let by_name = |name: &str| match name {
            "linear_attention" | "mamba" => Some(Block::Mamba),
            "full_attention" | "attention" => Some(Block::Attention),
            "moe" => Some(Block::Moe),
            "mlp" => Some(Block::Mlp),
            _ => None,
        };
        let by_char = |c: char| match c {
            'M' => Some(Block::Mamba),
            '*' => Some(Block::Attention),
            'E' => Some(Block::Moe),
            '-' => Some(Block::Mlp),
            _ => None,
        };
        let blocks = match (&self.layers_block_type, &self.hybrid_override_pattern) {
            (Some(types), _) => types
                .iter()
                .map(|t| {
                    by_name(t).ok_or_else(|| {
                        Error::config(
                            &config.path,
                            "layers_block_type",
                            format!("unknown block type `{t}` (linear_attention, full_attention, moe, mlp)"),
                        )
                    })
                })
                .collect::<Result<Vec<_>>>()?,
            (None, Some(pattern)) => pattern
                .chars()
                .map(|c| {
                    by_char(c).ok_or_else(|| {
                        Error::config(
                            &config.path,
                            "hybrid_override_pattern",
                            format!("unknown block `{c}` (M, *, E, -)"),
                        )
                    })
                })
                .collect::<Result<Vec<_>>>()?,
            // Transformers' default pattern.
            (None, None) => vec![Block::Mamba, Block::Moe, Block::Attention, Block::Mlp],
        };
        config.ensure(!blocks.is_empty(), "layers_block_type", || {
            "the model has no blocks".to_owned()
        })?;
        Ok(blocks)
    }
}

impl DecoderFamily for Config {
    const DEFAULTS: &'static str = DEFAULTS;

    fn settings(&self, config: &ConfigFile) -> Result<DecoderSettings> {
        let blocks = self.blocks(config)?;
        for (field, value) in [
            ("hidden_size", self.hidden_size),
            ("vocab_size", self.vocab_size),
            ("mamba_num_heads", self.mamba_num_heads),
            ("mamba_head_dim", self.mamba_head_dim),
            ("ssm_state_size", self.ssm_state_size),
            ("conv_kernel", self.conv_kernel),
        ] {
            config.ensure(value > 0, field, || {
                format!("must be positive, found {value}")
            })?;
        }
        config.ensure(
            self.n_groups > 0 && self.mamba_num_heads % self.n_groups == 0,
            "n_groups",
            || {
                format!(
                    "{} heads cannot be split into {} groups",
                    self.mamba_num_heads, self.n_groups
                )
            },
        )?;
        config.ensure(self.mamba_hidden_act == "silu", "mamba_hidden_act", || {
            format!(
                "the Mamba2 conv activation `{}` is not supported (silu)",
                self.mamba_hidden_act
            )
        })?;
        let act = Activation::from_config(config, "mlp_hidden_act", &self.mlp_hidden_act)?;
        let layers = blocks
            .iter()
            .map(|block| {
                let (mixer, feed_forward) = match block {
                    Block::Mamba => (MixerKind::Mamba2, FeedForwardKind::None),
                    Block::Attention => (MixerKind::Attention, FeedForwardKind::None),
                    Block::Moe => (MixerKind::None, FeedForwardKind::Sparse),
                    Block::Mlp => (MixerKind::None, FeedForwardKind::Dense),
                };
                LayerSettings {
                    mixer,
                    feed_forward,
                    ..LayerSettings::default()
                }
            })
            .collect();
        let heads = self.num_attention_heads;
        let head_dim = self.head_dim.unwrap_or(self.hidden_size / heads.max(1));
        let attention =
            AttentionSettings::new(heads, self.num_key_value_heads.unwrap_or(heads), head_dim);
        let mlp = MlpSettings {
            intermediate_size: self.intermediate_size,
            layout: MlpLayout::UpDown,
            activation: act,
            bias: self.mlp_bias,
        };
        let mamba2 = Mamba2Settings {
            num_heads: self.mamba_num_heads,
            head_dim: self.mamba_head_dim,
            state_size: self.ssm_state_size,
            n_groups: self.n_groups,
            conv_kernel: self.conv_kernel,
            conv_bias: self.use_conv_bias,
            bias: self.use_bias,
            out_bias: self.use_bias,
            chunk_size: self.chunk_size,
            // What Transformers' mixer uses in its chunked scan, whatever `time_step_limit`
            // says; its decoding steps clamp nothing.
            time_step_limit: (self.time_step_min as f32, f32::MAX),
            clamp_steps: false,
            norm_eps: self.layer_norm_epsilon,
            gate: Mamba2Gate::NormAfterGate,
            chunked_prefill: true,
        };
        let settings = DecoderSettings {
            mamba2: Some(mamba2),
            norm_eps: self.layer_norm_epsilon,
            logits_in_f32: true,
            ..DecoderSettings::new(
                "nemotron_h",
                self.vocab_size,
                self.hidden_size,
                self.max_position_embeddings,
                attention,
                mlp,
                layers,
            )
        };
        if !blocks.contains(&Block::Moe) {
            return Ok(settings);
        }
        let moe = MoeSettings {
            router: RouterSettings {
                scoring: Scoring::Sigmoid,
                normalize: self.norm_topk_prob,
                correction_bias: true,
                groups: Some(ExpertGroups {
                    groups: self.n_group,
                    top_groups: self.topk_group,
                    score: GroupScore::TopTwoSum,
                }),
                scaling_factor: Some(self.routed_scaling_factor as f32),
                ..RouterSettings::new(self.n_routed_experts, self.num_experts_per_tok)
            },
            intermediate_size: self.moe_intermediate_size,
            activation: ExpertActivation::Plain(act),
            expert_bias: false,
            zero_experts: 0,
            shared_expert: Some(SharedExpertSettings {
                intermediate_size: self.moe_shared_expert_intermediate_size,
                gated: false,
                bias: false,
                join: SharedJoin::Sum,
            }),
            latent_size: self.moe_latent_size,
        };
        Ok(DecoderSettings {
            moe: Some(moe),
            ..settings
        })
    }

    fn sanitize(&self, weights: &mut Weights, settings: &DecoderSettings) -> Result<()> {
        let layers = &settings.layers;
        // Multi-token-prediction layers are for speculative decoding, not for this model.
        weights.rename(|name| (!name.starts_with("mtp.")).then(|| name.to_owned()));
        weights.rename(|name| {
            let name = name
                .replacen("backbone.embeddings.", "model.embed_tokens.", 1)
                .replacen("backbone.norm_f.", "model.norm.", 1)
                .replacen("backbone.layers.", "model.layers.", 1);
            let Some(i) = layer_index(&name) else {
                return Some(name);
            };
            let Some(layer) = layers.get(i) else {
                return Some(name);
            };
            let prefix = format!("model.layers.{i}.");
            let rest = &name[prefix.len()..];
            let rest = if let Some(norm) = rest.strip_prefix("norm.") {
                match layer.mixer {
                    MixerKind::None => format!("post_attention_layernorm.{norm}"),
                    _ => format!("input_layernorm.{norm}"),
                }
            } else if let Some(mixer) = rest.strip_prefix("mixer.") {
                match layer.mixer {
                    MixerKind::Attention => format!("self_attn.{mixer}"),
                    MixerKind::None => format!("mlp.{mixer}"),
                    _ => rest.to_owned(),
                }
            } else {
                rest.to_owned()
            };
            Some(
                format!("{prefix}{rest}")
                    .replacen(".shared_experts.", ".shared_expert.", 1)
                    // mlx-lm's stacked experts.
                    .replacen(".switch_mlp.fc1.", ".switch_mlp.up_proj.", 1)
                    .replacen(".switch_mlp.fc2.", ".switch_mlp.down_proj.", 1),
            )
        });
        // Transformers 5 saves the experts stacked, `experts.up_proj` `[E, I, in]`
        // (`experts.down_proj` is split_fused_experts's).
        weights.rename(|name| match name.strip_suffix(".mlp.experts.up_proj") {
            Some(prefix) => Some(format!("{prefix}.mlp.switch_mlp.up_proj.weight")),
            None => Some(name.to_owned()),
        });
        let experts = settings.moe.as_ref().map_or(0, |m| m.computing_experts());
        crate::family::sanitize_experts(weights, false, experts, None, &NEMOTRON_EXPERTS)
    }
}

/// The per-expert projections of Hub checkpoints.
const NEMOTRON_EXPERTS: [(&str, &str); 2] = [("up_proj", "up_proj"), ("down_proj", "down_proj")];

/// The registry's entry point: older configs' field names read as Transformers reads them.
pub fn load(config: &ConfigFile, weights: Weights) -> Result<Box<dyn LanguageModel>> {
    let mut config = config.clone();
    if let Some(fields) = config.value.as_object_mut() {
        for (legacy, name) in LEGACY_NAMES {
            if let Some(value) = fields.remove(legacy) {
                fields.entry(name).or_insert(value);
            }
        }
    }
    crate::family::load::<Config>(&config, weights)
}
