//! Choosing the next token from a row of logits.
//!
//! [`Sampler`] adjusts the logits for what was already generated and then draws from what is
//! left, in this order:
//!
//! 1. logit bias: added to the listed tokens;
//! 2. repetition penalty (as in Transformers and mlx-lm): the logit of every token seen in the
//!    last `repetition_context_size` tokens of the history is divided by the penalty when
//!    positive and multiplied by it when negative;
//! 3. presence penalty: subtracted once from every token seen in that window;
//! 4. frequency penalty: subtracted once per occurrence in that window;
//! 5. temperature 0 picks the largest logit (the first one on ties); otherwise the logits are
//!    divided by the temperature and filtered as Transformers' warpers do, in their order:
//!    top-k (the k largest, ties with the k-th kept), top-p (the most probable tokens until
//!    their mass reaches p, at least one) and min-p (tokens at least `min_p` times as probable
//!    as the most probable one);
//! 6. a token is drawn from the renormalised probabilities with a seeded ChaCha8 generator, so
//!    a seed reproduces a run exactly.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher};
use std::path::Path;

use rand_chacha::ChaCha8Rng;
use rand_core::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// mlx-lm's default window for the repetition, presence and frequency penalties.
pub const DEFAULT_REPETITION_CONTEXT_SIZE: usize = 20;

/// The parameters of a [`Sampler`]; see the module documentation for what each does.
#[derive(Clone, Debug, PartialEq)]
pub struct SamplerBuilder {
    temperature: f32,
    top_k: usize,
    top_p: f32,
    min_p: f32,
    repetition_penalty: f32,
    repetition_context_size: usize,
    presence_penalty: f32,
    frequency_penalty: f32,
    logit_bias: HashMap<u32, f32>,
    seed: Option<u64>,
}

impl Default for SamplerBuilder {
    fn default() -> Self {
        SamplerBuilder {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            repetition_context_size: DEFAULT_REPETITION_CONTEXT_SIZE,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            logit_bias: HashMap::new(),
            seed: None,
        }
    }
}

impl SamplerBuilder {
    /// Temperature; 0 means greedy (argmax). Default 1.
    pub fn temperature(mut self, temperature: f32) -> Self {
        self.temperature = temperature;
        self
    }

    /// Keep only the `k` most likely tokens; 0 (the default) keeps all.
    pub fn top_k(mut self, k: usize) -> Self {
        self.top_k = k;
        self
    }

    /// Nucleus sampling: keep the most likely tokens until their probability reaches `p`, in
    /// (0, 1]; 1 (the default) keeps all.
    pub fn top_p(mut self, p: f32) -> Self {
        self.top_p = p;
        self
    }

    /// Drop tokens less than `min_p` times as likely as the most likely one, in [0, 1];
    /// default 0.
    pub fn min_p(mut self, min_p: f32) -> Self {
        self.min_p = min_p;
        self
    }

    /// Multiplicative penalty on tokens seen recently, > 0; 1 (the default) is none.
    pub fn repetition_penalty(mut self, penalty: f32) -> Self {
        self.repetition_penalty = penalty;
        self
    }

    /// How many of the last history tokens the penalties look at; 0 means the whole history.
    /// Default 20, as mlx-lm.
    pub fn repetition_context_size(mut self, size: usize) -> Self {
        self.repetition_context_size = size;
        self
    }

    /// Subtracted once from the logit of every token in the penalty window.
    pub fn presence_penalty(mut self, penalty: f32) -> Self {
        self.presence_penalty = penalty;
        self
    }

    /// Subtracted from a token's logit once per occurrence in the penalty window.
    pub fn frequency_penalty(mut self, penalty: f32) -> Self {
        self.frequency_penalty = penalty;
        self
    }

    /// Added to the logits of the given tokens (`f32::NEG_INFINITY` bans a token).
    pub fn logit_bias(mut self, bias: HashMap<u32, f32>) -> Self {
        self.logit_bias = bias;
        self
    }

    /// Seeds the random generator; without a seed each sampler starts from a fresh one.
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = Some(seed);
        self
    }

    /// The sampler a generation_config.json asks for, as Transformers reads it: greedy unless
    /// `do_sample` is true, and then Transformers' defaults (temperature 1, top-k 50, top-p 1)
    /// for what the file leaves out. The repetition penalty looks at the whole history, as in
    /// Transformers.
    pub fn from_generation_config(config: &GenerationConfig) -> Self {
        let mut builder = SamplerBuilder {
            repetition_penalty: config.repetition_penalty.unwrap_or(1.0),
            repetition_context_size: 0,
            ..Default::default()
        };
        if config.do_sample.unwrap_or(false) {
            builder.temperature = config.temperature.unwrap_or(1.0);
            builder.top_k = config.top_k.unwrap_or(50);
            builder.top_p = config.top_p.unwrap_or(1.0);
            builder.min_p = config.min_p.unwrap_or(0.0);
        } else {
            builder.temperature = 0.0;
        }
        builder
    }

    /// Checks the parameters and builds the sampler.
    pub fn build(self) -> Result<Sampler> {
        let bad = |message: String| Err(Error::Sampling { message });
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return bad(format!(
                "temperature must be a finite number ≥ 0, got {}",
                self.temperature
            ));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad(format!("top_p must be in (0, 1], got {}", self.top_p));
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return bad(format!("min_p must be in [0, 1], got {}", self.min_p));
        }
        if !(self.repetition_penalty.is_finite() && self.repetition_penalty > 0.0) {
            return bad(format!(
                "repetition_penalty must be a finite number > 0, got {}",
                self.repetition_penalty
            ));
        }
        for (name, value) in [
            ("presence_penalty", self.presence_penalty),
            ("frequency_penalty", self.frequency_penalty),
        ] {
            if !value.is_finite() {
                return bad(format!("{name} must be finite, got {value}"));
            }
        }
        if let Some((token, bias)) = self
            .logit_bias
            .iter()
            .find(|(_, b)| b.is_nan() || **b == f32::INFINITY)
        {
            return bad(format!(
                "logit bias of token {token} must be a number or -inf, got {bias}"
            ));
        }
        let seed = self.seed.unwrap_or_else(|| {
            let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
            hasher.write_u128(
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_nanos()),
            );
            hasher.finish()
        });
        Ok(Sampler {
            params: self,
            rng: ChaCha8Rng::seed_from_u64(seed),
        })
    }
}

/// Picks tokens from logits; see the module documentation.
#[derive(Clone, Debug)]
pub struct Sampler {
    params: SamplerBuilder,
    rng: ChaCha8Rng,
}

impl Sampler {
    /// A builder with the defaults: temperature 1, no filtering, no penalties.
    pub fn builder() -> SamplerBuilder {
        SamplerBuilder::default()
    }

    /// Always the most likely token.
    pub fn greedy() -> Sampler {
        Sampler {
            params: SamplerBuilder {
                temperature: 0.0,
                ..Default::default()
            },
            rng: ChaCha8Rng::seed_from_u64(0),
        }
    }

    /// Whether this sampler always takes the most likely token.
    pub fn is_greedy(&self) -> bool {
        self.params.temperature == 0.0
    }

    /// The next token for this row of logits (one per vocabulary entry), given the tokens so
    /// far (prompt and generated) for the penalties.
    pub fn sample(&mut self, logits: &[f32], history: &[u32]) -> Result<u32> {
        let candidates = self.candidates(logits, history)?;
        if let [(token, _)] = candidates.as_slice() {
            return Ok(*token);
        }
        // 53 random bits → a uniform number in [0, 1).
        let draw = (self.rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
        let mut cumulative = 0.0;
        for &(token, probability) in &candidates {
            cumulative += probability;
            if draw < cumulative {
                return Ok(token);
            }
        }
        candidates
            .last()
            .map(|&(token, _)| token)
            .ok_or_else(|| Error::Sampling {
                message: "no token left to sample".into(),
            })
    }

    /// The probabilities [`Sampler::sample`] draws from (zero for filtered-out tokens; one-hot
    /// when greedy).
    pub fn distribution(&self, logits: &[f32], history: &[u32]) -> Result<Vec<f32>> {
        let mut probabilities = vec![0.0; logits.len()];
        for (token, probability) in self.candidates(logits, history)? {
            probabilities[token as usize] = probability as f32;
        }
        Ok(probabilities)
    }

    /// The logits after bias and penalties, before temperature and filtering.
    pub fn adjusted_logits(&self, logits: &[f32], history: &[u32]) -> Result<Vec<f32>> {
        Ok(self
            .adjust(logits, history)?
            .into_iter()
            .map(|x| x as f32)
            .collect())
    }

    fn adjust(&self, logits: &[f32], history: &[u32]) -> Result<Vec<f64>> {
        let p = &self.params;
        let vocab = logits.len();
        if vocab == 0 {
            return Err(Error::Sampling {
                message: "empty logits".into(),
            });
        }
        if let Some(index) = logits.iter().position(|x| x.is_nan()) {
            return Err(Error::Sampling {
                message: format!("logit {index} is NaN"),
            });
        }
        let mut adjusted: Vec<f64> = logits.iter().map(|&x| f64::from(x)).collect();
        let out_of_range = |what: &str, token: u32| Error::Sampling {
            message: format!("{what} token {token} is outside the {vocab} logits"),
        };
        for (&token, &bias) in &p.logit_bias {
            *adjusted
                .get_mut(token as usize)
                .ok_or_else(|| out_of_range("logit bias", token))? += f64::from(bias);
        }
        let window = match p.repetition_context_size {
            0 => history,
            size => &history[history.len().saturating_sub(size)..],
        };
        let mut counts: HashMap<u32, u32> = HashMap::new();
        for &token in window {
            if token as usize >= vocab {
                return Err(out_of_range("history", token));
            }
            *counts.entry(token).or_default() += 1;
        }
        let penalty = f64::from(p.repetition_penalty);
        for (&token, &count) in &counts {
            let logit = &mut adjusted[token as usize];
            if penalty != 1.0 {
                *logit = if *logit < 0.0 {
                    *logit * penalty
                } else {
                    *logit / penalty
                };
            }
            *logit -=
                f64::from(p.presence_penalty) + f64::from(p.frequency_penalty) * f64::from(count);
        }
        Ok(adjusted)
    }

    /// The tokens that may be drawn, in id order, with their probabilities (summing to 1).
    fn candidates(&self, logits: &[f32], history: &[u32]) -> Result<Vec<(u32, f64)>> {
        let p = &self.params;
        let adjusted = self.adjust(logits, history)?;
        let (best, best_logit) = adjusted.iter().copied().enumerate().fold(
            (0, f64::NEG_INFINITY),
            |(bi, bx), (i, x)| if x > bx { (i, x) } else { (bi, bx) },
        );
        if best_logit == f64::NEG_INFINITY {
            return Err(Error::Sampling {
                message: "every logit is -inf".into(),
            });
        }
        if self.is_greedy() {
            return Ok(vec![(best as u32, 1.0)]);
        }
        let scaled: Vec<f64> = adjusted
            .iter()
            .map(|x| x / f64::from(p.temperature))
            .collect();

        // Top-k: everything at least as large as the k-th largest.
        let threshold = if p.top_k > 0 && p.top_k < scaled.len() {
            let mut sorted = scaled.clone();
            let (_, kth, _) = sorted.select_nth_unstable_by(p.top_k - 1, |a, b| b.total_cmp(a));
            *kth
        } else {
            f64::NEG_INFINITY
        };
        let max = scaled[best];
        let mut kept: Vec<(u32, f64)> = scaled
            .iter()
            .enumerate()
            .filter(|(_, &x)| x >= threshold && x > f64::NEG_INFINITY)
            .map(|(i, &x)| (i as u32, (x - max).exp()))
            .collect();
        normalize(&mut kept);

        // Top-p: the most probable tokens until their mass reaches p.
        if p.top_p < 1.0 {
            kept = nucleus(kept, f64::from(p.top_p));
            normalize(&mut kept);
        }

        // Min-p: relative to the most probable token.
        if p.min_p > 0.0 {
            let top = kept.iter().map(|&(_, q)| q).fold(0.0, f64::max);
            kept.retain(|&(_, q)| q >= f64::from(p.min_p) * top);
            normalize(&mut kept);
        }
        Ok(kept)
    }
}

/// The most probable candidates (ties broken by id) until their mass reaches `top_p`, in id
/// order. Only the head of the ranking is sorted: a nucleus is usually a few dozen tokens of a
/// vocabulary of 100k.
fn nucleus(mut ranked: Vec<(u32, f64)>, top_p: f64) -> Vec<(u32, f64)> {
    let order = |a: &(u32, f64), b: &(u32, f64)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
    let mut head = 64.min(ranked.len());
    let count = loop {
        if head < ranked.len() {
            ranked.select_nth_unstable_by(head - 1, order);
        }
        ranked[..head].sort_unstable_by(order);
        let mut mass = 0.0;
        let reached = ranked[..head].iter().position(|&(_, q)| {
            mass += q;
            mass >= top_p
        });
        match reached {
            Some(index) => break index + 1,
            None if head == ranked.len() => break head,
            None => head = (head * 4).min(ranked.len()),
        }
    };
    ranked.truncate(count);
    ranked.sort_unstable_by_key(|&(token, _)| token);
    ranked
}

fn normalize(candidates: &mut [(u32, f64)]) {
    let total: f64 = candidates.iter().map(|&(_, q)| q).sum();
    for (_, q) in candidates.iter_mut() {
        *q /= total;
    }
}

/// One token id or several, as `eos_token_id` is written in Hugging Face configs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TokenIds {
    /// A single id.
    One(u32),
    /// A list of ids.
    Many(Vec<u32>),
}

impl TokenIds {
    /// The ids as a list.
    pub fn to_vec(&self) -> Vec<u32> {
        match self {
            TokenIds::One(id) => vec![*id],
            TokenIds::Many(ids) => ids.clone(),
        }
    }
}

/// The fields of generation_config.json that decoding uses; others are ignored.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct GenerationConfig {
    /// Sample (true) or decode greedily (false, Transformers' default).
    pub do_sample: Option<bool>,
    /// Sampling temperature.
    pub temperature: Option<f32>,
    /// Nucleus sampling mass.
    pub top_p: Option<f32>,
    /// Top-k filtering (0 disables).
    pub top_k: Option<usize>,
    /// Min-p filtering.
    pub min_p: Option<f32>,
    /// Repetition penalty.
    pub repetition_penalty: Option<f32>,
    /// The most tokens to generate.
    pub max_new_tokens: Option<usize>,
    /// The most tokens, prompt included.
    pub max_length: Option<usize>,
    /// The token(s) that end generation.
    pub eos_token_id: Option<TokenIds>,
    /// The beginning-of-sequence token.
    pub bos_token_id: Option<u32>,
    /// The padding token.
    pub pad_token_id: Option<u32>,
}

impl GenerationConfig {
    /// Reads a generation_config.json; a malformed file is an [`Error::Json`] naming it.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        serde_json::from_slice(&bytes).map_err(|source| Error::Json {
            path: path.to_owned(),
            source,
        })
    }

    /// The end-of-sequence ids (empty when unset).
    pub fn eos_token_ids(&self) -> Vec<u32> {
        self.eos_token_id
            .as_ref()
            .map(TokenIds::to_vec)
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests;
