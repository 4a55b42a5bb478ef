//! Export of a loaded budget as a dense Hugging Face checkpoint.

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;

use half::{bf16, f16};
use safetensors::tensor::TensorView;
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
    /// Each file is written to a temporary name in `dir` and renamed when complete.
    pub fn export_hf(&self, dir: &Path) -> Result<(), RuntimeError> {
        std::fs::create_dir_all(dir).map_err(|e| RuntimeError::io(dir, e))?;
        let file = self.file();
        let mut tensors: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
        for m in 0..file.matrix_count() {
            let entry = &file.container().manifest().matrices[m];
            let dtype = ExportDtype::from_name(&entry.original_dtype).unwrap_or(ExportDtype::F32);
            let (rows, cols) = file.shape(m);
            tensors.push((
                entry.name.clone(),
                dtype.safetensors(),
                vec![rows, cols],
                self.reconstruct_encoded(m, dtype),
            ));
        }
        for name in self.fixed_names() {
            let Some(t) = self.fixed(name) else { continue };
            let bytes = match (
                ExportDtype::from_name(&t.original_dtype),
                t.to_f32(),
                t.dtype == t.original_dtype,
            ) {
                (_, _, true) | (None, _, _) | (_, None, _) => (t.bytes.to_vec(), t.dtype.as_str()),
                (Some(d), Some(values), false) => (d.encode(&values), t.original_dtype.as_str()),
            };
            let dtype = match bytes.1 {
                "F32" => Dtype::F32,
                "F16" => Dtype::F16,
                "BF16" => Dtype::BF16,
                _ => Dtype::U8,
            };
            tensors.push((name.to_string(), dtype, t.shape.clone(), bytes.0));
        }
        let views = tensors
            .iter()
            .map(|(name, dtype, shape, bytes)| {
                TensorView::new(*dtype, shape.clone(), bytes)
                    .map(|v| (name.clone(), v))
                    .map_err(|e| RuntimeError::Invalid(format!("tensor {name}: {e}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
        let buffer = safetensors::serialize(views, Some(metadata))
            .map_err(|e| RuntimeError::Invalid(format!("serializing the checkpoint: {e}")))?;
        write_atomic(&dir.join("model.safetensors"), &buffer)?;
        for aux in &file.container().manifest().aux_files {
            if let Some(bytes) = file.container().aux_file(&aux.name) {
                write_atomic(&dir.join(&aux.name), bytes)?;
            }
        }
        Ok(())
    }
}

/// Writes `bytes` to `path` through a temporary sibling file and a rename.
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), RuntimeError> {
    let mut tmp_name = path.as_os_str().to_owned();
    tmp_name.push(".partial");
    let tmp = std::path::PathBuf::from(tmp_name);
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    result.map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        RuntimeError::io(path, e)
    })
}
