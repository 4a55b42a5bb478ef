//! Benchmarks of `bitstack-decompose`: AVD iterations with the exact SVD (the reference's
//! method) and with the randomized SVD (the default), on synthetic matrices with a decaying
//! spectrum, k = 16.
//!
//! `cargo bench -p bitstack-benches --bench decompose`
//!
//! The randomized paths are measured with criterion. An exact thin SVD of a 4096×4096 matrix
//! takes tens of seconds (14336×4096: minutes on few cores), so the exact paths at those sizes
//! are timed once each, outside criterion, and printed next to the randomized time of the same
//! iteration count. Set `BITSTACK_BENCH_EXACT=0` to skip them, `=all` to include 14336×4096.

#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;
use std::time::{Duration, Instant};

use bitstack_benches::synthetic;
use bitstack_bits::Simd;
use bitstack_decompose::{
    decompose, decompose_planes, planes_matvec_add_q16, planes_matvec_add_with,
    planes_rows_to_dense_with, AvdParams, PlaneBlock, PlaneParams, PlaneTable, SvdMethod,
};
use criterion::{criterion_group, Criterion};

const K: usize = 16;

fn params(svd: SvdMethod, niter: usize) -> AvdParams {
    AvdParams {
        k: K,
        niter,
        svd,
        seed: 0,
    }
}

/// 512×1536 (small-llama's down_proj shape): exact and randomized, both with criterion.
fn small(c: &mut Criterion) {
    let (m, n) = (512, 1536);
    let w = synthetic(m, n, 1);
    let mut g = c.benchmark_group("avd_512x1536_k16_1iter");
    g.sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(4));
    for (name, svd) in [
        ("exact", SvdMethod::Exact),
        ("randomized", SvdMethod::default()),
    ] {
        g.bench_function(name, |b| {
            b.iter(|| decompose(black_box(&w), m, n, &params(svd, 1), None).unwrap())
        });
    }
    g.finish();
}

/// 4096×4096 and 14336×4096, randomized, 1 and 4 iterations.
fn large_randomized(c: &mut Criterion) {
    for (m, n) in [(4096, 4096), (14336, 4096)] {
        let w = synthetic(m, n, 2);
        let mut g = c.benchmark_group(format!("avd_{m}x{n}_k16"));
        g.sample_size(10)
            .warm_up_time(Duration::from_millis(500))
            .measurement_time(Duration::from_secs(8));
        for niter in [1, 4] {
            g.bench_function(format!("randomized_{niter}iter"), |b| {
                b.iter(|| {
                    decompose(
                        black_box(&w),
                        m,
                        n,
                        &params(SvdMethod::default(), niter),
                        None,
                    )
                    .unwrap()
                })
            });
        }
        g.finish();
    }
}

/// One timed run each of exact vs randomized, one iteration.
fn exact_single_shot() {
    let mode = std::env::var("BITSTACK_BENCH_EXACT").unwrap_or_default();
    if mode == "0" {
        return;
    }
    let mut shapes = vec![(4096, 4096)];
    if mode == "all" {
        shapes.push((14336, 4096));
    } else {
        println!("(set BITSTACK_BENCH_EXACT=all to also time the exact 14336×4096 iteration)");
    }
    for (m, n) in shapes {
        let w = synthetic(m, n, 2);
        let time = |svd| {
            let t = Instant::now();
            let d = decompose(&w, m, n, &params(svd, 1), None).unwrap();
            (t.elapsed().as_secs_f64(), d.rel_err[0])
        };
        let (te, ee) = time(SvdMethod::Exact);
        let (tr, er) = time(SvdMethod::default());
        println!(
            "avd_{m}x{n}_k16 1 iteration, single shot: exact {te:.2} s (rel_err {ee:.5}), \
             randomized {tr:.3} s (rel_err {er:.5}), speed-up {:.1}×",
            te / tr
        );
    }
}

/// Best mode's planes of a 4096² matrix (8 planes, groups of 128) through the runtime's
/// paths: the one-token product (8-bit tables of `x`, the AVX-512 code kernel, the AVX2 one,
/// and with `x` as two bytes: the VNNI code kernel where the CPU has it)
/// and the batch tile rebuild (one plane at a time, or all planes as codes), whole matrix
/// through one 256 kB tile.
fn planes(c: &mut Criterion) {
    let (m, n, group) = (4096, 4096, 128);
    let w = synthetic(m, n, 3);
    let d = decompose_planes(&w, m, n, &PlaneParams { group, planes: 8 }, None, None).unwrap();
    let planes: Vec<&PlaneBlock> = d.blocks.iter().collect();
    let x: Vec<f32> = (0..n).map(|i| ((i % 17) as f32 - 8.0) / 8.0).collect();
    let table = PlaneTable::new(&x, group);
    let mut y = vec![0.0f32; m];
    let mut g = c.benchmark_group("planes_4096x4096_8planes");
    g.sample_size(20);
    for (name, simd) in [
        ("matvec_tables", Simd::Portable),
        ("matvec_codes", Simd::Auto),
        ("matvec_codes_avx2", Simd::Avx2),
        ("matvec_codes_avx2_gfni", Simd::Avx2Gfni),
    ] {
        g.bench_function(name, |b| {
            b.iter(|| planes_matvec_add_with(&planes, &table, black_box(&mut y), simd))
        });
    }
    g.bench_function("matvec_codes_q16", |b| {
        b.iter(|| planes_matvec_add_q16(&planes, &table, black_box(&mut y)))
    });
    let rows = (1 << 16) / n;
    let mut tile = vec![0.0f32; rows * n];
    g.bench_function("tiles_per_plane", |b| {
        b.iter(|| {
            for row0 in (0..m).step_by(rows) {
                tile.fill(0.0);
                for p in &planes {
                    p.add_rows_to_dense(row0, black_box(&mut tile));
                }
            }
        })
    });
    for (name, simd) in [
        ("tiles_codes", Simd::Auto),
        ("tiles_codes_avx2", Simd::Avx2),
        ("tiles_codes_avx2_gfni", Simd::Avx2Gfni),
    ] {
        g.bench_function(name, |b| {
            b.iter(|| {
                for row0 in (0..m).step_by(rows) {
                    tile.fill(0.0);
                    planes_rows_to_dense_with(&planes, row0, black_box(&mut tile), simd);
                }
            })
        });
    }
    g.finish();
}

criterion_group!(benches, small, large_randomized, planes);

fn main() {
    benches();
    // `cargo bench -- <filter>`: only run the single-shot timings without a filter or with
    // one that names them.
    let filter = std::env::args().skip(1).find(|a| !a.starts_with('-'));
    if filter
        .as_deref()
        .is_none_or(|f| "exact_single_shot".contains(f))
    {
        exact_single_shot();
    }
    Criterion::default().configure_from_args().final_summary();
}
