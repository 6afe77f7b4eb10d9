//! Key/value caches for autoregressive decoding.

use crate::error::Result;
use mlx_rs::{ops, Array};

/// The keys and values of one attention layer for every token seen so far
/// (`[batch, kv_heads, tokens, head_dim]`).
#[derive(Debug, Clone, Default)]
pub struct KvCache {
    keys: Option<Array>,
    values: Option<Array>,
    offset: i32,
}

impl KvCache {
    pub fn new() -> Self {
        Self::default()
    }

    /// How many tokens the cache holds: the position of the next token.
    pub fn offset(&self) -> i32 {
        self.offset
    }

    /// Appends the new `keys`/`values` and returns everything cached, new tokens included.
    pub fn update(&mut self, keys: Array, values: Array) -> Result<(Array, Array)> {
        let (keys, values) = match (self.keys.take(), self.values.take()) {
            (Some(k), Some(v)) => (
                ops::concatenate(&[k, keys], 2)?,
                ops::concatenate(&[v, values], 2)?,
            ),
            _ => (keys, values),
        };
        self.offset = keys.dim(2);
        self.keys = Some(keys.clone());
        self.values = Some(values.clone());
        Ok((keys, values))
    }

    /// Keeps only the first `len` tokens (e.g. the common prefix of two chat turns).
    pub fn truncate(&mut self, len: i32) -> Result<()> {
        if len >= self.offset {
            return Ok(());
        }
        if len <= 0 {
            *self = Self::default();
            return Ok(());
        }
        let keep =
            |a: &Array| -> Result<Array> { Ok(a.split_at_indices(&[len], 2)?.swap_remove(0)) };
        self.keys = self.keys.as_ref().map(keep).transpose()?;
        self.values = self.values.as_ref().map(keep).transpose()?;
        self.offset = len;
        Ok(())
    }

    /// The cached arrays, for evaluation alongside the logits.
    pub fn arrays(&self) -> impl Iterator<Item = &Array> {
        self.keys.iter().chain(self.values.iter())
    }
}
