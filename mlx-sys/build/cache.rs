//! The build cache outside the target directory, shared by every clone and profile.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

/// `$MLX_SYS_CACHE_DIR`, else `$XDG_CACHE_HOME/mlx-models/native`, else
/// `$HOME/.cache/mlx-models/native`.
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("MLX_SYS_CACHE_DIR") {
        return PathBuf::from(dir);
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cache")))
        .unwrap_or_else(std::env::temp_dir);
    base.join("mlx-models").join("native")
}

/// A 64-bit FNV-1a hash, enough to key cache entries by their inputs.
#[derive(Clone, Copy)]
pub struct Fingerprint(u64);

impl Fingerprint {
    pub fn new() -> Self {
        Fingerprint(0xcbf2_9ce4_8422_2325)
    }

    pub fn add(&mut self, bytes: &[u8]) {
        for &byte in bytes.iter().chain(&[0xff]) {
            self.0 ^= u64::from(byte);
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
    }

    pub fn add_file(&mut self, path: &Path) {
        self.add(
            path.file_name()
                .map(|n| n.as_encoded_bytes())
                .unwrap_or_default(),
        );
        self.add(&fs::read(path).unwrap_or_default());
    }

    pub fn hex(&self) -> String {
        format!("{:016x}", self.0)
    }
}

/// Fills `dest` through `fill`, which writes into a fresh temporary sibling; the
/// temporary is renamed into place only when `fill` succeeds, so an interrupted build
/// never leaves a half-written entry behind and concurrent builds don't collide.
pub fn fill_atomically(
    dest: &Path,
    fill: impl FnOnce(&Path) -> Result<(), String>,
) -> Result<(), String> {
    if dest.exists() {
        return Ok(());
    }
    let parent = dest.parent().expect("cache entries have a parent");
    fs::create_dir_all(parent).map_err(|e| format!("cannot create {}: {e}", parent.display()))?;
    let tmp = parent.join(format!(
        ".{}.tmp-{}",
        dest.file_name().unwrap().to_string_lossy(),
        std::process::id()
    ));
    let _ = fs::remove_dir_all(&tmp);
    fs::create_dir_all(&tmp).map_err(|e| format!("cannot create {}: {e}", tmp.display()))?;
    let result = fill(&tmp);
    if let Err(message) = result {
        let _ = fs::remove_dir_all(&tmp);
        return Err(message);
    }
    match fs::rename(&tmp, dest) {
        Ok(()) => Ok(()),
        // Another build filled it first: theirs is as good as ours.
        Err(_) if dest.exists() => {
            let _ = fs::remove_dir_all(&tmp);
            Ok(())
        }
        Err(e) => Err(format!("cannot move {} into place: {e}", dest.display())),
    }
}

/// Copies a directory tree.
pub fn copy_tree(from: &Path, to: &Path) -> io::Result<()> {
    fs::create_dir_all(to)?;
    for entry in fs::read_dir(from)? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_tree(&entry.path(), &target)?;
        } else {
            fs::copy(entry.path(), target)?;
        }
    }
    Ok(())
}
