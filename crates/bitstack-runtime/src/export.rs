//! Export of a loaded budget as a dense Hugging Face checkpoint.

use std::io::Write;
use std::path::Path;

use half::{bf16, f16};
use safetensors::Dtype;

use crate::{LoadedStack, RuntimeError};

/// The dtype of exported dense weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExportDtype {
    /// IEEE single.
    F32,
    /// IEEE half.
    F16,
    /// bfloat16.
    BF16,
}

impl ExportDtype {
    /// From a safetensors dtype name (`F32`, `F16`, `BF16`).
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "F32" => Some(Self::F32),
            "F16" => Some(Self::F16),
            "BF16" => Some(Self::BF16),
            _ => None,
        }
    }

    fn safetensors(self) -> Dtype {
        match self {
            Self::F32 => Dtype::F32,
            Self::F16 => Dtype::F16,
            Self::BF16 => Dtype::BF16,
        }
    }

    /// Encodes f32 values (round to nearest even for the 16-bit types).
    pub fn encode(self, values: &[f32]) -> Vec<u8> {
        match self {
            Self::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
            Self::F16 => values
                .iter()
                .flat_map(|&v| f16::from_f32(v).to_le_bytes())
                .collect(),
            Self::BF16 => values
                .iter()
                .flat_map(|&v| bf16::from_f32(v).to_le_bytes())
                .collect(),
        }
    }
}

impl LoadedStack {
    /// Reconstructs matrix `m` and encodes it as `dtype` (f16/bf16/f32 little-endian bytes).
    pub fn reconstruct_encoded(&self, m: usize, dtype: ExportDtype) -> Vec<u8> {
        dtype.encode(&self.reconstruct_f32(m))
    }

    /// Writes a dense Hugging Face checkpoint of the loaded budget into `dir`: every tensor
    /// under its original name and in its original dtype (`model.safetensors`), and every
    /// auxiliary file the container carries (`config.json`, `tokenizer.json`, …).
    ///
    /// The safetensors file is streamed: its header is computed from the shapes first, then
    /// each tensor is reconstructed, encoded and written in turn, so only one tensor is held
    /// at a time (not the whole checkpoint, twice). Each file is written to a temporary name
    /// in `dir` and renamed when complete.
    pub fn export_hf(&self, dir: &Path) -> Result<(), RuntimeError> {
        std::fs::create_dir_all(dir).map_err(|e| RuntimeError::io(dir, e))?;
        let file = self.file();
        let mut items: Vec<ExportItem<'_>> = Vec::new();
        for m in 0..file.matrix_count() {
            let entry = &file.container().manifest().matrices[m];
            let dtype = ExportDtype::from_name(&entry.original_dtype).unwrap_or(ExportDtype::F32);
            let (rows, cols) = file.shape(m);
            items.push(ExportItem {
                name: entry.name.clone(),
                dtype: dtype.safetensors(),
                shape: vec![rows, cols],
                source: Source::Matrix(m, dtype),
            });
        }
        for name in self.fixed_names() {
            let Some(t) = self.fixed(name) else { continue };
            // Stored in another dtype than the original (e.g. an f32 norm kept as f16):
            // converted back when it is a float; otherwise written as stored.
            let convert = match ExportDtype::from_name(&t.original_dtype) {
                Some(d) if t.dtype != t.original_dtype && t.is_float() => Some(d),
                _ => None,
            };
            let dtype_name = if convert.is_some() {
                t.original_dtype.as_str()
            } else {
                t.dtype.as_str()
            };
            let dtype = match dtype_name {
                "F32" => Dtype::F32,
                "F16" => Dtype::F16,
                "BF16" => Dtype::BF16,
                _ => Dtype::U8,
            };
            items.push(ExportItem {
                name: name.to_string(),
                dtype,
                shape: t.shape.clone(),
                source: Source::Fixed(t, convert),
            });
        }
        // As `safetensors::serialize`: larger dtypes first, then by name, so that every
        // tensor starts at a multiple of its element size.
        items.sort_by(|a, b| {
            b.dtype
                .bitsize()
                .cmp(&a.dtype.bitsize())
                .then_with(|| a.name.cmp(&b.name))
        });
        let header = safetensors_header(&items)?;
        write_atomic_with(&dir.join("model.safetensors"), |w| {
            w.write_all(&(header.len() as u64).to_le_bytes())?;
            w.write_all(&header)?;
            for item in &items {
                let bytes = match &item.source {
                    Source::Matrix(m, dtype) => self.reconstruct_encoded(*m, *dtype),
                    Source::Fixed(t, Some(d)) => d.encode(&t.to_f32().unwrap_or_default()),
                    Source::Fixed(t, None) => t.bytes.to_vec(),
                };
                if bytes.len() != item.byte_len() {
                    return Err(std::io::Error::other(format!(
                        "tensor {}: {} bytes, its shape and dtype say {}",
                        item.name,
                        bytes.len(),
                        item.byte_len()
                    )));
                }
                w.write_all(&bytes)?;
            }
            Ok(())
        })?;
        for aux in &file.container().manifest().aux_files {
            if let Some(bytes) = file.container().aux_file(&aux.name) {
                write_atomic(&dir.join(&aux.name), bytes)?;
            }
        }
        Ok(())
    }
}

/// One tensor of an exported checkpoint.
struct ExportItem<'a> {
    name: String,
    dtype: Dtype,
    shape: Vec<usize>,
    source: Source<'a>,
}

impl ExportItem<'_> {
    fn byte_len(&self) -> usize {
        self.shape.iter().product::<usize>() * self.dtype.bitsize() / 8
    }
}

/// Where an exported tensor's bytes come from.
enum Source<'a> {
    /// Stacked matrix `m`, reconstructed and encoded in this dtype.
    Matrix(usize, ExportDtype),
    /// A fixed tensor, converted to this dtype (else written as stored).
    Fixed(&'a crate::FixedTensor, Option<ExportDtype>),
}

/// The safetensors header of `items` in this order: the JSON object (with
/// `__metadata__.format = "pt"`) padded with spaces to a multiple of 8 bytes.
fn safetensors_header(items: &[ExportItem<'_>]) -> Result<Vec<u8>, RuntimeError> {
    let mut object = serde_json::Map::new();
    object.insert("__metadata__".into(), serde_json::json!({ "format": "pt" }));
    let mut offset = 0usize;
    for item in items {
        let end = offset + item.byte_len();
        let dtype = match item.dtype {
            Dtype::F32 => "F32",
            Dtype::F16 => "F16",
            Dtype::BF16 => "BF16",
            Dtype::U8 => "U8",
            other => {
                return Err(RuntimeError::Invalid(format!(
                    "tensor {}: cannot export dtype {other:?}",
                    item.name
                )))
            }
        };
        object.insert(
            item.name.clone(),
            serde_json::json!({ "dtype": dtype, "shape": item.shape, "data_offsets": [offset, end] }),
        );
        offset = end;
    }
    let mut header = serde_json::to_vec(&serde_json::Value::Object(object))
        .map_err(|e| RuntimeError::Invalid(format!("safetensors header: {e}")))?;
    header.resize(header.len().next_multiple_of(8), b' ');
    Ok(header)
}

/// Writes `bytes` to `path` through a temporary sibling file and a rename.
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), RuntimeError> {
    write_atomic_with(path, |w| w.write_all(bytes))
}

/// Writes `path` through a temporary sibling file (buffered, synced) and a rename; the
/// temporary file is removed on any error.
fn write_atomic_with(
    path: &Path,
    body: impl FnOnce(&mut std::io::BufWriter<std::fs::File>) -> std::io::Result<()>,
) -> Result<(), RuntimeError> {
    let mut tmp_name = path.as_os_str().to_owned();
    tmp_name.push(".partial");
    let tmp = std::path::PathBuf::from(tmp_name);
    let result = (|| {
        let mut w = std::io::BufWriter::new(std::fs::File::create(&tmp)?);
        body(&mut w)?;
        let f = w.into_inner().map_err(|e| e.into_error())?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    result.map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        RuntimeError::io(path, e)
    })
}
