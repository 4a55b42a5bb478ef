//! test64 perplexity of the original models against the reference (slow: run with
//! `cargo test --release -p bitstack-model --test perplexity -- --ignored`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;

use bitstack_model::{windows, CausalLm, TextTokenizer};

fn check(name: &str, reference: f64) {
    let shared = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared");
    let dir = shared.join("models").join(name);
    let model = CausalLm::load(&dir).unwrap();
    let tok = TextTokenizer::from_model_dir(&dir).unwrap();
    let text = std::fs::read_to_string(shared.join("data/test.txt")).unwrap();
    let ids = tok.encode(&text).unwrap();
    let p = model.perplexity(&windows(&ids, 512, Some(64))).unwrap();
    println!("{name}: test64 ppl {:.5} (reference {reference})", p.ppl);
    assert_eq!(p.predicted_tokens, 64 * 511);
    assert!(
        (p.ppl / reference - 1.0).abs() < 0.005,
        "{name}: {} vs {reference}",
        p.ppl
    );
}

#[test]
#[ignore = "slow: 64 windows per model"]
fn test64_tiny_qwen2() {
    check("tiny-qwen2", 20.5605);
}

#[test]
#[ignore = "slow: 64 windows per model"]
fn test64_small_llama() {
    check("small-llama", 22.1619);
}
