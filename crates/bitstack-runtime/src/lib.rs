//! The BitStack runtime: a budgeted, resizable weight provider.
//!
//! Open a `.bitstack` container ([`StackFile::open`], memory-mapped), load a budget into memory
//! the runtime owns ([`LoadedStack::load`]: the resident bytes equal the accounted bytes of
//! ALGORITHM.md §4), then for any matrix: reconstruct it densely ([`LoadedStack::reconstruct_f32`],
//! or f16/bf16 for export), multiply a vector straight from the packed blocks without rebuilding
//! the matrix ([`LoadedStack::matvec`]), or many vectors at once ([`LoadedStack::matmul`]).
//! [`LoadedStack::resize`] moves to another budget by reading or dropping only the difference,
//! while other threads keep using the model: each matrix switches atomically.
//!
//! The runtime knows block *kinds* ([`Block`]); everything else (stack, plan, container) is
//! kind-independent.
//!
//! ```no_run
//! use std::sync::Arc;
//! use bitstack_runtime::{LoadedStack, StackFile};
//! let file = Arc::new(StackFile::open("model.bitstack")?);
//! let model = LoadedStack::load(file.clone(), 30_000_000)?;
//! let q = file.matrix_index("model.layers.0.self_attn.q_proj.weight").unwrap();
//! let (rows, cols) = file.shape(q);
//! let x = vec![1.0f32; cols];
//! let mut y = vec![0.0f32; rows];
//! model.matvec(q, &x, &mut y);
//! let report = model.resize(40_000_000)?; // grow: reads only the missing blocks
//! println!("read {} bytes", report.bytes_read);
//! # Ok::<(), bitstack_runtime::RuntimeError>(())
//! ```
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

mod block;
mod export;
mod file;
mod loaded;

pub use block::Block;
pub use export::ExportDtype;
pub use file::StackFile;
pub use loaded::{Counters, DecodeTables, FixedTensor, LoadedStack, ResizeReport};

/// Errors of the runtime.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RuntimeError {
    /// The container could not be read or is invalid.
    #[error(transparent)]
    Format(#[from] bitstack_format::FormatError),
    /// Budget or stack errors (e.g. a budget below the minimum).
    #[error(transparent)]
    Order(#[from] bitstack_order::OrderError),
    /// A block's payload does not decode.
    #[error("block at stack position {position} ({matrix} #{index}): {reason}")]
    BadBlock {
        /// Stack position.
        position: usize,
        /// Matrix name.
        matrix: String,
        /// Block number within the matrix.
        index: u32,
        /// What is wrong.
        reason: String,
    },
    /// The budget needs blocks the (truncated) file does not hold.
    #[error(
        "budget of {budget} bytes needs {missing_bytes} more bytes of blocks than the file holds \
         ({available_blocks} of {total_blocks} blocks present; the file is incomplete — finish \
         the download or choose a budget of at most {max_available} bytes)"
    )]
    BeyondAvailable {
        /// Budget asked for.
        budget: u64,
        /// Bytes of blocks the budget needs that are missing from the file.
        missing_bytes: u64,
        /// Complete blocks in the file.
        available_blocks: usize,
        /// Blocks of the complete stack.
        total_blocks: usize,
        /// Largest memory loadable from what is present.
        max_available: u64,
    },
    /// The file does not even hold the base model.
    #[error(
        "the file holds only {available} of the {mandatory} base blocks: it is incomplete and \
         cannot be loaded at any budget"
    )]
    BaseIncomplete {
        /// Complete blocks present.
        available: usize,
        /// Blocks the base model needs.
        mandatory: usize,
    },
    /// I/O while exporting.
    #[error("{path}: {source}")]
    Io {
        /// The path.
        path: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// Anything else about the container's content.
    #[error("{0}")]
    Invalid(String),
}

impl RuntimeError {
    pub(crate) fn io(path: &std::path::Path, source: std::io::Error) -> Self {
        Self::Io {
            path: path.display().to_string(),
            source,
        }
    }
}
