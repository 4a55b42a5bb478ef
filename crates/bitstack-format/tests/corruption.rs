//! A flipped byte anywhere is detected: in the header by the manifest CRC and validation, in
//! the fixed part on open, in a block when that block is read or verified.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use bitstack_format::{Container, FormatError};

#[test]
fn corrupted_fixed_part_fails_on_open() {
    let bytes = common::sample_writer().to_bytes().unwrap();
    let full = Container::from_bytes(bytes.clone()).unwrap();
    let start = full.data_start() as usize;
    for at in start..start + full.fixed_bytes() as usize {
        let mut bad = bytes.clone();
        bad[at] ^= 0x10;
        let err = Container::from_bytes(bad).unwrap_err();
        let FormatError::ChecksumMismatch {
            what,
            stored,
            computed,
            ..
        } = &err
        else {
            panic!("{at}: {err}");
        };
        assert_eq!(what, "fixed part");
        assert_ne!(stored, computed);
        assert!(
            err.to_string()
                .contains("fixed part checksum mismatch: stored 0x"),
            "{err}"
        );
    }
}

#[test]
fn corrupted_block_fails_when_read() {
    let bytes = common::sample_writer().to_bytes().unwrap();
    let full = Container::from_bytes(bytes.clone()).unwrap();
    let start = full.data_start() as usize;
    for (p, entry) in full.manifest().blocks.iter().enumerate() {
        let begin = start + entry.offset as usize;
        for at in [
            begin,
            begin + entry.length as usize / 2,
            begin + entry.length as usize - 1,
        ] {
            let mut bad = bytes.clone();
            bad[at] = !bad[at];
            let c = Container::from_bytes(bad).unwrap();
            for q in 0..c.total_blocks() {
                assert_eq!(
                    c.verify_block(q).is_ok(),
                    q != p,
                    "corrupt block {p}, checked {q}"
                );
            }
            let err = c.block(p).unwrap_err();
            assert!(matches!(err, FormatError::ChecksumMismatch { .. }), "{err}");
            let name = &full.manifest().matrices[entry.matrix].name;
            let expected = format!(
                "<memory>: block {p} ({name} #{}) checksum mismatch: stored 0x",
                entry.index
            );
            assert!(err.to_string().starts_with(&expected), "{err}");
            assert!(c.verify_all().is_err());
            // The unchecked accessor still hands out the (corrupt) bytes.
            assert_eq!(
                c.block_unchecked(p).unwrap().bytes().len() as u64,
                entry.length
            );
        }
    }
}

#[test]
fn corrupted_header_is_rejected_or_harmless() {
    let bytes = common::sample_writer().to_bytes().unwrap();
    let full = Container::from_bytes(bytes.clone()).unwrap();
    let start = full.data_start() as usize;
    let mut accepted = 0;
    for at in 0..start {
        for flip in [0x01u8, 0x20, 0x80] {
            let mut bad = bytes.clone();
            bad[at] ^= flip;
            if let Ok(c) = Container::from_bytes(bad) {
                // Only meaning-free bytes (JSON whitespace) may change without an error.
                accepted += 1;
                assert_eq!(c.manifest(), full.manifest(), "byte {at} ^ {flip:#x}");
                assert_eq!(c.data_start(), full.data_start());
                c.verify_all().unwrap();
            }
        }
    }
    // Some padding spaces can become tabs and stay valid JSON; nothing else.
    assert!(accepted < 16, "{accepted} corruptions accepted");
}
