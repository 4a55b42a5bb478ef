//! What a product costs when an engine calls [`LoadedStack::matvec`] from its own thread
//! instead of from one of rayon's: every matrix of a stack file, loaded in full, multiplied
//! with a fixed vector 50 times from the main thread, then 50 times from inside
//! `rayon::scope` (on a worker), side by side, three times over.
//!
//! ```text
//! cargo run --release -p bitstack-runtime --example outside_pool -- FILE.bitstack
//! ```

use std::sync::Arc;
use std::time::Instant;

use bitstack_runtime::{LoadedStack, StackFile};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let path = std::env::args()
        .nth(1)
        .ok_or("usage: outside_pool FILE.bitstack")?;
    let file = Arc::new(StackFile::open(&path)?);
    let stack = LoadedStack::load(file.clone(), file.layout().max_memory())?;
    let shapes: Vec<(usize, usize)> = (0..file.matrix_count()).map(|m| file.shape(m)).collect();
    let xs: Vec<Vec<f32>> = shapes
        .iter()
        .map(|&(_, cols)| (0..cols).map(|i| (i as f32 * 0.37).sin()).collect())
        .collect();
    let mut ys: Vec<Vec<f32>> = shapes.iter().map(|&(rows, _)| vec![0.0; rows]).collect();
    let all = |ys: &mut [Vec<f32>]| {
        for (m, (x, y)) in xs.iter().zip(ys.iter_mut()).enumerate() {
            stack.matvec(m, x, y);
        }
    };
    const ROUNDS: u32 = 50;
    for _ in 0..3 {
        let t = Instant::now();
        for _ in 0..ROUNDS {
            all(&mut ys);
        }
        let outside = t.elapsed().as_secs_f64() / f64::from(ROUNDS);
        let t = Instant::now();
        rayon::scope(|_| {
            for _ in 0..ROUNDS {
                all(&mut ys);
            }
        });
        let inside = t.elapsed().as_secs_f64() / f64::from(ROUNDS);
        println!(
            "{} matrices: {:.3} ms from the main thread, {:.3} ms on a rayon worker ({:.2}x)",
            shapes.len(),
            outside * 1e3,
            inside * 1e3,
            outside / inside
        );
    }
    Ok(())
}
