//! Top-k singular triplets of a (nonnegative) row-major matrix: exact and randomized.

use faer::linalg::matmul::matmul;
use faer::{Accum, Mat, MatMut, MatRef, Par};
use rand::{Rng, SeedableRng};
use rayon::prelude::*;

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
            let ((u_mat, s, v_mat), basis) = randomized(at, &sketch, warm, par)?;
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
    let mut y_t = Mat::<f32>::zeros(l, m);
    matmul(y_t.as_mut(), Accum::Replace, omega_t.as_ref(), at, 1.0, par);
    let mut q = orthonormal_basis(y_t.transpose());
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
        at_times(z.as_mut(), at, q.as_ref(), par);
        if sketch.block_krylov && z0.is_none() {
            z0 = Some(z.clone());
        }
        let qz = orthonormal_basis(z.as_ref());
        matmul(y_t.as_mut(), Accum::Replace, qz.transpose(), at, 1.0, par);
        q = orthonormal_basis(y_t.transpose());
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
            // Q = orth([Q₀ Q₁ … Q_q]) (Householder: orthonormal even where the blocks are
            // nearly dependent). Its first l columns span Q₀: Q[:, :l] = Q₀ T with
            // T = Q₀ᵀ Q[:, :l] orthogonal, so Aᵀ Q[:, :l] = Z₀ T and the last product with
            // Aᵀ has width q·l instead of (q + 1)·l.
            let w = (l * (later.len() + 1)).min(m.min(n));
            let mut kk = Mat::<f32>::zeros(m, w);
            kk.as_mut().subcols_mut(0, l).copy_from(&q0);
            let mut c0 = l;
            for b in &later {
                let c = b.ncols().min(w - c0);
                kk.as_mut().subcols_mut(c0, c).copy_from(b.subcols(0, c));
                c0 += c;
            }
            q = orthonormal_basis(kk.as_ref());
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
                z.as_mut().subcols_mut(l, w - l),
                at,
                q.subcols(l, w - l),
                par,
            );
        }
        None => {
            // Bᵀ = Aᵀ Q (n×l);  Bᵀ = P Σ Rᵀ  ⇒  A ≈ Q B = (Q R) Σ Pᵀ.
            at_times(z.as_mut(), at, q.as_ref(), par);
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

/// Rows of `A` per partial product in [`at_times`].
const AT_CHUNK: usize = 1024;

/// `z = Aᵀ q` for `at = Aᵀ` (`n × m`, column-major) and `q` (`m × w`).
///
/// The reduction runs over the long dimension `m`, which faer does not split across threads
/// (one thread does all the work); so the rows of `A` are cut into fixed chunks of
/// [`AT_CHUNK`], whose partial products run in parallel and are added in chunk order. The
/// chunking does not depend on the thread count, so neither does the result.
fn at_times(mut z: MatMut<'_, f32>, at: MatRef<'_, f32>, q: MatRef<'_, f32>, par: Par) {
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
        let a = gaussian(n, m, 4); // Aᵀ, column-major n×m
        let q = gaussian(m, w, 5);
        let mut want = Mat::<f32>::zeros(n, w);
        matmul(
            want.as_mut(),
            Accum::Replace,
            a.as_ref(),
            q.as_ref(),
            1.0,
            Par::Seq,
        );
        for par in [Par::Seq, Par::rayon(2)] {
            let mut got = Mat::<f32>::zeros(n, w);
            at_times(got.as_mut(), a.as_ref(), q.as_ref(), par);
            for i in 0..n {
                for j in 0..w {
                    let (x, y) = (got[(i, j)], want[(i, j)]);
                    assert!((x - y).abs() < 1e-3 * (1.0 + y.abs()), "{x} vs {y}");
                }
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
