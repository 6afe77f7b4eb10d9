//! Helpers shared by the unit tests.

use mlx_rs::Array;

/// Seeded normal samples of `shape` with standard deviation `std`.
pub fn random(shape: &[i32], seed: u64, std: f32) -> Array {
    let key = mlx_rs::random::key(seed).unwrap();
    mlx_rs::random::normal::<f32>(shape, None, Some(std), &key).unwrap()
}

/// The largest absolute difference between two arrays of one shape.
pub fn max_abs(a: &Array, b: &Array) -> f32 {
    assert_eq!(a.shape(), b.shape());
    a.subtract(b)
        .unwrap()
        .abs()
        .unwrap()
        .max(None)
        .unwrap()
        .item_exact::<f32>()
}
