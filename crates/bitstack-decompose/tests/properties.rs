//! Property tests: block arithmetic, error reporting, significance weights, input validation.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use bitstack_bits::{packed_len, SignMatrix};
use bitstack_decompose::{
    decompose, AvdBlock, AvdParams, DecomposeError, Decomposition, SvdMethod,
};
use half::f16;
use proptest::prelude::*;
use rand::{Rng, SeedableRng};

/// A reproducible matrix with a spread of magnitudes and some exact zeros.
fn matrix(rows: usize, cols: usize, seed: u64) -> Vec<f32> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let row_scale: Vec<f32> = (0..rows).map(|_| rng.random_range(0.2f32..2.0)).collect();
    let col_scale: Vec<f32> = (0..cols).map(|_| rng.random_range(0.2f32..2.0)).collect();
    (0..rows * cols)
        .map(|i| {
            if rng.random_range(0..50) == 0 {
                0.0
            } else {
                rng.random_range(-1.0f32..1.0) * row_scale[i / cols] * col_scale[i % cols]
            }
        })
        .collect()
}

fn frob_diff(a: &[f32], b: &[f32]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(&x, &y)| (f64::from(x) - f64::from(y)).powi(2))
        .sum::<f64>()
        .sqrt()
}

fn frob(a: &[f32]) -> f64 {
    a.iter().map(|&x| f64::from(x).powi(2)).sum::<f64>().sqrt()
}

fn exact(k: usize, niter: usize) -> AvdParams {
    AvdParams {
        k,
        niter,
        svd: SvdMethod::Exact,
        seed: 0,
    }
}

fn random_block(rows: usize, cols: usize, k: usize, seed: u64) -> AvdBlock {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let signs = matrix(rows, cols, seed ^ 0xABCD);
    let signs = SignMatrix::from_signs_of(&signs, rows, cols).unwrap();
    let mut f = |len| -> Vec<f16> {
        (0..len)
            .map(|_| f16::from_f32(rng.random_range(-1.0f32..1.0)))
            .collect()
    };
    let (u, v) = (f(rows * k), f(k * cols));
    AvdBlock::from_parts(signs, u, v, k).unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 48,
        failure_persistence: Some(Box::new(
            proptest::test_runner::FileFailurePersistence::WithSource("regressions"),
        )),
        ..ProptestConfig::default()
    })]

    /// `matvec_add` (sign products, no dense block) agrees with `add_to_dense` then a dense
    /// matrix–vector product.
    #[test]
    fn matvec_matches_dense(rows in 1usize..40, cols in 1usize..40, k in 1usize..6, seed: u64) {
        let block = random_block(rows, cols, k, seed);
        let mut w = vec![0.0f32; rows * cols];
        block.add_to_dense(&mut w);
        let x = matrix(1, cols, seed.wrapping_add(1));
        let y0 = matrix(1, rows, seed.wrapping_add(2));
        let mut y = y0.clone();
        block.matvec_add(&x, &mut y);
        for i in 0..rows {
            let dense: f32 = (0..cols).map(|j| w[i * cols + j] * x[j]).sum::<f32>() + y0[i];
            let scale: f32 = (0..cols).map(|j| (w[i * cols + j] * x[j]).abs()).sum::<f32>() + y0[i].abs() + 1.0;
            prop_assert!((dense - y[i]).abs() <= 1e-4 * scale, "row {i}: {dense} vs {}", y[i]);
        }
        // add_to_dense adds (does not overwrite).
        let mut twice = w.clone();
        block.add_to_dense(&mut twice);
        for (a, b) in twice.iter().zip(&w) {
            prop_assert!((a - 2.0 * b).abs() <= 1e-5 * b.abs().max(1.0));
        }
    }

    /// `add_rows_to_dense` (fused 64-column blocks plus 8-column remainders with byte-wise
    /// sign XORs, or the per-bit path when cols is not a multiple of 8) equals the rows of
    /// `add_to_dense`, for every tile of rows; tolerance 1e-5 relative.
    #[test]
    fn row_tiles_match_add_to_dense(rows in 1usize..40, cols in 1usize..150, k in 1usize..33, tile in 1usize..9, seed: u64) {
        let k = k.min(rows).min(cols);
        let block = random_block(rows, cols, k, seed);
        let mut want = matrix(rows, cols, seed.wrapping_add(3));
        let start = want.clone();
        block.add_to_dense(&mut want);
        let mut r0 = 0;
        while r0 < rows {
            let r1 = (r0 + tile).min(rows);
            let mut got = start[r0 * cols..r1 * cols].to_vec();
            block.add_rows_to_dense(r0, &mut got);
            for (i, (g, w)) in got.iter().zip(&want[r0 * cols..r1 * cols]).enumerate() {
                prop_assert!((g - w).abs() <= 1e-5 * (1.0 + w.abs() + k as f32), "rows {r0}..{r1} elt {i}: {g} vs {w}");
            }
            r0 = r1;
        }
    }

    /// A block with its signs in strips (as the runtime loads it) rebuilds exactly the same
    /// values as the row-major block: whole, by tiles of rows, and in its products.
    #[test]
    fn strip_layout_rebuilds_the_same(rows in 1usize..40, strips in 1usize..3, k in 1usize..17, tile in 1usize..9, seed: u64) {
        let cols = strips * bitstack_bits::STRIP_COLS;
        let block = random_block(rows, cols, k, seed);
        let striped = block.clone().into_sign_layout(bitstack_bits::SignLayout::Strips).unwrap();
        prop_assert_eq!(striped.signs().layout(), bitstack_bits::SignLayout::Strips);
        let start = matrix(rows, cols, seed.wrapping_add(5));
        let (mut a, mut b) = (start.clone(), start.clone());
        block.add_to_dense(&mut a);
        striped.add_to_dense(&mut b);
        prop_assert_eq!(&a, &b);
        let mut r0 = 0;
        while r0 < rows {
            let r1 = (r0 + tile).min(rows);
            let mut x = start[r0 * cols..r1 * cols].to_vec();
            let mut y = x.clone();
            block.add_rows_to_dense(r0, &mut x);
            striped.add_rows_to_dense(r0, &mut y);
            prop_assert_eq!(x, y, "rows {}..{}", r0, r1);
            r0 = r1;
        }
        let x: Vec<f32> = (0..cols).map(|c| ((c % 13) as f32 - 6.0) / 6.0).collect();
        let (mut ya, mut yb) = (vec![0.0f32; rows], vec![0.0f32; rows]);
        block.matvec_add(&x, &mut ya);
        striped.matvec_add(&x, &mut yb);
        prop_assert_eq!(ya, yb);
    }

    #[test]
    fn byte_size_formula(rows in 0usize..5000, cols in 0usize..5000, k in 0usize..64) {
        let expected = (rows * cols).div_ceil(8) as u64 + 2 * (k * (rows + cols)) as u64;
        prop_assert_eq!(AvdBlock::byte_size(rows, cols, k), expected);
        prop_assert_eq!(AvdBlock::byte_size(rows, cols, k),
            packed_len(rows, cols) as u64 + 2 * (rows * k + k * cols) as u64);
    }

    /// Exact AVD: each block lowers the error, and `rel_err` is the error of the stored
    /// (f16) blocks' reconstruction.
    #[test]
    fn exact_error_decreases_and_is_reported(rows in 4usize..40, cols in 4usize..40, seed: u64) {
        let k = 1 + (seed as usize) % 2;
        let w = matrix(rows, cols, seed);
        let dec = decompose(&w, rows, cols, &exact(k, 6), None).unwrap();
        prop_assert_eq!(dec.blocks.len(), 6);
        prop_assert!(dec.rel_err[0] < 1.0);
        for p in dec.rel_err.windows(2) {
            prop_assert!(p[1] <= p[0] * (1.0 + 1e-3) + 1e-4, "{:?}", dec.rel_err);
        }
        for b in 1..=6 {
            let direct = frob_diff(&w, &dec.reconstruct(b)) / frob(&w);
            prop_assert!((direct - dec.rel_err[b - 1]).abs() <= 1e-4 * (1.0 + direct), "b={b}: {direct} vs {}", dec.rel_err[b - 1]);
        }
    }

    /// Decomposing with weights `s` is decomposing `W·diag(s)`, with `v` returned divided by
    /// `s`: same signs and `u`, `v_weighted·diag(s) ≈ v_plain`, same reported errors.
    #[test]
    fn significance_round_trip(rows in 3usize..30, cols in 3usize..30, seed: u64) {
        let w = matrix(rows, cols, seed);
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ 7);
        let s: Vec<f32> = (0..cols).map(|_| rng.random_range(0.25f32..4.0)).collect();
        let ws: Vec<f32> = w.iter().enumerate().map(|(i, x)| x * s[i % cols]).collect();
        let params = exact(2.min(rows.min(cols)), 4);
        let weighted = decompose(&w, rows, cols, &params, Some(&s)).unwrap();
        let plain = decompose(&ws, rows, cols, &params, None).unwrap();
        for (bw, bp) in weighted.blocks.iter().zip(&plain.blocks) {
            prop_assert_eq!(bw.signs(), bp.signs());
            prop_assert_eq!(bw.u(), bp.u());
            for (idx, (hw, hp)) in bw.v().iter().zip(bp.v()).enumerate() {
                let back = hw.to_f32() * s[idx % cols];
                prop_assert!((back - hp.to_f32()).abs() <= 2e-3 * hp.to_f32().abs() + 1e-6,
                    "{back} vs {}", hp);
            }
        }
        // The reconstruction in original coordinates, weighted, is the plain one.
        let rw: Vec<f32> = weighted.reconstruct(4).iter().enumerate().map(|(i, x)| x * s[i % cols]).collect();
        let rp = plain.reconstruct(4);
        prop_assert!(frob_diff(&rw, &rp) <= 3e-3 * frob(&rp) + 1e-6);
        for (a, b) in weighted.rel_err.iter().zip(&plain.rel_err) {
            // Both are errors relative to ‖W·D‖; the runs differ only by f16 rounding of v.
            prop_assert!((a - b).abs() <= 3e-3, "{a} vs {b}");
        }
        // rel_err is the weighted-norm error of the returned blocks.
        let direct = frob_diff(&ws, &rw) / frob(&ws);
        prop_assert!((direct - weighted.rel_err[3]).abs() <= 1e-4 * (1.0 + direct));
    }

    /// The first non-finite weight is named.
    #[test]
    fn non_finite_weights_are_rejected(rows in 1usize..20, cols in 1usize..20, pos in any::<prop::sample::Index>(), which in 0usize..3) {
        let mut w = matrix(rows, cols, 1);
        let index = pos.index(rows * cols);
        let bad = [f32::NAN, f32::INFINITY, f32::NEG_INFINITY][which];
        w[index] = bad;
        if index + 1 < w.len() {
            w[rows * cols - 1] = f32::NAN;
        }
        match decompose(&w, rows, cols, &exact(1, 1), None) {
            Err(DecomposeError::NonFinite { index: i, row, col, .. }) => {
                prop_assert_eq!(i, index);
                prop_assert_eq!((row, col), (index / cols, index % cols));
            }
            other => prop_assert!(false, "unexpected {:?}", other.map(|d| d.rel_err)),
        }
    }
}

#[test]
fn randomized_is_deterministic_and_close_to_exact() {
    let (rows, cols) = (96, 64);
    let w = matrix(rows, cols, 5);
    let fast = AvdParams {
        k: 4,
        niter: 8,
        svd: SvdMethod::default(),
        seed: 3,
    };
    let a = decompose(&w, rows, cols, &fast, None).unwrap();
    let b = decompose(&w, rows, cols, &fast, None).unwrap();
    assert_eq!(a, b);
    let e = decompose(&w, rows, cols, &exact(4, 8), None).unwrap();
    let ratio = a.rel_err[7] / e.rel_err[7];
    assert!(ratio < 1.02, "fast/exact = {ratio}");
}

#[test]
fn parameter_and_shape_errors() {
    let w = matrix(6, 4, 0);
    let is = |r: Result<Decomposition, DecomposeError>, f: fn(&DecomposeError) -> bool| {
        let e = r.expect_err("expected an error");
        assert!(f(&e), "wrong error: {e}");
        assert!(!e.to_string().is_empty());
    };
    is(decompose(&w, 6, 5, &exact(1, 1), None), |e| {
        matches!(e, DecomposeError::ShapeMismatch { len: 24, .. })
    });
    is(decompose(&w, usize::MAX, 2, &exact(1, 1), None), |e| {
        matches!(e, DecomposeError::ShapeMismatch { .. })
    });
    is(decompose(&w, 6, 4, &exact(0, 1), None), |e| {
        matches!(e, DecomposeError::InvalidRank { k: 0, .. })
    });
    is(decompose(&w, 6, 4, &exact(5, 1), None), |e| {
        matches!(e, DecomposeError::InvalidRank { k: 5, .. })
    });
    is(decompose(&w, 6, 4, &exact(1, 0), None), |e| {
        matches!(e, DecomposeError::ZeroIterations)
    });
    is(decompose(&w, 6, 4, &exact(1, 1), Some(&[1.0; 3])), |e| {
        matches!(
            e,
            DecomposeError::ChannelWeightsLength {
                expected: 4,
                got: 3
            }
        )
    });
    for bad in [0.0, -1.0, f32::NAN, f32::INFINITY] {
        is(
            decompose(&w, 6, 4, &exact(1, 1), Some(&[1.0, 1.0, bad, 1.0])),
            |e| matches!(e, DecomposeError::InvalidChannelWeight { index: 2, .. }),
        );
    }
    // k = min(rows, cols) is allowed, also for the randomized SVD (sketch clamped).
    let fast = AvdParams {
        k: 4,
        niter: 2,
        ..AvdParams::default()
    };
    decompose(&w, 6, 4, &fast, None).unwrap();
}

#[test]
fn zero_matrix_has_zero_error() {
    let w = vec![0.0f32; 12];
    let dec = decompose(&w, 3, 4, &exact(2, 3), None).unwrap();
    assert_eq!(dec.rel_err, vec![0.0; 3]);
    assert!(dec.reconstruct(3).iter().all(|&x| x == 0.0));
    // sign(0) = +1
    assert!(dec.blocks[0].signs().get(1, 2));
}

#[test]
fn from_parts_validates_lengths() {
    let signs = SignMatrix::from_signs_of(&[1.0; 6], 2, 3).unwrap();
    let h = |n| vec![f16::ONE; n];
    assert!(AvdBlock::from_parts(signs.clone(), h(4), h(6), 2).is_ok());
    assert!(matches!(
        AvdBlock::from_parts(signs.clone(), h(3), h(6), 2),
        Err(DecomposeError::FactorLength {
            factor: "u",
            expected: 4,
            got: 3,
            ..
        })
    ));
    assert!(matches!(
        AvdBlock::from_parts(signs.clone(), h(4), h(5), 2),
        Err(DecomposeError::FactorLength {
            factor: "v",
            expected: 6,
            got: 5,
            ..
        })
    ));
    assert!(matches!(
        AvdBlock::from_parts(signs, h(0), h(0), 0),
        Err(DecomposeError::InvalidRank { k: 0, .. })
    ));
}

#[test]
fn factor_overflow_is_an_error() {
    // Values ~1e6: u and v are ~1e3·sqrt(n) — fine; 1e10 overflows f16.
    let w = vec![1e10f32; 16];
    assert!(matches!(
        decompose(&w, 4, 4, &exact(1, 1), None),
        Err(DecomposeError::FactorOverflow { block: 0, .. })
    ));
}
