//! Benchmarks of `bitstack-runtime`: the products a loaded stack serves (4 AVD blocks of
//! k = 16, as the runtime holds them: signs in strips, the default 8-bit decode tables where
//! the CPU has AVX-512 VBMI/VNNI, and the exact f32 tables) against the dense f32 products of
//! the same engine (`bitstack::model::matvec` and `dense_forward`, faer's GEMM): issue 4's
//! decode shapes (4096², 14336 × 4096, one token) and its batch shape (512 tokens through
//! 4096²). `bitstack bench --only kernels` prints the same comparisons as a table of ratios.
//!
//! `cargo bench -p bitstack-benches --bench runtime`

#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use bitstack::compress::push_avd_block;
use bitstack::decompose::{decompose, AvdParams, SvdMethod};
use bitstack::format::{Container, ContainerWriter};
use bitstack::model::{dense_forward, matvec};
use bitstack::runtime::{DecodeTables, LoadedStack, StackFile};
use bitstack_benches::synthetic;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};

const K: usize = 16;
const BLOCKS: usize = 4;
const TOKENS: usize = 512;

/// `w`'s first 4 AVD blocks (k = 16) in a one-matrix container, loaded whole.
fn stack_of(w: &[f32], rows: usize, cols: usize) -> LoadedStack {
    let params = AvdParams {
        k: K,
        niter: BLOCKS,
        svd: SvdMethod::default(),
        seed: 0,
    };
    let d = decompose(w, rows, cols, &params, None).unwrap();
    let mut writer = ContainerWriter::new(Default::default());
    writer.add_matrix("w", rows, cols, "F32").unwrap();
    for (b, block) in d.blocks.into_iter().enumerate() {
        push_avd_block(&mut writer, 0, b, block).unwrap();
    }
    writer.set_mandatory_blocks(1);
    let container = Container::from_bytes(writer.to_bytes().unwrap()).unwrap();
    let file = Arc::new(StackFile::from_container(container).unwrap());
    LoadedStack::load(file, u64::MAX).unwrap()
}

fn input(len: usize, modulus: usize) -> Vec<f32> {
    let half = (modulus / 2) as f32;
    (0..len)
        .map(|i| ((i % modulus) as f32 - half) / half)
        .collect()
}

/// One token: the dense f32 product, the stack's default product and its exact one.
fn decode(c: &mut Criterion) {
    for (rows, cols) in [(4096, 4096), (14336, 4096)] {
        let w = synthetic(rows, cols, 2);
        let stack = stack_of(&w, rows, cols);
        let x = input(cols, 17);
        let mut y = vec![0.0f32; rows];
        let mut g = c.benchmark_group(format!("runtime/decode_{rows}x{cols}_k16_4blocks"));
        g.sample_size(20)
            .warm_up_time(Duration::from_millis(500))
            .measurement_time(Duration::from_secs(3))
            .throughput(Throughput::Elements((rows * cols) as u64));
        g.bench_function("dense_f32", |b| {
            b.iter(|| matvec(black_box(&w), rows, cols, black_box(&x), &mut y))
        });
        for (name, tables) in [
            ("stack_default_tables", DecodeTables::default()),
            ("stack_f32_tables", DecodeTables::F32),
        ] {
            stack.set_decode_tables(tables);
            g.bench_function(name, |b| b.iter(|| stack.matvec(0, black_box(&x), &mut y)));
        }
        stack.set_decode_tables(DecodeTables::default());
        g.finish();
    }
}

/// 512 tokens through 4096²: a dense f32 GEMM against the stack's tile rebuild and GEMMs.
fn batch(c: &mut Criterion) {
    let (rows, cols) = (4096, 4096);
    let w = synthetic(rows, cols, 2);
    let stack = stack_of(&w, rows, cols);
    let x = input(TOKENS * cols, 23);
    let mut y = vec![0.0f32; TOKENS * rows];
    let mut g = c.benchmark_group(format!("runtime/batch_{TOKENS}x{rows}x{cols}_k16_4blocks"));
    g.sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(5))
        .throughput(Throughput::Elements((TOKENS * rows * cols) as u64));
    g.bench_function("dense_f32_gemm", |b| {
        b.iter(|| dense_forward(black_box(&w), rows, cols, black_box(&x), TOKENS, &mut y))
    });
    g.bench_function("stack_tiles", |b| {
        b.iter(|| stack.matmul(0, black_box(&x), TOKENS, &mut y))
    });
    g.finish();
}

criterion_group!(benches, decode, batch);
criterion_main!(benches);
