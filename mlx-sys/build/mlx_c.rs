//! mlx-c 0.7.0: its sources, compiled into `libmlxc.a`, and the bindgen bindings.

use crate::cache::{copy_tree, fill_atomically, Fingerprint};
use crate::prerequisites;
use std::env;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The mlx-c release mlx-rs 0.33 binds; it pins MLX 0.32.2.
pub const MLX_C_VERSION: &str = "0.7.0";

/// The mlx-c sources (`mlx/c/*.{h,cpp}`) in the cache, copied there from the crates.io
/// package `mlx-sys 0.7.0` that cargo downloads into its registry on the first build.
pub fn sources(cache: &Path) -> PathBuf {
    let dest = cache.join(format!("mlx-c-{MLX_C_VERSION}-src"));
    fill_atomically(&dest, |tmp| {
        let package = published_package()?;
        let mlx_c = package.join("src").join("mlx-c");
        copy_tree(&mlx_c.join("mlx"), &tmp.join("mlx"))
            .and_then(|()| {
                ["LICENSE", "CMakeLists.txt", "mlx-c.pc.in"]
                    .iter()
                    .try_for_each(|f| fs::copy(mlx_c.join(f), tmp.join(f)).map(drop))
            })
            .map_err(|e| format!("cannot copy mlx-c from {}: {e}", mlx_c.display()))
    })
    .unwrap_or_else(|message| prerequisites::fail(&message));
    dest
}

/// Asks cargo for the published `mlx-sys` package (our workspace patches it away, so it
/// is resolved from a throw-away manifest) and returns the directory it unpacked it to.
fn published_package() -> Result<PathBuf, String> {
    let dir = PathBuf::from(env::var("OUT_DIR").unwrap()).join("published-mlx-sys");
    fs::create_dir_all(dir.join("src")).map_err(|e| e.to_string())?;
    fs::write(
        dir.join("Cargo.toml"),
        format!(
            "[package]\nname = \"mlx-c-source\"\nversion = \"0.0.0\"\nedition = \"2021\"\n\n\
             [dependencies]\nmlx-sys = {{ version = \"={MLX_C_VERSION}\", default-features = false }}\n\n\
             [workspace]\n"
        ),
    )
    .map_err(|e| e.to_string())?;
    fs::write(dir.join("src").join("lib.rs"), "").map_err(|e| e.to_string())?;

    let cargo = env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let mut command = Command::new(cargo);
    command
        .args(["metadata", "--format-version", "1", "--manifest-path"])
        .arg(dir.join("Cargo.toml"));
    if env::var("CARGO_NET_OFFLINE").is_ok_and(|v| v == "true") {
        command.arg("--offline");
    }
    let output = command
        .output()
        .map_err(|e| format!("cannot run cargo metadata: {e}"))?;
    if !output.status.success() {
        return Err(format!(
            "cargo could not fetch the mlx-sys {MLX_C_VERSION} package (mlx-c sources): {}",
            String::from_utf8_lossy(&output.stderr).trim()
        ));
    }
    let metadata: serde_json::Value = serde_json::from_slice(&output.stdout)
        .map_err(|e| format!("cargo metadata printed invalid JSON: {e}"))?;
    metadata["packages"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|p| p["name"] == "mlx-sys" && p["version"] == MLX_C_VERSION)
        .and_then(|p| p["manifest_path"].as_str())
        .and_then(|manifest| Path::new(manifest).parent().map(Path::to_path_buf))
        .ok_or_else(|| format!("cargo metadata lists no mlx-sys {MLX_C_VERSION}"))
}

/// A compiled mlx-c and its bindings, in a cache entry keyed by every input.
pub struct Built {
    pub lib_dir: PathBuf,
    pub bindings: PathBuf,
    pub from_cache: bool,
}

/// Compiles mlx-c (plus our compatibility sources) against the MLX headers in
/// `mlx_include` and generates the bindings, unless the cache already has them.
pub fn build(cache: &Path, sources: &Path, mlx_include: &Path, openblas: bool) -> Built {
    let native = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap()).join("native");
    let target = env::var("TARGET").unwrap();

    let mut cpp_files = list(&sources.join("mlx").join("c"), "cpp");
    cpp_files.push(native.join("compat.cpp"));

    let mut key = Fingerprint::new();
    key.add(target.as_bytes());
    key.add(mlx_include.as_os_str().as_encoded_bytes());
    key.add_file(&mlx_include.join("mlx").join("version.h"));
    for file in list(&sources.join("mlx").join("c"), "h")
        .iter()
        .chain(&list(&sources.join("mlx").join("c").join("private"), "h"))
        .chain(&cpp_files)
        .chain(&list(&native, "h"))
    {
        key.add_file(file);
    }
    key.add(compiler_version().as_bytes());
    key.add(&[u8::from(openblas)]);

    let dest = cache
        .join(format!("mlx-c-{MLX_C_VERSION}-build"))
        .join(format!("{target}-{}", key.hex()));
    let from_cache = dest.join("libmlxc.a").exists();
    if !from_cache {
        let mut missing = Vec::new();
        if !prerequisites::has_cxx_compiler() {
            missing.push("a C++ compiler (g++)");
        }
        if !prerequisites::has_libclang() {
            missing.push("libclang (libclang-dev)");
        }
        if !missing.is_empty() {
            prerequisites::missing(&missing);
        }
        fill_atomically(&dest, |tmp| {
            compile(sources, &native, mlx_include, &cpp_files, openblas, tmp)?;
            generate_bindings(sources, &native, &target, &tmp.join("bindings.rs"))
        })
        .unwrap_or_else(|message| prerequisites::fail(&message));
    }
    println!(
        "cargo:rerun-if-changed={}",
        dest.join("libmlxc.a").display()
    );
    Built {
        bindings: dest.join("bindings.rs"),
        lib_dir: dest,
        from_cache,
    }
}

fn compile(
    sources: &Path,
    native: &Path,
    mlx_include: &Path,
    cpp_files: &[PathBuf],
    openblas: bool,
    out: &Path,
) -> Result<(), String> {
    let objects = PathBuf::from(env::var("OUT_DIR").unwrap()).join("mlxc-objects");
    let mut build = cc::Build::new();
    if openblas {
        build
            .flag("-include")
            .flag(native.join("openblas_anchor.h").to_str().unwrap());
    }
    build
        .cpp(true)
        .std("c++20")
        .files(cpp_files)
        .include(sources)
        .include(mlx_include)
        .include(native)
        .flag("-include")
        .flag(native.join("format_fallback.h").to_str().unwrap())
        .opt_level(2)
        .debug(false)
        .warnings(false)
        .cargo_metadata(false)
        .out_dir(&objects)
        .try_compile("mlxc")
        .map_err(|e| format!("compiling mlx-c failed: {e}"))?;
    fs::copy(objects.join("libmlxc.a"), out.join("libmlxc.a"))
        .map(drop)
        .map_err(|e| format!("cannot store libmlxc.a: {e}"))
}

fn generate_bindings(
    sources: &Path,
    native: &Path,
    target: &str,
    out: &Path,
) -> Result<(), String> {
    let mut builder = bindgen::Builder::default()
        .header(native.join("bindings.h").to_string_lossy())
        .clang_arg(format!("-I{}", sources.display()))
        .clang_arg(format!("-I{}", native.display()))
        // bindgen's `c_ulong` sizes trip rustc's suspicious_runtime_symbol_definitions lint.
        .blocklist_function("malloc")
        .blocklist_function("realloc");
    if !target.starts_with("aarch64") {
        // Defined in src/lib.rs the way bindgen renders __fp16/__bf16 on aarch64.
        builder = builder
            .blocklist_type("float16_t")
            .blocklist_type("bfloat16_t");
    }
    builder
        .generate()
        .map_err(|e| format!("bindgen failed on mlx-c: {e}"))?
        .write_to_file(out)
        .map_err(|e| format!("cannot write bindings: {e}"))
}

fn compiler_version() -> String {
    cc::Build::new()
        .cpp(true)
        .cargo_metadata(false)
        .try_get_compiler()
        .ok()
        .and_then(|c| Command::new(c.path()).arg("--version").output().ok())
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

fn list(dir: &Path, extension: &str) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == extension))
        .collect();
    files.sort();
    files
}
