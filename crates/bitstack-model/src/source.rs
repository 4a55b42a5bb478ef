//! Where weights come from: the [`TensorSource`] trait and its safetensors implementation.

use std::path::Path;

use bitstack_checkpoint::Weights;

use crate::ModelError;

/// A named collection of tensors that can be widened to f32.
///
/// Object-safe so that other containers (e.g. a BitStack file) can feed
/// [`CausalLm::from_source`](crate::CausalLm::from_source).
pub trait TensorSource {
    /// Returns `(shape, values)` of the tensor `name`, converted to f32, row-major.
    ///
    /// Errors with [`ModelError::MissingTensor`] when the tensor is absent.
    fn tensor_f32(&self, name: &str) -> Result<(Vec<usize>, Vec<f32>), ModelError>;
    /// Whether a tensor called `name` exists.
    fn contains(&self, name: &str) -> bool;
    /// All tensor names, sorted.
    fn names(&self) -> Vec<String>;
    /// The tensor `name` as a 2-D 16-bit matrix shared with the source, when the source holds
    /// it that way (then the model keeps it at 2 bytes per value instead of widening it to
    /// f32). `None` (the default): use [`tensor_f32`](Self::tensor_f32).
    fn tensor_half(&self, name: &str) -> Option<crate::HalfMatrix> {
        let _ = name;
        None
    }
    /// The 2-D tensor `name` as rows reconstructed on demand (e.g. a stacked embedding
    /// table: a token lookup rebuilds only its row). `None` (the default): not available.
    fn tensor_rows(&self, name: &str) -> Option<std::sync::Arc<dyn RowLookup>> {
        let _ = name;
        None
    }
}

/// A matrix whose rows are produced on demand (an embedding table that is not held dense).
pub trait RowLookup: Send + Sync {
    /// Number of rows.
    fn rows(&self) -> usize;
    /// Number of columns.
    fn cols(&self) -> usize;
    /// Writes row `row` into `out` (`cols` values).
    ///
    /// Callers guarantee `row < rows()` and `out.len() == cols()`.
    fn row_into(&self, row: usize, out: &mut [f32]);
}

/// The `*.safetensors` weights of a Hugging Face model directory, memory-mapped, as
/// [`bitstack_checkpoint::Weights`] opens them (the compressor's reader too): the files named
/// by `model.safetensors.index.json`; else `model.safetensors`; else every `*.safetensors`
/// in the directory.
#[derive(Debug)]
pub struct SafetensorsDir {
    weights: Weights,
}

impl SafetensorsDir {
    /// Opens the weights of the model directory `dir`.
    pub fn open(dir: impl AsRef<Path>) -> Result<Self, ModelError> {
        Ok(Self {
            weights: Weights::open(dir)?,
        })
    }

    /// The files backing this source.
    pub fn paths(&self) -> impl Iterator<Item = &Path> {
        self.weights.paths()
    }

    /// Shape and dtype name (`"F16"`, `"BF16"` or `"F32"`) of a tensor, if present.
    pub fn tensor_info(&self, name: &str) -> Option<(Vec<usize>, String)> {
        self.weights
            .tensors()
            .get(name)
            .map(|t| (t.shape.clone(), t.dtype.name().to_owned()))
    }
}

impl TensorSource for SafetensorsDir {
    fn tensor_f32(&self, name: &str) -> Result<(Vec<usize>, Vec<f32>), ModelError> {
        let info = self
            .weights
            .tensors()
            .get(name)
            .ok_or_else(|| ModelError::MissingTensor { name: name.into() })?;
        Ok((info.shape.clone(), self.weights.tensor_f32(name)?))
    }

    fn contains(&self, name: &str) -> bool {
        self.weights.tensors().contains_key(name)
    }

    fn names(&self) -> Vec<String> {
        // Sorted: the map's order.
        self.weights.tensors().keys().cloned().collect()
    }
}
