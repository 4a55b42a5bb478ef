//! Inputs found by fuzzing the config and tokenizer loaders (fuzz/fuzz_targets/load_config.rs,
//! load_tokenizer.rs), kept as regression tests: every file in tests/fuzz_inputs/ named
//! `config-*` or `tokenizer-*` must load or fail with an error, never panic. The fuzz seeds
//! (fuzz/seeds/) must load, so that fuzzing starts from valid files.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};

use bitstack_model::{ModelConfig, TextTokenizer};

fn files(dir: &Path, prefix: &str) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut v: Vec<PathBuf> = entries
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(prefix))
        })
        .collect();
    v.sort();
    v
}

fn inputs(prefix: &str) -> Vec<PathBuf> {
    files(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fuzz_inputs"),
        prefix,
    )
}

fn seeds(target: &str) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../fuzz/seeds")
        .join(target);
    files(&dir, "")
}

/// What the config fuzz target does with an input.
fn exercise_config(bytes: &[u8]) -> bool {
    let Ok(c) = ModelConfig::from_json_bytes(bytes, "fuzz") else {
        return false;
    };
    c.validate().unwrap();
    let _ = (c.q_dim(), c.kv_dim());
    for (name, shape) in c.expected_tensors().take(64) {
        assert!(shape.iter().all(|&d| d > 0), "{name} {shape:?}");
    }
    if c.head_dim <= 1 << 16 {
        assert_eq!(c.rope_inv_freq().len(), c.head_dim / 2);
    }
    true
}

/// What the tokenizer fuzz target does with an input.
fn exercise_tokenizer(bytes: &[u8]) -> bool {
    let Ok(t) = TextTokenizer::from_bytes(bytes, "fuzz") else {
        return false;
    };
    let _ = t.vocab_size();
    if let Ok(ids) = t.encode("fn main() { println!(\"Hello, wörld! 1234 ½ 日本\"); }") {
        let _ = t.decode(&ids, false);
        let _ = t.decode(&ids, true);
    }
    let _ = t.decode(&[0, 1, 2, u32::MAX], false);
    true
}

#[test]
fn config_regressions() {
    for path in inputs("config-") {
        let bytes = std::fs::read(&path).unwrap();
        let loaded = exercise_config(&bytes);
        eprintln!("{}: loaded = {loaded}", path.display());
    }
}

#[test]
fn tokenizer_regressions() {
    for path in inputs("tokenizer-") {
        let bytes = std::fs::read(&path).unwrap();
        let loaded = exercise_tokenizer(&bytes);
        eprintln!("{}: loaded = {loaded}", path.display());
    }
}

#[test]
fn fuzz_seeds_load() {
    let configs = seeds("load_config");
    assert!(!configs.is_empty());
    for path in configs {
        assert!(
            exercise_config(&std::fs::read(&path).unwrap()),
            "{} does not load",
            path.display()
        );
    }
    let tokenizers = seeds("load_tokenizer");
    assert!(!tokenizers.is_empty());
    for path in tokenizers {
        let bytes = std::fs::read(&path).unwrap();
        let t = TextTokenizer::from_bytes(&bytes, &path).unwrap();
        assert!(
            !t.encode("fn main").unwrap().is_empty(),
            "{}",
            path.display()
        );
    }
}
