//! Bit-plane blocks against independent oracles: the error bound of successive
//! approximation, dense reconstructions (for the packed matrix-vector product and the row
//! tiles) and a direct computation of the weighted errors.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use bitstack_bits::Simd;
use bitstack_decompose::{
    decompose_planes, planes_matvec_add_with, planes_rows_to_dense_with, PlaneBlock, PlaneGrid,
    PlaneParams, PlaneTable,
};
use proptest::prelude::*;

/// `Σ Δ` of `planes` rebuilt `tile` rows at a time with [`planes_rows_to_dense_with`].
fn rebuilt_in_tiles(
    planes: &[&PlaneBlock],
    rows: usize,
    cols: usize,
    tile: usize,
    simd: Simd,
) -> Vec<f32> {
    let mut out = vec![0.0f32; rows * cols];
    for (t, chunk) in out.chunks_mut(tile * cols).enumerate() {
        planes_rows_to_dense_with(planes, t * tile, chunk, simd);
    }
    out
}

/// The rebuilt weights against the sum of the planes' own reconstructions: equal up to f32
/// rounding of terms no larger than `|mid| + 2·half` of the weight's group.
fn check_rebuilt(got: &[f32], want: &[f32], grid: &PlaneGrid, cols: usize) -> Result<(), String> {
    let groups = cols.div_ceil(grid.group());
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let at = (i / cols) * groups + (i % cols) / grid.group();
        let size = grid.mid()[at].to_f32().abs() + 2.0 * grid.half()[at].to_f32();
        if (g - w).abs() > 4e-6 * size + 1e-7 {
            return Err(format!("weight {i}: {g} vs {w}"));
        }
    }
    Ok(())
}

fn matrix(rows: usize, cols: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
    (0..rows * cols)
        .map(|i| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            // Heavy-ish tails and a per-row offset, like real weights.
            let u = (s >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
            u * u * u * 8.0 + 0.01 * (i / cols) as f32
        })
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn planes_match_their_oracles(
        rows in 1usize..20,
        cols in 1usize..70,
        group in prop::sample::select(vec![8usize, 16, 24, 64]),
        planes in 1usize..9,
        seed in any::<u64>(),
    ) {
        let w = matrix(rows, cols, seed);
        let rw: Vec<f32> = (0..rows).map(|r| 1.0 + r as f32).collect();
        let cw: Vec<f32> = (0..cols).map(|c| 0.5 + (c % 3) as f32).collect();
        let d = decompose_planes(&w, rows, cols, &PlaneParams { group, planes }, Some(&rw), Some(&cw)).unwrap();
        prop_assert_eq!(d.blocks.len(), planes);
        let groups = cols.div_ceil(group);
        let x: Vec<f32> = (0..cols).map(|j| ((j * 5 % 11) as f32 - 5.0) / 5.0).collect();
        let table = PlaneTable::new(&x, group);
        let mut dense = vec![0.0f32; rows * cols];
        let mut y = vec![0.0f32; rows];
        for (p, block) in d.blocks.iter().enumerate() {
            block.add_to_dense(&mut dense);
            block.matvec_add_with(&table, &mut y);
            // Successive approximation: within half·2^-(p+1) of every weight.
            let mut sq = 0.0f64;
            for r in 0..rows {
                for c in 0..cols {
                    let h = d.grid.half()[r * groups + c / group].to_f32();
                    let e = (w[r * cols + c] - dense[r * cols + c]).abs();
                    prop_assert!(e <= h * 0.5f32.powi(p as i32 + 1) * 1.0001 + 1e-6);
                    sq += f64::from(rw[r]) * f64::from(cw[c]) * f64::from(w[r * cols + c] - dense[r * cols + c]).powi(2);
                }
            }
            prop_assert!((sq - d.sq_err[p]).abs() <= 1e-9 * d.sq_norm.max(1e-30) + 1e-12);
            // Packed product = dense product.
            for r in 0..rows {
                let row = &dense[r * cols..(r + 1) * cols];
                let want: f32 = row.iter().zip(&x).map(|(a, b)| a * b).sum();
                let mag: f32 = row.iter().zip(&x).map(|(a, b)| (a * b).abs()).sum();
                prop_assert!((y[r] - want).abs() <= 1e-5 * mag + 1e-6, "row {}: {} vs {}", r, y[r], want);
            }
        }
        // All planes of a prefix (or of a run without plane 0) in one fused pass = the dense
        // product of their sum.
        for (lo, hi) in (1..=planes).map(|p| (0, p)).chain((2..=planes).map(|p| (1, p))) {
            let chosen: Vec<&PlaneBlock> = d.blocks[lo..hi].iter().collect();
            let mut part = vec![0.0f32; rows * cols];
            for b in &chosen {
                b.add_to_dense(&mut part);
            }
            for simd in Simd::ALL {
                let mut y = vec![0.0f32; rows];
                planes_matvec_add_with(&chosen, &table, &mut y, simd);
                for r in 0..rows {
                    let row = &part[r * cols..(r + 1) * cols];
                    let want: f32 = row.iter().zip(&x).map(|(a, b)| a * b).sum();
                    let mag: f32 = row.iter().zip(&x).map(|(a, b)| (a * b).abs()).sum();
                    prop_assert!((y[r] - want).abs() <= 1e-5 * mag + 1e-6, "{:?} planes {}..{} row {}: {} vs {}", simd, lo, hi, r, y[r], want);
                }
                // The tile rebuild of the same planes, in tiles of 3 rows.
                let tiles = rebuilt_in_tiles(&chosen, rows, cols, 3, simd);
                check_rebuilt(&tiles, &part, &d.grid, cols).map_err(|e| TestCaseError::fail(format!("{simd:?} planes {lo}..{hi}: {e}")))?;
            }
        }
        // Row tiles of every size = rows of the dense reconstruction.
        for tile in 1..=rows {
            for r0 in (0..rows).step_by(tile) {
                let n = tile.min(rows - r0);
                let mut t = vec![0.0f32; n * cols];
                for block in &d.blocks {
                    block.add_rows_to_dense(r0, &mut t);
                }
                prop_assert_eq!(&t[..], &dense[r0 * cols..(r0 + n) * cols]);
            }
        }
        // (The error of one matrix need not shrink at every plane: a weight within a quarter
        // step of its reconstruction moves away from it. The per-weight bound above halves.)
    }
}

/// The fused product on a shape large enough to split rows between threads, with more planes
/// than one run of codes holds (12: runs of 8 and 4) and subsets that skip planes.
#[test]
fn fused_planes_product_matches_dense_on_a_large_matrix() {
    let (rows, cols) = (300, 1000);
    let w = matrix(rows, cols, 7);
    let params = PlaneParams {
        group: 128,
        planes: 12,
    };
    let d = decompose_planes(&w, rows, cols, &params, None, None).unwrap();
    let x: Vec<f32> = (0..cols)
        .map(|j| ((j * 7 % 13) as f32 - 6.0) / 6.0)
        .collect();
    let table = PlaneTable::new(&x, 128);
    let subsets: [Vec<usize>; 4] = [
        (0..12).collect(),
        (0..5).collect(),
        vec![0, 3, 9, 11],
        (2..12).rev().collect(),
    ];
    for subset in &subsets {
        let chosen: Vec<&PlaneBlock> = subset.iter().map(|&p| &d.blocks[p]).collect();
        let mut dense = vec![0.0f32; rows * cols];
        for b in &chosen {
            b.add_to_dense(&mut dense);
        }
        for simd in Simd::ALL {
            let tiles = rebuilt_in_tiles(&chosen, rows, cols, 7, simd);
            if let Err(e) = check_rebuilt(&tiles, &dense, &d.grid, cols) {
                panic!("{simd:?} tiles of planes {subset:?}: {e}");
            }
            let mut y = vec![0.0f32; rows];
            planes_matvec_add_with(&chosen, &table, &mut y, simd);
            for r in 0..rows {
                let row = &dense[r * cols..(r + 1) * cols];
                let want: f32 = row.iter().zip(&x).map(|(a, b)| a * b).sum();
                let mag: f32 = row.iter().zip(&x).map(|(a, b)| (a * b).abs()).sum();
                assert!(
                    (y[r] - want).abs() <= 1e-5 * mag + 1e-6,
                    "{simd:?} planes {subset:?} row {r}: {} vs {want}",
                    y[r]
                );
            }
        }
    }
}

#[test]
fn bad_inputs_are_errors() {
    let w = matrix(4, 16, 1);
    let p = |group, planes| PlaneParams { group, planes };
    let e = decompose_planes(&w, 4, 16, &p(12, 3), None, None).unwrap_err();
    assert!(e.to_string().contains("group size 12"), "{e}");
    let e = decompose_planes(&w, 4, 16, &p(8, 25), None, None).unwrap_err();
    assert!(e.to_string().contains("at most 24"), "{e}");
    let e = decompose_planes(&w, 4, 15, &p(8, 3), None, None).unwrap_err();
    assert!(e.to_string().contains("shape mismatch"), "{e}");
    let mut bad = w.clone();
    bad[5] = f32::NAN;
    let e = decompose_planes(&bad, 4, 16, &p(8, 3), None, None).unwrap_err();
    assert!(e.to_string().contains("[0, 5]"), "{e}");
    let mut huge = w.clone();
    huge[0] = 1e6;
    let e = decompose_planes(&huge, 4, 16, &p(8, 3), None, None).unwrap_err();
    assert!(e.to_string().contains("does not fit the f16"), "{e}");
    let e = decompose_planes(&w, 4, 16, &p(8, 3), Some(&[1.0; 3]), None).unwrap_err();
    assert!(e.to_string().contains("expected 4"), "{e}");
}
