//! `cargo xtask verify <model_type | fixture dir>…`: runs the harness and the
//! quantization drift check (8- and 4-bit), prints the tables, exits non-zero on any
//! failure.

use anyhow::bail;
use mlx_models::convert::QuantFault;
use mlx_port::quantization::{quantization_drift, BITS};
use mlx_port::{fixture, verify, Fixture, VerifyOptions};
use std::path::{Path, PathBuf};

#[derive(clap::Args)]
pub struct Args {
    /// Model types (fixtures under tests/fixtures/<type>/) or fixture directories; all
    /// fixtures when empty.
    targets: Vec<String>,
    /// Where fixtures live.
    #[arg(long, default_value = "tests/fixtures")]
    fixtures: PathBuf,
    /// Also write each report as JSON into this directory (quantization drifts under `drift/`).
    #[arg(long)]
    json: Option<PathBuf>,
    /// Only the quantization drift check (not the layer-by-layer harness).
    #[arg(long)]
    quantization_only: bool,
    /// Seed a quantizer bug, to see the drift bound catch it.
    #[arg(long, value_parser = ["group-size", "dropped-biases", "scales-dtype"])]
    fault: Option<String>,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let dirs = select(&args.fixtures, &args.targets)?;
    let mut failed = Vec::new();
    let fault = args.fault.as_deref().map(|f| match f {
        "group-size" => QuantFault::GroupSize,
        "dropped-biases" => QuantFault::DroppedBiases,
        _ => QuantFault::ScalesDtype,
    });
    for dir in &dirs {
        let fixture = Fixture::load(dir)?;
        if !args.quantization_only {
            let report = verify(&fixture, &VerifyOptions::default())?;
            println!("{}", report.to_markdown());
            if let Some(out) = &args.json {
                std::fs::create_dir_all(out)?;
                let file = out.join(format!("{}.json", report.fixture.replace('/', "-")));
                std::fs::write(file, report.to_json())?;
            }
            if !report.passed() {
                failed.push(report.fixture.clone());
            }
        }
        for bits in BITS {
            match quantization_drift(&fixture, bits, fault) {
                Ok(drift) => {
                    println!("{drift}");
                    if let Some(out) = &args.json {
                        let dir = out.join("drift");
                        std::fs::create_dir_all(&dir)?;
                        let name = format!("{}-{bits}.json", drift.fixture.replace('/', "-"));
                        std::fs::write(dir.join(name), serde_json::to_string_pretty(&drift)?)?;
                    }
                    if !drift.passed() {
                        failed.push(format!("{} ({bits}-bit drift)", drift.fixture));
                    }
                }
                Err(e) => {
                    println!("{} {bits}-bit: {e}", fixture.name());
                    failed.push(format!("{} ({bits}-bit: {e})", fixture.name()));
                }
            }
        }
    }
    println!(
        "{} fixtures verified, {} checks failed",
        dirs.len(),
        failed.len()
    );
    if !failed.is_empty() {
        bail!("verification failed: {}", failed.join(", "));
    }
    Ok(())
}

fn select(root: &Path, targets: &[String]) -> anyhow::Result<Vec<PathBuf>> {
    if targets.is_empty() {
        return Ok(fixture::discover(root));
    }
    let mut dirs = Vec::new();
    for target in targets {
        let as_dir = PathBuf::from(target);
        let found = if as_dir.join("fixture.json").exists() {
            vec![as_dir]
        } else {
            fixture::discover(&root.join(target))
        };
        if found.is_empty() {
            bail!(
                "no fixtures for `{target}` (looked in {} and {})",
                target,
                root.join(target).display()
            );
        }
        dirs.extend(found);
    }
    Ok(dirs)
}
