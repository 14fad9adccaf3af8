//! Text generation over the engine: tokenizer, chat template, sampler, the per-sequence
//! [`Decoder`] (stop conditions, streaming, thinking phase) and thinking markers. The loop reuses
//! the sequence's cache, so a caller can continue a sequence under a different budget by calling
//! [`generate`] again with the same cache.

pub mod chat;
pub mod decoder;
pub mod sampler;
pub mod think;
pub mod tokenizer;

use crate::budget::Budget;
use crate::error::{Error, Result};
use crate::model::{Cache, Logits, Model, SeqState};
pub use decoder::{Decoder, Phase, Step, StepOut, ThinkControl};
use sampler::SamplerConfig;
use std::time::Instant;
use tokenizer::Tokenizer;

#[derive(Clone, Debug, Default)]
pub struct GenConfig {
    pub max_tokens: usize,
    pub sampler: SamplerConfig,
    pub stop: Vec<String>,
    pub ignore_eos: bool,
    /// Record each output token's log-probability and this many most likely alternatives
    /// ([`Decoder::logprobs`]); None: none (nothing is computed).
    pub logprobs: Option<usize>,
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

/// Refuses an empty prompt or one that does not fit the sequence's context.
pub fn check_prompt(prompt: &[u32], seq: &SeqState) -> Result<()> {
    if prompt.is_empty() {
        return Err(Error::Input("the prompt is empty".into()));
    }
    if seq.pos + prompt.len() > seq.capacity() {
        return Err(Error::Input(format!(
            "the prompt has {} tokens, longer than the context of {} tokens (raise --ctx)",
            seq.pos + prompt.len(),
            seq.capacity()
        )));
    }
    Ok(())
}

/// Generates from `prompt` (token ids, appended at the cache's position), streaming text through
/// `on_text`: a loop of [`Model::forward`] and a [`Decoder`], which holds the stop logic.
pub fn generate(
    model: &Model,
    tok: &Tokenizer,
    budget: &Budget,
    cache: &mut Cache,
    prompt: &[u32],
    cfg: &GenConfig,
    mut on_text: impl FnMut(&str),
) -> Result<Generation> {
    check_prompt(prompt, cache)?;
    let mut dec = Decoder::new(cfg);
    let t0 = Instant::now();
    let logits = model.forward(prompt, budget, cache, Logits::Last)?;
    let mut next = dec.sample(logits);
    let prefill_seconds = t0.elapsed().as_secs_f64();
    let t1 = Instant::now();
    let stop_reason = loop {
        let out = dec.accept(tok, next)?;
        if !out.text.is_empty() {
            on_text(out.text);
        }
        match out.step {
            Step::Stop(r) => break r,
            Step::Next(t) => {
                if cache.pos >= cache.capacity() {
                    let rest = dec.finish(StopReason::Context);
                    if !rest.is_empty() {
                        on_text(rest);
                    }
                    break StopReason::Context;
                }
                let logits = model.forward(&[t], budget, cache, Logits::Last)?;
                next = dec.sample(logits);
            }
        }
    };
    let decode_seconds = t1.elapsed().as_secs_f64();
    Ok(dec.into_generation(prompt.len(), stop_reason, prefill_seconds, decode_seconds))
}
