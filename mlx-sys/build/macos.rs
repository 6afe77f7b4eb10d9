//! macOS: the upstream mlx-sys behaviour. mlx-c's CMake project fetches and builds MLX
//! with Metal (feature `metal`) and Accelerate (feature `accelerate`), statically.

use crate::cache::cache_dir;
use crate::mlx_c;
use std::env;
use std::path::Path;

pub fn build() {
    let sources = mlx_c::sources(&cache_dir());
    let metal = env::var_os("CARGO_FEATURE_METAL").is_some();
    let accelerate = env::var_os("CARGO_FEATURE_ACCELERATE").is_some();

    let mut config = cmake::Config::new(&sources);
    config
        .define("CMAKE_INSTALL_PREFIX", ".")
        .define("CMAKE_BUILD_TYPE", "Release")
        .define("MLX_C_BUILD_EXAMPLES", "OFF")
        .define("MLX_BUILD_METAL", if metal { "ON" } else { "OFF" })
        .define(
            "MLX_BUILD_ACCELERATE",
            if accelerate { "ON" } else { "OFF" },
        );
    if env::var_os("CARGO_FEATURE_METAL_JIT").is_some() {
        config.define("MLX_METAL_JIT", "ON");
    }
    let dst = config.build();
    let build = dst.join("build");

    println!("cargo:rustc-link-search=native={}", build.display());
    println!(
        "cargo:rustc-link-search=native={}",
        build.join("_deps/mlx-build").display()
    );
    println!(
        "cargo:rustc-link-search=native={}",
        build.join("_deps/mlx-build/mlx/io").display()
    );
    println!("cargo:rustc-link-lib=static=mlxc");
    println!("cargo:rustc-link-lib=static=mlx");
    if build.join("_deps/mlx-build/mlx/io/libgguflib.a").exists() {
        println!("cargo:rustc-link-lib=static=gguflib");
    }
    println!("cargo:rustc-link-lib=c++");
    println!("cargo:rustc-link-lib=framework=Foundation");
    if metal {
        println!("cargo:rustc-link-lib=framework=Metal");
        println!("cargo:rustc-link-lib=framework=QuartzCore");
    }
    if accelerate {
        println!("cargo:rustc-link-lib=framework=Accelerate");
    }

    let bindings = Path::new(&env::var("OUT_DIR").unwrap()).join("bindings.rs");
    bindgen::Builder::default()
        .header(sources.join("mlx/c/mlx.h").to_string_lossy())
        .clang_arg(format!("-I{}", sources.display()))
        .blocklist_function("malloc")
        .blocklist_function("realloc")
        .generate()
        .expect("bindgen failed on mlx-c")
        .write_to_file(&bindings)
        .expect("cannot write bindings");
    println!("cargo:rustc-env=MLX_SYS_BINDINGS={}", bindings.display());
    println!("cargo:version={}", crate::linux::MLX_VERSION);
}
