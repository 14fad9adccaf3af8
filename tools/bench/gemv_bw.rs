//! Decode-product throughput per weight format: GB/s of weight bytes read by `layers::linear` on
//! one token (the decode product), for a matrix small enough for L2 (the kernel's compute
//! ceiling) and one far larger than the caches (what decode sees). A kernel at its memory roofline is much faster in L2 than from DRAM.
//!
//!     cargo run --release --example gemv_bw -- [THREADS] [ACTIVE_COLS] [PANEL_CUT]  (default 1, all, none)
//!
//! With ACTIVE_COLS (a multiple of 32), only that prefix of each row is active: a budget view.
//! With PANEL_CUT, the matrix is re-laid in two column panels cut there (`Tensor::relay`, as
//! `Model::panel` does for a budget of that width).
//!
//! Prints one JSON line per (format, size): {"dtype", "rows", "cols", "mib", "gb_per_s"}.

use elastica_core::kernels::pool;
use elastica_core::layers::linear;
use elastica_core::tensor::{Buf, DType, Tensor};
use std::sync::Arc;
use std::time::Instant;

/// Random but valid bytes for `dt`: f16 scales in a sane range, any payload.
fn tensor(dt: DType, rows: usize, cols: usize) -> Tensor {
    let rb = dt.row_bytes(cols).unwrap();
    let mut b = vec![0u8; rows * rb];
    let mut s = 0x9E3779B97F4A7C15u64;
    for v in b.iter_mut() {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        *v = s as u8;
    }
    let bb = dt.block_bytes();
    if dt.is_quantized() {
        // f16 0.01 = 0x211f in every scale field at the start of each block.
        for blk in b.chunks_mut(bb) {
            blk[0] = 0x1f;
            blk[1] = 0x21;
        }
    } else if dt == DType::F8E4M3 {
        // No NaN codes (S.1111.111).
        for v in b.iter_mut().filter(|v| **v & 0x7F == 0x7F) {
            *v ^= 1;
        }
    } else if dt == DType::BF16 {
        for v in b.chunks_mut(2) {
            v[1] = 0x3c | (v[1] & 0x80);
        }
    }
    Tensor::new("w", dt, vec![rows, cols], Buf::Owned(Arc::new(b))).unwrap()
}

fn main() {
    let arg = |i: usize| {
        std::env::args().nth(i).map(|s| {
            s.parse::<usize>().unwrap_or_else(|_| {
                eprintln!("gemv_bw: {s:?} is not a count (usage: gemv_bw [THREADS] [ACTIVE_COLS] [PANEL_CUT])");
                std::process::exit(2)
            })
        })
    };
    let (threads, active, cut) = (arg(1).unwrap_or(1), arg(2), arg(3));
    for (what, v) in [("ACTIVE_COLS", active), ("PANEL_CUT", cut)] {
        if let Some(a) = v.filter(|a| a % 32 != 0 || *a == 0) {
            eprintln!("gemv_bw: {what} {a} is not a positive multiple of 32 (a block)");
            std::process::exit(2)
        }
    }
    pool::init(threads);
    let cols = 576;
    for dt in [
        DType::BF16,
        DType::Q8_0,
        DType::Q4_0,
        DType::Q4K,
        DType::Q6K,
        DType::F8E4M3,
        DType::Nvfp4,
    ] {
        let cols = if dt.block_len() == 256 { 1536 } else { cols };
        for mib in [0.25f64, 256.0] {
            let rb = dt.row_bytes(cols).unwrap();
            let rows = ((mib * 1048576.0) as usize / rb).max(4) / 4 * 4;
            let mut w = tensor(dt, rows, cols);
            if let Some(c) = cut {
                #[allow(clippy::single_range_in_vec_init)]
                let sets = [vec![0..c]];
                w.panels = w.relay(&sets).map(Into::into);
            }
            let ac = active.unwrap_or(cols).min(cols);
            let x: Vec<f32> = (0..ac).map(|i| ((i * 7 % 13) as f32 - 6.0) * 0.1).collect();
            let mut y = vec![0f32; rows];
            let reps = ((1u64 << 31) / (rows * rb) as u64).clamp(3, 20000) as usize;
            let mut best = f64::MAX;
            for _ in 0..5 {
                let t = Instant::now();
                for _ in 0..reps {
                    #[allow(clippy::single_range_in_vec_init)]
                    linear(&w, &[0..rows], &[0..ac], &x, &mut y);
                }
                best = best.min(t.elapsed().as_secs_f64() / reps as f64);
            }
            let gbs = (rows * rb) as f64 * ac as f64 / cols as f64 / best / 1e9;
            println!(
                "{{\"dtype\":\"{}\",\"rows\":{rows},\"cols\":{cols},\"active\":{ac},\"panels\":{},\"mib\":{mib},\"gb_per_s\":{gbs:.2},\"y0\":{}}}",
                dt.name(),
                w.panels.as_ref().map_or(1, |p| p.len()),
                y[0]
            );
        }
    }
}
