//! An opened container and its stack layout.

use std::path::Path;

use bitstack_format::Container;
use bitstack_order::{StackEntry, StackLayout};

use crate::block::{Block, Part};
use crate::RuntimeError;

/// An opened `.bitstack` file: the container (memory-mapped) and the stack layout of the
/// complete blocks it holds. A truncated file (a partial download) opens as the shorter stack.
#[derive(Debug)]
pub struct StackFile {
    container: Container,
    layout: StackLayout,
    full_layout: StackLayout,
}

impl StackFile {
    /// Opens and validates a container (the fixed part's checksum is verified; blocks are
    /// verified when they are loaded).
    pub fn open(path: impl AsRef<Path>) -> Result<Self, RuntimeError> {
        Self::from_container(Container::open(path.as_ref())?)
    }

    /// Wraps an already opened container.
    pub fn from_container(container: Container) -> Result<Self, RuntimeError> {
        let manifest = container.manifest();
        let mut block_bytes: Vec<Vec<u64>> = vec![Vec::new(); manifest.matrices.len()];
        let mut order = Vec::with_capacity(manifest.blocks.len());
        for entry in &manifest.blocks {
            let sizes = block_bytes
                .get_mut(entry.matrix)
                .ok_or_else(|| RuntimeError::Invalid("block names a missing matrix".into()))?;
            sizes.push(entry.length);
            order.push(StackEntry::new(entry.matrix as u32, entry.index as u32));
        }
        let fixed = manifest.fixed.iter().map(|f| f.length).sum::<u64>();
        let mandatory = manifest.mandatory_blocks as usize;
        let full_layout = StackLayout::new(fixed, block_bytes.clone(), order.clone(), mandatory)?;
        let available = container.available_blocks();
        order.truncate(available);
        let layout = StackLayout::new(fixed, block_bytes, order, mandatory.min(available))?;
        Ok(Self {
            container,
            layout,
            full_layout,
        })
    }

    /// The container.
    pub fn container(&self) -> &Container {
        &self.container
    }

    /// The layout of the blocks present (all of them unless the file is truncated).
    pub fn layout(&self) -> &StackLayout {
        &self.layout
    }

    /// The layout of the complete stack, as the manifest describes it.
    pub fn full_layout(&self) -> &StackLayout {
        &self.full_layout
    }

    /// True when some blocks are missing (a truncated file).
    pub fn is_truncated(&self) -> bool {
        self.layout.order().len() < self.full_layout.order().len()
    }

    /// Checks that the base model is present.
    pub(crate) fn require_base(&self) -> Result<(), RuntimeError> {
        let mandatory = self.full_layout.mandatory_blocks();
        let available = self.layout.order().len();
        if available < mandatory {
            return Err(RuntimeError::BaseIncomplete {
                available,
                mandatory,
            });
        }
        Ok(())
    }

    /// Number of stacked matrices.
    pub fn matrix_count(&self) -> usize {
        self.container.manifest().matrices.len()
    }

    /// Name of matrix `m` (the original tensor name).
    pub fn matrix_name(&self, m: usize) -> &str {
        &self.container.manifest().matrices[m].name
    }

    /// Shape `(rows, cols)` of matrix `m`.
    pub fn shape(&self, m: usize) -> (usize, usize) {
        let e = &self.container.manifest().matrices[m];
        (e.rows, e.cols)
    }

    /// Index of the matrix with this tensor name.
    pub fn matrix_index(&self, name: &str) -> Option<usize> {
        self.container
            .manifest()
            .matrices
            .iter()
            .position(|m| m.name == name)
    }

    /// Reads, verifies (CRC) and decodes the block at a stack position; `earlier` are the
    /// blocks of the same matrix before it, in chain order (some kinds build on them).
    pub fn read_block(
        &self,
        position: usize,
        earlier: &[std::sync::Arc<Block>],
    ) -> Result<(Block, u64), RuntimeError> {
        let block = self.container.block(position)?;
        let entry = block.entry();
        let m = entry.matrix;
        let (rows, cols) = self.shape(m);
        let parts: Vec<Part<'_>> = block
            .parts()
            .map(|(name, tensor)| Part {
                name,
                dtype: tensor.dtype.name(),
                shape: tensor.shape,
                bytes: tensor.bytes,
            })
            .collect();
        let decoded = Block::decode(&entry.kind, &entry.params, rows, cols, &parts, earlier)
            .map_err(|reason| RuntimeError::BadBlock {
                position,
                matrix: self.matrix_name(m).to_string(),
                index: entry.index as u32,
                reason,
            })?;
        Ok((decoded, entry.length))
    }
}
