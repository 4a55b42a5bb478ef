//! The error type of this crate.

use std::path::PathBuf;

/// Everything that can go wrong while loading or running a model.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ModelError {
    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file involved.
        path: PathBuf,
        /// The underlying I/O error.
        #[source]
        source: std::io::Error,
    },
    /// `config.json` is missing a key, has a wrong type or an invalid value.
    #[error("invalid model config {path}: {message}")]
    Config {
        /// The config file (or `<memory>` when parsed from a string).
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },
    /// The checkpoint's architecture is not one this crate implements.
    #[error("unsupported architecture {found:?}; supported: {supported}")]
    UnsupportedArchitecture {
        /// The `architectures` entry found in the config.
        found: String,
        /// The architectures this crate supports.
        supported: &'static str,
    },
    /// A tensor the model needs is absent from the checkpoint.
    #[error("missing tensor {name:?} in the checkpoint")]
    MissingTensor {
        /// The Hugging Face tensor name.
        name: String,
    },
    /// A tensor has a shape other than the one the config implies.
    #[error("tensor {name:?} has shape {found:?}, expected {expected:?}")]
    TensorShape {
        /// The tensor name.
        name: String,
        /// The shape the config implies.
        expected: Vec<usize>,
        /// The shape found.
        found: Vec<usize>,
    },
    /// The checkpoint's weights files are missing, damaged or inconsistent, or hold a dtype
    /// other than F16, BF16 and F32 (the message names the file or tensor).
    #[error(transparent)]
    Weights(#[from] bitstack_checkpoint::CheckpointError),
    /// The tokenizer could not be loaded or failed on an input.
    #[error("tokenizer {path}: {message}")]
    Tokenizer {
        /// The `tokenizer.json` involved.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// A token id is outside the vocabulary.
    #[error("token id {token} is outside the vocabulary of {vocab_size} tokens")]
    TokenOutOfRange {
        /// The offending id.
        token: u32,
        /// The model's vocabulary size.
        vocab_size: usize,
    },
    /// A linear layer (from a hook or `set_linear`) has the wrong shape.
    #[error("linear {name:?} is [{found_out}, {found_in}], expected [{expected_out}, {expected_in}] (out, in)")]
    LinearShape {
        /// The Hugging Face weight name of the slot.
        name: String,
        /// Expected `out_features`.
        expected_out: usize,
        /// Expected `in_features`.
        expected_in: usize,
        /// Found `out_features`.
        found_out: usize,
        /// Found `in_features`.
        found_in: usize,
    },
    /// An argument is out of range (layer index, buffer length, empty input...).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
}

impl ModelError {
    pub(crate) fn config(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        Self::Config {
            path: path.into(),
            message: message.into(),
        }
    }
}
