//! Rotary position embeddings, Hugging Face `rotate_half` convention.

use crate::ModelConfig;

/// Precomputed cos/sin tables, `[position, head_dim / 2]`.
#[derive(Debug, Clone)]
pub(crate) struct Rope {
    half: usize,
    inv_freq: Vec<f32>,
    cos: Vec<f32>,
    sin: Vec<f32>,
    positions: usize,
}

impl Rope {
    pub(crate) fn new(cfg: &ModelConfig) -> Self {
        let half = cfg.head_dim / 2;
        // Like PyTorch: the frequencies and the angles are f32, cos/sin of the f32 angle.
        let inv_freq: Vec<f32> = cfg.rope_inv_freq().into_iter().map(|f| f as f32).collect();
        let positions = cfg.max_position_embeddings.max(1);
        let mut cos = Vec::with_capacity(positions * half);
        let mut sin = Vec::with_capacity(positions * half);
        for p in 0..positions {
            for &f in &inv_freq {
                let a = f64::from(p as f32 * f);
                cos.push(a.cos() as f32);
                sin.push(a.sin() as f32);
            }
        }
        Self {
            half,
            inv_freq,
            cos,
            sin,
            positions,
        }
    }

    /// Rotates every head of `x` (`tokens × heads·head_dim`), token `t` at position `pos0 + t`.
    pub(crate) fn apply(&self, x: &mut [f32], tokens: usize, heads: usize, pos0: usize) {
        let hd = 2 * self.half;
        let width = heads * hd;
        let mut tmp_c = Vec::new();
        let mut tmp_s = Vec::new();
        for t in 0..tokens {
            let p = pos0 + t;
            let (c, s): (&[f32], &[f32]) = if p < self.positions {
                (
                    &self.cos[p * self.half..(p + 1) * self.half],
                    &self.sin[p * self.half..(p + 1) * self.half],
                )
            } else {
                tmp_c.clear();
                tmp_s.clear();
                for &f in &self.inv_freq {
                    let a = f64::from(p as f32 * f);
                    tmp_c.push(a.cos() as f32);
                    tmp_s.push(a.sin() as f32);
                }
                (&tmp_c, &tmp_s)
            };
            let row = &mut x[t * width..(t + 1) * width];
            for head in row.chunks_exact_mut(hd) {
                let (x1, x2) = head.split_at_mut(self.half);
                for i in 0..self.half {
                    let (a, b) = (x1[i], x2[i]);
                    x1[i] = a * c[i] - b * s[i];
                    x2[i] = b * c[i] + a * s[i];
                }
            }
        }
    }
}
