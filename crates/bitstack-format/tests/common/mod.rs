//! Shared helpers for the integration tests.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;

use bitstack_format::{ContainerWriter, Dtype, PartData};

/// Deterministic pseudo-random bytes.
pub fn bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15).wrapping_add(1);
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 24) as u8
        })
        .collect()
}

/// An AVD-shaped block of an `m×n` matrix with rank `k`.
pub fn avd_parts(seed: u64, m: usize, n: usize, k: usize) -> Vec<PartData> {
    vec![
        PartData::new(
            "signs",
            Dtype::U8,
            vec![(m * n).div_ceil(8)],
            bytes(seed, (m * n).div_ceil(8)),
        ),
        PartData::new("u", Dtype::F16, vec![m, k], bytes(seed + 1, 2 * m * k)),
        PartData::new("v", Dtype::F16, vec![k, n], bytes(seed + 2, 2 * k * n)),
    ]
}

/// A small model: 2 aux files, 3 fixed tensors, 3 matrices with 3 blocks each, interleaved
/// in a stack order; 3 mandatory blocks.
pub fn sample_writer() -> ContainerWriter {
    let mut w = ContainerWriter::new(BTreeMap::from([
        (
            "architecture".to_owned(),
            serde_json::json!("LlamaForCausalLM"),
        ),
        (
            "compress".to_owned(),
            serde_json::json!({"k": 2, "niter": 3}),
        ),
    ]));
    w.add_aux_file(
        "config.json",
        br#"{"hidden_size": 8, "vocab_size": 16}"#.to_vec(),
    )
    .unwrap();
    w.add_aux_file("tokenizer.json", bytes(7, 40)).unwrap();
    w.add_fixed(
        "model.embed_tokens.weight",
        Dtype::F16,
        vec![16, 8],
        bytes(1, 256),
        "BF16",
    )
    .unwrap();
    w.add_fixed(
        "model.norm.weight",
        Dtype::F32,
        vec![8],
        bytes(2, 32),
        "F32",
    )
    .unwrap();
    w.add_fixed("lm_head.bias", Dtype::BF16, vec![3], bytes(3, 6), "BF16")
        .unwrap();
    let shapes = [(8usize, 8usize), (4, 8), (8, 4)];
    let names = [
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.0.mlp.up_proj.weight",
        "model.layers.0.mlp.down_proj.weight",
    ];
    for (name, (m, n)) in names.iter().zip(shapes) {
        w.add_matrix(*name, m, n, "BF16").unwrap();
    }
    let order = [
        (0, 0),
        (1, 0),
        (2, 0),
        (1, 1),
        (0, 1),
        (2, 1),
        (2, 2),
        (0, 2),
        (1, 2),
    ];
    for (p, (mat, idx)) in order.into_iter().enumerate() {
        let (m, n) = shapes[mat];
        w.push_block(
            mat,
            idx,
            "avd",
            BTreeMap::from([("k".to_owned(), 2)]),
            avd_parts(100 + 10 * p as u64, m, n, 2),
        )
        .unwrap();
    }
    w.set_mandatory_blocks(3);
    w
}
