//! CPU kernels: thread pool, block formats, matrix-vector (decode) and matrix-matrix (prefill)
//! products over *segments* of a weight (the budget's active rows and columns), and small ops.
//! The ISA is detected at run time: AVX-512 (BF16, VNNI), else AVX2 + FMA, else portable code;
//! `ELASTICA_ISA=avx2` or `ELASTICA_NO_SIMD=1` force the lower levels (tests compare them).

pub mod fp;
pub mod gemm;
pub mod gemv;
pub mod ops;
pub mod pool;
pub mod qdot;
pub mod quant;
#[cfg(target_arch = "x86_64")]
mod x86;

use std::ops::Range;
use std::sync::OnceLock;

/// Instruction set used by the hot kernels, detected once at run time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isa {
    /// AVX-512 F/BW/VL with BF16 dot products and VNNI.
    Avx512,
    /// AVX2 + FMA + F16C.
    Avx2,
    /// Portable code (the compiler may still vectorize it).
    Scalar,
}

pub fn isa() -> Isa {
    static ISA: OnceLock<Isa> = OnceLock::new();
    *ISA.get_or_init(|| {
        if std::env::var_os("ELASTICA_NO_SIMD").is_some() {
            return Isa::Scalar;
        }
        let force_avx2 = std::env::var("ELASTICA_ISA").is_ok_and(|v| v == "avx2");
        #[cfg(target_arch = "x86_64")]
        {
            let avx2 = is_x86_feature_detected!("avx2")
                && is_x86_feature_detected!("fma")
                && is_x86_feature_detected!("f16c");
            if force_avx2 && avx2 {
                return Isa::Avx2;
            }
            if is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("avx512vl")
                && is_x86_feature_detected!("avx512bf16")
                && is_x86_feature_detected!("avx512vnni")
                && is_x86_feature_detected!("f16c")
                && is_x86_feature_detected!("fma")
            {
                return Isa::Avx512;
            }
            if avx2 {
                return Isa::Avx2;
            }
        }
        let _ = force_avx2;
        Isa::Scalar
    })
}

/// Total length of a list of index ranges.
pub fn seg_len(segs: &[Range<usize>]) -> usize {
    segs.iter().map(|r| r.len()).sum()
}

/// Reproducible values in [-0.5, 0.5) for the kernels' tests (an LCG).
#[cfg(test)]
pub(crate) fn test_rnd(n: usize, seed: u64) -> Vec<f32> {
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
