//! Iterative absolute-value decomposition.

use bitstack_bits::{packed_len, SignMatrix};
use half::f16;
use rayon::prelude::*;

use faer::linalg::matmul::matmul;
use faer::{Accum, MatMut, MatRef, Par};

use crate::block::{panel_products, widen, PANEL_COLS};
use crate::error::ExpectedLen;
use crate::skinny;
use crate::svd::{top_k_split, PAR_THRESHOLD};
use crate::{AvdBlock, AvdParams, DecomposeError, Significance, SvdMethod};

/// The result of [`decompose`]: the blocks in order and the error after each prefix.
#[derive(Debug, Clone, PartialEq)]
pub struct Decomposition {
    /// The `niter` blocks; `Ŵ_b` is the sum of the first `b`.
    pub blocks: Vec<AvdBlock>,
    /// `rel_err[b - 1] = ‖(W − Ŵ_b)·D‖_F / ‖W·D‖_F`, with `Ŵ_b` built from the stored (f16)
    /// factors and `D = diag(channel weights)` (identity without weights). 0 for `W = 0`.
    pub rel_err: Vec<f64>,
}

impl Decomposition {
    /// Rows of the decomposed matrix (0 if there are no blocks).
    pub fn rows(&self) -> usize {
        self.blocks.first().map_or(0, AvdBlock::rows)
    }

    /// Columns of the decomposed matrix (0 if there are no blocks).
    pub fn cols(&self) -> usize {
        self.blocks.first().map_or(0, AvdBlock::cols)
    }

    /// `Ŵ_b`: the dense row-major sum of the first `nblocks` blocks (all of them if
    /// `nblocks` is larger).
    pub fn reconstruct(&self, nblocks: usize) -> Vec<f32> {
        let mut w = vec![0.0f32; self.rows() * self.cols()];
        for block in self.blocks.iter().take(nblocks) {
            block.add_to_dense(&mut w);
        }
        w
    }
}

/// Decomposes the row-major `rows × cols` matrix `w` into `params.niter` AVD blocks
/// (docs/ALGORITHM.md §2).
///
/// With `channel_weights = Some(s)` (one positive weight per column) the decomposition is
/// that of `W · diag(s)`; the blocks are returned in the original coordinates (`v`'s columns
/// divided by `s`) and `rel_err` is measured in the weighted norm.
///
/// With [`SvdMethod::Exact`] the residual is updated with the unrounded f32 factors, while
/// the stored factors and the reported errors use f16, as the reference implementation does.
/// The randomized (fast) mode carries the residual of the stored f16 blocks: it is the
/// reported error itself, so one product per block updates both.
///
/// # Errors
/// Shape mismatch, a non-finite weight (the first one is named), `k = 0` or
/// `k > min(rows, cols)`, `niter = 0`, bad channel weights, an SVD that does not converge, or
/// a factor that overflows f16.
pub fn decompose(
    w: &[f32],
    rows: usize,
    cols: usize,
    params: &AvdParams,
    channel_weights: Option<&[f32]>,
) -> Result<Decomposition, DecomposeError> {
    let (m, n, k) = (rows, cols, params.k);
    validate(w, m, n, params, channel_weights)?;

    // State: A = |R| (row-major m×n), the packed signs of R, E = (W − Ŵ_b)·D.
    let mut a = vec![0.0f32; m * n];
    let mut e = vec![0.0f32; m * n];
    let mut bits = vec![0u8; packed_len(m, n)];
    let ones;
    let s: &[f32] = match channel_weights {
        Some(s) => s,
        None => {
            ones = vec![1.0f32; n];
            &ones
        }
    };
    // The reference mode carries the residual of the unrounded f32 factors (as the reference
    // implementation); the fast mode carries the residual of the stored (f16) blocks, which is
    // the error itself: one product per block and no separate error matrix to update.
    let residual = if params.svd == SvdMethod::Exact {
        Residual::Unrounded
    } else {
        Residual::Stored
    };
    let norm_w = init_state(w, s, m, n, &mut a, &mut e, &mut bits, residual).sqrt();

    let mut blocks = Vec::with_capacity(params.niter);
    let mut rel_err = Vec::with_capacity(params.niter);
    let mut warm: Option<faer::Mat<f32>> = None;
    // The reference mode keeps faer's products, so that its blocks are exactly those of
    // the unfused implementation it was validated with.
    let products = if params.svd == SvdMethod::Exact {
        Products::Faer
    } else {
        Products::Simd
    };
    for it in 0..params.niter {
        let seed = params
            .seed
            .wrapping_add((it as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let mut f = top_k_split(
            &a,
            m,
            n,
            k,
            params.svd,
            seed,
            warm.as_ref().map(|b| b.as_ref()),
        )
        .map_err(|_| DecomposeError::SvdNoConvergence { block: it })?;
        warm = f.basis.take();
        let u16v = to_f16(&f.u, it, "u", None)?;
        // Stored v is in the original coordinates: v[r, j] / s_j.
        let v16v = to_f16(&f.v, it, "v", Some(s))?;
        let u_w = widen(&u16v);
        // The stored block in the weighted coordinates: f16(v / s) · s.
        let mut v_w = widen(&v16v);
        for row in v_w.chunks_exact_mut(n) {
            for (x, &sj) in row.iter_mut().zip(s) {
                *x *= sj;
            }
        }
        let signs = SignMatrix::from_packed(bits.clone(), m, n)?;
        let last = it + 1 == params.niter;
        let err2 = update_state(
            &mut a,
            &mut e,
            &mut bits,
            m,
            n,
            k,
            (&f.u, &f.v),
            (&u_w, &v_w),
            last,
            (products, residual),
        );
        rel_err.push(if norm_w > 0.0 {
            err2.sqrt() / norm_w
        } else {
            0.0
        });
        blocks.push(AvdBlock::from_parts(signs, u16v, v16v, k)?);
    }
    Ok(Decomposition { blocks, rel_err })
}

/// [`decompose`] with the channel weights that `significance` gives for `matrix`.
///
/// # Errors
/// As [`decompose`].
pub fn decompose_with_significance(
    w: &[f32],
    rows: usize,
    cols: usize,
    params: &AvdParams,
    matrix: &str,
    significance: &dyn Significance,
) -> Result<Decomposition, DecomposeError> {
    let weights = significance.channel_weights(matrix, cols);
    decompose(w, rows, cols, params, weights.as_deref())
}

fn validate(
    w: &[f32],
    m: usize,
    n: usize,
    params: &AvdParams,
    channel_weights: Option<&[f32]>,
) -> Result<(), DecomposeError> {
    let expected = m.checked_mul(n);
    if expected != Some(w.len()) {
        return Err(DecomposeError::ShapeMismatch {
            rows: m,
            cols: n,
            expected: ExpectedLen(expected),
            len: w.len(),
        });
    }
    params.check_shape(m, n)?;
    if let Some(index) = w.iter().position(|x| !x.is_finite()) {
        return Err(DecomposeError::NonFinite {
            index,
            row: index / n,
            col: index % n,
            value: w[index],
        });
    }
    if let Some(s) = channel_weights {
        if s.len() != n {
            return Err(DecomposeError::ChannelWeightsLength {
                expected: n,
                got: s.len(),
            });
        }
        if let Some(index) = s.iter().position(|&x| !(x.is_finite() && x > 0.0)) {
            return Err(DecomposeError::InvalidChannelWeight {
                index,
                value: s[index],
            });
        }
    }
    Ok(())
}

/// f32 → f16 with an overflow check; with `col_divisors` (length `n`), each row of `n`
/// values is divided by them element-wise first.
///
/// The conversion runs over whole slices (`vcvtps2ph` eight values at a time where F16C is
/// present): one call per value cost ~100 ns here, ~50 ms per 14336×4096 block at k = 16.
fn to_f16(
    x: &[f32],
    block: usize,
    factor: &'static str,
    col_divisors: Option<&[f32]>,
) -> Result<Vec<f16>, DecomposeError> {
    use half::slice::HalfFloatSliceExt;
    let scaled: Vec<f32> = match col_divisors {
        Some(d) => x
            .chunks(d.len().max(1))
            .flat_map(|row| row.iter().zip(d).map(|(&v, &s)| v / s))
            .collect(),
        None => x.to_vec(),
    };
    let mut out = vec![f16::ZERO; scaled.len()];
    out.convert_from_f32_slice(&scaled);
    match out.iter().position(|h| !h.is_finite()) {
        Some(idx) => Err(DecomposeError::FactorOverflow {
            block,
            factor,
            value: scaled[idx],
        }),
        None => Ok(out),
    }
}

/// Rows per parallel task: a multiple of 8 so that every task owns whole bytes of the
/// (row-major, unpadded) packed signs.
fn rows_per_task(m: usize, n: usize) -> usize {
    let target = (1usize << 15) / n.max(1); // ~32k entries per task
    target.clamp(1, m.max(1)).div_ceil(8) * 8
}

/// Runs `body(first_row, a_rows, e_rows, bit_bytes)` over row chunks that own whole bytes of
/// the packed signs, in parallel for large matrices; returns the sum of the bodies' results.
fn for_row_chunks(
    a: &mut [f32],
    e: &mut [f32],
    bits: &mut [u8],
    m: usize,
    n: usize,
    body: impl Fn(usize, &mut [f32], &mut [f32], &mut [u8]) -> f64 + Sync,
) -> f64 {
    let rpt = rows_per_task(m, n);
    let (ea, bb) = (rpt * n, rpt / 8 * n);
    if m * n >= PAR_THRESHOLD && rayon::current_num_threads() > 1 {
        a.par_chunks_mut(ea)
            .zip(e.par_chunks_mut(ea))
            .zip(bits.par_chunks_mut(bb))
            .enumerate()
            .map(|(t, ((ac, ec), bc))| body(t * rpt, ac, ec, bc))
            .sum()
    } else {
        a.chunks_mut(ea)
            .zip(e.chunks_mut(ea))
            .zip(bits.chunks_mut(bb))
            .enumerate()
            .map(|(t, ((ac, ec), bc))| body(t * rpt, ac, ec, bc))
            .sum()
    }
}

/// `A = |W D|`, signs of `W`, `E = W D` (unless `residual` is [`Residual::Stored`], which
/// never reads `E`: its pages are then never touched); returns `‖W D‖²`.
#[allow(clippy::too_many_arguments)]
fn init_state(
    w: &[f32],
    s: &[f32],
    m: usize,
    n: usize,
    a: &mut [f32],
    e: &mut [f32],
    bits: &mut [u8],
    residual: Residual,
) -> f64 {
    let write_e = residual == Residual::Unrounded;
    for_row_chunks(a, e, bits, m, n, |row0, ac, ec, bc| {
        let base = row0 * n;
        let wc = &w[base..base + ac.len()];
        let mut sum = 0.0f64;
        if n.is_multiple_of(8) {
            // Whole bytes: eight entries (and one byte of signs) at a time.
            for (((w8, a8), byte), j0) in wc
                .chunks_exact(8)
                .zip(ac.chunks_exact_mut(8))
                .zip(bc.iter_mut())
                .zip((0..n).step_by(8).cycle())
            {
                let mut packed = 0u8;
                for t in 0..8 {
                    let x = w8[t] * s[j0 + t];
                    a8[t] = x.abs();
                    sum += f64::from(x) * f64::from(x);
                    // sign(0) = +1 (and -0.0 counts as 0).
                    packed |= u8::from(x >= 0.0) << (7 - t);
                }
                *byte = packed;
            }
            if write_e {
                for (erow, wrow) in ec.chunks_exact_mut(n).zip(wc.chunks_exact(n)) {
                    for ((ev, &wv), &sv) in erow.iter_mut().zip(wrow).zip(s) {
                        *ev = wv * sv;
                    }
                }
            }
            return sum;
        }
        for (r, (wrow, arow)) in wc.chunks_exact(n).zip(ac.chunks_exact_mut(n)).enumerate() {
            for (j, ((&wv, av), &sv)) in wrow.iter().zip(arow.iter_mut()).zip(s).enumerate() {
                let x = wv * sv;
                let loc = r * n + j;
                if write_e {
                    ec[loc] = x;
                }
                *av = x.abs();
                sum += f64::from(x) * f64::from(x);
                // sign(0) = +1 (and -0.0 counts as 0).
                if x >= 0.0 {
                    bc[loc >> 3] |= 0x80 >> (loc & 7);
                }
            }
        }
        sum
    })
}

/// One fused pass over the residual, for the block with split factors `f = (u, v)` (f32, the
/// weighted coordinates) and stored factors `g = (u16, v16·s)` (widened):
///
/// * `E ← E − S ⊙ (g.u g.v)` and its squared norm (returned),
/// * unless `last`: `R ← R − S ⊙ (f.u f.v)`, kept as `A = |R|` and the packed signs of `R`.
///
/// With `R = S ⊙ A`: `R − S ⊙ P = S ⊙ (A − P)`, so `|R'| = |A − P|` and
/// `sign(R') = S · sign(A − P)`, with `sign(0) = +1`. The products `u v` are formed one
/// row tile at a time into per-thread scratch buffers (cache-resident, reused across tiles)
/// and never stored whole; the loops run with the best SIMD instruction set available.
///
/// Deterministic: every entry's products are summed over the rank in order, and the
/// per-tile squared norms are added in tile order.
#[allow(clippy::too_many_arguments)]
fn update_state(
    a: &mut [f32],
    e: &mut [f32],
    bits: &mut [u8],
    m: usize,
    n: usize,
    k: usize,
    f: (&[f32], &[f32]),
    g: (&[f32], &[f32]),
    last: bool,
    (products, residual): (Products, Residual),
) -> f64 {
    let rpt = rows_per_task(m, n);
    let (ea, bb) = (rpt * n, rpt / 8 * n);
    let arch = pulp::Arch::new();
    // The fast mode's update, fused and vectorized where AVX-512 is present (bit for bit
    // the portable arithmetic).
    let fused = (products == Products::Simd && residual == Residual::Stored && !last)
        .then(|| skinny::v_panels(g.1, n, k));
    let body =
        |scratch: &mut Scratch, row0: usize, ac: &mut [f32], ec: &mut [f32], bc: &mut [u8]| {
            let rows = ac.len() / n;
            let u_tile = &g.0[row0 * k..(row0 + rows) * k];
            if let Some(sum) = fused
                .as_deref()
                .and_then(|vp| skinny::stored_update(ac, bc, u_tile, vp, n, k))
            {
                return sum;
            }
            arch.dispatch(UpdateTile {
                a: ac,
                e: ec,
                bits: bc,
                n,
                k,
                f: (&f.0[row0 * k..(row0 + rows) * k], f.1),
                g: (&g.0[row0 * k..(row0 + rows) * k], g.1),
                last,
                products,
                residual,
                scratch,
            })
        };
    let sums: Vec<f64> = if m * n >= PAR_THRESHOLD && rayon::current_num_threads() > 1 {
        a.par_chunks_mut(ea)
            .zip(e.par_chunks_mut(ea))
            .zip(bits.par_chunks_mut(bb))
            .enumerate()
            .map_init(Scratch::default, |scratch, (t, ((ac, ec), bc))| {
                body(scratch, t * rpt, ac, ec, bc)
            })
            .collect()
    } else {
        let mut scratch = Scratch::default();
        a.chunks_mut(ea)
            .zip(e.chunks_mut(ea))
            .zip(bits.chunks_mut(bb))
            .enumerate()
            .map(|(t, ((ac, ec), bc))| body(&mut scratch, t * rpt, ac, ec, bc))
            .collect()
    };
    sums.iter().sum()
}

/// Per-thread buffers for the products of one row tile.
#[derive(Default)]
struct Scratch {
    p: Vec<f32>,
    q: Vec<f32>,
}

/// One row tile of [`update_state`], run under [`pulp::Arch::dispatch`] so that its loops
/// are compiled for the best available instruction set.
struct UpdateTile<'a> {
    a: &'a mut [f32],
    e: &'a mut [f32],
    bits: &'a mut [u8],
    n: usize,
    k: usize,
    /// This tile's rows of `u` (row-major `rows × k`) and the whole `v` (`k × n`).
    f: (&'a [f32], &'a [f32]),
    g: (&'a [f32], &'a [f32]),
    last: bool,
    products: Products,
    residual: Residual,
    scratch: &'a mut Scratch,
}

/// Which residual [`update_state`] carries in `A = |R|` and the packed signs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Residual {
    /// `R` of the unrounded f32 factors `f`; `E` (the stored blocks' error) is updated
    /// separately with `g` (the reference implementation's arithmetic).
    Unrounded,
    /// `R = E`, the error of the stored blocks `g` (`f` is not used, `E` is not touched): one
    /// product per tile, and the returned error is `‖A − Q‖²`.
    Stored,
}

/// How [`update_state`] forms the products `u v` of a row tile.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Products {
    /// [`tile_product`]: register-blocked loops under the dispatched instruction set.
    Simd,
    /// faer's matrix product per tile (the unfused implementation's arithmetic).
    Faer,
}

impl pulp::WithSimd for UpdateTile<'_> {
    type Output = f64;

    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, _simd: S) -> f64 {
        let Self {
            a,
            e,
            bits,
            n,
            k,
            f,
            g,
            last,
            products,
            residual,
            scratch,
        } = self;
        let len = e.len();
        if scratch.q.len() < len {
            scratch.q.resize(len, 0.0);
            scratch.p.resize(len, 0.0);
        }
        let (p, q) = (&mut scratch.p[..len], &mut scratch.q[..len]);
        // Direct calls (no function pointer or closure): `tile_product` is inlined here and
        // compiled for the dispatched instruction set.
        match products {
            Products::Simd => tile_product(g.0, g.1, n, k, q),
            Products::Faer => faer_tile_product(g.0, g.1, n, k, q),
        }
        if residual == Residual::Stored {
            return if last {
                a.iter().zip(q.iter()).fold(0.0f64, |acc, (&x, &y)| {
                    let d = x - y;
                    acc + f64::from(d * d)
                })
            } else if n.is_multiple_of(8) {
                update_bytes(a, None, bits, q, q)
            } else {
                update_bits(a, None, bits, q, q)
            };
        }
        if last {
            return update_error_only(e, bits, q);
        }
        match products {
            Products::Simd => tile_product(f.0, f.1, n, k, p),
            Products::Faer => faer_tile_product(f.0, f.1, n, k, p),
        }
        if n.is_multiple_of(8) {
            update_bytes(a, Some(e), bits, p, q)
        } else {
            update_bits(a, Some(e), bits, p, q)
        }
    }
}

/// `out = u_tile · v` for row-major `u_tile` (`rows × k`), `v` (`k × n`), `out` (`rows × n`):
/// whole column blocks through [`panel_products`], the last columns row by row.
///
/// Each output entry is `Σ_r u[i, r] · v[r, j]` summed in order `r = 0, 1, …` (no FMA), so
/// the result does not depend on the SIMD width.
#[inline(always)]
fn tile_product(u_tile: &[f32], v: &[f32], n: usize, k: usize, out: &mut [f32]) {
    let whole = panel_products(u_tile, v, n, k, |i, j0, acc| {
        out[i * n + j0..i * n + j0 + PANEL_COLS].copy_from_slice(acc);
    });
    if whole < n {
        for (urow, orow) in u_tile.chunks_exact(k).zip(out.chunks_exact_mut(n)) {
            let rem = &mut orow[whole..];
            rem.fill(0.0);
            for (vrow, &c) in v.chunks_exact(n).zip(urow) {
                for (x, &y) in rem.iter_mut().zip(&vrow[whole..]) {
                    *x += c * y;
                }
            }
        }
    }
}

/// `out = u_tile · v` with faer (as [`tile_product`], on the calling thread).
fn faer_tile_product(u_tile: &[f32], v: &[f32], n: usize, k: usize, out: &mut [f32]) {
    let rows = out.len() / n.max(1);
    // Row-major X (r×c) is column-major Xᵀ (c×r): outᵀ = vᵀ u_tileᵀ, all column-major.
    let vt = MatRef::from_column_major_slice(v, n, k);
    let ut = MatRef::from_column_major_slice(u_tile, k, rows);
    let out_t = MatMut::from_column_major_slice_mut(out, n, rows);
    matmul(out_t, Accum::Replace, vt, ut, 1.0, Par::Seq);
}

/// `E ← E − S ⊙ Q` only (the last block); returns `‖E‖²` over the chunk.
#[inline(always)]
fn update_error_only(ec: &mut [f32], bc: &[u8], q: &[f32]) -> f64 {
    let mut sum = 0.0f64;
    for (loc, (ev, &qv)) in ec.iter_mut().zip(q).enumerate() {
        let positive = bc[loc >> 3] & (0x80 >> (loc & 7)) != 0;
        let x = *ev - if positive { qv } else { -qv };
        *ev = x;
        sum += f64::from(x) * f64::from(x);
    }
    sum
}

/// The full update when rows start on byte boundaries (`n % 8 == 0`): one packed byte of
/// signs, eight values, at a time. Without `E` (the stored-residual mode, `p = q`), the
/// error is that of the new residual, `Σ (A − Q)²`.
#[inline(always)]
fn update_bytes(
    ac: &mut [f32],
    ec: Option<&mut [f32]>,
    bc: &mut [u8],
    p: &[f32],
    q: &[f32],
) -> f64 {
    let mut sum = 0.0f64;
    let Some(ec) = ec else {
        for ((byte, a8), p8) in bc
            .iter_mut()
            .zip(ac.chunks_exact_mut(8))
            .zip(p.chunks_exact(8))
        {
            // Branch-free, so that the eight lanes vectorize: `ge`/`le` pack `d ≥ 0` / `d ≤ 0`
            // (bit 7 = first entry); a set sign keeps `d ≥ 0`, a clear one `d ≤ 0`.
            let old = *byte;
            let mut d = [0.0f32; 8];
            let (mut ge, mut le) = (0u8, 0u8);
            for t in 0..8 {
                d[t] = a8[t] - p8[t];
                a8[t] = d[t].abs();
                ge |= u8::from(d[t] >= 0.0) << (7 - t);
                le |= u8::from(d[t] <= 0.0) << (7 - t);
            }
            *byte = (old & ge) | (!old & le);
            let sq = d.map(|x| x * x);
            let part = ((sq[0] + sq[1]) + (sq[2] + sq[3])) + ((sq[4] + sq[5]) + (sq[6] + sq[7]));
            sum += f64::from(part);
        }
        return sum;
    };
    for ((((byte, a8), e8), p8), q8) in bc
        .iter_mut()
        .zip(ac.chunks_exact_mut(8))
        .zip(ec.chunks_exact_mut(8))
        .zip(p.chunks_exact(8))
        .zip(q.chunks_exact(8))
    {
        let old = *byte;
        let mut new = 0u8;
        let mut part = 0.0f32;
        for t in 0..8 {
            // ±1 for the old sign: multiplying by it is exact.
            let sign = if (old >> (7 - t)) & 1 == 1 {
                1.0f32
            } else {
                -1.0
            };
            let x = e8[t] - sign * q8[t];
            e8[t] = x;
            part += x * x;
            let d = a8[t] - p8[t];
            a8[t] = d.abs();
            // R' = S·(A − P) ≥ 0 (−0 included): sign(0) = +1.
            new |= u8::from(sign * d >= 0.0) << (7 - t);
        }
        *byte = new;
        sum += f64::from(part);
    }
    sum
}

/// The full update for any `n` (rows not byte-aligned), one bit at a time.
#[inline(always)]
fn update_bits(
    ac: &mut [f32],
    mut ec: Option<&mut [f32]>,
    bc: &mut [u8],
    p: &[f32],
    q: &[f32],
) -> f64 {
    let mut sum = 0.0f64;
    for (loc, ((av, &pv), &qv)) in ac.iter_mut().zip(p).zip(q).enumerate() {
        let (byte, mask) = (loc >> 3, 0x80u8 >> (loc & 7));
        let positive = bc[byte] & mask != 0;
        let d = *av - pv;
        match ec.as_deref_mut() {
            Some(ec) => {
                let x = ec[loc] - if positive { qv } else { -qv };
                ec[loc] = x;
                sum += f64::from(x) * f64::from(x);
            }
            None => sum += f64::from(d) * f64::from(d),
        }
        *av = d.abs();
        // R' = S·(A − P): + when (S = + and d ≥ 0) or (S = − and d ≤ 0); sign(0) = +1.
        let new_positive = if positive { d >= 0.0 } else { d <= 0.0 };
        if new_positive {
            bc[byte] |= mask;
        } else {
            bc[byte] &= !mask;
        }
    }
    sum
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rand::{Rng, SeedableRng};

    fn randoms(len: usize, rng: &mut impl Rng) -> Vec<f32> {
        (0..len).map(|_| rng.random_range(-1.0f32..1.0)).collect()
    }

    /// The residual update written out entry by entry (f64 products, unpacked signs).
    #[allow(clippy::too_many_arguments)]
    fn naive_update(
        a: &mut [f32],
        e: &mut [f32],
        signs: &mut [bool],
        n: usize,
        k: usize,
        f: (&[f32], &[f32]),
        g: (&[f32], &[f32]),
        last: bool,
    ) -> f64 {
        let prod = |u: &[f32], v: &[f32], i: usize, j: usize| -> f32 {
            (0..k).map(|r| u[i * k + r] * v[r * n + j]).sum()
        };
        let mut sum = 0.0;
        for idx in 0..a.len() {
            let (i, j) = (idx / n, idx % n);
            let s = if signs[idx] { 1.0 } else { -1.0 };
            e[idx] -= s * prod(g.0, g.1, i, j);
            sum += f64::from(e[idx]).powi(2);
            if !last {
                let d = a[idx] - prod(f.0, f.1, i, j);
                a[idx] = d.abs();
                signs[idx] = s * d >= 0.0;
            }
        }
        sum
    }

    /// Compares [`update_state`] with [`naive_update`] on random data.
    fn check_update(
        m: usize,
        n: usize,
        k: usize,
        last: bool,
        seed: u64,
    ) -> Result<(), TestCaseError> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let w = randoms(m * n, &mut rng);
        let s = vec![1.0f32; n];
        let (mut a, mut e) = (vec![0.0f32; m * n], vec![0.0f32; m * n]);
        let mut bits = vec![0u8; packed_len(m, n)];
        init_state(&w, &s, m, n, &mut a, &mut e, &mut bits, Residual::Unrounded);
        let (a, e, bits) = (a, e, bits);
        let mut signs: Vec<bool> = w.iter().map(|&x| x >= 0.0).collect();
        let (mut a0, mut e0) = (a.clone(), e.clone());
        let (fu, fv) = (randoms(m * k, &mut rng), randoms(k * n, &mut rng));
        let (gu, gv) = (randoms(m * k, &mut rng), randoms(k * n, &mut rng));
        let want = naive_update(
            &mut a0,
            &mut e0,
            &mut signs,
            n,
            k,
            (&fu, &fv),
            (&gu, &gv),
            last,
        );
        let tol = 1e-5 * k as f32;
        for products in [Products::Simd, Products::Faer] {
            let (mut a, mut e, mut bits) = (a.clone(), e.clone(), bits.clone());
            let got = update_state(
                &mut a,
                &mut e,
                &mut bits,
                m,
                n,
                k,
                (&fu, &fv),
                (&gu, &gv),
                last,
                (products, Residual::Unrounded),
            );
            prop_assert!((got - want).abs() <= 1e-4 * want.max(1.0));
            for idx in 0..m * n {
                prop_assert!((e[idx] - e0[idx]).abs() <= tol);
                prop_assert!((a[idx] - a0[idx]).abs() <= tol);
                let bit = bits[idx >> 3] & (0x80 >> (idx & 7)) != 0;
                prop_assert!(bit == signs[idx] || a0[idx] <= tol, "sign at {idx}");
            }
        }
        // The stored-residual mode is the naive update with f = g: `A`, the signs and the
        // error are those of `E` (`E` itself is not touched).
        let mut signs: Vec<bool> = w.iter().map(|&x| x >= 0.0).collect();
        let (mut a0, mut e0) = (a.clone(), e.clone());
        let want = naive_update(
            &mut a0,
            &mut e0,
            &mut signs,
            n,
            k,
            (&gu, &gv),
            (&gu, &gv),
            last,
        );
        let (mut a1, mut e1, mut bits1) = (a.clone(), e.clone(), bits.clone());
        let got = update_state(
            &mut a1,
            &mut e1,
            &mut bits1,
            m,
            n,
            k,
            (&fu, &fv),
            (&gu, &gv),
            last,
            (Products::Simd, Residual::Stored),
        );
        prop_assert!(
            (got - want).abs() <= 1e-4 * want.max(1.0),
            "{} vs {}",
            got,
            want
        );
        prop_assert_eq!(&e1, &e);
        for idx in 0..m * n {
            prop_assert!((a1[idx] - a0[idx]).abs() <= tol);
            let bit = bits1[idx >> 3] & (0x80 >> (idx & 7)) != 0;
            prop_assert!(bit == signs[idx] || a0[idx] <= tol, "sign at {idx}");
            if !last {
                // The invariant that makes `E` redundant: E = S ⊙ A.
                let s = if bit { 1.0 } else { -1.0 };
                prop_assert!((s * a1[idx] - e0[idx]).abs() <= tol, "E = S A at {idx}");
            }
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

        /// The tiled, SIMD-dispatched update agrees with the naive one (up to the rounding of
        /// the products; signs may differ only where `A − P` is within rounding of 0).
        #[test]
        fn update_state_matches_naive(
            m in 1usize..40,
            n in 1usize..150,
            k in 1usize..20,
            last: bool,
            seed: u64,
        ) {
            check_update(m, n, k, last, seed)?;
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

        /// The fused AVX-512 update of the fast mode is bit for bit the portable one
        /// (`tile_product` then `update_bytes`): `A`, the signs and `Σ D²`, with `D = 0`
        /// entries (a zero row of `u` against zeros of `A`) among them.
        #[test]
        fn fused_update_is_the_portable_one_bit_for_bit(
            rows in 1usize..12,
            n16 in 1usize..14,
            k in 1usize..33,
            seed: u64,
        ) {
            prop_assume!(skinny::accelerated());
            let n = 16 * n16;
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            let mut a0: Vec<f32> = randoms(rows * n, &mut rng).iter().map(|x| x.abs()).collect();
            for x in a0.iter_mut().step_by(7) {
                *x = 0.0;
            }
            let bits0: Vec<u8> = (0..rows * n / 8).map(|_| rng.random()).collect();
            let mut u = randoms(rows * k, &mut rng);
            u[..k].fill(0.0);
            let v = randoms(k * n, &mut rng);

            let mut q = vec![0.0f32; rows * n];
            tile_product(&u, &v, n, k, &mut q);
            let (mut a1, mut b1) = (a0.clone(), bits0.clone());
            let s1 = update_bytes(&mut a1, None, &mut b1, &q, &q);

            let vp = skinny::v_panels(&v, n, k);
            let (mut a2, mut b2) = (a0, bits0);
            let s2 = skinny::stored_update(&mut a2, &mut b2, &u, &vp, n, k).unwrap();
            prop_assert_eq!(s1.to_bits(), s2.to_bits());
            prop_assert_eq!(b1, b2);
            let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
            prop_assert_eq!(bits(&a1), bits(&a2));
        }
    }

    /// The parallel path (large enough matrices), byte-aligned rows or not.
    #[test]
    fn update_state_matches_naive_parallel() {
        for (m, n, k) in [(300, 250, 5), (256, 264, 16), (97, 1031, 3)] {
            for last in [false, true] {
                check_update(m, n, k, last, 7).unwrap();
            }
        }
    }
}
