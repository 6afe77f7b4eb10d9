//! Fuzzing the loaders with a fixed seed and a small budget: structured mutations of small
//! real files must give a model or a typed error — never a panic, never a crash.
//!
//! * GGUF: `tests/fixtures/gguf-tiny/tiny.gguf` (a complete one-layer llama written by
//!   gguf-py, `xtask/python/export_tiny_gguf.py`): structural fields overwritten (counts,
//!   string and array lengths, value types, dimensions, tensor types and offsets, listed
//!   in `tiny.fields.json`), header bytes flipped, truncation, tensor data overwritten.
//!   Whatever loads also generates two tokens.
//! * safetensors: `tests/fixtures/llama/default-tied/model.safetensors`: header bytes
//!   flipped, the header length overwritten, truncation, tensor data overwritten.
//! * tokenizer.json (the tiny GGUF's tokenizer, saved) and config.json
//!   (`llama/default-tied`): JSON values replaced by values of other types, members
//!   deleted, bytes flipped.
//!
//! `cargo-fuzz` targets for longer runs are in `fuzz/`.

use mlx_models::generate::GenerateOptions;
use mlx_models::gguf::GgufFile;
use mlx_models::load::{load_gguf_file, load_model_dir, LoadOptions};
use mlx_models::weights::read_safetensors;
use mlx_models::{Error, SamplerBuilder, Tokenizer};
use proptest::prelude::*;
use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Instant;

fn fixture(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(path)
}

/// A runner with a fixed seed, no persistence and no shrinking beyond a few steps.
fn runner(cases: u32, seed: u8) -> TestRunner {
    TestRunner::new_with_rng(
        Config {
            cases,
            failure_persistence: None,
            max_shrink_iters: 16,
            ..Config::default()
        },
        TestRng::from_seed(RngAlgorithm::ChaCha, &[seed; 32]),
    )
}

/// Counts outcomes by error variant (the text before the first `{` or `(` of its Debug).
#[derive(Default)]
struct Outcomes(Mutex<BTreeMap<String, usize>>);

impl Outcomes {
    fn record<T>(&self, result: &Result<T, Error>) {
        let key = match result {
            Ok(_) => "Ok".to_owned(),
            Err(e) => {
                if std::env::var_os("FUZZ_VERBOSE").is_some() {
                    eprintln!("{e}");
                }
                let debug = format!("{e:?}");
                debug
                    .split([' ', '{', '('])
                    .next()
                    .unwrap_or_default()
                    .to_owned()
            }
        };
        *self.0.lock().unwrap().entry(key).or_default() += 1;
    }

    fn report(&self, what: &str, started: Instant) {
        let map = self.0.lock().unwrap();
        let total: usize = map.values().sum();
        eprintln!(
            "{what}: {total} cases in {:.1} s: {map:?}",
            started.elapsed().as_secs_f64()
        );
    }
}

/// A mutation of a binary file.
#[derive(Debug, Clone)]
enum Mutation {
    /// Overwrite the structural field `index` (of the listed ones) with `value`.
    Field { index: usize, value: u64 },
    /// XOR the byte at `at` (within the header) with `mask`.
    Flip { at: usize, mask: u8 },
    /// Cut the file to `len` bytes.
    Truncate { len: usize },
    /// Overwrite bytes of the data section.
    Data { at: usize, bytes: Vec<u8> },
}

fn interesting_u64() -> impl Strategy<Value = u64> {
    prop_oneof![
        Just(0u64),
        Just(1),
        Just(2),
        Just(3),
        Just(4),
        Just(5),
        Just(7),
        Just(8),
        Just(9),
        Just(12),
        Just(13),
        Just(31),
        Just(64),
        Just(255),
        Just(u64::from(u32::MAX)),
        Just(i32::MAX as u64),
        Just(1 << 40),
        Just(u64::MAX),
        Just(u64::MAX / 2),
        any::<u64>(),
        0u64..100_000,
    ]
}

fn mutations(fields: usize, header: usize, len: usize) -> impl Strategy<Value = Vec<Mutation>> {
    let one = prop_oneof![
        4 => (0..fields.max(1), interesting_u64()).prop_map(|(index, value)| Mutation::Field { index, value }),
        3 => (0..header, 1u8..=255).prop_map(|(at, mask)| Mutation::Flip { at, mask }),
        1 => (0..len).prop_map(|len| Mutation::Truncate { len }),
        1 => (header..len, proptest::collection::vec(any::<u8>(), 1..8))
            .prop_map(|(at, bytes)| Mutation::Data { at, bytes }),
    ];
    proptest::collection::vec(one, 1..4)
}

/// `(offset, width)` of the structural fields.
type Fields = Vec<(usize, usize)>;

fn apply(bytes: &[u8], fields: &Fields, mutations: &[Mutation]) -> Vec<u8> {
    let mut out = bytes.to_vec();
    for m in mutations {
        match m {
            Mutation::Field { index, value } => {
                if let Some(&(offset, width)) = fields.get(*index) {
                    let le = value.to_le_bytes();
                    if offset + width <= out.len() {
                        out[offset..offset + width].copy_from_slice(&le[..width]);
                    }
                }
            }
            Mutation::Flip { at, mask } => {
                if let Some(b) = out.get_mut(*at) {
                    *b ^= mask;
                }
            }
            Mutation::Truncate { len } => out.truncate(*len),
            Mutation::Data { at, bytes } => {
                for (i, b) in bytes.iter().enumerate() {
                    if let Some(x) = out.get_mut(at + i) {
                        *x = *b;
                    }
                }
            }
        }
    }
    out
}

/// Loads a GGUF from memory and, if it loads, generates two tokens.
fn load_and_generate(bytes: Vec<u8>) -> Result<String, Error> {
    let file = GgufFile::from_bytes("fuzzed.gguf", bytes)?;
    let model = load_gguf_file(&file, &LoadOptions::new())?;
    let prompt = model.tokenizer().encode("the thing", false)?;
    let prompt = if prompt.is_empty() { vec![0] } else { prompt };
    let options = GenerateOptions::new()
        .max_tokens(2)
        .sampler(SamplerBuilder::default().temperature(0.0));
    let mut text = String::new();
    for token in model.generate(&prompt, options)? {
        text.push_str(&token?.text);
    }
    Ok(text)
}

#[test]
fn the_tiny_gguf_loads_and_generates() {
    let bytes = std::fs::read(fixture("gguf-tiny/tiny.gguf")).unwrap();
    load_and_generate(bytes).unwrap();
}

#[test]
fn fuzzed_gguf_files_give_typed_errors() {
    let bytes = std::fs::read(fixture("gguf-tiny/tiny.gguf")).unwrap();
    let meta: Value = serde_json::from_str(
        &std::fs::read_to_string(fixture("gguf-tiny/tiny.fields.json")).unwrap(),
    )
    .unwrap();
    let header = meta["data_offset"].as_u64().unwrap() as usize;
    let fields: Fields = meta["fields"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            (
                f["offset"].as_u64().unwrap() as usize,
                f["width"].as_u64().unwrap() as usize,
            )
        })
        .collect();
    let outcomes = Outcomes::default();
    let started = Instant::now();
    let result = runner(6000, 18).run(&mutations(fields.len(), header, bytes.len()), |mutations| {
        let fuzzed = apply(&bytes, &fields, &mutations);
        let result = load_and_generate(fuzzed);
        outcomes.record(&result);
        Ok(())
    });
    outcomes.report("GGUF", started);
    if let Err(e) = result {
        panic!("{e}");
    }
}

#[test]
fn fuzzed_safetensors_give_typed_errors() {
    let source = fixture("llama/default-tied");
    let bytes = std::fs::read(source.join("model.safetensors")).unwrap();
    let header = 8 + u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(source.join("config.json"), dir.path().join("config.json")).unwrap();
    let file = dir.path().join("model.safetensors");
    let fields: Fields = vec![(0, 8)];
    let outcomes = Outcomes::default();
    let started = Instant::now();
    let result = runner(2000, 19).run(&mutations(1, header, bytes.len()), |mutations| {
        std::fs::write(&file, apply(&bytes, &fields, &mutations)).unwrap();
        let result = read_safetensors(&file).and_then(|_| load_model_dir(dir.path(), None));
        outcomes.record(&result);
        Ok(())
    });
    outcomes.report("safetensors", started);
    if let Err(e) = result {
        panic!("{e}");
    }
}

/// Every JSON pointer in `value`.
fn pointers(value: &Value, at: String, out: &mut Vec<String>) {
    match value {
        Value::Object(map) => {
            for (k, v) in map {
                let p = format!("{at}/{}", k.replace('~', "~0").replace('/', "~1"));
                out.push(p.clone());
                pointers(v, p, out);
            }
        }
        Value::Array(items) => {
            for (i, v) in items.iter().enumerate() {
                let p = format!("{at}/{i}");
                out.push(p.clone());
                pointers(v, p, out);
            }
        }
        _ => {}
    }
}

fn replacement() -> impl Strategy<Value = Option<Value>> {
    prop_oneof![
        Just(None),
        Just(Some(Value::Null)),
        Just(Some(Value::Bool(true))),
        Just(Some(serde_json::json!(-1))),
        Just(Some(serde_json::json!(0))),
        Just(Some(serde_json::json!(1))),
        Just(Some(serde_json::json!(1e308))),
        Just(Some(serde_json::json!(u64::MAX))),
        Just(Some(serde_json::json!(i64::MIN))),
        Just(Some(serde_json::json!(0.5))),
        Just(Some(serde_json::json!(""))),
        Just(Some(serde_json::json!("x"))),
        Just(Some(serde_json::json!([]))),
        Just(Some(serde_json::json!({}))),
        any::<i32>().prop_map(|i| Some(serde_json::json!(i))),
    ]
}

/// Replaces (or deletes, for `None`) the values at `edits`' pointers.
fn edit_json(original: &Value, all: &[String], edits: &[(usize, Option<Value>)]) -> Value {
    let mut value = original.clone();
    for (index, new) in edits {
        let Some(pointer) = all.get(*index % all.len().max(1)) else {
            continue;
        };
        match new {
            Some(new) => {
                if let Some(slot) = value.pointer_mut(pointer) {
                    *slot = new.clone();
                }
            }
            None => {
                if let Some((parent, key)) = pointer.rsplit_once('/') {
                    match value.pointer_mut(parent) {
                        Some(Value::Object(map)) => {
                            map.remove(&key.replace("~1", "/").replace("~0", "~"));
                        }
                        Some(Value::Array(items)) => {
                            if let Ok(i) = key.parse::<usize>() {
                                if i < items.len() {
                                    items.remove(i);
                                }
                            }
                        }
                        _ => {}
                    }
                }
            }
        }
    }
    value
}

/// Values replaced (`Some`) or deleted (`None`) at pointer indices, then bytes flipped.
type JsonMutation = (Vec<(usize, Option<Value>)>, Vec<(usize, u8)>);

/// JSON edits (by value) or, one time in four, byte flips of the serialized text.
fn json_mutations(pointers: usize, len: usize) -> impl Strategy<Value = JsonMutation> {
    let edits = proptest::collection::vec((0..pointers.max(1), replacement()), 1..4);
    let flips = prop_oneof![
        3 => Just(Vec::new()),
        1 => proptest::collection::vec((0..len, 1u8..=255), 1..4),
    ];
    (edits, flips)
}

fn fuzz_json(
    name: &str,
    original: &Value,
    cases: u32,
    seed: u8,
    check: impl Fn(&[u8]) -> Result<(), Error>,
) {
    let mut all = Vec::new();
    pointers(original, String::new(), &mut all);
    let text = serde_json::to_vec_pretty(original).unwrap();
    let outcomes = Outcomes::default();
    let started = Instant::now();
    let result =
        runner(cases, seed).run(&json_mutations(all.len(), text.len()), |(edits, flips)| {
            let mut bytes = serde_json::to_vec_pretty(&edit_json(original, &all, &edits)).unwrap();
            for (at, mask) in flips {
                if let Some(b) = bytes.get_mut(at) {
                    *b ^= mask;
                }
            }
            let result = check(&bytes);
            outcomes.record(&result);
            Ok(())
        });
    outcomes.report(name, started);
    if let Err(e) = result {
        panic!("{e}");
    }
}

#[test]
fn fuzzed_tokenizer_json_gives_typed_errors() {
    let bytes = std::fs::read(fixture("gguf-tiny/tiny.gguf")).unwrap();
    let model = load_gguf_file(
        &GgufFile::from_bytes("tiny.gguf", bytes).unwrap(),
        &LoadOptions::new(),
    )
    .unwrap();
    let json: Value =
        serde_json::from_str(&model.tokenizer().backend().to_string(false).unwrap()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tokenizer.json");
    fuzz_json("tokenizer.json", &json, 2000, 20, |bytes| {
        std::fs::write(&path, bytes).unwrap();
        let tokenizer = Tokenizer::from_file(&path)?;
        let ids = tokenizer.encode("the thing, ab!", true)?;
        tokenizer.decode(&ids, false)?;
        Ok(())
    });
}

#[test]
fn fuzzed_config_json_gives_typed_errors() {
    let source = fixture("llama/default-tied");
    let json: Value =
        serde_json::from_str(&std::fs::read_to_string(source.join("config.json")).unwrap())
            .unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        source.join("model.safetensors"),
        dir.path().join("model.safetensors"),
    )
    .unwrap();
    fuzz_json("config.json", &json, 1000, 21, |bytes| {
        std::fs::write(dir.path().join("config.json"), bytes).unwrap();
        let model = load_model_dir(dir.path(), None)?;
        mlx_models::generate::greedy(model.as_ref(), &[1, 2, 3], 2)?;
        Ok(())
    });
}

/// The real SmolLM2 GGUF's header region (its 49152 tokens, 48900 merges and chat
/// template; the tensor data cut off), mutated: the reader answers with the parsed header
/// or a typed error.
#[test]
fn fuzzed_real_gguf_headers_give_typed_errors() {
    use std::io::Read;
    let path = mlx_models::default_model::path(|| ()).unwrap();
    let file = GgufFile::open(&path).unwrap();
    let header = file.data_start as usize;
    let mut bytes = vec![0u8; header];
    std::fs::File::open(&path)
        .unwrap()
        .read_exact(&mut bytes)
        .unwrap();
    // Unmutated, the header parses and the first tensor lies past the cut.
    assert!(matches!(
        GgufFile::from_bytes("cut.gguf", bytes.clone()),
        Err(Error::GgufTensor { .. })
    ));
    let outcomes = Outcomes::default();
    let started = Instant::now();
    let strategy = proptest::collection::vec(
        prop_oneof![
            (0..header, interesting_u64())
                .prop_map(|(at, value)| (at, value.to_le_bytes().to_vec())),
            (0..header, 1u8..=255).prop_map(|(at, b)| (at, vec![b])),
        ],
        1..4,
    );
    let result = runner(400, 22).run(&strategy, |edits| {
        let mut fuzzed = bytes.clone();
        for (at, value) in edits {
            for (i, b) in value.iter().enumerate() {
                if let Some(x) = fuzzed.get_mut(at + i) {
                    *x = *b;
                }
            }
        }
        let result = GgufFile::from_bytes("cut.gguf", fuzzed);
        outcomes.record(&result);
        Ok(())
    });
    outcomes.report("SmolLM2 GGUF header", started);
    if let Err(e) = result {
        panic!("{e}");
    }
}
