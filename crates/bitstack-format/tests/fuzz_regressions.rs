//! Inputs kept from fuzzing (`fuzz/run.sh`) and hand-made edge cases: every file in
//! `tests/fuzz_inputs/` must be handled without a panic, exercising every accessor as the
//! fuzz target does. To keep a crash found by the fuzzer, copy it from
//! `fuzz/artifacts/open_container/` into `tests/fuzz_inputs/`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use bitstack_format::Container;

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
        exercise(&std::fs::read(&path).unwrap());
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
    }
}
