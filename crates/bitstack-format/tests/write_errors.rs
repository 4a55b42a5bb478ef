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
