//! The decode product `y += Σ_b (S_b ⊙ (u_b v_b)) x` as integer matrix products: each block's
//! `z = v ⊙ x` (all its rank indices, `cols × k`) is rounded to signed bytes, with one scale
//! per chunk of [`CHUNK_COLS`] columns and rank index (the largest `|z|` over 127, as
//! llama.cpp's `Q8_K` activations); the ±1 signs times those bytes is then an exact `i32`
//! product, scaled back per chunk, and `u` is applied in f32.
//!
//! On CPUs with AMX (Intel from Sapphire Rapids, on Linux), one `tdpbssd` multiplies 16 rows ×
//! 64 columns of signs by the 64 × 16 bytes of 16 rank indices: the tile unit does all the
//! multiply-adds, and the vector unit only expands each row's 64 sign bits into ±1 bytes
//! (`vpblendmb` under a mask). Ranks beyond 16 run as further passes over the same signs.
//!
//! The portable version rounds the same values, sums the same integers and does the same f32
//! operations in the same order: the two agree **exactly**, on any number of threads (rows
//! are split, and each row is computed by one thread).
//!
//! Rounding each `z` (rather than each 4-column table entry, as [`crate::lowrank_q8`] does)
//! gives a smaller error for the same scale: see [`error_bounds`].

use half::f16;
use rayon::prelude::*;

use crate::lowrank::LowRankRef;
use crate::lut::use_parallel;
use crate::{Parallelism, Simd};

/// Columns per chunk: one scale per chunk and rank index.
pub const CHUNK_COLS: usize = 256;
/// Columns per tile product (64 bytes of a row's signs as ±1 bytes).
const STEP_COLS: usize = 64;
/// Rank indices per pass (the 16 `i32` columns of a result tile).
const RANKS: usize = 16;
/// Rows per tile.
const TILE: usize = 16;
/// Bytes of one step's quantized `z` in the VNNI layout: 16 rows of 64 bytes.
const STEP_BYTES: usize = TILE * STEP_COLS;
/// The largest quantized magnitude.
const QMAX: f32 = 127.0;

/// Whether [`matvec_add_i8`] runs the tile (AMX) version with `simd` here.
pub(crate) fn accelerated(simd: Simd) -> bool {
    #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
    if matches!(simd, Simd::Auto) {
        return amx::available();
    }
    let _ = simd;
    false
}

/// One pass: rank indices `r0..r0 + kr` (`kr ≤ 16`) of a block, quantized.
struct Pass<'a> {
    block: LowRankRef<'a>,
    r0: usize,
    kr: usize,
    /// Per step of 64 columns, [`STEP_BYTES`] in the VNNI layout of a tile product's second
    /// operand: byte `t·64 + 4·r + i` is rank `r0 + r`'s quantized `z` at the step's tile
    /// column `a = 4t + i`, which is the column `8·(a/8) + 7 − a%8` (the sign bits of a byte
    /// are stored first column first from the most significant bit, and a mask expands them
    /// least significant first).
    q: Vec<u8>,
    /// Per chunk, 16 scales (zero past `kr`; NaN where a `z` of the chunk is not finite).
    scales: Vec<f32>,
}

/// The column of a step's tile column `a`.
#[inline]
fn column_of(a: usize) -> usize {
    8 * (a / 8) + 7 - a % 8
}

/// Rounds `z` of the block's rank indices `r0..r0 + kr` (see [`Pass`]).
fn quantize<'a>(block: LowRankRef<'a>, r0: usize, kr: usize, x: &[f32]) -> Pass<'a> {
    let n = x.len();
    let steps = n.div_ceil(STEP_COLS);
    let chunks = n.div_ceil(CHUNK_COLS);
    let mut q = vec![0u8; steps * STEP_BYTES];
    let mut scales = vec![0.0f32; chunks * RANKS];
    let mut z = [0.0f32; CHUNK_COLS];
    let mut zq = [0i8; CHUNK_COLS];
    // Per step of the chunk and rank: its 16 dwords (4 tile columns each) in tile order.
    let mut dwords = [[[0u32; 16]; RANKS]; CHUNK_COLS / STEP_COLS];
    for c in 0..chunks {
        let col0 = c * CHUNK_COLS;
        let width = (n - col0).min(CHUNK_COLS);
        for r in 0..kr {
            let v = &block.v[(r0 + r) * n + col0..(r0 + r) * n + col0 + width];
            crate::lowrank::widen_into(v, &mut z[..width]);
            z[..width]
                .iter_mut()
                .zip(&x[col0..col0 + width])
                .for_each(|(zi, &xi)| *zi *= xi);
            z[width..].fill(0.0);
            // The largest |z| as bits: for non-negative floats the integer order is the float
            // order, with infinity and then NaN above every finite value.
            let max_bits = z[..width]
                .iter()
                .fold(0u32, |m, v| m.max(v.to_bits() & 0x7fff_ffff));
            let finite = max_bits < 0x7f80_0000;
            let max = f32::from_bits(max_bits);
            scales[c * RANKS + r] = if finite { max / QMAX } else { f32::NAN };
            let inv = if finite && max > 0.0 { QMAX / max } else { 0.0 };
            for (o, &v) in zq.iter_mut().zip(&z) {
                *o = round_to_i8(v * inv);
            }
            for (s, d) in dwords.iter_mut().enumerate() {
                for (w, pair) in d[r].chunks_exact_mut(2).enumerate() {
                    let at = s * STEP_COLS + 8 * w;
                    let mut b = [0u8; 8];
                    for (bi, &qi) in b.iter_mut().zip(&zq[at..at + 8]) {
                        *bi = qi as u8;
                    }
                    // The tile columns of a byte of signs run from its last column.
                    let word = u64::from_le_bytes(b).swap_bytes();
                    pair[0] = word as u32;
                    pair[1] = (word >> 32) as u32;
                }
            }
        }
        for (s, d) in dwords.iter_mut().enumerate() {
            let step = c * (CHUNK_COLS / STEP_COLS) + s;
            if step >= steps {
                break;
            }
            let out = &mut q[step * STEP_BYTES..(step + 1) * STEP_BYTES];
            for (r, rank) in d.iter_mut().enumerate().take(kr) {
                for (t, w) in rank.iter_mut().enumerate() {
                    let at = 4 * (t * RANKS + r);
                    out[at..at + 4].copy_from_slice(&w.to_le_bytes());
                    *w = 0;
                }
            }
        }
    }
    Pass {
        block,
        r0,
        kr,
        q,
        scales,
    }
}

/// `round(v)` (ties to even) as a byte, for `|v| ≤ 127` plus rounding (clamped); NaN gives 0.
/// Adding and subtracting 1.5 · 2²³ rounds to an integer in the default rounding mode (the
/// sum lies where f32 steps are 1), without a call to `rintf`.
#[inline]
fn round_to_i8(v: f32) -> i8 {
    const MAGIC: f32 = 12_582_912.0;
    let r = (v.clamp(-QMAX, QMAX) + MAGIC) - MAGIC;
    r as i8
}

/// `y += Σ_b (S_b ⊙ (u_b v_b)) x` over `blocks` with 8-bit `z` (see the module docs).
///
/// # Panics
/// If a block's shape or factor lengths do not match `x`, `y` and its `k`.
pub(crate) fn matvec_add_i8(
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
            "lowrank_matvec_add_i8",
            i,
            b,
            m,
            n,
        ));
    }
    if m == 0 || n == 0 {
        return;
    }
    if blocks
        .iter()
        .any(|b| b.signs.layout() != crate::SignLayout::RowMajor)
    {
        // The tile version reads whole rows of signs: row-major copies of the others.
        let bytes: Vec<_> = blocks.iter().map(|b| b.signs.row_major_bytes()).collect();
        let row_major: Vec<LowRankRef<'_>> = blocks
            .iter()
            .zip(&bytes)
            .map(|(b, bytes)| LowRankRef {
                signs: crate::SignMatrixRef::row_major_of(bytes, b.signs.rows(), b.signs.cols()),
                ..*b
            })
            .collect();
        return matvec_add_i8(&row_major, x, y, par, simd);
    }
    let passes: Vec<(LowRankRef<'_>, usize, usize)> = blocks
        .iter()
        .flat_map(|b| {
            (0..b.k.div_ceil(RANKS)).map(move |p| (*b, p * RANKS, (b.k - p * RANKS).min(RANKS)))
        })
        .collect();
    if passes.is_empty() {
        return;
    }
    let parallel = use_parallel(par, work);
    let passes: Vec<Pass<'_>> = if parallel {
        passes
            .into_par_iter()
            .map(|(b, r0, kr)| quantize(b, r0, kr, x))
            .collect()
    } else {
        passes
            .into_iter()
            .map(|(b, r0, kr)| quantize(b, r0, kr, x))
            .collect()
    };
    // Tile rows need whole bytes per row of signs.
    let tiles = accelerated(simd) && n % 8 == 0;
    let run = |row0: usize, ys: &mut [f32]| {
        #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
        if tiles {
            amx::run(&passes, x.len(), row0, ys);
            return;
        }
        let _ = tiles;
        portable(&passes, x.len(), row0, ys);
    };
    let threads = if parallel {
        rayon::current_num_threads()
    } else {
        1
    };
    if threads > 1 && m > 2 * TILE {
        let rows = m.div_ceil(threads).next_multiple_of(2 * TILE);
        y.par_chunks_mut(rows)
            .enumerate()
            .for_each(|(t, ys)| run(t * rows, ys));
    } else {
        run(0, y);
    }
}

/// The f32 steps shared by both versions, in their order: `acc[r] += sum[r] as f32 · scale[r]`
/// per chunk (a product, then a sum: two roundings), and at the end `y += Σ_r u[r] · acc[r]`
/// summed as a tree over 16 lanes (lanes `r` and `r + 8`, then `r + 4`, `r + 2`, `r + 1`).
#[inline]
fn finish_row(u: &[f16], kr: usize, acc: &[f32; RANKS]) -> f32 {
    let mut t = [0.0f32; RANKS];
    for r in 0..kr {
        t[r] = u[r].to_f32() * acc[r];
    }
    let mut width = RANKS / 2;
    while width > 0 {
        for r in 0..width {
            t[r] += t[r + width];
        }
        width /= 2;
    }
    t[0]
}

/// The portable version (the oracle of the tile version): rows `row0..row0 + y.len()`.
fn portable(passes: &[Pass<'_>], n: usize, row0: usize, y: &mut [f32]) {
    let chunks = n.div_ceil(CHUNK_COLS);
    for p in passes {
        let k = p.block.k;
        for (i, yi) in y.iter_mut().enumerate() {
            let row = row0 + i;
            let mut acc = [0.0f32; RANKS];
            for c in 0..chunks {
                let mut sums = [0i32; RANKS];
                for col in c * CHUNK_COLS..((c + 1) * CHUNK_COLS).min(n) {
                    let s: i32 = if p.block.signs.get(row, col) { 1 } else { -1 };
                    let (step, a) = (col / STEP_COLS, column_of(col % STEP_COLS));
                    let base = step * STEP_BYTES + (a / 4) * 64 + a % 4;
                    for (r, sum) in sums.iter_mut().enumerate().take(p.kr) {
                        *sum += s * i32::from(p.q[base + 4 * r] as i8);
                    }
                }
                for r in 0..RANKS {
                    acc[r] += sums[r] as f32 * p.scales[c * RANKS + r];
                }
            }
            *yi += finish_row(
                &p.block.u[row * k + p.r0..row * k + p.r0 + p.kr],
                p.kr,
                &acc,
            );
        }
    }
}

/// The bounds on `|Δy[row]|` against the exact product: each rounded `z` is off by at most
/// half its chunk's scale, so a row is off by at most `Σ_b Σ_r |u[row, r]| · Σ_chunks
/// columns · scale / 2`.
pub(crate) fn error_bounds(blocks: &[LowRankRef<'_>], x: &[f32]) -> Vec<f64> {
    let Some(first) = blocks.first() else {
        return Vec::new();
    };
    let (m, n) = (first.signs.rows(), x.len());
    let mut bound = vec![0.0f64; m];
    for (i, b) in blocks.iter().enumerate() {
        crate::lowrank::check_block("lowrank_i8_error_bounds", i, b, m, n);
        for p in 0..b.k.div_ceil(RANKS) {
            let (r0, kr) = (p * RANKS, (b.k - p * RANKS).min(RANKS));
            let pass = quantize(*b, r0, kr, x);
            let per_rank: Vec<f64> = (0..kr)
                .map(|r| {
                    (0..n.div_ceil(CHUNK_COLS))
                        .map(|c| {
                            let cols = ((c + 1) * CHUNK_COLS).min(n) - c * CHUNK_COLS;
                            f64::from(pass.scales[c * RANKS + r]) * cols as f64 / 2.0
                        })
                        .sum()
                })
                .collect();
            for (row, bo) in bound.iter_mut().enumerate() {
                for (r, e) in per_rank.iter().enumerate() {
                    *bo += f64::from(b.u[row * b.k + r0 + r].to_f32()).abs() * e;
                }
            }
        }
    }
    bound
}

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
#[allow(unsafe_code)]
mod amx {
    //! The tile version. AMX instructions have no stable intrinsics: they are written as
    //! inline assembly on fixed tile registers, which the compiler never uses itself.
    //! `tmm0`/`tmm1`: two tiles of ±1 sign bytes (16 rows × 64 columns each); `tmm2`/`tmm3`:
    //! an even and an odd step's quantized `z`; `tmm4`/`tmm5` and `tmm6`/`tmm7`: the two row
    //! tiles' `i32` sums over the even and the odd steps of a chunk.

    use std::arch::asm;
    use std::arch::x86_64::{
        __m512, __m512i, _cvtu64_mask64, _mm256_add_ps, _mm256_castpd_ps, _mm256_castps256_ps128,
        _mm256_extractf128_ps, _mm512_add_epi32, _mm512_add_ps, _mm512_castps512_ps256,
        _mm512_castps_pd, _mm512_castsi512_si256, _mm512_cvtepi32_ps, _mm512_cvtph_ps,
        _mm512_extractf64x4_pd, _mm512_loadu_ps, _mm512_loadu_si512, _mm512_mask_blend_epi8,
        _mm512_maskz_loadu_epi16, _mm512_mul_ps, _mm512_set1_epi8, _mm512_storeu_ps,
        _mm512_storeu_si512, _mm_add_ps, _mm_add_ss, _mm_cvtss_f32, _mm_movehl_ps, _mm_shuffle_ps,
    };
    use std::sync::OnceLock;

    use super::{Pass, CHUNK_COLS, RANKS, STEP_BYTES, STEP_COLS, TILE};

    /// AMX-TILE and AMX-INT8 in CPUID, AVX-512 F and BW, and the kernel's permission for
    /// this process to use the tile state (asked once).
    pub(super) fn available() -> bool {
        static AVAILABLE: OnceLock<bool> = OnceLock::new();
        *AVAILABLE.get_or_init(|| {
            if !(is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bw")) {
                return false;
            }
            // CPUID leaf 7 exists on every CPU with AVX-512 (checked above).
            let leaf7 = std::arch::x86_64::__cpuid_count(7, 0);
            let (tile, int8) = (leaf7.edx >> 24 & 1 == 1, leaf7.edx >> 25 & 1 == 1);
            tile && int8 && request_permission()
        })
    }

    /// `arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`: Linux gives a process the
    /// (8 kB) tile state only when it asks. False where the kernel refuses or lacks it.
    fn request_permission() -> bool {
        const SYS_ARCH_PRCTL: i64 = 158;
        const ARCH_REQ_XCOMP_PERM: i64 = 0x1023;
        const XFEATURE_XTILEDATA: i64 = 18;
        let ret: i64;
        // SAFETY: the system call only changes which extended states this process may use;
        // it reads and writes no memory. `syscall` clobbers rcx and r11, declared here.
        unsafe {
            asm!(
                "syscall",
                inlateout("rax") SYS_ARCH_PRCTL => ret,
                in("rdi") ARCH_REQ_XCOMP_PERM,
                in("rsi") XFEATURE_XTILEDATA,
                lateout("rcx") _,
                lateout("r11") _,
                options(nostack),
            );
        }
        ret == 0
    }

    /// The tile configuration (palette 1): all eight tiles are 16 rows × 64 bytes.
    #[repr(C, align(64))]
    struct Config([u8; 64]);

    impl Config {
        fn new() -> Self {
            let mut c = [0u8; 64];
            c[0] = 1;
            for t in 0..8 {
                c[16 + 2 * t..18 + 2 * t].copy_from_slice(&64u16.to_le_bytes());
                c[48 + t] = TILE as u8;
            }
            Self(c)
        }
    }

    /// 64-byte aligned scratch: two sign tiles and two result tiles.
    #[repr(C, align(64))]
    struct Scratch {
        signs: [[i8; STEP_BYTES]; 4],
        sums: [[i32; TILE * RANKS]; 4],
    }

    /// Rows `row0..row0 + y.len()` of every pass, two tiles of rows at a time.
    pub(super) fn run(passes: &[Pass<'_>], n: usize, row0: usize, y: &mut [f32]) {
        debug_assert!(available() && n.is_multiple_of(8));
        let config = Config::new();
        let mut scratch = Box::new(Scratch {
            signs: [[0; STEP_BYTES]; 4],
            sums: [[0; TILE * RANKS]; 4],
        });
        // SAFETY: `available()` checked AMX-TILE, AMX-INT8, AVX-512 F/BW and the permission
        // (the caller runs this only then); the configuration is valid (palette 1, rows and
        // bytes per row within the palette's 16 × 64), and the tile state is released before
        // returning.
        unsafe {
            asm!("ldtilecfg [{}]", in(reg) config.0.as_ptr(), options(nostack, readonly));
            for p in passes {
                rows(p, n, row0, y, &mut scratch);
            }
            asm!("tilerelease", options(nostack, nomem));
        }
    }

    /// One pass over the rows.
    ///
    /// # Safety
    /// As [`run`]: AMX and AVX-512 F/BW present and permitted, tiles configured; `n % 8 == 0`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    unsafe fn rows(p: &Pass<'_>, n: usize, row0: usize, y: &mut [f32], s: &mut Scratch) {
        let bits = p.block.signs.as_bytes();
        let row_bytes = n / 8;
        let m = p.block.signs.rows();
        let steps = n.div_ceil(STEP_COLS);
        let chunks = n.div_ceil(CHUNK_COLS);
        let plus = _mm512_set1_epi8(1);
        let minus = _mm512_set1_epi8(-1);
        let stride = 64usize;
        // The 64 sign bits of `row` at step `step` (zero for rows past the matrix; the bits
        // past the last column multiply zero bytes of `z`).
        let mask_of = |row: usize, step: usize| -> u64 {
            if row >= m {
                return 0;
            }
            let at = row * row_bytes + step * 8;
            if step * 8 + 8 <= row_bytes {
                if let Some(w) = bits.get(at..at + 8) {
                    let mut word = [0u8; 8];
                    word.copy_from_slice(w);
                    return u64::from_le_bytes(word);
                }
            }
            let end = (at + 8).min((row + 1) * row_bytes);
            let mut word = [0u8; 8];
            word[..end - at].copy_from_slice(&bits[at..end]);
            u64::from_le_bytes(word)
        };
        for pair in (0..y.len()).step_by(2 * TILE) {
            let first = row0 + pair;
            let mut acc = [[0.0f32; RANKS]; 2 * TILE];
            // The tile instructions below read `s.signs` (4 × 1 kB) and a step of `p.q` (1 kB,
            // within `steps · STEP_BYTES`) with a 64-byte stride, and write `s.sums` (4 × 1 kB);
            // the tiles were configured by the caller.
            // SAFETY: zeroing the accumulator tiles touches no memory.
            unsafe {
                asm!(
                    "tilezero tmm4",
                    "tilezero tmm5",
                    "tilezero tmm6",
                    "tilezero tmm7",
                    options(nostack, nomem)
                );
            }
            for c in 0..chunks {
                let steps_c =
                    c * (CHUNK_COLS / STEP_COLS)..((c + 1) * (CHUNK_COLS / STEP_COLS)).min(steps);
                // Steps two at a time: even steps into tmm4/tmm5, odd ones into tmm6/tmm7, so
                // that consecutive products do not wait for each other's sums.
                for step in steps_c.clone().step_by(2) {
                    let second = step + 1 < steps_c.end;
                    for (half, tile) in s.signs.iter_mut().enumerate() {
                        if half >= 2 && !second {
                            break;
                        }
                        let (top, st) = (first + (half % 2) * TILE, step + half / 2);
                        if top + TILE <= m && st * 8 + 8 <= row_bytes {
                            // The whole tile's signs are in the matrix: 16 unaligned words,
                            // `row_bytes` apart, from the checked start.
                            let at = top * row_bytes + st * 8;
                            let span = &bits[at..at + (TILE - 1) * row_bytes + 8];
                            for r in 0..TILE {
                                // SAFETY: `r·row_bytes + 8 ≤ span.len()`; row `r` of a
                                // 16 × 64-byte tile.
                                unsafe {
                                    let w = span
                                        .as_ptr()
                                        .add(r * row_bytes)
                                        .cast::<u64>()
                                        .read_unaligned();
                                    let bytes =
                                        _mm512_mask_blend_epi8(_cvtu64_mask64(w), minus, plus);
                                    _mm512_storeu_si512(
                                        tile.as_mut_ptr().add(64 * r).cast::<__m512i>(),
                                        bytes,
                                    );
                                }
                            }
                            continue;
                        }
                        for r in 0..TILE {
                            let k = _cvtu64_mask64(mask_of(top + r, st));
                            let bytes = _mm512_mask_blend_epi8(k, minus, plus);
                            // SAFETY: row `r` of a 16 × 64-byte tile.
                            unsafe {
                                _mm512_storeu_si512(
                                    tile.as_mut_ptr().add(64 * r).cast::<__m512i>(),
                                    bytes,
                                );
                            }
                        }
                    }
                    let q = p.q[step * STEP_BYTES..(step + 1) * STEP_BYTES].as_ptr();
                    // SAFETY: 16 rows of 64 bytes, 64 bytes apart, from `s.signs[0]`,
                    // `s.signs[1]` (1 kB each) and this step's 1 kB of `p.q`.
                    unsafe {
                        asm!(
                            "tileloadd tmm0, [{a} + {s}*1]",
                            "tileloadd tmm1, [{b} + {s}*1]",
                            "tileloadd tmm2, [{q} + {s}*1]",
                            "tdpbssd tmm4, tmm0, tmm2",
                            "tdpbssd tmm5, tmm1, tmm2",
                            a = in(reg) s.signs[0].as_ptr(),
                            b = in(reg) s.signs[1].as_ptr(),
                            q = in(reg) q,
                            s = in(reg) stride,
                            options(nostack, readonly),
                        );
                    }
                    if second {
                        let q = p.q[(step + 1) * STEP_BYTES..(step + 2) * STEP_BYTES].as_ptr();
                        // SAFETY: as above, from `s.signs[2]`, `s.signs[3]` and the next
                        // step's 1 kB of `p.q`.
                        unsafe {
                            asm!(
                                "tileloadd tmm0, [{a} + {s}*1]",
                                "tileloadd tmm1, [{b} + {s}*1]",
                                "tileloadd tmm3, [{q} + {s}*1]",
                                "tdpbssd tmm6, tmm0, tmm3",
                                "tdpbssd tmm7, tmm1, tmm3",
                                a = in(reg) s.signs[2].as_ptr(),
                                b = in(reg) s.signs[3].as_ptr(),
                                q = in(reg) q,
                                s = in(reg) stride,
                                options(nostack, readonly),
                            );
                        }
                    }
                }
                // SAFETY: 16 rows of 64 bytes (16 `i32`), 64 bytes apart, into each of the four
                // 1 kB `s.sums`.
                unsafe {
                    asm!(
                        "tilestored [{a} + {s}*1], tmm4",
                        "tilestored [{b} + {s}*1], tmm5",
                        "tilestored [{c} + {s}*1], tmm6",
                        "tilestored [{d} + {s}*1], tmm7",
                        "tilezero tmm4",
                        "tilezero tmm5",
                        "tilezero tmm6",
                        "tilezero tmm7",
                        a = in(reg) s.sums[0].as_mut_ptr(),
                        b = in(reg) s.sums[1].as_mut_ptr(),
                        c = in(reg) s.sums[2].as_mut_ptr(),
                        d = in(reg) s.sums[3].as_mut_ptr(),
                        s = in(reg) stride,
                        options(nostack),
                    );
                }
                // SAFETY: 16 scales of chunk `c`; 16 sums per row of a result tile; 16 floats
                // of an accumulator row.
                unsafe {
                    let scale = _mm512_loadu_ps(p.scales.as_ptr().add(c * RANKS));
                    for (i, a) in acc.iter_mut().enumerate() {
                        let at = (i % TILE) * RANKS;
                        // Integer sums of the even and the odd steps: exact.
                        let sums = _mm512_add_epi32(
                            _mm512_loadu_si512(s.sums[i / TILE].as_ptr().add(at).cast()),
                            _mm512_loadu_si512(s.sums[2 + i / TILE].as_ptr().add(at).cast()),
                        );
                        let prod = _mm512_mul_ps(_mm512_cvtepi32_ps(sums), scale);
                        _mm512_storeu_ps(
                            a.as_mut_ptr(),
                            _mm512_add_ps(_mm512_loadu_ps(a.as_ptr()), prod),
                        );
                    }
                }
            }
            let k = p.block.k;
            let live = (y.len() - pair).min(2 * TILE);
            for (i, a) in acc.iter().enumerate().take(live) {
                let row = first + i;
                let u = &p.block.u[row * k + p.r0..row * k + p.r0 + p.kr];
                // SAFETY: a masked load of `kr ≤ 16` halves of `u`; 16 floats of `a`.
                let t: __m512 = unsafe {
                    let uh = _mm512_maskz_loadu_epi16((1u32 << p.kr) - 1, u.as_ptr().cast());
                    let u32s = _mm512_cvtph_ps(_mm512_castsi512_si256(uh));
                    _mm512_mul_ps(u32s, _mm512_loadu_ps(a.as_ptr()))
                };
                y[pair + i] += reduce(t);
            }
        }
    }

    /// The tree sum of [`super::finish_row`]: lanes `r + 8`, then `r + 4`, `r + 2`, `r + 1`.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    fn reduce(t: __m512) -> f32 {
        let high = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(t)));
        let s8 = _mm256_add_ps(_mm512_castps512_ps256(t), high);
        let s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps::<1>(s8));
        let s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
        let s1 = _mm_add_ss(s2, _mm_shuffle_ps::<0b01>(s2, s2));
        _mm_cvtss_f32(s1)
    }
}
