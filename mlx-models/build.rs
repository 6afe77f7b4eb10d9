//! Gives this crate's executables an rpath to `libmlx.so`, so that they also run when
//! started directly rather than through `cargo run` (which sets LD_LIBRARY_PATH).

fn main() {
    if let Ok(dir) = std::env::var("DEP_MLX_LIB_DIR") {
        println!("cargo:rustc-link-arg-bins=-Wl,-rpath,{dir}");
    }
}
