//! Language models on MLX.

pub mod attention;
pub mod cache;
pub mod config;
pub mod error;
pub mod generate;
pub mod load;
pub mod models;
pub mod nn;
pub mod rope;
pub mod runtime;
pub mod tap;
pub mod weights;

pub use error::{Error, Result};
