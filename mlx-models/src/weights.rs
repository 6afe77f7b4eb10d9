//! Checkpoint tensors by name: reading safetensors (one file or an indexed set of
//! shards), and handing each module the tensors it owns with its shape checked.

use crate::error::{Error, Result};
use mlx_rs::{Array, Dtype};
use std::cell::{Cell, RefCell};
use std::collections::{BTreeSet, HashMap};
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

/// All tensors of a checkpoint, by their checkpoint names.
///
/// Modules take their tensors through [`Weights::path`]; names nobody took are reported
/// by [`Weights::check_all_used`], so a config that does not match its checkpoint fails
/// loudly instead of leaving weights unused.
pub struct Weights {
    tensors: HashMap<String, Array>,
    source: PathBuf,
    dtype: Option<Dtype>,
    dequantize: bool,
    used: RefCell<BTreeSet<String>>,
    parameters: Cell<usize>,
}

impl Weights {
    /// Wraps tensors already in memory. `source` names them in errors.
    pub fn new(tensors: HashMap<String, Array>, source: impl Into<PathBuf>) -> Self {
        Weights {
            tensors,
            source: source.into(),
            dtype: None,
            dequantize: false,
            used: RefCell::default(),
            parameters: Cell::new(0),
        }
    }

    /// Reads `model.safetensors`, or every shard listed in
    /// `model.safetensors.index.json`, or else every `*.safetensors` file of `dir`.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let index = dir.join("model.safetensors.index.json");
        let files: Vec<PathBuf> = if index.exists() {
            shards_from_index(&index)?
                .into_iter()
                .map(|f| dir.join(f))
                .collect()
        } else if dir.join("model.safetensors").exists() {
            vec![dir.join("model.safetensors")]
        } else {
            let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
                .map_err(|e| Error::io(dir, e))?
                .flatten()
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
                .collect();
            files.sort();
            files
        };
        if files.is_empty() {
            return Err(Error::MissingWeight {
                path: dir.to_path_buf(),
                name: "*.safetensors (no weights found)".to_owned(),
            });
        }
        let mut tensors = HashMap::new();
        for file in &files {
            tensors.extend(read_safetensors(file)?);
        }
        Ok(Weights::new(tensors, dir))
    }

    /// Materializes every tensor and checks that the floating-point ones are finite
    /// ([`Weights::check_finite`]). MLX computes lazily on the stream of the thread that
    /// built an array, so a model used from other threads must not hold pending work.
    pub fn eval(&self) -> Result<()> {
        mlx_rs::transforms::eval(self.tensors.values())?;
        self.check_finite()
    }

    /// Fails with [`Error::NonFiniteWeight`] naming the first floating-point tensor (in name
    /// order) that holds NaN or infinity: one `isfinite`-all reduction per tensor, read back
    /// together.
    pub fn check_finite(&self) -> Result<()> {
        let mut names: Vec<&String> = self
            .tensors
            .iter()
            .filter(|(_, t)| is_float(t.dtype()))
            .map(|(name, _)| name)
            .collect();
        if names.is_empty() {
            return Ok(());
        }
        names.sort();
        let flags = names
            .iter()
            .map(|name| self.tensors[*name].is_finite()?.all(None))
            .collect::<std::result::Result<Vec<Array>, _>>()?;
        let flags = mlx_rs::ops::stack(&flags, 0)?;
        flags.eval()?;
        match flags.as_slice::<bool>().iter().position(|finite| !finite) {
            None => Ok(()),
            Some(i) => Err(Error::NonFiniteWeight {
                path: self.source.clone(),
                name: names[i].clone(),
            }),
        }
    }

    /// Casts every floating-point tensor to `dtype` as modules take it (quantized weights,
    /// which are integers, stay as they are).
    pub fn with_dtype(mut self, dtype: Option<Dtype>) -> Self {
        self.dtype = dtype;
        self
    }

    /// Asks modules to expand quantized matrices to floating point as they load them.
    pub fn dequantize(mut self, yes: bool) -> Self {
        self.dequantize = yes;
        self
    }

    /// Where the tensors came from.
    pub fn source(&self) -> &Path {
        &self.source
    }

    /// The root of the name space.
    pub fn root(&self) -> WeightPath<'_> {
        WeightPath {
            weights: self,
            prefix: String::new(),
        }
    }

    /// The tensors under `prefix` (e.g. `"model.layers.3"`).
    pub fn path(&self, prefix: &str) -> WeightPath<'_> {
        self.root().pp(prefix)
    }

    /// Whether a tensor is present.
    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// Renames or drops tensors: `f(name)` returns the new name, or `None` to drop it.
    /// This is what a model's `sanitize` step uses.
    pub fn rename(&mut self, mut f: impl FnMut(&str) -> Option<String>) {
        self.tensors = std::mem::take(&mut self.tensors)
            .into_iter()
            .filter_map(|(name, value)| f(&name).map(|n| (n, value)))
            .collect();
    }

    /// Adds (or replaces) the tensor `name`: what a `sanitize` step that builds tensors
    /// (stacked experts, split projections) uses.
    pub fn insert(&mut self, name: impl Into<String>, tensor: Array) {
        self.tensors.insert(name.into(), tensor);
    }

    /// Takes the tensor `name` out of the checkpoint (for a `sanitize` step that turns it
    /// into others).
    pub fn remove(&mut self, name: &str) -> Option<Array> {
        self.tensors.remove(name)
    }

    /// The names of all tensors.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    /// How many parameters the modules took (quantized matrices counted by their logical
    /// size, tied matrices once).
    pub fn num_parameters(&self) -> usize {
        self.parameters.get()
    }

    /// Fails with [`Error::UnexpectedWeights`] if some tensor was never taken.
    pub fn check_all_used(&self) -> Result<()> {
        let used = self.used.borrow();
        let mut unused: Vec<String> = self
            .tensors
            .keys()
            .filter(|k| !used.contains(*k))
            .cloned()
            .collect();
        if unused.is_empty() {
            return Ok(());
        }
        unused.sort();
        Err(Error::UnexpectedWeights {
            path: self.source.clone(),
            names: unused,
        })
    }

    fn take(&self, name: &str) -> Option<Array> {
        let tensor = self.tensors.get(name)?;
        self.used.borrow_mut().insert(name.to_owned());
        Some(tensor.clone())
    }
}

/// A view of [`Weights`] under a name prefix, as a module sees its own tensors.
#[derive(Clone)]
pub struct WeightPath<'a> {
    weights: &'a Weights,
    prefix: String,
}

impl<'a> WeightPath<'a> {
    /// The sub-path `prefix.name`.
    pub fn pp(&self, name: &str) -> WeightPath<'a> {
        WeightPath {
            weights: self.weights,
            prefix: self.full_name(name),
        }
    }

    /// The full checkpoint name of `name` under this path.
    pub fn full_name(&self, name: &str) -> String {
        match (self.prefix.is_empty(), name.is_empty()) {
            (true, _) => name.to_owned(),
            (false, true) => self.prefix.clone(),
            (false, false) => format!("{}.{name}", self.prefix),
        }
    }

    /// Whether `name` exists under this path.
    pub fn contains(&self, name: &str) -> bool {
        self.weights.contains(&self.full_name(name))
    }

    /// The tensor `name`, which must have exactly `shape`; floats are cast to the
    /// requested dtype.
    pub fn get(&self, name: &str, shape: &[i32]) -> Result<Array> {
        let tensor = self.get_any_shape(name)?;
        if tensor.shape() != shape {
            return Err(Error::WeightShape {
                path: self.weights.source.clone(),
                name: self.full_name(name),
                expected: shape.to_vec(),
                actual: tensor.shape().to_vec(),
            });
        }
        self.count(tensor.size());
        Ok(tensor)
    }

    /// The tensor `name` if present (shape-checked like [`WeightPath::get`]).
    pub fn get_optional(&self, name: &str, shape: &[i32]) -> Result<Option<Array>> {
        if self.contains(name) {
            self.get(name, shape).map(Some)
        } else {
            Ok(None)
        }
    }

    /// The tensor `name` whatever its shape (for quantized tensors, whose packed shape
    /// the caller checks).
    pub fn get_any_shape(&self, name: &str) -> Result<Array> {
        let full = self.full_name(name);
        let tensor = self
            .weights
            .take(&full)
            .ok_or_else(|| Error::MissingWeight {
                path: self.weights.source.clone(),
                name: full.clone(),
            })?;
        match self.weights.dtype {
            Some(dtype) if is_float(tensor.dtype()) && tensor.dtype() != dtype => {
                let cast = tensor.as_dtype(dtype)?;
                cast.eval()?;
                Ok(cast)
            }
            _ => Ok(tensor),
        }
    }

    /// Counts `n` parameters towards [`Weights::num_parameters`] (what `get` does itself).
    pub fn count(&self, n: usize) {
        self.weights
            .parameters
            .set(self.weights.parameters.get() + n);
    }

    /// The floating-point type modules should compute in when they expand quantized
    /// weights, or `None` to keep them quantized.
    pub fn dequantize_to(&self) -> Option<Dtype> {
        self.weights
            .dequantize
            .then(|| self.weights.dtype.unwrap_or(Dtype::Float32))
    }

    /// Fails unless the quantized tensor `name` (whose `scales` are `scales`) is in MLX's
    /// affine format: floating-point scales with `biases` beside them. MXFP4/MXFP8
    /// checkpoints (gpt-oss) store 8-bit exponent scales and no biases.
    pub fn check_affine(&self, name: &str, scales: &Array) -> Result<()> {
        let unsupported = |message: String| Error::UnsupportedQuantization {
            path: self.weights.source.clone(),
            name: self.full_name(name),
            message,
        };
        if !is_float(scales.dtype()) {
            return Err(unsupported(format!(
                "scales are {:?}, as in MXFP4/MXFP8 checkpoints; only MLX's affine quantization \
                 (floating-point scales and biases) is supported",
                scales.dtype()
            )));
        }
        if !self.contains("biases") {
            return Err(unsupported(
                "quantized without `biases`: only MLX's affine quantization is supported"
                    .to_owned(),
            ));
        }
        Ok(())
    }

    /// Reports a tensor whose shape does not fit, naming it.
    pub fn shape_error(&self, name: &str, expected: &[i32], actual: &[i32]) -> Error {
        Error::WeightShape {
            path: self.weights.source.clone(),
            name: self.full_name(name),
            expected: expected.to_vec(),
            actual: actual.to_vec(),
        }
    }
}

pub(crate) fn is_float(dtype: Dtype) -> bool {
    matches!(
        dtype,
        Dtype::Float16 | Dtype::Bfloat16 | Dtype::Float32 | Dtype::Float64
    )
}

/// The shard file names of a `model.safetensors.index.json`, in first-seen order.
fn shards_from_index(index: &Path) -> Result<Vec<String>> {
    #[derive(serde::Deserialize)]
    struct Index {
        weight_map: HashMap<String, String>,
    }
    let text = std::fs::read_to_string(index).map_err(|e| Error::io(index, e))?;
    let parsed: Index = serde_json::from_str(&text).map_err(|e| Error::Json {
        path: index.to_path_buf(),
        source: e,
    })?;
    let files: BTreeSet<String> = parsed.weight_map.into_values().collect();
    Ok(files.into_iter().collect())
}

/// Reads one safetensors file after checking its header, so a truncated or corrupt file
/// is reported by name instead of failing inside MLX.
pub fn read_safetensors(path: &Path) -> Result<HashMap<String, Array>> {
    check_safetensors_header(path)?;
    Array::load_safetensors(path).map_err(|e| Error::Safetensors {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

fn check_safetensors_header(path: &Path) -> Result<()> {
    let corrupt = |message: String| Error::Safetensors {
        path: path.to_path_buf(),
        message,
    };
    let mut file = File::open(path).map_err(|e| Error::io(path, e))?;
    let file_len = file.metadata().map_err(|e| Error::io(path, e))?.len();
    let mut len_bytes = [0u8; 8];
    file.read_exact(&mut len_bytes)
        .map_err(|_| corrupt(format!("file is {file_len} bytes, too short for a header")))?;
    let header_len = u64::from_le_bytes(len_bytes);
    if header_len > file_len.saturating_sub(8) || header_len > 100_000_000 {
        return Err(corrupt(format!(
            "header length {header_len} exceeds the file size {file_len}"
        )));
    }
    let mut header = vec![0u8; header_len as usize];
    file.read_exact(&mut header)
        .map_err(|e| Error::io(path, e))?;
    let header: HashMap<String, serde_json::Value> = serde_json::from_slice(&header)
        .map_err(|e| corrupt(format!("header is not a JSON object: {e}")))?;
    let data_len = file_len - 8 - header_len;
    for (name, info) in &header {
        if name == "__metadata__" {
            continue;
        }
        let offsets = info["data_offsets"]
            .as_array()
            .and_then(|o| Some((o.first()?.as_u64()?, o.get(1)?.as_u64()?)));
        match offsets {
            Some((start, end)) if start <= end && end <= data_len => {}
            Some((_, end)) => {
                return Err(corrupt(format!(
                    "tensor `{name}` ends at byte {end} of a {data_len}-byte data section (truncated file?)"
                )))
            }
            None => return Err(corrupt(format!("tensor `{name}` has no valid data_offsets"))),
        }
    }
    Ok(())
}
