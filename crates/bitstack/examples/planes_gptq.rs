//! Experiment: does GPTQ-style error compensation help nested bit planes?
//!
//! For every decoder linear of a model, the Hessian-weighted error
//! `tr(ΔW H ΔWᵀ) / tr(W H Wᵀ)` (`H = XᵀX` of the linear's calibration inputs) after 1..=8
//! planes, for plain `decompose_planes` and for GPTQ-compensated variants on the same grid
//! (`decompose_planes_with_factor`), computed from the dense reconstruction of each prefix.
//!
//! ```text
//! cargo run --release -p bitstack --example planes_gptq -- [MODEL_DIR] [TEXT] [WINDOWS] [SEQ]
//! ```
//!
//! Defaults: `../shared/models/small-llama`, `fixtures/data/calib.txt`, 32 windows of 256.

use std::path::PathBuf;
use std::time::Instant;

use bitstack::checkpoint::Checkpoint;
use bitstack::decompose::{
    decompose_planes, decompose_planes_with_factor_limited, CompensationMode, GptqFactor,
    PlaneParams, DEFAULT_DAMP,
};
use bitstack::model::{windows, CausalLm, LinearSlot, Site, TextTokenizer};
use faer::linalg::matmul::matmul;
use faer::{Accum, MatMut, MatRef, Par};

const PLANES: usize = 8;

/// (label, compensated planes, mode, flip radius in steps).
type Variant = (&'static str, usize, CompensationMode, f32);

const INF: f32 = f32::INFINITY;
const VARIANTS: [Variant; 14] = [
    ("plain", 0, CompensationMode::Joint, INF),
    ("joint1", 1, CompensationMode::Joint, INF),
    ("joint2", 2, CompensationMode::Joint, INF),
    ("joint3", 3, CompensationMode::Joint, INF),
    ("joint8", 8, CompensationMode::Joint, INF),
    ("pbp2", 2, CompensationMode::PlaneByPlane, INF),
    ("pbp3", 3, CompensationMode::PlaneByPlane, INF),
    ("pbp8", 8, CompensationMode::PlaneByPlane, INF),
    ("j3r1/8", 3, CompensationMode::Joint, 0.125),
    ("j3r1/32", 3, CompensationMode::Joint, 0.03125),
    ("p3r1/8", 3, CompensationMode::PlaneByPlane, 0.125),
    ("p3r1/32", 3, CompensationMode::PlaneByPlane, 0.03125),
    ("p8r1/8", 8, CompensationMode::PlaneByPlane, 0.125),
    ("p8r1/32", 8, CompensationMode::PlaneByPlane, 0.03125),
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let args: Vec<String> = std::env::args().collect();
    let model_dir = args
        .get(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("../shared/models/small-llama"));
    let text = args
        .get(2)
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("fixtures/data/calib.txt"));
    let count: usize = args.get(3).map(|s| s.parse()).transpose()?.unwrap_or(32);
    let seq: usize = args.get(4).map(|s| s.parse()).transpose()?.unwrap_or(256);
    let max_layers: usize = args
        .get(5)
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(usize::MAX);
    let start = Instant::now();

    // 1. Hessians H = XᵀX per (layer, site).
    let model = CausalLm::load(&model_dir)?;
    let tokenizer = TextTokenizer::from_model_dir(&model_dir)?;
    let ids = tokenizer.encode(&std::fs::read_to_string(&text)?)?;
    let wins = windows(&ids, seq, Some(count));
    let layers = model.num_layers().min(max_layers);
    let owned: Vec<Vec<u32>> = wins.iter().map(|w| w.to_vec()).collect();
    let mut stream = bitstack::best::HessianStream::new(model, &owned)?;
    let hess = (0..layers)
        .map(|l| stream.layer(l).cloned())
        .collect::<Result<Vec<_>, _>>()?;
    println!(
        "hessians: {} windows × {seq} tokens, {:.1}s",
        wins.len(),
        start.elapsed().as_secs_f64()
    );

    // 2. Errors per matrix and variant.
    let checkpoint = Checkpoint::open(&model_dir)?;
    let params = PlaneParams {
        group: 128,
        planes: PLANES,
    };
    // log-ratio sums per variant and prefix (against plain), for the geometric means.
    let mut log_sum = vec![[0.0f64; PLANES]; VARIANTS.len()];
    let mut matrices = 0usize;
    let mut decompose_time = vec![0.0f64; VARIANTS.len()];
    let mut eval_time = 0.0f64;
    for (layer, per_site) in hess.iter().enumerate().take(layers) {
        for (s, site) in Site::ALL.iter().enumerate() {
            let h = &per_site[s];
            let cols = (h.len() as f64).sqrt().round() as usize;
            let factor = GptqFactor::new(h, cols, DEFAULT_DAMP)?;
            let h32: Vec<f32> = h.iter().map(|&v| v as f32).collect();
            for &slot in site.slots() {
                let name = slot.weight_name(layer);
                let w = checkpoint.tensor_f32(&name)?;
                let rows = w.len() / cols;
                let norm = h_errors(&w, &[vec![0.0; w.len()]], rows, cols, &h32)[0];
                let mut rel = Vec::with_capacity(VARIANTS.len());
                for (v, &(_, comp, mode, radius)) in VARIANTS.iter().enumerate() {
                    let t = Instant::now();
                    let d = if comp == 0 {
                        decompose_planes(&w, rows, cols, &params, None, None)?
                    } else {
                        decompose_planes_with_factor_limited(
                            &w, rows, cols, &params, &factor, comp, mode, radius,
                        )?
                    };
                    decompose_time[v] += t.elapsed().as_secs_f64();
                    let t = Instant::now();
                    let errs = h_errors(&w, &d.prefix_reconstructions(), rows, cols, &h32);
                    eval_time += t.elapsed().as_secs_f64();
                    rel.push(errs.iter().map(|e| e / norm).collect::<Vec<f64>>());
                }
                println!("{} ({rows}×{cols})", short(&name, slot));
                for (v, &(label, _, _, _)) in VARIANTS.iter().enumerate() {
                    let line: Vec<String> = rel[v].iter().map(|e| format!("{e:.3e}")).collect();
                    let ratio: Vec<String> = rel[v]
                        .iter()
                        .zip(&rel[0])
                        .map(|(a, b)| format!("{:.3}", a / b))
                        .collect();
                    println!(
                        "  {label:>7}: {}   ratio {}",
                        line.join(" "),
                        ratio.join(" ")
                    );
                    for (p, (a, b)) in rel[v].iter().zip(&rel[0]).enumerate() {
                        log_sum[v][p] += (a / b).ln();
                    }
                }
                matrices += 1;
            }
        }
    }

    // 3. Summary.
    println!("\ngeometric mean over {matrices} matrices of (variant / plain) H-weighted error");
    print!("{:>8}", "planes");
    for p in 1..=PLANES {
        print!("{p:>8}");
    }
    println!("{:>12}", "decomp s");
    for (v, &(label, _, _, _)) in VARIANTS.iter().enumerate() {
        print!("{label:>8}");
        for l in &log_sum[v] {
            print!("{:>8.4}", (l / matrices as f64).exp());
        }
        println!("{:>12.1}", decompose_time[v]);
    }
    println!(
        "evaluation {eval_time:.1}s, total {:.1}s",
        start.elapsed().as_secs_f64()
    );
    Ok(())
}

fn short(name: &str, slot: LinearSlot) -> String {
    let layer = name.split('.').nth(2).unwrap_or("?");
    format!("L{layer}.{}", slot.short_name())
}

/// `tr((W − Q) H (W − Q)ᵀ)` for each reconstruction `Q`.
fn h_errors(w: &[f32], recons: &[Vec<f32>], rows: usize, cols: usize, h: &[f32]) -> Vec<f64> {
    let n = recons.len();
    let mut e = vec![0.0f32; n * rows * cols];
    for (chunk, q) in e.chunks_exact_mut(rows * cols).zip(recons) {
        for ((o, &a), &b) in chunk.iter_mut().zip(w).zip(q) {
            *o = a - b;
        }
    }
    let mut eh = vec![0.0f32; n * rows * cols];
    matmul(
        MatMut::from_row_major_slice_mut(&mut eh, n * rows, cols),
        Accum::Replace,
        MatRef::from_row_major_slice(&e, n * rows, cols),
        MatRef::from_row_major_slice(h, cols, cols),
        1.0f32,
        Par::rayon(0),
    );
    e.chunks_exact(rows * cols)
        .zip(eh.chunks_exact(rows * cols))
        .map(|(a, b)| {
            a.iter()
                .zip(b)
                .map(|(&x, &y)| f64::from(x) * f64::from(y))
                .sum()
        })
        .collect()
}
