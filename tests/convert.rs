//! `convert`: GGUF (or any source) to a Hugging Face-format directory, cast or quantized,
//! with the drift report. Sources: the tiny llama GGUF of `tests/fixtures/gguf-tiny`, and
//! the real SmolLM2 GGUF, whose float32 conversion must still match Transformers.

use mlx_models::convert::{convert, ConvertOptions};
use mlx_models::load::{load_dir, LoadOptions, ModelSource};
use mlx_models::models::LanguageModel;
use mlx_models::tap::Tap;
use mlx_models::weights::read_safetensors;
use mlx_models::{default_model, Error};
use mlx_rs::{Array, Dtype};
use serde_json::Value;
use std::path::{Path, PathBuf};

fn tiny() -> ModelSource {
    ModelSource::Gguf(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gguf-tiny/tiny.gguf"),
    )
}

fn read_json(path: PathBuf) -> Value {
    serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap()
}

#[test]
fn a_float32_conversion_reproduces_the_source() {
    let out = tempfile::tempdir().unwrap();
    let options = ConvertOptions::new().drift_tokens(8).report(true);
    let report = convert(&tiny(), out.path(), &options).unwrap();
    let drift = report.drift.unwrap();
    eprintln!("{drift}");
    for file in [
        "config.json",
        "model.safetensors",
        "model.safetensors.index.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
        "drift.json",
    ] {
        assert!(out.path().join(file).is_file(), "{file}");
    }
    assert_eq!(report.quantized_tensors, 0);
    // The GGUF's affine blocks are dequantized exactly: only the matmul order differs
    // (measured 1.2e-7).
    assert!(drift.max_abs_logit_diff < 1e-5, "{drift}");
    assert!(drift.max_layer_rel_error() < 1e-5, "{drift}");
    assert_eq!(drift.greedy_tokens_equal, drift.greedy_tokens);
    assert_eq!(drift.top1_equal, drift.prompts.len());
    let (a, b) = (
        drift.source_perplexity.unwrap(),
        drift.converted_perplexity.unwrap(),
    );
    assert!((a - b).abs() < 1e-4 * a, "perplexity {a} vs {b}");
    // Every layer (the tiny model has one) is compared.
    for name in ["embeddings", "layers.0", "norm", "logits"] {
        assert!(
            drift.layers.iter().any(|l| l.name == name),
            "{name}: {drift}"
        );
    }

    let model = load_dir(out.path(), &LoadOptions::new()).unwrap();
    assert_eq!(model.info().quantization, None);
    assert_eq!(model.info().dtype, Dtype::Float32);
    // Same tokenizer, special tokens and chat template.
    let source = mlx_models::load::load(&tiny(), &LoadOptions::new()).unwrap();
    let text = "the thing, ab!";
    assert_eq!(
        model.tokenizer().encode(text, true).unwrap(),
        source.tokenizer().encode(text, true).unwrap()
    );
    assert_eq!(
        model.tokenizer().eos_token_ids(),
        source.tokenizer().eos_token_ids()
    );
    assert_eq!(
        model.tokenizer().chat_template(),
        source.tokenizer().chat_template()
    );
}

#[test]
fn bf16_conversion_casts_every_float() {
    let out = tempfile::tempdir().unwrap();
    let options = ConvertOptions::new()
        .dtype(Dtype::Bfloat16)
        .drift_tokens(2)
        .report(true);
    let report = convert(&tiny(), out.path(), &options).unwrap();
    let tensors = read_safetensors(&out.path().join("model.safetensors")).unwrap();
    assert!(tensors.values().all(|t| t.dtype() == Dtype::Bfloat16));
    assert_eq!(
        read_json(out.path().join("config.json"))["torch_dtype"],
        "bfloat16"
    );
    let model = load_dir(out.path(), &LoadOptions::new()).unwrap();
    assert_eq!(model.info().dtype, Dtype::Bfloat16);
    assert!(report.drift.unwrap().max_abs_logit_diff.is_finite());
}

#[test]
fn quantized_conversion_is_mlx_quantization_of_the_exact_weights() {
    let out = tempfile::tempdir().unwrap();
    let options = ConvertOptions::new()
        .quantize(4, 32)
        .drift_tokens(4)
        .report(true);
    let report = convert(&tiny(), out.path(), &options).unwrap();
    let drift = report.drift.unwrap();
    eprintln!("{drift}");
    // token_embd and the seven projections.
    assert_eq!(report.quantized_tensors, 8);
    let config = read_json(out.path().join("config.json"));
    assert_eq!(
        config["quantization"],
        serde_json::json!({"group_size": 32, "bits": 4, "mode": "affine"})
    );
    let model = load_dir(out.path(), &LoadOptions::new()).unwrap();
    let q = model.info().quantization.unwrap();
    assert_eq!((q.bits, q.group_size), (4, 32));
    assert!(drift.max_abs_logit_diff.is_finite());

    // Each matrix is quantized once, from the source's exact float32 values (a GGUF Q4_1
    // block and an F16 one here): the same bits as MLX's quantize of those values.
    let ModelSource::Gguf(path) = tiny() else {
        unreachable!()
    };
    let source = mlx_models::gguf::read(&path).unwrap();
    let root = source.weights.root();
    let tensors = read_safetensors(&out.path().join("model.safetensors")).unwrap();
    for name in [
        "model.layers.0.mlp.gate_proj",
        "model.layers.0.self_attn.q_proj",
    ] {
        let exact = if root.contains(&format!("{name}.scales")) {
            let w = root.get_any_shape(&format!("{name}.weight")).unwrap();
            let s = root.get_any_shape(&format!("{name}.scales")).unwrap();
            let b = root.get_any_shape(&format!("{name}.biases")).unwrap();
            mlx_rs::ops::dequantize(&w, &s, &b, 32, 4).unwrap()
        } else {
            root.get_any_shape(&format!("{name}.weight"))
                .unwrap()
                .as_dtype(Dtype::Float32)
                .unwrap()
        };
        let (w, s, b) = mlx_rs::ops::quantize(&exact, 32, 4).unwrap();
        for (ours, theirs) in [("weight", &w), ("scales", &s), ("biases", &b)] {
            let ours = &tensors[&format!("{name}.{ours}")];
            assert_eq!(ours.shape(), theirs.shape(), "{name}");
            let equal = ours.eq(theirs).unwrap().all(None).unwrap();
            assert!(equal.item_exact::<bool>(), "{name}: {ours:?}");
        }
    }
}

#[test]
fn progress_is_reported_for_every_tensor_and_byte() {
    use mlx_models::convert::ConvertProgress;
    use std::sync::{Arc, Mutex};
    let events = Arc::new(Mutex::new(Vec::new()));
    let seen = Arc::clone(&events);
    let out = tempfile::tempdir().unwrap();
    let options = ConvertOptions::new()
        .quantize(8, 32)
        .progress(move |p| seen.lock().unwrap().push(p));
    let report = convert(&tiny(), out.path(), &options).unwrap();
    assert!(report.drift.is_none());
    let events = events.lock().unwrap();
    assert_eq!(events.first(), Some(&ConvertProgress::Reading));
    let converted: Vec<(usize, usize)> = events
        .iter()
        .filter_map(|p| match p {
            ConvertProgress::Converting { done, total, .. } => Some((*done, *total)),
            _ => None,
        })
        .collect();
    let total = converted[0].1;
    assert_eq!(
        converted,
        (1..=total).map(|d| (d, total)).collect::<Vec<_>>()
    );
    assert_eq!(
        events.last(),
        Some(&ConvertProgress::Writing {
            done: report.bytes,
            total: report.bytes
        })
    );
}

#[test]
fn options_mlx_cannot_quantize_to_are_refused() {
    let out = tempfile::tempdir().unwrap();
    for (bits, group) in [(7, 64), (4, 16), (1, 32)] {
        match convert(
            &tiny(),
            out.path(),
            &ConvertOptions::new().quantize(bits, group),
        ) {
            Err(Error::Convert { message }) => assert!(message.contains("affine"), "{message}"),
            other => panic!("{bits}/{group}: expected Error::Convert, got {other:?}"),
        }
    }
}

/// The real SmolLM2 GGUF converted to float32 safetensors still matches Transformers'
/// first-step logits (the SmolLM2 test's tolerance, 2.5e-4; measured 7e-5).
#[test]
fn smollm2_converted_to_float32_matches_transformers() {
    let out = tempfile::tempdir().unwrap();
    let options = ConvertOptions::new()
        .drift_prompts(vec!["What is the capital of France?".into()])
        .drift_tokens(2)
        .report(true);
    let report = convert(&ModelSource::Default, out.path(), &options).unwrap();
    eprintln!("{}", report.drift.unwrap());
    assert!(default_model::cached_path().is_some());
    let model = load_dir(out.path(), &LoadOptions::new()).unwrap();
    let reference = read_json(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/smollm2-135m-instruct/logits.json"),
    );
    let mut worst = 0f32;
    for prompt in reference["prompts"].as_array().unwrap().iter().take(2) {
        let ids: Vec<i32> = prompt["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_i64().unwrap() as i32)
            .collect();
        let network: &dyn LanguageModel = model.network();
        let logits = network
            .forward(
                &Array::from_slice(&ids, &[1, ids.len() as i32]),
                &mut network.new_cache(),
                &mut Tap::off(),
            )
            .unwrap();
        let last = logits
            .take_axis(Array::from_int(ids.len() as i32 - 1), 1)
            .unwrap();
        let row = last.as_slice::<f32>();
        let first = &prompt["first_step"];
        for (id, logit) in first["top_ids"]
            .as_array()
            .unwrap()
            .iter()
            .zip(first["top_logits"].as_array().unwrap())
        {
            let diff = (row[id.as_u64().unwrap() as usize] - logit.as_f64().unwrap() as f32).abs();
            worst = worst.max(diff);
        }
    }
    eprintln!("converted SmolLM2 vs Transformers: max |Δlogit| {worst:.3e}");
    assert!(worst <= 2.5e-4, "{worst:e}");
}

/// A checkpoint whose projections Transformers keeps as `Conv1D` (`[in, out]`, OpenAI GPT's)
/// is brought to linear layers before it is quantized: its float32 conversion gives the
/// source's logits (the loader does not transpose it twice), its 8-bit one loads with every
/// projection quantized.
#[test]
fn conv1d_checkpoints_convert_to_linear_layers() {
    use mlx_models::config::ConfigFile;
    use mlx_models::convert::convert_weights;
    use mlx_models::weights::Weights;
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/openai-gpt/default");
    let config = ConfigFile::read(&dir.join("config.json")).unwrap();
    let ids = Array::from_slice(&[1i32, 5, 9, 2, 7], &[1, 5]);
    let logits = |model: &dyn LanguageModel| {
        model
            .forward(&ids, &mut model.new_cache(), &mut Tap::off())
            .unwrap()
    };
    let source = mlx_models::models::build(&config, Weights::from_dir(&dir).unwrap()).unwrap();
    let expected = logits(source.as_ref());
    for (options, tolerance) in [
        (ConvertOptions::new().dtype(Dtype::Float32), 1e-5),
        // 8-bit drift of these logits: measured 7.8e-2.
        (ConvertOptions::new().quantize(8, 64), 0.1),
    ] {
        let converted =
            convert_weights(&config, Weights::from_dir(&dir).unwrap(), None, &options).unwrap();
        assert!(
            converted
                .tensors
                .keys()
                .any(|n| n.starts_with("model.layers.0.")),
            "the converter writes the loaded layout"
        );
        let converted_config = ConfigFile {
            path: config.path.clone(),
            value: converted.config,
        };
        let model = mlx_models::models::build(
            &converted_config,
            Weights::new(converted.tensors, dir.clone()),
        )
        .unwrap();
        let got = logits(model.as_ref());
        let err = got
            .subtract(&expected)
            .unwrap()
            .abs()
            .unwrap()
            .max(None)
            .unwrap()
            .item_exact::<f32>();
        assert!(err < tolerance, "max-abs {err}");
    }
}
