//! Continuous batching (issue 11, points 2 and 3): an [`Engine`] over one loaded model advances
//! up to `--parallel` sequences a step at a time, each with its own prompt, budget and
//! [`Decoder`] (sampler, stop strings, EOS, limit, streamed text).
//!
//! One [`Engine::step`]:
//! - groups the active sequences by budget (budgets compare by their sizes) and runs each group
//!   as one [`Model::forward_batch`], so the sequences of a group share every weight read and
//!   each group reads only its own prefix of the weights;
//! - puts the decode token of every decoding sequence in its group's batch, every step, so no
//!   sequence and no group waits on another;
//! - adds prefill chunks, at most `prefill_chunk` prompt tokens per step over all groups, given
//!   to prompts in arrival order (the oldest first: none starves). A prompt that fits in one
//!   step's chunk waits until it can run whole (then its logits are those of the prompt alone);
//!   a longer one is spread over steps, while the others keep decoding;
//! - feeds each sequence's last logits to its decoder and reports per-sequence [`Event`]s;
//!   a finished sequence's slot is reset and free for the next [`Engine::add`];
//! - moves a sequence with a budget schedule ([`Request::answer`]) to its answer budget's group
//!   once its decoder sees the end of thinking: `shared` decodes on, `reprefill` first runs
//!   prompt + thinking again as a prefill at the answer budget (as [`crate::control`] does for
//!   one sequence);
//! - runs a speculative round ([`crate::speculative`]) for each decoding sequence that asked for
//!   one ([`Request::speculate`]): it drafts and verifies on its own state, apart from the
//!   groups' batches, and outputs the kept tokens and the target's next one in one event.
//!
//! Between steps, [`Engine::set_budget`] and [`Engine::end_reasoning`] act on a running
//! sequence, and [`Engine::remove`] cancels one.
//!
//! The sequence states come from a [`SeqPool`] sized at start (`parallel` × `ctx`), the
//! scratch is one [`Work`]; once warmed up to the batch, a step allocates nothing but the text
//! the decoders' tokenizer stream builds (see [`Decoder`]).

use crate::control::Handoff;
use crate::speculative::{MAX_DRAFT, Speculator};
use elastica_core::budget::Budget;
use elastica_core::error::{Error, Result};
use elastica_core::generate::tokenizer::Tokenizer;
use elastica_core::generate::{Decoder, GenConfig, Step, StopReason, ThinkControl};
use elastica_core::model::{BatchItem, Logits, Model, SeqPool, Work};
use std::ops::Range;

/// A sequence's slot in the pool; reused once the sequence has finished.
pub type SeqId = usize;

/// What [`Engine::add`] starts: prompt tokens, a resolved budget and the decoding settings.
#[derive(Clone, Debug)]
pub struct Request {
    pub prompt: Vec<u32>,
    pub budget: Budget,
    pub config: GenConfig,
    /// Thinking control for the decoder (None: none).
    pub think: Option<ThinkControl>,
    /// The budget schedule: `budget` thinks, this answers (needs `think`; None: one budget).
    pub answer: Option<Answer>,
    /// Nested self-speculative decoding: draft at a budget nested in `budget`.
    pub speculate: Option<Speculate>,
}

/// A request's speculative decoding: the draft budget and the draft tokens per round.
#[derive(Clone, Debug)]
pub struct Speculate {
    pub draft: Budget,
    pub k: usize,
}

/// The answer phase of a budget schedule: its budget and how it takes over the state.
#[derive(Clone, Debug)]
pub struct Answer {
    pub budget: Budget,
    pub handoff: Handoff,
}

/// Sizes fixed at start.
#[derive(Clone, Copy, Debug)]
pub struct EngineConfig {
    /// Sequences at once (`--parallel`).
    pub parallel: usize,
    /// Tokens per sequence, prompt and output (`--ctx`).
    pub ctx: usize,
    /// Prompt tokens run per step over all sequences.
    pub prefill_chunk: usize,
    /// Draft tokens per round a speculative request may ask for at most (each sequence keeps
    /// that many Mamba state checkpoints); 0: no speculation.
    pub draft_max: usize,
}

/// Default prompt tokens per step: enough to keep the GEMMs of prefill efficient, small enough
/// that a step with decodes in it stays short.
pub const PREFILL_CHUNK: usize = 256;

/// How a sequence ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Finished {
    pub reason: StopReason,
    pub prompt_tokens: usize,
    /// Tokens output.
    pub tokens: usize,
    /// Of them, thinking tokens: up to and including the end-of-thinking marker (with
    /// thinking control; else 0).
    pub thinking_tokens: usize,
}

/// What one step did for one sequence.
#[derive(Clone, Debug)]
pub struct Event {
    pub seq: SeqId,
    /// Prompt tokens run this step.
    pub prefilled: usize,
    /// Set when the sequence finished this step; its slot is free again.
    pub finished: Option<Finished>,
    /// The sequence moved to its answer budget after this step's token (the last of the
    /// end-of-thinking marker); with `reprefill`, its next steps are a prefill again.
    pub switched: bool,
    tokens: Range<usize>,
    text: Range<usize>,
    logprobs: Range<usize>,
}

/// The events of one step, with their tokens and text deltas; valid until the next step.
pub struct Events<'a> {
    list: &'a [Event],
    tokens: &'a [u32],
    text: &'a str,
    logprobs: &'a [(u32, f32)],
}

impl<'a> Events<'a> {
    pub fn len(&self) -> usize {
        self.list.len()
    }
    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }
    /// Each event with the tokens it output (none while prefilling, or when the step stopped
    /// the sequence without output: EOS, a stop string ending in it; several for a speculative
    /// round) and the text to stream for it.
    pub fn iter(&self) -> impl Iterator<Item = (&'a Event, &'a [u32], &'a str)> + '_ {
        self.list.iter().map(|e| {
            (
                e,
                &self.tokens[e.tokens.clone()],
                &self.text[e.text.clone()],
            )
        })
    }

    /// The log-probability records of an event's tokens, for a request with
    /// [`GenConfig::logprobs`] (`1 + top` per token, see [`Decoder::logprobs`]); else empty.
    pub fn logprobs(&self, e: &Event) -> &'a [(u32, f32)] {
        &self.logprobs[e.logprobs.clone()]
    }
}

struct Slot {
    active: bool,
    group: usize,
    /// The answer phase still to come: its group and hand-off.
    answer: Option<(usize, Handoff)>,
    /// The request's prompt tokens (`prompt` also holds the thinking text after a reprefill).
    prompt_len: usize,
    prompt: Vec<u32>,
    /// Prompt tokens run so far.
    fed: usize,
    /// Prompt tokens granted this step.
    chunk: usize,
    /// Prompt done: `next` is the token to feed.
    decoding: bool,
    /// Ran this step already (a forward of its group, which may have moved it to its answer
    /// group): it runs again from the next step on, so each step gives it one event.
    stepped: bool,
    /// Nested self-speculative decoding, when the request asked for it.
    spec: Option<Speculator>,
    next: u32,
    dec: Option<Decoder>,
}

struct Group {
    budget: Budget,
}

/// Budgets compare by their sizes (one resolution shared, or equal sizes everywhere).
fn same_budget(a: &Budget, b: &Budget) -> bool {
    a.hidden == b.hidden && (std::sync::Arc::ptr_eq(&a.layers, &b.layers) || a.layers == b.layers)
}

/// An empty vector of batch items of any lifetime on `v`'s allocation (the in-place collect of
/// a vector into one of the same layout keeps the buffer), so building a batch each step
/// allocates nothing.
fn recycle<'b>(mut v: Vec<BatchItem<'_>>) -> Vec<BatchItem<'b>> {
    v.clear();
    v.into_iter().map(|_| unreachable!()).collect()
}

/// Whether `b` was resolved for `m` (a budget of another model would index out of its weights).
fn fits(m: &Model, b: &Budget) -> bool {
    b.hidden <= m.shape.hidden && b.layers.len() == m.shape.layers.len()
}

/// Refuses a request [`Engine::add`] could not run on an engine of `cfg` over `m`: an empty
/// prompt, a token outside the vocabulary, a prompt longer than `cfg.ctx`, a budget of another
/// model, an answer budget without thinking control, speculation the engine has no room for or
/// whose draft does not nest, or logprobs with speculation. Callers that queue requests (the
/// service) check before queueing, so a bad request is refused at once.
pub fn check(m: &Model, cfg: &EngineConfig, req: &Request) -> Result<()> {
    let ctx = cfg.ctx;
    if req.prompt.is_empty() {
        return Err(Error::Input("the prompt is empty".into()));
    }
    if let Some(&bad) = req.prompt.iter().find(|&&t| t as usize >= m.vocab) {
        return Err(Error::Input(format!(
            "token id {bad} is outside the vocabulary (size {})",
            m.vocab
        )));
    }
    if req.prompt.len() > ctx {
        return Err(Error::Input(format!(
            "the prompt has {} tokens, longer than the context of {ctx} tokens per sequence (raise --ctx)",
            req.prompt.len()
        )));
    }
    if !fits(m, &req.budget) {
        return Err(Error::Budget(
            "the request's budget was resolved for another model".into(),
        ));
    }
    if req.answer.is_some() && req.think.is_none() {
        return Err(Error::Input(
            "an answer budget needs thinking control: the end-of-thinking marker that ends the thinking phase".into(),
        ));
    }
    if let Some(a) = &req.answer
        && !fits(m, &a.budget)
    {
        return Err(Error::Budget(
            "the request's answer budget was resolved for another model".into(),
        ));
    }
    if let Some(sp) = &req.speculate {
        let most = cfg.draft_max;
        if most == 0 {
            return Err(Error::Input(
                "speculative decoding needs an engine started with draft tokens (--speculate BUDGET --draft K)".into(),
            ));
        }
        if !(1..=most).contains(&sp.k) {
            return Err(Error::Input(format!(
                "speculate: {} draft tokens; this engine allows 1 to {most} (--draft)",
                sp.k
            )));
        }
        if req.think.is_some() {
            return Err(Error::Input(
                "speculative decoding does not combine with thinking control yet: ask for one of them".into(),
            ));
        }
        if req.config.logprobs.is_some() {
            return Err(Error::Input(
                "speculative decoding does not give logprobs yet: ask for one of them".into(),
            ));
        }
        if !fits(m, &sp.draft) {
            return Err(Error::Budget(
                "the request's draft budget was resolved for another model".into(),
            ));
        }
        if !sp.draft.nested_in(&req.budget) {
            return Err(Error::Budget(format!(
                "the draft budget {} does not nest inside the target budget {}: it must be at most the target on every axis",
                sp.draft.spec(&m.shape),
                req.budget.spec(&m.shape)
            )));
        }
    }
    Ok(())
}

/// Many sequences over one model: see the module doc.
pub struct Engine<'m> {
    model: &'m Model,
    tok: &'m Tokenizer,
    cfg: EngineConfig,
    pool: SeqPool,
    work: Work,
    slots: Vec<Slot>,
    groups: Vec<Group>,
    /// Active sequences, oldest first.
    order: Vec<SeqId>,
    /// The group that runs first this step (rotates).
    first: usize,
    items: Vec<BatchItem<'static>>,
    who: Vec<SeqId>,
    events: Vec<Event>,
    /// This step's tokens, text and logprobs, which the events index.
    out: Outputs,
    /// A speculative round's tokens.
    round: Vec<u32>,
    spec_totals: SpecTotals,
}

/// Speculative decoding counts over all sequences (vLLM's `spec_decode_*` counters).
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct SpecTotals {
    /// Rounds (drafts verified).
    pub drafts: u64,
    /// Draft tokens proposed.
    pub draft_tokens: u64,
    /// Draft tokens kept.
    pub accepted_tokens: u64,
    /// Kept draft tokens by position in the draft.
    pub accepted_per_pos: Vec<u64>,
}

impl SpecTotals {
    fn add(&mut self, drafted: usize, kept: usize) {
        self.drafts += 1;
        self.draft_tokens += drafted as u64;
        self.accepted_tokens += kept as u64;
        if self.accepted_per_pos.len() < drafted {
            self.accepted_per_pos.resize(drafted, 0);
        }
        for a in &mut self.accepted_per_pos[..kept] {
            *a += 1;
        }
    }
}

impl<'m> Engine<'m> {
    /// An engine for `cfg.parallel` sequences of `cfg.ctx` tokens; errors name the flag at fault
    /// or the memory that cannot be had.
    pub fn new(model: &'m Model, tok: &'m Tokenizer, cfg: EngineConfig) -> Result<Engine<'m>> {
        if cfg.parallel == 0 {
            return Err(Error::Input("--parallel must be at least 1".into()));
        }
        if cfg.ctx == 0 {
            return Err(Error::Input("--ctx must be at least 1".into()));
        }
        if cfg.prefill_chunk == 0 {
            return Err(Error::Input(
                "the prefill chunk must be at least 1 token per step".into(),
            ));
        }
        if cfg.draft_max > MAX_DRAFT {
            return Err(Error::Input(format!(
                "--draft {}: the number of draft tokens must be 1 to {MAX_DRAFT}",
                cfg.draft_max
            )));
        }
        // Mamba state checkpoints for a speculative rollback of up to `draft_max` tokens.
        let pool = SeqPool::try_new(model, cfg.parallel, cfg.ctx, cfg.draft_max)?;
        let work = Work::try_new(model, cfg.ctx)?;
        let slots = (0..cfg.parallel)
            .map(|_| Slot {
                active: false,
                group: 0,
                answer: None,
                prompt_len: 0,
                prompt: vec![],
                fed: 0,
                chunk: 0,
                decoding: false,
                stepped: false,
                spec: None,
                next: 0,
                dec: None,
            })
            .collect();
        Ok(Engine {
            model,
            tok,
            cfg,
            pool,
            work,
            slots,
            groups: vec![],
            order: Vec::with_capacity(cfg.parallel),
            first: 0,
            items: Vec::with_capacity(cfg.parallel),
            who: Vec::with_capacity(cfg.parallel),
            events: Vec::with_capacity(cfg.parallel),
            out: Outputs {
                toks: Vec::with_capacity(cfg.parallel * (cfg.draft_max + 1)),
                text: String::new(),
                logprobs: vec![],
            },
            round: Vec::with_capacity(cfg.draft_max + 1),
            spec_totals: SpecTotals {
                accepted_per_pos: vec![0; cfg.draft_max],
                ..SpecTotals::default()
            },
        })
    }

    pub fn config(&self) -> EngineConfig {
        self.cfg
    }

    /// Sequences active now.
    pub fn active(&self) -> usize {
        self.order.len()
    }

    /// Whether no sequence is active.
    pub fn is_idle(&self) -> bool {
        self.order.is_empty()
    }

    /// Whether sequence `id` is running (prefilling or decoding).
    pub fn is_active(&self, id: SeqId) -> bool {
        self.slots.get(id).is_some_and(|s| s.active)
    }

    /// Whether sequence `id` is still prefilling its prompt.
    pub fn prefilling(&self, id: SeqId) -> bool {
        self.slots.get(id).is_some_and(|s| s.active && !s.decoding)
    }

    /// Starts a sequence; its prompt runs in the coming steps. Errors: an empty prompt, a token
    /// outside the vocabulary, a prompt longer than `--ctx`, a budget of another model, or
    /// `--parallel` sequences already active.
    pub fn add(&mut self, req: Request) -> Result<SeqId> {
        check(self.model, &self.cfg, &req)?;
        let (m, parallel) = (self.model, self.cfg.parallel);
        let spec = match req.speculate {
            None => None,
            Some(sp) => Some(Speculator::new(m, sp.draft, &req.budget, sp.k)?),
        };
        let Some(id) = self.slots.iter().position(|s| !s.active) else {
            return Err(Error::Input(format!(
                "{parallel} sequences are already active, the most --parallel {parallel} allows: wait for one to finish or raise --parallel"
            )));
        };
        let group = self.group_of(req.budget);
        let answer = req.answer.map(|a| (self.group_of(a.budget), a.handoff));
        let s = &mut self.slots[id];
        let dec = match (s.dec.take(), req.think) {
            // Reuse the buffers of a decoder without thinking control.
            (Some(mut d), None) if d.phase().is_none() => {
                d.reset(&req.config);
                d
            }
            (_, None) => Decoder::new(&req.config),
            (_, Some(t)) => Decoder::new(&req.config).with_think(t)?,
        };
        self.pool.get_mut(id)?.reset();
        *s = Slot {
            active: true,
            group,
            answer,
            prompt_len: req.prompt.len(),
            prompt: req.prompt,
            fed: 0,
            chunk: 0,
            decoding: false,
            stepped: false,
            spec,
            next: 0,
            dec: Some(dec),
        };
        self.order.push(id);
        Ok(id)
    }

    /// The group of sequences at `budget`, made on first use.
    fn group_of(&mut self, budget: Budget) -> usize {
        match self
            .groups
            .iter()
            .position(|g| same_budget(&g.budget, &budget))
        {
            Some(g) => g,
            None => {
                self.groups.push(Group { budget });
                self.groups.len() - 1
            }
        }
    }

    /// Ends sequence `id` without an event (cancelled) and frees its slot.
    pub fn remove(&mut self, id: SeqId) -> Result<()> {
        if !self.slots.get(id).is_some_and(|s| s.active) {
            return Err(Error::Input(format!("sequence {id} is not active")));
        }
        self.free(id);
        Ok(())
    }

    fn slot(&mut self, id: SeqId) -> Result<&mut Slot> {
        match self.slots.get_mut(id) {
            Some(s) if s.active => Ok(s),
            _ => Err(Error::Input(format!("sequence {id} is not active"))),
        }
    }

    /// Ends the thinking of sequence `id` now: its decoder forces the end-of-thinking marker
    /// from its next token on (a scheduled answer budget then takes over as usual). Errors when
    /// the sequence has no thinking control or has already ended its thinking.
    pub fn end_reasoning(&mut self, id: SeqId) -> Result<()> {
        let s = self.slot(id)?;
        match s.dec.as_mut().is_some_and(|d| d.force_think_end(0)) {
            true => Ok(()),
            false => Err(Error::Input(format!(
                "sequence {id} is not thinking: it has no thinking control or its thinking has ended"
            ))),
        }
    }

    /// Runs sequence `id` at `budget` from its next step on, on the state it has (the `shared`
    /// hand-off; a scheduled answer budget still takes over when thinking ends). A speculating
    /// sequence keeps its draft, which must nest inside the new budget.
    pub fn set_budget(&mut self, id: SeqId, budget: Budget) -> Result<()> {
        let m = self.model;
        if !fits(m, &budget) {
            return Err(Error::Budget(
                "the budget was resolved for another model".into(),
            ));
        }
        let s = self.slot(id)?;
        if let Some(sp) = &s.spec
            && !sp.draft.nested_in(&budget)
        {
            return Err(Error::Budget(format!(
                "the draft budget {} does not nest inside {}",
                sp.draft.spec(&m.shape),
                budget.spec(&m.shape)
            )));
        }
        let g = self.group_of(budget.clone());
        let s = self.slot(id)?;
        s.group = g;
        if let Some(sp) = &mut s.spec {
            sp.target = budget;
        }
        Ok(())
    }

    /// Speculative decoding counts since the engine started.
    pub fn spec_totals(&self) -> &SpecTotals {
        &self.spec_totals
    }

    fn free(&mut self, id: SeqId) {
        self.slots[id].active = false;
        self.order.retain(|&x| x != id);
        if let Ok(s) = self.pool.get_mut(id) {
            s.reset();
        }
    }

    /// Grants this step's prompt tokens, oldest sequence first.
    fn grant_prefill(&mut self) {
        let (chunk, mut left) = (self.cfg.prefill_chunk, self.cfg.prefill_chunk);
        for &id in &self.order {
            let s = &mut self.slots[id];
            (s.chunk, s.stepped) = (0, false);
            if s.decoding || left == 0 {
                continue;
            }
            let rest = s.prompt.len() - s.fed;
            // A prompt that fits one step's chunk runs whole; the ones behind it wait too.
            if s.fed == 0 && rest <= chunk && rest > left {
                left = 0;
                continue;
            }
            s.chunk = rest.min(left);
            left -= s.chunk;
        }
    }

    /// One step of every active sequence (see the module doc). Returns one event per sequence
    /// that ran; empty when none is active. After an error the engine's sequences are in an
    /// unknown state: remove them.
    pub fn step(&mut self) -> Result<Events<'_>> {
        self.events.clear();
        self.out.clear();
        self.grant_prefill();
        let ng = self.groups.len();
        for gi in 0..ng {
            let g = (self.first + gi) % ng;
            self.run_group(g)?;
        }
        if ng > 0 {
            self.first = (self.first + 1) % ng;
        }
        self.run_speculative()?;
        Ok(Events {
            list: &self.events,
            tokens: &self.out.toks,
            text: &self.out.text,
            logprobs: &self.out.logprobs,
        })
    }

    /// One batched forward of group `g`'s decode tokens and prefill chunks, then its decoders.
    fn run_group(&mut self, g: usize) -> Result<()> {
        let Engine {
            model,
            tok,
            pool,
            work,
            slots,
            groups,
            items,
            who,
            order,
            events,
            out: o,
            ..
        } = self;
        let mut batch = recycle(std::mem::take(items));
        who.clear();
        for (id, st) in pool.states_mut().iter_mut().enumerate() {
            let s = &slots[id];
            // Speculating decoders run their own rounds (run_speculative).
            if !s.active || s.group != g || s.stepped || (s.decoding && s.spec.is_some()) {
                continue;
            }
            let (tokens, logits) = if s.decoding {
                (std::slice::from_ref(&s.next), Logits::Last)
            } else if s.chunk > 0 {
                let end = s.fed + s.chunk;
                let want = match end == s.prompt.len() {
                    true => Logits::Last,
                    false => Logits::None,
                };
                (&s.prompt[s.fed..end], want)
            } else {
                continue;
            };
            batch.push(BatchItem {
                seq: st,
                tokens,
                logits,
                stepwise: false,
            });
            who.push(id);
        }
        if batch.is_empty() {
            *items = recycle(batch);
            return Ok(());
        }
        let r = model.forward_batch(&mut batch, &groups[g].budget, work);
        *items = recycle(batch);
        let logits = r?;
        for (k, &id) in who.iter().enumerate() {
            let s = &mut slots[id];
            s.stepped = true;
            let mut ev = Event::new(id, o);
            if !s.decoding {
                s.fed += s.chunk;
                ev.prefilled = s.chunk;
                s.chunk = 0;
                if s.fed < s.prompt.len() {
                    events.push(ev);
                    continue;
                }
                s.decoding = true;
            }
            let dec = s.dec.as_mut().expect("an active sequence has a decoder");
            let before = dec.tokens().len();
            let r = dec.step(tok, logits.item(k))?;
            o.text.push_str(r.text);
            let (step, think_end) = (r.step, r.think_end);
            after_tokens(id, s, step, think_end, before, &mut ev, pool, order, o)?;
            events.push(ev);
        }
        Ok(())
    }

    /// A speculative round for every decoding sequence that speculates: drafts at its draft
    /// budget and verifies at its own on its own state ([`Speculator::round`]), then feeds the
    /// kept tokens and the target's next one to its decoder. One event per sequence, with all
    /// its tokens of the round.
    fn run_speculative(&mut self) -> Result<()> {
        let Engine {
            model,
            tok,
            pool,
            work,
            slots,
            order,
            events,
            out: o,
            round,
            spec_totals,
            ..
        } = self;
        for (id, s) in slots.iter_mut().enumerate() {
            if !s.active || !s.decoding || s.stepped {
                continue;
            }
            let (Some(sp), Some(dec)) = (s.spec.as_mut(), s.dec.as_mut()) else {
                continue;
            };
            round.clear();
            let seq = pool.get_mut(id)?;
            let (k, kept) = sp.round(model, seq, work, s.next, dec.sampler_mut(), round)?;
            spec_totals.add(k, kept);
            let mut ev = Event::new(id, o);
            let before = dec.tokens().len();
            let mut step = Step::Stop(StopReason::Length);
            for &x in round.iter() {
                let r = dec.accept(tok, x)?;
                o.text.push_str(r.text);
                step = r.step;
                if matches!(step, Step::Stop(_)) {
                    break;
                }
            }
            after_tokens(id, s, step, false, before, &mut ev, pool, order, o)?;
            events.push(ev);
        }
        Ok(())
    }
}

/// A step's output buffers: every event's tokens, text and logprob records, end to end.
struct Outputs {
    toks: Vec<u32>,
    text: String,
    logprobs: Vec<(u32, f32)>,
}

impl Outputs {
    fn clear(&mut self) {
        self.toks.clear();
        self.text.clear();
        self.logprobs.clear();
    }
}

impl Event {
    /// An event whose outputs start at the end of `o`'s.
    fn new(seq: SeqId, o: &Outputs) -> Event {
        let (t, x, l) = (o.toks.len(), o.text.len(), o.logprobs.len());
        Event {
            seq,
            prefilled: 0,
            finished: None,
            switched: false,
            tokens: t..t,
            text: x..x,
            logprobs: l..l,
        }
    }
}

/// After a sequence's decoder took this step's tokens (its output from `before` on; `step` the
/// last outcome): the budget hand-off when `think_end`, the context check, the end of a finished
/// sequence, and the event's tokens, text and logprobs.
#[allow(clippy::too_many_arguments)]
fn after_tokens(
    id: SeqId,
    s: &mut Slot,
    step: Step,
    think_end: bool,
    before: usize,
    ev: &mut Event,
    pool: &mut SeqPool,
    order: &mut Vec<SeqId>,
    o: &mut Outputs,
) -> Result<()> {
    let dec = s.dec.as_mut().expect("an active sequence has a decoder");
    let stop = match step {
        Step::Stop(r) => Some(r),
        Step::Next(t) => {
            s.next = t;
            if let Some((answer, handoff)) = s.answer.filter(|_| think_end) {
                s.answer = None;
                // The hand-off (control.rs): `t` completed the marker.
                s.group = answer;
                ev.switched = true;
                if handoff == Handoff::Reprefill {
                    s.prompt.truncate(s.prompt_len);
                    s.prompt.extend_from_slice(dec.tokens());
                    (s.fed, s.decoding) = (0, false);
                    pool.get_mut(id)?.reset();
                }
            }
            let seq = pool.get(id)?;
            let need = if s.decoding { 1 } else { s.prompt.len() };
            (seq.pos + need > seq.capacity()).then(|| {
                o.text.push_str(dec.finish(StopReason::Context));
                StopReason::Context
            })
        }
    };
    o.toks.extend_from_slice(&dec.tokens()[before..]);
    let lps = dec.logprobs();
    let per = lps.len() / dec.tokens().len().max(1);
    o.logprobs.extend_from_slice(&lps[before * per..]);
    ev.tokens.end = o.toks.len();
    ev.text.end = o.text.len();
    ev.logprobs.end = o.logprobs.len();
    if let Some(reason) = stop {
        ev.finished = Some(Finished {
            reason,
            prompt_tokens: s.prompt_len,
            tokens: dec.tokens().len(),
            thinking_tokens: dec.thinking_tokens(),
        });
        s.active = false;
        order.retain(|&x| x != id);
        pool.get_mut(id)?.reset();
    }
    Ok(())
}

/// One width of `batched-bench` (the columns of llama.cpp's `llama-batched-bench`).
#[derive(Clone, Debug, serde::Serialize)]
pub struct BatchedRow {
    /// Prompt tokens per sequence.
    pub pp: usize,
    /// Decode steps per sequence.
    pub tg: usize,
    /// Sequences at once.
    pub n: usize,
    /// Cache positions in use at the end (n × (pp + tg)).
    pub n_kv: usize,
    /// Seconds until every prompt has run (its steps also give the first tokens).
    pub t_pp: f64,
    /// Prompt tokens per second.
    pub s_pp: f64,
    /// Seconds of the decode steps after that.
    pub t_tg: f64,
    /// Tokens per second decoded in them, summed over the sequences.
    pub s_tg: f64,
    pub t: f64,
    /// (prompt + decoded tokens) per second.
    pub s: f64,
}

/// Runs `n` sequences of `pp` random prompt tokens and `tg` greedy decode steps each through
/// an [`Engine`] at `budget` (after a warm-up of one prefill and one decode step), as
/// `llama-batched-bench -npp pp -ntg tg -npl n` does. `chunk` is the prompt tokens per step
/// (None: all n × pp in the first step, so prefill and decode do not overlap).
pub fn batched_bench(
    model: &Model,
    tok: &Tokenizer,
    budget: &Budget,
    pp: usize,
    tg: usize,
    n: usize,
    chunk: Option<usize>,
) -> Result<BatchedRow> {
    if pp == 0 {
        return Err(Error::Input("--npp must be at least 1".into()));
    }
    let cfg = EngineConfig {
        parallel: n,
        ctx: pp + tg + 1,
        prefill_chunk: chunk.unwrap_or(n.saturating_mul(pp)).max(1),
        draft_max: 0,
    };
    let mut eng = Engine::new(model, tok, cfg)?;
    let req = |i: usize, max_tokens: usize| Request {
        prompt: elastica_core::eval::bench_tokens(model, pp, 42 + i as u64),
        budget: budget.clone(),
        config: GenConfig {
            max_tokens,
            sampler: Default::default(),
            stop: vec![],
            ignore_eos: true,
            logprobs: None,
        },
        think: None,
        answer: None,
        speculate: None,
    };
    // The first token comes from the prefill, then tg decode steps.
    for (max, timed) in [(2, false), (tg + 1, true)] {
        let reqs: Vec<Request> = (0..n).map(|i| req(i, max)).collect();
        for r in reqs {
            eng.add(r)?;
        }
        let t0 = std::time::Instant::now();
        while (0..n).any(|i| eng.prefilling(i)) {
            eng.step()?;
        }
        let t_pp = t0.elapsed().as_secs_f64();
        let t1 = std::time::Instant::now();
        let mut decoded = 0;
        while !eng.is_idle() {
            decoded += eng.step()?.iter().map(|(_, t, _)| t.len()).sum::<usize>();
        }
        let t_tg = t1.elapsed().as_secs_f64();
        if timed {
            let t = t_pp + t_tg;
            return Ok(BatchedRow {
                pp,
                tg,
                n,
                n_kv: n * (pp + tg),
                t_pp,
                s_pp: (n * pp) as f64 / t_pp,
                t_tg,
                s_tg: decoded as f64 / t_tg,
                t,
                s: (n * pp + decoded) as f64 / t,
            });
        }
    }
    unreachable!()
}
