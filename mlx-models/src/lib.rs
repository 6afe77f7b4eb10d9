//! Language models on MLX.

pub mod runtime;
