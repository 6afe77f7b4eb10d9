//! The layers models are built from, loaded straight from checkpoint tensors.
//!
//! A linear layer or embedding is quantized when its checkpoint has `scales` (and
//! `biases`) next to `weight`, as MLX's affine quantization stores them; the bit width
//! and group size follow from the shapes, so the same model code serves f32, bf16 and
//! 4/8-bit checkpoints.

use crate::distributed::Group;
use crate::error::{Error, Result};
use crate::weights::{Part, WeightPath};
use mlx_rs::ops::indexing::TryIndexOp;
use mlx_rs::{ops, Array, Dtype};
use std::ops::Range;

/// Affine quantization parameters of one tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quantization {
    pub bits: i32,
    pub group_size: i32,
}

/// Rows of a tall f32 matrix multiplied at a time in [`Matrix::matmul_t`] on a few input
/// rows on the CPU (see [`split_for_cpu_decode`]).
const DECODE_ROW_BLOCK: i32 = 2048;

/// Whether `x @ wᵀ` goes block by block of [`DECODE_ROW_BLOCK`] rows of `w`: an f32 matrix
/// of at least 16384 rows (an output layer over a vocabulary) against at most 64 input rows
/// (decode steps), on the CPU. MLX hands every CPU matmul to BLAS `sgemm`, which for so few
/// input rows spends most of its time packing the tall matrix; OpenBLAS does that several
/// times faster on blocks of a few MB than on the whole matrix (SmolLM2's 49152×576 output
/// layer: `cargo xtask bench serve`). The blocks are views (no copy); each output is the
/// same dot product, up to the rounding of whichever BLAS kernel computes it.
fn split_for_cpu_decode(w: &Array, x: &Array) -> bool {
    let input_rows = x.size() / (x.dim(-1).max(1) as usize);
    w.dtype() == Dtype::Float32
        && w.ndim() == 2
        && w.dim(0) >= 8 * DECODE_ROW_BLOCK
        && input_rows <= 64
        && matches!(
            mlx_rs::Device::try_default().and_then(|d| d.get_type()),
            Ok(mlx_rs::DeviceType::Cpu)
        )
}

/// A weight matrix `[out, in]`, dense or quantized.
#[derive(Debug, Clone)]
pub enum Matrix {
    Dense(Array),
    Quantized {
        weight: Array,
        scales: Array,
        biases: Array,
        quantization: Quantization,
    },
}

impl Matrix {
    /// Loads `weight` (and `scales`/`biases` when quantized) for an `[out, in]` matrix.
    pub fn load(w: &WeightPath, out_dim: i32, in_dim: i32) -> Result<Matrix> {
        Matrix::load_part(w, out_dim, in_dim, None)
    }

    /// Loads the part `part` of an `[out, in]` matrix: rows (axis 0) or columns (axis 1),
    /// counted in the matrix's logical elements; a quantized matrix's packed weight, scales
    /// and biases are cut to match (columns only at whole groups).
    pub fn load_part(
        w: &WeightPath,
        out_dim: i32,
        in_dim: i32,
        part: Option<&Part>,
    ) -> Result<Matrix> {
        if !w.contains("scales") {
            return Ok(Matrix::Dense(match part {
                None => w.get("weight", &[out_dim, in_dim])?,
                Some(p) => w.get_part("weight", &[out_dim, in_dim], p)?,
            }));
        }
        let packed = w.shape_of("weight")?;
        let groups = w.shape_of("scales")?;
        w.check_affine_dtype("weight", w.dtype_of("scales")?)?;
        let fits = packed.len() == 2
            && in_dim > 0
            && packed[0] == out_dim
            && (i64::from(packed[1]) * 32) % i64::from(in_dim) == 0
            && w.dtype_of("weight")? == Dtype::Uint32
            && groups.len() == 2
            && groups[0] == out_dim
            && groups[1] > 0
            && in_dim % groups[1] == 0;
        if !fits {
            return Err(w.shape_error("weight", &[out_dim, in_dim], &packed));
        }
        let quantization = Quantization {
            bits: (i64::from(packed[1]) * 32 / i64::from(in_dim)) as i32,
            group_size: in_dim / groups[1],
        };
        if ![2, 3, 4, 5, 6, 8].contains(&quantization.bits)
            || ![32, 64, 128].contains(&quantization.group_size)
        {
            return Err(w.shape_error("weight", &[out_dim, in_dim], &packed));
        }
        w.count(out_dim as usize * in_dim as usize);
        let biases_shape = w.shape_of("biases")?;
        if biases_shape != groups {
            return Err(w.shape_error("biases", &groups, &biases_shape));
        }
        let (weight, scales, biases) = match part {
            None => (
                w.get_any_shape("weight")?,
                w.get_any_shape("scales")?,
                w.get_any_shape("biases")?,
            ),
            Some(p) => {
                let (packed_part, group_part) = quantized_parts(w, p, quantization)?;
                (
                    w.get_part_any_shape("weight", &packed_part)?,
                    w.get_part_any_shape("scales", &group_part)?,
                    w.get_part_any_shape("biases", &group_part)?,
                )
            }
        };
        if let Some(dtype) = w.dequantize_to() {
            let dense = ops::dequantize(
                &weight,
                &scales,
                &biases,
                quantization.group_size,
                quantization.bits,
            )?;
            let dense = dense.as_dtype(dtype)?;
            dense.eval()?;
            return Ok(Matrix::Dense(dense));
        }
        Ok(Matrix::Quantized {
            weight,
            scales,
            biases,
            quantization,
        })
    }

    /// `x @ selfᵀ`.
    pub fn matmul_t(&self, x: &Array) -> Result<Array> {
        Ok(match self {
            Matrix::Dense(w) if split_for_cpu_decode(w, x) => {
                let rows = w.dim(0);
                let parts = (0..rows)
                    .step_by(DECODE_ROW_BLOCK as usize)
                    .map(|start| {
                        let block = w.try_index(start..(start + DECODE_ROW_BLOCK).min(rows))?;
                        Ok(ops::matmul(x, block.t())?)
                    })
                    .collect::<Result<Vec<_>>>()?;
                ops::concatenate(&parts, x.ndim() as i32 - 1)?
            }
            Matrix::Dense(w) => ops::matmul(x, w.t())?,
            Matrix::Quantized {
                weight,
                scales,
                biases,
                quantization,
            } => ops::quantized_matmul(
                x,
                weight,
                scales,
                biases,
                true,
                quantization.group_size,
                quantization.bits,
            )?,
        })
    }

    /// Rows `ids` of the matrix (an embedding lookup), dequantized if needed.
    pub fn rows(&self, ids: &Array) -> Result<Array> {
        Ok(match self {
            Matrix::Dense(w) => w.take_axis(ids, 0)?,
            Matrix::Quantized {
                weight,
                scales,
                biases,
                quantization,
            } => {
                let w = weight.take_axis(ids, 0)?;
                let s = scales.take_axis(ids, 0)?;
                let b = biases.take_axis(ids, 0)?;
                ops::dequantize(&w, &s, &b, quantization.group_size, quantization.bits)?
            }
        })
    }

    /// The matrix as floating point (`[out, in]`, dequantized when quantized).
    pub fn dequantized(&self) -> Result<Array> {
        Ok(match self {
            Matrix::Dense(w) => w.clone(),
            Matrix::Quantized {
                weight,
                scales,
                biases,
                quantization,
            } => ops::dequantize(
                weight,
                scales,
                biases,
                quantization.group_size,
                quantization.bits,
            )?,
        })
    }

    /// The quantization, if any.
    pub fn quantization(&self) -> Option<Quantization> {
        match self {
            Matrix::Dense(_) => None,
            Matrix::Quantized { quantization, .. } => Some(*quantization),
        }
    }

    /// The floating-point type computations with this matrix produce.
    pub fn dtype(&self) -> Dtype {
        match self {
            Matrix::Dense(w) => w.dtype(),
            Matrix::Quantized { scales, .. } => scales.dtype(),
        }
    }
}

/// The part of a quantized matrix's packed weight and of its scales/biases that hold the
/// logical part `p`.
fn quantized_parts(w: &WeightPath, p: &Part, q: Quantization) -> Result<(Part, Part)> {
    if p.axis == 0 {
        return Ok((p.clone(), p.clone()));
    }
    let per_word = 32 / q.bits;
    let whole = |r: &Range<i32>| {
        r.start % q.group_size == 0 && r.end % q.group_size == 0 && 32 % q.bits == 0
    };
    if let Some(r) = p.ranges.iter().find(|r| !whole(r)) {
        return Err(Error::TensorParallel {
            ranks: w.tensor_parallel().map_or(1, Group::size),
            what: w.full_name("weight"),
            message: format!(
                "columns {r:?} do not fall on whole groups of {} ({}-bit)",
                q.group_size, q.bits
            ),
        });
    }
    let scale = |div: i32| Part {
        axis: 1,
        ranges: p
            .ranges
            .iter()
            .map(|r| r.start / div..r.end / div)
            .collect(),
    };
    Ok((scale(per_word), scale(q.group_size)))
}

/// How a layer is divided over the ranks of a tensor-parallel group.
#[derive(Debug, Clone)]
pub enum Split {
    /// Every rank holds all of it.
    Whole,
    /// Each rank holds the output features `ranges` (rows of `[out, in]`, with their
    /// biases) and gives only those.
    Outputs(Vec<Range<i32>>),
    /// As [`Split::Outputs`], and the ranks' outputs are then gathered (in rank order) so
    /// that each has all of them: an output layer split over the vocabulary.
    OutputsGathered(Vec<Range<i32>>, Group),
    /// Each rank holds the input features `ranges` (columns) and computes a partial
    /// product; the partial products are summed over the group and the bias added once.
    Inputs(Vec<Range<i32>>, Group),
}

/// What a split layer does with its rank's output.
#[derive(Debug, Clone)]
pub enum Combine {
    /// Nothing: the output is this rank's part.
    None,
    /// Sums the partial outputs over the group (before the bias).
    Sum(Group),
    /// Gathers the ranks' output features along the last axis.
    Gather(Group),
}

/// `y = x Wᵀ + b`.
#[derive(Debug, Clone)]
pub struct Linear {
    pub weight: Matrix,
    pub bias: Option<Array>,
    /// How a tensor-parallel rank's output becomes the layer's.
    pub combine: Combine,
}

impl Linear {
    /// Loads an `in_dim → out_dim` layer; `bias` says whether the config expects one.
    pub fn load(w: &WeightPath, in_dim: i32, out_dim: i32, bias: bool) -> Result<Linear> {
        Linear::load_split(w, in_dim, out_dim, bias, &Split::Whole)
    }

    /// Loads this rank's part of an `in_dim → out_dim` layer split as `split` says.
    pub fn load_split(
        w: &WeightPath,
        in_dim: i32,
        out_dim: i32,
        bias: bool,
        split: &Split,
    ) -> Result<Linear> {
        let (weight_part, bias_part, combine) = match split {
            Split::Whole => (None, None, Combine::None),
            Split::Outputs(r) => {
                let p = Part {
                    axis: 0,
                    ranges: r.clone(),
                };
                (Some(p.clone()), Some(p), Combine::None)
            }
            Split::OutputsGathered(r, g) => {
                let p = Part {
                    axis: 0,
                    ranges: r.clone(),
                };
                (Some(p.clone()), Some(p), Combine::Gather(g.clone()))
            }
            Split::Inputs(r, g) => {
                let p = Part {
                    axis: 1,
                    ranges: r.clone(),
                };
                (Some(p), None, Combine::Sum(g.clone()))
            }
        };
        let weight = Matrix::load_part(w, out_dim, in_dim, weight_part.as_ref())?;
        let bias = match (bias, bias_part) {
            (false, _) => None,
            (true, None) => Some(w.get("bias", &[out_dim])?),
            (true, Some(p)) => Some(w.get_part("bias", &[out_dim], &p)?),
        };
        Ok(Linear {
            weight,
            bias,
            combine,
        })
    }

    pub fn forward(&self, x: &Array) -> Result<Array> {
        let y = self.weight.matmul_t(x)?;
        let y = match &self.combine {
            Combine::Sum(g) => g.all_sum(&y)?,
            Combine::None | Combine::Gather(_) => y,
        };
        let y = match &self.bias {
            Some(b) => y.add(b)?,
            None => y,
        };
        match &self.combine {
            Combine::Gather(g) => gather_last_axis(g, &y),
            Combine::None | Combine::Sum(_) => Ok(y),
        }
    }
}

/// Every rank's `x` (`[…, n]`) side by side along the last axis, in rank order: `[…, ranks·n]`.
pub fn gather_last_axis(group: &Group, x: &Array) -> Result<Array> {
    let gathered = group.all_gather(&x.expand_dims(0)?)?;
    let last = x.ndim() as i32;
    // [ranks, …, n] → […, ranks, n] → […, ranks·n].
    let moved = gathered.move_axis(0, last - 1)?;
    let mut shape = x.shape().to_vec();
    if let Some(n) = shape.last_mut() {
        *n *= group.size();
    }
    Ok(moved.reshape(&shape)?)
}

/// The range of `0..dim` that rank `rank` of `ranks` holds when `dim` is divided evenly;
/// `what` names the dimension in the error when it does not divide.
pub fn even_part(dim: i32, group: &Group, what: &str) -> Result<Range<i32>> {
    let n = group.size();
    if dim % n != 0 {
        return Err(Error::TensorParallel {
            ranks: n,
            what: what.to_owned(),
            message: format!("{dim} does not divide into {n} equal parts"),
        });
    }
    let len = dim / n;
    Ok(group.rank() * len..(group.rank() + 1) * len)
}

/// Token embeddings `[vocab, hidden]`, usable as the output layer when tied.
#[derive(Debug, Clone)]
pub struct Embedding {
    pub weight: Matrix,
    /// Under tensor parallelism, the first token id of this rank's rows, and the group:
    /// each rank holds an equal share of the vocabulary.
    pub vocab_part: Option<(i32, Group)>,
}

impl Embedding {
    /// Loads the table; under tensor parallelism (a vocabulary that divides over the ranks)
    /// each rank takes its share of the rows, else the whole table.
    pub fn load(w: &WeightPath, vocab_size: i32, hidden_size: i32) -> Result<Embedding> {
        let group = w.tensor_parallel().filter(|g| vocab_size % g.size() == 0);
        let Some(group) = group else {
            return Ok(Embedding {
                weight: Matrix::load(w, vocab_size, hidden_size)?,
                vocab_part: None,
            });
        };
        let rows = even_part(vocab_size, group, "vocab_size")?;
        Ok(Embedding {
            weight: Matrix::load_part(
                w,
                vocab_size,
                hidden_size,
                Some(&Part::new(0, rows.clone())),
            )?,
            vocab_part: Some((rows.start, group.clone())),
        })
    }

    pub fn forward(&self, ids: &Array) -> Result<Array> {
        let Some((first, group)) = &self.vocab_part else {
            return self.weight.rows(ids);
        };
        // This rank's rows for its own ids, zeros for the others; the sum over the ranks
        // is every id's row.
        let rows = match &self.weight {
            Matrix::Dense(w) => w.dim(0),
            Matrix::Quantized { weight, .. } => weight.dim(0),
        };
        let local = ids.subtract(Array::from_int(*first).as_dtype(ids.dtype())?)?;
        let zero = Array::from_int(0).as_dtype(ids.dtype())?;
        let last = Array::from_int(rows - 1).as_dtype(ids.dtype())?;
        let mine = local.ge(&zero)?.logical_and(&local.le(&last)?)?;
        let clamped = ops::minimum(ops::maximum(&local, &zero)?, &last)?;
        let found = self.weight.rows(&clamped)?;
        let found = ops::select(&mine.expand_dims(-1)?, &found, &ops::zeros_like(&found)?)?;
        group.all_sum(&found)
    }

    /// Logits against the embedding matrix (tied output layer).
    pub fn as_linear(&self, x: &Array) -> Result<Array> {
        let logits = self.weight.matmul_t(x)?;
        match &self.vocab_part {
            Some((_, group)) => gather_last_axis(group, &logits),
            None => Ok(logits),
        }
    }
}

/// `v` rounded to the nearest bfloat16 (ties to even), as a number Transformers keeps in a
/// bfloat16 buffer (RecurrentGemma's embedding normalizer) is, whatever the model's dtype.
///
/// ```
/// use mlx_models::nn::round_to_bf16;
/// assert_eq!(round_to_bf16(48f32.sqrt()), 6.9375);
/// assert_eq!(round_to_bf16(8.0), 8.0);
/// ```
pub fn round_to_bf16(v: f32) -> f32 {
    let bits = v.to_bits();
    let rounded = bits.wrapping_add(0x7FFF + ((bits >> 16) & 1)) & 0xFFFF_0000;
    f32::from_bits(rounded)
}

/// `x`, evaluated now. Whatever a block derives from its weights at load time goes through
/// this: a model may run on another thread, where MLX cannot evaluate work left pending on
/// the loading thread's stream.
pub fn computed(x: Array) -> Result<Array> {
    x.eval()?;
    Ok(x)
}

/// A scalar of `x`'s dtype, so that scaling a bf16 tensor keeps it bf16.
pub fn scalar_like(value: f32, x: &Array) -> Result<Array> {
    Ok(Array::from_f32(value).as_dtype(x.dtype())?)
}

/// `x * value`, with `value` rounded to `x`'s dtype (`x` itself when `None`).
pub fn scale(x: &Array, value: Option<f32>) -> Result<Array> {
    match value {
        Some(v) => Ok(x.multiply(&scalar_like(v, x)?)?),
        None => Ok(x.clone()),
    }
}

/// `cap * tanh(x / cap)` (`x` itself when `None`).
pub fn softcap(x: &Array, cap: Option<f32>) -> Result<Array> {
    match cap {
        Some(c) => {
            let c = scalar_like(c, x)?;
            Ok(ops::tanh(&x.divide(&c)?)?.multiply(&c)?)
        }
        None => Ok(x.clone()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A matrix of `rows × cols` f32 values from a small closed form.
    fn matrix(rows: i32, cols: i32, phase: f32) -> Array {
        let data: Vec<f32> = (0..rows * cols)
            .map(|i| ((i as f32) * 0.618 + phase).sin())
            .collect();
        Array::from_slice(&data, &[rows, cols])
    }

    #[test]
    fn a_tall_output_layer_gives_the_same_logits_block_by_block() {
        // 8 blocks and a partial one.
        let (rows, cols) = (8 * DECODE_ROW_BLOCK + 1000, 24);
        let w = Matrix::Dense(matrix(rows, cols, 0.0));
        let Matrix::Dense(dense) = &w else {
            unreachable!()
        };
        let wv: Vec<f32> = dense.as_slice::<f32>().to_vec();
        for input_rows in [1, 3] {
            let x = matrix(input_rows, cols, 1.0)
                .reshape(&[1, input_rows, cols])
                .unwrap();
            assert!(split_for_cpu_decode(dense, &x));
            let y = w.matmul_t(&x).unwrap();
            assert_eq!(y.shape(), &[1, input_rows, rows]);
            let (xv, yv) = (x.as_slice::<f32>(), y.as_slice::<f32>());
            // Against the sums in f64, within the rounding bound of an f32 dot product:
            // cols·ε·Σ|w·x|.
            for r in 0..input_rows as usize {
                for o in 0..rows as usize {
                    let terms = (0..cols as usize).map(|k| {
                        wv[o * cols as usize + k] as f64 * xv[r * cols as usize + k] as f64
                    });
                    let (exact, magnitude) =
                        terms.fold((0.0, 0.0), |(s, m), t| (s + t, m + t.abs()));
                    let bound = cols as f64 * f32::EPSILON as f64 * magnitude;
                    let got = yv[r * rows as usize + o] as f64;
                    assert!(
                        (got - exact).abs() <= bound,
                        "row {r}, output {o}: {got} vs {exact} (bound {bound:e})"
                    );
                }
            }
        }
        // Prefill-sized inputs go through one matmul.
        assert!(!split_for_cpu_decode(dense, &matrix(65, cols, 1.0)));
    }
}
