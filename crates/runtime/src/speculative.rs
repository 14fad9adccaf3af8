//! Nested self-speculative decoding: a smaller budget of the same weights drafts K tokens, the
//! target budget verifies them in one forward, and [`accept`] keeps the longest prefix the target
//! agrees with (speculative sampling, Leviathan et al. 2023 / Chen et al. 2023), so the output is
//! distributed exactly as the target's. Greedy configs give one-hot distributions, and the rule
//! reduces to "accept while the target's argmax equals the draft".

use elastica_core::budget::Budget;
use elastica_core::error::{Error, Result};
use elastica_core::generate::sampler::{Sampler, argmax};
use elastica_core::generate::tokenizer::Tokenizer;
use elastica_core::generate::{
    Decoder, GenConfig, Generation, Step, StepOut, StopReason, check_prompt,
};
use elastica_core::model::{BatchItem, Cache, Logits, Model, SeqState, Work};
use std::time::Instant;

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

/// Acceptance counts of a speculative run.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct SpecStats {
    /// Verification rounds.
    pub rounds: usize,
    /// Draft tokens proposed.
    pub drafted: usize,
    /// Draft tokens kept.
    pub accepted: usize,
    /// `at[i]`: rounds whose draft token i was proposed and kept (acceptance per draft position).
    pub proposed_at: Vec<usize>,
    pub accepted_at: Vec<usize>,
    pub draft_seconds: f64,
    pub verify_seconds: f64,
}

impl SpecStats {
    /// Tokens each round produces (kept drafts plus the target's own).
    pub fn tokens_per_round(&self) -> f64 {
        (self.accepted + self.rounds) as f64 / self.rounds.max(1) as f64
    }
    /// Kept / proposed at each draft position.
    pub fn acceptance_at(&self) -> Vec<f64> {
        let rate = |(a, p): (&usize, &usize)| *a as f64 / (*p).max(1) as f64;
        self.accepted_at
            .iter()
            .zip(&self.proposed_at)
            .map(rate)
            .collect()
    }
}

impl Speculator {
    /// The stats and budgets as JSON (`run --json`, `bench --json`).
    pub fn report(&self, shape: &elastica_core::budget::Shape) -> serde_json::Value {
        let mut v = serde_json::to_value(&self.stats).unwrap_or_default();
        v["draft_budget"] = self.draft.spec(shape).into();
        v["draft_tokens"] = self.k.into();
        v["tokens_per_round"] = self.stats.tokens_per_round().into();
        v["acceptance_at"] = self.stats.acceptance_at().into();
        v
    }
    /// One line: draft budget, K, rounds, tokens per round, acceptance per position, times.
    pub fn summary(&self, shape: &elastica_core::budget::Shape) -> String {
        let st = &self.stats;
        let at: Vec<String> = st
            .acceptance_at()
            .iter()
            .map(|r| format!("{r:.2}"))
            .collect();
        format!(
            "speculative: draft {} K={}, {} rounds, {:.2} tokens/round, acceptance by position [{}], draft {:.2} s, verify {:.2} s",
            self.draft.spec(shape),
            self.k,
            st.rounds,
            st.tokens_per_round(),
            at.join(" "),
            st.draft_seconds,
            st.verify_seconds
        )
    }
}

/// Drafts at a nested budget of the same weights and state, and verifies at the target: one
/// sequence's speculative decoding, its buffers sized once for K drafts.
pub struct Speculator {
    pub draft: Budget,
    pub target: Budget,
    pub k: usize,
    q: Vec<f32>,
    p: Vec<f32>,
    resid: Vec<f32>,
    toks: Vec<u32>,
    pub stats: SpecStats,
}

/// The most draft tokens a round may propose.
pub const MAX_DRAFT: usize = 16;

impl Speculator {
    /// Errors when K is out of 1..=[`MAX_DRAFT`] or the draft does not nest inside the target.
    pub fn new(model: &Model, draft: Budget, target: &Budget, k: usize) -> Result<Speculator> {
        if !(1..=MAX_DRAFT).contains(&k) {
            return Err(Error::Input(format!(
                "--draft {k}: the number of draft tokens must be 1 to {MAX_DRAFT}"
            )));
        }
        if !draft.nested_in(target) {
            return Err(Error::Budget(format!(
                "the draft budget {} does not nest inside the target budget {}: it must be at most the target on every axis",
                draft.spec(&model.shape),
                target.spec(&model.shape)
            )));
        }
        let v = model.vocab;
        Ok(Speculator {
            draft,
            target: target.clone(),
            k,
            q: vec![0.0; k * v],
            p: vec![0.0; (k + 1) * v],
            resid: vec![0.0; v],
            toks: Vec::with_capacity(k + 1),
            stats: SpecStats {
                proposed_at: vec![0; k],
                accepted_at: vec![0; k],
                ..SpecStats::default()
            },
        })
    }

    /// One round for a sequence whose next input is `t0` (sampled, not yet in the state):
    /// drafts up to K tokens at the draft budget, rolls back, runs t0 and the drafts at the target
    /// stepwise (bit for bit the logits of plain decoding), keeps the accepted prefix and rolls
    /// the state back to it. Appends the kept drafts and the target's next token to `out`; the
    /// sequence then holds t0 and the kept drafts, and the last token of `out` is the new t0.
    /// Needs K Mamba checkpoints in `seq` when the model has Mamba layers. Returns the draft
    /// tokens proposed and kept.
    pub fn round(
        &mut self,
        model: &Model,
        seq: &mut SeqState,
        work: &mut Work,
        t0: u32,
        sampler: &mut Sampler,
        out: &mut Vec<u32>,
    ) -> Result<(usize, usize)> {
        let v = model.vocab;
        let c = seq.pos;
        // Room for t0 and the drafts.
        let k = self.k.min(seq.capacity().saturating_sub(c + 1));
        let t = Instant::now();
        self.toks.clear();
        self.toks.push(t0);
        for i in 0..k {
            let tok = self.toks[i];
            let logits = one(model, seq, work, &self.draft, &[tok], false)?;
            let qi = &mut self.q[i * v..(i + 1) * v];
            sampler.probs(logits, qi);
            let x = pick(qi, 1.0, &mut || sampler.draw());
            self.toks.push(x);
        }
        seq.truncate(c)?;
        let t1 = Instant::now();
        self.stats.draft_seconds += (t1 - t).as_secs_f64();
        let logits = {
            let mut items = [BatchItem {
                seq,
                tokens: &self.toks,
                logits: Logits::All,
                stepwise: true,
            }];
            model.forward_batch(&mut items, &self.target, work)?.item(0)
        };
        for i in 0..=k {
            sampler.probs(&logits[i * v..(i + 1) * v], &mut self.p[i * v..(i + 1) * v]);
        }
        let d = accept(
            &self.toks[1..],
            &self.q[..k * v],
            &self.p[..(k + 1) * v],
            v,
            || sampler.draw(),
            &mut self.resid,
        );
        seq.truncate(c + 1 + d.accepted)?;
        self.stats.verify_seconds += t1.elapsed().as_secs_f64();
        self.stats.rounds += 1;
        self.stats.drafted += k;
        self.stats.accepted += d.accepted;
        for i in 0..k {
            self.stats.proposed_at[i] += 1;
            if i < d.accepted {
                self.stats.accepted_at[i] += 1;
            }
        }
        out.extend_from_slice(&self.toks[1..1 + d.accepted]);
        out.push(d.next);
        Ok((k, d.accepted))
    }
}

/// Generates from `prompt` like [`elastica_core::generate::generate`] at the speculator's target,
/// drafting with it: the same tokens under greedy sampling, the same distribution otherwise. The
/// stop logic is the [`Decoder`]'s; the cache's sequence needs K Mamba checkpoints on Mamba
/// models.
pub fn generate(
    model: &Model,
    tok: &Tokenizer,
    spec: &mut Speculator,
    cache: &mut Cache,
    prompt: &[u32],
    cfg: &GenConfig,
    mut on_text: impl FnMut(&str),
) -> Result<Generation> {
    let Cache { seq, work } = cache;
    check_prompt(prompt, seq)?;
    // The decoder's sampler draws every token, as the scheduler's speculative sequences do.
    let mut dec = Decoder::new(cfg);
    let t = Instant::now();
    let mut next = (dec.sampler_mut()).sample(one(model, seq, work, &spec.target, prompt, false)?);
    let prefill_seconds = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let mut round = Vec::with_capacity(spec.k + 1);
    // Streams a decoder step; Some(reason) when it stops.
    let mut take = |out: StepOut<'_>| {
        if !out.text.is_empty() {
            on_text(out.text);
        }
        match out.step {
            Step::Stop(r) => Some(r),
            Step::Next(_) => None,
        }
    };
    let stop_reason = 'decode: loop {
        if let Some(r) = take(dec.accept(tok, next)?) {
            break r;
        }
        if seq.pos >= seq.capacity() {
            let rest = dec.finish(StopReason::Context).to_string();
            take(StepOut {
                step: Step::Stop(StopReason::Context),
                text: &rest,
                think_end: false,
            });
            break StopReason::Context;
        }
        round.clear();
        spec.round(model, seq, work, next, dec.sampler_mut(), &mut round)?;
        let (kept, last) = round.split_at(round.len() - 1);
        for &x in kept {
            if let Some(r) = take(dec.accept(tok, x)?) {
                break 'decode r;
            }
        }
        next = last[0];
    };
    let decode_seconds = t.elapsed().as_secs_f64();
    Ok(dec.into_generation(prompt.len(), stop_reason, prefill_seconds, decode_seconds))
}

/// Plain against speculative greedy decoding of the same tokens (`bench --speculate`).
pub struct SpecBench {
    pub tokens: usize,
    pub plain_tps: f64,
    pub spec_tps: f64,
    /// Whether both decoded the same tokens (they must: greedy is exact).
    pub identical: bool,
    /// The speculator of the last repetition, with its statistics.
    pub speculator: Speculator,
}

impl SpecBench {
    pub fn report(&self, shape: &elastica_core::budget::Shape) -> serde_json::Value {
        let mut v = self.speculator.report(shape);
        v["tokens"] = self.tokens.into();
        v["plain_tok_s"] = self.plain_tps.into();
        v["speculative_tok_s"] = self.spec_tps.into();
        v["speedup"] = (self.spec_tps / self.plain_tps).into();
        v["identical"] = self.identical.into();
        v
    }
}

/// Greedy decoding of `n` tokens after `prompt`, plainly and with `spec`, `reps` times each
/// (medians of the decode rates; the prefill is not timed).
pub fn bench(
    model: &Model,
    spec: Speculator,
    prompt: &[u32],
    n: usize,
    reps: usize,
) -> Result<SpecBench> {
    let ctx = prompt.len() + n + spec.k + 1;
    let mut seq = SeqState::try_new(model, ctx, spec.k)?;
    let mut work = Work::try_new(model, ctx)?;
    let (mut plain, mut fast) = (vec![], vec![]);
    let (mut a, mut b) = (
        Vec::with_capacity(n + spec.k + 1),
        Vec::with_capacity(n + spec.k + 1),
    );
    let mut sp = spec;
    let target = sp.target.clone();
    // The prefill and its first token, untimed.
    let first = |seq: &mut SeqState, work: &mut Work, out: &mut Vec<u32>| -> Result<()> {
        seq.reset();
        out.clear();
        out.push(argmax(one(model, seq, work, &target, prompt, false)?));
        Ok(())
    };
    for _ in 0..reps.max(1) {
        first(&mut seq, &mut work, &mut a)?;
        let t = Instant::now();
        while a.len() < n {
            let last = [a[a.len() - 1]];
            a.push(argmax(one(
                model, &mut seq, &mut work, &target, &last, false,
            )?));
        }
        plain.push(n as f64 / t.elapsed().as_secs_f64());
        sp = Speculator::new(model, sp.draft.clone(), &target, sp.k)?;
        let mut sampler = Sampler::new(Default::default());
        first(&mut seq, &mut work, &mut b)?;
        let t = Instant::now();
        while b.len() < n {
            let last = b[b.len() - 1];
            sp.round(model, &mut seq, &mut work, last, &mut sampler, &mut b)?;
        }
        fast.push(n as f64 / t.elapsed().as_secs_f64());
        b.truncate(n);
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    Ok(SpecBench {
        tokens: n,
        plain_tps: median(&mut plain),
        spec_tps: median(&mut fast),
        identical: a[..n.min(a.len())] == b[..n.min(b.len())],
        speculator: sp,
    })
}

/// The logits of one sequence's tokens (the last position).
fn one<'w>(
    model: &Model,
    seq: &mut SeqState,
    work: &'w mut Work,
    budget: &Budget,
    tokens: &[u32],
    stepwise: bool,
) -> Result<&'w [f32]> {
    let mut items = [BatchItem {
        seq,
        tokens,
        logits: Logits::Last,
        stepwise,
    }];
    Ok(model.forward_batch(&mut items, budget, work)?.item(0))
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
