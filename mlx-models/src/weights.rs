//! Checkpoint tensors by name: reading safetensors (one file or an indexed set of
//! shards), and handing each module the tensors it owns with its shape checked.

use crate::error::{Error, Result};
use mlx_rs::{Array, Dtype};
use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, BTreeSet, HashMap};
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
    finite_checked: bool,
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
            finite_checked: false,
        }
    }

    /// Reads `model.safetensors`, or every shard listed in
    /// `model.safetensors.index.json`, or else every `*.safetensors` file of `dir`.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let index = dir.join("model.safetensors.index.json");
        let mut weight_map = None;
        let files: Vec<PathBuf> = if index.exists() {
            let (files, map) = shards_from_index(&index)?;
            weight_map = Some(map);
            files.into_iter().map(|f| dir.join(f)).collect()
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
        // Every tensor the index lists is in its shard.
        if let Some(map) = weight_map {
            if let Some((name, shard)) = map.iter().find(|(name, _)| !tensors.contains_key(*name)) {
                return Err(Error::WeightIndex {
                    path: index,
                    message: format!(
                        "tensor `{name}` is listed in `{shard}`, which does not hold it"
                    ),
                });
            }
        }
        Ok(Weights::new(tensors, dir))
    }

    /// Materializes every tensor and checks that the floating-point ones are finite
    /// ([`Weights::check_finite`]). MLX computes lazily on the stream of the thread that
    /// built an array, so a model used from other threads must not hold pending work.
    pub fn eval(&self) -> Result<()> {
        mlx_rs::transforms::eval(self.tensors.values())?;
        if self.finite_checked {
            return Ok(());
        }
        self.check_finite()
    }

    /// Says that the reader already checked every floating-point value (the GGUF reader
    /// does as it decodes), so [`Weights::eval`] need not. Adding a tensor clears it.
    pub(crate) fn finite_checked(mut self) -> Self {
        self.finite_checked = true;
        self
    }

    /// Fails with [`Error::NonFiniteWeight`] naming the first floating-point tensor (in name
    /// order) that holds NaN or infinity. One `isfinite`-all reduction over all of them
    /// (flattened and joined per dtype) answers for a sound checkpoint; only a failing one
    /// is searched tensor by tensor for the name.
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
        let mut by_dtype: HashMap<Dtype, Vec<Array>> = HashMap::new();
        for name in &names {
            let t = &self.tensors[*name];
            by_dtype
                .entry(t.dtype())
                .or_default()
                .push(t.flatten(None, None)?);
        }
        let flags = by_dtype
            .values()
            .map(|flat| mlx_rs::ops::concatenate(flat, 0)?.is_finite()?.all(None))
            .collect::<std::result::Result<Vec<Array>, _>>()?;
        mlx_rs::transforms::eval(&flags)?;
        if flags
            .iter()
            .all(|f| f.as_slice::<bool>().iter().all(|&ok| ok))
        {
            return Ok(());
        }
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
        self.finite_checked = false;
        self.tensors.insert(name.into(), tensor);
    }

    /// The shape of the tensor `name`, without taking it.
    pub fn shape_of(&self, name: &str) -> Option<&[i32]> {
        self.tensors.get(name).map(Array::shape)
    }

    /// Whether mlx-lm's converter wrote this checkpoint, as its depthwise convolutions
    /// tell: MLX's `[channels, kernel, 1]` where PyTorch stores `[channels, 1, kernel]`.
    /// What else its `sanitize` did to such a checkpoint (folded constants, shifted norms)
    /// is the family's to undo or to expect.
    pub fn converted_by_mlx_lm(&self) -> bool {
        self.tensors.iter().any(|(name, t)| {
            name.ends_with("conv1d.weight") && {
                let s = t.shape();
                s.len() == 3 && s[2] == 1 && s[1] > 1
            }
        })
    }

    /// Takes the tensor `name` out of the checkpoint (for a `sanitize` step that turns it
    /// into others).
    pub fn remove(&mut self, name: &str) -> Option<Array> {
        self.tensors.remove(name)
    }

    /// All tensors by name, whether taken or not (for a converter).
    pub fn into_tensors(self) -> HashMap<String, Array> {
        self.tensors
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

/// The shards a `model.safetensors.index.json` lists (sorted), and which tensor each holds.
/// Shard names must stay inside the model directory (relative, no `..`).
fn shards_from_index(index: &Path) -> Result<(Vec<String>, BTreeMap<String, String>)> {
    #[derive(serde::Deserialize)]
    struct Index {
        weight_map: BTreeMap<String, String>,
    }
    let bytes = std::fs::read(index).map_err(|e| Error::io(index, e))?;
    let parsed: Index = serde_json::from_slice(&bytes).map_err(|e| Error::Json {
        path: index.to_path_buf(),
        source: e,
    })?;
    let bad = |message: String| Error::WeightIndex {
        path: index.to_path_buf(),
        message,
    };
    if parsed.weight_map.is_empty() {
        return Err(bad("`weight_map` lists no tensors".into()));
    }
    let files: BTreeSet<&String> = parsed.weight_map.values().collect();
    for file in &files {
        let inside = !file.is_empty()
            && Path::new(file.as_str())
                .components()
                .all(|c| matches!(c, std::path::Component::Normal(_)));
        if !inside {
            return Err(bad(format!(
                "shard `{file}` is not a file inside the model directory"
            )));
        }
    }
    let files = files.into_iter().cloned().collect();
    Ok((files, parsed.weight_map))
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
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    let file_len = file.metadata().map_err(|e| Error::io(path, e))?.len();
    check_header(path, file, file_len)
}

/// Checks a safetensors file held in memory as [`read_safetensors`] checks one on disk
/// (`name` stands for its path in errors): the header length, the JSON, every tensor's
/// dtype, shape and byte range, and that the tensors tile the data section.
pub fn check_safetensors_bytes(name: &Path, bytes: &[u8]) -> Result<()> {
    check_header(name, bytes, bytes.len() as u64)
}

fn check_header(path: &Path, mut file: impl Read, file_len: u64) -> Result<()> {
    let corrupt = |message: String| Error::Safetensors {
        path: path.to_path_buf(),
        message,
    };
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
    let header: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&header)
        .map_err(|e| corrupt(format!("header is not a JSON object: {e}")))?;
    let data_len = file_len - 8 - header_len;
    let mut spans = Vec::with_capacity(header.len());
    for (name, info) in &header {
        if name == "__metadata__" {
            // MLX writes null without metadata.
            let strings = info.is_null()
                || info
                    .as_object()
                    .is_some_and(|m| m.values().all(serde_json::Value::is_string));
            if !strings {
                return Err(corrupt("`__metadata__` is not a map of strings".into()));
            }
            continue;
        }
        let bad = |what: &str| corrupt(format!("tensor `{name}`: {what}"));
        let dtype = info["dtype"]
            .as_str()
            .ok_or_else(|| bad("no dtype string"))?;
        let size: u64 = match dtype {
            "BOOL" | "U8" | "I8" => 1,
            "U16" | "I16" | "F16" | "BF16" => 2,
            "U32" | "I32" | "F32" => 4,
            "U64" | "I64" | "F64" => 8,
            other => return Err(bad(&format!("dtype `{other}` is not supported"))),
        };
        let shape = info["shape"]
            .as_array()
            .ok_or_else(|| bad("no shape list"))?;
        let mut elements: u64 = 1;
        for dim in shape {
            let dim = dim
                .as_u64()
                .filter(|&d| d <= i32::MAX as u64)
                .ok_or_else(|| bad(&format!("dimension {dim} in shape {shape:?}")))?;
            elements = elements
                .checked_mul(dim)
                .ok_or_else(|| bad("the shape overflows"))?;
        }
        let offsets = info["data_offsets"]
            .as_array()
            .filter(|o| o.len() == 2)
            .and_then(|o| Some((o[0].as_u64()?, o[1].as_u64()?)))
            .ok_or_else(|| bad("no valid data_offsets"))?;
        let (start, end) = offsets;
        if start > end || end > data_len {
            return Err(bad(&format!(
                "data from byte {start} to {end} of a {data_len}-byte data section (truncated file?)"
            )));
        }
        if elements.checked_mul(size) != Some(end - start) {
            return Err(bad(&format!(
                "{} bytes for {elements} {dtype} elements",
                end - start
            )));
        }
        spans.push((start, end, name));
    }
    // As the format requires: the tensors tile the data section, no overlaps, no holes.
    spans.sort();
    let mut at = 0;
    for (start, end, name) in spans {
        if start != at {
            return Err(corrupt(format!(
                "tensor `{name}` starts at byte {start}, expected {at} (overlap or hole)"
            )));
        }
        at = end;
    }
    if at != data_len {
        return Err(corrupt(format!(
            "the tensors end at byte {at} of a {data_len}-byte data section"
        )));
    }
    Ok(())
}

/// The decoder layer a Transformers weight name belongs to: `i` in `model.layers.{i}.…`.
pub fn layer_index(name: &str) -> Option<usize> {
    name.strip_prefix("model.layers.")?
        .split('.')
        .next()?
        .parse()
        .ok()
}

/// `name` with its leading module path renamed by the first `(from, to)` that matches
/// whole path segments (`"transformer.h"` matches `transformer.h.0.ln_1.weight`, not
/// `transformer.head.weight`): what a family whose checkpoints keep the decoder under other
/// names (GPT-2's `transformer.h`, `transformer.wte`, `transformer.ln_f`) uses in
/// `sanitize` to bring them to `model.layers`, `model.embed_tokens`, `model.norm`.
///
/// ```
/// use mlx_models::weights::rename_prefix;
/// let renames = [("transformer.h", "model.layers"), ("transformer.wte", "model.embed_tokens")];
/// assert_eq!(rename_prefix("transformer.h.3.ln_1.weight", &renames), "model.layers.3.ln_1.weight");
/// assert_eq!(rename_prefix("transformer.hx.weight", &renames), "transformer.hx.weight");
/// ```
pub fn rename_prefix(name: &str, renames: &[(&str, &str)]) -> String {
    for (from, to) in renames {
        if let Some(tail) = name.strip_prefix(from) {
            if tail.is_empty() || tail.starts_with('.') {
                return format!("{to}{tail}");
            }
        }
    }
    name.to_owned()
}

/// `name` with the module path under `model.layers.{i}.` renamed: each `(from, to)` is a
/// module path under the layer (`"post_mlp_layernorm"`, `"self_attn.query_layernorm"`),
/// or from the root where it starts with `model.` (`"model.final_layernorm"`); the first
/// that matches applies, so renames may swap names. What a family whose
/// checkpoints name a block otherwise than the shared blocks load uses in `sanitize`.
pub fn rename_layer_module(name: &str, renames: &[(&str, &str)]) -> String {
    // Paths from the root (`model.final_layernorm`) rename as they are.
    for (from, to) in renames
        .iter()
        .filter(|(from, _)| from.starts_with("model."))
    {
        if let Some(tail) = name.strip_prefix(from) {
            if tail.starts_with('.') {
                return format!("{to}{tail}");
            }
        }
    }
    let Some(rest) = name.strip_prefix("model.layers.") else {
        return name.to_owned();
    };
    let Some((index, path)) = rest.split_once('.') else {
        return name.to_owned();
    };
    for (from, to) in renames {
        if let Some(tail) = path.strip_prefix(from) {
            if tail.starts_with('.') {
                return format!("model.layers.{index}.{to}{tail}");
            }
        }
    }
    name.to_owned()
}
