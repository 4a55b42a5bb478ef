//! What the examples share.

/// The bench's synthetic matrix (crates/bitstack-cli/src/bench.rs `synthetic`).
pub fn synthetic(rows: usize, cols: usize, seed: u64) -> Vec<f32> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state >> 40) as f32 / (1u64 << 24) as f32 - 0.5
    };
    let scale: Vec<f32> = (0..cols).map(|j| (1.0 + j as f32).powf(-0.5)).collect();
    let a: Vec<f32> = (0..rows * 8).map(|_| next()).collect();
    let b: Vec<f32> = (0..8 * cols).map(|_| next()).collect();
    let mut w = vec![0.0f32; rows * cols];
    for i in 0..rows {
        for j in 0..cols {
            let g = next() + next() + next();
            let low: f32 = (0..8).map(|r| a[i * 8 + r] * b[r * cols + j]).sum();
            w[i * cols + j] = g * scale[j] + 0.05 * low;
        }
    }
    w
}
