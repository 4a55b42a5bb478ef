//! A complete container is a valid safetensors file for the reference Rust reader.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use bitstack_format::{block_tensor_name, Container, MANIFEST_KEY};
use safetensors::{Dtype as StDtype, SafeTensors};

fn st_dtype(d: bitstack_format::Dtype) -> StDtype {
    match d {
        bitstack_format::Dtype::U8 => StDtype::U8,
        bitstack_format::Dtype::F16 => StDtype::F16,
        bitstack_format::Dtype::BF16 => StDtype::BF16,
        bitstack_format::Dtype::F32 => StDtype::F32,
        _ => unreachable!(),
    }
}

#[test]
fn safetensors_crate_reads_every_tensor() {
    let bytes = common::sample_writer().to_bytes().unwrap();
    let ours = Container::from_bytes(bytes.clone()).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let (_, meta) = SafeTensors::read_metadata(&bytes).unwrap();
    let st_meta = meta.metadata().as_ref().unwrap();
    assert_eq!(st_meta["format"], "bitstack");
    assert_eq!(st_meta["bitstack.version"], "1");
    let manifest: bitstack_format::Manifest = serde_json::from_str(&st_meta[MANIFEST_KEY]).unwrap();
    assert_eq!(&manifest, ours.manifest());

    let mut expected = Vec::new();
    for name in ours.aux_file_names() {
        let data = ours.aux_file(name).unwrap();
        expected.push((
            format!("aux/{name}"),
            StDtype::U8,
            vec![data.len()],
            data.to_vec(),
        ));
    }
    for (name, t) in ours.fixed_tensors() {
        expected.push((
            format!("fixed/{name}"),
            st_dtype(t.dtype),
            t.shape.to_vec(),
            t.bytes.to_vec(),
        ));
    }
    for p in 0..ours.total_blocks() {
        let b = ours.block(p).unwrap();
        for (part, t) in b.parts() {
            let name = block_tensor_name(p, b.matrix_index(), b.index_in_matrix(), part);
            expected.push((name, st_dtype(t.dtype), t.shape.to_vec(), t.bytes.to_vec()));
        }
    }
    assert_eq!(st.len(), expected.len());
    // Buffer order is the order of the header entries.
    let by_offset: Vec<String> = meta.offset_keys();
    assert_eq!(
        by_offset,
        expected.iter().map(|e| e.0.clone()).collect::<Vec<_>>()
    );
    for (name, dtype, shape, data) in &expected {
        let view = st.tensor(name).unwrap();
        assert_eq!(view.dtype(), *dtype, "{name}");
        assert_eq!(view.shape(), shape.as_slice(), "{name}");
        assert_eq!(view.data(), data.as_slice(), "{name}");
    }
    assert!(by_offset.contains(&"block/3/1.1/signs".to_owned()));
    assert!(by_offset.contains(&"fixed/model.embed_tokens.weight".to_owned()));
    assert!(by_offset.contains(&"aux/config.json".to_owned()));
}
