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
    /// A plane group size that is not a positive multiple of 8.
    #[error("plane group size {group} is invalid (need a multiple of 8, at least 8)")]
    InvalidGroup {
        /// The requested group size.
        group: usize,
    },
    /// No plane requested.
    #[error(
        "0 planes requested; at least 1 is needed (at most {})",
        crate::MAX_PLANES
    )]
    NoPlanes,
    /// More planes than [`MAX_PLANES`](crate::MAX_PLANES).
    #[error(
        "{planes} planes requested; at most {} are supported",
        crate::MAX_PLANES
    )]
    TooManyPlanes {
        /// The requested number of planes.
        planes: usize,
    },
    /// A plane grid part (`mid` or `half`) has the wrong length.
    #[error("plane grid {part}: expected {expected} values for a {rows}×{cols} matrix in groups of {group}, got {got}")]
    GridLength {
        /// `"mid"` or `"half"`.
        part: &'static str,
        /// Rows of the matrix.
        rows: usize,
        /// Columns of the matrix.
        cols: usize,
        /// Group size.
        group: usize,
        /// Expected length.
        expected: usize,
        /// Given length.
        got: usize,
    },
    /// A plane grid value is not finite, or a half-width is negative.
    #[error("plane grid holds an invalid value ({value}): values must be finite, half-widths ≥ 0")]
    InvalidGrid {
        /// The offending value.
        value: f32,
    },
    /// A group's range does not fit f16.
    #[error("row {row}, group {group}: the range [{lo}, {hi}] does not fit the f16 plane grid")]
    GridOverflow {
        /// Row.
        row: usize,
        /// Group index within the row.
        group: usize,
        /// Smallest value of the group.
        lo: f32,
        /// Largest value of the group.
        hi: f32,
    },
    /// A plane's sign matrix does not have its grid's shape.
    #[error("plane signs are {rows}×{cols} but the grid is {grid_rows}×{grid_cols}")]
    PlaneShape {
        /// Rows of the signs.
        rows: usize,
        /// Columns of the signs.
        cols: usize,
        /// Rows of the grid.
        grid_rows: usize,
        /// Columns of the grid.
        grid_cols: usize,
    },
    /// A Hessian does not have `cols × cols` entries.
    #[error("Hessian: expected {expected} values ({cols}×{cols}), got {got}")]
    HessianLength {
        /// Columns of the matrix (the Hessian's side).
        cols: usize,
        /// `cols²`, or `usize::MAX` when that overflows.
        expected: usize,
        /// Given length.
        got: usize,
    },
    /// A Hessian entry or the damping is not finite (or the damping is negative).
    #[error("Hessian holds an invalid value ({value}) at flat index {index}")]
    InvalidHessian {
        /// Flat row-major index (`usize::MAX` for the damping).
        index: usize,
        /// The value.
        value: f64,
    },
    /// The damped Hessian (or its inverse) is not positive definite.
    #[error("the damped Hessian is not positive definite; raise the damping")]
    HessianNotPositiveDefinite,
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
