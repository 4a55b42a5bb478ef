//! `compress` killed with SIGKILL mid-run leaves no output file, and `--resume` finishes it
//! byte-identically to an uninterrupted run.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn args(out: &Path) -> Vec<String> {
    let root = root();
    [
        "compress",
        root.join("fixtures/tiny-qwen2").to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--k",
        "2",
        "--niter",
        "8",
        "--calib",
        root.join("fixtures/data/calib.txt").to_str().unwrap(),
        "--calib-windows",
        "2",
        "--score-windows",
        "2",
        "--seq",
        "128",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

fn run(args: &[String]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_bitstack"))
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "bitstack {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn files(dir: &Path, prefix: &str) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .map(|d| {
            d.filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| {
                    p.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.starts_with(prefix))
                })
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn killed_compress_resumes_to_identical_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let whole = dir.path().join("whole.bitstack");
    run(&args(&whole));
    assert!(!bitstack_partial(&whole).exists(), "progress removed");

    // Interrupted: SIGKILL once the first ordering level is saved (all matrices are done
    // then, and the scorer is busy with the next level).
    let cut = dir.path().join("cut.bitstack");
    let partial = bitstack_partial(&cut);
    let mut child = Command::new(env!("CARGO_BIN_EXE_bitstack"))
        .args(args(&cut))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while files(&partial, "level-").is_empty() {
        assert!(
            child.try_wait().unwrap().is_none(),
            "compress ended before it could be interrupted"
        );
        assert!(
            start.elapsed() < Duration::from_secs(300),
            "no progress saved"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(!cut.exists(), "a killed run leaves no output file");
    let no_leftover = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .all(|e| {
            let n = e.file_name().to_string_lossy().to_string();
            !n.starts_with("cut.bitstack") || n == "cut.bitstack.partial"
        });
    assert!(no_leftover, "nothing that looks like the output");
    let matrices = files(&partial, "matrix-");
    assert_eq!(matrices.len(), 28, "every decomposition was saved");

    // Simulate an earlier interruption too: some matrices never finished, one file was cut.
    for m in &matrices[..5] {
        std::fs::remove_file(m).unwrap();
    }
    let damaged = &matrices[5];
    let bytes = std::fs::read(damaged).unwrap();
    std::fs::write(damaged, &bytes[..bytes.len() / 2]).unwrap();

    let mut resume = args(&cut);
    resume.push("--resume".into());
    let stdout = run(&resume);
    assert!(stdout.contains("resumed:"), "{stdout}");
    assert_eq!(
        std::fs::read(&cut).unwrap(),
        std::fs::read(&whole).unwrap(),
        "resumed output differs from the uninterrupted one"
    );
    assert!(!partial.exists(), "progress removed after success");
}

#[test]
fn resume_refuses_other_options_and_missing_progress() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("x.bitstack");
    let mut a = args(&out);
    a.push("--resume".into());
    let o = Command::new(env!("CARGO_BIN_EXE_bitstack"))
        .args(&a)
        .output()
        .unwrap();
    assert!(!o.status.success());
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains("no progress to resume"), "{e}");
    assert!(!e.contains("panicked"), "{e}");

    // Progress of a run with k = 2, resumed with k = 3: refused, naming k.
    let partial = bitstack_partial(&out);
    let mut b = args(&out);
    let k = b.iter().position(|s| s == "--k").unwrap();
    // Write the progress of the k = 2 run by starting it and letting it finish a matrix.
    let mut child = Command::new(env!("CARGO_BIN_EXE_bitstack"))
        .args(args(&out))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    while !partial.join("run.json").exists() {
        assert!(child.try_wait().unwrap().is_none(), "compress ended early");
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    b[k + 1] = "3".into();
    b.push("--resume".into());
    let o = Command::new(env!("CARGO_BIN_EXE_bitstack"))
        .args(&b)
        .output()
        .unwrap();
    assert!(!o.status.success());
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains("k: was 2, now 3"), "{e}");
    assert!(!out.exists());
}

fn bitstack_partial(out: &Path) -> PathBuf {
    let mut name = out.file_name().unwrap().to_os_string();
    name.push(".partial");
    out.with_file_name(name)
}
