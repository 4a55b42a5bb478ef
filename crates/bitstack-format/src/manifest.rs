//! The manifest: the `bitstack.manifest` entry of the safetensors `__metadata__` map.
//!
//! These types are plain data, serde-derived with `deny_unknown_fields` (except the free-form
//! [`Manifest::metadata`]). The rules they must satisfy are in docs/FORMAT.md §4–5 and are
//! checked by [`compute_layout`] when a container is read.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::marker::PhantomData;
use std::ops::Range;

use serde::de::{MapAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize};

use crate::Dtype;

/// The format version this crate writes and reads.
pub const FORMAT_VERSION: u32 = 1;

/// The manifest of a container (docs/FORMAT.md §4).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct Manifest {
    /// Format version ([`FORMAT_VERSION`]).
    pub version: u32,
    /// Free-form metadata: model architecture, compression parameters, ...
    #[serde(deserialize_with = "unique_keys")]
    pub metadata: BTreeMap<String, serde_json::Value>,
    /// The decomposed matrices; `matrices[j].index == j`.
    pub matrices: Vec<MatrixEntry>,
    /// Auxiliary files, in buffer order.
    pub aux_files: Vec<AuxEntry>,
    /// Fixed (not decomposed) tensors, in buffer order.
    pub fixed: Vec<FixedEntry>,
    /// Size of the fixed part (aux files + fixed tensors) = buffer offset of the first block.
    pub fixed_bytes: u64,
    /// CRC-32 of the fixed part.
    pub fixed_crc32: u32,
    /// The blocks in stack order.
    pub blocks: Vec<BlockEntry>,
    /// Number of leading blocks every load needs (the base model).
    pub mandatory_blocks: u64,
    /// `fixed_bytes` + the lengths of the mandatory blocks.
    pub base_bytes: u64,
    /// Length of the complete data buffer.
    pub data_bytes: u64,
}

/// One decomposed matrix.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct MatrixEntry {
    /// Position in [`Manifest::matrices`].
    pub index: usize,
    /// Original (Hugging Face) tensor name, e.g. `model.layers.0.self_attn.q_proj.weight`.
    pub name: String,
    /// `m`, the number of rows (out features).
    pub rows: usize,
    /// `n`, the number of columns (in features).
    pub cols: usize,
    /// Dtype string of the original checkpoint, e.g. `"BF16"` (free-form).
    pub original_dtype: String,
}

/// One auxiliary file (stored as a `U8` tensor `aux/<name>`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct AuxEntry {
    /// File name, e.g. `config.json`.
    pub name: String,
    /// Offset in the data buffer.
    pub offset: u64,
    /// Length in bytes.
    pub length: u64,
}

/// One fixed tensor (stored as `fixed/<name>`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct FixedEntry {
    /// Original tensor name, e.g. `model.embed_tokens.weight`.
    pub name: String,
    /// Stored dtype.
    pub dtype: Dtype,
    /// Shape.
    pub shape: Vec<usize>,
    /// Dtype string of the original checkpoint (free-form).
    pub original_dtype: String,
    /// Offset in the data buffer.
    pub offset: u64,
    /// Length in bytes (element count × dtype size).
    pub length: u64,
}

/// Name, dtype and shape of one tensor (a part of a block).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TensorSpec {
    /// Part name, unique within its block, without `/`.
    pub name: String,
    /// Dtype.
    pub dtype: Dtype,
    /// Shape.
    pub shape: Vec<usize>,
}

/// One block of the stack.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct BlockEntry {
    /// Index of the matrix this block refines (into [`Manifest::matrices`]).
    pub matrix: usize,
    /// Number of this block within its matrix (0 = first).
    pub index: usize,
    /// Block kind, e.g. `"avd"`; not interpreted by the container.
    pub kind: String,
    /// Integer parameters of the kind, e.g. `{"k": 4}`.
    #[serde(deserialize_with = "unique_keys")]
    pub params: BTreeMap<String, i64>,
    /// The parts, in buffer order.
    pub parts: Vec<TensorSpec>,
    /// Offset of the block's first byte in the data buffer.
    pub offset: u64,
    /// Length of the block (sum of its part sizes).
    pub length: u64,
    /// CRC-32 of the block's bytes.
    pub crc32: u32,
}

impl BlockEntry {
    /// Looks up an integer parameter, e.g. `param("k")`.
    pub fn param(&self, name: &str) -> Option<i64> {
        self.params.get(name).copied()
    }
}

/// Deserializes a string-keyed map, rejecting duplicate keys (which serde would silently
/// collapse).
fn unique_keys<'de, D, V>(deserializer: D) -> Result<BTreeMap<String, V>, D::Error>
where
    D: Deserializer<'de>,
    V: Deserialize<'de>,
{
    struct UniqueVisitor<V>(PhantomData<V>);
    impl<'de, V: Deserialize<'de>> Visitor<'de> for UniqueVisitor<V> {
        type Value = BTreeMap<String, V>;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a map with unique string keys")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            let mut out = BTreeMap::new();
            while let Some((key, value)) = map.next_entry::<String, V>()? {
                if out.contains_key(&key) {
                    return Err(serde::de::Error::custom(format!("duplicate key {key:?}")));
                }
                out.insert(key, value);
            }
            Ok(out)
        }
    }
    deserializer.deserialize_map(UniqueVisitor(PhantomData))
}

/// Buffer ranges derived from a validated manifest.
#[derive(Clone, Debug)]
pub(crate) struct Layout {
    pub(crate) aux: Vec<Range<usize>>,
    pub(crate) aux_by_name: HashMap<String, usize>,
    pub(crate) fixed: Vec<Range<usize>>,
    pub(crate) fixed_by_name: HashMap<String, usize>,
    pub(crate) blocks: Vec<BlockLayout>,
    pub(crate) fixed_bytes: usize,
    pub(crate) data_bytes: usize,
}

/// Buffer ranges of one block and of its parts.
#[derive(Clone, Debug)]
pub(crate) struct BlockLayout {
    pub(crate) range: Range<usize>,
    pub(crate) parts: Vec<Range<usize>>,
}

/// Checks that a name is non-empty and has no control characters.
pub(crate) fn check_name(what: &str, name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err(format!("{what} has an empty name"));
    }
    if name.chars().any(char::is_control) {
        return Err(format!("{what} name {name:?} contains a control character"));
    }
    Ok(())
}

/// Checks a part name: a valid name without `/`.
pub(crate) fn check_part_name(what: &str, name: &str) -> Result<(), String> {
    check_name(what, name)?;
    if name.contains('/') {
        return Err(format!("{what} name {name:?} contains '/'"));
    }
    Ok(())
}

fn to_usize(value: u64, what: &dyn Fn() -> String) -> Result<usize, String> {
    usize::try_from(value).map_err(|_| format!("{} ({value}) does not fit in memory", what()))
}

/// Appends an entry of `length` bytes that must start at `*cursor`; returns its range.
fn consecutive(
    cursor: &mut usize,
    offset: u64,
    length: u64,
    what: &dyn Fn() -> String,
) -> Result<Range<usize>, String> {
    let offset = to_usize(offset, &|| format!("offset of {}", what()))?;
    let length = to_usize(length, &|| format!("length of {}", what()))?;
    if offset != *cursor {
        return Err(format!(
            "{} starts at buffer offset {offset}, expected {} (entries must be consecutive)",
            what(),
            *cursor
        ));
    }
    let end = offset
        .checked_add(length)
        .ok_or_else(|| format!("{} ends past the addressable range", what()))?;
    *cursor = end;
    Ok(offset..end)
}

/// Describes a block for messages: `block 17 (model.layers.0.mlp.up_proj.weight #3)`.
pub(crate) fn describe_block(manifest: &Manifest, position: usize) -> String {
    match manifest.blocks.get(position) {
        Some(b) => match manifest.matrices.get(b.matrix) {
            Some(m) => format!("block {position} ({} #{})", m.name, b.index),
            None => format!("block {position} (matrix {} #{})", b.matrix, b.index),
        },
        None => format!("block {position}"),
    }
}

/// Validates a manifest against docs/FORMAT.md §4–5 and computes its buffer layout.
///
/// Returns the reason on failure (without file name).
pub(crate) fn compute_layout(m: &Manifest) -> Result<Layout, String> {
    if m.version != FORMAT_VERSION {
        return Err(format!(
            "manifest version {} (expected {FORMAT_VERSION})",
            m.version
        ));
    }
    let mut cursor = 0usize;

    let mut aux = Vec::with_capacity(m.aux_files.len());
    let mut aux_by_name = HashMap::with_capacity(m.aux_files.len());
    for (j, a) in m.aux_files.iter().enumerate() {
        let what = || format!("aux file {j} ({:?})", a.name);
        check_name(&what(), &a.name)?;
        if aux_by_name.insert(a.name.clone(), j).is_some() {
            return Err(format!("duplicate aux file name {:?}", a.name));
        }
        aux.push(consecutive(&mut cursor, a.offset, a.length, &what)?);
    }

    let mut fixed = Vec::with_capacity(m.fixed.len());
    let mut fixed_by_name = HashMap::with_capacity(m.fixed.len());
    for (j, f) in m.fixed.iter().enumerate() {
        let what = || format!("fixed tensor {j} ({:?})", f.name);
        check_name(&what(), &f.name)?;
        if fixed_by_name.insert(f.name.clone(), j).is_some() {
            return Err(format!("duplicate fixed tensor name {:?}", f.name));
        }
        let implied = f
            .dtype
            .byte_len(&f.shape)
            .ok_or_else(|| format!("{}: size of {} {:?} overflows", what(), f.dtype, f.shape))?;
        if u64::try_from(implied).ok() != Some(f.length) {
            return Err(format!(
                "{}: {} {:?} is {implied} bytes but the entry says {}",
                what(),
                f.dtype,
                f.shape,
                f.length
            ));
        }
        fixed.push(consecutive(&mut cursor, f.offset, f.length, &what)?);
    }
    if u64::try_from(cursor).ok() != Some(m.fixed_bytes) {
        return Err(format!(
            "fixed_bytes is {} but the aux files and fixed tensors end at {cursor}",
            m.fixed_bytes
        ));
    }
    let fixed_bytes = cursor;

    let mut matrix_names = HashSet::with_capacity(m.matrices.len());
    for (j, mat) in m.matrices.iter().enumerate() {
        if mat.index != j {
            return Err(format!("matrix {j} has index {}", mat.index));
        }
        check_name(&format!("matrix {j}"), &mat.name)?;
        if !matrix_names.insert(mat.name.as_str()) {
            return Err(format!("duplicate matrix name {:?}", mat.name));
        }
    }

    let mandatory = to_usize(m.mandatory_blocks, &|| "mandatory_blocks".to_owned())?;
    if mandatory > m.blocks.len() {
        return Err(format!(
            "mandatory_blocks is {mandatory} but the stack has only {} blocks",
            m.blocks.len()
        ));
    }
    let mut next_index = vec![0usize; m.matrices.len()];
    let mut blocks = Vec::with_capacity(m.blocks.len());
    let mut base_bytes = fixed_bytes;
    for (p, b) in m.blocks.iter().enumerate() {
        let what = || describe_block(m, p);
        let Some(expected_index) = next_index.get_mut(b.matrix) else {
            return Err(format!(
                "block {p} refers to matrix {} but there are {} matrices",
                b.matrix,
                m.matrices.len()
            ));
        };
        if b.index != *expected_index {
            return Err(format!(
                "{} comes where block #{} of that matrix is expected (blocks of a matrix must appear in order 0, 1, 2, ...)",
                what(),
                *expected_index
            ));
        }
        *expected_index = expected_index
            .checked_add(1)
            .ok_or_else(|| format!("{}: block index overflows", what()))?;
        check_name(&format!("{} kind", what()), &b.kind)?;
        for key in b.params.keys() {
            check_name(&format!("{} parameter", what()), key)?;
        }
        let range = consecutive(&mut cursor, b.offset, b.length, &what)?;
        let mut part_names = HashSet::with_capacity(b.parts.len());
        let mut parts = Vec::with_capacity(b.parts.len());
        let mut part_cursor = range.start;
        for part in &b.parts {
            check_part_name(&format!("{} part", what()), &part.name)?;
            if !part_names.insert(part.name.as_str()) {
                return Err(format!("{}: duplicate part name {:?}", what(), part.name));
            }
            let len = part.dtype.byte_len(&part.shape).ok_or_else(|| {
                format!(
                    "{}: size of part {:?} ({} {:?}) overflows",
                    what(),
                    part.name,
                    part.dtype,
                    part.shape
                )
            })?;
            let end = part_cursor
                .checked_add(len)
                .filter(|&e| e <= range.end)
                .ok_or_else(|| {
                    format!(
                        "{}: parts are larger than the block length {}",
                        what(),
                        b.length
                    )
                })?;
            parts.push(part_cursor..end);
            part_cursor = end;
        }
        if part_cursor != range.end {
            return Err(format!(
                "{}: length is {} but its parts add up to {}",
                what(),
                b.length,
                part_cursor - range.start
            ));
        }
        if p < mandatory {
            base_bytes = range.end;
        }
        blocks.push(BlockLayout { range, parts });
    }
    if u64::try_from(base_bytes).ok() != Some(m.base_bytes) {
        return Err(format!(
            "base_bytes is {} but the mandatory blocks end at {base_bytes}",
            m.base_bytes
        ));
    }
    if u64::try_from(cursor).ok() != Some(m.data_bytes) {
        return Err(format!(
            "data_bytes is {} but the entries end at {cursor}",
            m.data_bytes
        ));
    }
    Ok(Layout {
        aux,
        aux_by_name,
        fixed,
        fixed_by_name,
        blocks,
        fixed_bytes,
        data_bytes: cursor,
    })
}

/// The safetensors name of an auxiliary file: `aux/<name>`.
pub fn aux_tensor_name(file_name: &str) -> String {
    format!("aux/{file_name}")
}

/// The safetensors name of a fixed tensor: `fixed/<name>`.
pub fn fixed_tensor_name(name: &str) -> String {
    format!("fixed/{name}")
}

/// The safetensors name of a block part: `block/<position>/<matrix>.<index>/<part>`.
pub fn block_tensor_name(position: usize, matrix: usize, index: usize, part: &str) -> String {
    format!("block/{position}/{matrix}.{index}/{part}")
}

/// Every tensor the manifest implies, in buffer order: (name, dtype, shape, range).
pub(crate) fn expected_tensors<'m>(
    m: &'m Manifest,
    layout: &'m Layout,
) -> impl Iterator<Item = (String, Dtype, Cow<'m, [usize]>, Range<usize>)> + 'm {
    let aux = m.aux_files.iter().zip(&layout.aux).map(|(a, r)| {
        (
            aux_tensor_name(&a.name),
            Dtype::U8,
            Cow::Owned(vec![r.len()]),
            r.clone(),
        )
    });
    let fixed = m.fixed.iter().zip(&layout.fixed).map(|(f, r)| {
        (
            fixed_tensor_name(&f.name),
            f.dtype,
            Cow::Borrowed(f.shape.as_slice()),
            r.clone(),
        )
    });
    let blocks = m
        .blocks
        .iter()
        .zip(&layout.blocks)
        .enumerate()
        .flat_map(|(p, (b, bl))| {
            b.parts.iter().zip(&bl.parts).map(move |(part, r)| {
                (
                    block_tensor_name(p, b.matrix, b.index, &part.name),
                    part.dtype,
                    Cow::Borrowed(part.shape.as_slice()),
                    r.clone(),
                )
            })
        });
    aux.chain(fixed).chain(blocks)
}
