//! Differential attention (DiffLlama; Ye et al., "Differential Transformer", 2024), as
//! Transformers computes it.
//!
//! Queries and keys are those of ordinary attention; the value heads are split in two halves
//! `v₁`, `v₂`, each repeated to the full key/value head count. Two attentions share the same
//! scores:
//!
//! ```text
//! a₁ = softmax(q kᵀ · scale) [v₁; v₁]        a₂ = softmax(q kᵀ · scale) [v₂; v₂]
//! a  = [a₁ | a₂]                              (per head: 2 × head_dim features)
//! o  = a[first half of the heads] − λ · a[second half of the heads]
//! out = (1 − λ_init) · rms_norm(o)            (over 2 × head_dim, no weight)
//! ```
//!
//! with `λ = exp(λ_q1 · λ_k1) − exp(λ_q2 · λ_k2) + λ_init` from four learned vectors of
//! `head_dim` (`lambda_q1`, `lambda_k1`, `lambda_q2`, `lambda_k2`) and a depth-dependent
//! `λ_init = 0.8 − 0.6 · exp(−0.3 · layer)`. The output has the shape of ordinary attention's
//! (`[batch, heads, tokens, head_dim]`), so the rest of the block — KV cache, masks, sliding
//! windows, batches of rows — is the attention block's.

use crate::attention::{attention_with_sinks, AttentionMask};
use crate::error::{Error, Result};
use crate::nn::scalar_like;
use crate::weights::WeightPath;
use mlx_rs::{ops, Array, Dtype};
use std::path::Path;

/// The learned λ of one layer and its normalisation.
#[derive(Debug, Clone)]
pub struct Differential {
    /// `exp(λ_q1·λ_k1) − exp(λ_q2·λ_k2) + λ_init`, computed in f32 as Transformers does.
    pub lambda: f32,
    /// `0.8 − 0.6 · exp(−0.3 · layer)`.
    pub lambda_init: f32,
    /// The epsilon of the RMS norm over each head pair's `2 × head_dim` features.
    pub eps: f32,
}

impl Differential {
    /// `λ_init` of decoder layer `layer` (counted from 0).
    pub fn lambda_init(layer: usize) -> f32 {
        0.8 - 0.6 * (-0.3 * layer as f32).exp()
    }

    /// Loads `lambda_q1`, `lambda_k1`, `lambda_q2`, `lambda_k2` (each `[head_dim]`) under `w`
    /// for decoder layer `layer` of the model at `source`. The value heads split in two
    /// halves and the query heads pair up, so both counts must be even: anything else is an
    /// [`Error::Config`] naming the field.
    pub fn load(
        w: &WeightPath,
        source: &Path,
        (num_heads, num_kv_heads, head_dim): (i32, i32, i32),
        layer: usize,
        eps: f32,
    ) -> Result<Self> {
        for (field, count) in [
            ("num_attention_heads", num_heads),
            ("num_key_value_heads", num_kv_heads),
        ] {
            if count < 2 || count % 2 != 0 {
                return Err(Error::Config {
                    path: source.to_path_buf(),
                    field: field.into(),
                    message: format!(
                        "differential attention pairs heads and splits the values in two halves: \
                         {count} is not an even count of at least 2"
                    ),
                });
            }
        }
        let dot = |a: &str, b: &str| -> Result<f32> {
            let (a, b) = (w.get(a, &[head_dim])?, w.get(b, &[head_dim])?);
            let product = a
                .as_dtype(Dtype::Float32)?
                .multiply(&b.as_dtype(Dtype::Float32)?)?
                .sum(None)?;
            Ok(product.item_exact::<f32>())
        };
        let lambda_init = Self::lambda_init(layer);
        let lambda = dot("lambda_q1", "lambda_k1")?.exp() - dot("lambda_q2", "lambda_k2")?.exp()
            + lambda_init;
        Ok(Differential {
            lambda,
            lambda_init,
            eps,
        })
    }

    /// Differential attention of `q` (`[batch, heads, tokens, head_dim]`) over `k` and `v`
    /// (`[batch, kv_heads, keys, head_dim]`, the cache's), scores scaled by `scale` under
    /// `mask`; the result is shaped as `q`.
    pub fn attend(
        &self,
        q: &Array,
        k: &Array,
        v: &Array,
        scale: f32,
        mask: &AttentionMask,
    ) -> Result<Array> {
        let (batch, heads, len, head_dim) = (q.dim(0), q.dim(1), q.dim(2), q.dim(3));
        let halves = v.split_equal(2, 1)?;
        let repeated = |half: &Array| ops::concatenate(&[half, half], 1);
        let a1 = attention_with_sinks(q, k, &repeated(&halves[0])?, scale, mask, None)?;
        let a2 = attention_with_sinks(q, k, &repeated(&halves[1])?, scale, mask, None)?;
        // [batch, tokens, heads, 2 × head_dim], then the first half of the heads against the
        // second.
        let a = ops::concatenate(&[a1, a2], -1)?.swap_axes(1, 2)?;
        let pairs = a.split_equal(2, 2)?;
        let lambda = scalar_like(self.lambda, &pairs[1])?;
        let o = pairs[0].subtract(&pairs[1].multiply(&lambda)?)?;
        let o = mlx_rs::fast::rms_norm(&o, None, self.eps)?;
        let o = o.multiply(&scalar_like(1.0 - self.lambda_init, &o)?)?;
        // Back to ordinary attention's layout: [batch, heads, tokens, head_dim].
        Ok(o.reshape(&[batch, len, heads, head_dim])?.swap_axes(1, 2)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic values in [-1, 1).
    fn values(shape: &[i32], seed: u32) -> Array {
        let n: i32 = shape.iter().product();
        let data: Vec<f32> = (0..n as u32)
            .map(|i| {
                let x = (i
                    .wrapping_mul(2_654_435_761)
                    .wrapping_add(seed.wrapping_mul(40_503)))
                    % 10_007;
                x as f32 / 5003.5 - 1.0
            })
            .collect();
        Array::from_slice(&data, shape)
    }

    /// The block against the formula written out in plain loops (f64): two softmaxes over the
    /// same causal scores, values in halves, head pairs, λ, RMS norm and `1 − λ_init`.
    #[test]
    #[allow(clippy::needless_range_loop)] // indices as in the formula
    fn differential_attention_matches_the_formula_written_out() {
        let (heads, kv_heads, len, d) = (4usize, 2usize, 5usize, 3usize);
        let q = values(&[1, heads as i32, len as i32, d as i32], 1);
        let k = values(&[1, kv_heads as i32, len as i32, d as i32], 2);
        let v = values(&[1, kv_heads as i32, len as i32, d as i32], 3);
        let (scale, eps) = (0.7f32, 1e-6f32);
        let block = Differential {
            lambda: 0.3,
            lambda_init: Differential::lambda_init(2),
            eps,
        };
        let ours = block
            .attend(&q, &k, &v, scale, &AttentionMask::Causal)
            .unwrap();
        assert_eq!(ours.shape(), &[1, heads as i32, len as i32, d as i32]);
        let ours: Vec<f32> = ours
            .swap_axes(1, 2)
            .unwrap()
            .reshape(&[-1])
            .unwrap()
            .as_slice()
            .to_vec();

        let (q, k, v): (Vec<f32>, Vec<f32>, Vec<f32>) = (
            q.as_slice().to_vec(),
            k.as_slice().to_vec(),
            v.as_slice().to_vec(),
        );
        let at = |t: &[f32], h: usize, i: usize, j: usize| f64::from(t[(h * len + i) * d + j]);
        let groups = heads / kv_heads;
        // a[h][i] = [a1 | a2], each head_dim wide.
        let mut a = vec![vec![vec![0.0f64; 2 * d]; len]; heads];
        for h in 0..heads {
            let kvh = h / groups;
            for i in 0..len {
                let scores: Vec<f64> = (0..=i)
                    .map(|t| {
                        (0..d)
                            .map(|j| at(&q, h, i, j) * at(&k, kvh, t, j))
                            .sum::<f64>()
                            * f64::from(scale)
                    })
                    .collect();
                let max = scores.iter().cloned().fold(f64::MIN, f64::max);
                let total: f64 = scores.iter().map(|s| (s - max).exp()).sum();
                for (half, offset) in [(0usize, 0usize), (1, d)] {
                    // Value head kvh of [v_half; v_half]: half `half`'s head kvh mod (kv/2).
                    let source = half * (kv_heads / 2) + kvh % (kv_heads / 2);
                    for j in 0..d {
                        a[h][i][offset + j] = (0..=i)
                            .map(|t| (scores[t] - max).exp() / total * at(&v, source, t, j))
                            .sum();
                    }
                }
            }
        }
        let lambda_init = f64::from(block.lambda_init);
        let mut expected = Vec::new();
        for i in 0..len {
            for p in 0..heads / 2 {
                let o: Vec<f64> = (0..2 * d)
                    .map(|j| a[p][i][j] - 0.3 * a[p + heads / 2][i][j])
                    .collect();
                let rms =
                    (o.iter().map(|x| x * x).sum::<f64>() / (2 * d) as f64 + f64::from(eps)).sqrt();
                expected.extend(o.iter().map(|x| x / rms * (1.0 - lambda_init)));
            }
        }
        assert_eq!(ours.len(), expected.len());
        let worst = ours
            .iter()
            .zip(&expected)
            .map(|(a, b)| (f64::from(*a) - b).abs())
            .fold(0.0, f64::max);
        // f32 softmax and norm over a handful of terms of magnitude ≤ 1: measured 1.2e-7; a
        // wrong value half gives 1.79.
        assert!(worst < 5e-7, "max |Δ| = {worst:e}");
    }

    #[test]
    fn lambda_init_follows_depth() {
        assert!((Differential::lambda_init(0) - 0.2).abs() < 1e-7);
        assert!((Differential::lambda_init(10) - (0.8 - 0.6 * (-3.0f32).exp())).abs() < 1e-7);
    }
}
