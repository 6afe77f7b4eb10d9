//! Norm layers: RMSNorm (scaling by `w` or, for weights stored as offsets from one, by
//! `1 + w`) and LayerNorm with or without bias, as Transformers computes them; either may
//! also come without any learned parameter.

use crate::error::Result;
use crate::weights::{WeightPath, Weights};
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
    /// `x / rms(x)`: no learned weight (NanoChat).
    RmsNoWeight,
    /// `(x - mean) / std`: no learned weight or bias (OLMo).
    LayerNoWeight,
}

/// A loaded norm layer.
#[derive(Debug, Clone)]
pub struct Norm {
    /// `None`: the norm has no learned scale.
    weight: Option<Array>,
    bias: Option<Array>,
    eps: f32,
    layer_norm: bool,
}

impl Norm {
    /// Loads `weight` (and `bias`) of a norm over the last `dim` features; a norm without
    /// learned parameters loads nothing.
    pub fn load(w: &WeightPath, kind: NormKind, dim: i32, eps: f64) -> Result<Norm> {
        let layer_norm = matches!(
            kind,
            NormKind::Layer { .. } | NormKind::LayerPlusOne { .. } | NormKind::LayerNoWeight
        );
        let weight = || w.get("weight", &[dim]);
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
            NormKind::Rms => (Some(weight()?), None),
            NormKind::RmsPlusOne => (Some(plus_one(weight()?)?), None),
            NormKind::Layer { bias } => (Some(weight()?), layer_bias(bias)?),
            NormKind::LayerPlusOne { bias } => (Some(plus_one(weight()?)?), layer_bias(bias)?),
            NormKind::RmsNoWeight | NormKind::LayerNoWeight => (None, None),
        };
        Ok(Norm {
            weight,
            bias,
            eps: eps as f32,
            layer_norm,
        })
    }

    pub fn forward(&self, x: &Array) -> Result<Array> {
        Ok(if self.layer_norm {
            mlx_rs::fast::layer_norm(x, self.weight.as_ref(), self.bias.as_ref(), self.eps)?
        } else {
            mlx_rs::fast::rms_norm(x, self.weight.as_ref(), self.eps)?
        })
    }

    /// The dtype of the norm's weight; `None` for a norm without one, which keeps its
    /// input's dtype.
    pub fn dtype(&self) -> Option<Dtype> {
        self.weight.as_ref().map(Array::dtype)
    }
}

/// `norm(x)`, or `x` where there is no norm.
pub fn norm_opt(norm: &Option<Norm>, x: &Array) -> Result<Array> {
    match norm {
        Some(n) => n.forward(x),
        None => Ok(x.clone()),
    }
}

/// The families whose `1 + w` RMSNorm weights mlx-lm's converter stores with the 1 added
/// (its Qwen3-Next and Qwen3.5 `sanitize`): checkpoints it wrote (see
/// [`Weights::converted_by_mlx_lm`]) hold the whole scale.
pub const MLX_LM_FOLDS_PLUS_ONE_NORMS: &[&str] = &[
    "qwen3_next",
    "qwen3_5",
    "qwen3_5_text",
    "qwen3_5_moe",
    "qwen3_5_moe_text",
];

/// The `1 + w` norms of those families, by the names mlx-lm folds.
const PLUS_ONE_NORMS: [&str; 5] = [
    ".input_layernorm.weight",
    ".post_attention_layernorm.weight",
    "model.norm.weight",
    ".q_norm.weight",
    ".k_norm.weight",
];

/// Takes the 1 out of the `1 + w` norms of a `model_type` checkpoint mlx-lm converted,
/// exactly (a bf16 scale near 1 less 1 is a bf16 number); nothing for any other checkpoint
/// or family. Every family loader runs it before its `sanitize`.
pub fn unfold_mlx_lm_norms(model_type: &str, weights: &mut Weights) -> Result<()> {
    shift_plus_one_norms(model_type, weights, -1.0)
}

/// What mlx-lm's converter does to these norms (the converse of
/// [`unfold_mlx_lm_norms`]): adds the 1, for a checkpoint already in its layout.
pub fn fold_mlx_lm_norms(model_type: &str, weights: &mut Weights) -> Result<()> {
    shift_plus_one_norms(model_type, weights, 1.0)
}

fn shift_plus_one_norms(model_type: &str, weights: &mut Weights, shift: f32) -> Result<()> {
    if !MLX_LM_FOLDS_PLUS_ONE_NORMS.contains(&model_type) || !weights.converted_by_mlx_lm() {
        return Ok(());
    }
    let norms: Vec<String> = weights
        .names()
        .filter(|n| PLUS_ONE_NORMS.iter().any(|s| n.ends_with(s)))
        .map(str::to_owned)
        .collect();
    for name in norms {
        let w = weights.remove(&name).expect("listed above");
        let shifted = w.add(Array::from_f32(shift).as_dtype(w.dtype())?)?;
        weights.insert(name, shifted);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::weights::Weights;
    use std::collections::HashMap;

    /// The norms without weight against their closed forms, on a row whose mean and
    /// spread are far from 0 and 1; neither reads a tensor.
    #[test]
    fn weightless_norms_match_their_closed_forms() -> Result<()> {
        let weights = Weights::new(HashMap::new(), "none");
        let xs = [1.0f32, 2.0, 4.0, 9.0];
        let x = Array::from_slice(&xs, &[1, 4]);
        let n = xs.len() as f32;
        let eps = 1e-5;
        let mean = xs.iter().sum::<f32>() / n;
        let var = xs.iter().map(|v| (v - mean).powi(2)).sum::<f32>() / n;
        let ms = xs.iter().map(|v| v * v).sum::<f32>() / n;
        for (kind, expected) in [
            (
                NormKind::LayerNoWeight,
                xs.map(|v| (v - mean) / (var + eps).sqrt()),
            ),
            (NormKind::RmsNoWeight, xs.map(|v| v / (ms + eps).sqrt())),
        ] {
            let norm = Norm::load(&weights.root(), kind, 4, f64::from(eps))?;
            assert_eq!(norm.dtype(), None);
            let y = norm.forward(&x)?;
            for (got, want) in y.as_slice::<f32>().iter().zip(expected) {
                assert!((got - want).abs() < 1e-6, "{kind:?}: {got} vs {want}");
            }
        }
        weights.check_all_used()
    }
}
