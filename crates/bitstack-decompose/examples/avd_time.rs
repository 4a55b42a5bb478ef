//! Time of the fast AVD on the bench's synthetic matrix, per block.
//!
//! `cargo run --release -p bitstack-decompose --example avd_time -- [ROWS COLS K NITER REPS
//! [exact]]` (default 14336 4096 16 4 3) decomposes the matrix `REPS` times and prints seconds
//! per block for each run and the relative error after the last block (a profile target);
//! with `exact`, also the exact-SVD decomposition once and the ratio of the errors after
//! `NITER` blocks (fast / exact).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Instant;

use bitstack_decompose::{decompose, AvdParams, SvdMethod};

mod common;
use common::synthetic;

fn main() {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let exact = args.last().is_some_and(|a| a == "exact");
    if exact {
        args.pop();
    }
    let args: Vec<usize> = args
        .iter()
        .map(|a| a.parse().expect("numbers: ROWS COLS K NITER REPS"))
        .collect();
    let get = |i: usize, d: usize| args.get(i).copied().unwrap_or(d);
    let (r, c, k, niter, reps) = (
        get(0, 14336),
        get(1, 4096),
        get(2, 16),
        get(3, 4),
        get(4, 3),
    );
    let w = synthetic(r, c, (r * 31 + c) as u64);
    let params = AvdParams {
        k,
        niter,
        svd: SvdMethod::default(),
        seed: 0,
    };
    let mut fast_err = f64::NAN;
    for _ in 0..reps {
        let t = Instant::now();
        let d = decompose(&w, r, c, &params, None).unwrap();
        let per = t.elapsed().as_secs_f64() / niter as f64;
        fast_err = d.rel_err[niter - 1];
        println!("{r}x{c} k={k}: {per:.4} s per block, rel_err after {niter}: {fast_err:.6}");
    }
    if exact {
        let params = AvdParams {
            svd: SvdMethod::Exact,
            ..params
        };
        let t = Instant::now();
        let d = decompose(&w, r, c, &params, None).unwrap();
        let per = t.elapsed().as_secs_f64() / niter as f64;
        let exact_err = d.rel_err[niter - 1];
        println!(
            "exact: {per:.3} s per block, rel_err after {niter}: {exact_err:.6}; fast / exact {:.5}",
            fast_err / exact_err
        );
    }
}
