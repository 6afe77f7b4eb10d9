//! Porting toolkit: fixtures exported from Transformers, the comparison engine, the
//! checks a port must pass and their reports.
//!
//! ```no_run
//! use mlx_port::{fixture::Fixture, checks::{verify, VerifyOptions}};
//! let fixture = Fixture::load("tests/fixtures/llama/default-tied".as_ref())?;
//! let report = verify(&fixture, &VerifyOptions::default())?;
//! println!("{}", report.to_markdown());
//! assert!(report.passed());
//! # Ok::<(), mlx_port::error::PortError>(())
//! ```

pub mod checks;
pub mod compare;
pub mod error;
pub mod fixture;
pub mod quantization;
pub mod report;

pub use checks::{verify, verify_with, Builder, VerifyOptions};
pub use error::PortError;
pub use fixture::Fixture;
pub use report::Report;
