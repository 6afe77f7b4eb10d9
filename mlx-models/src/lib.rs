//! Language models on MLX.

pub mod error;
pub mod runtime;

pub use error::{Error, Result};
