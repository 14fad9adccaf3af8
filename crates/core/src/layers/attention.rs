//! Causal GQA attention with an optional rotary embedding (Llama) or none (Nemotron-H, spec §2.4).
//! Budget: the first `heads / kv_heads` query heads of every KV group; K/V heads are never cut,
//! so the KV cache has the same layout under every budget and a sequence can switch budgets.

use super::{Observer, Part, PartState, Scratch, SyncPtr, add_bias, buf, linear_rows};
use crate::budget::{Axis, LayerBudget};
use crate::kernels::gemm::gemm_nt;
use crate::kernels::ops::{attend_head, softmax};
use crate::kernels::pool::pool;

/// Query rows per block of the causal prefill product (a multiple of the GEMM's 8-row tile).
const CAUSAL_BLOCK: usize = 64;

pub struct Rope {
    /// Inverse frequencies, head_dim/2 of them.
    pub inv_freq: Vec<f32>,
    /// Pairs (2i, 2i+1) as GGUF's permuted q/k use, instead of HF's (i, i + d/2).
    pub interleaved: bool,
}

impl Rope {
    pub fn new(head_dim: usize, theta: f32, interleaved: bool) -> Rope {
        let inv_freq = (0..head_dim / 2)
            .map(|i| 1.0 / theta.powf((2 * i) as f32 / head_dim as f32))
            .collect();
        Rope {
            inv_freq,
            interleaved,
        }
    }
    /// Rotates one head vector in place for position `pos`.
    pub fn apply(&self, x: &mut [f32], pos: usize) {
        let half = x.len() / 2;
        for i in 0..half {
            let (sin, cos) = (pos as f32 * self.inv_freq[i]).sin_cos();
            let (a, b) = if self.interleaved {
                (2 * i, 2 * i + 1)
            } else {
                (i, i + half)
            };
            let (x0, x1) = (x[a], x[b]);
            x[a] = x0 * cos - x1 * sin;
            x[b] = x1 * cos + x0 * sin;
        }
    }
}

pub struct Attention {
    pub q: crate::tensor::Tensor,
    pub k: crate::tensor::Tensor,
    pub v: crate::tensor::Tensor,
    pub o: crate::tensor::Tensor,
    pub q_bias: Option<super::Vector>,
    pub k_bias: Option<super::Vector>,
    pub v_bias: Option<super::Vector>,
    pub o_bias: Option<super::Vector>,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub rope: Option<Rope>,
}

/// K and V of one attention layer, [kv_heads][capacity][head_dim] each.
pub struct KvCache {
    pub k: Vec<f32>,
    pub v: Vec<f32>,
    pub cap: usize,
    pub heads: usize,
    pub dim: usize,
}

impl KvCache {
    /// None when the memory cannot be allocated (or its size overflows).
    pub fn try_new(kv_heads: usize, head_dim: usize, cap: usize) -> Option<KvCache> {
        let n = kv_heads.checked_mul(cap)?.checked_mul(head_dim)?;
        Some(KvCache {
            k: super::try_zeroed(n)?,
            v: super::try_zeroed(n)?,
            cap,
            heads: kv_heads,
            dim: head_dim,
        })
    }

    /// Copies positions 0..len of every head from `src` (same heads and head size).
    pub fn copy_prefix(&mut self, src: &KvCache, len: usize) {
        let d = self.dim;
        for h in 0..self.heads {
            let (s, o) = (h * src.cap * d, h * self.cap * d);
            self.k[o..o + len * d].copy_from_slice(&src.k[s..s + len * d]);
            self.v[o..o + len * d].copy_from_slice(&src.v[s..s + len * d]);
        }
    }
}

impl Attention {
    /// out[T, hidden] = Attn(x[T, hidden]) for the T rows of a batch of `parts` (each at its own
    /// positions, over its own KV cache); the first `decode` rows belong to stepwise parts.
    pub fn forward(
        &self,
        lb: &LayerBudget,
        hidden: usize,
        x: &[f32],
        out: &mut [f32],
        parts: &[Part],
        decode: usize,
        kv: &mut dyn PartState<KvCache>,
        s: &mut Scratch,
        obs: &mut dyn Observer,
        layer: usize,
    ) {
        let t = x.len() / hidden;
        let d = self.head_dim;
        let nq = lb.size(Axis::Heads);
        let kvd = self.kv_heads * d;
        let hid = [0..hidden];
        let kvr = [0..kvd];
        let q = buf(&mut s.a, t * nq * d);
        if obs.enabled() {
            obs.weight_input(&self.q, &hid, x);
        }
        linear_rows(&self.q, &lb.q_rows, &hid, x, q, decode);
        add_bias(&self.q_bias, &lb.q_rows, q);
        let kb = buf(&mut s.b, t * kvd);
        if obs.enabled() {
            obs.weight_input(&self.k, &hid, x);
        }
        linear_rows(&self.k, &kvr, &hid, x, kb, decode);
        add_bias(&self.k_bias, &kvr, kb);
        let vb = buf(&mut s.c, t * kvd);
        if obs.enabled() {
            obs.weight_input(&self.v, &hid, x);
        }
        linear_rows(&self.v, &kvr, &hid, x, vb, decode);
        add_bias(&self.v_bias, &kvr, vb);
        let att = buf(&mut s.d, t * nq * d);
        // Single-token steps (decode rows, and stepwise parts token by token as decode steps
        // would go): rotary and KV writes first, then all (step, head) pairs in one parallel
        // pass. Multi-token parts go through the prefill path one part at a time.
        let steps = &mut s.u;
        steps.clear();
        let mut sc_len = 0;
        for (pi, p) in parts.iter().enumerate() {
            let cache = kv.state(pi);
            if !(p.stepwise || p.len == 1) {
                let r = p.row;
                self.attend(
                    nq,
                    &mut q[r * nq * d..(r + p.len) * nq * d],
                    &kb[r * kvd..(r + p.len) * kvd],
                    &vb[r * kvd..(r + p.len) * kvd],
                    cache,
                    p.pos,
                    &mut att[r * nq * d..(r + p.len) * nq * d],
                    &mut s.e,
                );
                continue;
            }
            for i in 0..p.len {
                let (r, pos) = (p.row + i, p.pos + i);
                self.rope_and_store(
                    nq,
                    &mut q[r * nq * d..(r + 1) * nq * d],
                    &kb[r * kvd..(r + 1) * kvd],
                    &vb[r * kvd..(r + 1) * kvd],
                    cache,
                    pos,
                );
                // (row, position, cache, scores offset); the caches are only read from here on.
                steps.extend([r, pos, cache as *const KvCache as usize, sc_len]);
                sc_len += nq * (pos + 1);
            }
        }
        let n = steps.len() / 4;
        if n > 0 {
            let sc = SyncPtr(buf(&mut s.e, sc_len).as_mut_ptr());
            let attp = SyncPtr(att.as_mut_ptr());
            let (q, steps) = (&*q, &*steps);
            let per_group = nq / self.kv_heads;
            let scale = 1.0 / (d as f32).sqrt();
            let work = |job: usize| {
                let (st, h) = (job / nq, job % nq);
                let [r, pos, cache, off] = steps[4 * st..4 * st + 4] else {
                    unreachable!()
                };
                // Safety: the caches outlive this pass and nothing writes them during it.
                let kv = unsafe { &*(cache as *const KvCache) };
                let len = pos + 1;
                let base = (h / per_group) * kv.cap * d;
                let row = r * nq * d + h * d;
                // Safety: each (step, head) owns its scores and output slices.
                let (sc, o) = unsafe { (sc.slice(off + h * len, len), attp.slice(row, d)) };
                attend_head(
                    &q[row..row + d],
                    &kv.k[base..base + len * d],
                    &kv.v[base..base + len * d],
                    scale,
                    sc,
                    o,
                );
            };
            if sc_len * d < 1 << 15 {
                (0..n * nq).for_each(work);
            } else {
                pool().for_each(n * nq, work);
            }
        }
        if obs.enabled() {
            obs.attention(layer, att, nq, d);
        }
        if obs.enabled() {
            obs.weight_input(&self.o, &lb.q_rows, att);
        }
        linear_rows(&self.o, &hid, &lb.q_rows, att, out, decode);
        add_bias(&self.o_bias, &hid, out);
    }

    /// Rotary embedding of one token's query heads and KV heads, and the KV write at `pos`.
    fn rope_and_store(
        &self,
        nq: usize,
        q: &mut [f32],
        k: &[f32],
        v: &[f32],
        kv: &mut KvCache,
        pos: usize,
    ) {
        let d = self.head_dim;
        for h in 0..self.kv_heads {
            let dst = (h * kv.cap + pos) * d;
            kv.k[dst..dst + d].copy_from_slice(&k[h * d..(h + 1) * d]);
            kv.v[dst..dst + d].copy_from_slice(&v[h * d..(h + 1) * d]);
            if let Some(r) = &self.rope {
                r.apply(&mut kv.k[dst..dst + d], pos);
            }
        }
        if let Some(r) = &self.rope {
            for h in 0..nq {
                r.apply(&mut q[h * d..(h + 1) * d], pos);
            }
        }
    }

    /// Rotary embedding, the KV write and causal attention for `t` > 1 tokens of one sequence at
    /// positions pos0..pos0+t: q [t][nq·d], k/v [t][kv·d] → att [t][nq·d].
    fn attend(
        &self,
        nq: usize,
        q: &mut [f32],
        kb: &[f32],
        vb: &[f32],
        kv: &mut KvCache,
        pos0: usize,
        att: &mut [f32],
        scratch: &mut Vec<f32>,
    ) {
        let d = self.head_dim;
        let t = q.len() / (nq * d);
        let kvd = self.kv_heads * d;
        for ti in 0..t {
            self.rope_and_store(
                nq,
                &mut q[ti * nq * d..(ti + 1) * nq * d],
                &kb[ti * kvd..(ti + 1) * kvd],
                &vb[ti * kvd..(ti + 1) * kvd],
                kv,
                pos0 + ti,
            );
        }
        let len = pos0 + t;
        let per_group = nq / self.kv_heads;
        let scale = 1.0 / (d as f32).sqrt();
        let threads = pool().threads();
        let q = &*q;
        let kvr = &*kv;
        let attp = SyncPtr(att.as_mut_ptr());
        // V transposed per KV head, [kv][d][len], for the P·V product.
        let vt = buf(scratch, self.kv_heads * d * len + threads * t * len);
        let (vt, scores) = vt.split_at_mut(self.kv_heads * d * len);
        for g in 0..self.kv_heads {
            for j in 0..len {
                for c in 0..d {
                    vt[(g * d + c) * len + j] = kvr.v[(g * kvr.cap + j) * d + c];
                }
            }
        }
        let vt = &*vt;
        let scp = SyncPtr(scores.as_mut_ptr());
        pool().for_chunks(nq, 1, |tid, heads| {
            let sc = unsafe { scp.slice(tid * t * len, t * len) };
            for h in heads {
                let g = h / per_group;
                let kbase = g * kvr.cap * d;
                // Causal: each block of query rows reads only the positions its last row sees.
                for t0 in (0..t).step_by(CAUSAL_BLOCK) {
                    let tb = CAUSAL_BLOCK.min(t - t0);
                    let lb = pos0 + t0 + tb;
                    let sc = &mut sc[t0 * len..];
                    let qb = &q[t0 * nq * d + h * d..];
                    gemm_nt(tb, lb, d, qb, nq * d, &kvr.k[kbase..], d, sc, len);
                    for i in 0..tb {
                        let row = &mut sc[i * len..i * len + lb];
                        let valid = pos0 + t0 + i + 1;
                        for v in row[..valid].iter_mut() {
                            *v *= scale;
                        }
                        softmax(&mut row[..valid]);
                        row[valid..].fill(0.0);
                    }
                    // O_h[T, d] = P[T, len] · V[len, d]
                    let o = unsafe { attp.slice(t0 * nq * d + h * d, (tb - 1) * nq * d + d) };
                    gemm_nt(tb, d, lb, sc, len, &vt[g * d * len..], len, o, nq * d);
                }
            }
        });
    }
}
