//! End-to-end benchmarks of a real model (the bundled tiny-qwen2, or the model directory in
//! `BITSTACK_BENCH_MODEL`, e.g. `../shared/models/small-llama`):
//! - one decoding step (a token after an 8-token prompt) and the perplexity evaluation of two
//!   real-text windows, with the model at 4 AVD blocks per matrix (paper mode, the
//!   reference's rank for the model's width) against the dense f32 model in the same engine;
//! - the perplexity scorer's level 1 (every matrix a candidate, two scoring windows) against
//!   the straightforward implementation (`StraightforwardScorer`) on both threads and on one.
//!
//! `bitstack bench --only e2e --only scorer` prints the same comparisons as ratios.
//!
//! `cargo bench -p bitstack-benches --bench model`

#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bitstack::calibrate::{CalibrationOptions, PerplexityScorer, StraightforwardScorer};
use bitstack::checkpoint::Checkpoint;
use bitstack::compress::{compress, decompose_checkpoint, read_architecture, CompressOptions};
use bitstack::engine::model_of;
use bitstack::model::{CausalLm, TextTokenizer};
use bitstack::order::BlockScorer;
use bitstack::runtime::{LoadedStack, StackFile};
use criterion::{criterion_group, criterion_main, BenchmarkGroup, Criterion, SamplingMode};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn model_dir() -> PathBuf {
    std::env::var_os("BITSTACK_BENCH_MODEL")
        .map_or_else(|| repo().join("fixtures/tiny-qwen2"), PathBuf::from)
}

fn model_name() -> String {
    model_dir()
        .file_name()
        .map_or_else(|| "model".into(), |n| n.to_string_lossy().replace('-', "_"))
}

fn text_windows(options: &CalibrationOptions) -> Vec<Vec<u32>> {
    let tokenizer = TextTokenizer::from_model_dir(model_dir()).unwrap();
    options.windows(&tokenizer).unwrap().1
}

/// Ten samples in about `secs` seconds; runs longer than a tenth of that are sampled flat
/// (the same number of iterations per sample), so that each sample is one or a few runs.
fn configure(g: &mut BenchmarkGroup<'_, criterion::measurement::WallTime>, secs: u64, flat: bool) {
    if flat {
        g.sampling_mode(SamplingMode::Flat);
    }
    g.sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(secs));
}

/// Decoding and evaluation, paper mode at 4 blocks per matrix against dense f32.
fn end_to_end(c: &mut Criterion) {
    let dir = model_dir();
    let dense = CausalLm::load(&dir).unwrap();
    let mut options = CompressOptions::default();
    options.avd.k = dense.config().reference_rank();
    options.avd.niter = 4;
    let out = tempfile::tempdir().unwrap();
    let path = out.path().join("paper.bitstack");
    compress(&dir, &path, &options, &|_| {}).unwrap();
    let file = Arc::new(StackFile::open(&path).unwrap());
    let budget = file.layout().max_memory();
    let stack = Arc::new(LoadedStack::load(file, budget).unwrap());
    let paper = model_of(&stack).unwrap();
    let k = options.avd.k;
    let models = [
        ("dense_f32", &dense),
        (&*format!("paper_k{k}_4blocks"), &paper),
    ];

    let name = model_name();
    let mut g = c.benchmark_group(format!("model/{name}_decode_step"));
    configure(&mut g, 3, false);
    let prompt: Vec<u32> = (1..9).collect();
    for (what, model) in models {
        let mut cache = model.new_cache();
        let mut logits = vec![0.0f32; model.config().vocab_size];
        model
            .forward_cached_into(&prompt, &mut cache, &mut logits)
            .unwrap();
        g.bench_function(what, |b| {
            b.iter(|| {
                model
                    .forward_cached_into(black_box(&[42]), &mut cache, &mut logits)
                    .unwrap();
                cache.truncate(prompt.len());
            })
        });
    }
    g.finish();

    let seq = dense.config().max_position_embeddings.min(512);
    let windows = text_windows(&CalibrationOptions {
        calib_text: repo().join("fixtures/data/calib.txt"),
        calib_windows: 0,
        score_text: repo().join("fixtures/data/valid.txt"),
        score_windows: 2,
        seq,
    });
    let windows: Vec<&[u32]> = windows.iter().map(Vec::as_slice).collect();
    let mut g = c.benchmark_group(format!("model/{name}_eval_2x{seq}"));
    configure(&mut g, 5, false);
    for (what, model) in models {
        g.bench_function(what, |b| {
            b.iter(|| model.perplexity(black_box(&windows)).unwrap())
        });
    }
    g.finish();
}

/// The scorer's level 1 against the straightforward implementation.
fn scorer(c: &mut Criterion) {
    let dir = model_dir();
    let checkpoint = Checkpoint::open(&dir).unwrap();
    let arch = read_architecture(&checkpoint).unwrap();
    let names = bitstack::select::select_matrices(&checkpoint, arch.as_deref(), &[]).unwrap();
    let load = || CausalLm::load(&dir).unwrap();
    let mut options = CompressOptions::default();
    options.avd.k = load().config().reference_rank();
    options.avd.niter = 2;
    let spool = tempfile::tempdir().unwrap();
    let decomposed =
        decompose_checkpoint(&checkpoint, &names, &options, None, spool.path(), &|_| {}).unwrap();
    let windows = text_windows(&CalibrationOptions {
        calib_text: repo().join("fixtures/data/calib.txt"),
        calib_windows: 0,
        score_text: repo().join("fixtures/data/score.txt"),
        score_windows: 2,
        seq: 128,
    });
    let candidates: Vec<u32> = (0..names.len() as u32).collect();
    let mut fast = PerplexityScorer::new(load(), &decomposed, windows.clone(), &|_| {}).unwrap();
    let mut plain = StraightforwardScorer::new(load(), &decomposed, windows, 1).unwrap();
    let one_thread = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .unwrap();

    let mut g = c.benchmark_group(format!(
        "model/{}_scorer_level1_{}x2x128",
        model_name(),
        candidates.len()
    ));
    configure(&mut g, 10, true);
    g.bench_function("scorer", |b| {
        b.iter(|| fast.score_level(1, black_box(&candidates)).unwrap())
    });
    g.bench_function("straightforward", |b| {
        b.iter(|| plain.score_level(1, black_box(&candidates)).unwrap())
    });
    g.bench_function("straightforward_1thread", |b| {
        b.iter(|| {
            one_thread
                .install(|| plain.score_level(1, black_box(&candidates)))
                .unwrap()
        })
    });
    g.finish();
}

criterion_group!(benches, end_to_end, scorer);
criterion_main!(benches);
