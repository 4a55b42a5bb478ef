//! The calibrated pipeline on the bundled tiny model, small enough for CI: a larger budget
//! never gives a clearly worse perplexity on the scoring text, and the minimum is worse than
//! the full stack.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::sync::Arc;

use bitstack::calibrate::{compress_calibrated, CalibrationOptions};
use bitstack::engine::{model_of, tokenizer_of};
use bitstack::model::windows;
use bitstack::{CompressOptions, LoadedStack, StackFile};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

#[test]
fn larger_budgets_are_not_worse() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("tiny.bitstack");
    let mut options = CompressOptions::default();
    options.avd.k = 2;
    options.avd.niter = 5;
    let data = root().join("fixtures/data");
    let calibration = CalibrationOptions {
        calib_text: data.join("calib.txt"),
        calib_windows: 4,
        score_text: data.join("score.txt"),
        score_windows: 2,
        seq: 512,
    };
    let summary = compress_calibrated(
        &root().join("fixtures/tiny-qwen2"),
        &out,
        &options,
        &calibration,
        &|_| {},
    )
    .unwrap();
    assert_eq!(summary.matrices, 28);
    assert_eq!(summary.blocks, 28 * 5);

    let file = Arc::new(StackFile::open(&out).unwrap());
    let meta = &file.container().manifest().metadata;
    assert_eq!(meta["compress"]["scorer"], "perplexity");
    let layout = file.layout().clone();
    let stack = Arc::new(LoadedStack::load(file.clone(), layout.min_memory()).unwrap());
    let model = model_of(&stack).unwrap();
    let tokenizer = tokenizer_of(&stack).unwrap();
    let text = std::fs::read_to_string(data.join("score.txt")).unwrap();
    let ids = tokenizer.encode(&text).unwrap();
    let w = windows(&ids, 512, Some(2));
    let mut previous = f64::INFINITY;
    let mut first = None;
    for budget in layout.budget_steps(6) {
        stack.resize(budget).unwrap();
        assert_eq!(stack.resident_bytes(), stack.plan().memory_bytes);
        let ppl = model.perplexity(&w).unwrap().ppl;
        assert!(ppl.is_finite());
        assert!(
            ppl <= previous * 1.02,
            "budget {budget}: perplexity {ppl} clearly worse than {previous} at a smaller budget"
        );
        first.get_or_insert(ppl);
        previous = ppl;
    }
    assert!(
        first.unwrap() > previous * 1.5,
        "minimum-budget model ({}) should be clearly worse than the full stack ({previous})",
        first.unwrap()
    );
}

/// The perplexity scorer (hidden states and each layer's products reused, a candidate's layer
/// run again from its own linear, windows on separate threads) scores every candidate as a
/// straightforward evaluation does: all matrices rebuilt from their blocks, the whole model
/// run on each window. Two levels (the second after the scorer has moved on), the candidates
/// out of matrix order, tiny-qwen2 (q/k/v biases, tied embeddings).
#[test]
fn the_scorer_matches_a_straightforward_evaluation() {
    use bitstack::calibrate::{PerplexityScorer, StraightforwardScorer};
    use bitstack::checkpoint::Checkpoint;
    use bitstack::compress::{decompose_checkpoint, read_architecture};
    use bitstack::model::{CausalLm, DenseLinear, Linear, LinearSlot, TextTokenizer};
    use bitstack::order::BlockScorer;

    let model_dir = root().join("fixtures/tiny-qwen2");
    let checkpoint = Checkpoint::open(&model_dir).unwrap();
    let arch = read_architecture(&checkpoint).unwrap();
    let names = bitstack::select::select_matrices(&checkpoint, arch.as_deref(), &[]).unwrap();
    let mut options = CompressOptions::default();
    options.avd.k = 2;
    options.avd.niter = 3;
    let spool = tempfile::tempdir().unwrap();
    let decomposed =
        decompose_checkpoint(&checkpoint, &names, &options, None, spool.path(), &|_| {}).unwrap();
    let tokenizer = TextTokenizer::from_model_dir(&model_dir).unwrap();
    let text = std::fs::read_to_string(root().join("fixtures/data/score.txt")).unwrap();
    let ids = tokenizer.encode(&text).unwrap();
    let w: Vec<Vec<u32>> = windows(&ids, 96, Some(3))
        .into_iter()
        .map(<[u32]>::to_vec)
        .collect();
    assert_eq!(w.len(), 3);

    let mut scorer = PerplexityScorer::new(
        CausalLm::load(&model_dir).unwrap(),
        &decomposed,
        w.clone(),
        &|_| {},
    )
    .unwrap();
    // The library's baseline (the benchmarks' straightforward implementation), able to
    // score levels 1 and 2.
    let mut baseline = StraightforwardScorer::new(
        CausalLm::load(&model_dir).unwrap(),
        &decomposed,
        w.clone(),
        2,
    )
    .unwrap();
    let mut plain = CausalLm::load(&model_dir).unwrap();
    let places: Vec<(usize, LinearSlot)> = names
        .iter()
        .map(|n| LinearSlot::parse_weight_name(n).unwrap())
        .collect();
    // Reversed, every third left out: layers and slots out of order.
    let candidates: Vec<u32> = (0..names.len() as u32)
        .rev()
        .filter(|m| m % 3 != 1)
        .collect();
    for level in [1u32, 2] {
        let fast = scorer.score_level(level, &candidates).unwrap();
        assert_eq!(fast.len(), candidates.len());
        let slow = baseline.score_level(level, &candidates).unwrap();
        assert_eq!(slow.len(), candidates.len());
        for ((&c, &score), &slow) in candidates.iter().zip(&fast).zip(&slow) {
            for (m, &(layer, slot)) in places.iter().enumerate() {
                let (r, cols) = decomposed.shapes[m];
                let blocks = level as usize + usize::from(m == c as usize);
                let mut weight = vec![0.0f32; r * cols];
                for b in 0..blocks {
                    decomposed.block(m, b).unwrap().add_to_dense(&mut weight);
                }
                let linear: Arc<dyn Linear> = Arc::new(DenseLinear::new(weight, r, cols).unwrap());
                plain.set_linear(layer, slot, linear).unwrap();
            }
            let (mut nll, mut count) = (0.0, 0);
            for window in &w {
                nll += plain.window_nll(window).unwrap();
                count += window.len() - 1;
            }
            let expected = (nll / count as f64).exp();
            assert_eq!(
                slow.to_bits(),
                expected.to_bits(),
                "level {level}, {}: StraightforwardScorer {slow}, straightforward {expected}",
                names[c as usize]
            );
            assert!(
                ((score - expected) / expected).abs() <= 1e-9,
                "level {level}, {}: scorer {score}, straightforward {expected}",
                names[c as usize]
            );
        }
    }
    // A candidate without a next block is an error, not a panic.
    assert!(scorer.score_level(3, &[0]).is_err());
    assert!(baseline.score_level(3, &[0]).is_err());
    assert!(baseline.score_level(1, &[names.len() as u32]).is_err());
}
