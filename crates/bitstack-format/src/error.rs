//! The error type of this crate.

/// Everything that can go wrong reading or writing a container.
///
/// Messages name the file (`<memory>` for [`Container::from_bytes`](crate::Container::from_bytes))
/// and what is wrong with it, e.g.
/// `model.bitstack: header declares 12345 bytes but only 100 are present`.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FormatError {
    /// An I/O operation failed.
    #[error("{file}: cannot {action}: {source}")]
    Io {
        /// The file involved.
        file: String,
        /// What was being done, e.g. "open", "create a temporary file".
        action: &'static str,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The path is a directory (e.g. a model's checkpoint directory), not a container file.
    #[error(
        "{file} is a directory, not a .bitstack file (a model directory is made into one with `bitstack compress`)"
    )]
    Directory {
        /// The directory.
        file: String,
    },
    /// Fewer than 8 bytes: not even the header length is there.
    #[error(
        "{file}: only {present} bytes are present, but a container starts with an 8-byte header length (the file is empty or cut short: download or copy it again)"
    )]
    MissingHeaderLength {
        /// The file involved.
        file: String,
        /// Bytes present.
        present: u64,
    },
    /// The declared header length exceeds [`MAX_HEADER_BYTES`](crate::MAX_HEADER_BYTES).
    #[error(
        "{file}: header declares {declared} bytes, more than the limit of {limit} (not a .bitstack file, or a damaged one)"
    )]
    HeaderTooLarge {
        /// The file involved.
        file: String,
        /// Declared header length.
        declared: u64,
        /// The limit.
        limit: u64,
    },
    /// The file ends inside the header.
    #[error(
        "{file}: header declares {declared} bytes but only {present} are present (truncated inside the header: download or copy the file again)"
    )]
    TruncatedHeader {
        /// The file involved.
        file: String,
        /// Declared header length.
        declared: u64,
        /// Header bytes present.
        present: u64,
    },
    /// The JSON header is malformed or is not a bitstack header.
    #[error("{file}: invalid header: {reason} (not a .bitstack file, or a damaged one)")]
    InvalidHeader {
        /// The file involved.
        file: String,
        /// What is wrong.
        reason: String,
    },
    /// The manifest breaks a rule of docs/FORMAT.md.
    #[error("{file}: invalid manifest: {reason} (a damaged file: download or copy it again, or compress the model again)")]
    InvalidManifest {
        /// The file involved.
        file: String,
        /// What is wrong.
        reason: String,
    },
    /// The file has a format version this reader does not know.
    #[error(
        "{file}: format version {found} is not supported: this reader reads version {supported}{}",
        if *found > u64::from(*supported) { " (the file is newer: upgrade bitstack)" } else { "" }
    )]
    UnsupportedVersion {
        /// The file involved.
        file: String,
        /// Version found in the file.
        found: u64,
        /// Version this reader supports.
        supported: u32,
    },
    /// The file ends inside the fixed part (aux files and fixed tensors).
    #[error(
        "{file}: truncated inside the fixed part: {present} of its {needed} bytes are present (download or copy the file again: the fixed part and the base blocks are needed to load it)"
    )]
    TruncatedFixed {
        /// The file involved.
        file: String,
        /// Bytes of the fixed part present.
        present: u64,
        /// Size of the fixed part.
        needed: u64,
    },
    /// Bytes follow the end of the data buffer.
    #[error("{file}: {extra} trailing bytes after the {expected}-byte data buffer")]
    TrailingBytes {
        /// The file involved.
        file: String,
        /// Length of the data buffer declared by the manifest.
        expected: u64,
        /// Number of extra bytes.
        extra: u64,
    },
    /// A CRC-32 does not match.
    #[error(
        "{file}: {what} checksum mismatch: stored {stored:#010x}, computed {computed:#010x} (the file is damaged: download or copy it again, or compress the model again)"
    )]
    ChecksumMismatch {
        /// The file involved.
        file: String,
        /// What was checked: "fixed part" or "block 17 (model.layers.0.mlp.up_proj.weight #3)".
        what: String,
        /// CRC in the manifest.
        stored: u32,
        /// CRC of the bytes.
        computed: u32,
    },
    /// A stack position past the end of the stack.
    #[error("{file}: block {position} does not exist (the stack has {total} blocks)")]
    NoSuchBlock {
        /// The file involved.
        file: String,
        /// Requested stack position.
        position: usize,
        /// Number of blocks in the stack.
        total: usize,
    },
    /// A block of the stack whose bytes are not (completely) in a truncated file.
    #[error(
        "{file}: block {position} is not in the file: only the first {available} of {total} blocks are complete ({missing} bytes missing)"
    )]
    BlockNotPresent {
        /// The file involved.
        file: String,
        /// Requested stack position.
        position: usize,
        /// Number of complete blocks.
        available: usize,
        /// Number of blocks in the stack.
        total: usize,
        /// Bytes missing at the end of the file.
        missing: u64,
    },
    /// The writer was given inconsistent input (wrong byte length, duplicate name, ...).
    #[error("invalid container input: {reason}")]
    InvalidInput {
        /// What is wrong.
        reason: String,
    },
    /// The temporary spool file of a writer failed its own checks (data changed on disk,
    /// a range never written).
    #[error("{file}: spooled block data is unusable: {reason}")]
    Spool {
        /// The spool file.
        file: String,
        /// What is wrong.
        reason: String,
    },
}
