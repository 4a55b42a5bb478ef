//! Vectorizable elementwise math (exp, softmax, SiLU) for the hot loops.
//!
//! `exp` is a branch-free Cephes-style polynomial (about 2 ulp on the range used here) so the
//! loops vectorize; each slice function is compiled twice, once for AVX2+FMA (chosen at run
//! time) and once portably.

/// `e^x` for one value, branch-free (inputs below −87.3 flush towards 0, above 88.7 clamp).
#[inline(always)]
fn exp_scalar(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let x = x.clamp(-87.3, 88.7);
    let n = (x * LOG2E).round();
    let r = x - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_1e-4f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let y = p * r * r + r + 1.0;
    let bits = ((n as i32 + 127) as u32) << 23;
    y * f32::from_bits(bits)
}

macro_rules! multiversion {
    ($(#[$m:meta])* fn $name:ident($($arg:ident: $ty:ty),*) $(-> $ret:ty)? $body:block) => {
        $(#[$m])*
        pub(crate) fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn imp($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2,fma")]
                fn avx2($($arg: $ty),*) $(-> $ret)? { imp($($arg),*) }
                if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                    // SAFETY: the required CPU features were detected just above.
                    return unsafe { avx2($($arg),*) };
                }
            }
            imp($($arg),*)
        }
    };
}

multiversion! {
    /// `x[i] = e^(x[i] − shift)`, returning the sum (f32 lanes, added in f64 at the end).
    fn exp_shifted_sum(x: &mut [f32], shift: f32) -> f64 {
        let mut acc = [0.0f32; 8];
        let mut chunks = x.chunks_exact_mut(8);
        for c in &mut chunks {
            for i in 0..8 {
                c[i] = exp_scalar(c[i] - shift);
                acc[i] += c[i];
            }
        }
        let mut tail = 0.0f64;
        for v in chunks.into_remainder() {
            *v = exp_scalar(*v - shift);
            tail += f64::from(*v);
        }
        acc.iter().map(|&a| f64::from(a)).sum::<f64>() + tail
    }
}

multiversion! {
    /// `gate[i] = silu(gate[i]) · up[i]`.
    fn silu_mul(gate: &mut [f32], up: &[f32]) {
        for (g, &u) in gate.iter_mut().zip(up) {
            *g = *g / (1.0 + exp_scalar(-*g)) * u;
        }
    }
}

multiversion! {
    /// Scales a slice in place.
    fn scale(x: &mut [f32], s: f32) {
        for v in x.iter_mut() {
            *v *= s;
        }
    }
}

multiversion! {
    /// Maximum of a slice (`-inf` when empty; NaNs ignored).
    fn max(x: &[f32]) -> f32 {
        let mut acc = [f32::NEG_INFINITY; 8];
        let mut chunks = x.chunks_exact(8);
        for c in &mut chunks {
            for i in 0..8 {
                acc[i] = acc[i].max(c[i]);
            }
        }
        let m = chunks.remainder().iter().copied().fold(f32::NEG_INFINITY, f32::max);
        acc.iter().copied().fold(m, f32::max)
    }
}

/// Softmax of a non-empty row, in place.
pub(crate) fn softmax_in_place(row: &mut [f32]) {
    let m = max(row);
    let sum = exp_shifted_sum(row, m);
    scale(row, (1.0 / sum) as f32);
}

/// `−log softmax(row)[target]`; `row` is overwritten.
pub(crate) fn nll_in_place(row: &mut [f32], target: usize) -> f64 {
    let m = max(row);
    let t = f64::from(row[target]);
    let sum = exp_shifted_sum(row, m);
    f64::from(m) + sum.ln() - t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_accurate() {
        let mut x = -87.0f32;
        while x < 88.0 {
            let e = exp_scalar(x);
            let r = f64::from(x).exp();
            assert!(((f64::from(e) - r) / r).abs() < 4e-7, "{x}: {e} vs {r}");
            x += 0.0137;
        }
        assert_eq!(exp_scalar(0.0), 1.0);
        assert!(exp_scalar(-1000.0) < 1e-37);
        assert!(exp_scalar(f32::NEG_INFINITY) < 1e-37);
    }

    #[test]
    fn softmax_and_nll_match_f64() {
        let row: Vec<f32> = (0..1037)
            .map(|i| ((i * 7919) % 1000) as f32 / 50.0 - 10.0)
            .collect();
        let m = row
            .iter()
            .copied()
            .fold(f64::NEG_INFINITY, |a, b| a.max(f64::from(b)));
        let z: f64 = row.iter().map(|&v| (f64::from(v) - m).exp()).sum();
        let mut s = row.clone();
        softmax_in_place(&mut s);
        for (a, &v) in s.iter().zip(&row) {
            let r = (f64::from(v) - m).exp() / z;
            assert!((f64::from(*a) - r).abs() < 1e-6 * r.max(1e-3));
        }
        let mut n = row.clone();
        let got = nll_in_place(&mut n, 17);
        let want = m + z.ln() - f64::from(row[17]);
        assert!((got - want).abs() < 1e-5, "{got} vs {want}");
    }
}
