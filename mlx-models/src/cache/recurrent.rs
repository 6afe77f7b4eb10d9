//! The cache of a recurrent layer (Mamba, Mamba2, gated DeltaNet, short convolutions): a
//! fixed-size state instead of a growing list of keys and values.
//!
//! - `conv`: the last `kernel - 1` inputs of the layer's causal convolution,
//!   `[batch, kernel - 1, channels]`;
//! - `state`: the recurrent state (e.g. Mamba2's `[batch, heads, head_dim, state_size]`).
//!
//! A recurrent state summarizes every token seen and cannot be cut back to a prefix:
//! [`RecurrentCache::truncate`] says so (returns `false`, emptying the cache) unless the
//! prefix is the whole history or nothing, so a chat never continues from a wrong state.

use mlx_rs::Array;

/// The conv and recurrent state of one recurrent layer.
#[derive(Debug, Clone, Default)]
pub struct RecurrentCache {
    pub conv: Option<Array>,
    pub state: Option<Array>,
    offset: i32,
}

impl RecurrentCache {
    pub fn new() -> Self {
        Self::default()
    }

    /// Tokens seen so far.
    pub fn offset(&self) -> i32 {
        self.offset
    }

    /// Records that `tokens` more tokens went into the states.
    pub fn advance(&mut self, tokens: i32) {
        self.offset += tokens;
    }

    /// Keeps the first `len` tokens: possible only for `len >= offset` (nothing to drop)
    /// or `len <= 0` (start again); otherwise the cache empties itself and returns `false`.
    pub fn truncate(&mut self, len: i32) -> bool {
        if len >= self.offset {
            return true;
        }
        *self = Self::default();
        len <= 0
    }

    /// The states, for evaluation alongside the logits.
    pub fn arrays(&self) -> impl Iterator<Item = &Array> {
        self.conv.iter().chain(self.state.iter())
    }
}
