//! The owned [`SignMatrix`], the borrowed [`SignMatrixRef`] and the packing / unpacking code.

use std::borrow::Cow;

use half::f16;

use crate::{lowrank, lut, naive, BitsError, LowRankRef, Parallelism, Simd};

/// Number of bytes that hold `rows * cols` packed signs: `ceil(rows * cols / 8)`.
///
/// # Panics
/// Panics if `rows * cols` overflows `usize`; use [`checked_packed_len`] for shapes that come
/// from a file or a user.
///
/// ```
/// assert_eq!(bitstack_bits::packed_len(3, 5), 2); // 15 bits -> 2 bytes
/// assert_eq!(bitstack_bits::packed_len(4096, 4096), 4096 * 4096 / 8);
/// ```
#[must_use]
pub fn packed_len(rows: usize, cols: usize) -> usize {
    match checked_packed_len(rows, cols) {
        Some(len) => len,
        None => panic!("packed_len: shape {rows}x{cols} overflows usize"),
    }
}

/// [`packed_len`] that returns `None` instead of panicking when `rows * cols` overflows.
#[must_use]
pub fn checked_packed_len(rows: usize, cols: usize) -> Option<usize> {
    rows.checked_mul(cols).map(|count| count.div_ceil(8))
}

/// Columns of one strip of the [`SignLayout::Strips`] layout (32 bytes of a row).
pub const STRIP_COLS: usize = 256;

/// Bytes of a row in one strip.
const STRIP_BYTES: usize = STRIP_COLS / 8;

/// Where byte `g` of row `r` lies in the strip layout of a matrix of `rows` rows.
#[inline]
pub(crate) fn strip_offset(rows: usize, r: usize, g: usize) -> usize {
    ((g / STRIP_BYTES) * rows + r) * STRIP_BYTES + g % STRIP_BYTES
}

/// How the packed bytes of a sign matrix are arranged in memory. Every method of
/// [`SignMatrix`] and [`SignMatrixRef`] means the same matrix in either layout; only the raw
/// bytes ([`SignMatrixRef::as_bytes`]) differ.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum SignLayout {
    /// Row-major, 8 signs per byte, the first column in the most significant bit, rows not
    /// padded (the packing of the container and of the public BitStack checkpoints).
    #[default]
    RowMajor,
    /// Column strips of [`STRIP_COLS`] columns: strip `c` holds the 32 bytes of columns
    /// `256c..256c + 256` of row 0, then of row 1, …, and the strips follow each other (the
    /// byte `g` of row `r` is at `((g / 32)·rows + r)·32 + g % 32`). For widths that are a
    /// multiple of 256 only. The 8-bit decode kernel reads the rows of a tile of one strip
    /// as one contiguous run, which the CPU's prefetchers follow: on AMD Zen 5 (2 threads,
    /// 4 blocks of k = 16) 0.63 instead of 0.85 ms at 4096² and 2.4 instead of 4.0 ms at
    /// 14336 × 4096. The runtime keeps loaded AVD blocks this way.
    Strips,
}

/// Checks `bits.len()` and the pad bits for a `rows × cols` matrix.
fn validate_packed(bits: &[u8], rows: usize, cols: usize) -> Result<(), BitsError> {
    let count = rows
        .checked_mul(cols)
        .ok_or(BitsError::ShapeOverflow { rows, cols })?;
    let expected = count.div_ceil(8);
    if bits.len() != expected {
        return Err(BitsError::PackedLenMismatch {
            rows,
            cols,
            expected,
            actual: bits.len(),
        });
    }
    let used_in_last = count % 8;
    if used_in_last != 0 {
        // `count % 8 != 0` implies `expected >= 1`, so the buffer has a last byte.
        let last_byte = bits[expected - 1];
        let pad_bits = 8 - used_in_last as u32;
        let pad_mask = (1u8 << pad_bits) - 1;
        if last_byte & pad_mask != 0 {
            return Err(BitsError::NonZeroPadding {
                rows,
                cols,
                pad_bits,
                last_byte,
            });
        }
    }
    Ok(())
}

/// An owned, packed `rows × cols` matrix of ±1 signs.
///
/// See the [crate documentation](crate) for the bit layout; [`SignMatrix::into_layout`]
/// rearranges the bytes into column strips for the 8-bit decode kernel ([`SignLayout`]).
/// Two matrices compare equal when they hold the same signs in the same layout. All
/// computations go through the borrowed view returned by [`SignMatrix::as_view`].
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct SignMatrix {
    bits: Vec<u8>,
    rows: usize,
    cols: usize,
    layout: SignLayout,
}

impl std::fmt::Debug for SignMatrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SignMatrix")
            .field("rows", &self.rows)
            .field("cols", &self.cols)
            .field("bytes", &self.bits.len())
            .field("layout", &self.layout)
            .finish()
    }
}

impl SignMatrix {
    /// Packs the signs of a row-major `rows × cols` matrix: `x >= 0` (including `+0.0`,
    /// `-0.0` and `+∞`) gives `+1`, `x < 0` gives `-1`.
    ///
    /// # Errors
    /// [`BitsError::ShapeOverflow`] if `rows * cols` overflows,
    /// [`BitsError::ValueCountMismatch`] if `values.len() != rows * cols`,
    /// [`BitsError::NanValue`] (naming the first NaN's row and column) if a value is NaN.
    pub fn from_signs_of(values: &[f32], rows: usize, cols: usize) -> Result<Self, BitsError> {
        let count = rows
            .checked_mul(cols)
            .ok_or(BitsError::ShapeOverflow { rows, cols })?;
        if values.len() != count {
            return Err(BitsError::ValueCountMismatch {
                rows,
                cols,
                expected: count,
                actual: values.len(),
            });
        }
        if let Some(index) = values.iter().position(|v| v.is_nan()) {
            return Err(BitsError::NanValue {
                rows,
                cols,
                row: index / cols,
                col: index % cols,
            });
        }
        let mut bits = vec![0u8; count.div_ceil(8)];
        let mut chunks = values.chunks_exact(8);
        for (byte, chunk) in bits.iter_mut().zip(&mut chunks) {
            *byte = pack_byte(chunk);
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            if let Some(last) = bits.last_mut() {
                *last = pack_byte(rest);
            }
        }
        Ok(Self {
            bits,
            rows,
            cols,
            layout: SignLayout::RowMajor,
        })
    }

    /// Takes ownership of already packed bits (the layout of the [crate documentation](crate)).
    ///
    /// # Errors
    /// [`BitsError::ShapeOverflow`], [`BitsError::PackedLenMismatch`] if
    /// `bits.len() != packed_len(rows, cols)`, [`BitsError::NonZeroPadding`] if the unused low
    /// bits of the last byte are not zero.
    pub fn from_packed(bits: Vec<u8>, rows: usize, cols: usize) -> Result<Self, BitsError> {
        validate_packed(&bits, rows, cols)?;
        Ok(Self {
            bits,
            rows,
            cols,
            layout: SignLayout::RowMajor,
        })
    }

    /// Row-major packed bytes (as [`SignMatrix::from_packed`] takes them) rearranged into
    /// `layout` in one copy.
    ///
    /// # Errors
    /// As [`SignMatrix::from_packed`], and [`BitsError::StripWidth`] for
    /// [`SignLayout::Strips`] when `cols` is not a multiple of [`STRIP_COLS`].
    pub fn from_packed_in(
        bits: &[u8],
        rows: usize,
        cols: usize,
        layout: SignLayout,
    ) -> Result<Self, BitsError> {
        validate_packed(bits, rows, cols)?;
        check_layout(rows, cols, layout)?;
        let bits = match layout {
            SignLayout::RowMajor => bits.to_vec(),
            SignLayout::Strips => {
                let mut out = vec![0u8; bits.len()];
                if cols > 0 {
                    for (r, row) in bits.chunks_exact(cols / 8).enumerate() {
                        for (g, piece) in (0..)
                            .step_by(STRIP_BYTES)
                            .zip(row.chunks_exact(STRIP_BYTES))
                        {
                            let at = strip_offset(rows, r, g);
                            out[at..at + STRIP_BYTES].copy_from_slice(piece);
                        }
                    }
                }
                out
            }
        };
        Ok(Self {
            bits,
            rows,
            cols,
            layout,
        })
    }

    /// The same matrix with its bytes in `layout` (no copy when it is already so).
    ///
    /// # Errors
    /// [`BitsError::StripWidth`] for [`SignLayout::Strips`] when `cols` is not a multiple
    /// of [`STRIP_COLS`].
    pub fn into_layout(self, layout: SignLayout) -> Result<Self, BitsError> {
        if layout == self.layout {
            return Ok(self);
        }
        let (rows, cols) = (self.rows, self.cols);
        match layout {
            SignLayout::RowMajor => Ok(Self {
                bits: self.into_bytes(),
                rows,
                cols,
                layout,
            }),
            SignLayout::Strips => Self::from_packed_in(&self.bits, rows, cols, layout),
        }
    }

    /// How the bytes are arranged.
    #[must_use]
    pub fn layout(&self) -> SignLayout {
        self.layout
    }

    /// The packed bytes in row-major order (the container's packing): borrowed when the
    /// matrix is row-major, else rearranged into a new buffer.
    #[must_use]
    pub fn row_major_bytes(&self) -> Cow<'_, [u8]> {
        self.as_view().row_major_bytes()
    }

    /// A borrowed view of this matrix (all reads and products are defined on the view).
    #[must_use]
    pub fn as_view(&self) -> SignMatrixRef<'_> {
        SignMatrixRef {
            bits: &self.bits,
            rows: self.rows,
            cols: self.cols,
            layout: self.layout,
        }
    }

    /// The packed bytes, `packed_len(rows, cols)` of them, in [`SignMatrix::layout`].
    #[must_use]
    pub fn as_bytes(&self) -> &[u8] {
        &self.bits
    }

    /// Gives back the packed bytes in row-major order (the container's packing; rearranged
    /// if the matrix is in strips).
    #[must_use]
    pub fn into_bytes(self) -> Vec<u8> {
        match self.layout {
            SignLayout::RowMajor => self.bits,
            SignLayout::Strips => self.row_major_bytes().into_owned(),
        }
    }

    /// Number of rows `m`.
    #[must_use]
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Number of columns `n`.
    #[must_use]
    pub fn cols(&self) -> usize {
        self.cols
    }
}

impl<'a> From<&'a SignMatrix> for SignMatrixRef<'a> {
    fn from(matrix: &'a SignMatrix) -> Self {
        matrix.as_view()
    }
}

/// Whether a `rows × cols` matrix can be held in `layout`.
fn check_layout(rows: usize, cols: usize, layout: SignLayout) -> Result<(), BitsError> {
    match layout {
        SignLayout::Strips if !cols.is_multiple_of(STRIP_COLS) => Err(BitsError::StripWidth {
            rows,
            cols,
            strip: STRIP_COLS,
        }),
        _ => Ok(()),
    }
}

/// Packs up to 8 values (none NaN) into one byte, first value in the most significant bit.
#[inline]
fn pack_byte(values: &[f32]) -> u8 {
    values
        .iter()
        .enumerate()
        .fold(0u8, |byte, (j, &v)| byte | (u8::from(v >= 0.0) << (7 - j)))
}

/// A borrowed, packed `rows × cols` matrix of ±1 signs, e.g. over a memory-mapped file.
///
/// Construction ([`SignMatrixRef::new`]) validates the length and the pad bits, so every
/// method can index without further checks. The view is `Copy`.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct SignMatrixRef<'a> {
    bits: &'a [u8],
    rows: usize,
    cols: usize,
    layout: SignLayout,
}

impl std::fmt::Debug for SignMatrixRef<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SignMatrixRef")
            .field("rows", &self.rows)
            .field("cols", &self.cols)
            .field("bytes", &self.bits.len())
            .field("layout", &self.layout)
            .finish()
    }
}

impl<'a> SignMatrixRef<'a> {
    /// Views `bits` as a packed `rows × cols` sign matrix without copying.
    ///
    /// # Errors
    /// [`BitsError::ShapeOverflow`], [`BitsError::PackedLenMismatch`] if
    /// `bits.len() != packed_len(rows, cols)`, [`BitsError::NonZeroPadding`] if the unused low
    /// bits of the last byte are not zero.
    pub fn new(bits: &'a [u8], rows: usize, cols: usize) -> Result<Self, BitsError> {
        validate_packed(bits, rows, cols)?;
        Ok(Self {
            bits,
            rows,
            cols,
            layout: SignLayout::RowMajor,
        })
    }

    /// A row-major view of bytes known to be valid for the shape (e.g. the
    /// [`row_major_bytes`](Self::row_major_bytes) of a valid view).
    pub(crate) fn row_major_of(bits: &'a [u8], rows: usize, cols: usize) -> Self {
        debug_assert!(validate_packed(bits, rows, cols).is_ok());
        Self {
            bits,
            rows,
            cols,
            layout: SignLayout::RowMajor,
        }
    }

    /// Views `bits` as a packed `rows × cols` sign matrix arranged in `layout`.
    ///
    /// # Errors
    /// As [`SignMatrixRef::new`], and [`BitsError::StripWidth`] for [`SignLayout::Strips`]
    /// when `cols` is not a multiple of [`STRIP_COLS`].
    pub fn with_layout(
        bits: &'a [u8],
        rows: usize,
        cols: usize,
        layout: SignLayout,
    ) -> Result<Self, BitsError> {
        validate_packed(bits, rows, cols)?;
        check_layout(rows, cols, layout)?;
        Ok(Self {
            bits,
            rows,
            cols,
            layout,
        })
    }

    /// How the bytes are arranged.
    #[must_use]
    pub fn layout(&self) -> SignLayout {
        self.layout
    }

    /// The packed bytes in row-major order: borrowed when the view is row-major, else
    /// rearranged into a new buffer.
    #[must_use]
    pub fn row_major_bytes(&self) -> Cow<'a, [u8]> {
        match self.layout {
            SignLayout::RowMajor => Cow::Borrowed(self.bits),
            SignLayout::Strips => self.row_major_rows(0, self.rows),
        }
    }

    /// Rows `r0..r1` as row-major packed bytes (e.g. a tile of a batch product's rebuild):
    /// borrowed when the view is row-major, else gathered from the strips.
    ///
    /// # Panics
    /// If `r0..r1` is not a range of rows, or the rows do not start on byte boundaries
    /// (`cols` not a multiple of 8) and the range is not all of them.
    #[must_use]
    pub fn row_major_rows(&self, r0: usize, r1: usize) -> Cow<'a, [u8]> {
        let whole = r0 == 0 && r1 == self.rows;
        assert!(
            r0 <= r1 && r1 <= self.rows && (whole || self.cols.is_multiple_of(8)),
            "row_major_rows: rows {r0}..{r1} of a {}x{} matrix",
            self.rows,
            self.cols
        );
        let row_bytes = self.cols / 8;
        match self.layout {
            SignLayout::RowMajor if whole => Cow::Borrowed(self.bits),
            SignLayout::RowMajor => Cow::Borrowed(&self.bits[r0 * row_bytes..r1 * row_bytes]),
            SignLayout::Strips => {
                let mut out = vec![0u8; (r1 - r0) * row_bytes];
                if row_bytes > 0 {
                    for (r, row) in (r0..).zip(out.chunks_exact_mut(row_bytes)) {
                        for (g, piece) in (0..)
                            .step_by(STRIP_BYTES)
                            .zip(row.chunks_exact_mut(STRIP_BYTES))
                        {
                            let at = strip_offset(self.rows, r, g);
                            piece.copy_from_slice(&self.bits[at..at + STRIP_BYTES]);
                        }
                    }
                }
                Cow::Owned(out)
            }
        }
    }

    /// Where the bit of `(r, c)` is: byte index and shift from the least significant bit.
    #[inline]
    fn bit_position(&self, r: usize, c: usize) -> (usize, usize) {
        match self.layout {
            SignLayout::RowMajor => {
                let index = r * self.cols + c;
                (index / 8, 7 - index % 8)
            }
            SignLayout::Strips => (strip_offset(self.rows, r, c / 8), 7 - c % 8),
        }
    }

    /// Number of rows `m`.
    #[must_use]
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Number of columns `n`.
    #[must_use]
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// The packed bytes, `packed_len(rows, cols)` of them, in [`SignMatrixRef::layout`].
    #[must_use]
    pub fn as_bytes(&self) -> &'a [u8] {
        self.bits
    }

    /// The bit at `(r, c)`: `true` means `+1`, `false` means `-1`.
    ///
    /// # Panics
    /// Panics if `r >= rows` or `c >= cols`.
    #[must_use]
    #[inline]
    pub fn get(&self, r: usize, c: usize) -> bool {
        assert!(
            r < self.rows && c < self.cols,
            "SignMatrixRef::get: index ({r}, {c}) out of bounds for a {}x{} matrix",
            self.rows,
            self.cols
        );
        let (byte, shift) = self.bit_position(r, c);
        (self.bits[byte] >> shift) & 1 == 1
    }

    /// The sign at `(r, c)` as `+1.0` or `-1.0`.
    ///
    /// # Panics
    /// Panics if `r >= rows` or `c >= cols`.
    #[must_use]
    #[inline]
    pub fn sign(&self, r: usize, c: usize) -> f32 {
        if self.get(r, c) {
            1.0
        } else {
            -1.0
        }
    }

    /// Writes the matrix as `±1.0` values, row-major, into `out` (`rows * cols` long).
    ///
    /// # Panics
    /// Panics if `out.len() != rows * cols` (a programmer error).
    pub fn unpack_into(&self, out: &mut [f32]) {
        let count = self.rows * self.cols; // cannot overflow: validated at construction
        assert_eq!(
            out.len(),
            count,
            "SignMatrixRef::unpack_into: output has {} values, a {}x{} matrix needs {count}",
            out.len(),
            self.rows,
            self.cols
        );
        let bits = self.row_major_bytes();
        for (chunk, &byte) in out.chunks_mut(8).zip(bits.iter()) {
            for (j, value) in chunk.iter_mut().enumerate() {
                *value = if (byte >> (7 - j)) & 1 == 1 {
                    1.0
                } else {
                    -1.0
                };
            }
        }
    }

    /// The matrix as a new row-major `Vec` of `±1.0` values.
    #[must_use]
    pub fn unpack(&self) -> Vec<f32> {
        let mut out = vec![0.0; self.rows * self.cols];
        self.unpack_into(&mut out);
        out
    }

    /// Copies the view into an owned [`SignMatrix`].
    #[must_use]
    pub fn to_owned_matrix(&self) -> SignMatrix {
        SignMatrix {
            bits: self.bits.to_vec(),
            rows: self.rows,
            cols: self.cols,
            layout: self.layout,
        }
    }

    /// `y = S z`, the obvious way (one signed add per element). The test oracle.
    ///
    /// `y` is overwritten.
    ///
    /// # Panics
    /// Panics if `z.len() != cols` or `y.len() != rows` (a programmer error).
    pub fn sign_matvec_naive(&self, z: &[f32], y: &mut [f32]) {
        naive::sign_matvec(*self, z, y);
    }

    /// `y = S z` with per-8-column lookup tables (see the [crate documentation](crate)),
    /// multithreaded with rayon for large matrices.
    ///
    /// `y` is overwritten. Equal to [`sign_matvec_naive`](Self::sign_matvec_naive) up to f32
    /// rounding (a different summation order).
    ///
    /// # Panics
    /// Panics if `z.len() != cols` or `y.len() != rows` (a programmer error).
    pub fn sign_matvec_lut(&self, z: &[f32], y: &mut [f32]) {
        lut::sign_matvec(*self, z, y, Parallelism::Auto);
    }

    /// [`sign_matvec_lut`](Self::sign_matvec_lut) with an explicit threading choice.
    ///
    /// # Panics
    /// Panics if `z.len() != cols` or `y.len() != rows` (a programmer error).
    pub fn sign_matvec_lut_with(&self, z: &[f32], y: &mut [f32], par: Parallelism) {
        lut::sign_matvec(*self, z, y, par);
    }

    /// `Y = S Z`, the obvious way. `Z` is `cols × k` row-major, `Y` is `rows × k` row-major
    /// and is overwritten. The test oracle.
    ///
    /// # Panics
    /// Panics if `z.len() != cols * k` or `y.len() != rows * k` (a programmer error).
    pub fn sign_matmul_naive(&self, z: &[f32], k: usize, y: &mut [f32]) {
        naive::sign_matmul(*self, z, k, y);
    }

    /// `Y = S Z` with per-8-column lookup tables of `k`-vectors, built for a cache-sized range
    /// of columns at a time, multithreaded with rayon for large problems. `Z` is `cols × k`
    /// row-major, `Y` is `rows × k` row-major and is overwritten.
    ///
    /// # Panics
    /// Panics if `z.len() != cols * k` or `y.len() != rows * k` (a programmer error).
    pub fn sign_matmul_lut(&self, z: &[f32], k: usize, y: &mut [f32]) {
        lut::sign_matmul(*self, z, k, y, Parallelism::Auto);
    }

    /// [`sign_matmul_lut`](Self::sign_matmul_lut) with an explicit threading choice.
    ///
    /// # Panics
    /// Panics if `z.len() != cols * k` or `y.len() != rows * k` (a programmer error).
    pub fn sign_matmul_lut_with(&self, z: &[f32], k: usize, y: &mut [f32], par: Parallelism) {
        lut::sign_matmul(*self, z, k, y, par);
    }

    /// `y += (S ⊙ (u v)) x` for a residual block with factors `u` (`rows × k`) and `v`
    /// (`k × cols`), both row-major f16: the decode product of ALGORITHM.md §6, computed from
    /// the packed signs with one lookup table per 8-column group shared by the `k` sign
    /// products. Equal to [`lowrank_matvec_add_naive`](Self::lowrank_matvec_add_naive) up to
    /// f32 rounding.
    ///
    /// # Panics
    /// Panics if `u.len() != rows·k`, `v.len() != k·cols`, `x.len() != cols` or
    /// `y.len() != rows` (a programmer error).
    pub fn lowrank_matvec_add(&self, u: &[f16], v: &[f16], k: usize, x: &[f32], y: &mut [f32]) {
        self.lowrank_matvec_add_with(u, v, k, x, y, Parallelism::Auto, Simd::Auto);
    }

    /// [`lowrank_matvec_add`](Self::lowrank_matvec_add) with explicit threading and SIMD
    /// choices.
    ///
    /// # Panics
    /// As [`lowrank_matvec_add`](Self::lowrank_matvec_add).
    #[allow(clippy::too_many_arguments)]
    pub fn lowrank_matvec_add_with(
        &self,
        u: &[f16],
        v: &[f16],
        k: usize,
        x: &[f32],
        y: &mut [f32],
        par: Parallelism,
        simd: Simd,
    ) {
        let block = LowRankRef {
            signs: *self,
            u,
            v,
            k,
        };
        lowrank::lowrank_matvec_add(&[block], x, y, par, simd);
    }

    /// `y += (S ⊙ (u v)) x`, element by element (each weight rebuilt, then multiplied): the
    /// test oracle of [`lowrank_matvec_add`](Self::lowrank_matvec_add).
    ///
    /// # Panics
    /// As [`lowrank_matvec_add`](Self::lowrank_matvec_add).
    pub fn lowrank_matvec_add_naive(
        &self,
        u: &[f16],
        v: &[f16],
        k: usize,
        x: &[f32],
        y: &mut [f32],
    ) {
        naive::lowrank_matvec_add(*self, u, v, k, x, y);
    }

    /// The packed bytes covering 8-column groups `g0..g1` of row `r`, realigned so that each
    /// returned byte holds columns `8g..8g+8` of the row (first column in the MSB).
    ///
    /// Bits past the end of the row (the next row's, or zero padding) may appear in the last
    /// group; callers must give those columns zero weight. When the row starts on a byte
    /// boundary this borrows `bits` (in [`SignLayout::Strips`]: when the groups lie in one
    /// strip); otherwise it shifts or gathers into `scratch` (at least `g1 - g0` long).
    ///
    /// # Panics
    /// If `g0..g1` reaches past the matrix's bytes (in [`SignLayout::Strips`]: past the
    /// row's `cols / 8` bytes) or `scratch` is too short where it is used.
    #[inline]
    pub fn row_group_bytes<'s>(
        &self,
        r: usize,
        g0: usize,
        g1: usize,
        scratch: &'s mut [u8],
    ) -> &'s [u8]
    where
        'a: 's,
    {
        let bits: &'a [u8] = self.bits;
        if self.layout == SignLayout::Strips {
            // Whole bytes per row; a range within one strip is borrowed, else gathered.
            assert!(
                g1 <= self.cols / 8 && r < self.rows,
                "row_group_bytes: bytes {g0}..{g1} of row {r} of a {}x{} matrix",
                self.rows,
                self.cols
            );
            let at = |g: usize| strip_offset(self.rows, r, g);
            if g1 <= g0 {
                return &[];
            }
            if g0 / STRIP_BYTES == (g1 - 1) / STRIP_BYTES {
                return &bits[at(g0)..at(g0) + (g1 - g0)];
            }
            let out = &mut scratch[..g1 - g0];
            let mut g = g0;
            while g < g1 {
                let end = (g / STRIP_BYTES + 1) * STRIP_BYTES;
                let end = end.min(g1);
                out[g - g0..end - g0].copy_from_slice(&bits[at(g)..at(g) + (end - g)]);
                g = end;
            }
            return out;
        }
        let start_bit = r * self.cols;
        let first_byte = start_bit / 8;
        let shift = start_bit % 8;
        if shift == 0 {
            return &bits[first_byte + g0..first_byte + g1];
        }
        let end = (first_byte + g1 + 1).min(bits.len());
        let src = &bits[first_byte + g0..end];
        let out = &mut scratch[..g1 - g0];
        let mut pairs = src.windows(2);
        for (dst, pair) in out.iter_mut().zip(&mut pairs) {
            *dst = (pair[0] << shift) | (pair[1] >> (8 - shift));
        }
        if src.len() == g1 - g0 {
            // The last group's following byte lies past the end of the buffer.
            if let (Some(dst), Some(&hi)) = (out.last_mut(), src.last()) {
                *dst = hi << shift;
            }
        }
        out
    }
}
