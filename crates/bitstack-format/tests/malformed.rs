//! Hand-made malformed containers: each is rejected with an error that says what is wrong.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use bitstack_format::{Container, FormatError, MANIFEST_CRC_KEY, MANIFEST_KEY};
use serde_json::Value;

/// Splits a container into (header JSON, data buffer).
fn split(bytes: &[u8]) -> (Value, Vec<u8>) {
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    (
        serde_json::from_slice(&bytes[8..8 + n]).unwrap(),
        bytes[8 + n..].to_vec(),
    )
}

/// Reassembles a container from header text and data.
fn join(header: impl AsRef<[u8]>, data: &[u8]) -> Vec<u8> {
    let header = header.as_ref();
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(header);
    out.extend_from_slice(data);
    out
}

/// Edits the manifest (and the header) of the sample container, fixing the manifest CRC.
fn edited(edit: impl FnOnce(&mut Value, &mut Value)) -> Vec<u8> {
    let (mut header, data) = split(&common::sample_writer().to_bytes().unwrap());
    let text = header["__metadata__"][MANIFEST_KEY]
        .as_str()
        .unwrap()
        .to_owned();
    let mut manifest: Value = serde_json::from_str(&text).unwrap();
    edit(&mut manifest, &mut header);
    let text = serde_json::to_string(&manifest).unwrap();
    header["__metadata__"][MANIFEST_CRC_KEY] =
        format!("{:08x}", crc32fast::hash(text.as_bytes())).into();
    header["__metadata__"][MANIFEST_KEY] = text.into();
    join(serde_json::to_string(&header).unwrap(), &data)
}

fn open_err(bytes: Vec<u8>) -> String {
    Container::from_bytes(bytes).unwrap_err().to_string()
}

#[test]
fn the_edit_helper_round_trips() {
    Container::from_bytes(edited(|_, _| {})).unwrap();
}

#[test]
fn newer_version_is_reported_as_such() {
    let bytes = edited(|m, h| {
        m["version"] = 2.into();
        m["new_field"] = "x".into();
        h["__metadata__"]["bitstack.version"] = "2".into();
    });
    let err = Container::from_bytes(bytes).unwrap_err();
    assert!(matches!(
        err,
        FormatError::UnsupportedVersion {
            found: 2,
            supported: 1,
            ..
        }
    ));
    assert!(err.to_string().contains("upgrade"), "{err}");
    // The manifest version alone also counts.
    let err = open_err(edited(|m, _| m["version"] = 7.into()));
    assert!(err.contains("format version 7 is not supported"), "{err}");
}

#[test]
fn not_a_bitstack_file() {
    let err = open_err(edited(|_, h| h["__metadata__"]["format"] = "pt".into()));
    assert!(err.contains("not a bitstack container"), "{err}");
    let (mut header, data) = split(&common::sample_writer().to_bytes().unwrap());
    header.as_object_mut().unwrap().remove("__metadata__");
    let err = open_err(join(serde_json::to_string(&header).unwrap(), &data));
    assert!(err.contains("no __metadata__"), "{err}");
    let err = open_err(join("[1, 2]  ", b""));
    assert!(err.contains("invalid header"), "{err}");
    let err = open_err(join("  {}    ", b""));
    assert!(err.contains("does not start with '{'"), "{err}");
    let err = open_err(join(b"{\"a\":\xff}", b""));
    assert!(err.contains("not UTF-8"), "{err}");
}

#[test]
fn manifest_checksum() {
    let (mut header, data) = split(&common::sample_writer().to_bytes().unwrap());
    let text = header["__metadata__"][MANIFEST_KEY]
        .as_str()
        .unwrap()
        .replace("LlamaForCausalLM", "LlamaForCausalLN");
    header["__metadata__"][MANIFEST_KEY] = text.into();
    let err = open_err(join(serde_json::to_string(&header).unwrap(), &data));
    assert!(err.contains("manifest checksum mismatch"), "{err}");
    header["__metadata__"][MANIFEST_CRC_KEY] = "xyz".into();
    let err = open_err(join(serde_json::to_string(&header).unwrap(), &data));
    assert!(err.contains("not 8 hexadecimal digits"), "{err}");
}

#[test]
fn unknown_fields_are_rejected() {
    let err = open_err(edited(|m, _| m["extra"] = 1.into()));
    assert!(err.contains("unknown field `extra`"), "{err}");
    let err = open_err(edited(|m, _| m["blocks"][0]["extra"] = 1.into()));
    assert!(err.contains("unknown field `extra`"), "{err}");
    let err = open_err(edited(|_, h| h["aux/config.json"]["extra"] = 1.into()));
    assert!(err.contains("unknown field `extra`"), "{err}");
    // Free-form metadata accepts anything.
    Container::from_bytes(edited(|m, _| {
        m["metadata"]["anything"] = serde_json::json!({"deep": [1, {"x": null}]})
    }))
    .unwrap();
}

#[test]
fn duplicate_keys_are_rejected() {
    let bytes = common::sample_writer().to_bytes().unwrap();
    let (header, data) = split(&bytes);
    let text = serde_json::to_string(&header).unwrap();
    // Repeat the first tensor entry.
    let entry = format!(",\"aux/config.json\":{}", header["aux/config.json"]);
    let dup = format!("{}{}}}", &text[..text.len() - 1], entry);
    let err = open_err(join(&dup, &data));
    assert!(
        err.contains("duplicate tensor \"aux/config.json\""),
        "{err}"
    );
    let dup = format!("{},\"__metadata__\":{{}}}}", &text[..text.len() - 1]);
    let err = open_err(join(&dup, &data));
    assert!(err.contains("duplicate key \"__metadata__\""), "{err}");
    let dup = text.replacen(
        "{\"__metadata__\":{",
        "{\"__metadata__\":{\"format\":\"x\",",
        1,
    );
    let err = open_err(join(&dup, &data));
    assert!(err.contains("duplicate __metadata__ key"), "{err}");
}

#[test]
fn layout_violations() {
    type Edit = Box<dyn FnOnce(&mut Value, &mut Value)>;
    let cases: Vec<(Edit, &str)> = vec![
        (
            Box::new(|m, _| m["fixed_bytes"] = 1.into()),
            "fixed_bytes is 1",
        ),
        (
            Box::new(|m, _| m["data_bytes"] = 1.into()),
            "data_bytes is 1",
        ),
        (
            Box::new(|m, _| m["base_bytes"] = 1.into()),
            "base_bytes is 1",
        ),
        (
            Box::new(|m, _| m["mandatory_blocks"] = 99.into()),
            "mandatory_blocks is 99",
        ),
        (
            Box::new(|m, _| m["blocks"][1]["offset"] = 0.into()),
            "expected",
        ),
        (
            Box::new(|m, _| m["blocks"][0]["length"] = 1.into()),
            "parts are larger",
        ),
        (
            Box::new(|m, _| m["blocks"][0]["matrix"] = 9.into()),
            "refers to matrix 9",
        ),
        (
            Box::new(|m, _| m["blocks"][0]["index"] = 1.into()),
            "must appear in order",
        ),
        (
            Box::new(|m, _| m["blocks"][0]["kind"] = "".into()),
            "empty name",
        ),
        (
            Box::new(|m, _| m["blocks"][0]["parts"][1]["name"] = "signs".into()),
            "duplicate part name",
        ),
        (
            Box::new(|m, _| m["blocks"][0]["parts"][0]["dtype"] = "I32".into()),
            "unknown variant",
        ),
        (
            Box::new(|m, _| {
                m["blocks"][0]["parts"][0]["shape"] = serde_json::json!([u64::MAX, 16])
            }),
            "overflows",
        ),
        (
            Box::new(|m, _| m["fixed"][0]["shape"] = serde_json::json!([1])),
            "bytes but the entry says",
        ),
        (
            Box::new(|m, _| m["matrices"][1]["index"] = 0.into()),
            "matrix 1 has index 0",
        ),
        (
            Box::new(|m, _| m["matrices"][1]["name"] = m["matrices"][0]["name"].clone()),
            "duplicate matrix name",
        ),
        (
            Box::new(|m, _| m["aux_files"][1]["name"] = "config.json".into()),
            "duplicate aux file name",
        ),
        (
            Box::new(|m, _| m["blocks"][0]["offset"] = serde_json::json!(u64::MAX)),
            "starts at buffer offset",
        ),
        (
            Box::new(|_, h| h["aux/config.json"]["data_offsets"] = serde_json::json!([0, 5])),
            "data_offsets",
        ),
        (
            Box::new(|_, h| h["fixed/model.norm.weight"]["dtype"] = "F16".into()),
            "but the manifest says",
        ),
        (
            Box::new(|_, h| {
                h["extra"] =
                    serde_json::json!({"dtype": "U8", "shape": [0], "data_offsets": [0, 0]})
            }),
            "not in the manifest",
        ),
        (
            Box::new(|_, h| {
                h.as_object_mut().unwrap().remove("block/0/0.0/u");
            }),
            "block/0/0.0/u\" of the manifest is missing",
        ),
    ];
    for (edit, expected) in cases {
        let err = open_err(edited(edit));
        assert!(err.contains(expected), "expected {expected:?} in: {err}");
        assert!(err.starts_with("<memory>: "), "{err}");
    }
}

#[test]
fn header_length_limits() {
    let mut bytes = u64::MAX.to_le_bytes().to_vec();
    bytes.extend_from_slice(b"{}");
    let err = Container::from_bytes(bytes).unwrap_err();
    assert!(matches!(err, FormatError::HeaderTooLarge { .. }), "{err}");
    let mut bytes = 100_000_000u64.to_le_bytes().to_vec();
    bytes.extend_from_slice(b"{}");
    let err = open_err(bytes);
    assert!(
        err.contains("header declares 100000000 bytes but only 2 are present"),
        "{err}"
    );
}

#[test]
fn a_directory_is_not_a_container() {
    let dir = tempfile::tempdir().unwrap();
    let e = Container::open(dir.path()).unwrap_err();
    assert!(matches!(e, FormatError::Directory { .. }), "{e:?}");
    let text = e.to_string();
    assert!(
        text.contains("is a directory, not a .bitstack file"),
        "{text}"
    );
    assert!(text.contains("bitstack compress"), "{text}");
}
