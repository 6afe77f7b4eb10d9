//! Exercises the native MLX library through `mlx-rs`, checking real numbers against
//! independent references: hand-computed values, closed forms, plain-Rust reference
//! implementations, or (where stated) the same computation spelled out with plain MLX ops.
//!
//! ```text
//! cargo test --test native
//! ```

use half::{bf16, f16};
use mlx_rs::fast::{self, ScaledDotProductAttentionMask};
use mlx_rs::ops::{self, dequantize, quantize};
use mlx_rs::{random, Array, Dtype};
use proptest::prelude::*;
use std::collections::HashMap;

type TestResult = Result<(), Box<dyn std::error::Error>>;

/// The array's values as `f32`, row-major.
fn to_f32(a: &Array) -> Vec<f32> {
    a.as_type::<f32>()
        .and_then(|a| a.contiguous())
        .expect("cast to f32")
        .to_vec_exact::<f32>()
        .expect("f32 values")
}

/// Asserts |got - want| <= atol + rtol * |want| element-wise, with a useful message.
fn assert_close(got: &[f32], want: &[f32], atol: f64, rtol: f64, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let (g, w) = (f64::from(g), f64::from(w));
        let tol = atol + rtol * w.abs();
        assert!(
            (g - w).abs() <= tol,
            "{what}: element {i}: got {g}, want {w} (|diff| {} > tol {tol})",
            (g - w).abs()
        );
    }
}

/// A deterministic pseudo-random sequence in [-1, 1) (SplitMix64), independent of MLX.
fn splitmix_values(seed: u64, n: usize) -> Vec<f32> {
    let mut state = seed;
    (0..n)
        .map(|_| {
            state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            ((z >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// 1. matmul
// ---------------------------------------------------------------------------------------------

#[test]
fn matmul_matches_hand_computed_product() -> TestResult {
    // [[1 2 3]     [[ 7  8]     [[1*7+2*9+3*11  1*8+2*10+3*12]     [[ 58  64]
    //  [4 5 6]]  @  [ 9 10]  =   [4*7+5*9+6*11  4*8+5*10+6*12]]  =  [139 154]]
    //               [11 12]]
    let a = Array::from_slice(&[1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0], &[2, 3]);
    let b = Array::from_slice(&[7.0f32, 8.0, 9.0, 10.0, 11.0, 12.0], &[3, 2]);
    let c = a.matmul(&b)?;
    assert_eq!(c.shape(), &[2, 2]);
    assert_eq!(c.dtype(), Dtype::Float32);
    assert_eq!(c.as_slice::<f32>(), &[58.0, 64.0, 139.0, 154.0]);

    // A @ Aᵀ = [[1+4+9, 4+10+18], [.., 16+25+36]] = [[14, 32], [32, 77]]
    let aat = a.matmul(a.t())?;
    assert_eq!(aat.as_slice::<f32>(), &[14.0, 32.0, 32.0, 77.0]);

    // Bᵀ @ Aᵀ = (A @ B)ᵀ = [[58, 139], [64, 154]]
    let ct = b.t().matmul(a.t())?;
    assert_eq!(ct.as_slice::<f32>(), &[58.0, 139.0, 64.0, 154.0]);
    Ok(())
}

#[test]
fn matmul_matches_triple_loop_on_integer_valued_matrices() -> TestResult {
    // Integer-valued entries small enough that every partial sum is exact in f32, so the
    // comparison with a plain triple loop is exact whatever the summation order.
    let (m, k, n) = (5usize, 37usize, 3usize);
    let a: Vec<f32> = splitmix_values(1, m * k)
        .iter()
        .map(|v| (v * 8.0).round())
        .collect();
    let b: Vec<f32> = splitmix_values(2, k * n)
        .iter()
        .map(|v| (v * 8.0).round())
        .collect();
    let mut want = vec![0.0f32; m * n];
    for i in 0..m {
        for j in 0..n {
            want[i * n + j] = (0..k).map(|p| a[i * k + p] * b[p * n + j]).sum();
        }
    }
    let c = Array::from_slice(&a, &[m as i32, k as i32])
        .matmul(Array::from_slice(&b, &[k as i32, n as i32]))?;
    assert_eq!(c.shape(), &[m as i32, n as i32]);
    assert_eq!(c.as_slice::<f32>(), &want[..]);

    // Batched: a [2, m, k] stack of (A, -A) against B gives (AB, -AB).
    let neg: Vec<f32> = a.iter().map(|v| -v).collect();
    let stacked = Array::from_slice(&[a.clone(), neg].concat(), &[2, m as i32, k as i32]);
    let cb = stacked.matmul(Array::from_slice(&b, &[k as i32, n as i32]))?;
    assert_eq!(cb.shape(), &[2, m as i32, n as i32]);
    let want_neg: Vec<f32> = want.iter().map(|v| -v).collect();
    assert_eq!(cb.as_slice::<f32>(), &[want, want_neg].concat()[..]);
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 2. f16 / bf16
// ---------------------------------------------------------------------------------------------

/// Values exactly representable in f16: zero, signed zero, small integers, the largest finite
/// value, the smallest normal and subnormal, and infinity.
fn exact_f16_values() -> Vec<f16> {
    [
        0.0f32,
        -0.0,
        1.0,
        -2.0,
        0.5,
        0.375,
        1024.0,
        -1.5,
        65504.0,        // f16::MAX
        2f32.powi(-14), // smallest normal
        2f32.powi(-24), // smallest subnormal
        f32::INFINITY,
        f32::NEG_INFINITY,
        1.0 + 1.0 / 1024.0, // 1 + 2^-10, one ulp above 1
    ]
    .iter()
    .map(|&v| {
        let h = f16::from_f32(v);
        assert_eq!(h.to_f32().to_bits(), v.to_bits(), "{v} is exact in f16");
        h
    })
    .collect()
}

/// Values exactly representable in bf16 (8 significant bits, f32's exponent range).
fn exact_bf16_values() -> Vec<bf16> {
    [
        0.0f32,
        -0.0,
        1.0,
        -3.0,
        0.25,
        1.0 + 1.0 / 128.0, // 1 + 2^-7, one ulp above 1
        bf16::MAX.to_f32(),
        f32::MIN_POSITIVE, // 2^-126, smallest normal
        -65536.0,
        33.0,
        f32::INFINITY,
    ]
    .iter()
    .map(|&v| {
        let h = bf16::from_f32(v);
        assert_eq!(h.to_f32().to_bits(), v.to_bits(), "{v} is exact in bf16");
        h
    })
    .collect()
}

#[test]
#[allow(deprecated)] // `Array::item` is the compatibility alias of `item_cast`
fn f16_round_trips_through_item_and_slice() -> TestResult {
    let values = exact_f16_values();
    let a = Array::from_slice(&values, &[values.len() as i32]);
    assert_eq!(a.dtype(), Dtype::Float16);
    assert_eq!(a.item_size(), 2);
    let bits = |s: &[f16]| s.iter().map(|h| h.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(a.as_slice::<f16>()), bits(&values));
    assert_eq!(bits(&a.to_vec_exact::<f16>()?), bits(&values));
    // Widening to f32 is exact.
    let widened = a.as_type::<f32>()?;
    let want: Vec<u32> = values.iter().map(|h| h.to_f32().to_bits()).collect();
    let got: Vec<u32> = widened
        .as_slice::<f32>()
        .iter()
        .map(|v| v.to_bits())
        .collect();
    assert_eq!(got, want);

    for &v in &values {
        let scalar = Array::from_slice(&[v], &[]);
        assert_eq!(scalar.ndim(), 0);
        assert_eq!(scalar.item::<f16>().to_bits(), v.to_bits());
        assert_eq!(scalar.item_exact::<f16>().to_bits(), v.to_bits());
        assert_eq!(scalar.item_cast::<f32>().to_bits(), v.to_f32().to_bits());
        // An f32 scalar read back as f16 goes through MLX's own conversion.
        let from_f32 = Array::from_f32(v.to_f32());
        assert_eq!(from_f32.item::<f16>().to_bits(), v.to_bits());
    }
    Ok(())
}

#[test]
#[allow(deprecated)]
fn bf16_round_trips_through_item_and_slice() -> TestResult {
    let values = exact_bf16_values();
    let a = Array::from_slice(&values, &[values.len() as i32]);
    assert_eq!(a.dtype(), Dtype::Bfloat16);
    assert_eq!(a.item_size(), 2);
    let bits = |s: &[bf16]| s.iter().map(|h| h.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(a.as_slice::<bf16>()), bits(&values));
    let widened = a.as_type::<f32>()?;
    let want: Vec<u32> = values.iter().map(|h| h.to_f32().to_bits()).collect();
    let got: Vec<u32> = widened
        .as_slice::<f32>()
        .iter()
        .map(|v| v.to_bits())
        .collect();
    assert_eq!(got, want);

    for &v in &values {
        let scalar = Array::from_slice(&[v], &[]);
        assert_eq!(scalar.item::<bf16>().to_bits(), v.to_bits());
        assert_eq!(scalar.item_exact::<bf16>().to_bits(), v.to_bits());
        assert_eq!(scalar.item_cast::<f32>().to_bits(), v.to_f32().to_bits());
    }
    // item_exact refuses a dtype mismatch instead of converting.
    assert!(Array::from_f32(1.0).try_item_exact::<bf16>().is_err());
    Ok(())
}

/// f32 inputs that are mostly *not* representable in f16/bf16: rounding, round-half-to-even
/// ties, overflow to infinity, subnormals, underflow to zero and NaN.
fn narrowing_inputs() -> Vec<f32> {
    let mut v = vec![
        0.1f32,
        -1.0 / 3.0,
        std::f32::consts::PI,
        65519.0,            // rounds down to f16::MAX
        65520.0,            // f16 overflow: rounds to +inf
        -1e6,               // f16 overflow: -inf
        1e-6,               // f16 subnormal
        1e-8,               // f16 underflow to zero
        2.980_232_2e-8,     // 2^-25: tie between 0 and 2^-24 -> 0 (even)
        1.0 + 1.0 / 2048.0, // f16 tie 1 + 2^-11 -> 1 (even)
        1.0 + 3.0 / 2048.0, // f16 tie -> 1 + 2^-9 (even)
        1.0 + 1.0 / 256.0,  // bf16 tie -> 1 (even)
        1.0 + 3.0 / 256.0,  // bf16 tie -> 1 + 2^-6 (even)
        3.4e38,             // bf16 rounds to bf16::MAX region / inf
        -2.5e-5,
        123.456,
        f32::MIN_POSITIVE,
        f32::NAN,
    ];
    v.extend(splitmix_values(7, 64).iter().map(|x| x * 1000.0));
    v
}

#[test]
fn f32_to_f16_and_bf16_conversion_matches_half_crate() -> TestResult {
    let inputs = narrowing_inputs();
    let a = Array::from_slice(&inputs, &[inputs.len() as i32]);

    let h = a.as_dtype(Dtype::Float16)?;
    assert_eq!(h.dtype(), Dtype::Float16);
    for (i, (&got, &x)) in h.as_slice::<f16>().iter().zip(&inputs).enumerate() {
        let want = f16::from_f32(x);
        if want.is_nan() {
            assert!(
                got.is_nan(),
                "element {i}: f16({x}) should be NaN, got {got}"
            );
        } else {
            assert_eq!(
                got.to_bits(),
                want.to_bits(),
                "element {i}: f16({x}): got {got}, want {want}"
            );
        }
    }

    let b = a.as_dtype(Dtype::Bfloat16)?;
    assert_eq!(b.dtype(), Dtype::Bfloat16);
    for (i, (&got, &x)) in b.as_slice::<bf16>().iter().zip(&inputs).enumerate() {
        let want = bf16::from_f32(x);
        if want.is_nan() {
            assert!(
                got.is_nan(),
                "element {i}: bf16({x}) should be NaN, got {got}"
            );
        } else {
            assert_eq!(
                got.to_bits(),
                want.to_bits(),
                "element {i}: bf16({x}): got {got}, want {want}"
            );
        }
    }

    // Narrow -> widen -> narrow is the identity on the narrowed values.
    let again = h.as_dtype(Dtype::Float32)?.as_dtype(Dtype::Float16)?;
    let bits = |a: &Array| {
        a.as_slice::<f16>()
            .iter()
            .map(|v| v.to_bits())
            .collect::<Vec<_>>()
    };
    assert_eq!(bits(&again), bits(&h));
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 3. safetensors
// ---------------------------------------------------------------------------------------------

#[test]
fn safetensors_round_trip_preserves_dtype_shape_and_bits() -> TestResult {
    let f32_vals: Vec<f32> = splitmix_values(11, 6).iter().map(|v| v * 1e3).collect();
    let f16_vals: Vec<f16> = exact_f16_values();
    let bf16_vals: Vec<bf16> = exact_bf16_values()[..8].to_vec();
    let i32_vals = [
        i32::MIN,
        -1,
        0,
        1,
        2,
        3,
        1 << 24,
        (1 << 24) + 1,
        77,
        -77,
        5,
        i32::MAX,
    ];

    let mut arrays: HashMap<String, Array> = HashMap::new();
    arrays.insert("layer.f32".into(), Array::from_slice(&f32_vals, &[2, 3]));
    arrays.insert(
        "layer.f16".into(),
        Array::from_slice(&f16_vals, &[f16_vals.len() as i32]),
    );
    arrays.insert(
        "layer.bf16".into(),
        Array::from_slice(&bf16_vals, &[2, 2, 2]),
    );
    arrays.insert("layer.i32".into(), Array::from_slice(&i32_vals, &[3, 1, 4]));
    arrays.insert("scalar".into(), Array::from_slice(&[2.5f32], &[]));
    let metadata: HashMap<String, String> = [
        ("format".to_string(), "mlx".to_string()),
        ("note".into(), "round trip".into()),
    ]
    .into();

    let dir = tempfile::tempdir()?;
    let path = dir.path().join("weights.safetensors");
    Array::save_safetensors(&arrays, &metadata, &path)?;
    assert!(std::fs::metadata(&path)?.len() > 0);

    let (loaded, loaded_meta) = Array::load_safetensors_with_metadata(&path)?;
    assert_eq!(loaded_meta, metadata);
    let plain = Array::load_safetensors(&path)?;
    let mut keys: Vec<_> = loaded.keys().cloned().collect();
    keys.sort();
    let mut want_keys: Vec<_> = arrays.keys().cloned().collect();
    want_keys.sort();
    assert_eq!(keys, want_keys);
    assert_eq!(plain.len(), arrays.len());

    for (name, original) in &arrays {
        for got in [&loaded[name], &plain[name]] {
            assert_eq!(got.dtype(), original.dtype(), "{name}: dtype");
            assert_eq!(got.shape(), original.shape(), "{name}: shape");
        }
    }
    let got = &loaded["layer.f32"];
    let bits = |s: &[f32]| s.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(got.as_slice::<f32>()), bits(&f32_vals));
    let got = &loaded["layer.f16"];
    let want: Vec<u16> = f16_vals.iter().map(|v| v.to_bits()).collect();
    let have: Vec<u16> = got.as_slice::<f16>().iter().map(|v| v.to_bits()).collect();
    assert_eq!(have, want);
    let got = &loaded["layer.bf16"];
    let want: Vec<u16> = bf16_vals.iter().map(|v| v.to_bits()).collect();
    let have: Vec<u16> = got.as_slice::<bf16>().iter().map(|v| v.to_bits()).collect();
    assert_eq!(have, want);
    assert_eq!(loaded["layer.i32"].as_slice::<i32>(), &i32_vals);
    assert_eq!(loaded["scalar"].item_exact::<f32>(), 2.5);
    assert_eq!(plain["layer.i32"].as_slice::<i32>(), &i32_vals);

    // The file is standard safetensors: an 8-byte little-endian header length, then JSON
    // naming each tensor with its dtype and shape.
    let bytes = std::fs::read(&path)?;
    let header_len = u64::from_le_bytes(bytes[..8].try_into()?) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + header_len])?;
    assert_eq!(header["layer.bf16"]["dtype"], "BF16");
    assert_eq!(header["layer.f16"]["dtype"], "F16");
    assert_eq!(header["layer.i32"]["dtype"], "I32");
    assert_eq!(header["layer.i32"]["shape"], serde_json::json!([3, 1, 4]));
    assert_eq!(header["__metadata__"]["note"], "round trip");
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 4. random
// ---------------------------------------------------------------------------------------------

#[test]
fn random_key_is_the_seed_split_into_two_u32_words() -> TestResult {
    // MLX's threefry key for a u64 seed is [seed >> 32, seed & 0xffff_ffff] as uint32.
    let k = random::key(0x0000_0001_0000_0002)?;
    assert_eq!(k.dtype(), Dtype::Uint32);
    assert_eq!(k.shape(), &[2]);
    assert_eq!(k.as_slice::<u32>(), &[1, 2]);
    assert_eq!(random::key(42)?.as_slice::<u32>(), &[0, 42]);
    Ok(())
}

#[test]
fn random_same_key_reproduces_different_keys_differ() -> TestResult {
    let shape = [64, 32];
    let k1 = random::key(1234)?;
    let k1_again = random::key(1234)?;
    let k2 = random::key(1235)?;

    let bits = |a: &Array| {
        a.as_slice::<f32>()
            .iter()
            .map(|v| v.to_bits())
            .collect::<Vec<_>>()
    };
    let u1 = random::uniform::<_, f32>(0.0f32, 1.0f32, &shape[..], &k1)?;
    let u1_again = random::uniform::<_, f32>(0.0f32, 1.0f32, &shape[..], &k1_again)?;
    let u2 = random::uniform::<_, f32>(0.0f32, 1.0f32, &shape[..], &k2)?;
    assert_eq!(bits(&u1), bits(&u1_again));
    let differing = bits(&u1)
        .iter()
        .zip(bits(&u2))
        .filter(|(a, b)| **a != *b)
        .count();
    assert!(
        differing > 2000,
        "only {differing} of 2048 values differ between keys"
    );

    let n1 = random::normal::<f32>(&shape[..], None, None, &k1)?;
    let n1_again = random::normal::<f32>(&shape[..], None, None, &k1)?;
    let n2 = random::normal::<f32>(&shape[..], None, None, &k2)?;
    assert_eq!(bits(&n1), bits(&n1_again));
    assert_ne!(bits(&n1), bits(&n2));

    // split is deterministic and its halves are different keys.
    let (a, b) = random::split(&k1, 2)?;
    let (a2, b2) = random::split(&k1_again, 2)?;
    assert_eq!(a.as_slice::<u32>(), a2.as_slice::<u32>());
    assert_eq!(b.as_slice::<u32>(), b2.as_slice::<u32>());
    assert_ne!(a.as_slice::<u32>(), b.as_slice::<u32>());
    assert_ne!(a.as_slice::<u32>(), k1.as_slice::<u32>());

    // The thread-local generator: seeding twice replays the same stream.
    random::seed(99)?;
    let s1 = random::uniform::<_, f32>(0.0f32, 1.0f32, &[16][..], None)?;
    let s1_next = random::uniform::<_, f32>(0.0f32, 1.0f32, &[16][..], None)?;
    random::seed(99)?;
    let s2 = random::uniform::<_, f32>(0.0f32, 1.0f32, &[16][..], None)?;
    assert_eq!(bits(&s1), bits(&s2));
    assert_ne!(bits(&s1), bits(&s1_next));
    Ok(())
}

#[test]
fn random_distributions_have_the_right_range_and_moments() -> TestResult {
    let n = 20_000usize;
    let key = random::key(7)?;
    let u = random::uniform::<_, f32>(-2.0f32, 3.0f32, &[n as i32][..], &key)?;
    let u = u.as_slice::<f32>();
    assert!(u.iter().all(|&v| (-2.0..3.0).contains(&v)));
    // Uniform(-2, 3): mean 0.5, variance 25/12. Standard error of the mean = sqrt(25/12/n).
    let mean = u.iter().map(|&v| f64::from(v)).sum::<f64>() / n as f64;
    let se = (25.0 / 12.0 / n as f64).sqrt();
    assert!((mean - 0.5).abs() < 6.0 * se, "uniform mean {mean}");

    let z = random::normal::<f32>(&[n as i32][..], 1.5f32, 2.0f32, &key)?;
    let z: Vec<f64> = z.as_slice::<f32>().iter().map(|&v| f64::from(v)).collect();
    let mean = z.iter().sum::<f64>() / n as f64;
    let var = z.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1) as f64;
    // N(1.5, 2²): SE(mean) = 2/sqrt(n); SE(var) ~= sigma² * sqrt(2/(n-1)).
    assert!(
        (mean - 1.5).abs() < 6.0 * 2.0 / (n as f64).sqrt(),
        "normal mean {mean}"
    );
    assert!(
        (var - 4.0).abs() < 6.0 * 4.0 * (2.0 / (n - 1) as f64).sqrt(),
        "normal var {var}"
    );
    Ok(())
}

#[test]
fn random_state_new_and_seeded_states() -> TestResult {
    // RandomState::new() seeds from mach_approximate_time(), which our mlx-sys provides on Linux.
    let mut fresh = random::RandomState::new()?;
    let k = fresh.next_key()?;
    assert_eq!(k.shape(), &[2]);
    assert_eq!(k.dtype(), Dtype::Uint32);
    let _default = random::RandomState::default();

    let mut s1 = random::RandomState::with_seed(5)?;
    let mut s2 = random::RandomState::with_seed(5)?;
    let a1 = s1.next_key()?;
    let a2 = s2.next_key()?;
    assert_eq!(a1.as_slice::<u32>(), a2.as_slice::<u32>());
    let b1 = s1.next_key()?;
    assert_ne!(a1.as_slice::<u32>(), b1.as_slice::<u32>());
    // next_key is split(state)[1]; the new state is split(state)[0].
    let (_, want) = random::split(random::key(5)?, 2)?;
    assert_eq!(a1.as_slice::<u32>(), want.as_slice::<u32>());

    // with_random_state drives key-less sampling reproducibly.
    let draw = |seed| {
        random::with_random_state(random::RandomState::with_seed(seed).unwrap(), || {
            random::normal::<f32>(&[8][..], None, None, None)
                .unwrap()
                .as_slice::<f32>()
                .to_vec()
        })
    };
    assert_eq!(draw(3), draw(3));
    assert_ne!(draw(3), draw(4));
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 5. affine quantization
// ---------------------------------------------------------------------------------------------

/// The per-group parameters of MLX's affine quantization, from its closed form (computed in f32
/// like MLX does). MLX does not simply use scale = (max-min)/n, bias = min: it keeps the edge of
/// larger magnitude exact and makes zero exactly representable:
///
/// ```text
/// n     = 2^bits - 1
/// s     = max((max - min) / n, 1e-7)
/// edge  = |min| > |max| ? min : max         (and s is negated when edge = max)
/// q0    = rint(edge / s)
/// scale = q0 != 0 ? edge / q0 : s
/// bias  = q0 != 0 ? edge : 0
/// q(x)  = min(rint((x - bias) / scale), n),  x̂ = scale * q + bias
/// ```
///
/// The grid is therefore [bias, bias + n*scale] (in some order) with step |scale|, which can be
/// slightly narrower than [min, max]; the worst-case error is max(|scale|/2, overshoot), where
/// overshoot is how far the group's extreme values lie outside the grid.
struct AffineGroup {
    scale: f32,
    bias: f32,
    /// Closed-form error bound for every element of the group (before rounding allowance).
    bound: f64,
}

fn affine_group(group: &[f32], bits: i32) -> AffineGroup {
    let n_bins = ((1 << bits) - 1) as f32;
    let w_min = group.iter().copied().fold(f32::INFINITY, f32::min);
    let w_max = group.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut scale = ((w_max - w_min) / n_bins).max(1e-7);
    let side = w_min.abs() > w_max.abs();
    if !side {
        scale = -scale;
    }
    let edge = if side { w_min } else { w_max };
    let q0 = (edge / scale).round_ties_even();
    let (scale, bias) = if q0 != 0.0 {
        (edge / q0, edge)
    } else {
        (scale, 0.0)
    };

    let (s, b) = (f64::from(scale), f64::from(bias));
    let end = b + f64::from(n_bins) * s;
    let (lo, hi) = (b.min(end), b.max(end));
    let overshoot = (f64::from(w_max) - hi).max(lo - f64::from(w_min)).max(0.0);
    AffineGroup {
        scale,
        bias,
        bound: (s.abs() / 2.0).max(overshoot),
    }
}

/// Test matrix for quantization: rows with different character (mixed sign, all positive, all
/// negative, tiny, large, containing exact zeros, constant groups).
fn quantization_input(rows: usize, cols: usize) -> Vec<f32> {
    let base = splitmix_values(0xC0FFEE, rows * cols);
    let mut w = Vec::with_capacity(rows * cols);
    for r in 0..rows {
        for c in 0..cols {
            let v = base[r * cols + c];
            w.push(match r % 8 {
                0 => v,
                1 => v + 3.0,           // all positive
                2 => -5.0 + v * 0.5,    // all negative
                3 => v * 1e-3,          // tiny
                4 => v * 250.0,         // large
                5 if c % 7 == 0 => 0.0, // exact zeros inside mixed-sign groups
                5 => v * 2.0 - 0.3,
                6 if c < 64 => 0.75, // constant groups
                6 => 0.0,
                _ => v.powi(3) * 10.0, // heavy-tailed
            });
        }
    }
    w
}

fn check_affine_round_trip(
    input: &[f32],
    rows: usize,
    cols: usize,
    dtype: Dtype,
    group_size: i32,
    bits: i32,
) {
    let what = format!("{dtype:?} bits={bits} group={group_size}");
    let w = Array::from_slice(input, &[rows as i32, cols as i32])
        .as_dtype(dtype)
        .unwrap();
    // The values MLX actually sees (rounded to `dtype`).
    let x = to_f32(&w);
    let (wq, scales, biases) = quantize(&w, group_size, bits).unwrap();
    assert_eq!(wq.dtype(), Dtype::Uint32, "{what}");
    // bits per element, packed into u32 words.
    assert_eq!(
        wq.shape(),
        &[rows as i32, cols as i32 * bits / 32],
        "{what}"
    );
    let groups = cols / group_size as usize;
    assert_eq!(scales.shape(), &[rows as i32, groups as i32], "{what}");
    assert_eq!(biases.shape(), &[rows as i32, groups as i32], "{what}");
    assert_eq!(scales.dtype(), dtype, "{what}");
    let deq = dequantize(&wq, &scales, &biases, group_size, bits).unwrap();
    assert_eq!(deq.shape(), w.shape(), "{what}");
    assert_eq!(deq.dtype(), dtype, "{what}");

    let deq = to_f32(&deq);
    let got_scales = to_f32(&scales);
    let got_biases = to_f32(&biases);
    // Unit roundoff of the storage type of scales, biases and the dequantized output.
    // `tiny` is half the smallest subnormal: the absolute rounding error near zero (a
    // constant group's scale is the 1e-7 floor, which is subnormal in f16).
    let (u, tiny) = match dtype {
        Dtype::Float32 => (f64::from(f32::EPSILON) / 2.0, 2f64.powi(-150)),
        Dtype::Float16 => (2f64.powi(-11), 2f64.powi(-25)),
        Dtype::Bfloat16 => (2f64.powi(-8), 2f64.powi(-134)),
        _ => unreachable!(),
    };
    let n_bins = f64::from((1 << bits) - 1);
    let mut naive_violations = 0;
    for r in 0..rows {
        for g in 0..groups {
            let start = r * cols + g * group_size as usize;
            let group = &x[start..start + group_size as usize];
            let want = affine_group(group, bits);
            let gi = r * groups + g;
            let (s, b) = (f64::from(want.scale), f64::from(want.bias));
            // Scales and biases are the closed form rounded to the storage type.
            assert!(
                (f64::from(got_scales[gi]) - s).abs() <= 2.0 * u * s.abs() + tiny,
                "{what}: row {r} group {g}: scale {} vs closed form {s}",
                got_scales[gi]
            );
            assert!(
                (f64::from(got_biases[gi]) - b).abs() <= 2.0 * u * b.abs() + tiny,
                "{what}: row {r} group {g}: bias {} vs closed form {b}",
                got_biases[gi]
            );
            // Rounding allowance: storing scale and bias (|q| <= n) and the dequantized value
            // in the storage type, plus f32 arithmetic, each a few units of roundoff of the
            // magnitudes involved.
            let magnitude = b.abs() + n_bins * s.abs();
            let allowance =
                4.0 * u * magnitude + 8.0 * f64::from(f32::EPSILON) * magnitude + n_bins * tiny;
            let naive = (f64::from(group.iter().copied().fold(f32::NEG_INFINITY, f32::max))
                - f64::from(group.iter().copied().fold(f32::INFINITY, f32::min)))
                / n_bins
                / 2.0;
            for (j, &v) in group.iter().enumerate() {
                let err = (f64::from(deq[start + j]) - f64::from(v)).abs();
                assert!(
                    err <= want.bound + allowance,
                    "{what}: row {r} group {g} elem {j}: x={v} x̂={} err {err} > bound {} + {allowance}",
                    deq[start + j],
                    want.bound
                );
                if err > naive + allowance {
                    naive_violations += 1;
                }
                // Zero is exactly on the grid whenever the group straddles it.
                if v == 0.0 && b != 0.0 && (-b / s) <= n_bins + 0.5 && (-b / s) >= -0.5 {
                    assert!(
                        f64::from(deq[start + j]).abs() <= allowance,
                        "{what}: row {r} group {g}: zero dequantized to {}",
                        deq[start + j]
                    );
                }
            }
        }
    }
    // Informational: how often the naive (max-min)/n/2 bound is exceeded (see
    // `affine_quantization_can_exceed_the_naive_half_step_bound`).
    if naive_violations > 0 {
        eprintln!("{what}: {naive_violations} elements exceed the naive (max-min)/n/2 bound");
    }
}

#[test]
fn affine_quantize_dequantize_within_closed_form_bound() {
    let (rows, cols) = (16usize, 256usize);
    let input = quantization_input(rows, cols);
    for bits in [4, 8] {
        for group_size in [32, 64] {
            check_affine_round_trip(&input, rows, cols, Dtype::Float32, group_size, bits);
        }
    }
    // Half-precision weights: scales/biases/outputs are stored in f16 / bf16.
    check_affine_round_trip(&input, rows, cols, Dtype::Float16, 64, 4);
    check_affine_round_trip(&input, rows, cols, Dtype::Bfloat16, 32, 8);
}

#[test]
fn affine_quantization_can_exceed_the_naive_half_step_bound() -> TestResult {
    // One 4-bit group of 32 with min -7.6, max 7.4 and a zero. By hand:
    //   s = 15/15 = 1, |min| > |max| so edge = -7.6, q0 = rint(-7.6) = -8,
    //   scale = -7.6 / -8 = 0.95, bias = -7.6; the grid ends at -7.6 + 15*0.95 = 6.65.
    // So 7.4 dequantizes to 6.65 (error 0.75 > (max-min)/15/2 = 0.5), while 0 is exact:
    //   q(0) = rint(7.6 / 0.95) = 8 and -7.6 + 8*0.95 = 0.
    let mut group = vec![-7.6f32, 7.4, 0.0];
    group.extend((3..32).map(|i| -7.0 + 14.0 * (i as f32) / 32.0));
    let w = Array::from_slice(&group, &[1, 32]);
    let (wq, scales, biases) = quantize(&w, 32, 4)?;
    assert!((scales.as_slice::<f32>()[0] - 0.95).abs() < 1e-6);
    assert!((biases.as_slice::<f32>()[0] + 7.6).abs() < 1e-6);
    let deq = dequantize(&wq, &scales, &biases, 32, 4)?;
    let deq = deq.as_slice::<f32>();
    assert!((deq[0] + 7.6).abs() < 1e-6, "min is exact: {}", deq[0]);
    assert!((deq[1] - 6.65).abs() < 1e-5, "7.4 -> 6.65, got {}", deq[1]);
    assert!(
        (deq[1] - 7.4).abs() > 0.5 + 0.2,
        "error exceeds the naive bound"
    );
    assert_eq!(deq[2], 0.0, "zero is exactly representable");
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 6. fast:: kernels
// ---------------------------------------------------------------------------------------------

/// rms_norm reference with plain ops: x * rsqrt(mean(x²) + eps) * w.
fn rms_norm_reference(x: &Array, w: Option<&Array>, eps: f32) -> Array {
    let ms = x.square().unwrap().mean_axis(-1, true).unwrap();
    let y = x * (ms + eps).rsqrt().unwrap();
    match w {
        Some(w) => y * w,
        None => y,
    }
}

/// layer_norm reference with plain ops: (x - mean) / sqrt(var + eps) * w + b.
fn layer_norm_reference(x: &Array, w: Option<&Array>, b: Option<&Array>, eps: f32) -> Array {
    let mean = x.mean_axis(-1, true).unwrap();
    let var = x.var_axis(-1, true, 0).unwrap();
    let mut y = (x - &mean) * (var + eps).rsqrt().unwrap();
    if let Some(w) = w {
        y *= w;
    }
    if let Some(b) = b {
        y += b;
    }
    y
}

#[derive(Debug, Clone)]
struct NormCase {
    shape: Vec<i32>,
    x: Vec<f32>,
    w: Vec<f32>,
    b: Vec<f32>,
    eps: f32,
}

fn norm_case() -> impl Strategy<Value = NormCase> {
    (
        prop::collection::vec(1i32..4, 0..3),
        1i32..200,
        prop_oneof![Just(1e-5f32), Just(1e-6), Just(1e-3)],
        prop_oneof![Just(1.0f32), Just(1e-2), Just(100.0)],
    )
        .prop_flat_map(|(lead, d, eps, mag)| {
            let mut shape = lead;
            shape.push(d);
            let n: i32 = shape.iter().product();
            (
                Just(shape),
                prop::collection::vec(-mag..mag, n as usize),
                prop::collection::vec(-2.0f32..2.0, d as usize),
                prop::collection::vec(-1.0f32..1.0, d as usize),
                Just(eps),
            )
        })
        .prop_map(|(shape, x, w, b, eps)| NormCase {
            shape,
            x,
            w,
            b,
            eps,
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]

    #[test]
    fn rms_norm_matches_plain_ops(case in norm_case()) {
        let d = *case.shape.last().unwrap();
        let x = Array::from_slice(&case.x, &case.shape);
        let w = Array::from_slice(&case.w, &[d]);
        for weight in [Some(&w), None] {
            let got = fast::rms_norm(&x, weight, case.eps).unwrap();
            prop_assert_eq!(got.shape(), &case.shape[..]);
            let want = rms_norm_reference(&x, weight, case.eps);
            assert_close(&to_f32(&got), &to_f32(&want), 1e-5, 1e-5, "rms_norm");
        }
    }

    #[test]
    fn layer_norm_matches_plain_ops(case in norm_case()) {
        let d = *case.shape.last().unwrap();
        let x = Array::from_slice(&case.x, &case.shape);
        let w = Array::from_slice(&case.w, &[d]);
        let b = Array::from_slice(&case.b, &[d]);
        for (weight, bias) in [(Some(&w), Some(&b)), (Some(&w), None), (None, Some(&b)), (None, None)] {
            let got = fast::layer_norm(&x, weight, bias, case.eps).unwrap();
            prop_assert_eq!(got.shape(), &case.shape[..]);
            let want = layer_norm_reference(&x, weight, bias, case.eps);
            // (x - mean) loses absolute precision relative to |mean|; the normalized outputs
            // are O(1)-O(10), so allow a few f32 ulps of that.
            assert_close(&to_f32(&got), &to_f32(&want), 2e-5, 2e-5, "layer_norm");
        }
    }
}

#[test]
fn rms_norm_and_layer_norm_hand_computed() -> TestResult {
    // x = [3, 4]: mean(x²) = 12.5, rms = sqrt(12.5); eps = 0.
    let x = Array::from_slice(&[3.0f32, 4.0], &[1, 2]);
    let w = Array::from_slice(&[2.0f32, -1.0], &[2]);
    let r = 12.5f32.sqrt();
    let got = fast::rms_norm(&x, Some(&w), 0.0)?;
    assert_close(&to_f32(&got), &[6.0 / r, -4.0 / r], 1e-6, 1e-6, "rms_norm");
    // layer_norm of [3, 4]: mean 3.5, var 0.25 -> [-1, 1] (eps = 0), then *w + b.
    let b = Array::from_slice(&[0.5f32, 0.25], &[2]);
    let got = fast::layer_norm(&x, &w, &b, 0.0)?;
    assert_close(&to_f32(&got), &[-1.5, -0.75], 1e-6, 1e-6, "layer_norm");
    Ok(())
}

/// Plain-Rust RoPE on a row-major array whose last two axes are (position, feature):
/// for each pair (a, b) of rotated features with inverse frequency f_i, and the angle
/// θ = (offset + t) * scale * f_i, out_a = a cosθ - b sinθ, out_b = a sinθ + b cosθ.
/// Non-traditional pairs feature i with i + dims/2; traditional pairs 2i with 2i+1.
/// Features at or beyond `dims` pass through.
#[allow(clippy::too_many_arguments)] // mirrors `fast::rope`'s parameters one to one
fn rope_reference(
    x: &[f32],
    seq: usize,
    head_dim: usize,
    dims: usize,
    traditional: bool,
    scale: f32,
    offset: i32,
    inv_freqs: &[f64],
) -> Vec<f32> {
    assert_eq!(inv_freqs.len(), dims / 2);
    let mut out = x.to_vec();
    for (row, chunk) in x.chunks(head_dim).enumerate() {
        let pos = f64::from(offset) + (row % seq) as f64;
        for (i, &f) in inv_freqs.iter().enumerate() {
            let theta = pos * f64::from(scale) * f;
            let (ia, ib) = if traditional {
                (2 * i, 2 * i + 1)
            } else {
                (i, i + dims / 2)
            };
            let (a, b) = (f64::from(chunk[ia]), f64::from(chunk[ib]));
            out[row * head_dim + ia] = (a * theta.cos() - b * theta.sin()) as f32;
            out[row * head_dim + ib] = (a * theta.sin() + b * theta.cos()) as f32;
        }
    }
    out
}

/// base^(-2i/dims), i in 0..dims/2 — the default RoPE inverse frequencies.
fn base_inv_freqs(base: f32, dims: usize) -> Vec<f64> {
    (0..dims / 2)
        .map(|i| f64::from(base).powf(-2.0 * i as f64 / dims as f64))
        .collect()
}

#[derive(Debug, Clone)]
struct RopeCase {
    shape: Vec<i32>, // [batch, heads, seq, head_dim]
    dims: usize,
    traditional: bool,
    base: f32,
    scale: f32,
    offset: i32,
    freqs: Option<Vec<f32>>,
    x: Vec<f32>,
}

prop_compose! {
    fn rope_case()(
        batch in 1i32..3, heads in 1i32..4, seq in 1i32..7, half_head in 1usize..17,
    )(
        dims_half in 1..=half_head,
        x in prop::collection::vec(-2.0f32..2.0, (batch * heads * seq) as usize * 2 * half_head),
        freqs in prop::collection::vec(0.5f32..2000.0, half_head),
        use_freqs in any::<bool>(),
        traditional in any::<bool>(),
        offset in 0i32..64,
        base in prop_oneof![Just(10_000.0f32), Just(500_000.0), Just(10.0)],
        scale in prop_oneof![Just(1.0f32), Just(0.5), Just(0.25)],
        dims4 in Just((batch, heads, seq, half_head)),
    ) -> RopeCase {
        let (batch, heads, seq, half_head) = dims4;
        RopeCase {
            shape: vec![batch, heads, seq, 2 * half_head as i32],
            dims: 2 * dims_half,
            traditional,
            base,
            scale,
            offset,
            freqs: use_freqs.then(|| freqs[..dims_half].to_vec()),
            x,
        }
    }
}

fn run_rope(case: &RopeCase) -> Vec<f32> {
    let x = Array::from_slice(&case.x, &case.shape);
    let freqs = case
        .freqs
        .as_ref()
        .map(|f| Array::from_slice(f, &[f.len() as i32]));
    let base = if freqs.is_some() {
        None
    } else {
        Some(case.base)
    };
    let y = fast::rope(
        &x,
        case.dims as i32,
        case.traditional,
        base,
        case.scale,
        case.offset,
        freqs.as_ref(),
    )
    .unwrap();
    assert_eq!(y.shape(), &case.shape[..]);
    to_f32(&y)
}

fn rope_case_reference(case: &RopeCase) -> Vec<f32> {
    // With custom freqs, MLX uses the *reciprocal*: θ = position * scale / freqs[i]
    // (freqs are periods-like "frequencies" as in nn.RoPE's base^(2i/d), not inverse ones).
    let inv = match &case.freqs {
        Some(f) => f.iter().map(|&v| 1.0 / f64::from(v)).collect(),
        None => base_inv_freqs(case.base, case.dims),
    };
    let (seq, d) = (case.shape[2], case.shape[3]);
    rope_reference(
        &case.x,
        seq as usize,
        d as usize,
        case.dims,
        case.traditional,
        case.scale,
        case.offset,
        &inv,
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]

    #[test]
    fn rope_matches_closed_form(case in rope_case()) {
        let got = run_rope(&case);
        let want = rope_case_reference(&case);
        // Angles reach ~70 rad; MLX computes them in f32 (relative error ~1e-7), so the
        // rotated values (|x| <= 2 * sqrt 2) can be off by a few 1e-5.
        assert_close(&got, &want, 1e-4, 0.0, &format!("{case:?}"));
    }
}

#[test]
fn rope_conventions_hand_checked() -> TestResult {
    // One head, 3 positions, head_dim 8, dims 4 (features 4..8 pass through), offset 5.
    let (seq, d, dims, offset, base, scale) = (3usize, 8usize, 4usize, 5i32, 100.0f32, 1.0f32);
    let x: Vec<f32> = (0..seq * d).map(|i| 1.0 + i as f32 * 0.25).collect();
    let xa = Array::from_slice(&x, &[1, 1, seq as i32, d as i32]);

    // Non-traditional: angle for pair i is (offset + t) * base^(-2i/dims): 1 and 1/10.
    let inv = vec![1.0, 0.1];
    assert_close(
        &base_inv_freqs(base, dims)
            .iter()
            .map(|&f| f as f32)
            .collect::<Vec<_>>(),
        &[1.0, 0.1],
        1e-7,
        0.0,
        "base^(-2i/dims)",
    );
    for traditional in [false, true] {
        let got = to_f32(&fast::rope(
            &xa,
            dims as i32,
            traditional,
            base,
            scale,
            offset,
            None,
        )?);
        let want = rope_reference(&x, seq, d, dims, traditional, scale, offset, &inv);
        assert_close(
            &got,
            &want,
            1e-5,
            0.0,
            &format!("traditional={traditional}"),
        );
        // Pass-through features are untouched bit-for-bit.
        for t in 0..seq {
            assert_eq!(
                &got[t * d + dims..(t + 1) * d],
                &x[t * d + dims..(t + 1) * d]
            );
        }
        // Traditional and non-traditional really differ.
        let other = rope_reference(&x, seq, d, dims, !traditional, scale, offset, &inv);
        assert!(got.iter().zip(&other).any(|(a, b)| (a - b).abs() > 1e-2));
    }

    // Hand-computed single rotation: one pair (a, b) = (1, 2) at position 0 + offset 1, so
    // the angle is 1 rad: (1, 2) -> (cos1 - 2 sin1, sin1 + 2 cos1).
    let v = Array::from_slice(&[1.0f32, 2.0], &[1, 1, 2]);
    let got = to_f32(&fast::rope(&v, 2, false, 10_000.0f32, 1.0, 1, None)?);
    let (c, s) = (1f32.cos(), 1f32.sin());
    assert_close(
        &got,
        &[c - 2.0 * s, s + 2.0 * c],
        1e-6,
        0.0,
        "single rotation",
    );

    // Custom freqs: θ = position * scale / freqs[i], i.e. MLX takes the reciprocal of freqs.
    // Passing freqs = base^(2i/dims) therefore reproduces the `base` variant.
    let freqs_vals: Vec<f32> = base_inv_freqs(base, dims)
        .iter()
        .map(|f| (1.0 / f) as f32)
        .collect();
    let freqs = Array::from_slice(&freqs_vals, &[freqs_vals.len() as i32]);
    for traditional in [false, true] {
        let with_freqs = to_f32(&fast::rope(
            &xa,
            dims as i32,
            traditional,
            None,
            0.5,
            offset,
            &freqs,
        )?);
        let with_base = to_f32(&fast::rope(
            &xa,
            dims as i32,
            traditional,
            base,
            0.5,
            offset,
            None,
        )?);
        assert_close(
            &with_freqs,
            &with_base,
            1e-5,
            0.0,
            "freqs = base^(2i/d) is the base variant",
        );
        let reciprocal = rope_reference(&x, seq, d, dims, traditional, 0.5, offset, &inv);
        assert_close(
            &with_freqs,
            &reciprocal,
            1e-5,
            0.0,
            "θ = pos * scale / freqs[i]",
        );
        // ... and not θ = pos * scale * freqs[i].
        let direct: Vec<f64> = freqs_vals.iter().map(|&f| f64::from(f)).collect();
        let wrong = rope_reference(&x, seq, d, dims, traditional, 0.5, offset, &direct);
        assert!(with_freqs
            .iter()
            .zip(&wrong)
            .any(|(a, b)| (a - b).abs() > 1e-2));
    }
    Ok(())
}

/// softmax(Q Kᵀ * scale + mask) V with plain ops; K and V heads are repeated so that query head
/// h uses kv head h / (Hq / Hkv).
fn sdpa_reference(q: &Array, k: &Array, v: &Array, scale: f32, mask: Option<&Array>) -> Array {
    let n_rep = q.dim(1) / k.dim(1);
    let k = Array::repeat_axis::<f32>(k.clone(), n_rep, 1).unwrap();
    let v = Array::repeat_axis::<f32>(v.clone(), n_rep, 1).unwrap();
    let mut scores = q.matmul(k.swap_axes(-1, -2).unwrap()).unwrap() * scale;
    if let Some(m) = mask {
        scores += m;
    }
    ops::softmax_axis(&scores, -1, true)
        .unwrap()
        .matmul(&v)
        .unwrap()
}

/// Additive causal mask aligned bottom-right (query i of L sees keys j <= i + S - L), which is
/// how a chunk of L new queries attends to a cache of S keys.
fn causal_additive(l: usize, s: usize) -> Array {
    let vals: Vec<f32> = (0..l * s)
        .map(|idx| {
            let (i, j) = (idx / s, idx % s);
            if j <= i + (s - l) {
                0.0
            } else {
                f32::NEG_INFINITY
            }
        })
        .collect();
    Array::from_slice(&vals, &[l as i32, s as i32])
}

#[test]
fn sdpa_gqa_matches_plain_softmax_attention() -> TestResult {
    let (b, hq, hkv, dh) = (2i32, 4i32, 2i32, 16i32);
    let scale = 1.0 / (dh as f32).sqrt();
    let key = random::key(2024)?;
    let keys: Vec<Array> = (0..4)
        .scan(key, |k, _| {
            let (next, sub) = random::split(&*k, 2).unwrap();
            *k = next;
            Some(sub)
        })
        .collect();

    for (l, s) in [(4i32, 4i32), (3, 7), (1, 6)] {
        let q = random::normal::<f32>(&[b, hq, l, dh][..], None, None, &keys[0])?;
        let k = random::normal::<f32>(&[b, hkv, s, dh][..], None, None, &keys[1])?;
        let v = random::normal::<f32>(&[b, hkv, s, dh][..], None, None, &keys[2])?;
        let ctx = format!("L={l} S={s}");

        // No mask.
        let got = fast::scaled_dot_product_attention(&q, &k, &v, scale, None, None)?;
        assert_eq!(got.shape(), &[b, hq, l, dh]);
        let want = sdpa_reference(&q, &k, &v, scale, None);
        assert_close(
            &to_f32(&got),
            &to_f32(&want),
            1e-5,
            0.0,
            &format!("{ctx} no mask"),
        );

        // Causal.
        let got = fast::scaled_dot_product_attention(
            &q,
            &k,
            &v,
            scale,
            ScaledDotProductAttentionMask::Causal,
            None,
        )?;
        let causal = causal_additive(l as usize, s as usize);
        let want = sdpa_reference(&q, &k, &v, scale, Some(&causal));
        assert_close(
            &to_f32(&got),
            &to_f32(&want),
            1e-5,
            0.0,
            &format!("{ctx} causal"),
        );
        if l > 1 {
            // The causal mask matters (sanity check of the reference itself).
            let unmasked = to_f32(&sdpa_reference(&q, &k, &v, scale, None));
            assert!(to_f32(&got)
                .iter()
                .zip(&unmasked)
                .any(|(a, b)| (a - b).abs() > 1e-3));
        }

        // Explicit additive mask, different per batch and query head: random biases plus a
        // -1e9 band that hides the first key from every other query.
        let bias = random::uniform::<_, f32>(-3.0f32, 3.0f32, &[b, hq, l, s][..], &keys[3])?;
        let mut band = vec![0.0f32; (b * hq * l * s) as usize];
        for (idx, m) in band.iter_mut().enumerate() {
            let (i, j) = ((idx / s as usize) % l as usize, idx % s as usize);
            if j == 0 && i % 2 == 1 {
                *m = -1e9;
            }
        }
        let mask = bias + Array::from_slice(&band, &[b, hq, l, s]);
        let got = fast::scaled_dot_product_attention(&q, &k, &v, scale, &mask, None)?;
        let want = sdpa_reference(&q, &k, &v, scale, Some(&mask));
        assert_close(
            &to_f32(&got),
            &to_f32(&want),
            1e-5,
            0.0,
            &format!("{ctx} additive mask"),
        );

        // A broadcast [L, S] additive mask.
        let got = fast::scaled_dot_product_attention(&q, &k, &v, scale, &causal, None)?;
        let want = sdpa_reference(&q, &k, &v, scale, Some(&causal));
        assert_close(
            &to_f32(&got),
            &to_f32(&want),
            1e-5,
            0.0,
            &format!("{ctx} [L,S] mask"),
        );
    }
    Ok(())
}

#[test]
fn sdpa_single_key_returns_its_value_and_uniform_scores_average() -> TestResult {
    // Closed forms: with one key, softmax is 1 and the output is that key's value for every
    // query; with all-equal keys, the weights are uniform and the output is the mean of V.
    let q = Array::from_slice(
        &[0.3f32, -1.0, 2.0, 0.5, 1.0, 1.0, -2.0, 0.0],
        &[1, 2, 2, 2],
    );
    let k = Array::from_slice(&[1.0f32, 2.0], &[1, 1, 1, 2]);
    let v = Array::from_slice(&[7.0f32, -3.0], &[1, 1, 1, 2]);
    let got = to_f32(&fast::scaled_dot_product_attention(
        &q, &k, &v, 0.7, None, None,
    )?);
    assert_close(
        &got,
        &[7.0, -3.0, 7.0, -3.0, 7.0, -3.0, 7.0, -3.0],
        1e-6,
        0.0,
        "one key",
    );

    let k = Array::from_slice(&[1.0f32, 2.0, 1.0, 2.0, 1.0, 2.0], &[1, 1, 3, 2]);
    let v = Array::from_slice(&[1.0f32, 10.0, 2.0, 20.0, 6.0, 60.0], &[1, 1, 3, 2]);
    let got = to_f32(&fast::scaled_dot_product_attention(
        &q, &k, &v, 0.7, None, None,
    )?);
    assert_close(
        &got,
        &[3.0, 30.0, 3.0, 30.0, 3.0, 30.0, 3.0, 30.0],
        1e-5,
        1e-6,
        "mean of V",
    );
    Ok(())
}
