//! Ternary weights as BitNet's Hub checkpoints ship them (Transformers'
//! `integrations/bitnet.py`): a linear layer's `weight` `[out, in]` of values in
//! {-1, 0, 1} is stored as `uint8` `[out / 4, in]`, four values to a byte, with a
//! `weight_scale` `[1]` beside it:
//!
//! ```text
//! weight[i · out/4 + r, c] = ((packed[r, c] >> 2i) & 3) − 1      for i in 0..4
//! ```
//!
//! and the layer computes `x · (weightᵀ / weight_scale)`. [`unpack_ternary`] turns every
//! such pair into that float weight, so the model loads it like any other (Transformers also
//! quantizes the activations to 8 bits at run time; mlx-lm's `BitLinear` does not, nor does
//! this).

use crate::error::{Error, Result};
use crate::weights::Weights;
use mlx_rs::{Array, Dtype};

/// Ternary values per packed byte.
const PER_BYTE: i32 = 4;

/// Replaces each packed `<layer>.weight` (uint8, with a `<layer>.weight_scale`) of `weights`
/// by its float weight `ternary / weight_scale`, in the scale's dtype. A byte holding the
/// unused code 3 or a scale that is not one positive finite number is an error naming the
/// tensor.
pub fn unpack_ternary(weights: &mut Weights) -> Result<()> {
    let packed: Vec<String> = weights
        .names()
        .filter_map(|name| name.strip_suffix(".weight_scale"))
        .map(|layer| format!("{layer}.weight"))
        .collect();
    let source = weights.source().to_owned();
    for name in packed {
        let scale_name = format!("{name}_scale");
        let bad = |message: String| Error::UnsupportedQuantization {
            path: source.clone(),
            name: name.clone(),
            message,
        };
        let (Some(codes), Some(scale)) = (weights.remove(&name), weights.remove(&scale_name))
        else {
            return Err(bad(format!("`{scale_name}` without its packed weight")));
        };
        if codes.dtype() != Dtype::Uint8 || codes.ndim() != 2 {
            return Err(bad(format!(
                "a packed ternary weight is a uint8 matrix, found {:?} of shape {:?}",
                codes.dtype(),
                codes.shape()
            )));
        }
        let scale_value = scale.as_dtype(Dtype::Float32)?;
        scale_value.eval()?;
        let s = scale_value.as_slice::<f32>();
        if scale.shape() != [1] || !(s[0].is_finite() && s[0] > 0.0) {
            return Err(bad(format!(
                "`{scale_name}` must be one positive number, found {s:?} of shape {:?}",
                scale.shape()
            )));
        }
        let (rows, cols) = (codes.dim(0), codes.dim(1));
        codes.eval()?;
        let bytes = codes.as_slice::<u8>();
        let mut ternary = vec![0f32; (PER_BYTE * rows * cols) as usize];
        for i in 0..PER_BYTE {
            for (k, &byte) in bytes.iter().enumerate() {
                let code = (byte >> (2 * i)) & 3;
                if code == 3 {
                    return Err(bad(format!(
                        "byte {k} holds the code 3, which no ternary value packs to"
                    )));
                }
                ternary[(i * rows * cols) as usize + k] = f32::from(code) - 1.0;
            }
        }
        let weight = Array::from_slice(&ternary, &[PER_BYTE * rows, cols])
            .divide(&scale_value)?
            .as_dtype(scale.dtype())?;
        weight.eval()?;
        weights.insert(name, weight);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    /// The example of Transformers' `unpack_weights` docstring: its function gives
    /// `[[0, -1], [-1, 1], [-1, 1], [-1, 1], [1, 0], [0, -1], [1, -1], [1, -1]]` (run on
    /// Transformers 5.23.0), here divided by the scale 2.
    #[test]
    fn unpacks_as_transformers_does() -> Result<()> {
        let bytes = [0b1010_0001u8, 0b0001_1000, 0b1001_0000, 0b0000_1010];
        let tensors = HashMap::from([
            ("l.weight".to_owned(), Array::from_slice(&bytes, &[2, 2])),
            (
                "l.weight_scale".to_owned(),
                Array::from_slice(&[2.0f32], &[1]),
            ),
        ]);
        let mut weights = Weights::new(tensors, "bitnet");
        unpack_ternary(&mut weights)?;
        let w = weights.root().get("l.weight", &[8, 2])?;
        let transformers = [0, -1, -1, 1, -1, 1, -1, 1, 1, 0, 0, -1, 1, -1, 1, -1];
        let expected: Vec<f32> = transformers.iter().map(|&t| t as f32 / 2.0).collect();
        assert_eq!(w.as_slice::<f32>(), expected.as_slice());
        weights.check_all_used()
    }

    /// The unused code 3 is refused, naming the tensor.
    #[test]
    fn refuses_the_unused_code() {
        let tensors = HashMap::from([
            (
                "l.weight".to_owned(),
                Array::from_slice(&[0b0000_0011u8], &[1, 1]),
            ),
            (
                "l.weight_scale".to_owned(),
                Array::from_slice(&[1.0f32], &[1]),
            ),
        ]);
        let mut weights = Weights::new(tensors, "bitnet");
        let err = unpack_ternary(&mut weights).unwrap_err().to_string();
        assert!(
            err.contains("`l.weight`") && err.contains("code 3"),
            "{err}"
        );
    }
}
