//! What a layer keeps between forward passes.
//!
//! Each layer of a model has one [`LayerCache`], of the kind its token mixer needs: a
//! [`KvCache`] (plain, rotating for sliding windows, or chunked) for attention, a
//! [`LatentCache`] for multi-head latent attention, a [`RecurrentCache`] (fixed-size conv
//! and recurrent state) for state-space, linear-attention and convolution layers, or
//! nothing for layers that mix no tokens.
//! Generation, chat reuse and saved prompt caches use the same few operations on every
//! kind: the position of the next token ([`LayerCache::offset`]), cutting back to a prefix
//! where the kind can ([`LayerCache::truncate`], which says when it cannot), and the state
//! as named arrays ([`LayerCache::state`]).

mod kv;
mod latent;
mod recurrent;

pub use kv::KvCache;
pub use latent::LatentCache;
pub use recurrent::RecurrentCache;

use crate::error::{Error, Result};
use mlx_rs::error::Exception;
use mlx_rs::Array;

/// The cache of one layer.
#[derive(Debug, Clone)]
pub enum LayerCache {
    /// Keys and values of an attention layer.
    Kv(KvCache),
    /// The compressed latents and RoPE keys of a latent-attention layer.
    Latent(LatentCache),
    /// The conv and recurrent state of a recurrent layer.
    Recurrent(RecurrentCache),
    /// A layer that keeps nothing (a feed-forward-only layer), counting tokens only.
    Stateless { offset: i32 },
}

impl LayerCache {
    /// How many tokens the layer has seen: the position of the next token.
    pub fn offset(&self) -> i32 {
        match self {
            LayerCache::Kv(kv) => kv.offset(),
            LayerCache::Latent(latent) => latent.offset(),
            LayerCache::Recurrent(r) => r.offset(),
            LayerCache::Stateless { offset } => *offset,
        }
    }

    /// Keeps only the first `len` tokens, so the next token is at position `len`. Returns
    /// `false` (and empties the cache) where the kind cannot go back that far, e.g. a
    /// sliding window that has dropped tokens the next query would need; the caller must
    /// then feed the whole sequence again.
    pub fn truncate(&mut self, len: i32) -> Result<bool> {
        match self {
            LayerCache::Kv(kv) => kv.truncate(len),
            LayerCache::Latent(latent) => Ok(latent.truncate(len)),
            LayerCache::Recurrent(r) => Ok(r.truncate(len)),
            LayerCache::Stateless { offset } => {
                *offset = (*offset).min(len.max(0));
                Ok(true)
            }
        }
    }

    /// The arrays the cache holds, to evaluate alongside the logits.
    pub fn arrays(&self) -> Vec<&Array> {
        match self {
            LayerCache::Kv(kv) => kv.arrays().collect(),
            LayerCache::Latent(latent) => latent.arrays().collect(),
            LayerCache::Recurrent(r) => r.arrays().collect(),
            LayerCache::Stateless { .. } => Vec::new(),
        }
    }

    /// The cache's state as named arrays (`keys`, `values`: what is stored, as stored;
    /// `latent`: one entry per token), for saving a prompt cache or measuring it.
    pub fn state(&self) -> Result<Vec<(&'static str, Array)>> {
        Ok(match self {
            LayerCache::Kv(kv) => {
                let mut state = Vec::new();
                if let Some((k, v)) = kv.stored()? {
                    state.push(("keys", k));
                    state.push(("values", v));
                }
                state
            }
            LayerCache::Latent(latent) => latent
                .entries()?
                .map(|entries| vec![("latent", entries)])
                .unwrap_or_default(),
            LayerCache::Recurrent(r) => {
                let mut state = Vec::new();
                if let Some(conv) = &r.conv {
                    state.push(("conv", conv.clone()));
                }
                if let Some(s) = &r.state {
                    state.push(("state", s.clone()));
                }
                state
            }
            LayerCache::Stateless { .. } => Vec::new(),
        })
    }

    /// Bytes the cache holds.
    pub fn nbytes(&self) -> usize {
        self.arrays().iter().map(|a| a.nbytes()).sum()
    }

    /// The KV cache of an attention layer; an error for any other kind.
    pub fn kv_mut(&mut self) -> Result<&mut KvCache> {
        match self {
            LayerCache::Kv(kv) => Ok(kv),
            other => Err(other.wrong_kind("a KV cache")),
        }
    }

    /// The cache of a latent-attention layer; an error for any other kind.
    pub fn latent_mut(&mut self) -> Result<&mut LatentCache> {
        match self {
            LayerCache::Latent(latent) => Ok(latent),
            other => Err(other.wrong_kind("a latent cache")),
        }
    }

    /// The state of a recurrent layer; an error for any other kind.
    pub fn recurrent_mut(&mut self) -> Result<&mut RecurrentCache> {
        match self {
            LayerCache::Recurrent(r) => Ok(r),
            other => Err(other.wrong_kind("a recurrent cache")),
        }
    }

    fn wrong_kind(&self, wanted: &str) -> Error {
        let found = match self {
            LayerCache::Kv(_) => "a KV cache",
            LayerCache::Latent(_) => "a latent cache",
            LayerCache::Recurrent(_) => "a recurrent cache",
            LayerCache::Stateless { .. } => "no state",
        };
        Error::Mlx(Exception::custom(format!(
            "this layer needs {wanted}, the cache holds {found}: use the model's new_cache()"
        )))
    }

    /// Cuts every layer back to the first `len` tokens. If any layer cannot keep that
    /// prefix, empties all of them, so that every layer starts again at position 0, and
    /// returns `false`.
    pub fn truncate_all(cache: &mut [LayerCache], len: i32) -> Result<bool> {
        let mut kept = true;
        for layer in cache.iter_mut() {
            kept &= layer.truncate(len)?;
        }
        if !kept {
            for layer in cache.iter_mut() {
                layer.truncate(0)?;
            }
        }
        Ok(kept)
    }

    /// A model's empty cache (its `new_cache()`) made ready for prompts of different
    /// lengths prefilled as one batch, row `b` left-padded by `padding[b]` filler tokens
    /// ([`KvCache::left_padded`]). Only unbounded KV layers and layers without state
    /// can; any other kind (or a cache already used) is an error.
    pub fn left_padded_batch(cache: Vec<LayerCache>, padding: &[i32]) -> Result<Vec<LayerCache>> {
        cache
            .into_iter()
            .map(|layer| match layer {
                LayerCache::Kv(kv)
                    if kv.window().is_none() && kv.chunk().is_none() && kv.offset() == 0 =>
                {
                    Ok(LayerCache::Kv(KvCache::left_padded(padding)?))
                }
                LayerCache::Stateless { offset: 0 } => Ok(layer),
                other => Err(Error::Mlx(Exception::custom(format!(
                    "only empty unbounded KV caches can prefill a padded batch, not {}",
                    match other {
                        LayerCache::Kv(_) => "a sliding-window, chunked or used KV cache",
                        LayerCache::Latent(_) => "a latent cache",
                        LayerCache::Recurrent(_) => "a recurrent cache",
                        LayerCache::Stateless { .. } => "a used cache",
                    }
                )))),
            })
            .collect()
    }

    /// The position of the next token of a whole model's cache, checking that every
    /// layer agrees.
    pub fn offset_of(cache: &[LayerCache]) -> Result<i32> {
        let offset = cache.first().map_or(0, LayerCache::offset);
        match cache.iter().find(|c| c.offset() != offset) {
            None => Ok(offset),
            Some(other) => Err(Error::Mlx(Exception::custom(format!(
                "the layers' caches disagree on the position: {offset} and {}",
                other.offset()
            )))),
        }
    }
}

impl From<KvCache> for LayerCache {
    fn from(kv: KvCache) -> Self {
        LayerCache::Kv(kv)
    }
}
