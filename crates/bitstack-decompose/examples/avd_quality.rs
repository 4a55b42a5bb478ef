//! Fast-vs-exact AVD quality on every small-llama matrix (k = 4, 16 blocks, raw weights).
//!
//! `cargo run --release -p bitstack-decompose --example avd_quality -- [OS:PI:WARM:KRYLOV]...`
//! prints, for each randomized setting (`oversample:power_iters:warm_start:block_krylov`,
//! flags 0 or 1; default: the crate's default), the per-matrix ratio
//! `fast rel_err / exact rel_err` after 16 blocks (max, mean, min, count above 1.01) and the
//! time, and the same ratio on the bench's synthetic 512×512 matrix at k = 16. The exact
//! small-llama errors are cached in the system temp directory (delete the file after
//! changing the exact path).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::time::Instant;

use bitstack_decompose::{decompose, AvdParams, SvdMethod};
use rayon::prelude::*;
use safetensors::{Dtype, SafeTensors};

mod common;
use common::synthetic;

fn main() {
    let syn = synthetic(512, 512, 5);
    let syn_run = |svd: SvdMethod| {
        let params = AvdParams {
            k: 16,
            niter: 16,
            svd,
            seed: 0,
        };
        decompose(&syn, 512, 512, &params, None).unwrap().rel_err[15]
    };
    let syn_exact = syn_run(SvdMethod::Exact);
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared");
    let json_path = dir.join("reference/avd_reference_errors.json");
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&json_path).unwrap()).unwrap();
    let entry = &json["small-llama"];
    let k = entry["k"].as_u64().unwrap() as usize;
    let niter = entry["niter"].as_u64().unwrap() as usize;
    let mut names: Vec<String> = entry["rel_err_after_blocks"]
        .as_object()
        .unwrap()
        .keys()
        .cloned()
        .collect();
    names.sort();
    let bytes = std::fs::read(dir.join("models/small-llama/model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mats: Vec<(String, usize, usize, Vec<f32>)> = names
        .iter()
        .map(|name| {
            let t = st.tensor(name).unwrap();
            assert_eq!(t.dtype(), Dtype::BF16);
            let data = t
                .data()
                .chunks_exact(2)
                .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect();
            (name.clone(), t.shape()[0], t.shape()[1], data)
        })
        .collect();
    let run = |svd: SvdMethod| -> Vec<f64> {
        let params = AvdParams {
            k,
            niter,
            svd,
            seed: 0,
        };
        mats.par_iter()
            .map(|(_, r, c, w)| decompose(w, *r, *c, &params, None).unwrap().rel_err[niter - 1])
            .collect()
    };
    let cache = std::env::temp_dir().join("bitstack_avd_exact_small_llama_k4.json");
    let exact: Vec<f64> = match std::fs::read(&cache) {
        Ok(b) => serde_json::from_slice(&b).unwrap(),
        Err(_) => {
            let t = Instant::now();
            let e = run(SvdMethod::Exact);
            println!("exact: {:.1} s", t.elapsed().as_secs_f64());
            std::fs::write(&cache, serde_json::to_vec(&e).unwrap()).unwrap();
            e
        }
    };
    let mut settings: Vec<SvdMethod> = std::env::args()
        .skip(1)
        .map(|a| {
            let p: Vec<usize> = a.split(':').map(|x| x.parse().unwrap()).collect();
            SvdMethod::Randomized {
                oversample: p[0],
                power_iters: p[1],
                warm_start: p[2] != 0,
                block_krylov: p.get(3) == Some(&1),
            }
        })
        .collect();
    if settings.is_empty() {
        settings.push(SvdMethod::default());
    }
    for svd in settings {
        let t = Instant::now();
        let fast = run(svd);
        let secs = t.elapsed().as_secs_f64();
        let ratios: Vec<f64> = fast.iter().zip(&exact).map(|(f, e)| f / e).collect();
        let (worst, name) = ratios
            .iter()
            .zip(&mats)
            .map(|(r, m)| (*r, m.0.as_str()))
            .fold((0.0, ""), |a, b| if b.0 > a.0 { b } else { a });
        let syn_ratio = syn_run(svd) / syn_exact;
        let mean = ratios.iter().sum::<f64>() / ratios.len() as f64;
        let over = ratios.iter().filter(|&&r| r > 1.01).count();
        println!(
            "{svd:?}: max ratio {worst:.5} ({name}), mean {mean:.5}, min {:.5}, >1.01: {over}/{}, {secs:.1} s",
            ratios.iter().copied().fold(f64::INFINITY, f64::min),
            ratios.len()
        );
        println!("  synthetic 512x512 k=16: fast/exact {syn_ratio:.5}");
    }
}
