//! Writing to a path that cannot be written fails cleanly and leaves no files behind.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use bitstack_format::FormatError;

#[test]
fn nonexistent_directory() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("missing/sub/model.bitstack");
    let err = common::sample_writer().write_atomic(&path).unwrap_err();
    assert!(matches!(err, FormatError::Io { .. }), "{err}");
    assert!(
        err.to_string()
            .contains("missing/sub/model.bitstack: cannot create a temporary file"),
        "{err}"
    );
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}

#[test]
fn destination_is_a_directory() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("taken");
    std::fs::create_dir(&path).unwrap();
    let err = common::sample_writer().write_atomic(&path).unwrap_err();
    assert!(err.to_string().contains("cannot rename"), "{err}");
    // Only the pre-existing directory is there: the temporary file was removed.
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, ["taken"]);
}

#[cfg(unix)]
#[test]
fn read_only_directory() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let ro = dir.path().join("ro");
    std::fs::create_dir(&ro).unwrap();
    std::fs::set_permissions(&ro, std::fs::Permissions::from_mode(0o555)).unwrap();
    // Root ignores permissions; only check when the directory is really read-only.
    let probe = std::fs::File::create(ro.join("probe"));
    if probe.is_ok() {
        std::fs::remove_file(ro.join("probe")).unwrap();
        eprintln!("running as root: read-only directory not enforced, skipping");
        return;
    }
    let err = common::sample_writer()
        .write_atomic(ro.join("model.bitstack"))
        .unwrap_err();
    assert!(matches!(err, FormatError::Io { .. }), "{err}");
    assert_eq!(std::fs::read_dir(&ro).unwrap().count(), 0);
}

/// A writer that accepts `room` bytes, then fails as a full disk does.
struct FullDisk {
    room: usize,
}

impl std::io::Write for FullDisk {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.room == 0 {
            return Err(std::io::Error::from_raw_os_error(28)); // ENOSPC
        }
        let n = buf.len().min(self.room);
        self.room -= n;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn disk_full_is_an_error() {
    let writer = common::sample_writer();
    let total = writer.to_bytes().unwrap().len();
    for room in [0, 7, 100, total / 2, total - 1] {
        let err = writer.write_to(FullDisk { room }).unwrap_err();
        assert!(matches!(err, FormatError::Io { .. }), "{err}");
        let text = err.to_string();
        assert!(text.contains("cannot write"), "{text}");
        assert!(text.contains("No space left on device"), "{text}");
    }
    assert_eq!(
        writer.write_to(FullDisk { room: total }).unwrap(),
        total as u64
    );
}

#[cfg(target_os = "linux")]
#[test]
fn dev_full() {
    // The kernel's always-full device: every write fails with ENOSPC.
    let Ok(full) = std::fs::OpenOptions::new().write(true).open("/dev/full") else {
        eprintln!("no /dev/full, skipping");
        return;
    };
    let err = common::sample_writer().write_to(full).unwrap_err();
    assert!(
        err.to_string()
            .contains("<writer>: cannot write: No space left on device"),
        "{err}"
    );
}
