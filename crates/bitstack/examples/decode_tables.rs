//! Decode-path perplexity (one token at a time, the packed products of every matrix) of a
//! stack with f32 decode tables, 8-bit tables and 8-bit `z` on AMX tiles, side by side:
//! `cargo run --release -p bitstack --example decode_tables -- FILE MODEL_DIR TEXT [BUDGET] [TOKENS]`
//! (BUDGET in bytes, default the whole stack; TOKENS default 256).

use std::sync::Arc;

use bitstack::engine::model_of;
use bitstack::model::TextTokenizer;
use bitstack::runtime::{DecodeTables, LoadedStack, StackFile};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [file, model_dir, text, rest @ ..] = args.as_slice() else {
        return Err("usage: decode_tables FILE MODEL_DIR TEXT [BUDGET] [TOKENS]".into());
    };
    let budget = rest
        .first()
        .map(|b| b.parse())
        .transpose()?
        .unwrap_or(u64::MAX);
    let tokens: usize = rest.get(1).map(|t| t.parse()).transpose()?.unwrap_or(256);
    let stack = Arc::new(LoadedStack::load(Arc::new(StackFile::open(file)?), budget)?);
    let model = model_of(&stack)?;
    let tokenizer = TextTokenizer::from_model_dir(model_dir)?;
    let ids = tokenizer.encode(&std::fs::read_to_string(text)?)?;
    let ids = &ids[..ids.len().min(tokens + 1)];
    let mut results = Vec::new();
    for tables in [
        DecodeTables::F32,
        DecodeTables::Int8,
        DecodeTables::Int8Tiles,
    ] {
        stack.set_decode_tables(tables);
        let mut cache = model.new_cache();
        let (mut nll, mut logits_all) = (0.0f64, Vec::new());
        for w in ids.windows(2) {
            let logits = model.forward_next(w[0], &mut cache)?;
            let max = logits.iter().fold(f32::MIN, |a, &b| a.max(b));
            let sum: f64 = logits.iter().map(|&l| f64::from(l - max).exp()).sum();
            nll += sum.ln() - f64::from(logits[w[1] as usize] - max);
            logits_all.push(logits);
        }
        let ppl = (nll / (ids.len() - 1) as f64).exp();
        results.push((tables, ppl, logits_all));
    }
    let exact = &results[0];
    for (other, what) in results[1..]
        .iter()
        .zip(["8-bit tables", "8-bit tiles (AMX where present)"])
    {
        let (mut diff, mut norm) = (0.0f64, 0.0f64);
        for (a, b) in exact.2.iter().zip(&other.2) {
            for (x, y) in a.iter().zip(b) {
                diff += f64::from(x - y).powi(2);
                norm += f64::from(*x).powi(2);
            }
        }
        println!(
            "{} tokens one at a time: ppl {:.4} (f32 tables) vs {:.4} ({what}), ratio {:.5}; \
             logits relative RMS difference {:.2e}",
            ids.len() - 1,
            exact.1,
            other.1,
            other.1 / exact.1,
            (diff / norm).sqrt()
        );
    }
    Ok(())
}
