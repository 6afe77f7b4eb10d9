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
    /// Cache bytes per token and decode speed of a random-weight DeepSeek-V3-shaped model
    /// with multi-head latent attention, caching the latents (decode absorbs `kv_b_proj`)
    /// and caching expanded keys and values, after a long prompt, in one run (use --release).
    Mla {
        /// Prompt length in tokens (the context decoding attends over).
        #[arg(long, default_value_t = 4096)]
        context: usize,
        /// Tokens to generate.
        #[arg(long, default_value_t = 32)]
        max_tokens: usize,
        /// Decoder layers.
        #[arg(long, default_value_t = 4)]
        layers: usize,
    },
    /// Prefill speed of a random-weight Mamba2-shaped model, scanning prompts in chunks
    /// (SSD) and token by token, at two prompt lengths, in one run (use --release).
    Hybrid {
        /// Prompt lengths in tokens.
        #[arg(long, value_delimiter = ',', default_values_t = [256, 2048])]
        prompts: Vec<usize>,
        /// Decoder layers.
        #[arg(long, default_value_t = 4)]
        layers: usize,
    },
    /// `mlx-models serve` on the default model (f32, dequantized) under 1, 4 and 8
    /// concurrent streaming clients, without and with a shared prompt prefix: aggregate
    /// decode tok/s and time to first token (p50/p95), JSON lines (use --release).
    Serve {
        /// Concurrent streams, one round each.
        #[arg(long, value_delimiter = ',', default_values_t = [1, 4, 8])]
        streams: Vec<usize>,
        /// Tokens per request (end of sequence is banned, so every request makes them all).
        #[arg(long, default_value_t = 64)]
        max_tokens: usize,
        /// Length of the shared system prompt of the shared-prefix rounds, in tokens.
        #[arg(long, default_value_t = 256)]
        prefix_tokens: usize,
        /// Keep the GGUF's 4-bit weights instead of dequantizing to f32.
        #[arg(long)]
        quantized: bool,
        /// Also drive another OpenAI-compatible server already serving the same weights
        /// (e.g. Python mlx-lm's `mlx_lm.server`), `NAME=HOST:PORT`, with the same load
        /// right after ours, so that both are measured in one run.
        #[arg(long, value_name = "NAME=HOST:PORT")]
        against: Option<String>,
    },
    /// Decode speed of a random-weight mixture-of-experts model (Qwen3-MoE shape) next to
    /// a dense model with the same active parameters per token, in one run (use --release).
    Moe {
        /// Hidden size of both models.
        #[arg(long, default_value_t = 1024)]
        hidden: i32,
        /// Decoder layers.
        #[arg(long, default_value_t = 8)]
        layers: usize,
        /// Experts per MoE layer.
        #[arg(long, default_value_t = 64)]
        experts: i32,
        /// Experts per token.
        #[arg(long, default_value_t = 4)]
        top_k: i32,
        /// Width of each expert; the dense model's MLP is `top_k` times as wide.
        #[arg(long, default_value_t = 256)]
        expert_size: i32,
        /// Prompt length in tokens.
        #[arg(long, default_value_t = 64)]
        prompt_tokens: usize,
        /// Tokens to generate.
        #[arg(long, default_value_t = 64)]
        max_tokens: usize,
    },
    /// `mlx-models generate` on a random-weight Llama-shaped model as one process and as
    /// `mlx-models launch -n 2` (tensor parallelism over the ring backend on this machine):
    /// prefill and decode tok/s and each rank's memory, JSON lines (use --release).
    Distributed {
        /// Hidden size.
        #[arg(long, default_value_t = 1024)]
        hidden: i32,
        /// Decoder layers.
        #[arg(long, default_value_t = 4)]
        layers: usize,
        /// Prompt length in tokens.
        #[arg(long, default_value_t = 128)]
        prompt_tokens: usize,
        /// Tokens to generate.
        #[arg(long, default_value_t = 64)]
        max_tokens: usize,
    },
}

pub fn run(args: Args) -> anyhow::Result<()> {
    match args.what {
        Bench::Serve {
            streams,
            max_tokens,
            prefix_tokens,
            quantized,
            against,
        } => crate::bench_serve::run(
            &streams,
            max_tokens,
            prefix_tokens,
            quantized,
            against.as_deref(),
        ),
        Bench::Matmul { n, min_ratio } => matmul(n, min_ratio),
        Bench::Generate {
            prompt_tokens,
            max_tokens,
        } => generate(prompt_tokens, max_tokens),
        Bench::Mla {
            context,
            max_tokens,
            layers,
        } => mla(context, max_tokens, layers),
        Bench::Hybrid { prompts, layers } => hybrid(&prompts, layers),
        Bench::Distributed {
            hidden,
            layers,
            prompt_tokens,
            max_tokens,
        } => distributed(hidden, layers, prompt_tokens, max_tokens),
        Bench::Moe {
            hidden,
            layers,
            experts,
            top_k,
            expert_size,
            prompt_tokens,
            max_tokens,
        } => moe(
            MoeShape {
                hidden,
                layers,
                experts,
                top_k,
                expert_size,
            },
            prompt_tokens,
            max_tokens,
        ),
    }
}

fn mla(context: usize, max_tokens: usize, layers: usize) -> anyhow::Result<()> {
    use mlx_models::config::ConfigFile;
    use mlx_models::family::DecoderFamily;
    use mlx_models::mla::MlaCache;
    use mlx_models::weights::Weights;
    use std::collections::HashMap;

    let (h, heads, vocab) = (1024, 16, 32_000);
    let (q_rank, kv_rank, nope, rope, v) = (384, 256, 64, 32, 64);
    let value = serde_json::json!({
        "model_type": "deepseek_v3",
        "vocab_size": vocab,
        "hidden_size": h,
        "intermediate_size": 2048,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": heads,
        "q_lora_rank": q_rank,
        "kv_lora_rank": kv_rank,
        "qk_nope_head_dim": nope,
        "qk_rope_head_dim": rope,
        "v_head_dim": v,
        "first_k_dense_replace": layers,
        "max_position_embeddings": context + max_tokens + 8,
    });
    let config = ConfigFile {
        path: PathBuf::from("bench-mla"),
        value,
    };
    let family: mlx_models::models::deepseek_v3::Config =
        config.parse_with_defaults(mlx_models::models::deepseek_v3::Config::DEFAULTS)?;
    let mut key = 0u64;
    let mut random = |shape: &[i32]| -> anyhow::Result<mlx_rs::Array> {
        key += 1;
        let k = mlx_rs::random::key(key)?;
        let std = (shape[shape.len() - 1] as f32).powf(-0.5);
        Ok(mlx_rs::random::normal::<f32>(shape, None, Some(std), &k)?)
    };
    let ones = |n: i32| mlx_rs::ops::ones::<f32>(&[n]);
    let mut tensors: HashMap<String, mlx_rs::Array> = HashMap::new();
    tensors.insert("model.embed_tokens.weight".into(), random(&[vocab, h])?);
    tensors.insert("lm_head.weight".into(), random(&[vocab, h])?);
    tensors.insert("model.norm.weight".into(), ones(h)?);
    for i in 0..layers {
        let p = format!("model.layers.{i}");
        let a = format!("{p}.self_attn");
        for (name, shape) in [
            ("q_a_proj", vec![q_rank, h]),
            ("q_b_proj", vec![heads * (nope + rope), q_rank]),
            ("kv_a_proj_with_mqa", vec![kv_rank + rope, h]),
            ("kv_b_proj", vec![heads * (nope + v), kv_rank]),
            ("o_proj", vec![h, heads * v]),
        ] {
            tensors.insert(format!("{a}.{name}.weight"), random(&shape)?);
        }
        tensors.insert(format!("{a}.q_a_layernorm.weight"), ones(q_rank)?);
        tensors.insert(format!("{a}.kv_a_layernorm.weight"), ones(kv_rank)?);
        tensors.insert(format!("{p}.input_layernorm.weight"), ones(h)?);
        tensors.insert(format!("{p}.post_attention_layernorm.weight"), ones(h)?);
        tensors.insert(format!("{p}.mlp.gate_proj.weight"), random(&[2048, h])?);
        tensors.insert(format!("{p}.mlp.up_proj.weight"), random(&[2048, h])?);
        tensors.insert(format!("{p}.mlp.down_proj.weight"), random(&[h, 2048])?);
    }
    mlx_rs::transforms::eval(tensors.values())?;
    let prompt: Vec<i32> = (0..context as i32).map(|t| (t * 7919) % vocab).collect();
    for cache in [MlaCache::Expanded, MlaCache::Latent] {
        let mut settings = family.settings(&config)?;
        if let Some(mla) = settings.latent_attention.as_mut() {
            mla.cache = cache;
        }
        let weights = Weights::new(tensors.clone(), &config.path);
        let model = mlx_models::transformer::build(&config, settings, weights)?;
        let (prefill, decode, bytes) = time_decode_with_cache(model.as_ref(), &prompt, max_tokens)?;
        let tokens = (context + max_tokens) as f64;
        println!(
            "{}",
            serde_json::json!({
                "bench": "mla",
                "cache": match cache { MlaCache::Latent => "latent (kv_b_proj absorbed)", MlaCache::Expanded => "expanded keys and values" },
                "layers": layers,
                "context_tokens": context,
                "generated_tokens": max_tokens,
                "cache_bytes_per_token": (bytes as f64 / tokens).round(),
                "cache_mib": (bytes as f64 / 1048576.0 * 10.0).round() / 10.0,
                "prefill_tok_s": (context as f64 / prefill * 10.0).round() / 10.0,
                "decode_tok_s": (max_tokens as f64 / decode * 10.0).round() / 10.0,
            })
        );
    }
    Ok(())
}

fn hybrid(prompts: &[usize], layers: usize) -> anyhow::Result<()> {
    use mlx_models::config::ConfigFile;
    use mlx_models::weights::Weights;
    use std::collections::HashMap;

    let (h, heads, head_dim, state, groups, kernel, vocab) = (768, 24, 64, 128, 1, 4, 32_000);
    let conv_dim = heads * head_dim + 2 * groups * state;
    let config = ConfigFile {
        path: PathBuf::from("bench-hybrid"),
        value: serde_json::json!({
            "model_type": "mamba2",
            "vocab_size": vocab,
            "hidden_size": h,
            "num_hidden_layers": layers,
            "num_heads": heads,
            "head_dim": head_dim,
            "expand": 2,
            "state_size": state,
            "n_groups": groups,
            "conv_kernel": kernel,
            "chunk_size": 256,
        }),
    };
    let family: mlx_models::models::mamba2::Config =
        config.parse_with_defaults(mlx_models::models::mamba2::DEFAULTS)?;
    let mut key = 0u64;
    let mut random = |shape: &[i32], std: f32| -> anyhow::Result<mlx_rs::Array> {
        key += 1;
        let k = mlx_rs::random::key(key)?;
        Ok(mlx_rs::random::normal::<f32>(shape, None, Some(std), &k)?)
    };
    let mut tensors: HashMap<String, mlx_rs::Array> = HashMap::new();
    tensors.insert(
        "backbone.embeddings.weight".into(),
        random(&[vocab, h], 0.02)?,
    );
    tensors.insert("lm_head.weight".into(), random(&[vocab, h], 0.02)?);
    tensors.insert(
        "backbone.norm_f.weight".into(),
        mlx_rs::ops::ones::<f32>(&[h])?,
    );
    let inter = heads * head_dim;
    for i in 0..layers {
        let p = format!("backbone.layers.{i}");
        tensors.insert(format!("{p}.norm.weight"), mlx_rs::ops::ones::<f32>(&[h])?);
        let m = format!("{p}.mixer");
        tensors.insert(
            format!("{m}.in_proj.weight"),
            random(&[inter + conv_dim + heads, h], 0.03)?,
        );
        tensors.insert(
            format!("{m}.conv1d.weight"),
            random(&[conv_dim, 1, kernel], 0.3)?,
        );
        tensors.insert(format!("{m}.conv1d.bias"), random(&[conv_dim], 0.1)?);
        tensors.insert(format!("{m}.dt_bias"), random(&[heads], 0.5)?);
        tensors.insert(format!("{m}.A_log"), random(&[heads], 0.5)?);
        tensors.insert(format!("{m}.D"), mlx_rs::ops::ones::<f32>(&[heads])?);
        tensors.insert(
            format!("{m}.norm.weight"),
            mlx_rs::ops::ones::<f32>(&[inter])?,
        );
        tensors.insert(format!("{m}.out_proj.weight"), random(&[h, inter], 0.03)?);
    }
    mlx_rs::transforms::eval(tensors.values())?;
    for &len in prompts {
        let prompt: Vec<i32> = (0..len as i32).map(|t| (t * 7919) % vocab).collect();
        for chunked in [true, false] {
            let mut settings = family.settings(&config)?;
            if let Some(m) = settings.mamba2.as_mut() {
                m.chunked_prefill = chunked;
            }
            let mut weights = Weights::new(tensors.clone(), &config.path);
            mlx_models::models::mamba2::sanitize_backbone(&mut weights, false);
            let model = mlx_models::transformer::build(&config, settings, weights)?;
            let (prefill, _, bytes) = time_decode_with_cache(model.as_ref(), &prompt, 0)?;
            println!(
                "{}",
                serde_json::json!({
                    "bench": "hybrid",
                    "model": format!("mamba2, {layers} layers, hidden {h}, {heads} heads × {head_dim}, state {state}"),
                    "prefill": if chunked { "chunked (SSD, chunk 256)" } else { "token by token" },
                    "prompt_tokens": len,
                    "prefill_tok_s": (len as f64 / prefill * 10.0).round() / 10.0,
                    "state_bytes": bytes,
                })
            );
        }
    }
    Ok(())
}

/// [`time_decode`], also returning the bytes the cache's state holds at the end.
fn time_decode_with_cache(
    model: &dyn mlx_models::LanguageModel,
    prompt: &[i32],
    steps: usize,
) -> anyhow::Result<(f64, f64, usize)> {
    use mlx_models::tap::Tap;
    use mlx_rs::ops::indexing::argmax_axis;
    use mlx_rs::Array;
    let next = |logits: &Array| -> anyhow::Result<Array> {
        let last = logits.take_axis(Array::from_int(logits.dim(1) - 1), 1)?;
        let token = argmax_axis(&last, -1, true)?.as_dtype(mlx_rs::Dtype::Int32)?;
        token.eval()?;
        Ok(token)
    };
    let mut cache = model.new_cache();
    let start = std::time::Instant::now();
    let mut token = Array::from_int(0);
    for chunk in prompt.chunks(512) {
        let input = Array::from_slice(chunk, &[1, chunk.len() as i32]);
        token = next(&model.forward(&input, &mut cache, &mut Tap::off())?)?;
    }
    let prefill = start.elapsed().as_secs_f64();
    let start = std::time::Instant::now();
    for _ in 0..steps {
        token = next(&model.forward(&token.reshape(&[1, 1])?, &mut cache, &mut Tap::off())?)?;
    }
    let decode = start.elapsed().as_secs_f64();
    let mut bytes = 0;
    for layer in &cache {
        bytes += layer
            .state()?
            .iter()
            .map(|(_, a)| a.nbytes())
            .sum::<usize>();
    }
    Ok((prefill, decode, bytes))
}

/// The shape of the `bench moe` models.
struct MoeShape {
    hidden: i32,
    layers: usize,
    experts: i32,
    top_k: i32,
    expert_size: i32,
}

fn moe(shape: MoeShape, prompt_tokens: usize, max_tokens: usize) -> anyhow::Result<()> {
    use mlx_models::config::ConfigFile;
    use mlx_models::weights::Weights;
    use std::collections::HashMap;

    let MoeShape {
        hidden: h,
        layers,
        experts,
        top_k,
        expert_size,
    } = shape;
    let (heads, head_dim, vocab) = (16, h / 16, 32_000);
    let dense_size = top_k * expert_size;
    let mut key = 0u64;
    let mut random = |shape: &[i32]| -> anyhow::Result<mlx_rs::Array> {
        key += 1;
        let k = mlx_rs::random::key(key)?;
        let std = (shape[shape.len() - 1] as f32).powf(-0.5);
        Ok(mlx_rs::random::normal::<f32>(shape, None, Some(std), &k)?)
    };
    for sparse in [true, false] {
        let mut tensors: HashMap<String, mlx_rs::Array> = HashMap::new();
        tensors.insert("model.embed_tokens.weight".into(), random(&[vocab, h])?);
        tensors.insert("lm_head.weight".into(), random(&[vocab, h])?);
        tensors.insert("model.norm.weight".into(), mlx_rs::ops::ones::<f32>(&[h])?);
        for i in 0..layers {
            let p = format!("model.layers.{i}");
            for n in ["input_layernorm", "post_attention_layernorm"] {
                tensors.insert(format!("{p}.{n}.weight"), mlx_rs::ops::ones::<f32>(&[h])?);
            }
            for n in ["q_norm", "k_norm"] {
                let w = mlx_rs::ops::ones::<f32>(&[head_dim])?;
                tensors.insert(format!("{p}.self_attn.{n}.weight"), w);
            }
            for n in ["q_proj", "k_proj", "v_proj"] {
                tensors.insert(format!("{p}.self_attn.{n}.weight"), random(&[h, h])?);
            }
            tensors.insert(format!("{p}.self_attn.o_proj.weight"), random(&[h, h])?);
            if sparse {
                let m = format!("{p}.mlp.switch_mlp");
                let (e, i) = (experts, expert_size);
                tensors.insert(format!("{m}.gate_proj.weight"), random(&[e, i, h])?);
                tensors.insert(format!("{m}.up_proj.weight"), random(&[e, i, h])?);
                tensors.insert(format!("{m}.down_proj.weight"), random(&[e, h, i])?);
                tensors.insert(format!("{p}.mlp.gate.weight"), random(&[e, h])?);
            } else {
                let i = dense_size;
                tensors.insert(format!("{p}.mlp.gate_proj.weight"), random(&[i, h])?);
                tensors.insert(format!("{p}.mlp.up_proj.weight"), random(&[i, h])?);
                tensors.insert(format!("{p}.mlp.down_proj.weight"), random(&[h, i])?);
            }
        }
        let config = ConfigFile {
            path: PathBuf::from(if sparse { "bench-moe" } else { "bench-dense" }),
            value: serde_json::json!({
                "model_type": if sparse { "qwen3_moe" } else { "qwen3" },
                "vocab_size": vocab,
                "hidden_size": h,
                "intermediate_size": dense_size,
                "moe_intermediate_size": expert_size,
                "num_hidden_layers": layers,
                "num_attention_heads": heads,
                "num_key_value_heads": heads,
                "head_dim": head_dim,
                "num_experts": experts,
                "num_experts_per_tok": top_k,
                "norm_topk_prob": true,
                "max_position_embeddings": 4096,
            }),
        };
        let model = mlx_models::models::build(&config, Weights::new(tensors, &config.path))?;
        let info = model.info().clone();
        let prompt: Vec<i32> = (0..prompt_tokens as i32)
            .map(|t| (t * 7919) % 32_000)
            .collect();
        let (prefill, decode) = time_decode(model.as_ref(), &prompt, max_tokens)?;
        println!(
            "{}",
            serde_json::json!({
                "bench": "moe",
                "model": if sparse { format!("moe {experts} experts, top {top_k} of width {expert_size}") } else { format!("dense, MLP width {dense_size}") },
                "parameters": info.num_parameters,
                "active_parameters": info.num_active_parameters,
                "prompt_tokens": prompt_tokens,
                "generated_tokens": max_tokens,
                "prefill_tok_s": (prompt_tokens as f64 / prefill * 10.0).round() / 10.0,
                "decode_tok_s": (max_tokens as f64 / decode * 10.0).round() / 10.0,
            })
        );
    }
    Ok(())
}

/// Seconds to prefill `prompt` and then to decode `steps` greedy tokens one at a time
/// (after one untimed warm-up pass).
fn time_decode(
    model: &dyn mlx_models::LanguageModel,
    prompt: &[i32],
    steps: usize,
) -> anyhow::Result<(f64, f64)> {
    use mlx_models::tap::Tap;
    use mlx_rs::ops::indexing::argmax_axis;
    use mlx_rs::Array;
    let next = |logits: &Array| -> anyhow::Result<Array> {
        let last = logits.take_axis(Array::from_int(logits.dim(1) - 1), 1)?;
        let token = argmax_axis(&last, -1, true)?.as_dtype(mlx_rs::Dtype::Int32)?;
        token.eval()?;
        Ok(token)
    };
    let input = Array::from_slice(prompt, &[1, prompt.len() as i32]);
    // Warm-up.
    let mut cache = model.new_cache();
    next(&model.forward(&input, &mut cache, &mut Tap::off())?)?;
    let mut cache = model.new_cache();
    let start = std::time::Instant::now();
    let mut token = next(&model.forward(&input, &mut cache, &mut Tap::off())?)?;
    let prefill = start.elapsed().as_secs_f64();
    let start = std::time::Instant::now();
    for _ in 0..steps {
        token = next(&model.forward(&token, &mut cache, &mut Tap::off())?)?;
    }
    Ok((prefill, start.elapsed().as_secs_f64()))
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

fn distributed(
    hidden: i32,
    layers: usize,
    prompt_tokens: usize,
    max_tokens: usize,
) -> anyhow::Result<()> {
    let (heads, vocab, inter) = (16, 8192, hidden * 11 / 4);
    let dir = std::env::temp_dir().join(format!(
        "mlx-models-bench-distributed-{}",
        std::process::id()
    ));
    std::fs::create_dir_all(&dir)?;
    let result = (|| -> anyhow::Result<()> {
        // A Llama-shaped model of random weights, and a tokenizer whose token i is `t{i}`.
        let mut key = 0u64;
        let mut random = |shape: &[i32]| -> anyhow::Result<mlx_rs::Array> {
            key += 1;
            let k = mlx_rs::random::key(key)?;
            let std = (shape[shape.len() - 1] as f32).powf(-0.5);
            Ok(mlx_rs::random::normal::<f32>(shape, None, Some(std), &k)?)
        };
        let mut tensors: Vec<(String, mlx_rs::Array)> = vec![
            (
                "model.embed_tokens.weight".into(),
                random(&[vocab, hidden])?,
            ),
            ("lm_head.weight".into(), random(&[vocab, hidden])?),
            (
                "model.norm.weight".into(),
                mlx_rs::ops::ones::<f32>(&[hidden])?,
            ),
        ];
        for i in 0..layers {
            let p = format!("model.layers.{i}");
            for n in ["input_layernorm", "post_attention_layernorm"] {
                tensors.push((
                    format!("{p}.{n}.weight"),
                    mlx_rs::ops::ones::<f32>(&[hidden])?,
                ));
            }
            let kv = hidden / 2;
            for (n, rows) in [
                ("q_proj", hidden),
                ("k_proj", kv),
                ("v_proj", kv),
                ("o_proj", hidden),
            ] {
                tensors.push((
                    format!("{p}.self_attn.{n}.weight"),
                    random(&[rows, hidden])?,
                ));
            }
            for n in ["gate_proj", "up_proj"] {
                tensors.push((format!("{p}.mlp.{n}.weight"), random(&[inter, hidden])?));
            }
            tensors.push((
                format!("{p}.mlp.down_proj.weight"),
                random(&[hidden, inter])?,
            ));
        }
        mlx_rs::Array::save_safetensors(
            tensors.iter().map(|(k, v)| (k.as_str(), v)),
            None,
            dir.join("model.safetensors"),
        )?;
        let config = serde_json::json!({
            "model_type": "llama",
            "vocab_size": vocab,
            "hidden_size": hidden,
            "intermediate_size": inter,
            "num_hidden_layers": layers,
            "num_attention_heads": heads,
            "num_key_value_heads": heads / 2,
            "max_position_embeddings": 4096,
            "tie_word_embeddings": false,
        });
        std::fs::write(dir.join("config.json"), config.to_string())?;
        let words: serde_json::Map<String, serde_json::Value> = (0..vocab)
            .map(|i| (format!("t{i}"), serde_json::json!(i)))
            .collect();
        let tokenizer = serde_json::json!({
            "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
            "normalizer": null, "pre_tokenizer": {"type": "WhitespaceSplit"},
            "post_processor": null,
            "decoder": {"type": "WordPiece", "prefix": "##", "cleanup": false},
            "model": {"type": "WordLevel", "vocab": words, "unk_token": "t0"},
        });
        std::fs::write(dir.join("tokenizer.json"), tokenizer.to_string())?;
        let prompt: Vec<String> = (0..prompt_tokens)
            .map(|t| format!("t{}", (t * 7919) % vocab as usize))
            .collect();
        let exe = build_cli()?;
        for ranks in [1, 2] {
            let mut command = Command::new(&exe);
            if ranks > 1 {
                command.args(["launch", "-n", &ranks.to_string()]);
            }
            let output = command
                .arg("generate")
                .arg("--model")
                .arg(&dir)
                .args(["--prompt", &prompt.join(" "), "--ignore-chat-template"])
                .args(["--temp", "0", "--max-tokens", &max_tokens.to_string()])
                .output()
                .with_context(|| format!("running {}", exe.display()))?;
            let stderr = String::from_utf8_lossy(&output.stderr);
            if !output.status.success() {
                bail!("{ranks} rank(s): {stderr}");
            }
            let number = |line: &str, nth: usize| -> Option<f64> {
                line.split(|c: char| !(c.is_ascii_digit() || c == '.'))
                    .filter_map(|n| n.parse().ok())
                    .nth(nth)
            };
            let find = |prefix: &str, nth: usize| {
                stderr
                    .lines()
                    .find(|l| l.starts_with(prefix))
                    .and_then(|l| number(l, nth))
            };
            let memory: Vec<serde_json::Value> = stderr
                .lines()
                .filter(|l| l.starts_with("Memory of rank "))
                .map(|l| {
                    serde_json::json!({
                        "rank": number(l, 0).map(|r| r as u64),
                        "after_load_mb": number(l, 1),
                        "peak_load_mb": number(l, 2),
                    })
                })
                .collect();
            println!(
                "{}",
                serde_json::json!({
                    "bench": "distributed",
                    "model": format!("llama, random f32, hidden {hidden}, {layers} layers, vocab {vocab}"),
                    "processes": ranks,
                    "backend": if ranks > 1 { "ring (localhost)" } else { "none" },
                    "prompt_tokens": find("Prompt:", 0).map(|n| n as u64),
                    "prefill_tok_s": find("Prompt:", 1),
                    "generated_tokens": find("Generation:", 0).map(|n| n as u64),
                    "decode_tok_s": find("Generation:", 1),
                    "memory_per_rank": memory,
                })
            );
        }
        Ok(())
    })();
    let _ = std::fs::remove_dir_all(&dir);
    result
}

/// Builds the `mlx-models` command line in the profile xtask itself was built in.
fn build_cli() -> anyhow::Result<PathBuf> {
    let release = std::env::current_exe()?
        .components()
        .any(|c| c.as_os_str() == "release");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut command = Command::new(cargo);
    command.args([
        "build",
        "--quiet",
        "-p",
        "mlx-models",
        "--bin",
        "mlx-models",
    ]);
    if release {
        command.arg("--release");
    }
    if !command.status().context("running cargo build")?.success() {
        bail!("building mlx-models failed");
    }
    let target = std::env::var("CARGO_TARGET_DIR").unwrap_or_else(|_| "target".into());
    Ok(PathBuf::from(target)
        .join(if release { "release" } else { "debug" })
        .join("mlx-models"))
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
