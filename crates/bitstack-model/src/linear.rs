//! The [`Linear`] trait every projection goes through, and its dense f32 implementation.

use rayon::prelude::*;

use crate::ModelError;

/// A linear map `y = x Wᵀ` with `W` of shape `[out_features, in_features]`.
///
/// Every decoder projection (q, k, v, o, gate, up, down) and `lm_head` of a
/// [`CausalLm`](crate::CausalLm) is an `Arc<dyn Linear>`, so a compressed representation can
/// stand in for any of them. Biases are applied by the model, not by the trait.
pub trait Linear: Send + Sync {
    /// Input width `n`.
    fn in_features(&self) -> usize;
    /// Output width `m`.
    fn out_features(&self) -> usize;
    /// Computes `y = x Wᵀ` for `tokens` rows: `x` is `tokens × in_features` row-major,
    /// `y` is `tokens × out_features` row-major and is overwritten.
    ///
    /// Implementations may panic when the slice lengths do not match; the model always
    /// passes matching buffers.
    fn forward(&self, x: &[f32], tokens: usize, y: &mut [f32]);

    /// The most tokens that cost less through this linear one at a time than as one batch
    /// (0, the default: batches always cost less). A packed matrix whose batch product
    /// rebuilds dense tiles of its weight (`k` multiply-adds per weight and block) while one
    /// token costs a few table lookups per weight says so here;
    /// [`CausalLm::forward_cached_into`](crate::CausalLm::forward_cached_into) then feeds a
    /// short prompt one token at a time.
    fn token_steps_limit(&self) -> usize {
        0
    }
}

/// A dense f32 weight `[out_features, in_features]`, row-major.
///
/// Several tokens use faer's parallel GEMM; one token uses a multithreaded SIMD matrix-vector
/// product.
#[derive(Clone)]
pub struct DenseLinear {
    weight: Vec<f32>,
    out_features: usize,
    in_features: usize,
}

impl std::fmt::Debug for DenseLinear {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DenseLinear")
            .field("out_features", &self.out_features)
            .field("in_features", &self.in_features)
            .finish_non_exhaustive()
    }
}

impl DenseLinear {
    /// Wraps a row-major `[out_features, in_features]` weight.
    pub fn new(
        weight: Vec<f32>,
        out_features: usize,
        in_features: usize,
    ) -> Result<Self, ModelError> {
        if out_features.checked_mul(in_features) != Some(weight.len()) {
            return Err(ModelError::InvalidArgument(format!(
                "dense weight has {} values, expected {out_features} x {in_features}",
                weight.len()
            )));
        }
        Ok(Self {
            weight,
            out_features,
            in_features,
        })
    }

    /// The weight, row-major `[out_features, in_features]`.
    pub fn weight(&self) -> &[f32] {
        &self.weight
    }

    /// Gives the weight back.
    pub fn into_weight(self) -> Vec<f32> {
        self.weight
    }
}

impl Linear for DenseLinear {
    fn in_features(&self) -> usize {
        self.in_features
    }

    fn out_features(&self) -> usize {
        self.out_features
    }

    fn forward(&self, x: &[f32], tokens: usize, y: &mut [f32]) {
        dense_forward(
            &self.weight,
            self.out_features,
            self.in_features,
            x,
            tokens,
            y,
        );
    }
}

/// `y = x Wᵀ` for a row-major `w: [out, inp]`, `x: tokens × inp`, `y: tokens × out`.
///
/// One token: multithreaded SIMD matrix-vector product ([`matvec`]); more: faer GEMM on the
/// current rayon pool.
///
/// # Panics
/// When a slice length does not match the dimensions.
pub fn dense_forward(w: &[f32], out: usize, inp: usize, x: &[f32], tokens: usize, y: &mut [f32]) {
    assert_eq!(w.len(), out * inp, "weight length");
    assert_eq!(x.len(), tokens * inp, "input length");
    assert_eq!(y.len(), tokens * out, "output length");
    if tokens == 0 || out == 0 {
        return;
    }
    if tokens == 1 {
        matvec(w, out, inp, x, y);
        return;
    }
    if inp == 0 {
        y.fill(0.0);
        return;
    }
    let xm = faer::MatRef::from_row_major_slice(x, tokens, inp);
    let wt = faer::MatRef::from_row_major_slice(w, out, inp).transpose();
    let ym = faer::MatMut::from_row_major_slice_mut(y, tokens, out);
    faer::linalg::matmul::matmul(
        ym,
        faer::Accum::Replace,
        xm,
        wt,
        1.0f32,
        faer::Par::rayon(0),
    );
}

/// `y = W x` for one vector, `w: [out, inp]` row-major, split over the rayon pool by rows.
///
/// # Panics
/// When a slice length does not match the dimensions.
pub fn matvec(w: &[f32], out: usize, inp: usize, x: &[f32], y: &mut [f32]) {
    assert_eq!(w.len(), out * inp, "weight length");
    assert_eq!(x.len(), inp, "input length");
    assert_eq!(y.len(), out, "output length");
    let threads = rayon::current_num_threads().max(1);
    // Rows per task: about 4 tasks per thread, at least 256 KiB of weights per task.
    let min_rows = (65536 / inp.max(1)).max(4);
    let rows = out.div_ceil(threads * 4).max(min_rows).next_multiple_of(4);
    if rows >= out {
        matvec_rows(w, inp, x, y);
        return;
    }
    y.par_chunks_mut(rows).enumerate().for_each(|(c, yc)| {
        let r0 = c * rows;
        matvec_rows(&w[r0 * inp..(r0 + yc.len()) * inp], inp, x, yc);
    });
}

/// Sequential `y = W x` over the rows of `w` (`y.len()` rows of `inp` values).
fn matvec_rows(w: &[f32], inp: usize, x: &[f32], y: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            // SAFETY: the required CPU features were detected just above.
            unsafe { simd::matvec_rows_avx2(w, inp, x, y) };
            return;
        }
    }
    matvec_rows_portable(w, inp, x, y);
}

/// Portable oracle for the SIMD kernel: 8-lane accumulation per row.
pub(crate) fn matvec_rows_portable(w: &[f32], inp: usize, x: &[f32], y: &mut [f32]) {
    for (r, yr) in y.iter_mut().enumerate() {
        *yr = dot_portable(&w[r * inp..(r + 1) * inp], x);
    }
}

/// Dot product with 8 independent partial sums (vectorizable without fast-math).
pub(crate) fn dot_portable(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let ca = a.chunks_exact(8);
    let cb = b.chunks_exact(8);
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(p, q)| p * q)
        .sum();
    for (pa, pb) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += pa[i] * pb[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// Dot product of two equal-length slices, SIMD when available.
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    debug_assert_eq!(a.len(), b.len());
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            // SAFETY: the required CPU features were detected just above.
            return unsafe { simd::dot_avx2(a, b) };
        }
    }
    dot_portable(a, b)
}

/// Whether [`dot_f16`] has its vectorized version here (AVX2, FMA and F16C); callers
/// without it widen rows to f32 first.
pub(crate) fn dot_f16_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `w · x` for a row `w` of little-endian f16 (`2·x.len()` bytes), widened in registers
/// where [`dot_f16_available`], else one value at a time.
///
/// # Panics
/// If `w.len() != 2·x.len()`.
pub(crate) fn dot_f16(w: &[u8], x: &[f32]) -> f32 {
    assert_eq!(w.len(), 2 * x.len(), "dot_f16: lengths differ");
    #[cfg(target_arch = "x86_64")]
    if dot_f16_available() {
        // SAFETY: AVX2, FMA and F16C were detected just above; the lengths match (asserted).
        return unsafe { simd::dot_half_avx2::<false>(w, x) };
    }
    w.chunks_exact(2)
        .zip(x)
        .map(|(h, &xi)| half::f16::from_le_bytes([h[0], h[1]]).to_f32() * xi)
        .sum()
}

/// `w · x` for a row `w` of little-endian bf16 (`2·x.len()` bytes), widened in registers
/// (a bf16 is the top half of an f32) where [`dot_f16_available`], else one value at a time.
///
/// # Panics
/// If `w.len() != 2·x.len()`.
pub(crate) fn dot_bf16(w: &[u8], x: &[f32]) -> f32 {
    assert_eq!(w.len(), 2 * x.len(), "dot_bf16: lengths differ");
    #[cfg(target_arch = "x86_64")]
    if dot_f16_available() {
        // SAFETY: AVX2, FMA and F16C were detected just above; the lengths match (asserted).
        return unsafe { simd::dot_half_avx2::<true>(w, x) };
    }
    w.chunks_exact(2)
        .zip(x)
        .map(|(h, &xi)| bf16_le([h[0], h[1]]) * xi)
        .sum()
}

/// The f32 value of a little-endian bf16.
#[inline]
fn bf16_le(b: [u8; 2]) -> f32 {
    f32::from_bits(u32::from(u16::from_le_bytes(b)) << 16)
}

/// `y += a * x`.
pub(crate) fn axpy(a: f32, x: &[f32], y: &mut [f32]) {
    debug_assert_eq!(x.len(), y.len());
    for (yi, xi) in y.iter_mut().zip(x) {
        *yi += a * xi;
    }
}

/// `out[j] = scale · (q · rows[j])` where row `j` is `m[offset + j·stride..][..q.len()]`
/// (one head's keys in a KV cache), SIMD when available.
///
/// # Panics
/// If a row reaches past the end of `m`.
pub(crate) fn strided_dots(
    q: &[f32],
    m: &[f32],
    (offset, stride): (usize, usize),
    scale: f32,
    out: &mut [f32],
) {
    let d = q.len();
    if let Some(last) = out.len().checked_sub(1) {
        assert!(
            offset + last * stride + d <= m.len(),
            "strided_dots: rows past the end"
        );
    }
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
        for (j, o) in out.iter_mut().enumerate() {
            let row = &m[offset + j * stride..offset + j * stride + d];
            // SAFETY: the required CPU features were detected just above.
            *o = scale * unsafe { simd::dot_avx2(q, row) };
        }
        return;
    }
    for (j, o) in out.iter_mut().enumerate() {
        *o = scale * dot_portable(q, &m[offset + j * stride..offset + j * stride + d]);
    }
}

/// `out = Σ_j p[j] · rows[j]` where row `j` is `m[offset + j·stride..][..out.len()]` (one
/// head's values in a KV cache, weighted by its attention), SIMD when available: the sums of
/// up to 64 columns stay in registers over all rows.
///
/// # Panics
/// If a row reaches past the end of `m`.
pub(crate) fn strided_weighted_sum(
    p: &[f32],
    m: &[f32],
    (offset, stride): (usize, usize),
    out: &mut [f32],
) {
    let d = out.len();
    if let Some(last) = p.len().checked_sub(1) {
        assert!(
            offset + last * stride + d <= m.len(),
            "strided_weighted_sum: rows past the end"
        );
    }
    out.fill(0.0);
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
        // SAFETY: the required CPU features were detected just above; the rows lie within
        // `m` (asserted).
        unsafe { simd::strided_weighted_sum_avx2(p, m, (offset, stride), out) };
        return;
    }
    for (j, &pj) in p.iter().enumerate() {
        axpy(pj, &m[offset + j * stride..offset + j * stride + d], out);
    }
}

#[cfg(target_arch = "x86_64")]
mod simd {
    use std::arch::x86_64::{
        __m256, _mm256_add_ps, _mm256_fmadd_ps, _mm256_loadu_ps, _mm256_setzero_ps,
        _mm256_storeu_ps,
    };

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn hsum(v: __m256) -> f32 {
        let mut lanes = [0.0f32; 8];
        // SAFETY: `lanes` has room for 8 f32 (unaligned store).
        unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), v) };
        lanes.iter().sum()
    }

    /// # Safety
    /// The CPU must support AVX2 and FMA. `a.len() == b.len()` is required.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn dot_avx2(a: &[f32], b: &[f32]) -> f32 {
        let n = a.len().min(b.len());
        let (pa, pb) = (a.as_ptr(), b.as_ptr());
        let mut acc = [_mm256_setzero_ps(); 4];
        let mut i = 0;
        while i + 32 <= n {
            for (j, aj) in acc.iter_mut().enumerate() {
                // SAFETY: i + 8j + 8 <= i + 32 <= n, within both slices.
                unsafe {
                    *aj = _mm256_fmadd_ps(
                        _mm256_loadu_ps(pa.add(i + 8 * j)),
                        _mm256_loadu_ps(pb.add(i + 8 * j)),
                        *aj,
                    );
                }
            }
            i += 32;
        }
        while i + 8 <= n {
            // SAFETY: i + 8 <= n, within both slices.
            unsafe {
                acc[0] = _mm256_fmadd_ps(
                    _mm256_loadu_ps(pa.add(i)),
                    _mm256_loadu_ps(pb.add(i)),
                    acc[0],
                );
            }
            i += 8;
        }
        let s = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
        let mut total = hsum(s);
        while i < n {
            total += a[i] * b[i];
            i += 1;
        }
        total
    }

    /// `w · x` with `w` little-endian 16-bit floats — bf16 (each the top half of an f32,
    /// widened by a shift) if `BF16`, else f16 (widened by F16C) — 16 values a step in two
    /// accumulators.
    ///
    /// # Safety
    /// The CPU must support AVX2, FMA and F16C; `w.len() == 2·x.len()`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn dot_half_avx2<const BF16: bool>(w: &[u8], x: &[f32]) -> f32 {
        use std::arch::x86_64::{
            __m128i, _mm256_castsi256_ps, _mm256_cvtepu16_epi32, _mm256_cvtph_ps,
            _mm256_slli_epi32, _mm_loadu_si128,
        };
        let n = x.len().min(w.len() / 2);
        let (pw, px) = (w.as_ptr(), x.as_ptr());
        let mut acc = [_mm256_setzero_ps(); 2];
        let mut i = 0;
        while i + 16 <= n {
            for (j, aj) in acc.iter_mut().enumerate() {
                // SAFETY: `i + 8j + 8 <= n`: 16 bytes of `w` at `2(i + 8j)` and 8 floats of
                // `x` at `i + 8j` are within both slices.
                unsafe {
                    let h = _mm_loadu_si128(pw.add(2 * (i + 8 * j)).cast::<__m128i>());
                    let wf = if BF16 {
                        _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(h)))
                    } else {
                        _mm256_cvtph_ps(h)
                    };
                    *aj = _mm256_fmadd_ps(wf, _mm256_loadu_ps(px.add(i + 8 * j)), *aj);
                }
            }
            i += 16;
        }
        let mut total = hsum(_mm256_add_ps(acc[0], acc[1]));
        while i < n {
            let b = [w[2 * i], w[2 * i + 1]];
            let wi = if BF16 {
                super::bf16_le(b)
            } else {
                half::f16::from_le_bytes(b).to_f32()
            };
            total += wi * x[i];
            i += 1;
        }
        total
    }

    /// `out += Σ_j p[j] · m[offset + j·stride..][..out.len()]`: columns in blocks of 64 (8
    /// accumulators) swept over all rows, the last block narrower, a tail of fewer than 8
    /// columns scalar.
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA; every row must lie within `m`.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn strided_weighted_sum_avx2(
        p: &[f32],
        m: &[f32],
        (offset, stride): (usize, usize),
        out: &mut [f32],
    ) {
        use std::arch::x86_64::_mm256_set1_ps;
        let d = out.len();
        let d8 = d / 8 * 8;
        let pm = m.as_ptr();
        let mut c0 = 0;
        while c0 < d8 {
            let lanes = ((d8 - c0) / 8).min(8);
            let mut acc = [_mm256_setzero_ps(); 8];
            for (j, &pj) in p.iter().enumerate() {
                let pv = _mm256_set1_ps(pj);
                let row = offset + j * stride + c0;
                if lanes == 8 {
                    for (a, acc) in acc.iter_mut().enumerate() {
                        // SAFETY: `row + 8a + 8 <= offset + j·stride + d`, within `m`.
                        *acc = _mm256_fmadd_ps(
                            pv,
                            unsafe { _mm256_loadu_ps(pm.add(row + 8 * a)) },
                            *acc,
                        );
                    }
                } else {
                    for (a, acc) in acc.iter_mut().enumerate().take(lanes) {
                        // SAFETY: as above.
                        *acc = _mm256_fmadd_ps(
                            pv,
                            unsafe { _mm256_loadu_ps(pm.add(row + 8 * a)) },
                            *acc,
                        );
                    }
                }
            }
            for (a, acc) in acc.iter().enumerate().take(lanes) {
                let o = &mut out[c0 + 8 * a..c0 + 8 * a + 8];
                // SAFETY: `o` holds 8 floats.
                unsafe {
                    let was = _mm256_loadu_ps(o.as_ptr());
                    _mm256_storeu_ps(o.as_mut_ptr(), _mm256_add_ps(was, *acc));
                }
            }
            c0 += 8 * lanes;
        }
        for (j, &pj) in p.iter().enumerate() {
            let row = offset + j * stride;
            for (o, &v) in out[d8..].iter_mut().zip(&m[row + d8..row + d]) {
                *o += pj * v;
            }
        }
    }

    /// `y[r] = w[r, :] · x` for every row, 4 rows at a time sharing the loads of `x`.
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA; `w.len() >= y.len() * inp`, `x.len() == inp`.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn matvec_rows_avx2(w: &[f32], inp: usize, x: &[f32], y: &mut [f32]) {
        assert!(w.len() >= y.len() * inp && x.len() == inp);
        let px = x.as_ptr();
        let mut r = 0;
        while r + 4 <= y.len() {
            let base = w[r * inp..].as_ptr();
            let mut acc = [[_mm256_setzero_ps(); 2]; 4];
            let mut i = 0;
            while i + 16 <= inp {
                // SAFETY: i + 16 <= inp: the x loads are within x, and row q's loads at
                // (r + q) * inp + i .. + 16 are within w (asserted length).
                unsafe {
                    let x0 = _mm256_loadu_ps(px.add(i));
                    let x1 = _mm256_loadu_ps(px.add(i + 8));
                    for (q, aq) in acc.iter_mut().enumerate() {
                        let pr = base.add(q * inp + i);
                        aq[0] = _mm256_fmadd_ps(_mm256_loadu_ps(pr), x0, aq[0]);
                        aq[1] = _mm256_fmadd_ps(_mm256_loadu_ps(pr.add(8)), x1, aq[1]);
                    }
                }
                i += 16;
            }
            for (q, aq) in acc.iter().enumerate() {
                let mut s = hsum(_mm256_add_ps(aq[0], aq[1]));
                let row = &w[(r + q) * inp..(r + q + 1) * inp];
                for k in i..inp {
                    s += row[k] * x[k];
                }
                y[r + q] = s;
            }
            r += 4;
        }
        while r < y.len() {
            // SAFETY: the caller guarantees AVX2 + FMA; equal lengths.
            y[r] = unsafe { dot_avx2(&w[r * inp..(r + 1) * inp], x) };
            r += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pseudo(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) - 0.5
            })
            .collect()
    }

    /// The f16 and bf16 row products against a widen-then-multiply oracle in f64 (the `half`
    /// crate's conversions), at lengths that are and are not multiples of 16.
    #[test]
    fn half_dots_match_naive() {
        type Dot = fn(&[u8], &[f32]) -> f32;
        for (name, dot) in [("f16", dot_f16 as Dot), ("bf16", dot_bf16)] {
            for n in [0usize, 1, 15, 16, 17, 64, 200, 512] {
                let v = pseudo(n, n as u64 + 3);
                let (bytes, w): (Vec<u8>, Vec<f32>) = if name == "f16" {
                    let h: Vec<half::f16> = v.into_iter().map(half::f16::from_f32).collect();
                    (
                        h.iter().flat_map(|h| h.to_le_bytes()).collect(),
                        h.iter().map(|h| h.to_f32()).collect(),
                    )
                } else {
                    let h: Vec<half::bf16> = v.into_iter().map(half::bf16::from_f32).collect();
                    (
                        h.iter().flat_map(|h| h.to_le_bytes()).collect(),
                        h.iter().map(|h| h.to_f32()).collect(),
                    )
                };
                let x = pseudo(n, 5);
                let want: f64 = w
                    .iter()
                    .zip(&x)
                    .map(|(&a, &b)| f64::from(a) * f64::from(b))
                    .sum();
                let got = dot(&bytes, &x);
                assert!(
                    (f64::from(got) - want).abs() <= 1e-5 * (n.max(1) as f64),
                    "{name} {n}: {got} vs {want}"
                );
            }
        }
    }

    /// The strided row products of attention against one-row-at-a-time loops in f64, at
    /// head sizes that are and are not multiples of 8 or 64.
    #[test]
    fn strided_rows_match_naive() {
        for (d, rows, stride, offset) in [
            (64, 37, 256, 64),
            (128, 5, 128, 0),
            (72, 9, 80, 3),
            (13, 4, 20, 7),
            (200, 3, 200, 0),
            (8, 1, 8, 0),
            (64, 0, 64, 0),
        ] {
            let m = pseudo(offset + rows * stride + d, d as u64);
            let q = pseudo(d, 7);
            let p = pseudo(rows, 11);
            let mut dots = vec![0.0f32; rows];
            strided_dots(&q, &m, (offset, stride), 0.5, &mut dots);
            let mut sum = vec![1.0f32; d];
            strided_weighted_sum(&p, &m, (offset, stride), &mut sum);
            for j in 0..rows {
                let row = &m[offset + j * stride..offset + j * stride + d];
                let want: f64 = 0.5
                    * row
                        .iter()
                        .zip(&q)
                        .map(|(a, b)| f64::from(a * b))
                        .sum::<f64>();
                assert!(
                    (f64::from(dots[j]) - want).abs() <= 1e-5 * d as f64,
                    "{d} dot {j}"
                );
            }
            for c in 0..d {
                let want: f64 = (0..rows)
                    .map(|j| f64::from(p[j]) * f64::from(m[offset + j * stride + c]))
                    .sum();
                assert!(
                    (f64::from(sum[c]) - want).abs() <= 1e-5 * rows.max(1) as f64,
                    "{d} sum {c}"
                );
            }
        }
    }

    fn naive(w: &[f32], out: usize, inp: usize, x: &[f32], tokens: usize) -> Vec<f32> {
        let mut y = vec![0.0f32; tokens * out];
        for t in 0..tokens {
            for o in 0..out {
                let mut s = 0.0f64;
                for i in 0..inp {
                    s += f64::from(w[o * inp + i]) * f64::from(x[t * inp + i]);
                }
                y[t * out + o] = s as f32;
            }
        }
        y
    }

    #[test]
    fn dense_matches_naive_for_odd_shapes() {
        for &(out, inp, tokens) in &[
            (1, 1, 1),
            (7, 13, 1),
            (33, 70, 1),
            (5, 3, 4),
            (130, 67, 9),
            (4096, 35, 1),
        ] {
            let w = pseudo(out * inp, 1);
            let x = pseudo(tokens * inp, 2);
            let mut y = vec![f32::NAN; tokens * out];
            dense_forward(&w, out, inp, &x, tokens, &mut y);
            let r = naive(&w, out, inp, &x, tokens);
            for (a, b) in y.iter().zip(&r) {
                assert!(
                    (a - b).abs() <= 1e-4 * (1.0 + b.abs()),
                    "{out}x{inp}x{tokens}: {a} vs {b}"
                );
            }
        }
    }

    #[test]
    fn simd_dot_matches_portable() {
        for n in [0, 1, 7, 8, 15, 16, 31, 32, 33, 100, 257] {
            let a = pseudo(n, 3);
            let b = pseudo(n, 4);
            let p = dot_portable(&a, &b);
            let s = dot(&a, &b);
            assert!((p - s).abs() <= 1e-5 * (1.0 + p.abs()), "n={n}: {p} vs {s}");
            let mut y1 = vec![0.0; 5];
            let mut y2 = vec![0.0; 5];
            let w = pseudo(5 * n, 5);
            matvec_rows(&w, n, &a, &mut y1);
            matvec_rows_portable(&w, n, &a, &mut y2);
            for (u, v) in y1.iter().zip(&y2) {
                assert!((u - v).abs() <= 1e-5 * (1.0 + v.abs()));
            }
        }
    }

    #[test]
    fn new_checks_length() {
        assert!(DenseLinear::new(vec![0.0; 5], 2, 3).is_err());
        let d = DenseLinear::new(vec![0.0; 6], 2, 3).unwrap();
        assert_eq!((d.out_features(), d.in_features()), (2, 3));
    }
}
