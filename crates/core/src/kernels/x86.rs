//! Small x86 helpers shared by the SIMD kernels (inlined into their target-feature bodies).

use std::arch::x86_64::*;

/// The f16 at `b`, as f32 (F16C).
#[inline(always)]
pub(crate) unsafe fn f16s(b: *const u8) -> f32 {
    unsafe {
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(
            std::ptr::read_unaligned(b as *const u16) as i32,
        )))
    }
}

/// Sum of the 8 lanes, in one fixed order.
#[inline(always)]
pub(crate) unsafe fn hsum256(v: __m256) -> f32 {
    unsafe {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps(s, s, 1)))
    }
}
