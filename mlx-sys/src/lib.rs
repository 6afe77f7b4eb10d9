//! Raw bindings to mlx-c 0.7.0, the C API of MLX that `mlx-rs` wraps.
//!
//! This crate stands in for the crates.io `mlx-sys 0.7.0` (patched in with
//! `[patch.crates-io]`) so that the unmodified `mlx-rs` builds on Linux as well as on
//! macOS. See the build script for where MLX comes from.

#![allow(non_upper_case_globals)]
#![allow(non_camel_case_types)]
#![allow(non_snake_case)]
#![allow(clippy::all)]
#![allow(rustdoc::all)]

/// IEEE half precision as its 16-bit pattern, the way bindgen renders `__fp16`.
#[cfg(not(target_arch = "aarch64"))]
#[repr(transparent)]
#[derive(Debug, Default, Copy, Clone, PartialEq, Eq, Hash)]
pub struct float16_t(pub u16);

/// bfloat16 as its 16-bit pattern, the way bindgen renders `__bf16`.
#[cfg(not(target_arch = "aarch64"))]
pub type bfloat16_t = u16;

include!(env!("MLX_SYS_BINDINGS"));

/// How this build provides MLX, for diagnostics (`mlx-models info`, `hello_mlx`).
#[cfg(not(target_os = "macos"))]
pub mod build_info {
    /// Where MLX came from: a wheel (with its cache path) or `MLX_DIR`.
    pub const MLX_SOURCE: &str = env!("MLX_SYS_MLX_SOURCE");
    /// The directory holding `libmlx.so`.
    pub const MLX_LIB_DIR: &str = env!("MLX_SYS_LIB_DIR");
    /// The BLAS linked ahead of MLX's own.
    pub const LINKED_BLAS: &str = env!("MLX_SYS_LINKED_BLAS");
    /// The wheel's bundled reference BLAS (empty with `MLX_DIR`): preload it to compare.
    pub const REFERENCE_BLAS: &str = env!("MLX_SYS_REFERENCE_BLAS");
}
