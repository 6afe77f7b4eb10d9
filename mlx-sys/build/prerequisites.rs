//! The prerequisites a build cannot fetch itself, and the one line it stops with.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// Everything the Linux build may need from the system, in one apt-get line.
pub const APT_LINE: &str = "apt-get install -y g++ libclang-dev libopenblas-dev python3-pip";

/// Stops the build with a single line naming what is wrong.
pub fn fail(message: &str) -> ! {
    eprintln!("mlx-sys: {message}");
    println!("cargo:warning=mlx-sys: {message}");
    std::process::exit(1);
}

/// Stops the build naming the missing prerequisites and the apt-get line that installs them.
pub fn missing(what: &[&str]) -> ! {
    fail(&format!(
        "missing prerequisite: {} — install with: {APT_LINE}",
        what.join(", ")
    ))
}

pub fn has_python_pip() -> bool {
    Command::new(python())
        .args(["-m", "pip", "--version"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success())
}

pub fn python() -> String {
    std::env::var("PYTHON").unwrap_or_else(|_| "python3".to_owned())
}

pub fn has_cxx_compiler() -> bool {
    cc::Build::new()
        .cpp(true)
        .cargo_metadata(false)
        .try_get_compiler()
        .ok()
        .and_then(|compiler| {
            Command::new(compiler.path())
                .arg("--version")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .ok()
        })
        .is_some_and(|status| status.success())
}

/// libclang as bindgen looks for it: `LIBCLANG_PATH`, then the usual Debian locations.
pub fn has_libclang() -> bool {
    let mut dirs: Vec<PathBuf> = std::env::var_os("LIBCLANG_PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    dirs.extend(glob_dirs("/usr/lib", "llvm-", "lib"));
    dirs.extend(
        [
            "/usr/lib/x86_64-linux-gnu",
            "/usr/lib/aarch64-linux-gnu",
            "/usr/lib64",
            "/usr/lib",
            "/usr/local/lib",
        ]
        .map(PathBuf::from),
    );
    dirs.iter().any(|dir| {
        std::fs::read_dir(dir).is_ok_and(|entries| {
            entries.flatten().any(|entry| {
                let name = entry.file_name();
                let name = name.to_string_lossy();
                name.starts_with("libclang")
                    && name.contains(".so")
                    && !name.starts_with("libclang-cpp")
            })
        })
    })
}

/// `<root>/<prefix>*/<sub>` directories, e.g. `/usr/lib/llvm-14/lib`.
fn glob_dirs(root: &str, prefix: &str, sub: &str) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(root) else {
        return Vec::new();
    };
    let mut dirs: Vec<PathBuf> = entries
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(prefix))
        .map(|e| e.path().join(sub))
        .collect();
    dirs.sort();
    dirs
}

/// The OpenBLAS shared library to link, if installed.
pub fn find_openblas() -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::env::var_os("OPENBLAS_LIB_DIR")
        .map(|p| vec![PathBuf::from(p)])
        .unwrap_or_default();
    dirs.extend(
        [
            "/usr/lib/x86_64-linux-gnu",
            "/usr/lib/aarch64-linux-gnu",
            "/usr/lib64",
            "/usr/lib",
            "/usr/local/lib",
            "/opt/OpenBLAS/lib",
        ]
        .map(PathBuf::from),
    );
    dirs.into_iter()
        .map(|dir| dir.join("libopenblas.so"))
        .find(|lib| Path::new(lib).exists())
}
