//! `bitstack bench --quick --json` runs end to end and reports every key issue 4 names
//! (the values are timings: only their presence and sanity are checked, never their size).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::process::Command;

#[test]
fn quick_bench_reports_every_key() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let out = Command::new(env!("CARGO_BIN_EXE_bitstack"))
        .args(["bench", "--quick", "--json", "--model"])
        .arg(root.join("fixtures/tiny-qwen2"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    for key in [
        "avd_iteration_speedup",
        "avd_full_seconds_3584x1024",
        "avd_error_ratio_fast_vs_exact_512",
        "decode_vs_dense_f32",
        "decode_vs_dense_f32_planes",
        "batch_vs_dense_f32",
        "e2e_decode_speedup",
        "e2e_eval_ratio",
        "e2e_best_decode_speedup",
        "e2e_best_eval_ratio",
        "e2e_budget_bytes",
        "e2e_k",
        "e2e_decode_speedup_k16",
        "e2e_eval_ratio_k16",
        "e2e_budget_bytes_k16",
        "scorer_speedup_vs_straightforward",
        "scorer_speedup_vs_one_thread_straightforward",
    ] {
        let x = v[key]
            .as_f64()
            .unwrap_or_else(|| panic!("{key} missing: {v}"));
        assert!(x.is_finite() && x > 0.0, "{key} = {x}");
    }
    // The scorer reuses work exactly: the same scores (up to summation order), the same order.
    assert!(v["scorer_max_relative_difference"].as_f64().unwrap() < 1e-4);
    assert_eq!(v["scorer_same_order"], serde_json::Value::Bool(true));
    // The end-to-end rows take the reference's rank for tiny-qwen2's width (256: k = 2) and
    // k = 16, whose 4 blocks per matrix take more bytes.
    assert_eq!(v["e2e_k"].as_u64(), Some(2));
    assert!(v["e2e_budget_bytes_k16"].as_f64() > v["e2e_budget_bytes"].as_f64());
    // Quality is not a timing: the fast SVD stays within 2% of the exact one here.
    assert!(v["avd_error_ratio_fast_vs_exact_512"].as_f64().unwrap() < 1.02);
}

/// Group selections that cannot be run are refused before any work, with the reason.
#[test]
fn bench_refuses_groups_it_cannot_run() {
    let cases: [(&[&str], &str); 3] = [
        (
            &["--only", "nope"],
            "the groups are avd, kernels, e2e, scorer, stack",
        ),
        (&["--only", "stack"], "--only stack needs --stack FILE"),
        (
            &["--only", "e2e", "--stack", "some.bitstack"],
            "--stack is timed by group `stack`",
        ),
    ];
    for (args, want) in cases {
        let out = Command::new(env!("CARGO_BIN_EXE_bitstack"))
            .arg("bench")
            .args(args)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} succeeded");
        assert!(err.contains(want), "{args:?}: {err}");
        assert!(out.stdout.is_empty(), "{args:?} printed results");
    }
}
