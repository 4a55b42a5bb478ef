//! Reading Hugging Face checkpoints: `config.json`, one or several `*.safetensors` files,
//! `tokenizer.json`. Tensors are memory-mapped and read in their stored dtype by
//! [`Weights`] (the `bitstack-checkpoint` crate, which the model loader shares).

use std::collections::BTreeMap;
use std::path::Path;

pub use bitstack_checkpoint::{
    from_f32, to_f32, CheckpointError, SourceDtype, TensorInfo, Weights,
};

use crate::Error;

impl From<CheckpointError> for Error {
    fn from(e: CheckpointError) -> Self {
        match e {
            CheckpointError::Io { path, source } => Error::io(&path, source),
            other => Error::Checkpoint(other.to_string()),
        }
    }
}

/// An opened Hugging Face checkpoint directory: its weights (read by
/// [`bitstack_checkpoint::Weights`], which the model loader shares) and its other files.
#[derive(Debug)]
pub struct Checkpoint {
    weights: Weights,
}

impl Checkpoint {
    /// Opens the weights of `dir`: the shards named by `model.safetensors.index.json` when
    /// there is one (each must be present, and hold the tensors the index assigns to it),
    /// else `model.safetensors`, else every `*.safetensors` file of `dir` (sorted by name).
    /// Every tensor must be F16, BF16 or F32; a tensor name present in two files is an error.
    pub fn open(dir: impl AsRef<Path>) -> Result<Self, Error> {
        Ok(Self {
            weights: Weights::open(dir)?,
        })
    }

    /// The checkpoint directory.
    pub fn dir(&self) -> &Path {
        self.weights.dir()
    }

    /// Every tensor, sorted by name.
    pub fn tensors(&self) -> &BTreeMap<String, TensorInfo> {
        self.weights.tensors()
    }

    /// One tensor's description.
    pub fn info(&self, name: &str) -> Result<&TensorInfo, Error> {
        Ok(self.weights.info(name)?)
    }

    /// The raw little-endian bytes of a tensor.
    pub fn raw(&self, name: &str) -> Result<&[u8], Error> {
        Ok(self.weights.raw(name)?)
    }

    /// A tensor widened to f32; non-finite values are an error naming the tensor and index.
    pub fn tensor_f32(&self, name: &str) -> Result<Vec<f32>, Error> {
        let info = self.info(name)?;
        let values = self.weights.tensor_f32(name)?;
        if let Some(i) = values.iter().position(|v| !v.is_finite()) {
            return Err(Error::Checkpoint(format!(
                "{}: tensor {name} {:?} holds a non-finite value ({}) at flat index {i}; \
                 bitstack cannot compress NaN/Inf weights: use an intact checkpoint",
                self.dir().display(),
                info.shape,
                values[i]
            )));
        }
        Ok(values)
    }

    /// A file of the checkpoint directory (`config.json`, `tokenizer.json`, …), if present.
    pub fn read_file(&self, name: &str) -> Result<Option<Vec<u8>>, Error> {
        let path = self.dir().join(name);
        match std::fs::read(&path) {
            Ok(bytes) => Ok(Some(bytes)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::io(&path, e)),
        }
    }

    /// Checks that `config.json` describes these weights: it parses as the configuration of a
    /// supported architecture, and every tensor such a model reads is present with the shape
    /// the config implies. Catches at compression time what would otherwise only fail when
    /// the compressed file is evaluated.
    #[cfg(feature = "model")]
    pub fn check_config(&self) -> Result<bitstack_model::ModelConfig, Error> {
        let path = self.dir().join("config.json");
        let config = bitstack_model::ModelConfig::from_file(&path).map_err(|e| {
            Error::Checkpoint(format!(
                "{e}; config.json must be the Hugging Face config of these weights (or choose \
                 the tensors to stack with --include GLOB and --no-calibration)"
            ))
        })?;
        for (name, shape) in config.expected_tensors() {
            match self.tensors().get(&name) {
                None => {
                    return Err(Error::Checkpoint(format!(
                        "{}: tensor {name} is missing, but config.json ({}, {} layers) needs \
                         it: the weights are incomplete or do not belong to this config.json",
                        self.dir().display(),
                        config.architecture.hf_name(),
                        config.num_layers
                    )))
                }
                Some(info) if info.shape != shape => {
                    return Err(Error::Checkpoint(format!(
                        "{}: tensor {name} has shape {:?}, but config.json implies {shape:?}: \
                         the weights do not match config.json (use the config.json that came \
                         with them)",
                        self.dir().display(),
                        info.shape
                    )))
                }
                Some(_) => {}
            }
        }
        Ok(config)
    }

    /// Checks that `tokenizer.json`, when present, parses (it is carried into the container
    /// and used by evaluation and generation).
    #[cfg(feature = "model")]
    pub fn check_tokenizer(&self) -> Result<(), Error> {
        let Some(bytes) = self.read_file("tokenizer.json")? else {
            return Ok(());
        };
        bitstack_model::TextTokenizer::from_bytes(&bytes, self.dir().join("tokenizer.json"))
            .map_err(|e| {
                Error::Checkpoint(format!(
                    "{e}; replace it with the model's original tokenizer.json"
                ))
            })?;
        Ok(())
    }
}
