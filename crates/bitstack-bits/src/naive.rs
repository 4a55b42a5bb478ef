//! The obvious kernels: one signed add per matrix element. They are the oracles the lookup-table
//! kernels are tested against, and the baseline in the benches.

use crate::SignMatrixRef;

/// `y = S z`, element by element.
pub(crate) fn sign_matvec(s: SignMatrixRef<'_>, z: &[f32], y: &mut [f32]) {
    let (m, n) = (s.rows(), s.cols());
    assert_eq!(
        z.len(),
        n,
        "sign_matvec_naive: z has {} values, the {m}x{n} sign matrix needs {n}",
        z.len()
    );
    assert_eq!(
        y.len(),
        m,
        "sign_matvec_naive: y has {} values, the {m}x{n} sign matrix needs {m}",
        y.len()
    );
    let bits = s.row_major_bytes();
    for (r, out) in y.iter_mut().enumerate() {
        let row_start = r * n;
        let mut acc = 0.0f32;
        for (c, &zc) in z.iter().enumerate() {
            let index = row_start + c;
            let positive = (bits[index / 8] >> (7 - index % 8)) & 1 == 1;
            acc += if positive { zc } else { -zc };
        }
        *out = acc;
    }
}

/// `Y = S Z` (`Z`: n×k, `Y`: m×k, both row-major), element by element.
pub(crate) fn sign_matmul(s: SignMatrixRef<'_>, z: &[f32], k: usize, y: &mut [f32]) {
    let (m, n) = (s.rows(), s.cols());
    let z_len = n.checked_mul(k);
    let y_len = m.checked_mul(k);
    assert_eq!(
        Some(z.len()),
        z_len,
        "sign_matmul_naive: Z has {} values, a {n}x{k} matrix is needed",
        z.len()
    );
    assert_eq!(
        Some(y.len()),
        y_len,
        "sign_matmul_naive: Y has {} values, a {m}x{k} matrix is needed",
        y.len()
    );
    if k == 0 {
        return;
    }
    let bits = s.row_major_bytes();
    for (r, y_row) in y.chunks_exact_mut(k).enumerate() {
        y_row.fill(0.0);
        let row_start = r * n;
        for (c, z_row) in z.chunks_exact(k).enumerate() {
            let index = row_start + c;
            let positive = (bits[index / 8] >> (7 - index % 8)) & 1 == 1;
            if positive {
                y_row.iter_mut().zip(z_row).for_each(|(a, &b)| *a += b);
            } else {
                y_row.iter_mut().zip(z_row).for_each(|(a, &b)| *a -= b);
            }
        }
    }
}

/// `y += (S ⊙ (u v)) x`, element by element: `W[r, c] = ±Σ_j u[r, j]·v[j, c]`, then
/// `y[r] += Σ_c W[r, c]·x[c]`.
pub(crate) fn lowrank_matvec_add(
    s: SignMatrixRef<'_>,
    u: &[half::f16],
    v: &[half::f16],
    k: usize,
    x: &[f32],
    y: &mut [f32],
) {
    let (m, n) = (s.rows(), s.cols());
    assert!(
        Some(u.len()) == m.checked_mul(k)
            && Some(v.len()) == n.checked_mul(k)
            && x.len() == n
            && y.len() == m,
        "lowrank_matvec_add_naive: wrong lengths"
    );
    let bits = s.row_major_bytes();
    for (r, out) in y.iter_mut().enumerate() {
        let mut acc = 0.0f32;
        for (c, &xc) in x.iter().enumerate() {
            let w: f32 = (0..k)
                .map(|j| u[r * k + j].to_f32() * v[j * n + c].to_f32())
                .sum();
            let index = r * n + c;
            let positive = (bits[index / 8] >> (7 - index % 8)) & 1 == 1;
            acc += if positive { w * xc } else { -w * xc };
        }
        *out += acc;
    }
}
