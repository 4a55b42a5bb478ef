//! Scoring blocks and building the universal stack level by level (ALGORITHM.md §3).

use crate::{OrderError, StackEntry};

/// The error type a [`BlockScorer`] may return.
pub type ScoreError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// How important is the next block of a matrix? The extension point of the ordering.
///
/// At level `level`, every matrix holds `level` blocks (or all of its blocks, if it has fewer);
/// the scorer gives each candidate matrix its block number `level` (0-based, i.e. its
/// `level + 1`-th block), measures, and takes it back. **Lower scores are more important** and
/// go earlier in the stack (the paper's scorer returns the perplexity reached).
///
/// A score may be `NaN` (a diverged evaluation); [`build_level_synchronous`] then applies the
/// reference's NaN rule.
pub trait BlockScorer {
    /// Scores of `candidates` (matrix indices) at `level`, in the same order.
    fn score_level(&mut self, level: u32, candidates: &[u32]) -> Result<Vec<f64>, ScoreError>;
}

/// The data-free default scorer: the squared Frobenius error a block removes, per byte.
///
/// With `e[m][b] = ‖W_m − Ŵ_{m,b}‖²_F` (so `e[m][0] = ‖W_m‖²_F`), the score of block `b` of
/// matrix `m` is `−(e[m][b] − e[m][b+1]) / bytes[m][b]`: the more error a byte removes, the
/// earlier the block. It needs no calibration data and no forward passes; it ignores how much
/// each matrix matters to the model's output, which the perplexity scorer measures.
#[derive(Debug, Clone)]
pub struct ErrorReductionScorer {
    squared_errors: Vec<Vec<f64>>,
    block_bytes: Vec<Vec<u64>>,
}

impl ErrorReductionScorer {
    /// `squared_errors[m]` has one more entry than `block_bytes[m]` (the error with 0 blocks).
    pub fn new(
        squared_errors: Vec<Vec<f64>>,
        block_bytes: Vec<Vec<u64>>,
    ) -> Result<Self, OrderError> {
        if squared_errors.len() != block_bytes.len() {
            return Err(OrderError::InvalidStack(format!(
                "{} error chains for {} matrices",
                squared_errors.len(),
                block_bytes.len()
            )));
        }
        for (m, (e, b)) in squared_errors.iter().zip(&block_bytes).enumerate() {
            if e.len() != b.len() + 1 {
                return Err(OrderError::InvalidStack(format!(
                    "matrix {m}: {} errors for {} blocks (need blocks + 1)",
                    e.len(),
                    b.len()
                )));
            }
        }
        Ok(Self {
            squared_errors,
            block_bytes,
        })
    }
}

impl BlockScorer for ErrorReductionScorer {
    fn score_level(&mut self, level: u32, candidates: &[u32]) -> Result<Vec<f64>, ScoreError> {
        let b = level as usize;
        candidates
            .iter()
            .map(|&m| {
                let errors = self
                    .squared_errors
                    .get(m as usize)
                    .ok_or_else(|| format!("no matrix {m}"))?;
                let (before, after) = match (errors.get(b), errors.get(b + 1)) {
                    (Some(x), Some(y)) => (*x, *y),
                    _ => return Err(format!("matrix {m} has no block {b}").into()),
                };
                let bytes = self.block_bytes[m as usize][b].max(1) as f64;
                Ok(-(before - after) / bytes)
            })
            .collect()
    }
}

/// Builds the universal stack level by level, as the reference does (ALGORITHM.md §3).
///
/// `blocks_per_matrix[m]` is the number of blocks matrix `m` has (at least 1). The stack starts
/// with block 0 of every matrix in module order (the base model, mandatory); then for each
/// level `b = 1, 2, …` the blocks `b` of the matrices that have one, sorted by score ascending
/// (stable, so ties keep module order).
///
/// NaN rule: a NaN score at level `b` is replaced by (the matrix's level `b + 1` score + the
/// largest finite score of level `b`); a NaN at a matrix's last level is an error. Levels are
/// resolved from the last one down, so a NaN followed by a NaN uses the resolved value.
///
/// `on_level(level, levels)` is called before each level is scored (for progress reports).
pub fn build_level_synchronous(
    blocks_per_matrix: &[u32],
    scorer: &mut dyn BlockScorer,
    on_level: &mut dyn FnMut(u32, u32),
) -> Result<Vec<StackEntry>, OrderError> {
    if let Some(m) = blocks_per_matrix.iter().position(|&b| b == 0) {
        return Err(OrderError::InvalidStack(format!(
            "matrix {m} has no blocks"
        )));
    }
    let levels = blocks_per_matrix.iter().copied().max().unwrap_or(0);
    let mut order: Vec<StackEntry> = (0..blocks_per_matrix.len() as u32)
        .map(|m| StackEntry::new(m, 0))
        .collect();
    // scores[level][matrix] for the candidates of each level.
    let mut scores: Vec<Vec<Option<f64>>> = Vec::new();
    for level in 1..levels {
        on_level(level, levels - 1);
        let candidates: Vec<u32> = (0..blocks_per_matrix.len() as u32)
            .filter(|&m| blocks_per_matrix[m as usize] > level)
            .collect();
        let values = scorer
            .score_level(level, &candidates)
            .map_err(|source| OrderError::Scoring { level, source })?;
        if values.len() != candidates.len() {
            return Err(OrderError::Scoring {
                level,
                source: format!(
                    "scorer returned {} scores for {} candidates",
                    values.len(),
                    candidates.len()
                )
                .into(),
            });
        }
        let mut row = vec![None; blocks_per_matrix.len()];
        for (&m, v) in candidates.iter().zip(values) {
            row[m as usize] = Some(v);
        }
        scores.push(row);
    }
    // Resolve NaNs from the last level down.
    for li in (0..scores.len()).rev() {
        let level = li as u32 + 1;
        let largest_finite = scores[li]
            .iter()
            .flatten()
            .copied()
            .filter(|v| v.is_finite())
            .fold(f64::NEG_INFINITY, f64::max);
        for m in 0..blocks_per_matrix.len() {
            if let Some(v) = scores[li][m] {
                if v.is_nan() {
                    let next = scores.get(li + 1).and_then(|row| row[m]);
                    match next {
                        Some(n) if !n.is_nan() => scores[li][m] = Some(n + largest_finite),
                        _ => {
                            return Err(OrderError::NanAtLastLevel {
                                matrix: m as u32,
                                level,
                            })
                        }
                    }
                }
            }
        }
    }
    for (li, row) in scores.iter().enumerate() {
        let mut level_entries: Vec<(u32, f64)> = row
            .iter()
            .enumerate()
            .filter_map(|(m, s)| s.map(|s| (m as u32, s)))
            .collect();
        level_entries.sort_by(|a, b| a.1.total_cmp(&b.1));
        order.extend(
            level_entries
                .into_iter()
                .map(|(m, _)| StackEntry::new(m, li as u32 + 1)),
        );
    }
    Ok(order)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A scorer that returns preset values and records what it was asked.
    struct Table(Vec<Vec<f64>>, Vec<(u32, Vec<u32>)>);
    impl BlockScorer for Table {
        fn score_level(&mut self, level: u32, c: &[u32]) -> Result<Vec<f64>, ScoreError> {
            self.1.push((level, c.to_vec()));
            Ok(c.iter()
                .map(|&m| self.0[level as usize][m as usize])
                .collect())
        }
    }

    #[test]
    fn level_synchronous_sorts_each_level() {
        let mut t = Table(
            vec![vec![], vec![3.0, 1.0, 2.0], vec![1.0, 5.0, 0.5]],
            vec![],
        );
        let order = build_level_synchronous(&[3, 3, 3], &mut t, &mut |_, _| {}).unwrap();
        let pairs: Vec<(u32, u32)> = order.iter().map(|e| (e.matrix, e.block)).collect();
        assert_eq!(
            pairs,
            vec![
                (0, 0),
                (1, 0),
                (2, 0),
                (1, 1),
                (2, 1),
                (0, 1),
                (2, 2),
                (0, 2),
                (1, 2)
            ]
        );
        assert_eq!(t.1, vec![(1, vec![0, 1, 2]), (2, vec![0, 1, 2])]);
    }

    #[test]
    fn uneven_chains_and_ties_are_stable() {
        let mut t = Table(vec![vec![], vec![1.0, 1.0, 0.0]], vec![]);
        let order = build_level_synchronous(&[2, 1, 2], &mut t, &mut |_, _| {}).unwrap();
        let pairs: Vec<(u32, u32)> = order.iter().map(|e| (e.matrix, e.block)).collect();
        assert_eq!(pairs, vec![(0, 0), (1, 0), (2, 0), (2, 1), (0, 1)]);
    }

    #[test]
    fn nan_rule() {
        // Level 1: matrix 0 NaN -> its level-2 value (0.5) + largest finite of level 1 (2.0) = 2.5
        let mut t = Table(
            vec![vec![], vec![f64::NAN, 1.0, 2.0], vec![0.5, 5.0, 0.1]],
            vec![],
        );
        let order = build_level_synchronous(&[3, 3, 3], &mut t, &mut |_, _| {}).unwrap();
        let level1: Vec<u32> = order[3..6].iter().map(|e| e.matrix).collect();
        assert_eq!(level1, vec![1, 2, 0]);
        let mut t = Table(vec![vec![], vec![1.0, f64::NAN]], vec![]);
        let err = build_level_synchronous(&[2, 2], &mut t, &mut |_, _| {}).unwrap_err();
        assert!(matches!(
            err,
            OrderError::NanAtLastLevel {
                matrix: 1,
                level: 1
            }
        ));
    }

    #[test]
    fn error_reduction_prefers_more_error_removed_per_byte() {
        let e = vec![vec![100.0, 40.0, 20.0], vec![100.0, 10.0, 9.0]];
        let bytes = vec![vec![10, 10], vec![10, 20]];
        let mut s = ErrorReductionScorer::new(e, bytes).unwrap();
        let v = s.score_level(1, &[0, 1]).unwrap();
        assert_eq!(v, vec![-2.0, -0.05]);
        assert!(s.score_level(2, &[0]).is_err());
    }
}
