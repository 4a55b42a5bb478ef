//! Runs the 8-bit-table decode kernel alone, many times, on a random `rows × cols` matrix of
//! 4 blocks (k = 16), for profiling (`perf record`) and for comparing two builds:
//! `cargo run --release -p bitstack-bits --example q8_loop -- [rows] [cols]`, on one thread,
//! or on the pool with `PAR=1`; `REPS=N` products (default 20000). It runs on a thread of
//! rayon's pool, as the CLI does, and prints the mean time of one product.

use std::time::Instant;

use bitstack_bits::{lowrank_matvec_add_q8, LowRankRef, Parallelism, SignMatrix, Simd};
use half::f16;

fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let (m, n, k) = (
        args.first().copied().unwrap_or(4096),
        args.get(1).copied().unwrap_or(4096),
        16,
    );
    let mut state = 0x2545_F491_4F6C_DD1Du64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state >> 40) as f32 / (1u64 << 24) as f32 - 0.5
    };
    let parts: Vec<(SignMatrix, Vec<f16>, Vec<f16>)> = (0..4)
        .map(|_| {
            let signs: Vec<f32> = (0..m * n).map(|_| next()).collect();
            let s = SignMatrix::from_signs_of(&signs, m, n).unwrap_or_else(|e| panic!("{e}"));
            let u = (0..m * k).map(|_| f16::from_f32(next())).collect();
            let v = (0..k * n).map(|_| f16::from_f32(next())).collect();
            (s, u, v)
        })
        .collect();
    let blocks: Vec<LowRankRef<'_>> = parts
        .iter()
        .map(|(s, u, v)| LowRankRef {
            signs: s.as_view(),
            u,
            v,
            k,
        })
        .collect();
    let x: Vec<f32> = (0..n).map(|_| next()).collect();
    let mut y = vec![0.0f32; m];
    let par = if std::env::var("PAR").is_ok() {
        Parallelism::Auto
    } else {
        Parallelism::Sequential
    };
    let reps: usize = std::env::var("REPS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(20000);
    let t = Instant::now();
    rayon::scope(|_| {
        for _ in 0..reps {
            lowrank_matvec_add_q8(&blocks, &x, &mut y, par, Simd::Auto);
        }
    });
    println!(
        "{m}x{n} {par:?}: {:.4} ms",
        t.elapsed().as_secs_f64() / reps as f64 * 1e3
    );
}
