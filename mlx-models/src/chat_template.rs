//! Chat templates: the Jinja prompt formats of Hugging Face tokenizers, rendered with minijinja
//! and set up the way Transformers sets up Jinja for them.
//!
//! Transformers compiles a template with `trim_blocks=True, lstrip_blocks=True` (and Jinja's
//! default of dropping one trailing newline), the loop-controls extension (`{% break %}`,
//! `{% continue %}`) and a `{% generation %}` block that only marks assistant text. It adds the
//! globals `raise_exception(message)` and `strftime_now(format)`, replaces `tojson` with Python's
//! `json.dumps` (no HTML escaping, `ensure_ascii`, `indent`, `separators` and `sort_keys`
//! arguments), and renders with `messages`, `tools`, `documents`, `add_generation_prompt`, the
//! tokenizer's special tokens (`bos_token`, `eos_token`, …) and any extra keyword arguments.
//! All of that is reproduced here; Python string and dict methods (`.strip()`, `.split()`,
//! `.items()`, …) come from `minijinja-contrib`'s pycompat layer, and values print as Python
//! prints them (`None`, `True`, `['a', 1]`).

use std::fmt::Write as _;

use minijinja::value::{Kwargs, Value, ValueKind};
use minijinja::{AutoEscape, Environment, ErrorKind, Output, State};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The name the template is registered under inside its environment (shows in error messages).
const TEMPLATE_NAME: &str = "chat_template";

/// One turn of a conversation, as Hugging Face chat templates read it.
///
/// Besides `role` and `content`, a message may carry any other field a template reads
/// (`tool_calls`, `name`, `reasoning_content`, …) in [`Message::extra`]; they serialize flat,
/// next to `role` and `content`, exactly like the Python dicts Transformers passes.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Message {
    /// `system`, `user`, `assistant`, `tool`, …
    pub role: String,
    /// The text, or a list of typed parts; `None` (templates see `none`, as for a Python
    /// `"content": None`) for e.g. an assistant turn that only calls tools.
    #[serde(default)]
    pub content: Option<Content>,
    /// Every other field of the message, in order.
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

/// A message's content: a plain string or Hugging Face's list of typed parts.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Content {
    /// Plain text.
    Text(String),
    /// Typed parts such as `{"type": "text", "text": "…"}` or `{"type": "image"}`.
    Parts(Vec<ContentPart>),
}

/// One part of a multi-part message content.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ContentPart {
    /// `text`, `image`, …
    #[serde(rename = "type")]
    pub kind: String,
    /// The text of a `text` part.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    /// Every other field of the part.
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

impl Message {
    /// A message with plain text content.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Message {
            role: role.into(),
            content: Some(Content::Text(content.into())),
            extra: serde_json::Map::new(),
        }
    }

    /// A `system` message.
    pub fn system(content: impl Into<String>) -> Self {
        Self::new("system", content)
    }

    /// A `user` message.
    pub fn user(content: impl Into<String>) -> Self {
        Self::new("user", content)
    }

    /// An `assistant` message.
    pub fn assistant(content: impl Into<String>) -> Self {
        Self::new("assistant", content)
    }

    /// A `tool` message (a tool's result).
    pub fn tool(content: impl Into<String>) -> Self {
        Self::new("tool", content)
    }

    /// Adds (or replaces) another field, such as `tool_calls` or `reasoning_content`.
    pub fn with_field(
        mut self,
        key: impl Into<String>,
        value: impl Into<serde_json::Value>,
    ) -> Self {
        self.extra.insert(key.into(), value.into());
        self
    }

    /// The text of the message: the string, or its text parts joined; empty when absent.
    pub fn text(&self) -> String {
        match &self.content {
            None => String::new(),
            Some(Content::Text(text)) => text.clone(),
            Some(Content::Parts(parts)) => parts.iter().filter_map(|p| p.text.as_deref()).collect(),
        }
    }
}

/// What a template is rendered with besides the messages.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ChatTemplateOptions {
    /// Append the header that opens the assistant's turn.
    pub add_generation_prompt: bool,
    /// Tool (function) JSON schemas; templates see `none` when absent.
    pub tools: Option<Vec<serde_json::Value>>,
    /// Documents for retrieval-augmented templates; templates see `none` when absent.
    pub documents: Option<Vec<serde_json::Value>>,
    /// Which of a tokenizer's named templates to use (`default`, `tool_use`, …).
    pub template_name: Option<String>,
    /// Extra variables (`enable_thinking`, `date_string`, …); they override special tokens.
    pub kwargs: serde_json::Map<String, serde_json::Value>,
}

impl ChatTemplateOptions {
    /// No generation prompt, no tools, no extra variables.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets [`ChatTemplateOptions::add_generation_prompt`].
    pub fn add_generation_prompt(mut self, yes: bool) -> Self {
        self.add_generation_prompt = yes;
        self
    }

    /// Sets [`ChatTemplateOptions::tools`].
    pub fn tools(mut self, tools: Vec<serde_json::Value>) -> Self {
        self.tools = Some(tools);
        self
    }

    /// Sets [`ChatTemplateOptions::documents`].
    pub fn documents(mut self, documents: Vec<serde_json::Value>) -> Self {
        self.documents = Some(documents);
        self
    }

    /// Sets [`ChatTemplateOptions::template_name`].
    pub fn template_name(mut self, name: impl Into<String>) -> Self {
        self.template_name = Some(name.into());
        self
    }

    /// Adds one extra template variable.
    pub fn kwarg(mut self, key: impl Into<String>, value: impl Into<serde_json::Value>) -> Self {
        self.kwargs.insert(key.into(), value.into());
        self
    }
}

/// A compiled chat template.
#[derive(Clone)]
pub struct ChatTemplate {
    source: String,
    env: Environment<'static>,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("source", &self.source)
            .finish_non_exhaustive()
    }
}

impl ChatTemplate {
    /// Compiles a template; a syntax error is an [`Error::ChatTemplate`].
    pub fn new(source: impl Into<String>) -> Result<Self> {
        let source = source.into();
        let mut env = environment()?;
        env.add_template_owned(TEMPLATE_NAME, rewrite_generation_tags(&source))
            .map_err(template_error)?;
        Ok(ChatTemplate { source, env })
    }

    /// The template's source, as given.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Renders `messages`.
    ///
    /// A template's `raise_exception(message)` becomes [`Error::ChatTemplateRaised`]; other
    /// failures (an unknown filter, calling an undefined value, …) [`Error::ChatTemplate`].
    pub fn render(&self, messages: &[Message], options: &ChatTemplateOptions) -> Result<String> {
        self.render_with_special_tokens(messages, options, &[])
    }

    /// Renders with a tokenizer's special tokens (`bos_token`, …) as defaults that
    /// `options.kwargs` may override, like Transformers' `apply_chat_template`.
    pub(crate) fn render_with_special_tokens(
        &self,
        messages: &[Message],
        options: &ChatTemplateOptions,
        special_tokens: &[(String, String)],
    ) -> Result<String> {
        let messages = messages
            .iter()
            .map(message_value)
            .collect::<Result<Vec<_>>>()?;
        let mut context = serde_json::Map::new();
        for (name, token) in special_tokens {
            context.insert(name.clone(), serde_json::Value::String(token.clone()));
        }
        for (key, value) in &options.kwargs {
            context.insert(key.clone(), value.clone());
        }
        context.insert("messages".into(), serde_json::Value::Array(messages));
        context.insert(
            "tools".into(),
            options
                .tools
                .clone()
                .map_or(serde_json::Value::Null, Into::into),
        );
        context.insert(
            "documents".into(),
            options
                .documents
                .clone()
                .map_or(serde_json::Value::Null, Into::into),
        );
        context.insert(
            "add_generation_prompt".into(),
            options.add_generation_prompt.into(),
        );

        let template = self
            .env
            .get_template(TEMPLATE_NAME)
            .map_err(template_error)?;
        template
            .render(Value::from(minijinja::value::Serde(&context)))
            .map_err(template_error)
    }
}

/// A message as Transformers hands it to the template: its reasoning, under whichever of
/// `reasoning_content`, `thinking` or `reasoning` it came, is also given as `thinking` and
/// `reasoning_content` (templates read one or the other).
fn message_value(message: &Message) -> Result<serde_json::Value> {
    let value = serde_json::to_value(message).map_err(|e| Error::ChatTemplate {
        message: format!("message does not serialize: {e}"),
    })?;
    let serde_json::Value::Object(fields) = value else {
        return Ok(value);
    };
    let reasoning = ["reasoning_content", "thinking", "reasoning"]
        .iter()
        .find_map(|key| fields.get(*key).filter(|v| !v.is_null()).cloned());
    let Some(reasoning) = reasoning else {
        return Ok(serde_json::Value::Object(fields));
    };
    let mut aliased = serde_json::Map::new();
    aliased.insert("thinking".into(), reasoning.clone());
    for (key, value) in fields {
        aliased.insert(key, value);
    }
    aliased.insert("reasoning_content".into(), reasoning);
    Ok(serde_json::Value::Object(aliased))
}

/// The marker attached to the error `raise_exception` returns, so the message can be told
/// apart from the engine's own errors.
#[derive(Debug)]
struct Raised(String);

impl std::fmt::Display for Raised {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Raised {}

fn template_error(error: minijinja::Error) -> Error {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&error);
    while let Some(current) = source {
        if let Some(raised) = current.downcast_ref::<Raised>() {
            return Error::ChatTemplateRaised {
                message: raised.0.clone(),
            };
        }
        source = current.source();
    }
    Error::ChatTemplate {
        message: error.to_string(),
    }
}

fn environment() -> Result<Environment<'static>> {
    let mut env = Environment::new();
    let syntax = minijinja::syntax::SyntaxConfig::builder()
        .trim_blocks(true)
        .lstrip_blocks(true)
        .keep_trailing_newline(false)
        .build()
        .map_err(template_error)?;
    env.set_syntax(syntax);
    env.set_auto_escape_callback(|_| AutoEscape::None);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.set_formatter(python_formatter);
    env.add_filter("tojson", tojson);
    env.add_function("raise_exception", raise_exception);
    env.add_function("strftime_now", strftime_now);
    Ok(env)
}

fn raise_exception(message: Option<Value>) -> std::result::Result<Value, minijinja::Error> {
    let message = match message {
        Some(value) => value
            .as_str()
            .map(str::to_owned)
            .unwrap_or_else(|| py_str(&value)),
        None => String::new(),
    };
    Err(
        minijinja::Error::new(ErrorKind::InvalidOperation, message.clone())
            .with_source(Raised(message)),
    )
}

/// Transformers' `strftime_now`: `datetime.now().strftime(format)`, the local time.
fn strftime_now(format: &str) -> std::result::Result<Value, minijinja::Error> {
    strftime(format, &jiff::Zoned::now()).map(Value::from)
}

/// `{{ value }}` prints like Python's `str(value)`: `None`, `True`, `2.0`, `['a', 1]`.
fn python_formatter(
    out: &mut Output,
    state: &mut State,
    value: &Value,
) -> std::result::Result<(), minijinja::Error> {
    match value.kind() {
        ValueKind::None | ValueKind::Bool | ValueKind::Number | ValueKind::Seq | ValueKind::Map => {
            out.write_str(&py_str(value))
                .map_err(|_| minijinja::Error::from(ErrorKind::WriteFailure))
        }
        _ => minijinja::escape_formatter(out, state, value),
    }
}

/// Python's `str()` of a template value.
fn py_str(value: &Value) -> String {
    match value.kind() {
        ValueKind::String => value.as_str().unwrap_or_default().to_owned(),
        _ => py_repr(value),
    }
}

/// Python's `repr()` of a template value. minijinja's `Debug` already prints strings,
/// `None`, booleans and integers as Python does; its floats (`1e-5`, `1e16`) and tuples
/// (`[1, 2]`), also inside containers, are not Python's, hence the walk.
fn py_repr(value: &Value) -> String {
    match value.kind() {
        ValueKind::Undefined => String::new(),
        ValueKind::Number if !value.is_integer() => match f64::try_from(value.clone()) {
            Ok(x) => py_float_repr(x),
            Err(_) => value.to_string(),
        },
        ValueKind::Seq => {
            let items: Vec<String> = value
                .try_iter()
                .map(|it| it.map(|v| py_repr(&v)).collect())
                .unwrap_or_default();
            match (value.is_tuple(), items.as_slice()) {
                (true, [one]) => format!("({one},)"),
                (true, _) => format!("({})", items.join(", ")),
                (false, _) => format!("[{}]", items.join(", ")),
            }
        }
        ValueKind::Map => {
            let items: Vec<String> = value
                .try_iter()
                .map(|keys| {
                    keys.map(|key| {
                        let item = value.get_item(&key).unwrap_or_default();
                        format!("{}: {}", py_repr(&key), py_repr(&item))
                    })
                    .collect()
                })
                .unwrap_or_default();
            format!("{{{}}}", items.join(", "))
        }
        _ => format!("{value:?}"),
    }
}

/// Python's `repr()` of a float. Rust's `Debug` picks the same shortest round-trip digits
/// and the same switch to scientific notation (below 1e-4, from 1e16); Python writes the
/// exponent with a sign and two digits (`1e-05`, `1e+16`) and spells `nan` and `inf`.
fn py_float_repr(x: f64) -> String {
    if x.is_nan() {
        return "nan".into();
    }
    if x.is_infinite() {
        return if x > 0.0 { "inf" } else { "-inf" }.into();
    }
    let debug = format!("{x:?}");
    match debug.split_once('e') {
        Some((mantissa, exponent)) => {
            let exponent: i32 = exponent.parse().unwrap_or(0);
            format!("{mantissa}e{exponent:+03}")
        }
        None => debug,
    }
}

/// How `tojson` writes JSON: the arguments of Python's `json.dumps`.
struct JsonStyle {
    ensure_ascii: bool,
    indent: Option<String>,
    item_separator: String,
    key_separator: String,
    sort_keys: bool,
}

/// Transformers' `tojson`: `json.dumps(x, ensure_ascii=False, indent=None, separators=None,
/// sort_keys=False)`, with the arguments given by position or by name.
fn tojson(
    value: &Value,
    positional: &[Value],
    kwargs: Kwargs,
) -> std::result::Result<Value, minijinja::Error> {
    let invalid = |message: String| minijinja::Error::new(ErrorKind::InvalidOperation, message);
    const NAMES: [&str; 4] = ["ensure_ascii", "indent", "separators", "sort_keys"];
    if positional.len() > NAMES.len() {
        return Err(invalid(format!(
            "tojson takes at most {} arguments",
            NAMES.len()
        )));
    }
    let mut given: Vec<Option<Value>> = vec![None; NAMES.len()];
    for (slot, value) in given.iter_mut().zip(positional) {
        *slot = Some(value.clone());
    }
    for (slot, name) in given.iter_mut().zip(NAMES) {
        if let Some(value) = kwargs.get::<Option<Value>>(name)? {
            *slot = Some(value);
        }
    }
    kwargs.assert_all_used()?;
    let [ensure_ascii, indent, separators, sort_keys] =
        <[Option<Value>; 4]>::try_from(given).map_err(|_| invalid("tojson arguments".into()))?;

    let indent = match indent.filter(|v| !v.is_none() && !v.is_undefined()) {
        None => None,
        Some(v) if v.kind() == ValueKind::String => Some(v.as_str().unwrap_or_default().to_owned()),
        Some(v) => match v.as_i64() {
            Some(n) => Some(" ".repeat(n.max(0) as usize)),
            None => {
                return Err(invalid(format!(
                    "tojson: indent must be an integer or a string, not {v}"
                )))
            }
        },
    };
    let (item_separator, key_separator) =
        match separators.filter(|v| !v.is_none() && !v.is_undefined()) {
            None if indent.is_some() => (",".to_owned(), ": ".to_owned()),
            None => (", ".to_owned(), ": ".to_owned()),
            Some(seps) => {
                let parts: Vec<String> = seps
                    .try_iter()?
                    .map(|p| p.as_str().unwrap_or_default().to_owned())
                    .collect();
                match <[String; 2]>::try_from(parts) {
                    Ok([item, key]) => (item, key),
                    Err(_) => {
                        return Err(invalid(
                            "tojson: separators must be an (item, key) pair".into(),
                        ))
                    }
                }
            }
        };
    let style = JsonStyle {
        ensure_ascii: ensure_ascii.is_some_and(|v| v.is_true()),
        indent,
        item_separator,
        key_separator,
        sort_keys: sort_keys.is_some_and(|v| v.is_true()),
    };
    let mut out = String::new();
    write_json(&mut out, value, &style, 0)?;
    Ok(Value::from(out))
}

fn write_json(
    out: &mut String,
    value: &Value,
    style: &JsonStyle,
    level: usize,
) -> std::result::Result<(), minijinja::Error> {
    let not_serializable = |kind: &str| {
        minijinja::Error::new(
            ErrorKind::InvalidOperation,
            format!("Object of type {kind} is not JSON serializable"),
        )
    };
    match value.kind() {
        ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if value.is_true() { "true" } else { "false" }),
        ValueKind::Number if value.is_integer() => out.push_str(&value.to_string()),
        ValueKind::Number => {
            let x = f64::try_from(value.clone())?;
            match x {
                x if x.is_nan() => out.push_str("NaN"),
                x if x == f64::INFINITY => out.push_str("Infinity"),
                x if x == f64::NEG_INFINITY => out.push_str("-Infinity"),
                x => out.push_str(&py_float_repr(x)),
            }
        }
        ValueKind::String => {
            write_json_string(out, value.as_str().unwrap_or_default(), style.ensure_ascii)
        }
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<Value> = value.try_iter()?.collect();
            write_json_container(out, style, level, '[', ']', &items, |out, item, level| {
                write_json(out, item, style, level)
            })?;
        }
        ValueKind::Map => {
            let mut entries = Vec::new();
            for key in value.try_iter()? {
                let item = value.get_item(&key)?;
                let key = match key.kind() {
                    ValueKind::String => key.as_str().unwrap_or_default().to_owned(),
                    ValueKind::None => "null".into(),
                    ValueKind::Bool => if key.is_true() { "true" } else { "false" }.into(),
                    ValueKind::Number => py_str(&key),
                    _ => {
                        return Err(minijinja::Error::new(
                            ErrorKind::InvalidOperation,
                            format!(
                                "keys must be str, int, float, bool or None, not {}",
                                key.kind()
                            ),
                        ))
                    }
                };
                entries.push((key, item));
            }
            if style.sort_keys {
                entries.sort_by(|a, b| a.0.cmp(&b.0));
            }
            write_json_container(
                out,
                style,
                level,
                '{',
                '}',
                &entries,
                |out, (key, item), level| {
                    write_json_string(out, key, style.ensure_ascii);
                    out.push_str(&style.key_separator);
                    write_json(out, item, style, level)
                },
            )?;
        }
        ValueKind::Undefined => return Err(not_serializable("Undefined")),
        other => return Err(not_serializable(&other.to_string())),
    }
    Ok(())
}

fn write_json_container<T>(
    out: &mut String,
    style: &JsonStyle,
    level: usize,
    open: char,
    close: char,
    items: &[T],
    mut write_item: impl FnMut(&mut String, &T, usize) -> std::result::Result<(), minijinja::Error>,
) -> std::result::Result<(), minijinja::Error> {
    out.push(open);
    if items.is_empty() {
        out.push(close);
        return Ok(());
    }
    let inner_indent = style
        .indent
        .as_ref()
        .map(|unit| format!("\n{}", unit.repeat(level + 1)));
    if let Some(newline) = &inner_indent {
        out.push_str(newline);
    }
    for (index, item) in items.iter().enumerate() {
        if index > 0 {
            out.push_str(&style.item_separator);
            if let Some(newline) = &inner_indent {
                out.push_str(newline);
            }
        }
        write_item(out, item, level + 1)?;
    }
    if let Some(unit) = &style.indent {
        out.push('\n');
        out.push_str(&unit.repeat(level));
    }
    out.push(close);
    Ok(())
}

/// A JSON string as Python's `json.dumps` writes it.
fn write_json_string(out: &mut String, text: &str, ensure_ascii: bool) {
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 || (ensure_ascii && !(' '..='~').contains(&c)) => {
                let mut units = [0u16; 2];
                for unit in c.encode_utf16(&mut units) {
                    let _ = write!(out, "\\u{unit:04x}");
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// Rewrites Transformers' `{% generation %}…{% endgeneration %}` (which only records where the
/// assistant's text is) into an always-true `if` block, keeping its whitespace control so the
/// output is unchanged.
fn rewrite_generation_tags(source: &str) -> String {
    let mut out = String::with_capacity(source.len());
    let mut rest = source;
    while let Some(start) = rest.find("{%") {
        out.push_str(&rest[..start]);
        let tag = &rest[start..];
        match parse_generation_tag(tag) {
            Some((len, open_ws, is_end, close_ws)) => {
                let body = if is_end { "endif" } else { "if true" };
                let _ = write!(out, "{{%{open_ws} {body} {close_ws}%}}");
                rest = &tag[len..];
            }
            None => {
                out.push_str("{%");
                rest = &tag[2..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// `{%[-+]? (end)?generation [-+]?%}` at the start of `tag`: (length, opening whitespace
/// control, whether it is the end tag, closing whitespace control).
fn parse_generation_tag(tag: &str) -> Option<(usize, &str, bool, &str)> {
    let after_open = &tag[2..];
    let (open_ws, after_ws) = match after_open.chars().next() {
        Some(c @ ('-' | '+')) => (&after_open[..c.len_utf8()], &after_open[1..]),
        _ => ("", after_open),
    };
    let body = after_ws.trim_start();
    let (is_end, after_name) = if let Some(rest) = body.strip_prefix("endgeneration") {
        (true, rest)
    } else if let Some(rest) = body.strip_prefix("generation") {
        (false, rest)
    } else {
        return None;
    };
    let trimmed = after_name.trim_start();
    if trimmed.len() == after_name.len()
        && !(trimmed.starts_with("%}") || trimmed.starts_with("-%}") || trimmed.starts_with("+%}"))
    {
        return None; // `{% generation_x %}` is some other tag
    }
    let (close_ws, close_len) = if trimmed.starts_with("%}") {
        ("", 2)
    } else if trimmed.starts_with("-%}") {
        ("-", 3)
    } else if trimmed.starts_with("+%}") {
        ("+", 3)
    } else {
        return None;
    };
    let consumed = tag.len() - trimmed.len() + close_len;
    Some((consumed, open_ws, is_end, close_ws))
}

/// `datetime.strftime` of a naive `datetime` (what `datetime.now()` returns) at `time`'s civil
/// time, through jiff's `strftime`. Where jiff differs from Python it is adapted: a naive time
/// has no zone, so `%z` and `%Z` print nothing; `%c` and `%x` print the C locale's
/// `Thu Jan  1 00:00:00 1970` and `01/01/70` (jiff's are ISO-like); `%f` is six digits of
/// microseconds; a trailing `%` is kept (jiff rejects it).
fn strftime(format: &str, time: &jiff::Zoned) -> std::result::Result<String, minijinja::Error> {
    let mut c_locale = String::with_capacity(format.len());
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            c_locale.push(c);
            continue;
        }
        match chars.next() {
            Some('c') => c_locale.push_str("%a %b %e %H:%M:%S %Y"),
            Some('x') => c_locale.push_str("%m/%d/%y"),
            Some('f') => c_locale.push_str("%6f"),
            Some('z' | 'Z') => {}
            Some(next) => c_locale.extend(['%', next]),
            None => c_locale.push_str("%%"),
        }
    }
    jiff::fmt::strtime::format(c_locale.as_str(), time.datetime()).map_err(|e| {
        minijinja::Error::new(
            ErrorKind::InvalidOperation,
            format!("strftime_now({format:?}): {e}"),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn render(source: &str, messages: &[Message], options: &ChatTemplateOptions) -> Result<String> {
        ChatTemplate::new(source)?.render(messages, options)
    }

    #[test]
    fn trims_blocks_and_strips_their_indentation_like_transformers() {
        let source = "{% for m in messages %}\n    {% if true %}\n[{{ m.role }}]\n    {% endif %}\n{% endfor %}\n";
        let out = render(
            source,
            &[Message::user("a"), Message::assistant("b")],
            &ChatTemplateOptions::new(),
        )
        .unwrap();
        assert_eq!(out, "[user]\n[assistant]\n");
    }

    #[test]
    fn drops_exactly_one_trailing_newline() {
        let out = render("x\n\n", &[], &ChatTemplateOptions::new()).unwrap();
        assert_eq!(out, "x\n");
    }

    #[test]
    fn raise_exception_is_a_typed_error_with_the_message() {
        let source = "{% if messages|length == 0 %}{{ raise_exception('need at least one message') }}{% endif %}";
        match render(source, &[], &ChatTemplateOptions::new()) {
            Err(Error::ChatTemplateRaised { message }) => {
                assert_eq!(message, "need at least one message")
            }
            other => panic!("expected ChatTemplateRaised, got {other:?}"),
        }
    }

    #[test]
    fn syntax_and_runtime_errors_are_chat_template_errors() {
        assert!(matches!(
            ChatTemplate::new("{% if %}"),
            Err(Error::ChatTemplate { .. })
        ));
        let err = render("{{ nothing() }}", &[], &ChatTemplateOptions::new()).unwrap_err();
        assert!(matches!(err, Error::ChatTemplate { .. }), "{err:?}");
    }

    #[test]
    fn tools_and_documents_are_none_not_undefined() {
        let source = "{{ tools is defined }} {{ tools is none }} {{ documents is none }} {{ add_generation_prompt }}";
        let out = render(source, &[], &ChatTemplateOptions::new()).unwrap();
        assert_eq!(out, "True True True False");
        let options = ChatTemplateOptions::new()
            .tools(vec![serde_json::json!({"name": "f"})])
            .add_generation_prompt(true);
        assert_eq!(
            render(source, &[], &options).unwrap(),
            "True False True True"
        );
    }

    #[test]
    fn kwargs_reach_the_template_and_win_over_special_tokens() {
        let template =
            ChatTemplate::new("{{ bos_token }}|{{ eos_token }}|{{ enable_thinking }}").unwrap();
        let options = ChatTemplateOptions::new()
            .kwarg("eos_token", "<override>")
            .kwarg("enable_thinking", false);
        let specials = [
            ("bos_token".to_owned(), "<s>".to_owned()),
            ("eos_token".to_owned(), "</s>".to_owned()),
        ];
        let out = template
            .render_with_special_tokens(&[], &options, &specials)
            .unwrap();
        assert_eq!(out, "<s>|<override>|False");
    }

    #[test]
    fn content_parts_and_extra_fields_serialize_like_python_dicts() {
        let json = r#"{"role": "user", "content": [{"type": "text", "text": "hi"}, {"type": "image", "url": "x"}], "name": "bob"}"#;
        let message: Message = serde_json::from_str(json).unwrap();
        assert_eq!(message.text(), "hi");
        assert_eq!(message.extra["name"], "bob");
        let source = "{% for p in messages[0].content %}{{ p.type }}{% if p.text is defined %}={{ p.text }}{% endif %};{% endfor %}{{ messages[0].name }}";
        assert_eq!(
            render(source, &[message], &ChatTemplateOptions::new()).unwrap(),
            "text=hi;image;bob"
        );
    }

    #[test]
    fn missing_content_is_none() {
        let message: Message =
            serde_json::from_str(r#"{"role": "assistant", "tool_calls": [{"id": "1"}]}"#).unwrap();
        assert_eq!(message.content, None);
        assert_eq!(message.text(), "");
        let source = "{{ messages[0].content is none }} {{ messages[0].tool_calls[0].id }}";
        assert_eq!(
            render(source, &[message], &ChatTemplateOptions::new()).unwrap(),
            "True 1"
        );
    }

    #[test]
    fn reasoning_is_aliased_under_thinking_and_reasoning_content() {
        let message = Message::assistant("4").with_field("reasoning", "2+2");
        let source = "{{ messages[0].thinking }}|{{ messages[0].reasoning_content }}|{{ messages[0].keys()|list }}";
        let out = render(source, &[message], &ChatTemplateOptions::new()).unwrap();
        assert_eq!(
            out,
            "2+2|2+2|['thinking', 'role', 'content', 'reasoning', 'reasoning_content']"
        );
    }

    #[test]
    fn generation_blocks_render_their_body() {
        let source = "{% for m in messages %}{%- generation -%}\n <{{ m.content }}>\n{%- endgeneration %}{% endfor %}";
        assert_eq!(
            rewrite_generation_tags(source),
            "{% for m in messages %}{%- if true -%}\n <{{ m.content }}>\n{%- endif %}{% endfor %}"
        );
        let out = render(
            source,
            &[Message::assistant("a"), Message::assistant("b")],
            &ChatTemplateOptions::new(),
        )
        .unwrap();
        assert_eq!(out, "<a><b>");
        // Other tags that merely start with the word are left alone.
        assert_eq!(
            rewrite_generation_tags("{% generations %}"),
            "{% generations %}"
        );
    }

    #[test]
    fn python_float_repr() {
        let cases = [
            (0.0, "0.0"),
            (-0.0, "-0.0"),
            (2.0, "2.0"),
            (0.1, "0.1"),
            (3.25, "3.25"),
            (1e-4, "0.0001"),
            (1e-5, "1e-05"),
            (1.5e-7, "1.5e-07"),
            (123456789012.0, "123456789012.0"),
            (1e15, "1000000000000000.0"),
            (1e16, "1e+16"),
            (1.2345e300, "1.2345e+300"),
            (f64::INFINITY, "inf"),
        ];
        for (x, expected) in cases {
            assert_eq!(py_float_repr(x), expected, "{x}");
        }
    }

    /// minijinja's own `Debug` is Python's `repr` but for floats and tuples, also nested.
    #[test]
    fn values_print_like_python_where_minijinja_differs() {
        let debug = Value::from(vec![Value::from(1e-5), Value::from(1e16)]);
        assert_eq!(format!("{debug:?}"), "[1e-5, 1e16]");
        assert_eq!(py_repr(&debug), "[1e-05, 1e+16]");
        let out = render(
            "{{ [1e-5, none, true, 'a'] }} {{ (1,) }} {{ (1, 2.5) }} {{ {'k': 1e16} }}",
            &[],
            &ChatTemplateOptions::new(),
        )
        .unwrap();
        assert_eq!(out, "[1e-05, None, True, 'a'] (1,) (1, 2.5) {'k': 1e+16}");
    }

    #[test]
    fn python_string_repr_picks_quotes_like_python() {
        let repr = |text: &str| py_repr(&Value::from(text));
        assert_eq!(repr("it's"), "\"it's\"");
        assert_eq!(repr("a\"b'c"), "'a\"b\\'c'");
        assert_eq!(repr("tab\there\n\u{1}"), "'tab\\there\\n\\x01'");
    }

    #[test]
    fn tojson_rejects_bad_arguments() {
        for source in [
            "{{ 1|tojson(nope=1) }}",
            "{{ 1|tojson(indent=[1]) }}",
            "{{ 1|tojson(separators=(',',)) }}",
            "{{ x|tojson }}",
        ] {
            let err = render(source, &[], &ChatTemplateOptions::new()).unwrap_err();
            assert!(
                matches!(err, Error::ChatTemplate { .. }),
                "{source}: {err:?}"
            );
        }
    }

    #[test]
    fn strftime_now_formats_the_current_date() {
        let out = render(
            "{{ strftime_now('%Y-%m-%d') }}",
            &[],
            &ChatTemplateOptions::new(),
        )
        .unwrap();
        let now = jiff::Zoned::now();
        // Rendering may straddle midnight: accept the date just before or after.
        let candidates = [-5, 5].map(|s| {
            strftime(
                "%Y-%m-%d",
                &now.checked_add(jiff::SignedDuration::from_secs(s)).unwrap(),
            )
            .unwrap()
        });
        assert!(candidates.contains(&out), "{out} not in {candidates:?}");
        assert!(out.starts_with("20"), "{out}");
    }

    /// Transformers formats `datetime.now()`: the local civil time, with no zone.
    #[test]
    fn strftime_prints_the_local_time_without_a_zone() {
        let offset = jiff::tz::TimeZone::fixed(jiff::tz::offset(5));
        let time = jiff::Timestamp::from_second(1_721_995_200)
            .unwrap()
            .to_zoned(offset);
        assert_eq!(
            strftime("%H:%M|%z|%Z|", &time).unwrap(),
            "17:00|||",
            "12:00 UTC is 17:00 at UTC+5"
        );
    }

    /// Where jiff's own `strftime` differs from Python's, and what the adapter prints.
    #[test]
    fn strftime_adapts_where_jiff_differs_from_python() {
        let time = jiff::Timestamp::from_second(0)
            .unwrap()
            .to_zoned(jiff::tz::TimeZone::UTC);
        let jiff = |format: &str| jiff::fmt::strtime::format(format, &time).ok();
        let cases = [
            ("%c", "Thu Jan  1 00:00:00 1970"),
            ("%x", "01/01/70"),
            ("%f", "000000"),
            ("%z", ""),
            ("100%", "100%"),
        ];
        for (format, python) in cases {
            assert_ne!(jiff(format).as_deref(), Some(python), "{format}");
            assert_eq!(strftime(format, &time).unwrap(), python, "{format}");
        }
    }

    fn data(name: &str) -> serde_json::Value {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/data/text")
            .join(name);
        serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
    }

    /// Real-world templates rendered by Transformers' `render_jinja_template` (generate.py).
    #[test]
    fn renders_like_transformers() {
        let cases = data("chat_templates.json");
        let cases = cases.as_array().unwrap();
        assert!(cases.len() >= 10);
        let mut failures = Vec::new();
        for case in cases {
            let name = case["name"].as_str().unwrap();
            let messages: Vec<Message> = serde_json::from_value(case["messages"].clone()).unwrap();
            let mut options = ChatTemplateOptions::new()
                .add_generation_prompt(case["add_generation_prompt"] == true);
            if let Some(tools) = case["tools"].as_array() {
                options = options.tools(tools.clone());
            }
            for (key, value) in case["kwargs"].as_object().unwrap() {
                options = options.kwarg(key.clone(), value.clone());
            }
            let result = render(case["template"].as_str().unwrap(), &messages, &options);
            match (&result, case.get("expected"), case.get("expected_error")) {
                (Ok(out), Some(expected), _) if out == expected.as_str().unwrap() => {}
                (Err(Error::ChatTemplateRaised { message }), _, Some(expected))
                    if message == expected.as_str().unwrap() => {}
                _ => failures.push(format!(
                    "{name}: got {result:?}, expected {:?}",
                    case.get("expected").or(case.get("expected_error"))
                )),
            }
        }
        assert!(failures.is_empty(), "{}", failures.join("\n\n"));
    }

    /// `time.strftime` on fixed UTC times (generate.py).
    #[test]
    fn strftime_matches_python() {
        for case in data("strftime.json").as_array().unwrap() {
            let format = case["format"].as_str().unwrap();
            let timestamp = case["timestamp"].as_i64().unwrap();
            let time = jiff::Timestamp::from_second(timestamp)
                .unwrap()
                .to_zoned(jiff::tz::TimeZone::UTC);
            assert_eq!(
                strftime(format, &time).unwrap(),
                case["expected"].as_str().unwrap(),
                "{format} at {timestamp}"
            );
        }
    }
}
