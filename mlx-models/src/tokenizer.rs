//! Text ↔ token ids: Hugging Face tokenizers (tokenizer.json and its companion files), and
//! tokenizers rebuilt from the vocabulary a GGUF file stores.
//!
//! [`Tokenizer::from_dir`] reads a model directory the way Transformers does: tokenizer.json,
//! then tokenizer_config.json for the special tokens, `add_bos_token`/`add_eos_token` and the
//! chat template, `chat_template.jinja` and `additional_chat_templates/*.jinja` (which take
//! precedence over the config's template), and generation_config.json for the end-of-sequence
//! ids. [`Tokenizer::from_vocab`] builds the tokenizer Transformers' GGUF loader builds from
//! `tokenizer.ggml.*` metadata.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::{json, Value};

use crate::chat_template::{ChatTemplate, ChatTemplateOptions, Message};
use crate::error::{Error, Result};
use crate::sampling::GenerationConfig;

/// The named special tokens a chat template sees, in Transformers' order.
const SPECIAL_TOKEN_NAMES: [&str; 7] = [
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
];

/// GGUF `tokenizer.ggml.token_type` of a control (special) token.
pub const TOKEN_TYPE_CONTROL: i32 = 3;
/// GGUF `tokenizer.ggml.token_type` of a user-defined token (matched whole, not special).
pub const TOKEN_TYPE_USER_DEFINED: i32 = 4;

/// A tokenizer with its special tokens, end-of-sequence ids and chat templates.
#[derive(Clone, Debug)]
pub struct Tokenizer {
    inner: Arc<tokenizers::Tokenizer>,
    source: Option<PathBuf>,
    special_tokens: Vec<(String, String)>,
    bos_token_id: Option<u32>,
    eos_token_ids: Vec<u32>,
    templates: Vec<NamedTemplate>,
}

/// A chat template as loaded; a template that does not compile only fails when used, so the
/// tokenizer itself stays usable.
#[derive(Clone, Debug)]
struct NamedTemplate {
    name: String,
    source: String,
    compiled: std::result::Result<Arc<ChatTemplate>, String>,
}

impl NamedTemplate {
    fn new(name: impl Into<String>, source: String) -> Self {
        let compiled = ChatTemplate::new(source.clone())
            .map(Arc::new)
            .map_err(|e| match e {
                Error::ChatTemplate { message } => message,
                other => other.to_string(),
            });
        NamedTemplate {
            name: name.into(),
            source,
            compiled,
        }
    }
}

/// The tokenizer a GGUF file describes in its `tokenizer.*` metadata.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct VocabSpec {
    /// `tokenizer.ggml.model`: `gpt2` (byte-level BPE) or `llama` (SentencePiece BPE).
    pub model: String,
    /// `tokenizer.ggml.pre`: how byte-level text is split before BPE (`gpt2`, `llama-bpe`,
    /// `qwen2`, `smollm`, …); `None` means GPT-2's splitting.
    pub pre: Option<String>,
    /// `general.architecture`; only consulted for SentencePiece vocabularies (`phi3` builds its
    /// prefix space differently, `gemma`/`gemma2`/`gemma3` build Gemma's).
    pub architecture: Option<String>,
    /// `tokenizer.ggml.tokens`, indexed by id.
    pub tokens: Vec<String>,
    /// `tokenizer.ggml.scores`: merge priorities for a vocabulary without merges.
    pub scores: Option<Vec<f32>>,
    /// `tokenizer.ggml.token_type`: 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused,
    /// 6 byte.
    pub token_types: Option<Vec<i32>>,
    /// `tokenizer.ggml.merges`: `"left right"` pairs, best first.
    pub merges: Option<Vec<String>>,
    /// `tokenizer.ggml.bos_token_id`.
    pub bos_token_id: Option<u32>,
    /// `tokenizer.ggml.eos_token_id`.
    pub eos_token_id: Option<u32>,
    /// `tokenizer.ggml.eot_token_id`: an end-of-turn token that also stops generation.
    pub eot_token_id: Option<u32>,
    /// `tokenizer.ggml.unknown_token_id`.
    pub unk_token_id: Option<u32>,
    /// `tokenizer.ggml.padding_token_id`.
    pub pad_token_id: Option<u32>,
    /// `tokenizer.ggml.add_bos_token`; SentencePiece vocabularies default to `true`.
    pub add_bos_token: Option<bool>,
    /// `tokenizer.ggml.add_eos_token`.
    pub add_eos_token: Option<bool>,
    /// `tokenizer.chat_template`.
    pub chat_template: Option<String>,
}

impl VocabSpec {
    /// A spec with the model kind and the tokens; every other field empty.
    pub fn new(model: impl Into<String>, tokens: Vec<String>) -> Self {
        VocabSpec {
            model: model.into(),
            tokens,
            ..Default::default()
        }
    }
}

impl Tokenizer {
    /// Loads a tokenizer.json alone: no special-token names, end-of-sequence ids or chat
    /// template (use [`Tokenizer::from_dir`] for those).
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let invalid = |message: String| Error::Tokenizer {
            path: Some(path.to_owned()),
            message,
        };
        // Syntax first, then the shape: `tokenizers` panics on some malformed strings
        // inside its own parse (control characters in a decoder), and a panic while it
        // deserializes is a malformed file too.
        let value: Value = serde_json::from_slice(&bytes).map_err(|e| invalid(e.to_string()))?;
        let inner =
            std::panic::catch_unwind(|| serde_json::from_value::<tokenizers::Tokenizer>(value))
                .map_err(|_| invalid("the tokenizers crate panicked reading this file".into()))?
                .map_err(|e| invalid(e.to_string()))?;
        Ok(Tokenizer {
            inner: Arc::new(inner),
            source: Some(path.to_owned()),
            special_tokens: Vec::new(),
            bos_token_id: None,
            eos_token_ids: Vec::new(),
            templates: Vec::new(),
        })
    }

    /// Loads the tokenizer of a model directory (see the module documentation for the files).
    pub fn from_dir(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        let mut tokenizer = Self::from_file(dir.join("tokenizer.json"))?;

        let config_path = dir.join("tokenizer_config.json");
        let config = read_json_if_present(&config_path)?;
        let mut add_bos = None;
        let mut add_eos = None;
        if let Some(config) = &config {
            let fields = config
                .as_object()
                .ok_or_else(|| Error::config(&config_path, "<root>", "expected a JSON object"))?;
            for name in SPECIAL_TOKEN_NAMES {
                if let Some(token) = special_token_field(&config_path, fields, name)? {
                    tokenizer.special_tokens.push((name.to_owned(), token));
                }
            }
            add_bos = optional_bool(&config_path, fields, "add_bos_token")?;
            add_eos = optional_bool(&config_path, fields, "add_eos_token")?;
            tokenizer.templates = config_templates(&config_path, fields.get("chat_template"))?;
        }
        let file_templates = file_templates(dir)?;
        if !file_templates.is_empty() {
            tokenizer.templates = file_templates;
        }
        if add_bos.is_some() || add_eos.is_some() {
            tokenizer.set_bos_eos_processing(add_bos.unwrap_or(false), add_eos.unwrap_or(false))?;
        }

        tokenizer.bos_token_id = tokenizer.bos_token().and_then(|t| tokenizer.token_to_id(t));
        if let Some(eos) = tokenizer.eos_token().and_then(|t| tokenizer.token_to_id(t)) {
            tokenizer.eos_token_ids.push(eos);
        }
        let generation_path = dir.join("generation_config.json");
        if generation_path.is_file() {
            let generation = GenerationConfig::from_file(&generation_path)?;
            tokenizer.add_eos_token_ids(generation.eos_token_ids());
            if tokenizer.bos_token_id.is_none() {
                tokenizer.bos_token_id = generation.bos_token_id;
            }
        }
        Ok(tokenizer)
    }

    /// Builds the tokenizer a GGUF file's `tokenizer.*` metadata describes, as Transformers'
    /// GGUF loader builds it.
    ///
    /// * `gpt2`: byte-level BPE (tokens in GPT-2's byte alphabet, respelled when they are not)
    ///   with the merges given (or derived from the vocabulary), split before BPE according to
    ///   `pre`: `gpt2`/`default`/none (GPT-2's regex), `smollm`/`starcoder`/`refact`/`command-r`/
    ///   `codeshell` (every digit apart, then GPT-2's regex, as llama.cpp and SmolLM2's
    ///   tokenizer.json do), `llama3`/`llama-v3`/`llama-bpe`/`falcon3`/`smaug-bpe`/`dbrx`,
    ///   `qwen2`/`deepseek-r1-qwen`, `qwen35`, `gpt-4o`/`llama4` and `tekken`.
    /// * `llama`: SentencePiece BPE with byte fallback and `▁` for spaces (prefixed once, at
    ///   the start), merges derived from the scores when the file lists none, BOS added unless
    ///   `add_bos_token` is false; `phi3` gets its prefix space from a normalizer instead;
    ///   `gemma`/`gemma2`/`gemma3` build Gemma's (spaces as `▁` without a prefix, merges in
    ///   file order, tokens of spaces respelled, `<unk>`).
    ///
    /// Control tokens (type 3) become special tokens, user-defined ones (type 4) tokens matched
    /// whole. Anything else is [`Error::UnsupportedTokenizer`].
    pub fn from_vocab(spec: VocabSpec) -> Result<Self> {
        crate::tokenizer::gguf::build(spec)
    }

    /// Token ids of `text`; `add_special_tokens` adds what the tokenizer's post-processor adds
    /// (a BOS token for Llama-style tokenizers).
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let encoding = self
            .inner
            .encode(text, add_special_tokens)
            .map_err(|e| self.error(e))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// The text of `ids`; `skip_special_tokens` leaves out special tokens such as `</s>`.
    /// An id outside the vocabulary is an error.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.check_ids(ids)?;
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| self.error(e))
    }

    /// The ids that end generation: the EOS token's, then generation_config.json's (and any
    /// added with [`Tokenizer::add_eos_token_ids`]), without repeats.
    pub fn eos_token_ids(&self) -> &[u32] {
        &self.eos_token_ids
    }

    /// Adds ids that end generation (for example a model config's `eos_token_id`).
    pub fn add_eos_token_ids(&mut self, ids: impl IntoIterator<Item = u32>) {
        for id in ids {
            if !self.eos_token_ids.contains(&id) {
                self.eos_token_ids.push(id);
            }
        }
    }

    /// The beginning-of-sequence token, if the tokenizer names one.
    pub fn bos_token(&self) -> Option<&str> {
        self.special_token("bos_token")
    }

    /// The beginning-of-sequence token's id.
    pub fn bos_token_id(&self) -> Option<u32> {
        self.bos_token_id
    }

    /// The end-of-sequence token, if the tokenizer names one.
    pub fn eos_token(&self) -> Option<&str> {
        self.special_token("eos_token")
    }

    /// A named special token (`bos_token`, `eos_token`, `unk_token`, `pad_token`, …).
    pub fn special_token(&self, name: &str) -> Option<&str> {
        self.special_tokens
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, token)| token.as_str())
    }

    /// The number of ids, added tokens included (`len(tokenizer)` in Transformers).
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The id of a token (written as the vocabulary spells it, e.g. `Ġthe` or `▁the`).
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The token of an id, as the vocabulary spells it.
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// The default chat template's source, if there is one.
    pub fn chat_template(&self) -> Option<&str> {
        match self.templates.as_slice() {
            [only] => Some(&only.source),
            many => many
                .iter()
                .find(|t| t.name == "default")
                .map(|t| t.source.as_str()),
        }
    }

    /// The names of the chat templates (`default`, `tool_use`, …).
    pub fn chat_template_names(&self) -> Vec<&str> {
        self.templates.iter().map(|t| t.name.as_str()).collect()
    }

    /// Replaces the chat templates with this one (compiled now; errors are reported here).
    pub fn set_chat_template(&mut self, source: impl Into<String>) -> Result<()> {
        let template = NamedTemplate::new("default", source.into());
        if let Err(message) = &template.compiled {
            return Err(Error::ChatTemplate {
                message: message.clone(),
            });
        }
        self.templates = vec![template];
        Ok(())
    }

    /// Renders a conversation with the chat template, as Transformers'
    /// `apply_chat_template(..., tokenize=False)`: the special tokens are template variables,
    /// overridable through `options.kwargs`. With several named templates, `options.template_name`
    /// picks one; otherwise `tool_use` when tools are given and it exists, else `default`.
    pub fn apply_chat_template(
        &self,
        messages: &[Message],
        options: &ChatTemplateOptions,
    ) -> Result<String> {
        let template = self.select_template(options)?;
        let compiled = template
            .compiled
            .as_ref()
            .map_err(|message| Error::ChatTemplate {
                message: message.clone(),
            })?;
        compiled.render_with_special_tokens(messages, options, &self.special_tokens)
    }

    /// A decoder for text generated one token at a time.
    pub fn stream_decoder(&self) -> StreamDecoder {
        StreamDecoder::new(Arc::clone(&self.inner))
    }

    /// The underlying `tokenizers` tokenizer.
    pub fn backend(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    fn select_template(&self, options: &ChatTemplateOptions) -> Result<&NamedTemplate> {
        let not_found = |requested: Option<&String>| Error::NoChatTemplate {
            requested: requested.cloned(),
            available: {
                let mut names: Vec<String> =
                    self.templates.iter().map(|t| t.name.clone()).collect();
                names.sort();
                names
            },
        };
        match (self.templates.as_slice(), options.template_name.as_ref()) {
            ([], name) => Err(not_found(name)),
            ([only], None) => Ok(only),
            (templates, Some(name)) => templates
                .iter()
                .find(|t| &t.name == name)
                .ok_or_else(|| not_found(Some(name))),
            (templates, None) => {
                let tool_use = options
                    .tools
                    .as_ref()
                    .and_then(|_| templates.iter().find(|t| t.name == "tool_use"));
                tool_use
                    .or_else(|| templates.iter().find(|t| t.name == "default"))
                    .ok_or_else(|| not_found(None))
            }
        }
    }

    /// Makes the post-processor add BOS and/or EOS, as Transformers does when
    /// tokenizer_config.json sets `add_bos_token`/`add_eos_token`.
    fn set_bos_eos_processing(&mut self, add_bos: bool, add_eos: bool) -> Result<()> {
        let bos = self
            .bos_token()
            .and_then(|t| Some((t.to_owned(), self.token_to_id(t)?)))
            .filter(|_| add_bos);
        let eos = self
            .eos_token()
            .and_then(|t| Some((t.to_owned(), self.token_to_id(t)?)))
            .filter(|_| add_eos);
        let processor = template_processing(bos, eos);
        let processor: tokenizers::processors::PostProcessorWrapper =
            serde_json::from_value(processor).map_err(|e| self.error(e))?;
        Arc::make_mut(&mut self.inner).with_post_processor(Some(processor));
        Ok(())
    }

    fn check_ids(&self, ids: &[u32]) -> Result<()> {
        match ids.iter().find(|&&id| self.inner.id_to_token(id).is_none()) {
            Some(id) => Err(Error::Tokenizer {
                path: self.source.clone(),
                message: format!(
                    "token id {id} is not in the vocabulary of {} tokens",
                    self.vocab_size()
                ),
            }),
            None => Ok(()),
        }
    }

    fn error(&self, error: impl std::fmt::Display) -> Error {
        Error::Tokenizer {
            path: self.source.clone(),
            message: error.to_string(),
        }
    }
}

/// A `TemplateProcessing` post-processor adding the given BOS/EOS `(token, id)`, written as
/// Transformers' `update_post_processor` writes it.
fn template_processing(bos: Option<(String, u32)>, eos: Option<(String, u32)>) -> Value {
    let special =
        |token: &str, type_id: u32| json!({"SpecialToken": {"id": token, "type_id": type_id}});
    let sequence = |id: &str, type_id: u32| json!({"Sequence": {"id": id, "type_id": type_id}});
    let mut single = Vec::new();
    if let Some((token, _)) = &bos {
        single.push(special(token, 0));
    }
    single.push(sequence("A", 0));
    if let Some((token, _)) = &eos {
        single.push(special(token, 0));
    }
    let mut pair = single.clone();
    if let Some((token, _)) = &bos {
        pair.push(special(token, 1));
    }
    pair.push(sequence("B", 1));
    if let Some((token, _)) = &eos {
        pair.push(special(token, 1));
    }
    let mut specials = serde_json::Map::new();
    for (token, id) in bos.iter().chain(eos.iter()) {
        specials.insert(
            token.clone(),
            json!({"id": token, "ids": [id], "tokens": [token]}),
        );
    }
    json!({"type": "TemplateProcessing", "single": single, "pair": pair, "special_tokens": specials})
}

fn read_json_if_present(path: &Path) -> Result<Option<Value>> {
    let bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io(path, e)),
    };
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|source| Error::Json {
            path: path.to_owned(),
            source,
        })
}

/// A special token field of tokenizer_config.json: a string, `{"content": …}` or null.
fn special_token_field(
    path: &Path,
    fields: &serde_json::Map<String, Value>,
    name: &str,
) -> Result<Option<String>> {
    match fields.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(token)) => Ok(Some(token.clone())),
        Some(Value::Object(object)) => match object.get("content") {
            Some(Value::String(token)) => Ok(Some(token.clone())),
            _ => Err(Error::config(
                path,
                name,
                "an object special token needs a string `content`",
            )),
        },
        Some(other) => Err(Error::config(
            path,
            name,
            format!("expected a string or an object with `content`, got {other}"),
        )),
    }
}

fn optional_bool(
    path: &Path,
    fields: &serde_json::Map<String, Value>,
    name: &str,
) -> Result<Option<bool>> {
    match fields.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(yes)) => Ok(Some(*yes)),
        Some(other) => Err(Error::config(
            path,
            name,
            format!("expected true or false, got {other}"),
        )),
    }
}

/// tokenizer_config.json's `chat_template`: a string, or a list of `{"name", "template"}`.
fn config_templates(path: &Path, value: Option<&Value>) -> Result<Vec<NamedTemplate>> {
    match value {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::String(source)) => Ok(vec![NamedTemplate::new("default", source.clone())]),
        Some(Value::Array(entries)) => entries
            .iter()
            .map(|entry| match (entry.get("name"), entry.get("template")) {
                (Some(Value::String(name)), Some(Value::String(source))) => {
                    Ok(NamedTemplate::new(name.clone(), source.clone()))
                }
                _ => Err(Error::config(
                    path,
                    "chat_template",
                    "each named template needs string `name` and `template` fields",
                )),
            })
            .collect(),
        Some(other) => Err(Error::config(
            path,
            "chat_template",
            format!("expected a string or a list of named templates, got {other}"),
        )),
    }
}

/// `chat_template.jinja` (as `default`) and `additional_chat_templates/NAME.jinja`.
fn file_templates(dir: &Path) -> Result<Vec<NamedTemplate>> {
    let mut templates = Vec::new();
    let default = dir.join("chat_template.jinja");
    if default.is_file() {
        templates.push(NamedTemplate::new("default", read_text(&default)?));
    }
    let extra_dir = dir.join("additional_chat_templates");
    if extra_dir.is_dir() {
        let mut paths: Vec<PathBuf> = std::fs::read_dir(&extra_dir)
            .map_err(|e| Error::io(&extra_dir, e))?
            .map(|entry| {
                entry
                    .map(|e| e.path())
                    .map_err(|e| Error::io(&extra_dir, e))
            })
            .collect::<Result<_>>()?;
        paths.sort();
        for path in paths
            .into_iter()
            .filter(|p| p.extension().is_some_and(|e| e == "jinja"))
        {
            let name = path
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default();
            let source = read_text(&path)?;
            templates.retain(|t: &NamedTemplate| t.name != name);
            templates.push(NamedTemplate::new(name, source));
        }
    }
    Ok(templates)
}

fn read_text(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|e| Error::io(path, e))
}

/// Text from tokens generated one at a time: `tokenizers`' `DecodeStream`, owning its
/// tokenizer so that it can live in a generation stream.
///
/// [`StreamDecoder::push`] returns the text each token completes. A character whose bytes are
/// spread over several tokens is held back until its last byte arrives, so no chunk ever ends
/// in a broken character (U+FFFD). The chunks followed by [`StreamDecoder::finish`] add up to
/// `decode(all ids)`, SentencePiece's dropped leading space included. `DecodeStream` has no
/// `finish`: that is what this type adds, with the vocabulary check of each id.
#[derive(Clone, Debug)]
pub struct StreamDecoder {
    tokenizer: Arc<tokenizers::Tokenizer>,
    skip_special_tokens: bool,
    ids: Vec<u32>,
    /// `DecodeStream`'s state: the ids it decodes, the text of `window[..prefix_index]`
    /// (already emitted), and `prefix_index`.
    window: Vec<u32>,
    prefix: String,
    prefix_index: usize,
}

impl StreamDecoder {
    fn new(tokenizer: Arc<tokenizers::Tokenizer>) -> Self {
        StreamDecoder {
            tokenizer,
            skip_special_tokens: false,
            ids: Vec::new(),
            window: Vec::new(),
            prefix: String::new(),
            prefix_index: 0,
        }
    }

    /// Leaves special tokens (`</s>`, `<|im_end|>`, …) out of the text; off by default.
    pub fn skip_special_tokens(mut self, yes: bool) -> Self {
        self.skip_special_tokens = yes;
        self
    }

    /// Adds a token; returns the text it completes, or `None` while a character is incomplete
    /// (or the token adds no text).
    pub fn push(&mut self, id: u32) -> Result<Option<String>> {
        if self.tokenizer.id_to_token(id).is_none() {
            return Err(tokenizer_error(format!(
                "token id {id} is not in the vocabulary of {} tokens",
                self.tokenizer.get_vocab_size(true)
            )));
        }
        self.ids.push(id);
        tokenizers::tokenizer::step_decode_stream(
            &self.tokenizer,
            vec![id],
            self.skip_special_tokens,
            &mut self.window,
            &mut self.prefix,
            &mut self.prefix_index,
        )
        .map_err(|e| tokenizer_error(e.to_string()))
    }

    /// The text still held back (a trailing incomplete character comes out as U+FFFD, as
    /// `decode` writes it).
    pub fn finish(self) -> Result<String> {
        let text = self
            .tokenizer
            .decode(&self.window, self.skip_special_tokens)
            .map_err(|e| tokenizer_error(e.to_string()))?;
        Ok(text
            .strip_prefix(self.prefix.as_str())
            .unwrap_or_default()
            .to_owned())
    }

    /// Every id pushed so far.
    pub fn tokens(&self) -> &[u32] {
        &self.ids
    }
}

fn tokenizer_error(message: String) -> Error {
    Error::Tokenizer {
        path: None,
        message,
    }
}

mod gguf;

#[cfg(test)]
mod tests;
