//! Block ordering for BitStack: scores → the universal stack → budget plans.
//!
//! This crate is independent of what a block *is*. A block is one additive refinement of one
//! matrix (`Ŵ_b = Σ_{i<b} Δ_i`); here it is only a `(matrix, index)` pair with a size in bytes.
//! The same code orders AVD blocks, bit-plane blocks, or any later kind.
//!
//! - [`BlockScorer`] is the extension point that says how good the next block of a matrix is
//!   (lower score = more important = earlier in the stack). [`ErrorReductionScorer`] is the
//!   data-free default; the perplexity scorer of the paper lives with the model code.
//! - [`build_level_synchronous`] builds the universal stack as the reference does
//!   (ALGORITHM.md §3), including its NaN rule.
//! - [`StackLayout`] holds the sizes and the order, and turns a budget into a [`Plan`]
//!   (per-matrix block counts and exact memory, ALGORITHM.md §4).
//! - [`parse_size`] reads budgets such as `30MB`, `20.5MiB` or `123456`.
//!
//! ```
//! use bitstack_order::{StackLayout, StackEntry};
//! // Two matrices, two blocks each, 100 bytes of fixed tensors.
//! let sizes = vec![vec![10, 10], vec![20, 20]];
//! let order = vec![
//!     StackEntry::new(0, 0), StackEntry::new(1, 0), // base blocks (mandatory)
//!     StackEntry::new(1, 1), StackEntry::new(0, 1),
//! ];
//! let layout = StackLayout::new(100, sizes, order, 2).unwrap();
//! assert_eq!(layout.min_memory(), 130);
//! let plan = layout.plan_for_budget(155).unwrap();
//! assert_eq!(plan.per_matrix, vec![1, 2]);
//! assert_eq!(plan.memory_bytes, 150);
//! assert!(layout.plan_for_budget(129).is_err());
//! ```
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]
#![forbid(unsafe_code)]

mod scorer;
mod size;
mod stack;

pub use scorer::{build_level_synchronous, BlockScorer, ErrorReductionScorer, ScoreError};
pub use size::{format_size, parse_size};
pub use stack::{Plan, StackEntry, StackLayout};

/// Errors of this crate.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OrderError {
    /// The budget is smaller than the memory of the mandatory prefix (the base model).
    #[error(
        "budget of {budget} bytes ({}) is below the minimum of {minimum} bytes ({}): \
         the base model (fixed tensors and the first block of every matrix) needs that much",
        format_size(*budget),
        format_size(*minimum)
    )]
    BelowMinimum {
        /// The budget asked for.
        budget: u64,
        /// The smallest loadable memory.
        minimum: u64,
    },
    /// A size string could not be parsed.
    #[error("cannot read size {input:?}: {reason} (examples: 30MB, 20.5MiB, 1GB, 123456)")]
    BadSize {
        /// The text given.
        input: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The stack order is inconsistent with the block sizes.
    #[error("invalid stack: {0}")]
    InvalidStack(String),
    /// A scorer failed.
    #[error("block scoring failed at level {level}: {source}")]
    Scoring {
        /// The level (number of blocks the matrices hold) being scored.
        level: u32,
        /// The scorer's error.
        #[source]
        source: ScoreError,
    },
    /// The NaN rule of the reference cannot be applied.
    #[error(
        "score of matrix {matrix} at the last level {level} is NaN: the order cannot be built"
    )]
    NanAtLastLevel {
        /// Matrix index.
        matrix: u32,
        /// Level.
        level: u32,
    },
}
