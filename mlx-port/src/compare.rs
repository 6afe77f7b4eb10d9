//! How far apart two tensors are.

use crate::error::Result;
use mlx_rs::{Array, Dtype};
use serde::{Deserialize, Serialize};

/// Element-wise differences between our tensor and the reference.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
pub struct Diff {
    pub max_abs: f32,
    /// Largest |a - b| / max(|b|, 1e-6) (noisy where the reference is near zero).
    pub max_rel: f32,
    pub cosine: f32,
}

/// Host copy of a tensor as f32.
pub fn to_f32_vec(a: &Array) -> Result<Vec<f32>> {
    let a = if a.dtype() == Dtype::Float32 {
        a.clone()
    } else {
        a.as_dtype(Dtype::Float32)?
    };
    a.eval()?;
    Ok(a.as_slice::<f32>().to_vec())
}

/// Compares `ours` with `reference` (same number of elements).
pub fn diff(ours: &[f32], reference: &[f32]) -> Diff {
    assert_eq!(
        ours.len(),
        reference.len(),
        "compared tensors differ in size"
    );
    let (mut max_abs, mut max_rel) = (0.0f32, 0.0f32);
    let (mut dot, mut na, mut nb) = (0.0f64, 0.0f64, 0.0f64);
    for (&a, &b) in ours.iter().zip(reference) {
        let d = (a - b).abs();
        let d = if d.is_nan() { f32::INFINITY } else { d };
        max_abs = max_abs.max(d);
        max_rel = max_rel.max(d / b.abs().max(1e-6));
        dot += f64::from(a) * f64::from(b);
        na += f64::from(a) * f64::from(a);
        nb += f64::from(b) * f64::from(b);
    }
    let cosine = if na == 0.0 && nb == 0.0 {
        1.0
    } else {
        (dot / (na.sqrt() * nb.sqrt()).max(1e-30)) as f32
    };
    Diff {
        max_abs,
        max_rel,
        cosine,
    }
}

/// The indices of the `k` largest values, largest first.
pub fn top_k(row: &[f32], k: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..row.len()).collect();
    idx.sort_by(|&a, &b| row[b].total_cmp(&row[a]).then(a.cmp(&b)));
    idx.truncate(k);
    idx
}

/// The fraction of the reference's top-`k` entries that are in ours, averaged over rows
/// of `width` values.
pub fn top_k_overlap(ours: &[f32], reference: &[f32], width: usize, k: usize) -> f32 {
    let rows = ours.len() / width;
    if rows == 0 {
        return 1.0;
    }
    let total: usize = (0..rows)
        .map(|r| {
            let a = top_k(&ours[r * width..(r + 1) * width], k);
            let b = top_k(&reference[r * width..(r + 1) * width], k);
            b.iter().filter(|i| a.contains(i)).count()
        })
        .sum();
    total as f32 / (rows * k) as f32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn diff_of_known_vectors() {
        let d = diff(&[1.0, 2.0, 3.0], &[1.0, 2.5, 3.0]);
        assert_eq!(d.max_abs, 0.5);
        assert!((d.max_rel - 0.2).abs() < 1e-7);
        // cos = (1 + 5 + 9) / (sqrt(14) * sqrt(16.25))
        let expected = 15.0 / (14f64.sqrt() * 16.25f64.sqrt());
        assert!((f64::from(d.cosine) - expected).abs() < 1e-6);
    }

    #[test]
    fn nan_counts_as_infinitely_wrong() {
        assert_eq!(diff(&[f32::NAN], &[1.0]).max_abs, f32::INFINITY);
    }

    #[test]
    fn top_k_and_overlap() {
        assert_eq!(top_k(&[0.1, 5.0, 3.0, 4.0], 2), vec![1, 3]);
        let ours = [0.0, 1.0, 2.0, 3.0, /* row 2 */ 3.0, 2.0, 1.0, 0.0];
        let reference = [0.0, 1.0, 3.0, 2.0, /* row 2 */ 0.0, 2.0, 1.0, 3.0];
        // Row 1: top-2 {3,2} vs {2,3} → 2/2; row 2: {0,1} vs {3,1} → 1/2.
        assert_eq!(top_k_overlap(&ours, &reference, 4, 2), 0.75);
    }
}
