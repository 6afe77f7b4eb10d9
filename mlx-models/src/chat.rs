//! Multi-turn chat that keeps the KV cache between turns: each new turn only processes
//! the tokens that differ from what the cache already holds.

use crate::cache::LayerCache;
use crate::chat_template::Message;
use crate::error::Result;
use crate::generate::{GenerateOptions, TokenStream};
use crate::load::Model;

/// A conversation with a model.
///
/// ```no_run
/// use mlx_models::chat::ChatSession;
/// use mlx_models::generate::GenerateOptions;
/// use mlx_models::load::{load, LoadOptions, ModelSource};
///
/// let model = load(&ModelSource::Default, &LoadOptions::new())?;
/// let mut chat = ChatSession::new(&model);
/// let mut reply = chat.send("Name a colour.", GenerateOptions::new())?;
/// for token in &mut reply {
///     print!("{}", token?.text);
/// }
/// chat.record(reply);
/// # Ok::<(), mlx_models::Error>(())
/// ```
pub struct ChatSession<'m> {
    model: &'m Model,
    messages: Vec<Message>,
    cache: Vec<LayerCache>,
    /// The tokens the cache holds.
    cached: Vec<u32>,
    reused: usize,
}

impl<'m> ChatSession<'m> {
    pub fn new(model: &'m Model) -> Self {
        ChatSession {
            model,
            messages: Vec::new(),
            cache: model.network().new_cache(),
            cached: Vec::new(),
            reused: 0,
        }
    }

    /// Starts the conversation with a system message.
    pub fn with_system(mut self, system: impl Into<String>) -> Self {
        self.messages.insert(0, Message::system(system));
        self
    }

    /// The conversation so far.
    pub fn messages(&self) -> &[Message] {
        &self.messages
    }

    /// How many prompt tokens the last turn took from the cache instead of recomputing.
    pub fn reused_tokens(&self) -> usize {
        self.reused
    }

    /// Adds the user's message and starts the assistant's reply; pass the finished
    /// stream to [`ChatSession::record`].
    pub fn send(
        &mut self,
        user: impl Into<String>,
        options: GenerateOptions,
    ) -> Result<TokenStream<'m>> {
        self.messages.push(Message::user(user));
        let prompt = self.model.chat_prompt(&self.messages)?;
        let common = self
            .cached
            .iter()
            .zip(&prompt)
            .take_while(|(a, b)| a == b)
            .count();
        // At least one token must go through the model to get logits.
        let keep = common.min(prompt.len().saturating_sub(1));
        let mut cache = std::mem::take(&mut self.cache);
        // A rotating (sliding-window) cache may have dropped tokens the prefix needs: then
        // the whole prompt goes through the model again.
        let keep = if LayerCache::truncate_all(&mut cache, keep as i32)? {
            keep
        } else {
            0
        };
        self.cached.clear();
        self.reused = keep;
        TokenStream::new(self.model, prompt, cache, keep, options)
    }

    /// Records the assistant's reply and keeps the cache for the next turn.
    pub fn record(&mut self, reply: TokenStream<'m>) {
        self.messages
            .push(Message::assistant(reply.text().to_owned()));
        let (cache, tokens) = reply.into_cache();
        self.cache = cache;
        self.cached = tokens;
    }

    /// Forgets the conversation (the system message stays).
    pub fn clear(&mut self) {
        self.messages.retain(|m| m.role == "system");
        self.cache = self.model.network().new_cache();
        self.cached.clear();
    }
}

#[cfg(test)]
mod tests {
    use crate::cache::{KvCache, LayerCache};
    use mlx_rs::Array;

    fn truncate_all(cache: &mut [LayerCache], len: i32) -> crate::Result<bool> {
        LayerCache::truncate_all(cache, len)
    }

    /// Layers of every kind, each fed `tokens` tokens.
    fn layers(window: i32, tokens: i32) -> Vec<LayerCache> {
        let mut cache: Vec<LayerCache> = vec![
            KvCache::new().into(),
            KvCache::rotating(window).into(),
            KvCache::new().into(),
        ];
        let kv = Array::from_slice(&vec![0.5f32; tokens as usize * 4], &[1, 1, tokens, 4]);
        for layer in &mut cache {
            layer
                .kv_mut()
                .unwrap()
                .attend(kv.clone(), kv.clone())
                .expect("attend");
        }
        cache
    }

    fn kv(cache: &mut LayerCache) -> &mut KvCache {
        cache.kv_mut().unwrap()
    }

    #[test]
    fn truncate_all_keeps_a_prefix_every_layer_still_has() {
        let mut cache = layers(4, 10);
        assert!(truncate_all(&mut cache, 9).unwrap());
        assert!(cache.iter().all(|c| c.offset() == 9));
        assert_eq!(kv(&mut cache[1]).len(), 3);
        assert_eq!(kv(&mut cache[0]).len(), 9);
    }

    #[test]
    fn truncate_all_resets_every_layer_when_one_cannot() {
        let mut cache = layers(4, 10);
        assert!(!truncate_all(&mut cache, 5).unwrap());
        assert!(cache.iter().all(|c| c.offset() == 0 && c.nbytes() == 0));
        assert_eq!(kv(&mut cache[1]).window(), Some(4));
        assert_eq!(kv(&mut cache[0]).window(), None);
    }

    #[test]
    fn a_recurrent_state_is_never_cut_back() {
        use crate::cache::RecurrentCache;
        let mut cache = layers(4, 10);
        let mut state = RecurrentCache::new();
        state.state = Some(Array::from_slice(&[1.0f32], &[1]));
        state.advance(10);
        cache.push(LayerCache::Recurrent(state));
        // The whole history is kept as it is ...
        assert!(truncate_all(&mut cache, 10).unwrap());
        assert!(cache.iter().all(|c| c.offset() == 10));
        // ... but any shorter prefix empties every layer, so the turn re-prefills.
        assert!(!truncate_all(&mut cache, 9).unwrap());
        assert!(cache.iter().all(|c| c.offset() == 0 && c.nbytes() == 0));
    }
}
