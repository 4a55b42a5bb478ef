//! The runtime's fast paths (packed one-token products, tiled batch products) against the
//! naive path (a model whose linears are the dense reconstructions), on small-llama with AVD
//! blocks: the perplexity at a fixed budget agrees to 1e-4 relative, the logits of one-token
//! decoding to 1e-3 of their largest magnitude with f32 decode tables; with the 8-bit tables
//! (the default where the CPU has AVX-512 VBMI and VNNI) the logits agree to 3 % RMS and the
//! decode-path perplexity of 128 tokens to 1 %. A best-mode (bit-plane) stack of
//! small-llama, whose planes the runtime multiplies with `x` as two bytes where the CPU has
//! AVX-512 VNNI and GFNI, decodes with logits within 1e-3 RMS of the naive path's and
//! perplexity within 1e-4. Both feed a prompt within the runtime's `token_steps_limit`
//! one token at a time (the logits of `forward_next` token by token).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::sync::Arc;

use bitstack::best::{compress_best, BestOptions, BestOrder};
use bitstack::bits::{lowrank_q8_avx512, lowrank_q8_vectorized, Simd};
use bitstack::calibrate::CalibrationOptions;
use bitstack::chain::ChainChoice;
use bitstack::compress::compress;
use bitstack::engine::{model_of, tokenizer_of};
use bitstack::model::{windows, CausalLm};
use bitstack::runtime::DecodeTables;
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
    stack.set_decode_tables(DecodeTables::F32);
    exact_decode_agrees(&fast, &naive, &ids[..8], "f32 tables");
    // 8-bit products (tables; tiles where the CPU has AMX): one token at a time over 128
    // tokens.
    for (tables, what) in [
        (DecodeTables::Int8, "8-bit tables"),
        (DecodeTables::Int8Tiles, "8-bit tiles"),
    ] {
        stack.set_decode_tables(tables);
        decode_agrees(&fast, &naive, &ids[..129], (3e-2, 1e-2), what);
    }
    // A prompt short enough goes through the one-token products, as decoding does.
    stack.set_decode_tables(DecodeTables::default());
    let limit = if lowrank_q8_avx512(Simd::Auto) {
        16
    } else if lowrank_q8_vectorized(Simd::Auto) {
        6
    } else {
        2
    };
    short_prompts_step(&stack, &fast, &ids[..limit], limit);
    stack.set_decode_tables(DecodeTables::F32);
    short_prompts_step(&stack, &fast, &ids[..2], 2);
}

/// Every matrix of `stack` and the model say `limit` tokens cost less one at a time, and a
/// `prompt` of at most that many tokens through `forward_cached` gives the logits of
/// feeding it one token at a time.
fn short_prompts_step(stack: &LoadedStack, model: &CausalLm, prompt: &[u32], limit: usize) {
    for m in 0..stack.file().matrix_count() {
        assert_eq!(stack.token_steps_limit(m), limit, "matrix {m}");
    }
    assert_eq!(model.token_steps_limit(), limit);
    assert!(prompt.len() <= limit);
    let stepped = model
        .forward_cached(prompt, &mut model.new_cache())
        .unwrap();
    let mut cache = model.new_cache();
    let mut one_by_one = Vec::new();
    for &t in prompt {
        one_by_one = model.forward_next(t, &mut cache).unwrap();
    }
    assert_eq!(
        stepped,
        one_by_one,
        "{} tokens, limit {limit}",
        prompt.len()
    );
}

/// One token at a time over `tokens` with exact products: every logit of the fast model
/// within 1e-3 of the naive model's largest magnitude.
fn exact_decode_agrees(fast: &CausalLm, naive: &CausalLm, tokens: &[u32], what: &str) {
    let mut cache = fast.new_cache();
    let mut naive_cache = naive.new_cache();
    for &t in tokens {
        let a = fast.forward_next(t, &mut cache).unwrap();
        let b = naive.forward_next(t, &mut naive_cache).unwrap();
        let scale = b.iter().fold(0f32, |m, v| m.max(v.abs()));
        for (x, y) in a.iter().zip(&b) {
            assert!((x - y).abs() <= 1e-3 * scale, "{what}: {x} vs {y}");
        }
    }
}

/// One token at a time over `tokens`: the fast model's logits within `(rms_tol, ppl_tol)`:
/// `rms_tol` RMS of the naive model's, and its decode-path perplexity within `ppl_tol`
/// relative.
fn decode_agrees(
    fast: &CausalLm,
    naive: &CausalLm,
    tokens: &[u32],
    (rms_tol, ppl_tol): (f64, f64),
    what: &str,
) {
    let mut cache = fast.new_cache();
    let mut naive_cache = naive.new_cache();
    let (mut nll, mut naive_nll, mut diff, mut norm) = (0.0f64, 0.0f64, 0.0f64, 0.0f64);
    let log_prob = |logits: &[f32], next: u32| -> f64 {
        let max = logits.iter().fold(f32::MIN, |a, &b| a.max(b));
        let sum: f64 = logits.iter().map(|&l| f64::from(l - max).exp()).sum();
        f64::from(logits[next as usize] - max) - sum.ln()
    };
    for pair in tokens.windows(2) {
        let a = fast.forward_next(pair[0], &mut cache).unwrap();
        let b = naive.forward_next(pair[0], &mut naive_cache).unwrap();
        nll -= log_prob(&a, pair[1]);
        naive_nll -= log_prob(&b, pair[1]);
        for (x, y) in a.iter().zip(&b) {
            diff += f64::from(x - y).powi(2);
            norm += f64::from(*y).powi(2);
        }
    }
    let rms = (diff / norm).sqrt();
    let ratio = ((nll - naive_nll) / (tokens.len() - 1) as f64).exp();
    assert!(rms <= rms_tol, "{what}: logits differ by {rms} RMS");
    assert!(
        (ratio - 1.0).abs() <= ppl_tol,
        "{what}: decode-path perplexity ratio {ratio}"
    );
    eprintln!("{what}: logits RMS difference {rms:.2e}, perplexity ratio {ratio:.5}");
}

/// A best-mode stack of small-llama (8 planes of groups of 128: its 512- and 1536-column
/// matrices take the nested code kernel) at two budgets: with exact products the logits of
/// one-token decoding agree with the naive path to 1e-3 of their largest magnitude, with the
/// default (`x` as two bytes for planes) to 1e-3 RMS, and the decode-path perplexity of 128
/// tokens to 1e-4 (measured: 1.1e-4 RMS, 1e-5).
#[test]
fn small_llama_best_mode_decode_matches_the_naive_path() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("small-best.bitstack");
    let best = BestOptions {
        order: BestOrder::OutputError,
        chains: ChainChoice::Planes,
        ..BestOptions::default()
    };
    let calibration = CalibrationOptions {
        calib_text: shared().join("data/calib.txt"),
        calib_windows: 2,
        score_text: shared().join("data/score.txt"),
        score_windows: 1,
        seq: 256,
    };
    compress_best(
        &shared().join("models/small-llama"),
        &out,
        &CompressOptions::default(),
        &best,
        &calibration,
        &|_| {},
    )
    .unwrap();
    let file = Arc::new(StackFile::open(&out).unwrap());
    let layout = file.layout().clone();
    let text = std::fs::read_to_string(shared().join("data/test.txt")).unwrap();
    for budget in [
        layout.max_memory(),
        (layout.min_memory() + layout.max_memory()) / 2,
    ] {
        let stack = Arc::new(LoadedStack::load(file.clone(), budget).unwrap());
        let fast = model_of(&stack).unwrap();
        let naive = dense_model(&stack);
        let ids = tokenizer_of(&stack).unwrap().encode(&text).unwrap();
        stack.set_decode_tables(DecodeTables::F32);
        exact_decode_agrees(&fast, &naive, &ids[..8], &format!("budget {budget}"));
        stack.set_decode_tables(DecodeTables::default());
        decode_agrees(
            &fast,
            &naive,
            &ids[..129],
            (1e-3, 1e-4),
            &format!("best mode at {budget} B, two-byte x"),
        );
        short_prompts_step(&stack, &fast, &ids[..3], 3);
    }
}
