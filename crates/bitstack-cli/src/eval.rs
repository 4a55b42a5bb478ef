//! `bitstack eval` and `bitstack generate`.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use bitstack::checkpoint::Checkpoint;
use bitstack::engine::{model_of, tokenizer_of};
use bitstack::model::{windows, CausalLm, Sampler, TextTokenizer};
use bitstack::order::{format_size, parse_size};
use bitstack::runtime::DecodeTables;
use bitstack::{LoadedStack, StackFile};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;

use crate::plot::write_curve_svg;

/// Options of `bitstack eval`.
#[derive(Debug, Args)]
pub struct EvalArgs {
    /// A .bitstack file, or a Hugging Face model directory (evaluates the original model).
    pub target: PathBuf,
    /// Text to evaluate (tokenized whole, cut into windows; ALGORITHM.md §5).
    #[arg(long, value_name = "FILE")]
    pub text: PathBuf,
    /// Memory budget for a .bitstack file (default: the whole stack).
    #[arg(long)]
    pub budget: Option<String>,
    /// Evaluate only the first N windows (`--windows 64` = test64).
    #[arg(long)]
    pub windows: Option<usize>,
    /// Window length in tokens.
    #[arg(long, default_value_t = 512)]
    pub seq: usize,
    /// Evaluate N budgets spread from the minimum to the maximum (default 10).
    #[arg(long, num_args = 0..=1, default_missing_value = "10", value_name = "N")]
    pub sweep: Option<usize>,
    /// Sweep output as CSV.
    #[arg(long, requires = "sweep")]
    pub csv: bool,
    /// Write the sweep's perplexity-vs-memory curve as an SVG file.
    #[arg(long, requires = "sweep", value_name = "SVG")]
    pub plot: Option<PathBuf>,
    /// Original model directory: evaluated too and drawn as the reference line of the plot.
    #[arg(long, value_name = "MODEL_DIR")]
    pub original: Option<PathBuf>,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// One evaluated point.
struct Point {
    memory_bytes: u64,
    blocks: Option<usize>,
    ppl: f64,
    windows: usize,
    tokens: usize,
    seconds: f64,
}

impl Point {
    fn json(&self) -> serde_json::Value {
        json!({
            "ppl": self.ppl,
            "memory_bytes": self.memory_bytes,
            "blocks": self.blocks,
            "windows": self.windows,
            "tokens": self.tokens,
            "seconds": self.seconds,
            "tokens_per_second": self.tokens as f64 / self.seconds.max(1e-9),
        })
    }
}

/// The windows of `text`, after checking that windows of `seq` tokens can be evaluated by
/// a model whose context is `context` tokens.
fn token_windows(
    tokenizer: &TextTokenizer,
    text: &Path,
    seq: usize,
    n: Option<usize>,
    context: usize,
) -> Result<Vec<Vec<u32>>> {
    bitstack::calibrate::check_window_length(seq, context)?;
    let content = bitstack::calibrate::read_text(text, "evaluation")?;
    let ids = tokenizer.encode(&content)?;
    let w: Vec<Vec<u32>> = windows(&ids, seq, n)
        .into_iter()
        .map(<[u32]>::to_vec)
        .collect();
    if w.is_empty() {
        bail!(
            "{}: {} tokens, fewer than one window of {seq} tokens",
            text.display(),
            ids.len()
        );
    }
    Ok(w)
}

fn perplexity(
    model: &CausalLm,
    windows: &[Vec<u32>],
    label: &str,
    quiet: bool,
) -> Result<(f64, usize, f64)> {
    let refs: Vec<&[u32]> = windows.iter().map(Vec::as_slice).collect();
    let bar = if quiet {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(refs.len() as u64)
    };
    bar.set_style(
        ProgressStyle::with_template(
            "{prefix:>10} [{bar:30}] {pos}/{len} windows, ETA {eta_precise}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    bar.set_prefix(label.to_string());
    let t = Instant::now();
    let p = model.perplexity_with_progress(&refs, &mut |done, _| bar.set_position(done as u64))?;
    bar.finish_and_clear();
    Ok((p.ppl, p.predicted_tokens, t.elapsed().as_secs_f64()))
}

/// Memory of an original checkpoint by the reference accounting: 2 bytes per parameter,
/// biases at 4 (as the reference implementation counts them).
fn original_memory(dir: &Path) -> Result<u64> {
    let ck = Checkpoint::open(dir)?;
    Ok(ck
        .tensors()
        .iter()
        .map(|(name, t)| {
            let n: u64 = t.shape.iter().map(|&d| d as u64).product();
            if name.ends_with(".bias") {
                4 * n
            } else {
                2 * n
            }
        })
        .sum())
}

fn eval_original(dir: &Path, args: &EvalArgs) -> Result<Point> {
    let model = CausalLm::load(dir).with_context(|| format!("loading {}", dir.display()))?;
    let tokenizer = TextTokenizer::from_model_dir(dir)?;
    let context = model.config().max_position_embeddings;
    let w = token_windows(&tokenizer, &args.text, args.seq, args.windows, context)?;
    let (ppl, tokens, seconds) = perplexity(&model, &w, "original", args.json || args.csv)?;
    Ok(Point {
        memory_bytes: original_memory(dir)?,
        blocks: None,
        ppl,
        windows: w.len(),
        tokens,
        seconds,
    })
}

pub fn eval(args: EvalArgs) -> Result<()> {
    let quiet = args.json || args.csv;
    if args.windows == Some(0) {
        bail!("--windows 0: at least one window is needed");
    }
    if args.sweep == Some(0) {
        bail!("--sweep 0: at least one budget is needed (2 or more make a curve)");
    }
    if args.target.is_dir() {
        if args.sweep.is_some() || args.budget.is_some() {
            bail!("--sweep and --budget apply to a .bitstack file, not to a model directory");
        }
        let p = eval_original(&args.target, &args)?;
        return print_point(&p, args.json);
    }
    let file = Arc::new(
        StackFile::open(&args.target)
            .with_context(|| format!("opening {}", args.target.display()))?,
    );
    let layout = file.layout().clone();
    let first_budget = match (&args.budget, args.sweep) {
        (Some(b), _) => parse_size(b).context("--budget")?,
        (None, Some(_)) => layout.min_memory(),
        (None, None) => layout.max_memory(),
    };
    let stack = Arc::new(LoadedStack::load(file.clone(), first_budget)?);
    let model = model_of(&stack)?;
    let tokenizer = tokenizer_of(&stack)?;
    let context = model.config().max_position_embeddings;
    let w = token_windows(&tokenizer, &args.text, args.seq, args.windows, context)?;
    let Some(steps) = args.sweep else {
        let (ppl, tokens, seconds) = perplexity(&model, &w, "eval", quiet)?;
        let plan = stack.plan();
        let p = Point {
            memory_bytes: plan.memory_bytes,
            blocks: Some(plan.blocks_loaded),
            ppl,
            windows: w.len(),
            tokens,
            seconds,
        };
        return print_point(&p, args.json);
    };
    let original = match &args.original {
        Some(dir) => Some(eval_original(dir, &args)?),
        None => None,
    };
    let mut rows = Vec::new();
    for (i, budget) in layout.budget_steps(steps.max(1)).into_iter().enumerate() {
        let report = stack.resize(budget)?;
        let label = format!("{}/{}", i + 1, steps);
        let (ppl, tokens, seconds) = perplexity(&model, &w, &label, quiet)?;
        let p = Point {
            memory_bytes: report.plan.memory_bytes,
            blocks: Some(report.plan.blocks_loaded),
            ppl,
            windows: w.len(),
            tokens,
            seconds,
        };
        if !quiet {
            out!(
                "{:>14} {:>10}  {:>6} blocks  ppl {:.4}",
                p.memory_bytes,
                format_size(p.memory_bytes),
                report.plan.blocks_loaded,
                p.ppl
            );
        }
        rows.push(p);
    }
    if let Some(path) = &args.plot {
        let points: Vec<(u64, f64)> = rows.iter().map(|p| (p.memory_bytes, p.ppl)).collect();
        let reference = original.as_ref().map(|o| (o.memory_bytes, o.ppl));
        let title = format!(
            "{} on {}",
            args.target
                .file_name()
                .map(|n| n.to_string_lossy().to_string())
                .unwrap_or_default(),
            args.text
                .file_name()
                .map(|n| n.to_string_lossy().to_string())
                .unwrap_or_default()
        );
        write_curve_svg(path, &title, &[("bitstack", &points)], reference)?;
        if !quiet {
            out!("plot written to {}", path.display());
        }
    }
    if args.csv {
        out!("memory_bytes,blocks,ppl");
        if let Some(o) = &original {
            out!("{},original,{}", o.memory_bytes, o.ppl);
        }
        for p in &rows {
            out!("{},{},{}", p.memory_bytes, p.blocks.unwrap_or(0), p.ppl);
        }
    } else if args.json {
        let out = json!({
            "file": args.target.display().to_string(),
            "text": args.text.display().to_string(),
            "original": original.as_ref().map(Point::json),
            "rows": rows.iter().map(Point::json).collect::<Vec<_>>(),
        });
        out!("{}", serde_json::to_string_pretty(&out)?);
    } else if let Some(o) = &original {
        out!(
            "original: {} ({}) ppl {:.4}",
            o.memory_bytes,
            format_size(o.memory_bytes),
            o.ppl
        );
    }
    Ok(())
}

fn print_point(p: &Point, as_json: bool) -> Result<()> {
    if as_json {
        out!("{}", serde_json::to_string_pretty(&p.json())?);
    } else {
        out!(
            "perplexity {:.4} over {} windows ({} predicted tokens) at {} bytes ({}){}; {:.0} tokens/s",
            p.ppl,
            p.windows,
            p.tokens,
            p.memory_bytes,
            format_size(p.memory_bytes),
            p.blocks.map(|b| format!(", {b} blocks")).unwrap_or_default(),
            p.tokens as f64 / p.seconds.max(1e-9)
        );
    }
    Ok(())
}

/// Options of `bitstack generate`.
#[derive(Debug, Args)]
pub struct GenerateArgs {
    /// The .bitstack file.
    pub file: PathBuf,
    /// Memory budget (default: the whole stack).
    #[arg(long)]
    pub budget: Option<String>,
    /// The prompt.
    #[arg(long)]
    pub prompt: String,
    /// Tokens to generate at most.
    #[arg(long, default_value_t = 128)]
    pub max_tokens: usize,
    /// Sampling temperature (0 = greedy).
    #[arg(long, default_value_t = 0.8, value_parser = parse_temperature)]
    pub temperature: f32,
    /// Nucleus sampling mass, in (0, 1].
    #[arg(long, default_value_t = 0.95, value_parser = parse_top_p)]
    pub top_p: f32,
    /// Random seed.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Change the budget while generating: `TOKEN:SIZE,...` (e.g. `0:6MB,20:4.7MB,40:11MB`);
    /// each change is applied between two tokens and reports the bytes moved.
    #[arg(long, value_name = "SCHEDULE")]
    pub budget_schedule: Option<String>,
    /// Residual-block (paper mode) decode products: `int8` (8-bit table entries, one scale
    /// per 256 columns; two to four times as fast as `f32` where the CPU has AVX-512 VBMI
    /// and VNNI or AVX2, f32 elsewhere), `int8-tiles` (8-bit `z` on the AMX tile unit where the CPU has it, for
    /// blocks of k ≥ 8: faster on one thread; `int8` elsewhere) or `f32` (exact to f32 rounding: the same samples on
    /// every CPU). Bit-plane (best mode) products take `x` as two bytes (within ~1e-4 of
    /// the exact product, where the CPU has VNNI and GFNI) except with `f32`.
    #[arg(long, value_enum, default_value_t = Tables::Int8)]
    pub decode_tables: Tables,
}

/// `--decode-tables`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Tables {
    /// 8-bit table entries.
    Int8,
    /// 8-bit `z` on AMX tiles where present, else 8-bit table entries.
    Int8Tiles,
    /// f32 entries.
    F32,
}

/// Parses `TOKEN:SIZE,...` into sorted (token index, bytes) pairs.
fn parse_schedule(text: &str) -> Result<Vec<(usize, u64)>> {
    let mut steps = Vec::new();
    for item in text.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let Some((at, size)) = item.split_once(':') else {
            bail!("--budget-schedule: {item:?} is not TOKEN:SIZE (example: 0:6MB,20:4.7MB)");
        };
        let at: usize = at
            .trim()
            .parse()
            .with_context(|| format!("--budget-schedule: token index in {item:?}"))?;
        steps.push((at, parse_size(size).context("--budget-schedule")?));
    }
    steps.sort_by_key(|s| s.0);
    Ok(steps)
}

/// `--temperature`: a finite number ≥ 0 (the sampler would treat NaN as a temperature).
fn parse_temperature(text: &str) -> Result<f32, String> {
    match text.parse::<f32>() {
        Ok(t) if t.is_finite() && t >= 0.0 => Ok(t),
        _ => Err(format!(
            "{text:?} is not a temperature: give a number ≥ 0 (0 = greedy)"
        )),
    }
}

/// `--top-p`: a probability mass in (0, 1] (the sampler would clamp other values silently).
fn parse_top_p(text: &str) -> Result<f32, String> {
    match text.parse::<f32>() {
        Ok(p) if p > 0.0 && p <= 1.0 => Ok(p),
        _ => Err(format!(
            "{text:?} is not a nucleus mass: give a number above 0 and at most 1"
        )),
    }
}

pub fn generate(args: GenerateArgs) -> Result<()> {
    let file = Arc::new(
        StackFile::open(&args.file).with_context(|| format!("opening {}", args.file.display()))?,
    );
    let mut schedule = match &args.budget_schedule {
        Some(text) => parse_schedule(text)?,
        None => Vec::new(),
    };
    let budget = match (&args.budget, schedule.first()) {
        (Some(b), _) => parse_size(b).context("--budget")?,
        (None, Some(&(0, b))) => b,
        _ => file.layout().max_memory(),
    };
    if schedule.first().is_some_and(|s| s.0 == 0) {
        schedule.remove(0);
    }
    // Check every scheduled budget before starting.
    for &(_, b) in &schedule {
        file.layout().plan_for_budget(b)?;
    }
    let stack = Arc::new(LoadedStack::load(file, budget)?);
    stack.set_decode_tables(match args.decode_tables {
        Tables::Int8 => DecodeTables::Int8,
        Tables::Int8Tiles => DecodeTables::Int8Tiles,
        Tables::F32 => DecodeTables::F32,
    });
    let model = model_of(&stack)?;
    let tokenizer = tokenizer_of(&stack)?;
    let prompt = tokenizer.encode(&args.prompt)?;
    if prompt.is_empty() {
        bail!("the prompt is empty after tokenization");
    }
    // Past its context the model runs on positions it was never trained on: stop there.
    let context = model.config().max_position_embeddings;
    if prompt.len() >= context {
        bail!(
            "the prompt has {} tokens; the model's context is {context} tokens \
             (max_position_embeddings in config.json), which leaves no room to generate",
            prompt.len()
        );
    }
    let max_tokens = args.max_tokens.min(context - prompt.len());
    let plan = stack.plan();
    eprintln!(
        "[{} blocks, {} bytes ({}) loaded]",
        plan.blocks_loaded,
        plan.memory_bytes,
        format_size(plan.memory_bytes)
    );
    let eos: Vec<u32> = tokenizer.token_to_id("<|endoftext|>").into_iter().collect();
    let mut sampler = Sampler::new(args.temperature, args.top_p, args.seed);
    let mut out = std::io::stdout();
    write!(out, "{}", args.prompt)?;
    out.flush()?;
    let mut generated: Vec<u32> = Vec::new();
    let mut printed = 0usize;
    let t = Instant::now();
    let mut first_token: Option<f64> = None;
    let mut write_error = None;
    let mut resize_error = None;
    let mut next_change = 0usize;
    model.generate(&prompt, max_tokens, &mut sampler, &eos, &mut |token| {
        if first_token.is_none() {
            first_token = Some(t.elapsed().as_secs_f64());
        }
        generated.push(token);
        // Budget changes take effect before the next token is computed.
        while let Some(&(at, budget)) = schedule.get(next_change) {
            if at > generated.len() {
                break;
            }
            next_change += 1;
            match stack.resize(budget) {
                Ok(r) => eprint!(
                    "\n[token {}: budget {} -> {} blocks, {} bytes; read {} bytes, freed {} bytes]\n",
                    generated.len(),
                    format_size(budget),
                    r.plan.blocks_loaded,
                    r.plan.memory_bytes,
                    r.bytes_read,
                    r.bytes_freed
                ),
                Err(e) => {
                    resize_error = Some(e);
                    return false;
                }
            }
        }
        // Print the text decoded so far past what was printed (multi-byte safe).
        if let Ok(text) = tokenizer.decode(&generated, true) {
            if text.len() > printed && text.is_char_boundary(printed) && !text.ends_with('\u{FFFD}')
            {
                if let Err(e) = write!(out, "{}", &text[printed..]).and_then(|_| out.flush()) {
                    write_error = Some(e);
                    return false;
                }
                printed = text.len();
            }
        }
        true
    })?;
    if let Some(e) = write_error {
        return Err(e.into());
    }
    if let Some(e) = resize_error {
        return Err(e.into());
    }
    let seconds = t.elapsed().as_secs_f64();
    out!();
    if max_tokens < args.max_tokens && generated.len() == max_tokens {
        eprintln!(
            "[stopped after {max_tokens} tokens: the prompt and the generated tokens fill the \
             model's context of {context} tokens]"
        );
    }
    let decode_tokens = generated.len().saturating_sub(1) as f64;
    let decode_seconds = seconds - first_token.unwrap_or(0.0);
    eprintln!(
        "[{} tokens in {:.2} s: prompt {} tokens in {:.2} s, {:.1} tokens/s decoding]",
        generated.len(),
        seconds,
        prompt.len(),
        first_token.unwrap_or(0.0),
        decode_tokens / decode_seconds.max(1e-9)
    );
    Ok(())
}
