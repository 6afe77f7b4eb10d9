//! Prints the MLX version, device, BLAS in use and a 2048² f32 matmul speed as one JSON line.
//!
//! ```text
//! cargo run --release --example hello_mlx
//! ```
//! Compare with the reference BLAS bundled in the MLX wheel, side by side in one run:
//! `cargo xtask bench matmul`.

use mlx_models::runtime;
use mlx_rs::{random, transforms::eval, Array};
use std::time::Instant;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let n: i32 = std::env::var("HELLO_MLX_N")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2048);
    let key = random::key(0)?;
    let a = random::normal::<f32>(&[n, n], None, None, Some(&key))?;
    let b = random::normal::<f32>(&[n, n], None, None, Some(&key))?;
    eval([&a, &b])?;

    // One warm-up, then the best of a few runs.
    let matmul = |a: &Array, b: &Array| -> Result<f64, mlx_rs::error::Exception> {
        let start = Instant::now();
        let c = a.matmul(b)?;
        c.eval()?;
        Ok(start.elapsed().as_secs_f64())
    };
    matmul(&a, &b)?;
    let mut best = f64::INFINITY;
    for _ in 0..3 {
        best = best.min(matmul(&a, &b)?);
    }
    let gflops = 2.0 * f64::from(n).powi(3) / best / 1e9;

    let line = serde_json::json!({
        "mlx_version": runtime::mlx_version(),
        "device": runtime::default_device(),
        "blas": runtime::blas_name(),
        "blas_library": runtime::blas_library(),
        "matmul_n": n,
        "matmul_seconds": best,
        "matmul_gflops": (gflops * 10.0).round() / 10.0,
    });
    println!("{line}");
    Ok(())
}
