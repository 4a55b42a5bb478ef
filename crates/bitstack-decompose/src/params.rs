//! Parameters of the decomposition.

/// How the top-k singular triplets of `|R|` are computed at each AVD iteration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum SvdMethod {
    /// A full thin SVD (faer), of which the first `k` triplets are kept.
    ///
    /// This is what the reference implementation does; it is slow (`O(m·n·min(m, n))` per
    /// block) and meant for verification.
    Exact,
    /// A randomized range finder with power iterations (Halko, Martinsson & Tropp 2011),
    /// optionally warm-started and with a block Krylov Rayleigh–Ritz step (Musco & Musco
    /// 2015): `2·power_iters + 2` products of `|R|` or `|R|ᵀ` with `k + oversample` columns
    /// per block (the last one `power_iters·(k + oversample)` wide with `block_krylov`).
    ///
    /// The sketch is re-orthonormalised (QR) after every product with `|R|` or `|R|ᵀ`, and the
    /// Gaussian test matrix is drawn deterministically from [`AvdParams::seed`] and the
    /// block index: the result depends only on the inputs, not on the thread count.
    Randomized {
        /// Extra sketch columns beyond `k` (clamped so that `k + oversample ≤ min(m, n)`).
        oversample: usize,
        /// Number of power iterations (each costs two products with `|R|`).
        power_iters: usize,
        /// Start each block's sketch from the previous block's right Ritz vectors (plus
        /// `⌈oversample / 2⌉` fresh Gaussian columns) instead of a Gaussian matrix.
        warm_start: bool,
        /// Rayleigh–Ritz on the whole block Krylov space `[Y₀, Y₁, …, Y_q]` of the power
        /// iterations (width `(k + oversample)·(power_iters + 1)`) instead of on the last
        /// block only: the same products with `|R|`, except a wider last one, and a much more
        /// accurate top-`k` subspace when the spectrum has no gap after `σ_k`.
        block_krylov: bool,
    },
}

impl SvdMethod {
    /// The default randomized setting: `oversample = 16`, `power_iters = 2`, warm start,
    /// block Krylov (6 products with `|R|` per block, the last one 32·2 = 64 columns wide at
    /// k = 16).
    ///
    /// Measured (docs/NOTES.md, `examples/avd_quality.rs`, `bitstack bench --only avd`):
    /// on every small-llama matrix (raw, k = 4, 16 blocks) the error after 16 blocks is at most
    /// 1.0096× [`SvdMethod::Exact`]'s (mean 1.002×; the per-matrix differences, of either
    /// sign, are the greedy iteration's sensitivity to small perturbations), and 1.003–1.005×
    /// on the bench's synthetic 512×512 matrices at k = 16 (the fast mode also carries the residual
    /// of the stored f16 blocks, the reference mode that of the f32 factors). At 14336×4096, k = 16 one block costs
    /// ~0.6× the previous default's (`oversample = 16`, `power_iters = 4`, cold start, no
    /// Krylov step: 10 products, max ratio 1.0086, mean 1.0013, synthetic 1.010).
    /// `oversample = 20` gave max 1.0067 at ~20 % more time per block; cold-started block
    /// Krylov with the same products, max 1.0108.
    pub const DEFAULT_RANDOMIZED: SvdMethod = SvdMethod::Randomized {
        oversample: 16,
        power_iters: 2,
        warm_start: true,
        block_krylov: true,
    };
}

impl Default for SvdMethod {
    fn default() -> Self {
        Self::DEFAULT_RANDOMIZED
    }
}

/// Parameters of [`decompose`](crate::decompose).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AvdParams {
    /// Rank of each block's `u v` factorisation (`1 ≤ k ≤ min(rows, cols)`).
    ///
    /// The reference uses 16 for 4096-wide models, 1–8 for the small test models.
    pub k: usize,
    /// Number of blocks (AVD iterations) to compute, ≥ 1.
    pub niter: usize,
    /// How the top-k SVD of `|R|` is computed.
    pub svd: SvdMethod,
    /// Seed of the randomized SVD's test matrices (ignored by [`SvdMethod::Exact`]).
    pub seed: u64,
}

impl AvdParams {
    /// Whether these parameters suit a `rows × cols` matrix: `niter ≥ 1` and
    /// `1 ≤ k ≤ min(rows, cols)` (what [`decompose`](crate::decompose) checks first, for
    /// callers that check every matrix before any work starts).
    ///
    /// # Errors
    /// [`crate::DecomposeError::ZeroIterations`] or [`crate::DecomposeError::InvalidRank`].
    pub fn check_shape(&self, rows: usize, cols: usize) -> Result<(), crate::DecomposeError> {
        if self.niter == 0 {
            return Err(crate::DecomposeError::ZeroIterations);
        }
        if self.k == 0 || self.k > rows.min(cols) {
            return Err(crate::DecomposeError::InvalidRank {
                k: self.k,
                rows,
                cols,
            });
        }
        Ok(())
    }
}

impl Default for AvdParams {
    /// `k = 16`, `niter = 16` (the reference's setting for 4096-wide models), randomized SVD,
    /// `seed = 0`.
    fn default() -> Self {
        Self {
            k: 16,
            niter: 16,
            svd: SvdMethod::default(),
            seed: 0,
        }
    }
}
