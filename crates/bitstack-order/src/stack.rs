//! The universal stack and budget plans (ALGORITHM.md §4).

use serde::{Deserialize, Serialize};

use crate::OrderError;

/// One entry of the universal stack: block `block` (0-based, within its matrix) of matrix
/// `matrix` (an index into the model's list of stacked matrices).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct StackEntry {
    /// Index of the matrix.
    pub matrix: u32,
    /// Index of the block within the matrix's chain (block `b` refines blocks `0..b`).
    pub block: u32,
}

impl StackEntry {
    /// A stack entry.
    pub fn new(matrix: u32, block: u32) -> Self {
        Self { matrix, block }
    }
}

/// A budget's plan: how many blocks of each matrix to load, and the exact memory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plan {
    /// Length of the stack prefix loaded (mandatory blocks included).
    pub blocks_loaded: usize,
    /// Exact memory of the plan in bytes: fixed tensors plus every loaded block.
    pub memory_bytes: u64,
    /// Blocks loaded per matrix.
    pub per_matrix: Vec<u32>,
}

/// Sizes and order of every block of a model: what a budget needs to become a [`Plan`].
///
/// Invariants checked by [`StackLayout::new`]: every entry names an existing block, each block
/// appears at most once, and every matrix's blocks appear in chain order (block `b` after block
/// `b − 1`), so that every prefix of the stack is a valid reconstruction of every matrix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StackLayout {
    fixed_bytes: u64,
    block_bytes: Vec<Vec<u64>>,
    order: Vec<StackEntry>,
    mandatory: usize,
    /// `prefix_bytes[i]` = memory of the first `i` stack entries, fixed part included.
    prefix_bytes: Vec<u64>,
}

impl StackLayout {
    /// Checks and builds a layout.
    ///
    /// - `fixed_bytes`: bytes of everything that is not a block (ALGORITHM.md §4: 2 bytes per
    ///   parameter of embeddings, lm_head, norms, biases);
    /// - `block_bytes[m][b]`: size of block `b` of matrix `m`;
    /// - `order`: the stack (it may hold fewer blocks than exist, e.g. a truncated file);
    /// - `mandatory`: how many leading entries every load needs (the base model).
    pub fn new(
        fixed_bytes: u64,
        block_bytes: Vec<Vec<u64>>,
        order: Vec<StackEntry>,
        mandatory: usize,
    ) -> Result<Self, OrderError> {
        if mandatory > order.len() {
            return Err(OrderError::InvalidStack(format!(
                "{mandatory} mandatory blocks but the stack holds only {}",
                order.len()
            )));
        }
        let mut next = vec![0u32; block_bytes.len()];
        let mut prefix_bytes = Vec::with_capacity(order.len() + 1);
        let mut total = fixed_bytes;
        prefix_bytes.push(total);
        for (position, entry) in order.iter().enumerate() {
            let m = entry.matrix as usize;
            let sizes = block_bytes.get(m).ok_or_else(|| {
                OrderError::InvalidStack(format!(
                    "stack entry {position} names matrix {m}, but there are only {} matrices",
                    block_bytes.len()
                ))
            })?;
            if entry.block != next[m] {
                return Err(OrderError::InvalidStack(format!(
                    "stack entry {position} is block {} of matrix {m}, but that matrix's next \
                     block in chain order is {}",
                    entry.block, next[m]
                )));
            }
            let size = *sizes.get(entry.block as usize).ok_or_else(|| {
                OrderError::InvalidStack(format!(
                    "stack entry {position} is block {} of matrix {m}, which has only {} blocks",
                    entry.block,
                    sizes.len()
                ))
            })?;
            next[m] += 1;
            total = total.checked_add(size).ok_or_else(|| {
                OrderError::InvalidStack("total size overflows 64 bits".to_string())
            })?;
            prefix_bytes.push(total);
        }
        Ok(Self {
            fixed_bytes,
            block_bytes,
            order,
            mandatory,
            prefix_bytes,
        })
    }

    /// Bytes of everything that is not a block.
    pub fn fixed_bytes(&self) -> u64 {
        self.fixed_bytes
    }

    /// The stack order.
    pub fn order(&self) -> &[StackEntry] {
        &self.order
    }

    /// Number of leading stack entries every load needs.
    pub fn mandatory_blocks(&self) -> usize {
        self.mandatory
    }

    /// Number of matrices.
    pub fn matrices(&self) -> usize {
        self.block_bytes.len()
    }

    /// Sizes of the blocks of each matrix.
    pub fn block_bytes(&self) -> &[Vec<u64>] {
        &self.block_bytes
    }

    /// Memory of the first `n` stack entries (fixed part included); `n` is clamped to the
    /// stack length.
    pub fn memory_of_prefix(&self, n: usize) -> u64 {
        self.prefix_bytes[n.min(self.order.len())]
    }

    /// The smallest loadable memory: fixed part plus the mandatory blocks.
    pub fn min_memory(&self) -> u64 {
        self.memory_of_prefix(self.mandatory)
    }

    /// Memory of the whole stack.
    pub fn max_memory(&self) -> u64 {
        self.memory_of_prefix(self.order.len())
    }

    /// The plan of the first `n` stack entries (clamped to the stack length).
    pub fn plan_for_prefix(&self, n: usize) -> Plan {
        let n = n.min(self.order.len());
        let mut per_matrix = vec![0u32; self.block_bytes.len()];
        for entry in &self.order[..n] {
            per_matrix[entry.matrix as usize] += 1;
        }
        Plan {
            blocks_loaded: n,
            memory_bytes: self.prefix_bytes[n],
            per_matrix,
        }
    }

    /// The longest stack prefix whose memory is at most `budget` (ALGORITHM.md §4).
    ///
    /// A budget below [`StackLayout::min_memory`] is an [`OrderError::BelowMinimum`] that
    /// states the minimum.
    pub fn plan_for_budget(&self, budget: u64) -> Result<Plan, OrderError> {
        let minimum = self.min_memory();
        if budget < minimum {
            return Err(OrderError::BelowMinimum { budget, minimum });
        }
        // prefix_bytes is non-decreasing: the number of prefixes with memory <= budget, minus
        // one for the empty prefix, is the prefix length.
        let fitting = self.prefix_bytes.partition_point(|&bytes| bytes <= budget);
        Ok(self.plan_for_prefix(fitting.saturating_sub(1)))
    }

    /// `steps` budgets spread evenly (in bytes) from the minimum to the maximum, both included.
    pub fn budget_steps(&self, steps: usize) -> Vec<u64> {
        let (lo, hi) = (self.min_memory(), self.max_memory());
        match steps {
            0 => Vec::new(),
            1 => vec![hi],
            _ => (0..steps)
                .map(|i| lo + ((hi - lo) as u128 * i as u128 / (steps - 1) as u128) as u64)
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout() -> StackLayout {
        let sizes = vec![vec![10, 5, 5], vec![20, 7]];
        let order = vec![
            StackEntry::new(0, 0),
            StackEntry::new(1, 0),
            StackEntry::new(0, 1),
            StackEntry::new(1, 1),
            StackEntry::new(0, 2),
        ];
        StackLayout::new(1000, sizes, order, 2).unwrap()
    }

    #[test]
    fn prefix_memory() {
        let l = layout();
        assert_eq!(l.min_memory(), 1030);
        assert_eq!(l.max_memory(), 1047);
        assert_eq!(l.memory_of_prefix(3), 1035);
    }

    #[test]
    fn budgets() {
        let l = layout();
        let p = l.plan_for_budget(1041).unwrap();
        assert_eq!(p.blocks_loaded, 3);
        assert_eq!(p.memory_bytes, 1035);
        assert_eq!(p.per_matrix, vec![2, 1]);
        let p = l.plan_for_budget(1042).unwrap();
        assert_eq!(p.blocks_loaded, 4);
        assert_eq!(l.plan_for_budget(u64::MAX).unwrap().blocks_loaded, 5);
        let err = l.plan_for_budget(1029).unwrap_err();
        assert!(err.to_string().contains("minimum of 1030 bytes"), "{err}");
        assert_eq!(l.plan_for_budget(1030).unwrap().blocks_loaded, 2);
    }

    #[test]
    fn rejects_out_of_chain_order() {
        let sizes = vec![vec![10, 5]];
        let err = StackLayout::new(0, sizes.clone(), vec![StackEntry::new(0, 1)], 0).unwrap_err();
        assert!(err.to_string().contains("chain order"), "{err}");
        let err = StackLayout::new(0, sizes.clone(), vec![StackEntry::new(3, 0)], 0).unwrap_err();
        assert!(err.to_string().contains("only 1 matrices"), "{err}");
        let order = vec![StackEntry::new(0, 0), StackEntry::new(0, 1)];
        assert!(StackLayout::new(0, sizes.clone(), order.clone(), 3).is_err());
        let err = StackLayout::new(
            0,
            vec![vec![1]],
            vec![StackEntry::new(0, 0), StackEntry::new(0, 1)],
            0,
        )
        .unwrap_err();
        assert!(err.to_string().contains("only 1 blocks"), "{err}");
    }

    #[test]
    fn steps() {
        let l = layout();
        let s = l.budget_steps(3);
        assert_eq!(s, vec![1030, 1038, 1047]);
        assert_eq!(l.plan_for_budget(s[2]).unwrap().blocks_loaded, 5);
    }
}
