//! Shared inputs of the criterion benchmarks in `benches/` (`decompose`, `bits`, `runtime`,
//! `model`).

use rand::{Rng, SeedableRng};

/// A `rows × cols` matrix with a decaying spectrum: a rank-32 part with singular values
/// decaying like `1/(1 + r)`, plus noise with random row and column scales (as real weights
/// have: heavy channels, a slowly decaying tail).
pub fn synthetic(rows: usize, cols: usize, seed: u64) -> Vec<f32> {
    const RANK: usize = 32;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut sym =
        |len: usize| -> Vec<f32> { (0..len).map(|_| rng.random_range(-1.0f32..1.0)).collect() };
    let p = sym(rows * RANK);
    let q = sym(RANK * cols);
    let row_scale: Vec<f32> = sym(rows).iter().map(|x| 1.0 + 0.8 * x).collect();
    let col_scale: Vec<f32> = sym(cols).iter().map(|x| 1.0 + 0.8 * x).collect();
    let noise = sym(rows * cols);
    let mut w = vec![0.0f32; rows * cols];
    for i in 0..rows {
        let row = &mut w[i * cols..(i + 1) * cols];
        for r in 0..RANK {
            let pr = p[i * RANK + r] / (1.0 + r as f32);
            for (x, &qv) in row.iter_mut().zip(&q[r * cols..(r + 1) * cols]) {
                *x += pr * qv;
            }
        }
        for (j, x) in row.iter_mut().enumerate() {
            *x = 0.02 * (*x + 0.5 * noise[i * cols + j] * row_scale[i] * col_scale[j]);
        }
    }
    w
}
