//! config.json: read once, then parsed by the module its `model_type` selects.

use crate::error::{Error, Result};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::Value;
use std::path::{Path, PathBuf};

/// A model's config.json, kept as JSON until a model module parses its own fields.
#[derive(Debug, Clone)]
pub struct ConfigFile {
    pub path: PathBuf,
    pub value: Value,
}

/// Two JSON numbers of one value (`8` and `8.0`).
fn numbers_equal(a: &Value, b: &Value) -> bool {
    matches!((a.as_f64(), b.as_f64()), (Some(x), Some(y)) if x == y)
}

/// Fields that families' configs name in several ways, each group one field (module
/// `Config`s read them through serde aliases).
pub const FIELD_ALIASES: &[&[&str]] = &[
    &["num_experts", "num_local_experts", "n_routed_experts"],
    &["num_experts_per_tok", "moe_topk"],
    &["intermediate_size", "block_ff_dim"],
    &["tie_word_embeddings", "tie_embedding"],
];

/// Python's `json` writes `Infinity`, `-Infinity` and `NaN` (Mamba's `time_step_limit`),
/// which JSON has no literal for; outside strings they become `{"__float__": "Infinity"}`
/// (and so on), the form Transformers 5 writes itself and [`f64_or_non_finite`] reads.
fn python_non_finite_literals(text: &str) -> std::borrow::Cow<'_, str> {
    if !(text.contains("Infinity") || text.contains("NaN")) {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len());
    let (mut in_string, mut escaped) = (false, false);
    let mut rest = text;
    while let Some(c) = rest.chars().next() {
        if in_string {
            out.push(c);
            match (escaped, c) {
                (true, _) => escaped = false,
                (false, '\\') => escaped = true,
                (false, '"') => in_string = false,
                _ => {}
            }
            rest = &rest[c.len_utf8()..];
            continue;
        }
        let literal = ["-Infinity", "Infinity", "NaN"]
            .into_iter()
            .find(|l| rest.starts_with(l));
        match (c, literal) {
            ('"', _) => {
                in_string = true;
                out.push(c);
                rest = &rest[1..];
            }
            (_, Some(l)) => {
                out.push_str(&format!("{{\"__float__\": \"{l}\"}}"));
                rest = &rest[l.len()..];
            }
            _ => {
                out.push(c);
                rest = &rest[c.len_utf8()..];
            }
        }
    }
    std::borrow::Cow::Owned(out)
}

/// A number that may be non-finite, written plainly or as `{"__float__": "Infinity"}`.
pub fn f64_or_non_finite<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> std::result::Result<f64, D::Error> {
    #[derive(serde::Deserialize)]
    #[serde(untagged)]
    enum Number {
        Plain(f64),
        Tagged {
            #[serde(rename = "__float__")]
            value: String,
        },
    }
    match Number::deserialize(d)? {
        Number::Plain(v) => Ok(v),
        Number::Tagged { value } => match value.as_str() {
            "Infinity" | "inf" => Ok(f64::INFINITY),
            "-Infinity" | "-inf" => Ok(f64::NEG_INFINITY),
            "NaN" | "nan" => Ok(f64::NAN),
            other => Err(serde::de::Error::custom(format!(
                "`{other}` is not a number"
            ))),
        },
    }
}

/// A pair of [`f64_or_non_finite`] numbers (Mamba's `time_step_limit`).
pub fn f64_pair_or_non_finite<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> std::result::Result<(f64, f64), D::Error> {
    #[derive(serde::Deserialize)]
    struct Wrapped(#[serde(deserialize_with = "f64_or_non_finite")] f64);
    let (a, b): (Wrapped, Wrapped) = serde::Deserialize::deserialize(d)?;
    Ok((a.0, b.0))
}

impl ConfigFile {
    /// Reads and parses `path`; malformed JSON is reported with its line and column.
    pub fn read(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        // Not UTF-8: serde_json reports where, as for any other malformed JSON.
        let parsed = match std::str::from_utf8(&bytes) {
            Ok(text) => serde_json::from_str(&python_non_finite_literals(text)),
            Err(_) => serde_json::from_slice(&bytes),
        };
        let value: Value = parsed.map_err(|e| Error::Json {
            path: path.to_path_buf(),
            source: e,
        })?;
        if !value.is_object() {
            return Err(Error::config(
                path,
                "",
                "config.json must hold a JSON object",
            ));
        }
        Ok(ConfigFile {
            path: path.to_path_buf(),
            value,
        })
    }

    /// The `model_type` field.
    pub fn model_type(&self) -> Result<&str> {
        match self.value.get("model_type") {
            Some(Value::String(t)) => Ok(t),
            Some(other) => Err(Error::config(
                &self.path,
                "model_type",
                format!("expected a string, found {other}"),
            )),
            None => Err(Error::config(&self.path, "model_type", "missing")),
        }
    }

    /// Deserializes the config into a module's `Config`, naming the offending field on error.
    pub fn parse<T: DeserializeOwned>(&self) -> Result<T> {
        serde_path_to_error::deserialize(&self.value).map_err(|e| {
            let mut field = e.path().to_string();
            let message = e.into_inner().to_string();
            if field == "." && !message.starts_with("missing field") {
                // Flattened structs (the shared decoder fields) hide the path: find the
                // top-level field without which this error goes away.
                if let Some(name) = self.culprit(&message) {
                    field = name;
                }
            }
            // serde reports a missing field at its parent; name the field itself.
            if let Some(name) = message
                .strip_prefix("missing field `")
                .and_then(|m| m.split('`').next())
            {
                field = if field == "." {
                    name.to_owned()
                } else {
                    format!("{field}.{name}")
                };
            }
            Error::config(&self.path, &field, message)
        })
    }

    /// The top-level field an error `message` is about, when serde could not say: the one
    /// holding the value an "invalid type"/"invalid value" message quotes.
    fn culprit(&self, message: &str) -> Option<String> {
        let object = self.value.as_object()?;
        let quoted = message
            .strip_prefix("invalid type: ")
            .or_else(|| message.strip_prefix("invalid value: "))?
            .split(", expected")
            .next()?;
        let render = |v: &Value| match v {
            Value::String(s) => format!("string {s:?}"),
            Value::Bool(b) => format!("boolean `{b}`"),
            Value::Number(n) if n.is_f64() => format!("floating point `{n}`"),
            Value::Number(n) => format!("integer `{n}`"),
            Value::Null => "null".to_owned(),
            Value::Array(_) => "sequence".to_owned(),
            Value::Object(_) => "map".to_owned(),
        };
        let mut found = object.iter().filter(|(_, v)| render(v) == quoted);
        let (first, _) = found.next()?;
        found.next().is_none().then(|| first.clone())
    }

    /// The MLP width as a multiple of `hidden_size` that `field` of config.json gives
    /// (GPT-NeoX-Japanese's `intermediate_multiple_size`), else `default`: what
    /// [`ConfigFile::with_aliases`] takes as `intermediate_per_hidden`. A value that is not
    /// a positive integer is an error naming the field.
    ///
    /// ```
    /// use mlx_models::config::ConfigFile;
    ///
    /// let config = ConfigFile {
    ///     path: "config.json".into(),
    ///     value: serde_json::json!({"hidden_size": 64, "intermediate_multiple_size": 2}),
    /// };
    /// let per = config.width_multiple(Some("intermediate_multiple_size"), Some(4)).unwrap();
    /// assert_eq!(per, Some(2));
    /// assert_eq!(config.with_aliases(&[], per).value["intermediate_size"], 128);
    /// let bad = ConfigFile { value: serde_json::json!({"intermediate_multiple_size": 0.5}), ..config };
    /// assert!(bad.width_multiple(Some("intermediate_multiple_size"), Some(4)).is_err());
    /// ```
    pub fn width_multiple(&self, field: Option<&str>, default: Option<i32>) -> Result<Option<i32>> {
        let Some(value) = field
            .and_then(|f| self.value.get(f))
            .filter(|v| !v.is_null())
        else {
            return Ok(default);
        };
        let field = field.unwrap_or_default();
        match value.as_i64().and_then(|v| i32::try_from(v).ok()) {
            Some(k) if k > 0 => Ok(Some(k)),
            _ => Err(Error::config(
                &self.path,
                field,
                format!("{value} is not a positive integer (the MLP width in hidden_size units)"),
            )),
        }
    }

    /// The config with a family's own names read as the common ones: each `(common, own)`
    /// of `aliases` (Transformers' `attribute_map`: GPT-2's `n_embd` for `hidden_size`)
    /// copies a non-null `own` value to `common` where config.json has no `common`. With
    /// `intermediate_per_hidden`, a missing or null `intermediate_size` (GPT-2's
    /// `n_inner: null`) is that many times `hidden_size`, as the family's model builds it.
    ///
    /// ```
    /// use mlx_models::config::ConfigFile;
    ///
    /// let config = ConfigFile {
    ///     path: "config.json".into(),
    ///     value: serde_json::json!({"n_embd": 64, "n_inner": null}),
    /// };
    /// let read = config.with_aliases(&[("hidden_size", "n_embd"), ("intermediate_size", "n_inner")], Some(4));
    /// assert_eq!(read.value["hidden_size"], 64);
    /// assert_eq!(read.value["intermediate_size"], 256);
    /// ```
    pub fn with_aliases(
        &self,
        aliases: &[(&str, &str)],
        intermediate_per_hidden: Option<i32>,
    ) -> ConfigFile {
        let mut read = self.clone();
        if let Some(target) = read.value.as_object_mut() {
            for (common, own) in aliases {
                let value = target.get(*own).filter(|v| !v.is_null()).cloned();
                if let (Some(value), false) = (value, target.contains_key(*common)) {
                    target.insert((*common).to_owned(), value);
                }
            }
            let width = target.get("intermediate_size").filter(|v| !v.is_null());
            let hidden = target.get("hidden_size").and_then(Value::as_i64);
            if let (None, Some(per), Some(hidden)) = (width, intermediate_per_hidden, hidden) {
                target.insert(
                    "intermediate_size".to_owned(),
                    Value::from(i64::from(per) * hidden),
                );
            }
        }
        read
    }

    /// This config with each `(common, own, divisor)` field `common` that config.json
    /// leaves out (or null) read as the integer `own / divisor`, rounded down as
    /// Transformers' `//` (the ModernBERT decoder's `sliding_window` is half its
    /// `local_attention`). A non-integer `own` is a [`crate::Error::Config`] naming it.
    ///
    /// ```
    /// use mlx_models::config::ConfigFile;
    ///
    /// let config = ConfigFile {
    ///     path: "config.json".into(),
    ///     value: serde_json::json!({"local_attention": 129}),
    /// };
    /// let read = config.with_divided_aliases(&[("sliding_window", "local_attention", 2)])?;
    /// assert_eq!(read.value["sliding_window"], 64);
    /// let bad = ConfigFile { path: "config.json".into(), value: serde_json::json!({"local_attention": "x"}) };
    /// assert!(bad.with_divided_aliases(&[("sliding_window", "local_attention", 2)]).is_err());
    /// # Ok::<(), mlx_models::Error>(())
    /// ```
    pub fn with_divided_aliases(&self, aliases: &[(&str, &str, i64)]) -> Result<ConfigFile> {
        let mut read = self.clone();
        let Some(target) = read.value.as_object_mut() else {
            return Ok(read);
        };
        for &(common, own, divisor) in aliases {
            if target.get(common).is_some_and(|v| !v.is_null()) {
                continue;
            }
            let Some(value) = target.get(own).filter(|v| !v.is_null()) else {
                continue;
            };
            let value = match (value.as_i64(), divisor > 0) {
                (Some(v), true) => v.div_euclid(divisor),
                _ => {
                    return Err(Error::config(
                        &self.path,
                        own,
                        format!("must be an integer (read as {common} = {own} / {divisor})"),
                    ))
                }
            };
            target.insert(common.to_owned(), Value::from(value));
        }
        Ok(read)
    }

    /// Like [`ConfigFile::parse`], with `defaults` (a JSON object: Transformers' defaults of
    /// the family) standing in for the fields config.json leaves out. A field set to null
    /// stays null, and a default is left out where config.json has the same field under
    /// another of its names ([`FIELD_ALIASES`]).
    pub fn parse_with_defaults<T: DeserializeOwned>(&self, defaults: &str) -> Result<T> {
        let defaults: Value = serde_json::from_str(defaults).map_err(|e| {
            Error::config(
                &self.path,
                "",
                format!("the module's defaults are not JSON: {e}"),
            )
        })?;
        let mut merged = self.clone();
        if let (Some(target), Value::Object(defaults)) = (merged.value.as_object_mut(), defaults) {
            for (key, value) in defaults {
                let aliased = FIELD_ALIASES
                    .iter()
                    .find(|names| names.contains(&key.as_str()))
                    .is_some_and(|names| names.iter().any(|n| target.contains_key(*n)));
                if !aliased {
                    target.entry(key).or_insert(value);
                }
            }
        }
        merged.parse()
    }

    /// The value of a field the model cannot do without, naming it when it is missing.
    pub fn require<T>(&self, field: &str, value: Option<T>) -> Result<T> {
        value.ok_or_else(|| Error::config(&self.path, field, "missing"))
    }

    /// Fails naming `field` unless `ok`.
    pub fn ensure(&self, ok: bool, field: &str, message: impl FnOnce() -> String) -> Result<()> {
        if ok {
            Ok(())
        } else {
            Err(Error::config(&self.path, field, message()))
        }
    }

    /// Fails naming `key` when config.json gives it a value other than `default` (absent
    /// or null is the default) while one of `lists` is absent or null: Transformers derives
    /// those per-layer lists from it (Cohere2-MoE's `first_k_dense_replace` makes the first
    /// layers dense, with layer types of their own), which the module does not. With every
    /// list given, Transformers ignores the key, as the module does.
    ///
    /// ```
    /// # use mlx_models::config::ConfigFile;
    /// let lists = ["layer_types", "mlp_layer_types"];
    /// let hub = |value| ConfigFile { path: "config.json".into(), value };
    /// let k = serde_json::json!({"first_k_dense_replace": 2});
    /// assert!(hub(k).ensure_lists_given("first_k_dense_replace", 0, &lists).is_err());
    /// let given = serde_json::json!({"first_k_dense_replace": 2, "layer_types": [], "mlp_layer_types": []});
    /// assert!(hub(given).ensure_lists_given("first_k_dense_replace", 0, &lists).is_ok());
    /// let zero = serde_json::json!({"first_k_dense_replace": 0});
    /// assert!(hub(zero).ensure_lists_given("first_k_dense_replace", 0, &lists).is_ok());
    /// ```
    pub fn ensure_lists_given(&self, key: &str, default: i64, lists: &[&str]) -> Result<()> {
        let given = |name: &str| self.value.get(name).is_some_and(|v| !v.is_null());
        let value = self.value.get(key).filter(|v| !v.is_null());
        let is_default = value.is_none_or(|v| v.as_i64() == Some(default));
        let missing: Vec<&str> = lists.iter().copied().filter(|l| !given(l)).collect();
        if is_default || missing.is_empty() {
            return Ok(());
        }
        Err(Error::config(
            &self.path,
            key,
            format!(
                "{} sets {} where they are absent, which this module does not derive: give them \
                 (or {key} {default})",
                value.map(Value::to_string).unwrap_or_default(),
                missing.join(", ")
            ),
        ))
    }

    /// Fails naming `field.key` when config.json gives that entry of the nested object
    /// `field` (MPT's `attn_config.clip_qkv`) a value other than `default` (JSON): a value
    /// the module does not compute. An absent entry is the default.
    pub fn ensure_nested(&self, field: &str, key: &str, default: &str) -> Result<()> {
        let name = format!("{field}.{key}");
        let default: Value = serde_json::from_str(default).map_err(|e| {
            Error::config(
                &self.path,
                &name,
                format!("the module's default is not JSON: {e}"),
            )
        })?;
        match self.value.get(field).and_then(|f| f.get(key)) {
            Some(v) if *v != default && !numbers_equal(v, &default) => Err(Error::config(
                &self.path,
                &name,
                format!(
                    "only {default} is supported: Transformers computes something else with \
                     {v}, which this module does not implement"
                ),
            )),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(json: &str) -> ConfigFile {
        ConfigFile {
            path: PathBuf::from("config.json"),
            value: serde_json::from_str(json).expect("test JSON"),
        }
    }

    #[test]
    fn nested_entries_other_than_the_default_are_refused_by_name() {
        let c = config(r#"{"attn_config": {"clip_qkv": 6, "alibi_bias_max": 8.0}}"#);
        match c.ensure_nested("attn_config", "clip_qkv", "null") {
            Err(Error::Config { field, .. }) => assert_eq!(field, "attn_config.clip_qkv"),
            other => panic!("expected a config error, got {other:?}"),
        }
        c.ensure_nested("attn_config", "alibi_bias_max", "8")
            .unwrap();
        c.ensure_nested("attn_config", "softmax_scale", "null")
            .unwrap();
        config("{}")
            .ensure_nested("attn_config", "clip_qkv", "null")
            .unwrap();
        config(r#"{"attn_config": {"clip_qkv": null}}"#)
            .ensure_nested("attn_config", "clip_qkv", "null")
            .unwrap();
    }
}
