//! Reading the weights of a Hugging Face checkpoint directory: the one reader under both the
//! compressor (which stores tensors in their own dtype) and the model (which widens them to
//! f32), so that both open the same files and refuse the same damage with the same words.
//!
//! Which files: the shards named by `model.safetensors.index.json` when there is one (each
//! must be present and hold the tensors the index assigns to it); else `model.safetensors`
//! when present (a stray `consolidated.safetensors` beside it is not read twice); else every
//! `*.safetensors` file of the directory, sorted by name. Every file is memory-mapped and
//! validated (header, offsets within the file, no overlaps); every tensor must be F16, BF16
//! or F32; a tensor name present in two files is an error.
//!
//! ```no_run
//! use bitstack_checkpoint::Weights;
//!
//! let weights = Weights::open("models/tiny-qwen2")?;
//! for (name, info) in weights.tensors() {
//!     println!("{name}: {:?} {:?}", info.dtype, info.shape);
//! }
//! let embed = weights.tensor_f32("model.embed_tokens.weight")?;
//! # Ok::<(), bitstack_checkpoint::CheckpointError>(())
//! ```

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use safetensors::SafeTensors;

/// The index of a sharded checkpoint.
pub const INDEX: &str = "model.safetensors.index.json";

/// The weights file of an unsharded checkpoint.
pub const SINGLE: &str = "model.safetensors";

/// What can go wrong while opening or reading a checkpoint's weights. Each message names the
/// file or tensor and what to do about it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CheckpointError {
    /// A file or directory could not be read.
    #[error("{}: {source}", path.display())]
    Io {
        /// The path involved.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The weights are damaged, incomplete or inconsistent (the message says how, and which
    /// file).
    #[error("{0}")]
    Invalid(String),
    /// A tensor the caller asked for is not in the checkpoint.
    #[error("{}: no tensor named {name}", dir.display())]
    MissingTensor {
        /// The checkpoint directory.
        dir: PathBuf,
        /// The tensor name.
        name: String,
    },
}

impl CheckpointError {
    fn io(path: &Path, source: std::io::Error) -> Self {
        Self::Io {
            path: path.to_owned(),
            source,
        }
    }
}

/// The storage type of a checkpoint tensor that bitstack reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SourceDtype {
    /// IEEE half.
    F16,
    /// bfloat16.
    BF16,
    /// IEEE single.
    F32,
}

impl SourceDtype {
    /// The safetensors name (`F16`, `BF16`, `F32`).
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Self::F16 => "F16",
            Self::BF16 => "BF16",
            Self::F32 => "F32",
        }
    }

    /// Parses a safetensors dtype name.
    #[must_use]
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "F16" => Some(Self::F16),
            "BF16" => Some(Self::BF16),
            "F32" => Some(Self::F32),
            _ => None,
        }
    }

    /// Bytes per element.
    #[must_use]
    pub fn size(self) -> usize {
        match self {
            Self::F16 | Self::BF16 => 2,
            Self::F32 => 4,
        }
    }
}

/// Converts little-endian raw bytes of `dtype` to f32 (a trailing partial element is
/// ignored).
#[must_use]
pub fn to_f32(dtype: SourceDtype, bytes: &[u8]) -> Vec<f32> {
    match dtype {
        SourceDtype::F32 => bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        SourceDtype::F16 => bytes
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        SourceDtype::BF16 => bytes
            .chunks_exact(2)
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
    }
}

/// Converts f32 values to little-endian bytes of `dtype` (round to nearest even).
#[must_use]
pub fn from_f32(dtype: SourceDtype, values: &[f32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(values.len() * dtype.size());
    for &v in values {
        match dtype {
            SourceDtype::F32 => out.extend_from_slice(&v.to_le_bytes()),
            SourceDtype::F16 => out.extend_from_slice(&half::f16::from_f32(v).to_le_bytes()),
            SourceDtype::BF16 => out.extend_from_slice(&half::bf16::from_f32(v).to_le_bytes()),
        }
    }
    out
}

/// Where one tensor lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    /// Storage dtype.
    pub dtype: SourceDtype,
    /// Shape.
    pub shape: Vec<usize>,
    file: usize,
    start: usize,
    end: usize,
}

impl TensorInfo {
    /// Number of elements.
    #[must_use]
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// The memory-mapped weights of a checkpoint directory (see the crate docs for which files).
#[derive(Debug)]
pub struct Weights {
    dir: PathBuf,
    maps: Vec<(PathBuf, Mmap)>,
    tensors: BTreeMap<String, TensorInfo>,
}

/// Checks that `dir`, where a checkpoint directory is expected, is not a file (say, the
/// model's `model.safetensors` or a `.bitstack` file given by mistake), which would
/// otherwise surface as "Not a directory" on some file inside it.
///
/// # Errors
/// [`CheckpointError::Invalid`] naming the file.
pub fn check_is_not_a_file(dir: &Path) -> Result<(), CheckpointError> {
    if dir.is_file() {
        return Err(CheckpointError::Invalid(format!(
            "{} is a file, not a model directory: give the directory that holds config.json \
             and the *.safetensors files",
            dir.display()
        )));
    }
    Ok(())
}

impl Weights {
    /// Opens the weights of the checkpoint directory `dir`.
    ///
    /// # Errors
    /// [`CheckpointError::Io`] when a file cannot be read; [`CheckpointError::Invalid`] when
    /// `dir` is a file, there is no weights file, a shard the index names is missing or does not hold what
    /// the index says, a file is not valid safetensors, a tensor's dtype is not F16, BF16 or
    /// F32, or a tensor is in two files.
    pub fn open(dir: impl AsRef<Path>) -> Result<Self, CheckpointError> {
        let dir = dir.as_ref().to_path_buf();
        check_is_not_a_file(&dir)?;
        let index_path = dir.join(INDEX);
        let index = if index_path.is_file() {
            Some(read_index(&index_path)?)
        } else {
            None
        };
        let files: Vec<PathBuf> = match &index {
            Some(shards) => {
                let missing: Vec<&str> = shards
                    .keys()
                    .filter(|f| !dir.join(f).is_file())
                    .map(String::as_str)
                    .collect();
                if !missing.is_empty() {
                    return Err(CheckpointError::Invalid(format!(
                        "{}: {INDEX} names {} shard file(s) that are missing: {}; the checkpoint \
                         is incomplete: download the missing shard(s) again",
                        dir.display(),
                        missing.len(),
                        missing.join(", ")
                    )));
                }
                shards.keys().map(|f| dir.join(f)).collect()
            }
            None if dir.join(SINGLE).is_file() => vec![dir.join(SINGLE)],
            None => {
                let entries = std::fs::read_dir(&dir).map_err(|e| CheckpointError::io(&dir, e))?;
                let mut files: Vec<PathBuf> = entries
                    .filter_map(|e| e.ok().map(|e| e.path()))
                    .filter(|p| p.extension().is_some_and(|x| x == "safetensors") && p.is_file())
                    .collect();
                files.sort();
                files
            }
        };
        if files.is_empty() {
            return Err(CheckpointError::Invalid(format!(
                "{}: no *.safetensors file in this directory",
                dir.display()
            )));
        }
        let mut maps = Vec::new();
        let mut tensors = BTreeMap::new();
        for (index, path) in files.into_iter().enumerate() {
            let file = File::open(&path).map_err(|e| CheckpointError::io(&path, e))?;
            // SAFETY: the checkpoint is opened read-only; bitstack assumes nobody truncates or
            // rewrites it while it is mapped (as every mmap-based safetensors reader does).
            let map = unsafe { Mmap::map(&file) }.map_err(|e| CheckpointError::io(&path, e))?;
            let invalid = |e: String| {
                CheckpointError::Invalid(format!(
                    "{}: not a valid safetensors file: {e}; the file is damaged or incomplete: \
                     download or copy it again",
                    path.display()
                ))
            };
            let (header_len, metadata) =
                SafeTensors::read_metadata(&map).map_err(|e| invalid(e.to_string()))?;
            // `deserialize` checks that the tensors' byte ranges tile the data exactly.
            drop(SafeTensors::deserialize(&map).map_err(|e| invalid(e.to_string()))?);
            let data_start = 8usize
                .checked_add(header_len)
                .ok_or_else(|| invalid("the header length overflows".into()))?;
            for (name, info) in metadata.tensors() {
                let dtype_name = format!("{:?}", info.dtype);
                let dtype = SourceDtype::from_name(&dtype_name).ok_or_else(|| {
                    CheckpointError::Invalid(format!(
                        "{}: tensor {name} has dtype {dtype_name}; bitstack reads F16, BF16 and \
                         F32: convert the checkpoint to one of them (e.g. save it in float16)",
                        path.display()
                    ))
                })?;
                let (s, e) = info.data_offsets;
                let (start, end) = match (data_start.checked_add(s), data_start.checked_add(e)) {
                    (Some(start), Some(end)) if start <= end && end <= map.len() => (start, end),
                    _ => return Err(invalid(format!("tensor {name} lies outside the file"))),
                };
                let tensor = TensorInfo {
                    dtype,
                    shape: info.shape.clone(),
                    file: index,
                    start,
                    end,
                };
                if tensor.numel().checked_mul(dtype.size()) != Some(end - start) {
                    return Err(invalid(format!(
                        "tensor {name} has {} bytes for shape {:?} of {dtype_name}",
                        end - start,
                        tensor.shape
                    )));
                }
                if tensors.insert(name.clone(), tensor).is_some() {
                    return Err(CheckpointError::Invalid(format!(
                        "{}: tensor {name} appears in more than one file",
                        dir.display()
                    )));
                }
            }
            maps.push((path, map));
        }
        if let Some(shards) = &index {
            for (file_index, (shard, names)) in shards.iter().enumerate() {
                for name in names {
                    if tensors.get(name).map(|t| t.file) != Some(file_index) {
                        return Err(CheckpointError::Invalid(format!(
                            "{}: {INDEX} puts tensor {name} in {shard}, which does not hold it; \
                             the shard does not match the index: download the checkpoint again",
                            dir.display()
                        )));
                    }
                }
            }
        }
        Ok(Self { dir, maps, tensors })
    }

    /// The checkpoint directory.
    #[must_use]
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The weights files read, in the order their tensors were numbered.
    pub fn paths(&self) -> impl Iterator<Item = &Path> {
        self.maps.iter().map(|(p, _)| p.as_path())
    }

    /// Every tensor, sorted by name.
    #[must_use]
    pub fn tensors(&self) -> &BTreeMap<String, TensorInfo> {
        &self.tensors
    }

    /// One tensor's description.
    ///
    /// # Errors
    /// [`CheckpointError::MissingTensor`] when there is no tensor `name`.
    pub fn info(&self, name: &str) -> Result<&TensorInfo, CheckpointError> {
        self.tensors
            .get(name)
            .ok_or_else(|| CheckpointError::MissingTensor {
                dir: self.dir.clone(),
                name: name.to_owned(),
            })
    }

    /// The raw little-endian bytes of a tensor (`numel × dtype size` of them, checked when
    /// the file was opened).
    ///
    /// # Errors
    /// [`CheckpointError::MissingTensor`] when there is no tensor `name`.
    pub fn raw(&self, name: &str) -> Result<&[u8], CheckpointError> {
        let info = self.info(name)?;
        self.maps
            .get(info.file)
            .and_then(|(_, map)| map.get(info.start..info.end))
            .ok_or_else(|| CheckpointError::MissingTensor {
                dir: self.dir.clone(),
                name: name.to_owned(),
            })
    }

    /// A tensor widened to f32 (row-major, `numel` values).
    ///
    /// # Errors
    /// [`CheckpointError::MissingTensor`] when there is no tensor `name`.
    pub fn tensor_f32(&self, name: &str) -> Result<Vec<f32>, CheckpointError> {
        let info = self.info(name)?;
        Ok(to_f32(info.dtype, self.raw(name)?))
    }
}

/// Reads `model.safetensors.index.json`: shard file name → the tensors it holds.
fn read_index(path: &Path) -> Result<BTreeMap<String, Vec<String>>, CheckpointError> {
    let bytes = std::fs::read(path).map_err(|e| CheckpointError::io(path, e))?;
    let bad = |m: String| {
        CheckpointError::Invalid(format!(
            "{}: {m}; restore the checkpoint's original index file",
            path.display()
        ))
    };
    let v: serde_json::Value =
        serde_json::from_slice(&bytes).map_err(|e| bad(format!("not valid JSON: {e}")))?;
    let map = v
        .get("weight_map")
        .and_then(serde_json::Value::as_object)
        .ok_or_else(|| bad("no `weight_map` object".into()))?;
    let mut shards: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (tensor, file) in map {
        let file = file
            .as_str()
            .ok_or_else(|| bad(format!("weight_map entry of {tensor} is not a file name")))?;
        if file.is_empty() || file.contains(['/', '\\']) || file == "." || file == ".." {
            return Err(bad(format!(
                "shard name {file:?} of {tensor} must be a plain file name"
            )));
        }
        shards
            .entry(file.to_owned())
            .or_default()
            .push(tensor.clone());
    }
    if shards.is_empty() {
        return Err(bad("empty `weight_map`".into()));
    }
    Ok(shards)
}
