//! Block kinds: how one additive refinement of a matrix is decoded and applied.

use bitstack_bits::SignMatrix;
use bitstack_decompose::AvdBlock;
use half::f16;

/// One loaded block (owned memory). Every kind applies the same way: it adds its `Δ` to the
/// matrix (`Ŵ_b = Σ_{i<b} Δ_i`).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum Block {
    /// A residual block of the absolute-value decomposition: `Δ = S ⊙ (u v)`.
    Avd(AvdBlock),
}

/// A named part of a block as stored: dtype name, shape, bytes.
pub(crate) struct Part<'a> {
    pub name: &'a str,
    pub dtype: &'a str,
    pub shape: &'a [usize],
    pub bytes: &'a [u8],
}

impl Block {
    /// Decodes a block of `kind` for a `rows × cols` matrix from its parts.
    pub(crate) fn decode(
        kind: &str,
        params: &std::collections::BTreeMap<String, i64>,
        rows: usize,
        cols: usize,
        parts: &[Part<'_>],
    ) -> Result<Self, String> {
        match kind {
            "avd" => {
                let k = params
                    .get("k")
                    .copied()
                    .filter(|&k| k > 0)
                    .ok_or("avd block without a positive parameter k")?
                    as usize;
                let find = |name: &str, dtype: &str| {
                    parts
                        .iter()
                        .find(|p| p.name == name)
                        .filter(|p| p.dtype == dtype)
                        .ok_or(format!("avd block without a {dtype} part {name:?}"))
                };
                let signs = find("signs", "U8")?;
                let u = find("u", "F16")?;
                let v = find("v", "F16")?;
                if u.shape != [rows, k] || v.shape != [k, cols] {
                    return Err(format!(
                        "avd factors have shapes {:?} and {:?}, expected [{rows}, {k}] and [{k}, {cols}]",
                        u.shape, v.shape
                    ));
                }
                let signs = SignMatrix::from_packed(signs.bytes.to_vec(), rows, cols)
                    .map_err(|e| e.to_string())?;
                let halves = |b: &[u8]| -> Vec<f16> {
                    b.chunks_exact(2)
                        .map(|c| f16::from_le_bytes([c[0], c[1]]))
                        .collect()
                };
                AvdBlock::from_parts(signs, halves(u.bytes), halves(v.bytes), k)
                    .map(Block::Avd)
                    .map_err(|e| e.to_string())
            }
            other => Err(format!(
                "unknown block kind {other:?} (this runtime knows \"avd\"; upgrade bitstack)"
            )),
        }
    }

    /// Bytes this block occupies in memory (equal to its accounted size).
    pub fn byte_size(&self) -> u64 {
        match self {
            Block::Avd(b) => AvdBlock::byte_size(b.rows(), b.cols(), b.k()),
        }
    }

    /// `w += Δ` for a dense row-major `rows × cols` matrix.
    pub fn add_to_dense(&self, w: &mut [f32]) {
        match self {
            Block::Avd(b) => b.add_to_dense(w),
        }
    }

    /// `tile += rows row0.. of Δ` (a row-major tile of whole rows).
    pub fn add_rows_to_dense(&self, row0: usize, tile: &mut [f32]) {
        match self {
            Block::Avd(b) => b.add_rows_to_dense(row0, tile),
        }
    }

    /// The block as a sign matrix with low-rank factors, if it is one (every kind is, today):
    /// such blocks are applied together by [`bitstack_bits::lowrank_matvec_add`].
    pub fn as_lowrank(&self) -> Option<bitstack_bits::LowRankRef<'_>> {
        match self {
            Block::Avd(b) => Some(b.as_lowrank()),
        }
    }

    /// `y += Δ x`, computed from the packed representation.
    pub fn matvec_add(&self, x: &[f32], y: &mut [f32]) {
        match self {
            Block::Avd(b) => b.matvec_add(x, y),
        }
    }
}
