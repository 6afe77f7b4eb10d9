//! Rotary position embeddings: every variant Transformers configs name, from one factory.
//!
//! Configs describe RoPE in two styles, both accepted: checkpoints on the Hub carry
//! `rope_theta` and `rope_scaling` (`type` or `rope_type`); Transformers 5 writes
//! `rope_parameters` (`rope_type`, `rope_theta`, …). The inverse frequencies are
//! computed in f32 with the same operations as Transformers, so positions far into the
//! context rotate by the same angles, and applied with MLX's `fast::rope`.

use crate::error::{Error, Result};
use crate::nn::scalar_like;
use mlx_rs::{ops, Array};
use serde::Deserialize;
use serde_json::Value;
use std::path::Path;

/// The RoPE fields of a config.json, in either style.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct RopeFields {
    pub rope_theta: Option<f64>,
    pub rope_scaling: Option<Value>,
    pub rope_parameters: Option<Value>,
    pub partial_rotary_factor: Option<f64>,
    pub original_max_position_embeddings: Option<usize>,
}

impl RopeFields {
    /// The same fields at another base: `rope_theta` replaced wherever these fields give it.
    pub fn with_base(&self, base: f64) -> RopeFields {
        let rebased = |block: &Option<Value>| {
            block.as_ref().map(|b| match b {
                Value::Object(map) if map.contains_key("rope_theta") => {
                    let mut map = map.clone();
                    map.insert("rope_theta".to_owned(), Value::from(base));
                    Value::Object(map)
                }
                other => other.clone(),
            })
        };
        RopeFields {
            rope_theta: Some(base),
            rope_scaling: rebased(&self.rope_scaling),
            rope_parameters: rebased(&self.rope_parameters),
            ..self.clone()
        }
    }

    /// The fields of one layer type, for families with a RoPE per layer type (Gemma 3).
    /// Transformers 5 nests `rope_parameters` by layer type; Hub configs give the
    /// sliding-window layers only their own base (`local_base`, e.g. `rope_local_base_freq`)
    /// and keep `rope_theta`/`rope_scaling` for the full-attention layers.
    pub fn for_layer_type(&self, layer_type: &str, local_base: Option<f64>) -> RopeFields {
        if let Some(nested) = self
            .rope_parameters
            .as_ref()
            .and_then(|p| p.get(layer_type))
        {
            return RopeFields {
                rope_parameters: Some(nested.clone()),
                ..self.clone()
            };
        }
        // Legacy configs: `rope_scaling` is the full-attention layers' (Gemma 3, OLMo 3
        // move it there); sliding layers rotate plainly, at their own base if they have one.
        match (layer_type, local_base) {
            ("sliding_attention", Some(base)) => RopeFields {
                rope_theta: Some(base),
                rope_scaling: None,
                rope_parameters: None,
                ..self.clone()
            },
            ("sliding_attention", None) => RopeFields {
                rope_scaling: None,
                ..self.clone()
            },
            _ => self.clone(),
        }
    }
}

/// How the frequencies are scaled.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    /// Plain RoPE.
    Default,
    /// Positions divided by `factor`.
    Linear { factor: f64 },
    /// NTK-aware base growth once the sequence outgrows `max_position_embeddings`.
    Dynamic {
        factor: f64,
        max_position_embeddings: usize,
    },
    /// YaRN: per-frequency blend of interpolation and extrapolation, plus an attention factor.
    Yarn {
        factor: f64,
        original_max_position_embeddings: usize,
        beta_fast: f64,
        beta_slow: f64,
        attention_factor: f64,
        truncate: bool,
    },
    /// Llama 3: low frequencies divided by `factor`, high ones kept, a smooth band between.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: usize,
    },
    /// LongRoPE (Phi-3): per-frequency factors, short or long by the sequence length.
    LongRope {
        short_factor: Vec<f64>,
        long_factor: Vec<f64>,
        original_max_position_embeddings: usize,
        attention_factor: f64,
    },
    /// Phi-3.5-MoE's LongRoPE as Transformers computes it: always the short factors, and
    /// cos/sin scaled by `long_mscale` once the sequence outgrows
    /// `original_max_position_embeddings`, by `short_mscale` before.
    ShortFactorLongRope {
        short_factor: Vec<f64>,
        original_max_position_embeddings: usize,
        short_mscale: f64,
        long_mscale: f64,
    },
}

/// Everything that defines a model's RoPE.
#[derive(Debug, Clone, PartialEq)]
pub struct RopeConfig {
    /// Base wavelength (`rope_theta`).
    pub theta: f64,
    /// Rotated features per head (`head_dim * partial_rotary_factor`).
    pub dims: i32,
    /// Rotate adjacent pairs (GPT-J / llama.cpp layout) instead of halves.
    pub traditional: bool,
    pub scaling: RopeScaling,
}

impl RopeConfig {
    /// Reads the RoPE settings of a config. `max_position_embeddings` and `default_theta`
    /// come from the model's own config; `config_path` names the file in errors.
    pub fn from_fields(
        fields: &RopeFields,
        head_dim: i32,
        max_position_embeddings: usize,
        default_theta: f64,
        config_path: &Path,
    ) -> Result<RopeConfig> {
        Self::read(
            fields,
            head_dim,
            None,
            max_position_embeddings,
            default_theta,
            config_path,
        )
    }

    /// As [`RopeConfig::from_fields`], for configs that name the rotated width in
    /// features rather than as a share of the head (GPT-J's and CodeGen's `rotary_dim`):
    /// the first `rotary_dim.1` features of each head rotate, and a value that is odd,
    /// not positive or wider than the head is an error naming the field `rotary_dim.0`.
    pub fn from_fields_rotating(
        fields: &RopeFields,
        head_dim: i32,
        rotary_dim: (&str, i32),
        max_position_embeddings: usize,
        default_theta: f64,
        config_path: &Path,
    ) -> Result<RopeConfig> {
        Self::read(
            fields,
            head_dim,
            Some(rotary_dim),
            max_position_embeddings,
            default_theta,
            config_path,
        )
    }

    fn read(
        fields: &RopeFields,
        head_dim: i32,
        rotary_dim: Option<(&str, i32)>,
        max_position_embeddings: usize,
        default_theta: f64,
        config_path: &Path,
    ) -> Result<RopeConfig> {
        // Transformers-5 style wins where both are present, as it does in Transformers.
        let (params, key) = match (&fields.rope_parameters, &fields.rope_scaling) {
            (Some(p), _) if !p.is_null() => (p.clone(), "rope_parameters"),
            (_, Some(s)) if !s.is_null() => (s.clone(), "rope_scaling"),
            _ => (Value::Object(Default::default()), "rope_scaling"),
        };
        let p = Params {
            value: &params,
            key,
            path: config_path,
        };
        let theta = p
            .f64_opt("rope_theta")?
            .or(fields.rope_theta)
            .unwrap_or(default_theta);
        let partial = p
            .f64_opt("partial_rotary_factor")?
            .or(fields.partial_rotary_factor)
            .unwrap_or(1.0);
        let (dims, field) = match rotary_dim {
            Some((field, dims)) => (dims, field),
            None => (
                (f64::from(head_dim) * partial) as i32,
                "partial_rotary_factor",
            ),
        };
        if dims <= 0 || dims % 2 != 0 || dims > head_dim {
            return Err(Error::config(
                config_path,
                field,
                format!("gives {dims} rotated dims of a {head_dim}-wide head"),
            ));
        }
        let original_max = || -> Result<usize> {
            // A top-level value wins over the one inside the RoPE block, as in Transformers.
            Ok(fields
                .original_max_position_embeddings
                .or(p.usize_opt("original_max_position_embeddings")?)
                .unwrap_or(max_position_embeddings))
        };
        let rope_type = match p.str_opt("rope_type")?.or(p.str_opt("type")?) {
            Some(t) => t,
            None => "default".to_owned(),
        };
        let scaling = match rope_type.as_str() {
            "default" => RopeScaling::Default,
            "linear" => RopeScaling::Linear { factor: p.f64("factor")? },
            "dynamic" => RopeScaling::Dynamic {
                factor: p.f64("factor")?,
                max_position_embeddings,
            },
            "yarn" => {
                let original = original_max()?;
                let factor = p
                    .f64_opt("factor")?
                    .unwrap_or(max_position_embeddings as f64 / original as f64);
                let mscale = |scale: f64, m: f64| {
                    if scale <= 1.0 { 1.0 } else { 0.1 * m * scale.ln() + 1.0 }
                };
                let attention_factor = match p.f64_opt("attention_factor")? {
                    Some(f) => f,
                    None => match (p.f64_opt("mscale")?, p.f64_opt("mscale_all_dim")?) {
                        (Some(m), Some(all)) if m != 0.0 && all != 0.0 => {
                            mscale(factor, m) / mscale(factor, all)
                        }
                        _ => mscale(factor, 1.0),
                    },
                };
                RopeScaling::Yarn {
                    factor,
                    original_max_position_embeddings: original,
                    beta_fast: p.f64_opt("beta_fast")?.filter(|b| *b != 0.0).unwrap_or(32.0),
                    beta_slow: p.f64_opt("beta_slow")?.filter(|b| *b != 0.0).unwrap_or(1.0),
                    attention_factor,
                    truncate: p.bool_opt("truncate")?.unwrap_or(true),
                }
            }
            "llama3" => RopeScaling::Llama3 {
                factor: p.f64("factor")?,
                low_freq_factor: p.f64("low_freq_factor")?,
                high_freq_factor: p.f64("high_freq_factor")?,
                original_max_position_embeddings: original_max()?,
            },
            "longrope" | "su" => {
                let original = original_max()?;
                let factor = p
                    .f64_opt("factor")?
                    .unwrap_or(max_position_embeddings as f64 / original as f64);
                let attention_factor = match p.f64_opt("attention_factor")? {
                    Some(f) => f,
                    None if factor <= 1.0 => 1.0,
                    None => (1.0 + factor.ln() / (original as f64).ln()).sqrt(),
                };
                let short_factor = p.f64_list("short_factor")?;
                let long_factor = p.f64_list("long_factor")?;
                for (name, list) in [("short_factor", &short_factor), ("long_factor", &long_factor)] {
                    if list.len() != dims as usize / 2 {
                        return Err(p.error(
                            name,
                            format!("has {} entries, expected {} (rotated dims / 2)", list.len(), dims / 2),
                        ));
                    }
                }
                RopeScaling::LongRope {
                    short_factor,
                    long_factor,
                    original_max_position_embeddings: original,
                    attention_factor,
                }
            }
            other => {
                return Err(p.error(
                    "rope_type",
                    format!(
                        "unsupported `{other}`; supported: default, linear, dynamic, yarn, llama3, longrope"
                    ),
                ))
            }
        };
        Ok(RopeConfig {
            theta,
            dims,
            traditional: false,
            scaling,
        })
    }

    /// The inverse frequencies (`dims / 2` values) for a sequence of `seq_len` tokens,
    /// computed as Transformers computes them, in f32.
    pub fn inv_freq(&self, seq_len: usize) -> Vec<f32> {
        let dim = self.dims as usize;
        let base_inv_freq = |base: f32| -> Vec<f32> {
            (0..dim)
                .step_by(2)
                .map(|i| 1.0 / base.powf(i as f32 / dim as f32))
                .collect()
        };
        match &self.scaling {
            RopeScaling::Default => base_inv_freq(self.theta as f32),
            RopeScaling::Linear { factor } => base_inv_freq(self.theta as f32)
                .into_iter()
                .map(|f| f / *factor as f32)
                .collect(),
            RopeScaling::Dynamic {
                factor,
                max_position_embeddings,
            } => {
                let max = *max_position_embeddings as f64;
                let len = (seq_len as f64).max(max);
                let d = dim as f64;
                let base = self.theta * ((factor * len / max) - (factor - 1.0)).powf(d / (d - 2.0));
                base_inv_freq(base as f32)
            }
            RopeScaling::Yarn {
                factor,
                original_max_position_embeddings,
                beta_fast,
                beta_slow,
                truncate,
                ..
            } => {
                let base = self.theta;
                let correction_dim = |rotations: f64| {
                    (dim as f64
                        * (*original_max_position_embeddings as f64
                            / (rotations * 2.0 * std::f64::consts::PI))
                            .ln())
                        / (2.0 * base.ln())
                };
                let (mut low, mut high) = (correction_dim(*beta_fast), correction_dim(*beta_slow));
                if *truncate {
                    low = low.floor();
                    high = high.ceil();
                }
                let low = low.max(0.0);
                let high = high.min(dim as f64 - 1.0);
                let high = if low == high { high + 0.001 } else { high };
                let factor = *factor as f32;
                (0..dim / 2)
                    .map(|i| {
                        let pos_freq = (base as f32).powf((2 * i) as f32 / dim as f32);
                        let extrapolation = 1.0 / pos_freq;
                        let interpolation = 1.0 / (factor * pos_freq);
                        let ramp =
                            ((i as f32 - low as f32) / (high as f32 - low as f32)).clamp(0.0, 1.0);
                        let extrapolation_factor = 1.0 - ramp;
                        interpolation * (1.0 - extrapolation_factor)
                            + extrapolation * extrapolation_factor
                    })
                    .collect()
            }
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => {
                let old_len = *original_max_position_embeddings as f32;
                let (factor, low, high) = (
                    *factor as f32,
                    *low_freq_factor as f32,
                    *high_freq_factor as f32,
                );
                let low_freq_wavelen = old_len / low;
                let high_freq_wavelen = old_len / high;
                base_inv_freq(self.theta as f32)
                    .into_iter()
                    .map(|inv_freq| {
                        let wavelen = 2.0 * std::f32::consts::PI / inv_freq;
                        let scaled = if wavelen > low_freq_wavelen {
                            inv_freq / factor
                        } else {
                            inv_freq
                        };
                        if wavelen < high_freq_wavelen || wavelen > low_freq_wavelen {
                            scaled
                        } else {
                            let smooth = (old_len / wavelen - low) / (high - low);
                            (1.0 - smooth) * scaled / factor + smooth * scaled
                        }
                    })
                    .collect()
            }
            RopeScaling::LongRope { .. } | RopeScaling::ShortFactorLongRope { .. } => {
                let factors = match &self.scaling {
                    RopeScaling::LongRope {
                        long_factor,
                        original_max_position_embeddings,
                        ..
                    } if seq_len > *original_max_position_embeddings => long_factor,
                    RopeScaling::LongRope { short_factor, .. }
                    | RopeScaling::ShortFactorLongRope { short_factor, .. } => short_factor,
                    _ => unreachable!("matched above"),
                };
                (0..dim)
                    .step_by(2)
                    .zip(factors)
                    .map(|(i, f)| {
                        let shape = i as f32 / dim as f32;
                        1.0 / (*f as f32 * (self.theta as f32).powf(shape))
                    })
                    .collect()
            }
        }
    }

    /// The factor Transformers multiplies cos and sin by (YaRN, LongRoPE); 1 otherwise.
    pub fn attention_factor(&self) -> f32 {
        self.attention_factor_at(0)
    }

    /// [`RopeConfig::attention_factor`] for a sequence of `seq_len` tokens (Phi-3.5-MoE's
    /// depends on it).
    pub fn attention_factor_at(&self, seq_len: usize) -> f32 {
        match &self.scaling {
            RopeScaling::ShortFactorLongRope {
                original_max_position_embeddings,
                short_mscale,
                long_mscale,
                ..
            } => {
                if seq_len > *original_max_position_embeddings {
                    *long_mscale as f32
                } else {
                    *short_mscale as f32
                }
            }
            RopeScaling::Yarn {
                attention_factor, ..
            }
            | RopeScaling::LongRope {
                attention_factor, ..
            } => *attention_factor as f32,
            _ => 1.0,
        }
    }

    /// Whether the frequencies depend on the sequence length.
    fn depends_on_length(&self) -> bool {
        matches!(
            self.scaling,
            RopeScaling::Dynamic { .. } | RopeScaling::LongRope { .. }
        )
    }
}

/// A ready-to-apply RoPE.
#[derive(Debug, Clone)]
pub struct Rope {
    config: RopeConfig,
    /// MLX's `freqs` argument (wavelength per pair) when fixed.
    fixed_freqs: Option<Array>,
    /// 1, or -1 for a rotation by `-θ` ([`Rope::reversed`]).
    direction: f32,
}

impl Rope {
    pub fn new(config: RopeConfig) -> Result<Rope> {
        let fixed_freqs = if config.depends_on_length() {
            None
        } else {
            Some(mlx_freqs(&config.inv_freq(0)))
        };
        Ok(Rope {
            config,
            fixed_freqs,
            direction: 1.0,
        })
    }

    /// The same RoPE rotating by `-θ` instead of `θ`: NanoChat's `rotate_half` returns
    /// `(x₂, −x₁)` where Llama's returns `(−x₂, x₁)`.
    pub fn reversed(self) -> Rope {
        Rope {
            direction: -self.direction,
            ..self
        }
    }

    /// Whether the rotation is by `-θ` ([`Rope::reversed`]).
    pub fn is_reversed(&self) -> bool {
        self.direction < 0.0
    }

    pub fn config(&self) -> &RopeConfig {
        &self.config
    }

    /// Rotates `x` (`[batch, heads, seq, head_dim]`) whose first token sits at `offset`.
    pub fn apply(&self, x: &Array, offset: i32) -> Result<Array> {
        let seq_len = offset as usize + x.dim(-2) as usize;
        let dynamic;
        let freqs = match &self.fixed_freqs {
            Some(f) => f,
            None => {
                dynamic = mlx_freqs(&self.config.inv_freq(seq_len));
                &dynamic
            }
        };
        let factor = self.config.attention_factor_at(seq_len);
        let x = if factor != 1.0 {
            self.scale_rotated(x, factor)?
        } else {
            x.clone()
        };
        Ok(mlx_rs::fast::rope(
            &x,
            self.config.dims,
            self.config.traditional,
            None,
            self.direction,
            offset,
            freqs,
        )?)
    }

    /// Whether [`Rope::apply_rows`] works: the frequencies and scale do not depend on the
    /// sequence length (they do for dynamic NTK and LongRoPE), so rows of a batch at
    /// different positions rotate exactly as each would alone.
    pub fn supports_row_offsets(&self) -> bool {
        self.fixed_freqs.is_some()
            && !matches!(self.config.scaling, RopeScaling::ShortFactorLongRope { .. })
    }

    /// Rotates `x` (`[batch, heads, seq, head_dim]`) whose rows start at positions of their
    /// own, `offsets[b]` for row `b` (a batch of sequences of different lengths). An error
    /// where [`Rope::supports_row_offsets`] is false.
    pub fn apply_rows(&self, x: &Array, offsets: &[i32]) -> Result<Array> {
        let (Some(freqs), true) = (&self.fixed_freqs, self.supports_row_offsets()) else {
            return Err(mlx_rs::error::Exception::custom(
                "this RoPE's frequencies depend on the sequence length: rows at different \
                 positions cannot share a batch",
            )
            .into());
        };
        if offsets.len() as i32 != x.dim(0) {
            return Err(mlx_rs::error::Exception::custom(format!(
                "{} row offsets for a batch of {}",
                offsets.len(),
                x.dim(0)
            ))
            .into());
        }
        let factor = self.config.attention_factor_at(0);
        let x = if factor != 1.0 {
            self.scale_rotated(x, factor)?
        } else {
            x.clone()
        };
        let offsets = Array::from_slice(offsets, &[offsets.len() as i32]);
        Ok(mlx_rs::fast::rope_dynamic(
            &x,
            self.config.dims,
            self.config.traditional,
            None,
            self.direction,
            &offsets,
            freqs,
        )?)
    }

    /// Multiplies the rotated features by `factor` (Transformers scales cos and sin).
    fn scale_rotated(&self, x: &Array, factor: f32) -> Result<Array> {
        let head_dim = x.dim(-1);
        let factor = scalar_like(factor, x)?;
        if self.config.dims == head_dim {
            return Ok(x.multiply(&factor)?);
        }
        let parts = x.split_at_indices(&[self.config.dims], -1)?;
        Ok(ops::concatenate(
            &[parts[0].multiply(&factor)?, parts[1].clone()],
            -1,
        )?)
    }

    /// cos and sin (`[positions, dims]`, halves repeated as Transformers lays them out) of
    /// the angles this RoPE applies, read back from `fast::rope` itself by rotating unit
    /// vectors, for a sequence of `seq_len` tokens. Used to check RoPE against Transformers.
    pub fn cos_sin(&self, positions: &[i32], seq_len: usize) -> Result<(Vec<f32>, Vec<f32>)> {
        let (cos, sin) = self.cos_sin_per_frequency(positions, seq_len, false)?;
        let half = (self.config.dims / 2) as usize;
        let repeat = |v: Vec<f32>| -> Vec<f32> {
            v.chunks(half.max(1))
                .flat_map(|row| row.iter().chain(row).copied())
                .collect()
        };
        Ok((repeat(cos), repeat(sin)))
    }

    /// cos and sin (`[positions, dims / 2]`, one per frequency) of the angles this RoPE
    /// applies, read back from `fast::rope` by rotating unit vectors in the layout the
    /// reference uses: halves (`pairs` false: feature `i` pairs with `i + dims/2`) or
    /// adjacent pairs (`pairs` true: `2i` with `2i + 1`, Llama 4). A RoPE of the other layout
    /// reads back as wrong angles, as it would differ from the reference.
    pub fn cos_sin_per_frequency(
        &self,
        positions: &[i32],
        seq_len: usize,
        pairs: bool,
    ) -> Result<(Vec<f32>, Vec<f32>)> {
        let dims = self.config.dims;
        let half = dims / 2;
        let freqs = mlx_freqs(&self.config.inv_freq(seq_len));
        let factor = self.config.attention_factor_at(seq_len);
        // Feature `first(i)` and its partner `second(i)` for frequency `i`: rotating the
        // unit vector at `first(i)` puts cos there and sin at `second(i)`.
        let first = |i: i32| if pairs { 2 * i } else { i };
        let second = |i: i32| if pairs { 2 * i + 1 } else { i + half };
        let eye: Vec<f32> = (0..half * dims)
            .map(|k| {
                if k % dims == first(k / dims) {
                    1.0
                } else {
                    0.0
                }
            })
            .collect();
        let x = Array::from_slice(&eye, &[1, half, 1, dims]);
        let mut cos = Vec::with_capacity(positions.len() * half as usize);
        let mut sin = Vec::with_capacity(positions.len() * half as usize);
        for &p in positions {
            let r = mlx_rs::fast::rope(
                &x,
                dims,
                self.config.traditional,
                None,
                self.direction,
                p,
                &freqs,
            )?;
            let r = r.as_slice::<f32>();
            cos.extend((0..half).map(|i| r[(i * dims + first(i)) as usize] * factor));
            sin.extend((0..half).map(|i| r[(i * dims + second(i)) as usize] * factor));
        }
        Ok((cos, sin))
    }
}

/// MLX's `fast::rope` takes wavelengths and rotates by `position / freq`; pick for each
/// inverse frequency the f32 whose reciprocal is exactly it, so angles match bit for bit.
fn mlx_freqs(inv_freq: &[f32]) -> Array {
    let freqs: Vec<f32> = inv_freq
        .iter()
        .map(|&inv| {
            let mut f = (1.0 / f64::from(inv)) as f32;
            for _ in 0..4 {
                let back = 1.0 / f;
                if back == inv {
                    break;
                }
                f = if back > inv { next_up(f) } else { next_down(f) };
            }
            f
        })
        .collect();
    Array::from_slice(&freqs, &[freqs.len() as i32])
}

fn next_up(x: f32) -> f32 {
    f32::from_bits(x.to_bits() + 1)
}

fn next_down(x: f32) -> f32 {
    f32::from_bits(x.to_bits() - 1)
}

/// Reads RoPE parameters from a `rope_parameters` / `rope_scaling` object.
struct Params<'a> {
    value: &'a Value,
    key: &'static str,
    path: &'a Path,
}

impl Params<'_> {
    fn error(&self, field: &str, message: impl Into<String>) -> Error {
        Error::config(self.path, &format!("{}.{field}", self.key), message)
    }

    fn get(&self, field: &str) -> Option<&Value> {
        self.value.get(field).filter(|v| !v.is_null())
    }

    fn f64_opt(&self, field: &str) -> Result<Option<f64>> {
        self.get(field)
            .map(|v| {
                v.as_f64()
                    .ok_or_else(|| self.error(field, format!("expected a number, found {v}")))
            })
            .transpose()
    }

    fn f64(&self, field: &str) -> Result<f64> {
        self.f64_opt(field)?
            .ok_or_else(|| self.error(field, "missing"))
    }

    fn usize_opt(&self, field: &str) -> Result<Option<usize>> {
        self.get(field)
            .map(|v| {
                v.as_u64().map(|n| n as usize).ok_or_else(|| {
                    self.error(field, format!("expected a positive integer, found {v}"))
                })
            })
            .transpose()
    }

    fn bool_opt(&self, field: &str) -> Result<Option<bool>> {
        self.get(field)
            .map(|v| {
                v.as_bool()
                    .ok_or_else(|| self.error(field, format!("expected true or false, found {v}")))
            })
            .transpose()
    }

    fn str_opt(&self, field: &str) -> Result<Option<String>> {
        self.get(field)
            .map(|v| {
                v.as_str()
                    .map(str::to_owned)
                    .ok_or_else(|| self.error(field, format!("expected a string, found {v}")))
            })
            .transpose()
    }

    fn f64_list(&self, field: &str) -> Result<Vec<f64>> {
        let list = self
            .get(field)
            .ok_or_else(|| self.error(field, "missing"))?;
        list.as_array()
            .and_then(|items| items.iter().map(Value::as_f64).collect::<Option<Vec<_>>>())
            .ok_or_else(|| self.error(field, "expected a list of numbers"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A reversed RoPE rotates by -θ: a unit vector on feature 0 at position `p` becomes
    /// `cos(p·ω₀)` there and `-sin(p·ω₀)` on its partner in the other half, where the usual
    /// RoPE puts `+sin`.
    #[test]
    fn reversed_rope_rotates_the_other_way() -> Result<()> {
        let config = RopeConfig {
            theta: 10000.0,
            dims: 4,
            traditional: false,
            scaling: RopeScaling::Default,
        };
        let x = Array::from_slice(&[1.0f32, 0.0, 0.0, 0.0], &[1, 1, 1, 4]);
        for (rope, sign) in [
            (Rope::new(config.clone())?, 1.0f32),
            (Rope::new(config)?.reversed(), -1.0),
        ] {
            let p = 3;
            let y = rope.apply(&x, p)?;
            let y = y.as_slice::<f32>();
            let angle = p as f32; // ω₀ = 1
            assert!((y[0] - angle.cos()).abs() < 1e-6);
            assert!((y[2] - sign * angle.sin()).abs() < 1e-6, "{y:?}");
            assert_eq!(rope.is_reversed(), sign < 0.0);
        }
        Ok(())
    }
}
