//! The runtime's fast paths (packed one-token products, tiled batch products) against the
//! naive path (a model whose linears are the dense reconstructions), on small-llama with AVD
//! blocks: the perplexity at a fixed budget agrees to 1e-4 relative, the logits of one-token
//! decoding to 1e-3 of their largest magnitude.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::sync::Arc;

use bitstack::compress::compress;
use bitstack::engine::{model_of, tokenizer_of};
use bitstack::model::windows;
use bitstack::{CompressOptions, LoadedStack, StackFile};

mod common;
use common::dense_model;

fn shared() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared")
}

#[test]
fn small_llama_avd_fast_path_matches_the_naive_path() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("small.bitstack");
    let mut options = CompressOptions::default();
    options.avd.k = 16;
    options.avd.niter = 4;
    compress(
        &shared().join("models/small-llama"),
        &out,
        &options,
        &|_| {},
    )
    .unwrap();
    let file = Arc::new(StackFile::open(&out).unwrap());
    let layout = file.layout().clone();
    // The budget closest to 4 blocks per matrix minus a few: a mixed plan.
    let budget = layout.min_memory() + (layout.max_memory() - layout.min_memory()) * 3 / 4;
    let stack = Arc::new(LoadedStack::load(file, budget).unwrap());
    let fast = model_of(&stack).unwrap();
    let naive = dense_model(&stack);
    let tokenizer = tokenizer_of(&stack).unwrap();
    let text = std::fs::read_to_string(shared().join("data/test.txt")).unwrap();
    let ids = tokenizer.encode(&text).unwrap();
    let w = windows(&ids, 512, Some(2));
    let fast_ppl = fast.perplexity(&w).unwrap().ppl;
    let naive_ppl = naive.perplexity(&w).unwrap().ppl;
    assert!(
        ((fast_ppl - naive_ppl) / naive_ppl).abs() < 1e-4,
        "fast {fast_ppl} vs naive {naive_ppl}"
    );
    let mut cache = fast.new_cache();
    let mut naive_cache = naive.new_cache();
    for &t in &ids[..8] {
        let a = fast.forward_next(t, &mut cache).unwrap();
        let b = naive.forward_next(t, &mut naive_cache).unwrap();
        let scale = b.iter().fold(0f32, |m, v| m.max(v.abs()));
        for (x, y) in a.iter().zip(&b) {
            assert!((x - y).abs() <= 1e-3 * scale, "{x} vs {y}");
        }
    }
}
