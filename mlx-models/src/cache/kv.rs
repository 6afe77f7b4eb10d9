//! Key/value caches for autoregressive decoding.
//!
//! A [`KvCache`] holds the keys and values of one attention layer, `[batch, kv_heads, tokens,
//! head_dim]`. It comes in three kinds:
//!
//! - **unbounded** ([`KvCache::new`]): every token seen so far, for full-attention layers;
//! - **rotating** ([`KvCache::rotating`]): at most `window` tokens, for sliding-window layers
//!   whose queries see only themselves and the `window - 1` tokens before them. Like mlx-lm's
//!   `RotatingKVCache`, single-token decode steps write into a ring buffer in place (one
//!   slice update, not a copy of the whole window); multi-token chunks are concatenated to
//!   the stored tokens in temporal order, attended with an explicit sliding-window mask, and
//!   then cut back to the last `window` tokens;
//! - **chunked** ([`KvCache::chunked`]): for chunked local attention (Llama 4), where the
//!   sequence is cut into chunks of `chunk` tokens and a query sees only the tokens of its own
//!   chunk up to itself. Like mlx-lm's `ChunkedKVCache`, it keeps only the current chunk.
//!
//! [`KvCache::attend`] appends new keys/values and returns what the new queries attend over
//! together with the right [`AttentionMask`], so callers need not know which kind they hold.

use crate::attention::AttentionMask;
use crate::error::{Error, Result};
use mlx_rs::error::Exception;
use mlx_rs::ops::indexing::{TryIndexMutOp, TryIndexOp};
use mlx_rs::{ops, Array};

/// How many token slots a cache's buffer grows by at a time (a rotating cache's only until
/// it reaches its window; mlx-lm's `step`).
const GROWTH_STEP: i32 = 256;

/// The keys and values of one attention layer (`[batch, kv_heads, tokens, head_dim]`):
/// either every token seen so far (unbounded), or only the most recent ones of a sliding
/// window (rotating).
///
/// [`KvCache::offset`] counts the tokens seen (the position of the next token);
/// [`KvCache::len`] counts those actually stored, which for a rotating cache stays at most
/// its window.
#[derive(Debug, Clone, Default)]
pub struct KvCache {
    /// Unbounded: a buffer whose first `len` slots hold the stored keys in order (the rest
    /// are spare). Rotating: a buffer of at most `window` slots, in the layout described at
    /// `start`.
    keys: Option<Array>,
    /// Like `keys`, for the values.
    values: Option<Array>,
    /// Tokens seen so far: the position of the next token.
    offset: i32,
    /// Tokens stored (at most the window for a rotating cache).
    len: i32,
    /// `Some(w)` for a rotating cache of window `w`.
    window: Option<i32>,
    /// `Some(c)` for a chunked cache of chunks of `c` tokens.
    chunk: Option<i32>,
    /// Rotating only. While `len < window` the stored tokens are in temporal order in slots
    /// `0..len` (the buffer may have spare slots after them) and `start` is 0. Once
    /// `len == window` the buffer is a full ring of `window` slots: the oldest token sits in
    /// slot `start`, which is also where the next single token is written.
    start: i32,
    /// Unbounded only: in a batch of sequences of different lengths ([`KvCache::merge_rows`]),
    /// how many zero slots sit before each row's first token. Row `b`'s next token is at
    /// position `offset - padding[b]`, and its queries never see the padding.
    padding: Option<Vec<i32>>,
}

impl KvCache {
    /// An unbounded cache that stores every token (for full-attention layers).
    pub fn new() -> Self {
        Self::default()
    }

    /// A rotating cache for a sliding-window layer, whose queries see themselves and the
    /// `window - 1` tokens before them: it stores at most `window` tokens.
    ///
    /// # Panics
    ///
    /// If `window` is less than 1 (no query could see anything, not even itself).
    pub fn rotating(window: i32) -> Self {
        assert!(
            window >= 1,
            "a sliding window must hold at least 1 token, got {window}"
        );
        KvCache {
            window: Some(window),
            ..Self::default()
        }
    }

    /// A cache for chunked local attention: the sequence is cut into chunks of `chunk`
    /// tokens and each query sees the tokens of its own chunk up to itself, so the cache
    /// stores at most the current chunk.
    ///
    /// # Panics
    ///
    /// If `chunk` is less than 1.
    pub fn chunked(chunk: i32) -> Self {
        assert!(
            chunk >= 1,
            "an attention chunk must hold at least 1 token, got {chunk}"
        );
        KvCache {
            chunk: Some(chunk),
            ..Self::default()
        }
    }

    /// The sliding window of a rotating cache; `None` for the other kinds.
    pub fn window(&self) -> Option<i32> {
        self.window
    }

    /// The chunk length of a chunked cache; `None` for the other kinds.
    pub fn chunk(&self) -> Option<i32> {
        self.chunk
    }

    /// Bytes the stored keys and values take (for a rotating cache its whole buffer).
    pub fn nbytes(&self) -> usize {
        self.arrays().map(Array::nbytes).sum()
    }

    /// How many tokens the cache has seen: the position of the next token. For a rotating
    /// cache this is not the number stored (see [`KvCache::len`]).
    pub fn offset(&self) -> i32 {
        self.offset
    }

    /// How many tokens the cache actually stores: [`KvCache::offset`] for an unbounded
    /// cache, at most the window for a rotating one.
    pub fn len(&self) -> i32 {
        self.len
    }

    /// Whether the cache stores no tokens.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Appends `len` new keys and values (`[batch, kv_heads, len, head_dim]`, positions
    /// `offset..offset + len`) and returns the keys and values the `len` new queries attend
    /// over, with the mask that gives each query exactly the keys it may see: itself and
    /// the tokens before it, and for a rotating cache only the `window - 1` most recent of
    /// those.
    ///
    /// The keys are not necessarily in temporal order (a full rotating cache returns its
    /// ring as is on single-token steps, with [`AttentionMask::None`], since then every
    /// stored key is visible and attention does not depend on the keys' order), so use the
    /// returned mask, not one built from positions. [`AttentionMask::Causal`] is aligned to
    /// the bottom right (the last query sees every key), as in MLX's fused attention.
    pub fn attend(&mut self, keys: Array, values: Array) -> Result<(Array, Array, AttentionMask)> {
        check_shapes(&keys, &values)?;
        if let Some(c) = self.chunk {
            return self.attend_chunked(c, keys, values);
        }
        match self.window {
            None => self.attend_unbounded(keys, values),
            Some(w) if keys.dim(2) == 1 => self.attend_one(w, keys, values),
            Some(w) => self.attend_chunk(w, keys, values),
        }
    }

    /// Appends the new `keys`/`values` and returns what the new queries attend over, as
    /// [`KvCache::attend`] without the mask.
    ///
    /// For an unbounded cache that is every token seen, in order, so a mask built from
    /// positions ([`AttentionMask::new`]) fits it. A rotating cache returns fewer keys,
    /// possibly in ring order: use [`KvCache::attend`] and its mask instead.
    pub fn update(&mut self, keys: Array, values: Array) -> Result<(Array, Array)> {
        let (keys, values, _) = self.attend(keys, values)?;
        Ok((keys, values))
    }

    /// Keeps only the first `len` tokens (e.g. the common prefix of two chat turns), so the
    /// next token is at position `len`. Returns whether that was possible.
    ///
    /// An unbounded cache always can. A rotating cache can only if it still stores every
    /// token the next query sees, the `window - 1` before position `len` (so once it has
    /// dropped tokens, a window over 1 can be cut back by one token at most), and a chunked
    /// cache only if it stores the tokens of `len`'s chunk before it; otherwise the cache
    /// empties itself (offset 0) and returns `false`, and the caller must feed the whole
    /// sequence again. `len <= 0` empties the
    /// cache and `len >= offset` leaves it as it is; both return `true`.
    pub fn truncate(&mut self, len: i32) -> Result<bool> {
        if len >= self.offset {
            return Ok(true);
        }
        if len <= 0 {
            self.reset();
            return Ok(true);
        }
        // The rows of a padded batch end at different positions: take one out with
        // [`KvCache::row`] first.
        if self.padding.is_some() {
            self.reset();
            return Ok(false);
        }
        // Position of the oldest stored token.
        let first = self.offset - self.len;
        // The next query, at position `len`, sees itself and positions `from..len`.
        let from = match (self.window, self.chunk) {
            (Some(w), _) => (len - (w - 1)).max(0),
            (_, Some(c)) => len - len % c,
            (None, None) => 0,
        };
        if from < len && first > from {
            self.reset();
            return Ok(false);
        }
        // Stored tokens before position `len` (none if a window of 1 needs none).
        let count = (len - first).max(0);
        let kept = match self.temporal()? {
            Some((keys, values)) if count > 0 => Some((
                keys.try_index((.., .., ..count))?,
                values.try_index((.., .., ..count))?,
            )),
            _ => None,
        };
        self.reset_keeping_offset(len);
        if let Some((keys, values)) = kept {
            self.keys = Some(keys);
            self.values = Some(values);
            self.len = count;
        }
        Ok(true)
    }

    /// The stored keys and values, `[batch, kv_heads, len, head_dim]`: for an unbounded
    /// cache the tokens in order (without the buffer's spare slots), for a rotating cache
    /// its buffer as stored (in ring order once full); `None` when empty.
    pub fn stored(&self) -> Result<Option<(Array, Array)>> {
        if self.window.is_some() {
            return Ok(self.keys.clone().zip(self.values.clone()));
        }
        self.temporal()
    }

    /// The cached arrays (whole buffers, spare slots included), for evaluation alongside
    /// the logits.
    pub fn arrays(&self) -> impl Iterator<Item = &Array> {
        self.keys.iter().chain(self.values.iter())
    }

    /// Empties the cache, keeping its kind.
    fn reset(&mut self) {
        self.reset_keeping_offset(0);
    }

    /// Empties the cache, keeping its kind, with the next token at position `offset`.
    fn reset_keeping_offset(&mut self, offset: i32) {
        *self = KvCache {
            window: self.window,
            chunk: self.chunk,
            offset,
            ..Self::default()
        };
    }

    /// The unbounded cache: the new tokens are written into a buffer with room to spare,
    /// which grows [`GROWTH_STEP`] slots at a time as mlx-lm's `KVCache` does, so a decode
    /// step writes one slot instead of copying every stored token. The first tokens are
    /// kept as they come (a prompt is often all there is).
    fn attend_unbounded(
        &mut self,
        keys: Array,
        values: Array,
    ) -> Result<(Array, Array, AttentionMask)> {
        let new = keys.dim(2);
        let (stored, len) = (self.len, self.len + new);
        let (kbuf, vbuf) = match (&self.keys, &self.values) {
            (Some(k), Some(v)) if stored > 0 => {
                // Clones share the buffers; `self` changes only once everything succeeded.
                let (mut kbuf, mut vbuf) = (k.clone(), v.clone());
                if kbuf.dim(2) < len {
                    let extra = (len + GROWTH_STEP - 1) / GROWTH_STEP * GROWTH_STEP - kbuf.dim(2);
                    kbuf = grow(&kbuf, extra)?;
                    vbuf = grow(&vbuf, extra)?;
                }
                kbuf.try_index_mut((.., .., stored..len), &keys)?;
                vbuf.try_index_mut((.., .., stored..len), &values)?;
                (kbuf, vbuf)
            }
            _ => (keys, values),
        };
        let (keys, values) = (first_slots(&kbuf, len)?, first_slots(&vbuf, len)?);
        // Replacing the old buffers leaves them to the update alone, so MLX can write in place.
        self.keys = Some(kbuf);
        self.values = Some(vbuf);
        self.offset += new;
        self.len = len;
        let mask = match &self.padding {
            Some(padding) => padded_mask(padding, new, self.offset, keys.dtype())?,
            None if new == 1 => AttentionMask::None,
            None => AttentionMask::Causal,
        };
        Ok((keys, values, mask))
    }

    /// A rotating cache, one new token: written in place into the buffer (grown by up to
    /// [`GROWTH_STEP`] slots while below the window), and every stored key is visible.
    fn attend_one(
        &mut self,
        window: i32,
        keys: Array,
        values: Array,
    ) -> Result<(Array, Array, AttentionMask)> {
        // Clones share the buffers; `self` changes only once everything succeeded.
        let (mut kbuf, mut vbuf) = match (&self.keys, &self.values) {
            (Some(k), Some(v)) if self.len > 0 => (k.clone(), v.clone()),
            _ => (empty_like(&keys)?, empty_like(&values)?),
        };
        let (slot, len, start) = if self.len < window {
            let capacity = kbuf.dim(2);
            if self.len == capacity {
                let extra = GROWTH_STEP.min(window - capacity);
                kbuf = grow(&kbuf, extra)?;
                vbuf = grow(&vbuf, extra)?;
            }
            // Still in temporal order, so `start` stays 0, which is also the oldest slot
            // once this token fills the window.
            (self.len, self.len + 1, 0)
        } else {
            (self.start, window, (self.start + 1) % window)
        };
        kbuf.try_index_mut((.., .., slot..slot + 1), &keys)?;
        vbuf.try_index_mut((.., .., slot..slot + 1), &values)?;
        let (k, v) = (first_slots(&kbuf, len)?, first_slots(&vbuf, len)?);
        // Replacing the old buffers leaves them to the update alone, so MLX can write in place.
        self.keys = Some(kbuf);
        self.values = Some(vbuf);
        self.len = len;
        self.start = start;
        self.offset += 1;
        // The stored tokens are the `len <= window` most recent, the new one included: all
        // within the window of the new query.
        Ok((k, v, AttentionMask::None))
    }

    /// A rotating cache, several new tokens: the stored tokens in temporal order followed
    /// by the new ones, with a sliding-window mask for exactly those positions; then only
    /// the last `window` tokens are kept.
    fn attend_chunk(
        &mut self,
        window: i32,
        keys: Array,
        values: Array,
    ) -> Result<(Array, Array, AttentionMask)> {
        let new = keys.dim(2);
        let cached = self.len;
        let mask = AttentionMask::new(new, cached, Some(window), keys.dtype())?;
        let (keys, values) = match self.temporal()? {
            Some((k, v)) => (
                ops::concatenate(&[k, keys], 2)?,
                ops::concatenate(&[v, values], 2)?,
            ),
            None => (keys, values),
        };
        let total = cached + new;
        let kept = total.min(window);
        let (k, v) = if total > kept {
            let from = total - kept;
            (
                keys.try_index((.., .., from..))?,
                values.try_index((.., .., from..))?,
            )
        } else {
            (keys.clone(), values.clone())
        };
        let offset = self.offset + new;
        self.reset_keeping_offset(offset);
        if kept > 0 {
            self.keys = Some(k);
            self.values = Some(v);
            self.len = kept;
        }
        Ok((keys, values, mask))
    }

    /// A chunked cache: the stored tokens of the first new token's chunk followed by the new
    /// ones, with a mask that keeps each query inside its own chunk; then only the tokens of
    /// the chunk the next token falls in are kept.
    fn attend_chunked(
        &mut self,
        chunk: i32,
        keys: Array,
        values: Array,
    ) -> Result<(Array, Array, AttentionMask)> {
        let new = keys.dim(2);
        let first_new = self.offset;
        // Stored tokens before the first new token's chunk are visible to no new query.
        let chunk_start = first_new - first_new % chunk;
        let stored_from = self.offset - self.len;
        let drop = (chunk_start - stored_from).max(0);
        let (keys, values) = match (&self.keys, &self.values) {
            (Some(k), Some(v)) if drop < self.len => (
                ops::concatenate(&[&k.try_index((.., .., drop..))?, &keys], 2)?,
                ops::concatenate(&[&v.try_index((.., .., drop..))?, &values], 2)?,
            ),
            _ => (keys, values),
        };
        let first_key = first_new + new - keys.dim(2);
        let last = first_new + new - 1;
        let mask = if first_key / chunk == last / chunk {
            // Every key in one chunk: plain causal attention.
            if new == 1 {
                AttentionMask::None
            } else {
                AttentionMask::Causal
            }
        } else {
            AttentionMask::from_visibility(
                new,
                first_new,
                keys.dim(2),
                first_key,
                keys.dtype(),
                |q, k| k <= q && k / chunk == q / chunk,
            )?
        };
        let next = first_new + new;
        let keep_from = (next - next % chunk - first_key).max(0);
        let total = keys.dim(2);
        self.reset_keeping_offset(next);
        if keep_from < total {
            self.keys = Some(keys.try_index((.., .., keep_from..))?);
            self.values = Some(values.try_index((.., .., keep_from..))?);
            self.len = total - keep_from;
        }
        Ok((keys, values, mask))
    }

    /// The stored keys and values in temporal order (`len` tokens), or `None` if empty.
    fn temporal(&self) -> Result<Option<(Array, Array)>> {
        let (Some(keys), Some(values)) = (&self.keys, &self.values) else {
            return Ok(None);
        };
        if self.len == 0 {
            return Ok(None);
        }
        let (len, start) = (self.len, self.start);
        let order = |a: &Array| -> Result<Array> {
            let capacity = a.dim(2);
            Ok(if start > 0 {
                // A full ring: the oldest token is in slot `start`.
                ops::concatenate(
                    &[
                        a.try_index((.., .., start..))?,
                        a.try_index((.., .., ..start))?,
                    ],
                    2,
                )?
            } else if len < capacity {
                a.try_index((.., .., ..len))?
            } else {
                a.clone()
            })
        };
        Ok(Some((order(keys)?, order(values)?)))
    }
}

/// Checks that `keys` and `values` are `[batch, kv_heads, tokens, head_dim]` for the same
/// batch, heads and tokens.
fn check_shapes(keys: &Array, values: &Array) -> Result<()> {
    let (k, v) = (keys.shape(), values.shape());
    if k.len() != 4 || v.len() != 4 || k[..3] != v[..3] {
        return Err(Error::Mlx(Exception::custom(format!(
            "KvCache: keys {k:?} and values {v:?} must both be [batch, kv_heads, tokens, \
             head_dim] with the same batch, heads and tokens"
        ))));
    }
    Ok(())
}

/// Batches of sequences of different lengths, for continuous batching: rows are aligned at
/// their last token (left-padded with zero slots that no query sees), and each row's RoPE
/// position is its own ([`KvCache::row_offsets`]). Only unbounded caches batch this way.
impl KvCache {
    /// The position of each row's next token, where the rows of a batch differ
    /// ([`KvCache::merge_rows`]); `None` when every row's next token is at
    /// [`KvCache::offset`].
    pub fn row_offsets(&self) -> Option<Vec<i32>> {
        self.padding
            .as_ref()
            .map(|padding| padding.iter().map(|p| self.offset - p).collect())
    }

    /// The rows of `caches`, in order, as one batch: each cache is left-padded to the
    /// longest one, so that new tokens of every row can go through the model together.
    /// Every cache must be unbounded and hold at least one token.
    pub fn merge_rows(caches: &[&KvCache]) -> Result<KvCache> {
        let bad = |message: String| Error::Mlx(Exception::custom(message));
        let offset = caches.iter().map(|c| c.offset).max().unwrap_or(0);
        let (mut keys, mut values, mut padding) = (Vec::new(), Vec::new(), Vec::new());
        for cache in caches {
            if cache.window.is_some() || cache.chunk.is_some() {
                return Err(bad(
                    "only unbounded KV caches can be batched (sliding-window and chunked \
                     caches cannot)"
                        .into(),
                ));
            }
            let Some((k, v)) = cache.temporal()? else {
                return Err(bad("an empty KV cache cannot join a batch".into()));
            };
            let extra = offset - cache.offset;
            let rows = k.dim(0) as usize;
            let own = cache.padding.clone().unwrap_or_else(|| vec![0; rows]);
            padding.extend(own.iter().map(|p| p + extra));
            keys.push(pad_left(&k, extra)?);
            values.push(pad_left(&v, extra)?);
        }
        let keys = ops::concatenate(&keys, 0)?;
        let values = ops::concatenate(&values, 0)?;
        Ok(KvCache {
            len: keys.dim(2),
            keys: Some(keys),
            values: Some(values),
            offset,
            padding: padding.iter().any(|&p| p > 0).then_some(padding),
            ..KvCache::default()
        })
    }

    /// An empty unbounded cache for a batch of prompts of different lengths prefilled
    /// together, each left-padded to the longest: row `b` starts with `padding[b]` filler
    /// tokens, which sit at negative positions and which no query of the row sees, so its
    /// first real token is at position 0. After the prefill the cache is a batch as
    /// [`KvCache::merge_rows`] makes one.
    pub fn left_padded(padding: &[i32]) -> Result<KvCache> {
        if let Some(&bad) = padding.iter().find(|&&p| p < 0) {
            return Err(Error::Mlx(Exception::custom(format!(
                "a batch row cannot have {bad} padding tokens"
            ))));
        }
        Ok(KvCache {
            padding: padding.iter().any(|&p| p > 0).then(|| padding.to_vec()),
            ..KvCache::default()
        })
    }

    /// The batch of the given rows only, in that order, without the padding they all share.
    pub fn select_rows(&self, rows: &[usize]) -> Result<KvCache> {
        let Some((k, v)) = self.temporal()? else {
            return Ok(self.clone());
        };
        let batch = k.dim(0) as usize;
        if let Some(&bad) = rows.iter().find(|&&r| r >= batch) {
            return Err(Error::Mlx(Exception::custom(format!(
                "row {bad} of a batch of {batch}"
            ))));
        }
        let padding: Vec<i32> = match &self.padding {
            Some(p) => rows.iter().map(|&r| p[r]).collect(),
            None => vec![0; rows.len()],
        };
        let shared = padding.iter().copied().min().unwrap_or(0);
        let index = Array::from_slice(
            &rows.iter().map(|&r| r as i32).collect::<Vec<_>>(),
            &[rows.len() as i32],
        );
        let cut = |a: &Array| -> Result<Array> {
            let a = a.take_axis(&index, 0)?;
            Ok(if shared > 0 {
                a.try_index((.., .., shared..))?
            } else {
                a
            })
        };
        let padding: Vec<i32> = padding.iter().map(|p| p - shared).collect();
        let (keys, values) = (cut(&k)?, cut(&v)?);
        Ok(KvCache {
            len: keys.dim(2),
            keys: Some(keys),
            values: Some(values),
            offset: self.offset - shared,
            padding: padding.iter().any(|&p| p > 0).then_some(padding),
            ..KvCache::default()
        })
    }

    /// One row of a batch as a cache of its own (batch 1, no padding).
    pub fn row(&self, row: usize) -> Result<KvCache> {
        self.select_rows(&[row])
    }
}

/// `a` (`[batch, heads, tokens, dim]`) with `extra` zero token slots before its tokens.
fn pad_left(a: &Array, extra: i32) -> Result<Array> {
    if extra == 0 {
        return Ok(a.clone());
    }
    let zeros = ops::zeros_dtype(&[a.dim(0), a.dim(1), extra, a.dim(3)], a.dtype())?;
    Ok(ops::concatenate(&[&zeros, a], 2)?)
}

/// The additive mask `[batch, 1, len, keys]` of `len` new queries over `keys` slots of a
/// left-padded batch: causal (aligned to the last key) and blind to each row's padding.
/// A query always sees its own key, so no row of the softmax is empty.
fn padded_mask(
    padding: &[i32],
    len: i32,
    keys: i32,
    dtype: mlx_rs::Dtype,
) -> Result<AttentionMask> {
    let first_query = keys - len;
    let mut data = Vec::with_capacity(padding.len() * (len * keys) as usize);
    for &pad in padding {
        for q in first_query..keys {
            for k in 0..keys {
                let visible = k == q || (k >= pad && k <= q);
                data.push(if visible { 0.0f32 } else { f32::NEG_INFINITY });
            }
        }
    }
    let mask = Array::from_slice(&data, &[padding.len() as i32, 1, len, keys]).as_dtype(dtype)?;
    Ok(AttentionMask::Additive(mask))
}

/// A buffer of zero tokens shaped like `a` (`[batch, heads, 0, dim]`), to grow from.
fn empty_like(a: &Array) -> Result<Array> {
    Ok(ops::zeros_dtype(
        &[a.dim(0), a.dim(1), 0, a.dim(3)],
        a.dtype(),
    )?)
}

/// The first `len` token slots of `buffer` (a view; the buffer itself if that is all).
fn first_slots(buffer: &Array, len: i32) -> Result<Array> {
    Ok(if len < buffer.dim(2) {
        buffer.try_index((.., .., ..len))?
    } else {
        buffer.clone()
    })
}

/// `buffer` with `extra` zero token slots appended.
fn grow(buffer: &Array, extra: i32) -> Result<Array> {
    let zeros = ops::zeros_dtype(
        &[buffer.dim(0), buffer.dim(1), extra, buffer.dim(3)],
        buffer.dtype(),
    )?;
    Ok(ops::concatenate(&[buffer, &zeros], 2)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attention::scaled_dot_product_attention;
    use proptest::collection::vec;
    use proptest::prelude::*;

    const BATCH: i32 = 1;
    const HEADS: i32 = 2;
    const HEAD_DIM: i32 = 8;
    const TOL: f32 = 1e-5;

    fn scale() -> f32 {
        (HEAD_DIM as f32).powf(-0.5)
    }

    /// Deterministic pseudo-random numbers in [-1, 1) (splitmix64).
    struct Numbers(u64);

    impl Numbers {
        fn next(&mut self) -> f32 {
            self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^= z >> 31;
            (z >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        }

        /// `[batch, heads, tokens, head_dim]`.
        fn array(&mut self, tokens: i32) -> Array {
            let data: Vec<f32> = (0..BATCH * HEADS * tokens * HEAD_DIM)
                .map(|_| self.next())
                .collect();
            Array::from_slice(&data, &[BATCH, HEADS, tokens, HEAD_DIM])
        }
    }

    /// Attention recomputed with plain ops over every key seen (`keys`, positions
    /// `0..total`) for queries at positions `offset..`, with an explicit -inf mask.
    fn reference(
        queries: &Array,
        keys: &Array,
        values: &Array,
        offset: i32,
        window: Option<i32>,
        chunk: Option<i32>,
    ) -> Array {
        let (len, total) = (queries.dim(2), keys.dim(2));
        assert_eq!(total, offset + len);
        let mut mask = Vec::new();
        for q in 0..len {
            let pos = offset + q;
            for k in 0..total {
                let visible = k <= pos
                    && window.is_none_or(|w| pos - k < w)
                    && chunk.is_none_or(|c| k / c == pos / c);
                mask.push(if visible { 0.0f32 } else { f32::NEG_INFINITY });
            }
        }
        let mask = Array::from_slice(&mask, &[len, total]);
        let scores = queries
            .matmul(keys.swap_axes(-1, -2).unwrap())
            .unwrap()
            .multiply(Array::from_f32(scale()))
            .unwrap()
            .add(&mask)
            .unwrap();
        ops::softmax_axis(&scores, -1, true)
            .unwrap()
            .matmul(values)
            .unwrap()
    }

    fn max_abs_diff(a: &Array, b: &Array) -> f32 {
        assert_eq!(a.shape(), b.shape());
        a.subtract(b)
            .unwrap()
            .abs()
            .unwrap()
            .max(None)
            .unwrap()
            .item_exact::<f32>()
    }

    /// A cache under test beside every key and value it was fed, for the reference.
    struct Harness {
        cache: KvCache,
        keys: Option<Array>,
        values: Option<Array>,
        numbers: Numbers,
    }

    impl Harness {
        fn new(cache: KvCache, seed: u64) -> Self {
            Harness {
                cache,
                keys: None,
                values: None,
                numbers: Numbers(seed),
            }
        }

        /// Feeds `len` random tokens; returns the attention output through the cache and
        /// the reference's.
        fn step(&mut self, len: i32) -> (Array, Array) {
            let offset = self.cache.offset();
            let (q, k, v) = (
                self.numbers.array(len),
                self.numbers.array(len),
                self.numbers.array(len),
            );
            let append = |all: &Option<Array>, new: &Array| match all {
                Some(a) => ops::concatenate(&[a, new], 2).unwrap(),
                None => new.clone(),
            };
            self.keys = Some(append(&self.keys, &k));
            self.values = Some(append(&self.values, &v));
            let (ck, cv, mask) = self.cache.attend(k, v).expect("attend");
            let out = scaled_dot_product_attention(&q, &ck, &cv, scale(), &mask).expect("sdpa");
            let all_keys = self.keys.as_ref().unwrap();
            let all_values = self.values.as_ref().unwrap();
            let expected = reference(
                &q,
                all_keys,
                all_values,
                offset,
                self.cache.window(),
                self.cache.chunk(),
            );
            (out, expected)
        }

        /// Feeds `len` tokens and checks the output against the reference and the counts.
        fn check(&mut self, len: i32) -> Result<(), TestCaseError> {
            let before = self.cache.offset();
            let (out, expected) = self.step(len);
            let d = max_abs_diff(&out, &expected);
            prop_assert!(
                d <= TOL,
                "{len} tokens after {before} (window {:?}): max |Δ| = {d:e}",
                self.cache.window()
            );
            let offset = before + len;
            prop_assert_eq!(self.cache.offset(), offset);
            let stored = match (self.cache.window(), self.cache.chunk()) {
                (Some(w), _) => offset.min(w),
                (None, Some(c)) => offset % c,
                (None, None) => offset,
            };
            prop_assert_eq!(self.cache.len(), stored);
            for a in self.cache.arrays() {
                prop_assert!(a.dim(2) >= stored);
                if let Some(w) = self.cache.window() {
                    prop_assert!(a.dim(2) <= w, "buffer of {} slots", a.dim(2));
                }
            }
            Ok(())
        }

        /// Keeps the reference's first `len` tokens, as `truncate` does the cache's.
        fn truncate_reference(&mut self, len: i32) {
            let keep = |a: &Option<Array>| {
                a.as_ref()
                    .filter(|_| len > 0)
                    .map(|a| a.try_index((.., .., ..len)).unwrap())
            };
            self.keys = keep(&self.keys);
            self.values = keep(&self.values);
        }
    }

    /// Chunk sizes: single tokens and chunks of 2 to 5.
    fn chunks() -> impl Strategy<Value = Vec<i32>> {
        vec(prop_oneof![2 => Just(1), 1 => 2..=5i32], 0..16)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(32))]

        /// Both kinds match the reference over random chunkings: a prefill, then single
        /// tokens and chunks, so rotating caches wrap and then take chunks.
        #[test]
        fn attend_matches_reference(
            window in 1..=8i32,
            prefill in 1..=20i32,
            steps in chunks(),
            seed in any::<u64>(),
        ) {
            for cache in [KvCache::rotating(window), KvCache::chunked(window), KvCache::new()] {
                let mut h = Harness::new(cache, seed);
                h.check(prefill)?;
                for &len in &steps {
                    h.check(len)?;
                }
            }
        }

        /// A rotating cache whose window holds every token attends like an unbounded one.
        #[test]
        fn rotating_with_large_window_equals_unbounded(
            prefill in 1..=20i32,
            steps in chunks(),
            extra in 0..=3i32,
            seed in any::<u64>(),
        ) {
            let total = prefill + steps.iter().sum::<i32>();
            let mut rotating = Harness::new(KvCache::rotating(total + extra), seed);
            let mut unbounded = Harness::new(KvCache::new(), seed);
            for len in std::iter::once(prefill).chain(steps.iter().copied()) {
                let (a, _) = rotating.step(len);
                let (b, _) = unbounded.step(len);
                let d = max_abs_diff(&a, &b);
                prop_assert!(d <= 1e-6, "{len} tokens: max |Δ| = {d:e}");
            }
        }

        /// Truncating keeps exactly the prefix when it reports so, and otherwise empties
        /// the cache; either way the cache goes on matching the reference.
        #[test]
        fn truncate_then_continue(
            window in 1..=8i32,
            prefill in 1..=20i32,
            steps in chunks(),
            cut in 0.0..=1.1f64,
            after in chunks(),
            seed in any::<u64>(),
        ) {
            for cache in [KvCache::rotating(window), KvCache::chunked(window), KvCache::new()] {
                let mut h = Harness::new(cache, seed);
                h.check(prefill)?;
                for &len in &steps {
                    h.check(len)?;
                }
                let (offset, stored) = (h.cache.offset(), h.cache.len());
                let len = (offset as f64 * cut).round() as i32;
                let first = offset - stored;
                let possible = match (h.cache.window(), h.cache.chunk()) {
                    _ if len <= 0 || len >= offset => true,
                    (None, None) => true,
                    (Some(w), _) => {
                        let from = (len - (w - 1)).max(0);
                        from == len || first <= from
                    }
                    (None, Some(c)) => {
                        let from = len - len % c;
                        from == len || first <= from
                    }
                };
                let kept = h.cache.truncate(len).expect("truncate");
                prop_assert_eq!(kept, possible, "truncate({}) after {}", len, offset);
                if kept {
                    let len = len.min(offset);
                    prop_assert_eq!(h.cache.offset(), len.max(0));
                    h.truncate_reference(len);
                } else {
                    prop_assert!(h.cache.is_empty());
                    prop_assert_eq!(h.cache.offset(), 0);
                    prop_assert_eq!(h.cache.arrays().count(), 0);
                    h.truncate_reference(0);
                }
                // Stepping a cache after truncation: whatever it stores must suffice.
                for &len in after.iter().chain([1, 3].iter()) {
                    let before = h.cache.offset();
                    let (out, expected) = h.step(len);
                    let d = max_abs_diff(&out, &expected);
                    prop_assert!(d <= TOL, "{len} tokens after {before}: max |Δ| = {d:e}");
                }
            }
        }
    }

    /// A chunk after the ring wrapped (oldest token mid-buffer) sees keys in temporal order.
    #[test]
    fn chunk_after_wrapped_ring() {
        for (window, prefill, steps) in [
            (4, 3, &[1, 1, 1, 3, 1, 1, 2][..]),
            (4, 6, &[1, 1, 5, 1][..]),
            (1, 2, &[1, 2, 1, 1][..]),
            (3, 1, &[1, 1, 1, 1, 1, 4, 1, 1, 2][..]),
        ] {
            let mut h = Harness::new(KvCache::rotating(window), 7);
            h.check(prefill).unwrap();
            for &len in steps {
                h.check(len).unwrap();
            }
        }
    }

    #[test]
    fn single_tokens_return_the_ring_without_mask() {
        let mut cache = KvCache::rotating(3);
        let mut numbers = Numbers(1);
        for step in 1..=7 {
            let (k, v, mask) = cache
                .attend(numbers.array(1), numbers.array(1))
                .expect("attend");
            assert!(matches!(mask, AttentionMask::None));
            assert_eq!(k.dim(2), step.min(3));
            assert_eq!(v.dim(2), step.min(3));
            assert_eq!(cache.offset(), step);
            assert_eq!(cache.len(), step.min(3));
        }
        assert_eq!(cache.window(), Some(3));
        assert_eq!(cache.arrays().count(), 2);
        assert!(cache.arrays().all(|a| a.dim(2) == 3));
    }

    #[test]
    fn masks_of_the_unbounded_cache() {
        let mut cache = KvCache::new();
        let mut numbers = Numbers(2);
        let (_, _, mask) = cache.attend(numbers.array(4), numbers.array(4)).unwrap();
        assert!(matches!(mask, AttentionMask::Causal));
        let (k, _, mask) = cache.attend(numbers.array(1), numbers.array(1)).unwrap();
        assert!(matches!(mask, AttentionMask::None));
        assert_eq!(k.dim(2), 5);
        assert_eq!((cache.offset(), cache.len(), cache.window()), (5, 5, None));
    }

    #[test]
    fn update_still_returns_every_key_of_an_unbounded_cache() {
        let mut cache = KvCache::new();
        let mut numbers = Numbers(3);
        let (k, v) = cache.update(numbers.array(3), numbers.array(3)).unwrap();
        assert_eq!((k.dim(2), v.dim(2)), (3, 3));
        let (k, v) = cache.update(numbers.array(1), numbers.array(1)).unwrap();
        assert_eq!((k.dim(2), v.dim(2)), (4, 4));
        assert_eq!(cache.offset(), 4);
    }

    #[test]
    fn an_unbounded_cache_writes_decode_steps_into_spare_slots() {
        let mut h = Harness::new(KvCache::new(), 7);
        // A prompt is stored as it comes; the first step after it grows the buffer to a
        // whole number of growth steps, which later steps fill in place.
        h.check(5).unwrap();
        assert!(h.cache.arrays().all(|a| a.dim(2) == 5));
        for _ in 0..GROWTH_STEP - 5 {
            h.check(1).unwrap();
        }
        assert!(h.cache.arrays().all(|a| a.dim(2) == GROWTH_STEP));
        h.check(3).unwrap();
        assert!(h.cache.arrays().all(|a| a.dim(2) == 2 * GROWTH_STEP));
        // What is saved or batched is the stored tokens only, in order.
        let (k, v) = h.cache.stored().unwrap().unwrap();
        assert_eq!((k.dim(2), v.dim(2)), (GROWTH_STEP + 3, GROWTH_STEP + 3));
        let merged = KvCache::merge_rows(&[&h.cache, &h.cache]).unwrap();
        assert!(merged.arrays().all(|a| a.dim(2) == GROWTH_STEP + 3));
    }

    #[test]
    fn truncate_unbounded() {
        let mut h = Harness::new(KvCache::new(), 4);
        h.check(10).unwrap();
        assert!(h.cache.truncate(12).unwrap());
        assert_eq!(h.cache.offset(), 10);
        assert!(h.cache.truncate(6).unwrap());
        assert_eq!((h.cache.offset(), h.cache.len()), (6, 6));
        h.truncate_reference(6);
        h.check(1).unwrap();
        h.check(3).unwrap();
        assert!(h.cache.truncate(0).unwrap());
        assert!(h.cache.is_empty());
        assert_eq!(h.cache.offset(), 0);
    }

    #[test]
    fn truncate_rotating() {
        // Nothing dropped yet: any prefix can be kept.
        let mut h = Harness::new(KvCache::rotating(4), 5);
        h.check(3).unwrap();
        assert!(h.cache.truncate(1).unwrap());
        assert_eq!((h.cache.offset(), h.cache.len()), (1, 1));
        h.truncate_reference(1);
        h.check(1).unwrap();
        h.check(4).unwrap();
        h.check(1).unwrap();

        // Ten tokens, the last four (6..10) stored in a wrapped ring: position 9 still has
        // the three it sees (6, 7, 8), position 8 would need 5.
        let mut h = Harness::new(KvCache::rotating(4), 6);
        h.check(5).unwrap();
        for _ in 0..5 {
            h.check(1).unwrap();
        }
        let mut other = h.cache.clone();
        assert!(h.cache.truncate(9).unwrap());
        assert_eq!((h.cache.offset(), h.cache.len()), (9, 3));
        h.truncate_reference(9);
        h.check(1).unwrap();
        h.check(2).unwrap();
        h.check(1).unwrap();

        assert!(!other.truncate(8).unwrap());
        assert!(other.is_empty());
        assert_eq!((other.offset(), other.window()), (0, Some(4)));
        assert_eq!(other.arrays().count(), 0);
        let mut h = Harness::new(other, 8);
        h.check(6).unwrap();
        h.check(1).unwrap();

        // Window 1: only the token itself is seen, so any cut is fine.
        let mut h = Harness::new(KvCache::rotating(1), 9);
        h.check(5).unwrap();
        assert!(h.cache.truncate(3).unwrap());
        assert_eq!((h.cache.offset(), h.cache.len()), (3, 0));
        h.truncate_reference(3);
        h.check(1).unwrap();
        h.check(2).unwrap();
    }

    #[test]
    fn rejects_arrays_of_the_wrong_rank() {
        for mut cache in [KvCache::new(), KvCache::rotating(4)] {
            let k = Array::from_slice(&[0.0f32; 8], &[1, 2, 4]);
            assert!(cache.attend(k.clone(), k).is_err());
            let k = Array::from_slice(&[0.0f32; 8], &[1, 1, 2, 4]);
            let v = Array::from_slice(&[0.0f32; 12], &[1, 1, 3, 4]);
            assert!(cache.attend(k, v).is_err());
            assert_eq!(cache.offset(), 0);
        }
    }

    #[test]
    #[should_panic(expected = "at least 1 token")]
    fn a_window_of_zero_panics() {
        KvCache::rotating(0);
    }

    /// A chunked cache keeps the current chunk only, and a query at a chunk boundary sees
    /// itself alone.
    #[test]
    fn chunked_cache_keeps_the_current_chunk() {
        let mut h = Harness::new(KvCache::chunked(4), 3);
        h.check(10).unwrap();
        assert_eq!((h.cache.offset(), h.cache.len()), (10, 2));
        h.check(1).unwrap();
        h.check(1).unwrap();
        // Position 12 starts a chunk: nothing stored before it is kept.
        assert_eq!((h.cache.offset(), h.cache.len()), (12, 0));
        h.check(1).unwrap();
        assert_eq!(h.cache.len(), 1);
        assert!(!h.cache.truncate(11).unwrap(), "chunk 8..12 is gone");
        assert_eq!(h.cache.offset(), 0);
    }
}
