//! Text generation: a stream of tokens with their text, stop conditions and statistics.
//!
//! ```no_run
//! use mlx_models::generate::GenerateOptions;
//! use mlx_models::load::{load, LoadOptions, ModelSource};
//! use mlx_models::Message;
//!
//! let model = load(&ModelSource::Default, &LoadOptions::new())?;
//! let prompt = model.chat_prompt(&[Message::user("What is the capital of France?")])?;
//! let mut stream = model.generate(&prompt, GenerateOptions::new().max_tokens(24))?;
//! for token in &mut stream {
//!     print!("{}", token?.text);
//! }
//! println!("\n{}", stream.stats());
//! # Ok::<(), mlx_models::Error>(())
//! ```

use crate::cache::LayerCache;
use crate::chat_template::{ChatTemplateOptions, Message};
use crate::error::{Error, Result};
use crate::load::Model;
use crate::model::LanguageModel;
use crate::sampling::{Sampler, SamplerBuilder};
use crate::tap::Tap;
use crate::tokenizer::StreamDecoder;
use mlx_rs::{ops::indexing::argmax_axis, Array, Dtype};
use std::fmt;
use std::time::{Duration, Instant};

/// Prompts are fed to the model in chunks of this many tokens.
const PREFILL_CHUNK: usize = 512;

/// How to generate.
#[derive(Debug, Clone)]
pub struct GenerateOptions {
    max_tokens: usize,
    sampler: Option<SamplerBuilder>,
    stop: Vec<String>,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        GenerateOptions {
            max_tokens: 256,
            sampler: None,
            stop: Vec::new(),
        }
    }
}

impl GenerateOptions {
    /// 256 tokens at most, sampling as the model's generation_config.json says.
    pub fn new() -> Self {
        Self::default()
    }

    /// The most tokens to generate (fewer if the context fills up).
    pub fn max_tokens(mut self, n: usize) -> Self {
        self.max_tokens = n;
        self
    }

    /// How to pick tokens; without this, the model's generation_config.json decides
    /// (greedy when it does not ask for sampling).
    pub fn sampler(mut self, sampler: SamplerBuilder) -> Self {
        self.sampler = Some(sampler);
        self
    }

    /// Stops when the text contains `stop` (which is not emitted).
    pub fn stop(mut self, stop: impl Into<String>) -> Self {
        let stop = stop.into();
        if !stop.is_empty() {
            self.stop.push(stop);
        }
        self
    }
}

/// One generated token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Token {
    pub id: u32,
    /// The text this token completes (empty while a multi-byte character or a possible
    /// stop string is still pending).
    pub text: String,
}

/// Why generation ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FinishReason {
    /// The model produced an end-of-sequence token.
    EndOfSequence,
    /// `max_tokens` were generated, or the context is full.
    Length,
    /// The text reached a stop string.
    Stop(String),
}

/// Throughput and memory of a generation, as mlx-lm reports them.
#[derive(Debug, Clone, Default)]
pub struct GenerationStats {
    pub prompt_tokens: usize,
    pub prompt_time: Duration,
    pub generated_tokens: usize,
    pub generation_time: Duration,
    /// MLX's peak memory use so far, in bytes.
    pub peak_memory: usize,
}

impl GenerationStats {
    pub fn prompt_tokens_per_second(&self) -> f64 {
        rate(self.prompt_tokens, self.prompt_time)
    }

    pub fn generation_tokens_per_second(&self) -> f64 {
        rate(self.generated_tokens, self.generation_time)
    }
}

fn rate(tokens: usize, time: Duration) -> f64 {
    if time.is_zero() {
        0.0
    } else {
        tokens as f64 / time.as_secs_f64()
    }
}

impl fmt::Display for GenerationStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "Prompt: {} tokens, {:.3} tokens-per-sec",
            self.prompt_tokens,
            self.prompt_tokens_per_second()
        )?;
        writeln!(
            f,
            "Generation: {} tokens, {:.3} tokens-per-sec",
            self.generated_tokens,
            self.generation_tokens_per_second()
        )?;
        write!(f, "Peak memory: {:.3} GB", self.peak_memory as f64 / 1e9)
    }
}

impl Model {
    /// The token ids of a conversation rendered with the chat template, ready for the
    /// assistant's reply.
    pub fn chat_prompt(&self, messages: &[Message]) -> Result<Vec<u32>> {
        let text = self.tokenizer().apply_chat_template(
            messages,
            &ChatTemplateOptions::new().add_generation_prompt(true),
        )?;
        // The template writes the special tokens itself.
        self.tokenizer().encode(&text, false)
    }

    /// Starts generating after `prompt`.
    pub fn generate(&self, prompt: &[u32], options: GenerateOptions) -> Result<TokenStream<'_>> {
        TokenStream::new(
            self,
            prompt.to_vec(),
            self.network().new_cache(),
            0,
            options,
        )
    }
}

/// Generated tokens, one per iteration; the prompt is processed on the first call.
pub struct TokenStream<'m> {
    model: &'m Model,
    cache: Vec<LayerCache>,
    /// Tokens not yet fed to the model.
    pending: Vec<u32>,
    /// Every token so far: prompt and generated (the penalties' history).
    history: Vec<u32>,
    sampler: Sampler,
    decoder: StreamDecoder,
    stop: StopStrings,
    eos: Vec<u32>,
    max_tokens: usize,
    stats: GenerationStats,
    finish: Option<FinishReason>,
    generated: Vec<u32>,
    text: String,
}

impl<'m> TokenStream<'m> {
    /// A stream over `cache`, which already holds the first `cached` tokens of `prompt`.
    pub(crate) fn new(
        model: &'m Model,
        prompt: Vec<u32>,
        cache: Vec<LayerCache>,
        cached: usize,
        options: GenerateOptions,
    ) -> Result<Self> {
        if prompt.is_empty() {
            return Err(Error::EmptyPrompt);
        }
        let context = model.info().max_position_embeddings;
        if prompt.len() >= context {
            return Err(Error::PromptTooLong {
                prompt_tokens: prompt.len(),
                context,
            });
        }
        let vocab = model.info().vocab_size as usize;
        if let Some(&bad) = prompt.iter().find(|&&t| t as usize >= vocab) {
            return Err(Error::Tokenizer {
                path: None,
                message: format!("prompt token {bad} is outside the model's vocabulary of {vocab}"),
            });
        }
        let sampler = match options.sampler {
            Some(builder) => builder.build()?,
            None => SamplerBuilder::from_generation_config(model.generation_config()).build()?,
        };
        let mut eos = model.tokenizer().eos_token_ids().to_vec();
        eos.extend(model.generation_config().eos_token_ids());
        Ok(TokenStream {
            model,
            cache,
            pending: prompt[cached..].to_vec(),
            stats: GenerationStats {
                prompt_tokens: prompt.len() - cached,
                ..Default::default()
            },
            history: prompt,
            sampler,
            decoder: model.tokenizer().stream_decoder().skip_special_tokens(true),
            stop: StopStrings::new(options.stop),
            eos,
            max_tokens: options.max_tokens,
            finish: None,
            generated: Vec::new(),
            text: String::new(),
        })
    }

    /// Why the stream ended (`None` while it runs).
    pub fn finish_reason(&self) -> Option<&FinishReason> {
        self.finish.as_ref()
    }

    /// Throughput so far.
    pub fn stats(&self) -> &GenerationStats {
        &self.stats
    }

    /// The generated token ids.
    pub fn tokens(&self) -> &[u32] {
        &self.generated
    }

    /// The generated text so far (without any stop string).
    pub fn text(&self) -> &str {
        &self.text
    }

    /// Ends the stream and hands back the cache and every token it holds.
    pub(crate) fn into_cache(self) -> (Vec<LayerCache>, Vec<u32>) {
        // The last sampled token was never fed to the model.
        let mut tokens = self.history;
        tokens.truncate(LayerCache::offset_of(&self.cache).unwrap_or(0) as usize);
        (self.cache, tokens)
    }

    /// Feeds the pending tokens and returns the logits of the last one.
    fn step(&mut self) -> Result<Array> {
        let network: &dyn LanguageModel = self.model.network();
        let mut logits = None;
        for chunk in self.pending.chunks(PREFILL_CHUNK) {
            let ids: Vec<i32> = chunk.iter().map(|&t| t as i32).collect();
            let input = Array::from_slice(&ids, &[1, ids.len() as i32]);
            let out = network.forward(&input, &mut self.cache, &mut Tap::off())?;
            let last = out.take_axis(Array::from_int(out.dim(1) - 1), 1)?;
            // Evaluate per chunk so long prompts don't build one huge graph.
            last.eval()?;
            logits = Some(last);
        }
        self.pending.clear();
        Ok(logits.expect("step is only called with pending tokens"))
    }

    fn next_token(&mut self) -> Result<Option<Token>> {
        if self.finish.is_some() {
            return Ok(None);
        }
        let context = self.model.info().max_position_embeddings;
        if self.generated.len() >= self.max_tokens || self.history.len() >= context {
            return self.end(FinishReason::Length);
        }
        let started = Instant::now();
        let is_prompt = self.generated.is_empty();
        let logits = self.step()?;
        let row = logits.as_dtype(Dtype::Float32)?;
        let row = row.as_slice::<f32>();
        if !row.iter().all(|x| x.is_finite()) {
            return Err(Error::NonFiniteLogits {
                step: self.generated.len(),
            });
        }
        let id = self.sampler.sample(row, &self.history)?;
        if is_prompt {
            self.stats.prompt_time = started.elapsed();
        } else {
            self.stats.generation_time += started.elapsed();
        }
        self.stats.peak_memory = mlx_rs::memory::peak_memory().unwrap_or(0);

        if self.eos.contains(&id) {
            return self.end(FinishReason::EndOfSequence);
        }
        self.generated.push(id);
        self.stats.generated_tokens = self.generated.len();
        self.history.push(id);
        self.pending.push(id);

        let chunk = self.decoder.push(id)?.unwrap_or_default();
        let (text, stopped) = self.stop.push(&chunk);
        self.text.push_str(&text);
        if let Some(stop) = stopped {
            self.finish = Some(FinishReason::Stop(stop));
        }
        Ok(Some(Token { id, text }))
    }

    fn end(&mut self, reason: FinishReason) -> Result<Option<Token>> {
        self.finish = Some(reason);
        // Text held back for a stop string that never completed belongs to the output.
        let rest = self.stop.flush();
        if rest.is_empty() {
            return Ok(None);
        }
        self.text.push_str(&rest);
        Ok(Some(Token {
            id: *self.generated.last().unwrap_or(&0),
            text: rest,
        }))
    }
}

impl Iterator for TokenStream<'_> {
    type Item = Result<Token>;

    fn next(&mut self) -> Option<Self::Item> {
        match self.next_token() {
            Ok(Some(token)) => Some(Ok(token)),
            Ok(None) => None,
            Err(e) => {
                self.finish = Some(FinishReason::Length);
                Some(Err(e))
            }
        }
    }
}

/// Holds back text that may be the start of a stop string.
#[derive(Debug, Default)]
pub(crate) struct StopStrings {
    stops: Vec<String>,
    held: String,
}

impl StopStrings {
    pub(crate) fn new(stops: Vec<String>) -> Self {
        StopStrings {
            stops,
            held: String::new(),
        }
    }

    /// Adds text; returns what can be shown and the stop string hit, if any.
    pub(crate) fn push(&mut self, chunk: &str) -> (String, Option<String>) {
        self.held.push_str(chunk);
        if let Some((at, stop)) = self
            .stops
            .iter()
            .filter_map(|s| self.held.find(s.as_str()).map(|at| (at, s.clone())))
            .min_by_key(|(at, _)| *at)
        {
            let shown = self.held[..at].to_owned();
            self.held.clear();
            return (shown, Some(stop));
        }
        // Keep the longest tail that a stop string starts with.
        let keep = self
            .stops
            .iter()
            .flat_map(|s| {
                (1..s.len())
                    .filter(|&n| s.is_char_boundary(n))
                    .map(move |n| &s[..n])
            })
            .filter(|prefix| self.held.ends_with(prefix))
            .map(str::len)
            .max()
            .unwrap_or(0);
        let split = self.held.len() - keep;
        let shown = self.held[..split].to_owned();
        self.held.drain(..split);
        (shown, None)
    }

    pub(crate) fn flush(&mut self) -> String {
        std::mem::take(&mut self.held)
    }
}

/// The `count` tokens greedy decoding appends to `prompt` (no end-of-sequence stop): the
/// reference the verification harness compares with Transformers' `generate`. Logits that
/// are NaN or infinite are [`Error::NonFiniteLogits`] naming the step.
pub fn greedy(model: &dyn LanguageModel, prompt: &[u32], count: usize) -> Result<Vec<u32>> {
    if prompt.is_empty() {
        return Err(Error::EmptyPrompt);
    }
    let mut cache = model.new_cache();
    let ids: Vec<i32> = prompt.iter().map(|&t| t as i32).collect();
    let mut input = Array::from_slice(&ids, &[1, ids.len() as i32]);
    let mut out = Vec::with_capacity(count);
    for _ in 0..count {
        let logits = model.forward(&input, &mut cache, &mut Tap::off())?;
        let last = logits.take_axis(Array::from_int(logits.dim(1) - 1), 1)?;
        let finite = last.is_finite()?.all(None)?;
        let token = argmax_axis(&last, -1, None)?.as_dtype(Dtype::Uint32)?;
        mlx_rs::transforms::eval([&finite, &token])?;
        if !finite.as_slice::<bool>().first().copied().unwrap_or(false) {
            return Err(Error::NonFiniteLogits { step: out.len() });
        }
        let token = token.as_slice::<u32>()[0];
        out.push(token);
        input = Array::from_slice(&[token as i32], &[1, 1]);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::StopStrings;

    #[test]
    fn stop_strings_hold_back_partial_matches() {
        let mut s = StopStrings::new(vec!["<end>".into()]);
        assert_eq!(s.push("Hello <e"), ("Hello ".into(), None));
        assert_eq!(s.push("n"), (String::new(), None));
        assert_eq!(s.push("d> more"), (String::new(), Some("<end>".into())));
    }

    #[test]
    fn stop_strings_release_text_that_did_not_match() {
        let mut s = StopStrings::new(vec!["\n\n".into()]);
        assert_eq!(s.push("a\n"), ("a".into(), None));
        assert_eq!(s.push("b"), ("\nb".into(), None));
        assert_eq!(s.flush(), "");
        let mut s = StopStrings::new(vec!["xyz".into()]);
        assert_eq!(s.push("ax"), ("a".into(), None));
        assert_eq!(s.flush(), "x");
    }

    #[test]
    fn earliest_stop_string_wins() {
        let mut s = StopStrings::new(vec!["bb".into(), "a".into()]);
        assert_eq!(s.push("xxbbya"), ("xx".into(), Some("bb".into())));
    }
}
