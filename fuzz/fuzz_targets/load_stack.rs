//! Fuzzes the runtime on containers whose blocks are well-formed for the format (valid
//! checksums) but arbitrary for the runtime: AVD and bit-plane blocks (and unknown kinds)
//! with any `k`, group and plane number, part shapes right or off by one, factor and grid
//! values from the input (NaN and infinities included), stacks in any order and any
//! mandatory prefix. Whatever opens and loads is then multiplied (one token, a few, and a
//! tile-rebuilding batch, with every decode-table choice), resized, reconstructed.
#![no_main]

use std::collections::BTreeMap;
use std::sync::Arc;

use bitstack_format::{Container, ContainerWriter, Dtype, PartData};
use bitstack_runtime::{DecodeTables, LoadedStack, StackFile};
use libfuzzer_sys::fuzz_target;

mod common;
use common::Input;

fn part(d: &mut Input<'_>, name: &str, dtype: Dtype, mut shape: Vec<usize>) -> PartData {
    // One part in eight gets a wrong shape (one more in the last dimension).
    if d.byte().is_multiple_of(8) {
        if let Some(last) = shape.last_mut() {
            *last += 1;
        }
    }
    let len = dtype.byte_len(&shape).unwrap_or(0).min(1 << 20);
    PartData::new(name, dtype, shape, d.bytes(len, |_| 0))
}

fuzz_target!(|data: &[u8]| {
    let mut d = Input(data);
    let mut writer = ContainerWriter::new(BTreeMap::new());
    let matrices = 1 + d.byte() as usize % 2;
    let mut shapes = Vec::new();
    for m in 0..matrices {
        let rows = 1 + d.byte() as usize % 40;
        let cols = match d.byte() % 4 {
            0 => 256,
            1 => 512,
            _ => 1 + d.byte() as usize % 80,
        };
        if writer
            .add_matrix(format!("m{m}"), rows, cols, "F32")
            .is_err()
        {
            return;
        }
        shapes.push((rows, cols));
    }
    let blocks = d.byte() as usize % 7;
    let mut next = vec![0usize; matrices];
    for _ in 0..blocks {
        let m = d.byte() as usize % matrices;
        let (rows, cols) = shapes[m];
        let signs = rows * cols.div_ceil(8);
        let (kind, params, parts) = match d.byte() % 5 {
            0..=2 => {
                let k = d.byte() as i64 % 5;
                let ku = k.max(0) as usize;
                let parts = vec![
                    part(&mut d, "signs", Dtype::U8, vec![signs]),
                    part(&mut d, "u", Dtype::F16, vec![rows, ku]),
                    part(&mut d, "v", Dtype::F16, vec![ku, cols]),
                ];
                ("avd", BTreeMap::from([("k".to_string(), k)]), parts)
            }
            3 => {
                let group = [0i64, 1, 7, 64, 128][d.byte() as usize % 5];
                let plane = d.byte() as i64 % 3;
                let groups = cols.div_ceil(group.max(1) as usize);
                let mut parts = vec![part(&mut d, "signs", Dtype::U8, vec![signs])];
                if plane == 0 {
                    parts.push(part(&mut d, "mid", Dtype::F16, vec![rows, groups]));
                    parts.push(part(&mut d, "half", Dtype::F16, vec![rows, groups]));
                }
                let params =
                    BTreeMap::from([("group".to_string(), group), ("plane".to_string(), plane)]);
                ("planes", params, parts)
            }
            _ => (
                "other",
                BTreeMap::new(),
                vec![part(&mut d, "signs", Dtype::U8, vec![signs])],
            ),
        };
        if writer.push_block(m, next[m], kind, params, parts).is_err() {
            return;
        }
        next[m] += 1;
    }
    writer.set_mandatory_blocks(d.byte() as usize % (blocks + 1));
    let Ok(bytes) = writer.to_bytes() else {
        return;
    };
    let Ok(container) = Container::from_bytes(bytes) else {
        return;
    };
    let Ok(file) = StackFile::from_container(container) else {
        return;
    };
    let file = Arc::new(file);
    let max = file.layout().max_memory();
    let budget = match d.byte() % 3 {
        0 => max,
        1 => max / 2,
        _ => 0,
    };
    let Ok(stack) = LoadedStack::load(file.clone(), budget) else {
        return;
    };
    for tables in [
        DecodeTables::default(),
        DecodeTables::F32,
        DecodeTables::Int8Tiles,
    ] {
        stack.set_decode_tables(tables);
        for m in 0..file.matrix_count() {
            let (rows, cols) = file.shape(m);
            let x: Vec<f32> = (0..cols).map(|i| (i % 7) as f32 - 3.0).collect();
            let mut y = vec![0.0f32; rows];
            stack.matvec(m, &x, &mut y);
            for tokens in [2, 40] {
                let xb: Vec<f32> = (0..tokens * cols).map(|i| (i % 5) as f32 - 2.0).collect();
                let mut yb = vec![0.0f32; tokens * rows];
                stack.matmul(m, &xb, tokens, &mut yb);
            }
            let _ = stack.reconstruct_f32(m);
        }
    }
    let _ = stack.resize(max);
    let _ = stack.resize(0);
});
