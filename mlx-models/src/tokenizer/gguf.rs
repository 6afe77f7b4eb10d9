//! Tokenizers from GGUF vocabulary metadata, built as Transformers' GGUF loader builds them
//! (`transformers/integrations/gguf/gguf_tokenizer_mapping.py`): the same model, normalizer,
//! pre-tokenizer, decoder, added tokens and post-processor, written as tokenizer.json.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use serde_json::{json, Value};
use tokenizers::AddedToken;

use super::{
    template_processing, NamedTemplate, Tokenizer, VocabSpec, TOKEN_TYPE_CONTROL,
    TOKEN_TYPE_USER_DEFINED,
};
use crate::error::{Error, Result};

/// Split regexes of byte-level vocabularies, as Transformers maps `tokenizer.ggml.pre` values.
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN35_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const GPT4O_SPLIT: &str = concat!(
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
);
const TEKKEN_SPLIT: &str = concat!(
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+",
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*",
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
);

/// The pre-tokenizer of a byte-level vocabulary, by `tokenizer.ggml.pre`.
fn byte_level_pre_tokenizer(pre: Option<&str>) -> Option<Value> {
    let byte_level = |use_regex: bool| json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex});
    let split = |regex: &str| {
        json!({"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": false},
            byte_level(false),
        ]})
    };
    Some(match pre {
        None | Some("default" | "gpt2") => byte_level(true),
        // llama.cpp splits `\p{N}` first, then applies GPT-2's regex; SmolLM2's tokenizer.json
        // writes the same as Digits(individual_digits) + ByteLevel.
        Some("smollm" | "starcoder" | "refact" | "command-r" | "codeshell") => {
            json!({"type": "Sequence", "pretokenizers": [
                {"type": "Digits", "individual_digits": true},
                byte_level(true),
            ]})
        }
        Some("llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "smaug-bpe" | "dbrx") => {
            split(LLAMA3_SPLIT)
        }
        Some("qwen2" | "deepseek-r1-qwen") => split(QWEN2_SPLIT),
        Some("qwen35") => split(QWEN35_SPLIT),
        Some("gpt-4o" | "llama4") => split(GPT4O_SPLIT),
        Some("tekken") => split(TEKKEN_SPLIT),
        Some(_) => return None,
    })
}

/// GPT-2's byte ↔ printable-character table: byte `b` is written as `BYTE_CHARS[b]`.
fn byte_chars() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut next_free = 256u32;
    for byte in 0..=255u8 {
        let printable = matches!(byte, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
        table[byte as usize] = if printable {
            char::from(byte)
        } else {
            let c = char::from_u32(next_free).unwrap_or('\u{FFFD}');
            next_free += 1;
            c
        };
    }
    table
}

pub(super) fn build(spec: VocabSpec) -> Result<Tokenizer> {
    let unsupported = |spec: &VocabSpec| Error::UnsupportedTokenizer {
        model: spec.model.clone(),
        pre: spec.pre.clone(),
    };
    let invalid = |message: String| Error::Tokenizer {
        path: None,
        message,
    };
    if spec.tokens.is_empty() {
        return Err(invalid("the vocabulary has no tokens".into()));
    }
    let count = spec.tokens.len();
    for (name, len) in [
        ("scores", spec.scores.as_ref().map(Vec::len)),
        ("token types", spec.token_types.as_ref().map(Vec::len)),
    ] {
        if let Some(len) = len.filter(|&len| len != count) {
            return Err(invalid(format!("{len} {name} for {count} tokens")));
        }
    }
    let token_name = |id: Option<u32>, what: &str| -> Result<Option<String>> {
        match id {
            None => Ok(None),
            Some(id) => spec
                .tokens
                .get(id as usize)
                .cloned()
                .map(Some)
                .ok_or_else(|| invalid(format!("{what} id {id} is outside the {count} tokens"))),
        }
    };
    let bos = token_name(spec.bos_token_id, "BOS")?;
    let eos = token_name(spec.eos_token_id, "EOS")?;
    let eot = token_name(spec.eot_token_id, "EOT")?;
    let unk = token_name(spec.unk_token_id, "unknown token")?;
    let pad = token_name(spec.pad_token_id, "padding token")?;
    let types = spec.token_types.clone().unwrap_or_default();

    let (tokenizer_json, byte_level) = match spec.model.as_str() {
        "gpt2" => {
            let pre_tokenizer =
                byte_level_pre_tokenizer(spec.pre.as_deref()).ok_or_else(|| unsupported(&spec))?;
            let chars = byte_chars();
            let alphabet: HashSet<char> = chars.iter().copied().collect();
            let respelled: Vec<String> = spec
                .tokens
                .iter()
                .map(|t| {
                    if t.chars().all(|c| alphabet.contains(&c)) {
                        t.clone()
                    } else {
                        t.bytes().map(|b| chars[b as usize]).collect()
                    }
                })
                .collect();
            let merges = merges(&spec, &respelled)?;
            let model = bpe_model(&respelled, merges, false, None);
            let json = json!({
                "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
                "normalizer": null,
                "pre_tokenizer": pre_tokenizer,
                "post_processor": null,
                "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
                "model": model,
            });
            (json, Some(alphabet))
        }
        "llama"
            if matches!(
                spec.architecture.as_deref(),
                Some("gemma" | "gemma2" | "gemma3")
            ) =>
        {
            (gemma_json(&spec, unk.as_deref())?, None)
        }
        "llama" => {
            let (normalizer, pre_tokenizer) = match spec.architecture.as_deref() {
                Some(arch) if arch.starts_with("gemma") => return Err(unsupported(&spec)),
                Some("phi3") => (
                    json!({"type": "Sequence", "normalizers": [
                        {"type": "Prepend", "prepend": "\u{2581}"},
                        {"type": "Replace", "pattern": {"String": " "}, "content": "\u{2581}"},
                    ]}),
                    Value::Null,
                ),
                _ => (
                    Value::Null,
                    json!({"type": "Metaspace", "replacement": "\u{2581}", "prepend_scheme": "first", "split": false}),
                ),
            };
            let merges = merges(&spec, &spec.tokens)?;
            let model = bpe_model(&spec.tokens, merges, true, None);
            let json = json!({
                "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
                "normalizer": normalizer,
                "pre_tokenizer": pre_tokenizer,
                "post_processor": null,
                "decoder": {"type": "Sequence", "decoders": [
                    {"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "},
                    {"type": "ByteFallback"},
                    {"type": "Fuse"},
                    {"type": "Strip", "content": " ", "start": 1, "stop": 0},
                ]},
                "model": model,
            });
            (json, None)
        }
        _ => return Err(unsupported(&spec)),
    };
    let mut inner: tokenizers::Tokenizer =
        serde_json::from_value(tokenizer_json).map_err(|e| invalid(e.to_string()))?;

    // Control tokens are special (for a byte-level vocabulary only those written in its byte
    // alphabet: anything else is a mislabel); user-defined ones are matched whole.
    let control: Vec<AddedToken> = spec
        .tokens
        .iter()
        .zip(&types)
        .filter(|(token, kind)| {
            **kind == TOKEN_TYPE_CONTROL
                && byte_level
                    .as_ref()
                    .is_none_or(|a| token.chars().all(|c| a.contains(&c)))
        })
        .map(|(token, _)| AddedToken::from(token.clone(), true).normalized(false))
        .collect();
    inner.add_special_tokens(&control);
    let vocab = inner.get_vocab(true);
    let user_defined: Vec<AddedToken> = spec
        .tokens
        .iter()
        .zip(&types)
        .filter(|(token, kind)| **kind == TOKEN_TYPE_USER_DEFINED && vocab.contains_key(*token))
        .map(|(token, _)| AddedToken::from(token.clone(), false).normalized(false))
        .collect();
    inner.add_tokens(&user_defined);
    // The named special tokens are special even when the file marks them otherwise.
    let added: HashSet<String> = inner
        .get_added_tokens_decoder()
        .into_values()
        .map(|t| t.content)
        .collect();
    let mut named = Vec::new();
    for (name, token) in [
        ("bos_token", &bos),
        ("eos_token", &eos),
        ("unk_token", &unk),
        ("pad_token", &pad),
    ] {
        if let Some(token) = token {
            named.push((name.to_owned(), token.clone()));
            if !added.contains(token) {
                inner.add_special_tokens(&[AddedToken::from(token.clone(), true)]);
            }
        }
    }

    let add_bos = spec.add_bos_token.unwrap_or(spec.model == "llama");
    let add_eos = spec.add_eos_token.unwrap_or(false);
    let with_id = |token: &Option<String>, yes: bool| {
        token
            .as_ref()
            .filter(|_| yes)
            .and_then(|t| Some((t.clone(), inner.token_to_id(t)?)))
    };
    let processor = template_processing(with_id(&bos, add_bos), with_id(&eos, add_eos));
    let processor: tokenizers::processors::PostProcessorWrapper =
        serde_json::from_value(processor).map_err(|e| invalid(e.to_string()))?;
    inner.with_post_processor(Some(processor));

    let bos_token_id = bos.as_deref().and_then(|t| inner.token_to_id(t));
    let mut eos_token_ids = Vec::new();
    for token in [&eos, &eot].into_iter().flatten() {
        if let Some(id) = inner
            .token_to_id(token)
            .filter(|id| !eos_token_ids.contains(id))
        {
            eos_token_ids.push(id);
        }
    }
    Ok(Tokenizer {
        inner: Arc::new(inner),
        source: None,
        special_tokens: named,
        bos_token_id,
        eos_token_ids,
        templates: spec
            .chat_template
            .map(|source| vec![NamedTemplate::new("default", source)])
            .unwrap_or_default(),
    })
}

/// Gemma's SentencePiece vocabulary as Transformers' GGUF loader builds it (`gemma_tokenizer`
/// and `GemmaTokenizer`): tokens made only of spaces respelled with `▁`, merges recovered
/// from the vocabulary in file order (Gemma's scores do not follow its merge order), spaces
/// normalized to `▁` with no prefix, byte fallback, and no stripping when decoding.
fn gemma_json(spec: &VocabSpec, unk: Option<&str>) -> Result<Value> {
    let respelled: Vec<String> = spec
        .tokens
        .iter()
        .map(|t| {
            if t.contains(' ') && t.trim().is_empty() {
                "\u{2581}".repeat(t.chars().count())
            } else {
                t.clone()
            }
        })
        .collect();
    check_derivable(&respelled)?;
    let positions: Vec<f32> = (0..respelled.len()).map(|i| -(i as f32)).collect();
    let merges = generate_merges(&respelled, Some(&positions));
    Ok(json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
        "normalizer": {"type": "Replace", "pattern": {"String": " "}, "content": "\u{2581}"},
        "pre_tokenizer": {"type": "Split", "pattern": {"String": " "}, "behavior": "MergedWithPrevious", "invert": false},
        "post_processor": null,
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "},
            {"type": "ByteFallback"},
            {"type": "Fuse"},
        ]},
        "model": bpe_model(&respelled, merges, true, unk),
    }))
}

/// A BPE model section of tokenizer.json. As in a Python dict, a repeated token keeps its last id.
fn bpe_model(
    tokens: &[String],
    merges: Vec<(String, String)>,
    sentencepiece: bool,
    unk: Option<&str>,
) -> Value {
    let mut vocab = serde_json::Map::new();
    for (id, token) in tokens.iter().enumerate() {
        vocab.insert(token.clone(), json!(id));
    }
    let merges: Vec<Value> = merges.into_iter().map(|(l, r)| json!([l, r])).collect();
    if sentencepiece {
        json!({"type": "BPE", "dropout": null, "unk_token": unk, "continuing_subword_prefix": null,
               "end_of_word_suffix": null, "fuse_unk": true, "byte_fallback": true, "ignore_merges": false,
               "vocab": vocab, "merges": merges})
    } else {
        json!({"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": "",
               "end_of_word_suffix": "", "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
               "vocab": vocab, "merges": merges})
    }
}

/// The merges the spec lists, or the ones its vocabulary (and scores) imply.
fn merges(spec: &VocabSpec, tokens: &[String]) -> Result<Vec<(String, String)>> {
    match &spec.merges {
        Some(merges) => merges
            .iter()
            .map(|merge| {
                let mut parts = merge.split(' ');
                match (parts.next(), parts.next(), parts.next()) {
                    (Some(left), Some(right), None) => Ok((left.to_owned(), right.to_owned())),
                    _ => Err(Error::Tokenizer {
                        path: None,
                        message: format!(
                            "merge `{merge}` is not two tokens separated by one space"
                        ),
                    }),
                }
            })
            .collect(),
        None => {
            check_derivable(tokens)?;
            Ok(generate_merges(tokens, spec.scores.as_deref()))
        }
    }
}

/// Deriving merges tries every split of every token, which costs the sum of the squared
/// token lengths: real vocabularies stay far below this bound (Gemma 3's 262144 tokens:
/// about 1e7), a crafted one with long tokens would take hours.
const MAX_SPLIT_WORK: u64 = 1_000_000_000;

fn check_derivable(tokens: &[String]) -> Result<()> {
    let work: u64 = tokens
        .iter()
        .map(|t| (t.chars().count() as u64).pow(2))
        .fold(0u64, u64::saturating_add);
    if work > MAX_SPLIT_WORK {
        return Err(Error::Tokenizer {
            path: None,
            message: format!(
                "the vocabulary lists no merges, and its tokens are too long to derive them \
                 from (squared lengths sum to {work}, the limit is {MAX_SPLIT_WORK})"
            ),
        });
    }
    Ok(())
}

/// Transformers' `generate_merges`: every split of every token into two tokens of the
/// vocabulary, ordered by the token's score (best first) — or, without scores, by the token's
/// id (first first) — then by the pieces' lengths, ties keeping the vocabulary's order.
pub(super) fn generate_merges(tokens: &[String], scores: Option<&[f32]>) -> Vec<(String, String)> {
    let mut ids: HashMap<&str, usize> = HashMap::with_capacity(tokens.len());
    for (id, token) in tokens.iter().enumerate() {
        ids.insert(token, id);
    }
    // (token, score) in first-seen order with the last score, like `dict(zip(tokens, scores))`.
    let mut order: Vec<&str> = Vec::with_capacity(tokens.len());
    let mut score_of: HashMap<&str, f64> = HashMap::with_capacity(tokens.len());
    for (id, token) in tokens.iter().enumerate() {
        let score = scores.map_or(id as f64, |s| f64::from(s[id]));
        if score_of.insert(token, score).is_none() {
            order.push(token);
        }
    }
    if scores.is_none() {
        // Without scores Python iterates the vocabulary dict itself: the score is the final id.
        for token in &order {
            score_of.insert(token, ids[token] as f64);
        }
    }

    struct Merge<'a> {
        left: &'a str,
        right: &'a str,
        score: f64,
        left_len: usize,
        right_len: usize,
    }
    let mut merges: Vec<Merge> = Vec::new();
    for token in order {
        let score = score_of[token];
        let mut local: Vec<Merge> = token
            .char_indices()
            .skip(1)
            .map(|(at, _)| token.split_at(at))
            .filter(|(left, right)| ids.contains_key(left) && ids.contains_key(right))
            .map(|(left, right)| Merge {
                left,
                right,
                score,
                left_len: left.chars().count(),
                right_len: right.chars().count(),
            })
            .collect();
        local.sort_by_key(|m| (ids[m.left], ids[m.right]));
        merges.extend(local);
    }
    let key = |m: &Merge| (m.score, m.left_len, m.right_len);
    let compare = |a: &Merge, b: &Merge| {
        let (sa, la, ra) = key(a);
        let (sb, lb, rb) = key(b);
        sa.total_cmp(&sb).then(la.cmp(&lb)).then(ra.cmp(&rb))
    };
    if scores.is_some() {
        merges.sort_by(|a, b| compare(b, a));
    } else {
        merges.sort_by(compare);
    }
    merges
        .into_iter()
        .map(|m| (m.left.to_owned(), m.right.to_owned()))
        .collect()
}
