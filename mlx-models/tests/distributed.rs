//! Tensor parallelism on MLX's ring backend, end to end: `mlx-models launch -n 2` against
//! one process on committed fixtures (a dense and two mixture-of-experts families, with
//! Transformers' greedy tokens as the reference), each rank's memory, the collectives
//! against closed forms, and the typed errors of a bad setup.

use mlx_models::distributed::{Backend, Group};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

fn cli() -> Command {
    Command::new(env!("CARGO_BIN_EXE_mlx-models"))
}

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures")
        .join(name)
}

/// Runs `command` to its end, failing the test if it takes longer than `limit` (a hang).
fn run(mut command: Command, limit: Duration) -> Output {
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed() > limit {
            child.kill().unwrap();
            let out = child.wait_with_output().unwrap();
            panic!(
                "still running after {limit:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

/// A copy of fixture `name` with a tokenizer whose token `i` is the word `t{i}`, so that
/// prompts and outputs are token ids written out.
fn model_dir(name: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(fixture(name)).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, dir.path().join(path.file_name().unwrap())).unwrap();
    }
    let vocab: serde_json::Map<String, serde_json::Value> =
        (0..256).map(|i| (format!("t{i}"), json!(i))).collect();
    let tokenizer = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [],
        "normalizer": null,
        "pre_tokenizer": {"type": "WhitespaceSplit"},
        "post_processor": null,
        "decoder": {"type": "WordPiece", "prefix": "##", "cleanup": false},
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "t0"},
    });
    std::fs::write(dir.path().join("tokenizer.json"), tokenizer.to_string()).unwrap();
    dir
}

/// The fixture's prompt and Transformers' greedy continuation.
fn prompt_and_greedy(name: &str) -> (Vec<i64>, Vec<i64>) {
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture(name).join("fixture.json")).unwrap())
            .unwrap();
    let prompt = meta["input_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_i64().unwrap())
        .collect();
    let expected =
        mlx_rs::Array::load_safetensors(fixture(name).join("expected.safetensors")).unwrap();
    let greedy = expected["greedy_tokens"]
        .as_dtype(mlx_rs::Dtype::Int64)
        .unwrap();
    (prompt, greedy.as_slice::<i64>().to_vec())
}

struct Run {
    tokens: Vec<i64>,
    /// Per rank: (MB after loading, MB peak while loading).
    memory: Vec<(f64, f64)>,
    stderr: String,
}

/// `generate` on fixture `name`, in one process or launched as `ranks` processes.
fn generate(name: &str, ranks: Option<usize>) -> Run {
    let dir = model_dir(name);
    let (prompt, greedy) = prompt_and_greedy(name);
    let prompt: Vec<String> = prompt.iter().map(|i| format!("t{i}")).collect();
    let mut command = cli();
    if let Some(n) = ranks {
        command.args(["launch", "-n", &n.to_string()]);
    }
    command
        .arg("generate")
        .arg("--model")
        .arg(dir.path())
        .args(["--prompt", &prompt.join(" "), "--ignore-chat-template"])
        .args(["--temp", "0", "--max-tokens", &greedy.len().to_string()]);
    let out = run(command, Duration::from_secs(60));
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{name}: {stderr}");
    let tokens = String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .map(|t| t.strip_prefix('t').unwrap().parse().unwrap())
        .collect();
    let memory = stderr
        .lines()
        .filter_map(|l| l.strip_prefix("Memory of rank "))
        .map(|l| {
            let numbers: Vec<f64> = l
                .split(|c: char| !(c.is_ascii_digit() || c == '.'))
                .filter_map(|n| n.parse().ok())
                .collect();
            (numbers[1], numbers[2])
        })
        .collect();
    Run {
        tokens,
        memory,
        stderr,
    }
}

/// The MB of weights one of `ranks` ranks holds, from the checkpoint's header: each tensor
/// split evenly, except what every rank keeps whole (norms, routers, and the key/value
/// projections when there are fewer key/value heads than ranks).
fn expected_share(name: &str, ranks: usize) -> (f64, f64) {
    let dir = fixture(name);
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    let kv_heads = config["num_key_value_heads"].as_u64().unwrap() as usize;
    let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
    let len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&bytes[8..8 + len]).unwrap();
    let (mut whole, mut share) = (0.0, 0.0);
    for (tensor, info) in header.iter().filter(|(k, _)| *k != "__metadata__") {
        let offsets = &info["data_offsets"];
        let size = (offsets[1].as_u64().unwrap() - offsets[0].as_u64().unwrap()) as f64 / 1e6;
        let kept = tensor.contains("norm")
            || tensor.ends_with("mlp.gate.weight")
            || (kv_heads < ranks && (tensor.contains("k_proj") || tensor.contains("v_proj")));
        whole += size;
        share += if kept { size } else { size / ranks as f64 };
    }
    (whole, share)
}

/// Two ranks give one process's greedy tokens, which are Transformers'; the output appears
/// once; each rank holds its share of the weights (about half) and never more than 0.65 of
/// the whole model while loading.
fn two_ranks_match_one(name: &str) {
    let (_, greedy) = prompt_and_greedy(name);
    let one = generate(name, None);
    let two = generate(name, Some(2));
    assert_eq!(
        one.tokens, greedy,
        "{name}: one process against Transformers"
    );
    assert_eq!(two.tokens, greedy, "{name}: two ranks against Transformers");
    assert_eq!(
        two.stderr.matches("Generation:").count(),
        1,
        "{}",
        two.stderr
    );
    assert!(two
        .stderr
        .contains("Ranks: 2 (tensor parallel, ring backend)"));
    assert_eq!(one.memory.len(), 1);
    assert_eq!(two.memory.len(), 2, "{}", two.stderr);
    let (whole, share) = expected_share(name, 2);
    let resident = one.memory[0].0;
    eprintln!("{name}: one process {resident:.3} MB (checkpoint {whole:.3})");
    assert!(
        (resident - whole).abs() <= MEMORY_TOLERANCE_MB,
        "{name}: {resident} against {whole}"
    );
    for (rank, &(resident, peak)) in two.memory.iter().enumerate() {
        eprintln!("{name}: rank {rank}: {resident:.3} MB (share {share:.3}, {:.3} of the whole), peak {peak:.3} MB ({:.3})", resident / whole, peak / whole);
        assert!(
            (resident - share).abs() <= MEMORY_TOLERANCE_MB,
            "{name} rank {rank}: holds {resident} MB, its share is {share:.4}"
        );
        assert!(
            peak / whole <= 0.65,
            "{name} rank {rank}: peak {peak} MB of {whole:.3}"
        );
    }
}

/// MLX's own arrays besides the weights (RoPE frequencies) and the report's rounding.
const MEMORY_TOLERANCE_MB: f64 = 0.002;

#[test]
fn dense_llama_on_two_ranks_matches_one_process() {
    // 4 query heads and 2 key/value heads, untied output layer.
    two_ranks_match_one("llama/llama3-untied");
}

#[test]
fn qwen3_moe_on_two_ranks_matches_one_process() {
    // 4 experts (2 per rank) stored per expert, 1 key/value head (held by both ranks).
    two_ranks_match_one("qwen3_moe/hub");
}

#[test]
fn mixtral_with_tied_embeddings_on_two_ranks_matches_one_process() {
    two_ranks_match_one("mixtral/default");
}

#[test]
fn heads_that_do_not_divide_are_a_typed_error_on_every_rank() {
    let dir = model_dir("llama/llama3-untied");
    let mut command = cli();
    command
        .args(["launch", "-n", "3", "generate", "--model"])
        .arg(dir.path())
        .args(["--prompt", "t1 t2", "--max-tokens", "2"]);
    let out = run(command, Duration::from_secs(60));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("tensor parallelism over 3 ranks: num_attention_heads: 4 query heads do not divide over 3 ranks"),
        "{stderr}"
    );
}

#[test]
fn a_family_without_a_tensor_parallel_form_is_refused() {
    let mut command = cli();
    command
        .args(["launch", "-n", "2", "info", "--model"])
        .arg(fixture("mamba/default"));
    let out = run(command, Duration::from_secs(60));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("tensor parallelism over 2 ranks") && stderr.contains("Mamba"),
        "{stderr}"
    );
}

/// A NaN in the rows only rank 1 reads: rank 1 fails loading, rank 0 (which never reads
/// them) is stopped instead of waiting for it forever, and rank 1's error is shown.
#[test]
fn a_failing_rank_stops_the_others_and_its_error_is_shown() {
    let dir = model_dir("llama/llama3-untied");
    let path = dir.path().join("model.safetensors");
    let mut bytes = std::fs::read(&path).unwrap();
    let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + header_len]).unwrap();
    let name = "model.layers.1.mlp.gate_proj.weight";
    let start = header[name]["data_offsets"][0].as_u64().unwrap() as usize;
    let end = header[name]["data_offsets"][1].as_u64().unwrap() as usize;
    // The last element: row 127 of 128, in rank 1's half.
    let at = 8 + header_len + end - 4;
    assert!(at > 8 + header_len + start);
    bytes[at..at + 4].copy_from_slice(&f32::NAN.to_le_bytes());
    std::fs::write(&path, bytes).unwrap();

    let mut command = cli();
    command
        .args(["launch", "-n", "2", "generate", "--model"])
        .arg(dir.path())
        .args(["--prompt", "t1 t2", "--max-tokens", "2"]);
    let out = run(command, Duration::from_secs(60));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains(&format!("rank 1: error: weight `{name}`"))
            && stderr.contains("holds NaN or infinite values"),
        "{stderr}"
    );
    // One process reads the whole tensor and finds it too.
    let mut command = cli();
    command.args(["generate", "--model"]).arg(dir.path()).args([
        "--prompt",
        "t1 t2",
        "--max-tokens",
        "2",
    ]);
    let single = run(command, Duration::from_secs(60));
    assert!(String::from_utf8_lossy(&single.stderr).contains("holds NaN"));
}

#[test]
fn a_bad_ring_environment_is_a_typed_error() {
    let hosts = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(hosts.path(), r#"[["127.0.0.1:1"], ["127.0.0.1:2"]]"#).unwrap();
    let bad = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(bad.path(), r#"[["127.0.0.1"]]"#).unwrap();
    let hosts = hosts.path().to_str().unwrap();
    let bad = bad.path().to_str().unwrap();
    for (env, expected) in [
        (
            vec![("MLX_RANK", "0")],
            "$MLX_HOSTFILE: not set, but MLX_RANK is".to_owned(),
        ),
        (
            vec![("MLX_HOSTFILE", hosts)],
            "$MLX_RANK: not set, but MLX_HOSTFILE is".to_owned(),
        ),
        (
            vec![("MLX_RANK", "two"), ("MLX_HOSTFILE", hosts)],
            "$MLX_RANK: `two` is not a rank".to_owned(),
        ),
        (
            vec![("MLX_RANK", "2"), ("MLX_HOSTFILE", hosts)],
            format!("$MLX_RANK: rank 2 is not among the 2 ranks of {hosts}"),
        ),
        (
            vec![("MLX_RANK", "0"), ("MLX_HOSTFILE", bad)],
            format!("hostfile {bad}: rank 0: `127.0.0.1`: no `:port`"),
        ),
        (
            vec![
                ("MLX_RANK", "0"),
                ("MLX_HOSTFILE", "/nonexistent/hosts.json"),
            ],
            "/nonexistent/hosts.json: No such file".to_owned(),
        ),
    ] {
        let mut command = cli();
        command
            .args(["info", "--model"])
            .arg(fixture("llama/llama3-untied"))
            .envs(env.iter().copied());
        let out = run(command, Duration::from_secs(30));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{env:?}");
        assert!(stderr.contains(&expected), "{env:?}: {stderr}");
    }
    // The launcher checks a hostfile and refuses what it cannot run.
    for (args, expected) in [
        (vec!["launch", "--hostfile", bad, "info"], "no `:port`"),
        (vec!["launch", "-n", "1", "info"], "at least 2 processes"),
        (vec!["launch", "-n", "2", "chat"], "not `chat`"),
        (
            vec!["launch", "--hostfile", hosts, "--ranks", "5", "info"],
            "--ranks 5",
        ),
        (
            vec!["launch", "-n", "3", "--hostfile", hosts, "info"],
            "-n 3 but",
        ),
    ] {
        let mut command = cli();
        command.args(&args);
        let out = run(command, Duration::from_secs(30));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?}");
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
    }
}

/// Run as one rank of [`collectives_match_closed_forms`] (the test binary started again with
/// MLX's ring environment): checks all_sum, all_gather and send/recv on this rank.
fn collectives_on_this_rank() {
    let group = Group::init(Backend::Ring).unwrap();
    let (rank, size) = (group.rank(), group.size());
    assert_eq!(size, 2);
    let x: Vec<f32> = (1..=6).map(|i| (rank + 1) as f32 * i as f32).collect();
    let x = mlx_rs::Array::from_slice(&x, &[2, 3]);
    // Σ_r (r + 1)·i = 3·i for two ranks.
    let sum = group.all_sum(&x).unwrap();
    let expected: Vec<f32> = (1..=6).map(|i| 3.0 * i as f32).collect();
    assert_eq!(sum.as_slice::<f32>(), expected.as_slice());
    // Rank 0's rows, then rank 1's.
    let gathered = group.all_gather(&x).unwrap();
    assert_eq!(gathered.shape(), &[4, 3]);
    let expected: Vec<f32> = (1..=2)
        .flat_map(|r| (1..=6).map(move |i| (r * i) as f32))
        .collect();
    assert_eq!(gathered.as_slice::<f32>(), expected.as_slice());
    let other = 1 - rank;
    if rank == 0 {
        group
            .send(&mlx_rs::Array::from_slice(&[7i32, 8, 9], &[3]), other)
            .unwrap()
            .eval()
            .unwrap();
    } else {
        let got = group.recv(&[3], mlx_rs::Dtype::Int32, other).unwrap();
        assert_eq!(got.as_slice::<i32>(), &[7, 8, 9]);
    }
    // Not itself, and not a rank that does not exist.
    assert!(group.send(&x, rank).is_err());
    assert!(group.recv(&[1], mlx_rs::Dtype::Int32, 2).is_err());
    assert!(
        group.split(0, rank).is_err(),
        "the ring backend cannot split"
    );
}

#[test]
fn collectives_match_closed_forms() {
    if std::env::var_os("MLX_MODELS_TEST_RANK").is_some() {
        return collectives_on_this_rank();
    }
    let hosts = mlx_models::distributed::local_hostfile(2).unwrap();
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), hosts.to_json()).unwrap();
    let ranks: Vec<_> = (0..2)
        .map(|rank| {
            Command::new(std::env::current_exe().unwrap())
                .args(["collectives_match_closed_forms", "--exact", "--nocapture"])
                .env("MLX_MODELS_TEST_RANK", "1")
                .env("MLX_RANK", rank.to_string())
                .env("MLX_HOSTFILE", file.path())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for (rank, child) in ranks.into_iter().enumerate() {
        let out = child.wait_with_output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && text.contains("1 passed"),
            "rank {rank}: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// Two machines, played by two launchers sharing one hostfile, each starting its own rank
/// (`--ranks`): rank 0's launcher shows the output, the same as one process's.
#[test]
fn one_launcher_per_machine_with_a_hostfile() {
    let name = "llama/llama3-untied";
    let dir = model_dir(name);
    let (prompt, greedy) = prompt_and_greedy(name);
    let prompt: Vec<String> = prompt.iter().map(|i| format!("t{i}")).collect();
    let hosts = tempfile::NamedTempFile::new().unwrap();
    let ranks = mlx_models::distributed::local_hostfile(2).unwrap();
    std::fs::write(hosts.path(), ranks.to_json()).unwrap();
    let machine = |rank: &str| {
        let mut command = cli();
        command
            .args(["launch", "--hostfile"])
            .arg(hosts.path())
            .args(["--ranks", rank, "generate", "--model"])
            .arg(dir.path())
            .args(["--prompt", &prompt.join(" "), "--ignore-chat-template"])
            .args(["--temp", "0", "--max-tokens", &greedy.len().to_string()]);
        command
    };
    let other = std::thread::spawn({
        let command = machine("1");
        move || run(command, Duration::from_secs(60))
    });
    let first = run(machine("0"), Duration::from_secs(60));
    let other = other.join().unwrap();
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    assert!(
        other.status.success(),
        "{}",
        String::from_utf8_lossy(&other.stderr)
    );
    let tokens: Vec<i64> = String::from_utf8_lossy(&first.stdout)
        .split_whitespace()
        .map(|t| t.strip_prefix('t').unwrap().parse().unwrap())
        .collect();
    assert_eq!(tokens, greedy);
    assert!(other.stdout.is_empty(), "only rank 0's machine prints");
}

/// A quantized checkpoint (8-bit, groups of 32, as `convert` writes it) splits too:
/// packed weights, scales and biases cut at whole groups give one process's tokens.
#[test]
fn a_quantized_model_on_two_ranks_matches_one_process() {
    let source = model_dir("llama/llama3-untied");
    let quantized = tempfile::tempdir().unwrap();
    let out = quantized.path().join("q8");
    let mut command = cli();
    command
        .args(["convert", "--model"])
        .arg(source.path())
        .arg("--out")
        .arg(&out)
        .args(["--quantize", "--bits", "8", "--group-size", "32"]);
    assert!(run(command, Duration::from_secs(60)).status.success());
    std::fs::copy(
        source.path().join("tokenizer.json"),
        out.join("tokenizer.json"),
    )
    .unwrap();
    let generate = |ranks: Option<&str>| {
        let mut command = cli();
        if let Some(n) = ranks {
            command.args(["launch", "-n", n]);
        }
        command
            .args(["generate", "--model"])
            .arg(&out)
            .args([
                "--prompt",
                "t103 t193 t251 t174 t120 t168",
                "--ignore-chat-template",
            ])
            .args(["--temp", "0", "--max-tokens", "16"]);
        let out = run(command, Duration::from_secs(60));
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        (
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (one, _) = generate(None);
    let (two, stderr) = generate(Some("2"));
    assert_eq!(one.split_whitespace().count(), 16);
    assert_eq!(one, two);
    assert_eq!(stderr.matches("Memory of rank").count(), 2, "{stderr}");
}
