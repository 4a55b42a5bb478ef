//! Nested bit-plane blocks: a per-group uniform grid refined one sign bit per weight at a time.
//!
//! Each row of a `rows × cols` matrix is cut into groups of `group` consecutive columns. A
//! group's values lie in `[lo, hi]`; the grid stores its centre `mid = (lo + hi) / 2` and
//! half-width `half = (hi − lo) / 2` (f16). Plane `p` (0-based) is a ±1 matrix `S_p` chosen by
//! successive approximation, `S_p = sign(w − ŵ_p)`, and refines the reconstruction by
//! `half · 2^{−(p+1)} · S_p`:
//!
//! ```text
//! ŵ_0 = mid,   ŵ_{p+1} = ŵ_p + half · 2^{−(p+1)} · S_p
//! ```
//!
//! After `P` planes every weight is within `half · 2^{−P}` of `ŵ_P`: the reconstruction is the
//! centre of the interval of width `2·half·2^{−P}` that the first `P` bits of the weight's
//! position in `[lo, hi]` select — uniform `P`-bit quantization with a midrise grid, where any
//! number of planes is a valid (prefix-consistent) reconstruction. As blocks, plane 0 carries
//! the grid (`mid` adds to the matrix with it) and every plane is `Δ_p = half·2^{−(p+1)} ⊙ S_p`,
//! a sign matrix with per-group scales: the sign-matrix kernels apply.

use std::sync::Arc;

use bitstack_bits::{SignMatrix, SignMatrixRef, Simd};
use half::f16;
use rayon::prelude::*;

use crate::DecomposeError;

/// Largest number of planes (beyond ~24 planes the steps fall below f32 resolution).
pub const MAX_PLANES: usize = 24;

/// Parameters of [`decompose_planes`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PlaneParams {
    /// Columns per group (a multiple of 8, ≥ 8); each group has its own `mid` and `half`.
    pub group: usize,
    /// Number of planes (blocks) to compute, `1..=MAX_PLANES`.
    pub planes: usize,
}

impl PlaneParams {
    /// Whether these parameters are valid for any matrix: `group` a multiple of 8 (≥ 8) and
    /// `1 ≤ planes ≤ MAX_PLANES` (what [`decompose_planes`] checks first, for callers that
    /// check before any work starts).
    ///
    /// # Errors
    /// [`DecomposeError::InvalidGroup`], [`DecomposeError::NoPlanes`] or
    /// [`DecomposeError::TooManyPlanes`].
    pub fn check(&self) -> Result<(), DecomposeError> {
        check_group(self.group)?;
        if self.planes == 0 {
            return Err(DecomposeError::NoPlanes);
        }
        if self.planes > MAX_PLANES {
            return Err(DecomposeError::TooManyPlanes {
                planes: self.planes,
            });
        }
        Ok(())
    }
}

impl Default for PlaneParams {
    /// `group = 128`, `planes = 8`.
    fn default() -> Self {
        Self {
            group: 128,
            planes: 8,
        }
    }
}

/// The per-group grid of a matrix: `mid` and `half`, row-major `rows × groups`, f16.
#[derive(Debug, Clone, PartialEq)]
pub struct PlaneGrid {
    rows: usize,
    cols: usize,
    group: usize,
    mid: Vec<f16>,
    half: Vec<f16>,
}

impl PlaneGrid {
    /// Assembles a grid, checking the lengths (`rows · ceil(cols / group)` each), that the
    /// group is a multiple of 8 and that every value is finite with `half ≥ 0`.
    pub fn new(
        rows: usize,
        cols: usize,
        group: usize,
        mid: Vec<f16>,
        half: Vec<f16>,
    ) -> Result<Self, DecomposeError> {
        check_group(group)?;
        let expected = rows.checked_mul(cols.div_ceil(group));
        for (part, got) in [("mid", mid.len()), ("half", half.len())] {
            if expected != Some(got) {
                return Err(DecomposeError::GridLength {
                    part,
                    rows,
                    cols,
                    group,
                    expected: expected.unwrap_or(usize::MAX),
                    got,
                });
            }
        }
        let bad = mid
            .iter()
            .map(|m| m.to_f32())
            .chain(half.iter().map(|h| h.to_f32()))
            .find(|v| !v.is_finite())
            .or_else(|| half.iter().map(|h| h.to_f32()).find(|&h| h < 0.0));
        if let Some(value) = bad {
            return Err(DecomposeError::InvalidGrid { value });
        }
        Ok(Self {
            rows,
            cols,
            group,
            mid,
            half,
        })
    }

    /// Rows of the matrix.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Columns of the matrix.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Columns per group.
    pub fn group(&self) -> usize {
        self.group
    }

    /// Groups per row, `ceil(cols / group)`.
    pub fn groups(&self) -> usize {
        self.cols.div_ceil(self.group)
    }

    /// Group centres, row-major `rows × groups`.
    pub fn mid(&self) -> &[f16] {
        &self.mid
    }

    /// Group half-widths, row-major `rows × groups`.
    pub fn half(&self) -> &[f16] {
        &self.half
    }

    /// Stored bytes of a grid: two f16 per group.
    pub fn byte_size(rows: usize, cols: usize, group: usize) -> u64 {
        (rows as u64) * (cols.div_ceil(group.max(1)) as u64) * 4
    }
}

fn check_group(group: usize) -> Result<(), DecomposeError> {
    if group < 8 || !group.is_multiple_of(8) {
        return Err(DecomposeError::InvalidGroup { group });
    }
    Ok(())
}

/// One plane: `Δ = half·2^{−(plane+1)} ⊙ S` (plus `mid` for plane 0), sharing the matrix's
/// [`PlaneGrid`] with the other planes.
#[derive(Debug, Clone, PartialEq)]
pub struct PlaneBlock {
    grid: Arc<PlaneGrid>,
    plane: usize,
    signs: SignMatrix,
}

impl PlaneBlock {
    /// Assembles a plane; `signs` must have the grid's shape and `plane < MAX_PLANES` (they
    /// are kept row-major, rearranged if given in another layout).
    pub fn new(
        grid: Arc<PlaneGrid>,
        plane: usize,
        signs: SignMatrix,
    ) -> Result<Self, DecomposeError> {
        if plane >= MAX_PLANES {
            return Err(DecomposeError::TooManyPlanes { planes: plane + 1 });
        }
        if signs.rows() != grid.rows || signs.cols() != grid.cols {
            return Err(DecomposeError::PlaneShape {
                rows: signs.rows(),
                cols: signs.cols(),
                grid_rows: grid.rows,
                grid_cols: grid.cols,
            });
        }
        // The plane kernels read whole row-major rows.
        let signs = signs.into_layout(bitstack_bits::SignLayout::RowMajor)?;
        Ok(Self { grid, plane, signs })
    }

    /// The shared grid.
    pub fn grid(&self) -> &Arc<PlaneGrid> {
        &self.grid
    }

    /// The plane number (0 carries the grid).
    pub fn plane(&self) -> usize {
        self.plane
    }

    /// The packed signs.
    pub fn signs(&self) -> SignMatrixRef<'_> {
        self.signs.as_view()
    }

    /// Splits the block into its grid, plane number and signs.
    pub fn into_parts(self) -> (Arc<PlaneGrid>, usize, SignMatrix) {
        (self.grid, self.plane, self.signs)
    }

    /// Rows.
    pub fn rows(&self) -> usize {
        self.grid.rows
    }

    /// Columns.
    pub fn cols(&self) -> usize {
        self.grid.cols
    }

    /// Stored bytes of plane `plane` of a `rows × cols` matrix: the packed signs, plus the
    /// grid for plane 0.
    pub fn byte_size(rows: usize, cols: usize, group: usize, plane: usize) -> u64 {
        let signs = bitstack_bits::checked_packed_len(rows, cols).unwrap_or(usize::MAX) as u64;
        if plane == 0 {
            signs + PlaneGrid::byte_size(rows, cols, group)
        } else {
            signs
        }
    }

    /// Stored bytes of this plane.
    pub fn stored_bytes(&self) -> u64 {
        Self::byte_size(self.rows(), self.cols(), self.grid.group, self.plane)
    }

    /// The scale of this plane's signs: `2^{−(plane+1)}`.
    fn factor(&self) -> f32 {
        plane_factor(self.plane)
    }

    /// `w += Δ` for a dense row-major `rows × cols` matrix.
    ///
    /// # Panics
    /// If `w.len() != rows · cols`.
    pub fn add_to_dense(&self, w: &mut [f32]) {
        assert_eq!(
            w.len(),
            self.rows() * self.cols(),
            "add_to_dense: wrong size"
        );
        self.add_rows_to_dense(0, w);
    }

    /// `tile += rows row0.. of Δ` for a row-major tile of whole rows.
    ///
    /// # Panics
    /// If the tile is not a whole number of rows or reaches past the last row.
    pub fn add_rows_to_dense(&self, row0: usize, tile: &mut [f32]) {
        let (m, n, g) = (self.rows(), self.cols(), self.grid.group);
        assert!(
            n > 0 && tile.len().is_multiple_of(n),
            "tile is not whole rows"
        );
        let rows = tile.len() / n;
        assert!(row0 + rows <= m, "tile reaches past the last row");
        let groups = self.grid.groups();
        let factor = self.factor();
        let bits = self.signs.as_bytes();
        for (i, out) in tile.chunks_exact_mut(n).enumerate() {
            let r = row0 + i;
            for (gi, chunk) in out.chunks_mut(g).enumerate() {
                let at = r * groups + gi;
                let step = self.grid.half[at].to_f32() * factor;
                let base = if self.plane == 0 {
                    self.grid.mid[at].to_f32()
                } else {
                    0.0
                };
                let c0 = gi * g;
                if n.is_multiple_of(8) {
                    // Whole bytes: 8 weights per byte through a ±1 table (vectorizes).
                    let bytes = &bits[(r * n + c0) / 8..(r * n + c0 + chunk.len()) / 8];
                    for (o8, &byte) in chunk.chunks_exact_mut(8).zip(bytes) {
                        let signs = &SIGNS[usize::from(byte)];
                        for (o, &sg) in o8.iter_mut().zip(signs) {
                            *o += base + step * sg;
                        }
                    }
                } else {
                    for (j, o) in chunk.iter_mut().enumerate() {
                        let plus = crate::block::sign_bit(bits, r * n + c0 + j);
                        *o += base + if plus { step } else { -step };
                    }
                }
            }
        }
    }

    /// `y += Δ x` straight from the packed signs (one lookup table per call; use
    /// [`PlaneTable`] and [`PlaneBlock::matvec_add_with`] to share it between planes).
    ///
    /// # Panics
    /// If `x.len() != cols` or `y.len() != rows`.
    pub fn matvec_add(&self, x: &[f32], y: &mut [f32]) {
        let table = PlaneTable::new(x, self.grid.group);
        self.matvec_add_with(&table, y);
    }

    /// `y += Δ x` with a table built for `x` and this grid's group size.
    ///
    /// # Panics
    /// If the table was built for another width or group, or `y.len() != rows`.
    pub fn matvec_add_with(&self, table: &PlaneTable, y: &mut [f32]) {
        let (m, n, g) = (self.rows(), self.cols(), self.grid.group);
        assert_eq!(table.cols, n, "matvec_add_with: table for another width");
        assert_eq!(table.group, g, "matvec_add_with: table for another group");
        assert_eq!(y.len(), m, "matvec_add_with: y has the wrong length");
        if n.is_multiple_of(8) {
            // Whole bytes: the fused kernel, for one plane.
            planes_matvec_add(&[self], table, y);
            return;
        }
        let groups = self.grid.groups();
        let factor = self.factor();
        let bits = self.signs.as_bytes();
        let first = self.plane == 0;
        let row = |r: usize| -> f32 {
            let mut acc = 0.0f32;
            let halves = &self.grid.half[r * groups..(r + 1) * groups];
            let mids = &self.grid.mid[r * groups..(r + 1) * groups];
            for gi in 0..groups {
                let c0 = gi * g;
                let c1 = (c0 + g).min(n);
                let mut dot = 0.0f32;
                for c in c0..c1 {
                    let x = table.x[c];
                    dot += if crate::block::sign_bit(bits, r * n + c) {
                        x
                    } else {
                        -x
                    };
                }
                acc += halves[gi].to_f32() * factor * dot;
                if first {
                    acc += mids[gi].to_f32() * table.group_sums[gi];
                }
            }
            acc
        };
        if m * n >= crate::svd::PAR_THRESHOLD * 4 && rayon::current_num_threads() > 1 {
            y.par_iter_mut()
                .enumerate()
                .for_each(|(r, yr)| *yr += row(r));
        } else {
            for (r, yr) in y.iter_mut().enumerate() {
                *yr += row(r);
            }
        }
    }
}

/// `Σ_j lut[j·256 + bytes[j]]`: the signed sum of `x` over the columns of `bytes` (packed
/// signs, 8 columns per byte) from their 256-entry tables.
#[inline]
fn lut_dot(lut: &[f32], bytes: &[u8]) -> f32 {
    // Four independent sums: the lookups are not serialised on one add's latency.
    let mut d = [0.0f32; 4];
    let mut quads = bytes.chunks_exact(4);
    let mut tables = lut.chunks_exact(1024);
    for (q, t) in quads.by_ref().zip(tables.by_ref()) {
        d[0] += t[usize::from(q[0])];
        d[1] += t[256 + usize::from(q[1])];
        d[2] += t[512 + usize::from(q[2])];
        d[3] += t[768 + usize::from(q[3])];
    }
    let rest = tables.remainder();
    for (j, &byte) in quads.remainder().iter().enumerate() {
        d[j] += rest[j * 256 + usize::from(byte)];
    }
    (d[0] + d[1]) + (d[2] + d[3])
}

/// `y += Σ_b Δ_b x` for planes of one matrix, in one pass over the rows (rows split between
/// threads): per row and group, the planes' signed sums are combined before the group's
/// scale is applied. Planes of different grids, or a width that is not a multiple of 8, go
/// through [`PlaneBlock::matvec_add_with`] one at a time.
///
/// On x86-64 with AVX-512 F and BW, or AVX2, the planes of each run of 8 go through the
/// vectorized code kernel ([`bitstack_bits::codes_matvec_add`]); elsewhere, 8-bit tables of
/// `x` are read per byte ([`planes_matvec_add_with`] picks).
///
/// # Panics
/// If the table was built for another width or group, or `y` has the wrong length.
pub fn planes_matvec_add(planes: &[&PlaneBlock], table: &PlaneTable, y: &mut [f32]) {
    planes_matvec_add_with(planes, table, y, Simd::Auto);
}

/// [`planes_matvec_add`] with `x` as two bytes per value (one scale per 128 columns, error
/// at most `1.6e-5` of a segment's largest magnitude) in the code kernel's integer sums,
/// where the CPU has VNNI and GFNI with AVX-512 or AVX2
/// ([`bitstack_bits::codes_matvec_add_q16`]): 1.3–2.6× faster, products within ~1e-4
/// relative of the exact ones (the runtime's default for decoding). Elsewhere it is [`planes_matvec_add`].
///
/// # Panics
/// As [`planes_matvec_add`].
pub fn planes_matvec_add_q16(planes: &[&PlaneBlock], table: &PlaneTable, y: &mut [f32]) {
    planes_product(planes, table, y, Simd::Auto, true);
}

/// [`planes_matvec_add`] with the kernel chosen: [`Simd::Portable`] always takes the
/// table-driven path (the reference for the vectorized one in the tests), [`Simd::Avx2`] the
/// AVX2 code kernel where the CPU has it.
///
/// # Panics
/// As [`planes_matvec_add`].
pub fn planes_matvec_add_with(
    planes: &[&PlaneBlock],
    table: &PlaneTable,
    y: &mut [f32],
    simd: Simd,
) {
    planes_product(planes, table, y, simd, false);
}

/// [`planes_matvec_add_with`], the code kernel taking `x` as two bytes where `q16`
/// ([`planes_matvec_add_q16`]).
fn planes_product(
    planes: &[&PlaneBlock],
    table: &PlaneTable,
    y: &mut [f32],
    simd: Simd,
    q16: bool,
) {
    let Some(first) = planes.first() else {
        return;
    };
    let grid = first.grid();
    let (m, n, g) = (grid.rows, grid.cols, grid.group);
    let shared = planes.iter().all(|p| Arc::ptr_eq(p.grid(), grid));
    if !shared || !n.is_multiple_of(8) {
        for p in planes {
            p.matvec_add_with(table, y);
        }
        return;
    }
    assert_eq!(table.cols, n, "planes_matvec_add: table for another width");
    assert_eq!(table.group, g, "planes_matvec_add: table for another group");
    assert_eq!(y.len(), m, "planes_matvec_add: y has the wrong length");
    if simd != Simd::Portable && bitstack_bits::codes_simd_available() {
        return planes_as_codes(planes, table, y, simd, q16);
    }
    let groups = grid.groups();
    let with_mid = planes.iter().any(|p| p.plane == 0);
    let bpg = g / 8;
    // Rows `r0..r0 + ys.len()`: column groups outside, rows inside, so that one group's
    // tables (`bpg` KiB) stay in L1 while every row of the range reads them (a whole row's
    // tables are `cols / 8` KiB, more than L1 from 256 columns on). Each row still adds its
    // groups' terms in group order, as a row-at-a-time pass would.
    // Each plane's signs and factor, looked up once (the factor is a `powi`).
    let plane_bits: Vec<(&[u8], f32)> = planes
        .iter()
        .map(|p| (p.signs.as_bytes(), p.factor()))
        .collect();
    let rows_of = |r0: usize, ys: &mut [f32], acc: &mut Vec<f32>| {
        acc.clear();
        acc.resize(ys.len(), 0.0);
        for gi in 0..groups {
            let j0 = gi * bpg;
            let nb = bpg.min(n / 8 - j0);
            let lut = &table.lut()[j0 * 256..(j0 + nb) * 256];
            for (i, a) in acc.iter_mut().enumerate() {
                let r = r0 + i;
                let b0 = r * n / 8 + j0;
                let mut sum = 0.0f32;
                for &(bits, factor) in &plane_bits {
                    sum += factor * lut_dot(lut, &bits[b0..b0 + nb]);
                }
                *a += grid.half[r * groups + gi].to_f32() * sum;
                if with_mid {
                    *a += grid.mid[r * groups + gi].to_f32() * table.group_sums[gi];
                }
            }
        }
        for (yr, &a) in ys.iter_mut().zip(acc.iter()) {
            *yr += a;
        }
    };
    if m * n * planes.len() >= crate::svd::PAR_THRESHOLD * 4 && rayon::current_num_threads() > 1 {
        // A few row ranges per thread (of at least 16 rows).
        let rows = m.div_ceil(4 * rayon::current_num_threads()).max(16);
        y.par_chunks_mut(rows)
            .enumerate()
            .for_each_init(Vec::new, |acc, (t, ys)| rows_of(t * rows, ys, acc));
    } else {
        rows_of(0, y, &mut Vec::new());
    }
}

/// [`planes_matvec_add`] through the vectorized code kernel ([`bitstack_bits::codes_matvec_add`]),
/// for planes sharing one grid and a width that is a multiple of 8.
///
/// With `S = 2B − 1` and `f_p = 2^{−(p+1)}`, the planes' weight is
/// `half·Σ_p f_p S_p (+ mid) = half·(2^{−(l+7)}·q − F) (+ mid)` where
/// `q = Σ_p 2^{l+7−p}·B_p` is an integer code of the planes `l..=l+7` (at most 255) and
/// `F = Σ_p f_p`: the kernel's grid with scale `2^{−(l+7)}`, shift `−F` and offset `mid`
/// (plane 0 loaded). Planes more than 8 apart (or repeated) go in several runs of codes, the
/// shift and offset with the first.
/// With `q16`, through [`bitstack_bits::codes_matvec_add_q16`].
fn planes_as_codes(
    planes: &[&PlaneBlock],
    table: &PlaneTable,
    y: &mut [f32],
    simd: Simd,
    q16: bool,
) {
    let product = if q16 {
        bitstack_bits::codes_matvec_add_q16
    } else {
        bitstack_bits::codes_matvec_add
    };
    for_each_code_run(planes, |codes, grid| {
        product(
            codes,
            grid,
            &table.x,
            y,
            bitstack_bits::Parallelism::Auto,
            simd,
        );
    });
}

/// Calls `f` with each run of codes of `planes` (which share one grid, sorted by plane)
/// and its grid, as [`planes_as_codes`] describes.
fn for_each_code_run(
    planes: &[&PlaneBlock],
    mut f: impl FnMut(&[bitstack_bits::WeightedPlane<'_>], &bitstack_bits::CodeGrid<'_>),
) {
    let Some(first) = planes.first() else {
        return;
    };
    let grid = first.grid();
    let mut sorted = planes.to_vec();
    sorted.sort_by_key(|p| p.plane);
    let mut shift = -planes.iter().map(|p| p.factor()).sum::<f32>();
    let mut offsets = planes.iter().any(|p| p.plane == 0).then_some(&grid.mid[..]);
    let mut rest = &sorted[..];
    while let Some(first) = rest.first() {
        let low = first.plane;
        let mut total = 0u32;
        let run = rest
            .iter()
            .take_while(|p| {
                let ok = p.plane <= low + 7 && total + (128u32 >> (p.plane - low)) <= 255;
                if ok {
                    total += 128u32 >> (p.plane - low);
                }
                ok
            })
            .count();
        let codes: Vec<bitstack_bits::WeightedPlane<'_>> = rest[..run]
            .iter()
            .map(|p| bitstack_bits::WeightedPlane {
                bits: p.signs.as_view(),
                weight: 128u8 >> (p.plane - low),
            })
            .collect();
        let code_grid = bitstack_bits::CodeGrid {
            group: grid.group,
            scales: &grid.half,
            offsets,
            scale: (0.5f32).powi(low as i32 + 7),
            shift,
        };
        f(&codes, &code_grid);
        (shift, offsets) = (0.0, None);
        rest = &rest[run..];
    }
}

/// `tile += rows row0.. of Σ Δ` over `planes` (a row-major tile of whole rows): the batch
/// product's tile rebuild. Planes sharing one grid (the planes of one matrix) are read
/// together as integer codes ([`bitstack_bits::codes_rows_to_dense`], each weight written
/// once) where the CPU has a vectorized code kernel (AVX-512 BW or AVX2); others, a width
/// that is not a multiple of 8, or a CPU without either, go one plane at a time through
/// [`PlaneBlock::add_rows_to_dense`].
///
/// # Panics
/// If the tile is not whole rows or reaches past the last row.
pub fn planes_rows_to_dense(planes: &[&PlaneBlock], row0: usize, tile: &mut [f32]) {
    planes_rows_to_dense_with(planes, row0, tile, Simd::Auto);
}

/// [`planes_rows_to_dense`] with the kernel chosen ([`Simd::Portable`]: the portable code
/// loop; [`Simd::Avx2`]: the AVX2 one where the CPU has it).
///
/// # Panics
/// As [`planes_rows_to_dense`].
pub fn planes_rows_to_dense_with(
    planes: &[&PlaneBlock],
    row0: usize,
    tile: &mut [f32],
    simd: Simd,
) {
    let Some(first) = planes.first() else {
        return;
    };
    let grid = first.grid();
    let shared = planes.iter().all(|p| Arc::ptr_eq(p.grid(), grid));
    // Without the vectorized code kernel, one plane at a time through the ±1 byte table
    // (which vectorizes) is faster than the portable code loop (kept as its oracle).
    let codes = simd == Simd::Portable || bitstack_bits::codes_simd_available();
    if !shared || !grid.cols.is_multiple_of(8) || !codes {
        for p in planes {
            p.add_rows_to_dense(row0, tile);
        }
        return;
    }
    for_each_code_run(planes, |codes, code_grid| {
        bitstack_bits::codes_rows_to_dense(codes, code_grid, row0, tile, simd);
    });
}

/// For each packed byte (MSB first = first weight), its eight signs as ±1.0.
static SIGNS: [[f32; 8]; 256] = {
    let mut t = [[0.0f32; 8]; 256];
    let mut b = 0;
    while b < 256 {
        let mut j = 0;
        while j < 8 {
            t[b][j] = if (b >> (7 - j)) & 1 == 1 { 1.0 } else { -1.0 };
            j += 1;
        }
        b += 1;
    }
    t
};

/// `2^{−(plane+1)}`.
pub(crate) fn plane_factor(plane: usize) -> f32 {
    (0.5f32).powi(plane as i32 + 1)
}

/// The lookup table of one input vector for [`PlaneBlock::matvec_add_with`]: for every 8
/// columns, the signed sums `Σ ±x` of all 256 sign patterns, and the sum of `x` per group.
#[derive(Debug, Clone)]
pub struct PlaneTable {
    cols: usize,
    group: usize,
    /// Built on first use (the vectorized code kernel does not read it).
    lut: std::sync::OnceLock<Vec<f32>>,
    group_sums: Vec<f32>,
    x: Vec<f32>,
}

impl PlaneTable {
    /// Builds the table of `x` for groups of `group` columns.
    pub fn new(x: &[f32], group: usize) -> Self {
        let group_sums = x.chunks(group.max(1)).map(|c| c.iter().sum()).collect();
        Self {
            cols: x.len(),
            group,
            lut: std::sync::OnceLock::new(),
            group_sums,
            x: x.to_vec(),
        }
    }

    /// For every 8 columns the 256 signed sums of `x` (empty unless the width is a multiple
    /// of 8), built on first use.
    fn lut(&self) -> &[f32] {
        self.lut.get_or_init(|| {
            let x = &self.x;
            if !x.len().is_multiple_of(8) {
                return Vec::new();
            }
            let mut lut = vec![0.0f32; x.len() / 8 * 256];
            for (chunk, table) in x.chunks_exact(8).zip(lut.chunks_exact_mut(256)) {
                // Pattern bits MSB first: bit 7 − t is column t of the chunk.
                let total: f32 = chunk.iter().sum();
                table[0] = -total;
                // Patterns in increasing order of their highest set bit `1 << b` (column
                // `7 − b`): each is `(1 << b) + q` for a pattern `q < 1 << b` already filled.
                for b in 0..8 {
                    let bit = 1usize << b;
                    let add = 2.0 * chunk[7 - b];
                    for q in 0..bit {
                        table[bit + q] = table[q] + add;
                    }
                }
            }
            lut
        })
    }
}

/// The planes of one matrix and their errors.
#[derive(Debug, Clone)]
pub struct PlaneDecomposition {
    /// The shared grid.
    pub grid: Arc<PlaneGrid>,
    /// The planes, in order.
    pub blocks: Vec<PlaneBlock>,
    /// Weighted squared error `Σ r_i c_j (w − ŵ)²` after `b + 1` planes, `b = 0..planes`.
    pub sq_err: Vec<f64>,
    /// Weighted squared norm of the matrix (the error with no block loaded).
    pub sq_norm: f64,
    /// Relative (unweighted) Frobenius error after `b + 1` planes.
    pub rel_err: Vec<f64>,
}

impl PlaneDecomposition {
    /// The dense row-major reconstruction after each prefix of planes: entry `b` is the sum
    /// of planes `0..=b` (built incrementally, one pass per plane).
    pub fn prefix_reconstructions(&self) -> Vec<Vec<f32>> {
        let mut dense = vec![0.0f32; self.grid.rows * self.grid.cols];
        self.blocks
            .iter()
            .map(|b| {
                b.add_to_dense(&mut dense);
                dense.clone()
            })
            .collect()
    }
}

/// Decomposes `w` (`rows × cols`, row-major) into `params.planes` nested bit planes.
///
/// `row_weights` and `col_weights` (positive, one per row / column, default 1) weight the
/// squared errors reported in [`PlaneDecomposition::sq_err`]; the planes themselves do not
/// depend on them (successive approximation is optimal for every weighting).
///
/// # Errors
/// A shape mismatch, a non-finite weight, a bad group or plane count, weights of the wrong
/// length or not positive, or group bounds that do not fit f16.
pub fn decompose_planes(
    w: &[f32],
    rows: usize,
    cols: usize,
    params: &PlaneParams,
    row_weights: Option<&[f32]>,
    col_weights: Option<&[f32]>,
) -> Result<PlaneDecomposition, DecomposeError> {
    check_plane_input(w, rows, cols, params)?;
    let grid = plane_grid_of(w, rows, cols, params.group)?;
    planes_on_grid(w, grid, params.planes, &[], row_weights, col_weights)
}

/// Checks the shape, group, plane count and finiteness of a matrix to be decomposed into planes.
pub(crate) fn check_plane_input(
    w: &[f32],
    rows: usize,
    cols: usize,
    params: &PlaneParams,
) -> Result<(), DecomposeError> {
    let expected = rows.checked_mul(cols);
    if expected != Some(w.len()) || rows == 0 || cols == 0 {
        return Err(DecomposeError::ShapeMismatch {
            rows,
            cols,
            expected: crate::ExpectedLen(expected),
            len: w.len(),
        });
    }
    params.check()?;
    if let Some(index) = w.iter().position(|v| !v.is_finite()) {
        return Err(DecomposeError::NonFinite {
            index,
            row: index / cols,
            col: index % cols,
            value: w[index],
        });
    }
    Ok(())
}

/// The grid of a checked matrix: per row and group of `g` columns, `mid` and `half` (rounded
/// up) from the group's minimum and maximum.
pub(crate) fn plane_grid_of(
    w: &[f32],
    rows: usize,
    cols: usize,
    g: usize,
) -> Result<Arc<PlaneGrid>, DecomposeError> {
    let groups = cols.div_ceil(g);
    let mut mid = vec![f16::ZERO; rows * groups];
    let mut half = vec![f16::ZERO; rows * groups];
    for r in 0..rows {
        let row = &w[r * cols..(r + 1) * cols];
        for (gi, chunk) in row.chunks(g).enumerate() {
            let lo = chunk.iter().copied().fold(f32::INFINITY, f32::min);
            let hi = chunk.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let m = f16::from_f32(0.5 * lo + 0.5 * hi);
            // Round the half-width up so that the grid still covers the group after rounding.
            let mf = m.to_f32();
            let need = (hi - mf).max(mf - lo).max(0.0);
            let mut h = f16::from_f32(need);
            if h.to_f32() < need {
                h = f16::from_bits(h.to_bits() + 1);
            }
            if !m.is_finite() || !h.is_finite() {
                return Err(DecomposeError::GridOverflow {
                    row: r,
                    group: gi,
                    lo,
                    hi,
                });
            }
            mid[r * groups + gi] = m;
            half[r * groups + gi] = h;
        }
    }
    Ok(Arc::new(PlaneGrid::new(rows, cols, g, mid, half)?))
}

/// `ŵ_0 = mid`, dense row-major.
pub(crate) fn grid_base(grid: &PlaneGrid) -> Vec<f32> {
    let (rows, cols, g, groups) = (grid.rows, grid.cols, grid.group, grid.groups());
    let mut recon = vec![0.0f32; rows * cols];
    for (r, out) in recon.chunks_exact_mut(cols).enumerate() {
        for (gi, chunk) in out.chunks_mut(g).enumerate() {
            chunk.fill(grid.mid[r * groups + gi].to_f32());
        }
    }
    recon
}

/// `recon += half·2^{−(p+1)} ⊙ signs` (signs ±1.0, dense row-major): one plane applied to a
/// reconstruction, with the same arithmetic as successive approximation.
pub(crate) fn apply_plane(grid: &PlaneGrid, p: usize, signs: &[f32], recon: &mut [f32]) {
    let (cols, g, groups) = (grid.cols, grid.group, grid.groups());
    let factor = plane_factor(p);
    recon
        .par_chunks_mut(cols)
        .zip(signs.par_chunks(cols))
        .enumerate()
        .for_each(|(r, (qr, sr))| {
            for (gi, (qc, sc)) in qr.chunks_mut(g).zip(sr.chunks(g)).enumerate() {
                let step = grid.half[r * groups + gi].to_f32() * factor;
                for (q, &s) in qc.iter_mut().zip(sc) {
                    if s > 0.0 {
                        *q += step;
                    } else {
                        *q -= step;
                    }
                }
            }
        });
}

/// The planes of a checked matrix on `grid`: the first `fixed.len()` planes take the given
/// signs (±1.0, dense row-major), the rest (up to `planes`) are chosen by successive
/// approximation of `w`.
pub(crate) fn planes_on_grid(
    w: &[f32],
    grid: Arc<PlaneGrid>,
    planes: usize,
    fixed: &[Vec<f32>],
    row_weights: Option<&[f32]>,
    col_weights: Option<&[f32]>,
) -> Result<PlaneDecomposition, DecomposeError> {
    let (rows, cols) = (grid.rows, grid.cols);
    let check_weights = |ws: Option<&[f32]>, len: usize| -> Result<Vec<f64>, DecomposeError> {
        match ws {
            None => Ok(vec![1.0; len]),
            Some(ws) => {
                if ws.len() != len {
                    return Err(DecomposeError::ChannelWeightsLength {
                        expected: len,
                        got: ws.len(),
                    });
                }
                if let Some(index) = ws.iter().position(|v| !(v.is_finite() && *v > 0.0)) {
                    return Err(DecomposeError::InvalidChannelWeight {
                        index,
                        value: ws[index],
                    });
                }
                Ok(ws.iter().map(|&v| f64::from(v)).collect())
            }
        }
    };
    let rw = check_weights(row_weights, rows)?;
    let cw = check_weights(col_weights, cols)?;
    let g = grid.group;
    let groups = grid.groups();

    // ŵ_0 = mid.
    let mut recon = grid_base(&grid);
    // Row sums in parallel, added in row order: the same bits whatever the threads do.
    let weighted = |recon: &[f32]| -> f64 {
        let rows: Vec<f64> = w
            .par_chunks(cols)
            .zip(recon.par_chunks(cols))
            .enumerate()
            .map(|(r, (wr, qr))| {
                let s: f64 = wr
                    .iter()
                    .zip(qr)
                    .zip(&cw)
                    .map(|((&a, &b), &c)| c * f64::from(a - b).powi(2))
                    .sum();
                s * rw[r]
            })
            .collect();
        rows.iter().sum()
    };
    let sq_norm: f64 = weighted(&vec![0.0f32; rows * cols]);
    let norm: f64 = w.iter().map(|&v| f64::from(v).powi(2)).sum::<f64>().sqrt();
    let mut blocks = Vec::with_capacity(planes);
    let mut sq_err = Vec::with_capacity(planes);
    let mut rel_err = Vec::with_capacity(planes);
    let mut signs = vec![0.0f32; rows * cols];
    for p in 0..planes {
        let packed = if let Some(given) = fixed.get(p) {
            apply_plane(&grid, p, given, &mut recon);
            SignMatrix::from_signs_of(given, rows, cols)?
        } else {
            let factor = plane_factor(p);
            signs
                .par_chunks_mut(cols)
                .zip(recon.par_chunks_mut(cols))
                .zip(w.par_chunks(cols))
                .enumerate()
                .for_each(|(r, ((sr, qr), wr))| {
                    for (gi, ((sc, qc), wc)) in sr
                        .chunks_mut(g)
                        .zip(qr.chunks_mut(g))
                        .zip(wr.chunks(g))
                        .enumerate()
                    {
                        let step = grid.half[r * groups + gi].to_f32() * factor;
                        for ((s, q), &x) in sc.iter_mut().zip(qc.iter_mut()).zip(wc) {
                            if x >= *q {
                                *s = 1.0;
                                *q += step;
                            } else {
                                *s = -1.0;
                                *q -= step;
                            }
                        }
                    }
                });
            SignMatrix::from_signs_of(&signs, rows, cols)?
        };
        blocks.push(PlaneBlock::new(grid.clone(), p, packed)?);
        sq_err.push(weighted(&recon));
        let diff: f64 = w
            .iter()
            .zip(&recon)
            .map(|(&a, &b)| f64::from(a - b).powi(2))
            .sum();
        rel_err.push(if norm > 0.0 { diff.sqrt() / norm } else { 0.0 });
    }
    Ok(PlaneDecomposition {
        grid,
        blocks,
        sq_err,
        sq_norm,
        rel_err,
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Deterministic pseudo-random values in [−0.5, 0.5) (an LCG), for the crate's tests.
    pub(crate) fn pseudo(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 33) as f32 / (1u64 << 31) as f32) - 0.5
            })
            .collect()
    }

    #[test]
    fn error_halves_and_is_bounded() {
        let (m, n) = (7, 40);
        let w = pseudo(m * n, 3);
        let params = PlaneParams {
            group: 16,
            planes: 6,
        };
        let d = decompose_planes(&w, m, n, &params, None, None).unwrap();
        let mut dense = vec![0.0f32; m * n];
        for (p, b) in d.blocks.iter().enumerate() {
            b.add_to_dense(&mut dense);
            let groups = n.div_ceil(16);
            for r in 0..m {
                for c in 0..n {
                    let h = d.grid.half()[r * groups + c / 16].to_f32();
                    let bound = h * 0.5f32.powi(p as i32 + 1) * 1.0001 + 1e-6;
                    let e = (w[r * n + c] - dense[r * n + c]).abs();
                    assert!(e <= bound, "plane {p} [{r},{c}]: {e} > {bound}");
                }
            }
        }
        for pair in d.rel_err.windows(2) {
            assert!(pair[1] < pair[0] * 0.7, "{:?}", d.rel_err);
        }
    }

    #[test]
    fn table_matches_signed_sums() {
        let x = pseudo(24, 9);
        let t = PlaneTable::new(&x, 8);
        for j in 0..3 {
            for pattern in [0usize, 1, 37, 128, 200, 255] {
                let want: f32 = (0..8)
                    .map(|b| {
                        let v = x[j * 8 + b];
                        if (pattern >> (7 - b)) & 1 == 1 {
                            v
                        } else {
                            -v
                        }
                    })
                    .sum();
                let got = t.lut()[j * 256 + pattern];
                assert!((want - got).abs() < 1e-5, "{want} vs {got}");
            }
        }
    }
}
