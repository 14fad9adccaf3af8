//! Block formats (GGUF/ggml layouts) and their scalar reference dequantization, plus the
//! per-token q8 quantization of activations used by the integer dot products.

use super::fp;
use crate::tensor::{DType, Tensor};
use half::{bf16, f16};

#[inline]
pub fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_bits(u16::from_le_bytes([b[i], b[i + 1]])).to_f32()
}
#[inline]
pub fn bf16_to_f32(bits: u16) -> f32 {
    f32::from_bits((bits as u32) << 16)
}
/// Round-to-nearest-even f32 -> bf16 (what vcvtneps2bf16 does; NaN kept quiet).
#[inline]
pub fn f32_to_bf16(x: f32) -> u16 {
    bf16::from_f32(x).to_bits()
}

/// The 6-bit scale and min of sub-block `j` of a Q4_K/Q5_K super-block (ggml's get_scale_min_k4).
#[inline(always)]
pub(crate) fn k4_scale_min(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// Dequantizes one block (`block_len` values) into `out`.
pub fn dequant_block(dtype: DType, b: &[u8], out: &mut [f32]) {
    match dtype {
        DType::F32 => out[0] = f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
        DType::F16 => out[0] = f16_at(b, 0),
        DType::BF16 => out[0] = bf16_to_f32(u16::from_le_bytes([b[0], b[1]])),
        DType::F8E4M3 => out[0] = fp::e4m3_to_f32(b[0]),
        DType::Nvfp4 => {
            for (i, o) in out.iter_mut().enumerate().take(16) {
                *o = fp::nvfp4_at(b, i);
            }
        }
        DType::Q8_0 => {
            let d = f16_at(b, 0);
            for i in 0..32 {
                out[i] = d * (b[2 + i] as i8) as f32;
            }
        }
        DType::Q4_0 => {
            let d = f16_at(b, 0);
            for i in 0..16 {
                out[i] = d * ((b[2 + i] & 0xF) as i32 - 8) as f32;
                out[i + 16] = d * ((b[2 + i] >> 4) as i32 - 8) as f32;
            }
        }
        DType::Q4_1 => {
            let (d, m) = (f16_at(b, 0), f16_at(b, 2));
            for i in 0..16 {
                out[i] = d * (b[4 + i] & 0xF) as f32 + m;
                out[i + 16] = d * (b[4 + i] >> 4) as f32 + m;
            }
        }
        DType::Q5_0 | DType::Q5_1 => {
            let q51 = dtype == DType::Q5_1;
            let d = f16_at(b, 0);
            let (m, o) = if q51 { (f16_at(b, 2), 4) } else { (0.0, 2) };
            let qh = u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
            let qs = &b[o + 4..o + 20];
            let off = if q51 { 0 } else { 16 };
            for j in 0..16 {
                let h0 = ((qh >> j) << 4) & 0x10;
                let h1 = (qh >> (j + 12)) & 0x10;
                let x0 = ((qs[j] as u32 & 0x0F) | h0) as i32 - off;
                let x1 = ((qs[j] as u32 >> 4) | h1) as i32 - off;
                out[j] = d * x0 as f32 + m;
                out[j + 16] = d * x1 as f32 + m;
            }
        }
        DType::Q5K => {
            let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
            let scales = &b[4..16];
            let qh = &b[16..48];
            let ql = &b[48..176];
            for j in 0..4 {
                let (s1, m1) = k4_scale_min(2 * j, scales);
                let (s2, m2) = k4_scale_min(2 * j + 1, scales);
                let (u1, u2) = (1u8 << (2 * j), 2u8 << (2 * j));
                let q = &ql[32 * j..32 * j + 32];
                for l in 0..32 {
                    let hi1 = if qh[l] & u1 != 0 { 16.0 } else { 0.0 };
                    let hi2 = if qh[l] & u2 != 0 { 16.0 } else { 0.0 };
                    out[64 * j + l] =
                        d * s1 as f32 * ((q[l] & 0xF) as f32 + hi1) - dmin * m1 as f32;
                    out[64 * j + 32 + l] =
                        d * s2 as f32 * ((q[l] >> 4) as f32 + hi2) - dmin * m2 as f32;
                }
            }
        }
        DType::Q4K => {
            let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
            let scales = &b[4..16];
            let qs = &b[16..144];
            for j in 0..4 {
                let (s1, m1) = k4_scale_min(2 * j, scales);
                let (s2, m2) = k4_scale_min(2 * j + 1, scales);
                let q = &qs[32 * j..32 * j + 32];
                for l in 0..32 {
                    out[64 * j + l] = d * s1 as f32 * (q[l] & 0xF) as f32 - dmin * m1 as f32;
                    out[64 * j + 32 + l] = d * s2 as f32 * (q[l] >> 4) as f32 - dmin * m2 as f32;
                }
            }
        }
        DType::Q6K => {
            let (ql, qh) = (&b[0..128], &b[128..192]);
            let sc = &b[192..208];
            let d = f16_at(b, 208);
            for n in 0..2 {
                let (ql, qh, sc, y) = (
                    &ql[64 * n..],
                    &qh[32 * n..],
                    &sc[8 * n..],
                    &mut out[128 * n..],
                );
                for l in 0..32 {
                    let is = l / 16;
                    let q1 = ((ql[l] & 0xF) | ((qh[l] & 3) << 4)) as i32 - 32;
                    let q2 = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
                    let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
                    let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
                    y[l] = d * (sc[is] as i8) as f32 * q1 as f32;
                    y[l + 32] = d * (sc[is + 2] as i8) as f32 * q2 as f32;
                    y[l + 64] = d * (sc[is + 4] as i8) as f32 * q3 as f32;
                    y[l + 96] = d * (sc[is + 6] as i8) as f32 * q4 as f32;
                }
            }
        }
    }
}

/// Dequantizes `out.len()` values of a row starting at column `col0` (a multiple of the block
/// length). The stored values: FP8 and NVFP4 tensors' per-tensor `scale` is not applied.
pub fn dequant_row(dtype: DType, row: &[u8], col0: usize, out: &mut [f32]) {
    match dtype {
        DType::F32 => {
            for (i, o) in out.iter_mut().enumerate() {
                let p = 4 * (col0 + i);
                *o = f32::from_le_bytes([row[p], row[p + 1], row[p + 2], row[p + 3]]);
            }
        }
        DType::BF16 => {
            for (i, o) in out.iter_mut().enumerate() {
                let p = 2 * (col0 + i);
                *o = bf16_to_f32(u16::from_le_bytes([row[p], row[p + 1]]));
            }
        }
        DType::F16 => {
            for (i, o) in out.iter_mut().enumerate() {
                *o = f16_at(row, 2 * (col0 + i));
            }
        }
        DType::F8E4M3 => {
            for (o, &b) in out.iter_mut().zip(&row[col0..]) {
                *o = fp::e4m3_to_f32(b);
            }
        }
        _ => {
            let (bl, bb) = (dtype.block_len(), dtype.block_bytes());
            debug_assert_eq!(col0 % bl, 0);
            let mut tmp = [0f32; 256];
            let mut i = 0;
            while i < out.len() {
                let blk = (col0 + i) / bl;
                dequant_block(dtype, &row[blk * bb..(blk + 1) * bb], &mut tmp[..bl]);
                let n = bl.min(out.len() - i);
                out[i..i + n].copy_from_slice(&tmp[..n]);
                i += n;
            }
        }
    }
}

/// Activations quantized to int8 in blocks of 32 (ggml's q8_1 idea): x ≈ d_b · q.
/// `sum[b]` is Σ q over block b, used for the offsets of Q4_0/Q4_1 and the sign trick of Q8_0.
#[derive(Default)]
pub struct Q8Act {
    pub q: Vec<i8>,
    pub d: Vec<f32>,
    pub sum: Vec<i32>,
}

impl Q8Act {
    /// Quantizes `x`, whose length is a multiple of 16: a final half block (NVFP4 widths) is
    /// padded with zeros.
    pub fn quantize(&mut self, x: &[f32]) {
        debug_assert_eq!(x.len() % 16, 0);
        let nb = x.len().div_ceil(32);
        self.q.resize(32 * nb, 0);
        self.d.resize(nb, 0.0);
        self.sum.resize(nb, 0);
        for b in 0..nb {
            let xs = &x[32 * b..(32 * b + 32).min(x.len())];
            let amax = xs.iter().fold(0f32, |m, v| m.max(v.abs()));
            let d = amax / 127.0;
            let id = if d > 0.0 { 1.0 / d } else { 0.0 };
            let mut s = 0i32;
            for (i, &v) in xs.iter().enumerate() {
                // Round half to even by the 1.5·2²³ trick (|v·id| ≤ 127), as ggml's SIMD paths
                // round; plain adds vectorize where `round` is a libm call per value.
                const MAGIC: f32 = 12582912.0;
                let q = ((v * id + MAGIC) - MAGIC) as i32;
                self.q[32 * b + i] = q as i8;
                s += q;
            }
            self.q[32 * b + xs.len()..32 * b + 32].fill(0);
            self.d[b] = d;
            self.sum[b] = s;
        }
    }

    /// Reorders the values for NVFP4 weights, 128 at a time (8 blocks of 16, b0..b7), as their
    /// nibbles come out of the blocks' bytes: values 0..8 of b0..b7, then values 8..16 of b0..b7.
    /// Pads to a whole 128 (d of the padding is 0).
    pub fn interleave128(&mut self) {
        let n = self.q.len().next_multiple_of(128);
        self.q.resize(n, 0);
        self.d.resize(n / 32, 0.0);
        self.sum.resize(n / 32, 0);
        for b in self.q.chunks_exact_mut(128) {
            let mut t = [0i8; 128];
            for blk in 0..8 {
                t[8 * blk..8 * blk + 8].copy_from_slice(&b[16 * blk..16 * blk + 8]);
                t[64 + 8 * blk..72 + 8 * blk].copy_from_slice(&b[16 * blk + 8..16 * blk + 16]);
            }
            b.copy_from_slice(&t);
        }
    }
}

/// All elements of a tensor as f32 (for small tensors: norms, biases, per-head scalars).
pub trait ToF32 {
    fn to_f32(&self) -> Vec<f32>;
}

impl ToF32 for Tensor {
    /// The values, with the per-tensor scale applied.
    fn to_f32(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.numel()];
        let cols = self.cols();
        for r in 0..self.rows() {
            dequant_row(
                self.dtype,
                self.row(r),
                0,
                &mut out[r * cols..(r + 1) * cols],
            );
        }
        if self.scale != 1.0 {
            out.iter_mut().for_each(|v| *v *= self.scale);
        }
        out
    }
}

/// The block format a re-ordered quantized tensor is written in: its own for the 32-element
/// formats; Q8_0 for the K-quants (their quantizers are not implemented; Q8_0 is finer).
pub fn requant_type(dtype: DType) -> DType {
    match dtype {
        DType::Q4K | DType::Q5K | DType::Q6K => DType::Q8_0,
        d => d,
    }
}

/// Whether [`quantize_row`] can write this format.
pub fn can_quantize(dtype: DType) -> bool {
    matches!(
        dtype,
        DType::Q8_0 | DType::Q4_0 | DType::Q4_1 | DType::Q5_0 | DType::Q5_1
    )
}

/// Quantizes `x` (a whole number of 32-value blocks) into `out` with ggml's reference rounding
/// (`quantize_row_*_ref`, which gguf-py reproduces bit for bit).
pub fn quantize_row(dtype: DType, x: &[f32], out: &mut Vec<u8>) {
    assert!(can_quantize(dtype) && x.len().is_multiple_of(32));
    let f16b = |v: f32| f16::from_f32(v).to_le_bytes();
    for b in x.chunks_exact(32) {
        match dtype {
            DType::Q8_0 => {
                let amax = b.iter().fold(0f32, |m, v| m.max(v.abs()));
                let d = amax / 127.0;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                out.extend_from_slice(&f16b(d));
                out.extend(b.iter().map(|v| (v * id).round() as i8 as u8));
            }
            DType::Q4_0 | DType::Q5_0 => {
                // The value of largest magnitude (the first one on ties) maps to -8 / -16.
                let (mut amax, mut max) = (0f32, 0f32);
                for &v in b {
                    if v.abs() > amax {
                        amax = v.abs();
                        max = v;
                    }
                }
                let five = dtype == DType::Q5_0;
                let (lv, top) = if five { (-16.0, 31) } else { (-8.0, 15) };
                let d = max / lv;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                let q: Vec<u8> = b
                    .iter()
                    .map(|v| ((v * id + (-lv + 0.5)).trunc() as i32).clamp(0, top) as u8)
                    .collect();
                out.extend_from_slice(&f16b(d));
                push_nibbles(&q, five, out);
            }
            _ => {
                let min = b.iter().fold(f32::INFINITY, |m, &v| m.min(v));
                let max = b.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
                let five = dtype == DType::Q5_1;
                let top = if five { 31 } else { 15 };
                let d = (max - min) / top as f32;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                let q: Vec<u8> = b
                    .iter()
                    .map(|v| (((v - min) * id + 0.5).trunc() as i32).clamp(0, top) as u8)
                    .collect();
                out.extend_from_slice(&f16b(d));
                out.extend_from_slice(&f16b(min));
                push_nibbles(&q, five, out);
            }
        }
    }
}

/// Packs 32 quants: (Q5: the fifth bits as a little-endian u32, then) low nibbles of values i and
/// i + 16 in byte i.
fn push_nibbles(q: &[u8], five: bool, out: &mut Vec<u8>) {
    if five {
        let qh = (0..32).fold(0u32, |h, j| h | (((q[j] >> 4) as u32 & 1) << j));
        out.extend_from_slice(&qh.to_le_bytes());
    }
    out.extend((0..16).map(|i| (q[i] & 0xF) | ((q[i + 16] & 0xF) << 4)));
}

/// Like [`quantize_row`], but each block takes the scale (and minimum) that minimises its squared
/// error among the reference choice and a small search around it (least-squares refits of the
/// reference's range scaled by 0.8 .. 1.2), measured after the f16 rounding of the scales. Never
/// worse than the reference block by block; what elastify writes, since re-ordering puts values of
/// different original blocks together and the reference min/max rule then wastes levels on
/// outliers. `w` (one weight per value, e.g. the mean square of the matrix's input channel on
/// calibration text, as llama.cpp's imatrix) makes the error Σ wⱼ(xⱼ − qⱼ)²; `None`: all 1.
pub fn quantize_row_best(dtype: DType, x: &[f32], w: Option<&[f32]>, out: &mut Vec<u8>) {
    if dtype == DType::Q8_0 {
        return quantize_row(dtype, x, out);
    }
    let bb = dtype.block_bytes();
    let mut cand = Vec::with_capacity(bb);
    let mut best = Vec::with_capacity(bb);
    let mut y = [0f32; 32];
    for (i, b) in x.chunks_exact(32).enumerate() {
        // A block weighted all zero (channels never active) falls back to the plain error.
        let wb = w
            .map(|w| &w[32 * i..32 * i + 32])
            .filter(|w| w.iter().any(|&v| v > 0.0))
            .unwrap_or(&[1.0; 32]);
        best.clear();
        quantize_row(dtype, b, &mut best);
        dequant_block(dtype, &best, &mut y);
        let mut best_err = sse(b, &y, wb);
        if best_err == 0.0 {
            out.extend_from_slice(&best);
            continue;
        }
        for i in 0..=8 {
            let f = 0.8 + 0.05 * i as f32;
            cand.clear();
            encode_scaled(dtype, b, wb, f, &mut cand);
            dequant_block(dtype, &cand, &mut y);
            let e = sse(b, &y, wb);
            if e < best_err {
                best_err = e;
                std::mem::swap(&mut best, &mut cand);
            }
        }
        out.extend_from_slice(&best);
    }
}

fn sse(a: &[f32], b: &[f32], w: &[f32]) -> f64 {
    a.iter()
        .zip(b)
        .zip(w)
        .map(|((x, y), w)| *w as f64 * ((x - y) as f64).powi(2))
        .sum()
}

/// One block with the reference's step scaled by `f`, then the scale (and minimum) refitted by
/// (weighted) least squares to the levels chosen.
fn encode_scaled(dtype: DType, b: &[f32], w: &[f32], f: f32, out: &mut Vec<u8>) {
    let offset = matches!(dtype, DType::Q4_1 | DType::Q5_1);
    let five = matches!(dtype, DType::Q5_0 | DType::Q5_1);
    let top: i32 = if five { 31 } else { 15 };
    let f16r = |v: f32| f16::from_f32(v).to_f32();
    let mut q = [0u8; 32];
    let (d, m) = if offset {
        let min = b.iter().fold(f32::INFINITY, |m, &v| m.min(v));
        let max = b.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
        let d = f * (max - min) / top as f32;
        // Centre the (possibly narrower) grid on the values' range.
        let m = min + 0.5 * ((max - min) - d * top as f32);
        let assign = |d: f32, m: f32, q: &mut [u8; 32]| {
            for (qi, &v) in q.iter_mut().zip(b) {
                *qi = if d > 0.0 {
                    ((v - m) / d).round().clamp(0.0, top as f32) as u8
                } else {
                    0
                };
            }
        };
        assign(d, m, &mut q);
        // Least squares of v ≈ d·q + m over the block.
        let (mut n, mut sq, mut sqq, mut sv, mut sqv) = (0f64, 0f64, 0f64, 0f64, 0f64);
        for ((&qi, &v), &wi) in q.iter().zip(b).zip(w) {
            let (qf, vf, wf) = (qi as f64, v as f64, wi as f64);
            n += wf;
            sq += wf * qf;
            sqq += wf * qf * qf;
            sv += wf * vf;
            sqv += wf * qf * vf;
        }
        let det = n * sqq - sq * sq;
        let (d, m) = if det > 0.0 {
            (
                ((n * sqv - sq * sv) / det) as f32,
                ((sqq * sv - sq * sqv) / det) as f32,
            )
        } else {
            (d, m)
        };
        let (d, m) = (f16r(d.max(0.0)), f16r(m));
        assign(d, m, &mut q);
        (d, m)
    } else {
        let (mut amax, mut max) = (0f32, 0f32);
        for &v in b {
            if v.abs() > amax {
                amax = v.abs();
                max = v;
            }
        }
        let half = (top + 1) / 2;
        let assign = |d: f32, q: &mut [u8; 32]| {
            for (qi, &v) in q.iter_mut().zip(b) {
                *qi = if d != 0.0 {
                    ((v / d).round() + half as f32).clamp(0.0, top as f32) as u8
                } else {
                    half as u8
                };
            }
        };
        let d = f * max / -(half as f32);
        assign(d, &mut q);
        let (mut num, mut den) = (0f64, 0f64);
        for ((&qi, &v), &wi) in q.iter().zip(b).zip(w) {
            let l = qi as f64 - half as f64;
            num += wi as f64 * l * v as f64;
            den += wi as f64 * l * l;
        }
        let d = f16r(if den > 0.0 { (num / den) as f32 } else { d });
        assign(d, &mut q);
        (d, 0.0)
    };
    out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
    if offset {
        out.extend_from_slice(&f16::from_f32(m).to_le_bytes());
    }
    push_nibbles(&q, five, out);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A heavily weighted value (an input channel with large activations) is kept closer than
    /// the plain search keeps it, and the weighted error of the whole row drops.
    #[test]
    fn weighted_search_favours_heavy_channels() {
        let x: Vec<f32> = (0..64)
            .map(|i| ((i * 37 % 64) as f32 / 64.0 - 0.5) * if i == 9 { 3.0 } else { 1.0 })
            .collect();
        let mut w = vec![1.0f32; 64];
        w[9] = 1000.0;
        w[40] = 500.0;
        for dt in [DType::Q4_0, DType::Q4_1, DType::Q5_0, DType::Q5_1] {
            let (mut plain, mut weighted) = (vec![], vec![]);
            quantize_row_best(dt, &x, None, &mut plain);
            quantize_row_best(dt, &x, Some(&w), &mut weighted);
            let (mut yp, mut yw) = (vec![0f32; 64], vec![0f32; 64]);
            dequant_row(dt, &plain, 0, &mut yp);
            dequant_row(dt, &weighted, 0, &mut yw);
            let (ep, ew) = (sse(&x, &yp, &w), sse(&x, &yw, &w));
            assert!(ew < 0.5 * ep, "{dt}: weighted error {ew} vs plain {ep}");
            for j in [9, 40] {
                assert!(
                    (x[j] - yw[j]).abs() < (x[j] - yp[j]).abs(),
                    "{dt}: value {j} not kept closer"
                );
            }
        }
    }
}
