//! Elastic budget control for one sequence (issue 11, points 4 and 5): the sequence thinks at a
//! budget S until the model closes its reasoning (the end-of-thinking token sequence of its chat
//! template, or forced by a thinking-token cap, see [`ThinkControl`]), then answers at a budget
//! L. The switch hands the state over in one of two ways ([`Handoff`]).

use elastica_core::budget::Budget;
use elastica_core::error::{Error, Result};
use elastica_core::generate::tokenizer::Tokenizer;
use elastica_core::generate::{Decoder, GenConfig, Generation, Step, StopReason, ThinkControl};
use elastica_core::model::{Cache, Logits, Model};
use std::time::Instant;

/// How the answer budget takes over the sequence's state.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Handoff {
    /// Continue on the cache the thinking budget wrote: the state is in the parent's layout, so
    /// the answer budget reads it as is (nested caches are close: the paper measured 0.89–0.96
    /// cosine similarity).
    #[default]
    Shared,
    /// Recompute the prompt and the thinking text at the answer budget first (one prefill),
    /// then continue: the paper's measured protocol.
    Reprefill,
}

impl Handoff {
    pub fn name(self) -> &'static str {
        match self {
            Handoff::Shared => "shared",
            Handoff::Reprefill => "reprefill",
        }
    }
}

impl std::str::FromStr for Handoff {
    type Err = Error;
    fn from_str(s: &str) -> Result<Handoff> {
        match s {
            "shared" => Ok(Handoff::Shared),
            "reprefill" => Ok(Handoff::Reprefill),
            _ => Err(Error::Input(format!(
                "--handoff {s:?}: expected shared or reprefill"
            ))),
        }
    }
}

/// The budget schedule of a controlled sequence: think at `think`, answer at `answer`.
#[derive(Clone, Debug)]
pub struct BudgetControl {
    pub think: Budget,
    pub answer: Budget,
    pub handoff: Handoff,
    /// The end-of-thinking marker, the cap and the grace period.
    pub ctl: ThinkControl,
}

/// One phase of a controlled sequence.
#[derive(Clone, Debug, serde::Serialize)]
pub struct PhaseStats {
    /// `thinking` or `answer`.
    pub phase: &'static str,
    /// The budget's spec.
    pub budget: String,
    /// Tokens generated in the phase (the thinking phase counts the marker).
    pub tokens: usize,
    /// Wall time of the phase: the prompt's prefill for thinking, the hand-off for the answer.
    pub seconds: f64,
    /// Tokens run to start the phase: the prompt; for the answer, the marker's last token
    /// (`shared`) or prompt + thinking (`reprefill`).
    pub start_tokens: usize,
    pub start_seconds: f64,
}

/// A controlled generation: the text and tokens of both phases together, and each phase's
/// stats. `answer` is `None` when the sequence stopped before its thinking ended.
#[derive(Clone, Debug)]
pub struct Controlled {
    pub generation: Generation,
    pub handoff: Handoff,
    pub thinking: PhaseStats,
    pub answer: Option<PhaseStats>,
}

impl Controlled {
    /// The phases as JSON (`run --json`'s "phases").
    pub fn phases_json(&self) -> serde_json::Value {
        let mut v = vec![serde_json::to_value(&self.thinking).unwrap_or_default()];
        if let Some(a) = &self.answer {
            let mut a = serde_json::to_value(a).unwrap_or_default();
            a["handoff"] = self.handoff.name().into();
            v.push(a);
        }
        v.into()
    }

    /// One line: each phase's budget, tokens and seconds.
    pub fn summary(&self) -> String {
        let t = &self.thinking;
        let mut s = format!(
            "thinking at {}: {} tokens in {}",
            t.budget,
            t.tokens,
            duration(t.seconds)
        );
        match &self.answer {
            Some(a) => s.push_str(&format!(
                "; answer at {} ({} hand-off, {} tokens in {}): {} tokens in {}",
                a.budget,
                self.handoff.name(),
                a.start_tokens,
                duration(a.start_seconds),
                a.tokens,
                duration(a.seconds)
            )),
            None => s.push_str("; no answer phase (stopped while thinking)"),
        }
        s
    }
}

/// Seconds as `12.3 ms` below one second, else `1.23 s`.
fn duration(s: f64) -> String {
    if s < 1.0 {
        format!("{:.1} ms", s * 1e3)
    } else {
        format!("{s:.2} s")
    }
}

/// Generates from `prompt` like [`elastica_core::generate::generate`], thinking at
/// `ctl.think` and answering at `ctl.answer`. The switch comes after the token that completes
/// the end-of-thinking marker: that token is the first the answer budget runs (`shared`), or
/// the last of the prompt + thinking it recomputes (`reprefill`, which needs the cache to start
/// empty). Forced marker tokens skip the logits.
pub fn generate(
    model: &Model,
    tok: &Tokenizer,
    ctl: &BudgetControl,
    cache: &mut Cache,
    prompt: &[u32],
    cfg: &GenConfig,
    mut on_text: impl FnMut(&str),
) -> Result<Controlled> {
    if prompt.is_empty() {
        return Err(Error::Input("the prompt is empty".into()));
    }
    if cache.pos + prompt.len() > cache.capacity() {
        return Err(Error::Input(format!(
            "the prompt has {} tokens, longer than the context of {} tokens (raise --ctx)",
            cache.pos + prompt.len(),
            cache.capacity()
        )));
    }
    if ctl.handoff == Handoff::Reprefill && cache.pos != 0 {
        return Err(Error::Input(
            "the reprefill hand-off recomputes the whole sequence: start it from an empty cache"
                .into(),
        ));
    }
    let mut dec = Decoder::new(cfg).with_think(ctl.ctl.clone())?;
    let spec = |b: &Budget| b.spec(&model.shape);
    let mut budget = &ctl.think;
    let t0 = Instant::now();
    let logits = model.forward(prompt, budget, cache, Logits::Last)?;
    let mut next = dec.sample(logits);
    let prefill_seconds = t0.elapsed().as_secs_f64();
    let mut thinking = PhaseStats {
        phase: "thinking",
        budget: spec(&ctl.think),
        tokens: 0,
        seconds: 0.0,
        start_tokens: prompt.len(),
        start_seconds: prefill_seconds,
    };
    let mut answer: Option<PhaseStats> = None;
    let mut t_answer = t0;
    let mut all: Vec<u32> = vec![];
    let t1 = Instant::now();
    let stop_reason = loop {
        let out = dec.accept(tok, next)?;
        if !out.text.is_empty() {
            on_text(out.text);
        }
        let (step, ended) = (out.step, out.think_end);
        let t = match step {
            Step::Stop(r) => break r,
            Step::Next(t) => t,
        };
        if cache.pos >= cache.capacity() {
            let rest = dec.finish(StopReason::Context);
            if !rest.is_empty() {
                on_text(rest);
            }
            break StopReason::Context;
        }
        if ended {
            // The hand-off: the thinking phase ends with the marker's last token accepted.
            thinking.tokens = dec.thinking_tokens();
            thinking.seconds = t0.elapsed().as_secs_f64();
            budget = &ctl.answer;
            let th = Instant::now();
            let (logits, n) = match ctl.handoff {
                Handoff::Shared => (model.forward(&[t], budget, cache, Logits::Last)?, 1),
                Handoff::Reprefill => {
                    all.extend_from_slice(prompt);
                    all.extend_from_slice(dec.tokens());
                    cache.reset();
                    (model.forward(&all, budget, cache, Logits::Last)?, all.len())
                }
            };
            next = dec.sample(logits);
            answer = Some(PhaseStats {
                phase: "answer",
                budget: spec(&ctl.answer),
                tokens: 0,
                seconds: 0.0,
                start_tokens: n,
                start_seconds: th.elapsed().as_secs_f64(),
            });
            t_answer = th;
            continue;
        }
        // A forced marker token needs no logits.
        let want = match dec.forced() {
            Some(_) => Logits::None,
            None => Logits::Last,
        };
        let logits = model.forward(&[t], budget, cache, want)?;
        next = dec.sample(logits);
    };
    let n = dec.tokens().len();
    match &mut answer {
        Some(a) => {
            a.tokens = n - thinking.tokens;
            a.seconds = t_answer.elapsed().as_secs_f64();
        }
        None => {
            thinking.tokens = n;
            thinking.seconds = t0.elapsed().as_secs_f64();
        }
    }
    let decode_seconds = t1.elapsed().as_secs_f64();
    Ok(Controlled {
        generation: dec.into_generation(prompt.len(), stop_reason, prefill_seconds, decode_seconds),
        handoff: ctl.handoff,
        thinking,
        answer,
    })
}
