//! The Mamba2 state-space mixer (SSD), as Transformers' reference path computes it.
//!
//! `in_proj` gives the gate `z`, the conv input `xBC` and the step sizes `dt`; a causal
//! depthwise conv (then SiLU) runs over `xBC`, which splits into `x` (`heads × head_dim`),
//! `B` and `C` (`n_groups × state_size`, shared by the heads of a group). With
//! `A = -exp(A_log)` and `dt = softplus(dt + dt_bias)` (clamped to `time_step_limit`),
//! each head keeps a state `h` (`[head_dim, state_size]`):
//!
//! ```text
//! h_t = exp(dt_t · A) · h_{t-1} + dt_t · x_t ⊗ B_t
//! y_t = h_t · C_t + D · x_t
//! ```
//!
//! then `out_proj(norm(y · silu(z)))` with an RMSNorm over groups of `intermediate /
//! n_groups` features.
//!
//! A prompt is scanned in chunks of `chunk_size` tokens (the SSD form: within a chunk the
//! recurrence is a masked matrix product, between chunks only the state is carried), a
//! decoded token in the step form above. Both run in f32.

use crate::cache::RecurrentCache;
use crate::conv::CausalConv1d;
use crate::error::Result;
use crate::nn::{computed, Linear};
use crate::norm::{Norm, NormKind};
use crate::tap::Tap;
use crate::weights::WeightPath;
use mlx_rs::ops::indexing::TryIndexOp;
use mlx_rs::{ops, Array, Dtype};

/// What a Mamba2 mixer does with the scan's output `y` and the gate `z` before
/// `out_proj`; the norms are RMS norms over `n_groups` equal groups with a `norm.weight`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mamba2Gate {
    /// `y · silu(z)`, no norm (Falcon-H1 without `mamba_rms_norm`).
    Silu,
    /// `norm(y · silu(z))`: Transformers' `MambaRMSNormGated` (Mamba2, Granite 4,
    /// Nemotron-H, Falcon-H1's checkpoints).
    NormAfterGate,
    /// `norm(y) · silu(z)` (Falcon-H1's `mamba_norm_before_gate`).
    NormBeforeGate,
}

/// The shape of a Mamba2 mixer.
#[derive(Debug, Clone, PartialEq)]
pub struct Mamba2Settings {
    pub num_heads: i32,
    pub head_dim: i32,
    pub state_size: i32,
    pub n_groups: i32,
    pub conv_kernel: i32,
    pub conv_bias: bool,
    /// Bias on `in_proj`.
    pub bias: bool,
    /// Bias on `out_proj` (Falcon-H1's `projectors_bias`; the others' `bias`).
    pub out_bias: bool,
    pub chunk_size: i32,
    /// `dt` is clamped to this range in the chunked scan of a prompt.
    pub time_step_limit: (f32, f32),
    /// Token-by-token steps clamp `dt` too (Transformers' Nemotron-H steps without the
    /// clamp its chunked scan applies).
    pub clamp_steps: bool,
    pub norm_eps: f64,
    /// How the scan's output is gated (and normalized) before `out_proj`.
    pub gate: Mamba2Gate,
    /// Scan prompts in chunks (the SSD form); `false` steps token by token (for comparison).
    pub chunked_prefill: bool,
}

impl Mamba2Settings {
    /// `heads × head_dim`.
    pub fn intermediate_size(&self) -> i32 {
        self.num_heads * self.head_dim
    }

    /// The conv's channels: `x`, `B` and `C`.
    pub fn conv_dim(&self) -> i32 {
        self.intermediate_size() + 2 * self.n_groups * self.state_size
    }
}

/// A loaded Mamba2 mixer (`in_proj`, `conv1d`, `dt_bias`, `A_log`, `D`, `norm`, `out_proj`).
#[derive(Debug, Clone)]
pub struct Mamba2Mixer {
    pub in_proj: Linear,
    pub conv1d: CausalConv1d,
    pub dt_bias: Array,
    /// `-exp(A_log)`, f32.
    pub a: Array,
    pub d: Array,
    pub norm: Option<Array>,
    pub out_proj: Linear,
    pub settings: Mamba2Settings,
}

impl Mamba2Mixer {
    pub fn load(w: &WeightPath, hidden: i32, s: &Mamba2Settings) -> Result<Self> {
        let (h, inter) = (s.num_heads, s.intermediate_size());
        let a_log = w.get("A_log", &[h])?;
        Ok(Mamba2Mixer {
            in_proj: Linear::load(&w.pp("in_proj"), hidden, inter + s.conv_dim() + h, s.bias)?,
            conv1d: CausalConv1d::load(&w.pp("conv1d"), s.conv_dim(), s.conv_kernel, s.conv_bias)?,
            dt_bias: computed(w.get("dt_bias", &[h])?.as_dtype(Dtype::Float32)?)?,
            a: computed(ops::exp(&a_log.as_dtype(Dtype::Float32)?)?.negative()?)?,
            d: computed(w.get("D", &[h])?.as_dtype(Dtype::Float32)?)?,
            norm: (s.gate != Mamba2Gate::Silu)
                .then(|| w.pp("norm").get("weight", &[inter]))
                .transpose()?,
            out_proj: Linear::load(&w.pp("out_proj"), inter, hidden, s.out_bias)?,
            settings: s.clone(),
        })
    }

    /// The mixer's output for `x` (`[batch, tokens, hidden]`), continuing from and updating
    /// `cache`.
    pub fn forward(&self, x: &Array, cache: &mut RecurrentCache, _tap: &mut Tap) -> Result<Array> {
        let s = &self.settings;
        let (batch, len) = (x.dim(0), x.dim(1));
        let (inter, gn) = (s.intermediate_size(), s.n_groups * s.state_size);
        let proj = self.in_proj.forward(x)?;
        let parts = proj.split_at_indices(&[inter, inter + s.conv_dim()], -1)?;
        let (gate, xbc, dt) = (&parts[0], &parts[1], &parts[2]);
        let (xbc, conv_state) = self.conv1d.forward(xbc, cache.conv.as_ref())?;
        let xbc = mlx_rs::nn::silu(&xbc)?;
        let parts = xbc.split_at_indices(&[inter, inter + gn], -1)?;
        let f32 = |a: &Array| a.as_dtype(Dtype::Float32);
        let xs = f32(&parts[0])?.reshape(&[batch, len, s.num_heads, s.head_dim])?;
        let heads =
            |t: &Array| -> Result<Array> {
                // [b, l, groups·n] → [b, l, heads, n], each group's row repeated for its heads.
                let t = f32(t)?.reshape(&[batch, len, s.n_groups, 1, s.state_size])?;
                let per = s.num_heads / s.n_groups;
                Ok(
                    ops::broadcast_to(&t, &[batch, len, s.n_groups, per, s.state_size])?
                        .reshape(&[batch, len, s.num_heads, s.state_size])?,
                )
            };
        let (b, c) = (heads(&parts[1])?, heads(&parts[2])?);
        let dt = softplus(&f32(dt)?.add(&self.dt_bias)?)?;
        let clip = |dt: &Array| ops::clip(dt, (s.time_step_limit.0, s.time_step_limit.1));
        let state = match &cache.state {
            Some(st) => st.clone(),
            None => ops::zeros::<f32>(&[batch, s.num_heads, s.head_dim, s.state_size])?,
        };
        let (y, state) = if len > 1 && s.chunked_prefill {
            ssd_chunked(&xs, &clip(&dt)?, &self.a, &b, &c, &state, s.chunk_size)?
        } else if s.clamp_steps {
            ssd_steps(&xs, &clip(&dt)?, &self.a, &b, &c, &state)?
        } else {
            ssd_steps(&xs, &dt, &self.a, &b, &c, &state)?
        };
        // y + D·x, `[b, l, heads, head_dim]` → `[b, l, inter]`.
        let y = y
            .add(&xs.multiply(self.d.reshape(&[1, 1, s.num_heads, 1])?)?)?
            .reshape(&[batch, len, inter])?;
        let y = match &self.norm {
            Some(weight) if s.gate == Mamba2Gate::NormBeforeGate => {
                let normed = group_rms_norm(&y, weight, s.n_groups, s.norm_eps as f32)?;
                normed.multiply(mlx_rs::nn::silu(&f32(gate)?)?)?
            }
            Some(weight) => gated_rms_norm(&y, gate, weight, s.n_groups, s.norm_eps as f32)?,
            None => y.multiply(mlx_rs::nn::silu(&f32(gate)?)?)?,
        };
        cache.conv = Some(conv_state);
        cache.state = Some(state);
        cache.advance(len);
        self.out_proj.forward(&y.as_dtype(x.dtype())?)
    }
}

/// The shape of a Mamba (1) mixer.
#[derive(Debug, Clone, PartialEq)]
pub struct MambaSettings {
    /// `expand · hidden` channels.
    pub intermediate_size: i32,
    pub state_size: i32,
    pub time_step_rank: i32,
    pub conv_kernel: i32,
    pub conv_bias: bool,
    /// Bias on `in_proj` and `out_proj`.
    pub bias: bool,
    /// FalconMamba: RMS-normalize `dt`, `B` and `C` (no weight) with this epsilon.
    pub bcdt_rms_eps: Option<f32>,
    /// Jamba: RMSNorms with weights (`dt_layernorm`, `b_layernorm`, `c_layernorm`) on `dt`,
    /// `B` and `C`, with this epsilon.
    pub bcdt_norm_eps: Option<f64>,
}

/// A loaded Mamba (1) selective-scan mixer (`in_proj`, `conv1d`, `x_proj`, `dt_proj`,
/// `A_log`, `D`, `out_proj`): `in_proj` gives `x` and the gate `z`; after the conv (SiLU),
/// `x_proj` gives `dt` (`time_step_rank`), `B` and `C`; `dt = softplus(dt_proj(dt))`; each
/// channel keeps a state of `state_size`: `h = exp(dt·A)·h + dt·B·x`, `y = h·C + D·x`;
/// `out_proj(y · silu(z))`. The scan steps token by token.
#[derive(Debug, Clone)]
pub struct MambaMixer {
    pub in_proj: Linear,
    pub conv1d: CausalConv1d,
    pub x_proj: Linear,
    pub dt_proj: Linear,
    /// `-exp(A_log)`, `[channels, state]`, f32.
    pub a: Array,
    pub d: Array,
    pub out_proj: Linear,
    /// Jamba's weighted norms of `dt`, `B` and `C`.
    pub bcdt_norms: Option<[Norm; 3]>,
    pub settings: MambaSettings,
}

impl MambaMixer {
    pub fn load(w: &WeightPath, hidden: i32, s: &MambaSettings) -> Result<Self> {
        let (i, n, r) = (s.intermediate_size, s.state_size, s.time_step_rank);
        Ok(MambaMixer {
            in_proj: Linear::load(&w.pp("in_proj"), hidden, 2 * i, s.bias)?,
            conv1d: CausalConv1d::load(&w.pp("conv1d"), i, s.conv_kernel, s.conv_bias)?,
            x_proj: Linear::load(&w.pp("x_proj"), i, r + 2 * n, false)?,
            dt_proj: Linear::load(&w.pp("dt_proj"), r, i, true)?,
            a: computed(
                ops::exp(&w.get("A_log", &[i, n])?.as_dtype(Dtype::Float32)?)?.negative()?,
            )?,
            d: computed(w.get("D", &[i])?.as_dtype(Dtype::Float32)?)?,
            out_proj: Linear::load(&w.pp("out_proj"), i, hidden, s.bias)?,
            bcdt_norms: match s.bcdt_norm_eps {
                Some(eps) => Some([
                    Norm::load(&w.pp("dt_layernorm"), NormKind::Rms, r, eps)?,
                    Norm::load(&w.pp("b_layernorm"), NormKind::Rms, n, eps)?,
                    Norm::load(&w.pp("c_layernorm"), NormKind::Rms, n, eps)?,
                ]),
                None => None,
            },
            settings: s.clone(),
        })
    }

    pub fn forward(&self, x: &Array, cache: &mut RecurrentCache) -> Result<Array> {
        let s = &self.settings;
        let (i, n, r) = (s.intermediate_size, s.state_size, s.time_step_rank);
        let parts = self.in_proj.forward(x)?.split_equal(2, -1)?;
        let (xs, z) = (&parts[0], &parts[1]);
        let (xs, conv_state) = self.conv1d.forward(xs, cache.conv.as_ref())?;
        let xs = mlx_rs::nn::silu(&xs)?;
        let proj = self.x_proj.forward(&xs)?;
        let p = proj.split_at_indices(&[r, r + n], -1)?;
        let (mut dt, mut b, mut c) = (p[0].clone(), p[1].clone(), p[2].clone());
        if let Some(eps) = s.bcdt_rms_eps {
            dt = mlx_rs::fast::rms_norm(&dt, None, eps)?;
            b = mlx_rs::fast::rms_norm(&b, None, eps)?;
            c = mlx_rs::fast::rms_norm(&c, None, eps)?;
        }
        if let Some([dt_norm, b_norm, c_norm]) = &self.bcdt_norms {
            dt = dt_norm.forward(&dt)?;
            b = b_norm.forward(&b)?;
            c = c_norm.forward(&c)?;
        }
        let f32 = |a: &Array| a.as_dtype(Dtype::Float32);
        let dt = softplus(&f32(&self.dt_proj.forward(&dt)?)?)?; // [b, l, i]
        let (b, c, xs32) = (f32(&b)?, f32(&c)?, f32(&xs)?);
        let mut state = match &cache.state {
            Some(st) => st.clone(),
            None => ops::zeros::<f32>(&[x.dim(0), i, n])?,
        };
        let mut ys = Vec::with_capacity(x.dim(1) as usize);
        for t in 0..x.dim(1) {
            let at = |a: &Array| a.try_index((.., t));
            let (dt_t, x_t) = (at(&dt)?.expand_dims(-1)?, at(&xs32)?.expand_dims(-1)?); // [b, i, 1]
            let decay = ops::exp(&dt_t.multiply(&self.a)?)?; // [b, i, n]
            let write = dt_t.multiply(&x_t)?.multiply(at(&b)?.expand_dims(1)?)?; // [b, i, n]
            state = state.multiply(&decay)?.add(&write)?;
            ys.push(ops::matmul(&state, at(&c)?.expand_dims(-1)?)?.squeeze_axes(&[-1])?);
        }
        let y = ops::stack(&ys, 1)?.add(&xs32.multiply(&self.d)?)?;
        let y = y.multiply(mlx_rs::nn::silu(&f32(z)?)?)?;
        cache.conv = Some(conv_state);
        cache.state = Some(state);
        cache.advance(x.dim(1));
        self.out_proj.forward(&y.as_dtype(x.dtype())?)
    }
}

/// `log(1 + exp(x))`, as PyTorch's softplus (linear above 20).
fn softplus(x: &Array) -> Result<Array> {
    let soft = ops::log1p(&ops::exp(x)?)?;
    Ok(ops::select(&x.gt(Array::from_f32(20.0))?, x, &soft)?)
}

/// `norm(y · silu(z)) · weight` with the RMS norm over `groups` equal groups of features
/// (Transformers' `MambaRMSNormGated`), in f32.
pub fn gated_rms_norm(
    y: &Array,
    z: &Array,
    weight: &Array,
    groups: i32,
    eps: f32,
) -> Result<Array> {
    let y = y
        .as_dtype(Dtype::Float32)?
        .multiply(mlx_rs::nn::silu(&z.as_dtype(Dtype::Float32)?)?)?;
    group_rms_norm(&y, weight, groups, eps)
}

/// `norm(y) · weight` with the RMS norm over `groups` equal groups of features, in f32.
pub fn group_rms_norm(y: &Array, weight: &Array, groups: i32, eps: f32) -> Result<Array> {
    let y = y.as_dtype(Dtype::Float32)?;
    let shape = y.shape().to_vec();
    let last = shape[shape.len() - 1];
    let mut grouped_shape = shape[..shape.len() - 1].to_vec();
    grouped_shape.extend([groups, last / groups]);
    let grouped = y.reshape(&grouped_shape)?;
    let normed = mlx_rs::fast::rms_norm(&grouped, None, eps)?.reshape(&shape)?;
    Ok(normed.multiply(weight.as_dtype(Dtype::Float32)?)?)
}

/// The recurrence one token at a time: `x` `[b, l, h, p]`, `dt` `[b, l, h]`, `a` `[h]`,
/// `b`/`c` `[b, l, h, n]`, `state` `[b, h, p, n]`; returns `y` (without the `D` skip) and
/// the final state.
pub fn ssd_steps(
    x: &Array,
    dt: &Array,
    a: &Array,
    b: &Array,
    c: &Array,
    state: &Array,
) -> Result<(Array, Array)> {
    let mut state = state.clone();
    let mut ys = Vec::with_capacity(x.dim(1) as usize);
    for t in 0..x.dim(1) {
        let x_t = x.try_index((.., t))?; // [b, h, p]
        let dt_t = dt.try_index((.., t))?; // [b, h]
        let b_t = b.try_index((.., t))?; // [b, h, n]
        let c_t = c.try_index((.., t))?;
        let decay = ops::exp(&dt_t.multiply(a)?)?.expand_dims_axes(&[-1, -2])?;
        let dbx = x_t
            .multiply(dt_t.expand_dims(-1)?)?
            .expand_dims(-1)?
            .multiply(b_t.expand_dims(-2)?)?; // [b, h, p, n]
        state = state.multiply(&decay)?.add(&dbx)?;
        ys.push(ops::matmul(&state, c_t.expand_dims(-1)?)?.squeeze_axes(&[-1])?);
    }
    Ok((ops::stack(&ys, 1)?, state))
}

/// The same recurrence in chunks of `chunk` tokens (SSD): within a chunk
/// `y_i = Σ_{j≤i} (C_i·B_j) exp(Σ_{j<k≤i} dt_k A) dt_j x_j + exp(Σ_{k≤i} dt_k A) C_i·h`,
/// and the state is carried from chunk to chunk.
pub fn ssd_chunked(
    x: &Array,
    dt: &Array,
    a: &Array,
    b: &Array,
    c: &Array,
    state: &Array,
    chunk: i32,
) -> Result<(Array, Array)> {
    let len = x.dim(1);
    let chunk = chunk.max(1);
    let mut state = state.clone();
    let mut ys = Vec::new();
    let mut start = 0;
    while start < len {
        let end = (start + chunk).min(len);
        let q = end - start;
        let take = |t: &Array| t.try_index((.., start..end));
        // Heads first: [b, h, q, …].
        let xc = take(x)?.swap_axes(1, 2)?; // [b, h, q, p]
        let dtc = take(dt)?.swap_axes(1, 2)?; // [b, h, q]
        let bc = take(b)?.swap_axes(1, 2)?; // [b, h, q, n]
        let cc = take(c)?.swap_axes(1, 2)?;
        let acum = ops::cumsum(&dtc.multiply(a.expand_dims(-1)?)?, -1, None, None)?; // [b, h, q]
                                                                                     // L[i, j] = exp(acum_i - acum_j) for j ≤ i, else 0.
        let diff = acum.expand_dims(-1)?.subtract(acum.expand_dims(-2)?)?;
        let rows: Vec<bool> = (0..q).flat_map(|i| (0..q).map(move |j| j <= i)).collect();
        let lower = Array::from_slice(&rows, &[q, q]);
        let l = ops::select(&lower, ops::exp(&diff)?, Array::from_f32(0.0))?;
        let xdt = xc.multiply(dtc.expand_dims(-1)?)?; // [b, h, q, p]
        let scores = ops::matmul(&cc, bc.swap_axes(-1, -2)?)?.multiply(&l)?; // [b, h, q, q]
        let y_diag = ops::matmul(&scores, &xdt)?;
        // From the state before the chunk: exp(acum_i) C_i · h.
        let y_off = ops::matmul(&cc, state.swap_axes(-1, -2)?)?
            .multiply(ops::exp(&acum)?.expand_dims(-1)?)?;
        ys.push(y_diag.add(&y_off)?.swap_axes(1, 2)?); // [b, q, h, p]
                                                       // The state after the chunk.
        let last = acum.try_index((.., .., q - 1..q))?; // [b, h, 1]
        let decay_to_end = ops::exp(&last.subtract(&acum)?)?; // [b, h, q]
        let contrib = ops::matmul(
            xdt.multiply(decay_to_end.expand_dims(-1)?)?
                .swap_axes(-1, -2)?,
            &bc,
        )?; // [b, h, p, n]
        state = state
            .multiply(ops::exp(&last)?.expand_dims(-1)?)?
            .add(&contrib)?;
        start = end;
    }
    Ok((ops::concatenate(&ys, 1)?, state))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    use crate::test_util::{max_abs, random};

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(32))]

        /// The chunked scan equals the token-by-token recurrence, outputs and final state,
        /// for random lengths, chunk sizes and starting states.
        #[test]
        fn chunked_scan_equals_the_recurrence(
            len in 1..=40i32,
            chunk in 1..=16i32,
            seed in 0..10_000u64,
        ) {
            let (bsz, h, p, n) = (1, 3, 4, 5);
            let x = random(&[bsz, len, h, p], seed, 1.0);
            let dt = softplus(&random(&[bsz, len, h], seed + 1, 1.0)).unwrap();
            let a = ops::exp(random(&[h], seed + 2, 0.5)).unwrap().negative().unwrap();
            let b = random(&[bsz, len, h, n], seed + 3, 1.0);
            let c = random(&[bsz, len, h, n], seed + 4, 1.0);
            let state = random(&[bsz, h, p, n], seed + 5, 1.0);
            let (y1, s1) = ssd_steps(&x, &dt, &a, &b, &c, &state).unwrap();
            let (y2, s2) = ssd_chunked(&x, &dt, &a, &b, &c, &state, chunk).unwrap();
            let (dy, ds) = (max_abs(&y1, &y2), max_abs(&s1, &s2));
            prop_assert!(dy < 1e-4 && ds < 1e-4, "len {len}, chunk {chunk}: |Δy| {dy:e}, |Δstate| {ds:e}");
        }
    }

    #[test]
    fn a_wrong_decay_is_caught() {
        // The seeded fault for the tolerance above: a 1% error in A.
        let (len, h, p, n) = (12, 2, 3, 4);
        let x = random(&[1, len, h, p], 1, 1.0);
        let dt = softplus(&random(&[1, len, h], 2, 1.0)).unwrap();
        let a = ops::exp(random(&[h], 3, 0.5)).unwrap().negative().unwrap();
        let b = random(&[1, len, h, n], 4, 1.0);
        let c = random(&[1, len, h, n], 5, 1.0);
        let state = random(&[1, h, p, n], 6, 1.0);
        let (y1, _) = ssd_steps(&x, &dt, &a, &b, &c, &state).unwrap();
        let wrong = a.multiply(Array::from_f32(1.01)).unwrap();
        let (y2, _) = ssd_chunked(&x, &dt, &wrong, &b, &c, &state, 4).unwrap();
        assert!(max_abs(&y1, &y2) > 1e-3);
    }
}
