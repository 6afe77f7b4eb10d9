//! Checkpoints quantized the way mlx-community repos store them (`weight` as packed
//! uint32, `scales`, `biases`, and a `quantization` block in config.json) run through
//! MLX's quantized kernels and must equal the same model with the dequantized weights
//! stored densely.

use mlx_models::load::load_model_dir;
use mlx_models::nn::Quantization;
use mlx_models::tap::Tap;
use mlx_rs::{ops, Array, Dtype};
use std::collections::HashMap;
use std::path::Path;

const FIXTURE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/llama/llama3-untied"
);

/// Writes two copies of the fixture model: quantized (mlx-community layout) and dense
/// with exactly the values the quantized one represents.
fn write_pair(quantized: &Path, dense: &Path, group_size: i32, bits: i32) {
    let weights = Array::load_safetensors(Path::new(FIXTURE).join("model.safetensors")).unwrap();
    let mut q_tensors: HashMap<String, Array> = HashMap::new();
    let mut d_tensors: HashMap<String, Array> = HashMap::new();
    for (name, w) in weights {
        let matrix = w.ndim() == 2 && name.ends_with(".weight");
        if !matrix {
            q_tensors.insert(name.clone(), w.clone());
            d_tensors.insert(name, w);
            continue;
        }
        let (packed, scales, biases) = ops::quantize(&w, group_size, bits).unwrap();
        let restored = ops::dequantize(&packed, &scales, &biases, group_size, bits).unwrap();
        let stem = name.trim_end_matches(".weight");
        q_tensors.insert(format!("{stem}.weight"), packed);
        q_tensors.insert(format!("{stem}.scales"), scales);
        q_tensors.insert(format!("{stem}.biases"), biases);
        d_tensors.insert(name, restored);
    }
    let mut config: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(Path::new(FIXTURE).join("config.json")).unwrap(),
    )
    .unwrap();
    for (dir, tensors) in [(quantized, &q_tensors), (dense, &d_tensors)] {
        std::fs::create_dir_all(dir).unwrap();
        Array::save_safetensors(
            tensors.iter().map(|(k, v)| (k.as_str(), v)),
            None,
            dir.join("model.safetensors"),
        )
        .unwrap();
    }
    std::fs::write(dense.join("config.json"), config.to_string()).unwrap();
    config["quantization"] = serde_json::json!({ "group_size": group_size, "bits": bits });
    std::fs::write(quantized.join("config.json"), config.to_string()).unwrap();
}

fn logits(dir: &Path) -> (Vec<f32>, Option<Quantization>) {
    let model = load_model_dir(dir, None).unwrap();
    let ids: Vec<i32> = (0..12).map(|i| (i * 37 + 5) % 256).collect();
    let input = Array::from_slice(&ids, &[1, ids.len() as i32]);
    let mut cache = model.new_cache();
    let out = model
        .forward(&input, &mut cache, &mut Tap::off())
        .unwrap()
        .as_dtype(Dtype::Float32)
        .unwrap();
    (out.as_slice::<f32>().to_vec(), model.info().quantization)
}

#[test]
fn quantized_checkpoints_match_their_dequantized_weights() {
    for (group_size, bits) in [(32, 4), (64, 4), (32, 8), (64, 8)] {
        let tmp = tempfile::tempdir().unwrap();
        let (q_dir, d_dir) = (tmp.path().join("q"), tmp.path().join("d"));
        write_pair(&q_dir, &d_dir, group_size, bits);
        let (q, quantization) = logits(&q_dir);
        let (d, dense) = logits(&d_dir);
        assert_eq!(quantization, Some(Quantization { bits, group_size }));
        assert_eq!(dense, None);
        let worst = q
            .iter()
            .zip(&d)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        assert!(
            worst < 1e-4,
            "{bits}-bit, group {group_size}: max |Δlogits| = {worst}"
        );
        // And the quantization is real: the logits moved away from the f32 model's.
        let (f32_logits, _) = logits(Path::new(FIXTURE));
        let moved = q
            .iter()
            .zip(&f32_logits)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        assert!(
            moved > 1e-4,
            "{bits}-bit quantization changed nothing (max |Δ| = {moved})"
        );
    }
}

/// A mixture-of-experts fixture (Hub layout: one tensor per expert) rewritten the way
/// mlx-community stores it: experts stacked into `switch_mlp`, and every matrix whose input
/// width the group size divides quantized (3-D expert stacks included); `block` is the
/// feed-forward's name in the checkpoint, `projections` the experts' projection names.
fn write_moe_pair(
    fixture: &Path,
    quantized: &Path,
    dense: &Path,
    group_size: i32,
    bits: i32,
    projections: &[(&str, &str)],
) {
    let weights = Array::load_safetensors(fixture.join("model.safetensors")).unwrap();
    // Stack `<prefix>.experts.<i>.<proj>.weight` into `<prefix>.switch_mlp.<new>.weight`.
    let mut stacks: HashMap<String, Vec<(usize, Array)>> = HashMap::new();
    let mut plain: HashMap<String, Array> = HashMap::new();
    for (name, w) in weights {
        let parts: Vec<&str> = name.split('.').collect();
        let at = parts.iter().position(|p| *p == "experts");
        match at.and_then(|at| Some((at, parts.get(at + 1)?.parse::<usize>().ok()?))) {
            Some((at, index)) => {
                let proj = parts[at + 2];
                let new = projections
                    .iter()
                    .find(|(old, _)| *old == proj)
                    .map_or(proj, |(_, new)| new);
                let key = format!(
                    "{}.switch_mlp.{new}.{}",
                    parts[..at].join("."),
                    parts[at + 3..].join(".")
                );
                stacks.entry(key).or_default().push((index, w));
            }
            None => {
                plain.insert(name, w);
            }
        }
    }
    assert!(
        !stacks.is_empty(),
        "{} has no per-expert tensors",
        fixture.display()
    );
    for (name, mut members) in stacks {
        members.sort_by_key(|(i, _)| *i);
        let arrays: Vec<Array> = members.into_iter().map(|(_, a)| a).collect();
        plain.insert(name, ops::stack(&arrays, 0).unwrap());
    }
    let mut q_tensors: HashMap<String, Array> = HashMap::new();
    let mut d_tensors: HashMap<String, Array> = HashMap::new();
    let mut quantized_count = 0;
    for (name, w) in plain {
        let matrix = w.ndim() >= 2 && name.ends_with(".weight");
        if !matrix || w.dim(-1) % group_size != 0 {
            q_tensors.insert(name.clone(), w.clone());
            d_tensors.insert(name, w);
            continue;
        }
        let (packed, scales, biases) = ops::quantize(&w, group_size, bits).unwrap();
        let restored = ops::dequantize(&packed, &scales, &biases, group_size, bits).unwrap();
        let stem = name.trim_end_matches(".weight");
        q_tensors.insert(format!("{stem}.weight"), packed);
        q_tensors.insert(format!("{stem}.scales"), scales);
        q_tensors.insert(format!("{stem}.biases"), biases);
        d_tensors.insert(name, restored);
        quantized_count += 1;
    }
    assert!(quantized_count > 0);
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture.join("config.json")).unwrap())
            .unwrap();
    for (dir, tensors) in [(quantized, &q_tensors), (dense, &d_tensors)] {
        std::fs::create_dir_all(dir).unwrap();
        Array::save_safetensors(
            tensors.iter().map(|(k, v)| (k.as_str(), v)),
            None,
            dir.join("model.safetensors"),
        )
        .unwrap();
    }
    std::fs::write(dense.join("config.json"), config.to_string()).unwrap();
    config["quantization"] = serde_json::json!({ "group_size": group_size, "bits": bits });
    std::fs::write(quantized.join("config.json"), config.to_string()).unwrap();
}

/// Mixture-of-experts checkpoints in the mlx-community layout (stacked, quantized experts
/// run through `gather_qmm`) equal their dequantized weights, and the quantization is real.
#[test]
fn quantized_moe_checkpoints_match_their_dequantized_weights() {
    let mixtral = [("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj")];
    let cases: [(&str, &[(&str, &str)]); 2] = [("mixtral/hub", &mixtral), ("qwen3_moe/hub", &[])];
    for (fixture, projections) in cases {
        let fixture = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures")
            .join(fixture);
        for (group_size, bits) in [(32, 4), (64, 4), (32, 8), (64, 8)] {
            let tmp = tempfile::tempdir().unwrap();
            let (q_dir, d_dir) = (tmp.path().join("q"), tmp.path().join("d"));
            write_moe_pair(&fixture, &q_dir, &d_dir, group_size, bits, projections);
            let (q, quantization) = logits(&q_dir);
            let (d, dense) = logits(&d_dir);
            assert!(
                quantization.is_some(),
                "{}: not quantized",
                fixture.display()
            );
            assert_eq!(dense, None);
            let worst = q
                .iter()
                .zip(&d)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0f32, f32::max);
            assert!(
                worst < 1e-4,
                "{}: {bits}-bit, group {group_size}: max |Δlogits| = {worst}",
                fixture.display()
            );
            let (f32_logits, _) = logits(&fixture);
            let moved = q
                .iter()
                .zip(&f32_logits)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0f32, f32::max);
            assert!(moved > 1e-4, "{bits}-bit quantization changed nothing");
        }
    }
}

/// DeepSeek-V3 the way mlx-lm converts it: experts stacked, `kv_b_proj` split per head into
/// `embed_q` (`[heads, kv_lora_rank, qk_nope_head_dim]`) and `unembed_out`
/// (`[heads, v_head_dim, kv_lora_rank]`), every matrix the group size fits quantized.
#[test]
fn quantized_mla_checkpoints_in_the_mlx_lm_layout() {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/deepseek_v3/default");
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture.join("config.json")).unwrap())
            .unwrap();
    let dim = |k: &str| config[k].as_i64().unwrap() as i32;
    let (heads, nope, v, rank) = (
        dim("num_attention_heads"),
        dim("qk_nope_head_dim"),
        dim("v_head_dim"),
        dim("kv_lora_rank"),
    );
    // Split kv_b_proj as mlx-lm's sanitize does, into a copy of the fixture.
    let split = tempfile::tempdir().unwrap();
    let mut tensors = Array::load_safetensors(fixture.join("model.safetensors")).unwrap();
    let names: Vec<String> = tensors
        .keys()
        .filter(|n| n.ends_with(".kv_b_proj.weight"))
        .cloned()
        .collect();
    for name in names {
        let w = tensors
            .remove(&name)
            .unwrap()
            .reshape(&[heads, nope + v, rank])
            .unwrap();
        let parts = w.split_at_indices(&[nope], 1).unwrap();
        let prefix = name.trim_end_matches(".kv_b_proj.weight");
        tensors.insert(
            format!("{prefix}.embed_q.weight"),
            parts[0].swap_axes(1, 2).unwrap(),
        );
        tensors.insert(format!("{prefix}.unembed_out.weight"), parts[1].clone());
    }
    Array::save_safetensors(
        tensors.iter().map(|(k, v)| (k.as_str(), v)),
        None,
        split.path().join("model.safetensors"),
    )
    .unwrap();
    std::fs::copy(
        fixture.join("config.json"),
        split.path().join("config.json"),
    )
    .unwrap();
    // The split layout alone changes nothing.
    let (split_logits, _) = logits(split.path());
    let (reference, _) = logits(&fixture);
    let worst = split_logits
        .iter()
        .zip(&reference)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(worst < 1e-5, "split kv_b_proj: max |Δlogits| = {worst}");
    // Quantized, it equals its dequantized weights.
    for (group_size, bits) in [(32, 4), (64, 8)] {
        let tmp = tempfile::tempdir().unwrap();
        let (q_dir, d_dir) = (tmp.path().join("q"), tmp.path().join("d"));
        write_moe_pair(split.path(), &q_dir, &d_dir, group_size, bits, &[]);
        let (q, quantization) = logits(&q_dir);
        let (d, _) = logits(&d_dir);
        assert!(quantization.is_some());
        let worst = q
            .iter()
            .zip(&d)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        assert!(
            worst < 1e-4,
            "{bits}-bit, group {group_size}: max |Δlogits| = {worst}"
        );
    }
}
