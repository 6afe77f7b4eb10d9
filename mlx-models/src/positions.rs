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
