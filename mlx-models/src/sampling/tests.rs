use super::*;
use proptest::prelude::*;

fn assert_close(actual: &[f32], expected: &[f64]) {
    assert_eq!(actual.len(), expected.len(), "{actual:?} vs {expected:?}");
    for (a, e) in actual.iter().zip(expected) {
        assert!(
            (f64::from(*a) - e).abs() < 1e-6,
            "{actual:?} vs {expected:?}"
        );
    }
}

/// Logits whose softmax is exactly `probabilities`.
fn logits_of(probabilities: &[f64]) -> Vec<f32> {
    probabilities.iter().map(|p| p.ln() as f32).collect()
}

fn softmax(xs: &[f64]) -> Vec<f64> {
    let total: f64 = xs.iter().map(|x| x.exp()).sum();
    xs.iter().map(|x| x.exp() / total).collect()
}

#[test]
fn greedy_is_argmax_with_the_first_of_ties() {
    let mut sampler = Sampler::greedy();
    assert!(sampler.is_greedy());
    assert_eq!(sampler.sample(&[0.1, 3.0, -1.0, 2.9], &[]).unwrap(), 1);
    assert_eq!(sampler.sample(&[1.0, 5.0, 5.0, 2.0], &[]).unwrap(), 1);
    assert_close(
        &sampler.distribution(&[0.0, 0.0, 7.0], &[]).unwrap(),
        &[0.0, 0.0, 1.0],
    );
    let mut zero_temperature = Sampler::builder().temperature(0.0).build().unwrap();
    assert_eq!(
        zero_temperature.sample(&[-3.0, -1.0, -2.0], &[]).unwrap(),
        1
    );
}

#[test]
fn greedy_sees_the_penalties() {
    let mut sampler = Sampler::builder()
        .temperature(0.0)
        .repetition_penalty(2.0)
        .build()
        .unwrap();
    // 3.0 / 2 = 1.5 < 2.0: the repeated token loses.
    assert_eq!(sampler.sample(&[3.0, 2.0], &[0]).unwrap(), 1);
    assert_eq!(sampler.sample(&[3.0, 2.0], &[1]).unwrap(), 0);
}

#[test]
fn temperature_scales_the_logits() {
    let sampler = Sampler::builder().temperature(0.5).build().unwrap();
    let expected = softmax(&[2.0, 4.0, 6.0]);
    assert_close(
        &sampler.distribution(&[1.0, 2.0, 3.0], &[]).unwrap(),
        &expected,
    );
    let hot = Sampler::builder().temperature(2.0).build().unwrap();
    assert_close(
        &hot.distribution(&[1.0, 2.0, 3.0], &[]).unwrap(),
        &softmax(&[0.5, 1.0, 1.5]),
    );
}

#[test]
fn top_k_keeps_the_k_largest_renormalised() {
    let sampler = Sampler::builder().top_k(2).build().unwrap();
    let z = 2f64.exp() + 3f64.exp();
    assert_close(
        &sampler.distribution(&[1.0, 2.0, 3.0, 0.0], &[]).unwrap(),
        &[0.0, 2f64.exp() / z, 3f64.exp() / z, 0.0],
    );
    // Ties with the k-th largest stay, as in Transformers.
    let one = Sampler::builder().top_k(1).build().unwrap();
    assert_close(
        &one.distribution(&[1.0, 2.0, 2.0, 0.0], &[]).unwrap(),
        &[0.0, 0.5, 0.5, 0.0],
    );
    // k at least the vocabulary keeps everything.
    let all = Sampler::builder().top_k(10).build().unwrap();
    assert_close(&all.distribution(&[0.0, 0.0], &[]).unwrap(), &[0.5, 0.5]);
}

#[test]
fn top_p_keeps_the_smallest_set_reaching_p() {
    let logits = logits_of(&[0.1, 0.2, 0.3, 0.4]);
    let cases: [(f32, [f64; 4]); 4] = [
        (0.3, [0.0, 0.0, 0.0, 1.0]),             // 0.4 alone reaches 0.3
        (0.5, [0.0, 0.0, 3.0 / 7.0, 4.0 / 7.0]), // 0.4 < 0.5, 0.4 + 0.3 ≥ 0.5
        (0.75, [0.0, 2.0 / 9.0, 3.0 / 9.0, 4.0 / 9.0]),
        (0.95, [0.1, 0.2, 0.3, 0.4]),
    ];
    for (top_p, expected) in cases {
        let sampler = Sampler::builder().top_p(top_p).build().unwrap();
        assert_close(&sampler.distribution(&logits, &[]).unwrap(), &expected);
    }
}

#[test]
fn top_p_over_a_large_vocabulary_sorts_only_what_it_needs() {
    // 1000 tokens: ten likely ones (in reverse id order), then a flat tail. The nucleus of
    // 0.999 spans beyond the first 64 ranked tokens, so the search has to widen.
    let mut probabilities = vec![0.0f64; 1000];
    for (rank, id) in (0..10).rev().enumerate() {
        probabilities[id] = 0.05 + 0.001 * rank as f64;
    }
    let head: f64 = probabilities.iter().sum();
    for p in probabilities.iter_mut().skip(10) {
        *p = (1.0 - head) / 990.0;
    }
    let logits = logits_of(&probabilities);
    let sampler = Sampler::builder().top_p(0.5).build().unwrap();
    let distribution = sampler.distribution(&logits, &[]).unwrap();
    // The ten likely tokens hold 0.545: the top nine hold 0.495 < 0.5, so all ten are kept.
    let kept: Vec<usize> = (0..1000).filter(|&i| distribution[i] > 0.0).collect();
    assert_eq!(kept, (0..10).collect::<Vec<_>>());
    let wide = Sampler::builder().top_p(0.999).build().unwrap();
    let kept = wide
        .distribution(&logits, &[])
        .unwrap()
        .iter()
        .filter(|&&p| p > 0.0)
        .count();
    // Past the head, 0.999 - 0.545 of mass needs 988 of the 990 flat tokens.
    let tail = (1.0 - head) / 990.0;
    let expected = 10 + ((0.999 - head) / tail).ceil() as usize;
    assert!(
        (expected..=expected + 1).contains(&kept),
        "kept {kept}, expected about {expected}"
    );
}

#[test]
fn min_p_is_relative_to_the_most_likely_token() {
    let logits = logits_of(&[0.1, 0.2, 0.3, 0.4]);
    let sampler = Sampler::builder().min_p(0.6).build().unwrap(); // keeps p ≥ 0.24
    assert_close(
        &sampler.distribution(&logits, &[]).unwrap(),
        &[0.0, 0.0, 3.0 / 7.0, 4.0 / 7.0],
    );
    let loose = Sampler::builder().min_p(0.2).build().unwrap(); // keeps p ≥ 0.08
    assert_close(
        &loose.distribution(&logits, &[]).unwrap(),
        &[0.1, 0.2, 0.3, 0.4],
    );
}

#[test]
fn filters_compose_in_transformers_order() {
    // T = 2 → [0, .5, 1, 1.5, 2]; top-k 4 drops token 0; of the rest (≈ .10, .17, .28, .46)
    // top-p 0.6 keeps tokens 3 and 4; min-p 0.5 keeps both (0.38 ≥ 0.5 · 0.62).
    let sampler = Sampler::builder()
        .temperature(2.0)
        .top_k(4)
        .top_p(0.6)
        .min_p(0.5)
        .build()
        .unwrap();
    let z = 1.5f64.exp() + 2f64.exp();
    let expected = [0.0, 0.0, 0.0, 1.5f64.exp() / z, 2f64.exp() / z];
    assert_close(
        &sampler
            .distribution(&[0.0, 1.0, 2.0, 3.0, 4.0], &[])
            .unwrap(),
        &expected,
    );
    // A stricter min-p leaves only the best token.
    let strict = Sampler::builder()
        .temperature(2.0)
        .top_k(4)
        .top_p(0.6)
        .min_p(0.7)
        .build()
        .unwrap();
    assert_close(
        &strict
            .distribution(&[0.0, 1.0, 2.0, 3.0, 4.0], &[])
            .unwrap(),
        &[0.0, 0.0, 0.0, 0.0, 1.0],
    );
}

#[test]
fn repetition_penalty_divides_positive_and_multiplies_negative_logits_once() {
    let sampler = Sampler::builder().repetition_penalty(2.0).build().unwrap();
    let adjusted = sampler
        .adjusted_logits(&[2.0, -2.0, 1.0, 0.5], &[0, 1, 1])
        .unwrap();
    assert_eq!(adjusted, vec![1.0, -4.0, 1.0, 0.5]);
    let expected = softmax(&[1.0, -4.0, 1.0, 0.5]);
    assert_close(
        &sampler
            .distribution(&[2.0, -2.0, 1.0, 0.5], &[0, 1, 1])
            .unwrap(),
        &expected,
    );
}

#[test]
fn penalties_only_see_the_context_window() {
    let last_one = Sampler::builder()
        .repetition_penalty(2.0)
        .repetition_context_size(1)
        .build()
        .unwrap();
    assert_eq!(
        last_one
            .adjusted_logits(&[2.0, 2.0, 2.0], &[0, 1, 2])
            .unwrap(),
        vec![2.0, 2.0, 1.0]
    );
    let whole = Sampler::builder()
        .repetition_penalty(2.0)
        .repetition_context_size(0)
        .build()
        .unwrap();
    assert_eq!(
        whole.adjusted_logits(&[2.0, 2.0, 2.0], &[0, 1]).unwrap(),
        vec![1.0, 1.0, 2.0]
    );
    let default = Sampler::builder().repetition_penalty(2.0).build().unwrap();
    let mut history = vec![0u32];
    history.extend(std::iter::repeat_n(1u32, DEFAULT_REPETITION_CONTEXT_SIZE));
    assert_eq!(
        default.adjusted_logits(&[2.0, 2.0], &history).unwrap(),
        vec![2.0, 1.0]
    );
}

#[test]
fn presence_and_frequency_penalties_subtract() {
    let sampler = Sampler::builder()
        .presence_penalty(0.5)
        .frequency_penalty(0.25)
        .build()
        .unwrap();
    let adjusted = sampler
        .adjusted_logits(&[1.0, 1.0, 1.0, 1.0], &[2, 2, 3])
        .unwrap();
    assert_eq!(adjusted, vec![1.0, 1.0, 0.0, 0.25]);
}

#[test]
fn logit_bias_adds_and_can_ban() {
    let bias = HashMap::from([(1, 3.0), (3, f32::NEG_INFINITY)]);
    let sampler = Sampler::builder().logit_bias(bias).build().unwrap();
    assert_eq!(
        sampler.adjusted_logits(&[0.0, 0.0, 1.0, 9.0], &[]).unwrap(),
        vec![0.0, 3.0, 1.0, f32::NEG_INFINITY]
    );
    assert_close(
        &sampler.distribution(&[0.0, 0.0, 1.0, 9.0], &[]).unwrap(),
        &[
            softmax(&[0.0, 3.0, 1.0])[0],
            softmax(&[0.0, 3.0, 1.0])[1],
            softmax(&[0.0, 3.0, 1.0])[2],
            0.0,
        ],
    );
    let mut banned_greedy = Sampler::builder()
        .temperature(0.0)
        .logit_bias(HashMap::from([(3, f32::NEG_INFINITY)]))
        .build()
        .unwrap();
    assert_eq!(banned_greedy.sample(&[0.0, 0.0, 1.0, 9.0], &[]).unwrap(), 2);
}

#[test]
fn a_seed_reproduces_the_draws() {
    let logits = logits_of(&[0.1, 0.2, 0.3, 0.4]);
    let draw = |seed: u64| {
        let mut sampler = Sampler::builder().seed(seed).build().unwrap();
        (0..200)
            .map(|_| sampler.sample(&logits, &[]).unwrap())
            .collect::<Vec<_>>()
    };
    assert_eq!(draw(42), draw(42));
    assert_ne!(draw(42), draw(43));
    // Clones continue the same stream.
    let mut a = Sampler::builder().seed(7).build().unwrap();
    a.sample(&logits, &[]).unwrap();
    let mut b = a.clone();
    let next_a: Vec<u32> = (0..50).map(|_| a.sample(&logits, &[]).unwrap()).collect();
    let next_b: Vec<u32> = (0..50).map(|_| b.sample(&logits, &[]).unwrap()).collect();
    assert_eq!(next_a, next_b);
}

#[test]
fn draws_follow_the_distribution() {
    let probabilities = [0.1, 0.2, 0.3, 0.4];
    let logits = logits_of(&probabilities);
    let mut sampler = Sampler::builder().seed(1234).build().unwrap();
    let n = 40_000;
    let mut counts = [0usize; 4];
    for _ in 0..n {
        counts[sampler.sample(&logits, &[]).unwrap() as usize] += 1;
    }
    for (count, p) in counts.iter().zip(probabilities) {
        let frequency = *count as f64 / n as f64;
        assert!((frequency - p).abs() < 0.01, "{counts:?}");
    }
    // Filtered-out tokens are never drawn.
    let mut top2 = Sampler::builder().top_k(2).seed(5).build().unwrap();
    for _ in 0..1000 {
        assert!(top2.sample(&logits, &[]).unwrap() >= 2);
    }
}

#[test]
fn bad_input_is_an_error_not_a_panic() {
    let mut sampler = Sampler::builder().seed(0).build().unwrap();
    for (logits, history) in [
        (vec![], vec![]),
        (vec![1.0, f32::NAN], vec![]),
        (vec![f32::NEG_INFINITY, f32::NEG_INFINITY], vec![]),
        (vec![1.0, 2.0], vec![5]),
    ] {
        let err = sampler.sample(&logits, &history).unwrap_err();
        assert!(matches!(err, Error::Sampling { .. }), "{err:?}");
    }
    let biased = Sampler::builder()
        .logit_bias(HashMap::from([(9, 1.0)]))
        .build()
        .unwrap();
    assert!(matches!(
        biased.distribution(&[0.0, 1.0], &[]),
        Err(Error::Sampling { .. })
    ));
}

#[test]
fn invalid_parameters_are_rejected_by_build() {
    let builders = [
        Sampler::builder().temperature(-0.1),
        Sampler::builder().temperature(f32::NAN),
        Sampler::builder().top_p(0.0),
        Sampler::builder().top_p(1.5),
        Sampler::builder().min_p(-0.1),
        Sampler::builder().min_p(2.0),
        Sampler::builder().repetition_penalty(0.0),
        Sampler::builder().presence_penalty(f32::INFINITY),
        Sampler::builder().frequency_penalty(f32::NAN),
        Sampler::builder().logit_bias(HashMap::from([(0, f32::NAN)])),
    ];
    for builder in builders {
        let description = format!("{builder:?}");
        assert!(
            matches!(builder.build(), Err(Error::Sampling { .. })),
            "{description}"
        );
    }
}

#[test]
fn generation_config_reads_hugging_face_files() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("generation_config.json");
    std::fs::write(
        &path,
        r#"{"_from_model_config": true, "do_sample": true, "temperature": 0.6, "top_p": 0.9,
            "eos_token_id": [128001, 128008, 128009], "bos_token_id": 128000, "transformers_version": "4.45"}"#,
    )
    .unwrap();
    let config = GenerationConfig::from_file(&path).unwrap();
    assert_eq!(config.eos_token_ids(), vec![128001, 128008, 128009]);
    assert_eq!(config.bos_token_id, Some(128000));
    let builder = SamplerBuilder::from_generation_config(&config);
    let expected = Sampler::builder()
        .temperature(0.6)
        .top_p(0.9)
        .top_k(50)
        .repetition_context_size(0);
    assert_eq!(builder, expected);

    std::fs::write(&path, r#"{"eos_token_id": 2, "repetition_penalty": 1.3}"#).unwrap();
    let config = GenerationConfig::from_file(&path).unwrap();
    assert_eq!(config.eos_token_ids(), vec![2]);
    let sampler = SamplerBuilder::from_generation_config(&config)
        .build()
        .unwrap();
    assert!(sampler.is_greedy(), "do_sample defaults to false");
    assert_eq!(
        sampler.adjusted_logits(&[1.3, 1.3], &[0]).unwrap(),
        vec![1.0, 1.3]
    );

    std::fs::write(&path, r#"{"eos_token_id": "two"}"#).unwrap();
    match GenerationConfig::from_file(&path) {
        Err(Error::Json { path: p, .. }) => assert_eq!(p, path),
        other => panic!("expected a JSON error naming the file, got {other:?}"),
    }
}

proptest! {
    #[test]
    fn distributions_are_normalised_and_keep_the_best_token(
        logits in prop::collection::vec(-30.0f32..30.0, 1..40),
        temperature in 0.05f32..3.0,
        top_k in 0usize..10,
        top_p in 0.05f32..=1.0,
        min_p in 0.0f32..=1.0,
        history in prop::collection::vec(0u32..40, 0..30),
        penalty in 0.5f32..2.0,
    ) {
        let history: Vec<u32> = history.into_iter().filter(|&t| (t as usize) < logits.len()).collect();
        let mut sampler = Sampler::builder()
            .temperature(temperature).top_k(top_k).top_p(top_p).min_p(min_p)
            .repetition_penalty(penalty).seed(3).build().unwrap();
        let adjusted = sampler.adjusted_logits(&logits, &history).unwrap();
        let best = adjusted.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let distribution = sampler.distribution(&logits, &history).unwrap();
        let total: f64 = distribution.iter().map(|&p| f64::from(p)).sum();
        prop_assert!((total - 1.0).abs() < 1e-4, "sum {}", total);
        prop_assert!(distribution.iter().all(|&p| (0.0..=1.0).contains(&p)));
        prop_assert!(
            distribution.iter().zip(&adjusted).any(|(p, x)| *x == best && *p > 0.0),
            "every most likely token was filtered out"
        );
        let token = sampler.sample(&logits, &history).unwrap();
        prop_assert!(distribution[token as usize] > 0.0);
    }
}

proptest! {
    #[test]
    fn nucleus_equals_a_full_sort(
        weights in prop::collection::vec(prop_oneof![Just(1.0f64), 0.0f64..10.0], 1..400),
        top_p in 0.01f64..=1.0,
    ) {
        let total: f64 = weights.iter().sum();
        prop_assume!(total > 0.0);
        let candidates: Vec<(u32, f64)> = weights.iter().enumerate().map(|(i, w)| (i as u32, w / total)).collect();
        let mut reference = candidates.clone();
        reference.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        let mut mass = 0.0;
        let count = reference.iter().position(|&(_, q)| { mass += q; mass >= top_p }).map_or(reference.len(), |i| i + 1);
        reference.truncate(count);
        reference.sort_by_key(|&(token, _)| token);
        prop_assert_eq!(nucleus(candidates, top_p), reference);
    }
}
