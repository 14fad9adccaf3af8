//! Nested self-speculative decoding (issue 11, point 6): greedy output is byte-identical to plain
//! greedy decoding on every fixture and SmolLM2, sampled output is distributed as the target's,
//! and bad settings are errors.

mod common;
use common::*;
use elastica::generate::sampler::{Sampler, SamplerConfig, argmax};
use elastica::runtime::speculative::{MAX_DRAFT, Speculator};
use elastica::{BatchItem, Budget, Logits, Model, SeqState, Work};

/// Logits of the last of `tokens` appended to `s`.
fn step(m: &Model, b: &Budget, s: &mut SeqState, w: &mut Work, tokens: &[u32]) -> Vec<f32> {
    let mut items = [BatchItem {
        seq: s,
        tokens,
        logits: Logits::Last,
        stepwise: false,
    }];
    m.forward_batch(&mut items, b, w).unwrap().item(0).to_vec()
}

fn prompt(m: &Model) -> Vec<u32> {
    (0..12u32).map(|i| (i * 37 + 5) % m.vocab as u32).collect()
}

/// Plain greedy decoding: `n` tokens after the prompt.
fn plain(m: &Model, b: &Budget, n: usize) -> Vec<u32> {
    let (mut s, mut w) = (SeqState::try_new(m, 128, 0).unwrap(), Work::new());
    let mut t = argmax(&step(m, b, &mut s, &mut w, &prompt(m)));
    let mut out = vec![t];
    while out.len() < n {
        t = argmax(&step(m, b, &mut s, &mut w, &[t]));
        out.push(t);
    }
    out
}

/// Speculative decoding with drafts of `k` at `draft`: `n` tokens after the prompt.
fn speculative(
    m: &Model,
    target: &Budget,
    draft: &Budget,
    k: usize,
    n: usize,
    cfg: SamplerConfig,
) -> (Vec<u32>, Speculator) {
    let (mut s, mut w) = (SeqState::try_new(m, 128, k).unwrap(), Work::new());
    let mut sampler = Sampler::new(cfg);
    let mut spec = Speculator::new(m, draft.clone(), target, k).unwrap();
    let mut out = vec![sampler.sample(&step(m, target, &mut s, &mut w, &prompt(m)))];
    while out.len() < n {
        let t0 = *out.last().unwrap();
        spec.round(m, &mut s, &mut w, t0, &mut sampler, &mut out)
            .unwrap();
    }
    out.truncate(n);
    (out, spec)
}

#[test]
fn greedy_is_byte_identical_to_plain_decoding() {
    let models = fixtures_and_smollm2();
    for (name, m, sub) in &models {
        let full = m.full_budget();
        let draft = m.budget(sub).unwrap();
        let want = plain(m, &full, 40);
        for k in [1, 3, 8] {
            let (got, spec) = speculative(m, &full, &draft, k, 40, SamplerConfig::default());
            assert_eq!(got, want, "{name}: K = {k}");
            // The draft budget really differs: not every draft token is kept, nor none.
            let st = &spec.stats;
            assert!(st.rounds > 0 && st.drafted > 0, "{name}");
            eprintln!(
                "{name} K={k}: {} rounds, {:.2} tokens/round, accepted {}/{}",
                st.rounds,
                st.tokens_per_round(),
                st.accepted,
                st.drafted
            );
        }
        // Drafting at the target itself keeps every draft.
        let (got, spec) = speculative(m, &full, &full, 4, 40, SamplerConfig::default());
        assert_eq!(got, want, "{name}: self-draft");
        assert_eq!(
            spec.stats.accepted, spec.stats.drafted,
            "{name}: self-draft keeps all"
        );
    }
}

/// With sampling, the token after a round's first position is distributed as the target's
/// (chi-square against the target's own distribution, top-k 6 at temperature 1).
#[test]
fn sampled_output_is_distributed_as_the_target() {
    let m = load(&fixture("llama_tiny"));
    let full = m.full_budget();
    let draft = m.budget("hidden=48,ffn=64,heads=2").unwrap();
    let cfg = |seed| SamplerConfig {
        temperature: 1.0,
        top_k: 6,
        top_p: 1.0,
        seed,
    };
    // The target's distribution of the second token, after the prompt and a fixed first one.
    let p0 = prompt(&m);
    let t0 = 7u32;
    let (mut s, mut w) = (SeqState::try_new(&m, 64, 4).unwrap(), Work::new());
    step(&m, &full, &mut s, &mut w, &p0);
    let logits = step(&m, &full, &mut s, &mut w, &[t0]);
    let mut p = vec![0.0; m.vocab];
    Sampler::new(cfg(0)).probs(&logits, &mut p);
    let mut spec = Speculator::new(&m, draft, &full, 4).unwrap();
    let mut counts = vec![0usize; m.vocab];
    let n = 3000;
    let mut out = Vec::with_capacity(16);
    for seed in 0..n {
        s.reset();
        step(&m, &full, &mut s, &mut w, &p0);
        let mut sampler = Sampler::new(cfg(seed as u64 + 1));
        out.clear();
        spec.round(&m, &mut s, &mut w, t0, &mut sampler, &mut out)
            .unwrap();
        counts[out[0] as usize] += 1;
    }
    let support: Vec<usize> = (0..m.vocab).filter(|&i| p[i] > 0.0).collect();
    assert_eq!(support.len(), 6);
    assert!(
        counts
            .iter()
            .enumerate()
            .all(|(i, &c)| c == 0 || p[i] > 0.0)
    );
    let chi2: f64 = support
        .iter()
        .map(|&i| {
            let e = n as f64 * p[i] as f64;
            (counts[i] as f64 - e).powi(2) / e
        })
        .sum();
    // 5 degrees of freedom: P(chi2 > 20.52) = 0.001.
    assert!(chi2 < 20.52, "chi2 {chi2}");
    let st = &spec.stats;
    assert!(
        st.accepted > 0 && st.accepted < st.drafted,
        "acceptance {}/{}",
        st.accepted,
        st.drafted
    );
}

#[test]
fn bad_settings_are_errors() {
    let m = load(&fixture("llama_tiny"));
    let full = m.full_budget();
    let small = m.budget("hidden=48,ffn=64,heads=2").unwrap();
    for k in [0, MAX_DRAFT + 1] {
        let e = Speculator::new(&m, small.clone(), &full, k)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("--draft") && e.contains(&k.to_string()), "{e}");
    }
    let e = Speculator::new(&m, full.clone(), &small, 2)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("does not nest"), "{e}");
    // A Mamba model without checkpoints cannot roll back: an error, not a wrong answer.
    let m = load(&fixture("nemotron_h_dense"));
    let full = m.full_budget();
    let (mut s, mut w) = (SeqState::try_new(&m, 64, 0).unwrap(), Work::new());
    step(&m, &full, &mut s, &mut w, &prompt(&m));
    let mut spec = Speculator::new(&m, full.clone(), &full, 2).unwrap();
    let mut sampler = Sampler::new(SamplerConfig::default());
    let e = spec
        .round(&m, &mut s, &mut w, 1, &mut sampler, &mut vec![])
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("checkpoint"), "{e}");
}

/// `run --speculate` prints what plain `run` prints (greedy), with its acceptance statistics,
/// and refuses bad settings by name.
#[test]
fn run_speculate_matches_plain_run() {
    let m = fixture("llama_tiny");
    let m = m.to_str().unwrap();
    let base = [
        "run",
        m,
        "-p",
        "hello world",
        "-n",
        "24",
        "--ignore-eos",
        "--json",
    ];
    let (ok, plain, err) = cli(&base);
    assert!(ok, "{err}");
    let plain: serde_json::Value = serde_json::from_str(&plain).unwrap();
    for draft in ["hidden=48,ffn=64,heads=2", "full"] {
        let mut args = base.to_vec();
        args.extend(["--speculate", draft, "--draft", "3"]);
        let (ok, out, err) = cli(&args);
        assert!(ok, "{err}");
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["tokens"], plain["tokens"], "--speculate {draft}");
        assert_eq!(v["text"], plain["text"]);
        let s = &v["speculative"];
        assert_eq!(s["draft_tokens"], 3);
        assert_eq!(s["acceptance_at"].as_array().unwrap().len(), 3);
        assert!(s["rounds"].as_u64().unwrap() > 0);
    }
    for (extra, needle) in [
        (&["--speculate", "full", "--draft", "0"][..], "--draft 0"),
        (&["--speculate", "full", "--draft", "17"][..], "--draft 17"),
        (
            &["--budget", "hidden=48", "--speculate", "full"][..],
            "does not nest",
        ),
        (&["--speculate", "bogus=3"][..], "unknown axis"),
        (&["--draft", "3"][..], "--speculate"),
    ] {
        let mut args = base.to_vec();
        args.extend(extra);
        let (ok, _, err) = cli(&args);
        assert!(!ok && err.contains(needle), "{extra:?}: {err}");
    }
}
