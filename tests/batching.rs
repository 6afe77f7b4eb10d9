//! Continuous batching at the model level: sequences of different lengths decoded together
//! (left-padded batch rows with their own RoPE positions and masks, see
//! `KvCache::merge_rows`) give the same logits and greedy tokens as each alone, when they
//! join and leave the batch at different steps. Models whose caches cannot batch this way
//! are said so (`serve::engine::can_batch`), and the server runs them in turns.

use mlx_models::cache::{KvCache, LayerCache};
use mlx_models::config::ConfigFile;
use mlx_models::models::LanguageModel;
use mlx_models::serve::engine::can_batch;
use mlx_models::tap::Tap;
use mlx_rs::{Array, Dtype};
use std::path::PathBuf;

fn load(name: &str) -> Box<dyn LanguageModel> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name);
    let config = ConfigFile::read(&dir.join("config.json")).expect("fixture config.json");
    mlx_models::load::load_model_with_config(&config, &dir, None)
        .unwrap_or_else(|e| panic!("cannot load {name}: {e}"))
}

/// Logits rows `[batch, vocab]` of the last position.
fn forward(model: &dyn LanguageModel, ids: &[Vec<i32>], cache: &mut [LayerCache]) -> Vec<Vec<f32>> {
    let len = ids[0].len();
    let flat: Vec<i32> = ids.iter().flatten().copied().collect();
    let input = Array::from_slice(&flat, &[ids.len() as i32, len as i32]);
    let out = model.forward(&input, cache, &mut Tap::off()).unwrap();
    let last = out
        .take_axis(Array::from_int(out.dim(1) - 1), 1)
        .unwrap()
        .as_dtype(Dtype::Float32)
        .unwrap();
    let vocab = last.dim(-1) as usize;
    last.as_slice::<f32>()
        .chunks(vocab)
        .map(<[f32]>::to_vec)
        .collect()
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0f32, f32::max)
}

fn argmax(row: &[f32]) -> i32 {
    row.iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1).then(b.0.cmp(&a.0)))
        .unwrap()
        .0 as i32
}

/// Greedy decoding of one prompt alone: each step's logits.
fn alone(model: &dyn LanguageModel, prompt: &[i32], steps: usize) -> Vec<Vec<f32>> {
    let mut cache = model.new_cache();
    let mut logits = forward(model, &[prompt.to_vec()], &mut cache).remove(0);
    let mut out = vec![logits.clone()];
    for _ in 1..steps {
        logits = forward(model, &[vec![argmax(&logits)]], &mut cache).remove(0);
        out.push(logits.clone());
    }
    out
}

fn merge(a: &[LayerCache], b: &[LayerCache]) -> Vec<LayerCache> {
    a.iter()
        .zip(b)
        .map(|(a, b)| match (a, b) {
            (LayerCache::Kv(a), LayerCache::Kv(b)) => KvCache::merge_rows(&[a, b]).unwrap().into(),
            (other, _) => other.clone(),
        })
        .collect()
}

fn select(cache: &[LayerCache], rows: &[usize]) -> Vec<LayerCache> {
    cache
        .iter()
        .map(|layer| match layer {
            LayerCache::Kv(kv) => kv.select_rows(rows).unwrap().into(),
            other => other.clone(),
        })
        .collect()
}

/// Runs `prompts` as a continuous batch: prompt `i` is prefilled alone and joins at step
/// `join[i]`; a sequence leaves after `steps` tokens. Returns each one's logits per step.
fn batched(
    model: &dyn LanguageModel,
    prompts: &[Vec<i32>],
    join: &[usize],
    steps: usize,
) -> Vec<Vec<Vec<f32>>> {
    let mut results: Vec<Vec<Vec<f32>>> = vec![Vec::new(); prompts.len()];
    // (sequence, next token) per batch row.
    let mut rows: Vec<(usize, i32)> = Vec::new();
    let mut batch: Option<Vec<LayerCache>> = None;
    let mut step = 0;
    while results.iter().any(|r| r.len() < steps) {
        for (i, prompt) in prompts.iter().enumerate() {
            if join[i] == step {
                let mut cache = model.new_cache();
                let logits = forward(model, std::slice::from_ref(prompt), &mut cache).remove(0);
                rows.push((i, argmax(&logits)));
                results[i].push(logits);
                batch = Some(match batch.take() {
                    None => cache,
                    Some(b) => merge(&b, &cache),
                });
            }
        }
        if let Some(cache) = batch.as_mut() {
            let ids: Vec<Vec<i32>> = rows.iter().map(|&(_, t)| vec![t]).collect();
            let logits = forward(model, &ids, cache);
            for (row, logits) in rows.iter_mut().zip(logits) {
                row.1 = argmax(&logits);
                results[row.0].push(logits);
            }
            let keep: Vec<usize> = (0..rows.len())
                .filter(|&r| results[rows[r].0].len() < steps)
                .collect();
            if keep.len() < rows.len() {
                batch = (!keep.is_empty()).then(|| select(cache, &keep));
                rows = keep.iter().map(|&r| rows[r]).collect();
            }
        }
        step += 1;
    }
    results
}

fn prompts(vocab: i32) -> Vec<Vec<i32>> {
    [7usize, 3, 12, 5]
        .iter()
        .enumerate()
        .map(|(p, &len)| {
            (0..len)
                .map(|i| ((i * 37 + p * 101 + 11) as i32) % vocab)
                .collect()
        })
        .collect()
}

#[test]
fn batched_rows_match_each_sequence_alone() {
    let fixtures = [
        "llama/default-tied",
        "llama/llama3-untied",
        "llama/yarn",
        "qwen2/default",
        "qwen3/default",
        "gemma/default",
        "olmo2/default",
        "granite/default",
        "mixtral/default",
        "qwen3_moe/default",
        // ALiBi: the bias follows each row's own key distances, padding included.
        "bloom/default",
        "mpt/default",
    ];
    let steps = 6;
    for name in fixtures {
        let model = load(name);
        assert!(can_batch(model.as_ref()), "{name} should batch");
        let vocab = model.info().vocab_size;
        let prompts = prompts(vocab);
        // Two start together, one joins after 2 steps, one after 4 (when the first ones
        // are leaving).
        let join = [0, 0, 2, 4];
        let together = batched(model.as_ref(), &prompts, &join, steps);
        let mut worst = 0.0f32;
        for (i, prompt) in prompts.iter().enumerate() {
            let single = alone(model.as_ref(), prompt, steps);
            for (step, (a, b)) in single.iter().zip(&together[i]).enumerate() {
                let diff = max_abs_diff(a, b);
                worst = worst.max(diff);
                assert!(
                    diff < 1e-4,
                    "{name}: sequence {i}, step {step}: |Δlogit| {diff}"
                );
                assert_eq!(argmax(a), argmax(b), "{name}: sequence {i}, step {step}");
            }
        }
        eprintln!("{name}: batched vs alone, max |Δlogit| {worst:.2e}");
    }
}

/// Prompts of different lengths prefilled as one left-padded batch, then decoded
/// together: each row's logits at every step are those of its prompt alone.
#[test]
fn prompts_prefilled_together_match_each_alone() {
    let fixtures = [
        "llama/default-tied",
        "llama/yarn",
        "qwen3/default",
        "gemma/default",
        "mixtral/default",
        "bloom/default",
    ];
    let steps = 4;
    for name in fixtures {
        let model = load(name);
        let prompts = prompts(model.info().vocab_size);
        let longest = prompts.iter().map(Vec::len).max().unwrap();
        let padding: Vec<i32> = prompts.iter().map(|p| (longest - p.len()) as i32).collect();
        let padded: Vec<Vec<i32>> = prompts
            .iter()
            .map(|p| {
                // The filler token is arbitrary: no real query sees it.
                let mut row = vec![3; longest - p.len()];
                row.extend(p);
                row
            })
            .collect();
        let mut cache = LayerCache::left_padded_batch(model.new_cache(), &padding).unwrap();
        let mut logits = forward(model.as_ref(), &padded, &mut cache);
        let mut together = vec![logits.clone()];
        for _ in 1..steps {
            let next: Vec<Vec<i32>> = logits.iter().map(|row| vec![argmax(row)]).collect();
            logits = forward(model.as_ref(), &next, &mut cache);
            together.push(logits.clone());
        }
        let mut worst = 0.0f32;
        for (i, prompt) in prompts.iter().enumerate() {
            let single = alone(model.as_ref(), prompt, steps);
            for (step, a) in single.iter().enumerate() {
                let b = &together[step][i];
                let diff = max_abs_diff(a, b);
                worst = worst.max(diff);
                assert!(
                    diff < 1e-4,
                    "{name}: prompt {i}, step {step}: |Δlogit| {diff}"
                );
                assert_eq!(argmax(a), argmax(b), "{name}: prompt {i}, step {step}");
            }
        }
        eprintln!("{name}: prefilled together vs alone, max |Δlogit| {worst:.2e}");
    }
    // Only fresh unbounded caches can.
    let model = load("llama/default-tied");
    let mut used = model.new_cache();
    forward(model.as_ref(), &[vec![1, 2]], &mut used);
    assert!(LayerCache::left_padded_batch(used, &[0]).is_err());
    assert!(LayerCache::left_padded_batch(model.new_cache(), &[-1]).is_err());
}

#[test]
fn models_whose_caches_cannot_batch_are_told_apart() {
    for name in [
        "gemma2/sliding",
        "qwen2/sliding",
        "mamba2/default",
        "deepseek_v3/default",
        "llama4_text/default",
        "llama4_text/chunked-nope",
        "llama/dynamic",
        "phi3/longrope",
        // Learned absolute positions: one position per step for the whole batch.
        "gpt2/default",
        "gpt_bigcode/default",
    ] {
        assert!(!can_batch(load(name).as_ref()), "{name} must not batch");
    }
}

#[test]
fn a_padded_batch_cannot_be_cut_back_and_rows_come_out_whole() {
    let kv = |tokens: i32, value: f32| {
        let mut cache = KvCache::new();
        let x = Array::from_slice(&vec![value; (tokens * 2) as usize], &[1, 1, tokens, 2]);
        cache.attend(x.clone(), x).unwrap();
        cache
    };
    let (a, b) = (kv(2, 1.0), kv(5, 2.0));
    let batch = KvCache::merge_rows(&[&a, &b]).unwrap();
    assert_eq!(batch.offset(), 5);
    assert_eq!(batch.row_offsets(), Some(vec![2, 5]));
    // Row 0 out on its own: its two tokens, no padding.
    let row = batch.row(0).unwrap();
    assert_eq!((row.offset(), row.len(), row.row_offsets()), (2, 2, None));
    let keys = row.arrays().next().unwrap().as_slice::<f32>().to_vec();
    assert_eq!(keys, vec![1.0; 4]);
    assert!(batch.select_rows(&[2]).is_err());
    let mut cut = batch.clone();
    assert!(!cut.truncate(3).unwrap());
    assert_eq!(cut.offset(), 0);
    // Sliding-window caches do not batch.
    assert!(KvCache::merge_rows(&[&a, &KvCache::rotating(4)]).is_err());
}
