//! Elastic budget control (issue 11, points 4 and 5): thinking at one budget, answering at
//! another, with the `shared` and `reprefill` hand-offs, checked against independent decoding;
//! and the CLI's phases and errors. SmolLM2 does not think, so its thinking is forced by a cap
//! or its marker is a text it produces anyway.

mod common;
use common::*;
use elastica::generate::sampler::{SamplerConfig, argmax};
use elastica::generate::think::think_end;
use elastica::generate::tokenizer::Tokenizer;
use elastica::generate::{GenConfig, ThinkControl, chat, generate};
use elastica::runtime::control::{self, BudgetControl, Controlled, Handoff};
use elastica::{Budget, Cache, Logits, Model};

const SUB: &str = "hidden=288,ffn=768,heads=6";

fn cfg(n: usize) -> GenConfig {
    GenConfig {
        max_tokens: n,
        sampler: SamplerConfig::default(),
        stop: vec![],
        ignore_eos: true,
        logprobs: None,
    }
}

fn chat_prompt(m: &Model, tok: &Tokenizer) -> Vec<u32> {
    chat::prompt(
        m.meta.chat_template.as_deref(),
        tok,
        None,
        "What is the capital of France?",
    )
    .unwrap()
}

#[allow(clippy::too_many_arguments)]
fn controlled(
    m: &Model,
    tok: &Tokenizer,
    think: &Budget,
    answer: &Budget,
    handoff: Handoff,
    end: &str,
    cap: Option<usize>,
    prompt: &[u32],
    n: usize,
) -> Controlled {
    let ctl = BudgetControl {
        think: think.clone(),
        answer: answer.clone(),
        handoff,
        ctl: ThinkControl {
            end: think_end(None, tok, Some(end)).unwrap(),
            cap,
            grace: 0,
        },
    };
    let mut cache = Cache::try_new(m, 512).unwrap();
    control::generate(m, tok, &ctl, &mut cache, prompt, &cfg(n), |_| {}).unwrap()
}

/// Greedy decoding of `n` tokens from logits already computed into `cache` at `b`.
fn continue_greedy(m: &Model, b: &Budget, cache: &mut Cache, first: &[f32], n: usize) -> Vec<u32> {
    let mut out = vec![argmax(first)];
    while out.len() < n {
        let t = *out.last().unwrap();
        out.push(argmax(m.forward(&[t], b, cache, Logits::Last).unwrap()));
    }
    out
}

/// S = L: the switch is a no-op (`shared`: the very tokens of plain decoding; `reprefill`: the
/// same state recomputed, the same answer).
#[test]
fn same_budget_switch_is_a_no_op() {
    let Some(m) = smollm2() else {
        eprintln!("SmolLM2 is absent: skipped");
        return;
    };
    let tok = Tokenizer::for_model(&m).unwrap();
    let full = m.full_budget();
    let prompt = chat_prompt(&m, &tok);
    let n = 24;
    let mut cache = Cache::try_new(&m, 512).unwrap();
    let plain = generate(&m, &tok, &full, &mut cache, &prompt, &cfg(n), |_| {}).unwrap();
    // A marker the model produces by itself: the text of its 4th and 5th tokens.
    let end = tok.decode(&plain.tokens[3..5]).unwrap();
    assert!(!tok.decode(&plain.tokens[..4]).unwrap().contains(&end));
    let c = controlled(
        &m,
        &tok,
        &full,
        &full,
        Handoff::Shared,
        &end,
        None,
        &prompt,
        n,
    );
    assert_eq!(c.generation.tokens, plain.tokens);
    assert_eq!(c.generation.text, plain.text);
    assert_eq!(c.thinking.tokens, 5);
    assert_eq!(c.answer.as_ref().unwrap().tokens, n - 5);
    // Forced thinking: reprefill at S = L answers as shared does.
    let [s, r] = [Handoff::Shared, Handoff::Reprefill]
        .map(|h| controlled(&m, &tok, &full, &full, h, "</think>", Some(6), &prompt, n));
    assert_eq!(s.generation.tokens, r.generation.tokens);
    assert_eq!(s.thinking.tokens, r.thinking.tokens);
    let (sa, ra) = (s.answer.unwrap(), r.answer.unwrap());
    assert_eq!(
        (sa.start_tokens, ra.start_tokens),
        (1, prompt.len() + s.thinking.tokens)
    );
}

/// S ≠ L: the phases carry their budgets and counts, thinking ends right after the forced
/// marker, and the answer is what plain decoding at L gives after the same prompt + thinking:
/// a fresh prefill for `reprefill`, the thinking budget's state continued for `shared`.
#[test]
fn switch_matches_independent_decoding() {
    let Some(m) = smollm2() else {
        eprintln!("SmolLM2 is absent: skipped");
        return;
    };
    let tok = Tokenizer::for_model(&m).unwrap();
    let (small, full) = (m.budget(SUB).unwrap(), m.full_budget());
    let prompt = chat_prompt(&m, &tok);
    let marker = think_end(None, &tok, Some("</think>")).unwrap().tokens;
    let (cap, n) = (8, 30);
    let think_n = cap + marker.len();
    // The thinking budget's own first tokens.
    let mut cache = Cache::try_new(&m, 512).unwrap();
    let first = m
        .forward(&prompt, &small, &mut cache, Logits::Last)
        .unwrap()
        .to_vec();
    let own = continue_greedy(&m, &small, &mut cache, &first, cap);
    for h in [Handoff::Shared, Handoff::Reprefill] {
        let c = controlled(
            &m,
            &tok,
            &small,
            &full,
            h,
            "</think>",
            Some(cap),
            &prompt,
            n,
        );
        let g = &c.generation;
        let a = c.answer.as_ref().unwrap();
        assert_eq!(c.thinking.budget, small.spec(&m.shape), "{h:?}");
        assert_eq!(a.budget, full.spec(&m.shape));
        assert_eq!((c.thinking.tokens, a.tokens), (think_n, n - think_n));
        assert_eq!(&g.tokens[..cap], &own[..], "{h:?}: thinking at S");
        assert_eq!(&g.tokens[cap..think_n], &marker[..], "{h:?}: forced marker");
        assert!(g.text.contains("</think>"));
        let json = c.phases_json();
        assert_eq!(json[1]["handoff"], h.name());
        assert_eq!(json[0]["tokens"], think_n);
        // Independent decoding of the answer at L.
        let thinking = &g.tokens[..think_n];
        let mut cache = Cache::try_new(&m, 512).unwrap();
        let logits = match h {
            Handoff::Reprefill => {
                let all: Vec<u32> = prompt.iter().chain(thinking).copied().collect();
                m.forward(&all, &full, &mut cache, Logits::Last)
                    .unwrap()
                    .to_vec()
            }
            Handoff::Shared => {
                m.forward(&prompt, &small, &mut cache, Logits::Last)
                    .unwrap();
                for &t in &thinking[..think_n - 1] {
                    m.forward(&[t], &small, &mut cache, Logits::Last).unwrap();
                }
                let last = &thinking[think_n - 1..];
                m.forward(last, &full, &mut cache, Logits::Last)
                    .unwrap()
                    .to_vec()
            }
        };
        let want = continue_greedy(&m, &full, &mut cache, &logits, n - think_n);
        assert_eq!(&g.tokens[think_n..], &want[..], "{h:?}: answer at L");
        eprintln!("{h:?}: {}", c.summary());
    }
}

/// `run --think-budget S --answer-budget L` on the tiny fixture: the phases in --json and on the
/// stats line, for both hand-offs.
#[test]
fn run_reports_phases() {
    let m = fixture("llama_tiny");
    let m = m.to_str().unwrap();
    let sub = "hidden=48,ffn=64,heads=2";
    let base = [
        "run",
        m,
        "-p",
        "hello world",
        "-n",
        "20",
        "--ignore-eos",
        "--think-budget",
        sub,
        "--answer-budget",
        "full",
        "--thinking-tokens",
        "5",
        "--think-end",
        "</think>",
    ];
    let full = load(&fixture("llama_tiny")).full_budget();
    let full = full.spec(&load(&fixture("llama_tiny")).shape);
    let mut thought = vec![];
    for h in ["shared", "reprefill"] {
        let mut args = base.to_vec();
        args.extend(["--handoff", h, "--json"]);
        let (ok, out, err) = cli(&args);
        assert!(ok, "{err}");
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        let p = v["phases"].as_array().unwrap();
        assert_eq!(p.len(), 2);
        assert_eq!(p[0]["phase"], "thinking");
        assert_eq!(p[0]["budget"], sub);
        assert_eq!(
            (p[1]["budget"].as_str().unwrap(), &p[1]["handoff"]),
            (full.as_str(), &h.into())
        );
        let (t, a) = (
            p[0]["tokens"].as_u64().unwrap(),
            p[1]["tokens"].as_u64().unwrap(),
        );
        assert!(t > 5 && t + a == 20, "{t} + {a}");
        assert!(v["text"].as_str().unwrap().contains("</think>"));
        let start = p[1]["start_tokens"].as_u64().unwrap();
        let want = if h == "shared" {
            1
        } else {
            v["prompt_tokens"].as_u64().unwrap() + t
        };
        assert_eq!(start, want);
        thought.push(v["tokens"].as_array().unwrap()[..t as usize].to_vec());
        let mut args = base.to_vec();
        args.extend(["--handoff", h]);
        let (ok, _, err) = cli(&args);
        assert!(ok, "{err}");
        assert!(
            err.contains(&format!("thinking at {sub}")) && err.contains(&format!("{h} hand-off")),
            "{err}"
        );
    }
    assert_eq!(
        thought[0], thought[1],
        "the thinking phase does not depend on the hand-off"
    );
}

/// S = L = full with `shared` prints exactly what plain `run` prints.
#[test]
fn run_same_budget_is_plain_run() {
    let Some(_) = smollm2() else {
        eprintln!("SmolLM2 is absent: skipped");
        return;
    };
    let p = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    let base = [
        "run",
        p.to_str().unwrap(),
        "--chat",
        "-p",
        "What is the capital of France?",
        "-n",
        "20",
    ];
    let (ok, plain, err) = cli(&base);
    assert!(ok, "{err}");
    // A marker the model writes anyway (it does not think).
    let end = plain.split_whitespace().nth(2).unwrap().to_string();
    let mut args = base.to_vec();
    args.extend([
        "--think-budget",
        "full",
        "--answer-budget",
        "full",
        "--think-end",
        &end,
    ]);
    let (ok, out, err) = cli(&args);
    assert!(ok, "{err}");
    assert_eq!(out, plain);
    assert!(
        err.contains("thinking at") && err.contains("answer at"),
        "{err}"
    );
    // Its template has no thinking markers.
    let (ok, _, err) = cli(&[&base[..], &["--think-budget", "full"]].concat());
    assert!(
        !ok && err.contains("no thinking markers") && err.contains("--think-end"),
        "{err}"
    );
}

#[test]
fn bad_budget_control_is_an_error() {
    let m = fixture("llama_tiny");
    let m = m.to_str().unwrap();
    let base = ["run", m, "-p", "hello world", "-n", "4"];
    for (extra, needle) in [
        (
            &["--think-budget", "full", "--thinking-tokens", "0"][..],
            "at least 1",
        ),
        (
            &["--think-budget", "full", "--thinking-tokens", "-3"][..],
            "at least 1",
        ),
        // No chat template, so no marker unless named.
        (&["--think-budget", "full"][..], "--think-end"),
        (
            &["--think-budget", "full", "--think-end", ""][..],
            "--think-end is empty",
        ),
        (&["--answer-budget", "full"][..], "--think-budget"),
        (&["--thinking-tokens", "4"][..], "--think-budget"),
        (
            &[
                "--think-budget",
                "full",
                "--think-end",
                "x",
                "--think-grace",
                "3",
            ][..],
            "--thinking-tokens",
        ),
        (
            &["--think-budget", "bogus=3", "--think-end", "x"][..],
            "unknown axis",
        ),
        (
            &["--think-budget", "small", "--think-end", "x"][..],
            "manifest",
        ),
        (
            &[
                "--think-budget",
                "full",
                "--think-end",
                "x",
                "--answer-budget",
                "bogus=3",
            ][..],
            "unknown axis",
        ),
        (
            &[
                "--think-budget",
                "full",
                "--think-end",
                "x",
                "--handoff",
                "copy",
            ][..],
            "reprefill",
        ),
        (
            &[
                "--think-budget",
                "full",
                "--think-end",
                "x",
                "--speculate",
                "full",
            ][..],
            "--speculate",
        ),
        (
            &[
                "--think-budget",
                "full",
                "--think-end",
                "x",
                "--budget",
                "full",
                "--answer-budget",
                "full",
            ][..],
            "--budget",
        ),
    ] {
        let (ok, _, err) = cli(&[&base[..], extra].concat());
        assert!(!ok && err.contains(needle), "{extra:?}: {err}");
    }
}
