//! The cache of a multi-head latent attention layer (DeepSeek-V2/V3): per token only the
//! compressed key/value latent and the shared RoPE key, `[batch, 1, tokens, kv_lora_rank +
//! qk_rope_head_dim]`, instead of full keys and values per head.
//!
//! Tokens are written into a buffer that grows by [`GROWTH_STEP`] tokens at a time (one
//! slice update per step, as mlx-lm's `KVCache` does), so decoding does not copy the whole
//! history at every token.

use crate::attention::AttentionMask;
use crate::error::{Error, Result};
use mlx_rs::error::Exception;
use mlx_rs::ops::indexing::{TryIndexMutOp, TryIndexOp};
use mlx_rs::{ops, Array};

/// Token slots the buffer grows by.
const GROWTH_STEP: i32 = 256;

/// The latent entries of every token seen so far.
#[derive(Debug, Clone, Default)]
pub struct LatentCache {
    /// `[batch, 1, capacity, width]`; the first `offset` token slots are filled.
    buffer: Option<Array>,
    offset: i32,
}

impl LatentCache {
    pub fn new() -> Self {
        Self::default()
    }

    /// Tokens seen so far: the position of the next token.
    pub fn offset(&self) -> i32 {
        self.offset
    }

    /// Appends `latent` (`[batch, 1, tokens, width]`, positions `offset..`) and returns every
    /// token's entry so far, `[batch, 1, offset, width]`, with the mask the new queries need.
    pub fn attend(&mut self, latent: Array) -> Result<(Array, AttentionMask)> {
        let shape = latent.shape().to_vec();
        if shape.len() != 4 || shape[1] != 1 {
            return Err(Error::Mlx(Exception::custom(format!(
                "LatentCache: entries {shape:?} must be [batch, 1, tokens, width]"
            ))));
        }
        let new = shape[2];
        let end = self.offset + new;
        let mut buffer = match self.buffer.take() {
            Some(b) if b.dim(0) == shape[0] && b.dim(3) == shape[3] => b,
            Some(_) => {
                return Err(Error::Mlx(Exception::custom(
                    "LatentCache: entries of another batch or width than the cached ones",
                )))
            }
            None => ops::zeros_dtype(&[shape[0], 1, 0, shape[3]], latent.dtype())?,
        };
        if end > buffer.dim(2) {
            let grow = ((end - buffer.dim(2) + GROWTH_STEP - 1) / GROWTH_STEP) * GROWTH_STEP;
            let zeros = ops::zeros_dtype(&[shape[0], 1, grow, shape[3]], buffer.dtype())?;
            let kept = buffer.try_index((.., .., ..self.offset))?;
            buffer = ops::concatenate(&[kept, zeros], 2)?;
        }
        buffer.try_index_mut((.., .., self.offset..end), &latent)?;
        let all = buffer.try_index((.., .., ..end))?;
        self.buffer = Some(buffer);
        self.offset = end;
        let mask = if new == 1 {
            AttentionMask::None
        } else {
            AttentionMask::Causal
        };
        Ok((all, mask))
    }

    /// Keeps the first `len` tokens; always possible (returns `true`).
    pub fn truncate(&mut self, len: i32) -> bool {
        if len <= 0 {
            *self = Self::default();
        } else if len < self.offset {
            self.offset = len;
        }
        true
    }

    /// The stored entries, `[batch, 1, offset, width]` (none when empty).
    pub fn entries(&self) -> Result<Option<Array>> {
        match &self.buffer {
            Some(b) if self.offset > 0 => Ok(Some(b.try_index((.., .., ..self.offset))?)),
            _ => Ok(None),
        }
    }

    /// The buffer, for evaluation alongside the logits.
    pub fn arrays(&self) -> impl Iterator<Item = &Array> {
        self.buffer.iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entries(from: i32, tokens: i32, width: i32) -> Array {
        let data: Vec<f32> = (from * width..(from + tokens) * width)
            .map(|v| v as f32)
            .collect();
        Array::from_slice(&data, &[1, 1, tokens, width])
    }

    #[test]
    fn appends_across_growth_steps_and_truncates() {
        let mut cache = LatentCache::new();
        let (all, mask) = cache.attend(entries(0, 300, 3)).unwrap();
        assert!(matches!(mask, AttentionMask::Causal));
        assert_eq!(all.shape(), &[1, 1, 300, 3]);
        for t in 300..310 {
            let (all, mask) = cache.attend(entries(t, 1, 3)).unwrap();
            assert!(matches!(mask, AttentionMask::None));
            assert_eq!(all.shape(), &[1, 1, t + 1, 3]);
        }
        let expected: Vec<f32> = (0..310 * 3).map(|v| v as f32).collect();
        assert_eq!(
            cache.entries().unwrap().unwrap().as_slice::<f32>(),
            &expected[..]
        );
        assert!(cache.truncate(5));
        let (all, _) = cache.attend(entries(5, 2, 3)).unwrap();
        let expected: Vec<f32> = (0..7 * 3).map(|v| v as f32).collect();
        assert_eq!(all.as_slice::<f32>(), &expected[..]);
        assert!(cache.attend(entries(0, 1, 4)).is_err());
    }
}
