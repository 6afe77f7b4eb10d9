//! Learned absolute position embeddings: a row per position, added to the token
//! embeddings before the first layer (GPT-2's and GPT-BigCode's `wpe`).
//!
//! Position `p` of a sequence is the `p`-th token since the start of the cache, so a step
//! that feeds `len` tokens after `offset` cached ones adds rows `offset .. offset + len`.
//! The table has `max_positions` rows and nothing beyond them: a longer sequence is an
//! error, not a wrap-around.
//!
//! ```
//! use mlx_models::positions::LearnedPositions;
//! use mlx_rs::Array;
//!
//! // Four positions of width 2: row p is [p, 10 p].
//! let table = Array::from_slice(&[0.0f32, 0.0, 1.0, 10.0, 2.0, 20.0, 3.0, 30.0], &[4, 2]);
//! let positions = LearnedPositions::new(table)?;
//! let tokens = Array::zeros::<f32>(&[1, 2, 2])?;
//! let h = positions.forward(&tokens, 1)?; // the two tokens after one cached one
//! assert_eq!(h.as_slice::<f32>(), &[1.0, 10.0, 2.0, 20.0]);
//! assert!(positions.forward(&tokens, 3).is_err()); // positions 3 and 4: past the table
//! # Ok::<(), mlx_models::Error>(())
//! ```

use crate::error::{Error, Result};
use crate::nn::{Embedding, Matrix};
use crate::weights::WeightPath;
use mlx_rs::Array;

/// The position table: one row of width `hidden` per position (dense or quantized, as
/// token embeddings are).
#[derive(Debug, Clone)]
pub struct LearnedPositions {
    pub table: Embedding,
    max_positions: i32,
    /// The row of position 0 (OPT and BioGPT keep two rows before it).
    first_row: i32,
}

impl LearnedPositions {
    /// Loads `weight` of shape `[max_positions, hidden_size]`.
    pub fn load(w: &WeightPath, max_positions: i32, hidden_size: i32) -> Result<Self> {
        Self::load_from_row(w, max_positions, 0, hidden_size)
    }

    /// Loads `weight` of shape `[first_row + max_positions, hidden_size]`, whose row
    /// `first_row + p` is position `p` (OPT's and BioGPT's tables start at row 2).
    pub fn load_from_row(
        w: &WeightPath,
        max_positions: i32,
        first_row: i32,
        hidden_size: i32,
    ) -> Result<Self> {
        Ok(LearnedPositions {
            table: Embedding::load(w, first_row + max_positions, hidden_size)?,
            max_positions,
            first_row,
        })
    }

    /// A dense table `[max_positions, hidden]` already in memory.
    pub fn new(weight: Array) -> Result<Self> {
        if weight.ndim() != 2 {
            return Err(Error::Mlx(mlx_rs::error::Exception::custom(format!(
                "a position table is [positions, hidden], found shape {:?}",
                weight.shape()
            ))));
        }
        let max_positions = weight.shape()[0];
        Ok(LearnedPositions {
            table: Embedding {
                weight: Matrix::Dense(weight),
                vocab_part: None,
            },
            max_positions,
            first_row: 0,
        })
    }

    /// How many positions the table holds.
    pub fn max_positions(&self) -> i32 {
        self.max_positions
    }

    /// `h` (`[batch, len, hidden]`) plus the rows of positions `offset .. offset + len`.
    pub fn forward(&self, h: &Array, offset: i32) -> Result<Array> {
        let len = h.shape()[h.ndim() - 2];
        let end = offset + len;
        if offset < 0 || end > self.max_positions {
            return Err(Error::PromptTooLong {
                prompt_tokens: end.max(0) as usize,
                context: self.max_positions as usize,
            });
        }
        let first = self.first_row + offset;
        let rows = self
            .table
            .forward(&Array::from_iter(first..first + len, &[len]))?;
        Ok(h.add(rows.as_dtype(h.dtype())?)?)
    }
}

/// How a sinusoidal table lays out its sines and cosines, and which frequencies it uses.
///
/// Row `p` holds, for `j < dim / 2` and frequency `f_j = base^(-j / (dim / 2 - shift))`,
/// `sin((p + first_position) · f_j)` and `cos((p + first_position) · f_j)`: all the sines
/// first, then all the cosines (fairseq's and CTRL's layout), or side by side per frequency
/// (`interleaved`, the original Transformer's).
/// CTRL's rates `1 / 10000^(2j / dim)` are `shift` 0; fairseq's (XGLM)
/// `exp(-j · ln 10000 / (dim / 2 - 1))` are `shift` 1, its positions starting at row 2.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sinusoid {
    pub base: f64,
    /// 0 or 1: the frequencies' exponent is `j / (dim / 2 - shift)`.
    pub shift: i32,
    /// The angle of position 0 is `first_position · f_j`.
    pub first_position: i32,
    pub interleaved: bool,
}

impl Default for Sinusoid {
    /// Base 10000, `shift` 0, position 0 at angle 0, sines then cosines (CTRL's table).
    fn default() -> Self {
        Sinusoid {
            base: 10000.0,
            shift: 0,
            first_position: 0,
            interleaved: false,
        }
    }
}

/// Fixed sinusoidal position embeddings ([`Sinusoid`]), computed rather than loaded, added
/// to the token embeddings before the first layer (XGLM, CTRL).
///
/// ```
/// use mlx_models::positions::{Sinusoid, SinusoidalPositions};
/// use mlx_rs::Array;
///
/// // Width 4: frequencies 1 and 1/100; sines of both, then cosines.
/// let positions = SinusoidalPositions::new(4, 8, Sinusoid::default())?;
/// let h = positions.forward(&Array::zeros::<f32>(&[1, 1, 4])?, 1)?; // position 1
/// let expected = [1f32.sin(), 0.01f32.sin(), 1f32.cos(), 0.01f32.cos()];
/// for (a, b) in h.as_slice::<f32>().iter().zip(expected) {
///     assert!((a - b).abs() < 1e-6);
/// }
/// assert!(positions.forward(&h, 8).is_err()); // past the 8 positions of the context
/// assert!(SinusoidalPositions::new(5, 8, Sinusoid::default()).is_err()); // odd width
/// # Ok::<(), mlx_models::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct SinusoidalPositions {
    /// `f_j`, `[dim / 2]`.
    inv_freq: Array,
    sinusoid: Sinusoid,
    max_positions: i32,
}

impl SinusoidalPositions {
    /// The table of width `dim` (even, and above `2 · shift`) for `max_positions` positions.
    pub fn new(dim: i32, max_positions: i32, sinusoid: Sinusoid) -> Result<Self> {
        let half = dim / 2;
        if dim % 2 != 0 || half <= sinusoid.shift || !(0..=1).contains(&sinusoid.shift) {
            return Err(Error::Mlx(mlx_rs::error::Exception::custom(format!(
                "a sinusoidal position table of width {dim} (shift {}) is not supported: \
                 the width must be even and above twice the shift",
                sinusoid.shift
            ))));
        }
        let denominator = f64::from(half - sinusoid.shift);
        let inv_freq: Vec<f32> = (0..half)
            .map(|j| sinusoid.base.powf(-f64::from(j) / denominator) as f32)
            .collect();
        Ok(SinusoidalPositions {
            inv_freq: Array::from_slice(&inv_freq, &[half]),
            sinusoid,
            max_positions,
        })
    }

    /// `h` (`[batch, len, hidden]`) plus the rows of positions `offset .. offset + len`.
    pub fn forward(&self, h: &Array, offset: i32) -> Result<Array> {
        let len = h.shape()[h.ndim() - 2];
        let end = offset + len;
        if offset < 0 || end > self.max_positions {
            return Err(Error::PromptTooLong {
                prompt_tokens: end.max(0) as usize,
                context: self.max_positions as usize,
            });
        }
        let first = offset + self.sinusoid.first_position;
        let positions = Array::from_iter((first..first + len).map(|p| p as f32), &[len, 1]);
        let angles = positions.multiply(self.inv_freq.reshape(&[1, -1])?)?;
        let (sin, cos) = (angles.sin()?, angles.cos()?);
        let rows = if self.sinusoid.interleaved {
            mlx_rs::ops::stack(&[sin, cos], -1)?.reshape(&[len, -1])?
        } else {
            mlx_rs::ops::concatenate(&[sin, cos], -1)?
        };
        Ok(h.add(rows.as_dtype(h.dtype())?)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each layout against its closed form, written out per entry.
    #[test]
    fn sinusoidal_rows_match_the_closed_form() {
        let (dim, len) = (8, 5);
        for sinusoid in [
            Sinusoid::default(),
            Sinusoid {
                shift: 1,
                first_position: 2,
                ..Sinusoid::default()
            },
            Sinusoid {
                base: 100.0,
                interleaved: true,
                ..Sinusoid::default()
            },
        ] {
            let table = SinusoidalPositions::new(dim, 16, sinusoid).unwrap();
            let offset = 3;
            let h = table
                .forward(&Array::zeros::<f32>(&[1, len, dim]).unwrap(), offset)
                .unwrap();
            let got = h.as_slice::<f32>();
            let half = dim / 2;
            for p in 0..len {
                let pos = f64::from(p + offset + sinusoid.first_position);
                for j in 0..half {
                    let f = sinusoid
                        .base
                        .powf(-f64::from(j) / f64::from(half - sinusoid.shift));
                    let (s, c) = ((pos * f).sin(), (pos * f).cos());
                    let (is, ic) = if sinusoid.interleaved {
                        (2 * j, 2 * j + 1)
                    } else {
                        (j, j + half)
                    };
                    let row = (p * dim) as usize;
                    assert!(
                        (f64::from(got[row + is as usize]) - s).abs() < 2e-6,
                        "{sinusoid:?}"
                    );
                    assert!(
                        (f64::from(got[row + ic as usize]) - c).abs() < 2e-6,
                        "{sinusoid:?}"
                    );
                }
            }
        }
    }
}
