//! `cargo xtask bench …`: speed checks, compared side by side in one run.

use anyhow::{bail, Context};
use std::path::{Path, PathBuf};
use std::process::Command;

#[derive(clap::Args)]
pub struct Args {
    #[command(subcommand)]
    what: Bench,
}

#[derive(clap::Subcommand)]
enum Bench {
    /// 2048² f32 matmul with the linked BLAS (OpenBLAS) and with the reference BLAS
    /// bundled in the MLX wheel, in one run; fails below `--min-ratio`.
    Matmul {
        /// Matrix size.
        #[arg(long, default_value_t = 2048)]
        n: u32,
        /// The least speed-up over the reference BLAS that passes.
        #[arg(long, default_value_t = 10.0)]
        min_ratio: f64,
    },
    /// Prefill and decode speed of the default model (SmolLM2-135M-Instruct), 4-bit as
    /// stored and dequantized to f32, side by side in one run (build with --release:
    /// `cargo xtask` runs in debug, so use `cargo run --release -p xtask -- bench generate`).
    Generate {
        /// Prompt length in tokens.
        #[arg(long, default_value_t = 256)]
        prompt_tokens: usize,
        /// Tokens to generate.
        #[arg(long, default_value_t = 128)]
        max_tokens: usize,
    },
}

pub fn run(args: Args) -> anyhow::Result<()> {
    match args.what {
        Bench::Matmul { n, min_ratio } => matmul(n, min_ratio),
        Bench::Generate {
            prompt_tokens,
            max_tokens,
        } => generate(prompt_tokens, max_tokens),
    }
}

fn generate(prompt_tokens: usize, max_tokens: usize) -> anyhow::Result<()> {
    use mlx_models::generate::GenerateOptions;
    use mlx_models::load::{load, LoadOptions, ModelSource};
    use mlx_models::SamplerBuilder;

    for dequantize in [false, true] {
        let model = load(
            &ModelSource::Default,
            &LoadOptions::new().dequantize(dequantize),
        )?;
        // A fixed prompt of the requested length: token ids of ordinary text, repeated.
        let text = "The quick brown fox jumps over the lazy dog while the river runs to the sea. ";
        let mut prompt = Vec::new();
        while prompt.len() < prompt_tokens {
            prompt.extend(model.tokenizer().encode(text, false)?);
        }
        prompt.truncate(prompt_tokens);
        // Greedy, never stopping early: every run generates exactly max_tokens.
        let mut stream = model.generate(
            &prompt,
            GenerateOptions::new()
                .max_tokens(max_tokens)
                .sampler(SamplerBuilder::default().temperature(0.0)),
        )?;
        for token in &mut stream {
            token?;
        }
        let stats = stream.stats();
        println!(
            "{}",
            serde_json::json!({
                "bench": "generate",
                "model": mlx_models::default_model::NAME,
                "weights": if dequantize { "f32 (dequantized)" } else { "4-bit (as stored)" },
                "prompt_tokens": stats.prompt_tokens,
                "generated_tokens": stats.generated_tokens,
                "prefill_tok_s": (stats.prompt_tokens_per_second() * 10.0).round() / 10.0,
                "decode_tok_s": (stats.generation_tokens_per_second() * 10.0).round() / 10.0,
                "peak_memory_gb": (stats.peak_memory as f64 / 1e7).round() / 100.0,
                "blas": mlx_models::runtime::blas_name(),
            })
        );
    }
    Ok(())
}

fn matmul(n: u32, min_ratio: f64) -> anyhow::Result<()> {
    let example = build_example("hello_mlx")?;
    let linked = run_json(&example, n, None)?;
    let reference_blas = mlx_sys::build_info::REFERENCE_BLAS;
    if reference_blas.is_empty() {
        bail!("this build has no bundled reference BLAS to compare with (MLX_DIR build)");
    }
    let reference = run_json(&example, n, Some(Path::new(reference_blas)))?;
    let gflops = |v: &serde_json::Value| v["matmul_gflops"].as_f64().unwrap_or(0.0);
    let ratio = gflops(&linked) / gflops(&reference).max(1e-9);
    println!("{linked}");
    println!("{reference}");
    println!(
        "{}",
        serde_json::json!({
            "bench": "matmul",
            "n": n,
            "linked_blas": linked["blas"],
            "linked_gflops": gflops(&linked),
            "reference_gflops": gflops(&reference),
            "speedup": (ratio * 10.0).round() / 10.0,
            "min_speedup": min_ratio,
            "pass": ratio >= min_ratio,
        })
    );
    if ratio < min_ratio {
        bail!("matmul speed-up over the reference BLAS is {ratio:.1}x, below {min_ratio}x");
    }
    Ok(())
}

/// Builds an example of the workspace in release mode and returns its path.
fn build_example(name: &str) -> anyhow::Result<PathBuf> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(cargo)
        .args(["build", "--quiet", "--release", "--example", name])
        .status()
        .context("running cargo build")?;
    if !status.success() {
        bail!("building the {name} example failed");
    }
    let target = std::env::var("CARGO_TARGET_DIR").unwrap_or_else(|_| "target".into());
    Ok(PathBuf::from(target)
        .join("release")
        .join("examples")
        .join(name))
}

/// Runs the matmul example, with `preload` resolved ahead of every other library.
fn run_json(example: &Path, n: u32, preload: Option<&Path>) -> anyhow::Result<serde_json::Value> {
    let mut command = Command::new(example);
    command.env("HELLO_MLX_N", n.to_string());
    if let Some(lib) = preload {
        command.env("LD_PRELOAD", lib);
    }
    let output = command
        .output()
        .with_context(|| format!("running {}", example.display()))?;
    if !output.status.success() {
        bail!(
            "{} failed: {}",
            example.display(),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    let line = stdout.lines().last().unwrap_or_default();
    serde_json::from_str(line).with_context(|| format!("parsing {line:?}"))
}
