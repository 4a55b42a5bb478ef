//! The strip layout (`SignLayout::Strips`): the same matrix as row-major bytes, read back
//! bit for bit (against the row-major packing and against the layout's address formula),
//! and every decode kernel giving exactly the products it gives for the row-major matrix
//! (the same bytes in the same order: bit-identical results, one thread and threaded).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use bitstack_bits::{
    lowrank_matvec_add, lowrank_matvec_add_i8, lowrank_matvec_add_q8, BitsError, LowRankRef,
    Parallelism, SignLayout, SignMatrix, SignMatrixRef, Simd, STRIP_COLS,
};
use proptest::prelude::*;

mod common;
use common::{block, spread_x, Parts};

/// The blocks with their signs in strips.
fn in_strips(parts: &[Parts]) -> Vec<Parts> {
    parts
        .iter()
        .map(|(s, u, v, k)| {
            let strips = s.clone().into_layout(SignLayout::Strips).unwrap();
            (strips, u.clone(), v.clone(), *k)
        })
        .collect()
}

fn refs(parts: &[Parts]) -> Vec<LowRankRef<'_>> {
    common::refs(parts)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]

    /// Bytes, bits and row pieces agree between the layouts; the strip bytes sit where the
    /// layout's documented formula puts them; converting back gives the original bytes.
    #[test]
    fn strips_hold_the_same_matrix(
        m in 1usize..70,
        strips in 1usize..4,
        seed in any::<u64>(),
        ranges in prop::collection::vec((0usize..96, 1usize..96), 1..8),
    ) {
        let n = strips * STRIP_COLS;
        let (row_major, _, _, _) = block(m, n, 1, seed);
        let s = row_major.clone().into_layout(SignLayout::Strips).unwrap();
        prop_assert_eq!(s.layout(), SignLayout::Strips);
        prop_assert_eq!(s.as_bytes().len(), row_major.as_bytes().len());
        prop_assert_eq!(&s.row_major_bytes()[..], row_major.as_bytes());
        let direct = SignMatrix::from_packed_in(row_major.as_bytes(), m, n, SignLayout::Strips)
            .unwrap();
        prop_assert_eq!(&direct, &s);
        let rm = row_major.as_bytes();
        let (a, b) = (row_major.as_view(), s.as_view());
        let row_bytes = n / 8;
        for r in 0..m {
            for g in 0..row_bytes {
                let at = ((g / 32) * m + r) * 32 + g % 32;
                prop_assert_eq!(s.as_bytes()[at], rm[r * row_bytes + g]);
            }
            for c in (0..n).step_by(7) {
                prop_assert_eq!(a.get(r, c), b.get(r, c));
            }
            for &(g0, len) in &ranges {
                let g0 = g0.min(row_bytes - 1);
                let g1 = (g0 + len).min(row_bytes);
                let mut s1 = vec![0u8; g1 - g0];
                let mut s2 = vec![0u8; g1 - g0];
                prop_assert_eq!(
                    a.row_group_bytes(r, g0, g1, &mut s1),
                    b.row_group_bytes(r, g0, g1, &mut s2)
                );
            }
        }
        prop_assert_eq!(a.unpack(), b.unpack());
        prop_assert_eq!(s.clone().into_bytes(), rm.to_vec());
        prop_assert_eq!(s.into_layout(SignLayout::RowMajor).unwrap(), row_major);
    }

    /// The decode kernels (f32 tables, 8-bit tables, 8-bit `z`, each in every version) give
    /// bit-identical products for the two layouts; rows not a multiple of 16, 1 to 16 blocks
    /// of `k` from 1 to 32.
    #[test]
    fn kernels_give_the_same_products(
        m in 1usize..200,
        strips in 1usize..4,
        ks in prop::collection::vec(1usize..=32, 1..=16),
        seed in any::<u64>(),
    ) {
        let n = strips * STRIP_COLS;
        let parts: Vec<Parts> = ks
            .iter()
            .enumerate()
            .map(|(b, &k)| block(m, n, k, seed ^ (b as u64 * 7919)))
            .collect();
        let striped = in_strips(&parts);
        let x = spread_x(n);
        type Kernel = fn(&[LowRankRef<'_>], &[f32], &mut [f32], Parallelism, Simd);
        let kernels: [(&str, Kernel); 3] = [
            ("f32 tables", lowrank_matvec_add),
            ("8-bit tables", lowrank_matvec_add_q8),
            ("8-bit z", lowrank_matvec_add_i8),
        ];
        for (name, kernel) in kernels {
            for simd in Simd::ALL {
                for par in [Parallelism::Sequential, Parallelism::Auto] {
                    let run = |p: &[Parts]| {
                        let mut y = vec![0.5f32; m];
                        kernel(&refs(p), &x, &mut y, par, simd);
                        y
                    };
                    prop_assert_eq!(run(&parts), run(&striped), "{} {:?} {:?}", name, simd, par);
                }
            }
        }
    }
}

/// Large enough for the vectorized sweep's whole tiles, both thread splits and the row
/// blocks of the 8-bit kernel.
#[test]
fn q8_large_shapes_same_products() {
    for (m, n, k) in [(1040, 512, 16), (4100, 256, 8), (96, 2048, 32)] {
        let parts = vec![block(m, n, k, 3), block(m, n, k, 4)];
        let striped = in_strips(&parts);
        let x = spread_x(n);
        for par in [Parallelism::Sequential, Parallelism::Auto] {
            let run = |p: &[Parts]| {
                let mut y = vec![0.0f32; m];
                lowrank_matvec_add_q8(&refs(p), &x, &mut y, par, Simd::Auto);
                y
            };
            assert_eq!(run(&parts), run(&striped), "{m}x{n}, {par:?}");
        }
    }
}

/// Widths that are not whole strips are refused with an error naming the rule.
#[test]
fn strips_need_whole_strips() {
    let (s, _, _, _) = block(4, 200, 1, 9);
    let e = s.clone().into_layout(SignLayout::Strips).unwrap_err();
    assert!(
        matches!(e, BitsError::StripWidth { cols: 200, .. }),
        "{e:?}"
    );
    assert!(e.to_string().contains("multiple of 256"), "{e}");
    let e = SignMatrixRef::with_layout(s.as_bytes(), 4, 200, SignLayout::Strips).unwrap_err();
    assert!(matches!(e, BitsError::StripWidth { .. }), "{e:?}");
    // No rows (or no columns) is a valid, empty matrix in strips too.
    for (m, n) in [(0, 256), (3, 0)] {
        let s = SignMatrix::from_packed_in(&[], m, n, SignLayout::Strips).unwrap();
        assert!(s.row_major_bytes().is_empty() && s.layout() == SignLayout::Strips);
    }
    // Row-major stays available for any shape.
    assert_eq!(s.clone().into_layout(SignLayout::RowMajor).unwrap(), s);
}
