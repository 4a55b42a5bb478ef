//! Random residual blocks and the exact decode product in f64, shared by the kernel tests.

#![allow(dead_code, clippy::unwrap_used)]

use bitstack_bits::{LowRankRef, Parallelism, SignMatrix, Simd};
use half::f16;

/// One random block: signs, `u` (`m × k`), `v` (`k × n`) as f16.
pub type Parts = (SignMatrix, Vec<f16>, Vec<f16>, usize);

pub fn block(m: usize, n: usize, k: usize, seed: u64) -> Parts {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state >> 11) as f32 / (1u64 << 53) as f32 * 2.0 - 1.0
    };
    let signs: Vec<f32> = (0..m * n).map(|_| next()).collect();
    let s = SignMatrix::from_signs_of(&signs, m, n).unwrap();
    // Magnitudes over several orders, as in trained factors.
    let u = (0..m * k)
        .map(|i| f16::from_f32(next() * (1.0 + (i % 7) as f32)))
        .collect();
    let v = (0..k * n)
        .map(|i| f16::from_f32(next() * 0.1 * (1.0 + (i % 5) as f32)))
        .collect();
    (s, u, v, k)
}

pub fn refs(parts: &[Parts]) -> Vec<LowRankRef<'_>> {
    parts
        .iter()
        .map(|(s, u, v, k)| LowRankRef {
            signs: s.as_view(),
            u,
            v,
            k: *k,
        })
        .collect()
}

/// The exact product in f64 and the f32-rounding slack of each row.
pub fn exact(parts: &[Parts], x: &[f32], m: usize) -> (Vec<f64>, Vec<f64>) {
    let n = x.len();
    let mut y = vec![0.0f64; m];
    let mut slack = vec![0.0f64; m];
    for (s, u, v, k) in parts {
        let s = s.as_view();
        for r in 0..m {
            for j in 0..*k {
                let uj = f64::from(u[r * k + j].to_f32());
                let (mut dot, mut mag) = (0.0f64, 0.0f64);
                for c in 0..n {
                    let t = f64::from(v[j * n + c].to_f32()) * f64::from(x[c]);
                    dot += f64::from(s.sign(r, c)) * t;
                    mag += t.abs();
                }
                y[r] += uj * dot;
                slack[r] += 1e-5 * uj.abs() * mag;
            }
        }
    }
    (y, slack)
}

/// A decode kernel's signature (`lowrank_matvec_add_q8`, `lowrank_matvec_add_i8`).
pub type Kernel = fn(&[LowRankRef<'_>], &[f32], &mut [f32], Parallelism, Simd);

/// An input of `n` values spread over [-2, 2], its first fifth zero and one tiny value.
pub fn spread_x(n: usize) -> Vec<f32> {
    let mut x: Vec<f32> = (0..n)
        .map(|i| ((i * 37 % 101) as f32 - 50.0) / 25.0)
        .collect();
    x[..n / 5].iter_mut().for_each(|v| *v = 0.0);
    x[n / 2] = 1e-30;
    x
}

/// A non-finite input gives a non-finite output, as the exact product does.
pub fn assert_nan_propagates(kernel: Kernel) {
    let parts = vec![block(20, 300, 4, 3)];
    let mut x = vec![0.5f32; 300];
    x[7] = f32::NAN;
    for simd in Simd::ALL {
        let mut y = vec![0.0f32; 20];
        kernel(&refs(&parts), &x, &mut y, Parallelism::Sequential, simd);
        assert!(y.iter().all(|v| v.is_nan()), "{simd:?}: {y:?}");
    }
}
