//! Prefill products C[T, N] = A[T, K] · B[N, K]ᵀ with register-tiled AVX-512 micro-kernels.
//!
//! B (a weight, or keys/values in attention) is packed panel by panel — NR = 48 output columns
//! by KC inputs — dequantizing from its stored format on the fly, so every format shares the
//! kernels and the budget's row/column segments are just a gather during packing. Two kernels:
//! f32 FMA (F32/F16 weights and attention: exact f32) and bf16 pairs with vdpbf16ps (BF16 and
//! quantized weights: activations rounded to bf16, as llama.cpp does). Threads split the panels.

use super::quant::{self, f32_to_bf16};
use super::{Isa, isa, pool::pool, seg_len};
use crate::tensor::{DType, Tensor};
use std::ops::Range;

pub const NR: usize = 48;
const MR: usize = 8;
const KC_F32: usize = 256;
const KC_BF16: usize = 512;

#[derive(Clone, Copy)]
struct Ptr<T>(*mut T);
unsafe impl<T> Send for Ptr<T> {}
unsafe impl<T> Sync for Ptr<T> {}
impl<T> Ptr<T> {
    fn get(self) -> *mut T {
        self.0
    }
}

/// Which kernel a weight format uses in prefill. `ELASTICA_EXACT=1` keeps every format on the
/// f32 kernel (weights dequantized exactly, activations unrounded) at about half the speed.
pub fn uses_bf16(dt: DType) -> bool {
    !exact() && !matches!(dt, DType::F32 | DType::F16)
}

static EXACT: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(0);

/// `ELASTICA_EXACT=1`: f32 activations everywhere (decode and prefill), for reference runs and
/// function checks across formats.
pub fn exact() -> bool {
    use std::sync::atomic::Ordering;
    match EXACT.load(Ordering::Relaxed) {
        0 => {
            let on = std::env::var_os("ELASTICA_EXACT").is_some_and(|v| v != "0");
            EXACT.store(if on { 2 } else { 1 }, Ordering::Relaxed);
            on
        }
        v => v == 2,
    }
}

/// Switches exact mode for this process (e.g. around a comparison); returns the previous value.
pub fn set_exact(on: bool) -> bool {
    let prev = exact();
    EXACT.store(if on { 2 } else { 1 }, std::sync::atomic::Ordering::Relaxed);
    prev
}

/// Y[t, :] = W[rows, cols] · X[t, :] for t in 0..T. X is [T, seg_len(cols)], Y is [T, seg_len(rows)].
pub fn matmul(w: &Tensor, rows: &[Range<usize>], cols: &[Range<usize>], x: &[f32], y: &mut [f32]) {
    let k = seg_len(cols);
    let n = seg_len(rows);
    let t = x.len() / k.max(1);
    debug_assert_eq!(x.len(), t * k);
    debug_assert_eq!(y.len(), t * n);
    if t == 0 || n == 0 {
        return;
    }
    if k == 0 {
        y.fill(0.0);
        return;
    }
    // Maps a packed output column to its parent row.
    let row_of = |p: usize| -> usize {
        let mut off = 0;
        for s in rows {
            if p < off + s.len() {
                return s.start + (p - off);
            }
            off += s.len();
        }
        unreachable!()
    };
    let dt = w.dtype;
    let pack_f32 =
        |n0: usize, nn: usize, k0: usize, kc: usize, dst: &mut [f32], tmp: &mut Vec<f32>| {
            if dt == DType::F32 {
                // F32 rows straight into the panel, no row copy.
                for j in 0..nn {
                    let row = w.row(row_of(n0 + j));
                    row_runs(cols, k0, kc, |at, c0, len| {
                        let src = &row[4 * c0..4 * (c0 + len)];
                        for (kk, b) in src.chunks_exact(4).enumerate() {
                            dst[(at + kk) * NR + j] = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                        }
                    });
                }
                return;
            }
            for j in 0..nn {
                gather_row(w, row_of(n0 + j), cols, k0, kc, tmp);
                for (kk, &v) in tmp[..kc].iter().enumerate() {
                    dst[kk * NR + j] = v;
                }
            }
        };
    if uses_bf16(dt) && isa() == Isa::Avx512 {
        let kp = k.next_multiple_of(2);
        let mut xb = vec![0u16; t * kp];
        for r in 0..t {
            to_bf16(&x[r * k..(r + 1) * k], &mut xb[r * kp..r * kp + k]);
        }
        let paired = dt == DType::BF16 && cols.iter().all(|s| s.start % 2 == 0 && s.len() % 2 == 0);
        let pack =
            |n0: usize, nn: usize, k0: usize, kc: usize, dst: &mut [u16], tmp: &mut Vec<f32>| {
                // dst layout [kc/2][NR][2]: one u32 (a bf16 pair along k) per output column.
                if paired {
                    // BF16 with every segment on whole pairs: pairs straight from the rows.
                    for j in 0..nn {
                        let row = w.row(row_of(n0 + j));
                        row_runs(cols, k0, kc, |at, c0, len| {
                            let src = &row[2 * c0..2 * (c0 + len)];
                            let d = &mut dst[at * NR + 2 * j..];
                            for (p, b) in src.chunks_exact(4).enumerate() {
                                d[p * 2 * NR] = u16::from_le_bytes([b[0], b[1]]);
                                d[p * 2 * NR + 1] = u16::from_le_bytes([b[2], b[3]]);
                            }
                        });
                    }
                    return;
                }
                let mut row = [0u16; KC_BF16 + 2];
                for j in 0..nn {
                    gather_row_bf16(w, row_of(n0 + j), cols, k0, kc, tmp, &mut row);
                    if kc % 2 == 1 {
                        row[kc] = 0;
                    }
                    // One pair per step, a strided u32 store.
                    let d = &mut dst[2 * j..];
                    for (p, pr) in row[..kc.next_multiple_of(2)].chunks_exact(2).enumerate() {
                        let (a, b) = (pr[0], pr[1]);
                        d[p * 2 * NR] = a;
                        d[p * 2 * NR + 1] = b;
                    }
                }
            };
        gemm_bf16(t, n, k, &xb, kp, y, n, &pack);
    } else {
        gemm_f32(t, n, k, x, k, y, n, &pack_f32);
    }
    // FP8/NVFP4: the per-tensor scale (packing dequantizes the stored values only).
    if w.scale != 1.0 {
        y.iter_mut().for_each(|v| *v *= w.scale);
    }
}

/// f32 → bf16 (round to nearest even), vectorized where AVX-512 BF16 is available.
pub fn to_bf16(x: &[f32], out: &mut [u16]) {
    #[cfg(target_arch = "x86_64")]
    if isa() == Isa::Avx512 {
        unsafe { avx512::to_bf16(x, out) };
        return;
    }
    for (o, &v) in out.iter_mut().zip(x) {
        *o = f32_to_bf16(v);
    }
}

/// Like [`gather_row`], as bf16: BF16 weights are copied, other formats dequantized and rounded.
fn gather_row_bf16(
    w: &Tensor,
    r: usize,
    cols: &[Range<usize>],
    k0: usize,
    kc: usize,
    tmp: &mut Vec<f32>,
    out: &mut [u16],
) {
    if w.dtype == DType::BF16 {
        let row = w.row(r);
        let mut off = 0;
        let mut filled = 0;
        for s in cols {
            let (a, b) = (off, off + s.len());
            off = b;
            let lo = a.max(k0);
            let hi = b.min(k0 + kc);
            if lo >= hi {
                continue;
            }
            let c0 = s.start + (lo - a);
            let src = row[2 * c0..2 * (c0 + hi - lo)].chunks_exact(2);
            for (o, b) in out[filled..filled + hi - lo].iter_mut().zip(src) {
                *o = u16::from_le_bytes([b[0], b[1]]);
            }
            filled += hi - lo;
        }
        return;
    }
    gather_row(w, r, cols, k0, kc, tmp);
    to_bf16(&tmp[..kc], &mut out[..kc]);
}

/// The runs of packed columns [k0, k0+kc) over the column segments: `f(at, c0, len)` for each,
/// `at` its offset from k0 and `c0` its first parent column.
fn row_runs(cols: &[Range<usize>], k0: usize, kc: usize, mut f: impl FnMut(usize, usize, usize)) {
    let mut off = 0;
    for s in cols {
        let (lo, hi) = (off.max(k0), (off + s.len()).min(k0 + kc));
        let c0 = s.start + lo.saturating_sub(off);
        off += s.len();
        if lo < hi {
            f(lo - k0, c0, hi - lo);
        }
    }
}

/// Gathers packed input columns [k0, k0+kc) of parent row `r` (over the column segments) as f32.
fn gather_row(
    w: &Tensor,
    r: usize,
    cols: &[Range<usize>],
    k0: usize,
    kc: usize,
    tmp: &mut Vec<f32>,
) {
    tmp.resize(kc.max(tmp.len()), 0.0);
    let row = w.row(r);
    let bl = w.dtype.block_len();
    let mut off = 0; // packed offset of segment start
    let mut filled = 0;
    for s in cols {
        let (a, b) = (off, off + s.len());
        off = b;
        let lo = a.max(k0);
        let hi = b.min(k0 + kc);
        if lo >= hi {
            continue;
        }
        let c0 = s.start + (lo - a);
        // Dequantize from the enclosing block boundary.
        let cb = c0 / bl * bl;
        let skip = c0 - cb;
        if skip == 0 {
            quant::dequant_row(w.dtype, row, c0, &mut tmp[filled..filled + (hi - lo)]);
        } else {
            let mut t2 = vec![0f32; skip + hi - lo];
            quant::dequant_row(w.dtype, row, cb, &mut t2);
            tmp[filled..filled + (hi - lo)].copy_from_slice(&t2[skip..]);
        }
        filled += hi - lo;
    }
    debug_assert_eq!(filled, kc);
}

/// C[m, n] = A[m, k] · B[n, k]ᵀ in f32 (row-major, leading dimensions given). Used by attention
/// and the SSD scan, where both operands are activations.
pub fn gemm_nt(
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    lda: usize,
    b: &[f32],
    ldb: usize,
    c: &mut [f32],
    ldc: usize,
) {
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        for i in 0..m {
            c[i * ldc..i * ldc + n].fill(0.0);
        }
        return;
    }
    let pack =
        |n0: usize, nn: usize, k0: usize, kc: usize, dst: &mut [f32], _tmp: &mut Vec<f32>| {
            for j in 0..nn {
                let src = &b[(n0 + j) * ldb + k0..(n0 + j) * ldb + k0 + kc];
                for (kk, &v) in src.iter().enumerate() {
                    dst[kk * NR + j] = v;
                }
            }
        };
    gemm_f32_serial(m, n, k, a, lda, c, ldc, 0..n.div_ceil(NR), &pack);
}

type PackF32<'a> = dyn Fn(usize, usize, usize, usize, &mut [f32], &mut Vec<f32>) + Sync + 'a;
type PackBf16<'a> = dyn Fn(usize, usize, usize, usize, &mut [u16], &mut Vec<f32>) + Sync + 'a;

fn gemm_f32(
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    lda: usize,
    c: &mut [f32],
    ldc: usize,
    pack: &PackF32,
) {
    let panels = n.div_ceil(NR);
    let cp = Ptr(c.as_mut_ptr());
    let clen = c.len();
    pool().for_range(panels, 1, |pr| {
        let c = unsafe { std::slice::from_raw_parts_mut(cp.get(), clen) };
        gemm_f32_serial(m, n, k, a, lda, c, ldc, pr, pack);
    });
}

fn gemm_f32_serial(
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    lda: usize,
    c: &mut [f32],
    ldc: usize,
    panels: Range<usize>,
    pack: &PackF32,
) {
    let mut bp = vec![0f32; KC_F32 * NR];
    let mut tmp = Vec::new();
    let isa = isa();
    for p in panels {
        let n0 = p * NR;
        let nn = NR.min(n - n0);
        let mut k0 = 0;
        while k0 < k {
            let kc = KC_F32.min(k - k0);
            if nn < NR {
                bp.fill(0.0);
            }
            pack(n0, nn, k0, kc, &mut bp, &mut tmp);
            let mut i = 0;
            while i < m {
                let mr = MR.min(m - i);
                let ap = &a[i * lda + k0..];
                let cpn = &mut c[i * ldc + n0..];
                match isa {
                    #[cfg(target_arch = "x86_64")]
                    Isa::Avx512 => unsafe {
                        avx512::kern_f32_dispatch(
                            mr,
                            kc,
                            ap.as_ptr(),
                            lda,
                            bp.as_ptr(),
                            cpn.as_mut_ptr(),
                            ldc,
                            nn,
                            k0 > 0,
                        )
                    },
                    #[cfg(target_arch = "x86_64")]
                    Isa::Avx2 => unsafe {
                        avx2::kern_f32_dispatch(
                            mr,
                            kc,
                            ap.as_ptr(),
                            lda,
                            bp.as_ptr(),
                            cpn.as_mut_ptr(),
                            ldc,
                            nn,
                            k0 > 0,
                        )
                    },
                    _ => kern_scalar(mr, kc, nn, |r, kk| ap[r * lda + kk], &bp, cpn, ldc, k0 > 0),
                }
                i += mr;
            }
            k0 += kc;
        }
    }
}

fn kern_scalar(
    mr: usize,
    kc: usize,
    nn: usize,
    a: impl Fn(usize, usize) -> f32,
    bp: &[f32],
    c: &mut [f32],
    ldc: usize,
    acc: bool,
) {
    for r in 0..mr {
        for j in 0..nn {
            let mut s = if acc { c[r * ldc + j] } else { 0.0 };
            for kk in 0..kc {
                s += a(r, kk) * bp[kk * NR + j];
            }
            c[r * ldc + j] = s;
        }
    }
}

fn gemm_bf16(
    m: usize,
    n: usize,
    k: usize,
    a: &[u16],
    lda: usize,
    c: &mut [f32],
    ldc: usize,
    pack: &PackBf16,
) {
    let panels = n.div_ceil(NR);
    let cp = Ptr(c.as_mut_ptr());
    let clen = c.len();
    pool().for_range(panels, 1, |pr| {
        let c = unsafe { std::slice::from_raw_parts_mut(cp.get(), clen) };
        let mut bp = vec![0u16; KC_BF16 * NR];
        let mut tmp = Vec::new();
        for p in pr {
            let n0 = p * NR;
            let nn = NR.min(n - n0);
            let mut k0 = 0;
            while k0 < k {
                let kc = KC_BF16.min(k - k0);
                let kcp = kc.next_multiple_of(2);
                if nn < NR || kcp != kc {
                    bp.fill(0);
                }
                pack(n0, nn, k0, kc, &mut bp, &mut tmp);
                let mut i = 0;
                while i < m {
                    let mr = MR.min(m - i);
                    #[cfg(target_arch = "x86_64")]
                    unsafe {
                        avx512::kern_bf16_dispatch(
                            mr,
                            kcp / 2,
                            a.as_ptr().add(i * lda + k0),
                            lda,
                            bp.as_ptr(),
                            c.as_mut_ptr().add(i * ldc + n0),
                            ldc,
                            nn,
                            k0 > 0,
                        )
                    };
                    i += mr;
                }
                k0 += kc;
            }
        }
    });
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::NR;
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
    pub unsafe fn to_bf16(x: &[f32], out: &mut [u16]) {
        unsafe {
            let n = x.len().min(out.len());
            let mut i = 0;
            while i < n {
                let m: __mmask16 = if n - i >= 16 {
                    !0
                } else {
                    (1u16 << (n - i)) - 1
                };
                let v = _mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(m, x.as_ptr().add(i)));
                _mm256_mask_storeu_epi16(
                    out.as_mut_ptr().add(i) as *mut i16,
                    m,
                    std::mem::transmute::<__m256bh, __m256i>(v),
                );
                i += 16;
            }
        }
    }

    /// Calls the micro-kernel instantiated for the tile's row count (1..=8).
    macro_rules! by_rows {
        ($mr:expr, $k:ident, $($arg:expr),*) => {
            match $mr {
                8 => $k::<8>($($arg),*),
                7 => $k::<7>($($arg),*),
                6 => $k::<6>($($arg),*),
                5 => $k::<5>($($arg),*),
                4 => $k::<4>($($arg),*),
                3 => $k::<3>($($arg),*),
                2 => $k::<2>($($arg),*),
                _ => $k::<1>($($arg),*),
            }
        };
    }

    pub unsafe fn kern_f32_dispatch(
        mr: usize,
        kc: usize,
        a: *const f32,
        lda: usize,
        b: *const f32,
        c: *mut f32,
        ldc: usize,
        nn: usize,
        acc: bool,
    ) {
        unsafe { by_rows!(mr, kern_f32, kc, a, lda, b, c, ldc, nn, acc) }
    }

    #[inline(always)]
    unsafe fn store_tile<const M: usize>(
        acc: &[[__m512; 3]; M],
        c: *mut f32,
        ldc: usize,
        nn: usize,
        add: bool,
    ) {
        unsafe {
            for r in 0..M {
                for v in 0..3 {
                    let lo = 16 * v;
                    if lo >= nn {
                        break;
                    }
                    let m: __mmask16 = if nn - lo >= 16 {
                        !0
                    } else {
                        (1u16 << (nn - lo)) - 1
                    };
                    let p = c.add(r * ldc + lo);
                    let mut x = acc[r][v];
                    if add {
                        x = _mm512_add_ps(x, _mm512_maskz_loadu_ps(m, p));
                    }
                    _mm512_mask_storeu_ps(p, m, x);
                }
            }
        }
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,fma")]
    unsafe fn kern_f32<const M: usize>(
        kc: usize,
        a: *const f32,
        lda: usize,
        b: *const f32,
        c: *mut f32,
        ldc: usize,
        nn: usize,
        add: bool,
    ) {
        unsafe {
            let mut acc = [[_mm512_setzero_ps(); 3]; M];
            for kk in 0..kc {
                let bp = b.add(kk * NR);
                let b0 = _mm512_loadu_ps(bp);
                let b1 = _mm512_loadu_ps(bp.add(16));
                let b2 = _mm512_loadu_ps(bp.add(32));
                for r in 0..M {
                    let av = _mm512_set1_ps(*a.add(r * lda + kk));
                    acc[r][0] = _mm512_fmadd_ps(av, b0, acc[r][0]);
                    acc[r][1] = _mm512_fmadd_ps(av, b1, acc[r][1]);
                    acc[r][2] = _mm512_fmadd_ps(av, b2, acc[r][2]);
                }
            }
            store_tile::<M>(&acc, c, ldc, nn, add);
        }
    }

    pub unsafe fn kern_bf16_dispatch(
        mr: usize,
        kp: usize,
        a: *const u16,
        lda: usize,
        b: *const u16,
        c: *mut f32,
        ldc: usize,
        nn: usize,
        acc: bool,
    ) {
        unsafe { by_rows!(mr, kern_bf16, kp, a, lda, b, c, ldc, nn, acc) }
    }

    /// kp = number of k pairs; A rows are bf16 with pairs adjacent; B packed [kp][NR][2].
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16,fma")]
    unsafe fn kern_bf16<const M: usize>(
        kp: usize,
        a: *const u16,
        lda: usize,
        b: *const u16,
        c: *mut f32,
        ldc: usize,
        nn: usize,
        add: bool,
    ) {
        unsafe {
            let mut acc = [[_mm512_setzero_ps(); 3]; M];
            for kk in 0..kp {
                let bp = b.add(kk * 2 * NR);
                let b0: __m512bh = std::mem::transmute(_mm512_loadu_si512(bp as *const _));
                let b1: __m512bh = std::mem::transmute(_mm512_loadu_si512(bp.add(32) as *const _));
                let b2: __m512bh = std::mem::transmute(_mm512_loadu_si512(bp.add(64) as *const _));
                for r in 0..M {
                    let pair = std::ptr::read_unaligned(a.add(r * lda + 2 * kk) as *const i32);
                    let av: __m512bh = std::mem::transmute(_mm512_set1_epi32(pair));
                    acc[r][0] = _mm512_dpbf16_ps(acc[r][0], av, b0);
                    acc[r][1] = _mm512_dpbf16_ps(acc[r][1], av, b1);
                    acc[r][2] = _mm512_dpbf16_ps(acc[r][2], av, b2);
                }
            }
            store_tile::<M>(&acc, c, ldc, nn, add);
        }
    }
}

/// AVX2 + FMA f32 micro-kernel: the 48-column panel in two halves of 24 (3 ymm), 4 rows.
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::NR;
    use std::arch::x86_64::*;

    pub unsafe fn kern_f32_dispatch(
        mr: usize,
        kc: usize,
        a: *const f32,
        lda: usize,
        b: *const f32,
        c: *mut f32,
        ldc: usize,
        nn: usize,
        acc: bool,
    ) {
        unsafe {
            let mut r = 0;
            while r < mr {
                let (ar, cr) = (a.add(r * lda), c.add(r * ldc));
                for h in 0..2 {
                    if 24 * h >= nn {
                        break;
                    }
                    let (bh, ch, nh) = (b.add(24 * h), cr.add(24 * h), (nn - 24 * h).min(24));
                    match mr - r {
                        1 => kern::<1>(kc, ar, lda, bh, ch, ldc, nh, acc),
                        2 => kern::<2>(kc, ar, lda, bh, ch, ldc, nh, acc),
                        3 => kern::<3>(kc, ar, lda, bh, ch, ldc, nh, acc),
                        _ => kern::<4>(kc, ar, lda, bh, ch, ldc, nh, acc),
                    }
                }
                r += 4;
            }
        }
    }

    #[target_feature(enable = "avx2,fma")]
    unsafe fn kern<const M: usize>(
        kc: usize,
        a: *const f32,
        lda: usize,
        b: *const f32,
        c: *mut f32,
        ldc: usize,
        nn: usize,
        add: bool,
    ) {
        unsafe {
            let mut acc = [[_mm256_setzero_ps(); 3]; M];
            for kk in 0..kc {
                let bp = b.add(kk * NR);
                let b0 = _mm256_loadu_ps(bp);
                let b1 = _mm256_loadu_ps(bp.add(8));
                let b2 = _mm256_loadu_ps(bp.add(16));
                for r in 0..M {
                    let av = _mm256_set1_ps(*a.add(r * lda + kk));
                    acc[r][0] = _mm256_fmadd_ps(av, b0, acc[r][0]);
                    acc[r][1] = _mm256_fmadd_ps(av, b1, acc[r][1]);
                    acc[r][2] = _mm256_fmadd_ps(av, b2, acc[r][2]);
                }
            }
            for r in 0..M {
                let mut tmp = [0f32; 24];
                for v in 0..3 {
                    _mm256_storeu_ps(tmp.as_mut_ptr().add(8 * v), acc[r][v]);
                }
                let row = c.add(r * ldc);
                for j in 0..nn {
                    *row.add(j) = if add { *row.add(j) + tmp[j] } else { tmp[j] };
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::test_rnd as rnd;
    use crate::tensor::Tensor;

    #[test]
    fn matmul_matches_reference_on_segments() {
        // BF16 packs whole pairs straight from the rows when every segment is on pairs (the
        // first two), else through a gathered row; k crosses the 512-value chunks.
        let cases: [(DType, usize, Vec<std::ops::Range<usize>>); 5] = [
            (DType::F32, 70, vec![0..10, 30..70]),
            // Segments across the k blocks of the F32 kernel (KC_F32).
            (DType::F32, 700, vec![0..100, 200..530, 540..700]),
            (DType::BF16, 1100, vec![0..10, 30..1100]),
            (DType::BF16, 1100, vec![0..600, 700..1100]),
            (DType::BF16, 1100, vec![1..10, 31..1100]),
        ];
        for (dt, k, cols) in cases {
            let (n, t) = (100, 11);
            let mut wv = rnd(n * k, 1);
            let w = if dt == DType::BF16 {
                wv.iter_mut()
                    .for_each(|v| *v = half::bf16::from_f32(*v).to_f32());
                let b: Vec<u8> = wv
                    .iter()
                    .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
                    .collect();
                Tensor::new("w", dt, vec![n, k], crate::tensor::Buf::Owned(b.into())).unwrap()
            } else {
                Tensor::from_f32("w", vec![n, k], &wv)
            };
            let rows = [3..20, 40..97];
            let (kk, nn) = (seg_len(&cols), seg_len(&rows));
            let x = rnd(t * kk, 2);
            let mut y = vec![0f32; t * nn];
            matmul(&w, &rows, &cols, &x, &mut y);
            let rl: Vec<usize> = rows.iter().flat_map(|r| r.clone()).collect();
            let cl: Vec<usize> = cols.iter().flat_map(|r| r.clone()).collect();
            // bf16 activations on AVX-512: a relative error of 2⁻⁸ per product at most.
            let tol = if dt == DType::BF16 { 4e-3 } else { 1e-5 };
            for ti in 0..t {
                let mut yv = vec![0f32; nn];
                crate::kernels::gemv::matvec(&w, &rows, &cols, &x[ti * kk..(ti + 1) * kk], &mut yv);
                for (j, &r) in rl.iter().enumerate() {
                    let (mut want, mut mag) = (0f64, 0f64);
                    for (i, &c) in cl.iter().enumerate() {
                        let p = wv[r * k + c] as f64 * x[ti * kk + i] as f64;
                        want += p;
                        mag += p.abs();
                    }
                    let got = y[ti * nn + j] as f64;
                    assert!(
                        (got - want).abs() <= tol * mag + 1e-6,
                        "{dt} {cols:?} t{ti} r{r}: {got} vs {want}"
                    );
                    assert!((yv[j] as f64 - want).abs() <= tol * mag + 1e-6);
                }
            }
        }
    }
}
