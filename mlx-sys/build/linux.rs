//! Linux: MLX from an official wheel (or `MLX_DIR`), mlx-c compiled against it, OpenBLAS.

use crate::cache::{cache_dir, fill_atomically};
use crate::mlx_c;
use crate::prerequisites::{self, python};
use std::env;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The MLX release mlx-c 0.7.0 compiles against (0.32.4 changed `gather_qmm`).
pub const MLX_VERSION: &str = "0.32.2";

/// Where MLX comes from.
struct Mlx {
    include: PathBuf,
    lib: PathBuf,
    /// Directories holding the libraries libmlx.so needs (wheel-bundled BLAS, CUDA).
    lib_deps: Vec<PathBuf>,
    /// The wheel's bundled reference BLAS, kept for side-by-side benchmarks.
    reference_blas: Option<PathBuf>,
    source: String,
}

pub fn build() {
    let cache = cache_dir();
    let mlx = locate_mlx(&cache);
    let blas = choose_blas();

    let sources = mlx_c::sources(&cache);
    let built = mlx_c::build(&cache, &sources, &mlx.include, blas.is_some());

    println!(
        "cargo:rustc-env=MLX_SYS_BINDINGS={}",
        built.bindings.display()
    );

    // mlx-c and our compatibility code, statically.
    println!("cargo:rustc-link-search=native={}", built.lib_dir.display());
    println!("cargo:rustc-link-lib=static=mlxc");
    println!("cargo:rustc-link-lib=dylib=stdc++");

    // libmlx.so: link against the real directory (its $ORIGIN rpath finds the bundled
    // libraries), and put links to it and its dependencies under OUT_DIR, a directory
    // `cargo run` and `cargo test` add to LD_LIBRARY_PATH.
    println!("cargo:rustc-link-search=native={}", mlx.lib.display());
    let runtime = runtime_lib_dir(&mlx);
    println!("cargo:rustc-link-search=native={}", runtime.display());
    println!("cargo:rustc-link-lib=dylib=mlx");
    println!(
        "cargo:rerun-if-changed={}",
        mlx.lib.join("libmlx.so").display()
    );

    // OpenBLAS after libmlx.so: under --as-needed the linker keeps a library that
    // resolves a symbol libmlx.so leaves undefined (cblas_sgemm, the LAPACK routines), and
    // a library the executable needs is searched before the ones libmlx.so pulls in, so
    // OpenBLAS wins over the wheel's reference BLAS at run time.
    if let Some(openblas) = &blas {
        println!(
            "cargo:rustc-link-search=native={}",
            openblas.parent().unwrap().display()
        );
        println!("cargo:rustc-link-lib=dylib=openblas");
    }

    // For dependents' build scripts (DEP_MLX_*): the rpath to give executables.
    println!("cargo:lib_dir={}", mlx.lib.display());
    println!("cargo:include={}", mlx.include.display());
    println!("cargo:version={MLX_VERSION}");

    // For src/lib.rs: what this build links, reported at run time.
    let blas_text = match &blas {
        Some(path) => format!("OpenBLAS ({})", path.display()),
        None => "reference BLAS bundled with MLX (slow; MLX_SYS_BLAS=reference)".to_owned(),
    };
    println!("cargo:rustc-env=MLX_SYS_MLX_SOURCE={}", mlx.source);
    println!("cargo:rustc-env=MLX_SYS_LIB_DIR={}", mlx.lib.display());
    println!("cargo:rustc-env=MLX_SYS_LINKED_BLAS={blas_text}");
    println!(
        "cargo:rustc-env=MLX_SYS_REFERENCE_BLAS={}",
        mlx.reference_blas
            .as_deref()
            .map(Path::to_string_lossy)
            .unwrap_or_default()
    );

    println!(
        "cargo:warning=mlx-sys: MLX {MLX_VERSION} from {}; mlx-c {} {}; BLAS: {blas_text}",
        mlx.source,
        mlx_c::MLX_C_VERSION,
        if built.from_cache {
            "reused from the cache"
        } else {
            "compiled into the cache"
        },
    );
}

fn wheel_name() -> String {
    let cuda12 = env::var_os("CARGO_FEATURE_CUDA_12").is_some();
    let cuda13 = env::var_os("CARGO_FEATURE_CUDA_13").is_some();
    match (cuda12, cuda13) {
        (true, true) => prerequisites::fail("features cuda-12 and cuda-13 exclude each other"),
        (true, false) => "mlx-cuda-12".to_owned(),
        (false, true) => "mlx-cuda-13".to_owned(),
        (false, false) => env::var("MLX_SYS_WHEEL").unwrap_or_else(|_| "mlx-cpu".to_owned()),
    }
}

fn locate_mlx(cache: &Path) -> Mlx {
    if let Some(prefix) = env::var_os("MLX_DIR").map(PathBuf::from) {
        let lib = ["lib", "lib64"]
            .map(|d| prefix.join(d))
            .into_iter()
            .find(|d| d.join("libmlx.so").exists())
            .unwrap_or_else(|| {
                prerequisites::fail(&format!(
                    "MLX_DIR={} has no lib/libmlx.so",
                    prefix.display()
                ))
            });
        let include = prefix.join("include");
        if !include.join("mlx").join("mlx.h").exists() {
            prerequisites::fail(&format!(
                "MLX_DIR={} has no include/mlx/mlx.h",
                prefix.display()
            ));
        }
        return Mlx {
            include,
            lib_deps: vec![lib.clone()],
            lib,
            reference_blas: None,
            source: format!("MLX_DIR={}", prefix.display()),
        };
    }

    let wheel = wheel_name();
    if !["mlx-cpu", "mlx-cuda-12", "mlx-cuda-13"].contains(&wheel.as_str()) {
        prerequisites::fail(&format!(
            "MLX_SYS_WHEEL={wheel} is not one of mlx-cpu, mlx-cuda-12, mlx-cuda-13"
        ));
    }
    let root = cache.join("wheels").join(format!("{wheel}-{MLX_VERSION}"));
    fill_atomically(&root, |tmp| install_wheel(&wheel, tmp))
        .unwrap_or_else(|message| prerequisites::fail(&message));

    let bundled = root.join(format!("{}.libs", wheel.replace('-', "_")));
    let mut lib_deps = vec![root.join("mlx").join("lib"), bundled.clone()];
    lib_deps.extend(
        fs::read_dir(root.join("nvidia"))
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path().join("lib")),
    );
    let reference_blas = fs::read_dir(&bundled)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("libblas"))
        });
    Mlx {
        include: root.join("mlx").join("include"),
        lib: root.join("mlx").join("lib"),
        lib_deps,
        reference_blas,
        source: format!("the {wheel}=={MLX_VERSION} wheel ({})", root.display()),
    }
}

/// `pip install --target`: the wheel's site-packages layout keeps libmlx.so's $ORIGIN
/// rpaths valid (the bundled BLAS, and the nvidia-* libraries for the CUDA wheels).
fn install_wheel(wheel: &str, target: &Path) -> Result<(), String> {
    if !prerequisites::has_python_pip() {
        prerequisites::missing(&["python3 with pip (python3-pip)"]);
    }
    let mut command = Command::new(python());
    command.args([
        "-m",
        "pip",
        "install",
        "--quiet",
        "--disable-pip-version-check",
        "--no-compile",
        "--only-binary=:all:",
        "--target",
    ]);
    command.arg(target);
    if wheel == "mlx-cpu" {
        command.arg("--no-deps");
    }
    command.arg(format!("{wheel}=={MLX_VERSION}"));
    let output = command
        .output()
        .map_err(|e| format!("cannot run {} -m pip: {e}", python()))?;
    if !output.status.success() {
        return Err(format!(
            "pip could not fetch {wheel}=={MLX_VERSION}: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        ));
    }
    if !target.join("mlx").join("lib").join("libmlx.so").exists() {
        return Err(format!("{wheel}=={MLX_VERSION} holds no mlx/lib/libmlx.so"));
    }
    Ok(())
}

/// OpenBLAS unless `MLX_SYS_BLAS=reference` asks for the wheel's own BLAS.
fn choose_blas() -> Option<PathBuf> {
    match env::var("MLX_SYS_BLAS").as_deref() {
        Ok("reference") => None,
        Ok("openblas") | Err(_) => Some(
            prerequisites::find_openblas()
                .unwrap_or_else(|| prerequisites::missing(&["OpenBLAS (libopenblas-dev)"])),
        ),
        Ok(other) => prerequisites::fail(&format!(
            "MLX_SYS_BLAS={other} is not one of openblas, reference"
        )),
    }
}

/// `OUT_DIR/lib`: links to libmlx.so and every library it loads. The dynamic loader does
/// not follow a link to expand libmlx.so's `$ORIGIN`, so its dependencies sit beside it.
fn runtime_lib_dir(mlx: &Mlx) -> PathBuf {
    let dir = PathBuf::from(env::var("OUT_DIR").unwrap()).join("lib");
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap_or_else(|e| prerequisites::fail(&format!("OUT_DIR: {e}")));
    for lib_dir in &mlx.lib_deps {
        for entry in fs::read_dir(lib_dir).into_iter().flatten().flatten() {
            let name = entry.file_name();
            if name.to_string_lossy().contains(".so") {
                let _ = std::os::unix::fs::symlink(entry.path(), dir.join(&name));
            }
        }
    }
    dir
}
