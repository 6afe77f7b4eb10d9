//! Multi-head latent attention (MLA), as DeepSeek-V2/V3, Kimi K2 and GLM-4.7-Flash use it.
//!
//! Queries come from a low-rank projection (`q_a_proj` → `q_a_layernorm` → `q_b_proj`) or a
//! plain `q_proj`; each head's query is a part without position (`qk_nope_head_dim`) and a
//! RoPE part (`qk_rope_head_dim`). Keys and values come from one compressed latent per
//! token: `kv_a_proj_with_mqa` gives the latent (`kv_lora_rank`, then `kv_a_layernorm`) and
//! one RoPE key shared by all heads; `kv_b_proj` expands the latent into every head's
//! position-free key and its value (`v_head_dim`, which may differ from the key's width).
//!
//! The point is the cache: per token it needs only the latent and the RoPE key,
//! `kv_lora_rank + qk_rope_head_dim` numbers per layer ([`LatentCache`]). Decoding one token
//! never expands the cache: `kv_b_proj`'s key half is absorbed into the query
//! (`q_nope · W_uk c = (W_ukᵀ q_nope) · c`) and its value half applied after attention
//! (`Σ p c` then `W_uv`), so attention runs over the latents themselves. Prefill expands
//! the latents into full keys and values, as Transformers does. A model can also keep
//! expanded keys and values in a plain [`KvCache`] ([`MlaCache::Expanded`]), to compare.

use crate::attention::{attention_with_sinks, AttentionMask};
use crate::cache::{KvCache, LatentCache, LayerCache};
use crate::error::Result;
use crate::nn::{computed, scale, Linear};
use crate::norm::{Norm, NormKind};
use crate::rope::Rope;
use crate::tap::Tap;
use crate::weights::WeightPath;
use mlx_rs::{ops, Array};

/// What an MLA layer keeps per token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MlaCache {
    /// The compressed latent and the RoPE key ([`LatentCache`]); decoding absorbs
    /// `kv_b_proj`.
    #[default]
    Latent,
    /// Every head's expanded key and value ([`KvCache`]).
    Expanded,
}

/// The shape of an MLA layer.
#[derive(Debug, Clone, PartialEq)]
pub struct MlaSettings {
    pub num_heads: i32,
    /// Rank of the low-rank query projection; `None`: a plain `q_proj`.
    pub q_lora_rank: Option<i32>,
    pub kv_lora_rank: i32,
    pub qk_nope_head_dim: i32,
    pub qk_rope_head_dim: i32,
    pub v_head_dim: i32,
    /// Multiplies `q kᵀ` (`(nope + rope)^-0.5`, times YaRN's `mscale²` where it applies).
    pub scale: f32,
    /// Bias on `q_a_proj`, `kv_a_proj_with_mqa` and `o_proj` (`attention_bias`).
    pub bias: bool,
    /// Epsilon of `q_a_layernorm` / `kv_a_layernorm`.
    pub lora_norm_eps: f64,
    /// Multiplies the queries (LongCat-Flash's `(hidden / q_lora_rank)^0.5`).
    pub query_scale: Option<f32>,
    /// Multiplies the normalized latent before it is cached (LongCat-Flash's
    /// `(hidden / kv_lora_rank)^0.5`).
    pub latent_scale: Option<f32>,
    pub cache: MlaCache,
}

impl MlaSettings {
    /// Features per head of queries and keys.
    pub fn qk_head_dim(&self) -> i32 {
        self.qk_nope_head_dim + self.qk_rope_head_dim
    }

    /// Numbers one token adds to a [`MlaCache::Latent`] cache.
    pub fn latent_width(&self) -> i32 {
        self.kv_lora_rank + self.qk_rope_head_dim
    }

    /// The empty cache of a layer.
    pub fn new_cache(&self) -> LayerCache {
        match self.cache {
            MlaCache::Latent => LayerCache::Latent(LatentCache::new()),
            MlaCache::Expanded => LayerCache::Kv(KvCache::new()),
        }
    }
}

/// The query projection.
#[derive(Debug, Clone)]
pub enum MlaQuery {
    Plain {
        q_proj: Linear,
    },
    LowRank {
        q_a_proj: Linear,
        q_a_layernorm: Norm,
        q_b_proj: Linear,
    },
}

/// A loaded MLA layer (`self_attn.*` of DeepSeek checkpoints).
#[derive(Debug, Clone)]
pub struct LatentAttention {
    pub query: MlaQuery,
    pub kv_a_proj_with_mqa: Linear,
    pub kv_a_layernorm: Norm,
    pub kv_b_proj: Linear,
    pub o_proj: Linear,
    /// `kv_b_proj`'s key half per head, `[heads, qk_nope_head_dim, kv_lora_rank]`.
    w_uk: Array,
    /// `kv_b_proj`'s value half per head, transposed: `[heads, kv_lora_rank, v_head_dim]`.
    w_uv_t: Array,
    pub rope: Rope,
    pub settings: MlaSettings,
}

impl LatentAttention {
    pub fn load(w: &WeightPath, hidden: i32, s: &MlaSettings, rope: Rope) -> Result<Self> {
        let (h, dq) = (s.num_heads, s.qk_head_dim());
        let norm =
            |name: &str, dim: i32| Norm::load(&w.pp(name), NormKind::Rms, dim, s.lora_norm_eps);
        let query = match s.q_lora_rank {
            None => MlaQuery::Plain {
                q_proj: Linear::load(&w.pp("q_proj"), hidden, h * dq, false)?,
            },
            Some(rank) => MlaQuery::LowRank {
                q_a_proj: Linear::load(&w.pp("q_a_proj"), hidden, rank, s.bias)?,
                q_a_layernorm: norm("q_a_layernorm", rank)?,
                q_b_proj: Linear::load(&w.pp("q_b_proj"), rank, h * dq, false)?,
            },
        };
        let kv_b_proj = Linear::load(
            &w.pp("kv_b_proj"),
            s.kv_lora_rank,
            h * (s.qk_nope_head_dim + s.v_head_dim),
            false,
        )?;
        // The absorbed halves, dense (dequantized once where the checkpoint is quantized).
        let dense = kv_b_proj.weight.dequantized()?;
        let per_head = dense.reshape(&[h, s.qk_nope_head_dim + s.v_head_dim, s.kv_lora_rank])?;
        let parts = per_head.split_at_indices(&[s.qk_nope_head_dim], 1)?;
        let w_uk = computed(parts[0].clone())?;
        let w_uv_t = computed(parts[1].swap_axes(1, 2)?)?;
        Ok(LatentAttention {
            query,
            kv_a_proj_with_mqa: Linear::load(
                &w.pp("kv_a_proj_with_mqa"),
                hidden,
                s.latent_width(),
                s.bias,
            )?,
            kv_a_layernorm: norm("kv_a_layernorm", s.kv_lora_rank)?,
            kv_b_proj,
            o_proj: Linear::load(&w.pp("o_proj"), h * s.v_head_dim, hidden, s.bias)?,
            w_uk,
            w_uv_t,
            rope,
            settings: s.clone(),
        })
    }

    /// Attention of `x` (`[batch, tokens, hidden]`) over what `cache` holds and `x` itself.
    pub fn forward(&self, x: &Array, cache: &mut LayerCache, tap: &mut Tap) -> Result<Array> {
        let s = &self.settings;
        let (batch, len) = (x.dim(0), x.dim(1));
        let q = match &self.query {
            MlaQuery::Plain { q_proj } => q_proj.forward(x)?,
            MlaQuery::LowRank {
                q_a_proj,
                q_a_layernorm,
                q_b_proj,
            } => q_b_proj.forward(&q_a_layernorm.forward(&q_a_proj.forward(x)?)?)?,
        };
        let q = q
            .reshape(&[batch, len, s.num_heads, s.qk_head_dim()])?
            .swap_axes(1, 2)?;
        let q = scale(&q, s.query_scale)?;
        let q_parts = q.split_at_indices(&[s.qk_nope_head_dim], -1)?;
        let (q_nope, q_pe) = (&q_parts[0], &q_parts[1]);

        let compressed = self.kv_a_proj_with_mqa.forward(x)?;
        let kv_parts = compressed.split_at_indices(&[s.kv_lora_rank], -1)?;
        let latent = scale(&self.kv_a_layernorm.forward(&kv_parts[0])?, s.latent_scale)?;
        let latent = latent.reshape(&[batch, 1, len, s.kv_lora_rank])?;
        let k_pe = kv_parts[1].reshape(&[batch, 1, len, s.qk_rope_head_dim])?;

        let offset = cache.offset();
        let q_pe = self.rope.apply(q_pe, offset)?;
        let k_pe = self.rope.apply(&k_pe, offset)?;
        tap.record("self_attn.rope_q", &q_pe);
        tap.record("self_attn.rope_k", &k_pe);

        let out = match cache {
            LayerCache::Latent(latent_cache) => {
                let entry = ops::concatenate(&[&latent, &k_pe], -1)?;
                let (all, mask) = latent_cache.attend(entry)?;
                if len == 1 {
                    self.absorbed(q_nope, &q_pe, &all, &mask)?
                } else {
                    let parts = all.split_at_indices(&[s.kv_lora_rank], -1)?;
                    let (k, v) = self.expand(&parts[0], &parts[1])?;
                    let q = ops::concatenate(&[q_nope, &q_pe], -1)?;
                    attention_with_sinks(&q, &k, &v, s.scale, &mask, None)?
                }
            }
            LayerCache::Kv(kv) => {
                let (k, v) = self.expand(&latent, &k_pe)?;
                let (k, v, mask) = kv.attend(k, v)?;
                let q = ops::concatenate(&[q_nope, &q_pe], -1)?;
                attention_with_sinks(&q, &k, &v, s.scale, &mask, None)?
            }
            other => {
                // Fails with the error naming both kinds.
                other.latent_mut()?;
                unreachable!("latent_mut accepts only latent caches")
            }
        };
        tap.record("self_attn.sdpa", &out);
        let out = out.swap_axes(1, 2)?.reshape(&[batch, len, -1])?;
        let out = self.o_proj.forward(&out)?;
        tap.record("self_attn.o_proj", &out);
        Ok(out)
    }

    /// Every head's key (`[nope | rope]`) and value from latents `[batch, 1, tokens, rank]`
    /// and RoPE keys `[batch, 1, tokens, rope]`.
    fn expand(&self, latent: &Array, k_pe: &Array) -> Result<(Array, Array)> {
        let s = &self.settings;
        let (batch, tokens) = (latent.dim(0), latent.dim(2));
        let kv = self
            .kv_b_proj
            .forward(latent)?
            .reshape(&[
                batch,
                tokens,
                s.num_heads,
                s.qk_nope_head_dim + s.v_head_dim,
            ])?
            .swap_axes(1, 2)?;
        let parts = kv.split_at_indices(&[s.qk_nope_head_dim], -1)?;
        let k_pe = ops::broadcast_to(k_pe, &[batch, s.num_heads, tokens, s.qk_rope_head_dim])?;
        let k = ops::concatenate(&[&parts[0], &k_pe], -1)?;
        Ok((k, parts[1].clone()))
    }

    /// Attention over the cached latents themselves: `kv_b_proj`'s key half folded into the
    /// queries, its value half applied to the attended latents.
    fn absorbed(
        &self,
        q_nope: &Array,
        q_pe: &Array,
        all: &Array,
        mask: &AttentionMask,
    ) -> Result<Array> {
        let s = &self.settings;
        let (batch, len) = (q_nope.dim(0), q_nope.dim(2));
        // [b, h, l, nope] @ [h, nope, rank] → [b, h, l, rank].
        let q_latent = ops::matmul(q_nope, &self.w_uk.as_dtype(q_nope.dtype())?)?;
        let q = ops::concatenate(&[&q_latent, q_pe], -1)?;
        let values = all.split_at_indices(&[s.kv_lora_rank], -1)?[0].clone();
        // All heads share the one latent "head": fold them into the query rows, so the
        // latents are read once rather than repeated per head. Each head's queries stay
        // in order, so a causal mask still lines up with one head's rows at a time.
        let out = if len == 1 {
            let q = q.reshape(&[batch, 1, s.num_heads, -1])?;
            attention_with_sinks(&q, all, &values, s.scale, &AttentionMask::None, None)?
                .reshape(&[batch, s.num_heads, 1, s.kv_lora_rank])?
        } else {
            attention_with_sinks(&q, all, &values, s.scale, mask, None)?
        };
        // [b, h, l, rank] @ [h, rank, v] → [b, h, l, v].
        Ok(ops::matmul(&out, &self.w_uv_t.as_dtype(out.dtype())?)?)
    }

    /// The quantization of the projections, if any.
    pub fn quantization(&self) -> Option<crate::nn::Quantization> {
        self.kv_a_proj_with_mqa.weight.quantization()
    }
}

/// Rebuilds `kv_b_proj` where a checkpoint stores it split the way mlx-lm's MLA does
/// (mlx-community conversions): `self_attn.embed_q` (`[heads, kv_lora_rank,
/// qk_nope_head_dim]`, the key half transposed per head) and `self_attn.unembed_out`
/// (`[heads, v_head_dim, kv_lora_rank]`), each possibly MLX-quantized along its last axis.
/// The rebuilt `kv_b_proj.weight` is dense (both halves are dequantized).
pub fn merge_split_kv_b(weights: &mut crate::weights::Weights, s: &MlaSettings) -> Result<()> {
    let prefixes: Vec<String> = weights
        .names()
        .filter_map(|n| n.strip_suffix(".embed_q.weight"))
        .map(str::to_owned)
        .collect();
    let source = weights.source().to_path_buf();
    for prefix in prefixes {
        let mut take = |name: &str, in_dim: i32| -> Result<Array> {
            let full = format!("{prefix}.{name}");
            let missing = |part: &str| crate::error::Error::MissingWeight {
                path: source.clone(),
                name: format!("{full}.{part}"),
            };
            let weight = weights
                .remove(&format!("{full}.weight"))
                .ok_or_else(|| missing("weight"))?;
            match weights.remove(&format!("{full}.scales")) {
                None => Ok(weight),
                Some(scales) => {
                    let biases = weights
                        .remove(&format!("{full}.biases"))
                        .ok_or_else(|| missing("biases"))?;
                    let bits = weight.dim(-1) * 32 / in_dim;
                    let group = in_dim / scales.dim(-1).max(1);
                    Ok(ops::dequantize(&weight, &scales, &biases, group, bits)?)
                }
            }
        };
        let wk = take("embed_q", s.qk_nope_head_dim)?;
        let wv = take("unembed_out", s.kv_lora_rank)?;
        let expected_k = [s.num_heads, s.kv_lora_rank, s.qk_nope_head_dim];
        let expected_v = [s.num_heads, s.v_head_dim, s.kv_lora_rank];
        for (name, t, expected) in [
            ("embed_q", &wk, expected_k),
            ("unembed_out", &wv, expected_v),
        ] {
            if t.shape() != expected {
                return Err(crate::error::Error::WeightShape {
                    path: weights.source().to_path_buf(),
                    name: format!("{prefix}.{name}.weight"),
                    expected: expected.to_vec(),
                    actual: t.shape().to_vec(),
                });
            }
        }
        let kv_b = ops::concatenate(&[&wk.swap_axes(1, 2)?, &wv], 1)?.reshape(&[
            s.num_heads * (s.qk_nope_head_dim + s.v_head_dim),
            s.kv_lora_rank,
        ])?;
        weights.insert(format!("{prefix}.kv_b_proj.weight"), kv_b);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rope::{RopeConfig, RopeScaling};
    use crate::weights::Weights;
    use proptest::prelude::*;
    use std::collections::HashMap;

    const HIDDEN: i32 = 32;

    fn settings(cache: MlaCache, q_lora_rank: Option<i32>) -> MlaSettings {
        MlaSettings {
            num_heads: 3,
            q_lora_rank,
            kv_lora_rank: 12,
            qk_nope_head_dim: 8,
            qk_rope_head_dim: 4,
            v_head_dim: 6,
            scale: 12f32.powf(-0.5),
            bias: false,
            lora_norm_eps: 1e-6,
            query_scale: None,
            latent_scale: None,
            cache,
        }
    }

    /// A layer with seeded random weights.
    fn layer(s: &MlaSettings, seed: u64) -> LatentAttention {
        let mut k = 0;
        let mut random = |shape: &[i32]| {
            k += 1;
            let key = mlx_rs::random::key(seed * 100 + k).unwrap();
            mlx_rs::random::normal::<f32>(shape, None, Some(0.3), &key).unwrap()
        };
        let (h, dq) = (s.num_heads, s.qk_head_dim());
        let mut t = HashMap::new();
        match s.q_lora_rank {
            Some(r) => {
                t.insert("q_a_proj.weight".to_owned(), random(&[r, HIDDEN]));
                t.insert(
                    "q_a_layernorm.weight".to_owned(),
                    random(&[r]).add(Array::from_f32(1.0)).unwrap(),
                );
                t.insert("q_b_proj.weight".to_owned(), random(&[h * dq, r]));
            }
            None => {
                t.insert("q_proj.weight".to_owned(), random(&[h * dq, HIDDEN]));
            }
        }
        t.insert(
            "kv_a_proj_with_mqa.weight".to_owned(),
            random(&[s.latent_width(), HIDDEN]),
        );
        t.insert(
            "kv_a_layernorm.weight".to_owned(),
            random(&[s.kv_lora_rank]).add(Array::from_f32(1.0)).unwrap(),
        );
        t.insert(
            "kv_b_proj.weight".to_owned(),
            random(&[h * (s.qk_nope_head_dim + s.v_head_dim), s.kv_lora_rank]),
        );
        t.insert(
            "o_proj.weight".to_owned(),
            random(&[HIDDEN, h * s.v_head_dim]),
        );
        let weights = Weights::new(t, "test");
        let rope = Rope::new(RopeConfig {
            theta: 10_000.0,
            dims: s.qk_rope_head_dim,
            traditional: true,
            scaling: RopeScaling::Default,
        })
        .unwrap();
        let layer = LatentAttention::load(&weights.root(), HIDDEN, s, rope).unwrap();
        weights.check_all_used().unwrap();
        layer
    }

    fn input(tokens: i32, seed: u64) -> Array {
        let key = mlx_rs::random::key(seed).unwrap();
        mlx_rs::random::normal::<f32>(&[1, tokens, HIDDEN], None, None, &key).unwrap()
    }

    use crate::test_util::max_abs;

    fn run(layer: &LatentAttention, x: &Array, splits: &[i32]) -> Array {
        let mut cache = layer.settings.new_cache();
        let mut pieces = Vec::new();
        let mut start = 0;
        for &end in splits.iter().chain(std::iter::once(&x.dim(1))) {
            if end > start {
                let chunk = x.index((.., start..end));
                pieces.push(layer.forward(&chunk, &mut cache, &mut Tap::off()).unwrap());
                start = end;
            }
        }
        ops::concatenate(&pieces, 1).unwrap()
    }

    use mlx_rs::ops::indexing::IndexOp;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]

        /// Prefill up to a random point, then random chunks and single tokens (absorbed
        /// decoding): the same outputs as one pass, for the latent and the expanded cache,
        /// with and without query LoRA.
        #[test]
        fn incremental_decoding_equals_one_pass(
            len in 2..=20i32,
            cuts in proptest::collection::vec(1..20i32, 0..6),
            lora in any::<bool>(),
            seed in 0..1000u64,
        ) {
            let q_lora = lora.then_some(10);
            let x = input(len, seed);
            let mut splits: Vec<i32> = cuts.into_iter().filter(|&c| c < len).collect();
            splits.sort();
            splits.dedup();
            for cache in [MlaCache::Latent, MlaCache::Expanded] {
                let layer = layer(&settings(cache, q_lora), seed);
                let full = run(&layer, &x, &[]);
                let stepped = run(&layer, &x, &splits);
                let d = max_abs(&full, &stepped);
                prop_assert!(d < 1e-5, "{cache:?}, splits {splits:?}: max |Δ| = {d:e}");
                // Single tokens after the first: every step absorbed.
                let single: Vec<i32> = (1..len).collect();
                let d = max_abs(&full, &run(&layer, &x, &single));
                prop_assert!(d < 1e-5, "{cache:?}, token by token: max |Δ| = {d:e}");
            }
        }
    }

    #[test]
    fn the_latent_cache_holds_rank_plus_rope_numbers_per_token() {
        let s = settings(MlaCache::Latent, Some(10));
        let layer = layer(&s, 3);
        let mut cache = s.new_cache();
        let tokens = 37;
        layer
            .forward(&input(tokens, 4), &mut cache, &mut Tap::off())
            .unwrap();
        layer
            .forward(&input(1, 5), &mut cache, &mut Tap::off())
            .unwrap();
        let bytes: usize = cache.state().unwrap().iter().map(|(_, a)| a.nbytes()).sum();
        let per_token = (s.kv_lora_rank + s.qk_rope_head_dim) as usize * 4;
        assert_eq!(bytes, (tokens as usize + 1) * per_token);
        // An expanded cache holds every head's key and value instead.
        let e = settings(MlaCache::Expanded, Some(10));
        let mut expanded = e.new_cache();
        layer
            .forward(&input(tokens, 4), &mut expanded, &mut Tap::off())
            .unwrap();
        let bytes: usize = expanded
            .state()
            .unwrap()
            .iter()
            .map(|(_, a)| a.nbytes())
            .sum();
        let per_token = (e.num_heads * (e.qk_head_dim() + e.v_head_dim)) as usize * 4;
        assert_eq!(bytes, tokens as usize * per_token);
    }

    /// mlx-lm's split and quantized `embed_q` / `unembed_out` rebuild the very `kv_b_proj`
    /// their dequantized values make.
    #[test]
    fn split_quantized_kv_b_is_merged_back() {
        let s = MlaSettings {
            num_heads: 2,
            kv_lora_rank: 64,
            qk_nope_head_dim: 32,
            v_head_dim: 32,
            ..settings(MlaCache::Latent, None)
        };
        let key = mlx_rs::random::key(9).unwrap();
        let kv_b = mlx_rs::random::normal::<f32>(&[2 * 64, 64], None, None, &key).unwrap();
        let per_head = kv_b.reshape(&[2, 64, 64]).unwrap();
        let parts = per_head.split_at_indices(&[32], 1).unwrap();
        let wk = parts[0].swap_axes(1, 2).unwrap(); // [h, rank, nope]
        let wv = parts[1].clone(); // [h, v, rank]
        let mut t = HashMap::new();
        let mut expected = Vec::new();
        for (name, w) in [("embed_q", &wk), ("unembed_out", &wv)] {
            let (q, scales, biases) = ops::quantize(w, 32, 4).unwrap();
            expected.push(ops::dequantize(&q, &scales, &biases, 32, 4).unwrap());
            t.insert(format!("l.self_attn.{name}.weight"), q);
            t.insert(format!("l.self_attn.{name}.scales"), scales);
            t.insert(format!("l.self_attn.{name}.biases"), biases);
        }
        let mut weights = Weights::new(t, "test");
        merge_split_kv_b(&mut weights, &s).unwrap();
        let names: Vec<&str> = weights.names().collect();
        assert_eq!(names, ["l.self_attn.kv_b_proj.weight"]);
        let merged = weights.remove("l.self_attn.kv_b_proj.weight").unwrap();
        let want = ops::concatenate(&[&expected[0].swap_axes(1, 2).unwrap(), &expected[1]], 1)
            .unwrap()
            .reshape(&[2 * 64, 64])
            .unwrap();
        assert_eq!(max_abs(&merged, &want), 0.0);
        // And quantization was real: the merged matrix is not the original.
        assert!(max_abs(&merged, &kv_b) > 1e-3);
    }
}
