//! Build script of `mlx-sys`: provides MLX and mlx-c to the unmodified `mlx-rs`.
//!
//! * Linux: MLX comes from an official wheel (`mlx-cpu`, or `mlx-cuda-12`/`mlx-cuda-13`)
//!   or from `MLX_DIR`; mlx-c 0.7.0 (shipped inside the crates.io `mlx-sys` package) is
//!   compiled against its headers, bindings are generated with bindgen, and OpenBLAS is
//!   linked so that it is resolved ahead of the wheel's reference BLAS.
//! * macOS: the upstream way, MLX and mlx-c built with CMake, Metal and Accelerate.
//!
//! Downloads, the compiled mlx-c and the bindings are cached outside the target
//! directory (see `cache_dir`), so a clean build or a second clone reuses them.

mod cache;
mod linux;
#[cfg(target_os = "macos")]
mod macos;
mod mlx_c;
mod prerequisites;

use std::env;

fn main() {
    for var in [
        "MLX_DIR",
        "MLX_SYS_WHEEL",
        "MLX_SYS_BLAS",
        "MLX_SYS_CACHE_DIR",
        "XDG_CACHE_HOME",
        "LIBCLANG_PATH",
    ] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    println!("cargo:rerun-if-changed=build");
    println!("cargo:rerun-if-changed=native");

    let target_os = env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    if target_os == "macos" {
        #[cfg(target_os = "macos")]
        macos::build();
        #[cfg(not(target_os = "macos"))]
        prerequisites::fail("cross-compiling to macOS is not supported; build on a Mac");
    } else {
        linux::build();
    }
}
