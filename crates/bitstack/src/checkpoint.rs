//! Reading Hugging Face checkpoints: `config.json`, one or several `*.safetensors` files,
//! `tokenizer.json`. Tensors are memory-mapped and read in their stored dtype.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use safetensors::SafeTensors;

use crate::Error;

/// The storage type of a checkpoint tensor that bitstack reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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
    pub fn name(self) -> &'static str {
        match self {
            Self::F16 => "F16",
            Self::BF16 => "BF16",
            Self::F32 => "F32",
        }
    }

    /// Parses a safetensors dtype name.
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "F16" => Some(Self::F16),
            "BF16" => Some(Self::BF16),
            "F32" => Some(Self::F32),
            _ => None,
        }
    }

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            Self::F16 | Self::BF16 => 2,
            Self::F32 => 4,
        }
    }
}

/// Converts little-endian raw bytes of `dtype` to f32.
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
#[derive(Debug, Clone)]
pub struct TensorInfo {
    /// Storage dtype.
    pub dtype: SourceDtype,
    /// Shape.
    pub shape: Vec<usize>,
    file: usize,
    start: usize,
    end: usize,
}

/// An opened Hugging Face checkpoint directory.
#[derive(Debug)]
pub struct Checkpoint {
    dir: PathBuf,
    maps: Vec<(PathBuf, Mmap)>,
    tensors: BTreeMap<String, TensorInfo>,
}

impl Checkpoint {
    /// Opens every `*.safetensors` file of `dir` (sorted by name). Every tensor must be F16,
    /// BF16 or F32; a tensor name present in two files is an error.
    pub fn open(dir: impl AsRef<Path>) -> Result<Self, Error> {
        let dir = dir.as_ref().to_path_buf();
        let entries = std::fs::read_dir(&dir).map_err(|e| Error::io(&dir, e))?;
        let mut files: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
            .collect();
        files.sort();
        if files.is_empty() {
            return Err(Error::Checkpoint(format!(
                "{}: no *.safetensors file in this directory",
                dir.display()
            )));
        }
        let mut maps = Vec::new();
        let mut tensors = BTreeMap::new();
        for (index, path) in files.into_iter().enumerate() {
            let file = File::open(&path).map_err(|e| Error::io(&path, e))?;
            // SAFETY: the checkpoint is opened read-only; bitstack assumes nobody truncates or
            // rewrites it while it is mapped (as every mmap-based safetensors reader does).
            let map = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(&path, e))?;
            let (header_len, metadata) = SafeTensors::read_metadata(&map).map_err(|e| {
                Error::Checkpoint(format!(
                    "{}: not a valid safetensors file: {e}",
                    path.display()
                ))
            })?;
            let data_start = 8 + header_len;
            let parsed = SafeTensors::deserialize(&map).map_err(|e| {
                Error::Checkpoint(format!(
                    "{}: not a valid safetensors file: {e}",
                    path.display()
                ))
            })?;
            drop(parsed);
            for (name, info) in metadata.tensors() {
                let dtype_name = format!("{:?}", info.dtype);
                let dtype = SourceDtype::from_name(&dtype_name).ok_or_else(|| {
                    Error::Checkpoint(format!(
                        "{}: tensor {name} has dtype {dtype_name}; bitstack reads F16, BF16 and F32",
                        path.display()
                    ))
                })?;
                let (s, e) = info.data_offsets;
                let tensor = TensorInfo {
                    dtype,
                    shape: info.shape.clone(),
                    file: index,
                    start: data_start + s,
                    end: data_start + e,
                };
                if tensors.insert(name.clone(), tensor).is_some() {
                    return Err(Error::Checkpoint(format!(
                        "{}: tensor {name} appears in more than one file",
                        dir.display()
                    )));
                }
            }
            maps.push((path, map));
        }
        Ok(Self { dir, maps, tensors })
    }

    /// The checkpoint directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Every tensor, sorted by name.
    pub fn tensors(&self) -> &BTreeMap<String, TensorInfo> {
        &self.tensors
    }

    /// One tensor's description.
    pub fn info(&self, name: &str) -> Result<&TensorInfo, Error> {
        self.tensors.get(name).ok_or_else(|| {
            Error::Checkpoint(format!("{}: no tensor named {name}", self.dir.display()))
        })
    }

    /// The raw little-endian bytes of a tensor.
    pub fn raw(&self, name: &str) -> Result<&[u8], Error> {
        let info = self.info(name)?;
        Ok(&self.maps[info.file].1[info.start..info.end])
    }

    /// A tensor widened to f32; non-finite values are an error naming the tensor and index.
    pub fn tensor_f32(&self, name: &str) -> Result<Vec<f32>, Error> {
        let info = self.info(name)?;
        let values = to_f32(info.dtype, self.raw(name)?);
        if let Some(i) = values.iter().position(|v| !v.is_finite()) {
            return Err(Error::Checkpoint(format!(
                "{}: tensor {name} {:?} holds a non-finite value ({}) at flat index {i}",
                self.dir.display(),
                info.shape,
                values[i]
            )));
        }
        Ok(values)
    }

    /// A file of the checkpoint directory (`config.json`, `tokenizer.json`, …), if present.
    pub fn read_file(&self, name: &str) -> Result<Option<Vec<u8>>, Error> {
        let path = self.dir.join(name);
        match std::fs::read(&path) {
            Ok(bytes) => Ok(Some(bytes)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::io(&path, e)),
        }
    }
}
