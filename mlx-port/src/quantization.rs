//! The quantization drift check: a fixture converted as `mlx-models convert --quantize`
//! converts it (MLX affine, groups of 64 — mlx-lm's default) must stay within its family's
//! drift bound, measured from the correct quantizer's noise; a broken quantizer (wrong
//! group size, dropped biases, scales in the wrong dtype) must not.

use crate::error::Result;
use crate::fixture::Fixture;
use mlx_models::config::ConfigFile;
use mlx_models::convert::{convert_weights, drift, ConvertOptions, DriftInputs, QuantFault};
use mlx_models::models::{build, LanguageModel};
use mlx_models::weights::Weights;
use serde::Serialize;
use std::fmt;

/// Group size of the check (mlx-lm's default).
pub const GROUP_SIZE: i32 = 64;

/// Per family (`model_type`), the largest relative error of the logits (‖Δ‖₂ / ‖source‖₂
/// over the fixture's prompt) a correct quantizer may cause at 8 and at 4 bits.
///
/// Measured 2026-12-01 over every fixture in tests/fixtures (tiny random-weight models,
/// groups of 64, `cargo xtask verify --quantization-only`); the comment on each entry is
/// the family's largest measured value (8-bit, 4-bit). Quantization is deterministic, so
/// this "noise" is the rounding error itself; each bound is that value × 1.25, rounded up
/// to two digits (another BLAS rounds the matmuls differently by ~1e-6, far less). Random
/// weights have no structure to lose: 4-bit errors of 0.2–0.75 here say nothing of real
/// models.
///
/// Seeded faults (`--fault`), smallest ratio of a faulted fixture's error to its family's
/// bound: wrong group size ×1.46 at 4 bits (qwen3_5_text/default) and ×6.3 at 8 bits
/// (phimoe/default); dropped biases ×1.5 at 4 bits and ×6.05 at 8 bits (phimoe/hub).
/// Scales in bfloat16 change the logits by less than 4-bit rounding (×0.14–3.7 of the
/// correct error, either side), so no error bound can see them without failing correct
/// conversions; the check sees them in the dtype of the converted model's intermediates
/// (dequantized embeddings come out in the scales' dtype).
pub const BOUNDS: &[(&str, f32, f32)] = &[
    ("afmoe", 0.12, 0.68),              // measured 0.0935, 0.542
    ("apertus", 0.027, 0.5),            // measured 0.0215, 0.398
    ("arcee", 0.032, 0.47),             // measured 0.025, 0.371
    ("bamba", 0.042, 0.67),             // measured 0.0331, 0.535
    ("biogpt", 0.017, 0.29),            // measured 0.0132, 0.226
    ("bitnet", 0.038, 0.63),            // measured 0.0303, 0.499
    ("bloom", 0.019, 0.3),              // measured 0.0147, 0.238
    ("codegen", 0.017, 0.28),           // measured 0.0136, 0.219
    ("cohere", 0.023, 0.38),            // measured 0.0184, 0.301
    ("cohere2", 0.028, 0.44),           // measured 0.0219, 0.349
    ("cohere2_moe", 0.027, 0.47),       // measured 0.0209, 0.368
    ("ctrl", 0.017, 0.28),              // measured 0.0133, 0.216
    ("cwm", 0.035, 0.65),               // measured 0.0275, 0.518
    ("deepseek_v2", 0.059, 0.95),       // measured 0.0469, 0.755
    ("deepseek_v3", 0.069, 0.7),        // measured 0.0551, 0.557
    ("diffllama", 0.041, 0.69),         // measured 0.0324, 0.544
    ("dots1", 0.19, 0.65),              // measured 0.153, 0.516
    ("ernie4_5", 0.041, 0.63),          // measured 0.0325, 0.504
    ("ernie4_5_moe", 0.087, 0.52),      // measured 0.0694, 0.409
    ("exaone4", 0.034, 0.59),           // measured 0.0266, 0.464
    ("exaone_moe", 0.13, 0.69),         // measured 0.102, 0.546
    ("falcon", 0.018, 0.3),             // measured 0.014, 0.236
    ("falcon_h1", 0.023, 0.42),         // measured 0.0184, 0.332
    ("falcon_mamba", 0.018, 0.3),       // measured 0.014, 0.24
    ("flex_olmo", 0.031, 0.63),         // measured 0.0242, 0.501
    ("gemma", 0.029, 0.43),             // measured 0.0228, 0.337
    ("gemma2", 0.025, 0.44),            // measured 0.0198, 0.347
    ("gemma3_text", 0.024, 0.38),       // measured 0.0188, 0.302
    ("glm", 0.036, 0.65),               // measured 0.0288, 0.519
    ("glm4", 0.034, 0.51),              // measured 0.0269, 0.403
    ("glm4_moe", 0.027, 0.84),          // measured 0.021, 0.671
    ("glm4_moe_lite", 0.025, 0.51),     // measured 0.0198, 0.403
    ("gpt2", 0.039, 0.42),              // measured 0.031, 0.331
    ("gpt_bigcode", 0.031, 0.43),       // measured 0.0242, 0.337
    ("gpt_neo", 0.043, 0.59),           // measured 0.0342, 0.465
    ("gpt_neox", 0.022, 0.34),          // measured 0.0171, 0.269
    ("gpt_neox_japanese", 0.024, 0.41), // measured 0.019, 0.323
    ("gpt_oss", 0.035, 0.61),           // measured 0.0277, 0.483
    ("gptj", 0.017, 0.29),              // measured 0.0135, 0.227
    ("granite", 0.064, 0.78),           // measured 0.0507, 0.622
    ("granite_swa", 0.12, 0.88),        // measured 0.09, 0.699
    ("granitemoe", 0.042, 0.53),        // measured 0.0332, 0.423
    ("granitemoe_swa", 0.19, 1.1),      // measured 0.15, 0.902
    ("granitemoehybrid", 0.041, 0.66),  // measured 0.0325, 0.521
    ("granitemoeshared", 0.067, 0.79),  // measured 0.0535, 0.626
    ("helium", 0.036, 0.6),             // measured 0.0286, 0.48
    ("hunyuan_v1_dense", 0.041, 0.65),  // measured 0.0327, 0.517
    ("hunyuan_v1_moe", 0.032, 0.51),    // measured 0.0256, 0.404
    ("hy_v3", 0.031, 0.5),              // measured 0.0248, 0.394
    ("hyperclovax", 0.039, 0.52),       // measured 0.0307, 0.411
    ("internlm3", 0.042, 0.59),         // measured 0.0334, 0.465
    ("iquestcoder", 0.042, 0.59),       // measured 0.0334, 0.465
    ("jais2", 0.028, 0.43),             // measured 0.0217, 0.341
    ("jamba", 0.059, 0.79),             // measured 0.0466, 0.631
    ("kolibri1", 0.039, 0.49),          // measured 0.0312, 0.386
    ("lfm2", 0.044, 0.59),              // measured 0.0352, 0.472
    ("lfm2_moe", 0.03, 0.51),           // measured 0.0234, 0.405
    ("llama", 0.045, 0.71),             // measured 0.036, 0.562
    ("llama4_text", 0.029, 0.46),       // measured 0.0228, 0.366
    ("longcat_flash", 0.032, 0.63),     // measured 0.0251, 0.5
    ("mamba", 0.018, 0.29),             // measured 0.0142, 0.23
    ("mamba2", 0.024, 0.39),            // measured 0.0188, 0.311
    ("mellum", 0.022, 0.42),            // measured 0.0173, 0.33
    ("minicpm3", 0.016, 0.26),          // measured 0.0125, 0.206
    ("minimax_m2", 0.043, 0.43),        // measured 0.034, 0.338
    ("ministral", 0.042, 0.57),         // measured 0.0334, 0.453
    ("ministral3", 0.038, 0.62),        // measured 0.0298, 0.493
    ("mistral", 0.028, 0.5),            // measured 0.0224, 0.395
    ("mixtral", 0.025, 0.43),           // measured 0.0199, 0.338
    ("modernbert-decoder", 0.035, 0.5), // measured 0.0274, 0.395
    ("mpt", 0.031, 0.42),               // measured 0.0247, 0.329
    ("nanochat", 0.024, 0.42),          // measured 0.0192, 0.333
    ("nemotron", 0.03, 0.51),           // measured 0.024, 0.402
    ("nemotron_h", 0.02, 0.38),         // measured 0.0154, 0.298
    ("olmo", 0.031, 0.52),              // measured 0.0243, 0.414
    ("olmo2", 0.033, 0.49),             // measured 0.026, 0.39
    ("olmo3", 0.031, 0.53),             // measured 0.0244, 0.419
    ("olmoe", 0.024, 0.4),              // measured 0.0188, 0.313
    ("openai-gpt", 0.019, 0.33),        // measured 0.0144, 0.263
    ("opt", 0.024, 0.39),               // measured 0.0186, 0.31
    ("persimmon", 0.026, 0.42),         // measured 0.0204, 0.333
    ("phi", 0.019, 0.31),               // measured 0.0152, 0.246
    ("phi3", 0.044, 0.7),               // measured 0.0349, 0.554
    ("phimoe", 0.2, 0.59),              // measured 0.154, 0.467
    ("qwen2", 0.046, 0.66),             // measured 0.0362, 0.521
    ("qwen2_moe", 0.032, 0.43),         // measured 0.025, 0.338
    ("qwen3", 0.035, 0.56),             // measured 0.0273, 0.444
    ("qwen3_5_moe_text", 0.043, 0.87),  // measured 0.0342, 0.695
    ("qwen3_5_text", 0.17, 0.95),       // measured 0.133, 0.753
    ("qwen3_moe", 0.026, 0.4),          // measured 0.0206, 0.317
    ("qwen3_next", 0.048, 0.86),        // measured 0.0384, 0.687
    ("recurrent_gemma", 0.015, 0.24),   // measured 0.012, 0.191
    ("seed_oss", 0.035, 0.56),          // measured 0.0275, 0.442
    ("smollm3", 0.047, 0.67),           // measured 0.0374, 0.529
    ("solar_open", 0.15, 0.92),         // measured 0.115, 0.733
    ("stablelm", 0.043, 0.61),          // measured 0.034, 0.482
    ("starcoder2", 0.026, 0.41),        // measured 0.0201, 0.328
    ("vaultgemma", 0.029, 0.36),        // measured 0.0226, 0.286
    ("xglm", 0.016, 0.27),              // measured 0.0126, 0.212
    ("youtu", 0.028, 0.54),             // measured 0.0223, 0.425
];

/// The bit widths the check runs.
pub const BITS: [i32; 2] = [8, 4];

/// The bound of `model_type` at `bits`.
pub fn bound(model_type: &str, bits: i32) -> Option<f32> {
    let (_, b8, b4) = BOUNDS.iter().find(|(name, _, _)| *name == model_type)?;
    match bits {
        8 => Some(*b8),
        4 => Some(*b4),
        _ => None,
    }
}

/// One fixture's quantization drift at one bit width.
#[derive(Debug, Clone, Serialize)]
pub struct QuantizationDrift {
    pub fixture: String,
    pub bits: i32,
    pub group_size: i32,
    pub quantized_modules: usize,
    /// ‖Δlogits‖₂ / ‖logits‖₂ over the prompt (what the bound applies to).
    pub logits_rel_error: f32,
    /// The largest relative error of any tapped intermediate.
    pub max_layer_rel_error: f32,
    pub max_abs_logit_diff: f32,
    pub kl: f64,
    pub same_top1: bool,
    pub source_perplexity: Option<f64>,
    pub converted_perplexity: Option<f64>,
    /// Intermediates computed in another dtype than the source's (`name: from → to`): a
    /// conversion without a cast must have none.
    pub dtype_changes: Vec<String>,
    /// The family's bound (`None`: the family has none, which fails).
    pub bound: Option<f32>,
}

impl QuantizationDrift {
    /// Within the family's bound, and computing in the source's dtype.
    pub fn passed(&self) -> bool {
        self.bound.is_some_and(|b| self.logits_rel_error <= b) && self.dtype_changes.is_empty()
    }
}

impl fmt::Display for QuantizationDrift {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ppl = |p: Option<f64>| p.map_or("-".to_owned(), |p| format!("{p:.3}"));
        write!(
            f,
            "{:<32} {}-bit g{}: {:>3} quantized, logits rel {:.2e} (bound {}) {}, layers \
             rel ≤ {:.2e}, max |Δlogit| {:.2e}, KL {:.1e}, top-1 {}, perplexity {} → {}{}",
            self.fixture,
            self.bits,
            self.group_size,
            self.quantized_modules,
            self.logits_rel_error,
            self.bound.map_or("none".to_owned(), |b| format!("{b:.2e}")),
            if self.passed() { "ok" } else { "FAIL" },
            self.max_layer_rel_error,
            self.max_abs_logit_diff,
            self.kl,
            if self.same_top1 { "same" } else { "DIFF" },
            ppl(self.source_perplexity),
            ppl(self.converted_perplexity),
            if self.dtype_changes.is_empty() {
                String::new()
            } else {
                format!(", dtype changed: {}", self.dtype_changes.join(", "))
            },
        )
    }
}

/// Converts `fixture`'s model to `bits` (seeding `fault` if given), builds both models
/// and measures the drift on the fixture's prompt.
pub fn quantization_drift(
    fixture: &Fixture,
    bits: i32,
    fault: Option<QuantFault>,
) -> Result<QuantizationDrift> {
    let config = ConfigFile::read(&fixture.dir.join("config.json"))?;
    let source = build(&config, Weights::from_dir(&fixture.dir)?)?;
    let mut options = ConvertOptions::new().quantize(bits, GROUP_SIZE);
    if let Some(fault) = fault {
        options = options.inject_fault(fault);
    }
    let converted = convert_weights(&config, Weights::from_dir(&fixture.dir)?, None, &options)?;
    let quantized_modules = converted.quantized.len();
    let converted_config = ConfigFile {
        path: config.path.clone(),
        value: converted.config,
    };
    let model = build(
        &converted_config,
        Weights::new(converted.tensors, fixture.dir.clone()),
    )?;
    let ids: Vec<u32> = fixture
        .manifest
        .input_ids
        .iter()
        .map(|&i| i as u32)
        .collect();
    let inputs = DriftInputs {
        prompts: vec![("prompt".into(), ids.clone())],
        greedy_steps: 0,
        perplexity_ids: ids,
    };
    let report = drift(
        source.as_ref(),
        model.as_ref() as &dyn LanguageModel,
        &inputs,
        |_, _| {},
    )?;
    let logits = report.layers.iter().find(|l| l.name == "logits");
    Ok(QuantizationDrift {
        fixture: fixture.name(),
        bits,
        group_size: GROUP_SIZE,
        quantized_modules,
        logits_rel_error: logits.map_or(f32::INFINITY, |l| l.rel_error),
        max_layer_rel_error: report.max_layer_rel_error(),
        max_abs_logit_diff: report.max_abs_logit_diff,
        kl: report.max_kl,
        same_top1: report.top1_equal == report.prompts.len(),
        source_perplexity: report.source_perplexity,
        converted_perplexity: report.converted_perplexity,
        dtype_changes: report.dtype_changes,
        bound: bound(&fixture.manifest.model_type, bits),
    })
}
