//! Checkpoints quantized the way mlx-community repos store them (`weight` as packed
//! uint32, `scales`, `biases`, and a `quantization` block in config.json) run through
//! MLX's quantized kernels and must equal the same model with the dequantized weights
//! stored densely.

use mlx_models::config::ConfigFile;
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

/// The largest elementwise |a - b|.
fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max)
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
        let worst = max_abs_diff(&q, &d);
        assert!(
            worst < 1e-4,
            "{bits}-bit, group {group_size}: max |Δlogits| = {worst}"
        );
        // And the quantization is real: the logits moved away from the f32 model's.
        let (f32_logits, _) = logits(Path::new(FIXTURE));
        let moved = max_abs_diff(&q, &f32_logits);
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
    write_mlx_community_pair(
        fixture,
        quantized,
        dense,
        group_size,
        bits,
        projections,
        true,
    );
}

/// [`write_moe_pair`] for any model: per-expert tensors (if `experts`, there must be some)
/// stacked, every matrix the group size fits quantized.
fn write_mlx_community_pair(
    fixture: &Path,
    quantized: &Path,
    dense: &Path,
    group_size: i32,
    bits: i32,
    projections: &[(&str, &str)],
    experts: bool,
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
        stacks.is_empty() != experts,
        "{}: per-expert tensors found: {}",
        fixture.display(),
        stacks.len()
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
    let mut config = ConfigFile::read(&fixture.join("config.json"))
        .unwrap()
        .value;
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
            let worst = max_abs_diff(&q, &d);
            assert!(
                worst < 1e-4,
                "{}: {bits}-bit, group {group_size}: max |Δlogits| = {worst}",
                fixture.display()
            );
            let (f32_logits, _) = logits(&fixture);
            let moved = max_abs_diff(&q, &f32_logits);
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
    let worst = max_abs_diff(&split_logits, &reference);
    assert!(worst < 1e-5, "split kv_b_proj: max |Δlogits| = {worst}");
    // Quantized, it equals its dequantized weights.
    for (group_size, bits) in [(32, 4), (64, 8)] {
        let tmp = tempfile::tempdir().unwrap();
        let (q_dir, d_dir) = (tmp.path().join("q"), tmp.path().join("d"));
        write_moe_pair(split.path(), &q_dir, &d_dir, group_size, bits, &[]);
        let (q, quantization) = logits(&q_dir);
        let (d, _) = logits(&d_dir);
        assert!(quantization.is_some());
        let worst = max_abs_diff(&q, &d);
        assert!(
            worst < 1e-4,
            "{bits}-bit, group {group_size}: max |Δlogits| = {worst}"
        );
    }
}

/// A copy of `fixture` as mlx-lm's `sanitize` leaves it before quantizing: conv weights
/// `[channels, kernel, 1]`, and `edit` applied to the tensors (with the config).
fn mlx_lm_copy(
    fixture: &Path,
    out: &Path,
    edit: impl Fn(&serde_json::Value, &mut HashMap<String, Array>),
) {
    let mut tensors = Array::load_safetensors(fixture.join("model.safetensors")).unwrap();
    let config = ConfigFile::read(&fixture.join("config.json"))
        .unwrap()
        .value;
    let convs: Vec<String> = tensors
        .keys()
        .filter(|n| n.ends_with("conv1d.weight") || n.ends_with("conv.conv.weight"))
        .cloned()
        .collect();
    for name in convs {
        let w = tensors.remove(&name).unwrap();
        assert_eq!(w.ndim(), 3, "{name}");
        tensors.insert(name, w.swap_axes(1, 2).unwrap());
    }
    edit(&config, &mut tensors);
    std::fs::create_dir_all(out).unwrap();
    Array::save_safetensors(
        tensors.iter().map(|(k, v)| (k.as_str(), v)),
        None,
        out.join("model.safetensors"),
    )
    .unwrap();
    std::fs::write(out.join("config.json"), config.to_string()).unwrap();
}

/// Falcon-H1's μP multipliers folded into the weight matrices as mlx-lm's `sanitize` does
/// (biases and `v_proj` untouched, `key_multiplier` not applied).
fn fold_falcon_h1_as_mlx_lm(config: &serde_json::Value, tensors: &mut HashMap<String, Array>) {
    let f = |k: &str| config[k].as_f64().unwrap() as f32;
    let i = |k: &str| config[k].as_i64().unwrap() as usize;
    let m = |k: &str, j: usize| config[k][j].as_f64().unwrap() as f32;
    let (d_ssm, bc, heads) = (
        i("mamba_d_ssm"),
        i("mamba_n_groups") * i("mamba_d_state"),
        i("mamba_n_heads"),
    );
    let mut mup = Vec::new();
    for (j, n) in [d_ssm, d_ssm, bc, bc, heads].into_iter().enumerate() {
        mup.extend(std::iter::repeat_n(m("ssm_multipliers", j), n));
    }
    let mup = Array::from_slice(&mup, &[mup.len() as i32, 1]);
    let names: Vec<String> = tensors.keys().cloned().collect();
    for name in names {
        let factor = if name.ends_with("embed_tokens.weight") {
            Array::from_f32(f("embedding_multiplier"))
        } else if name.ends_with("lm_head.weight") {
            Array::from_f32(f("lm_head_multiplier"))
        } else if name.ends_with("q_proj.weight") || name.ends_with("k_proj.weight") {
            Array::from_f32(f("attention_in_multiplier"))
        } else if name.ends_with("o_proj.weight") {
            Array::from_f32(f("attention_out_multiplier"))
        } else if name.ends_with("out_proj.weight") {
            Array::from_f32(f("ssm_out_multiplier"))
        } else if name.ends_with("gate_proj.weight") {
            Array::from_f32(m("mlp_multipliers", 0))
        } else if name.ends_with("down_proj.weight") {
            Array::from_f32(m("mlp_multipliers", 1))
        } else if name.ends_with("in_proj.weight") {
            mup.multiply(Array::from_f32(f("ssm_in_multiplier")))
                .unwrap()
        } else {
            continue;
        };
        let w = tensors.remove(&name).unwrap();
        tensors.insert(name, w.multiply(&factor).unwrap());
    }
}

/// Qwen3-Next's and Qwen3.5's `1 + w` norms with the 1 added, as mlx-lm's `sanitize` stores
/// them, and multimodal Qwen3.5 names as mlx-lm writes them (`language_model.model.*`).
fn fold_plus_one_norms_as_mlx_lm(_: &serde_json::Value, tensors: &mut HashMap<String, Array>) {
    let norms = [
        ".input_layernorm.weight",
        ".post_attention_layernorm.weight",
        ".norm.weight",
        ".q_norm.weight",
        ".k_norm.weight",
    ];
    let names: Vec<String> = tensors.keys().cloned().collect();
    for name in names {
        let mut w = tensors.remove(&name).unwrap();
        if norms.iter().any(|n| name.ends_with(n)) && !name.contains("linear_attn") {
            w = w.add(Array::from_f32(1.0)).unwrap();
        }
        let name = match name.strip_prefix("model.language_model.") {
            Some(rest) => format!("language_model.model.{rest}"),
            None if name.starts_with("lm_head.")
                && tensors.keys().any(|k| {
                    k.starts_with("language_model.") || k.starts_with("model.language_model.")
                }) =>
            {
                format!("language_model.{name}")
            }
            None => name,
        };
        tensors.insert(name, w);
    }
}

/// Granite 4's fused tensors `<prefix>.<fused>.input_linear.weight` (gate rows, then up
/// rows, along `axis`) and `<prefix>.<fused>.output_linear.weight` renamed to
/// `<prefix>.<to>.{gate,up,down}_proj.weight`, as mlx-lm's `sanitize` does.
fn split_granite_as_mlx_lm(tensors: &mut HashMap<String, Array>, fused: &str, axis: i32, to: &str) {
    let input = format!(".{fused}.input_linear.weight");
    let names: Vec<String> = tensors
        .keys()
        .filter(|n| n.ends_with(&input))
        .cloned()
        .collect();
    assert!(!names.is_empty(), "no {input}");
    for name in names {
        let prefix = name.trim_end_matches(&input).to_owned();
        let halves = tensors.remove(&name).unwrap().split_equal(2, axis).unwrap();
        tensors.insert(format!("{prefix}.{to}.gate_proj.weight"), halves[0].clone());
        tensors.insert(format!("{prefix}.{to}.up_proj.weight"), halves[1].clone());
        let down = tensors
            .remove(&format!("{prefix}.{fused}.output_linear.weight"))
            .unwrap();
        tensors.insert(format!("{prefix}.{to}.down_proj.weight"), down);
    }
}

/// A dense Granite 4 hybrid: the fused `shared_mlp` becomes `mlp.*`.
fn split_granite_shared_mlp_as_mlx_lm(_: &serde_json::Value, tensors: &mut HashMap<String, Array>) {
    split_granite_as_mlx_lm(tensors, "shared_mlp", 0, "mlp");
}

/// A Granite 4 hybrid MoE: the fused experts become `block_sparse_moe.switch_mlp` (the
/// shared MLP stays fused).
fn split_granite_experts_as_mlx_lm(_: &serde_json::Value, tensors: &mut HashMap<String, Array>) {
    split_granite_as_mlx_lm(
        tensors,
        "block_sparse_moe",
        1,
        "block_sparse_moe.switch_mlp",
    );
}

/// Hybrid checkpoints as mlx-lm converts them (conv weights `[channels, kernel, 1]`,
/// Nemotron-H's experts stacked as `switch_mlp.fc1`/`fc2`, Falcon-H1's multipliers folded
/// into the weights) give the Transformers-layout fixture's logits, and quantized (every
/// matrix the group size fits; the conv and state parameters stay as they are) they equal
/// their dequantized weights.
#[test]
fn quantized_hybrid_checkpoints_in_the_mlx_lm_layout() {
    let nemotron = [("up_proj", "fc1"), ("down_proj", "fc2")];
    type Edit = fn(&serde_json::Value, &mut HashMap<String, Array>);
    /// Fixture, expert projection renames, whether it has per-expert tensors, mlx-lm's edit.
    type Case<'a> = (&'a str, &'a [(&'a str, &'a str)], bool, Edit);
    let cases: [Case; 11] = [
        (
            "granitemoehybrid/default",
            &[],
            false,
            split_granite_experts_as_mlx_lm,
        ),
        ("mamba2/hub", &[], false, |_, _| {}),
        ("mamba/hub", &[], false, |_, _| {}),
        ("jamba/hub", &[], true, |_, _| {}),
        (
            "granitemoehybrid/hub",
            &[],
            false,
            split_granite_shared_mlp_as_mlx_lm,
        ),
        ("qwen3_next/hub", &[], true, fold_plus_one_norms_as_mlx_lm),
        (
            "qwen3_5_text/default",
            &[],
            false,
            fold_plus_one_norms_as_mlx_lm,
        ),
        (
            "qwen3_5_moe_text/hub",
            &[],
            true,
            fold_plus_one_norms_as_mlx_lm,
        ),
        ("lfm2/default", &[], false, |_, _| {}),
        ("nemotron_h/hub", &nemotron, true, |_, _| {}),
        ("falcon_h1/hub", &[], false, fold_falcon_h1_as_mlx_lm),
    ];
    for (fixture, projections, experts, edit) in cases {
        let fixture = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures")
            .join(fixture);
        let tmp = tempfile::tempdir().unwrap();
        let converted = tmp.path().join("converted");
        mlx_lm_copy(&fixture, &converted, edit);
        let (reference, _) = logits(&fixture);
        let (ours, _) = logits(&converted);
        let worst = max_abs_diff(&ours, &reference);
        assert!(
            worst < 1e-5,
            "{}: mlx-lm layout: max |Δlogits| = {worst}",
            fixture.display()
        );
        for (group_size, bits) in [(32, 4), (64, 8)] {
            let (q_dir, d_dir) = (tmp.path().join("q"), tmp.path().join("d"));
            write_mlx_community_pair(
                &converted,
                &q_dir,
                &d_dir,
                group_size,
                bits,
                projections,
                experts,
            );
            let (q, quantization) = logits(&q_dir);
            let (d, _) = logits(&d_dir);
            assert!(
                quantization.is_some(),
                "{}: not quantized",
                fixture.display()
            );
            let worst = max_abs_diff(&q, &d);
            assert!(
                worst < 1e-4,
                "{}: {bits}-bit, group {group_size}: max |Δlogits| = {worst}",
                fixture.display()
            );
            let moved = max_abs_diff(&q, &reference);
            assert!(moved > 1e-4, "{bits}-bit quantization changed nothing");
            std::fs::remove_dir_all(&q_dir).unwrap();
            std::fs::remove_dir_all(&d_dir).unwrap();
        }
    }
}
