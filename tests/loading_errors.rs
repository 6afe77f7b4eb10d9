//! Loading a broken model directory fails with a typed error that names the file, field or
//! tensor at fault. Each test copies a committed fixture into a temporary directory, breaks
//! one thing, and matches on the `mlx_models::Error` variant (not on its message).
//!
//! ```text
//! cargo test --test loading_errors
//! ```

use mlx_models::load::load_model_dir;
use mlx_models::models::LanguageModel;
use mlx_models::weights::read_safetensors;
use mlx_models::Error;
use mlx_rs::Array;
use proptest::test_runner::{Config as ProptestConfig, TestCaseError, TestRunner};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use tempfile::TempDir;

fn fixture_dir(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join("fixtures")
        .join(name)
}

/// A private copy of a fixture's model directory (config.json and model.safetensors).
fn copy_fixture(name: &str) -> TempDir {
    let dir = tempfile::tempdir().expect("temp dir");
    for file in ["config.json", "model.safetensors"] {
        std::fs::copy(fixture_dir(name).join(file), dir.path().join(file))
            .unwrap_or_else(|e| panic!("copy {name}/{file}: {e}"));
    }
    dir
}

fn read_config(dir: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap()
}

fn write_config(dir: &Path, config: &Value) {
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_string_pretty(config).unwrap(),
    )
    .unwrap();
}

/// Edits the copied config.json in place.
fn edit_config(dir: &Path, edit: impl FnOnce(&mut serde_json::Map<String, Value>)) {
    let mut config = read_config(dir);
    edit(config.as_object_mut().expect("config.json is an object"));
    write_config(dir, &config);
}

fn load(dir: &Path) -> Result<Box<dyn LanguageModel>, Error> {
    load_model_dir(dir, None)
}

/// The error loading `dir` must give.
fn load_error(dir: &Path) -> Error {
    match load(dir) {
        Ok(_) => panic!("{} loaded although it is broken", dir.display()),
        Err(e) => {
            eprintln!("{e}");
            e
        }
    }
}

/// Asserts `error` is `Error::Config` for `field` of `dir`'s config.json and returns its message.
fn assert_config_error(error: Error, dir: &Path, field: &str) -> String {
    match error {
        Error::Config {
            path,
            field: f,
            message,
        } => {
            assert_eq!(
                path,
                dir.join("config.json"),
                "the error names the config file"
            );
            assert_eq!(f, field, "the error names the field (message: {message})");
            message
        }
        other => panic!("expected Error::Config for `{field}`, got {other:?}"),
    }
}

#[test]
fn unbroken_copies_load() {
    // Control for every test below: the copies themselves load.
    for name in [
        "llama/default-tied",
        "llama/llama3-untied",
        "llama/longrope",
        "mistral/default",
    ] {
        let dir = copy_fixture(name);
        if let Err(e) = load(dir.path()) {
            panic!("an unmodified copy of {name} does not load: {e}");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// config.json
// ---------------------------------------------------------------------------------------------

#[test]
fn missing_hidden_size_names_the_field() {
    let dir = copy_fixture("llama/default-tied");
    edit_config(dir.path(), |c| {
        c.remove("hidden_size");
    });
    // serde reports a missing field at the struct that lacks it, so `field` is the config's
    // root (`.`) and serde's message names the missing field; accept either placement.
    match load_error(dir.path()) {
        Error::Config {
            path,
            field,
            message,
        } => {
            assert_eq!(path, dir.path().join("config.json"));
            assert!(
                field == "hidden_size"
                    || (field == "." && message.contains("missing field `hidden_size`")),
                "field `{field}`, message `{message}`"
            );
        }
        other => panic!("expected Error::Config for hidden_size, got {other:?}"),
    }
}

#[test]
fn wrongly_typed_num_attention_heads_names_the_field() {
    let dir = copy_fixture("llama/default-tied");
    edit_config(dir.path(), |c| {
        c.insert("num_attention_heads".into(), json!("four"));
    });
    assert_config_error(load_error(dir.path()), dir.path(), "num_attention_heads");
}

#[test]
fn key_value_heads_that_do_not_divide_the_heads_are_refused() {
    let dir = copy_fixture("llama/default-tied");
    edit_config(dir.path(), |c| {
        c.insert("num_key_value_heads".into(), json!(3));
    });
    assert_config_error(load_error(dir.path()), dir.path(), "num_key_value_heads");
}

#[test]
fn unsupported_activation_is_refused() {
    // `quick_gelu` is a valid activation in Transformers (ACT2FN) that has no block here.
    let dir = copy_fixture("llama/default-tied");
    edit_config(dir.path(), |c| {
        c.insert("hidden_act".into(), json!("quick_gelu"));
    });
    let message = assert_config_error(load_error(dir.path()), dir.path(), "hidden_act");
    assert!(message.contains("quick_gelu"), "{message}");
}

#[test]
fn xielu_without_its_parameters_names_the_missing_weight() {
    // A Llama checkpoint told to use xIELU lacks the activation's learned parameters.
    let dir = copy_fixture("llama/default-tied");
    edit_config(dir.path(), |c| {
        c.insert("hidden_act".into(), json!("xielu"));
    });
    match load_error(dir.path()) {
        Error::MissingWeight { name, .. } => assert!(name.contains("mlp.act_fn."), "{name}"),
        other => panic!("expected a missing xIELU parameter, got {other:?}"),
    }
}

#[test]
fn unknown_rope_type_names_the_field_in_either_style() {
    // Transformers 5 style.
    let dir = copy_fixture("llama/default-tied");
    edit_config(dir.path(), |c| {
        c["rope_parameters"]["rope_type"] = json!("ntk-by-parts");
    });
    let message = assert_config_error(
        load_error(dir.path()),
        dir.path(),
        "rope_parameters.rope_type",
    );
    assert!(
        message.contains("ntk-by-parts") && message.contains("llama3"),
        "{message}"
    );

    // Hub style, with the old `type` key.
    let dir = copy_fixture("llama/llama3-untied");
    edit_config(dir.path(), |c| {
        let scaling = c["rope_scaling"].as_object_mut().unwrap();
        scaling.remove("rope_type");
        scaling.insert("type".into(), json!("ntk-by-parts"));
    });
    assert_config_error(load_error(dir.path()), dir.path(), "rope_scaling.rope_type");
}

#[test]
fn longrope_factor_lists_of_the_wrong_length_name_the_list() {
    for list in ["short_factor", "long_factor"] {
        let dir = copy_fixture("llama/longrope");
        edit_config(dir.path(), |c| {
            // 8 entries for 16 rotated dims; drop one.
            let factors = c["rope_parameters"][list].as_array_mut().unwrap();
            assert_eq!(factors.len(), 8);
            factors.pop();
        });
        let message = assert_config_error(
            load_error(dir.path()),
            dir.path(),
            &format!("rope_parameters.{list}"),
        );
        assert!(message.contains('7') && message.contains('8'), "{message}");
    }
}

#[test]
fn odd_rotated_dims_are_refused() {
    let dir = copy_fixture("llama/default-tied");
    edit_config(dir.path(), |c| {
        // 16 * 0.4375 = 7 rotated features: not pairs.
        c["rope_parameters"]["partial_rotary_factor"] = json!(0.4375);
    });
    assert_config_error(load_error(dir.path()), dir.path(), "partial_rotary_factor");
}

#[test]
fn unknown_model_type_lists_the_supported_ones() {
    let dir = copy_fixture("llama/default-tied");
    edit_config(dir.path(), |c| {
        c.insert("model_type".into(), json!("gpt_neox_unknown"));
    });
    match load_error(dir.path()) {
        Error::UnknownModelType {
            path,
            model_type,
            supported,
        } => {
            assert_eq!(path, dir.path().join("config.json"));
            assert_eq!(model_type, "gpt_neox_unknown");
            assert!(
                supported.contains(&"llama") && supported.contains(&"mistral"),
                "{supported:?}"
            );
        }
        other => panic!("expected UnknownModelType, got {other:?}"),
    }
}

#[test]
fn missing_model_type_names_the_field() {
    let dir = copy_fixture("llama/default-tied");
    edit_config(dir.path(), |c| {
        c.remove("model_type");
    });
    assert_config_error(load_error(dir.path()), dir.path(), "model_type");
}

#[test]
fn malformed_json_is_a_json_error_with_its_position() {
    let dir = copy_fixture("llama/default-tied");
    let text = std::fs::read_to_string(dir.path().join("config.json")).unwrap();
    // Cut the file in the middle of an object.
    std::fs::write(dir.path().join("config.json"), &text[..text.len() / 2]).unwrap();
    match load_error(dir.path()) {
        Error::Json { path, source } => {
            assert_eq!(path, dir.path().join("config.json"));
            assert!(source.line() > 1, "serde reports where: {source}");
        }
        other => panic!("expected Error::Json, got {other:?}"),
    }
}

#[test]
fn a_config_that_is_not_an_object_is_refused() {
    let dir = copy_fixture("llama/default-tied");
    std::fs::write(dir.path().join("config.json"), "[1, 2, 3]").unwrap();
    assert!(matches!(load_error(dir.path()), Error::Config { .. }));
}

#[test]
fn a_missing_directory_is_an_io_error() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such-model");
    match load_error(&missing) {
        Error::Io { path, .. } => assert_eq!(path, missing),
        other => panic!("expected Error::Io, got {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// Weights
// ---------------------------------------------------------------------------------------------

/// Asserts `error` is a safetensors error naming `file`.
fn assert_safetensors_error(error: Error, file: &Path) {
    match error {
        Error::Safetensors { path, message } => assert_eq!(path, file, "{message}"),
        other => panic!(
            "expected Error::Safetensors naming {}, got {other:?}",
            file.display()
        ),
    }
}

#[test]
fn truncated_safetensors_names_the_file() {
    let dir = copy_fixture("llama/default-tied");
    let file = dir.path().join("model.safetensors");
    let bytes = std::fs::read(&file).unwrap();
    let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;

    // The three places a cut can fall: inside the length prefix, inside the JSON header, inside
    // the tensor data (the last byte missing).
    for cut in [0, 4, 8 + header_len / 2, bytes.len() - 1] {
        std::fs::write(&file, &bytes[..cut]).unwrap();
        assert_safetensors_error(load_error(dir.path()), &file);
    }
    // And anywhere.
    let mut runner = TestRunner::new(ProptestConfig {
        cases: 16,
        failure_persistence: None,
        ..Default::default()
    });
    let result = runner.run(&(0..bytes.len()), |cut| {
        std::fs::write(&file, &bytes[..cut]).unwrap();
        match load(dir.path()) {
            Err(Error::Safetensors { path, .. }) if path == file => Ok(()),
            Err(other) => Err(TestCaseError::fail(format!("cut at {cut}: {other:?}"))),
            Ok(_) => Err(TestCaseError::fail(format!("cut at {cut}: loaded"))),
        }
    });
    if let Err(e) = result {
        panic!("truncated model.safetensors: {e}");
    }
}

#[test]
fn wrong_intermediate_size_names_the_first_mismatched_tensor() {
    let dir = copy_fixture("llama/default-tied");
    edit_config(dir.path(), |c| {
        c.insert("intermediate_size".into(), json!(96));
    });
    match load_error(dir.path()) {
        Error::WeightShape {
            path,
            name,
            expected,
            actual,
        } => {
            assert_eq!(path, dir.path());
            assert_eq!(name, "model.layers.0.mlp.gate_proj.weight");
            assert_eq!(expected, [96, 64]);
            assert_eq!(actual, [128, 64]);
        }
        other => panic!("expected WeightShape, got {other:?}"),
    }
}

#[test]
fn wrong_hidden_size_names_the_embeddings() {
    let dir = copy_fixture("llama/default-tied");
    edit_config(dir.path(), |c| {
        c.insert("hidden_size".into(), json!(80));
    });
    match load_error(dir.path()) {
        Error::WeightShape {
            name,
            expected,
            actual,
            ..
        } => {
            assert_eq!(name, "model.embed_tokens.weight");
            assert_eq!(expected, [256, 80]);
            assert_eq!(actual, [256, 64]);
        }
        other => panic!("expected WeightShape, got {other:?}"),
    }
}

/// Rewrites `dir/model.safetensors` as the tensors `edit` leaves.
fn edit_weights(dir: &Path, edit: impl FnOnce(&mut HashMap<String, Array>)) {
    let file = dir.join("model.safetensors");
    let mut tensors = read_safetensors(&file).unwrap();
    edit(&mut tensors);
    std::fs::remove_file(&file).unwrap();
    Array::save_safetensors(&tensors, None, &file).unwrap();
}

#[test]
fn a_missing_tensor_is_named() {
    let dir = copy_fixture("llama/default-tied");
    edit_weights(dir.path(), |t| {
        t.remove("model.layers.1.self_attn.v_proj.weight")
            .expect("present");
    });
    match load_error(dir.path()) {
        Error::MissingWeight { path, name } => {
            assert_eq!(path, dir.path());
            assert_eq!(name, "model.layers.1.self_attn.v_proj.weight");
        }
        other => panic!("expected MissingWeight, got {other:?}"),
    }
}

#[test]
fn unused_tensors_are_named() {
    // A checkpoint with a third layer under a config that says two.
    let dir = copy_fixture("llama/default-tied");
    edit_weights(dir.path(), |t| {
        let extra = t["model.layers.1.input_layernorm.weight"].clone();
        t.insert("model.layers.2.input_layernorm.weight".into(), extra);
    });
    match load_error(dir.path()) {
        Error::UnexpectedWeights { names, .. } => {
            assert_eq!(names, ["model.layers.2.input_layernorm.weight"])
        }
        other => panic!("expected UnexpectedWeights, got {other:?}"),
    }
}

#[test]
fn a_missing_shard_is_named() {
    // Split the checkpoint into two shards with an index, as large checkpoints are stored.
    let dir = copy_fixture("llama/llama3-untied");
    let file = dir.path().join("model.safetensors");
    let tensors = read_safetensors(&file).unwrap();
    std::fs::remove_file(&file).unwrap();
    let shard_of = |name: &str| {
        if name.starts_with("model.layers.1.")
            || name.starts_with("lm_head")
            || name == "model.norm.weight"
        {
            "model-00002-of-00002.safetensors"
        } else {
            "model-00001-of-00002.safetensors"
        }
    };
    let mut weight_map = serde_json::Map::new();
    let mut shards: HashMap<&str, HashMap<String, Array>> = HashMap::new();
    for (name, tensor) in tensors {
        weight_map.insert(name.clone(), json!(shard_of(&name)));
        shards
            .entry(shard_of(&name))
            .or_default()
            .insert(name, tensor);
    }
    assert_eq!(shards.len(), 2);
    for (shard, tensors) in &shards {
        Array::save_safetensors(tensors, None, dir.path().join(shard)).unwrap();
    }
    let index = json!({"metadata": {}, "weight_map": weight_map});
    std::fs::write(
        dir.path().join("model.safetensors.index.json"),
        index.to_string(),
    )
    .unwrap();

    // Control: both shards present, the sharded checkpoint loads.
    if let Err(e) = load(dir.path()) {
        panic!("the sharded checkpoint does not load: {e}");
    }

    let missing = dir.path().join("model-00002-of-00002.safetensors");
    std::fs::remove_file(&missing).unwrap();
    match load_error(dir.path()) {
        Error::Io { path, source } => {
            assert_eq!(path, missing);
            assert_eq!(source.kind(), std::io::ErrorKind::NotFound);
        }
        other => panic!("expected Error::Io naming the missing shard, got {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// Mixtures of experts
// ---------------------------------------------------------------------------------------------

#[test]
fn a_missing_expert_is_named() {
    let dir = copy_fixture("mixtral/hub");
    edit_weights(dir.path(), |t| {
        t.remove("model.layers.1.block_sparse_moe.experts.2.w3.weight")
            .expect("present");
    });
    match load_error(dir.path()) {
        Error::MissingWeight { name, .. } => {
            assert!(
                name.contains("layers.1.") && name.contains("experts.2"),
                "{name}"
            )
        }
        other => panic!("expected MissingWeight, got {other:?}"),
    }
}

#[test]
fn an_expert_beyond_num_experts_is_named() {
    let dir = copy_fixture("mixtral/hub");
    edit_weights(dir.path(), |t| {
        let extra = t["model.layers.0.block_sparse_moe.experts.0.w1.weight"].clone();
        t.insert(
            "model.layers.0.block_sparse_moe.experts.4.w1.weight".into(),
            extra,
        );
    });
    match load_error(dir.path()) {
        Error::UnexpectedWeights { names, .. } => {
            assert!(names[0].contains("experts.4"), "{names:?}")
        }
        other => panic!("expected UnexpectedWeights, got {other:?}"),
    }
}

#[test]
fn top_k_above_the_number_of_experts_names_the_field() {
    let dir = copy_fixture("qwen3_moe/default");
    edit_config(dir.path(), |c| {
        c.insert("num_experts_per_tok".into(), json!(9));
    });
    assert_config_error(load_error(dir.path()), dir.path(), "num_experts_per_tok");
}

#[test]
fn expert_groups_that_do_not_divide_the_experts_name_the_field() {
    let dir = copy_fixture("glm4_moe/grouped");
    edit_config(dir.path(), |c| {
        c.insert("n_group".into(), json!(3));
    });
    assert_config_error(load_error(dir.path()), dir.path(), "n_group");
}

/// gpt-oss as mlx-community converts it: MXFP4 experts (uint32 blocks, uint8 exponent
/// scales, no biases) are refused by name, not fed to the affine kernels.
#[test]
fn mxfp4_experts_are_refused_by_name() {
    let dir = copy_fixture("gpt_oss/hub");
    edit_weights(dir.path(), |t| {
        for layer in 0..2 {
            let p = format!("model.layers.{layer}.mlp.experts");
            t.remove(&format!("{p}.gate_up_proj")).expect("present");
            t.remove(&format!("{p}.gate_up_proj_bias"))
                .expect("present");
            t.remove(&format!("{p}.down_proj")).expect("present");
            t.remove(&format!("{p}.down_proj_bias")).expect("present");
            for (proj, out, inp) in [
                ("gate_proj", 8, 64),
                ("up_proj", 8, 64),
                ("down_proj", 64, 8),
            ] {
                let blocks = vec![0u32; 4 * out * inp / 8];
                let scales = vec![127u8; 4 * out * (inp / 32).max(1)];
                let w = Array::from_slice(&blocks, &[4, out as i32, inp as i32 / 8]);
                let s = Array::from_slice(&scales, &[4, out as i32, (inp as i32 / 32).max(1)]);
                t.insert(format!("{p}.{proj}.weight"), w);
                t.insert(format!("{p}.{proj}.scales"), s);
                t.insert(
                    format!("{p}.{proj}.bias"),
                    Array::from_slice(&vec![0.0f32; 4 * out], &[4, out as i32]),
                );
            }
        }
    });
    match load_error(dir.path()) {
        Error::UnsupportedQuantization { name, message, .. } => {
            assert_eq!(name, "model.layers.0.mlp.switch_mlp.gate_proj.weight");
            assert!(message.contains("MXFP4"), "{message}");
        }
        other => panic!("expected UnsupportedQuantization, got {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// model.safetensors.index.json
// ---------------------------------------------------------------------------------------------

/// `llama/default-tied` as one shard with an index whose `weight_map` `edit` may change.
fn indexed_copy(edit: impl FnOnce(&mut serde_json::Map<String, Value>)) -> TempDir {
    let dir = copy_fixture("llama/default-tied");
    let tensors = read_safetensors(&dir.path().join("model.safetensors")).unwrap();
    std::fs::rename(
        dir.path().join("model.safetensors"),
        dir.path().join("model-00001-of-00001.safetensors"),
    )
    .unwrap();
    let mut map: serde_json::Map<String, Value> = tensors
        .keys()
        .map(|k| (k.clone(), json!("model-00001-of-00001.safetensors")))
        .collect();
    edit(&mut map);
    std::fs::write(
        dir.path().join("model.safetensors.index.json"),
        json!({"metadata": {}, "weight_map": map}).to_string(),
    )
    .unwrap();
    dir
}

fn assert_index_error(dir: &Path, needle: &str) {
    match load_error(dir) {
        Error::WeightIndex { path, message } => {
            assert_eq!(path, dir.join("model.safetensors.index.json"));
            assert!(message.contains(needle), "{message}");
        }
        other => panic!("expected WeightIndex mentioning {needle:?}, got {other:?}"),
    }
}

#[test]
fn an_index_with_one_shard_loads() {
    let dir = indexed_copy(|_| {});
    if let Err(e) = load(dir.path()) {
        panic!("{e}");
    }
}

#[test]
fn index_shards_outside_the_directory_are_refused() {
    for outside in [
        "../model.safetensors",
        "/etc/hostname",
        "a/../../b.safetensors",
        "",
    ] {
        let dir = indexed_copy(|map| {
            map.insert("model.norm.weight".into(), json!(outside));
        });
        assert_index_error(dir.path(), "not a file inside the model directory");
    }
}

#[test]
fn an_index_naming_a_tensor_its_shard_lacks_is_refused() {
    let dir = indexed_copy(|map| {
        map.insert(
            "model.layers.9.mlp.up_proj.weight".into(),
            json!("model-00001-of-00001.safetensors"),
        );
    });
    assert_index_error(dir.path(), "model.layers.9.mlp.up_proj.weight");
    let dir = indexed_copy(|map| map.clear());
    assert_index_error(dir.path(), "no tensors");
}

#[test]
fn a_malformed_index_is_a_json_error() {
    for text in [
        "{",
        "[]",
        r#"{"weight_map": {"a": 3}}"#,
        r#"{"weight_map": []}"#,
    ] {
        let dir = indexed_copy(|_| {});
        let index = dir.path().join("model.safetensors.index.json");
        std::fs::write(&index, text).unwrap();
        match load_error(dir.path()) {
            Error::Json { path, .. } => assert_eq!(path, index),
            other => panic!("{text}: expected Error::Json, got {other:?}"),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Non-finite weights and logits
// ---------------------------------------------------------------------------------------------

#[test]
fn a_nan_in_a_weight_names_the_tensor() {
    let dir = copy_fixture("llama/default-tied");
    let name = "model.layers.1.mlp.down_proj.weight";
    edit_weights(dir.path(), |t| {
        let w = &t[name];
        let mut values = w.as_slice::<f32>().to_vec();
        values[17] = f32::NAN;
        let shape = w.shape().to_vec();
        t.insert(name.into(), Array::from_slice(&values, &shape));
    });
    match load_error(dir.path()) {
        Error::NonFiniteWeight { path, name: n } => {
            assert_eq!(path, dir.path());
            assert_eq!(n, name);
        }
        other => panic!("expected NonFiniteWeight, got {other:?}"),
    }
}

#[test]
fn logits_that_overflow_name_the_step() {
    // Finite weights whose products overflow: the final norm scaled to 1e38.
    let dir = copy_fixture("llama/default-tied");
    edit_weights(dir.path(), |t| {
        let w = &t["model.norm.weight"];
        let big = vec![1e38f32; w.size()];
        let shape = w.shape().to_vec();
        t.insert("model.norm.weight".into(), Array::from_slice(&big, &shape));
    });
    let model = load(dir.path()).unwrap();
    match mlx_models::generate::greedy(model.as_ref(), &[1, 2, 3], 4) {
        Err(Error::NonFiniteLogits { step }) => assert_eq!(step, 0),
        other => panic!("expected NonFiniteLogits, got {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// GGUF (tests/fixtures/gguf-tiny: a complete one-layer llama written by gguf-py)
// ---------------------------------------------------------------------------------------------

fn tiny_gguf() -> Vec<u8> {
    std::fs::read(fixture_dir("gguf-tiny/tiny.gguf")).unwrap()
}

/// The byte offset of the ggml type field of tensor `name` (from `tiny.fields.json`).
fn type_field(name: &str) -> usize {
    let meta: Value = serde_json::from_str(
        &std::fs::read_to_string(fixture_dir("gguf-tiny/tiny.fields.json")).unwrap(),
    )
    .unwrap();
    meta["fields"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| f["field"] == name && f["width"] == 4)
        .map(|f| f["offset"].as_u64().unwrap() as usize)
        .next_back()
        .unwrap()
}

fn gguf_error(bytes: Vec<u8>) -> Error {
    use mlx_models::gguf::GgufFile;
    use mlx_models::load::{load_gguf_file, LoadOptions};
    let result = GgufFile::from_bytes("broken.gguf", bytes)
        .and_then(|file| load_gguf_file(&file, &LoadOptions::new()));
    match result {
        Ok(_) => panic!("a broken GGUF loaded"),
        Err(e) => {
            eprintln!("{e}");
            e
        }
    }
}

fn assert_gguf_invalid(error: Error, offset: u64, field: &str) {
    match error {
        Error::GgufInvalid {
            offset: o,
            field: f,
            path,
            ..
        } => {
            assert_eq!(path, Path::new("broken.gguf"));
            assert_eq!((o, f.as_str()), (offset, field));
        }
        other => panic!("expected GgufInvalid at {offset} `{field}`, got {other:?}"),
    }
}

#[test]
fn gguf_header_errors_name_the_offset_and_field() {
    let good = tiny_gguf();
    let mut bytes = good.clone();
    bytes[0] = b'X';
    assert_gguf_invalid(gguf_error(bytes), 0, "magic");

    let mut bytes = good.clone();
    bytes[4..8].copy_from_slice(&1u32.to_le_bytes());
    assert_gguf_invalid(gguf_error(bytes), 4, "version");

    let mut bytes = good.clone();
    bytes[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
    assert_gguf_invalid(gguf_error(bytes), 8, "tensor_count");

    // The first key's length claims more bytes than the file has.
    let mut bytes = good.clone();
    bytes[24..32].copy_from_slice(&(1u64 << 40).to_le_bytes());
    assert_gguf_invalid(gguf_error(bytes), 24, "metadata key #0");

    // Cut inside the metadata.
    assert!(matches!(
        gguf_error(good[..200].to_vec()),
        Error::GgufInvalid { .. }
    ));

    // An unknown ggml type.
    let mut bytes = good.clone();
    let at = type_field("blk.0.ffn_down.weight");
    bytes[at..at + 4].copy_from_slice(&99u32.to_le_bytes());
    match gguf_error(bytes) {
        Error::GgufInvalid { field, message, .. } => {
            assert_eq!(field, "blk.0.ffn_down.weight");
            assert!(message.contains("99"), "{message}");
        }
        other => panic!("expected GgufInvalid, got {other:?}"),
    }
}

#[test]
fn gguf_tensor_errors_name_the_tensor() {
    let good = tiny_gguf();
    // Truncated data: the last tensor ends outside the file.
    match gguf_error(good[..good.len() - 1].to_vec()) {
        Error::GgufTensor {
            tensor, message, ..
        } => {
            assert_eq!(tensor, "blk.0.ffn_down.weight");
            assert!(message.contains("outside"), "{message}");
        }
        other => panic!("expected GgufTensor, got {other:?}"),
    }
    // A type this crate does not read (Q8_1, whose blocks fit where the BF16 data was).
    let mut bytes = good.clone();
    let at = type_field("blk.0.ffn_down.weight");
    bytes[at..at + 4].copy_from_slice(&9u32.to_le_bytes());
    match gguf_error(bytes) {
        Error::UnsupportedGgufType {
            tensor, ggml_type, ..
        } => {
            assert_eq!(
                (tensor.as_str(), ggml_type.as_str()),
                ("blk.0.ffn_down.weight", "Q8_1")
            );
        }
        other => panic!("expected UnsupportedGgufType, got {other:?}"),
    }
}

/// The byte range of tensor `name`'s data in the tiny GGUF.
fn tensor_data(bytes: &[u8], name: &str) -> std::ops::Range<usize> {
    let file = mlx_models::gguf::GgufFile::from_bytes("tiny.gguf", bytes.to_vec()).unwrap();
    let info = file.tensor(name).unwrap();
    info.start as usize..(info.start + info.len) as usize
}

#[test]
fn gguf_non_finite_weights_and_logits_are_named() {
    let good = tiny_gguf();
    let data = tensor_data(&good, "output_norm.weight");
    let mut bytes = good.clone();
    bytes[data.start + 8..data.start + 12].copy_from_slice(&f32::NAN.to_le_bytes());
    match gguf_error(bytes) {
        Error::NonFiniteWeight { name, .. } => assert_eq!(name, "model.norm.weight"),
        other => panic!("expected NonFiniteWeight, got {other:?}"),
    }

    // Finite but huge: the logits overflow at the first step, and generation says so.
    let mut bytes = good.clone();
    for at in data.step_by(4) {
        bytes[at..at + 4].copy_from_slice(&1e38f32.to_le_bytes());
    }
    let file = mlx_models::gguf::GgufFile::from_bytes("huge.gguf", bytes).unwrap();
    let model =
        mlx_models::load::load_gguf_file(&file, &mlx_models::load::LoadOptions::new()).unwrap();
    let mut stream = model
        .generate(
            &[5, 6, 7],
            mlx_models::generate::GenerateOptions::new().max_tokens(3),
        )
        .unwrap();
    match stream.next() {
        Some(Err(Error::NonFiniteLogits { step })) => assert_eq!(step, 0),
        other => panic!("expected NonFiniteLogits at step 0, got {other:?}"),
    }
    assert!(stream.next().is_none(), "the stream ends after the error");
}
