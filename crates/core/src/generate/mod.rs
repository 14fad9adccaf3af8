//! Text generation over the engine: tokenizer, chat template, sampler, stop conditions and
//! streaming. The loop reuses the sequence's cache, so a caller can continue a sequence under a
//! different budget by calling [`generate`] again with the same cache.

pub mod chat;
pub mod sampler;
pub mod tokenizer;

use crate::budget::Budget;
use crate::error::{Error, Result};
use crate::model::{Cache, Logits, Model};
use sampler::{Sampler, SamplerConfig};
use std::time::Instant;
use tokenizer::Tokenizer;

#[derive(Clone, Debug)]
pub struct GenConfig {
    pub max_tokens: usize,
    pub sampler: SamplerConfig,
    pub stop: Vec<String>,
    pub ignore_eos: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    Eos,
    StopString,
    Length,
    Context,
}

impl StopReason {
    /// Words for the stats line (`--json` keeps the snake_case names).
    pub fn describe(self) -> &'static str {
        match self {
            StopReason::Eos => "end of sequence",
            StopReason::StopString => "stop string",
            StopReason::Length => "max tokens",
            StopReason::Context => "context full",
        }
    }
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct Generation {
    pub text: String,
    pub tokens: Vec<u32>,
    pub prompt_tokens: usize,
    pub stop_reason: StopReason,
    pub prefill_seconds: f64,
    pub decode_seconds: f64,
}

/// Generates from `prompt` (token ids, appended at the cache's position), streaming text through
/// `on_text`. Stop strings are held back until they can no longer match, and never emitted.
pub fn generate(
    model: &Model,
    tok: &Tokenizer,
    budget: &Budget,
    cache: &mut Cache,
    prompt: &[u32],
    cfg: &GenConfig,
    mut on_text: impl FnMut(&str),
) -> Result<Generation> {
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
    let mut sampler = Sampler::new(cfg.sampler.clone());
    let t0 = Instant::now();
    let logits = model.forward(prompt, budget, cache, Logits::Last)?;
    let mut next = sampler.sample(logits);
    let prefill_seconds = t0.elapsed().as_secs_f64();
    let t1 = Instant::now();
    let mut out = Vec::new();
    let mut text = String::new();
    let mut emitted = 0usize;
    let mut stream = tok.inner.decode_stream(false);
    let max_stop = cfg.stop.iter().map(|s| s.len()).max().unwrap_or(0);
    let stop_reason;
    loop {
        // Reached only with max_tokens = 0 (prefill only); otherwise checked after each token.
        if out.len() >= cfg.max_tokens {
            stop_reason = StopReason::Length;
            break;
        }
        if !cfg.ignore_eos && tok.eos.contains(&next) {
            stop_reason = StopReason::Eos;
            break;
        }
        out.push(next);
        if let Some(delta) = stream
            .step(next)
            .map_err(|e| Error::Tokenizer(e.to_string()))?
        {
            text.push_str(&delta);
        }
        if max_stop > 0 {
            let from = emitted.saturating_sub(max_stop);
            let from = (0..=from)
                .rev()
                .find(|&i| text.is_char_boundary(i))
                .unwrap_or(0);
            if let Some((at, _)) = cfg
                .stop
                .iter()
                .filter_map(|s| text[from..].find(s.as_str()).map(|i| (from + i, s)))
                .min_by_key(|x| x.0)
            {
                if at > emitted {
                    on_text(&text[emitted..at]);
                }
                text.truncate(at);
                stop_reason = StopReason::StopString;
                break;
            }
            // Hold back a suffix that could still start a stop string.
            let mut safe = text.len();
            for s in &cfg.stop {
                for l in (1..s.len().min(text.len() + 1)).rev() {
                    if text.is_char_boundary(text.len() - l)
                        && s.as_bytes().starts_with(&text.as_bytes()[text.len() - l..])
                    {
                        safe = safe.min(text.len() - l);
                        break;
                    }
                }
            }
            if safe > emitted {
                on_text(&text[emitted..safe]);
                emitted = safe;
            }
        } else if text.len() > emitted {
            on_text(&text[emitted..]);
            emitted = text.len();
        }
        if out.len() >= cfg.max_tokens {
            stop_reason = StopReason::Length;
            break;
        }
        if cache.pos >= cache.capacity() {
            stop_reason = StopReason::Context;
            break;
        }
        let logits = model.forward(&[next], budget, cache, Logits::Last)?;
        next = sampler.sample(logits);
    }
    if stop_reason != StopReason::StopString && text.len() > emitted {
        on_text(&text[emitted..]);
    }
    Ok(Generation {
        text,
        tokens: out,
        prompt_tokens: prompt.len(),
        stop_reason,
        prefill_seconds,
        decode_seconds: t1.elapsed().as_secs_f64(),
    })
}
