//! `cargo xtask verify <model_type | fixture dir>…`: runs the harness, prints the tables,
//! exits non-zero on any failure.

use anyhow::bail;
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
    /// Also write each report as JSON into this directory.
    #[arg(long)]
    json: Option<PathBuf>,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let dirs = select(&args.fixtures, &args.targets)?;
    let mut failed = Vec::new();
    for dir in &dirs {
        let fixture = Fixture::load(dir)?;
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
    println!(
        "{} fixtures verified, {} passed, {} failed",
        dirs.len(),
        dirs.len() - failed.len(),
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
