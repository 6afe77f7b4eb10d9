//! Tokenizer tests against ids and text produced by the Python `tokenizers` library and
//! Transformers (see tests/data/text/generate.py), on real tokenizer.json files.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use proptest::prelude::*;
use serde_json::Value;

use super::*;
use crate::chat_template::{ChatTemplateOptions, Message};

fn data(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(path)
}

fn json(path: &str) -> Value {
    serde_json::from_slice(&std::fs::read(data(path)).unwrap()).unwrap()
}

fn gpt2() -> &'static Tokenizer {
    static TOKENIZER: OnceLock<Tokenizer> = OnceLock::new();
    TOKENIZER.get_or_init(|| Tokenizer::from_dir(data("tokenizers/gpt2")).unwrap())
}

fn llama2() -> &'static Tokenizer {
    static TOKENIZER: OnceLock<Tokenizer> = OnceLock::new();
    TOKENIZER.get_or_init(|| Tokenizer::from_dir(data("tokenizers/llama2")).unwrap())
}

fn ids(value: &Value) -> Vec<u32> {
    value
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect()
}

#[test]
fn text_types_can_move_between_threads() {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<Tokenizer>();
    send_sync::<StreamDecoder>();
    send_sync::<crate::sampling::Sampler>();
    send_sync::<crate::chat_template::ChatTemplate>();
}

#[test]
fn gpt2_hello_world() {
    let tokenizer = gpt2();
    assert_eq!(
        tokenizer.encode("Hello world", true).unwrap(),
        vec![15496, 995]
    );
    assert_eq!(
        tokenizer.decode(&[15496, 995], false).unwrap(),
        "Hello world"
    );
    assert_eq!(tokenizer.vocab_size(), 50257);
    assert_eq!(tokenizer.bos_token(), Some("<|endoftext|>"));
    assert_eq!(tokenizer.eos_token_ids(), &[50256]);
    assert_eq!(tokenizer.token_to_id("Ġworld"), Some(995));
    assert_eq!(tokenizer.id_to_token(995).as_deref(), Some("Ġworld"));
    assert!(tokenizer.chat_template().is_none());
}

/// Every text of tokenizer_ids.json: ids with and without special tokens, and both decodes.
fn check_against_python(name: &str, tokenizer: &Tokenizer) {
    let expectations = json("text/tokenizer_ids.json");
    let cases = expectations[name].as_array().unwrap();
    assert!(cases.len() >= 10);
    for case in cases {
        let text = case["text"].as_str().unwrap();
        let with_special = tokenizer.encode(text, true).unwrap();
        assert_eq!(with_special, ids(&case["ids"]), "{name}: {text:?}");
        assert_eq!(
            tokenizer.encode(text, false).unwrap(),
            ids(&case["ids_no_special"]),
            "{name}: {text:?}"
        );
        assert_eq!(
            tokenizer.decode(&with_special, false).unwrap(),
            case["decoded"].as_str().unwrap(),
            "{name}: {text:?}"
        );
        assert_eq!(
            tokenizer.decode(&with_special, true).unwrap(),
            case["decoded_skip_special"].as_str().unwrap(),
            "{name}: {text:?}"
        );
    }
}

#[test]
fn gpt2_matches_python_on_unicode_text() {
    check_against_python("gpt2", gpt2());
    // Transformers' GPT2Tokenizer agrees with tokenizer.json on every text.
    let expectations = json("text/tokenizer_ids.json");
    assert!(expectations["gpt2"]
        .as_array()
        .unwrap()
        .iter()
        .all(|c| c["transformers_agrees"] == true));
}

#[test]
fn gpt2_round_trips_unicode_text() {
    let tokenizer = gpt2();
    for text in [
        "Café naïve 你好 👨‍👩‍👧‍👦 🏳️‍🌈",
        "line1\nline2\r\n\t  x  ",
        "",
        " ",
        "Ω≈ç√∫˜µ≤≥÷ 𝕳𝖊𝖑𝖑𝖔",
    ] {
        let ids = tokenizer.encode(text, false).unwrap();
        assert_eq!(tokenizer.decode(&ids, false).unwrap(), text);
    }
}

#[test]
fn llama2_sentencepiece_matches_python() {
    let tokenizer = llama2();
    check_against_python("llama2", tokenizer);
    assert_eq!(
        tokenizer.encode("Hello world", true).unwrap(),
        vec![1, 22557, 1526]
    );
    assert_eq!(tokenizer.bos_token(), Some("<s>"));
    assert_eq!(tokenizer.bos_token_id(), Some(1));
    assert_eq!(tokenizer.eos_token(), Some("</s>"));
    assert_eq!(tokenizer.eos_token_ids(), &[2]);
    assert_eq!(tokenizer.special_token("unk_token"), Some("<unk>"));
    // Byte fallback: a character outside the vocabulary decodes back from its bytes.
    let ids = tokenizer.encode("🦀", false).unwrap();
    assert!(ids.len() > 1);
    assert_eq!(tokenizer.decode(&ids, false).unwrap(), "🦀");
}

#[test]
fn decode_rejects_ids_outside_the_vocabulary() {
    match gpt2().decode(&[15496, 50257], false) {
        Err(Error::Tokenizer { path, message }) => {
            assert_eq!(path, Some(data("tokenizers/gpt2/tokenizer.json")));
            assert!(message.contains("50257"), "{message}");
        }
        other => panic!("expected a tokenizer error, got {other:?}"),
    }
    assert!(matches!(
        gpt2().stream_decoder().push(99_999),
        Err(Error::Tokenizer { .. })
    ));
}

/// What a stream decoder emits for `ids`: the chunks, then what `finish` returns.
fn stream(tokenizer: &Tokenizer, ids: &[u32], skip_special_tokens: bool) -> (Vec<String>, String) {
    let mut decoder = tokenizer
        .stream_decoder()
        .skip_special_tokens(skip_special_tokens);
    let chunks = ids
        .iter()
        .filter_map(|&id| decoder.push(id).unwrap())
        .collect();
    assert_eq!(decoder.tokens(), ids);
    (chunks, decoder.finish().unwrap())
}

#[test]
fn stream_decoder_holds_split_characters() {
    let tokenizer = gpt2();
    // "🦀" is three byte-level tokens; nothing comes out until the last one.
    let ids = tokenizer.encode("a🦀b", false).unwrap();
    assert!(ids.len() >= 4, "{ids:?}");
    let mut decoder = tokenizer.stream_decoder();
    let outputs: Vec<Option<String>> = ids.iter().map(|&id| decoder.push(id).unwrap()).collect();
    assert_eq!(outputs.first().unwrap().as_deref(), Some("a"));
    assert!(
        outputs[1..ids.len() - 2].iter().all(Option::is_none),
        "{outputs:?}"
    );
    assert_eq!(outputs[ids.len() - 2].as_deref(), Some("🦀"));
    assert_eq!(outputs.last().unwrap().as_deref(), Some("b"));
    assert_eq!(decoder.finish().unwrap(), "");
}

#[test]
fn stream_decoder_keeps_sentencepiece_spaces() {
    let tokenizer = llama2();
    let ids = tokenizer.encode("Hello world, how are you?", true).unwrap();
    let (chunks, rest) = stream(tokenizer, &ids, true);
    assert_eq!(chunks.concat() + &rest, "Hello world, how are you?");
    assert_eq!(chunks[0], "Hello");
    assert_eq!(chunks[1], " world");
    let (chunks, rest) = stream(tokenizer, &ids, false);
    assert_eq!(
        chunks.concat() + &rest,
        tokenizer.decode(&ids, false).unwrap()
    );
}

#[test]
fn stream_decoder_finish_flushes_an_incomplete_character() {
    let tokenizer = gpt2();
    let ids = tokenizer.encode("x🦀", false).unwrap();
    let cut = &ids[..ids.len() - 1];
    let (chunks, rest) = stream(tokenizer, cut, false);
    assert_eq!(chunks, vec!["x".to_owned()]);
    assert_eq!(format!("x{rest}"), tokenizer.decode(cut, false).unwrap());
    assert!(rest.contains('\u{FFFD}'));
}

fn text_strategy() -> impl Strategy<Value = String> {
    prop_oneof![
        "\\PC{0,30}",
        "[a-zA-Z0-9 \\n\\t.,!?'éüßçñ你好世界日本語한국어😀🦀👍🏽👨\u{200d}👩\u{200d}👧🏳️\u{200d}🌈\u{301}]{0,40}",
    ]
    .prop_filter("no replacement character in the input", |s| !s.contains('\u{FFFD}'))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    #[test]
    fn stream_chunks_add_up_to_decode(text in text_strategy(), skip in any::<bool>()) {
        for tokenizer in [gpt2(), llama2()] {
            let mut ids = tokenizer.encode(&text, true).unwrap();
            ids.extend(tokenizer.eos_token_ids());
            let (chunks, rest) = stream(tokenizer, &ids, skip);
            for chunk in &chunks {
                prop_assert!(!chunk.contains('\u{FFFD}'), "chunk {:?} of {:?}", chunk, text);
            }
            prop_assert_eq!(chunks.concat() + &rest, tokenizer.decode(&ids, skip).unwrap());
        }
    }

    #[test]
    fn gpt2_round_trips_any_text(text in text_strategy()) {
        let ids = gpt2().encode(&text, false).unwrap();
        prop_assert_eq!(gpt2().decode(&ids, false).unwrap(), text);
    }
}

/// A copy of the GPT-2 tokenizer directory with other companion files.
fn gpt2_dir_with(files: &[(&str, &str)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        data("tokenizers/gpt2/tokenizer.json"),
        dir.path().join("tokenizer.json"),
    )
    .unwrap();
    for (name, content) in files {
        let path = dir.path().join(name);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, content).unwrap();
    }
    dir
}

#[test]
fn tokenizer_config_special_tokens_and_chat_template() {
    let config = r#"{
        "bos_token": {"content": "<|endoftext|>", "lstrip": false},
        "eos_token": "<|endoftext|>",
        "pad_token": null,
        "chat_template": "{{ bos_token }}{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}{{ eos_token if not add_generation_prompt }}"
    }"#;
    let dir = gpt2_dir_with(&[("tokenizer_config.json", config)]);
    let tokenizer = Tokenizer::from_dir(dir.path()).unwrap();
    assert_eq!(tokenizer.bos_token(), Some("<|endoftext|>"));
    assert_eq!(tokenizer.special_token("pad_token"), None);
    let messages = [Message::system("be nice"), Message::user("hi")];
    let out = tokenizer
        .apply_chat_template(&messages, &ChatTemplateOptions::new())
        .unwrap();
    assert_eq!(out, "<|endoftext|>system: be nice\nuser: hi\n<|endoftext|>");
    let out = tokenizer
        .apply_chat_template(
            &messages,
            &ChatTemplateOptions::new().add_generation_prompt(true),
        )
        .unwrap();
    assert_eq!(out, "<|endoftext|>system: be nice\nuser: hi\n");
    // The special tokens are matched whole when the prompt is encoded.
    assert_eq!(tokenizer.encode(&out, false).unwrap()[0], 50256);
}

#[test]
fn add_bos_token_rewrites_the_post_processor_like_transformers() {
    let config = r#"{"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "add_bos_token": true, "add_eos_token": true}"#;
    let dir = gpt2_dir_with(&[("tokenizer_config.json", config)]);
    let tokenizer = Tokenizer::from_dir(dir.path()).unwrap();
    assert_eq!(
        tokenizer.encode("Hello world", true).unwrap(),
        vec![50256, 15496, 995, 50256]
    );
    assert_eq!(
        tokenizer.encode("Hello world", false).unwrap(),
        vec![15496, 995]
    );
    let config = r#"{"bos_token": "<|endoftext|>", "add_bos_token": false}"#;
    let dir = gpt2_dir_with(&[("tokenizer_config.json", config)]);
    assert_eq!(
        Tokenizer::from_dir(dir.path())
            .unwrap()
            .encode("Hello world", true)
            .unwrap(),
        vec![15496, 995]
    );
}

#[test]
fn named_templates_and_template_files() {
    let config = r#"{"eos_token": "<|endoftext|>", "chat_template": [
        {"name": "default", "template": "default:{{ messages|length }}"},
        {"name": "tool_use", "template": "tools:{{ tools|length }}"},
        {"name": "rag", "template": "rag:{{ documents|length }}"}
    ]}"#;
    let dir = gpt2_dir_with(&[("tokenizer_config.json", config)]);
    let tokenizer = Tokenizer::from_dir(dir.path()).unwrap();
    let messages = [Message::user("hi")];
    assert_eq!(
        tokenizer.chat_template_names(),
        vec!["default", "tool_use", "rag"]
    );
    assert_eq!(
        tokenizer.chat_template(),
        Some("default:{{ messages|length }}")
    );
    assert_eq!(
        tokenizer
            .apply_chat_template(&messages, &ChatTemplateOptions::new())
            .unwrap(),
        "default:1"
    );
    let tools = ChatTemplateOptions::new().tools(vec![
        serde_json::json!({"name": "f"}),
        serde_json::json!({"name": "g"}),
    ]);
    assert_eq!(
        tokenizer.apply_chat_template(&messages, &tools).unwrap(),
        "tools:2"
    );
    let rag = ChatTemplateOptions::new()
        .template_name("rag")
        .documents(vec![serde_json::json!({"text": "d"})]);
    assert_eq!(
        tokenizer.apply_chat_template(&messages, &rag).unwrap(),
        "rag:1"
    );
    match tokenizer
        .apply_chat_template(&messages, &ChatTemplateOptions::new().template_name("nope"))
    {
        Err(Error::NoChatTemplate {
            requested,
            available,
        }) => {
            assert_eq!(requested.as_deref(), Some("nope"));
            assert_eq!(available, vec!["default", "rag", "tool_use"]);
        }
        other => panic!("expected NoChatTemplate, got {other:?}"),
    }

    // chat_template.jinja and additional_chat_templates/ replace the config's templates.
    let dir = gpt2_dir_with(&[
        ("tokenizer_config.json", config),
        (
            "chat_template.jinja",
            "from file {{ messages[0].content }}\n",
        ),
        ("additional_chat_templates/tool_use.jinja", "tool file"),
    ]);
    let tokenizer = Tokenizer::from_dir(dir.path()).unwrap();
    assert_eq!(tokenizer.chat_template_names(), vec!["default", "tool_use"]);
    assert_eq!(
        tokenizer
            .apply_chat_template(&messages, &ChatTemplateOptions::new())
            .unwrap(),
        "from file hi"
    );
    assert_eq!(
        tokenizer.apply_chat_template(&messages, &tools).unwrap(),
        "tool file"
    );
}

#[test]
fn without_a_template_apply_is_a_typed_error() {
    match gpt2().apply_chat_template(&[Message::user("hi")], &ChatTemplateOptions::new()) {
        Err(Error::NoChatTemplate {
            requested: None,
            available,
        }) => assert!(available.is_empty()),
        other => panic!("expected NoChatTemplate, got {other:?}"),
    }
    let mut tokenizer = gpt2().clone();
    assert!(matches!(
        tokenizer.set_chat_template("{% for %}"),
        Err(Error::ChatTemplate { .. })
    ));
    tokenizer
        .set_chat_template("[{{ messages[0].content }}]")
        .unwrap();
    assert_eq!(
        tokenizer
            .apply_chat_template(&[Message::user("hi")], &ChatTemplateOptions::new())
            .unwrap(),
        "[hi]"
    );
}

#[test]
fn a_broken_template_does_not_stop_loading() {
    let config = r#"{"chat_template": "{% if %}"}"#;
    let dir = gpt2_dir_with(&[("tokenizer_config.json", config)]);
    let tokenizer = Tokenizer::from_dir(dir.path()).unwrap();
    assert_eq!(
        tokenizer.encode("Hello world", false).unwrap(),
        vec![15496, 995]
    );
    let err = tokenizer
        .apply_chat_template(&[Message::user("hi")], &ChatTemplateOptions::new())
        .unwrap_err();
    assert!(matches!(err, Error::ChatTemplate { .. }), "{err:?}");
}

#[test]
fn generation_config_adds_end_of_sequence_ids() {
    let dir = gpt2_dir_with(&[
        ("tokenizer_config.json", r#"{"eos_token": "<|endoftext|>"}"#),
        (
            "generation_config.json",
            r#"{"eos_token_id": [50256, 198], "bos_token_id": 50256, "do_sample": true}"#,
        ),
    ]);
    let mut tokenizer = Tokenizer::from_dir(dir.path()).unwrap();
    assert_eq!(tokenizer.eos_token_ids(), &[50256, 198]);
    assert_eq!(tokenizer.bos_token_id(), Some(50256));
    tokenizer.add_eos_token_ids([198, 13]);
    assert_eq!(tokenizer.eos_token_ids(), &[50256, 198, 13]);
}

#[test]
fn malformed_files_are_errors_naming_the_file() {
    // tokenizer.json: not JSON, and JSON of the wrong shape.
    for content in ["{ not json", r#"{"model": {"type": "Nope"}}"#] {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokenizer.json");
        std::fs::write(&path, content).unwrap();
        match Tokenizer::from_file(&path) {
            Err(Error::Tokenizer { path: Some(p), .. }) => assert_eq!(p, path),
            other => panic!("expected a tokenizer error naming {path:?}, got {other:?}"),
        }
        let err = Tokenizer::from_dir(dir.path()).unwrap_err();
        assert!(err.to_string().contains("tokenizer.json"), "{err}");
    }
    let missing = tempfile::tempdir().unwrap();
    match Tokenizer::from_dir(missing.path()) {
        Err(Error::Io { path, .. }) => assert_eq!(path, missing.path().join("tokenizer.json")),
        other => panic!("expected an I/O error, got {other:?}"),
    }

    // tokenizer_config.json: invalid JSON, then fields of the wrong type.
    let dir = gpt2_dir_with(&[("tokenizer_config.json", "{\"bos_token\": ")]);
    match Tokenizer::from_dir(dir.path()) {
        Err(Error::Json { path, .. }) => assert_eq!(path, dir.path().join("tokenizer_config.json")),
        other => panic!("expected a JSON error, got {other:?}"),
    }
    for (config, bad_field) in [
        (r#"{"bos_token": 5}"#, "bos_token"),
        (r#"{"eos_token": {"lstrip": true}}"#, "eos_token"),
        (r#"{"chat_template": 3}"#, "chat_template"),
        (r#"{"chat_template": [{"name": "x"}]}"#, "chat_template"),
        (r#"{"add_bos_token": "yes"}"#, "add_bos_token"),
        ("[1, 2]", "<root>"),
    ] {
        let dir = gpt2_dir_with(&[("tokenizer_config.json", config)]);
        match Tokenizer::from_dir(dir.path()) {
            Err(Error::Config { path, field, .. }) => {
                assert_eq!(path, dir.path().join("tokenizer_config.json"));
                assert_eq!(field, bad_field);
            }
            other => panic!("{config}: expected a config error, got {other:?}"),
        }
    }
    let dir = gpt2_dir_with(&[("generation_config.json", r#"{"eos_token_id": "x"}"#)]);
    match Tokenizer::from_dir(dir.path()) {
        Err(Error::Json { path, .. }) => {
            assert_eq!(path, dir.path().join("generation_config.json"))
        }
        other => panic!("expected a JSON error, got {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// Tokenizers from GGUF vocabulary metadata.

/// GPT-2's vocabulary as a GGUF would store it (the same spec generate.py writes).
fn gpt2_spec(pre: &str) -> VocabSpec {
    let file = json("tokenizers/gpt2/tokenizer.json");
    let vocab = file["model"]["vocab"].as_object().unwrap();
    let mut tokens = vec![String::new(); vocab.len()];
    for (token, id) in vocab {
        tokens[id.as_u64().unwrap() as usize] = token.clone();
    }
    let merges = file["model"]["merges"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m.as_str().unwrap().to_owned())
        .collect();
    let mut token_types = vec![1; tokens.len()];
    token_types[50256] = TOKEN_TYPE_CONTROL;
    VocabSpec {
        pre: Some(pre.to_owned()),
        merges: Some(merges),
        token_types: Some(token_types),
        bos_token_id: Some(50256),
        eos_token_id: Some(50256),
        ..VocabSpec::new("gpt2", tokens)
    }
}

/// The SentencePiece vocabulary with made-up scores (-id for normal pieces), as generate.py.
fn llama_spec() -> VocabSpec {
    let file = json("tokenizers/llama2/tokenizer.json");
    let vocab = file["model"]["vocab"].as_object().unwrap();
    let mut tokens = vec![String::new(); vocab.len()];
    for (token, id) in vocab {
        tokens[id.as_u64().unwrap() as usize] = token.clone();
    }
    let token_types: Vec<i32> = tokens
        .iter()
        .enumerate()
        .map(|(id, token)| match id {
            0 => 2,
            1 | 2 => 3,
            _ if token.len() == 6 && token.starts_with("<0x") && token.ends_with('>') => 6,
            _ => 1,
        })
        .collect();
    let scores = token_types
        .iter()
        .enumerate()
        .map(|(id, &kind)| if kind == 1 { -(id as f32) } else { 0.0 })
        .collect();
    VocabSpec {
        scores: Some(scores),
        token_types: Some(token_types),
        bos_token_id: Some(1),
        eos_token_id: Some(2),
        unk_token_id: Some(0),
        ..VocabSpec::new("llama", tokens)
    }
}

fn check_vocab_case(name: &str, spec: VocabSpec) {
    let expectations = json("text/vocab_ids.json");
    let expected = &expectations[name];
    assert!(expected.is_object(), "no expectations for {name}");
    let tokenizer = Tokenizer::from_vocab(spec).unwrap();
    assert_eq!(
        tokenizer.bos_token(),
        expected["bos_token"].as_str(),
        "{name}"
    );
    assert_eq!(
        tokenizer.eos_token(),
        expected["eos_token"].as_str(),
        "{name}"
    );
    assert_eq!(
        tokenizer.vocab_size() as u64,
        expected["vocab_size"].as_u64().unwrap(),
        "{name}"
    );
    for case in expected["cases"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        let ids_expected = ids(&case["ids"]);
        assert_eq!(
            tokenizer.encode(text, true).unwrap(),
            ids_expected,
            "{name}: {text:?}"
        );
        assert_eq!(
            tokenizer.decode(&ids_expected, false).unwrap(),
            case["decoded"].as_str().unwrap(),
            "{name}: {text:?}"
        );
    }
}

#[test]
fn gguf_gpt2_vocabulary_matches_transformers() {
    check_vocab_case("gpt2", gpt2_spec("gpt2"));
    check_vocab_case(
        "gpt2-add-bos",
        VocabSpec {
            add_bos_token: Some(true),
            ..gpt2_spec("gpt2")
        },
    );
    let mut user_defined = gpt2_spec("gpt2");
    let ing = user_defined.tokens.iter().position(|t| t == "ing").unwrap();
    user_defined.token_types.as_mut().unwrap()[ing] = TOKEN_TYPE_USER_DEFINED;
    check_vocab_case("gpt2-user-defined", user_defined);
}

#[test]
fn gguf_llama3_and_qwen2_splits_match_transformers() {
    check_vocab_case("llama-bpe", gpt2_spec("llama-bpe"));
    check_vocab_case("qwen2", gpt2_spec("qwen2"));
}

#[test]
fn gguf_other_splits_match_transformers() {
    check_vocab_case("qwen35", gpt2_spec("qwen35"));
    check_vocab_case("gpt-4o", gpt2_spec("gpt-4o"));
    check_vocab_case("tekken", gpt2_spec("tekken"));
}

#[test]
fn gguf_smollm_splits_digits_like_llama_cpp() {
    check_vocab_case("smollm", gpt2_spec("smollm"));
    let tokenizer = Tokenizer::from_vocab(gpt2_spec("smollm")).unwrap();
    let digits = tokenizer.encode("2024", false).unwrap();
    assert_eq!(digits.len(), 4);
    assert_eq!(tokenizer.decode(&digits, false).unwrap(), "2024");
}

#[test]
fn gguf_sentencepiece_vocabulary_matches_transformers() {
    check_vocab_case("llama", llama_spec());
    let tokenizer = Tokenizer::from_vocab(llama_spec()).unwrap();
    assert_eq!(tokenizer.eos_token_ids(), &[2]);
    assert_eq!(tokenizer.bos_token_id(), Some(1));
    // Stream decoding keeps the spaces the Strip decoder handles.
    let ids = tokenizer.encode("Hello world 👋", true).unwrap();
    let (chunks, rest) = stream(&tokenizer, &ids, true);
    assert_eq!(chunks.concat() + &rest, "Hello world 👋");
}

#[test]
fn gguf_phi3_prefixes_spaces_with_a_normalizer() {
    let tokenizer = Tokenizer::from_vocab(VocabSpec {
        architecture: Some("phi3".into()),
        ..llama_spec()
    })
    .unwrap();
    let plain = Tokenizer::from_vocab(llama_spec()).unwrap();
    assert_eq!(
        tokenizer.encode("Hello world", true).unwrap(),
        plain.encode("Hello world", true).unwrap()
    );
    // "  hi": the normalizer writes ▁▁▁hi where Metaspace (prepending only once) writes ▁▁hi.
    let with_normalizer: String = tokenizer
        .encode("  hi", false)
        .unwrap()
        .iter()
        .map(|&id| tokenizer.id_to_token(id).unwrap())
        .collect();
    let with_metaspace: String = plain
        .encode("  hi", false)
        .unwrap()
        .iter()
        .map(|&id| plain.id_to_token(id).unwrap())
        .collect();
    assert_eq!(with_normalizer, "\u{2581}\u{2581}\u{2581}hi");
    assert_eq!(with_metaspace, "\u{2581}\u{2581}hi");
}

#[test]
fn gguf_metadata_chat_template_and_end_of_turn() {
    let spec = VocabSpec {
        chat_template: Some(
            "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{{ eos_token }}{% endfor %}"
                .into(),
        ),
        eot_token_id: Some(198),
        ..gpt2_spec("gpt2")
    };
    let tokenizer = Tokenizer::from_vocab(spec).unwrap();
    assert_eq!(tokenizer.eos_token_ids(), &[50256, 198]);
    let out = tokenizer
        .apply_chat_template(&[Message::user("hi")], &ChatTemplateOptions::new())
        .unwrap();
    assert_eq!(out, "<|user|>hi<|endoftext|>");
}

#[test]
fn gguf_unsupported_kinds_are_typed_errors() {
    for (model, pre, architecture) in [
        ("gpt2", Some("made-up-pre"), None),
        ("t5", None, None),
        ("bert", None, None),
        ("llama", None, Some("gemma4")),
    ] {
        let spec = VocabSpec {
            pre: pre.map(str::to_owned),
            architecture: architecture.map(str::to_owned),
            ..VocabSpec::new(model, vec!["a".into(), "b".into()])
        };
        match Tokenizer::from_vocab(spec) {
            Err(Error::UnsupportedTokenizer { model: m, pre: p }) => {
                assert_eq!(m, model);
                assert_eq!(p.as_deref(), pre);
            }
            other => panic!("{model}/{pre:?}: expected UnsupportedTokenizer, got {other:?}"),
        }
    }
}

#[test]
fn gguf_inconsistent_metadata_is_an_error() {
    let base = || VocabSpec::new("gpt2", vec!["a".into(), "b".into(), "ab".into()]);
    let specs = [
        VocabSpec::new("gpt2", vec![]),
        VocabSpec {
            scores: Some(vec![0.0]),
            ..base()
        },
        VocabSpec {
            token_types: Some(vec![1; 5]),
            ..base()
        },
        VocabSpec {
            eos_token_id: Some(3),
            ..base()
        },
        VocabSpec {
            merges: Some(vec!["a b c".into()]),
            ..base()
        },
    ];
    for spec in specs {
        let description = format!("{spec:?}");
        assert!(
            matches!(Tokenizer::from_vocab(spec), Err(Error::Tokenizer { .. })),
            "{description}"
        );
    }
    // Without merges they are derived from the vocabulary.
    let tokenizer = Tokenizer::from_vocab(base()).unwrap();
    assert_eq!(tokenizer.encode("ab", false).unwrap(), vec![2]);
}

#[test]
fn derived_merges_follow_transformers_order() {
    // Expected lists from transformers.tokenization_utils_base.generate_merges.
    let tokens: Vec<String> = [
        "<unk>", "a", "b", "c", "ab", "bc", "abc", "ca", "cab", "▁", "▁a", "▁ab",
    ]
    .map(String::from)
    .to_vec();
    let scores = [
        0.0, -1.0, -2.0, -3.0, -4.0, -4.0, -5.0, -6.0, -6.0, -7.0, -8.0, -8.0,
    ];
    let pairs = |list: &[(&str, &str)]| {
        list.iter()
            .map(|(l, r)| (l.to_string(), r.to_string()))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        gguf::generate_merges(&tokens, Some(&scores)),
        pairs(&[
            ("a", "b"),
            ("b", "c"),
            ("ab", "c"),
            ("a", "bc"),
            ("ca", "b"),
            ("c", "ab"),
            ("c", "a"),
            ("▁a", "b"),
            ("▁", "ab"),
            ("▁", "a")
        ])
    );
    assert_eq!(
        gguf::generate_merges(&tokens, None),
        pairs(&[
            ("a", "b"),
            ("b", "c"),
            ("a", "bc"),
            ("ab", "c"),
            ("c", "a"),
            ("c", "ab"),
            ("ca", "b"),
            ("▁", "a"),
            ("▁", "ab"),
            ("▁a", "b")
        ])
    );
}

/// A real GGUF vocabulary: SmolLM2-135M-Instruct's `tokenizer.*` metadata (`pre` = `smollm`),
/// checked against the ids and prompts Transformers' GGUF loader gives for it
/// (tests/fixtures/smollm2-135m-instruct, exported by xtask).
#[test]
fn gguf_smollm2_metadata_matches_the_transformers_fixture() {
    let meta = json("tokenizers/smollm2-gguf/metadata.json");
    let strings = |key: &str| -> Vec<String> {
        meta[key]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap().to_owned())
            .collect()
    };
    let id = |key: &str| meta[key].as_u64().map(|v| v as u32);
    let spec = VocabSpec {
        pre: meta["tokenizer.ggml.pre"].as_str().map(str::to_owned),
        architecture: meta["general.architecture"].as_str().map(str::to_owned),
        merges: Some(strings("tokenizer.ggml.merges")),
        token_types: Some(
            meta["tokenizer.ggml.token_type"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_i64().unwrap() as i32)
                .collect(),
        ),
        bos_token_id: id("tokenizer.ggml.bos_token_id"),
        eos_token_id: id("tokenizer.ggml.eos_token_id"),
        unk_token_id: id("tokenizer.ggml.unknown_token_id"),
        pad_token_id: id("tokenizer.ggml.padding_token_id"),
        add_bos_token: meta["tokenizer.ggml.add_bos_token"].as_bool(),
        chat_template: meta["tokenizer.chat_template"].as_str().map(str::to_owned),
        ..VocabSpec::new(
            meta["tokenizer.ggml.model"].as_str().unwrap(),
            strings("tokenizer.ggml.tokens"),
        )
    };
    assert_eq!(spec.pre.as_deref(), Some("smollm"));
    let tokenizer = Tokenizer::from_vocab(spec).unwrap();
    assert_eq!(tokenizer.eos_token(), Some("<|im_end|>"));
    assert_eq!(tokenizer.eos_token_ids(), &[2]);

    let fixture = |name: &str| -> Value {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures/smollm2-135m-instruct")
            .join(name);
        serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
    };
    let tokenization = fixture("tokenization.json");
    assert_eq!(tokenization["add_special_tokens"], false);
    for case in tokenization["cases"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        let expected = ids(&case["ids"]);
        assert_eq!(tokenizer.encode(text, false).unwrap(), expected, "{text:?}");
        assert_eq!(
            tokenizer.decode(&expected, false).unwrap(),
            case["decoded"].as_str().unwrap(),
            "{text:?}"
        );
    }
    let chats = fixture("chat_template.json");
    for conversation in chats["conversations"].as_array().unwrap() {
        let messages: Vec<Message> =
            serde_json::from_value(conversation["messages"].clone()).unwrap();
        let options = ChatTemplateOptions::new()
            .add_generation_prompt(conversation["add_generation_prompt"] == true);
        let prompt = tokenizer.apply_chat_template(&messages, &options).unwrap();
        assert_eq!(
            prompt,
            conversation["text"].as_str().unwrap(),
            "{}",
            conversation["name"]
        );
        assert_eq!(
            tokenizer.encode(&prompt, false).unwrap(),
            ids(&conversation["ids"]),
            "{}",
            conversation["name"]
        );
    }
}

#[test]
fn gguf_vocabularies_too_long_to_derive_merges_from_are_refused() {
    // One crafted 40000-character token would cost 1.6e9 split lookups.
    for architecture in [None, Some("gemma3")] {
        let spec = VocabSpec {
            architecture: architecture.map(str::to_owned),
            ..VocabSpec::new("llama", vec!["a".into(), "b".repeat(40_000)])
        };
        match Tokenizer::from_vocab(spec) {
            Err(Error::Tokenizer { message, .. }) => {
                assert!(message.contains("too long"), "{message}")
            }
            other => panic!("{architecture:?}: expected Error::Tokenizer, got {other:?}"),
        }
    }
}
