//! Row-at-a-time decode dot products for the block formats without multi-row kernels: Q5_0,
//! Q5_1 and the K-quants (Q4_K, Q5_K, Q6_K: ggml's 256-value super-blocks), with activations
//! quantized to int8 per block of 32 ([`Q8Act`]). Each 32-value (sub-)block is one integer dot
//! of the unsigned stored values, scaled by the weight scales and the activation block's d; the
//! offsets (Q5_0's −16·d, Q5_1's m, the K-quants' −dmin·m) multiply d_x·Σq (`xsum`). Column
//! segments fall on the format's blocks.
//!
//! [`Q8Act`]: super::quant::Q8Act

use super::Isa;
use super::quant::{f16_at, k4_scale_min};
use crate::tensor::DType;
use std::ops::Range;

/// Whether this module computes `dt`.
pub fn covers(dt: DType) -> bool {
    matches!(
        dt,
        DType::Q5_0 | DType::Q5_1 | DType::Q4K | DType::Q5K | DType::Q6K
    )
}

/// Dot of one row with q8 activations on the given ISA level.
pub fn dot(
    isa: Isa,
    dt: DType,
    row: &[u8],
    cols: &[Range<usize>],
    q: &[i8],
    d: &[f32],
    xsum: &[f32],
) -> f32 {
    debug_assert!(cols.iter().all(|c| c.start % 256 == 0 && c.end % 256 == 0));
    debug_assert!(
        row.len() >= cols.iter().map(|c| c.end / 256).max().unwrap_or(0) * dt.block_bytes()
    );
    debug_assert!(q.len() >= super::seg_len(cols) && d.len() >= super::seg_len(cols) / 32);
    #[cfg(target_arch = "x86_64")]
    {
        // Safety: the ISA was detected at run time; rows and activations cover `cols` (above).
        let q5 = matches!(dt, DType::Q5_0 | DType::Q5_1);
        match isa {
            Isa::Avx512 if !q5 => {
                return unsafe { avx512::dot(dt, row.as_ptr(), cols, q, d, xsum) };
            }
            Isa::Avx512 | Isa::Avx2 if q5 => {
                return unsafe { avx2::dot_q5(dt, row.as_ptr(), cols, q, d, xsum) };
            }
            Isa::Avx2 => return unsafe { avx2::dot(dt, row.as_ptr(), cols, q, d, xsum) },
            _ => {}
        }
    }
    let _ = isa;
    scalar_dot(dt, row, cols, q, d, xsum)
}

/// The unsigned stored value (Q4_K 0..15, Q5_0/Q5_1/Q5_K 0..31, Q6_K 0..63; Q5_0's is offset
/// by 16, Q6_K's by 32) of value `l` of 32-value (sub-)block `j` of a block (ggml's
/// dequantize_row_*).
fn stored(dt: DType, b: &[u8], j: usize, l: usize) -> u8 {
    match dt {
        DType::Q5_0 | DType::Q5_1 => {
            let o = if dt == DType::Q5_1 { 4 } else { 2 };
            let qh = u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
            ((b[o + 4 + l % 16] >> (4 * (l / 16))) & 0xF) | ((((qh >> l) & 1) as u8) << 4)
        }
        DType::Q4K => (b[16 + 32 * (j / 2) + l] >> (4 * (j % 2))) & 0xF,
        DType::Q5K => {
            let lo = (b[48 + 32 * (j / 2) + l] >> (4 * (j % 2))) & 0xF;
            lo | (((b[16 + l] >> j) & 1) << 4)
        }
        DType::Q6K => {
            let (n, t) = (j / 4, j % 4);
            let lo = (b[64 * n + 32 * (t & 1) + l] >> (4 * (t >> 1))) & 0xF;
            lo | (((b[128 + 32 * n + l] >> (2 * t)) & 3) << 4)
        }
        _ => unreachable!("{dt} is not a K-quant"),
    }
}

/// Integer reference for the SIMD paths.
fn scalar_dot(
    dt: DType,
    row: &[u8],
    cols: &[Range<usize>],
    q: &[i8],
    d: &[f32],
    xsum: &[f32],
) -> f32 {
    let (bl, bb) = (dt.block_len(), dt.block_bytes());
    let mut s = 0f32;
    let mut k = 0; // packed activation block
    for c in cols {
        for sb in c.start / bl..c.end / bl {
            let b = &row[sb * bb..(sb + 1) * bb];
            for j in 0..bl / 32 {
                let x = &q[32 * k..32 * k + 32];
                let dot = |ls: Range<usize>, off: i32| -> f32 {
                    ls.map(|l| (stored(dt, b, j, l) as i32 - off) * x[l] as i32)
                        .sum::<i32>() as f32
                };
                if matches!(dt, DType::Q5_0 | DType::Q5_1) {
                    let m = if dt == DType::Q5_1 {
                        f16_at(b, 2)
                    } else {
                        -16.0 * f16_at(b, 0)
                    };
                    s += f16_at(b, 0) * d[k] * dot(0..32, 0) + m * xsum[k];
                } else if dt == DType::Q6K {
                    let dd = f16_at(b, 208) * d[k];
                    for h in 0..2 {
                        let sc = b[192 + 8 * (j / 4) + 2 * (j % 4) + h] as i8 as f32;
                        s += dd * sc * dot(16 * h..16 * h + 16, 32);
                    }
                } else {
                    let (sc, m) = k4_scale_min(j, &b[4..16]);
                    s += f16_at(b, 0) * sc as f32 * d[k] * dot(0..32, 0)
                        - f16_at(b, 2) * m as f32 * xsum[k];
                }
                k += 1;
            }
        }
    }
    s
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::k4_scale_min;
    use crate::kernels::x86::f16s;
    use crate::tensor::DType;
    use std::arch::x86_64::*;
    use std::ops::Range;

    /// Two activation blocks (64 values) at once: the 16 dpbusd lanes are 8 per block.
    #[inline(always)]
    unsafe fn halves(a: f32, b: f32) -> __m512 {
        unsafe { _mm512_insertf32x8::<1>(_mm512_set1_ps(a), _mm256_set1_ps(b)) }
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx512dq,f16c,fma")]
    pub unsafe fn dot(
        dt: DType,
        row: *const u8,
        cols: &[Range<usize>],
        q: &[i8],
        d: &[f32],
        xsum: &[f32],
    ) -> f32 {
        unsafe {
            let bb = dt.block_bytes();
            let m4 = _mm512_set1_epi8(0x0F);
            let zero = _mm512_setzero_si512();
            let mut acc = _mm512_setzero_ps();
            let mut acc6 = [_mm512_setzero_ps(); 2];
            let pair = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
            let mut corr = 0f32;
            let mut k = 0usize;
            for c in cols {
                for sb in c.start / 256..c.end / 256 {
                    let b = row.add(sb * bb);
                    let x = |k: usize| _mm512_loadu_si512(q.as_ptr().add(32 * k) as *const _);
                    if dt == DType::Q6K {
                        let ddv = _mm512_set1_ps(f16s(b.add(208)));
                        let c32 = _mm512_set1_epi8(32);
                        // Lanes of scale index s0..s0 + 4, each 4 times.
                        let rep = _mm_setr_epi8(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
                        for n in 0..2 {
                            let ql = _mm512_loadu_si512(b.add(64 * n) as *const _);
                            let qh = _mm256_loadu_si256(b.add(128 + 32 * n) as *const _);
                            for t2 in 0..2 {
                                let lo = if t2 == 0 {
                                    _mm512_and_si512(ql, m4)
                                } else {
                                    _mm512_and_si512(_mm512_srli_epi16(ql, 4), m4)
                                };
                                let (h0, h1) = if t2 == 0 {
                                    (qh, _mm256_srli_epi16(qh, 2))
                                } else {
                                    (_mm256_srli_epi16(qh, 4), _mm256_srli_epi16(qh, 6))
                                };
                                let hs = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(h0), h1);
                                let hi =
                                    _mm512_slli_epi16(_mm512_and_si512(hs, _mm512_set1_epi8(3)), 4);
                                let w = _mm512_or_si512(lo, hi);
                                let xv = x(k);
                                let i = _mm512_sub_epi32(
                                    _mm512_dpbusd_epi32(zero, w, xv),
                                    _mm512_dpbusd_epi32(zero, c32, xv),
                                );
                                let s4 = std::ptr::read_unaligned(
                                    b.add(192 + 8 * n + 4 * t2) as *const i32
                                );
                                let sc = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(
                                    _mm_shuffle_epi8(_mm_cvtsi32_si128(s4), rep),
                                ));
                                // d_x of blocks k, k + 1 in lanes 0..8, 8..16.
                                let d2 = _mm_castsi128_ps(_mm_loadl_epi64(
                                    d.as_ptr().add(k) as *const _
                                ));
                                let dv = _mm512_mul_ps(
                                    ddv,
                                    _mm512_permutexvar_ps(pair, _mm512_castps128_ps512(d2)),
                                );
                                // Two accumulators: the halves t2 = 0, 1 in turn.
                                acc6[t2] = _mm512_fmadd_ps(
                                    _mm512_cvtepi32_ps(i),
                                    _mm512_mul_ps(sc, dv),
                                    acc6[t2],
                                );
                                k += 2;
                            }
                        }
                    } else {
                        let q5 = dt == DType::Q5K;
                        let (dd, dmin) = (f16s(b), f16s(b.add(2)));
                        let mut scales = [0u8; 12];
                        std::ptr::copy_nonoverlapping(b.add(4), scales.as_mut_ptr(), 12);
                        let qs = b.add(if q5 { 48 } else { 16 });
                        let qh = if q5 {
                            _mm256_loadu_si256(b.add(16) as *const _)
                        } else {
                            _mm256_setzero_si256()
                        };
                        let one = _mm256_set1_epi8(1);
                        for p in 0..4 {
                            // Sub-blocks 2p (low nibbles) and 2p + 1 (high) share 32 bytes.
                            let v = _mm256_loadu_si256(qs.add(32 * p) as *const _);
                            let both = _mm512_inserti64x4::<1>(
                                _mm512_castsi256_si512(v),
                                _mm256_srli_epi16(v, 4),
                            );
                            let mut w = _mm512_and_si512(both, m4);
                            if q5 {
                                let h0 = _mm256_and_si256(
                                    _mm256_srl_epi16(qh, _mm_cvtsi32_si128(2 * p as i32)),
                                    one,
                                );
                                let h1 = _mm256_and_si256(
                                    _mm256_srl_epi16(qh, _mm_cvtsi32_si128(2 * p as i32 + 1)),
                                    one,
                                );
                                let h = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(h0), h1);
                                w = _mm512_or_si512(w, _mm512_slli_epi16(h, 4));
                            }
                            let i = _mm512_dpbusd_epi32(zero, w, x(k));
                            let (s0, m0) = k4_scale_min(2 * p, &scales);
                            let (s1, m1) = k4_scale_min(2 * p + 1, &scales);
                            let sv = halves(dd * s0 as f32 * d[k], dd * s1 as f32 * d[k + 1]);
                            acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(i), sv, acc);
                            corr += dmin * (m0 as f32 * xsum[k] + m1 as f32 * xsum[k + 1]);
                            k += 2;
                        }
                    }
                }
            }
            _mm512_reduce_add_ps(_mm512_add_ps(acc, _mm512_add_ps(acc6[0], acc6[1]))) - corr
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::k4_scale_min;
    use crate::kernels::x86::{f16s, hsum256 as hsum};
    use crate::tensor::DType;
    use std::arch::x86_64::*;
    use std::ops::Range;

    /// One 32-value block: Σ over pairs of u8 w · i8 x (maddubs cannot saturate here: w ≤ 63),
    /// widened to 8 i32 lanes, 4 per 16 values.
    #[inline(always)]
    unsafe fn dot32(w: __m256i, x: __m256i, off: __m256i) -> __m256 {
        unsafe {
            let p = _mm256_sub_epi16(_mm256_maddubs_epi16(w, x), _mm256_maddubs_epi16(off, x));
            _mm256_cvtepi32_ps(_mm256_madd_epi16(p, _mm256_set1_epi16(1)))
        }
    }

    /// Q5_0 / Q5_1: nibbles (values 0..16 low, 16..32 high) plus bit i of qh as 16.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_q5(
        dt: DType,
        row: *const u8,
        cols: &[Range<usize>],
        q: &[i8],
        d: &[f32],
        xsum: &[f32],
    ) -> f32 {
        unsafe {
            let q51 = dt == DType::Q5_1;
            let (bb, o) = if q51 { (24, 4) } else { (22, 2) };
            let lo = _mm_set1_epi8(0x0F);
            // Byte i takes byte i / 8 of qh, then tests bit i % 8 (ggml's bytes_from_bits_32).
            let spread = _mm256_setr_epi8(
                0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3,
                3, 3, 3, 3,
            );
            let others = _mm256_set1_epi64x(0x7fbfdfeff7fbfdfe);
            let sixteen = _mm256_set1_epi8(16);
            let zero = _mm256_setzero_si256();
            let mut acc = _mm256_setzero_ps();
            let mut corr = 0f32;
            let mut k = 0usize;
            for c in cols {
                for blk in c.start / 32..c.end / 32 {
                    let b = row.add(blk * bb);
                    let dw = f16s(b);
                    let m = if q51 { f16s(b.add(2)) } else { -16.0 * dw };
                    let qh = std::ptr::read_unaligned(b.add(o) as *const u32);
                    let bits = _mm256_or_si256(
                        _mm256_shuffle_epi8(_mm256_set1_epi32(qh as i32), spread),
                        others,
                    );
                    let hi =
                        _mm256_and_si256(_mm256_cmpeq_epi8(bits, _mm256_set1_epi64x(-1)), sixteen);
                    let bytes = _mm_loadu_si128(b.add(o + 4) as *const _);
                    let w = _mm256_or_si256(
                        _mm256_set_m128i(
                            _mm_and_si128(_mm_srli_epi16(bytes, 4), lo),
                            _mm_and_si128(bytes, lo),
                        ),
                        hi,
                    );
                    let xv = _mm256_loadu_si256(q.as_ptr().add(32 * k) as *const _);
                    acc = _mm256_fmadd_ps(dot32(w, xv, zero), _mm256_set1_ps(dw * d[k]), acc);
                    corr += m * xsum[k];
                    k += 1;
                }
            }
            hsum(acc) + corr
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot(
        dt: DType,
        row: *const u8,
        cols: &[Range<usize>],
        q: &[i8],
        d: &[f32],
        xsum: &[f32],
    ) -> f32 {
        unsafe {
            let bb = dt.block_bytes();
            let m4 = _mm256_set1_epi8(0x0F);
            let zero = _mm256_setzero_si256();
            let mut acc = _mm256_setzero_ps();
            let mut corr = 0f32;
            let mut k = 0usize;
            for c in cols {
                for sb in c.start / 256..c.end / 256 {
                    let b = row.add(sb * bb);
                    let x = |k: usize| _mm256_loadu_si256(q.as_ptr().add(32 * k) as *const _);
                    if dt == DType::Q6K {
                        let dd = f16s(b.add(208));
                        let c32 = _mm256_set1_epi8(32);
                        for j in 0..8 {
                            let (n, t) = (j / 4, j % 4);
                            let ql = _mm256_loadu_si256(b.add(64 * n + 32 * (t & 1)) as *const _);
                            let lo = _mm256_and_si256(
                                _mm256_srl_epi16(ql, _mm_cvtsi32_si128(4 * (t >> 1) as i32)),
                                m4,
                            );
                            let qh = _mm256_loadu_si256(b.add(128 + 32 * n) as *const _);
                            let hi = _mm256_and_si256(
                                _mm256_srl_epi16(qh, _mm_cvtsi32_si128(2 * t as i32)),
                                _mm256_set1_epi8(3),
                            );
                            let w = _mm256_or_si256(lo, _mm256_slli_epi16(hi, 4));
                            let s = b.add(192 + 8 * n + 2 * t);
                            let sc = _mm256_set_m128(
                                _mm_set1_ps(*s.add(1) as i8 as f32),
                                _mm_set1_ps(*s as i8 as f32),
                            );
                            let f = _mm256_mul_ps(sc, _mm256_set1_ps(dd * d[k]));
                            acc = _mm256_fmadd_ps(dot32(w, x(k), c32), f, acc);
                            k += 1;
                        }
                    } else {
                        let q5 = dt == DType::Q5K;
                        let (dd, dmin) = (f16s(b), f16s(b.add(2)));
                        let mut scales = [0u8; 12];
                        std::ptr::copy_nonoverlapping(b.add(4), scales.as_mut_ptr(), 12);
                        let qs = b.add(if q5 { 48 } else { 16 });
                        let qh = if q5 {
                            _mm256_loadu_si256(b.add(16) as *const _)
                        } else {
                            zero
                        };
                        for j in 0..8 {
                            let v = _mm256_loadu_si256(qs.add(32 * (j / 2)) as *const _);
                            let sh = _mm_cvtsi32_si128(4 * (j % 2) as i32);
                            let mut w = _mm256_and_si256(_mm256_srl_epi16(v, sh), m4);
                            if q5 {
                                let h = _mm256_and_si256(
                                    _mm256_srl_epi16(qh, _mm_cvtsi32_si128(j as i32)),
                                    _mm256_set1_epi8(1),
                                );
                                w = _mm256_or_si256(w, _mm256_slli_epi16(h, 4));
                            }
                            let (s, m) = k4_scale_min(j, &scales);
                            let f = _mm256_set1_ps(dd * s as f32 * d[k]);
                            acc = _mm256_fmadd_ps(dot32(w, x(k), zero), f, acc);
                            corr += dmin * m as f32 * xsum[k];
                            k += 1;
                        }
                    }
                }
            }
            hsum(acc) - corr
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::kernels::quant::{self, Q8Act};
    use crate::kernels::test_rnd as rnd;

    /// Random blocks for `n` × 256 values: any bytes are valid K-quant data once the f16 scales are finite.
    pub(crate) fn blocks(dt: DType, n: usize, seed: u64) -> Vec<u8> {
        let bb = dt.block_bytes();
        let n = n * 256 / dt.block_len();
        let mut b: Vec<u8> = rnd(n * bb, seed)
            .iter()
            .map(|v| ((v + 0.5) * 256.0) as u8)
            .collect();
        for (i, blk) in b.chunks_mut(bb).enumerate() {
            let f = |v: f32| half::f16::from_f32(v).to_le_bytes();
            let (d, dmin) = (
                0.001 + 0.0001 * (i % 7) as f32,
                0.002 + 0.0002 * (i % 5) as f32,
            );
            if dt == DType::Q6K {
                blk[208..210].copy_from_slice(&f(d));
            } else if dt == DType::Q5_0 {
                blk[0..2].copy_from_slice(&f(d));
            } else {
                blk[0..2].copy_from_slice(&f(d));
                blk[2..4].copy_from_slice(&f(dmin));
            }
        }
        b
    }

    /// Every ISA level this machine has agrees with the dequantized weights (f64), on column
    /// cuts of whole super-blocks.
    #[test]
    fn k_quant_dots_match_dequantized_weights_at_every_isa() {
        let k = 1024;
        let mut levels = vec![Isa::Scalar];
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                levels.push(Isa::Avx2);
            }
            if super::super::isa() == Isa::Avx512 {
                levels.push(Isa::Avx512);
            }
        }
        for dt in [DType::Q5_0, DType::Q5_1, DType::Q4K, DType::Q5K, DType::Q6K] {
            for seed in 0..4 {
                let row = blocks(dt, k / 256, seed);
                let mut deq = vec![0f32; k];
                quant::dequant_row(dt, &row, 0, &mut deq);
                let mut cuts = vec![
                    vec![0..1024],
                    vec![0..256],
                    vec![256..512, 768..1024],
                    vec![512..1024],
                ];
                if dt.block_len() == 32 {
                    cuts.push(vec![32..96, 160..256, 992..1024]);
                }
                for cols in cuts {
                    let kk = super::super::seg_len(&cols);
                    let x = rnd(kk, 50 + seed);
                    let mut a = Q8Act::default();
                    a.quantize(&x);
                    let xsum: Vec<f32> = (0..a.d.len()).map(|b| a.d[b] * a.sum[b] as f32).collect();
                    // The reference: dequantized weights times the quantized activations.
                    let (mut want, mut mag) = (0f64, 0f64);
                    let cl: Vec<usize> = cols.iter().flat_map(|r| r.clone()).collect();
                    for (i, &c) in cl.iter().enumerate() {
                        let p = deq[c] as f64 * (a.d[i / 32] * a.q[i] as f32) as f64;
                        want += p;
                        mag += p.abs();
                    }
                    for &isa in &levels {
                        let got = dot(isa, dt, &row, &cols, &a.q, &a.d, &xsum) as f64;
                        assert!(
                            (got - want).abs() <= 1e-5 * mag + 1e-7,
                            "{dt} {isa:?} cols {cols:?} seed {seed}: {got} vs {want} (Σ|wx| {mag})"
                        );
                    }
                }
            }
        }
    }
}
