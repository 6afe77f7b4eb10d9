//! `cargo xtask …`: the project's own tasks.

mod bench;
mod bench_serve;
mod fixtures;
mod port;
mod verify;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "mlx-models project tasks")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Benchmarks, each printing JSON lines.
    Bench(bench::Args),
    /// Reference fixtures exported from Hugging Face Transformers.
    Fixtures(fixtures::Args),
    /// Port a Transformers model type: generate its module, export and verify fixtures,
    /// write PORT_REPORT.md.
    Port(port::Args),
    /// Verify models against their Transformers fixtures, layer by layer.
    Verify(verify::Args),
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Bench(args) => bench::run(args),
        Command::Fixtures(args) => fixtures::run(args),
        Command::Port(args) => port::run(args),
        Command::Verify(args) => verify::run(args),
    }
}
