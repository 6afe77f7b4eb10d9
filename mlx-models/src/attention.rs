//! Attention: scaled dot-product attention and its masks, and the attention block of a
//! decoder layer (q/k/v projections, optional q/k norms, RoPE, the layer's KV cache, the
//! output projection), in the variants the families use.

use crate::alibi::Alibi;
use crate::cache::KvCache;
use crate::differential::Differential;
use crate::error::{Error, Result};
use crate::nn::{scalar_like, softcap, Linear, Split};
use crate::norm::{norm_opt, Norm, NormKind};
use crate::rope::Rope;
use crate::tap::Tap;
use crate::weights::{Part, WeightPath};
use mlx_rs::fast::ScaledDotProductAttentionMask;
use mlx_rs::{ops, Array, Dtype};
use std::ops::Range;

/// Which keys each query may see.
#[derive(Debug, Clone)]
pub enum AttentionMask {
    /// Every cached key (a single new token).
    None,
    /// Keys up to the query's own position.
    Causal,
    /// An additive mask `[queries, keys]` (0 or -inf), e.g. for sliding windows.
    Additive(Array),
}

impl AttentionMask {
    /// The mask for `len` new tokens after `offset` cached ones, optionally limited to a
    /// sliding window of `window` tokens (a query sees itself and `window - 1` before it).
    pub fn new(len: i32, offset: i32, window: Option<i32>, dtype: Dtype) -> Result<Self> {
        let total = offset + len;
        match window {
            Some(w) if total > w => {
                let mut data = Vec::with_capacity((len * total) as usize);
                for q in 0..len {
                    let pos = offset + q;
                    for k in 0..total {
                        let visible = k <= pos && pos - k < w;
                        data.push(if visible { 0.0f32 } else { f32::NEG_INFINITY });
                    }
                }
                let mask = Array::from_slice(&data, &[len, total]).as_dtype(dtype)?;
                Ok(AttentionMask::Additive(mask))
            }
            _ if len == 1 => Ok(AttentionMask::None),
            _ => Ok(AttentionMask::Causal),
        }
    }

    /// An additive mask for `len` queries at positions `first_query..` over `keys` keys at
    /// positions `first_key..`, where query position `q` sees key position `k` exactly when
    /// `visible(q, k)`.
    pub fn from_visibility(
        len: i32,
        first_query: i32,
        keys: i32,
        first_key: i32,
        dtype: Dtype,
        visible: impl Fn(i32, i32) -> bool,
    ) -> Result<Self> {
        let mut data = Vec::with_capacity((len * keys) as usize);
        for q in first_query..first_query + len {
            for k in first_key..first_key + keys {
                data.push(if visible(q, k) {
                    0.0f32
                } else {
                    f32::NEG_INFINITY
                });
            }
        }
        let mask = Array::from_slice(&data, &[len, keys]).as_dtype(dtype)?;
        Ok(AttentionMask::Additive(mask))
    }
}

/// `softmax(q kᵀ · scale + mask) v` over `[batch, heads, tokens, head_dim]`, with fewer
/// key/value heads than query heads allowed (grouped-query attention).
pub fn scaled_dot_product_attention(
    queries: &Array,
    keys: &Array,
    values: &Array,
    scale: f32,
    mask: &AttentionMask,
) -> Result<Array> {
    attention_with_sinks(queries, keys, values, scale, mask, None)
}

/// [`scaled_dot_product_attention`] where each head's softmax also has a learned "sink"
/// logit (`sinks`, `[heads]`) in its denominator that attends to nothing (gpt-oss).
pub fn attention_with_sinks(
    queries: &Array,
    keys: &Array,
    values: &Array,
    scale: f32,
    mask: &AttentionMask,
    sinks: Option<&Array>,
) -> Result<Array> {
    let mask = match mask {
        AttentionMask::None => None,
        AttentionMask::Causal => Some(ScaledDotProductAttentionMask::Causal),
        AttentionMask::Additive(m) => Some(ScaledDotProductAttentionMask::Array(m)),
    };
    Ok(mlx_rs::fast::scaled_dot_product_attention(
        queries, keys, values, scale, mask, sinks,
    )?)
}

/// How the query/key/value projections are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QkvLayout {
    /// `q_proj`, `k_proj`, `v_proj`.
    Separate,
    /// One `qkv_proj` whose output rows are q, then k, then v (Phi-3).
    Fused,
}

/// Where queries and keys are RMS-normalized.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QkNorm {
    None,
    /// Over each head's `head_dim` features (`q_norm`/`k_norm` of width `head_dim`: Qwen3, Gemma 3).
    PerHead,
    /// Over the whole projection (`q_norm` of width `heads * head_dim`: OLMo 2).
    Projection,
    /// Over each head's features, after RoPE (Hunyuan).
    PerHeadAfterRope,
    /// `x / rms(x)` without a weight over each head's features, after RoPE, on the layers
    /// that have RoPE (Llama 4).
    L2AfterRope,
}

/// An attention temperature that grows with the position: queries at position `p` are
/// scaled by `log(1 + floor((p + position_offset) / floor_scale)) · attn_scale + 1`, after
/// RoPE. Llama 4 scales the layers without RoPE, counting from 1 (`position_offset` 1);
/// Ministral 3 every layer, from 0 (`llama_4_scaling_beta` as `attn_scale`, the RoPE's
/// `original_max_position_embeddings` as `floor_scale`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TemperatureTuning {
    pub floor_scale: f32,
    pub attn_scale: f32,
    pub position_offset: f32,
    /// Also on the layers with RoPE (else only on those without).
    pub all_layers: bool,
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
    /// A learned sink logit per head in the softmax's denominator (`sinks`, gpt-oss).
    pub sinks: bool,
    /// Clamps q, k and v to `[-c, c]` after their projections (and a q/k norm over the
    /// projection) (OLMoE's `clip_qkv`).
    pub clip_qkv: Option<f32>,
    /// Query temperature on the layers without RoPE (Llama 4).
    pub temperature_tuning: Option<TemperatureTuning>,
    /// The epsilon of [`QkNorm::L2AfterRope`].
    pub qk_norm_eps: f32,
    /// `q_proj` also gives a gate per head (`[query | gate]` per head) and the attention
    /// output is multiplied by its sigmoid (Qwen3-Next).
    pub output_gate: bool,
    /// A projection of its own, `gate_proj` (`[heads · head_dim, hidden]`, no bias), gives
    /// that gate from the block's input (AFMoE).
    pub gate_proj: bool,
    /// Differential attention (DiffLlama): two softmaxes over the same scores combined by a
    /// learned λ per layer ([`crate::differential`]).
    pub differential: bool,
    /// Linear position biases on the scores instead of RoPE (BLOOM, MPT; see [`crate::alibi`]).
    pub alibi: Option<AlibiSettings>,
}

/// ALiBi's settings: the slopes' `max_bias` (MPT's `alibi_bias_max`; 8 for BLOOM) and a
/// factor on every slope (1, or the attention scale where a model scales the biased
/// scores).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AlibiSettings {
    pub max_bias: f32,
    pub factor: f32,
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
            sinks: false,
            clip_qkv: None,
            temperature_tuning: None,
            qk_norm_eps: 1e-6,
            output_gate: false,
            gate_proj: false,
            differential: false,
            alibi: None,
        }
    }
}

/// The heads one rank of a tensor-parallel group computes: an equal share of the query
/// heads, and of the key/value heads — or, when there are fewer key/value heads than ranks,
/// the one key/value head its query heads read (held by several ranks).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeadShare {
    pub heads: Range<i32>,
    pub kv_heads: Range<i32>,
}

impl HeadShare {
    /// The share of rank `rank` of `ranks` (a typed error when the heads do not divide).
    pub fn new(num_heads: i32, num_kv_heads: i32, rank: i32, ranks: i32) -> Result<HeadShare> {
        let refuse = |what: &str, message: String| Error::TensorParallel {
            ranks,
            what: what.to_owned(),
            message,
        };
        if num_heads % ranks != 0 {
            return Err(refuse(
                "num_attention_heads",
                format!("{num_heads} query heads do not divide over {ranks} ranks"),
            ));
        }
        if num_kv_heads % ranks != 0 && ranks % num_kv_heads != 0 {
            return Err(refuse(
                "num_key_value_heads",
                format!(
                    "{num_kv_heads} key/value heads neither divide over {ranks} ranks nor \
                     divide them"
                ),
            ));
        }
        let per_rank = num_heads / ranks;
        let kv_per_rank = (num_kv_heads / ranks).max(1);
        let first_kv = rank * num_kv_heads / ranks;
        Ok(HeadShare {
            heads: rank * per_rank..(rank + 1) * per_rank,
            kv_heads: first_kv..first_kv + kv_per_rank,
        })
    }
}

fn scaled(r: &Range<i32>, by: i32, offset: i32) -> Range<i32> {
    offset + r.start * by..offset + r.end * by
}

/// The q/k/v projections as the checkpoint stores them.
#[derive(Debug, Clone)]
pub enum Qkv {
    Separate {
        q_proj: Linear,
        k_proj: Linear,
        v_proj: Linear,
    },
    Fused {
        qkv_proj: Linear,
    },
}

impl Qkv {
    /// The first projection's weight matrix (to tell a model's quantization).
    pub fn first(&self) -> &Linear {
        match self {
            Qkv::Separate { q_proj, .. } => q_proj,
            Qkv::Fused { qkv_proj } => qkv_proj,
        }
    }
}

/// The attention block of a decoder layer: projections, q/k norms, RoPE (or none), the
/// layer's KV cache (whose kind decides which keys each query sees) and `o_proj`.
#[derive(Debug, Clone)]
pub struct Attention {
    pub qkv: Qkv,
    pub o_proj: Linear,
    pub q_norm: Option<Norm>,
    pub k_norm: Option<Norm>,
    /// Per-head sink logits (`sinks`, gpt-oss).
    pub sinks: Option<Array>,
    /// A norm of the attention output before `o_proj` (BitNet's `attn_sub_norm`).
    pub sub_norm: Option<Norm>,
    /// The output gate's own projection ([`AttentionSettings::gate_proj`]).
    pub gate_proj: Option<Linear>,
    /// Differential attention's λ of this layer (DiffLlama), set by the model that loads it
    /// (λ depends on the layer's depth).
    pub differential: Option<Differential>,
    pub rope: Option<Rope>,
    /// This block's heads' ALiBi slopes.
    pub alibi: Option<Alibi>,
    pub settings: AttentionSettings,
}

impl Attention {
    /// Loads the block under `w` for `hidden` input features. `qk_norm` is the norm kind
    /// of `q_norm`/`k_norm` where [`AttentionSettings::qk_norm_kind`] names none, `eps`
    /// their epsilon; `rope` is this layer's (`None`: no positional encoding).
    pub fn load(
        w: &WeightPath,
        hidden: i32,
        s: &AttentionSettings,
        qk_norm: NormKind,
        eps: f64,
        rope: Option<Rope>,
    ) -> Result<Self> {
        let kind = s.qk_norm_kind.unwrap_or(qk_norm);
        let (q_dim, kv_dim) = (s.num_heads * s.head_dim, s.num_kv_heads * s.head_dim);
        let q_rows = if s.output_gate { 2 * q_dim } else { q_dim };
        // Under tensor parallelism: this rank's heads, and how each projection is split.
        let share = match w.tensor_parallel() {
            Some(g) => Some((
                g,
                HeadShare::new(s.num_heads, s.num_kv_heads, g.rank(), g.size())?,
            )),
            None => None,
        };
        if let (Some((g, _)), QkNorm::Projection) = (&share, s.qk_norm) {
            return Err(Error::TensorParallel {
                ranks: g.size(),
                what: w.full_name("q_norm"),
                message: "a q/k norm over the whole projection cannot be split by heads".into(),
            });
        }
        let hd = s.head_dim;
        let per_head_q = if s.output_gate { 2 * hd } else { hd };
        let outputs = |ranges: Vec<Range<i32>>| match &share {
            Some(_) => Split::Outputs(ranges),
            None => Split::Whole,
        };
        let (q_split, kv_split, fused_split, o_split, local) = match &share {
            None => (
                Split::Whole,
                Split::Whole,
                Split::Whole,
                Split::Whole,
                s.clone(),
            ),
            Some((g, share)) => {
                let q = scaled(&share.heads, per_head_q, 0);
                let kv = scaled(&share.kv_heads, hd, 0);
                let mut local = s.clone();
                local.num_heads = share.heads.len() as i32;
                local.num_kv_heads = share.kv_heads.len() as i32;
                (
                    outputs(vec![q.clone()]),
                    outputs(vec![kv.clone()]),
                    outputs(vec![
                        q,
                        scaled(&share.kv_heads, hd, q_dim),
                        scaled(&share.kv_heads, hd, q_dim + kv_dim),
                    ]),
                    Split::Inputs(vec![scaled(&share.heads, hd, 0)], (*g).clone()),
                    local,
                )
            }
        };
        let qkv = match s.qkv_layout {
            QkvLayout::Separate => Qkv::Separate {
                q_proj: Linear::load_split(&w.pp("q_proj"), hidden, q_rows, s.qkv_bias, &q_split)?,
                k_proj: Linear::load_split(&w.pp("k_proj"), hidden, kv_dim, s.qkv_bias, &kv_split)?,
                v_proj: Linear::load_split(&w.pp("v_proj"), hidden, kv_dim, s.qkv_bias, &kv_split)?,
            },
            QkvLayout::Fused => Qkv::Fused {
                qkv_proj: Linear::load_split(
                    &w.pp("qkv_proj"),
                    hidden,
                    q_dim + 2 * kv_dim,
                    s.qkv_bias,
                    &fused_split,
                )?,
            },
        };
        let (q_norm_dim, k_norm_dim) = match s.qk_norm {
            QkNorm::None | QkNorm::L2AfterRope => (None, None),
            QkNorm::PerHead | QkNorm::PerHeadAfterRope => (Some(s.head_dim), Some(s.head_dim)),
            QkNorm::Projection => (Some(q_dim), Some(kv_dim)),
        };
        let norm = |name: &str, dim: Option<i32>| {
            dim.map(|d| Norm::load(&w.pp(name), kind, d, eps))
                .transpose()
        };
        let sinks = match (&share, s.sinks) {
            (_, false) => None,
            (None, true) => Some(w.get("sinks", &[s.num_heads])?),
            (Some((_, share)), true) => {
                Some(w.get_part("sinks", &[s.num_heads], &Part::new(0, share.heads.clone()))?)
            }
        };
        let alibi = match s.alibi {
            Some(a) => {
                let all = Alibi::new(s.num_heads, a.max_bias, a.factor)?;
                Some(match &share {
                    Some((_, share)) => all.heads(share.heads.clone()),
                    None => all,
                })
            }
            None => None,
        };
        let gate_proj = s
            .gate_proj
            .then(|| Linear::load_split(&w.pp("gate_proj"), hidden, q_dim, false, &q_split))
            .transpose()?;
        Ok(Attention {
            qkv,
            gate_proj,
            o_proj: Linear::load_split(&w.pp("o_proj"), q_dim, hidden, s.o_bias, &o_split)?,
            q_norm: norm("q_norm", q_norm_dim)?,
            k_norm: norm("k_norm", k_norm_dim)?,
            sinks,
            sub_norm: None,
            differential: None,
            rope,
            alibi,
            settings: local,
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

    /// Attention of `x` (`[batch, tokens, hidden]`) over what `cache` holds and `x`
    /// itself; `cache` is extended with `x`'s keys and values.
    pub fn forward(&self, x: &Array, cache: &mut KvCache, tap: &mut Tap) -> Result<Array> {
        let s = &self.settings;
        let (batch, len) = (x.dim(0), x.dim(1));
        let (mut q, mut k, mut v) = self.project(x)?;
        let mut gate = None;
        if s.output_gate {
            let per_head = q
                .reshape(&[batch, len, s.num_heads, 2 * s.head_dim])?
                .split_equal(2, -1)?;
            q = per_head[0].reshape(&[batch, len, -1])?;
            gate = Some(per_head[1].reshape(&[batch, len, -1])?);
        }
        if let Some(gate_proj) = &self.gate_proj {
            gate = Some(gate_proj.forward(x)?);
        }
        if s.qk_norm == QkNorm::Projection {
            q = norm_opt(&self.q_norm, &q)?;
            k = norm_opt(&self.k_norm, &k)?;
        }
        if let Some(c) = s.clip_qkv {
            let clip = |t: &Array| -> Result<Array> {
                let (lo, hi) = (scalar_like(-c, t)?, scalar_like(c, t)?);
                Ok(ops::minimum(ops::maximum(t, &lo)?, &hi)?)
            };
            (q, k, v) = (clip(&q)?, clip(&k)?, clip(&v)?);
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
        // Rows of a batch of sequences of different lengths each have their own position.
        let rows = cache.row_offsets();
        let (mut q, mut k) = match (&self.rope, &rows) {
            (Some(rope), Some(rows)) => (rope.apply_rows(&q, rows)?, rope.apply_rows(&k, rows)?),
            (Some(rope), None) => (rope.apply(&q, offset)?, rope.apply(&k, offset)?),
            (None, _) => (q, k),
        };
        if s.qk_norm == QkNorm::PerHeadAfterRope {
            q = norm_opt(&self.q_norm, &q)?;
            k = norm_opt(&self.k_norm, &k)?;
        }
        if s.qk_norm == QkNorm::L2AfterRope && self.rope.is_some() {
            q = mlx_rs::fast::rms_norm(&q, None, s.qk_norm_eps)?;
            k = mlx_rs::fast::rms_norm(&k, None, s.qk_norm_eps)?;
        }
        if let Some(t) = s
            .temperature_tuning
            .filter(|t| t.all_layers || self.rope.is_none())
        {
            let scales = match &rows {
                Some(rows) => {
                    let per_row = rows
                        .iter()
                        .map(|&o| temperature(t, o, len))
                        .collect::<Result<Vec<_>>>()?;
                    ops::stack(&per_row, 0)?.expand_dims(1)?
                }
                None => temperature(t, offset, len)?,
            };
            q = q.multiply(scales.as_dtype(q.dtype())?)?;
        }
        tap.record("self_attn.rope_q", &q);
        tap.record("self_attn.rope_k", &k);

        if self.alibi.is_some() && (cache.window().is_some() || cache.chunk().is_some()) {
            return Err(Error::Mlx(mlx_rs::error::Exception::custom(
                "ALiBi attention needs an unbounded KV cache (its keys in position order)",
            )));
        }
        let (k, v, mask) = cache.attend(k, v)?;
        let mask = match &self.alibi {
            Some(alibi) => {
                let bias = alibi.bias(len, k.dim(2), q.dtype())?;
                AttentionMask::Additive(match additive_mask(&mask, len, k.dim(2), q.dtype())? {
                    Some(m) => bias.add(&m)?,
                    None => bias,
                })
            }
            None => mask,
        };
        let out = match (&self.differential, s.logit_softcap) {
            (Some(d), _) => d.attend(&q, &k, &v, s.scale, &mask)?,
            (None, None) => attention_with_sinks(&q, &k, &v, s.scale, &mask, self.sinks.as_ref())?,
            (None, Some(cap)) => softcapped_attention(&q, &k, &v, s.scale, cap, &mask)?,
        };
        tap.record("self_attn.sdpa", &out);
        let out = out.swap_axes(1, 2)?.reshape(&[batch, len, -1])?;
        let out = match &gate {
            Some(g) => out.multiply(ops::sigmoid(g)?)?,
            None => out,
        };
        let out = norm_opt(&self.sub_norm, &out)?;
        let out = self.o_proj.forward(&out)?;
        tap.record("self_attn.o_proj", &out);
        Ok(out)
    }
}

/// Attention with soft-capped scores, spelled out (the fused kernel has no cap): scores in
/// the activation dtype, softmax in f32 as Transformers does.
/// The query scales of [`TemperatureTuning`] for positions `offset..offset + len`, shaped
/// `[len, 1]` to broadcast over `[batch, heads, len, head_dim]`.
fn temperature(t: TemperatureTuning, offset: i32, len: i32) -> Result<Array> {
    let scales: Vec<f32> = (offset..offset + len)
        .map(|p| {
            ((p as f32 + t.position_offset) / t.floor_scale)
                .floor()
                .ln_1p()
                * t.attn_scale
                + 1.0
        })
        .collect();
    Ok(Array::from_slice(&scales, &[len, 1]))
}

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{max_abs, random};
    use crate::weights::Weights;
    use mlx_rs::ops::indexing::TryIndexOp;
    use std::collections::HashMap;

    const HIDDEN: i32 = 24;

    /// An ALiBi attention block (6 heads: not a power of two) with seeded random weights.
    fn alibi_attention() -> Result<Attention> {
        let (heads, head_dim) = (6, 4);
        let mut t = HashMap::new();
        for (i, name) in ["q_proj", "k_proj", "v_proj"].iter().enumerate() {
            t.insert(
                format!("{name}.weight"),
                random(&[heads * head_dim, HIDDEN], 10 + i as u64, 0.4),
            );
            t.insert(
                format!("{name}.bias"),
                random(&[heads * head_dim], 20 + i as u64, 0.4),
            );
        }
        t.insert(
            "o_proj.weight".into(),
            random(&[HIDDEN, heads * head_dim], 30, 0.4),
        );
        let weights = Weights::new(t, "test");
        let mut s = AttentionSettings::new(heads, heads, head_dim);
        s.qkv_bias = true;
        s.alibi = Some(AlibiSettings {
            max_bias: 8.0,
            factor: 1.0,
        });
        let attention = Attention::load(&weights.root(), HIDDEN, &s, NormKind::Rms, 1e-5, None)?;
        weights.check_all_used()?;
        Ok(attention)
    }

    /// ALiBi attention written out: `softmax(q·kᵀ/√d + slope·(k − q))` over keys `k <= q`,
    /// per head, then `o_proj` — from the block's own weights, position by position.
    fn alibi_reference(a: &Attention, x: &Array) -> Result<Array> {
        let (
            Qkv::Separate {
                q_proj,
                k_proj,
                v_proj,
            },
            Some(alibi),
        ) = (&a.qkv, &a.alibi)
        else {
            unreachable!("the test block has separate projections and ALiBi")
        };
        let s = &a.settings;
        let len = x.dim(1);
        let split = |t: Array| {
            t.reshape(&[len, s.num_heads, s.head_dim])
                .unwrap()
                .swap_axes(0, 1)
                .unwrap()
        };
        let (q, k, v) = (
            split(q_proj.forward(x)?),
            split(k_proj.forward(x)?),
            split(v_proj.forward(x)?),
        );
        let scores = ops::matmul(&q, &k.swap_axes(-1, -2)?)?.multiply(Array::from_f32(s.scale))?;
        let mut bias = Vec::new();
        for slope in &alibi.slopes {
            for qi in 0..len {
                bias.extend((0..len).map(|ki| {
                    if ki <= qi {
                        slope * (ki - qi) as f32
                    } else {
                        f32::NEG_INFINITY
                    }
                }));
            }
        }
        let bias = Array::from_slice(&bias, &[s.num_heads, len, len]);
        let weights = ops::softmax_axis(&scores.add(&bias)?, -1, None)?;
        let out = ops::matmul(&weights, &v)?
            .swap_axes(0, 1)?
            .reshape(&[1, len, -1])?;
        a.o_proj.forward(&out)
    }

    /// The block against the written-out formula on a prefill, the same tokens fed in two
    /// steps through the cache, and as the second row of a left-padded batch.
    #[test]
    fn alibi_attention_matches_the_formula_with_cache_and_padding() -> Result<()> {
        let a = alibi_attention()?;
        assert_eq!(a.alibi.as_ref().map(|a| a.slopes.len()), Some(6));
        let x = random(&[1, 7, HIDDEN], 1, 1.0);
        let want = alibi_reference(&a, &x)?;
        let mut tap = Tap::off();
        let mut cache = KvCache::new();
        let full = a.forward(&x, &mut cache, &mut tap)?;
        assert!(
            max_abs(&full, &want) < 1e-5,
            "prefill: {}",
            max_abs(&full, &want)
        );

        let mut cache = KvCache::new();
        let first = a.forward(&x.try_index((.., ..4, ..))?, &mut cache, &mut tap)?;
        let mut steps = vec![first];
        for t in 4..7 {
            steps.push(a.forward(&x.try_index((.., t..t + 1, ..))?, &mut cache, &mut tap)?);
        }
        let stepped = ops::concatenate(&steps, 1)?;
        assert!(
            max_abs(&stepped, &want) < 1e-5,
            "cached: {}",
            max_abs(&stepped, &want)
        );

        // Row 0: 7 tokens of its own; row 1: the first 5 of x, left-padded by 2.
        let other = random(&[1, 7, HIDDEN], 2, 1.0);
        let padded_row = ops::concatenate(
            &[other.try_index((.., ..2, ..))?, x.try_index((.., ..5, ..))?],
            1,
        )?;
        let batch = ops::concatenate(&[&other, &padded_row], 0)?;
        let mut cache = KvCache::left_padded(&[0, 2])?;
        let out = a.forward(&batch, &mut cache, &mut tap)?;
        let row = out.try_index((1..2, 2.., ..))?;
        let want5 = alibi_reference(&a, &x.try_index((.., ..5, ..))?)?;
        assert!(
            max_abs(&row, &want5) < 1e-5,
            "padded: {}",
            max_abs(&row, &want5)
        );
        // And a decode step of the padded batch: row 1's sixth token.
        let next = ops::concatenate(
            &[
                other.try_index((.., 6..7, ..))?,
                x.try_index((.., 5..6, ..))?,
            ],
            0,
        )?;
        let out = a.forward(&next, &mut cache, &mut tap)?;
        let want6 = alibi_reference(&a, &x.try_index((.., ..6, ..))?)?;
        let got = out.try_index((1..2, .., ..))?;
        let want = want6.try_index((.., 5..6, ..))?;
        assert!(
            max_abs(&got, &want) < 1e-5,
            "padded step: {}",
            max_abs(&got, &want)
        );
        Ok(())
    }

    #[test]
    fn alibi_refuses_a_rotating_cache() -> Result<()> {
        let a = alibi_attention()?;
        let x = random(&[1, 3, HIDDEN], 1, 1.0);
        let err = a.forward(&x, &mut KvCache::rotating(2), &mut Tap::off());
        assert!(err.is_err());
        Ok(())
    }

    /// The temperatures against Transformers' two formulas: Ministral 3's
    /// `1 + β·log(1 + floor(p / n))` (offset 0) and Llama 4's
    /// `log1p(floor((p + 1) / n))·s + 1` (offset 1).
    #[test]
    fn temperatures_follow_both_position_conventions() -> Result<()> {
        for offset in [0.0f32, 1.0] {
            let t = TemperatureTuning {
                floor_scale: 4.0,
                attn_scale: 0.5,
                position_offset: offset,
                all_layers: offset == 0.0,
            };
            let scales = temperature(t, 2, 12)?;
            for (i, got) in scales.as_slice::<f32>().iter().enumerate() {
                let p = 2.0 + i as f32;
                let want = 1.0 + 0.5 * (1.0 + ((p + offset) / 4.0).floor()).ln();
                assert!(
                    (got - want).abs() < 1e-6,
                    "offset {offset}, p {p}: {got} vs {want}"
                );
            }
        }
        Ok(())
    }
}
