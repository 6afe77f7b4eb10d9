//! xIELU, the activation with learned parameters of Apertus's MLP
//! (<https://arxiv.org/abs/2411.13010>), as Transformers' `XIELUActivation` computes it:
//!
//! ```text
//! αp = softplus(alpha_p)            αn = β + softplus(alpha_n)
//! f(x) = αp·x² + β·x                               for x > 0
//! f(x) = (expm1(min(x, eps)) − x)·αn + β·x         otherwise
//! ```
//!
//! `alpha_p` and `alpha_n` (shape `[1]`) are learned; `beta` and `eps` (scalars) are stored
//! beside them in the checkpoint (`mlp.act_fn.*`).

use crate::error::Result;
use crate::nn::computed;
use crate::weights::WeightPath;
use mlx_rs::{ops, Array};

/// A loaded xIELU activation, its two slopes already through their softplus.
#[derive(Debug, Clone)]
pub struct Xielu {
    /// `softplus(alpha_p)`: the slope of the quadratic branch.
    alpha_p: Array,
    /// `β + softplus(alpha_n)`: the scale of the negative branch.
    alpha_n: Array,
    beta: Array,
    eps: Array,
}

impl Xielu {
    /// Loads `alpha_p`, `alpha_n` (`[1]`), `beta` and `eps` (scalars) under `w`.
    pub fn load(w: &WeightPath) -> Result<Xielu> {
        let beta = w.get("beta", &[])?;
        let alpha_p = computed(mlx_rs::nn::softplus(w.get("alpha_p", &[1])?)?)?;
        let alpha_n = computed(beta.add(mlx_rs::nn::softplus(w.get("alpha_n", &[1])?)?)?)?;
        Ok(Xielu {
            alpha_p,
            alpha_n,
            beta,
            eps: w.get("eps", &[])?,
        })
    }

    /// The activation of `x`, in `x`'s dtype.
    pub fn apply(&self, x: &Array) -> Result<Array> {
        let dtype = x.dtype();
        let (alpha_p, alpha_n) = (self.alpha_p.as_dtype(dtype)?, self.alpha_n.as_dtype(dtype)?);
        let (beta, eps) = (self.beta.as_dtype(dtype)?, self.eps.as_dtype(dtype)?);
        let linear = beta.multiply(x)?;
        let positive = alpha_p.multiply(x)?.multiply(x)?.add(&linear)?;
        let negative = ops::expm1(ops::minimum(x, &eps)?)?
            .subtract(x)?
            .multiply(&alpha_n)?
            .add(&linear)?;
        Ok(ops::select(
            &x.gt(Array::from_f32(0.0).as_dtype(dtype)?)?,
            &positive,
            &negative,
        )?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::weights::Weights;
    use std::collections::HashMap;

    /// The formula at a few points against its closed form, with the parameters of
    /// Transformers' initialization (alpha_p, alpha_n = log(expm1(0.8)), log(expm1(0.3)),
    /// beta 0.5, eps -1e-6): αp = 0.8, αn = 0.8.
    #[test]
    fn matches_the_closed_form() -> Result<()> {
        let inv_softplus = |y: f32| (y.exp_m1()).ln();
        let tensors = HashMap::from([
            (
                "alpha_p".to_owned(),
                Array::from_slice(&[inv_softplus(0.8)], &[1]),
            ),
            (
                "alpha_n".to_owned(),
                Array::from_slice(&[inv_softplus(0.3)], &[1]),
            ),
            ("beta".to_owned(), Array::from_f32(0.5)),
            ("eps".to_owned(), Array::from_f32(-1e-6)),
        ]);
        let weights = Weights::new(tensors, "xielu");
        let act = Xielu::load(&weights.root())?;
        let xs = [-3.0f32, -0.5, -1e-7, 0.0, 0.25, 2.0];
        let y = act.apply(&Array::from_slice(&xs, &[xs.len() as i32]))?;
        let expected: Vec<f32> = xs
            .iter()
            .map(|&x| {
                if x > 0.0 {
                    0.8 * x * x + 0.5 * x
                } else {
                    (x.min(-1e-6).exp_m1() - x) * 0.8 + 0.5 * x
                }
            })
            .collect();
        for (got, want) in y.as_slice::<f32>().iter().zip(&expected) {
            assert!((got - want).abs() < 1e-6, "{got} vs {want}");
        }
        Ok(())
    }
}
