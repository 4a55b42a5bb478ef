//! Block kinds: how one additive refinement of a matrix is decoded and applied.

use std::sync::Arc;

use bitstack_bits::{SignLayout, SignMatrix, STRIP_COLS};
use bitstack_decompose::{AvdBlock, PlaneBlock, PlaneGrid};
use half::f16;

/// One loaded block (owned memory). Every kind applies the same way: it adds its `Δ` to the
/// matrix (`Ŵ_b = Σ_{i<b} Δ_i`).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum Block {
    /// A residual block of the absolute-value decomposition: `Δ = S ⊙ (u v)`.
    Avd(AvdBlock),
    /// A nested bit plane: `Δ = half·2^{−(p+1)} ⊙ S` (plus the group centres for plane 0),
    /// sharing its matrix's grid.
    Plane(PlaneBlock),
}

/// A named part of a block as stored: dtype name, shape, bytes.
pub(crate) struct Part<'a> {
    pub name: &'a str,
    pub dtype: &'a str,
    pub shape: &'a [usize],
    pub bytes: &'a [u8],
}

impl Block {
    /// Decodes a block of `kind` for a `rows × cols` matrix from its parts; `earlier` are the
    /// matrix's blocks before it (a plane after the first shares the first plane's grid).
    pub(crate) fn decode(
        kind: &str,
        params: &std::collections::BTreeMap<String, i64>,
        rows: usize,
        cols: usize,
        parts: &[Part<'_>],
        earlier: &[Arc<Block>],
    ) -> Result<Self, String> {
        let halves = |b: &[u8]| -> Vec<f16> {
            b.chunks_exact(2)
                .map(|c| f16::from_le_bytes([c[0], c[1]]))
                .collect()
        };
        let find = |name: &str, dtype: &str, kind: &str| {
            parts
                .iter()
                .find(|p| p.name == name)
                .filter(|p| p.dtype == dtype)
                .ok_or(format!("{kind} block without a {dtype} part {name:?}"))
        };
        match kind {
            "planes" => {
                let param = |name: &str| {
                    params
                        .get(name)
                        .copied()
                        .filter(|&v| v >= 0)
                        .ok_or(format!("planes block without a parameter {name} ≥ 0"))
                };
                let group = param("group")? as usize;
                let plane = param("plane")? as usize;
                let signs = find("signs", "U8", kind)?;
                let signs = SignMatrix::from_packed(signs.bytes.to_vec(), rows, cols)
                    .map_err(|e| e.to_string())?;
                let grid = if plane == 0 {
                    // The products build one table of `x` per matrix for its planes' group.
                    if earlier.iter().any(|b| matches!(b.as_ref(), Block::Plane(_))) {
                        return Err(
                            "a second plane 0 (a matrix's bit planes share one grid)".into()
                        );
                    }
                    let mid = find("mid", "F16", kind)?;
                    let half = find("half", "F16", kind)?;
                    let groups = cols.div_ceil(group.max(1));
                    if mid.shape != [rows, groups] || half.shape != [rows, groups] {
                        return Err(format!(
                            "planes grid has shapes {:?} and {:?}, expected [{rows}, {groups}]",
                            mid.shape, half.shape
                        ));
                    }
                    Arc::new(
                        PlaneGrid::new(rows, cols, group, halves(mid.bytes), halves(half.bytes))
                            .map_err(|e| e.to_string())?,
                    )
                } else {
                    match earlier.last().map(|b| b.as_ref()) {
                        Some(Block::Plane(prev))
                            if prev.plane() + 1 == plane && prev.grid().group() == group =>
                        {
                            prev.grid().clone()
                        }
                        _ => {
                            return Err(format!(
                                "plane {plane} does not follow plane {} of the same grid",
                                plane - 1
                            ))
                        }
                    }
                };
                PlaneBlock::new(grid, plane, signs)
                    .map(Block::Plane)
                    .map_err(|e| e.to_string())
            }
            "avd" => {
                let k = params
                    .get("k")
                    .copied()
                    .filter(|&k| k > 0)
                    .ok_or("avd block without a positive parameter k")?
                    as usize;
                let signs = find("signs", "U8", kind)?;
                let u = find("u", "F16", kind)?;
                let v = find("v", "F16", kind)?;
                if u.shape != [rows, k] || v.shape != [k, cols] {
                    return Err(format!(
                        "avd factors have shapes {:?} and {:?}, expected [{rows}, {k}] and [{k}, {cols}]",
                        u.shape, v.shape
                    ));
                }
                // Strips where the width allows: the 8-bit decode kernel reads them as
                // contiguous runs (see `SignLayout::Strips`); same bytes, same memory.
                let layout = if cols.is_multiple_of(STRIP_COLS) {
                    SignLayout::Strips
                } else {
                    SignLayout::RowMajor
                };
                let signs = SignMatrix::from_packed_in(signs.bytes, rows, cols, layout)
                    .map_err(|e| e.to_string())?;
                AvdBlock::from_parts(signs, halves(u.bytes), halves(v.bytes), k)
                    .map(Block::Avd)
                    .map_err(|e| e.to_string())
            }
            other => Err(format!(
                "unknown block kind {other:?} (this runtime knows \"avd\" and \"planes\"; upgrade bitstack)"
            )),
        }
    }

    /// Bytes this block occupies in memory (equal to its accounted size).
    pub fn byte_size(&self) -> u64 {
        match self {
            Block::Avd(b) => AvdBlock::byte_size(b.rows(), b.cols(), b.k()),
            Block::Plane(b) => b.stored_bytes(),
        }
    }

    /// `w += Δ` for a dense row-major `rows × cols` matrix.
    pub fn add_to_dense(&self, w: &mut [f32]) {
        match self {
            Block::Avd(b) => b.add_to_dense(w),
            Block::Plane(b) => b.add_to_dense(w),
        }
    }

    /// `tile += rows row0.. of Δ` (a row-major tile of whole rows).
    pub fn add_rows_to_dense(&self, row0: usize, tile: &mut [f32]) {
        match self {
            Block::Avd(b) => b.add_rows_to_dense(row0, tile),
            Block::Plane(b) => b.add_rows_to_dense(row0, tile),
        }
    }

    /// `y += Δ x`, computed from the packed representation.
    pub fn matvec_add(&self, x: &[f32], y: &mut [f32]) {
        match self {
            Block::Avd(b) => b.matvec_add(x, y),
            Block::Plane(b) => b.matvec_add(x, y),
        }
    }
}

/// `tile += rows row0.. of Σ Δ` over `blocks` (the blocks of one matrix): AVD blocks one at
/// a time, the planes together as integer codes ([`bitstack_decompose::planes_rows_to_dense`]:
/// each weight written once, not once per plane).
pub(crate) fn blocks_rows_to_dense(blocks: &[Arc<Block>], row0: usize, tile: &mut [f32]) {
    let mut planes = Vec::new();
    for block in blocks {
        match block.as_ref() {
            Block::Avd(b) => b.add_rows_to_dense(row0, tile),
            Block::Plane(p) => planes.push(p),
        }
    }
    bitstack_decompose::planes_rows_to_dense(&planes, row0, tile);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn params(group: i64, plane: i64) -> BTreeMap<String, i64> {
        BTreeMap::from([("group".into(), group), ("plane".into(), plane)])
    }

    #[test]
    fn plane_decoding_needs_its_grid_and_chain() {
        let (rows, cols) = (2usize, 16usize);
        let signs = [0b1010_1010u8; 4];
        let halves: Vec<u8> = [1.0f32, 0.5, 2.0, 0.25]
            .iter()
            .flat_map(|v| f16::from_f32(*v).to_le_bytes())
            .collect();
        let part = |name, dtype, shape: &'static [usize], bytes| Part {
            name,
            dtype,
            shape,
            bytes,
        };
        let first = [
            part("signs", "U8", &[4], &signs[..]),
            part("mid", "F16", &[2, 2], &halves[..]),
            part("half", "F16", &[2, 2], &halves[..]),
        ];
        let b0 = Block::decode("planes", &params(8, 0), rows, cols, &first, &[]).unwrap();
        let only_signs = [part("signs", "U8", &[4], &signs[..])];
        // Plane 1 without plane 0 before it, or after a plane of another group: refused.
        let e = Block::decode("planes", &params(8, 1), rows, cols, &only_signs, &[]).unwrap_err();
        assert!(e.contains("does not follow plane 0"), "{e}");
        let b0 = Arc::new(b0);
        let e = Block::decode(
            "planes",
            &params(16, 1),
            rows,
            cols,
            &only_signs,
            std::slice::from_ref(&b0),
        )
        .unwrap_err();
        assert!(e.contains("does not follow"), "{e}");
        // A second grid in the same matrix (found by fuzzing: its products took the first
        // grid's table of `x`, of another group, and panicked): refused.
        for group in [8, 16] {
            let e = Block::decode(
                "planes",
                &params(group, 0),
                rows,
                cols,
                &first,
                std::slice::from_ref(&b0),
            )
            .unwrap_err();
            assert!(e.contains("a second plane 0"), "{e}");
        }
        let b1 = Block::decode(
            "planes",
            &params(8, 1),
            rows,
            cols,
            &only_signs,
            std::slice::from_ref(&b0),
        )
        .unwrap();
        // Plane 0 adds mid + half/2·S, plane 1 adds half/4·S (mid and half share the
        // values here: 1.0 and 0.5 for row 0's two groups).
        let mut w = vec![0.0f32; rows * cols];
        b0.add_to_dense(&mut w);
        b1.add_to_dense(&mut w);
        assert_eq!(w[0], 1.0 + 1.0 * 0.5 + 1.0 * 0.25); // bit 1: +
        assert_eq!(w[1], 1.0 - 1.0 * 0.5 - 1.0 * 0.25); // bit 0: −
        assert_eq!(w[8], 0.5 + 0.5 * 0.5 + 0.5 * 0.25); // second group of row 0
                                                        // A plane 0 without its grid, or with a wrong grid shape.
        let e = Block::decode("planes", &params(8, 0), rows, cols, &only_signs, &[]).unwrap_err();
        assert!(e.contains("mid"), "{e}");
        let wrong = [
            part("signs", "U8", &[4], &signs[..]),
            part("mid", "F16", &[4], &halves[..]),
            part("half", "F16", &[4], &halves[..]),
        ];
        let e = Block::decode("planes", &params(8, 0), rows, cols, &wrong, &[]).unwrap_err();
        assert!(e.contains("expected [2, 2]"), "{e}");
        let e = Block::decode("planes", &params(12, 0), rows, cols, &first, &[]).unwrap_err();
        assert!(
            e.contains("expected [2, 2]") || e.contains("group size"),
            "{e}"
        );
    }
}
