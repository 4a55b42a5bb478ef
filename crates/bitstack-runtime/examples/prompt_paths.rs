//! Times the batch product of a few tokens both ways, side by side: tiles of `Ŵ` rebuilt
//! and multiplied (`matmul_tiled`) against one decode product per token (`matvec`):
//! `cargo run --release -p bitstack-runtime --example prompt_paths -- FILE.bitstack`.

use std::sync::Arc;
use std::time::Instant;

use bitstack_runtime::{LoadedStack, StackFile};

fn best_of(reps: usize, mut f: impl FnMut()) -> f64 {
    (0..reps)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .fold(f64::MAX, f64::min)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let path = std::env::args()
        .nth(1)
        .ok_or("usage: prompt_paths FILE.bitstack")?;
    let file = Arc::new(StackFile::open(&path)?);
    let stack = LoadedStack::load(file.clone(), u64::MAX)?;
    let pool = rayon::ThreadPoolBuilder::new().build()?;
    pool.install(|| {
        let mut seen = Vec::new();
        for m in 0..file.matrix_count() {
            let shape = file.shape(m);
            if seen.contains(&shape) {
                continue;
            }
            seen.push(shape);
            let (rows, cols) = shape;
            println!(
                "{} ({rows}x{cols}, {} blocks)",
                file.matrix_name(m),
                stack.blocks_of(m)
            );
            for tokens in [2usize, 4, 8, 16, 32] {
                let x: Vec<f32> = (0..tokens * cols)
                    .map(|i| ((i % 13) as f32 - 6.0) / 6.0)
                    .collect();
                let mut y = vec![0.0f32; tokens * rows];
                let tiled = best_of(5, || stack.matmul(m, &x, tokens, &mut y));
                let per_token = best_of(5, || {
                    for (xt, yt) in x.chunks_exact(cols).zip(y.chunks_exact_mut(rows)) {
                        stack.matvec(m, xt, yt);
                    }
                });
                println!(
                    "  {tokens:>3} tokens: tiles {:>8.3} ms, per token {:>8.3} ms ({:.2}x)",
                    tiled * 1e3,
                    per_token * 1e3,
                    tiled / per_token
                );
            }
        }
    });
    Ok(())
}
