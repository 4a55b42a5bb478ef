//! # bitstack
//!
//! Compress a large language model once into a single file that loads at **any** memory
//! budget and resizes at run time by moving only the difference — the BitStack method
//! (training-free iterative absolute-value decomposition into ~1-bit residual blocks, sorted
//! into one universal stack), on an ordinary CPU.
//!
//! This crate is the facade: it re-exports the layers and wires them into pipelines.
//!
//! | layer | crate | re-exported as |
//! |---|---|---|
//! | packed ±1 matrices and kernels | `bitstack-bits` | [`bits`] |
//! | AVD decomposition | `bitstack-decompose` | [`decompose`] |
//! | scoring, stack, budgets | `bitstack-order` | [`order`] |
//! | the container | `bitstack-format` | [`format`](mod@crate::format) |
//! | budgeted, resizable runtime | `bitstack-runtime` | [`runtime`] |
//! | transformer forward pass (feature `model`) | `bitstack-model` | `model` |
//! | a checkpoint directory's weights | `bitstack-checkpoint` | [`checkpoint`] (`Weights`, with the config and tokenizer checks on top) |
//!
//! Pipelines: [`checkpoint`] (reading Hugging Face checkpoints), [`select`] (which tensors are
//! stacked, in module order), [`compress`](mod@compress) (checkpoint → container, data-free
//! ordering), `calibrate` (the paper's activation-aware scaling and perplexity scorer,
//! feature `model`), `engine` (a loaded stack as a transformer, feature `model`).
//!
//! ## Feature flags
//! - `model` (default): the Llama/Mistral/Qwen2 forward pass, for calibration, perplexity,
//!   generation.
//!
//! ## Example
//! ```no_run
//! use std::sync::Arc;
//! use bitstack::{compress, CompressOptions, LoadedStack, StackFile};
//!
//! // Compress once (data-free ordering) ...
//! let options = CompressOptions::default();
//! compress::compress("model_dir".as_ref(), "model.bitstack".as_ref(), &options, &|_| {})?;
//! // ... load at any budget, resize at run time.
//! let file = Arc::new(StackFile::open("model.bitstack")?);
//! let stack = LoadedStack::load(file, bitstack::order::parse_size("30MB")?)?;
//! stack.resize(bitstack::order::parse_size("40MB")?)?;
//! # Ok::<(), bitstack::Error>(())
//! ```
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

pub use bitstack_bits as bits;
pub use bitstack_decompose as decompose;
pub use bitstack_format as format;
#[cfg(feature = "model")]
pub use bitstack_model as model;
pub use bitstack_order as order;
pub use bitstack_runtime as runtime;

#[cfg(feature = "model")]
pub mod best;
pub mod calibrate;
pub mod chain;
pub mod checkpoint;
pub mod compress;
#[cfg(feature = "model")]
pub mod engine;
pub mod resume;
pub mod select;
mod windows;

pub use compress::{CompressOptions, CompressSummary};

/// The README's Rust examples, compiled as doctests.
#[doc = include_str!("../../../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;
pub use runtime::{LoadedStack, StackFile};

/// Errors of the pipelines.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Reading a file failed.
    #[error("{path}: {source}")]
    Io {
        /// The path.
        path: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The checkpoint is invalid or lacks something.
    #[error("{0}")]
    Checkpoint(String),
    /// The architecture is not supported.
    #[error("{0}")]
    Unsupported(String),
    /// A usage error (bad option value).
    #[error("{0}")]
    Usage(String),
    /// Decomposition failed.
    #[error("decomposition of {0}")]
    Decompose(String),
    /// Ordering or budget errors.
    #[error(transparent)]
    Order(#[from] bitstack_order::OrderError),
    /// Container errors.
    #[error(transparent)]
    Format(#[from] bitstack_format::FormatError),
    /// Runtime errors.
    #[error(transparent)]
    Runtime(#[from] bitstack_runtime::RuntimeError),
    /// Model errors.
    #[cfg(feature = "model")]
    #[error(transparent)]
    Model(#[from] bitstack_model::ModelError),
}

impl Error {
    pub(crate) fn io(path: &std::path::Path, source: std::io::Error) -> Self {
        Self::Io {
            path: path.display().to_string(),
            source,
        }
    }
}
