//! Vectorizable elementwise math (exp, softmax, SiLU) for the hot loops.
//!
//! `exp` is a branch-free Cephes-style polynomial (about 2 ulp on the range used here) so the
//! loops vectorize; each slice function is compiled three times, for AVX-512 (16 lanes), for
//! AVX2+FMA (8 lanes; chosen at run time in that order) and portably. The three give the same
//! bits: every element goes through the same operations, and the sums are added in the same
//! order (eight running lanes) whatever the vector width.

/// `e^x` for one value, branch-free (inputs below −87.3 flush towards 0, above 88.7 clamp).
#[inline(always)]
fn exp_scalar(x: f32) -> f32 {
    let (y, n) = exp_parts(x);
    // 2^n from the bits of `n + 1.5·2^23`, whose low bits hold the integer `n` (exact for
    // |n| < 2^22; here −126 ≤ n ≤ 128): the same bits as `(n as i32 + 127) << 23`, without
    // the saturating float-to-int conversion that LLVM does one lane at a time.
    const MAGIC: f32 = 12_582_912.0;
    let int = (n + MAGIC).to_bits().wrapping_sub(MAGIC.to_bits());
    y * f32::from_bits(int.wrapping_add(127) << 23)
}

/// `(e^r, n)` with `x = n·ln 2 + r` (`n` a whole number in −126..=128 as a float, `|r| ≤
/// ln 2 / 2`), `x` clamped to −87.3..=88.7 first: `e^x = e^r · 2^n`.
#[inline(always)]
fn exp_parts(x: f32) -> (f32, f32) {
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
    (p * r * r + r + 1.0, n)
}

/// Which compiled copy of a slice function runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Level {
    Portable,
    /// Made only by [`Level::best`] and `Level::available` (tests), where the CPU has AVX2
    /// and FMA.
    #[cfg(target_arch = "x86_64")]
    Avx2,
    /// Made only by [`Level::best`] and `Level::available` (tests), where the CPU has
    /// AVX-512F, AVX2 and FMA.
    #[cfg(target_arch = "x86_64")]
    Avx512,
}

impl Level {
    /// The copies this CPU can run, widest first (the portable one last).
    #[cfg(test)]
    fn available() -> Vec<Level> {
        let mut out = Vec::with_capacity(3);
        #[cfg(target_arch = "x86_64")]
        {
            let avx2 = is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma");
            if avx2 && is_x86_feature_detected!("avx512f") {
                out.push(Level::Avx512);
            }
            if avx2 {
                out.push(Level::Avx2);
            }
        }
        out.push(Level::Portable);
        out
    }

    /// The widest copy this CPU can run.
    fn best() -> Level {
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                if is_x86_feature_detected!("avx512f") {
                    return Level::Avx512;
                }
                return Level::Avx2;
            }
        }
        Level::Portable
    }
}

macro_rules! multiversion {
    ($(#[$m:meta])* fn $name:ident / $at:ident($($arg:ident: $ty:ty),*) $(-> $ret:ty)? $body:block) => {
        $(#[$m])*
        pub(crate) fn $name($($arg: $ty),*) $(-> $ret)? {
            $at(Level::best(), $($arg),*)
        }

        /// The function's copy compiled for `level`.
        fn $at(level: Level, $($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn imp($($arg: $ty),*) $(-> $ret)? $body
            match level {
                Level::Portable => imp($($arg),*),
                #[cfg(target_arch = "x86_64")]
                Level::Avx2 => {
                    #[target_feature(enable = "avx2,fma")]
                    fn avx2($($arg: $ty),*) $(-> $ret)? { imp($($arg),*) }
                    // SAFETY: `Level::Avx2` is only made where the CPU has these features.
                    unsafe { avx2($($arg),*) }
                }
                #[cfg(target_arch = "x86_64")]
                Level::Avx512 => {
                    #[target_feature(enable = "avx512f,avx2,fma")]
                    fn avx512($($arg: $ty),*) $(-> $ret)? { imp($($arg),*) }
                    // SAFETY: `Level::Avx512` is only made where the CPU has these features.
                    unsafe { avx512($($arg),*) }
                }
            }
        }
    };
}

/// `Σ f(x[i])` in eight running f32 lanes (element `j` of the whole eights in lane `j % 8`,
/// in order; the rest in f64), sixteen values of `f` at a time (one AVX-512 register) added
/// to the lanes as two groups of eight in turn: the same bits at every vector width.
#[inline(always)]
fn lane_sum(x: &[f32], f: impl Fn(f32) -> f32) -> f64 {
    let mut acc = [0.0f32; 8];
    let mut wide = x.chunks_exact(16);
    for c in &mut wide {
        let mut e = [0.0f32; 16];
        for (o, &v) in e.iter_mut().zip(c) {
            *o = f(v);
        }
        for i in 0..8 {
            acc[i] += e[i];
        }
        for i in 0..8 {
            acc[i] += e[8 + i];
        }
    }
    let mut chunks = wide.remainder().chunks_exact(8);
    for c in &mut chunks {
        for i in 0..8 {
            acc[i] += f(c[i]);
        }
    }
    let tail: f64 = chunks.remainder().iter().map(|&v| f64::from(f(v))).sum();
    acc.iter().map(|&a| f64::from(a)).sum::<f64>() + tail
}

multiversion! {
    /// `x[i] = e^(x[i] − shift)`, returning the sum (f32 lanes, added in f64 at the end).
    fn exp_shifted_sum / exp_shifted_sum_at(x: &mut [f32], shift: f32) -> f64 {
        for v in x.iter_mut() {
            *v = exp_scalar(*v - shift);
        }
        lane_sum(x, |v| v)
    }
}

multiversion! {
    /// `Σ e^(x[i] − shift)` without storing the exponentials: the sum of
    /// [`exp_shifted_sum`], bit for bit (same elements, same order).
    fn exp_shifted_total / exp_shifted_total_at(x: &[f32], shift: f32) -> f64 {
        lane_sum(x, |v| exp_scalar(v - shift))
    }
}

multiversion! {
    /// `gate[i] = silu(gate[i]) · up[i]`.
    fn silu_mul / silu_mul_at(gate: &mut [f32], up: &[f32]) {
        for (g, &u) in gate.iter_mut().zip(up) {
            *g = *g / (1.0 + exp_scalar(-*g)) * u;
        }
    }
}

multiversion! {
    /// Scales a slice in place.
    fn scale / scale_at(x: &mut [f32], s: f32) {
        for v in x.iter_mut() {
            *v *= s;
        }
    }
}

multiversion! {
    /// Maximum of a slice (`-inf` when empty; NaNs ignored).
    fn max / max_at(x: &[f32]) -> f32 {
        let mut acc = [f32::NEG_INFINITY; 16];
        let mut chunks = x.chunks_exact(16);
        for c in &mut chunks {
            for i in 0..16 {
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

/// `−log softmax(row)[target]` (the row is only read).
pub(crate) fn nll(row: &[f32], target: usize) -> f64 {
    let m = max(row);
    let sum = exp_shifted_total(row, m);
    f64::from(m) + sum.ln() - f64::from(row[target])
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The exponent bits made from `n + 1.5·2^23` are those of the integer conversion.
    #[test]
    fn exp_scales_by_the_exponent_of_the_integer_conversion() {
        fn with_conversion(x: f32) -> f32 {
            let (y, n) = exp_parts(x);
            y * f32::from_bits(((n as i32 + 127) as u32) << 23)
        }
        let mut x = -100.0f32;
        while x < 100.0 {
            assert_eq!(exp_scalar(x).to_bits(), with_conversion(x).to_bits(), "{x}");
            x += 0.000_37;
        }
        for x in [
            f32::NEG_INFINITY,
            f32::INFINITY,
            -87.3,
            88.7,
            0.0,
            -0.0,
            f32::MIN,
            f32::MAX,
        ] {
            assert_eq!(exp_scalar(x).to_bits(), with_conversion(x).to_bits(), "{x}");
        }
        assert!(exp_scalar(f32::NAN).is_nan());
    }

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

    /// Every copy this CPU runs gives the bits of a plain element-by-element loop (sums in
    /// eight running lanes), for lengths around the 8- and 16-lane steps.
    #[test]
    fn every_compiled_copy_gives_the_plain_loops_bits() {
        let levels = Level::available();
        assert_eq!(levels.last(), Some(&Level::Portable));
        assert_eq!(levels.first(), Some(&Level::best()));
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 40) as f32 / (1u64 << 24) as f32
        };
        for n in (0..70).chain([255, 256, 257, 1037, 8192]) {
            // Logits-like values, some far below the shift (exp underflows towards 0).
            let x: Vec<f32> = (0..n).map(|_| 40.0 * next() - 30.0).collect();
            let up: Vec<f32> = (0..n).map(|_| 4.0 * next() - 2.0).collect();
            // Element by element, the sum in eight running lanes (element `j` in lane `j % 8`)
            // over the whole eights, the rest in f64.
            let reference = {
                let e: Vec<f32> = x.iter().map(|&v| exp_scalar(v - 3.5)).collect();
                let whole = n / 8 * 8;
                let mut lanes = [0.0f32; 8];
                for (j, &v) in e[..whole].iter().enumerate() {
                    lanes[j % 8] += v;
                }
                let tail: f64 = e[whole..].iter().map(|&v| f64::from(v)).sum();
                let sum = lanes.iter().map(|&a| f64::from(a)).sum::<f64>() + tail;
                let g: Vec<f32> = x
                    .iter()
                    .zip(&up)
                    .map(|(&g, &u)| g / (1.0 + exp_scalar(-g)) * u)
                    .collect();
                let sc: Vec<f32> = x.iter().map(|&v| v * 0.37).collect();
                let m = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                (e, sum, g, sc, m)
            };
            for &level in &levels {
                let mut e = x.clone();
                let sum = exp_shifted_sum_at(level, &mut e, 3.5);
                let mut g = x.clone();
                silu_mul_at(level, &mut g, &up);
                let mut sc = x.clone();
                scale_at(level, &mut sc, 0.37);
                let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&e), bits(&reference.0), "exp, {level:?}, n = {n}");
                assert_eq!(
                    sum.to_bits(),
                    reference.1.to_bits(),
                    "sum, {level:?}, n = {n}"
                );
                let total = exp_shifted_total_at(level, &x, 3.5);
                assert_eq!(
                    total.to_bits(),
                    reference.1.to_bits(),
                    "total, {level:?}, n = {n}"
                );
                assert_eq!(bits(&g), bits(&reference.2), "silu, {level:?}, n = {n}");
                assert_eq!(bits(&sc), bits(&reference.3), "scale, {level:?}, n = {n}");
                assert_eq!(
                    max_at(level, &x).to_bits(),
                    reference.4.to_bits(),
                    "max, {level:?}, n = {n}"
                );
            }
        }
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
        let got = nll(&row, 17);
        let want = m + z.ln() - f64::from(row[17]);
        assert!((got - want).abs() < 1e-5, "{got} vs {want}");
    }
}
