//! The decode kernel of residual blocks: `y += Σ_b (S_b ⊙ (u_b v_b)) x` straight from the
//! packed signs and the f16 factors (ALGORITHM.md §6: `y = Σ_j u[:,j] ⊙ (S (v[j,:] ⊙ x))`).
//!
//! All `k` sign products of a block share `S`. For each half byte of a row (4 columns) a table
//! of 16 entries holds, for every bit pattern, the `k`-vector `Σ_c ±z_c` of those columns'
//! scaled vectors `z_c = v[:, c] · x[c]` (`+` where the column's bit is set); a byte of signs
//! thus costs two table reads added to `k` accumulators held in registers. The accumulators
//! of a row (`A[r, j] = Σ_c S[r, c]·z_j[c]`) are dotted with `u[r, :]` at the end.
//!
//! Cache blocking: rows go in blocks whose accumulators fit in L2 (256 KiB); for each, the
//! tables of a chunk of column groups are built at once (about 256 KiB, kept in L2) and the
//! rows are swept in tiles of 64 (their sign bytes and accumulators stay in L1), each tile
//! sweeping the chunk's tables 16 KiB (an L1's worth) at a time.
//!
//! Threads: with [`Parallelism::Auto`] and a large problem the chunks of every block are split
//! into one contiguous share per rayon thread; each thread builds only its own tables and
//! accumulates into its own partial `y`, and the partials are summed — no table is built twice.
//! Where a block has fewer chunks than there are threads (up to ~1000 columns at k = 16), the
//! rows are split instead, and each thread builds the (then small) tables itself.
//!
//! Entries are `f32` and every sum is an `f32` sum, so the result equals the naive product up
//! to f32 rounding (a different summation order). On x86-64 (features checked at run time)
//! an entry of `k <= 8` floats is padded to 8 and handled as one `ymm` register (AVX2), a
//! larger one padded to 16 or 32 floats in `zmm` registers (AVX-512 F; on CPUs without it,
//! to 16, 24 or 32 in `ymm` registers), four rows at a time; elsewhere, or for `k > 32`, a
//! portable version with the same tables runs.

use std::cell::RefCell;

use half::f16;
use rayon::prelude::{IndexedParallelIterator, ParallelIterator, ParallelSliceMut};

use crate::lut::{shares_summed, sized, sized_aligned, use_parallel, with_scratch};
use crate::{Parallelism, SignMatrixRef};

/// Bytes of tables built at once per thread (they should stay in the L2 cache).
const CHUNK_TABLE_BYTES: usize = 256 << 10;
/// Bytes of tables swept by a tile of rows at a time (they should stay in the L1 cache).
const SUB_TABLE_BYTES: usize = 16 << 10;
/// Rows per tile: their sign bytes and accumulators stay in L1 while the tile sweeps a chunk.
const ROW_TILE: usize = 64;
/// Bytes of accumulators of one block of rows (4096 rows of 16 floats), kept in L2.
const ROW_BLOCK_ACC_BYTES: usize = 256 << 10;
/// Table entries per 8-column group: two tables of 16, one per half byte.
const ENTRIES: usize = 32;

/// Which implementation of the decode kernel runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum Simd {
    /// The fastest one this CPU supports (checked at run time).
    #[default]
    Auto,
    /// The portable version (no explicit SIMD): the reference for the vectorized one.
    Portable,
    /// The AVX2 version of a kernel (what CPUs without AVX-512 run: the residual-block
    /// decode kernel [`crate::lowrank_matvec_add`] and the code kernels
    /// [`crate::codes_matvec_add`], [`crate::codes_rows_to_dense`]) where the CPU has AVX2,
    /// even if it has AVX-512; the portable version elsewhere and for the other kernels. For
    /// tests and comparisons.
    Avx2,
    /// As [`Simd::Avx2`], with GFNI where the CPU has it (what recent CPUs without AVX-512
    /// run: Intel from Ice Lake / Alder Lake). Only the code kernels use GFNI.
    Avx2Gfni,
    /// The AVX-512 version of the code kernels without GFNI (what AVX-512 CPUs without it
    /// run: Intel Skylake-X to Cascade Lake), even if the CPU has GFNI; the portable version
    /// of the code kernels where the CPU lacks AVX-512 F and BW. The other kernels run as
    /// with [`Simd::Auto`]. For tests and comparisons.
    Avx512,
}

impl Simd {
    /// Every variant (what the tests compare with the portable reference).
    pub const ALL: [Simd; 5] = [
        Simd::Auto,
        Simd::Avx512,
        Simd::Avx2,
        Simd::Avx2Gfni,
        Simd::Portable,
    ];
}

/// One residual block `S ⊙ (u v)` as the decode kernel reads it: packed signs `S`
/// (`rows × cols`), `u` (`rows × k`) and `v` (`k × cols`), both row-major f16.
#[derive(Debug, Clone, Copy)]
pub struct LowRankRef<'a> {
    /// The signs.
    pub signs: SignMatrixRef<'a>,
    /// `rows × k`, row-major.
    pub u: &'a [f16],
    /// `k × cols`, row-major.
    pub v: &'a [f16],
    /// The rank of the factors.
    pub k: usize,
}

/// The kernel chosen for one block.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kernel {
    Portable,
    /// AVX-512 F with `nz` zmm registers (16 floats each) per table entry.
    #[cfg(target_arch = "x86_64")]
    Avx512 {
        nz: usize,
    },
    /// AVX2 with `ny` ymm registers (8 floats each) per table entry.
    #[cfg(target_arch = "x86_64")]
    Avx2 {
        ny: usize,
    },
}

impl Kernel {
    fn choose(k: usize, simd: Simd) -> Self {
        #[cfg(target_arch = "x86_64")]
        if matches!(simd, Simd::Avx2 | Simd::Avx2Gfni)
            && k <= 32
            && std::arch::is_x86_feature_detected!("avx2")
        {
            return Kernel::Avx2 { ny: k.div_ceil(8) };
        }
        #[cfg(target_arch = "x86_64")]
        if matches!(simd, Simd::Auto | Simd::Avx512) && k <= 32 {
            let avx2 = std::arch::is_x86_feature_detected!("avx2");
            // Up to 8 vectors an entry of 8 floats wastes no lanes: two ymm adds per cycle
            // do the work of two zmm adds padded from `k` to 16.
            if avx2 && k <= 8 {
                return Kernel::Avx2 { ny: 1 };
            }
            if std::arch::is_x86_feature_detected!("avx512f") {
                return Kernel::Avx512 { nz: k.div_ceil(16) };
            }
            if avx2 {
                return Kernel::Avx2 { ny: k.div_ceil(8) };
            }
        }
        let _ = (k, simd);
        Kernel::Portable
    }

    /// Floats per table entry.
    fn stride(self, k: usize) -> usize {
        match self {
            Kernel::Portable => k,
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512 { nz } => 16 * nz,
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 { ny } => 8 * ny,
        }
    }
}

/// One block with its kernel and blocking, checked.
#[derive(Clone, Copy)]
struct Problem<'a> {
    s: SignMatrixRef<'a>,
    u: &'a [f16],
    v: &'a [f16],
    k: usize,
    x: &'a [f32],
    kernel: Kernel,
    stride: usize,
    /// Column groups per table chunk.
    chunk_groups: usize,
}

impl Problem<'_> {
    fn groups(&self) -> usize {
        self.s.cols().div_ceil(8)
    }

    fn chunks(&self) -> usize {
        self.groups().div_ceil(self.chunk_groups)
    }

    /// Column groups of share `i` of `parts` (whole chunks, contiguous).
    fn share(&self, i: usize, parts: usize) -> (usize, usize) {
        let chunks = self.chunks();
        let at = |i: usize| ((chunks * i / parts) * self.chunk_groups).min(self.groups());
        (at(i), at(i + 1))
    }
}

/// Scratch memory of one thread, kept between calls (no page faults on every product).
#[derive(Default)]
struct Buffers {
    acc: Vec<f32>,
    z: Vec<f32>,
    tables: Vec<f32>,
    widened: Vec<f32>,
    scratch: Vec<u8>,
}

thread_local! {
    static BUFFERS: RefCell<Buffers> = RefCell::default();
}

/// Runs `f` with this thread's buffers.
fn with_buffers<R>(f: impl FnOnce(&mut Buffers) -> R) -> R {
    with_scratch(&BUFFERS, f)
}

/// Checks that block `i` is `m × n` with factors of `m·k` and `k·n` values, and returns its
/// multiply-adds `m·n·k` (saturating).
///
/// # Panics
/// If it is not (the message names `kernel`, the block and the lengths).
pub(crate) fn check_block(kernel: &str, i: usize, b: &LowRankRef<'_>, m: usize, n: usize) -> usize {
    let k = b.k;
    assert!(
        b.signs.rows() == m
            && b.signs.cols() == n
            && Some(b.u.len()) == m.checked_mul(k)
            && Some(b.v.len()) == n.checked_mul(k),
        "{kernel}: block {i} is {}x{} with k = {k}, u of {} and v of {} values; x has {n} and \
         y {m} values",
        b.signs.rows(),
        b.signs.cols(),
        b.u.len(),
        b.v.len()
    );
    m.saturating_mul(n).saturating_mul(k)
}

/// `y += Σ_b (S_b ⊙ (u_b v_b)) x` over `blocks`, all of `y.len()` rows and `x.len()` columns.
///
/// # Panics
/// If a block's shape or factor lengths do not match `x`, `y` and its `k`.
pub(crate) fn lowrank_matvec_add(
    blocks: &[LowRankRef<'_>],
    x: &[f32],
    y: &mut [f32],
    par: Parallelism,
    simd: Simd,
) {
    let (m, n) = (y.len(), x.len());
    let mut work = 0usize;
    let mut problems = Vec::with_capacity(blocks.len());
    for (i, b) in blocks.iter().enumerate() {
        let k = b.k;
        check_block("lowrank_matvec_add", i, b, m, n);
        if m == 0 || n == 0 || k == 0 {
            continue;
        }
        let kernel = Kernel::choose(k, simd);
        let stride = kernel.stride(k);
        let table_bytes = ENTRIES * stride * std::mem::size_of::<f32>();
        let chunk_groups = (CHUNK_TABLE_BYTES / table_bytes).clamp(1, n.div_ceil(8));
        work = work.saturating_add(m.saturating_mul(n).saturating_mul(k));
        problems.push(Problem {
            s: b.signs,
            u: b.u,
            v: b.v,
            k,
            x,
            kernel,
            stride,
            chunk_groups,
        });
    }
    let max_chunks = problems.iter().map(Problem::chunks).max().unwrap_or(0);
    let threads = if use_parallel(par, work) {
        rayon::current_num_threads()
    } else {
        1
    };
    let parts = threads.min(max_chunks);
    let blocks = problems.len();
    if parts < threads
        && threads > 1
        && blocks >= threads
        && (blocks.is_multiple_of(threads) || blocks >= 4 * threads)
    {
        // Too few column chunks for every thread but blocks enough: each thread takes whole
        // blocks (all their columns), building only their tables, into its own `y`
        // (small-llama, where every matrix is one chunk: the row split below built every
        // block's tables on every thread).
        let problems = &problems;
        let at = |i: usize| blocks * i / threads;
        shares_summed(y, threads, |i, y| {
            run_share(&problems[at(i)..at(i + 1)], 0, 1, 0, y);
        });
        return;
    }
    if parts <= 1 && threads > 1 && m >= 2 * ROW_TILE {
        // Too few column chunks to share (narrow matrices, e.g. 512 or 1536 columns): the
        // rows are split instead. Each thread builds the same (small) tables and writes its
        // own rows of y, so nothing is summed afterwards.
        let rows = m.div_ceil(threads).next_multiple_of(ROW_TILE);
        let problems = &problems;
        y.par_chunks_mut(rows)
            .enumerate()
            .for_each(|(t, ys)| run_share(problems, 0, 1, t * rows, ys));
        return;
    }
    if parts <= 1 {
        run_share(&problems, 0, 1, 0, y);
        return;
    }
    let problems = &problems;
    shares_summed(y, parts, |i, y| run_share(problems, i, parts, 0, y));
}

/// Adds share `i` of `parts` (of the column chunks) of every block's product to `y`, which
/// holds the rows `row0..row0 + y.len()`.
fn run_share(problems: &[Problem<'_>], i: usize, parts: usize, row0: usize, y: &mut [f32]) {
    with_buffers(|buffers| {
        for p in problems {
            let (g0, g1) = p.share(i, parts);
            if g0 >= g1 {
                continue;
            }
            // Row blocks small enough that their accumulators stay in L2 next to the tables
            // (the chunk's tables are rebuilt for each: a few per cent of the lookups).
            let block_rows = (ROW_BLOCK_ACC_BYTES / (4 * p.stride)).max(ROW_TILE);
            let mut r0 = 0;
            while r0 < y.len() {
                let r1 = (r0 + block_rows).min(y.len());
                let rows = r1 - r0;
                let Buffers {
                    acc,
                    z,
                    tables,
                    widened,
                    scratch,
                } = &mut *buffers;
                let acc = sized_aligned(acc, rows * p.stride);
                acc.fill(0.0);
                let z = sized(z, 8 * p.chunk_groups * p.stride);
                let tables = sized_aligned(tables, ENTRIES * p.chunk_groups * p.stride);
                let scratch = sized(scratch, ROW_TILE * p.chunk_groups);
                let wide = sized(widened, 8 * p.chunk_groups);
                run_range(p, (g0, g1), row0 + r0, acc, (z, tables, scratch, wide));
                apply_u(p, row0 + r0, acc, widened, &mut y[r0..r1]);
                r0 = r1;
            }
        }
    });
}

/// `y[i] += Σ_j u[first_row + i, j] · acc[i·stride + j]`.
fn apply_u(p: &Problem<'_>, first_row: usize, acc: &[f32], widened: &mut Vec<f32>, y: &mut [f32]) {
    const ROWS: usize = 256;
    let (k, stride) = (p.k, p.stride);
    for ((y_rows, acc_rows), u_half) in y
        .chunks_mut(ROWS)
        .zip(acc.chunks(ROWS * stride))
        .zip(p.u[first_row * k..].chunks(ROWS * k))
    {
        let u_rows = sized(widened, u_half.len());
        widen_into(u_half, u_rows);
        for ((out, a), ur) in y_rows
            .iter_mut()
            .zip(acc_rows.chunks_exact(stride))
            .zip(u_rows.chunks_exact(k))
        {
            *out += ur.iter().zip(a).map(|(&u, &a)| u * a).sum::<f32>();
        }
    }
}

/// Adds the sign products of column groups `g0..g1` and rows `first_row..` to the
/// accumulators `acc` (`rows × stride`: `acc[i·stride + j] += Σ_c S[first_row + i, c]·z_j[c]`),
/// with scratch for `z`, the tables, the rows' sign bytes and widened factors (sized for a
/// chunk).
#[allow(clippy::type_complexity)]
fn run_range(
    p: &Problem<'_>,
    (g0, g1): (usize, usize),
    first_row: usize,
    acc: &mut [f32],
    (z, tables, scratch, widened): (&mut [f32], &mut [f32], &mut [u8], &mut [f32]),
) {
    let (stride, cg) = (p.stride, p.chunk_groups);
    let mut c0 = g0;
    while c0 < g1 {
        let c1 = (c0 + cg).min(g1);
        let count = c1 - c0;
        let z = &mut z[..8 * count * stride];
        fill_z(p, 8 * c0, z, widened);
        let tables = &mut tables[..ENTRIES * count * stride];
        match p.kernel {
            Kernel::Portable => {
                for (table, zg) in tables
                    .chunks_exact_mut(ENTRIES * stride)
                    .zip(z.chunks_exact(8 * stride))
                {
                    build_table(table, zg, stride);
                }
                sweep_portable(p, tables, (c0, c1), first_row, acc, scratch);
            }
            #[cfg(target_arch = "x86_64")]
            kernel @ (Kernel::Avx512 { .. } | Kernel::Avx2 { .. }) => {
                tables::range(kernel, p, z, tables, (c0, c1), first_row, acc, scratch);
            }
        }
        c0 = c1;
    }
}

/// `z[(c - col0)·stride + j] = v[j, c] · x[c]` for the chunk's columns; columns `>= n` and
/// padding lanes `j >= k` are zero.
fn fill_z(p: &Problem<'_>, col0: usize, z: &mut [f32], widened: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if matches!(p.kernel, Kernel::Avx512 { .. }) && avx512::fill_z(p, col0, z) {
        return;
    }
    let n = p.s.cols();
    let stride = p.stride;
    let cols = z.len() / stride;
    let present = n.saturating_sub(col0).min(cols);
    z.fill(0.0);
    let x = &p.x[col0..col0 + present];
    let widened = &mut widened[..present];
    for j in 0..p.k {
        let v_row = &p.v[j * n + col0..j * n + col0 + present];
        widen_into(v_row, widened);
        for ((zc, &w), &xc) in z.chunks_exact_mut(stride).zip(&*widened).zip(x) {
            zc[j] = w * xc;
        }
    }
}

/// f16 → f32: 16 values per instruction with AVX-512 F where the CPU has it, else the `half`
/// crate (F16C eight at a time, or portable). Conversion to f32 is exact either way.
pub(crate) fn widen_into(src: &[f16], dst: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if avx512::widen(src, dst) {
        return;
    }
    use half::slice::HalfFloatSliceExt;
    src.convert_to_f32_slice(dst);
}

/// Fills one group's two half-byte tables: entry `h` of the first (at `h·stride`) is
/// `Σ_i ±z_i` over the group's columns 0..4, entry `l` of the second (at `(16 + l)·stride`) the
/// same over columns 4..8; `+` where the column's bit is set (the first column in the MSB).
#[inline]
fn build_table(table: &mut [f32], z: &[f32], stride: usize) {
    let (first, second) = table.split_at_mut(16 * stride);
    let (z_first, z_second) = z.split_at(4 * stride);
    build_half(first, z_first, stride);
    build_half(second, z_second, stride);
}

/// One 16-entry table of the signed sums of 4 columns (`z`: 4 entries of `stride`).
#[inline]
fn build_half(table: &mut [f32], z: &[f32], stride: usize) {
    let (base, _) = table.split_at_mut(stride);
    base.fill(0.0);
    for zc in z.chunks_exact(stride) {
        base.iter_mut().zip(zc).for_each(|(t, &v)| *t -= v);
    }
    for i in 0..4 {
        let zc = &z[(3 - i) * stride..(4 - i) * stride];
        let half = (1usize << i) * stride;
        let (lo, hi) = table.split_at_mut(half);
        for (h, l) in hi[..half]
            .chunks_exact_mut(stride)
            .zip(lo.chunks_exact(stride))
        {
            for ((h, &l), &v) in h.iter_mut().zip(l).zip(zc) {
                *h = l + 2.0 * v;
            }
        }
    }
}

/// The row sweep of the vectorized kernels over a chunk's built tables: tiles of
/// [`ROW_TILE`] rows (their sign bytes gathered into `scratch`), each swept over the tables
/// [`SUB_TABLE_BYTES`] at a time; `lookup(tables, rows, groups, out)` adds the entries of
/// 4 rows (or 1, for the last rows of a tile) over `groups` to their accumulators `out`.
/// (Inlined into each kernel, so that its lookups compile with the kernel's features.)
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn sweep_tiles(
    p: &Problem<'_>,
    tables: &[f32],
    (c0, c1): (usize, usize),
    first_row: usize,
    acc: &mut [f32],
    scratch: &mut [u8],
    mut lookup: impl FnMut(&[f32], &[&[u8]], std::ops::Range<usize>, &mut [f32]),
) {
    let stride = p.stride;
    let count = c1 - c0;
    let m = acc.len() / stride;
    let sub = (SUB_TABLE_BYTES / (ENTRIES * stride * 4)).max(1);
    let mut r0 = 0;
    while r0 < m {
        let r1 = (r0 + ROW_TILE).min(m);
        // The tile's sign bytes (they stay in L1 while the sub-chunks sweep them).
        let mut rows: [&[u8]; ROW_TILE] = [&[]; ROW_TILE];
        for ((r, row), buf) in (r0..r1)
            .zip(rows.iter_mut())
            .zip(scratch.chunks_exact_mut(count))
        {
            *row = p.s.row_group_bytes(first_row + r, c0, c1, buf);
        }
        let rows = &rows[..r1 - r0];
        let tile_acc = &mut acc[r0 * stride..r1 * stride];
        let mut g0 = 0;
        while g0 < count {
            let g1 = (g0 + sub).min(count);
            let mut quads = tile_acc.chunks_exact_mut(4 * stride);
            let mut row_quads = rows.chunks_exact(4);
            for (out, quad) in (&mut quads).zip(&mut row_quads) {
                lookup(tables, quad, g0..g1, out);
            }
            for (out, row) in quads
                .into_remainder()
                .chunks_exact_mut(stride)
                .zip(row_quads.remainder().chunks(1))
            {
                lookup(tables, row, g0..g1, out);
            }
            g0 = g1;
        }
        r0 = r1;
    }
}

/// The portable sweep: every row of the chunk, one table read per byte.
fn sweep_portable(
    p: &Problem<'_>,
    tables: &[f32],
    (c0, c1): (usize, usize),
    first_row: usize,
    acc: &mut [f32],
    scratch: &mut [u8],
) {
    let (k, stride) = (p.k, p.stride);
    for (i, acc_row) in acc.chunks_exact_mut(stride).enumerate() {
        let bytes = p.s.row_group_bytes(first_row + i, c0, c1, scratch);
        for (table, &b) in tables.chunks_exact(ENTRIES * stride).zip(bytes) {
            let hi = usize::from(b >> 4) * stride;
            let lo = (16 + usize::from(b & 15)) * stride;
            for ((a, &eh), &el) in acc_row[..k]
                .iter_mut()
                .zip(&table[hi..hi + k])
                .zip(&table[lo..lo + k])
            {
                *a += eh + el;
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
pub(crate) mod avx512 {
    use std::arch::x86_64::{
        __m512, _mm512_mul_ps, _mm512_setzero_ps, _mm512_shuffle_f32x4, _mm512_shuffle_ps,
        _mm512_storeu_ps, _mm512_unpackhi_ps, _mm512_unpacklo_ps,
    };

    use super::Problem;

    /// `dst = src` widened to f32 with AVX-512 F; `false` (nothing written) without it.
    ///
    /// # Panics
    /// If the lengths differ.
    pub(super) fn widen(src: &[half::f16], dst: &mut [f32]) -> bool {
        assert_eq!(src.len(), dst.len(), "widen: lengths differ");
        if !std::arch::is_x86_feature_detected!("avx512f") {
            return false;
        }
        // SAFETY: AVX-512 F was detected just above; the lengths are equal (asserted).
        unsafe { widen_avx512(src, dst) };
        true
    }

    /// # Safety
    /// AVX-512 F must be available and `src.len() == dst.len()`.
    #[target_feature(enable = "avx512f")]
    unsafe fn widen_avx512(src: &[half::f16], dst: &mut [f32]) {
        use std::arch::x86_64::{__m256i, _mm256_loadu_si256, _mm512_cvtph_ps};
        let whole = src.len() / 16 * 16;
        for (s16, d16) in src[..whole]
            .chunks_exact(16)
            .zip(dst[..whole].chunks_exact_mut(16))
        {
            // SAFETY: `s16` holds 16 f16 (32 bytes, unaligned load) and `d16` 16 f32.
            unsafe {
                let h = _mm256_loadu_si256(s16.as_ptr().cast::<__m256i>());
                _mm512_storeu_ps(d16.as_mut_ptr(), _mm512_cvtph_ps(h));
            }
        }
        for (s, d) in src[whole..].iter().zip(&mut dst[whole..]) {
            *d = s.to_f32();
        }
    }

    /// 16×16 transpose of floats: lane `i` of `out[c]` is lane `c` of `r[i]` (pairs, then
    /// quads within 128-bit lanes, then the lanes).
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub(crate) fn transpose16(r: &[__m512; 16]) -> [__m512; 16] {
        let mut a = [_mm512_setzero_ps(); 16];
        for i in 0..8 {
            a[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
            a[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
        }
        let mut b = [_mm512_setzero_ps(); 16];
        for i in 0..4 {
            b[4 * i] = _mm512_shuffle_ps::<0x44>(a[4 * i], a[4 * i + 2]);
            b[4 * i + 1] = _mm512_shuffle_ps::<0xEE>(a[4 * i], a[4 * i + 2]);
            b[4 * i + 2] = _mm512_shuffle_ps::<0x44>(a[4 * i + 1], a[4 * i + 3]);
            b[4 * i + 3] = _mm512_shuffle_ps::<0xEE>(a[4 * i + 1], a[4 * i + 3]);
        }
        // `b[4i + e]`, lane `L`: column `4L + e` of rows `4i..4i + 4`.
        let mut out = [_mm512_setzero_ps(); 16];
        for e in 0..4 {
            let c0 = _mm512_shuffle_f32x4::<0x44>(b[e], b[4 + e]);
            let c1 = _mm512_shuffle_f32x4::<0xEE>(b[e], b[4 + e]);
            let c2 = _mm512_shuffle_f32x4::<0x44>(b[8 + e], b[12 + e]);
            let c3 = _mm512_shuffle_f32x4::<0xEE>(b[8 + e], b[12 + e]);
            out[e] = _mm512_shuffle_f32x4::<0x88>(c0, c2);
            out[4 + e] = _mm512_shuffle_f32x4::<0xDD>(c0, c2);
            out[8 + e] = _mm512_shuffle_f32x4::<0x88>(c1, c3);
            out[12 + e] = _mm512_shuffle_f32x4::<0xDD>(c1, c3);
        }
        out
    }

    /// [`super::fill_z`] with AVX-512 F: 16 columns of 16 rows of `v` widened, scaled by `x`
    /// and transposed in registers (the portable loop writes one float at a time, strided).
    /// `false` (nothing written) without AVX-512 F or for a stride that is not a multiple of
    /// 16.
    pub(super) fn fill_z(p: &Problem<'_>, col0: usize, z: &mut [f32]) -> bool {
        let (n, k, stride) = (p.s.cols(), p.k, p.stride);
        if !std::arch::is_x86_feature_detected!("avx512f")
            || !stride.is_multiple_of(16)
            || k > stride
            || !z.len().is_multiple_of(stride)
            || col0 > n
            || p.v.len() != k * n
            || p.x.len() != n
        {
            return false;
        }
        // SAFETY: AVX-512 F was detected just above; the shapes were checked with it.
        unsafe { fill_z_avx512(p.v, p.x, (n, k, stride), col0, z) };
        true
    }

    /// # Safety
    /// AVX-512 F must be available, `v` `k × n`, `x` `n` values, `stride` a multiple of 16
    /// with `k <= stride`, `z` whole entries of `stride` floats and `col0 <= n`.
    #[target_feature(enable = "avx512f")]
    unsafe fn fill_z_avx512(
        v: &[half::f16],
        x: &[f32],
        (n, k, stride): (usize, usize, usize),
        col0: usize,
        z: &mut [f32],
    ) {
        use std::arch::x86_64::{
            __m256i, _mm256_loadu_si256, _mm512_cvtph_ps, _mm512_maskz_loadu_ps,
        };
        let cols = z.len() / stride;
        let present = (n - col0).min(cols);
        z.fill(0.0);
        let zp = z.as_mut_ptr();
        let mut c = 0;
        while c < present {
            let width = (present - c).min(16);
            let keep: u16 = if width == 16 {
                u16::MAX
            } else {
                (1 << width) - 1
            };
            // SAFETY: `col0 + c + width <= n = x.len()`; masked lanes are not read.
            let xv = unsafe { _mm512_maskz_loadu_ps(keep, x.as_ptr().add(col0 + c)) };
            for j0 in (0..k).step_by(16) {
                // Rows `j0..j0 + 16` of `v·x` over columns `c..c + 16` (zero past `k` and
                // past the present columns).
                let mut r = [_mm512_setzero_ps(); 16];
                for (i, ri) in r.iter_mut().enumerate().take((k - j0).min(16)) {
                    let at = (j0 + i) * n + col0 + c;
                    let h = if width == 16 {
                        // SAFETY: `at + 16 <= (j0 + i)·n + n <= v.len()`.
                        unsafe { _mm256_loadu_si256(v.as_ptr().add(at).cast::<__m256i>()) }
                    } else {
                        let mut part = [half::f16::ZERO; 16];
                        part[..width].copy_from_slice(&v[at..at + width]);
                        // SAFETY: 16 f16 (32 bytes).
                        unsafe { _mm256_loadu_si256(part.as_ptr().cast::<__m256i>()) }
                    };
                    *ri = _mm512_mul_ps(_mm512_cvtph_ps(h), xv);
                }
                let out = transpose16(&r);
                for (i, column) in out.iter().enumerate().take(width) {
                    // SAFETY: `c + i < present <= cols` and `j0 + 16 <= stride`: within `z`.
                    unsafe { _mm512_storeu_ps(zp.add((c + i) * stride + j0), *column) };
                }
            }
            c += 16;
        }
    }
}

/// The vectorized table kernels, written once (`table_kernels!`) and compiled per instruction
/// set: `zmm` (16 floats, AVX-512 F) and `ymm` (8 floats, AVX2).
#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
mod tables {
    use super::{Kernel, Problem, ENTRIES, ROW_TILE};

    type RangeArgs<'a, 'b> = (
        &'a Problem<'b>,
        &'a [f32],
        &'a mut [f32],
        (usize, usize),
        usize,
        &'a mut [f32],
        &'a mut [u8],
    );

    /// Tables and the row sweep of column groups `c0..c1` with the vectorized `kernel`
    /// (AVX-512 F with 1 or 2 zmm per entry, AVX2 with 1 to 4 ymm); the portable code if the
    /// CPU lacks it after all or the buffers do not fit.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn range(
        kernel: Kernel,
        p: &Problem<'_>,
        z: &[f32],
        tables: &mut [f32],
        (c0, c1): (usize, usize),
        first_row: usize,
        acc: &mut [f32],
        scratch: &mut [u8],
    ) {
        let count = c1 - c0;
        let (cpu, per_entry) = match kernel {
            Kernel::Avx512 { nz } => (
                std::arch::is_x86_feature_detected!("avx512f") && (1..=2).contains(&nz),
                16 * nz,
            ),
            Kernel::Avx2 { ny } => (
                std::arch::is_x86_feature_detected!("avx2") && (1..=4).contains(&ny),
                8 * ny,
            ),
            Kernel::Portable => (false, 0),
        };
        let usable = cpu
            && p.stride == per_entry
            && tables.len() == count * ENTRIES * p.stride
            && z.len() >= count * 8 * p.stride
            && scratch.len() >= ROW_TILE * count
            && acc.len().is_multiple_of(p.stride)
            && first_row + acc.len() / p.stride <= p.s.rows();
        if !usable {
            for (table, zg) in tables
                .chunks_exact_mut(ENTRIES * p.stride)
                .zip(z.chunks_exact(8 * p.stride))
            {
                super::build_table(table, zg, p.stride);
            }
            return super::sweep_portable(p, tables, (c0, c1), first_row, acc, scratch);
        }
        let args = (p, z, tables, (c0, c1), first_row, acc, scratch);
        // SAFETY: the instruction set was detected just above, and the buffer lengths the
        // kernels require were checked with it.
        unsafe {
            match kernel {
                Kernel::Avx512 { nz: 1 } => zmm::range_with::<1>(args),
                Kernel::Avx512 { .. } => zmm::range_with::<2>(args),
                Kernel::Avx2 { ny: 1 } => ymm::range_with::<1>(args),
                Kernel::Avx2 { ny: 2 } => ymm::range_with::<2>(args),
                Kernel::Avx2 { ny: 3 } => ymm::range_with::<3>(args),
                _ => ymm::range_with::<4>(args),
            }
        }
    }

    /// The kernels of one instruction set: `$feature`, vectors of `$n` floats and the
    /// intrinsics the kernels use (written once, compiled per instruction set).
    macro_rules! table_kernels {
        ($name:ident, $feature:literal, $n:literal, $zero:ident, $splat:ident,
         $load:ident, $store:ident, $add:ident, $sub:ident, $mul:ident) => {
            mod $name {
                use std::arch::x86_64::{$add, $load, $mul, $splat, $store, $sub, $zero};

                use super::super::{sweep_tiles, ENTRIES, ROW_TILE};
                use super::RangeArgs;

                /// Floats per vector.
                const N: usize = $n;

                /// Tables and the row sweep of column groups `c0..c1` with `NV` vectors per
                /// entry, for the rows `first_row..` that `acc` holds (`NV·N` accumulators each).
                ///
                /// # Safety
                /// The instruction set must be available (the buffer lengths are asserted).
                #[target_feature(enable = $feature)]
                pub(super) unsafe fn range_with<const NV: usize>(
                    (p, z, tables, (c0, c1), first_row, acc, scratch): RangeArgs<'_, '_>,
                ) {
                    let stride = NV * N;
                    let count = c1 - c0;
                    let table_len = ENTRIES * stride;
                    let m = acc.len() / stride;
                    assert!(
                        p.stride == stride
                            && tables.len() == count * table_len
                            && z.len() >= count * 8 * stride
                            && scratch.len() >= ROW_TILE * count
                            && acc.len() == m * stride
                            && first_row + m <= p.s.rows(),
                        "lowrank tables: inconsistent buffers"
                    );
                    for (table, zg) in tables
                        .chunks_exact_mut(table_len)
                        .zip(z.chunks_exact(8 * stride))
                    {
                        // SAFETY: the instruction set is enabled here; `table`
                        // has `32·stride` floats and `zg` `8·stride` (checked above).
                        unsafe { build_table::<NV>(table, zg) };
                    }
                    sweep_tiles(
                        p,
                        tables,
                        (c0, c1),
                        first_row,
                        acc,
                        scratch,
                        |tables, rows, g, out| {
                            // SAFETY: as above; `out` holds `rows.len()` rows of `stride` accumulators and
                            // every row slice has at least `g.end` bytes (`sweep_tiles`).
                            unsafe {
                                match *rows {
                                    [a, b, c, d] => {
                                        lookup::<NV, 4>(tables, [a, b, c, d], g.start, g.end, out)
                                    }
                                    _ => lookup::<NV, 1>(tables, [rows[0]], g.start, g.end, out),
                                }
                            }
                        },
                    );
                }

                /// `out[i] += Σ_{g0 <= g < g1} (table_g[hi(b)] + table_g[16 + lo(b)])` for the
                /// `R` rows, `b = rows[i][g]`, the `NV·N` accumulators of each row held in
                /// registers.
                ///
                /// # Safety
                /// The instruction set must be available.
                #[inline]
                #[target_feature(enable = $feature)]
                unsafe fn lookup<const NV: usize, const R: usize>(
                    tables: &[f32],
                    rows: [&[u8]; R],
                    g0: usize,
                    g1: usize,
                    out: &mut [f32],
                ) {
                    let stride = NV * N;
                    let table_len = ENTRIES * stride;
                    assert!(
                        out.len() >= R * stride
                            && tables.len() >= g1 * table_len
                            && rows.iter().all(|r| r.len() >= g1),
                        "lookup: short buffers"
                    );
                    let o = out.as_mut_ptr();
                    let base = tables.as_ptr();
                    let mut sums = [[$zero(); NV]; R];
                    for (i, sum) in sums.iter_mut().enumerate() {
                        for (q, sq) in sum.iter_mut().enumerate() {
                            // SAFETY: `(i·NV + q)·N + N <= R·stride <= out.len()` (asserted).
                            *sq = unsafe { $load(o.add((i * NV + q) * N)) };
                        }
                    }
                    for g in g0..g1 {
                        let t = g * table_len;
                        for (sum, bytes) in sums.iter_mut().zip(&rows) {
                            // SAFETY: `g < g1 <= bytes.len()` (asserted).
                            let b = unsafe { *bytes.get_unchecked(g) };
                            let hi = t + usize::from(b >> 4) * stride;
                            let lo = t + (16 + usize::from(b & 15)) * stride;
                            for (q, sq) in sum.iter_mut().enumerate() {
                                // SAFETY: both entry indices are `< 32 = ENTRIES` and `g < g1`, so
                                // `hi + N·q + N` and `lo + N·q + N` are at most
                                // `g1·table_len <= tables.len()` (asserted).
                                unsafe {
                                    let eh = $load(base.add(hi + N * q));
                                    let el = $load(base.add(lo + N * q));
                                    *sq = $add(*sq, $add(eh, el));
                                }
                            }
                        }
                    }
                    for (i, sum) in sums.iter().enumerate() {
                        for (q, sq) in sum.iter().enumerate() {
                            // SAFETY: as for the loads above.
                            unsafe { $store(o.add((i * NV + q) * N), *sq) };
                        }
                    }
                }

                /// `build_table` (the portable one) for `stride = NV·N`.
                ///
                /// # Safety
                /// The instruction set must be available.
                #[inline]
                #[target_feature(enable = $feature)]
                unsafe fn build_table<const NV: usize>(table: &mut [f32], z: &[f32]) {
                    let stride = NV * N;
                    assert!(table.len() == ENTRIES * stride && z.len() >= 8 * stride);
                    let t = table.as_mut_ptr();
                    let zp = z.as_ptr();
                    let two = $splat(2.0);
                    for half_table in 0..2 {
                        // Table `half_table` covers columns `4·half_table..4·half_table + 4`.
                        let t = t.wrapping_add(16 * stride * half_table);
                        let zp = zp.wrapping_add(4 * stride * half_table);
                        for q in 0..NV {
                            let mut base = $zero();
                            for c in 0..4 {
                                // SAFETY: `(4·half_table + c)·stride + N·q + N <= 8·stride <= z.len()`.
                                base = unsafe { $sub(base, $load(zp.add(c * stride + N * q))) };
                            }
                            // SAFETY: `16·half_table·stride + N·q + N <= 32·stride = table.len()`.
                            unsafe { $store(t.add(N * q), base) };
                            for i in 0..4 {
                                let half = 1usize << i;
                                // SAFETY: column `3 - i` of this half lies in `z` (as above).
                                let zc = unsafe { $load(zp.add((3 - i) * stride + N * q)) };
                                let add = $mul(two, zc);
                                for b in 0..half {
                                    let from = b * stride + N * q;
                                    let to = from + half * stride;
                                    // SAFETY: `b + half < 16`, so `to + N` stays within this half's
                                    // `16·stride` floats of `table`.
                                    unsafe { $store(t.add(to), $add($load(t.add(from)), add)) };
                                }
                            }
                        }
                    }
                }
            }
        };
    }

    table_kernels!(
        zmm,
        "avx512f",
        16,
        _mm512_setzero_ps,
        _mm512_set1_ps,
        _mm512_loadu_ps,
        _mm512_storeu_ps,
        _mm512_add_ps,
        _mm512_sub_ps,
        _mm512_mul_ps
    );
    table_kernels!(
        ymm,
        "avx2",
        8,
        _mm256_setzero_ps,
        _mm256_set1_ps,
        _mm256_loadu_ps,
        _mm256_storeu_ps,
        _mm256_add_ps,
        _mm256_sub_ps,
        _mm256_mul_ps
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The widening used by the kernel equals `half`'s scalar conversion for every finite and
    /// infinite f16 (all 63,488 non-NaN bit patterns), at lengths that are and are not
    /// multiples of 16.
    #[test]
    fn widen_into_is_exact_for_every_half() {
        let all: Vec<f16> = (0..=u16::MAX)
            .map(f16::from_bits)
            .filter(|h| !h.is_nan())
            .collect();
        for len in [all.len(), all.len() - 5, 15, 1, 0] {
            let src = &all[..len];
            let mut got = vec![0.0f32; len];
            widen_into(src, &mut got);
            for (g, h) in got.iter().zip(src) {
                assert_eq!(g.to_bits(), h.to_f32().to_bits(), "{h:?}");
            }
        }
    }
}
