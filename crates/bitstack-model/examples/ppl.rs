//! Perplexity and throughput of a model directory on a text file.
//!
//! `cargo run --release -p bitstack-model --example ppl -- <model_dir> <text> [max_windows] [decode_tokens]`
//!
//! Defaults: `../shared/models/small-llama`, `../shared/data/test.txt`, 64 windows, 256 decode
//! tokens. Prints the perplexity (docs/ALGORITHM.md §5), the full-sequence forward throughput
//! and the incremental decoding throughput.

use std::time::Instant;

use bitstack_model::{windows, CausalLm, Sampler, TextTokenizer};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let dir = args
        .get(1)
        .map_or("../shared/models/small-llama", String::as_str);
    let text = args
        .get(2)
        .map_or("../shared/data/test.txt", String::as_str);
    let max_windows: Option<usize> = match args.get(3).map(String::as_str) {
        None => Some(64),
        Some("all") => None,
        Some(n) => Some(n.parse()?),
    };
    let decode_tokens: usize = args.get(4).map_or(Ok(256), |s| s.parse())?;

    let t0 = Instant::now();
    let model = CausalLm::load(dir)?;
    let tok = TextTokenizer::from_model_dir(dir)?;
    println!("loaded {dir} in {:.2}s", t0.elapsed().as_secs_f64());
    let t0 = Instant::now();
    let ids = tok.encode(&std::fs::read_to_string(text)?)?;
    println!(
        "tokenized {text}: {} tokens in {:.2}s",
        ids.len(),
        t0.elapsed().as_secs_f64()
    );
    let wins = windows(&ids, 512, max_windows);
    let t0 = Instant::now();
    let p = model.perplexity_with_progress(&wins, &mut |done, total| {
        if done % 64 == 0 || done == total {
            eprintln!("  {done}/{total} windows");
        }
    })?;
    let dt = t0.elapsed().as_secs_f64();
    println!(
        "ppl {:.5} (mean nll {:.6}) over {} windows / {} predicted tokens",
        p.ppl, p.mean_nll, p.windows, p.predicted_tokens
    );
    println!(
        "full-sequence forward: {:.1} tokens/s ({:.3}s per 512-token window)",
        (p.windows * 512) as f64 / dt,
        dt / p.windows as f64
    );

    if decode_tokens > 0 {
        let prompt = &ids[..16.min(ids.len())];
        let mut sampler = Sampler::greedy();
        let t0 = Instant::now();
        let out = model.generate(prompt, decode_tokens, &mut sampler, &[], &mut |_| true)?;
        let dt = t0.elapsed().as_secs_f64();
        println!(
            "decode: {} tokens in {:.2}s = {:.1} tokens/s (greedy, KV cache, {}-token prompt)",
            out.len(),
            dt,
            out.len() as f64 / dt,
            prompt.len()
        );
        println!(
            "sample: {:?}",
            tok.decode(&out[..out.len().min(48)], false)?
        );
    }
    Ok(())
}
