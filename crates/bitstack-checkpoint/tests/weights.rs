//! `Weights` against files written by the `safetensors` crate itself: which files a directory
//! opens to, the bytes and values read back, and every kind of damage refused with a message
//! that names it.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;

use bitstack_checkpoint::{from_f32, to_f32, CheckpointError, SourceDtype, Weights, INDEX};
use proptest::prelude::*;
use safetensors::tensor::TensorView;
use safetensors::Dtype;

/// A tensor to write: name, dtype, shape, little-endian bytes.
type Spec = (String, SourceDtype, Vec<usize>, Vec<u8>);

fn dtype_of(d: SourceDtype) -> Dtype {
    match d {
        SourceDtype::F16 => Dtype::F16,
        SourceDtype::BF16 => Dtype::BF16,
        SourceDtype::F32 => Dtype::F32,
    }
}

fn write(path: &Path, tensors: &[Spec]) {
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .map(|(n, d, s, b)| {
            (
                n.clone(),
                TensorView::new(dtype_of(*d), s.clone(), b).unwrap(),
            )
        })
        .collect();
    std::fs::write(path, safetensors::serialize(views, None).unwrap()).unwrap();
}

fn spec(name: &str, dtype: SourceDtype, shape: &[usize], values: &[f32]) -> Spec {
    (name.into(), dtype, shape.to_vec(), from_f32(dtype, values))
}

fn message(e: CheckpointError) -> String {
    e.to_string()
}

fn has_all(text: &str, parts: &[&str]) {
    for p in parts {
        assert!(text.contains(p), "{text:?} lacks {p:?}");
    }
}

#[test]
fn reads_each_dtype_back() {
    let dir = tempfile::tempdir().unwrap();
    let values = [1.0f32, -2.5, 0.333_333_34, 65504.0, -0.0, 1e-3];
    let tensors = [
        spec("a.f16", SourceDtype::F16, &[2, 3], &values),
        spec("b.bf16", SourceDtype::BF16, &[6], &values),
        spec("c.f32", SourceDtype::F32, &[3, 2], &values),
    ];
    write(&dir.path().join("model.safetensors"), &tensors);
    let w = Weights::open(dir.path()).unwrap();
    assert_eq!(w.tensors().len(), 3);
    assert_eq!(w.paths().count(), 1);
    for (name, dtype, shape, bytes) in &tensors {
        let info = w.info(name).unwrap();
        assert_eq!((info.dtype, &info.shape), (*dtype, shape));
        assert_eq!(w.raw(name).unwrap(), &bytes[..]);
        // The oracle: each value rounded by `half` (or kept) on its own.
        let expected: Vec<f32> = values
            .iter()
            .map(|&v| match dtype {
                SourceDtype::F16 => half::f16::from_f32(v).to_f32(),
                SourceDtype::BF16 => half::bf16::from_f32(v).to_f32(),
                SourceDtype::F32 => v,
            })
            .collect();
        assert_eq!(w.tensor_f32(name).unwrap(), expected, "{name}");
    }
    let e = message(w.info("nope").unwrap_err());
    has_all(&e, &["no tensor named nope"]);
}

#[test]
fn which_files_a_directory_opens_to() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // Two files, no `model.safetensors`: both, in name order.
    write(
        &d.join("b.safetensors"),
        &[spec("y", SourceDtype::F32, &[1], &[2.0])],
    );
    write(
        &d.join("a.safetensors"),
        &[spec("x", SourceDtype::F32, &[1], &[1.0])],
    );
    let w = Weights::open(d).unwrap();
    let names: Vec<_> = w
        .paths()
        .map(|p| p.file_name().unwrap().to_owned())
        .collect();
    assert_eq!(names, ["a.safetensors", "b.safetensors"]);
    assert_eq!(w.tensors().keys().collect::<Vec<_>>(), ["x", "y"]);
    // With `model.safetensors` present, only it.
    write(
        &d.join("model.safetensors"),
        &[spec("z", SourceDtype::F16, &[1], &[3.0])],
    );
    let w = Weights::open(d).unwrap();
    assert_eq!(w.tensors().keys().collect::<Vec<_>>(), ["z"]);
    // A name in two files (no `model.safetensors`) is refused.
    std::fs::remove_file(d.join("model.safetensors")).unwrap();
    write(
        &d.join("b.safetensors"),
        &[spec("x", SourceDtype::F32, &[1], &[2.0])],
    );
    has_all(
        &message(Weights::open(d).unwrap_err()),
        &["tensor x appears in more than one file"],
    );
    // An empty directory names the problem.
    let empty = tempfile::tempdir().unwrap();
    has_all(
        &message(Weights::open(empty.path()).unwrap_err()),
        &["no *.safetensors file"],
    );
    // A directory that does not exist is an I/O error naming it.
    let gone = d.join("missing-dir");
    let e = Weights::open(&gone).unwrap_err();
    assert!(matches!(e, CheckpointError::Io { .. }), "{e:?}");
    has_all(&e.to_string(), &["missing-dir"]);
}

#[test]
fn shards_follow_the_index() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let index = |map: serde_json::Value| {
        std::fs::write(
            d.join(INDEX),
            serde_json::json!({"metadata": {}, "weight_map": map}).to_string(),
        )
        .unwrap();
    };
    index(serde_json::json!({"x": "s1.safetensors", "y": "s2.safetensors"}));
    // A stray single file is not read when there is an index.
    write(
        &d.join("model.safetensors"),
        &[spec("q", SourceDtype::F32, &[1], &[9.0])],
    );
    write(
        &d.join("s1.safetensors"),
        &[spec("x", SourceDtype::F32, &[1], &[1.0])],
    );
    has_all(
        &message(Weights::open(d).unwrap_err()),
        &[INDEX, "missing", "s2.safetensors", "download"],
    );
    write(
        &d.join("s2.safetensors"),
        &[spec("x2", SourceDtype::F32, &[1], &[1.0])],
    );
    has_all(
        &message(Weights::open(d).unwrap_err()),
        &[
            "puts tensor y in s2.safetensors",
            "does not match the index",
        ],
    );
    write(
        &d.join("s2.safetensors"),
        &[spec("y", SourceDtype::BF16, &[2], &[1.0, 2.0])],
    );
    let w = Weights::open(d).unwrap();
    assert_eq!(w.tensors().keys().collect::<Vec<_>>(), ["x", "y"]);
    assert_eq!(w.tensor_f32("y").unwrap(), [1.0, 2.0]);
    // Malformed indices.
    for (map, words) in [
        (
            serde_json::json!({"x": "../s1.safetensors"}),
            "plain file name",
        ),
        (serde_json::json!({"x": 3}), "is not a file name"),
        (serde_json::json!({}), "empty `weight_map`"),
    ] {
        index(map);
        has_all(&message(Weights::open(d).unwrap_err()), &[INDEX, words]);
    }
    std::fs::write(d.join(INDEX), "{ not json").unwrap();
    has_all(
        &message(Weights::open(d).unwrap_err()),
        &[
            "not valid JSON",
            "restore the checkpoint's original index file",
        ],
    );
}

#[test]
fn damage_is_refused_with_its_name() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.safetensors");
    write(&path, &[spec("w", SourceDtype::F32, &[64], &[0.5; 64])]);
    let bytes = std::fs::read(&path).unwrap();
    for broken in [
        &bytes[..bytes.len() - 1],
        &bytes[..bytes.len() / 2],
        &bytes[..5],
        b"not a safetensors file at all".as_slice(),
    ] {
        std::fs::write(&path, broken).unwrap();
        has_all(
            &message(Weights::open(dir.path()).unwrap_err()),
            &[
                "model.safetensors",
                "not a valid safetensors file",
                "download or copy it again",
            ],
        );
    }
    // A dtype bitstack does not read.
    let ints = 7i32.to_le_bytes().repeat(4);
    let view = TensorView::new(Dtype::I32, vec![4], &ints).unwrap();
    std::fs::write(
        &path,
        safetensors::serialize([("ids", view)], None).unwrap(),
    )
    .unwrap();
    has_all(
        &message(Weights::open(dir.path()).unwrap_err()),
        &["tensor ids has dtype I32", "F16, BF16 and F32"],
    );
}

fn dtype_strategy() -> impl Strategy<Value = SourceDtype> {
    prop_oneof![
        Just(SourceDtype::F16),
        Just(SourceDtype::BF16),
        Just(SourceDtype::F32)
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    /// Any set of tensors, in any number of files: every tensor's shape, dtype and bytes come
    /// back as written, and its values are its bytes widened one by one.
    #[test]
    fn any_tensors_come_back(
        tensors in prop::collection::vec(
            (dtype_strategy(), prop::collection::vec(1usize..5, 1..4), any::<u64>()),
            1..8,
        ),
        files in 1usize..4,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let specs: Vec<Spec> = tensors
            .iter()
            .enumerate()
            .map(|(i, (dtype, shape, seed))| {
                let n: usize = shape.iter().product();
                let bytes: Vec<u8> = (0..n * dtype.size())
                    .map(|b| (seed.rotate_left(b as u32 % 64) >> 3) as u8)
                    .collect();
                (format!("t{i}"), *dtype, shape.clone(), bytes)
            })
            .collect();
        for f in 0..files {
            let mine: Vec<Spec> = specs.iter().skip(f).step_by(files).cloned().collect();
            write(&dir.path().join(format!("part{f}.safetensors")), &mine);
        }
        let w = Weights::open(dir.path()).unwrap();
        prop_assert_eq!(w.tensors().len(), specs.len());
        for (name, dtype, shape, bytes) in &specs {
            let info = w.info(name).unwrap();
            prop_assert_eq!(info.dtype, *dtype);
            prop_assert_eq!(&info.shape, shape);
            prop_assert_eq!(w.raw(name).unwrap(), &bytes[..]);
            let widened = w.tensor_f32(name).unwrap();
            prop_assert_eq!(widened.len(), info.numel());
            for (i, v) in widened.iter().enumerate() {
                let b = &bytes[i * dtype.size()..(i + 1) * dtype.size()];
                let expected = match dtype {
                    SourceDtype::F32 => f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
                    SourceDtype::F16 => half::f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32(),
                    SourceDtype::BF16 => f32::from_bits(u32::from(u16::from_le_bytes([b[0], b[1]])) << 16),
                };
                prop_assert!(v.to_bits() == expected.to_bits() || (v.is_nan() && expected.is_nan()));
            }
        }
    }

    /// Widening what `from_f32` wrote gives the value rounded once: writing it again gives
    /// the same bytes.
    #[test]
    fn rounding_is_idempotent(values in prop::collection::vec(-1e4f32..1e4, 0..64), dtype in dtype_strategy()) {
        let bytes = from_f32(dtype, &values);
        prop_assert_eq!(bytes.len(), values.len() * dtype.size());
        let back = to_f32(dtype, &bytes);
        prop_assert_eq!(from_f32(dtype, &back), bytes);
        if dtype == SourceDtype::F32 {
            prop_assert_eq!(back, values);
        }
    }
}
