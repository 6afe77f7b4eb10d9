//! Fixtures exported from Transformers (`cargo xtask fixtures export`): a model directory
//! (config.json, model.safetensors), `fixture.json` and `expected.safetensors`.

use crate::error::{PortError, Result};
use mlx_rs::Array;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

/// `fixture.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    pub format_version: u32,
    pub model_type: String,
    pub variant: String,
    #[serde(default)]
    pub description: String,
    #[serde(default)]
    pub architecture: String,
    #[serde(default)]
    pub config_style: String,
    pub transformers_version: String,
    pub torch_version: String,
    pub seed: u64,
    pub dtype: String,
    /// The prompt every captured tensor was computed for (batch of one).
    pub input_ids: Vec<i32>,
    pub greedy_new_tokens: usize,
    pub rope_positions: Vec<i32>,
    pub tolerances: Tolerances,
    /// Captured tensors: name → shape and dtype.
    pub tensors: BTreeMap<String, TensorInfo>,
    /// The dtype of each captured tensor in Transformers' bfloat16 run.
    #[serde(default)]
    pub bf16_dtypes: BTreeMap<String, String>,
    #[serde(default)]
    pub rope_note: Option<String>,
    /// How the reference pairs RoPE features: `halves` (the default: `i` with
    /// `i + dims/2`) or `pairs` (`2i` with `2i + 1`, Llama 4).
    #[serde(default)]
    pub rope_layout: Option<String>,
    /// `reversed` where the reference rotates by `-θ` the angles its tables hold
    /// (NanoChat's `rotate_half`); absent for the usual `θ`.
    #[serde(default)]
    pub rope_direction: Option<String>,
    /// Measurements of Transformers itself made at export, e.g.
    /// `cache_vs_full_logits_max_abs`: how far its own cached run is from its full pass
    /// (non-zero for RoPE schemes that pick frequencies from the sequence length).
    #[serde(default)]
    pub checks: BTreeMap<String, f64>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct Tolerances {
    pub max_abs: f32,
    pub rope_max_abs: f32,
    pub min_cosine: f32,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TensorInfo {
    pub shape: Vec<i64>,
    pub dtype: String,
}

/// A loaded fixture.
pub struct Fixture {
    pub dir: PathBuf,
    pub manifest: Manifest,
    pub expected: HashMap<String, Array>,
}

impl Fixture {
    /// Loads the fixture in `dir`.
    pub fn load(dir: &Path) -> Result<Fixture> {
        let bad = |message: String| PortError::Fixture {
            path: dir.to_path_buf(),
            message,
        };
        let manifest_path = dir.join("fixture.json");
        let text = std::fs::read_to_string(&manifest_path)
            .map_err(|e| bad(format!("cannot read fixture.json: {e}")))?;
        let manifest: Manifest =
            serde_json::from_str(&text).map_err(|e| bad(format!("fixture.json: {e}")))?;
        if manifest.format_version != 1 {
            return Err(bad(format!(
                "unsupported format_version {}",
                manifest.format_version
            )));
        }
        for required in ["config.json", "expected.safetensors"] {
            if !dir.join(required).exists() {
                return Err(bad(format!("{required} is missing")));
            }
        }
        let expected = mlx_models::weights::read_safetensors(&dir.join("expected.safetensors"))?;
        for (name, info) in &manifest.tensors {
            let tensor = expected.get(name).ok_or_else(|| {
                bad(format!(
                    "expected.safetensors lacks `{name}` listed in fixture.json"
                ))
            })?;
            let shape: Vec<i64> = tensor.shape().iter().map(|&d| i64::from(d)).collect();
            if shape != info.shape {
                return Err(bad(format!(
                    "`{name}` has shape {shape:?}, fixture.json says {:?}",
                    info.shape
                )));
            }
        }
        Ok(Fixture {
            dir: dir.to_path_buf(),
            manifest,
            expected,
        })
    }

    /// A captured tensor.
    pub fn tensor(&self, name: &str) -> Result<&Array> {
        self.expected.get(name).ok_or_else(|| PortError::Fixture {
            path: self.dir.clone(),
            message: format!("no expected tensor `{name}`"),
        })
    }

    /// The number of decoder layers captured (`layers.0` … `layers.{n-1}`).
    pub fn num_layers(&self) -> usize {
        (0..)
            .take_while(|i| self.expected.contains_key(&format!("layers.{i}")))
            .count()
    }

    /// `<model_type>/<variant>`.
    pub fn name(&self) -> String {
        format!("{}/{}", self.manifest.model_type, self.manifest.variant)
    }
}

/// Every fixture directory under `root` (directories holding a `fixture.json`), sorted.
pub fn discover(root: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        if dir.join("fixture.json").exists() {
            found.push(dir);
            continue;
        }
        if let Ok(entries) = std::fs::read_dir(&dir) {
            stack.extend(entries.flatten().map(|e| e.path()).filter(|p| p.is_dir()));
        }
    }
    found.sort();
    found
}
