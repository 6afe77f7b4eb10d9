//! Tool calls in a model's output, in the common formats:
//!
//! - Hermes / Qwen: `<tool_call>{"name": …, "arguments": {…}}</tool_call>`, any number,
//!   possibly after some text;
//! - Llama 3: the whole reply is `{"name": …, "parameters": {…}}` (optionally after
//!   `<|python_tag|>`), several separated by `;`;
//! - Mistral: `[TOOL_CALLS][{"name": …, "arguments": {…}}, …]`, or the newer
//!   `[TOOL_CALLS]name[ARGS]{…}` repeated.
//!
//! [`parse_tool_calls`] reads a finished reply; [`ToolCallStream`] holds back streamed
//! text from the point where a tool call may begin, and hands out each call's name and
//! the growing text of its arguments as they are generated (Hermes and Llama 3 JSON; the
//! other layouts come whole at the end).

use serde_json::Value;

const HERMES_OPEN: &str = "<tool_call>";
const HERMES_CLOSE: &str = "</tool_call>";
const MISTRAL: &str = "[TOOL_CALLS]";
const MISTRAL_ARGS: &str = "[ARGS]";
const PYTHON_TAG: &str = "<|python_tag|>";
const MARKERS: [&str; 3] = [HERMES_OPEN, MISTRAL, PYTHON_TAG];

/// One function call: its name and its arguments as JSON text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ToolCall {
    pub name: String,
    pub arguments: String,
}

/// The tokens whose text marks a tool call; a tokenizer that has them as special tokens
/// would otherwise leave them out of the decoded text.
pub fn marker_tokens() -> &'static [&'static str] {
    &[HERMES_OPEN, HERMES_CLOSE, MISTRAL, MISTRAL_ARGS, PYTHON_TAG]
}

/// The text around the tool calls and the calls themselves, when `text` holds any in one
/// of the formats; `None` when it holds none (or they are not valid JSON calls).
pub fn parse_tool_calls(text: &str) -> Option<(String, Vec<ToolCall>)> {
    if let Some(at) = text.find(HERMES_OPEN) {
        return parse_hermes(text, at);
    }
    if let Some(at) = text.find(MISTRAL) {
        let calls = parse_mistral(text[at + MISTRAL.len()..].trim())?;
        return Some((text[..at].trim().to_owned(), calls));
    }
    let body = text.trim();
    let body = body.strip_prefix(PYTHON_TAG).unwrap_or(body).trim();
    if body.starts_with('{') {
        let calls = body
            .split(';')
            .map(|part| call_from_json(&serde_json::from_str(part.trim()).ok()?))
            .collect::<Option<Vec<_>>>()?;
        return Some((String::new(), calls));
    }
    None
}

fn parse_hermes(text: &str, first: usize) -> Option<(String, Vec<ToolCall>)> {
    let mut content = text[..first].to_owned();
    let mut calls = Vec::new();
    let mut rest = &text[first..];
    while let Some(at) = rest.find(HERMES_OPEN) {
        content.push_str(&rest[..at]);
        let body = &rest[at + HERMES_OPEN.len()..];
        // The closing tag may be missing when generation ended right after the JSON.
        let (json, after) = match body.find(HERMES_CLOSE) {
            Some(end) => (&body[..end], &body[end + HERMES_CLOSE.len()..]),
            None => (body, ""),
        };
        calls.push(call_from_json(&serde_json::from_str(json.trim()).ok()?)?);
        rest = after;
    }
    content.push_str(rest);
    Some((content.trim().to_owned(), calls))
}

fn parse_mistral(body: &str) -> Option<Vec<ToolCall>> {
    if body.starts_with('[') {
        let list: Vec<Value> = serde_json::from_str(body).ok()?;
        return list.iter().map(call_from_json).collect();
    }
    // name[ARGS]{…}name[ARGS]{…}…
    let mut calls = Vec::new();
    let mut rest = body.trim_start_matches(MISTRAL).trim();
    while !rest.is_empty() {
        let at = rest.find(MISTRAL_ARGS)?;
        let name = rest[..at].trim();
        let mut stream =
            serde_json::Deserializer::from_str(&rest[at + MISTRAL_ARGS.len()..]).into_iter();
        let arguments: Value = stream.next()?.ok()?;
        let used = stream.byte_offset();
        if name.is_empty() || !arguments.is_object() {
            return None;
        }
        calls.push(ToolCall {
            name: name.to_owned(),
            arguments: arguments.to_string(),
        });
        rest = rest[at + MISTRAL_ARGS.len() + used..]
            .trim()
            .trim_start_matches(MISTRAL)
            .trim();
    }
    (!calls.is_empty()).then_some(calls)
}

/// `{"name": …, "arguments" | "parameters": {…} or "…"}`.
fn call_from_json(value: &Value) -> Option<ToolCall> {
    let name = value.get("name")?.as_str()?.to_owned();
    let arguments = match value.get("arguments").or_else(|| value.get("parameters")) {
        None | Some(Value::Null) => "{}".to_owned(),
        Some(Value::String(s)) => s.clone(),
        Some(v) => v.to_string(),
    };
    Some(ToolCall { name, arguments })
}

/// What a request's `tool_choice` asks of the reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ToolChoice {
    /// The model decides (`"auto"`, or no `tool_choice`).
    Auto,
    /// The reply must call some tool (`"required"`).
    Required,
    /// The reply must call this function (`{"type": "function", "function": {"name": …}}`).
    Function(String),
}

/// The text the reply is made to start with so that it calls a tool ([`ToolChoice::Required`])
/// or the named one ([`ToolChoice::Function`]), in the format the chat template teaches
/// the model: Hermes `<tool_call>` JSON, Mistral `[TOOL_CALLS]` (a JSON list, or
/// `name[ARGS]{…}` where the template knows `[ARGS]`), otherwise Llama 3's bare JSON.
/// `None` for [`ToolChoice::Auto`].
pub fn forced_opening(template: &str, choice: &ToolChoice) -> Option<String> {
    let name = match choice {
        ToolChoice::Auto => return None,
        ToolChoice::Required => None,
        ToolChoice::Function(name) => Some(Value::String(name.clone()).to_string()),
    };
    let json = |arguments: &str| match &name {
        Some(name) => format!("{{\"name\": {name}, \"{arguments}\": "),
        None => "{\"name\": \"".to_owned(),
    };
    Some(if template.contains(HERMES_OPEN) {
        format!("{HERMES_OPEN}\n{}", json("arguments"))
    } else if template.contains(MISTRAL) && template.contains(MISTRAL_ARGS) {
        match choice {
            ToolChoice::Function(name) => format!("{MISTRAL}{name}{MISTRAL_ARGS}"),
            _ => MISTRAL.to_owned(),
        }
    } else if template.contains(MISTRAL) {
        format!("{MISTRAL}[{}", json("arguments"))
    } else {
        json("parameters")
    })
}

/// A piece of a tool call being streamed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ToolCallDelta {
    /// Call `index` begins, with its name.
    Start { index: usize, name: String },
    /// More of call `index`'s arguments: the pieces of a call, joined, are its arguments
    /// as JSON text.
    Arguments { index: usize, text: String },
}

/// Streamed text with tool calls held back: [`ToolCallStream::push`] returns the text that
/// is certainly content, [`ToolCallStream::deltas`] the calls as far as they can be read,
/// [`ToolCallStream::finish`] (or [`ToolCallStream::finish_deltas`]) the rest.
#[derive(Debug, Default)]
pub struct ToolCallStream {
    held: String,
    mode: Mode,
    /// Per call handed out so far, the bytes of its arguments already handed out.
    streamed: Vec<usize>,
}

#[derive(Debug, Default, PartialEq)]
enum Mode {
    /// Nothing but white space yet.
    #[default]
    Start,
    /// Content; a tool call may still begin.
    Content,
    /// From a tool-call marker (or a leading `{`) on, everything is held.
    Calls,
}

impl ToolCallStream {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds generated text; returns what can be shown as content now.
    pub fn push(&mut self, chunk: &str) -> String {
        self.held.push_str(chunk);
        if self.mode == Mode::Calls {
            return String::new();
        }
        if let Some(at) = MARKERS.iter().filter_map(|m| self.held.find(m)).min() {
            self.mode = Mode::Calls;
            let shown: String = self.held.drain(..at).collect();
            return shown;
        }
        if self.mode == Mode::Start {
            let start = self.held.trim_start();
            if start.is_empty() {
                return String::new();
            }
            if start.starts_with('{') {
                self.mode = Mode::Calls;
                return String::new();
            }
            self.mode = Mode::Content;
        }
        // Keep a tail that may be the start of a marker.
        let keep = MARKERS
            .iter()
            .flat_map(|m| (1..m.len()).map(move |n| &m[..n]))
            .filter(|prefix| self.held.ends_with(prefix))
            .map(str::len)
            .max()
            .unwrap_or(0);
        let split = self.held.len() - keep;
        self.held.drain(..split).collect()
    }

    /// The content still held and the tool calls, once generation has ended. Held text
    /// that is not a valid tool call is content after all.
    pub fn finish(self) -> (String, Vec<ToolCall>) {
        if self.mode == Mode::Calls {
            if let Some((content, calls)) = parse_tool_calls(&self.held) {
                if !calls.is_empty() {
                    return (content, calls);
                }
            }
        }
        (self.held, Vec::new())
    }

    /// The pieces of tool calls readable since the last call: a call's start once its
    /// name is known, then its arguments as they grow.
    pub fn deltas(&mut self) -> Vec<ToolCallDelta> {
        if self.mode != Mode::Calls {
            return Vec::new();
        }
        let scanned = scan_calls(&self.held);
        self.advance_to(&scanned)
    }

    /// Like [`ToolCallStream::finish`], with the calls as the pieces not handed out yet by
    /// [`ToolCallStream::deltas`] (calls it could not follow come whole). Returns the
    /// content still held and those pieces.
    pub fn finish_deltas(mut self) -> (String, Vec<ToolCallDelta>) {
        if self.mode == Mode::Calls {
            if let Some((content, calls)) = parse_tool_calls(&self.held) {
                if !calls.is_empty() {
                    let scanned = scan_calls(&self.held);
                    let mut out = self.advance_to(&scanned);
                    for (index, call) in calls.iter().enumerate().skip(self.streamed.len()) {
                        out.push(ToolCallDelta::Start {
                            index,
                            name: call.name.clone(),
                        });
                        out.push(ToolCallDelta::Arguments {
                            index,
                            text: call.arguments.clone(),
                        });
                    }
                    return (content, out);
                }
            }
        }
        (self.held, Vec::new())
    }

    fn advance_to(&mut self, scanned: &[ScannedCall]) -> Vec<ToolCallDelta> {
        let mut out = Vec::new();
        for (index, call) in scanned.iter().enumerate() {
            if index == self.streamed.len() {
                self.streamed.push(0);
                out.push(ToolCallDelta::Start {
                    index,
                    name: call.name.clone(),
                });
            }
            let sent = self.streamed[index];
            if call.arguments.len() > sent {
                out.push(ToolCallDelta::Arguments {
                    index,
                    text: call.arguments[sent..].to_owned(),
                });
                self.streamed[index] = call.arguments.len();
            }
        }
        out
    }
}

/// A call read from the start of its JSON, as far as it has been generated.
#[derive(Debug)]
struct ScannedCall {
    name: String,
    /// The arguments object's text so far.
    arguments: String,
}

/// The calls readable in held text that begins a tool call: Hermes `<tool_call>` bodies
/// in turn, or one Llama 3 JSON call. A call counts once its name is known and its
/// arguments begin as an object.
fn scan_calls(held: &str) -> Vec<ScannedCall> {
    let mut calls = Vec::new();
    if let Some(first) = held.find(HERMES_OPEN) {
        let mut rest = &held[first..];
        while let Some(at) = rest.find(HERMES_OPEN) {
            let body = &rest[at + HERMES_OPEN.len()..];
            let Some((call, used)) = scan_call(body) else {
                break;
            };
            calls.push(call);
            match used {
                Some(used) => rest = &body[used..],
                None => break,
            }
        }
    } else if !held.contains(MISTRAL) {
        let body = held.trim_start();
        let body = body.strip_prefix(PYTHON_TAG).unwrap_or(body);
        calls.extend(scan_call(body).map(|(call, _)| call));
    }
    calls
}

/// `{"name": "…", "arguments" | "parameters": {…` at the start of `body`: the call as far
/// as it goes, and the bytes it takes once its arguments object is complete.
fn scan_call(body: &str) -> Option<(ScannedCall, Option<usize>)> {
    let mut at = 0;
    let skip_space = |at: &mut usize| {
        *at += body[*at..].len() - body[*at..].trim_start().len();
    };
    let eat = |at: &mut usize, c: char| -> Option<()> {
        skip_space(at);
        body[*at..].starts_with(c).then(|| *at += c.len_utf8())
    };
    // A complete JSON string, decoded.
    let string = |at: &mut usize| -> Option<String> {
        skip_space(at);
        let rest = body[*at..].strip_prefix('"')?;
        let mut escaped = false;
        let end = rest.char_indices().find_map(|(i, c)| {
            let closes = c == '"' && !escaped;
            escaped = c == '\\' && !escaped;
            closes.then_some(i)
        })?;
        let text = serde_json::from_str(&body[*at..*at + end + 2]).ok()?;
        *at += end + 2;
        Some(text)
    };
    eat(&mut at, '{')?;
    (string(&mut at)? == "name").then_some(())?;
    eat(&mut at, ':')?;
    let name = string(&mut at)?;
    eat(&mut at, ',')?;
    let key = string(&mut at)?;
    (key == "arguments" || key == "parameters").then_some(())?;
    eat(&mut at, ':')?;
    skip_space(&mut at);
    let arguments = &body[at..];
    if !arguments.starts_with('{') {
        return None;
    }
    let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
    let mut end = None;
    for (i, c) in arguments.char_indices() {
        if in_string {
            match c {
                _ if escaped => escaped = false,
                '\\' => escaped = true,
                '"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match c {
            '"' => in_string = true,
            '{' | '[' => depth += 1,
            '}' | ']' => {
                depth -= 1;
                if depth == 0 {
                    end = Some(i + 1);
                    break;
                }
            }
            _ => {}
        }
    }
    let taken = end.unwrap_or(arguments.len());
    Some((
        ScannedCall {
            name,
            arguments: arguments[..taken].to_owned(),
        },
        end.map(|end| at + end),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(name: &str, arguments: &str) -> ToolCall {
        ToolCall {
            name: name.into(),
            arguments: arguments.into(),
        }
    }

    #[test]
    fn hermes_calls_with_text_around_them() {
        let text = "Let me check.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": \
                    {\"city\": \"Paris\"}}\n</tool_call>\n<tool_call>{\"name\": \"now\", \
                    \"arguments\": {}}</tool_call>";
        let (content, calls) = parse_tool_calls(text).unwrap();
        assert_eq!(content, "Let me check.");
        assert_eq!(
            calls,
            vec![
                call("get_weather", r#"{"city":"Paris"}"#),
                call("now", "{}")
            ]
        );
        // Generation may stop before the closing tag.
        let (_, calls) =
            parse_tool_calls("<tool_call>{\"name\": \"f\", \"arguments\": {}}").unwrap();
        assert_eq!(calls, vec![call("f", "{}")]);
        assert!(parse_tool_calls("<tool_call>{not json}</tool_call>").is_none());
    }

    #[test]
    fn llama3_json_calls() {
        let text =
            "<|python_tag|>{\"name\": \"a\", \"parameters\": {\"x\": 1}}; {\"name\": \"b\", \
                    \"parameters\": {}}";
        let (content, calls) = parse_tool_calls(text).unwrap();
        assert_eq!(content, "");
        assert_eq!(calls, vec![call("a", r#"{"x":1}"#), call("b", "{}")]);
        assert_eq!(
            parse_tool_calls("  {\"name\": \"a\", \"arguments\": \"{\\\"x\\\": 2}\"}")
                .unwrap()
                .1,
            vec![call("a", r#"{"x": 2}"#)]
        );
        assert!(parse_tool_calls("{\"no_name\": 1}").is_none());
        assert!(parse_tool_calls("The answer is 4.").is_none());
    }

    #[test]
    fn mistral_calls_both_forms() {
        let text = "[TOOL_CALLS][{\"name\": \"add\", \"arguments\": {\"a\": 1, \"b\": 2}}]";
        assert_eq!(
            parse_tool_calls(text).unwrap().1,
            vec![call("add", r#"{"a":1,"b":2}"#)]
        );
        let text = "[TOOL_CALLS]add[ARGS]{\"a\": 1}[TOOL_CALLS]neg[ARGS]{\"x\": 3}";
        assert_eq!(
            parse_tool_calls(text).unwrap().1,
            vec![call("add", r#"{"a":1}"#), call("neg", r#"{"x":3}"#)]
        );
        assert!(parse_tool_calls("[TOOL_CALLS]add[ARGS]not json").is_none());
    }

    #[test]
    fn a_forced_opening_leads_to_a_call_in_the_template_s_format() {
        let weather = ToolChoice::Function("get_weather".into());
        let cases = [
            (
                "Call tools as <tool_call>{…}</tool_call>",
                "{\"city\": \"Paris\"}}</tool_call>",
            ),
            (
                "[AVAILABLE_TOOLS] … [TOOL_CALLS]",
                "{\"city\": \"Paris\"}}]",
            ),
            (
                "[TOOL_CALLS]{{ name }}[ARGS]{{ args }}",
                "{\"city\": \"Paris\"}",
            ),
            (
                "Respond with {\"name\": …, \"parameters\": …}",
                "{\"city\": \"Paris\"}}",
            ),
        ];
        for (template, rest) in cases {
            let opening = forced_opening(template, &weather).unwrap();
            let (_, calls) = parse_tool_calls(&format!("{opening}{rest}"))
                .unwrap_or_else(|| panic!("{template}: {opening}{rest}"));
            assert_eq!(
                calls,
                vec![call("get_weather", r#"{"city":"Paris"}"#)],
                "{template}"
            );
            // A streamed reply is held from the opening on.
            let mut stream = ToolCallStream::new();
            assert_eq!(stream.push(&opening), "", "{template}");
            assert_eq!(stream.push(rest), "", "{template}");
            assert_eq!(stream.finish().1.len(), 1, "{template}");
        }
        // `required` leaves the name to the model; `auto` forces nothing.
        let opening = forced_opening("<tool_call>", &ToolChoice::Required).unwrap();
        let text = format!("{opening}now\", \"arguments\": {{}}}}");
        assert_eq!(parse_tool_calls(&text).unwrap().1, vec![call("now", "{}")]);
        assert_eq!(forced_opening("<tool_call>", &ToolChoice::Auto), None);
        // Names are JSON-escaped.
        let odd = ToolChoice::Function("a\"b".into());
        assert!(forced_opening("", &odd).unwrap().contains(r#""a\"b""#));
    }

    #[test]
    fn streaming_holds_back_from_the_marker_on() {
        let mut s = ToolCallStream::new();
        let mut shown = String::new();
        for chunk in [
            "Sure",
            ". <tool",
            "_call>{\"name\": \"f\", ",
            "\"arguments\": {\"q\": 1}}",
            "</tool_call>",
        ] {
            shown.push_str(&s.push(chunk));
        }
        assert_eq!(shown, "Sure. ");
        let (content, calls) = s.finish();
        assert_eq!(content, "");
        assert_eq!(calls, vec![call("f", r#"{"q":1}"#)]);
    }

    /// Joins what `deltas` handed out per call, checking that each call starts once and
    /// first.
    fn joined(deltas: &[ToolCallDelta], calls: &mut Vec<(String, String)>) {
        for delta in deltas {
            match delta {
                ToolCallDelta::Start { index, name } => {
                    assert_eq!(*index, calls.len(), "{deltas:?}");
                    calls.push((name.clone(), String::new()));
                }
                ToolCallDelta::Arguments { index, text } => calls[*index].1.push_str(text),
            }
        }
    }

    #[test]
    fn streamed_calls_hand_out_their_arguments_as_they_grow() {
        let text = "Sure. <tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \
                    \"Pa}ris\\\"\", \"days\": [1, {\"x\": 2}]}}\n</tool_call>\n<tool_call>\
                    {\"name\": \"now\", \"arguments\": {}}</tool_call>";
        let mut s = ToolCallStream::new();
        let (mut calls, mut growing) = (Vec::new(), 0);
        for piece in text.as_bytes().chunks(3) {
            s.push(std::str::from_utf8(piece).unwrap());
            let deltas = s.deltas();
            growing += deltas
                .iter()
                .filter(|d| matches!(d, ToolCallDelta::Arguments { .. }))
                .count();
            joined(&deltas, &mut calls);
        }
        // The first call's arguments came in many pieces, before the end.
        assert!(growing > 10, "{growing}");
        let (content, rest) = s.finish_deltas();
        joined(&rest, &mut calls);
        assert_eq!(content, "");
        let want = parse_tool_calls(text).unwrap().1;
        assert_eq!(calls.len(), want.len());
        for ((name, arguments), call) in calls.iter().zip(&want) {
            assert_eq!(name, &call.name);
            let a: Value = serde_json::from_str(arguments).unwrap();
            let b: Value = serde_json::from_str(&call.arguments).unwrap();
            assert_eq!(a, b);
        }

        // Llama 3 JSON streams too; Mistral's list comes whole at the end.
        for (text, streams) in [
            ("{\"name\": \"add\", \"parameters\": {\"a\": 1}}", true),
            (
                "[TOOL_CALLS][{\"name\": \"add\", \"arguments\": {\"a\": 1}}]",
                false,
            ),
        ] {
            let mut s = ToolCallStream::new();
            let mut calls = Vec::new();
            for piece in text.as_bytes().chunks(4) {
                s.push(std::str::from_utf8(piece).unwrap());
                joined(&s.deltas(), &mut calls);
            }
            assert_eq!(!calls.is_empty(), streams, "{text}");
            joined(&s.finish_deltas().1, &mut calls);
            assert_eq!(calls.len(), 1, "{text}");
            assert_eq!(calls[0].0, "add");
            let a: Value = serde_json::from_str(&calls[0].1).unwrap();
            assert_eq!(a, serde_json::json!({"a": 1}));
        }
    }

    #[test]
    fn streaming_plain_text_passes_and_a_false_start_is_content() {
        let mut s = ToolCallStream::new();
        assert_eq!(s.push("Hello <b>"), "Hello <b>");
        assert_eq!(s.push(" world <"), " world ");
        assert_eq!(s.push("3"), "<3");
        assert_eq!(s.finish(), (String::new(), vec![]));

        let mut s = ToolCallStream::new();
        assert_eq!(s.push(" {"), "");
        assert_eq!(s.push("not a call}"), "");
        assert_eq!(s.finish(), (" {not a call}".to_owned(), vec![]));
    }
}
