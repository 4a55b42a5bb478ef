//! Times the decode kernel with f32 tables, with 8-bit tables and with 8-bit `z` (tile
//! products where the CPU has AMX) on a random `rows × cols` matrix of 4 blocks (k = 16), on
//! one thread and on the pool, alternately (signs in the runtime's strip layout; `ROWMAJOR=1`
//! keeps them row-major):
//! `cargo run --release -p bitstack-bits --example q8_decode -- [rows] [cols]`.
//!
//! With `LOOP=N` it instead runs only the 8-bit-table kernel, `N` times, on a thread of
//! rayon's pool as the CLI does (on one thread, or split over the pool with `PAR=1`), and
//! prints the mean time of one product: for `perf record` and for comparing two builds.
//! `SIMD=avx2` (or `SIMD=portable`) runs the kernels' AVX2 (portable) versions instead of
//! the fastest this CPU has.

use std::time::Instant;

use bitstack_bits::{
    lowrank_i8_accelerated, lowrank_matvec_add, lowrank_matvec_add_i8, lowrank_matvec_add_q8,
    LowRankRef, Parallelism, SignLayout, SignMatrix, Simd, STRIP_COLS,
};
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
            // The runtime's layout where the width allows (`ROWMAJOR=1`: the container's).
            let s = if n % STRIP_COLS == 0 && std::env::var_os("ROWMAJOR").is_none() {
                s.into_layout(SignLayout::Strips)
                    .unwrap_or_else(|e| panic!("{e}"))
            } else {
                s
            };
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
    let simd = match std::env::var("SIMD").as_deref() {
        Ok("avx2") => Simd::Avx2,
        Ok("portable") => Simd::Portable,
        _ => Simd::Auto,
    };
    let mut y = vec![0.0f32; m];
    if let Some(reps) = std::env::var("LOOP")
        .ok()
        .and_then(|r| r.parse::<usize>().ok())
    {
        let par = if std::env::var_os("PAR").is_some() {
            Parallelism::Auto
        } else {
            Parallelism::Sequential
        };
        let t = Instant::now();
        rayon::scope(|_| {
            for _ in 0..reps {
                lowrank_matvec_add_q8(&blocks, &x, &mut y, par, simd);
            }
        });
        let each = t.elapsed().as_secs_f64() / reps.max(1) as f64;
        println!(
            "{m}x{n}, 4 blocks, k = {k}, {par:?}, {:?}, {simd:?}, 8-bit tables: {:.4} ms",
            blocks[0].signs.layout(),
            each * 1e3
        );
        return;
    }
    let reps = 20;
    for par in [Parallelism::Sequential, Parallelism::Auto] {
        let (mut f32_best, mut q8_best, mut i8_best) = (f64::MAX, f64::MAX, f64::MAX);
        for _ in 0..3 {
            let t = Instant::now();
            for _ in 0..reps {
                lowrank_matvec_add(&blocks, &x, &mut y, par, simd);
            }
            f32_best = f32_best.min(t.elapsed().as_secs_f64() / reps as f64);
            let t = Instant::now();
            for _ in 0..reps {
                lowrank_matvec_add_q8(&blocks, &x, &mut y, par, simd);
            }
            q8_best = q8_best.min(t.elapsed().as_secs_f64() / reps as f64);
            if lowrank_i8_accelerated(Simd::Auto) {
                let t = Instant::now();
                for _ in 0..reps {
                    lowrank_matvec_add_i8(&blocks, &x, &mut y, par, Simd::Auto);
                }
                i8_best = i8_best.min(t.elapsed().as_secs_f64() / reps as f64);
            }
        }
        println!(
            "{m}x{n}, 4 blocks, k = {k}, {par:?}, {simd:?}: f32 tables {:.3} ms, 8-bit tables {:.3} ms ({:.2}x)",
            f32_best * 1e3,
            q8_best * 1e3,
            f32_best / q8_best
        );
        if i8_best < f64::MAX {
            println!("  8-bit z on tiles (AMX): {:.3} ms", i8_best * 1e3);
        }
    }
}
