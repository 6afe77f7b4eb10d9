//! Gives the examples and tests an rpath to `libmlx.so`, so that they also run when
//! started directly rather than through `cargo run` / `cargo test`.

fn main() {
    if let Ok(dir) = std::env::var("DEP_MLX_LIB_DIR") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{dir}");
    }
}
