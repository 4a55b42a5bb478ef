//! The 8-bit-table decode kernel (`lowrank_matvec_add_q8`): the vectorized versions
//! (AVX-512 with `Simd::Auto` / `Avx512`, AVX2 with `Simd::Avx2` / `Avx2Gfni`) against
//! the portable one (exactly equal on one thread: same rounding, same order), and both
//! against the exact product computed in f64 (within the rounding bound
//! `lowrank_q8_error_bounds`, plus f32 rounding of the sums: `1e-5 · Σ|u|·Σ|v·x|`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use bitstack_bits::{
    lowrank_matvec_add_q8, lowrank_q8_error_bounds, lowrank_q8_vectorized, Parallelism, Simd,
};
use proptest::prelude::*;

mod common;
use common::{assert_nan_propagates, block, exact, refs, spread_x, Parts};

fn check(parts: &[Parts], x: &[f32], m: usize) -> Result<(), TestCaseError> {
    let blocks = refs(parts);
    let (want, slack) = exact(parts, x, m);
    let run = |par, simd| {
        let mut y = vec![0.25f32; m];
        lowrank_matvec_add_q8(&blocks, x, &mut y, par, simd);
        y
    };
    let portable = run(Parallelism::Sequential, Simd::Portable);
    let bounds = lowrank_q8_error_bounds(&blocks, x);
    for r in 0..m {
        let bound = bounds[r] + slack[r] + 1e-6;
        let err = (f64::from(portable[r]) - 0.25 - want[r]).abs();
        prop_assert!(err <= bound, "row {r}: error {err} over the bound {bound}");
    }
    for simd in Simd::ALL {
        let same = run(Parallelism::Sequential, simd);
        prop_assert_eq!(&same, &portable, "{:?} on one thread", simd);
        let threads = run(Parallelism::Auto, simd);
        for r in 0..m {
            let tol = 1e-5 * (slack[r] * 1e5).max(1.0);
            prop_assert!(
                (f64::from(threads[r]) - f64::from(portable[r])).abs() <= tol,
                "{:?} threaded, row {}: {} vs {}",
                simd,
                r,
                threads[r],
                portable[r]
            );
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// Random shapes (columns not a multiple of 8, 16 or 256; rows not of 16), `k` from 1 to
    /// 32, 1 to 16 blocks of different `k`.
    #[test]
    fn q8_matches_portable_and_stays_within_its_bound(
        m in 1usize..80,
        n in 1usize..700,
        ks in prop::collection::vec(1usize..=32, 1..=16),
        seed in any::<u64>(),
    ) {
        let parts: Vec<Parts> = ks
            .iter()
            .enumerate()
            .map(|(b, &k)| block(m, n, k, seed ^ (b as u64 * 7919)))
            .collect();
        let x: Vec<f32> = block(1, n, 1, seed ^ 5).2.iter().map(|h| h.to_f32()).collect();
        check(&parts, &x, m)?;
    }
}

/// Shapes large enough for every thread split, with zero and tiny columns in `x`: 1 to 4
/// blocks on pools of 2, 3 and 5 threads, so that the runs of `blocks × chunks` units
/// start and end inside blocks as well as at their edges, and one chunk of 1 or 3 blocks
/// goes to the row split.
#[test]
fn q8_large_shapes_and_threads() {
    for threads in [2, 3, 5] {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        for (m, n, k) in [
            (300, 1040, 16),
            (520, 200, 8),
            (64, 2048, 32),
            (1100, 520, 16),
        ] {
            for blocks in 1..=4 {
                let parts: Vec<Parts> = (0..blocks).map(|b| block(m, n, k, 1 + b)).collect();
                pool.install(|| check(&parts, &spread_x(n), m)).unwrap();
            }
        }
    }
}

/// A non-finite input gives a non-finite output, as the exact product does.
#[test]
fn q8_propagates_nan() {
    assert_nan_propagates(lowrank_matvec_add_q8);
}

/// Reports (in the test output) which version ran, so a CI log shows whether the
/// vectorized one was checked.
#[test]
fn q8_reports_its_version() {
    eprintln!(
        "vectorized q8 kernel: {}",
        lowrank_q8_vectorized(Simd::Auto)
    );
}
