//! The GGUF container, read and validated in Rust before any byte reaches MLX.
//!
//! Layout (version 2 and 3, little-endian): `"GGUF"`, `u32` version, `u64` tensor count,
//! `u64` metadata count; the metadata (`string` key, `u32` value type, value); the tensor
//! infos (`string` name, `u32` dimension count, `u64` dimensions, `u32` ggml type, `u64`
//! offset); padding to `general.alignment` (32 by default); the tensor data. Every length,
//! count, type, dimension and offset is checked against the file before it is used:
//! a malformed file is an [`Error::GgufInvalid`] naming the byte offset and the field,
//! or an [`Error::GgufTensor`] naming the tensor, never a crash.

use crate::error::{Error, Result};
use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};

use super::quants::GgmlType;

const MAGIC: &[u8; 4] = b"GGUF";
const DEFAULT_ALIGNMENT: u64 = 32;
/// ggml tensors have at most four dimensions.
const MAX_DIMS: u32 = 4;
/// Arrays nest at most this deep (llama.cpp writes one level).
const MAX_NESTING: usize = 4;

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    Array(Vec<Value>),
    U64(u64),
    I64(i64),
    F64(f64),
}

impl Value {
    /// The GGUF name of this value's type.
    pub fn type_name(&self) -> &'static str {
        match self {
            Value::U8(_) => "uint8",
            Value::I8(_) => "int8",
            Value::U16(_) => "uint16",
            Value::I16(_) => "int16",
            Value::U32(_) => "uint32",
            Value::I32(_) => "int32",
            Value::F32(_) => "float32",
            Value::Bool(_) => "bool",
            Value::String(_) => "string",
            Value::Array(_) => "array",
            Value::U64(_) => "uint64",
            Value::I64(_) => "int64",
            Value::F64(_) => "float64",
        }
    }

    /// The value as an integer, if it is one (of any width).
    pub fn as_i128(&self) -> Option<i128> {
        Some(match *self {
            Value::U8(v) => v.into(),
            Value::I8(v) => v.into(),
            Value::U16(v) => v.into(),
            Value::I16(v) => v.into(),
            Value::U32(v) => v.into(),
            Value::I32(v) => v.into(),
            Value::U64(v) => v.into(),
            Value::I64(v) => v.into(),
            _ => return None,
        })
    }

    /// The value as a float, if it is a number.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(v.into()),
            Value::F64(v) => Some(v),
            _ => self.as_i128().map(|v| v as f64),
        }
    }
}

/// Where a tensor's bytes are, and what they hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    pub name: String,
    /// Dimensions in ggml order: `dims[0]` is the contiguous (row) one.
    pub dims: Vec<u64>,
    pub ggml_type: GgmlType,
    /// Byte offset from the start of the file.
    pub start: u64,
    /// Byte length of the data.
    pub len: u64,
}

impl TensorInfo {
    /// The number of elements.
    pub fn elements(&self) -> u64 {
        self.dims.iter().product()
    }

    /// The shape in MLX (row-major) order: ggml's dimensions reversed.
    pub fn shape(&self) -> Vec<i32> {
        // Each dimension was checked to fit an i32 when the file was read.
        self.dims.iter().rev().map(|&d| d as i32).collect()
    }
}

/// Where the file's bytes come from.
#[derive(Debug)]
enum Source {
    File(File),
    Memory(Vec<u8>),
}

/// A validated GGUF file: its metadata, and tensor infos whose data lie inside it.
#[derive(Debug)]
pub struct GgufFile {
    path: PathBuf,
    source: Source,
    pub version: u32,
    /// Metadata in file order.
    pub metadata: Vec<(String, Value)>,
    index: HashMap<String, usize>,
    /// Tensor infos in file order.
    pub tensors: Vec<TensorInfo>,
    pub alignment: u64,
    /// Where the tensor data section starts.
    pub data_start: u64,
    pub file_len: u64,
}

impl GgufFile {
    /// Opens and validates `path`; tensor data are read later, one tensor at a time.
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
        let reader = BufReader::with_capacity(1 << 16, &file);
        let header = parse(path, reader, len)?;
        Ok(GgufFile::assemble(path, Source::File(file), header, len))
    }

    /// Validates a GGUF held in memory (`name` stands for its path in errors).
    pub fn from_bytes(name: impl Into<PathBuf>, bytes: Vec<u8>) -> Result<Self> {
        let path = name.into();
        let len = bytes.len() as u64;
        let header = parse(&path, bytes.as_slice(), len)?;
        Ok(GgufFile::assemble(
            &path,
            Source::Memory(bytes),
            header,
            len,
        ))
    }

    fn assemble(path: &Path, source: Source, header: Header, file_len: u64) -> Self {
        let index = header
            .metadata
            .iter()
            .enumerate()
            .map(|(i, (k, _))| (k.clone(), i))
            .collect();
        GgufFile {
            path: path.to_path_buf(),
            source,
            version: header.version,
            metadata: header.metadata,
            index,
            tensors: header.tensors,
            alignment: header.alignment,
            data_start: header.data_start,
            file_len,
        }
    }

    /// The file's path (or the name given to [`GgufFile::from_bytes`]).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The metadata value of `key`.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.index.get(key).map(|&i| &self.metadata[i].1)
    }

    /// The info of the tensor `name`.
    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// The raw bytes of a tensor (bounds were checked when the file was read).
    pub fn tensor_bytes(&self, tensor: &TensorInfo) -> Result<Vec<u8>> {
        let len =
            usize::try_from(tensor.len).map_err(|_| self.tensor_error(tensor, "too large"))?;
        match &self.source {
            Source::Memory(bytes) => {
                let start = usize::try_from(tensor.start)
                    .map_err(|_| self.tensor_error(tensor, "offset too large"))?;
                bytes
                    .get(start..start.saturating_add(len))
                    .map(<[u8]>::to_vec)
                    .ok_or_else(|| self.tensor_error(tensor, "data outside the file"))
            }
            Source::File(file) => {
                let mut buffer = vec![0u8; len];
                read_exact_at(file, &mut buffer, tensor.start).map_err(|e| {
                    if e.kind() == std::io::ErrorKind::UnexpectedEof {
                        self.tensor_error(tensor, "the file ended inside the tensor's data (it shrank after it was opened?)")
                    } else {
                        Error::io(&self.path, e)
                    }
                })?;
                Ok(buffer)
            }
        }
    }

    fn tensor_error(&self, tensor: &TensorInfo, message: &str) -> Error {
        Error::GgufTensor {
            path: self.path.clone(),
            tensor: tensor.name.clone(),
            message: message.to_owned(),
        }
    }
}

#[cfg(unix)]
fn read_exact_at(file: &File, buffer: &mut [u8], offset: u64) -> std::io::Result<()> {
    std::os::unix::fs::FileExt::read_exact_at(file, buffer, offset)
}

#[cfg(not(unix))]
fn read_exact_at(file: &File, buffer: &mut [u8], offset: u64) -> std::io::Result<()> {
    use std::io::{Seek, SeekFrom};
    let mut file = file;
    file.seek(SeekFrom::Start(offset))?;
    file.read_exact(buffer)
}

struct Header {
    version: u32,
    metadata: Vec<(String, Value)>,
    tensors: Vec<TensorInfo>,
    alignment: u64,
    data_start: u64,
}

/// A bounds-checked little-endian reader that knows where it is and how much is left.
struct Reader<'p, R> {
    inner: R,
    path: &'p Path,
    pos: u64,
    len: u64,
}

impl<R: Read> Reader<'_, R> {
    fn invalid(&self, offset: u64, field: &str, message: impl Into<String>) -> Error {
        Error::GgufInvalid {
            path: self.path.to_path_buf(),
            offset,
            field: field.to_owned(),
            message: message.into(),
        }
    }

    fn remaining(&self) -> u64 {
        self.len - self.pos
    }

    fn bytes(&mut self, n: u64, field: &str) -> Result<Vec<u8>> {
        if n > self.remaining() {
            return Err(self.invalid(
                self.pos,
                field,
                format!(
                    "needs {n} bytes but the file has {} left (truncated or corrupt)",
                    self.remaining()
                ),
            ));
        }
        // `n` is at most the file's length, which is in memory or on disk: it fits.
        let mut buffer = vec![0u8; n as usize];
        self.inner.read_exact(&mut buffer).map_err(|e| {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                self.invalid(self.pos, field, "the file ended early")
            } else {
                Error::io(self.path, e)
            }
        })?;
        self.pos += n;
        Ok(buffer)
    }

    fn array<const N: usize>(&mut self, field: &str) -> Result<[u8; N]> {
        let bytes = self.bytes(N as u64, field)?;
        let mut out = [0u8; N];
        out.copy_from_slice(&bytes);
        Ok(out)
    }

    fn u32(&mut self, field: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array(field)?))
    }

    fn u64(&mut self, field: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array(field)?))
    }

    fn string(&mut self, field: &str) -> Result<String> {
        let at = self.pos;
        let len = self.u64(field)?;
        if len > self.remaining() {
            return Err(self.invalid(
                at,
                field,
                format!(
                    "string of {len} bytes, but the file has {} left (truncated or corrupt)",
                    self.remaining()
                ),
            ));
        }
        let bytes = self.bytes(len, field)?;
        String::from_utf8(bytes)
            .map_err(|e| self.invalid(at, field, format!("string is not UTF-8: {e}")))
    }

    /// A count of items of at least `min_size` bytes each, checked against what is left.
    fn count(&mut self, field: &str, min_size: u64) -> Result<u64> {
        let at = self.pos;
        let n = self.u64(field)?;
        if n.saturating_mul(min_size) > self.remaining() {
            return Err(self.invalid(
                at,
                field,
                format!(
                    "count {n} cannot fit in the {} bytes left",
                    self.remaining()
                ),
            ));
        }
        Ok(n)
    }

    fn value(&mut self, kind: u32, key: &str, depth: usize) -> Result<Value> {
        let at = self.pos;
        Ok(match kind {
            0 => Value::U8(self.array::<1>(key)?[0]),
            1 => Value::I8(i8::from_le_bytes(self.array(key)?)),
            2 => Value::U16(u16::from_le_bytes(self.array(key)?)),
            3 => Value::I16(i16::from_le_bytes(self.array(key)?)),
            4 => Value::U32(self.u32(key)?),
            5 => Value::I32(i32::from_le_bytes(self.array(key)?)),
            6 => Value::F32(f32::from_le_bytes(self.array(key)?)),
            7 => match self.array::<1>(key)?[0] {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                b => return Err(self.invalid(at, key, format!("bool byte is {b}, not 0 or 1"))),
            },
            8 => Value::String(self.string(key)?),
            9 => {
                if depth >= MAX_NESTING {
                    return Err(self.invalid(at, key, "arrays nested too deep"));
                }
                let item = self.u32(key)?;
                let size = min_value_size(item).ok_or_else(|| {
                    self.invalid(at, key, format!("unknown array item type {item}"))
                })?;
                let n = self.count(key, size)?;
                // Grown as items arrive: a count is only a claim until they are read.
                let mut items = Vec::with_capacity(n.min(1 << 16) as usize);
                for _ in 0..n {
                    items.push(self.value(item, key, depth + 1)?);
                }
                Value::Array(items)
            }
            10 => Value::U64(self.u64(key)?),
            11 => Value::I64(i64::from_le_bytes(self.array(key)?)),
            12 => Value::F64(f64::from_le_bytes(self.array(key)?)),
            other => return Err(self.invalid(at, key, format!("unknown value type {other}"))),
        })
    }
}

/// The fewest bytes a value of GGUF type `kind` takes, or `None` for an unknown type.
fn min_value_size(kind: u32) -> Option<u64> {
    Some(match kind {
        0 | 1 | 7 => 1,
        2 | 3 => 2,
        4..=6 => 4,
        8 | 10..=12 => 8,
        9 => 12,
        _ => return None,
    })
}

fn parse<R: Read>(path: &Path, inner: R, len: u64) -> Result<Header> {
    let mut r = Reader {
        inner,
        path,
        pos: 0,
        len,
    };
    let magic: [u8; 4] = r.array("magic")?;
    if &magic != MAGIC {
        return Err(r.invalid(0, "magic", format!("{magic:02x?} is not \"GGUF\"")));
    }
    let version = r.u32("version")?;
    if !(2..=3).contains(&version) {
        return Err(r.invalid(4, "version", format!("{version} (only 2 and 3 are read)")));
    }
    // A tensor info takes at least 8 (name) + 4 + 4 + 8 bytes, a metadata entry 8 + 4 + 1.
    let tensor_count = r.count("tensor_count", 24)?;
    let kv_count = r.count("metadata_kv_count", 13)?;

    let mut metadata = Vec::with_capacity(kv_count as usize);
    let mut keys = HashSet::new();
    for i in 0..kv_count {
        let at = r.pos;
        let key = r.string(&format!("metadata key #{i}"))?;
        if !keys.insert(key.clone()) {
            return Err(r.invalid(at, &key, "duplicate metadata key"));
        }
        let kind = r.u32(&key)?;
        let value = r.value(kind, &key, 0)?;
        metadata.push((key, value));
    }

    let mut alignment = DEFAULT_ALIGNMENT;
    if let Some((_, value)) = metadata.iter().find(|(k, _)| k == "general.alignment") {
        match value {
            Value::U32(a) if *a > 0 && a.is_power_of_two() => alignment = u64::from(*a),
            other => {
                return Err(r.invalid(
                    0,
                    "general.alignment",
                    format!("{other:?}: must be a uint32 power of two"),
                ))
            }
        }
    }

    struct Raw {
        at: u64,
        name: String,
        dims: Vec<u64>,
        kind: u32,
        offset: u64,
    }
    let mut raw = Vec::with_capacity(tensor_count as usize);
    let mut names = HashSet::new();
    for i in 0..tensor_count {
        let at = r.pos;
        let name = r.string(&format!("tensor #{i} name"))?;
        if !names.insert(name.clone()) {
            return Err(r.invalid(at, &name, "duplicate tensor name"));
        }
        let n_dims = r.u32(&name)?;
        if n_dims == 0 || n_dims > MAX_DIMS {
            return Err(r.invalid(at, &name, format!("{n_dims} dimensions (1 to 4 allowed)")));
        }
        let mut dims = Vec::with_capacity(n_dims as usize);
        for _ in 0..n_dims {
            dims.push(r.u64(&name)?);
        }
        let kind = r.u32(&name)?;
        let offset = r.u64(&name)?;
        raw.push(Raw {
            at,
            name,
            dims,
            kind,
            offset,
        });
    }
    let data_start = r.pos.div_ceil(alignment) * alignment;
    if data_start > len {
        return Err(r.invalid(r.pos, "padding", "the file ends before its data section"));
    }

    let tensor_error = |name: &str, message: String| Error::GgufTensor {
        path: path.to_path_buf(),
        tensor: name.to_owned(),
        message,
    };
    let mut tensors = Vec::with_capacity(raw.len());
    for t in raw {
        let ggml_type = GgmlType::from_id(t.kind).ok_or_else(|| Error::GgufInvalid {
            path: path.to_path_buf(),
            offset: t.at,
            field: t.name.clone(),
            message: format!("unknown ggml type {}", t.kind),
        })?;
        if let Some(&d) = t.dims.iter().find(|&&d| d == 0 || d > i32::MAX as u64) {
            return Err(tensor_error(
                &t.name,
                format!("dimension {d} in {:?}", t.dims),
            ));
        }
        let elements = t
            .dims
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d))
            .filter(|&n| n <= i64::MAX as u64)
            .ok_or_else(|| tensor_error(&t.name, format!("dimensions {:?} overflow", t.dims)))?;
        let (block, type_size) = ggml_type.block();
        if !t.dims[0].is_multiple_of(block) {
            return Err(tensor_error(
                &t.name,
                format!(
                    "rows of {} elements are not whole {ggml_type:?} blocks of {block}",
                    t.dims[0]
                ),
            ));
        }
        let bytes = (elements / block)
            .checked_mul(type_size)
            .ok_or_else(|| tensor_error(&t.name, "byte size overflows".into()))?;
        if !t.offset.is_multiple_of(alignment) {
            return Err(tensor_error(
                &t.name,
                format!(
                    "offset {} is not a multiple of the alignment {alignment}",
                    t.offset
                ),
            ));
        }
        let start = data_start
            .checked_add(t.offset)
            .filter(|s| s.checked_add(bytes).is_some_and(|end| end <= len))
            .ok_or_else(|| {
                tensor_error(
                    &t.name,
                    format!(
                        "data at {} + {} bytes lies outside the {len}-byte file (truncated?)",
                        t.offset, bytes
                    ),
                )
            })?;
        tensors.push(TensorInfo {
            name: t.name,
            dims: t.dims,
            ggml_type,
            start,
            len: bytes,
        });
    }
    // Tensors must not share bytes.
    let mut order: Vec<&TensorInfo> = tensors.iter().filter(|t| t.len > 0).collect();
    order.sort_by_key(|t| t.start);
    for pair in order.windows(2) {
        if pair[0].start + pair[0].len > pair[1].start {
            return Err(tensor_error(
                &pair[1].name,
                format!("data overlaps tensor `{}`", pair[0].name),
            ));
        }
    }
    Ok(Header {
        version,
        metadata,
        tensors,
        alignment,
        data_start,
    })
}
