//! Checkpoint tensors by name: reading safetensors (one file or an indexed set of
//! shards), and handing each module the tensors it owns with its shape checked.

use crate::distributed::Group;
use crate::error::{Error, Result};
use mlx_rs::{Array, Dtype};
use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::File;
use std::io::Read;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// All tensors of a checkpoint, by their checkpoint names.
///
/// Modules take their tensors through [`Weights::path`]; names nobody took are reported
/// by [`Weights::check_all_used`], so a config that does not match its checkpoint fails
/// loudly instead of leaving weights unused.
pub struct Weights {
    tensors: HashMap<String, Array>,
    /// Where each tensor still lies untouched in a safetensors file (or a stack of such
    /// tensors), so that a rank can read just its part of it.
    on_disk: HashMap<String, OnDisk>,
    /// The tensor-parallel group the model is split over (more than one rank).
    group: Option<Group>,
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
            on_disk: HashMap::new(),
            group: None,
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
        let mut on_disk = HashMap::new();
        for file in &files {
            tensors.extend(read_safetensors(file)?);
            on_disk.extend(tensors_on_disk(file)?);
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
        let mut weights = Weights::new(tensors, dir);
        weights.on_disk = on_disk;
        Ok(weights)
    }

    /// Splits the model over `group` (when it has more than one rank): the blocks that
    /// can be split take only this rank's part of their tensors
    /// ([`WeightPath::tensor_parallel`], [`WeightPath::get_part`]), read from the files
    /// alone where a tensor is still as stored, so a rank never holds more than its share
    /// of those. Every tensor is then evaluated and checked for NaN/infinity as it is
    /// taken rather than all at once by [`Weights::eval`].
    pub fn tensor_parallel(mut self, group: Option<Group>) -> Self {
        self.group = group.filter(|g| g.size() > 1);
        self
    }

    /// Materializes every tensor and checks that the floating-point ones are finite
    /// ([`Weights::check_finite`]). MLX computes lazily on the stream of the thread that
    /// built an array, so a model used from other threads must not hold pending work.
    pub fn eval(&self) -> Result<()> {
        if self.group.is_some() {
            // Each tensor is read (in part) and checked as a module takes it.
            return Ok(());
        }
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
        let mut on_disk = std::mem::take(&mut self.on_disk);
        let mut renamed_on_disk = HashMap::new();
        self.tensors = std::mem::take(&mut self.tensors)
            .into_iter()
            .filter_map(|(name, value)| {
                let new = f(&name)?;
                if let Some(d) = on_disk.remove(&name) {
                    renamed_on_disk.insert(new.clone(), d);
                }
                Some((new, value))
            })
            .collect();
        self.on_disk = renamed_on_disk;
    }

    /// Adds (or replaces) the tensor `name`: what a `sanitize` step that builds tensors
    /// (stacked experts, split projections) uses.
    pub fn insert(&mut self, name: impl Into<String>, tensor: Array) {
        self.finite_checked = false;
        let name = name.into();
        self.on_disk.remove(&name);
        self.tensors.insert(name, tensor);
    }

    /// Replaces the tensors `members` (all of one shape) by `name`, their stack along a new
    /// first axis; a rank that takes some of the stacked entries reads only those.
    pub fn stack(&mut self, name: impl Into<String>, members: &[String]) -> Result<()> {
        let mut arrays = Vec::with_capacity(members.len());
        let mut parts = Vec::with_capacity(members.len());
        for member in members {
            let on_disk = self.on_disk.remove(member);
            let array = self.remove(member).ok_or_else(|| Error::MissingWeight {
                path: self.source.clone(),
                name: member.clone(),
            })?;
            parts.push(on_disk);
            arrays.push(array);
        }
        let name = name.into();
        self.insert(name.clone(), mlx_rs::ops::stack(&arrays, 0)?);
        if let Some(parts) = parts.into_iter().collect::<Option<Vec<OnDisk>>>() {
            self.on_disk.insert(name, OnDisk::Stack(parts));
        }
        Ok(())
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
        self.on_disk.remove(name);
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
        self.finish(&full, tensor)
    }

    /// The group the model is split over, when it has more than one rank: blocks that can
    /// be split load only this rank's part ([`WeightPath::get_part`]).
    pub fn tensor_parallel(&self) -> Option<&'a Group> {
        self.weights.group.as_ref()
    }

    /// The shape of the tensor `name`, without taking it.
    pub fn shape_of(&self, name: &str) -> Result<Vec<i32>> {
        let full = self.full_name(name);
        self.weights
            .shape_of(&full)
            .map(<[i32]>::to_vec)
            .ok_or(Error::MissingWeight {
                path: self.weights.source.clone(),
                name: full,
            })
    }

    /// The element type of the tensor `name` as stored, without taking it.
    pub fn dtype_of(&self, name: &str) -> Result<Dtype> {
        let full = self.full_name(name);
        self.weights
            .tensors
            .get(&full)
            .map(Array::dtype)
            .ok_or(Error::MissingWeight {
                path: self.weights.source.clone(),
                name: full,
            })
    }

    /// The part `part` of the tensor `name`, whose whole shape must be `shape`; parameters
    /// are counted for the whole tensor.
    pub fn get_part(&self, name: &str, shape: &[i32], part: &Part) -> Result<Array> {
        let actual = self.shape_of(name)?;
        if actual != shape {
            return Err(self.shape_error(name, shape, &actual));
        }
        self.count(actual.iter().map(|&d| d as usize).product());
        self.get_part_any_shape(name, part)
    }

    /// [`WeightPath::get_part`] for a tensor whose shape the caller has checked (packed
    /// quantized weights); nothing is counted.
    pub fn get_part_any_shape(&self, name: &str, part: &Part) -> Result<Array> {
        let full = self.full_name(name);
        let shape = self.shape_of(name)?;
        let fits = part.axis < shape.len()
            && part
                .ranges
                .iter()
                .all(|r| 0 <= r.start && r.start <= r.end && r.end <= shape[part.axis]);
        if !fits {
            return Err(Error::Mlx(mlx_rs::error::Exception::custom(format!(
                "part {part:?} of `{full}` {shape:?} is out of bounds"
            ))));
        }
        let tensor = match self.weights.on_disk.get(&full) {
            Some(on_disk) => on_disk.read(part)?,
            None => {
                let tensor = self.weights.tensors.get(&full).expect("shape_of found it");
                let index: Vec<i32> = part.ranges.iter().flat_map(Range::clone).collect();
                tensor.take_axis(
                    Array::from_slice(&index, &[index.len() as i32]),
                    part.axis as i32,
                )?
            }
        };
        self.weights.used.borrow_mut().insert(full.clone());
        self.finish(&full, tensor)
    }

    /// A taken tensor in the requested dtype, and, when the weights are split over ranks,
    /// evaluated and checked to be finite.
    fn finish(&self, full: &str, tensor: Array) -> Result<Array> {
        let tensor = match self.weights.dtype {
            Some(dtype) if is_float(tensor.dtype()) && tensor.dtype() != dtype => {
                let cast = tensor.as_dtype(dtype)?;
                cast.eval()?;
                cast
            }
            _ => tensor,
        };
        if self.weights.group.is_some() {
            tensor.eval()?;
        }
        if self.weights.group.is_some() && is_float(tensor.dtype()) {
            let finite = tensor.is_finite()?.all(None)?;
            if !finite.item_exact::<bool>() {
                return Err(Error::NonFiniteWeight {
                    path: self.weights.source.clone(),
                    name: full.to_owned(),
                });
            }
        }
        Ok(tensor)
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
        self.check_affine_dtype(name, scales.dtype())
    }

    /// [`WeightPath::check_affine`] from the scales' dtype.
    pub fn check_affine_dtype(&self, name: &str, scales: Dtype) -> Result<()> {
        let unsupported = |message: String| Error::UnsupportedQuantization {
            path: self.weights.source.clone(),
            name: self.full_name(name),
            message,
        };
        if !is_float(scales) {
            return Err(unsupported(format!(
                "scales are {scales:?}, as in MXFP4/MXFP8 checkpoints; only MLX's affine quantization \
                 (floating-point scales and biases) is supported"
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

/// A rank's part of a tensor: along `axis`, the index ranges `ranges`, concatenated in
/// order (several for fused projections, e.g. a rank's rows of q, of k and of v).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Part {
    pub axis: usize,
    pub ranges: Vec<Range<i32>>,
}

impl Part {
    /// One range along `axis`.
    pub fn new(axis: usize, range: Range<i32>) -> Part {
        Part {
            axis,
            ranges: vec![range],
        }
    }

    /// The part's length along its axis.
    pub fn len(&self) -> i32 {
        self.ranges.iter().map(|r| r.end - r.start).sum()
    }

    /// Whether the part is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Where a tensor lies in a safetensors file: what a rank reads its part from.
#[derive(Debug, Clone)]
enum OnDisk {
    File {
        path: Arc<PathBuf>,
        /// Of the first byte, from the start of the file.
        offset: u64,
        dtype: Dtype,
        element_size: usize,
        shape: Vec<i32>,
    },
    /// Tensors of one shape stacked along a new first axis.
    Stack(Vec<OnDisk>),
}

impl OnDisk {
    /// Reads the part `part` of the tensor (bounds checked by the caller).
    fn read(&self, part: &Part) -> Result<Array> {
        let (bytes, shape, dtype) = self.read_bytes(part)?;
        // MLX copies the buffer.
        Ok(unsafe { Array::from_raw_data(bytes.as_ptr().cast(), &shape, dtype) })
    }

    fn read_bytes(&self, part: &Part) -> Result<(Vec<u8>, Vec<i32>, Dtype)> {
        match self {
            OnDisk::File {
                path,
                offset,
                dtype,
                element_size,
                shape,
            } => {
                use std::os::unix::fs::FileExt;
                let dims: Vec<usize> = shape.iter().map(|&d| d as usize).collect();
                let outer: usize = dims[..part.axis].iter().product();
                let inner: usize = dims[part.axis + 1..].iter().product::<usize>() * element_size;
                let along = dims[part.axis];
                let file = File::open(path.as_path()).map_err(|e| Error::io(path.as_path(), e))?;
                let mut bytes = vec![0u8; outer * part.len() as usize * inner];
                let mut at = 0;
                for o in 0..outer {
                    for r in &part.ranges {
                        let len = (r.end - r.start) as usize * inner;
                        let from = offset + ((o * along + r.start as usize) * inner) as u64;
                        file.read_exact_at(&mut bytes[at..at + len], from)
                            .map_err(|e| Error::io(path.as_path(), e))?;
                        at += len;
                    }
                }
                let mut shape = shape.clone();
                shape[part.axis] = part.len();
                Ok((bytes, shape, *dtype))
            }
            OnDisk::Stack(members) => {
                let mut bytes = Vec::new();
                let mut inner_shape = None;
                let mut dtype = Dtype::Float32;
                let mut count = 0;
                let mut add = |member: &OnDisk, part: &Part| -> Result<()> {
                    let (b, s, d) = member.read_bytes(part)?;
                    bytes.extend_from_slice(&b);
                    inner_shape = Some(s);
                    dtype = d;
                    Ok(())
                };
                if part.axis == 0 {
                    for r in &part.ranges {
                        for i in r.clone() {
                            let member = &members[i as usize];
                            add(member, &Part::new(0, 0..member.first_dim()))?;
                            count += 1;
                        }
                    }
                } else {
                    let inner = Part {
                        axis: part.axis - 1,
                        ranges: part.ranges.clone(),
                    };
                    for member in members {
                        add(member, &inner)?;
                        count += 1;
                    }
                }
                let mut shape = vec![count];
                shape.extend(inner_shape.unwrap_or_default());
                Ok((bytes, shape, dtype))
            }
        }
    }

    fn first_dim(&self) -> i32 {
        match self {
            OnDisk::File { shape, .. } => shape.first().copied().unwrap_or(1),
            OnDisk::Stack(members) => members.len() as i32,
        }
    }
}

/// Where each tensor of the safetensors file `path` (already checked) lies.
fn tensors_on_disk(path: &Path) -> Result<HashMap<String, OnDisk>> {
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    let file_len = file.metadata().map_err(|e| Error::io(path, e))?.len();
    let (data_start, entries) = read_header(path, file, file_len)?;
    let shared = Arc::new(path.to_path_buf());
    Ok(entries
        .into_iter()
        .filter_map(|e| {
            let (dtype, element_size) = match e.dtype.as_str() {
                "BOOL" => (Dtype::Bool, 1),
                "U8" => (Dtype::Uint8, 1),
                "I8" => (Dtype::Int8, 1),
                "U16" => (Dtype::Uint16, 2),
                "I16" => (Dtype::Int16, 2),
                "F16" => (Dtype::Float16, 2),
                "BF16" => (Dtype::Bfloat16, 2),
                "U32" => (Dtype::Uint32, 4),
                "I32" => (Dtype::Int32, 4),
                "F32" => (Dtype::Float32, 4),
                "U64" => (Dtype::Uint64, 8),
                "I64" => (Dtype::Int64, 8),
                "F64" => (Dtype::Float64, 8),
                _ => return None,
            };
            Some((
                e.name,
                OnDisk::File {
                    path: shared.clone(),
                    offset: data_start + e.start,
                    dtype,
                    element_size,
                    shape: e.shape,
                },
            ))
        })
        .collect())
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

fn check_header(path: &Path, file: impl Read, file_len: u64) -> Result<()> {
    read_header(path, file, file_len).map(|_| ())
}

/// One tensor of a safetensors header: its byte range within the data section.
struct HeaderEntry {
    name: String,
    dtype: String,
    shape: Vec<i32>,
    start: u64,
}

/// Reads and checks a safetensors header: where the data section starts, and the tensors.
fn read_header(path: &Path, mut file: impl Read, file_len: u64) -> Result<(u64, Vec<HeaderEntry>)> {
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
    let mut entries = Vec::with_capacity(header.len());
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
        entries.push(HeaderEntry {
            name: name.clone(),
            dtype: dtype.to_owned(),
            shape: shape
                .iter()
                .map(|d| d.as_u64().unwrap_or(0) as i32)
                .collect(),
            start,
        });
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
    Ok((8 + header_len, entries))
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

/// `name` with each `(from, to)` substring replaced once, in order: Transformers'
/// checkpoint conversion of Hub names (`block_sparse_moe.input_linear.` →
/// `block_sparse_moe.experts.gate_up_proj.`), as a family's `sanitize` applies it.
///
/// ```
/// use mlx_models::weights::rename_substrings;
/// let renames = [("mlp.router.gate.", "mlp.gate."), ("mlp.expert_bias", "mlp.e_score_correction_bias")];
/// assert_eq!(rename_substrings("model.layers.1.mlp.router.gate.weight", &renames), "model.layers.1.mlp.gate.weight");
/// ```
pub fn rename_substrings(name: &str, renames: &[(&str, &str)]) -> String {
    renames
        .iter()
        .fold(name.to_owned(), |n, (from, to)| n.replacen(from, to, 1))
}

/// `name` with the module path under `model.layers.{i}.` renamed: each `(from, to)` is a
/// module path under the layer (`"post_mlp_layernorm"`, `"self_attn.query_layernorm"`),
/// or from the root where it starts with `model.` (`"model.final_layernorm"`), or a whole
/// parameter name under the layer (`"attention.dense_bias"` → `"self_attn.o_proj.bias"`,
/// a bare parameter that is a projection's bias); the first
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
            if tail.is_empty() || tail.starts_with('.') {
                return format!("model.layers.{index}.{to}{tail}");
            }
        }
    }
    name.to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A module path renames what is under it; a whole parameter name renames only itself
    /// (a bare bias beside the projection it belongs to), whatever comes first in the list.
    #[test]
    fn layer_renames_take_module_paths_and_whole_parameter_names() {
        let renames = [
            ("attention.dense_bias", "self_attn.o_proj.bias"),
            ("attention.dense", "self_attn.o_proj"),
            ("attention", "self_attn"),
        ];
        for (from, to) in [
            (
                "model.layers.3.attention.dense_bias",
                "model.layers.3.self_attn.o_proj.bias",
            ),
            (
                "model.layers.3.attention.dense.weight",
                "model.layers.3.self_attn.o_proj.weight",
            ),
            (
                "model.layers.3.attention.query_key_value.weight",
                "model.layers.3.self_attn.query_key_value.weight",
            ),
            (
                "model.layers.3.attention.dense_bias_extra",
                "model.layers.3.self_attn.dense_bias_extra",
            ),
            ("model.norm.weight", "model.norm.weight"),
        ] {
            assert_eq!(rename_layer_module(from, &renames), to, "{from}");
        }
    }

    /// A rank's part read from the file equals the same part cut from the whole tensor,
    /// for rows and columns, several ranges, any dtype, and stacked per-expert tensors.
    #[test]
    fn parts_read_from_disk_equal_parts_of_the_whole() {
        let dir = tempfile::tempdir().unwrap();
        let a: Vec<f32> = (0..6 * 8).map(|i| i as f32 * 0.5 - 3.0).collect();
        let b: Vec<u32> = (0..4 * 6).map(|i| i * 7 + 1).collect();
        let experts: Vec<Array> = (0..4)
            .map(|e| {
                let v: Vec<f32> = (0..3 * 5).map(|i| (e * 100 + i) as f32).collect();
                Array::from_slice(&v, &[3, 5])
            })
            .collect();
        let mut tensors = vec![
            ("a".to_owned(), Array::from_slice(&a, &[6, 8])),
            ("b".to_owned(), Array::from_slice(&b, &[4, 6])),
        ];
        for (e, x) in experts.iter().enumerate() {
            tensors.push((format!("experts.{e}.w"), x.clone()));
        }
        let file = dir.path().join("model.safetensors");
        Array::save_safetensors(tensors.iter().map(|(k, v)| (k.as_str(), v)), None, &file).unwrap();
        let mut weights = Weights::from_dir(dir.path()).unwrap();
        let members: Vec<String> = (0..4).map(|e| format!("experts.{e}.w")).collect();
        weights.stack("stacked", &members).unwrap();
        let whole = |name: &str| -> Array {
            match name {
                "stacked" => mlx_rs::ops::stack(&experts, 0).unwrap(),
                _ => tensors.iter().find(|(k, _)| k == name).unwrap().1.clone(),
            }
        };
        let cases = [
            ("a", Part::new(0, 3..6)),
            ("a", Part::new(1, 2..6)),
            (
                "a",
                Part {
                    axis: 1,
                    ranges: vec![0..2, 4..5, 7..8],
                },
            ),
            ("b", Part::new(1, 3..6)),
            (
                "b",
                Part {
                    axis: 0,
                    ranges: vec![1..2, 3..4],
                },
            ),
            ("stacked", Part::new(0, 2..4)),
            ("stacked", Part::new(1, 1..3)),
            ("stacked", Part::new(2, 0..2)),
        ];
        let root = weights.root();
        for (name, part) in cases {
            let got = root.get_part_any_shape(name, &part).unwrap();
            let index: Vec<i32> = part.ranges.iter().flat_map(Range::clone).collect();
            let want = whole(name)
                .take_axis(
                    Array::from_slice(&index, &[index.len() as i32]),
                    part.axis as i32,
                )
                .unwrap();
            assert_eq!(got.shape(), want.shape(), "{name} {part:?}");
            assert_eq!(got.dtype(), want.dtype(), "{name} {part:?}");
            assert!(got.eq_values(&want).unwrap(), "{name} {part:?}");
        }
        // Out-of-bounds parts are errors, not reads past the tensor.
        assert!(root.get_part_any_shape("a", &Part::new(0, 5..7)).is_err());
        assert!(root.get_part_any_shape("a", &Part::new(2, 0..1)).is_err());
        // The stacked tensor still reads whole as the stack.
        let stacked = root.get_any_shape("stacked").unwrap();
        assert!(stacked.eq_values(whole("stacked")).unwrap());
    }
}
