//! What a decoder family module declares: its config.json fields (the shared ones below,
//! plus its own), Transformers' defaults for them, and how they map onto
//! [`DecoderSettings`]. Loading is the same for every family: [`load`].

use crate::config::ConfigFile;
use crate::error::{Error, Result};
use crate::mla::{MlaCache, MlaSettings};
use crate::model::LanguageModel;
use crate::moe::{
    split_fused_experts, split_fused_shared_expert, stack_experts, ExpertActivation, ExpertGroups,
    GroupScore, MoeSettings, RouterSettings, Scoring, SharedExpertSettings, SharedJoin,
};
use crate::rope::{Rope, RopeConfig, RopeFields};
use crate::ssm::{Mamba2Gate, Mamba2Settings};
use crate::transformer::{
    build, drop_computed_weights, layers_by_type, rope_layers, Activation, AttentionSettings,
    DecoderSettings, LayerSettings, LayerType, MixerKind, MlpLayout, MlpSettings,
};
use crate::weights::Weights;
use serde::de::DeserializeOwned;
use serde::Deserialize;

/// A decoder family: its `Config` parses config.json and describes the model.
pub trait DecoderFamily: DeserializeOwned {
    /// Transformers' defaults, as a JSON object, for the fields a config.json may leave out.
    const DEFAULTS: &'static str;

    /// The family's own names of common fields, `(common, own)` (Transformers'
    /// `attribute_map`, e.g. GPT-2's `("hidden_size", "n_embd")`): config.json is read
    /// through [`ConfigFile::with_aliases`] before it is parsed.
    const ALIASES: &'static [(&'static str, &'static str)] = &[];

    /// The MLP width as a multiple of `hidden_size` where config.json gives none (GPT-2's
    /// `n_inner: null` is 4 × `n_embd`).
    const INTERMEDIATE_PER_HIDDEN: Option<i32> = None;

    /// The config field that gives the MLP width as a multiple of `hidden_size`
    /// (GPT-NeoX-Japanese's `intermediate_multiple_size`), read through
    /// [`ConfigFile::width_multiple`]; `INTERMEDIATE_PER_HIDDEN` is its default.
    const INTERMEDIATE_MULTIPLE: Option<&'static str> = None;
    /// Common integer fields config.json may give only as a multiple under the family's
    /// own name, `(common, own, divisor)`: read as `own / divisor` (rounded down, as
    /// Transformers' `//`) where config.json has no `common`, through
    /// [`ConfigFile::with_divided_aliases`] (the ModernBERT decoder's Hub configs give
    /// `local_attention`, twice the `sliding_window` its layers see).
    const DIVIDED_ALIASES: &'static [(&'static str, &'static str, i64)] = &[];

    /// Checkpoint weights the causal LM never uses, by name prefix, dropped before
    /// `sanitize` (Transformers' `_keys_to_ignore_on_load_unexpected`: Mellum's
    /// multi-token-prediction layer `mtp.`). Every other unused weight stays an error.
    const UNUSED_PREFIXES: &'static [&'static str] = &[];

    /// Checkpoint weights the causal LM never uses, by a name part found anywhere in the
    /// name (at its start or after a `.`): Transformers' unanchored ignored keys, which it
    /// searches for in every name (GPT-NeoX's causal-mask buffers `attention.bias`).
    const UNUSED_ANYWHERE: &'static [&'static str] = &[];

    /// The decoder this config describes.
    fn settings(&self, config: &ConfigFile) -> Result<DecoderSettings>;

    /// Brings checkpoint weight names to the module's: by default, drops what the model
    /// computes itself (`rotary_emb.inv_freq`) and the output layer of tied checkpoints that
    /// store it anyway; every other weight keeps its Transformers name.
    fn sanitize(&self, weights: &mut Weights, settings: &DecoderSettings) -> Result<()> {
        drop_computed_weights(weights, settings.tie_word_embeddings);
        Ok(())
    }
}

/// The registry's entry point for family `F`.
pub fn load<F: DecoderFamily>(
    config: &ConfigFile,
    mut weights: Weights,
) -> Result<Box<dyn LanguageModel>> {
    let per_hidden = config.width_multiple(F::INTERMEDIATE_MULTIPLE, F::INTERMEDIATE_PER_HIDDEN)?;
    let config = &config
        .with_aliases(F::ALIASES, per_hidden)
        .with_divided_aliases(F::DIVIDED_ALIASES)?;
    let family: F = config.parse_with_defaults(F::DEFAULTS)?;
    let settings = family.settings(config)?;
    if !F::UNUSED_PREFIXES.is_empty() || !F::UNUSED_ANYWHERE.is_empty() {
        weights.rename(|name| {
            (!is_unused(name, F::UNUSED_PREFIXES, F::UNUSED_ANYWHERE)).then(|| name.to_owned())
        });
    }
    crate::norm::unfold_mlx_lm_norms(&settings.model_type, &mut weights)?;
    unpack_hub_quantization(config, &mut weights)?;
    family.sanitize(&mut weights, &settings)?;
    // What sanitizing derived (stacked experts, split fused projections) is computed here,
    // on the loading thread: the model may run on another.
    weights.eval()?;
    build(config, settings, weights)
}

/// Brings a checkpoint of family `F` to the layout its loader reads (its `sanitize`:
/// renamed, `Conv1D` projections transposed), as mlx-lm sanitizes before quantizing: the
/// converter's step for families whose checkpoints it could not quantize as they are
/// ([`crate::models::CHECKPOINT_LAYOUTS`]).
pub fn to_loaded_layout<F: DecoderFamily>(
    config: &ConfigFile,
    weights: &mut Weights,
) -> Result<()> {
    let per_hidden = config.width_multiple(F::INTERMEDIATE_MULTIPLE, F::INTERMEDIATE_PER_HIDDEN)?;
    let config = &config
        .with_aliases(F::ALIASES, per_hidden)
        .with_divided_aliases(F::DIVIDED_ALIASES)?;
    let family: F = config.parse_with_defaults(F::DEFAULTS)?;
    let settings = family.settings(config)?;
    crate::norm::unfold_mlx_lm_norms(&settings.model_type, weights)?;
    unpack_hub_quantization(config, weights)?;
    family.sanitize(weights, &settings)
}

/// Whether the checkpoint weight `name` is one the causal LM never uses: it starts with one
/// of `prefixes`, or holds one of `anywhere` at its start or after a `.`
/// ([`DecoderFamily::UNUSED_PREFIXES`], [`DecoderFamily::UNUSED_ANYWHERE`]).
pub fn is_unused<S: AsRef<str>>(name: &str, prefixes: &[S], anywhere: &[S]) -> bool {
    prefixes.iter().any(|p| name.starts_with(p.as_ref()))
        || anywhere.iter().any(|part| {
            let part = part.as_ref();
            name.starts_with(part) || name.contains(&format!(".{part}"))
        })
}

/// Checkpoint formats of the Hub that are no family's own: BitNet's ternary weights packed
/// four to a byte (`quantization_config.quant_method` `"bitnet"`, or a uint8 `.weight` with
/// its `.weight_scale`, as such a checkpoint keeps them after our converter quantized the
/// rest), unpacked to float ([`crate::ternary::unpack_ternary`]) whichever family's loader
/// reads them.
pub fn unpack_hub_quantization(config: &ConfigFile, weights: &mut Weights) -> Result<()> {
    let method = config
        .value
        .pointer("/quantization_config/quant_method")
        .and_then(serde_json::Value::as_str);
    let packed = weights.names().any(|name| {
        name.strip_suffix(".weight_scale").is_some_and(|layer| {
            weights.root().dtype_of(&format!("{layer}.weight")).ok() == Some(mlx_rs::Dtype::Uint8)
        })
    });
    if method == Some("bitnet") || packed {
        crate::ternary::unpack_ternary(weights)?;
    }
    Ok(())
}

/// The registry's entry for multimodal checkpoints whose language model is family `F`: the
/// settings in `text_config` (read as `model_type`), tying from the top level when the
/// text config does not say; the family's `sanitize` drops the other towers' weights.
pub fn load_text_config<F: DecoderFamily>(
    config: &ConfigFile,
    weights: Weights,
    model_type: &str,
) -> Result<Box<dyn LanguageModel>> {
    let text = config
        .value
        .get("text_config")
        .filter(|t| t.is_object())
        .ok_or_else(|| crate::error::Error::config(&config.path, "text_config", "missing"))?;
    let mut value = text.clone();
    value["model_type"] = serde_json::json!(model_type);
    if value.get("tie_word_embeddings").is_none() {
        if let Some(tie) = config.value.get("tie_word_embeddings") {
            value["tie_word_embeddings"] = tie.clone();
        }
    }
    let text_config = ConfigFile {
        path: config.path.clone(),
        value,
    };
    load::<F>(&text_config, weights)
}

/// The config.json fields every decoder family has, with Transformers' names; a family's
/// `Config` flattens this and adds its own.
#[derive(Debug, Clone, Deserialize)]
pub struct DecoderConfig {
    pub model_type: String,
    pub vocab_size: i32,
    pub hidden_size: i32,
    pub intermediate_size: i32,
    pub num_hidden_layers: usize,
    pub num_attention_heads: i32,
    /// Key/value heads (grouped-query attention); all heads when absent.
    #[serde(default)]
    pub num_key_value_heads: Option<i32>,
    /// Features per head; `hidden_size / num_attention_heads` when absent.
    #[serde(default)]
    pub head_dim: Option<i32>,
    pub max_position_embeddings: usize,
    /// Logits from the embedding matrix.
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// The MLP activation, for families that name it so.
    #[serde(default)]
    pub hidden_act: Option<String>,
    /// The MLP activation of the Gemma 2 and 3 configs, which win over `hidden_act`.
    #[serde(default)]
    pub hidden_activation: Option<String>,
    /// The RMSNorm epsilon, for families that name it so.
    #[serde(default)]
    pub rms_norm_eps: Option<f64>,
    /// Bias on the q/k/v/o projections.
    #[serde(default)]
    pub attention_bias: Option<bool>,
    /// Bias on the MLP projections.
    #[serde(default)]
    pub mlp_bias: Option<bool>,
    /// `cap * tanh(logits / cap)` on the output.
    #[serde(default)]
    pub final_logit_softcapping: Option<f64>,
    #[serde(flatten)]
    pub windows: SlidingWindowConfig,
    #[serde(flatten)]
    pub no_rope: NoRopeConfig,
    #[serde(flatten)]
    pub rope: RopeFields,
}

impl DecoderConfig {
    pub fn head_dim(&self) -> i32 {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads.max(1))
    }

    pub fn num_kv_heads(&self) -> i32 {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    /// The RoPE `fields` describe for these heads (`default_theta` when they name none);
    /// `traditional` rotates adjacent pairs instead of halves.
    pub fn rope_from(
        &self,
        fields: &RopeFields,
        default_theta: f64,
        traditional: bool,
        config: &ConfigFile,
    ) -> Result<Rope> {
        Rope::new(RopeConfig {
            traditional,
            ..RopeConfig::from_fields(
                fields,
                self.head_dim(),
                self.max_position_embeddings,
                default_theta,
                &config.path,
            )?
        })
    }

    /// The RoPE of this config's RoPE fields.
    pub fn rope(&self, default_theta: f64, traditional: bool, config: &ConfigFile) -> Result<Rope> {
        self.rope_from(&self.rope, default_theta, traditional, config)
    }

    /// The RoPE `fields` describe on the first `rotary_dim.1` features of each head, for
    /// configs that name the rotated width in features (GPT-J's `rotary_dim`);
    /// `rotary_dim.0` is the field's name, for the error a bad width gives. A family whose
    /// RoPE no config field describes (GPT-J's base is in Transformers' code) passes
    /// `RopeFields::default()`, so stray RoPE keys in a config.json are ignored as
    /// Transformers ignores them.
    ///
    /// ```
    /// use mlx_models::config::ConfigFile;
    /// use mlx_models::family::DecoderConfig;
    ///
    /// let value = serde_json::json!({"model_type": "gptj", "vocab_size": 8, "hidden_size": 64,
    ///     "intermediate_size": 128, "num_hidden_layers": 1, "num_attention_heads": 4,
    ///     "max_position_embeddings": 32});
    /// let config = ConfigFile { path: "config.json".into(), value };
    /// let d: DecoderConfig = config.parse()?;
    /// let rope = d.rope_rotating(&d.rope, ("rotary_dim", 8), 10000.0, true, &config)?;
    /// assert_eq!(rope.config().dims, 8);
    /// let error = d.rope_rotating(&d.rope, ("rotary_dim", 7), 10000.0, true, &config).unwrap_err();
    /// assert!(error.to_string().contains("rotary_dim"));
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn rope_rotating(
        &self,
        fields: &RopeFields,
        rotary_dim: (&str, i32),
        default_theta: f64,
        traditional: bool,
        config: &ConfigFile,
    ) -> Result<Rope> {
        Rope::new(RopeConfig {
            traditional,
            ..RopeConfig::from_fields_rotating(
                fields,
                self.head_dim(),
                rotary_dim,
                self.max_position_embeddings,
                default_theta,
                &config.path,
            )?
        })
    }

    /// The RoPE of the layers of `layer_type`, for families with one per layer type
    /// (Gemma 3; `local_base` is the Hub configs' base of the sliding layers).
    pub fn layer_type_rope(
        &self,
        layer_type: &str,
        local_base: Option<f64>,
        default_theta: f64,
        config: &ConfigFile,
    ) -> Result<Rope> {
        let fields = self.rope.for_layer_type(layer_type, local_base);
        self.rope_from(&fields, default_theta, false, config)
    }

    /// Gives each layer the RoPE of its own base, one per layer in `bases` (the config's
    /// `field`, e.g. Granite SWA's `layer_rope_theta`): the config's scaling and rotated part
    /// at that base, and no positional encoding at all (NoPE) where the base is 0.
    /// `traditional` rotates adjacent pairs instead of halves.
    ///
    /// A list of another length than the layers, or a base that is negative or not finite,
    /// is a [`crate::Error::Config`] naming `field`.
    pub fn set_layer_rope_bases(
        &self,
        layers: &mut [LayerSettings],
        field: &str,
        bases: &[f64],
        traditional: bool,
        config: &ConfigFile,
    ) -> Result<()> {
        if bases.len() != layers.len() {
            return Err(crate::Error::config(
                &config.path,
                field,
                format!(
                    "gives {} RoPE bases for {} layers",
                    bases.len(),
                    layers.len()
                ),
            ));
        }
        for (layer, &base) in layers.iter_mut().zip(bases) {
            if !base.is_finite() || base < 0.0 {
                return Err(crate::Error::config(
                    &config.path,
                    field,
                    format!("has the RoPE base {base}: neither 0 (no RoPE) nor a positive base"),
                ));
            }
            layer.rope = if base == 0.0 {
                None
            } else {
                Some(self.rope_from(&self.rope.with_base(base), base, traditional, config)?)
            };
        }
        Ok(())
    }

    /// The settings of each layer: which attention (`layer_types`, else `rule`), the RoPE
    /// of full (`rope`) and sliding (`local_rope`, else `rope`) layers, none on the layers
    /// `no_rope_layers` marks when `no_rope`.
    pub fn layers(
        &self,
        rule: LayerRule,
        rope: Option<&Rope>,
        local_rope: Option<&Rope>,
        no_rope: bool,
    ) -> Vec<LayerSettings> {
        let n = self.num_hidden_layers;
        let uses_rope = if no_rope {
            self.no_rope.uses_rope(n)
        } else {
            vec![true; n]
        };
        let types = self.windows.layer_types(n, rule, &uses_rope);
        let mut layers = layers_by_type(&types, rope, local_rope, self.windows.sliding_window);
        drop_rope(&mut layers, &uses_rope);
        layers
    }

    /// The activation `hidden_activation` or else `hidden_act` names (SiLU when neither).
    pub fn activation(&self, config: &ConfigFile) -> Result<Activation> {
        match (&self.hidden_activation, &self.hidden_act) {
            (Some(name), _) => Activation::from_config(config, "hidden_activation", name),
            (None, name) => {
                Activation::from_config(config, "hidden_act", name.as_deref().unwrap_or("silu"))
            }
        }
    }

    /// Attention with these head counts, `attention_bias` on q/k/v/o, and the other
    /// defaults of [`AttentionSettings::new`].
    pub fn attention(&self) -> AttentionSettings {
        let bias = self.attention_bias.unwrap_or(false);
        AttentionSettings {
            qkv_bias: bias,
            o_bias: bias,
            ..AttentionSettings::new(
                self.num_attention_heads,
                self.num_kv_heads(),
                self.head_dim(),
            )
        }
    }

    /// The MLP of width `intermediate_size`, with `mlp_bias`.
    pub fn mlp(&self, layout: MlpLayout, activation: Activation) -> MlpSettings {
        MlpSettings {
            intermediate_size: self.intermediate_size,
            layout,
            activation,
            bias: self.mlp_bias.unwrap_or(false),
        }
    }

    /// Pre-norm RMSNorm decoder settings with these sizes, `rms_norm_eps`, tying and the
    /// final soft cap; a family sets what else differs on top.
    pub fn settings(
        &self,
        attention: AttentionSettings,
        mlp: MlpSettings,
        layers: Vec<LayerSettings>,
    ) -> DecoderSettings {
        DecoderSettings {
            norm_eps: self.rms_norm_eps.unwrap_or(1e-6),
            tie_word_embeddings: self.tie_word_embeddings,
            final_logit_softcap: self.final_logit_softcapping.map(|c| c as f32),
            ..DecoderSettings::new(
                &self.model_type,
                self.vocab_size,
                self.hidden_size,
                self.max_position_embeddings,
                attention,
                mlp,
                layers,
            )
        }
    }
}

/// The mixture-of-experts fields of a config.json, with the names most families use
/// (Mixtral's `num_local_experts` and GLM's `n_routed_experts` are read as `num_experts`,
/// Hunyuan's `moe_topk` as `num_experts_per_tok`).
#[derive(Debug, Clone, Deserialize)]
pub struct MoeConfig {
    #[serde(alias = "num_local_experts", alias = "n_routed_experts")]
    pub num_experts: i32,
    /// One count for every layer, or (Hunyuan's `moe_topk`) a list with one per layer.
    #[serde(alias = "moe_topk")]
    pub num_experts_per_tok: PerLayer<i32>,
    /// The width of each expert; `intermediate_size` where a family has no separate field.
    #[serde(default)]
    pub moe_intermediate_size: Option<i32>,
    /// Renormalize the chosen experts' weights to sum to one.
    #[serde(default)]
    pub norm_topk_prob: Option<bool>,
    /// Every n-th layer (1-based) is sparse (ERNIE 4.5's `moe_layer_interval`).
    #[serde(default, alias = "moe_layer_interval")]
    pub decoder_sparse_step: Option<i32>,
    /// Layers that keep a dense MLP.
    #[serde(default)]
    pub mlp_only_layers: Option<Vec<usize>>,
    /// The first n layers keep a dense MLP (ERNIE 4.5's `moe_layer_start_index`, LFM2-MoE's
    /// `num_dense_layers`).
    #[serde(default, alias = "moe_layer_start_index", alias = "num_dense_layers")]
    pub first_k_dense_replace: Option<usize>,
    /// The last layer with experts; the ones after keep a dense MLP (-1 or absent: none).
    #[serde(default)]
    pub moe_layer_end_index: Option<i64>,
    /// The width of the shared expert (Qwen2-MoE; Granite-MoE-Shared's
    /// `shared_intermediate_size`, 0 for none).
    #[serde(default, alias = "shared_intermediate_size")]
    pub shared_expert_intermediate_size: Option<i32>,
    /// Shared experts of width `moe_intermediate_size` each, run as one MLP (GLM-4.5,
    /// DeepSeek; EXAONE-MoE's `num_shared_experts`, ERNIE 4.5's `moe_num_shared_experts`).
    #[serde(
        default,
        alias = "num_shared_experts",
        alias = "moe_num_shared_experts"
    )]
    pub n_shared_experts: Option<i32>,
    /// Multiplies the routed experts' weights (AFMoE's `route_scale`, HY-V3's
    /// `router_scaling_factor`).
    #[serde(default, alias = "route_scale", alias = "router_scaling_factor")]
    pub routed_scaling_factor: Option<f64>,
    /// Expert groups for grouped top-k selection.
    #[serde(default)]
    pub n_group: Option<i32>,
    /// The groups eligible per token.
    #[serde(default)]
    pub topk_group: Option<i32>,
    /// `dense` or `sparse` per layer (GLM-4.7-Flash); see [`MoeConfig::sparse_layers`].
    #[serde(default)]
    pub mlp_layer_types: Option<Vec<String>>,
}

impl MoeConfig {
    /// Whether layer `i` routes to experts: not listed in `mlp_only_layers`, past the
    /// first `first_k_dense_replace`, not past `moe_layer_end_index`, and a multiple of
    /// `decoder_sparse_step` (1-based).
    ///
    /// ```
    /// # use mlx_models::family::MoeConfig;
    /// let ernie: MoeConfig = serde_json::from_str(
    ///     r#"{"num_experts": 4, "num_experts_per_tok": 2, "moe_layer_start_index": 1,
    ///         "moe_layer_end_index": 4, "moe_layer_interval": 2}"#,
    /// )?;
    /// let sparse: Vec<usize> = (0..8).filter(|&i| ernie.is_sparse(i)).collect();
    /// assert_eq!(sparse, [1, 3]);
    /// # Ok::<(), serde_json::Error>(())
    /// ```
    pub fn is_sparse(&self, i: usize) -> bool {
        let step = self.decoder_sparse_step.unwrap_or(1).max(1) as usize;
        let last = self
            .moe_layer_end_index
            .and_then(|e| usize::try_from(e).ok())
            .unwrap_or(usize::MAX);
        !self.mlp_only_layers.as_deref().unwrap_or(&[]).contains(&i)
            && i >= self.first_k_dense_replace.unwrap_or(0)
            && i <= last
            && (i + 1).is_multiple_of(step)
    }

    /// Which of the `layers` route to experts, as `mlp_layer_types` names them (each `dense`
    /// or `sparse`, one per layer); without the list, the one Transformers derives: the
    /// first `dense_prefix` layers dense, the others sparse. A list of another length or
    /// with another name is an error naming `mlp_layer_types`.
    ///
    /// ```
    /// # use mlx_models::config::ConfigFile;
    /// # use mlx_models::family::MoeConfig;
    /// let moe: MoeConfig = serde_json::from_str(
    ///     r#"{"num_experts": 4, "num_experts_per_tok": 2, "mlp_layer_types": ["dense", "sparse", "dense"]}"#,
    /// )?;
    /// let config = ConfigFile { path: "config.json".into(), value: serde_json::json!({}) };
    /// assert_eq!(moe.sparse_layers(&config, 3, 1)?, [false, true, false]);
    /// assert!(moe.sparse_layers(&config, 2, 1).is_err());
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn sparse_layers(
        &self,
        config: &ConfigFile,
        layers: usize,
        dense_prefix: usize,
    ) -> Result<Vec<bool>> {
        let Some(types) = &self.mlp_layer_types else {
            return Ok((0..layers).map(|i| i >= dense_prefix).collect());
        };
        config.ensure(types.len() == layers, "mlp_layer_types", || {
            format!("has {} entries for {layers} layers", types.len())
        })?;
        types
            .iter()
            .map(|kind| match kind.as_str() {
                "dense" => Ok(false),
                "sparse" => Ok(true),
                other => Err(crate::error::Error::config(
                    &config.path,
                    "mlp_layer_types",
                    format!("`{other}` is neither `dense` nor `sparse`"),
                )),
            })
            .collect()
    }

    /// Softmax top-k routing over these experts, renormalized when `norm_topk_prob`.
    pub fn router(&self) -> RouterSettings {
        RouterSettings {
            normalize: self.norm_topk_prob.unwrap_or(false),
            ..RouterSettings::new(self.num_experts, self.num_experts_per_tok.first())
        }
    }

    /// DeepSeek-V3's `noaux_tc` routing (also GLM-4.5's): sigmoid scores, chosen with
    /// `e_score_correction_bias` within the `topk_group` best of `n_group` groups (each
    /// scored by its two best), renormalized when `norm_topk_prob`, times
    /// `routed_scaling_factor`.
    pub fn grouped_sigmoid_router(&self, config: &ConfigFile) -> Result<RouterSettings> {
        Ok(RouterSettings {
            scoring: Scoring::Sigmoid,
            correction_bias: true,
            groups: Some(ExpertGroups {
                groups: config.require("n_group", self.n_group)?,
                top_groups: config.require("topk_group", self.topk_group)?,
                score: GroupScore::TopTwoSum,
            }),
            scaling_factor: self.routed_scaling_factor.map(|f| f as f32),
            ..self.router()
        })
    }

    /// A block of these experts (of width `moe_intermediate_size`, else `intermediate`)
    /// with `router`, `activation` and, when the config has one, a shared expert of width
    /// `shared_expert_intermediate_size` or `n_shared_experts` experts' (`gated`: scaled by
    /// `sigmoid(shared_expert_gate(x))`).
    pub fn settings(
        &self,
        router: RouterSettings,
        intermediate: i32,
        activation: ExpertActivation,
        gated: bool,
    ) -> MoeSettings {
        let expert = self.moe_intermediate_size.unwrap_or(intermediate);
        let shared = self
            .shared_expert_intermediate_size
            .or(self.n_shared_experts.map(|n| n * expert));
        MoeSettings {
            router,
            intermediate_size: expert,
            activation,
            expert_bias: false,
            zero_experts: 0,
            latent_size: None,
            shared_expert: shared.filter(|&size| size > 0).map(|intermediate_size| {
                SharedExpertSettings {
                    intermediate_size,
                    gated,
                    bias: false,
                    join: SharedJoin::Sum,
                }
            }),
        }
    }
}

/// The multi-head latent attention fields of a config.json (DeepSeek-V2/V3 names).
#[derive(Debug, Clone, Deserialize)]
pub struct MlaConfig {
    pub kv_lora_rank: i32,
    /// `null`: a plain `q_proj` (DeepSeek-V2-Lite).
    #[serde(default)]
    pub q_lora_rank: Option<i32>,
    pub qk_nope_head_dim: i32,
    pub qk_rope_head_dim: i32,
    /// `null` or absent: `hidden_size / num_attention_heads` (MiniCPM3's configs).
    #[serde(default)]
    pub v_head_dim: Option<i32>,
    /// RoPE on adjacent pairs of the rope part (DeepSeek-V3's default).
    #[serde(default)]
    pub rope_interleave: Option<bool>,
}

impl MlaConfig {
    /// The latent attention these fields describe, for `d`'s heads and RoPE fields: scores
    /// scaled by `(nope + rope)^-0.5`, times `mscale²` when a scaled RoPE names
    /// `mscale_all_dim` (YaRN as DeepSeek ships it).
    pub fn settings(&self, d: &DecoderConfig, config: &ConfigFile) -> Result<MlaSettings> {
        let v_head_dim = self.v_head_dim(d);
        for (field, value) in [
            ("kv_lora_rank", self.kv_lora_rank),
            ("qk_nope_head_dim", self.qk_nope_head_dim),
            ("qk_rope_head_dim", self.qk_rope_head_dim),
            ("v_head_dim", v_head_dim),
            ("num_attention_heads", d.num_attention_heads),
        ] {
            config.ensure(value > 0, field, || {
                format!("must be positive, found {value}")
            })?;
        }
        config.ensure(self.qk_rope_head_dim % 2 == 0, "qk_rope_head_dim", || {
            format!(
                "must be even (RoPE rotates pairs), found {}",
                self.qk_rope_head_dim
            )
        })?;
        if let Some(rank) = self.q_lora_rank {
            config.ensure(rank > 0, "q_lora_rank", || {
                format!("must be positive, found {rank}")
            })?;
        }
        let qk = f64::from(self.qk_nope_head_dim + self.qk_rope_head_dim);
        let mscale = mscale_all_dim_factor(&d.rope);
        Ok(MlaSettings {
            num_heads: d.num_attention_heads,
            q_lora_rank: self.q_lora_rank,
            kv_lora_rank: self.kv_lora_rank,
            qk_nope_head_dim: self.qk_nope_head_dim,
            qk_rope_head_dim: self.qk_rope_head_dim,
            v_head_dim,
            scale: (qk.powf(-0.5) * mscale * mscale) as f32,
            bias: d.attention_bias.unwrap_or(false),
            lora_norm_eps: 1e-6,
            query_scale: None,
            latent_scale: None,
            cache: MlaCache::Latent,
        })
    }

    /// The width of each head's value: `v_head_dim`, else `hidden_size / num_attention_heads`
    /// as Transformers derives it.
    pub fn v_head_dim(&self, d: &DecoderConfig) -> i32 {
        self.v_head_dim
            .unwrap_or_else(|| d.hidden_size / d.num_attention_heads.max(1))
    }

    /// The RoPE of the rope part of each head (`qk_rope_head_dim` features; adjacent pairs
    /// when `rope_interleave`, else `interleave_default`).
    pub fn rope(
        &self,
        d: &DecoderConfig,
        default_theta: f64,
        interleave_default: bool,
        config: &ConfigFile,
    ) -> Result<Rope> {
        let rope_heads = DecoderConfig {
            head_dim: Some(self.qk_rope_head_dim),
            ..d.clone()
        };
        let pairs = self.rope_interleave.unwrap_or(interleave_default);
        rope_heads.rope(default_theta, pairs, config)
    }
}

/// YaRN's `0.1 · mscale_all_dim · ln(factor) + 1` of a scaled RoPE naming `mscale_all_dim`
/// (1 otherwise): DeepSeek multiplies its attention scale by its square.
fn mscale_all_dim_factor(fields: &RopeFields) -> f64 {
    let params = fields
        .rope_parameters
        .as_ref()
        .or(fields.rope_scaling.as_ref());
    let Some(p) = params else { return 1.0 };
    let kind = p
        .get("rope_type")
        .or_else(|| p.get("type"))
        .and_then(serde_json::Value::as_str)
        .unwrap_or("default");
    let all_dim = p
        .get("mscale_all_dim")
        .and_then(serde_json::Value::as_f64)
        .unwrap_or(0.0);
    let factor = p
        .get("factor")
        .and_then(serde_json::Value::as_f64)
        .unwrap_or(1.0);
    if kind == "default" || all_dim == 0.0 || factor <= 1.0 {
        return 1.0;
    }
    0.1 * all_dim * factor.ln() + 1.0
}

/// A config value given once for every layer or as a list with one per layer.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum PerLayer<T> {
    All(T),
    Each(Vec<T>),
}

impl<T: Copy + PartialEq + Default> PerLayer<T> {
    /// The value of the first layer.
    pub fn first(&self) -> T {
        match self {
            PerLayer::All(v) => *v,
            PerLayer::Each(v) => v.first().copied().unwrap_or_default(),
        }
    }
}

/// Per-expert projections named as the blocks load them (`gate_proj`, `up_proj`,
/// `down_proj`): the `projections` of [`sanitize_moe`] for most families.
pub const EXPERT_PROJECTIONS: &[(&str, &str)] = &[
    ("gate_proj", "gate_proj"),
    ("up_proj", "up_proj"),
    ("down_proj", "down_proj"),
];

/// Brings a mixture-of-experts checkpoint to the names [`crate::moe::SparseMoe`] loads,
/// after [`drop_computed_weights`]: `block` (e.g. `block_sparse_moe`) is renamed to `mlp`,
/// per-expert tensors (`experts.<i>.<proj>`, with `projections` mapping the checkpoint's
/// projection names to `gate_proj`/`up_proj`/`down_proj`) are stacked, and Transformers 5's
/// fused `experts.gate_up_proj`/`down_proj` are split, as is a fused shared expert
/// (`shared_expert.gate_up_proj`). Checkpoints already stacked (mlx-community's `switch_mlp`)
/// pass unchanged; stacked under `experts` (`experts.gate_proj.weight`, mlx-lm's AFMoE),
/// they are renamed to `switch_mlp`.
pub fn sanitize_moe(
    weights: &mut Weights,
    settings: &DecoderSettings,
    block: Option<&str>,
    projections: &[(&str, &str)],
) -> Result<()> {
    let experts = settings
        .moe
        .as_ref()
        .map_or(0, |moe| moe.computing_experts());
    sanitize_experts(
        weights,
        settings.tie_word_embeddings,
        experts,
        block,
        projections,
    )
}

/// The module's name for a weight of checkpoints that store experts stacked per projection
/// (gpt-oss, Llama 4): `mlp.router` is the router (`mlp.gate`), `mlp.experts.<proj>` the
/// stacked experts (`mlp.switch_mlp.<proj>`).
pub fn stacked_experts_name(name: &str) -> String {
    name.replacen(".mlp.router.", ".mlp.gate.", 1)
        .replacen(".mlp.experts.gate_proj.", ".mlp.switch_mlp.gate_proj.", 1)
        .replacen(".mlp.experts.up_proj.", ".mlp.switch_mlp.up_proj.", 1)
        .replacen(".mlp.experts.down_proj.", ".mlp.switch_mlp.down_proj.", 1)
}

/// [`sanitize_moe`] for a model of `experts` experts (with weights) that
/// `tie_word_embeddings` or not, for families not built from [`DecoderSettings`].
pub fn sanitize_experts(
    weights: &mut Weights,
    tie_word_embeddings: bool,
    experts: i32,
    block: Option<&str>,
    projections: &[(&str, &str)],
) -> Result<()> {
    drop_computed_weights(weights, tie_word_embeddings);
    if let Some(block) = block {
        let from = format!(".{block}.");
        weights.rename(|name| Some(name.replacen(&from, ".mlp.", 1)));
    }
    stack_experts(weights, "experts", experts, projections)?;
    // Experts already stacked under `experts` (mlx-lm's AFMoE keeps its `SwitchGLU` there):
    // the layout `switch_mlp` holds.
    weights.rename(|name| {
        let renamed = ["gate_proj", "up_proj", "down_proj"].iter().find_map(|p| {
            let stacked = format!(".experts.{p}.");
            name.contains(&stacked)
                .then(|| name.replacen(&stacked, &format!(".switch_mlp.{p}."), 1))
        });
        Some(renamed.unwrap_or_else(|| name.to_owned()))
    });
    split_fused_experts(weights)?;
    split_fused_shared_expert(weights)
}

/// How a family derives `layer_types` for configs that predate the field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerRule {
    /// No sliding layers.
    NoSliding,
    /// Every layer slides when `sliding_window` is set (Mistral, Phi-3, StarCoder 2).
    All,
    /// Every n-th layer is full attention, the others slide (Gemma 2: 2).
    EveryNth(i32),
    /// Every n-th layer from the first is full attention (layers 0, n, 2n, …), the others
    /// slide (CWM: 4).
    EveryNthFromFirst(i32),
    /// Every `sliding_window_pattern`-th layer is full attention (Gemma 3).
    Pattern,
    /// Layers from `max_window_layers` on slide, when `use_sliding_window` (Qwen 2).
    FromMaxWindowLayers,
    /// The layers without RoPE slide, when `use_sliding_window` (SmolLM3).
    WithoutRope,
    /// Every layer slides when `use_sliding_window` (Qwen3-MoE).
    AllWhenEnabled,
    /// Every other layer, from the first, slides below `max_window_layers`, when
    /// `use_sliding_window` (Qwen2-MoE).
    AlternateBelowMaxWindowLayers,
    /// Layers from `max_window_layers` on slide whenever `sliding_window` is set (dots1).
    FromMaxWindowLayersWhenSet,
}

impl LayerRule {
    /// The config fields the rule reads besides `sliding_window` (all [`SlidingWindowConfig`]
    /// fields), each with what it means; `use_sliding_window` is the one boolean.
    pub fn fields(self) -> &'static [(&'static str, &'static str)] {
        match self {
            LayerRule::NoSliding
            | LayerRule::All
            | LayerRule::EveryNth(_)
            | LayerRule::EveryNthFromFirst(_) => &[],
            LayerRule::Pattern => &[(
                "sliding_window_pattern",
                "every n-th layer is full attention",
            )],
            LayerRule::FromMaxWindowLayers => &[
                ("use_sliding_window", "sliding windows on"),
                ("max_window_layers", "first sliding layer"),
            ],
            LayerRule::WithoutRope => &[(
                "use_sliding_window",
                "sliding windows on the layers without RoPE",
            )],
            LayerRule::AllWhenEnabled => &[("use_sliding_window", "sliding windows on")],
            LayerRule::FromMaxWindowLayersWhenSet => {
                &[("max_window_layers", "first sliding layer")]
            }
            LayerRule::AlternateBelowMaxWindowLayers => &[
                ("use_sliding_window", "sliding windows on"),
                (
                    "max_window_layers",
                    "sliding layers (every other one) below it",
                ),
            ],
        }
    }
}

/// The sliding-window fields of a config.json, in any of the styles families use.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct SlidingWindowConfig {
    /// Each query of a sliding layer sees itself and `sliding_window - 1` earlier tokens.
    #[serde(default)]
    pub sliding_window: Option<i32>,
    /// Transformers 5: the attention of each layer.
    #[serde(default)]
    pub layer_types: Option<Vec<LayerType>>,
    #[serde(default)]
    pub use_sliding_window: Option<bool>,
    #[serde(default)]
    pub max_window_layers: Option<i32>,
    #[serde(default)]
    pub sliding_window_pattern: Option<i32>,
}

impl SlidingWindowConfig {
    /// The attention of each of `n` layers: `layer_types`, or else `rule` over the other
    /// fields (`uses_rope` for [`LayerRule::WithoutRope`]).
    pub fn layer_types(&self, n: usize, rule: LayerRule, uses_rope: &[bool]) -> Vec<LayerType> {
        if let Some(types) = &self.layer_types {
            return types.clone();
        }
        let enabled = self.use_sliding_window.unwrap_or(false);
        match rule {
            LayerRule::NoSliding => LayerType::all(n, None),
            LayerRule::All => LayerType::all(n, self.sliding_window),
            LayerRule::EveryNth(period) => LayerType::periodic(n, period),
            LayerRule::EveryNthFromFirst(period) => LayerType::periodic_from_first(n, period),
            LayerRule::Pattern => LayerType::periodic(n, self.sliding_window_pattern.unwrap_or(0)),
            LayerRule::FromMaxWindowLayers => {
                LayerType::from_layer(n, enabled, self.max_window_layers.unwrap_or(0))
            }
            LayerRule::WithoutRope => LayerType::where_no_rope(uses_rope, enabled),
            LayerRule::AllWhenEnabled if enabled => LayerType::all(n, self.sliding_window),
            LayerRule::AllWhenEnabled => LayerType::all(n, None),
            LayerRule::FromMaxWindowLayersWhenSet => LayerType::from_layer(
                n,
                self.sliding_window.is_some(),
                self.max_window_layers.unwrap_or(0),
            ),
            LayerRule::AlternateBelowMaxWindowLayers => {
                let below = self.max_window_layers.unwrap_or(0).max(0) as usize;
                (0..n)
                    .map(|i| {
                        if enabled && i % 2 == 0 && i < below {
                            LayerType::SlidingAttention
                        } else {
                            LayerType::FullAttention
                        }
                    })
                    .collect()
            }
        }
    }
}

/// Layers without RoPE (SmolLM3).
#[derive(Debug, Clone, Default, Deserialize)]
pub struct NoRopeConfig {
    /// 1: the layer uses RoPE, 0: it does not.
    #[serde(default)]
    pub no_rope_layers: Option<Vec<i32>>,
    /// Without `no_rope_layers`: every n-th layer has no RoPE.
    #[serde(default)]
    pub no_rope_layer_interval: Option<i32>,
}

impl NoRopeConfig {
    /// Whether each of `n` layers uses RoPE.
    pub fn uses_rope(&self, n: usize) -> Vec<bool> {
        rope_layers(
            n,
            self.no_rope_layers.as_deref(),
            self.no_rope_layer_interval.unwrap_or(0),
        )
    }
}

/// Removes RoPE from the layers `uses_rope` marks false.
pub fn drop_rope(layers: &mut [LayerSettings], uses_rope: &[bool]) {
    for (layer, &uses) in layers.iter_mut().zip(uses_rope) {
        if !uses {
            layer.rope = None;
        }
    }
}

/// The Mamba2 fields of hybrids that name them `mamba_*` (Bamba, Granite 4 hybrids), with
/// the names of their config classes; flattened into a family's `Config`.
#[derive(Debug, Clone, Deserialize)]
pub struct Mamba2Config {
    pub mamba_n_heads: i32,
    /// The width of a head, or "auto": `mamba_expand · hidden_size / mamba_n_heads`.
    pub mamba_d_head: serde_json::Value,
    /// Groups of heads sharing `B` and `C`.
    pub mamba_n_groups: i32,
    pub mamba_d_state: i32,
    /// Taps of the causal convolution.
    pub mamba_d_conv: i32,
    pub mamba_expand: i32,
    /// Tokens per chunk of a prompt's scan.
    pub mamba_chunk_size: i32,
    pub mamba_conv_bias: bool,
    /// Biases of `in_proj` and `out_proj`.
    pub mamba_proj_bias: bool,
    /// The range `dt` is clamped to in a prompt's scan.
    #[serde(deserialize_with = "crate::config::f64_pair_or_non_finite")]
    pub time_step_limit: (f64, f64),
}

impl Mamba2Config {
    /// The mixer these fields describe for `d`'s width: the heads must share the expanded
    /// width and split into the groups; the gated RMSNorm's epsilon is `rms_norm_eps`
    /// (`default_eps` where config.json has none). `clamp_steps`: decoded tokens clamp
    /// `dt` as the prompt's scan does (Transformers' Bamba and Granite 4 steps do not).
    pub fn settings(
        &self,
        d: &DecoderConfig,
        default_eps: f64,
        clamp_steps: bool,
        config: &ConfigFile,
    ) -> Result<Mamba2Settings> {
        let head_dim = match &self.mamba_d_head {
            serde_json::Value::String(s) if s == "auto" => {
                self.mamba_expand * d.hidden_size / self.mamba_n_heads.max(1)
            }
            v => v.as_i64().map(|v| v as i32).ok_or_else(|| {
                Error::config(&config.path, "mamba_d_head", "must be a number or \"auto\"")
            })?,
        };
        config.ensure(
            d.hidden_size * self.mamba_expand == self.mamba_n_heads * head_dim,
            "mamba_n_heads",
            || {
                format!(
                    "hidden_size × mamba_expand ({}) must equal mamba_n_heads × mamba_d_head ({})",
                    d.hidden_size * self.mamba_expand,
                    self.mamba_n_heads * head_dim
                )
            },
        )?;
        config.ensure(
            self.mamba_n_groups > 0 && self.mamba_n_heads % self.mamba_n_groups == 0,
            "mamba_n_groups",
            || {
                format!(
                    "{} heads cannot be split into {} groups",
                    self.mamba_n_heads, self.mamba_n_groups
                )
            },
        )?;
        Ok(Mamba2Settings {
            num_heads: self.mamba_n_heads,
            head_dim,
            state_size: self.mamba_d_state,
            n_groups: self.mamba_n_groups,
            conv_kernel: self.mamba_d_conv,
            conv_bias: self.mamba_conv_bias,
            bias: self.mamba_proj_bias,
            out_bias: self.mamba_proj_bias,
            chunk_size: self.mamba_chunk_size,
            time_step_limit: (
                self.time_step_limit.0 as f32,
                self.time_step_limit.1.min(f64::from(f32::MAX)) as f32,
            ),
            clamp_steps,
            norm_eps: d.rms_norm_eps.unwrap_or(default_eps),
            gate: Mamba2Gate::NormAfterGate,
            chunked_prefill: true,
        })
    }
}

/// Which layers of a hybrid decoder attend, as its config says; the others run its
/// recurrent mixer ([`set_recurrent_layers`]).
#[derive(Debug, Clone, Copy)]
pub enum AttentionLayers<'a> {
    /// Attention at the layers `field` lists (Bamba's `attn_layer_indices`, LFM2's
    /// `full_attn_idxs`); a null list: every layer attends (`null_attends`) or none.
    Indices {
        field: &'a str,
        indices: Option<&'a [i32]>,
        null_attends: bool,
    },
    /// Attention at the layers `i` with `i % period == offset` (Jamba's
    /// `attn_layer_period`, `attn_layer_offset`), each with its field's name.
    Period {
        period: (&'a str, i32),
        offset: (&'a str, i32),
    },
    /// The last layer of every `interval` attends: layer `i` when `(i + 1) % interval == 0`
    /// (Qwen3-Next's `full_attention_interval`), with its field's name.
    Interval { interval: (&'a str, i32) },
    /// Each layer's kind from `field` (LFM2's `layer_types`): the `attending` kinds attend,
    /// the `mixing` one runs the mixer, any other is an error naming `field`. Without the
    /// list, the `fallback` rule (LFM2's `full_attn_idxs`), or an error where there is none.
    Types {
        field: &'a str,
        types: Option<&'a [LayerType]>,
        attending: &'a [LayerType],
        mixing: LayerType,
        fallback: Option<&'a AttentionLayers<'a>>,
    },
    /// Each layer's kind from a repeating pattern (RecurrentGemma's `block_types`: layer
    /// `i` is `pattern[i % pattern.len()]`): the `attending` names attend, `mixing` runs the
    /// mixer; an empty pattern or another name is an error naming `field`.
    Cycle {
        field: &'a str,
        pattern: &'a [String],
        attending: &'a [&'a str],
        mixing: &'a str,
    },
}

impl AttentionLayers<'_> {
    /// For each of `n` layers, whether it attends; a list naming a layer the model does not
    /// have, or a period that is not positive, is an error naming its field.
    pub fn resolve(&self, n: usize, config: &ConfigFile) -> Result<Vec<bool>> {
        match *self {
            AttentionLayers::Indices {
                field,
                indices,
                null_attends,
            } => {
                let Some(indices) = indices else {
                    return Ok(vec![null_attends; n]);
                };
                let beyond = indices.iter().find(|&&i| i < 0 || i as usize >= n);
                config.ensure(beyond.is_none(), field, || {
                    format!(
                        "names layer {} of a model with {n} layers",
                        beyond.copied().unwrap_or_default()
                    )
                })?;
                Ok((0..n).map(|i| indices.contains(&(i as i32))).collect())
            }
            AttentionLayers::Period {
                period: (period_field, period),
                offset: (offset_field, offset),
            } => {
                config.ensure(period > 0, period_field, || "must be positive".to_owned())?;
                config.ensure(offset >= 0, offset_field, || {
                    "must not be negative".to_owned()
                })?;
                Ok((0..n).map(|i| i as i32 % period == offset).collect())
            }
            AttentionLayers::Interval {
                interval: (field, interval),
            } => {
                config.ensure(interval > 0, field, || "must be positive".to_owned())?;
                Ok((0..n).map(|i| (i as i32 + 1) % interval == 0).collect())
            }
            AttentionLayers::Types {
                field,
                types,
                attending,
                mixing,
                fallback,
            } => {
                let Some(types) = types else {
                    return match fallback {
                        Some(rule) => rule.resolve(n, config),
                        None => Err(Error::config(
                            &config.path,
                            field,
                            "is missing: it says which layers attend",
                        )),
                    };
                };
                config.ensure(types.len() == n, field, || {
                    format!("has {} entries for {n} layers", types.len())
                })?;
                types
                    .iter()
                    .map(|t| {
                        if attending.contains(t) {
                            Ok(true)
                        } else if *t == mixing {
                            Ok(false)
                        } else {
                            Err(Error::config(
                                &config.path,
                                field,
                                format!(
                                    "names a `{t:?}` layer; this family has {attending:?} and {mixing:?} layers"
                                ),
                            ))
                        }
                    })
                    .collect()
            }
            AttentionLayers::Cycle {
                field,
                pattern,
                attending,
                mixing,
            } => {
                config.ensure(!pattern.is_empty(), field, || "is empty".to_owned())?;
                (0..n)
                    .map(|i| {
                        let kind = pattern[i % pattern.len()].as_str();
                        if attending.contains(&kind) {
                            Ok(true)
                        } else if kind == mixing {
                            Ok(false)
                        } else {
                            Err(Error::config(
                                &config.path,
                                field,
                                format!(
                                    "names a `{kind}` layer; this family has {attending:?} and `{mixing}` layers"
                                ),
                            ))
                        }
                    })
                    .collect()
            }
        }
    }
}

/// Gives every layer `attends` marks false the recurrent `mixer`, without RoPE (a hybrid's
/// Mamba layers: the recurrence orders the tokens).
pub fn set_recurrent_layers(layers: &mut [LayerSettings], attends: &[bool], mixer: MixerKind) {
    for (layer, &attends) in layers.iter_mut().zip(attends) {
        if !attends {
            layer.mixer = mixer;
            layer.rope = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Experts stacked under `experts` (mlx-lm's AFMoE, quantized too) load as `switch_mlp`;
    /// per-expert ones are stacked there; a fused shared expert is split.
    #[test]
    fn stacked_per_expert_and_fused_layouts_meet_in_switch_mlp() {
        use mlx_rs::Array;
        let t = |shape: &[i32]| Array::zeros::<f32>(shape).unwrap();
        let names = [
            (
                "model.layers.1.mlp.experts.gate_proj.weight",
                t(&[4, 8, 16]),
            ),
            ("model.layers.1.mlp.experts.gate_proj.scales", t(&[4, 8, 1])),
            ("model.layers.2.mlp.experts.0.up_proj.weight", t(&[8, 16])),
            ("model.layers.2.mlp.experts.1.up_proj.weight", t(&[8, 16])),
            (
                "model.layers.3.mlp.shared_expert.gate_up_proj.weight",
                t(&[6, 16]),
            ),
        ];
        let mut weights = Weights::new(
            names.into_iter().map(|(n, a)| (n.to_owned(), a)).collect(),
            "ckpt",
        );
        sanitize_experts(&mut weights, false, 2, None, &[("up_proj", "up_proj")]).unwrap();
        let mut got: Vec<&str> = weights.names().collect();
        got.sort_unstable();
        assert_eq!(
            got,
            [
                "model.layers.1.mlp.switch_mlp.gate_proj.scales",
                "model.layers.1.mlp.switch_mlp.gate_proj.weight",
                "model.layers.2.mlp.switch_mlp.up_proj.weight",
                "model.layers.3.mlp.shared_expert.gate_proj.weight",
                "model.layers.3.mlp.shared_expert.up_proj.weight",
            ]
        );
        assert_eq!(
            weights.shape_of("model.layers.2.mlp.switch_mlp.up_proj.weight"),
            Some(&[2, 8, 16][..])
        );
    }

    fn config(value: serde_json::Value) -> ConfigFile {
        ConfigFile {
            path: "config.json".into(),
            value,
        }
    }

    /// Bamba's index list, its null (no attention) and LFM2's (all attention), Jamba's
    /// period and offset, Qwen3-Next's interval, each as its config class resolves it; bad values name the field.
    #[test]
    fn attention_layers_follow_the_config_pattern() {
        let c = config(serde_json::json!({}));
        let indices = |indices: Option<&'static [i32]>, null_attends| AttentionLayers::Indices {
            field: "attn_layer_indices",
            indices,
            null_attends,
        };
        let at = |v: &[bool]| -> Vec<usize> {
            v.iter()
                .enumerate()
                .filter(|(_, a)| **a)
                .map(|(i, _)| i)
                .collect()
        };
        assert_eq!(
            at(&indices(Some(&[1, 3]), false).resolve(5, &c).unwrap()),
            [1, 3]
        );
        assert_eq!(
            at(&indices(None, false).resolve(3, &c).unwrap()),
            [] as [usize; 0]
        );
        assert_eq!(at(&indices(None, true).resolve(3, &c).unwrap()), [0, 1, 2]);
        let err = indices(Some(&[0, 4]), false).resolve(4, &c).unwrap_err();
        assert!(err.to_string().contains("attn_layer_indices"), "{err}");
        let period = |p, o| AttentionLayers::Period {
            period: ("attn_layer_period", p),
            offset: ("attn_layer_offset", o),
        };
        // Jamba's default: attention every 8 layers from layer 4.
        assert_eq!(at(&period(8, 4).resolve(32, &c).unwrap()), [4, 12, 20, 28]);
        let err = period(0, 0).resolve(4, &c).unwrap_err();
        assert!(err.to_string().contains("attn_layer_period"), "{err}");
        // Qwen3-Next's `full_attention_interval`: the last layer of every 4.
        let interval = |n| AttentionLayers::Interval {
            interval: ("full_attention_interval", n),
        };
        assert_eq!(at(&interval(4).resolve(9, &c).unwrap()), [3, 7]);
        assert_eq!(at(&interval(1).resolve(2, &c).unwrap()), [0, 1]);
        let err = interval(0).resolve(4, &c).unwrap_err();
        assert!(err.to_string().contains("full_attention_interval"), "{err}");

        // LFM2's `layer_types`, and its `full_attn_idxs` where a config has no list.
        use LayerType::{Conv, FullAttention, SlidingAttention};
        let idxs = indices(Some(&[1]), true);
        let types = |types: Option<&'static [LayerType]>, fallback| AttentionLayers::Types {
            field: "layer_types",
            types,
            attending: &[FullAttention],
            mixing: Conv,
            fallback,
        };
        let listed = types(Some(&[Conv, FullAttention, Conv]), Some(&idxs));
        assert_eq!(at(&listed.resolve(3, &c).unwrap()), [1]);
        assert_eq!(at(&types(None, Some(&idxs)).resolve(3, &c).unwrap()), [1]);
        for bad in [
            types(None, None),
            types(Some(&[Conv, FullAttention]), None),
            types(Some(&[Conv, SlidingAttention, Conv]), None),
        ] {
            let err = bad.resolve(3, &c).unwrap_err();
            assert!(err.to_string().contains("layer_types"), "{err}");
        }

        // RecurrentGemma's `block_types`, repeated over the layers.
        let pattern = |names: &[&str]| names.iter().map(|n| n.to_string()).collect::<Vec<_>>();
        let griffin = pattern(&["recurrent", "recurrent", "attention"]);
        let cycle = |pattern: &[String]| {
            AttentionLayers::Cycle {
                field: "block_types",
                pattern,
                attending: &["attention"],
                mixing: "recurrent",
            }
            .resolve(7, &c)
        };
        assert_eq!(at(&cycle(&griffin).unwrap()), [2, 5]);
        for bad in [pattern(&[]), pattern(&["recurrent", "mlp"])] {
            let err = cycle(&bad).unwrap_err();
            assert!(err.to_string().contains("block_types"), "{err}");
        }

        let mut layers = vec![LayerSettings::default(); 3];
        set_recurrent_layers(&mut layers, &[true, false, true], MixerKind::Mamba2);
        let mixers: Vec<MixerKind> = layers.iter().map(|l| l.mixer).collect();
        assert_eq!(
            mixers,
            [
                MixerKind::Attention,
                MixerKind::Mamba2,
                MixerKind::Attention
            ]
        );
    }

    /// MiniCPM3's config class derives a null `v_head_dim` as `hidden_size /
    /// num_attention_heads`; a given one is taken as it is.
    #[test]
    fn latent_value_width_is_derived_where_the_config_leaves_it_out() {
        let base = serde_json::json!({
            "model_type": "minicpm3", "vocab_size": 256, "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 2, "num_attention_heads": 4, "rms_norm_eps": 1e-5,
            "max_position_embeddings": 4096, "tie_word_embeddings": false, "hidden_act": "silu",
            "kv_lora_rank": 16, "q_lora_rank": null, "qk_nope_head_dim": 16,
            "qk_rope_head_dim": 8,
        });
        let width = |value: serde_json::Value| {
            let file = config(value);
            let d: DecoderConfig = file.parse().expect("decoder fields");
            let mla: MlaConfig = file.parse().expect("latent fields");
            mla.settings(&d, &file).expect("settings").v_head_dim
        };
        assert_eq!(width(base.clone()), 16);
        let mut null = base.clone();
        null["v_head_dim"] = serde_json::Value::Null;
        assert_eq!(width(null), 16);
        let mut given = base;
        given["v_head_dim"] = 12.into();
        assert_eq!(width(given), 12);
    }

    /// Granite SWA's `layer_rope_theta`: each layer rotates at its own base, in either
    /// config style, with the config's scaling kept; 0 is a layer without RoPE; a list of
    /// the wrong length or a negative base is an error naming the field.
    #[test]
    fn each_layer_rotates_at_its_own_base_and_zero_means_none() {
        let base = serde_json::json!({
            "model_type": "granite_swa", "vocab_size": 256, "hidden_size": 64,
            "intermediate_size": 128, "num_hidden_layers": 3, "num_attention_heads": 4, "max_position_embeddings": 4096,
        });
        let bases = [0.0, 5e4, 1e6];
        let check = |value: serde_json::Value| {
            let file = config(value);
            let d: DecoderConfig = file.parse().expect("decoder fields");
            let rope = d.rope(10000.0, false, &file).expect("rope");
            let mut layers = d.layers(LayerRule::NoSliding, Some(&rope), None, false);
            d.set_layer_rope_bases(&mut layers, "layer_rope_theta", &bases, false, &file)
                .expect("bases");
            assert!(layers[0].rope.is_none());
            for (layer, want) in layers[1..].iter().zip(&bases[1..]) {
                let got = layer.rope.as_ref().expect("a RoPE").config();
                assert_eq!(got.theta, *want);
                assert_eq!(got.scaling, rope.config().scaling);
            }
            let too_few =
                d.set_layer_rope_bases(&mut layers, "layer_rope_theta", &bases[1..], false, &file);
            assert!(too_few
                .unwrap_err()
                .to_string()
                .contains("layer_rope_theta"));
            let negative = d.set_layer_rope_bases(
                &mut layers,
                "layer_rope_theta",
                &[1e4, -1.0, 0.0],
                false,
                &file,
            );
            assert!(negative.unwrap_err().to_string().contains("-1"));
        };
        let scaling = serde_json::json!({"rope_type": "linear", "factor": 4.0});
        let mut transformers5 = base.clone();
        transformers5["rope_parameters"] =
            serde_json::json!({"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0});
        check(transformers5);
        let mut hub = base;
        hub["rope_theta"] = 10000.0.into();
        hub["rope_scaling"] = scaling;
        check(hub);
    }
}
