//! One sequence's decoding state, advanced a token at a time by whoever runs the model (the
//! [`generate`](super::generate) loop, a scheduler): the sampler, stop strings, EOS, the token
//! limit, the streamed text and the thinking phase (issue 11, points 2 and 5).
//!
//! The caller feeds the logits of the sequence's last position to [`Decoder::step`] and gets the
//! token to feed next, or why the sequence stopped, plus the text to stream. Buffers grow
//! amortised; per token only the tokenizer's stream decoding allocates.

use super::StopReason;
use super::sampler::Sampler;
use super::think::ThinkMarker;
use super::tokenizer::Tokenizer;
use crate::error::{Error, Result};

/// What the decoder's caller does next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// Feed this token (it is already part of the output).
    Next(u32),
    /// The sequence is finished.
    Stop(StopReason),
}

/// The result of one step. `text` is the delta to stream (stop strings held back until they can
/// no longer match, never emitted); on `Stop` it includes everything held back.
#[derive(Debug)]
pub struct StepOut<'a> {
    pub step: Step,
    pub text: &'a str,
    /// The token just accepted completed the end-of-thinking marker (once per sequence).
    pub think_end: bool,
}

/// Thinking-budget control: the end-of-thinking marker, and when to force it.
#[derive(Clone, Debug)]
pub struct ThinkControl {
    pub end: ThinkMarker,
    /// Thinking tokens at most before the marker is forced (`None`: only [`Decoder::force_think_end`]).
    pub cap: Option<usize>,
    /// After the cap, tokens to wait at most for a newline before forcing (the grace period of
    /// NVIDIA's budget control); 0 forces at once.
    pub grace: usize,
}

/// Where a sequence with thinking control stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Before the end-of-thinking marker.
    Thinking,
    /// Past the cap, waiting for a newline (at most `left` more tokens).
    Grace { left: usize },
    /// Emitting the marker: `at` of its tokens are already out.
    Forcing { at: usize },
    /// After the marker.
    Answer,
}

struct Think {
    ctl: ThinkControl,
    phase: Phase,
    /// Tokens accepted before the marker (grace and forced marker tokens included).
    tokens: usize,
}

impl Think {
    /// Into [`Phase::Grace`], or [`Phase::Forcing`] with `grace` 0. A marker the model already
    /// began (a prefix of its tokens ends `out`) is completed, not restarted.
    fn force(&mut self, out: &[u32], grace: usize) {
        if grace > 0 {
            self.phase = Phase::Grace { left: grace };
            return;
        }
        let m = &self.ctl.end.tokens;
        let at = (1..m.len())
            .rev()
            .find(|&j| out.ends_with(&m[..j]))
            .unwrap_or(0);
        self.phase = Phase::Forcing { at };
    }
}

pub struct Decoder {
    sampler: Sampler,
    stop: Vec<String>,
    max_stop: usize,
    max_tokens: usize,
    ignore_eos: bool,
    tokens: Vec<u32>,
    text: String,
    /// Bytes of `text` already streamed.
    emitted: usize,
    // State of the tokenizer's stream decoding (tokenizers' `DecodeStream`, kept here so the
    // decoder borrows no tokenizer between steps).
    ids: Vec<u32>,
    prefix: String,
    prefix_index: usize,
    think: Option<Think>,
    done: Option<StopReason>,
    /// Alternatives recorded per token with `logprobs`, and the records: per output token, the
    /// token and its log-probability, then the `top` most likely (token, log-probability).
    top: Option<usize>,
    logprobs: Vec<(u32, f32)>,
    /// The record of the token being accepted (filled by `step` from its logits).
    pending: Vec<(u32, f32)>,
}

/// Log-probabilities under `logits` (the model's distribution, before temperature): `out` gets
/// `token`'s, then the `top` most likely tokens' in descending order (ties: lower id first).
pub fn logprobs_of(logits: &[f32], token: u32, top: usize, out: &mut Vec<(u32, f32)>) {
    out.clear();
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = logits.iter().map(|&x| ((x - max) as f64).exp()).sum();
    let lse = max as f64 + sum.ln();
    let lp = |x: f32| (x as f64 - lse) as f32;
    out.push((
        token,
        logits.get(token as usize).map_or(f32::NAN, |&x| lp(x)),
    ));
    let top = top.min(logits.len());
    // The `top` best so far, kept sorted in `out[1..]`.
    for (i, &x) in logits.iter().enumerate() {
        let k = out.len() - 1;
        if k == top && (top == 0 || x <= logits[out[k].0 as usize]) {
            continue;
        }
        let at = 1 + out[1..].partition_point(|&(j, _)| logits[j as usize] >= x);
        if k == top {
            out.pop();
        }
        out.insert(at, (i as u32, 0.0));
    }
    for e in &mut out[1..] {
        e.1 = lp(logits[e.0 as usize]);
    }
}

impl Decoder {
    pub fn new(cfg: &super::GenConfig) -> Decoder {
        Decoder {
            sampler: Sampler::new(cfg.sampler.clone()),
            max_stop: cfg.stop.iter().map(|s| s.len()).max().unwrap_or(0),
            stop: cfg.stop.clone(),
            max_tokens: cfg.max_tokens,
            ignore_eos: cfg.ignore_eos,
            tokens: vec![],
            text: String::new(),
            emitted: 0,
            ids: vec![],
            prefix: String::new(),
            prefix_index: 0,
            think: None,
            done: None,
            top: cfg.logprobs,
            logprobs: vec![],
            pending: vec![],
        }
    }

    /// Adds thinking control: the sequence starts in [`Phase::Thinking`].
    pub fn with_think(mut self, ctl: ThinkControl) -> Result<Decoder> {
        if ctl.end.tokens.is_empty() || ctl.end.text.is_empty() {
            return Err(Error::Input(format!(
                "the end-of-thinking marker {:?} has no tokens",
                ctl.end.text
            )));
        }
        if ctl.cap == Some(0) {
            return Err(Error::Input(
                "the thinking-token cap must be at least 1".into(),
            ));
        }
        self.think = Some(Think {
            ctl,
            phase: Phase::Thinking,
            tokens: 0,
        });
        Ok(self)
    }

    /// Back to an empty sequence under `cfg`, keeping the buffers (and the thinking marker, back
    /// in [`Phase::Thinking`]).
    pub fn reset(&mut self, cfg: &super::GenConfig) {
        self.sampler.reset(cfg.sampler.clone());
        self.stop.clone_from(&cfg.stop);
        self.max_stop = cfg.stop.iter().map(|s| s.len()).max().unwrap_or(0);
        self.max_tokens = cfg.max_tokens;
        self.ignore_eos = cfg.ignore_eos;
        self.top = cfg.logprobs;
        self.logprobs.clear();
        self.pending.clear();
        self.tokens.clear();
        self.text.clear();
        self.emitted = 0;
        self.ids.clear();
        self.prefix.clear();
        self.prefix_index = 0;
        if let Some(t) = &mut self.think {
            t.phase = Phase::Thinking;
            t.tokens = 0;
        }
        self.done = None;
    }

    /// The token the next step emits whatever the logits (a marker being forced): the caller may
    /// skip computing logits and pass an empty slice.
    pub fn forced(&self) -> Option<u32> {
        match &self.think {
            Some(Think {
                ctl,
                phase: Phase::Forcing { at },
                ..
            }) => Some(ctl.end.tokens[*at]),
            _ => None,
        }
    }

    /// The next token: the forced one, else sampled from `logits` (the last position's).
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        match self.forced() {
            Some(t) => t,
            None => self.sampler.sample(logits),
        }
    }

    /// [`sample`](Self::sample) then [`accept`](Self::accept), recording the token's
    /// log-probabilities under `logits` when the config asks for them.
    pub fn step(&mut self, tok: &Tokenizer, logits: &[f32]) -> Result<StepOut<'_>> {
        let t = self.sample(logits);
        if let Some(top) = self.top {
            logprobs_of(logits, t, top, &mut self.pending);
        }
        self.accept(tok, t)
    }

    /// Takes `token` as the sequence's next output: EOS, the limit, stop strings and the thinking
    /// phase are checked here, the one place. After a `Stop`, further calls return it again.
    pub fn accept(&mut self, tok: &Tokenizer, token: u32) -> Result<StepOut<'_>> {
        if let Some(r) = self.done {
            return Ok(self.out(Step::Stop(r), self.emitted, self.emitted, false));
        }
        // Reached only with max_tokens = 0 (prefill only); otherwise checked after each token.
        if self.tokens.len() >= self.max_tokens {
            return Ok(self.stop_flush(StopReason::Length));
        }
        if !self.ignore_eos && tok.eos.contains(&token) {
            return Ok(self.stop_flush(StopReason::Eos));
        }
        self.tokens.push(token);
        if let Some(top) = self.top {
            // A token accepted without logits (a speculative round's) has no record: NaN.
            if self.pending.first().is_none_or(|p| p.0 != token) {
                self.pending.clear();
                self.pending.resize(1 + top, (token, f32::NAN));
            }
            self.logprobs.append(&mut self.pending);
        }
        let before = self.text.len();
        if let Some(delta) = tokenizers::step_decode_stream(
            &tok.inner,
            vec![token],
            false,
            &mut self.ids,
            &mut self.prefix,
            &mut self.prefix_index,
        )
        .map_err(|e| Error::Tokenizer(e.to_string()))?
        {
            self.text.push_str(&delta);
        }
        let think_end = self.advance_think(before);
        let from = self.emitted;
        if self.max_stop > 0 {
            if let Some(at) = self.find_stop() {
                self.text.truncate(at);
                self.done = Some(StopReason::StopString);
                self.emitted = at;
                let step = Step::Stop(StopReason::StopString);
                return Ok(self.out(step, from.min(at), at, think_end));
            }
            self.emitted = self.emitted.max(self.safe_len());
        } else {
            self.emitted = self.text.len();
        }
        if self.tokens.len() >= self.max_tokens {
            self.done = Some(StopReason::Length);
            self.emitted = self.text.len();
            return Ok(self.out(
                Step::Stop(StopReason::Length),
                from,
                self.emitted,
                think_end,
            ));
        }
        Ok(self.out(Step::Next(token), from, self.emitted, think_end))
    }

    /// Ends the sequence for a reason the decoder cannot see (context full, cancelled) and
    /// returns the held-back text to stream. No-op after a stop.
    pub fn finish(&mut self, reason: StopReason) -> &str {
        if self.done.is_some() {
            return "";
        }
        self.stop_flush(reason).text
    }

    /// Starts emitting the end-of-thinking marker, at once (`grace` 0) or after the next newline
    /// within `grace` tokens. Returns false when no thinking phase is open.
    pub fn force_think_end(&mut self, grace: usize) -> bool {
        match &mut self.think {
            Some(t) if t.phase != Phase::Answer => {
                t.force(&self.tokens, grace);
                true
            }
            _ => false,
        }
    }

    /// The sampler, for a caller that draws tokens itself (speculative rounds).
    pub fn sampler_mut(&mut self) -> &mut Sampler {
        &mut self.sampler
    }

    /// The thinking phase (`None` without thinking control).
    pub fn phase(&self) -> Option<Phase> {
        self.think.as_ref().map(|t| t.phase)
    }

    /// Tokens generated before the end-of-thinking marker completed (the marker included).
    pub fn thinking_tokens(&self) -> usize {
        self.think.as_ref().map_or(0, |t| t.tokens)
    }

    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    /// With `logprobs: Some(top)`: `1 + top` records per output token (see [`logprobs_of`]).
    pub fn logprobs(&self) -> &[(u32, f32)] {
        &self.logprobs
    }

    /// The decoded output (after a stop string: up to it).
    pub fn text(&self) -> &str {
        &self.text
    }

    pub fn stop_reason(&self) -> Option<StopReason> {
        self.done
    }

    /// The finished generation: text, tokens, the stop and the times the caller measured.
    pub fn into_generation(
        self,
        prompt_tokens: usize,
        stop_reason: StopReason,
        prefill_seconds: f64,
        decode_seconds: f64,
    ) -> super::Generation {
        super::Generation {
            text: self.text,
            tokens: self.tokens,
            prompt_tokens,
            stop_reason,
            prefill_seconds,
            decode_seconds,
        }
    }

    fn out(&self, step: Step, from: usize, to: usize, think_end: bool) -> StepOut<'_> {
        StepOut {
            step,
            text: &self.text[from..to],
            think_end,
        }
    }

    /// Stops with `r`, streaming what was held back.
    fn stop_flush(&mut self, r: StopReason) -> StepOut<'_> {
        let from = self.emitted;
        self.done = Some(r);
        self.emitted = self.text.len();
        self.out(Step::Stop(r), from, self.emitted, false)
    }

    /// Updates the thinking phase after a token whose text starts at byte `before`; true when
    /// the token completed the end-of-thinking marker.
    fn advance_think(&mut self, before: usize) -> bool {
        let Some(t) = &mut self.think else {
            return false;
        };
        if t.phase == Phase::Answer {
            return false;
        }
        t.tokens += 1;
        let m = &t.ctl.end;
        // The marker's tokens, or its text however the model tokenized it (a BPE merge across
        // the marker's edge, such as ">\n").
        let start = before.saturating_sub(m.text.len() - 1);
        let start = (0..=start)
            .rev()
            .find(|&i| self.text.is_char_boundary(i))
            .unwrap_or(0);
        if self.tokens.ends_with(&m.tokens) || self.text[start..].contains(m.text.as_str()) {
            t.phase = Phase::Answer;
            return true;
        }
        match t.phase {
            Phase::Thinking if t.ctl.cap.is_some_and(|c| t.tokens >= c) => {
                t.force(&self.tokens, t.ctl.grace)
            }
            Phase::Grace { left } if left <= 1 || self.text[before..].contains('\n') => {
                t.force(&self.tokens, 0)
            }
            Phase::Grace { left } => t.phase = Phase::Grace { left: left - 1 },
            Phase::Forcing { at } if self.tokens.last() == Some(&m.tokens[at]) => {
                t.phase = Phase::Forcing { at: at + 1 }
            }
            // The caller accepted another token than the forced one: force the marker again.
            Phase::Forcing { .. } => t.force(&self.tokens, 0),
            _ => {}
        }
        false
    }

    /// The earliest stop string in the text not yet streamed (and the bytes before it that could
    /// start one): its byte offset.
    fn find_stop(&self) -> Option<usize> {
        let from = self.emitted.saturating_sub(self.max_stop);
        let from = (0..=from)
            .rev()
            .find(|&i| self.text.is_char_boundary(i))
            .unwrap_or(0);
        self.stop
            .iter()
            .filter_map(|s| self.text[from..].find(s.as_str()).map(|i| from + i))
            .min()
    }

    /// The text length that can be streamed: all but a suffix that could still start a stop string.
    fn safe_len(&self) -> usize {
        let text = &self.text;
        let mut safe = text.len();
        for s in &self.stop {
            for l in (1..s.len().min(text.len() + 1)).rev() {
                if text.is_char_boundary(text.len() - l)
                    && s.as_bytes().starts_with(&text.as_bytes()[text.len() - l..])
                {
                    safe = safe.min(text.len() - l);
                    break;
                }
            }
        }
        safe
    }
}

#[cfg(test)]
mod tests {
    use super::super::GenConfig;
    use super::super::sampler::SamplerConfig;
    use super::super::think::think_end;
    use super::super::tokenizer::{Tokenizer, bytes_for_test};
    use super::*;

    fn cfg(max_tokens: usize, stop: &[&str]) -> GenConfig {
        GenConfig {
            max_tokens,
            sampler: SamplerConfig::default(),
            stop: stop.iter().map(|s| s.to_string()).collect(),
            ignore_eos: false,
            logprobs: None,
        }
    }

    fn onehot(tok: &Tokenizer, id: u32) -> Vec<f32> {
        let mut l = vec![0.0; tok.inner.get_vocab_size(true)];
        l[id as usize] = 1.0;
        l
    }

    /// Feeds `ids` as the model's greedy choices; returns the streamed text, the stop (if any)
    /// and the indices of the steps that completed the thinking marker.
    fn feed(
        d: &mut Decoder,
        tok: &Tokenizer,
        ids: &[u32],
    ) -> (String, Option<StopReason>, Vec<usize>) {
        let (mut streamed, mut ends) = (String::new(), vec![]);
        for (i, &id) in ids.iter().enumerate() {
            let out = d.step(tok, &onehot(tok, id)).unwrap();
            streamed.push_str(out.text);
            if out.think_end {
                ends.push(i);
            }
            if let Step::Stop(r) = out.step {
                return (streamed, Some(r), ends);
            }
        }
        (streamed, None, ends)
    }

    #[test]
    fn stop_strings_held_back_and_never_emitted() {
        let tok = bytes_for_test(&["<eos>"]);
        let ids = tok.encode("hello wor<EN world<END>more", false).unwrap();
        let mut d = Decoder::new(&cfg(100, &["<END>", "zzz"]));
        let mut deltas = vec![];
        for &id in &ids {
            let out = d.step(&tok, &onehot(&tok, id)).unwrap();
            deltas.push(out.text.to_string());
            if out.step == Step::Stop(StopReason::StopString) {
                break;
            }
        }
        assert_eq!(deltas.concat(), "hello wor<EN world");
        assert_eq!(d.text(), "hello wor<EN world");
        assert_eq!(d.stop_reason(), Some(StopReason::StopString));
        // "<EN" was held back until "<EN " ruled the stop string out; "<END" never streamed.
        assert!(deltas.iter().all(|t| !t.contains("<END")));
        assert!(deltas.iter().any(|t| t.contains("<EN ")));
        // Stopped: further steps stop again and stream nothing.
        let out = d.accept(&tok, 65).unwrap();
        assert_eq!(
            (out.step, out.text),
            (Step::Stop(StopReason::StopString), "")
        );
    }

    #[test]
    fn eos_length_and_utf8() {
        let tok = bytes_for_test(&["<eos>"]);
        // EOS ends the sequence, is not output, and flushes a held-back prefix of a stop string.
        let mut ids = tok.encode("abc xy", false).unwrap();
        ids.push(256);
        let mut d = Decoder::new(&cfg(100, &["xyz"]));
        let (s, r, _) = feed(&mut d, &tok, &ids);
        assert_eq!((s.as_str(), r), ("abc xy", Some(StopReason::Eos)));
        assert_eq!(d.tokens(), &ids[..6]);
        // ignore_eos: the EOS token is output like any other.
        let mut d = Decoder::new(&GenConfig {
            ignore_eos: true,
            ..cfg(100, &[])
        });
        let (s, r, _) = feed(&mut d, &tok, &ids);
        assert_eq!((s.as_str(), r), ("abc xy<eos>", None));
        // The limit counts output tokens; 0 stops before any.
        let mut d = Decoder::new(&cfg(3, &[]));
        assert_eq!(feed(&mut d, &tok, &ids).1, Some(StopReason::Length));
        assert_eq!(d.text(), "abc");
        let mut d = Decoder::new(&cfg(0, &[]));
        assert_eq!(feed(&mut d, &tok, &ids).1, Some(StopReason::Length));
        assert!(d.tokens().is_empty());
        // A two-byte character streams once both bytes are in.
        let e = tok.encode("é", false).unwrap();
        assert_eq!(e.len(), 2);
        let mut d = Decoder::new(&cfg(100, &[]));
        assert_eq!(d.step(&tok, &onehot(&tok, e[0])).unwrap().text, "");
        assert_eq!(d.step(&tok, &onehot(&tok, e[1])).unwrap().text, "é");
        // An outside stop (context full) flushes what was held back, once.
        let mut d = Decoder::new(&cfg(100, &["xyz"]));
        feed(&mut d, &tok, &ids[..6]);
        assert_eq!(d.finish(StopReason::Context), "xy");
        assert_eq!(d.finish(StopReason::Context), "");
        assert_eq!(d.stop_reason(), Some(StopReason::Context));
        // reset: an empty sequence again.
        d.reset(&cfg(100, &[]));
        let (s, r, _) = feed(&mut d, &tok, &ids[..3]);
        assert_eq!((s.as_str(), r), ("abc", None));
    }

    const TEMPLATE: &str = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n<think>\n{% endif %}";

    fn think(tok: &Tokenizer, cap: Option<usize>, grace: usize) -> ThinkControl {
        ThinkControl {
            end: think_end(Some(TEMPLATE), tok, None).unwrap(),
            cap,
            grace,
        }
    }

    #[test]
    fn think_marker_detected_once() {
        let tok = bytes_for_test(&["<eos>"]);
        let ctl = think(&tok, None, 0);
        assert_eq!(ctl.end.text, "</think>");
        assert_eq!(ctl.end.tokens.len(), 8);
        let ids = tok
            .encode("hmm </thin </think>\nParis. </think> again", false)
            .unwrap();
        let mut d = Decoder::new(&cfg(100, &[])).with_think(ctl).unwrap();
        assert_eq!(d.phase(), Some(Phase::Thinking));
        let (s, _, ends) = feed(&mut d, &tok, &ids);
        assert_eq!(s, "hmm </thin </think>\nParis. </think> again");
        assert_eq!(ends, vec!["hmm </thin </think>".len() - 1]);
        assert_eq!(d.thinking_tokens(), "hmm </thin </think>".len());
        assert_eq!(d.phase(), Some(Phase::Answer));
        assert!(!d.force_think_end(0));
    }

    #[test]
    fn cap_forces_exactly_the_marker() {
        let tok = bytes_for_test(&["<eos>"]);
        let ctl = think(&tok, Some(5), 0);
        let marker = ctl.end.tokens.clone();
        let mut d = Decoder::new(&cfg(100, &[])).with_think(ctl).unwrap();
        let a = tok.encode("a", false).unwrap()[0];
        // The model would say "a" forever (and EOS at once after the cap: ignored while forcing).
        let mut ends = vec![];
        for i in 0..20 {
            let logits = if d.forced().is_some() {
                onehot(&tok, 256)
            } else {
                onehot(&tok, a)
            };
            let out = d.step(&tok, &logits).unwrap();
            assert!(matches!(out.step, Step::Next(_)));
            if out.think_end {
                ends.push(i);
            }
        }
        assert_eq!(ends, vec![5 + marker.len() - 1]);
        assert_eq!(&d.tokens()[..5], &[a; 5]);
        assert_eq!(&d.tokens()[5..5 + marker.len()], &marker[..]);
        assert!(d.tokens()[5 + marker.len()..].iter().all(|&t| t == a));
        assert_eq!(d.text(), "aaaaa</think>aaaaaaa");
        // A marker the model already began is completed, not restarted.
        let ctl = think(&tok, Some(4), 0);
        let mut d = Decoder::new(&cfg(100, &[])).with_think(ctl).unwrap();
        let ids = tok.encode("x</th", false).unwrap();
        feed(&mut d, &tok, &ids[..4]);
        assert_eq!(d.phase(), Some(Phase::Forcing { at: 3 }));
        let (_, _, ends) = feed(&mut d, &tok, &[a; 5]);
        assert_eq!(ends, vec![4]);
        assert_eq!(d.text(), "x</think>");
        // Forcing by hand, with no cap.
        let mut d = Decoder::new(&cfg(100, &[]))
            .with_think(think(&tok, None, 0))
            .unwrap();
        feed(&mut d, &tok, &[a; 3]);
        assert!(d.force_think_end(0));
        let (_, _, ends) = feed(&mut d, &tok, &[a; 9]);
        assert_eq!(ends, vec![7]);
        assert_eq!(d.text(), "aaa</think>a");
    }

    #[test]
    fn grace_waits_for_a_newline() {
        let tok = bytes_for_test(&["<eos>"]);
        let mut d = Decoder::new(&cfg(100, &[]))
            .with_think(think(&tok, Some(3), 10))
            .unwrap();
        let ids = tok.encode("abcdef\nghijklmnopqrstu", false).unwrap();
        let (_, _, ends) = feed(&mut d, &tok, &ids);
        assert_eq!(ends, vec![14]);
        // (The model's choices while forcing are ignored.)
        assert_eq!(d.text(), "abcdef\n</think>opqrstu");
        // No newline within the grace period: forced when it runs out.
        let mut d = Decoder::new(&cfg(100, &[]))
            .with_think(think(&tok, Some(3), 4))
            .unwrap();
        let ids = tok.encode("abcdefghijklmnopqrstu", false).unwrap();
        let (_, _, ends) = feed(&mut d, &tok, &ids[..16]);
        assert_eq!(ends, vec![14]);
        assert_eq!(d.text(), "abcdefg</think>p");
    }

    #[test]
    fn think_errors() {
        let tok = bytes_for_test(&["<eos>"]);
        let e = think_end(Some("{{ messages[0].content }}"), &tok, None).unwrap_err();
        assert!(
            e.to_string().contains("no thinking markers") && e.to_string().contains("--think-end"),
            "{e}"
        );
        let e = think_end(None, &tok, None).unwrap_err();
        assert!(e.to_string().contains("--think-end"), "{e}");
        let m = think_end(Some("no markers"), &tok, Some("</reasoning>")).unwrap();
        assert_eq!(m.tokens, tok.encode("</reasoning>", false).unwrap());
        assert!(think_end(None, &tok, Some("")).is_err());
        let e = Decoder::new(&cfg(10, &[]))
            .with_think(think(&tok, Some(0), 0))
            .err()
            .unwrap();
        assert!(e.to_string().contains("at least 1"), "{e}");
    }

    /// `logprobs_of` against a plain f64 log-softmax and a full sort, with ties and a top
    /// longer than the vocabulary; the decoder records one `1 + top` entry per output token.
    #[test]
    fn logprobs_against_a_plain_log_softmax() {
        let logits: Vec<f32> = (0..300)
            .map(|i| ((i * 37 % 101) as f32 * 0.173).sin() * 9.0)
            .chain([5.0, 5.0, 5.0])
            .collect();
        let lse = logits.iter().map(|&x| (x as f64).exp()).sum::<f64>().ln();
        let mut order: Vec<u32> = (0..logits.len() as u32).collect();
        order.sort_by(|&a, &b| {
            logits[b as usize]
                .total_cmp(&logits[a as usize])
                .then(a.cmp(&b))
        });
        let mut out = vec![];
        for (token, top) in [(7u32, 0usize), (301, 5), (3, 20), (0, 400)] {
            logprobs_of(&logits, token, top, &mut out);
            assert_eq!(out.len(), 1 + top.min(logits.len()));
            let want = |t: u32| (logits[t as usize] as f64 - lse) as f32;
            assert_eq!(out[0].0, token);
            assert!((out[0].1 - want(token)).abs() < 1e-5, "{:?}", out[0]);
            for (k, &(t, lp)) in out[1..].iter().enumerate() {
                assert_eq!(t, order[k], "rank {k} of top {top}");
                assert!((lp - want(t)).abs() < 1e-5);
            }
        }
        // The decoder: greedy over one-hot logits, 2 alternatives per token.
        let tok = bytes_for_test(&["<eos>"]);
        let ids = tok.encode("abc", false).unwrap();
        let mut d = Decoder::new(&GenConfig {
            logprobs: Some(2),
            ..cfg(100, &[])
        });
        feed(&mut d, &tok, &ids);
        let lps = d.logprobs();
        assert_eq!(lps.len(), 3 * ids.len());
        for (rec, &id) in lps.chunks(3).zip(&ids) {
            assert_eq!((rec[0].0, rec[1].0), (id, id));
            // One-hot logits: 1 - ln(e + V - 1) for the hot token, then 0 - that.
            let v = tok.inner.get_vocab_size(true) as f64;
            let hot = (1.0 - (std::f64::consts::E + v - 1.0).ln()) as f32;
            assert!(
                (rec[0].1 - hot).abs() < 1e-5 && rec[1].1 == rec[0].1,
                "{rec:?}"
            );
            assert!((rec[2].1 - (hot - 1.0)).abs() < 1e-5, "{rec:?}");
        }
    }
}
