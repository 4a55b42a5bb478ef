//! Packed ±1 sign matrices and their products.
//!
//! A BitStack residual block stores `S ⊙ (u v)` where `S ∈ {-1,+1}^{m×n}` costs one bit per
//! weight. This crate is the vocabulary for those bits: [`SignMatrix`] (owned) and
//! [`SignMatrixRef`] (borrowed, zero-copy over e.g. a memory-mapped file), packing from `f32`
//! signs, unpacking, and the products `y = S z` and `Y = S Z` that let a block be applied
//! without rebuilding a dense matrix.
//!
//! # Layout
//!
//! The `m·n` signs are stored row-major and contiguous (rows are **not** padded to a byte),
//! 8 per byte, the first element in the most significant bit; bit `1` means `+1` and bit `0`
//! means `-1`. The buffer is `ceil(m·n / 8)` bytes ([`packed_len`]) and the unused low bits
//! of the last byte are `0`. This is the packing of the public BitStack checkpoints. When
//! packing, `sign(x) = +1` for `x >= 0` (so `sign(0) = sign(-0.0) = +1`); NaN is an error.
//!
//! # Kernels
//!
//! Each product has a naive version (`*_naive`, one signed add per element: the oracle) and
//! a lookup-table version (`*_lut`): for every group of 8 columns a 256-entry table of the
//! signed partial sums of `z` (of the rows of `Z`, as `k`-vectors) is precomputed, after which
//! each packed byte of `S` costs one table read — `S z = 2·B z − (Σ z)·1` with `B` the 0/1
//! bits, applied group by group. Tables are built for a cache-sized range of columns at a
//! time and rows are split across rayon's threads for large problems (see [`Parallelism`]).
//! Any shape works, including `n % 8 != 0` (rows then start in the middle of a byte) and
//! empty matrices.
//!
//! The decode product of a whole residual block, `y += (S ⊙ (u v)) x`
//! ([`SignMatrixRef::lowrank_matvec_add`]), shares one table per column group between all `k`
//! sign products; it has AVX-512 and AVX2 versions picked at run time (see [`Simd`]),
//! checked against the portable version and the naive oracle
//! [`SignMatrixRef::lowrank_matvec_add_naive`].
//!
//! The decode product of nested bit planes ([`codes_matvec_add`]: integer codes stored one
//! plane at a time on a per-group grid) builds the codes of 64 columns with one masked byte
//! add per plane (AVX-512 BW; AVX2: 32 columns, bits spread to bytes by a shuffle and a
//! compare; picked at run time) and multiplies them with `x` in f32;
//! [`codes_rows_to_dense`] writes the same codes out as dense rows (the batch product's tile
//! rebuild). Their portable versions and a per-weight f64 definition are the tests' oracles.
//! These vectorized kernels are the only `unsafe` code of the crate.
//!
//! # Example
//!
//! ```
//! use bitstack_bits::SignMatrix;
//!
//! // A 2×3 matrix: [[+, -, +], [-, -, +]] (0.0 counts as +1).
//! let w = [0.5_f32, -2.0, 0.0, -1.0, -0.1, 3.0];
//! let s = SignMatrix::from_signs_of(&w, 2, 3)?;
//! // 6 bits, MSB first: 101 001 + two zero pad bits.
//! assert_eq!(s.as_bytes(), &[0b1010_0100]);
//!
//! let z = [1.0_f32, 2.0, 3.0];
//! let mut y = [0.0_f32; 2];
//! s.as_view().sign_matvec_lut(&z, &mut y);
//! assert_eq!(y, [1.0 - 2.0 + 3.0, -1.0 - 2.0 + 3.0]);
//! # Ok::<(), bitstack_bits::BitsError>(())
//! ```
//!
//! # Feature flags
//!
//! None.

#![deny(unsafe_code)]
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

mod codes;
mod error;
mod lowrank;
mod lowrank_i8;
mod lowrank_q8;
mod lut;
mod matrix;
mod naive;

/// The README's example, compiled and run as a doctest.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;

pub use codes::{
    codes_matvec_add, codes_matvec_add_q16, codes_q16_vectorized, codes_rows_to_dense,
    codes_simd_available, quantize_x_q16, CodeGrid, WeightedPlane, Q16_SEGMENT,
};
pub use error::BitsError;
pub use lowrank::{LowRankRef, Simd};

/// `y += Σ_b (S_b ⊙ (u_b v_b)) x`: the decode product of a matrix made of several residual
/// blocks (ALGORITHM.md §6), in one pass that shares the threads' work split and partial
/// sums between the blocks. See [`SignMatrixRef::lowrank_matvec_add`] for one block.
///
/// # Panics
/// If a block is not `y.len() × x.len()` or its `u`, `v` do not have `rows·k`, `k·cols`
/// values (a programmer error).
pub fn lowrank_matvec_add(
    blocks: &[LowRankRef<'_>],
    x: &[f32],
    y: &mut [f32],
    par: Parallelism,
    simd: Simd,
) {
    lowrank::lowrank_matvec_add(blocks, x, y, par, simd);
}
/// [`lowrank_matvec_add`] with 8-bit tables: each 4-column table entry is rounded to a
/// signed byte, with one scale per chunk of [`Q8_CHUNK_COLS`] columns and rank index (the
/// largest entry's magnitude over 127). On CPUs with AVX-512 VBMI and VNNI (AMD Zen 4,
/// Intel from Ice Lake) 2.8–5 times faster than the f32 tables (4096², 4 blocks, k = 16;
/// with [`Simd::Auto`] or [`Simd::Avx512`]); on CPUs with AVX2, FMA and F16C but not those
/// (with [`Simd::Auto`], or [`Simd::Avx2`] / [`Simd::Avx2Gfni`] anywhere) an AVX2 version
/// 1.7–2.9 times faster than the f32 tables' AVX2 version (measured on AMD Zen 5, two
/// threads: 512² to 14336 × 4096); elsewhere a portable version with the same rounding
/// (slower than [`lowrank_matvec_add`]'s vectorized versions: it is the reference).
///
/// The result differs from the exact product by at most [`lowrank_q8_error_bounds`] per row
/// (half a quantization step per group and chunk, weighted by `|u|`); on one thread the
/// vectorized and the portable version agree exactly.
///
/// # Panics
/// As [`lowrank_matvec_add`].
pub fn lowrank_matvec_add_q8(
    blocks: &[LowRankRef<'_>],
    x: &[f32],
    y: &mut [f32],
    par: Parallelism,
    simd: Simd,
) {
    lowrank_q8::matvec_add_q8(blocks, x, y, par, simd);
}

/// Whether [`lowrank_matvec_add_q8`] runs a vectorized version with `simd` on this CPU
/// (AVX-512 F, BW, VL, VBMI and VNNI; or AVX2, FMA and F16C).
#[must_use]
pub fn lowrank_q8_vectorized(simd: Simd) -> bool {
    lowrank_q8::vectorized(simd)
}

/// Whether [`lowrank_matvec_add_q8`] runs its AVX-512 version with `simd` on this CPU (the
/// fastest: 3–3.5 times its AVX2 version at 4096² and above, twice at 512²).
#[must_use]
pub fn lowrank_q8_avx512(simd: Simd) -> bool {
    lowrank_q8::vectorized_avx512(simd)
}

/// The bounds on `|Δy[row]|` of [`lowrank_matvec_add_q8`] against the exact product (before
/// f32 rounding of the sums), one per row of the blocks (empty without blocks): `Σ_b Σ_j
/// |u_b[row, j]| · Σ_chunks groups · scale / 2`.
///
/// # Panics
/// If the blocks' shapes differ or do not match `x` (as [`lowrank_matvec_add`]).
#[must_use]
pub fn lowrank_q8_error_bounds(blocks: &[LowRankRef<'_>], x: &[f32]) -> Vec<f64> {
    lowrank_q8::error_bounds(blocks, x)
}

/// [`lowrank_matvec_add`] with 8-bit `z`: each `z = v[r, :] ⊙ x` is rounded to a signed
/// byte, with one scale per chunk of [`I8_CHUNK_COLS`] columns and rank index (the largest
/// `|z|` over 127); the ±1 signs times those bytes are exact `i32` sums, scaled back per
/// chunk. On CPUs with AMX-INT8 (Intel from Sapphire Rapids, Linux) the integer products run
/// on the tile unit ([`lowrank_i8_accelerated`]); elsewhere, or with a `simd` other than
/// [`Simd::Auto`], a portable version with the same rounding and the same f32 operations in
/// the same order runs (slow: it is the reference, and the two agree exactly).
///
/// The result differs from the exact product by at most [`lowrank_i8_error_bounds`] per row.
///
/// # Panics
/// As [`lowrank_matvec_add`].
pub fn lowrank_matvec_add_i8(
    blocks: &[LowRankRef<'_>],
    x: &[f32],
    y: &mut [f32],
    par: Parallelism,
    simd: Simd,
) {
    lowrank_i8::matvec_add_i8(blocks, x, y, par, simd);
}

/// Whether [`lowrank_matvec_add_i8`] runs its tile (AMX) version with `simd` here: AMX-TILE,
/// AMX-INT8, AVX-512 F and BW, Linux's permission for the tile state, and [`Simd::Auto`].
/// (Matrices whose rows are not whole bytes of signs run the portable version.)
#[must_use]
pub fn lowrank_i8_accelerated(simd: Simd) -> bool {
    lowrank_i8::accelerated(simd)
}

/// The bounds on `|Δy[row]|` of [`lowrank_matvec_add_i8`] against the exact product (before
/// f32 rounding): `Σ_b Σ_r |u_b[row, r]| · Σ_chunks columns · scale / 2`.
///
/// # Panics
/// If the blocks' shapes differ or do not match `x`.
#[must_use]
pub fn lowrank_i8_error_bounds(blocks: &[LowRankRef<'_>], x: &[f32]) -> Vec<f64> {
    lowrank_i8::error_bounds(blocks, x)
}

/// Columns per chunk of [`lowrank_matvec_add_i8`]: one scale per chunk and rank index.
pub const I8_CHUNK_COLS: usize = lowrank_i8::CHUNK_COLS;

/// Columns per chunk of [`lowrank_matvec_add_q8`]: one scale per chunk and rank index.
pub const Q8_CHUNK_COLS: usize = lowrank_q8::CHUNK_COLS;
pub use matrix::{
    checked_packed_len, packed_len, SignLayout, SignMatrix, SignMatrixRef, STRIP_COLS,
};

/// Whether a lookup-table kernel may use rayon's thread pool.
///
/// `Auto` (the default, used by [`SignMatrixRef::sign_matvec_lut`] and
/// [`SignMatrixRef::sign_matmul_lut`]) splits rows across the current rayon pool when
/// `m·n·k` is large (about a million multiply-adds or more) and the pool has more than one
/// thread; small problems always stay on the calling thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum Parallelism {
    /// Run on the calling thread only.
    Sequential,
    /// Use the current rayon pool for large problems.
    #[default]
    Auto,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packs_msb_first() {
        let v = [1.0, -1.0, 1.0, 1.0, -1.0, -1.0, -1.0, 1.0];
        let s = SignMatrix::from_signs_of(&v, 1, 8).unwrap();
        assert_eq!(s.as_bytes(), &[0b1011_0001]);
    }

    #[test]
    fn zero_and_negative_zero_are_positive() {
        let s = SignMatrix::from_signs_of(&[0.0, -0.0, f32::INFINITY, f32::NEG_INFINITY], 2, 2)
            .unwrap();
        assert_eq!(s.as_bytes(), &[0b1110_0000]);
        let v = s.as_view();
        assert!(v.get(0, 0) && v.get(0, 1) && v.get(1, 0) && !v.get(1, 1));
        assert_eq!(v.sign(1, 1), -1.0);
    }

    #[test]
    fn nan_is_named() {
        let err = SignMatrix::from_signs_of(&[1.0, 2.0, 3.0, f32::NAN], 2, 2).unwrap_err();
        assert_eq!(
            err,
            BitsError::NanValue {
                rows: 2,
                cols: 2,
                row: 1,
                col: 1
            }
        );
        assert!(err.to_string().contains("row 1, column 1"));
    }

    #[test]
    fn rejects_bad_lengths_and_padding() {
        assert!(SignMatrixRef::new(&[0, 0], 3, 3).is_ok());
        assert!(SignMatrixRef::new(&[0xff, 0x80], 3, 3).is_ok());
        assert!(matches!(
            SignMatrixRef::new(&[0xff, 0x40], 3, 3),
            Err(BitsError::NonZeroPadding { pad_bits: 7, .. })
        ));
        assert!(matches!(
            SignMatrixRef::new(&[0xff], 3, 3),
            Err(BitsError::PackedLenMismatch {
                expected: 2,
                actual: 1,
                ..
            })
        ));
        assert!(matches!(
            SignMatrix::from_packed(vec![], usize::MAX, 2),
            Err(BitsError::ShapeOverflow { .. })
        ));
        assert!(matches!(
            SignMatrix::from_signs_of(&[1.0; 5], 2, 3),
            Err(BitsError::ValueCountMismatch {
                expected: 6,
                actual: 5,
                ..
            })
        ));
    }

    #[test]
    fn empty_shapes() {
        for (m, n) in [(0, 0), (0, 5), (5, 0)] {
            let s = SignMatrix::from_signs_of(&[], m, n).unwrap();
            assert!(s.as_bytes().is_empty());
            let v = s.as_view();
            let z = vec![1.0; n];
            let mut y = vec![7.0; m];
            v.sign_matvec_lut(&z, &mut y);
            assert!(y.iter().all(|&x| x == 0.0));
            v.sign_matvec_naive(&z, &mut y);
            assert!(y.iter().all(|&x| x == 0.0));
            let zz = vec![1.0; n * 3];
            let mut yy = vec![7.0; m * 3];
            v.sign_matmul_lut(&zz, 3, &mut yy);
            assert!(yy.iter().all(|&x| x == 0.0));
            v.sign_matmul_naive(&zz, 3, &mut yy);
            assert!(yy.iter().all(|&x| x == 0.0));
        }
        let s = SignMatrix::from_signs_of(&[1.0, -1.0], 2, 1).unwrap();
        s.as_view().sign_matmul_lut(&[], 0, &mut []);
        s.as_view().sign_matmul_naive(&[], 0, &mut []);
    }

    #[test]
    fn unaligned_rows_lut_matches_naive() {
        // 5 columns: rows start at bit offsets 0, 5, 2, 7, 4, 1, 6, 3.
        let (m, n) = (9, 5);
        let w: Vec<f32> = (0..m * n).map(|i| ((i * 7 + 3) % 5) as f32 - 2.0).collect();
        let s = SignMatrix::from_signs_of(&w, m, n).unwrap();
        let z: Vec<f32> = (0..n).map(|i| (i as f32 + 1.0) * 0.5).collect();
        let (mut a, mut b) = (vec![0.0; m], vec![0.0; m]);
        s.as_view().sign_matvec_naive(&z, &mut a);
        s.as_view().sign_matvec_lut(&z, &mut b);
        for (x, y) in a.iter().zip(&b) {
            assert!((x - y).abs() < 1e-5, "{a:?} vs {b:?}");
        }
    }

    #[test]
    #[should_panic(expected = "z has 2 values")]
    fn matvec_length_mismatch_panics() {
        let s = SignMatrix::from_signs_of(&[1.0; 6], 2, 3).unwrap();
        s.as_view().sign_matvec_lut(&[1.0, 2.0], &mut [0.0; 2]);
    }

    #[test]
    fn owned_round_trip() {
        let s = SignMatrix::from_signs_of(&[1.0, -1.0, -1.0], 1, 3).unwrap();
        let view = SignMatrixRef::from(&s);
        assert_eq!(view.to_owned_matrix(), s);
        assert_eq!((s.rows(), s.cols()), (1, 3));
        let bytes = s.clone().into_bytes();
        assert_eq!(SignMatrix::from_packed(bytes, 1, 3).unwrap(), s);
        assert_eq!(view.unpack(), vec![1.0, -1.0, -1.0]);
    }
}
