//! Per-matrix block chains of best mode: nested planes throughout, or an AVD block first and
//! nested planes of what it leaves — chosen per matrix by measured rate–distortion.
//!
//! Both chains keep the prefix property: every prefix is a sum of whole blocks. The AVD-first
//! chain's block 0 has (almost) the size of plane 0 (its rank `k` is chosen so), so the base
//! model costs the same either way; its planes have their own grid, fitted to the residual.

use bitstack_decompose::{
    decompose, decompose_planes, decompose_planes_gptq, AvdBlock, AvdParams, DecomposeError,
    GptqFactor, PlaneBlock, PlaneDecomposition, PlaneParams,
};
use rayon::prelude::*;

/// Which chain the matrices of a best-mode stack get.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ChainChoice {
    /// Nested planes throughout (a grid of the weights, refined one bit per weight per block).
    Planes,
    /// An AVD block first (signs and rank-`k` factors, the size of plane 0), then nested
    /// planes of the residual.
    AvdFirst,
    /// Per matrix, the chain with the lower mean log weighted error at the sizes of the first
    /// [`AUTO_PLANES`] planes of the planes chain (the budgets where matrices operate).
    Auto,
}

/// Planes over which [`ChainChoice::Auto`] compares the two chains (1.25 … 4.25 bits per
/// weight with groups of 128).
pub const AUTO_PLANES: usize = 4;

/// One block of a chain.
#[derive(Debug, Clone, Copy)]
pub enum ChainBlock<'a> {
    /// An AVD block.
    Avd(&'a AvdBlock),
    /// A plane.
    Plane(&'a PlaneBlock),
}

impl ChainBlock<'_> {
    /// Bytes of the block as stored.
    pub fn stored_bytes(&self) -> u64 {
        match self {
            ChainBlock::Avd(b) => AvdBlock::byte_size(b.rows(), b.cols(), b.k()),
            ChainBlock::Plane(b) => b.stored_bytes(),
        }
    }

    /// `w += Δ`.
    pub fn add_to_dense(&self, w: &mut [f32]) {
        match self {
            ChainBlock::Avd(b) => b.add_to_dense(w),
            ChainBlock::Plane(b) => b.add_to_dense(w),
        }
    }
}

/// The chain of one matrix and its errors.
#[derive(Debug, Clone)]
pub struct MatrixChain {
    /// The AVD block that comes first, if any.
    pub avd: Option<AvdBlock>,
    /// The planes (of the weights, or of what the AVD block leaves).
    pub planes: PlaneDecomposition,
    /// Weighted squared error `Σ r_i c_j (w − ŵ)²` after `b + 1` blocks.
    pub sq_err: Vec<f64>,
    /// Weighted squared norm of the matrix (the error with no block loaded).
    pub sq_norm: f64,
    /// Relative (unweighted) Frobenius error after `b + 1` blocks.
    pub rel_err: Vec<f64>,
}

impl MatrixChain {
    /// Number of blocks.
    pub fn len(&self) -> usize {
        usize::from(self.avd.is_some()) + self.planes.blocks.len()
    }

    /// Whether the chain has no block.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Rows of the matrix.
    pub fn rows(&self) -> usize {
        self.planes.grid.rows()
    }

    /// Columns of the matrix.
    pub fn cols(&self) -> usize {
        self.planes.grid.cols()
    }

    /// Block `b`, if the chain has it.
    pub fn block(&self, b: usize) -> Option<ChainBlock<'_>> {
        match (&self.avd, b) {
            (Some(a), 0) => Some(ChainBlock::Avd(a)),
            (Some(_), b) => self.planes.blocks.get(b - 1).map(ChainBlock::Plane),
            (None, b) => self.planes.blocks.get(b).map(ChainBlock::Plane),
        }
    }

    /// Every block, in order.
    pub fn blocks(&self) -> impl Iterator<Item = ChainBlock<'_>> {
        self.avd
            .iter()
            .map(ChainBlock::Avd)
            .chain(self.planes.blocks.iter().map(ChainBlock::Plane))
    }

    /// Name of the chain's kind: `planes` or `avd+planes`.
    pub fn kind(&self) -> &'static str {
        if self.avd.is_some() {
            "avd+planes"
        } else {
            "planes"
        }
    }

    /// The planes-throughout chain of `w`.
    fn of_planes(planes: PlaneDecomposition) -> Self {
        Self {
            avd: None,
            sq_err: planes.sq_err.clone(),
            sq_norm: planes.sq_norm,
            rel_err: planes.rel_err.clone(),
            planes,
        }
    }

    /// Mean of `ln(sq_err)` at the cumulative sizes `at` (bytes), interpolated linearly in
    /// bytes between the chain's points (constant before the first and after the last).
    fn mean_log_error_at(&self, at: &[f64]) -> f64 {
        let mut bytes = Vec::with_capacity(self.len());
        let mut total = 0.0;
        for b in self.blocks() {
            total += b.stored_bytes() as f64;
            bytes.push(total);
        }
        let log = |e: f64| e.max(f64::MIN_POSITIVE).ln();
        let value = |x: f64| -> f64 {
            let i = bytes.partition_point(|&c| c < x);
            if i == 0 {
                return log(self.sq_err[0]);
            }
            if i >= bytes.len() {
                return log(self.sq_err[bytes.len() - 1]);
            }
            let t = (x - bytes[i - 1]) / (bytes[i] - bytes[i - 1]).max(1.0);
            (1.0 - t) * log(self.sq_err[i - 1]) + t * log(self.sq_err[i])
        };
        at.iter().map(|&x| value(x)).sum::<f64>() / at.len().max(1) as f64
    }
}

/// Rank of the AVD block that has (about) the size of plane 0 of a `rows × cols` matrix with
/// groups of `group` columns: `k (rows + cols)` f16 factors ≈ `2 · rows · groups` f16 grid
/// values; at least 1.
pub fn avd_rank_for(rows: usize, cols: usize, group: usize) -> usize {
    let groups = cols.div_ceil(group.max(1));
    (2 * rows * groups / (rows + cols).max(1))
        .max(1)
        .min(rows.min(cols))
}

/// `Σ r_i c_j w_ij²`: row sums in parallel, added in row order (thread-independent bits).
fn weighted_sq(w: &[f32], cols: usize, rw: Option<&[f32]>, cw: Option<&[f32]>) -> f64 {
    let rows: Vec<f64> = w
        .par_chunks(cols)
        .enumerate()
        .map(|(r, row)| {
            let s: f64 = row
                .iter()
                .enumerate()
                .map(|(j, &v)| f64::from(cw.map_or(1.0, |c| c[j])) * f64::from(v).powi(2))
                .sum();
            s * f64::from(rw.map_or(1.0, |x| x[r]))
        })
        .collect();
    rows.iter().sum()
}

/// Row and column weights of the squared errors (`None`: 1).
pub type ErrorWeights<'a> = (Option<&'a [f32]>, Option<&'a [f32]>);

/// Nested planes of `w`: plain successive approximation, or full-depth GPTQ with `gptq`.
fn planes_of(
    w: &[f32],
    rows: usize,
    cols: usize,
    params: &PlaneParams,
    (row_weights, col_weights): ErrorWeights<'_>,
    gptq: Option<&GptqFactor>,
) -> Result<PlaneDecomposition, DecomposeError> {
    match gptq {
        Some(f) => decompose_planes_gptq(w, rows, cols, params, f, row_weights, col_weights),
        None => decompose_planes(w, rows, cols, params, row_weights, col_weights),
    }
}

/// The AVD-first chain: one AVD block of rank [`avd_rank_for`] (activation-aware: the columns
/// weighted by `sqrt(col_weights)`), then `params.planes` planes of the residual.
fn avd_first(
    w: &[f32],
    rows: usize,
    cols: usize,
    params: &PlaneParams,
    (row_weights, col_weights): ErrorWeights<'_>,
    gptq: Option<&GptqFactor>,
) -> Result<MatrixChain, DecomposeError> {
    let k = avd_rank_for(rows, cols, params.group);
    let channel: Option<Vec<f32>> = col_weights.map(|c| c.iter().map(|v| v.sqrt()).collect());
    let avd_params = AvdParams {
        k,
        niter: 1,
        ..AvdParams::default()
    };
    let mut d = decompose(w, rows, cols, &avd_params, channel.as_deref())?;
    let Some(block) = d.blocks.pop() else {
        return Err(DecomposeError::ZeroIterations);
    };
    // The residual of the stored (f16) block, so that planes refine exactly what it leaves.
    let mut residual = vec![0.0f32; rows * cols];
    block.add_to_dense(&mut residual);
    residual.iter_mut().zip(w).for_each(|(r, &x)| *r = x - *r);
    let planes = planes_of(
        &residual,
        rows,
        cols,
        params,
        (row_weights, col_weights),
        gptq,
    )?;
    let norm = |v: &[f32]| v.iter().map(|&x| f64::from(x).powi(2)).sum::<f64>().sqrt();
    let (wn, rn) = (norm(w), norm(&residual));
    let rel = |e: f64| if wn > 0.0 { e * rn / wn } else { 0.0 };
    let mut sq_err = vec![planes.sq_norm];
    sq_err.extend(&planes.sq_err);
    let mut rel_err = vec![rel(1.0)];
    rel_err.extend(planes.rel_err.iter().map(|&e| rel(e)));
    Ok(MatrixChain {
        avd: Some(block),
        sq_norm: weighted_sq(w, cols, row_weights, col_weights),
        sq_err,
        rel_err,
        planes,
    })
}

/// The chain of `w` (`rows × cols`, row-major) that `choice` asks for; errors weighted by
/// `weights` (rows, columns) as in [`decompose_planes`]; the planes' bits chosen with
/// full-depth GPTQ compensation when `gptq` (the factor of the input's Hessian) is given.
///
/// # Errors
/// As [`decompose_planes`], [`decompose_planes_gptq`] and [`decompose`].
pub fn build_chain(
    w: &[f32],
    rows: usize,
    cols: usize,
    params: &PlaneParams,
    weights: ErrorWeights<'_>,
    choice: ChainChoice,
    gptq: Option<&GptqFactor>,
) -> Result<MatrixChain, DecomposeError> {
    let planes = || -> Result<MatrixChain, DecomposeError> {
        planes_of(w, rows, cols, params, weights, gptq).map(MatrixChain::of_planes)
    };
    match choice {
        ChainChoice::Planes => planes(),
        ChainChoice::AvdFirst => avd_first(w, rows, cols, params, weights, gptq),
        ChainChoice::Auto => {
            let p = planes()?;
            let a = avd_first(w, rows, cols, params, weights, gptq)?;
            Ok(choose(p, a))
        }
    }
}

/// The chain with the lower mean log error at the sizes of the first [`AUTO_PLANES`] planes
/// of `planes` (ties: `planes`).
pub fn choose(planes: MatrixChain, other: MatrixChain) -> MatrixChain {
    let mut at = Vec::with_capacity(AUTO_PLANES);
    let mut total = 0.0;
    for b in planes.blocks().take(AUTO_PLANES) {
        total += b.stored_bytes() as f64;
        at.push(total);
    }
    if other.mean_log_error_at(&at) < planes.mean_log_error_at(&at) {
        other
    } else {
        planes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pseudo(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15).wrapping_add(1);
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                ((s >> 40) as f32 / (1u64 << 24) as f32) - 0.5
            })
            .collect()
    }

    fn dense(chain: &MatrixChain, blocks: usize) -> Vec<f32> {
        let mut w = vec![0.0f32; chain.rows() * chain.cols()];
        for b in chain.blocks().take(blocks) {
            b.add_to_dense(&mut w);
        }
        w
    }

    #[test]
    fn avd_first_errors_are_those_of_its_prefixes() {
        let (m, n) = (24, 48);
        let w = pseudo(m * n, 5);
        let cw: Vec<f32> = (0..n).map(|j| 0.5 + (j % 5) as f32).collect();
        let params = PlaneParams {
            group: 16,
            planes: 4,
        };
        let c = build_chain(
            &w,
            m,
            n,
            &params,
            (None, Some(&cw)),
            ChainChoice::AvdFirst,
            None,
        )
        .unwrap();
        assert_eq!(c.kind(), "avd+planes");
        assert_eq!(c.len(), 5);
        assert_eq!(c.sq_err.len(), 5);
        let want_norm: f64 = w
            .iter()
            .enumerate()
            .map(|(i, &v)| f64::from(cw[i % n]) * f64::from(v).powi(2))
            .sum();
        assert!((c.sq_norm - want_norm).abs() <= 1e-9 * want_norm);
        let wn: f64 = w.iter().map(|&v| f64::from(v).powi(2)).sum::<f64>().sqrt();
        for b in 1..=c.len() {
            let rec = dense(&c, b);
            let err: f64 = w
                .iter()
                .zip(&rec)
                .enumerate()
                .map(|(i, (&a, &q))| f64::from(cw[i % n]) * f64::from(a - q).powi(2))
                .sum();
            let rel: f64 = w
                .iter()
                .zip(&rec)
                .map(|(&a, &q)| f64::from(a - q).powi(2))
                .sum::<f64>()
                .sqrt()
                / wn;
            assert!(
                (err - c.sq_err[b - 1]).abs() <= 1e-6 * want_norm,
                "{b}: {err} vs {}",
                c.sq_err[b - 1]
            );
            assert!((rel - c.rel_err[b - 1]).abs() <= 1e-6, "{b}");
        }
        // The block sizes: the AVD block is about plane 0's size.
        let avd = c.block(0).unwrap().stored_bytes() as f64;
        let plane0 = c.block(1).unwrap().stored_bytes() as f64;
        assert!((avd / plane0 - 1.0).abs() < 0.2, "{avd} vs {plane0}");
    }

    #[test]
    fn auto_takes_the_chain_with_the_lower_error_curve() {
        let (m, n) = (32, 64);
        let params = PlaneParams {
            group: 16,
            planes: 5,
        };
        // A rank-1 matrix with sign noise: the AVD block captures it almost whole.
        let u = pseudo(m, 1);
        let v = pseudo(n, 2);
        let low: Vec<f32> = (0..m * n).map(|i| 4.0 * u[i / n] * v[i % n]).collect();
        // Uniform noise: planes are optimal for it.
        let noise = pseudo(m * n, 3);
        for (w, want) in [(&low, "avd+planes"), (&noise, "planes")] {
            let p = build_chain(w, m, n, &params, (None, None), ChainChoice::Planes, None).unwrap();
            let a =
                build_chain(w, m, n, &params, (None, None), ChainChoice::AvdFirst, None).unwrap();
            let auto =
                build_chain(w, m, n, &params, (None, None), ChainChoice::Auto, None).unwrap();
            assert_eq!(auto.kind(), want);
            // Whatever it picks has the lower mean log error at the planes chain's sizes.
            let mut at = Vec::new();
            let mut t = 0.0;
            for b in p.blocks().take(AUTO_PLANES) {
                t += b.stored_bytes() as f64;
                at.push(t);
            }
            let (ep, ea) = (p.mean_log_error_at(&at), a.mean_log_error_at(&at));
            assert_eq!(auto.kind() == "avd+planes", ea < ep, "{ep} vs {ea}");
        }
    }

    #[test]
    fn a_zero_matrix_gets_a_chain() {
        let (m, n) = (16, 32);
        let w = vec![0.0f32; m * n];
        let params = PlaneParams {
            group: 16,
            planes: 3,
        };
        for choice in [
            ChainChoice::Planes,
            ChainChoice::AvdFirst,
            ChainChoice::Auto,
        ] {
            let c = build_chain(&w, m, n, &params, (None, None), choice, None).unwrap();
            assert!(c.sq_err.iter().all(|&e| e == 0.0), "{choice:?}");
            assert!(dense(&c, c.len()).iter().all(|&v| v == 0.0));
        }
    }

    #[test]
    fn rank_matches_plane_zero_size() {
        assert_eq!(avd_rank_for(512, 512, 128), 4);
        assert_eq!(avd_rank_for(1536, 512, 128), 6);
        assert_eq!(avd_rank_for(512, 1536, 128), 6);
        assert_eq!(avd_rank_for(4096, 4096, 128), 32);
        assert_eq!(avd_rank_for(3, 8, 8), 1);
    }
}
