//! Best mode (`compress --mode best`) on the bundled tiny model: the embedding table is
//! stacked, plane blocks load, resize and compute like AVD blocks, and the fast runtime path
//! (packed matvec, tiled batch product, per-row embedding lookup) gives the same perplexity
//! as a model built from the dense reconstructions (the naive path).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::sync::Arc;

use bitstack::best::{compress_best, BestOptions, BestOrder, EMBED};
use bitstack::calibrate::CalibrationOptions;
use bitstack::chain::ChainChoice;
use bitstack::engine::{model_of, tokenizer_of};
use bitstack::model::windows;
use bitstack::runtime::{Block, DecodeTables};
use bitstack::{CompressOptions, LoadedStack, StackFile};

mod common;
use common::dense_model;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The bundled calibration and scoring texts: `calib_windows` windows of `seq` tokens, one
/// scoring window.
fn calibration(calib_windows: usize, seq: usize) -> CalibrationOptions {
    let data = root().join("fixtures/data");
    CalibrationOptions {
        calib_text: data.join("calib.txt"),
        calib_windows,
        score_text: data.join("score.txt"),
        score_windows: 1,
        seq,
    }
}

/// Best mode on the bundled tiny model with `best`, calibrated on 4 windows of 256 tokens.
fn compress_tiny_best(out: &std::path::Path, best: &BestOptions) -> bitstack::CompressSummary {
    compress_best(
        &root().join("fixtures/tiny-qwen2"),
        out,
        &CompressOptions::default(),
        best,
        &calibration(4, 256),
        &|_| {},
    )
    .unwrap()
}

fn compress_tiny(dir: &std::path::Path) -> PathBuf {
    compress_tiny_ordered(dir, BestOrder::Gain)
}

fn compress_tiny_ordered(dir: &std::path::Path, order: BestOrder) -> PathBuf {
    compress_tiny_with(dir, order, ChainChoice::Planes)
}

fn compress_tiny_with(dir: &std::path::Path, order: BestOrder, chains: ChainChoice) -> PathBuf {
    let out = dir.join(format!("tiny-best-{order:?}-{chains:?}.bitstack"));
    let best = BestOptions {
        planes: bitstack::decompose::PlaneParams {
            group: 64,
            planes: 5,
        },
        order,
        chains,
        ..BestOptions::default()
    };
    let summary = compress_tiny_best(&out, &best);
    // 28 decoder linears + the tied embedding table (once); an AVD block adds one per chain.
    assert_eq!(summary.matrices, 29);
    let avd = usize::from(chains == ChainChoice::AvdFirst);
    assert_eq!(summary.blocks, 29 * (5 + avd));
    out
}

#[test]
fn planes_stack_embeddings_resize_and_match_the_dense_path() {
    let dir = tempfile::tempdir().unwrap();
    let out = compress_tiny(dir.path());
    let file = Arc::new(StackFile::open(&out).unwrap());
    let manifest = file.container().manifest();
    assert_eq!(manifest.metadata["compress"]["mode"], "best");
    assert!(file.matrix_index(EMBED).is_some(), "embedding not stacked");
    // Only norms and biases stay fixed.
    for f in &manifest.fixed {
        assert!(
            f.name.ends_with("norm.weight") || f.name.ends_with(".bias"),
            "{} is fixed",
            f.name
        );
    }
    assert!(manifest.blocks.iter().all(|b| b.kind == "planes"));
    fast_path_matches_naive_while_resizing(file);
}

/// Mixed chains (an AVD block, then planes of its residual) load, resize and compute like
/// plane chains: fast path = naive path at every budget, products and rows = reconstruction.
#[test]
fn avd_first_chains_mix_block_kinds_and_match_the_dense_path() {
    let dir = tempfile::tempdir().unwrap();
    let out = compress_tiny_with(dir.path(), BestOrder::Gain, ChainChoice::AvdFirst);
    let file = Arc::new(StackFile::open(&out).unwrap());
    let manifest = file.container().manifest();
    assert_eq!(manifest.metadata["compress"]["kind"], "avd+planes");
    for b in &manifest.blocks {
        let want = if b.index == 0 { "avd" } else { "planes" };
        assert_eq!(b.kind, want, "block {} of matrix {}", b.index, b.matrix);
    }
    let (block, _) = file.read_block(0, &[]).unwrap();
    assert!(matches!(block, Block::Avd(_)));
    products_and_rows_match_the_reconstruction(&file);
    fast_path_matches_naive_while_resizing(file);
}

/// Full-depth GPTQ planes (`gptq_windows > 0`): other bits than plain planes on the same
/// grid, and a stack that loads, resizes and computes like any other.
#[test]
fn gptq_planes_change_bits_not_grids_and_run() {
    let dir = tempfile::tempdir().unwrap();
    let compress = |gptq_windows: usize| {
        let out = dir.path().join(format!("gptq-{gptq_windows}.bitstack"));
        let best = BestOptions {
            planes: bitstack::decompose::PlaneParams {
                group: 64,
                planes: 4,
            },
            chains: ChainChoice::Planes,
            order: BestOrder::Levels,
            gptq_windows,
            ..BestOptions::default()
        };
        compress_tiny_best(&out, &best);
        Arc::new(StackFile::open(&out).unwrap())
    };
    let (plain, gptq) = (compress(0), compress(4));
    assert_eq!(
        gptq.container().manifest().metadata["compress"]["gptq_windows"],
        4
    );
    // Same order (levels), same sizes; the grids (plane 0's mid/half) agree, the bits of the
    // compensated matrices differ.
    assert_eq!(plain.layout().order(), gptq.layout().order());
    let mut differing = 0;
    // Levels order: the first block of every matrix (plane 0, which carries the grid) first.
    for position in 0..plain.matrix_count() {
        let a = plain.read_block(position, &[]).unwrap().0;
        let b = gptq.read_block(position, &[]).unwrap().0;
        if let (Block::Plane(a), Block::Plane(b)) = (a, b) {
            assert_eq!(a.grid(), b.grid());
            differing += usize::from(a.signs().as_bytes() != b.signs().as_bytes());
        }
    }
    assert!(differing > 0, "GPTQ changed no bit of any plane 0");
    fast_path_matches_naive_while_resizing(gptq);
}

fn fast_path_matches_naive_while_resizing(file: Arc<StackFile>) {
    let layout = file.layout().clone();
    // The minimum (one block per matrix, 16-bit-free) is far below a 16-bit embedding table.
    let embed_16bit = 8192 * 256 * 2;
    assert!(layout.min_memory() < embed_16bit / 2);

    let data = root().join("fixtures/data");
    let stack = Arc::new(LoadedStack::load(file.clone(), layout.min_memory()).unwrap());
    // Exact decode tables for the AVD blocks of mixed chains (the 8-bit ones are checked
    // against their rounding bound in bitstack-runtime's and bitstack-bits' tests).
    stack.set_decode_tables(DecodeTables::F32);
    let fast = model_of(&stack).unwrap();
    let tokenizer = tokenizer_of(&stack).unwrap();
    let text = std::fs::read_to_string(data.join("test.txt")).unwrap();
    let ids = tokenizer.encode(&text).unwrap();
    let w = windows(&ids, 128, Some(1));
    let mut best = f64::INFINITY;
    let mut first = None;
    let budgets = layout.budget_steps(3);
    for &budget in budgets.iter().chain(budgets.iter().rev()) {
        let before = stack.counters();
        let report = stack.resize(budget).unwrap();
        let after = stack.counters();
        assert_eq!(stack.resident_bytes(), stack.plan().memory_bytes);
        assert_eq!(after.bytes_read - before.bytes_read, report.bytes_read);
        // Fast path (packed matvec / tiles / per-row embedding) vs naive dense path.
        let naive = dense_model(&stack);
        let fast_ppl = fast.perplexity(&w).unwrap().ppl;
        let naive_ppl = naive.perplexity(&w).unwrap().ppl;
        assert!(
            ((fast_ppl - naive_ppl) / naive_ppl).abs() < 1e-4,
            "budget {budget}: fast {fast_ppl} vs naive {naive_ppl}"
        );
        // One token at a time (the packed matvec of every block kind).
        let mut cache = fast.new_cache();
        let mut naive_cache = naive.new_cache();
        for &t in &ids[..4] {
            let a = fast.forward_next(t, &mut cache).unwrap();
            let b = naive.forward_next(t, &mut naive_cache).unwrap();
            let scale = b.iter().fold(0f32, |m, v| m.max(v.abs()));
            for (x, y) in a.iter().zip(&b) {
                assert!((x - y).abs() <= 1e-3 * scale, "{x} vs {y}");
            }
        }
        first.get_or_insert(fast_ppl);
        best = best.min(fast_ppl);
    }
    assert!(best < first.unwrap(), "more planes never helped");
}

#[test]
fn plane_rows_and_products_match_the_reconstruction() {
    let dir = tempfile::tempdir().unwrap();
    let out = compress_tiny(dir.path());
    let file = Arc::new(StackFile::open(&out).unwrap());
    products_and_rows_match_the_reconstruction(&file);
    // Every block decodes to the plane kind.
    let (block, _) = file.read_block(0, &[]).unwrap();
    assert!(matches!(block, Block::Plane(_)));
}

/// The loaded matrices rebuilt block by block with each block's own `add_to_dense` (one
/// plane at a time: independent of the code kernels the runtime uses).
fn block_by_block(file: &StackFile, stack: &LoadedStack) -> Vec<Vec<f32>> {
    let mut chains: Vec<Vec<Arc<Block>>> = vec![Vec::new(); file.matrix_count()];
    let mut dense: Vec<Vec<f32>> = (0..file.matrix_count())
        .map(|m| vec![0.0; file.shape(m).0 * file.shape(m).1])
        .collect();
    let manifest = file.container().manifest();
    for (position, entry) in manifest.blocks.iter().enumerate() {
        let m = entry.matrix;
        if chains[m].len() < stack.blocks_of(m) {
            let (block, _) = file.read_block(position, &chains[m]).unwrap();
            block.add_to_dense(&mut dense[m]);
            chains[m].push(Arc::new(block));
        }
    }
    dense
}

fn products_and_rows_match_the_reconstruction(file: &Arc<StackFile>) {
    let layout = file.layout().clone();
    let budget = (layout.min_memory() + layout.max_memory()) / 2;
    let stack = LoadedStack::load(file.clone(), budget).unwrap();
    // Exact decode tables (as in `fast_path_matches_naive_while_resizing`).
    stack.set_decode_tables(DecodeTables::F32);
    let oracle = block_by_block(file, &stack);
    for (m, want) in oracle.iter().enumerate() {
        let (rows, cols) = file.shape(m);
        let dense = stack.reconstruct_f32(m);
        let size = want.iter().fold(0f32, |a, v| a.max(v.abs()));
        for (i, (&got, &w)) in dense.iter().zip(want).enumerate() {
            assert!(
                (got - w).abs() <= 1e-5 * size,
                "{m} weight {i}: {got} vs {w}"
            );
        }
        let tokens = 3;
        let x: Vec<f32> = (0..tokens * cols)
            .map(|j| ((j * 7 % 13) as f32 - 6.0) / 6.0)
            .collect();
        let mut y = vec![0.0f32; rows];
        stack.matvec(m, &x[..cols], &mut y);
        let mut batch = vec![0.0f32; tokens * rows];
        stack.matmul(m, &x, tokens, &mut batch);
        for t in 0..tokens {
            let xt = &x[t * cols..(t + 1) * cols];
            for r in 0..rows {
                let row = &want[r * cols..(r + 1) * cols];
                let want: f32 = row.iter().zip(xt).map(|(a, b)| a * b).sum();
                let mag: f32 = row.iter().zip(xt).map(|(a, b)| (a * b).abs()).sum();
                let got = batch[t * rows + r];
                assert!(
                    (got - want).abs() <= 1e-4 * mag + 1e-6,
                    "{m} token {t} row {r}"
                );
                if t == 0 {
                    assert!((y[r] - want).abs() <= 1e-4 * mag + 1e-6, "{m} row {r}");
                }
            }
        }
        let mut row = vec![0.0f32; cols];
        for r in [0, rows / 2, rows - 1] {
            stack.row_into(m, r, &mut row);
            assert_eq!(&row[..], &dense[r * cols..(r + 1) * cols]);
        }
    }
}

#[test]
fn truncated_plane_file_loads_its_complete_prefix() {
    let dir = tempfile::tempdir().unwrap();
    let out = compress_tiny(dir.path());
    let bytes = std::fs::read(&out).unwrap();
    let full = Arc::new(StackFile::open(&out).unwrap());
    let layout = full.layout().clone();
    let cut = dir.path().join("cut.bitstack");
    // Cut inside the blocks, past the base model.
    let header = bytes.len() as u64 - layout.max_memory() - aux_bytes(&full);
    let keep = header + aux_bytes(&full) + (layout.min_memory() + layout.max_memory()) / 2;
    std::fs::write(&cut, &bytes[..keep as usize]).unwrap();
    let file = Arc::new(StackFile::open(&cut).unwrap());
    assert!(file.is_truncated());
    let stack = LoadedStack::load(file.clone(), u64::MAX).unwrap();
    assert!(stack.plan().memory_bytes <= file.layout().max_memory());
    let model = model_of(&Arc::new(stack)).unwrap();
    let logits = model.forward(&[1, 2, 3]).unwrap();
    assert!(logits.iter().all(|v| v.is_finite()));
}

/// Bytes of the aux files (config, tokenizer), which precede the fixed tensors.
fn aux_bytes(file: &StackFile) -> u64 {
    file.container()
        .manifest()
        .aux_files
        .iter()
        .map(|a| a.length)
        .sum()
}

#[test]
fn every_order_keeps_chains_in_order_and_levels_are_levels() {
    let dir = tempfile::tempdir().unwrap();
    for order in [
        BestOrder::Levels,
        BestOrder::Perplexity,
        BestOrder::OutputError,
    ] {
        let out = compress_tiny_ordered(dir.path(), order);
        let file = StackFile::open(&out).unwrap();
        let layout = file.layout();
        let mut next = vec![0u32; file.matrix_count()];
        for e in layout.order() {
            assert_eq!(
                e.block, next[e.matrix as usize],
                "{order:?}: chain out of order"
            );
            next[e.matrix as usize] += 1;
        }
        assert!(next.iter().all(|&n| n == 5));
        if matches!(order, BestOrder::Levels | BestOrder::Perplexity) {
            // Level-synchronous: all planes b before any plane b + 1.
            let levels: Vec<u32> = layout.order().iter().map(|e| e.block).collect();
            assert!(levels.windows(2).all(|p| p[0] <= p[1]), "{order:?}");
        }
        let scorer = &file.container().manifest().metadata["compress"]["scorer"];
        assert!(scorer.as_str().unwrap().contains(match order {
            BestOrder::Levels => "levels",
            BestOrder::Perplexity => "perplexity",
            _ => "output-error",
        }));
    }
}

/// An interrupted best-mode run (here: a panic in the middle of the sensitivity probe) keeps
/// its finished work in `<out>.partial/`; resuming reuses it and writes the same bytes as an
/// uninterrupted run, and a damaged or missing record is recomputed.
#[test]
fn interrupted_best_mode_resumes_to_identical_bytes() {
    use bitstack::resume::{progress_dir, Checkpointing};
    let dir = tempfile::tempdir().unwrap();
    let calibration = calibration(2, 128);
    let best = BestOptions {
        planes: bitstack::decompose::PlaneParams {
            group: 64,
            planes: 4,
        },
        ..BestOptions::default()
    };
    let model = root().join("fixtures/tiny-qwen2");
    type Report<'a> = &'a (dyn Fn(bitstack::compress::Progress<'_>) + Sync);
    let run = |out: &std::path::Path, mode: Checkpointing, progress: Report<'_>| {
        let options = CompressOptions {
            checkpointing: mode,
            ..CompressOptions::default()
        };
        compress_best(&model, out, &options, &best, &calibration, progress)
    };
    let whole = dir.path().join("whole.bitstack");
    run(&whole, Checkpointing::Fresh, &|_| {}).unwrap();
    assert!(!progress_dir(&whole).exists(), "progress removed");

    let cut = dir.path().join("cut.bitstack");
    let interrupt = |p: bitstack::compress::Progress<'_>| {
        if let bitstack::compress::Progress::Step { .. } = p {
            // Steps of the probe follow those of calibration and planes; count the saved
            // records instead of guessing which stage this is.
            let n = std::fs::read_dir(progress_dir(&cut))
                .map(|d| {
                    d.filter_map(|e| e.ok())
                        .filter(|e| e.file_name().to_string_lossy().starts_with("probe-"))
                        .count()
                })
                .unwrap_or(0);
            if n >= 10 {
                panic!("interrupted");
            }
        }
    };
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        run(&cut, Checkpointing::Fresh, &interrupt)
    }));
    assert!(outcome.is_err(), "the run was not interrupted");
    assert!(!cut.exists(), "an interrupted run leaves no output file");
    let partial = progress_dir(&cut);
    for f in [
        "run.json",
        "scales.bin",
        "head.bin",
        "probe-0.bin",
        "probe-9.bin",
    ] {
        assert!(partial.join(f).exists(), "{f} not saved");
    }
    // Some records lost, one cut short: recomputed.
    std::fs::remove_file(partial.join("probe-3.bin")).unwrap();
    let damaged = partial.join("probe-5.bin");
    let bytes = std::fs::read(&damaged).unwrap();
    std::fs::write(&damaged, &bytes[..bytes.len() / 2]).unwrap();
    // Records intact as files (magic, payload, CRC) whose contents this run cannot have
    // made: recomputed too. The head statistics with one entry too few (the scales, read
    // with them, are then recomputed as well), and a probe whose KL divergence is NaN.
    let record = |name: &str, payload: &[u8]| {
        let mut bytes = b"BSPART01".to_vec();
        bytes.extend_from_slice(payload);
        bytes.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
        std::fs::write(partial.join(name), bytes).unwrap();
    };
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(model.join("config.json")).unwrap()).unwrap();
    let (hidden, vocab) = (
        config["hidden_size"].as_u64().unwrap() as usize,
        config["vocab_size"].as_u64().unwrap() as usize,
    );
    let mut head = 2u64.to_le_bytes().to_vec();
    for (len, value) in [(hidden - 1, 0.5f32), (vocab, 1.0)] {
        head.extend_from_slice(&(len as u64).to_le_bytes());
        (0..len).for_each(|_| head.extend_from_slice(&value.to_le_bytes()));
    }
    record("head.bin", &head);
    // The saved probe's payload: the matrix's name (length, bytes), then the numbers.
    let saved = std::fs::read(partial.join("probe-7.bin")).unwrap();
    let name_len = u64::from_le_bytes(saved[8..16].try_into().unwrap()) as usize;
    let mut probe = saved[8..16 + name_len].to_vec();
    probe.extend_from_slice(&2u64.to_le_bytes());
    probe.extend_from_slice(&f64::NAN.to_bits().to_le_bytes());
    probe.extend_from_slice(&0.5f64.to_bits().to_le_bytes());
    record("probe-7.bin", &probe);

    let summary = run(&cut, Checkpointing::Resume, &|_| {}).unwrap();
    // The probe records 0–2, 4, 6, 8 and 9.
    assert_eq!(summary.reused, 7);
    assert_eq!(
        std::fs::read(&cut).unwrap(),
        std::fs::read(&whole).unwrap(),
        "resumed output differs from the uninterrupted one"
    );
    assert!(!partial.exists(), "progress removed after success");

    // Progress of this run, resumed with another alpha: refused, naming the difference.
    let options = CompressOptions {
        checkpointing: Checkpointing::Fresh,
        ..CompressOptions::default()
    };
    let stopped = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        compress_best(&model, &cut, &options, &best, &calibration, &|_| {
            panic!("stop")
        })
    }));
    assert!(stopped.is_err());
    let other = BestOptions {
        alpha: 0.25,
        ..best
    };
    let e = compress_best(
        &model,
        &cut,
        &CompressOptions {
            checkpointing: Checkpointing::Resume,
            ..CompressOptions::default()
        },
        &other,
        &calibration,
        &|_| {},
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("alpha"), "{e}");
}
