//! Prompt-prefix reuse across requests: the caches of finished requests, least recently
//! used first out, bounded in bytes.

use crate::cache::LayerCache;
use crate::error::Result;

/// One finished request's cache and the tokens it holds.
struct Entry {
    tokens: Vec<u32>,
    cache: Vec<LayerCache>,
    bytes: usize,
}

/// Caches of earlier requests, most recently used last, at most `budget` bytes together.
pub(crate) struct PrefixCache {
    entries: Vec<Entry>,
    budget: usize,
    bytes: usize,
}

/// What a lookup found: a cache holding the first `reused` tokens of the prompt.
pub(crate) struct Reuse {
    pub cache: Vec<LayerCache>,
    pub reused: usize,
}

impl PrefixCache {
    pub fn new(budget: usize) -> Self {
        PrefixCache {
            entries: Vec::new(),
            budget,
            bytes: 0,
        }
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// The cache sharing the longest prefix with `prompt`, cut back to that prefix (at most
    /// all but the prompt's last token, which must go through the model for its logits).
    /// `None` when no entry shares a token, or when the best entry's cache kind cannot be
    /// cut back to the prefix (a sliding window that dropped the tokens, a recurrent
    /// state): the prompt is then prefilled whole.
    pub fn lookup(&mut self, prompt: &[u32]) -> Result<Option<Reuse>> {
        let limit = prompt.len().saturating_sub(1);
        let best = self
            .entries
            .iter()
            .enumerate()
            .map(|(i, e)| (i, common_prefix(&e.tokens, prompt).min(limit)))
            .filter(|&(_, n)| n > 0)
            .max_by_key(|&(i, n)| (n, i));
        let Some((index, keep)) = best else {
            return Ok(None);
        };
        // Arrays are immutable values: the clone shares their buffers.
        let mut cache = self.entries[index].cache.clone();
        let entry = self.entries.remove(index);
        self.entries.push(entry);
        if !LayerCache::truncate_all(&mut cache, keep as i32)? {
            return Ok(None);
        }
        Ok(Some(Reuse {
            cache,
            reused: keep,
        }))
    }

    /// Keeps `cache`, which holds `tokens`; drops entries that are prefixes of it, then the
    /// least recently used ones until the total fits the budget. A cache larger than the
    /// whole budget is not kept.
    pub fn insert(&mut self, tokens: Vec<u32>, cache: Vec<LayerCache>) {
        let bytes: usize = cache.iter().map(LayerCache::nbytes).sum();
        if tokens.is_empty() || bytes > self.budget {
            return;
        }
        self.entries.retain(|e| {
            let redundant = e.tokens.len() <= tokens.len() && tokens.starts_with(&e.tokens);
            !redundant
        });
        self.entries.push(Entry {
            tokens,
            cache,
            bytes,
        });
        self.bytes = self.entries.iter().map(|e| e.bytes).sum();
        while self.bytes > self.budget && !self.entries.is_empty() {
            let evicted = self.entries.remove(0);
            self.bytes -= evicted.bytes;
        }
    }

    /// How many caches are held.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.entries.len()
    }
}

fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::{KvCache, RecurrentCache};
    use mlx_rs::Array;

    /// An unbounded one-layer cache fed `tokens` tokens (4 floats of keys per token).
    fn cache(tokens: usize) -> Vec<LayerCache> {
        let mut kv = KvCache::new();
        let x = Array::from_slice(&vec![1.0f32; tokens * 4], &[1, 1, tokens as i32, 4]);
        kv.attend(x.clone(), x).unwrap();
        vec![kv.into()]
    }

    #[test]
    fn the_longest_shared_prefix_is_reused_and_cut_back() {
        let mut lru = PrefixCache::new(1 << 20);
        lru.insert(vec![1, 2, 3, 4, 5], cache(5));
        lru.insert(vec![1, 2, 9], cache(3));
        let reuse = lru.lookup(&[1, 2, 3, 4, 7, 8]).unwrap().unwrap();
        assert_eq!(reuse.reused, 4);
        assert_eq!(reuse.cache[0].offset(), 4);
        // The prompt's last token always goes through the model.
        let reuse = lru.lookup(&[1, 2, 3, 4, 5]).unwrap().unwrap();
        assert_eq!(reuse.reused, 4);
        assert!(lru.lookup(&[7, 1, 2]).unwrap().is_none());
        // The entry itself was not changed by the lookups.
        let reuse = lru.lookup(&[1, 2, 3, 4, 5, 6]).unwrap().unwrap();
        assert_eq!(reuse.reused, 5);
    }

    #[test]
    fn the_budget_evicts_the_least_recently_used() {
        let one = cache(4)[0].nbytes();
        let mut lru = PrefixCache::new(2 * one);
        lru.insert(vec![1, 1, 1, 1], cache(4));
        lru.insert(vec![2, 2, 2, 2], cache(4));
        // Using the first makes the second the oldest.
        assert!(lru.lookup(&[1, 1, 1, 1, 1]).unwrap().is_some());
        lru.insert(vec![3, 3, 3, 3], cache(4));
        assert_eq!(lru.len(), 2);
        assert!(lru.bytes() <= 2 * one);
        assert!(lru.lookup(&[2, 2, 2, 2, 2]).unwrap().is_none());
        assert!(lru.lookup(&[1, 1, 1, 1, 1]).unwrap().is_some());
        // Too large for the whole budget: not kept.
        lru.insert(vec![4; 12], cache(12));
        assert!(lru.lookup(&[4; 13]).unwrap().is_none());
    }

    #[test]
    fn a_longer_entry_replaces_its_prefixes() {
        let mut lru = PrefixCache::new(1 << 20);
        lru.insert(vec![1, 2], cache(2));
        lru.insert(vec![1, 2, 3], cache(3));
        assert_eq!(lru.len(), 1);
    }

    #[test]
    fn a_state_that_cannot_be_cut_back_falls_back_to_a_full_prefill() {
        let mut lru = PrefixCache::new(1 << 20);
        let mut state = RecurrentCache::new();
        state.state = Some(Array::from_slice(&[1.0f32], &[1]));
        state.advance(3);
        lru.insert(vec![1, 2, 3], vec![LayerCache::Recurrent(state)]);
        // A prompt that continues all three tokens reuses the state as it is ...
        let reuse = lru.lookup(&[1, 2, 3, 4]).unwrap().unwrap();
        assert_eq!(reuse.reused, 3);
        // ... one that diverges earlier cannot.
        assert!(lru.lookup(&[1, 2, 5, 6]).unwrap().is_none());
    }
}
