//! Decode products y = W[rows, cols] · x for one token, over the budget's active segments.
//!
//! `rows` and `cols` list index ranges of the parent tensor; `x` holds the active input columns
//! packed in segment order and `y` receives the active rows packed likewise. Weights are read in
//! their stored format: BF16 against bf16-rounded activations (vdpbf16ps), Q8_0/Q4_0/Q4_1 against
//! activations quantized to int8 per block of 32 (VNNI), F32/F16 against f32. Per-token buffers
//! live in a thread-local scratch, so the decode loop allocates nothing after the first token.

use super::quant::{self, Q8Act};
use super::{Isa, isa, pool::pool, seg_len};
use crate::tensor::{DType, Tensor};
use std::cell::RefCell;
use std::ops::Range;

#[derive(Default)]
struct ActScratch {
    bf: Vec<u16>,
    q8: Q8Act,
    /// Per block of 32: d_x·Σq (Q4 offsets) and 128·d_x·Σq (Q8_0 sign trick).
    xsum: Vec<f32>,
    row: Vec<f32>,
}

thread_local! {
    static SCRATCH: RefCell<ActScratch> = RefCell::new(ActScratch::default());
}

/// Prepared activation, shared read-only by all threads.
enum Act<'a> {
    F32(&'a [f32]),
    Bf16(&'a [u16]),
    Q8 { q: &'a [i8], d: &'a [f32], xsum: &'a [f32] },
}

/// y = W[rows, cols] x. `w` is [out, in]; `x.len() == seg_len(cols)`, `y.len() == seg_len(rows)`.
pub fn matvec(w: &Tensor, rows: &[Range<usize>], cols: &[Range<usize>], x: &[f32], y: &mut [f32]) {
    debug_assert_eq!(x.len(), seg_len(cols));
    debug_assert_eq!(y.len(), seg_len(rows));
    let isa = isa();
    SCRATCH.with(|s| {
        let mut s = s.borrow_mut();
        let s = &mut *s;
        let act = match w.dtype {
            DType::F32 | DType::F16 => Act::F32(x),
            DType::BF16 => {
                s.bf.resize(x.len(), 0);
                to_bf16(x, &mut s.bf);
                Act::Bf16(&s.bf)
            }
            DType::Q8_0 | DType::Q4_0 | DType::Q4_1 => {
                s.q8.quantize(x);
                s.xsum.resize(s.q8.d.len(), 0.0);
                let c = if w.dtype == DType::Q8_0 { 128.0 } else { 1.0 };
                for b in 0..s.q8.d.len() {
                    s.xsum[b] = c * s.q8.d[b] * s.q8.sum[b] as f32;
                }
                Act::Q8 { q: &s.q8.q, d: &s.q8.d, xsum: &s.xsum }
            }
            DType::Q4K | DType::Q6K => Act::F32(x),
        };
        let n = y.len();
        let yp = SendPtr(y.as_mut_ptr());
        let align = 16;
        let run = |r: Range<usize>| {
            // Safety: threads write disjoint ranges of y.
            let y = unsafe { std::slice::from_raw_parts_mut(yp.get().add(r.start), r.len()) };
            let mut rowbuf = Vec::new();
            rows_dot(w, rows, r, cols, &act, y, isa, &mut rowbuf);
        };
        if n * w.row_bytes() < 64 * 1024 {
            run(0..n);
        } else {
            pool().for_range(n, align, run);
        }
        let _ = &s.row;
    });
}

#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}
impl SendPtr {
    fn get(self) -> *mut f32 {
        self.0
    }
}

pub fn to_bf16(x: &[f32], out: &mut [u16]) {
    for (o, &v) in out.iter_mut().zip(x) {
        *o = quant::f32_to_bf16(v);
    }
}

/// Computes the packed active rows `r` (indices into the flattened row segments).
#[allow(clippy::too_many_arguments)]
fn rows_dot(
    w: &Tensor,
    rows: &[Range<usize>],
    r: Range<usize>,
    cols: &[Range<usize>],
    act: &Act,
    y: &mut [f32],
    isa: Isa,
    rowbuf: &mut Vec<f32>,
) {
    let mut k = 0usize; // packed index of the current segment start
    for seg in rows {
        let (s0, s1) = (k, k + seg.len());
        k = s1;
        let a = s0.max(r.start);
        let b = s1.min(r.end);
        if a >= b {
            continue;
        }
        for p in a..b {
            let row = w.row(seg.start + (p - s0));
            y[p - r.start] = dot(w.dtype, row, cols, act, isa, rowbuf);
        }
    }
}

#[inline]
fn dot(dt: DType, row: &[u8], cols: &[Range<usize>], act: &Act, isa: Isa, rowbuf: &mut Vec<f32>) -> f32 {
    match (act, isa) {
        #[cfg(target_arch = "x86_64")]
        (Act::Bf16(x), Isa::Avx512) => unsafe { avx512::dot_bf16(row, cols, x) },
        #[cfg(target_arch = "x86_64")]
        (Act::Q8 { q, d, xsum }, Isa::Avx512) => unsafe {
            match dt {
                DType::Q8_0 => avx512::dot_q8_0(row, cols, q, d, xsum),
                DType::Q4_1 => avx512::dot_q4::<true>(row, cols, q, d, xsum),
                _ => avx512::dot_q4::<false>(row, cols, q, d, xsum),
            }
        },
        #[cfg(target_arch = "x86_64")]
        (Act::F32(x), Isa::Avx512) if dt == DType::F32 => unsafe { avx512::dot_f32(row, cols, x) },
        #[cfg(target_arch = "x86_64")]
        (Act::F32(x), Isa::Avx512) if dt == DType::F16 => unsafe { avx512::dot_f16(row, cols, x) },
        (Act::Q8 { q, d, xsum }, _) => scalar_dot_q(dt, row, cols, q, d, xsum),
        (Act::Bf16(x), _) => {
            let mut s = 0f32;
            let mut k = 0;
            for c in cols {
                for j in c.clone() {
                    let wv = quant::bf16_to_f32(u16::from_le_bytes([row[2 * j], row[2 * j + 1]]));
                    s += wv * quant::bf16_to_f32(x[k]);
                    k += 1;
                }
            }
            s
        }
        (Act::F32(x), _) => {
            let mut s = 0f32;
            let mut k = 0;
            for c in cols {
                rowbuf.resize(c.len(), 0.0);
                quant::dequant_row(dt, row, c.start, rowbuf);
                for (wv, xv) in rowbuf.iter().zip(&x[k..k + c.len()]) {
                    s += wv * xv;
                }
                k += c.len();
            }
            s
        }
    }
}

/// Integer dot of a Q8_0/Q4_0/Q4_1 row with q8 activations: the reference for the SIMD paths.
fn scalar_dot_q(dt: DType, row: &[u8], cols: &[Range<usize>], q: &[i8], d: &[f32], xsum: &[f32]) -> f32 {
    let bb = dt.block_bytes();
    let mut s = 0f32;
    let mut k = 0; // packed activation block
    for c in cols {
        for blk in c.start / 32..c.end / 32 {
            let b = &row[blk * bb..(blk + 1) * bb];
            let xq = &q[32 * k..32 * k + 32];
            let dw = quant::f16_at(b, 0);
            match dt {
                DType::Q8_0 => {
                    let mut acc = 0i32;
                    for i in 0..32 {
                        acc += (b[2 + i] as i8) as i32 * xq[i] as i32;
                    }
                    s += dw * d[k] * acc as f32;
                }
                _ => {
                    let off = if dt == DType::Q4_1 { 4 } else { 2 };
                    let mut acc = 0i32;
                    for i in 0..16 {
                        acc += (b[off + i] & 0xF) as i32 * xq[i] as i32;
                        acc += (b[off + i] >> 4) as i32 * xq[i + 16] as i32;
                    }
                    s += dw * d[k] * acc as f32;
                    let m = if dt == DType::Q4_1 { quant::f16_at(b, 2) } else { -8.0 * dw };
                    s += m * xsum[k];
                }
            }
            k += 1;
        }
    }
    s
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;
    use std::ops::Range;

    #[inline(always)]
    unsafe fn f16s(b: *const u8) -> f32 {
        unsafe { _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(std::ptr::read_unaligned(b as *const u16) as i32))) }
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16,avx512vnni,f16c,fma")]
    pub unsafe fn dot_bf16(row: &[u8], cols: &[Range<usize>], x: &[u16]) -> f32 {
        unsafe {
            let mut acc0 = _mm512_setzero_ps();
            let mut acc1 = _mm512_setzero_ps();
            let mut k = 0usize;
            for c in cols {
                let w = row.as_ptr().add(2 * c.start) as *const u16;
                let xp = x.as_ptr().add(k);
                let n = c.len();
                let mut i = 0;
                while i + 64 <= n {
                    let w0 = _mm512_loadu_si512(w.add(i) as *const _);
                    let x0 = _mm512_loadu_si512(xp.add(i) as *const _);
                    let w1 = _mm512_loadu_si512(w.add(i + 32) as *const _);
                    let x1 = _mm512_loadu_si512(xp.add(i + 32) as *const _);
                    acc0 = _mm512_dpbf16_ps(acc0, std::mem::transmute(w0), std::mem::transmute(x0));
                    acc1 = _mm512_dpbf16_ps(acc1, std::mem::transmute(w1), std::mem::transmute(x1));
                    i += 64;
                }
                while i < n {
                    let m: __mmask32 = if n - i >= 32 { !0 } else { (1u32 << (n - i)) - 1 };
                    let w0 = _mm512_maskz_loadu_epi16(m, w.add(i) as *const _);
                    let x0 = _mm512_maskz_loadu_epi16(m, xp.add(i) as *const _);
                    acc0 = _mm512_dpbf16_ps(acc0, std::mem::transmute(w0), std::mem::transmute(x0));
                    i += 32;
                }
                k += n;
            }
            _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1))
        }
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c,fma")]
    pub unsafe fn dot_f32(row: &[u8], cols: &[Range<usize>], x: &[f32]) -> f32 {
        unsafe {
            let mut acc = _mm512_setzero_ps();
            let mut k = 0usize;
            for c in cols {
                let w = row.as_ptr().add(4 * c.start) as *const f32;
                let xp = x.as_ptr().add(k);
                let n = c.len();
                let mut i = 0;
                while i < n {
                    let m: __mmask16 = if n - i >= 16 { !0 } else { (1u16 << (n - i)) - 1 };
                    acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, w.add(i)), _mm512_maskz_loadu_ps(m, xp.add(i)), acc);
                    i += 16;
                }
                k += n;
            }
            _mm512_reduce_add_ps(acc)
        }
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c,fma")]
    pub unsafe fn dot_f16(row: &[u8], cols: &[Range<usize>], x: &[f32]) -> f32 {
        unsafe {
            let mut acc = _mm512_setzero_ps();
            let mut k = 0usize;
            for c in cols {
                let w = row.as_ptr().add(2 * c.start) as *const u16;
                let xp = x.as_ptr().add(k);
                let n = c.len();
                let mut i = 0;
                while i < n {
                    let m: __mmask16 = if n - i >= 16 { !0 } else { (1u16 << (n - i)) - 1 };
                    let wh = _mm256_maskz_loadu_epi16(m, w.add(i) as *const _);
                    acc = _mm512_fmadd_ps(_mm512_cvtph_ps(wh), _mm512_maskz_loadu_ps(m, xp.add(i)), acc);
                    i += 16;
                }
                k += n;
            }
            _mm512_reduce_add_ps(acc)
        }
    }

    /// Q8_0 · q8: weights are made unsigned by flipping the sign bit (w+128), so
    /// Σ w·x = dpbusd(w+128, x) − 128·Σx; the second term is `xsum` (pre-scaled by d_x).
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,f16c,fma")]
    pub unsafe fn dot_q8_0(row: &[u8], cols: &[Range<usize>], q: &[i8], d: &[f32], xsum: &[f32]) -> f32 {
        unsafe {
            let flip = _mm256_set1_epi8(-128);
            let mut acc = _mm256_setzero_ps();
            let mut corr = 0f32;
            let mut k = 0usize;
            for c in cols {
                let mut p = row.as_ptr().add(c.start / 32 * 34);
                for _ in 0..c.len() / 32 {
                    let dw = f16s(p);
                    let w = _mm256_xor_si256(_mm256_loadu_si256(p.add(2) as *const _), flip);
                    let xv = _mm256_loadu_si256(q.as_ptr().add(32 * k) as *const _);
                    let i = _mm256_dpbusd_epi32(_mm256_setzero_si256(), w, xv);
                    acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(i), _mm256_set1_ps(dw * d[k]), acc);
                    corr += dw * xsum[k];
                    p = p.add(34);
                    k += 1;
                }
            }
            hsum256(acc) - corr
        }
    }

    /// Q4_0 / Q4_1 · q8: nibbles are already unsigned; the offset (−8·d or m) times Σx is added
    /// from `xsum`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,f16c,fma")]
    pub unsafe fn dot_q4<const Q41: bool>(row: &[u8], cols: &[Range<usize>], q: &[i8], d: &[f32], xsum: &[f32]) -> f32 {
        unsafe {
            let bb = if Q41 { 20 } else { 18 };
            let off = if Q41 { 4 } else { 2 };
            let lo = _mm_set1_epi8(0x0F);
            let mut acc = _mm256_setzero_ps();
            let mut corr = 0f32;
            let mut k = 0usize;
            for c in cols {
                let mut p = row.as_ptr().add(c.start / 32 * bb);
                for _ in 0..c.len() / 32 {
                    let dw = f16s(p);
                    let m = if Q41 { f16s(p.add(2)) } else { -8.0 * dw };
                    let b = _mm_loadu_si128(p.add(off) as *const _);
                    let w = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(b, 4), lo), _mm_and_si128(b, lo));
                    let xv = _mm256_loadu_si256(q.as_ptr().add(32 * k) as *const _);
                    let i = _mm256_dpbusd_epi32(_mm256_setzero_si256(), w, xv);
                    acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(i), _mm256_set1_ps(dw * d[k]), acc);
                    corr += m * xsum[k];
                    p = p.add(bb);
                    k += 1;
                }
            }
            hsum256(acc) + corr
        }
    }

    #[inline(always)]
    unsafe fn hsum256(v: __m256) -> f32 {
        unsafe {
            let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
            let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
            let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
            _mm_cvtss_f32(s)
        }
    }
}
