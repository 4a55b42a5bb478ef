//! `bitstack`: compress a model once into a stack file, load it at any memory budget.
#![allow(clippy::print_stdout)]

/// `println!` that returns the I/O error (a closed pipe) instead of panicking.
macro_rules! out {
    () => {{
        use std::io::Write as _;
        writeln!(std::io::stdout().lock())?
    }};
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        writeln!(std::io::stdout().lock(), $($arg)*)?
    }};
}

mod bench;
mod commands;
mod eval;
mod plot;
mod progress;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Compress an LLM once into one file that loads at any memory budget (BitStack).
#[derive(Debug, Parser)]
#[command(name = "bitstack", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Compress a Hugging Face checkpoint directory into a .bitstack file.
    Compress(commands::CompressArgs),
    /// Describe a .bitstack file: model, matrices, blocks, memory range.
    Inspect {
        /// The .bitstack file.
        file: PathBuf,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
        /// Also list the stack order (matrix name and block index of every entry).
        #[arg(long)]
        order: bool,
    },
    /// Show what a budget loads: blocks per matrix and the exact memory.
    Plan {
        /// The .bitstack file.
        file: PathBuf,
        /// Memory budget: bytes, kB/MB/GB (10^3) or KiB/MiB/GiB (2^10).
        #[arg(long)]
        budget: String,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Perplexity of a .bitstack file at a budget (or a sweep of budgets), or of an original
    /// model directory.
    Eval(eval::EvalArgs),
    /// Generate text from a .bitstack file at a budget, streaming tokens.
    Generate(eval::GenerateArgs),
    /// Speed comparisons side by side (AVD, decode and batch kernels, end to end) with
    /// ratios; `--json` for machines, `--quick` for a one-minute version.
    Bench(bench::BenchArgs),
    /// Write a dense Hugging Face checkpoint of the model at a budget.
    Export {
        /// The .bitstack file.
        file: PathBuf,
        /// Memory budget: bytes, kB/MB/GB (10^3) or KiB/MiB/GiB (2^10).
        #[arg(long)]
        budget: String,
        /// Output directory (created if missing).
        #[arg(short, long)]
        output: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The command runs on a thread of rayon's pool, so that the kernels' parallel parts are
    // shared with the other worker directly instead of being injected from outside the pool
    // (a wake-up per matrix-vector product while decoding).
    let result = rayon::scope(|_| run(cli));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if is_broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", describe(&e));
            ExitCode::FAILURE
        }
    }
}

/// Runs one command.
fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Compress(args) => commands::compress(args),
        Command::Eval(args) => eval::eval(args),
        Command::Bench(args) => bench::bench(args),
        Command::Generate(args) => eval::generate(args),
        Command::Inspect { file, json, order } => commands::inspect(&file, json, order),
        Command::Plan { file, budget, json } => commands::plan(&file, &budget, json),
        Command::Export {
            file,
            budget,
            output,
        } => commands::export(&file, &budget, &output),
    }
}

/// The error and its causes joined by ": ", leaving out a cause whose text the message
/// already contains (library errors often include their source's text).
fn describe(e: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in e.chain() {
        let part = cause.to_string();
        if !text.contains(&part) {
            if !text.is_empty() {
                text.push_str(": ");
            }
            text.push_str(&part);
        }
    }
    text
}

/// True when the error is a write to a closed pipe (e.g. `bitstack inspect f | head`).
fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|cause| {
        cause
            .downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}
