//! 16-bit (f16 / bf16) matrices used in place, widened to f32 a tile at a time: the
//! embedding table and `lm_head` of a loaded model stay at 2 bytes per parameter instead of
//! being copied into f32 (which would double or triple their memory).

use std::sync::Arc;

use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};

use crate::linear::Linear;
use crate::ModelError;

/// The 16-bit float format of a [`HalfMatrix`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HalfKind {
    /// IEEE binary16.
    F16,
    /// bfloat16.
    Bf16,
}

/// A row-major `rows × cols` matrix of little-endian 16-bit floats, shared (`Arc`) with
/// whoever else holds the bytes (e.g. a runtime's fixed tensors).
#[derive(Debug, Clone)]
pub struct HalfMatrix {
    kind: HalfKind,
    rows: usize,
    cols: usize,
    bytes: Arc<[u8]>,
}

/// Rows widened per tile in [`HalfLinear`] (bounds the f32 scratch: 64 rows × cols).
const TILE_ROWS: usize = 64;

impl HalfMatrix {
    /// Wraps `bytes` (`2 · rows · cols` of them).
    pub fn new(
        kind: HalfKind,
        rows: usize,
        cols: usize,
        bytes: Arc<[u8]>,
    ) -> Result<Self, ModelError> {
        let want = rows.checked_mul(cols).and_then(|n| n.checked_mul(2));
        if want != Some(bytes.len()) {
            return Err(ModelError::InvalidArgument(format!(
                "a {rows} x {cols} 16-bit matrix needs {} bytes, got {}",
                want.map_or("too many".to_string(), |w| w.to_string()),
                bytes.len()
            )));
        }
        Ok(Self {
            kind,
            rows,
            cols,
            bytes,
        })
    }

    /// Rows.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Columns.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// The format.
    pub fn kind(&self) -> HalfKind {
        self.kind
    }

    /// Bytes held (2 per value).
    pub fn byte_len(&self) -> usize {
        self.bytes.len()
    }

    /// Widens rows `start..start + out.len() / cols` into `out`.
    pub fn rows_into(&self, start: usize, out: &mut [f32]) {
        let from = start * self.cols * 2;
        let src = &self.bytes[from..from + out.len() * 2];
        widen(self.kind, src, out);
    }
}

/// Widens little-endian 16-bit floats to f32 (SIMD through `half` when the bytes are
/// 2-aligned, which they are for every allocation this crate makes).
fn widen(kind: HalfKind, src: &[u8], out: &mut [f32]) {
    match kind {
        HalfKind::F16 => match bytemuck::try_cast_slice::<u8, f16>(src) {
            Ok(h) if cfg!(target_endian = "little") => h.convert_to_f32_slice(out),
            _ => {
                for (o, c) in out.iter_mut().zip(src.chunks_exact(2)) {
                    *o = f16::from_le_bytes([c[0], c[1]]).to_f32();
                }
            }
        },
        HalfKind::Bf16 => {
            for (o, c) in out.iter_mut().zip(src.chunks_exact(2)) {
                *o = f32::from_bits(u32::from(u16::from_le_bytes([c[0], c[1]])) << 16);
            }
        }
    }
    debug_assert!(bf16::ZERO.to_f32() == 0.0);
}

/// A [`Linear`] over a [`HalfMatrix`] weight (`out × in`): tiles of rows are widened to f32
/// and multiplied, so the only f32 copy is one tile.
#[derive(Debug, Clone)]
pub struct HalfLinear {
    weight: HalfMatrix,
}

impl HalfLinear {
    /// The linear `y = W x` of a 16-bit weight.
    pub fn new(weight: HalfMatrix) -> Self {
        Self { weight }
    }

    /// The weight.
    pub fn weight(&self) -> &HalfMatrix {
        &self.weight
    }
}

impl Linear for HalfLinear {
    fn in_features(&self) -> usize {
        self.weight.cols
    }

    fn out_features(&self) -> usize {
        self.weight.rows
    }

    fn forward(&self, x: &[f32], tokens: usize, y: &mut [f32]) {
        let (out, inp) = (self.weight.rows, self.weight.cols);
        if tokens == 1 {
            use rayon::prelude::*;
            // One token: each thread widens and multiplies its own tiles.
            // Each row read once as 16 bits and widened in registers: bf16 always (a shift),
            // f16 where F16C is present.
            let fused: Option<RowDot> = match self.weight.kind {
                HalfKind::Bf16 => Some(crate::linear::dot_bf16),
                HalfKind::F16 if crate::linear::dot_f16_available() => Some(crate::linear::dot_f16),
                HalfKind::F16 => None,
            };
            if let Some(dot) = fused {
                y.par_chunks_mut(TILE_ROWS).enumerate().for_each(|(t, ys)| {
                    for (i, yi) in ys.iter_mut().enumerate() {
                        let at = (t * TILE_ROWS + i) * inp * 2;
                        *yi = dot(&self.weight.bytes[at..at + 2 * inp], x);
                    }
                });
                return;
            }
            y.par_chunks_mut(TILE_ROWS).enumerate().for_each_init(
                || vec![0.0f32; TILE_ROWS * inp],
                |tile, (t, ys)| {
                    let rows = ys.len();
                    let tile = &mut tile[..rows * inp];
                    self.weight.rows_into(t * TILE_ROWS, tile);
                    for (yi, w) in ys.iter_mut().zip(tile.chunks_exact(inp)) {
                        *yi = crate::linear::dot(w, x);
                    }
                },
            );
            return;
        }
        // Several tokens: tiles of rows (about 256 kB of f32 each) are widened and multiplied
        // with the GEMM straight into their columns of y, tiles in parallel (each thread
        // widens its own).
        if inp == 0 {
            y.fill(0.0);
            return;
        }
        let tile_rows = (BATCH_TILE_FLOATS / inp).clamp(8, out.max(8));
        let xm = faer::MatRef::from_row_major_slice(x, tokens, inp);
        let ym = faer::MatMut::from_row_major_slice_mut(y, tokens, out);
        let leaf = |row0: usize, ys: faer::MatMut<'_, f32>| {
            let rows = ys.ncols();
            let mut w = vec![0.0f32; rows * inp];
            self.weight.rows_into(row0, &mut w);
            let wt = faer::MatRef::from_row_major_slice(&w, rows, inp).transpose();
            faer::linalg::matmul::matmul(ys, faer::Accum::Replace, xm, wt, 1.0f32, faer::Par::Seq);
        };
        // Tiles of `tile_rows` columns of y, in parallel.
        use rayon::prelude::*;
        ym.par_col_chunks_mut(tile_rows)
            .enumerate()
            .for_each(|(t, ys)| leaf(t * tile_rows, ys));
    }
}

/// A product of one 16-bit row (little-endian bytes) with an f32 vector.
type RowDot = fn(&[u8], &[f32]) -> f32;

/// f32 values in one widened tile of the batch product (256 kB).
const BATCH_TILE_FLOATS: usize = 1 << 16;

#[cfg(test)]
mod tests {
    use super::*;

    fn matrix(kind: HalfKind, rows: usize, cols: usize) -> (HalfMatrix, Vec<f32>) {
        let values: Vec<f32> = (0..rows * cols)
            .map(|i| ((i * 7919 % 113) as f32 - 56.0) / 17.0)
            .collect();
        let (bytes, exact): (Vec<u8>, Vec<f32>) = match kind {
            HalfKind::F16 => (
                values
                    .iter()
                    .flat_map(|&v| f16::from_f32(v).to_le_bytes())
                    .collect(),
                values.iter().map(|&v| f16::from_f32(v).to_f32()).collect(),
            ),
            HalfKind::Bf16 => (
                values
                    .iter()
                    .flat_map(|&v| bf16::from_f32(v).to_le_bytes())
                    .collect(),
                values.iter().map(|&v| bf16::from_f32(v).to_f32()).collect(),
            ),
        };
        (
            HalfMatrix::new(kind, rows, cols, Arc::from(bytes)).unwrap(),
            exact,
        )
    }

    #[test]
    fn half_linear_matches_dense_of_the_widened_weight() {
        for kind in [HalfKind::F16, HalfKind::Bf16] {
            // (300, 512, 4): three parallel tiles of 128, 128 and 44 rows.
            for (rows, cols, tokens) in [
                (1, 1, 1),
                (70, 33, 1),
                (600, 40, 3),
                (129, 17, 5),
                (300, 512, 4),
            ] {
                let (m, w) = matrix(kind, rows, cols);
                let x: Vec<f32> = (0..tokens * cols)
                    .map(|i| (i % 13) as f32 * 0.1 - 0.6)
                    .collect();
                let mut y = vec![0.0; tokens * rows];
                HalfLinear::new(m).forward(&x, tokens, &mut y);
                for t in 0..tokens {
                    for r in 0..rows {
                        let want: f32 = (0..cols).map(|c| w[r * cols + c] * x[t * cols + c]).sum();
                        let got = y[t * rows + r];
                        assert!(
                            (got - want).abs() <= 1e-4 * (1.0 + want.abs()),
                            "{kind:?} {rows}x{cols} t{t} r{r}: {got} vs {want}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn wrong_length_is_an_error() {
        let e = HalfMatrix::new(HalfKind::F16, 3, 3, Arc::from(vec![0u8; 17])).unwrap_err();
        assert!(e.to_string().contains("18 bytes"), "{e}");
    }
}
