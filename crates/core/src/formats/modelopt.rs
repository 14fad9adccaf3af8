//! Byte layouts of NVFP4 weights (serving-and-quant-conventions §4) and elastica's own:
//! - ModelOpt (HF): `weight` U8 `[out, in/2]`, values 2i and 2i+1 in the low and high nibble of
//!   byte i; `weight_scale` E4M3 `[out, in/16]`;
//! - ggml (`GGML_TYPE_NVFP4`): super-blocks of 64 values, 4 UE4M3 scales then 32 bytes, each
//!   16-value sub-block's byte i holding values i and i + 8;
//! - elastica ([`DType::Nvfp4`]): blocks of 16 as `[scale][8 bytes]`, bytes as ggml's
//!   sub-blocks, so a budget's column prefix is a byte prefix of every row.
//!
//! All conversions are exact byte shuffles.
//!
//! [`DType::Nvfp4`]: crate::tensor::DType::Nvfp4

/// Bytes of a ggml NVFP4 super-block (64 values).
pub const GGML_BLOCK_BYTES: usize = 36;

/// ModelOpt `weight` and `weight_scale` bytes of a `[rows, cols]` tensor → elastica blocks.
pub fn from_modelopt(packed: &[u8], scales: &[u8], rows: usize, cols: usize) -> Vec<u8> {
    let nb = cols / 16;
    let mut out = Vec::with_capacity(rows * nb * 9);
    for r in 0..rows {
        for b in 0..nb {
            out.push(scales[r * nb + b]);
            let p = &packed[r * cols / 2 + 8 * b..r * cols / 2 + 8 * b + 8];
            let v = |k: usize| (p[k / 2] >> (4 * (k % 2))) & 0xF;
            out.extend((0..8).map(|i| v(i) | (v(i + 8) << 4)));
        }
    }
    out
}

/// Elastica blocks of a `[rows, cols]` tensor → ModelOpt `(weight, weight_scale)` bytes.
pub fn to_modelopt(blocks: &[u8], rows: usize, cols: usize) -> (Vec<u8>, Vec<u8>) {
    let nb = cols / 16;
    let (mut packed, mut scales) = (
        Vec::with_capacity(rows * cols / 2),
        Vec::with_capacity(rows * nb),
    );
    for b in blocks[..rows * nb * 9].chunks_exact(9) {
        scales.push(b[0]);
        let v = |k: usize| {
            if k < 8 {
                b[1 + k] & 0xF
            } else {
                b[1 + k - 8] >> 4
            }
        };
        packed.extend((0..8).map(|i| v(2 * i) | (v(2 * i + 1) << 4)));
    }
    (packed, scales)
}

/// ggml NVFP4 rows (`cols` a multiple of 64) → elastica blocks.
pub fn from_ggml(bytes: &[u8], rows: usize, cols: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(rows * cols / 16 * 9);
    for sb in bytes[..rows * cols / 64 * GGML_BLOCK_BYTES].chunks_exact(GGML_BLOCK_BYTES) {
        for s in 0..4 {
            out.push(sb[s]);
            out.extend_from_slice(&sb[4 + 8 * s..12 + 8 * s]);
        }
    }
    out
}

/// Elastica blocks (`cols` a multiple of 64) → ggml NVFP4 rows.
pub fn to_ggml(blocks: &[u8], rows: usize, cols: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(rows * cols / 64 * GGML_BLOCK_BYTES);
    for q in blocks[..rows * cols / 16 * 9].chunks_exact(36) {
        out.extend((0..4).map(|s| q[9 * s]));
        for s in 0..4 {
            out.extend_from_slice(&q[9 * s + 1..9 * s + 9]);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_round_trip_and_agree_on_values() {
        let (rows, cols) = (3, 128);
        let mut s = 7u64;
        let mut rnd = || {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (s >> 33) as u8
        };
        let packed: Vec<u8> = (0..rows * cols / 2).map(|_| rnd()).collect();
        let scales: Vec<u8> = (0..rows * cols / 16).map(|_| rnd() & 0x7E).collect();
        let ours = from_modelopt(&packed, &scales, rows, cols);
        assert_eq!(
            to_modelopt(&ours, rows, cols),
            (packed.clone(), scales.clone())
        );
        assert_eq!(from_ggml(&to_ggml(&ours, rows, cols), rows, cols), ours);
        // Value k of row r: ModelOpt's nibble k of the row, times its block's scale.
        for r in 0..rows {
            for k in 0..cols {
                let q = (packed[r * cols / 2 + k / 2] >> (4 * (k % 2))) & 0xF;
                let want = crate::kernels::fp::E2M1[q as usize]
                    * crate::kernels::fp::E4M3[scales[r * cols / 16 + k / 16] as usize];
                let blk = &ours[(r * cols / 16 + k / 16) * 9..][..9];
                assert_eq!(
                    crate::kernels::fp::nvfp4_at(blk, k % 16),
                    want,
                    "row {r} col {k}"
                );
            }
        }
    }
}
