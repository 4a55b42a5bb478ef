//! A Llama-family causal language model (Llama, Mistral, Qwen2) on the CPU, f32 compute,
//! with every projection behind the [`Linear`] trait.
//!
//! This crate is the transformer used by BitStack for calibration (observing the inputs of
//! every linear), block scoring (swapping one matrix and re-running from its layer),
//! perplexity evaluation and generation. It does not depend on any other BitStack crate:
//! compressed weights plug in by implementing [`Linear`] (and, for their own containers,
//! [`TensorSource`]).
//!
//! - Loading: [`CausalLm::load`] reads a Hugging Face directory (`config.json`, one
//!   `model.safetensors` or shards, f32/f16/bf16 weights, memory-mapped);
//!   [`CausalLm::from_source`] takes any [`TensorSource`] and a hook choosing each linear.
//! - Full-sequence forward: [`CausalLm::forward`], [`CausalLm::window_nll`],
//!   [`CausalLm::perplexity`]; piecewise: [`CausalLm::embed`], [`CausalLm::forward_layer`],
//!   [`CausalLm::final_logits`], [`CausalLm::hidden_nll`]; calibration sites: [`Site`].
//! - Incremental decoding: [`KvCache`], [`CausalLm::forward_next`], [`Sampler`],
//!   [`CausalLm::generate`].
//! - Tokenization and windows: [`TextTokenizer`], [`windows`].
//!
//! Threads: projections use faer's GEMM on the current rayon pool, attention runs heads in
//! parallel; run inside `rayon::ThreadPool::install` to limit them. No feature flags.
//!
//! # Example
//!
//! ```no_run
//! use bitstack_model::{windows, CausalLm, Sampler, TextTokenizer};
//!
//! # fn main() -> Result<(), bitstack_model::ModelError> {
//! let dir = "models/small-llama";
//! let model = CausalLm::load(dir)?;
//! let tok = TextTokenizer::from_model_dir(dir)?;
//! let ids = tok.encode(&std::fs::read_to_string("test.txt").unwrap_or_default())?;
//! let ppl = model.perplexity(&windows(&ids, 512, Some(64)))?;
//! println!("test64 perplexity {:.4}", ppl.ppl);
//!
//! let prompt = tok.encode("fn main() {")?;
//! let out = model.generate(&prompt, 32, &mut Sampler::new(0.8, 0.95, 42), &[0], &mut |_| true)?;
//! println!("{}", tok.decode(&out, true)?);
//! # Ok(())
//! # }
//! ```
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

mod attention;
mod config;
mod error;
mod fastmath;
mod half16;
mod linear;
mod model;
mod rope;
mod sampler;
mod source;
mod tokenizer;

pub use config::{Architecture, ModelConfig, RopeScaling, SUPPORTED_ARCHITECTURES};
pub use error::ModelError;
pub use half16::{HalfKind, HalfLinear, HalfMatrix};
pub use linear::{dense_forward, matvec, DenseLinear, Linear};
pub use model::{
    CausalLm, KvCache, LayerRun, LinearChooser, LinearSlot, Observer, Perplexity, Site,
};
pub use sampler::{argmax, Sampler, SplitMix64};
pub use source::{RowLookup, SafetensorsDir, TensorSource};
pub use tokenizer::{windows, TextTokenizer};

/// The README's examples, compiled as doctests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
