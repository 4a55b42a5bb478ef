//! Reading containers: [`Container`], [`BlockRef`], [`TensorRef`].

use std::fmt;
use std::fs::File;
use std::ops::Range;
use std::path::Path;
use std::sync::Arc;

use crate::header::{
    check_tensors, parse_header, FORMAT_KEY, FORMAT_NAME, MANIFEST_CRC_KEY, MANIFEST_KEY,
    VERSION_KEY,
};
use crate::manifest::{compute_layout, describe_block, BlockLayout, Layout};
use crate::{
    BlockEntry, Dtype, FormatError, Manifest, MatrixEntry, FORMAT_VERSION, MAX_HEADER_BYTES,
};

/// Whether [`Container::from_bytes`] / [`Container::open`] ignore a wrong manifest or
/// fixed-part checksum: only in fuzzing builds (`cargo fuzz` passes `--cfg fuzzing`), so that
/// the fuzzer can reach the validation that lies behind the checksums. Never in normal builds;
/// [`Container::block`] and the `verify_*` methods always check.
#[allow(unexpected_cfgs)]
const OPEN_IGNORES_CHECKSUMS: bool = cfg!(fuzzing);

/// A borrowed tensor: dtype, shape and its little-endian bytes.
///
/// The bytes are not guaranteed to be aligned for the dtype (docs/FORMAT.md §1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TensorRef<'a> {
    /// Element type.
    pub dtype: Dtype,
    /// Shape (row-major).
    pub shape: &'a [usize],
    /// The raw bytes, `numel() * dtype.size_of()` of them.
    pub bytes: &'a [u8],
}

impl TensorRef<'_> {
    /// Number of elements (`bytes.len() / dtype.size_of()`).
    pub fn numel(&self) -> usize {
        self.bytes.len() / self.dtype.size_of()
    }
}

/// Where the bytes of a container live.
enum Storage {
    /// A read-only memory map of the file.
    Mapped(memmap2::Mmap),
    /// Bytes in memory.
    Shared(Arc<[u8]>),
}

impl Storage {
    fn as_slice(&self) -> &[u8] {
        match self {
            Storage::Mapped(map) => map,
            Storage::Shared(bytes) => bytes,
        }
    }
}

/// An opened (possibly truncated) container.
///
/// Construction validates the header, the manifest and the layout completely and verifies
/// the CRC of the fixed part; after that every accessor only slices.
pub struct Container {
    name: String,
    storage: Storage,
    /// `8 + N`: file offset of the data buffer.
    data_start: usize,
    /// Buffer bytes present (`≤ layout.data_bytes`).
    present: usize,
    /// Number of complete blocks.
    available: usize,
    manifest: Manifest,
    layout: Layout,
}

impl fmt::Debug for Container {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Container")
            .field("name", &self.name)
            .field("file_len", &self.file_len())
            .field("total_blocks", &self.total_blocks())
            .field("available_blocks", &self.available)
            .field("missing_bytes", &self.missing_bytes())
            .finish_non_exhaustive()
    }
}

impl Container {
    /// Opens a container file by memory-mapping it, validates it and verifies the fixed part.
    ///
    /// A file truncated inside the blocks opens as the shorter stack of its complete blocks
    /// ([`available_blocks`](Self::available_blocks)); truncated inside the header or the
    /// fixed part, it is an error saying how much is there.
    ///
    /// The map assumes that nobody modifies or truncates the file while the container is
    /// open (see the `SAFETY` note in the source). Containers are written by renaming a
    /// complete temporary file over the destination, which never modifies an open file.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, FormatError> {
        let path = path.as_ref();
        let name = path.display().to_string();
        let io = |action: &'static str| {
            let file = name.clone();
            move |source| FormatError::Io {
                file,
                action,
                source,
            }
        };
        let file = File::open(path).map_err(io("open"))?;
        let metadata = file.metadata().map_err(io("read the metadata of"))?;
        if metadata.is_dir() {
            return Err(FormatError::Directory { file: name });
        }
        let len = metadata.len();
        if len < 8 {
            // Not mapped: a zero-length map is an error on some systems.
            return Err(FormatError::MissingHeaderLength {
                file: name,
                present: len,
            });
        }
        // SAFETY: the map is read-only and private to this value. Mapping a file is only
        // sound while no one (this process or another) writes to or truncates it during the
        // lifetime of the map; we assume that, as every mmap-based reader (safetensors
        // included) does: bitstack writers never modify a container in place (they write a
        // temporary file and rename it), and a download in progress only appends beyond the
        // mapped length. A violation can show changed bytes (block CRCs catch most) or, on
        // truncation, raise SIGBUS; it cannot be prevented from inside this process.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(io("memory-map"))?;
        Self::parse(name, Storage::Mapped(map))
    }

    /// Gives back this process's resident pages of the file map (the kernel keeps them in
    /// its page cache; a later read faults them in again). Callers that copy what they need
    /// (the runtime copies loaded blocks and fixed tensors) call this so that the map does
    /// not count against their memory budget. No effect on in-memory containers or off Unix.
    pub fn release_pages(&self) {
        #[cfg(unix)]
        if let Storage::Mapped(map) = &self.storage {
            // SAFETY: `DontNeed` on this read-only file mapping only discards the process's
            // page-table entries; the next access reads the same bytes back from the file
            // (the file is never modified while open, see `open`), so every slice handed out
            // from the map keeps its contents. Errors (e.g. an unsupported platform) leave
            // the pages resident, which is harmless.
            let _ = unsafe { map.unchecked_advise(memmap2::UncheckedAdvice::DontNeed) };
        }
    }

    /// Reads a container from bytes in memory (a `Vec<u8>`, `Box<[u8]>` or `Arc<[u8]>`),
    /// with the same validation as [`open`](Self::open). Errors name the file `<memory>`.
    pub fn from_bytes(bytes: impl Into<Arc<[u8]>>) -> Result<Self, FormatError> {
        Self::parse("<memory>".to_owned(), Storage::Shared(bytes.into()))
    }

    fn parse(name: String, storage: Storage) -> Result<Self, FormatError> {
        let bytes = storage.as_slice();
        let file_len = bytes.len();
        let Some(len_bytes) = bytes.first_chunk::<8>() else {
            return Err(FormatError::MissingHeaderLength {
                file: name,
                present: file_len as u64,
            });
        };
        let declared = u64::from_le_bytes(*len_bytes);
        if declared > MAX_HEADER_BYTES {
            return Err(FormatError::HeaderTooLarge {
                file: name,
                declared,
                limit: MAX_HEADER_BYTES,
            });
        }
        let header_present = file_len - 8;
        let header_text = usize::try_from(declared)
            .ok()
            .and_then(|n| Some(8..8usize.checked_add(n)?))
            .and_then(|r| bytes.get(r));
        let Some(header_text) = header_text else {
            return Err(FormatError::TruncatedHeader {
                file: name,
                declared,
                present: header_present as u64,
            });
        };
        let data_start = 8 + header_text.len();
        let invalid_header = |reason: String| FormatError::InvalidHeader {
            file: name.clone(),
            reason,
        };
        let raw = parse_header(header_text).map_err(invalid_header)?;
        let Some(meta) = raw.metadata else {
            return Err(invalid_header(
                "no __metadata__: not a bitstack container".to_owned(),
            ));
        };
        if meta.get(FORMAT_KEY).map(String::as_str) != Some(FORMAT_NAME) {
            return Err(invalid_header(format!(
                "__metadata__ has no \"{FORMAT_KEY}\": \"{FORMAT_NAME}\" entry: not a bitstack container"
            )));
        }
        let version_text = meta.get(VERSION_KEY).ok_or_else(|| {
            invalid_header(format!("__metadata__ has no \"{VERSION_KEY}\" entry"))
        })?;
        let version: u64 = version_text.parse().map_err(|_| {
            invalid_header(format!(
                "\"{VERSION_KEY}\" is {version_text:?}, not a decimal integer"
            ))
        })?;
        if version != u64::from(FORMAT_VERSION) {
            return Err(FormatError::UnsupportedVersion {
                file: name,
                found: version,
                supported: FORMAT_VERSION,
            });
        }
        let manifest_text = meta.get(MANIFEST_KEY).ok_or_else(|| {
            invalid_header(format!("__metadata__ has no \"{MANIFEST_KEY}\" entry"))
        })?;
        let crc_text = meta.get(MANIFEST_CRC_KEY).ok_or_else(|| {
            invalid_header(format!("__metadata__ has no \"{MANIFEST_CRC_KEY}\" entry"))
        })?;
        let stored = (crc_text.len() == 8)
            .then(|| u32::from_str_radix(crc_text, 16).ok())
            .flatten()
            .ok_or_else(|| {
                invalid_header(format!(
                    "\"{MANIFEST_CRC_KEY}\" is {crc_text:?}, not 8 hexadecimal digits"
                ))
            })?;
        let computed = crc32fast::hash(manifest_text.as_bytes());
        if computed != stored && !OPEN_IGNORES_CHECKSUMS {
            return Err(FormatError::ChecksumMismatch {
                file: name,
                what: "manifest".to_owned(),
                stored,
                computed,
            });
        }
        let invalid_manifest = |reason: String| FormatError::InvalidManifest {
            file: name.clone(),
            reason,
        };
        // Read the version first so that a newer manifest is reported as such, not as a
        // pile of unknown fields.
        #[derive(serde::Deserialize)]
        struct VersionProbe {
            version: u64,
        }
        let probe: VersionProbe = serde_json::from_str(manifest_text)
            .map_err(|e| invalid_manifest(format!("bad JSON or no version: {e}")))?;
        if probe.version != u64::from(FORMAT_VERSION) {
            return Err(FormatError::UnsupportedVersion {
                file: name,
                found: probe.version,
                supported: FORMAT_VERSION,
            });
        }
        let manifest: Manifest =
            serde_json::from_str(manifest_text).map_err(|e| invalid_manifest(e.to_string()))?;
        let layout = compute_layout(&manifest).map_err(invalid_manifest)?;
        check_tensors(raw.tensors, &manifest, &layout).map_err(invalid_header)?;

        let present = file_len - data_start;
        if present > layout.data_bytes {
            return Err(FormatError::TrailingBytes {
                file: name,
                expected: layout.data_bytes as u64,
                extra: (present - layout.data_bytes) as u64,
            });
        }
        if present < layout.fixed_bytes {
            return Err(FormatError::TruncatedFixed {
                file: name,
                present: present as u64,
                needed: layout.fixed_bytes as u64,
            });
        }
        let available = layout
            .blocks
            .partition_point(|b: &BlockLayout| b.range.end <= present);
        let container = Container {
            name,
            storage,
            data_start,
            present,
            available,
            manifest,
            layout,
        };
        if !OPEN_IGNORES_CHECKSUMS {
            container.verify_fixed()?;
        }
        Ok(container)
    }

    /// The name used in error messages: the path given to [`open`](Self::open), or
    /// `<memory>`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The manifest.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// Bytes of the file present (the mapped length).
    pub fn file_len(&self) -> u64 {
        self.storage.as_slice().len() as u64
    }

    /// Length of the complete file: `8 + N + data_bytes`.
    pub fn complete_file_len(&self) -> u64 {
        (self.data_start as u64).saturating_add(self.layout.data_bytes as u64)
    }

    /// File offset where the data buffer starts (`8 + N`).
    pub fn data_start(&self) -> u64 {
        self.data_start as u64
    }

    /// Bytes missing at the end of a truncated file (0 when complete).
    pub fn missing_bytes(&self) -> u64 {
        (self.layout.data_bytes - self.present) as u64
    }

    /// Whether the whole file is present.
    pub fn is_complete(&self) -> bool {
        self.present == self.layout.data_bytes
    }

    /// Bytes of the file that are usable: header, fixed part and the complete blocks (the
    /// bytes of an incomplete last block are not).
    pub fn usable_bytes(&self) -> u64 {
        let end = match self.available.checked_sub(1) {
            Some(last) => self.layout.blocks[last].range.end,
            None => self.layout.fixed_bytes,
        };
        (self.data_start + end) as u64
    }

    /// Size of the fixed part (aux files and fixed tensors) in the data buffer.
    pub fn fixed_bytes(&self) -> u64 {
        self.layout.fixed_bytes as u64
    }

    /// Number of blocks the complete stack has.
    pub fn total_blocks(&self) -> usize {
        self.layout.blocks.len()
    }

    /// Number of leading blocks that are complete in this file (the usable stack prefix).
    pub fn available_blocks(&self) -> usize {
        self.available
    }

    /// Number of leading blocks every load needs (the base model).
    pub fn mandatory_blocks(&self) -> usize {
        // compute_layout checked mandatory_blocks ≤ blocks.len().
        usize::try_from(self.manifest.mandatory_blocks).unwrap_or(usize::MAX)
    }

    /// Whether all mandatory blocks are present (a truncated file may lack them).
    pub fn base_available(&self) -> bool {
        self.available >= self.mandatory_blocks()
    }

    /// The decomposed matrix with this index.
    pub fn matrix(&self, index: usize) -> Option<&MatrixEntry> {
        self.manifest.matrices.get(index)
    }

    /// An auxiliary file by name (e.g. `"config.json"`).
    pub fn aux_file(&self, name: &str) -> Option<&[u8]> {
        let &j = self.layout.aux_by_name.get(name)?;
        self.data(self.layout.aux.get(j)?)
    }

    /// The names of the auxiliary files, in buffer order.
    pub fn aux_file_names(&self) -> impl Iterator<Item = &str> {
        self.manifest.aux_files.iter().map(|a| a.name.as_str())
    }

    /// A fixed tensor by its original name (e.g. `"model.norm.weight"`).
    pub fn fixed(&self, name: &str) -> Option<TensorRef<'_>> {
        let &j = self.layout.fixed_by_name.get(name)?;
        let entry = self.manifest.fixed.get(j)?;
        Some(TensorRef {
            dtype: entry.dtype,
            shape: &entry.shape,
            bytes: self.data(self.layout.fixed.get(j)?)?,
        })
    }

    /// All fixed tensors with their names, in buffer order.
    pub fn fixed_tensors(&self) -> impl Iterator<Item = (&str, TensorRef<'_>)> {
        self.manifest
            .fixed
            .iter()
            .zip(&self.layout.fixed)
            .filter_map(|(entry, range)| {
                Some((
                    entry.name.as_str(),
                    TensorRef {
                        dtype: entry.dtype,
                        shape: &entry.shape,
                        bytes: self.data(range)?,
                    },
                ))
            })
    }

    /// The block at stack position `position`, after checking its CRC.
    ///
    /// Errors: [`FormatError::NoSuchBlock`] past the stack, [`FormatError::BlockNotPresent`]
    /// past the complete prefix of a truncated file, [`FormatError::ChecksumMismatch`].
    pub fn block(&self, position: usize) -> Result<BlockRef<'_>, FormatError> {
        let block = self.block_unchecked(position)?;
        let computed = crc32fast::hash(block.bytes);
        if computed != block.entry.crc32 {
            return Err(FormatError::ChecksumMismatch {
                file: self.name.clone(),
                what: describe_block(&self.manifest, position),
                stored: block.entry.crc32,
                computed,
            });
        }
        Ok(block)
    }

    /// The block at stack position `position`, without checking its CRC (for callers that
    /// verified it already). Bounds are still checked.
    pub fn block_unchecked(&self, position: usize) -> Result<BlockRef<'_>, FormatError> {
        let total = self.total_blocks();
        if position >= total {
            return Err(FormatError::NoSuchBlock {
                file: self.name.clone(),
                position,
                total,
            });
        }
        let not_present = || FormatError::BlockNotPresent {
            file: self.name.clone(),
            position,
            available: self.available,
            total,
            missing: self.missing_bytes(),
        };
        if position >= self.available {
            return Err(not_present());
        }
        let (Some(entry), Some(layout)) = (
            self.manifest.blocks.get(position),
            self.layout.blocks.get(position),
        ) else {
            return Err(not_present());
        };
        let (Some(matrix), Some(bytes)) = (
            self.manifest.matrices.get(entry.matrix),
            self.data(&layout.range),
        ) else {
            return Err(not_present());
        };
        Ok(BlockRef {
            position,
            entry,
            matrix,
            bytes,
            part_ranges: &layout.parts,
            block_start: layout.range.start,
        })
    }

    /// Verifies the CRC of the fixed part (done by [`open`](Self::open) already).
    pub fn verify_fixed(&self) -> Result<(), FormatError> {
        let bytes = self.data(&(0..self.layout.fixed_bytes)).unwrap_or_default();
        let computed = crc32fast::hash(bytes);
        if computed != self.manifest.fixed_crc32 {
            return Err(FormatError::ChecksumMismatch {
                file: self.name.clone(),
                what: "fixed part".to_owned(),
                stored: self.manifest.fixed_crc32,
                computed,
            });
        }
        Ok(())
    }

    /// Verifies the CRC of the block at stack position `position`.
    pub fn verify_block(&self, position: usize) -> Result<(), FormatError> {
        self.block(position).map(|_| ())
    }

    /// Verifies the fixed part and every available block.
    pub fn verify_all(&self) -> Result<(), FormatError> {
        self.verify_fixed()?;
        (0..self.available).try_for_each(|p| self.verify_block(p))
    }

    /// Bytes of a data-buffer range (`None` if not present; cannot happen for validated
    /// ranges of the fixed part and available blocks).
    fn data(&self, range: &Range<usize>) -> Option<&[u8]> {
        let start = self.data_start.checked_add(range.start)?;
        let end = self.data_start.checked_add(range.end)?;
        self.storage.as_slice().get(start..end)
    }
}

/// A block of the stack: its manifest entry, its matrix and its bytes.
#[derive(Clone, Copy, Debug)]
pub struct BlockRef<'a> {
    position: usize,
    entry: &'a BlockEntry,
    matrix: &'a MatrixEntry,
    bytes: &'a [u8],
    part_ranges: &'a [Range<usize>],
    block_start: usize,
}

impl<'a> BlockRef<'a> {
    /// Stack position.
    pub fn position(&self) -> usize {
        self.position
    }

    /// The manifest entry (kind, params, parts, offset, length, crc32).
    pub fn entry(&self) -> &'a BlockEntry {
        self.entry
    }

    /// The matrix this block refines.
    pub fn matrix(&self) -> &'a MatrixEntry {
        self.matrix
    }

    /// Index of the matrix this block refines.
    pub fn matrix_index(&self) -> usize {
        self.entry.matrix
    }

    /// Number of this block within its matrix (0 = first).
    pub fn index_in_matrix(&self) -> usize {
        self.entry.index
    }

    /// The block kind, e.g. `"avd"`.
    pub fn kind(&self) -> &'a str {
        &self.entry.kind
    }

    /// An integer parameter, e.g. `param("k")`.
    pub fn param(&self, name: &str) -> Option<i64> {
        self.entry.param(name)
    }

    /// All bytes of the block (its parts, concatenated).
    pub fn bytes(&self) -> &'a [u8] {
        self.bytes
    }

    /// A part by name (e.g. `"signs"`).
    pub fn part(&self, name: &str) -> Option<TensorRef<'a>> {
        let j = self.entry.parts.iter().position(|p| p.name == name)?;
        self.part_at(j)
    }

    /// All parts with their names, in buffer order.
    pub fn parts(&self) -> impl Iterator<Item = (&'a str, TensorRef<'a>)> + 'a {
        let this = *self;
        (0..self.entry.parts.len())
            .filter_map(move |j| Some((this.entry.parts.get(j)?.name.as_str(), this.part_at(j)?)))
    }

    fn part_at(&self, j: usize) -> Option<TensorRef<'a>> {
        let spec = self.entry.parts.get(j)?;
        let range = self.part_ranges.get(j)?;
        let start = range.start.checked_sub(self.block_start)?;
        let end = range.end.checked_sub(self.block_start)?;
        Some(TensorRef {
            dtype: spec.dtype,
            shape: &spec.shape,
            bytes: self.bytes.get(start..end)?,
        })
    }
}
