//! Where weights come from: the [`TensorSource`] trait and its safetensors implementation.

use std::collections::{BTreeSet, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};

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

#[derive(Debug, Clone)]
struct TensorEntry {
    file: usize,
    dtype: Dtype,
    shape: Vec<usize>,
    /// Absolute byte range inside the file.
    start: usize,
    end: usize,
}

/// The `*.safetensors` weights of a Hugging Face model directory, memory-mapped.
///
/// Files are chosen in this order: the files named by `model.safetensors.index.json`'s
/// `weight_map`; else `model.safetensors`; else every `*.safetensors` in the directory.
#[derive(Debug)]
pub struct SafetensorsDir {
    files: Vec<(PathBuf, Mmap)>,
    tensors: HashMap<String, TensorEntry>,
}

impl SafetensorsDir {
    /// Opens the weights of the model directory `dir`.
    pub fn open(dir: impl AsRef<Path>) -> Result<Self, ModelError> {
        let dir = dir.as_ref();
        let index = dir.join("model.safetensors.index.json");
        let single = dir.join("model.safetensors");
        let paths: Vec<PathBuf> = if index.is_file() {
            shard_paths_from_index(dir, &index)?
        } else if single.is_file() {
            vec![single]
        } else {
            let rd = std::fs::read_dir(dir).map_err(|source| ModelError::Io {
                path: dir.to_owned(),
                source,
            })?;
            let mut v = Vec::new();
            for entry in rd {
                let entry = entry.map_err(|source| ModelError::Io {
                    path: dir.to_owned(),
                    source,
                })?;
                let p = entry.path();
                if p.extension().is_some_and(|e| e == "safetensors") && p.is_file() {
                    v.push(p);
                }
            }
            v.sort();
            if v.is_empty() {
                return Err(ModelError::Safetensors {
                    path: dir.to_owned(),
                    message: "no model.safetensors, index or *.safetensors file in directory"
                        .into(),
                });
            }
            v
        };
        Self::open_files(&paths)
    }

    /// Opens an explicit list of safetensors files (shards of one model).
    ///
    /// A tensor present in two files is an error.
    pub fn open_files(paths: &[PathBuf]) -> Result<Self, ModelError> {
        let mut files = Vec::with_capacity(paths.len());
        let mut tensors = HashMap::new();
        for (fi, path) in paths.iter().enumerate() {
            let file = File::open(path).map_err(|source| ModelError::Io {
                path: path.clone(),
                source,
            })?;
            // SAFETY: the file is opened read-only and mapped read-only; the crate treats the
            // checkpoint as immutable while it is loaded (a concurrent writer truncating the
            // file is outside its contract, as for every mmap-based weight loader).
            let mmap = unsafe { Mmap::map(&file) }.map_err(|source| ModelError::Io {
                path: path.clone(),
                source,
            })?;
            let (header_len, meta) =
                SafeTensors::read_metadata(&mmap).map_err(|e| ModelError::Safetensors {
                    path: path.clone(),
                    message: e.to_string(),
                })?;
            let data_start =
                8usize
                    .checked_add(header_len)
                    .ok_or_else(|| ModelError::Safetensors {
                        path: path.clone(),
                        message: "header length overflows".into(),
                    })?;
            for (name, info) in meta.tensors() {
                let (a, b) = info.data_offsets;
                let (start, end) = match (data_start.checked_add(a), data_start.checked_add(b)) {
                    (Some(s), Some(e)) if s <= e && e <= mmap.len() => (s, e),
                    _ => {
                        return Err(ModelError::Safetensors {
                            path: path.clone(),
                            message: format!("tensor {name:?} lies outside the file"),
                        })
                    }
                };
                let entry = TensorEntry {
                    file: fi,
                    dtype: info.dtype,
                    shape: info.shape.clone(),
                    start,
                    end,
                };
                if tensors.insert(name.clone(), entry).is_some() {
                    return Err(ModelError::Safetensors {
                        path: path.clone(),
                        message: format!("tensor {name:?} appears in more than one shard"),
                    });
                }
            }
            files.push((path.clone(), mmap));
        }
        Ok(Self { files, tensors })
    }

    /// The files backing this source.
    pub fn paths(&self) -> impl Iterator<Item = &Path> {
        self.files.iter().map(|(p, _)| p.as_path())
    }

    /// Shape and dtype name (`"F16"`, `"BF16"`, ...) of a tensor, if present.
    pub fn tensor_info(&self, name: &str) -> Option<(Vec<usize>, String)> {
        self.tensors
            .get(name)
            .map(|e| (e.shape.clone(), format!("{:?}", e.dtype)))
    }
}

fn shard_paths_from_index(dir: &Path, index: &Path) -> Result<Vec<PathBuf>, ModelError> {
    let text = std::fs::read_to_string(index).map_err(|source| ModelError::Io {
        path: index.to_owned(),
        source,
    })?;
    let bad = |m: String| ModelError::Safetensors {
        path: index.to_owned(),
        message: m,
    };
    let v: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| bad(format!("not valid JSON: {e}")))?;
    let map = v
        .get("weight_map")
        .and_then(serde_json::Value::as_object)
        .ok_or_else(|| bad("missing object `weight_map`".into()))?;
    let mut names = BTreeSet::new();
    for (tensor, file) in map {
        let f = file
            .as_str()
            .ok_or_else(|| bad(format!("weight_map[{tensor:?}] is not a string")))?;
        if f.contains('/') || f.contains('\\') || f == ".." {
            return Err(bad(format!("shard name {f:?} must be a plain file name")));
        }
        names.insert(f.to_owned());
    }
    if names.is_empty() {
        return Err(bad("empty `weight_map`".into()));
    }
    Ok(names.into_iter().map(|n| dir.join(n)).collect())
}

impl TensorSource for SafetensorsDir {
    fn tensor_f32(&self, name: &str) -> Result<(Vec<usize>, Vec<f32>), ModelError> {
        let e = self
            .tensors
            .get(name)
            .ok_or_else(|| ModelError::MissingTensor { name: name.into() })?;
        let bytes = self
            .files
            .get(e.file)
            .and_then(|(_, m)| m.get(e.start..e.end))
            .ok_or_else(|| ModelError::MissingTensor { name: name.into() })?;
        let numel: usize = e.shape.iter().product();
        let values = widen_to_f32(name, e.dtype, bytes)?;
        if values.len() != numel {
            return Err(ModelError::Safetensors {
                path: self.files[e.file].0.clone(),
                message: format!(
                    "tensor {name:?} has {} bytes for shape {:?}",
                    bytes.len(),
                    e.shape
                ),
            });
        }
        Ok((e.shape.clone(), values))
    }

    fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    fn names(&self) -> Vec<String> {
        let mut v: Vec<String> = self.tensors.keys().cloned().collect();
        v.sort();
        v
    }
}

/// Converts little-endian F32/F16/BF16 bytes to f32 values.
pub(crate) fn widen_to_f32(name: &str, dtype: Dtype, bytes: &[u8]) -> Result<Vec<f32>, ModelError> {
    let out = match dtype {
        Dtype::F32 => bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        Dtype::F16 => bytes
            .chunks_exact(2)
            .map(|c| half::f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32())
            .collect(),
        Dtype::BF16 => bytes
            .chunks_exact(2)
            .map(|c| f32::from_bits(u32::from(u16::from_le_bytes([c[0], c[1]])) << 16))
            .collect(),
        other => {
            return Err(ModelError::UnsupportedDtype {
                name: name.into(),
                dtype: format!("{other:?}"),
            })
        }
    };
    Ok(out)
}
