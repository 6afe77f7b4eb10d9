//! The verification suite: every committed Transformers fixture passes `mlx_port::verify`;
//! models broken on purpose (through a config patch) fail and the report names the first bad
//! layer; and property tests of the KV cache, of RoPE and of config parsing.
//!
//! ```text
//! cargo test --test fixtures
//! ```

use mlx_models::cache::LayerCache;
use mlx_models::config::ConfigFile;
use mlx_models::family::DecoderFamily;
use mlx_models::models::{llama, LanguageModel};
use mlx_models::rope::{Rope, RopeConfig, RopeScaling};
use mlx_models::tap::Tap;
use mlx_port::checks::{merge_patch, verify, VerifyOptions};
use mlx_port::compare::{diff, to_f32_vec};
use mlx_port::fixture::{discover, Fixture};
use mlx_port::{PortError, Report};
use mlx_rs::Array;
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::test_runner::{Config as ProptestConfig, TestCaseError, TestRunner};
use serde_json::{json, Map, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// The fixtures the exporter's specs name (`xtask/fixtures/<model_type>.json`, one for each
/// registered family): `model_type` to its variants. Derived, so that a family or variant added
/// with its spec is expected here without editing this suite, and an emptied or moved fixture
/// directory cannot make the suite pass by finding nothing.
fn specified_fixtures() -> BTreeMap<String, BTreeSet<String>> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("xtask")
        .join("fixtures");
    let mut specs = BTreeMap::new();
    for entry in std::fs::read_dir(&dir).expect("xtask/fixtures is readable") {
        let path = entry.expect("xtask/fixtures is readable").path();
        if path.extension().and_then(|e| e.to_str()) != Some("json") {
            continue;
        }
        let spec: Value = serde_json::from_slice(&std::fs::read(&path).unwrap())
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let name = |v: &Value| {
            v.as_str()
                .unwrap_or_else(|| panic!("{}: a name is not a string", path.display()))
                .to_owned()
        };
        let variants = spec["variants"]
            .as_array()
            .unwrap_or_else(|| panic!("{}: no `variants` list", path.display()))
            .iter()
            .map(|v| name(&v["name"]))
            .collect();
        specs.insert(name(&spec["model_type"]), variants);
    }
    specs
}

fn fixtures_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join("fixtures")
}

fn fixture_dir(name: &str) -> PathBuf {
    fixtures_root().join(name)
}

fn load_fixture(name: &str) -> Fixture {
    let dir = fixture_dir(name);
    Fixture::load(&dir).unwrap_or_else(|e| panic!("cannot load fixture {}: {e}", dir.display()))
}

/// Verifies fixture `name` with `patch` merged into its config.json.
fn verify_patched(name: &str, patch: Value) -> Result<Report, PortError> {
    let fixture = load_fixture(name);
    verify(
        &fixture,
        &VerifyOptions {
            config_patch: Some(patch),
        },
    )
}

/// Like [`verify_patched`], for patches that must still load.
fn report_for(name: &str, patch: Value) -> Report {
    verify_patched(name, patch.clone())
        .unwrap_or_else(|e| panic!("{name} with patch {patch}: verification could not run: {e}"))
}

fn row_passes(report: &Report, name: &str) -> bool {
    report
        .rows
        .iter()
        .find(|r| r.name == name)
        .unwrap_or_else(|| panic!("report has no row `{name}`:\n{}", report.to_markdown()))
        .pass
}

fn check_passes(report: &Report, name: &str) -> bool {
    report
        .checks
        .iter()
        .find(|c| c.name == name)
        .unwrap_or_else(|| panic!("report has no check `{name}`:\n{}", report.to_markdown()))
        .pass
}

/// Loads a fixture's model (float32) with an optional config patch, the way the harness does.
fn load_model(name: &str, patch: Option<&Value>) -> Box<dyn LanguageModel> {
    let dir = fixture_dir(name);
    let mut config = ConfigFile::read(&dir.join("config.json")).expect("fixture config.json");
    if let Some(patch) = patch {
        merge_patch(&mut config.value, patch);
    }
    mlx_models::load::load_model_with_config(&config, &dir, None)
        .unwrap_or_else(|e| panic!("cannot load {name}: {e}"))
}

/// A runner for `cases` cases from a fixed seed, or as many random ones as `PROPTEST_CASES`
/// asks for (soak runs). The fixed seed keeps the suite reproducible: a random prompt can
/// put two experts within float noise of each other in a tiny MoE (LongCat's layer 1 router
/// at a margin of 7.3e-7 on one such prompt), where a cached step may route otherwise than
/// the whole prompt's pass. Soak runs can meet such ties; the minimal input names them.
fn runner(cases: u32) -> TestRunner {
    let soak = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok());
    let config = ProptestConfig {
        cases: soak.unwrap_or(cases),
        // The runner is driven by hand (to share a loaded model between cases), so there is
        // no source file to keep regressions next to.
        failure_persistence: None,
        ..ProptestConfig::default()
    };
    match soak {
        Some(_) => TestRunner::new(config),
        None => TestRunner::new_with_rng(
            config,
            proptest::test_runner::TestRng::deterministic_rng(
                proptest::test_runner::RngAlgorithm::ChaCha,
            ),
        ),
    }
}

/// Runs a property, panicking with proptest's minimal failing input.
fn check_property<S: Strategy>(
    what: &str,
    cases: u32,
    strategy: S,
    test: impl Fn(S::Value) -> Result<(), TestCaseError>,
) where
    S::Value: std::fmt::Debug,
{
    if let Err(e) = runner(cases).run(&strategy, test) {
        panic!("{what}: {e}");
    }
}

// ---------------------------------------------------------------------------------------------
// 1. Every committed fixture passes
// ---------------------------------------------------------------------------------------------

#[test]
fn every_committed_fixture_passes() {
    let root = fixtures_root();
    let dirs = discover(&root);
    let found: Vec<String> = dirs
        .iter()
        .map(|d| {
            let rel = d.strip_prefix(&root).expect("discovered under the root");
            rel.components()
                .map(|c| c.as_os_str().to_string_lossy())
                .collect::<Vec<_>>()
                .join("/")
        })
        .collect();
    // Every registered family (its aliases aside) has a spec, and every spec is of one.
    let specs = specified_fixtures();
    let registered: BTreeSet<&str> = mlx_models::models::supported_model_types()
        .into_iter()
        .filter(|model_type| !ALIASES.iter().any(|(alias, _)| alias == model_type))
        .collect();
    let specified: BTreeSet<&str> = specs.keys().map(String::as_str).collect();
    assert_eq!(
        specified, registered,
        "model types with a spec in xtask/fixtures/ vs the registry"
    );
    // Every specified fixture is discovered, and nothing else is.
    let expected: BTreeSet<String> = specs
        .iter()
        .flat_map(|(model_type, variants)| {
            variants.iter().map(move |v| format!("{model_type}/{v}"))
        })
        .collect();
    let discovered: BTreeSet<String> = found.iter().cloned().collect();
    let missing: Vec<_> = expected.difference(&discovered).collect();
    let unspecified: Vec<_> = discovered.difference(&expected).collect();
    assert!(
        missing.is_empty() && unspecified.is_empty(),
        "under {}: specified in xtask/fixtures/*.json but not discovered: {missing:?}; \
         discovered but not specified: {unspecified:?}",
        root.display()
    );
    // A directory of a family's fixtures without fixture.json would be skipped silently.
    for model_type in specs.keys() {
        let family_dir = root.join(model_type);
        for entry in std::fs::read_dir(&family_dir).expect("the family's fixture directory") {
            let path = entry.unwrap().path();
            assert!(
                !path.is_dir() || dirs.contains(&path),
                "{} is not a fixture (no fixture.json), so nothing verifies it",
                path.display()
            );
        }
    }

    let mut failures = Vec::new();
    for (dir, name) in dirs.iter().zip(&found) {
        let fixture = match Fixture::load(dir) {
            Ok(f) => f,
            Err(e) => {
                failures.push(format!("### {name}: cannot load the fixture: {e}\n"));
                continue;
            }
        };
        assert_eq!(
            &fixture.name(),
            name,
            "fixture.json model_type/variant must match its directory"
        );
        let report = match verify(&fixture, &VerifyOptions::default()) {
            Ok(r) => r,
            Err(e) => {
                failures.push(format!("### {name}: verification could not run: {e}\n"));
                continue;
            }
        };
        // The report must cover the whole model and every check the fixture allows, so a
        // harness that silently skipped work could not pass here.
        let mut expected_rows = vec!["embeddings".to_owned()];
        expected_rows.extend((0..fixture.num_layers()).map(|i| format!("layers.{i}")));
        expected_rows.extend(["norm".to_owned(), "logits".to_owned()]);
        let rows: Vec<&str> = report.rows.iter().map(|r| r.name.as_str()).collect();
        assert!(fixture.num_layers() >= 1, "{name}: no layers captured");
        assert_eq!(rows, expected_rows, "{name}: compared tensors");
        let checks: Vec<&str> = report.checks.iter().map(|c| c.name.as_str()).collect();
        let mut expected_checks = vec!["logits top-5", "greedy tokens"];
        if fixture.expected.contains_key("rope.cos") {
            expected_checks.push("rope");
        }
        // Families with a second RoPE for their sliding-window layers (Gemma 3).
        if fixture.expected.contains_key("rope_local.cos") {
            expected_checks.push("rope_local");
        }
        expected_checks.push("cache consistency");
        if !fixture.manifest.bf16_dtypes.is_empty() {
            expected_checks.push("bf16 dtypes");
        }
        assert_eq!(checks, expected_checks, "{name}: checks run");

        eprintln!("{name}: {}", if report.passed() { "PASS" } else { "FAIL" });
        if !report.passed() {
            failures.push(report.to_markdown());
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} fixtures failed:\n\n{}",
        failures.len(),
        dirs.len(),
        failures.join("\n")
    );
}

// ---------------------------------------------------------------------------------------------
// 2. A deliberately wrong model fails loudly, naming the first bad layer
// ---------------------------------------------------------------------------------------------

/// Asserts that the layers and final norm of `report` are wrong from the first decoder layer
/// on (the embeddings, which RoPE does not touch, still pass) and that greedy decoding diverges.
fn assert_wrong_from_first_layer(report: &Report) {
    let md = report.to_markdown();
    assert!(!report.passed(), "the broken model passed:\n{md}");
    assert_eq!(
        report.first_bad(),
        Some("layers.0"),
        "first bad tensor:\n{md}"
    );
    assert!(
        row_passes(report, "embeddings"),
        "embeddings must be unaffected:\n{md}"
    );
    for row in report.rows.iter().skip(1) {
        assert!(
            !row.pass,
            "`{}` passed although everything after layers.0 depends on it:\n{md}",
            row.name
        );
    }
    assert!(
        !check_passes(report, "greedy tokens"),
        "greedy decoding did not diverge:\n{md}"
    );
}

#[test]
fn traditional_rope_fails_at_the_first_layer() {
    // Control: the patch machinery itself (restating the default) leaves the model correct.
    let control = report_for("llama/default-tied", json!({"rope_traditional": false}));
    assert!(
        control.passed(),
        "control failed:\n{}",
        control.to_markdown()
    );

    let report = report_for("llama/default-tied", json!({"rope_traditional": true}));
    assert_wrong_from_first_layer(&report);
    // The `rope` check reads cos/sin back from the model's own rotation in Transformers'
    // halves layout, so the pairwise layout shows up there too.
    assert!(
        !check_passes(&report, "rope"),
        "the rope check missed the pairwise layout:\n{}",
        report.to_markdown()
    );
    // The cache check compares the model with itself and stays consistent.
    assert!(
        check_passes(&report, "cache consistency"),
        "{}",
        report.to_markdown()
    );
}

#[test]
fn dropping_rope_theta_transformers5_style_fails_at_the_first_layer() {
    // llama/mha sets rope_theta = 1e6 inside `rope_parameters`; without it the default 1e4
    // applies.
    let fixture = load_fixture("llama/mha");
    let config: Value =
        serde_json::from_str(&std::fs::read_to_string(fixture.dir.join("config.json")).unwrap())
            .unwrap();
    assert_eq!(config["rope_parameters"]["rope_theta"], json!(1_000_000.0));
    assert!(config.get("rope_theta").is_none());

    // Control: dropping a top-level rope_theta, which this style does not have, changes nothing.
    let control = report_for("llama/mha", json!({"rope_theta": null}));
    assert!(
        control.passed(),
        "control failed:\n{}",
        control.to_markdown()
    );

    let report = report_for(
        "llama/mha",
        json!({"rope_parameters": {"rope_theta": null}}),
    );
    assert_wrong_from_first_layer(&report);
    assert!(
        !check_passes(&report, "rope"),
        "the rope check missed a wrong theta:\n{}",
        report.to_markdown()
    );
}

#[test]
fn dropping_rope_theta_hub_style_fails_at_the_first_layer() {
    // llama/llama3-untied has a top-level rope_theta = 5e5 next to `rope_scaling`.
    let fixture = load_fixture("llama/llama3-untied");
    let config: Value =
        serde_json::from_str(&std::fs::read_to_string(fixture.dir.join("config.json")).unwrap())
            .unwrap();
    assert_eq!(config["rope_theta"], json!(500_000.0));
    assert!(config.get("rope_parameters").is_none());

    let report = report_for("llama/llama3-untied", json!({"rope_theta": null}));
    assert_wrong_from_first_layer(&report);
    assert!(
        !check_passes(&report, "rope"),
        "the rope check missed a wrong theta:\n{}",
        report.to_markdown()
    );
}

#[test]
fn tying_untied_embeddings_fails_at_the_logits() {
    let report = report_for("llama/llama3-untied", json!({"tie_word_embeddings": true}));
    let md = report.to_markdown();
    assert!(!report.passed(), "the mis-tied model passed:\n{md}");
    assert_eq!(
        report.first_bad(),
        Some("logits"),
        "first bad tensor:\n{md}"
    );
    // Everything up to the output layer is untouched by the fault.
    let n = report.rows.len();
    assert!(n >= 4, "{md}");
    for row in &report.rows[..n - 1] {
        assert!(
            row.pass,
            "`{}` failed although the fault is in the output layer:\n{md}",
            row.name
        );
    }
    assert!(!check_passes(&report, "logits top-5"), "{md}");
    assert!(!check_passes(&report, "greedy tokens"), "{md}");
    assert!(check_passes(&report, "rope"), "{md}");
}

#[test]
fn untying_tied_embeddings_is_a_missing_weight() {
    // Control: restating the fixture's own tying loads and passes.
    let control = report_for("llama/default-tied", json!({"tie_word_embeddings": true}));
    assert!(
        control.passed(),
        "control failed:\n{}",
        control.to_markdown()
    );

    match verify_patched("llama/default-tied", json!({"tie_word_embeddings": false})) {
        Err(PortError::Model(mlx_models::Error::MissingWeight { name, path })) => {
            assert_eq!(name, "lm_head.weight");
            assert_eq!(path, fixture_dir("llama/default-tied"));
        }
        Err(other) => panic!("expected MissingWeight(lm_head.weight), got {other:?}"),
        Ok(report) => panic!(
            "an untied model without lm_head loaded:\n{}",
            report.to_markdown()
        ),
    }
}

// ---------------------------------------------------------------------------------------------
// 3a. Property: the KV cache gives the logits of the full forward pass
// ---------------------------------------------------------------------------------------------

/// float32 logits may differ between the cached and full pass only by reassociation.
const CACHE_TOL: f32 = 1e-4;

fn forward(
    model: &dyn LanguageModel,
    ids: &[i32],
    cache: &mut [mlx_models::cache::LayerCache],
) -> Array {
    let tokens = Array::from_slice(ids, &[1, ids.len() as i32]);
    model
        .forward(&tokens, cache, &mut Tap::off())
        .expect("forward pass")
}

fn logits_of(pieces: &[Array]) -> Vec<f32> {
    to_f32_vec(&mlx_rs::ops::concatenate(pieces, 1).expect("concatenate")).expect("logits to host")
}

#[derive(Debug, Clone)]
struct CacheCase {
    ids: Vec<i32>,
    /// Tokens prefilled before stepping (1 ..= len - 1).
    split: usize,
    /// Chunk sizes the remainder is fed in (cycled).
    chunks: Vec<usize>,
}

fn cache_case(
    vocab: i32,
    lengths: std::ops::RangeInclusive<usize>,
) -> impl Strategy<Value = CacheCase> {
    lengths.prop_flat_map(move |len| {
        (vec(0..vocab, len), 1..len, vec(1usize..=6, 1..8))
            .prop_map(|(ids, split, chunks)| CacheCase { ids, split, chunks })
    })
}

/// Prefill `[..split]`, then the rest one token at a time, then in random-sized chunks, then
/// after truncating a full cache back to `split`: every way must give the full pass's logits.
fn assert_cache_consistent(name: &str, patch: Option<Value>) {
    assert_cache_consistent_over(name, patch, 2..=24, 16);
}

/// [`assert_cache_consistent`] over prompts of `lengths` tokens, `cases` of them.
fn assert_cache_consistent_over(
    name: &str,
    patch: Option<Value>,
    lengths: std::ops::RangeInclusive<usize>,
    cases: u32,
) {
    let model = load_model(name, patch.as_ref());
    let vocab = model.info().vocab_size;
    check_property(
        &format!("cache consistency of {name} {patch:?}"),
        cases,
        cache_case(vocab, lengths),
        |case| {
            let model = model.as_ref();
            let CacheCase { ids, split, chunks } = case;
            let full = logits_of(&[forward(model, &ids, &mut model.new_cache())]);

            let mut cache = model.new_cache();
            let mut pieces = vec![forward(model, &ids[..split], &mut cache)];
            for id in &ids[split..] {
                pieces.push(forward(model, &[*id], &mut cache));
            }
            prop_assert_eq!(cache[0].offset() as usize, ids.len());
            let d = diff(&logits_of(&pieces), &full).max_abs;
            prop_assert!(
                d <= CACHE_TOL,
                "one token at a time after {split}: max |Δ| = {d:e}"
            );

            let mut cache = model.new_cache();
            let mut pieces = vec![forward(model, &ids[..split], &mut cache)];
            let mut start = split;
            for size in chunks.iter().cycle() {
                if start >= ids.len() {
                    break;
                }
                let end = (start + size).min(ids.len());
                pieces.push(forward(model, &ids[start..end], &mut cache));
                start = end;
            }
            let d = diff(&logits_of(&pieces), &full).max_abs;
            prop_assert!(
                d <= CACHE_TOL,
                "chunks {chunks:?} after {split}: max |Δ| = {d:e}"
            );

            // A cache that saw the whole prompt, cut back to `split`, continues like a fresh one.
            // Only a rotating (sliding-window), chunked or recurrent cache may refuse, having
            // dropped tokens (or folded them into a state) the prefix needs; then, as in
            // ChatSession, every layer starts again from empty.
            let mut cache = model.new_cache();
            let first = forward(model, &ids, &mut cache);
            let mut kept = true;
            for c in cache.iter_mut() {
                kept &= c.truncate(split as i32).expect("truncate");
            }
            if kept {
                let prefix = first
                    .split_at_indices(&[split as i32], 1)
                    .expect("split")
                    .swap_remove(0);
                let rest = forward(model, &ids[split..], &mut cache);
                let d = diff(&logits_of(&[prefix, rest]), &full).max_abs;
                prop_assert!(
                    d <= CACHE_TOL,
                    "truncate to {split} and continue: max |Δ| = {d:e}"
                );
            } else {
                prop_assert!(
                    cache.iter_mut().any(|c| match c {
                        LayerCache::Kv(kv) => kv.window().is_some() || kv.chunk().is_some(),
                        LayerCache::Recurrent(_) => true,
                        _ => false,
                    }),
                    "an unbounded cache could not keep the first {split} tokens"
                );
                for c in cache.iter_mut() {
                    prop_assert!(c.truncate(0).expect("truncate"));
                }
                let again = forward(model, &ids, &mut cache);
                let d = diff(&logits_of(&[again]), &full).max_abs;
                prop_assert!(
                    d <= CACHE_TOL,
                    "truncate to {split} refused, then from scratch: max |Δ| = {d:e}"
                );
            }
            Ok(())
        },
    );
}

#[test]
fn cache_consistency_llama_default_tied() {
    assert_cache_consistent("llama/default-tied", None);
}

#[test]
fn cache_consistency_mistral_default() {
    assert_cache_consistent("mistral/default", None);
}

#[test]
fn cache_consistency_mistral_sliding_window() {
    // A window shorter than most prompts, so the cached steps need the window mask.
    assert_cache_consistent("mistral/default", Some(json!({"sliding_window": 5})));
}

#[test]
fn cache_consistency_mixture_of_experts() {
    // Routing depends on each token alone, so chunked prefills must route like one pass;
    // Mixtral's sliding window and Qwen2-MoE's dense and shared-expert layers on top.
    assert_cache_consistent("mixtral/sliding-fused", None);
    assert_cache_consistent("qwen2_moe/dense-layers", None);
}

#[test]
fn cache_consistency_chunked_attention_and_nope_layers() {
    // Llama 4: chunks of 5 tokens on the RoPE layers, a temperature-tuned NoPE layer.
    assert_cache_consistent("llama4_text/chunked-nope", None);
}

#[test]
fn cache_consistency_latent_attention() {
    // The latent cache: prefill expands the cached latents, single tokens attend over them
    // with kv_b_proj absorbed; YaRN's mscale in the softmax scale (hub), no query LoRA
    // (lite), and LongCat's two sublayers per layer with LoRA-scaled latents.
    assert_cache_consistent("deepseek_v3/hub", None);
    assert_cache_consistent("deepseek_v2/lite", None);
    assert_cache_consistent("longcat_flash/default", None);
}

#[test]
fn cache_consistency_recurrent_layers() {
    // Fixed-size states: chunked prefill (SSD chunks, the chunked delta rule) then steps,
    // in any split, equal one pass; a recurrent state refuses to be cut back.
    assert_cache_consistent("mamba2/hub", None);
    assert_cache_consistent("lfm2/default", None);
    assert_cache_consistent("qwen3_next/default", None);
    assert_cache_consistent("granitemoehybrid/default", None);
    // Two mixers side by side per layer, two caches each (chunks of 4 and 8).
    assert_cache_consistent("falcon_h1/default", None);
    assert_cache_consistent("falcon_h1/hub", None);
    // Blocks of one mixer each. Transformers' Nemotron-H clamps dt below at time_step_min
    // in the chunked scan only, and so do we (the verify check reproduces its own gap,
    // 1.03e-3 on the hub fixture); without a clamp every split agrees.
    assert_cache_consistent("nemotron_h/hub", Some(json!({"time_step_min": 0.0})));
}

#[test]
fn cache_consistency_delta_rule_prompts_longer_than_a_chunk() {
    // The gated DeltaNet's chunks are 64 tokens (Transformers' fixed size): prompts of one
    // to three chunks, split anywhere.
    assert_cache_consistent_over("qwen3_next/default", None, 65..=150, 6);
}

#[test]
fn cache_consistency_llama_yarn() {
    // YaRN scales the rotated features by its attention factor.
    assert_cache_consistent("llama/yarn", None);
}

/// Registered model types whose fixtures are another type's: each is checked against that
/// type's fixture by a test of its own below.
const ALIASES: [(&str, &str); 6] = [
    ("gemma3", "gemma3_text"),
    ("gpt-sw3", "gpt2"),
    ("kimi_k2", "deepseek_v3"),
    ("llama4", "llama4_text"),
    // The qwen3_5_text/hub fixture is a `qwen3_5` checkpoint.
    ("qwen3_5", "qwen3_5_text"),
    // The qwen3_5_moe_text/hub fixture is a `qwen3_5_moe` checkpoint.
    ("qwen3_5_moe", "qwen3_5_moe_text"),
];

/// `fixture`'s checkpoint, its config saying `model_type`, gives the fixture's logits.
fn assert_loads_as(model_type: &str, fixture_name: &str) {
    let fixture = load_fixture(fixture_name);
    let model = load_model(fixture_name, Some(&json!({ "model_type": model_type })));
    let logits = forward(
        model.as_ref(),
        &fixture.manifest.input_ids,
        &mut model.new_cache(),
    );
    let d = diff(
        &to_f32_vec(&logits).unwrap(),
        &to_f32_vec(fixture.tensor("logits").unwrap()).unwrap(),
    );
    assert!(
        d.max_abs <= fixture.manifest.tolerances.max_abs,
        "{model_type}: max |Δlogits| = {}",
        d.max_abs
    );
}

/// Kimi K2's `model_type` loads as DeepSeek-V3 and gives the same logits.
#[test]
fn kimi_k2_loads_as_deepseek_v3() {
    assert_loads_as("kimi_k2", "deepseek_v3/hub");
}

/// GPT-SW3's `model_type` loads as GPT-2 (Transformers' `GPT2Config`) and gives the same
/// logits, Hub-style config and Transformers-5 style alike.
#[test]
fn gpt_sw3_loads_as_gpt2() {
    for fixture in ["gpt2/default", "gpt2/options", "gpt2/hub"] {
        assert_loads_as("gpt-sw3", fixture);
    }
}

/// Writes fixture `name`'s text model as a multimodal checkpoint — its config under
/// `text_config` of a `model_type` config, every tensor renamed by `rename`, a zero tensor
/// for each of `towers` beside them — and checks that it loads as `text_type` with the
/// fixture's logits.
fn assert_multimodal_loads(
    name: &str,
    (model_type, architecture): (&str, &str),
    rename: impl Fn(&str) -> String,
    towers: &[&str],
    text_type: &str,
) {
    let fixture = load_fixture(name);
    let text: Value =
        serde_json::from_str(&std::fs::read_to_string(fixture.dir.join("config.json")).unwrap())
            .unwrap();
    let config = json!({
        "model_type": model_type,
        "architectures": [architecture],
        "text_config": text,
        "vision_config": {"hidden_size": 4},
    });
    let mut tensors: Vec<(String, Array)> =
        Array::load_safetensors(fixture.dir.join("model.safetensors"))
            .unwrap()
            .into_iter()
            .map(|(n, t)| (rename(&n), t))
            .collect();
    for tower in towers {
        tensors.push((tower.to_string(), Array::from_slice(&[0.0f32; 16], &[4, 4])));
    }
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(tmp.path().join("config.json"), config.to_string()).unwrap();
    Array::save_safetensors(
        tensors.iter().map(|(k, v)| (k.as_str(), v)),
        None,
        tmp.path().join("model.safetensors"),
    )
    .unwrap();
    let model = mlx_models::load::load_model_dir(tmp.path(), None)
        .unwrap_or_else(|e| panic!("{model_type} ({name}) does not load: {e}"));
    assert_eq!(model.info().model_type, text_type);
    let logits = forward(
        model.as_ref(),
        &fixture.manifest.input_ids,
        &mut model.new_cache(),
    );
    let d = diff(
        &to_f32_vec(&logits).unwrap(),
        &to_f32_vec(fixture.tensor("logits").unwrap()).unwrap(),
    );
    assert!(
        d.max_abs <= fixture.manifest.tolerances.max_abs,
        "{model_type} ({name}, {}): max |Δlogits| = {}",
        rename("model.embed_tokens.weight"),
        d.max_abs
    );
}

/// Multimodal `llama4` checkpoints (settings in `text_config`, weights under
/// `language_model.`, a vision tower beside them) load as their language model and give
/// Transformers' logits.
#[test]
fn llama4_multimodal_checkpoints_load_their_language_model() {
    assert_multimodal_loads(
        "llama4_text/hub",
        ("llama4", "Llama4ForConditionalGeneration"),
        |n| format!("language_model.{n}"),
        &[
            "vision_model.patch_embedding.weight",
            "multi_modal_projector.linear_1.weight",
        ],
        "llama4_text",
    );
}

/// Multimodal `gemma3` checkpoints (settings in `text_config`, the language model's weights
/// under `language_model.model.` as Transformers 4 saved them or `model.language_model.` as
/// Transformers 5 does, a vision tower and projector beside them) load as Gemma 3 Text and
/// give Transformers' logits.
#[test]
fn gemma3_multimodal_checkpoints_load_their_language_model() {
    // (the language model's prefix, the output layer's, the other towers')
    let layouts = [
        (
            "language_model.model.",
            "language_model.lm_head.",
            ["vision_tower.weight", "multi_modal_projector.weight"],
        ),
        (
            "model.language_model.",
            "lm_head.",
            [
                "model.vision_tower.weight",
                "model.multi_modal_projector.weight",
            ],
        ),
    ];
    // Tied (a Hub-style text config) and untied (Transformers 5 style).
    for name in ["gemma3_text/hub", "gemma3_text/untied"] {
        for (language, head, towers) in &layouts {
            assert_multimodal_loads(
                name,
                ("gemma3", "Gemma3ForConditionalGeneration"),
                |n| {
                    n.replacen("model.", language, 1)
                        .replacen("lm_head.", head, 1)
                },
                towers,
                "gemma3_text",
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// 3a. A wrongly routed mixture of experts fails at its first sparse layer
// ---------------------------------------------------------------------------------------------

/// Asserts that `patch` breaks fixture `name` first at `layer` (the embeddings and the
/// layers before it still pass) and that greedy decoding diverges.
fn assert_fails_from(name: &str, patch: Value, layer: &str) {
    let report = report_for(name, patch.clone());
    let md = report.to_markdown();
    assert!(
        !report.passed(),
        "{name} with {patch} passed:
{md}"
    );
    assert_eq!(
        report.first_bad(),
        Some(layer),
        "{name} with {patch}:
{md}"
    );
    assert!(
        !check_passes(&report, "greedy tokens"),
        "{name} with {patch}: greedy decoding did not diverge:
{md}"
    );
}

#[test]
fn routing_faults_fail_at_the_first_sparse_layer() {
    // Control: restating a value leaves the model correct.
    let control = report_for("qwen3_moe/default", json!({"norm_topk_prob": false}));
    assert!(
        control.passed(),
        "control failed:\n{}",
        control.to_markdown()
    );
    // One expert per token instead of the configured top-k.
    assert_fails_from(
        "qwen3_moe/default",
        json!({"num_experts_per_tok": 1}),
        "layers.0",
    );
    // Renormalized weights where Transformers keeps the softmax's.
    assert_fails_from(
        "qwen3_moe/default",
        json!({"norm_topk_prob": true}),
        "layers.0",
    );
    // Ignoring the expert groups (every group eligible).
    let grouped: Value = serde_json::from_str(
        &std::fs::read_to_string(fixture_dir("glm4_moe/grouped").join("config.json")).unwrap(),
    )
    .unwrap();
    let first_sparse = grouped["first_k_dense_replace"].as_u64().unwrap_or(0);
    assert_fails_from(
        "glm4_moe/grouped",
        json!({"topk_group": grouped["n_group"]}),
        &format!("layers.{first_sparse}"),
    );
    // The sparsemixer's threshold.
    assert_fails_from(
        "phimoe/jitter-sliding",
        json!({"router_jitter_noise": 0.01}),
        "layers.0",
    );
}

#[test]
fn latent_attention_faults_fail_at_the_first_layer() {
    // Without `mscale_all_dim` (DeepSeek-V3 on the Hub): the softmax scale loses YaRN's
    // mscale² and cos/sin gain the attention factor.
    let hub: Value = serde_json::from_str(
        &std::fs::read_to_string(fixture_dir("deepseek_v3/hub").join("config.json")).unwrap(),
    )
    .unwrap();
    let mut scaling = hub["rope_scaling"].clone();
    scaling["mscale_all_dim"] = json!(0.0);
    assert_fails_from(
        "deepseek_v3/hub",
        json!({"rope_scaling": scaling}),
        "layers.0",
    );
    // RoPE on halves where DeepSeek rotates adjacent pairs.
    assert_fails_from(
        "deepseek_v3/default",
        json!({"rope_interleave": false}),
        "layers.0",
    );
}

#[test]
fn chunked_attention_faults_fail_at_the_first_layer() {
    // Full attention where Llama 4's RoPE layers see their own chunk only.
    assert_fails_from(
        "llama4_text/chunked-nope",
        json!({"attention_chunk_size": null}),
        "layers.0",
    );
}

// ---------------------------------------------------------------------------------------------
// 3b. Property: RoPE scores depend only on the position difference
// ---------------------------------------------------------------------------------------------

/// The largest position any rotation in these properties uses.
const MAX_POSITION: i32 = 4096;

/// RoPE configs whose frequencies do not depend on the sequence length.
fn rope_config() -> impl Strategy<Value = RopeConfig> {
    let theta = prop_oneof![Just(10_000.0), Just(500_000.0), 100.0f64..2_000_000.0];
    let scaling = prop_oneof![
        Just(RopeScaling::Default),
        (1.0f64..32.0).prop_map(|factor| RopeScaling::Linear { factor }),
        (1.0f64..32.0, 0.5f64..4.0, 0.5f64..8.0, 16usize..16_384).prop_map(
            |(factor, low, gap, original)| {
                RopeScaling::Llama3 {
                    factor,
                    low_freq_factor: low,
                    high_freq_factor: low + gap,
                    original_max_position_embeddings: original,
                }
            }
        ),
        (
            1.0f64..32.0,
            16usize..16_384,
            8.0f64..64.0,
            0.5f64..4.0,
            0.5f64..2.0,
            any::<bool>()
        )
            .prop_map(
                |(factor, original, beta_fast, beta_slow, attention_factor, truncate)| {
                    RopeScaling::Yarn {
                        factor,
                        original_max_position_embeddings: original,
                        beta_fast,
                        beta_slow,
                        attention_factor,
                        truncate,
                    }
                }
            ),
    ];
    (theta, 2i32..=64, any::<bool>(), scaling).prop_map(|(theta, half, traditional, scaling)| {
        RopeConfig {
            theta,
            dims: 2 * half,
            traditional,
            scaling,
        }
    })
}

#[derive(Debug, Clone)]
struct RopeCase {
    config: RopeConfig,
    /// Unrotated features after the rotated ones (partial rotary).
    tail: usize,
    q: Vec<f32>,
    k: Vec<f32>,
    m: i32,
    n: i32,
    shift: i32,
}

fn rope_case() -> impl Strategy<Value = RopeCase> {
    (rope_config(), prop_oneof![Just(0usize), 1usize..=16]).prop_flat_map(|(config, tail)| {
        let width = config.dims as usize + tail;
        let half_range = MAX_POSITION / 2;
        (
            vec(-1.0f32..1.0, width),
            vec(-1.0f32..1.0, width),
            0..half_range,
            0..half_range,
            0..half_range,
        )
            .prop_map(move |(q, k, m, n, shift)| RopeCase {
                config: config.clone(),
                tail,
                q,
                k,
                m,
                n,
                shift,
            })
    })
}

/// `x` (one head, one token) rotated as the token at `position`.
fn rotate(rope: &Rope, x: &[f32], position: i32) -> Vec<f64> {
    let a = Array::from_slice(x, &[1, 1, 1, x.len() as i32]);
    let r = rope.apply(&a, position).expect("rope");
    to_f32_vec(&r)
        .expect("to host")
        .into_iter()
        .map(f64::from)
        .collect()
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

fn norm(a: &[f32]) -> f64 {
    a.iter()
        .map(|&x| f64::from(x) * f64::from(x))
        .sum::<f64>()
        .sqrt()
}

/// The feature pairs RoPE rotates together, indexed like the inverse frequencies.
fn rotated_pairs(config: &RopeConfig) -> Vec<(usize, usize)> {
    let half = config.dims as usize / 2;
    (0..half)
        .map(|i| {
            if config.traditional {
                (2 * i, 2 * i + 1)
            } else {
                (i, i + half)
            }
        })
        .collect()
}

/// `rope(q, m) · rope(k, n)` in closed form (f64): per pair, rotating q by α and k by β gives
/// `(q_a k_a + q_b k_b) cos(β-α) + (q_b k_a - q_a k_b) sin(β-α)`, times attention_factor².
/// Unrotated tail features contribute `q · k` unchanged.
fn reference_score(config: &RopeConfig, q: &[f32], k: &[f32], m: i32, n: i32) -> f64 {
    let inv_freq = config.inv_freq(0);
    let af = f64::from(config.attention_factor());
    let (q64, k64): (Vec<f64>, Vec<f64>) = (
        q.iter().map(|&x| f64::from(x)).collect(),
        k.iter().map(|&x| f64::from(x)).collect(),
    );
    let mut score = 0.0;
    for ((a, b), &w) in rotated_pairs(config).into_iter().zip(&inv_freq) {
        let phi = f64::from(n - m) * f64::from(w);
        score += af
            * af
            * ((q64[a] * k64[a] + q64[b] * k64[b]) * phi.cos()
                + (q64[b] * k64[a] - q64[a] * k64[b]) * phi.sin());
    }
    let dims = config.dims as usize;
    score + dot(&q64[dims..], &k64[dims..])
}

/// Worst-case angle error (radians) of a float32 rotation at `position`.
///
/// The kernel forms the angle `position · ω` in f32: one rounding, at most ½ ulp, i.e.
/// `position · ω · 2⁻²⁴`; the argument reduction inside f32 `sin`/`cos` can lose up to about
/// one more ulp of the argument. We allow 2⁻²² (two ulps, a factor 2 of margin): at position
/// 4096 and ω = 1 that is 9.8e-4 rad. The frequencies themselves are rounded too, but
/// identically for every position, so they cannot break the relative-position property; the
/// closed-form reference uses the same f32 frequencies.
fn angle_error(position: i32, max_inv_freq: f64) -> f64 {
    f64::from(position) * max_inv_freq * 2f64.powi(-22)
}

#[test]
fn rope_scores_depend_only_on_the_position_difference() {
    check_property("rope relative position", 24, rope_case(), |case| {
        let RopeCase {
            config,
            tail,
            q,
            k,
            m,
            n,
            shift,
        } = case;
        let rope = Rope::new(config.clone()).expect("rope");
        let af = f64::from(config.attention_factor());
        let max_inv = config
            .inv_freq(0)
            .into_iter()
            .map(f64::from)
            .fold(0.0, f64::max);
        prop_assert!(
            max_inv > 0.0 && max_inv <= 1.0 + 1e-6,
            "inverse frequencies above 1: {max_inv}"
        );
        let (qn, kn) = (norm(&q), norm(&k));
        // A score is Σ over pairs of |q_p||k_p| cos(angle): an angle error ε moves it by at most
        // ε·|q||k| (Cauchy–Schwarz). f32 rounding of the rotated values and the host dot add a
        // few ulps relative, covered by the 1e-6 term.
        let scale = qn * kn * af.max(1.0).powi(2);
        let bound = |positions: &[i32]| {
            scale
                * (positions
                    .iter()
                    .map(|&p| angle_error(p, max_inv))
                    .sum::<f64>()
                    + 1e-6)
        };

        let s1 = dot(&rotate(&rope, &q, m), &rotate(&rope, &k, n));
        let s2 = dot(&rotate(&rope, &q, m + shift), &rotate(&rope, &k, n + shift));
        let tol = bound(&[m, n, m + shift, n + shift]);
        prop_assert!(
            (s1 - s2).abs() <= tol,
            "score at ({m}, {n}) = {s1}, shifted by {shift} = {s2}: |Δ| {} > {tol}",
            (s1 - s2).abs()
        );

        // And it is the right function of the difference: the closed form.
        let want = reference_score(&config, &q, &k, m, n);
        let tol = bound(&[m, n]);
        prop_assert!(
            (s1 - want).abs() <= tol,
            "score at ({m}, {n}) = {s1}, closed form {want}, tol {tol}"
        );

        // Rotation preserves the norm; YaRN scales the rotated features by its attention factor.
        let dims = config.dims as usize;
        for (x, p) in [(&q, m), (&k, n + shift)] {
            let r = rotate(&rope, x, p);
            let got = dot(&r, &r).sqrt();
            let want = (af * af * norm(&x[..dims]).powi(2) + norm(&x[dims..]).powi(2)).sqrt();
            prop_assert!(
                (got - want).abs() <= 1e-5 * want.max(1e-3),
                "norm after rotation at {p}: {got}, want {want} (tail {tail})"
            );
        }
        Ok(())
    });
}

// ---------------------------------------------------------------------------------------------
// 3c. Property: config.json round trips, in both RoPE styles
// ---------------------------------------------------------------------------------------------

/// How a generated YaRN config states its attention factor.
#[derive(Debug, Clone)]
enum YarnAttention {
    Derived,
    Explicit(f64),
    Mscale { mscale: f64, mscale_all_dim: f64 },
}

/// The RoPE a generated config means, in the generator's own terms.
#[derive(Debug, Clone)]
enum RopeSpec {
    Default,
    Linear {
        factor: f64,
    },
    Dynamic {
        factor: f64,
    },
    Yarn {
        factor: Option<f64>,
        original: Option<usize>,
        beta_fast: Option<f64>,
        beta_slow: Option<f64>,
        attention: YarnAttention,
        truncate: Option<bool>,
    },
    Llama3 {
        factor: f64,
        low: f64,
        high: f64,
        original: usize,
    },
    LongRope {
        short: Vec<f64>,
        long: Vec<f64>,
        original: usize,
        factor: Option<f64>,
        attention_factor: Option<f64>,
    },
}

#[derive(Debug, Clone)]
struct LlamaSpec {
    model_type: &'static str,
    vocab_size: i32,
    num_attention_heads: i32,
    /// None: the field is omitted (multi-head attention).
    num_key_value_heads: Option<i32>,
    head_dim: i32,
    /// Whether `head_dim` is written or implied by hidden_size / heads.
    explicit_head_dim: bool,
    hidden_size: i32,
    intermediate_size: i32,
    num_hidden_layers: usize,
    max_position_embeddings: usize,
    rms_norm_eps: f64,
    tie_word_embeddings: bool,
    /// Mistral's window; None: written as null.
    sliding_window: Option<i32>,
    /// None: omitted, so the default 10 000 applies.
    rope_theta: Option<f64>,
    /// None: omitted (1.0).
    partial_rotary_factor: Option<f64>,
    rope: RopeSpec,
    /// Hub style: name the variant with `type` (old) instead of `rope_type`.
    hub_type_key: bool,
    /// Hub style, default RoPE: how "no scaling" is written (0 absent, 1 null, 2 explicit).
    hub_default_form: u8,
}

/// Decimals with few significant digits (`n / scale`), as config files carry them.
///
/// serde_json (without its `float_roundtrip` feature) may parse a 17-digit decimal one ulp
/// away from the nearest f64 (e.g. `1.9374965346866178` → `…175`); short decimals take its
/// exact path. Both styles parse identically either way; only the comparison with the
/// generator's intent needs exact parsing.
fn decimal(range: std::ops::Range<u32>, scale: f64) -> impl Strategy<Value = f64> + Clone {
    range.prop_map(move |n| f64::from(n) / scale)
}

fn rope_spec(half_dims: usize) -> impl Strategy<Value = RopeSpec> {
    let factor = || decimal(1_000..64_000, 1e3);
    let opt = |s: std::ops::Range<u32>| proptest::option::of(decimal(s, 1e3));
    prop_oneof![
        Just(RopeSpec::Default),
        factor().prop_map(|factor| RopeSpec::Linear { factor }),
        factor().prop_map(|factor| RopeSpec::Dynamic { factor }),
        (
            opt(1_000..64_000),
            proptest::option::of(16usize..65_536),
            opt(8_000..64_000),
            opt(250..4_000),
            prop_oneof![
                Just(YarnAttention::Derived),
                decimal(500..2_000, 1e3).prop_map(YarnAttention::Explicit),
                (decimal(100..2_000, 1e3), decimal(100..2_000, 1e3)).prop_map(
                    |(mscale, mscale_all_dim)| YarnAttention::Mscale {
                        mscale,
                        mscale_all_dim
                    }
                ),
            ],
            proptest::option::of(any::<bool>()),
        )
            .prop_map(
                |(factor, original, beta_fast, beta_slow, attention, truncate)| RopeSpec::Yarn {
                    factor,
                    original,
                    beta_fast,
                    beta_slow,
                    attention,
                    truncate,
                }
            ),
        // high_freq_factor > low_freq_factor, both short decimals.
        (factor(), 500u32..4_000, 500u32..8_000, 16usize..65_536).prop_map(
            |(factor, low, gap, original)| {
                RopeSpec::Llama3 {
                    factor,
                    low: f64::from(low) / 1e3,
                    high: f64::from(low + gap) / 1e3,
                    original,
                }
            }
        ),
        (
            vec(factor(), half_dims),
            vec(factor(), half_dims),
            16usize..65_536,
            opt(1_000..64_000),
            opt(500..2_000),
        )
            .prop_map(|(short, long, original, factor, attention_factor)| {
                RopeSpec::LongRope {
                    short,
                    long,
                    original,
                    factor,
                    attention_factor,
                }
            }),
    ]
}

fn llama_spec() -> impl Strategy<Value = LlamaSpec> {
    // kv heads divide heads: pick kv heads and a group size.
    let heads = (1i32..=8, 1i32..=4, any::<bool>()).prop_map(|(kv, group, omit)| {
        let heads = kv * group;
        (heads, if omit && group == 1 { None } else { Some(kv) })
    });
    let partial = prop_oneof![
        Just(None),
        Just(Some(1.0)),
        Just(Some(0.5)),
        Just(Some(0.25))
    ];
    let theta = proptest::option::of(prop_oneof![
        Just(10_000.0),
        Just(500_000.0),
        decimal(10_000..100_000_000, 10.0)
    ]);
    (
        (prop_oneof![Just("llama"), Just("mistral")], 1i32..100_000, heads, 1i32..=32, any::<bool>(), 1i32..4096),
        (1i32..16_384, 1usize..=64, 64usize..1_000_000, decimal(1..100_000, 1e8), any::<bool>()),
        (theta, partial, any::<bool>(), 0u8..3, proptest::option::of(1i32..8192)),
    )
        .prop_flat_map(|(a, b, c)| {
            let (model_type, vocab_size, (num_attention_heads, num_key_value_heads), eighths, explicit, hidden) = a;
            // head_dim a multiple of 8 so every partial factor gives an even number of dims.
            let head_dim = 8 * eighths;
            let half_dims = (f64::from(head_dim) * c.1.unwrap_or(1.0)) as usize / 2;
            let hidden_size = if explicit { hidden } else { head_dim * num_attention_heads };
            let a = (model_type, vocab_size, num_attention_heads, num_key_value_heads, head_dim, explicit, hidden_size);
            (Just(a), Just(b), Just(c), rope_spec(half_dims))
        })
        .prop_map(|(a, b, c, rope)| {
            let (
                model_type,
                vocab_size,
                num_attention_heads,
                num_key_value_heads,
                head_dim,
                explicit_head_dim,
                hidden_size,
            ) = a;
            let (intermediate_size, num_hidden_layers, max_position_embeddings, rms_norm_eps, tie_word_embeddings) = b;
            let (rope_theta, partial_rotary_factor, hub_type_key, hub_default_form, sliding_window) = c;
            LlamaSpec {
                model_type,
                vocab_size,
                num_attention_heads,
                num_key_value_heads,
                head_dim,
                explicit_head_dim,
                hidden_size,
                intermediate_size,
                num_hidden_layers,
                max_position_embeddings,
                rms_norm_eps,
                tie_word_embeddings,
                sliding_window,
                rope_theta,
                partial_rotary_factor,
                rope,
                hub_type_key,
                hub_default_form,
            }
        })
}

impl RopeSpec {
    fn type_name(&self) -> &'static str {
        match self {
            RopeSpec::Default => "default",
            RopeSpec::Linear { .. } => "linear",
            RopeSpec::Dynamic { .. } => "dynamic",
            RopeSpec::Yarn { .. } => "yarn",
            RopeSpec::Llama3 { .. } => "llama3",
            RopeSpec::LongRope { .. } => "longrope",
        }
    }

    /// The variant's own parameters (without type, theta or partial factor).
    fn params(&self) -> Map<String, Value> {
        let mut p = Map::new();
        let mut put = |k: &str, v: Value| {
            p.insert(k.to_owned(), v);
        };
        match self {
            RopeSpec::Default => {}
            RopeSpec::Linear { factor } | RopeSpec::Dynamic { factor } => {
                put("factor", json!(factor))
            }
            RopeSpec::Yarn {
                factor,
                original,
                beta_fast,
                beta_slow,
                attention,
                truncate,
            } => {
                if let Some(f) = factor {
                    put("factor", json!(f));
                }
                if let Some(o) = original {
                    put("original_max_position_embeddings", json!(o));
                }
                if let Some(b) = beta_fast {
                    put("beta_fast", json!(b));
                }
                if let Some(b) = beta_slow {
                    put("beta_slow", json!(b));
                }
                match attention {
                    YarnAttention::Derived => {}
                    YarnAttention::Explicit(a) => put("attention_factor", json!(a)),
                    YarnAttention::Mscale {
                        mscale,
                        mscale_all_dim,
                    } => {
                        put("mscale", json!(mscale));
                        put("mscale_all_dim", json!(mscale_all_dim));
                    }
                }
                if let Some(t) = truncate {
                    put("truncate", json!(t));
                }
            }
            RopeSpec::Llama3 {
                factor,
                low,
                high,
                original,
            } => {
                put("factor", json!(factor));
                put("low_freq_factor", json!(low));
                put("high_freq_factor", json!(high));
                put("original_max_position_embeddings", json!(original));
            }
            RopeSpec::LongRope {
                short,
                long,
                original,
                factor,
                attention_factor,
            } => {
                put("short_factor", json!(short));
                put("long_factor", json!(long));
                put("original_max_position_embeddings", json!(original));
                if let Some(f) = factor {
                    put("factor", json!(f));
                }
                if let Some(a) = attention_factor {
                    put("attention_factor", json!(a));
                }
            }
        }
        p
    }
}

/// YaRN's attention scale (Transformers' `get_mscale`).
fn get_mscale(scale: f64, mscale: f64) -> f64 {
    if scale <= 1.0 {
        1.0
    } else {
        0.1 * mscale * scale.ln() + 1.0
    }
}

impl LlamaSpec {
    /// The fields every style shares.
    fn common(&self) -> Map<String, Value> {
        let mut c = Map::new();
        c.insert("model_type".into(), json!(self.model_type));
        c.insert("architectures".into(), json!(["LlamaForCausalLM"]));
        c.insert("vocab_size".into(), json!(self.vocab_size));
        c.insert("hidden_size".into(), json!(self.hidden_size));
        c.insert("intermediate_size".into(), json!(self.intermediate_size));
        c.insert("num_hidden_layers".into(), json!(self.num_hidden_layers));
        c.insert(
            "num_attention_heads".into(),
            json!(self.num_attention_heads),
        );
        if let Some(kv) = self.num_key_value_heads {
            c.insert("num_key_value_heads".into(), json!(kv));
        }
        if self.explicit_head_dim {
            c.insert("head_dim".into(), json!(self.head_dim));
        }
        c.insert(
            "max_position_embeddings".into(),
            json!(self.max_position_embeddings),
        );
        c.insert("rms_norm_eps".into(), json!(self.rms_norm_eps));
        c.insert(
            "tie_word_embeddings".into(),
            json!(self.tie_word_embeddings),
        );
        c.insert("hidden_act".into(), json!("silu"));
        c.insert("sliding_window".into(), json!(self.sliding_window));
        c
    }

    /// Checkpoints on the Hub: `rope_theta` and `rope_scaling` at the top level.
    fn hub_json(&self) -> Value {
        let mut c = self.common();
        if let Some(theta) = self.rope_theta {
            c.insert("rope_theta".into(), json!(theta));
        }
        if let Some(p) = self.partial_rotary_factor {
            c.insert("partial_rotary_factor".into(), json!(p));
        }
        let type_key = if self.hub_type_key {
            "type"
        } else {
            "rope_type"
        };
        let mut scaling = self.rope.params();
        scaling.insert(type_key.into(), json!(self.rope.type_name()));
        match (&self.rope, self.hub_default_form) {
            (RopeSpec::Default, 0) => {}
            (RopeSpec::Default, 1) => {
                c.insert("rope_scaling".into(), Value::Null);
            }
            _ => {
                c.insert("rope_scaling".into(), Value::Object(scaling));
            }
        }
        Value::Object(c)
    }

    /// Transformers 5: everything inside `rope_parameters`.
    fn transformers5_json(&self) -> Value {
        let mut c = self.common();
        let mut params = self.rope.params();
        params.insert("rope_type".into(), json!(self.rope.type_name()));
        if let Some(theta) = self.rope_theta {
            params.insert("rope_theta".into(), json!(theta));
        }
        if let Some(p) = self.partial_rotary_factor {
            params.insert("partial_rotary_factor".into(), json!(p));
        }
        c.insert("rope_parameters".into(), Value::Object(params));
        Value::Object(c)
    }

    /// The RoPE this config means, as Transformers 5.23 (`modeling_rope_utils`) derives it.
    fn expected_rope(&self) -> RopeConfig {
        let max = self.max_position_embeddings;
        let scaling = match &self.rope {
            RopeSpec::Default => RopeScaling::Default,
            RopeSpec::Linear { factor } => RopeScaling::Linear { factor: *factor },
            RopeSpec::Dynamic { factor } => RopeScaling::Dynamic {
                factor: *factor,
                max_position_embeddings: max,
            },
            RopeSpec::Yarn {
                factor,
                original,
                beta_fast,
                beta_slow,
                attention,
                truncate,
            } => {
                let original = original.unwrap_or(max);
                let factor = factor.unwrap_or(max as f64 / original as f64);
                let attention_factor = match attention {
                    YarnAttention::Explicit(a) => *a,
                    YarnAttention::Mscale {
                        mscale,
                        mscale_all_dim,
                    } => get_mscale(factor, *mscale) / get_mscale(factor, *mscale_all_dim),
                    YarnAttention::Derived => get_mscale(factor, 1.0),
                };
                RopeScaling::Yarn {
                    factor,
                    original_max_position_embeddings: original,
                    beta_fast: beta_fast.unwrap_or(32.0),
                    beta_slow: beta_slow.unwrap_or(1.0),
                    attention_factor,
                    truncate: truncate.unwrap_or(true),
                }
            }
            RopeSpec::Llama3 {
                factor,
                low,
                high,
                original,
            } => RopeScaling::Llama3 {
                factor: *factor,
                low_freq_factor: *low,
                high_freq_factor: *high,
                original_max_position_embeddings: *original,
            },
            RopeSpec::LongRope {
                short,
                long,
                original,
                factor,
                attention_factor,
            } => {
                let factor = factor.unwrap_or(max as f64 / *original as f64);
                let attention_factor = attention_factor.unwrap_or(if factor <= 1.0 {
                    1.0
                } else {
                    (1.0 + factor.ln() / (*original as f64).ln()).sqrt()
                });
                RopeScaling::LongRope {
                    short_factor: short.clone(),
                    long_factor: long.clone(),
                    original_max_position_embeddings: *original,
                    attention_factor,
                }
            }
        };
        RopeConfig {
            theta: self.rope_theta.unwrap_or(10_000.0),
            dims: (f64::from(self.head_dim) * self.partial_rotary_factor.unwrap_or(1.0)) as i32,
            traditional: false,
            scaling,
        }
    }
}

/// Writes `value` as a config.json, reads it back and parses it as the llama module does.
fn parse_config(
    dir: &Path,
    file: &str,
    value: &Value,
) -> Result<(llama::Config, RopeConfig), String> {
    let path = dir.join(file);
    std::fs::write(&path, serde_json::to_string_pretty(value).unwrap()).unwrap();
    let config = ConfigFile::read(&path).map_err(|e| format!("read: {e}"))?;
    let cfg: llama::Config = config
        .parse_with_defaults(<llama::Config as DecoderFamily>::DEFAULTS)
        .map_err(|e| format!("parse: {e}"))?;
    let rope = RopeConfig::from_fields(
        &cfg.decoder.rope,
        cfg.decoder.head_dim(),
        cfg.decoder.max_position_embeddings,
        10_000.0,
        &path,
    )
    .map_err(|e| format!("rope: {e}"))?;
    Ok((cfg, rope))
}

#[test]
fn config_round_trips_in_both_rope_styles() {
    let dir = tempfile::tempdir().unwrap();
    check_property("config round trip", 64, llama_spec(), |spec| {
        let hub = spec.hub_json();
        let tf5 = spec.transformers5_json();
        let (cfg_hub, rope_hub) =
            parse_config(dir.path(), "hub.json", &hub).map_err(TestCaseError::fail)?;
        let (cfg_tf5, rope_tf5) =
            parse_config(dir.path(), "tf5.json", &tf5).map_err(TestCaseError::fail)?;

        prop_assert_eq!(
            &rope_hub,
            &rope_tf5,
            "the two styles disagree:\nhub {}\ntf5 {}",
            hub,
            tf5
        );
        prop_assert_eq!(
            &rope_hub,
            &spec.expected_rope(),
            "not what the config means:\n{}",
            hub
        );
        for cfg in [&cfg_hub, &cfg_tf5] {
            let d = &cfg.decoder;
            prop_assert_eq!(d.model_type.as_str(), spec.model_type);
            prop_assert_eq!(d.vocab_size, spec.vocab_size);
            prop_assert_eq!(d.hidden_size, spec.hidden_size);
            prop_assert_eq!(d.intermediate_size, spec.intermediate_size);
            prop_assert_eq!(d.num_hidden_layers, spec.num_hidden_layers);
            prop_assert_eq!(d.num_attention_heads, spec.num_attention_heads);
            prop_assert_eq!(d.num_key_value_heads, spec.num_key_value_heads);
            prop_assert_eq!(d.head_dim(), spec.head_dim);
            prop_assert_eq!(d.max_position_embeddings, spec.max_position_embeddings);
            prop_assert_eq!(d.rms_norm_eps, Some(spec.rms_norm_eps));
            prop_assert_eq!(d.tie_word_embeddings, spec.tie_word_embeddings);
            prop_assert_eq!(d.windows.sliding_window, spec.sliding_window);
            prop_assert!(!cfg.rope_traditional);
        }
        Ok(())
    });
}

// ---------------------------------------------------------------------------------------------
// Models load on one thread and run on another
// ---------------------------------------------------------------------------------------------

/// A model is `Send`: one loaded on a thread that then ends must run on another and give the
/// fixture's logits. Anything a block derives at load time (stacked experts, `-exp(A_log)`,
/// the latent projections split from `kv_b_proj`, reshaped convolutions) must be computed
/// before loading returns, or MLX fails on the second thread, whose stream never saw that
/// pending work. One fixture per block kind.
#[test]
fn models_loaded_on_one_thread_run_on_another() {
    for name in [
        "mixtral/default",
        "gpt_oss/default",
        "deepseek_v3/default",
        "longcat_flash/default",
        "mamba2/default",
        "mamba/default",
        "jamba/default",
        "lfm2/default",
        "qwen3_next/default",
        "recurrent_gemma/default",
        "gemma/default",
    ] {
        let model = std::thread::spawn(move || load_model(name, None))
            .join()
            .unwrap_or_else(|_| panic!("{name}: the loading thread panicked"));
        let (max_abs, tolerance) = std::thread::spawn(move || {
            let fixture = load_fixture(name);
            let ids = &fixture.manifest.input_ids;
            let logits = forward(model.as_ref(), ids, &mut model.new_cache());
            let got = to_f32_vec(&logits).expect("logits to host");
            let want = to_f32_vec(fixture.tensor("logits").expect("fixture logits"))
                .expect("fixture logits to host");
            assert_eq!(got.len(), want.len(), "{name}: logits size");
            let max_abs = got
                .iter()
                .zip(&want)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            (max_abs, fixture.manifest.tolerances.max_abs)
        })
        .join()
        .unwrap_or_else(|_| panic!("{name}: the running thread panicked"));
        assert!(
            max_abs <= tolerance,
            "{name}: logits differ by {max_abs} (tolerance {tolerance})"
        );
    }
}

/// Falcon-H1's `mamba_norm_before_gate` (`norm(y) · silu(z)` instead of
/// `norm(y · silu(z))`) moves our logits exactly as far as it moves Transformers' (the
/// exporter records Transformers' change on the hub fixture).
#[test]
fn falcon_h1_norm_before_gate_moves_the_logits_as_in_transformers() {
    let fixture = load_fixture("falcon_h1/hub");
    let expected = fixture.manifest.checks["logits_vs_norm_before_gate_max_abs"] as f32;
    let ids = &fixture.manifest.input_ids;
    let logits = |patch: Option<Value>| {
        let model = load_model("falcon_h1/hub", patch.as_ref());
        to_f32_vec(&forward(model.as_ref(), ids, &mut model.new_cache())).unwrap()
    };
    let moved = diff(
        &logits(Some(json!({"mamba_norm_before_gate": true}))),
        &logits(None),
    )
    .max_abs;
    assert!(
        (moved - expected).abs() <= fixture.manifest.tolerances.max_abs,
        "norm before the gate moves the logits by {moved}, Transformers' by {expected}"
    );
}
