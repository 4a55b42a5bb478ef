//! `bitstack bench`: the speed comparisons of issue 4, side by side in one process.
//!
//! Every ratio is measured in this run on this machine (best of a few repetitions, the two
//! sides of a decode, batch or end-to-end ratio in alternating rounds), so that a shared,
//! noisy box still gives comparable numbers.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use bitstack::best::{compress_best, BestOptions, BestOrder};
use bitstack::calibrate::CalibrationOptions;
use bitstack::chain::ChainChoice;
use bitstack::compress::{compress as run_compress, CompressOptions};
use bitstack::decompose::{
    decompose, decompose_planes, planes_matvec_add, planes_matvec_add_q16, AvdParams, PlaneBlock,
    PlaneParams, PlaneTable, SvdMethod,
};
use bitstack::engine::model_of;
use bitstack::format::ContainerWriter;
use bitstack::model::{dense_forward, matvec, CausalLm, Sampler};
use bitstack::runtime::{DecodeTables, LoadedStack, StackFile};
use clap::Args;
use serde_json::{json, Map, Value};

/// Options of `bitstack bench`.
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// A smaller version (shapes 1024×1024 and 3584×1024, the bundled tiny model) that
    /// finishes in about a minute.
    #[arg(long)]
    pub quick: bool,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Run only these groups (repeatable): `avd`, `kernels` (decode and batch), `e2e`,
    /// `scorer` (the perplexity scorer against a straightforward implementation), `stack`
    /// (the --stack file against the dense model).
    #[arg(long, value_name = "GROUP")]
    pub only: Vec<String>,
    /// Model directory for the end-to-end rows (default: ../shared/models/small-llama, or
    /// fixtures/tiny-qwen2 with --quick).
    #[arg(long, value_name = "DIR")]
    pub model: Option<PathBuf>,
    /// Group `stack`: also time decoding and perplexity evaluation with this .bitstack file
    /// (e.g. a best-mode stack of the --model) against the dense model, side by side.
    #[arg(long, value_name = "FILE")]
    pub stack: Option<PathBuf>,
    /// Budget at which --stack is loaded (default: the whole stack).
    #[arg(long, value_name = "SIZE", requires = "stack")]
    pub budget: Option<String>,
    /// Group `scorer`: scoring windows of 512 tokens from the scoring text (default 4; the
    /// reference method uses 32; --quick: 2 windows of 128 tokens).
    #[arg(long, value_name = "N")]
    pub scorer_windows: Option<usize>,
}

/// Best (minimum) wall time in seconds of `reps` runs of `f`.
fn best_of(reps: usize, mut f: impl FnMut()) -> f64 {
    (0..reps.max(1))
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min)
}

/// The best times of `f` and of `g` over `rounds` alternating blocks of `reps` runs each, so
/// that both see the same quiet and busy spells of a shared machine (each block's first run
/// may find the caches as the other left them; the best of the rest is warm).
fn best_of_alternating(
    rounds: usize,
    reps: usize,
    mut f: impl FnMut(),
    mut g: impl FnMut(),
) -> (f64, f64) {
    (0..rounds.max(1)).fold((f64::INFINITY, f64::INFINITY), |(a, b), _| {
        (a.min(best_of(reps, &mut f)), b.min(best_of(reps, &mut g)))
    })
}

/// Bytes of the last-level cache (Linux sysfs; 64 MiB where it cannot be read).
fn last_level_cache_bytes() -> usize {
    let parse = |t: &str| -> Option<usize> {
        let t = t.trim();
        let (num, mult) = match t.strip_suffix('K') {
            Some(n) => (n, 1 << 10),
            None => match t.strip_suffix('M') {
                Some(n) => (n, 1 << 20),
                None => (t, 1),
            },
        };
        num.parse::<usize>().ok().map(|n| n * mult)
    };
    (0..8)
        .filter_map(|i| {
            std::fs::read_to_string(format!("/sys/devices/system/cpu/cpu0/cache/index{i}/size"))
                .ok()
                .and_then(|t| parse(&t))
        })
        .max()
        .unwrap_or(64 << 20)
}

/// Best wall time of `reps` runs of `f`, each run after `evict` has been read through, so
/// that `f` finds its operands in main memory rather than in the caches: the situation of
/// a model larger than the last-level cache, whose every matrix is read once per token.
fn best_of_cold(reps: usize, evict: &mut [u64], mut f: impl FnMut()) -> f64 {
    (0..reps.max(1))
        .map(|rep| {
            // Write every line (a read could leave clean copies that a non-inclusive L3
            // keeps); the sum keeps the pass from being optimized away.
            let mut sum = 0u64;
            for (i, v) in evict.iter_mut().enumerate().step_by(8) {
                *v = v.wrapping_add(rep as u64 ^ i as u64);
                sum = sum.wrapping_add(*v);
            }
            std::hint::black_box(sum);
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min)
}

/// A matrix with a decaying spectrum: Gaussian-like entries with column scales
/// `(1 + j)^-0.5` plus a rank-8 component (a stand-in for a trained weight).
fn synthetic(rows: usize, cols: usize, seed: u64) -> Vec<f32> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state >> 40) as f32 / (1u64 << 24) as f32 - 0.5
    };
    let scale: Vec<f32> = (0..cols).map(|j| (1.0 + j as f32).powf(-0.5)).collect();
    let a: Vec<f32> = (0..rows * 8).map(|_| next()).collect();
    let b: Vec<f32> = (0..8 * cols).map(|_| next()).collect();
    let mut w = vec![0.0f32; rows * cols];
    for i in 0..rows {
        for j in 0..cols {
            let g = next() + next() + next();
            let low: f32 = (0..8).map(|r| a[i * 8 + r] * b[r * cols + j]).sum();
            w[i * cols + j] = g * scale[j] + 0.05 * low;
        }
    }
    w
}

/// A container of one matrix with these blocks, loaded at its full size.
fn stack_of(
    blocks: &[bitstack::decompose::AvdBlock],
    rows: usize,
    cols: usize,
) -> Result<LoadedStack> {
    let mut writer = ContainerWriter::new(Default::default());
    writer.add_matrix("w", rows, cols, "F32")?;
    for (b, block) in blocks.iter().enumerate() {
        bitstack::compress::push_avd_block(&mut writer, 0, b, block.clone())?;
    }
    writer.set_mandatory_blocks(1);
    let container = bitstack::format::Container::from_bytes(writer.to_bytes()?)?;
    let file = Arc::new(StackFile::from_container(container)?);
    Ok(LoadedStack::load(file, u64::MAX)?)
}

struct Row {
    what: String,
    ours: f64,
    baseline: f64,
    unit: &'static str,
}

pub fn bench(args: BenchArgs) -> Result<()> {
    let quick = args.quick;
    let (k, blocks) = (16usize, 4usize);
    let shapes: [(usize, usize); 2] = if quick {
        [(1024, 1024), (3584, 1024)]
    } else {
        [(4096, 4096), (14336, 4096)]
    };
    let mut rows: Vec<Row> = Vec::new();
    let mut keys = Map::new();
    let note = |s: &str| eprintln!("bench: {s}");
    for g in &args.only {
        if !["avd", "kernels", "e2e", "scorer", "stack"].contains(&g.as_str()) {
            bail!("--only {g}: the groups are avd, kernels, e2e, scorer, stack");
        }
    }
    if args.only.iter().any(|g| g == "stack") && args.stack.is_none() {
        bail!("--only stack needs --stack FILE");
    }
    if args.stack.is_some() && !args.only.is_empty() && !args.only.iter().any(|g| g == "stack") {
        bail!("--stack is timed by group `stack`: add --only stack (or leave --only out)");
    }
    let run = |group: &str| args.only.is_empty() || args.only.iter().any(|g| g == group);

    // 1. AVD: one iteration fast vs exact, and the fast full decomposition.
    let mut speedups = Vec::new();
    let mut stacks = Vec::new();
    for &(r, c) in shapes.iter().filter(|_| run("avd") || run("kernels")) {
        note(&format!("AVD {r}x{c}, k = {k}"));
        let w = synthetic(r, c, (r * 31 + c) as u64);
        let fast = AvdParams {
            k,
            niter: blocks,
            svd: SvdMethod::default(),
            seed: 0,
        };
        let t = Instant::now();
        let d = decompose(&w, r, c, &fast, None)?;
        let fast_iter = t.elapsed().as_secs_f64() / blocks as f64;
        let exact = AvdParams {
            niter: 1,
            svd: SvdMethod::Exact,
            ..fast
        };
        if run("avd") {
            let t = Instant::now();
            decompose(&w, r, c, &exact, None)?;
            let exact_iter = t.elapsed().as_secs_f64();
            speedups.push(exact_iter / fast_iter);
            rows.push(Row {
                what: format!("AVD iteration {r}x{c} k={k}: fast vs exact SVD"),
                ours: fast_iter,
                baseline: exact_iter,
                unit: "s",
            });
        }
        stacks.push((r, c, w, stack_of(&d.blocks, r, c)?));
    }
    if run("avd") {
        keys.insert(
            "avd_iteration_speedup".into(),
            json!(speedups.iter().copied().fold(f64::INFINITY, f64::min)),
        );
        avd_full_and_quality(&stacks[1].2, shapes[1], k, &mut keys, &note)?;
    }
    if run("kernels") {
        kernels(&stacks, blocks, quick, &mut rows, &mut keys, &note);
    }
    drop(stacks);
    if run("e2e") {
        e2e_group(args.model.clone(), quick, &mut rows, &mut keys, &note)?;
    }
    if run("scorer") {
        scorer_group(
            args.model.clone(),
            quick,
            args.scorer_windows,
            &mut rows,
            &mut keys,
            &note,
        )?;
    }
    if let (Some(file), true) = (&args.stack, run("stack")) {
        let model_dir = bench_model_dir(args.model.clone(), quick, "stack")?;
        let budget = args
            .budget
            .as_deref()
            .map(bitstack::order::parse_size)
            .transpose()
            .context("--budget")?;
        note(&format!(
            "{} against {}",
            file.display(),
            model_dir.display()
        ));
        let stack_file = Arc::new(StackFile::open(file)?);
        let stack = Arc::new(LoadedStack::load(stack_file, budget.unwrap_or(u64::MAX))?);
        let loaded = stack.plan().memory_bytes;
        let ours = model_of(&stack)?;
        let dense = CausalLm::load(&model_dir)?;
        let t = decode_and_eval(&ours, &dense, Some(&stack), quick, true)?;
        rows.extend(t.rows(&format!("stack at {loaded} B")));
        keys.insert("stack_memory_bytes".into(), json!(loaded));
        keys.insert(
            "stack_decode_speedup".into(),
            json!(t.decode.0 / t.decode.1),
        );
        keys.insert("stack_eval_ratio".into(), json!(t.eval.0 / t.eval.1));
    }
    keys.insert("quick".into(), json!(quick));
    print_results(args.json, &rows, &keys)
}

/// The full fast AVD of the large shape, and fast-vs-exact quality on a 512² matrix.
fn avd_full_and_quality(
    w: &[f32],
    (fr, fc): (usize, usize),
    k: usize,
    keys: &mut Map<String, Value>,
    note: &dyn Fn(&str),
) -> Result<()> {
    note(&format!("full fast AVD {fr}x{fc}, k = {k}, niter = 16"));
    let params = AvdParams {
        k,
        niter: 16,
        svd: SvdMethod::default(),
        seed: 0,
    };
    let t = Instant::now();
    let full = decompose(w, fr, fc, &params, None)?;
    let full_seconds = t.elapsed().as_secs_f64();
    keys.insert(format!("avd_full_seconds_{fr}x{fc}"), json!(full_seconds));
    // Fast vs exact quality after 16 blocks, on a 512×512 synthetic matrix (exact is slow).
    note("fast vs exact error after 16 blocks, 512x512");
    let q = synthetic(512, 512, 5);
    let e_fast = decompose(&q, 512, 512, &params, None)?.rel_err[15];
    let e_exact = decompose(
        &q,
        512,
        512,
        &AvdParams {
            svd: SvdMethod::Exact,
            ..params
        },
        None,
    )?
    .rel_err[15];
    keys.insert(
        "avd_error_ratio_fast_vs_exact_512".into(),
        json!(e_fast / e_exact),
    );
    drop(full);
    Ok(())
}

type BenchStack = (usize, usize, Vec<f32>, LoadedStack);

/// Columns per group of the bit planes measured beside the AVD blocks (best mode's default).
const PLANE_GROUP: usize = 128;

/// Decode (one token) and batch (512 tokens), 4 blocks, against dense f32 (each pair timed in
/// alternating rounds); and the one-token product of as many bit planes (best mode) as fit
/// in the 4 blocks' bytes.
fn kernels(
    stacks: &[BenchStack],
    blocks: usize,
    quick: bool,
    rows: &mut Vec<Row>,
    keys: &mut Map<String, Value>,
    note: &dyn Fn(&str),
) {
    let mut decode = Vec::new();
    let mut decode_f32_tables = Vec::new();
    let mut decode_tiles: Vec<f64> = Vec::new();
    let mut planes_decode = Vec::new();
    let mut planes_exact = Vec::new();
    let mut batch = Vec::new();
    let mut cold = Vec::new();
    // Twice the last-level cache, written between timed runs of the cold rows.
    let mut evict = vec![
        0u64;
        if quick {
            0
        } else {
            last_level_cache_bytes() / 4
        }
    ];
    for (r, c, w, stack) in stacks {
        let (r, c) = (*r, *c);
        note(&format!("decode and batch {r}x{c}"));
        let x: Vec<f32> = (0..c).map(|i| ((i % 17) as f32 - 8.0) / 8.0).collect();
        let mut y = vec![0.0f32; r];
        let mut y0 = vec![0.0f32; r];
        let (dense, ours) = best_of_alternating(
            if quick { 1 } else { 6 },
            10,
            || matvec(w, r, c, &x, &mut y0),
            || stack.matvec(0, &x, &mut y),
        );
        // The same product with f32 tables (exact to f32 rounding), side by side.
        stack.set_decode_tables(DecodeTables::F32);
        let exact = best_of(10, || stack.matvec(0, &x, &mut y));
        // Where the CPU has AMX, the 8-bit `z` on tiles too.
        let tiles = bitstack::bits::lowrank_i8_accelerated(bitstack::bits::Simd::Auto).then(|| {
            stack.set_decode_tables(DecodeTables::Int8Tiles);
            best_of(10, || stack.matvec(0, &x, &mut y))
        });
        stack.set_decode_tables(DecodeTables::default());
        // The dense product is memory-bound: its bytes over its time is the bandwidth a
        // streaming kernel gets here; the floor is the packed bytes at that bandwidth.
        let bandwidth = (r * c * 4) as f64 / dense;
        let packed: u64 = stack.resident_bytes();
        let floor = packed as f64 / bandwidth;
        keys.insert(
            format!("memory_bandwidth_gb_s_{r}x{c}"),
            json!(bandwidth / 1e9),
        );
        decode.push(ours / dense);
        rows.push(Row {
            what: format!(
                "decode matvec {r}x{c}, {blocks} blocks (floor {:.2} ms)",
                floor * 1e3
            ),
            ours,
            baseline: dense,
            unit: "s",
        });
        keys.insert(
            format!("decode_vs_bandwidth_floor_{r}x{c}"),
            json!(ours / floor),
        );
        if let Some(t) = tiles {
            let suffix = if decode_tiles.is_empty() {
                ""
            } else {
                "_large"
            };
            decode_tiles.push(t / dense);
            keys.insert(
                format!("decode_vs_dense_f32_int8_tiles{suffix}"),
                json!(t / dense),
            );
            rows.push(Row {
                what: format!("decode matvec {r}x{c}, {blocks} blocks, 8-bit z on AMX tiles"),
                ours: t,
                baseline: dense,
                unit: "s",
            });
        }
        if !quick {
            // The same two products with the caches evicted before each: the weights come
            // from main memory, as a model larger than the cache reads them.
            // Alternating blocks, as for the warm pair.
            let (mut dense_cold, mut ours_cold) = (f64::INFINITY, f64::INFINITY);
            for _ in 0..3 {
                let d = best_of_cold(2, &mut evict, || matvec(w, r, c, &x, &mut y));
                let o = best_of_cold(2, &mut evict, || stack.matvec(0, &x, &mut y));
                (dense_cold, ours_cold) = (dense_cold.min(d), ours_cold.min(o));
            }
            cold.push(ours_cold / dense_cold);
            keys.insert(
                format!("dram_bandwidth_gb_s_{r}x{c}"),
                json!((r * c * 4) as f64 / dense_cold / 1e9),
            );
            rows.push(Row {
                what: format!("decode matvec {r}x{c}, {blocks} blocks, caches evicted"),
                ours: ours_cold,
                baseline: dense_cold,
                unit: "s",
            });
        }
        decode_f32_tables.push(exact / dense);
        rows.push(Row {
            what: format!("decode matvec {r}x{c}, {blocks} blocks, f32 tables"),
            ours: exact,
            baseline: dense,
            unit: "s",
        });
        // Best mode's format in no more bytes: as many bit planes (groups of 128) as fit.
        let plane_bytes = |p: usize| -> u64 {
            (0..p)
                .map(|i| PlaneBlock::byte_size(r, c, PLANE_GROUP, i))
                .sum()
        };
        let p = (1..=8).take_while(|&p| plane_bytes(p) <= packed).last();
        if let Some(p) = p {
            let params = PlaneParams {
                group: PLANE_GROUP,
                planes: p,
            };
            if let Ok(d) = decompose_planes(w, r, c, &params, None, None) {
                let planes: Vec<&PlaneBlock> = d.blocks.iter().collect();
                // As the runtime decodes (`x` as two bytes where the CPU has VNNI and
                // GFNI), and exactly, side by side.
                let time = best_of(10, || {
                    y.fill(0.0);
                    let table = PlaneTable::new(&x, PLANE_GROUP);
                    planes_matvec_add_q16(&planes, &table, &mut y);
                });
                let exact = best_of(10, || {
                    y.fill(0.0);
                    let table = PlaneTable::new(&x, PLANE_GROUP);
                    planes_matvec_add(&planes, &table, &mut y);
                });
                planes_decode.push(time / dense);
                planes_exact.push(exact / dense);
                for (what, t) in [("", time), (", exact x", exact)] {
                    rows.push(Row {
                        what: format!(
                            "decode matvec {r}x{c}, {p} bit planes ({} B){what}",
                            plane_bytes(p)
                        ),
                        ours: t,
                        baseline: dense,
                        unit: "s",
                    });
                }
            }
        }
        let tokens = if quick { 128 } else { 512 };
        let xb: Vec<f32> = (0..tokens * c)
            .map(|i| ((i % 23) as f32 - 11.0) / 11.0)
            .collect();
        let mut yb = vec![0.0f32; tokens * r];
        let mut yb0 = vec![0.0f32; tokens * r];
        let (dense_b, ours_b) = best_of_alternating(
            3,
            1,
            || dense_forward(w, r, c, &xb, tokens, &mut yb0),
            || stack.matmul(0, &xb, tokens, &mut yb),
        );
        batch.push(ours_b / dense_b);
        rows.push(Row {
            what: format!("batch {tokens} tokens {r}x{c}, {blocks} blocks"),
            ours: ours_b,
            baseline: dense_b,
            unit: "s",
        });
    }
    keys.insert("decode_vs_dense_f32".into(), json!(decode[0]));
    keys.insert("decode_vs_dense_f32_large".into(), json!(decode[1]));
    for (key, ratio) in [
        "decode_vs_dense_f32_planes",
        "decode_vs_dense_f32_planes_large",
    ]
    .into_iter()
    .zip(planes_decode)
    .chain(
        [
            "decode_vs_dense_f32_f32_tables",
            "decode_vs_dense_f32_f32_tables_large",
        ]
        .into_iter()
        .zip(decode_f32_tables),
    )
    .chain(
        [
            "decode_vs_dense_f32_planes_exact",
            "decode_vs_dense_f32_planes_exact_large",
        ]
        .into_iter()
        .zip(planes_exact),
    ) {
        keys.insert(key.into(), json!(ratio));
    }
    keys.insert("batch_vs_dense_f32".into(), json!(batch[0]));
    for (key, ratio) in ["decode_vs_dense_f32_cold", "decode_vs_dense_f32_cold_large"]
        .into_iter()
        .zip(cold)
    {
        keys.insert(key.into(), json!(ratio));
    }
}

/// The model of the end-to-end and scorer rows: `--model`, else the bundled tiny model
/// (`--quick`) or ../shared's small-llama.
fn bench_model_dir(model: Option<PathBuf>, quick: bool, rows: &str) -> Result<PathBuf> {
    let model_dir = match model {
        Some(d) => d,
        None if quick => PathBuf::from("fixtures/tiny-qwen2"),
        None => PathBuf::from("../shared/models/small-llama"),
    };
    if !model_dir.join("config.json").exists() {
        bail!(
            "{}: no model directory for the {rows} rows (pass --model DIR)",
            model_dir.display()
        );
    }
    Ok(model_dir)
}

/// End to end: the model at 4 blocks per matrix (paper mode) with the reference's rank for
/// its width and with k = 16, and best mode at the first one's budget, against the dense
/// f32 model.
fn e2e_group(
    model: Option<PathBuf>,
    quick: bool,
    rows: &mut Vec<Row>,
    keys: &mut Map<String, Value>,
    note: &dyn Fn(&str),
) -> Result<()> {
    let model_dir = bench_model_dir(model, quick, "end-to-end")?;
    note(&format!("end to end on {}", model_dir.display()));
    let (e2e, e2e_rows) = end_to_end(&model_dir, quick)?;
    rows.extend(e2e_rows);
    let ratios = |t: &Throughput| (t.decode.0 / t.decode.1, t.eval.0 / t.eval.1);
    let (paper_decode, paper_eval) = ratios(&e2e.paper);
    let (best_decode, best_eval) = ratios(&e2e.best);
    keys.insert("e2e_k".into(), json!(e2e.k));
    keys.insert("e2e_budget_bytes".into(), json!(e2e.budget));
    if let Some((budget, k16)) = &e2e.k16 {
        let (decode, eval) = ratios(k16);
        keys.insert("e2e_budget_bytes_k16".into(), json!(budget));
        keys.insert("e2e_decode_speedup_k16".into(), json!(decode));
        keys.insert("e2e_eval_ratio_k16".into(), json!(eval));
    }
    keys.insert("e2e_decode_speedup".into(), json!(paper_decode));
    if let Some(tps) = e2e.paper.decode_tiles {
        keys.insert(
            "e2e_decode_speedup_int8_tiles".into(),
            json!(tps / e2e.paper.decode.1),
        );
    }
    if let Some(tps) = e2e.paper.decode_f32_tables {
        keys.insert(
            "e2e_decode_speedup_f32_tables".into(),
            json!(tps / e2e.paper.decode.1),
        );
    }
    keys.insert("e2e_eval_ratio".into(), json!(paper_eval));
    keys.insert("e2e_best_decode_speedup".into(), json!(best_decode));
    if let Some(tps) = e2e.best.decode_f32_tables {
        keys.insert(
            "e2e_best_decode_speedup_exact".into(),
            json!(tps / e2e.best.decode.1),
        );
    }
    keys.insert("e2e_best_eval_ratio".into(), json!(best_eval));
    Ok(())
}

/// The perplexity scorer (each layer's run kept per level and a candidate's layer run again
/// from its own linear, windows in parallel, each matrix rebuilt once per level) against a
/// straightforward implementation (for every candidate: rebuild every matrix from its blocks,
/// run the whole model on each window in turn), on both cores and on one, on the same
/// candidates of level 1: time ratios and whether the scores and their order agree.
fn scorer_group(
    model: Option<PathBuf>,
    quick: bool,
    windows_override: Option<usize>,
    rows: &mut Vec<Row>,
    keys: &mut Map<String, Value>,
    note: &dyn Fn(&str),
) -> Result<()> {
    use bitstack::calibrate::{PerplexityScorer, StraightforwardScorer};
    use bitstack::checkpoint::Checkpoint;
    use bitstack::compress::decompose_checkpoint;
    use bitstack::order::BlockScorer;

    let model_dir = bench_model_dir(model, quick, "scorer")?;
    note(&format!("scorer on {}", model_dir.display()));
    let checkpoint = Checkpoint::open(&model_dir)?;
    let arch = bitstack::compress::read_architecture(&checkpoint)?;
    let names = bitstack::select::select_matrices(&checkpoint, arch.as_deref(), &[])?;
    let mut options = CompressOptions::default();
    options.avd.k = 4;
    options.avd.niter = 2;
    let decomposed = decompose_checkpoint(
        &checkpoint,
        &names,
        &options,
        None,
        &std::env::temp_dir(),
        &|_| {},
    )?;
    let (windows_n, seq) = if quick { (2, 128) } else { (4, 512) };
    let windows_n = windows_override.unwrap_or(windows_n);
    if windows_n == 0 {
        bail!("--scorer-windows must be at least 1");
    }
    // Real text: the first windows of the scoring text, as `compress` takes them.
    let data = bench_data_dir(&model_dir)?;
    let calibration = CalibrationOptions {
        calib_text: data.join("calib.txt"),
        calib_windows: 0,
        score_text: data.join("score.txt"),
        score_windows: windows_n,
        seq,
    };
    let tokenizer = bitstack::model::TextTokenizer::from_model_dir(&model_dir)?;
    let (_, windows) = calibration.windows(&tokenizer)?;
    // All matrices of the level (the quick run: every 7th, spread over all layers).
    let candidates: Vec<u32> = (0..names.len() as u32)
        .step_by(if quick { 7 } else { 1 })
        .collect();
    let model = CausalLm::load(&model_dir)?;
    let mut scorer = PerplexityScorer::new(model, &decomposed, windows.clone(), &|_| {})?;
    let t = Instant::now();
    let fast = scorer
        .score_level(1, &candidates)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let fast_s = t.elapsed().as_secs_f64();
    drop(scorer);

    // The straightforward implementation: for every candidate, rebuild every matrix from
    // its blocks (held in memory) and run the whole model on each window in turn (the GEMMs
    // on the pool it runs on).
    let mut plain =
        StraightforwardScorer::new(CausalLm::load(&model_dir)?, &decomposed, windows, 1)?;
    let mut straightforward = || -> Result<(Vec<f64>, f64)> {
        let t = Instant::now();
        let scores = plain
            .score_level(1, &candidates)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        Ok((scores, t.elapsed().as_secs_f64()))
    };
    let (slow, slow_s) = straightforward()?;
    // The same on one thread: the issue's list of what the scorer adds ends with "uses both
    // cores", so this is the straightforward implementation without any of it.
    let one_thread = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .context("a one-thread pool")?;
    let (slow_one, slow_one_s) = one_thread.install(&mut straightforward)?;
    let max_rel = fast
        .iter()
        .zip(&slow)
        .chain(fast.iter().zip(&slow_one))
        .map(|(a, b)| ((a - b) / b).abs())
        .fold(0.0, f64::max);
    let rank = |v: &[f64]| {
        let mut idx: Vec<usize> = (0..v.len()).collect();
        idx.sort_by(|&a, &b| v[a].total_cmp(&v[b]));
        idx
    };
    rows.push(Row {
        what: format!(
            "scorer, level 1, {} candidates x {windows_n} windows",
            candidates.len()
        ),
        ours: fast_s,
        baseline: slow_s,
        unit: "s",
    });
    rows.push(Row {
        what: "scorer, same, straightforward on one thread".into(),
        ours: fast_s,
        baseline: slow_one_s,
        unit: "s",
    });
    keys.insert(
        "scorer_speedup_vs_straightforward".into(),
        json!(slow_s / fast_s),
    );
    keys.insert(
        "scorer_speedup_vs_one_thread_straightforward".into(),
        json!(slow_one_s / fast_s),
    );
    keys.insert("scorer_max_relative_difference".into(), json!(max_rel));
    keys.insert(
        "scorer_same_order".into(),
        json!(rank(&fast) == rank(&slow) && rank(&fast) == rank(&slow_one)),
    );
    Ok(())
}

fn print_results(as_json: bool, rows: &[Row], keys: &Map<String, Value>) -> Result<()> {
    if as_json {
        out!(
            "{}",
            serde_json::to_string_pretty(&Value::Object(keys.clone()))?
        );
        return Ok(());
    }
    out!(
        "{:<58} {:>12} {:>12} {:>8}",
        "comparison",
        "bitstack",
        "baseline",
        "ratio"
    );
    for r in rows {
        let fmt = |v: f64| match r.unit {
            "s" if v < 1e-2 => format!("{:.3} ms", v * 1e3),
            "s" => format!("{v:.3} s"),
            u => format!("{v:.1} {u}"),
        };
        out!(
            "{:<58} {:>12} {:>12} {:>8.3}",
            r.what,
            fmt(r.ours),
            fmt(r.baseline),
            r.ours / r.baseline
        );
    }
    out!();
    for (key, value) in keys {
        out!("{key:<48} {value}");
    }
    Ok(())
}

/// Tokens per second, (ours, dense), of greedy decoding and of perplexity evaluation.
struct Throughput {
    decode: (f64, f64),
    eval: (f64, f64),
    /// Decoding with exact products (`DecodeTables::F32`: f32 tables for AVD blocks, f32
    /// `x` for planes), timed in turn with the others.
    decode_f32_tables: Option<f64>,
    /// Decoding with 8-bit `z` on AMX tiles (paper mode, CPUs with AMX), timed likewise.
    decode_tiles: Option<f64>,
}

impl Throughput {
    /// The two table rows, labelled with `what` (the stack against the dense f32 model).
    fn rows(&self, what: &str) -> Vec<Row> {
        let exact = self.decode_f32_tables.map(|tps| Row {
            what: format!("decode, {what}, exact products (f32 tables, f32 x) (tokens/s)"),
            ours: tps,
            baseline: self.decode.1,
            unit: "tok/s",
        });
        let tiles = self.decode_tiles.map(|tps| Row {
            what: format!("decode, {what}, 8-bit z on AMX tiles (tokens/s)"),
            ours: tps,
            baseline: self.decode.1,
            unit: "tok/s",
        });
        [
            Row {
                what: format!("decode, {what} vs dense f32 (tokens/s)"),
                ours: self.decode.0,
                baseline: self.decode.1,
                unit: "tok/s",
            },
            Row {
                what: format!("perplexity eval, {what} (tokens/s)"),
                ours: self.eval.0,
                baseline: self.eval.1,
                unit: "tok/s",
            },
        ]
        .into_iter()
        .chain(exact)
        .chain(tiles)
        .collect()
    }
}

/// Greedy decoding (64 tokens after an 8-token prompt; the rate after the first token) and
/// perplexity evaluation (two 512-token windows) with `ours` and `dense`, alternately in
/// this process, each the best of three runs (tokens per second); with `stack` (the one
/// `ours` runs on) decoding also with f32 decode tables, in turn with the others.
fn decode_and_eval(
    ours: &CausalLm,
    dense: &CausalLm,
    stack: Option<&LoadedStack>,
    quick: bool,
    tiles: bool,
) -> Result<Throughput> {
    let prompt: Vec<u32> = (1..9).collect();
    let new_tokens = if quick { 16 } else { 64 };
    // Decoding rate after the prompt, as `bitstack generate` reports it: the tokens after
    // the first over the time after the first (the prompt's batch product is not decoding).
    let gen = |m: &CausalLm| -> Result<f64> {
        let mut sampler = Sampler::new(0.0, 1.0, 0);
        let t = Instant::now();
        let mut first = None;
        let out = m.generate(&prompt, new_tokens, &mut sampler, &[], &mut |_| {
            first.get_or_insert_with(Instant::now);
            true
        })?;
        let first = first.unwrap_or(t);
        Ok(out.len().saturating_sub(1) as f64 / first.elapsed().as_secs_f64().max(1e-9))
    };
    let mut decode = (0.0f64, 0.0f64);
    let mut decode_f32_tables = stack.map(|_| 0.0f64);
    let amx = bitstack::bits::lowrank_i8_accelerated(bitstack::bits::Simd::Auto);
    let mut decode_tiles = stack.filter(|_| amx && tiles).map(|_| 0.0f64);
    for _ in 0..3 {
        decode.0 = decode.0.max(gen(ours)?);
        decode.1 = decode.1.max(gen(dense)?);
        if let (Some(stack), Some(best)) = (stack, decode_f32_tables.as_mut()) {
            stack.set_decode_tables(DecodeTables::F32);
            let tps = gen(ours);
            stack.set_decode_tables(DecodeTables::default());
            *best = best.max(tps?);
        }
        if let (Some(stack), Some(best)) = (stack, decode_tiles.as_mut()) {
            stack.set_decode_tables(DecodeTables::Int8Tiles);
            let tps = gen(ours);
            stack.set_decode_tables(DecodeTables::default());
            *best = best.max(tps?);
        }
    }
    let seq = if quick { 128 } else { 512 };
    let window: Vec<u32> = (0..seq as u32).map(|i| (i * 7 + 3) % 1000).collect();
    let windows = [window.as_slice(), window.as_slice()];
    let timed = |m: &CausalLm| -> Result<f64> {
        let t = Instant::now();
        m.perplexity(&windows)?;
        Ok((2 * seq) as f64 / t.elapsed().as_secs_f64())
    };
    let mut eval = (0.0f64, 0.0f64);
    for _ in 0..3 {
        eval.0 = eval.0.max(timed(ours)?);
        eval.1 = eval.1.max(timed(dense)?);
    }
    Ok(Throughput {
        decode,
        eval,
        decode_f32_tables,
        decode_tiles,
    })
}

fn end_to_end(dir: &Path, quick: bool) -> Result<(E2e, Vec<Row>)> {
    let tmp = |what: &str| {
        std::env::temp_dir().join(format!(
            "bitstack-bench-{}-{what}.bitstack",
            std::process::id()
        ))
    };
    let (paper_path, k16_path, best_path) = (tmp("paper"), tmp("paper-k16"), tmp("best"));
    let k = reference_rank(dir)?;
    let result = (|| -> Result<(E2e, Vec<Row>)> {
        let dense = CausalLm::load(dir)?;
        // Paper mode at 4 blocks per matrix (the whole stack of `niter = 4`), with rank `k`.
        let paper_at = |k: usize, path: &Path| -> Result<(u64, Throughput)> {
            let mut options = CompressOptions::default();
            options.avd.k = k;
            options.avd.niter = 4;
            run_compress(dir, path, &options, &|_| {}).context("compressing for the benchmark")?;
            let file = Arc::new(StackFile::open(path)?);
            let budget = file.layout().max_memory();
            let stack = Arc::new(LoadedStack::load(file, budget)?);
            let t = decode_and_eval(&model_of(&stack)?, &dense, Some(&stack), quick, true)?;
            Ok((budget, t))
        };
        let (budget, paper) = paper_at(k, &paper_path)?;
        let k16 = if k == 16 {
            None
        } else {
            Some(paper_at(16, &k16_path)?)
        };
        // Best mode at the same budget (which planes are loaded at this budget does not
        // depend on the order: a quick data-free order and a few calibration windows).
        let data = bench_data_dir(dir)?;
        let best_options = BestOptions {
            order: BestOrder::OutputError,
            chains: ChainChoice::Planes,
            ..BestOptions::default()
        };
        let calibration = CalibrationOptions {
            calib_text: data.join("calib.txt"),
            calib_windows: if quick { 2 } else { 8 },
            score_text: data.join("score.txt"),
            score_windows: 1,
            seq: 256,
        };
        compress_best(
            dir,
            &best_path,
            &CompressOptions::default(),
            &best_options,
            &calibration,
            &|_| {},
        )
        .context("compressing in best mode for the benchmark")?;
        let stack = Arc::new(LoadedStack::load(
            Arc::new(StackFile::open(&best_path)?),
            budget,
        )?);
        let loaded = stack.plan().memory_bytes;
        let best = decode_and_eval(&model_of(&stack)?, &dense, Some(&stack), quick, false)?;
        let mut rows = paper.rows(&format!(
            "paper mode, k = {k}, 4 blocks/matrix ({budget} B)"
        ));
        if let Some((budget, t)) = &k16 {
            rows.extend(t.rows(&format!("paper mode, k = 16, 4 blocks/matrix ({budget} B)")));
        }
        rows.extend(best.rows(&format!("best mode at {budget} B ({loaded} B loaded)")));
        Ok((
            E2e {
                k,
                budget,
                paper,
                k16,
                best,
            },
            rows,
        ))
    })();
    for path in [&paper_path, &k16_path, &best_path] {
        let _ = std::fs::remove_file(path);
    }
    result
}

/// The rank the reference implementation uses for the model in `dir`
/// ([`bitstack::model::ModelConfig::reference_rank`]).
fn reference_rank(dir: &Path) -> Result<usize> {
    let config = bitstack::model::ModelConfig::from_file(dir.join("config.json"))
        .with_context(|| format!("reading {}", dir.join("config.json").display()))?;
    Ok(config.reference_rank())
}

/// The end-to-end measurements: paper mode at 4 AVD blocks per matrix of rank `k` (the
/// reference's for the model's width; the budget), the same with k = 16 where `k` is
/// another (its budget), and best mode at the budget.
struct E2e {
    k: usize,
    budget: u64,
    paper: Throughput,
    k16: Option<(u64, Throughput)>,
    best: Throughput,
}

/// The calibration and scoring texts for the best-mode end-to-end rows: a `data` directory
/// beside the model's (the bundled `fixtures/data`) or one level up (../shared/data), else
/// `fixtures/data` or ../shared/data from here.
fn bench_data_dir(model_dir: &Path) -> Result<PathBuf> {
    let mut candidates = Vec::new();
    for up in [1, 2] {
        if let Some(d) = model_dir.ancestors().nth(up) {
            candidates.push(d.join("data"));
        }
    }
    candidates.extend(["fixtures/data", "../shared/data"].map(PathBuf::from));
    candidates
        .into_iter()
        .find(|d| d.join("calib.txt").exists() && d.join("score.txt").exists())
        .context(
            "no calibration text for the best-mode end-to-end rows (fixtures/data/calib.txt): \
             run from the repository root",
        )
}
