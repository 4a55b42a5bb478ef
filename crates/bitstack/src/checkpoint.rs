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
    /// Opens the weights of `dir`: the shards named by `model.safetensors.index.json` when
    /// there is one (each must be present, and hold the tensors the index assigns to it),
    /// else every `*.safetensors` file of `dir` (sorted by name). Every tensor must be F16,
    /// BF16 or F32; a tensor name present in two files is an error.
    pub fn open(dir: impl AsRef<Path>) -> Result<Self, Error> {
        let dir = dir.as_ref().to_path_buf();
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
                    return Err(Error::Checkpoint(format!(
                        "{}: {INDEX} names {} shard file(s) that are missing: {}; the checkpoint \
                         is incomplete: download the missing shard(s) again",
                        dir.display(),
                        missing.len(),
                        missing.join(", ")
                    )));
                }
                shards.keys().map(|f| dir.join(f)).collect()
            }
            None => {
                let entries = std::fs::read_dir(&dir).map_err(|e| Error::io(&dir, e))?;
                let mut files: Vec<PathBuf> = entries
                    .filter_map(|e| e.ok().map(|e| e.path()))
                    .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
                    .collect();
                files.sort();
                files
            }
        };
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
            let invalid = |e: safetensors::SafeTensorError| {
                Error::Checkpoint(format!(
                    "{}: not a valid safetensors file: {e}; the file is damaged or incomplete: \
                     download or copy it again",
                    path.display()
                ))
            };
            let (header_len, metadata) = SafeTensors::read_metadata(&map).map_err(invalid)?;
            let data_start = 8 + header_len;
            drop(SafeTensors::deserialize(&map).map_err(invalid)?);
            for (name, info) in metadata.tensors() {
                let dtype_name = format!("{:?}", info.dtype);
                let dtype = SourceDtype::from_name(&dtype_name).ok_or_else(|| {
                    Error::Checkpoint(format!(
                        "{}: tensor {name} has dtype {dtype_name}; bitstack reads F16, BF16 and \
                         F32: convert the checkpoint to one of them (e.g. save it in float16)",
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
        if let Some(shards) = &index {
            for (file_index, (shard, names)) in shards.iter().enumerate() {
                for name in names {
                    if tensors.get(name).map(|t| t.file) != Some(file_index) {
                        return Err(Error::Checkpoint(format!(
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
                "{}: tensor {name} {:?} holds a non-finite value ({}) at flat index {i}; \
                 bitstack cannot compress NaN/Inf weights: use an intact checkpoint",
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

    /// Checks that `config.json` describes these weights: it parses as the configuration of a
    /// supported architecture, and every tensor such a model reads is present with the shape
    /// the config implies. Catches at compression time what would otherwise only fail when
    /// the compressed file is evaluated.
    #[cfg(feature = "model")]
    pub fn check_config(&self) -> Result<bitstack_model::ModelConfig, Error> {
        let path = self.dir.join("config.json");
        let config = bitstack_model::ModelConfig::from_file(&path).map_err(|e| {
            Error::Checkpoint(format!(
                "{e}; config.json must be the Hugging Face config of these weights (or choose \
                 the tensors to stack with --include GLOB and --no-calibration)"
            ))
        })?;
        for (name, shape) in config.expected_tensors() {
            match self.tensors.get(&name) {
                None => {
                    return Err(Error::Checkpoint(format!(
                        "{}: tensor {name} is missing, but config.json ({}, {} layers) needs \
                         it: the weights are incomplete or do not belong to this config.json",
                        self.dir.display(),
                        config.architecture.hf_name(),
                        config.num_layers
                    )))
                }
                Some(info) if info.shape != shape => {
                    return Err(Error::Checkpoint(format!(
                        "{}: tensor {name} has shape {:?}, but config.json implies {shape:?}: \
                         the weights do not match config.json (use the config.json that came \
                         with them)",
                        self.dir.display(),
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
        bitstack_model::TextTokenizer::from_bytes(&bytes, self.dir.join("tokenizer.json"))
            .map_err(|e| {
                Error::Checkpoint(format!(
                    "{e}; replace it with the model's original tokenizer.json"
                ))
            })?;
        Ok(())
    }
}

/// The index of a sharded checkpoint.
const INDEX: &str = "model.safetensors.index.json";

/// Reads `model.safetensors.index.json`: shard file name → the tensors it holds.
fn read_index(path: &Path) -> Result<BTreeMap<String, Vec<String>>, Error> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let bad = |m: String| {
        Error::Checkpoint(format!(
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
