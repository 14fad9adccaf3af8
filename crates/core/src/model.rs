//! The shared model: a list of pre-norm residual blocks (spec §2.2), each with one mixer, over an
//! embedding and an LM head. Llama layers become two blocks (attention, gated MLP); Nemotron-H
//! layers are one block each. Architecture files in `models/` only map checkpoints onto this.
//! Every forward takes a [`Budget`] and reads prefixes of the one loaded copy of the weights.

use crate::budget::{Axis, Budget, BudgetSpec, Shape};
use crate::error::{Error, Result};
use crate::formats::tokenizer::Specials;
use crate::kernels::ops::rmsnorm;
use crate::kernels::quant::dequant_row;
use crate::layers::attention::{Attention, KvCache};
use crate::layers::mamba2::{Mamba2, MambaCache};
use crate::layers::mlp::Mlp;
use crate::layers::moe::Moe;
use crate::layers::{
    Ffn, Observer, Part, PartState, Scratch, Silent, Vector, buf, linear, linear_rows,
};
use crate::manifest::Manifest;
use crate::tensor::Tensor;
use std::ops::Range;
use std::path::PathBuf;

pub enum Mixer {
    Attention(Attention),
    Mamba(Mamba2),
    Mlp(Mlp),
    Moe(Moe),
}

pub struct Block {
    /// The layer (depth unit) this block belongs to; budgets and skips are per layer.
    pub layer: usize,
    pub norm: Vector,
    pub mixer: Mixer,
    /// Index of this block's state in the cache (attention or Mamba numbering).
    pub slot: usize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Hf,
    Gguf,
}

/// Everything besides weights that a checkpoint carries.
pub struct Meta {
    pub path: PathBuf,
    pub format: Format,
    /// `llama`, `nemotron_h` or `nemotron_h_moe`.
    pub arch: String,
    pub bos: Option<u32>,
    pub eos: Vec<u32>,
    pub add_bos: bool,
    pub chat_template: Option<String>,
    pub context: usize,
    pub manifest: Option<Manifest>,
    /// GGUF metadata (tokenizer arrays live here), if the model came from a GGUF file.
    pub gguf: Option<std::collections::BTreeMap<String, crate::formats::gguf::Value>>,
}

impl Meta {
    /// The GGUF metadata (tokenizer arrays live here) of a model loaded from GGUF.
    pub fn gguf(&self) -> Result<&std::collections::BTreeMap<String, crate::formats::gguf::Value>> {
        let e = || Error::Tokenizer(format!("{}: GGUF metadata not kept", self.path.display()));
        self.gguf.as_ref().ok_or_else(e)
    }
    pub fn specials(&self) -> Specials<'_> {
        let (bos, eos, add_bos, context) = (self.bos, &self.eos[..], self.add_bos, self.context);
        let chat_template = self.chat_template.as_deref();
        Specials {
            bos,
            eos,
            add_bos,
            chat_template,
            context,
        }
    }
}

pub struct Model {
    pub meta: Meta,
    pub shape: Shape,
    pub vocab: usize,
    pub embed: Tensor,
    /// None when tied to the embedding.
    pub lm_head: Option<Tensor>,
    pub norm_f: Vector,
    pub eps: f32,
    pub blocks: Vec<Block>,
}

/// Which positions of a forward call need logits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Logits {
    None,
    Last,
    All,
    /// Positions `i >= n` of this call.
    From(usize),
}

impl Logits {
    /// Rows of logits a call over `n` tokens returns.
    pub fn count(self, n: usize) -> usize {
        match self {
            Logits::None => 0,
            Logits::Last => n.min(1),
            Logits::All => n,
            Logits::From(i) => n.saturating_sub(i),
        }
    }
    /// The rows of a chunk of `t` tokens starting at token `start` of a call over `n` tokens.
    fn rows(self, start: usize, t: usize, n: usize) -> Range<usize> {
        match self {
            Logits::None => 0..0,
            Logits::Last if start + t == n => t - 1..t,
            Logits::Last => 0..0,
            Logits::All => 0..t,
            Logits::From(i) => i.saturating_sub(start).min(t)..t,
        }
    }
}

/// Largest number of tokens of one sequence run through the blocks at once (llama.cpp's
/// n_ubatch); longer calls run in chunks of this many.
pub const UBATCH: usize = 512;

/// No checkpoint in this slot.
const NONE: usize = usize::MAX;

/// The state of one sequence: its position, the KV cache of every attention layer and the state
/// of every Mamba layer, all in the parent's layout, so the sequence can continue under any
/// budget. Made alone ([`SeqState::try_new`]) or in a [`SeqPool`]; run with a [`Work`] through
/// [`Model::forward_batch`].
///
/// Memory operations (llama.cpp's `seq_rm`/`seq_cp`): [`truncate`](Self::truncate) rolls the
/// sequence back to a position, [`copy_from`](Self::copy_from) copies a prefix of another.
/// Attention rolls back by position alone; a Mamba layer needs its state at that position, which
/// it has for the last K positions when made with K checkpoints (see [`MambaCache`]). K draft
/// tokens need K: drafting from position c keeps c..c+K-1 (back to c before verifying), the
/// stepwise verify of K + 1 tokens keeps c+1..c+K, every position an acceptance can end at
/// (c + K + 1, all accepted, is the live state). Each checkpoint costs one copy of every Mamba layer's state: for Nemotron 3
/// Nano 30B-A3B (method doc §1.2: 23 Mamba layers, 64 heads × 64 × d_state 128, conv 4 over
/// 4096 + 2·8·128 channels) that is 23 × (2 MiB + 72 KiB) ≈ 48 MiB per checkpoint, so K = 8
/// costs about 0.4 GiB per speculating sequence (its KV cache: 6 layers × 2 × 2 × 128 floats,
/// 12 KiB per token). Sequences that do not speculate take K = 0.
pub struct SeqState {
    /// Tokens in the sequence, the position of the next one. Move it back only through
    /// [`truncate`](Self::truncate), which also restores the Mamba states.
    pub pos: usize,
    cap: usize,
    kv: Vec<KvCache>,
    mamba: Vec<MambaCache>,
    /// The position whose Mamba states each checkpoint slot holds (`NONE`: none).
    held: Vec<usize>,
}

/// Floats of the KV caches of `cap` tokens, or None on overflow.
fn kv_floats(model: &Model, cap: usize) -> Option<usize> {
    model.blocks.iter().try_fold(0usize, |n, b| match &b.mixer {
        Mixer::Attention(a) => a
            .kv_heads
            .checked_mul(a.head_dim)?
            .checked_mul(cap)?
            .checked_mul(2)?
            .checked_add(n),
        _ => Some(n),
    })
}

/// Floats of one copy of every Mamba layer's state.
fn mamba_floats(model: &Model) -> usize {
    let m = model.blocks.iter().map(|b| match &b.mixer {
        Mixer::Mamba(m) => m.state_len(),
        _ => 0,
    });
    m.sum()
}

/// The error for state that cannot be had: `what` needs `bytes` (None: more than addressable).
fn unallocatable(what: &str, bytes: Option<usize>) -> Error {
    Error::Input(match bytes {
        Some(b) => format!(
            "{what} needs {b} bytes ({:.1} GiB) of cache, which could not be allocated",
            b as f64 / (1u64 << 30) as f64
        ),
        None => format!("{what} needs more cache memory than this machine can address"),
    })
}

impl SeqState {
    /// Bytes of one sequence of `cap` tokens with `checkpoints` Mamba checkpoints (None when it
    /// overflows).
    pub fn bytes(model: &Model, cap: usize, checkpoints: usize) -> Option<usize> {
        let m = mamba_floats(model).checked_mul(checkpoints.checked_add(1)?)?;
        kv_floats(model, cap)?.checked_add(m)?.checked_mul(4)
    }

    /// An empty sequence of up to `cap` tokens whose Mamba layers keep `checkpoints` states for
    /// rolling back (0: no rollback in models with Mamba layers). Errors name the size and bytes
    /// when the memory cannot be had.
    pub fn try_new(model: &Model, cap: usize, checkpoints: usize) -> Result<SeqState> {
        let what = format!("a sequence of {cap} tokens with {checkpoints} Mamba checkpoints");
        SeqState::alloc(model, cap, checkpoints)
            .ok_or_else(|| unallocatable(&what, SeqState::bytes(model, cap, checkpoints)))
    }

    fn alloc(model: &Model, cap: usize, checkpoints: usize) -> Option<SeqState> {
        SeqState::bytes(model, cap, checkpoints)?;
        let mut kv = vec![];
        let mut mamba = vec![];
        for b in &model.blocks {
            match &b.mixer {
                Mixer::Attention(a) => kv.push(KvCache::try_new(a.kv_heads, a.head_dim, cap)?),
                Mixer::Mamba(m) => {
                    let ring = (0..checkpoints).map(|_| m.try_state());
                    mamba.push(MambaCache {
                        state: m.try_state()?,
                        ring: ring.collect::<Option<_>>()?,
                    });
                }
                _ => {}
            }
        }
        Some(SeqState {
            pos: 0,
            cap,
            kv,
            mamba,
            held: vec![NONE; checkpoints],
        })
    }

    /// Tokens the sequence can hold.
    pub fn capacity(&self) -> usize {
        self.cap
    }

    /// Mamba checkpoints kept (K).
    pub fn checkpoints(&self) -> usize {
        self.held.len()
    }

    /// Back to an empty sequence.
    pub fn reset(&mut self) {
        self.pos = 0;
        for m in &mut self.mamba {
            m.state.clear();
        }
        self.held.fill(NONE);
    }

    /// Whether [`truncate`](Self::truncate) to `p` would succeed.
    pub fn can_truncate(&self, p: usize) -> bool {
        p <= self.pos && (p == self.pos || self.mamba.is_empty() || self.holds(p) || p == 0)
    }

    fn holds(&self, p: usize) -> bool {
        let k = self.held.len();
        k > 0 && self.held[p % k] == p
    }

    /// Rolls the sequence back to its first `p` tokens (llama.cpp's `seq_rm` of positions p..):
    /// attention by position, Mamba layers from their checkpoint of position p (or their zero
    /// state for p = 0). Allocates nothing. Errors when p lies beyond the sequence or no
    /// checkpoint holds it.
    pub fn truncate(&mut self, p: usize) -> Result<()> {
        if p > self.pos {
            return Err(Error::Input(format!(
                "cannot roll the sequence back to position {p}: it holds {} tokens",
                self.pos
            )));
        }
        if p == self.pos {
            return Ok(());
        }
        if !self.mamba.is_empty() {
            if p == 0 {
                self.reset();
                return Ok(());
            }
            if !self.holds(p) {
                let mut have: Vec<usize> =
                    self.held.iter().copied().filter(|&q| q != NONE).collect();
                have.sort_unstable();
                return Err(Error::Input(format!(
                    "cannot roll the Mamba state back to position {p} (the sequence holds {} tokens): {}",
                    self.pos,
                    match self.held.len() {
                        0 => "the sequence keeps no checkpoints".to_string(),
                        k => format!("its {k} checkpoints hold positions {have:?}"),
                    }
                )));
            }
            let slot = p % self.held.len();
            for m in &mut self.mamba {
                let (state, ring) = (&mut m.state, &m.ring);
                state.copy_from(&ring[slot]);
            }
        }
        for h in &mut self.held {
            if *h != NONE && *h > p {
                *h = NONE;
            }
        }
        self.pos = p;
        Ok(())
    }

    /// Makes this sequence the first `len` tokens of `src` (llama.cpp's `seq_cp`, for n > 1
    /// completions of one prompt): copies the KV rows and the Mamba states at `len` (the live
    /// ones when `len` is `src`'s position, else a checkpoint). This sequence's own checkpoints
    /// start empty. Errors when `len` is beyond `src` or this capacity, or the sequences belong
    /// to different models.
    pub fn copy_from(&mut self, src: &SeqState, len: usize) -> Result<()> {
        let same = self.kv.len() == src.kv.len()
            && self.mamba.len() == src.mamba.len()
            && self
                .kv
                .iter()
                .zip(&src.kv)
                .all(|(a, b)| (a.heads, a.dim) == (b.heads, b.dim))
            && (self.mamba.iter().zip(&src.mamba)).all(|(a, b)| {
                a.state.ssm.len() == b.state.ssm.len() && a.state.conv.len() == b.state.conv.len()
            });
        if !same {
            return Err(Error::Input(
                "cannot copy a sequence's state into one of another model".into(),
            ));
        }
        if len > src.pos {
            return Err(Error::Input(format!(
                "cannot copy {len} tokens of a sequence that holds {}",
                src.pos
            )));
        }
        if len > self.cap {
            return Err(Error::Input(format!(
                "cannot copy {len} tokens into a sequence of {} tokens",
                self.cap
            )));
        }
        if !self.mamba.is_empty() && len != src.pos && len != 0 && !src.holds(len) {
            return Err(Error::Input(format!(
                "cannot copy the Mamba state at position {len}: the source holds {} tokens and no checkpoint of that position",
                src.pos
            )));
        }
        for (d, s) in self.kv.iter_mut().zip(&src.kv) {
            d.copy_prefix(s, len);
        }
        for (d, s) in self.mamba.iter_mut().zip(&src.mamba) {
            match len {
                0 => d.state.clear(),
                _ if len == src.pos => d.state.copy_from(&s.state),
                _ => d.state.copy_from(&s.ring[len % s.ring.len()]),
            }
        }
        self.held.fill(NONE);
        self.pos = len;
        Ok(())
    }

    /// Marks the checkpoints a part of a forward writes (see [`MambaCache`]).
    fn note_checkpoints(&mut self, p: &Part) {
        let k = self.held.len();
        if k == 0 || self.mamba.is_empty() {
            return;
        }
        let saved = if p.stepwise { p.len } else { 1 };
        for q in p.pos..p.pos + saved {
            self.held[q % k] = q;
        }
    }
}

/// Sequence states for up to N sequences of C tokens each, allocated up front (what
/// `--parallel N --ctx C` sizes). Sequences are named by their index.
pub struct SeqPool {
    seqs: Vec<SeqState>,
}

impl SeqPool {
    /// `n` empty sequences of `ctx` tokens with `checkpoints` Mamba checkpoints each; one error
    /// naming the sizes and the bytes when they cannot all be had.
    pub fn try_new(model: &Model, n: usize, ctx: usize, checkpoints: usize) -> Result<SeqPool> {
        let bytes = SeqState::bytes(model, ctx, checkpoints).and_then(|b| b.checked_mul(n));
        let fail = || {
            unallocatable(
                &format!(
                    "a pool of {n} sequences of {ctx} tokens with {checkpoints} Mamba checkpoints"
                ),
                bytes,
            )
        };
        bytes.ok_or_else(fail)?;
        let mut seqs = Vec::new();
        seqs.try_reserve_exact(n).map_err(|_| fail())?;
        for _ in 0..n {
            seqs.push(SeqState::alloc(model, ctx, checkpoints).ok_or_else(fail)?);
        }
        Ok(SeqPool { seqs })
    }

    /// A pool of states made elsewhere (e.g. with different checkpoint counts).
    pub fn from_states(seqs: Vec<SeqState>) -> SeqPool {
        SeqPool { seqs }
    }

    pub fn len(&self) -> usize {
        self.seqs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.seqs.is_empty()
    }

    fn check(&self, id: usize) -> Result<()> {
        match id < self.seqs.len() {
            true => Ok(()),
            false => Err(Error::Input(format!(
                "sequence {id} is outside the pool of {} sequences (--parallel)",
                self.seqs.len()
            ))),
        }
    }

    pub fn get(&self, id: usize) -> Result<&SeqState> {
        self.check(id)?;
        Ok(&self.seqs[id])
    }

    pub fn get_mut(&mut self, id: usize) -> Result<&mut SeqState> {
        self.check(id)?;
        Ok(&mut self.seqs[id])
    }

    /// All states, for building the items of a batch (`iter_mut` hands out disjoint ones).
    pub fn states_mut(&mut self) -> &mut [SeqState] {
        &mut self.seqs
    }

    /// Rolls sequence `id` back to its first `p` tokens ([`SeqState::truncate`]).
    pub fn seq_rm(&mut self, id: usize, p: usize) -> Result<()> {
        self.get_mut(id)?.truncate(p)
    }

    /// Makes sequence `dst` the first `len` tokens of `src` ([`SeqState::copy_from`]).
    pub fn seq_cp(&mut self, src: usize, dst: usize, len: usize) -> Result<()> {
        self.check(src)?;
        self.check(dst)?;
        if src == dst {
            return self.seqs[src].truncate(len);
        }
        let (a, b) = self.seqs.split_at_mut(src.max(dst));
        let (s, d) = match src < dst {
            true => (&a[src], &mut b[0]),
            false => (&b[0], &mut a[dst]),
        };
        d.copy_from(s, len)
    }
}

/// Scratch of one worker's forward passes: activations, layer buffers and logits. Grow-only, so
/// once sized for a batch, forwards of that batch size allocate nothing.
#[derive(Default)]
pub struct Work {
    h: Vec<f32>,
    xn: Vec<f32>,
    y: Vec<f32>,
    sel: Vec<f32>,
    /// Logits of the decode-path rows before they are put in place.
    head: Vec<f32>,
    logits: Vec<f32>,
    s: Scratch,
    parts: Vec<Part>,
    /// Per part: its item and the chunk's first token in the item.
    owner: Vec<usize>,
    start: Vec<usize>,
    /// Per item: where its logits begin, and how many are filled.
    offsets: Vec<usize>,
    filled: Vec<usize>,
    /// Decode-path logits rows: (item row in `logits`, row in `sel`).
    dest: Vec<usize>,
}

impl Work {
    pub fn new() -> Work {
        Work::default()
    }

    /// Floats of the scratch that grows with the position (attention scores of one query over
    /// `ctx` keys, router scratch), or None on overflow.
    fn position_floats(model: &Model, ctx: usize) -> Option<usize> {
        let max_heads = model
            .blocks
            .iter()
            .filter_map(|b| match &b.mixer {
                Mixer::Attention(a) => Some(a.heads),
                _ => None,
            })
            .fold(1, usize::max);
        max_heads
            .checked_mul(ctx)?
            .checked_add(4 * model.shape.experts.max(1) + 1024)
    }

    /// Scratch sized so that decoding sequences of up to `ctx` tokens never reallocates.
    pub fn try_new(model: &Model, ctx: usize) -> Result<Work> {
        let n = Work::position_floats(model, ctx);
        let what = format!("scratch for a context of {ctx} tokens");
        let fail = || unallocatable(&what, n.and_then(|n| n.checked_mul(4)));
        let mut w = Work::default();
        w.s.e.try_reserve(n.ok_or_else(fail)?).map_err(|_| fail())?;
        Ok(w)
    }
}

/// One sequence with its own scratch: the simple way to run a single sequence through
/// [`Model::forward`]. Reads as its [`SeqState`] (`cache.pos`, `cache.reset()`, ...).
pub struct Cache {
    pub seq: SeqState,
    pub work: Work,
}

impl std::ops::Deref for Cache {
    type Target = SeqState;
    fn deref(&self) -> &SeqState {
        &self.seq
    }
}

impl std::ops::DerefMut for Cache {
    fn deref_mut(&mut self) -> &mut SeqState {
        &mut self.seq
    }
}

impl Cache {
    /// A cache for `cap` tokens; panics when the memory cannot be had. Sizes a user chooses go
    /// through [`Cache::try_new`].
    pub fn new(model: &Model, cap: usize) -> Cache {
        Cache::try_new(model, cap).unwrap_or_else(|e| panic!("{e}"))
    }

    /// A cache for `cap` tokens (no Mamba checkpoints), or an error naming the context and its
    /// bytes when they cannot be allocated.
    pub fn try_new(model: &Model, cap: usize) -> Result<Cache> {
        let bytes = Work::position_floats(model, cap).and_then(|n| {
            n.checked_mul(4)?
                .checked_add(SeqState::bytes(model, cap, 0)?)
        });
        let fail = || unallocatable(&format!("a context of {cap} tokens"), bytes);
        bytes.ok_or_else(fail)?;
        let seq = SeqState::alloc(model, cap, 0).ok_or_else(fail)?;
        let work = Work::try_new(model, cap).map_err(|_| fail())?;
        Ok(Cache { seq, work })
    }
}

/// One sequence's share of a [`Model::forward_batch`]: its tokens, appended at `seq.pos`, and
/// which of their logits to return.
pub struct BatchItem<'a> {
    pub seq: &'a mut SeqState,
    pub tokens: &'a [u32],
    pub logits: Logits,
    /// Run the tokens one after another through the decode path, as that many single-token
    /// forwards would (bit for bit: the speculative verify pass), still reading each weight
    /// once; with Mamba checkpoints, the state before each token is kept. Single tokens always
    /// run so. Otherwise the tokens run as prefill chunks.
    pub stepwise: bool,
}

/// The logits of a batch: each item's requested rows ([`Logits::count`] of its tokens, [n][vocab]),
/// valid until the next forward with the same [`Work`].
pub struct BatchLogits<'w> {
    data: &'w [f32],
    offsets: &'w [usize],
    vocab: usize,
}

impl<'w> BatchLogits<'w> {
    /// Item `i`'s logits, [rows][vocab].
    pub fn item(&self, i: usize) -> &'w [f32] {
        &self.data[self.offsets[i] * self.vocab..self.offsets[i + 1] * self.vocab]
    }
    /// All items' logits, in item order.
    pub fn all(&self) -> &'w [f32] {
        self.data
    }
}

/// The KV caches of one attention layer, per part of a batch.
struct KvOf<'x, 'a> {
    items: &'x mut [BatchItem<'a>],
    owner: &'x [usize],
    slot: usize,
}

impl PartState<KvCache> for KvOf<'_, '_> {
    fn state(&mut self, part: usize) -> &mut KvCache {
        &mut self.items[self.owner[part]].seq.kv[self.slot]
    }
}

/// The states of one Mamba layer, per part of a batch.
struct MambaOf<'x, 'a> {
    items: &'x mut [BatchItem<'a>],
    owner: &'x [usize],
    slot: usize,
}

impl PartState<MambaCache> for MambaOf<'_, '_> {
    fn state(&mut self, part: usize) -> &mut MambaCache {
        &mut self.items[self.owner[part]].seq.mamba[self.slot]
    }
}

/// Every large tensor of a model, as `&` or (with `mut`) `&mut` references: one list for
/// [`Model::matrices`] and [`Model::matrices_mut`].
macro_rules! matrices {
    ($m:expr, $iter:ident $(, $mu:tt)?) => {{
        let m = $m;
        let mut v = vec![&$($mu)? m.embed];
        if let Some(h) = &$($mu)? m.lm_head {
            v.push(h);
        }
        for b in &$($mu)? m.blocks {
            match &$($mu)? b.mixer {
                Mixer::Attention(a) => v.extend([&$($mu)? a.q, &$($mu)? a.k, &$($mu)? a.v, &$($mu)? a.o]),
                Mixer::Mamba(x) => v.extend([&$($mu)? x.in_proj, &$($mu)? x.out_proj]),
                Mixer::Mlp(x) => {
                    v.extend([&$($mu)? x.up, &$($mu)? x.down]);
                    v.extend(x.gate.$iter());
                }
                Mixer::Moe(x) => {
                    v.extend(x.up.$iter().chain(x.down.$iter()));
                    if let Some(s) = &$($mu)? x.shared {
                        v.extend([&$($mu)? s.up, &$($mu)? s.down]);
                    }
                }
            }
        }
        v
    }};
}

impl Model {
    pub fn arch(&self) -> &str {
        &self.meta.arch
    }

    /// Resolves a budget: `full`, a manifest name, an explicit spec (`hidden=384,ffn=1024`), or a
    /// target (`0.6`, `params:80e6`) resolved between the manifest's budgets ([`crate::target`]).
    pub fn budget(&self, s: &str) -> Result<Budget> {
        let s = s.trim();
        let spec: BudgetSpec = if !s.contains('=') && !s.is_empty() && s != "full" {
            let target = crate::target::Target::parse(s);
            let m = self.meta.manifest.as_ref().ok_or_else(|| {
                let what = if target.is_some() { " (a target is resolved between a manifest's budgets)" } else { "" };
                Error::Budget(format!("{s:?} is not an explicit budget (key=value,...) and the model has no elastic manifest{what}"))
            })?;
            let Some(nb) = m.budgets.iter().find(|b| b.name == s) else {
                if let Some(t) = target {
                    return Ok(crate::target::resolve(self, m, &t?, s)?.budget);
                }
                let names: Vec<&str> = m.budgets.iter().map(|b| b.name.as_str()).collect();
                return Err(Error::Budget(format!(
                    "no budget named {s:?} in the manifest (it has: {}; or give a target such as 0.6 or params:80e6)",
                    names.join(", ")
                )));
            };
            nb.spec.parse()?
        } else {
            s.parse()?
        };
        let b = spec.resolve(&self.shape)?;
        self.check_alignment(&b)?;
        Ok(b)
    }

    pub fn full_budget(&self) -> Budget {
        Budget::full(&self.shape)
    }

    /// The granule of width cuts: multiples of 16 (NVFP4's scale blocks) and of the
    /// widest quantized block, so no cut input splits a block.
    pub fn width_granule(&self) -> usize {
        fn gcd(a: usize, b: usize) -> usize {
            if b == 0 { a } else { gcd(b, a % b) }
        }
        let block = self.matrices().iter().map(|t| t.dtype.block_len()).max();
        let block = block.unwrap_or(1);
        16 / gcd(16, block) * block
    }

    /// Quantized blocks cannot be split: every cut input dimension must fall on a block boundary.
    pub fn check_alignment(&self, b: &Budget) -> Result<()> {
        let check = |t: &Tensor, cols: &[Range<usize>], axes: &[Axis]| -> Result<()> {
            let bl = t.dtype.block_len();
            if bl == 1 {
                return Ok(());
            }
            for c in cols {
                if c.start % bl != 0 || c.end % bl != 0 {
                    let axis = axes.iter().map(|a| a.name()).collect::<Vec<_>>().join("/");
                    return Err(Error::Budget(format!(
                        "{axis}: tensor {} is {} with blocks of {bl} values, so the kept inputs must be whole blocks (got {}..{})",
                        t.name, t.dtype, c.start, c.end
                    )));
                }
            }
            Ok(())
        };
        let hid = [0..b.hidden];
        let head = self.lm_head.as_ref().unwrap_or(&self.embed);
        check(head, &hid, &[Axis::Hidden])?;
        for blk in &self.blocks {
            let lb = b.layer(blk.layer);
            match &blk.mixer {
                Mixer::Attention(a) => {
                    check(&a.q, &hid, &[Axis::Hidden])?;
                    check(&a.k, &hid, &[Axis::Hidden])?;
                    check(&a.v, &hid, &[Axis::Hidden])?;
                    check(&a.o, &lb.q_rows, &[Axis::Heads])?;
                }
                Mixer::Mamba(m) => {
                    check(&m.in_proj, &hid, &[Axis::Hidden])?;
                    check(
                        &m.out_proj,
                        &lb.inner,
                        &[Axis::MambaHeads, Axis::MambaHeadDim],
                    )?;
                }
                Mixer::Mlp(m) => {
                    check(&m.up, &hid, &[Axis::Hidden])?;
                    check(&m.down, &[0..lb.size(Axis::Ffn)], &[Axis::Ffn])?;
                }
                Mixer::Moe(m) => {
                    for (u, d) in m.up.iter().zip(&m.down) {
                        check(u, &hid, &[Axis::Hidden])?;
                        check(d, &[0..lb.size(Axis::MoeFfn)], &[Axis::MoeFfn])?;
                    }
                    if let Some(s) = &m.shared {
                        check(&s.up, &hid, &[Axis::Hidden])?;
                        check(&s.down, &[0..lb.size(Axis::SharedFfn)], &[Axis::SharedFfn])?;
                    }
                }
            }
        }
        Ok(())
    }

    /// Every weight of the model as [`Term`]s in the axis sizes: the one parameter and bytes
    /// count behind `info`, the solver and training's budget loss.
    pub fn terms(&self) -> Vec<Term> {
        use Axis::*;
        let t = |layer, axes: &[Axis], coef: usize, bytes: f64| Term {
            layer,
            axes: axes.to_vec(),
            coef: coef as f64,
            bytes,
            per_token: PerToken::All,
        };
        let bpe = |x: &Tensor| x.dtype.block_bytes() as f64 / x.dtype.block_len() as f64;
        let (f32b, vocab) = (4.0, self.vocab);
        let mut v = vec![t(None, &[Hidden], 1, f32b)];
        let mut embed = t(None, &[Hidden], vocab, bpe(&self.embed));
        if let Some(h) = &self.lm_head {
            v.push(t(None, &[Hidden], vocab, bpe(h)));
            // A token reads one row (the tied head reads them all).
            embed.per_token = PerToken::Row(vocab);
        }
        v.push(embed);
        let mlp = |l, m: &Mlp, ffn| {
            let mats = [Some(&m.up), m.gate.as_ref(), Some(&m.down)];
            let mats = mats
                .into_iter()
                .flatten()
                .map(|x| t(l, &[ffn, Hidden], 1, bpe(x)));
            let bias = [
                (&m.up_bias, ffn),
                (&m.gate_bias, ffn),
                (&m.down_bias, Hidden),
            ];
            let bias = bias.into_iter().filter(|b| b.0.is_some());
            mats.chain(bias.map(|b| t(l, &[b.1], 1, f32b)))
                .collect::<Vec<_>>()
        };
        for blk in &self.blocks {
            let l = Some(blk.layer);
            v.push(t(l, &[Hidden], 1, f32b));
            match &blk.mixer {
                Mixer::Attention(a) => {
                    let (hd, kv) = (a.head_dim, a.kv_heads * a.head_dim);
                    v.extend([
                        t(l, &[Heads, Hidden], hd, bpe(&a.q)),
                        t(l, &[Hidden], kv, bpe(&a.k)),
                        t(l, &[Hidden], kv, bpe(&a.v)),
                        t(l, &[Heads, Hidden], hd, bpe(&a.o)),
                    ]);
                    let bias: [(_, &[Axis], _); 4] = [
                        (&a.q_bias, &[Heads], hd),
                        (&a.k_bias, &[], kv),
                        (&a.v_bias, &[], kv),
                        (&a.o_bias, &[Hidden], 1),
                    ];
                    let bias = bias.into_iter().filter(|b| b.0.is_some());
                    v.extend(bias.map(|(_, axes, c)| t(l, axes, c, f32b)));
                }
                Mixer::Mamba(m) => {
                    let (gn, k, inner) = (m.groups * m.state, m.conv_k, [MambaHeads, MambaHeadDim]);
                    let (i, o) = (bpe(&m.in_proj), bpe(&m.out_proj));
                    v.extend([
                        // in_proj rows: z and x (heads · head_dim each), B and C, dt (heads).
                        t(l, &[MambaHeads, MambaHeadDim, Hidden], 2, i),
                        t(l, &[Hidden], 2 * gn, i),
                        t(l, &[MambaHeads, Hidden], 1, i),
                        t(l, &[MambaHeads, MambaHeadDim, Hidden], 1, o),
                        // conv weight and bias over x, B and C, the gated norm; dt_bias, A, D.
                        t(l, &inner, k + 2, f32b),
                        t(l, &[], 2 * gn * (k + 1), f32b),
                        t(l, &[MambaHeads], 3, f32b),
                    ]);
                }
                Mixer::Mlp(m) => v.extend(mlp(l, m, Ffn)),
                Mixer::Moe(m) => {
                    // Router weight and correction bias, the routed experts, the shared one.
                    v.extend([t(l, &[Experts, Hidden], 1, f32b), t(l, &[Experts], 1, f32b)]);
                    v.extend([&m.up[0], &m.down[0]].map(|x| Term {
                        per_token: PerToken::TopK(m.topk),
                        ..t(l, &[Experts, MoeFfn, Hidden], 1, bpe(x))
                    }));
                    v.extend(m.shared.iter().flat_map(|s| mlp(l, s, SharedFfn)));
                }
            }
        }
        v
    }

    /// Σ over the weights of the budget's kept layers of `unit(term)` × elements; `per_token`
    /// counts only the routed experts a token uses.
    fn measure(&self, b: &Budget, per_token: bool, unit: impl Fn(&Term) -> f64) -> u64 {
        let size = |t: &Term, a: Axis| {
            let n = b.size(a, t.layer.unwrap_or(0));
            Ok(match t.per_token {
                PerToken::TopK(k) if per_token && a == Axis::Experts => n.min(k),
                _ => n,
            } as f64)
        };
        let w = |t: &Term| match t.layer {
            Some(l) if !b.layer(l).keep => 0.0,
            _ => t.coef * unit(t),
        };
        count(&self.terms(), 0.0, size, w).map_or(0, |n| n.round() as u64)
    }

    /// (total, active-per-token) parameter counts of a budget.
    pub fn params(&self, b: &Budget) -> (u64, u64) {
        (
            self.measure(b, false, |_| 1.0),
            self.measure(b, true, |_| 1.0),
        )
    }

    /// Runs `tokens` at positions cache.pos.. under `budget`, advancing the cache. Returns the
    /// logits of the requested positions, [n][vocab], valid until the next call.
    pub fn forward<'c>(
        &self,
        tokens: &[u32],
        budget: &Budget,
        cache: &'c mut Cache,
        want: Logits,
    ) -> Result<&'c [f32]> {
        self.forward_observed(tokens, budget, cache, want, &mut Silent)
    }

    /// [`forward`](Self::forward) with hooks on the activations importance is ranked by.
    pub fn forward_observed<'c>(
        &self,
        tokens: &[u32],
        budget: &Budget,
        cache: &'c mut Cache,
        want: Logits,
        obs: &mut dyn Observer,
    ) -> Result<&'c [f32]> {
        let Cache { seq, work } = cache;
        let mut items = [BatchItem {
            seq,
            tokens,
            logits: want,
            stepwise: false,
        }];
        Ok(self
            .forward_batch_observed(&mut items, budget, work, obs)?
            .all())
    }

    /// Runs several sequences as one pass under one budget: every projection, MLP and expert
    /// reads each weight once for the rows of all items together, while attention and the
    /// Mamba recurrence run per item on its own state and positions. Prefill chunks and decode
    /// tokens may be mixed. Each item gets the logits it would get alone: decode rows (single
    /// tokens, stepwise items) bit for bit; prefill rows too, except that a routed MoE expert
    /// that gets one row alone but several in the batch switches from the decode product to the
    /// GEMM (f32 rounding differences). Nothing is allocated once `work` has grown to the batch.
    pub fn forward_batch<'w>(
        &self,
        items: &mut [BatchItem<'_>],
        budget: &Budget,
        work: &'w mut Work,
    ) -> Result<BatchLogits<'w>> {
        self.forward_batch_observed(items, budget, work, &mut Silent)
    }

    /// [`forward_batch`](Self::forward_batch) with observer hooks (rows in batch order).
    pub fn forward_batch_observed<'w>(
        &self,
        items: &mut [BatchItem<'_>],
        budget: &Budget,
        work: &'w mut Work,
        obs: &mut dyn Observer,
    ) -> Result<BatchLogits<'w>> {
        for it in items.iter() {
            if let Some(&bad) = it.tokens.iter().find(|&&t| t as usize >= self.vocab) {
                return Err(Error::Input(format!(
                    "token id {bad} is outside the vocabulary (size {})",
                    self.vocab
                )));
            }
            if it.seq.pos + it.tokens.len() > it.seq.cap {
                return Err(Error::Input(format!(
                    "{} tokens at position {} exceed the context of {} tokens",
                    it.tokens.len(),
                    it.seq.pos,
                    it.seq.cap
                )));
            }
        }
        let v = self.vocab;
        let ws = work;
        ws.offsets.clear();
        ws.offsets.push(0);
        for it in items.iter() {
            let n = ws.offsets[ws.offsets.len() - 1] + it.logits.count(it.tokens.len());
            ws.offsets.push(n);
        }
        ws.filled.clear();
        ws.filled.resize(items.len(), 0);
        buf(&mut ws.logits, ws.offsets[items.len()] * v);
        let longest = items.iter().map(|it| it.tokens.len()).max().unwrap_or(0);
        for round in 0..longest.div_ceil(UBATCH) {
            let start = round * UBATCH;
            // Stepwise parts first (their rows take the decode path), then prefill chunks.
            ws.parts.clear();
            ws.owner.clear();
            ws.start.clear();
            let mut row = 0;
            for stepwise in [true, false] {
                for (i, it) in items.iter().enumerate() {
                    let len = it.tokens.len().saturating_sub(start).min(UBATCH);
                    if len == 0 || (it.stepwise || len == 1) != stepwise {
                        continue;
                    }
                    let pos = it.seq.pos;
                    ws.parts.push(Part {
                        row,
                        len,
                        pos,
                        stepwise,
                    });
                    ws.owner.push(i);
                    ws.start.push(start);
                    row += len;
                }
            }
            self.run_parts(items, budget, ws, row, obs);
        }
        Ok(BatchLogits {
            data: &ws.logits[..ws.offsets[items.len()] * v],
            offsets: &ws.offsets,
            vocab: v,
        })
    }

    /// One pass over `rows` rows made of `ws.parts`, advancing their sequences and filling the
    /// wanted logits.
    fn run_parts(
        &self,
        items: &mut [BatchItem<'_>],
        budget: &Budget,
        ws: &mut Work,
        rows: usize,
        obs: &mut dyn Observer,
    ) {
        let (hd, v) = (budget.hidden, self.vocab);
        let parts = &ws.parts[..];
        let owner = &ws.owner[..];
        let decode: usize = parts.iter().filter(|p| p.stepwise).map(|p| p.len).sum();
        let h = buf(&mut ws.h, rows * hd);
        for (pi, p) in parts.iter().enumerate() {
            let toks = &items[owner[pi]].tokens[ws.start[pi]..ws.start[pi] + p.len];
            for (i, &tok) in toks.iter().enumerate() {
                let r = p.row + i;
                let row = self.embed.row(tok as usize);
                dequant_row(self.embed.dtype, row, 0, &mut h[r * hd..(r + 1) * hd]);
            }
        }
        for blk in &self.blocks {
            let lb = budget.layer(blk.layer);
            if !lb.keep {
                if let Mixer::Mamba(_) = blk.mixer {
                    // A skipped layer's state stands still; its checkpoints must still follow.
                    for (pi, p) in parts.iter().enumerate() {
                        let mc = &mut items[owner[pi]].seq.mamba[blk.slot];
                        let saved = if p.stepwise { p.len } else { 1 };
                        (p.pos..p.pos + saved).for_each(|q| mc.save(q));
                    }
                }
                continue;
            }
            let xn = buf(&mut ws.xn, rows * hd);
            for (hr, xr) in h.chunks(hd).zip(xn.chunks_mut(hd)) {
                rmsnorm(hr, &blk.norm[..hd], self.eps, xr);
            }
            if obs.enabled() {
                obs.norm(blk.layer, xn, hd);
            }
            let y = buf(&mut ws.y, rows * hd);
            let (l, s, slot) = (blk.layer, &mut ws.s, blk.slot);
            match &blk.mixer {
                Mixer::Attention(a) => {
                    let mut kv = KvOf { items, owner, slot };
                    a.forward(lb, hd, xn, y, parts, decode, &mut kv, s, obs, l)
                }
                Mixer::Mamba(m) => {
                    let mut st = MambaOf { items, owner, slot };
                    m.forward(lb, hd, xn, y, parts, decode, &mut st, s, obs, l)
                }
                Mixer::Mlp(m) => m.forward(
                    lb.size(Axis::Ffn),
                    hd,
                    xn,
                    y,
                    decode,
                    s,
                    obs,
                    (l, Ffn::Dense),
                ),
                Mixer::Moe(m) => m.forward(lb, hd, xn, y, decode, s, obs, l),
            }
            for (hv, yv) in h.iter_mut().zip(y.iter()) {
                *hv += yv;
            }
        }
        for (pi, p) in parts.iter().enumerate() {
            let seq = &mut *items[owner[pi]].seq;
            seq.note_checkpoints(p);
            seq.pos += p.len;
        }
        // Logits: rows of single-row and stepwise requests take the decode product all at once
        // (then move to their item's place); a prefill chunk wanting several rows takes the GEMM
        // straight into place.
        let head = self.lm_head.as_ref().unwrap_or(&self.embed);
        ws.dest.clear();
        let mut m = 0;
        for (pi, p) in parts.iter().enumerate() {
            let it = &items[owner[pi]];
            let want = it.logits.rows(ws.start[pi], p.len, it.tokens.len());
            let n = want.len();
            if n == 0 {
                continue;
            }
            let at = ws.offsets[owner[pi]] + ws.filled[owner[pi]];
            ws.filled[owner[pi]] += n;
            if p.stepwise || n == 1 {
                let sel = buf(&mut ws.sel, (m + n) * hd);
                for (j, i) in want.enumerate() {
                    let (src, dst) = (&h[(p.row + i) * hd..][..hd], &mut sel[(m + j) * hd..][..hd]);
                    rmsnorm(src, &self.norm_f[..hd], self.eps, dst);
                    ws.dest.push(at + j);
                }
                m += n;
            } else {
                // Decode-path rows gathered so far stay at the front of `sel`.
                let sel = buf(&mut ws.sel, (m + n) * hd);
                let sel = &mut sel[m * hd..];
                for (j, i) in want.enumerate() {
                    let (src, dst) = (&h[(p.row + i) * hd..][..hd], &mut sel[j * hd..][..hd]);
                    rmsnorm(src, &self.norm_f[..hd], self.eps, dst);
                }
                let out = &mut ws.logits[at * v..(at + n) * v];
                linear(head, &[0..v], &[0..hd], sel, out);
            }
        }
        if m > 0 {
            let out = buf(&mut ws.head, m * v);
            linear_rows(head, &[0..v], &[0..hd], &ws.sel[..m * hd], out, m);
            for (j, &d) in ws.dest.iter().enumerate() {
                ws.logits[d * v..(d + 1) * v].copy_from_slice(&out[j * v..(j + 1) * v]);
            }
        }
    }

    /// Re-lays every matrix that `budgets` cut by columns into column panels
    /// ([`Tensor::relay`]), so that each budget's products read whole contiguous rows: a view
    /// then decodes like its sliced copy instead of striding through the parent's rows. The
    /// columns each product reads come from one observed token per budget. A budget that spans
    /// several panels runs each row through them (`kernels::gemv::matvec_sum`), which changes
    /// f32 rounding (not values) against the unpaneled model; a budget of panel 0 runs exactly
    /// its sliced copy's products. The checkpoint's pages of re-laid matrices are given back to
    /// the OS. Returns the number of matrices re-laid and their bytes.
    pub fn panel(&mut self, budgets: &[Budget]) -> Result<(usize, u64)> {
        type Sets = Vec<Vec<Range<usize>>>;
        fn add(sets: &mut Sets, cols: &[Range<usize>]) {
            if !sets.iter().any(|s| s == cols) {
                sets.push(cols.to_vec());
            }
        }
        #[derive(Default)]
        struct Cols(std::collections::HashMap<String, Sets>);
        impl Observer for Cols {
            fn weight_input(&mut self, w: &Tensor, cols: &[Range<usize>], _x: &[f32]) {
                add(self.0.entry(w.name.clone()).or_default(), cols);
            }
        }
        let mut rec = Cols::default();
        let mut cache = Cache::try_new(self, 1)?;
        let tok = self.meta.bos.unwrap_or(0);
        for b in budgets {
            cache.reset();
            self.forward_observed(&[tok], b, &mut cache, Logits::None, &mut rec)?;
            let head = self.lm_head.as_ref().unwrap_or(&self.embed);
            add(rec.0.entry(head.name.clone()).or_default(), &[0..b.hidden]);
        }
        // One token reaches only its top-k experts; every expert of a layer reads the same
        // columns as its siblings.
        for blk in &self.blocks {
            if let Mixer::Moe(m) = &blk.mixer {
                for experts in [&m.up, &m.down] {
                    let mut sets = Sets::new();
                    for e in experts.iter().filter_map(|e| rec.0.get(&e.name)) {
                        e.iter().for_each(|c| add(&mut sets, c));
                    }
                    for e in experts.iter() {
                        rec.0.insert(e.name.clone(), sets.clone());
                    }
                }
            }
        }
        let (mut count, mut bytes) = (0, 0u64);
        for w in self.matrices_mut() {
            let Some(sets) = rec.0.get(&w.name) else {
                continue;
            };
            if w.panels.is_some() || w.shape.len() != 2 {
                continue;
            }
            if let Some(p) = w.relay(sets) {
                w.panels = Some(p.into());
                w.release();
                count += 1;
                bytes += w.bytes().len() as u64;
            }
        }
        Ok((count, bytes))
    }

    /// The large tensors (embedding, head, every projection and expert), for summaries.
    pub fn matrices(&self) -> Vec<&Tensor> {
        matrices!(self, iter)
    }

    /// [`Model::matrices`], mutable.
    fn matrices_mut(&mut self) -> Vec<&mut Tensor> {
        matrices!(self, iter_mut, mut)
    }

    /// Weight bytes one decode step reads under a budget (the memory roofline): every active
    /// weight, the routed experts of one token, one embedding row.
    pub fn bytes_per_token(&self, b: &Budget) -> u64 {
        self.measure(b, true, |t| match t.per_token {
            PerToken::Row(rows) => t.bytes / rows as f64,
            _ => t.bytes,
        })
    }

    pub fn kind_pattern(&self) -> String {
        self.shape.layers.iter().map(|k| k.pattern_char()).collect()
    }
}

/// One weight's share of the parameter count: `coef` × the product of the active sizes along
/// `axes` elements of `bytes` bytes each, in `layer` (None: embedding, head, final norm).
#[derive(Clone, Debug, PartialEq)]
pub struct Term {
    pub layer: Option<usize>,
    pub axes: Vec<Axis>,
    pub coef: f64,
    pub bytes: f64,
    pub per_token: PerToken,
}

/// What one token uses of a weight.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum PerToken {
    All,
    /// A routed expert's: `k` of the active experts.
    TopK(usize),
    /// An embedding: one of `rows` rows.
    Row(usize),
}

/// The numbers a count is evaluated in: plain sizes, or expected sizes as tensors (training).
pub trait Scalar: Sized {
    fn mul(&self, o: &Self) -> Result<Self>;
    fn add(&self, o: &Self) -> Result<Self>;
    /// self · a + b.
    fn affine(&self, a: f64, b: f64) -> Result<Self>;
}

impl Scalar for f64 {
    fn mul(&self, o: &f64) -> Result<f64> {
        Ok(self * o)
    }
    fn add(&self, o: &f64) -> Result<f64> {
        Ok(self + o)
    }
    fn affine(&self, a: f64, b: f64) -> Result<f64> {
        Ok(self * a + b)
    }
}

/// Σ weight(t) · Π size(t, axis) over `terms` (those of weight 0 skipped), from `zero`.
pub fn count<T: Scalar>(
    terms: &[Term],
    zero: T,
    size: impl Fn(&Term, Axis) -> Result<T>,
    weight: impl Fn(&Term) -> f64,
) -> Result<T> {
    let mut total = zero;
    for t in terms {
        let w = weight(t);
        if w == 0.0 {
            continue;
        }
        let mut p: Option<T> = None;
        for &a in &t.axes {
            let s = size(t, a)?;
            p = Some(match p {
                Some(p) => p.mul(&s)?,
                None => s,
            });
        }
        total = match p {
            Some(p) => total.add(&p.affine(w, 0.0)?)?,
            None => total.affine(1.0, w)?,
        };
    }
    Ok(total)
}
