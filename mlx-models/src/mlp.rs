//! Dense feed-forward blocks: the gated (SwiGLU/GeGLU) MLP with separate or fused gate/up
//! projections, and the plain two-layer MLP, with the activations Transformers names (xIELU's
//! learned parameters loaded with the MLP).

use crate::config::ConfigFile;
use crate::error::{Error, Result};
use crate::nn::{even_part, Linear, Split};
use crate::norm::Norm;
use crate::tap::Tap;
use crate::weights::WeightPath;
use crate::xielu::Xielu;
use mlx_rs::{Array, Dtype};

/// The MLP nonlinearity, by the names Transformers' `ACT2FN` uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// `silu` / `swish`.
    Silu,
    /// Exact (erf) GELU: `gelu`.
    Gelu,
    /// GELU with the tanh approximation: `gelu_pytorch_tanh`, `gelu_new`.
    GeluTanh,
    Relu,
    /// `relu(x)²`: `relu2` (Nemotron-H).
    Relu2,
    /// `xielu` (Apertus): learned parameters under the MLP's `act_fn`, so only a dense
    /// [`Mlp`] applies it.
    Xielu,
}

impl Activation {
    /// The activation `name` (a config value) stands for; `field` names it in errors.
    pub fn from_config(config: &ConfigFile, field: &str, name: &str) -> Result<Activation> {
        Ok(match name {
            "silu" | "swish" => Activation::Silu,
            "gelu" => Activation::Gelu,
            "gelu_pytorch_tanh" | "gelu_new" | "gelu_fast" => Activation::GeluTanh,
            "relu" => Activation::Relu,
            "relu2" => Activation::Relu2,
            "xielu" => Activation::Xielu,
            other => {
                return Err(Error::config(
                    &config.path,
                    field,
                    format!("activation `{other}` is not supported (silu, gelu, gelu_pytorch_tanh, gelu_new, relu, relu2, xielu)"),
                ))
            }
        })
    }

    /// Exact GELU read as its tanh approximation: Gemma checkpoints name `gelu` but were
    /// trained with the approximation, and Transformers reads them so.
    pub fn gelu_as_tanh(self) -> Activation {
        match self {
            Activation::Gelu => Activation::GeluTanh,
            other => other,
        }
    }

    /// Applies the activation; the result keeps `x`'s dtype. The GELUs are computed in f32
    /// (MLX's versions would promote bf16 input through their f32 constants; PyTorch
    /// computes them in f32 internally and rounds once).
    pub fn apply(self, x: &Array) -> Result<Array> {
        let in_f32 = |f: fn(&Array) -> mlx_rs::error::Result<Array>| -> Result<Array> {
            Ok(f(&x.as_dtype(Dtype::Float32)?)?.as_dtype(x.dtype())?)
        };
        match self {
            Activation::Silu => Ok(mlx_rs::nn::silu(x)?),
            Activation::Gelu => in_f32(|x| mlx_rs::nn::gelu(x)),
            Activation::GeluTanh => in_f32(|x| mlx_rs::nn::gelu_approximate(x)),
            Activation::Relu => Ok(mlx_rs::nn::relu(x)?),
            Activation::Relu2 => {
                let r = mlx_rs::nn::relu(x)?;
                Ok(r.multiply(&r)?)
            }
            Activation::Xielu => Err(Error::Mlx(mlx_rs::error::Exception::custom(
                "xIELU has learned parameters: only a dense MLP (which loads them) applies it",
            ))),
        }
    }
}

/// An MLP's activation as loaded: a fixed function, or xIELU with its parameters.
#[derive(Debug, Clone)]
pub enum ActFn {
    Fixed(Activation),
    Xielu(Xielu),
}

impl ActFn {
    /// `act`, with its parameters from `w`'s `act_fn` where it has some.
    pub fn load(w: &WeightPath, act: Activation) -> Result<ActFn> {
        Ok(match act {
            Activation::Xielu => ActFn::Xielu(Xielu::load(&w.pp("act_fn"))?),
            fixed => ActFn::Fixed(fixed),
        })
    }

    pub fn apply(&self, x: &Array) -> Result<Array> {
        match self {
            ActFn::Fixed(act) => act.apply(x),
            ActFn::Xielu(act) => act.apply(x),
        }
    }
}

/// How the MLP's projections are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MlpLayout {
    /// `down_proj(act(gate_proj(x)) * up_proj(x))`.
    Gated,
    /// The same with one `gate_up_proj` whose rows are the gate, then the up projection (Phi-3).
    FusedGated,
    /// `c_proj(act(c_fc(x)))` (StarCoder 2).
    Plain,
    /// `down_proj(act(up_proj(x)))`, no gate (Arcee, Nemotron).
    UpDown,
}

/// The MLP of every layer.
#[derive(Debug, Clone)]
pub struct MlpSettings {
    pub intermediate_size: i32,
    pub layout: MlpLayout,
    pub activation: Activation,
    pub bias: bool,
}

/// A dense MLP: its projections, and an optional norm of the hidden features before the
/// output projection (BitNet's `ffn_sub_norm`).
#[derive(Debug, Clone)]
pub struct Mlp {
    pub projections: MlpProjections,
    pub sub_norm: Option<Norm>,
}

/// An MLP's projections, in one of the [`MlpLayout`]s, with its checkpoint's names.
#[derive(Debug, Clone)]
pub enum MlpProjections {
    Gated {
        gate_proj: Linear,
        up_proj: Linear,
        down_proj: Linear,
        act: ActFn,
    },
    FusedGated {
        gate_up_proj: Linear,
        down_proj: Linear,
        act: ActFn,
    },
    Plain {
        c_fc: Linear,
        c_proj: Linear,
        act: ActFn,
    },
    UpDown {
        up_proj: Linear,
        down_proj: Linear,
        act: ActFn,
    },
}

impl Mlp {
    /// Loads the projections under `w` of an MLP from `hidden` features to
    /// `s.intermediate_size` and back. Under tensor parallelism each rank holds an equal
    /// share of the intermediate features: the projections into them split by rows, the
    /// one out of them by columns, its partial outputs summed over the ranks.
    pub fn load(w: &WeightPath, s: &MlpSettings, hidden: i32) -> Result<Self> {
        let (inter, bias) = (s.intermediate_size, s.bias);
        let act = ActFn::load(w, s.activation)?;
        let (into, fused, out) = match w.tensor_parallel() {
            None => (Split::Whole, Split::Whole, Split::Whole),
            Some(g) => {
                let mine = even_part(
                    inter,
                    g,
                    &format!("{} (intermediate size)", w.full_name("")),
                )?;
                let gate_up = vec![mine.clone(), inter + mine.start..inter + mine.end];
                (
                    Split::Outputs(vec![mine.clone()]),
                    Split::Outputs(gate_up),
                    Split::Inputs(vec![mine], g.clone()),
                )
            }
        };
        let linear = |name: &str, i: i32, o: i32, split: &Split| {
            Linear::load_split(&w.pp(name), i, o, bias, split)
        };
        let projections = match s.layout {
            MlpLayout::Gated => MlpProjections::Gated {
                gate_proj: linear("gate_proj", hidden, inter, &into)?,
                up_proj: linear("up_proj", hidden, inter, &into)?,
                down_proj: linear("down_proj", inter, hidden, &out)?,
                act,
            },
            MlpLayout::FusedGated => MlpProjections::FusedGated {
                gate_up_proj: linear("gate_up_proj", hidden, 2 * inter, &fused)?,
                down_proj: linear("down_proj", inter, hidden, &out)?,
                act,
            },
            MlpLayout::Plain => MlpProjections::Plain {
                c_fc: linear("c_fc", hidden, inter, &into)?,
                c_proj: linear("c_proj", inter, hidden, &out)?,
                act,
            },
            MlpLayout::UpDown => MlpProjections::UpDown {
                up_proj: linear("up_proj", hidden, inter, &into)?,
                down_proj: linear("down_proj", inter, hidden, &out)?,
                act,
            },
        };
        Ok(Mlp {
            projections,
            sub_norm: None,
        })
    }

    /// The same MLP with `norm` on its hidden features, before the output projection.
    pub fn with_sub_norm(self, norm: Norm) -> Mlp {
        Mlp {
            sub_norm: Some(norm),
            ..self
        }
    }

    /// The MLP of `x` (`[..., hidden]`); records `mlp.hidden` and `mlp.out`.
    pub fn forward(&self, x: &Array, tap: &mut Tap) -> Result<Array> {
        let hidden = match &self.projections {
            MlpProjections::Gated {
                gate_proj,
                up_proj,
                act,
                ..
            } => act
                .apply(&gate_proj.forward(x)?)?
                .multiply(up_proj.forward(x)?)?,
            MlpProjections::FusedGated {
                gate_up_proj, act, ..
            } => {
                let parts = gate_up_proj.forward(x)?.split_equal(2, -1)?;
                act.apply(&parts[0])?.multiply(&parts[1])?
            }
            MlpProjections::Plain { c_fc, act, .. } => act.apply(&c_fc.forward(x)?)?,
            MlpProjections::UpDown { up_proj, act, .. } => act.apply(&up_proj.forward(x)?)?,
        };
        let hidden = match &self.sub_norm {
            Some(norm) => norm.forward(&hidden)?,
            None => hidden,
        };
        tap.record("mlp.hidden", &hidden);
        let out = match &self.projections {
            MlpProjections::Gated { down_proj, .. }
            | MlpProjections::FusedGated { down_proj, .. }
            | MlpProjections::UpDown { down_proj, .. } => down_proj.forward(&hidden)?,
            MlpProjections::Plain { c_proj, .. } => c_proj.forward(&hidden)?,
        };
        tap.record("mlp.out", &out);
        Ok(out)
    }
}
