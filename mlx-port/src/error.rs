//! Errors of the porting toolkit.

use std::path::PathBuf;

/// What can go wrong reading fixtures or running a verification.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PortError {
    /// A fixture directory is incomplete or malformed.
    #[error("fixture {path}: {message}")]
    Fixture { path: PathBuf, message: String },

    /// Loading or running the model failed.
    #[error(transparent)]
    Model(#[from] mlx_models::Error),

    /// An MLX operation failed.
    #[error("MLX: {0}")]
    Mlx(#[from] mlx_rs::error::Exception),
}

pub type Result<T, E = PortError> = std::result::Result<T, E>;
