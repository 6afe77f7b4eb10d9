//! Any bytes as a GGUF file: validated, mapped to a model and, if that works, two greedy
//! tokens generated. Every outcome but a typed error or a model is a bug.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mlx_models::generate::GenerateOptions;
use mlx_models::gguf::GgufFile;
use mlx_models::load::{load_gguf_file, LoadOptions};
use mlx_models::SamplerBuilder;

fuzz_target!(|data: &[u8]| {
    let Ok(file) = GgufFile::from_bytes("fuzz.gguf", data.to_vec()) else {
        return;
    };
    let Ok(model) = load_gguf_file(&file, &LoadOptions::new()) else {
        return;
    };
    let options = GenerateOptions::new()
        .max_tokens(2)
        .sampler(SamplerBuilder::default().temperature(0.0));
    if let Ok(stream) = model.generate(&[0, 1], options) {
        for token in stream {
            if token.is_err() {
                break;
            }
        }
    }
});
