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
