//! Streams tokens as they are generated, sampling with a temperature and a seed.
//!
//! ```text
//! cargo run --release --example stream -- "Tell me a short story about a robot."
//! ```

use mlx_models::generate::GenerateOptions;
use mlx_models::load::{load, LoadOptions, ModelSource};
use mlx_models::{Message, Sampler};
use std::io::Write;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let prompt = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "Tell me a short story about a robot.".to_owned());
    let model = load(&ModelSource::Default, &LoadOptions::new())?;
    let ids = model.chat_prompt(&[Message::user(prompt)])?;
    let options = GenerateOptions::new()
        .max_tokens(200)
        .sampler(Sampler::builder().temperature(0.7).top_p(0.9).seed(7));
    let mut stream = model.generate(&ids, options)?;
    let mut out = std::io::stdout();
    for token in &mut stream {
        write!(out, "{}", token?.text)?;
        out.flush()?;
    }
    println!();
    eprintln!("finished: {:?}\n{}", stream.finish_reason(), stream.stats());
    Ok(())
}
