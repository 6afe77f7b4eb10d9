//! ALiBi: attention with linear biases (Press et al., 2021), the positional encoding of
//! BLOOM, MPT and Falcon's RW models. There is no rotary or learned position: each head
//! `h` adds `slope_h · (k − q)` to the score of query position `q` on key position `k`,
//! so a head looks less far back the steeper its slope.
//!
//! The slopes form a geometric sequence. For `n` heads, with `p` the power of two at or
//! above `n` and `max_bias` (MPT's `alibi_bias_max`, 8 for BLOOM and Falcon):
//! `slope_i = 2^(−max_bias · i / p)` for `i = 1..=p`; when `n` is not a power of two the
//! even-numbered then odd-numbered of those are taken, the first `n` of them. With
//! `max_bias` 8 that is BLOOM's rule (the slopes of the power of two below `n`, then every
//! other slope of the next power of two), written the other way round.
//!
//! A softmax does not change when a row's scores all move by the same amount, so
//! `slope · k` (BLOOM counts keys from the first real token, MPT from the last) and
//! `slope · (k − q)` give the same attention: the bias here depends only on how far back a
//! key is, which is what lets it work with any cache offset and with left-padded batches
//! (padding slots are masked out; the distance between real tokens is the slot distance).

use crate::error::{Error, Result};
use mlx_rs::{Array, Dtype};

/// The per-head slopes of `num_heads` heads (see the module docs).
///
/// ```
/// use mlx_models::alibi::alibi_slopes;
/// // 4 heads, max bias 8: 2^-2, 2^-4, 2^-6, 2^-8.
/// assert_eq!(alibi_slopes(4, 8.0).unwrap(), vec![0.25, 0.0625, 0.015625, 0.00390625]);
/// // 6 heads: those of 8 heads at even then odd places: 2^-2, 2^-4, 2^-6, 2^-8, 2^-1, 2^-3.
/// assert_eq!(
///     alibi_slopes(6, 8.0).unwrap(),
///     vec![0.25, 0.0625, 0.015625, 0.00390625, 0.5, 0.125]
/// );
/// ```
pub fn alibi_slopes(num_heads: i32, max_bias: f32) -> Result<Vec<f32>> {
    if num_heads <= 0 {
        return Err(Error::config(
            "config.json",
            "num_attention_heads",
            format!("ALiBi needs at least one head, not {num_heads}"),
        ));
    }
    if !(max_bias.is_finite() && max_bias > 0.0) {
        return Err(Error::config(
            "config.json",
            "alibi_bias_max",
            format!("must be a positive number, not {max_bias}"),
        ));
    }
    let p = (num_heads as u32).next_power_of_two();
    let all: Vec<f32> = (1..=p)
        .map(|i| (-(max_bias as f64) * i as f64 / p as f64).exp2() as f32)
        .collect();
    if p == num_heads as u32 {
        return Ok(all);
    }
    let (odd, even): (Vec<_>, Vec<_>) = all.iter().enumerate().partition(|(i, _)| i % 2 == 1);
    Ok(odd
        .into_iter()
        .chain(even)
        .map(|(_, s)| *s)
        .take(num_heads as usize)
        .collect())
}

/// ALiBi's slopes for the heads one attention block computes.
#[derive(Debug, Clone)]
pub struct Alibi {
    /// One slope per query head, `[heads]`.
    pub slopes: Vec<f32>,
}

impl Alibi {
    /// The slopes of `num_heads` heads for `max_bias`, each multiplied by `factor` (1, or
    /// the attention scale where a model scales the biased scores: Falcon).
    pub fn new(num_heads: i32, max_bias: f32, factor: f32) -> Result<Alibi> {
        let slopes = alibi_slopes(num_heads, max_bias)?
            .into_iter()
            .map(|s| s * factor)
            .collect();
        Ok(Alibi { slopes })
    }

    /// The slopes of heads `heads` only (one rank's share under tensor parallelism).
    pub fn heads(&self, heads: std::ops::Range<i32>) -> Alibi {
        Alibi {
            slopes: self.slopes[heads.start as usize..heads.end as usize].to_vec(),
        }
    }

    /// The additive bias `[1, heads, len, keys]` for the last `len` of `keys` key slots as
    /// queries: `slope_h · (k − q)` with key slot `k` and query slot `q = keys − len + i`
    /// (zero on the diagonal, negative for earlier keys).
    pub fn bias(&self, len: i32, keys: i32, dtype: Dtype) -> Result<Array> {
        let heads = self.slopes.len() as i32;
        let first_query = keys - len;
        let mut data = Vec::with_capacity((heads * len * keys) as usize);
        for slope in &self.slopes {
            for q in first_query..keys {
                data.extend((0..keys).map(|k| slope * (k - q) as f32));
            }
        }
        Ok(Array::from_slice(&data, &[1, heads, len, keys]).as_dtype(dtype)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// BLOOM's rule as Transformers writes it (`build_alibi_tensor`): the closest power of
    /// two below, `base = 2^(−2^−(log2(c) − 3))`, its powers `1..=c`, then the extra base of
    /// `2c` to the odd powers `1, 3, …` for the remaining heads.
    fn bloom_slopes(n: i32) -> Vec<f32> {
        let c = 2f64.powi((n as f64).log2().floor() as i32);
        let base = 2f64.powf(-(2f64.powf(-(c.log2() - 3.0))));
        let mut slopes: Vec<f64> = (1..=c as i32).map(|i| base.powi(i)).collect();
        if c as i32 != n {
            let extra = 2f64.powf(-(2f64.powf(-((2.0 * c).log2() - 3.0))));
            let remaining = (c as i32).min(n - c as i32);
            slopes.extend((0..remaining).map(|j| extra.powi(1 + 2 * j)));
        }
        slopes.into_iter().map(|s| s as f32).collect()
    }

    /// MPT's rule (`build_mpt_alibi_tensor`): `1 / 2^(i · max_bias / p)` for `p` the next
    /// power of two, then, when `p` is not `n`, `slopes[1::2]` followed by `slopes[::2]`,
    /// cut to `n`.
    fn mpt_slopes(n: i32, max_bias: f64) -> Vec<f32> {
        let p = 2f64.powf((n as f64).log2().ceil());
        let all: Vec<f64> = (1..=p as i32)
            .map(|i| 1.0 / 2f64.powf(i as f64 * max_bias / p))
            .collect();
        if p as i32 == n {
            return all.into_iter().map(|s| s as f32).collect();
        }
        let mut out: Vec<f64> = all.iter().skip(1).step_by(2).copied().collect();
        out.extend(all.iter().step_by(2));
        out.truncate(n as usize);
        out.into_iter().map(|s| s as f32).collect()
    }

    fn close(a: &[f32], b: &[f32]) -> bool {
        a.len() == b.len()
            && a.iter()
                .zip(b)
                .all(|(x, y)| (x - y).abs() <= 1e-7 * y.abs())
    }

    #[test]
    fn slopes_follow_bloom_and_mpt() -> Result<()> {
        for n in [1, 2, 3, 4, 5, 6, 8, 12, 16, 20, 32, 40, 71, 112] {
            let got = alibi_slopes(n, 8.0)?;
            assert!(close(&got, &bloom_slopes(n)), "bloom, {n} heads: {got:?}");
            assert!(close(&got, &mpt_slopes(n, 8.0)), "mpt, {n} heads: {got:?}");
            for max_bias in [4.0, 16.0] {
                let got = alibi_slopes(n, max_bias)?;
                let want = mpt_slopes(n, max_bias as f64);
                assert!(close(&got, &want), "mpt max {max_bias}, {n} heads: {got:?}");
            }
        }
        Ok(())
    }

    #[test]
    fn bad_heads_and_bias_are_config_errors() {
        assert!(matches!(alibi_slopes(0, 8.0), Err(Error::Config { .. })));
        assert!(matches!(alibi_slopes(4, 0.0), Err(Error::Config { .. })));
        assert!(matches!(
            alibi_slopes(4, f32::NAN),
            Err(Error::Config { .. })
        ));
    }

    /// The bias of the last `len` queries over `keys` keys, against `slope · (k − q)`
    /// written out for a prefill (len = keys) and a decode step after 5 cached tokens.
    #[test]
    fn bias_is_slope_times_key_distance() -> Result<()> {
        let alibi = Alibi::new(3, 8.0, 0.5)?;
        for (len, keys) in [(4, 4), (1, 6), (2, 7)] {
            let bias = alibi.bias(len, keys, Dtype::Float32)?;
            assert_eq!(bias.shape(), &[1, 3, len, keys]);
            let got = bias.as_slice::<f32>();
            for h in 0..3 {
                let slope = alibi.slopes[h];
                for i in 0..len {
                    for k in 0..keys {
                        let q = keys - len + i;
                        let want = slope * (k - q) as f32;
                        let at = (h as i32 * len * keys + i * keys + k) as usize;
                        assert_eq!(got[at], want, "head {h}, query {q}, key {k}");
                    }
                }
            }
        }
        assert_eq!(
            alibi.slopes,
            vec![
                0.5 * 2f32.powi(-4),
                0.5 * 2f32.powi(-8),
                0.5 * 2f32.powi(-2)
            ]
        );
        assert_eq!(alibi.heads(1..3).slopes, alibi.slopes[1..3].to_vec());
        Ok(())
    }
}
