//! The subcommands.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use bitstack::best::{compress_best, BestOptions, BestOrder};
use bitstack::calibrate::{compress_calibrated, CalibrationOptions};
use bitstack::chain::ChainChoice;
use bitstack::compress::{compress as run_compress, CompressOptions};
use bitstack::decompose::PlaneParams;
use bitstack::decompose::SvdMethod;
use bitstack::order::{format_size, parse_size};
use bitstack::resume::Checkpointing;
use bitstack::{LoadedStack, StackFile};
use clap::{Args, ValueEnum};
use serde_json::json;

use crate::progress::Bars;

/// SVD used inside the decomposition.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum SvdChoice {
    /// Randomized truncated SVD (top-k triplets only): fast, the default.
    Fast,
    /// Exact thin SVD every iteration, as the reference implementation (slow; verification).
    Exact,
}

/// What kind of stack `compress` builds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ModeChoice {
    /// The paper's BitStack: AVD blocks of the decoder linears, 16-bit embeddings.
    Paper,
    /// Nested bit planes for every matrix incl. embeddings and lm_head, ordered across
    /// levels by measured sensitivity (docs/BEST.md): better quality per byte.
    Best,
}

/// Block order of best mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OrderChoice {
    /// Estimated loss reduction per byte, across levels.
    Gain,
    /// Activation-weighted output error removed per byte (no sensitivity probe).
    OutputError,
    /// The paper's level-synchronous perplexity scorer on the planes (slow; comparison).
    Perplexity,
    /// Level by level (uniform planes per matrix at each level boundary).
    Levels,
}

/// Chains of best mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ChainsChoice {
    /// Nested planes throughout.
    Planes,
    /// An AVD block (the size of plane 0) first, then planes of the residual.
    AvdFirst,
    /// Per matrix, whichever has the lower error curve (measured; docs/BEST.md).
    Auto,
}

/// Options of `bitstack compress`.
#[derive(Debug, Args)]
pub struct CompressArgs {
    /// Hugging Face checkpoint directory (config.json, *.safetensors, tokenizer.json).
    pub model_dir: PathBuf,
    /// Output .bitstack file (written atomically).
    #[arg(short, long)]
    pub output: PathBuf,
    /// Stack kind: `paper` (AVD, the reference method) or `best` (bit planes, docs/BEST.md).
    #[arg(long, value_enum, default_value_t = ModeChoice::Paper)]
    pub mode: ModeChoice,
    /// Best mode: bit planes per matrix (the largest budget is about planes + 0.25 bits
    /// per weight) [default: 8].
    #[arg(long)]
    pub planes: Option<usize>,
    /// Best mode: columns per grid group [default: 128].
    #[arg(long)]
    pub group: Option<usize>,
    /// Best mode: exponent of the activation scales folded into the columns (0..1)
    /// [default: 0.5].
    #[arg(long)]
    pub alpha: Option<f32>,
    /// Best mode: block order — `gain` (measured loss reduction per byte, across levels) or
    /// `levels` (the same number of planes for every matrix at each level; a baseline)
    /// [default: gain].
    #[arg(long, value_enum)]
    pub order: Option<OrderChoice>,
    /// Best mode: block chain of each matrix — `planes` throughout, `avd-first` (an AVD
    /// block, then planes of the residual), or `auto` (per matrix, the lower error curve)
    /// [default: auto].
    #[arg(long, value_enum)]
    pub chains: Option<ChainsChoice>,
    /// Best mode: choose the planes' bits with full-depth GPTQ error compensation under each
    /// linear's input Hessian, from this many calibration windows (0 = off). Needs
    /// 8·(3·hidden² + intermediate²) bytes for one layer's Hessians at a time [default: 0].
    #[arg(long)]
    pub gptq_windows: Option<usize>,
    /// Best mode: planes at which each matrix's sensitivity is probed [default: 3].
    #[arg(long)]
    pub probe_planes: Option<usize>,
    /// Paper mode: rank of each residual block's factors [default: 16].
    #[arg(long)]
    pub k: Option<usize>,
    /// Paper mode: blocks per matrix (AVD iterations) [default: 16].
    #[arg(long)]
    pub niter: Option<usize>,
    /// No activation statistics and a data-free ordering (error removed per byte).
    #[arg(long)]
    pub no_calibration: bool,
    /// The paper's settings: 128 calibration windows, 32 scoring windows, exact SVD,
    /// perplexity scorer.
    #[arg(long, conflicts_with = "no_calibration")]
    pub reference: bool,
    /// Calibration text (activation statistics).
    #[arg(long, value_name = "FILE")]
    pub calib: Option<PathBuf>,
    /// Scoring text (block ordering); defaults to the calibration text.
    #[arg(long, value_name = "FILE")]
    pub score: Option<PathBuf>,
    /// Calibration windows.
    #[arg(long, default_value_t = 128)]
    pub calib_windows: usize,
    /// Scoring windows (the paper uses 32; the default trades a little quality for time,
    /// see docs/DEFAULTS.md).
    #[arg(long, default_value_t = DEFAULT_SCORE_WINDOWS)]
    pub score_windows: usize,
    /// Window length in tokens.
    #[arg(long, default_value_t = 512)]
    pub seq: usize,
    /// Stack the 2-D tensors whose names match this glob (repeatable), for any checkpoint.
    #[arg(long = "include", value_name = "GLOB")]
    pub include: Vec<String>,
    /// Paper mode: SVD method (default: fast; exact with --reference).
    #[arg(long, value_enum)]
    pub svd: Option<SvdChoice>,
    /// Paper mode: seed of the randomized SVD [default: 0].
    #[arg(long)]
    pub seed: Option<u64>,
    /// Continue an interrupted run from its progress in `<OUTPUT>.partial/` (same model and
    /// options); the result is byte-identical to an uninterrupted run.
    #[arg(long)]
    pub resume: bool,
}

/// Scoring windows used by default (docs/DEFAULTS.md).
pub const DEFAULT_SCORE_WINDOWS: usize = 4;

pub fn compress(args: CompressArgs) -> Result<()> {
    let mut options = CompressOptions::default();
    options.avd.k = args.k.unwrap_or(16);
    options.avd.niter = args.niter.unwrap_or(16);
    options.avd.seed = args.seed.unwrap_or(0);
    let svd = args.svd.unwrap_or(if args.reference {
        SvdChoice::Exact
    } else {
        SvdChoice::Fast
    });
    options.avd.svd = match svd {
        SvdChoice::Fast => SvdMethod::default(),
        SvdChoice::Exact => SvdMethod::Exact,
    };
    options.include = args.include;
    options.checkpointing = if args.resume {
        Checkpointing::Resume
    } else {
        Checkpointing::Fresh
    };
    let partial = bitstack::resume::progress_dir(&args.output);
    let started = std::time::SystemTime::now();
    let bars = Bars::new();
    let progress = |e: bitstack::compress::Progress<'_>| bars.handle(e);
    // The output replaces an existing file by a rename: never one of the model's own files.
    if let (Ok(out), Ok(model)) = (
        std::fs::canonicalize(&args.output),
        std::fs::canonicalize(&args.model_dir),
    ) {
        if out.parent() == Some(model.as_path())
            && out
                .extension()
                .is_some_and(|e| e == "safetensors" || e == "json")
        {
            bail!(
                "-o {} is a file of the model being compressed: it would be replaced; write \
                 the .bitstack file elsewhere",
                args.output.display()
            );
        }
    }
    if args.mode == ModeChoice::Best && (args.no_calibration || args.reference) {
        bail!("--mode best needs calibration text and is not the reference method: drop --no-calibration / --reference");
    }
    if args.mode != ModeChoice::Best {
        let best_only = [
            ("--planes", args.planes.is_some()),
            ("--group", args.group.is_some()),
            ("--alpha", args.alpha.is_some()),
            ("--order", args.order.is_some()),
            ("--chains", args.chains.is_some()),
            ("--gptq-windows", args.gptq_windows.is_some()),
            ("--probe-planes", args.probe_planes.is_some()),
        ];
        if let Some((flag, _)) = best_only.iter().find(|(_, given)| *given) {
            bail!("{flag} applies to --mode best only (this run is in paper mode)");
        }
    } else {
        // Best mode's blocks are bit planes, and an AVD-first chain's rank follows from the
        // size of plane 0 (docs/BEST.md): these would be ignored.
        let paper_only = [
            ("--k", args.k.is_some()),
            ("--niter", args.niter.is_some()),
            ("--svd", args.svd.is_some()),
            ("--seed", args.seed.is_some()),
        ];
        if let Some((flag, _)) = paper_only.iter().find(|(_, given)| *given) {
            bail!(
                "{flag} applies to the paper mode only (AVD blocks); best mode stacks bit \
                 planes: choose them with --planes and --group (docs/BEST.md)"
            );
        }
    }
    let summary = if args.no_calibration {
        run_compress(&args.model_dir, &args.output, &options, &progress)
    } else {
        let Some(calib) = args.calib.clone() else {
            bail!(
                "compress needs calibration text: pass --calib FILE (and optionally --score \
                 FILE), or --no-calibration for the data-free mode"
            );
        };
        let (calib_windows, score_windows) = if args.reference {
            (128, 32)
        } else {
            (args.calib_windows, args.score_windows)
        };
        let calibration = CalibrationOptions {
            score_text: args.score.clone().unwrap_or_else(|| calib.clone()),
            calib_text: calib,
            calib_windows,
            score_windows,
            seq: args.seq,
        };
        if args.mode == ModeChoice::Best {
            let d = BestOptions::default();
            let best = BestOptions {
                planes: PlaneParams {
                    group: args.group.unwrap_or(d.planes.group),
                    planes: args.planes.unwrap_or(d.planes.planes),
                },
                alpha: args.alpha.unwrap_or(d.alpha),
                probe_planes: args.probe_planes.unwrap_or(d.probe_planes),
                gptq_windows: args.gptq_windows.unwrap_or(d.gptq_windows),
                chains: match args.chains {
                    None => d.chains,
                    Some(ChainsChoice::Planes) => ChainChoice::Planes,
                    Some(ChainsChoice::AvdFirst) => ChainChoice::AvdFirst,
                    Some(ChainsChoice::Auto) => ChainChoice::Auto,
                },
                order: match args.order {
                    None => d.order,
                    Some(OrderChoice::Gain) => BestOrder::Gain,
                    Some(OrderChoice::OutputError) => BestOrder::OutputError,
                    Some(OrderChoice::Perplexity) => BestOrder::Perplexity,
                    Some(OrderChoice::Levels) => BestOrder::Levels,
                },
                ..d
            };
            compress_best(
                &args.model_dir,
                &args.output,
                &options,
                &best,
                &calibration,
                &progress,
            )
        } else {
            compress_calibrated(
                &args.model_dir,
                &args.output,
                &options,
                &calibration,
                &progress,
            )
        }
    }
    .with_context(|| {
        if saved_work_since(&partial, started) {
            format!(
                "compressing {} (finished work is kept in {}: run the same command with \
                 --resume to continue)",
                args.model_dir.display(),
                partial.display()
            )
        } else {
            format!("compressing {}", args.model_dir.display())
        }
    })?;
    bars.finish();
    if summary.reused > 0 {
        out!(
            "resumed: {} finished units (matrices, levels) taken from the interrupted run",
            summary.reused
        );
    }
    out!(
        "wrote {} ({}): {} matrices, {} blocks, memory {} .. {}",
        args.output.display(),
        format_size(summary.file_bytes),
        summary.matrices,
        summary.blocks,
        format_size(summary.min_memory_bytes),
        format_size(summary.max_memory_bytes),
    );
    let errs = &summary.mean_rel_err;
    if !errs.is_empty() {
        out!(
            "mean relative error after 1 / {} blocks: {:.4} / {:.4}",
            errs.len(),
            errs[0],
            errs[errs.len() - 1]
        );
    }
    let total: f64 = summary.stage_seconds.iter().map(|(_, s)| s).sum();
    for (stage, seconds) in &summary.stage_seconds {
        out!("  {stage:<10} {seconds:8.2} s");
    }
    out!("  {:<10} {total:8.2} s", "total");
    Ok(())
}

/// True when `partial` holds finished work (a decomposition, a level, the scales) written by
/// this run (not a stale directory from an earlier one).
fn saved_work_since(partial: &Path, started: std::time::SystemTime) -> bool {
    let Ok(entries) = std::fs::read_dir(partial) else {
        return false;
    };
    entries.filter_map(|e| e.ok()).any(|e| {
        let name = e.file_name().to_string_lossy().to_string();
        let record = name.ends_with(".bin") && !name.starts_with('.');
        let fresh = e
            .metadata()
            .and_then(|m| m.modified())
            .is_ok_and(|t| t >= started);
        record && fresh
    })
}

fn open(path: &Path) -> Result<Arc<StackFile>> {
    // The library's error names the file.
    let file = StackFile::open(path).context("cannot open the stack file")?;
    Ok(Arc::new(file))
}

fn budget_of(text: &str) -> Result<u64> {
    parse_size(text).context("--budget")
}

pub fn inspect(path: &Path, as_json: bool, with_order: bool) -> Result<()> {
    let file = open(path)?;
    let manifest = file.container().manifest();
    let layout = file.layout();
    let full = file.full_layout();
    let meta = &manifest.metadata;
    let compress = meta.get("compress").cloned().unwrap_or(json!({}));
    let steps: Vec<_> = layout
        .budget_steps(10)
        .into_iter()
        .map(|b| {
            let plan = layout.plan_for_prefix(layout.plan_for_budget(b).map_or(0, |p| p.blocks_loaded));
            json!({"budget_bytes": b, "memory_bytes": plan.memory_bytes, "blocks": plan.blocks_loaded})
        })
        .collect();
    let report = json!({
        "file": path.display().to_string(),
        "architecture": meta.get("architecture"),
        "mode": compress.get("mode").cloned().unwrap_or(json!("paper")),
        "k": compress.get("k"),
        "niter": compress.get("niter"),
        "group": compress.get("group"),
        "planes": compress.get("planes"),
        "chains": compress.get("chains"),
        "avd_first_matrices": compress.get("avd_first_matrices"),
        "scorer": compress.get("scorer"),
        "matrices": file.matrix_count(),
        "blocks": layout.order().len(),
        "blocks_total": full.order().len(),
        "mandatory_blocks": full.mandatory_blocks(),
        "fixed_bytes": layout.fixed_bytes(),
        "base_bytes": full.min_memory(),
        "min_memory_bytes": layout.min_memory(),
        "max_memory_bytes": layout.max_memory(),
        "complete": !file.is_truncated(),
        "missing_bytes": full.max_memory() - layout.max_memory(),
        "steps": steps,
    });
    let order: Vec<serde_json::Value> = layout
        .order()
        .iter()
        .map(|e| json!([file.matrix_name(e.matrix as usize), e.block]))
        .collect();
    if as_json {
        let mut report = report;
        if with_order {
            report["order"] = json!(order);
        }
        out!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    out!("file          {}", path.display());
    out!(
        "model         {}",
        meta.get("architecture")
            .and_then(|a| a.as_str())
            .unwrap_or("(unknown)")
    );
    let scorer = compress
        .get("scorer")
        .and_then(|s| s.as_str())
        .unwrap_or("?");
    if compress.get("mode").and_then(|m| m.as_str()) == Some("best") {
        out!(
            "compression   best mode: bit planes, group = {}, planes = {}, alpha = {}, ordering: {scorer}",
            compress.get("group").unwrap_or(&json!("?")),
            compress.get("planes").unwrap_or(&json!("?")),
            compress.get("alpha").unwrap_or(&json!("?")),
        );
        if let Some(n) = compress.get("avd_first_matrices").and_then(|n| n.as_u64()) {
            out!(
                "chains        {} ({n} of {} matrices start with an AVD block)",
                compress
                    .get("chains")
                    .and_then(|c| c.as_str())
                    .unwrap_or("?"),
                file.matrix_count()
            );
        }
    } else {
        out!(
            "compression   k = {}, niter = {}, ordering: {scorer}",
            compress.get("k").unwrap_or(&json!("?")),
            compress.get("niter").unwrap_or(&json!("?")),
        );
    }
    out!("matrices      {}", file.matrix_count());
    out!(
        "blocks        {} ({} base blocks){}",
        layout.order().len(),
        full.mandatory_blocks(),
        if file.is_truncated() {
            format!(
                " — file truncated: {} of {} blocks present, {} missing",
                layout.order().len(),
                full.order().len(),
                format_size(full.max_memory() - layout.max_memory())
            )
        } else {
            String::new()
        }
    );
    out!(
        "fixed tensors {} bytes ({})",
        layout.fixed_bytes(),
        format_size(layout.fixed_bytes())
    );
    out!(
        "base_bytes    {} bytes ({})",
        full.min_memory(),
        format_size(full.min_memory())
    );
    out!(
        "memory        {} .. {} bytes ({} .. {})",
        layout.min_memory(),
        layout.max_memory(),
        format_size(layout.min_memory()),
        format_size(layout.max_memory())
    );
    if with_order {
        out!("\nstack order:");
        for (i, e) in order.iter().enumerate() {
            out!("{i:>6}  {} #{}", e[0].as_str().unwrap_or("?"), e[1]);
        }
    }
    out!("\n{:>14}  {:>14}  {:>7}", "budget", "memory", "blocks");
    for s in &report["steps"].as_array().cloned().unwrap_or_default() {
        out!(
            "{:>14}  {:>14}  {:>7}",
            s["budget_bytes"],
            s["memory_bytes"],
            s["blocks"]
        );
    }
    Ok(())
}

pub fn plan(path: &Path, budget: &str, as_json: bool) -> Result<()> {
    let file = open(path)?;
    let budget = budget_of(budget)?;
    let plan = file.layout().plan_for_budget(budget)?;
    let per_matrix: serde_json::Map<String, serde_json::Value> = (0..file.matrix_count())
        .map(|m| (file.matrix_name(m).to_string(), json!(plan.per_matrix[m])))
        .collect();
    if as_json {
        out!(
            "{}",
            serde_json::to_string_pretty(&json!({
                "budget_bytes": budget,
                "memory_bytes": plan.memory_bytes,
                "blocks": plan.blocks_loaded,
                "per_matrix": per_matrix,
            }))?
        );
        return Ok(());
    }
    out!(
        "budget {} bytes ({}): {} blocks, memory {} bytes ({})",
        budget,
        format_size(budget),
        plan.blocks_loaded,
        plan.memory_bytes,
        format_size(plan.memory_bytes)
    );
    for m in 0..file.matrix_count() {
        out!("  {:>3}  {}", plan.per_matrix[m], file.matrix_name(m));
    }
    Ok(())
}

pub fn export(path: &Path, budget: &str, output: &Path) -> Result<()> {
    // A checkpoint directory is written new, never over another one (say, the original
    // model's, whose weights it would replace; or a sharded one, which it would mix with).
    if let Ok(mut entries) = std::fs::read_dir(output) {
        if entries.next().is_some() {
            bail!(
                "{} exists and is not empty: export writes a new checkpoint directory and \
                 does not overwrite files; remove it or choose another -o",
                output.display()
            );
        }
    } else if output.exists() {
        bail!("{} exists and is not a directory", output.display());
    }
    let file = open(path)?;
    let budget = budget_of(budget)?;
    let stack = LoadedStack::load_exact(file, budget)?;
    stack
        .export_hf(output)
        .with_context(|| format!("exporting to {}", output.display()))?;
    let plan = stack.plan();
    out!(
        "exported {} blocks ({} of memory) to {}",
        plan.blocks_loaded,
        format_size(plan.memory_bytes),
        output.display()
    );
    Ok(())
}
