//! Property tests: pack/unpack round trip and lookup-table kernels against the naive oracles.
//!
//! Tolerance: the kernels sum in different orders, so they agree to f32 rounding. We require
//! `|lut - naive| <= 1e-4 * max(1, Σ_c |z_c|)` per output (per column of `Z` for matmul).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use bitstack_bits::{lowrank_matvec_add, LowRankRef, Parallelism, SignMatrix, SignMatrixRef, Simd};
use half::f16;
use proptest::prelude::*;

const REL_TOL: f32 = 1e-4;

fn shape_and_values(max_m: usize, max_n: usize) -> impl Strategy<Value = (usize, usize, Vec<f32>)> {
    (1..=max_m, 1..=max_n).prop_flat_map(|(m, n)| {
        (
            Just(m),
            Just(n),
            prop::collection::vec(
                prop_oneof![
                    4 => -10.0f32..10.0,
                    1 => Just(0.0f32),
                    1 => Just(-0.0f32),
                ],
                m * n,
            ),
        )
    })
}

/// Sums of `|Z[:, j]|` for each of the `k` columns of a row-major `n×k` matrix.
fn abs_col_sums(z: &[f32], k: usize) -> Vec<f32> {
    let mut sums = vec![0.0f32; k];
    for row in z.chunks_exact(k) {
        sums.iter_mut().zip(row).for_each(|(s, v)| *s += v.abs());
    }
    sums
}

fn assert_close(lut: &[f32], naive: &[f32], k: usize, scale: &[f32]) {
    assert_eq!(lut.len(), naive.len());
    for (i, (a, b)) in lut.iter().zip(naive).enumerate() {
        let tol = REL_TOL * scale[i % k].max(1.0);
        assert!(
            (a - b).abs() <= tol,
            "output {i} (row {}, col {}): lut {a} vs naive {b}, tol {tol}",
            i / k,
            i % k
        );
    }
}

fn lcg_values(len: usize, seed: u64) -> Vec<f32> {
    let mut state = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..len)
        .map(|_| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn pack_unpack_round_trip((m, n, w) in shape_and_values(40, 70)) {
        let s = SignMatrix::from_signs_of(&w, m, n).unwrap();
        prop_assert_eq!(s.as_bytes().len(), bitstack_bits::packed_len(m, n));
        let unpacked = s.as_view().unpack();
        for (i, (&u, &x)) in unpacked.iter().zip(&w).enumerate() {
            let expected = if x >= 0.0 { 1.0 } else { -1.0 };
            prop_assert_eq!(u, expected, "index {}", i);
            prop_assert_eq!(s.as_view().sign(i / n, i % n), expected);
        }
        // Repacking the unpacked signs gives the same bytes; the bytes re-validate.
        let again = SignMatrix::from_signs_of(&unpacked, m, n).unwrap();
        prop_assert_eq!(&again, &s);
        let view = SignMatrixRef::new(s.as_bytes(), m, n).unwrap();
        prop_assert_eq!(view.to_owned_matrix(), s);
    }

    #[test]
    fn matvec_lut_matches_naive(
        (m, n, w) in shape_and_values(40, 300),
        seed in any::<u64>(),
    ) {
        let s = SignMatrix::from_signs_of(&w, m, n).unwrap();
        let z: Vec<f32> = lcg_values(n, seed).iter().map(|v| v * 3.0).collect();
        let mut naive = vec![f32::NAN; m];
        let mut lut = vec![f32::NAN; m];
        s.as_view().sign_matvec_naive(&z, &mut naive);
        s.as_view().sign_matvec_lut(&z, &mut lut);
        assert_close(&lut, &naive, 1, &abs_col_sums(&z, 1));
    }

    #[test]
    fn matmul_lut_matches_naive(
        (m, n, w) in shape_and_values(24, 300),
        k in 1usize..=32,
        seed in any::<u64>(),
    ) {
        let s = SignMatrix::from_signs_of(&w, m, n).unwrap();
        let z = lcg_values(n * k, seed);
        let mut naive = vec![f32::NAN; m * k];
        let mut lut = vec![f32::NAN; m * k];
        s.as_view().sign_matmul_naive(&z, k, &mut naive);
        s.as_view().sign_matmul_lut(&z, k, &mut lut);
        assert_close(&lut, &naive, k, &abs_col_sums(&z, k));
        // Column j of Y = S Z is S (column j of Z).
        let j = (seed % k as u64) as usize;
        let z_col: Vec<f32> = z.chunks_exact(k).map(|row| row[j]).collect();
        let mut y_col = vec![0.0; m];
        s.as_view().sign_matvec_naive(&z_col, &mut y_col);
        for r in 0..m {
            prop_assert_eq!(y_col[r], naive[r * k + j]);
        }
    }
}

/// Large enough to take the multithreaded path and several table ranges / tiles, with
/// rows that start mid-byte (n odd).
#[test]
fn large_unaligned_shapes_threaded_and_sequential() {
    for &(m, n) in &[(130usize, 8_203usize), (97, 16_400)] {
        let w = lcg_values(m * n, 7);
        let s = SignMatrix::from_signs_of(&w, m, n).unwrap();
        let v = s.as_view();
        let z = lcg_values(n, 11);
        let mut naive = vec![0.0; m];
        v.sign_matvec_naive(&z, &mut naive);
        let mut auto = vec![0.0; m];
        v.sign_matvec_lut_with(&z, &mut auto, Parallelism::Auto);
        let mut seq = vec![0.0; m];
        v.sign_matvec_lut_with(&z, &mut seq, Parallelism::Sequential);
        assert_eq!(
            auto, seq,
            "row splitting must not change the summation order"
        );
        assert_close(&auto, &naive, 1, &abs_col_sums(&z, 1));

        for k in [3usize, 16, 33] {
            let zz = lcg_values(n * k, k as u64);
            let mut naive = vec![0.0; m * k];
            v.sign_matmul_naive(&zz, k, &mut naive);
            let mut auto = vec![0.0; m * k];
            v.sign_matmul_lut_with(&zz, k, &mut auto, Parallelism::Auto);
            let mut seq = vec![0.0; m * k];
            v.sign_matmul_lut_with(&zz, k, &mut seq, Parallelism::Sequential);
            assert_eq!(auto, seq);
            assert_close(&auto, &naive, k, &abs_col_sums(&zz, k));
        }
    }
}

/// A random block `(S, u, v, x)` with `S` `m×n`, `u` `m×k`, `v` `k×n` (f16) and `x` of `n`.
fn lowrank_case(
    max_m: usize,
    max_n: usize,
    max_k: usize,
) -> impl Strategy<Value = (SignMatrix, Vec<f16>, Vec<f16>, usize, Vec<f32>)> {
    (1..=max_m, 1..=max_n, 1..=max_k, any::<u64>()).prop_map(|(m, n, k, seed)| {
        let signs = lcg_values(m * n, seed);
        let s = SignMatrix::from_signs_of(&signs, m, n).unwrap();
        let u = lcg_values(m * k, seed ^ 1)
            .into_iter()
            .map(f16::from_f32)
            .collect();
        let v = lcg_values(k * n, seed ^ 2)
            .into_iter()
            .map(f16::from_f32)
            .collect();
        let x = lcg_values(n, seed ^ 3).iter().map(|v| 10.0 * v).collect();
        (s, u, v, k, x)
    })
}

/// Per row, `Σ_c Σ_j |u[r, j]·v[j, c]·x[c]|`: the scale of the tolerance.
fn lowrank_scale(u: &[f16], v: &[f16], k: usize, x: &[f32]) -> Vec<f32> {
    let n = x.len();
    u.chunks_exact(k)
        .map(|ur| {
            (0..n)
                .map(|c| {
                    (0..k)
                        .map(|j| (ur[j].to_f32() * v[j * n + c].to_f32() * x[c]).abs())
                        .sum::<f32>()
                })
                .sum()
        })
        .collect()
}

/// Checks every implementation of `lowrank_matvec_add` against the naive oracle:
/// `|kernel - naive| <= 1e-5 · max(1, Σ_c Σ_j |u_rj v_jc x_c|)` per row (f32 rounding of
/// sums in a different order; `y` starts non-zero to check that the kernels add).
fn check_lowrank(s: &SignMatrix, u: &[f16], v: &[f16], k: usize, x: &[f32]) {
    const LOWRANK_TOL: f32 = 1e-5;
    let m = s.rows();
    let start: Vec<f32> = (0..m).map(|r| r as f32 * 0.25 - 1.0).collect();
    let mut want = start.clone();
    s.as_view().lowrank_matvec_add_naive(u, v, k, x, &mut want);
    let scale = lowrank_scale(u, v, k, x);
    for par in [Parallelism::Sequential, Parallelism::Auto] {
        for simd in Simd::ALL {
            let mut got = start.clone();
            s.as_view()
                .lowrank_matvec_add_with(u, v, k, x, &mut got, par, simd);
            for r in 0..m {
                let tol = LOWRANK_TOL * scale[r].max(1.0);
                assert!(
                    (got[r] - want[r]).abs() <= tol,
                    "{m}x{} k={k} {par:?} {simd:?} row {r}: {} vs naive {}, tol {tol}",
                    s.cols(),
                    got[r],
                    want[r]
                );
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    /// Random shapes (`n` rarely a multiple of 8 or 64, rows not a multiple of 4), `k` from
    /// 1 to 40 (past 32 the SIMD path hands over to the portable one).
    #[test]
    fn lowrank_matvec_matches_naive((s, u, v, k, x) in lowrank_case(37, 150, 40)) {
        check_lowrank(&s, &u, &v, k, &x);
    }
}

#[test]
fn lowrank_matvec_large_shapes() {
    // Several table chunks per row and both threads: aligned and unaligned columns.
    // Also more rows than one block of accumulators holds (2048 rows at k = 32, 1638 for the
    // portable k = 40).
    for (m, n, k, seed) in [
        (301, 2048, 16, 7u64),
        (130, 1539, 5, 8),
        (67, 3001, 32, 9),
        (2100, 70, 32, 10),
        (2100, 61, 40, 11),
        // One table chunk: the rows are split between the threads.
        (700, 512, 16, 12),
    ] {
        let s = SignMatrix::from_signs_of(&lcg_values(m * n, seed), m, n).unwrap();
        let u: Vec<f16> = lcg_values(m * k, seed ^ 1)
            .into_iter()
            .map(f16::from_f32)
            .collect();
        let v: Vec<f16> = lcg_values(k * n, seed ^ 2)
            .into_iter()
            .map(f16::from_f32)
            .collect();
        let x: Vec<f32> = lcg_values(n, seed ^ 3);
        check_lowrank(&s, &u, &v, k, &x);
    }
}

#[test]
fn lowrank_many_blocks_threaded_and_sequential() {
    // Blocks of different ranks applied in one call, large enough to be split across
    // threads: by column chunks (3077 columns) or, where the matrix is one chunk (512
    // columns), by whole blocks when there are blocks enough for the pool's threads, else by
    // rows; pools of 2, 3 and 5 threads.
    for threads in [2, 3, 5] {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        for (m, n) in [(203, 3077), (300, 512)] {
            for blocks in [1, 2, 3, 4] {
                pool.install(|| many_blocks(m, n, &[16, 3, 32, 9][..blocks]));
            }
        }
    }
}

fn many_blocks(m: usize, n: usize, ks: &[usize]) {
    let parts: Vec<(SignMatrix, Vec<f16>, Vec<f16>, usize)> = ks
        .iter()
        .enumerate()
        .map(|(b, &k)| {
            let seed = 40 + b as u64;
            let s = SignMatrix::from_signs_of(&lcg_values(m * n, seed), m, n).unwrap();
            let u = lcg_values(m * k, seed ^ 1)
                .into_iter()
                .map(f16::from_f32)
                .collect();
            let v = lcg_values(k * n, seed ^ 2)
                .into_iter()
                .map(f16::from_f32)
                .collect();
            (s, u, v, k)
        })
        .collect();
    let x = lcg_values(n, 99);
    let mut want = vec![0.5f32; m];
    let mut scale = vec![0.0f32; m];
    for (s, u, v, k) in &parts {
        s.as_view()
            .lowrank_matvec_add_naive(u, v, *k, &x, &mut want);
        scale
            .iter_mut()
            .zip(lowrank_scale(u, v, *k, &x))
            .for_each(|(a, b)| *a += b);
    }
    let blocks: Vec<LowRankRef<'_>> = parts
        .iter()
        .map(|(s, u, v, k)| LowRankRef {
            signs: s.as_view(),
            u,
            v,
            k: *k,
        })
        .collect();
    for par in [Parallelism::Sequential, Parallelism::Auto] {
        for simd in Simd::ALL {
            let mut got = vec![0.5f32; m];
            lowrank_matvec_add(&blocks, &x, &mut got, par, simd);
            for r in 0..m {
                let tol = 1e-5 * scale[r].max(1.0);
                assert!(
                    (got[r] - want[r]).abs() <= tol,
                    "{m}x{n}, {} blocks, {par:?} {simd:?} row {r}: {} vs {}",
                    ks.len(),
                    got[r],
                    want[r]
                );
            }
        }
    }
}
