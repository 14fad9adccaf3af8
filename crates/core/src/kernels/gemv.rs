//! Decode products y = W[rows, cols] · x for one token, over the budget's active segments.
//!
//! `rows` and `cols` list index ranges of the parent tensor; `x` holds the active input columns
//! packed in segment order and `y` receives the active rows packed likewise. Weights are read in
//! their stored format: BF16 against bf16-rounded activations (vdpbf16ps), Q8_0/Q4_0/Q4_1/K-quants against
//! activations quantized to int8 per block of 32 (VNNI), F32/F16 against f32. Per-token buffers
//! live in a thread-local scratch, so the decode loop allocates nothing after the first token
//! (or, for a batch of m tokens, once the scratch has grown to m).

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
    /// For the AVX-512 block kernels, 8 lanes per block: d_x in all (`dx8`); the block's offset
    /// term in the first, 0 in the rest (`cx8`). Two blocks are one 512-bit load.
    /// For the AVX-512 NVFP4 kernel, 16 lanes per group of 128 (lane l: 4 values of each
    /// nibble half): 256·d_x of its activation block in `dx8`, −12·Σq in `nc` (the offset of the
    /// unsigned E2M1 lookup).
    dx8: Vec<f32>,
    cx8: Vec<f32>,
    nc: Vec<i32>,
}

thread_local! {
    static SCRATCH: RefCell<Vec<ActScratch>> = const { RefCell::new(Vec::new()) };
}

/// Prepared activation, shared read-only by all threads.
enum Act<'a> {
    F32(&'a [f32]),
    Bf16(&'a [u16]),
    Q8 {
        q: &'a [i8],
        d: &'a [f32],
        xsum: &'a [f32],
        /// `ActScratch::dx8`, `cx8`, `nc` (AVX-512 block formats and NVFP4 only; else empty).
        dx8: &'a [f32],
        cx8: &'a [f32],
        nc: &'a [i32],
    },
}

/// How a weight format wants its activations.
#[derive(Clone, Copy, PartialEq)]
enum ActKind {
    F32,
    Bf16,
    Q8,
}

fn act_kind(dt: DType, isa: Isa) -> ActKind {
    match dt {
        _ if super::gemm::exact() => ActKind::F32,
        DType::F32 | DType::F16 => ActKind::F32,
        DType::BF16 if isa != Isa::Avx512 => ActKind::F32,
        DType::BF16 => ActKind::Bf16,
        DType::Q8_0 | DType::Q4_0 | DType::Q4_1 | DType::Nvfp4 => ActKind::Q8,
        DType::Q5_0 | DType::Q5_1 | DType::Q4K | DType::Q5K | DType::Q6K => ActKind::Q8,
        DType::F8E4M3 if isa == Isa::Avx512 => ActKind::Bf16,
        DType::F8E4M3 => ActKind::F32,
    }
}

impl ActScratch {
    fn prepare(&mut self, kind: ActKind, dt: DType, isa: Isa, x: &[f32]) {
        match kind {
            ActKind::F32 => {}
            ActKind::Bf16 => {
                self.bf.resize(x.len(), 0);
                super::gemm::to_bf16(x, &mut self.bf);
            }
            ActKind::Q8 => {
                self.q8.quantize(x);
                if dt == DType::Nvfp4 {
                    self.q8.interleave128();
                    if isa == Isa::Avx512 {
                        self.nvfp4_lanes();
                    }
                }
                self.xsum.resize(self.q8.d.len(), 0.0);
                let c = if dt == DType::Q8_0 { 128.0 } else { 1.0 };
                for b in 0..self.q8.d.len() {
                    self.xsum[b] = c * self.q8.d[b] * self.q8.sum[b] as f32;
                }
                // The symmetric formats' offset in units of d_w (Q8_0's 128 is in xsum).
                let c = match dt {
                    DType::Q8_0 | DType::Q4_1 | DType::Q5_1 => 1.0,
                    DType::Q4_0 => 8.0,
                    DType::Q5_0 => 16.0,
                    _ => return,
                };
                if isa != Isa::Avx512 {
                    return;
                }
                let n = self.q8.d.len();
                self.dx8.resize(8 * n, 0.0);
                self.cx8.resize(8 * n, 0.0);
                for b in 0..n {
                    self.dx8[8 * b..8 * b + 8].fill(self.q8.d[b]);
                    self.cx8[8 * b] = c * self.xsum[b];
                }
            }
        }
    }
    /// The activation side of the AVX-512 NVFP4 kernel, once per product instead of once per
    /// weight row: per group and i32 lane, 256·d_x and −12·Σq over the lane's 4 + 4 bytes.
    fn nvfp4_lanes(&mut self) {
        let groups = self.q8.q.len() / 128;
        self.dx8.resize(16 * groups, 0.0);
        self.nc.resize(16 * groups, 0);
        for g in 0..groups {
            let q = &self.q8.q[128 * g..128 * g + 128];
            for l in 0..16 {
                let s: i32 = (0..4)
                    .map(|i| q[4 * l + i] as i32 + q[64 + 4 * l + i] as i32)
                    .sum();
                self.nc[16 * g + l] = -12 * s;
                self.dx8[16 * g + l] = 256.0 * self.q8.d[4 * g + l / 4];
            }
        }
    }
    fn act<'a>(&'a self, kind: ActKind, x: &'a [f32]) -> Act<'a> {
        match kind {
            ActKind::F32 => Act::F32(x),
            ActKind::Bf16 => Act::Bf16(&self.bf),
            ActKind::Q8 => Act::Q8 {
                q: &self.q8.q,
                d: &self.q8.d,
                xsum: &self.xsum,
                dx8: &self.dx8,
                cx8: &self.cx8,
                nc: &self.nc,
            },
        }
    }
}

/// Activation rows one pass over the weights serves; more rows take further passes.
pub const MAX_ROWS: usize = 64;
/// Bytes of weight rows read for all activation rows before moving on: they stay in L1
/// meanwhile (at least 4 rows, one kernel tile).
const TILE_BYTES: usize = 16 * 1024;

/// y = W[rows, cols] x. `w` is [out, in]; `x.len() == seg_len(cols)`, `y.len() == seg_len(rows)`.
pub fn matvec(w: &Tensor, rows: &[Range<usize>], cols: &[Range<usize>], x: &[f32], y: &mut [f32]) {
    debug_assert_eq!(x.len(), seg_len(cols));
    matvec_rows(w, rows, cols, x, y);
}

/// The decode product for m tokens at once: y[i] = W[rows, cols] x[i], x [m][seg_len(cols)],
/// y [m][seg_len(rows)]. Each weight row is read once for up to [`MAX_ROWS`] activation rows,
/// and every y[i] equals [`matvec`] of x[i] alone bit for bit: the kernels keep one accumulator
/// per (weight row, activation row) pair and feed it the same operations in the same order
/// whatever the tile, so grouping changes which loads are shared, never the arithmetic. This is
/// what makes a batch of decode tokens give each sequence the logits it gets alone.
pub fn matvec_rows(
    w: &Tensor,
    rows: &[Range<usize>],
    cols: &[Range<usize>],
    x: &[f32],
    y: &mut [f32],
) {
    matvec_sum(&[Operand { w, cols }], rows, x, y);
}

/// One term of [`matvec_sum`]: a weight (a column panel, [`Tensor::relay`]) and the columns
/// of it that the product reads.
#[derive(Clone, Copy)]
pub struct Operand<'a> {
    pub w: &'a Tensor,
    pub cols: &'a [Range<usize>],
}

/// Operands [`matvec_sum`] takes at once (and panels a matrix may have).
pub const MAX_OPERANDS: usize = 16;

/// y[i] = Σ_p W_p[rows, cols_p] x[i]_p for m activation rows, where x[i] holds the operands'
/// inputs one after another ([m][Σ_p seg_len(cols_p)]): one pass of the thread pool. The weights
/// share rows, dtype and per-tensor scale (the panels of one matrix). Where the AVX-512 kernel
/// of the format runs a row through several strips ([`avx512::joins`]) a row takes one set of
/// accumulators across the operands; otherwise each operand's product is added in order. Either
/// way each y[i] is computed alone, as for [`matvec_rows`].
pub fn matvec_sum(ops: &[Operand], rows: &[Range<usize>], x: &[f32], y: &mut [f32]) {
    assert!(!ops.is_empty() && ops.len() <= MAX_OPERANDS);
    let n = seg_len(rows);
    let k: usize = ops.iter().map(|o| seg_len(o.cols)).sum();
    if n == 0 {
        return;
    }
    if k == 0 {
        y.fill(0.0);
        return;
    }
    let m = x.len() / k;
    debug_assert_eq!(m, y.len() / n);
    let isa = isa();
    let kind = act_kind(ops[0].w.dtype, isa);
    let joint = ops.len() == 1 || joins(ops[0].w.dtype, kind, isa);
    // The activations of every operand's rows of a pass fit one array of MAX_ROWS.
    let per = if joint {
        MAX_ROWS
    } else {
        MAX_ROWS / ops.len()
    };
    let mut a = 0;
    while a < m {
        let b = (a + per).min(m);
        pass(
            ops,
            joint,
            rows,
            n,
            k,
            &x[a * k..b * k],
            &mut y[a * n..b * n],
        );
        a = b;
    }
}

/// Whether the AVX-512 kernels run one row through several strips for this format.
fn joins(dt: DType, kind: ActKind, isa: Isa) -> bool {
    #[cfg(target_arch = "x86_64")]
    if isa == Isa::Avx512 {
        return avx512::joins(dt, kind);
    }
    let _ = (dt, kind, isa);
    false
}

thread_local! {
    /// A worker's partial product of a later operand of [`matvec_sum`].
    static PARTIAL: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// One pass of [`matvec_sum`] over its activation rows (at most [`MAX_ROWS`] in all).
fn pass(
    ops: &[Operand],
    joint: bool,
    rows: &[Range<usize>],
    n: usize,
    k: usize,
    x: &[f32],
    y: &mut [f32],
) {
    let m = x.len() / k;
    let isa = isa();
    let w0 = ops[0].w;
    let kind = act_kind(w0.dtype, isa);
    let row_bytes: usize = ops.iter().map(|o| o.w.row_bytes()).sum();
    // Per activation row: one input over all operands (`joint`), or one per operand.
    let parts = if joint { 1 } else { ops.len() };
    // Each part's column range within a row of x.
    let mut span: [Range<usize>; MAX_OPERANDS] = std::array::from_fn(|_| 0..0);
    match joint {
        true => span[0] = 0..k,
        false => {
            let mut at = 0;
            for (sp, o) in span.iter_mut().zip(ops) {
                *sp = at..at + seg_len(o.cols);
                at = sp.end;
            }
        }
    }
    SCRATCH.with(|s| {
        let mut s = s.borrow_mut();
        if s.len() < m * parts {
            s.resize_with(m * parts, ActScratch::default);
        }
        for p in 0..parts {
            for i in 0..m {
                let xi = &x[i * k..(i + 1) * k][span[p].clone()];
                s[p * m + i].prepare(kind, w0.dtype, isa, xi);
            }
        }
        let s = &*s;
        // Only the first parts·m entries are written (the array is 5 KiB: filling it all per
        // product cost more than a small matrix's kernel).
        let mut store = [const { std::mem::MaybeUninit::<Act>::uninit() }; MAX_ROWS];
        for p in 0..parts {
            for i in 0..m {
                let xi = &x[i * k..(i + 1) * k][span[p].clone()];
                store[p * m + i].write(s[p * m + i].act(kind, xi));
            }
        }
        // Safety: entries 0..parts·m were written just above; Act has no drop glue.
        let acts: &[Act] =
            unsafe { std::slice::from_raw_parts(store.as_ptr() as *const Act, parts * m) };
        let yp = SendPtr(y.as_mut_ptr());
        let run = |r: Range<usize>| {
            // Whole 4-row kernel tiles (a remainder row runs at 1 × A).
            let tile = if m == 1 {
                r.len()
            } else {
                (TILE_BYTES / row_bytes).div_ceil(4).max(1) * 4
            };
            let mut a = r.start;
            while a < r.end {
                let b = (a + tile).min(r.end);
                if joint {
                    // Safety: threads write disjoint row ranges of every y[i].
                    unsafe { rows_dot(ops, rows, a..b, acts, yp.get().add(a), n, isa) };
                    a = b;
                    continue;
                }
                for (p, o) in ops.iter().enumerate() {
                    let acts = &acts[p * m..(p + 1) * m];
                    let op = std::slice::from_ref(o);
                    if p == 0 {
                        // Safety: as above.
                        unsafe { rows_dot(op, rows, a..b, acts, yp.get().add(a), n, isa) };
                        continue;
                    }
                    PARTIAL.with(|t| {
                        let mut t = t.borrow_mut();
                        let len = b - a;
                        if t.len() < m * len {
                            t.resize(m * len, 0.0);
                        }
                        // Safety: `t` holds m rows of len values.
                        unsafe { rows_dot(op, rows, a..b, acts, t.as_mut_ptr(), len, isa) };
                        for i in 0..m {
                            // Safety: as above, this thread's rows a..b of y[i].
                            let yi = unsafe {
                                std::slice::from_raw_parts_mut(yp.get().add(i * n + a), len)
                            };
                            yi.iter_mut()
                                .zip(&t[i * len..(i + 1) * len])
                                .for_each(|(y, v)| *y += v);
                        }
                    });
                }
                a = b;
            }
        };
        if n * row_bytes < 64 * 1024 {
            run(0..n);
        } else {
            pool().for_range(n, 16, run);
        }
    });
    // The per-tensor factor (FP8 weight_scale, NVFP4 weight_scale_2; 2 undoes NVFP4's doubled
    // integer values).
    let f = w0.scale * if w0.dtype == DType::Nvfp4 { 0.5 } else { 1.0 };
    if f != 1.0 {
        y.iter_mut().for_each(|v| *v *= f);
    }
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

/// Computes the packed active rows `r` (indices into the flattened row segments) for every
/// activation row: y[a·ystride + j] receives row r.start + j of activation a. Each run of
/// consecutive parent rows goes to one kernel call, with one strip per operand (several only
/// where the kernel [`joins`] them).
///
/// Safety: `y` must be valid for writes at a·ystride + j for a < acts.len(), j < r.len().
#[allow(clippy::too_many_arguments)]
unsafe fn rows_dot(
    ops: &[Operand],
    rows: &[Range<usize>],
    r: Range<usize>,
    acts: &[Act],
    y: *mut f32,
    ystride: usize,
    isa: Isa,
) {
    let w = ops[0].w;
    let mut k = 0usize; // packed index of the current segment start
    for seg in rows {
        let (s0, s1) = (k, k + seg.len());
        k = s1;
        let a = s0.max(r.start);
        let b = s1.min(r.end);
        if a >= b {
            continue;
        }
        let first = seg.start + (a - s0);
        let n = b - a;
        // Safety: the caller's contract, shifted to this segment's first row.
        let yseg = unsafe { y.add(a - r.start) };
        #[cfg(target_arch = "x86_64")]
        if isa == Isa::Avx512 {
            let none = avx512::Strip {
                base: std::ptr::null(),
                stride: 0,
                cols: &[],
            };
            let mut strips = [none; MAX_OPERANDS];
            for (st, o) in strips.iter_mut().zip(ops) {
                let stride = o.w.row_bytes();
                st.base = o.w.bytes()[first * stride..].as_ptr();
                st.stride = stride;
                st.cols = o.cols;
            }
            let strips = &strips[..ops.len()];
            // Safety: rows first..first+n lie inside every panel and each `cols` inside its width.
            let done = unsafe { avx512::rows(w.dtype, strips, n, acts, yseg, ystride) };
            if done {
                continue;
            }
        }
        debug_assert_eq!(
            ops.len(),
            1,
            "operands are joined only where a kernel takes strips"
        );
        for (i, act) in acts.iter().enumerate() {
            // Safety: the caller's contract for activation row i.
            let out = unsafe { std::slice::from_raw_parts_mut(yseg.add(i * ystride), n) };
            row_dots(w, first, ops[0].cols, act, out, isa);
        }
    }
}

/// The rows first..first+out.len() against one activation row, for the kinds the AVX-512
/// multi-row kernels do not cover.
fn row_dots(w: &Tensor, first: usize, cols: &[Range<usize>], act: &Act, out: &mut [f32], isa: Isa) {
    let stride = w.row_bytes();
    let bytes = w.bytes();
    let row = |i: usize| &bytes[(first + i) * stride..(first + i + 1) * stride];
    if let (Act::Q8 { q, d, xsum, .. }, true) = (act, super::qdot::covers(w.dtype)) {
        for (i, o) in out.iter_mut().enumerate() {
            *o = super::qdot::dot(isa, w.dtype, row(i), cols, q, d, xsum);
        }
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if isa == Isa::Avx2 {
        let base = bytes[first * stride..].as_ptr();
        let n = out.len();
        // Safety: rows first..first+n lie inside the tensor and `cols` inside its width.
        unsafe {
            match (act, w.dtype) {
                (Act::Q8 { q, d, .. }, DType::Q8_0) => {
                    avx2::rows_q8_0(base, stride, n, cols, q, d, out)
                }
                (Act::Q8 { q, d, .. }, DType::Nvfp4) => {
                    avx2::rows_nvfp4(base, stride, n, cols, q, d, out)
                }
                (Act::Q8 { q, d, xsum, .. }, DType::Q4_1) => {
                    avx2::rows_q4::<true>(base, stride, n, cols, q, d, xsum, out)
                }
                (Act::Q8 { q, d, xsum, .. }, _) => {
                    avx2::rows_q4::<false>(base, stride, n, cols, q, d, xsum, out)
                }
                (Act::F32(x), DType::F32 | DType::F16 | DType::BF16 | DType::F8E4M3) => out
                    .iter_mut()
                    .enumerate()
                    .for_each(|(i, o)| *o = avx2::dot_float(w.dtype, row(i), cols, x)),
                (Act::F32(x), dt) => out
                    .iter_mut()
                    .enumerate()
                    .for_each(|(i, o)| *o = dot_generic(dt, row(i), cols, x)),
                (Act::Bf16(_), _) => unreachable!("bf16 activations are only made for AVX-512"),
            }
        }
        return;
    }
    let _ = isa;
    for (i, o) in out.iter_mut().enumerate() {
        *o = match act {
            Act::Q8 { q, d, .. } if w.dtype == DType::Nvfp4 => scalar_dot_nvfp4(row(i), cols, q, d),
            Act::Q8 { q, d, xsum, .. } => scalar_dot_q(w.dtype, row(i), cols, q, d, xsum),
            Act::Bf16(_) => unreachable!("bf16 activations are only made for AVX-512"),
            Act::F32(x) => dot_generic(w.dtype, row(i), cols, x),
        };
    }
}

fn dot_generic(dt: DType, row: &[u8], cols: &[Range<usize>], x: &[f32]) -> f32 {
    // Dequantize through a stack buffer, one super-block (256 values) at a time.
    let mut buf = [0f32; 256];
    let mut s = 0f32;
    let mut k = 0;
    for c in cols {
        let mut j = c.start;
        while j < c.end {
            let n = (c.end - j).min(256);
            quant::dequant_row(dt, row, j, &mut buf[..n]);
            for (wv, xv) in buf[..n].iter().zip(&x[k..k + n]) {
                s += wv * xv;
            }
            k += n;
            j += n;
        }
    }
    s
}

/// NVFP4 16-blocks of the column segments in packed order, eight at a time (128 packed
/// values, activation blocks 4g..4g + 4): `(g, [j0, .., j7])`, None past the end. An iterator,
/// not a closure: SIMD kernels loop over it in their own body, where their target features
/// apply.
struct Nvfp4Groups<'a> {
    cols: &'a [Range<usize>],
    seg: usize,
    j: usize,
    g: usize,
}

impl<'a> Nvfp4Groups<'a> {
    fn new(cols: &'a [Range<usize>]) -> Self {
        Self::starting(cols, 0)
    }
    /// The groups from number `skip` on; the skipped ones lie in the first segment.
    fn starting(cols: &'a [Range<usize>], skip: usize) -> Self {
        let j = cols.first().map_or(0, |c| c.start / 16 + 8 * skip);
        Nvfp4Groups {
            cols,
            seg: 0,
            j,
            g: skip,
        }
    }
    #[inline(always)]
    fn block(&mut self) -> Option<usize> {
        while self.seg < self.cols.len() {
            if self.j < self.cols[self.seg].end / 16 {
                self.j += 1;
                return Some(self.j - 1);
            }
            self.seg += 1;
            if let Some(c) = self.cols.get(self.seg) {
                self.j = c.start / 16;
            }
        }
        None
    }
}

impl Iterator for Nvfp4Groups<'_> {
    type Item = (usize, [Option<usize>; 8]);
    #[inline(always)]
    fn next(&mut self) -> Option<Self::Item> {
        let j0 = self.block()?;
        let g = self.g;
        self.g += 1;
        let mut js = [None; 8];
        js[0] = Some(j0);
        for j in js.iter_mut().skip(1) {
            *j = self.block();
        }
        Some((g, js))
    }
}

/// E2M1 values doubled (integers), by code.
const E2M1X2: [i8; 16] = [0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12];
/// The same plus 12 (unsigned bytes for dpbusd/maddubs).
const E2M1X2_12: [u8; 16] = [12, 13, 14, 15, 16, 18, 20, 24, 12, 11, 10, 9, 8, 6, 4, 0];

/// Integer dot of an NVFP4 row with q8 activations interleaved by [`Q8Act::interleave128`],
/// doubled (the caller halves): the reference for the SIMD paths.
///
/// [`Q8Act::interleave128`]: super::quant::Q8Act::interleave128
fn scalar_dot_nvfp4(row: &[u8], cols: &[Range<usize>], q: &[i8], d: &[f32]) -> f32 {
    let mut s = 0f32;
    for (g, js) in Nvfp4Groups::new(cols) {
        let x = &q[128 * g..128 * g + 128];
        for (t, j) in js.iter().enumerate() {
            let Some(j) = *j else { continue };
            let b = &row[9 * j..9 * j + 9];
            let mut acc = 0i32;
            for i in 0..8 {
                acc += E2M1X2[(b[1 + i] & 0xF) as usize] as i32 * x[8 * t + i] as i32;
                acc += E2M1X2[(b[1 + i] >> 4) as usize] as i32 * x[64 + 8 * t + i] as i32;
            }
            s += d[4 * g + t / 2] * (super::fp::E4M3[(b[0] & 0x7F) as usize] * acc as f32);
        }
    }
    s
}

/// Integer dot of a Q8_0/Q4_0/Q4_1 row with q8 activations: the reference for the SIMD paths.
fn scalar_dot_q(
    dt: DType,
    row: &[u8],
    cols: &[Range<usize>],
    q: &[i8],
    d: &[f32],
    xsum: &[f32],
) -> f32 {
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
                    let m = if dt == DType::Q4_1 {
                        quant::f16_at(b, 2)
                    } else {
                        -8.0 * dw
                    };
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
    //! Multi-row decode kernels: a tile of R weight rows × A activation rows keeps R·A
    //! accumulators, so each weight block is loaded and decoded once per A activation rows and
    //! each activation block once per R weight rows. Every (row, activation) pair sees the same
    //! operations in the same order for any R and A: m = 1 decode and a batch agree bit for bit.
    //! A row may run through several strips (the column panels of a re-laid matrix) with one set
    //! of accumulators: the integer kernels then pair blocks across the cuts, so their sums do
    //! not depend on where a row is cut.
    use super::{Act, ActKind};
    use crate::tensor::DType;
    use std::arch::x86_64::*;
    use std::ops::Range;

    /// Rows ahead to prefetch: rows are short (a few hundred bytes), too short for the hardware
    /// prefetcher to ramp up on each.
    const PF: usize = 8;
    /// Weight rows per tile (activation rows per tile: up to 4, see `tiles!`). One: a single
    /// sequential stream per thread reads DRAM about twice as fast as four interleaved rows on
    /// Zen 4 (tools/bench/gemv_bw.rs); the kernels get their parallelism from `L` accumulators
    /// along the row instead.
    const R4: usize = 1;
    /// Accumulators per (weight row, activation row): consecutive chunks of the row feed them in
    /// turn, so no chain of dependent FMAs limits one row's speed.
    const L: usize = 4;

    /// The `L` accumulators summed in one fixed order.
    #[inline(always)]
    unsafe fn sum_acc(v: &[__m512; L]) -> __m512 {
        unsafe { _mm512_add_ps(_mm512_add_ps(v[0], v[1]), _mm512_add_ps(v[2], v[3])) }
    }

    /// Horizontal sums of up to four vectors at once (`v[i]` for i < R; the rest are not
    /// read), each in the same order whatever R and its slot: 256-bit halves, then 128-bit
    /// quarters, then pairs inside a quarter. So a row's sum does not depend on the tile it
    /// falls in.
    #[inline(always)]
    unsafe fn hsum_rows<const R: usize>(v: [__m512; R]) -> [f32; R] {
        unsafe {
            let at = |i: usize| v[if i < R { i } else { 0 }];
            let (a, b, c, d) = (at(0), at(1), at(2), at(3));
            // [a0+a2, a1+a3, b0+b2, b1+b3] in 128-bit chunks.
            let ab = _mm512_add_ps(
                _mm512_shuffle_f32x4::<0b01_00_01_00>(a, b),
                _mm512_shuffle_f32x4::<0b11_10_11_10>(a, b),
            );
            let cd = _mm512_add_ps(
                _mm512_shuffle_f32x4::<0b01_00_01_00>(c, d),
                _mm512_shuffle_f32x4::<0b11_10_11_10>(c, d),
            );
            // [(a0+a2)+(a1+a3), b.., c.., d..].
            let q = _mm512_add_ps(
                _mm512_shuffle_f32x4::<0b10_00_10_00>(ab, cd),
                _mm512_shuffle_f32x4::<0b11_01_11_01>(ab, cd),
            );
            let t = _mm512_add_ps(q, _mm512_permute_ps::<0b10_11_00_01>(q));
            let t = _mm512_add_ps(t, _mm512_permute_ps::<0b01_00_11_10>(t));
            let mut all = [0f32; 16];
            _mm512_storeu_ps(all.as_mut_ptr(), t);
            std::array::from_fn(|i| all[4 * i])
        }
    }

    /// Block formats of the integer kernels.
    const Q8_0: u8 = 0;
    const Q4_0: u8 = 1;
    const Q4_1: u8 = 2;
    const Q5_0: u8 = 3;
    const Q5_1: u8 = 4;
    /// Float weight formats against f32 activations.
    const F32: u8 = 0;
    const F16: u8 = 1;
    const BF16: u8 = 2;

    /// Runs the kernel for every (≤R4 weight rows) × (≤A4 activation rows) tile of rows 0..n,
    /// activation tiles outer so that each stays in L1 while the weight rows stream past.
    /// `tiles!(ROWS; ...)` takes ROWS weight rows per tile instead of R4 (the rest one by one).
    macro_rules! tiles {
        ($n:expr, $acts:expr, $y:expr, $ys:expr, |$r:ident, $R:ident, $xa:ident, $A:ident| $body:expr) => {
            tiles!(R4; $n, $acts, $y, $ys, |$r, $R, $xa, $A| $body)
        };
        ($RT:expr; $n:expr, $acts:expr, $y:expr, $ys:expr, |$r:ident, $R:ident, $xa:ident, $A:ident| $body:expr) => {{
            let (n, acts, y, ys) = ($n, $acts, $y, $ys);
            let mut a0 = 0;
            while a0 < acts.len() {
                let left = acts.len() - a0;
                macro_rules! rows_for {
                    ($AA:literal) => {{
                        const $A: usize = $AA;
                        let $xa: &[Act; $A] = acts[a0..a0 + $A].try_into().unwrap();
                        let mut $r = 0;
                        while $r + $RT <= n {
                            const $R: usize = $RT;
                            let o: [[f32; $A]; $R] = $body;
                            store(&o, y, ys, $r, a0);
                            $r += $RT;
                        }
                        while $r < n {
                            const $R: usize = 1;
                            let o: [[f32; $A]; $R] = $body;
                            store(&o, y, ys, $r, a0);
                            $r += 1;
                        }
                        a0 += $A;
                    }};
                }
                match left {
                    1 => rows_for!(1),
                    2 => rows_for!(2),
                    3 => rows_for!(3),
                    _ => rows_for!(4),
                }
            }
        }};
    }

    /// Runs the body for every column segment `c` of every strip, `base` and `stride` the
    /// strip's rows from row r0 (the float tiles' walk along a row).
    macro_rules! each_segment {
        ($strips:expr, $r0:expr, |$base:ident, $stride:ident, $c:ident| $body:block) => {
            for st in $strips {
                let ($base, $stride) = (st.base.add($r0 * st.stride), st.stride);
                for $c in st.cols $body
            }
        };
    }

    #[inline(always)]
    unsafe fn store<const R: usize, const A: usize>(
        o: &[[f32; A]; R],
        y: *mut f32,
        ys: usize,
        r0: usize,
        a0: usize,
    ) {
        for (r, row) in o.iter().enumerate() {
            for (a, v) in row.iter().enumerate() {
                unsafe { *y.add((a0 + a) * ys + r0 + r) = *v };
            }
        }
    }

    /// One column strip of the rows of a product: a weight (one column panel) with its own
    /// row stride and columns, from the first row of the call. A row runs through the strips in
    /// order with one set of accumulators, its activation the strips' inputs concatenated.
    #[derive(Clone, Copy)]
    pub struct Strip<'a> {
        pub base: *const u8,
        pub stride: usize,
        pub cols: &'a [Range<usize>],
    }

    /// Whether [`rows`] takes several strips for this pair (else one at a time).
    pub(super) fn joins(dt: DType, kind: ActKind) -> bool {
        matches!(
            (kind, dt),
            (
                ActKind::Q8,
                DType::Q8_0 | DType::Q4_0 | DType::Q4_1 | DType::Q5_0 | DType::Q5_1
            ) | (ActKind::Bf16, DType::BF16 | DType::F8E4M3)
                | (ActKind::F32, DType::F32 | DType::F16 | DType::BF16)
        )
    }

    /// Rows 0..n of the strips against every activation row; false when this ISA path has no
    /// multi-row kernel for the pair (the caller then goes row by row), or it takes one strip
    /// only ([`joins`]) and got several.
    ///
    /// Safety: rows 0..n of every strip lie inside its tensor, its `cols` inside its width, and
    /// `y` is valid for writes at a·ys + j, a < acts.len(), j < n.
    pub unsafe fn rows(
        dt: DType,
        strips: &[Strip],
        n: usize,
        acts: &[Act],
        y: *mut f32,
        ys: usize,
    ) -> bool {
        let st = strips;
        let kind = match acts[0] {
            Act::F32(_) => ActKind::F32,
            Act::Bf16(_) => ActKind::Bf16,
            Act::Q8 { .. } => ActKind::Q8,
        };
        if st.len() > 1 && !joins(dt, kind) {
            return false;
        }
        let Strip { base, stride, cols } = st[0];
        unsafe {
            match (&acts[0], dt) {
                (Act::Q8 { .. }, DType::Q8_0) => rows_q::<Q8_0>(st, n, acts, y, ys),
                (Act::Q8 { .. }, DType::Q4_0) => rows_q::<Q4_0>(st, n, acts, y, ys),
                (Act::Q8 { .. }, DType::Q4_1) => rows_q::<Q4_1>(st, n, acts, y, ys),
                (Act::Q8 { .. }, DType::Q5_0) => rows_q::<Q5_0>(st, n, acts, y, ys),
                (Act::Q8 { .. }, DType::Q5_1) => rows_q::<Q5_1>(st, n, acts, y, ys),
                (Act::Q8 { .. }, DType::Nvfp4) if vbmi() => {
                    rows_nvfp4_vbmi(base, stride, n, cols, acts, y, ys)
                }
                (Act::Q8 { .. }, DType::Nvfp4) => rows_nvfp4(base, stride, n, cols, acts, y, ys),
                (Act::Bf16(_), DType::F8E4M3) => rows_fp8(st, n, acts, y, ys),
                (Act::Bf16(_), DType::BF16) => rows_bf16(st, n, acts, y, ys),
                (Act::F32(_), DType::F32) => rows_f::<F32>(st, n, acts, y, ys),
                (Act::F32(_), DType::F16) => rows_f::<F16>(st, n, acts, y, ys),
                (Act::F32(_), DType::BF16) => rows_f::<BF16>(st, n, acts, y, ys),
                _ => return false,
            }
        }
        true
    }

    /// Q8_0 / Q4_0 / Q4_1 / Q5_0 / Q5_1 rows · q8 x, two blocks per 512-bit vector (one block
    /// for a segment's odd last one), VNNI dpbusd (unsigned × signed bytes). Q8_0 weights are
    /// made unsigned by flipping the sign bit (w+128); Q4 nibbles already are, and Q5 adds bit i
    /// of qh to value i as 16. The lanes of block j are scaled by d_x,j; the offset term
    /// (−128·d_w for Q8_0, −8·d_w for Q4_0, −16·d_w for Q5_0, m for Q4_1/Q5_1) times d_x·Σq
    /// (`xsum`) enters in the block's first lane. Each (weight row, activation row) pair keeps
    /// `L` accumulators of its own.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,f16c,fma")]
    unsafe fn rows_q<const KIND: u8>(
        strips: &[Strip],
        n: usize,
        acts: &[Act],
        y: *mut f32,
        ys: usize,
    ) {
        unsafe {
            tiles!(n, acts, y, ys, |r, R, xa, A| q_tile::<R, A, KIND>(
                strips, r, xa
            ))
        }
    }

    #[inline(always)]
    unsafe fn q_tile<const R: usize, const A: usize, const KIND: u8>(
        strips: &[Strip],
        r0: usize,
        xa: &[Act; A],
    ) -> [[f32; A]; R] {
        unsafe {
            let mut x = [(std::ptr::null(), std::ptr::null(), std::ptr::null()); A];
            for a in 0..A {
                let Act::Q8 { q, dx8, cx8, .. } = &xa[a] else {
                    unreachable!("one activation kind per product")
                };
                x[a] = (q.as_ptr(), dx8.as_ptr(), cx8.as_ptr());
            }
            let bb = q_dtype(KIND).block_bytes();
            let mut acc = [[[_mm512_setzero_ps(); LQ]; A]; R];
            // Consecutive blocks of the activation pair up, across segments and strips too (a
            // pair's two weight blocks load apart); pairs feed accumulators 0 and 1 in turn, a
            // last lone block 1. So a row's arithmetic does not depend on where it is cut.
            let mut k = 0usize; // activation block of the next block
            let mut li = 0usize;
            let mut pend: Option<(*const u8, usize)> = None;
            macro_rules! pair {
                ($p:expr, $ps:expr, $p1:expr, $p1s:expr, $k:expr) => {{
                    if li == 0 {
                        q_step::<R, A, KIND, true, 0>($p, $ps, $p1, $p1s, $k, &x, &mut acc);
                    } else {
                        q_step::<R, A, KIND, true, 1>($p, $ps, $p1, $p1s, $k, &x, &mut acc);
                    }
                    li ^= 1;
                }};
            }
            for st in strips {
                let base = st.base.add(r0 * st.stride);
                let ps = st.stride;
                for c in st.cols {
                    let mut p = base.add(c.start / 32 * bb);
                    let mut left = c.len() / 32;
                    if left > 0
                        && let Some((pp, pps)) = pend.take()
                    {
                        pair!(pp, pps, p, ps, k - 1);
                        (p, left, k) = (p.add(bb), left - 1, k + 1);
                    }
                    while left >= 2 {
                        pair!(p, ps, p.add(bb), ps, k);
                        (p, left, k) = (p.add(2 * bb), left - 2, k + 2);
                    }
                    if left == 1 {
                        pend = Some((p, ps));
                        k += 1;
                    }
                }
            }
            if let Some((p, ps)) = pend {
                q_step::<R, A, KIND, false, 1>(p, ps, p, ps, k - 1, &x, &mut acc);
            }
            let mut out = [[0f32; A]; R];
            for r in 0..R {
                for a in 0..A {
                    out[r][a] = _mm512_reduce_add_ps(_mm512_add_ps(acc[r][a][0], acc[r][a][1]));
                }
            }
            out
        }
    }

    /// The format of an integer kernel's `KIND`.
    #[inline(always)]
    fn q_dtype(kind: u8) -> DType {
        match kind {
            Q8_0 => DType::Q8_0,
            Q4_0 => DType::Q4_0,
            Q4_1 => DType::Q4_1,
            Q5_0 => DType::Q5_0,
            _ => DType::Q5_1,
        }
    }

    /// Accumulators per (weight row, activation row) of the block kernels (rows are short).
    const LQ: usize = 2;

    /// Weight blocks at `p0` and `p1` (rows r at `p0 + r·ps`, `p1 + r·p1s`; `TWO`, else the
    /// one at `p0` alone) of R weight rows against activation blocks k, k + 1 of A activation
    /// rows, into accumulator `LI`.
    #[inline(always)]
    #[allow(clippy::type_complexity)]
    unsafe fn q_step<
        const R: usize,
        const A: usize,
        const KIND: u8,
        const TWO: bool,
        const LI: usize,
    >(
        p0: *const u8,
        ps: usize,
        p1: *const u8,
        p1s: usize,
        k: usize,
        x: &[(*const i8, *const f32, *const f32); A],
        acc: &mut [[[__m512; LQ]; A]; R],
    ) {
        unsafe {
            // Where the quants start in a block (after d, m and Q5's 32 high bits).
            let off = match KIND {
                Q8_0 | Q4_0 => 2,
                Q4_1 => 4,
                Q5_0 => 6,
                _ => 8,
            };
            let asym = KIND == Q4_1 || KIND == Q5_1;
            // Lanes 0..8 from element 0, lanes 8..16 from element 1 (`pair_dm`: 0 and 2 of
            // [d0, m0, d1, m1]; `pair_m`: 1 and 3 into the blocks' first lanes).
            let pair = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
            let pair_dm = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 2, 2, 2, 2, 2, 2, 2, 2);
            let pair_m = _mm512_setr_epi32(1, 0, 0, 0, 0, 0, 0, 0, 3, 0, 0, 0, 0, 0, 0, 0);
            let m: __mmask16 = if TWO { 0xffff } else { 0x00ff };
            let mut xv = [_mm512_setzero_si512(); A];
            let mut dx = [_mm512_setzero_ps(); A];
            let mut cx = [_mm512_setzero_ps(); A];
            for a in 0..A {
                let (q, d, c) = x[a];
                xv[a] = if TWO {
                    _mm512_loadu_si512(q.add(32 * k) as *const _)
                } else {
                    _mm512_zextsi256_si512(_mm256_loadu_si256(q.add(32 * k) as *const _))
                };
                dx[a] = _mm512_maskz_loadu_ps(m, d.add(8 * k));
                cx[a] = _mm512_maskz_loadu_ps(m, c.add(8 * k));
            }
            for r in 0..R {
                let p = p0.add(r * ps);
                _mm_prefetch::<_MM_HINT_T0>(p.add(PF * ps + 64) as *const i8);
                let p1 = if TWO { p1.add(r * p1s) } else { p };
                // d (and m) of both blocks: [d0, m0, d1, m1] or [d0, d1].
                let h = if asym {
                    _mm_insert_epi32::<1>(
                        _mm_cvtsi32_si128(std::ptr::read_unaligned(p as *const i32)),
                        std::ptr::read_unaligned(p1 as *const i32),
                    )
                } else {
                    _mm_insert_epi16::<1>(
                        _mm_cvtsi32_si128(std::ptr::read_unaligned(p as *const u16) as i32),
                        std::ptr::read_unaligned(p1 as *const u16) as i32,
                    )
                };
                let h = _mm512_castps128_ps512(_mm_cvtph_ps(h));
                let dw = _mm512_permutexvar_ps(if asym { pair_dm } else { pair }, h);
                let w = if KIND == Q8_0 {
                    let w0 = _mm512_castsi256_si512(_mm256_loadu_si256(p.add(off) as *const _));
                    _mm512_xor_si512(
                        _mm512_inserti64x4::<1>(w0, _mm256_loadu_si256(p1.add(off) as *const _)),
                        _mm512_set1_epi8(-128),
                    )
                } else {
                    // Low nibbles (values 0..16) in 128-bit lanes 0 and 2, high ones (16..32)
                    // in 1 and 3.
                    let by = _mm512_inserti64x4::<1>(
                        _mm512_castsi256_si512(_mm256_broadcastsi128_si256(_mm_loadu_si128(
                            p.add(off) as *const _,
                        ))),
                        _mm256_broadcastsi128_si256(_mm_loadu_si128(p1.add(off) as *const _)),
                    );
                    let sh = _mm512_setr_epi32(0, 0, 0, 0, 4, 4, 4, 4, 0, 0, 0, 0, 4, 4, 4, 4);
                    let nib = _mm512_and_si512(_mm512_srlv_epi32(by, sh), _mm512_set1_epi8(0x0F));
                    if KIND == Q5_0 || KIND == Q5_1 {
                        let qh0 = std::ptr::read_unaligned(p.add(off - 4) as *const u32);
                        let qh1 = std::ptr::read_unaligned(p1.add(off - 4) as *const u32);
                        let mask = qh0 as u64 | (qh1 as u64) << 32;
                        _mm512_or_si512(nib, _mm512_maskz_mov_epi8(mask, _mm512_set1_epi8(16)))
                    } else {
                        nib
                    }
                };
                // A lone block: the upper half is zero.
                let w = if TWO {
                    w
                } else {
                    _mm512_zextsi256_si512(_mm512_castsi512_si256(w))
                };
                for a in 0..A {
                    let i = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w, xv[a]);
                    let f = _mm512_cvtepi32_ps(i);
                    let t = &mut acc[r][a][LI];
                    if asym {
                        let mw = _mm512_maskz_permutexvar_ps(0x0101, pair_m, h);
                        *t = _mm512_fmadd_ps(_mm512_mul_ps(f, dx[a]), dw, *t);
                        *t = _mm512_fmadd_ps(cx[a], mw, *t);
                    } else {
                        *t = _mm512_fmadd_ps(_mm512_fmsub_ps(f, dx[a], cx[a]), dw, *t);
                    }
                }
            }
        }
    }

    /// BF16 rows · bf16 x (vdpbf16ps).
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16,f16c,fma")]
    unsafe fn rows_bf16(strips: &[Strip], n: usize, acts: &[Act], y: *mut f32, ys: usize) {
        unsafe {
            tiles!(n, acts, y, ys, |r, R, xa, A| bf16_tile::<R, A, false>(
                strips, r, xa
            ))
        }
    }

    /// BF16 weights, or FP8 ones widened to bf16 (`FP8`), against bf16 activations.
    #[inline(always)]
    unsafe fn bf16_tile<const R: usize, const A: usize, const FP8: bool>(
        strips: &[Strip],
        r0: usize,
        xa: &[Act; A],
    ) -> [[f32; A]; R] {
        unsafe {
            let mut xp = [std::ptr::null::<u16>(); A];
            for a in 0..A {
                let Act::Bf16(x) = &xa[a] else {
                    unreachable!("one activation kind per product")
                };
                xp[a] = x.as_ptr();
            }
            let mut acc = [[[_mm512_setzero_ps(); L]; A]; R];
            let mut k = 0usize;
            each_segment!(strips, r0, |base, stride, c| {
                let n = c.len();
                let mut i = 0;
                // Chunk l of each run of L feeds accumulator l (unrolled: the accumulators stay
                // in registers).
                while i < n {
                    for l in 0..L {
                        if i >= n {
                            break;
                        }
                        let m: __mmask32 = if n - i >= 32 {
                            !0
                        } else {
                            (1u32 << (n - i)) - 1
                        };
                        let mut wv = [_mm512_setzero_si512(); R];
                        for r in 0..R {
                            let esz = if FP8 { 1 } else { 2 };
                            let wp = base.add(r * stride + esz * (c.start + i));
                            _mm_prefetch::<_MM_HINT_T0>(wp.add(PF * stride) as *const i8);
                            // Plain loads where the chunk is whole: masked loads do not
                            // train the hardware prefetchers.
                            let full = m == !0;
                            wv[r] = match (FP8, full) {
                                (true, true) => e4m3_to_bf16(_mm256_loadu_si256(wp as *const _)),
                                (true, false) => {
                                    e4m3_to_bf16(_mm256_maskz_loadu_epi8(m, wp as *const _))
                                }
                                (false, true) => _mm512_loadu_si512(wp as *const _),
                                (false, false) => _mm512_maskz_loadu_epi16(m, wp as *const _),
                            };
                        }
                        for a in 0..A {
                            let xv: __m512bh = std::mem::transmute(_mm512_maskz_loadu_epi16(
                                m,
                                xp[a].add(k + i) as *const _,
                            ));
                            for r in 0..R {
                                acc[r][a][l] = _mm512_dpbf16_ps(
                                    acc[r][a][l],
                                    std::mem::transmute::<__m512i, __m512bh>(wv[r]),
                                    xv,
                                );
                            }
                        }
                        i += 32;
                    }
                }
                k += n;
            });
            let mut out = [[0f32; A]; R];
            for r in 0..R {
                for a in 0..A {
                    out[r][a] = _mm512_reduce_add_ps(sum_acc(&acc[r][a]));
                }
            }
            out
        }
    }

    /// F32 / F16 / BF16 rows against f32 activations (BF16 here is the exact mode: widened by a
    /// shift), 16 lanes at a time.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c,fma")]
    unsafe fn rows_f<const KIND: u8>(
        strips: &[Strip],
        n: usize,
        acts: &[Act],
        y: *mut f32,
        ys: usize,
    ) {
        unsafe {
            tiles!(n, acts, y, ys, |r, R, xa, A| f_tile::<R, A, KIND>(
                strips, r, xa
            ))
        }
    }

    #[inline(always)]
    unsafe fn f_tile<const R: usize, const A: usize, const KIND: u8>(
        strips: &[Strip],
        r0: usize,
        xa: &[Act; A],
    ) -> [[f32; A]; R] {
        unsafe {
            let mut xp = [std::ptr::null::<f32>(); A];
            for a in 0..A {
                let Act::F32(x) = &xa[a] else {
                    unreachable!("one activation kind per product")
                };
                xp[a] = x.as_ptr();
            }
            let esz = if KIND == F32 { 4 } else { 2 };
            let mut acc = [[_mm512_setzero_ps(); A]; R];
            let mut k = 0usize;
            each_segment!(strips, r0, |base, stride, c| {
                let n = c.len();
                let mut i = 0;
                while i < n {
                    let m: __mmask16 = if n - i >= 16 {
                        !0
                    } else {
                        (1u16 << (n - i)) - 1
                    };
                    let mut wv = [_mm512_setzero_ps(); R];
                    for r in 0..R {
                        let wp = base.add(r * stride + esz * (c.start + i));
                        _mm_prefetch::<_MM_HINT_T0>(wp.add(PF * stride) as *const i8);
                        wv[r] = match KIND {
                            F32 => _mm512_maskz_loadu_ps(m, wp as *const f32),
                            F16 => _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, wp as *const _)),
                            _ => _mm512_castsi512_ps(_mm512_slli_epi32(
                                _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, wp as *const _)),
                                16,
                            )),
                        };
                    }
                    for a in 0..A {
                        let xv = _mm512_maskz_loadu_ps(m, xp[a].add(k + i));
                        for r in 0..R {
                            acc[r][a] = _mm512_fmadd_ps(wv[r], xv, acc[r][a]);
                        }
                    }
                    i += 16;
                }
                k += n;
            });
            let mut out = [[0f32; A]; R];
            for r in 0..R {
                for a in 0..A {
                    out[r][a] = _mm512_reduce_add_ps(acc[r][a]);
                }
            }
            out
        }
    }

    /// NVFP4 rows · q8 x (interleaved by `Q8Act::interleave64`): four weight blocks (64
    /// values) per step, their nibbles looked up as doubled E2M1 integers (vpshufb); dpbusd takes
    /// the magnitudes against x negated where the weight is negative, and each i32 lane is
    /// scaled by its block's E4M3 scale times its activation block's d.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,f16c,fma")]
    unsafe fn rows_nvfp4(
        base: *const u8,
        stride: usize,
        n: usize,
        cols: &[Range<usize>],
        acts: &[Act],
        y: *mut f32,
        ys: usize,
    ) {
        unsafe {
            tiles!(n, acts, y, ys, |r, R, xa, A| nvfp4_tile::<R, A, false>(
                base.add(r * stride),
                stride,
                cols,
                xa
            ))
        }
    }

    /// [`rows_nvfp4`] where AVX-512 VBMI byte permutes take four contiguous blocks' bytes
    /// and scales from one 36-byte load.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi,f16c,fma")]
    unsafe fn rows_nvfp4_vbmi(
        base: *const u8,
        stride: usize,
        n: usize,
        cols: &[Range<usize>],
        acts: &[Act],
        y: *mut f32,
        ys: usize,
    ) {
        unsafe {
            tiles!(NVFP4_ROWS; n, acts, y, ys, |r, R, xa, A| nvfp4_tile::<R, A, true>(
                base.add(r * stride),
                stride,
                cols,
                xa
            ))
        }
    }

    /// Weight rows per NVFP4 tile: rows are short (9 bytes per 16 values), so one row's few
    /// groups leave its chain of dependent integer and float steps exposed.
    const NVFP4_ROWS: usize = 4;

    /// Byte permutes of a 72-byte group of eight NVFP4 blocks [s0 d0(8) s1 d1(8) .. s7 d7(8)]
    /// held in two registers (bytes 64.. in the second): the 64 data bytes in block order, and
    /// each i32 lane's scale byte in the low byte of a u16 (lanes 2t and 2t + 1 → block t).
    static NVFP4_DATA_IDX: [u8; 64] = {
        let mut ix = [0u8; 64];
        let mut i = 0;
        while i < 64 {
            ix[i] = (9 * (i / 8) + 1 + i % 8) as u8;
            i += 1;
        }
        ix
    };
    static NVFP4_SCALE_IDX: [u8; 64] = {
        let mut ix = [0u8; 64];
        let mut lane = 0;
        while lane < 16 {
            ix[2 * lane] = (9 * (lane / 2)) as u8;
            lane += 1;
        }
        ix
    };

    /// Whether the CPU has AVX-512 VBMI (byte permutes).
    fn vbmi() -> bool {
        static V: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *V.get_or_init(|| is_x86_feature_detected!("avx512vbmi"))
    }

    #[inline(always)]
    unsafe fn nvfp4_tile<const R: usize, const A: usize, const V: bool>(
        base: *const u8,
        stride: usize,
        cols: &[Range<usize>],
        xa: &[Act; A],
    ) -> [[f32; A]; R] {
        unsafe {
            // Per activation: q (interleaved), and per group and i32 lane 256·d_x and −12·Σq
            // (`ActScratch::nvfp4_lanes`).
            let (mut xq, mut xd, mut xc) = (
                [std::ptr::null(); A],
                [std::ptr::null(); A],
                [std::ptr::null(); A],
            );
            for a in 0..A {
                let Act::Q8 { q, dx8, nc, .. } = &xa[a] else {
                    unreachable!("one activation kind per product")
                };
                (xq[a], xd[a], xc[a]) = (q.as_ptr(), dx8.as_ptr(), nc.as_ptr());
            }
            // Doubled E2M1 values + 12 (unsigned for dpbusd); the 12·Σx this adds per lane is
            // taken off by starting each lane at −12·Σx. With VBMI the table is repeated over 64
            // bytes, so a byte permute looks a nibble up without masking the bits above it.
            let lut =
                _mm512_broadcast_i32x4(_mm_loadu_si128(super::E2M1X2_12.as_ptr() as *const _));
            let lo = _mm512_set1_epi8(0x0F);
            // i32 lane → block (lanes 2t, 2t + 1 → block t).
            let sc_idx = _mm512_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7);
            let data_idx = _mm512_loadu_si512(NVFP4_DATA_IDX.as_ptr() as *const _);
            let scale_idx = _mm512_loadu_si512(NVFP4_SCALE_IDX.as_ptr() as *const _);
            // The table's E4M3 scales · 2⁻⁸, as the fast path's f16 conversion gives them
            // (256·d_x makes it up).
            let scales = crate::kernels::fp::E4M3.as_ptr();
            let zero = _mm512_setzero_si512();
            let mut acc = [[_mm512_setzero_ps(); A]; R];
            // One group of eight blocks (128 values): the low nibbles of all eight against the
            // first 64 activations, the high ones against the next 64, both into the same lanes.
            macro_rules! step {
                ($g:expr, |$r:ident| $bytes:expr, |$r2:ident| $sc:expr) => {{
                    let g = $g;
                    let mut xl = [zero; A];
                    let mut xh = [zero; A];
                    let mut negc = [zero; A];
                    let mut dv = [_mm512_setzero_ps(); A];
                    for a in 0..A {
                        xl[a] = _mm512_loadu_si512(xq[a].add(128 * g) as *const _);
                        xh[a] = _mm512_loadu_si512(xq[a].add(128 * g + 64) as *const _);
                        negc[a] = _mm512_loadu_si512(xc[a].add(16 * g) as *const _);
                        dv[a] = _mm512_loadu_ps(xd[a].add(16 * g));
                    }
                    for $r in 0..R {
                        let $r2 = $r;
                        let bytes: __m512i = $bytes;
                        let sc: __m512 = $sc;
                        let (wl, wh) = if V {
                            (
                                _mm512_permutexvar_epi8(bytes, lut),
                                _mm512_permutexvar_epi8(_mm512_srli_epi16(bytes, 4), lut),
                            )
                        } else {
                            (
                                _mm512_shuffle_epi8(lut, _mm512_and_si512(bytes, lo)),
                                _mm512_shuffle_epi8(
                                    lut,
                                    _mm512_and_si512(_mm512_srli_epi16(bytes, 4), lo),
                                ),
                            )
                        };
                        for a in 0..A {
                            let i = _mm512_dpbusd_epi32(
                                _mm512_dpbusd_epi32(negc[a], wl, xl[a]),
                                wh,
                                xh[a],
                            );
                            acc[$r][a] = _mm512_fmadd_ps(
                                _mm512_cvtepi32_ps(i),
                                _mm512_mul_ps(sc, dv[a]),
                                acc[$r][a],
                            );
                        }
                    }
                }};
            }
            // Whole groups of eight contiguous blocks at the start of the first segment: two
            // loads (64 + 8 bytes) per row and group, two byte permutes.
            let mut fast = 0;
            if V {
                // One group from its first block j0: the row bytes under masks m0 (bytes 0..64)
                // and m1 (64..72); blocks past the mask read as zero with a zero scale.
                macro_rules! group {
                    ($g:expr, $j0:expr, $m0:expr, $m1:expr, $prefetch:expr) => {{
                        let off = 9 * $j0;
                        let mut z0 = [zero; R];
                        let mut z1 = [zero; R];
                        for r in 0..R {
                            let row = base.add(r * stride + off);
                            if $prefetch {
                                _mm_prefetch::<_MM_HINT_T0>(row.add(PF * stride) as *const i8);
                                _mm_prefetch::<_MM_HINT_T0>(row.add(PF * stride + 64) as *const i8);
                            }
                            z0[r] = _mm512_maskz_loadu_epi8($m0, row as *const _);
                            z1[r] = _mm512_maskz_loadu_epi8($m1, row.add(64) as *const _);
                        }
                        // UE4M3 scales as f16 bits (value · 2⁻⁸, made up in d).
                        step!(
                            $g,
                            |r| _mm512_permutex2var_epi8(z0[r], data_idx, z1[r]),
                            |r| {
                                let sb =
                                    _mm512_maskz_permutexvar_epi8(0x5555_5555, scale_idx, z0[r]);
                                _mm512_cvtph_ps(_mm256_slli_epi16(
                                    _mm256_and_si256(
                                        _mm512_castsi512_si256(sb),
                                        _mm256_set1_epi16(0x7F),
                                    ),
                                    7,
                                ))
                            }
                        );
                    }};
                }
                let blocks = cols[0].len() / 16;
                let j00 = cols[0].start / 16;
                fast = blocks / 8;
                for g in 0..fast {
                    group!(g, j00 + 8 * g, !0u64, 0xFFu64, true);
                }
                // A last part group of one segment: its activations are zero-padded to 128.
                let tail = blocks % 8;
                if tail > 0 && cols.len() == 1 {
                    // At most 7 blocks: 63 bytes, all under the first mask.
                    group!(fast, j00 + 8 * fast, (1u64 << (9 * tail)) - 1, 0u64, false);
                    fast += 1;
                }
            }
            // The rest (or everything without VBMI), block by block.
            for (g, js) in super::Nvfp4Groups::starting(cols, fast) {
                let mut b = [[0i64; 8]; R];
                let mut s = [[0f32; 8]; R];
                for r in 0..R {
                    let row = base.add(r * stride);
                    for t in 0..8 {
                        if let Some(j) = js[t] {
                            let p = row.add(9 * j);
                            s[r][t] = *scales.add((*p & 0x7F) as usize) * (1.0 / 256.0);
                            b[r][t] = std::ptr::read_unaligned(p.add(1) as *const i64);
                        }
                    }
                }
                step!(
                    g,
                    |r| _mm512_setr_epi64(
                        b[r][0], b[r][1], b[r][2], b[r][3], b[r][4], b[r][5], b[r][6], b[r][7]
                    ),
                    |r| _mm512_permutexvar_ps(
                        sc_idx,
                        _mm512_castps256_ps512(_mm256_setr_ps(
                            s[r][0], s[r][1], s[r][2], s[r][3], s[r][4], s[r][5], s[r][6], s[r][7]
                        )),
                    )
                );
            }
            let mut out = [[0f32; A]; R];
            for a in 0..A {
                let sums = hsum_rows::<R>(std::array::from_fn(|r| acc[r][a]));
                for r in 0..R {
                    out[r][a] = sums[r];
                }
            }
            out
        }
    }

    /// FP8 E4M3 rows · bf16 x (vdpbf16ps): each byte widened to the bf16 of its value, exactly
    /// (normal codes by moving the exponent, subnormals by a table of eight).
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16,f16c,fma")]
    unsafe fn rows_fp8(strips: &[Strip], n: usize, acts: &[Act], y: *mut f32, ys: usize) {
        unsafe {
            tiles!(n, acts, y, ys, |r, R, xa, A| bf16_tile::<R, A, true>(
                strips, r, xa
            ))
        }
    }

    /// 32 E4M3 bytes → 32 bf16 of the same values.
    #[inline(always)]
    unsafe fn e4m3_to_bf16(v: __m256i) -> __m512i {
        unsafe {
            let w = _mm512_cvtepu8_epi16(v);
            let mag = _mm512_and_si512(w, _mm512_set1_epi16(0x7F));
            // e ≥ 1: bf16 exponent e − 7 + 127, mantissa bits moved up by 4.
            let normal = _mm512_add_epi16(_mm512_slli_epi16(mag, 4), _mm512_set1_epi16(120 << 7));
            // e = 0: m · 2⁻⁹ (bf16 bits of 0, 2⁻⁹, 2⁻⁸, 1.5·2⁻⁸, 2⁻⁷, 1.25·2⁻⁷, 1.5·2⁻⁷, 1.75·2⁻⁷).
            let sub = _mm512_permutexvar_epi16(
                mag,
                _mm512_setr_epi32(
                    0x3B00_0000,
                    0x3BC0_3B80,
                    0x3C20_3C00,
                    0x3C60_3C40,
                    0,
                    0,
                    0,
                    0,
                    0,
                    0,
                    0,
                    0,
                    0,
                    0,
                    0,
                    0,
                ),
            );
            let small = _mm512_cmplt_epu16_mask(mag, _mm512_set1_epi16(8));
            let m = _mm512_mask_mov_epi16(normal, small, sub);
            // Sign: bit 7 of the byte to bit 15.
            _mm512_or_si512(
                m,
                _mm512_and_si512(_mm512_slli_epi16(w, 8), _mm512_set1_epi16(-0x8000)),
            )
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use crate::kernels::x86::{f16s, hsum256 as hsum};
    use crate::tensor::DType;
    use std::arch::x86_64::*;
    use std::ops::Range;

    const PF: usize = 8;

    /// F32 / F16 / BF16 weights against f32 activations, 8 lanes at a time.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_float(dt: DType, row: &[u8], cols: &[Range<usize>], x: &[f32]) -> f32 {
        unsafe {
            let mut acc = _mm256_setzero_ps();
            let mut tail = 0f32;
            let mut k = 0usize;
            for c in cols {
                let n = c.len();
                let xp = x.as_ptr().add(k);
                let mut i = 0;
                while i + 8 <= n {
                    let j = c.start + i;
                    let w = match dt {
                        DType::F32 => _mm256_loadu_ps(row.as_ptr().add(4 * j) as *const f32),
                        DType::F16 => {
                            _mm256_cvtph_ps(_mm_loadu_si128(row.as_ptr().add(2 * j) as *const _))
                        }
                        // E4M3 · 2⁻⁸ is exactly the f16 with its bits moved up by 7 (the sum
                        // is scaled back below).
                        DType::F8E4M3 => {
                            let b =
                                _mm_cvtepu8_epi16(_mm_loadl_epi64(row.as_ptr().add(j) as *const _));
                            let h = _mm_or_si128(
                                _mm_slli_epi16(_mm_and_si128(b, _mm_set1_epi16(0x7F)), 7),
                                _mm_and_si128(_mm_slli_epi16(b, 8), _mm_set1_epi16(-0x8000)),
                            );
                            _mm256_mul_ps(_mm256_cvtph_ps(h), _mm256_set1_ps(256.0))
                        }
                        _ => _mm256_castsi256_ps(_mm256_slli_epi32(
                            _mm256_cvtepu16_epi32(_mm_loadu_si128(
                                row.as_ptr().add(2 * j) as *const _
                            )),
                            16,
                        )),
                    };
                    acc = _mm256_fmadd_ps(w, _mm256_loadu_ps(xp.add(i)), acc);
                    i += 8;
                }
                for i in i..n {
                    let j = c.start + i;
                    let w = match dt {
                        DType::F32 => f32::from_le_bytes(row[4 * j..4 * j + 4].try_into().unwrap()),
                        DType::F16 => f16s(row.as_ptr().add(2 * j)),
                        DType::F8E4M3 => crate::kernels::fp::e4m3_to_f32(row[j]),
                        _ => f32::from_bits(
                            (u16::from_le_bytes([row[2 * j], row[2 * j + 1]]) as u32) << 16,
                        ),
                    };
                    tail += w * *xp.add(i);
                }
                k += n;
            }
            hsum(acc) + tail
        }
    }

    macro_rules! by_four {
        ($n:expr, $y:expr, |$r:ident, $R:ident| $body:expr) => {{
            let mut $r = 0;
            while $r + 4 <= $n {
                const $R: usize = 4;
                let o: [f32; 4] = $body;
                $y[$r..$r + 4].copy_from_slice(&o);
                $r += 4;
            }
            while $r < $n {
                const $R: usize = 1;
                let o: [f32; 1] = $body;
                $y[$r] = o[0];
                $r += 1;
            }
        }};
    }

    /// Q8_0 · q8 with maddubs: |w| (unsigned) times x carrying w's sign, pairs summed to i16,
    /// then to i32.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn rows_q8_0(
        base: *const u8,
        stride: usize,
        n: usize,
        cols: &[Range<usize>],
        q: &[i8],
        d: &[f32],
        y: &mut [f32],
    ) {
        unsafe {
            by_four!(n, y, |r, R| q8_group::<R>(
                base.add(r * stride),
                stride,
                cols,
                q,
                d
            ))
        }
    }

    #[inline(always)]
    unsafe fn q8_group<const R: usize>(
        base: *const u8,
        stride: usize,
        cols: &[Range<usize>],
        q: &[i8],
        d: &[f32],
    ) -> [f32; R] {
        unsafe {
            let ones = _mm256_set1_epi16(1);
            let mut acc = [_mm256_setzero_ps(); R];
            let mut k = 0usize;
            for c in cols {
                let b0 = c.start / 32;
                for b in 0..c.len() / 32 {
                    let xv = _mm256_loadu_si256(q.as_ptr().add(32 * k) as *const _);
                    let dk = *d.get_unchecked(k);
                    for r in 0..R {
                        let p = base.add(r * stride + (b0 + b) * 34);
                        _mm_prefetch::<_MM_HINT_T0>(p.add(PF * stride) as *const i8);
                        let w = _mm256_loadu_si256(p.add(2) as *const _);
                        let prod =
                            _mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(xv, w));
                        let i = _mm256_madd_epi16(prod, ones);
                        acc[r] = _mm256_fmadd_ps(
                            _mm256_cvtepi32_ps(i),
                            _mm256_set1_ps(f16s(p) * dk),
                            acc[r],
                        );
                    }
                    k += 1;
                }
            }
            acc.map(|a| hsum(a))
        }
    }

    /// NVFP4 · q8 (interleaved): as the AVX-512 kernel, the low and high nibbles of four blocks
    /// in two vectors, with maddubs for dpbusd.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn rows_nvfp4(
        base: *const u8,
        stride: usize,
        n: usize,
        cols: &[Range<usize>],
        q: &[i8],
        d: &[f32],
        y: &mut [f32],
    ) {
        unsafe {
            by_four!(n, y, |r, R| nvfp4_group::<R>(
                base.add(r * stride),
                stride,
                cols,
                q,
                d
            ))
        }
    }

    #[inline(always)]
    unsafe fn nvfp4_group<const R: usize>(
        base: *const u8,
        stride: usize,
        cols: &[Range<usize>],
        q: &[i8],
        d: &[f32],
    ) -> [f32; R] {
        unsafe {
            // Doubled E2M1 values + 12, unsigned for maddubs; 12·Σx per lane is taken off.
            let lut =
                _mm256_broadcastsi128_si256(_mm_loadu_si128(super::E2M1X2_12.as_ptr() as *const _));
            let twelve = _mm256_set1_epi8(12);
            let lo = _mm256_set1_epi8(0x0F);
            let ones = _mm256_set1_epi16(1);
            let scales = crate::kernels::fp::E4M3.as_ptr();
            // A macro, not a closure: the intrinsics must be inlined where AVX2 is enabled.
            macro_rules! dot {
                ($w:expr, $x:expr) => {
                    _mm256_madd_epi16(_mm256_maddubs_epi16($w, $x), ones)
                };
            }
            let mut acc = [_mm256_setzero_ps(); R];
            for (g, js) in super::Nvfp4Groups::new(cols) {
                // Four 8-block halves: low nibbles of blocks 0-3 and 4-7, then the high ones.
                let xp = q.as_ptr().add(128 * g);
                let x = [
                    _mm256_loadu_si256(xp as *const _),
                    _mm256_loadu_si256(xp.add(32) as *const _),
                    _mm256_loadu_si256(xp.add(64) as *const _),
                    _mm256_loadu_si256(xp.add(96) as *const _),
                ];
                let dg = d.as_ptr().add(4 * g);
                let c12 = [
                    _mm256_add_epi32(dot!(twelve, x[0]), dot!(twelve, x[2])),
                    _mm256_add_epi32(dot!(twelve, x[1]), dot!(twelve, x[3])),
                ];
                for r in 0..R {
                    let row = base.add(r * stride);
                    _mm_prefetch::<_MM_HINT_T0>(
                        row.add(PF * stride + 9 * js[0].unwrap_unchecked()) as *const i8,
                    );
                    let mut b = [0i64; 8];
                    let mut s = [0f32; 8];
                    for t in 0..8 {
                        if let Some(j) = js[t] {
                            let p = row.add(9 * j);
                            s[t] = *scales.add((*p & 0x7F) as usize);
                            b[t] = std::ptr::read_unaligned(p.add(1) as *const i64);
                        }
                    }
                    for h in 0..2 {
                        let bytes =
                            _mm256_setr_epi64x(b[4 * h], b[4 * h + 1], b[4 * h + 2], b[4 * h + 3]);
                        let wl = _mm256_shuffle_epi8(lut, _mm256_and_si256(bytes, lo));
                        let wh = _mm256_shuffle_epi8(
                            lut,
                            _mm256_and_si256(_mm256_srli_epi16(bytes, 4), lo),
                        );
                        let i = _mm256_sub_epi32(
                            _mm256_add_epi32(dot!(wl, x[h]), dot!(wh, x[2 + h])),
                            c12[h],
                        );
                        let (d0, d1) = (*dg.add(2 * h), *dg.add(2 * h + 1));
                        let sv = _mm256_setr_ps(
                            s[4 * h] * d0,
                            s[4 * h] * d0,
                            s[4 * h + 1] * d0,
                            s[4 * h + 1] * d0,
                            s[4 * h + 2] * d1,
                            s[4 * h + 2] * d1,
                            s[4 * h + 3] * d1,
                            s[4 * h + 3] * d1,
                        );
                        acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(i), sv, acc[r]);
                    }
                }
            }
            acc.map(|a| hsum(a))
        }
    }

    /// Q4_0 / Q4_1 · q8: unsigned nibbles times signed x with maddubs; offsets from `xsum`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn rows_q4<const Q41: bool>(
        base: *const u8,
        stride: usize,
        n: usize,
        cols: &[Range<usize>],
        q: &[i8],
        d: &[f32],
        xsum: &[f32],
        y: &mut [f32],
    ) {
        unsafe {
            by_four!(n, y, |r, R| q4_group::<R, Q41>(
                base.add(r * stride),
                stride,
                cols,
                q,
                d,
                xsum
            ))
        }
    }

    #[inline(always)]
    unsafe fn q4_group<const R: usize, const Q41: bool>(
        base: *const u8,
        stride: usize,
        cols: &[Range<usize>],
        q: &[i8],
        d: &[f32],
        xsum: &[f32],
    ) -> [f32; R] {
        unsafe {
            let bb = if Q41 { 20 } else { 18 };
            let off = if Q41 { 4 } else { 2 };
            let lo = _mm_set1_epi8(0x0F);
            let ones = _mm256_set1_epi16(1);
            let mut acc = [_mm256_setzero_ps(); R];
            let mut corr = [0f32; R];
            let mut k = 0usize;
            for c in cols {
                let b0 = c.start / 32;
                for b in 0..c.len() / 32 {
                    let xv = _mm256_loadu_si256(q.as_ptr().add(32 * k) as *const _);
                    let (dk, xs) = (*d.get_unchecked(k), *xsum.get_unchecked(k));
                    for r in 0..R {
                        let p = base.add(r * stride + (b0 + b) * bb);
                        _mm_prefetch::<_MM_HINT_T0>(p.add(PF * stride) as *const i8);
                        let dw = f16s(p);
                        let m = if Q41 { f16s(p.add(2)) } else { -8.0 * dw };
                        let bytes = _mm_loadu_si128(p.add(off) as *const _);
                        let w = _mm256_set_m128i(
                            _mm_and_si128(_mm_srli_epi16(bytes, 4), lo),
                            _mm_and_si128(bytes, lo),
                        );
                        let i = _mm256_madd_epi16(_mm256_maddubs_epi16(w, xv), ones);
                        acc[r] =
                            _mm256_fmadd_ps(_mm256_cvtepi32_ps(i), _mm256_set1_ps(dw * dk), acc[r]);
                        corr[r] += m * xs;
                    }
                    k += 1;
                }
            }
            let mut out = [0f32; R];
            for r in 0..R {
                out[r] = hsum(acc[r]) + corr[r];
            }
            out
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::kernels::test_rnd as rnd;
    use crate::tensor::{Buf, Tensor};
    use half::{bf16, f16};
    use std::sync::Arc;

    pub(crate) fn tensor(dt: DType, n: usize, k: usize, v: &[f32]) -> Tensor {
        let mut b = vec![];
        for row in v.chunks(k) {
            match dt {
                DType::F32 => row
                    .iter()
                    .for_each(|x| b.extend_from_slice(&x.to_le_bytes())),
                DType::F16 => row
                    .iter()
                    .for_each(|x| b.extend_from_slice(&f16::from_f32(*x).to_le_bytes())),
                DType::BF16 => row
                    .iter()
                    .for_each(|x| b.extend_from_slice(&bf16::from_f32(*x).to_le_bytes())),
                DType::F8E4M3 => crate::kernels::fp::quantize_fp8(row, 0.004, &mut b),
                DType::Nvfp4 => crate::kernels::fp::quantize_nvfp4(row, 0.0003, &mut b),
                _ => quant::quantize_row(dt, row, &mut b),
            }
        }
        let scale = match dt {
            DType::F8E4M3 => 0.004,
            DType::Nvfp4 => 0.0003,
            _ => 1.0,
        };
        Tensor::new("w", dt, vec![n, k], Buf::Owned(Arc::new(b)))
            .unwrap()
            .with_scale(scale)
    }

    /// NVFP4 cuts fall on 16-value blocks, so the packed activation blocks of 32 straddle
    /// column segments (and a final half block is padded): the product still equals the
    /// dequantized weights', at one row and at many.
    #[test]
    fn nvfp4_on_sixteen_value_cuts() {
        let (n, k) = (37, 160);
        let rows = [0..9, 20..37];
        for cols in [
            vec![0..48],
            vec![16..48, 80..96, 128..160],
            vec![0..16],
            vec![0..112],
            vec![32..128, 144..160],
            vec![0..160],
            vec![16..160],
            vec![0..128, 144..160],
        ] {
            let (kk, nn) = (seg_len(&cols), seg_len(&rows));
            let w = tensor(DType::Nvfp4, n, k, &rnd(n * k, 3));
            let rl: Vec<usize> = rows.iter().flat_map(|r| r.clone()).collect();
            let cl: Vec<usize> = cols.iter().flat_map(|r| r.clone()).collect();
            for m in [1, 5] {
                let x = rnd(m * kk, 9);
                let mut y = vec![f32::NAN; m * nn];
                matvec_rows(&w, &rows, &cols, &x, &mut y);
                let mut deq = vec![0f32; k];
                for i in 0..m {
                    for (j, &r) in rl.iter().enumerate() {
                        quant::dequant_row(DType::Nvfp4, w.row(r), 0, &mut deq);
                        let (mut want, mut mag) = (0f64, 0f64);
                        for (c, &col) in cl.iter().enumerate() {
                            let p = (deq[col] * w.scale) as f64 * x[i * kk + c] as f64;
                            want += p;
                            mag += p.abs();
                        }
                        let got = y[i * nn + j] as f64;
                        assert!(
                            (got - want).abs() <= 1e-2 * mag + 1e-7,
                            "cols {cols:?} m={m} row {i} out {j}: {got} vs {want}"
                        );
                        // The same q8 activations through the scalar reference: this ISA's
                        // kernel differs from it by f32 summation order only.
                        let mut sc = ActScratch::default();
                        sc.prepare(ActKind::Q8, DType::Nvfp4, isa(), &x[i * kk..(i + 1) * kk]);
                        let r = 0.5
                            * w.scale as f64
                            * scalar_dot_nvfp4(w.row(r), &cols, &sc.q8.q, &sc.q8.d) as f64;
                        assert!(
                            (got - r).abs() <= 1e-5 * mag + 1e-9,
                            "cols {cols:?} m={m} row {i} out {j}: {got} vs scalar {r}"
                        );
                    }
                }
            }
        }
    }

    /// A batch of m activation rows gives each the bits it gets alone, for every width of the
    /// multi-row tiles (m = 1..70 crosses the 4-row tiles, their remainders and a second pass),
    /// and both agree with the dequantized weights in f64.
    #[test]
    fn batch_rows_equal_single_rows_bit_for_bit() {
        let (n, k) = (203, 320);
        let rows = [3..20, 40..97, 130..203];
        let cols = [0..64, 96..320];
        let (kk, nn) = (seg_len(&cols), seg_len(&rows));
        let wv = rnd(n * k, 7);
        for dt in [
            DType::F32,
            DType::F16,
            DType::BF16,
            DType::Q8_0,
            DType::Q4_0,
            DType::Q4_1,
            DType::Q5_0,
            DType::Q5_1,
            DType::F8E4M3,
            DType::Nvfp4,
        ] {
            let w = tensor(dt, n, k, &wv);
            let mut deq = vec![0f32; k];
            let rl: Vec<usize> = rows.iter().flat_map(|r| r.clone()).collect();
            let cl: Vec<usize> = cols.iter().flat_map(|r| r.clone()).collect();
            for m in [1, 2, 3, 4, 5, 7, 16, 33, 64, 70] {
                let x = rnd(m * kk, 100 + m as u64);
                let mut y = vec![f32::NAN; m * nn];
                matvec_rows(&w, &rows, &cols, &x, &mut y);
                for i in 0..m {
                    let mut yi = vec![f32::NAN; nn];
                    matvec(&w, &rows, &cols, &x[i * kk..(i + 1) * kk], &mut yi);
                    for j in 0..nn {
                        assert_eq!(
                            y[i * nn + j].to_bits(),
                            yi[j].to_bits(),
                            "{dt} m={m} row {i} out {j}: batch {} alone {}",
                            y[i * nn + j],
                            yi[j]
                        );
                    }
                    for (j, &r) in rl.iter().enumerate() {
                        quant::dequant_row(dt, &w.bytes()[r * w.row_bytes()..], 0, &mut deq);
                        deq.iter_mut().for_each(|v| *v *= w.scale);
                        let (mut want, mut mag) = (0f64, 0f64);
                        for (c, &col) in cl.iter().enumerate() {
                            let p = deq[col] as f64 * x[i * kk + c] as f64;
                            want += p;
                            mag += p.abs();
                        }
                        let got = y[i * nn + j] as f64;
                        assert!(
                            (got - want).abs() <= 1e-2 * mag + 1e-6,
                            "{dt} m={m} row {i} out {j}: {got} vs {want} (Σ|wx| {mag})"
                        );
                    }
                }
            }
        }
    }
}
