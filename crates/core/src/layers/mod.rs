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
    /// view is named `NAME[e]`): [T, active inputs]. Calibrates FP8/NVFP4 `input_scale`.
    fn weight_input(&mut self, _w: &Tensor, _x: &[f32]) {}
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
