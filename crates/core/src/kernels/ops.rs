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
    #[cfg(target_arch = "x86_64")]
    if super::isa() == super::Isa::Avx512 {
        // Safety: the ISA was detected.
        return unsafe { avx512::softmax(x) };
    }
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

/// x ← eˣ, element-wise.
pub fn exp_inplace(x: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if super::isa() == super::Isa::Avx512 {
        // Safety: the ISA was detected.
        return unsafe { avx512::exp_inplace(x) };
    }
    x.iter_mut().for_each(|v| *v = v.exp());
}

/// u ⊙= silu(g), element-wise (the SwiGLU MLP and Mamba's gate).
pub fn silu_mul(u: &mut [f32], g: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    if super::isa() == super::Isa::Avx512 {
        // Safety: the ISA was detected.
        return unsafe { avx512::silu_mul(u, g) };
    }
    for (uv, gv) in u.iter_mut().zip(g) {
        *uv *= silu(*gv);
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
/// AVX-512 (head sizes a multiple of 16) scores 8 positions at a time; the portable code runs
/// with AVX2 where it can. The levels agree to f32 rounding.
pub fn attend_head(q: &[f32], k: &[f32], v: &[f32], scale: f32, sc: &mut [f32], o: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    match super::isa() {
        // Safety: the ISA was detected; the head size is checked.
        super::Isa::Avx512 if q.len().is_multiple_of(16) && q.len() <= 256 => {
            return unsafe { avx512::attend_head(q, k, v, scale, sc, o) };
        }
        // Safety: AVX2 and FMA are present on both SIMD levels.
        super::Isa::Avx512 | super::Isa::Avx2 => {
            return unsafe { attend_head_avx2(q, k, v, scale, sc, o) };
        }
        super::Isa::Scalar => {}
    }
    attend_head_impl(q, k, v, scale, sc, o)
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    /// e^x in 16 lanes (Cephes' expf: n = round(x·log2 e), r = x − n·ln 2 in two parts, a
    /// degree-5 polynomial, then ·2^n by vscalefps); within 2 ulp of libm's, 0 below −104.
    #[inline(always)]
    unsafe fn exp(x: __m512) -> __m512 {
        unsafe {
            let xc = _mm512_min_ps(x, _mm512_set1_ps(88.72));
            let n = _mm512_roundscale_ps::<0x08>(_mm512_mul_ps(
                xc,
                _mm512_set1_ps(std::f32::consts::LOG2_E),
            ));
            let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693_359_4), xc);
            let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.121_944_4e-4), r);
            let mut p = _mm512_set1_ps(1.987_569_1e-4);
            for c in [
                1.398_199_9e-3,
                8.333_452e-3,
                4.166_579_6e-2,
                0.166_666_65,
                0.5,
            ] {
                p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
            }
            let p = _mm512_fmadd_ps(
                _mm512_mul_ps(p, r),
                r,
                _mm512_add_ps(r, _mm512_set1_ps(1.0)),
            );
            let e = _mm512_scalef_ps(p, n);
            // Below −104 (and −inf) e^x is 0 in f32; NaN stays NaN.
            let keep = _mm512_cmp_ps_mask::<_CMP_NLT_UQ>(x, _mm512_set1_ps(-104.0));
            _mm512_maskz_mov_ps(keep, e)
        }
    }

    /// The lanes of elements i..min(i + 16, n).
    #[inline(always)]
    fn tail(n: usize, i: usize) -> __mmask16 {
        ((1u32 << (n - i).min(16)) - 1) as u16
    }

    /// See [`super::softmax`].
    #[target_feature(enable = "avx512f,avx512dq,fma")]
    pub unsafe fn softmax(x: &mut [f32]) {
        unsafe {
            let n = x.len();
            let p = x.as_mut_ptr();
            let mut mv = _mm512_set1_ps(f32::NEG_INFINITY);
            let mut i = 0;
            while i < n {
                let k = tail(n, i);
                mv = _mm512_mask_max_ps(mv, k, mv, _mm512_maskz_loadu_ps(k, p.add(i)));
                i += 16;
            }
            let m = _mm512_set1_ps(_mm512_reduce_max_ps(mv));
            let mut sv = _mm512_setzero_ps();
            i = 0;
            while i < n {
                let k = tail(n, i);
                let e = exp(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, p.add(i)), m));
                let e = _mm512_maskz_mov_ps(k, e);
                _mm512_mask_storeu_ps(p.add(i), k, e);
                sv = _mm512_add_ps(sv, e);
                i += 16;
            }
            let inv = _mm512_set1_ps(1.0 / _mm512_reduce_add_ps(sv));
            i = 0;
            while i < n {
                let k = tail(n, i);
                let v = _mm512_mul_ps(_mm512_maskz_loadu_ps(k, p.add(i)), inv);
                _mm512_mask_storeu_ps(p.add(i), k, v);
                i += 16;
            }
        }
    }

    /// See [`super::exp_inplace`].
    #[target_feature(enable = "avx512f,avx512dq,fma")]
    pub unsafe fn exp_inplace(x: &mut [f32]) {
        unsafe {
            let (n, p) = (x.len(), x.as_mut_ptr());
            let mut i = 0;
            while i < n {
                let k = tail(n, i);
                let e = exp(_mm512_maskz_loadu_ps(k, p.add(i)));
                _mm512_mask_storeu_ps(p.add(i), k, e);
                i += 16;
            }
        }
    }

    /// See [`super::silu_mul`].
    #[target_feature(enable = "avx512f,avx512dq,fma")]
    pub unsafe fn silu_mul(u: &mut [f32], g: &[f32]) {
        unsafe {
            let n = u.len().min(g.len());
            let (up, gp) = (u.as_mut_ptr(), g.as_ptr());
            let one = _mm512_set1_ps(1.0);
            let mut i = 0;
            while i < n {
                let k = tail(n, i);
                let gv = _mm512_maskz_loadu_ps(k, gp.add(i));
                let e = exp(_mm512_sub_ps(_mm512_setzero_ps(), gv));
                let s = _mm512_div_ps(gv, _mm512_add_ps(one, e));
                let v = _mm512_mul_ps(_mm512_maskz_loadu_ps(k, up.add(i)), s);
                _mm512_mask_storeu_ps(up.add(i), k, v);
                i += 16;
            }
        }
    }

    /// Sum of the two halves of a zmm, as a ymm.
    #[inline(always)]
    unsafe fn fold(v: __m512) -> __m256 {
        unsafe {
            _mm256_add_ps(
                _mm512_castps512_ps256(v),
                _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)),
            )
        }
    }

    /// The horizontal sums of eight ymm, as one ymm (lane i: the sum of s[i]).
    #[inline(always)]
    unsafe fn sums8(s: [__m256; 8]) -> __m256 {
        unsafe {
            let a = _mm256_hadd_ps(s[0], s[1]);
            let b = _mm256_hadd_ps(s[2], s[3]);
            let c = _mm256_hadd_ps(s[4], s[5]);
            let d = _mm256_hadd_ps(s[6], s[7]);
            let ab = _mm256_hadd_ps(a, b);
            let cd = _mm256_hadd_ps(c, d);
            _mm256_add_ps(
                _mm256_permute2f128_ps(ab, cd, 0x20),
                _mm256_permute2f128_ps(ab, cd, 0x31),
            )
        }
    }

    /// See [`super::attend_head`]; `q.len()` is a multiple of 16, at most 256.
    #[target_feature(enable = "avx512f,avx512dq,avx512vl,avx2,fma")]
    pub unsafe fn attend_head(
        q: &[f32],
        k: &[f32],
        v: &[f32],
        scale: f32,
        sc: &mut [f32],
        o: &mut [f32],
    ) {
        unsafe {
            let d = q.len();
            let c = d / 16;
            let len = sc.len();
            let mut qv = [_mm512_setzero_ps(); 16];
            for i in 0..c {
                qv[i] = _mm512_loadu_ps(q.as_ptr().add(16 * i));
            }
            let kp = k.as_ptr();
            let dot = |j: usize| {
                let row = kp.add(j * d);
                let mut acc = _mm512_mul_ps(qv[0], _mm512_loadu_ps(row));
                for i in 1..c {
                    acc = _mm512_fmadd_ps(qv[i], _mm512_loadu_ps(row.add(16 * i)), acc);
                }
                acc
            };
            // Scores, eight positions per transposed reduction.
            let sv = _mm256_set1_ps(scale);
            let mut j = 0;
            while j + 8 <= len {
                let s: [__m256; 8] = std::array::from_fn(|p| fold(dot(j + p)));
                _mm256_storeu_ps(sc.as_mut_ptr().add(j), _mm256_mul_ps(sums8(s), sv));
                j += 8;
            }
            while j < len {
                sc[j] = _mm512_reduce_add_ps(dot(j)) * scale;
                j += 1;
            }
            super::softmax(sc);
            // o = Σ_j p_j v_j, the output row in registers.
            let mut ov = [_mm512_setzero_ps(); 16];
            let vp = v.as_ptr();
            for (j, &p) in sc.iter().enumerate() {
                let pv = _mm512_set1_ps(p);
                let row = vp.add(j * d);
                for i in 0..c {
                    ov[i] = _mm512_fmadd_ps(pv, _mm512_loadu_ps(row.add(16 * i)), ov[i]);
                }
            }
            for i in 0..c {
                _mm512_storeu_ps(o.as_mut_ptr().add(16 * i), ov[i]);
            }
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::test_rnd as rnd;

    /// The native softmax and SiLU (AVX-512 exp on such machines) against f64, over lengths
    /// that cross the 16-lane vectors and inputs from −∞ to far past exp's range.
    #[test]
    fn softmax_and_silu_match_f64() {
        for n in [1, 5, 16, 17, 100, 513] {
            let mut x: Vec<f32> = rnd(n, 7).iter().map(|v| v * 40.0).collect();
            if n > 1 {
                x[0] = f32::NEG_INFINITY;
            }
            if n > 3 {
                x[3] = -150.0;
            }
            let mut g = x.clone();
            g[0] = -200.0;
            let mut got = x.clone();
            softmax(&mut got);
            // exp in f64 of the f32 differences (their rounding is the input's, not exp's).
            let m = x.iter().fold(f32::MIN, |a, &b| a.max(b));
            let z: f64 = x.iter().map(|&v| ((v - m) as f64).exp()).sum();
            for (i, &v) in x.iter().enumerate() {
                let want = ((v - m) as f64).exp() / z;
                let err = (got[i] as f64 - want).abs();
                assert!(
                    err <= 2e-6 * want + 1e-30,
                    "n={n} i={i}: {} vs {want}",
                    got[i]
                );
            }
            let mut e = x.clone();
            exp_inplace(&mut e);
            for i in 0..n {
                let want = (x[i] as f64).exp();
                let err = (e[i] as f64 - want).abs();
                assert!(
                    err <= 4e-7 * want + 1e-37,
                    "exp n={n} i={i}: {} vs {want}",
                    e[i]
                );
            }
            let mut u = vec![1.5f32; n];
            silu_mul(&mut u, &g);
            for i in 0..n {
                let gv = g[i] as f64;
                let want = 1.5 * gv / (1.0 + (-gv).exp());
                let err = (u[i] as f64 - want).abs();
                assert!(
                    err <= 1e-6 * want.abs() + 1e-30,
                    "silu n={n} i={i}: {} vs {want}",
                    u[i]
                );
            }
        }
    }

    /// The native decode attention (AVX-512 on such machines) against the portable code and
    /// against f64, over head sizes and lengths that cross the 8-position blocks.
    #[test]
    fn attend_head_matches_reference() {
        for d in [16, 64, 80, 128] {
            for len in [1, 7, 8, 9, 33, 200] {
                let (q, k, v) = (rnd(d, 1), rnd(len * d, 2), rnd(len * d, 3));
                let scale = 1.0 / (d as f32).sqrt();
                let (mut sc, mut o) = (vec![0f32; len], vec![0f32; d]);
                attend_head(&q, &k, &v, scale, &mut sc, &mut o);
                let (mut sc2, mut o2) = (vec![0f32; len], vec![0f32; d]);
                attend_head_impl(&q, &k, &v, scale, &mut sc2, &mut o2);
                // f64 reference
                let s: Vec<f64> = (0..len)
                    .map(|j| {
                        (0..d)
                            .map(|c| q[c] as f64 * k[j * d + c] as f64)
                            .sum::<f64>()
                            * scale as f64
                    })
                    .collect();
                let m = s.iter().cloned().fold(f64::MIN, f64::max);
                let e: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
                let z: f64 = e.iter().sum();
                for c in 0..d {
                    let want: f64 = (0..len).map(|j| e[j] / z * v[j * d + c] as f64).sum();
                    for (got, what) in [(o[c], "native"), (o2[c], "portable")] {
                        assert!(
                            (got as f64 - want).abs() < 1e-5,
                            "d={d} len={len} c={c} {what}: {got} vs {want}"
                        );
                    }
                }
            }
        }
    }
}
