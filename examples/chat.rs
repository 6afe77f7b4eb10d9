//! A two-turn conversation; the second turn reuses the cache of the first.
//! (`cargo run --release --bin mlx-models -- chat` is the interactive version.)
//!
//! ```text
//! cargo run --release --example chat
//! ```

use mlx_models::chat::ChatSession;
use mlx_models::generate::GenerateOptions;
use mlx_models::load::{load, LoadOptions, ModelSource};

fn main() -> Result<(), mlx_models::Error> {
    let model = load(&ModelSource::Default, &LoadOptions::new())?;
    let mut chat = ChatSession::new(&model).with_system("You are a concise geography tutor.");
    for question in [
        "What is the capital of France?",
        "And what river runs through it?",
    ] {
        println!(">> {question}");
        let mut reply = chat.send(question, GenerateOptions::new().max_tokens(64))?;
        for token in &mut reply {
            print!("{}", token?.text);
        }
        println!();
        eprintln!(
            "[{} prompt tokens, {} reused from the cache; {:.1} tokens/s]",
            reply.stats().prompt_tokens,
            chat.reused_tokens(),
            reply.stats().generation_tokens_per_second()
        );
        chat.record(reply);
    }
    Ok(())
}
