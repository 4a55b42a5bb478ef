//! Runtime behaviour on small containers built from real decompositions.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use bitstack_decompose::{decompose, AvdParams, SvdMethod};
use bitstack_format::{ContainerWriter, Dtype, PartData};
use bitstack_runtime::{DecodeTables, LoadedStack, RuntimeError, StackFile};
use half::f16;

/// Deterministic pseudo-random matrix with a decaying spectrum-ish structure.
fn matrix(rows: usize, cols: usize, seed: u64) -> Vec<f32> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state >> 11) as f32 / (1u64 << 53) as f32 - 0.5
    };
    let row_scale: Vec<f32> = (0..rows).map(|i| 1.0 + (i % 7) as f32 * 0.3).collect();
    let col_scale: Vec<f32> = (0..cols).map(|j| 0.5 + (j % 5) as f32 * 0.4).collect();
    let mut w = vec![0.0; rows * cols];
    for i in 0..rows {
        for j in 0..cols {
            w[i * cols + j] = next() * row_scale[i] * col_scale[j];
        }
    }
    w
}

struct Built {
    originals: Vec<Vec<f32>>,
    shapes: Vec<(usize, usize)>,
}

/// Writes a container with two matrices (4 blocks each), a fixed tensor and an aux file;
/// stack: base blocks, then alternating.
fn build(path: &Path) -> Built {
    let shapes = vec![(24usize, 40usize), (16, 24)];
    let params = AvdParams {
        k: 2,
        niter: 4,
        svd: SvdMethod::Exact,
        seed: 1,
    };
    let mut writer = ContainerWriter::new(BTreeMap::new());
    writer
        .add_aux_file("config.json", b"{\"x\": 1}".to_vec())
        .unwrap();
    let norm: Vec<u8> = (0..8)
        .flat_map(|i| f16::from_f32(i as f32 * 0.5).to_le_bytes())
        .collect();
    writer
        .add_fixed("model.norm.weight", Dtype::F16, vec![8], norm, "F16")
        .unwrap();
    let mut originals = Vec::new();
    let mut blocks = Vec::new();
    for (m, &(rows, cols)) in shapes.iter().enumerate() {
        writer
            .add_matrix(format!("layer.{m}.weight"), rows, cols, "F16")
            .unwrap();
        let w = matrix(rows, cols, m as u64 + 7);
        let d = decompose(&w, rows, cols, &params, None).unwrap();
        originals.push(w);
        blocks.push(d.blocks);
    }
    let order = [
        (0, 0),
        (1, 0),
        (1, 1),
        (0, 1),
        (0, 2),
        (1, 2),
        (1, 3),
        (0, 3),
    ];
    for &(m, b) in &order {
        let block = &blocks[m][b];
        let (rows, cols) = shapes[m];
        let halves = |h: &[f16]| h.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
        writer
            .push_block(
                m,
                b,
                "avd",
                BTreeMap::from([("k".to_string(), 2)]),
                vec![
                    PartData::new(
                        "signs",
                        Dtype::U8,
                        vec![block.signs().as_bytes().len()],
                        block.signs().as_bytes().to_vec(),
                    ),
                    PartData::new("u", Dtype::F16, vec![rows, 2], halves(block.u())),
                    PartData::new("v", Dtype::F16, vec![2, cols], halves(block.v())),
                ],
            )
            .unwrap();
    }
    writer.set_mandatory_blocks(2);
    writer.write_atomic(path).unwrap();
    Built { originals, shapes }
}

fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    let num: f64 = a.iter().zip(b).map(|(x, y)| f64::from(x - y).powi(2)).sum();
    let den: f64 = a.iter().map(|x| f64::from(*x).powi(2)).sum();
    (num / den).sqrt()
}

#[test]
fn load_resize_and_counters() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.bitstack");
    build(&path);
    let file = Arc::new(StackFile::open(&path).unwrap());
    let layout = file.layout().clone();
    assert_eq!(layout.fixed_bytes(), 16);
    let min = layout.min_memory();
    let err = LoadedStack::load(file.clone(), min - 1).unwrap_err();
    assert!(matches!(err, RuntimeError::Order(_)), "{err}");
    assert!(err.to_string().contains(&min.to_string()), "{err}");

    let stack = LoadedStack::load(file.clone(), min).unwrap();
    assert_eq!(stack.resident_bytes(), min);
    assert_eq!(stack.plan().per_matrix, vec![1, 1]);
    // Grow to 5 blocks: reads exactly the 3 missing blocks.
    let a = layout.memory_of_prefix(5);
    let r = stack.resize(a).unwrap();
    assert_eq!(r.plan.per_matrix, vec![3, 2]);
    assert_eq!(r.bytes_read, a - min);
    assert_eq!(stack.resident_bytes(), a);
    // A -> B -> A moves |B - A| both ways.
    let b = layout.max_memory();
    let before = stack.counters();
    let up = stack.resize(b).unwrap();
    let down = stack.resize(a).unwrap();
    assert_eq!(up.bytes_read, b - a);
    assert_eq!(down.bytes_freed, b - a);
    let after = stack.counters();
    assert_eq!(after.bytes_read - before.bytes_read, b - a);
    assert_eq!(after.bytes_freed - before.bytes_freed, b - a);
    assert_eq!(stack.resident_bytes(), a);
    assert_eq!(after.resident_block_bytes + after.fixed_bytes, a);
}

#[test]
fn reconstruction_and_products_agree() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.bitstack");
    let built = build(&path);
    let file = Arc::new(StackFile::open(&path).unwrap());
    let stack = LoadedStack::load(file.clone(), u64::MAX).unwrap();
    let mut previous = f64::INFINITY;
    for budget_blocks in [2usize, 4, 8] {
        stack
            .resize(file.layout().memory_of_prefix(budget_blocks))
            .unwrap();
        let e = rel_err(&built.originals[0], &stack.reconstruct_f32(0));
        assert!(
            e < previous,
            "error must fall as blocks are added: {e} vs {previous}"
        );
        previous = e;
    }
    for (m, &(rows, cols)) in built.shapes.iter().enumerate() {
        let w = stack.reconstruct_f32(m);
        let tokens = 3;
        let x: Vec<f32> = (0..tokens * cols)
            .map(|i| ((i * 37) % 11) as f32 - 5.0)
            .collect();
        // Oracle: naive dense product.
        let mut want = vec![0.0f32; tokens * rows];
        for t in 0..tokens {
            for r in 0..rows {
                want[t * rows + r] = (0..cols).map(|c| w[r * cols + c] * x[t * cols + c]).sum();
            }
        }
        // The exact decode tables (the 8-bit ones are checked against their bound in
        // `matvec_matches_dense_reconstruction`).
        stack.set_decode_tables(DecodeTables::F32);
        let mut y = vec![0.0; rows];
        stack.matvec(m, &x[..cols], &mut y);
        stack.set_decode_tables(DecodeTables::default());
        let mut yb = vec![0.0; tokens * rows];
        stack.matmul(m, &x, tokens, &mut yb);
        let scale = want.iter().fold(0.0f32, |a, v| a.max(v.abs()));
        for r in 0..rows {
            assert!((y[r] - want[r]).abs() <= 1e-4 * scale, "matvec row {r}");
        }
        for i in 0..tokens * rows {
            assert!((yb[i] - want[i]).abs() <= 1e-4 * scale, "matmul {i}");
        }
        // Tiled batch products: every tile size, including ones that do not divide rows.
        for tile in [1, 3, 5, 7, rows - 1, rows, rows + 9] {
            let mut yt = vec![f32::NAN; tokens * rows];
            stack.matmul_tiled(m, &x, tokens, &mut yt, tile);
            for i in 0..tokens * rows {
                assert!(
                    (yt[i] - want[i]).abs() <= 1e-4 * scale,
                    "matmul tile {tile}, {i}: {} vs {}",
                    yt[i],
                    want[i]
                );
            }
        }
    }
}

#[test]
fn truncated_file_loads_complete_prefix() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.bitstack");
    build(&path);
    let full = std::fs::read(&path).unwrap();
    let file = StackFile::open(&path).unwrap();
    let complete = file.layout().clone();
    // Cut the file in the middle of the 6th block.
    let cut_at = full.len() - (complete.max_memory() - complete.memory_of_prefix(5)) as usize + 3;
    let short = dir.path().join("short.bitstack");
    std::fs::write(&short, &full[..cut_at]).unwrap();
    let file = Arc::new(StackFile::open(&short).unwrap());
    assert!(file.is_truncated());
    assert_eq!(file.layout().order().len(), 5);
    let stack = LoadedStack::load(file.clone(), u64::MAX).unwrap();
    assert_eq!(stack.plan().blocks_loaded, 5);
    let err = stack.resize(complete.max_memory()).unwrap_err();
    match err {
        RuntimeError::BeyondAvailable { missing_bytes, .. } => {
            assert_eq!(
                missing_bytes,
                complete.max_memory() - complete.memory_of_prefix(5)
            )
        }
        other => panic!("unexpected {other}"),
    }
    assert!(LoadedStack::load_exact(file, complete.max_memory()).is_err());
}

#[test]
fn corrupted_block_is_detected_on_load() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.bitstack");
    build(&path);
    let mut bytes = std::fs::read(&path).unwrap();
    let n = bytes.len();
    bytes[n - 5] ^= 0x40; // inside the last block
    std::fs::write(&path, &bytes).unwrap();
    let file = Arc::new(StackFile::open(&path).unwrap());
    let min = file.layout().min_memory();
    let stack = LoadedStack::load(file.clone(), min).unwrap();
    let err = stack.resize(u64::MAX).unwrap_err();
    assert!(err.to_string().contains("checksum"), "{err}");
    // Nothing changed after the failed resize.
    assert_eq!(stack.resident_bytes(), min);
}

#[test]
fn export_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.bitstack");
    build(&path);
    let file = Arc::new(StackFile::open(&path).unwrap());
    let stack = LoadedStack::load(file.clone(), u64::MAX).unwrap();
    let out = dir.path().join("export");
    stack.export_hf(&out).unwrap();
    assert_eq!(
        std::fs::read(out.join("config.json")).unwrap(),
        b"{\"x\": 1}"
    );
    let bytes = std::fs::read(out.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    for m in 0..2 {
        let t = st.tensor(&format!("layer.{m}.weight")).unwrap();
        assert_eq!(t.dtype(), safetensors::Dtype::F16);
        let got: Vec<f32> = t
            .data()
            .chunks_exact(2)
            .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect();
        let want: Vec<f32> = stack
            .reconstruct_f32(m)
            .iter()
            .map(|&v| f16::from_f32(v).to_f32())
            .collect();
        assert_eq!(got, want);
    }
    let norm = st.tensor("model.norm.weight").unwrap();
    assert_eq!(norm.shape(), &[8]);
    // The streamed header is padded to 8 bytes and every tensor starts at a multiple of
    // its element size in the file (as `safetensors::serialize` lays them out).
    let header = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    assert_eq!(header % 8, 0);
    for (name, view) in st.tensors() {
        let start = view.data().as_ptr() as usize - bytes.as_ptr() as usize;
        assert!(start >= 8 + header);
        assert_eq!(start % (view.dtype().bitsize() / 8), 0, "{name} at {start}");
    }
}

/// A forward thread and a resizing thread: every read of a matrix sees it entirely before
/// or entirely after a change (never a partly applied block list), and the counters add up.
#[test]
fn resize_while_reading_never_tears() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.bitstack");
    let built = build(&path);
    let file = Arc::new(StackFile::open(&path).unwrap());
    let layout = file.layout().clone();
    // Plans [1, 1], [3, 2], [4, 4]: a torn update of matrix 0 would show 2 blocks.
    let budgets = [
        layout.min_memory(),
        layout.memory_of_prefix(5),
        layout.max_memory(),
    ];
    let valid: Vec<Vec<Vec<f32>>> = (0..built.shapes.len())
        .map(|m| {
            budgets
                .iter()
                .map(|&b| {
                    LoadedStack::load(file.clone(), b)
                        .unwrap()
                        .reconstruct_f32(m)
                })
                .collect()
        })
        .collect();
    let stack = Arc::new(LoadedStack::load(file.clone(), budgets[0]).unwrap());
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reader = {
        let (stack, stop) = (stack.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut reads = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) || reads < 100 {
                for (m, states) in valid.iter().enumerate() {
                    let w = stack.reconstruct_f32(m);
                    assert!(
                        states.contains(&w),
                        "matrix {m} read in a state no plan has (torn update)"
                    );
                    reads += 1;
                }
            }
            reads
        })
    };
    let mut moved = 0;
    for i in 0..300 {
        let r = stack.resize(budgets[i % 3]).unwrap();
        moved += r.bytes_read;
        assert_eq!(stack.resident_bytes(), r.plan.memory_bytes);
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let reads = reader.join().unwrap();
    assert!(reads >= 100);
    let c = stack.counters();
    let initial = budgets[0] - layout.fixed_bytes();
    assert_eq!(c.bytes_read, initial + moved);
    // 100 cycles min → a → max → min: each reads exactly max − min.
    assert_eq!(moved, 100 * (budgets[2] - budgets[0]));
    assert_eq!(
        c.bytes_read - c.bytes_freed,
        c.resident_block_bytes,
        "read − freed = resident"
    );
}

/// A one-matrix stack of `blocks` random AVD blocks (signs, `u`, `v` drawn at random, rank
/// `k`), loaded whole, with those blocks.
fn random_stack(
    rows: usize,
    cols: usize,
    k: usize,
    blocks: usize,
    seed: u64,
) -> (LoadedStack, Vec<bitstack_decompose::AvdBlock>) {
    let mut writer = ContainerWriter::new(BTreeMap::new());
    writer.add_matrix("w", rows, cols, "F32").unwrap();
    let halves = |h: &[f16]| h.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
    let mut made = Vec::new();
    for b in 0..blocks {
        let s = seed.wrapping_add(b as u64 * 101);
        let signs =
            bitstack_bits::SignMatrix::from_signs_of(&matrix(rows, cols, s), rows, cols).unwrap();
        let u: Vec<f16> = matrix(rows, k, s ^ 1)
            .into_iter()
            .map(f16::from_f32)
            .collect();
        let v: Vec<f16> = matrix(k, cols, s ^ 2)
            .into_iter()
            .map(f16::from_f32)
            .collect();
        writer
            .push_block(
                0,
                b,
                "avd",
                BTreeMap::from([("k".to_string(), k as i64)]),
                vec![
                    PartData::new(
                        "signs",
                        Dtype::U8,
                        vec![signs.as_bytes().len()],
                        signs.as_bytes().to_vec(),
                    ),
                    PartData::new("u", Dtype::F16, vec![rows, k], halves(&u)),
                    PartData::new("v", Dtype::F16, vec![k, cols], halves(&v)),
                ],
            )
            .unwrap();
        made.push(bitstack_decompose::AvdBlock::from_parts(signs, u, v, k).unwrap());
    }
    writer.set_mandatory_blocks(1);
    let container = bitstack_format::Container::from_bytes(writer.to_bytes().unwrap()).unwrap();
    let file = Arc::new(StackFile::from_container(container).unwrap());
    (LoadedStack::load(file, u64::MAX).unwrap(), made)
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(48))]

    /// The decode product over all blocks agrees with the dense reconstruction times `x`:
    /// with f32 tables `|matvec - Ŵx| <= 1e-5 · max(1, Σ_b Σ_c Σ_j |u_rj v_jc x_c|)` per row;
    /// with 8-bit tables (the default) within their rounding bound
    /// (`bitstack_bits::lowrank_q8_error_bounds`) plus that. Random shapes (columns rarely a
    /// multiple of 8 or 64), `k` from 1 to 32, 1 to 16 blocks.
    #[test]
    fn matvec_matches_dense_reconstruction(
        rows in 1usize..70,
        // Widths of whole 256-column strips too: the runtime keeps those blocks' signs in
        // strips (`SignLayout::Strips`); the others row-major.
        cols in proptest::prop_oneof![1usize..200, proptest::prelude::Just(256), proptest::prelude::Just(512)],
        k in 1usize..=32,
        blocks in 1usize..=16,
        seed in proptest::prelude::any::<u64>(),
    ) {
        let (stack, made) = random_stack(rows, cols, k, blocks, seed);
        let x: Vec<f32> = matrix(1, cols, seed ^ 5).iter().map(|v| 8.0 * v).collect();
        let w = stack.reconstruct_f32(0);
        let mut y = vec![f32::NAN; rows];
        stack.set_decode_tables(DecodeTables::F32);
        proptest::prop_assert_eq!(stack.decode_tables(), DecodeTables::F32);
        stack.matvec(0, &x, &mut y);
        let mut y8 = vec![f32::NAN; rows];
        stack.set_decode_tables(DecodeTables::Int8Tiles);
        proptest::prop_assert_eq!(stack.decode_tables(), DecodeTables::Int8Tiles);
        stack.matvec(0, &x, &mut y8);
        let mut yt = vec![f32::NAN; rows];
        stack.set_decode_tables(DecodeTables::Int8);
        proptest::prop_assert_eq!(stack.decode_tables(), DecodeTables::Int8);
        stack.matvec(0, &x, &mut yt);
        let refs: Vec<_> = made.iter().map(|b| b.as_lowrank()).collect();
        // The loaded blocks (strips where the width allows) rebuild and multiply exactly as
        // the row-major blocks they were written from.
        let mut dense = vec![0.0f32; rows * cols];
        for b in &made {
            b.add_to_dense(&mut dense);
        }
        proptest::prop_assert_eq!(&w, &dense);
        if bitstack_bits::lowrank_q8_vectorized(bitstack_bits::Simd::Auto) {
            let mut direct = vec![0.0f32; rows];
            bitstack_bits::lowrank_matvec_add_q8(
                &refs,
                &x,
                &mut direct,
                bitstack_bits::Parallelism::Auto,
                bitstack_bits::Simd::Auto,
            );
            proptest::prop_assert_eq!(&yt, &direct);
        }
        // `Int8Tiles` runs the tile kernel where AMX is present (whole bytes of signs per
        // row, k ≥ 8), else the 8-bit tables.
        let tiles = cols % 8 == 0
            && k >= 8
            && bitstack_bits::lowrank_i8_accelerated(bitstack_bits::Simd::Auto);
        let bounds = if tiles {
            bitstack_bits::lowrank_i8_error_bounds(&refs, &x)
        } else {
            bitstack_bits::lowrank_q8_error_bounds(&refs, &x)
        };
        let table_bounds = bitstack_bits::lowrank_q8_error_bounds(&refs, &x);
        for r in 0..rows {
            let want: f32 = (0..cols).map(|c| w[r * cols + c] * x[c]).sum();
            let scale: f32 = made
                .iter()
                .map(|b| {
                    (0..cols)
                        .map(|c| {
                            (0..k)
                                .map(|j| {
                                    (b.u()[r * k + j].to_f32() * b.v()[j * cols + c].to_f32() * x[c])
                                        .abs()
                                })
                                .sum::<f32>()
                        })
                        .sum::<f32>()
                })
                .sum();
            let tol = 1e-5 * scale.max(1.0);
            proptest::prop_assert!(
                (y[r] - want).abs() <= tol,
                "{rows}x{cols} k={k} {blocks} blocks, row {r}: {} vs {want} (tol {tol})",
                y[r]
            );
            let tol8 = bounds[r] as f32 + tol;
            proptest::prop_assert!(
                (y8[r] - want).abs() <= tol8,
                "8-bit tiles (AMX: {tiles}), {rows}x{cols} k={k} {blocks} blocks, row {r}: \
                 {} vs {want} (tol {tol8})",
                y8[r]
            );
            let tolt = table_bounds[r] as f32 + tol;
            proptest::prop_assert!(
                (yt[r] - want).abs() <= tolt,
                "8-bit tables, {rows}x{cols} k={k} {blocks} blocks, row {r}: {} vs {want} \
                 (tol {tolt})",
                yt[r]
            );
        }
    }
}
