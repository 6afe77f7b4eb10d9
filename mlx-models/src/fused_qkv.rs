//! Projections as older checkpoints store them, brought to what the blocks load: a linear
//! layer's `[out, in]` weight, and one fused `qkv_proj` whose output rows are all the
//! queries, then all the keys, then all the values ([`QkvLayout::Fused`]).
//!
//! - GPT-2 stores every projection as a `Conv1D`, whose weight is `[in, out]`: the
//!   transpose of a linear layer's ([`conv1d_to_linear`]).
//! - GPT-NeoX, and GPT-BigCode with a key/value head per query head, interleave the fused
//!   projection per head: head 0's query, key and value rows, then head 1's, and so on
//!   ([`per_head_to_blocks`]).
//!
//! Both are steps of a family's `sanitize`, on the checkpoint's tensors before loading.
//!
//! [`QkvLayout::Fused`]: crate::attention::QkvLayout::Fused

use crate::error::{Error, Result};
use crate::transformer::DecoderSettings;
use crate::weights::Weights;

/// Transposes the `Conv1D` weight `{prefix}.weight` (`[in, out]`) into a linear layer's
/// `[out, in]`. A quantized projection (`{prefix}.scales` beside it) was written by MLX and
/// is linear already; it is left as it is.
pub fn conv1d_to_linear(weights: &mut Weights, prefix: &str) -> Result<()> {
    let name = format!("{prefix}.weight");
    if weights.contains(&format!("{prefix}.scales")) {
        return Ok(());
    }
    let Some(weight) = weights.remove(&name) else {
        return Ok(()); // missing: loading names it
    };
    if weight.ndim() != 2 {
        return Err(Error::WeightShape {
            path: weights.source().to_path_buf(),
            name,
            expected: vec![-1, -1],
            actual: weight.shape().to_vec(),
        });
    }
    weights.insert(name, weight.t());
    Ok(())
}

/// Reorders the rows of the fused projection under `prefix` (its `weight`, `bias`, and a
/// quantized one's `scales` and `biases`) from per-head `[q, k, v]` groups of `head_dim`
/// rows each into the query rows of every head, then the keys, then the values.
pub fn per_head_to_blocks(
    weights: &mut Weights,
    prefix: &str,
    heads: i32,
    head_dim: i32,
) -> Result<()> {
    // One group per head, each holding its query, key and value rows in that order.
    grouped_to_blocks(
        weights,
        prefix,
        heads,
        [Part::Query, Part::Key, Part::Value],
        heads,
        head_dim,
    )
}

/// One of the three parts of a fused q/k/v projection's output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    Query,
    Key,
    Value,
}

/// Reorders the rows of the fused projection under `prefix` (its `weight`, `bias`, and a
/// quantized one's `scales` and `biases`) from `groups` groups, each holding its
/// `heads / groups` heads' rows of the three parts in `order`, into the query rows of
/// every head, then the keys, then the values. One group in order q, k, v is that layout
/// already; one group per head is GPT-NeoX's ([`per_head_to_blocks`]); CodeGen's are 4
/// groups of query, value, key. Each part has `heads * head_dim` rows.
///
/// ```
/// use mlx_models::fused_qkv::{grouped_to_blocks, Part};
/// use mlx_models::weights::Weights;
/// use mlx_rs::Array;
/// use std::collections::HashMap;
///
/// // 2 groups of 1 head of 1 feature, parts q, v, k: rows q0 v0 k0 q1 v1 k1.
/// let bias = Array::from_slice(&[0.0f32, 4., 2., 1., 5., 3.], &[6]);
/// let mut w = Weights::new(HashMap::from([("qkv.bias".to_owned(), bias)]), "model");
/// grouped_to_blocks(&mut w, "qkv", 2, [Part::Query, Part::Value, Part::Key], 2, 1)?;
/// assert_eq!(w.remove("qkv.bias").unwrap().as_slice::<f32>(), &[0.0, 1., 2., 3., 4., 5.]);
/// # Ok::<(), mlx_models::Error>(())
/// ```
pub fn grouped_to_blocks(
    weights: &mut Weights,
    prefix: &str,
    groups: i32,
    order: [Part; 3],
    heads: i32,
    head_dim: i32,
) -> Result<()> {
    let rows = 3 * heads * head_dim;
    for part in ["weight", "bias", "scales", "biases"] {
        let name = format!("{prefix}.{part}");
        let Some(tensor) = weights.remove(&name) else {
            continue;
        };
        let shape = tensor.shape().to_vec();
        if shape.is_empty()
            || shape[0] != rows
            || shape.len() > 2
            || groups <= 0
            || heads % groups != 0
        {
            let mut expected = shape.clone();
            if expected.is_empty() {
                expected.push(rows);
            }
            expected[0] = rows;
            return Err(Error::WeightShape {
                path: weights.source().to_path_buf(),
                name,
                expected,
                actual: shape,
            });
        }
        let rest = &shape[1..];
        // [groups, part, row of the group's share] → [part, groups, row].
        let share = heads / groups * head_dim;
        let grouped: Vec<i32> = [groups, 3, share].iter().chain(rest).copied().collect();
        let axes: Vec<i32> = [1, 0].into_iter().chain(2..grouped.len() as i32).collect();
        let by_part = tensor.reshape(&grouped)?.transpose_axes(&axes)?;
        let stored = |p: Part| order.iter().position(|&o| o == p);
        let (Some(q), Some(k), Some(v)) =
            (stored(Part::Query), stored(Part::Key), stored(Part::Value))
        else {
            return Err(Error::config(
                weights.source(),
                prefix,
                format!("the fused parts {order:?} are not query, key and value once each"),
            ));
        };
        let parts = by_part.split_equal(3, 0)?;
        let reordered =
            mlx_rs::ops::concatenate(&[&parts[q], &parts[k], &parts[v]], 0)?.reshape(&shape)?;
        weights.insert(name, reordered);
    }
    Ok(())
}

/// [`grouped_to_blocks`] on every layer's `self_attn.qkv_proj`, with the model's heads:
/// `groups` of them (`None`: one group per head, GPT-NeoX's and BLOOM's layout).
pub fn layers_grouped_to_blocks(
    weights: &mut Weights,
    settings: &DecoderSettings,
    groups: Option<i32>,
    order: [Part; 3],
) -> Result<()> {
    let a = &settings.attention;
    for i in 0..settings.layers.len() {
        let qkv = format!("model.layers.{i}.self_attn.qkv_proj");
        let groups = groups.unwrap_or(a.num_heads);
        grouped_to_blocks(weights, &qkv, groups, order, a.num_heads, a.head_dim)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use mlx_rs::Array;
    use std::collections::HashMap;

    fn one(name: &str, tensor: Array) -> Weights {
        Weights::new(HashMap::from([(name.to_owned(), tensor)]), "test")
    }

    #[test]
    fn per_head_rows_become_q_k_v_blocks() {
        // 2 heads of 1 feature: rows h0q h0k h0v h1q h1k h1v = 0..6.
        let mut w = one(
            "qkv.bias",
            Array::from_slice(&[0.0f32, 1., 2., 3., 4., 5.], &[6]),
        );
        per_head_to_blocks(&mut w, "qkv", 2, 1).unwrap();
        let b = w.remove("qkv.bias").unwrap();
        assert_eq!(b.as_slice::<f32>(), &[0.0, 3., 1., 4., 2., 5.]);
    }

    #[test]
    fn per_head_keeps_each_rows_features() {
        // 1 head of 2 features, 1 input: rows q0 q1 k0 k1 v0 v1 keep their order.
        let data = [10.0f32, 11., 20., 21., 30., 31.];
        let mut w = one("qkv.weight", Array::from_slice(&data, &[6, 1]));
        per_head_to_blocks(&mut w, "qkv", 1, 2).unwrap();
        assert_eq!(w.remove("qkv.weight").unwrap().as_slice::<f32>(), &data);
    }

    #[test]
    fn grouped_rows_become_q_k_v_blocks_in_any_order() {
        // 2 groups of 2 heads of 1 feature, parts k, q, v (rows 0..12): group 0 holds
        // k0 k1 q0 q1 v0 v1, group 1 k2 k3 q2 q3 v2 v3.
        let stored = [4.0f32, 5., 0., 1., 8., 9., 6., 7., 2., 3., 10., 11.];
        let mut w = one("qkv.weight", Array::from_slice(&stored, &[12, 1]));
        grouped_to_blocks(
            &mut w,
            "qkv",
            2,
            [Part::Key, Part::Query, Part::Value],
            4,
            1,
        )
        .unwrap();
        let expected: Vec<f32> = (0..12).map(|i| i as f32).collect();
        assert_eq!(
            w.remove("qkv.weight").unwrap().as_slice::<f32>(),
            &expected[..]
        );
        // One group per head, q, k, v: the per-head layout.
        let per_head = [0.0f32, 2., 4., 1., 3., 5.];
        let mut a = one("qkv.bias", Array::from_slice(&per_head, &[6]));
        let mut b = one("qkv.bias", Array::from_slice(&per_head, &[6]));
        grouped_to_blocks(
            &mut a,
            "qkv",
            2,
            [Part::Query, Part::Key, Part::Value],
            2,
            1,
        )
        .unwrap();
        per_head_to_blocks(&mut b, "qkv", 2, 1).unwrap();
        assert_eq!(
            a.remove("qkv.bias").unwrap().as_slice::<f32>(),
            b.remove("qkv.bias").unwrap().as_slice::<f32>()
        );
    }

    #[test]
    fn groups_that_do_not_divide_the_heads_are_a_shape_error() {
        let mut w = one("qkv.weight", Array::zeros::<f32>(&[18, 2]).unwrap());
        let order = [Part::Query, Part::Value, Part::Key];
        let err = grouped_to_blocks(&mut w, "qkv", 4, order, 6, 1).unwrap_err();
        assert!(matches!(err, Error::WeightShape { .. }), "{err}");
    }

    #[test]
    fn a_wrong_row_count_is_a_shape_error() {
        let mut w = one("qkv.weight", Array::zeros::<f32>(&[5, 2]).unwrap());
        let err = per_head_to_blocks(&mut w, "qkv", 1, 2).unwrap_err();
        assert!(
            matches!(err, Error::WeightShape { ref name, .. } if name == "qkv.weight"),
            "{err}"
        );
    }

    #[test]
    fn conv1d_weights_are_transposed_unless_quantized() {
        let mut w = one("c.weight", Array::from_slice(&[1.0f32, 2., 3.], &[1, 3]));
        conv1d_to_linear(&mut w, "c").unwrap();
        assert_eq!(w.shape_of("c.weight"), Some(&[3, 1][..]));
        let mut q = one("c.weight", Array::zeros::<u32>(&[4, 2]).unwrap());
        q.insert("c.scales", Array::zeros::<f32>(&[4, 1]).unwrap());
        conv1d_to_linear(&mut q, "c").unwrap();
        assert_eq!(q.shape_of("c.weight"), Some(&[4, 2][..]));
    }
}
