//! Sparse mixture-of-experts feed-forward blocks: a router picks `top_k` of `num_experts`
//! expert MLPs per token, and the token's output is their weighted sum (plus, in some
//! families, a shared expert every token goes through).
//!
//! The experts' weights are stacked, `[experts, out, in]`, and a token's experts are
//! applied with MLX's `gather_mm` (`gather_qmm` for quantized checkpoints), so the work per
//! token grows with the active experts, not with all of them, as in mlx-lm's
//! `switch_layers.py`. For longer inputs the (token, expert) pairs are sorted by expert
//! first, so each expert's matrix is read once per batch.
//!
//! Weight names, under the feed-forward's path (what each family's `sanitize` maps its
//! checkpoints to; [`stack_experts`] and [`split_fused_experts`] do the usual conversions):
//! - `gate.weight` (and `gate.bias`): the router; `gate.e_score_correction_bias` where the
//!   router selects with a correction bias;
//! - `switch_mlp.gate_proj` / `up_proj` / `down_proj` `.weight` (`[experts, out, in]`, or
//!   MLX-quantized with `scales`/`biases`), with `.bias` (`[experts, out]`) where experts have
//!   biases;
//! - `shared_expert.*` (a dense gated MLP) and `shared_expert_gate.weight`.

use crate::distributed::Group;
use crate::error::{Error, Result};
use crate::mlp::{Activation, Mlp, MlpLayout, MlpSettings};
use crate::nn::{even_part, scalar_like, Linear, Quantization};
use crate::tap::Tap;
use crate::weights::{Part, WeightPath, Weights};
use mlx_rs::ops::argpartition_axis;
use mlx_rs::ops::indexing::{take_along_axis, IndexOp};
use mlx_rs::{ops, Array, Dtype};
use std::collections::BTreeMap;
use std::ops::Range;

/// Above this many (token, expert) pairs the pairs are sorted by expert before the
/// gathered matrix products (mlx-lm's threshold).
const SORT_THRESHOLD: i32 = 64;

/// How router logits become expert scores.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Scoring {
    /// Softmax over all experts (in f32), then the `top_k` highest (Mixtral, Qwen, OLMoE).
    /// With [`RouterSettings::normalize`] the chosen weights sum to one, which is the
    /// softmax over the chosen logits alone (Granite, gpt-oss).
    Softmax,
    /// `sigmoid(logit)` per expert (in f32), chosen by score plus the correction bias where
    /// there is one (GLM-4.5, MiniMax-M2, DeepSeek-V3).
    Sigmoid,
    /// The `top_k` highest logits, each weighted by `sigmoid(logit)`, and the weight applied
    /// to the expert's input rather than its output (Llama 4).
    SigmoidOnInput,
    /// `sigmoid(logit)` weights of the experts chosen by logit plus the correction bias
    /// (Kolibri-1: the bias added before the sigmoid, not after).
    SigmoidBiasOnLogits,
    /// Phi-3.5-MoE's sparsemixer (top 2 only): each pick's weight is the softmax of the
    /// logits within `2 · jitter_eps` (relative) of that pick's logit; the second pick is
    /// made among the logits left after masking the first.
    SparseMixer { jitter_eps: f32 },
}

/// Expert groups: experts fall into `groups` contiguous groups, each group is scored, and
/// only the experts of the `top_groups` best groups are eligible.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExpertGroups {
    pub groups: i32,
    pub top_groups: i32,
    pub score: GroupScore,
}

/// How a group of experts is scored for [`ExpertGroups`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum GroupScore {
    /// The sum of its two best experts' scores (DeepSeek-V3's `noaux_tc`, GLM-4.5).
    #[default]
    TopTwoSum,
    /// Its best expert's score (DeepSeek-V2's `group_limited_greedy`).
    Max,
}

/// How a router chooses experts and weighs them.
#[derive(Debug, Clone, PartialEq)]
pub struct RouterSettings {
    pub num_experts: i32,
    pub top_k: i32,
    pub scoring: Scoring,
    /// Renormalize the chosen weights to sum to one (`norm_topk_prob`).
    pub normalize: bool,
    /// Add `e_score_correction_bias` to the scores for choosing (not for weighting).
    pub correction_bias: bool,
    pub groups: Option<ExpertGroups>,
    /// Multiplies the chosen weights (`routed_scaling_factor`).
    pub scaling_factor: Option<f32>,
    /// The router linear layer has a bias (gpt-oss).
    pub bias: bool,
}

impl RouterSettings {
    /// Softmax top-k over `num_experts` experts, not renormalized, no bias, groups or
    /// scaling: what a family changes, it sets on top of this.
    pub fn new(num_experts: i32, top_k: i32) -> RouterSettings {
        RouterSettings {
            num_experts,
            top_k,
            scoring: Scoring::Softmax,
            normalize: false,
            correction_bias: false,
            groups: None,
            scaling_factor: None,
            bias: false,
        }
    }
}

/// The nonlinearity between the experts' up and down projections.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ExpertActivation {
    /// `act(gate) * up`.
    Glu(Activation),
    /// gpt-oss: `(clip(up, -limit, limit) + 1) * g * sigmoid(alpha * g)` with
    /// `g = min(gate, limit)`.
    ClampedSwiglu { alpha: f32, limit: f32 },
    /// `act(up)`, no gate projection (Nemotron-H's relu² experts).
    Plain(Activation),
}

impl ExpertActivation {
    /// The experts have a `gate_proj`.
    pub fn gated(self) -> bool {
        !matches!(self, ExpertActivation::Plain(_))
    }
}

/// A shared expert every token goes through beside the routed ones.
#[derive(Debug, Clone, PartialEq)]
pub struct SharedExpertSettings {
    pub intermediate_size: i32,
    /// Its output is multiplied by `sigmoid(shared_expert_gate(x))` (Qwen2-MoE).
    pub gated: bool,
    /// Biases on its projections (ERNIE 4.5's `use_bias`).
    pub bias: bool,
    /// How its output joins the routed experts'.
    pub join: SharedJoin,
}

/// How a block joins its shared expert's output to the routed experts'.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SharedJoin {
    /// `routed + shared`.
    #[default]
    Sum,
    /// `(routed + shared) / 2` (Cohere2-MoE's `average`).
    Average,
}

/// A sparse mixture-of-experts block.
#[derive(Debug, Clone, PartialEq)]
pub struct MoeSettings {
    pub router: RouterSettings,
    /// The width of each expert's MLP.
    pub intermediate_size: i32,
    pub activation: ExpertActivation,
    /// Bias on the experts' projections.
    pub expert_bias: bool,
    /// The last `zero_experts` of the router's experts compute nothing: a token routed
    /// there passes through, times its weight (LongCat-Flash's identity experts).
    pub zero_experts: i32,
    pub shared_expert: Option<SharedExpertSettings>,
    /// The routed experts work in a narrower space: `fc1_latent_proj` takes the input
    /// there and `fc2_latent_proj` brings their weighted sum back (Nemotron-H's
    /// `moe_latent_size`); the router and the shared expert see the full input.
    pub latent_size: Option<i32>,
}

impl MoeSettings {
    /// These settings with biases on the shared expert's projections, if there is one.
    pub fn with_shared_expert_bias(mut self, bias: bool) -> MoeSettings {
        if let Some(shared) = &mut self.shared_expert {
            shared.bias = bias;
        }
        self
    }

    /// These settings with the shared expert, if there is one, joined to the routed
    /// experts by `join`.
    ///
    /// ```
    /// # use mlx_models::family::MoeConfig;
    /// # use mlx_models::mlp::Activation;
    /// use mlx_models::moe::{ExpertActivation, SharedJoin};
    /// let moe: MoeConfig = serde_json::from_str(
    ///     r#"{"num_experts": 4, "num_experts_per_tok": 2, "num_shared_experts": 1}"#,
    /// )?;
    /// let glu = ExpertActivation::Glu(Activation::Silu);
    /// let settings = moe
    ///     .settings(moe.router(), 32, glu, false)
    ///     .with_shared_expert_join(SharedJoin::Average);
    /// assert_eq!(settings.shared_expert.map(|s| s.join), Some(SharedJoin::Average));
    /// # Ok::<(), serde_json::Error>(())
    /// ```
    pub fn with_shared_expert_join(mut self, join: SharedJoin) -> MoeSettings {
        if let Some(shared) = &mut self.shared_expert {
            shared.join = join;
        }
        self
    }

    /// The experts with weights (the router's less the zero-computation ones).
    pub fn computing_experts(&self) -> i32 {
        self.router.num_experts - self.zero_experts
    }
}

/// Expert weight matrices stacked `[experts, out, in]`, dense or MLX-quantized.
#[derive(Debug, Clone)]
pub enum ExpertMatrix {
    Dense(Array),
    Quantized {
        weight: Array,
        scales: Array,
        biases: Array,
        quantization: Quantization,
    },
}

/// One projection of every expert (mlx-lm's `SwitchLinear`).
#[derive(Debug, Clone)]
pub struct ExpertLinear {
    pub weight: ExpertMatrix,
    /// `[experts, out]`.
    pub bias: Option<Array>,
}

impl ExpertLinear {
    /// Loads `weight` (`[experts, out_dim, in_dim]`, or packed with `scales`/`biases`)
    /// and, when `bias`, `bias` (`[experts, out_dim]`).
    pub fn load(
        w: &WeightPath,
        experts: i32,
        in_dim: i32,
        out_dim: i32,
        bias: bool,
    ) -> Result<ExpertLinear> {
        ExpertLinear::load_experts(w, experts, in_dim, out_dim, bias, None)
    }

    /// [`ExpertLinear::load`] of only the experts `mine` (a tensor-parallel rank's share),
    /// or of all of them when `None`.
    pub fn load_experts(
        w: &WeightPath,
        experts: i32,
        in_dim: i32,
        out_dim: i32,
        bias: bool,
        mine: Option<Range<i32>>,
    ) -> Result<ExpertLinear> {
        let part = mine.map(|r| Part::new(0, r));
        let take = |name: &str| match &part {
            None => w.get_any_shape(name),
            Some(p) => w.get_part_any_shape(name, p),
        };
        let weight = if !w.contains("scales") {
            let shape = [experts, out_dim, in_dim];
            ExpertMatrix::Dense(match &part {
                None => w.get("weight", &shape)?,
                Some(p) => w.get_part("weight", &shape, p)?,
            })
        } else {
            let (packed, groups) = (w.shape_of("weight")?, w.shape_of("scales")?);
            w.check_affine_dtype("weight", w.dtype_of("scales")?)?;
            let fits = packed.len() == 3
                && packed[..2] == [experts, out_dim]
                && (packed[2] * 32) % in_dim == 0
                && w.dtype_of("weight")? == Dtype::Uint32
                && groups.len() == 3
                && groups[..2] == [experts, out_dim]
                && groups[2] > 0
                && in_dim % groups[2] == 0;
            if !fits {
                return Err(w.shape_error("weight", &[experts, out_dim, in_dim], &packed));
            }
            let biases_shape = w.shape_of("biases")?;
            if biases_shape != groups {
                return Err(w.shape_error("biases", &groups, &biases_shape));
            }
            let (weight, scales, biases) = (take("weight")?, take("scales")?, take("biases")?);
            let quantization = Quantization {
                bits: packed[2] * 32 / in_dim,
                group_size: in_dim / groups[2],
            };
            w.count((experts * out_dim * in_dim) as usize);
            match w.dequantize_to() {
                Some(dtype) => {
                    let dense = ops::dequantize(
                        &weight,
                        &scales,
                        &biases,
                        quantization.group_size,
                        quantization.bits,
                    )?
                    .as_dtype(dtype)?;
                    dense.eval()?;
                    ExpertMatrix::Dense(dense)
                }
                None => ExpertMatrix::Quantized {
                    weight,
                    scales,
                    biases,
                    quantization,
                },
            }
        };
        let bias = match (bias, &part) {
            (false, _) => None,
            (true, None) => Some(w.get("bias", &[experts, out_dim])?),
            (true, Some(p)) => Some(w.get_part("bias", &[experts, out_dim], p)?),
        };
        Ok(ExpertLinear { weight, bias })
    }

    /// `x @ W[e]ᵀ (+ b[e])` for expert `e = indices[…]`: `x` is `[…, 1, in]` broadcast
    /// against `indices` `[…]`, the result `[…, 1, out]`.
    pub fn forward(&self, x: &Array, indices: &Array, sorted: bool) -> Result<Array> {
        let y = match &self.weight {
            ExpertMatrix::Dense(w) => {
                ops::gather_mm(x, w.swap_axes(-1, -2)?, None, indices, sorted)?
            }
            ExpertMatrix::Quantized {
                weight,
                scales,
                biases,
                quantization,
            } => ops::gather_qmm(
                x,
                weight,
                scales,
                biases,
                None,
                indices,
                true,
                quantization.group_size,
                quantization.bits,
                sorted,
            )?,
        };
        Ok(match &self.bias {
            Some(b) => y.add(b.take_axis(indices, 0)?.expand_dims(-2)?)?,
            None => y,
        })
    }

    /// The quantization, if any.
    pub fn quantization(&self) -> Option<Quantization> {
        match &self.weight {
            ExpertMatrix::Dense(_) => None,
            ExpertMatrix::Quantized { quantization, .. } => Some(*quantization),
        }
    }
}

/// The routed experts' gated MLPs (mlx-lm's `SwitchGLU`).
#[derive(Debug, Clone)]
pub struct ExpertMlps {
    /// `None` for [`ExpertActivation::Plain`] experts.
    pub gate_proj: Option<ExpertLinear>,
    pub up_proj: ExpertLinear,
    pub down_proj: ExpertLinear,
    pub activation: ExpertActivation,
    /// Under tensor parallelism, the experts this rank holds (the others' outputs are
    /// zero here, and come from their ranks in the sum over the group).
    pub experts: Option<Range<i32>>,
}

impl ExpertMlps {
    /// Loads the experts; under tensor parallelism, this rank's equal share of them.
    pub fn load(w: &WeightPath, hidden: i32, s: &MoeSettings) -> Result<ExpertMlps> {
        let (e, inter, bias) = (s.computing_experts(), s.intermediate_size, s.expert_bias);
        let mine = match w.tensor_parallel() {
            Some(g) => Some(even_part(e, g, &format!("{} (experts)", w.full_name("")))?),
            None => None,
        };
        let linear = |name: &str, i: i32, o: i32| {
            ExpertLinear::load_experts(&w.pp(name), e, i, o, bias, mine.clone())
        };
        Ok(ExpertMlps {
            gate_proj: s
                .activation
                .gated()
                .then(|| linear("gate_proj", hidden, inter))
                .transpose()?,
            up_proj: linear("up_proj", hidden, inter)?,
            down_proj: linear("down_proj", inter, hidden)?,
            activation: s.activation,
            experts: mine,
        })
    }

    /// The outputs of experts `indices` (`[tokens, k]`) for `x` (`[tokens, hidden]`):
    /// `[tokens, k, hidden]`; with a share of the experts, zeros for the others.
    pub fn forward(&self, x: &Array, indices: &Array) -> Result<Array> {
        let Some(mine) = &self.experts else {
            return self.forward_held(x, indices);
        };
        let first = Array::from_int(mine.start).as_dtype(indices.dtype())?;
        let last = Array::from_int(mine.end - mine.start - 1).as_dtype(indices.dtype())?;
        let zero = Array::from_int(0).as_dtype(indices.dtype())?;
        let local = indices.subtract(&first)?;
        let held = local.ge(&zero)?.logical_and(&local.le(&last)?)?;
        let clamped = ops::minimum(ops::maximum(&local, &zero)?, &last)?;
        let out = self.forward_held(x, &clamped)?;
        Ok(ops::select(
            &held.expand_dims(-1)?,
            &out,
            &ops::zeros_like(&out)?,
        )?)
    }

    /// [`ExpertMlps::forward`] for indices among the experts held.
    fn forward_held(&self, x: &Array, indices: &Array) -> Result<Array> {
        let (tokens, k) = (indices.dim(0), indices.dim(1));
        let sort = tokens * k >= SORT_THRESHOLD;
        // Each (token, expert) pair is one row `[1, hidden]`.
        let (x, idx, inverse) = if sort {
            let flat = indices.flatten(None, None)?;
            let order = ops::argsort_axis(&flat, 0)?;
            let inverse = ops::argsort_axis(&order, 0)?;
            let rows = order.floor_divide(Array::from_int(k).as_dtype(order.dtype())?)?;
            let x = x.take_axis(&rows, 0)?.expand_dims(-2)?;
            (x, flat.take_axis(&order, 0)?, Some(inverse))
        } else {
            (x.expand_dims_axes(&[-2, -3])?, indices.clone(), None)
        };
        let up = self.up_proj.forward(&x, &idx, sort)?;
        let gate = match &self.gate_proj {
            Some(gate_proj) => Some(gate_proj.forward(&x, &idx, sort)?),
            None => None,
        };
        let hidden = match (self.activation, gate) {
            (ExpertActivation::Plain(act), _) => act.apply(&up)?,
            (ExpertActivation::Glu(act), Some(gate)) => act.apply(&gate)?.multiply(&up)?,
            (ExpertActivation::ClampedSwiglu { alpha, limit }, Some(gate)) => {
                let gate = ops::minimum(&gate, scalar_like(limit, &gate)?)?;
                let up = ops::minimum(
                    ops::maximum(&up, scalar_like(-limit, &up)?)?,
                    scalar_like(limit, &up)?,
                )?;
                let glu =
                    gate.multiply(ops::sigmoid(gate.multiply(scalar_like(alpha, &gate)?)?)?)?;
                up.add(scalar_like(1.0, &up)?)?.multiply(&glu)?
            }
            (_, None) => {
                return Err(crate::error::Error::Mlx(mlx_rs::error::Exception::custom(
                    "gated experts loaded without a gate_proj",
                )))
            }
        };
        let out = self.down_proj.forward(&hidden, &idx, sort)?;
        Ok(match inverse {
            // `[tokens·k, 1, hidden]` back in (token, pick) order.
            Some(inverse) => out
                .take_axis(&inverse, 0)?
                .reshape(&[tokens, k, out.dim(-1)])?,
            None => out.squeeze_axes(&[-2])?,
        })
    }
}

/// Chooses experts: `(indices [tokens, k], weights [tokens, k])`, weights in f32.
#[derive(Debug, Clone)]
pub struct Router {
    pub gate: Linear,
    /// `[experts]`, added to the scores for choosing only.
    pub correction_bias: Option<Array>,
    pub settings: RouterSettings,
}

impl Router {
    pub fn load(w: &WeightPath, hidden: i32, s: &RouterSettings) -> Result<Router> {
        Ok(Router {
            gate: Linear::load(w, hidden, s.num_experts, s.bias)?,
            correction_bias: s
                .correction_bias
                .then(|| Router::correction_bias(w, s.num_experts))
                .transpose()?,
            settings: s.clone(),
        })
    }

    /// `e_score_correction_bias`: `[experts]`, or one row of them (ERNIE 4.5 keeps
    /// `[1, experts]`).
    fn correction_bias(w: &WeightPath, experts: i32) -> Result<Array> {
        const NAME: &str = "e_score_correction_bias";
        if w.contains(NAME) && w.shape_of(NAME)? == [1, experts] {
            return Ok(w.get(NAME, &[1, experts])?.reshape(&[experts])?);
        }
        w.get(NAME, &[experts])
    }

    /// The experts and weights for each row of `x` (`[tokens, hidden]`).
    pub fn route(&self, x: &Array) -> Result<(Array, Array)> {
        let s = &self.settings;
        let logits = self.gate.forward(x)?.as_dtype(Dtype::Float32)?;
        let k = s.top_k;
        let (indices, weights) = match s.scoring {
            Scoring::Softmax if s.normalize && self.correction_bias.is_none() => {
                let indices = top_k_indices(&logits, k)?;
                let chosen = take_along_axis(&logits, &indices, -1)?;
                (indices, ops::softmax_axis(&chosen, -1, None)?)
            }
            Scoring::Softmax => {
                let mut probs = ops::softmax_axis(&logits, -1, None)?;
                if let Some(g) = s.groups {
                    // Experts outside the chosen groups get probability 0, as in Transformers.
                    probs = mask_groups(&probs, g, 0.0)?;
                }
                let indices = match &self.correction_bias {
                    // Chosen by probability plus bias, weighted by probability (LongCat;
                    // renormalized, ERNIE 4.5).
                    Some(b) => top_k_indices(&probs.add(b.as_dtype(Dtype::Float32)?)?, k)?,
                    None => top_k_indices(&probs, k)?,
                };
                let weights = take_along_axis(&probs, &indices, -1)?;
                let weights = if s.normalize {
                    weights.divide(&weights.sum_axis(-1, true)?)?
                } else {
                    weights
                };
                (indices, weights)
            }
            Scoring::Sigmoid => {
                let scores = ops::sigmoid(&logits)?;
                let mut choice = match &self.correction_bias {
                    Some(b) => scores.add(b.as_dtype(Dtype::Float32)?)?,
                    None => scores.clone(),
                };
                if let Some(g) = s.groups {
                    choice = mask_groups(&choice, g, f32::NEG_INFINITY)?;
                }
                let indices = top_k_indices(&choice, k)?;
                let weights = take_along_axis(&scores, &indices, -1)?;
                let weights = if s.normalize {
                    let sum = weights.sum_axis(-1, true)?.add(Array::from_f32(1e-20))?;
                    weights.divide(&sum)?
                } else {
                    weights
                };
                (indices, weights)
            }
            Scoring::SigmoidBiasOnLogits => {
                let mut choice = match &self.correction_bias {
                    Some(b) => logits.add(b.as_dtype(Dtype::Float32)?)?,
                    None => logits.clone(),
                };
                if let Some(g) = s.groups {
                    choice = mask_groups(&choice, g, f32::NEG_INFINITY)?;
                }
                let indices = top_k_indices(&choice, k)?;
                let weights = ops::sigmoid(&take_along_axis(&logits, &indices, -1)?)?;
                let weights = if s.normalize {
                    let sum = weights.sum_axis(-1, true)?.add(Array::from_f32(1e-20))?;
                    weights.divide(&sum)?
                } else {
                    weights
                };
                (indices, weights)
            }
            Scoring::SigmoidOnInput => {
                let indices = top_k_indices(&logits, k)?;
                let chosen = take_along_axis(&logits, &indices, -1)?;
                (indices, ops::sigmoid(&chosen)?)
            }
            Scoring::SparseMixer { jitter_eps } => sparse_mixer(&logits, jitter_eps)?,
        };
        let weights = match s.scaling_factor {
            Some(f) => weights.multiply(Array::from_f32(f))?,
            None => weights,
        };
        Ok((indices, weights))
    }
}

/// The indices of the `k` largest entries of each row (in no particular order).
fn top_k_indices(scores: &Array, k: i32) -> Result<Array> {
    let experts = scores.dim(-1);
    if k >= experts {
        let all = ops::arange::<_, i32>(0, experts, None)?.as_dtype(Dtype::Uint32)?;
        return Ok(ops::broadcast_to(&all, scores.shape())?);
    }
    let order = argpartition_axis(&scores.negative()?, k - 1, -1)?;
    Ok(order.index((.., ..k)))
}

/// `choice` with every expert outside the `top_groups` best groups set to `masked`.
fn mask_groups(choice: &Array, g: ExpertGroups, masked: f32) -> Result<Array> {
    if g.groups <= 1 || g.top_groups >= g.groups {
        return Ok(choice.clone());
    }
    let (tokens, experts) = (choice.dim(0), choice.dim(1));
    let size = experts / g.groups;
    let grouped = choice.reshape(&[tokens, g.groups, size])?;
    let group_scores = match g.score {
        GroupScore::TopTwoSum => {
            let flat = grouped.reshape(&[-1, size])?;
            take_along_axis(&flat, &top_k_indices(&flat, 2)?, -1)?
                .sum_axis(-1, None)?
                .reshape(&[tokens, g.groups])?
        }
        GroupScore::Max => grouped.max_axis(-1, None)?,
    };
    let dropped = argpartition_axis(&group_scores, g.groups - g.top_groups - 1, -1)?
        .index((.., ..g.groups - g.top_groups));
    let excluded = ops::zeros::<bool>(&[tokens, g.groups])?.put_along_axis(
        &dropped,
        ops::ones::<bool>(dropped.shape())?,
        -1,
    )?;
    let masked = ops::select(excluded.expand_dims(-1)?, Array::from_f32(masked), &grouped)?;
    Ok(masked.reshape(&[tokens, experts])?)
}

/// Phi-3.5-MoE's sparsemixer at inference (top 2): `(indices, weights)`.
fn sparse_mixer(logits: &Array, jitter_eps: f32) -> Result<(Array, Array)> {
    let neg_inf = Array::from_f32(f32::NEG_INFINITY);
    let eps = Array::from_f32(2.0 * jitter_eps);
    // The softmax of the logits within `2·eps` (relative) of `top`, at `top`'s position.
    let pick = |scores: &Array| -> Result<(Array, Array)> {
        let index = ops::indexing::argmax_axis(scores, -1, true)?;
        let top = take_along_axis(scores, &index, -1)?;
        let factor = ops::maximum(&logits.abs()?, &top)?;
        let far = top.subtract(scores)?.divide(&factor)?.gt(&eps)?;
        let masked = ops::select(&far, &neg_inf, scores)?;
        let weight = take_along_axis(&ops::softmax_axis(&masked, -1, None)?, &index, -1)?;
        Ok((index, weight))
    };
    let (first, w1) = pick(logits)?;
    let experts = logits.dim(-1);
    let positions = ops::arange::<_, i32>(0, experts, None)?;
    let is_first = positions.eq(&first)?;
    let rest = ops::select(&is_first, &neg_inf, logits)?;
    let (second, w2) = pick(&rest)?;
    Ok((
        ops::concatenate(&[first, second], -1)?,
        ops::concatenate(&[w1, w2], -1)?,
    ))
}

/// A sparse mixture-of-experts feed-forward block (router, routed experts, optional
/// shared expert), loaded with the names of the module docs.
#[derive(Debug, Clone)]
pub struct SparseMoe {
    pub router: Router,
    /// Under tensor parallelism, the group over which the ranks' shares of the routed
    /// experts' output are summed.
    pub all_sum: Option<Group>,
    /// Into and out of the experts' latent space ([`MoeSettings::latent_size`]).
    pub latent_proj: Option<(Linear, Linear)>,
    pub experts: ExpertMlps,
    pub shared_expert: Option<Mlp>,
    pub shared_expert_gate: Option<Linear>,
    pub settings: MoeSettings,
}

impl SparseMoe {
    pub fn load(w: &WeightPath, hidden: i32, s: &MoeSettings) -> Result<SparseMoe> {
        let (shared_expert, shared_expert_gate) = match &s.shared_expert {
            Some(shared) => {
                let (layout, activation) = match s.activation {
                    ExpertActivation::Glu(act) => (MlpLayout::Gated, act),
                    ExpertActivation::ClampedSwiglu { .. } => (MlpLayout::Gated, Activation::Silu),
                    ExpertActivation::Plain(act) => (MlpLayout::UpDown, act),
                };
                let mlp = MlpSettings {
                    intermediate_size: shared.intermediate_size,
                    layout,
                    activation,
                    bias: shared.bias,
                };
                (
                    Some(Mlp::load(&w.pp("shared_expert"), &mlp, hidden)?),
                    shared
                        .gated
                        .then(|| Linear::load(&w.pp("shared_expert_gate"), hidden, 1, false))
                        .transpose()?,
                )
            }
            None => (None, None),
        };
        let latent_proj = match s.latent_size {
            Some(latent) => Some((
                Linear::load(&w.pp("fc1_latent_proj"), hidden, latent, false)?,
                Linear::load(&w.pp("fc2_latent_proj"), latent, hidden, false)?,
            )),
            None => None,
        };
        let all_sum = w.tensor_parallel().cloned();
        if let (Some(g), true) = (&all_sum, s.zero_experts > 0) {
            return Err(Error::TensorParallel {
                ranks: g.size(),
                what: w.full_name("gate"),
                message: "zero-computation experts have no tensor-parallel form".into(),
            });
        }
        Ok(SparseMoe {
            all_sum,
            router: Router::load(&w.pp("gate"), hidden, &s.router)?,
            latent_proj,
            experts: ExpertMlps::load(&w.pp("switch_mlp"), s.latent_size.unwrap_or(hidden), s)?,
            shared_expert,
            shared_expert_gate,
            settings: s.clone(),
        })
    }

    /// The block's output for `x` (`[batch, tokens, hidden]`); records `mlp.out`.
    pub fn forward(&self, x: &Array, tap: &mut Tap) -> Result<Array> {
        let shape = x.shape().to_vec();
        let flat = x.reshape(&[-1, x.dim(-1)])?;
        let (indices, weights) = self.router.route(&flat)?;
        let weights = weights.as_dtype(x.dtype())?.expand_dims(-1)?;
        let inputs = match &self.latent_proj {
            Some((fc1, _)) => fc1.forward(&flat)?,
            None => flat.clone(),
        };
        let routed = match self.settings.router.scoring {
            Scoring::SigmoidOnInput => {
                // Each pick's weight scales the expert's input: `[tokens, k, width]`.
                let scaled = inputs.expand_dims(1)?.multiply(&weights)?;
                let k = indices.dim(1);
                let out = self.experts.forward(
                    &scaled.reshape(&[-1, inputs.dim(-1)])?,
                    &indices.reshape(&[-1, 1])?,
                )?;
                out.reshape(&[-1, k, inputs.dim(-1)])?.sum_axis(1, None)?
            }
            _ if self.settings.zero_experts > 0 => {
                // Zero-computation experts pass the token through.
                let computing = self.settings.computing_experts();
                let last = Array::from_int(computing - 1).as_dtype(indices.dtype())?;
                let outputs = self
                    .experts
                    .forward(&inputs, &ops::minimum(&indices, &last)?)?;
                let passes = indices.gt(&last)?;
                ops::select(passes.expand_dims(-1)?, inputs.expand_dims(1)?, &outputs)?
                    .multiply(&weights)?
                    .sum_axis(1, None)?
            }
            _ => self
                .experts
                .forward(&inputs, &indices)?
                .multiply(&weights)?
                .sum_axis(1, None)?,
        };
        let routed = match &self.all_sum {
            Some(g) => g.all_sum(&routed)?,
            None => routed,
        };
        let routed = match &self.latent_proj {
            Some((_, fc2)) => fc2.forward(&routed)?,
            None => routed,
        };
        let out = match &self.shared_expert {
            Some(shared) => {
                let mut shared_out = shared.forward(&flat, &mut Tap::off())?;
                if let Some(gate) = &self.shared_expert_gate {
                    shared_out = ops::sigmoid(&gate.forward(&flat)?)?.multiply(&shared_out)?;
                }
                let sum = routed.add(&shared_out)?;
                match self.settings.shared_expert.as_ref().map(|s| s.join) {
                    Some(SharedJoin::Average) => sum.multiply(&scalar_like(0.5, &sum)?)?,
                    _ => sum,
                }
            }
            None => routed,
        };
        let out = out.reshape(&shape)?;
        tap.record("mlp.out", &out);
        Ok(out)
    }

    /// Parameters of the experts a token is not routed to.
    pub fn inactive_parameters(&self, hidden: i32) -> usize {
        let s = &self.settings;
        let projections = if s.activation.gated() { 3 } else { 2 };
        let width = s.latent_size.unwrap_or(hidden) as usize;
        let per_expert = projections * width * s.intermediate_size as usize;
        let idle = (s.computing_experts() - s.router.top_k).max(0) as usize;
        per_expert * idle
    }

    /// The quantization of the experts, if any.
    pub fn quantization(&self) -> Option<Quantization> {
        self.experts.up_proj.quantization()
    }
}

/// Stacks per-expert tensors into the layout [`SparseMoe`] loads: for every name
/// `<prefix>.<experts>.<i>.<proj>.<rest>` with `proj` a key of `projections`, all experts
/// `0..num_experts` of one `(prefix, proj, rest)` become `<prefix>.switch_mlp.<new>.<rest>`
/// (`[experts, …]`), `new` being `projections[proj]`. `experts` is the container's name
/// (`experts`). A missing expert is an error naming it.
pub fn stack_experts(
    weights: &mut Weights,
    experts: &str,
    num_experts: i32,
    projections: &[(&str, &str)],
) -> Result<()> {
    // (prefix, proj, rest) → expert index → name.
    let mut groups: BTreeMap<(String, String, String), BTreeMap<i32, String>> = BTreeMap::new();
    let marker = format!(".{experts}.");
    for name in weights.names() {
        let Some(at) = name.find(&marker) else {
            continue;
        };
        let (prefix, tail) = (&name[..at], &name[at + marker.len()..]);
        let mut parts = tail.splitn(3, '.');
        let (Some(index), Some(proj), Some(rest)) = (parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        let (Ok(index), Some((_, new))) = (
            index.parse::<i32>(),
            projections.iter().find(|(old, _)| *old == proj),
        ) else {
            continue;
        };
        groups
            .entry((prefix.to_owned(), (*new).to_owned(), rest.to_owned()))
            .or_default()
            .insert(index, name.to_owned());
    }
    for ((prefix, proj, rest), members) in groups {
        let mut names = Vec::with_capacity(members.len());
        for index in 0..num_experts {
            let name = members.get(&index).ok_or_else(|| Error::MissingWeight {
                path: weights.source().to_path_buf(),
                name: format!("{prefix}.{experts}.{index}.<{proj}>.{rest}"),
            })?;
            names.push(name.clone());
        }
        if let Some((&index, name)) = members.range(num_experts..).next() {
            return Err(Error::UnexpectedWeights {
                path: weights.source().to_path_buf(),
                names: vec![format!("{name} (expert {index} of {num_experts})")],
            });
        }
        weights.stack(format!("{prefix}.switch_mlp.{proj}.{rest}"), &names)?;
    }
    Ok(())
}

/// Splits Transformers 5's fused expert tensors (`<prefix>.experts.gate_up_proj`,
/// `[experts, 2·inter, hidden]`, gate rows first, and `<prefix>.experts.down_proj`,
/// `[experts, hidden, inter]`) into the layout [`SparseMoe`] loads.
pub fn split_fused_experts(weights: &mut Weights) -> Result<()> {
    let fused: Vec<String> = weights
        .names()
        .filter(|n| n.ends_with(".experts.gate_up_proj") || n.ends_with(".experts.down_proj"))
        .map(str::to_owned)
        .collect();
    for name in fused {
        let prefix = name[..name.rfind(".experts.").expect("filtered above")].to_owned();
        let tensor = weights.remove(&name).expect("listed above");
        if name.ends_with("down_proj") {
            weights.insert(format!("{prefix}.switch_mlp.down_proj.weight"), tensor);
            continue;
        }
        if tensor.ndim() != 3 {
            return Err(Error::WeightShape {
                path: weights.source().to_path_buf(),
                name,
                expected: vec![-1, -1, -1],
                actual: tensor.shape().to_vec(),
            });
        }
        let (gate, up) = gate_and_up(weights, name, &tensor, 1)?;
        weights.insert(format!("{prefix}.switch_mlp.gate_proj.weight"), gate);
        weights.insert(format!("{prefix}.switch_mlp.up_proj.weight"), up);
    }
    Ok(())
}

/// The gate and up halves of a fused projection's tensor along `axis` (gate first), or a
/// shape error naming it where that axis is missing or odd.
fn gate_and_up(
    weights: &Weights,
    name: String,
    tensor: &Array,
    axis: usize,
) -> Result<(Array, Array)> {
    let rows = tensor.shape().get(axis).copied().unwrap_or(0);
    if rows == 0 || rows % 2 != 0 {
        let mut expected = vec![-1; tensor.ndim().max(axis + 1)];
        expected[axis] = 2 * (rows / 2).max(1);
        return Err(Error::WeightShape {
            path: weights.source().to_path_buf(),
            name,
            expected,
            actual: tensor.shape().to_vec(),
        });
    }
    let parts = tensor.split_equal(2, axis as i32)?;
    Ok((parts[0].clone(), parts[1].clone()))
}

/// Splits every fused shared expert `<prefix>.shared_expert.gate_up_proj.*` (one linear
/// layer whose rows are the gate, then the up projection: Granite's `shared_mlp.input_linear`
/// once renamed) into the `gate_proj` and `up_proj` [`SparseMoe`] loads. Quantized
/// checkpoints' `scales` and `biases` split by rows like the packed weight.
///
/// ```
/// use mlx_models::moe::split_fused_shared_expert;
/// use mlx_models::weights::Weights;
/// use mlx_rs::Array;
/// use std::collections::HashMap;
///
/// let fused = Array::from_slice(&[1.0f32, 2.0, 3.0, 4.0], &[4, 1]);
/// let name = "model.layers.0.mlp.shared_expert.gate_up_proj.weight";
/// let mut weights = Weights::new(HashMap::from([(name.to_owned(), fused)]), "model");
/// split_fused_shared_expert(&mut weights).unwrap();
/// let gate = weights.remove("model.layers.0.mlp.shared_expert.gate_proj.weight").unwrap();
/// assert_eq!(gate.as_slice::<f32>(), &[1.0, 2.0]);
/// let up = weights.remove("model.layers.0.mlp.shared_expert.up_proj.weight").unwrap();
/// assert_eq!(up.as_slice::<f32>(), &[3.0, 4.0]);
/// ```
pub fn split_fused_shared_expert(weights: &mut Weights) -> Result<()> {
    const FUSED: &str = ".shared_expert.gate_up_proj.";
    let fused: Vec<String> = weights
        .names()
        .filter(|n| n.contains(FUSED))
        .map(str::to_owned)
        .collect();
    for name in fused {
        let (prefix, part) = name.split_once(FUSED).expect("filtered above");
        let (prefix, part) = (prefix.to_owned(), part.to_owned());
        let tensor = weights.remove(&name).expect("listed above");
        let (gate, up) = gate_and_up(weights, name, &tensor, 0)?;
        weights.insert(format!("{prefix}.shared_expert.gate_proj.{part}"), gate);
        weights.insert(format!("{prefix}.shared_expert.up_proj.{part}"), up);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic numbers in [-1, 1).
    fn numbers(seed: u64, n: usize) -> Vec<f32> {
        let mut state = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (0..n)
            .map(|_| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    fn array(seed: u64, shape: &[i32]) -> (Vec<f32>, Array) {
        let data = numbers(seed, shape.iter().product::<i32>() as usize);
        let a = Array::from_slice(&data, shape);
        (data, a)
    }

    fn silu(x: f32) -> f32 {
        x / (1.0 + (-x).exp())
    }

    /// `w[e] @ x` for a row-major `[experts, out, in]` tensor.
    fn matvec(w: &[f32], e: usize, out: usize, inp: usize, x: &[f32]) -> Vec<f32> {
        (0..out)
            .map(|o| {
                (0..inp)
                    .map(|i| w[(e * out + o) * inp + i] * x[i])
                    .sum::<f32>()
            })
            .collect()
    }

    fn linear(
        w: &[f32],
        bias: Option<&[f32]>,
        e: usize,
        out: usize,
        inp: usize,
        x: &[f32],
    ) -> Vec<f32> {
        let mut y = matvec(w, e, out, inp, x);
        if let Some(b) = bias {
            for (o, v) in y.iter_mut().enumerate() {
                *v += b[e * out + o];
            }
        }
        y
    }

    #[test]
    fn fused_experts_of_the_wrong_rank_are_a_shape_error_not_a_panic() {
        for shape in [&[6][..], &[2, 6], &[2, 5, 3]] {
            let name = "model.layers.0.mlp.experts.gate_up_proj";
            let (_, t) = array(2, shape);
            let mut weights = Weights::new(
                std::collections::HashMap::from([(name.to_owned(), t)]),
                "ckpt",
            );
            match split_fused_experts(&mut weights) {
                Err(Error::WeightShape {
                    name: n, actual, ..
                }) => {
                    assert_eq!(n, name);
                    assert_eq!(actual, shape);
                }
                other => panic!("{shape:?}: expected a shape error, got {other:?}"),
            }
        }
    }

    #[test]
    fn a_fused_shared_expert_of_odd_rows_is_a_shape_error_naming_it() {
        let name = "model.layers.3.mlp.shared_expert.gate_up_proj.weight";
        let (_, odd) = array(1, &[5, 2]);
        let mut weights = Weights::new(
            std::collections::HashMap::from([(name.to_owned(), odd)]),
            "ckpt",
        );
        match split_fused_shared_expert(&mut weights) {
            Err(Error::WeightShape {
                name: n, actual, ..
            }) => {
                assert_eq!(n, name);
                assert_eq!(actual, vec![5, 2]);
            }
            other => panic!("expected a shape error, got {other:?}"),
        }
    }

    const E: usize = 6;
    const H: usize = 8;
    const I: usize = 4;

    struct Experts {
        gate: Vec<f32>,
        up: Vec<f32>,
        down: Vec<f32>,
        biases: Option<[Vec<f32>; 3]>,
        mlps: ExpertMlps,
    }

    fn experts(activation: ExpertActivation, bias: bool) -> Experts {
        let (gate, gate_a) = array(1, &[E as i32, I as i32, H as i32]);
        let (up, up_a) = array(2, &[E as i32, I as i32, H as i32]);
        let (down, down_a) = array(3, &[E as i32, H as i32, I as i32]);
        let b = |seed, out: usize| array(seed, &[E as i32, out as i32]);
        let biases = bias.then(|| [b(4, I), b(5, I), b(6, H)]);
        let lin = |w: Array, b: Option<Array>| ExpertLinear {
            weight: ExpertMatrix::Dense(w),
            bias: b,
        };
        let ab = |k: usize| biases.as_ref().map(|bs| bs[k].1.clone());
        Experts {
            mlps: ExpertMlps {
                gate_proj: activation.gated().then(|| lin(gate_a, ab(0))),
                up_proj: lin(up_a, ab(1)),
                down_proj: lin(down_a, ab(2)),
                activation,
                experts: None,
            },
            gate,
            up,
            down,
            biases: biases.map(|bs| [bs[0].0.clone(), bs[1].0.clone(), bs[2].0.clone()]),
        }
    }

    impl Experts {
        fn reference(&self, x: &[f32], e: usize) -> Vec<f32> {
            let b = |k: usize| self.biases.as_ref().map(|bs| bs[k].as_slice());
            let g = linear(&self.gate, b(0), e, I, H, x);
            let u = linear(&self.up, b(1), e, I, H, x);
            let h: Vec<f32> = g
                .iter()
                .zip(&u)
                .map(|(&g, &u)| match self.mlps.activation {
                    ExpertActivation::Glu(_) => silu(g) * u,
                    ExpertActivation::Plain(_) => u.max(0.0) * u.max(0.0),
                    ExpertActivation::ClampedSwiglu { alpha, limit } => {
                        let g = g.min(limit);
                        let u = u.clamp(-limit, limit);
                        (u + 1.0) * g / (1.0 + (-alpha * g).exp())
                    }
                })
                .collect();
            linear(&self.down, b(2), e, H, I, &h)
        }

        /// Checks the gathered outputs of `tokens` tokens against a per-pair loop.
        fn check(&self, tokens: usize, k: usize) {
            let (x, x_a) = array(7, &[tokens as i32, H as i32]);
            let ids: Vec<i32> = (0..tokens * k)
                .map(|j| ((j * 5 + j / k) % E) as i32)
                .collect();
            let idx = Array::from_slice(&ids, &[tokens as i32, k as i32]);
            let out = self.mlps.forward(&x_a, &idx).unwrap();
            assert_eq!(out.shape(), &[tokens as i32, k as i32, H as i32]);
            let got = out.as_slice::<f32>().to_vec();
            for t in 0..tokens {
                for j in 0..k {
                    let expected = self.reference(&x[t * H..(t + 1) * H], ids[t * k + j] as usize);
                    for h in 0..H {
                        let g = got[(t * k + j) * H + h];
                        assert!(
                            (g - expected[h]).abs() < 1e-5,
                            "token {t} pick {j} feature {h}: {g} vs {}",
                            expected[h]
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn experts_match_a_per_token_loop_sorted_and_not() {
        let e = experts(ExpertActivation::Glu(Activation::Silu), false);
        e.check(5, 2); // 10 pairs: gathered in token order
        e.check(40, 3); // 120 pairs: sorted by expert first
    }

    #[test]
    fn plain_relu2_experts_have_no_gate() {
        let e = experts(ExpertActivation::Plain(Activation::Relu2), false);
        assert!(e.mlps.gate_proj.is_none());
        e.check(5, 2);
        e.check(40, 3);
    }

    #[test]
    fn clamped_swiglu_experts_with_biases() {
        let e = experts(
            ExpertActivation::ClampedSwiglu {
                alpha: 1.702,
                limit: 0.5,
            },
            true,
        );
        e.check(3, 2);
        e.check(33, 2);
    }

    #[test]
    fn quantized_experts_equal_their_dequantized_weights() {
        let (_, w) = array(11, &[E as i32, 16, 64]);
        let (wq, scales, biases) = ops::quantize(&w, 32, 4).unwrap();
        let dense = ops::dequantize(&wq, &scales, &biases, 32, 4).unwrap();
        let quantized = ExpertLinear {
            weight: ExpertMatrix::Quantized {
                weight: wq,
                scales,
                biases,
                quantization: Quantization {
                    bits: 4,
                    group_size: 32,
                },
            },
            bias: None,
        };
        let plain = ExpertLinear {
            weight: ExpertMatrix::Dense(dense),
            bias: None,
        };
        let (_, x) = array(12, &[3, 1, 1, 64]);
        let idx = Array::from_slice(&[0i32, 5, 2, 2, 4, 1], &[3, 2]);
        let a = quantized.forward(&x, &idx, false).unwrap();
        let b = plain.forward(&x, &idx, false).unwrap();
        let d = a.subtract(&b).unwrap().abs().unwrap().max(None).unwrap();
        assert!(d.item_exact::<f32>() < 1e-4, "max |Δ| = {d:?}");
    }

    fn router(scoring: Scoring, weight: &Array) -> Router {
        Router {
            gate: Linear {
                weight: crate::nn::Matrix::Dense(weight.clone()),
                bias: None,
                combine: crate::nn::Combine::None,
            },
            correction_bias: None,
            settings: RouterSettings {
                scoring,
                ..RouterSettings::new(weight.dim(0), 2)
            },
        }
    }

    /// Routes one token whose logits are `logits` (identity gate over one-hot input).
    fn route(mut r: Router, logits: &[f32]) -> (Vec<i32>, Vec<f32>) {
        let n = logits.len() as i32;
        let eye = ops::eye::<f32>(n, None, None).unwrap();
        r.gate.weight = crate::nn::Matrix::Dense(eye);
        let x = Array::from_slice(logits, &[1, n]);
        let (idx, w) = r.route(&x).unwrap();
        let idx = idx.as_dtype(Dtype::Int32).unwrap();
        let mut pairs: Vec<(i32, f32)> = idx
            .as_slice::<i32>()
            .iter()
            .copied()
            .zip(w.as_slice::<f32>().iter().copied())
            .collect();
        pairs.sort_by_key(|p| p.0);
        pairs.into_iter().unzip()
    }

    fn softmax(v: &[f64]) -> Vec<f64> {
        let m = v.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let e: Vec<f64> = v.iter().map(|x| (x - m).exp()).collect();
        let s: f64 = e.iter().sum();
        e.iter().map(|x| x / s).collect()
    }

    #[test]
    fn softmax_routers_with_and_without_renormalisation() {
        let logits = [0.3f32, -1.0, 2.0, 1.5, 0.0, -0.2];
        let probs = softmax(&logits.map(f64::from));
        let eye = ops::eye::<f32>(6, None, None).unwrap();
        let (idx, w) = route(router(Scoring::Softmax, &eye), &logits);
        assert_eq!(idx, vec![2, 3]);
        assert!((f64::from(w[0]) - probs[2]).abs() < 1e-6);
        assert!((f64::from(w[1]) - probs[3]).abs() < 1e-6);
        let mut r = router(Scoring::Softmax, &eye);
        r.settings.normalize = true;
        let (_, w) = route(r, &logits);
        let sum = probs[2] + probs[3];
        assert!((f64::from(w[0]) - probs[2] / sum).abs() < 1e-6);
        assert!((f64::from(w[1]) - probs[3] / sum).abs() < 1e-6);
    }

    #[test]
    fn grouped_sigmoid_router_with_correction_bias_and_scaling() {
        // Groups {0,1,2}, {3,4,5}: the second group holds the best single expert by bias
        // (5), but the first group's two best scores sum higher.
        let logits = [1.0f32, 0.9, -3.0, -0.5, -3.0, -1.0];
        let bias = [0.0f32, 0.0, 0.0, 0.0, 0.0, 3.0];
        let eye = ops::eye::<f32>(6, None, None).unwrap();
        let mut r = router(Scoring::Sigmoid, &eye);
        r.correction_bias = Some(Array::from_slice(&bias, &[6]));
        r.settings.correction_bias = true;
        r.settings.normalize = true;
        r.settings.scaling_factor = Some(2.5);
        let sigmoid = |x: f32| 1.0 / (1.0 + (-f64::from(x)).exp());
        // Without groups, expert 5 wins through its bias.
        let (idx, _) = route(r.clone(), &logits);
        assert_eq!(idx, vec![0, 5]);
        // Group scores (top-2 sums of score + bias): {0,1,2}: s0 + s1, {3,4,5}: s5 + 3 + s3.
        r.settings.groups = Some(ExpertGroups {
            groups: 2,
            top_groups: 1,
            score: GroupScore::TopTwoSum,
        });
        let g1 = sigmoid(logits[0]) + sigmoid(logits[1]);
        let g2 = sigmoid(logits[5]) + 3.0 + sigmoid(logits[3]);
        assert!(g2 > g1, "the biased group wins the group vote");
        let (idx, w) = route(r.clone(), &logits);
        assert_eq!(idx, vec![3, 5]);
        let (s3, s5) = (sigmoid(logits[3]), sigmoid(logits[5]));
        assert!((f64::from(w[0]) - 2.5 * s3 / (s3 + s5)).abs() < 1e-6);
        assert!((f64::from(w[1]) - 2.5 * s5 / (s3 + s5)).abs() < 1e-6);
    }

    /// Phi-3.5-MoE's sparsemixer for one token, in f64, as Transformers writes it.
    fn sparse_mixer_reference(logits: &[f64], eps: f64) -> Vec<(usize, f64)> {
        let pick = |scores: &[f64]| {
            let (top_i, top) =
                scores
                    .iter()
                    .cloned()
                    .enumerate()
                    .fold(
                        (0, f64::NEG_INFINITY),
                        |a, (i, v)| if v > a.1 { (i, v) } else { a },
                    );
            let masked: Vec<f64> = scores
                .iter()
                .zip(logits)
                .map(|(&s, &l)| {
                    let factor = l.abs().max(top);
                    if (top - s) / factor > 2.0 * eps {
                        f64::NEG_INFINITY
                    } else {
                        s
                    }
                })
                .collect();
            (top_i, softmax(&masked)[top_i])
        };
        let first = pick(logits);
        let mut rest = logits.to_vec();
        rest[first.0] = f64::NEG_INFINITY;
        let second = pick(&rest);
        vec![first, second]
    }

    #[test]
    fn sparse_mixer_matches_its_definition() {
        let eye = ops::eye::<f32>(6, None, None).unwrap();
        for logits in [
            [0.30f32, 0.29, 2.0, 1.95, 0.0, -0.2],
            [1.0, 1.01, 0.99, -2.0, 0.5, 1.005],
            [-0.5, -0.45, -0.7, -0.1, -0.11, -3.0],
        ] {
            let r = router(Scoring::SparseMixer { jitter_eps: 0.01 }, &eye);
            let (idx, w) = route(r, &logits);
            let mut expected = sparse_mixer_reference(&logits.map(f64::from), 0.01);
            expected.sort_by_key(|p| p.0);
            for (j, (i, weight)) in expected.iter().enumerate() {
                assert_eq!(idx[j] as usize, *i, "{logits:?}");
                assert!(
                    (f64::from(w[j]) - weight).abs() < 1e-6,
                    "{logits:?}: {w:?} vs {expected:?}"
                );
            }
        }
    }

    /// A block of 4 experts (2 per token) and a shared expert, with `join`, on random
    /// weights of seed 3, applied to 5 random tokens.
    fn shared_block_output(join: Option<SharedJoin>) -> Vec<f32> {
        let (h, width, experts) = (8, 6, 4);
        let mut tensors = std::collections::HashMap::new();
        let mut put = |name: &str, shape: &[i32], seed: u64| {
            tensors.insert(name.to_owned(), array(seed, shape).1);
        };
        put("gate.weight", &[experts, h], 1);
        put("switch_mlp.gate_proj.weight", &[experts, width, h], 2);
        put("switch_mlp.up_proj.weight", &[experts, width, h], 3);
        put("switch_mlp.down_proj.weight", &[experts, h, width], 4);
        if join.is_some() {
            put("shared_expert.gate_proj.weight", &[width, h], 5);
            put("shared_expert.up_proj.weight", &[width, h], 6);
            put("shared_expert.down_proj.weight", &[h, width], 7);
        }
        let weights = Weights::new(tensors, "ckpt");
        let settings = MoeSettings {
            router: RouterSettings::new(experts, 2),
            intermediate_size: width,
            activation: ExpertActivation::Glu(Activation::Silu),
            expert_bias: false,
            zero_experts: 0,
            latent_size: None,
            shared_expert: join.map(|join| SharedExpertSettings {
                intermediate_size: width,
                gated: false,
                bias: false,
                join,
            }),
        };
        let block = SparseMoe::load(&weights.root(), h, &settings).unwrap();
        let (_, x) = array(8, &[1, 5, h]);
        let out = block.forward(&x, &mut Tap::off()).unwrap();
        out.as_slice::<f32>().to_vec()
    }

    #[test]
    fn a_shared_expert_joins_by_sum_or_average() {
        let routed = shared_block_output(None);
        let sum = shared_block_output(Some(SharedJoin::Sum));
        let average = shared_block_output(Some(SharedJoin::Average));
        let shared: Vec<f32> = sum.iter().zip(&routed).map(|(s, r)| s - r).collect();
        assert!(
            shared.iter().any(|v| v.abs() > 1e-2),
            "the shared expert adds something"
        );
        for ((a, r), s) in average.iter().zip(&routed).zip(&shared) {
            assert!((a - (r + s) / 2.0).abs() < 1e-6, "{a} vs ({r} + {s}) / 2");
        }
    }

    #[test]
    fn stacking_per_expert_tensors_names_a_missing_expert() {
        let t = |v: f32| Array::from_slice(&[v, v], &[1, 2]);
        let mut tensors = std::collections::HashMap::new();
        for e in 0..3 {
            tensors.insert(
                format!("model.layers.0.mlp.experts.{e}.w1.weight"),
                t(e as f32),
            );
        }
        tensors.insert("model.layers.0.mlp.gate.weight".to_owned(), t(9.0));
        let mut weights = Weights::new(tensors.clone(), "test");
        stack_experts(&mut weights, "experts", 3, &[("w1", "gate_proj")]).unwrap();
        let mut names: Vec<&str> = weights.names().collect();
        names.sort();
        assert_eq!(
            names,
            [
                "model.layers.0.mlp.gate.weight",
                "model.layers.0.mlp.switch_mlp.gate_proj.weight"
            ]
        );
        let stacked = weights
            .remove("model.layers.0.mlp.switch_mlp.gate_proj.weight")
            .unwrap();
        assert_eq!(stacked.shape(), &[3, 1, 2]);
        assert_eq!(stacked.as_slice::<f32>(), &[0.0, 0.0, 1.0, 1.0, 2.0, 2.0]);

        let mut weights = Weights::new(tensors, "test");
        let err = stack_experts(&mut weights, "experts", 4, &[("w1", "gate_proj")]).unwrap_err();
        assert!(err.to_string().contains("experts.3"), "{err}");
    }
}
