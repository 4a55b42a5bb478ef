//! The error type of this crate.

/// Why a sign matrix could not be built or viewed.
///
/// Every variant names the shape involved so that a caller (e.g. a container reader) can
/// attach the tensor name and report a complete message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BitsError {
    /// `rows * cols` (or the packed byte count) does not fit in `usize`.
    #[error("sign matrix shape {rows}x{cols} is too large: rows*cols overflows usize")]
    ShapeOverflow {
        /// Requested number of rows.
        rows: usize,
        /// Requested number of columns.
        cols: usize,
    },

    /// The number of input values is not `rows * cols`.
    #[error("sign matrix {rows}x{cols} needs {expected} values, got {actual}")]
    ValueCountMismatch {
        /// Requested number of rows.
        rows: usize,
        /// Requested number of columns.
        cols: usize,
        /// `rows * cols`.
        expected: usize,
        /// Length of the slice that was passed.
        actual: usize,
    },

    /// The packed buffer is not exactly [`packed_len`](crate::packed_len)`(rows, cols)` bytes.
    #[error("packed sign matrix {rows}x{cols} needs exactly {expected} bytes, got {actual}")]
    PackedLenMismatch {
        /// Requested number of rows.
        rows: usize,
        /// Requested number of columns.
        cols: usize,
        /// `ceil(rows * cols / 8)`.
        expected: usize,
        /// Length of the buffer that was passed.
        actual: usize,
    },

    /// The trailing pad bits of the last byte are not all zero.
    #[error(
        "packed sign matrix {rows}x{cols}: the {pad_bits} pad bit(s) of the last byte \
         (0x{last_byte:02x}) must be zero"
    )]
    NonZeroPadding {
        /// Number of rows.
        rows: usize,
        /// Number of columns.
        cols: usize,
        /// How many low bits of the last byte are padding.
        pad_bits: u32,
        /// The offending last byte.
        last_byte: u8,
    },

    /// The strip layout was asked for a matrix whose width is not a whole number of strips.
    #[error(
        "sign matrix {rows}x{cols}: the strip layout needs a width that is a multiple of \
         {strip} columns"
    )]
    StripWidth {
        /// Number of rows.
        rows: usize,
        /// Number of columns.
        cols: usize,
        /// Columns per strip ([`crate::STRIP_COLS`]).
        strip: usize,
    },

    /// An input value is NaN, so it has no sign.
    #[error("sign matrix {rows}x{cols}: value at row {row}, column {col} is NaN")]
    NanValue {
        /// Number of rows.
        rows: usize,
        /// Number of columns.
        cols: usize,
        /// Row of the NaN.
        row: usize,
        /// Column of the NaN.
        col: usize,
    },
}
