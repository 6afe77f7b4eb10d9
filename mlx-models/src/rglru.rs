//! RecurrentGemma's (Griffin's) recurrent block, as Transformers computes it: a GELU branch
//! `y = gelu_tanh(linear_y(x))` and a recurrent branch `linear_x` → causal depthwise conv →
//! RG-LRU, multiplied and projected by `linear_out`.
//!
//! The RG-LRU keeps one f32 state per channel. With block-diagonal gates per head
//! (`input_gate_*`, `recurrent_gate_*`, weights `[heads, width, width]` used as `x @ W`):
//!
//! ```text
//! i_t = sigmoid(x_t W_i + b_i)        r_t = sigmoid(x_t W_a + b_a)
//! log a_t = -8 · r_t · softplus(recurrent_param)
//! h_t = a_t · h_{t-1} + sqrt(1 - a_t²) · i_t · x_t
//! ```
//!
//! At position 0 the state is reset: `a = 0` and the `sqrt(1 - a²)` factor is 1.

use crate::cache::RecurrentCache;
use crate::conv::CausalConv1d;
use crate::error::Result;
use crate::mlp::Activation;
use crate::nn::{computed, Linear};
use crate::weights::WeightPath;
use mlx_rs::ops::indexing::TryIndexOp;
use mlx_rs::{ops, Array, Dtype};

/// A loaded recurrent block (`temporal_block` of a recurrent layer).
#[derive(Debug, Clone)]
pub struct RecurrentBlock {
    pub linear_y: Linear,
    pub linear_x: Linear,
    pub linear_out: Linear,
    pub conv_1d: CausalConv1d,
    pub input_gate_weight: Array,
    pub input_gate_bias: Array,
    pub recurrent_gate_weight: Array,
    pub recurrent_gate_bias: Array,
    /// `softplus(recurrent_param)`, f32.
    pub softplus_param: Array,
    pub heads: i32,
}

impl RecurrentBlock {
    /// Loads the block for `hidden` features, an LRU of `width` channels in `heads` heads
    /// and a conv of `kernel` taps.
    pub fn load(w: &WeightPath, hidden: i32, width: i32, heads: i32, kernel: i32) -> Result<Self> {
        let bw = width / heads.max(1);
        let r = w.pp("rg_lru");
        let param = r
            .get("recurrent_param", &[width])?
            .as_dtype(Dtype::Float32)?;
        let softplus = ops::select(
            &param.gt(Array::from_f32(20.0))?,
            &param,
            ops::log1p(&ops::exp(&param)?)?,
        )?;
        Ok(RecurrentBlock {
            linear_y: Linear::load(&w.pp("linear_y"), hidden, width, true)?,
            linear_x: Linear::load(&w.pp("linear_x"), hidden, width, true)?,
            linear_out: Linear::load(&w.pp("linear_out"), width, hidden, true)?,
            conv_1d: CausalConv1d::load(&w.pp("conv_1d"), width, kernel, true)?,
            input_gate_weight: r.get("input_gate_weight", &[heads, bw, bw])?,
            input_gate_bias: r.get("input_gate_bias", &[heads, bw])?,
            recurrent_gate_weight: r.get("recurrent_gate_weight", &[heads, bw, bw])?,
            recurrent_gate_bias: r.get("recurrent_gate_bias", &[heads, bw])?,
            softplus_param: computed(softplus)?,
            heads,
        })
    }

    pub fn forward(&self, x: &Array, cache: &mut RecurrentCache) -> Result<Array> {
        let (batch, len) = (x.dim(0), x.dim(1));
        let y = Activation::GeluTanh.apply(&self.linear_y.forward(x)?)?;
        let xb = self.linear_x.forward(x)?;
        let (xb, conv_state) = self.conv_1d.forward(&xb, cache.conv.as_ref())?;
        let width = xb.dim(-1);
        let bw = width / self.heads;
        // Block-diagonal gates: [b, l, h, 1, bw] @ [h, bw, bw].
        let blocks = xb.reshape(&[batch, len, self.heads, 1, bw])?;
        let gate = |w: &Array, b: &Array| -> Result<Array> {
            let out = ops::matmul(&blocks, w)?.reshape(&[batch, len, self.heads, bw])?;
            Ok(ops::sigmoid(&out.add(b)?)?.reshape(&[batch, len, width])?)
        };
        let input_gate = gate(&self.input_gate_weight, &self.input_gate_bias)?;
        let recurrent_gate = gate(&self.recurrent_gate_weight, &self.recurrent_gate_bias)?;
        let f32 = |a: &Array| a.as_dtype(Dtype::Float32);
        let log_a = f32(&recurrent_gate)?
            .multiply(&self.softplus_param)?
            .multiply(Array::from_f32(-8.0))?;
        let a = ops::exp(&log_a)?;
        let multiplier = ops::sqrt(
            &Array::from_f32(1.0).subtract(ops::exp(&log_a.multiply(Array::from_f32(2.0))?)?)?,
        )?;
        // Position 0 resets the state.
        let offset = cache.offset();
        let at_start: Vec<bool> = (0..len).map(|t| offset + t == 0).collect();
        let reset = Array::from_slice(&at_start, &[1, len, 1]);
        let multiplier = ops::select(&reset, Array::from_f32(1.0), &multiplier)?;
        let a = ops::select(&reset, Array::from_f32(0.0), &a)?;
        let normalized = f32(&xb.multiply(&input_gate)?)?.multiply(&multiplier)?;
        let mut state = match &cache.state {
            Some(s) => s.clone(),
            None => ops::zeros::<f32>(&[batch, width])?,
        };
        let mut outs = Vec::with_capacity(len as usize);
        for t in 0..len {
            state = a
                .try_index((.., t))?
                .multiply(&state)?
                .add(normalized.try_index((.., t))?)?;
            outs.push(state.clone());
        }
        let h = ops::stack(&outs, 1)?.as_dtype(x.dtype())?;
        cache.conv = Some(conv_state);
        cache.state = Some(state);
        cache.advance(len);
        self.linear_out.forward(&h.multiply(&y)?)
    }
}
