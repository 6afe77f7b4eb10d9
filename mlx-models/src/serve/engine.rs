//! The generation engine behind the server: one thread owns the model and runs every
//! request, with continuous batching.
//!
//! A request is prefilled reusing the longest cached prefix of an earlier request (see
//! [`PrefixCache`]); requests that arrive together without one are prefilled together, as
//! one left-padded batch. Each then joins the running batch between two decode steps:
//! every running request's next token goes through the model in one batched forward pass,
//! rows left-padded to a common length with their own RoPE positions and masks (see
//! [`KvCache::merge_rows`]). Each request keeps its own sampler, stop strings and limits,
//! and leaves the batch as soon as it is done or its client has gone.
//!
//! Models whose caches cannot be batched this way (sliding-window, chunked, latent or
//! recurrent layers, or a RoPE whose frequencies depend on the sequence length) still run
//! concurrent requests step by step in turn, each with its own cache.

use super::prefix::PrefixCache;
use crate::cache::{KvCache, LayerCache};
use crate::error::{Error, Result};
use crate::generate::{FinishReason, StopStrings};
use crate::load::Model;
use crate::model::{LanguageModel, ModelInfo};
use crate::sampling::{Sampler, SamplerBuilder};
use crate::tap::Tap;
use crate::tokenizer::{StreamDecoder, Tokenizer};
use mlx_rs::{Array, Dtype};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use tokio::sync::{mpsc as tokio_mpsc, watch};

/// Prompts are fed to the model in chunks of this many tokens.
const PREFILL_CHUNK: usize = 512;

/// Prompts prefilled together as one padded batch hold at most this many tokens in all,
/// padding included.
const PREFILL_BATCH_TOKENS: usize = 2048;

/// How the engine runs.
#[derive(Debug, Clone)]
pub struct EngineOptions {
    max_batch: usize,
    prefix_cache_bytes: usize,
    batching: bool,
}

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions {
            max_batch: 16,
            prefix_cache_bytes: 512 << 20,
            batching: true,
        }
    }
}

impl EngineOptions {
    /// 16 requests decoding together, 512 MiB of prefix caches, batching on.
    pub fn new() -> Self {
        Self::default()
    }

    /// The most requests decoding at once (at least 1); later ones wait for a place.
    pub fn max_batch(mut self, n: usize) -> Self {
        self.max_batch = n.max(1);
        self
    }

    /// The bytes the caches of earlier requests may take for prompt-prefix reuse (0: none).
    pub fn prefix_cache_bytes(mut self, bytes: usize) -> Self {
        self.prefix_cache_bytes = bytes;
        self
    }

    /// Whether concurrent requests share batched forward passes (where the model allows);
    /// without it they take turns, one forward pass each.
    pub fn batching(mut self, yes: bool) -> Self {
        self.batching = yes;
        self
    }
}

/// One generation.
#[derive(Debug, Clone)]
pub struct GenerationRequest {
    /// The prompt's token ids (not empty, shorter than the context).
    pub prompt: Vec<u32>,
    /// The most tokens to generate.
    pub max_tokens: usize,
    /// How to pick tokens.
    pub sampler: SamplerBuilder,
    /// Stop when the text contains one of these (not emitted).
    pub stop: Vec<String>,
    /// `Some(n)`: report each token's log-probability and the `n` most likely tokens'.
    pub logprobs: Option<usize>,
    /// Special tokens whose text is kept although special tokens are otherwise left out
    /// (tool-call markers such as `[TOOL_CALLS]`).
    pub literal_tokens: Vec<(u32, String)>,
}

impl GenerationRequest {
    /// Greedy, 256 tokens at most, no stop strings, no log-probabilities.
    pub fn new(prompt: Vec<u32>) -> Self {
        GenerationRequest {
            prompt,
            max_tokens: 256,
            sampler: SamplerBuilder::default().temperature(0.0),
            stop: Vec::new(),
            logprobs: None,
            literal_tokens: Vec::new(),
        }
    }
}

/// What the engine reports about a request, in order: tokens, then one `Done` or `Error`.
#[derive(Debug)]
pub enum Event {
    /// Generated text (possibly empty while a character or stop string is pending), with
    /// the token's log-probabilities when asked for. Text held back for a stop string that
    /// never completed comes last, without log-probabilities.
    Token {
        text: String,
        logprob: Option<TokenLogprob>,
    },
    /// The request ended.
    Done(Completion),
    /// The request failed.
    Error(Error),
}

/// A token's log-probability and the most likely alternatives at its step.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    pub token: String,
    pub logprob: f32,
    /// The most likely tokens, most likely first.
    pub top: Vec<(String, f32)>,
}

/// How a request ended.
#[derive(Debug, Clone, PartialEq)]
pub struct Completion {
    pub finish_reason: FinishReason,
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    /// Prompt tokens taken from an earlier request's cache instead of being prefilled.
    pub cached_tokens: usize,
}

/// What the HTTP side needs to know about the loaded model.
#[derive(Debug, Clone)]
pub struct ModelCard {
    pub tokenizer: Tokenizer,
    pub info: ModelInfo,
    /// Whether concurrent requests share batched forward passes.
    pub batched: bool,
    /// End-of-sequence tokens (the tokenizer's and generation_config.json's).
    pub eos: Vec<u32>,
    /// Sampling as generation_config.json asks (greedy without one), for what a request
    /// leaves unset.
    pub default_sampler: SamplerBuilder,
}

/// Where loading stands.
#[derive(Debug, Clone)]
pub enum LoadState {
    Loading,
    Ready(Arc<ModelCard>),
    Failed(String),
}

/// Live counts, for `/health` and tests.
#[derive(Debug, Default)]
pub struct EngineStats {
    /// Requests submitted and not yet started.
    pub waiting: AtomicUsize,
    /// Requests being prefilled or decoded.
    pub running: AtomicUsize,
    /// Requests dropped because their client went away.
    pub cancelled: AtomicUsize,
    /// Forward passes that decoded more than one request at once.
    pub batched_steps: AtomicUsize,
    /// Prompt tokens reused from the prefix cache, over all requests.
    pub reused_tokens: AtomicUsize,
    /// Bytes the prefix cache holds.
    pub prefix_cache_bytes: AtomicUsize,
}

struct Job {
    request: GenerationRequest,
    events: tokio_mpsc::UnboundedSender<Event>,
}

/// A handle to the engine thread. Dropping it lets the thread finish the requests it has
/// and end; [`Engine::shutdown`] also waits for that.
pub struct Engine {
    jobs: Option<mpsc::Sender<Job>>,
    state: watch::Receiver<LoadState>,
    stats: Arc<EngineStats>,
    thread: Option<JoinHandle<()>>,
}

impl Engine {
    /// Starts the engine thread, which loads the model with `load` (on that thread, which
    /// then owns it) and serves requests. Requests submitted while loading wait.
    pub fn spawn<F>(load: F, options: EngineOptions) -> Result<Engine>
    where
        F: FnOnce() -> Result<Model> + Send + 'static,
    {
        let (jobs, receiver) = mpsc::channel::<Job>();
        let (state_tx, state) = watch::channel(LoadState::Loading);
        let stats = Arc::new(EngineStats::default());
        let thread_stats = stats.clone();
        let thread = std::thread::Builder::new()
            .name("mlx-models-engine".into())
            .spawn(move || {
                let model = match load() {
                    Ok(model) => model,
                    Err(e) => {
                        let message = e.to_string();
                        state_tx.send_replace(LoadState::Failed(message));
                        // Fail whatever was submitted meanwhile.
                        for job in receiver.iter() {
                            let _ = job.events.send(Event::Error(e_clone(&e)));
                        }
                        return;
                    }
                };
                let mut worker = Worker::new(model, &options, thread_stats);
                state_tx.send_replace(LoadState::Ready(Arc::new(worker.card())));
                worker.run(receiver);
            })
            .map_err(|e| Error::io("engine thread", e))?;
        Ok(Engine {
            jobs: Some(jobs),
            state,
            stats,
            thread: Some(thread),
        })
    }

    /// Where loading stands.
    pub fn state(&self) -> LoadState {
        self.state.borrow().clone()
    }

    /// Waits until the model is loaded (or failed to load).
    pub async fn ready(&self) -> std::result::Result<Arc<ModelCard>, String> {
        wait_ready(self.state.clone()).await
    }

    /// [`Engine::ready`] as a future that does not borrow the engine.
    pub fn ready_owned(
        &self,
    ) -> impl std::future::Future<Output = std::result::Result<Arc<ModelCard>, String>> + Send + 'static
    {
        wait_ready(self.state.clone())
    }

    /// Live counts.
    pub fn stats(&self) -> &Arc<EngineStats> {
        &self.stats
    }

    /// Queues a request; its events arrive on the returned receiver. Dropping the receiver
    /// cancels the request at the engine's next step.
    pub fn submit(
        &self,
        request: GenerationRequest,
    ) -> Result<tokio_mpsc::UnboundedReceiver<Event>> {
        let (events, receiver) = tokio_mpsc::unbounded_channel();
        let stopped = || Error::Mlx(mlx_rs::error::Exception::custom("the engine has stopped"));
        let jobs = self.jobs.as_ref().ok_or_else(stopped)?;
        self.stats.waiting.fetch_add(1, Ordering::SeqCst);
        if jobs.send(Job { request, events }).is_err() {
            self.stats.waiting.fetch_sub(1, Ordering::SeqCst);
            return Err(stopped());
        }
        Ok(receiver)
    }

    /// Stops taking requests, lets the running ones finish, and waits for the thread.
    pub fn shutdown(mut self) {
        self.jobs = None;
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        // Closing the queue ends the thread once its requests are done; it is not joined
        // here, so dropping never blocks an async runtime.
        self.jobs = None;
    }
}

async fn wait_ready(
    mut state: watch::Receiver<LoadState>,
) -> std::result::Result<Arc<ModelCard>, String> {
    loop {
        let current = state.borrow_and_update().clone();
        match current {
            LoadState::Ready(card) => return Ok(card),
            LoadState::Failed(message) => return Err(message),
            LoadState::Loading => {}
        }
        if state.changed().await.is_err() {
            return Err("the engine thread ended while loading".into());
        }
    }
}

/// Errors are not `Clone`; a load failure is reported to each waiting request by message.
fn e_clone(e: &Error) -> Error {
    Error::Mlx(mlx_rs::error::Exception::custom(e.to_string()))
}

/// A request being generated.
struct Sequence {
    events: tokio_mpsc::UnboundedSender<Event>,
    /// Prompt and generated tokens.
    history: Vec<u32>,
    prompt_tokens: usize,
    cached_tokens: usize,
    generated: usize,
    max_tokens: usize,
    sampler: Sampler,
    decoder: StreamDecoder,
    stop: StopStrings,
    logprobs: Option<usize>,
    literal_tokens: Vec<(u32, String)>,
    /// The token to feed next (the last one sampled).
    next: u32,
    /// The sequence's own cache, when it is not a row of the batch.
    cache: Option<Vec<LayerCache>>,
    finish: Option<FinishReason>,
}

impl Sequence {
    fn cancelled(&self) -> bool {
        self.events.is_closed()
    }
}

/// A checked request, with the cache of its longest cached prefix (if any).
struct Prepared {
    request: GenerationRequest,
    events: tokio_mpsc::UnboundedSender<Event>,
    sampler: Sampler,
    cache: Option<Vec<LayerCache>>,
    /// Prompt tokens that cache holds.
    cached: usize,
}

/// Requests without a cached prefix, in groups to prefill together: shortest prompts
/// first, each group padded to at most [`PREFILL_BATCH_TOKENS`] tokens in all, so that
/// neither padding nor the batch's attention grows without bound.
fn prefill_groups(mut fresh: Vec<Prepared>) -> Vec<Vec<Prepared>> {
    fresh.sort_by_key(|p| p.request.prompt.len());
    let mut groups: Vec<Vec<Prepared>> = Vec::new();
    for prepared in fresh {
        let len = prepared.request.prompt.len();
        match groups.last_mut() {
            // Sorted, so this prompt is the group's longest.
            Some(group) if (group.len() + 1) * len <= PREFILL_BATCH_TOKENS => group.push(prepared),
            _ => groups.push(vec![prepared]),
        }
    }
    groups
}

struct Worker {
    model: Model,
    eos: Vec<u32>,
    max_batch: usize,
    batched: bool,
    prefix: PrefixCache,
    /// Running sequences; when batched, row `i` of `batch` belongs to `active[i]`.
    active: Vec<Sequence>,
    batch: Option<Vec<LayerCache>>,
    stats: Arc<EngineStats>,
}

impl Worker {
    fn new(model: Model, options: &EngineOptions, stats: Arc<EngineStats>) -> Self {
        let mut eos = model.tokenizer().eos_token_ids().to_vec();
        eos.extend(model.generation_config().eos_token_ids());
        eos.sort_unstable();
        eos.dedup();
        let batched = options.batching && can_batch(model.network());
        Worker {
            model,
            eos,
            max_batch: options.max_batch,
            batched,
            prefix: PrefixCache::new(options.prefix_cache_bytes),
            active: Vec::new(),
            batch: None,
            stats,
        }
    }

    fn card(&self) -> ModelCard {
        ModelCard {
            tokenizer: self.model.tokenizer().clone(),
            info: self.model.info().clone(),
            batched: self.batched,
            eos: self.eos.clone(),
            default_sampler: SamplerBuilder::from_generation_config(self.model.generation_config()),
        }
    }

    fn run(&mut self, jobs: mpsc::Receiver<Job>) {
        let mut open = true;
        loop {
            let mut arrived = Vec::new();
            if self.active.is_empty() {
                if !open {
                    return;
                }
                match jobs.recv() {
                    Ok(job) => arrived.push(job),
                    Err(_) => return,
                }
            }
            while open && self.active.len() + arrived.len() < self.max_batch {
                match jobs.try_recv() {
                    Ok(job) => arrived.push(job),
                    Err(mpsc::TryRecvError::Empty) => break,
                    Err(mpsc::TryRecvError::Disconnected) => open = false,
                }
            }
            self.admit(arrived);
            if let Err(e) = self.step() {
                // A failed batched step fails every request in it.
                for seq in self.active.drain(..) {
                    let _ = seq.events.send(Event::Error(e_clone(&e)));
                }
                self.batch = None;
            }
            self.retire();
            self.stats
                .prefix_cache_bytes
                .store(self.prefix.bytes(), Ordering::SeqCst);
            self.stats
                .running
                .store(self.active.len(), Ordering::SeqCst);
        }
    }

    /// Prefills the requests that arrived (each from the longest cached prefix; those
    /// without one together, as one padded batch where the model batches) and samples
    /// their first tokens; they then join the running ones.
    fn admit(&mut self, jobs: Vec<Job>) {
        let mut fresh = Vec::new();
        for job in jobs {
            self.stats.waiting.fetch_sub(1, Ordering::SeqCst);
            if job.events.is_closed() {
                self.stats.cancelled.fetch_add(1, Ordering::SeqCst);
                continue;
            }
            self.stats.running.fetch_add(1, Ordering::SeqCst);
            let events = job.events.clone();
            match self.prepare(job) {
                Ok(prepared) if self.batched && prepared.cached == 0 => fresh.push(prepared),
                Ok(prepared) => self.start_alone(prepared),
                Err(e) => {
                    let _ = events.send(Event::Error(e));
                }
            }
        }
        for group in prefill_groups(fresh) {
            if let [_] = group.as_slice() {
                let prepared = group.into_iter().next().expect("a group of one");
                self.start_alone(prepared);
                continue;
            }
            let senders: Vec<_> = group.iter().map(|p| p.events.clone()).collect();
            if let Err(e) = self.prefill_together(group) {
                for events in senders {
                    let _ = events.send(Event::Error(e_clone(&e)));
                }
            }
        }
    }

    /// Prefills one request on its own and adds it to the running ones; a failure goes to
    /// its client.
    fn start_alone(&mut self, prepared: Prepared) {
        let events = prepared.events.clone();
        let result = self
            .prefill_alone(prepared)
            .and_then(|seq| seq.map_or(Ok(()), |seq| self.join(seq)));
        if let Err(e) = result {
            let _ = events.send(Event::Error(e));
        }
    }

    /// Checks a request and finds the longest cached prefix of its prompt.
    fn prepare(&mut self, job: Job) -> Result<Prepared> {
        let Job { request, events } = job;
        let info = self.model.info();
        let prompt = &request.prompt;
        if prompt.is_empty() {
            return Err(Error::EmptyPrompt);
        }
        let context = info.max_position_embeddings;
        if prompt.len() >= context {
            return Err(Error::PromptTooLong {
                prompt_tokens: prompt.len(),
                context,
            });
        }
        let vocab = info.vocab_size as usize;
        if let Some(&bad) = prompt.iter().find(|&&t| t as usize >= vocab) {
            return Err(Error::Tokenizer {
                path: None,
                message: format!("prompt token {bad} is outside the model's vocabulary of {vocab}"),
            });
        }
        let sampler = request.sampler.clone().build()?;
        let (cache, cached) = match self.prefix.lookup(prompt)? {
            Some(reuse) => (Some(reuse.cache), reuse.reused),
            None => (None, 0),
        };
        self.stats.reused_tokens.fetch_add(cached, Ordering::SeqCst);
        Ok(Prepared {
            request,
            events,
            sampler,
            cache,
            cached,
        })
    }

    /// Prefills one request with a cache of its own.
    fn prefill_alone(&mut self, mut prepared: Prepared) -> Result<Option<Sequence>> {
        let mut cache = match prepared.cache.take() {
            Some(cache) => cache,
            None => self.model.network().new_cache(),
        };
        let prompt = &prepared.request.prompt;
        let mut logits = None;
        for chunk in prompt[prepared.cached..].chunks(PREFILL_CHUNK) {
            if prepared.events.is_closed() {
                self.stats.cancelled.fetch_add(1, Ordering::SeqCst);
                return Ok(None);
            }
            let ids: Vec<i32> = chunk.iter().map(|&t| t as i32).collect();
            logits = Some(self.feed(&ids, 1, &mut cache)?);
        }
        let logits = logits.ok_or(Error::EmptyPrompt)?;
        let mut seq = self.sequence(prepared);
        seq.cache = Some(cache);
        self.begin(&mut seq, logits.as_slice::<f32>())?;
        if seq.finish.is_some() {
            let cache = seq.cache.take();
            keep_cache(&mut self.prefix, &seq, cache);
            return Ok(None);
        }
        Ok(Some(seq))
    }

    /// Prefills requests without a cached prefix as one batch, each prompt left-padded to
    /// the longest ([`LayerCache::left_padded_batch`]), and adds them to the running batch.
    fn prefill_together(&mut self, group: Vec<Prepared>) -> Result<()> {
        let longest = group
            .iter()
            .map(|p| p.request.prompt.len())
            .max()
            .unwrap_or(0);
        let padding: Vec<i32> = group
            .iter()
            .map(|p| (longest - p.request.prompt.len()) as i32)
            .collect();
        // The filler is never seen by a real query; any valid token will do.
        let rows: Vec<Vec<i32>> = group
            .iter()
            .map(|p| {
                let mut row = vec![0; longest - p.request.prompt.len()];
                row.extend(p.request.prompt.iter().map(|&t| t as i32));
                row
            })
            .collect();
        let mut cache = LayerCache::left_padded_batch(self.model.network().new_cache(), &padding)?;
        let mut logits = None;
        for start in (0..longest).step_by(PREFILL_CHUNK) {
            if group.iter().all(|p| p.events.is_closed()) {
                self.stats
                    .cancelled
                    .fetch_add(group.len(), Ordering::SeqCst);
                return Ok(());
            }
            let end = (start + PREFILL_CHUNK).min(longest);
            let ids: Vec<i32> = rows.iter().flat_map(|r| &r[start..end]).copied().collect();
            logits = Some(self.feed(&ids, rows.len(), &mut cache)?);
        }
        let logits = logits.ok_or(Error::EmptyPrompt)?;
        let vocab = logits.dim(-1) as usize;
        let rows = logits.as_slice::<f32>();
        let mut started = Vec::new();
        let mut keep = Vec::new();
        for (i, prepared) in group.into_iter().enumerate() {
            let mut seq = self.sequence(prepared);
            if let Err(e) = self.begin(&mut seq, &rows[i * vocab..(i + 1) * vocab]) {
                let _ = seq.events.send(Event::Error(e));
                continue;
            }
            if seq.finish.is_some() {
                keep_cache(&mut self.prefix, &seq, row_of(&cache, i).ok());
                continue;
            }
            keep.push(i);
            started.push(seq);
        }
        if started.is_empty() {
            return Ok(());
        }
        let cache = if keep.len() < rows.len() / vocab {
            select_rows(&cache, &keep)?
        } else {
            cache
        };
        self.batch = Some(match &self.batch {
            None => cache,
            Some(batch) => merge(batch, &cache)?,
        });
        self.active.extend(started);
        Ok(())
    }

    /// Feeds `ids`, `batch` rows of equal length one after the other, and returns the
    /// logits of each row's last position in f32 (`[batch, vocab]`), evaluated so that long
    /// prompts do not build one huge graph.
    fn feed(&self, ids: &[i32], batch: usize, cache: &mut [LayerCache]) -> Result<Array> {
        let input = Array::from_slice(ids, &[batch as i32, (ids.len() / batch) as i32]);
        let out = self
            .model
            .network()
            .forward(&input, cache, &mut Tap::off())?;
        let last = out
            .take_axis(Array::from_int(out.dim(1) - 1), 1)?
            .as_dtype(Dtype::Float32)?;
        last.eval()?;
        Ok(last)
    }

    /// The sequence of a prefilled request, before its first token.
    fn sequence(&self, prepared: Prepared) -> Sequence {
        let Prepared {
            request,
            events,
            sampler,
            cached,
            ..
        } = prepared;
        Sequence {
            events,
            prompt_tokens: request.prompt.len(),
            history: request.prompt,
            cached_tokens: cached,
            generated: 0,
            max_tokens: request.max_tokens,
            sampler,
            decoder: self
                .model
                .tokenizer()
                .stream_decoder()
                .skip_special_tokens(true),
            stop: StopStrings::new(request.stop),
            logprobs: request.logprobs,
            literal_tokens: request.literal_tokens,
            next: 0,
            cache: None,
            finish: None,
        }
    }

    /// Samples a prefilled sequence's first token (or ends it at once for `max_tokens: 0`).
    fn begin(&self, seq: &mut Sequence, logits: &[f32]) -> Result<()> {
        if seq.max_tokens == 0 {
            self.finish(seq, FinishReason::Length);
            Ok(())
        } else {
            self.advance(seq, logits)
        }
    }

    /// Adds a prefilled sequence to the running ones (to the batch when batched).
    fn join(&mut self, mut seq: Sequence) -> Result<()> {
        if self.batched {
            let own = seq.cache.take().unwrap_or_default();
            // On failure the running batch stays as it was.
            let merged = match &self.batch {
                None => own,
                Some(batch) => merge(batch, &own)?,
            };
            self.batch = Some(merged);
        }
        self.active.push(seq);
        Ok(())
    }

    /// One decode step for every running sequence.
    fn step(&mut self) -> Result<()> {
        self.drop_cancelled()?;
        if self.active.is_empty() {
            return Ok(());
        }
        if self.batched {
            let ids: Vec<i32> = self.active.iter().map(|s| s.next as i32).collect();
            let input = Array::from_slice(&ids, &[ids.len() as i32, 1]);
            let Some(cache) = self.batch.as_mut() else {
                return Err(Error::Mlx(mlx_rs::error::Exception::custom(
                    "the running requests lost their batch cache",
                )));
            };
            let out = self
                .model
                .network()
                .forward(&input, cache, &mut Tap::off())?;
            let logits = out.as_dtype(Dtype::Float32)?;
            logits.eval()?;
            if ids.len() > 1 {
                self.stats.batched_steps.fetch_add(1, Ordering::SeqCst);
            }
            let vocab = logits.dim(-1) as usize;
            let rows = logits.as_slice::<f32>();
            let mut active = std::mem::take(&mut self.active);
            let result = active
                .iter_mut()
                .enumerate()
                .try_for_each(|(i, seq)| self.advance(seq, &rows[i * vocab..(i + 1) * vocab]));
            self.active = active;
            result
        } else {
            let mut active = std::mem::take(&mut self.active);
            for seq in &mut active {
                let input = Array::from_slice(&[seq.next as i32], &[1, 1]);
                let result = (|| -> Result<()> {
                    let cache = seq.cache.as_mut().ok_or(Error::EmptyPrompt)?;
                    let out = self
                        .model
                        .network()
                        .forward(&input, cache, &mut Tap::off())?;
                    let logits = out.as_dtype(Dtype::Float32)?;
                    logits.eval()?;
                    self.advance(seq, logits.as_slice::<f32>())
                })();
                if let Err(e) = result {
                    let _ = seq.events.send(Event::Error(e));
                    seq.finish = Some(FinishReason::Length);
                    seq.cache = None;
                }
            }
            self.active = active;
            Ok(())
        }
    }

    /// Samples a sequence's next token from its logits and reports it.
    fn advance(&self, seq: &mut Sequence, logits: &[f32]) -> Result<()> {
        if !logits.iter().all(|x| x.is_finite()) {
            return Err(Error::NonFiniteLogits {
                step: seq.generated,
            });
        }
        let id = seq.sampler.sample(logits, &seq.history)?;
        // The end-of-sequence token is not part of the reply (nor of its log-probabilities).
        if self.eos.binary_search(&id).is_ok() {
            self.finish(seq, FinishReason::EndOfSequence);
            return Ok(());
        }
        let logprob = match seq.logprobs {
            Some(top) => Some(token_logprob(self.model.tokenizer(), logits, id, top)?),
            None => None,
        };
        seq.generated += 1;
        seq.history.push(id);
        seq.next = id;
        let mut chunk = seq.decoder.push(id)?.unwrap_or_default();
        if let Some((_, literal)) = seq.literal_tokens.iter().find(|(t, _)| *t == id) {
            if !chunk.contains(literal.as_str()) {
                chunk.insert_str(0, literal);
            }
        }
        let (text, stopped) = seq.stop.push(&chunk);
        let _ = seq.events.send(Event::Token { text, logprob });
        let context = self.model.info().max_position_embeddings;
        if let Some(stop) = stopped {
            self.finish(seq, FinishReason::Stop(stop));
        } else if seq.generated >= seq.max_tokens || seq.history.len() >= context {
            self.finish(seq, FinishReason::Length);
        }
        Ok(())
    }

    fn finish(&self, seq: &mut Sequence, reason: FinishReason) {
        let rest = seq.stop.flush();
        if !rest.is_empty() {
            let _ = seq.events.send(Event::Token {
                text: rest,
                logprob: None,
            });
        }
        let _ = seq.events.send(Event::Done(Completion {
            finish_reason: reason.clone(),
            prompt_tokens: seq.prompt_tokens,
            completion_tokens: seq.generated,
            cached_tokens: seq.cached_tokens,
        }));
        seq.finish = Some(reason);
    }

    /// Removes the sequences whose client went away.
    fn drop_cancelled(&mut self) -> Result<()> {
        let gone = self.active.iter().filter(|s| s.cancelled()).count();
        if gone == 0 {
            return Ok(());
        }
        self.stats.cancelled.fetch_add(gone, Ordering::SeqCst);
        let keep: Vec<usize> = (0..self.active.len())
            .filter(|&i| !self.active[i].cancelled())
            .collect();
        self.select(&keep)?;
        Ok(())
    }

    /// Removes finished sequences, keeping their caches for prefix reuse.
    fn retire(&mut self) {
        if self.active.iter().all(|s| s.finish.is_none()) {
            return;
        }
        let keep: Vec<usize> = (0..self.active.len())
            .filter(|&i| self.active[i].finish.is_none())
            .collect();
        for (i, seq) in self.active.iter_mut().enumerate() {
            if seq.finish.is_none() {
                continue;
            }
            let cache = match &self.batch {
                Some(batch) if self.batched => row_of(batch, i).ok(),
                _ => seq.cache.take(),
            };
            keep_cache(&mut self.prefix, seq, cache);
        }
        if let Err(e) = self.select(&keep) {
            for seq in self.active.drain(..) {
                let _ = seq.events.send(Event::Error(e_clone(&e)));
            }
            self.batch = None;
        }
    }

    /// Keeps only the sequences at `keep` (and their batch rows).
    fn select(&mut self, keep: &[usize]) -> Result<()> {
        if self.batched {
            self.batch = match self.batch.take() {
                Some(_) if keep.is_empty() => None,
                Some(batch) => Some(select_rows(&batch, keep)?),
                None => None,
            };
        }
        let mut index = 0;
        self.active.retain(|_| {
            let kept = keep.contains(&index);
            index += 1;
            kept
        });
        Ok(())
    }
}

/// Offers a finished sequence's cache to the prefix cache.
fn keep_cache(prefix: &mut PrefixCache, seq: &Sequence, cache: Option<Vec<LayerCache>>) {
    let Some(cache) = cache else { return };
    let Ok(offset) = LayerCache::offset_of(&cache) else {
        return;
    };
    let mut tokens = seq.history.clone();
    tokens.truncate(offset as usize);
    prefix.insert(tokens, cache);
}

/// Whether a model's requests can share batched forward passes at different positions:
/// unbounded KV caches (or none) on every layer, and positions that come from RoPEs
/// rotating each row at its own position ([`crate::rope::Rope::supports_row_offsets`]).
/// ALiBi models batch too ([`LanguageModel::alibi`]: their biases follow key distances).
/// Sliding-window, chunked, latent and recurrent caches cannot, nor another model without
/// RoPE, whose positions may come from elsewhere (GPT-2's learned table) with one offset for
/// the whole batch.
pub fn can_batch(network: &dyn LanguageModel) -> bool {
    let cache = network.new_cache();
    let kinds = cache.iter().all(|layer| match layer {
        LayerCache::Kv(kv) => kv.window().is_none() && kv.chunk().is_none(),
        LayerCache::Stateless { .. } => true,
        _ => false,
    });
    let has_kv = cache.iter().any(|layer| matches!(layer, LayerCache::Kv(_)));
    let ropes = network.rope().is_some()
        && [network.rope(), network.local_rope()]
            .into_iter()
            .flatten()
            .all(|rope| rope.supports_row_offsets());
    kinds && has_kv && (ropes || network.alibi())
}

/// The rows of `batch` and then those of `new`, per layer.
fn merge(batch: &[LayerCache], new: &[LayerCache]) -> Result<Vec<LayerCache>> {
    let mut merged: Vec<LayerCache> = batch
        .iter()
        .zip(new)
        .map(|(a, b)| match (a, b) {
            (LayerCache::Kv(a), LayerCache::Kv(b)) => Ok(KvCache::merge_rows(&[a, b])?.into()),
            (LayerCache::Stateless { .. }, LayerCache::Stateless { .. }) => {
                Ok(LayerCache::Stateless { offset: 0 })
            }
            _ => Err(Error::Mlx(mlx_rs::error::Exception::custom(
                "caches of different kinds cannot be batched",
            ))),
        })
        .collect::<Result<_>>()?;
    align_stateless(&mut merged);
    Ok(merged)
}

/// The batch of the rows at `rows`, per layer.
fn select_rows(batch: &[LayerCache], rows: &[usize]) -> Result<Vec<LayerCache>> {
    let mut selected: Vec<LayerCache> = batch
        .iter()
        .map(|layer| match layer {
            LayerCache::Kv(kv) => Ok(kv.select_rows(rows)?.into()),
            other => Ok(other.clone()),
        })
        .collect::<Result<_>>()?;
    align_stateless(&mut selected);
    Ok(selected)
}

/// Row `row` of a batch as a cache of its own.
fn row_of(batch: &[LayerCache], row: usize) -> Result<Vec<LayerCache>> {
    select_rows(batch, &[row])
}

/// Layers without state count the same tokens as the KV layers.
fn align_stateless(cache: &mut [LayerCache]) {
    let offset = cache
        .iter()
        .find(|l| matches!(l, LayerCache::Kv(_)))
        .map_or(0, LayerCache::offset);
    for layer in cache {
        if let LayerCache::Stateless { offset: o } = layer {
            *o = offset;
        }
    }
}

/// The log-probability of `id` under `logits` and the `top` most likely tokens'.
fn token_logprob(
    tokenizer: &Tokenizer,
    logits: &[f32],
    id: u32,
    top: usize,
) -> Result<TokenLogprob> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = logits.iter().map(|&x| ((x - max) as f64).exp()).sum();
    let log_norm = max as f64 + sum.ln();
    let logprob = |i: usize| (logits[i] as f64 - log_norm) as f32;
    let mut best: Vec<usize> = (0..logits.len()).collect();
    let top = top.min(logits.len());
    if top > 0 && top < best.len() {
        best.select_nth_unstable_by(top - 1, |&a, &b| logits[b].total_cmp(&logits[a]));
    }
    best.truncate(top);
    best.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
    let text = |i: u32| tokenizer.decode(&[i], false);
    Ok(TokenLogprob {
        token: text(id)?,
        logprob: logprob(id as usize),
        top: best
            .into_iter()
            .map(|i| Ok((text(i as u32)?, logprob(i))))
            .collect::<Result<_>>()?,
    })
}
