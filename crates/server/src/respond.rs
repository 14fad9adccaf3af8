//! A request in flight: its choices' updates from the service, turned into OpenAI's response
//! objects (`chat.completion`, `text_completion`) or their stream chunks, with `usage` and
//! `timings`. Dropping it (a client gone) cancels what still runs.

use crate::api::{Job, Kind};
use crate::reasoning::Splitter;
use crate::state::Ready;
use elastica_core::generate::StopReason;
use elastica_runtime::scheduler::Finished;
use elastica_runtime::service::{Labels, Update};
use serde_json::{Value, json};
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::mpsc::UnboundedReceiver;

/// What one stream chunk of a choice carries.
#[derive(Default)]
struct Delta<'a> {
    reasoning: &'a str,
    content: &'a str,
    /// Logprob entries of its tokens, and (completions) their texts and the first's offset.
    lps: Vec<Value>,
    texts: &'a [String],
    offset0: usize,
    finish: Option<&'a str>,
    /// The first chunk of a chat choice: `role: assistant`.
    role: bool,
}

struct Choice {
    split: Option<Splitter>,
    /// Non-streaming: the whole output.
    content: String,
    reasoning: String,
    /// Non-streaming with logprobs: one entry per token.
    logprobs: Vec<Value>,
    /// Completions: the text offset of the next token.
    offset: usize,
    tokens: usize,
    finished: Option<Finished>,
    started: Option<Instant>,
    first: Option<Instant>,
    /// When the answer budget took over, and the tokens output by then.
    switched: Option<(Instant, usize)>,
    ended: Option<Instant>,
}

/// How a request ended, for the log line.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Outcome {
    Running,
    Done,
    Failed,
}

pub struct Flight {
    pub ready: Arc<Ready>,
    pub id: String,
    kind: Kind,
    model: String,
    created: u64,
    pub include_usage: bool,
    top: Option<usize>,
    pub rx: UnboundedReceiver<(usize, Update)>,
    choices: Vec<Choice>,
    labels: Labels,
    prompt_tokens: usize,
    t0: Instant,
    /// Choices not finished yet.
    pub open: usize,
    pub outcome: Outcome,
    /// Why it failed (the engine's words).
    pub error: Option<String>,
}

fn finish_reason(r: StopReason) -> &'static str {
    match r {
        StopReason::Eos | StopReason::StopString => "stop",
        StopReason::Length | StopReason::Context => "length",
    }
}

impl Flight {
    pub fn new(
        ready: Arc<Ready>,
        id: String,
        job: &Job,
        rx: UnboundedReceiver<(usize, Update)>,
    ) -> Flight {
        let created = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let choices = (0..job.choices.len())
            .map(|_| Choice {
                split: job
                    .reasoning
                    .as_ref()
                    .map(|(s, e, opened)| Splitter::new(s, e, *opened)),
                content: String::new(),
                reasoning: String::new(),
                logprobs: vec![],
                offset: 0,
                tokens: 0,
                finished: None,
                started: None,
                first: None,
                switched: None,
                ended: None,
            })
            .collect();
        Flight {
            ready,
            id,
            kind: job.kind,
            model: job.model.clone(),
            created,
            include_usage: job.include_usage,
            top: job.logprobs,
            rx,
            open: job.choices.len(),
            choices,
            labels: job.labels.clone(),
            prompt_tokens: job.prompt_tokens,
            t0: Instant::now(),
            outcome: Outcome::Running,
            error: None,
        }
    }

    /// A token's logprob entry in the endpoint's shape; `at` is its record (`1 + top`).
    fn logprob_entry(&self, at: &[(u32, f32)]) -> Value {
        let text = |t: u32| self.ready.tok.decode(&[t]).unwrap_or_default();
        let (t, lp) = at[0];
        match self.kind {
            Kind::Chat => {
                let one = |t: u32, lp: f32| {
                    let s = text(t);
                    json!({"token": s, "logprob": lp, "bytes": s.as_bytes()})
                };
                let mut e = one(t, lp);
                e["top_logprobs"] = at[1..].iter().map(|&(t, lp)| one(t, lp)).collect();
                e
            }
            Kind::Completion => {
                let top: serde_json::Map<String, Value> = at[1..]
                    .iter()
                    .map(|&(t, lp)| (text(t), json!(lp)))
                    .collect();
                json!({"token": text(t), "logprob": lp, "top": top})
            }
        }
    }

    /// Completions' logprobs object from per-token entries (`offset0`: the first's offset).
    fn completion_logprobs(entries: &[Value], texts: &[String], offset0: usize) -> Value {
        let mut off = offset0;
        let mut offsets = vec![];
        for t in texts {
            offsets.push(off);
            off += t.len();
        }
        json!({
            "tokens": entries.iter().map(|e| e["token"].clone()).collect::<Vec<_>>(),
            "token_logprobs": entries.iter().map(|e| e["logprob"].clone()).collect::<Vec<_>>(),
            "top_logprobs": entries.iter().map(|e| e["top"].clone()).collect::<Vec<_>>(),
            "text_offset": offsets,
        })
    }

    fn chunk(&self, choice: Value) -> Value {
        let object = match self.kind {
            Kind::Chat => "chat.completion.chunk",
            Kind::Completion => "text_completion",
        };
        let mut c = json!({
            "id": self.id, "object": object, "created": self.created, "model": self.model,
            "system_fingerprint": Value::Null, "choices": [choice],
        });
        if self.include_usage {
            c["usage"] = Value::Null;
        }
        c
    }

    /// A stream chunk for choice `i` with this delta (None when there is nothing to send).
    fn delta_chunk(&self, i: usize, d: Delta) -> Option<Value> {
        let Delta {
            reasoning,
            content,
            lps,
            texts,
            offset0,
            finish,
            role,
        } = d;
        if reasoning.is_empty() && content.is_empty() && finish.is_none() && !role && lps.is_empty()
        {
            return None;
        }
        let logprobs = match (self.top, self.kind) {
            (None, _) => Value::Null,
            (Some(_), _) if lps.is_empty() => Value::Null,
            (Some(_), Kind::Chat) => json!({"content": lps}),
            (Some(_), Kind::Completion) => Self::completion_logprobs(&lps, texts, offset0),
        };
        let choice = match self.kind {
            Kind::Chat => {
                let mut d = serde_json::Map::new();
                if role {
                    d.insert("role".into(), json!("assistant"));
                    d.insert("content".into(), json!(""));
                }
                if !reasoning.is_empty() {
                    d.insert("reasoning_content".into(), json!(reasoning));
                    d.insert("reasoning".into(), json!(reasoning));
                }
                if !content.is_empty() {
                    d.insert("content".into(), json!(content));
                }
                json!({"index": i, "delta": d, "logprobs": logprobs, "finish_reason": finish})
            }
            Kind::Completion => {
                json!({"index": i, "text": content, "logprobs": logprobs, "finish_reason": finish})
            }
        };
        Some(self.chunk(choice))
    }

    /// Takes one update of choice `i`; returns the stream chunks it makes (when `stream`),
    /// else accumulates the choice's output.
    pub fn update(&mut self, i: usize, u: Update, stream: bool) -> Vec<Value> {
        let mut out = vec![];
        let now = Instant::now();
        match u {
            Update::Started => {
                self.choices[i].started = Some(now);
                if stream && self.kind == Kind::Chat {
                    out.extend(self.delta_chunk(
                        i,
                        Delta {
                            role: true,
                            ..Delta::default()
                        },
                    ));
                }
            }
            Update::Tokens {
                tokens,
                text,
                switched,
                logprobs,
            } => {
                let per = 1 + self.top.unwrap_or(0);
                let lps: Vec<Value> = match self.top {
                    Some(_) => logprobs
                        .chunks(per)
                        .map(|r| self.logprob_entry(r))
                        .collect(),
                    None => vec![],
                };
                let texts: Vec<String> = match (self.top, self.kind) {
                    (Some(_), Kind::Completion) => tokens
                        .iter()
                        .map(|&t| self.ready.tok.decode(&[t]).unwrap_or_default())
                        .collect(),
                    _ => vec![],
                };
                let c = &mut self.choices[i];
                c.first.get_or_insert(now);
                c.tokens += tokens.len();
                if switched {
                    c.switched = Some((now, c.tokens));
                }
                let (mut r, mut t) = (String::new(), String::new());
                match &mut c.split {
                    Some(s) => s.push(&text, &mut r, &mut t),
                    None => t = text,
                }
                let offset0 = c.offset;
                c.offset += texts.iter().map(|x| x.len()).sum::<usize>();
                if stream {
                    out.extend(self.delta_chunk(
                        i,
                        Delta {
                            reasoning: &r,
                            content: &t,
                            lps,
                            texts: &texts,
                            offset0,
                            ..Delta::default()
                        },
                    ));
                } else {
                    c.reasoning.push_str(&r);
                    c.content.push_str(&t);
                    if self.kind == Kind::Completion && self.top.is_some() {
                        for (mut e, x) in lps.into_iter().zip(texts) {
                            e["text"] = json!(x);
                            c.logprobs.push(e);
                        }
                    } else {
                        c.logprobs.extend(lps);
                    }
                }
            }
            Update::Finished(f) => {
                let c = &mut self.choices[i];
                c.finished = Some(f);
                c.ended = Some(now);
                let (mut r, mut t) = (String::new(), String::new());
                if let Some(s) = &mut c.split {
                    s.finish(&mut r, &mut t);
                }
                self.open -= 1;
                if self.open == 0 {
                    self.outcome = Outcome::Done;
                }
                let reason = finish_reason(f.reason);
                if stream {
                    out.extend(self.delta_chunk(
                        i,
                        Delta {
                            reasoning: &r,
                            content: &t,
                            finish: Some(reason),
                            ..Delta::default()
                        },
                    ));
                } else {
                    c.reasoning.push_str(&r);
                    c.content.push_str(&t);
                }
            }
            Update::Failed(e) => {
                self.outcome = Outcome::Failed;
                self.error = Some(e);
            }
        }
        out
    }

    pub fn usage(&self) -> Value {
        let completion: usize = self.choices.iter().map(|c| c.tokens).sum();
        let reasoning: usize = self
            .choices
            .iter()
            .map(|c| c.finished.map_or(0, |f| f.thinking_tokens))
            .sum();
        json!({
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": self.prompt_tokens + completion,
            "completion_tokens_details": {"reasoning_tokens": reasoning},
        })
    }

    /// Per phase (of the first choice): the budget, the tokens and the seconds; plus
    /// llama-server's prompt/predicted figures.
    pub fn timings(&self) -> Value {
        let c = &self.choices[0];
        let (Some(start), Some(end)) = (c.started, c.ended.or(c.first)) else {
            return Value::Null;
        };
        let first = c.first.unwrap_or(end);
        let s = |a: Instant, b: Instant| b.saturating_duration_since(a).as_secs_f64();
        let mut phases = vec![];
        match (&self.labels.answer, c.switched) {
            (Some(a), Some((at, n))) => {
                phases.push(json!({"phase": "think", "budget": self.labels.budget, "tokens": n, "seconds": s(start, at)}));
                phases.push(json!({"phase": "answer", "budget": a, "tokens": c.tokens - n, "seconds": s(at, end)}));
            }
            (Some(_), None) => {
                phases.push(json!({"phase": "think", "budget": self.labels.budget, "tokens": c.tokens, "seconds": s(start, end)}));
            }
            (None, _) => {
                phases.push(json!({"phase": "generate", "budget": self.labels.budget, "tokens": c.tokens, "seconds": s(start, end)}));
            }
        }
        let predicted = s(first, end);
        json!({
            "queued_ms": s(self.t0, start) * 1e3,
            "prompt_n": self.prompt_tokens,
            "prompt_ms": s(start, first) * 1e3,
            "predicted_n": c.tokens,
            "predicted_ms": predicted * 1e3,
            "predicted_per_second": if predicted > 0.0 { (c.tokens.saturating_sub(1)) as f64 / predicted } else { 0.0 },
            "phases": phases,
        })
    }

    /// The final usage chunk of a stream (`choices: []`).
    pub fn usage_chunk(&self) -> Value {
        let mut c = self.chunk(Value::Null);
        c["choices"] = json!([]);
        c["usage"] = self.usage();
        c["timings"] = self.timings();
        c
    }

    /// The non-streaming response.
    pub fn response(&self) -> Value {
        let choices: Vec<Value> = self
            .choices
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let reason = c.finished.map(|f| finish_reason(f.reason));
                let logprobs = match (self.top, self.kind) {
                    (None, _) => Value::Null,
                    (Some(_), Kind::Chat) => json!({"content": c.logprobs}),
                    (Some(_), Kind::Completion) => {
                        let texts: Vec<String> = c
                            .logprobs
                            .iter()
                            .map(|e| e["text"].as_str().unwrap_or_default().to_string())
                            .collect();
                        Self::completion_logprobs(&c.logprobs, &texts, 0)
                    }
                };
                match self.kind {
                    Kind::Chat => {
                        let mut msg = json!({"role": "assistant", "content": c.content});
                        if c.split.is_some() {
                            let r = (!c.reasoning.is_empty()).then_some(&c.reasoning);
                            msg["reasoning_content"] = json!(r);
                            msg["reasoning"] = json!(r);
                        }
                        json!({"index": i, "message": msg, "logprobs": logprobs, "finish_reason": reason})
                    }
                    Kind::Completion => {
                        json!({"index": i, "text": c.content, "logprobs": logprobs, "finish_reason": reason})
                    }
                }
            })
            .collect();
        let object = match self.kind {
            Kind::Chat => "chat.completion",
            Kind::Completion => "text_completion",
        };
        json!({
            "id": self.id, "object": object, "created": self.created, "model": self.model,
            "system_fingerprint": Value::Null, "choices": choices,
            "usage": self.usage(), "timings": self.timings(),
        })
    }
}

impl Drop for Flight {
    /// Forgets the request (the control endpoint no longer finds it) and logs its line:
    /// id, budget(s), tokens, seconds, outcome.
    fn drop(&mut self) {
        if let Ok(mut r) = self.ready.running.lock() {
            r.remove(&self.id);
        }
        let app_log = crate::LOG.load(std::sync::atomic::Ordering::Relaxed);
        if !app_log {
            return;
        }
        let budgets = match &self.labels.answer {
            Some(a) => format!("{}->{a}", self.labels.budget),
            None => self.labels.budget.clone(),
        };
        let tokens: usize = self.choices.iter().map(|c| c.tokens).sum();
        let outcome = match self.outcome {
            Outcome::Done => {
                let r: Vec<&str> = self
                    .choices
                    .iter()
                    .filter_map(|c| c.finished.map(|f| finish_reason(f.reason)))
                    .collect();
                r.join(",")
            }
            Outcome::Failed => format!("failed: {}", self.error.as_deref().unwrap_or("")),
            Outcome::Running => "cancelled (client gone)".into(),
        };
        eprintln!(
            "{} budget={budgets} prompt={} completion={tokens} {:.3}s {outcome}",
            self.id,
            self.prompt_tokens,
            self.t0.elapsed().as_secs_f64()
        );
    }
}
