//! Continuous batching (issue 11, points 2 and 3): sequences of different prompts, lengths and
//! budgets run through the scheduler each get the greedy tokens and text they get alone from
//! `generate()`; a long prompt's chunked prefill does not stop the others decoding; more
//! sequences than --parallel is an error, and a finished sequence's slot is reused.
//!
//! Batch invariance (see tests/memory.rs): decode rows are bit-identical to a sequence alone,
//! whole-prompt prefill rows too (MoE: within 1e-5); a prompt split over steps runs its chunks
//! against the cached prefix, which can differ from one pass by f32 rounding. The greedy tokens
//! and text are asserted equal on every fixture and SmolLM2, split prompts included.

mod common;
use common::*;
use elastica::generate::ThinkControl;
use elastica::generate::sampler::SamplerConfig;
use elastica::generate::think::think_end;
use elastica::generate::tokenizer::Tokenizer;
use elastica::generate::{GenConfig, Generation, StopReason, generate};
use elastica::runtime::control::{self, BudgetControl, Handoff};
use elastica::runtime::scheduler::{
    Answer, Engine, EngineConfig, Finished, Request, SeqId, Speculate, batched_bench,
};
use elastica::runtime::speculative::{self, Speculator};
use elastica::{Budget, Cache, Model};
use elastica::{Logits, SeqState, Work};
use std::collections::BTreeMap;

fn cfg(max_tokens: usize, stop: &[&str]) -> GenConfig {
    GenConfig {
        max_tokens,
        sampler: SamplerConfig::default(),
        stop: stop.iter().map(|s| s.to_string()).collect(),
        ignore_eos: false,
        logprobs: None,
    }
}

fn prompt(n: usize, seed: u32, vocab: usize) -> Vec<u32> {
    (0..n as u32)
        .map(|i| (i * 37 + seed * 11 + 5) % vocab.min(256) as u32)
        .collect()
}

fn alone(m: &Model, tok: &Tokenizer, r: &Request, ctx: usize) -> Generation {
    let mut c = Cache::new(m, ctx);
    generate(m, tok, &r.budget, &mut c, &r.prompt, &r.config, |_| {}).unwrap()
}

/// What the scheduler gave one request.
#[derive(Default, Debug)]
struct Out {
    tokens: Vec<u32>,
    text: String,
    finished: Option<Finished>,
    /// Steps in which it output a token.
    token_steps: Vec<usize>,
    /// Steps in which it ran prompt tokens.
    prefill_steps: Vec<usize>,
}

/// Runs `reqs`, request i added at step `join[i]` (or as soon as a slot is free after that);
/// the outputs by request.
fn schedule(eng: &mut Engine, reqs: &[Request], join: &[usize]) -> Vec<Out> {
    let mut outs: Vec<Out> = reqs.iter().map(|_| Out::default()).collect();
    let mut of: BTreeMap<SeqId, usize> = BTreeMap::new();
    let mut next = 0;
    for step in 0..10_000 {
        while next < reqs.len() && join[next] <= step {
            match eng.add(reqs[next].clone()) {
                Ok(id) => {
                    of.insert(id, next);
                    next += 1;
                }
                Err(e) => {
                    assert!(e.to_string().contains("--parallel"), "{e}");
                    break;
                }
            }
        }
        if next == reqs.len() && eng.is_idle() {
            return outs;
        }
        let ev = eng.step().unwrap();
        for (e, toks, text) in ev.iter() {
            let o = &mut outs[of[&e.seq]];
            o.text.push_str(text);
            if !toks.is_empty() {
                o.tokens.extend_from_slice(toks);
                o.token_steps.push(step);
            }
            if e.prefilled > 0 {
                o.prefill_steps.push(step);
            }
            if let Some(f) = e.finished {
                o.finished = Some(f);
                of.remove(&e.seq);
            }
        }
    }
    panic!("the scheduler did not finish");
}

fn check_same(name: &str, m: &Model, tok: &Tokenizer, reqs: &[Request], outs: &[Out], ctx: usize) {
    for (i, (r, o)) in reqs.iter().zip(outs).enumerate() {
        let g = alone(m, tok, r, ctx);
        assert_eq!(o.tokens, g.tokens, "{name}: request {i} tokens");
        assert_eq!(o.text, g.text, "{name}: request {i} text");
        let f = o.finished.unwrap();
        assert_eq!(f.reason, g.stop_reason, "{name}: request {i} stop reason");
        assert_eq!(
            (f.prompt_tokens, f.tokens),
            (r.prompt.len(), g.tokens.len())
        );
    }
}

/// Five requests over four slots at two budgets, joining at different steps, prompts of 1 to 30
/// tokens with a prefill chunk of 16 (the 30-token prompt runs in two steps), different limits,
/// one stop string: each gets exactly what `generate()` gives it alone.
#[test]
fn each_sequence_gets_its_tokens_alone() {
    let models = fixtures_and_smollm2();
    for (name, m, sub) in &models {
        let tok = Tokenizer::for_model(m).unwrap();
        let (full, small) = (m.full_budget(), m.budget(sub).unwrap());
        let lens = [7, 1, 12, 30, 3];
        let limits = [10, 16, 5, 12, 20];
        let reqs: Vec<Request> = (0..5)
            .map(|i| Request {
                prompt: prompt(lens[i], i as u32, m.vocab),
                budget: if i % 2 == 0 {
                    full.clone()
                } else {
                    small.clone()
                },
                config: cfg(limits[i], if i == 4 { &["e"] } else { &[] }),
                think: None,
                answer: None,
                speculate: None,
            })
            .collect();
        let ctx = 64;
        let ecfg = EngineConfig {
            parallel: 4,
            ctx,
            prefill_chunk: 16,
            draft_max: 0,
        };
        let mut eng = Engine::new(m, &tok, ecfg).unwrap();
        let outs = schedule(&mut eng, &reqs, &[0, 0, 1, 2, 2]);
        // The 30-token prompt was spread over two steps.
        assert_eq!(outs[3].prefill_steps.len(), 2, "{name}: {:?}", outs[3]);
        check_same(name, m, &tok, &reqs, &outs, ctx);
        // Again on the same engine (slots reused), all at once.
        let outs = schedule(&mut eng, &reqs, &[0; 5]);
        check_same(&format!("{name} again"), m, &tok, &reqs, &outs, ctx);
    }
}

/// A 100-token prompt added while two sequences decode runs in chunks of 16 over seven steps;
/// the two output a token in every one of those steps, and all three get their tokens alone.
#[test]
fn long_prompt_does_not_stall_the_others() {
    for (name, m, sub) in fixtures() {
        let tok = Tokenizer::for_model(&m).unwrap();
        let budgets = [m.full_budget(), m.budget(sub).unwrap()];
        let mut reqs: Vec<Request> = (0..2)
            .map(|i| Request {
                prompt: prompt(5, i, m.vocab),
                budget: budgets[i as usize].clone(),
                config: GenConfig {
                    ignore_eos: true,
                    logprobs: None,
                    ..cfg(30, &[])
                },
                think: None,
                answer: None,
                speculate: None,
            })
            .collect();
        reqs.push(Request {
            prompt: prompt(100, 9, m.vocab),
            budget: budgets[0].clone(),
            config: cfg(4, &[]),
            think: None,
            answer: None,
            speculate: None,
        });
        let ecfg = EngineConfig {
            parallel: 3,
            ctx: 128,
            prefill_chunk: 16,
            draft_max: 0,
        };
        let mut eng = Engine::new(&m, &tok, ecfg).unwrap();
        let outs = schedule(&mut eng, &reqs, &[0, 0, 3]);
        let long = &outs[2].prefill_steps;
        assert_eq!(long.len(), 7, "{name}: {long:?}");
        assert_eq!(long[0], 3);
        for s in long {
            for o in &outs[..2] {
                assert!(
                    o.token_steps.contains(s),
                    "{name}: no token in step {s} of the long prefill: {:?}",
                    o.token_steps
                );
            }
        }
        check_same(&name, &m, &tok, &reqs, &outs, 128);
    }
}

#[test]
fn parallel_limit_and_slot_reuse() {
    let fx = fixtures();
    let (_, m, _) = &fx[3];
    let tok = Tokenizer::for_model(m).unwrap();
    let ecfg = EngineConfig {
        parallel: 2,
        ctx: 32,
        prefill_chunk: 64,
        draft_max: 0,
    };
    let req = |n: usize, max: usize| Request {
        prompt: prompt(n, n as u32, m.vocab),
        budget: m.full_budget(),
        config: GenConfig {
            ignore_eos: true,
            logprobs: None,
            ..cfg(max, &[])
        },
        think: None,
        answer: None,
        speculate: None,
    };
    let mut eng = Engine::new(m, &tok, ecfg).unwrap();
    let a = eng.add(req(4, 2)).unwrap();
    let b = eng.add(req(5, 10)).unwrap();
    let e = eng.add(req(3, 2)).unwrap_err().to_string();
    assert!(
        e.contains("2 sequences are already active") && e.contains("--parallel 2"),
        "{e}"
    );
    // The first finishes after two tokens (prefill + one decode step); its slot is reused.
    let mut done = vec![];
    while done.is_empty() {
        let ev = eng.step().unwrap();
        done.extend(
            ev.iter()
                .filter_map(|(e, _, _)| e.finished.map(|f| (e.seq, f))),
        );
    }
    assert_eq!(done[0].0, a);
    assert_eq!(done[0].1.reason, StopReason::Length);
    assert_eq!(done[0].1.tokens, 2);
    assert_eq!(eng.active(), 1);
    let c = eng.add(req(3, 2)).unwrap();
    assert_eq!(c, a, "the freed slot is reused");
    assert!(eng.prefilling(c) && !eng.prefilling(b));
    // Cancelling frees a slot too.
    eng.remove(b).unwrap();
    assert!(
        eng.remove(b)
            .unwrap_err()
            .to_string()
            .contains("not active")
    );
    assert_eq!(eng.active(), 1);

    // Bad input.
    let bad = |c: EngineConfig| Engine::new(m, &tok, c).err().unwrap().to_string();
    assert!(
        bad(EngineConfig {
            parallel: 0,
            ..ecfg
        })
        .contains("--parallel")
    );
    assert!(bad(EngineConfig { ctx: 0, ..ecfg }).contains("--ctx"));
    assert!(
        bad(EngineConfig {
            prefill_chunk: 0,
            ..ecfg
        })
        .contains("prefill chunk")
    );
    let e = eng.add(req(33, 2)).unwrap_err().to_string();
    assert!(e.contains("33 tokens") && e.contains("--ctx"), "{e}");
    let e = eng.add(req(0, 2)).unwrap_err().to_string();
    assert!(e.contains("empty"), "{e}");
    let mut r = req(3, 2);
    r.prompt[1] = m.vocab as u32;
    let e = eng.add(r).unwrap_err().to_string();
    assert!(e.contains("outside the vocabulary"), "{e}");
    let other: Budget = fx[0].1.full_budget();
    let mut r = req(3, 2);
    r.budget = other;
    assert!(eng.add(r).is_err());
}

/// The batched bench decodes exactly n × tg tokens after the prefill and counts like
/// llama-batched-bench; with a small chunk the prefill spreads over steps.
#[test]
fn batched_bench_counts() {
    let fx = fixtures();
    for (name, m, _) in &fx[..] {
        let tok = Tokenizer::for_model(m).unwrap();
        let b = m.full_budget();
        for chunk in [None, Some(10)] {
            let r = batched_bench(m, &tok, &b, 12, 5, 3, chunk).unwrap();
            assert_eq!((r.pp, r.tg, r.n, r.n_kv), (12, 5, 3, 51), "{name}");
            let decoded = r.s_tg * r.t_tg;
            let expect = if chunk.is_none() { 15.0 } else { decoded };
            assert!((decoded - expect).abs() < 1e-6, "{name}: {decoded}");
            assert!(r.t_pp > 0.0 && r.t_tg > 0.0 && r.s > 0.0);
        }
    }
    let (_, m, _) = &fx[3];
    let tok = Tokenizer::for_model(m).unwrap();
    let e = batched_bench(m, &tok, &m.full_budget(), 0, 5, 3, None).unwrap_err();
    assert!(e.to_string().contains("--npp"), "{e}");
    let e = batched_bench(m, &tok, &m.full_budget(), 4, 5, 0, None).unwrap_err();
    assert!(e.to_string().contains("--parallel"), "{e}");
}

/// Budget schedules in the engine (point 2: a sequence carries its budget schedule): three
/// sequences that think at one budget and answer at the other, with both hand-offs, next to a
/// plain one, each get the tokens and text that `control::generate` (or `generate()`) gives
/// them alone, and each switches exactly once, in the step that completes its marker.
#[test]
fn budget_schedules_run_in_the_engine() {
    let models = fixtures_and_smollm2();
    for (name, m, sub) in &models {
        let tok = Tokenizer::for_model(m).unwrap();
        let (full, small) = (m.full_budget(), m.budget(sub).unwrap());
        let end = think_end(None, &tok, Some("</think>")).unwrap();
        let think = |cap| ThinkControl {
            end: end.clone(),
            cap: Some(cap),
            grace: 0,
        };
        let plan = [
            (small.clone(), Some((full.clone(), Handoff::Shared)), 4),
            (small.clone(), Some((full.clone(), Handoff::Reprefill)), 6),
            (full.clone(), None, 0),
            (full.clone(), Some((small.clone(), Handoff::Reprefill)), 3),
        ];
        let reqs: Vec<Request> = plan
            .iter()
            .enumerate()
            .map(|(i, (b, a, cap))| Request {
                prompt: prompt(5 + 2 * i, i as u32, m.vocab),
                budget: b.clone(),
                config: GenConfig {
                    ignore_eos: true,
                    logprobs: None,
                    ..cfg(14 + i, &[])
                },
                think: a.as_ref().map(|_| think(*cap)),
                answer: a.as_ref().map(|(b, h)| Answer {
                    budget: b.clone(),
                    handoff: *h,
                }),
                speculate: None,
            })
            .collect();
        let ctx = 64;
        let ecfg = EngineConfig {
            parallel: 4,
            ctx,
            prefill_chunk: 64,
            draft_max: 0,
        };
        let mut eng = Engine::new(m, &tok, ecfg).unwrap();
        let mut of: BTreeMap<SeqId, usize> = BTreeMap::new();
        for (i, r) in reqs.iter().enumerate() {
            of.insert(eng.add(r.clone()).unwrap(), i);
        }
        let mut outs: Vec<Out> = reqs.iter().map(|_| Out::default()).collect();
        let mut switched = vec![vec![]; reqs.len()];
        while !eng.is_idle() {
            let ev = eng.step().unwrap();
            for (e, toks, text) in ev.iter() {
                let i = of[&e.seq];
                outs[i].text.push_str(text);
                outs[i].tokens.extend_from_slice(toks);
                if e.switched {
                    switched[i].push(outs[i].tokens.len());
                }
                if e.finished.is_some() {
                    outs[i].finished = e.finished;
                }
            }
        }
        for (i, (r, o)) in reqs.iter().zip(&outs).enumerate() {
            let (tokens, text) = match &r.answer {
                None => {
                    let g = alone(m, &tok, r, ctx);
                    (g.tokens, g.text)
                }
                Some(a) => {
                    let ctl = BudgetControl {
                        think: r.budget.clone(),
                        answer: a.budget.clone(),
                        handoff: a.handoff,
                        ctl: r.think.clone().unwrap(),
                    };
                    let mut c = Cache::new(m, ctx);
                    let g = control::generate(m, &tok, &ctl, &mut c, &r.prompt, &r.config, |_| {})
                        .unwrap();
                    let think_n = g.thinking.tokens;
                    assert_eq!(switched[i], vec![think_n], "{name}: request {i} switch");
                    (g.generation.tokens, g.generation.text)
                }
            };
            assert_eq!(o.tokens, tokens, "{name}: request {i} tokens");
            assert_eq!(o.text, text, "{name}: request {i} text");
            assert_eq!(o.finished.unwrap().prompt_tokens, r.prompt.len());
        }
        assert!(switched[2].is_empty());
        // An answer budget without thinking control is refused.
        let mut bad = reqs[0].clone();
        bad.think = None;
        let e = eng.add(bad).unwrap_err().to_string();
        assert!(e.contains("answer budget needs thinking control"), "{e}");
    }
}

/// Runs `reqs` all added at step 0 to `eng` (checking one event per sequence per step); outputs by
/// request, and a hook called before each step with the engine, the ids by request and the
/// tokens so far.
fn run_all(
    eng: &mut Engine,
    reqs: &[Request],
    mut before_step: impl FnMut(&mut Engine, &[SeqId], &[Out]),
) -> Vec<Out> {
    let ids: Vec<SeqId> = reqs.iter().map(|r| eng.add(r.clone()).unwrap()).collect();
    let of: BTreeMap<SeqId, usize> = ids.iter().enumerate().map(|(i, &id)| (id, i)).collect();
    let mut outs: Vec<Out> = reqs.iter().map(|_| Out::default()).collect();
    for step in 0..10_000 {
        if eng.is_idle() {
            return outs;
        }
        before_step(eng, &ids, &outs);
        let ev = eng.step().unwrap();
        let mut seen = std::collections::BTreeSet::new();
        for (e, toks, text) in ev.iter() {
            assert!(
                seen.insert(e.seq),
                "two events for sequence {} in one step",
                e.seq
            );
            let o = &mut outs[of[&e.seq]];
            o.text.push_str(text);
            if !toks.is_empty() {
                o.tokens.extend_from_slice(toks);
                o.token_steps.push(step);
            }
            if e.finished.is_some() {
                o.finished = e.finished;
            }
        }
    }
    panic!("the scheduler did not finish");
}

/// Speculating sequences in the engine (the server's `speculate`): next to plain ones, each gets
/// the greedy tokens and text it gets alone, on every fixture (Mamba rollbacks included) and
/// SmolLM2; a round outputs several tokens in one step; the engine counts drafts and kept tokens.
/// Sampled, a speculating sequence gets exactly what `speculative::generate` gives with the same
/// seed (one sampler draws every token in both).
#[test]
fn speculating_sequences_in_the_engine() {
    let models = fixtures_and_smollm2();
    for (name, m, sub) in &models {
        let tok = Tokenizer::for_model(m).unwrap();
        let (full, small) = (m.full_budget(), m.budget(sub).unwrap());
        let spec = |k| {
            Some(Speculate {
                draft: small.clone(),
                k,
            })
        };
        let plan = [(spec(3), 20), (None, 12), (spec(1), 9), (spec(4), 17)];
        let reqs: Vec<Request> = plan
            .iter()
            .enumerate()
            .map(|(i, (sp, n))| Request {
                prompt: prompt(4 + 3 * i, i as u32, m.vocab),
                budget: full.clone(),
                config: GenConfig {
                    ignore_eos: true,
                    logprobs: None,
                    ..cfg(*n, &[])
                },
                think: None,
                answer: None,
                speculate: sp.clone(),
            })
            .collect();
        let ctx = 64;
        let ecfg = EngineConfig {
            parallel: 4,
            ctx,
            prefill_chunk: 64,
            draft_max: 4,
        };
        let mut eng = Engine::new(m, &tok, ecfg).unwrap();
        let outs = run_all(&mut eng, &reqs, |_, _, _| {});
        check_same(name, m, &tok, &reqs, &outs, ctx);
        let t = eng.spec_totals().clone();
        assert!(t.drafts > 0 && t.draft_tokens >= t.drafts, "{name}: {t:?}");
        assert_eq!(t.accepted_per_pos.iter().sum::<u64>(), t.accepted_tokens);
        // Each kept draft token is one more token in its round's step, but for the last round
        // of a request, which its limit may cut (by at most K).
        let extra: u64 = outs
            .iter()
            .map(|o| (o.tokens.len() - o.token_steps.len()) as u64)
            .sum();
        let cut: u64 = [3, 1, 4].iter().sum();
        assert!(
            extra <= t.accepted_tokens && extra + cut >= t.accepted_tokens,
            "{name}: {extra} extra tokens in steps, {} accepted",
            t.accepted_tokens
        );
        // Sampled: the same draws as speculative::generate.
        let sampled = SamplerConfig {
            temperature: 0.9,
            top_k: 20,
            top_p: 0.95,
            seed: 7,
        };
        let mut r = reqs[0].clone();
        r.config.sampler = sampled;
        let outs = run_all(&mut eng, std::slice::from_ref(&r), |_, _, _| {});
        let mut sp = Speculator::new(m, small.clone(), &full, 3).unwrap();
        let mut cache = Cache {
            seq: SeqState::try_new(m, ctx, 3).unwrap(),
            work: Work::try_new(m, ctx).unwrap(),
        };
        let g = speculative::generate(m, &tok, &mut sp, &mut cache, &r.prompt, &r.config, |_| {})
            .unwrap();
        assert_eq!(outs[0].tokens, g.tokens, "{name}: sampled speculative");
    }
}

/// Greedy tokens of `n1` steps at `a` after `prompt`, then `n2` at `b` on the same state.
fn decode_then_switch(
    m: &Model,
    p: &[u32],
    a: &Budget,
    n1: usize,
    b: &Budget,
    n2: usize,
) -> Vec<u32> {
    use elastica::generate::sampler::argmax;
    let mut c = Cache::new(m, 64);
    let mut out = vec![argmax(m.forward(p, a, &mut c, Logits::Last).unwrap())];
    while out.len() < n1 + n2 {
        let bud = if out.len() < n1 { a } else { b };
        let t = *out.last().unwrap();
        out.push(argmax(m.forward(&[t], bud, &mut c, Logits::Last).unwrap()));
    }
    out
}

/// The control actions on running sequences (the server's control endpoint): `set_budget`
/// moves a sequence to another budget on its state (its tokens equal decoding at one budget then
/// the other), `end_reasoning` forces the end-of-thinking marker next, and both refuse what they
/// cannot do.
#[test]
fn control_actions_on_running_sequences() {
    let models = fixtures_and_smollm2();
    for (name, m, sub) in &models {
        let tok = Tokenizer::for_model(m).unwrap();
        let (full, small) = (m.full_budget(), m.budget(sub).unwrap());
        let end = think_end(None, &tok, Some("</think>")).unwrap();
        let p = prompt(6, 3, m.vocab);
        let base = Request {
            prompt: p.clone(),
            budget: full.clone(),
            config: GenConfig {
                ignore_eos: true,
                logprobs: None,
                ..cfg(16, &[])
            },
            think: None,
            answer: None,
            speculate: None,
        };
        let thinking = Request {
            think: Some(ThinkControl {
                end: end.clone(),
                cap: None,
                grace: 0,
            }),
            ..base.clone()
        };
        let ecfg = EngineConfig {
            parallel: 2,
            ctx: 64,
            prefill_chunk: 64,
            draft_max: 0,
        };
        let mut eng = Engine::new(m, &tok, ecfg).unwrap();
        // Request 0 moves to the small budget once it has 5 tokens; request 1 ends its reasoning
        // once it has 3.
        let (mut moved, mut ended) = (false, false);
        let outs = run_all(
            &mut eng,
            &[base.clone(), thinking.clone()],
            |eng, ids, outs| {
                if !moved && outs[0].tokens.len() == 5 {
                    eng.set_budget(ids[0], small.clone()).unwrap();
                    moved = true;
                }
                if !ended && outs[1].tokens.len() == 3 {
                    eng.end_reasoning(ids[1]).unwrap();
                    ended = true;
                    let e = eng.end_reasoning(ids[0]).unwrap_err().to_string();
                    assert!(e.contains("is not thinking"), "{e}");
                }
            },
        );
        assert!(moved && ended, "{name}");
        let want = decode_then_switch(m, &p, &full, 5, &small, 11);
        assert_eq!(outs[0].tokens, want, "{name}: set_budget");
        let n = end.tokens.len();
        assert_eq!(
            &outs[1].tokens[3..3 + n],
            &end.tokens[..],
            "{name}: end_reasoning"
        );
        let e = eng.set_budget(0, small.clone()).unwrap_err().to_string();
        assert!(e.contains("is not active"), "{e}");
    }
}

/// Requests the engine cannot take: speculation without draft room or beyond it, with thinking
/// control, or with a draft that does not nest.
#[test]
fn bad_speculative_requests_are_errors() {
    let fx = fixtures();
    let (_, m, sub) = &fx[0];
    let tok = Tokenizer::for_model(m).unwrap();
    let (full, small) = (m.full_budget(), m.budget(sub).unwrap());
    let req = |draft: &Budget, target: &Budget, k| Request {
        prompt: prompt(4, 1, m.vocab),
        budget: target.clone(),
        config: cfg(4, &[]),
        think: None,
        answer: None,
        speculate: Some(Speculate {
            draft: draft.clone(),
            k,
        }),
    };
    let ecfg = |draft_max| EngineConfig {
        parallel: 2,
        ctx: 32,
        prefill_chunk: 32,
        draft_max,
    };
    let mut none = Engine::new(m, &tok, ecfg(0)).unwrap();
    let e = none.add(req(&small, &full, 2)).unwrap_err().to_string();
    assert!(e.contains("engine started with draft tokens"), "{e}");
    let mut eng = Engine::new(m, &tok, ecfg(4)).unwrap();
    for (r, want) in [
        (req(&small, &full, 5), "this engine allows 1 to 4"),
        (req(&small, &full, 0), "this engine allows 1 to 4"),
        (req(&full, &small, 2), "does not nest inside"),
        (
            Request {
                think: Some(ThinkControl {
                    end: think_end(None, &tok, Some("</think>")).unwrap(),
                    cap: Some(3),
                    grace: 0,
                }),
                ..req(&small, &full, 2)
            },
            "does not combine with thinking control",
        ),
    ] {
        let e = eng.add(r).unwrap_err().to_string();
        assert!(e.contains(want), "{e}");
    }
    assert!(eng.is_idle());
    let e = Engine::new(m, &tok, ecfg(17)).err().unwrap().to_string();
    assert!(e.contains("must be 1 to 16"), "{e}");
}
