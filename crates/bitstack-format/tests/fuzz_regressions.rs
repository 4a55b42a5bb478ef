//! Inputs kept from fuzzing (`fuzz/run.sh`) and hand-made edge cases: every file in
//! `tests/fuzz_inputs/` must be handled without a panic, exercising every accessor as the
//! fuzz target does. To keep a crash found by the fuzzer, copy it from
//! `fuzz/artifacts/open_container/` into `tests/fuzz_inputs/`.
//!
//! Fuzzing builds (`--cfg fuzzing`) ignore the manifest and fixed-part checksums on open, so
//! a kept input is also run with its checksums re-stamped ([`restamp`]), which reproduces in
//! a normal build what the fuzzer saw.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use bitstack_format::{Container, MANIFEST_CRC_KEY, MANIFEST_KEY};
use serde_json::Value;

/// Recomputes the manifest and fixed-part checksums of an input whose header is JSON with a
/// manifest (through `serde_json::Value`: duplicate keys collapse). `None` otherwise.
fn restamp(data: &[u8]) -> Option<Vec<u8>> {
    let n = usize::try_from(u64::from_le_bytes(data.get(..8)?.try_into().ok()?)).ok()?;
    let end = n.checked_add(8)?;
    let mut header: Value = serde_json::from_slice(data.get(8..end)?).ok()?;
    let buffer = &data[end..];
    let meta = header.get_mut("__metadata__")?.as_object_mut()?;
    let mut manifest: Value = serde_json::from_str(meta.get(MANIFEST_KEY)?.as_str()?).ok()?;
    if let Some(fixed) = manifest.get("fixed_bytes").and_then(Value::as_u64) {
        if let Some(bytes) = usize::try_from(fixed).ok().and_then(|f| buffer.get(..f)) {
            manifest["fixed_crc32"] = crc32fast::hash(bytes).into();
        }
    }
    let text = serde_json::to_string(&manifest).ok()?;
    meta.insert(
        MANIFEST_CRC_KEY.to_owned(),
        format!("{:08x}", crc32fast::hash(text.as_bytes())).into(),
    );
    meta.insert(MANIFEST_KEY.to_owned(), text.into());
    let header = serde_json::to_vec(&header).ok()?;
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&header);
    out.extend_from_slice(buffer);
    Some(out)
}

/// The body of the fuzz target (fuzz/fuzz_targets/open_container.rs).
fn exercise(data: &[u8]) {
    let Ok(c) = Container::from_bytes(data.to_vec()) else {
        return;
    };
    assert!(c.available_blocks() <= c.total_blocks());
    assert!(c.usable_bytes() <= c.file_len());
    for name in c.aux_file_names() {
        assert!(c.aux_file(name).is_some());
    }
    for f in &c.manifest().fixed {
        assert_eq!(c.fixed(&f.name).unwrap().bytes.len() as u64, f.length);
    }
    for p in 0..=c.total_blocks() {
        let checked = c.block(p);
        match c.block_unchecked(p) {
            Ok(b) => {
                let total: usize = b.parts().map(|(_, t)| t.bytes.len()).sum();
                assert_eq!(total, b.bytes().len());
            }
            Err(_) => assert!(checked.is_err()),
        }
    }
    let _ = c.verify_all();
}

#[test]
fn kept_inputs_do_not_panic() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fuzz_inputs");
    let mut count = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let data = std::fs::read(&path).unwrap();
        exercise(&data);
        if let Some(restamped) = restamp(&data) {
            exercise(&restamped);
        }
        count += 1;
    }
    assert!(count > 0);
}

#[test]
fn edge_cases_do_not_panic() {
    let sample = common::sample_writer().to_bytes().unwrap();
    let mut inputs: Vec<Vec<u8>> = vec![
        vec![],
        vec![0; 8],
        vec![0xFF; 16],
        [8u64.to_le_bytes().as_slice(), b"{}      "].concat(),
        [2u64.to_le_bytes().as_slice(), b"{}"].concat(),
        [(u64::MAX - 7).to_le_bytes().as_slice(), b"{}"].concat(),
        sample.clone(),
    ];
    // Every single-bit flip of the first 600 bytes of the sample.
    for at in 0..600.min(sample.len()) {
        for bit in 0..8 {
            let mut bad = sample.clone();
            bad[at] ^= 1 << bit;
            inputs.push(bad);
        }
    }
    for input in &inputs {
        exercise(input);
        if let Some(restamped) = restamp(input) {
            exercise(&restamped);
        }
    }
}
