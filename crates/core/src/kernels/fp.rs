//! FP8 (E4M3) and NVFP4 (E2M1 values, E4M3 scale per 16) codecs and the ModelOpt quantizers
//! (serving-and-quant-conventions §4; method doc §6):
//! - FP8: `weight_scale = amax / 448`, `q = e4m3(w / weight_scale)`;
//! - NVFP4: `weight_scale_2 = amax / (6 · 448)`, per block of 16
//!   `weight_scale = e4m3(block_amax / 6 / weight_scale_2)`,
//!   `q = e2m1(w / (weight_scale · weight_scale_2))`.
//!
//! Dequantization is `e4m3(q) · weight_scale` and `e2m1(q) · e4m3(weight_scale) · weight_scale_2`,
//! the products vLLM's ModelOpt loader forms; the per-tensor factor is [`Tensor::scale`].
//!
//! [`Tensor::scale`]: crate::tensor::Tensor::scale

/// Largest finite E4M3 (fn) value.
pub const E4M3_MAX: f32 = 448.0;
/// Largest E2M1 value.
pub const E2M1_MAX: f32 = 6.0;
/// Values per NVFP4 block.
pub const NVFP4_BLOCK: usize = 16;

/// E2M1 code (bit 3 the sign) → value.
pub const E2M1: [f32; 16] = [
    0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0,
];

const fn e4m3_value(b: u8) -> f32 {
    let e = ((b >> 3) & 0xF) as u32;
    let m = (b & 7) as u32;
    let v = if e == 0xF && m == 7 {
        f32::NAN
    } else if e == 0 {
        m as f32 * (1.0 / 512.0) // subnormal: m/8 · 2⁻⁶
    } else {
        f32::from_bits(((e + 120) << 23) | (m << 20))
    };
    if b & 0x80 != 0 { -v } else { v }
}

const fn e4m3_table() -> [f32; 256] {
    let mut t = [0f32; 256];
    let mut i = 0;
    while i < 256 {
        t[i] = e4m3_value(i as u8);
        i += 1;
    }
    t
}

/// E4M3 (fn) byte → f32, exact; 0x7F/0xFF are NaN.
pub static E4M3: [f32; 256] = e4m3_table();

#[inline]
pub fn e4m3_to_f32(b: u8) -> f32 {
    E4M3[b as usize]
}

/// f32 → E4M3 (fn), round to nearest even, saturating at ±448 (ModelOpt clamps before the
/// cast). NaN maps to NaN (0x7F); callers reject NaN input first.
pub fn f32_to_e4m3(x: f32) -> u8 {
    if x.is_nan() {
        return 0x7F;
    }
    let sign = if x.is_sign_negative() { 0x80u8 } else { 0 };
    let a = x.abs();
    let code = if a >= E4M3_MAX {
        0x7E
    } else if a < 1.0 / 64.0 {
        // Subnormal range: multiples of 2⁻⁹ (8 · 2⁻⁹ is the smallest normal, code 0x08).
        (a * 512.0).round_ties_even() as u8
    } else {
        let bits = a.to_bits();
        let mut e = ((bits >> 23) & 0xFF) as i32 - 127 + 7;
        let m23 = bits & 0x7F_FFFF;
        let (mut q, rem) = (m23 >> 20, m23 & 0xF_FFFF);
        if rem > 0x8_0000 || (rem == 0x8_0000 && q & 1 == 1) {
            q += 1;
        }
        if q == 8 {
            q = 0;
            e += 1;
        }
        if e > 15 || (e == 15 && q == 7) {
            0x7E
        } else {
            ((e as u32) << 3 | q) as u8
        }
    };
    if code == 0 { 0 } else { sign | code }
}

/// f32 → E2M1 code, round to nearest with ties to the even code (ModelOpt's `cast_fp4`),
/// saturating at ±6.
pub fn f32_to_e2m1(x: f32) -> u8 {
    // Midpoints between consecutive magnitudes 0, 0.5, 1, 1.5, 2, 3, 4, 6.
    const MID: [f32; 7] = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0];
    let a = x.abs();
    let mut k = 0u8;
    for (i, &m) in MID.iter().enumerate() {
        // Above the midpoint, or on it when the upper code is even.
        if a > m || (a == m && (i + 1) % 2 == 0) {
            k = i as u8 + 1;
        }
    }
    if k != 0 && x.is_sign_negative() {
        k | 8
    } else {
        k
    }
}

/// The value of element `i` of an NVFP4 block before the per-tensor scale.
#[inline]
pub fn nvfp4_at(b: &[u8], i: usize) -> f32 {
    let q = if i < 8 {
        b[1 + i] & 0xF
    } else {
        b[1 + i - 8] >> 4
    };
    E2M1[q as usize] * E4M3[(b[0] & 0x7F) as usize]
}

/// Per-tensor FP8 scale of values with absolute maximum `amax` (1 for an all-zero tensor).
pub fn fp8_scale(amax: f32) -> f32 {
    if amax > 0.0 { amax / E4M3_MAX } else { 1.0 }
}

/// Per-tensor NVFP4 scale (`weight_scale_2`) of values with absolute maximum `amax`.
pub fn nvfp4_scale(amax: f32) -> f32 {
    if amax > 0.0 {
        amax / (E2M1_MAX * E4M3_MAX)
    } else {
        1.0
    }
}

/// Appends `x` as FP8 bytes under per-tensor `scale`.
pub fn quantize_fp8(x: &[f32], scale: f32, out: &mut Vec<u8>) {
    out.extend(x.iter().map(|&v| f32_to_e4m3(v / scale)));
}

/// Appends `x` (a whole number of 16-blocks) as NVFP4 blocks under per-tensor `scale2`.
pub fn quantize_nvfp4(x: &[f32], scale2: f32, out: &mut Vec<u8>) {
    debug_assert_eq!(x.len() % NVFP4_BLOCK, 0);
    for b in x.chunks(NVFP4_BLOCK) {
        let amax = b.iter().fold(0f32, |m, v| m.max(v.abs()));
        // ModelOpt: a zero block gets scale 1 (its values encode as 0 either way).
        let s = if amax > 0.0 {
            amax / E2M1_MAX / scale2
        } else {
            1.0
        };
        let sb = f32_to_e4m3(s) & 0x7F;
        let d = E4M3[sb as usize] * scale2;
        let q: [u8; 16] = std::array::from_fn(|i| if d > 0.0 { f32_to_e2m1(b[i] / d) } else { 0 });
        out.push(sb);
        out.extend((0..8).map(|i| q[i] | (q[i + 8] << 4)));
    }
}

/// The values `x` take stored as `to` (F8E4M3 or NVFP4) under per-tensor `scale` and read
/// back: quantization-aware training's forward (the bytes `quantize` would write, dequantized).
pub fn round_trip(to: crate::tensor::DType, x: &[f32], scale: f32) -> Vec<f32> {
    let mut b = Vec::with_capacity(x.len());
    match to {
        crate::tensor::DType::F8E4M3 => {
            quantize_fp8(x, scale, &mut b);
            b.iter().map(|&q| e4m3_to_f32(q) * scale).collect()
        }
        _ => {
            quantize_nvfp4(x, scale, &mut b);
            b.chunks_exact(9)
                .flat_map(|blk| (0..16).map(move |i| nvfp4_at(blk, i) * scale))
                .collect()
        }
    }
}

/// The per-tensor scale of `to` for values with absolute maximum `amax`.
pub fn scale_for(to: crate::tensor::DType, amax: f32) -> f32 {
    match to {
        crate::tensor::DType::F8E4M3 => fp8_scale(amax),
        _ => nvfp4_scale(amax),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn e4m3_table_matches_the_format() {
        // Known points of OCP E4M3 (fn): max 448, min normal 2⁻⁶, min subnormal 2⁻⁹.
        assert_eq!(e4m3_to_f32(0x7E), 448.0);
        assert_eq!(e4m3_to_f32(0xFE), -448.0);
        assert_eq!(e4m3_to_f32(0x08), 1.0 / 64.0);
        assert_eq!(e4m3_to_f32(0x01), 1.0 / 512.0);
        assert_eq!(e4m3_to_f32(0x38), 1.0);
        assert_eq!(e4m3_to_f32(0x3C), 1.5);
        assert!(e4m3_to_f32(0x7F).is_nan() && e4m3_to_f32(0xFF).is_nan());
        // Every finite code encodes back to itself (−0 becomes +0).
        for b in 0..=255u8 {
            let v = e4m3_to_f32(b);
            if v.is_nan() || b == 0x80 {
                continue;
            }
            assert_eq!(f32_to_e4m3(v), b, "code {b:#04x} = {v}");
        }
    }

    #[test]
    fn e4m3_rounds_to_nearest_even_and_saturates() {
        // Between 1.0 (m=0) and 1.125 (m=1): the midpoint goes to the even mantissa.
        assert_eq!(f32_to_e4m3(1.0625), 0x38);
        assert_eq!(f32_to_e4m3(1.0626), 0x39);
        // Between 1.125 and 1.25 the midpoint goes up to m=2.
        assert_eq!(f32_to_e4m3(1.1875), 0x3A);
        assert_eq!(f32_to_e4m3(1e9), 0x7E);
        assert_eq!(f32_to_e4m3(-1e9), 0xFE);
        assert_eq!(f32_to_e4m3(464.0), 0x7E);
        // Subnormal midpoint 1.5 · 2⁻⁹ goes to 2 · 2⁻⁹.
        assert_eq!(f32_to_e4m3(1.5 / 512.0), 0x02);
        assert_eq!(f32_to_e4m3(0.5 / 512.0), 0x00);
        // Rounding up across the subnormal/normal boundary.
        assert_eq!(f32_to_e4m3(7.6 / 512.0), 0x08);
        // Brute force against the nearest representable value.
        let finite: Vec<f32> = (0..0x7Fu8).map(e4m3_to_f32).collect();
        let mut s = 1u64;
        for _ in 0..20000 {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let x = ((s >> 40) as f32 / (1u64 << 24) as f32) * 460.0;
            let got = e4m3_to_f32(f32_to_e4m3(x));
            let best = finite
                .iter()
                .map(|v| (v - x).abs())
                .fold(f32::MAX, f32::min);
            assert!((got - x).abs() <= best, "{x}: got {got}");
        }
    }

    #[test]
    fn e2m1_rounds_ties_to_even_codes() {
        for (i, v) in E2M1.iter().enumerate() {
            if i != 8 {
                assert_eq!(f32_to_e2m1(*v), i as u8);
            }
        }
        assert_eq!(f32_to_e2m1(0.25), 0); // between codes 0 and 1
        assert_eq!(f32_to_e2m1(0.75), 2);
        assert_eq!(f32_to_e2m1(1.25), 2);
        assert_eq!(f32_to_e2m1(1.75), 4);
        assert_eq!(f32_to_e2m1(2.5), 4);
        assert_eq!(f32_to_e2m1(3.5), 6);
        assert_eq!(f32_to_e2m1(5.0), 6);
        assert_eq!(f32_to_e2m1(-5.1), 15);
        assert_eq!(f32_to_e2m1(100.0), 7);
    }

    #[test]
    fn nvfp4_blocks_round_trip_within_half_a_step() {
        let x = crate::kernels::test_rnd(64, 5);
        let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
        let s2 = nvfp4_scale(amax);
        let mut q = vec![];
        quantize_nvfp4(&x, s2, &mut q);
        assert_eq!(q.len(), 4 * 9);
        for (b, xs) in q.chunks(9).zip(x.chunks(16)) {
            let d = E4M3[b[0] as usize] * s2;
            for (i, &v) in xs.iter().enumerate() {
                let got = nvfp4_at(b, i) * s2;
                // The block maximum is exactly representable up to the scale's rounding.
                assert!((got - v).abs() <= 1.0 * d + 1e-6, "{v} -> {got} (step {d})");
            }
        }
    }
}
