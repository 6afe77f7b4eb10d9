//! Scaled dot-product attention and its masks.

use crate::error::Result;
use mlx_rs::fast::ScaledDotProductAttentionMask;
use mlx_rs::{Array, Dtype};

/// Which keys each query may see.
#[derive(Debug, Clone)]
pub enum AttentionMask {
    /// Every cached key (a single new token).
    None,
    /// Keys up to the query's own position.
    Causal,
    /// An additive mask `[queries, keys]` (0 or -inf), e.g. for sliding windows.
    Additive(Array),
}

impl AttentionMask {
    /// The mask for `len` new tokens after `offset` cached ones, optionally limited to a
    /// sliding window of `window` tokens (a query sees itself and `window - 1` before it).
    pub fn new(len: i32, offset: i32, window: Option<i32>, dtype: Dtype) -> Result<Self> {
        let total = offset + len;
        match window {
            Some(w) if total > w => {
                let mut data = Vec::with_capacity((len * total) as usize);
                for q in 0..len {
                    let pos = offset + q;
                    for k in 0..total {
                        let visible = k <= pos && pos - k < w;
                        data.push(if visible { 0.0f32 } else { f32::NEG_INFINITY });
                    }
                }
                let mask = Array::from_slice(&data, &[len, total]).as_dtype(dtype)?;
                Ok(AttentionMask::Additive(mask))
            }
            _ if len == 1 => Ok(AttentionMask::None),
            _ => Ok(AttentionMask::Causal),
        }
    }
}

/// `softmax(q kᵀ · scale + mask) v` over `[batch, heads, tokens, head_dim]`, with fewer
/// key/value heads than query heads allowed (grouped-query attention).
pub fn scaled_dot_product_attention(
    queries: &Array,
    keys: &Array,
    values: &Array,
    scale: f32,
    mask: &AttentionMask,
) -> Result<Array> {
    let mask = match mask {
        AttentionMask::None => None,
        AttentionMask::Causal => Some(ScaledDotProductAttentionMask::Causal),
        AttentionMask::Additive(m) => Some(ScaledDotProductAttentionMask::Array(m)),
    };
    Ok(mlx_rs::fast::scaled_dot_product_attention(
        queries, keys, values, scale, mask, None,
    )?)
}
