//! ALiBi read from what Transformers computes: the `position_bias` probe (probes.py) feeds
//! decoder layer 0 one token repeated and measures, per head, the constant step of the
//! attention scores between neighbouring keys. Those slopes are fitted here to
//! `mlx_models::alibi::alibi_slopes(heads, max_bias) · factor`.

use mlx_models::alibi::alibi_slopes;
use serde_json::Value;

/// What multiplies the slopes of [`alibi_slopes`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum AlibiFactor {
    One,
    /// The attention scale `head_dim^-0.5` (the model scales the biased scores: Falcon).
    AttentionScale,
}

/// ALiBi as the module computes it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AlibiPlan {
    pub max_bias: f32,
    pub factor: AlibiFactor,
}

/// The relative agreement the fitted slopes must reach with every measured one (the probe
/// measures them to ~1e-7 in f64 from f32 attention weights).
const TOLERANCE: f64 = 1e-4;

/// The measured per-head slopes, `None` where the probe found no linear position bias.
pub fn measured_slopes(facts: &Value) -> Option<Vec<f64>> {
    facts
        .pointer("/position_bias/slopes")?
        .as_array()?
        .iter()
        .map(Value::as_f64)
        .collect()
}

/// Fits `slopes` (one per head, `head_dim` features each) to ALiBi's geometric slopes:
/// `max_bias` from the ratio of the first two heads (`2^(−max_bias/p)` for a power of two
/// `p` of heads, its square otherwise: heads 0 and 1 hold every other slope), the factor
/// from the first head; every head must then agree. `Err` says why not.
pub fn fit(slopes: &[f64], head_dim: i32) -> Result<AlibiPlan, String> {
    let n = slopes.len() as i32;
    if n < 2 {
        return Err(format!("{n} head(s): too few to tell ALiBi's slopes"));
    }
    let p = (n as u32).next_power_of_two() as f64;
    let steps = if p as i32 == n { 1.0 } else { 2.0 };
    let ratio = slopes[1] / slopes[0];
    if !(ratio > 0.0 && ratio < 1.0) {
        return Err(format!(
            "slopes {slopes:?} do not fall geometrically from head 0"
        ));
    }
    let max_bias = -ratio.log2() * p / steps;
    // A whole or half number where the measurement allows (8, MPT's configured values).
    let max_bias = match (max_bias * 2.0).round() / 2.0 {
        m if (m - max_bias).abs() < 1e-3 => m,
        _ => max_bias,
    } as f32;
    let base = alibi_slopes(n, max_bias).map_err(|e| e.to_string())?;
    let factor = slopes[0] / base[0] as f64;
    let scale = (head_dim as f64).powf(-0.5);
    let factor = if (factor - 1.0).abs() < TOLERANCE {
        AlibiFactor::One
    } else if (factor - scale).abs() < TOLERANCE * scale {
        AlibiFactor::AttentionScale
    } else {
        return Err(format!(
            "slopes {slopes:?} are ALiBi's of max bias {max_bias} times {factor}, neither 1 \
             nor the attention scale {scale}"
        ));
    };
    let f = match factor {
        AlibiFactor::One => 1.0,
        AlibiFactor::AttentionScale => scale,
    };
    for (h, (got, want)) in slopes.iter().zip(&base).enumerate() {
        let want = *want as f64 * f;
        if (got - want).abs() > TOLERANCE * want {
            return Err(format!(
                "head {h}'s slope {got} is not ALiBi's {want} (max bias {max_bias})"
            ));
        }
    }
    Ok(AlibiPlan { max_bias, factor })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Slopes as the probe recorded them on Transformers 5.23's tiny models: BLOOM with 4
    /// and 6 heads, MPT (4 heads, default `alibi_bias_max`), Falcon with `alibi` (4 heads of
    /// 16 features).
    #[test]
    fn fits_recorded_probes() {
        let bloom4 = [0.249999997, 0.062499997, 0.015625001, 0.003906247];
        let bloom6 = [
            0.249999998,
            0.062499997,
            0.015625001,
            0.003906249,
            0.499999999,
            0.124999999,
        ];
        let one = |max_bias| AlibiPlan {
            max_bias,
            factor: AlibiFactor::One,
        };
        assert_eq!(fit(&bloom4, 16), Ok(one(8.0)));
        assert_eq!(fit(&bloom6, 8), Ok(one(8.0)));
        let mpt16: Vec<f64> = [0.0625, 0.00390625, 0.000244140625, 0.0000152587890625].to_vec();
        assert_eq!(fit(&mpt16, 16), Ok(one(16.0)));
        let falcon = [0.124999997, 0.031249999, 0.0078125, 0.001953126];
        // Transformers' Falcon adds the bias twice, each scaled by `head_dim^-0.5` (into
        // the mask and onto the scores), in bf16: twice the attention scale is no factor
        // the block takes, so the fit refuses it rather than guess.
        let refused = fit(&falcon, 16).unwrap_err();
        assert!(refused.contains("attention scale"), "{refused}");
    }

    #[test]
    fn refuses_what_is_not_alibi() {
        // A head out of the geometric sequence.
        assert!(fit(&[0.25, 0.0625, 0.02, 0.00390625], 16).is_err());
        // Rising slopes.
        assert!(fit(&[0.0625, 0.25, 0.5, 1.0], 16).is_err());
        assert!(fit(&[0.25], 16).is_err());
    }
}
