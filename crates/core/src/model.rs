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
use crate::layers::mamba2::{Mamba2, MambaState};
use crate::layers::mlp::Mlp;
use crate::layers::moe::Moe;
use crate::layers::{Ffn, Observer, Scratch, Silent, Vector, buf, linear};
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

/// Largest number of tokens run through the blocks at once (llama.cpp's n_ubatch).
pub const UBATCH: usize = 512;

#[derive(Default)]
struct Work {
    h: Vec<f32>,
    xn: Vec<f32>,
    y: Vec<f32>,
    sel: Vec<f32>,
    logits: Vec<f32>,
    s: Scratch,
}

/// The state of one sequence: position, KV caches, Mamba states (all in the parent's layout, so
/// the sequence can continue under any budget) and the scratch space of its forward passes.
pub struct Cache {
    pub pos: usize,
    cap: usize,
    kv: Vec<KvCache>,
    mamba: Vec<MambaState>,
    ws: Work,
}

/// Saved recurrent state for rolling a sequence back (speculative decoding): attention needs only
/// the position, Mamba layers need their states.
#[derive(Clone)]
pub struct Snapshot {
    pos: usize,
    mamba: Vec<MambaState>,
}

impl Cache {
    /// A cache for `cap` tokens; panics when the memory cannot be had. Sizes a user chooses go
    /// through [`Cache::try_new`].
    pub fn new(model: &Model, cap: usize) -> Cache {
        Cache::try_new(model, cap).unwrap_or_else(|e| panic!("{e}"))
    }

    /// A cache for `cap` tokens, or an error naming the context and its bytes when they cannot
    /// be allocated.
    pub fn try_new(model: &Model, cap: usize) -> Result<Cache> {
        let max_heads = model
            .blocks
            .iter()
            .filter_map(|b| match &b.mixer {
                Mixer::Attention(a) => Some(a.heads),
                _ => None,
            })
            .fold(1, usize::max);
        // Scores of one query row over the context, plus router scratch.
        let scratch = max_heads
            .checked_mul(cap)
            .and_then(|x| x.checked_add(4 * model.shape.experts.max(1) + 1024));
        let bytes = scratch
            .and_then(|s| {
                model.blocks.iter().try_fold(s, |n, b| match &b.mixer {
                    Mixer::Attention(a) => a
                        .kv_heads
                        .checked_mul(a.head_dim)?
                        .checked_mul(cap)?
                        .checked_mul(2)?
                        .checked_add(n),
                    _ => Some(n),
                })
            })
            .and_then(|n| n.checked_mul(4));
        let fail = || {
            Error::Input(match bytes {
                Some(b) => format!(
                    "a context of {cap} tokens needs {b} bytes ({:.1} GiB) of cache, which could not be allocated",
                    b as f64 / (1u64 << 30) as f64
                ),
                None => format!(
                    "a context of {cap} tokens needs more cache memory than this machine can address"
                ),
            })
        };
        bytes.ok_or_else(fail)?;
        let mut kv = vec![];
        let mut mamba = vec![];
        for b in &model.blocks {
            match &b.mixer {
                Mixer::Attention(a) => {
                    kv.push(KvCache::try_new(a.kv_heads, a.head_dim, cap).ok_or_else(fail)?)
                }
                Mixer::Mamba(m) => mamba.push(m.new_state()),
                _ => {}
            }
        }
        let mut ws = Work::default();
        // Pre-size what grows with the position so decode never reallocates.
        ws.s.e
            .try_reserve(scratch.ok_or_else(fail)?)
            .map_err(|_| fail())?;
        Ok(Cache {
            pos: 0,
            cap,
            kv,
            mamba,
            ws,
        })
    }
    pub fn capacity(&self) -> usize {
        self.cap
    }
    /// Back to an empty sequence.
    pub fn reset(&mut self) {
        self.pos = 0;
        for m in &mut self.mamba {
            m.conv.fill(0.0);
            m.ssm.fill(0.0);
        }
    }
    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            pos: self.pos,
            mamba: self.mamba.clone(),
        }
    }
    pub fn restore(&mut self, s: &Snapshot) {
        self.pos = s.pos;
        for (m, sm) in self.mamba.iter_mut().zip(&s.mamba) {
            m.conv.copy_from_slice(&sm.conv);
            m.ssm.copy_from_slice(&sm.ssm);
        }
    }
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
        if let Some(&bad) = tokens.iter().find(|&&t| t as usize >= self.vocab) {
            return Err(Error::Input(format!(
                "token id {bad} is outside the vocabulary (size {})",
                self.vocab
            )));
        }
        if cache.pos + tokens.len() > cache.cap {
            return Err(Error::Input(format!(
                "{} tokens at position {} exceed the context of {} tokens",
                tokens.len(),
                cache.pos,
                cache.cap
            )));
        }
        let hd = budget.hidden;
        let v = self.vocab;
        let n_out = match want {
            Logits::None => 0,
            Logits::Last => tokens.len().min(1),
            Logits::All => tokens.len(),
            Logits::From(n) => tokens.len().saturating_sub(n),
        };
        let mut ws = std::mem::take(&mut cache.ws);
        buf(&mut ws.logits, n_out * v);
        let mut produced = 0;
        let mut start = 0;
        while start < tokens.len() {
            let chunk = &tokens[start..(start + UBATCH).min(tokens.len())];
            let t = chunk.len();
            let h = buf(&mut ws.h, t * hd);
            for (i, &tok) in chunk.iter().enumerate() {
                dequant_row(
                    self.embed.dtype,
                    self.embed.row(tok as usize),
                    0,
                    &mut h[i * hd..(i + 1) * hd],
                );
            }
            for blk in &self.blocks {
                let lb = budget.layer(blk.layer);
                if !lb.keep {
                    continue;
                }
                let xn = buf(&mut ws.xn, t * hd);
                for i in 0..t {
                    rmsnorm(
                        &h[i * hd..(i + 1) * hd],
                        &blk.norm[..hd],
                        self.eps,
                        &mut xn[i * hd..(i + 1) * hd],
                    );
                }
                if obs.enabled() {
                    obs.norm(blk.layer, xn, hd);
                }
                let y = buf(&mut ws.y, t * hd);
                let l = blk.layer;
                match &blk.mixer {
                    Mixer::Attention(a) => a.forward(
                        lb,
                        hd,
                        xn,
                        y,
                        &mut cache.kv[blk.slot],
                        cache.pos,
                        &mut ws.s,
                        obs,
                        l,
                    ),
                    Mixer::Mamba(m) => {
                        m.forward(lb, hd, xn, y, &mut cache.mamba[blk.slot], &mut ws.s, obs, l)
                    }
                    Mixer::Mlp(m) => m.forward(
                        lb.size(Axis::Ffn),
                        hd,
                        xn,
                        y,
                        &mut ws.s,
                        obs,
                        (l, Ffn::Dense),
                    ),
                    Mixer::Moe(m) => m.forward(lb, hd, xn, y, &mut ws.s, obs, l),
                }
                for (hv, yv) in h.iter_mut().zip(y.iter()) {
                    *hv += yv;
                }
            }
            cache.pos += t;
            // Logits for the wanted positions of this chunk.
            let rows: Range<usize> = match want {
                Logits::None => 0..0,
                Logits::Last => {
                    if start + t == tokens.len() {
                        t - 1..t
                    } else {
                        0..0
                    }
                }
                Logits::All => 0..t,
                Logits::From(n) => n.saturating_sub(start).min(t)..t,
            };
            if !rows.is_empty() {
                let m = rows.len();
                let sel = buf(&mut ws.sel, m * hd);
                for (j, i) in rows.clone().enumerate() {
                    rmsnorm(
                        &h[i * hd..(i + 1) * hd],
                        &self.norm_f[..hd],
                        self.eps,
                        &mut sel[j * hd..(j + 1) * hd],
                    );
                }
                let head = self.lm_head.as_ref().unwrap_or(&self.embed);
                let out = &mut ws.logits[produced * v..(produced + m) * v];
                linear(head, &[0..v], &[0..hd], sel, out);
                produced += m;
            }
            start += t;
        }
        cache.ws = ws;
        Ok(&cache.ws.logits[..n_out * v])
    }

    /// The large tensors (embedding, head, every projection and expert), for summaries.
    pub fn matrices(&self) -> Vec<&Tensor> {
        let mut v = vec![&self.embed];
        if let Some(h) = &self.lm_head {
            v.push(h);
        }
        for b in &self.blocks {
            match &b.mixer {
                Mixer::Attention(a) => v.extend([&a.q, &a.k, &a.v, &a.o]),
                Mixer::Mamba(m) => v.extend([&m.in_proj, &m.out_proj]),
                Mixer::Mlp(m) => {
                    v.extend([&m.up, &m.down]);
                    v.extend(m.gate.iter());
                }
                Mixer::Moe(m) => {
                    v.extend(m.up.iter().chain(m.down.iter()));
                    if let Some(s) = &m.shared {
                        v.extend([&s.up, &s.down]);
                    }
                }
            }
        }
        v
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
