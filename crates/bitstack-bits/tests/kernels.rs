//! Property tests: pack/unpack round trip and lookup-table kernels against the naive oracles.
//!
//! Tolerance: the kernels sum in different orders, so they agree to f32 rounding. We require
//! `|lut - naive| <= 1e-4 * max(1, Σ_c |z_c|)` per output (per column of `Z` for matmul).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use bitstack_bits::{Parallelism, SignMatrix, SignMatrixRef};
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
