//! Lookup-table kernels for `y = S z` and `Y = S Z`.
//!
//! For each group of 8 columns `8g..8g+8` a table of 256 entries holds, for every possible
//! packed byte `b`, the signed partial sum `Σ_j (±1 from bit 7-j of b) · z[8g + j]` (a `k`-vector
//! for `S Z`). A packed row then costs one table read (and add) per byte instead of 8 signed
//! adds. This is `S z = 2·B z − (Σ z)·1` applied group by group, which keeps the cancellation
//! local to each group. Columns past `cols` (the last, partial group) get weight zero, so the
//! bits of the next row that share that byte are ignored.
//!
//! Tables are built for a bounded range of column groups at a time (about 1 MiB for the
//! matvec, 512 KiB for the matmul), and within a range the rows are swept in blocks, one
//! cache-sized tile of tables at a time. Row blocks run on rayon's pool when the problem is
//! large and [`Parallelism::Auto`] is chosen.

use rayon::prelude::{
    IndexedParallelIterator, IntoParallelIterator, IntoParallelRefMutIterator, ParallelIterator,
    ParallelSliceMut,
};

use crate::{Parallelism, SignMatrixRef};

/// Column groups whose matvec tables are built at once (1 KiB each).
const MATVEC_RANGE_GROUPS: usize = 1024;
/// Column groups per row sweep in the matvec: 32 KiB of tables, about an L1 cache.
const MATVEC_TILE_GROUPS: usize = 32;
/// Rows per block in the matvec.
const MATVEC_ROW_BLOCK: usize = 256;
/// Bytes of matmul tables built at once.
const MATMUL_RANGE_BYTES: usize = 512 << 10;
/// Bytes of matmul tables per row sweep.
const MATMUL_TILE_BYTES: usize = 256 << 10;
/// Rows per block in the matmul.
const MATMUL_ROW_BLOCK: usize = 64;
/// Below this many multiply-adds (`m·n·k`) the kernels stay on the calling thread.
const PARALLEL_MIN_WORK: usize = 1 << 20;

/// Runs `f` with this thread's scratch memory in `key`, kept between calls (no page faults on
/// every product); fresh scratch if it is in use further up the stack.
pub(crate) fn with_scratch<T: Default + 'static, R>(
    key: &'static std::thread::LocalKey<std::cell::RefCell<T>>,
    f: impl FnOnce(&mut T) -> R,
) -> R {
    key.with(|cell| match cell.try_borrow_mut() {
        Ok(mut scratch) => f(&mut scratch),
        Err(_) => f(&mut T::default()),
    })
}

/// The first `len` values of `v`, grown (with defaults) if needed; contents are unspecified.
pub(crate) fn sized<T: Default + Clone>(v: &mut Vec<T>, len: usize) -> &mut [T] {
    if v.len() < len {
        v.resize(len, T::default());
    }
    &mut v[..len]
}

/// `len` floats of `v` starting on a 64-byte boundary (a cache line: every table entry and
/// accumulator row of the AVX-512 kernel is then one whole line, never split across two);
/// contents are unspecified.
pub(crate) fn sized_aligned(v: &mut Vec<f32>, len: usize) -> &mut [f32] {
    if v.len() < len + LINE_FLOATS {
        v.resize(len + LINE_FLOATS, 0.0);
    }
    let at = line_offset(v);
    &mut v[at..at + len]
}

/// Floats per 64-byte cache line.
const LINE_FLOATS: usize = 64 / std::mem::size_of::<f32>();

/// Where the first 64-byte boundary of `v` is (at most one line in).
pub(crate) fn line_offset(v: &[f32]) -> usize {
    v.as_ptr().align_offset(64).min(LINE_FLOATS).min(v.len())
}

/// Runs `share(i, y_i)` for `i` in `0..parts` on the rayon pool: share 0 adds into `y`
/// itself, the others into zeroed vectors of `y.len()` that are then added to `y` in order
/// of `i` (the decode kernels' splits of one product over threads).
pub(crate) fn shares_summed<F>(y: &mut [f32], parts: usize, share: F)
where
    F: Fn(usize, &mut [f32]) + Sync,
{
    let m = y.len();
    let share = &share;
    let (_, partials) = rayon::join(
        || share(0, y),
        || {
            (1..parts)
                .into_par_iter()
                .map(|i| {
                    let mut part = vec![0.0f32; m];
                    share(i, &mut part);
                    part
                })
                .collect::<Vec<_>>()
        },
    );
    for part in partials {
        y.iter_mut().zip(&part).for_each(|(a, &b)| *a += b);
    }
}

pub(crate) fn use_parallel(par: Parallelism, work: usize) -> bool {
    match par {
        Parallelism::Sequential => false,
        Parallelism::Auto => work >= PARALLEL_MIN_WORK && rayon::current_num_threads() > 1,
    }
}

/// Rows per block: `max_rows`, or fewer so that every thread gets a few blocks.
fn rows_per_block(m: usize, max_rows: usize, parallel: bool) -> usize {
    if parallel {
        let wanted_blocks = rayon::current_num_threads() * 4;
        m.div_ceil(wanted_blocks).clamp(1, max_rows)
    } else {
        max_rows
    }
}

/// Fills the signed table of column group `group`: `table[b*k..(b+1)*k]` is
/// `Σ_j ±Z[8·group + j, :]`, `+` where bit `7-j` of `b` is set. Columns `>= n` count as zero.
fn fill_table(table: &mut [f32], z: &[f32], k: usize, n: usize, group: usize) {
    debug_assert_eq!(table.len(), 256 * k);
    let first_col = 8 * group;
    let cols_here = n.saturating_sub(first_col).min(8);
    // Entry 0 (all bits clear): minus the sum of the group's rows of Z.
    let (base, _) = table.split_at_mut(k);
    base.fill(0.0);
    for z_row in z[first_col * k..(first_col + cols_here) * k].chunks_exact(k) {
        base.iter_mut().zip(z_row).for_each(|(t, &v)| *t -= v);
    }
    // Setting bit i (column 7 - i of the group) adds 2·Z[col, :].
    for i in 0..8 {
        let col = first_col + 7 - i;
        let half = (1usize << i) * k;
        let (lo, hi) = table.split_at_mut(half);
        let hi = &mut hi[..half];
        if col < n {
            let z_row = &z[col * k..(col + 1) * k];
            if k == 1 {
                let twice = 2.0 * z_row[0];
                hi.iter_mut()
                    .zip(lo.iter())
                    .for_each(|(h, &l)| *h = l + twice);
            } else {
                for (h, l) in hi.chunks_exact_mut(k).zip(lo.chunks_exact(k)) {
                    for ((h, &l), &v) in h.iter_mut().zip(l).zip(z_row) {
                        *h = l + 2.0 * v;
                    }
                }
            }
        } else {
            hi.copy_from_slice(lo);
        }
    }
}

/// Runs `sweep(first_row, y_block)` over blocks of `rows` rows of `y` (`row_len` values per
/// row), on rayon's pool if `parallel`.
fn for_each_row_block<F>(y: &mut [f32], row_len: usize, rows: usize, parallel: bool, sweep: F)
where
    F: Fn(usize, &mut [f32]) + Sync + Send,
{
    let block_len = rows * row_len;
    if parallel {
        y.par_chunks_mut(block_len)
            .enumerate()
            .for_each(|(b, block)| sweep(b * rows, block));
    } else {
        y.chunks_mut(block_len)
            .enumerate()
            .for_each(|(b, block)| sweep(b * rows, block));
    }
}

/// `Σ_g tables[g][bytes[g]]`, with four independent accumulators.
#[inline]
fn lookup_sum(tables: &[[f32; 256]], bytes: &[u8]) -> f32 {
    let mut acc = [0.0f32; 4];
    let mut table_quads = tables.chunks_exact(4);
    let mut byte_quads = bytes.chunks_exact(4);
    for (t, b) in (&mut table_quads).zip(&mut byte_quads) {
        acc[0] += t[0][usize::from(b[0])];
        acc[1] += t[1][usize::from(b[1])];
        acc[2] += t[2][usize::from(b[2])];
        acc[3] += t[3][usize::from(b[3])];
    }
    for (t, &b) in table_quads.remainder().iter().zip(byte_quads.remainder()) {
        acc[0] += t[usize::from(b)];
    }
    (acc[0] + acc[1]) + (acc[2] + acc[3])
}

/// `y_row += Σ_g tables[g][bytes[g]]` for `K`-vector entries, accumulated in registers
/// (a fixed `K` lets the compiler keep the accumulator in SIMD registers and drop the bounds
/// checks).
#[inline]
fn lookup_rows<const K: usize>(tile: &[f32], bytes: &[u8], y_row: &mut [f32]) {
    let mut acc = [0.0f32; K];
    for (table, &b) in tile.chunks_exact(256 * K).zip(bytes) {
        let at = usize::from(b) * K;
        if let Some(entry) = table.get(at..at + K) {
            for (a, &e) in acc.iter_mut().zip(entry) {
                *a += e;
            }
        }
    }
    for (y, a) in y_row.iter_mut().zip(acc) {
        *y += a;
    }
}

/// `y = S z` with lookup tables.
pub(crate) fn sign_matvec(s: SignMatrixRef<'_>, z: &[f32], y: &mut [f32], par: Parallelism) {
    let (m, n) = (s.rows(), s.cols());
    assert_eq!(
        z.len(),
        n,
        "sign_matvec_lut: z has {} values, the {m}x{n} sign matrix needs {n}",
        z.len()
    );
    assert_eq!(
        y.len(),
        m,
        "sign_matvec_lut: y has {} values, the {m}x{n} sign matrix needs {m}",
        y.len()
    );
    y.fill(0.0);
    if m == 0 || n == 0 {
        return;
    }
    let groups = n.div_ceil(8);
    let parallel = use_parallel(par, m * n);
    let block_rows = rows_per_block(m, MATVEC_ROW_BLOCK, parallel);
    let mut tables = vec![[0.0f32; 256]; groups.min(MATVEC_RANGE_GROUPS)];
    let mut g0 = 0;
    while g0 < groups {
        let g1 = (g0 + MATVEC_RANGE_GROUPS).min(groups);
        let range_tables = &mut tables[..g1 - g0];
        let build = |(i, table): (usize, &mut [f32; 256])| fill_table(table, z, 1, n, g0 + i);
        if parallel {
            range_tables.par_iter_mut().enumerate().for_each(build);
        } else {
            range_tables.iter_mut().enumerate().for_each(build);
        }
        let range_tables = &*range_tables;
        for_each_row_block(y, 1, block_rows, parallel, |first_row, y_block| {
            let mut scratch = [0u8; MATVEC_TILE_GROUPS];
            let mut t0 = g0;
            while t0 < g1 {
                let t1 = (t0 + MATVEC_TILE_GROUPS).min(g1);
                let tile = &range_tables[t0 - g0..t1 - g0];
                for (i, out) in y_block.iter_mut().enumerate() {
                    let bytes = s.row_group_bytes(first_row + i, t0, t1, &mut scratch);
                    *out += lookup_sum(tile, bytes);
                }
                t0 = t1;
            }
        });
        g0 = g1;
    }
}

/// `Y = S Z` with lookup tables of `k`-vectors.
pub(crate) fn sign_matmul(
    s: SignMatrixRef<'_>,
    z: &[f32],
    k: usize,
    y: &mut [f32],
    par: Parallelism,
) {
    let (m, n) = (s.rows(), s.cols());
    assert_eq!(
        Some(z.len()),
        n.checked_mul(k),
        "sign_matmul_lut: Z has {} values, a {n}x{k} matrix is needed",
        z.len()
    );
    assert_eq!(
        Some(y.len()),
        m.checked_mul(k),
        "sign_matmul_lut: Y has {} values, a {m}x{k} matrix is needed",
        y.len()
    );
    if k == 1 {
        sign_matvec(s, z, y, par);
        return;
    }
    y.fill(0.0);
    if m == 0 || n == 0 || k == 0 {
        return;
    }
    let groups = n.div_ceil(8);
    let table_len = 256 * k;
    let table_bytes = table_len * std::mem::size_of::<f32>();
    let range_groups = (MATMUL_RANGE_BYTES / table_bytes).clamp(1, groups);
    let tile_groups = (MATMUL_TILE_BYTES / table_bytes).clamp(1, range_groups);
    let parallel = use_parallel(par, m.saturating_mul(n).saturating_mul(k));
    let block_rows = rows_per_block(m, MATMUL_ROW_BLOCK, parallel);
    let mut tables = vec![0.0f32; range_groups * table_len];
    let mut g0 = 0;
    while g0 < groups {
        let g1 = (g0 + range_groups).min(groups);
        let range_tables = &mut tables[..(g1 - g0) * table_len];
        let build = |(i, table): (usize, &mut [f32])| fill_table(table, z, k, n, g0 + i);
        if parallel {
            range_tables
                .par_chunks_exact_mut(table_len)
                .enumerate()
                .for_each(build);
        } else {
            range_tables
                .chunks_exact_mut(table_len)
                .enumerate()
                .for_each(build);
        }
        let range_tables = &*range_tables;
        for_each_row_block(y, k, block_rows, parallel, |first_row, y_block| {
            let mut scratch = vec![0u8; tile_groups];
            let mut t0 = g0;
            while t0 < g1 {
                let t1 = (t0 + tile_groups).min(g1);
                let tile = &range_tables[(t0 - g0) * table_len..(t1 - g0) * table_len];
                for (i, y_row) in y_block.chunks_exact_mut(k).enumerate() {
                    let bytes = s.row_group_bytes(first_row + i, t0, t1, &mut scratch);
                    match k {
                        4 => lookup_rows::<4>(tile, bytes, y_row),
                        8 => lookup_rows::<8>(tile, bytes, y_row),
                        16 => lookup_rows::<16>(tile, bytes, y_row),
                        32 => lookup_rows::<32>(tile, bytes, y_row),
                        _ => {
                            for (table, &b) in tile.chunks_exact(table_len).zip(bytes) {
                                let at = usize::from(b) * k;
                                let entry = &table[at..at + k];
                                y_row.iter_mut().zip(entry).for_each(|(a, &e)| *a += e);
                            }
                        }
                    }
                }
                t0 = t1;
            }
        });
        g0 = g1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_entries_are_signed_sums() {
        let z: Vec<f32> = (1..=8).map(|v| v as f32).collect();
        let mut table = [0.0f32; 256];
        fill_table(&mut table, &z, 1, 8, 0);
        for (b, &entry) in table.iter().enumerate() {
            let expected: f32 = (0..8)
                .map(|j| if (b >> (7 - j)) & 1 == 1 { z[j] } else { -z[j] })
                .sum();
            assert_eq!(entry, expected, "byte {b:#010b}");
        }
    }

    #[test]
    fn partial_group_ignores_missing_columns() {
        // n = 3: only columns 0..3 of the group exist; bits of columns 3..8 must not matter.
        let z = [1.0f32, 10.0, 100.0];
        let mut table = [0.0f32; 256];
        fill_table(&mut table, &z, 1, 3, 0);
        assert_eq!(table[0b1010_0000], 1.0 - 10.0 + 100.0);
        assert_eq!(table[0b1011_1111], 1.0 - 10.0 + 100.0);
        assert_eq!(table[0], -111.0);
    }

    #[test]
    fn vector_tables_match_scalar_tables() {
        let k = 3;
        let z: Vec<f32> = (0..8 * k).map(|v| (v as f32).sin()).collect();
        let mut wide = vec![0.0f32; 256 * k];
        fill_table(&mut wide, &z, k, 8, 0);
        for j in 0..k {
            let column: Vec<f32> = (0..8).map(|c| z[c * k + j]).collect();
            let mut narrow = [0.0f32; 256];
            fill_table(&mut narrow, &column, 1, 8, 0);
            for b in 0..256 {
                assert!((wide[b * k + j] - narrow[b]).abs() < 1e-5);
            }
        }
    }

    #[test]
    fn rows_per_block_bounds() {
        assert_eq!(rows_per_block(1000, 64, false), 64);
        let p = rows_per_block(1000, 64, true);
        assert!((1..=64).contains(&p));
        assert_eq!(rows_per_block(1, 64, true), 1);
    }
}
