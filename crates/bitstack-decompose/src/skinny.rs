//! Products of the residual `A = |R|` (row-major `m × n`, large) with skinny matrices: the
//! randomized SVD's passes `Y = A X` and `Z = Aᵀ Q`, register-blocked for AVX-512; and the
//! fast mode's fused residual update.
//!
//! faer ran these shapes (32 or 64 columns against a 14336 × 4096 matrix) at ~37 GFLOP/s
//! per core on the AVX-512 machine measured (Intel family 6 model 207, whose two FMA units
//! peak at ~160 GFLOP/s per core): its micro-kernels are general. Here (from `perf` sample
//! shares in the same decomposition, ~65–85 GFLOP/s per core):
//!
//! * `Y = A X`: 12 rows of `A` × 32 columns of `X` per tile (24 `zmm` accumulators); each
//!   step loads one row of `X` (two vectors, from L2) and broadcasts one entry of each of the
//!   12 rows of `A` into the FMAs.
//! * `Z = Aᵀ Q`, computed as `Zᵀ = Qᵀ A`: 48 columns of `A` × 8 columns of `Q` per tile; each
//!   step loads 48 consecutive entries of one row of `A` and broadcasts 8 entries of the same
//!   row of `Q`. Rows of `A` are taken 64 at a time and copied, a panel of columns at a time,
//!   into a buffer where each 48-column piece of the 64 rows is contiguous (read in place,
//!   rows `4n` bytes apart fell into the same few cache sets and missed), and in fixed
//!   chunks of [`AT_CHUNK`] rows whose partial products run in parallel and are added in
//!   chunk order.
//! * [`stored_update`]: the residual update of one row tile, bit for bit the portable
//!   arithmetic, with the products `u v` kept in registers.
//!
//! All are deterministic: the order of every sum depends on the shapes only, not on the
//! number of threads. Where AVX-512 is missing the functions return `None` and the caller
//! uses faer (the products) or the portable loops (the update).

#![allow(unsafe_code)] // SIMD only; every block states what it relies on.

use faer::{Mat, MatRef};
use rayon::prelude::*;

/// Rows of `A` per partial product of [`at_times`] (fixed, so that the order in which the
/// partial products are added does not depend on the number of threads).
pub(crate) const AT_CHUNK: usize = 1024;

/// Rows of `A` per parallel task of [`a_times`] (a multiple of the 12-row tile).
const A_TASK_ROWS: usize = 96;

/// Whether the register-blocked products run on this CPU.
pub(crate) fn accelerated() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `x` row-major, its rows padded with zeros to a multiple of `multiple` columns; and that
/// padded width.
fn padded_rows(x: MatRef<'_, f32>, multiple: usize) -> (Vec<f32>, usize) {
    let width = x.ncols().div_ceil(multiple) * multiple;
    let mut out = vec![0.0f32; x.nrows() * width];
    for (i, row) in out.chunks_exact_mut(width).enumerate() {
        for (c, v) in row[..x.ncols()].iter_mut().enumerate() {
            *v = x[(i, c)];
        }
    }
    (out, width)
}

/// `Y = A X` for the row-major `m × n` matrix `a` and `x` (`n × l`); `None` where
/// [`accelerated`] is false.
pub(crate) fn a_times(
    a: &[f32],
    m: usize,
    n: usize,
    x: MatRef<'_, f32>,
    parallel: bool,
) -> Option<Mat<f32>> {
    if !accelerated() || a.len() != m * n || x.nrows() != n {
        return None;
    }
    let l = x.ncols();
    if m == 0 || l == 0 {
        return Some(Mat::zeros(m, l));
    }
    let (xp, lp) = padded_rows(x, 16);
    let mut y = vec![0.0f32; m * l];
    let task = |(t, yc): (usize, &mut [f32])| {
        let i0 = t * A_TASK_ROWS;
        let rows = yc.len() / l;
        let ac = &a[i0 * n..(i0 + rows) * n];
        #[cfg(target_arch = "x86_64")]
        // SAFETY: AVX-512 F is present (`accelerated`); the slices have the lengths that
        // `a_times_rows` requires: `ac` rows × n, `xp` n × lp, `yc` rows × l, lp ≥ l.
        unsafe {
            avx512::a_times_rows(ac, n, &xp, lp, yc, l);
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = (ac, rows);
    };
    if parallel {
        y.par_chunks_mut(A_TASK_ROWS * l).enumerate().for_each(task);
    } else {
        y.chunks_mut(A_TASK_ROWS * l).enumerate().for_each(task);
    }
    Some(Mat::from_fn(m, l, |i, c| y[i * l + c]))
}

/// `Z = Aᵀ Q` for the row-major `m × n` matrix `a` and `q` (`m × w`); `None` where
/// [`accelerated`] is false.
pub(crate) fn at_times(
    a: &[f32],
    m: usize,
    n: usize,
    q: MatRef<'_, f32>,
    parallel: bool,
) -> Option<Mat<f32>> {
    if !accelerated() || a.len() != m * n || q.nrows() != m {
        return None;
    }
    let w = q.ncols();
    if n == 0 || w == 0 {
        return Some(Mat::zeros(n, w));
    }
    let (qp, wp) = padded_rows(q, 8);
    let partial = |c: usize| {
        let r0 = c * AT_CHUNK;
        let rows = AT_CHUNK.min(m - r0);
        let mut zt = vec![0.0f32; wp * n];
        #[cfg(target_arch = "x86_64")]
        // SAFETY: AVX-512 F is present (`accelerated`); `a` holds rows × n entries from
        // row r0, `qp` rows × wp from row r0, `zt` is wp × n, wp a multiple of 8.
        unsafe {
            avx512::at_times_rows(
                &a[r0 * n..(r0 + rows) * n],
                n,
                &qp[r0 * wp..(r0 + rows) * wp],
                wp,
                &mut zt,
            );
        }
        zt
    };
    let chunks = m.div_ceil(AT_CHUNK);
    let parts: Vec<Vec<f32>> = if parallel {
        (0..chunks).into_par_iter().map(partial).collect()
    } else {
        (0..chunks).map(partial).collect()
    };
    let mut zt = parts.first().cloned().unwrap_or_default();
    for p in parts.iter().skip(1) {
        for (s, &v) in zt.iter_mut().zip(p) {
            *s += v;
        }
    }
    Some(Mat::from_fn(n, w, |j, c| zt[c * n + j]))
}

/// The fast mode's residual update of one row tile ([`crate::avd`]'s `Residual::Stored`),
/// fused and vectorized: `P = u_tile · v` formed 64 columns at a time in registers (never
/// stored), then `D = A − P`, `A ← |D|` and the packed signs flipped where `D < 0` (kept
/// where `D = 0`). Returns `Σ D²`.
///
/// Bit for bit the arithmetic of the portable path (`tile_product` then `update_bytes`):
/// products summed over the rank in order from 0 without FMA, squares summed in the same
/// tree per 8 entries, those sums added in f64 in entry order. `None` where AVX-512 is
/// missing or `n` is not a multiple of 16 (the caller then takes the portable path).
pub(crate) fn stored_update(
    a: &mut [f32],
    bits: &mut [u8],
    u_tile: &[f32],
    v_panels: &[f32],
    n: usize,
    k: usize,
) -> Option<f64> {
    if !accelerated() || n == 0 || !n.is_multiple_of(16) || k == 0 {
        return None;
    }
    let rows = a.len() / n;
    if a.len() != rows * n || bits.len() != rows * n / 8 || u_tile.len() != rows * k {
        return None;
    }
    if v_panels.len() != k * n {
        return None;
    }
    #[cfg(target_arch = "x86_64")]
    // SAFETY: AVX-512 F is present (`accelerated`); the lengths are checked above.
    let sum = unsafe { avx512::stored_update_rows(a, bits, u_tile, v_panels, n, k) };
    #[cfg(not(target_arch = "x86_64"))]
    let sum = 0.0;
    Some(sum)
}

/// `v` (row-major `k × n`, `n` a multiple of 16) in the layout [`stored_update`] reads:
/// panels of 64 columns (the last one of 16, 32 or 48), each `k` rows of its width stored
/// contiguously, so that a panel's rows do not share the L1 sets that rows `4n` bytes
/// apart would.
pub(crate) fn v_panels(v: &[f32], n: usize, k: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(v.len());
    let mut j0 = 0;
    while j0 < n {
        let width = (n - j0).min(64);
        for r in 0..k {
            out.extend_from_slice(&v[r * n + j0..r * n + j0 + width]);
        }
        j0 += width;
    }
    out
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    /// Rows of `A` per tile of `Y = A X`.
    const R: usize = 12;
    /// Rows of `A` whose column pieces stay in L1 while the column groups of `Q` pass.
    const S: usize = 64;
    /// Columns of `A` copied into the buffer of [`at_times_rows`] at a time (8 pieces of 48).
    const P: usize = 1536;
    /// Columns of `Q` per tile of `Zᵀ = Qᵀ A`.
    const C: usize = 8;

    /// `y = a · x` for `a` (`rows × n`), `x` (`n × lp`, row-major, columns from `l` on zero)
    /// and `y` (`rows × l`), `rows = y.len() / l`.
    ///
    /// # Safety
    /// AVX-512 F must be available; `a.len() == rows · n`, `x.len() == n · lp`,
    /// `y.len() == rows · l`, `l ≤ lp`, `lp` a multiple of 16.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn a_times_rows(
        a: &[f32],
        n: usize,
        x: &[f32],
        lp: usize,
        y: &mut [f32],
        l: usize,
    ) {
        let rows = y.len() / l;
        debug_assert!(a.len() == rows * n && x.len() == n * lp && l <= lp && lp.is_multiple_of(16));
        let (ap, xp, yp) = (a.as_ptr(), x.as_ptr(), y.as_mut_ptr());
        let mut g0 = 0;
        while g0 < l {
            let width = (l - g0).min(32);
            // SAFETY: columns g0 .. g0 + 16·L of `x` exist (g0 + 32 ≤ lp when width > 16,
            // g0 + 16 ≤ lp otherwise); `rows_group` keeps to the rows and masks the stores.
            unsafe {
                let (x0, y0) = (xp.add(g0), yp.add(g0));
                if width > 16 {
                    rows_group::<2>(ap, n, x0, lp, y0, l, width, rows);
                } else {
                    rows_group::<1>(ap, n, x0, lp, y0, l, width, rows);
                }
            }
            g0 += 32;
        }
    }

    /// All `rows` rows of one group of `16·L` columns: tiles of [`R`] rows, then single rows.
    ///
    /// # Safety
    /// As [`tile`], for `rows` rows of `a` and `y`.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    unsafe fn rows_group<const L: usize>(
        a: *const f32,
        n: usize,
        x: *const f32,
        lp: usize,
        y: *mut f32,
        l: usize,
        width: usize,
        rows: usize,
    ) {
        let mut i = 0;
        // SAFETY: rows i .. i + R (or i + 1) ≤ rows exist (the caller's contract).
        unsafe {
            while i + R <= rows {
                tile::<R, L>(a.add(i * n), n, x, lp, y.add(i * l), l, width);
                i += R;
            }
            while i < rows {
                tile::<1, L>(a.add(i * n), n, x, lp, y.add(i * l), l, width);
                i += 1;
            }
        }
    }

    /// `RR` rows × `16·L` columns of `y = a · x` (the first `width` columns stored).
    ///
    /// # Safety
    /// Inlined into an AVX-512 F function; `a` has `RR` rows of `n` (stride `n`), `x` has
    /// `n` rows of `16·L` readable columns (stride `lp`), `y` has `RR` rows of `width`
    /// writable columns (stride `l`), `width ≤ 16·L`.
    #[inline(always)]
    unsafe fn tile<const RR: usize, const L: usize>(
        a: *const f32,
        n: usize,
        x: *const f32,
        lp: usize,
        y: *mut f32,
        l: usize,
        width: usize,
    ) {
        // SAFETY: the caller's contract (see above).
        unsafe {
            let mut acc = [[_mm512_setzero_ps(); L]; RR];
            for j in 0..n {
                let xr = x.add(j * lp);
                let mut xv = [_mm512_setzero_ps(); L];
                for (c, v) in xv.iter_mut().enumerate() {
                    *v = _mm512_loadu_ps(xr.add(16 * c));
                }
                for (r, accr) in acc.iter_mut().enumerate() {
                    let b = _mm512_set1_ps(*a.add(r * n + j));
                    for (s, &v) in accr.iter_mut().zip(&xv) {
                        *s = _mm512_fmadd_ps(b, v, *s);
                    }
                }
            }
            for (r, accr) in acc.iter().enumerate() {
                for (c, &v) in accr.iter().enumerate() {
                    let cols = width.saturating_sub(16 * c).min(16);
                    let mask = ((1u32 << cols) - 1) as u16;
                    _mm512_mask_storeu_ps(y.add(r * l + 16 * c), mask, v);
                }
            }
        }
    }

    /// [`super::stored_update`] for `rows = a.len() / n` rows.
    ///
    /// # Safety
    /// AVX-512 F must be available; `n` a nonzero multiple of 16, `a.len() == rows · n`,
    /// `bits.len() == rows · n / 8`, `u.len() == rows · k`, `vp.len() == k · n` (as
    /// [`super::v_panels`] lays it out).
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn stored_update_rows(
        a: &mut [f32],
        bits: &mut [u8],
        u: &[f32],
        vp: &[f32],
        n: usize,
        k: usize,
    ) -> f64 {
        let rows = a.len() / n;
        debug_assert!(bits.len() * 8 == a.len() && u.len() == rows * k && vp.len() == k * n);
        let mut sum = 0.0f64;
        let (ap, bp, vpp) = (a.as_mut_ptr(), bits.as_mut_ptr(), vp.as_ptr());
        for i in 0..rows {
            let ur = &u[i * k..(i + 1) * k];
            let mut j0 = 0;
            while j0 < n {
                let width = (n - j0).min(64);
                // SAFETY: the panel of columns j0 .. j0 + width starts at k·j0 in `vp` and
                // holds k rows of `width`; row i's entries j0 .. j0 + width of `a` and their
                // width / 8 bytes of signs exist.
                unsafe {
                    let panel = vpp.add(k * j0);
                    let (arow, brow) = (ap.add(i * n + j0), bp.add((i * n + j0) / 8));
                    sum += match width / 16 {
                        4 => panel_update::<4>(panel, ur, arow, brow),
                        3 => panel_update::<3>(panel, ur, arow, brow),
                        2 => panel_update::<2>(panel, ur, arow, brow),
                        _ => panel_update::<1>(panel, ur, arow, brow),
                    };
                }
                j0 += width;
            }
        }
        sum
    }

    /// One row's `16·V` columns of the update; returns their `Σ D²` (summed as the
    /// portable path sums it, from 0).
    ///
    /// # Safety
    /// Inlined into an AVX-512 F function; `panel` holds `u.len()` rows of `16·V` floats,
    /// `a` `16·V` floats, `bits` `2·V` bytes.
    #[inline(always)]
    unsafe fn panel_update<const V: usize>(
        panel: *const f32,
        u: &[f32],
        a: *mut f32,
        bits: *mut u8,
    ) -> f64 {
        // SAFETY: the caller's contract (see above).
        unsafe {
            let mut acc = [_mm512_setzero_ps(); V];
            for (r, &c) in u.iter().enumerate() {
                let cv = _mm512_set1_ps(c);
                let row = panel.add(r * 16 * V);
                for (t, s) in acc.iter_mut().enumerate() {
                    // No FMA: the portable path rounds the product, then the sum.
                    *s = _mm512_add_ps(*s, _mm512_mul_ps(cv, _mm512_loadu_ps(row.add(16 * t))));
                }
            }
            let zero = _mm512_setzero_ps();
            let reverse = _mm512_set_epi32(8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7);
            let mut sum = 0.0f64;
            for (t, &p) in acc.iter().enumerate() {
                let at = a.add(16 * t);
                let d = _mm512_sub_ps(_mm512_loadu_ps(at), p);
                // Σ d² per 8 lanes in the portable tree ((0+1)+(2+3))+((4+5)+(6+7)).
                let sq = _mm512_mul_ps(d, d);
                let s1 = _mm512_add_ps(sq, _mm512_permute_ps::<0b1011_0001>(sq));
                let s2 = _mm512_add_ps(s1, _mm512_permute_ps::<0b0100_1110>(s1));
                let s3 = _mm512_add_ps(s2, _mm512_shuffle_f32x4::<0b1011_0001>(s2, s2));
                let lanes = _mm512_castps512_ps256(s3);
                let high = _mm512_extractf32x4_ps::<2>(s3);
                sum += f64::from(_mm_cvtss_f32(_mm256_castps256_ps128(lanes)));
                sum += f64::from(_mm_cvtss_f32(high));
                _mm512_storeu_ps(at, _mm512_abs_ps(d));
                // Lanes reversed within each group of 8: mask bit b of each byte is then the
                // entry 7 − b, the packed signs' order (MSB first).
                let dr = _mm512_permutexvar_ps(reverse, d);
                let ge = _mm512_cmp_ps_mask::<_CMP_GE_OQ>(dr, zero);
                let le = _mm512_cmp_ps_mask::<_CMP_LE_OQ>(dr, zero);
                let byte = bits.add(2 * t).cast::<u16>();
                let old = byte.read_unaligned();
                byte.write_unaligned((old & ge) | (!old & le));
            }
            sum
        }
    }

    /// `zt += qᵀ · a` for `a` (`rows × n`), `q` (`rows × wp`, row-major) and `zt`
    /// (`wp × n`, row-major), `rows = a.len() / n`.
    ///
    /// Rows of `a` are `4n` bytes apart, so the pieces of 64 rows that a tile reads fall into
    /// the same few L1 and L2 sets (and into more streams than the hardware prefetchers
    /// follow): read in place, most loads missed. So 64 rows × [`P`] columns at a time are
    /// first copied, row by row (sequential reads), into a buffer laid out piece by piece
    /// (48 columns × 64 rows contiguous, zeros past `n`), and the tiles read the buffer.
    ///
    /// # Safety
    /// AVX-512 F must be available; `q.len() == rows · wp`, `zt.len() == wp · n`, `wp` a
    /// multiple of 8.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn at_times_rows(a: &[f32], n: usize, q: &[f32], wp: usize, zt: &mut [f32]) {
        let rows = a.len() / n;
        debug_assert!(q.len() == rows * wp && zt.len() == wp * n && wp.is_multiple_of(C));
        let (ap, qp, zp) = (a.as_ptr(), q.as_ptr(), zt.as_mut_ptr());
        let mut packed = vec![0.0f32; S * P];
        let pk = packed.as_mut_ptr();
        for s0 in (0..rows).step_by(S) {
            let srows = S.min(rows - s0);
            for p0 in (0..n).step_by(P) {
                let width = P.min(n - p0);
                let pieces = width.div_ceil(48);
                // SAFETY: rows s0 .. s0 + srows of `a` have columns p0 .. p0 + width (the
                // loads are masked to them); piece b of row i is written at
                // pk + (b·S + i)·48, within the S·P floats since pieces ≤ P / 48.
                unsafe {
                    for i in 0..srows {
                        let ar = ap.add((s0 + i) * n + p0);
                        for b in 0..pieces {
                            let dst = pk.add((b * S + i) * 48);
                            for v in 0..3 {
                                let c0 = 48 * b + 16 * v;
                                let left = width.saturating_sub(c0).min(16);
                                let mask = ((1u32 << left) - 1) as u16;
                                let x = _mm512_maskz_loadu_ps(mask, ar.add(c0.min(width)));
                                _mm512_storeu_ps(dst.add(16 * v), x);
                            }
                        }
                    }
                }
                for b in 0..pieces {
                    let j0 = p0 + 48 * b;
                    let rem = (n - j0).min(48);
                    let vectors = rem.div_ceil(16);
                    let tail = rem - 16 * (vectors - 1);
                    let mask = ((1u32 << tail) - 1) as u16;
                    // SAFETY: piece b of the buffer holds srows rows of 48 floats; rows
                    // s0 .. s0 + srows of `q` exist; columns j0 .. j0 + rem of `zt` exist
                    // and `mask` limits the last vector to them.
                    unsafe {
                        let (a0, q0, z0) = (pk.add(b * S * 48), qp.add(s0 * wp), zp.add(j0));
                        match vectors {
                            1 => block::<1>(a0, q0, wp, z0, n, srows, mask),
                            2 => block::<2>(a0, q0, wp, z0, n, srows, mask),
                            _ => block::<3>(a0, q0, wp, z0, n, srows, mask),
                        }
                    }
                }
            }
        }
    }

    /// `zt[:, 0 .. 16·J] += qᵀ a` over `rows` rows of the packed piece `a` (48 floats a
    /// row), the last vector's lanes of `zt` limited to `mask`.
    ///
    /// # Safety
    /// Inlined into an AVX-512 F function; `a` holds `rows` rows of 48 floats, `q` `rows`
    /// rows of `wp` columns, `zt` `wp` rows (stride `n`) of `16·J` columns from the pointer
    /// on, the last vector's lanes outside `mask` excepted.
    #[inline(always)]
    unsafe fn block<const J: usize>(
        a: *const f32,
        q: *const f32,
        wp: usize,
        zt: *mut f32,
        n: usize,
        rows: usize,
        mask: u16,
    ) {
        let lane_mask = |v: usize| if v + 1 == J { mask } else { u16::MAX };
        // SAFETY: the caller's contract (see above).
        unsafe {
            for cg in (0..wp).step_by(C) {
                let mut acc = [[_mm512_setzero_ps(); J]; C];
                for (c, accc) in acc.iter_mut().enumerate() {
                    for (v, s) in accc.iter_mut().enumerate() {
                        *s = _mm512_maskz_loadu_ps(lane_mask(v), zt.add((cg + c) * n + 16 * v));
                    }
                }
                for i in 0..rows {
                    let ar = a.add(i * 48);
                    let mut av = [_mm512_setzero_ps(); J];
                    for (v, x) in av.iter_mut().enumerate() {
                        *x = _mm512_loadu_ps(ar.add(16 * v));
                    }
                    let qr = q.add(i * wp + cg);
                    for (c, accc) in acc.iter_mut().enumerate() {
                        let b = _mm512_set1_ps(*qr.add(c));
                        for (s, &x) in accc.iter_mut().zip(&av) {
                            *s = _mm512_fmadd_ps(b, x, *s);
                        }
                    }
                }
                for (c, accc) in acc.iter().enumerate() {
                    for (v, &s) in accc.iter().enumerate() {
                        _mm512_mask_storeu_ps(zt.add((cg + c) * n + 16 * v), lane_mask(v), s);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use proptest::prelude::*;
    use rand::{Rng, SeedableRng};

    fn randoms(len: usize, seed: u64) -> Vec<f32> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        (0..len).map(|_| rng.random::<f32>() * 2.0 - 1.0).collect()
    }

    /// Checks `got` (`rows × cols`) against the f64 products `Σ_t lhs(i, t) · rhs(t, c)`,
    /// to 1e-5 of `Σ_t |lhs(i, t) · rhs(t, c)|`.
    fn check(
        got: &Mat<f32>,
        inner: usize,
        lhs: impl Fn(usize, usize) -> f32,
        rhs: impl Fn(usize, usize) -> f32,
    ) {
        for i in 0..got.nrows() {
            for c in 0..got.ncols() {
                let (mut sum, mut mag) = (0.0f64, 0.0f64);
                for t in 0..inner {
                    let p = f64::from(lhs(i, t)) * f64::from(rhs(t, c));
                    sum += p;
                    mag += p.abs();
                }
                let diff = (f64::from(got[(i, c)]) - sum).abs();
                assert!(
                    diff <= 1e-5 * mag + 1e-30,
                    "({i}, {c}): {} vs {sum}",
                    got[(i, c)]
                );
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]
        /// Shapes around every tile edge: rows not a multiple of 12 or 64 or 1024, columns
        /// not a multiple of 16 or 48, 1 to 70 skinny columns; one thread and several.
        #[test]
        fn products_match_f64(
            m in 1usize..1100,
            n in 1usize..120,
            w in 1usize..71,
            seed in any::<u64>(),
            parallel in any::<bool>(),
        ) {
            prop_assume!(accelerated());
            let a = randoms(m * n, seed);
            let x = Mat::from_fn(n, w, |j, c| randoms(1, seed ^ (j * 131 + c) as u64)[0]);
            let y = a_times(&a, m, n, x.as_ref(), parallel).unwrap();
            prop_assert_eq!((y.nrows(), y.ncols()), (m, w));
            check(&y, n, |i, t| a[i * n + t], |t, c| x[(t, c)]);
            let q = Mat::from_fn(m, w, |i, c| ((i * 7 + c * 3) % 11) as f32 / 5.0 - 1.0);
            let z = at_times(&a, m, n, q.as_ref(), parallel).unwrap();
            prop_assert_eq!((z.nrows(), z.ncols()), (n, w));
            check(&z, m, |j, t| a[t * n + j], |t, c| q[(t, c)]);
        }
    }

    #[test]
    fn results_do_not_depend_on_threads() {
        if !accelerated() {
            return;
        }
        let (m, n, w) = (2500, 100, 33);
        let a = randoms(m * n, 3);
        let q = Mat::from_fn(m, w, |i, c| ((i + c) % 13) as f32 - 6.0);
        let x = Mat::from_fn(n, w, |j, c| ((j * 5 + c) % 7) as f32 - 3.0);
        let seq = at_times(&a, m, n, q.as_ref(), false).unwrap();
        let par = at_times(&a, m, n, q.as_ref(), true).unwrap();
        assert!(seq == par);
        let seq = a_times(&a, m, n, x.as_ref(), false).unwrap();
        let par = a_times(&a, m, n, x.as_ref(), true).unwrap();
        assert!(seq == par);
    }
}
