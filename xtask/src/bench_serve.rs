//! `cargo xtask bench serve`: the OpenAI-compatible server under concurrent streaming
//! clients on the default model, over loopback HTTP as a client sees it; with `--against`,
//! another server on the same weights under the same load, in the same run.

use anyhow::{bail, Context};
use mlx_models::load::{load, LoadOptions, ModelSource};
use mlx_models::serve::{Engine, EngineOptions, ServeOptions, Server};
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// What one streamed request saw.
struct Sample {
    /// From sending the request to the first generated text.
    ttft: Duration,
    /// From sending the request to `[DONE]`.
    total: Duration,
    completion_tokens: u64,
    cached_tokens: u64,
}

/// The load both servers get.
struct Workload<'a> {
    streams: &'a [usize],
    max_tokens: usize,
    prefix_tokens: usize,
    weights: &'static str,
}

pub fn run(
    streams: &[usize],
    max_tokens: usize,
    prefix_tokens: usize,
    quantized: bool,
    against: Option<&str>,
) -> anyhow::Result<()> {
    let against = against
        .map(|spec| -> anyhow::Result<(String, SocketAddr)> {
            let (name, addr) = spec
                .split_once('=')
                .with_context(|| format!("--against {spec}: expected NAME=HOST:PORT"))?;
            let addr = addr
                .parse()
                .with_context(|| format!("--against {spec}: {addr} is not HOST:PORT"))?;
            Ok((name.to_owned(), addr))
        })
        .transpose()?;
    let workload = Workload {
        streams,
        max_tokens,
        prefix_tokens,
        weights: if quantized {
            "4-bit (as stored)"
        } else {
            "f32 (dequantized)"
        },
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(serve_bench(&workload, quantized, against))
}

async fn serve_bench(
    workload: &Workload<'_>,
    quantized: bool,
    against: Option<(String, SocketAddr)>,
) -> anyhow::Result<()> {
    let streams = workload.streams;
    let options = LoadOptions::new().dequantize(!quantized);
    let engine = Engine::spawn(
        move || load(&ModelSource::Default, &options),
        EngineOptions::new().max_batch(streams.iter().copied().max().unwrap_or(1)),
    )?;
    let card = engine.ready().await.map_err(anyhow::Error::msg)?;
    let eos = card.eos.clone();
    let server = Server::bind(engine, ServeOptions::new("default").port(0)).await?;
    let addr = server.local_addr();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(server.run(async {
        let _ = stopped.await;
    }));

    // A system prompt of about `prefix_tokens` tokens, shared by the shared-prefix rounds.
    let sentence = "You are a careful assistant who answers in plain words and checks facts. ";
    let per = card.tokenizer.encode(sentence, false)?.len().max(1);
    let system = sentence.repeat(workload.prefix_tokens.div_ceil(per));
    let ours = Target {
        name: "mlx-models".into(),
        addr,
        model: "default".into(),
        batched: Some(card.batched),
    };
    let result = measure(&ours, workload, &system, &eos).await;
    let _ = stop.send(());
    task.await??;
    result?;
    if let Some((name, addr)) = against {
        // mlx-lm's server answers "default_model" with the model it was started with.
        let other = Target {
            name,
            addr,
            model: "default_model".into(),
            batched: None,
        };
        measure(&other, workload, &system, &eos).await?;
    }
    Ok(())
}

/// A server under test.
struct Target {
    name: String,
    addr: SocketAddr,
    /// The `model` field its requests carry.
    model: String,
    /// Whether it batches (known for ours only).
    batched: Option<bool>,
}

/// Every round of the load against one server, a JSON line each, then the speedup of the
/// most streams over one.
async fn measure(
    target: &Target,
    workload: &Workload<'_>,
    system: &str,
    eos: &[u32],
) -> anyhow::Result<()> {
    let addr = target.addr;
    let body = |system: Option<&str>, question: &str, max_tokens: usize| {
        body(&target.model, system, question, max_tokens, eos)
    };
    // Warm-up (not measured): the first forward passes allocate and JIT.
    request(addr, &body(None, "Hello.", 8)).await?;

    let mut aggregate = Vec::new();
    for shared in [false, true] {
        if shared {
            // Puts the shared prefix into the cache, as an earlier conversation would.
            request(addr, &body(Some(system), "Say hi.", 1)).await?;
        }
        for (turn, &n) in workload.streams.iter().enumerate() {
            let started = Instant::now();
            let requests = (0..n).map(|i| {
                // Different questions, so that only the system prompt is shared.
                let question = format!(
                    "Question {turn}-{i}: write a short story about the number {}.",
                    i * 7 + turn
                );
                let body = body(shared.then_some(system), &question, workload.max_tokens);
                async move { request(addr, &body).await }
            });
            let samples = futures_all(requests).await?;
            let wall = started.elapsed().as_secs_f64();
            let tokens: u64 = samples.iter().map(|s| s.completion_tokens).sum();
            let mut ttft: Vec<f64> = samples.iter().map(|s| s.ttft.as_secs_f64() * 1e3).collect();
            ttft.sort_by(f64::total_cmp);
            let per_stream: Vec<f64> = samples
                .iter()
                .map(|s| {
                    let decode = (s.total - s.ttft).as_secs_f64();
                    (s.completion_tokens.saturating_sub(1)) as f64 / decode.max(1e-9)
                })
                .collect();
            let rate = tokens as f64 / wall;
            aggregate.push((shared, n, rate));
            println!(
                "{}",
                json!({
                    "bench": "serve",
                    "server": target.name,
                    "model": mlx_models::default_model::NAME,
                    "weights": workload.weights,
                    "batched": target.batched,
                    "streams": n,
                    "shared_prefix_tokens": if shared { workload.prefix_tokens } else { 0 },
                    "max_tokens": workload.max_tokens,
                    "completion_tokens": tokens,
                    "aggregate_tok_s": round(rate),
                    "per_stream_decode_tok_s_mean": round(per_stream.iter().sum::<f64>() / n as f64),
                    "ttft_ms_p50": round(percentile(&ttft, 0.5)),
                    "ttft_ms_p95": round(percentile(&ttft, 0.95)),
                    "cached_prompt_tokens_mean": samples.iter().map(|s| s.cached_tokens).sum::<u64>() / n as u64,
                    "wall_s": round(wall),
                })
            );
        }
    }
    let one = aggregate
        .iter()
        .find(|(s, n, _)| !s && *n == 1)
        .map(|a| a.2);
    let most = aggregate
        .iter()
        .filter(|(s, _, _)| !s)
        .max_by_key(|(_, n, _)| *n)
        .copied();
    if let (Some(one), Some((_, n, rate))) = (one, most) {
        println!(
            "{}",
            json!({
                "bench": "serve",
                "server": target.name,
                "summary": format!("{n} streams vs 1"),
                "aggregate_speedup": round(rate / one),
            })
        );
    }
    Ok(())
}

fn round(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

/// A streamed greedy chat request that cannot end early (end of sequence banned).
fn body(
    model: &str,
    system: Option<&str>,
    question: &str,
    max_tokens: usize,
    eos: &[u32],
) -> String {
    let mut messages = Vec::new();
    if let Some(system) = system {
        messages.push(json!({"role": "system", "content": system}));
    }
    messages.push(json!({"role": "user", "content": question}));
    let bias: serde_json::Map<String, Value> =
        eos.iter().map(|id| (id.to_string(), json!(-100))).collect();
    json!({
        "model": model,
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": 0,
        "logit_bias": bias,
        "stream": true,
        "stream_options": {"include_usage": true},
    })
    .to_string()
}

async fn futures_all<F, T>(futures: impl Iterator<Item = F>) -> anyhow::Result<Vec<T>>
where
    F: std::future::Future<Output = anyhow::Result<T>> + Send + 'static,
    T: Send + 'static,
{
    let handles: Vec<_> = futures.map(tokio::spawn).collect();
    let mut out = Vec::new();
    for handle in handles {
        out.push(handle.await??);
    }
    Ok(out)
}

/// Sends one streaming request over a fresh connection and reads it to `[DONE]`.
async fn request(addr: SocketAddr, body: &str) -> anyhow::Result<Sample> {
    let started = Instant::now();
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    let (mut ttft, mut usage) = (None, None);
    let mut pending = String::new();
    let mut buf = vec![0u8; 16 << 10];
    loop {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            bail!("the server closed the stream before [DONE]: {pending}");
        }
        pending.push_str(&String::from_utf8_lossy(&buf[..n]));
        while let Some(end) = pending.find('\n') {
            let line: String = pending.drain(..=end).collect();
            let Some(data) = line.trim().strip_prefix("data: ") else {
                if line.starts_with("HTTP/1.1 ") && !line.starts_with("HTTP/1.1 200") {
                    bail!("{line}");
                }
                continue;
            };
            if data == "[DONE]" {
                let usage: Value = usage.context("no usage chunk")?;
                return Ok(Sample {
                    ttft: ttft.unwrap_or_else(|| started.elapsed()),
                    total: started.elapsed(),
                    completion_tokens: usage["completion_tokens"].as_u64().unwrap_or(0),
                    cached_tokens: usage["prompt_tokens_details"]["cached_tokens"]
                        .as_u64()
                        .unwrap_or(0),
                });
            }
            let chunk: Value = serde_json::from_str(data)?;
            if chunk.get("error").is_some() {
                bail!("{chunk}");
            }
            let text = &chunk["choices"][0]["delta"]["content"];
            if ttft.is_none() && text.as_str().is_some_and(|t| !t.is_empty()) {
                ttft = Some(started.elapsed());
            }
            if !chunk["usage"].is_null() {
                usage = Some(chunk["usage"].clone());
            }
        }
    }
}
