//! The drift report: how a converted model's outputs differ from its source's on the same
//! token ids — per layer (from the models' taps), at the logits (max |Δ|, KL divergence,
//! top-1 agreement), along a greedy path, and as perplexity on a fixed text.

use crate::cache::LayerCache;
use crate::error::{Error, Result};
use crate::model::LanguageModel;
use crate::tap::Tap;
use mlx_rs::{Array, Dtype};
use serde::Serialize;
use std::fmt;

/// The fixed text whose perplexity a drift report measures (plain prose, no template).
pub const PERPLEXITY_TEXT: &str = "The sun rose slowly over the quiet harbour, and the \
fishing boats, one after another, slipped out past the breakwater into the grey morning \
sea. On the quay the first stalls were opening; a baker carried trays of warm bread, and \
two children raced each other to the end of the pier to watch the gulls.";

/// What to compare: prompts (token ids, with a label), greedy steps per prompt, and the
/// token ids whose perplexity both models are scored on.
#[derive(Debug, Clone)]
pub struct DriftInputs {
    pub prompts: Vec<(String, Vec<u32>)>,
    pub greedy_steps: usize,
    pub perplexity_ids: Vec<u32>,
}

/// How the converted model's outputs differ from the source model's on the same inputs.
#[derive(Debug, Clone, Default, Serialize)]
pub struct DriftReport {
    pub prompts: Vec<PromptDrift>,
    /// Per tapped intermediate (`embeddings`, `layers.3`, `norm`, `logits`, …) the largest
    /// error over the prompts, in the order the source produced them.
    pub layers: Vec<LayerDrift>,
    /// The largest first-step |Δlogit| over the prompts.
    pub max_abs_logit_diff: f32,
    /// The largest first-step KL(source ‖ converted) over the prompts, in nats.
    pub max_kl: f64,
    /// Prompts whose first-step top token is the same.
    pub top1_equal: usize,
    /// Greedy tokens equal to the source's, over all prompts.
    pub greedy_tokens_equal: usize,
    pub greedy_tokens: usize,
    /// The dtype of each model's logits (`float32`, `bfloat16`, …).
    pub source_dtype: String,
    pub converted_dtype: String,
    /// Intermediates the converted model computes in another dtype than the source
    /// (`name: source → converted`), as scales in the wrong dtype cause; a conversion not
    /// asked to cast has none.
    pub dtype_changes: Vec<String>,
    /// Perplexity of each model on the fixed text (`None` when it has under two tokens).
    pub source_perplexity: Option<f64>,
    pub converted_perplexity: Option<f64>,
}

impl DriftReport {
    /// The largest relative error of any intermediate (‖Δ‖₂ / ‖source‖₂).
    pub fn max_layer_rel_error(&self) -> f32 {
        self.layers.iter().map(|l| l.rel_error).fold(0.0, f32::max)
    }
}

/// One tapped intermediate of a [`DriftReport`].
#[derive(Debug, Clone, Serialize)]
pub struct LayerDrift {
    pub name: String,
    pub max_abs: f32,
    /// ‖converted − source‖₂ / ‖source‖₂ over the whole tensor.
    pub rel_error: f32,
}

/// One prompt of a [`DriftReport`].
#[derive(Debug, Clone, Serialize)]
pub struct PromptDrift {
    pub prompt: String,
    pub max_abs_logit_diff: f32,
    pub mean_abs_logit_diff: f32,
    pub kl: f64,
    pub same_top1: bool,
    /// Greedy steps before the first differing token (all of them when none differs).
    pub greedy_steps_equal: usize,
    pub greedy_steps: usize,
    /// The source model's top-2 margin at the first differing step, if any.
    pub source_margin_at_divergence: Option<f32>,
}

impl fmt::Display for DriftReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "{:<24} {:>12} {:>12}", "layer", "max |Δ|", "rel. error")?;
        // Whole layers only (`embeddings`, `layers.3`, `norm`, `logits`); drift.json has
        // every intermediate.
        let whole = |name: &str| match name.split_once('.') {
            None => true,
            Some((head, rest)) => head == "layers" && !rest.contains('.'),
        };
        for l in self.layers.iter().filter(|l| whole(&l.name)) {
            writeln!(
                f,
                "{:<24} {:>12.3e} {:>12.3e}",
                l.name, l.max_abs, l.rel_error
            )?;
        }
        writeln!(
            f,
            "{:<40} {:>12} {:>12} {:>10} {:>6} {:>8}",
            "prompt", "max |Δlogit|", "mean |Δ|", "KL", "top-1", "greedy"
        )?;
        for p in &self.prompts {
            let mut prompt: String = p.prompt.chars().take(38).collect();
            if prompt.len() < p.prompt.len() {
                prompt.push('…');
            }
            writeln!(
                f,
                "{:<40} {:>12.3e} {:>12.3e} {:>10.2e} {:>6} {:>4}/{:<3}",
                prompt.replace('\n', " "),
                p.max_abs_logit_diff,
                p.mean_abs_logit_diff,
                p.kl,
                if p.same_top1 { "same" } else { "DIFF" },
                p.greedy_steps_equal,
                p.greedy_steps
            )?;
        }
        let ppl = |p: Option<f64>| p.map_or("-".to_owned(), |p| format!("{p:.4}"));
        write!(
            f,
            "max |Δlogit| {:.3e}, max KL {:.2e}, top-1 equal {}/{}, greedy tokens equal {}/{}, \
             perplexity {} → {}, logits {} → {}{}",
            self.max_abs_logit_diff,
            self.max_kl,
            self.top1_equal,
            self.prompts.len(),
            self.greedy_tokens_equal,
            self.greedy_tokens,
            ppl(self.source_perplexity),
            ppl(self.converted_perplexity),
            self.source_dtype,
            self.converted_dtype,
            if self.dtype_changes.is_empty() {
                String::new()
            } else {
                format!(", dtype changed at {}", self.dtype_changes.join(", "))
            },
        )
    }
}

fn input(ids: &[u32]) -> Array {
    let ids: Vec<i32> = ids.iter().map(|&i| i as i32).collect();
    Array::from_slice(&ids, &[1, ids.len() as i32])
}

/// The values of `x` as f32, flattened (a reshape copies strided views, such as taps of
/// transposed tensors, into row order).
fn to_f32(x: &Array) -> Result<Vec<f32>> {
    let x = x.as_dtype(Dtype::Float32)?.reshape(&[-1])?;
    x.eval()?;
    x.try_as_slice::<f32>()
        .map(<[f32]>::to_vec)
        .map_err(|e| Error::Convert {
            message: format!("reading a {:?} tensor: {e}", x.shape()),
        })
}

/// The logits `[positions, vocab]` (as f32 rows) after feeding `ids` on top of `cache`,
/// with the tap's records.
fn run(
    network: &dyn LanguageModel,
    cache: &mut [LayerCache],
    ids: &[u32],
    tap: &mut Tap,
) -> Result<Vec<f32>> {
    Ok(run_typed(network, cache, ids, tap)?.0)
}

/// [`run`], and the logits' dtype.
fn run_typed(
    network: &dyn LanguageModel,
    cache: &mut [LayerCache],
    ids: &[u32],
    tap: &mut Tap,
) -> Result<(Vec<f32>, Dtype)> {
    let logits = network.forward(&input(ids), cache, tap)?;
    Ok((to_f32(&logits)?, logits.dtype()))
}

fn dtype_name(dtype: Dtype) -> String {
    format!("{dtype:?}").to_lowercase()
}

fn last_row(logits: &[f32], rows: usize) -> &[f32] {
    let width = logits.len() / rows.max(1);
    &logits[logits.len() - width..]
}

fn log_softmax(x: &[f32]) -> Vec<f64> {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let sum: f64 = x.iter().map(|&v| (v as f64 - max).exp()).sum();
    let log_sum = sum.ln() + max;
    x.iter().map(|&v| v as f64 - log_sum).collect()
}

fn argmax(x: &[f32]) -> usize {
    x.iter()
        .enumerate()
        .fold((0, f32::NEG_INFINITY), |(bi, bv), (i, &v)| {
            if v > bv {
                (i, v)
            } else {
                (bi, bv)
            }
        })
        .0
}

/// Largest |a − b| (NaN counts as infinite) and ‖a − b‖₂ / ‖a‖₂.
fn errors(a: &[f32], b: &[f32]) -> (f32, f32) {
    let (mut max, mut diff2, mut norm2) = (0f32, 0f64, 0f64);
    for (&x, &y) in a.iter().zip(b) {
        let d = (x - y).abs();
        max = max.max(if d.is_nan() { f32::INFINITY } else { d });
        diff2 += f64::from(x - y).powi(2);
        norm2 += f64::from(x).powi(2);
    }
    let rel = if diff2.is_nan() {
        f32::INFINITY
    } else {
        (diff2.sqrt() / norm2.sqrt().max(1e-30)) as f32
    };
    (max, rel)
}

/// Perplexity of `network` on `ids`: exp of the mean negative log-likelihood of each token
/// given those before it.
fn perplexity(network: &dyn LanguageModel, ids: &[u32]) -> Result<Option<f64>> {
    if ids.len() < 2 {
        return Ok(None);
    }
    let logits = run(network, &mut network.new_cache(), ids, &mut Tap::off())?;
    let width = logits.len() / ids.len();
    let nll: f64 = ids[1..]
        .iter()
        .enumerate()
        .map(|(pos, &next)| -log_softmax(&logits[pos * width..(pos + 1) * width])[next as usize])
        .sum();
    Ok(Some((nll / (ids.len() - 1) as f64).exp()))
}

/// Measures how `converted`'s outputs differ from `source`'s on `inputs`; `progress` is
/// told `(done, total)` runs (the prompts, then the perplexity text).
pub fn drift(
    source: &dyn LanguageModel,
    converted: &dyn LanguageModel,
    inputs: &DriftInputs,
    mut progress: impl FnMut(usize, usize),
) -> Result<DriftReport> {
    let mut report = DriftReport::default();
    let total = inputs.prompts.len() + 1;
    for (done, (prompt, ids)) in inputs.prompts.iter().enumerate() {
        progress(done, total);
        let (mut cache_a, mut cache_b) = (source.new_cache(), converted.new_cache());
        let (mut tap_a, mut tap_b) = (Tap::on(), Tap::on());
        let (logits_a, dtype_a) = run_typed(source, &mut cache_a, ids, &mut tap_a)?;
        let (logits_b, dtype_b) = run_typed(converted, &mut cache_b, ids, &mut tap_b)?;
        report.source_dtype = dtype_name(dtype_a);
        report.converted_dtype = dtype_name(dtype_b);
        if logits_a.len() != logits_b.len() {
            return Err(Error::Convert {
                message: format!(
                    "vocabularies differ: {} vs {} logits",
                    logits_a.len(),
                    logits_b.len()
                ),
            });
        }
        let mut layers = Vec::new();
        for (name, a) in tap_a.records() {
            let Some(b) = tap_b.get(name).filter(|b| b.shape() == a.shape()) else {
                continue;
            };
            let seen = |c: &String| c.split_once(':').is_some_and(|(n, _)| n == name);
            if a.dtype() != b.dtype() && !report.dtype_changes.iter().any(seen) {
                report.dtype_changes.push(format!(
                    "{name}: {} → {}",
                    dtype_name(a.dtype()),
                    dtype_name(b.dtype())
                ));
            }
            let (max_abs, rel_error) = errors(&to_f32(a)?, &to_f32(b)?);
            layers.push(LayerDrift {
                name: name.clone(),
                max_abs,
                rel_error,
            });
        }
        if tap_a.get("logits").is_none() {
            let (max_abs, rel_error) = errors(&logits_a, &logits_b);
            layers.push(LayerDrift {
                name: "logits".into(),
                max_abs,
                rel_error,
            });
        }
        merge_layers(&mut report.layers, layers);

        let a = last_row(&logits_a, ids.len()).to_vec();
        let b = last_row(&logits_b, ids.len()).to_vec();
        let (max, _) = errors(&a, &b);
        let mean = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).sum::<f32>() / a.len() as f32;
        let (la, lb) = (log_softmax(&a), log_softmax(&b));
        let kl: f64 = la.iter().zip(&lb).map(|(p, q)| p.exp() * (p - q)).sum();
        let same_top1 = argmax(&a) == argmax(&b);

        // Greedy on the source's path, both models fed the same tokens: where do the
        // picks first differ?
        let steps = inputs.greedy_steps;
        let (mut sa, mut sb) = (a, b);
        let mut equal = steps;
        let mut margin = None;
        for step in 0..steps {
            let (ta, tb) = (argmax(&sa), argmax(&sb));
            if ta != tb {
                equal = step;
                let mut sorted = sa.clone();
                sorted.sort_by(|x, y| y.total_cmp(x));
                margin = Some(sorted[0] - sorted.get(1).copied().unwrap_or(sorted[0]));
                break;
            }
            if step + 1 < steps {
                sa = run(source, &mut cache_a, &[ta as u32], &mut Tap::off())?;
                sb = run(converted, &mut cache_b, &[ta as u32], &mut Tap::off())?;
            }
        }
        report.max_abs_logit_diff = report.max_abs_logit_diff.max(max);
        report.max_kl = report.max_kl.max(kl);
        report.top1_equal += usize::from(same_top1);
        report.greedy_tokens += steps;
        report.greedy_tokens_equal += equal;
        report.prompts.push(PromptDrift {
            prompt: prompt.clone(),
            max_abs_logit_diff: max,
            mean_abs_logit_diff: mean,
            kl,
            same_top1,
            greedy_steps_equal: equal,
            greedy_steps: steps,
            source_margin_at_divergence: margin,
        });
    }
    progress(total - 1, total);
    report.source_perplexity = perplexity(source, &inputs.perplexity_ids)?;
    report.converted_perplexity = perplexity(converted, &inputs.perplexity_ids)?;
    progress(total, total);
    Ok(report)
}

/// Keeps, per name, the largest errors seen.
fn merge_layers(into: &mut Vec<LayerDrift>, new: Vec<LayerDrift>) {
    for layer in new {
        match into.iter_mut().find(|l| l.name == layer.name) {
            Some(l) => {
                l.max_abs = l.max_abs.max(layer.max_abs);
                l.rel_error = l.rel_error.max(layer.rel_error);
            }
            None => into.push(layer),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_are_absolute_and_relative_to_the_source() {
        let (max, rel) = errors(&[3.0, 4.0], &[3.0, 4.5]);
        assert_eq!(max, 0.5);
        assert!((rel - 0.1).abs() < 1e-7, "{rel}");
        assert_eq!(errors(&[1.0], &[f32::NAN]).0, f32::INFINITY);
    }

    #[test]
    fn log_softmax_and_argmax() {
        let l = log_softmax(&[0.0, 0.0]);
        assert!((l[0] - 0.5f64.ln()).abs() < 1e-12);
        assert_eq!(argmax(&[1.0, 3.0, 2.0]), 1);
    }
}
