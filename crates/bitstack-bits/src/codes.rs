//! Weighted bit planes: the one-token product of a matrix whose entries are small integer
//! codes stored one bit plane at a time, on a grid with a scale and an offset per row and
//! group of columns.
//!
//! ```text
//! q[r, c] = Σ_p weight_p · bit_p[r, c]                         (0 ≤ q ≤ 255)
//! Ŵ[r, c] = s[r, g] · (scale · q[r, c] + shift) + o[r, g]      (g = c / group)
//! y      += Ŵ x
//! ```
//!
//! This is the product of nested bit-plane blocks (a per-group uniform grid refined one sign
//! bit per weight): with `S = 2B − 1` their sum is an affine function of `q`. Per row and
//! group the kernel adds `scale · s · Σ_c q·x` and `(s·shift + o) · Σ_c x`.
//!
//! On x86-64 with AVX-512 F and BW (checked at run time) the codes of 64 columns are built in
//! one `zmm` register of bytes, one masked byte add per plane (the plane's 64 bits are the
//! mask), then widened to f32 16 at a time and multiplied with `x`: no lookup tables, and
//! every product is an exact integer times `x[c]` summed in f32. Where the CPU also has GFNI
//! and the planes are nested (distinct power-of-two weights; from 5 planes in rows under 2048
//! columns, from 7 in wider ones, 4 for the tile rebuild), the codes of 512 columns come
//! from one 64-byte load per plane, three rounds of byte unpacks and one `gf2p8affineqb` (an
//! 8×8 bit transpose) per 64 columns, whose cost does not grow with the planes. With AVX2
//! (and FMA) the codes of 32 columns are built in a `ymm` register, each plane's bits spread to bytes and
//! compared — or, for nested planes (distinct power-of-two weights), the planes' bytes
//! gathered into one register and bit-transposed 8×8: one `gf2p8affineqb` where the CPU has
//! GFNI (from 3 planes), else three delta swaps (from 5 planes); rows of 256 columns or
//! more take one 32-byte load per plane and three rounds of byte unpacks for 256 columns.
//! Elsewhere a portable version runs (the reference for the vectorized ones in the tests).

use half::f16;
use rayon::prelude::{IndexedParallelIterator, ParallelIterator, ParallelSliceMut};

use crate::lut::{line_offset, sized_aligned, use_parallel};
use crate::{Parallelism, SignMatrixRef, Simd};

/// The grid of [`codes_matvec_add`]: `Ŵ[r, c] = s[r, g]·(scale·q[r, c] + shift) + o[r, g]`.
#[derive(Debug, Clone, Copy)]
pub struct CodeGrid<'a> {
    /// Columns per group (a positive multiple of 8).
    pub group: usize,
    /// `s`: `rows × ceil(cols / group)`, row-major.
    pub scales: &'a [f16],
    /// `o` (same shape as `s`), or none (zero).
    pub offsets: Option<&'a [f16]>,
    /// Multiplies the codes.
    pub scale: f32,
    /// Added to the scaled codes before `s`.
    pub shift: f32,
}

/// One bit plane of [`codes_matvec_add`]: packed bits (`1` = set, MSB first, row-major:
/// [`SignLayout::RowMajor`](crate::SignLayout::RowMajor)) and the integer weight of a set bit.
#[derive(Debug, Clone, Copy)]
pub struct WeightedPlane<'a> {
    /// The bits, `rows × cols`.
    pub bits: SignMatrixRef<'a>,
    /// What a set bit adds to the code.
    pub weight: u8,
}

/// Whether [`codes_matvec_add`] has a vectorized version on this CPU (with [`Simd::Auto`]:
/// AVX-512 F and BW, or AVX2); without one it runs a portable loop that is slower than a
/// table-driven product.
pub fn codes_simd_available() -> bool {
    CodeKernel::choose(Simd::Auto) != CodeKernel::Portable
}

/// Whether [`codes_matvec_add_q16`] has an integer path on this CPU (with [`Simd::Auto`]:
/// AVX-512 F, BW, VL, VNNI and GFNI, for nested planes; or AVX2 with GFNI and AVX-VNNI,
/// for widths and groups of whole 32-column registers); elsewhere it is
/// [`codes_matvec_add`].
pub fn codes_q16_vectorized() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        let kernel = CodeKernel::choose(Simd::Auto);
        kernel_has_vnni(kernel) || q16_natural(kernel, 32, 32)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Columns that share one scale of the two-byte `x` of [`codes_matvec_add_q16`].
pub const Q16_SEGMENT: usize = 128;

/// `x` as two signed bytes per value, one scale `d` per [`Q16_SEGMENT`] columns (the
/// largest magnitude over 127): `x[c] ≈ d·(hi[c] + lo[c] / 254)`, `hi` the rounding of
/// `x / d` and `lo` that of the residual in steps of `d / 254`, both within ±127. The error
/// is at most about `d / 508` (about `1.6e-5` of the segment's largest magnitude, a little
/// under 16 bits). A segment of zeros gets scale 0 and bytes 0; one with a NaN or an
/// infinity gets scale NaN (and bytes 0), so that products with it are NaN, as exact ones
/// would be.
pub fn quantize_x_q16(x: &[f32]) -> (Vec<i8>, Vec<i8>, Vec<f32>) {
    let mut hi = vec![0i8; x.len()];
    let mut lo = vec![0i8; x.len()];
    let scales: Vec<f32> = x.chunks(Q16_SEGMENT).map(q16_scale).collect();
    for (((xs, hs), ls), &d) in x
        .chunks(Q16_SEGMENT)
        .zip(hi.chunks_mut(Q16_SEGMENT))
        .zip(lo.chunks_mut(Q16_SEGMENT))
        .zip(&scales)
    {
        quantize_q16(xs, d, hs, ls);
    }
    (hi, lo, scales)
}

/// The scale of one segment of [`quantize_x_q16`]: its largest magnitude over 127, 0 for
/// zeros, NaN if a value is not finite.
fn q16_scale(xs: &[f32]) -> f32 {
    if !xs.iter().all(|v| v.is_finite()) {
        return f32::NAN;
    }
    xs.iter().fold(0.0f32, |a, v| a.max(v.abs())) / 127.0
}

/// The two bytes of each of `xs` at scale `d` (zeros where `d` is 0 or NaN), rounded to nearest
/// (ties to even, by adding and subtracting `1.5·2^23`: exact for these magnitudes, and no
/// call to `roundf`).
fn quantize_q16(xs: &[f32], d: f32, hi: &mut [i8], lo: &mut [i8]) {
    if d == 0.0 || d.is_nan() {
        hi.fill(0);
        lo.fill(0);
        return;
    }
    const MAGIC: f32 = 12_582_912.0;
    let (inv, inv_low) = (1.0 / d, 254.0 / d);
    for ((&v, h), l) in xs.iter().zip(hi).zip(lo) {
        let q = ((v * inv + MAGIC) - MAGIC).clamp(-127.0, 127.0);
        *h = q as i8;
        *l = ((((v - d * q) * inv_low) + MAGIC) - MAGIC).clamp(-127.0, 127.0) as i8;
    }
}

/// [`codes_matvec_add`] with `x` as two bytes ([`quantize_x_q16`]) in the sums of codes
/// times `x`, products within ~1e-4 relative of the exact ones:
/// - where the CPU has AVX-512 VNNI and GFNI and the planes are nested (the path of
///   `gf2p8affineqb`-built codes), two `vpdpbusd` multiply 64 codes with the 64 high and
///   low bytes of `x` and add them in fours, instead of widening the codes to f32 for four
///   multiply-adds (1.6–2.6× faster at 4096² and 1536×512, 8 planes); the last
///   `cols % 512` columns use `x` as it is;
/// - with AVX2, GFNI and AVX-VNNI (e.g. Intel from Alder Lake) the same with 32
///   codes a `ymm` (1.3–1.45× faster than the AVX2 code kernel), for widths and groups of
///   whole 32-column registers, the group dividing 128 or a multiple of it.
///
/// The per-row constant `(s·shift + o)·Σx` uses `x` as it is. Elsewhere it is exactly
/// [`codes_matvec_add`] ([`codes_q16_vectorized`] tells).
///
/// # Panics
/// As [`codes_matvec_add`].
pub fn codes_matvec_add_q16(
    planes: &[WeightedPlane<'_>],
    grid: &CodeGrid<'_>,
    x: &[f32],
    y: &mut [f32],
    par: Parallelism,
    simd: Simd,
) {
    codes_matvec_add_impl(planes, grid, x, y, par, simd, true);
}

/// Which implementation of the code kernels runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CodeKernel {
    Portable,
    /// AVX-512 F and BW: 64 columns a register, one masked byte add per plane; with GFNI,
    /// nested planes bit-transposed 512 columns at a time.
    #[cfg(target_arch = "x86_64")]
    Avx512 {
        gfni: bool,
    },
    /// AVX2: 32 columns a register, each plane's bits spread to bytes and compared, or
    /// nested planes bit-transposed (with GFNI by one instruction).
    #[cfg(target_arch = "x86_64")]
    Avx2 {
        gfni: bool,
    },
}

impl CodeKernel {
    fn choose(simd: Simd) -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            // F16C (half-precision conversions) comes with both on every CPU; checked all
            // the same.
            let f16c = std::arch::is_x86_feature_detected!("f16c");
            let avx2 = std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
                && f16c;
            match simd {
                Simd::Auto | Simd::Avx512
                    if std::arch::is_x86_feature_detected!("avx512f")
                        && std::arch::is_x86_feature_detected!("avx512bw")
                        && f16c =>
                {
                    let gfni = simd == Simd::Auto && std::arch::is_x86_feature_detected!("gfni");
                    return CodeKernel::Avx512 { gfni };
                }
                Simd::Auto | Simd::Avx2Gfni if avx2 => {
                    let gfni = std::arch::is_x86_feature_detected!("gfni");
                    return CodeKernel::Avx2 { gfni };
                }
                Simd::Avx2 if avx2 => return CodeKernel::Avx2 { gfni: false },
                _ => {}
            }
        }
        let _ = simd;
        CodeKernel::Portable
    }
}

/// Below this many bit-weights (`rows · cols · planes`) a product stays on one thread.
const PARALLEL_MIN_BITS: usize = 1 << 20;

/// `y += Ŵ x` with `Ŵ[r, c] = s[r, g]·(scale·q[r, c] + shift) + o[r, g]` and
/// `q[r, c] = Σ_p weight_p·bit_p[r, c]` (see the module documentation).
///
/// # Panics
/// If a plane is not `y.len() × x.len()`, the scales or offsets have the wrong length, the
/// group is not a positive multiple of 8, `cols` is not a multiple of 8, or the weights sum
/// to more than 255.
pub fn codes_matvec_add(
    planes: &[WeightedPlane<'_>],
    grid: &CodeGrid<'_>,
    x: &[f32],
    y: &mut [f32],
    par: Parallelism,
    simd: Simd,
) {
    codes_matvec_add_impl(planes, grid, x, y, par, simd, false);
}

/// [`codes_matvec_add`], with `x` as two bytes on an integer path where `q16`.
fn codes_matvec_add_impl(
    planes: &[WeightedPlane<'_>],
    grid: &CodeGrid<'_>,
    x: &[f32],
    y: &mut [f32],
    par: Parallelism,
    simd: Simd,
    q16: bool,
) {
    let (m, n) = (y.len(), x.len());
    let group = grid.group;
    let groups = validate(planes, grid, m, n, "codes_matvec_add");
    if m == 0 || n == 0 {
        return;
    }
    let kernel = CodeKernel::choose(simd);
    #[cfg(target_arch = "x86_64")]
    let (vector, gfni) = match kernel {
        CodeKernel::Avx512 { gfni } => (true, gfni),
        _ => (false, false),
    };
    #[cfg(not(target_arch = "x86_64"))]
    let (vector, gfni) = (false, false);
    // The vectorized rows read `x` rearranged: a mask's bit `t` is its byte's column `7 − t`;
    // with every group a whole number of 64-column chunks and at most 8 planes (the unrolled
    // rows) byte `4i + j` of a chunk's codes also goes to lane `i` of its `j`-th vector.
    // Nested planes with GFNI build their codes in column order: `x` as it is.
    // With integer `x` the nested rows are faster than the masked adds at any number of
    // planes (their per-plane work was the widening to f32, which `vpdpbusd` replaces).
    // The AVX2 rows with AVX-VNNI read `x` as two bytes in column order.
    let natural_q16 = q16 && q16_natural(kernel, n, group);
    let nested_q16 = q16 && kernel_has_vnni(kernel);
    let order = if !vector {
        XOrder::Natural
    } else if gfni
        && nested_group(group)
        && n >= 512
        && (nested_q16 || planes.len() >= nested_min_planes(n))
        && nested_weights(planes.iter().map(|p| p.weight))
    {
        XOrder::Nested
    } else if group.is_multiple_of(64) && n.is_multiple_of(64) && (1..=8).contains(&planes.len()) {
        XOrder::Unrolled
    } else {
        XOrder::Lanes
    };
    let integer = nested_q16 && order == XOrder::Nested;
    let wide_end = n - n % 512;
    let mut xr = Vec::new();
    if vector {
        // On a cache line boundary: every 16-lane load of `x` is one line.
        let aligned = sized_aligned(&mut xr, n.next_multiple_of(64));
        let reversed = |t: usize| t - t % 8 + 7 - t % 8;
        // (The integer rows read only the columns after the whole 512-column blocks.)
        let from = if integer { wide_end } else { 0 };
        for (t, d) in aligned.iter_mut().enumerate().skip(from) {
            let (chunk, at) = (t - t % 64, t % 64);
            let column = match order {
                XOrder::Natural => t,
                XOrder::Lanes => reversed(t),
                XOrder::Unrolled => chunk + reversed(4 * (at % 16) + at / 16),
                // Lane `i` of the `j`-th vector of register `m` (see `avx512::rows_nested`).
                XOrder::Nested if t < wide_end => {
                    let (block, w) = (t - t % 512, t % 512);
                    let (m, j, i) = (w / 64, w % 64 / 16, w % 16);
                    block + 128 * (i / 4) + 16 * m + 4 * (i % 4) + j
                }
                XOrder::Nested => reversed(t),
            };
            *d = x.get(column).copied().unwrap_or(0.0);
        }
    }
    // The two-byte `x`: in column order for the AVX2 rows, in the nested registers' order
    // for the AVX-512 ones.
    let q16x = if natural_q16 {
        let (hi, lo, scales) = quantize_x_q16(x);
        Some(Q16X { hi, lo, scales })
    } else {
        integer.then(|| q16_nested(x, wide_end))
    };
    let shape = Shape {
        n,
        group,
        groups,
        scale: grid.scale,
        shift: grid.shift,
        group_sums: x.chunks(group).map(|c| c.iter().sum()).collect(),
        xr_at: line_offset(&xr),
        xr,
        order,
        q16x,
    };
    let run = |row0: usize, ys: &mut [f32]| {
        let rows = row0 * groups..(row0 + ys.len()) * groups;
        let s = &grid.scales[rows.clone()];
        let o = grid.offsets.map(|o| &o[rows]);
        #[cfg(target_arch = "x86_64")]
        match kernel {
            CodeKernel::Avx512 { .. } => return avx512::rows(planes, &shape, s, o, row0, ys),
            CodeKernel::Avx2 { gfni } => {
                return avx2::rows(planes, &shape, s, o, x, row0, ys, gfni)
            }
            CodeKernel::Portable => {}
        }
        rows_portable(planes, &shape, s, o, x, row0, ys);
    };
    let work = m.saturating_mul(n).saturating_mul(planes.len().max(1));
    let threads = rayon::current_num_threads();
    if use_parallel(par, work) && work >= PARALLEL_MIN_BITS && threads > 1 && m >= 2 * 8 {
        // Two ranges of rows per thread (one each measured slower while decoding: a worker
        // that wakes late leaves its half to the other).
        let rows = m.div_ceil(2 * threads).next_multiple_of(8);
        y.par_chunks_mut(rows)
            .enumerate()
            .for_each(|(t, ys)| run(t * rows, ys));
    } else {
        run(0, y);
    }
}

/// Checks the shapes shared by the code kernels; returns the groups per row.
fn validate(
    planes: &[WeightedPlane<'_>],
    grid: &CodeGrid<'_>,
    m: usize,
    n: usize,
    what: &str,
) -> usize {
    let group = grid.group;
    assert!(
        group > 0 && group.is_multiple_of(8) && n.is_multiple_of(8),
        "{what}: group {group} and width {n} must be multiples of 8"
    );
    let groups = n.div_ceil(group);
    for (part, len) in [
        ("scales", Some(grid.scales.len())),
        ("offsets", grid.offsets.map(<[f16]>::len)),
    ] {
        if let Some(len) = len {
            assert_eq!(
                Some(len),
                m.checked_mul(groups),
                "{what}: {len} {part} for {m} rows of {groups} groups"
            );
        }
    }
    for (i, p) in planes.iter().enumerate() {
        assert!(
            p.bits.layout() == crate::SignLayout::RowMajor,
            "{what}: plane {i}'s bits are in {:?}; the code kernels read row-major planes",
            p.bits.layout()
        );
        assert!(
            p.bits.rows() == m && p.bits.cols() == n,
            "{what}: plane {i} is {}x{}, the product is {m}x{n}",
            p.bits.rows(),
            p.bits.cols()
        );
    }
    let total: u32 = planes.iter().map(|p| u32::from(p.weight)).sum();
    assert!(total <= 255, "{what}: weights sum to {total} > 255");
    groups
}

/// Adds rows `row0..row0 + tile.len() / cols` of `Ŵ` (the grid applied to the codes of
/// `planes`) to `tile`, row-major: the batch product's tile rebuild. All planes of a row are
/// read once and each weight is written once (the codes of 64 columns built in one register
/// as in [`codes_matvec_add`], then widened and scaled 16 at a time). Runs on the calling
/// thread.
///
/// # Panics
/// If `tile` is not whole rows of the planes' width, reaches past their last row, or the
/// grid or weights are invalid (as in [`codes_matvec_add`]).
pub fn codes_rows_to_dense(
    planes: &[WeightedPlane<'_>],
    grid: &CodeGrid<'_>,
    row0: usize,
    tile: &mut [f32],
    simd: Simd,
) {
    let Some(first) = planes.first() else {
        return;
    };
    let (m, n) = (first.bits.rows(), first.bits.cols());
    let groups = validate(planes, grid, m, n, "codes_rows_to_dense");
    assert!(
        n > 0 && tile.len().is_multiple_of(n),
        "codes_rows_to_dense: the tile is not whole rows of {n} columns"
    );
    let rows = tile.len() / n;
    assert!(
        row0 + rows <= m,
        "codes_rows_to_dense: rows {row0}..{} of {m}",
        row0 + rows
    );
    let at = row0 * groups..(row0 + rows) * groups;
    let s = &grid.scales[at.clone()];
    let o = grid.offsets.map(|o| &o[at]);
    #[cfg(target_arch = "x86_64")]
    match CodeKernel::choose(simd) {
        CodeKernel::Avx512 { gfni } => {
            return avx512::rows_to_dense(planes, grid, groups, s, o, row0, tile, gfni);
        }
        CodeKernel::Avx2 { gfni } => {
            return avx2::rows_to_dense(planes, grid, groups, s, o, row0, tile, gfni)
        }
        CodeKernel::Portable => {}
    }
    rows_to_dense_portable(planes, grid, groups, s, o, row0, tile);
}

/// The codes of row `r` (`bpr` bytes per plane row), one weight at a time.
fn row_codes(planes: &[WeightedPlane<'_>], r: usize, bpr: usize, codes: &mut [u8]) {
    codes.fill(0);
    for p in planes {
        let bytes = &p.bits.as_bytes()[r * bpr..(r + 1) * bpr];
        for (q8, &b) in codes.chunks_exact_mut(8).zip(bytes) {
            for (t, q) in q8.iter_mut().enumerate() {
                if (b >> (7 - t)) & 1 == 1 {
                    *q += p.weight;
                }
            }
        }
    }
}

/// The planes' bytes and weights and the width for a vectorized tile rebuild, after checking
/// every length the unsafe code relies on (`s`, `o`: the tile rows' scales and offsets).
#[cfg(target_arch = "x86_64")]
fn tile_inputs<'a>(
    planes: &[WeightedPlane<'a>],
    grid: &CodeGrid<'_>,
    groups: usize,
    s: &[f16],
    o: Option<&[f16]>,
    row0: usize,
    tile: &[f32],
) -> (Vec<(&'a [u8], u8)>, usize) {
    let n = planes[0].bits.cols();
    let bpr = n / 8;
    let rows = tile.len() / n.max(1);
    let bytes: Vec<(&[u8], u8)> = planes
        .iter()
        .map(|p| (p.bits.as_bytes(), p.weight))
        .collect();
    assert!(
        n > 0
            && tile.len() == rows * n
            && n.is_multiple_of(8)
            && grid.group.is_multiple_of(8)
            && s.len() == rows * groups
            && o.is_none_or(|o| o.len() == s.len())
            && groups == n.div_ceil(grid.group)
            && bytes.iter().all(|(b, _)| b.len() >= (row0 + rows) * bpr),
        "codes: short buffers"
    );
    (bytes, n)
}

/// The portable tile rebuild (`s`, `o`: the tile rows' scales and offsets).
fn rows_to_dense_portable(
    planes: &[WeightedPlane<'_>],
    grid: &CodeGrid<'_>,
    groups: usize,
    s: &[f16],
    o: Option<&[f16]>,
    row0: usize,
    tile: &mut [f32],
) {
    let n = planes[0].bits.cols();
    let bpr = n / 8;
    let mut codes = vec![0u8; n];
    for (i, out) in tile.chunks_exact_mut(n).enumerate() {
        row_codes(planes, row0 + i, bpr, &mut codes);
        for (g, (out, q)) in out
            .chunks_mut(grid.group)
            .zip(codes.chunks(grid.group))
            .enumerate()
        {
            let sg = s[i * groups + g].to_f32();
            let a = sg * grid.scale;
            let b = sg * grid.shift + o.map_or(0.0, |o| o[i * groups + g].to_f32());
            for (w, &q) in out.iter_mut().zip(q) {
                *w += a * f32::from(q) + b;
            }
        }
    }
}

/// The shape and grid constants shared by every row.
struct Shape {
    n: usize,
    group: usize,
    groups: usize,
    scale: f32,
    shift: f32,
    /// `Σ_{c∈g} x[c]` per group.
    group_sums: Vec<f32>,
    /// `x` rearranged for the vectorized rows (empty for the portable ones).
    xr: Vec<f32>,
    /// Where `xr`'s values start (a cache line boundary).
    xr_at: usize,
    /// The order of `xr` (the vectorized rows' path).
    order: XOrder,
    /// `x` as two bytes for the integer rows ([`codes_matvec_add_q16`]), or none.
    q16x: Option<Q16X>,
}

/// The two-byte `x` of [`codes_matvec_add_q16`]: every column in column order (the AVX2
/// rows), or the whole 512-column blocks in the nested registers' order ([`q16_nested`]).
struct Q16X {
    /// The high bytes.
    hi: Vec<i8>,
    /// The low bytes (steps of `scale / 254`), same order.
    lo: Vec<i8>,
    /// One scale per [`Q16_SEGMENT`] columns, in column order.
    scales: Vec<f32>,
}

/// `x`'s two-byte form for the AVX-512 nested rows' whole 512-column blocks (the first
/// `wide_end` columns), in their byte order: byte `64m + 4i + j` of a block is lane `i`'s
/// byte `j` of register `m` (column `128·(i / 4) + 16·m + 4·(i % 4) + j`), what `vpdpbusd`
/// pairs with the codes; a 16-column piece `128l + 16m ..` of a block goes to bytes
/// `64m + 16l ..`.
fn q16_nested(x: &[f32], wide_end: usize) -> Q16X {
    let mut q = Q16X {
        hi: vec![0; wide_end],
        lo: vec![0; wide_end],
        scales: x[..wide_end].chunks(Q16_SEGMENT).map(q16_scale).collect(),
    };
    for block in (0..wide_end).step_by(512) {
        for l in 0..4 {
            let d = q.scales[(block + 128 * l) / Q16_SEGMENT];
            for m in 0..8 {
                let (from, to) = (block + 128 * l + 16 * m, block + 64 * m + 16 * l);
                quantize_q16(
                    &x[from..from + 16],
                    d,
                    &mut q.hi[to..to + 16],
                    &mut q.lo[to..to + 16],
                );
            }
        }
    }
    q
}

/// Whether the AVX2 rows take `x` as two bytes ([`codes_matvec_add_q16`]): with GFNI and
/// AVX-VNNI, rows of whole 32-column registers and groups of whole registers that stay in
/// one 128-column segment of `x`'s scales (or cover whole segments).
fn q16_natural(kernel: CodeKernel, n: usize, group: usize) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        kernel == CodeKernel::Avx2 { gfni: true }
            && std::arch::is_x86_feature_detected!("avxvnni")
            && n.is_multiple_of(32)
            && group.is_multiple_of(32)
            && (Q16_SEGMENT.is_multiple_of(group) || group.is_multiple_of(Q16_SEGMENT))
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (kernel, n, group);
        false
    }
}

/// Whether the chosen kernel is AVX-512 with GFNI on a CPU with VNNI.
fn kernel_has_vnni(kernel: CodeKernel) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        kernel == CodeKernel::Avx512 { gfni: true }
            && std::arch::is_x86_feature_detected!("avx512vnni")
            && std::arch::is_x86_feature_detected!("avx512vl")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = kernel;
        false
    }
}

/// How the AVX-512 rows read `x` (and which of them run).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum XOrder {
    /// As it is (and not read by these rows: no AVX-512).
    Natural,
    /// Each byte's 8 columns reversed (a mask's bit `t` is its byte's column `7 − t`).
    Lanes,
    /// As `Lanes`, then lane `i` of the `j`-th 16-lane vector of a 64-column chunk is its
    /// byte `4i + j`: the unrolled rows.
    Unrolled,
    /// Nested planes whose codes GFNI builds: per 512 columns the order of
    /// `avx512::rows_nested`'s registers, then as `Lanes`.
    Nested,
}

/// Fewest nested planes for which the AVX-512 product builds its codes with GFNI, by width:
/// its cost hardly depends on the number of planes, the masked adds' grows with it.
/// Criterion, one thread, groups of 128 (nested / masked adds): 1536×512 at 2 planes
/// 56 / 48 µs, 4: 69 / 63, 5: 58 / 66, 6: 59 / 67, 8: 61 / 81; 4096² at 2 planes
/// 1.37 / 0.91 ms, 4: 1.46 / 1.11, 5: 1.43 / 1.24, 6: 1.48 / 1.35, 7: 1.50 / 1.59–1.65,
/// 8: 1.56 / 1.65.
fn nested_min_planes(n: usize) -> usize {
    if n < 2048 {
        5
    } else {
        7
    }
}

/// The same for the tile rebuild (4096², 4 planes: 2.76–2.84 ms nested, 2.92 with masked
/// adds; 6: 2.93–3.04 / 3.34; 8: 3.05 / 3.38).
const NESTED_TILE_MIN_PLANES: usize = 4;

/// Whether the AVX-512 rows of nested planes take groups of `group` columns: a lane of 16
/// columns of their registers must stay in one group for whole registers.
fn nested_group(group: usize) -> bool {
    group.is_multiple_of(16) && (128 % group == 0 || group.is_multiple_of(128))
}

/// Whether the weights are distinct powers of two (nested planes: the codes are a bit
/// transpose of the planes).
fn nested_weights(weights: impl IntoIterator<Item = u8>) -> bool {
    let mut seen = 0u8;
    weights.into_iter().all(|w| {
        let fresh = w.is_power_of_two() && seen & w == 0;
        seen |= w;
        fresh
    })
}

/// The planes of nested weights by position for `gf2p8affineqb` (the plane of weight `2^e`
/// at `7 − e`: the instruction reads its matrix rows from the top byte down), or none if
/// the weights are not nested.
#[cfg(target_arch = "x86_64")]
fn gfni_positions<'a>(planes: &[(&'a [u8], u8)]) -> Option<[Option<&'a [u8]>; 8]> {
    if !nested_weights(planes.iter().map(|&(_, w)| w)) {
        return None;
    }
    let mut at = [None; 8];
    for &(bits, w) in planes {
        at[7 - w.trailing_zeros() as usize] = Some(bits);
    }
    Some(at)
}

impl Shape {
    /// `x` rearranged (see [`Shape::xr`]'s field).
    fn xr(&self) -> &[f32] {
        &self.xr[self.xr_at..]
    }

    /// `Σ_g (s[g]·shift + o[g])·X[g]` for one row's scales and offsets (`o` empty: zero).
    fn row_constant(&self, s: &[f16], o: Option<&[f16]>) -> f32 {
        let mut sum = 0.0f32;
        for (g, (sg, &xg)) in s.iter().zip(&self.group_sums).enumerate() {
            let og = o.map_or(0.0, |o| o[g].to_f32());
            sum += (sg.to_f32() * self.shift + og) * xg;
        }
        sum
    }
}

/// One f16 to f32 with F16C, inlined (`f16::to_f32` checks the CPU and calls out on
/// every value).
///
/// # Safety
/// Only from functions with F16C enabled (inlined into them).
#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
#[inline(always)]
unsafe fn widen_f16(h: f16) -> f32 {
    // SAFETY: the caller has F16C enabled.
    unsafe {
        use std::arch::x86_64::{_mm_cvtph_ps, _mm_cvtsi32_si128, _mm_cvtss_f32};
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(i32::from(h.to_bits()))))
    }
}

/// [`Shape::row_constant`] with [`widen_f16`].
///
/// # Safety
/// Only from functions with F16C enabled (inlined into them).
#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
#[inline(always)]
unsafe fn row_constant(shape: &Shape, s: &[f16], o: Option<&[f16]>) -> f32 {
    let mut sum = 0.0f32;
    for (g, (&sg, &xg)) in s.iter().zip(&shape.group_sums).enumerate() {
        // SAFETY: the caller has F16C enabled.
        let (sg, og) = unsafe { (widen_f16(sg), o.map_or(0.0, |o| widen_f16(o[g]))) };
        sum += (sg * shape.shift + og) * xg;
    }
    sum
}

/// The portable rows `row0..row0 + y.len()` (`s`, `o`: their group scales and offsets).
fn rows_portable(
    planes: &[WeightedPlane<'_>],
    shape: &Shape,
    s: &[f16],
    o: Option<&[f16]>,
    x: &[f32],
    row0: usize,
    y: &mut [f32],
) {
    let (n, groups) = (shape.n, shape.groups);
    let bpr = n / 8;
    let mut codes = vec![0u8; n];
    for (i, yr) in y.iter_mut().enumerate() {
        row_codes(planes, row0 + i, bpr, &mut codes);
        let s = &s[i * groups..(i + 1) * groups];
        let mut acc = 0.0f32;
        for ((qg, xg), sg) in codes.chunks(shape.group).zip(x.chunks(shape.group)).zip(s) {
            let dot: f32 = qg.iter().zip(xg).map(|(&q, &x)| f32::from(q) * x).sum();
            acc += sg.to_f32() * dot;
        }
        let o = o.map(|o| &o[i * groups..(i + 1) * groups]);
        *yr += shape.scale * acc + shape.row_constant(s, o);
    }
}

/// The first two rounds of the nested planes' byte transpose, for `ymm` or `zmm` vectors
/// (the unpack intrinsics of that width given, in scope where it is used): from 8 plane
/// vectors `p` (by position), pairs then quads of plane bytes. `b[k]` (positions 0–3) and
/// `b[4 + k]` (4–7) hold, in each 128-bit lane `l`, column bytes `16l + 4k ..+ 4`; a third
/// round of 32-bit unpacks of `b[k]` with `b[4 + k]` gives qwords of one byte of every
/// plane.
#[cfg(target_arch = "x86_64")]
macro_rules! plane_quads {
    ($p:expr, $lo8:ident, $hi8:ident, $lo16:ident, $hi16:ident) => {{
        let p = $p;
        let a = [
            $lo8(p[0], p[1]),
            $hi8(p[0], p[1]),
            $lo8(p[2], p[3]),
            $hi8(p[2], p[3]),
            $lo8(p[4], p[5]),
            $hi8(p[4], p[5]),
            $lo8(p[6], p[7]),
            $hi8(p[6], p[7]),
        ];
        [
            $lo16(a[0], a[2]),
            $hi16(a[0], a[2]),
            $lo16(a[1], a[3]),
            $hi16(a[1], a[3]),
            $lo16(a[4], a[6]),
            $hi16(a[4], a[6]),
            $lo16(a[5], a[7]),
            $hi16(a[5], a[7]),
        ]
    }};
}

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
mod avx512 {
    use std::arch::x86_64::{
        __m512, __m512i, __mmask16, _mm512_add_ps, _mm512_and_si512, _mm512_castsi512_si128,
        _mm512_cvtepi32_ps, _mm512_cvtepu8_epi32, _mm512_extracti32x4_epi32, _mm512_fmadd_ps,
        _mm512_gf2p8affine_epi64_epi8, _mm512_loadu_ps, _mm512_loadu_si512, _mm512_mask_add_epi8,
        _mm512_mask_storeu_ps, _mm512_maskz_loadu_ps, _mm512_reduce_add_ps, _mm512_set1_epi32,
        _mm512_set1_epi64, _mm512_set1_epi8, _mm512_set1_ps, _mm512_setzero_ps,
        _mm512_setzero_si512, _mm512_shuffle_epi8, _mm512_srli_epi32, _mm512_storeu_ps,
        _mm512_storeu_si512, _mm512_unpackhi_epi16, _mm512_unpackhi_epi32, _mm512_unpackhi_epi8,
        _mm512_unpacklo_epi16, _mm512_unpacklo_epi32, _mm512_unpacklo_epi8, _mm_cvtph_ps,
        _mm_loadu_si128,
    };

    use half::f16;

    use std::arch::x86_64::{
        _mm512_castps128_ps512, _mm512_permutexvar_ps, _mm512_set_epi32, _mm_cvtsi64_si128,
    };

    use std::arch::x86_64::{
        _mm512_add_epi32, _mm512_castsi512_si256, _mm512_cvtph_ps, _mm512_dpbusd_epi32,
        _mm512_maskz_loadu_epi16, _mm512_mul_ps, _mm_loadl_epi64, _mm_loadu_ps,
    };

    use super::{widen_f16, CodeGrid, Shape, WeightedPlane, XOrder, Q16X};

    /// The rows `row0..row0 + y.len()` with AVX-512 (the caller checked F and BW).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn rows(
        planes: &[WeightedPlane<'_>],
        shape: &Shape,
        s: &[f16],
        o: Option<&[f16]>,
        row0: usize,
        y: &mut [f32],
    ) {
        let xr = shape.xr();
        let bytes: Vec<(&[u8], u8)> = planes
            .iter()
            .map(|p| (p.bits.as_bytes(), p.weight))
            .collect();
        let bpr = shape.n / 8;
        assert!(
            xr.len() >= shape.n.next_multiple_of(64)
                && s.len() == y.len() * shape.groups
                && bytes.iter().all(|(b, _)| b.len() >= (row0 + y.len()) * bpr),
            "codes: short buffers"
        );
        if shape.order == XOrder::Nested {
            // `XOrder::Nested` is chosen for nested weights only, and `xr` is in its order.
            let Some(at) = super::gfni_positions(&bytes) else {
                unreachable!("codes: XOrder::Nested for planes that are not nested")
            };
            if let Some(q16x) = &shape.q16x {
                let wide = shape.n - shape.n % WIDE;
                assert!(
                    q16x.hi.len() == wide
                        && q16x.lo.len() == wide
                        && q16x.scales.len() * super::Q16_SEGMENT == wide,
                    "codes: short two-byte x"
                );
                // SAFETY: as below, and `q16x` is only built where the CPU has VL and VNNI
                // (`kernel_has_vnni`); its lengths are asserted just above.
                return unsafe { rows_nested_q16(&bytes, at, shape, q16x, s, o, row0, y) };
            }
            // SAFETY: the caller checked AVX-512 F and BW, F16C and GFNI (`CodeKernel::choose`;
            // `XOrder::Nested` is only chosen with GFNI); the lengths are asserted above.
            return unsafe { rows_nested(&bytes, at, shape, s, o, row0, y) };
        }
        if shape.order == XOrder::Unrolled {
            // Whole 64-column chunks only, `xr` in their lane order: the planes unrolled.
            macro_rules! whole {
                ($($p:literal)*) => {
                    match bytes.len() {
                        $($p => {
                            let mut ptrs = [std::ptr::null::<u8>(); $p];
                            let mut weights = [0u8; $p];
                            for ((ptr, w), &(b, bw)) in ptrs.iter_mut().zip(&mut weights).zip(&bytes) {
                                *ptr = b.as_ptr();
                                *w = bw;
                            }
                            // SAFETY: the caller checked AVX-512 F and BW and F16C at run
                            // time (`CodeKernel::choose`); every
                            // plane holds the rows' bytes and `xr` the padded columns
                            // (asserted above).
                            return unsafe { rows_whole::<$p>(ptrs, weights, shape, s, o, row0, y) };
                        })*
                        _ => {}
                    }
                };
            }
            whole!(1 2 3 4 5 6 7 8);
        }
        // SAFETY: the caller checked AVX-512 F and BW and F16C at run time.
        unsafe { rows_impl(&bytes, shape, s, o, row0, y) }
    }

    /// The rows with every group a whole number of 64-column chunks and `P` planes.
    ///
    /// Per chunk and row: `P` masked byte adds build the codes, and four (and, shift,
    /// convert, multiply-add) steps take them to f32. (Two rows at a time, sharing the loads
    /// of `x`, measured no faster: the vector pipes are the limit.)
    ///
    /// # Safety
    /// AVX-512 F, BW and F16C must be available; every `bits[p]` must hold the bytes of rows
    /// `..row0 + y.len()` (`cols / 8` per row), `xr` at least `cols` floats and `s`
    /// `y.len() · groups` scales.
    #[target_feature(enable = "avx512f,avx512bw,f16c")]
    unsafe fn rows_whole<const P: usize>(
        bits: [*const u8; P],
        weights: [u8; P],
        shape: &Shape,
        s: &[f16],
        o: Option<&[f16]>,
        row0: usize,
        y: &mut [f32],
    ) {
        let xr = shape.xr();
        let (n, groups) = (shape.n, shape.groups);
        let group_chunks = shape.group / 64;
        let bpr = n / 8;
        let wv: [__m512i; P] = weights.map(|w| _mm512_set1_epi8(w as i8));
        let low = _mm512_set1_epi32(0xff);
        let xp = xr.as_ptr();
        for (i, yr) in y.iter_mut().enumerate() {
            let mut byte = (row0 + i) * bpr;
            let mut col = 0usize;
            let mut acc = _mm512_setzero_ps();
            let mut constant = 0.0f32;
            for gi in 0..groups {
                let mut d = [_mm512_setzero_ps(); 4];
                // The last group may be shorter (whole chunks still: `n % 64 == 0`).
                let chunks = group_chunks.min((n - col) / 64);
                for _ in 0..chunks {
                    let mut q = _mm512_setzero_si512();
                    for p in 0..P {
                        // SAFETY: `byte + 8 <= (row0 + i + 1)·bpr`, within the plane.
                        let mask = unsafe { bits[p].add(byte).cast::<u64>().read_unaligned() };
                        q = _mm512_mask_add_epi8(q, u64::from_le(mask), q, wv[p]);
                    }
                    // Byte `j` of every 32-bit lane (columns `4i + j`, `xr`'s order).
                    let codes = [
                        _mm512_and_si512(q, low),
                        _mm512_and_si512(_mm512_srli_epi32::<8>(q), low),
                        _mm512_and_si512(_mm512_srli_epi32::<16>(q), low),
                        _mm512_srli_epi32::<24>(q),
                    ];
                    for (j, (dj, cj)) in d.iter_mut().zip(codes).enumerate() {
                        // SAFETY: `col + 64 <= n <= xr.len()`.
                        let xj = unsafe { _mm512_loadu_ps(xp.add(col + 16 * j)) };
                        *dj = _mm512_fmadd_ps(_mm512_cvtepi32_ps(cj), xj, *dj);
                    }
                    byte += 8;
                    col += 64;
                }
                let at = i * groups + gi;
                // SAFETY: F16C is enabled here.
                let (sg, og) = unsafe { (widen_f16(s[at]), o.map_or(0.0, |o| widen_f16(o[at]))) };
                constant += (sg * shape.shift + og) * shape.group_sums[gi];
                let [d0, d1, d2, d3] = d;
                let dot = _mm512_add_ps(_mm512_add_ps(d0, d1), _mm512_add_ps(d2, d3));
                acc = _mm512_fmadd_ps(_mm512_set1_ps(sg), dot, acc);
            }
            *yr += shape.scale * _mm512_reduce_add_ps(acc) + constant;
        }
    }

    /// The tile rebuild of [`super::codes_rows_to_dense`] (the caller checked F and BW, and
    /// GFNI if `gfni`, and the shapes; `s`, `o`: the tile rows' scales and offsets).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn rows_to_dense(
        planes: &[WeightedPlane<'_>],
        grid: &CodeGrid<'_>,
        groups: usize,
        s: &[f16],
        o: Option<&[f16]>,
        row0: usize,
        tile: &mut [f32],
        gfni: bool,
    ) {
        let (bytes, n) = super::tile_inputs(planes, grid, groups, s, o, row0, tile);
        if gfni && grid.group.is_multiple_of(16) && bytes.len() >= super::NESTED_TILE_MIN_PLANES {
            if let Some(at) = super::gfni_positions(&bytes) {
                // SAFETY: the caller checked AVX-512 F and BW, F16C and GFNI
                // (`CodeKernel::choose`); `tile_inputs` asserted the lengths.
                return unsafe { tile_nested(&bytes, at, grid, n, groups, s, o, row0, tile) };
            }
        }
        // SAFETY: the caller checked AVX-512 F and BW and F16C (`CodeKernel::choose`);
        // `tile_inputs` asserted the buffer lengths.
        unsafe { rows_to_dense_impl(&bytes, grid, n, groups, s, o, row0, tile) }
    }

    /// # Safety
    /// AVX-512 F, BW and F16C must be available; `tile` whole rows of `cols` floats, each
    /// plane the bytes of rows `..row0 + rows`, `s` (and `o`) `rows · groups` values.
    #[target_feature(enable = "avx512f,avx512bw,f16c")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn rows_to_dense_impl(
        planes: &[(&[u8], u8)],
        grid: &CodeGrid<'_>,
        n: usize,
        groups: usize,
        s: &[f16],
        o: Option<&[f16]>,
        row0: usize,
        tile: &mut [f32],
    ) {
        let bpr = n / 8;
        let weights: Vec<__m512i> = planes
            .iter()
            .map(|&(_, w)| _mm512_set1_epi8(w as i8))
            .collect();
        // SAFETY: AVX-512 F and BW are enabled here.
        let reverse = unsafe { reverse_qword_bytes() };
        // One row's codes in column order (16 bytes of slack for the last 16-lane read).
        let mut codes = vec![0u8; n.next_multiple_of(64) + 16];
        let cp = codes.as_mut_ptr();
        for (i, out) in tile.chunks_exact_mut(n).enumerate() {
            let row_byte = (row0 + i) * bpr;
            let mut c = 0;
            while c < n {
                let width = (n - c).min(64);
                let at = row_byte + c / 8;
                // SAFETY: AVX-512 F and BW are enabled here; `at + width / 8` bytes lie
                // within row `row0 + i` of every plane (asserted by the caller).
                let q = unsafe { chunk_codes(planes, &weights, at, width) };
                let q = _mm512_shuffle_epi8(q, reverse);
                // SAFETY: `c + 64 <= codes.len()`.
                unsafe { _mm512_storeu_si512(cp.add(c).cast(), q) };
                c += 64;
            }
            let row = i * groups..(i + 1) * groups;
            // SAFETY: the codes of the row are in column order, `n` rounded up to 64 plus
            // 16 bytes.
            unsafe { add_codes_row(cp, |c| c, grid, &s[row.clone()], o.map(|o| &o[row]), out) };
        }
    }

    /// The tile rebuild of nested planes with GFNI ([`NestedCodes`]; groups of a multiple
    /// of 16 columns).
    ///
    /// # Safety
    /// As [`rows_to_dense_impl`], and GFNI must be available.
    #[target_feature(enable = "avx512f,avx512bw,gfni,f16c")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn tile_nested(
        planes: &[(&[u8], u8)],
        at: [Option<&[u8]>; 8],
        grid: &CodeGrid<'_>,
        n: usize,
        groups: usize,
        s: &[f16],
        o: Option<&[f16]>,
        row0: usize,
        tile: &mut [f32],
    ) {
        let bpr = n / 8;
        // SAFETY: AVX-512 F and BW are enabled here.
        let mut codes = unsafe { NestedCodes::new(planes, at, n) };
        for (i, out) in tile.chunks_exact_mut(n).enumerate() {
            let row = i * groups..(i + 1) * groups;
            // SAFETY: the features are enabled here; the planes hold the tile's rows and
            // every piece of 16 columns starts on a multiple of 16 (groups of a multiple
            // of 16 columns), within `n` rounded up to 64 bytes of codes.
            unsafe {
                codes.row((row0 + i) * bpr, n);
                let piece = |c| codes.piece(c);
                add_codes_row(
                    codes.buf.as_ptr(),
                    piece,
                    grid,
                    &s[row.clone()],
                    o.map(|o| &o[row]),
                    out,
                );
            }
        }
    }

    /// The byte shuffle that reverses the bytes of each qword.
    ///
    /// # Safety
    /// AVX-512 F must be available.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn reverse_qword_bytes() -> __m512i {
        let mut control = [0u8; 64];
        for (p, c) in control.iter_mut().enumerate() {
            *c = ((p & 8) | (7 - (p & 7))) as u8;
        }
        // SAFETY: 64 bytes.
        unsafe { _mm512_loadu_si512(control.as_ptr().cast()) }
    }

    /// Adds one row of the grid applied to its codes to `out` (`s`, `o`: the row's scales
    /// and offsets), 16 columns at a time: the codes of columns `c ..` (`c` a multiple of
    /// 16 within a group) start at `codes + piece(c)`.
    ///
    /// # Safety
    /// Only from functions with AVX-512 F and F16C enabled (inlined into them); 16 bytes
    /// from `codes + piece(c)` must be readable for every such `c` below `out.len()`.
    #[inline(always)]
    #[allow(unused_unsafe)] // the body is one unsafe block; the inner ones keep their notes
    unsafe fn add_codes_row(
        codes: *const u8,
        piece: impl Fn(usize) -> usize,
        grid: &CodeGrid<'_>,
        s: &[f16],
        o: Option<&[f16]>,
        out: &mut [f32],
    ) {
        // SAFETY: inlined into functions with AVX-512 F and F16C enabled; the blocks
        // inside state what else they rely on.
        unsafe {
            let n = out.len();
            let op = out.as_mut_ptr();
            for (g, &sg) in s.iter().enumerate() {
                let (sg, og) = (widen_f16(sg), o.map_or(0.0, |o| widen_f16(o[g])));
                let a = _mm512_set1_ps(sg * grid.scale);
                let b = _mm512_set1_ps(sg * grid.shift + og);
                let (c0, c1) = (g * grid.group, ((g + 1) * grid.group).min(n));
                let mut c = c0;
                while c < c1 {
                    let width = (c1 - c).min(16);
                    // SAFETY: the codes are readable (the caller's contract); the tile lanes
                    // touched are below `c1 <= n` (masked when fewer than 16 remain).
                    unsafe {
                        let q8 = _mm_loadu_si128(codes.add(piece(c)).cast());
                        let v = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(q8)), a, b);
                        if width == 16 {
                            let t = _mm512_loadu_ps(op.add(c));
                            _mm512_storeu_ps(op.add(c), _mm512_add_ps(t, v));
                        } else {
                            let k: __mmask16 = (1u16 << width) - 1;
                            let t = _mm512_maskz_loadu_ps(k, op.add(c));
                            _mm512_mask_storeu_ps(op.add(c), k, _mm512_add_ps(t, v));
                        }
                    }
                    c += 16;
                }
            }
        }
    }

    /// The codes of `width` (64, or a multiple of 8 below it) columns starting at byte `at`
    /// of every plane, one masked byte add per plane (lanes past `width` stay 0; a mask's bit
    /// `t` is its byte's column `7 − t`).
    ///
    /// # Safety
    /// AVX-512 F and BW must be available; `at + 8 <= bits.len()` for every plane when
    /// `width == 64` (else `at + width / 8 <= bits.len()` is checked).
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw")]
    unsafe fn chunk_codes(
        planes: &[(&[u8], u8)],
        weights: &[__m512i],
        at: usize,
        width: usize,
    ) -> __m512i {
        let mut q = _mm512_setzero_si512();
        for (&(bits, _), &w) in planes.iter().zip(weights) {
            let mask = if width == 64 {
                // SAFETY: `at + 8 <= bits.len()` (the caller's contract).
                u64::from_le_bytes(unsafe {
                    bits.as_ptr().add(at).cast::<[u8; 8]>().read_unaligned()
                })
            } else {
                let mut b = [0u8; 8];
                b[..width / 8].copy_from_slice(&bits[at..at + width / 8]);
                u64::from_le_bytes(b)
            };
            q = _mm512_mask_add_epi8(q, mask, q, w);
        }
        q
    }

    /// # Safety
    /// AVX-512 F, BW and F16C must be available. The lengths are asserted.
    #[target_feature(enable = "avx512f,avx512bw,f16c")]
    unsafe fn rows_impl(
        planes: &[(&[u8], u8)],
        shape: &Shape,
        s: &[f16],
        o: Option<&[f16]>,
        row0: usize,
        y: &mut [f32],
    ) {
        let xr = shape.xr();
        let (n, group, groups) = (shape.n, shape.group, shape.groups);
        let bpr = n / 8;
        assert!(
            xr.len() >= n.next_multiple_of(64)
                && s.len() == y.len() * groups
                && planes
                    .iter()
                    .all(|(b, _)| b.len() >= (row0 + y.len()) * bpr),
            "codes: short buffers"
        );
        let weights: Vec<__m512i> = planes
            .iter()
            .map(|&(_, w)| _mm512_set1_epi8(w as i8))
            .collect();
        let xp = xr.as_ptr();
        for (i, yr) in y.iter_mut().enumerate() {
            let row_byte = (row0 + i) * bpr;
            let mut acc = _mm512_setzero_ps();
            for (gi, sg) in s[i * groups..(i + 1) * groups].iter().enumerate() {
                let c0 = gi * group;
                let c1 = (c0 + group).min(n);
                // SAFETY: AVX-512 F and BW are enabled here; the planes hold the row's
                // bytes and `xr` the padded columns (asserted above).
                let dot = unsafe { masked_dot(planes, &weights, row_byte, c0, c1, xp) };
                // SAFETY: F16C is enabled here.
                let sg = unsafe { widen_f16(*sg) };
                acc = _mm512_fmadd_ps(_mm512_set1_ps(sg), dot, acc);
            }
            let row = i * groups..(i + 1) * groups;
            let o = o.map(|o| &o[row.clone()]);
            // SAFETY: AVX-512 F and BW and F16C are enabled here.
            let constant = unsafe { row_constant_lanes(shape, &s[row], o) };
            let total = _mm512_fmadd_ps(_mm512_set1_ps(shape.scale), acc, constant);
            *yr += _mm512_reduce_add_ps(total);
        }
    }

    /// `Σ_c q[c]·x[c]` over columns `c0..c1` (multiples of 8) of the row whose bytes start at
    /// `row_byte`, as 16 lane sums: per 64 columns the codes by [`chunk_codes`], widened 16
    /// at a time (`xp`: `x` with each byte's 8 columns reversed, padded to 64).
    ///
    /// # Safety
    /// Only from functions with AVX-512 F and BW enabled (inlined into them); every plane
    /// must hold bytes `row_byte + c0 / 8 .. row_byte + c1 / 8` and `xp` `c1` rounded up
    /// to 64 floats.
    #[inline(always)]
    #[allow(unused_unsafe)] // the body is one unsafe block; the inner ones keep their notes
    unsafe fn masked_dot(
        planes: &[(&[u8], u8)],
        weights: &[__m512i],
        row_byte: usize,
        c0: usize,
        c1: usize,
        xp: *const f32,
    ) -> __m512 {
        // SAFETY: inlined into functions with AVX-512 F and BW enabled; the blocks inside
        // state what else they rely on.
        unsafe {
            let mut dots = [_mm512_setzero_ps(); 4];
            let mut c = c0;
            while c < c1 {
                let width = (c1 - c).min(64);
                let at = row_byte + c / 8;
                // SAFETY: `at + width / 8 <= row_byte + c1 / 8`, within every plane.
                let q = unsafe { chunk_codes(planes, weights, at, width) };
                // Lanes beyond `width` have code 0; their `x` is not read.
                let lanes = [
                    _mm512_castsi512_si128(q),
                    _mm512_extracti32x4_epi32::<1>(q),
                    _mm512_extracti32x4_epi32::<2>(q),
                    _mm512_extracti32x4_epi32::<3>(q),
                ];
                for (j, (lane, dot)) in lanes.iter().zip(dots.iter_mut()).enumerate() {
                    let from = 16 * j;
                    if from >= width {
                        break;
                    }
                    let qf = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(*lane));
                    // SAFETY: `c + from + 16 <= xr.len()` (padded to 64), and the
                    // masked load reads only the lanes below `width`.
                    let xv: __m512 = unsafe {
                        if width - from >= 16 {
                            _mm512_loadu_ps(xp.add(c + from))
                        } else {
                            _mm512_maskz_loadu_ps(0x00ff, xp.add(c + from))
                        }
                    };
                    *dot = _mm512_fmadd_ps(qf, xv, *dot);
                }
                c += width;
            }
            _mm512_add_ps(
                _mm512_add_ps(dots[0], dots[1]),
                _mm512_add_ps(dots[2], dots[3]),
            )
        }
    }

    /// The codes of 512 columns of nested planes (`at`: the planes by `gf2p8affineqb`
    /// position, see [`super::gfni_positions`]) from byte `at_byte` of each: register `m`'s
    /// 16-byte lane `l` holds the codes of columns `128·l + 16·m ..+ 16`, in column order.
    /// One 64-byte load per plane, three rounds of byte unpacks and one `gf2p8affineqb` per
    /// register.
    ///
    /// # Safety
    /// Only from functions with AVX-512 F, BW and GFNI enabled (inlined into them); bytes
    /// `at_byte .. at_byte + 64` of every plane must exist.
    #[inline(always)]
    #[allow(unused_unsafe)] // the body is one unsafe block; the inner ones keep their notes
    unsafe fn nested_codes_512(at: &[Option<&[u8]>; 8], at_byte: usize) -> [__m512i; 8] {
        // SAFETY: inlined into functions with the features enabled; the caller guarantees
        // the bytes read.
        unsafe {
            let mut p = [_mm512_setzero_si512(); 8];
            for (v, bits) in p.iter_mut().zip(at) {
                if let Some(bits) = bits {
                    *v = _mm512_loadu_si512(bits.as_ptr().add(at_byte).cast());
                }
            }
            let b = plane_quads!(
                p,
                _mm512_unpacklo_epi8,
                _mm512_unpackhi_epi8,
                _mm512_unpacklo_epi16,
                _mm512_unpackhi_epi16
            );
            // Register m = 2k + h holds, in lane l, column bytes 16l + 2m and 16l + 2m + 1
            // (one byte of every plane per qword). Byte i of the transpose has bit t =
            // parity(byte 7 − t of its qword AND byte i of the operand): with operand byte
            // i = 128 >> i, bit e of the weight-2^e plane's bit for column i — its code.
            let unit = _mm512_set1_epi64(0x0102_0408_1020_4080);
            let t = |v| _mm512_gf2p8affine_epi64_epi8::<0>(unit, v);
            [
                t(_mm512_unpacklo_epi32(b[0], b[4])),
                t(_mm512_unpackhi_epi32(b[0], b[4])),
                t(_mm512_unpacklo_epi32(b[1], b[5])),
                t(_mm512_unpackhi_epi32(b[1], b[5])),
                t(_mm512_unpacklo_epi32(b[2], b[6])),
                t(_mm512_unpackhi_epi32(b[2], b[6])),
                t(_mm512_unpacklo_epi32(b[3], b[7])),
                t(_mm512_unpackhi_epi32(b[3], b[7])),
            ]
        }
    }

    /// Columns whose codes [`NestedCodes::row`] builds from one 64-byte load per plane.
    const WIDE: usize = 512;

    /// Builds a row's codes of nested planes (distinct power-of-two weights) with GFNI: per
    /// 512 columns one 64-byte load per plane and three rounds of byte unpacks turn the
    /// planes into qwords holding one byte of every plane, and one `gf2p8affineqb` per 64
    /// columns transposes each qword's 8×8 bits into the 8 columns' codes. The 16-byte
    /// lane `l` of the `m`-th result holds columns `128·l + 16·m ..`; it is stored at
    /// `64·m + 16·l` (see [`NestedCodes::piece`]). The last `n % 512` columns are built
    /// with masked adds, in column order.
    struct NestedCodes<'a> {
        /// The plane of weight `2^e` at `7 − e` (none where no plane has that weight).
        at: [Option<&'a [u8]>; 8],
        planes: &'a [(&'a [u8], u8)],
        weights: Vec<__m512i>,
        /// Reverses the bytes of each qword (a mask's bit `t` is its byte's column `7 − t`).
        reverse: __m512i,
        /// The codes of the row built last (`n` rounded up to 64 bytes).
        buf: Vec<u8>,
        /// Where the columns built by masked adds start.
        wide_end: usize,
    }

    impl<'a> NestedCodes<'a> {
        /// # Safety
        /// AVX-512 F and BW must be available.
        #[inline]
        #[target_feature(enable = "avx512f,avx512bw")]
        unsafe fn new(planes: &'a [(&'a [u8], u8)], at: [Option<&'a [u8]>; 8], n: usize) -> Self {
            NestedCodes {
                at,
                planes,
                weights: planes
                    .iter()
                    .map(|&(_, w)| _mm512_set1_epi8(w as i8))
                    .collect(),
                // SAFETY: AVX-512 F is enabled here.
                reverse: unsafe { reverse_qword_bytes() },
                buf: vec![0; n.next_multiple_of(64)],
                wide_end: 0,
            }
        }

        /// Builds the codes of the row whose bytes start at `row_byte` (`n` columns).
        ///
        /// # Safety
        /// Only from functions with AVX-512 F, BW and GFNI enabled (inlined into them);
        /// bytes `row_byte .. row_byte + n / 8` of every plane must exist and `n` must be
        /// the width given to [`NestedCodes::new`], a multiple of 8.
        #[inline(always)]
        unsafe fn row(&mut self, row_byte: usize, n: usize) {
            debug_assert!(self.buf.len() >= n.next_multiple_of(64));
            let op = self.buf.as_mut_ptr();
            let mut c = 0;
            // SAFETY: the caller has the features enabled and guarantees the plane bytes
            // (`c + 512 <= n`: 64 bytes from `row_byte + c / 8` are in the row); the stores stay below
            // `c + 512 <= n <= buf.len()`, and the masked-add chunks' 64-byte stores below
            // `n` rounded up to 64.
            unsafe {
                while c + WIDE <= n {
                    let codes = nested_codes_512(&self.at, row_byte + c / 8);
                    for (m, q) in codes.into_iter().enumerate() {
                        _mm512_storeu_si512(op.add(c + 64 * m).cast(), q);
                    }
                    c += WIDE;
                }
                self.wide_end = c;
                while c < n {
                    let width = (n - c).min(64);
                    let q = chunk_codes(self.planes, &self.weights, row_byte + c / 8, width);
                    _mm512_storeu_si512(op.add(c).cast(), _mm512_shuffle_epi8(q, self.reverse));
                    c += 64;
                }
            }
        }

        /// Where in the row's codes the 16 columns from `c` (a multiple of 16) are.
        #[inline(always)]
        fn piece(&self, c: usize) -> usize {
            if c < self.wide_end {
                let w = c % WIDE;
                c - w + 64 * (w % 128 / 16) + 16 * (w / 128)
            } else {
                c
            }
        }
    }

    /// The rows of nested planes with GFNI (groups dividing 128 columns or a multiple of
    /// 128). Per 512 columns one 64-byte load per plane, three rounds of byte unpacks and
    /// one `gf2p8affineqb` per 64 columns give, in register `m`, the codes of columns
    /// `128·l + 16·m ..+ 16` in its 16-byte lane `l`, which are widened as the unrolled
    /// rows widen theirs (byte `j` of every 32-bit lane) and multiplied with `xr` in that
    /// order. A lane's group is fixed for `min(group, 128) / 16` registers: their sums are
    /// scaled then, lane by lane. The last `n % 512` columns are built by masked adds
    /// ([`masked_dot`]).
    ///
    /// # Safety
    /// AVX-512 F, BW, GFNI and F16C must be available; every plane must hold the bytes of
    /// rows `..row0 + y.len()`, `xr` `n` rounded up to 64 floats in [`XOrder::Nested`]'s
    /// order and `s` `y.len() · groups` scales.
    #[target_feature(enable = "avx512f,avx512bw,gfni,f16c")]
    unsafe fn rows_nested(
        planes: &[(&[u8], u8)],
        at: [Option<&[u8]>; 8],
        shape: &Shape,
        s: &[f16],
        o: Option<&[f16]>,
        row0: usize,
        y: &mut [f32],
    ) {
        let xr = shape.xr();
        let (n, group, groups) = (shape.n, shape.group, shape.groups);
        debug_assert!(super::nested_group(group) && xr.len() >= n.next_multiple_of(64));
        let bpr = n / 8;
        let wide_end = n - n % WIDE;
        // Registers whose lanes stay in one group (1, 2, 4 or 8).
        let span = group.min(128) / 16;
        let flushes: Vec<[usize; 4]> = nested_flushes(wide_end, span)
            .map(|first| first.map(|c| c / group))
            .collect();
        let weights: Vec<__m512i> = planes
            .iter()
            .map(|&(_, w)| _mm512_set1_epi8(w as i8))
            .collect();
        let low = _mm512_set1_epi32(0xff);
        let xp = xr.as_ptr();
        for (i, yr) in y.iter_mut().enumerate() {
            let row_byte = (row0 + i) * bpr;
            let sr = &s[i * groups..(i + 1) * groups];
            // SAFETY: F16C is enabled here; the flushes' groups are the row's.
            let lane_scales = |g: [usize; 4]| unsafe { lane_scales(sr, g, group) };
            let mut flush = flushes.iter();
            let mut acc = _mm512_setzero_ps();
            let mut c = 0;
            while c < wide_end {
                // SAFETY: `c + 512 <= n`: bytes `.. + 64` from there are in the row.
                let q = unsafe { nested_codes_512(&at, row_byte + c / 8) };
                let (mut d0, mut d1, mut d2, mut d3) = (
                    _mm512_setzero_ps(),
                    _mm512_setzero_ps(),
                    _mm512_setzero_ps(),
                    _mm512_setzero_ps(),
                );
                // One register of codes (`m`: its index), unrolled by hand: a loop kept
                // the unpacked vectors on the stack and branched on `m`.
                macro_rules! step {
                    ($m:literal) => {{
                        let q = q[$m];
                        let codes = [
                            _mm512_and_si512(q, low),
                            _mm512_and_si512(_mm512_srli_epi32::<8>(q), low),
                            _mm512_and_si512(_mm512_srli_epi32::<16>(q), low),
                            _mm512_srli_epi32::<24>(q),
                        ];
                        // SAFETY: `c + 512 <= n <= xr.len()`: 64 floats from `xm`.
                        unsafe {
                            let xm = xp.add(c + 64 * $m);
                            d0 = _mm512_fmadd_ps(
                                _mm512_cvtepi32_ps(codes[0]),
                                _mm512_loadu_ps(xm),
                                d0,
                            );
                            d1 = _mm512_fmadd_ps(
                                _mm512_cvtepi32_ps(codes[1]),
                                _mm512_loadu_ps(xm.add(16)),
                                d1,
                            );
                            d2 = _mm512_fmadd_ps(
                                _mm512_cvtepi32_ps(codes[2]),
                                _mm512_loadu_ps(xm.add(32)),
                                d2,
                            );
                            d3 = _mm512_fmadd_ps(
                                _mm512_cvtepi32_ps(codes[3]),
                                _mm512_loadu_ps(xm.add(48)),
                                d3,
                            );
                        }
                        if ($m + 1) & (span - 1) == 0 {
                            let dot = _mm512_add_ps(_mm512_add_ps(d0, d1), _mm512_add_ps(d2, d3));
                            let g = flush.next().copied().unwrap_or_default();
                            acc = _mm512_fmadd_ps(lane_scales(g), dot, acc);
                            // (The last register's reset is never read.)
                            #[allow(unused_assignments)]
                            {
                                d0 = _mm512_setzero_ps();
                                d1 = _mm512_setzero_ps();
                                d2 = _mm512_setzero_ps();
                                d3 = _mm512_setzero_ps();
                            }
                        }
                    }};
                }
                step!(0);
                step!(1);
                step!(2);
                step!(3);
                step!(4);
                step!(5);
                step!(6);
                step!(7);
                c += WIDE;
            }
            let o = o.map(|o| &o[i * groups..(i + 1) * groups]);
            // SAFETY: the features are enabled here; the planes hold the row's bytes and
            // `xr` `n` rounded up to 64 floats.
            *yr += unsafe { finish_nested_row(planes, &weights, shape, (sr, o), row_byte, acc) };
        }
    }

    /// The first columns of the 4 lanes of every run of `span` registers of a nested row's
    /// whole 512-column blocks, in order (the same for every row): lane `l` of register `m`
    /// holds columns `128·l + 16·m ..` of its block.
    fn nested_flushes(wide_end: usize, span: usize) -> impl Iterator<Item = [usize; 4]> {
        (0..wide_end).step_by(WIDE).flat_map(move |block| {
            (0..8)
                .step_by(span)
                .map(move |m| [0, 1, 2, 3].map(|l| block + 128 * l + 16 * m))
        })
    }

    /// The scales `s[g[l]]` of one row, lane `i` holding that of `g[i / 4]` (the groups of
    /// a flush's lanes; with groups of 128 they are consecutive: one 8-byte load).
    ///
    /// # Safety
    /// Only from functions with AVX-512 F and F16C enabled (inlined into them).
    #[inline(always)]
    #[allow(unused_unsafe)] // the body is one unsafe block; the inner one keeps its note
    unsafe fn lane_scales(s: &[f16], g: [usize; 4], group: usize) -> __m512 {
        // SAFETY: inlined into functions with the features enabled.
        unsafe {
            let four = if group == 128 && g[0] + 4 <= s.len() {
                // SAFETY: scales `g[0] .. g[0] + 4` exist (just checked).
                unsafe { _mm_loadl_epi64(s.as_ptr().add(g[0]).cast()) }
            } else {
                let bits = |l: usize| u64::from(s[g[l]].to_bits());
                _mm_cvtsi64_si128((bits(0) | bits(1) << 16 | bits(2) << 32 | bits(3) << 48) as i64)
            };
            let spread = _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0);
            _mm512_permutexvar_ps(spread, _mm512_castps128_ps512(_mm_cvtph_ps(four)))
        }
    }

    /// The end of a nested row: the groups after the whole 512-column blocks (masked adds,
    /// `x` from `xr`; a group may start before them) added to `acc`, then
    /// `scale · Σ acc + Σ_g (s·shift + o)·X_g`.
    ///
    /// # Safety
    /// Only from functions with AVX-512 F and BW and F16C enabled (inlined into them);
    /// every plane must hold the row's bytes from `row_byte`, `xr` `n` rounded up to 64.
    #[inline(always)]
    #[allow(unused_unsafe)] // the body is one unsafe block; the inner ones keep their notes
    unsafe fn finish_nested_row(
        planes: &[(&[u8], u8)],
        weights: &[__m512i],
        shape: &Shape,
        (sr, o): (&[f16], Option<&[f16]>),
        row_byte: usize,
        mut acc: __m512,
    ) -> f32 {
        // SAFETY: inlined into functions with the features enabled.
        unsafe {
            let (n, group) = (shape.n, shape.group);
            let wide_end = n - n % WIDE;
            let xp = shape.xr().as_ptr();
            for (gi, sg) in sr.iter().enumerate().skip(wide_end / group) {
                let c0 = (gi * group).max(wide_end);
                let c1 = ((gi + 1) * group).min(n);
                // SAFETY: the planes hold the row's bytes; `xr` holds `n` rounded up to 64.
                let dot = unsafe { masked_dot(planes, weights, row_byte, c0, c1, xp) };
                acc = _mm512_fmadd_ps(_mm512_set1_ps(widen_f16(*sg)), dot, acc);
            }
            let constant = row_constant_lanes(shape, sr, o);
            _mm512_reduce_add_ps(_mm512_fmadd_ps(_mm512_set1_ps(shape.scale), acc, constant))
        }
    }

    /// `Σ_g (s·shift + o)·X_g` of one row (`s`, `o`: its scales and offsets, `X_g` the
    /// group sums of `x`), 16 groups per masked load: lanes to be summed. (A scalar loop
    /// over the groups took ~40 % of a two-byte product of small-llama's 512-column rows.)
    ///
    /// # Safety
    /// Only from functions with AVX-512 F and BW and F16C enabled (inlined into them).
    #[inline(always)]
    #[allow(unused_unsafe)] // the body is one unsafe block; the inner one keeps its note
    unsafe fn row_constant_lanes(shape: &Shape, s: &[f16], o: Option<&[f16]>) -> __m512 {
        // SAFETY: inlined into functions with the features enabled.
        unsafe {
            let groups = s.len().min(shape.group_sums.len());
            let shift = _mm512_set1_ps(shape.shift);
            let mut constant = _mm512_setzero_ps();
            let mut g = 0;
            while g < groups {
                let lanes = (groups - g).min(16);
                let mask = (u32::MAX >> (32 - lanes)) as __mmask16;
                // SAFETY: the masked loads read elements `g .. g + lanes <= groups` of the
                // row's scales, offsets (as long as the scales) and `x`'s group sums.
                unsafe {
                    let half = |h: &[f16]| {
                        let raw =
                            _mm512_maskz_loadu_epi16(u32::from(mask), h.as_ptr().add(g).cast());
                        _mm512_cvtph_ps(_mm512_castsi512_si256(raw))
                    };
                    let sg = half(s);
                    let og = o.map_or(_mm512_setzero_ps(), half);
                    let xg = _mm512_maskz_loadu_ps(mask, shape.group_sums.as_ptr().add(g));
                    constant = _mm512_fmadd_ps(_mm512_fmadd_ps(sg, shift, og), xg, constant);
                }
                g += 16;
            }
            constant
        }
    }

    /// [`rows_nested`] with two-byte `x`: per register of 64 codes two `vpdpbusd` with the
    /// matching 64 high and low bytes of `q16x` (the codes are unsigned, `x` signed) add
    /// four products into each 32-bit lane; at each flush the lanes' sums go to f32
    /// (`hi + lo / 254`) and are scaled by their group's `s` times their segment's `x`
    /// scale. The high bytes alternate between two accumulators (even and odd registers),
    /// keeping several `vpdpbusd` chains in flight. The last `n % 512` columns are as in
    /// [`rows_nested`].
    ///
    /// # Safety
    /// As [`rows_nested`], and AVX-512 VL and VNNI must be available; `q16x` must hold the
    /// bytes of every whole 512-column block and a scale per 128 of their columns.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,gfni,f16c")]
    unsafe fn rows_nested_q16(
        planes: &[(&[u8], u8)],
        at: [Option<&[u8]>; 8],
        shape: &Shape,
        q16x: &Q16X,
        s: &[f16],
        o: Option<&[f16]>,
        row0: usize,
        y: &mut [f32],
    ) {
        let xr = shape.xr();
        let (n, group, groups) = (shape.n, shape.group, shape.groups);
        debug_assert!(super::nested_group(group) && xr.len() >= n.next_multiple_of(64));
        let bpr = n / 8;
        let wide_end = n - n % WIDE;
        // Registers whose lanes stay in one group and one segment of `x`'s scales (a
        // lane's 16-column pieces of registers `m, m + 1, ..` are consecutive columns).
        let span = group.min(128).min(super::Q16_SEGMENT) / 16;
        let spread = _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0);
        // Per run of `span` registers: the groups of its 4 lanes, and (lane `i`) the `x`
        // scale of lane `i / 4`'s segment.
        let flushes: Vec<([usize; 4], __m512)> = nested_flushes(wide_end, span)
            .map(|cols| {
                let d = cols.map(|c| q16x.scales[c / super::Q16_SEGMENT]);
                // SAFETY: `d` holds 4 floats.
                let four = unsafe { _mm_loadu_ps(d.as_ptr()) };
                (
                    cols.map(|c| c / group),
                    _mm512_permutexvar_ps(spread, _mm512_castps128_ps512(four)),
                )
            })
            .collect();
        let weights: Vec<__m512i> = planes
            .iter()
            .map(|&(_, w)| _mm512_set1_epi8(w as i8))
            .collect();
        let (hp, lp) = (q16x.hi.as_ptr(), q16x.lo.as_ptr());
        let low_step = _mm512_set1_ps(1.0 / 254.0);
        for (i, yr) in y.iter_mut().enumerate() {
            let row_byte = (row0 + i) * bpr;
            let sr = &s[i * groups..(i + 1) * groups];
            // SAFETY: F16C is enabled here; the flushes' groups are the row's.
            let lane_scales = |g: [usize; 4]| unsafe { lane_scales(sr, g, group) };
            let mut flush = flushes.iter();
            let mut acc = _mm512_setzero_ps();
            let mut c = 0;
            while c < wide_end {
                // SAFETY: `c + 512 <= n`: bytes `.. + 64` from there are in the row.
                let q = unsafe { nested_codes_512(&at, row_byte + c / 8) };
                let mut even = _mm512_setzero_si512();
                let mut odd = _mm512_setzero_si512();
                let mut low = _mm512_setzero_si512();
                // One register of codes (`m`), unrolled by hand as in `rows_nested`.
                macro_rules! step {
                    ($m:literal, $sum:ident) => {{
                        // SAFETY: `c + 64m + 64 <= wide_end`, the length of `hi` and `lo`.
                        let (xh, xl) = unsafe {
                            (
                                _mm512_loadu_si512(hp.add(c + 64 * $m).cast()),
                                _mm512_loadu_si512(lp.add(c + 64 * $m).cast()),
                            )
                        };
                        $sum = _mm512_dpbusd_epi32($sum, q[$m], xh);
                        low = _mm512_dpbusd_epi32(low, q[$m], xl);
                        // (`span` is a power of two.)
                        if ($m + 1) & (span - 1) == 0 {
                            let dot = _mm512_fmadd_ps(
                                _mm512_cvtepi32_ps(low),
                                low_step,
                                _mm512_cvtepi32_ps(_mm512_add_epi32(even, odd)),
                            );
                            let (g, xs) = flush
                                .next()
                                .copied()
                                .unwrap_or(([0; 4], _mm512_setzero_ps()));
                            acc = _mm512_fmadd_ps(_mm512_mul_ps(lane_scales(g), xs), dot, acc);
                            // (The last register's reset is never read.)
                            #[allow(unused_assignments)]
                            {
                                even = _mm512_setzero_si512();
                                odd = _mm512_setzero_si512();
                                low = _mm512_setzero_si512();
                            }
                        }
                    }};
                }
                step!(0, even);
                step!(1, odd);
                step!(2, even);
                step!(3, odd);
                step!(4, even);
                step!(5, odd);
                step!(6, even);
                step!(7, odd);
                c += WIDE;
            }
            let o = o.map(|o| &o[i * groups..(i + 1) * groups]);
            // SAFETY: the features are enabled here; the planes hold the row's bytes and
            // `xr` `n` rounded up to 64 floats.
            *yr += unsafe { finish_nested_row(planes, &weights, shape, (sr, o), row_byte, acc) };
        }
    }
}

/// The AVX2 code kernels: 32 columns of codes a `ymm` register. A plane's 32 bits are
/// broadcast, each byte of them spread to 8 byte lanes, masked to its lane's bit and compared:
/// the lanes of set bits add the plane's weight. The codes come out in column order (the
/// first column in a byte's MSB), so `x` is read as it is.
#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
mod avx2 {
    use std::arch::x86_64::{
        __m128i, __m256, __m256i, _mm256_add_epi8, _mm256_add_ps, _mm256_and_si256,
        _mm256_castps256_ps128, _mm256_castsi256_si128, _mm256_cmpeq_epi8, _mm256_cvtepi32_ps,
        _mm256_cvtepu8_epi32, _mm256_extractf128_ps, _mm256_extracti128_si256, _mm256_fmadd_ps,
        _mm256_gf2p8affine_epi64_epi8, _mm256_loadu_ps, _mm256_loadu_si256,
        _mm256_permutevar8x32_epi32, _mm256_set1_epi32, _mm256_set1_epi64x, _mm256_set1_epi8,
        _mm256_set1_ps, _mm256_setr_epi32, _mm256_setzero_ps, _mm256_setzero_si256,
        _mm256_shuffle_epi8, _mm256_slli_epi64, _mm256_srli_epi64, _mm256_storeu_ps,
        _mm256_storeu_si256, _mm256_unpackhi_epi16, _mm256_unpackhi_epi32, _mm256_unpackhi_epi8,
        _mm256_unpacklo_epi16, _mm256_unpacklo_epi32, _mm256_unpacklo_epi8, _mm256_xor_si256,
        _mm_add_ps, _mm_cvtss_f32, _mm_hadd_ps, _mm_srli_si128, _mm_storeu_si128,
    };

    use half::f16;

    use std::arch::x86_64::_mm256_dpbusd_avx_epi32;

    use super::{row_constant, widen_f16, CodeGrid, Shape, WeightedPlane, Q16X};

    /// The byte shuffle that spreads byte `i / 8` of a broadcast 32-bit word to lane `i`,
    /// and the bit each lane keeps (`128 >> (i % 8)`: the first column is the MSB).
    struct Spread {
        spread: __m256i,
        select: __m256i,
    }

    impl Spread {
        /// # Safety
        /// AVX2 must be available.
        #[inline]
        #[target_feature(enable = "avx2")]
        unsafe fn new() -> Self {
            let mut spread = [0u8; 32];
            let mut select = [0u8; 32];
            for i in 0..32 {
                // Indices are within each 128-bit lane; the word is in both lanes.
                spread[i] = (i / 8) as u8;
                select[i] = 128u8 >> (i % 8);
            }
            // SAFETY: 32 bytes each.
            unsafe {
                Spread {
                    spread: _mm256_loadu_si256(spread.as_ptr().cast()),
                    select: _mm256_loadu_si256(select.as_ptr().cast()),
                }
            }
        }
    }

    /// Bytes `at .. at + width / 8` of a plane as a little-endian word (zero-padded).
    ///
    /// # Safety
    /// `at + width / 8 <= bits.len()`.
    #[inline(always)]
    unsafe fn word(bits: &[u8], at: usize, width: usize) -> i32 {
        if width == 32 {
            debug_assert!(at + 4 <= bits.len());
            // SAFETY: the caller guarantees bytes `at .. at + 4`.
            return unsafe { bits.as_ptr().add(at).cast::<i32>().read_unaligned() };
        }
        match bits.get(at..at + width / 8) {
            Some(&[a, b, c, d]) => i32::from_le_bytes([a, b, c, d]),
            Some(part) => {
                let mut b = [0u8; 4];
                b[..part.len()].copy_from_slice(part);
                i32::from_le_bytes(b)
            }
            None => panic!("codes: plane bytes {at}.. out of range"),
        }
    }

    /// Fewest planes for which the bit transpose beats spreading each plane (criterion,
    /// 4096², one thread, rows built 256 columns at a time: spreading 2.7 ms at 2 planes,
    /// 3.6 at 4, 4.9 at 8; the transpose 3.7 ms at any number).
    const TRANSPOSE_MIN_PLANES: usize = 5;
    /// The same with GFNI, where the transpose is one instruction (2.7–2.9 ms at any number
    /// of planes: a tie with spreading at 2 planes).
    const TRANSPOSE_MIN_PLANES_GFNI: usize = 3;

    /// Builds the codes of up to 32 columns of the planes.
    struct Builder<'a> {
        planes: &'a [(&'a [u8], u8)],
        weights: Vec<__m256i>,
        spread: Spread,
        /// Planes of distinct power-of-two weights (nested planes): the plane of weight
        /// `2^e` at `e`. Their codes are an 8×8 bit transpose of the planes' bytes.
        by_exp: Option<[Option<&'a [u8]>; 8]>,
        /// In-lane 4×4 byte transpose, then dwords `[0, 4, 1, 5, 2, 6, 3, 7]`: qword `j`
        /// holds byte `j` of every plane, the plane of weight `2^e` in byte `e`.
        gather: __m256i,
        interleave: __m256i,
        /// Reverses the bytes of each qword.
        reverse: __m256i,
    }

    impl<'a> Builder<'a> {
        /// # Safety
        /// AVX2 must be available.
        #[inline]
        #[target_feature(enable = "avx2")]
        unsafe fn new(planes: &'a [(&'a [u8], u8)], gfni: bool) -> Self {
            let mut by_exp = [None; 8];
            let min = if gfni {
                TRANSPOSE_MIN_PLANES_GFNI
            } else {
                TRANSPOSE_MIN_PLANES
            };
            let nested =
                planes.len() >= min && super::nested_weights(planes.iter().map(|&(_, w)| w));
            if nested {
                for &(bits, w) in planes {
                    by_exp[w.trailing_zeros() as usize] = Some(bits);
                }
            }
            let mut gather = [0u8; 32];
            let mut reverse = [0u8; 32];
            for i in 0..32 {
                let (lane, b) = (i / 16 * 16, i % 16);
                // Output byte 4j + e of a lane is input byte 4e + j.
                gather[i] = (lane + (b % 4) * 4 + b / 4) as u8 - lane as u8;
                reverse[i] = ((i / 8) * 8 + 7 - i % 8) as u8 % 16;
            }
            let interleave: [i32; 8] = [0, 4, 1, 5, 2, 6, 3, 7];
            // SAFETY: AVX2 is enabled here; the loads read 32 bytes each.
            unsafe {
                Builder {
                    planes,
                    weights: planes
                        .iter()
                        .map(|&(_, w)| _mm256_set1_epi8(w as i8))
                        .collect(),
                    spread: Spread::new(),
                    by_exp: nested.then_some(by_exp),
                    gather: _mm256_loadu_si256(gather.as_ptr().cast()),
                    interleave: _mm256_loadu_si256(interleave.as_ptr().cast()),
                    reverse: _mm256_loadu_si256(reverse.as_ptr().cast()),
                }
            }
        }

        /// The codes of `width` (a multiple of 8, at most 32) columns starting at byte `at`
        /// of every plane, in column order; lanes past `width` are 0.
        ///
        /// Always inlined (a call returned the vector through memory), so it has no
        /// `target_feature` of its own: it takes its caller's.
        ///
        /// # Safety
        /// Only to be called from functions with AVX2 enabled; bytes `at .. at + width / 8`
        /// of every plane must exist.
        #[inline(always)]
        unsafe fn chunk<const GFNI: bool>(&self, at: usize, width: usize) -> __m256i {
            // SAFETY: the caller has AVX2 enabled (this is inlined into it) and guarantees
            // the plane bytes read.
            unsafe {
                if let Some(by_exp) = &self.by_exp {
                    let mut w = [0i32; 8];
                    for (e, bits) in by_exp.iter().enumerate() {
                        if let Some(bits) = bits {
                            // GFNI reads its matrix rows from the top byte down.
                            w[if GFNI { 7 - e } else { e }] = word(bits, at, width);
                        }
                    }
                    // Dword e: the 4 bytes of the plane of weight 2^e; then qword j: byte j of
                    // every plane (byte e: weight 2^e).
                    let v = _mm256_setr_epi32(w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7]);
                    let v = _mm256_permutevar8x32_epi32(
                        _mm256_shuffle_epi8(v, self.gather),
                        self.interleave,
                    );
                    return self.transpose::<GFNI>(v);
                }
                let mut q = _mm256_setzero_si256();
                for (&(bits, _), &w) in self.planes.iter().zip(&self.weights) {
                    let v = _mm256_shuffle_epi8(
                        _mm256_set1_epi32(word(bits, at, width)),
                        self.spread.spread,
                    );
                    let set = _mm256_cmpeq_epi8(
                        _mm256_and_si256(v, self.spread.select),
                        self.spread.select,
                    );
                    q = _mm256_add_epi8(q, _mm256_and_si256(set, w));
                }
                q
            }
        }
    }

    impl Builder<'_> {
        /// The codes of the 8 columns of each qword of `v`, whose byte `r` is the byte of
        /// those columns in the plane of weight `2^(7 − r)` with GFNI, `2^r` without.
        ///
        /// # Safety
        /// Only from functions with AVX2 (and GFNI if `GFNI`) enabled.
        #[inline(always)]
        unsafe fn transpose<const GFNI: bool>(&self, v: __m256i) -> __m256i {
            // SAFETY: the caller has the features enabled (this is inlined into it).
            unsafe {
                if GFNI {
                    // Byte i of the result has bit t = parity(byte 7 − t of the qword AND
                    // byte i of the operand): with operand byte i = 128 >> i, bit e of the
                    // weight-2^e plane's bit for column i — its code, in column order.
                    return _mm256_gf2p8affine_epi64_epi8::<0>(
                        _mm256_set1_epi64x(0x0102_0408_1020_4080),
                        v,
                    );
                }
                // 8×8 bit transpose of each qword (bit 8r + k to bit 8k + r): byte k now
                // holds, in bit e, bit k of the weight-2^e plane's byte, i.e. column 7 − k
                // (the first column is the MSB) — its code.
                let v = delta_swap::<7>(v, 0x00AA_00AA_00AA_00AA);
                let v = delta_swap::<14>(v, 0x0000_CCCC_0000_CCCC);
                let v = delta_swap::<28>(v, 0x0000_0000_F0F0_F0F0);
                _mm256_shuffle_epi8(v, self.reverse)
            }
        }

        /// The codes of a whole row of nested planes (`by_exp` set) into `out` (`n` rounded
        /// up to 32 bytes), 256 columns at a time from one 32-byte load per plane: three
        /// rounds of unpacks turn the 8 plane vectors into qwords holding one byte of every
        /// plane, which are bit-transposed and stored in column order; the last `n % 256`
        /// columns come from [`Builder::chunk`].
        ///
        /// # Safety
        /// Only from functions with AVX2 (and GFNI if `GFNI`) enabled; bytes
        /// `row_byte .. row_byte + n / 8` of every plane must exist; `n` is a multiple of 8
        /// and `out.len() >= n.next_multiple_of(32)`.
        #[inline(always)]
        unsafe fn row_codes<const GFNI: bool>(&self, row_byte: usize, n: usize, out: &mut [u8]) {
            let Some(by_exp) = &self.by_exp else {
                return;
            };
            debug_assert!(out.len() >= n.next_multiple_of(32));
            let op = out.as_mut_ptr();
            let mut c = 0;
            // SAFETY: the caller has the features enabled and guarantees the plane bytes
            // (`c + 256 <= n`: bytes `at .. at + 32` are in the row) and `out`'s length.
            unsafe {
                while c + WIDE <= n {
                    let at = row_byte + c / 8;
                    let mut p = [_mm256_setzero_si256(); 8];
                    for (e, bits) in by_exp.iter().enumerate() {
                        if let Some(bits) = bits {
                            p[if GFNI { 7 - e } else { e }] =
                                _mm256_loadu_si256(bits.as_ptr().add(at).cast());
                        }
                    }
                    // `b[k]` and `b[4 + k]`: column bytes 4k .. 4k + 4 in the low lane and
                    // 16 + 4k .. in the high lane.
                    let b = plane_quads!(
                        p,
                        _mm256_unpacklo_epi8,
                        _mm256_unpackhi_epi8,
                        _mm256_unpacklo_epi16,
                        _mm256_unpackhi_epi16
                    );
                    for k in 0..4 {
                        let halves = [
                            _mm256_unpacklo_epi32(b[k], b[4 + k]),
                            _mm256_unpackhi_epi32(b[k], b[4 + k]),
                        ];
                        for (h, v) in halves.into_iter().enumerate() {
                            // Column bytes 2m, 2m + 1 (low lane) and 16 + 2m, 17 + 2m.
                            let m = 2 * k + h;
                            let q = self.transpose::<GFNI>(v);
                            let dst = op.add(c + 16 * m);
                            _mm_storeu_si128(dst.cast(), _mm256_castsi256_si128(q));
                            _mm_storeu_si128(dst.add(128).cast(), _mm256_extracti128_si256::<1>(q));
                        }
                    }
                    c += WIDE;
                }
                while c < n {
                    let width = (n - c).min(32);
                    let q = self.chunk::<GFNI>(row_byte + c / 8, width);
                    _mm256_storeu_si256(op.add(c).cast(), q);
                    c += width;
                }
            }
        }
    }

    /// Columns whose codes [`Builder::row_codes`] builds from one 32-byte load per plane.
    const WIDE: usize = 256;

    /// A row's codes built ahead by [`Builder::row_codes`] (rows of nested planes at least
    /// [`WIDE`] columns wide), or none: each chunk built where it is used.
    struct RowCodes {
        buf: Vec<u8>,
    }

    impl RowCodes {
        fn new(builder: &Builder<'_>, n: usize) -> Self {
            let wide = builder.by_exp.is_some() && n >= WIDE;
            // Reads of 32 bytes start at any multiple of 8 below `n`.
            RowCodes {
                buf: vec![0; if wide { n.next_multiple_of(32) + 32 } else { 0 }],
            }
        }

        /// Builds row codes ahead if this is the wide path.
        ///
        /// # Safety
        /// As [`Builder::row_codes`].
        #[inline(always)]
        unsafe fn start_row<const GFNI: bool>(
            &mut self,
            builder: &Builder<'_>,
            row_byte: usize,
            n: usize,
        ) {
            if !self.buf.is_empty() {
                // SAFETY: as this function's; the buffer has room for `n` rounded up.
                unsafe { builder.row_codes::<GFNI>(row_byte, n, &mut self.buf) };
            }
        }

        /// The codes of `width` (a multiple of 8, at most 32) columns from column `c` of
        /// the row started last; lanes past `width` are unspecified.
        ///
        /// # Safety
        /// As [`Builder::chunk`] for the columns read.
        #[inline(always)]
        unsafe fn get<const GFNI: bool>(
            &self,
            builder: &Builder<'_>,
            row_byte: usize,
            c: usize,
            width: usize,
        ) -> __m256i {
            // SAFETY: as this function's; `c + 32 <= n + 32 <= buf.len()` on the wide path.
            unsafe {
                if self.buf.is_empty() {
                    builder.chunk::<GFNI>(row_byte + c / 8, width)
                } else {
                    _mm256_loadu_si256(self.buf.as_ptr().add(c).cast())
                }
            }
        }
    }

    /// Swaps the bits of `x` selected by `mask` with those `S` places above them, in each
    /// 64-bit lane.
    ///
    /// # Safety
    /// Only to be called from functions with AVX2 enabled (inlined into them).
    #[inline(always)]
    unsafe fn delta_swap<const S: i32>(x: __m256i, mask: i64) -> __m256i {
        // SAFETY: the caller has AVX2 enabled (this is inlined into it).
        unsafe {
            let t = _mm256_and_si256(
                _mm256_xor_si256(x, _mm256_srli_epi64::<S>(x)),
                _mm256_set1_epi64x(mask),
            );
            _mm256_xor_si256(_mm256_xor_si256(x, t), _mm256_slli_epi64::<S>(t))
        }
    }

    /// The 32 codes of `q` as four vectors of 8 floats (columns `0..8`, `8..16`, ...).
    ///
    /// # Safety
    /// AVX2 must be available.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn widen(q: __m256i) -> [__m256; 4] {
        let lo: __m128i = _mm256_castsi256_si128(q);
        let hi: __m128i = _mm256_extracti128_si256::<1>(q);
        [
            _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo)),
            _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128::<8>(lo))),
            _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi)),
            _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128::<8>(hi))),
        ]
    }

    /// The sum of the 8 lanes.
    ///
    /// # Safety
    /// AVX2 must be available.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn lane_sum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let s = _mm_hadd_ps(s, s);
        _mm_cvtss_f32(_mm_hadd_ps(s, s))
    }

    fn plane_bytes<'a>(planes: &[WeightedPlane<'a>]) -> Vec<(&'a [u8], u8)> {
        planes
            .iter()
            .map(|p| (p.bits.as_bytes(), p.weight))
            .collect()
    }

    /// The rows `row0..row0 + y.len()` of [`super::codes_matvec_add`] (the caller checked
    /// AVX2 and the shapes; `s`, `o`: the rows' scales and offsets).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn rows(
        planes: &[WeightedPlane<'_>],
        shape: &Shape,
        s: &[f16],
        o: Option<&[f16]>,
        x: &[f32],
        row0: usize,
        y: &mut [f32],
        gfni: bool,
    ) {
        let bytes = plane_bytes(planes);
        let bpr = shape.n / 8;
        assert!(
            x.len() == shape.n
                && s.len() == y.len() * shape.groups
                && o.is_none_or(|o| o.len() == s.len())
                && bytes.iter().all(|(b, _)| b.len() >= (row0 + y.len()) * bpr),
            "codes: short buffers"
        );
        let r = Rows {
            planes: &bytes,
            shape,
            s,
            o,
            x,
            row0,
        };
        if let Some(q16x) = &shape.q16x {
            assert!(
                q16x.hi.len() == shape.n
                    && q16x.lo.len() == shape.n
                    && q16x.scales.len() == shape.n.div_ceil(super::Q16_SEGMENT),
                "codes: short two-byte x"
            );
            // SAFETY: `q16x` is built for these rows only where the CPU has GFNI and
            // AVX-VNNI and the widths and group fit (`q16_natural`); AVX2, FMA and F16C
            // were checked (`CodeKernel::choose`); the lengths are asserted.
            return unsafe { rows_q16(&r, q16x, y) };
        }
        // SAFETY: the caller checked AVX2, FMA and F16C, and GFNI if `gfni`
        // (`CodeKernel::choose`); the lengths are asserted.
        unsafe { rows_either(&r, y, gfni) }
    }

    /// The inputs of a product (`s`, `o`: the rows' scales and offsets).
    struct Rows<'a> {
        planes: &'a [(&'a [u8], u8)],
        shape: &'a Shape,
        s: &'a [f16],
        o: Option<&'a [f16]>,
        x: &'a [f32],
        row0: usize,
    }

    /// Two compiled copies of an `#[inline(always)]` kernel body generic over `GFNI`: one
    /// for AVX2 and FMA, one that also enables GFNI.
    macro_rules! isa_copies {
        ($body:ident($input:ty): $plain:ident, $gfni:ident, $either:ident) => {
            #[doc = concat!("[`", stringify!($gfni), "`] if `gfni`, else [`", stringify!($plain), "`].")]
            ///
            /// # Safety
            /// As the one it calls.
            unsafe fn $either(input: &$input, out: &mut [f32], gfni: bool) {
                // SAFETY: as this function's.
                unsafe {
                    if gfni {
                        $gfni(input, out)
                    } else {
                        $plain(input, out)
                    }
                }
            }

            #[doc = concat!("[`", stringify!($body), "`] compiled for AVX2, FMA and F16C.")]
            ///
            /// # Safety
            /// AVX2, FMA and F16C must be available; the lengths as the public entry
            /// asserted.
            #[target_feature(enable = "avx2,fma,f16c")]
            unsafe fn $plain(input: &$input, out: &mut [f32]) {
                // SAFETY: as this function's.
                unsafe { $body::<false>(input, out) }
            }

            #[doc = concat!("[`", stringify!($body), "`] compiled for AVX2, FMA, F16C and GFNI.")]
            ///
            /// # Safety
            /// AVX2, FMA, F16C and GFNI must be available; the lengths as the public entry
            /// asserted.
            #[target_feature(enable = "avx2,fma,f16c,gfni")]
            unsafe fn $gfni(input: &$input, out: &mut [f32]) {
                // SAFETY: as this function's.
                unsafe { $body::<true>(input, out) }
            }
        };
    }

    isa_copies!(rows_body(Rows<'_>): rows_plain, rows_gfni, rows_either);

    /// The product; inlined into a copy per instruction set (`GFNI`: the bit transpose is
    /// one `gf2p8affineqb`).
    ///
    /// # Safety
    /// Only from [`rows_plain`] and [`rows_gfni`] (AVX2 and FMA, and GFNI if `GFNI`).
    #[inline(always)]
    #[allow(unused_unsafe)] // the body is one unsafe block; the inner ones keep their notes
    unsafe fn rows_body<const GFNI: bool>(r: &Rows<'_>, y: &mut [f32]) {
        let &Rows {
            planes,
            shape,
            s,
            o,
            x,
            row0,
        } = r;
        // SAFETY: this body is inlined into functions with AVX2, FMA and F16C (and GFNI if
        // `GFNI`) enabled; the blocks inside state what else they rely on.
        unsafe {
            let (n, group, groups) = (shape.n, shape.group, shape.groups);
            let bpr = n / 8;
            // SAFETY: AVX2 is enabled on this function.
            let builder = unsafe { Builder::new(planes, GFNI) };
            let mut codes = RowCodes::new(&builder, n);
            let xp = x.as_ptr();
            for (i, yr) in y.iter_mut().enumerate() {
                let row_byte = (row0 + i) * bpr;
                // SAFETY: the planes hold `(row0 + rows) · bpr` bytes (asserted in `rows`).
                unsafe { codes.start_row::<GFNI>(&builder, row_byte, n) };
                let mut acc = _mm256_setzero_ps();
                for (gi, sg) in s[i * groups..(i + 1) * groups].iter().enumerate() {
                    let (c0, c1) = (gi * group, ((gi + 1) * group).min(n));
                    // Four accumulators in registers (an array of them was kept in memory).
                    let mut d = [_mm256_setzero_ps(); 4];
                    let (mut d0, mut d1, mut d2, mut d3) = (d[0], d[1], d[2], d[3]);
                    let mut c = c0;
                    while c + 32 <= c1 {
                        // SAFETY: AVX2 is enabled here; the planes hold `(row0 + rows) · bpr`
                        // bytes (asserted in `rows`) and `c + 32 <= c1 <= n = x.len()`.
                        unsafe {
                            let [q0, q1, q2, q3] =
                                widen(codes.get::<GFNI>(&builder, row_byte, c, 32));
                            d0 = _mm256_fmadd_ps(q0, _mm256_loadu_ps(xp.add(c)), d0);
                            d1 = _mm256_fmadd_ps(q1, _mm256_loadu_ps(xp.add(c + 8)), d1);
                            d2 = _mm256_fmadd_ps(q2, _mm256_loadu_ps(xp.add(c + 16)), d2);
                            d3 = _mm256_fmadd_ps(q3, _mm256_loadu_ps(xp.add(c + 24)), d3);
                        }
                        c += 32;
                    }
                    if c < c1 {
                        let width = c1 - c;
                        d = [d0, d1, d2, d3];
                        // SAFETY: as above.
                        let q = unsafe { widen(codes.get::<GFNI>(&builder, row_byte, c, width)) };
                        for (j, (qf, dot)) in q.iter().zip(d.iter_mut()).enumerate() {
                            if 8 * j >= width {
                                break;
                            }
                            // SAFETY: `c + 8j + 8 <= c + width = c1 <= n = x.len()` (widths
                            // are multiples of 8).
                            let xv = unsafe { _mm256_loadu_ps(xp.add(c + 8 * j)) };
                            *dot = _mm256_fmadd_ps(*qf, xv, *dot);
                        }
                        [d0, d1, d2, d3] = d;
                    }
                    let dot = _mm256_add_ps(_mm256_add_ps(d0, d1), _mm256_add_ps(d2, d3));
                    acc = _mm256_fmadd_ps(_mm256_set1_ps(widen_f16(*sg)), dot, acc);
                }
                let row = i * groups..(i + 1) * groups;
                let o = o.map(|o| &o[row.clone()]);
                // SAFETY: AVX2 and F16C are enabled here.
                let (sum, constant) = unsafe { (lane_sum(acc), row_constant(shape, &s[row], o)) };
                *yr += shape.scale * sum + constant;
            }
        }
    }

    /// [`rows_body`] with `x` as two bytes in column order ([`super::codes_matvec_add_q16`]):
    /// per 32 codes (the row built ahead, or a chunk) two `vpdpbusd` with the high and low
    /// bytes of `x` add four products into each 32-bit lane; the sums go to f32
    /// (`hi + lo / 254`) and are scaled once per `min(group, 128)` columns by the group's
    /// `s` times the segment's `x` scale.
    ///
    /// # Safety
    /// AVX2, FMA, F16C, GFNI and AVX-VNNI must be available; the planes must hold the rows'
    /// bytes, `q16x` `n` high and low bytes and a scale per 128 columns; `n` and the group
    /// must be multiples of 32, the group dividing 128 or a multiple of it.
    #[target_feature(enable = "avx2,fma,f16c,gfni,avxvnni")]
    unsafe fn rows_q16(r: &Rows<'_>, q16x: &Q16X, y: &mut [f32]) {
        let &Rows {
            planes,
            shape,
            s,
            o,
            row0,
            ..
        } = r;
        let (n, group, groups) = (shape.n, shape.group, shape.groups);
        let bpr = n / 8;
        let unit = group.min(super::Q16_SEGMENT);
        // SAFETY: AVX2 is enabled on this function.
        let builder = unsafe { Builder::new(planes, true) };
        let mut codes = RowCodes::new(&builder, n);
        let (hp, lp) = (q16x.hi.as_ptr(), q16x.lo.as_ptr());
        let low_step = _mm256_set1_ps(1.0 / 254.0);
        for (i, yr) in y.iter_mut().enumerate() {
            let row_byte = (row0 + i) * bpr;
            // SAFETY: the planes hold the rows' bytes (the caller's guarantee).
            unsafe { codes.start_row::<true>(&builder, row_byte, n) };
            let sr = &s[i * groups..(i + 1) * groups];
            let mut acc = _mm256_setzero_ps();
            let mut c0 = 0;
            while c0 < n {
                let c1 = (c0 + unit).min(n);
                let (mut high, mut low) = (_mm256_setzero_si256(), _mm256_setzero_si256());
                let mut c = c0;
                while c < c1 {
                    // SAFETY: `c + 32 <= n` (multiples of 32): the row's bytes and `x`'s.
                    unsafe {
                        let q = codes.get::<true>(&builder, row_byte, c, 32);
                        high =
                            _mm256_dpbusd_avx_epi32(high, q, _mm256_loadu_si256(hp.add(c).cast()));
                        low = _mm256_dpbusd_avx_epi32(low, q, _mm256_loadu_si256(lp.add(c).cast()));
                    }
                    c += 32;
                }
                let dot =
                    _mm256_fmadd_ps(_mm256_cvtepi32_ps(low), low_step, _mm256_cvtepi32_ps(high));
                // SAFETY: F16C is enabled here.
                let sg = unsafe { widen_f16(sr[c0 / group]) };
                let scale = sg * q16x.scales[c0 / super::Q16_SEGMENT];
                acc = _mm256_fmadd_ps(_mm256_set1_ps(scale), dot, acc);
                c0 = c1;
            }
            let o = o.map(|o| &o[i * groups..(i + 1) * groups]);
            // SAFETY: AVX2 and F16C are enabled here.
            let (sum, constant) = unsafe { (lane_sum(acc), row_constant(shape, sr, o)) };
            *yr += shape.scale * sum + constant;
        }
    }

    /// The tile rebuild of [`super::codes_rows_to_dense`] (the caller checked AVX2 and the
    /// shapes; `s`, `o`: the tile rows' scales and offsets).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn rows_to_dense(
        planes: &[WeightedPlane<'_>],
        grid: &CodeGrid<'_>,
        groups: usize,
        s: &[f16],
        o: Option<&[f16]>,
        row0: usize,
        tile: &mut [f32],
        gfni: bool,
    ) {
        let (bytes, n) = super::tile_inputs(planes, grid, groups, s, o, row0, tile);
        let t = Tile {
            planes: &bytes,
            grid,
            n,
            groups,
            s,
            o,
            row0,
        };
        // SAFETY: the caller checked AVX2, FMA and F16C, and GFNI if `gfni`
        // (`CodeKernel::choose`); `tile_inputs` asserted the buffer lengths.
        unsafe { tile_either(&t, tile, gfni) }
    }

    /// The inputs of a tile rebuild.
    struct Tile<'a> {
        planes: &'a [(&'a [u8], u8)],
        grid: &'a CodeGrid<'a>,
        n: usize,
        groups: usize,
        s: &'a [f16],
        o: Option<&'a [f16]>,
        row0: usize,
    }

    isa_copies!(tile_body(Tile<'_>): tile_plain, tile_gfni, tile_either);

    /// The tile rebuild; inlined into a copy per instruction set.
    ///
    /// # Safety
    /// Only from [`tile_plain`] and [`tile_gfni`].
    #[inline(always)]
    #[allow(unused_unsafe)] // the body is one unsafe block; the inner ones keep their notes
    unsafe fn tile_body<const GFNI: bool>(t: &Tile<'_>, tile: &mut [f32]) {
        // SAFETY: this body is inlined into functions with AVX2, FMA and F16C (and GFNI if
        // `GFNI`) enabled; the blocks inside state what else they rely on.
        unsafe {
            let &Tile {
                planes,
                grid,
                n,
                groups,
                s,
                o,
                row0,
            } = t;
            let bpr = n / 8;
            // SAFETY: AVX2 is enabled on this function.
            let builder = unsafe { Builder::new(planes, GFNI) };
            let mut row_codes = RowCodes::new(&builder, n);
            for (i, out) in tile.chunks_exact_mut(n).enumerate() {
                let row_byte = (row0 + i) * bpr;
                // SAFETY: the planes hold the tile's rows (asserted in `tile_inputs`).
                unsafe { row_codes.start_row::<GFNI>(&builder, row_byte, n) };
                let op = out.as_mut_ptr();
                for g in 0..groups {
                    let at = i * groups + g;
                    let (sg, og) = (widen_f16(s[at]), o.map_or(0.0, |o| widen_f16(o[at])));
                    let a = _mm256_set1_ps(sg * grid.scale);
                    let b = _mm256_set1_ps(sg * grid.shift + og);
                    let (c0, c1) = (g * grid.group, ((g + 1) * grid.group).min(n));
                    let mut c = c0;
                    while c < c1 {
                        let width = (c1 - c).min(32);
                        // SAFETY: AVX2 is enabled here; the planes hold the tile's rows
                        // (asserted in `tile_inputs`) and `c + width <= c1 <= n`.
                        let q = unsafe { row_codes.get::<GFNI>(&builder, row_byte, c, width) };
                        // SAFETY: as above.
                        let codes = unsafe { widen(q) };
                        for (j, qf) in codes.iter().enumerate().take(width / 8) {
                            // SAFETY: `c + 8j + 8 <= c + width <= n`: within the tile row.
                            unsafe {
                                let t = _mm256_loadu_ps(op.add(c + 8 * j));
                                let v = _mm256_fmadd_ps(*qf, a, b);
                                _mm256_storeu_ps(op.add(c + 8 * j), _mm256_add_ps(t, v));
                            }
                        }
                        c += width;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::SignMatrix;

    /// The definition, one weight at a time, in f64: each row's sum and the sum of its
    /// terms' magnitudes.
    fn naive(planes: &[(SignMatrix, u8)], grid: &CodeGrid<'_>, x: &[f32]) -> Vec<(f64, f64)> {
        let m = planes.first().map_or(0, |p| p.0.rows());
        (0..m)
            .map(|r| {
                let (mut y, mut mag) = (0.0f64, 0.0f64);
                for (c, &xc) in x.iter().enumerate() {
                    let w = naive_weight(planes, grid, r, c).0;
                    y += w * f64::from(xc);
                    mag += (w * f64::from(xc)).abs();
                }
                (y, mag)
            })
            .collect()
    }

    /// `Ŵ[r, c]` by the definition, in f64, and the sum of its terms' magnitudes.
    fn naive_weight(
        planes: &[(SignMatrix, u8)],
        grid: &CodeGrid<'_>,
        r: usize,
        c: usize,
    ) -> (f64, f64) {
        let groups = planes[0].0.cols().div_ceil(grid.group);
        let q: u32 = planes
            .iter()
            .filter(|(b, _)| b.as_view().get(r, c))
            .map(|&(_, w)| u32::from(w))
            .sum();
        let at = r * groups + c / grid.group;
        let o = grid.offsets.map_or(0.0, |o| f64::from(o[at].to_f32()));
        let s = f64::from(grid.scales[at].to_f32());
        let scaled = s * f64::from(grid.scale) * f64::from(q);
        let shifted = s * f64::from(grid.shift);
        (scaled + shifted + o, scaled.abs() + shifted.abs() + o.abs())
    }

    fn pseudo(len: usize, seed: u64) -> Vec<f32> {
        let mut st = seed | 1;
        (0..len)
            .map(|_| {
                st ^= st << 13;
                st ^= st >> 7;
                st ^= st << 17;
                (st >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
            })
            .collect()
    }

    /// Random planes, scales, offsets for a `rows × cols` grid of `group` columns.
    #[allow(clippy::type_complexity)]
    fn random_grid(
        rows: usize,
        cols: usize,
        group: usize,
        weights: &[u8],
        seed: u64,
    ) -> (Vec<(SignMatrix, u8)>, Vec<f16>, Vec<f16>) {
        let planes: Vec<(SignMatrix, u8)> = weights
            .iter()
            .enumerate()
            .map(|(p, &w)| {
                let v = pseudo(rows * cols, seed + 7 * p as u64);
                (SignMatrix::from_signs_of(&v, rows, cols).unwrap(), w)
            })
            .collect();
        let groups = cols.div_ceil(group);
        let scales: Vec<f16> = pseudo(rows * groups, seed ^ 0x55)
            .iter()
            .map(|&v| f16::from_f32(v.abs() + 0.01))
            .collect();
        let offsets: Vec<f16> = pseudo(rows * groups, seed ^ 0x33)
            .iter()
            .map(|&v| f16::from_f32(v))
            .collect();
        (planes, scales, offsets)
    }

    fn check(rows: usize, cols: usize, group: usize, weights: &[u8], seed: u64, par: Parallelism) {
        let (planes, scales, offsets) = random_grid(rows, cols, group, weights, seed);
        let x = pseudo(cols, seed ^ 0xAA);
        let refs: Vec<WeightedPlane<'_>> = planes
            .iter()
            .map(|(b, w)| WeightedPlane {
                bits: b.as_view(),
                weight: *w,
            })
            .collect();
        for offsets in [None, Some(&offsets[..])] {
            let grid = CodeGrid {
                group,
                scales: &scales,
                offsets,
                scale: 0.125,
                shift: -3.5,
            };
            let want = naive(&planes, &grid, &x);
            for simd in Simd::ALL {
                let mut y = vec![1.0f32; rows];
                codes_matvec_add(&refs, &grid, &x, &mut y, par, simd);
                for (r, (&got, &(w, mag))) in y.iter().zip(&want).enumerate() {
                    // f32 rounding of a sum of `cols` terms (in another order).
                    assert!(
                        (f64::from(got) - 1.0 - w).abs() <= 1e-5 * mag + 1e-5,
                        "{simd:?} row {r}: {got} vs {}",
                        w + 1.0
                    );
                }
            }
        }
    }

    /// Rows `row0..row0 + rows` of `Ŵ` added to a tile of random values: both versions of
    /// [`codes_rows_to_dense`] against the definition.
    fn check_tile(
        (rows, cols, group): (usize, usize, usize),
        (row0, tile_rows): (usize, usize),
        weights: &[u8],
        seed: u64,
    ) {
        let (planes, scales, offsets) = random_grid(rows, cols, group, weights, seed);
        let refs: Vec<WeightedPlane<'_>> = planes
            .iter()
            .map(|(b, w)| WeightedPlane {
                bits: b.as_view(),
                weight: *w,
            })
            .collect();
        let start = pseudo(tile_rows * cols, seed ^ 0x77);
        for offsets in [None, Some(&offsets[..])] {
            let grid = CodeGrid {
                group,
                scales: &scales,
                offsets,
                scale: 0.125,
                shift: -3.5,
            };
            for simd in Simd::ALL {
                let mut tile = start.clone();
                codes_rows_to_dense(&refs, &grid, row0, &mut tile, simd);
                for (i, (&got, &was)) in tile.iter().zip(&start).enumerate() {
                    let (r, c) = (row0 + i / cols, i % cols);
                    let (w, mag) = naive_weight(&planes, &grid, r, c);
                    let want = f64::from(was) + w;
                    // A few f32 roundings of terms of magnitude `mag + |was|`.
                    assert!(
                        (f64::from(got) - want).abs() <= 1e-6 * (mag + f64::from(was.abs())),
                        "{simd:?} ({r}, {c}): {got} vs {want}"
                    );
                }
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// The tile rebuild: any rows of widths and groups that are and are not multiples of
        /// 64, 1 to 9 planes (weights summing to at most 255).
        #[test]
        fn tile_rows_match_the_definition(
            rows in 1usize..20,
            cols8 in 1usize..40,
            group8 in 1usize..24,
            weights in prop::collection::vec(0u8..28, 1..10),
            at in 0.0f64..1.0,
            len in 0.0f64..1.0,
            seed in any::<u64>(),
        ) {
            let row0 = ((rows as f64 * at) as usize).min(rows - 1);
            let tile_rows = 1 + ((rows - row0 - 1) as f64 * len) as usize;
            check_tile((rows, 8 * cols8, 8 * group8), (row0, tile_rows), &weights, seed);
        }

        /// Both versions equal the definition: widths and groups that are and are not
        /// multiples of 64 (partial chunks, half-filled lanes), 1 to 8 planes.
        #[test]
        fn codes_match_the_definition(
            rows in 1usize..24,
            cols8 in 1usize..40,
            group8 in 1usize..24,
            weights in prop::collection::vec(0u8..32, 1..9),
            seed in any::<u64>(),
        ) {
            check(rows, 8 * cols8, 8 * group8, &weights, seed, Parallelism::Sequential);
        }

        /// Nested planes — distinct power-of-two weights, in any order, 1 to 8 of them (the
        /// AVX2 bit transpose takes 3 or more with GFNI, 5 without; rows of 256 columns or
        /// more build their codes 256 at a time) — for the product and the tile rebuild,
        /// with widths and groups that are and are not multiples of 32 and 256.
        #[test]
        fn nested_planes_match_the_definition(
            rows in 1usize..8,
            cols8 in 1usize..100,
            group8 in 1usize..24,
            exps in Just((0u8..8).collect::<Vec<_>>()).prop_shuffle(),
            planes in 1usize..9,
            seed in any::<u64>(),
        ) {
            let weights: Vec<u8> = exps[..planes].iter().map(|&e| 1u8 << e).collect();
            check(rows, 8 * cols8, 8 * group8, &weights, seed, Parallelism::Sequential);
            check_tile((rows, 8 * cols8, 8 * group8), (rows / 2, rows - rows / 2), &weights, seed);
        }

        /// Wide rows of nested planes (the AVX-512 GFNI product takes 5 or more below 2048
        /// columns, 7 from there, and groups dividing 128 or of a multiple of 128; the tile
        /// rebuild 4 or more and groups of a multiple of 16): widths that are and are not
        /// multiples of 512, groups of every kind, including ones reaching past 512-column
        /// blocks and ones the GFNI rows do not take (48, 384 with 512, 80).
        #[test]
        fn wide_nested_planes_match_the_definition(
            rows in 1usize..4,
            cols8 in 64usize..600,
            group in prop::sample::select(vec![16usize, 32, 48, 64, 80, 128, 256, 384, 640, 1024, 2048]),
            exps in Just((0u8..8).collect::<Vec<_>>()).prop_shuffle(),
            planes in 4usize..9,
            seed in any::<u64>(),
        ) {
            let weights: Vec<u8> = exps[..planes].iter().map(|&e| 1u8 << e).collect();
            check(rows, 8 * cols8, group, &weights, seed, Parallelism::Sequential);
            check_tile((rows, 8 * cols8, group), (rows / 2, rows - rows / 2), &weights, seed);
        }

        /// Widths and groups of whole 64-column chunks (the unrolled path, 1 to 8 planes).
        #[test]
        fn whole_chunk_codes_match_the_definition(
            rows in 1usize..12,
            chunks in 1usize..6,
            group_chunks in 1usize..4,
            weights in prop::collection::vec(0u8..32, 1..9),
            seed in any::<u64>(),
        ) {
            check(rows, 64 * chunks, 64 * group_chunks, &weights, seed, Parallelism::Sequential);
        }
    }

    /// [`codes_matvec_add_q16`] against the definition with `x` replaced, in the sums of
    /// codes times `x`, by its two-byte form where an integer path runs (AVX-512: nested
    /// planes the GFNI rows take, whole 512-column blocks; AVX2 with GFNI and AVX-VNNI:
    /// widths and groups of whole 32-column registers), and by `x` itself elsewhere (the
    /// exact kernel). Tolerance: f32 rounding of the sums, as in [`check`].
    fn check_q16(rows: usize, cols: usize, group: usize, weights: &[u8], seed: u64) {
        let (planes, scales, offsets) = random_grid(rows, cols, group, weights, seed);
        // A wide range of magnitudes, so that the low bytes matter: the two-byte `x` is
        // within 1.6e-5 of a segment's largest magnitude, the tolerance 1e-5 relative.
        let x: Vec<f32> = pseudo(cols, seed ^ 0xAA)
            .iter()
            .enumerate()
            .map(|(c, &v)| v * (1.0 + (c % 7) as f32 * 30.0))
            .collect();
        let refs: Vec<WeightedPlane<'_>> = planes
            .iter()
            .map(|(b, w)| WeightedPlane {
                bits: b.as_view(),
                weight: *w,
            })
            .collect();
        // Both integer paths where the CPU has them: AVX-512 VNNI (nested planes, whole
        // 512-column blocks) and AVX2 with AVX-VNNI (every column).
        for simd in [Simd::Auto, Simd::Avx2Gfni] {
            let kernel = CodeKernel::choose(simd);
            let integer = if q16_natural(kernel, cols, group) {
                cols
            } else if kernel_has_vnni(kernel)
                && nested_group(group)
                && cols >= 512
                && nested_weights(weights.iter().copied())
            {
                cols - cols % 512
            } else {
                0
            };
            let wide_end = integer;
            let (hi, lo, d) = quantize_x_q16(&x[..wide_end]);
            let x_codes: Vec<f64> = (0..cols)
                .map(|c| {
                    if c < wide_end {
                        f64::from(d[c / Q16_SEGMENT])
                            * (f64::from(hi[c]) + f64::from(lo[c]) / 254.0)
                    } else {
                        f64::from(x[c])
                    }
                })
                .collect();
            let groups = cols.div_ceil(group);
            for offsets in [None, Some(&offsets[..])] {
                let grid = CodeGrid {
                    group,
                    scales: &scales,
                    offsets,
                    scale: 0.125,
                    shift: -3.5,
                };
                let mut y = vec![1.0f32; rows];
                codes_matvec_add_q16(&refs, &grid, &x, &mut y, Parallelism::Auto, simd);
                for (r, &got) in y.iter().enumerate() {
                    let (mut want, mut mag) = (0.0f64, 0.0f64);
                    for c in 0..cols {
                        let code: u32 = planes
                            .iter()
                            .filter(|(b, _)| b.as_view().get(r, c))
                            .map(|&(_, w)| u32::from(w))
                            .sum();
                        let at = r * groups + c / group;
                        let sg = f64::from(scales[at].to_f32());
                        let og = offsets.map_or(0.0, |o| f64::from(o[at].to_f32()));
                        let coded = sg * 0.125 * f64::from(code) * x_codes[c];
                        let constant = (sg * -3.5 + og) * f64::from(x[c]);
                        want += coded + constant;
                        mag += coded.abs() + constant.abs();
                    }
                    assert!(
                        (f64::from(got) - 1.0 - want).abs() <= 1e-5 * mag + 1e-5,
                        "{simd:?} row {r}: {got} vs {} (integer columns: {integer})",
                        want + 1.0
                    );
                }
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]

        /// The two-byte product: nested planes on rows that are and are not whole
        /// 512-column blocks, groups the nested rows take and ones they do not, 1 to 8
        /// planes.
        #[test]
        fn q16_codes_match_the_rounded_definition(
            rows in 1usize..20,
            cols8 in 1usize..300,
            group in prop::sample::select(vec![16usize, 32, 48, 64, 128, 256, 640]),
            exps in Just((0u8..8).collect::<Vec<_>>()).prop_shuffle(),
            planes in 1usize..9,
            seed in any::<u64>(),
        ) {
            let weights: Vec<u8> = exps[..planes].iter().map(|&e| 1u8 << e).collect();
            check_q16(rows, 8 * cols8, group, &weights, seed);
        }

        /// The two-byte product with any weights (the AVX2 rows build codes of any planes):
        /// widths and groups of whole 32-column registers and not.
        #[test]
        fn q16_codes_with_any_weights_match_the_rounded_definition(
            rows in 1usize..12,
            cols32 in 1usize..40,
            tail8 in 0usize..2,
            group in prop::sample::select(vec![32usize, 64, 96, 128, 256]),
            weights in prop::collection::vec(0u8..32, 1..9),
            seed in any::<u64>(),
        ) {
            check_q16(rows, 32 * cols32 + 8 * tail8, group, &weights, seed);
        }

        /// The two-byte `x`: within `d / 508` of `x` (`d` the segment's largest magnitude
        /// over 127), both bytes within ±127.
        #[test]
        fn q16_x_is_within_its_bound(
            x in prop::collection::vec(-1e3f32..1e3, 0..600),
            zeros in 0usize..200,
        ) {
            let mut x = x;
            let zeros = zeros.min(x.len());
            x[..zeros].fill(0.0);
            let (hi, lo, d) = quantize_x_q16(&x);
            prop_assert_eq!((hi.len(), lo.len()), (x.len(), x.len()));
            prop_assert_eq!(d.len(), x.len().div_ceil(Q16_SEGMENT));
            for (c, &v) in x.iter().enumerate() {
                let seg = c / Q16_SEGMENT;
                let amax = x[seg * Q16_SEGMENT..((seg + 1) * Q16_SEGMENT).min(x.len())]
                    .iter()
                    .fold(0.0f32, |a, v| a.max(v.abs()));
                prop_assert!((d[seg] - amax / 127.0).abs() <= 1e-6 * amax);
                prop_assert!(hi[c] != i8::MIN && lo[c] != i8::MIN);
                let approx = f64::from(d[seg]) * (f64::from(hi[c]) + f64::from(lo[c]) / 254.0);
                let err = (f64::from(v) - approx).abs();
                prop_assert!(err <= f64::from(d[seg]) / 508.0 * 1.01 + 1e-30, "{} vs {}", v, approx);
            }
        }
    }

    /// A NaN or an infinity in `x` gives its segment scale NaN, and the two-byte product is
    /// not finite where the exact one is not.
    #[test]
    fn q16_products_keep_non_finite_x() {
        let weights: Vec<u8> = (0..8).map(|p| 128u8 >> p).collect();
        let (planes, scales, _) = random_grid(4, 1024, 128, &weights, 9);
        let refs: Vec<WeightedPlane<'_>> = planes
            .iter()
            .map(|(b, w)| WeightedPlane {
                bits: b.as_view(),
                weight: *w,
            })
            .collect();
        let grid = CodeGrid {
            group: 128,
            scales: &scales,
            offsets: None,
            scale: 0.125,
            shift: 0.0,
        };
        let (_, _, d) = quantize_x_q16(&[1.0, f32::NAN, 2.0, f32::INFINITY]);
        assert!(d[0].is_nan());
        for bad in [f32::NAN, f32::INFINITY] {
            let mut x = pseudo(1024, 1);
            x[300] = bad;
            let (mut y, mut exact) = (vec![0.0f32; 4], vec![0.0f32; 4]);
            codes_matvec_add_q16(
                &refs,
                &grid,
                &x,
                &mut y,
                Parallelism::Sequential,
                Simd::Auto,
            );
            codes_matvec_add(
                &refs,
                &grid,
                &x,
                &mut exact,
                Parallelism::Sequential,
                Simd::Auto,
            );
            for (a, b) in y.iter().zip(&exact) {
                assert!(!a.is_finite() && !b.is_finite(), "{bad}: {a} vs {b}");
            }
        }
    }

    /// The two-byte product on shapes split between threads (8 nested planes).
    #[test]
    fn q16_codes_match_on_a_parallel_shape() {
        let weights: Vec<u8> = (0..8).map(|p| 128u8 >> p).collect();
        check_q16(300, 1536, 128, &weights, 5);
        check_q16(64, 1096, 64, &weights, 6);
    }

    /// Large enough to split rows between threads; weights of 8 nested planes (sum 255).
    #[test]
    fn codes_match_on_a_parallel_shape() {
        let weights: Vec<u8> = (0..8).map(|p| 128u8 >> p).collect();
        check(300, 1024, 128, &weights, 3, Parallelism::Auto);
        check(77, 520, 64, &weights, 4, Parallelism::Auto);
    }

    #[test]
    #[should_panic(expected = "weights sum to 256")]
    fn codes_reject_a_weight_sum_above_255() {
        let b = SignMatrix::from_signs_of(&[1.0; 8], 1, 8).unwrap();
        let p = WeightedPlane {
            bits: b.as_view(),
            weight: 128,
        };
        let mut y = [0.0];
        let grid = CodeGrid {
            group: 8,
            scales: &[f16::ONE],
            offsets: None,
            scale: 1.0,
            shift: 0.0,
        };
        codes_matvec_add(
            &[p, p],
            &grid,
            &[1.0; 8],
            &mut y,
            Parallelism::Sequential,
            Simd::Auto,
        );
    }
}
