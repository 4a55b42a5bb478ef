//! The `.bitstack` container: one safetensors-compatible file holding a compressed model —
//! its fixed tensors, its auxiliary files (`config.json`, `tokenizer.json`, ...) and every
//! residual block, laid out in universal stack order so that the bytes any budget needs are a
//! prefix of the file. The byte-level specification is `docs/FORMAT.md`.
//!
//! The container is kind-independent: a block is a `kind` string (e.g. `"avd"`), integer
//! parameters and named parts (tensors); this crate stores and checks them but never
//! interprets them.
//!
//! - [`ContainerWriter`] builds a container (`add_aux_file`, `add_fixed`, `add_matrix`,
//!   `push_block` in stack order, `set_mandatory_blocks`) and writes it atomically. Blocks
//!   produced long before the write can wait in a [`Spool`] on disk
//!   (`push_spooled_block`, or `spool_blocks_in` for everything `push_block` is given)
//!   instead of in memory.
//! - [`Container`] opens one ([`Container::open`] memory-maps a file,
//!   [`Container::from_bytes`] reads bytes in memory), validates every offset, length, dtype
//!   and shape, and verifies the CRC-32 of the fixed part. A file truncated inside the blocks
//!   (a partial download) opens as the shorter stack of its complete blocks.
//! - [`Container::block`] returns a block after checking its CRC-32; [`BlockRef::part`] gives
//!   its parts as [`TensorRef`]s.
//!
//! ```
//! use std::collections::BTreeMap;
//! use bitstack_format::{Container, ContainerWriter, Dtype, PartData};
//!
//! let mut writer = ContainerWriter::new(BTreeMap::from([(
//!     "architecture".to_owned(),
//!     serde_json::json!("LlamaForCausalLM"),
//! )]));
//! writer.add_aux_file("config.json", br#"{"hidden_size": 8}"#.to_vec())?;
//! writer.add_fixed("model.norm.weight", Dtype::F16, vec![8], vec![0; 16], "BF16")?;
//! let q = writer.add_matrix("model.layers.0.self_attn.q_proj.weight", 8, 8, "BF16")?;
//! for b in 0..2 {
//!     let parts = vec![
//!         PartData::new("signs", Dtype::U8, vec![8], vec![0xAA; 8]),
//!         PartData::new("u", Dtype::F16, vec![8, 1], vec![0; 16]),
//!         PartData::new("v", Dtype::F16, vec![1, 8], vec![0; 16]),
//!     ];
//!     writer.push_block(q, b, "avd", BTreeMap::from([("k".to_owned(), 1)]), parts)?;
//! }
//! writer.set_mandatory_blocks(1);
//! let bytes = writer.to_bytes()?;
//!
//! // A partial download: the last block is cut short.
//! let container = Container::from_bytes(bytes[..bytes.len() - 5].to_vec())?;
//! assert_eq!(container.total_blocks(), 2);
//! assert_eq!(container.available_blocks(), 1);
//! assert_eq!(container.missing_bytes(), 5);
//! assert_eq!(container.aux_file("config.json"), Some(&br#"{"hidden_size": 8}"#[..]));
//! let block = container.block(0)?; // CRC-checked
//! assert_eq!(block.kind(), "avd");
//! assert_eq!(block.param("k"), Some(1));
//! assert_eq!(block.part("signs").unwrap().bytes, &[0xAA; 8]);
//! assert!(container.block(1).is_err());
//! # Ok::<(), bitstack_format::FormatError>(())
//! ```
//!
//! Tensor names in the safetensors header: `aux/<file name>`, `fixed/<original name>` and
//! `block/<stack position>/<matrix index>.<block index in matrix>/<part>` (see
//! [`block_tensor_name`]).
//!
//! This crate has no feature flags. Fuzzing builds (`cargo fuzz`, which passes
//! `--cfg fuzzing`) ignore the manifest and fixed-part checksums when opening, so that the
//! fuzzer (`fuzz/`, target `open_container`) reaches the validation behind them; block
//! checksums and the `verify_*` methods are always checked.
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;

mod dtype;
mod error;
mod header;
mod manifest;
mod reader;
mod spool;
mod writer;

pub use dtype::Dtype;
pub use error::FormatError;
pub use header::{
    FORMAT_KEY, FORMAT_NAME, MANIFEST_CRC_KEY, MANIFEST_KEY, MAX_HEADER_BYTES, VERSION_KEY,
};
pub use manifest::{
    aux_tensor_name, block_tensor_name, fixed_tensor_name, AuxEntry, BlockEntry, FixedEntry,
    Manifest, MatrixEntry, TensorSpec, FORMAT_VERSION,
};
pub use reader::{BlockRef, Container, TensorRef};
pub use spool::{Spool, SpoolRange};
pub use writer::{ContainerWriter, PartData};
