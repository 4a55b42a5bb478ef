//! The 8-bit-`z` decode kernel (`lowrank_matvec_add_i8`): the tile (AMX) version against the
//! portable one (exactly equal, on one thread and on several: same rounding, same integer
//! sums, same f32 operations in the same order), and both against the exact product computed
//! in f64 (within the rounding bound `lowrank_i8_error_bounds`, plus f32 rounding of the
//! sums: `1e-5 · Σ|u|·Σ|v·x|`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use bitstack_bits::{
    lowrank_i8_accelerated, lowrank_i8_error_bounds, lowrank_matvec_add_i8, Parallelism, Simd,
};
use proptest::prelude::*;

mod common;
use common::{assert_nan_propagates, block, exact, refs, spread_x, Parts};

fn check(parts: &[Parts], x: &[f32], m: usize) -> Result<(), TestCaseError> {
    let blocks = refs(parts);
    let (want, slack) = exact(parts, x, m);
    let run = |par, simd| {
        let mut y = vec![0.25f32; m];
        lowrank_matvec_add_i8(&blocks, x, &mut y, par, simd);
        y
    };
    let portable = run(Parallelism::Sequential, Simd::Portable);
    let bounds = lowrank_i8_error_bounds(&blocks, x);
    for r in 0..m {
        let bound = bounds[r] + slack[r] + 1e-6;
        let err = (f64::from(portable[r]) - 0.25 - want[r]).abs();
        prop_assert!(err <= bound, "row {r}: error {err} over the bound {bound}");
    }
    for simd in Simd::ALL {
        for par in [Parallelism::Sequential, Parallelism::Auto] {
            let same = run(par, simd);
            prop_assert_eq!(&same, &portable, "{:?}, {:?}", simd, par);
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// Random shapes (columns not a multiple of 8, 16 or 256; rows not of 16), `k` from 1 to
    /// 32, 1 to 16 blocks of different `k`.
    #[test]
    fn i8_matches_portable_and_stays_within_its_bound(
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

/// Shapes large enough for several threads and chunks (rows not a multiple of 32, columns
/// of 64 or not, ranks over 16: two passes), with zero and tiny columns in `x`.
#[test]
fn i8_large_shapes_and_threads() {
    for (m, n, k) in [
        (300, 1040, 16),
        (520, 200, 8),
        (64, 2048, 32),
        (100, 512, 20),
    ] {
        let parts = vec![block(m, n, k, 1), block(m, n, k, 2)];
        check(&parts, &spread_x(n), m).unwrap();
    }
}

/// A non-finite input gives a non-finite output, as the exact product does.
#[test]
fn i8_propagates_nan() {
    assert_nan_propagates(lowrank_matvec_add_i8);
}

/// Reports (in the test output) which version ran, so a CI log shows whether the
/// tile version was checked.
#[test]
fn i8_reports_its_version() {
    eprintln!(
        "tile (AMX) i8 kernel: {}",
        lowrank_i8_accelerated(Simd::Auto)
    );
}
