//! The crate's error type.

use bitstack_bits::BitsError;

/// Everything that can go wrong while decomposing a matrix or assembling a block.
///
/// Messages name the offending index, shape or parameter; callers that know the tensor's
/// name should add it when reporting (the decomposition itself only sees numbers).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DecomposeError {
    /// The buffer length does not match `rows × cols` (or `rows × cols` overflows).
    #[error("shape mismatch: a {rows}×{cols} matrix needs {expected} values, got {len}")]
    ShapeMismatch {
        /// Requested number of rows.
        rows: usize,
        /// Requested number of columns.
        cols: usize,
        /// `rows × cols`, or `None` when that overflows `usize`.
        expected: ExpectedLen,
        /// Length of the buffer that was given.
        len: usize,
    },
    /// A weight is NaN or infinite.
    #[error("weight at [{row}, {col}] (flat index {index}) is not finite: {value}")]
    NonFinite {
        /// Flat row-major index of the first bad value.
        index: usize,
        /// Its row.
        row: usize,
        /// Its column.
        col: usize,
        /// The value itself.
        value: f32,
    },
    /// The rank `k` is 0 or larger than `min(rows, cols)`.
    #[error("rank k = {k} is invalid for a {rows}×{cols} matrix (need 1 ≤ k ≤ {})", rows.min(cols))]
    InvalidRank {
        /// The requested rank.
        k: usize,
        /// Rows of the matrix.
        rows: usize,
        /// Columns of the matrix.
        cols: usize,
    },
    /// `niter = 0`: a decomposition needs at least one block.
    #[error("niter must be at least 1")]
    ZeroIterations,
    /// The per-input-channel weights do not have one entry per column.
    #[error("channel weights: expected {expected} values (one per input column), got {got}")]
    ChannelWeightsLength {
        /// Number of columns of the matrix.
        expected: usize,
        /// Number of weights given.
        got: usize,
    },
    /// A per-input-channel weight is zero, negative or not finite.
    #[error("channel weight {index} is {value}; weights must be finite and > 0")]
    InvalidChannelWeight {
        /// Index (column) of the first bad weight.
        index: usize,
        /// The value.
        value: f32,
    },
    /// A factor given to [`AvdBlock::from_parts`](crate::AvdBlock::from_parts) has the wrong length.
    #[error("factor {factor}: expected {expected} values for a {rows}×{cols} block of rank {k}, got {got}")]
    FactorLength {
        /// `"u"` or `"v"`.
        factor: &'static str,
        /// Rows of the block.
        rows: usize,
        /// Columns of the block.
        cols: usize,
        /// Rank of the block.
        k: usize,
        /// Expected length.
        expected: usize,
        /// Given length.
        got: usize,
    },
    /// A factor does not fit into f16 (|value| > 65504 or not finite).
    #[error("block {block}: factor {factor} has a value ({value}) that is not representable as a finite f16")]
    FactorOverflow {
        /// 0-based index of the block being computed.
        block: usize,
        /// `"u"` or `"v"`.
        factor: &'static str,
        /// The f32 value that overflowed.
        value: f32,
    },
    /// The singular value decomposition did not converge.
    #[error("SVD of |R| did not converge at block {block}")]
    SvdNoConvergence {
        /// 0-based index of the block being computed.
        block: usize,
    },
    /// Building the packed sign matrix failed.
    #[error(transparent)]
    Bits(#[from] BitsError),
}

/// The expected length in [`DecomposeError::ShapeMismatch`]: `rows × cols`, unless that overflows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExpectedLen(pub Option<usize>);

impl std::fmt::Display for ExpectedLen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(n) => write!(f, "{n}"),
            None => f.write_str("more than usize::MAX"),
        }
    }
}
