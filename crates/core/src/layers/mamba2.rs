//! Mamba-2 mixer (spec §2.3): in_proj → causal depthwise conv + SiLU on xBC → Δ = softplus(dt +
//! dt_bias) → selective scan with scalar A per head (SSD chunked scan for prefill, the recurrence
//! for decode; state in f32) → gated grouped RMSNorm (gate before norm) → out_proj.
//! Budget: the first `mamba_heads / groups` heads of every group and the first `mamba_head_dim`
//! channels of every head; B/C are never cut and the norm keeps its G groups.

use super::{Observer, Part, PartState, Scratch, SyncPtr, Vector, buf, linear_rows};
use crate::budget::{Axis, LayerBudget};
use crate::kernels::gemm::gemm_nt;
use crate::kernels::ops::{exp_inplace, silu, silu_mul, softplus};
use crate::kernels::pool::pool;
use crate::tensor::Tensor;

pub struct Mamba2 {
    pub in_proj: Tensor,
    pub out_proj: Tensor,
    /// [conv_dim][K]
    pub conv_w: Vector,
    pub conv_b: Vector,
    pub dt_bias: Vector,
    /// A = −exp(A_log), per head (named after the A_log or A tensor it came from).
    pub a: Vector,
    pub d: Vector,
    /// Gated-norm weight, [d_inner].
    pub norm: Vector,
    pub heads: usize,
    pub head_dim: usize,
    pub groups: usize,
    pub state: usize,
    pub conv_k: usize,
    /// SSD chunk length for prefill (`chunk_size`); any value gives the same result in exact
    /// arithmetic (spec §2.3.7).
    pub chunk: usize,
    pub dt_min: f32,
    pub dt_max: f32,
    pub eps: f32,
}

/// Recurrent state of one Mamba layer in the parent's layout: conv window [conv_dim][K-1]
/// (oldest first) and SSM state [heads][head_dim][state], f32.
#[derive(Clone)]
pub struct MambaState {
    pub conv: Vec<f32>,
    pub ssm: Vec<f32>,
}

/// One Mamba layer's state in a sequence, with checkpoints for rolling it back: `ring[q % K]`
/// holds the state at position q (before token q) for recent positions q; which position each
/// slot holds is tracked by the sequence (the same for every layer).
///
/// Checkpoints rather than input replay: restoring is one copy, exact under any mix of budgets
/// (the whole parent-layout state is kept, so channels a draft budget left untouched come back
/// too), and a stepwise verify pass produces the state at every position anyway. The price is
/// memory, K × (conv + SSM state) per Mamba layer and sequence, and one state copy per token.
#[derive(Clone)]
pub struct MambaCache {
    pub state: MambaState,
    pub ring: Vec<MambaState>,
}

impl MambaCache {
    /// Saves the current state as that of position `pos` (no-op without checkpoints).
    pub fn save(&mut self, pos: usize) {
        let k = self.ring.len();
        if k > 0 {
            self.ring[pos % k].copy_from(&self.state);
        }
    }
}

impl MambaState {
    pub fn copy_from(&mut self, o: &MambaState) {
        self.conv.copy_from_slice(&o.conv);
        self.ssm.copy_from_slice(&o.ssm);
    }
    /// Back to the state of an empty sequence.
    pub fn clear(&mut self) {
        self.conv.fill(0.0);
        self.ssm.fill(0.0);
    }
    /// Floats in one state.
    pub fn len(&self) -> usize {
        self.conv.len() + self.ssm.len()
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Mamba2 {
    /// Floats of one layer's state (conv window and SSM state).
    pub fn state_len(&self) -> usize {
        self.conv_dim() * (self.conv_k - 1) + self.heads * self.head_dim * self.state
    }
    /// A zeroed state, or None when the memory cannot be allocated.
    pub fn try_state(&self) -> Option<MambaState> {
        Some(MambaState {
            conv: super::try_zeroed(self.conv_dim() * (self.conv_k - 1))?,
            ssm: super::try_zeroed(self.heads * self.head_dim * self.state)?,
        })
    }
    pub fn d_inner(&self) -> usize {
        self.heads * self.head_dim
    }
    pub fn conv_dim(&self) -> usize {
        self.d_inner() + 2 * self.groups * self.state
    }

    /// out[T, hidden] for the T rows of a batch of `parts`, each part on its own state; the first
    /// `decode` rows belong to stepwise parts. The state before each stepwise token, and before
    /// each prefill chunk, is saved to the part's checkpoint ring (if it has one).
    pub fn forward(
        &self,
        lb: &LayerBudget,
        hidden: usize,
        x: &[f32],
        out: &mut [f32],
        parts: &[Part],
        decode: usize,
        st: &mut dyn PartState<MambaCache>,
        s: &mut Scratch,
        obs: &mut dyn Observer,
        layer: usize,
    ) {
        let t = x.len() / hidden;
        let na = lb.size(Axis::MambaHeads);
        let pa = lb.size(Axis::MambaHeadDim);
        let gn = self.groups * self.state;
        let ni = na * pa; // active inner channels
        let width = 2 * ni + 2 * gn + na;
        let cw = ni + gn * 2;
        let zx = buf(&mut s.a, t * width);
        if obs.enabled() {
            obs.weight_input(&self.in_proj, &[0..hidden], x);
        }
        linear_rows(&self.in_proj, &lb.in_rows, &[0..hidden], x, zx, decode);
        if obs.enabled() {
            let mut xs = vec![0f32; t * ni];
            for (row, dst) in zx.chunks(width).zip(xs.chunks_mut(ni)) {
                dst.copy_from_slice(&row[ni..2 * ni]);
            }
            obs.mamba_x(layer, &xs, ni);
        }
        let xbc = buf(&mut s.b, t * cw);
        let dt = buf(&mut s.c, t * na);
        let y = buf(&mut s.d, t * ni);
        for (pi, p) in parts.iter().enumerate() {
            let mc = st.state(pi);
            let steps = if p.stepwise { p.len } else { 1 };
            let len = p.len / steps;
            for i in 0..steps {
                let r = p.row + i * len;
                mc.save(p.pos + i * len);
                self.scan_rows(
                    lb,
                    &zx[r * width..(r + len) * width],
                    &mut xbc[r * cw..(r + len) * cw],
                    &mut dt[r * na..(r + len) * na],
                    &mut y[r * ni..(r + len) * ni],
                    &mut mc.state,
                );
            }
        }

        // Gated RMSNorm, gate before norm, G groups over the active channels (spec §2.3.8).
        let g = self.groups;
        let gs = ni / g;
        for ti in 0..t {
            let yr = &mut y[ti * ni..(ti + 1) * ni];
            let zr = &zx[ti * width..ti * width + ni];
            silu_mul(yr, zr);
            for gi in 0..g {
                let grp = &mut yr[gi * gs..(gi + 1) * gs];
                let ms = grp.iter().map(|v| v * v).sum::<f32>() / gs as f32;
                let r = 1.0 / (ms + self.eps).sqrt();
                grp.iter_mut().for_each(|v| *v *= r);
            }
            let mut c = 0;
            for seg in &lb.inner {
                for (yv, wv) in yr[c..c + seg.len()].iter_mut().zip(&self.norm[seg.clone()]) {
                    *yv *= wv;
                }
                c += seg.len();
            }
        }
        if obs.enabled() {
            obs.weight_input(&self.out_proj, &lb.inner, y);
        }
        linear_rows(&self.out_proj, &[0..hidden], &lb.inner, y, out, decode);
    }

    /// Conv, Δ and the selective scan (the recurrence for one token) of `t` consecutive tokens
    /// of one sequence: zx [t][width] in, y [t][active inner] out, advancing `st`.
    fn scan_rows(
        &self,
        lb: &LayerBudget,
        zx: &[f32],
        xbc: &mut [f32],
        dt: &mut [f32],
        y: &mut [f32],
        st: &mut MambaState,
    ) {
        let na = lb.size(Axis::MambaHeads);
        let pa = lb.size(Axis::MambaHeadDim);
        let (g, n, k) = (self.groups, self.state, self.conv_k);
        let gn = g * n;
        let ni = na * pa;
        let width = 2 * ni + 2 * gn + na;
        let t = zx.len() / width;

        // Causal conv over the active xBC channels, window from the state (spec §2.3.2).
        let cw = ni + gn * 2;
        let di = self.d_inner();
        let parent = |c: usize| -> usize {
            if c < ni {
                let mut off = 0;
                for r in &lb.inner {
                    if c < off + r.len() {
                        return r.start + c - off;
                    }
                    off += r.len();
                }
                unreachable!()
            } else {
                di + c - ni
            }
        };
        let mut c = 0;
        while c < cw {
            // Walk contiguous parent runs to avoid a lookup per channel.
            let pc0 = parent(c);
            let mut run = 1;
            while c + run < cw && parent(c + run) == pc0 + run && (c + run != ni) {
                run += 1;
            }
            for j in 0..run {
                let pc = pc0 + j;
                let w = &self.conv_w[pc * k..(pc + 1) * k];
                let win = &mut st.conv[pc * (k - 1)..(pc + 1) * (k - 1)];
                for ti in 0..t {
                    let xin = zx[ti * width + ni + c + j];
                    let mut v = self.conv_b[pc] + w[k - 1] * xin;
                    for q in 0..k - 1 {
                        v += w[q] * win[q];
                    }
                    win.copy_within(1.., 0);
                    win[k - 2] = xin;
                    xbc[ti * cw + c + j] = silu(v);
                }
            }
            c += run;
        }

        // Δ per token and active head.
        let mut hh = 0;
        for r in &lb.mheads {
            for h in r.clone() {
                for ti in 0..t {
                    let v = softplus(zx[ti * width + 2 * ni + 2 * gn + hh] + self.dt_bias[h]);
                    dt[ti * na + hh] = v.clamp(self.dt_min, self.dt_max);
                }
                hh += 1;
            }
        }

        let heads_per_group = self.heads / g;
        let (xbc, dt) = (&*xbc, &*dt);
        let yp = SyncPtr(y.as_mut_ptr());
        let sp = SyncPtr(st.ssm.as_mut_ptr());
        let head_list = |i: usize| -> usize {
            let mut off = 0;
            for r in &lb.mheads {
                if i < off + r.len() {
                    return r.start + i - off;
                }
                off += r.len();
            }
            unreachable!()
        };
        let hstride = self.head_dim * n;
        let work = |hh: usize| {
            let h = head_list(hh);
            let grp = h / heads_per_group;
            let ssm = unsafe { sp.slice(h * hstride, hstride) };
            let io = HeadIo {
                xbc,
                cw,
                dt,
                na,
                hh,
                xoff: hh * pa,
                boff: ni + grp * n,
                coff: ni + gn + grp * n,
                pa,
                n,
                t,
            };
            if t == 1 {
                self.step(h, &io, ssm, unsafe { yp.slice(hh * pa, pa) });
            } else {
                self.scan(h, &io, ssm, yp);
            }
        };
        if t * na * pa * n < 1 << 14 {
            (0..na).for_each(work);
        } else {
            pool().for_each(na, work);
        }
    }

    /// One recurrence step (decode): S ← S·exp(ΔA) + Δ·x⊗B; y = S·C + D·x.
    fn step(&self, h: usize, io: &HeadIo, ssm: &mut [f32], y: &mut [f32]) {
        let n = io.n;
        let dtv = io.dt[io.hh];
        let da = (dtv * self.a[h]).exp();
        let xs = &io.xbc[io.xoff..io.xoff + io.pa];
        let b = &io.xbc[io.boff..io.boff + n];
        let c = &io.xbc[io.coff..io.coff + n];
        for p in 0..io.pa {
            let row = &mut ssm[p * n..(p + 1) * n];
            let xv = dtv * xs[p];
            let mut acc = 0f32;
            for j in 0..n {
                row[j] = row[j] * da + xv * b[j];
                acc += row[j] * c[j];
            }
            y[p] = acc + self.d[h] * xs[p];
        }
    }

    /// SSD chunked scan over T tokens for one head (spec §2.3.7), writing y for this head.
    fn scan(&self, h: usize, io: &HeadIo, ssm: &mut [f32], yp: SyncPtr<f32>) {
        let (n, pa, t) = (io.n, io.pa, io.t);
        let ni = io.na * pa;
        let a = self.a[h];
        let q = self.chunk.clamp(1, 256).min(t);
        // Per-chunk buffers (prefill only).
        let mut bm = vec![0f32; q * n]; // B rows [q][n]
        let mut cm = vec![0f32; q * n]; // C rows [q][n]
        let mut xt = vec![0f32; pa * q]; // xᵀ [pa][q]
        let mut xwt = vec![0f32; pa * q]; // (x·Δ·decay-to-end)ᵀ
        let mut bt = vec![0f32; n * q]; // Bᵀ [n][q]
        let mut cb = vec![0f32; q * q];
        let mut yd = vec![0f32; q * pa];
        let mut yo = vec![0f32; q * pa];
        let mut snew = vec![0f32; pa * n];
        let mut cs = vec![0f32; q];
        let mut dec = vec![0f32; q]; // exp(cs_t − cs_u), u ≤ t
        let mut c0 = 0;
        while c0 < t {
            let l = q.min(t - c0);
            let mut acc = 0f32;
            for u in 0..l {
                let tt = c0 + u;
                acc += io.dt[tt * io.na + io.hh] * a;
                cs[u] = acc;
                let row = &io.xbc[tt * io.cw..(tt + 1) * io.cw];
                bm[u * n..(u + 1) * n].copy_from_slice(&row[io.boff..io.boff + n]);
                cm[u * n..(u + 1) * n].copy_from_slice(&row[io.coff..io.coff + n]);
                for j in 0..n {
                    bt[j * q + u] = row[io.boff + j];
                }
                for p in 0..pa {
                    xt[p * q + u] = row[io.xoff + p];
                }
            }
            let last = cs[l - 1];
            for u in 0..l {
                let w = io.dt[(c0 + u) * io.na + io.hh] * (last - cs[u]).exp();
                for p in 0..pa {
                    xwt[p * q + u] = xt[p * q + u] * w;
                }
            }
            // CB[t][u] = C_t·B_u, then the causal decay-weighted mask M.
            gemm_nt(l, l, n, &cm, n, &bm, n, &mut cb, q);
            for ti in 0..l {
                let dec = &mut dec[..=ti];
                for (u, v) in dec.iter_mut().enumerate() {
                    *v = cs[ti] - cs[u];
                }
                exp_inplace(dec);
                let row = &mut cb[ti * q..ti * q + l];
                for (u, v) in row[..=ti].iter_mut().enumerate() {
                    *v = *v * dec[u] * io.dt[(c0 + u) * io.na + io.hh];
                }
                row[ti + 1..].fill(0.0);
            }
            // Y_diag = M·X ; Y_off = (C·Sᵀ) scaled by exp(cs_t).
            gemm_nt(l, pa, l, &cb, q, &xt, q, &mut yd, pa);
            gemm_nt(l, pa, n, &cm, n, ssm, n, &mut yo, pa);
            for ti in 0..l {
                let e = cs[ti].exp();
                let tt = c0 + ti;
                let y = unsafe { yp.slice(tt * ni + io.hh * pa, pa) };
                for p in 0..pa {
                    y[p] = yd[ti * pa + p] + e * yo[ti * pa + p] + self.d[h] * xt[p * q + ti];
                }
            }
            // S ← exp(cs_last)·S + Σ_u exp(cs_last − cs_u)·Δ_u·x_u ⊗ B_u
            gemm_nt(pa, n, l, &xwt, q, &bt, q, &mut snew, n);
            let e = last.exp();
            for p in 0..pa {
                for j in 0..n {
                    ssm[p * n + j] = e * ssm[p * n + j] + snew[p * n + j];
                }
            }
            c0 += l;
        }
    }
}

/// Where one head's inputs live in the packed per-token rows.
struct HeadIo<'a> {
    xbc: &'a [f32],
    cw: usize,
    dt: &'a [f32],
    na: usize,
    hh: usize,
    xoff: usize,
    boff: usize,
    coff: usize,
    pa: usize,
    n: usize,
    t: usize,
}
