//! Fuzzes `Container::from_bytes` and every accessor of a container that opens.
#![no_main]

use bitstack_format::Container;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(c) = Container::from_bytes(data.to_vec()) else {
        return;
    };
    let m = c.manifest();
    let _ = (
        c.file_len(),
        c.complete_file_len(),
        c.missing_bytes(),
        c.usable_bytes(),
    );
    let _ = (
        c.is_complete(),
        c.base_available(),
        c.mandatory_blocks(),
        c.fixed_bytes(),
    );
    assert!(c.available_blocks() <= c.total_blocks());
    assert!(c.usable_bytes() <= c.file_len());
    for name in c.aux_file_names() {
        assert!(c.aux_file(name).is_some());
    }
    for f in &m.fixed {
        let t = c.fixed(&f.name).expect("listed fixed tensor");
        assert_eq!(t.bytes.len() as u64, f.length);
    }
    assert_eq!(c.fixed_tensors().count(), m.fixed.len());
    for j in 0..m.matrices.len() {
        assert!(c.matrix(j).is_some());
    }
    for p in 0..c.total_blocks() + 1 {
        let checked = c.block(p);
        match c.block_unchecked(p) {
            Ok(b) => {
                assert!(p < c.available_blocks());
                assert_eq!(b.bytes().len() as u64, b.entry().length);
                let mut total = 0;
                for (name, t) in b.parts() {
                    assert_eq!(b.part(name), Some(t));
                    total += t.bytes.len();
                }
                assert_eq!(total, b.bytes().len());
                let _ = (b.kind(), b.param("k"), b.matrix().rows, checked.is_ok());
            }
            Err(_) => {
                assert!(p >= c.available_blocks());
                assert!(checked.is_err());
            }
        }
    }
    let _ = c.verify_all();
    let _ = format!("{c:?}");
});
