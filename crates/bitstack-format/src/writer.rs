//! Writing containers: [`ContainerWriter`].

use std::collections::{BTreeMap, HashSet};
use std::fs::OpenOptions;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::header::{write_header, MAX_HEADER_BYTES};
use crate::manifest::{check_name, check_part_name, compute_layout};
use crate::spool::{Spool, SpoolRange};
use crate::{
    AuxEntry, BlockEntry, Dtype, FixedEntry, FormatError, Manifest, MatrixEntry, TensorSpec,
    FORMAT_VERSION,
};

/// One part of a block to write: name, dtype, shape and bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PartData {
    /// Part name (unique in its block, no `/`), e.g. `"signs"`.
    pub name: String,
    /// Dtype.
    pub dtype: Dtype,
    /// Shape.
    pub shape: Vec<usize>,
    /// Little-endian bytes, `dtype.byte_len(&shape)` of them.
    pub bytes: Vec<u8>,
}

impl PartData {
    /// Bundles a part.
    pub fn new(name: impl Into<String>, dtype: Dtype, shape: Vec<usize>, bytes: Vec<u8>) -> Self {
        PartData {
            name: name.into(),
            dtype,
            shape,
            bytes,
        }
    }
}

/// Builds a container in memory and writes it (docs/FORMAT.md).
///
/// Add auxiliary files, fixed tensors and matrices in any order, then push the blocks in
/// **stack order**; every input is validated when it is added. The data is held in memory
/// until [`write_atomic`](Self::write_atomic) or [`write_to`](Self::write_to), because the
/// header (which comes first) holds every offset and checksum.
#[derive(Clone, Debug, Default)]
pub struct ContainerWriter {
    metadata: BTreeMap<String, serde_json::Value>,
    matrices: Vec<MatrixEntry>,
    aux: Vec<(String, Vec<u8>)>,
    fixed: Vec<(FixedEntry, Vec<u8>)>,
    blocks: Vec<(BlockEntry, BlockData)>,
    next_index: Vec<usize>,
    mandatory_blocks: usize,
    /// Where pushed block data goes, if not in memory.
    spool: Option<Arc<Spool>>,
}

/// A block's bytes: in memory, or waiting in a spool file.
#[derive(Clone, Debug)]
enum BlockData {
    Owned(Vec<u8>),
    Spooled(Arc<Spool>, SpoolRange),
}

fn invalid(reason: String) -> FormatError {
    FormatError::InvalidInput { reason }
}

fn len_u64(len: usize) -> u64 {
    // usize is at most 64 bits on every supported target.
    u64::try_from(len).unwrap_or(u64::MAX)
}

impl ContainerWriter {
    /// A writer with this free-form metadata (e.g. `"architecture"`, `"compress"`).
    pub fn new(metadata: BTreeMap<String, serde_json::Value>) -> Self {
        ContainerWriter {
            metadata,
            ..Self::default()
        }
    }

    /// From now on, the bytes of blocks given to [`push_block`](Self::push_block) wait in
    /// `spool` on disk instead of in memory (they are copied into the file, CRC-checked,
    /// when it is written). For writers that hold their blocks elsewhere anyway.
    pub fn spool_blocks_in(&mut self, spool: Arc<Spool>) {
        self.spool = Some(spool);
    }

    /// Sets one metadata entry.
    pub fn set_metadata(&mut self, key: impl Into<String>, value: serde_json::Value) {
        self.metadata.insert(key.into(), value);
    }

    /// Adds an auxiliary file (stored as `aux/<name>`, a `U8` tensor in the fixed part).
    pub fn add_aux_file(
        &mut self,
        name: impl Into<String>,
        bytes: Vec<u8>,
    ) -> Result<(), FormatError> {
        let name = name.into();
        check_name("aux file", &name).map_err(invalid)?;
        if self.aux.iter().any(|(n, _)| *n == name) {
            return Err(invalid(format!("aux file {name:?} added twice")));
        }
        self.aux.push((name, bytes));
        Ok(())
    }

    /// Adds a fixed (not decomposed) tensor, stored as `fixed/<name>`.
    ///
    /// `bytes` must hold `dtype.byte_len(&shape)` little-endian bytes; `original_dtype` is
    /// the dtype string of the original checkpoint (e.g. `"BF16"`).
    pub fn add_fixed(
        &mut self,
        name: impl Into<String>,
        dtype: Dtype,
        shape: Vec<usize>,
        bytes: Vec<u8>,
        original_dtype: impl Into<String>,
    ) -> Result<(), FormatError> {
        let name = name.into();
        check_name("fixed tensor", &name).map_err(invalid)?;
        if self.fixed.iter().any(|(f, _)| f.name == name) {
            return Err(invalid(format!("fixed tensor {name:?} added twice")));
        }
        let expected = dtype.byte_len(&shape).ok_or_else(|| {
            invalid(format!(
                "fixed tensor {name:?}: size of {dtype} {shape:?} overflows"
            ))
        })?;
        if expected != bytes.len() {
            return Err(invalid(format!(
                "fixed tensor {name:?}: {dtype} {shape:?} needs {expected} bytes, got {}",
                bytes.len()
            )));
        }
        let entry = FixedEntry {
            name,
            dtype,
            shape,
            original_dtype: original_dtype.into(),
            offset: 0,
            length: len_u64(bytes.len()),
        };
        self.fixed.push((entry, bytes));
        Ok(())
    }

    /// Declares a decomposed matrix `[rows = m, cols = n]`; returns its index.
    pub fn add_matrix(
        &mut self,
        name: impl Into<String>,
        rows: usize,
        cols: usize,
        original_dtype: impl Into<String>,
    ) -> Result<usize, FormatError> {
        let name = name.into();
        check_name("matrix", &name).map_err(invalid)?;
        if self.matrices.iter().any(|m| m.name == name) {
            return Err(invalid(format!("matrix {name:?} added twice")));
        }
        let index = self.matrices.len();
        self.matrices.push(MatrixEntry {
            index,
            name,
            rows,
            cols,
            original_dtype: original_dtype.into(),
        });
        self.next_index.push(0);
        Ok(index)
    }

    /// Appends a block at the end of the stack; returns its stack position.
    ///
    /// Blocks must be pushed in stack order, and the blocks of one matrix with
    /// `index_in_matrix` = 0, 1, 2, ... The parts are stored in the given order.
    pub fn push_block(
        &mut self,
        matrix: usize,
        index_in_matrix: usize,
        kind: impl Into<String>,
        params: BTreeMap<String, i64>,
        parts: Vec<PartData>,
    ) -> Result<usize, FormatError> {
        let lens: Vec<usize> = parts.iter().map(|p| p.bytes.len()).collect();
        let (data, length, crc32) = match &self.spool {
            Some(spool) => {
                let pieces: Vec<&[u8]> = parts.iter().map(|p| p.bytes.as_slice()).collect();
                let range = spool.append(&pieces)?;
                (
                    BlockData::Spooled(Arc::clone(spool), range),
                    range.len(),
                    range.crc32(),
                )
            }
            None => {
                let mut data = Vec::with_capacity(lens.iter().sum());
                for part in &parts {
                    data.extend_from_slice(&part.bytes);
                }
                let (length, crc32) = (len_u64(data.len()), crc32fast::hash(&data));
                (BlockData::Owned(data), length, crc32)
            }
        };
        let specs = parts
            .into_iter()
            .map(|part| TensorSpec {
                name: part.name,
                dtype: part.dtype,
                shape: part.shape,
            })
            .collect();
        self.push_checked(
            matrix,
            index_in_matrix,
            kind.into(),
            params,
            specs,
            Some(&lens),
            length,
            crc32,
            data,
        )
    }

    /// Appends a block whose bytes (its parts, concatenated in the order of `parts`) wait in
    /// `spool` at `range`; they are copied into the file, and their CRC-32 checked again,
    /// when the container is written. Same rules as [`push_block`](Self::push_block).
    #[allow(clippy::too_many_arguments)] // push_block's arguments plus the spool and range
    pub fn push_spooled_block(
        &mut self,
        matrix: usize,
        index_in_matrix: usize,
        kind: impl Into<String>,
        params: BTreeMap<String, i64>,
        parts: Vec<TensorSpec>,
        spool: &Arc<Spool>,
        range: SpoolRange,
    ) -> Result<usize, FormatError> {
        self.push_checked(
            matrix,
            index_in_matrix,
            kind.into(),
            params,
            parts,
            None,
            range.len(),
            range.crc32(),
            BlockData::Spooled(Arc::clone(spool), range),
        )
    }

    /// Validates a block (`given`: the byte length of each part, when known separately
    /// from `length`) and appends it.
    #[allow(clippy::too_many_arguments)]
    fn push_checked(
        &mut self,
        matrix: usize,
        index_in_matrix: usize,
        kind: String,
        params: BTreeMap<String, i64>,
        parts: Vec<TensorSpec>,
        given: Option<&[usize]>,
        length: u64,
        crc32: u32,
        data: BlockData,
    ) -> Result<usize, FormatError> {
        let position = self.blocks.len();
        let Some(expected) = self.next_index.get(matrix).copied() else {
            return Err(invalid(format!(
                "block {position}: matrix {matrix} does not exist ({} matrices added)",
                self.matrices.len()
            )));
        };
        let matrix_name = self
            .matrices
            .get(matrix)
            .map(|m| m.name.as_str())
            .unwrap_or_default();
        let what = format!("block {position} ({matrix_name} #{index_in_matrix})");
        if index_in_matrix != expected {
            return Err(invalid(format!(
                "{what}: the next block of this matrix must be #{expected}"
            )));
        }
        check_name(&format!("{what} kind"), &kind).map_err(invalid)?;
        for key in params.keys() {
            check_name(&format!("{what} parameter"), key).map_err(invalid)?;
        }
        let mut names = HashSet::with_capacity(parts.len());
        let mut total = 0u64;
        for (i, part) in parts.iter().enumerate() {
            check_part_name(&format!("{what} part"), &part.name).map_err(invalid)?;
            if !names.insert(part.name.as_str()) {
                return Err(invalid(format!("{what}: part {:?} given twice", part.name)));
            }
            let expected_len = part.dtype.byte_len(&part.shape);
            if let Some(given) = given.and_then(|g| g.get(i)) {
                if expected_len != Some(*given) {
                    return Err(invalid(format!(
                        "{what}: part {:?} is {} {:?} ({} bytes) but {given} bytes were given",
                        part.name,
                        part.dtype,
                        part.shape,
                        expected_len.map_or("too many".to_owned(), |n| n.to_string()),
                    )));
                }
            }
            let Some(expected_len) = expected_len else {
                return Err(invalid(format!(
                    "{what}: part {:?} is {} {:?}: too many bytes",
                    part.name, part.dtype, part.shape
                )));
            };
            total = total
                .checked_add(len_u64(expected_len))
                .ok_or_else(|| invalid(format!("{what}: size overflows")))?;
        }
        if total != length {
            return Err(invalid(format!(
                "{what}: the parts are {total} bytes but {length} bytes were given"
            )));
        }
        if let Some(next) = self.next_index.get_mut(matrix) {
            *next += 1;
        }
        let entry = BlockEntry {
            matrix,
            index: index_in_matrix,
            kind,
            params,
            parts,
            offset: 0,
            length,
            crc32,
        };
        self.blocks.push((entry, data));
        Ok(position)
    }

    /// Sets how many leading blocks every load needs (the base model). Checked when
    /// writing: it must not exceed the number of blocks.
    pub fn set_mandatory_blocks(&mut self, count: usize) {
        self.mandatory_blocks = count;
    }

    /// Number of blocks pushed so far.
    pub fn block_count(&self) -> usize {
        self.blocks.len()
    }

    /// The manifest the container will have (offsets assigned, checksums computed).
    pub fn manifest(&self) -> Result<Manifest, FormatError> {
        if self.mandatory_blocks > self.blocks.len() {
            return Err(invalid(format!(
                "mandatory_blocks is {} but only {} blocks were pushed",
                self.mandatory_blocks,
                self.blocks.len()
            )));
        }
        let overflow = || invalid("the container is larger than 2^64 bytes".to_owned());
        let mut cursor = 0u64;
        let mut fixed_crc = crc32fast::Hasher::new();
        let mut aux_files = Vec::with_capacity(self.aux.len());
        for (name, bytes) in &self.aux {
            let length = len_u64(bytes.len());
            aux_files.push(AuxEntry {
                name: name.clone(),
                offset: cursor,
                length,
            });
            fixed_crc.update(bytes);
            cursor = cursor.checked_add(length).ok_or_else(overflow)?;
        }
        let mut fixed = Vec::with_capacity(self.fixed.len());
        for (entry, bytes) in &self.fixed {
            let mut entry = entry.clone();
            entry.offset = cursor;
            fixed_crc.update(bytes);
            cursor = cursor.checked_add(entry.length).ok_or_else(overflow)?;
            fixed.push(entry);
        }
        let fixed_bytes = cursor;
        let mut base_bytes = cursor;
        let mut blocks = Vec::with_capacity(self.blocks.len());
        for (p, (entry, _)) in self.blocks.iter().enumerate() {
            let mut entry = entry.clone();
            entry.offset = cursor;
            cursor = cursor.checked_add(entry.length).ok_or_else(overflow)?;
            if p < self.mandatory_blocks {
                base_bytes = cursor;
            }
            blocks.push(entry);
        }
        Ok(Manifest {
            version: FORMAT_VERSION,
            metadata: self.metadata.clone(),
            matrices: self.matrices.clone(),
            aux_files,
            fixed,
            fixed_bytes,
            fixed_crc32: fixed_crc.finalize(),
            blocks,
            mandatory_blocks: len_u64(self.mandatory_blocks),
            base_bytes,
            data_bytes: cursor,
        })
    }

    /// Writes the container to `out`; returns the number of bytes written.
    ///
    /// For files prefer [`write_atomic`](Self::write_atomic).
    pub fn write_to(&self, out: impl Write) -> Result<u64, FormatError> {
        self.write_named(out, "<writer>")
    }

    /// Serializes the container into a `Vec<u8>`.
    pub fn to_bytes(&self) -> Result<Vec<u8>, FormatError> {
        let mut out = Vec::new();
        self.write_named(&mut out, "<memory>")?;
        Ok(out)
    }

    fn write_named(&self, out: impl Write, file: &str) -> Result<u64, FormatError> {
        let manifest = self.manifest()?;
        // Validate exactly as a reader will, so the writer never emits what it cannot read.
        let layout = compute_layout(&manifest)
            .map_err(|reason| invalid(format!("internal: manifest fails validation: {reason}")))?;
        let header = write_header(&manifest, &layout).map_err(invalid)?;
        let header_len = len_u64(header.len());
        if header_len > MAX_HEADER_BYTES {
            return Err(invalid(format!(
                "the header would be {header_len} bytes, more than the limit of {MAX_HEADER_BYTES}"
            )));
        }
        let io = |source| FormatError::Io {
            file: file.to_owned(),
            action: "write",
            source,
        };
        let mut out = out;
        out.write_all(&header_len.to_le_bytes()).map_err(io)?;
        out.write_all(&header).map_err(io)?;
        let data = self
            .aux
            .iter()
            .map(|(_, b)| b)
            .chain(self.fixed.iter().map(|(_, b)| b));
        for bytes in data {
            out.write_all(bytes).map_err(io)?;
        }
        for (_, data) in &self.blocks {
            match data {
                BlockData::Owned(bytes) => out.write_all(bytes).map_err(io)?,
                BlockData::Spooled(spool, range) => spool.copy_to(*range, &mut out)?,
            }
        }
        out.flush().map_err(io)?;
        Ok(8 + header_len + manifest.data_bytes)
    }

    /// Writes the container to `path` atomically: into a temporary file in the same
    /// directory, `fsync`ed, then renamed over `path`. On any error the temporary file is
    /// removed and `path` is untouched. Returns the number of bytes written.
    pub fn write_atomic(&self, path: impl AsRef<Path>) -> Result<u64, FormatError> {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let path = path.as_ref();
        let file = path.display().to_string();
        let Some(file_name) = path.file_name() else {
            return Err(invalid(format!("{file}: not a file path")));
        };
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let tmp = dir.join(format!(
            ".{}.tmp-{}-{}",
            file_name.to_string_lossy(),
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        let io = |action: &'static str| {
            let file = file.clone();
            move |source| FormatError::Io {
                file,
                action,
                source,
            }
        };
        let handle = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)
            .map_err(io("create a temporary file next to"))?;
        let result = (|| {
            let mut buffered = BufWriter::with_capacity(1 << 20, &handle);
            let written = self.write_named(&mut buffered, &file)?;
            buffered.flush().map_err(io("write"))?;
            drop(buffered);
            handle.sync_all().map_err(io("fsync"))?;
            std::fs::rename(&tmp, path).map_err(io("rename the temporary file to"))?;
            Ok(written)
        })();
        if result.is_err() {
            // Best effort: the temporary file may already be gone.
            let _ = std::fs::remove_file(&tmp);
        } else if let Ok(d) = std::fs::File::open(&dir) {
            // Persist the rename; best effort (not supported everywhere).
            let _ = d.sync_all();
        }
        result
    }
}
