//! Per-input-channel significance weights.

use std::collections::HashMap;

/// How much each input channel (column) of a matrix matters to the decomposition.
///
/// With weights `s_j > 0` the decomposition minimises the error of `W · diag(s)` instead of
/// `W` (an activation-weighted norm), and returns blocks in the original coordinates.
/// Implement this trait to plug in your own statistics.
pub trait Significance: Sync {
    /// Weights for the `cols` input channels of the matrix named `matrix`, or `None` for the
    /// plain Frobenius norm. A returned vector whose length is not `cols` makes
    /// [`decompose`](crate::decompose) fail with
    /// [`DecomposeError::ChannelWeightsLength`](crate::DecomposeError::ChannelWeightsLength).
    fn channel_weights(&self, matrix: &str, cols: usize) -> Option<Vec<f32>>;
}

/// The default: every channel counts the same (the paper's AVD on the weights as given).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NoSignificance;

impl Significance for NoSignificance {
    fn channel_weights(&self, _matrix: &str, _cols: usize) -> Option<Vec<f32>> {
        None
    }
}

/// Weights looked up by matrix name, e.g. per-channel activation norms from a calibration run.
/// Matrices without an entry get `None` (unweighted).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ChannelWeightMap {
    weights: HashMap<String, Vec<f32>>,
}

impl ChannelWeightMap {
    /// An empty map.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets the weights of `matrix`, returning the previous ones.
    pub fn insert(&mut self, matrix: impl Into<String>, weights: Vec<f32>) -> Option<Vec<f32>> {
        self.weights.insert(matrix.into(), weights)
    }

    /// The weights of `matrix`, if any.
    pub fn get(&self, matrix: &str) -> Option<&[f32]> {
        self.weights.get(matrix).map(Vec::as_slice)
    }

    /// Number of matrices with weights.
    pub fn len(&self) -> usize {
        self.weights.len()
    }

    /// Whether no matrix has weights.
    pub fn is_empty(&self) -> bool {
        self.weights.is_empty()
    }
}

impl FromIterator<(String, Vec<f32>)> for ChannelWeightMap {
    fn from_iter<I: IntoIterator<Item = (String, Vec<f32>)>>(iter: I) -> Self {
        Self {
            weights: iter.into_iter().collect(),
        }
    }
}

impl Significance for ChannelWeightMap {
    fn channel_weights(&self, matrix: &str, _cols: usize) -> Option<Vec<f32>> {
        self.weights.get(matrix).cloned()
    }
}

impl<T: Significance + ?Sized> Significance for &T {
    fn channel_weights(&self, matrix: &str, cols: usize) -> Option<Vec<f32>> {
        (**self).channel_weights(matrix, cols)
    }
}
