//! Benchmarks of `bitstack-bits`: packing, and ±1 matrix products (naive vs lookup tables vs a
//! dense f32 product of the same shape).
//!
//! `cargo bench -p bitstack-benches --bench bits`

#![allow(missing_docs)]

use std::hint::black_box;
use std::time::Duration;

use bitstack_bits::{
    codes_matvec_add, codes_rows_to_dense, lowrank_matvec_add, lowrank_matvec_add_q8, CodeGrid,
    LowRankRef, Parallelism, SignLayout, SignMatrix, Simd, WeightedPlane,
};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use half::f16;

/// The kernel versions every decode bench compares: both threads, one thread with the best
/// SIMD, one thread with AVX2 (what CPUs without AVX-512 run; with GFNI where the CPU has it,
/// as recent ones do), one thread portable.
const VARIANTS: [(&str, Parallelism, Simd); 5] = [
    ("auto", Parallelism::Auto, Simd::Auto),
    ("simd_1thread", Parallelism::Sequential, Simd::Auto),
    ("avx2_1thread", Parallelism::Sequential, Simd::Avx2),
    ("avx2_gfni_1thread", Parallelism::Sequential, Simd::Avx2Gfni),
    ("portable_1thread", Parallelism::Sequential, Simd::Portable),
];

const M: usize = 4096;
const N: usize = 4096;
const K: usize = 16;

/// Deterministic pseudo-random values in `[-1, 1)`.
fn values(len: usize, seed: u64) -> Vec<f32> {
    let mut state = seed ^ 0x9e37_79b9_7f4a_7c15;
    (0..len)
        .map(|_| {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            ((state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

/// Dense row-major `y = W x`, eight accumulators so that it vectorizes. Single-threaded.
fn dense_matvec(w: &[f32], cols: usize, x: &[f32], y: &mut [f32]) {
    for (row, out) in w.chunks_exact(cols).zip(y.iter_mut()) {
        let mut acc = [0.0f32; 8];
        let mut row_chunks = row.chunks_exact(8);
        let mut x_chunks = x.chunks_exact(8);
        for (r, v) in (&mut row_chunks).zip(&mut x_chunks) {
            for j in 0..8 {
                acc[j] += r[j] * v[j];
            }
        }
        let mut sum: f32 = acc.iter().sum();
        for (r, v) in row_chunks.remainder().iter().zip(x_chunks.remainder()) {
            sum += r * v;
        }
        *out = sum;
    }
}

fn configure(c: &mut Criterion) -> Criterion {
    std::mem::take(c)
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
}

fn bench_pack(c: &mut Criterion) {
    let w = values(M * N, 1);
    let mut group = c.benchmark_group("bits/pack_4096x4096");
    group.throughput(Throughput::Elements((M * N) as u64));
    group.bench_function("from_signs_of", |b| {
        b.iter(|| SignMatrix::from_signs_of(black_box(&w), M, N))
    });
    let s = SignMatrix::from_signs_of(&w, M, N).unwrap_or_else(|e| panic!("{e}"));
    let mut out = vec![0.0f32; M * N];
    group.bench_function("unpack_into", |b| {
        b.iter(|| s.as_view().unpack_into(black_box(&mut out)))
    });
    group.finish();
}

fn bench_matvec(c: &mut Criterion) {
    let w = values(M * N, 2);
    let s = SignMatrix::from_signs_of(&w, M, N).unwrap_or_else(|e| panic!("{e}"));
    let v = s.as_view();
    let z = values(N, 3);
    let mut y = vec![0.0f32; M];
    let mut group = c.benchmark_group("bits/matvec_4096x4096");
    group.throughput(Throughput::Elements((M * N) as u64));
    group.bench_function("sign_naive", |b| {
        b.iter(|| v.sign_matvec_naive(black_box(&z), black_box(&mut y)))
    });
    group.bench_function("sign_lut_1thread", |b| {
        b.iter(|| v.sign_matvec_lut_with(black_box(&z), black_box(&mut y), Parallelism::Sequential))
    });
    group.bench_function("sign_lut_auto", |b| {
        b.iter(|| v.sign_matvec_lut(black_box(&z), black_box(&mut y)))
    });
    group.bench_function("dense_f32_1thread", |b| {
        b.iter(|| dense_matvec(black_box(&w), N, black_box(&z), black_box(&mut y)))
    });
    group.finish();
}

fn bench_matmul(c: &mut Criterion) {
    let w = values(M * N, 4);
    let s = SignMatrix::from_signs_of(&w, M, N).unwrap_or_else(|e| panic!("{e}"));
    let v = s.as_view();
    let z = values(N * K, 5);
    let mut y = vec![0.0f32; M * K];
    let mut group = c.benchmark_group("bits/matmul_4096x4096_k16");
    group.throughput(Throughput::Elements((M * N * K) as u64));
    group.bench_function("sign_naive", |b| {
        b.iter(|| v.sign_matmul_naive(black_box(&z), K, black_box(&mut y)))
    });
    group.bench_function("sign_lut_1thread", |b| {
        b.iter(|| {
            v.sign_matmul_lut_with(black_box(&z), K, black_box(&mut y), Parallelism::Sequential)
        })
    });
    group.bench_function("sign_lut_auto", |b| {
        b.iter(|| v.sign_matmul_lut(black_box(&z), K, black_box(&mut y)))
    });
    group.finish();
}

/// The decode product of a matrix of 4 residual blocks (`k = 16`): `y += Σ_b (S_b ⊙ u_b v_b) x`.
fn bench_decode(c: &mut Criterion) {
    const BLOCKS: usize = 4;
    let halves = |len: usize, seed: u64| -> Vec<f16> {
        values(len, seed).into_iter().map(f16::from_f32).collect()
    };
    let parts: Vec<(SignMatrix, Vec<f16>, Vec<f16>)> = (0..BLOCKS as u64)
        .map(|b| {
            let s = SignMatrix::from_signs_of(&values(M * N, 10 + b), M, N)
                .unwrap_or_else(|e| panic!("{e}"));
            (s, halves(M * K, 20 + b), halves(K * N, 30 + b))
        })
        .collect();
    let blocks: Vec<LowRankRef<'_>> = parts
        .iter()
        .map(|(s, u, v)| LowRankRef {
            signs: s.as_view(),
            u,
            v,
            k: K,
        })
        .collect();
    let x = values(N, 6);
    let mut y = vec![0.0f32; M];
    let mut group = c.benchmark_group("bits/decode_4096x4096_k16_4blocks");
    group.throughput(Throughput::Elements((BLOCKS * M * N) as u64));
    for (name, par, simd) in VARIANTS {
        group.bench_function(name, |b| {
            b.iter(|| lowrank_matvec_add(&blocks, black_box(&x), black_box(&mut y), par, simd))
        });
    }
    // 8-bit tables: the vectorized version (AVX-512 VBMI and VNNI) where the CPU has it, the
    // portable one (the oracle) otherwise.
    for (name, par) in [
        ("q8_auto", Parallelism::Auto),
        ("q8_1thread", Parallelism::Sequential),
    ] {
        group.bench_function(name, |b| {
            b.iter(|| {
                lowrank_matvec_add_q8(&blocks, black_box(&x), black_box(&mut y), par, Simd::Auto)
            })
        });
    }
    // The same with the signs in strips, as the runtime holds loaded blocks.
    let striped: Vec<SignMatrix> = parts
        .iter()
        .map(|(s, _, _)| {
            s.clone()
                .into_layout(SignLayout::Strips)
                .unwrap_or_else(|e| panic!("{e}"))
        })
        .collect();
    let strip_blocks: Vec<LowRankRef<'_>> = striped
        .iter()
        .zip(&parts)
        .map(|(s, (_, u, v))| LowRankRef {
            signs: s.as_view(),
            u,
            v,
            k: K,
        })
        .collect();
    for (name, par) in [
        ("q8_strips_auto", Parallelism::Auto),
        ("q8_strips_1thread", Parallelism::Sequential),
    ] {
        group.bench_function(name, |b| {
            b.iter(|| {
                lowrank_matvec_add_q8(
                    &strip_blocks,
                    black_box(&x),
                    black_box(&mut y),
                    par,
                    Simd::Auto,
                )
            })
        });
    }
    group.finish();
}

/// The code kernel of 8 nested bit planes (groups of 128) against a dense f32 product of the
/// same shape: a 4096² matrix and small-llama's shapes (MLP, attention, lm_head).
fn bench_codes(c: &mut Criterion) {
    const PLANES: usize = 8;
    for (m, n) in [(M, N), (1536, 512), (512, 512), (256, 512), (8192, 512)] {
        let bits: Vec<SignMatrix> = (0..PLANES as u64)
            .map(|p| {
                SignMatrix::from_signs_of(&values(m * n, 40 + p), m, n)
                    .unwrap_or_else(|e| panic!("{e}"))
            })
            .collect();
        let planes: Vec<WeightedPlane<'_>> = bits
            .iter()
            .enumerate()
            .map(|(p, b)| WeightedPlane {
                bits: b.as_view(),
                weight: 128u8 >> p,
            })
            .collect();
        let scales: Vec<f16> = values(m * n.div_ceil(128), 7)
            .into_iter()
            .map(|v| f16::from_f32(v.abs()))
            .collect();
        let offsets: Vec<f16> = values(m * n.div_ceil(128), 10)
            .into_iter()
            .map(f16::from_f32)
            .collect();
        let grid = CodeGrid {
            group: 128,
            scales: &scales,
            offsets: Some(&offsets),
            scale: 1.0 / 256.0,
            shift: -1.0,
        };
        let x = values(n, 8);
        let w = values(m * n, 9);
        let mut y = vec![0.0f32; m];
        let mut group = c.benchmark_group(format!("bits/codes_{m}x{n}_8planes"));
        group.throughput(Throughput::Elements((m * n) as u64));
        // With AVX-512 but without GFNI as well (Skylake-X to Cascade Lake).
        let avx512 = ("avx512_1thread", Parallelism::Sequential, Simd::Avx512);
        for (name, par, simd) in VARIANTS.into_iter().chain([avx512]) {
            group.bench_function(name, |b| {
                b.iter(|| {
                    codes_matvec_add(&planes, &grid, black_box(&x), black_box(&mut y), par, simd)
                })
            });
        }
        group.bench_function("dense_f32_1thread", |b| {
            b.iter(|| dense_matvec(&w, n, black_box(&x), black_box(&mut y)))
        });
        if (m, n) == (M, N) {
            // The batch product's tile rebuild: the whole matrix through one 256 kB tile.
            let rows = (1 << 16) / n;
            let mut tile = vec![0.0f32; rows * n];
            for (name, simd) in [
                ("tiles_simd_1thread", Simd::Auto),
                ("tiles_avx512_1thread", Simd::Avx512),
                ("tiles_avx2_1thread", Simd::Avx2),
                ("tiles_avx2_gfni_1thread", Simd::Avx2Gfni),
                ("tiles_portable_1thread", Simd::Portable),
            ] {
                group.bench_function(name, |b| {
                    b.iter(|| {
                        for row0 in (0..m).step_by(rows) {
                            tile.fill(0.0);
                            codes_rows_to_dense(&planes, &grid, row0, black_box(&mut tile), simd);
                        }
                    })
                });
            }
        }
        group.finish();
    }
}

fn benches(c: &mut Criterion) {
    let mut c = configure(c);
    bench_pack(&mut c);
    bench_matvec(&mut c);
    bench_matmul(&mut c);
    bench_decode(&mut c);
    bench_codes(&mut c);
}

criterion_group!(bits, benches);
criterion_main!(bits);
