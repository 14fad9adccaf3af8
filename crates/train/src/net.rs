//! The student of nested training (method doc §4): the engine's block list over trainable copies
//! of its weights, run as a differentiable candle graph. Every elastic axis is a prefix *mask*
//! over the parent's channels instead of a slice; norms divide by the (soft) count of active
//! channels (§3.2), so a hard mask gives the sliced network's numbers, which
//! `tests/train.rs` checks against the engine's `Model::forward` for every layer type.

use super::masks::{LayerMasks, Masks};
use crate::error::{Error, Result, candle};
use candle_core::backprop::GradStore;
use candle_core::{D, DType as CD, Device, Tensor as CT, Var};
use elastica_core::kernels::quant::ToF32;
use elastica_core::layers::Vector;
use elastica_core::layers::attention::Attention;
use elastica_core::layers::mamba2::Mamba2;
use elastica_core::layers::mlp::Mlp;
use elastica_core::layers::moe::Moe;
use elastica_core::model::{Format, Mixer, Model, Scalar, Term, count};
use elastica_core::models::Raw;
use elastica_core::shape::Axis;

/// How a trained value is written back to its source tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Export {
    /// As it is.
    Same,
    /// The parameter is A_log; the source stores A = −exp(A_log) (GGUF `ssm_a`).
    NegExp,
}

/// One weight of the student. `source` names the checkpoint tensor it came from (None: frozen,
/// e.g. MoE correction biases, which are statistics, not weights).
pub struct Param {
    pub name: String,
    pub source: Option<String>,
    pub export: Export,
    pub var: Var,
}

impl Param {
    pub fn trainable(&self) -> bool {
        self.source.is_some()
    }
}

// Indices into `Net::params` of one block's weights; the block's fixed sizes and routing
// hyper-parameters are read from the engine block itself.
struct NMlp {
    up: usize,
    gate: Option<usize>,
    down: usize,
    /// up, gate, down.
    bias: [Option<usize>; 3],
}

struct NAttn {
    /// q, k, v, o.
    w: [usize; 4],
    bias: [Option<usize>; 4],
}

struct NMamba {
    in_proj: usize,
    out_proj: usize,
    conv_w: usize,
    conv_b: usize,
    dt_bias: usize,
    a_log: usize,
    d: usize,
    norm: usize,
}

struct NMoe {
    router: usize,
    up: Vec<usize>,
    down: Vec<usize>,
    shared: Option<NMlp>,
}

enum NMixer {
    Attn(NAttn),
    Mamba(NMamba),
    Mlp(NMlp),
    Moe(NMoe),
}

struct NBlock {
    norm: usize,
    mixer: NMixer,
}

pub struct Net<'m> {
    pub params: Vec<Param>,
    /// The engine model the weights were copied from: sizes and hyper-parameters.
    pub model: &'m Model,
    pub dtype: CD,
    /// The model's parameter count ([`Model::terms`]).
    terms: Vec<Term>,
    embed: usize,
    lm_head: Option<usize>,
    norm_f: usize,
    /// One per block of the model.
    blocks: Vec<NBlock>,
    /// Quantization-aware distillation: matrices run as their FP8/NVFP4 round trip.
    fake: Option<Fake>,
}

/// Fake quantization (method doc §6, QAD): each listed matrix's forward uses the values its
/// FP8/NVFP4 encoding under a per-tensor scale from its current absolute maximum (shared within
/// a scale group, as `quantize` shares it among routed experts) reads back; gradients pass
/// straight through to the full-precision weights.
struct Fake {
    to: elastica_core::tensor::DType,
    /// (parameter, scale group).
    params: Vec<(usize, usize)>,
    groups: usize,
    /// The round-tripped values of each listed parameter, refreshed after every update.
    q: std::collections::HashMap<usize, CT>,
}

pub fn dev() -> Device {
    Device::Cpu
}

struct Builder<'a> {
    params: Vec<Param>,
    dtype: CD,
    raw: &'a Raw,
}

impl Builder<'_> {
    /// A parameter named after the checkpoint tensor `src` it came from and exports to (`x[e]`
    /// for one expert of a stack); values the loader made up are named `label` and stay frozen.
    fn add(
        &mut self,
        src: &str,
        label: &str,
        export: Export,
        v: &[f32],
        shape: &[usize],
    ) -> Result<usize> {
        let t = CT::from_slice(v, shape, &dev())?.to_dtype(self.dtype)?;
        let has = self.raw.tensors().has(src) || src.ends_with(']');
        self.params.push(Param {
            name: (if has { src } else { label }).to_string(),
            source: has.then(|| src.to_string()),
            export,
            var: Var::from_tensor(&t)?,
        });
        Ok(self.params.len() - 1)
    }
    fn mat(&mut self, t: &elastica_core::tensor::Tensor) -> Result<usize> {
        let shape = [t.rows(), t.cols()];
        self.add(&t.name, &t.name, Export::Same, &t.to_f32(), &shape)
    }
    fn vec(&mut self, v: &Vector, label: &str) -> Result<usize> {
        self.add(&v.name, label, Export::Same, v, &[v.len()])
    }
    fn opt(&mut self, v: &Option<Vector>, label: &str) -> Result<Option<usize>> {
        v.as_ref().map(|v| self.vec(v, label)).transpose()
    }
    fn mlp(&mut self, m: &Mlp, l: usize) -> Result<NMlp> {
        let mut bias = [None; 3];
        for (i, v) in [&m.up_bias, &m.gate_bias, &m.down_bias]
            .into_iter()
            .enumerate()
        {
            bias[i] = self.opt(v, &format!("{l}.mlp.bias{i}"))?;
        }
        Ok(NMlp {
            up: self.mat(&m.up)?,
            gate: m.gate.as_ref().map(|g| self.mat(g)).transpose()?,
            down: self.mat(&m.down)?,
            bias,
        })
    }
}

impl<'m> Net<'m> {
    /// Trainable copies of every weight of `m` (dequantized), in `dtype` (F32 to train, F64 for
    /// gradient checks). `raw` is the checkpoint `m` came from, for the export names.
    pub fn from_model(m: &'m Model, raw: &Raw, dtype: CD) -> Result<Net<'m>> {
        let mut b = Builder {
            params: vec![],
            dtype,
            raw,
        };
        let embed = b.mat(&m.embed)?;
        let lm_head = m.lm_head.as_ref().map(|h| b.mat(h)).transpose()?;
        let norm_f = b.vec(&m.norm_f, "norm_f")?;
        let mut blocks = vec![];
        for blk in &m.blocks {
            let l = blk.layer;
            let norm = b.vec(&blk.norm, &format!("{l}.norm"))?;
            let mixer = match &blk.mixer {
                Mixer::Attention(a) => {
                    let mut bias = [None; 4];
                    for (i, v) in [&a.q_bias, &a.k_bias, &a.v_bias, &a.o_bias]
                        .into_iter()
                        .enumerate()
                    {
                        bias[i] = b.opt(v, &format!("{l}.attn.bias{i}"))?;
                    }
                    let w = [&a.q, &a.k, &a.v, &a.o].map(|t| b.mat(t));
                    let [q, k, v, o] = w;
                    NMixer::Attn(NAttn {
                        w: [q?, k?, v?, o?],
                        bias,
                    })
                }
                Mixer::Mamba(x) => {
                    // GGUF stores A = −exp(A_log), HF A_log; the parameter is A_log.
                    let export = match m.meta.format {
                        Format::Gguf => Export::NegExp,
                        Format::Hf => Export::Same,
                    };
                    let a_log: Vec<f32> = x.a.iter().map(|a| (-a).ln()).collect();
                    let label = |s: &str| format!("{l}.{s}");
                    NMixer::Mamba(NMamba {
                        in_proj: b.mat(&x.in_proj)?,
                        out_proj: b.mat(&x.out_proj)?,
                        conv_w: b.add(
                            &x.conv_w.name,
                            &label("conv_w"),
                            Export::Same,
                            &x.conv_w,
                            &[x.conv_dim(), x.conv_k],
                        )?,
                        conv_b: b.vec(&x.conv_b, &label("conv_b"))?,
                        dt_bias: b.vec(&x.dt_bias, &label("dt_bias"))?,
                        a_log: b.add(&x.a.name, &label("a_log"), export, &a_log, &[a_log.len()])?,
                        d: b.vec(&x.d, &label("d"))?,
                        norm: b.vec(&x.norm, &label("mixer_norm"))?,
                    })
                }
                Mixer::Mlp(x) => NMixer::Mlp(b.mlp(x, l)?),
                Mixer::Moe(x) => NMixer::Moe(NMoe {
                    router: b.add(
                        &x.router.name,
                        &format!("{l}.router"),
                        Export::Same,
                        &x.router,
                        &[x.experts, x.hidden],
                    )?,
                    up: x.up.iter().map(|t| b.mat(t)).collect::<Result<_>>()?,
                    down: x.down.iter().map(|t| b.mat(t)).collect::<Result<_>>()?,
                    shared: x.shared.as_ref().map(|s| b.mlp(s, l)).transpose()?,
                }),
            };
            blocks.push(NBlock { norm, mixer });
        }
        Ok(Net {
            params: b.params,
            model: m,
            dtype,
            terms: m.terms(),
            embed,
            lm_head,
            norm_f,
            blocks,
            fake: None,
        })
    }

    /// The total parameter count of the model's kept layers (the one count of `info` and the
    /// solver, [`Model::terms`]) in sizes `size(axis, layer)` given as scalar tensors, so the
    /// router's expected sizes give the expected count.
    pub fn param_count(
        &self,
        size: &dyn Fn(Axis, usize) -> Result<CT>,
        keep: &dyn Fn(usize) -> bool,
    ) -> Result<CT> {
        let zero = Expected(CT::zeros((), self.dtype, &dev())?);
        let n = count(
            &self.terms,
            zero,
            |t, a| Ok(Expected(size(a, t.layer.unwrap_or(0))?)),
            |t| {
                if t.layer.is_none_or(keep) {
                    t.coef
                } else {
                    0.0
                }
            },
        )?;
        Ok(n.0)
    }

    fn p(&self, i: usize) -> &CT {
        self.params[i].var.as_tensor()
    }

    /// A matrix as the forward uses it: its fake-quantized values under QAD (straight-through),
    /// else itself.
    fn w(&self, i: usize) -> Result<CT> {
        let p = self.p(i);
        Ok(match self.fake.as_ref().and_then(|f| f.q.get(&i)) {
            Some(q) => (p + (q - p)?.detach())?,
            None => p.clone(),
        })
    }

    /// Turns on fake quantization to `to` of the matrices whose source tensors are listed, with
    /// their scale groups (`names[i].1`); a stacked expert's parameter (`NAME[e]`) counts as
    /// NAME. Errors name a source that matches no parameter.
    pub fn set_fake(
        &mut self,
        to: elastica_core::tensor::DType,
        names: &[(String, String)],
    ) -> Result<()> {
        let mut group_ids: Vec<String> = vec![];
        let mut params = vec![];
        for (name, group) in names {
            let gi = match group_ids.iter().position(|g| g == group) {
                Some(i) => i,
                None => {
                    group_ids.push(group.clone());
                    group_ids.len() - 1
                }
            };
            let before = params.len();
            for (i, p) in self.params.iter().enumerate() {
                let Some(src) = &p.source else { continue };
                let base = src
                    .strip_suffix(']')
                    .and_then(|s| s.rsplit_once('['))
                    .map_or(src.as_str(), |x| x.0);
                if base == name {
                    params.push((i, gi));
                }
            }
            if params.len() == before {
                return Err(Error::Train(format!(
                    "fake quantization: no trained parameter comes from {name}"
                )));
            }
        }
        self.fake = Some(Fake {
            to,
            params,
            groups: group_ids.len(),
            q: Default::default(),
        });
        self.refresh_fake()
    }

    /// Recomputes the fake-quantized values from the current weights.
    pub fn refresh_fake(&mut self) -> Result<()> {
        let Some(f) = &self.fake else { return Ok(()) };
        let mut vals = Vec::with_capacity(f.params.len());
        let mut amax = vec![0f32; f.groups];
        for &(i, g) in &f.params {
            let v: Vec<f32> = self.p(i).to_dtype(CD::F32)?.flatten_all()?.to_vec1()?;
            amax[g] = v.iter().fold(amax[g], |m, x| m.max(x.abs()));
            vals.push(v);
        }
        let to = f.to;
        let mut q = std::collections::HashMap::new();
        for (&(i, g), v) in f.params.iter().zip(vals) {
            let scale = elastica_core::kernels::fp::scale_for(to, amax[g]);
            let r = elastica_core::kernels::fp::round_trip(to, &v, scale);
            let t = CT::from_vec(r, self.p(i).shape(), &dev())?.to_dtype(self.dtype)?;
            q.insert(i, t);
        }
        self.fake.as_mut().unwrap().q = q;
        Ok(())
    }

    /// Logits [B·T, vocab] of `b` sequences of `t` tokens (row-major in `tokens`) under `masks`,
    /// as one differentiable graph.
    pub fn forward(&self, tokens: &[u32], b: usize, t: usize, masks: &Masks) -> Result<CT> {
        Ok(self.pass(tokens, b, t, masks, false)?.0)
    }

    /// The forward of training: the logits (outside the graph) and a [`Tape`] cut at every block,
    /// whose backward frees each block's activations once its gradient has passed through.
    pub fn tape(&self, tokens: &[u32], b: usize, t: usize, masks: &Masks) -> Result<(CT, Tape)> {
        let (logits, tape) = self.pass(tokens, b, t, masks, true)?;
        let tape = tape.ok_or_else(|| Error::Train("a cut forward recorded no tape".into()))?;
        Ok((logits, tape))
    }

    /// The one forward: with `cut`, each block's input is a fresh leaf and the head runs outside
    /// the graph (the tape's backward applies it by hand).
    fn pass(
        &self,
        tokens: &[u32],
        b: usize,
        t: usize,
        masks: &Masks,
        cut: bool,
    ) -> Result<(CT, Option<Tape>)> {
        if tokens.len() != b * t {
            return Err(Error::Train(format!(
                "{} tokens for {b} sequences of {t}",
                tokens.len()
            )));
        }
        let ids = CT::from_vec(tokens.to_vec(), tokens.len(), &dev())?;
        let mh = &masks.hidden;
        let count = mh.sum_all()?;
        let embed = self
            .p(self.embed)
            .index_select(&ids, 0)?
            .broadcast_mul(mh)?;
        let leaf = |x: &CT| -> Result<Var> { Ok(Var::from_tensor(&x.detach())?) };
        let mut blocks = vec![];
        let mut x = embed.clone();
        let eps = self.model.eps;
        for (blk, nb) in self.model.blocks.iter().zip(&self.blocks) {
            let lm = &masks.layers[blk.layer];
            if !lm.keep {
                continue;
            }
            let (cut_at, input) = if cut {
                let v = leaf(&x)?;
                let t = v.as_tensor().clone();
                (Some(v), t)
            } else {
                (None, x)
            };
            let xn = rmsnorm(&input, self.p(nb.norm), mh, &count, eps)?;
            let y = match (&blk.mixer, &nb.mixer) {
                (Mixer::Attention(a), NMixer::Attn(n)) => self.attention(a, n, &xn, b, t, lm)?,
                (Mixer::Mamba(m), NMixer::Mamba(n)) => self.mamba(m, n, &xn, b, t, lm)?,
                (Mixer::Mlp(_), NMixer::Mlp(n)) => self.mlp(n, &xn, lm.axes[Axis::Ffn].as_ref())?,
                (Mixer::Moe(m), NMixer::Moe(n)) => self.moe(m, n, &xn, lm)?,
                _ => unreachable!("one NBlock per block, of its kind"),
            };
            x = (input + y.broadcast_mul(mh)?)?;
            if let Some(v) = cut_at {
                blocks.push((v, x.clone()));
            }
        }
        let head_at = self.lm_head.unwrap_or(self.embed);
        let head = match self.lm_head {
            Some(h) => self.w(h)?,
            None => self.p(self.embed).clone(),
        };
        if !cut {
            let xn = rmsnorm(&x, self.p(self.norm_f), mh, &count, eps)?;
            return Ok((xn.matmul(&head.t()?)?, None));
        }
        let top = leaf(&x)?;
        let xn = rmsnorm(top.as_tensor(), self.p(self.norm_f), mh, &count, eps)?;
        let logits = xn.detach().matmul(&head.detach().t()?)?;
        let tape = Tape {
            embed,
            blocks,
            top: (top, xn),
            head: (head.detach(), self.params[head_at].var.clone()),
        };
        Ok((logits, Some(tape)))
    }

    fn linear(&self, x: &CT, w: usize, bias: Option<usize>) -> Result<CT> {
        let y = x.matmul(&self.w(w)?.t()?)?;
        Ok(match bias {
            Some(bi) => y.broadcast_add(self.p(bi))?,
            None => y,
        })
    }

    fn mlp(&self, m: &NMlp, x: &CT, mask: Option<&CT>) -> Result<CT> {
        let u = self.linear(x, m.up, m.bias[0])?;
        let h = match m.gate {
            // Llama's SwiGLU when gated, Nemotron-H's relu² otherwise (layers/mlp.rs).
            Some(g) => (u * self.linear(x, g, m.bias[1])?.silu()?)?,
            None => u.relu()?.sqr()?,
        };
        let h = match mask {
            Some(mk) => h.broadcast_mul(mk)?,
            None => h,
        };
        self.linear(&h, m.down, m.bias[2])
    }

    #[allow(clippy::too_many_arguments)]
    fn attention(
        &self,
        a: &Attention,
        n: &NAttn,
        x: &CT,
        b: usize,
        t: usize,
        lm: &LayerMasks,
    ) -> Result<CT> {
        let (nh, kv, d) = (a.heads, a.kv_heads, a.head_dim);
        let ([q, k, v, o], bias) = (n.w, n.bias);
        let split =
            |y: CT, n: usize| -> Result<CT> { Ok(y.reshape((b, t, n, d))?.transpose(1, 2)?) };
        let mut qh = split(self.linear(x, q, bias[0])?, nh)?;
        let mut kh = split(self.linear(x, k, bias[1])?, kv)?;
        let vh = split(self.linear(x, v, bias[2])?, kv)?;
        if let Some(r) = &a.rope {
            let (cos, sin) = rope_tables(&r.inv_freq, t, self.dtype)?;
            let op = || Rope {
                cos: cos.clone(),
                sin: sin.clone(),
                interleaved: r.interleaved,
            };
            qh = qh.contiguous()?.apply_op1(op())?;
            kh = kh.contiguous()?.apply_op1(op())?;
        }
        let op = CausalAttention {
            scale: 1.0 / (d as f64).sqrt(),
        };
        let mut out = qh
            .contiguous()?
            .apply_op3(&kh.contiguous()?, &vh.contiguous()?, op)?
            .transpose(1, 2)?; // [b, t, nh, d]
        if let Some(hm) = &lm.axes[Axis::Heads] {
            out = out.broadcast_mul(&hm.reshape((nh, 1))?)?;
        }
        let out = out.reshape((b * t, nh * d))?;
        self.linear(&out, o, bias[3])
    }

    #[allow(clippy::too_many_arguments)]
    fn mamba(
        &self,
        m: &Mamba2,
        ix: &NMamba,
        x: &CT,
        b: usize,
        t: usize,
        lm: &LayerMasks,
    ) -> Result<CT> {
        let (nh, p, g, n, k) = (m.heads, m.head_dim, m.groups, m.state, m.conv_k);
        let di = nh * p;
        let cd = di + 2 * g * n;
        let zx = self.linear(x, ix.in_proj, None)?; // [b·t, 2di + 2gn + nh]
        let z = zx.narrow(1, 0, di)?;
        let xbc = zx.narrow(1, di, cd)?.reshape((b, t, cd))?;
        let dt = zx.narrow(1, di + cd, nh)?;
        // Causal depthwise conv (spec §2.3.2): y_t = b + Σ_q w_q · x_{t−K+1+q}.
        let xp = xbc.pad_with_zeros(1, k - 1, 0)?;
        let w = self.p(ix.conv_w);
        let mut acc = xp
            .narrow(1, 0, t)?
            .broadcast_mul(&w.narrow(1, 0, 1)?.reshape(cd)?)?;
        for q in 1..k {
            acc = (acc
                + xp.narrow(1, q, t)?
                    .broadcast_mul(&w.narrow(1, q, 1)?.reshape(cd)?)?)?;
        }
        acc = acc.broadcast_add(self.p(ix.conv_b))?;
        let xbc = acc.silu()?.reshape((b * t, cd))?;
        let mut xs = xbc.narrow(1, 0, di)?;
        let inner = lm.inner()?;
        if let Some(im) = &inner {
            xs = xs.broadcast_mul(im)?;
        }
        let bm = xbc.narrow(1, di, g * n)?;
        let cm = xbc.narrow(1, di + g * n, g * n)?;
        let dt = softplus(&dt.broadcast_add(self.p(ix.dt_bias))?)?
            .clamp(m.dt_min as f64, (m.dt_max as f64).min(1e30))?;
        let a = self.p(ix.a_log).exp()?.neg()?;
        let y = ssd(&xs, &dt, &a, &bm, &cm, b, t, nh, p, g, n, m.chunk)?; // [b·t, di]
        let y = (y + xs.broadcast_mul(
            &self
                .p(ix.d)
                .reshape((nh, 1))?
                .broadcast_as((nh, p))?
                .reshape(di)?,
        )?)?;
        // Gated grouped RMSNorm over the active channels of each group (spec §2.3.8, doc §3.2).
        let y = (y * z.silu()?)?;
        let gs = di / g;
        let yg = y.reshape((b * t, g, gs))?;
        let (num, cnt) = match &inner {
            Some(im) => {
                let img = im.reshape((g, gs))?;
                (
                    yg.sqr()?.broadcast_mul(&img)?.sum_keepdim(2)?,
                    img.sum_keepdim(1)?,
                )
            }
            None => (
                yg.sqr()?.sum_keepdim(2)?,
                CT::full(gs as f64, (g, 1), &dev())?.to_dtype(self.dtype)?,
            ),
        };
        let ms = num.broadcast_div(&cnt)?;
        let yn = yg
            .broadcast_mul(&(ms + m.eps as f64)?.sqrt()?.recip()?)?
            .reshape((b * t, di))?;
        let mut wn = self.p(ix.norm).clone();
        if let Some(im) = &inner {
            wn = (wn * im)?;
        }
        let yn = yn.broadcast_mul(&wn)?;
        self.linear(&yn, ix.out_proj, None)
    }

    fn moe(&self, m: &Moe, ix: &NMoe, x: &CT, lm: &LayerMasks) -> Result<CT> {
        let (up, down) = (&ix.up, &ix.down);
        let e = up.len();
        let logits = x.matmul(&self.p(ix.router).t()?)?;
        let scores = logits.neg()?.exp()?.affine(1.0, 1.0)?.recip()?; // sigmoid
        // Expert choice: the engine's (layers/moe.rs), not differentiable, on the host.
        let sv: Vec<f32> = scores.to_dtype(CD::F32)?.flatten_all()?.to_vec1()?;
        let k = m.topk.min(lm.expert_on.iter().filter(|&&o| o).count());
        let nt = sv.len() / e;
        let mut lists: Vec<Vec<(u32, u32)>> = vec![vec![]; e]; // per expert: (token, slot)
        let mut ids = vec![0; k];
        for (ti, row) in sv.chunks(e).enumerate() {
            let mut choice: Vec<f32> = (row.iter().zip(m.bias.iter()).zip(&lm.expert_on))
                .map(|((s, b), &on)| if on { s + b } else { f32::NEG_INFINITY })
                .collect();
            let got = m.select(&mut choice, k, &mut ids);
            for (slot, &j) in ids[..got].iter().enumerate() {
                lists[j].push((ti as u32, slot as u32));
            }
        }
        // Routing weights of the chosen experts, differentiable through the scores.
        let mut idx = vec![0u32; nt * k];
        let mut valid = vec![0f32; nt * k];
        for (j, l) in lists.iter().enumerate() {
            for &(ti, s) in l {
                idx[ti as usize * k + s as usize] = j as u32;
                valid[ti as usize * k + s as usize] = 1.0;
            }
        }
        let idx_t = CT::from_vec(idx, (nt, k), &dev())?;
        let valid = CT::from_vec(valid, (nt, k), &dev())?.to_dtype(self.dtype)?;
        let mut w = (scores.gather(&idx_t, 1)? * &valid)?;
        if m.norm_topk {
            w = w.broadcast_div(&(w.sum_keepdim(1)? + 1e-20)?)?;
        }
        w = (w * m.scale as f64)?;
        if let Some(em) = &lm.axes[Axis::Experts] {
            w = (w * em
                .index_select(&idx_t.flatten_all()?, 0)?
                .reshape((nt, k))?)?;
        }
        let wf = w.flatten_all()?;
        let mut out = x.zeros_like()?;
        for (j, l) in lists.iter().enumerate() {
            if l.is_empty() {
                continue;
            }
            let toks = CT::from_vec(l.iter().map(|p| p.0).collect::<Vec<u32>>(), l.len(), &dev())?;
            let pos = CT::from_vec(
                l.iter().map(|p| p.0 * k as u32 + p.1).collect::<Vec<u32>>(),
                l.len(),
                &dev(),
            )?;
            let xs = x.index_select(&toks, 0)?;
            let mut h = xs.matmul(&self.w(up[j])?.t()?)?.relu()?.sqr()?;
            if let Some(fm) = &lm.axes[Axis::MoeFfn] {
                h = h.broadcast_mul(fm)?;
            }
            let y = h.matmul(&self.w(down[j])?.t()?)?;
            let y = y.broadcast_mul(&wf.index_select(&pos, 0)?.unsqueeze(1)?)?;
            out = out.index_add(&toks, &y, 0)?;
        }
        if let Some(s) = &ix.shared {
            out = (out + self.mlp(s, x, lm.axes[Axis::SharedFfn].as_ref())?)?;
        }
        Ok(out)
    }
}

/// A training forward cut at every block: each block's graph starts from a leaf copy of its
/// input, so [`Tape::backward`] runs one block at a time and drops each block's activations (and
/// the gradients candle forms for its constant masks) as soon as the gradient has passed through.
/// Peak memory is the forward's activations plus one block's backward, not a whole-graph backward.
pub struct Tape {
    /// The masked embedding lookup, with its graph: the first block's input.
    embed: CT,
    /// Per kept block: its input leaf and its output (input + masked mixer output).
    blocks: Vec<(Var, CT)>,
    /// The final norm's input leaf and output.
    top: (Var, CT),
    /// The LM head as the forward applied it, and the parameter its gradient goes to (straight
    /// through fake quantization).
    head: (CT, Var),
}

impl Tape {
    /// Gradients of Σ logits ⊙ `g` (+ the scalar `extra`, e.g. the budget loss, through its own
    /// graph) with respect to `vars`: the same numbers as one backward of the whole graph, summed
    /// block by block.
    pub fn backward(self, g: &CT, extra: Option<&CT>, vars: &[Var]) -> Result<GradStore> {
        let mut acc = GradStore::default();
        let mut keep = |store: &GradStore| -> Result<()> {
            for v in vars {
                let Some(gv) = store.get(v.as_tensor()) else {
                    continue;
                };
                // A stored gradient keeps the graph it was computed through (candle detaches only
                // what it pops); detached, it holds no block's activations.
                let gv = gv.detach();
                let sum = match acc.get(v.as_tensor()) {
                    Some(a) => (a + gv)?,
                    None => gv,
                };
                acc.insert(v.as_tensor(), sum);
            }
            Ok(())
        };
        let Tape {
            embed,
            blocks,
            top: (leaf, xn),
            head: (w, wv),
        } = self;
        // logits = xn · Wᵀ: ∂xn = g · W, ∂W = gᵀ · xn.
        let gxn = g.matmul(&w)?;
        let mut head = GradStore::default();
        head.insert(wv.as_tensor(), g.t()?.matmul(&xn.detach())?);
        keep(&head)?;
        drop(head);
        let step = |out: &CT, grad: &CT, leaf: Option<&Var>| -> Result<(GradStore, Option<CT>)> {
            let store = (out * grad)?.sum_all()?.backward()?;
            let gin = leaf.and_then(|l| store.get(l.as_tensor()).map(CT::detach));
            Ok((store, gin))
        };
        let (store, gin) = step(&xn, &gxn, Some(&leaf))?;
        keep(&store)?;
        drop((store, xn, gxn));
        let mut gx =
            gin.ok_or_else(|| Error::Train("no gradient reached the final norm".into()))?;
        for (leaf, out) in blocks.into_iter().rev() {
            let (store, gin) = step(&out, &gx, Some(&leaf))?;
            keep(&store)?;
            // The residual path always carries the gradient to the block's input.
            gx = gin.ok_or_else(|| Error::Train("no gradient reached a block's input".into()))?;
        }
        let (store, _) = step(&embed, &gx, None)?;
        keep(&store)?;
        if let Some(e) = extra {
            keep(&e.backward()?)?;
        }
        Ok(acc)
    }
}

/// Causal softmax attention as one differentiable op: q [b, heads, t, d] over k, v
/// [b, kv_heads, t, d] (head h reads KV head h / (heads / kv_heads), spec §2.2). The graph keeps
/// q, k, v and the output only; the backward recomputes the probabilities (as flash attention
/// does) instead of holding the [b, heads, t, t] scores and their softmax chain per layer.
struct CausalAttention {
    scale: f64,
}

impl CausalAttention {
    /// Softmax probabilities [b, heads, t, t] and the KV heads expanded to the query heads.
    fn probs(&self, q: &CT, k: &CT, v: &CT) -> candle_core::Result<(CT, CT, CT)> {
        let (b, nh, t, d) = q.dims4()?;
        let kv = k.dim(1)?;
        let expand = |z: &CT| {
            z.unsqueeze(2)?
                .broadcast_as((b, kv, nh / kv, t, d))?
                .reshape((b, nh, t, d))
        };
        let (kx, vx) = (expand(k)?, expand(v)?);
        let s = (bmm(q, &kx.transpose(2, 3)?).map_err(to_candle)? * self.scale)?;
        let s = s.broadcast_add(&causal_bias(t, q.dtype()).map_err(to_candle)?)?;
        Ok((softmax_last(&s).map_err(to_candle)?, kx, vx))
    }

    /// Sums a gradient over the query heads of each KV head: [b, heads, t, d] → [b, kv, t, d].
    fn group_sum(g: &CT, kv: usize) -> candle_core::Result<CT> {
        let (b, nh, t, d) = g.dims4()?;
        g.reshape((b, kv, nh / kv, t, d))?.sum(2)
    }
}

fn to_candle(e: Error) -> candle_core::Error {
    candle_core::Error::Msg(e.to_string())
}

/// A tensor (outside any graph) copied from a contiguous CPU operand of a custom op.
fn operand(s: &candle_core::CpuStorage, l: &candle_core::Layout) -> candle_core::Result<CT> {
    let Some((a, z)) = l.contiguous_offsets() else {
        candle_core::bail!("custom ops want contiguous operands")
    };
    match s {
        candle_core::CpuStorage::F32(v) => CT::from_slice(&v[a..z], l.shape(), &dev()),
        candle_core::CpuStorage::F64(v) => CT::from_slice(&v[a..z], l.shape(), &dev()),
        _ => candle_core::bail!("custom ops run in f32 or f64"),
    }
}

impl candle_core::CustomOp3 for CausalAttention {
    fn name(&self) -> &'static str {
        "causal-attention"
    }

    fn cpu_fwd(
        &self,
        s1: &candle_core::CpuStorage,
        l1: &candle_core::Layout,
        s2: &candle_core::CpuStorage,
        l2: &candle_core::Layout,
        s3: &candle_core::CpuStorage,
        l3: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        let (q, k, v) = (operand(s1, l1)?, operand(s2, l2)?, operand(s3, l3)?);
        let (p, _, vx) = self.probs(&q, &k, &v)?;
        storage(bmm(&p, &vx).map_err(to_candle)?)
    }

    /// dV = Pᵀ·dO, dP = dO·Vᵀ, dS = P ⊙ (dP − rowsum(P ⊙ dP)), dQ = scale·dS·K, dK = scale·dSᵀ·Q;
    /// the KV gradients summed over each group's query heads.
    fn bwd(
        &self,
        q: &CT,
        k: &CT,
        v: &CT,
        _out: &CT,
        g: &CT,
    ) -> candle_core::Result<(Option<CT>, Option<CT>, Option<CT>)> {
        let (q, k, v, g) = (q.detach(), k.detach(), v.detach(), g.detach());
        let kv = k.dim(1)?;
        let (p, kx, vx) = self.probs(&q, &k, &v)?;
        let dv = Self::group_sum(&bmm(&p.transpose(2, 3)?, &g).map_err(to_candle)?, kv)?;
        let dp = bmm(&g, &vx.transpose(2, 3)?).map_err(to_candle)?;
        let ds = ((&dp.broadcast_sub(&(&dp * &p)?.sum_keepdim(D::Minus1)?)? * &p)? * self.scale)?;
        let dq = bmm(&ds, &kx).map_err(to_candle)?;
        let dk = Self::group_sum(&bmm(&ds.transpose(2, 3)?, &q).map_err(to_candle)?, kv)?;
        Ok((Some(dq), Some(dk), Some(dv)))
    }
}

/// Rotary embedding as one differentiable op (the graph keeps its output only, not the four
/// products and the concatenation of [`apply_rope`]); its backward rotates the gradient back.
struct Rope {
    cos: CT,
    sin: CT,
    interleaved: bool,
}

impl candle_core::CustomOp1 for Rope {
    fn name(&self) -> &'static str {
        "rope"
    }

    fn cpu_fwd(
        &self,
        s: &candle_core::CpuStorage,
        l: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        let x = operand(s, l)?;
        let y = apply_rope(&x, &self.cos, &self.sin, self.interleaved).map_err(to_candle)?;
        storage(y)
    }

    /// The rotation's transpose: by −θ.
    fn bwd(&self, _x: &CT, _y: &CT, g: &CT) -> candle_core::Result<Option<CT>> {
        let back = apply_rope(&g.detach(), &self.cos, &self.sin.neg()?, self.interleaved);
        Ok(Some(back.map_err(to_candle)?))
    }
}

/// The CPU storage of a result, for a custom op's forward.
fn storage(y: CT) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
    let y = y.contiguous()?;
    let shape = y.shape().clone();
    let (st, l) = y.storage_and_layout();
    let Some((a, z)) = l.contiguous_offsets() else {
        candle_core::bail!("a custom op's result is not contiguous")
    };
    match &*st {
        candle_core::Storage::Cpu(candle_core::CpuStorage::F32(v)) => {
            Ok((candle_core::CpuStorage::F32(v[a..z].to_vec()), shape))
        }
        candle_core::Storage::Cpu(candle_core::CpuStorage::F64(v)) => {
            Ok((candle_core::CpuStorage::F64(v[a..z].to_vec()), shape))
        }
        _ => candle_core::bail!("custom ops run in f32 or f64 on the CPU"),
    }
}

/// RMSNorm over the active channels (method doc §3.2): mean of x² over the soft count of the
/// hidden mask, weight masked so inactive channels stay exactly zero.
fn rmsnorm(x: &CT, w: &CT, mask: &CT, count: &CT, eps: f32) -> Result<CT> {
    let ms = x
        .sqr()?
        .broadcast_mul(mask)?
        .sum_keepdim(D::Minus1)?
        .broadcast_div(count)?;
    let r = (ms + eps as f64)?.sqrt()?.recip()?;
    Ok(x.broadcast_mul(&r)?.broadcast_mul(&(w * mask)?)?)
}

/// Softmax over the last axis (max subtracted, not differentiated: the result does not depend on it).
pub fn softmax_last(s: &CT) -> Result<CT> {
    let m = s.max_keepdim(D::Minus1)?.detach();
    let e = s.broadcast_sub(&m)?.exp()?;
    Ok(e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?)
}

/// torch softplus (threshold 20).
fn softplus(x: &CT) -> Result<CT> {
    let big = x.ge(20.0)?;
    let soft = (x.minimum(20.0)?.exp()? + 1.0)?.log()?;
    Ok(big.where_cond(x, &soft)?)
}

fn causal_bias(t: usize, dt: CD) -> Result<CT> {
    let v: Vec<f32> = (0..t * t)
        .map(|i| if i % t > i / t { -1e30 } else { 0.0 })
        .collect();
    Ok(CT::from_vec(v, (t, t), &dev())?.to_dtype(dt)?)
}

fn rope_tables(inv: &[f32], t: usize, dt: CD) -> Result<(CT, CT)> {
    let h = inv.len();
    let mut c = vec![0f32; t * h];
    let mut s = vec![0f32; t * h];
    for p in 0..t {
        for i in 0..h {
            // The engine's angle, in f32.
            let a = p as f32 * inv[i];
            c[p * h + i] = a.cos();
            s[p * h + i] = a.sin();
        }
    }
    Ok((
        CT::from_vec(c, (t, h), &dev())?.to_dtype(dt)?,
        CT::from_vec(s, (t, h), &dev())?.to_dtype(dt)?,
    ))
}

/// Rotary embedding of x [b, heads, t, d]: HF pairs (i, i + d/2) or GGUF pairs (2i, 2i+1).
fn apply_rope(x: &CT, cos: &CT, sin: &CT, interleaved: bool) -> Result<CT> {
    let (b, h, t, d) = x.dims4()?;
    let half = d / 2;
    if interleaved {
        let xr = x.reshape((b, h, t, half, 2))?;
        let x0 = xr.narrow(4, 0, 1)?.squeeze(4)?;
        let x1 = xr.narrow(4, 1, 1)?.squeeze(4)?;
        let o0 = (x0.broadcast_mul(cos)? - x1.broadcast_mul(sin)?)?;
        let o1 = (x1.broadcast_mul(cos)? + x0.broadcast_mul(sin)?)?;
        Ok(CT::stack(&[o0, o1], 4)?.reshape((b, h, t, d))?)
    } else {
        let x0 = x.narrow(3, 0, half)?;
        let x1 = x.narrow(3, half, half)?;
        let o0 = (x0.broadcast_mul(cos)? - x1.broadcast_mul(sin)?)?;
        let o1 = (x1.broadcast_mul(cos)? + x0.broadcast_mul(sin)?)?;
        Ok(CT::cat(&[o0, o1], 3)?)
    }
}

/// The SSD chunked scan (spec §2.3.7) as a differentiable graph: x [b·t, nh·p] (already masked),
/// dt [b·t, nh], A [nh], B/C [b·t, g·n]; returns y [b·t, nh·p] without the D skip.
#[allow(clippy::too_many_arguments)]
fn ssd(
    x: &CT,
    dt: &CT,
    a: &CT,
    bm: &CT,
    cm: &CT,
    b: usize,
    t: usize,
    nh: usize,
    p: usize,
    g: usize,
    n: usize,
    chunk: usize,
) -> Result<CT> {
    let q = chunk.clamp(1, 256).min(t);
    let nc = t.div_ceil(q);
    let tp = nc * q;
    let dtype = x.dtype();
    // Pad the time axis to whole chunks (zeros add nothing to the state; causal, so earlier outputs
    // are unchanged) and expand B/C from groups to heads.
    let pad =
        |z: CT, w: usize| -> Result<CT> { Ok(z.reshape((b, t, w))?.pad_with_zeros(1, 0, tp - t)?) };
    let hg: Vec<u32> = (0..nh).map(|h| (h / (nh / g)) as u32).collect();
    let hg = CT::from_vec(hg, nh, &dev())?;
    let per_head = |z: &CT| -> Result<CT> {
        let z = pad(z.clone(), g * n)?
            .reshape((b, tp, g, n))?
            .index_select(&hg, 2)?; // [b,tp,nh,n]
        Ok(z.reshape((b, nc, q, nh, n))?
            .permute((0, 1, 3, 2, 4))?
            .contiguous()?) // [b,nc,nh,q,n]
    };
    let bh = per_head(bm)?;
    let ch = per_head(cm)?;
    let xh = pad(x.clone(), nh * p)?
        .reshape((b, nc, q, nh, p))?
        .permute((0, 1, 3, 2, 4))?
        .contiguous()?;
    let dtc = pad(dt.clone(), nh)?
        .reshape((b, nc, q, nh))?
        .permute((0, 1, 3, 2))?
        .contiguous()?; // [b,nc,nh,q]
    let adt = dtc.broadcast_mul(&a.reshape((1, 1, nh, 1))?)?;
    let cs = adt.cumsum(3)?; // [b,nc,nh,q]
    // L[i,j] = exp(cs_i − cs_j) for j ≤ i, 0 above the diagonal.
    let tril: Vec<f32> = (0..q * q)
        .map(|i| if i % q <= i / q { 1.0 } else { 0.0 })
        .collect();
    let tril = CT::from_vec(tril, (q, q), &dev())?.to_dtype(dtype)?;
    let neg = ((&tril - 1.0)? * 1e30)?;
    let seg = cs.unsqueeze(4)?.broadcast_sub(&cs.unsqueeze(3)?)?;
    let lmat = seg.broadcast_mul(&tril)?.broadcast_add(&neg)?.exp()?;
    let cb = bmm(&ch, &bh.transpose(3, 4)?)?; // [b,nc,nh,q,q]
    let m = (cb * lmat)?.broadcast_mul(&dtc.unsqueeze(3)?)?;
    let ydiag = bmm(&m, &xh)?; // [b,nc,nh,q,p]
    let last = cs.narrow(3, q - 1, 1)?; // [b,nc,nh,1]
    let decay = last.broadcast_sub(&cs)?.exp()?; // [b,nc,nh,q]
    let wx = xh.broadcast_mul(&(decay * &dtc)?.unsqueeze(4)?)?;
    let states = bmm(&wx.transpose(3, 4)?, &bh)?; // [b,nc,nh,p,n]
    let mut s = CT::zeros((b, nh, p, n), dtype, &dev())?;
    let mut yoff = vec![];
    for c in 0..nc {
        let chc = ch.narrow(1, c, 1)?.squeeze(1)?; // [b,nh,q,n]
        let csc = cs.narrow(1, c, 1)?.squeeze(1)?; // [b,nh,q]
        let yo = bmm(&chc, &s.transpose(2, 3)?)?.broadcast_mul(&csc.exp()?.unsqueeze(3)?)?; // [b,nh,q,p]
        yoff.push(yo);
        let e = last.narrow(1, c, 1)?.squeeze(1)?.exp()?.unsqueeze(3)?; // [b,nh,1,1]
        s = (s.broadcast_mul(&e)? + states.narrow(1, c, 1)?.squeeze(1)?)?;
    }
    let yoff = CT::stack(&yoff, 1)?; // [b,nc,nh,q,p]
    let y = (ydiag + yoff)?
        .permute((0, 1, 3, 2, 4))?
        .reshape((b, tp, nh * p))?;
    Ok(y.narrow(1, 0, t)?.reshape((b * t, nh * p))?)
}

/// Batched matmul on contiguous operands (candle's CPU kernel needs them).
/// Batch dimensions are flattened to one (candle's kernel wants rank 3).
fn bmm(a: &CT, b: &CT) -> Result<CT> {
    let (ad, bd) = (a.dims().to_vec(), b.dims().to_vec());
    let r = ad.len();
    if r <= 3 {
        return Ok(a.contiguous()?.matmul(&b.contiguous()?)?);
    }
    let batch: usize = ad[..r - 2].iter().product();
    let (m, k, n) = (ad[r - 2], ad[r - 1], bd[r - 1]);
    let y = a
        .contiguous()?
        .reshape((batch, m, k))?
        .matmul(&b.contiguous()?.reshape((batch, k, n))?)?;
    let mut od = ad[..r - 2].to_vec();
    od.extend([m, n]);
    Ok(y.reshape(od)?)
}

/// Expected sizes, as the numbers of the shared parameter count.
struct Expected(CT);

impl Scalar for Expected {
    fn mul(&self, o: &Self) -> elastica_core::Result<Self> {
        (&self.0 * &o.0).map(Expected).map_err(candle)
    }
    fn add(&self, o: &Self) -> elastica_core::Result<Self> {
        (&self.0 + &o.0).map(Expected).map_err(candle)
    }
    fn affine(&self, a: f64, b: f64) -> elastica_core::Result<Self> {
        self.0.affine(a, b).map(Expected).map_err(candle)
    }
}
