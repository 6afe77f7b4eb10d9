//! Any bytes as a safetensors file: the header check must answer Ok or a typed error.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    let _ = mlx_models::weights::check_safetensors_bytes(Path::new("fuzz.safetensors"), data);
});
