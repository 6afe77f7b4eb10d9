//! ggml's tensor types: block layouts, exact dequantization, and repacking into MLX's
//! affine quantization where that is lossless.
//!
//! Every formula follows gguf-py's `quants.py` (`dequantize_blocks`), in float32 and in
//! the same order of operations, so a dequantized tensor equals gguf-py's (and therefore
//! Transformers') bit for bit.
//!
//! MLX's affine format stores, per group of `group_size` consecutive elements of a row,
//! `w = scale · q + bias` with an unsigned `bits`-bit `q`. The types whose blocks are
//! groups of 32 with one scale and one offset map onto it exactly, with float32 scales
//! and biases (the products `d · sc` and `dmin · m` of Q4_K/Q5_K are exact in float32):
//!
//! | type | bits | scale | bias |
//! |---|---|---|---|
//! | Q4_0 | 4 | `d` | `-8d` |
//! | Q4_1 | 4 | `d` | `m` |
//! | Q5_0 | 5 | `d` | `-16d` |
//! | Q5_1 | 5 | `d` | `m` |
//! | Q8_0 | 8 (q + 128) | `d` | `-128d` |
//! | Q4_K | 4 | `d·sc` | `-dmin·m` |
//! | Q5_K | 5 | `d·sc` | `-dmin·m` |
//!
//! Q2_K, Q3_K and Q6_K scale groups of 16 (MLX's smallest group is 32), and IQ4_NL/IQ4_XS
//! map through a non-linear table: they are dequantized.

use half::{bf16, f16};

/// Elements per super-block of the k-quants.
const QK_K: usize = 256;

/// The tensor types of ggml (`GGMLQuantizationType`), with their ids in the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[allow(non_camel_case_types)]
pub enum GgmlType {
    F32,
    F16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q8_1,
    Q2_K,
    Q3_K,
    Q4_K,
    Q5_K,
    Q6_K,
    Q8_K,
    IQ2_XXS,
    IQ2_XS,
    IQ3_XXS,
    IQ1_S,
    IQ4_NL,
    IQ3_S,
    IQ2_S,
    IQ4_XS,
    I8,
    I16,
    I32,
    I64,
    F64,
    IQ1_M,
    BF16,
    TQ1_0,
    TQ2_0,
    MXFP4,
    NVFP4,
    Q1_0,
}

impl GgmlType {
    /// The type with file id `id`.
    pub fn from_id(id: u32) -> Option<GgmlType> {
        use GgmlType::*;
        Some(match id {
            0 => F32,
            1 => F16,
            2 => Q4_0,
            3 => Q4_1,
            6 => Q5_0,
            7 => Q5_1,
            8 => Q8_0,
            9 => Q8_1,
            10 => Q2_K,
            11 => Q3_K,
            12 => Q4_K,
            13 => Q5_K,
            14 => Q6_K,
            15 => Q8_K,
            16 => IQ2_XXS,
            17 => IQ2_XS,
            18 => IQ3_XXS,
            19 => IQ1_S,
            20 => IQ4_NL,
            21 => IQ3_S,
            22 => IQ2_S,
            23 => IQ4_XS,
            24 => I8,
            25 => I16,
            26 => I32,
            27 => I64,
            28 => F64,
            29 => IQ1_M,
            30 => BF16,
            34 => TQ1_0,
            35 => TQ2_0,
            39 => MXFP4,
            40 => NVFP4,
            41 => Q1_0,
            _ => return None,
        })
    }

    /// `(elements per block, bytes per block)`, as gguf-py's `GGML_QUANT_SIZES`.
    pub fn block(self) -> (u64, u64) {
        use GgmlType::*;
        let k = QK_K as u64;
        match self {
            F32 | I32 => (1, 4),
            F16 | BF16 | I16 => (1, 2),
            I8 => (1, 1),
            I64 | F64 => (1, 8),
            Q4_0 => (32, 2 + 16),
            Q4_1 => (32, 2 + 2 + 16),
            Q5_0 => (32, 2 + 4 + 16),
            Q5_1 => (32, 2 + 2 + 4 + 16),
            Q8_0 => (32, 2 + 32),
            Q8_1 => (32, 4 + 4 + 32),
            Q2_K => (k, 2 + 2 + k / 16 + k / 4),
            Q3_K => (k, 2 + k / 4 + k / 8 + 12),
            Q4_K => (k, 2 + 2 + k / 2 + 12),
            Q5_K => (k, 2 + 2 + k / 2 + k / 8 + 12),
            Q6_K => (k, 2 + k / 2 + k / 4 + k / 16),
            Q8_K => (k, 4 + k + k / 8),
            IQ2_XXS => (k, 2 + k / 4),
            IQ2_XS => (k, 2 + k / 4 + k / 32),
            IQ3_XXS => (k, 2 + k / 4 + k / 8),
            IQ1_S => (k, 2 + k / 8 + k / 16),
            IQ4_NL => (32, 2 + 16),
            IQ3_S => (k, 2 + k / 4 + k / 8 + k / 32 + 4),
            IQ2_S => (k, 2 + k / 4 + k / 16),
            IQ4_XS => (k, 2 + 2 + k / 2 + k / 64),
            IQ1_M => (k, k / 8 + k / 16 + k / 32),
            TQ1_0 => (k, 2 + 4 * 13),
            TQ2_0 => (k, 2 + 64),
            MXFP4 => (32, 1 + 16),
            NVFP4 => (64, 4 + 32),
            Q1_0 => (128, 2 + 16),
        }
    }

    /// Whether [`dequantize`] reads this type.
    pub fn can_dequantize(self) -> bool {
        use GgmlType::*;
        matches!(
            self,
            F32 | F16
                | BF16
                | F64
                | Q4_0
                | Q4_1
                | Q5_0
                | Q5_1
                | Q8_0
                | Q2_K
                | Q3_K
                | Q4_K
                | Q5_K
                | Q6_K
                | IQ4_NL
                | IQ4_XS
        )
    }

    /// The MLX affine bit width this type repacks to losslessly (groups of 32), if any.
    pub fn affine_bits(self) -> Option<i32> {
        use GgmlType::*;
        match self {
            Q4_0 | Q4_1 | Q4_K => Some(4),
            Q5_0 | Q5_1 | Q5_K => Some(5),
            Q8_0 => Some(8),
            _ => None,
        }
    }
}

/// The group size of every affine repacking.
pub const AFFINE_GROUP: usize = 32;

fn half(bytes: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([bytes[at], bytes[at + 1]]).to_f32()
}

/// One group of 32 elements: `w[i] = scale · q[i] + bias`, with `q` unsigned.
struct Group {
    q: [u8; 32],
    scale: f32,
    bias: f32,
}

/// The low and high nibbles of 16 bytes, as elements 0..16 and 16..32.
fn nibbles(qs: &[u8]) -> [u8; 32] {
    let mut q = [0u8; 32];
    for i in 0..16 {
        q[i] = qs[i] & 0x0F;
        q[i + 16] = qs[i] >> 4;
    }
    q
}

/// Element `i` gets bit `i` of `qh` (little-endian u32) as its fifth bit.
fn with_high_bits(mut q: [u8; 32], qh: &[u8]) -> [u8; 32] {
    let qh = u32::from_le_bytes([qh[0], qh[1], qh[2], qh[3]]);
    for (i, v) in q.iter_mut().enumerate() {
        *v |= (((qh >> i) & 1) as u8) << 4;
    }
    q
}

/// The 6-bit scales and mins of the eight sub-blocks of a Q4_K/Q5_K block.
fn k_scale_min(s: &[u8]) -> ([u8; 8], [u8; 8]) {
    let (mut sc, mut mn) = ([0u8; 8], [0u8; 8]);
    for j in 0..4 {
        sc[j] = s[j] & 0x3F;
        mn[j] = s[j + 4] & 0x3F;
        sc[j + 4] = (s[j + 8] & 0x0F) | ((s[j] >> 2) & 0x30);
        mn[j + 4] = (s[j + 8] >> 4) | ((s[j + 4] >> 2) & 0x30);
    }
    (sc, mn)
}

/// The affine groups of one block of an affine-representable type.
fn affine_groups(kind: GgmlType, b: &[u8], out: &mut Vec<Group>) {
    match kind {
        GgmlType::Q4_0 => {
            let d = half(b, 0);
            out.push(Group {
                q: nibbles(&b[2..18]),
                scale: d,
                bias: -8.0 * d,
            });
        }
        GgmlType::Q4_1 => out.push(Group {
            q: nibbles(&b[4..20]),
            scale: half(b, 0),
            bias: half(b, 2),
        }),
        GgmlType::Q5_0 => {
            let d = half(b, 0);
            out.push(Group {
                q: with_high_bits(nibbles(&b[6..22]), &b[2..6]),
                scale: d,
                bias: -16.0 * d,
            });
        }
        GgmlType::Q5_1 => out.push(Group {
            q: with_high_bits(nibbles(&b[8..24]), &b[4..8]),
            scale: half(b, 0),
            bias: half(b, 2),
        }),
        GgmlType::Q8_0 => {
            let d = half(b, 0);
            let mut q = [0u8; 32];
            for (v, &x) in q.iter_mut().zip(&b[2..34]) {
                *v = (x as i8 as i16 + 128) as u8;
            }
            out.push(Group {
                q,
                scale: d,
                bias: -128.0 * d,
            });
        }
        GgmlType::Q4_K | GgmlType::Q5_K => {
            let d = half(b, 0);
            let dmin = half(b, 2);
            let (sc, mn) = k_scale_min(&b[4..16]);
            let (qh, qs) = if kind == GgmlType::Q5_K {
                (Some(&b[16..48]), &b[48..176])
            } else {
                (None, &b[16..144])
            };
            for s in 0..8 {
                let chunk = &qs[32 * (s / 2)..32 * (s / 2) + 32];
                let mut q = [0u8; 32];
                for i in 0..32 {
                    q[i] = if s % 2 == 0 {
                        chunk[i] & 0x0F
                    } else {
                        chunk[i] >> 4
                    };
                    if let Some(qh) = qh {
                        q[i] |= ((qh[i] >> s) & 1) << 4;
                    }
                }
                out.push(Group {
                    q,
                    scale: d * f32::from(sc[s]),
                    bias: -(dmin * f32::from(mn[s])),
                });
            }
        }
        _ => {}
    }
}

/// A 2-D tensor in MLX's affine quantization: `weight` `[rows, cols·bits/32]` uint32,
/// `scales` and `biases` `[rows, cols/32]` float32.
#[derive(Debug, Clone, PartialEq)]
pub struct Affine {
    pub bits: i32,
    pub group_size: i32,
    pub weight: Vec<u32>,
    pub scales: Vec<f32>,
    pub biases: Vec<f32>,
}

/// Repacks `rows × cols` elements of `kind` into MLX's affine format, or `None` when the
/// type has no lossless affine form. `data` must hold exactly the tensor's blocks.
pub fn to_affine(kind: GgmlType, data: &[u8], rows: usize, cols: usize) -> Option<Affine> {
    let bits = kind.affine_bits()? as usize;
    let (block, size) = kind.block();
    let (block, size) = (block as usize, size as usize);
    if !cols.is_multiple_of(block) || data.len() != rows * cols / block * size {
        return None;
    }
    let groups_per_row = cols / AFFINE_GROUP;
    let words_per_row = cols * bits / 32;
    let mut weight = vec![0u32; rows * words_per_row];
    let mut scales = Vec::with_capacity(rows * groups_per_row);
    let mut biases = Vec::with_capacity(rows * groups_per_row);
    let mut groups = Vec::with_capacity(groups_per_row);
    for (row, bytes) in data.chunks_exact(cols / block * size).enumerate() {
        groups.clear();
        for b in bytes.chunks_exact(size) {
            affine_groups(kind, b, &mut groups);
        }
        // MLX packs each row as a little-endian bit stream: element j at bits j·bits.
        let words = &mut weight[row * words_per_row..(row + 1) * words_per_row];
        for (g, group) in groups.iter().enumerate() {
            for (i, &q) in group.q.iter().enumerate() {
                let bit = (g * AFFINE_GROUP + i) * bits;
                let (word, shift) = (bit / 32, bit % 32);
                words[word] |= u32::from(q) << shift;
                if shift + bits > 32 {
                    words[word + 1] |= u32::from(q) >> (32 - shift);
                }
            }
            scales.push(group.scale);
            biases.push(group.bias);
        }
    }
    Some(Affine {
        bits: bits as i32,
        group_size: AFFINE_GROUP as i32,
        weight,
        scales,
        biases,
    })
}

const IQ4_NL_VALUES: [i8; 16] = [
    -127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113,
];

/// Dequantizes whole blocks of `kind` to float32 exactly as gguf-py does, or `None` for a
/// type it does not read (see [`GgmlType::can_dequantize`]) or data that are not whole
/// blocks.
pub fn dequantize(kind: GgmlType, data: &[u8]) -> Option<Vec<f32>> {
    use GgmlType::*;
    let (block, size) = kind.block();
    let (block, size) = (block as usize, size as usize);
    if !data.len().is_multiple_of(size) || !kind.can_dequantize() {
        return None;
    }
    let mut out = Vec::with_capacity(data.len() / size * block);
    match kind {
        F32 => out.extend(
            data.chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
        ),
        F16 => out.extend(data.chunks_exact(2).map(|b| half(b, 0))),
        BF16 => out.extend(
            data.chunks_exact(2)
                .map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32()),
        ),
        F64 => out.extend(data.chunks_exact(8).map(|b| {
            let mut x = [0u8; 8];
            x.copy_from_slice(b);
            f64::from_le_bytes(x) as f32
        })),
        Q4_0 | Q5_0 | Q8_0 => {
            // gguf-py: d · (q - offset) with the signed difference.
            let mut groups = Vec::with_capacity(1);
            for b in data.chunks_exact(size) {
                groups.clear();
                affine_groups(kind, b, &mut groups);
                let offset = match kind {
                    Q4_0 => 8,
                    Q5_0 => 16,
                    _ => 128,
                };
                let g = &groups[0];
                out.extend(g.q.iter().map(|&q| g.scale * f32::from(q as i16 - offset)));
            }
        }
        Q4_1 | Q5_1 | Q4_K | Q5_K => {
            // gguf-py: d · q + m, and for the k-quants (d·sc) · q - dmin·m.
            let mut groups = Vec::with_capacity(8);
            for b in data.chunks_exact(size) {
                groups.clear();
                affine_groups(kind, b, &mut groups);
                for g in &groups {
                    out.extend(g.q.iter().map(|&q| g.scale * f32::from(q) + g.bias));
                }
            }
        }
        Q2_K => {
            for b in data.chunks_exact(size) {
                let (scales, qs) = (&b[0..16], &b[16..80]);
                let d = half(b, 80);
                let dmin = half(b, 82);
                let mut q = [0u8; QK_K];
                for c in 0..2 {
                    for k in 0..4 {
                        for i in 0..32 {
                            q[c * 128 + k * 32 + i] = (qs[32 * c + i] >> (2 * k)) & 3;
                        }
                    }
                }
                for (e, &q) in q.iter().enumerate() {
                    let s = scales[e / 16];
                    let dl = d * f32::from(s & 0x0F);
                    let ml = dmin * f32::from(s >> 4);
                    out.push(dl * f32::from(q) - ml);
                }
            }
        }
        Q3_K => {
            for b in data.chunks_exact(size) {
                let (hmask, qs, s) = (&b[0..32], &b[32..96], &b[96..108]);
                let d = half(b, 108);
                let mut sc = [0f32; 16];
                for (j, v) in sc.iter_mut().enumerate() {
                    let low = (s[j % 8] >> (4 * (j / 8))) & 0x0F;
                    let high = (s[8 + j % 4] >> (2 * (j / 4))) & 0x03;
                    *v = f32::from(((low | (high << 4)) as i8) - 32);
                }
                for e in 0..QK_K {
                    let (c, k, i) = (e / 128, (e % 128) / 32, e % 32);
                    let low = (qs[32 * c + i] >> (2 * k)) & 3;
                    let high = ((hmask[i] >> (e / 32)) & 1) ^ 1;
                    let q = low as i8 - (high << 2) as i8;
                    out.push(d * sc[e / 16] * f32::from(q));
                }
            }
        }
        Q6_K => {
            for b in data.chunks_exact(size) {
                let (ql, qh, scales) = (&b[0..128], &b[128..192], &b[192..208]);
                let d = half(b, 208);
                for e in 0..QK_K {
                    let (c, h, i) = (e / 128, (e % 128) / 64, e % 64);
                    let low = (ql[64 * c + i] >> (4 * h)) & 0x0F;
                    let (k, j) = ((e % 128) / 32, e % 32);
                    let high = (qh[32 * c + j] >> (2 * k)) & 0x03;
                    let q = ((low | (high << 4)) as i8) - 32;
                    let dl = d * f32::from(scales[e / 16] as i8);
                    out.push(dl * f32::from(q));
                }
            }
        }
        IQ4_NL => {
            for b in data.chunks_exact(size) {
                let d = half(b, 0);
                out.extend(
                    nibbles(&b[2..18])
                        .iter()
                        .map(|&q| d * f32::from(IQ4_NL_VALUES[q as usize])),
                );
            }
        }
        IQ4_XS => {
            for b in data.chunks_exact(size) {
                let d = half(b, 0);
                let scales_h = u16::from_le_bytes([b[2], b[3]]);
                let (scales_l, qs) = (&b[4..8], &b[8..136]);
                for j in 0..8 {
                    let low = (scales_l[j / 2] >> (4 * (j % 2))) & 0x0F;
                    let high = ((scales_h >> (2 * j)) & 0x03) as u8;
                    let dl = d * f32::from(((low | (high << 4)) as i8) - 32);
                    out.extend(
                        nibbles(&qs[16 * j..16 * j + 16])
                            .iter()
                            .map(|&q| dl * f32::from(IQ4_NL_VALUES[q as usize])),
                    );
                }
            }
        }
        _ => return None,
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    //! Closed forms on hand-built blocks; `tests/gguf.rs` compares real and random blocks
    //! with gguf-py bit for bit.
    use super::*;

    fn h(x: f32) -> [u8; 2] {
        f16::from_f32(x).to_le_bytes()
    }

    #[test]
    fn q4_0_is_d_times_q_minus_8() {
        let mut b = h(0.5).to_vec();
        b.extend((0..16u8).map(|i| i | ((15 - i) << 4)));
        let w = dequantize(GgmlType::Q4_0, &b).unwrap();
        for i in 0..16 {
            assert_eq!(w[i], 0.5 * (i as f32 - 8.0));
            assert_eq!(w[i + 16], 0.5 * (15.0 - i as f32 - 8.0));
        }
    }

    #[test]
    fn q8_0_is_d_times_signed_q() {
        let mut b = h(-0.25).to_vec();
        b.extend((0..32).map(|i| (i as i8 * 4 - 64) as u8));
        let w = dequantize(GgmlType::Q8_0, &b).unwrap();
        for (i, v) in w.iter().enumerate() {
            assert_eq!(*v, -0.25 * f32::from(i as i8 * 4 - 64));
        }
        let a = to_affine(GgmlType::Q8_0, &b, 1, 32).unwrap();
        assert_eq!((a.bits, a.scales[0], a.biases[0]), (8, -0.25, 32.0));
        assert_eq!(a.weight[0] & 0xFF, 64); // q = -64 stored as -64 + 128
    }

    #[test]
    fn q5_1_takes_the_fifth_bit_from_qh() {
        let mut b = [h(2.0), h(-1.0)].concat();
        b.extend(0x8000_0001u32.to_le_bytes()); // elements 0 and 31 get 16 added
        b.extend([0x21u8; 16]); // low nibble 1 (elements 0..16), high nibble 2 (16..32)
        let w = dequantize(GgmlType::Q5_1, &b).unwrap();
        assert_eq!(w[0], 2.0 * 17.0 - 1.0);
        assert_eq!(w[1], 2.0 * 1.0 - 1.0);
        assert_eq!(w[16], 2.0 * 2.0 - 1.0);
        assert_eq!(w[31], 2.0 * 18.0 - 1.0);
    }

    #[test]
    fn q4_k_sub_blocks_have_six_bit_scales_and_mins() {
        // d = 1, dmin = 0.5; sub-block 0: scale 3, min 5; sub-block 7: scale 33, min 40.
        let mut b = [h(1.0), h(0.5)].concat();
        let mut s = [0u8; 12];
        s[0] = 3;
        s[4] = 5;
        // Sub-block 7 (j = 3 of the upper four): low 4 bits in s[11], high 2 in s[3] / s[7].
        s[11] = (33 & 0x0F) | ((40 & 0x0F) << 4);
        s[3] = (33 >> 4) << 6;
        s[7] = (40 >> 4) << 6;
        b.extend(s);
        b.extend([0x97u8; 128]); // even sub-blocks get 7, odd ones 9
        let w = dequantize(GgmlType::Q4_K, &b).unwrap();
        assert_eq!(w[0], 3.0 * 7.0 - 0.5 * 5.0);
        assert_eq!(w[7 * 32], 33.0 * 9.0 - 0.5 * 40.0);
        let a = to_affine(GgmlType::Q4_K, &b, 1, 256).unwrap();
        assert_eq!((a.scales[7], a.biases[7]), (33.0, -20.0));
    }

    #[test]
    fn q6_k_groups_of_16_have_signed_scales() {
        let mut b = vec![0x21u8; 128]; // ql: low nibble 1, high nibble 2
        b.extend([0u8; 64]); // qh: no high bits
        b.extend((0..16).map(|g| (g as i8 - 8) as u8));
        b.extend(h(0.5));
        let w = dequantize(GgmlType::Q6_K, &b).unwrap();
        // Element 0: group 0 (scale -8), q = 1 - 32; element 64: group 4 (scale -4), q = 2 - 32.
        assert_eq!(w[0], 0.5 * -8.0 * (1.0 - 32.0));
        assert_eq!(w[64], 0.5 * -4.0 * (2.0 - 32.0));
        assert!(to_affine(GgmlType::Q6_K, &b, 1, 256).is_none());
    }

    #[test]
    fn partial_blocks_and_unread_types_are_refused() {
        assert!(dequantize(GgmlType::Q4_0, &[0u8; 17]).is_none());
        assert!(dequantize(GgmlType::IQ2_XXS, &[0u8; 66]).is_none());
        assert!(to_affine(GgmlType::Q4_0, &[0u8; 18], 1, 64).is_none());
    }
}
