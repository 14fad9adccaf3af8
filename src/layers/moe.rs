//! Sigmoid-routed MoE (spec §2.6): fp32 router, correction bias for selection only, group-limited
//! top-k, weights from the unbiased scores (normalised, × routed_scaling_factor), relu² experts
//! accumulated in fp32, plus a relu² shared expert. Budget: a prefix of the experts of every
//! routing group, the first `moe_ffn` channels of each expert and `shared_ffn` of the shared one.

use super::mlp::Mlp;
use super::{Ffn, Observer, Scratch, buf, linear};
use crate::budget::{Axis, LayerBudget};
use crate::kernels::ops::{dot, relu2, sigmoid};
use crate::tensor::Tensor;

pub struct Moe {
    /// Router weight in f32, [experts][hidden].
    pub router: Vec<f32>,
    pub bias: Vec<f32>,
    pub up: Vec<Tensor>,
    pub down: Vec<Tensor>,
    pub shared: Option<Mlp>,
    pub experts: usize,
    pub hidden: usize,
    pub topk: usize,
    pub n_group: usize,
    pub topk_group: usize,
    pub norm_topk: bool,
    pub scale: f32,
}

/// Selected experts and weights of one token; fixed capacity so decode does not allocate.
pub const MAX_TOPK: usize = 64;

impl Moe {
    /// Routes one token: fills `ids`/`w` (length topk) and returns the count.
    fn route(
        &self,
        lb: &LayerBudget,
        hidden: usize,
        x: &[f32],
        ids: &mut [usize; MAX_TOPK],
        w: &mut [f32; MAX_TOPK],
        sc: &mut [f32],
        choice: &mut [f32],
    ) -> usize {
        // Scores for every parent expert; inactive ones are masked out of the choice.
        choice.fill(f32::NEG_INFINITY);
        for r in &lb.expert_ids {
            for e in r.clone() {
                let l = dot(&self.router[e * self.hidden..e * self.hidden + hidden], x);
                sc[e] = sigmoid(l);
                choice[e] = sc[e] + self.bias[e];
            }
        }
        let k = self.topk.min(lb.size(Axis::Experts));
        if self.n_group > 1 {
            // Group score = sum of the two best choices in the group; keep the topk_group best.
            let per = self.experts / self.n_group;
            let mut gscore = [f32::NEG_INFINITY; 64];
            for gi in 0..self.n_group {
                let (mut a, mut b) = (f32::NEG_INFINITY, f32::NEG_INFINITY);
                for &v in &choice[gi * per..(gi + 1) * per] {
                    if v > a {
                        b = a;
                        a = v;
                    } else if v > b {
                        b = v;
                    }
                }
                gscore[gi] = if b == f32::NEG_INFINITY { a } else { a + b };
            }
            let mut keep = [false; 64];
            for _ in 0..self.topk_group.min(self.n_group) {
                let mut best = usize::MAX;
                for gi in 0..self.n_group {
                    if !keep[gi] && (best == usize::MAX || gscore[gi] > gscore[best]) {
                        best = gi;
                    }
                }
                keep[best] = true;
            }
            for gi in 0..self.n_group {
                if !keep[gi] {
                    choice[gi * per..(gi + 1) * per].fill(f32::NEG_INFINITY);
                }
            }
        }
        let mut got = 0;
        for slot in 0..k {
            let mut best = usize::MAX;
            for (e, &v) in choice.iter().enumerate() {
                if v > f32::NEG_INFINITY && (best == usize::MAX || v > choice[best]) {
                    best = e;
                }
            }
            if best == usize::MAX {
                break;
            }
            ids[slot] = best;
            w[slot] = sc[best];
            choice[best] = f32::NEG_INFINITY;
            got += 1;
        }
        if self.norm_topk {
            let s: f32 = w[..got].iter().sum::<f32>() + 1e-20;
            w[..got].iter_mut().for_each(|v| *v /= s);
        }
        w[..got].iter_mut().for_each(|v| *v *= self.scale);
        // Ascending expert id, as HF accumulates.
        let mut pairs = [(0usize, 0f32); MAX_TOPK];
        for i in 0..got {
            pairs[i] = (ids[i], w[i]);
        }
        pairs[..got].sort_unstable_by_key(|p| p.0);
        for i in 0..got {
            ids[i] = pairs[i].0;
            w[i] = pairs[i].1;
        }
        got
    }

    /// One routed expert on m tokens: down(relu²(up(x))), using its first `ffn` channels.
    fn expert(
        &self,
        id: usize,
        ffn: usize,
        hidden: usize,
        x: &[f32],
        h: &mut [f32],
        y: &mut [f32],
        obs: &mut dyn Observer,
        layer: usize,
    ) {
        linear(&self.up[id], &[0..ffn], &[0..hidden], x, h);
        h.iter_mut().for_each(|v| *v = relu2(*v));
        if obs.enabled() {
            obs.down_input(layer, Ffn::Expert(id), h, ffn);
        }
        linear(&self.down[id], &[0..hidden], &[0..ffn], h, y);
    }

    pub fn forward(
        &self,
        lb: &LayerBudget,
        hidden: usize,
        x: &[f32],
        out: &mut [f32],
        s: &mut Scratch,
        obs: &mut dyn Observer,
        layer: usize,
    ) {
        let t = x.len() / hidden;
        let ffn = lb.size(Axis::MoeFfn);
        let e = self.experts;
        let mut ids = [0usize; MAX_TOPK];
        let mut w = [0f32; MAX_TOPK];
        // Per-token routing: ids/weights stored in s.e as [T][topk] pairs.
        let k = self.topk.min(lb.size(Axis::Experts));
        let route = buf(&mut s.e, 2 * e + t * 2 * k);
        let (rs, rest) = route.split_at_mut(2 * e);
        let (sc, choice) = rs.split_at_mut(e);
        let sel = rest;
        for ti in 0..t {
            let got = self.route(
                lb,
                hidden,
                &x[ti * hidden..(ti + 1) * hidden],
                &mut ids,
                &mut w,
                sc,
                choice,
            );
            for j in 0..k {
                sel[ti * 2 * k + 2 * j] = if j < got { ids[j] as f32 } else { -1.0 };
                sel[ti * 2 * k + 2 * j + 1] = if j < got { w[j] } else { 0.0 };
            }
        }
        out.fill(0.0);
        if t == 1 {
            let h = buf(&mut s.c, ffn);
            let y = buf(&mut s.d, hidden);
            for j in 0..k {
                let id = sel[2 * j];
                if id < 0.0 {
                    continue;
                }
                let id = id as usize;
                let wj = sel[2 * j + 1];
                self.expert(id, ffn, hidden, x, h, y, obs, layer);
                if obs.enabled() {
                    obs.expert_output(layer, id, wj, y);
                }
                for (o, v) in out.iter_mut().zip(y.iter()) {
                    *o += wj * v;
                }
            }
        } else {
            // Group tokens by expert, run each expert once on its tokens.
            let mut lists: Vec<Vec<(usize, f32)>> = vec![Vec::new(); e];
            for ti in 0..t {
                for j in 0..k {
                    let id = sel[ti * 2 * k + 2 * j];
                    if id >= 0.0 {
                        lists[id as usize].push((ti, sel[ti * 2 * k + 2 * j + 1]));
                    }
                }
            }
            for (id, list) in lists.iter().enumerate() {
                if list.is_empty() {
                    continue;
                }
                let m = list.len();
                let xs = buf(&mut s.b, m * hidden);
                for (r, (ti, _)) in list.iter().enumerate() {
                    xs[r * hidden..(r + 1) * hidden]
                        .copy_from_slice(&x[ti * hidden..(ti + 1) * hidden]);
                }
                let h = buf(&mut s.c, m * ffn);
                let y = buf(&mut s.d, m * hidden);
                self.expert(id, ffn, hidden, xs, h, y, obs, layer);
                for (r, (ti, wj)) in list.iter().enumerate() {
                    if obs.enabled() {
                        obs.expert_output(layer, id, *wj, &y[r * hidden..(r + 1) * hidden]);
                    }
                    for (o, v) in out[ti * hidden..(ti + 1) * hidden]
                        .iter_mut()
                        .zip(&y[r * hidden..(r + 1) * hidden])
                    {
                        *o += wj * v;
                    }
                }
            }
        }
        if let Some(sh) = &self.shared {
            let mut tmp = std::mem::take(&mut s.b);
            if tmp.len() < t * hidden {
                tmp.resize(t * hidden, 0.0);
            }
            sh.forward(
                lb.size(Axis::SharedFfn),
                hidden,
                x,
                &mut tmp[..t * hidden],
                s,
                obs,
                (layer, Ffn::Shared),
            );
            for (o, v) in out.iter_mut().zip(tmp[..t * hidden].iter()) {
                *o += v;
            }
            s.b = tmp;
        }
    }
}
