//! `convert` quantizes what Python mlx-lm's converter quantizes, and the same way: on
//! committed fixtures (dense and mixture-of-experts families, 4- and 8-bit, groups of 32
//! and 64, with and without a cast), every tensor mlx-lm 0.32.2 writes has the same name,
//! dtype, shape and bit-identical values here, and config.json's `quantization` block is
//! the same; and mlx-models loads the result. The reference is `xtask/python/export_mlx_lm_convert.py`'s output, from
//! mlx-lm's own `convert`.

use mlx_models::config::ConfigFile;
use mlx_models::convert::{convert_weights, ConvertOptions};
use mlx_models::models::build;
use mlx_models::weights::Weights;
use mlx_rs::{Array, Dtype};
use serde_json::Value;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::path::Path;

fn fixtures() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures"))
}

fn dtype_name(dtype: Dtype) -> String {
    format!("{dtype:?}").to_lowercase()
}

/// SHA-256 of the values as the reference script hashes them: floating point widened to
/// float32, integers as stored, little-endian.
fn digest(a: &Array) -> String {
    let bytes: Vec<u8> = match a.dtype() {
        Dtype::Uint32 => a
            .as_slice::<u32>()
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
        Dtype::Int32 => a
            .as_slice::<i32>()
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
        _ => {
            let f = a.as_dtype(Dtype::Float32).unwrap();
            f.eval().unwrap();
            f.as_slice::<f32>()
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect()
        }
    };
    format!("{:x}", Sha256::digest(&bytes))
}

fn dtype_of(name: &str) -> Dtype {
    match name {
        "float16" => Dtype::Float16,
        "bfloat16" => Dtype::Bfloat16,
        "float32" => Dtype::Float32,
        other => panic!("dtype {other}"),
    }
}

#[test]
fn converted_weights_are_bit_identical_to_mlx_lm() {
    let reference: Value = serde_json::from_slice(
        &std::fs::read(fixtures().join("mlx-lm-convert/reference.json")).unwrap(),
    )
    .unwrap();
    let cases = reference["cases"].as_array().unwrap();
    assert!(cases.len() >= 10);
    for case in cases {
        let fixture = case["fixture"].as_str().unwrap();
        let (bits, group) = (
            case["bits"].as_i64().unwrap() as i32,
            case["group_size"].as_i64().unwrap() as i32,
        );
        let label = format!("{fixture} {bits}-bit g{group} {}", case["dtype"]);
        let dir = fixtures().join(fixture);
        let config = ConfigFile::read(&dir.join("config.json")).unwrap();
        let weights = Weights::from_dir(&dir).unwrap();
        let mut options = ConvertOptions::new().quantize(bits, group);
        if let Some(dtype) = case["dtype"].as_str() {
            options = options.dtype(dtype_of(dtype));
        }
        let converted = convert_weights(&config, weights, None, &options).unwrap();
        assert_eq!(
            converted.config["quantization"], case["quantization"],
            "{label}: quantization block"
        );
        assert_eq!(
            converted.config["quantization_config"], case["quantization"],
            "{label}: quantization_config"
        );
        let expected = case["tensors"].as_object().unwrap();
        let ours: BTreeMap<&String, &Array> = converted.tensors.iter().collect();
        let names = |it: Vec<&String>| it.into_iter().cloned().collect::<Vec<_>>();
        assert_eq!(
            names(ours.keys().copied().collect()),
            names(expected.keys().collect()),
            "{label}: tensor names"
        );
        for (name, tensor) in ours {
            let want = &expected[name.as_str()];
            assert_eq!(
                dtype_name(tensor.dtype()),
                want["dtype"].as_str().unwrap(),
                "{label}: {name} dtype"
            );
            let shape: Vec<i64> = tensor.shape().iter().map(|&d| i64::from(d)).collect();
            let want_shape: Vec<i64> = want["shape"]
                .as_array()
                .unwrap()
                .iter()
                .map(|d| d.as_i64().unwrap())
                .collect();
            assert_eq!(shape, want_shape, "{label}: {name} shape");
            assert_eq!(
                digest(tensor),
                want["sha256"].as_str().unwrap(),
                "{label}: {name} values"
            );
        }
        let (tensors, quantized) = (converted.tensors.len(), converted.quantized.len());
        // And mlx-models loads what it wrote.
        let written = ConfigFile {
            path: config.path.clone(),
            value: converted.config,
        };
        build(&written, Weights::new(converted.tensors, dir.clone()))
            .unwrap_or_else(|e| panic!("{label}: the conversion does not load: {e}"));
        eprintln!("{label}: {tensors} tensors, {quantized} quantized, equal to mlx-lm, loads");
    }
}
