//! End-to-end tests of the `bitstack` binary on the bundled tiny model and ../shared.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn tiny() -> PathBuf {
    root().join("fixtures/tiny-qwen2")
}

fn shared() -> PathBuf {
    root().join("../shared")
}

fn bitstack(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_bitstack"))
        .args(args)
        .output()
        .expect("run bitstack")
}

fn ok(args: &[&str]) -> String {
    let out = bitstack(args);
    assert!(
        out.status.success(),
        "bitstack {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn fails(args: &[&str]) -> String {
    let out = bitstack(args);
    assert!(!out.status.success(), "bitstack {args:?} should fail");
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(!stderr.contains("panicked"), "panic: {stderr}");
    stderr
}

fn json(args: &[&str]) -> Value {
    serde_json::from_str(&ok(args)).unwrap()
}

fn compress_tiny(dir: &Path, k: &str, niter: &str) -> PathBuf {
    let out = dir.join(format!("tiny-k{k}-n{niter}.bitstack"));
    ok(&[
        "compress",
        tiny().to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--k",
        k,
        "--niter",
        niter,
        "--no-calibration",
    ]);
    out
}

fn reference(model: &str, k: u64) -> Value {
    let path = shared().join(format!("reference/bitstack_reference_{model}.json"));
    let all: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    all["bitstack"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["k"] == k)
        .unwrap()
        .clone()
}

#[test]
fn compress_inspect_plan_export_tiny() {
    let dir = tempfile::tempdir().unwrap();
    let file = compress_tiny(dir.path(), "2", "4");
    let f = file.to_str().unwrap();
    let info = json(&["inspect", f, "--json"]);
    assert_eq!(info["matrices"], 28);
    assert_eq!(info["blocks"], 28 * 4);
    // base_bytes and per-block bytes exactly as the reference accounting (k = 2).
    let r = reference("tiny-qwen2", 2);
    assert_eq!(info["base_bytes"], r["base_bytes"]);
    assert_eq!(info["min_memory_bytes"], r["base_bytes"]);
    let per_block: u64 = r["per_block_bytes"]
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_u64().unwrap())
        .sum();
    assert_eq!(
        info["max_memory_bytes"].as_u64().unwrap(),
        r["base_bytes"].as_u64().unwrap() + 3 * per_block
    );
    assert_eq!(info["steps"].as_array().unwrap().len(), 10);

    // plan: exact memory, per-matrix counts summing to the blocks.
    let budget = (info["min_memory_bytes"].as_u64().unwrap() + 200_000).to_string();
    let plan = json(&["plan", f, "--budget", &budget, "--json"]);
    let per: u64 = plan["per_matrix"]
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_u64().unwrap())
        .sum();
    assert_eq!(per, plan["blocks"].as_u64().unwrap());
    assert!(plan["memory_bytes"].as_u64().unwrap() <= budget.parse::<u64>().unwrap());

    // Units: 1 MB = 10^6, 1 MiB = 2^20.
    let p1 = json(&["plan", f, "--budget", "6MB", "--json"]);
    assert_eq!(p1["budget_bytes"], 6_000_000);
    let p2 = json(&["plan", f, "--budget", "6MiB", "--json"]);
    assert_eq!(p2["budget_bytes"], 6 * 1024 * 1024);

    // export at the maximum: HF layout with original names and dtypes.
    let export = dir.path().join("export");
    ok(&[
        "export",
        f,
        "--budget",
        "1GB",
        "-o",
        export.to_str().unwrap(),
    ]);
    for name in ["config.json", "tokenizer.json", "model.safetensors"] {
        assert!(export.join(name).exists(), "{name} missing");
    }
    let original = std::fs::read(tiny().join("model.safetensors")).unwrap();
    let original = safetensors::SafeTensors::deserialize(&original).unwrap();
    let exported = std::fs::read(export.join("model.safetensors")).unwrap();
    let exported = safetensors::SafeTensors::deserialize(&exported).unwrap();
    let mut names = original.names();
    names.sort();
    let mut got = exported.names();
    got.sort();
    assert_eq!(names, got);
    for name in names {
        let (a, b) = (
            original.tensor(name).unwrap(),
            exported.tensor(name).unwrap(),
        );
        assert_eq!(a.dtype(), b.dtype(), "{name}");
        assert_eq!(a.shape(), b.shape(), "{name}");
        if !name.contains("proj.weight") {
            assert_eq!(a.data(), b.data(), "fixed tensor {name} must be exact");
        }
    }
}

#[test]
fn base_bytes_small_llama_matches_reference() {
    let model = shared().join("models/small-llama");
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("s.bitstack");
    ok(&[
        "compress",
        model.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--k",
        "4",
        "--niter",
        "1",
        "--no-calibration",
    ]);
    let info = json(&["inspect", out.to_str().unwrap(), "--json"]);
    assert_eq!(
        info["base_bytes"],
        reference("small-llama", 4)["base_bytes"]
    );
}

#[test]
fn bad_inputs_give_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let file = compress_tiny(dir.path(), "1", "2");
    let f = file.to_str().unwrap();
    let e = fails(&["plan", f, "--budget", "1kB"]);
    assert!(e.contains("below the minimum"), "{e}");
    let e = fails(&["plan", f, "--budget", "lots"]);
    assert!(e.contains("cannot read size"), "{e}");
    // Truncated inside the fixed part.
    let bytes = std::fs::read(&file).unwrap();
    let cut = dir.path().join("cut.bitstack");
    std::fs::write(&cut, &bytes[..bytes.len() / 4]).unwrap();
    let e = fails(&["inspect", cut.to_str().unwrap()]);
    assert!(e.contains("cut.bitstack"), "{e}");
    // Truncated in the blocks: opens, says how much is missing.
    std::fs::write(&cut, &bytes[..bytes.len() - 1000]).unwrap();
    let info = json(&["inspect", cut.to_str().unwrap(), "--json"]);
    assert_eq!(info["complete"], false);
    assert!(info["missing_bytes"].as_u64().unwrap() >= 1000);
    // Not a checkpoint.
    let e = fails(&[
        "compress",
        dir.path().to_str().unwrap(),
        "-o",
        "x.bitstack",
        "--no-calibration",
    ]);
    assert!(e.contains("safetensors"), "{e}");
    // Output directory that does not exist: error, no file.
    let bad_out = dir.path().join("no/such/dir/out.bitstack");
    let e = fails(&[
        "compress",
        tiny().to_str().unwrap(),
        "-o",
        bad_out.to_str().unwrap(),
        "--k",
        "1",
        "--niter",
        "1",
        "--no-calibration",
    ]);
    assert!(e.contains("out.bitstack") || e.contains("no/such"), "{e}");
    assert!(!bad_out.exists());
}

#[test]
fn include_glob_stacks_any_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("mlp.bitstack");
    ok(&[
        "compress",
        tiny().to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--k",
        "1",
        "--niter",
        "2",
        "--no-calibration",
        "--include",
        "*.mlp.*_proj.weight",
    ]);
    let info = json(&["inspect", out.to_str().unwrap(), "--json"]);
    assert_eq!(info["matrices"], 12);
}

/// Copies the tiny model into `dir`, letting `edit` change the files.
fn tiny_copy(dir: &Path, skip: &[&str]) -> PathBuf {
    let out = dir.join("model");
    std::fs::create_dir_all(&out).unwrap();
    for entry in std::fs::read_dir(tiny()).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_str().unwrap().to_string();
        if !skip.contains(&name.as_str()) {
            std::fs::copy(&path, out.join(&name)).unwrap();
        }
    }
    out
}

#[test]
fn unsupported_architecture_suggests_include() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_copy(dir.path(), &[]);
    let config = std::fs::read_to_string(model.join("config.json")).unwrap();
    std::fs::write(
        model.join("config.json"),
        config.replace("Qwen2ForCausalLM", "BertModel"),
    )
    .unwrap();
    let out = dir.path().join("x.bitstack");
    let e = fails(&[
        "compress",
        model.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--no-calibration",
    ]);
    assert!(e.contains("BertModel") && e.contains("--include"), "{e}");
    assert!(!out.exists());
}

#[test]
fn missing_tokenizer_and_calibration_text_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_copy(dir.path(), &["tokenizer.json"]);
    let out = dir.path().join("x.bitstack");
    let calib = root().join("fixtures/data/calib.txt");
    let e = fails(&[
        "compress",
        model.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--calib",
        calib.to_str().unwrap(),
    ]);
    assert!(e.contains("tokenizer.json"), "{e}");
    // Without --calib the calibrated mode explains what it needs.
    let e = fails(&[
        "compress",
        tiny().to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
    ]);
    assert!(e.contains("--calib"), "{e}");
    // A calibration text too short for the windows asked for.
    let short = dir.path().join("short.txt");
    std::fs::write(&short, "fn main() {}").unwrap();
    let e = fails(&[
        "compress",
        tiny().to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--calib",
        short.to_str().unwrap(),
    ]);
    assert!(e.contains("short.txt") && e.contains("windows"), "{e}");
    assert!(!out.exists());
}

#[test]
fn non_finite_weights_are_refused() {
    use safetensors::tensor::TensorView;
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_copy(dir.path(), &["model.safetensors"]);
    let original = std::fs::read(tiny().join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&original).unwrap();
    let target = "model.layers.1.mlp.up_proj.weight";
    let mut poisoned = st.tensor(target).unwrap().data().to_vec();
    // f16 NaN at element 7.
    poisoned[14..16].copy_from_slice(&half::f16::NAN.to_le_bytes());
    let mut views = Vec::new();
    for (name, view) in st.tensors() {
        let data: &[u8] = if name == target {
            &poisoned
        } else {
            view.data()
        };
        views.push((
            name.clone(),
            TensorView::new(view.dtype(), view.shape().to_vec(), data).unwrap(),
        ));
    }
    let bytes = safetensors::serialize(views, None).unwrap();
    std::fs::write(model.join("model.safetensors"), bytes).unwrap();
    let out = dir.path().join("x.bitstack");
    let e = fails(&[
        "compress",
        model.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--no-calibration",
        "--k",
        "1",
        "--niter",
        "1",
    ]);
    assert!(e.contains(target) && e.contains("non-finite"), "{e}");
    assert!(!out.exists());
}

#[test]
fn best_mode_compresses_below_the_paper_minimum_and_refuses_bad_options() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("tiny-best.bitstack");
    let data = root().join("fixtures/data");
    let calib = data.join("calib.txt");
    let model = tiny();
    let base = [
        "compress",
        model.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--mode",
        "best",
        "--calib",
        calib.to_str().unwrap(),
        "--calib-windows",
        "2",
        "--score-windows",
        "1",
        "--seq",
        "128",
    ];
    let mut args = base.to_vec();
    args.extend(["--planes", "4"]);
    ok(&args);
    let report = json(&["inspect", out.to_str().unwrap(), "--json"]);
    assert_eq!(report["mode"], "best");
    assert_eq!(report["planes"], 4);
    assert_eq!(report["matrices"], 29);
    assert_eq!(report["chains"], "auto");
    assert!(report["avd_first_matrices"].as_u64().unwrap() <= 29);
    // The paper's minimum keeps the 16-bit embedding table (4.19 MB) alone; best mode's
    // minimum is one plane of everything.
    let min = report["min_memory_bytes"].as_u64().unwrap();
    assert!(min < 1_500_000, "minimum {min}");
    let test = data.join("test.txt");
    let eval = json(&[
        "eval",
        out.to_str().unwrap(),
        "--text",
        test.to_str().unwrap(),
        "--windows",
        "1",
        "--budget",
        "3MB",
        "--json",
    ]);
    assert!(eval["memory_bytes"].as_u64().unwrap() <= 3_000_000);
    assert!(eval["ppl"].as_f64().unwrap().is_finite());

    for (extra, message) in [
        (vec!["--alpha", "1.5"], "alpha must be between 0 and 1"),
        (vec!["--planes", "30"], "at most 24"),
        (vec!["--group", "12"], "group size 12"),
        (vec!["--probe-planes", "9"], "sensitivity probe needs"),
        (vec!["--no-calibration"], "--mode best needs calibration"),
        (
            vec!["--planes", "0"],
            "0 planes requested; at least 1 is needed",
        ),
        // Paper-mode options in best mode are refused, not ignored.
        (vec!["--k", "4"], "--k applies to the paper mode only"),
        (
            vec!["--niter", "8"],
            "--niter applies to the paper mode only",
        ),
        (
            vec!["--svd", "exact"],
            "--svd applies to the paper mode only",
        ),
        (vec!["--seed", "1"], "--seed applies to the paper mode only"),
    ] {
        let bad = dir.path().join("bad.bitstack");
        let mut args = base.to_vec();
        args[3] = bad.to_str().unwrap();
        args.extend(extra.iter().copied());
        let stderr = fails(&args);
        assert!(stderr.contains(message), "{extra:?}: {stderr}");
        assert!(!bad.exists());
        // Refused before any work: no progress was saved.
        assert!(
            !dir.path().join("bad.bitstack.partial").exists(),
            "{extra:?}"
        );
    }
    // Best-mode options in paper mode are refused, not ignored.
    for flag in [
        ["--chains", "planes"],
        ["--gptq-windows", "8"],
        ["--planes", "4"],
    ] {
        let bad = dir.path().join("bad.bitstack");
        let mut args = base.to_vec();
        args[3] = bad.to_str().unwrap();
        args[5] = "paper";
        args.extend(flag);
        let stderr = fails(&args);
        assert!(
            stderr.contains(&format!("{} applies to --mode best only", flag[0])),
            "{flag:?}: {stderr}"
        );
        assert!(!bad.exists());
    }
}
