//! A prediction head: the final hidden states transformed once more before the output
//! projection, `norm(act(dense(h)))` (BERT's `cls.predictions.transform`, the ModernBERT
//! decoder's `lm_head`). The output projection itself stays the model's `lm_head` (or the
//! tied embedding).
//!
//! Weights under the head's path: `dense.weight` `[hidden, hidden]` (and `dense.bias`),
//! `norm.weight` (and `norm.bias` for a LayerNorm with bias), of the model's norm kind.
//!
//! ```
//! use mlx_models::head::{HeadSettings, PredictionHead};
//! use mlx_models::mlp::Activation;
//! use mlx_models::norm::NormKind;
//! use mlx_models::weights::Weights;
//! use mlx_rs::Array;
//! use std::collections::HashMap;
//!
//! let tensors = HashMap::from([
//!     ("head.dense.weight".to_owned(), Array::from_slice(&[1.0f32, 0.0, 0.0, 1.0], &[2, 2])),
//!     ("head.norm.weight".to_owned(), Array::from_slice(&[1.0f32, 1.0], &[2])),
//! ]);
//! let weights = Weights::new(tensors, "example");
//! let settings = HeadSettings { bias: false, activation: Activation::Relu };
//! let head = PredictionHead::load(&weights.path("head"), &settings, 2, NormKind::Layer { bias: false }, 1e-5)?;
//! // relu([3, 1]) = [3, 1]; normalized: [1, -1] (up to epsilon).
//! let y = head.forward(&Array::from_slice(&[3.0f32, 1.0], &[1, 2]))?;
//! assert!((y.as_slice::<f32>()[0] - 1.0).abs() < 1e-4);
//! weights.check_all_used()?;
//! # Ok::<(), mlx_models::Error>(())
//! ```

use crate::error::Result;
use crate::mlp::{ActFn, Activation};
use crate::nn::Linear;
use crate::norm::{Norm, NormKind};
use crate::weights::WeightPath;
use mlx_rs::Array;

/// What a prediction head is made of besides its width and norm (the model's).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeadSettings {
    /// `dense` has a bias.
    pub bias: bool,
    /// Applied to `dense`'s output.
    pub activation: Activation,
}

/// `norm(act(dense(h)))`, loaded with every shape checked.
#[derive(Debug, Clone)]
pub struct PredictionHead {
    pub dense: Linear,
    pub act: ActFn,
    pub norm: Norm,
}

impl PredictionHead {
    /// Loads `dense` and `norm` under `w`, for `hidden` features in and out.
    pub fn load(
        w: &WeightPath,
        s: &HeadSettings,
        hidden: i32,
        norm: NormKind,
        eps: f64,
    ) -> Result<PredictionHead> {
        Ok(PredictionHead {
            dense: Linear::load(&w.pp("dense"), hidden, hidden, s.bias)?,
            act: ActFn::load(w, s.activation)?,
            norm: Norm::load(&w.pp("norm"), norm, hidden, eps)?,
        })
    }

    pub fn forward(&self, h: &Array) -> Result<Array> {
        let x = self.dense.forward(h)?;
        let x = self.act.apply(&x)?;
        self.norm.forward(&x)
    }
}
