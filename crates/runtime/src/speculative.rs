//! Nested self-speculative decoding: a smaller budget of the same weights drafts K tokens, the
//! target budget verifies them in one forward, and [`accept`] keeps the longest prefix the target
//! agrees with (speculative sampling, Leviathan et al. 2023 / Chen et al. 2023), so the output is
//! distributed exactly as the target's. Greedy configs give one-hot distributions, and the rule
//! reduces to "accept while the target's argmax equals the draft".

/// The outcome of one verification round.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Verdict {
    /// Draft tokens kept (a prefix of the draft).
    pub accepted: usize,
    /// The token after them: the target's correction on a rejection, or a bonus token from the
    /// target's distribution after the last draft token when all were kept.
    pub next: u32,
}

/// Speculative-sampling acceptance over dense distributions of `v` tokens: `q` holds the draft's
/// distributions of its K tokens ([K][v]), `p` the target's at the K + 1 positions ([K+1][v]),
/// `draw` uniform numbers in [0, 1), `resid` a scratch row of `v`. Draft token i is kept with
/// probability min(1, p_i(x)/q_i(x)); the first rejection samples from max(0, p_i − q_i), which
/// makes every emitted token distributed as the target's.
pub fn accept(
    draft: &[u32],
    q: &[f32],
    p: &[f32],
    v: usize,
    mut draw: impl FnMut() -> f32,
    resid: &mut [f32],
) -> Verdict {
    let k = draft.len();
    assert!(q.len() == k * v && p.len() == (k + 1) * v && resid.len() == v);
    for (i, &x) in draft.iter().enumerate() {
        let (pi, qi) = (&p[i * v..(i + 1) * v], &q[i * v..(i + 1) * v]);
        let (px, qx) = (pi[x as usize], qi[x as usize]);
        // px >= qx always accepts and px = 0 never: no draw (greedy stays deterministic).
        if px >= qx || (px > 0.0 && draw() * qx < px) {
            continue;
        }
        let mut total = 0f32;
        for ((r, &a), &b) in resid.iter_mut().zip(pi).zip(qi) {
            *r = (a - b).max(0.0);
            total += *r;
        }
        return Verdict {
            accepted: i,
            next: pick(resid, total, &mut draw),
        };
    }
    let last = &p[k * v..];
    Verdict {
        accepted: k,
        next: pick(last, last.iter().sum(), &mut draw),
    }
}

/// A token from unnormalised weights `w` summing to `total`; one-hot weights need no draw.
fn pick(w: &[f32], total: f32, draw: &mut impl FnMut() -> f32) -> u32 {
    let mut nonzero = w.iter().enumerate().filter(|(_, x)| **x > 0.0);
    let first = nonzero.next().map_or(0, |(i, _)| i);
    if nonzero.next().is_none() {
        return first as u32;
    }
    let mut r = draw() * total;
    let mut last = first;
    for (i, &x) in w.iter().enumerate() {
        if x > 0.0 {
            last = i;
            r -= x;
            if r <= 0.0 {
                return i as u32;
            }
        }
    }
    last as u32
}

#[cfg(test)]
mod tests {
    use super::*;
    use elastica_core::rng::Rng;

    fn uniform(rng: &mut Rng) -> f32 {
        (rng.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }

    fn sample(w: &[f32], rng: &mut Rng) -> u32 {
        pick(w, w.iter().sum(), &mut || uniform(rng))
    }

    /// The first emitted token is distributed as the target's p_0 whatever the draft's q_0,
    /// and a draft equal to the target is always accepted (chi-square over 200 000 rounds).
    #[test]
    fn output_is_distributed_as_the_target() {
        let v = 5;
        let p = [
            0.05f32, 0.4, 0.3, 0.2, 0.05, /* position 1 */ 0.2, 0.2, 0.2, 0.2, 0.2,
        ];
        let q = [0.5f32, 0.1, 0.1, 0.1, 0.2];
        let mut rng = Rng::new(7);
        let mut counts = [0usize; 5];
        let (n, mut kept) = (200_000, 0);
        let mut resid = vec![0.0; v];
        for _ in 0..n {
            let x = sample(&q, &mut rng);
            let d = accept(&[x], &q, &p, v, || uniform(&mut rng), &mut resid);
            let first = if d.accepted == 1 { x } else { d.next };
            kept += d.accepted;
            counts[first as usize] += 1;
        }
        let chi2: f64 = (0..v)
            .map(|i| {
                let e = n as f64 * p[i] as f64;
                (counts[i] as f64 - e).powi(2) / e
            })
            .sum();
        // 4 degrees of freedom: P(chi2 > 18.47) = 0.001.
        assert!(chi2 < 18.47, "chi2 {chi2}, counts {counts:?}");
        // Acceptance rate = Σ min(p, q) = 0.05 + 0.1 + 0.1 + 0.1 + 0.05 = 0.4.
        let rate = kept as f64 / n as f64;
        assert!((rate - 0.4).abs() < 0.01, "acceptance {rate}");
        let same = accept(&[1], &p[..v], &p, v, || uniform(&mut rng), &mut resid);
        assert_eq!(same.accepted, 1);
    }

    #[test]
    fn greedy_keeps_the_agreeing_prefix() {
        let v = 3;
        let hot = |i: usize| {
            let mut r = vec![0.0; v];
            r[i] = 1.0;
            r
        };
        // Draft 2, 0, 1; target argmaxes 2, 0, 2, then 1.
        let q: Vec<f32> = [2, 0, 1].into_iter().flat_map(hot).collect();
        let p: Vec<f32> = [2, 0, 2, 1].into_iter().flat_map(hot).collect();
        let mut resid = vec![0.0; v];
        let never = || -> f32 { panic!("greedy needs no draw") };
        let d = accept(&[2, 0, 1], &q, &p, v, never, &mut resid);
        assert_eq!(
            d,
            Verdict {
                accepted: 2,
                next: 2
            }
        );
        let p: Vec<f32> = [2, 0, 1, 1].into_iter().flat_map(hot).collect();
        let d = accept(&[2, 0, 1], &q, &p, v, never, &mut resid);
        assert_eq!(
            d,
            Verdict {
                accepted: 3,
                next: 1
            }
        );
    }
}
