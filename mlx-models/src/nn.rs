//! The layers models are built from, loaded straight from checkpoint tensors.
//!
//! A linear layer or embedding is quantized when its checkpoint has `scales` (and
//! `biases`) next to `weight`, as MLX's affine quantization stores them; the bit width
//! and group size follow from the shapes, so the same model code serves f32, bf16 and
//! 4/8-bit checkpoints.

use crate::error::Result;
use crate::weights::WeightPath;
use mlx_rs::{ops, Array, Dtype};

/// Affine quantization parameters of one tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quantization {
    pub bits: i32,
    pub group_size: i32,
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
        if !w.contains("scales") {
            return Ok(Matrix::Dense(w.get("weight", &[out_dim, in_dim])?));
        }
        let weight = w.get_any_shape("weight")?;
        let scales = w.get_any_shape("scales")?;
        w.check_affine("weight", &scales)?;
        let biases = w.get_any_shape("biases")?;
        let packed = weight.shape().to_vec();
        let groups = scales.shape().to_vec();
        let fits = packed.len() == 2
            && in_dim > 0
            && packed[0] == out_dim
            && (i64::from(packed[1]) * 32) % i64::from(in_dim) == 0
            && weight.dtype() == Dtype::Uint32
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
        w.count(weight.size() * 32 / quantization.bits as usize);
        if biases.shape() != scales.shape() {
            return Err(w.shape_error("biases", &groups, biases.shape()));
        }
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

/// `y = x Wᵀ + b`.
#[derive(Debug, Clone)]
pub struct Linear {
    pub weight: Matrix,
    pub bias: Option<Array>,
}

impl Linear {
    /// Loads an `in_dim → out_dim` layer; `bias` says whether the config expects one.
    pub fn load(w: &WeightPath, in_dim: i32, out_dim: i32, bias: bool) -> Result<Linear> {
        let weight = Matrix::load(w, out_dim, in_dim)?;
        let bias = if bias {
            Some(w.get("bias", &[out_dim])?)
        } else {
            None
        };
        Ok(Linear { weight, bias })
    }

    pub fn forward(&self, x: &Array) -> Result<Array> {
        let y = self.weight.matmul_t(x)?;
        Ok(match &self.bias {
            Some(b) => y.add(b)?,
            None => y,
        })
    }
}

/// Token embeddings `[vocab, hidden]`, usable as the output layer when tied.
#[derive(Debug, Clone)]
pub struct Embedding {
    pub weight: Matrix,
}

impl Embedding {
    pub fn load(w: &WeightPath, vocab_size: i32, hidden_size: i32) -> Result<Embedding> {
        Ok(Embedding {
            weight: Matrix::load(w, vocab_size, hidden_size)?,
        })
    }

    pub fn forward(&self, ids: &Array) -> Result<Array> {
        self.weight.rows(ids)
    }

    /// Logits against the embedding matrix (tied output layer).
    pub fn as_linear(&self, x: &Array) -> Result<Array> {
        self.weight.matmul_t(x)
    }
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
