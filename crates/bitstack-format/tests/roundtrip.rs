//! Write → read round trips, including a property test over random containers.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;

use bitstack_format::{
    Container, ContainerWriter, Dtype, FormatError, PartData, Spool, TensorSpec,
};
use proptest::prelude::*;

#[test]
fn round_trip_sample() {
    let writer = common::sample_writer();
    let bytes = writer.to_bytes().unwrap();
    let c = Container::from_bytes(bytes.clone()).unwrap();
    assert!(c.is_complete());
    assert_eq!(c.file_len(), bytes.len() as u64);
    assert_eq!(c.complete_file_len(), bytes.len() as u64);
    assert_eq!(c.usable_bytes(), bytes.len() as u64);
    assert_eq!(c.missing_bytes(), 0);
    assert_eq!(c.total_blocks(), 9);
    assert_eq!(c.available_blocks(), 9);
    assert_eq!(c.mandatory_blocks(), 3);
    assert!(c.base_available());
    assert_eq!(c.data_start() % 8, 0, "header padded to 8 bytes");
    assert_eq!(*c.manifest(), writer.manifest().unwrap());
    assert_eq!(
        c.manifest().metadata["compress"],
        serde_json::json!({"k": 2, "niter": 3})
    );
    assert_eq!(
        c.aux_file("config.json").unwrap(),
        br#"{"hidden_size": 8, "vocab_size": 16}"#
    );
    assert_eq!(c.aux_file("tokenizer.json").unwrap(), common::bytes(7, 40));
    assert_eq!(c.aux_file("nope"), None);
    assert_eq!(
        c.aux_file_names().collect::<Vec<_>>(),
        ["config.json", "tokenizer.json"]
    );
    let emb = c.fixed("model.embed_tokens.weight").unwrap();
    assert_eq!(
        (emb.dtype, emb.shape, emb.numel()),
        (Dtype::F16, &[16, 8][..], 128)
    );
    assert_eq!(emb.bytes, common::bytes(1, 256));
    assert_eq!(c.fixed("lm_head.bias").unwrap().bytes, common::bytes(3, 6));
    assert_eq!(c.fixed_tensors().count(), 3);
    assert!(c.fixed("missing").is_none());
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
    let shapes = [(8usize, 8usize), (4, 8), (8, 4)];
    for (p, (mat, idx)) in order.into_iter().enumerate() {
        let b = c.block(p).unwrap();
        assert_eq!(
            (b.position(), b.matrix_index(), b.index_in_matrix()),
            (p, mat, idx)
        );
        assert_eq!(b.kind(), "avd");
        assert_eq!(b.param("k"), Some(2));
        assert_eq!(b.matrix().name, c.matrix(mat).unwrap().name);
        let (m, n) = shapes[mat];
        let expected = common::avd_parts(100 + 10 * p as u64, m, n, 2);
        let got: Vec<_> = b.parts().collect();
        assert_eq!(got.len(), 3);
        for (part, (name, t)) in expected.iter().zip(got) {
            assert_eq!(name, part.name);
            assert_eq!(t.dtype, part.dtype);
            assert_eq!(t.shape, part.shape.as_slice());
            assert_eq!(t.bytes, part.bytes.as_slice());
            assert_eq!(b.part(name).unwrap(), t);
        }
        assert!(b.part("w").is_none());
        assert_eq!(b.bytes().len() as u64, b.entry().length);
    }
    assert!(matches!(
        c.block(9),
        Err(FormatError::NoSuchBlock {
            position: 9,
            total: 9,
            ..
        })
    ));
    c.verify_all().unwrap();
}

#[test]
fn file_round_trip_and_overwrite() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.bitstack");
    let writer = common::sample_writer();
    let n = writer.write_atomic(&path).unwrap();
    assert_eq!(std::fs::metadata(&path).unwrap().len(), n);
    let c = Container::open(&path).unwrap();
    assert_eq!(c.name(), path.display().to_string());
    c.verify_all().unwrap();
    // Overwrite while the old one is still mapped: the old map keeps its bytes.
    let mut small = ContainerWriter::new(BTreeMap::new());
    small.add_aux_file("a", vec![1, 2, 3]).unwrap();
    small.write_atomic(&path).unwrap();
    c.verify_all().unwrap();
    let d = Container::open(&path).unwrap();
    assert_eq!(d.total_blocks(), 0);
    assert_eq!(d.aux_file("a").unwrap(), [1, 2, 3]);
    // Only the container is in the directory (no temporary files left).
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, ["model.bitstack"]);
}

#[test]
fn empty_container() {
    let bytes = ContainerWriter::new(BTreeMap::new()).to_bytes().unwrap();
    let c = Container::from_bytes(bytes).unwrap();
    assert_eq!(
        (c.total_blocks(), c.available_blocks(), c.fixed_bytes()),
        (0, 0, 0)
    );
    assert!(c.is_complete());
    assert!(c.base_available());
}

#[test]
fn writer_rejects_bad_input() {
    let mut w = ContainerWriter::new(BTreeMap::new());
    assert!(w
        .add_fixed("x", Dtype::F16, vec![3], vec![0; 5], "F16")
        .is_err());
    assert!(w.add_fixed("", Dtype::U8, vec![1], vec![0], "U8").is_err());
    assert!(w
        .add_fixed("x", Dtype::F32, vec![usize::MAX, 2], vec![], "F32")
        .is_err());
    w.add_fixed("x", Dtype::U8, vec![1], vec![0], "U8").unwrap();
    assert!(w.add_fixed("x", Dtype::U8, vec![1], vec![0], "U8").is_err());
    w.add_aux_file("a", vec![]).unwrap();
    assert!(w.add_aux_file("a", vec![]).is_err());
    assert!(w.add_aux_file("bad\nname", vec![]).is_err());
    let m = w.add_matrix("m", 8, 8, "BF16").unwrap();
    assert!(w.add_matrix("m", 8, 8, "BF16").is_err());
    let part = |name: &str| PartData::new(name, Dtype::U8, vec![2], vec![0, 1]);
    let no_params = BTreeMap::new;
    // Unknown matrix, out-of-order index, bad part name, duplicate part, wrong byte count.
    assert!(w
        .push_block(5, 0, "avd", no_params(), vec![part("a")])
        .is_err());
    assert!(w
        .push_block(m, 1, "avd", no_params(), vec![part("a")])
        .is_err());
    assert!(w
        .push_block(m, 0, "avd", no_params(), vec![part("a/b")])
        .is_err());
    assert!(w
        .push_block(m, 0, "avd", no_params(), vec![part("a"), part("a")])
        .is_err());
    assert!(w
        .push_block(
            m,
            0,
            "avd",
            no_params(),
            vec![PartData::new("a", Dtype::F16, vec![2], vec![0; 3])]
        )
        .is_err());
    assert!(w
        .push_block(m, 0, "", no_params(), vec![part("a")])
        .is_err());
    assert_eq!(w.block_count(), 0);
    assert_eq!(
        w.push_block(m, 0, "avd", no_params(), vec![part("a")])
            .unwrap(),
        0
    );
    assert_eq!(w.push_block(m, 1, "avd", no_params(), vec![]).unwrap(), 1);
    w.set_mandatory_blocks(3);
    let err = w.to_bytes().unwrap_err();
    assert!(err.to_string().contains("mandatory_blocks is 3"), "{err}");
    w.set_mandatory_blocks(2);
    let c = Container::from_bytes(w.to_bytes().unwrap()).unwrap();
    assert_eq!(c.block(1).unwrap().parts().count(), 0);
}

#[test]
fn writer_rejects_spooled_blocks_that_do_not_add_up() {
    let spool = Arc::new(Spool::create_in(&std::env::temp_dir()).unwrap());
    let mut w = ContainerWriter::new(BTreeMap::new());
    let m = w.add_matrix("m", 8, 8, "BF16").unwrap();
    let spec = |name: &str, len: usize| TensorSpec {
        name: name.into(),
        dtype: Dtype::U8,
        shape: vec![len],
    };
    let range = spool.append(&[&[1u8, 2, 3], &[4u8, 5]]).unwrap();
    // 3 + 3 bytes of parts for 5 spooled bytes, then 3 + 2 in the wrong order of index.
    let err = w
        .push_spooled_block(
            m,
            0,
            "avd",
            BTreeMap::new(),
            vec![spec("a", 3), spec("b", 3)],
            &spool,
            range,
        )
        .unwrap_err();
    assert!(
        err.to_string().contains("6 bytes but 5 bytes were given"),
        "{err}"
    );
    assert!(w
        .push_spooled_block(
            m,
            1,
            "avd",
            BTreeMap::new(),
            vec![spec("a", 3), spec("b", 2)],
            &spool,
            range
        )
        .is_err());
    assert_eq!(w.block_count(), 0);
    w.push_spooled_block(
        m,
        0,
        "avd",
        BTreeMap::new(),
        vec![spec("a", 3), spec("b", 2)],
        &spool,
        range,
    )
    .unwrap();
    w.set_mandatory_blocks(1);
    let c = Container::from_bytes(w.to_bytes().unwrap()).unwrap();
    let b = c.block(0).unwrap();
    assert_eq!(b.part("a").unwrap().bytes, &[1, 2, 3]);
    assert_eq!(b.part("b").unwrap().bytes, &[4, 5]);
}

fn dtype_strategy() -> impl Strategy<Value = Dtype> {
    prop::sample::select(Dtype::ALL.to_vec())
}

fn tensor_strategy() -> impl Strategy<Value = TensorGen> {
    (
        dtype_strategy(),
        prop::collection::vec(0usize..5, 0..4),
        any::<u64>(),
    )
}

/// (dtype, shape, seed of the bytes)
type TensorGen = (Dtype, Vec<usize>, u64);

#[derive(Debug, Clone)]
struct Spec {
    aux: Vec<usize>,
    fixed: Vec<TensorGen>,
    matrices: usize,
    /// (matrix choice, parts, params)
    blocks: Vec<(usize, Vec<TensorGen>, i64)>,
    mandatory: usize,
}

fn spec_strategy() -> impl Strategy<Value = Spec> {
    (
        prop::collection::vec(0usize..20, 0..3),
        prop::collection::vec(tensor_strategy(), 0..4),
        1usize..4,
        prop::collection::vec(
            (
                any::<usize>(),
                prop::collection::vec(tensor_strategy(), 0..4),
                any::<i64>(),
            ),
            0..8,
        ),
        any::<usize>(),
    )
        .prop_map(|(aux, fixed, matrices, blocks, mandatory)| Spec {
            mandatory: mandatory % (blocks.len() + 1),
            aux,
            fixed,
            matrices,
            blocks,
        })
}

/// The container of `spec`; with `spool`, every block's bytes wait there instead of in
/// the writer.
fn build_with(spec: &Spec, spool: Option<&Arc<Spool>>) -> (ContainerWriter, Vec<Vec<PartData>>) {
    build_into(ContainerWriter::new(BTreeMap::new()), spec, spool)
}

/// [`build_with`] on a given (empty) writer.
fn build_into(
    mut w: ContainerWriter,
    spec: &Spec,
    spool: Option<&Arc<Spool>>,
) -> (ContainerWriter, Vec<Vec<PartData>>) {
    w.set_metadata("seed", serde_json::json!(spec.aux));
    for (j, len) in spec.aux.iter().enumerate() {
        w.add_aux_file(format!("dir/file{j}.json"), common::bytes(j as u64, *len))
            .unwrap();
    }
    for (j, (dtype, shape, seed)) in spec.fixed.iter().enumerate() {
        let len = dtype.byte_len(shape).unwrap();
        w.add_fixed(
            format!("fixed.{j}"),
            *dtype,
            shape.clone(),
            common::bytes(*seed, len),
            "BF16",
        )
        .unwrap();
    }
    for j in 0..spec.matrices {
        w.add_matrix(format!("m{j}"), j + 1, j + 2, "F32").unwrap();
    }
    let mut next = vec![0usize; spec.matrices];
    let mut all_parts = Vec::new();
    for (choice, parts, param) in &spec.blocks {
        let mat = choice % spec.matrices;
        let parts: Vec<PartData> = parts
            .iter()
            .enumerate()
            .map(|(j, (dtype, shape, seed))| {
                let len = dtype.byte_len(shape).unwrap();
                PartData::new(
                    format!("p{j}"),
                    *dtype,
                    shape.clone(),
                    common::bytes(*seed, len),
                )
            })
            .collect();
        all_parts.push(parts.clone());
        let params = BTreeMap::from([("x".to_owned(), *param)]);
        match spool {
            None => w.push_block(mat, next[mat], "kind", params, parts),
            Some(spool) => {
                let pieces: Vec<&[u8]> = parts.iter().map(|p| p.bytes.as_slice()).collect();
                let range = spool.append(&pieces).unwrap();
                let specs = parts
                    .iter()
                    .map(|p| TensorSpec {
                        name: p.name.clone(),
                        dtype: p.dtype,
                        shape: p.shape.clone(),
                    })
                    .collect();
                w.push_spooled_block(mat, next[mat], "kind", params, specs, spool, range)
            }
        }
        .unwrap();
        next[mat] += 1;
    }
    w.set_mandatory_blocks(spec.mandatory);
    (w, all_parts)
}

fn build(spec: &Spec) -> (ContainerWriter, Vec<Vec<PartData>>) {
    build_with(spec, None)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn prop_round_trip(spec in spec_strategy()) {
        let (w, parts) = build(&spec);
        let bytes = w.to_bytes().unwrap();
        let c = Container::from_bytes(bytes).unwrap();
        prop_assert_eq!(c.manifest(), &w.manifest().unwrap());
        prop_assert_eq!(c.available_blocks(), spec.blocks.len());
        for (j, len) in spec.aux.iter().enumerate() {
            let name = format!("dir/file{j}.json");
            prop_assert_eq!(c.aux_file(&name).unwrap(), common::bytes(j as u64, *len));
        }
        for (j, (dtype, shape, seed)) in spec.fixed.iter().enumerate() {
            let t = c.fixed(&format!("fixed.{j}")).unwrap();
            prop_assert_eq!(t.dtype, *dtype);
            prop_assert_eq!(t.shape, shape.as_slice());
            prop_assert_eq!(t.bytes, common::bytes(*seed, dtype.byte_len(shape).unwrap()));
        }
        for (p, expected) in parts.iter().enumerate() {
            let b = c.block(p).unwrap();
            prop_assert_eq!(b.param("x"), Some(spec.blocks[p].2));
            let got: Vec<_> = b.parts().collect();
            prop_assert_eq!(got.len(), expected.len());
            for (e, (name, t)) in expected.iter().zip(got) {
                prop_assert_eq!(name, e.name.as_str());
                prop_assert_eq!(t.dtype, e.dtype);
                prop_assert_eq!(t.shape, e.shape.as_slice());
                prop_assert_eq!(t.bytes, e.bytes.as_slice());
            }
        }
    }

    /// Blocks that waited in a spool file give the same bytes as blocks held in memory,
    /// also after more data was spooled behind them.
    #[test]
    fn prop_spooled_blocks_write_the_same_bytes(spec in spec_strategy()) {
        let spool = Arc::new(Spool::create_in(&std::env::temp_dir()).unwrap());
        spool.append(&[b"unrelated data before"]).unwrap();
        let (spooled, _) = build_with(&spec, Some(&spool));
        spool.append(&[b"and after"]).unwrap();
        let (owned, _) = build(&spec);
        let owned = owned.to_bytes().unwrap();
        prop_assert_eq!(spooled.to_bytes().unwrap(), owned.clone());
        // The same through push_block on a writer that spools what it is given.
        let mut writer = ContainerWriter::new(BTreeMap::new());
        writer.spool_blocks_in(Arc::clone(&spool));
        let (via_push, _) = build_into(writer, &spec, None);
        prop_assert_eq!(via_push.to_bytes().unwrap(), owned);
    }

    #[test]
    fn prop_truncation_gives_a_prefix(spec in spec_strategy(), cut in any::<prop::sample::Index>()) {
        let (w, _) = build(&spec);
        let bytes = w.to_bytes().unwrap();
        let full = Container::from_bytes(bytes.clone()).unwrap();
        let len = cut.index(bytes.len() + 1);
        match Container::from_bytes(bytes[..len].to_vec()) {
            Ok(c) => {
                prop_assert!(len as u64 >= full.data_start() + full.fixed_bytes());
                prop_assert_eq!(c.missing_bytes(), (bytes.len() - len) as u64);
                prop_assert!(c.usable_bytes() <= len as u64);
                for p in 0..c.available_blocks() {
                    prop_assert_eq!(c.block(p).unwrap().bytes(), full.block(p).unwrap().bytes());
                }
                if c.available_blocks() < c.total_blocks() {
                    prop_assert!(c.block(c.available_blocks()).is_err());
                }
            }
            Err(_) => prop_assert!((len as u64) < full.data_start() + full.fixed_bytes()),
        }
    }
}

#[test]
fn container_is_send_and_sync() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Container>();
    assert_send_sync::<bitstack_format::BlockRef<'_>>();
    assert_send_sync::<ContainerWriter>();
}
