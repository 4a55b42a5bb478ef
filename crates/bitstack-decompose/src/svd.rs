//! Top-k singular triplets of a (nonnegative) row-major matrix: exact and randomized.

use faer::linalg::matmul::matmul;
use faer::{Accum, Mat, MatMut, MatRef, Par};
use rand::{Rng, SeedableRng};
use rayon::prelude::*;

use crate::skinny::{self, AT_CHUNK};
use crate::SvdMethod;

/// Below this many entries the products and SVDs run on one thread.
pub(crate) const PAR_THRESHOLD: usize = 1 << 16;

/// The top-`k` triplets, split as `u = U_k Σ^{1/2}` (m×k) and `v = Σ^{1/2} V_kᵀ` (k×n),
/// both row-major f32.
#[derive(Debug, Clone)]
pub(crate) struct SplitFactors {
    pub(crate) u: Vec<f32>,
    pub(crate) v: Vec<f32>,
    /// The randomized method's orthonormal right Ritz basis (`n × l`, columns by decreasing
    /// Ritz value): the warm start of the next block's sketch. `None` for the exact SVD.
    pub(crate) basis: Option<Mat<f32>>,
}

/// `(U[:, :k], σ[:k], V[:, :k])` of `A`.
type Triplets = (Mat<f32>, Vec<f32>, Mat<f32>);

/// The SVD did not converge.
#[derive(Debug, Clone, Copy)]
pub(crate) struct NoConvergence;

pub(crate) fn parallelism(entries: usize) -> Par {
    if entries >= PAR_THRESHOLD && rayon::current_num_threads() > 1 {
        Par::rayon(0)
    } else {
        Par::Seq
    }
}

/// Top-`k` split factors of the row-major `m×n` matrix `a`.
///
/// Sign convention (deterministic): every column of `u` has a nonnegative sum (for a
/// nonnegative `a` the leading singular vectors are then the nonnegative Perron vectors).
pub(crate) fn top_k_split(
    a: &[f32],
    m: usize,
    n: usize,
    k: usize,
    method: SvdMethod,
    seed: u64,
    warm: Option<MatRef<'_, f32>>,
) -> Result<SplitFactors, NoConvergence> {
    debug_assert_eq!(a.len(), m * n);
    debug_assert!(k >= 1 && k <= m.min(n));
    // Row-major m×n data is the column-major n×m matrix Aᵀ: faer's preferred layout.
    let at = MatRef::from_column_major_slice(a, n, m);
    let par = parallelism(m * n);
    match method {
        SvdMethod::Exact => {
            let (u_mat, s, v_mat) = exact(at, k)?;
            Ok(split(u_mat.as_ref(), &s, v_mat.as_ref(), k, None))
        }
        SvdMethod::Randomized {
            oversample,
            power_iters,
            warm_start,
            block_krylov,
        } => {
            let warm = if warm_start { warm } else { None };
            let sketch = Sketch {
                k,
                oversample,
                power_iters,
                block_krylov,
                seed,
            };
            let ((u_mat, s, v_mat), basis) = randomized(a, at, &sketch, warm, par)?;
            Ok(split(u_mat.as_ref(), &s, v_mat.as_ref(), k, Some(basis)))
        }
    }
}

/// The randomized range finder's settings for one block.
struct Sketch {
    k: usize,
    oversample: usize,
    power_iters: usize,
    block_krylov: bool,
    seed: u64,
}

/// The top-k triplets of `A` from the thin SVD of `Aᵀ = V Σ Uᵀ`.
fn exact(at: MatRef<'_, f32>, k: usize) -> Result<Triplets, NoConvergence> {
    let svd = at.thin_svd().map_err(|_| NoConvergence)?;
    let s: Vec<f32> = (0..k).map(|r| svd.S()[r]).collect();
    // svd of Aᵀ: U' = V_A, V' = U_A.
    let u = svd.V().subcols(0, k).to_owned();
    let v = svd.U().subcols(0, k).to_owned();
    Ok((u, s, v))
}

/// Halko–Martinsson–Tropp randomized SVD with `power_iters` QR-stabilised power iterations,
/// `2·power_iters + 2` products with `A` or `Aᵀ` in all.
///
/// The test matrix is Gaussian, or, with a `warm` basis (the previous block's right Ritz
/// vectors, by decreasing Ritz value), its leading `l − ⌈oversample / 2⌉` columns followed by
/// fresh Gaussian columns: the AVD's successive residuals have related dominant subspaces,
/// so a warm start needs fewer power iterations for the same accuracy.
///
/// With `block_krylov`, the Rayleigh–Ritz step uses the span of all the power iterations'
/// blocks `[Q₀ Q₁ … Q_q]` rather than `Q_q` alone (block Krylov; far more accurate when
/// `σ_k ≈ σ_{k+1}`, as in `|R|`'s flat tail), reusing `Aᵀ Q₀` from the first iteration.
///
/// Returns the top-`k` triplets and the right Ritz basis (`n × w`, `w ≥ l`).
fn randomized(
    a: &[f32],
    at: MatRef<'_, f32>,
    sketch: &Sketch,
    warm: Option<MatRef<'_, f32>>,
    par: Par,
) -> Result<(Triplets, Mat<f32>), NoConvergence> {
    let (n, m) = at.shape();
    let k = sketch.k;
    let l = k.saturating_add(sketch.oversample).min(m.min(n));

    // `A X` is computed as `(Xᵀ Aᵀ)ᵀ` and `Aᵀ Y` directly, so that the large operand is
    // always the column-major `Aᵀ` on the right or left of a skinny matrix (faer's fast
    // layouts; a row-major `A` operand is ~2–3× slower).
    let omega_t = match warm {
        Some(basis) if basis.nrows() == n && basis.ncols() >= l => {
            let fresh = (l - k).div_ceil(2);
            let kept = l - fresh;
            let mut omega_t = gaussian(l, n, sketch.seed);
            omega_t
                .as_mut()
                .subrows_mut(0, kept)
                .copy_from(basis.subcols(0, kept).transpose());
            omega_t
        }
        _ => gaussian(l, n, sketch.seed),
    };
    let mut q = sketch_basis(a_times(a, at, omega_t.transpose(), par).as_ref(), par);
    let mut z = Mat::<f32>::zeros(n, l);
    // Block Krylov: the later blocks Q₁ … Q_q, and Z₀ = Aᵀ Q₀ (reused in the last step).
    let mut later: Vec<Mat<f32>> = Vec::new();
    let mut z0: Option<Mat<f32>> = None;
    let q0 = if sketch.block_krylov {
        q.clone()
    } else {
        Mat::new()
    };
    for _ in 0..sketch.power_iters {
        at_times(a, z.as_mut(), at, q.as_ref(), par);
        if sketch.block_krylov && z0.is_none() {
            z0 = Some(z.clone());
        }
        let qz = sketch_basis(z.as_ref(), par);
        q = sketch_basis(a_times(a, at, qz.as_ref(), par).as_ref(), par);
        if sketch.block_krylov {
            later.push(q.clone());
        }
    }
    match z0 {
        Some(z0) if m.min(n) == l => {
            q = q0;
            z = z0;
        }
        Some(z0) => {
            // Q = orth([Q₀ Q₁ … Q_q]) (`krylov_basis`, else Householder: orthonormal even
            // where the blocks are nearly dependent). Its first l columns span Q₀:
            // Q[:, :l] = Q₀ T with T = Q₀ᵀ Q[:, :l] orthogonal, so Aᵀ Q[:, :l] = Z₀ T and the last product with
            // Aᵀ has width q·l instead of (q + 1)·l.
            let w = (l * (later.len() + 1)).min(m.min(n));
            let mut blocks = Vec::with_capacity(later.len());
            let mut c0 = l;
            for b in &later {
                let c = b.ncols().min(w - c0);
                blocks.push(b.subcols(0, c));
                c0 += c;
            }
            q = match krylov_basis(q0.as_ref(), &blocks, par) {
                Some(q) => q,
                None => {
                    let mut kk = Mat::<f32>::zeros(m, w);
                    kk.as_mut().subcols_mut(0, l).copy_from(&q0);
                    let mut c0 = l;
                    for b in &blocks {
                        kk.as_mut().subcols_mut(c0, b.ncols()).copy_from(b);
                        c0 += b.ncols();
                    }
                    orthonormal_basis(kk.as_ref())
                }
            };
            let mut t = Mat::<f32>::zeros(l, l);
            matmul(
                t.as_mut(),
                Accum::Replace,
                q0.transpose(),
                q.subcols(0, l),
                1.0,
                Par::Seq,
            );
            z = Mat::<f32>::zeros(n, w);
            matmul(
                z.as_mut().subcols_mut(0, l),
                Accum::Replace,
                z0.as_ref(),
                t.as_ref(),
                1.0,
                Par::Seq,
            );
            at_times(
                a,
                z.as_mut().subcols_mut(l, w - l),
                at,
                q.subcols(l, w - l),
                par,
            );
        }
        None => {
            // Bᵀ = Aᵀ Q (n×l);  Bᵀ = P Σ Rᵀ  ⇒  A ≈ Q B = (Q R) Σ Pᵀ.
            at_times(a, z.as_mut(), at, q.as_ref(), par);
        }
    }
    let svd = z.thin_svd().map_err(|_| NoConvergence)?;
    let s: Vec<f32> = (0..k).map(|r| svd.S()[r]).collect();
    let mut u = Mat::<f32>::zeros(m, k);
    matmul(
        u.as_mut(),
        Accum::Replace,
        q.as_ref(),
        svd.V().subcols(0, k),
        1.0,
        Par::Seq,
    );
    let basis = svd.U().to_owned();
    let v = basis.subcols(0, k).to_owned();
    Ok(((u, s, v), basis))
}

/// `Y = A X` (`m × l`) for the row-major `m × n` matrix `a` (`at` is the same data as the
/// column-major `Aᵀ`) and `x` (`n × l`): [`skinny::a_times`] where it runs, else faer.
///
/// faer computes it as `Yᵀ = Xᵀ Aᵀ`, so that the large operand is the column-major `Aᵀ` on
/// the right of a skinny matrix (its fast layout; a row-major `A` operand is ~2–3× slower).
fn a_times(a: &[f32], at: MatRef<'_, f32>, x: MatRef<'_, f32>, par: Par) -> Mat<f32> {
    let (n, m) = at.shape();
    if let Some(y) = skinny::a_times(a, m, n, x, matches!(par, Par::Rayon(_))) {
        return y;
    }
    let mut y_t = Mat::<f32>::zeros(x.ncols(), m);
    matmul(y_t.as_mut(), Accum::Replace, x.transpose(), at, 1.0, par);
    y_t.transpose().to_owned()
}

/// `z = Aᵀ q` for `at = Aᵀ` (`n × m`, column-major, the same data as the row-major `a`) and
/// `q` (`m × w`): [`skinny::at_times`] where it runs, else faer.
///
/// faer does not split the reduction over the long dimension `m` across threads (one
/// thread does all the work); so with faer the rows of `A` are cut into fixed chunks of [`AT_CHUNK`], whose
/// partial products run in parallel and are added in chunk order. The chunking does not
/// depend on the thread count, so neither does the result.
fn at_times(a: &[f32], mut z: MatMut<'_, f32>, at: MatRef<'_, f32>, q: MatRef<'_, f32>, par: Par) {
    let (n, m) = at.shape();
    match skinny::at_times(a, m, n, q, matches!(par, Par::Rayon(_))) {
        Some(product) => z.copy_from(&product),
        None => faer_at_times(z, at, q, par),
    }
}

/// [`at_times`] with faer's products.
fn faer_at_times(mut z: MatMut<'_, f32>, at: MatRef<'_, f32>, q: MatRef<'_, f32>, par: Par) {
    let (n, m) = at.shape();
    let w = q.ncols();
    let chunks = m.div_ceil(AT_CHUNK);
    if chunks <= 1 {
        // One chunk: faer splits the n output rows (the reduction order is unchanged).
        matmul(z, Accum::Replace, at, q, 1.0, par);
        return;
    }
    let partial = |c: usize| {
        let r0 = c * AT_CHUNK;
        let len = AT_CHUNK.min(m - r0);
        let mut p = Mat::<f32>::zeros(n, w);
        matmul(
            p.as_mut(),
            Accum::Replace,
            at.subcols(r0, len),
            q.subrows(r0, len),
            1.0,
            Par::Seq,
        );
        p
    };
    let parts: Vec<Mat<f32>> = match par {
        Par::Seq => (0..chunks).map(partial).collect(),
        Par::Rayon(_) => (0..chunks).into_par_iter().map(partial).collect(),
    };
    z.copy_from(&parts[0]);
    for p in &parts[1..] {
        z += p;
    }
}

/// Orthonormal basis of the columns of a sketch `y` (tall, well-conditioned: a product of
/// `|R|` or `|R|ᵀ` with an orthonormal or Gaussian block), column-major.
///
/// CholeskyQR2 in f64 (Fukaya et al. 2014): `G = YᵀY = L Lᵀ`, `Y ← Y L⁻ᵀ`, twice. Its two
/// Gram products are matrix products, 3–4× faster than faer's Householder QR on 14336 × 32
/// here (~13 ms); in f64 it is orthonormal to f32 rounding for condition numbers up to
/// ~10⁷, and the sketches' are ~10²–10³ (`σ₁(|R|) / σ_l`). Where the Cholesky factorisation
/// fails (a rank-deficient or badly conditioned sketch, e.g. a residual that is already
/// small), it falls back to [`orthonormal_basis`]. Spans the same space as Householder's
/// thin Q, with a different basis of it: the Ritz values and vectors do not depend on it.
fn sketch_basis(y: MatRef<'_, f32>, par: Par) -> Mat<f32> {
    let (m, l) = y.shape();
    let par = if m * l >= PAR_THRESHOLD {
        par
    } else {
        Par::Seq
    };
    let mut q = Mat::<f64>::from_fn(m, l, |i, j| f64::from(y[(i, j)]));
    if cholesky_qr2(&mut q, par) {
        Mat::<f32>::from_fn(m, l, |i, j| q[(i, j)] as f32)
    } else {
        orthonormal_basis(y)
    }
}

/// CholeskyQR2 of the tall `q` in place; false (and `q` unspecified) where a Cholesky
/// factorisation fails or the result is not finite.
///
/// The second pass is the check: its Gram matrix must be within 0.5 of the identity in
/// every entry (CholeskyQR is accurate when `cond(q)² · ε ≪ 1`; the first pass leaves an
/// orthonormality error of about `cond(q)² · ε`, which the second removes).
fn cholesky_qr2(q: &mut Mat<f64>, par: Par) -> bool {
    for pass in 0..2 {
        let g = transpose_times(q.as_ref(), q.as_ref(), par);
        if pass == 1 && !near_identity(g.as_ref(), 0.5) {
            return false;
        }
        let Ok(chol) = g.llt(faer::Side::Lower) else {
            return false;
        };
        // Qᵀ ← L⁻¹ Qᵀ.
        faer::linalg::triangular_solve::solve_lower_triangular_in_place(
            chol.L(),
            q.as_mut().transpose_mut(),
            par,
        );
    }
    q.as_ref()
        .col_iter()
        .all(|c| c.iter().all(|x| x.is_finite()))
}

/// An orthonormal basis of `[Q₀ B₁ … B_q]` whose first columns are the orthonormal `q0`
/// itself, for the block Krylov step: each later block is projected off the basis so far
/// twice (block Gram–Schmidt with reorthogonalisation) and orthonormalised by
/// CholeskyQR2, in f64 — a few small products instead of a Householder QR of the whole
/// `m × (q + 1)·l` matrix (~45 ms at 14336 × 96 here, 12 % of a block).
///
/// Directions of a block already in the span of the earlier ones leave only rounding
/// noise after the projections; CholeskyQR2 orthonormalises that noise like any other
/// direction (as Householder would), and the Rayleigh–Ritz step gives it no weight. `None`
/// where a factorisation fails ([`cholesky_qr2`]'s check): the caller then takes
/// Householder.
fn krylov_basis(q0: MatRef<'_, f32>, later: &[MatRef<'_, f32>], par: Par) -> Option<Mat<f32>> {
    let (m, l) = q0.shape();
    let w = l + later.iter().map(|b| b.ncols()).sum::<usize>();
    let par = if m * w >= PAR_THRESHOLD {
        par
    } else {
        Par::Seq
    };
    let mut basis = Mat::<f64>::zeros(m, w);
    for j in 0..l {
        for i in 0..m {
            basis[(i, j)] = f64::from(q0[(i, j)]);
        }
    }
    let mut c0 = l;
    for b in later {
        let c = b.ncols();
        let mut wb = Mat::<f64>::from_fn(m, c, |i, j| f64::from(b[(i, j)]));
        for _ in 0..2 {
            let prev = basis.subcols(0, c0);
            let coef = transpose_times(prev, wb.as_ref(), par);
            matmul(wb.as_mut(), Accum::Add, prev, coef.as_ref(), -1.0, par);
        }
        if !cholesky_qr2(&mut wb, par) {
            return None;
        }
        basis.as_mut().subcols_mut(c0, c).copy_from(&wb);
        c0 += c;
    }
    Some(Mat::<f32>::from_fn(m, w, |i, j| basis[(i, j)] as f32))
}

/// `aᵀ b` for tall `a` and `b` (f64): the reduction over their rows runs in fixed chunks of
/// [`AT_CHUNK`] rows, in parallel, added in chunk order (faer runs a long reduction on one
/// thread; the result does not depend on the thread count).
fn transpose_times(a: MatRef<'_, f64>, b: MatRef<'_, f64>, par: Par) -> Mat<f64> {
    let m = a.nrows();
    let partial = |c: usize| {
        let r0 = c * AT_CHUNK;
        let len = AT_CHUNK.min(m - r0);
        let mut p = Mat::<f64>::zeros(a.ncols(), b.ncols());
        matmul(
            p.as_mut(),
            Accum::Replace,
            a.subrows(r0, len).transpose(),
            b.subrows(r0, len),
            1.0,
            Par::Seq,
        );
        p
    };
    let chunks = m.div_ceil(AT_CHUNK).max(1);
    let parts: Vec<Mat<f64>> = match par {
        Par::Rayon(_) if chunks > 1 => (0..chunks).into_par_iter().map(partial).collect(),
        _ => (0..chunks).map(partial).collect(),
    };
    let mut sum = parts[0].clone();
    for p in &parts[1..] {
        sum += p;
    }
    sum
}

/// Whether every entry of the square `g` is within `tol` of the identity's.
fn near_identity(g: MatRef<'_, f64>, tol: f64) -> bool {
    (0..g.ncols())
        .all(|j| (0..g.nrows()).all(|i| (g[(i, j)] - f64::from(u8::from(i == j))).abs() <= tol))
}

/// Thin Q of a tall matrix (Householder QR), column-major.
fn orthonormal_basis(y: MatRef<'_, f32>) -> Mat<f32> {
    if y.row_stride() == 1 {
        y.qr().compute_thin_Q()
    } else {
        y.to_owned().qr().compute_thin_Q()
    }
}

/// An `rows × cols` standard Gaussian matrix (Box–Muller on a ChaCha stream).
fn gaussian(rows: usize, cols: usize, seed: u64) -> Mat<f32> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut next = {
        let mut spare: Option<f64> = None;
        move || -> f32 {
            if let Some(z) = spare.take() {
                return z as f32;
            }
            // u1 in (0, 1] so that ln(u1) is finite.
            let u1 = 1.0 - rng.random::<f64>();
            let u2 = rng.random::<f64>();
            let r = (-2.0 * u1.ln()).sqrt();
            let (s, c) = (std::f64::consts::TAU * u2).sin_cos();
            spare = Some(r * s);
            (r * c) as f32
        }
    };
    Mat::from_fn(rows, cols, |_, _| next())
}

/// `u = U Σ^{1/2}` (row-major m×k), `v = Σ^{1/2} Vᵀ` (row-major k×n), with the sign of each
/// triplet chosen so that the column sum of `u` is nonnegative.
fn split(
    u_mat: MatRef<'_, f32>,
    s: &[f32],
    v_mat: MatRef<'_, f32>,
    k: usize,
    basis: Option<Mat<f32>>,
) -> SplitFactors {
    let m = u_mat.nrows();
    let n = v_mat.nrows();
    let mut u = vec![0.0f32; m * k];
    let mut v = vec![0.0f32; k * n];
    for r in 0..k {
        let col_sum: f64 = (0..m).map(|i| f64::from(u_mat[(i, r)])).sum();
        let root = s[r].max(0.0).sqrt();
        let scale = if col_sum < 0.0 { -root } else { root };
        for i in 0..m {
            u[i * k + r] = u_mat[(i, r)] * scale;
        }
        let v_row = &mut v[r * n..(r + 1) * n];
        for (j, out) in v_row.iter_mut().enumerate() {
            // u and v flip together, so the product u v is unchanged.
            *out = v_mat[(j, r)] * scale;
        }
    }
    SplitFactors { u, v, basis }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn product(f: &SplitFactors, m: usize, n: usize, k: usize) -> Vec<f32> {
        let mut out = vec![0.0f32; m * n];
        for i in 0..m {
            for r in 0..k {
                for j in 0..n {
                    out[i * n + j] += f.u[i * k + r] * f.v[r * n + j];
                }
            }
        }
        out
    }

    fn low_rank_plus_noise(m: usize, n: usize, seed: u64) -> Vec<f32> {
        let g1 = gaussian(m, 3, seed);
        let g2 = gaussian(3, n, seed + 1);
        let noise = gaussian(m, n, seed + 2);
        let mut a = vec![0.0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                let mut x = 0.01 * noise[(i, j)];
                for r in 0..3 {
                    x += g1[(i, r)] * g2[(r, j)] * (3.0 - r as f32);
                }
                a[i * n + j] = x.abs();
            }
        }
        a
    }

    #[test]
    fn randomized_matches_exact_on_low_rank() {
        let (m, n, k) = (70, 45, 3);
        let a = low_rank_plus_noise(m, n, 7);
        let e = top_k_split(&a, m, n, k, SvdMethod::Exact, 0, None).unwrap();
        let r = top_k_split(&a, m, n, k, SvdMethod::DEFAULT_RANDOMIZED, 0, None).unwrap();
        let (pe, pr) = (product(&e, m, n, k), product(&r, m, n, k));
        let diff: f32 = pe.iter().zip(&pr).map(|(x, y)| (x - y).powi(2)).sum();
        let norm: f32 = pe.iter().map(|x| x * x).sum();
        assert!(diff.sqrt() < 1e-3 * norm.sqrt(), "{diff} vs {norm}");
        // Sign convention: nonnegative column sums of u.
        for f in [&e, &r] {
            for c in 0..k {
                let s: f32 = (0..m).map(|i| f.u[i * k + c]).sum();
                assert!(s >= 0.0);
            }
        }
    }

    #[test]
    fn randomized_is_deterministic() {
        let (m, n, k) = (40, 90, 4);
        let a = low_rank_plus_noise(m, n, 3);
        let r1 = top_k_split(&a, m, n, k, SvdMethod::DEFAULT_RANDOMIZED, 42, None).unwrap();
        let r2 = top_k_split(&a, m, n, k, SvdMethod::DEFAULT_RANDOMIZED, 42, None).unwrap();
        assert_eq!(r1.u, r2.u);
        assert_eq!(r1.v, r2.v);
    }

    #[test]
    fn every_randomized_variant_matches_exact_on_low_rank() {
        let (m, n, k) = (120, 75, 3);
        let a = low_rank_plus_noise(m, n, 9);
        let e = top_k_split(&a, m, n, k, SvdMethod::Exact, 0, None).unwrap();
        let pe = product(&e, m, n, k);
        let norm: f32 = pe.iter().map(|x| x * x).sum();
        // |low rank| is not low rank: the tolerance reflects each variant's accuracy.
        for (oversample, power_iters, warm_start, block_krylov, tol) in [
            (4, 0, false, false, 0.5),
            (8, 1, true, true, 1e-2),
            (16, 2, true, true, 1e-3),
            (60, 3, true, true, 1e-3), // the Krylov space is clamped to min(m, n)
            (8, 2, false, true, 1e-2),
        ] {
            let method = SvdMethod::Randomized {
                oversample,
                power_iters,
                warm_start,
                block_krylov,
            };
            // A cold call, then one warm-started from its basis.
            let cold = top_k_split(&a, m, n, k, method, 1, None).unwrap();
            let basis = cold.basis.clone().unwrap();
            assert!(basis.nrows() == n && basis.ncols() >= k);
            let warm = top_k_split(&a, m, n, k, method, 2, Some(basis.as_ref())).unwrap();
            for f in [&cold, &warm] {
                let pr = product(f, m, n, k);
                let diff: f32 = pe.iter().zip(&pr).map(|(x, y)| (x - y).powi(2)).sum();
                let rel = (diff / norm).sqrt();
                assert!(rel < tol, "{method:?}: relative difference {rel}");
            }
        }
    }

    #[test]
    fn chunked_at_times_matches_matmul() {
        let (m, n, w) = (2 * AT_CHUNK + 37, 23, 5);
        // Row-major A, i.e. the column-major n×m Aᵀ.
        let data: Vec<f32> = {
            let g = gaussian(n, m, 4);
            (0..m)
                .flat_map(|i| (0..n).map(move |j| (i, j)))
                .map(|(i, j)| g[(j, i)])
                .collect()
        };
        let a = MatRef::from_column_major_slice(&data, n, m);
        let q = gaussian(m, w, 5);
        let mut want = Mat::<f32>::zeros(n, w);
        matmul(want.as_mut(), Accum::Replace, a, q.as_ref(), 1.0, Par::Seq);
        for par in [Par::Seq, Par::rayon(2)] {
            let mut got = Mat::<f32>::zeros(n, w);
            let mut got_faer = Mat::<f32>::zeros(n, w);
            at_times(&data, got.as_mut(), a, q.as_ref(), par);
            faer_at_times(got_faer.as_mut(), a, q.as_ref(), par);
            for got in [&got, &got_faer] {
                for i in 0..n {
                    for j in 0..w {
                        let (x, y) = (got[(i, j)], want[(i, j)]);
                        assert!((x - y).abs() < 1e-3 * (1.0 + y.abs()), "{x} vs {y}");
                    }
                }
            }
        }
    }

    /// `‖QᵀQ − I‖_max` and `max_j ‖y_j − Q Qᵀ y_j‖ / ‖y_j‖` in f64.
    fn basis_errors(q: MatRef<'_, f32>, y: MatRef<'_, f32>) -> (f64, f64) {
        let (m, w) = q.shape();
        let q64 = Mat::<f64>::from_fn(m, w, |i, j| f64::from(q[(i, j)]));
        let y64 = Mat::<f64>::from_fn(m, y.ncols(), |i, j| f64::from(y[(i, j)]));
        let g = q64.transpose() * &q64;
        let ortho = (0..w)
            .flat_map(|j| (0..w).map(move |i| (i, j)))
            .map(|(i, j)| (g[(i, j)] - f64::from(u8::from(i == j))).abs())
            .fold(0.0, f64::max);
        let resid = &y64 - &q64 * (q64.transpose() * &y64);
        let span = (0..y.ncols())
            .map(|j| resid.col(j).norm_l2() / y64.col(j).norm_l2().max(1e-300))
            .fold(0.0, f64::max);
        (ortho, span)
    }

    /// CholeskyQR2 bases: orthonormal and spanning the sketch, Householder's where the
    /// sketch is rank-deficient (a repeated column).
    #[test]
    fn sketch_basis_is_an_orthonormal_basis_of_the_sketch() {
        for (m, l, par) in [
            (3000, 32, Par::rayon(2)),
            (200, 7, Par::Seq),
            (40, 40, Par::Seq),
        ] {
            let y = gaussian(m, l, 8);
            let q = sketch_basis(y.as_ref(), par);
            let (ortho, span) = basis_errors(q.as_ref(), y.as_ref());
            assert!(ortho < 1e-5 && span < 1e-5, "{m}x{l}: {ortho} {span}");
        }
        let mut y = gaussian(500, 6, 9);
        let first = y.col(0).to_owned();
        y.col_mut(3).copy_from(&first);
        let q = sketch_basis(y.as_ref(), Par::Seq);
        let (ortho, span) = basis_errors(q.as_ref(), y.as_ref());
        assert!(
            ortho < 1e-5 && span < 1e-5,
            "rank-deficient: {ortho} {span}"
        );
    }

    /// The block Krylov basis keeps `Q₀` as its first columns, is orthonormal, and spans
    /// the later blocks, also where a later block nearly repeats an earlier one.
    #[test]
    fn krylov_basis_extends_q0() {
        let (m, l) = (2500, 12);
        let q0 = orthonormal_basis(gaussian(m, l, 1).as_ref());
        let b1 = orthonormal_basis(gaussian(m, l, 2).as_ref());
        // Nearly in span(Q₀, B₁): a mix of their columns plus a little noise.
        let noise = gaussian(m, l, 3);
        let b2 = Mat::<f32>::from_fn(m, l, |i, j| {
            q0[(i, j)] + 0.5 * b1[(i, (j + 1) % l)] + 1e-4 * noise[(i, j)]
        });
        let b2 = orthonormal_basis(b2.as_ref());
        for par in [Par::Seq, Par::rayon(2)] {
            let q = krylov_basis(q0.as_ref(), &[b1.as_ref(), b2.as_ref()], par).unwrap();
            assert_eq!(q.ncols(), 3 * l);
            assert!(q.subcols(0, l) == q0.as_ref());
            for b in [q0.as_ref(), b1.as_ref(), b2.as_ref()] {
                let (ortho, span) = basis_errors(q.as_ref(), b);
                assert!(ortho < 1e-5 && span < 1e-4, "{ortho} {span}");
            }
        }
    }

    #[test]
    fn wide_and_tall_exact_reconstruct_full_rank() {
        for (m, n) in [(5, 9), (9, 5), (6, 6)] {
            let k = m.min(n);
            let a = low_rank_plus_noise(m, n, 11);
            let f = top_k_split(&a, m, n, k, SvdMethod::Exact, 0, None).unwrap();
            let p = product(&f, m, n, k);
            for (x, y) in a.iter().zip(&p) {
                assert!((x - y).abs() < 1e-4, "{x} vs {y}");
            }
        }
    }
}
