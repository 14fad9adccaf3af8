//! Layer types: the four mixers of a hybrid block list (attention, Mamba-2, MLP, MoE). Each
//! runs on T tokens of active hidden width under one [`LayerBudget`](crate::budget::LayerBudget).

pub mod attention;
pub mod mamba2;
pub mod mlp;
pub mod moe;

use crate::kernels::quant::ToF32;
use crate::kernels::{gemm, gemv};
use crate::tensor::Tensor;
use std::ops::Range;

/// Which down projection an [`Observer`] sees the input of.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ffn {
    Dense,
    Shared,
    Expert(usize),
}

/// Forward hooks for importance estimation (method doc §2): the activations each elastic axis is
/// ranked by. Called only when `enabled()`; the plain forward passes [`Silent`].
pub trait Observer {
    fn enabled(&self) -> bool {
        true
    }
    /// Output of a pre-block norm (the block's input), [T, hidden].
    fn norm(&mut self, _layer: usize, _x: &[f32], _hidden: usize) {}
    /// Input of o_proj, [T, heads · head_dim] (active heads, group-major).
    fn attention(&mut self, _layer: usize, _x: &[f32], _heads: usize, _head_dim: usize) {}
    /// The x part of Mamba's in_proj output (before the conv), [T, heads · head_dim].
    fn mamba_x(&mut self, _layer: usize, _x: &[f32], _width: usize) {}
    /// Input of a down projection (after the activation), [T, width].
    fn down_input(&mut self, _layer: usize, _which: Ffn, _x: &[f32], _width: usize) {}
    /// One token's output of routed expert `expert`, with its gate weight.
    fn expert_output(&mut self, _layer: usize, _expert: usize, _weight: f32, _y: &[f32]) {}
    /// The input of a matrix product with weight `w` (its checkpoint name; a stacked expert's
    /// view is named `NAME[e]`) over its parent columns `cols`: [T, active inputs]. Calibrates
    /// FP8/NVFP4 `input_scale`; gives the column cuts of [`Model::panel`](crate::model::Model::panel).
    fn weight_input(&mut self, _w: &Tensor, _cols: &[Range<usize>], _x: &[f32]) {}
}

/// The observer of a plain forward: no hooks.
pub struct Silent;
impl Observer for Silent {
    fn enabled(&self) -> bool {
        false
    }
}

/// y[T, rows] = x[T, cols] · W[rows, cols]ᵀ: one token uses the decode product, more use the GEMM.
pub fn linear(w: &Tensor, rows: &[Range<usize>], cols: &[Range<usize>], x: &[f32], y: &mut [f32]) {
    linear_rows(w, rows, cols, x, y, 0);
}

/// [`linear`] over a batch whose first `decode` rows are decode tokens: those take the decode
/// product (all of them in one read of the weights, each bit-identical to its token alone), the
/// rest as [`linear`] would (the GEMM, or the decode product for a single row).
pub fn linear_rows(
    w: &Tensor,
    rows: &[Range<usize>],
    cols: &[Range<usize>],
    x: &[f32],
    y: &mut [f32],
    decode: usize,
) {
    if let Some(p) = &w.panels {
        return paneled(p, rows, cols, x, y, decode);
    }
    let k: usize = cols.iter().map(|r| r.len()).sum();
    let n: usize = rows.iter().map(|r| r.len()).sum();
    let (xd, xr) = x.split_at(decode * k);
    let (yd, yr) = y.split_at_mut(decode * n);
    if decode > 0 {
        gemv::matvec_rows(w, rows, cols, xd, yd);
    }
    if xr.len() == k {
        gemv::matvec(w, rows, cols, xr, yr);
    } else if !xr.is_empty() {
        gemm::matmul(w, rows, cols, xr, yr);
    }
}

/// Grow-only buffers of [`paneled`]: the pieces of `cols` in each panel, the panels' columns
/// and inputs, and a partial product.
#[derive(Default)]
struct PanelScratch {
    /// (offset in the packed input, place in a row of `x`) of each piece of `cols` in a panel.
    pieces: Vec<(usize, Range<usize>)>,
    /// Per touched panel: (panel, its range in `cols`, its columns in a row of `x`).
    touched: Vec<(usize, Range<usize>, Range<usize>)>,
    cols: Vec<Range<usize>>,
    /// [t][k]: each row the touched panels' inputs one after another.
    x: Vec<f32>,
    /// One panel's inputs for the GEMM, [t][k_p].
    xp: Vec<f32>,
    y: Vec<f32>,
}

thread_local! {
    static PANELS: std::cell::RefCell<PanelScratch> = std::cell::RefCell::default();
}

/// [`linear_rows`] over a matrix re-laid in column panels ([`Tensor::relay`]): the products of
/// the panels over their parts of `cols`, summed (decode rows in one pass of the thread pool,
/// [`gemv::matvec_sum`]). A budget that reads panel 0 runs exactly the product of its sliced
/// copy.
fn paneled(
    panels: &[crate::tensor::Panel],
    rows: &[Range<usize>],
    cols: &[Range<usize>],
    x: &[f32],
    y: &mut [f32],
    decode: usize,
) {
    let k: usize = cols.iter().map(|r| r.len()).sum();
    let n: usize = rows.iter().map(|r| r.len()).sum();
    if k == 0 || n == 0 {
        y.fill(0.0);
        return;
    }
    // A budget that reads exactly panel 0 (the smallest one: a view) is its sliced copy.
    let p0 = &panels[0];
    if cols == p0.cols.as_slice() {
        return linear_rows(&p0.t, rows, &[0..k], x, y, decode);
    }
    let t = x.len() / k;
    PANELS.with(|s| {
        let s = &mut *s.borrow_mut();
        // Each segment of `cols` cut at the panels' columns, panel by panel: the panel's local
        // columns (merged where adjacent) and where its inputs come from and go.
        s.pieces.clear();
        s.touched.clear();
        s.cols.clear();
        let mut at = 0;
        for (pi, p) in panels.iter().enumerate() {
            let (c0, k0) = (s.cols.len(), at);
            let mut xo = 0;
            for seg in cols {
                let mut lo = 0;
                for r in &p.cols {
                    let (a, b) = (seg.start.max(r.start), seg.end.min(r.end));
                    if a < b {
                        let local = lo + a - r.start..lo + b - r.start;
                        s.pieces.push((xo + a - seg.start, at..at + local.len()));
                        at += local.len();
                        let own = s.cols.len() > c0;
                        match s.cols.last_mut() {
                            Some(l) if own && l.end == local.start => l.end = local.end,
                            _ => s.cols.push(local),
                        }
                    }
                    lo += r.len();
                }
                xo += seg.len();
            }
            if at > k0 {
                s.touched.push((pi, c0..s.cols.len(), k0..at));
            }
        }
        debug_assert_eq!(at, k);
        let xs = buf(&mut s.x, t * k);
        for (xi, xo) in x.chunks(k).zip(xs.chunks_mut(k)) {
            for (from, to) in &s.pieces {
                xo[to.clone()].copy_from_slice(&xi[*from..*from + to.len()]);
            }
        }
        let (xs, cs, touched) = (&s.x[..t * k], &s.cols[..], &s.touched[..]);
        let mut ops = [gemv::Operand {
            w: &p0.t,
            cols: &[],
        }; gemv::MAX_OPERANDS];
        for (o, (pi, cr, _)) in ops.iter_mut().zip(touched) {
            *o = gemv::Operand {
                w: &panels[*pi].t,
                cols: &cs[cr.clone()],
            };
        }
        let ops = &ops[..touched.len()];
        let (yd, yr) = y.split_at_mut(decode * n);
        if decode > 0 {
            gemv::matvec_sum(ops, rows, &xs[..decode * k], yd);
        }
        match t - decode {
            0 => {}
            1 => gemv::matvec_sum(ops, rows, &xs[decode * k..], yr),
            tr => {
                for (i, (o, (_, _, kr))) in ops.iter().zip(touched).enumerate() {
                    let xp = buf(&mut s.xp, tr * kr.len());
                    for (xi, xo) in xs[decode * k..].chunks(k).zip(xp.chunks_mut(kr.len())) {
                        xo.copy_from_slice(&xi[kr.clone()]);
                    }
                    if i == 0 {
                        gemm::matmul(o.w, rows, o.cols, xp, yr);
                    } else {
                        let part = buf(&mut s.y, yr.len());
                        gemm::matmul(o.w, rows, o.cols, xp, part);
                        yr.iter_mut().zip(part.iter()).for_each(|(a, b)| *a += b);
                    }
                }
            }
        }
    });
}

/// One sequence's rows in a batched forward: rows `row..row + len` of the batch are its tokens at
/// positions `pos..pos + len`. A `stepwise` part (every part of one token is) runs its tokens
/// one after another through the decode path, so its results equal `len` single-token forwards
/// bit for bit; its rows come first in the batch (see [`linear_rows`]). Other parts run as one
/// prefill chunk.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Part {
    pub row: usize,
    pub len: usize,
    pub pos: usize,
    pub stepwise: bool,
}

/// The per-sequence state (a KV cache, a Mamba state) of each part of a batch, for one layer.
pub trait PartState<S> {
    fn state(&mut self, part: usize) -> &mut S;
}

/// A small f32 weight (norm, bias, conv, router) under the checkpoint name it was read from
/// (empty where the loader made it up, e.g. a zero bias), so training exports by that name.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Vector {
    pub name: String,
    pub data: Vec<f32>,
}

impl Vector {
    pub fn zeros(n: usize) -> Vector {
        Vector {
            name: String::new(),
            data: vec![0.0; n],
        }
    }
    pub fn of(t: &Tensor) -> Vector {
        Vector {
            name: t.name.clone(),
            data: t.to_f32(),
        }
    }
    /// The same name over values mapped by `f`.
    pub fn map(&self, f: impl Fn(f32) -> f32) -> Vector {
        Vector {
            name: self.name.clone(),
            data: self.data.iter().map(|&v| f(v)).collect(),
        }
    }
}

impl std::ops::Deref for Vector {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        &self.data
    }
}

/// Adds a bias (given for the parent's rows) to each of the T rows of `y`, over the row segments.
pub fn add_bias(bias: &Option<Vector>, rows: &[Range<usize>], y: &mut [f32]) {
    let Some(b) = bias else { return };
    let n: usize = rows.iter().map(|r| r.len()).sum();
    for row in y.chunks_mut(n) {
        let mut k = 0;
        for r in rows {
            for (o, bv) in row[k..k + r.len()].iter_mut().zip(&b[r.clone()]) {
                *o += bv;
            }
            k += r.len();
        }
    }
}

/// Grow-only scratch buffers of a forward pass (owned by the worker's `Work`), so decode
/// allocates nothing.
#[derive(Default)]
pub struct Scratch {
    pub a: Vec<f32>,
    pub b: Vec<f32>,
    pub c: Vec<f32>,
    pub d: Vec<f32>,
    pub e: Vec<f32>,
    /// Indices (MoE token lists).
    pub u: Vec<usize>,
}

/// `&mut v[..n]`, growing `v` if needed.
pub fn buf(v: &mut Vec<f32>, n: usize) -> &mut [f32] {
    if v.len() < n {
        v.resize(n, 0.0);
    }
    &mut v[..n]
}

/// `n` zeros, or None when the allocator refuses (like `vec![0.0; n]`, whose untouched pages the
/// OS supplies lazily, but fallible).
pub fn try_zeroed(n: usize) -> Option<Vec<f32>> {
    if n == 0 {
        return Some(Vec::new());
    }
    let layout = std::alloc::Layout::array::<f32>(n).ok()?;
    // Safety: the layout has a non-zero size; zeroed bytes are valid f32s; the vector takes over
    // an allocation of the global allocator with exactly this layout.
    unsafe {
        let p = std::alloc::alloc_zeroed(layout) as *mut f32;
        (!p.is_null()).then(|| Vec::from_raw_parts(p, n, n))
    }
}

#[derive(Clone, Copy)]
pub struct SyncPtr<T>(pub *mut T);
unsafe impl<T> Send for SyncPtr<T> {}
unsafe impl<T> Sync for SyncPtr<T> {}
impl<T> SyncPtr<T> {
    /// # Safety
    /// Callers write disjoint parts from different threads.
    pub unsafe fn slice<'a>(self, off: usize, len: usize) -> &'a mut [T] {
        unsafe { std::slice::from_raw_parts_mut(self.0.add(off), len) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::gemv::tests::tensor;
    use crate::kernels::test_rnd as rnd;
    use crate::tensor::DType;

    /// A matrix re-laid in column panels gives the products of its row layout (up to the order
    /// of the panel sums), for every format, over column sets that follow the panels, cut
    /// through them or skip some, and for decode rows, a lone token and the GEMM; decode rows
    /// of a batch stay bit-identical to each row alone.
    #[test]
    fn panels_match_the_row_layout() {
        use DType::*;
        for dt in [
            F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4K, Q5K, Q6K, F8E4M3, Nvfp4,
        ] {
            let u = dt.block_len().max(32);
            let (n, k, big) = (40, 8 * u, 640);
            let w = match crate::kernels::quant::can_quantize(dt) || !dt.is_quantized() {
                true => tensor(dt, big, k, &rnd(big * k, 7)),
                false => {
                    let b = crate::kernels::qdot::tests::blocks(dt, big * k / 256, 7);
                    let b = crate::tensor::Buf::Owned(std::sync::Arc::new(b));
                    Tensor::new("w", dt, vec![big, k], b).unwrap()
                }
            };
            let sets = vec![vec![0..u, 2 * u..3 * u], vec![0..4 * u], vec![0..6 * u]];
            let mut p = w.clone();
            p.panels = Some(w.relay(&sets).expect("aligned cuts").into());
            assert_eq!(p.panels.as_ref().unwrap().len(), 4, "{dt}");
            let colsets = [
                sets[0].clone(),
                sets[1].clone(),
                vec![0..k],
                vec![u..3 * u, 5 * u..7 * u],
                vec![3 * u..4 * u],
            ];
            for cols in &colsets {
                let kk: usize = cols.iter().map(|r| r.len()).sum();
                for rows in [vec![0..n], vec![3..10, 20..33], vec![0..n, n..big]] {
                    let nn: usize = rows.iter().map(|r| r.len()).sum();
                    for (t, decode) in [(1, 0), (1, 1), (3, 3), (5, 2), (4, 0)] {
                        let x = rnd(t * kk, 11 + t as u64);
                        let (mut a, mut b) = (vec![0.0; t * nn], vec![0.0; t * nn]);
                        linear_rows(&w, &rows, cols, &x, &mut a, decode);
                        linear_rows(&p, &rows, cols, &x, &mut b, decode);
                        let mx = a.iter().fold(0f32, |m, v| m.max(v.abs()));
                        for (i, (va, vb)) in a.iter().zip(&b).enumerate() {
                            assert!(
                                (va - vb).abs() <= 1e-5 * mx,
                                "{dt} cols {cols:?} rows {rows:?} t {t} decode {decode} [{i}]: {va} vs {vb}"
                            );
                        }
                        for i in 0..decode {
                            let mut one = vec![0.0; nn];
                            linear_rows(&p, &rows, cols, &x[i * kk..(i + 1) * kk], &mut one, 1);
                            assert_eq!(one, b[i * nn..(i + 1) * nn], "{dt} decode row {i}");
                        }
                    }
                }
            }
            // Panel 0 is the sliced matrix: products inside it equal the plain ones exactly.
            let x = rnd(2 * u, 5);
            let (mut a, mut b) = (vec![0.0; n], vec![0.0; n]);
            let slice = &p.panels.as_ref().unwrap()[0].t;
            linear(slice, &[0..n], &[0..2 * u], &x, &mut a);
            linear(&p, &[0..n], &sets[0], &x, &mut b);
            assert_eq!(a, b, "{dt}: panel 0");
        }
    }

    /// Cuts inside a quantization block, or a single panel, leave the row layout alone.
    #[test]
    fn relay_refuses_split_blocks() {
        let w = tensor(DType::Q8_0, 4, 128, &rnd(4 * 128, 3));
        assert!(w.relay(&[vec![0..48]]).is_none());
        assert!(w.relay(&[vec![0..128]]).is_none());
        assert!(w.relay(&[vec![0..64]]).is_some());
    }
}
