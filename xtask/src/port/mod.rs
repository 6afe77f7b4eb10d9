//! `cargo xtask port <model_type>`: from a Transformers model type to a verified model
//! module and a report a maintainer can review.
//!
//! 1. Introspect Transformers (`xtask/python/introspect.py`, pinned venv): config fields and
//!    defaults, the tiny model's parameters and modules, how it derives `layer_types`; and
//!    the fixture variants its config options call for (→ `xtask/fixtures/<type>.json`).
//! 2. Export those fixtures (`export_fixtures.py`) into `tests/fixtures/<type>/`.
//! 3. Plan: map the parameters and config fields onto the shared blocks of
//!    `mlx_models::transformer`; list what is undecided and what is not expressible (gaps).
//! 4. Try each undecided combination against every fixture (in-process, no compilation)
//!    and keep the first that passes all of them.
//! 5. Generate `mlx-models/src/models/<name>.rs`, rustfmt it, register it, then compile and
//!    verify the generated module (`cargo xtask verify <type>`).
//! 6. Write `tests/fixtures/<type>/PORT_REPORT.md`.
//!
//! Everything it writes depends only on the pinned Transformers and the fixtures, so a
//! second run writes the same files. A module that was edited by hand after generation is
//! left as it is; the report then lists the edits as a diff.

pub mod alibi;
pub mod codegen;
pub mod interpret;
pub mod plan;
pub mod probed;
pub mod recurrent;
pub mod report;
pub mod routing;
pub mod trace;

use crate::fixtures::{python, workspace_root};
use anyhow::{bail, Context};
use mlx_models::config::ConfigFile;
use mlx_models::models::LanguageModel;
use mlx_port::{fixture, verify_with, Fixture, Report, VerifyOptions};
use plan::{Choice, Plan};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;

#[derive(clap::Args)]
pub struct Args {
    /// The Transformers `model_type` to port, e.g. `qwen3`.
    #[arg(required_unless_present = "all_missing")]
    model_type: Option<String>,
    /// Try every causal-LM `model_type` of Transformers the zoo lacks, one line each
    /// (verified, or where it stops); what does not verify is taken out again.
    #[arg(long, conflicts_with = "model_type")]
    all_missing: bool,
    /// With `--all-missing`: at most this many families, in Transformers' order.
    #[arg(long, value_name = "N")]
    limit: Option<usize>,
    /// With `--all-missing`: start after this model type (to resume a survey).
    #[arg(long, value_name = "TYPE")]
    after: Option<String>,
    /// A tiny config (JSON) for the fixtures instead of the derived one.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// The module name [default: the model type, made an identifier].
    #[arg(long)]
    name: Option<String>,
    /// Reuse the committed introspection and fixtures (no Python).
    #[arg(long)]
    offline: bool,
    /// Replace a module that differs from what the generator writes (hand edits are lost).
    #[arg(long)]
    overwrite: bool,
    /// Write the introspection, the generated module and the report under DIR, and verify
    /// the candidates on the committed fixtures: no fixture exported, no module written or
    /// registered in the tree (for checking the generator on a family the zoo has). The
    /// tiny config is the committed fixture spec's `base_config` unless `--config` says.
    #[arg(long, value_name = "DIR", conflicts_with = "all_missing")]
    out: Option<PathBuf>,
}

/// The outcome of trying the candidates.
pub struct Search {
    pub chosen: Option<Choice>,
    /// Per candidate: its description and the fixtures it failed (first bad row or check).
    pub tried: Vec<(String, Vec<String>)>,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    if args.all_missing {
        return all_missing(&args);
    }
    let mt = args.model_type.clone().expect("clap requires it");
    let outcome = port(&args, &mt)?;
    if !outcome.verified {
        bail!("{mt} is not ported yet: see its PORT_REPORT.md");
    }
    Ok(())
}

/// What one port run came to, in a line.
pub struct Outcome {
    pub verified: bool,
    pub summary: String,
}

/// `--all-missing`: every Transformers causal-LM type the registry lacks, ported in turn.
fn all_missing(args: &Args) -> anyhow::Result<()> {
    let root = workspace_root();
    let out = Command::new(python()?)
        .args([
            "-c",
            "from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES as m\n\
             print('\\n'.join(m))",
        ])
        .output()?;
    if !out.status.success() {
        bail!(
            "listing Transformers' causal-LM model types failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let registered = mlx_models::models::supported_model_types();
    let missing: Vec<String> = String::from_utf8(out.stdout)?
        .lines()
        .map(str::trim)
        .filter(|t| !t.is_empty() && !registered.contains(t))
        .skip_while(|t| args.after.as_deref().is_some_and(|a| *t <= a))
        .map(str::to_owned)
        .take(args.limit.unwrap_or(usize::MAX))
        .collect();
    eprintln!("port --all-missing: {} model types to try", missing.len());
    let (mut verified, mut total) = (0, 0);
    for mt in &missing {
        let fixtures = root.join("tests/fixtures").join(mt);
        let spec = root.join(format!("xtask/fixtures/{mt}.json"));
        let existed = (fixtures.exists(), spec.exists());
        let registry = root.join("mlx-models/src/models/mod.rs");
        let registry_before = std::fs::read_to_string(&registry)?;
        let module = root.join(format!("mlx-models/src/models/{}.rs", module_name(mt)));
        let module_existed = module.exists();
        let outcome = port(args, mt).unwrap_or_else(|e| Outcome {
            verified: false,
            summary: format!("{e:#}")
                .lines()
                .next()
                .unwrap_or_default()
                .to_owned(),
        });
        total += 1;
        if outcome.verified {
            verified += 1;
        } else {
            // Leave the tree as it was: a family that does not verify is not part of it.
            if !existed.0 {
                let _ = std::fs::remove_dir_all(&fixtures);
            }
            if !existed.1 {
                let _ = std::fs::remove_file(&spec);
            }
            if !module_existed {
                let _ = std::fs::remove_file(&module);
            }
            std::fs::write(&registry, &registry_before)?;
        }
        println!(
            "{mt}: {}",
            if outcome.verified {
                "verified".to_owned()
            } else {
                format!("not verified — {}", outcome.summary)
            }
        );
    }
    println!("{verified} of {total} verified");
    Ok(())
}

/// The default module name of a model type: the type made an identifier.
fn module_name(mt: &str) -> String {
    mt.replace(|c: char| !c.is_ascii_alphanumeric(), "_")
}

fn port(args: &Args, mt: &str) -> anyhow::Result<Outcome> {
    let root = workspace_root();
    let module = args.name.clone().unwrap_or_else(|| module_name(mt));
    let fixtures_dir = root.join("tests/fixtures").join(mt);
    let scratch = args.out.as_deref();
    // `--offline` reads the committed facts, wherever the rest goes.
    let facts_path = match scratch {
        Some(dir) if !args.offline => dir,
        _ => &fixtures_dir,
    }
    .join("introspection.json");
    if let Some(dir) = scratch {
        std::fs::create_dir_all(dir)?;
    }
    if let (Some(dir), false) = (scratch, args.offline) {
        let committed_spec = root.join(format!("xtask/fixtures/{mt}.json"));
        let config = match (&args.config, std::fs::read_to_string(&committed_spec)) {
            (Some(c), _) => Some(c.clone()),
            (None, Ok(text)) => {
                let spec: Value = serde_json::from_str(&text)
                    .with_context(|| format!("reading {}", committed_spec.display()))?;
                let path = dir.join("base_config.json");
                std::fs::write(&path, spec["base_config"].to_string())?;
                Some(path)
            }
            (None, Err(_)) => None,
        };
        let spec = dir.join(format!("{mt}.json"));
        introspect(&root, mt, config.as_deref(), &facts_path, &spec, false)?;
    } else if !args.offline {
        let spec = root.join(format!("xtask/fixtures/{mt}.json"));
        introspect(&root, mt, args.config.as_deref(), &facts_path, &spec, true)?;
        export(&root, mt)?;
    }
    let facts: Value = serde_json::from_str(
        &std::fs::read_to_string(&facts_path)
            .with_context(|| format!("reading {}", facts_path.display()))?,
    )?;
    let mut plan = plan::plan(&facts, &module);
    let fixtures = fixture::discover(&fixtures_dir)
        .iter()
        .map(|d| Fixture::load(d))
        .collect::<Result<Vec<_>, _>>()?;
    if fixtures.is_empty() {
        bail!("no fixtures under {}", fixtures_dir.display());
    }
    eprintln!(
        "port {mt}: {} fixtures, {} candidate(s), {} gap(s)",
        fixtures.len(),
        plan.choices.len(),
        plan.gaps.len()
    );
    let search = search(&plan, &fixtures)?;
    if let Some(choice) = &search.chosen {
        plan.settle(choice);
    }
    let module_path = root.join(format!("mlx-models/src/models/{module}.rs"));
    let mut hand_edits = None;
    let mut reports = Vec::new();
    let mut checks_passed = false;
    if let (Some(dir), Some(choice), true) = (scratch, &search.chosen, plan.gaps.is_empty()) {
        let generated = rustfmt(&codegen::module_source(&plan, choice))?;
        std::fs::write(dir.join(format!("{module}.rs")), &generated)?;
        if let Ok(existing) = std::fs::read_to_string(&module_path) {
            if existing != generated {
                hand_edits = Some(diff(&generated, &existing)?);
            }
        }
    } else if let (Some(choice), true) = (&search.chosen, plan.gaps.is_empty()) {
        let generated = rustfmt(&codegen::module_source(&plan, choice))?;
        let draft = root.join("target/port").join(mt);
        std::fs::create_dir_all(&draft)?;
        std::fs::write(draft.join(format!("{module}.rs")), &generated)?;
        let previous = std::fs::read_to_string(&module_path).ok();
        match &previous {
            Some(existing) if *existing != generated && !args.overwrite => {
                hand_edits = Some(diff(&generated, existing)?);
                eprintln!(
                    "port {mt}: {} differs from the generated module; kept (the report lists the difference)",
                    module_path.display()
                );
            }
            _ => std::fs::write(&module_path, &generated)?,
        }
        let registry = root.join("mlx-models/src/models/mod.rs");
        let registry_before = std::fs::read_to_string(&registry)?;
        register(&root, mt, &module, !plan.conv1d.is_empty())?;
        let mut verification = verify_generated(&root, mt)?;
        let layers_pass = verification
            .as_ref()
            .is_some_and(|v| !v.reports.is_empty() && v.reports.iter().all(Report::passed));
        // Bounds measured on other fixtures say nothing of the ones exported now: measured
        // again, the family's entry replaced.
        let exported = !args.offline;
        if layers_pass && (exported || mlx_port::quantization::bound(mt, 8).is_none()) {
            let drifts = verification.as_ref().map_or(&[][..], |v| &v.drifts[..]);
            if let Some(note) = add_drift_bound(&root, mt, drifts)? {
                plan.decisions.push(note);
                verification = verify_generated(&root, mt)?;
            }
        }
        let built = verification.is_some();
        if let Some(v) = verification {
            reports = v.reports;
            checks_passed = v.passed;
        }
        if !built {
            // A module that does not compile would break this very tool (it links the zoo):
            // put the tree back and keep the draft for the report.
            std::fs::write(&registry, registry_before)?;
            match previous {
                Some(text) => std::fs::write(&module_path, text)?,
                None => std::fs::remove_file(&module_path)?,
            }
            eprintln!(
                "port {mt}: the generated module does not compile; removed again, draft kept in {}",
                draft.display()
            );
            plan.gaps.push(format!(
                "the generated module does not compile (draft kept in target/port/{mt}/{module}.rs): \
                 the generator emitted code it should not have"
            ));
        }
    }
    let scaffold = if search.chosen.is_none() {
        write_scaffold(&root, mt, &plan, &search)?
    } else {
        None
    };
    // No module generated, but one written by hand is registered: verify that one, and
    // show it against the scaffold it could have started from (not in a scratch run).
    let generated = search.chosen.is_some() && plan.gaps.is_empty();
    let by_hand = match std::fs::read_to_string(&module_path) {
        Ok(existing)
            if scratch.is_none()
                && !generated
                && mlx_models::models::supported_model_types().contains(&mt) =>
        {
            if let Some(v) = verify_generated(&root, mt)? {
                reports = v.reports;
                checks_passed = v.passed;
            }
            Some(diff(scaffold.as_deref().unwrap_or(""), &existing)?)
        }
        _ => None,
    };
    let edits = match &by_hand {
        Some(d) => report::Edits::ByHand(d),
        None => report::Edits::Generated(hand_edits.as_deref()),
    };
    let text = report::render(&plan, &search, &reports, edits, &fixtures);
    let report_path = scratch.unwrap_or(&fixtures_dir).join("PORT_REPORT.md");
    std::fs::write(&report_path, text)?;
    // In a scratch run the candidates' verification on every committed fixture is the
    // verification (the module is not compiled into the zoo).
    let passed = if scratch.is_some() {
        generated
    } else {
        (generated || by_hand.is_some())
            && checks_passed
            && !reports.is_empty()
            && reports.iter().all(Report::passed)
    };
    if let (Some(dir), Some(choice), true) = (scratch, &search.chosen, passed) {
        eprintln!(
            "port {mt}: candidate \"{}\" passes all {} committed fixtures; module in {}",
            choice.describe(),
            fixtures.len(),
            dir.join(format!("{module}.rs")).display()
        );
    }
    eprintln!(
        "port {mt}: {} — report in {}",
        if passed { "verified" } else { "NOT verified" },
        report_path.display()
    );
    if !passed && scratch.is_none() && !mlx_models::models::supported_model_types().contains(&mt) {
        eprintln!(
            "port {mt}: its fixtures stay in tests/fixtures/{mt}/ and xtask/fixtures/{mt}.json for \
             a module written by hand (skills/port-architecture/SKILL.md); until one is \
             registered, `cargo test` fails on them (tests/fixtures.rs: every spec is of a \
             registered family): remove both to drop the attempt"
        );
    }
    let summary = if passed && by_hand.is_some() {
        "verified (written by hand; the generator stops at a gap)".to_owned()
    } else if passed {
        "verified".to_owned()
    } else if let Some(gap) = plan
        .gaps
        .iter()
        .find(|g| !g.starts_with("no candidate passes"))
    {
        format!("gap: {gap}")
    } else if let Some((name, class)) = plan.layer_calls.iter().find(|(n, c)| !trace::covered(n, c))
    {
        format!("no shared block for `{name}` (`{class}`) in layer 0")
    } else {
        let furthest = search
            .tried
            .iter()
            .max_by_key(|(_, f)| report::progress(f))
            .and_then(|(_, f)| f.first().cloned())
            .unwrap_or_default();
        format!("diverges: {furthest}")
    };
    Ok(Outcome {
        verified: passed,
        summary,
    })
}

/// Where no candidate verifies: the generated module of the one that got furthest, in
/// `target/port/<type>/scaffold.rs`, with what failed at its head, for a hand-written
/// module to start from (the report's "Where it diverges" section says where).
fn write_scaffold(
    root: &Path,
    mt: &str,
    plan: &Plan,
    search: &Search,
) -> anyhow::Result<Option<String>> {
    let Some((best, (desc, failures))) = search
        .tried
        .iter()
        .enumerate()
        .max_by_key(|(i, (_, f))| (report::progress(f), std::cmp::Reverse(*i)))
    else {
        return Ok(None);
    };
    let Some(choice) = plan.choices.get(best) else {
        return Ok(None);
    };
    let mut settled = plan.clone();
    settled.settle(choice);
    let source = codegen::module_source(&settled, choice);
    let source = rustfmt(&source).unwrap_or(source);
    let header = format!(
        "// Scaffold written by `cargo xtask port {mt}`: candidate {} ({desc}), the one that got\n\
         // furthest, which does NOT verify: {}.\n\
         // See tests/fixtures/{mt}/PORT_REPORT.md, \"Where it diverges\", for the first module\n\
         // Transformers calls that no shared block accounts for.\n\n",
        best + 1,
        failures.first().map(String::as_str).unwrap_or("-")
    );
    let dir = root.join("target/port").join(mt);
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("scaffold.rs"), header + &source)?;
    Ok(Some(source))
}

/// Runs a Python step with its output passed through; returns whether it succeeded and
/// the last line it wrote to stderr (the exception, when it failed).
fn run_python(cmd: &mut Command) -> anyhow::Result<(bool, String)> {
    let out = cmd
        .stdout(std::process::Stdio::inherit())
        .stderr(std::process::Stdio::piped())
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprint!("{stderr}");
    let last = stderr
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or_default()
        .trim()
        .to_owned();
    Ok((out.status.success(), last))
}

/// Runs the introspection, which also writes the fixture variants spec.
/// `seed_check`: the exporter's seed check of the proposed variants (not needed when they
/// are not exported).
fn introspect(
    root: &Path,
    mt: &str,
    config: Option<&Path>,
    out: &Path,
    spec: &Path,
    seed_check: bool,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(out.parent().expect("a file in a directory"))?;
    let mut cmd = Command::new(python()?);
    cmd.current_dir(root)
        .arg("xtask/python/introspect.py")
        .args(["--model-type", mt, "--out"])
        .arg(out)
        .arg("--spec-out")
        .arg(spec);
    if !seed_check {
        cmd.arg("--no-seed-check");
    }
    if let Some(c) = config {
        cmd.arg("--config").arg(c);
    }
    let (ok, last) = run_python(&mut cmd)?;
    if !ok {
        bail!("introspect.py failed for {mt}: {last}");
    }
    Ok(())
}

fn export(root: &Path, mt: &str) -> anyhow::Result<()> {
    let mut cmd = Command::new(python()?);
    cmd.current_dir(root)
        .arg("xtask/python/export_fixtures.py")
        .arg("--spec")
        .arg(format!("xtask/fixtures/{mt}.json"))
        .args(["--out", "tests/fixtures"]);
    let (ok, last) = run_python(&mut cmd)?;
    if !ok {
        bail!("exporting the {mt} fixtures failed: {last}");
    }
    Ok(())
}

/// Tries every candidate on every fixture; the first that passes them all wins.
pub fn search(plan: &Plan, fixtures: &[Fixture]) -> anyhow::Result<Search> {
    let mut tried = Vec::new();
    for choice in &plan.choices {
        let build = |config: &ConfigFile,
                     dir: &Path,
                     dtype|
         -> mlx_models::Result<Box<dyn LanguageModel>> {
            let settings = interpret::settings(plan, choice, config)?;
            let mut weights = mlx_models::weights::Weights::from_dir(dir)?.with_dtype(dtype);
            weights.rename(|name| {
                (!mlx_models::family::is_unused(name, &plan.unused_prefixes, &plan.unused_anywhere))
                    .then(|| name.to_owned())
            });
            // What every family loader does first, as `family::load`.
            mlx_models::norm::unfold_mlx_lm_norms(&settings.model_type, &mut weights)?;
            mlx_models::family::unpack_hub_quantization(config, &mut weights)?;
            let prefixes: Vec<(&str, &str)> = plan
                .prefix_renames
                .iter()
                .map(|(a, b)| (a.as_str(), b.as_str()))
                .collect();
            weights.rename(|name| Some(mlx_models::weights::rename_prefix(name, &prefixes)));
            if let Some(moe) = &plan.moe {
                weights.rename(|name| Some(plan::checkpoint_name(name, &moe.checkpoint_renames)));
            }
            weights.rename(|name| Some(trace::rename(name, &plan.renames)));
            // Conv1D weights transposed, as the module's sanitize.
            for i in 0..settings.layers.len() {
                for module in &plan.conv1d {
                    mlx_models::fused_qkv::conv1d_to_linear(
                        &mut weights,
                        &format!("model.layers.{i}.{module}"),
                    )?;
                }
            }
            // Grouped fused q/k/v rows reordered, as the module's sanitize.
            if let Some(g) = &plan.qkv_groups {
                let a = &settings.attention;
                for i in 0..settings.layers.len() {
                    mlx_models::fused_qkv::grouped_to_blocks(
                        &mut weights,
                        &format!("model.layers.{i}.self_attn.qkv_proj"),
                        g.groups.unwrap_or(a.num_heads),
                        g.order,
                        a.num_heads,
                        a.head_dim,
                    )?;
                }
            }
            weights.eval()?;
            match &plan.moe {
                // Per-expert checkpoints stacked, fused ones split, as the module's sanitize.
                Some(moe) => {
                    let projections: Vec<(&str, &str)> = moe
                        .projections
                        .iter()
                        .map(|(a, b)| (a.as_str(), b.as_str()))
                        .collect();
                    mlx_models::family::sanitize_moe(&mut weights, &settings, None, &projections)?;
                }
                None => mlx_models::transformer::drop_computed_weights(
                    &mut weights,
                    settings.tie_word_embeddings,
                ),
            }
            mlx_models::transformer::build(config, settings, weights)
        };
        let mut failures = Vec::new();
        for fixture in fixtures {
            match verify_with(fixture, &VerifyOptions::default(), &build) {
                Ok(report) if report.passed() => {}
                Ok(report) => failures.push(format!(
                    "{}: {}",
                    report.fixture,
                    report
                        .first_bad_row()
                        .map(|r| format!(
                            "first bad tensor `{}` (max-abs {:.2e}, cosine {:.7})",
                            r.name, r.diff.max_abs, r.diff.cosine
                        ))
                        .unwrap_or_else(|| format!("checks {:?} failed", report.failed_checks()))
                )),
                Err(e) => failures.push(format!("{}: {e}", fixture.name())),
            }
            if !failures.is_empty() {
                break;
            }
        }
        let passed = failures.is_empty();
        // Paths relative to the workspace, so the report reads the same on every machine.
        let root = format!("{}/", workspace_root().display());
        let failures = failures.iter().map(|f| f.replace(&root, "")).collect();
        tried.push((choice.describe(), failures));
        if passed {
            return Ok(Search {
                chosen: Some(choice.clone()),
                tried,
            });
        }
    }
    Ok(Search {
        chosen: None,
        tried,
    })
}

/// Formats Rust source with rustfmt (edition 2021, the workspace's settings).
pub fn rustfmt(source: &str) -> anyhow::Result<String> {
    use std::io::Write;
    let mut child = Command::new("rustfmt")
        .args(["--edition", "2021", "--emit", "stdout"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("running rustfmt (rustup component add rustfmt)")?;
    child
        .stdin
        .take()
        .expect("piped stdin")
        .write_all(source.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!("rustfmt rejected the generated module");
    }
    Ok(String::from_utf8(out.stdout)?)
}

fn diff(generated: &str, existing: &str) -> anyhow::Result<String> {
    let dir = std::env::temp_dir().join(format!("xtask-port-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let (a, b) = (dir.join("generated.rs"), dir.join("committed.rs"));
    std::fs::write(&a, generated)?;
    std::fs::write(&b, existing)?;
    let out = Command::new("diff")
        .args(["-u", "--label", "generated", "--label", "committed"])
        .arg(&a)
        .arg(&b)
        .output()?;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Adds `pub mod <module>;` and the registry entry to models/mod.rs, once.
fn register(root: &Path, mt: &str, module: &str, conv1d: bool) -> anyhow::Result<()> {
    let path = root.join("mlx-models/src/models/mod.rs");
    let text = std::fs::read_to_string(&path)?;
    let updated = registry_source(&text, mt, module);
    let updated = if conv1d {
        layout_source(&updated, mt, module)
    } else {
        updated
    };
    if updated != text {
        std::fs::write(&path, rustfmt(&updated)?)?;
    }
    Ok(())
}

/// models/mod.rs with `mt` in `CHECKPOINT_LAYOUTS` (kept sorted): a family with `Conv1D`
/// projections, whose checkpoints the converter brings to the loaded layout first.
pub fn layout_source(text: &str, mt: &str, module: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    let Some(start) = lines
        .iter()
        .position(|l| l.starts_with("pub const CHECKPOINT_LAYOUTS"))
    else {
        return text.to_owned();
    };
    // The statement as rustfmt leaves it: `&[]`, one line, or one entry per line.
    let Some(end) = (start..lines.len()).find(|&i| lines[i].trim_end().ends_with("];")) else {
        return text.to_owned();
    };
    let statement = lines[start..=end].join(" ");
    let mut entries: Vec<String> = statement
        .split("),")
        .filter_map(|part| {
            let at = part.find("(\"")?;
            let entry = part[at..]
                .trim()
                .trim_end_matches("];")
                .trim_end_matches(')');
            Some(format!("{entry})"))
        })
        .collect();
    let entry = format!("({mt:?}, family::to_loaded_layout::<{module}::Config>)");
    if !entries.contains(&entry) {
        entries.push(entry);
    }
    entries.sort();
    let mut out: Vec<String> = lines[..start].iter().map(|l| (*l).to_owned()).collect();
    out.push("pub const CHECKPOINT_LAYOUTS: &[(&str, Layout)] = &[".to_owned());
    out.extend(entries.iter().map(|e| format!("    {e},")));
    out.push("];".to_owned());
    out.extend(lines[end + 1..].iter().map(|l| (*l).to_owned()));
    out.join("\n") + "\n"
}

/// models/mod.rs with `module` declared and `mt` registered (both kept sorted).
pub fn registry_source(text: &str, mt: &str, module: &str) -> String {
    let mut lines: Vec<String> = text.lines().map(str::to_owned).collect();
    let decl = format!("pub mod {module};");
    if !lines.iter().any(|l| l == &decl) {
        let mods: Vec<usize> = (0..lines.len())
            .filter(|&i| lines[i].starts_with("pub mod "))
            .collect();
        let at = mods
            .iter()
            .copied()
            .find(|&i| lines[i].as_str() > decl.as_str())
            .unwrap_or_else(|| mods.last().map_or(0, |&i| i + 1));
        lines.insert(at, decl);
    }
    let entry = format!("    ({mt:?}, family::load::<{module}::Config>),");
    // rustfmt wraps a long entry over several lines, with a trailing comma: compare
    // without either.
    let squeezed = |s: &str| s.split_whitespace().collect::<String>().replace(",)", ")");
    if !squeezed(&lines.join("\n")).contains(&squeezed(&entry)) {
        if let Some(start) = lines
            .iter()
            .position(|l| l.starts_with("pub const REGISTRY"))
        {
            // rustfmt puts a short registry on one line: one entry per line first.
            if let Some((head, rest)) = lines[start].split_once("= &[") {
                if let Some(body) = rest.strip_suffix("];").filter(|b| !b.trim().is_empty()) {
                    let head = format!("{head}= &[");
                    let entries: Vec<String> = body
                        .split("),")
                        .map(str::trim)
                        .filter(|e| !e.is_empty())
                        .map(|e| {
                            format!("    {})", e.trim_end_matches(',').trim_end_matches(')')) + ","
                        })
                        .collect();
                    lines.splice(
                        start..=start,
                        std::iter::once(head)
                            .chain(entries)
                            .chain(std::iter::once("];".to_owned())),
                    );
                }
            }
            let end = (start..lines.len())
                .find(|&i| lines[i].trim_end().ends_with("];"))
                .unwrap_or(start);
            // Before the first entry that sorts after it, and above that entry's comment.
            let mut at = (start + 1..end)
                .find(|&i| lines[i].trim().starts_with('(') && lines[i].trim() > entry.trim())
                .unwrap_or(end);
            while at > start + 1 && lines[at - 1].trim().starts_with("//") {
                at -= 1;
            }
            lines.insert(at, entry);
        }
    }
    lines.join("\n") + "\n"
}

/// A cargo command with the environment this process had before `cargo run` added to it:
/// build scripts watch some of those variables (`LD_LIBRARY_PATH`), and a changed value
/// would rebuild half the dependency tree for nothing.
fn cargo(root: &Path) -> Command {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned()));
    cmd.current_dir(root);
    for (key, _) in std::env::vars_os() {
        let key = key.to_string_lossy().into_owned();
        let set_by_cargo_run = [
            "CARGO_PKG_",
            "CARGO_MANIFEST_",
            "CARGO_CRATE_",
            "CARGO_BIN_",
        ]
        .iter()
        .any(|p| key.starts_with(p))
            || key == "CARGO_PRIMARY_PACKAGE";
        if set_by_cargo_run {
            cmd.env_remove(&key);
        }
    }
    if let Some(paths) = std::env::var_os("LD_LIBRARY_PATH") {
        let target = std::env::var_os("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| root.join("target"));
        let kept: Vec<PathBuf> = std::env::split_paths(&paths)
            .filter(|p| !p.starts_with(&target) && !p.to_string_lossy().contains("/toolchains/"))
            .collect();
        match std::env::join_paths(kept) {
            Ok(v) if !v.is_empty() => {
                cmd.env("LD_LIBRARY_PATH", v);
            }
            _ => {
                cmd.env_remove("LD_LIBRARY_PATH");
            }
        }
    }
    cmd
}

/// Compiles the workspace with the new module and verifies it on its fixtures; also says
/// whether it compiled.
/// What `cargo xtask verify <type>` said of a module compiled into the zoo.
struct Verification {
    /// The layer-by-layer reports, one per fixture.
    reports: Vec<Report>,
    /// The quantization drift of every fixture at each bit width.
    drifts: Vec<Value>,
    /// Whether every check passed (the drift bounds included).
    passed: bool,
}

/// Builds the zoo with the generated module and verifies it in a process of its own (this
/// one was compiled without it); `None` if it does not compile.
fn verify_generated(root: &Path, mt: &str) -> anyhow::Result<Option<Verification>> {
    let out = root.join("target/port").join(mt).join("reports");
    let _ = std::fs::remove_dir_all(&out);
    let built = cargo(root)
        .args(["build", "--quiet", "-p", "xtask"])
        .status()?
        .success();
    if !built {
        return Ok(None);
    }
    let status = cargo(root)
        .args([
            "run", "--quiet", "-p", "xtask", "--", "verify", mt, "--json",
        ])
        .arg(&out)
        .status()?;
    if !status.success() {
        eprintln!(
            "port {mt}: `cargo xtask verify {mt}` failed (a new family has no quantization drift \
             bounds yet: they are measured next if its layers verify)"
        );
    }
    let read = |dir: &Path| -> anyhow::Result<Vec<String>> {
        let mut paths: Vec<PathBuf> = match std::fs::read_dir(dir) {
            Ok(entries) => entries.filter_map(|e| e.ok().map(|e| e.path())).collect(),
            Err(_) => Vec::new(),
        };
        paths.retain(|p| p.is_file());
        paths.sort();
        paths
            .iter()
            .map(|p| Ok(std::fs::read_to_string(p)?))
            .collect()
    };
    let reports = read(&out)?
        .iter()
        .map(|text| serde_json::from_str(text))
        .collect::<Result<_, _>>()?;
    let drifts = read(&out.join("drift"))?
        .iter()
        .map(|text| serde_json::from_str(text))
        .collect::<Result<_, _>>()?;
    Ok(Some(Verification {
        reports,
        drifts,
        passed: status.success(),
    }))
}

/// Gives a new family whose layers verify its quantization drift bounds, measured on its
/// fixtures ([`measured_bounds`]), in `mlx-port/src/quantization.rs`, where every seeded
/// quantizer fault the drift test seeds (wrong group size, dropped biases) fails them on
/// every fixture at both widths, as `tests/quantization_drift.rs` checks. Where ×1.25 of
/// the measured error does not stay below a faulted one, the bound goes between the two
/// ([`separating_bound`]); where a faulted error is no larger than the correct one, no
/// bound is added. Returns what the report says of it.
fn add_drift_bound(root: &Path, mt: &str, drifts: &[Value]) -> anyhow::Result<Option<String>> {
    let Some((mut bounds, measured)) = measured_bounds(drifts) else {
        return Ok(None);
    };
    let path = root.join("mlx-port/src/quantization.rs");
    let before = std::fs::read_to_string(&path)?;
    // The faulted errors do not depend on the bound: measured once, every fixture.
    let mut faulted = (f32::INFINITY, f32::INFINITY);
    for fault in ["group-size", "dropped-biases"] {
        let out = root
            .join("target/port")
            .join(mt)
            .join(format!("fault-{fault}"));
        let _ = std::fs::remove_dir_all(&out);
        cargo(root)
            .args(["run", "--quiet", "-p", "xtask", "--", "verify", mt])
            .args(["--quantization-only", "--fault", fault, "--json"])
            .arg(&out)
            .stdout(std::process::Stdio::null())
            .status()?;
        let mut seen = 0;
        for entry in std::fs::read_dir(out.join("drift"))? {
            let d: Value = serde_json::from_str(&std::fs::read_to_string(entry?.path())?)?;
            let (Some(error), Some(bits)) = (d["logits_rel_error"].as_f64(), d["bits"].as_i64())
            else {
                continue;
            };
            seen += 1;
            match bits {
                8 => faulted.0 = faulted.0.min(error as f32),
                4 => faulted.1 = faulted.1.min(error as f32),
                _ => {}
            }
        }
        if seen == 0 {
            bail!("the `{fault}` fault run of {mt} recorded no drift");
        }
    }
    let mut between = Vec::new();
    for (bound, correct, worst_fault, bits) in [
        (&mut bounds.0, measured.0, faulted.0, 8),
        (&mut bounds.1, measured.1, faulted.1, 4),
    ] {
        if *bound < worst_fault {
            continue;
        }
        let Some(b) = separating_bound(correct, worst_fault) else {
            return Ok(Some(format!(
                "quantization drift: measured {} (8-bit) and {} (4-bit) relative logits error, \
                 but a seeded quantizer fault gives {worst_fault} at {bits} bits, no more than \
                 {correct}: no bound added",
                measured.0, measured.1
            )));
        };
        *bound = b;
        between.push(format!(
            "{bits}-bit {b} lies between the largest correct error {correct} and the smallest \
             faulted one {worst_fault} (×1.25 would not stay below it)"
        ));
    }
    let Some(after) = with_bound(&before, mt, bounds, measured) else {
        bail!("{}: no BOUNDS table to add {mt} to", path.display());
    };
    std::fs::write(&path, after)?;
    eprintln!(
        "port {mt}: quantization drift bounds {} (8-bit), {} (4-bit) added to {}",
        bounds.0,
        bounds.1,
        path.display()
    );
    Ok(Some(format!(
        "quantization drift bounds {} (8-bit) and {} (4-bit) added to mlx-port's BOUNDS: the \
         fixtures' largest relative logits error ({}, {}) × 1.25{}; a quantizer with the wrong \
         group size or dropped biases fails them on every fixture (smallest faulted errors {}, \
         {})",
        bounds.0,
        bounds.1,
        measured.0,
        measured.1,
        if between.is_empty() {
            String::new()
        } else {
            format!(", except: {}", between.join("; "))
        },
        faulted.0,
        faulted.1
    )))
}

/// A bound strictly between the largest correct error and the smallest faulted one: their
/// geometric mean rounded up to two significant digits, or `None` where that does not fit
/// between them.
fn separating_bound(measured: f32, faulted: f32) -> Option<f32> {
    let x = (f64::from(measured) * f64::from(faulted)).sqrt();
    let unit = 10f64.powf(x.log10().floor() - 1.0);
    let b = ((x / unit - 1e-6).ceil() * unit) as f32;
    (b > measured && b < faulted).then_some(b)
}

/// A new family's quantization drift bounds (8-bit, 4-bit) from its fixtures' measured
/// drift, as every family's were set: the largest relative logits error × 1.25, rounded up
/// to two significant digits. `None` if a fixture's conversion changed a dtype (which no
/// bound excuses) or nothing was measured.
fn measured_bounds(drifts: &[Value]) -> Option<((f32, f32), (f32, f32))> {
    let mut worst = (0.0f32, 0.0f32);
    for d in drifts {
        if d["dtype_changes"].as_array().is_some_and(|c| !c.is_empty()) {
            return None;
        }
        let error = d["logits_rel_error"].as_f64()? as f32;
        match d["bits"].as_i64()? {
            8 => worst.0 = worst.0.max(error),
            4 => worst.1 = worst.1.max(error),
            _ => {}
        }
    }
    if worst.0 <= 0.0 || worst.1 <= 0.0 {
        return None;
    }
    let bound = |m: f32| {
        let x = f64::from(m) * 1.25;
        let unit = 10f64.powf(x.log10().floor() - 1.0);
        // (Less a hair: f32 measurements widened to f64 are not exact.)
        ((x / unit - 1e-6).ceil() * unit) as f32
    };
    Some(((bound(worst.0), bound(worst.1)), worst))
}

/// `source` (mlx-port/src/quantization.rs) with `mt`'s bounds in `BOUNDS`, in name order,
/// its comment aligned with the others'.
fn with_bound(source: &str, mt: &str, bounds: (f32, f32), measured: (f32, f32)) -> Option<String> {
    let start = source.find("pub const BOUNDS")?;
    let end = start + source[start..].find("\n];")?;
    let mut lines: Vec<String> = source[start..end].lines().map(str::to_owned).collect();
    let column = lines.iter().find_map(|l| l.find("// measured"))?;
    let name_of = |l: &str| {
        l.trim_start()
            .strip_prefix("(\"")
            .and_then(|r| r.split('"').next().map(str::to_owned))
    };
    // The family's bounds measured before (on other fixtures) give way.
    lines.retain(|l| name_of(l).as_deref() != Some(mt));
    // `{:?}` keeps a whole bound a float literal (`1.0`, not `1`).
    let entry = format!("    ({mt:?}, {:?}, {:?}),", bounds.0, bounds.1);
    // Three significant digits, as the other entries' comments.
    let sig3 = |x: f32| {
        let decimals = (2 - f64::from(x).log10().floor() as i32).max(0) as usize;
        let text = format!("{x:.decimals$}");
        text.trim_end_matches('0').trim_end_matches('.').to_owned()
    };
    let line = format!(
        "{entry:<width$}// measured {}, {}",
        sig3(measured.0),
        sig3(measured.1),
        width = column.max(entry.len() + 1)
    );
    let at = lines
        .iter()
        .skip(1)
        .position(|l| name_of(l).is_some_and(|n| n.as_str() > mt))
        .map_or(lines.len(), |i| i + 1);
    lines.insert(at, line);
    Some(format!(
        "{}{}{}",
        &source[..start],
        lines.join("\n"),
        &source[end..]
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Where ×1.25 of the correct error would not stay below a faulted one, the bound goes
    /// between them (granitemoe_swa at 4 bits: correct 0.971 on `sliding`, a wrong group
    /// size 1.14 on `options`); where nothing fits between, there is none.
    #[test]
    fn a_bound_between_correct_and_faulted_errors() {
        let b = separating_bound(0.971, 1.14).unwrap();
        assert!((b - 1.1).abs() < 1e-6, "{b}");
        let b = separating_bound(0.5, 0.53).unwrap();
        assert!(b > 0.5 && b < 0.53, "{b}");
        assert!(separating_bound(0.971, 0.98).is_none());
        assert!(separating_bound(1.0, 1.0).is_none());
        assert!(separating_bound(1.2, 1.1).is_none());
    }

    #[test]
    fn a_new_familys_drift_bounds_are_its_largest_measured_error_times_one_and_a_quarter() {
        let drift = |fixture: &str, bits: i64, error: f64| {
            serde_json::json!({"fixture": fixture, "bits": bits, "logits_rel_error": error,
                               "dtype_changes": []})
        };
        // cwm's measured drift gave its bounds (0.035, 0.65) by hand.
        let drifts = [
            drift("cwm/default", 8, 0.0266),
            drift("cwm/default", 4, 0.518),
            drift("cwm/options", 8, 0.0275),
            drift("cwm/options", 4, 0.47),
        ];
        let (bounds, measured) = measured_bounds(&drifts).unwrap();
        assert_eq!(measured, (0.0275, 0.518));
        assert!((bounds.0 - 0.035).abs() < 1e-7 && (bounds.1 - 0.65).abs() < 1e-7);
        // 0.08 × 1.25 is exactly 0.1: not rounded up past it.
        let (bounds, _) = measured_bounds(&[drift("a", 8, 0.08), drift("a", 4, 0.4)]).unwrap();
        assert!((bounds.0 - 0.1).abs() < 1e-7 && (bounds.1 - 0.5).abs() < 1e-7);
        // A conversion that changed a dtype gets no bound, nor one never measured at 4 bits.
        let mut changed = drift("a", 8, 0.01);
        changed["dtype_changes"] = serde_json::json!(["layers.0: float32 → bfloat16"]);
        assert!(measured_bounds(&[changed, drift("a", 4, 0.2)]).is_none());
        assert!(measured_bounds(&[drift("a", 8, 0.01)]).is_none());

        let source = "//! x\npub const BOUNDS: &[(&str, f32, f32)] = &[\n    (\"apertus\", 0.027, 0.5),           // measured 0.0215, 0.398\n    (\"cohere\", 0.023, 0.38),           // measured 0.0184, 0.301\n];\n";
        let added = with_bound(source, "biogpt", (0.017, 0.29), (0.0132, 0.226)).unwrap();
        assert_eq!(
            added,
            "//! x\npub const BOUNDS: &[(&str, f32, f32)] = &[\n    (\"apertus\", 0.027, 0.5),           // measured 0.0215, 0.398\n    (\"biogpt\", 0.017, 0.29),           // measured 0.0132, 0.226\n    (\"cohere\", 0.023, 0.38),           // measured 0.0184, 0.301\n];\n"
        );
        let last = with_bound(source, "zamba", (0.02, 0.3), (0.016, 0.24)).unwrap();
        assert!(
            last.ends_with(
                "    (\"zamba\", 0.02, 0.3),              // measured 0.016, 0.24\n];\n"
            ),
            "{last}"
        );
        // Measured again, a family's bounds replace its old entry.
        let again = with_bound(&added, "biogpt", (0.02, 0.3), (0.016, 0.24)).unwrap();
        assert_eq!(again.matches("biogpt").count(), 1, "{again}");
        assert!(again.contains("(\"biogpt\", 0.02, 0.3),"), "{again}");
        // A bound that rounds to a whole number stays an f32 literal.
        let whole = with_bound(source, "granitemoe_swa", (0.13, 1.0), (0.0981, 0.796)).unwrap();
        assert!(
            whole.contains("(\"granitemoe_swa\", 0.13, 1.0),"),
            "{whole}"
        );
    }

    const MOD_RS: &str = "pub mod llama;\npub mod qwen3;\n\npub const REGISTRY: &[(&str, Loader)] = &[\n    (\"llama\", family::load::<llama::Config>),\n    (\"qwen3\", family::load::<qwen3::Config>),\n];\n";

    #[test]
    fn conv1d_families_get_a_checkpoint_layout_entry_sorted_and_once() {
        let empty = "pub const CHECKPOINT_LAYOUTS: &[(&str, Layout)] = &[];\n";
        let once = layout_source(empty, "openai-gpt", "openai_gpt");
        assert_eq!(
            once,
            "pub const CHECKPOINT_LAYOUTS: &[(&str, Layout)] = &[\n    (\"openai-gpt\", family::to_loaded_layout::<openai_gpt::Config>),\n];\n"
        );
        assert_eq!(layout_source(&once, "openai-gpt", "openai_gpt"), once);
        // rustfmt writes one entry on the line after the name.
        let formatted = "pub const CHECKPOINT_LAYOUTS: &[(&str, Layout)] =\n    &[(\"openai-gpt\", family::to_loaded_layout::<openai_gpt::Config>)];\nfn after() {}\n";
        assert_eq!(
            layout_source(formatted, "openai-gpt", "openai_gpt"),
            once.clone() + "fn after() {}\n"
        );
        let two = layout_source(formatted, "imagegpt", "imagegpt");
        assert!(two.ends_with("];\nfn after() {}\n"), "{two}");
        assert!(two.contains("= &[\n    (\"imagegpt\", family::to_loaded_layout::<imagegpt::Config>),\n    (\"openai-gpt\""));
    }

    #[test]
    fn registering_keeps_modules_and_entries_sorted_and_is_idempotent() {
        let once = registry_source(MOD_RS, "gemma", "gemma");
        assert_eq!(
            once,
            "pub mod gemma;\npub mod llama;\npub mod qwen3;\n\npub const REGISTRY: &[(&str, Loader)] = &[\n    (\"gemma\", family::load::<gemma::Config>),\n    (\"llama\", family::load::<llama::Config>),\n    (\"qwen3\", family::load::<qwen3::Config>),\n];\n"
        );
        assert_eq!(registry_source(&once, "gemma", "gemma"), once);
        let one_line = "pub mod llama;\n\npub const REGISTRY: &[(&str, Loader)] = &[(\"llama\", family::load::<llama::Config>), (\"mistral\", family::load::<llama::Config>)];\n";
        assert_eq!(
            registry_source(one_line, "gemma", "gemma"),
            "pub mod gemma;\npub mod llama;\n\npub const REGISTRY: &[(&str, Loader)] = &[\n    (\"gemma\", family::load::<gemma::Config>),\n    (\"llama\", family::load::<llama::Config>),\n    (\"mistral\", family::load::<llama::Config>),\n];\n"
        );
        // A commented entry keeps its comment: a new one goes above both, not between.
        let commented = "pub mod llama;\n\npub const REGISTRY: &[(&str, Loader)] = &[\n    (\"gpt2\", family::load::<gpt2::Config>),\n    // Llama's comment.\n    (\"llama\", family::load::<llama::Config>),\n];\n";
        let inserted = registry_source(commented, "granite", "granite");
        assert!(
            inserted.contains("    (\"granite\", family::load::<granite::Config>),\n    // Llama's comment.\n    (\"llama\""),
            "{inserted}"
        );
        let after = registry_source(commented, "mistral", "mistral");
        assert!(
            after.contains("    (\"llama\", family::load::<llama::Config>),\n    (\"mistral\""),
            "{after}"
        );
        // An entry rustfmt wrapped (a long name) is found all the same: no second one.
        let wrapped = "pub mod gpt_neox_japanese;\n\npub const REGISTRY: &[(&str, Loader)] = &[\n    (\n        \"gpt_neox_japanese\",\n        family::load::<gpt_neox_japanese::Config>,\n    ),\n];\n";
        assert_eq!(
            registry_source(wrapped, "gpt_neox_japanese", "gpt_neox_japanese"),
            wrapped
        );
        let last = registry_source(MOD_RS, "starcoder2", "starcoder2");
        assert!(last.contains("pub mod qwen3;\npub mod starcoder2;\n"));
        assert!(last.contains("(\"qwen3\", family::load::<qwen3::Config>),\n    (\"starcoder2\", family::load::<starcoder2::Config>),\n];"));
    }
}

/// The generator on the committed introspection and fixtures: no Python involved.
#[cfg(test)]
mod generator_tests {
    use super::*;

    /// A seeded fault: its name and what it breaks.
    type Fault<T> = (&'static str, fn(&mut T));

    /// The committed introspection of `mt`.
    pub(super) fn facts(mt: &str) -> Value {
        let path = workspace_root().join(format!("tests/fixtures/{mt}/introspection.json"));
        serde_json::from_str(&std::fs::read_to_string(path).expect("committed facts"))
            .expect("facts are JSON")
    }

    /// The committed fixtures of `mt`.
    pub(super) fn fixtures(mt: &str) -> Vec<Fixture> {
        fixture::discover(&workspace_root().join("tests/fixtures").join(mt))
            .iter()
            .map(|d| Fixture::load(d).expect("fixture loads"))
            .collect()
    }

    /// Search, generate and format, then compare with the committed module, which the
    /// fixture tests verify through the registry.
    fn regenerate(mt: &str) -> (Plan, Choice, String) {
        let facts = facts(mt);
        let module = module_name(mt);
        let mut plan = plan::plan(&facts, &module);
        assert!(plan.gaps.is_empty(), "{mt}: gaps {:?}", plan.gaps);
        let search = search(&plan, &fixtures(mt)).expect("search runs");
        let choice = search
            .chosen
            .unwrap_or_else(|| panic!("{mt}: no candidate passes: {:?}", search.tried));
        plan.settle(&choice);
        let source =
            rustfmt(&codegen::module_source(&plan, &choice)).expect("rustfmt accepts the module");
        let committed = std::fs::read_to_string(
            workspace_root().join(format!("mlx-models/src/models/{module}.rs")),
        )
        .expect("committed module");
        assert!(
            source == committed,
            "{mt}: the generator no longer writes the committed module:\n{}",
            diff(&source, &committed).unwrap_or_default()
        );
        (plan, choice, source)
    }

    /// The ModernBERT decoder: its structure read from the recorded facts (no edit), and each
    /// decision, undone, fails the committed fixtures at the tensor it changes.
    #[test]
    fn modernbert_decoder_regenerates_exactly_and_each_structure_decision_is_checked() {
        let (plan, choice, source) = regenerate("modernbert-decoder");
        // Layer 0's `attn_norm` is an Identity, the other layers' a LayerNorm.
        assert!(plan.first_layer_no_input_norm);
        assert!(plan
            .renames
            .contains(&("attn_norm".to_owned(), "input_layernorm".to_owned())));
        // `lm_head` is a dense + GELU + norm head, `decoder` the output layer.
        assert_eq!(
            plan.prediction_head,
            Some(plan::HeadPlan {
                bias: plan::Flag::Field("classifier_bias".into()),
                activation_field: "classifier_activation".into(),
            })
        );
        assert!(plan
            .prefix_renames
            .contains(&("lm_head.dense".to_owned(), "head.dense".to_owned())));
        // `Wi` is twice as wide as `Wo` takes in: a GLU in one projection.
        assert_eq!(
            plan.mlp_layout,
            mlx_models::transformer::MlpLayout::FusedGated
        );
        // The nested embedding and its norm.
        assert!(plan.embedding_layernorm);
        // The window is half of `local_attention`; the Hub's RoPE keys and layer period.
        assert_eq!(
            plan.divided_aliases,
            vec![("sliding_window".to_owned(), "local_attention".to_owned(), 2)]
        );
        assert!(plan
            .aliases
            .contains(&("rope_theta".to_owned(), "global_rope_theta".to_owned())));
        assert_eq!(
            plan.rope,
            Some(plan::RopeRule::PerLayerType {
                local_base: Some("local_rope_theta".into())
            })
        );
        assert_eq!(
            plan.layer_period.as_deref(),
            Some("global_attn_every_n_layers")
        );
        assert!(source.contains("LayerRule::EveryNthFromFirst(self.global_attn_every_n_layers)"));
        assert!(source.contains("first.no_input_norm = true"));
        // `decoder_bias` switches the output layer's bias (the flag probe).
        assert_eq!(plan.lm_head_bias_field.as_deref(), Some("decoder_bias"));
        // Each decision undone: the fixtures tell.
        let fixtures = fixtures("modernbert-decoder");
        let faults: [Fault<Plan>; 6] = [
            ("first layer normed", |p| {
                p.first_layer_no_input_norm = false
            }),
            ("output layer without its bias", |p| {
                p.lm_head_bias_field = None;
                p.lm_head_bias = false;
            }),
            ("the Hub's local RoPE base not read", |p| {
                p.rope = Some(plan::RopeRule::PerLayerType { local_base: None })
            }),
            ("no prediction head", |p| p.prediction_head = None),
            ("head without its bias flag", |p| {
                p.prediction_head.as_mut().unwrap().bias = plan::Flag::Never
            }),
            ("window not halved", |p| p.divided_aliases.clear()),
        ];
        for (fault, apply) in faults {
            let mut broken = plan.clone();
            apply(&mut broken);
            broken.choices = vec![choice.clone()];
            let failed = search(&broken, &fixtures).expect("search runs");
            assert!(failed.chosen.is_none(), "{fault}");
            eprintln!("modernbert-decoder, {fault}: {}", failed.tried[0].1[0]);
        }
    }

    /// The structure decisions of the ModernBERT decoder on recorded facts, changed: an
    /// Identity norm on another layer than the first, a head whose norm runs before its
    /// activation, and an up projection as wide as the down projection takes in are gaps or
    /// other layouts, never a silent guess.
    #[test]
    fn modernbert_decoder_structure_facts_changed_change_the_decisions() {
        let facts = facts("modernbert-decoder");
        let mut identity_elsewhere = facts.clone();
        for m in identity_elsewhere["modules"].as_array_mut().unwrap() {
            if m["name"] == "model.layers.1.attn_norm" {
                m["class"] = "Identity".into();
            }
            if m["name"] == "model.layers.0.attn_norm" {
                m["class"] = "LayerNorm".into();
            }
        }
        let p = plan::plan(&identity_elsewhere, "modernbert_decoder");
        assert!(!p.first_layer_no_input_norm);
        assert!(
            p.gaps.iter().any(|g| g.contains("Identity on layers [1]")),
            "{:?}",
            p.gaps
        );
        let mut head_reordered = facts.clone();
        head_reordered["prediction_head"]["calls"] = serde_json::json!([
            ["dense", "Linear"],
            ["norm", "LayerNorm"],
            ["act", "GELUActivation"]
        ]);
        let p = plan::plan(&head_reordered, "modernbert_decoder");
        assert_eq!(p.prediction_head, None);
        assert!(p
            .gaps
            .iter()
            .any(|g| g.contains("not as dense, activation, norm")));
        // A period key whose probes do not follow the rule is no period.
        let mut other_rule = facts.clone();
        other_rule["legacy_layer_probes"]["global_attn_every_n_layers"][0]["layer_types"][1] =
            "full_attention".into();
        let p = plan::plan(&other_rule, "modernbert_decoder");
        assert_eq!(p.layer_period, None);
        assert!(p
            .refused_values
            .contains(&("global_attn_every_n_layers".to_owned(), 3)));
        let mut params = std::collections::BTreeMap::new();
        params.insert(
            "model.layers.0.mlp.up_proj.weight".to_owned(),
            vec![256, 64],
        );
        params.insert(
            "model.layers.0.mlp.down_proj.weight".to_owned(),
            vec![64, 128],
        );
        assert!(plan::fused_glu(&params));
        params.insert(
            "model.layers.0.mlp.down_proj.weight".to_owned(),
            vec![64, 256],
        );
        assert!(!plan::fused_glu(&params));
    }

    #[test]
    fn qwen3_is_regenerated_exactly_with_per_head_qk_norm() {
        let (plan, choice, source) = regenerate("qwen3");
        assert_eq!(plan.qk_norm, mlx_models::transformer::QkNorm::PerHead);
        assert!(!choice.norm_plus_one && choice.embedding_scale == plan::Scalar::None);
        assert!(source.contains("qk_norm: QkNorm::PerHead"));
    }

    #[test]
    fn gemma_is_regenerated_exactly_with_offset_norms_and_scaled_embeddings() {
        let (plan, choice, source) = regenerate("gemma");
        // Only the fixtures can tell these two apart from Llama's conventions.
        assert!(choice.norm_plus_one);
        assert_eq!(choice.embedding_scale, plan::Scalar::SqrtHidden);
        // GemmaConfig names it `hidden_act`, and reads a Hub config's `gelu` as tanh GELU.
        assert_eq!(plan.act_field, "hidden_act");
        assert!(choice.gelu_as_tanh);
        assert!(source.contains("NormKind::RmsPlusOne"));
    }

    #[test]
    fn latent_attention_is_read_from_its_projections_and_youtu_regenerates_exactly() {
        let (plan, _, source) = regenerate("youtu");
        assert_eq!(
            plan.mla,
            Some(plan::MlaPlan {
                interleave_field: true
            })
        );
        assert!(source.contains("pub mla: MlaConfig"));
        assert!(source.contains(".with_latent_attention(self.mla.settings(d, config)?)"));
        assert!(source.contains("self.mla.rope(d, "));
        // The latent fields are MlaConfig's, not the module's own.
        assert!(!source.contains("pub kv_lora_rank"));
    }

    #[test]
    fn minicpm3_regenerates_exactly_with_latent_attention_and_mup_scales() {
        let (plan, choice, _) = regenerate("minicpm3");
        assert_eq!(
            plan.mla,
            Some(plan::MlaPlan {
                interleave_field: false
            })
        );
        // No `rope_interleave`: the fixtures chose halves.
        assert!(!choice.rope_traditional);
        assert_eq!(
            choice.embedding_scale,
            plan::Scalar::Field("scale_emb".into())
        );
        assert_eq!(
            plan.residual_scale,
            plan::Scalar::FieldOverSqrtLayers("scale_depth".into())
        );
        assert_eq!(
            plan.logits_scale,
            plan::Scalar::FieldOverHidden("dim_model_base".into())
        );
    }

    /// DeepSeek-V2: latent attention with a plain `q_proj` (its fixtures' `q_lora_rank` is
    /// null), `shared_experts` read as the block's shared expert, and its routing read from
    /// the routing probes: softmax scores, group-limited (by each group's best) only when
    /// `topk_method` is `group_limited_greedy`, never renormalized whatever
    /// `norm_topk_prob` says, scaled by `routed_scaling_factor`.
    #[test]
    fn deepseek_v2_routing_is_read_from_what_its_router_computed() {
        use routing::{GroupScore, Groups, Routing, Rule, Scores};
        let facts = facts("deepseek_v2");
        let mut plan = plan::plan(&facts, "deepseek_v2");
        assert!(plan.mla.is_some());
        assert!(plan.renames.contains(&(
            "mlp.shared_experts".to_owned(),
            "mlp.shared_expert".to_owned()
        )));
        assert!(plan.gaps.is_empty(), "{:?}", plan.gaps);
        let moe = plan.moe.clone().expect("experts");
        assert_eq!(moe.shared_expert, Some(false));
        assert_eq!(
            moe.routing,
            Some(Routing {
                scores: Scores::Softmax,
                correction_bias: None,
                groups: Groups::ByField {
                    field: "topk_method".into(),
                    values: vec![
                        ("greedy".into(), None),
                        ("group_limited_greedy".into(), Some(GroupScore::Max)),
                    ],
                },
                normalize: Rule::Never,
                scaled_by: Some("routed_scaling_factor".into()),
                scores_by: None,
            })
        );
        assert!(moe.dense_layers && moe.layer_types_dense_prefix.is_none());
        // Its fixtures (group-limited, scaled by 16) verify it...
        let fixtures = fixtures("deepseek_v2");
        let found = search(&plan, &fixtures).expect("search runs");
        let choice = found.chosen.expect("a candidate passes every fixture");
        // ...and each routing option left out fails at the first sparse layer.
        let faults: [Fault<Routing>; 2] = [
            ("scale ignored", |r| r.scaled_by = None),
            ("groups ignored", |r| r.groups = Groups::Fixed(None)),
        ];
        for (fault, apply) in faults {
            let mut broken = plan.clone();
            apply(broken.moe.as_mut().unwrap().routing.as_mut().unwrap());
            broken.choices = vec![choice.clone()];
            let failed = search(&broken, &fixtures).expect("search runs");
            assert!(failed.chosen.is_none(), "{fault}");
            let failure = &failed.tried[0].1[0];
            eprintln!("deepseek_v2, {fault}: {failure}");
            assert!(
                failure.contains("first bad tensor `layers.1`"),
                "{fault}: {failure}"
            );
        }
        plan.settle(&choice);
        let source = codegen::module_source(&plan, &choice);
        assert!(source.contains("\"group_limited_greedy\" => Some(ExpertGroups {"));
        assert!(source.contains("normalize: false"));
    }

    /// A router whose recorded weights no routing reproduces (here one weight of one probe
    /// halved) is a gap that says so, not a guess.
    #[test]
    fn routing_no_rule_reproduces_is_a_gap() {
        let mut facts = facts("deepseek_v2");
        let w = &mut facts["routing_probes"][1]["weights"][0][0];
        *w = serde_json::json!(w.as_f64().unwrap() / 2.0);
        let plan = plan::plan(&facts, "deepseek_v2");
        assert!(plan.moe.expect("experts").routing.is_none());
        assert!(
            plan.gaps
                .iter()
                .any(|g| g.contains("match no routing the block computes")),
            "{:?}",
            plan.gaps
        );
    }

    /// GLM-4.7-Flash: DeepSeek-V3's routing (sigmoid scores chosen with the correction
    /// bias among the best groups by their two best, renormalized when `norm_topk_prob`,
    /// scaled) read from the probes, and its sparse layers from `mlp_layer_types`, whose
    /// derived default (first layer dense) the class showed for 12 layers.
    #[test]
    fn glm4_moe_lite_routing_and_mlp_layer_types_are_read_and_verify() {
        use routing::{GroupScore, Groups, Routing, Rule, Scores};
        let facts = facts("glm4_moe_lite");
        let plan = plan::plan(&facts, "glm4_moe_lite");
        assert!(plan.gaps.is_empty(), "{:?}", plan.gaps);
        let moe = plan.moe.clone().expect("experts");
        assert_eq!(
            moe.routing,
            Some(Routing {
                scores: Scores::Sigmoid,
                correction_bias: Some("e_score_correction_bias".into()),
                groups: Groups::Fixed(Some(GroupScore::TopTwoSum)),
                normalize: Rule::Field("norm_topk_prob".into()),
                scaled_by: Some("routed_scaling_factor".into()),
                scores_by: None,
            })
        );
        assert_eq!(moe.layer_types_dense_prefix, Some(1));
        let fixtures = fixtures("glm4_moe_lite");
        let found = search(&plan, &fixtures).expect("search runs");
        let choice = found.chosen.expect("a candidate passes every fixture");
        let faults: [Fault<plan::MoePlan>; 4] = [
            ("scale ignored", |m| {
                m.routing.as_mut().unwrap().scaled_by = None
            }),
            ("correction bias ignored", |m| {
                m.routing.as_mut().unwrap().correction_bias = None
            }),
            ("softmax scores", |m| {
                m.routing.as_mut().unwrap().scores = Scores::Softmax
            }),
            ("every layer sparse", |m| m.layer_types_dense_prefix = None),
        ];
        for (fault, apply) in faults {
            let mut broken = plan.clone();
            apply(broken.moe.as_mut().unwrap());
            broken.choices = vec![choice.clone()];
            let failed = search(&broken, &fixtures).expect("search runs");
            assert!(failed.chosen.is_none(), "{fault}");
            let failure = &failed.tried[0].1[0];
            eprintln!("glm4_moe_lite, {fault}: {failure}");
        }
    }

    /// dots1, ported with no edit: the routing of DeepSeek-V3 on ordinary attention, its
    /// sliding layers from `max_window_layers` whenever `sliding_window` is set.
    #[test]
    fn dots1_regenerates_exactly_with_grouped_sigmoid_routing() {
        let (plan, _, source) = regenerate("dots1");
        let routing = plan.moe.and_then(|m| m.routing).expect("routing");
        assert_eq!(routing.scores, routing::Scores::Sigmoid);
        assert_eq!(
            plan.layer_rule,
            mlx_models::family::LayerRule::FromMaxWindowLayersWhenSet
        );
        // DeepSeek-V3's routing is the shared config's own.
        assert!(source.contains("self.moe.grouped_sigmoid_router(config)?"));
        // The renormalization the `routing` fixture flips, seeded: always off.
        let mut broken = plan::plan(&facts("dots1"), "dots1");
        let fixtures = fixtures("dots1");
        let choice = search(&broken, &fixtures)
            .expect("runs")
            .chosen
            .expect("passes");
        broken
            .moe
            .as_mut()
            .unwrap()
            .routing
            .as_mut()
            .unwrap()
            .normalize = routing::Rule::Never;
        broken.choices = vec![choice];
        let failed = search(&broken, &fixtures).expect("search runs");
        assert!(failed.chosen.is_none());
        eprintln!("dots1, renormalization ignored: {}", failed.tried[0].1[0]);
    }

    #[test]
    fn latent_attention_that_the_block_cannot_load_is_a_gap() {
        // A kv_b_proj one row short: the latent block would load another shape.
        let mut facts = facts("youtu");
        for p in facts["parameters"].as_array_mut().expect("parameters") {
            if p["name"] == "model.layers.0.self_attn.kv_b_proj.weight" {
                let rows = p["shape"][0].as_i64().expect("rows");
                p["shape"][0] = Value::from(rows - 1);
            }
        }
        let plan = plan::plan(&facts, "youtu");
        assert!(
            plan.gaps
                .iter()
                .any(|g| g.contains("`self_attn.kv_b_proj.weight`")),
            "{:?}",
            plan.gaps
        );
        // A flag that puts a bias on kv_b_proj, which the latent block never has.
        let mut facts = self::facts("youtu");
        for p in facts["flag_probes"].as_array_mut().expect("probes") {
            if p["field"] == "attention_bias" {
                p["added"]
                    .as_array_mut()
                    .expect("added")
                    .push(Value::from("model.layers.0.self_attn.kv_b_proj.bias"));
            }
        }
        let plan = plan::plan(&facts, "youtu");
        assert!(
            plan.gaps.iter().any(|g| g.contains("switches the biases")),
            "{:?}",
            plan.gaps
        );
    }

    /// The port tool and the zoo share one `LayerRule`: on every family with committed facts
    /// the plan derives (from Transformers' probes, through the zoo's own evaluation) the rule
    /// its module passes to the layers.
    #[test]
    fn the_derived_layer_rule_is_the_one_each_module_uses() {
        let root = workspace_root().join("tests/fixtures");
        let mut checked = 0;
        for entry in std::fs::read_dir(&root).expect("fixtures root") {
            let dir = entry.expect("fixtures root").path();
            if !dir.join("introspection.json").is_file() {
                continue;
            }
            let mt = dir.file_name().unwrap().to_string_lossy().into_owned();
            // A family the tool could not port yet has facts but no module.
            if !mlx_models::models::supported_model_types().contains(&mt.as_str()) {
                continue;
            }
            let plan = plan::plan(&facts(&mt), &module_name(&mt));
            let module = std::fs::read_to_string(
                workspace_root().join(format!("mlx-models/src/models/{}.rs", module_name(&mt))),
            )
            .expect("committed module");
            // A module written by hand (where the generator stopped when it was written:
            // GPT-2) composes the blocks its own way; a recurrent-only one has no attention
            // layers.
            if !plan.gaps.is_empty()
                || plan.recurrent.is_some()
                || !module.contains("Generated by `cargo xtask port")
            {
                continue;
            }
            let expr = codegen::plan_layer_rule_expr(&plan);
            // rustfmt may break the call over lines.
            let compact: String = module.split_whitespace().collect();
            // A module that takes another family's settings (GLM-4.7-Flash: DeepSeek-V3's)
            // reads its layers there.
            if !compact.contains("d.layers(") && !compact.contains("letrule=") {
                continue;
            }
            let call: String = format!("d.layers({expr},").split_whitespace().collect();
            // or through a variable (Qwen2-MoE's `let rule = …;`)
            let named = format!("letrule={expr};");
            assert!(
                compact.contains(&call)
                    || compact.contains(&named) && compact.contains("d.layers(rule,"),
                "{mt}: the plan derives {expr}"
            );
            checked += 1;
        }
        assert!(checked >= 10, "{checked} families with facts");
    }

    /// GPT-2 and GPT-NeoX keep the decoder under other names (`transformer.h`,
    /// `gpt_neox.layers`) and call their attention block otherwise (`attn`, `attention`),
    /// with one fused q/k/v projection: found by structure and from the recorded call
    /// trace. What no generated module reads (learned positions, Conv1D) is a gap.
    #[test]
    fn gpt_families_are_read_by_structure_not_by_name() {
        let pairs = |v: &[(&str, &str)]| -> Vec<(String, String)> {
            v.iter()
                .map(|(a, b)| ((*a).to_owned(), (*b).to_owned()))
                .collect()
        };
        let gpt2 = plan::plan(&facts("gpt2"), "gpt2");
        // Checkpoints of the base model alone (the Hub's) have no `transformer.` prefix.
        assert_eq!(
            gpt2.prefix_renames,
            pairs(&[
                ("transformer.wte", "model.embed_tokens"),
                ("transformer.wpe", "model.embed_positions"),
                ("transformer.h", "model.layers"),
                ("transformer.ln_f", "model.norm"),
                ("wte", "model.embed_tokens"),
                ("wpe", "model.embed_positions"),
                ("h", "model.layers"),
                ("ln_f", "model.norm"),
            ])
        );
        assert_eq!(
            gpt2.renames,
            pairs(&[
                ("ln_1", "input_layernorm"),
                ("ln_2", "post_attention_layernorm"),
                ("attn.c_attn", "self_attn.qkv_proj"),
                ("attn.c_proj", "self_attn.o_proj"),
                ("attn", "self_attn"),
            ])
        );
        assert!(gpt2.qkv_fused);
        // Learned positions from row 0, the Conv1D projections transposed, the config
        // read under GPT2Config's own names (its attribute_map; `n_inner` from the width
        // probe, null standing for 4 × hidden), the attention scale as measured.
        assert!(gpt2.gaps.is_empty(), "{:?}", gpt2.gaps);
        assert_eq!(gpt2.learned_positions, Some(0));
        assert_eq!(
            gpt2.conv1d,
            [
                "self_attn.qkv_proj",
                "self_attn.o_proj",
                "mlp.c_fc",
                "mlp.c_proj"
            ]
        );
        assert_eq!(
            gpt2.aliases,
            pairs(&[
                ("hidden_size", "n_embd"),
                ("intermediate_size", "n_inner"),
                ("num_hidden_layers", "n_layer"),
                ("num_attention_heads", "n_head"),
                ("max_position_embeddings", "n_positions"),
            ])
        );
        assert_eq!(gpt2.intermediate_per_hidden, Some(4));
        assert_eq!(
            gpt2.attention_scale,
            plan::Scalar::OneUnless("scale_attn_weights".to_owned())
        );
        assert!(!gpt2.refused.iter().any(|(f, _)| f == "scale_attn_weights"));

        let neox = plan::plan(&facts("gpt_neox"), "gpt_neox");
        assert_eq!(
            neox.prefix_renames,
            pairs(&[
                ("embed_out", "lm_head"),
                ("gpt_neox.embed_in", "model.embed_tokens"),
                ("gpt_neox.layers", "model.layers"),
                ("gpt_neox.final_layer_norm", "model.norm"),
                ("embed_in", "model.embed_tokens"),
                ("layers", "model.layers"),
                ("final_layer_norm", "model.norm"),
            ])
        );
        assert_eq!(
            neox.renames,
            pairs(&[
                ("attention.query_key_value", "self_attn.qkv_proj"),
                ("attention.dense", "self_attn.o_proj"),
                ("mlp.dense_h_to_4h", "mlp.up_proj"),
                ("mlp.dense_4h_to_h", "mlp.down_proj"),
                ("attention", "self_attn"),
            ])
        );
        assert!(neox.qkv_fused);
        assert_eq!(neox.mlp_layout, mlx_models::transformer::MlpLayout::UpDown);
        // Nothing in its structure is unknown: where it goes wrong, the fixtures say.
        assert!(neox.gaps.is_empty(), "{:?}", neox.gaps);
    }

    /// The facts of qwen3 with these flag probes (each `(field, flipped value, added
    /// parameters, logits moved)`), the bias fields of its config removed.
    fn probed(probes: &[(&str, bool, &[&str], f64)]) -> Value {
        let mut facts = facts("qwen3");
        let fields = facts["config_fields"].as_object_mut().expect("an object");
        fields.remove("attention_bias");
        fields.remove("mlp_bias");
        facts["flag_probes"] = probes
            .iter()
            .map(|(field, value, added, moved)| {
                serde_json::json!({"field": field, "value": value, "added": added,
                                   "removed": [], "logits_max_abs": moved})
            })
            .collect();
        facts
    }

    #[test]
    fn bias_placement_is_read_from_what_each_flag_adds() {
        // One family's flag puts biases on q/k/v only, another's on o_proj too: the plan
        // follows what flipping the flag added to Transformers' model, whatever its name.
        let qkv = [
            "model.layers.0.self_attn.q_proj.bias",
            "model.layers.0.self_attn.k_proj.bias",
            "model.layers.0.self_attn.v_proj.bias",
        ];
        let plan = plan::plan(&probed(&[("use_qkv_bias", true, &qkv, 0.0)]), "x");
        assert_eq!(plan.qkv_bias, plan::Flag::Field("use_qkv_bias".into()));
        assert_eq!(plan.o_bias, plan::Flag::Never);
        let all = [qkv.as_slice(), &["model.layers.0.self_attn.o_proj.bias"]].concat();
        let plan = plan::plan(&probed(&[("bias", true, &all, 0.0)]), "x");
        assert_eq!(plan.qkv_bias, plan::Flag::Field("bias".into()));
        assert_eq!(plan.o_bias, plan::Flag::Field("bias".into()));
        let mlp = ["model.layers.0.mlp.gate_proj.bias"];
        let plan = plan::plan(&probed(&[("ffn_bias", true, &mlp, 0.0)]), "x");
        assert_eq!(plan.mlp_bias, plan::Flag::Field("ffn_bias".into()));
        assert!(plan.refused.is_empty());
    }

    #[test]
    fn a_bias_field_flipped_without_adding_a_bias_does_not_control_it() {
        // Helium's `attention_bias` adds q/k/v biases and no o_proj bias; o_proj has none
        // at the field's default either, so only the probe tells the two apart.
        let (plan, _, source) = regenerate("helium");
        assert_eq!(plan.qkv_bias, plan::Flag::Field("attention_bias".into()));
        assert_eq!(plan.o_bias, plan::Flag::Never);
        assert!(source.contains("o_bias: false"));
    }

    #[test]
    fn full_attention_every_nth_layer_from_the_first_is_derived_from_the_probes() {
        // CWM derives `layer_types` as full attention on layers 0, 4, 8, …; Gemma 2's rule
        // (layers 1, 3, …) and OLMo 3's (3, 7, …) count from the other end.
        let (plan, _, source) = regenerate("cwm");
        assert_eq!(
            plan.layer_rule,
            mlx_models::family::LayerRule::EveryNthFromFirst(4)
        );
        assert!(source.contains("LayerRule::EveryNthFromFirst(4)"));
    }

    #[test]
    fn a_flag_that_changes_the_model_unread_is_refused_in_the_module() {
        // A parallel-residual switch: no parameter changes, the logits move.
        let facts = probed(&[
            ("use_parallel_residual", true, &[], 0.37),
            ("quiet", true, &[], 0.0),
        ]);
        let mut plan = plan::plan(&facts, "x");
        assert_eq!(
            plan.refused,
            vec![("use_parallel_residual".to_owned(), false)]
        );
        assert!(!plan.fields.iter().any(|f| f.name == "quiet"));
        let choice = plan.choices[0].clone();
        plan.settle(&choice);
        let source = codegen::module_source(&plan, &choice);
        assert!(source.contains("config.ensure(!self.use_parallel_residual"));
        // The candidate search refuses it the same way.
        let mut config =
            ConfigFile::read(&workspace_root().join("tests/fixtures/qwen3/default/config.json"))
                .expect("config");
        config.value["use_parallel_residual"] = Value::Bool(true);
        let err = interpret::settings(&plan, &choice, &config).expect_err("refused");
        assert!(err.to_string().contains("use_parallel_residual"), "{err}");
    }

    #[test]
    fn a_parameter_no_block_takes_is_a_gap_not_a_module() {
        let mut facts = facts("qwen3");
        let params = facts["parameters"].as_array_mut().expect("a list");
        params.push(
            serde_json::json!({"name": "model.layers.0.mlp.router.weight", "shape": [8, 64]}),
        );
        let plan = plan::plan(&facts, "qwen3");
        assert_eq!(
            plan.gaps,
            vec!["parameter `model.layers.0.mlp.router.weight` is taken by no known block"]
        );
    }

    /// The mixture-of-experts decisions on the recorded facts of four families the zoo
    /// wrote by hand: the structure each hand-written module has.
    #[test]
    fn mixtures_of_experts_are_read_from_the_recorded_facts() {
        use mlx_models::family::LayerRule;
        let moe = |mt: &str| {
            let plan = plan::plan(&facts(mt), mt);
            assert!(plan.gaps.is_empty(), "{mt}: gaps {:?}", plan.gaps);
            (plan.moe.clone().expect("a mixture of experts"), plan)
        };
        // Mixtral: Hub checkpoints' `block_sparse_moe.experts.<i>.w1/w3/w2`, from
        // Transformers' checkpoint conversion; no renormalization field.
        let (m, plan) = moe("mixtral");
        assert_eq!(
            m.checkpoint_renames,
            [(".block_sparse_moe.".to_owned(), ".mlp.".to_owned())]
        );
        let names: Vec<(&str, &str)> = m
            .projections
            .iter()
            .map(|(a, b)| (a.as_str(), b.as_str()))
            .collect();
        assert_eq!(
            names,
            [("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj")]
        );
        assert_eq!(
            (m.normalize_field, m.shared_expert, m.dense_layers),
            (None, None, false)
        );
        assert!(plan.choices.iter().any(|c| c.moe_normalize));
        assert!(plan.choices.iter().any(|c| !c.moe_normalize));
        // Qwen2-MoE: a shared expert gated by `shared_expert_gate`, dense layers by config.
        let (m, _) = moe("qwen2_moe");
        assert_eq!(m.shared_expert, Some(true));
        assert_eq!(m.normalize_field.as_deref(), Some("norm_topk_prob"));
        assert!(m.dense_layers && m.checkpoint_renames.is_empty());
        assert_eq!(m.projections[0], ("gate_proj".into(), "gate_proj".into()));
        // Qwen3-MoE: the class drops the window unless `use_sliding_window`.
        let (m, plan) = moe("qwen3_moe");
        assert_eq!((m.shared_expert, m.dense_layers), (None, true));
        assert_eq!(plan.layer_rule, LayerRule::AllWhenEnabled);
        assert!(plan.choices.iter().all(|c| !c.moe_normalize));
        // GraniteMoE: Transformers' own block is `block_sparse_moe` with a `router`; its
        // Hub checkpoints' `input_linear`/`output_linear`/`router.layer` are converted
        // module-wise (quantized `scales` follow), bare expert weights last.
        let (m, plan) = moe("granitemoe");
        assert_eq!(
            plan.renames[plan.renames.len() - 2..],
            [
                ("block_sparse_moe.router".to_owned(), "mlp.gate".to_owned()),
                ("block_sparse_moe".to_owned(), "mlp".to_owned())
            ]
        );
        assert!(m.checkpoint_renames.contains(&(
            "block_sparse_moe.router.layer.".to_owned(),
            "block_sparse_moe.router.".to_owned()
        )));
        assert_eq!(
            m.checkpoint_renames
                .last()
                .map(|(a, b)| (a.as_str(), b.as_str())),
            Some((
                "block_sparse_moe.experts.down_proj.weight",
                "block_sparse_moe.experts.down_proj"
            ))
        );
        assert_eq!(
            plan.residual_scale,
            plan::Scalar::Field("residual_multiplier".into())
        );
        // OLMoE: q/k norms over the whole projections, `clip_qkv`.
        let (m, plan) = moe("olmoe");
        assert!(!m.dense_layers && m.shared_expert.is_none());
        assert_eq!(plan.qk_norm, mlx_models::transformer::QkNorm::Projection);
        assert_eq!(plan.clip_qkv, plan::Scalar::Field("clip_qkv".into()));
    }

    #[test]
    fn mixtral_renormalizes_as_its_fixtures_say_and_the_other_choice_fails_at_layer_0() {
        let mut plan = plan::plan(&facts("mixtral"), "mixtral");
        let fixtures = fixtures("mixtral");
        let found = search(&plan, &fixtures).expect("search runs");
        let choice = found.chosen.expect("a candidate passes every fixture");
        assert!(choice.moe_normalize);
        let source = codegen::module_source(&plan, &choice);
        assert!(source.contains("normalize: true"), "{source}");
        assert!(source.contains("(\".block_sparse_moe.\", \".mlp.\")"));
        assert!(source.contains("sanitize_moe(weights, settings, None, &EXPERTS)"));
        assert!(source.contains("(\"w1\", \"gate_proj\")"));
        // The seeded fault: the same candidate without renormalization.
        plan.choices = vec![plan::Choice {
            moe_normalize: false,
            ..choice
        }];
        let failed = search(&plan, &fixtures).expect("search runs");
        assert!(failed.chosen.is_none());
        let failures = &failed.tried[0].1;
        assert!(
            failures[0].contains("first bad tensor `layers.0`"),
            "{failures:?}"
        );
    }

    #[test]
    fn qwen2_moe_verifies_with_its_gated_shared_expert_and_dense_layers() {
        let plan = plan::plan(&facts("qwen2_moe"), "qwen2_moe");
        let fixtures = fixtures("qwen2_moe");
        assert!(fixtures.iter().any(|f| f.name().contains("dense-layers")));
        let found = search(&plan, &fixtures).expect("search runs");
        let choice = found.chosen.expect("a candidate passes every fixture");
        let source = codegen::module_source(&plan, &choice);
        assert!(
            source.contains("ExpertActivation::Glu(act), true)"),
            "{source}"
        );
        assert!(source.contains("|i| self.moe.is_sparse(i)"));
        // Read as an ungated shared expert, the checkpoint's gate is a weight no block
        // takes: refused, not ignored.
        let mut ungated = plan.clone();
        ungated.moe.as_mut().expect("moe").shared_expert = Some(false);
        ungated.choices = vec![choice];
        let failed = search(&ungated, &fixtures).expect("search runs");
        assert!(failed.chosen.is_none());
        assert!(
            failed.tried[0].1[0].contains("unexpected weights")
                && failed.tried[0].1[0].contains("mlp.shared_expert_gate.weight"),
            "{:?}",
            failed.tried
        );
    }

    #[test]
    fn experts_after_dense_first_layers_are_found_and_their_parameters_checked() {
        // Qwen2-MoE's facts with layer 0 dense (DeepSeek's `first_k_dense_replace`) and a
        // router bias on layer 1 that no block takes.
        let mut facts = facts("qwen2_moe");
        let params = facts["parameters"].as_array_mut().expect("a list");
        params.retain(|p| {
            !p["name"]
                .as_str()
                .unwrap()
                .starts_with("model.layers.0.mlp.")
        });
        for proj in ["gate_proj", "up_proj", "down_proj"] {
            params.push(serde_json::json!({"name": format!("model.layers.0.mlp.{proj}.weight"), "shape": [32, 64]}));
        }
        params.push(serde_json::json!({"name": "model.layers.1.mlp.gate.e_score_correction_bias", "shape": [4]}));
        let plan = plan::plan(&facts, "x");
        let moe = plan.moe.expect("the experts of layer 1");
        assert_eq!(moe.shared_expert, Some(true));
        // No field of Qwen2-MoE's keeps layer 0 dense: the layers the tiny model built
        // with experts are not the ones the config says.
        assert_eq!(
            plan.gaps,
            [
                "parameter `model.layers.1.mlp.gate.e_score_correction_bias` is taken by no known block",
                "the tiny model has experts on layers [1]; the config's fields say [0, 1]"
            ]
        );
    }

    #[test]
    fn routing_the_blocks_do_not_generate_is_a_gap() {
        let mut facts = facts("qwen2_moe");
        facts["config_fields"]["n_group"] = serde_json::json!({"default": 8, "kind": "int"});
        let plan = plan::plan(&facts, "x");
        assert!(
            plan.gaps.iter().any(|g| g.contains("`n_group`")),
            "{:?}",
            plan.gaps
        );
        let mut facts = self::facts("qwen2_moe");
        let params = facts["parameters"].as_array_mut().expect("a list");
        params.retain(|p| p["name"] != "model.layers.0.mlp.gate.weight");
        let plan = plan::plan(&facts, "x");
        assert!(
            plan.gaps.iter().any(|g| g.contains("without a router")),
            "{:?}",
            plan.gaps
        );
    }

    #[test]
    fn gpt2_generates_on_the_shared_blocks_and_a_wrong_attention_scale_fails_at_layer_0() {
        // No hand edit: the generated GPT-2 passes the committed fixtures, the one with
        // `scale_attn_weights` false too.
        let plan = plan::plan(&facts("gpt2"), "gpt2");
        let fixtures = fixtures("gpt2");
        let found = search(&plan, &fixtures).expect("search runs");
        assert!(found.chosen.is_some(), "{:?}", found.tried);
        // Seeded fault: head_dim^-0.5 whatever the flag. Only the fixture that flips it fails,
        // at the first layer.
        let mut wrong = plan.clone();
        wrong.attention_scale = plan::Scalar::None;
        wrong.choices.truncate(1);
        let search = search(&wrong, &fixtures).expect("search runs");
        let (_, failures) = &search.tried[0];
        assert!(
            failures
                .iter()
                .any(|f| f.starts_with("gpt2/options: first bad tensor `layers.0`")),
            "{failures:?}"
        );
    }

    #[test]
    fn biogpt_is_regenerated_exactly_with_positions_from_row_2_and_its_fc1_fc2_mlp() {
        let (plan, choice, source) = regenerate("biogpt");
        assert_eq!(plan.learned_positions, Some(2));
        assert_eq!(plan.mlp_layout, mlx_models::transformer::MlpLayout::UpDown);
        assert!(plan
            .renames
            .contains(&("fc1".to_owned(), "mlp.up_proj".to_owned())));
        assert!(plan
            .prefix_renames
            .contains(&("output_projection".to_owned(), "lm_head".to_owned())));
        assert_eq!(choice.embedding_scale, plan::Scalar::SqrtHidden);
        assert!(source.contains("position_offset: 2"));
        // Seeded fault: position 0 at row 0 (a table of max_position_embeddings rows) is
        // refused by the weights' shapes before anything runs.
        let mut wrong = plan.clone();
        wrong.learned_positions = Some(0);
        wrong.choices = vec![choice];
        let found = search(&wrong, &fixtures("biogpt")).expect("search runs");
        let (_, failures) = &found.tried[0];
        assert!(
            failures.iter().any(|f| f.contains(
                "`model.embed_positions.weight` in tests/fixtures/biogpt/default has shape [66, 64], expected [64, 64]"
            )),
            "{failures:?}"
        );
    }

    #[test]
    fn xglm_is_regenerated_exactly_with_sinusoidal_positions_fitted_from_what_layer_0_receives() {
        use mlx_models::positions::Sinusoid;
        let (plan, choice, source) = regenerate("xglm");
        // fairseq's table: exp(-j ln 10000 / (half - 1)), sines then cosines, from row 2.
        let fitted = Sinusoid {
            shift: 1,
            first_position: 2,
            ..Sinusoid::default()
        };
        assert_eq!(plan.sinusoidal_positions, Some(fitted));
        assert_eq!(plan.learned_positions, None);
        assert!(source.contains("first_position: 2"));
        // Seeded faults: CTRL's frequencies, or positions from angle 0, fail the first
        // fixture at the embeddings.
        for wrong_table in [
            Sinusoid { shift: 0, ..fitted },
            Sinusoid {
                first_position: 0,
                ..fitted
            },
        ] {
            let mut wrong = plan.clone();
            wrong.sinusoidal_positions = Some(wrong_table);
            wrong.choices = vec![choice.clone()];
            let found = search(&wrong, &fixtures("xglm")).expect("search runs");
            let (_, failures) = &found.tried[0];
            assert!(
                failures
                    .iter()
                    .any(|f| f.starts_with("xglm/default: first bad tensor `embeddings`")),
                "{wrong_table:?}: {failures:?}"
            );
        }
    }

    #[test]
    fn ctrl_is_regenerated_exactly_with_its_ffn_block_qkv_by_call_order_and_relu_from_the_trace() {
        use mlx_models::positions::Sinusoid;
        let (plan, choice, source) = regenerate("ctrl");
        let renamed = |from: &str, to: &str| {
            plan.renames
                .iter()
                .any(|(a, b)| a.as_str() == from && b.as_str() == to)
        };
        // `ffn` calls two linear layers after attention: the MLP, up then down.
        assert!(renamed("ffn", "mlp") && renamed("ffn.0", "mlp.up_proj"));
        assert!(renamed("ffn.2", "mlp.down_proj"));
        // Three projections of attention's input before `dense`: q, k, v in call order.
        assert!(renamed("multi_head_attention.Wq", "self_attn.q_proj"));
        assert!(renamed("multi_head_attention.Wv", "self_attn.v_proj"));
        assert_eq!(plan.activation_constant, Some("relu"));
        assert_eq!(plan.sinusoidal_positions, Some(Sinusoid::default()));
        assert!(source.contains("Activation::Relu"));
        // Seeded fault: query and key swapped fail the first layer.
        let mut wrong = plan.clone();
        wrong.choices = vec![choice];
        for (from, to) in wrong.renames.iter_mut() {
            if from.ends_with(".Wq") {
                *to = "self_attn.k_proj".to_owned();
            } else if from.ends_with(".Wk") {
                *to = "self_attn.q_proj".to_owned();
            }
        }
        let found = search(&wrong, &fixtures("ctrl")).expect("search runs");
        let (_, failures) = &found.tried[0];
        assert!(
            failures
                .iter()
                .any(|f| f.starts_with("ctrl/default: first bad tensor `layers.0`")),
            "{failures:?}"
        );
    }

    #[test]
    fn openai_gpt_is_regenerated_exactly_post_residual_without_final_norm() {
        use mlx_models::transformer::NormPlacement;
        let (plan, choice, source) = regenerate("openai-gpt");
        assert_eq!(choice.norm_placement, NormPlacement::PostResidual);
        assert!(!plan.final_norm);
        // No config field sets the MLP width: 4 × n_embd, as the tiny model has it.
        assert_eq!(plan.intermediate_per_hidden, Some(4));
        // `afn` names the activation (its default `gelu`), read as tanh GELU by the fixtures.
        assert_eq!(plan.act_field, "afn");
        assert!(choice.gelu_as_tanh);
        assert!(source.contains("let conv1d = !weights.names().any("));
        // Seeded fault: norms on the sub-blocks' outputs (OLMo 2's post-norm) fail layer 0.
        let mut wrong = plan.clone();
        wrong.choices = vec![Choice {
            norm_placement: NormPlacement::Post,
            ..choice
        }];
        let found = search(&wrong, &fixtures("openai-gpt")).expect("search runs");
        let (_, failures) = &found.tried[0];
        assert!(
            failures
                .iter()
                .any(|f| f.starts_with("openai-gpt/default: first bad tensor `layers.0`")),
            "{failures:?}"
        );
    }

    /// The fit on signals written from the closed forms: each layout is found, and a signal
    /// no sinusoid makes is a gap.
    #[test]
    fn sinusoidal_positions_are_fitted_to_the_recorded_signal() {
        use mlx_models::positions::Sinusoid;
        let signal = |s: Sinusoid, dim: usize| -> Value {
            let half = dim / 2;
            let rows: Vec<Vec<f64>> = (0..8)
                .map(|p| {
                    let pos = f64::from(p + s.first_position);
                    let mut row = vec![0.0; dim];
                    for j in 0..half {
                        let f = s.base.powf(-(j as f64) / (half - s.shift as usize) as f64);
                        let (is, ic) = if s.interleaved {
                            (2 * j, 2 * j + 1)
                        } else {
                            (j, j + half)
                        };
                        row[is] = (pos * f).sin();
                        row[ic] = (pos * f).cos();
                    }
                    row
                })
                .collect();
            serde_json::json!({ "position_signal": rows })
        };
        for s in [
            Sinusoid::default(),
            Sinusoid {
                interleaved: true,
                first_position: 1,
                ..Sinusoid::default()
            },
            Sinusoid {
                shift: 1,
                first_position: 2,
                ..Sinusoid::default()
            },
        ] {
            assert_eq!(plan::sinusoidal_positions(&signal(s, 16)), Ok(Some(s)));
        }
        assert_eq!(plan::sinusoidal_positions(&serde_json::json!({})), Ok(None));
        let mut noisy = signal(Sinusoid::default(), 16);
        noisy["position_signal"][3][5] = serde_json::json!(0.5);
        let gap = plan::sinusoidal_positions(&noisy).unwrap_err();
        assert!(gap.contains("no sinusoidal table reproduces"), "{gap}");
    }

    #[test]
    fn opt_is_regenerated_exactly_from_its_nested_decoder_with_the_norms_own_epsilon() {
        let (plan, _, source) = regenerate("opt");
        // `model.decoder.layers` is nested under `model.`: renamed by structure all the same.
        assert!(plan
            .prefix_renames
            .contains(&("model.decoder.layers".to_owned(), "model.layers".to_owned())));
        // OPTConfig has no epsilon field: its LayerNorms' own 1e-5.
        assert_eq!(plan.eps_constant, Some(1e-5));
        // `ffn_dim` widens fc1 in the width probe: the MLP width's own name.
        assert_eq!(
            plan.aliases,
            [("intermediate_size".to_owned(), "ffn_dim".to_owned())]
        );
        // `enable_bias` removes every projection's bias in its flag probe.
        assert_eq!(plan.qkv_bias, plan::Flag::Field("enable_bias".to_owned()));
        assert!(source.contains("position_offset: 2"));
        // Seeded fault: the blocks' default epsilon (1e-6) fails at the first layer.
        let mut wrong = plan.clone();
        wrong.eps_constant = None;
        wrong.choices.truncate(1);
        let found = search(&wrong, &fixtures("opt")).expect("search runs");
        let (_, failures) = &found.tried[0];
        assert!(
            failures
                .iter()
                .any(|f| f.starts_with("opt/default: first bad tensor `layers.0`")),
            "{failures:?}"
        );
    }

    /// OLMo's LayerNorms have no parameters: read from the module tree (norm modules with no
    /// weight), their epsilon measured on the module (1e-5, fixed in its forward; the class
    /// has no field). Seeded faults: norms with weights are missing weights; the blocks'
    /// default epsilon fails at the first layer.
    #[test]
    fn olmo_weightless_norms_and_their_measured_epsilon_regenerate_exactly() {
        let (plan, _, source) = regenerate("olmo");
        assert!(plan.weightless_norms);
        assert_eq!(plan.layer_norm, Some(plan::Flag::Never));
        assert_eq!(plan.eps_constant, Some(1e-5));
        assert!(source.contains("norm: NormKind::LayerNoWeight"));
        let mut weighted = plan.clone();
        weighted.weightless_norms = false;
        let failures = first_candidate_failures(&weighted, "olmo");
        assert!(
            failures
                .iter()
                .any(|f| f.contains("missing weight `model.layers.0.input_layernorm.weight`")),
            "{failures:?}"
        );
        let mut wrong = plan.clone();
        wrong.eps_constant = None;
        let failures = first_candidate_failures(&wrong, "olmo");
        assert!(
            failures
                .iter()
                .any(|f| f.starts_with("olmo/default: first bad tensor `layers.0`")),
            "{failures:?}"
        );
    }

    /// NanoChat: weightless RMSNorms, the final norm also called on the embeddings before the
    /// first layer (the base model's call order), q/k normalized without weight after RoPE
    /// (the trace), RoPE turning by -θ (the probe's negative angles). Each, undone, fails.
    #[test]
    fn nanochat_norm_on_embeddings_reversed_rope_and_unweighted_qk_norms_regenerate_exactly() {
        let (plan, _, source) = regenerate("nanochat");
        assert!(plan.weightless_norms && plan.norm_on_embeddings && plan.rope_reversed);
        assert_eq!(plan.layer_norm, None);
        assert_eq!(plan.qk_norm, mlx_models::transformer::QkNorm::L2AfterRope);
        assert!(source.contains("let rope = rope.reversed();"));
        let faults: [Fault<Plan>; 3] = [
            ("rope not reversed", |p| p.rope_reversed = false),
            ("embeddings not normalized", |p| {
                p.norm_on_embeddings = false
            }),
            ("no q/k norm", |p| {
                p.qk_norm = mlx_models::transformer::QkNorm::None
            }),
        ];
        for (name, fault) in faults {
            let mut wrong = plan.clone();
            fault(&mut wrong);
            let failures = first_candidate_failures(&wrong, "nanochat");
            assert!(
                failures
                    .iter()
                    .any(|f| f.starts_with("nanochat/default: first bad tensor")),
                "{name}: {failures:?}"
            );
        }
    }

    /// BitNet's sub-norms (`attn_sub_norm` of the attention output's width, `ffn_sub_norm`
    /// of the MLP's hidden width) and its packed ternary fixture, unpacked by every family
    /// loader; without the sub-norms their weights are unexpected.
    #[test]
    fn bitnet_sub_norms_and_packed_weights_regenerate_exactly() {
        let (plan, _, source) = regenerate("bitnet");
        assert!(plan.sub_norms);
        assert!(source.contains("sub_norms: true"));
        let mut wrong = plan.clone();
        wrong.sub_norms = false;
        let failures = first_candidate_failures(&wrong, "bitnet");
        assert!(
            failures
                .iter()
                .any(|f| f.contains("unexpected weights") && f.contains("attn_sub_norm")),
            "{failures:?}"
        );
    }

    /// GPT-NeoX's `use_parallel_residual` only moves the logits: tried as the switch between
    /// the two placements its norms allow (side by side where true, in sequence where
    /// false), the candidate with it passes the default (parallel) and `sequential`
    /// fixtures; either placement alone fails one of them. Its causal-mask buffers
    /// (`attention.bias`, unanchored ignored keys) are dropped under every layer.
    #[test]
    fn gpt_neox_parallel_residual_switches_the_placement_and_regenerates_exactly() {
        use mlx_models::transformer::NormPlacement;
        let (plan, choice, source) = regenerate("gpt_neox");
        assert_eq!(choice.norm_placement, NormPlacement::Pre);
        assert_eq!(
            choice.placement_when,
            Some((
                "use_parallel_residual".to_owned(),
                NormPlacement::ParallelTwoNorms
            ))
        );
        assert!(!plan
            .refused
            .iter()
            .any(|(f, _)| f == "use_parallel_residual"));
        assert_eq!(
            plan.unused_anywhere,
            ["attention.bias", "attention.masked_bias"]
        );
        assert!(source.contains("if self.use_parallel_residual"));
        for (placement, fails) in [
            (NormPlacement::Pre, "gpt_neox/default"),
            (NormPlacement::ParallelTwoNorms, "gpt_neox/sequential"),
        ] {
            let mut wrong = plan.clone();
            wrong.refused.retain(|(f, _)| f != "use_parallel_residual");
            wrong.choices = vec![Choice {
                norm_placement: placement,
                placement_when: None,
                ..choice.clone()
            }];
            let found = search(&wrong, &fixtures("gpt_neox")).expect("search runs");
            let (_, failures) = &found.tried[0];
            assert!(
                failures.iter().any(|f| f.starts_with(fails)),
                "{placement:?}: {failures:?}"
            );
        }
    }

    /// Fails `plan` on the committed fixtures of `mt` (first candidate only) and returns
    /// the failures.
    fn first_candidate_failures(plan: &Plan, mt: &str) -> Vec<String> {
        let mut one = plan.clone();
        one.choices.truncate(1);
        let found = search(&one, &fixtures(mt)).expect("search runs");
        assert!(found.chosen.is_none(), "{mt}: the seeded fault passes");
        eprintln!("{mt}: seeded fault gives {:?}", found.tried[0].1);
        found.tried[0].1.clone()
    }

    #[test]
    fn gptj_rope_is_read_from_its_queries_and_regenerates_exactly() {
        // No rope field in GPTJConfig: the probe measured 8 of 16 features in adjacent
        // pairs, base 10000, and `rotary_dim` as the field that sets the width.
        let (plan, choice, source) = regenerate("gptj");
        assert_eq!(plan.rope, Some(plan::RopeRule::Uniform));
        assert_eq!(plan.rope_dims_field.as_deref(), Some("rotary_dim"));
        assert_eq!(plan.default_theta, 10000.0);
        assert!(choice.rope_traditional);
        assert!(
            plan.choices.iter().all(|c| c.rope_traditional),
            "layout measured, not tried"
        );
        assert!(
            plan.rope_from_code,
            "no config field describes GPT-J's RoPE"
        );
        assert!(source.contains("d.rope_rotating(\n            &RopeFields::default(),\n            (\"rotary_dim\", self.rotary_dim),"));
        // Seeded faults: halves instead of pairs, or the whole head rotated, fail at layer 0.
        let mut halves = plan.clone();
        halves.choices[0].rope_traditional = false;
        let mut whole = plan.clone();
        whole.rope_dims_field = None;
        for wrong in [halves, whole] {
            let failures = first_candidate_failures(&wrong, "gptj");
            assert!(
                failures
                    .iter()
                    .any(|f| f.starts_with("gptj/default: first bad tensor `layers.0`")),
                "{failures:?}"
            );
        }
    }

    #[test]
    fn a_partial_rotation_no_field_names_is_a_gap() {
        let mut facts = facts("gptj");
        facts["rotary_dims_field"] = Value::Null;
        let plan = plan::plan(&facts, "x");
        assert!(
            plan.gaps
                .iter()
                .any(|g| g.contains("RoPE rotates 8 of 16 features")),
            "{:?}",
            plan.gaps
        );
        // Without the probe, the layout is left to the fixtures (both tried).
        let mut facts = self::facts("gptj");
        facts["rotary_probe"] = Value::Null;
        let plan = plan::plan(&facts, "x");
        assert!(plan.rope.is_none());
        assert!(plan.choices.iter().any(|c| c.rope_traditional));
        assert!(plan.choices.iter().any(|c| !c.rope_traditional));
    }

    #[test]
    fn codegen_fused_rows_in_groups_are_read_and_regenerate_exactly() {
        use mlx_models::fused_qkv::Part;
        let (plan, _, source) = regenerate("codegen");
        let groups = plan.qkv_groups.clone().expect("groups read");
        assert_eq!(groups.groups, Some(4));
        assert_eq!(groups.order, [Part::Query, Part::Value, Part::Key]);
        assert!(source.contains("grouped_to_blocks("));
        // Seeded faults: rows read as all q, k, v blocks, or 4 groups of q, k, v.
        let mut blocks = plan.clone();
        blocks.qkv_groups = None;
        let mut order = plan.clone();
        order.qkv_groups = Some(plan::QkvGroups {
            groups: Some(4),
            order: [Part::Query, Part::Key, Part::Value],
        });
        for wrong in [blocks, order] {
            let failures = first_candidate_failures(&wrong, "codegen");
            assert!(
                failures
                    .iter()
                    .any(|f| f.starts_with("codegen/default: first bad tensor `layers.0`")),
                "{failures:?}"
            );
        }
    }

    #[test]
    fn persimmon_per_head_rows_qk_layernorm_and_default_share_regenerate_exactly() {
        use mlx_models::fused_qkv::Part;
        let (plan, _, _) = regenerate("persimmon");
        let groups = plan.qkv_groups.clone().expect("groups read");
        assert_eq!(groups.groups, None, "one group per head");
        assert_eq!(groups.order, [Part::Query, Part::Key, Part::Value]);
        assert_eq!(plan.qk_norm, mlx_models::transformer::QkNorm::PerHead);
        assert!(plan.renames.contains(&(
            "self_attn.q_layernorm".to_owned(),
            "self_attn.q_norm".to_owned()
        )));
        assert_eq!(plan.default_partial_rotary, Some(0.5));
        // Seeded fault: a constant 4 groups (the tiny model's head count) instead of one per
        // head passes the 4-head fixtures but not a config with other heads, so per head is
        // what the probe (at 4 and 8 heads) must give; here: rows read as blocks fail.
        let mut blocks = plan.clone();
        blocks.qkv_groups = None;
        let failures = first_candidate_failures(&blocks, "persimmon");
        assert!(
            failures
                .iter()
                .any(|f| f.starts_with("persimmon/default: first bad tensor `layers.0`")),
            "{failures:?}"
        );
    }

    #[test]
    fn an_unscaled_attention_is_read_from_the_measured_factor() {
        // GPT-Neo's q·k is not scaled: introspect.py fits a factor of 1 from the attention
        // weights; head_dim^-0.5 measured is the blocks' default, nothing to say.
        let facts = |scale: f64| serde_json::json!({"attention_scale": {"scale": scale}});
        assert_eq!(
            plan::measured_attention_scale(&facts(1.0), 16).map(|(s, _)| s),
            Some(plan::Scalar::One)
        );
        assert_eq!(plan::measured_attention_scale(&facts(0.25), 16), None);
        assert_eq!(plan::measured_attention_scale(&facts(0.3), 16), None);
    }

    /// An integer field no block reads whose other values add parameters (GraniteMoeShared's
    /// `shared_intermediate_size` > 0 adds a shared MLP) is refused in the module beyond its
    /// default: a typed error naming the field, not "unexpected weights" — and the interpreted
    /// module accepts the default (qwen3's fixtures still verify).
    #[test]
    fn an_unread_field_that_adds_parameters_is_refused_beyond_its_default() {
        let mut recorded = facts("qwen3");
        recorded["config_fields"]["shared_intermediate_size"] = serde_json::json!({"default": 0});
        recorded["width_probes"] = serde_json::json!([{"field": "shared_intermediate_size",
            "value": 96, "widened": ["model.layers.0.shared_mlp.output_linear.weight",
                                     "model.layers.1.shared_mlp.output_linear.weight"]}]);
        let plan = plan::plan(&recorded, "qwen3");
        assert_eq!(
            plan.refused_values,
            vec![("shared_intermediate_size".to_owned(), 0)]
        );
        let search = search(&plan, &fixtures("qwen3")).expect("search runs");
        let choice = search.chosen.expect("the default verifies");
        let source = codegen::module_source(&plan, &choice);
        assert!(
            source.contains("config.ensure(self.shared_intermediate_size == 0"),
            "{source}"
        );
        let fixture = &fixtures("qwen3")[0];
        let mut config = ConfigFile::read(&fixture.dir.join("config.json")).expect("config");
        config.value["shared_intermediate_size"] = 16.into();
        let refused = interpret::settings(&plan, &choice, &config).expect_err("refused");
        assert!(
            refused.to_string().contains("shared_intermediate_size"),
            "{refused}"
        );
        // A probe that only widens parameters the model has is a width, not a refusal.
        let plan = plan::plan(&facts("qwen3"), "qwen3");
        assert!(plan.refused_values.is_empty());
    }

    /// Transformers' ignored checkpoint keys that are plain literals (with or without a
    /// trailing `.*`) drop weights: anchored ones by prefix, unanchored ones wherever they
    /// start a name part (Transformers searches them anywhere: GPT-NeoX's `attention.bias`
    /// under every layer); any other pattern is reported and its weights stay errors.
    #[test]
    fn ignored_checkpoint_keys_that_are_plain_literals_are_dropped() {
        let facts = serde_json::json!({"ignored_checkpoint_keys":
            ["^mtp\\.", "model\\.layers\\.61.*", "^vision_tower\\..*", "^a[0-9]\\.", "attention.bias"]});
        let mut decisions = Vec::new();
        let prefixes = plan::unused_prefixes(&facts, &mut decisions);
        assert_eq!(prefixes, vec!["mtp.", "vision_tower."]);
        let anywhere = plan::unused_anywhere(&facts);
        assert_eq!(anywhere, vec!["model.layers.61", "attention.bias"]);
        assert_eq!(decisions.len(), 5);
        assert!(decisions[3].contains("stay errors"), "{decisions:?}");
        let unused = |name: &str| mlx_models::family::is_unused(name, &prefixes, &anywhere);
        assert!(unused("gpt_neox.layers.3.attention.bias"));
        assert!(unused("mtp.layers.0.norm.weight") && unused("model.layers.61.mlp.weight"));
        assert!(!unused("model.mtp.x"));
        assert!(!unused("model.layers.0.self_attn.q_proj.weight"));
    }

    /// DiffLlama, from its recorded introspection: the four λ vectors of one head's width are
    /// differential attention and the module regenerates exactly; ordinary attention leaves
    /// them unused (an error, not a model), and λ vectors of another width are a gap.
    #[test]
    fn diffllama_regenerates_with_differential_attention() {
        let (plan, _, source) = regenerate("diffllama");
        assert!(plan.differential);
        assert!(source.contains("differential: true"));

        let mut ordinary = plan::plan(&facts("diffllama"), "diffllama");
        ordinary.differential = false;
        let search = search(&ordinary, &fixtures("diffllama")).expect("search runs");
        assert!(search.chosen.is_none());
        assert!(
            search.tried[0]
                .1
                .iter()
                .any(|f| f.contains("unexpected weights") && f.contains("self_attn.lambda_q1")),
            "{:?}",
            search.tried[0]
        );

        let mut recorded = facts("diffllama");
        for p in recorded["parameters"].as_array_mut().expect("a list") {
            if p["name"] == "model.layers.0.self_attn.lambda_k2" {
                p["shape"] = serde_json::json!([8]);
            }
        }
        let plan = plan::plan(&recorded, "diffllama");
        assert!(!plan.differential);
        assert!(
            plan.gaps.iter().any(|g| g.contains("lambda")),
            "{:?}",
            plan.gaps
        );
    }

    #[test]
    fn bloom_is_regenerated_exactly_with_alibi_per_head_qkv_and_an_embedding_norm() {
        let (plan, choice, source) = regenerate("bloom");
        // The probes: a constant score step per head (ALiBi), zeroed per-head value rows
        // silencing the attention, a norm called between the embedding and layer 0, the
        // MLP's `BloomGelu` computing the tanh GELU, a 4 × hidden up projection.
        assert_eq!(
            plan.alibi,
            Some(alibi::AlibiPlan {
                max_bias: 8.0,
                factor: alibi::AlibiFactor::One
            })
        );
        assert!(plan.qkv_groups.is_some() && plan.embedding_layernorm);
        assert_eq!(plan.intermediate_per_hidden, Some(4));
        assert!(source.contains("\"hidden_act\":\"gelu_pytorch_tanh\""));
        assert!(source.contains("grouped_to_blocks("));
        // Seeded faults, each failing at the first layer (or before it) on the fixtures.
        let faults: [Fault<Plan>; 4] = [
            ("no ALiBi", |p| p.alibi = None),
            ("ALiBi of max bias 4", |p| {
                p.alibi = Some(alibi::AlibiPlan {
                    max_bias: 4.0,
                    factor: alibi::AlibiFactor::One,
                })
            }),
            ("q/k/v rows as blocks", |p| p.qkv_groups = None),
            ("no embedding norm", |p| p.embedding_layernorm = false),
        ];
        for (name, fault) in faults {
            let mut wrong = plan.clone();
            fault(&mut wrong);
            wrong.choices = vec![choice.clone()];
            let found = search(&wrong, &fixtures("bloom")).expect("search runs");
            assert!(found.chosen.is_none(), "{name}: still verifies");
            let (_, failures) = &found.tried[0];
            assert!(
                failures
                    .iter()
                    .any(|f| f.contains("first bad tensor `layers.0`")
                        || f.contains("first bad tensor `embeddings`")
                        || f.contains("model.embed_layernorm")),
                "{name}: {failures:?}"
            );
        }
    }

    #[test]
    fn falcon_is_regenerated_exactly_with_one_kv_head_measured_on_its_fused_projection() {
        let (plan, choice, source) = regenerate("falcon");
        // `FalconLinear` projections are linears; `multi_query`'s single key/value head is
        // measured on the fused projection's rows (the class has no `num_key_value_heads`).
        assert!(plan.renames.contains(&(
            "self_attention.query_key_value".to_owned(),
            "self_attn.qkv_proj".to_owned()
        )));
        assert!(source.contains("\"num_key_value_heads\":1"));
        assert_eq!(
            choice.norm_placement,
            mlx_models::transformer::NormPlacement::Parallel
        );
        assert!(plan.alibi.is_none());
        assert!(plan.refused.contains(&("alibi".to_owned(), false)));
        // Seeded fault: as many key/value heads as query heads is refused by the fused
        // projection's shape before anything runs.
        let mut wrong = plan.clone();
        for f in wrong
            .fields
            .iter_mut()
            .filter(|f| f.name == "num_key_value_heads")
        {
            f.default = serde_json::Value::from(4);
        }
        wrong.choices = vec![choice];
        let found = search(&wrong, &fixtures("falcon")).expect("search runs");
        assert!(found.chosen.is_none());
        let (_, failures) = &found.tried[0];
        assert!(
            failures
                .iter()
                .any(|f| f.contains("self_attn.qkv_proj.weight")),
            "{failures:?}"
        );
    }

    #[test]
    fn mpt_is_regenerated_exactly_with_its_ffn_as_the_mlp_and_bias_free_layer_norms() {
        let (plan, choice, source) = regenerate("mpt");
        // `ffn` (an `MptMLP`) is the MLP; its LayerNorms have no bias, told by their class.
        assert!(plan.renames.contains(&("ffn".to_owned(), "mlp".to_owned())));
        assert_eq!(plan.layer_norm, Some(plan::Flag::Never));
        assert_eq!(plan.mlp_layout, mlx_models::transformer::MlpLayout::UpDown);
        assert!(plan.alibi.is_some() && plan.qkv_groups.is_none());
        assert!(source.contains("\"hidden_act\":\"gelu\""));
        // `attn_config`'s `clip_qkv` and `softmax_scale` move the logits in the nested
        // probes and no block reads them: only their default (null) is accepted.
        assert_eq!(
            plan.nested_refused,
            [
                (
                    "attn_config".to_owned(),
                    "clip_qkv".to_owned(),
                    "null".to_owned()
                ),
                (
                    "attn_config".to_owned(),
                    "softmax_scale".to_owned(),
                    "null".to_owned()
                ),
            ]
        );
        assert!(source.contains("config.ensure_nested(\"attn_config\", \"clip_qkv\", \"null\")?;"));
        // Seeded fault: RMSNorm (what the parameters alone suggested) fails at layer 0.
        let mut wrong = plan.clone();
        wrong.layer_norm = None;
        wrong.choices = vec![choice];
        let found = search(&wrong, &fixtures("mpt")).expect("search runs");
        assert!(found.chosen.is_none());
        let (_, failures) = &found.tried[0];
        assert!(
            failures
                .iter()
                .any(|f| f.starts_with("mpt/default: first bad tensor `layers.0`")),
            "{failures:?}"
        );
    }

    /// Granite SWA, from its recorded introspection: a sink logit per head (`self_attn.sinks`
    /// of `[heads]`) and a RoPE base per layer (`layer_rope_theta`, 0 for none) are read and
    /// the module regenerates exactly; a plan that ignores the per-layer bases fails on the
    /// fixture that sets them, and sinks of another shape are a gap.
    #[test]
    fn granite_swa_regenerates_with_sinks_and_a_rope_base_per_layer() {
        let (plan, _, source) = regenerate("granite_swa");
        assert!(plan.sinks);
        assert_eq!(plan.layer_rope_bases.as_deref(), Some("layer_rope_theta"));
        assert!(source.contains("set_layer_rope_bases"));

        let mut without_bases = plan::plan(&facts("granite_swa"), "granite_swa");
        without_bases.layer_rope_bases = None;
        let search = search(&without_bases, &fixtures("granite_swa")).expect("search runs");
        assert!(search.chosen.is_none());
        assert!(
            search.tried[0]
                .1
                .iter()
                .any(|f| f.starts_with("granite_swa/layer-rope-bases")),
            "{:?}",
            search.tried[0]
        );

        let mut facts = facts("granite_swa");
        for p in facts["parameters"].as_array_mut().expect("a list") {
            if p["name"] == "model.layers.0.self_attn.sinks" {
                p["shape"] = serde_json::json!([1]);
            }
        }
        let plan = plan::plan(&facts, "granite_swa");
        assert!(!plan.sinks);
        assert!(
            plan.gaps.iter().any(|g| g.contains("self_attn.sinks")),
            "{:?}",
            plan.gaps
        );
    }

    #[test]
    fn a_wrong_candidate_fails_where_it_differs() {
        // Gemma with Llama's norm: the first candidate tried on a Gemma fixture fails, and
        // the report names the tensor.
        let facts = facts("gemma");
        let plan = plan::plan(&facts, "gemma");
        let fixtures = fixtures("gemma");
        let search = search(&plan, &fixtures).expect("search runs");
        let (first, failures) = &search.tried[0];
        assert!(first.contains("embedding scale none"), "{first}");
        assert!(
            failures
                .iter()
                .any(|f| f.contains("first bad tensor `embeddings`")),
            "{failures:?}"
        );
    }

    /// GPT-Neo, from its recorded introspection: the sliding window under its own name
    /// (`window_size`) and the layers that slide (`attention_layers`) are read from the
    /// attention reach Transformers computes; a null MLP width is 4 × hidden_size; the
    /// projections live in the wrapped `attn.attention`.
    #[test]
    fn gpt_neo_window_and_layers_from_the_attention_reach() {
        let neo = plan::plan(&facts("gpt_neo"), "gpt_neo");
        assert!(neo
            .aliases
            .contains(&("sliding_window".to_owned(), "window_size".to_owned())));
        assert!(neo
            .aliases
            .contains(&("layer_types".to_owned(), "attention_layers".to_owned())));
        assert_eq!(neo.sliding_window.as_deref(), Some("sliding_window"));
        assert!(neo.layer_types_field);
        assert_eq!(
            neo.layer_rule,
            mlx_models::family::LayerRule::EveryNthFromFirst(2)
        );
        assert_eq!(neo.intermediate_per_hidden, Some(4));
        assert!(neo
            .renames
            .contains(&("attn.attention".to_owned(), "self_attn".to_owned())));
        assert!(neo.renames.contains(&(
            "attn.attention.out_proj".to_owned(),
            "self_attn.o_proj".to_owned()
        )));
        assert!(neo.gaps.is_empty(), "{:?}", neo.gaps);
    }

    /// GPT-NeoX-Japanese: only the last layer's attention holds `dense_bias`, a bare vector
    /// the layer adds after `dense`; the probes read it as `o_proj`'s bias on the last layer
    /// (at 2, 3 and 5 layers), the Hub's `rotary_emb_base`/`rotary_pct` as RoPE fields and
    /// `intermediate_multiple_size` as the MLP width in hidden_size units.
    #[test]
    fn gpt_neox_japanese_is_regenerated_exactly_with_the_last_layers_output_bias() {
        let (plan, choice, source) = regenerate("gpt_neox_japanese");
        assert_eq!(plan.o_bias_only, Some(plan::OnlyLayer::Last));
        assert_eq!(plan.o_bias, plan::Flag::Never);
        assert_eq!(
            plan.renames[0],
            (
                "attention.dense_bias".to_owned(),
                "self_attn.o_proj.bias".to_owned()
            )
        );
        for (common, own) in [
            ("rope_theta", "rotary_emb_base"),
            ("partial_rotary_factor", "rotary_pct"),
        ] {
            assert!(
                plan.aliases.contains(&(common.to_owned(), own.to_owned())),
                "{:?}",
                plan.aliases
            );
        }
        assert_eq!(
            plan.intermediate_multiple.as_deref(),
            Some("intermediate_multiple_size")
        );
        assert!(source.contains("if let Some(layer) = layers.last_mut() {"));
        // Seeded faults: the bias on the first layer, or on none, fail on the weights.
        for (only, error) in [
            (
                Some(plan::OnlyLayer::First),
                "missing weight `model.layers.0.self_attn.o_proj.bias`",
            ),
            (None, "unexpected weights"),
        ] {
            let mut wrong = plan.clone();
            wrong.o_bias_only = only;
            wrong.choices = vec![choice.clone()];
            let found = search(&wrong, &fixtures("gpt_neox_japanese")).expect("search runs");
            assert!(found.chosen.is_none());
            let (_, failures) = &found.tried[0];
            assert!(failures.iter().any(|f| f.contains(error)), "{failures:?}");
        }
    }

    /// Granite-MoE-Shared: the dense `shared_mlp` beside the experts of each layer is read as
    /// the block's ungated shared expert, its fused `input_linear` split by `sanitize_moe`;
    /// read as the layer's MLP instead (what the generator did before), the block the config
    /// asks for misses its shared expert.
    #[test]
    fn a_dense_mlp_beside_the_experts_is_the_shared_expert() {
        let (plan, choice, source) = regenerate("granitemoeshared");
        let moe = plan.moe.as_ref().expect("a mixture of experts");
        assert_eq!(moe.shared_expert, Some(false));
        assert_eq!(
            &plan.renames[..3],
            &[
                (
                    "shared_mlp.input_linear".to_owned(),
                    "mlp.shared_expert.gate_up_proj".to_owned()
                ),
                (
                    "shared_mlp.output_linear".to_owned(),
                    "mlp.shared_expert.down_proj".to_owned()
                ),
                ("shared_mlp".to_owned(), "mlp.shared_expert".to_owned()),
            ]
        );
        assert!(plan
            .fields
            .iter()
            .any(|f| f.name == "shared_intermediate_size"));
        assert!(!source.contains("\"mlp.gate_up_proj\""), "{source}");
        // Seeded fault: the shared MLP loaded as the layer's dense MLP.
        let mut wrong = plan.clone();
        for (_, to) in wrong.renames.iter_mut() {
            if let Some(rest) = to.strip_prefix("mlp.shared_expert") {
                *to = format!("mlp{rest}");
            }
        }
        wrong.choices = vec![choice];
        let found = search(&wrong, &fixtures("granitemoeshared")).expect("search runs");
        assert!(found.chosen.is_none());
        let (_, failures) = &found.tried[0];
        assert!(
            failures
                .iter()
                .any(|f| f.contains("missing weight `model.layers.0.mlp.shared_expert.")),
            "{failures:?}"
        );
    }

    /// ERNIE 4.5 MoE: expert counts under the class's own names (its attribute_map), the
    /// routing bias under a module of the router, softmax scores chosen with it and
    /// renormalized, biases on the shared experts by `use_bias`, experts on the layers
    /// `moe_layer_start_index`..=`moe_layer_end_index`. The shared experts without their
    /// biases fail the `options` fixture.
    #[test]
    fn ernie4_5_moe_is_regenerated_exactly_from_its_own_names_and_routing_bias() {
        let (plan, choice, _) = regenerate("ernie4_5_moe");
        for alias in [
            ("num_experts", "moe_num_experts"),
            ("num_experts_per_tok", "moe_k"),
        ] {
            assert!(
                plan.aliases
                    .contains(&(alias.0.to_owned(), alias.1.to_owned())),
                "{:?}",
                plan.aliases
            );
        }
        assert_eq!(
            plan.renames[0],
            (
                "mlp.gate.moe_statics.e_score_correction_bias".to_owned(),
                "mlp.gate.e_score_correction_bias".to_owned()
            )
        );
        let moe = plan.moe.as_ref().expect("a mixture of experts");
        let routing = moe.routing.as_ref().expect("routing probes");
        assert_eq!(
            (routing.scores, routing.correction_bias.as_deref()),
            (routing::Scores::Softmax, Some("e_score_correction_bias"))
        );
        assert_eq!(moe.shared_expert_bias, plan::Flag::Field("use_bias".into()));
        assert!(moe.dense_layers);
        let mut wrong = plan.clone();
        wrong.moe.as_mut().expect("moe").shared_expert_bias = plan::Flag::Never;
        wrong.choices = vec![choice];
        let found = search(&wrong, &fixtures("ernie4_5_moe")).expect("search runs");
        assert!(found.chosen.is_none());
        let (_, failures) = &found.tried[0];
        assert!(
            failures
                .iter()
                .any(|f| f.contains("unexpected weights") && f.contains("shared_expert")),
            "{failures:?}"
        );
    }

    /// AFMoE: the attention output gated by a projection of its own, a router whose linear
    /// layer is its `gate` initialised to zeros (the routing probes draw it) with a vector the
    /// block holds, `route_scale`, the period of the full layers from
    /// `global_attn_every_n_layers`, and `mup_enabled` read as embeddings × √hidden_size from
    /// its flag probe. Without the gate projection the fixtures fail on its weights.
    #[test]
    fn afmoe_is_regenerated_exactly_with_its_attention_gate_and_mup_flag() {
        let (plan, choice, _) = regenerate("afmoe");
        assert!(plan.gate_proj);
        assert_eq!(
            choice.embedding_scale,
            plan::Scalar::SqrtHiddenWhen("mup_enabled".into(), true)
        );
        assert_eq!(
            plan.layer_period.as_deref(),
            Some("global_attn_every_n_layers")
        );
        let routing = plan
            .moe
            .as_ref()
            .and_then(|m| m.routing.as_ref())
            .expect("routing probes");
        assert_eq!(
            (routing.scores, routing.scaled_by.as_deref()),
            (routing::Scores::Sigmoid, Some("route_scale"))
        );
        let mut wrong = plan.clone();
        wrong.gate_proj = false;
        wrong.choices = vec![choice];
        let found = search(&wrong, &fixtures("afmoe")).expect("search runs");
        assert!(found.chosen.is_none());
        let (_, failures) = &found.tried[0];
        assert!(
            failures
                .iter()
                .any(|f| f.contains("unexpected weights") && f.contains("self_attn.gate_proj")),
            "{failures:?}"
        );
    }

    /// Kolibri-1: the routing bias joins the logits, not the sigmoid scores, for the choice
    /// (read from the routing probes); with the bias on the scores instead, the fixtures
    /// route other experts and fail.
    #[test]
    fn kolibri1_routes_by_logit_plus_bias_and_the_score_bias_fails() {
        let (plan, choice, _) = regenerate("kolibri1");
        let routing = plan
            .moe
            .as_ref()
            .and_then(|m| m.routing.as_ref())
            .expect("routing probes");
        assert_eq!(routing.scores, routing::Scores::SigmoidBiasOnLogits);
        assert!(routing.correction_bias.is_some());
        let mut wrong = plan.clone();
        if let Some(r) = wrong.moe.as_mut().and_then(|m| m.routing.as_mut()) {
            r.scores = routing::Scores::Sigmoid;
        }
        wrong.choices = vec![choice];
        let found = search(&wrong, &fixtures("kolibri1")).expect("search runs");
        assert!(found.chosen.is_none(), "{:?}", found.tried);
    }

    /// Which one layer holds a parameter, from the tiny model and the layer-count probes:
    /// the last at every count, the first at every count, or a gap when the counts disagree
    /// or none was probed.
    #[test]
    fn a_parameter_on_one_layer_is_read_as_first_or_last_at_every_layer_count() {
        let facts = facts("gpt_neox_japanese");
        let params = |held: &[usize]| -> std::collections::BTreeMap<String, Vec<i64>> {
            (0..2)
                .flat_map(|i| {
                    let mut names = vec![format!("model.layers.{i}.self_attn.o_proj.weight")];
                    if held.contains(&i) {
                        names.push(format!("model.layers.{i}.self_attn.o_proj.bias"));
                    }
                    names
                })
                .map(|n| (n, vec![64]))
                .collect()
        };
        let renames = vec![(
            "attention.dense_bias".to_owned(),
            "self_attn.o_proj.bias".to_owned(),
        )];
        let rule = |facts: &Value, held: &[usize]| {
            plan::only_layer(facts, &params(held), &renames, "self_attn.o_proj.bias")
        };
        assert_eq!(rule(&facts, &[1]), Ok(Some(plan::OnlyLayer::Last)));
        assert_eq!(rule(&facts, &[0, 1]), Ok(None));
        assert_eq!(rule(&facts, &[]), Ok(None));
        // The probes say the last layer; a tiny model holding it on layer 0 disagrees.
        assert!(rule(&facts, &[0]).is_err());
        // Probes that say the first layer at every count.
        let mut first = facts.clone();
        for probe in first["layer_presence_probes"].as_array_mut().unwrap() {
            probe["partial"]["attention.dense_bias"] = serde_json::json!([0]);
        }
        assert_eq!(rule(&first, &[0]), Ok(Some(plan::OnlyLayer::First)));
        // Seeded fault: one count that says layer 1 of 5 (neither rule) is a gap.
        let mut odd = facts.clone();
        odd["layer_presence_probes"][1]["partial"]["attention.dense_bias"] = serde_json::json!([1]);
        let gap = rule(&odd, &[1]).unwrap_err();
        assert!(gap.contains("[1] of 5"), "{gap}");
        // No other layer count probed: layer 1 of 2 could be "the last" or "layer 1".
        let mut unprobed = facts.clone();
        unprobed["layer_presence_probes"] = serde_json::json!([]);
        assert!(rule(&unprobed, &[1]).is_err());
    }
}
