//! Iterative absolute-value decomposition (AVD) of weight matrices into ~1-bit residual blocks.
//!
//! A weight `W` (`rows × cols`, row-major) is written as a sum of blocks
//! `S_i ⊙ (u_i v_i)`, each with a ±1 sign matrix `S_i` (1 bit per weight) and a rank-`k`
//! magnitude `u_i v_i` (f16 factors). Block `i` is fitted to the residual `R` left by the
//! first `i − 1`: `S_i = sign(R)` and `u_i v_i` is the best rank-`k` approximation of `|R|`
//! (docs/ALGORITHM.md §2). Loading more blocks gives a better approximation.
//!
//! * [`decompose`] runs the iteration; [`SvdMethod`] picks the exact SVD (the reference's
//!   behaviour, for verification) or a randomized range finder (the default, much faster).
//! * [`AvdBlock`] holds one block and computes with it: [`AvdBlock::add_to_dense`],
//!   [`AvdBlock::matvec_add`] (without rebuilding the dense block).
//! * [`Significance`] supplies per-input-channel weights (e.g. activation norms) so that the
//!   error is minimised in a weighted norm; [`NoSignificance`] is the default.
//!
//! ```
//! use bitstack_decompose::{decompose, AvdParams, SvdMethod};
//!
//! let (rows, cols) = (24, 16);
//! let w: Vec<f32> = (0..rows * cols).map(|i| ((i * 37 % 101) as f32 - 50.0) / 50.0).collect();
//! let params = AvdParams { k: 2, niter: 6, svd: SvdMethod::Exact, seed: 0 };
//! let dec = decompose(&w, rows, cols, &params, None)?;
//! assert_eq!(dec.blocks.len(), 6);
//! // Every block lowers the error.
//! assert!(dec.rel_err.windows(2).all(|p| p[1] < p[0]));
//!
//! // y = Ŵ_6 x without building Ŵ_6.
//! let x = vec![1.0f32; cols];
//! let mut y = vec![0.0f32; rows];
//! for block in &dec.blocks {
//!     block.matvec_add(&x, &mut y);
//! }
//! # Ok::<(), bitstack_decompose::DecomposeError>(())
//! ```
//!
//! Threads: large products and SVDs run on the current rayon pool (via faer's `Par::rayon`);
//! run `decompose` inside `ThreadPool::install` to bound them. There are no feature flags.
//!
//! `unsafe` appears in one module only: the AVX-512 products of the randomized SVD.

#![deny(unsafe_code)]
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

mod avd;
mod block;
mod error;
mod params;
mod planes;
mod planes_gptq;
mod significance;
mod skinny;
mod svd;

pub use avd::{decompose, decompose_with_significance, Decomposition};
pub use block::AvdBlock;
pub use error::{DecomposeError, ExpectedLen};
pub use params::{AvdParams, SvdMethod};
pub use planes::{
    decompose_planes, planes_matvec_add, planes_matvec_add_q16, planes_matvec_add_with,
    planes_rows_to_dense, planes_rows_to_dense_with, PlaneBlock, PlaneDecomposition, PlaneGrid,
    PlaneParams, PlaneTable, MAX_PLANES,
};
pub use planes_gptq::{
    decompose_planes_compensated, decompose_planes_gptq, decompose_planes_with_factor,
    decompose_planes_with_factor_limited, CompensationMode, GptqFactor, DEFAULT_DAMP,
};
pub use significance::{ChannelWeightMap, NoSignificance, Significance};
