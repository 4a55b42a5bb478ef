//! The decode kernel of residual blocks with 8-bit tables: `y += Σ_b (S_b ⊙ (u_b v_b)) x`
//! like [`crate::lowrank_matvec_add`], with each table entry rounded to a signed byte.
//!
//! As in the f32 kernel (`lowrank.rs`), a group of 4 columns has a 16-entry table per rank
//! index `j`: entry `e` is `T_j[e] = Σ_c ±z_j[c]` over the group's columns, `z_j[c] =
//! v[j, c]·x[c]`, `+` where the column's bit in `e` is set (the first column in the most
//! significant bit). Here the entries are quantized: the columns go in chunks of
//! [`CHUNK_COLS`], and for each chunk and `j` a scale `s = max_group Σ_c |z_j[c]| / 127`
//! (the largest entry's magnitude) turns every entry into `q = round(T/s)` in `−127..=127`.
//! A row's sums over a chunk are exact in integers; the accumulator of row `r` and `j` gains
//! `s · Σ q` per chunk, and `y[r] += Σ_j u[r, j] · acc[r, j]` at the end.
//!
//! The error is therefore that of rounding each entry: at most `s/2` per group and chunk,
//! so `|Δy[r]| ≤ Σ_j |u[r, j]| · Σ_chunks (groups in chunk) · s_chunk,j / 2` — the bound the
//! tests check against an exact product. It is the same trade as llama.cpp's 8-bit
//! activations in its `Q8_K` blocks of 256 values.
//!
//! With AVX-512 VBMI and VNNI (AMD Zen 4, Intel from Ice Lake), one `vpermb` looks up 64
//! entries: 16 rows × 4 groups, the register holding the 4 groups' tables (64 bytes) for one
//! `j` and each index byte a row's half byte plus the group's number in bits 4–5. One
//! `vpdpbusd` adds the 4 bytes of each row into its 32-bit sum. A row tile's index bytes
//! (16 rows × one chunk: 16 registers) are made once and used for every `j`: the tile's
//! 16 × 32 bytes are transposed in registers. A chunk is one strip of
//! [`SignLayout::Strips`](crate::SignLayout::Strips), in which those bytes are one
//! contiguous run (row-major, they are 16 pieces a row apart: on Zen 5 the strips took 0.62
//! instead of 0.80 ms at 4096², 4 blocks, k = 16, two threads). Two tiles go
//! together: each table register is loaded once for both, with 16 independent sums (8
//! rank indices × 2 tiles) in flight, while the next two tiles' index bytes are made. The
//! chunk's tables (`k` KiB) stay in L1 while the tiles of a row block sweep them. The portable
//! version does the same integer sums one entry at a time and is the tests' oracle: both
//! round the same entries and add the same values in the same order, so on one thread they
//! agree exactly.
//!
//! With AVX2, FMA and F16C but not those (Intel before Ice Lake and its client cores,
//! AMD before Zen 4), the same tables and sums: one `vpshufb` looks up 32 entries (16 rows
//! × 2 groups, one group's 16-entry table per 128-bit lane), two `vpmaddubsw` against
//! bytes `1, 0, …` and `0, 1, …` take the even and the odd rows' entries into 16-bit sums,
//! which are widened once per chunk; `z` and the application of `u` have AVX2 versions
//! too. On Zen 5 (two threads) it runs 1.7–2.9 times as fast as the f32 tables' AVX2
//! version and at 0.3–0.5 times the AVX-512 version's speed (`SIMD=avx2
//! examples/q8_decode`).
//!
//! Threads: each thread takes a contiguous run of the `blocks × chunks` units of work
//! (block-major: whole blocks where there are as many blocks as threads), with its own
//! tables and partial `y`, summed at the end; or a share of the rows where one chunk of a
//! few blocks does not divide evenly.

use std::cell::RefCell;

use rayon::prelude::{IndexedParallelIterator, ParallelIterator, ParallelSliceMut};

use crate::lowrank::widen_into;
use crate::lut::{shares_summed, sized, use_parallel, with_scratch};
use crate::{LowRankRef, Parallelism, Simd};

/// Columns per chunk: one scale per chunk and rank index.
pub const CHUNK_COLS: usize = 256;
/// Sign bytes of a row in one chunk.
const CHUNK_BYTES: usize = CHUNK_COLS / 8;
// A chunk is a strip of the strip layout (its tiles are read as contiguous runs).
const _: () = assert!(CHUNK_COLS == crate::STRIP_COLS);
/// Groups of 16 columns (4 tables of 16 entries, one 64-byte register) per chunk.
const QUADS: usize = CHUNK_COLS / 16;
/// Bytes of the tables of one quad and one rank index.
const QUAD_TABLE: usize = 64;
/// Table bytes of one chunk and one rank index.
const CHUNK_TABLE: usize = QUADS * QUAD_TABLE;
/// Rows per tile: the 32-bit lanes of one register.
const TILE: usize = 16;
/// Bytes of accumulators of one block of rows (they stay in L2 while the chunks sweep them).
const ROW_BLOCK_ACC_BYTES: usize = 256 << 10;
/// How many tiles ahead the sign bytes are prefetched (2 and 4 left Zen 5 waiting for
/// them: 4096², 4 blocks, one thread: 1.92 and 1.72 ms; 16: 1.54 ms).
const PREFETCH_TILES: usize = 16;
/// How many tiles ahead the sweep prefetches sign bytes in the strip layout, where a
/// tile's rows are one contiguous run (Zen 5, 14336 × 4096, 4 blocks, 2 threads: 2.5–2.7 ms
/// without, 2.1–2.3 ms at 2 to 8, 2.4–2.5 ms at 16).
const STRIP_PREFETCH_TILES: usize = 4;
/// Tiles whose lookups share each table register (in the AVX-512 sweep).
const STEP_TILES: usize = 2;
/// The largest quantized entry.
const QMAX: f32 = 127.0;

/// The vectorized sweep's tile buffers (5 kB): made once per share of a product instead of
/// on every sweep, 512 per thread in a 4096² product of 4 blocks (one thread, four rounds
/// alternately: 1.13–1.19 ms against 1.12–1.20 before, 1.4 % less on average).
struct SweepScratch {
    #[cfg(target_arch = "x86_64")]
    rows: [[u8; TILE * CHUNK_BYTES]; STEP_TILES],
    #[cfg(target_arch = "x86_64")]
    idx: [[avx512::Indices; STEP_TILES]; 2],
    #[cfg(target_arch = "x86_64")]
    idx2: avx2::Indices,
}

impl Default for SweepScratch {
    fn default() -> Self {
        Self {
            #[cfg(target_arch = "x86_64")]
            rows: [[0; TILE * CHUNK_BYTES]; STEP_TILES],
            #[cfg(target_arch = "x86_64")]
            idx: [[avx512::Indices::default(); STEP_TILES]; 2],
            #[cfg(target_arch = "x86_64")]
            idx2: avx2::Indices::default(),
        }
    }
}

/// Scratch memory of one thread, kept between calls.
#[derive(Default)]
struct Buffers {
    tables: Vec<u8>,
    scales: Vec<f32>,
    z: Vec<f32>,
    acc: Vec<f32>,
    u: Vec<f32>,
}

thread_local! {
    static BUFFERS: RefCell<Buffers> = RefCell::default();
}

/// Runs `f` with this thread's buffers.
fn with_buffers<R>(f: impl FnOnce(&mut Buffers) -> R) -> R {
    with_scratch(&BUFFERS, f)
}

/// Which version of the kernel runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Path {
    /// The portable version (the tests' oracle).
    Portable,
    /// AVX-512 VBMI and VNNI: `vpermb` lookups of 16 rows × 4 groups, `vpdpbusd` sums.
    Avx512,
    /// AVX2, FMA and F16C: `vpshufb` lookups of 16 rows × 2 groups, `vpmaddubsw` sums.
    Avx2,
}

/// The version of [`matvec_add_q8`] that runs with `simd` on this CPU: AVX-512 where it has
/// VBMI and VNNI (with `Auto` and `Avx512`), else AVX2 where it has AVX2, FMA and F16C (with
/// `Auto`, `Avx2` and `Avx2Gfni`), else the portable one.
fn path(simd: Simd) -> Path {
    #[cfg(target_arch = "x86_64")]
    {
        if matches!(simd, Simd::Auto | Simd::Avx512) && avx512::available() {
            return Path::Avx512;
        }
        if matches!(simd, Simd::Auto | Simd::Avx2 | Simd::Avx2Gfni) && avx2::available() {
            return Path::Avx2;
        }
    }
    let _ = simd;
    Path::Portable
}

/// Whether [`matvec_add_q8`] runs a vectorized version (AVX-512 or AVX2) with `simd` on
/// this CPU.
pub(crate) fn vectorized(simd: Simd) -> bool {
    path(simd) != Path::Portable
}

/// Whether [`matvec_add_q8`] runs its AVX-512 version with `simd` on this CPU.
pub(crate) fn vectorized_avx512(simd: Simd) -> bool {
    path(simd) == Path::Avx512
}

/// `y += Σ_b (S_b ⊙ (u_b v_b)) x` over `blocks` with 8-bit tables (see the module docs).
///
/// # Panics
/// If a block's shape or factor lengths do not match `x`, `y` and its `k`.
pub(crate) fn matvec_add_q8(
    blocks: &[LowRankRef<'_>],
    x: &[f32],
    y: &mut [f32],
    par: Parallelism,
    simd: Simd,
) {
    let (m, n) = (y.len(), x.len());
    let mut work = 0usize;
    for (i, b) in blocks.iter().enumerate() {
        work = work.saturating_add(crate::lowrank::check_block(
            "lowrank_matvec_add_q8",
            i,
            b,
            m,
            n,
        ));
    }
    let blocks: Vec<LowRankRef<'_>> = blocks.iter().filter(|b| b.k > 0).copied().collect();
    if m == 0 || n == 0 || blocks.is_empty() {
        return;
    }
    let path = path(simd);
    let chunks = n.div_ceil(CHUNK_COLS);
    let threads = if use_parallel(par, work) {
        rayon::current_num_threads()
    } else {
        1
    };
    let blocks = &blocks;
    // The work is `blocks × chunks` units (one block's products over one chunk of columns),
    // cut into one contiguous run per thread, each thread adding its run into its own `y`.
    // With as many blocks as threads the runs are whole blocks, so each block's tables are
    // built and its `u` applied to the rows by one thread only, where runs of the chunks of
    // every block (the split before) applied every block's `u` on every thread.
    // small-llama decoding, in one process alternately (ten rounds, medians): paper mode
    // k = 4 1091–1154 → 1259–1323 tok/s, k = 16 524–561 → 555–639; 4096² 0.5–4.5 % faster.
    let units = blocks.len() * chunks;
    let parts = threads.min(units);
    let balanced = units.is_multiple_of(parts) || units >= 4 * parts;
    if chunks == 1 && !balanced && threads > 1 && m >= 8 * TILE {
        // One chunk (up to 256 columns) of a few blocks that do not go evenly: the rows are
        // split, each thread building the same small tables. (Splitting the rows also where
        // there are twice as many rows as columns made a lone 1536 × 512 product 2.5 %
        // faster, but small-llama's decoding 1 % slower: its gate and up products run side
        // by side, each thread then building all the tables of its product.)
        let rows = m.div_ceil(threads).next_multiple_of(TILE);
        y.par_chunks_mut(rows)
            .enumerate()
            .for_each(|(t, ys)| run_share(blocks, x, (0, chunks), t * rows, ys, path));
        return;
    }
    if parts <= 1 {
        run_share(blocks, x, (0, chunks), 0, y, path);
        return;
    }
    let at = |i: usize| units * i / parts;
    shares_summed(y, parts, |i, y| {
        run_units(blocks, x, chunks, (at(i), at(i + 1)), y, path);
    });
}

/// Adds the units `a..b` of the products to `y` (all rows): unit `i` is chunk `i % chunks`
/// of block `i / chunks`.
fn run_units(
    blocks: &[LowRankRef<'_>],
    x: &[f32],
    chunks: usize,
    (a, b): (usize, usize),
    y: &mut [f32],
    path: Path,
) {
    let (b0, c0) = (a / chunks, a % chunks);
    let (b1, c1) = (b / chunks, b % chunks);
    if b0 == b1 {
        run_share(&blocks[b0..=b0], x, (c0, c1), 0, y, path);
        return;
    }
    let mut whole = b0;
    if c0 > 0 {
        run_share(&blocks[b0..=b0], x, (c0, chunks), 0, y, path);
        whole += 1;
    }
    if whole < b1 {
        run_share(&blocks[whole..b1], x, (0, chunks), 0, y, path);
    }
    if c1 > 0 {
        run_share(&blocks[b1..=b1], x, (0, c1), 0, y, path);
    }
}

/// Adds the chunks `c0..c1` of every block's product to `y`, which holds the rows
/// `row0..row0 + y.len()`.
fn run_share(
    blocks: &[LowRankRef<'_>],
    x: &[f32],
    (c0, c1): (usize, usize),
    row0: usize,
    y: &mut [f32],
    path: Path,
) {
    with_buffers(|buf| {
        let mut scratch = SweepScratch::default();
        if let Some(b) = blocks.first() {
            prefetch_v(b, (c0, c1));
        }
        for (i, b) in blocks.iter().enumerate() {
            // The next block's `v` comes while this one computes.
            if let Some(next) = blocks.get(i + 1) {
                prefetch_v(next, (c0, c1));
            }
            let k = b.k;
            let count = c1 - c0;
            let Buffers {
                tables,
                scales,
                z,
                acc,
                u,
            } = &mut *buf;
            let tables = sized(tables, count * k * CHUNK_TABLE);
            let scales = sized(scales, count * k);
            let z = sized(z, k * CHUNK_COLS);
            for ((c, t), s) in (c0..c1)
                .zip(tables.chunks_exact_mut(k * CHUNK_TABLE))
                .zip(scales.chunks_exact_mut(k))
            {
                fill_z(b, x, c * CHUNK_COLS, z, path);
                build_tables(z, k, t, s, path);
            }
            let block_rows = (ROW_BLOCK_ACC_BYTES / (4 * k * TILE)).max(1) * TILE;
            for (i, ys) in y.chunks_mut(block_rows).enumerate() {
                let first = row0 + i * block_rows;
                let tiles = ys.len().div_ceil(TILE);
                let acc = sized(acc, tiles * k * TILE);
                if path == Path::Portable {
                    // The vectorized sweeps write their first chunk's sums instead of adding
                    // them (zeroing made 5 % of a 512 × 512 product; small-llama's paper-mode
                    // decoding, in one process alternately: 443 → 482–488 tok/s median).
                    acc.fill(0.0);
                }
                for ((c, t), s) in (c0..c1)
                    .zip(tables.chunks_exact(k * CHUNK_TABLE))
                    .zip(scales.chunks_exact(k))
                {
                    sweep(
                        b,
                        c,
                        (first, ys.len()),
                        (t, s),
                        acc,
                        (path, c == c0),
                        &mut scratch,
                    );
                }
                apply_u(b, first, acc, ys, u, path);
            }
        }
    });
}

/// Asks for the cache lines of `values` to be brought into L2 (a hint: nothing is read, and
/// on other architectures nothing is done).
#[allow(unsafe_code)]
fn prefetch_l2<T>(values: &[T]) {
    #[cfg(target_arch = "x86_64")]
    {
        let start = values.as_ptr().cast::<u8>();
        for offset in (0..std::mem::size_of_val(values)).step_by(64) {
            // SAFETY: a prefetch does not access memory architecturally; the address lies
            // within a live slice.
            unsafe {
                std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T1 }>(
                    start.wrapping_add(offset).cast(),
                );
            }
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = values;
}

/// Prefetches the columns of `v` that a share of block `b` reads (for its tables) into L2.
/// In a decode the factors are cold on every token, and for small matrices their reads were
/// a large part of a product (small-llama paper mode: about 7 % more tokens/s with this and
/// `u` prefetched a few tiles ahead in [`apply_u`]; the signs, prefetched by the sweep,
/// gained nothing from being prefetched here too).
fn prefetch_v(b: &LowRankRef<'_>, (c0, c1): (usize, usize)) {
    let n = b.signs.cols();
    let (col0, col1) = (c0 * CHUNK_COLS, (c1 * CHUNK_COLS).min(n));
    for j in 0..b.k {
        prefetch_l2(&b.v[j * n + col0..j * n + col1]);
    }
}

/// `z_j[i] = v[j, col0 + i] · x[col0 + i]` for the chunk's columns `i`, zero past the last
/// column, stored in slot order (see [`build_tables`]): slot `4h + m` of the 32-column span
/// `p` (floats `CHUNK_COLS·j + 32p + 4(4h + m)..`) holds group `8p + 2m + h`.
#[allow(unsafe_code)]
fn fill_z(b: &LowRankRef<'_>, x: &[f32], col0: usize, z: &mut [f32], path: Path) {
    let n = x.len();
    #[cfg(target_arch = "x86_64")]
    match path {
        Path::Avx512 => {
            // SAFETY: `Path::Avx512` is only chosen where `avx512::available()` said so;
            // `b.v` holds `k × n` values (checked by `check_block`), `z` `k·CHUNK_COLS`,
            // `col0 < n`.
            unsafe { avx512::fill_z(b.v, x, col0, b.k, z) };
            return;
        }
        Path::Avx2 => {
            // SAFETY: as above, with `avx2::available()`.
            unsafe { avx2::fill_z(b.v, x, col0, b.k, z) };
            return;
        }
        Path::Portable => {}
    }
    let _ = path;
    let present = (n - col0).min(CHUNK_COLS);
    for (j, zj) in z.chunks_exact_mut(CHUNK_COLS).enumerate() {
        for (o, slot) in zj.chunks_exact_mut(4).enumerate() {
            let (p, h, m) = (o / 8, (o % 8) / 4, o % 4);
            let g = 8 * p + 2 * m + h;
            for (c, out) in slot.iter_mut().enumerate() {
                let col = 4 * g + c;
                *out = if col < present {
                    b.v[j * n + col0 + col].to_f32() * x[col0 + col]
                } else {
                    0.0
                };
            }
        }
    }
}

/// The sign of column `b` (0 = first) of a group in table entry `e`.
#[inline]
fn sign_in(e: usize, b: usize) -> f32 {
    if e >> (3 - b) & 1 == 1 {
        1.0
    } else {
        -1.0
    }
}

/// The scale of one chunk and rank index: the largest `(|z0| + |z1|) + (|z2| + |z3|)` over
/// its groups, divided by 127 — NaN where a value is not finite (so that the product is).
fn scale_of(zj: &[f32]) -> f32 {
    let mut max = 0.0f32;
    for g in zj.chunks_exact(4) {
        max = max.max((g[0].abs() + g[1].abs()) + (g[2].abs() + g[3].abs()));
    }
    finite_scale(max, zj.iter().all(|v| v.is_finite()))
}

/// `max / 127`, or NaN where a value was not finite.
#[inline]
fn finite_scale(max: f32, finite: bool) -> f32 {
    if finite {
        max / QMAX
    } else {
        f32::NAN
    }
}

/// The quantized entry `round(T[e] · inv)` (ties to even), `inv` = [`inverse`] of the scale.
#[inline]
fn quantize(zg: &[f32], e: usize, inv: f32) -> i8 {
    // The two pairs' sums first, as the vectorized build makes them (each ±z0 ± z1 with
    // each ±z2 ± z3).
    let t = (sign_in(e, 0) * zg[0] + sign_in(e, 1) * zg[1])
        + (sign_in(e, 2) * zg[2] + sign_in(e, 3) * zg[3]);
    // In range by construction (|T| ≤ the largest group sum); the clamp guards the rounding.
    (t * inv).round_ties_even().clamp(-QMAX, QMAX) as i8
}

/// The reciprocal used to quantize with scale `s` (zero for an all-zero chunk).
#[inline]
fn inverse(s: f32) -> f32 {
    if s > 0.0 {
        1.0 / s
    } else {
        0.0
    }
}

/// The tables and scales of one chunk: `tables[(j·QUADS + q)·64 + 16·m + e]` is entry `e`
/// of slot `m` of quad `q` for rank index `j`. Quad `2p` holds the groups of the high
/// halves of the row's sign bytes `4p..4p + 4` (columns `32p + 8m..32p + 8m + 4`), quad `2p +
/// 1` those of the low halves (`32p + 8m + 4..32p + 8m + 8`): a lane of 4 bytes of a row
/// then yields its quads' indices by a shift and a mask.
#[allow(unsafe_code)]
fn build_tables(z: &[f32], k: usize, tables: &mut [u8], scales: &mut [f32], path: Path) {
    // `z` is in slot order already ([`fill_z`]).
    for (j, (zj, s)) in z
        .chunks_exact(CHUNK_COLS)
        .zip(scales.iter_mut())
        .enumerate()
    {
        let tj = &mut tables[j * CHUNK_TABLE..(j + 1) * CHUNK_TABLE];
        #[cfg(target_arch = "x86_64")]
        match path {
            Path::Avx512 => {
                // SAFETY: `Path::Avx512` is only chosen where `avx512::available()` said so;
                // `zj` holds `CHUNK_COLS` values and `tj` `CHUNK_TABLE` bytes.
                *s = unsafe { avx512::build(zj, tj) };
                continue;
            }
            Path::Avx2 => {
                // SAFETY: `Path::Avx2` is only chosen where `avx2::available()` said so; as
                // above.
                *s = unsafe { avx2::build(zj, tj) };
                continue;
            }
            Path::Portable => {}
        }
        let _ = path;
        *s = scale_of(zj);
        let inv = inverse(*s);
        for (zg, tg) in zj.chunks_exact(4).zip(tj.chunks_exact_mut(16)) {
            for (e, t) in tg.iter_mut().enumerate() {
                *t = quantize(zg, e, inv) as u8;
            }
        }
    }
    debug_assert_eq!(z.len(), k * CHUNK_COLS);
}

/// The sign bytes of `rows` rows from `first` in chunk `c`, row `i` at `i·CHUNK_BYTES`
/// (zero past the matrix's rows and columns; columns past the last have zero weight).
fn tile_bytes(s: crate::SignMatrixRef<'_>, c: usize, first: usize, rows: usize, out: &mut [u8]) {
    let groups = s.cols().div_ceil(8);
    let g0 = c * CHUNK_BYTES;
    let g1 = (g0 + CHUNK_BYTES).min(groups);
    out.fill(0);
    let mut shifted = [0u8; CHUNK_BYTES];
    for (i, row) in out.chunks_exact_mut(CHUNK_BYTES).take(rows).enumerate() {
        let bytes = s.row_group_bytes(first + i, g0, g1, &mut shifted);
        row[..bytes.len()].copy_from_slice(bytes);
    }
}

/// Adds chunk `c` of rows `first..first + rows` to their accumulators (`acc[(t·k + j)·16 +
/// lane]` for row `16t + lane` of the block), with the chunk's tables and scales. With
/// `vector`, the vectorized sweep, which where `fresh` (the share's first chunk) writes the
/// accumulators as if they were zero instead of reading them.
#[allow(unsafe_code)]
fn sweep(
    b: &LowRankRef<'_>,
    c: usize,
    (first, rows): (usize, usize),
    (tables, scales): (&[u8], &[f32]),
    acc: &mut [f32],
    (path, fresh): (Path, bool),
    scratch: &mut SweepScratch,
) {
    #[cfg(target_arch = "x86_64")]
    match path {
        Path::Avx512 => {
            sweep_vector(b, c, (first, rows), (tables, scales), acc, fresh, scratch);
            return;
        }
        Path::Avx2 => {
            sweep_avx2(b, c, (first, rows), (tables, scales), acc, fresh, scratch);
            return;
        }
        Path::Portable => {}
    }
    let _ = (path, fresh, scratch);
    let k = b.k;
    let mut bytes = [0u8; TILE * CHUNK_BYTES];
    for (t, tile_acc) in acc.chunks_exact_mut(k * TILE).enumerate() {
        let row = first + t * TILE;
        let tile_rows = (rows - t * TILE).min(TILE);
        tile_bytes(b.signs, c, row, tile_rows, &mut bytes);
        for ((tj, &s), aj) in tables
            .chunks_exact(CHUNK_TABLE)
            .zip(scales)
            .zip(tile_acc.chunks_exact_mut(TILE))
        {
            for (row, a) in bytes.chunks_exact(CHUNK_BYTES).zip(aj.iter_mut()) {
                let mut sum = 0i32;
                for (q, tq) in tj.chunks_exact(QUAD_TABLE).enumerate() {
                    // Quad 2p: the high halves of bytes 4p..4p + 4; quad 2p + 1: the low.
                    let bytes = &row[4 * (q / 2)..4 * (q / 2) + 4];
                    for (m, &byte) in bytes.iter().enumerate() {
                        let e = if q % 2 == 0 { byte >> 4 } else { byte & 15 };
                        sum += i32::from(tq[16 * m + usize::from(e)] as i8);
                    }
                }
                *a = (sum as f32).mul_add(s, *a);
            }
        }
    }
}

/// [`sweep`] with AVX-512, two tiles (32 rows) per step: each step makes the next two
/// tiles' index bytes (their loads then overlap the current lookups) and does the current
/// tiles' lookups, each table register serving both tiles.
#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
fn sweep_vector(
    b: &LowRankRef<'_>,
    c: usize,
    (first, rows): (usize, usize),
    (tables, scales): (&[u8], &[f32]),
    acc: &mut [f32],
    fresh: bool,
    SweepScratch {
        rows: scratch, idx, ..
    }: &mut SweepScratch,
) {
    let k = b.k;
    let n = b.signs.cols();
    // Rows on byte boundaries and a whole chunk: the tiles' bytes are read in place.
    let in_place = n.is_multiple_of(8) && (c + 1) * CHUNK_COLS <= n && n / 8 < 1 << 26;
    let tiles = acc.len() / (k * TILE);
    // Makes the index bytes of the tiles `t..t + STEP_TILES` (those that exist) in `out`.
    let mut prepare_from = |t0: usize, out: &mut [avx512::Indices; STEP_TILES]| {
        for (t, (o, s)) in (t0..tiles).zip(out.iter_mut().zip(scratch.iter_mut())) {
            let tile_rows = rows.saturating_sub(t * TILE).min(TILE);
            let (src, stride) = tile_source(b, c, first + t * TILE, tile_rows, in_place, s);
            // SAFETY: `vector` (the caller's) is only true where `avx512::available()` said
            // so; `src` is as `tile_source` describes.
            unsafe { avx512::prepare(src, stride, o) };
        }
    };
    prepare_from(0, &mut idx[0]);
    for (i, step_acc) in acc.chunks_mut(STEP_TILES * k * TILE).enumerate() {
        let (even, odd) = idx.split_at_mut(1);
        let (cur, next) = if i % 2 == 0 {
            (&even[0], &mut odd[0])
        } else {
            (&odd[0], &mut even[0])
        };
        prepare_from((i + 1) * STEP_TILES, next);
        let live = step_acc.len() / (k * TILE);
        // SAFETY: as above; `cur` holds the index bytes of `live` tiles, `tables` `k`
        // chunk tables, `scales` `k` values and `step_acc` `live·k·16`.
        unsafe { avx512::step(&cur[..live], tables, scales, step_acc, fresh) };
    }
}

/// [`sweep`] with AVX2, one tile (16 rows) at a time: its index bytes made, then its
/// lookups for every rank index.
#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
fn sweep_avx2(
    b: &LowRankRef<'_>,
    c: usize,
    (first, rows): (usize, usize),
    (tables, scales): (&[u8], &[f32]),
    acc: &mut [f32],
    fresh: bool,
    SweepScratch {
        rows: scratch,
        idx2,
        ..
    }: &mut SweepScratch,
) {
    let k = b.k;
    let n = b.signs.cols();
    let in_place = n.is_multiple_of(8) && (c + 1) * CHUNK_COLS <= n && n / 8 < 1 << 26;
    for (t, tile_acc) in acc.chunks_exact_mut(k * TILE).enumerate() {
        let tile_rows = rows.saturating_sub(t * TILE).min(TILE);
        let (src, stride) =
            tile_source(b, c, first + t * TILE, tile_rows, in_place, &mut scratch[0]);
        // SAFETY: `Path::Avx2` is only chosen where `avx2::available()` said so; `src` is as
        // `tile_source` describes; `tables` holds `k` chunk tables, `scales` `k` values and
        // `tile_acc` `k·16`.
        unsafe {
            avx2::prepare(src, stride, idx2);
            avx2::step(idx2, tables, scales, tile_acc, fresh);
        }
    }
}

/// Where a tile's rows are for the vectorized sweep: 16 rows of `CHUNK_BYTES` at a stride,
/// the last row's ending within the slice (a whole chunk of a row of the matrix where
/// `in_place` and the tile is whole, else the scratch they are copied to).
#[cfg(target_arch = "x86_64")]
fn tile_source<'s>(
    b: &LowRankRef<'s>,
    c: usize,
    row: usize,
    tile_rows: usize,
    in_place: bool,
    scratch: &'s mut [u8; TILE * CHUNK_BYTES],
) -> (&'s [u8], usize) {
    let n = b.signs.cols();
    let all = b.signs.as_bytes();
    if in_place && tile_rows == TILE && b.signs.layout() == crate::SignLayout::Strips {
        // The tile's 16 rows of strip `c` are one run of 512 bytes; the run
        // `STRIP_PREFETCH_TILES` tiles on is requested now.
        let at = crate::matrix::strip_offset(b.signs.rows(), row, c * CHUNK_BYTES);
        let ahead = at + STRIP_PREFETCH_TILES * TILE * CHUNK_BYTES;
        if let Some(run) = all.get(ahead..ahead + TILE * CHUNK_BYTES) {
            for line in run.chunks_exact(64) {
                avx512::prefetch(line);
            }
        }
        return (&all[at..], CHUNK_BYTES);
    }
    if in_place && tile_rows == TILE {
        // A tile further on: its rows' bytes are requested now (14336×4096, 4 blocks:
        // 8.2 ms instead of 9.5 without, on an Intel Xeon). A cache line holds two chunks
        // of a row: the sweep of the even chunk brings it, the odd one finds it in L2
        // (prefetching in both cost Zen 5 a tenth).
        if c.is_multiple_of(2) {
            let ahead = (row + PREFETCH_TILES * TILE).min(b.signs.rows() - 1);
            let at = ahead * n / 8 + c * CHUNK_BYTES;
            for i in 0..TILE {
                if let Some(line) = all.get((at + i * n / 8).min(all.len() - 1)..) {
                    avx512::prefetch(line);
                }
            }
        }
        (&all[row * n / 8 + c * CHUNK_BYTES..], n / 8)
    } else {
        tile_bytes(b.signs, c, row, tile_rows, scratch);
        (&scratch[..], CHUNK_BYTES)
    }
}

/// `y[i] += Σ_j u[first + i, j] · acc[row i, j]`, the sum over `j` in order from zero.
#[allow(unsafe_code)]
fn apply_u(
    b: &LowRankRef<'_>,
    first: usize,
    acc: &[f32],
    y: &mut [f32],
    u: &mut Vec<f32>,
    path: Path,
) {
    let k = b.k;
    let u = sized(u, TILE * k);
    for ((t, tile_acc), ys) in acc
        .chunks_exact(k * TILE)
        .enumerate()
        .zip(y.chunks_mut(TILE))
    {
        let row = first + t * TILE;
        let live = ys.len() * k;
        let u_half = &b.u[row * k..row * k + live];
        // The factors of a tile further on (cold in a decode; see `prefetch_v`).
        if let Some(ahead) = b.u.get((row + 4 * TILE) * k..) {
            prefetch_l2(&ahead[..ahead.len().min(TILE * k)]);
        }
        #[cfg(target_arch = "x86_64")]
        match path {
            Path::Avx512 => {
                // SAFETY: as in `build_tables`; `tile_acc` holds `k·16` values, `u_half`
                // `ys.len()·k`, `ys` at most 16.
                unsafe { avx512::apply_tile(tile_acc, u_half, k, ys) };
                continue;
            }
            Path::Avx2 if ys.len() == TILE && k.is_multiple_of(8) => {
                // SAFETY: as above, with `avx2::available()`; a whole tile.
                unsafe { avx2::apply_tile(tile_acc, u_half, k, ys) };
                continue;
            }
            _ => {}
        }
        let _ = path;
        let widened = &mut u[..live];
        widen_into(u_half, widened);
        for (lane, out) in ys.iter_mut().enumerate() {
            let mut sum = 0.0f32;
            for j in 0..k {
                sum = tile_acc[j * TILE + lane].mul_add(widened[lane * k + j], sum);
            }
            *out += sum;
        }
    }
}

/// The rounding bounds of [`matvec_add_q8`], one per row `r`: `Σ_b Σ_j |u_b[r, j]| ·
/// Σ_chunks (groups in the chunk) · s / 2`, with the scales computed as the kernel does
/// (empty without blocks).
///
/// # Panics
/// As [`matvec_add_q8`].
pub(crate) fn error_bounds(blocks: &[LowRankRef<'_>], x: &[f32]) -> Vec<f64> {
    let n = x.len();
    let m = blocks.first().map_or(0, |b| b.signs.rows());
    let mut bounds = vec![0.0f64; m];
    for (i, b) in blocks.iter().enumerate() {
        let k = b.k;
        crate::lowrank::check_block("lowrank_q8_error_bounds", i, b, m, n);
        let mut z = vec![0.0f32; k * CHUNK_COLS];
        let mut per_j = vec![0.0f64; k];
        for c in 0..n.div_ceil(CHUNK_COLS) {
            fill_z(b, x, c * CHUNK_COLS, &mut z, Path::Portable);
            let groups = (n - c * CHUNK_COLS).min(CHUNK_COLS).div_ceil(4);
            for (zj, e) in z.chunks_exact(CHUNK_COLS).zip(per_j.iter_mut()) {
                *e += groups as f64 * f64::from(scale_of(zj)) / 2.0;
            }
        }
        if k == 0 {
            continue;
        }
        for (bound, u) in bounds.iter_mut().zip(b.u.chunks_exact(k)) {
            *bound += per_j
                .iter()
                .zip(u)
                .map(|(e, u)| e * f64::from(u.to_f32()).abs())
                .sum::<f64>();
        }
    }
    bounds
}

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
mod avx512 {
    use std::arch::x86_64::{
        __m512, __m512i, _mm256_loadu_si256, _mm256_maskz_loadu_epi16, _mm512_abs_ps,
        _mm512_add_ps, _mm512_castsi256_si512, _mm512_cmp_ps_mask, _mm512_cvtepi32_ps,
        _mm512_cvtph_ps, _mm512_cvtps_epi32, _mm512_dpbusd_epi32, _mm512_fmadd_ps,
        _mm512_inserti64x4, _mm512_load_si512, _mm512_loadu_ps, _mm512_loadu_si512,
        _mm512_mask_storeu_ps, _mm512_maskz_loadu_ps, _mm512_max_ps, _mm512_mul_ps,
        _mm512_packs_epi16, _mm512_packs_epi32, _mm512_permute_ps, _mm512_permutex2var_epi64,
        _mm512_permutexvar_epi8, _mm512_reduce_max_ps, _mm512_set1_epi32, _mm512_set1_epi8,
        _mm512_set1_ps, _mm512_setr_epi64, _mm512_setr_ps, _mm512_setzero_ps, _mm512_setzero_si512,
        _mm512_shuffle_f32x4, _mm512_srli_epi32, _mm512_store_si512, _mm512_storeu_ps,
        _mm512_storeu_si512, _mm512_sub_ps, _mm512_ternarylogic_epi32, _mm512_unpackhi_epi32,
        _mm512_unpackhi_epi64, _mm512_unpacklo_epi32, _mm512_unpacklo_epi64, _CMP_LT_OQ,
    };

    use super::{CHUNK_BYTES, CHUNK_COLS, CHUNK_TABLE, QUADS, QUAD_TABLE, TILE};
    use crate::lowrank::avx512::transpose16;

    /// AVX-512 F, BW, VL, VBMI and VNNI.
    pub(super) fn available() -> bool {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512vl")
            && std::arch::is_x86_feature_detected!("avx512vbmi")
            && std::arch::is_x86_feature_detected!("avx512vnni")
    }

    /// Asks for the cache line at the start of `bytes` (a hint; nothing is read).
    #[inline(always)]
    pub(super) fn prefetch(bytes: &[u8]) {
        // SAFETY: a prefetch does not access memory architecturally; the pointer is that of
        // a live slice.
        unsafe {
            std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(
                bytes.as_ptr().cast(),
            );
        }
    }

    /// The tables of one chunk and rank index (see [`super::build_tables`]) and its scale,
    /// computed as [`super::scale_of`] and [`super::quantize`] do.
    ///
    /// # Safety
    /// The CPU must have the features of [`available`]; `zj` holds `CHUNK_COLS` values and
    /// `tj` `CHUNK_TABLE` bytes.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vbmi,avx512vnni")]
    pub(super) unsafe fn build(zj: &[f32], tj: &mut [u8]) -> f32 {
        debug_assert!(zj.len() == CHUNK_COLS && tj.len() == CHUNK_TABLE);
        // The scale: per lane, |z| plus its neighbour's, then plus the other pair's: each
        // lane of a group holds `(|z0| + |z1|) + (|z2| + |z3|)` (the same additions).
        let mut max = _mm512_setzero_ps();
        let mut finite: u16 = u16::MAX;
        let inf = _mm512_set1_ps(f32::INFINITY);
        for z16 in zj.chunks_exact(16) {
            // SAFETY: 16 floats (unaligned).
            let a = _mm512_abs_ps(unsafe { _mm512_loadu_ps(z16.as_ptr()) });
            finite &= _mm512_cmp_ps_mask::<_CMP_LT_OQ>(a, inf);
            let pairs = _mm512_add_ps(a, _mm512_permute_ps::<0xB1>(a));
            max = _mm512_max_ps(max, _mm512_add_ps(pairs, _mm512_permute_ps::<0x4E>(pairs)));
        }
        let scale = super::finite_scale(_mm512_reduce_max_ps(max), finite == u16::MAX);
        let inv = _mm512_set1_ps(super::inverse(scale));
        // Per 128-bit lane (one group, `z0..z3`): the 4 sums `±z2 ± z3` of entries `e & 3`
        // = 0..3 and the 4 sums `±z0 ± z1` of `e >> 2`; entries `4i..4i + 4` are the latter's
        // `i`-th plus the former (the signs of `sign_in`: a set bit is `+`). With the
        // entries of `e >> 2` = 0..3 in `q[0..4]`, two 32 → 16-bit and one 16 → 8-bit packs
        // put every lane's 16 entries in order.
        let high = _mm512_setr_ps(
            -1.0, -1.0, 1.0, 1.0, -1.0, -1.0, 1.0, 1.0, -1.0, -1.0, 1.0, 1.0, -1.0, -1.0, 1.0, 1.0,
        );
        let low = _mm512_setr_ps(
            -1.0, 1.0, -1.0, 1.0, -1.0, 1.0, -1.0, 1.0, -1.0, 1.0, -1.0, 1.0, -1.0, 1.0, -1.0, 1.0,
        );
        for (zq, tq) in zj.chunks_exact(16).zip(tj.chunks_exact_mut(64)) {
            // SAFETY: 16 floats (unaligned).
            let z = unsafe { _mm512_loadu_ps(zq.as_ptr()) };
            let (z0, z1) = (_mm512_permute_ps::<0x00>(z), _mm512_permute_ps::<0x55>(z));
            let (z2, z3) = (_mm512_permute_ps::<0xAA>(z), _mm512_permute_ps::<0xFF>(z));
            // ±z2 ± z3: both products exact, one rounding, as in `quantize`.
            let pairs = _mm512_fmadd_ps(z2, high, _mm512_mul_ps(z3, low));
            let (plus, minus) = (_mm512_add_ps(z0, z1), _mm512_sub_ps(z0, z1));
            // `e >> 2` = 0: −z0 − z1; 1: −z0 + z1; 2: z0 − z1; 3: z0 + z1 (negation is exact
            // and rounding symmetric, so `x − y` is `x + (−y)` bit for bit).
            let q = [
                _mm512_sub_ps(pairs, plus),
                _mm512_sub_ps(pairs, minus),
                _mm512_add_ps(pairs, minus),
                _mm512_add_ps(pairs, plus),
            ]
            .map(|t| _mm512_cvtps_epi32(_mm512_mul_ps(t, inv)));
            // In −127..=127 (|T| is at most the largest group sum), so the packs' saturation
            // never acts (a NaN scale gives NaN sums, whatever the entries).
            let bytes = _mm512_packs_epi16(
                _mm512_packs_epi32(q[0], q[1]),
                _mm512_packs_epi32(q[2], q[3]),
            );
            // SAFETY: `tq` holds 64 bytes (unaligned store).
            unsafe { _mm512_storeu_si512(tq.as_mut_ptr().cast(), bytes) };
        }
        scale
    }

    /// [`super::fill_z`]: 16 columns of `v` widened and multiplied by `x` per register, the
    /// groups of each 32-column span put in slot order by two 128-bit lane shuffles.
    ///
    /// # Safety
    /// The CPU must have the features of [`available`]; `v` holds `k × x.len()` values,
    /// `col0 < x.len()`, `z` holds `k·CHUNK_COLS` floats.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vbmi,avx512vnni")]
    pub(super) unsafe fn fill_z(v: &[half::f16], x: &[f32], col0: usize, k: usize, z: &mut [f32]) {
        let n = x.len();
        debug_assert!(v.len() >= k * n && col0 < n && z.len() >= k * CHUNK_COLS);
        let present = (n - col0).min(CHUNK_COLS);
        // Columns `c..c + 16` of `v` row `j` times `x` (zero past the present columns).
        let product = |j: usize, c: usize| -> __m512 {
            let width = present.saturating_sub(c).min(16);
            if width == 0 {
                return _mm512_setzero_ps();
            }
            let keep = (u32::MAX >> (32 - width)) as u16;
            // SAFETY: `width` values at `col0 + c < n` of row `j` of `v` and of `x`; the
            // masked lanes are not read.
            unsafe {
                let h = _mm256_maskz_loadu_epi16(keep, v.as_ptr().add(j * n + col0 + c).cast());
                let xv = _mm512_maskz_loadu_ps(keep, x.as_ptr().add(col0 + c));
                _mm512_mul_ps(_mm512_cvtph_ps(h), xv)
            }
        };
        for (j, zj) in z.chunks_exact_mut(CHUNK_COLS).take(k).enumerate() {
            for (p, span) in zj.chunks_exact_mut(32).enumerate() {
                let (a, b) = (product(j, 32 * p), product(j, 32 * p + 16));
                // Slots 0..4: groups 0, 2, 4, 6 (lanes 0 and 2 of each); 4..8: 1, 3, 5, 7.
                let even = _mm512_shuffle_f32x4::<0b10_00_10_00>(a, b);
                let odd = _mm512_shuffle_f32x4::<0b11_01_11_01>(a, b);
                // SAFETY: `span` holds 32 floats.
                unsafe {
                    _mm512_storeu_ps(span.as_mut_ptr(), even);
                    _mm512_storeu_ps(span.as_mut_ptr().add(16), odd);
                }
            }
        }
    }

    /// A tile's index bytes: for each quad, 16 rows × 4 groups (see [`step`]).
    #[derive(Clone, Copy)]
    #[repr(C, align(64))]
    pub(super) struct Indices([u8; QUADS * 64]);

    impl Default for Indices {
        fn default() -> Self {
            Self([0; QUADS * 64])
        }
    }

    /// Makes a tile's index bytes.
    ///
    /// # Safety
    /// The CPU must have the features of [`available`]; `bytes` holds 16 rows of
    /// `CHUNK_BYTES` at `stride` (`15·stride + CHUNK_BYTES` bytes at least, `stride < 2^26`).
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vbmi,avx512vnni")]
    pub(super) unsafe fn prepare(bytes: &[u8], stride: usize, out: &mut Indices) {
        debug_assert!(bytes.len() >= (TILE - 1) * stride + CHUNK_BYTES && stride < 1 << 26);
        // The rows' bytes as 8 dwords each, transposed into `d[p]`: lane `i` holds dword
        // `p` of row `i` (bytes 4p..4p + 4, i.e. quads 2p and 2p + 1). Rows `a` and `a + 8`
        // share a register (a 256-bit half each), so one 8×8 transpose per half does it.
        // SAFETY: row `i`'s 32 bytes lie within `bytes` (the caller's).
        let z: [__m512i; 8] = std::array::from_fn(|a| unsafe {
            let lo = _mm256_loadu_si256(bytes.as_ptr().add(a * stride).cast());
            let hi = _mm256_loadu_si256(bytes.as_ptr().add((a + 8) * stride).cast());
            _mm512_inserti64x4::<1>(_mm512_castsi256_si512(lo), hi)
        });
        // 4×4 transposes within 128-bit lanes: `u[e]` (rows 0..4) and `u[4 + e]` (rows
        // 4..8) hold, per lane `L`, dword `4L + e` (lanes 2, 3: of rows 8.., dwords 4(L−2)).
        let t: [__m512i; 8] = std::array::from_fn(|i| {
            let (x, y) = (z[2 * (i / 2)], z[2 * (i / 2) + 1]);
            if i % 2 == 0 {
                _mm512_unpacklo_epi32(x, y)
            } else {
                _mm512_unpackhi_epi32(x, y)
            }
        });
        let u: [__m512i; 8] = std::array::from_fn(|i| {
            let (h, e) = (4 * (i / 4), i % 4);
            let (x, y) = (t[h + e / 2], t[h + 2 + e / 2]);
            if e % 2 == 0 {
                _mm512_unpacklo_epi64(x, y)
            } else {
                _mm512_unpackhi_epi64(x, y)
            }
        });
        // Lanes of rows 0..4, 4..8, 8..12, 12..16: dword `e` from lanes 0 and 2, `4 + e`
        // from lanes 1 and 3.
        let first = _mm512_setr_epi64(0, 1, 8, 9, 4, 5, 12, 13);
        let second = _mm512_setr_epi64(2, 3, 10, 11, 6, 7, 14, 15);
        let d: [__m512i; 8] = std::array::from_fn(|p| {
            let (e, pick) = if p < 4 { (p, first) } else { (p - 4, second) };
            _mm512_permutex2var_epi64(u[e], pick, u[4 + e])
        });
        // Quad 2p's groups are the high halves of the row's 4 bytes, quad 2p + 1's the low
        // halves (see [`super::build_tables`]): byte `m` of a lane indexes slot `m` of the
        // quad's tables, so a shift and a mask make the indices, no byte shuffles.
        let low = _mm512_set1_epi8(0x0F);
        let group = _mm512_set1_epi32(0x3020_1000);
        let o = out.0.as_mut_ptr();
        for (p, &d) in d.iter().enumerate() {
            // (half byte & 15) | slot << 4: the `vpermb` index of its group's table.
            let e = _mm512_ternarylogic_epi32::<0xEA>(_mm512_srli_epi32::<4>(d), low, group);
            let f = _mm512_ternarylogic_epi32::<0xEA>(d, low, group);
            // SAFETY: `out` holds `QUADS` registers (aligned).
            unsafe {
                _mm512_store_si512(o.add(128 * p).cast(), e);
                _mm512_store_si512(o.add(128 * p + 64).cast(), f);
            }
        }
    }

    /// The lookups of one or two tiles over a chunk: `acc[(t·k + j)·16 + lane] += s_j · Σ q`
    /// for the 16 rows of tile `t` (see [`super::sweep`]); where `fresh`, `acc` is taken as zero.
    ///
    /// # Safety
    /// The CPU must have the features of [`available`]; `tiles` holds 1 or 2 tiles' index
    /// bytes, `tables` `k` chunk tables, `scales` `k` values, `acc` `tiles.len()·k·16`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vbmi,avx512vnni")]
    pub(super) unsafe fn step(
        tiles: &[Indices],
        tables: &[u8],
        scales: &[f32],
        acc: &mut [f32],
        fresh: bool,
    ) {
        let k = scales.len();
        debug_assert!(
            (1..=2).contains(&tiles.len())
                && tables.len() == k * CHUNK_TABLE
                && acc.len() == tiles.len() * k * TILE
        );
        // Rank indices in runs of 8, then 4, 2, 1: 16 (or fewer) chains of `vpdpbusd` per
        // run, each table register loaded once for both tiles (one load per lookup made
        // Zen 5 run at two thirds of this speed).
        let mut j0 = 0;
        while j0 < k {
            let width = match k - j0 {
                8.. => 8,
                4..=7 => 4,
                2 | 3 => 2,
                _ => 1,
            };
            // SAFETY: the caller's, and `j0 + width <= k`.
            unsafe {
                match (tiles.len(), width) {
                    (2, 8) => run_2x8(tiles, tables, scales, acc, (j0, fresh)),
                    (2, 4) => run::<2, 4>(tiles, tables, scales, acc, (j0, fresh)),
                    (2, 2) => run::<2, 2>(tiles, tables, scales, acc, (j0, fresh)),
                    (2, _) => run::<2, 1>(tiles, tables, scales, acc, (j0, fresh)),
                    (_, 8) => run::<1, 8>(tiles, tables, scales, acc, (j0, fresh)),
                    (_, 4) => run::<1, 4>(tiles, tables, scales, acc, (j0, fresh)),
                    (_, 2) => run::<1, 2>(tiles, tables, scales, acc, (j0, fresh)),
                    (_, _) => run::<1, 1>(tiles, tables, scales, acc, (j0, fresh)),
                }
            }
            j0 += width;
        }
    }

    /// [`run`] for two tiles and eight rank indices (the whole work of `k = 16` in two
    /// runs) written out in assembly: per quad, each of the 8 table registers is loaded once
    /// and looked up for both tiles, into 16 independent sums. (LLVM turned the same loops
    /// in intrinsics into one chain of 16 dependent `vpdpbusd` per sum, with spills: 0.35
    /// instead of 0.19 ns per lookup on Zen 5.)
    ///
    /// # Safety
    /// As [`run`], with `tiles.len() == 2` and `j0 + 8 <= k`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vbmi,avx512vnni")]
    unsafe fn run_2x8(
        tiles: &[Indices],
        tables: &[u8],
        scales: &[f32],
        acc: &mut [f32],
        (j0, fresh): (usize, bool),
    ) {
        let k = scales.len();
        debug_assert!(tiles.len() == 2 && j0 + 8 <= k && tables.len() == k * CHUNK_TABLE);
        let ones = _mm512_set1_epi8(1);
        let mut a = [_mm512_setzero_si512(); 8];
        let mut b = [_mm512_setzero_si512(); 8];
        let (p0, p1) = (tiles[0].0.as_ptr(), tiles[1].0.as_ptr());
        let t0 = tables[j0 * CHUNK_TABLE..].as_ptr();
        for q in 0..QUADS {
            // SAFETY: the index registers of quad `q` (64 aligned bytes at `64·q` of each
            // tile) and the 8 tables' quad `q` (64 bytes at `j·CHUNK_TABLE + 64·q`, `j0 + j <
            // k`) lie within `tiles` and `tables`; the CPU has AVX-512 BW, VBMI and VNNI
            // (the caller's); only registers named here are written.
            unsafe {
                let (_tia, _tib, _ttab, _tr0, _tr1): (__m512i, __m512i, __m512i, __m512i, __m512i);
                std::arch::asm!(
                    "vmovdqa64 {ia:z}, zmmword ptr [{ip0}]",
                    "vmovdqa64 {ib:z}, zmmword ptr [{ip1}]",
                    "vmovdqu64 {tab:z}, zmmword ptr [{tp}]",
                    "vpermb {r0:z}, {ia:z}, {tab:z}",
                    "vpermb {r1:z}, {ib:z}, {tab:z}",
                    "vpdpbusd {a0:z}, {ones:z}, {r0:z}",
                    "vpdpbusd {b0:z}, {ones:z}, {r1:z}",
                    "vmovdqu64 {tab:z}, zmmword ptr [{tp} + 1024]",
                    "vpermb {r0:z}, {ia:z}, {tab:z}",
                    "vpermb {r1:z}, {ib:z}, {tab:z}",
                    "vpdpbusd {a1:z}, {ones:z}, {r0:z}",
                    "vpdpbusd {b1:z}, {ones:z}, {r1:z}",
                    "vmovdqu64 {tab:z}, zmmword ptr [{tp} + 2048]",
                    "vpermb {r0:z}, {ia:z}, {tab:z}",
                    "vpermb {r1:z}, {ib:z}, {tab:z}",
                    "vpdpbusd {a2:z}, {ones:z}, {r0:z}",
                    "vpdpbusd {b2:z}, {ones:z}, {r1:z}",
                    "vmovdqu64 {tab:z}, zmmword ptr [{tp} + 3072]",
                    "vpermb {r0:z}, {ia:z}, {tab:z}",
                    "vpermb {r1:z}, {ib:z}, {tab:z}",
                    "vpdpbusd {a3:z}, {ones:z}, {r0:z}",
                    "vpdpbusd {b3:z}, {ones:z}, {r1:z}",
                    "vmovdqu64 {tab:z}, zmmword ptr [{tp} + 4096]",
                    "vpermb {r0:z}, {ia:z}, {tab:z}",
                    "vpermb {r1:z}, {ib:z}, {tab:z}",
                    "vpdpbusd {a4:z}, {ones:z}, {r0:z}",
                    "vpdpbusd {b4:z}, {ones:z}, {r1:z}",
                    "vmovdqu64 {tab:z}, zmmword ptr [{tp} + 5120]",
                    "vpermb {r0:z}, {ia:z}, {tab:z}",
                    "vpermb {r1:z}, {ib:z}, {tab:z}",
                    "vpdpbusd {a5:z}, {ones:z}, {r0:z}",
                    "vpdpbusd {b5:z}, {ones:z}, {r1:z}",
                    "vmovdqu64 {tab:z}, zmmword ptr [{tp} + 6144]",
                    "vpermb {r0:z}, {ia:z}, {tab:z}",
                    "vpermb {r1:z}, {ib:z}, {tab:z}",
                    "vpdpbusd {a6:z}, {ones:z}, {r0:z}",
                    "vpdpbusd {b6:z}, {ones:z}, {r1:z}",
                    "vmovdqu64 {tab:z}, zmmword ptr [{tp} + 7168]",
                    "vpermb {r0:z}, {ia:z}, {tab:z}",
                    "vpermb {r1:z}, {ib:z}, {tab:z}",
                    "vpdpbusd {a7:z}, {ones:z}, {r0:z}",
                    "vpdpbusd {b7:z}, {ones:z}, {r1:z}",
                    ip0 = in(reg) p0.add(64 * q),
                    ip1 = in(reg) p1.add(64 * q),
                    tp = in(reg) t0.add(q * QUAD_TABLE),
                    ones = in(zmm_reg) ones,
                    ia = out(zmm_reg) _tia,
                    ib = out(zmm_reg) _tib,
                    tab = out(zmm_reg) _ttab,
                    r0 = out(zmm_reg) _tr0,
                    r1 = out(zmm_reg) _tr1,
                    a0 = inout(zmm_reg) a[0],
                    a1 = inout(zmm_reg) a[1],
                    a2 = inout(zmm_reg) a[2],
                    a3 = inout(zmm_reg) a[3],
                    a4 = inout(zmm_reg) a[4],
                    a5 = inout(zmm_reg) a[5],
                    a6 = inout(zmm_reg) a[6],
                    a7 = inout(zmm_reg) a[7],
                    b0 = inout(zmm_reg) b[0],
                    b1 = inout(zmm_reg) b[1],
                    b2 = inout(zmm_reg) b[2],
                    b3 = inout(zmm_reg) b[3],
                    b4 = inout(zmm_reg) b[4],
                    b5 = inout(zmm_reg) b[5],
                    b6 = inout(zmm_reg) b[6],
                    b7 = inout(zmm_reg) b[7],
                    options(nostack, readonly, preserves_flags),
                );
            }
        }
        let sums: [[__m512i; 2]; 8] = std::array::from_fn(|j| [a[j], b[j]]);
        // SAFETY: the caller's.
        unsafe { add_sums(&sums, scales, acc, (j0, fresh)) };
    }

    /// The lookups of `T` tiles for the rank indices `j0..j0 + J` over a chunk (see
    /// [`step`]).
    ///
    /// # Safety
    /// As [`step`], with `tiles.len() == T` and `j0 + J <= k`.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vbmi,avx512vnni")]
    unsafe fn run<const T: usize, const J: usize>(
        tiles: &[Indices],
        tables: &[u8],
        scales: &[f32],
        acc: &mut [f32],
        (j0, fresh): (usize, bool),
    ) {
        let k = scales.len();
        debug_assert!(tiles.len() == T && j0 + J <= k && tables.len() == k * CHUNK_TABLE);
        let ones = _mm512_set1_epi8(1);
        let t0 = tables[j0 * CHUNK_TABLE..].as_ptr();
        let bases: [*const u8; T] = std::array::from_fn(|t| tiles[t].0.as_ptr());
        // `sums[j][t]`: rank index `j0 + j`, tile `t`.
        let mut sums = [[_mm512_setzero_si512(); T]; J];
        for q in 0..QUADS {
            // SAFETY: each tile holds `QUADS` registers (aligned).
            let ix: [__m512i; T] =
                std::array::from_fn(|t| unsafe { _mm512_load_si512(bases[t].add(64 * q).cast()) });
            for (j, sums_j) in sums.iter_mut().enumerate() {
                // SAFETY: quad `q` of table `j0 + j < k` lies within `tables`.
                let a =
                    unsafe { _mm512_loadu_si512(t0.add(j * CHUNK_TABLE + q * QUAD_TABLE).cast()) };
                for (sum, &ix) in sums_j.iter_mut().zip(&ix) {
                    *sum = _mm512_dpbusd_epi32(*sum, ones, _mm512_permutexvar_epi8(ix, a));
                }
            }
        }
        // SAFETY: the caller's.
        unsafe { add_sums(&sums, scales, acc, (j0, fresh)) };
    }

    /// `acc[(t·k + j0 + j)·16..][..16] += s_{j0 + j} · sums[j][t]` (see [`accumulate`] for
    /// `fresh`).
    ///
    /// # Safety
    /// The CPU must have the features of [`available`]; `acc` holds `T·k·16` floats, `k =
    /// scales.len() >= j0 + J`.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vbmi,avx512vnni")]
    unsafe fn add_sums<const T: usize, const J: usize>(
        sums: &[[__m512i; T]; J],
        scales: &[f32],
        acc: &mut [f32],
        (j0, fresh): (usize, bool),
    ) {
        let k = scales.len();
        for (j, sums_j) in sums.iter().enumerate() {
            for (t, &sum) in sums_j.iter().enumerate() {
                // SAFETY: `acc` holds 16 floats at `(t·k + j0 + j)·16`.
                unsafe {
                    accumulate(
                        &mut acc[(t * k + j0 + j) * TILE..],
                        sum,
                        scales[j0 + j],
                        fresh,
                    )
                };
            }
        }
    }

    /// `acc[..16] += s · sum` (the integer sums converted exactly: at most 64·127 each); where
    /// `fresh`, `acc` is taken as zero (not read).
    ///
    /// # Safety
    /// The CPU must have the features of [`available`]; `acc` holds 16 floats at least.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vbmi,avx512vnni")]
    unsafe fn accumulate(acc: &mut [f32], sum: __m512i, s: f32, fresh: bool) {
        debug_assert!(acc.len() >= TILE);
        let a = acc.as_mut_ptr();
        // SAFETY: 16 floats (unaligned).
        unsafe {
            // `fresh`: the accumulators' first chunk, added to zero (the same rounding as
            // the portable sweep's zeroed accumulators).
            let old = if fresh {
                _mm512_setzero_ps()
            } else {
                _mm512_loadu_ps(a)
            };
            let next = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), _mm512_set1_ps(s), old);
            _mm512_storeu_ps(a, next);
        }
    }

    /// `y[lane] += Σ_j acc[j·16 + lane] · u[lane·k + j]` for the tile's rows (`y.len() ≤
    /// 16`; `u` their `y.len()·k` factors), as [`super::apply_u`] does: 16 columns of `u` at
    /// a time widened and transposed in registers.
    ///
    /// # Safety
    /// The CPU must have the features of [`available`]; `acc` holds `k·16` values, `u`
    /// `y.len()·k`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vbmi,avx512vnni")]
    pub(super) unsafe fn apply_tile(acc: &[f32], u: &[half::f16], k: usize, y: &mut [f32]) {
        debug_assert!(acc.len() == k * TILE && u.len() == y.len() * k && y.len() <= TILE);
        let mut sum = _mm512_setzero_ps();
        for j0 in (0..k).step_by(16) {
            let width = (k - j0).min(16);
            let keep = (u32::MAX >> (32 - width)) as u16;
            // Row `i`'s factors `j0..j0 + width` (zero for the rows past `y.len()`).
            let rows: [__m512; 16] = std::array::from_fn(|i| {
                if i < y.len() {
                    // SAFETY: `width` halves at `i·k + j0 < y.len()·k` lie within `u`.
                    let h = unsafe {
                        _mm256_maskz_loadu_epi16(keep, u.as_ptr().add(i * k + j0).cast())
                    };
                    _mm512_cvtph_ps(h)
                } else {
                    _mm512_setzero_ps()
                }
            });
            let columns = transpose16(&rows);
            for (j, column) in columns.iter().enumerate().take(width) {
                // SAFETY: 16 floats at `(j0 + j)·16 < k·16`.
                let a = unsafe { _mm512_loadu_ps(acc.as_ptr().add((j0 + j) * TILE)) };
                sum = _mm512_fmadd_ps(a, *column, sum);
            }
        }
        let keep: u16 = if y.len() == TILE {
            u16::MAX
        } else {
            (1u16 << y.len()) - 1
        };
        // SAFETY: the masked lanes are the first `y.len()` floats of `y`.
        unsafe {
            let old = _mm512_maskz_loadu_ps(keep, y.as_ptr());
            _mm512_mask_storeu_ps(y.as_mut_ptr(), keep, _mm512_add_ps(old, sum));
        }
    }
}

/// The AVX2 version (CPUs without AVX-512 VBMI and VNNI): the same tables, entries and
/// integer sums as the portable version (so the same products, bit for bit, on one thread).
/// One `vpshufb` looks up 32 entries: 16 rows × 2 groups, each 128-bit lane holding one
/// group's 16-entry table and the 16 rows' half bytes; two `vpmaddubsw` against `1, 0, …`
/// and `0, 1, …` take the even and the odd rows' entries into 16-bit sums (at most 32 × 127
/// per lane and chunk), the lanes are added and the sums widened once per chunk.
#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
mod avx2 {
    use std::arch::x86_64::{
        __m256, __m256i, _mm256_add_epi16, _mm256_add_ps, _mm256_and_ps, _mm256_and_si256,
        _mm256_castps256_ps128, _mm256_castsi256_ps, _mm256_castsi256_si128, _mm256_cmp_ps,
        _mm256_cvtepi16_epi32, _mm256_cvtepi32_ps, _mm256_cvtph_ps, _mm256_cvtps_epi32,
        _mm256_extractf128_ps, _mm256_extracti128_si256, _mm256_fmadd_ps, _mm256_load_si256,
        _mm256_loadu_ps, _mm256_loadu_si256, _mm256_maddubs_epi16, _mm256_max_ps,
        _mm256_movemask_ps, _mm256_mul_ps, _mm256_packs_epi16, _mm256_packs_epi32,
        _mm256_permute2f128_ps, _mm256_permute2x128_si256, _mm256_permute_ps, _mm256_set1_epi16,
        _mm256_set1_epi32, _mm256_set1_epi8, _mm256_set1_ps, _mm256_setr_ps, _mm256_setzero_ps,
        _mm256_setzero_si256, _mm256_shuffle_epi8, _mm256_shuffle_ps, _mm256_srli_epi16,
        _mm256_store_si256, _mm256_storeu_ps, _mm256_storeu_si256, _mm256_sub_ps,
        _mm256_unpackhi_epi16, _mm256_unpackhi_epi32, _mm256_unpackhi_epi64, _mm256_unpackhi_epi8,
        _mm256_unpackhi_ps, _mm256_unpacklo_epi16, _mm256_unpacklo_epi32, _mm256_unpacklo_epi64,
        _mm256_unpacklo_epi8, _mm256_unpacklo_ps, _mm_add_epi16, _mm_cvtss_f32, _mm_loadu_si128,
        _mm_max_ps, _mm_max_ss, _mm_movehl_ps, _mm_shuffle_ps, _mm_unpackhi_epi16,
        _mm_unpacklo_epi16, _CMP_LT_OQ,
    };

    use super::{CHUNK_BYTES, CHUNK_COLS, CHUNK_TABLE, QUADS, TILE};

    /// AVX2, FMA and F16C.
    pub(super) fn available() -> bool {
        std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
            && std::arch::is_x86_feature_detected!("f16c")
    }

    /// [`super::fill_z`]: 8 columns of `v` widened and multiplied by `x` per register, the
    /// groups of each 32-column span put in slot order by 128-bit lane shuffles.
    ///
    /// # Safety
    /// The CPU must have the features of [`available`]; `v` holds `k × x.len()` values,
    /// `col0 < x.len()`, `z` holds `k·CHUNK_COLS` floats.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn fill_z(v: &[half::f16], x: &[f32], col0: usize, k: usize, z: &mut [f32]) {
        let n = x.len();
        debug_assert!(v.len() >= k * n && col0 < n && z.len() >= k * CHUNK_COLS);
        let present = (n - col0).min(CHUNK_COLS);
        // Columns `c..c + 8` of `v` row `j` times `x` (zero past the present columns).
        let product = |j: usize, c: usize| -> __m256 {
            let width = present.saturating_sub(c).min(8);
            let (at, xat) = (j * n + col0 + c, col0 + c);
            if width == 0 {
                _mm256_setzero_ps()
            } else if width == 8 {
                // SAFETY: 8 values at `col0 + c + 8 <= n` of row `j` of `v` and of `x`.
                unsafe {
                    let h = _mm_loadu_si128(v.as_ptr().add(at).cast());
                    _mm256_mul_ps(_mm256_cvtph_ps(h), _mm256_loadu_ps(x.as_ptr().add(xat)))
                }
            } else {
                let (mut h, mut xs) = ([half::f16::ZERO; 8], [0.0f32; 8]);
                h[..width].copy_from_slice(&v[at..at + width]);
                xs[..width].copy_from_slice(&x[xat..xat + width]);
                // SAFETY: 8 values in each local array.
                unsafe {
                    let h = _mm_loadu_si128(h.as_ptr().cast());
                    _mm256_mul_ps(_mm256_cvtph_ps(h), _mm256_loadu_ps(xs.as_ptr()))
                }
            }
        };
        for (j, zj) in z.chunks_exact_mut(CHUNK_COLS).take(k).enumerate() {
            for (p, span) in zj.chunks_exact_mut(32).enumerate() {
                // Groups 0..8 of the span, two per register; slots 0..8 hold groups 0, 2,
                // 4, 6, 1, 3, 5, 7.
                let [a, b, c, d] = [0, 8, 16, 24].map(|o| product(j, 32 * p + o));
                let slots = [
                    _mm256_permute2f128_ps::<0x20>(a, b),
                    _mm256_permute2f128_ps::<0x20>(c, d),
                    _mm256_permute2f128_ps::<0x31>(a, b),
                    _mm256_permute2f128_ps::<0x31>(c, d),
                ];
                for (i, slot) in slots.into_iter().enumerate() {
                    // SAFETY: `span` holds 32 floats.
                    unsafe { _mm256_storeu_ps(span.as_mut_ptr().add(8 * i), slot) };
                }
            }
        }
    }

    /// `y[lane] += Σ_j acc[j·16 + lane] · u[lane·k + j]` for a whole tile, as
    /// [`super::apply_u`] does (the same multiply-adds in the same order): 8 rows and 8
    /// columns of `u` at a time widened and transposed in registers.
    ///
    /// # Safety
    /// The CPU must have the features of [`available`]; `acc` holds `k·16` values, `u`
    /// `16·k`, `y` 16; `k` is a multiple of 8.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn apply_tile(acc: &[f32], u: &[half::f16], k: usize, y: &mut [f32]) {
        debug_assert!(
            acc.len() == k * TILE && u.len() == TILE * k && y.len() == TILE && k.is_multiple_of(8)
        );
        for half in 0..2 {
            let mut sum = _mm256_setzero_ps();
            for j0 in (0..k).step_by(8) {
                // SAFETY: row `8·half + i`'s factors `j0..j0 + 8` lie within `u`.
                let r: [__m256; 8] = std::array::from_fn(|i| unsafe {
                    _mm256_cvtph_ps(_mm_loadu_si128(
                        u.as_ptr().add((8 * half + i) * k + j0).cast(),
                    ))
                });
                let t: [__m256; 8] = std::array::from_fn(|i| {
                    let (a, b) = (r[i & !1], r[i | 1]);
                    if i % 2 == 0 {
                        _mm256_unpacklo_ps(a, b)
                    } else {
                        _mm256_unpackhi_ps(a, b)
                    }
                });
                let q: [__m256; 8] = std::array::from_fn(|i| {
                    let (blk, e) = (i / 4, i % 4);
                    let (a, b) = (t[4 * blk + e / 2], t[4 * blk + 2 + e / 2]);
                    if e % 2 == 0 {
                        _mm256_shuffle_ps::<0x44>(a, b)
                    } else {
                        _mm256_shuffle_ps::<0xEE>(a, b)
                    }
                });
                // Column `j0 + c` of the 8 rows.
                let columns: [__m256; 8] = std::array::from_fn(|c| {
                    if c < 4 {
                        _mm256_permute2f128_ps::<0x20>(q[c], q[4 + c])
                    } else {
                        _mm256_permute2f128_ps::<0x31>(q[c - 4], q[c])
                    }
                });
                for (c, column) in columns.iter().enumerate() {
                    // SAFETY: 8 floats at `(j0 + c)·16 + 8·half < k·16`.
                    let a =
                        unsafe { _mm256_loadu_ps(acc.as_ptr().add((j0 + c) * TILE + 8 * half)) };
                    sum = _mm256_fmadd_ps(a, *column, sum);
                }
            }
            // SAFETY: 8 floats at `8·half` of `y`.
            unsafe {
                let out = y.as_mut_ptr().add(8 * half);
                _mm256_storeu_ps(out, _mm256_add_ps(_mm256_loadu_ps(out), sum));
            }
        }
    }

    /// A tile's index bytes: for quad `q` and slot pair `h`, the 32 bytes at `32·(2q + h)`:
    /// lane 0 the 16 rows' half bytes of slot `2h`, lane 1 those of slot `2h + 1` (the
    /// tables of those two slots are the 32 bytes at `64q + 32h` of a chunk table).
    #[derive(Clone, Copy)]
    #[repr(C, align(32))]
    pub(super) struct Indices([u8; QUADS * 64]);

    impl Default for Indices {
        fn default() -> Self {
            Self([0; QUADS * 64])
        }
    }

    /// The tables of one chunk and rank index and its scale, as [`super::scale_of`] and
    /// [`super::quantize`] (and the AVX-512 version) make them: two groups per register.
    ///
    /// # Safety
    /// The CPU must have the features of [`available`]; `zj` holds `CHUNK_COLS` values and
    /// `tj` `CHUNK_TABLE` bytes.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn build(zj: &[f32], tj: &mut [u8]) -> f32 {
        debug_assert!(zj.len() == CHUNK_COLS && tj.len() == CHUNK_TABLE);
        let magnitude = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFF_FFFF));
        let inf = _mm256_set1_ps(f32::INFINITY);
        let mut max = _mm256_setzero_ps();
        let mut finite = 0xFF;
        for z8 in zj.chunks_exact(8) {
            // SAFETY: 8 floats (unaligned).
            let a = _mm256_and_ps(unsafe { _mm256_loadu_ps(z8.as_ptr()) }, magnitude);
            finite &= _mm256_movemask_ps(_mm256_cmp_ps::<_CMP_LT_OQ>(a, inf));
            let pairs = _mm256_add_ps(a, _mm256_permute_ps::<0xB1>(a));
            max = _mm256_max_ps(max, _mm256_add_ps(pairs, _mm256_permute_ps::<0x4E>(pairs)));
        }
        let half = _mm_max_ps(_mm256_castps256_ps128(max), _mm256_extractf128_ps::<1>(max));
        let pair = _mm_max_ps(half, _mm_movehl_ps(half, half));
        let largest = _mm_cvtss_f32(_mm_max_ss(pair, _mm_shuffle_ps::<0x55>(pair, pair)));
        let scale = super::finite_scale(largest, finite == 0xFF);
        let inv = _mm256_set1_ps(super::inverse(scale));
        // As the AVX-512 build, per 128-bit lane (one group).
        let high = _mm256_setr_ps(-1.0, -1.0, 1.0, 1.0, -1.0, -1.0, 1.0, 1.0);
        let low = _mm256_setr_ps(-1.0, 1.0, -1.0, 1.0, -1.0, 1.0, -1.0, 1.0);
        for (z8, t32) in zj.chunks_exact(8).zip(tj.chunks_exact_mut(32)) {
            // SAFETY: 8 floats (unaligned).
            let z = unsafe { _mm256_loadu_ps(z8.as_ptr()) };
            let (z0, z1) = (_mm256_permute_ps::<0x00>(z), _mm256_permute_ps::<0x55>(z));
            let (z2, z3) = (_mm256_permute_ps::<0xAA>(z), _mm256_permute_ps::<0xFF>(z));
            let pairs = _mm256_fmadd_ps(z2, high, _mm256_mul_ps(z3, low));
            let (plus, minus) = (_mm256_add_ps(z0, z1), _mm256_sub_ps(z0, z1));
            let q = [
                _mm256_sub_ps(pairs, plus),
                _mm256_sub_ps(pairs, minus),
                _mm256_add_ps(pairs, minus),
                _mm256_add_ps(pairs, plus),
            ]
            .map(|t| _mm256_cvtps_epi32(_mm256_mul_ps(t, inv)));
            let bytes = _mm256_packs_epi16(
                _mm256_packs_epi32(q[0], q[1]),
                _mm256_packs_epi32(q[2], q[3]),
            );
            // SAFETY: `t32` holds 32 bytes (unaligned store).
            unsafe { _mm256_storeu_si256(t32.as_mut_ptr().cast(), bytes) };
        }
        scale
    }

    /// Makes a tile's index bytes: the 16 rows' 32 bytes transposed (both 128-bit lanes at
    /// once: four rounds of unpacks give byte `i` of the 16 rows in lane 0 of `w[i]` and
    /// byte `16 + i` in lane 1), then split into half bytes.
    ///
    /// # Safety
    /// The CPU must have the features of [`available`]; `bytes` holds 16 rows of
    /// `CHUNK_BYTES` at `stride` (`15·stride + CHUNK_BYTES` bytes at least).
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn prepare(bytes: &[u8], stride: usize, out: &mut Indices) {
        debug_assert!(bytes.len() >= (TILE - 1) * stride + CHUNK_BYTES);
        // SAFETY: row `r`'s 32 bytes lie within `bytes` (the caller's).
        let x: [__m256i; 16] = std::array::from_fn(|r| unsafe {
            _mm256_loadu_si256(bytes.as_ptr().add(r * stride).cast())
        });
        let t: [__m256i; 16] = std::array::from_fn(|i| {
            let (a, b) = (x[i & !1], x[i | 1]);
            if i % 2 == 0 {
                _mm256_unpacklo_epi8(a, b)
            } else {
                _mm256_unpackhi_epi8(a, b)
            }
        });
        let u: [__m256i; 16] = std::array::from_fn(|i| {
            let (a, b) = (
                t[4 * (i / 4) + (i % 4) / 2],
                t[4 * (i / 4) + 2 + (i % 4) / 2],
            );
            if i % 2 == 0 {
                _mm256_unpacklo_epi16(a, b)
            } else {
                _mm256_unpackhi_epi16(a, b)
            }
        });
        let v: [__m256i; 16] = std::array::from_fn(|i| {
            let (a, b) = (
                u[8 * (i / 8) + (i % 8) / 2],
                u[8 * (i / 8) + 4 + (i % 8) / 2],
            );
            if i % 2 == 0 {
                _mm256_unpacklo_epi32(a, b)
            } else {
                _mm256_unpackhi_epi32(a, b)
            }
        });
        let w: [__m256i; 16] = std::array::from_fn(|i| {
            let (a, b) = (v[i / 2], v[8 + i / 2]);
            if i % 2 == 0 {
                _mm256_unpacklo_epi64(a, b)
            } else {
                _mm256_unpackhi_epi64(a, b)
            }
        });
        let low = _mm256_set1_epi8(0x0F);
        let o = out.0.as_mut_ptr();
        for p in 0..CHUNK_BYTES / 4 {
            for h in 0..2 {
                // Bytes `b` and `b + 1` of the 16 rows, one per lane (both in one half).
                let b = 4 * p + 2 * h;
                let pair = if b < 16 {
                    _mm256_permute2x128_si256::<0x20>(w[b], w[b + 1])
                } else {
                    _mm256_permute2x128_si256::<0x31>(w[b - 16], w[b - 15])
                };
                // Quad 2p: the high halves; quad 2p + 1: the low.
                let high = _mm256_and_si256(_mm256_srli_epi16::<4>(pair), low);
                let lowq = _mm256_and_si256(pair, low);
                // SAFETY: `out` holds `QUADS · 2` registers (aligned).
                unsafe {
                    _mm256_store_si256(o.add(32 * (2 * (2 * p) + h)).cast(), high);
                    _mm256_store_si256(o.add(32 * (2 * (2 * p + 1) + h)).cast(), lowq);
                }
            }
        }
    }

    /// The lookups of one tile over a chunk: `acc[j·16 + lane] += s_j · Σ q` for its 16 rows
    /// (taken as zero where `fresh`).
    ///
    /// # Safety
    /// The CPU must have the features of [`available`]; `tables` holds `k` chunk tables,
    /// `scales` `k` values, `acc` `k·16`.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn step(
        idx: &Indices,
        tables: &[u8],
        scales: &[f32],
        acc: &mut [f32],
        fresh: bool,
    ) {
        let k = scales.len();
        debug_assert!(tables.len() == k * CHUNK_TABLE && acc.len() == k * TILE);
        let mut j0 = 0;
        while j0 < k {
            // SAFETY: the caller's, and `j0 + width <= k`.
            unsafe {
                match k - j0 {
                    4.. => run::<4>(idx, tables, scales, acc, (j0, fresh)),
                    2 | 3 => run::<2>(idx, tables, scales, acc, (j0, fresh)),
                    _ => run::<1>(idx, tables, scales, acc, (j0, fresh)),
                }
            }
            j0 += match k - j0 {
                4.. => 4,
                2 | 3 => 2,
                _ => 1,
            };
        }
    }

    /// [`step`] for the rank indices `j0..j0 + J`.
    ///
    /// # Safety
    /// As [`step`], with `j0 + J <= k`.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn run<const J: usize>(
        idx: &Indices,
        tables: &[u8],
        scales: &[f32],
        acc: &mut [f32],
        (j0, fresh): (usize, bool),
    ) {
        let k = scales.len();
        debug_assert!(j0 + J <= k && tables.len() == k * CHUNK_TABLE);
        // Bytes 1, 0, 1, 0, … and 0, 1, 0, 1, …: `vpmaddubsw` then takes the even and the
        // odd rows' entries (signed) into 16-bit lanes.
        let (even, odd) = (_mm256_set1_epi16(0x0001), _mm256_set1_epi16(0x0100));
        let mut e = [_mm256_setzero_si256(); J];
        let mut o = [_mm256_setzero_si256(); J];
        let base = tables[j0 * CHUNK_TABLE..].as_ptr();
        for y in 0..QUADS * 2 {
            // SAFETY: register `y` of the tile's indices (aligned); the 32 table bytes of
            // quad `y / 2`, slots `2(y % 2)..`, at `32y` of each of the `J` tables.
            unsafe {
                let ix = _mm256_load_si256(idx.0.as_ptr().add(32 * y).cast());
                for j in 0..J {
                    let tab = _mm256_loadu_si256(base.add(j * CHUNK_TABLE + 32 * y).cast());
                    let l = _mm256_shuffle_epi8(tab, ix);
                    e[j] = _mm256_add_epi16(e[j], _mm256_maddubs_epi16(even, l));
                    o[j] = _mm256_add_epi16(o[j], _mm256_maddubs_epi16(odd, l));
                }
            }
        }
        for j in 0..J {
            // The two slots' lanes added: rows 0, 2, …, 14 and 1, 3, …, 15 (at most 64 × 127).
            let es = _mm_add_epi16(
                _mm256_castsi256_si128(e[j]),
                _mm256_extracti128_si256::<1>(e[j]),
            );
            let os = _mm_add_epi16(
                _mm256_castsi256_si128(o[j]),
                _mm256_extracti128_si256::<1>(o[j]),
            );
            let rows = [_mm_unpacklo_epi16(es, os), _mm_unpackhi_epi16(es, os)];
            let s = _mm256_set1_ps(scales[j0 + j]);
            for (half, r) in rows.into_iter().enumerate() {
                let sum = _mm256_cvtepi32_ps(_mm256_cvtepi16_epi32(r));
                // SAFETY: 8 floats at `(j0 + j)·16 + 8·half < k·16` (unaligned).
                unsafe {
                    let a = acc.as_mut_ptr().add((j0 + j) * TILE + 8 * half);
                    let old = if fresh {
                        _mm256_setzero_ps()
                    } else {
                        _mm256_loadu_ps(a)
                    };
                    _mm256_storeu_ps(a, _mm256_fmadd_ps(sum, s, old));
                }
            }
        }
    }
}
