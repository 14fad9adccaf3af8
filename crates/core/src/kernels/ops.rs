//! Element-wise and normalisation ops on f32 rows.

/// RMSNorm over the active channels: out = x / sqrt(mean(x²) + eps) ⊙ w (w already cut to x.len()).
pub fn rmsnorm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let n = x.len();
    let ss: f32 = x.iter().map(|v| v * v).sum::<f32>() / n as f32;
    let r = 1.0 / (ss + eps).sqrt();
    for i in 0..n {
        out[i] = x[i] * r * w[i];
    }
}

#[inline]
pub fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

#[inline]
pub fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

/// torch softplus with threshold 20 (returns x above it).
#[inline]
pub fn softplus(x: f32) -> f32 {
    if x > 20.0 { x } else { x.exp().ln_1p() }
}

#[inline]
pub fn relu2(x: f32) -> f32 {
    let r = x.max(0.0);
    r * r
}

/// In-place softmax of a row.
pub fn softmax(x: &mut [f32]) {
    let m = x.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    let mut s = 0f32;
    for v in x.iter_mut() {
        *v = (*v - m).exp();
        s += *v;
    }
    let inv = 1.0 / s;
    for v in x.iter_mut() {
        *v *= inv;
    }
}

#[inline(always)]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let n = a.len() / 16 * 16;
    for i in (0..n).step_by(16) {
        for j in 0..16 {
            acc[j] += a[i + j] * b[i + j];
        }
    }
    // A pairwise tree (16 → 8 → 4 → 2 → 1): vector adds, not a chain of 16 scalar ones.
    let mut w = 8;
    while w > 0 {
        for j in 0..w {
            acc[j] += acc[j + w];
        }
        w /= 2;
    }
    let mut s = acc[0];
    for i in n..a.len() {
        s += a[i] * b[i];
    }
    s
}

/// One query head of one decode token against `sc.len()` cached positions:
/// o = softmax(scale · K q) · V, with k and v the head's [len][d] rows and `sc` scratch.
/// The same code runs with or without AVX2 (separate multiplies and adds, fixed lanes), so every
/// ISA gives the same bits.
pub fn attend_head(q: &[f32], k: &[f32], v: &[f32], scale: f32, sc: &mut [f32], o: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if super::isa() != super::Isa::Scalar {
        // Safety: AVX2 and FMA are present on both SIMD levels.
        return unsafe { attend_head_avx2(q, k, v, scale, sc, o) };
    }
    attend_head_impl(q, k, v, scale, sc, o)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn attend_head_avx2(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    scale: f32,
    sc: &mut [f32],
    o: &mut [f32],
) {
    attend_head_impl(q, k, v, scale, sc, o)
}

#[inline(always)]
fn attend_head_impl(q: &[f32], k: &[f32], v: &[f32], scale: f32, sc: &mut [f32], o: &mut [f32]) {
    let d = q.len();
    for (j, s) in sc.iter_mut().enumerate() {
        *s = dot(q, &k[j * d..(j + 1) * d]) * scale;
    }
    softmax(sc);
    o.fill(0.0);
    for (j, &p) in sc.iter().enumerate() {
        for (ov, vv) in o.iter_mut().zip(&v[j * d..(j + 1) * d]) {
            *ov += p * vv;
        }
    }
}
