//! Experimental: nested bit planes whose first bits are chosen with GPTQ-style error
//! compensation (Frantar et al. 2022), on the unchanged plane grid.
//!
//! GPTQ quantizes the columns of `W` left to right and pushes each column's quantization error
//! onto the columns not yet quantized, through the upper Cholesky factor `U` of `H⁻¹`
//! (`H = XᵀX` of the calibration inputs, damped): with `e = (t_i − q_i) / U_ii`, every later
//! column `j` moves by `t_j −= e · U_ij`. This minimises `tr(ΔW H ΔWᵀ)` greedily.
//!
//! Here the grid (`mid`, `half` per row and group, from the minimum and maximum of the
//! **original** `W`) is fixed, so the output is the same [`PlaneBlock`](crate::PlaneBlock)
//! format as [`decompose_planes`](crate::decompose_planes) and every prefix is a valid
//! reconstruction. Only the bits change:
//!
//! * [`CompensationMode::Joint`]: one GPTQ pass whose quantizer for a column is successive
//!   approximation of the compensated target to `compensate_planes` planes; it fixes the bits
//!   of those planes at once.
//! * [`CompensationMode::PlaneByPlane`]: for each plane `p < compensate_planes`, a GPTQ pass
//!   (targets starting again from `W`) that decides only plane `p`'s bits, the planes before
//!   it being fixed: the quantizer picks `ŵ_p ± half·2^{−(p+1)}`.
//!
//! Later planes are chosen by successive approximation of the original `W`. A weight whose
//! compensated bits left the half-cell that contains it stays on the cell edge at deeper
//! prefixes (the error floors at its distance to that edge).
//!
//! With `H = I` (or any diagonal `H`) the factor is diagonal, nothing is fed back, and the
//! result equals [`decompose_planes`](crate::decompose_planes) bit for bit.

use faer::linalg::matmul::matmul;
use faer::linalg::solvers::DenseSolveCore;
use faer::{Accum, Mat, MatMut, MatRef, Par, Side};

use crate::planes::{apply_plane, check_plane_input, grid_base, plane_factor, plane_grid_of};
use crate::planes::{planes_on_grid, PlaneGrid};
use crate::{DecomposeError, PlaneDecomposition, PlaneParams};

/// GPTQ's default damping: 1% of the mean diagonal of `H` is added to the diagonal.
pub const DEFAULT_DAMP: f64 = 0.01;

/// Columns per lazy-update block of a GPTQ pass.
const BLOCK: usize = 128;

/// How the bits of the compensated planes are chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CompensationMode {
    /// One GPTQ pass quantizing each column to `compensate_planes` planes at once.
    #[default]
    Joint,
    /// One GPTQ pass per compensated plane, each deciding one plane's bits.
    PlaneByPlane,
}

/// The upper Cholesky factor `U` of the damped `H⁻¹` (`H⁻¹ = UᵀU`), row-major `cols × cols`,
/// for [`decompose_planes_with_factor`]. Compute it once per Hessian and share it between
/// the matrices that read the same input.
#[derive(Debug, Clone)]
pub struct GptqFactor {
    cols: usize,
    u: Vec<f32>,
}

impl GptqFactor {
    /// Factors `hessian` (row-major `cols × cols`, symmetric positive semi-definite; only its
    /// lower triangle is read): columns with a zero diagonal get diagonal 1 (GPTQ's dead
    /// inputs), then `damp · mean(diag)` is added to the diagonal.
    ///
    /// # Errors
    /// A wrong length, a non-finite entry or damping, or a damped Hessian that is not
    /// positive definite.
    pub fn new(hessian: &[f64], cols: usize, damp: f64) -> Result<Self, DecomposeError> {
        let expected = cols.checked_mul(cols);
        if expected != Some(hessian.len()) || cols == 0 {
            return Err(DecomposeError::HessianLength {
                cols,
                expected: expected.unwrap_or(usize::MAX),
                got: hessian.len(),
            });
        }
        if let Some(index) = hessian.iter().position(|v| !v.is_finite()) {
            return Err(DecomposeError::InvalidHessian {
                index,
                value: hessian[index],
            });
        }
        if !(damp.is_finite() && damp >= 0.0) {
            return Err(DecomposeError::InvalidHessian {
                index: usize::MAX,
                value: damp,
            });
        }
        let mut diag: Vec<f64> = (0..cols).map(|i| hessian[i * cols + i]).collect();
        for d in diag.iter_mut() {
            if *d <= 0.0 {
                *d = 1.0;
            }
        }
        let mean = diag.iter().sum::<f64>() / cols as f64;
        let h = Mat::<f64>::from_fn(cols, cols, |i, j| {
            if i == j {
                diag[i] + damp * mean
            } else {
                let (a, b) = if i > j { (i, j) } else { (j, i) };
                hessian[a * cols + b]
            }
        });
        let inverse = h
            .as_ref()
            .llt(Side::Lower)
            .map_err(|_| DecomposeError::HessianNotPositiveDefinite)?
            .inverse();
        // Symmetrise (the inverse is symmetric up to rounding) before the second factorisation.
        let inverse =
            Mat::<f64>::from_fn(cols, cols, |i, j| 0.5 * (inverse[(i, j)] + inverse[(j, i)]));
        let llt = inverse
            .as_ref()
            .llt(Side::Lower)
            .map_err(|_| DecomposeError::HessianNotPositiveDefinite)?;
        let l = llt.L();
        let mut u = vec![0.0f32; cols * cols];
        for i in 0..cols {
            for j in i..cols {
                u[i * cols + j] = l[(j, i)] as f32;
            }
        }
        if u.iter().any(|v| !v.is_finite()) || (0..cols).any(|i| u[i * cols + i] <= 0.0) {
            return Err(DecomposeError::HessianNotPositiveDefinite);
        }
        Ok(Self { cols, u })
    }

    /// The side of the Hessian.
    pub fn cols(&self) -> usize {
        self.cols
    }
}

/// Decomposes `w` (`rows × cols`, row-major) into `params.planes` nested bit planes whose first
/// `compensate_planes` planes are chosen with GPTQ error compensation under `hessian`
/// (row-major `cols × cols`, damped by [`DEFAULT_DAMP`]): GPTQ quantizes the columns left
/// to right and pushes each column's error onto the columns not yet quantized, through the
/// upper Cholesky factor of `H⁻¹`, on the plane grid of the original `w` (so every prefix is
/// a valid reconstruction; only the bits change, as `mode` says).
///
/// `compensate_planes = 0` gives [`decompose_planes`](crate::decompose_planes) exactly; values
/// above `params.planes` are treated as `params.planes`. The reported errors
/// ([`PlaneDecomposition::sq_err`], `rel_err`) are unweighted.
///
/// # Errors
/// Those of [`decompose_planes`](crate::decompose_planes) and of [`GptqFactor::new`].
pub fn decompose_planes_compensated(
    w: &[f32],
    rows: usize,
    cols: usize,
    params: &PlaneParams,
    hessian: &[f64],
    compensate_planes: usize,
    mode: CompensationMode,
) -> Result<PlaneDecomposition, DecomposeError> {
    let factor = GptqFactor::new(hessian, cols, DEFAULT_DAMP)?;
    decompose_planes_with_factor(w, rows, cols, params, &factor, compensate_planes, mode)
}

/// [`decompose_planes_compensated`] with a precomputed factor (shared between matrices that
/// read the same input).
///
/// # Errors
/// Those of [`decompose_planes`](crate::decompose_planes), or a factor of another width.
pub fn decompose_planes_with_factor(
    w: &[f32],
    rows: usize,
    cols: usize,
    params: &PlaneParams,
    factor: &GptqFactor,
    compensate_planes: usize,
    mode: CompensationMode,
) -> Result<PlaneDecomposition, DecomposeError> {
    decompose_planes_with_factor_limited(
        w,
        rows,
        cols,
        params,
        factor,
        compensate_planes,
        mode,
        f32::INFINITY,
    )
}

/// [`decompose_planes_with_factor`] where a compensated bit may differ from the plain bit
/// only for a weight within `flip_radius · half·2^{−(p+1)}` of the boundary it would cross
/// (`|w − ŵ_p|`, which is also the error floor such a flip leaves): `f32::INFINITY` is
/// unlimited, `0` gives plain planes.
///
/// # Errors
/// Those of [`decompose_planes_with_factor`], or a negative or NaN radius.
#[allow(clippy::too_many_arguments)]
pub fn decompose_planes_with_factor_limited(
    w: &[f32],
    rows: usize,
    cols: usize,
    params: &PlaneParams,
    factor: &GptqFactor,
    compensate_planes: usize,
    mode: CompensationMode,
    flip_radius: f32,
) -> Result<PlaneDecomposition, DecomposeError> {
    compensated_planes(
        w,
        rows,
        cols,
        params,
        factor,
        compensate_planes,
        mode,
        flip_radius,
        (None, None),
    )
}

/// Full-depth GPTQ on nested planes, the variant that keeps every prefix at least as good as
/// plain planes in `tr(ΔW H ΔWᵀ)` on small-llama (docs/BEST.md): one joint pass
/// quantizes each compensated target to all `params.planes` planes. Errors are weighted by
/// `row_weights` and `col_weights` as in [`decompose_planes`](crate::decompose_planes).
///
/// # Errors
/// Those of [`decompose_planes_with_factor`] and of the weights (as in
/// [`decompose_planes`](crate::decompose_planes)).
pub fn decompose_planes_gptq(
    w: &[f32],
    rows: usize,
    cols: usize,
    params: &PlaneParams,
    factor: &GptqFactor,
    row_weights: Option<&[f32]>,
    col_weights: Option<&[f32]>,
) -> Result<PlaneDecomposition, DecomposeError> {
    compensated_planes(
        w,
        rows,
        cols,
        params,
        factor,
        params.planes,
        CompensationMode::Joint,
        f32::INFINITY,
        (row_weights, col_weights),
    )
}

#[allow(clippy::too_many_arguments)]
fn compensated_planes(
    w: &[f32],
    rows: usize,
    cols: usize,
    params: &PlaneParams,
    factor: &GptqFactor,
    compensate_planes: usize,
    mode: CompensationMode,
    flip_radius: f32,
    (row_weights, col_weights): (Option<&[f32]>, Option<&[f32]>),
) -> Result<PlaneDecomposition, DecomposeError> {
    if flip_radius.is_nan() || flip_radius < 0.0 {
        return Err(DecomposeError::InvalidHessian {
            index: usize::MAX,
            value: f64::from(flip_radius),
        });
    }
    check_plane_input(w, rows, cols, params)?;
    if factor.cols != cols {
        return Err(DecomposeError::HessianLength {
            cols,
            expected: cols.saturating_mul(cols),
            got: factor.cols.saturating_mul(factor.cols),
        });
    }
    let grid = plane_grid_of(w, rows, cols, params.group)?;
    let compensated = compensate_planes.min(params.planes);
    let mut fixed: Vec<Vec<f32>> = Vec::with_capacity(compensated);
    if compensated > 0 {
        match mode {
            CompensationMode::Joint => {
                fixed = vec![vec![0.0f32; rows * cols]; compensated];
                let mut quant = JointQuantizer {
                    grid: &grid,
                    radius: flip_radius,
                    planes: compensated,
                    signs: &mut fixed,
                };
                gptq_pass(w, rows, cols, &factor.u, &mut quant)?;
            }
            CompensationMode::PlaneByPlane => {
                let mut base = grid_base(&grid);
                for p in 0..compensated {
                    let mut signs = vec![0.0f32; rows * cols];
                    let mut quant = PlaneQuantizer {
                        grid: &grid,
                        radius: flip_radius,
                        plane: p,
                        base: &base,
                        signs: &mut signs,
                    };
                    gptq_pass(w, rows, cols, &factor.u, &mut quant)?;
                    apply_plane(&grid, p, &signs, &mut base);
                    fixed.push(signs);
                }
            }
        }
    }
    planes_on_grid(w, grid, params.planes, &fixed, row_weights, col_weights)
}

/// The quantizer of one GPTQ pass: the reconstruction of target `x` at `(row, col)` (whose
/// original weight is `w`), recording the bits it chose.
trait ColumnQuantizer {
    fn quantize(&mut self, row: usize, col: usize, x: f32, w: f32) -> f32;
}

/// The bit for target `x` on top of `q`, unless it differs from the bit for `w` and `w` is
/// farther than `radius · step` from `q`.
fn limited_bit(x: f32, w: f32, q: f32, step: f32, radius: f32) -> bool {
    let bx = x >= q;
    if bx != (w >= q) && (w - q).abs() > radius * step {
        !bx
    } else {
        bx
    }
}

/// Successive approximation of the target to `planes` planes (the bits of planes `0..planes`).
struct JointQuantizer<'a> {
    grid: &'a PlaneGrid,
    radius: f32,
    planes: usize,
    signs: &'a mut [Vec<f32>],
}

impl ColumnQuantizer for JointQuantizer<'_> {
    fn quantize(&mut self, row: usize, col: usize, x: f32, w: f32) -> f32 {
        let (cols, groups) = (self.grid.cols(), self.grid.groups());
        let at = row * groups + col / self.grid.group();
        let half = self.grid.half()[at].to_f32();
        let mut q = self.grid.mid()[at].to_f32();
        for (p, plane) in self.signs.iter_mut().enumerate().take(self.planes) {
            // Same arithmetic as successive approximation in `planes_on_grid`.
            let step = half * plane_factor(p);
            if limited_bit(x, w, q, step, self.radius) {
                plane[row * cols + col] = 1.0;
                q += step;
            } else {
                plane[row * cols + col] = -1.0;
                q -= step;
            }
        }
        q
    }
}

/// One plane's bit on top of the fixed reconstruction `base = ŵ_plane`.
struct PlaneQuantizer<'a> {
    grid: &'a PlaneGrid,
    radius: f32,
    plane: usize,
    base: &'a [f32],
    signs: &'a mut [f32],
}

impl ColumnQuantizer for PlaneQuantizer<'_> {
    fn quantize(&mut self, row: usize, col: usize, x: f32, w: f32) -> f32 {
        let (cols, groups) = (self.grid.cols(), self.grid.groups());
        let at = row * groups + col / self.grid.group();
        let step = self.grid.half()[at].to_f32() * plane_factor(self.plane);
        let b = self.base[row * cols + col];
        if limited_bit(x, w, b, step, self.radius) {
            self.signs[row * cols + col] = 1.0;
            b + step
        } else {
            self.signs[row * cols + col] = -1.0;
            b - step
        }
    }
}

/// One GPTQ pass over the columns of `w` with lazy block updates: column `i`'s error
/// `e = (t_i − q_i) / U_ii` moves every later column `j` by `−e · U_ij`.
fn gptq_pass(
    w: &[f32],
    rows: usize,
    cols: usize,
    u: &[f32],
    quant: &mut impl ColumnQuantizer,
) -> Result<(), DecomposeError> {
    if u.len() != cols * cols || w.len() != rows * cols {
        return Err(DecomposeError::HessianLength {
            cols,
            expected: cols * cols,
            got: u.len(),
        });
    }
    // Targets, transposed (`cols × rows`): column `c` of `W` is the contiguous row `c`.
    let mut t = vec![0.0f32; cols * rows];
    for (r, wr) in w.chunks_exact(cols).enumerate() {
        for (c, &v) in wr.iter().enumerate() {
            t[c * rows + r] = v;
        }
    }
    let mut err = vec![0.0f32; BLOCK.min(cols) * rows];
    let mut i1 = 0;
    while i1 < cols {
        let i2 = (i1 + BLOCK).min(cols);
        for i in i1..i2 {
            let d = u[i * cols + i];
            let (head, tail) = t.split_at_mut((i + 1) * rows);
            let ti = &head[i * rows..];
            let e = &mut err[(i - i1) * rows..(i - i1 + 1) * rows];
            for (r, (ev, &x)) in e.iter_mut().zip(ti).enumerate() {
                let q = quant.quantize(r, i, x, w[r * cols + i]);
                *ev = (x - q) / d;
            }
            let e = &err[(i - i1) * rows..(i - i1 + 1) * rows];
            for (j, tj) in (i + 1..i2).zip(tail.chunks_exact_mut(rows)) {
                let uij = u[i * cols + j];
                for (tv, &ev) in tj.iter_mut().zip(e) {
                    *tv -= uij * ev;
                }
            }
        }
        if i2 < cols {
            let b = i2 - i1;
            // t[i2.., :] −= U[i1..i2, i2..]ᵀ · E
            let lhs = MatRef::from_row_major_slice(&u[i1 * cols..i2 * cols], b, cols)
                .subcols(i2, cols - i2)
                .transpose();
            let rhs = MatRef::from_row_major_slice(&err[..b * rows], b, rows);
            let dst = MatMut::from_row_major_slice_mut(&mut t[i2 * rows..], cols - i2, rows);
            matmul(dst, Accum::Add, lhs, rhs, -1.0f32, Par::rayon(0));
        }
        i1 = i2;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decompose_planes;
    use crate::planes::tests::pseudo;
    use proptest::prelude::*;

    /// `H = XᵀX + 0.1·I` for a random `X` with correlated columns.
    fn hessian(cols: usize, seed: u64) -> Vec<f64> {
        let n = 4 * cols;
        let z = pseudo(n * cols, seed);
        let mut x = vec![0.0f64; n * cols];
        for t in 0..n {
            for c in 0..cols {
                // Neighbouring columns share a component: strong off-diagonal structure.
                let a = f64::from(z[t * cols + c]);
                let b = f64::from(z[t * cols + (c + 1) % cols]);
                x[t * cols + c] = a + 0.8 * b;
            }
        }
        let mut h = vec![0.0f64; cols * cols];
        for t in 0..n {
            for i in 0..cols {
                for j in 0..cols {
                    h[i * cols + j] += x[t * cols + i] * x[t * cols + j];
                }
            }
        }
        for i in 0..cols {
            h[i * cols + i] += 0.1;
        }
        h
    }

    fn h_err(w: &[f32], q: &[f32], rows: usize, cols: usize, h: &[f64]) -> f64 {
        let mut total = 0.0;
        for r in 0..rows {
            let e: Vec<f64> = (0..cols)
                .map(|c| f64::from(w[r * cols + c] - q[r * cols + c]))
                .collect();
            for i in 0..cols {
                for j in 0..cols {
                    total += e[i] * h[i * cols + j] * e[j];
                }
            }
        }
        total
    }

    fn same_blocks(a: &PlaneDecomposition, b: &PlaneDecomposition) -> bool {
        a.grid == b.grid && a.blocks == b.blocks
    }

    #[test]
    fn full_depth_gptq_reports_weighted_errors_and_lowers_the_last_prefix() {
        let (rows, cols) = (12, 48);
        let w = pseudo(rows * cols, 11);
        let h = hessian(cols, 13);
        let params = PlaneParams {
            group: 16,
            planes: 4,
        };
        let rw: Vec<f32> = (0..rows).map(|r| 1.0 + r as f32).collect();
        let cw: Vec<f32> = (0..cols).map(|c| 0.5 + (c % 3) as f32).collect();
        let factor = GptqFactor::new(&h, cols, DEFAULT_DAMP).unwrap();
        let d =
            decompose_planes_gptq(&w, rows, cols, &params, &factor, Some(&rw), Some(&cw)).unwrap();
        let prefixes = d.prefix_reconstructions();
        for (p, q) in prefixes.iter().enumerate() {
            let want: f64 = (0..rows * cols)
                .map(|i| {
                    f64::from(rw[i / cols])
                        * f64::from(cw[i % cols])
                        * f64::from(w[i] - q[i]).powi(2)
                })
                .sum();
            assert!((want - d.sq_err[p]).abs() <= 1e-9 * want.max(1e-12), "{p}");
        }
        let plain = decompose_planes(&w, rows, cols, &params, None, None).unwrap();
        let a = plain.prefix_reconstructions();
        let (ea, eb) = (
            h_err(&w, &a[3], rows, cols, &h),
            h_err(&w, &prefixes[3], rows, cols, &h),
        );
        assert!(eb < ea, "full-depth {eb} vs plain {ea}");
    }

    #[test]
    fn compensated_first_plane_lowers_the_hessian_error() {
        let (rows, cols) = (12, 48);
        let w = pseudo(rows * cols, 5);
        let h = hessian(cols, 7);
        let params = PlaneParams {
            group: 16,
            planes: 4,
        };
        let plain = decompose_planes(&w, rows, cols, &params, None, None).unwrap();
        let comp =
            decompose_planes_compensated(&w, rows, cols, &params, &h, 1, CompensationMode::Joint)
                .unwrap();
        let a = plain.prefix_reconstructions();
        let b = comp.prefix_reconstructions();
        let ea = h_err(&w, &a[0], rows, cols, &h);
        let eb = h_err(&w, &b[0], rows, cols, &h);
        assert!(eb < ea, "compensated {eb} vs plain {ea}");
    }

    #[test]
    fn bad_hessians_are_errors() {
        let w = pseudo(8 * 16, 1);
        let params = PlaneParams {
            group: 8,
            planes: 3,
        };
        let mode = CompensationMode::Joint;
        let r = decompose_planes_compensated(&w, 8, 16, &params, &[1.0; 15], 1, mode);
        assert!(matches!(r, Err(DecomposeError::HessianLength { .. })));
        let mut h = vec![0.0; 256];
        h[3] = f64::NAN;
        let r = decompose_planes_compensated(&w, 8, 16, &params, &h, 1, mode);
        assert!(matches!(r, Err(DecomposeError::InvalidHessian { .. })));
        // Indefinite: a negative eigenvalue larger than the damping.
        let mut h = vec![0.0; 256];
        for i in 0..16 {
            h[i * 16 + i] = 1.0;
        }
        h[1] = 5.0;
        h[16] = 5.0;
        let r = decompose_planes_compensated(&w, 8, 16, &params, &h, 1, mode);
        assert!(matches!(r, Err(DecomposeError::HessianNotPositiveDefinite)));
        let factor = GptqFactor::new(&vec![0.0; 64], 8, DEFAULT_DAMP).unwrap();
        let r = decompose_planes_with_factor(&w, 8, 16, &params, &factor, 1, mode);
        assert!(matches!(r, Err(DecomposeError::HessianLength { .. })));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]

        /// Every variant is prefix-consistent on the plain grid; 0 compensated planes and an
        /// identity Hessian give plain planes bit for bit.
        #[test]
        fn prefix_consistent_and_plain_without_feedback(
            rows in 1usize..10,
            groups in 1usize..4,
            planes in 1usize..7,
            comp in 0usize..4,
            seed in any::<u64>(),
            plane_by_plane in any::<bool>(),
            scale in prop_oneof![Just(1.0f32), Just(1e-3f32), Just(300.0f32)],
        ) {
            let g = 8;
            let cols = groups * g + if groups > 1 { 3 } else { 0 };
            let w: Vec<f32> = pseudo(rows * cols, seed).iter().map(|v| v * scale).collect();
            let params = PlaneParams { group: g, planes };
            let mode = if plane_by_plane {
                CompensationMode::PlaneByPlane
            } else {
                CompensationMode::Joint
            };
            let plain = decompose_planes(&w, rows, cols, &params, None, None).unwrap();
            let h = hessian(cols, seed ^ 0x55);
            let none = decompose_planes_compensated(&w, rows, cols, &params, &h, 0, mode).unwrap();
            prop_assert!(same_blocks(&plain, &none));
            let mut eye = vec![0.0f64; cols * cols];
            for i in 0..cols {
                eye[i * cols + i] = 1.0 + i as f64;
            }
            let diag = decompose_planes_compensated(&w, rows, cols, &params, &eye, comp, mode)
                .unwrap();
            prop_assert!(same_blocks(&plain, &diag));
            // A zero flip radius forbids every flip: plain planes again.
            let factor = GptqFactor::new(&h, cols, DEFAULT_DAMP).unwrap();
            let frozen = decompose_planes_with_factor_limited(
                &w, rows, cols, &params, &factor, comp, mode, 0.0,
            )
            .unwrap();
            prop_assert!(same_blocks(&plain, &frozen));

            let comp_d = decompose_planes_compensated(&w, rows, cols, &params, &h, comp, mode)
                .unwrap();
            prop_assert_eq!(&comp_d.grid, &plain.grid);
            prop_assert_eq!(comp_d.blocks.len(), planes);
            let grid = &plain.grid;
            let ng = grid.groups();
            let prefixes = comp_d.prefix_reconstructions();
            for (p, dense) in prefixes.iter().enumerate() {
                for r in 0..rows {
                    for c in 0..cols {
                        let at = r * ng + c / g;
                        let half = grid.half()[at].to_f32();
                        let mid = grid.mid()[at].to_f32();
                        let v = dense[r * cols + c];
                        let x = w[r * cols + c];
                        // Every prefix reconstruction lies inside the group's grid ...
                        prop_assert!((v - mid).abs() <= half * (1.0 + 1e-5) + 1e-30);
                        // ... and planes past the compensated ones keep the plain bound
                        // relative to the cell edge they converge to.
                        let tol = half * 1e-5 + 1e-30;
                        if comp == 0 {
                            // Plain planes: the successive-approximation bound.
                            let bound = half * 0.5f32.powi(p as i32 + 1);
                            prop_assert!((x - v).abs() <= bound + tol);
                        } else if p >= comp {
                            // Past the compensated planes, successive approximation of w:
                            // each plane moves toward w (or lands within its step of it).
                            let before = (x - prefixes[p - 1][r * cols + c]).abs();
                            let step = half * 0.5f32.powi(p as i32 + 1);
                            prop_assert!((x - v).abs() <= before.max(step) + tol);
                        }
                    }
                }
            }
        }
    }
}
