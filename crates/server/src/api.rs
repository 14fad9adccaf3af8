//! Request bodies of `/v1/chat/completions` and `/v1/completions`: OpenAI's fields plus
//! elastica's own at the top level (`budget`, `think_budget`, `answer_budget`, `handoff`,
//! `thinking_token_budget`, `speculate`), so OpenAI clients' `extra_body` reaches them. Every
//! field is checked here, before the request is queued; an error names the field.

use crate::error::ApiError;
use crate::state::Ready;
use elastica_core::budget::Budget;
use elastica_core::generate::chat::{self, Message};
use elastica_core::generate::sampler::SamplerConfig;
use elastica_core::generate::think::{self, MARKERS};
use elastica_core::generate::{GenConfig, ThinkControl};
use elastica_runtime::control::Handoff;
use elastica_runtime::scheduler::{Answer, Request, Speculate};
use elastica_runtime::service::Labels;
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

/// Choices per request at most (`n`), and alternatives per token (`top_logprobs`).
pub const MAX_N: u64 = 16;
pub const MAX_TOP_LOGPROBS: u64 = 20;
const MAX_STOP: usize = 16;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Chat,
    Completion,
}

/// A checked request: what to queue and how to answer.
pub struct Job {
    pub kind: Kind,
    /// The model id to echo.
    pub model: String,
    pub stream: bool,
    pub include_usage: bool,
    /// The response id, when the client named it (`request_id`).
    pub request_id: Option<String>,
    pub prompt_tokens: usize,
    /// One engine request per choice (`n`).
    pub choices: Vec<Request>,
    pub labels: Labels,
    /// Alternatives per token, when logprobs were asked for.
    pub logprobs: Option<usize>,
    /// The reasoning split (chat with a thinking template): start and end markers, and whether
    /// the prompt opened the reasoning.
    pub reasoning: Option<(String, String, bool)>,
}

#[derive(Deserialize)]
struct StreamOptions {
    include_usage: Option<bool>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize)]
#[serde(untagged)]
enum SpecField {
    On(bool),
    Draft(String),
    Full {
        #[serde(alias = "budget")]
        draft: Option<String>,
        #[serde(alias = "num_speculative_tokens")]
        k: Option<u64>,
    },
}

/// The fields both endpoints take.
#[derive(Deserialize)]
struct Common {
    model: Option<String>,
    stream: Option<bool>,
    stream_options: Option<StreamOptions>,
    max_tokens: Option<u64>,
    max_completion_tokens: Option<u64>,
    temperature: Option<f64>,
    top_p: Option<f64>,
    top_k: Option<i64>,
    seed: Option<i64>,
    stop: Option<Stop>,
    n: Option<u64>,
    ignore_eos: Option<bool>,
    presence_penalty: Option<f64>,
    frequency_penalty: Option<f64>,
    logit_bias: Option<Map<String, Value>>,
    budget: Option<String>,
    think_budget: Option<String>,
    answer_budget: Option<String>,
    handoff: Option<String>,
    thinking_token_budget: Option<u64>,
    speculate: Option<SpecField>,
    request_id: Option<String>,
}

#[derive(Deserialize)]
struct Part {
    #[serde(rename = "type")]
    kind: String,
    text: Option<String>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<Part>),
}

#[derive(Deserialize)]
struct ChatMessage {
    role: String,
    content: Option<Content>,
}

#[derive(Deserialize)]
struct ResponseFormat {
    #[serde(rename = "type")]
    kind: String,
}

#[derive(Deserialize)]
struct ChatFields {
    messages: Vec<ChatMessage>,
    logprobs: Option<bool>,
    top_logprobs: Option<u64>,
    chat_template_kwargs: Option<Map<String, Value>>,
    tools: Option<Vec<Value>>,
    response_format: Option<ResponseFormat>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum PromptField {
    Text(String),
    Texts(Vec<String>),
    Tokens(Vec<u32>),
    TokenLists(Vec<Vec<u32>>),
}

#[derive(Deserialize)]
struct CompletionFields {
    prompt: PromptField,
    logprobs: Option<u64>,
    echo: Option<bool>,
    suffix: Option<String>,
    best_of: Option<u64>,
}

/// Deserializes `v` into `T`; an error names the field's path.
fn fields<T: DeserializeOwned>(v: &Value) -> Result<T, ApiError> {
    serde_path_to_error::deserialize(v).map_err(ApiError::from_serde)
}

fn bad(field: &str, msg: impl std::fmt::Display) -> ApiError {
    ApiError::bad(field.to_string(), format!("{field}: {msg}"))
}

/// A fresh seed for a request that names none (OpenAI samples differently each time).
fn fresh_seed() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let mut z = t ^ NEXT.fetch_add(0x9E37_79B9_7F4A_7C15, Ordering::Relaxed);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Parses and checks a request body of `kind` against the loaded model.
pub fn parse(r: &Ready, kind: Kind, body: &[u8]) -> Result<Job, ApiError> {
    let v: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad(None, format!("the body is not valid JSON: {e}")))?;
    if !v.is_object() {
        return Err(ApiError::bad(None, "the body must be a JSON object"));
    }
    let c: Common = fields(&v)?;
    let m = &r.model;

    // The model id picks a budget: NAME or NAME:BUDGET.
    let model = c.model.clone().unwrap_or_else(|| r.name.clone());
    let id_budget = r.budget_of_id(&model)?;
    let budget_s = match (&c.budget, id_budget) {
        (Some(b), Some(i)) if b.trim() != i.trim() => {
            return Err(bad(
                "budget",
                format!("{b:?} conflicts with the budget {i:?} of model id {model:?}"),
            ));
        }
        (Some(b), _) => b.clone(),
        (None, Some(i)) => i.to_string(),
        (None, None) => r.default_budget.clone(),
    };
    let resolve = |field: &str, s: &str| -> Result<(Budget, String), ApiError> {
        let b = m.budget(s).map_err(|e| bad(field, e))?;
        Ok((b.clone(), r.label(s, &b)))
    };
    let (budget, label) = resolve("budget", &budget_s)?;

    // Prompt and the endpoint's own fields.
    let mut top = None;
    let mut reasoning = None;
    let prompt = match kind {
        Kind::Chat => {
            let f: ChatFields = fields(&v)?;
            if f.messages.is_empty() {
                return Err(bad("messages", "at least one message is needed"));
            }
            let mut msgs = Vec::with_capacity(f.messages.len());
            for (i, msg) in f.messages.iter().enumerate() {
                let content = match &msg.content {
                    None => String::new(),
                    Some(Content::Text(t)) => t.clone(),
                    Some(Content::Parts(parts)) => {
                        let mut t = String::new();
                        for (j, p) in parts.iter().enumerate() {
                            match (p.kind.as_str(), &p.text) {
                                ("text", Some(x)) => t.push_str(x),
                                _ => {
                                    return Err(bad(
                                        &format!("messages[{i}].content[{j}]"),
                                        format!(
                                            "only text parts are supported (got type {:?})",
                                            p.kind
                                        ),
                                    ));
                                }
                            }
                        }
                        t
                    }
                };
                msgs.push(Message {
                    role: msg.role.clone(),
                    content,
                });
            }
            if f.tools.as_ref().is_some_and(|t| !t.is_empty()) {
                return Err(bad("tools", "tool calls are not supported"));
            }
            if let Some(rf) = &f.response_format
                && rf.kind != "text"
            {
                return Err(bad(
                    "response_format",
                    format!("only type \"text\" is supported (got {:?})", rf.kind),
                ));
            }
            match (f.logprobs, f.top_logprobs) {
                (Some(true), t) => {
                    let t = t.unwrap_or(0);
                    if t > MAX_TOP_LOGPROBS {
                        return Err(bad(
                            "top_logprobs",
                            format!("must be 0 to {MAX_TOP_LOGPROBS}"),
                        ));
                    }
                    top = Some(t as usize);
                }
                (_, Some(t)) if t > 0 => {
                    return Err(bad("top_logprobs", "needs \"logprobs\": true"));
                }
                _ => {}
            }
            let tpl = r.template.as_deref().ok_or_else(|| {
                bad(
                    "messages",
                    "the model has no chat template (start the server with --chat-template FILE, or use /v1/completions)",
                )
            })?;
            let kwargs = f.chat_template_kwargs.unwrap_or_default();
            let text = chat::conversation_text(tpl, &r.tok, &msgs, &kwargs)
                .map_err(|e| bad("messages", e))?;
            if let Some(end) = &r.think_end {
                let start = MARKERS
                    .iter()
                    .find(|(_, e)| *e == end.text)
                    .map_or("<think>", |p| p.0);
                let opened = text.trim_end().ends_with(start);
                reasoning = Some((start.to_string(), end.text.clone(), opened));
            }
            chat::encode(&r.tok, &text).map_err(|e| bad("messages", e))?
        }
        Kind::Completion => {
            let f: CompletionFields = fields(&v)?;
            if f.echo == Some(true) {
                return Err(bad("echo", "echo is not supported"));
            }
            if f.suffix.as_ref().is_some_and(|s| !s.is_empty()) {
                return Err(bad("suffix", "suffix is not supported"));
            }
            if f.best_of.is_some_and(|b| b != 1 && Some(b) != c.n) {
                return Err(bad("best_of", "only best_of = n is supported"));
            }
            if let Some(k) = f.logprobs {
                if k > MAX_TOP_LOGPROBS {
                    return Err(bad("logprobs", format!("must be 0 to {MAX_TOP_LOGPROBS}")));
                }
                top = Some(k as usize);
            }
            let one = "one prompt per request (send several requests, or use n)";
            match f.prompt {
                PromptField::Text(t) => r.tok.encode(&t, true),
                PromptField::Texts(t) if t.len() == 1 => r.tok.encode(&t[0], true),
                PromptField::Tokens(t) => Ok(t),
                PromptField::TokenLists(t) if t.len() == 1 => Ok(t[0].clone()),
                _ => return Err(bad("prompt", one)),
            }
            .map_err(|e| bad("prompt", e))?
        }
    };
    if prompt.is_empty() {
        return Err(bad(
            if kind == Kind::Chat {
                "messages"
            } else {
                "prompt"
            },
            "the prompt is empty",
        ));
    }
    if let Some(&t) = prompt.iter().find(|&&t| t as usize >= m.vocab) {
        return Err(bad(
            "prompt",
            format!("token id {t} is outside the vocabulary (size {})", m.vocab),
        ));
    }
    let ctx = r.ctx;
    if prompt.len() > ctx {
        return Err(bad(
            if kind == Kind::Chat {
                "messages"
            } else {
                "prompt"
            },
            format!(
                "the prompt has {} tokens, more than the context of {ctx} tokens per request (--ctx)",
                prompt.len()
            ),
        ));
    }

    // Decoding.
    let max_tokens = match (c.max_completion_tokens, c.max_tokens) {
        (Some(n), _) => Some(("max_completion_tokens", n)),
        (None, Some(n)) => Some(("max_tokens", n)),
        (None, None) => None,
    };
    let max_tokens = match max_tokens {
        Some((f, 0)) => return Err(bad(f, "must be at least 1")),
        Some((f, n)) if n > r.max_tokens as u64 => {
            return Err(bad(
                f,
                format!(
                    "{n} is more than this server's limit of {} (--max-tokens)",
                    r.max_tokens
                ),
            ));
        }
        Some((_, n)) => n as usize,
        None => r.max_tokens.min(ctx - prompt.len()).max(1),
    };
    let temperature = match c.temperature {
        Some(t) if !(0.0..=2.0).contains(&t) => return Err(bad("temperature", "must be 0 to 2")),
        Some(t) => t as f32,
        None => 1.0,
    };
    let top_p = match c.top_p {
        Some(p) if !(p > 0.0 && p <= 1.0) => return Err(bad("top_p", "must be in (0, 1]")),
        Some(p) => p as f32,
        None => 1.0,
    };
    let top_k = match c.top_k {
        Some(k) if k < -1 => return Err(bad("top_k", "must be -1 (off), 0 (off) or more")),
        Some(k) if k > 0 => (k as usize).min(m.vocab),
        _ => 0,
    };
    let n = c.n.unwrap_or(1);
    if !(1..=MAX_N).contains(&n) {
        return Err(bad("n", format!("must be 1 to {MAX_N}")));
    }
    for (f, x) in [
        ("presence_penalty", c.presence_penalty),
        ("frequency_penalty", c.frequency_penalty),
    ] {
        if x.is_some_and(|x| x != 0.0) {
            return Err(bad(f, "penalties are not supported (leave it 0)"));
        }
    }
    if c.logit_bias.as_ref().is_some_and(|b| !b.is_empty()) {
        return Err(bad("logit_bias", "logit_bias is not supported"));
    }
    let stop = match c.stop {
        None => vec![],
        Some(Stop::One(s)) => vec![s],
        Some(Stop::Many(v)) => v,
    };
    if stop.len() > MAX_STOP {
        return Err(bad("stop", format!("at most {MAX_STOP} stop strings")));
    }
    if stop.iter().any(|s| s.is_empty()) {
        return Err(bad("stop", "a stop string is empty"));
    }
    if let Some(id) = &c.request_id
        && (id.is_empty()
            || id.len() > 128
            || !id
                .chars()
                .all(|ch| ch.is_ascii_alphanumeric() || "-_.:".contains(ch)))
    {
        return Err(bad(
            "request_id",
            "1 to 128 characters of letters, digits, '-', '_', '.', ':'",
        ));
    }

    // Thinking and the budget schedule (chat with a thinking template).
    if c.thinking_token_budget == Some(0) {
        return Err(bad("thinking_token_budget", "must be at least 1"));
    }
    let scheduled = c.think_budget.is_some() || c.answer_budget.is_some();
    let think_asked = scheduled || c.thinking_token_budget.is_some();
    let field = match (&c.think_budget, &c.answer_budget) {
        (Some(_), _) => "think_budget",
        (None, Some(_)) => "answer_budget",
        _ => "thinking_token_budget",
    };
    let think = match (&r.think_end, &reasoning) {
        // The prompt opened the reasoning: the decoder tracks it (and caps it when asked).
        (Some(end), Some((_, _, true))) => Some(ThinkControl {
            end: end.clone(),
            cap: c.thinking_token_budget.map(|x| x as usize),
            grace: 0,
        }),
        // Thinking is off in this prompt (`enable_thinking: false`): a cap has nothing to cap,
        // a schedule nothing to schedule.
        (Some(_), Some((_, _, false))) if scheduled => {
            return Err(bad(
                field,
                "thinking is off in this prompt (the chat template did not open the reasoning, e.g. enable_thinking is false)",
            ));
        }
        (Some(_), Some(_)) => None,
        _ if think_asked => {
            let why = match kind {
                Kind::Completion => "thinking control applies to /v1/chat/completions".to_string(),
                Kind::Chat => match think::think_end(r.template.as_deref(), &r.tok, None) {
                    Err(e) => e.to_string(),
                    Ok(_) => "the chat template has no thinking markers".into(),
                },
            };
            return Err(bad(field, why));
        }
        _ => None,
    };
    let (mut run_budget, mut labels) = (
        budget.clone(),
        Labels {
            budget: label.clone(),
            answer: None,
        },
    );
    let mut answer = None;
    if scheduled {
        if let Some(t) = &c.think_budget {
            (run_budget, labels.budget) = resolve("think_budget", t)?;
        }
        let (a, al) = match &c.answer_budget {
            Some(a) => resolve("answer_budget", a)?,
            None => (budget.clone(), label.clone()),
        };
        let handoff = match c.handoff.as_deref() {
            None => Handoff::Shared,
            Some(h) => h.parse::<Handoff>().map_err(|e| bad("handoff", e))?,
        };
        labels.answer = Some(al);
        answer = Some(Answer { budget: a, handoff });
    } else if c.handoff.is_some() {
        return Err(bad("handoff", "needs think_budget or answer_budget"));
    }

    // Speculation: the request's, or the server's default where it applies.
    let speculate = match c.speculate {
        None => r.speculate.as_ref().and_then(|(d, k)| {
            // Only a draft strictly inside the budget saves anything.
            let ok = think.is_none()
                && top.is_none()
                && d.nested_in(&run_budget)
                && !run_budget.nested_in(d);
            ok.then(|| Speculate {
                draft: d.clone(),
                k: *k,
            })
        }),
        Some(SpecField::On(false)) => None,
        Some(s) => {
            let (draft, k) = match s {
                SpecField::On(_) => match &r.speculate {
                    Some((d, k)) => (d.clone(), *k as u64),
                    None => {
                        return Err(bad(
                            "speculate",
                            "no default draft budget (start the server with --speculate BUDGET), name one: {\"draft\": BUDGET, \"k\": K}",
                        ));
                    }
                },
                SpecField::Draft(d) => (resolve("speculate", &d)?.0, r.draft as u64),
                SpecField::Full { draft, k } => {
                    let d = match (draft, &r.speculate) {
                        (Some(d), _) => resolve("speculate.draft", &d)?.0,
                        (None, Some((d, _))) => d.clone(),
                        (None, None) => {
                            return Err(bad("speculate.draft", "name the draft budget"));
                        }
                    };
                    (d, k.unwrap_or(r.draft as u64))
                }
            };
            if k == 0 || k > r.draft as u64 {
                return Err(bad(
                    "speculate.k",
                    format!(
                        "{k} draft tokens; this server allows 1 to {} (--draft)",
                        r.draft
                    ),
                ));
            }
            if think.is_some() {
                return Err(bad(
                    "speculate",
                    "speculative decoding does not combine with thinking control yet",
                ));
            }
            if top.is_some() {
                return Err(bad(
                    "speculate",
                    "speculative decoding does not give logprobs yet",
                ));
            }
            Some(Speculate {
                draft,
                k: k as usize,
            })
        }
    };

    let seed = c.seed.map(|s| s as u64);
    let choices = (0..n)
        .map(|i| Request {
            prompt: prompt.clone(),
            budget: run_budget.clone(),
            config: GenConfig {
                max_tokens,
                sampler: SamplerConfig {
                    temperature,
                    top_k,
                    top_p,
                    seed: seed.map_or_else(fresh_seed, |s| s.wrapping_add(i)),
                },
                stop: stop.clone(),
                ignore_eos: c.ignore_eos.unwrap_or(false),
                logprobs: top,
            },
            think: think.clone(),
            answer: answer.clone(),
            speculate: speculate.clone(),
        })
        .collect();
    Ok(Job {
        kind,
        model,
        stream: c.stream.unwrap_or(false),
        include_usage: c
            .stream_options
            .and_then(|o| o.include_usage)
            .unwrap_or(false),
        request_id: c.request_id,
        prompt_tokens: prompt.len(),
        choices,
        labels,
        logprobs: top,
        reasoning: match kind {
            Kind::Chat => reasoning,
            Kind::Completion => None,
        },
    })
}
