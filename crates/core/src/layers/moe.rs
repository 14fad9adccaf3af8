//! Sigmoid-routed MoE (spec §2.6): fp32 router, correction bias for selection only, group-limited
//! top-k, weights from the unbiased scores (normalised, × routed_scaling_factor), relu² experts
//! accumulated in fp32, plus a relu² shared expert. Budget: a prefix of the experts of every
//! routing group, the first `moe_ffn` channels of each expert and `shared_ffn` of the shared one.

use super::mlp::Mlp;
use super::{Ffn, Observer, Scratch, Vector, buf, linear_rows};
use crate::budget::{Axis, LayerBudget};
use crate::kernels::ops::{dot, relu2, sigmoid};
use crate::tensor::Tensor;

pub struct Moe {
    /// Router weight in f32, [experts][hidden].
    pub router: Vector,
    pub bias: Vector,
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
    /// The expert choice of one token (spec §2.6), shared by the engine and training: `choice`
    /// holds the biased scores of the parent's experts (−∞ where inactive; overwritten). Keeps
    /// the `topk_group` groups whose two best choices sum highest, then the `k` best experts of
    /// those; ties go to the lower index. Fills `ids` best first and returns their count.
    pub fn select(&self, choice: &mut [f32], k: usize, ids: &mut [usize]) -> usize {
        // The first maximum, NaN never chosen.
        let best = |v: &[f32], skip: &dyn Fn(usize) -> bool| {
            (0..v.len())
                .filter(|&i| !skip(i) && !v[i].is_nan())
                .reduce(|b, i| if v[i] > v[b] { i } else { b })
        };
        let ninf = f32::NEG_INFINITY;
        if self.n_group > 1 {
            let per = self.experts / self.n_group;
            let mut gscore = [ninf; 64];
            for (gi, g) in choice.chunks(per).take(self.n_group).enumerate() {
                let a = best(g, &|_| false);
                let top = |i: Option<usize>| i.map_or(ninf, |i| g[i]);
                let b = top(best(g, &|i| Some(i) == a));
                gscore[gi] = top(a) + if b == ninf { 0.0 } else { b };
            }
            let mut keep = [false; 64];
            for _ in 0..self.topk_group.min(self.n_group) {
                let gs = &gscore[..self.n_group];
                keep[best(gs, &|g| keep[g]).unwrap_or(0)] = true;
            }
            for (gi, g) in choice.chunks_mut(per).take(self.n_group).enumerate() {
                if !keep[gi] {
                    g.fill(ninf);
                }
            }
        }
        let mut got = 0;
        while got < k {
            match best(choice, &|e| choice[e] == ninf) {
                Some(e) => {
                    ids[got] = e;
                    choice[e] = ninf;
                    got += 1;
                }
                None => break,
            }
        }
        got
    }

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
        let got = self.select(choice, self.topk.min(lb.size(Axis::Experts)), ids);
        let sum = match self.norm_topk {
            true => ids[..got].iter().map(|&e| sc[e]).sum::<f32>() + 1e-20,
            false => 1.0,
        };
        // Ascending expert id, as HF accumulates.
        ids[..got].sort_unstable();
        for (wi, &e) in w.iter_mut().zip(&ids[..got]) {
            *wi = sc[e] / sum * self.scale;
        }
        got
    }

    /// One routed expert on m tokens, the first `decode` of them decode tokens:
    /// down(relu²(up(x))), using its first `ffn` channels.
    fn expert(
        &self,
        id: usize,
        ffn: usize,
        hidden: usize,
        x: &[f32],
        h: &mut [f32],
        y: &mut [f32],
        decode: usize,
        obs: &mut dyn Observer,
        layer: usize,
    ) {
        if obs.enabled() {
            obs.weight_input(&self.up[id], &[0..hidden], x);
        }
        linear_rows(&self.up[id], &[0..ffn], &[0..hidden], x, h, decode);
        h.iter_mut().for_each(|v| *v = relu2(*v));
        if obs.enabled() {
            obs.down_input(layer, Ffn::Expert(id), h, ffn);
        }
        if obs.enabled() {
            obs.weight_input(&self.down[id], &[0..ffn], h);
        }
        linear_rows(&self.down[id], &[0..hidden], &[0..ffn], h, y, decode);
    }

    /// out[T, hidden] for T tokens, the first `decode` of them decode tokens of a batch.
    pub fn forward(
        &self,
        lb: &LayerBudget,
        hidden: usize,
        x: &[f32],
        out: &mut [f32],
        decode: usize,
        s: &mut Scratch,
        obs: &mut dyn Observer,
        layer: usize,
    ) {
        let t = x.len() / hidden;
        let ffn = lb.size(Axis::MoeFfn);
        let e = self.experts;
        let mut ids = [0usize; MAX_TOPK];
        let mut w = [0f32; MAX_TOPK];
        // Per-token routing: ids/weights stored in s.e as [T][topk] pairs, then the weights of
        // the tokens grouped by expert.
        let k = self.topk.min(lb.size(Axis::Experts));
        let route = buf(&mut s.e, 2 * e + t * 3 * k);
        let (rs, rest) = route.split_at_mut(2 * e);
        let (sc, choice) = rs.split_at_mut(e);
        let (sel, wts) = rest.split_at_mut(t * 2 * k);
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
                self.expert(id, ffn, hidden, x, h, y, decode, obs, layer);
                if obs.enabled() {
                    obs.expert_output(layer, id, wj, y);
                }
                for (o, v) in out.iter_mut().zip(y.iter()) {
                    *o += wj * v;
                }
            }
        } else {
            // Group tokens by expert (a counting sort, in token order, so each expert's decode
            // tokens come first), run each expert once on its tokens. Every token still adds
            // its experts in ascending id, as the one-token path does.
            let u = &mut s.u;
            u.clear();
            u.resize(e + 1 + t * k, 0);
            let (start, tok) = u.split_at_mut(e + 1);
            for j in sel.chunks(2) {
                if j[0] >= 0.0 {
                    start[j[0] as usize + 1] += 1;
                }
            }
            for i in 0..e {
                start[i + 1] += start[i];
            }
            for ti in 0..t {
                for j in 0..k {
                    let id = sel[ti * 2 * k + 2 * j];
                    if id >= 0.0 {
                        let id = id as usize;
                        // start[id] moves forward as the expert's list fills; reset below.
                        tok[start[id]] = ti;
                        wts[start[id]] = sel[ti * 2 * k + 2 * j + 1];
                        start[id] += 1;
                    }
                }
            }
            // Each start[id] now ends its list; the previous one (or 0) begins it.
            let mut from = 0;
            for id in 0..e {
                let to = start[id];
                let list = &tok[from..to];
                let m = list.len();
                if m == 0 {
                    continue;
                }
                let md = list.iter().take_while(|&&ti| ti < decode).count();
                let xs = buf(&mut s.b, m * hidden);
                for (r, &ti) in list.iter().enumerate() {
                    xs[r * hidden..(r + 1) * hidden]
                        .copy_from_slice(&x[ti * hidden..(ti + 1) * hidden]);
                }
                let h = buf(&mut s.c, m * ffn);
                let y = buf(&mut s.d, m * hidden);
                self.expert(id, ffn, hidden, xs, h, y, md, obs, layer);
                for (r, (&ti, &wj)) in list.iter().zip(&wts[from..to]).enumerate() {
                    if obs.enabled() {
                        obs.expert_output(layer, id, wj, &y[r * hidden..(r + 1) * hidden]);
                    }
                    for (o, v) in out[ti * hidden..(ti + 1) * hidden]
                        .iter_mut()
                        .zip(&y[r * hidden..(r + 1) * hidden])
                    {
                        *o += wj * v;
                    }
                }
                from = to;
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
                decode,
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Ties go to the lower index, for groups and experts; −∞ (inactive) and NaN are never
    /// chosen; fewer than k candidates give fewer ids.
    #[test]
    fn select_breaks_ties_to_the_lower_index() {
        let moe = |n_group, topk_group| Moe {
            router: Vector::default(),
            bias: Vector::default(),
            up: vec![],
            down: vec![],
            shared: None,
            experts: 8,
            hidden: 0,
            topk: 2,
            n_group,
            topk_group,
            norm_topk: true,
            scale: 1.0,
        };
        let mut ids = [0; MAX_TOPK];
        let pick = |m: &Moe, c: &[f32], k: usize, ids: &mut [usize]| {
            let n = m.select(&mut c.to_vec(), k, ids);
            ids[..n].to_vec()
        };
        let (ninf, nan) = (f32::NEG_INFINITY, f32::NAN);
        let flat = [0.5; 8];
        assert_eq!(pick(&moe(1, 1), &flat, 3, &mut ids), [0, 1, 2]);
        assert_eq!(pick(&moe(2, 1), &flat, 3, &mut ids), [0, 1, 2]);
        // Group sums tie (1.0 each): group 0 wins; inside it 1, 2, 3 tie.
        let c = [0.0, 0.5, 0.5, 0.5, 0.5, 0.0, 0.5, 0.5];
        assert_eq!(pick(&moe(2, 1), &c, 2, &mut ids), [1, 2]);
        // Group 1 sums higher; NaN and inactive experts are skipped.
        let c = [nan, 0.9, ninf, ninf, 0.6, 0.6, nan, ninf];
        assert_eq!(pick(&moe(2, 1), &c, 4, &mut ids), [4, 5]);
        assert_eq!(pick(&moe(2, 2), &c, 4, &mut ids), [1, 4, 5]);
    }
}
