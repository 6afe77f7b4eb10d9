//! One answer from the default model (SmolLM2-135M-Instruct), printed with its speed.
//!
//! ```text
//! cargo run --release --example generate -- "Why is the sky blue?"
//! ```

use mlx_models::generate::GenerateOptions;
use mlx_models::load::{load, LoadOptions, ModelSource};
use mlx_models::Message;

fn main() -> Result<(), mlx_models::Error> {
    let question = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "What is the capital of France?".to_owned());
    let model = load(&ModelSource::Default, &LoadOptions::new())?;
    let prompt = model.chat_prompt(&[Message::user(question)])?;
    let mut stream = model.generate(&prompt, GenerateOptions::new().max_tokens(128))?;
    let answer = (&mut stream)
        .map(|t| t.map(|t| t.text))
        .collect::<Result<String, _>>()?;
    println!("{answer}");
    eprintln!("{}", stream.stats());
    Ok(())
}
