//! The quantization drift check of `cargo xtask verify`: on every committed fixture the
//! correct quantizer stays within its family's bound at 8 and 4 bits, and each seeded
//! quantizer bug fails the check on every fixture that has quantized modules — the wrong
//! group size and dropped biases by the error bound itself, bfloat16 scales by the dtype
//! the converted model computes in.

use mlx_models::convert::QuantFault;
use mlx_port::fixture::{discover, Fixture};
use mlx_port::quantization::{bound, quantization_drift, BITS, BOUNDS};
use std::collections::BTreeSet;
use std::path::Path;

fn fixtures() -> Vec<Fixture> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    discover(&root)
        .iter()
        .map(|dir| Fixture::load(dir).unwrap())
        .collect()
}

#[test]
fn every_family_has_a_bound_and_every_bound_a_family() {
    let families: BTreeSet<String> = fixtures()
        .iter()
        .map(|f| f.manifest.model_type.clone())
        .collect();
    let bounded: BTreeSet<String> = BOUNDS.iter().map(|(f, _, _)| f.to_string()).collect();
    assert_eq!(families, bounded);
    for (family, b8, b4) in BOUNDS {
        assert!(0.0 < *b8 && b8 < b4, "{family}: 8-bit {b8}, 4-bit {b4}");
    }
}

#[test]
fn correct_quantization_stays_within_the_bounds_and_seeded_faults_do_not() {
    let mut faulted = 0;
    for fixture in fixtures() {
        for bits in BITS {
            let good = quantization_drift(&fixture, bits, None).unwrap();
            assert!(good.passed(), "{good}");
            if good.quantized_modules == 0 {
                // Nothing divides into groups of 64: nothing may change.
                assert_eq!(good.logits_rel_error, 0.0, "{good}");
                continue;
            }
            let limit = bound(&fixture.manifest.model_type, bits).unwrap();
            for fault in [QuantFault::GroupSize, QuantFault::DroppedBiases] {
                let bad = quantization_drift(&fixture, bits, Some(fault)).unwrap();
                assert!(bad.logits_rel_error > limit, "{fault:?} not caught: {bad}");
                assert!(!bad.passed());
            }
            let bad = quantization_drift(&fixture, bits, Some(QuantFault::ScalesDtype)).unwrap();
            assert!(
                !bad.dtype_changes.is_empty(),
                "bfloat16 scales not caught: {bad}"
            );
            assert!(!bad.passed());
            faulted += 1;
        }
    }
    // All but the fixtures too narrow to quantize (recurrent_gemma/hub).
    assert!(faulted >= 250, "{faulted}");
}
