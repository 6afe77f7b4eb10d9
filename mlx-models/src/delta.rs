//! The gated delta rule (gated DeltaNet: Qwen3-Next, Qwen3.5), as Transformers' reference
//! path computes it.
//!
//! Each value head keeps a state `S` (`[key_dim, value_dim]`). With L2-normalized queries
//! and keys, `q` scaled by `key_dim^-0.5`, a decay `g ≤ 0` and a write strength `β`:
//!
//! ```text
//! S_t = exp(g_t) S_{t-1}
//! S_t = S_t + k_t ⊗ β_t (v_t − S_tᵀ k_t)
//! o_t = S_tᵀ q_t
//! ```
//!
//! Prompts run in chunks (the WY form: within a chunk the writes solve one unit lower
//! triangular system, and only the state crosses chunks), decoded tokens in the step form.
//! Both run in f32.

use crate::cache::RecurrentCache;
use crate::conv::CausalConv1d;
use crate::error::Result;
use crate::nn::{computed, Linear};
use crate::weights::WeightPath;
use mlx_rs::ops::indexing::TryIndexOp;
use mlx_rs::{ops, Array, Dtype};

/// `x / sqrt(Σx² + eps)` over the last axis.
pub fn l2_normalize(x: &Array, eps: f32) -> Result<Array> {
    let sum = x.square()?.sum_axis(-1, true)?;
    Ok(x.multiply(ops::rsqrt(&sum.add(Array::from_f32(eps))?)?)?)
}

/// The recurrence one token at a time. `q`, `k`: `[b, h, l, dk]` (normalized and scaled),
/// `v`: `[b, h, l, dv]`, `g`, `beta`: `[b, h, l]`, `state`: `[b, h, dk, dv]`. Returns the
/// outputs `[b, h, l, dv]` and the final state.
pub fn delta_steps(
    q: &Array,
    k: &Array,
    v: &Array,
    g: &Array,
    beta: &Array,
    state: &Array,
) -> Result<(Array, Array)> {
    let mut state = state.clone();
    let mut outs = Vec::with_capacity(q.dim(2) as usize);
    for t in 0..q.dim(2) {
        let at = |a: &Array| a.try_index((.., .., t));
        let (q_t, k_t, v_t) = (at(q)?, at(k)?, at(v)?); // [b, h, d]
        let decay = ops::exp(&at(g)?)?.expand_dims_axes(&[-1, -2])?;
        state = state.multiply(&decay)?;
        // Sᵀk: [b, h, dv].
        let memory = ops::matmul(k_t.expand_dims(-2)?, &state)?.squeeze_axes(&[-2])?;
        let delta = v_t
            .subtract(&memory)?
            .multiply(at(beta)?.expand_dims(-1)?)?;
        state = state.add(k_t.expand_dims(-1)?.multiply(delta.expand_dims(-2)?)?)?;
        outs.push(ops::matmul(q_t.expand_dims(-2)?, &state)?.squeeze_axes(&[-2])?);
    }
    Ok((ops::stack(&outs, 2)?, state))
}

/// The same recurrence in chunks of `chunk` tokens.
pub fn delta_chunked(
    q: &Array,
    k: &Array,
    v: &Array,
    g: &Array,
    beta: &Array,
    state: &Array,
    chunk: i32,
) -> Result<(Array, Array)> {
    let len = q.dim(2);
    let chunk = chunk.max(1);
    let mut state = state.clone();
    let mut outs = Vec::new();
    let mut start = 0;
    while start < len {
        let end = (start + chunk).min(len);
        let n = end - start;
        let take = |a: &Array| a.try_index((.., .., start..end));
        let (qc, kc, vc) = (take(q)?, take(k)?, take(v)?);
        let (gc, bc) = (take(g)?, take(beta)?);
        let cum = ops::cumsum(&gc, -1, None, None)?; // [b, h, n]
                                                     // decay[i, j] = exp(cum_i - cum_j) for j ≤ i, else 0.
        let lower_incl: Vec<bool> = (0..n).flat_map(|i| (0..n).map(move |j| j <= i)).collect();
        let lower_incl = Array::from_slice(&lower_incl, &[n, n]);
        let lower_strict: Vec<bool> = (0..n).flat_map(|i| (0..n).map(move |j| j < i)).collect();
        let lower_strict = Array::from_slice(&lower_strict, &[n, n]);
        let diff = cum.expand_dims(-1)?.subtract(cum.expand_dims(-2)?)?;
        let decay = ops::select(&lower_incl, ops::exp(&diff)?, Array::from_f32(0.0))?;
        let kb = kc.multiply(bc.expand_dims(-1)?)?; // k·β
        let vb = vc.multiply(bc.expand_dims(-1)?)?; // v·β
                                                    // (I + A) with A = strictly lower (kβ kᵀ ⊙ decay).
        let a = ops::select(
            &lower_strict,
            ops::matmul(&kb, kc.swap_axes(-1, -2)?)?.multiply(&decay)?,
            Array::from_f32(0.0),
        )?;
        let system = a.add(ops::eye::<f32>(n, None, None)?)?;
        let inverse = mlx_rs::linalg::tri_inv(&system, Some(false))?;
        let u = ops::matmul(&inverse, &vb)?; // new values
        let w = ops::matmul(&inverse, kb.multiply(ops::exp(&cum)?.expand_dims(-1)?)?)?;
        // Corrected by what the state already stores, then read by the queries.
        let v_new = u.subtract(ops::matmul(&w, &state)?)?;
        let q_decayed = qc.multiply(ops::exp(&cum)?.expand_dims(-1)?)?;
        let intra = ops::matmul(&qc, kc.swap_axes(-1, -2)?)?.multiply(&decay)?;
        outs.push(ops::matmul(&q_decayed, &state)?.add(ops::matmul(&intra, &v_new)?)?);
        let last = cum.try_index((.., .., n - 1..n))?; // [b, h, 1]
        let k_decayed = kc.multiply(ops::exp(&last.subtract(&cum)?)?.expand_dims(-1)?)?;
        state = state
            .multiply(ops::exp(&last)?.expand_dims(-1)?)?
            .add(ops::matmul(k_decayed.swap_axes(-1, -2)?, &v_new)?)?;
        start = end;
    }
    Ok((ops::concatenate(&outs, 2)?, state))
}

/// The shape of a gated DeltaNet mixer.
#[derive(Debug, Clone, PartialEq)]
pub struct GatedDeltaNetSettings {
    pub num_key_heads: i32,
    pub num_value_heads: i32,
    pub key_head_dim: i32,
    pub value_head_dim: i32,
    pub conv_kernel: i32,
    pub norm_eps: f64,
    /// Prompt chunk of the WY form (Transformers' reference path uses 64).
    pub chunk_size: i32,
    /// Scan prompts in chunks; `false` steps token by token.
    pub chunked_prefill: bool,
}

impl GatedDeltaNetSettings {
    fn key_dim(&self) -> i32 {
        self.num_key_heads * self.key_head_dim
    }

    fn value_dim(&self) -> i32 {
        self.num_value_heads * self.value_head_dim
    }
}

/// How a gated DeltaNet's input projections are stored.
#[derive(Debug, Clone)]
pub enum DeltaProjections {
    /// Qwen3-Next: `in_proj_qkvz` and `in_proj_ba`, laid out per key head (`q, k, v…, z…`
    /// and `b…, a…`).
    Interleaved {
        in_proj_qkvz: Linear,
        in_proj_ba: Linear,
    },
    /// Qwen3.5: `in_proj_qkv` (`q | k | v`), `in_proj_z`, `in_proj_b`, `in_proj_a`.
    Separate {
        in_proj_qkv: Linear,
        in_proj_z: Linear,
        in_proj_b: Linear,
        in_proj_a: Linear,
    },
}

/// A loaded gated DeltaNet mixer (`linear_attn`): the input projections, a causal conv over
/// `q, k, v`, `dt_bias`, `A_log`, a gated RMSNorm per value head, `out_proj`.
#[derive(Debug, Clone)]
pub struct GatedDeltaNet {
    pub projections: DeltaProjections,
    pub conv1d: CausalConv1d,
    pub dt_bias: Array,
    /// `exp(A_log)`, f32.
    pub a: Array,
    pub norm: Array,
    pub out_proj: Linear,
    pub settings: GatedDeltaNetSettings,
}

impl GatedDeltaNet {
    pub fn load(w: &WeightPath, hidden: i32, s: &GatedDeltaNetSettings) -> Result<Self> {
        let (kd, vd, hv) = (s.key_dim(), s.value_dim(), s.num_value_heads);
        let projections = if w.contains("in_proj_qkv.weight") {
            DeltaProjections::Separate {
                in_proj_qkv: Linear::load(&w.pp("in_proj_qkv"), hidden, 2 * kd + vd, false)?,
                in_proj_z: Linear::load(&w.pp("in_proj_z"), hidden, vd, false)?,
                in_proj_b: Linear::load(&w.pp("in_proj_b"), hidden, hv, false)?,
                in_proj_a: Linear::load(&w.pp("in_proj_a"), hidden, hv, false)?,
            }
        } else {
            DeltaProjections::Interleaved {
                in_proj_qkvz: Linear::load(&w.pp("in_proj_qkvz"), hidden, 2 * kd + 2 * vd, false)?,
                in_proj_ba: Linear::load(&w.pp("in_proj_ba"), hidden, 2 * hv, false)?,
            }
        };
        Ok(GatedDeltaNet {
            projections,
            conv1d: CausalConv1d::load(&w.pp("conv1d"), 2 * kd + vd, s.conv_kernel, false)?,
            dt_bias: computed(f32(&w.get("dt_bias", &[hv])?)?)?,
            a: computed(ops::exp(&f32(&w.get("A_log", &[hv])?)?)?)?,
            norm: w.pp("norm").get("weight", &[s.value_head_dim])?,
            out_proj: Linear::load(&w.pp("out_proj"), vd, hidden, false)?,
            settings: s.clone(),
        })
    }

    /// The mixer's output for `x` (`[batch, tokens, hidden]`), continuing from and updating
    /// `cache`.
    pub fn forward(&self, x: &Array, cache: &mut RecurrentCache) -> Result<Array> {
        let s = &self.settings;
        let (batch, len) = (x.dim(0), x.dim(1));
        let (hk, hv, dk, dv) = (
            s.num_key_heads,
            s.num_value_heads,
            s.key_head_dim,
            s.value_head_dim,
        );
        let per = hv / hk;
        let (mixed, z, b, a) = match &self.projections {
            DeltaProjections::Interleaved {
                in_proj_qkvz,
                in_proj_ba,
            } => {
                // Per key head: q (dk), k (dk), v (per·dv), z (per·dv); b (per), a (per).
                let qkvz =
                    in_proj_qkvz
                        .forward(x)?
                        .reshape(&[batch, len, hk, 2 * dk + 2 * per * dv])?;
                let parts = qkvz.split_at_indices(&[dk, 2 * dk, 2 * dk + per * dv], -1)?;
                let flat = |t: &Array| t.reshape(&[batch, len, -1]);
                let z = parts[3].reshape(&[batch, len, hv, dv])?;
                let ba = in_proj_ba.forward(x)?.reshape(&[batch, len, hk, 2 * per])?;
                let ba = ba.split_at_indices(&[per], -1)?;
                let mixed =
                    ops::concatenate(&[flat(&parts[0])?, flat(&parts[1])?, flat(&parts[2])?], -1)?;
                (
                    mixed,
                    z,
                    ba[0].reshape(&[batch, len, hv])?,
                    ba[1].reshape(&[batch, len, hv])?,
                )
            }
            DeltaProjections::Separate {
                in_proj_qkv,
                in_proj_z,
                in_proj_b,
                in_proj_a,
            } => (
                in_proj_qkv.forward(x)?,
                in_proj_z.forward(x)?.reshape(&[batch, len, hv, dv])?,
                in_proj_b.forward(x)?,
                in_proj_a.forward(x)?,
            ),
        };
        let (mixed, conv_state) = self.conv1d.forward(&mixed, cache.conv.as_ref())?;
        let mixed = mlx_rs::nn::silu(&mixed)?;
        let qkv = mixed.split_at_indices(&[s.key_dim(), 2 * s.key_dim()], -1)?;
        // Heads first, f32; key heads repeated for their value heads.
        let heads = |t: &Array, n: i32, d: i32| -> Result<Array> {
            f32(&t.reshape(&[batch, len, n, d])?.swap_axes(1, 2)?)
        };
        let repeat =
            |t: Array| -> Result<Array> {
                if per == 1 {
                    return Ok(t);
                }
                let t = t.expand_dims(2)?;
                Ok(ops::broadcast_to(&t, &[batch, hk, per, len, dk])?
                    .reshape(&[batch, hv, len, dk])?)
            };
        let q = repeat(l2_normalize(&heads(&qkv[0], hk, dk)?, 1e-6)?)?
            .multiply(Array::from_f32((dk as f32).powf(-0.5)))?;
        let k = repeat(l2_normalize(&heads(&qkv[1], hk, dk)?, 1e-6)?)?;
        let v = heads(&qkv[2], hv, dv)?;
        let beta = ops::sigmoid(&f32(&b)?)?.swap_axes(1, 2)?; // [b, hv, l]
        let a_in = f32(&a)?.add(&self.dt_bias)?;
        let softplus = ops::select(
            &a_in.gt(Array::from_f32(20.0))?,
            &a_in,
            ops::log1p(&ops::exp(&a_in)?)?,
        )?;
        let g = softplus.multiply(&self.a)?.negative()?.swap_axes(1, 2)?; // [b, hv, l]
        let state = match &cache.state {
            Some(st) => st.clone(),
            None => ops::zeros::<f32>(&[batch, hv, dk, dv])?,
        };
        let (out, state) = if len > 1 && s.chunked_prefill {
            delta_chunked(&q, &k, &v, &g, &beta, &state, s.chunk_size)?
        } else {
            delta_steps(&q, &k, &v, &g, &beta, &state)?
        };
        cache.conv = Some(conv_state);
        cache.state = Some(state);
        cache.advance(len);
        // [b, hv, l, dv] → [b, l, hv, dv]; RMS norm per head, then the SiLU gate.
        let out = out.swap_axes(1, 2)?;
        let normed = mlx_rs::fast::rms_norm(&out, Some(&f32(&self.norm)?), s.norm_eps as f32)?;
        let gated = normed.multiply(mlx_rs::nn::silu(&f32(&z)?)?)?;
        self.out_proj
            .forward(&gated.as_dtype(x.dtype())?.reshape(&[batch, len, -1])?)
    }
}

/// Casts to f32.
pub fn f32(a: &Array) -> Result<Array> {
    Ok(a.as_dtype(Dtype::Float32)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    use crate::test_util::max_abs;

    fn random(shape: &[i32], seed: u64) -> Array {
        crate::test_util::random(shape, seed, 1.0)
    }

    fn inputs(len: i32, seed: u64) -> [Array; 6] {
        let (b, h, dk, dv) = (1, 2, 4, 3);
        let q = l2_normalize(&random(&[b, h, len, dk], seed), 1e-6)
            .unwrap()
            .multiply(Array::from_f32(0.5))
            .unwrap();
        let k = l2_normalize(&random(&[b, h, len, dk], seed + 1), 1e-6).unwrap();
        let v = random(&[b, h, len, dv], seed + 2);
        let g = random(&[b, h, len], seed + 3)
            .abs()
            .unwrap()
            .negative()
            .unwrap();
        let beta = ops::sigmoid(random(&[b, h, len], seed + 4)).unwrap();
        let state = random(&[b, h, dk, dv], seed + 5);
        [q, k, v, g, beta, state]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(32))]

        /// The chunked form equals the recurrence, outputs and final state, for random
        /// lengths, chunk sizes and starting states.
        #[test]
        fn chunked_delta_rule_equals_the_recurrence(
            len in 1..=40i32,
            chunk in 1..=16i32,
            seed in 0..10_000u64,
        ) {
            let [q, k, v, g, beta, state] = inputs(len, seed);
            let (o1, s1) = delta_steps(&q, &k, &v, &g, &beta, &state).unwrap();
            let (o2, s2) = delta_chunked(&q, &k, &v, &g, &beta, &state, chunk).unwrap();
            let (d_o, d_s) = (max_abs(&o1, &o2), max_abs(&s1, &s2));
            prop_assert!(d_o < 1e-4 && d_s < 1e-4, "len {len}, chunk {chunk}: |Δo| {d_o:e}, |Δstate| {d_s:e}");
        }
    }

    #[test]
    fn a_wrong_write_strength_is_caught() {
        let [q, k, v, g, beta, state] = inputs(12, 7);
        let (o1, _) = delta_steps(&q, &k, &v, &g, &beta, &state).unwrap();
        let wrong = beta.multiply(Array::from_f32(1.01)).unwrap();
        let (o2, _) = delta_chunked(&q, &k, &v, &g, &wrong, &state, 4).unwrap();
        assert!(max_abs(&o1, &o2) > 1e-3);
    }
}
