//! An OpenAI-compatible HTTP server (`mlx-models serve`), on axum and tokio.
//!
//! Endpoints: `POST /v1/chat/completions` and `POST /v1/completions` (streamed as
//! server-sent events ending in `data: [DONE]`, or whole), `GET /v1/models` (the served
//! model and the models of the local Hugging Face cache) and `GET /health` (200 once the
//! model is loaded, with live counts). Every error is OpenAI's JSON
//! `{"error": {"message", "type", "param", "code"}}` with the matching HTTP status.
//!
//! Requests run on one [`Engine`] thread with continuous batching and prompt-prefix reuse
//! (see [`engine`]).
//!
//! ```no_run
//! use mlx_models::load::{load, LoadOptions, ModelSource};
//! use mlx_models::serve::{Engine, EngineOptions, ServeOptions, Server};
//!
//! # async fn run() -> mlx_models::Result<()> {
//! let engine = Engine::spawn(
//!     || load(&ModelSource::Default, &LoadOptions::new()),
//!     EngineOptions::new(),
//! )?;
//! let server = Server::bind(engine, ServeOptions::new("SmolLM2-135M-Instruct")).await?;
//! println!("listening on http://{}", server.local_addr());
//! server.run(mlx_models::serve::shutdown_signal()).await
//! # }
//! ```

mod api;
pub mod engine;
mod prefix;
pub mod tools;

pub use engine::{
    Completion, Engine, EngineOptions, EngineStats, Event, GenerationRequest, LoadState, ModelCard,
    TokenLogprob,
};

use crate::chat_template::{ChatTemplateOptions, Message};
use crate::error::{Error, Result};
use crate::generate::FinishReason;
use api::{fields, parse_body, ApiError, ChatRequest, CompletionRequest, Prompt, Sampling};
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::stream::{self, Stream, StreamExt};
use serde_json::{json, Value};
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};
use tools::{ToolCall, ToolCallDelta, ToolCallStream, ToolChoice};

/// The environment variable `mlx-models serve` reads the API key from.
pub const API_KEY_ENV: &str = "MLX_MODELS_API_KEY";

/// How the server listens and what it accepts.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    host: String,
    port: u16,
    model_id: String,
    aliases: Vec<String>,
    api_key: Option<String>,
    max_requests: usize,
    max_body_bytes: usize,
    default_max_tokens: usize,
    hf_cache: Option<PathBuf>,
}

impl ServeOptions {
    /// Serves the model as `model_id` on 127.0.0.1:8080, without an API key, at most 64
    /// requests at once, bodies up to 8 MiB, 512 tokens per reply unless asked otherwise.
    pub fn new(model_id: impl Into<String>) -> Self {
        ServeOptions {
            host: "127.0.0.1".into(),
            port: 8080,
            model_id: model_id.into(),
            aliases: Vec::new(),
            api_key: None,
            max_requests: 64,
            max_body_bytes: 8 << 20,
            default_max_tokens: 512,
            hf_cache: crate::hub::default_cache_dir(),
        }
    }

    /// The address to bind (default 127.0.0.1: this machine only).
    pub fn host(mut self, host: impl Into<String>) -> Self {
        self.host = host.into();
        self
    }

    /// The port (0: any free one, see [`Server::local_addr`]).
    pub fn port(mut self, port: u16) -> Self {
        self.port = port;
        self
    }

    /// Another name requests may use for the model (e.g. the `--model` argument).
    pub fn alias(mut self, name: impl Into<String>) -> Self {
        self.aliases.push(name.into());
        self
    }

    /// Requires `Authorization: Bearer <key>` on `/v1/*` (401 without it).
    pub fn api_key(mut self, key: Option<String>) -> Self {
        self.api_key = key.filter(|k| !k.is_empty());
        self
    }

    /// Requests running or waiting at once; more are refused with 429.
    pub fn max_requests(mut self, n: usize) -> Self {
        self.max_requests = n.max(1);
        self
    }

    /// The largest request body; larger ones are refused with 413.
    pub fn max_body_bytes(mut self, n: usize) -> Self {
        self.max_body_bytes = n;
        self
    }

    /// Tokens generated when a request sets no `max_tokens`.
    pub fn default_max_tokens(mut self, n: usize) -> Self {
        self.default_max_tokens = n.max(1);
        self
    }

    /// The Hugging Face cache `/v1/models` lists (default: as `huggingface_hub` finds it;
    /// `None`: list the served model only).
    pub fn hf_cache(mut self, dir: Option<PathBuf>) -> Self {
        self.hf_cache = dir;
        self
    }

    fn accepts(&self, model: &str) -> bool {
        model == self.model_id || self.aliases.iter().any(|a| a == model)
    }
}

struct Shared {
    engine: Engine,
    options: ServeOptions,
    in_flight: AtomicUsize,
    next_id: AtomicU64,
    started: u64,
}

type AppState = Arc<Shared>;

/// A bound server; [`Server::run`] serves until the shutdown future completes.
pub struct Server {
    listener: tokio::net::TcpListener,
    state: AppState,
}

impl Server {
    /// Binds the address of `options`; requests are served by `engine`.
    pub async fn bind(engine: Engine, options: ServeOptions) -> Result<Server> {
        let address = format!("{}:{}", options.host, options.port);
        let listener = tokio::net::TcpListener::bind(&address)
            .await
            .map_err(|e| Error::io(&address, e))?;
        Ok(Server {
            listener,
            state: Arc::new(Shared {
                engine,
                options,
                in_flight: AtomicUsize::new(0),
                next_id: AtomicU64::new(1),
                started: now(),
            }),
        })
    }

    /// The address the server listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("a bound listener has an address")
    }

    /// Completes once the model is loaded (`Err` with the message if loading failed); it
    /// does not borrow the server, so it can be awaited while [`Server::run`] serves.
    pub fn ready(
        &self,
    ) -> impl Future<Output = std::result::Result<Arc<ModelCard>, String>> + Send + 'static {
        self.state.engine.ready_owned()
    }

    /// The engine's live counts.
    pub fn stats(&self) -> Arc<EngineStats> {
        self.state.engine.stats().clone()
    }

    /// Serves until `shutdown` completes, then stops accepting connections, lets the
    /// requests in progress finish (streams included) and stops the engine.
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send + 'static) -> Result<()> {
        let Server { listener, state } = self;
        let address = listener.local_addr().ok();
        let app = router(state.clone());
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(shutdown)
            .await;
        // Every connection is closed: the engine is ours alone again.
        if let Ok(shared) = Arc::try_unwrap(state) {
            tokio::task::spawn_blocking(move || shared.engine.shutdown())
                .await
                .ok();
        }
        served.map_err(|e| Error::io(format!("{address:?}"), e))
    }
}

/// Completes on SIGTERM or Ctrl-C (SIGINT).
pub async fn shutdown_signal() {
    let interrupt = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = interrupt => {},
        _ = terminate => {},
    }
}

fn router(state: AppState) -> Router {
    let limit = state.options.max_body_bytes;
    let v1 = Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/completions", post(completions))
        .route("/v1/models", get(models))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            require_api_key,
        ));
    Router::new()
        .route("/health", get(health))
        .merge(v1)
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(limit))
        .with_state(state)
}

async fn not_found(request: Request) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "invalid_request_error",
        format!(
            "no such endpoint: {} {}",
            request.method(),
            request.uri().path()
        ),
    )
    .code("not_found")
}

async fn method_not_allowed(request: Request) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "invalid_request_error",
        format!(
            "{} is not allowed on {}",
            request.method(),
            request.uri().path()
        ),
    )
    .code("method_not_allowed")
}

async fn require_api_key(State(state): State<AppState>, request: Request, next: Next) -> Response {
    if let Some(key) = &state.options.api_key {
        let given = request
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim);
        if given != Some(key.as_str()) {
            let message = if given.is_none() {
                "no API key given: send `Authorization: Bearer <key>`"
            } else {
                "incorrect API key"
            };
            return ApiError::new(StatusCode::UNAUTHORIZED, "invalid_request_error", message)
                .code("invalid_api_key")
                .into_response();
        }
    }
    next.run(request).await
}

async fn health(State(state): State<AppState>) -> Response {
    let stats = state.engine.stats();
    let counts = json!({
        "running": stats.running.load(Ordering::SeqCst),
        "waiting": stats.waiting.load(Ordering::SeqCst),
        "cancelled": stats.cancelled.load(Ordering::SeqCst),
        "batched_steps": stats.batched_steps.load(Ordering::SeqCst),
        "reused_tokens": stats.reused_tokens.load(Ordering::SeqCst),
        "prefix_cache_bytes": stats.prefix_cache_bytes.load(Ordering::SeqCst),
    });
    match state.engine.state() {
        LoadState::Ready(card) => Json(json!({
            "status": "ok",
            "model": state.options.model_id,
            "batched": card.batched,
            "stats": counts,
        }))
        .into_response(),
        LoadState::Loading => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "loading", "model": state.options.model_id})),
        )
            .into_response(),
        LoadState::Failed(message) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "failed", "error": message})),
        )
            .into_response(),
    }
}

async fn models(State(state): State<AppState>) -> Response {
    let options = &state.options;
    let mut ids = vec![options.model_id.clone()];
    if let Some(dir) = &options.hf_cache {
        ids.extend(
            cached_repos(dir)
                .into_iter()
                .filter(|r| r != &options.model_id),
        );
    }
    let data: Vec<Value> = ids
        .into_iter()
        .map(|id| {
            json!({"id": id, "object": "model", "created": state.started, "owned_by": "mlx-models"})
        })
        .collect();
    Json(json!({"object": "list", "data": data})).into_response()
}

/// The model repos of a Hugging Face cache (`models--org--name` with a snapshot); none when
/// the directory does not exist.
fn cached_repos(dir: &std::path::Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut repos: Vec<String> = entries
        .flatten()
        .filter(|e| e.path().join("snapshots").is_dir())
        .filter_map(|e| {
            let name = e.file_name().to_str()?.to_owned();
            let repo = name.strip_prefix("models--")?;
            Some(repo.replacen("--", "/", 1))
        })
        .collect();
    repos.sort();
    repos
}

/// A slot among the requests the server takes at once, freed on drop.
struct Slot(AppState);

impl Slot {
    fn take(state: &AppState) -> std::result::Result<Slot, ApiError> {
        let max = state.options.max_requests;
        let taken = state
            .in_flight
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n < max).then_some(n + 1)
            });
        match taken {
            Ok(_) => Ok(Slot(state.clone())),
            Err(_) => Err(ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "requests",
                format!("the server is busy with {max} requests: retry later"),
            )
            .code("rate_limit_exceeded")),
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// What both endpoints have read from a request once it is valid.
struct Prepared {
    request: GenerationRequest,
    stream: bool,
    include_usage: bool,
    tools: bool,
    /// The start of a tool call put after the prompt (`tool_choice` `required` or a
    /// named function): the reply's text is read as following it.
    forced: Option<String>,
    echo: Option<String>,
}

fn body_bytes(
    body: std::result::Result<Bytes, BytesRejection>,
) -> std::result::Result<Bytes, ApiError> {
    body.map_err(|rejection| {
        let status = rejection.status();
        let error = ApiError::new(status, "invalid_request_error", rejection.body_text());
        if status == StatusCode::PAYLOAD_TOO_LARGE {
            error.code("request_too_large")
        } else {
            error
        }
    })
}

fn ready(state: &AppState) -> std::result::Result<Arc<ModelCard>, ApiError> {
    match state.engine.state() {
        LoadState::Ready(card) => Ok(card),
        LoadState::Loading => Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "server_error",
            "the model is still loading",
        )
        .code("model_loading")),
        LoadState::Failed(message) => Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "server_error",
            format!("the model failed to load: {message}"),
        )),
    }
}

fn check_model(state: &AppState, model: Option<&str>) -> std::result::Result<(), ApiError> {
    match model {
        Some(m) if !state.options.accepts(m) => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            format!(
                "the model `{m}` does not exist here: this server serves `{}`",
                state.options.model_id
            ),
        )
        .param("model")
        .code("model_not_found")),
        _ => Ok(()),
    }
}

/// The generation settings of a request, checked.
fn generation(
    state: &AppState,
    card: &ModelCard,
    prompt: Vec<u32>,
    sampling: Sampling,
    logprobs: Option<u32>,
    kind: Kind,
) -> std::result::Result<GenerationRequest, ApiError> {
    if let Some(n) = sampling.n {
        if n != 1 {
            return Err(ApiError::invalid("only n = 1 is supported").param("n"));
        }
    }
    let max_tokens = match sampling.max_completion_tokens.or(sampling.max_tokens) {
        Some(0) => {
            return Err(ApiError::invalid("max_tokens must be at least 1")
                .param("max_tokens")
                .code("invalid_value"))
        }
        Some(n) => usize::try_from(n).unwrap_or(usize::MAX),
        None => state.options.default_max_tokens,
    };
    let mut sampler = card.default_sampler.clone();
    if let Some(t) = sampling.temperature {
        sampler = sampler.temperature(t);
    }
    if let Some(p) = sampling.top_p {
        sampler = sampler.top_p(p);
    }
    if let Some(k) = sampling.top_k {
        if k < -1 {
            return Err(
                ApiError::invalid(format!("top_k must be ≥ 0 (or -1: off), got {k}"))
                    .param("top_k")
                    .code("invalid_value"),
            );
        }
        sampler = sampler.top_k(k.max(0) as usize);
    }
    if let Some(p) = sampling.min_p {
        sampler = sampler.min_p(p);
    }
    if let Some(p) = sampling.repetition_penalty {
        sampler = sampler.repetition_penalty(p);
    }
    if let Some(n) = sampling.repetition_context_size {
        sampler = sampler.repetition_context_size(n as usize);
    }
    if let Some(p) = sampling.presence_penalty {
        sampler = sampler.presence_penalty(p);
    }
    if let Some(p) = sampling.frequency_penalty {
        sampler = sampler.frequency_penalty(p);
    }
    if let Some(seed) = sampling.seed {
        sampler = sampler.seed(seed);
    }
    if let Some(bias) = sampling.logit_bias {
        let vocab = card.info.vocab_size as u32;
        let mut parsed = std::collections::HashMap::new();
        for (token, value) in bias {
            let id = token
                .parse::<u32>()
                .ok()
                .filter(|&id| id < vocab)
                .ok_or_else(|| {
                    ApiError::invalid(format!(
                        "logit_bias keys must be token ids below {vocab}, got `{token}`"
                    ))
                    .param("logit_bias")
                    .code("invalid_value")
                })?;
            if !(-100.0..=100.0).contains(&value) {
                return Err(ApiError::invalid(format!(
                    "logit_bias values must be in [-100, 100], got {value}"
                ))
                .param("logit_bias")
                .code("invalid_value"));
            }
            parsed.insert(id, value);
        }
        sampler = sampler.logit_bias(parsed);
    }
    // The sampler checks its own ranges.
    sampler.clone().build().map_err(ApiError::from)?;
    let stop = sampling.stop.map(api::Stop::into_vec).unwrap_or_default();
    if stop.len() > 16 {
        return Err(ApiError::invalid("at most 16 stop strings").param("stop"));
    }
    if let Some(n) = logprobs {
        if n > 20 {
            return Err(
                ApiError::invalid(format!("top_logprobs must be at most 20, got {n}"))
                    .param("top_logprobs")
                    .code("invalid_value"),
            );
        }
    }
    if prompt.is_empty() {
        return Err(ApiError::invalid("the prompt is empty").param("prompt"));
    }
    let context = card.info.max_position_embeddings;
    if prompt.len() >= context {
        let field = if kind == Kind::Chat {
            "messages"
        } else {
            "prompt"
        };
        return Err(ApiError::from(Error::PromptTooLong {
            prompt_tokens: prompt.len(),
            context,
        })
        .param(field));
    }
    let vocab = card.info.vocab_size as u32;
    if let Some(&bad) = prompt.iter().find(|&&t| t >= vocab) {
        return Err(ApiError::invalid(format!(
            "prompt token {bad} is outside the model's vocabulary of {vocab}"
        ))
        .param("prompt")
        .code("invalid_value"));
    }
    Ok(GenerationRequest {
        prompt,
        max_tokens,
        sampler,
        stop: stop.into_iter().filter(|s| !s.is_empty()).collect(),
        logprobs: logprobs.map(|n| n as usize),
        literal_tokens: Vec::new(),
    })
}

async fn chat_completions(
    State(state): State<AppState>,
    body: std::result::Result<Bytes, BytesRejection>,
) -> Response {
    match prepare_chat(&state, body).await {
        Ok(prepared) => respond(state, prepared, Kind::Chat).await,
        Err(e) => e.into_response(),
    }
}

async fn completions(
    State(state): State<AppState>,
    body: std::result::Result<Bytes, BytesRejection>,
) -> Response {
    match prepare_completion(&state, body).await {
        Ok(prepared) => respond(state, prepared, Kind::Completion).await,
        Err(e) => e.into_response(),
    }
}

const ROLES: [&str; 5] = ["system", "developer", "user", "assistant", "tool"];

async fn prepare_chat(
    state: &AppState,
    body: std::result::Result<Bytes, BytesRejection>,
) -> std::result::Result<Prepared, ApiError> {
    let body = parse_body(&body_bytes(body)?)?;
    let request: ChatRequest = fields(&body)?;
    let sampling: Sampling = fields(&body)?;
    check_model(state, request.model.as_deref())?;
    let card = ready(state)?;
    if request.messages.is_empty() {
        return Err(ApiError::invalid("messages must not be empty").param("messages"));
    }
    let mut messages = request.messages;
    for (i, message) in messages.iter_mut().enumerate() {
        if !ROLES.contains(&message.role.as_str()) {
            return Err(ApiError::invalid(format!(
                "unknown role `{}`: one of {}",
                message.role,
                ROLES.join(", ")
            ))
            .param(format!("messages[{i}].role")));
        }
        normalize_tool_calls(message);
    }
    let (tools, choice) = tools_to_show(request.tool_choice.as_ref(), request.tools)?;
    let has_tools = tools.as_ref().is_some_and(|t| !t.is_empty());
    // `required` and a named function: the reply starts as a call in the template's format.
    let forced = has_tools
        .then(|| tools::forced_opening(card.tokenizer.chat_template().unwrap_or(""), &choice))
        .flatten();
    let tokenizer = card.tokenizer.clone();
    let opening = forced.clone().unwrap_or_default();
    let prompt = tokio::task::spawn_blocking(move || -> Result<Vec<u32>> {
        let mut options = ChatTemplateOptions::new().add_generation_prompt(true);
        if let Some(tools) = tools.filter(|t| !t.is_empty()) {
            options = options.tools(tools);
        }
        let text = tokenizer.apply_chat_template(&messages, &options)? + &opening;
        tokenizer.encode(&text, false)
    })
    .await
    .map_err(|e| ApiError::server(e.to_string()))??;
    let stream = sampling.stream.unwrap_or(false);
    let include_usage = sampling
        .stream_options
        .as_ref()
        .and_then(|o| o.include_usage)
        .unwrap_or(false);
    let logprobs = match (request.logprobs, request.top_logprobs) {
        (Some(true), top) => Some(top.unwrap_or(0)),
        (_, Some(_)) => {
            return Err(ApiError::invalid("top_logprobs needs logprobs: true").param("top_logprobs"))
        }
        _ => None,
    };
    let mut generation = generation(state, &card, prompt, sampling, logprobs, Kind::Chat)?;
    if has_tools {
        generation.literal_tokens = tools::marker_tokens()
            .iter()
            .filter_map(|m| Some((card.tokenizer.token_to_id(m)?, (*m).to_owned())))
            .collect();
    }
    Ok(Prepared {
        request: generation,
        stream,
        include_usage,
        tools: has_tools,
        forced,
        echo: None,
    })
}

/// The tools the model is shown and what `tool_choice` asks of the reply: `"none"` shows
/// none, a named function or `allowed_tools` only those; an unknown name, a malformed
/// choice or `required` without tools is a 400 naming the field.
fn tools_to_show(
    tool_choice: Option<&Value>,
    tools: Option<Vec<Value>>,
) -> std::result::Result<(Option<Vec<Value>>, ToolChoice), ApiError> {
    let bad_choice = || {
        ApiError::invalid(
            "tool_choice must be \"none\", \"auto\", \"required\", \
             {\"type\": \"function\", \"function\": {\"name\": …}} or \
             {\"type\": \"allowed_tools\", \"allowed_tools\": {\"mode\": …, \"tools\": […]}}",
        )
        .param("tool_choice")
    };
    let function_name = |tool: &Value| {
        tool.get("function")
            .and_then(|f| f.get("name"))
            .and_then(Value::as_str)
            .map(str::to_owned)
    };
    // What is asked, and the names of the tools the model may be shown (all where `None`).
    let (choice, allowed) = match tool_choice {
        None => (Some(ToolChoice::Auto), None),
        Some(Value::String(choice)) => match choice.as_str() {
            "none" => (None, None),
            "auto" => (Some(ToolChoice::Auto), None),
            "required" => (Some(ToolChoice::Required), None),
            _ => return Err(bad_choice()),
        },
        Some(choice) => match choice.get("type").and_then(Value::as_str) {
            Some("function") => {
                let name = function_name(choice).ok_or_else(bad_choice)?;
                (Some(ToolChoice::Function(name.clone())), Some(vec![name]))
            }
            Some("allowed_tools") => {
                let allowed = &choice["allowed_tools"];
                let mode = match allowed.get("mode").and_then(Value::as_str) {
                    Some("auto") => ToolChoice::Auto,
                    Some("required") => ToolChoice::Required,
                    _ => return Err(bad_choice()),
                };
                let names = allowed
                    .get("tools")
                    .and_then(Value::as_array)
                    .ok_or_else(bad_choice)?
                    .iter()
                    .map(|t| function_name(t).ok_or_else(bad_choice))
                    .collect::<std::result::Result<Vec<_>, _>>()?;
                (Some(mode), Some(names))
            }
            _ => return Err(bad_choice()),
        },
    };
    let (tools, choice) = match (choice, tools) {
        (Some(choice), Some(tools)) => (Some(tools), choice),
        (Some(ToolChoice::Auto), None) | (None, _) => (None, ToolChoice::Auto),
        (Some(_), None) => {
            return Err(ApiError::invalid("tool_choice needs tools").param("tool_choice"))
        }
    };
    if let Some(tools) = &tools {
        if let Some(i) = tools.iter().position(|t| !t.is_object()) {
            return Err(
                ApiError::invalid("each tool must be an object").param(format!("tools[{i}]"))
            );
        }
    }
    // A named function, or the allowed ones, are all the model is shown.
    let tools = match (allowed, tools) {
        (Some(names), Some(tools)) => {
            if let Some(missing) = names
                .iter()
                .find(|&n| !tools.iter().any(|t| function_name(t).as_ref() == Some(n)))
            {
                return Err(ApiError::invalid(format!(
                    "tool_choice names `{missing}`, which is not in tools"
                ))
                .param("tool_choice"));
            }
            Some(
                tools
                    .into_iter()
                    .filter(|t| function_name(t).is_some_and(|n| names.contains(&n)))
                    .collect::<Vec<_>>(),
            )
        }
        (_, tools) => tools,
    };
    if choice == ToolChoice::Required && tools.as_ref().is_none_or(Vec::is_empty) {
        return Err(ApiError::invalid("tool_choice \"required\" needs tools").param("tools"));
    }
    Ok((tools, choice))
}

/// Chat templates read a tool call's `arguments` as an object; OpenAI clients send it as
/// JSON text.
fn normalize_tool_calls(message: &mut Message) {
    let Some(Value::Array(calls)) = message.extra.get_mut("tool_calls") else {
        return;
    };
    for call in calls {
        if let Some(function) = call.get_mut("function") {
            if let Some(Value::String(arguments)) = function.get("arguments") {
                if let Ok(parsed @ Value::Object(_)) = serde_json::from_str::<Value>(arguments) {
                    function["arguments"] = parsed;
                }
            }
        }
    }
}

async fn prepare_completion(
    state: &AppState,
    body: std::result::Result<Bytes, BytesRejection>,
) -> std::result::Result<Prepared, ApiError> {
    let body = parse_body(&body_bytes(body)?)?;
    let request: CompletionRequest = fields(&body)?;
    let sampling: Sampling = fields(&body)?;
    check_model(state, request.model.as_deref())?;
    let card = ready(state)?;
    let one = |n: usize| {
        if n == 1 {
            Ok(())
        } else {
            Err(ApiError::invalid("send one prompt per request").param("prompt"))
        }
    };
    let tokenizer = card.tokenizer.clone();
    let (prompt, text) = match request.prompt {
        Prompt::Text(text) => (None, text),
        Prompt::Texts(mut texts) => {
            one(texts.len())?;
            (None, texts.remove(0))
        }
        Prompt::Tokens(ids) => (Some(ids), String::new()),
        Prompt::TokenLists(mut lists) => {
            one(lists.len())?;
            (Some(lists.remove(0)), String::new())
        }
    };
    let echo = request.echo.unwrap_or(false);
    let (prompt, text) = match prompt {
        Some(ids) => {
            let text = if echo {
                tokenizer.decode(&ids, false).unwrap_or_default()
            } else {
                String::new()
            };
            (ids, text)
        }
        None => {
            let encoder = tokenizer.clone();
            let source = text.clone();
            let ids = tokio::task::spawn_blocking(move || encoder.encode(&source, true))
                .await
                .map_err(|e| ApiError::server(e.to_string()))??;
            (ids, text)
        }
    };
    let stream = sampling.stream.unwrap_or(false);
    let include_usage = sampling
        .stream_options
        .as_ref()
        .and_then(|o| o.include_usage)
        .unwrap_or(false);
    let generation = generation(
        state,
        &card,
        prompt,
        sampling,
        request.logprobs,
        Kind::Completion,
    )?;
    Ok(Prepared {
        request: generation,
        stream,
        include_usage,
        tools: false,
        forced: None,
        echo: echo.then_some(text),
    })
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    Chat,
    Completion,
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn new_id(state: &AppState, prefix: &str) -> String {
    let n = state.next_id.fetch_add(1, Ordering::SeqCst);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    format!("{prefix}{:08x}{:08x}{n:08x}", state.started as u32, nanos)
}

fn finish_reason(reason: &FinishReason, tool_calls: bool) -> &'static str {
    match reason {
        _ if tool_calls => "tool_calls",
        FinishReason::Length => "length",
        FinishReason::EndOfSequence | FinishReason::Stop(_) => "stop",
    }
}

fn usage(done: &Completion) -> Value {
    json!({
        "prompt_tokens": done.prompt_tokens,
        "completion_tokens": done.completion_tokens,
        "total_tokens": done.prompt_tokens + done.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": done.cached_tokens},
    })
}

fn tool_calls_json(state: &AppState, calls: &[ToolCall]) -> Value {
    Value::Array(
        calls
            .iter()
            .map(|call| {
                json!({
                    "id": new_id(state, "call_"),
                    "type": "function",
                    "function": {"name": call.name, "arguments": call.arguments},
                })
            })
            .collect(),
    )
}

/// A chat token's log-probabilities, as `logprobs.content[i]`.
fn chat_logprob(lp: &TokenLogprob) -> Value {
    json!({
        "token": lp.token,
        "logprob": lp.logprob,
        "bytes": lp.token.as_bytes(),
        "top_logprobs": lp.top.iter().map(|(token, logprob)| json!({
            "token": token, "logprob": logprob, "bytes": token.as_bytes(),
        })).collect::<Vec<_>>(),
    })
}

/// Legacy completions' log-probabilities of some tokens, starting at text offset `offset`.
fn completion_logprobs(lps: &[TokenLogprob], mut offset: usize) -> Value {
    let mut text_offset = Vec::new();
    for lp in lps {
        text_offset.push(offset);
        offset += lp.token.len();
    }
    json!({
        "tokens": lps.iter().map(|l| l.token.clone()).collect::<Vec<_>>(),
        "token_logprobs": lps.iter().map(|l| l.logprob).collect::<Vec<_>>(),
        "top_logprobs": lps.iter().map(|l| {
            l.top.iter().map(|(t, p)| (t.clone(), json!(p))).collect::<serde_json::Map<_, _>>()
        }).collect::<Vec<_>>(),
        "text_offset": text_offset,
    })
}

async fn respond(state: AppState, prepared: Prepared, kind: Kind) -> Response {
    let slot = match Slot::take(&state) {
        Ok(slot) => slot,
        Err(e) => return e.into_response(),
    };
    let events = match state.engine.submit(prepared.request.clone()) {
        Ok(events) => events,
        Err(e) => {
            return ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                e.to_string(),
            )
            .into_response()
        }
    };
    let id = new_id(
        &state,
        match kind {
            Kind::Chat => "chatcmpl-",
            Kind::Completion => "cmpl-",
        },
    );
    if prepared.stream {
        let frames = Frames {
            state: state.clone(),
            kind,
            id,
            created: now(),
            events,
            tools: prepared.tools.then(|| {
                let mut tools = ToolCallStream::new();
                if let Some(opening) = &prepared.forced {
                    // Held from the start: the reply continues a tool call.
                    tools.push(opening);
                }
                tools
            }),
            call_ids: Vec::new(),
            include_usage: prepared.include_usage,
            logprobs: prepared.request.logprobs.is_some(),
            sent_role: false,
            text_offset: 0,
            done: false,
            _slot: slot,
        };
        let echo = prepared.echo.filter(|e| !e.is_empty());
        let stream = frames.into_stream(echo);
        Sse::new(stream).into_response()
    } else {
        let result = collect(events).await;
        drop(slot);
        match result {
            Ok((text, logprobs, done)) => {
                whole_response(&state, kind, &prepared, id, text, logprobs, done).into_response()
            }
            Err(e) => ApiError::from(e).into_response(),
        }
    }
}

/// The whole reply of a non-streaming request.
async fn collect(
    mut events: tokio::sync::mpsc::UnboundedReceiver<Event>,
) -> Result<(String, Vec<TokenLogprob>, Completion)> {
    let mut text = String::new();
    let mut logprobs = Vec::new();
    while let Some(event) = events.recv().await {
        match event {
            Event::Token { text: t, logprob } => {
                text.push_str(&t);
                logprobs.extend(logprob);
            }
            Event::Done(done) => return Ok((text, logprobs, done)),
            Event::Error(e) => return Err(e),
        }
    }
    Err(Error::Mlx(mlx_rs::error::Exception::custom(
        "the engine stopped before the reply was complete",
    )))
}

fn whole_response(
    state: &AppState,
    kind: Kind,
    prepared: &Prepared,
    id: String,
    text: String,
    logprobs: Vec<TokenLogprob>,
    done: Completion,
) -> Json<Value> {
    let model = &state.options.model_id;
    let want_logprobs = prepared.request.logprobs.is_some();
    match kind {
        Kind::Chat => {
            let text = match &prepared.forced {
                Some(opening) => format!("{opening}{text}"),
                None => text,
            };
            let parsed = if prepared.tools {
                tools::parse_tool_calls(&text).filter(|(_, calls)| !calls.is_empty())
            } else {
                None
            };
            let (content, calls) = match parsed {
                Some((content, calls)) => (content, calls),
                None => (text, Vec::new()),
            };
            let mut message = json!({"role": "assistant", "content": content});
            if !calls.is_empty() {
                if message["content"] == "" {
                    message["content"] = Value::Null;
                }
                message["tool_calls"] = tool_calls_json(state, &calls);
            }
            let logprobs = want_logprobs
                .then(|| json!({"content": logprobs.iter().map(chat_logprob).collect::<Vec<_>>()}));
            Json(json!({
                "id": id,
                "object": "chat.completion",
                "created": now(),
                "model": model,
                "choices": [{
                    "index": 0,
                    "message": message,
                    "logprobs": logprobs,
                    "finish_reason": finish_reason(&done.finish_reason, !calls.is_empty()),
                }],
                "usage": usage(&done),
            }))
        }
        Kind::Completion => {
            let echo = prepared.echo.clone().unwrap_or_default();
            let logprobs = want_logprobs.then(|| completion_logprobs(&logprobs, echo.len()));
            Json(json!({
                "id": id,
                "object": "text_completion",
                "created": now(),
                "model": model,
                "choices": [{
                    "index": 0,
                    "text": echo + &text,
                    "logprobs": logprobs,
                    "finish_reason": finish_reason(&done.finish_reason, false),
                }],
                "usage": usage(&done),
            }))
        }
    }
}

/// Turns a request's engine events into server-sent events. Dropping it (the client went
/// away) drops the event receiver, which cancels the request in the engine.
struct Frames {
    state: AppState,
    kind: Kind,
    id: String,
    created: u64,
    events: tokio::sync::mpsc::UnboundedReceiver<Event>,
    tools: Option<ToolCallStream>,
    /// The ids of the tool calls streamed so far.
    call_ids: Vec<String>,
    include_usage: bool,
    logprobs: bool,
    sent_role: bool,
    text_offset: usize,
    done: bool,
    _slot: Slot,
}

impl Frames {
    fn into_stream(
        mut self,
        echo: Option<String>,
    ) -> impl Stream<Item = std::result::Result<SseEvent, Infallible>> + Send {
        let mut first = Vec::new();
        if let Some(text) = echo {
            let chunk = self.completion_chunk(&text, None, None);
            first.push(SseEvent::default().data(chunk.to_string()));
            self.text_offset = text.len();
        }
        let rest = stream::unfold(self, |mut frames| async move {
            if frames.done {
                return None;
            }
            let out = frames.next_frames().await;
            Some((stream::iter(out), frames))
        });
        stream::iter(first).chain(rest.flatten()).map(Ok)
    }

    async fn next_frames(&mut self) -> Vec<SseEvent> {
        let data = |v: Value| SseEvent::default().data(v.to_string());
        let mut out = Vec::new();
        if self.kind == Kind::Chat && !self.sent_role {
            self.sent_role = true;
            out.push(data(self.chat_chunk(
                json!({"role": "assistant", "content": ""}),
                None,
                None,
            )));
        }
        match self.events.recv().await {
            Some(Event::Token { text, logprob }) => {
                let (text, calls) = match &mut self.tools {
                    Some(tools) => {
                        let text = tools.push(&text);
                        (text, tools.deltas())
                    }
                    None => (text, Vec::new()),
                };
                if !calls.is_empty() {
                    out.push(data(self.tool_calls_chunk(&calls)));
                }
                if text.is_empty() && logprob.is_none() {
                    return out;
                }
                let chunk = match self.kind {
                    Kind::Chat => {
                        let logprobs = logprob
                            .filter(|_| self.logprobs)
                            .map(|lp| json!({"content": [chat_logprob(&lp)]}));
                        self.chat_chunk(json!({"content": text}), logprobs, None)
                    }
                    Kind::Completion => {
                        let logprobs = logprob
                            .filter(|_| self.logprobs)
                            .map(|lp| completion_logprobs(&[lp], self.text_offset));
                        self.text_offset += text.len();
                        self.completion_chunk(&text, logprobs, None)
                    }
                };
                out.push(data(chunk));
            }
            Some(Event::Done(done)) => {
                if let Some(tools) = self.tools.take() {
                    let (rest, calls) = tools.finish_deltas();
                    if !rest.is_empty() {
                        out.push(data(self.chat_chunk(json!({"content": rest}), None, None)));
                    }
                    if !calls.is_empty() {
                        out.push(data(self.tool_calls_chunk(&calls)));
                    }
                }
                let reason = finish_reason(&done.finish_reason, !self.call_ids.is_empty());
                out.push(data(match self.kind {
                    Kind::Chat => self.chat_chunk(json!({}), None, Some(reason)),
                    Kind::Completion => self.completion_chunk("", None, Some(reason)),
                }));
                if self.include_usage {
                    let mut chunk = match self.kind {
                        Kind::Chat => self.chat_chunk(json!({}), None, None),
                        Kind::Completion => self.completion_chunk("", None, None),
                    };
                    chunk["choices"] = json!([]);
                    chunk["usage"] = usage(&done);
                    out.push(data(chunk));
                }
                out.push(SseEvent::default().data("[DONE]"));
                self.done = true;
            }
            Some(Event::Error(e)) => {
                out.push(data(ApiError::from(e).body()));
                out.push(SseEvent::default().data("[DONE]"));
                self.done = true;
            }
            None => {
                out.push(data(
                    ApiError::server("the engine stopped before the reply was complete").body(),
                ));
                self.done = true;
            }
        }
        out
    }

    /// A chunk of streamed tool-call pieces, as OpenAI's `delta.tool_calls`: a call's first
    /// piece has its id, type and name, later ones more of its arguments.
    fn tool_calls_chunk(&mut self, deltas: &[ToolCallDelta]) -> Value {
        let calls = deltas
            .iter()
            .map(|delta| match delta {
                ToolCallDelta::Start { index, name } => {
                    let id = new_id(&self.state, "call_");
                    self.call_ids.push(id.clone());
                    json!({"index": index, "id": id, "type": "function",
                        "function": {"name": name, "arguments": ""}})
                }
                ToolCallDelta::Arguments { index, text } => {
                    json!({"index": index, "function": {"arguments": text}})
                }
            })
            .collect::<Vec<_>>();
        self.chat_chunk(json!({"tool_calls": calls}), None, None)
    }

    fn chat_chunk(&self, delta: Value, logprobs: Option<Value>, finish: Option<&str>) -> Value {
        self.chunk("chat.completion.chunk", "delta", delta, logprobs, finish)
    }

    fn completion_chunk(&self, text: &str, logprobs: Option<Value>, finish: Option<&str>) -> Value {
        self.chunk("text_completion", "text", json!(text), logprobs, finish)
    }

    /// One streamed chunk of `object` whose single choice carries `content` under `key`.
    fn chunk(
        &self,
        object: &str,
        key: &str,
        content: Value,
        logprobs: Option<Value>,
        finish: Option<&str>,
    ) -> Value {
        let mut choice = json!({"index": 0, "logprobs": logprobs, "finish_reason": finish});
        choice[key] = content;
        let mut chunk = json!({
            "id": self.id,
            "object": object,
            "created": self.created,
            "model": self.state.options.model_id,
            "choices": [choice],
        });
        if self.include_usage {
            chunk["usage"] = Value::Null;
        }
        chunk
    }
}
