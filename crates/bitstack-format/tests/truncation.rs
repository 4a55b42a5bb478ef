//! A container cut at every byte: inside the header or fixed part → an error saying how much
//! is there; inside the blocks → the complete prefix of the stack. Never a panic.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use bitstack_format::{Container, FormatError};

#[test]
fn truncation_at_every_byte() {
    let bytes = common::sample_writer().to_bytes().unwrap();
    let full = Container::from_bytes(bytes.clone()).unwrap();
    let data_start = full.data_start() as usize;
    let fixed_end = data_start + full.fixed_bytes() as usize;
    let block_ends: Vec<usize> = full
        .manifest()
        .blocks
        .iter()
        .map(|b| data_start + (b.offset + b.length) as usize)
        .collect();
    for len in 0..=bytes.len() {
        let result = Container::from_bytes(bytes[..len].to_vec());
        if len < 8 {
            let err = result.unwrap_err();
            assert!(
                matches!(err, FormatError::MissingHeaderLength { present, .. } if present == len as u64)
            );
            assert!(
                err.to_string().contains(&format!("only {len} bytes")),
                "{err}"
            );
        } else if len < data_start {
            let err = result.unwrap_err();
            let FormatError::TruncatedHeader {
                declared, present, ..
            } = &err
            else {
                panic!("{len}: {err}");
            };
            assert_eq!(
                (*declared, *present),
                ((data_start - 8) as u64, (len - 8) as u64)
            );
            assert!(
                err.to_string().starts_with("<memory>: header declares"),
                "{err}"
            );
        } else if len < fixed_end {
            let err = result.unwrap_err();
            let FormatError::TruncatedFixed {
                present, needed, ..
            } = &err
            else {
                panic!("{len}: {err}");
            };
            assert_eq!(
                (*present, *needed),
                ((len - data_start) as u64, full.fixed_bytes())
            );
        } else {
            let c = result.unwrap_or_else(|e| panic!("{len}: {e}"));
            let available = block_ends.iter().take_while(|&&end| end <= len).count();
            assert_eq!(c.available_blocks(), available, "len {len}");
            assert_eq!(c.total_blocks(), block_ends.len());
            assert_eq!(c.missing_bytes(), (bytes.len() - len) as u64);
            assert_eq!(c.is_complete(), len == bytes.len());
            assert_eq!(c.base_available(), available >= 3);
            let usable = if available == 0 {
                fixed_end
            } else {
                block_ends[available - 1]
            };
            assert_eq!(c.usable_bytes(), usable as u64);
            c.verify_all().unwrap();
            for p in 0..available {
                assert_eq!(c.block(p).unwrap().bytes(), full.block(p).unwrap().bytes());
            }
            if available < block_ends.len() {
                let err = c.block(available).unwrap_err();
                assert!(matches!(err, FormatError::BlockNotPresent { .. }), "{err}");
                assert!(c.block_unchecked(available).is_err());
                assert!(c.verify_block(available).is_err());
            }
            assert_eq!(c.aux_file("config.json"), full.aux_file("config.json"));
        }
    }
}

#[test]
fn truncated_file_on_disk() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("partial.bitstack");
    let bytes = common::sample_writer().to_bytes().unwrap();
    std::fs::write(&path, &bytes[..bytes.len() - 1]).unwrap();
    let c = Container::open(&path).unwrap();
    assert_eq!(c.available_blocks(), c.total_blocks() - 1);
    assert_eq!(c.missing_bytes(), 1);
    let err = c.block(c.total_blocks() - 1).unwrap_err().to_string();
    assert!(err.contains("partial.bitstack: block 8 is not in the file: only the first 8 of 9 blocks are complete (1 bytes missing)"), "{err}");

    std::fs::write(&path, &bytes[..100]).unwrap();
    let err = Container::open(&path).unwrap_err().to_string();
    assert!(err.contains("partial.bitstack: header declares"), "{err}");
    assert!(err.contains("but only 92 are present"), "{err}");

    std::fs::write(&path, &bytes[..3]).unwrap();
    let err = Container::open(&path).unwrap_err().to_string();
    assert!(err.contains("only 3 bytes are present"), "{err}");
    std::fs::write(&path, b"").unwrap();
    assert!(Container::open(&path).is_err());

    let err = Container::open(dir.path().join("absent.bitstack"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("absent.bitstack: cannot open"), "{err}");
}

#[test]
fn trailing_bytes_are_rejected() {
    let mut bytes = common::sample_writer().to_bytes().unwrap();
    bytes.push(0);
    let err = Container::from_bytes(bytes).unwrap_err();
    assert!(
        matches!(err, FormatError::TrailingBytes { extra: 1, .. }),
        "{err}"
    );
}
