//! Causal depthwise convolutions, as state-space, linear-attention and short-convolution
//! layers use them: each channel is convolved with its own `kernel`-tap filter over the
//! current token and the `kernel - 1` before it. The last `kernel - 1` inputs are the
//! layer's conv state ([`crate::cache::RecurrentCache::conv`]), so a prompt can be fed in
//! pieces.

use crate::cache::RecurrentCache;
use crate::error::Result;
use crate::nn::{computed, Linear};
use crate::weights::WeightPath;
use mlx_rs::ops::indexing::TryIndexOp;
use mlx_rs::{ops, Array};

/// A causal depthwise conv1d over `[batch, tokens, channels]`.
#[derive(Debug, Clone)]
pub struct CausalConv1d {
    /// `[channels, kernel]`.
    pub weight: Array,
    /// `[channels]`.
    pub bias: Option<Array>,
}

impl CausalConv1d {
    /// Loads `weight` as PyTorch's `Conv1d(groups=channels)` stores it, `[channels, 1,
    /// kernel]` (mlx-lm's `[channels, kernel, 1]` and a plain `[channels, kernel]` are
    /// accepted too), and `bias` when `bias`.
    pub fn load(w: &WeightPath, channels: i32, kernel: i32, bias: bool) -> Result<Self> {
        let raw = w.get_any_shape("weight")?;
        let weight = match raw.shape() {
            [c, 1, k] if *c == channels && *k == kernel => raw.reshape(&[channels, kernel])?,
            [c, k, 1] if *c == channels && *k == kernel => raw.reshape(&[channels, kernel])?,
            [c, k] if *c == channels && *k == kernel => raw.clone(),
            other => return Err(w.shape_error("weight", &[channels, 1, kernel], other)),
        };
        w.count((channels * kernel) as usize);
        let bias = bias.then(|| w.get("bias", &[channels])).transpose()?;
        Ok(CausalConv1d {
            weight: computed(weight)?,
            bias,
        })
    }

    pub fn kernel(&self) -> i32 {
        self.weight.dim(1)
    }

    /// The convolution of `x` (`[batch, tokens, channels]`) following the inputs in
    /// `state` (`[batch, kernel - 1, channels]`, zeros when `None`); returns the output
    /// (`[batch, tokens, channels]`) and the new state.
    pub fn forward(&self, x: &Array, state: Option<&Array>) -> Result<(Array, Array)> {
        let (batch, len, channels) = (x.dim(0), x.dim(1), x.dim(2));
        let k = self.kernel();
        let state = match state {
            Some(s) => s.as_dtype(x.dtype())?,
            None => ops::zeros_dtype(&[batch, k - 1, channels], x.dtype())?,
        };
        let padded = ops::concatenate(&[&state, x], 1)?;
        let weight = self.weight.as_dtype(x.dtype())?;
        // Σ_j x[t + j] · w[:, j] over the window ending at t.
        let mut out: Option<Array> = None;
        for j in 0..k {
            let tap = padded.try_index((.., j..j + len, ..))?;
            let w_j = weight.try_index((.., j))?;
            let term = tap.multiply(&w_j)?;
            out = Some(match out {
                Some(acc) => acc.add(&term)?,
                None => term,
            });
        }
        let mut out = out.unwrap_or_else(|| x.clone());
        if let Some(b) = &self.bias {
            out = out.add(b.as_dtype(x.dtype())?)?;
        }
        let total = padded.dim(1);
        let new_state = padded.try_index((.., total - (k - 1).., ..))?;
        Ok((out, new_state))
    }
}

/// LFM2's gated short convolution: `in_proj` gives `B`, `C` and `x`, a causal depthwise
/// conv runs over `B · x`, and `out_proj(C · conv)` is the output.
#[derive(Debug, Clone)]
pub struct ShortConv {
    pub in_proj: Linear,
    pub conv: CausalConv1d,
    pub out_proj: Linear,
}

impl ShortConv {
    /// Loads `in_proj`, `conv` (`kernel` taps over `hidden` channels) and `out_proj`, all with
    /// biases when `bias`.
    pub fn load(w: &WeightPath, hidden: i32, kernel: i32, bias: bool) -> Result<Self> {
        Ok(ShortConv {
            in_proj: Linear::load(&w.pp("in_proj"), hidden, 3 * hidden, bias)?,
            conv: CausalConv1d::load(&w.pp("conv"), hidden, kernel, bias)?,
            out_proj: Linear::load(&w.pp("out_proj"), hidden, hidden, bias)?,
        })
    }

    /// The block's output for `x` (`[batch, tokens, hidden]`), continuing from and updating
    /// `cache`'s conv state.
    pub fn forward(&self, x: &Array, cache: &mut RecurrentCache) -> Result<Array> {
        let parts = self.in_proj.forward(x)?.split_equal(3, -1)?;
        let (b, c, xs) = (&parts[0], &parts[1], &parts[2]);
        let (conv, state) = self.conv.forward(&b.multiply(xs)?, cache.conv.as_ref())?;
        cache.conv = Some(state);
        cache.advance(x.dim(1));
        self.out_proj.forward(&c.multiply(&conv)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_definition_and_carries_its_state() {
        // Two channels, kernel 3: y[t] = Σ_j x[t - 2 + j] w[j] (+ b), zeros before t = 0.
        let conv = CausalConv1d {
            weight: Array::from_slice(&[1.0f32, 2.0, 3.0, -1.0, 0.5, 4.0], &[2, 3]),
            bias: Some(Array::from_slice(&[0.25f32, -0.5], &[2])),
        };
        let xs: Vec<f32> = (0..10).map(|v| v as f32).collect(); // 5 tokens × 2 channels
        let x = Array::from_slice(&xs, &[1, 5, 2]);
        let expected = |t: usize, c: usize| -> f32 {
            let w = [[1.0f32, 2.0, 3.0], [-1.0, 0.5, 4.0]][c];
            let b = [0.25f32, -0.5][c];
            (0..3)
                .map(|j| {
                    let s = t as i32 - 2 + j as i32;
                    if s < 0 {
                        0.0
                    } else {
                        xs[s as usize * 2 + c] * w[j]
                    }
                })
                .sum::<f32>()
                + b
        };
        let (y, _) = conv.forward(&x, None).unwrap();
        for t in 0..5 {
            for c in 0..2 {
                assert_eq!(y.as_slice::<f32>()[t * 2 + c], expected(t, c));
            }
        }
        // In pieces of 2, 1 and 2 tokens with the state carried.
        let mut state = None;
        let mut got = Vec::new();
        for (a, b) in [(0, 2), (2, 3), (3, 5)] {
            let piece = x.try_index((.., a..b, ..)).unwrap();
            let (y, s) = conv.forward(&piece, state.as_ref()).unwrap();
            got.extend_from_slice(y.as_slice::<f32>());
            state = Some(s);
        }
        assert_eq!(got, y.as_slice::<f32>());
    }
}
