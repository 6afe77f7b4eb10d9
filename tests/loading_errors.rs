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
    // `gelu` is a valid Llama activation in Transformers (ACT2FN); `xielu` has no block here.
    let dir = copy_fixture("llama/default-tied");
    edit_config(dir.path(), |c| {
        c.insert("hidden_act".into(), json!("xielu"));
    });
    let message = assert_config_error(load_error(dir.path()), dir.path(), "hidden_act");
    assert!(message.contains("xielu"), "{message}");
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
