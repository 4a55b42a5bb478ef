//! One AVD residual block: `S ⊙ (u v)` with packed signs and f16 factors.

use bitstack_bits::{LowRankRef, SignLayout, SignMatrix, SignMatrixRef};
use half::f16;
use rayon::prelude::*;

use crate::DecomposeError;

/// One residual block `S ⊙ (u v)` of an `rows × cols` matrix: packed signs `S` (1 bit per
/// weight), `u` (`rows × k`, row-major, f16) and `v` (`k × cols`, row-major, f16).
#[derive(Debug, Clone, PartialEq)]
pub struct AvdBlock {
    signs: SignMatrix,
    u: Vec<f16>,
    v: Vec<f16>,
    k: usize,
}

impl AvdBlock {
    /// Assembles a block, checking that `u` has `rows·k` and `v` has `k·cols` values
    /// (`rows`, `cols` are those of `signs`) and that `k ≥ 1`.
    pub fn from_parts(
        signs: SignMatrix,
        u: Vec<f16>,
        v: Vec<f16>,
        k: usize,
    ) -> Result<Self, DecomposeError> {
        let (rows, cols) = (signs.rows(), signs.cols());
        if k == 0 {
            return Err(DecomposeError::InvalidRank { k, rows, cols });
        }
        let check = |factor: &'static str, dim: usize, got: usize| {
            let expected = dim.checked_mul(k);
            if expected == Some(got) {
                Ok(())
            } else {
                Err(DecomposeError::FactorLength {
                    factor,
                    rows,
                    cols,
                    k,
                    expected: expected.unwrap_or(usize::MAX),
                    got,
                })
            }
        };
        check("u", rows, u.len())?;
        check("v", cols, v.len())?;
        Ok(Self { signs, u, v, k })
    }

    /// Splits the block into its parts `(signs, u, v, k)`.
    pub fn into_parts(self) -> (SignMatrix, Vec<f16>, Vec<f16>, usize) {
        (self.signs, self.u, self.v, self.k)
    }

    /// Number of rows (`m`, output features).
    pub fn rows(&self) -> usize {
        self.signs.rows()
    }

    /// Number of columns (`n`, input features).
    pub fn cols(&self) -> usize {
        self.signs.cols()
    }

    /// Rank of the `u v` factorisation.
    pub fn k(&self) -> usize {
        self.k
    }

    /// The packed signs.
    pub fn signs(&self) -> SignMatrixRef<'_> {
        self.signs.as_view()
    }

    /// `u`: `rows × k`, row-major.
    pub fn u(&self) -> &[f16] {
        &self.u
    }

    /// `v`: `k × cols`, row-major.
    pub fn v(&self) -> &[f16] {
        &self.v
    }

    /// Stored size in bytes of a `rows × cols` block of rank `k`:
    /// `⌈rows·cols/8⌉ + 2·k·(rows + cols)` (saturating on overflow).
    pub fn byte_size(rows: usize, cols: usize, k: usize) -> u64 {
        let (m, n, k) = (rows as u64, cols as u64, k as u64);
        let signs = m.saturating_mul(n).div_ceil(8);
        let factors = 2u64.saturating_mul(k).saturating_mul(m.saturating_add(n));
        signs.saturating_add(factors)
    }

    /// This block's [`byte_size`](Self::byte_size).
    pub fn stored_bytes(&self) -> u64 {
        Self::byte_size(self.rows(), self.cols(), self.k)
    }

    /// `w += S ⊙ (u v)` for a row-major `rows × cols` buffer (f16 factors widened to f32).
    ///
    /// # Panics
    /// If `w.len() != rows · cols`.
    pub fn add_to_dense(&self, w: &mut [f32]) {
        let (m, n, k) = (self.rows(), self.cols(), self.k);
        assert_eq!(w.len(), m * n, "add_to_dense: buffer is not {m}×{n}");
        if m == 0 || n == 0 {
            return;
        }
        let u = widen(&self.u);
        let v = widen(&self.v);
        let bits = self.signs.row_major_bytes();
        let bits = &bits[..];
        let body = |(i, row): (usize, &mut [f32]), prod: &mut Vec<f32>| {
            row_product(&u[i * k..(i + 1) * k], &v, n, prod);
            let base = i * n;
            for (j, (out, p)) in row.iter_mut().zip(prod.iter()).enumerate() {
                *out += if sign_bit(bits, base + j) { *p } else { -*p };
            }
        };
        if m * n >= crate::svd::PAR_THRESHOLD {
            w.par_chunks_mut(n)
                .enumerate()
                .for_each_init(|| vec![0.0f32; n], |prod, item| body(item, prod));
        } else {
            let mut prod = vec![0.0f32; n];
            w.chunks_mut(n)
                .enumerate()
                .for_each(|item| body(item, &mut prod));
        }
    }

    /// `tile += rows row0.. of S ⊙ (u v)` for a row-major tile of `tile.len() / cols` rows:
    /// a piece of the dense block, for batch products that never hold the whole `Ŵ`.
    ///
    /// # Panics
    /// If the tile is not whole rows or reaches past the last row.
    pub fn add_rows_to_dense(&self, row0: usize, tile: &mut [f32]) {
        let (m, n, k) = (self.rows(), self.cols(), self.k);
        if n == 0 {
            return;
        }
        let rows = tile.len() / n;
        assert!(
            tile.len().is_multiple_of(n) && row0 + rows <= m,
            "add_rows_to_dense: rows {row0}..{} of a {m}×{n} block",
            row0 + rows
        );
        if rows == 0 {
            return;
        }
        let u = widen(&self.u[row0 * k..(row0 + rows) * k]);
        let v = widen(&self.v);
        if n.is_multiple_of(8) {
            // Fused: one block of columns at a time, each row's `u v` piece is formed in
            // registers and added with its signs applied (XOR of the f32 sign bit), so the
            // product is never stored (the tile's rows gathered first if the signs are in
            // strips).
            let tile_bits = self.signs.as_view().row_major_rows(row0, row0 + rows);
            pulp::Arch::new().dispatch(AddSigned {
                tile,
                u: &u,
                v: &v,
                bits: &tile_bits,
                n,
                k,
            });
        } else {
            // Rows not on byte boundaries: never strips (whose widths are multiples of 256).
            let bits = self.signs.as_bytes();
            let mut prod = vec![0.0f32; n];
            for (ii, (out, urow)) in tile.chunks_exact_mut(n).zip(u.chunks_exact(k)).enumerate() {
                row_product(urow, &v, n, &mut prod);
                let base = (row0 + ii) * n;
                for (j, (o, &pv)) in out.iter_mut().zip(&prod).enumerate() {
                    *o += if sign_bit(bits, base + j) { pv } else { -pv };
                }
            }
        }
    }

    /// `y += (S ⊙ (u v)) x` without building the dense block:
    /// `Σ_r u[:, r] ⊙ (S · (v[r, :]ᵀ ⊙ x))`, with the `k` sign products sharing one lookup
    /// table per column group ([`SignMatrixRef::lowrank_matvec_add`]).
    ///
    /// # Panics
    /// If `x.len() != cols` or `y.len() != rows`.
    pub fn matvec_add(&self, x: &[f32], y: &mut [f32]) {
        let (m, n, k) = (self.rows(), self.cols(), self.k);
        assert_eq!(
            x.len(),
            n,
            "matvec_add: x has {} values, block has {n} columns",
            x.len()
        );
        assert_eq!(
            y.len(),
            m,
            "matvec_add: y has {} values, block has {m} rows",
            y.len()
        );
        self.signs
            .as_view()
            .lowrank_matvec_add(&self.u, &self.v, k, x, y);
    }

    /// The block with its signs in `layout` (the runtime keeps loaded blocks in
    /// [`SignLayout::Strips`], which the 8-bit decode kernel reads fastest).
    ///
    /// # Errors
    /// [`DecomposeError::Bits`] when the layout does not fit the shape (strips need a width
    /// that is a multiple of [`bitstack_bits::STRIP_COLS`]).
    pub fn into_sign_layout(self, layout: SignLayout) -> Result<Self, DecomposeError> {
        let signs = self.signs.into_layout(layout)?;
        Ok(Self { signs, ..self })
    }

    /// The block as the decode kernel reads it (for
    /// [`bitstack_bits::lowrank_matvec_add`] over several blocks at once).
    pub fn as_lowrank(&self) -> LowRankRef<'_> {
        LowRankRef {
            signs: self.signs.as_view(),
            u: &self.u,
            v: &self.v,
            k: self.k,
        }
    }
}

/// `tile += S ⊙ (u v)` for rows of a multiple of 8 columns, run under
/// [`pulp::Arch::dispatch`] so that its loops compile to the best available vector
/// instructions: whole column blocks through [`panel_products`], the rest eight columns at a
/// time; each entry's product is summed over the rank in order, as [`row_product`].
struct AddSigned<'a> {
    tile: &'a mut [f32],
    /// The tile's rows of `u` (`rows × k`) and the whole `v` (`k × n`), widened.
    u: &'a [f32],
    v: &'a [f32],
    /// The tile's packed signs, one byte per eight entries.
    bits: &'a [u8],
    n: usize,
    k: usize,
}

/// Columns per register block of [`panel_products`].
pub(crate) const PANEL_COLS: usize = 64;

/// For every whole block of [`PANEL_COLS`] columns starting at `j0` and every row `i` of `u`
/// (row-major `rows × k`, `v` row-major `k × n`): `sink(i, j0, Σ_r u[i, r] · v[r, j0..])`,
/// summed over the rank in order (a multiply, then an add: no FMA, so the result does not
/// depend on the instruction set). Column blocks go outside and rows inside, with the
/// block's `k × PANEL_COLS` slice of `v` packed contiguously first (rows `n` apart would fall
/// into the same few L1 sets when `n` is a large power of two). Inlined into its callers so
/// that it compiles for their dispatched instruction set. Returns the first column of the
/// last partial block (`n` rounded down to a multiple of [`PANEL_COLS`]).
#[inline(always)]
pub(crate) fn panel_products(
    u: &[f32],
    v: &[f32],
    n: usize,
    k: usize,
    mut sink: impl FnMut(usize, usize, &[f32; PANEL_COLS]),
) -> usize {
    let whole = n - n % PANEL_COLS;
    let mut panel = vec![0.0f32; k * PANEL_COLS];
    for j0 in (0..whole).step_by(PANEL_COLS) {
        for (dst, vrow) in panel.chunks_exact_mut(PANEL_COLS).zip(v.chunks_exact(n)) {
            dst.copy_from_slice(&vrow[j0..j0 + PANEL_COLS]);
        }
        for (i, urow) in u.chunks_exact(k).enumerate() {
            let mut acc = [0.0f32; PANEL_COLS];
            for (&c, vr) in urow.iter().zip(panel.chunks_exact(PANEL_COLS)) {
                for (a, &y) in acc.iter_mut().zip(vr) {
                    *a += c * y;
                }
            }
            sink(i, j0, &acc);
        }
    }
    whole
}

impl pulp::WithSimd for AddSigned<'_> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, _simd: S) {
        let Self {
            tile,
            u,
            v,
            bits,
            n,
            k,
        } = self;
        let whole = panel_products(u, v, n, k, |i, j0, acc| {
            let trow = &mut tile[i * n..(i + 1) * n];
            let row_bits = &bits[(i * n + j0) / 8..(i * n + j0 + PANEL_COLS) / 8];
            add_signed(&mut trow[j0..j0 + PANEL_COLS], acc, row_bits);
        });
        // The last columns (a multiple of 8), eight at a time.
        for j0 in (whole..n).step_by(8) {
            for (i, (urow, trow)) in u.chunks_exact(k).zip(tile.chunks_exact_mut(n)).enumerate() {
                let mut acc = [0.0f32; 8];
                for (r, &c) in urow.iter().enumerate() {
                    for (a, &y) in acc.iter_mut().zip(&v[r * n + j0..r * n + j0 + 8]) {
                        *a += c * y;
                    }
                }
                let b = (i * n + j0) / 8;
                add_signed(&mut trow[j0..j0 + 8], &acc, &bits[b..b + 1]);
            }
        }
    }
}

/// `out += S ⊙ p` for whole bytes of signs (MSB first): XORs of the f32 sign bit.
#[inline(always)]
fn add_signed(out: &mut [f32], p: &[f32], bits: &[u8]) {
    for ((o8, p8), &byte) in out.chunks_exact_mut(8).zip(p.chunks_exact(8)).zip(bits) {
        // Fixed-size arrays: the eight lanes become one vector XOR and one add.
        let masks = NEGATE_MASKS[byte as usize];
        let mut o = [0.0f32; 8];
        o.copy_from_slice(o8);
        let mut q = [0.0f32; 8];
        q.copy_from_slice(p8);
        for t in 0..8 {
            o[t] += f32::from_bits(q[t].to_bits() ^ masks[t]);
        }
        o8.copy_from_slice(&o);
    }
}

/// For each packed byte (MSB first = first weight), the XOR masks that negate the weights
/// whose bit is 0 (sign −1).
static NEGATE_MASKS: [[u32; 8]; 256] = {
    let mut t = [[0u32; 8]; 256];
    let mut b = 0;
    while b < 256 {
        let mut j = 0;
        while j < 8 {
            if (b >> (7 - j)) & 1 == 0 {
                t[b][j] = 0x8000_0000;
            }
            j += 1;
        }
        b += 1;
    }
    t
};

/// f16 → f32.
pub(crate) fn widen(x: &[f16]) -> Vec<f32> {
    use half::slice::HalfFloatSliceExt;
    let mut out = vec![0.0f32; x.len()];
    x.convert_to_f32_slice(&mut out);
    out
}

/// `out[j] = Σ_r u_row[r] · v[r, j]` for a row-major `k × n` `v`.
#[inline]
pub(crate) fn row_product(u_row: &[f32], v: &[f32], n: usize, out: &mut [f32]) {
    out.fill(0.0);
    for (r, &ur) in u_row.iter().enumerate() {
        let v_row = &v[r * n..(r + 1) * n];
        for (o, &vr) in out.iter_mut().zip(v_row) {
            *o += ur * vr;
        }
    }
}

/// Bit `idx` of the row-major packed layout (MSB first); `true` = +1.
#[inline]
pub(crate) fn sign_bit(bits: &[u8], idx: usize) -> bool {
    (bits[idx >> 3] >> (7 - (idx & 7))) & 1 == 1
}
