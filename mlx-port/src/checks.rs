//! The verification of a model against a Transformers fixture: per-layer parity, logits,
//! greedy tokens, RoPE at long positions, bf16 dtype discipline, cache consistency.

use crate::compare::{diff, to_f32_vec, top_k_overlap};
use crate::error::Result;
use crate::fixture::Fixture;
use crate::report::{Check, Report, Row};
use mlx_models::config::ConfigFile;
use mlx_models::models::LanguageModel;
use mlx_models::rope::Rope;
use mlx_models::tap::Tap;
use mlx_rs::{Array, Dtype};
use serde_json::Value;
use std::path::Path;

/// How to run a verification.
#[derive(Debug, Clone, Default)]
pub struct VerifyOptions {
    /// A JSON merge patch (RFC 7396) applied to config.json before loading: how tests
    /// break a model on purpose (`{"rope_theta": null}` drops a field).
    pub config_patch: Option<Value>,
}

/// Builds a model from a config, the directory holding its weights, and a dtype to cast
/// them to.
pub type Builder<'a> =
    &'a dyn Fn(&ConfigFile, &Path, Option<Dtype>) -> mlx_models::Result<Box<dyn LanguageModel>>;

/// Runs every check of `fixture` on the model the registry builds and returns the report.
pub fn verify(fixture: &Fixture, options: &VerifyOptions) -> Result<Report> {
    verify_with(fixture, options, &mlx_models::load::load_model_with_config)
}

/// Runs every check of `fixture` on the model `build` makes (the port tool's candidates).
pub fn verify_with(fixture: &Fixture, options: &VerifyOptions, build: Builder) -> Result<Report> {
    let mut report = Report::new(fixture);
    let model = load(fixture, options, None, build)?;
    let ids = &fixture.manifest.input_ids;
    let tol = fixture.manifest.tolerances;

    // (a) per layer and (b) logits, from one forward pass with every intermediate tapped.
    let mut tap = Tap::on();
    let mut cache = model.new_cache();
    let logits = model.forward(&prompt(ids), &mut cache, &mut tap)?;
    let mut names = vec!["embeddings".to_owned()];
    names.extend((0..fixture.num_layers()).map(|i| format!("layers.{i}")));
    names.extend(["norm".to_owned(), "logits".to_owned()]);
    for name in &names {
        let ours = tap.get(name).cloned().unwrap_or_else(|| logits.clone());
        let d = diff(&to_f32_vec(&ours)?, &to_f32_vec(fixture.tensor(name)?)?);
        report.rows.push(Row::new(
            name,
            d,
            d.max_abs <= tol.max_abs && d.cosine >= tol.min_cosine,
        ));
    }
    let vocab = logits.dim(-1) as usize;
    let overlap = top_k_overlap(
        &to_f32_vec(&logits)?,
        &to_f32_vec(fixture.tensor("logits")?)?,
        vocab,
        5,
    );
    report.checks.push(Check::new(
        "logits top-5",
        overlap == 1.0,
        format!(
            "{:.1}% of Transformers' top-5 tokens are ours at every position",
            overlap * 100.0
        ),
    ));

    // (c) greedy continuation.
    report.checks.push(greedy_check(fixture, model.as_ref())?);
    // (d) RoPE at long positions, of the full-attention layers and, where a family has a
    // second one, of the sliding-window layers.
    if let Some(check) = rope_check(fixture, model.rope(), "rope")? {
        report.checks.push(check);
    }
    if let Some(check) = rope_check(fixture, model.local_rope(), "rope_local")? {
        report.checks.push(check);
    }
    // (f) cache consistency against the full forward pass.
    let reference_gap = fixture
        .manifest
        .checks
        .get("cache_vs_full_logits_max_abs")
        .copied()
        .unwrap_or(0.0);
    report.checks.push(cache_check(
        model.as_ref(),
        ids,
        &logits,
        reference_gap as f32,
        tol.max_abs,
    )?);
    // (e) bf16 stays bf16.
    if !fixture.manifest.bf16_dtypes.is_empty() {
        report.checks.push(bf16_check(fixture, options, build)?);
    }
    Ok(report)
}

fn load(
    fixture: &Fixture,
    options: &VerifyOptions,
    dtype: Option<Dtype>,
    build: Builder,
) -> Result<Box<dyn LanguageModel>> {
    let mut config = ConfigFile::read(&fixture.dir.join("config.json"))?;
    if let Some(patch) = &options.config_patch {
        merge_patch(&mut config.value, patch);
    }
    Ok(build(&config, &fixture.dir, dtype)?)
}

fn prompt(ids: &[i32]) -> Array {
    Array::from_slice(ids, &[1, ids.len() as i32])
}

fn greedy_check(fixture: &Fixture, model: &dyn LanguageModel) -> Result<Check> {
    let expected: Vec<i64> = {
        let t = fixture.tensor("greedy_tokens")?.as_dtype(Dtype::Int64)?;
        t.as_slice::<i64>().to_vec()
    };
    let prompt: Vec<u32> = fixture
        .manifest
        .input_ids
        .iter()
        .map(|&i| i as u32)
        .collect();
    let ours = mlx_models::generate::greedy(model, &prompt, expected.len())?;
    let matched = ours
        .iter()
        .zip(&expected)
        .take_while(|(a, b)| i64::from(**a) == **b)
        .count();
    let detail = if matched == expected.len() {
        format!("{matched}/{} tokens equal", expected.len())
    } else {
        format!(
            "{matched}/{} tokens equal; first difference at step {matched}: ours {} vs Transformers {}",
            expected.len(),
            ours[matched],
            expected[matched]
        )
    };
    Ok(Check::new(
        "greedy tokens",
        matched == expected.len(),
        detail,
    ))
}

fn rope_check(fixture: &Fixture, rope: Option<&Rope>, name: &str) -> Result<Option<Check>> {
    let (Some(rope), Some(cos_ref), Some(sin_ref)) = (
        rope,
        fixture.expected.get(&format!("{name}.cos")),
        fixture.expected.get(&format!("{name}.sin")),
    ) else {
        return Ok(None);
    };
    let positions = &fixture.manifest.rope_positions;
    let seq_len = positions.iter().max().map_or(0, |&p| p as usize + 1);
    let (cos_ref, sin_ref) = (to_f32_vec(cos_ref)?, to_f32_vec(sin_ref)?);
    // Transformers records either `[positions, dims]` (each frequency twice, halves style)
    // or one value per frequency (gpt-oss, Llama 4's complex rotations); the manifest names
    // the layout the model pairs features in (`pairs`: 2i with 2i + 1, else halves).
    // Transformers' full-width tables hold each frequency twice: one half after the other
    // (Llama; GLM-4, which pairs adjacent features all the same) or twice in a row
    // (Cohere's `repeat_interleave`); the recorded table says which.
    let pairs = fixture.manifest.rope_layout.as_deref() == Some("pairs");
    let (cos, mut sin) = rope.cos_sin_per_frequency(positions, seq_len, pairs)?;
    // The tables hold the angles θ; a reference that rotates by -θ is matched by a RoPE
    // that reads back as -θ, and only by one.
    if fixture.manifest.rope_direction.as_deref() == Some("reversed") {
        sin.iter_mut().for_each(|s| *s = -*s);
    }
    let width_ref = cos_ref.len() / positions.len().max(1);
    let in_a_row = width_ref >= 4
        && cos_ref
            .chunks(width_ref)
            .all(|row| row.chunks(2).all(|p| p[0] == p[1]))
        && cos_ref
            .chunks(width_ref)
            .any(|row| row[..width_ref / 2] != row[width_ref / 2..]);
    let repeat = |v: &[f32]| -> Vec<f32> {
        let half = v.len() / positions.len().max(1);
        v.chunks(half.max(1))
            .flat_map(|row| {
                if in_a_row {
                    row.iter().flat_map(|&c| [c, c]).collect::<Vec<_>>()
                } else {
                    row.iter().chain(row).copied().collect()
                }
            })
            .collect()
    };
    let (cos, sin) = if cos.len() * 2 == cos_ref.len() {
        (repeat(&cos), repeat(&sin))
    } else {
        (cos, sin)
    };
    let tol = fixture.manifest.tolerances.rope_max_abs;
    if cos.len() != cos_ref.len() {
        return Ok(Some(Check::new(
            name,
            false,
            format!(
                "{} cos values vs {} in the fixture (rotated dims differ)",
                cos.len(),
                cos_ref.len()
            ),
        )));
    }
    let width = cos.len() / positions.len().max(1);
    // Report the worst position, which is where precision runs out.
    let mut worst = (0.0f32, 0);
    for (row, &p) in positions.iter().enumerate() {
        let r = row * width..(row + 1) * width;
        let d = diff(&cos[r.clone()], &cos_ref[r.clone()])
            .max_abs
            .max(diff(&sin[r.clone()], &sin_ref[r]).max_abs);
        if d >= worst.0 {
            worst = (d, p);
        }
    }
    Ok(Some(Check::new(
        name,
        worst.0 <= tol,
        format!(
            "max |Δcos|,|Δsin| = {:.2e} (at position {}), tolerance {tol:.0e}",
            worst.0, worst.1
        ),
    )))
}

/// Prefills the first k tokens, feeds the rest one at a time, and compares the logits with
/// the full pass. The gap must equal Transformers' own (`reference_gap`, measured the same
/// way at export): zero, except where its RoPE picks frequencies per call.
fn cache_check(
    model: &dyn LanguageModel,
    ids: &[i32],
    full: &Array,
    reference_gap: f32,
    tol: f32,
) -> Result<Check> {
    let full = to_f32_vec(full)?;
    let vocab = full.len() / ids.len();
    let mut worst = 0.0f32;
    let splits = [1, ids.len() / 2, ids.len() - 1];
    for &split in &splits {
        let mut cache = model.new_cache();
        let mut pieces =
            vec![model.forward(&prompt(&ids[..split]), &mut cache, &mut Tap::off())?];
        for &id in &ids[split..] {
            pieces.push(model.forward(&prompt(&[id]), &mut cache, &mut Tap::off())?);
        }
        let stepped = to_f32_vec(&mlx_rs::ops::concatenate(&pieces, 1)?)?;
        worst = worst.max(diff(&stepped, &full).max_abs);
        debug_assert_eq!(stepped.len(), ids.len() * vocab);
    }
    let reference = if reference_gap > tol {
        format!(" (Transformers' own: {reference_gap:.6e})")
    } else {
        String::new()
    };
    Ok(Check::new(
        "cache consistency",
        (worst - reference_gap).abs() <= tol,
        format!("prefill k ∈ {splits:?} then one token at a time: max |Δlogits| = {worst:.6e}{reference}"),
    ))
}

fn bf16_check(fixture: &Fixture, options: &VerifyOptions, build: Builder) -> Result<Check> {
    let model = load(fixture, options, Some(Dtype::Bfloat16), build)?;
    let mut tap = Tap::on();
    let mut cache = model.new_cache();
    model.forward(&prompt(&fixture.manifest.input_ids), &mut cache, &mut tap)?;
    let expected_default = "bfloat16";
    for (name, tensor) in tap.records() {
        let expected = fixture
            .manifest
            .bf16_dtypes
            .get(name)
            .map_or(expected_default, String::as_str);
        let actual = dtype_name(tensor.dtype());
        if actual != expected {
            return Ok(Check::new(
                "bf16 dtypes",
                false,
                format!("`{name}` is {actual} in a bfloat16 run, Transformers keeps {expected}"),
            ));
        }
    }
    Ok(Check::new(
        "bf16 dtypes",
        true,
        format!(
            "{} intermediates checked, none left bfloat16",
            tap.records().len()
        ),
    ))
}

/// The dtype as Transformers names it.
pub fn dtype_name(dtype: Dtype) -> &'static str {
    match dtype {
        Dtype::Bfloat16 => "bfloat16",
        Dtype::Float16 => "float16",
        Dtype::Float32 => "float32",
        Dtype::Float64 => "float64",
        Dtype::Int32 => "int32",
        Dtype::Int64 => "int64",
        _ => "other",
    }
}

/// RFC 7396 JSON merge patch.
pub fn merge_patch(target: &mut Value, patch: &Value) {
    match patch {
        Value::Object(fields) => {
            if !target.is_object() {
                *target = Value::Object(Default::default());
            }
            let map = target.as_object_mut().expect("made an object above");
            for (key, value) in fields {
                if value.is_null() {
                    map.remove(key);
                } else {
                    merge_patch(map.entry(key.clone()).or_insert(Value::Null), value);
                }
            }
        }
        other => *target = other.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn merge_patch_follows_rfc_7396() {
        let mut doc = json!({"a": 1, "b": {"c": 2, "d": 3}, "e": [1]});
        merge_patch(
            &mut doc,
            &json!({"a": null, "b": {"c": 5}, "e": {"x": 1}, "f": true}),
        );
        assert_eq!(
            doc,
            json!({"b": {"c": 5, "d": 3}, "e": {"x": 1}, "f": true})
        );
    }
}
