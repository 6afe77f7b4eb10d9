//! Norm layers: RMSNorm (scaling by `w` or, for weights stored as offsets from one, by
//! `1 + w`) and LayerNorm with or without bias, as Transformers computes them.

use crate::error::Result;
use crate::weights::WeightPath;
use mlx_rs::{Array, Dtype};

/// How a norm layer normalizes and scales.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum NormKind {
    /// `x / rms(x) * w`.
    Rms,
    /// `x / rms(x) * (1 + w)`: the weight is stored as an offset from one (Gemma).
    RmsPlusOne,
    /// `(x - mean) / std * w + b`, with or without the bias `b`.
    Layer { bias: bool },
    /// `(x - mean) / std * (1 + w) + b`: a LayerNorm whose weight is stored as an offset
    /// from one (Nemotron's `LayerNorm1P`).
    LayerPlusOne { bias: bool },
}

/// A loaded norm layer.
#[derive(Debug, Clone)]
pub struct Norm {
    weight: Array,
    bias: Option<Array>,
    eps: f32,
    layer_norm: bool,
}

impl Norm {
    /// Loads `weight` (and `bias`) of a norm over the last `dim` features.
    pub fn load(w: &WeightPath, kind: NormKind, dim: i32, eps: f64) -> Result<Norm> {
        let weight = w.get("weight", &[dim])?;
        let plus_one = |weight: Array| -> Result<Array> {
            // Transformers adds the one in f32, then works in the activation dtype.
            let dtype = weight.dtype();
            let weight = weight
                .as_dtype(Dtype::Float32)?
                .add(Array::from_f32(1.0))?
                .as_dtype(dtype)?;
            // Computed now: a model may run on another thread, where MLX cannot evaluate
            // work pending on this thread's stream.
            weight.eval()?;
            Ok(weight)
        };
        let layer_bias = |bias: bool| bias.then(|| w.get("bias", &[dim])).transpose();
        let (weight, bias) = match kind {
            NormKind::Rms => (weight, None),
            NormKind::RmsPlusOne => (plus_one(weight)?, None),
            NormKind::Layer { bias } => (weight, layer_bias(bias)?),
            NormKind::LayerPlusOne { bias } => (plus_one(weight)?, layer_bias(bias)?),
        };
        Ok(Norm {
            weight,
            bias,
            eps: eps as f32,
            layer_norm: matches!(kind, NormKind::Layer { .. } | NormKind::LayerPlusOne { .. }),
        })
    }

    pub fn forward(&self, x: &Array) -> Result<Array> {
        Ok(if self.layer_norm {
            mlx_rs::fast::layer_norm(x, Some(&self.weight), self.bias.as_ref(), self.eps)?
        } else {
            mlx_rs::fast::rms_norm(x, Some(&self.weight), self.eps)?
        })
    }

    pub fn dtype(&self) -> Dtype {
        self.weight.dtype()
    }
}

/// `norm(x)`, or `x` where there is no norm.
pub fn norm_opt(norm: &Option<Norm>, x: &Array) -> Result<Array> {
    match norm {
        Some(n) => n.forward(x),
        None => Ok(x.clone()),
    }
}
