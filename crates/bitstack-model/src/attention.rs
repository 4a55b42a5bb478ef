//! Causal grouped-query softmax attention over row-major Q/K/V buffers.

use faer::{Accum, MatMut, MatRef, Par};
use rayon::prelude::*;

use crate::fastmath::softmax_in_place;
use crate::linear::{strided_dots, strided_weighted_sum};

/// Shapes of one attention call.
#[derive(Debug, Clone, Copy)]
pub(crate) struct AttnShape {
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    /// Number of query rows.
    pub tokens: usize,
    /// Position of the first query row; keys cover positions `0 .. pos0 + tokens`.
    pub pos0: usize,
    /// Sliding window span (keys older than `window` positions are masked).
    pub window: Option<usize>,
}

impl AttnShape {
    fn first_key(&self, pos: usize) -> usize {
        self.window.map_or(0, |w| (pos + 1).saturating_sub(w))
    }
}

/// Query rows per block in the many-token path.
const QUERY_BLOCK: usize = 64;

/// `out[t, h] = softmax(q[t, h] · K[g]ᵀ / √d, causal) V[g]` with `g = h / (heads / kv_heads)`.
///
/// `q`, `out`: `tokens × heads·d`; `k`, `v`: `(pos0 + tokens) × kv_heads·d` (row-major).
/// `scratch` is reused between calls (no allocation once large enough).
pub(crate) fn attention(
    s: AttnShape,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    out: &mut [f32],
    scratch: &mut Vec<f32>,
) {
    let d = s.head_dim;
    let q_dim = s.heads * d;
    let kv_dim = s.kv_heads * d;
    let keys = s.pos0 + s.tokens;
    debug_assert_eq!(q.len(), s.tokens * q_dim);
    debug_assert_eq!(out.len(), s.tokens * q_dim);
    debug_assert!(k.len() >= keys * kv_dim && v.len() >= keys * kv_dim);
    let group = s.heads / s.kv_heads;
    let scale = 1.0 / (d as f32).sqrt();
    if s.tokens == 1 {
        // Decoding: one query row, a dot product per key.
        scratch.resize(s.heads * keys, 0.0);
        let lo = s.first_key(s.pos0);
        out.par_chunks_mut(d)
            .zip(scratch.par_chunks_mut(keys))
            .enumerate()
            .for_each(|(h, (o, sc))| {
                let g = h / group;
                let qh = &q[h * d..(h + 1) * d];
                let sc = &mut sc[lo..keys];
                let rows = (lo * kv_dim + g * d, kv_dim);
                strided_dots(qh, k, rows, scale, sc);
                softmax_in_place(sc);
                strided_weighted_sum(sc, v, rows, o);
            });
        return;
    }
    // Many queries: per head, blocks of query rows against the keys they can see, with GEMMs.
    let t = s.tokens;
    scratch.resize(s.heads * t * d, 0.0);
    scratch
        .par_chunks_mut(t * d)
        .enumerate()
        .for_each(|(h, oh)| {
            let g = h / group;
            let mut probs = vec![0.0f32; QUERY_BLOCK * keys];
            let mut r0 = 0;
            while r0 < t {
                let r1 = (r0 + QUERY_BLOCK).min(t);
                let rows = r1 - r0;
                let lo = s.first_key(s.pos0 + r0);
                let hi = s.pos0 + r1;
                let n = hi - lo;
                let qb = MatRef::from_row_major_slice_with_stride(
                    &q[r0 * q_dim + h * d..],
                    rows,
                    d,
                    q_dim,
                );
                let kb = MatRef::from_row_major_slice_with_stride(
                    &k[lo * kv_dim + g * d..],
                    n,
                    d,
                    kv_dim,
                );
                let vb = MatRef::from_row_major_slice_with_stride(
                    &v[lo * kv_dim + g * d..],
                    n,
                    d,
                    kv_dim,
                );
                let p = &mut probs[..rows * n];
                faer::linalg::matmul::matmul(
                    MatMut::from_row_major_slice_mut(&mut *p, rows, n),
                    Accum::Replace,
                    qb,
                    kb.transpose(),
                    scale,
                    Par::Seq,
                );
                for (i, row) in p.chunks_exact_mut(n).enumerate() {
                    let pos = s.pos0 + r0 + i;
                    let a = s.first_key(pos) - lo;
                    let b = pos + 1 - lo;
                    row[..a].fill(0.0);
                    row[b..].fill(0.0);
                    softmax_in_place(&mut row[a..b]);
                }
                faer::linalg::matmul::matmul(
                    MatMut::from_row_major_slice_mut(&mut oh[r0 * d..r1 * d], rows, d),
                    Accum::Replace,
                    MatRef::from_row_major_slice(&*p, rows, n),
                    vb,
                    1.0f32,
                    Par::Seq,
                );
                r0 = r1;
            }
        });
    // Head-major [h, t, d] -> token-major [t, h·d].
    for h in 0..s.heads {
        let oh = &scratch[h * t * d..(h + 1) * t * d];
        for (tt, src) in oh.chunks_exact(d).enumerate() {
            out[tt * q_dim + h * d..tt * q_dim + (h + 1) * d].copy_from_slice(src);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pseudo(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) - 0.5
            })
            .collect()
    }

    fn naive(s: AttnShape, q: &[f32], k: &[f32], v: &[f32]) -> Vec<f32> {
        let d = s.head_dim;
        let (qd, kd) = (s.heads * d, s.kv_heads * d);
        let mut out = vec![0.0; s.tokens * qd];
        for t in 0..s.tokens {
            let pos = s.pos0 + t;
            for h in 0..s.heads {
                let g = h / (s.heads / s.kv_heads);
                let lo = s.first_key(pos);
                let sc: Vec<f64> = (lo..=pos)
                    .map(|j| {
                        (0..d)
                            .map(|i| {
                                f64::from(q[t * qd + h * d + i]) * f64::from(k[j * kd + g * d + i])
                            })
                            .sum::<f64>()
                            / (d as f64).sqrt()
                    })
                    .collect();
                let m = sc.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = sc.iter().map(|x| (x - m).exp()).collect();
                let z: f64 = e.iter().sum();
                for i in 0..d {
                    let acc: f64 = (lo..=pos)
                        .zip(&e)
                        .map(|(j, p)| p / z * f64::from(v[j * kd + g * d + i]))
                        .sum();
                    out[t * qd + h * d + i] = acc as f32;
                }
            }
        }
        out
    }

    #[test]
    fn matches_naive() {
        for &(tokens, pos0, window) in &[
            (1, 0, None),
            (1, 9, None),
            (70, 0, None),
            (130, 5, None),
            (90, 3, Some(17)),
            (1, 40, Some(8)),
        ] {
            let s = AttnShape {
                heads: 4,
                kv_heads: 2,
                head_dim: 8,
                tokens,
                pos0,
                window,
            };
            let keys = pos0 + tokens;
            let q = pseudo(tokens * 32, 1);
            let k = pseudo(keys * 16, 2);
            let v = pseudo(keys * 16, 3);
            let mut out = vec![f32::NAN; tokens * 32];
            let mut scratch = Vec::new();
            attention(s, &q, &k, &v, &mut out, &mut scratch);
            let r = naive(s, &q, &k, &v);
            for (a, b) in out.iter().zip(&r) {
                assert!((a - b).abs() < 1e-5, "{tokens} {pos0}: {a} vs {b}");
            }
        }
    }
}
