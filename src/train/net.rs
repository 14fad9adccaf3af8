//! The student of nested training (method doc §4): the engine's block list over trainable copies
//! of its weights, run as a differentiable candle graph. Every elastic axis is a prefix *mask*
//! over the parent's channels instead of a slice; norms divide by the (soft) count of active
//! channels (§3.2), so a hard mask gives the sliced network's numbers, which
//! `tests/train.rs` checks against the engine's `Model::forward` for every layer type.

use super::masks::{LayerMasks, Masks};
use crate::budget::Shape;
use crate::error::{Error, Result};
use crate::model::{Mixer, Model};
use crate::models::Raw;
use candle_core::{D, DType as CD, Device, Tensor as CT, Var};

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

struct NMlp {
    up: usize,
    gate: Option<usize>,
    down: usize,
    up_b: Option<usize>,
    gate_b: Option<usize>,
    down_b: Option<usize>,
}

enum NMixer {
    Attn {
        q: usize,
        k: usize,
        v: usize,
        o: usize,
        bias: [Option<usize>; 4],
        heads: usize,
        kv_heads: usize,
        head_dim: usize,
        rope: Option<(Vec<f32>, bool)>,
    },
    Mamba {
        in_proj: usize,
        out_proj: usize,
        conv_w: usize,
        conv_b: Option<usize>,
        dt_bias: usize,
        a_log: usize,
        d: usize,
        norm: usize,
        heads: usize,
        head_dim: usize,
        groups: usize,
        state: usize,
        conv_k: usize,
        chunk: usize,
        dt_min: f32,
        dt_max: f32,
        eps: f32,
    },
    Mlp(NMlp),
    Moe {
        router: usize,
        bias: Vec<f32>,
        up: Vec<usize>,
        down: Vec<usize>,
        shared: Option<NMlp>,
        topk: usize,
        n_group: usize,
        topk_group: usize,
        norm_topk: bool,
        scale: f32,
    },
}

struct NBlock {
    layer: usize,
    norm: usize,
    mixer: NMixer,
}

pub struct Net {
    pub params: Vec<Param>,
    pub shape: Shape,
    pub vocab: usize,
    pub dtype: CD,
    embed: usize,
    lm_head: Option<usize>,
    norm_f: usize,
    eps: f32,
    blocks: Vec<NBlock>,
}

pub fn dev() -> Device {
    Device::Cpu
}

/// Finds the checkpoint name of a small (vector) tensor of layer `l`: HF names under
/// `backbone.`/`model.`, GGUF names under `blk.`.
fn vec_name(raw: &Raw, l: Option<usize>, hf: &[&str], gg: &[&str]) -> Option<String> {
    let t = raw.tensors();
    let mut cands = vec![];
    match l {
        Some(l) => {
            for pre in ["backbone", "model"] {
                cands.extend(hf.iter().map(|s| format!("{pre}.layers.{l}.{s}")));
            }
            cands.extend(gg.iter().map(|s| format!("blk.{l}.{s}")));
        }
        None => cands.extend(hf.iter().chain(gg).map(|s| s.to_string())),
    }
    cands.into_iter().find(|c| t.has(c))
}

struct Builder<'a> {
    params: Vec<Param>,
    dtype: CD,
    raw: &'a Raw,
}

impl Builder<'_> {
    fn add(
        &mut self,
        name: String,
        source: Option<String>,
        export: Export,
        v: Vec<f32>,
        shape: &[usize],
    ) -> Result<usize> {
        let t = CT::from_vec(v, shape, &dev())?.to_dtype(self.dtype)?;
        self.params.push(Param {
            name,
            source,
            export,
            var: Var::from_tensor(&t)?,
        });
        Ok(self.params.len() - 1)
    }
    /// A matrix: its source is the engine tensor's own name (`x[e]` for one expert of a stack).
    fn mat(&mut self, t: &crate::tensor::Tensor) -> Result<usize> {
        let src = if self.raw.tensors().has(&t.name) || t.name.ends_with(']') {
            Some(t.name.clone())
        } else {
            None
        };
        self.add(
            t.name.clone(),
            src,
            Export::Same,
            t.to_f32(),
            &[t.rows(), t.cols()],
        )
    }
    fn vec(&mut self, label: String, v: &[f32], src: Option<String>) -> Result<usize> {
        self.add(label, src, Export::Same, v.to_vec(), &[v.len()])
    }
    fn mlp(&mut self, m: &crate::layers::mlp::Mlp, l: usize, key: &str) -> Result<NMlp> {
        let bias =
            |b: &mut Self, v: &Option<Vec<f32>>, hf: &str, gg: &str| -> Result<Option<usize>> {
                match v {
                    None => Ok(None),
                    Some(v) => {
                        let src = vec_name(b.raw, Some(l), &[hf], &[gg]);
                        Ok(Some(b.vec(format!("{l}.{key}.{hf}"), v, src)?))
                    }
                }
            };
        Ok(NMlp {
            up: self.mat(&m.up)?,
            gate: m.gate.as_ref().map(|g| self.mat(g)).transpose()?,
            down: self.mat(&m.down)?,
            up_b: bias(
                self,
                &m.up_bias,
                &format!("{key}.up_proj.bias"),
                "ffn_up.bias",
            )?,
            gate_b: bias(
                self,
                &m.gate_bias,
                &format!("{key}.gate_proj.bias"),
                "ffn_gate.bias",
            )?,
            down_b: bias(
                self,
                &m.down_bias,
                &format!("{key}.down_proj.bias"),
                "ffn_down.bias",
            )?,
        })
    }
}

impl Net {
    /// Trainable copies of every weight of `m` (dequantized), in `dtype` (F32 to train, F64 for
    /// gradient checks). `raw` is the checkpoint `m` came from, for the export names.
    pub fn from_model(m: &Model, raw: &Raw, dtype: CD) -> Result<Net> {
        let mut b = Builder {
            params: vec![],
            dtype,
            raw,
        };
        let embed = b.mat(&m.embed)?;
        let lm_head = m.lm_head.as_ref().map(|h| b.mat(h)).transpose()?;
        let src = vec_name(
            raw,
            None,
            &["backbone.norm_f.weight", "model.norm.weight"],
            &["output_norm.weight"],
        );
        let norm_f = b.vec("norm_f".into(), &m.norm_f, src)?;
        let arch = crate::models::arch(m.arch())?;
        let mut blocks = vec![];
        for blk in &m.blocks {
            let l = blk.layer;
            let ([hf, gg], pre) = arch.block_names(matches!(blk.mixer, Mixer::Attention(_)));
            let norm_src = vec_name(raw, Some(l), &[hf], &[gg]);
            let norm = b.vec(format!("{l}.norm"), &blk.norm, norm_src)?;
            let mixer = match &blk.mixer {
                Mixer::Attention(a) => {
                    let mut bias = [None; 4];
                    for (i, (v, p, g)) in [
                        (&a.q_bias, "q_proj", "attn_q"),
                        (&a.k_bias, "k_proj", "attn_k"),
                        (&a.v_bias, "v_proj", "attn_v"),
                        (&a.o_bias, "o_proj", "attn_output"),
                    ]
                    .into_iter()
                    .enumerate()
                    {
                        if let Some(v) = v {
                            let src = vec_name(
                                raw,
                                Some(l),
                                &[&format!("{pre}.{p}.bias")],
                                &[&format!("{g}.bias")],
                            );
                            bias[i] = Some(b.vec(format!("{l}.{p}.bias"), v, src)?);
                        }
                    }
                    NMixer::Attn {
                        q: b.mat(&a.q)?,
                        k: b.mat(&a.k)?,
                        v: b.mat(&a.v)?,
                        o: b.mat(&a.o)?,
                        bias,
                        heads: a.heads,
                        kv_heads: a.kv_heads,
                        head_dim: a.head_dim,
                        rope: a.rope.as_ref().map(|r| (r.inv_freq.clone(), r.interleaved)),
                    }
                }
                Mixer::Mamba(x) => {
                    let v = |hf: &str, gg: &str| vec_name(raw, Some(l), &[hf], &[gg]);
                    let a_src = v("mixer.A_log", "ssm_a");
                    let export = match &a_src {
                        Some(s) if s.ends_with("ssm_a") => Export::NegExp,
                        _ => Export::Same,
                    };
                    let a_log: Vec<f32> = x.a.iter().map(|a| (-a).ln()).collect();
                    let n = a_log.len();
                    NMixer::Mamba {
                        in_proj: b.mat(&x.in_proj)?,
                        out_proj: b.mat(&x.out_proj)?,
                        conv_w: b.add(
                            format!("{l}.conv_w"),
                            v("mixer.conv1d.weight", "ssm_conv1d.weight"),
                            Export::Same,
                            x.conv_w.clone(),
                            &[x.conv_dim(), x.conv_k],
                        )?,
                        conv_b: Some(b.vec(
                            format!("{l}.conv_b"),
                            &x.conv_b,
                            v("mixer.conv1d.bias", "ssm_conv1d.bias"),
                        )?),
                        dt_bias: b.vec(
                            format!("{l}.dt_bias"),
                            &x.dt_bias,
                            v("mixer.dt_bias", "ssm_dt.bias"),
                        )?,
                        a_log: b.add(format!("{l}.a_log"), a_src, export, a_log, &[n])?,
                        d: b.vec(format!("{l}.d"), &x.d, v("mixer.D", "ssm_d"))?,
                        norm: b.vec(
                            format!("{l}.mixer_norm"),
                            &x.norm,
                            v("mixer.norm.weight", "ssm_norm.weight"),
                        )?,
                        heads: x.heads,
                        head_dim: x.head_dim,
                        groups: x.groups,
                        state: x.state,
                        conv_k: x.conv_k,
                        chunk: x.chunk,
                        dt_min: x.dt_min,
                        dt_max: x.dt_max,
                        eps: x.eps,
                    }
                }
                Mixer::Mlp(x) => NMixer::Mlp(b.mlp(x, l, pre)?),
                Mixer::Moe(x) => {
                    let src = vec_name(
                        raw,
                        Some(l),
                        &["mixer.gate.weight"],
                        &["ffn_gate_inp.weight"],
                    );
                    let router = b.add(
                        format!("{l}.router"),
                        src,
                        Export::Same,
                        x.router.clone(),
                        &[x.experts, x.hidden],
                    )?;
                    let up = x.up.iter().map(|t| b.mat(t)).collect::<Result<Vec<_>>>()?;
                    let down = x
                        .down
                        .iter()
                        .map(|t| b.mat(t))
                        .collect::<Result<Vec<_>>>()?;
                    NMixer::Moe {
                        router,
                        bias: x.bias.clone(),
                        up,
                        down,
                        shared: x
                            .shared
                            .as_ref()
                            .map(|s| b.mlp(s, l, "mixer.shared_experts"))
                            .transpose()?,
                        topk: x.topk,
                        n_group: x.n_group,
                        topk_group: x.topk_group,
                        norm_topk: x.norm_topk,
                        scale: x.scale,
                    }
                }
            };
            blocks.push(NBlock {
                layer: l,
                norm,
                mixer,
            });
        }
        Ok(Net {
            params: b.params,
            shape: m.shape.clone(),
            vocab: m.vocab,
            dtype,
            embed,
            lm_head,
            norm_f,
            eps: m.eps,
            blocks,
        })
    }

    /// Total parameter count as a polynomial in the axis sizes (mirrors `Model::params`), so
    /// expected sizes give the expected count. `size(axis, layer)` returns a scalar tensor.
    pub fn param_count(
        &self,
        size: &dyn Fn(&str, usize) -> Result<CT>,
        keep: &dyn Fn(usize) -> bool,
    ) -> Result<CT> {
        let h = size("hidden", 0)?;
        let v = self.vocab as f64;
        let heads = if self.lm_head.is_some() { 2.0 } else { 1.0 };
        let mut total = ((&h * (heads * v))? + &h)?;
        for blk in &self.blocks {
            let l = blk.layer;
            if !keep(l) {
                continue;
            }
            let t = match &blk.mixer {
                NMixer::Attn {
                    bias,
                    kv_heads,
                    head_dim,
                    ..
                } => {
                    let q = (size("heads", l)? * *head_dim as f64)?;
                    let kv = (kv_heads * head_dim) as f64;
                    let mut t = ((&q * &h)? * 2.0)?;
                    t = (t + (&h * (2.0 * kv))?)?;
                    if bias[0].is_some() {
                        t = (t + &q)?;
                    }
                    if bias[1].is_some() {
                        t = (t + 2.0 * kv)?;
                    }
                    if bias[3].is_some() {
                        t = (t + &h)?;
                    }
                    t
                }
                NMixer::Mamba {
                    groups,
                    state,
                    conv_k,
                    ..
                } => {
                    let na = size("mamba_heads", l)?;
                    let ni = (&na * &size("mamba_head_dim", l)?)?;
                    let gn = (groups * state) as f64;
                    let cw = (&ni + 2.0 * gn)?;
                    let inp = (((&ni * 2.0)? + &na)? + 2.0 * gn)?;
                    ((((((inp * &h)? + (&cw * *conv_k as f64)?)? + cw)? + (&na * 3.0)?)? + &ni)?
                        + (&h * &ni)?)?
                }
                NMixer::Mlp(m) => {
                    let k = if m.gate.is_some() { 3.0 } else { 2.0 };
                    ((size("ffn", l)? * &h)? * k)?
                }
                NMixer::Moe { shared, .. } => {
                    let e = size("experts", l)?;
                    let mut t = ((&e * &h)? + &e)?;
                    if shared.is_some() {
                        t = (t + ((size("shared_ffn", l)? * &h)? * 2.0)?)?;
                    }
                    (t + ((&e * &size("moe_ffn", l)?)? * &h)?.affine(2.0, 0.0)?)?
                }
            };
            total = ((total + t)? + &h)?;
        }
        Ok(total)
    }

    fn p(&self, i: usize) -> &CT {
        self.params[i].var.as_tensor()
    }

    /// Logits [B·T, vocab] of `b` sequences of `t` tokens (row-major in `tokens`) under `masks`.
    pub fn forward(&self, tokens: &[u32], b: usize, t: usize, masks: &Masks) -> Result<CT> {
        if tokens.len() != b * t {
            return Err(Error::Train(format!(
                "{} tokens for {b} sequences of {t}",
                tokens.len()
            )));
        }
        let ids = CT::from_vec(tokens.to_vec(), tokens.len(), &dev())?;
        let mh = &masks.hidden;
        let count = mh.sum_all()?;
        let mut x = self
            .p(self.embed)
            .index_select(&ids, 0)?
            .broadcast_mul(mh)?;
        for blk in &self.blocks {
            let lm = &masks.layers[blk.layer];
            if !lm.keep {
                continue;
            }
            let xn = rmsnorm(&x, self.p(blk.norm), mh, &count, self.eps)?;
            let y = match &blk.mixer {
                NMixer::Attn { .. } => self.attention(&blk.mixer, &xn, b, t, lm)?,
                NMixer::Mamba { .. } => self.mamba(&blk.mixer, &xn, b, t, lm)?,
                NMixer::Mlp(m) => self.mlp(m, &xn, lm.ffn.as_ref())?,
                NMixer::Moe { .. } => self.moe(&blk.mixer, &xn, lm)?,
            };
            x = (x + y.broadcast_mul(mh)?)?;
        }
        let xn = rmsnorm(&x, self.p(self.norm_f), mh, &count, self.eps)?;
        let head = self.p(self.lm_head.unwrap_or(self.embed));
        Ok(xn.matmul(&head.t()?)?)
    }

    fn linear(&self, x: &CT, w: usize, bias: Option<usize>) -> Result<CT> {
        let y = x.matmul(&self.p(w).t()?)?;
        Ok(match bias {
            Some(bi) => y.broadcast_add(self.p(bi))?,
            None => y,
        })
    }

    fn mlp(&self, m: &NMlp, x: &CT, mask: Option<&CT>) -> Result<CT> {
        let u = self.linear(x, m.up, m.up_b)?;
        let h = match m.gate {
            // Llama's SwiGLU when gated, Nemotron-H's relu² otherwise (layers/mlp.rs).
            Some(g) => (u * self.linear(x, g, m.gate_b)?.silu()?)?,
            None => u.relu()?.sqr()?,
        };
        let h = match mask {
            Some(mk) => h.broadcast_mul(mk)?,
            None => h,
        };
        self.linear(&h, m.down, m.down_b)
    }

    fn attention(&self, mx: &NMixer, x: &CT, b: usize, t: usize, lm: &LayerMasks) -> Result<CT> {
        let NMixer::Attn {
            q,
            k,
            v,
            o,
            bias,
            heads,
            kv_heads,
            head_dim,
            rope,
        } = mx
        else {
            unreachable!()
        };
        let (nh, kv, d) = (*heads, *kv_heads, *head_dim);
        let split =
            |y: CT, n: usize| -> Result<CT> { Ok(y.reshape((b, t, n, d))?.transpose(1, 2)?) };
        let mut qh = split(self.linear(x, *q, bias[0])?, nh)?;
        let mut kh = split(self.linear(x, *k, bias[1])?, kv)?;
        let vh = split(self.linear(x, *v, bias[2])?, kv)?;
        if let Some((inv, inter)) = rope {
            let (cos, sin) = rope_tables(inv, t, self.dtype)?;
            qh = apply_rope(&qh, &cos, &sin, *inter)?;
            kh = apply_rope(&kh, &cos, &sin, *inter)?;
        }
        let per = nh / kv;
        let expand = |z: CT| -> Result<CT> {
            Ok(z.unsqueeze(2)?
                .broadcast_as((b, kv, per, t, d))?
                .reshape((b, nh, t, d))?)
        };
        let kh = expand(kh)?.contiguous()?;
        let vh = expand(vh)?.contiguous()?;
        let scale = 1.0 / (d as f64).sqrt();
        let s = (bmm(&qh, &kh.transpose(2, 3)?)? * scale)?;
        let s = s.broadcast_add(&causal_bias(t, self.dtype)?)?;
        let p = softmax_last(&s)?;
        let mut out = bmm(&p, &vh)?.transpose(1, 2)?; // [b, t, nh, d]
        if let Some(hm) = &lm.heads {
            out = out.broadcast_mul(&hm.reshape((nh, 1))?)?;
        }
        let out = out.reshape((b * t, nh * d))?;
        self.linear(&out, *o, bias[3])
    }

    fn mamba(&self, mx: &NMixer, x: &CT, b: usize, t: usize, lm: &LayerMasks) -> Result<CT> {
        let NMixer::Mamba {
            in_proj,
            out_proj,
            conv_w,
            conv_b,
            dt_bias,
            a_log,
            d,
            norm,
            heads,
            head_dim,
            groups,
            state,
            conv_k,
            chunk,
            dt_min,
            dt_max,
            eps,
        } = mx
        else {
            unreachable!()
        };
        let (nh, p, g, n, k) = (*heads, *head_dim, *groups, *state, *conv_k);
        let di = nh * p;
        let cd = di + 2 * g * n;
        let zx = self.linear(x, *in_proj, None)?; // [b·t, 2di + 2gn + nh]
        let z = zx.narrow(1, 0, di)?;
        let xbc = zx.narrow(1, di, cd)?.reshape((b, t, cd))?;
        let dt = zx.narrow(1, di + cd, nh)?;
        // Causal depthwise conv (spec §2.3.2): y_t = b + Σ_q w_q · x_{t−K+1+q}.
        let xp = xbc.pad_with_zeros(1, k - 1, 0)?;
        let w = self.p(*conv_w);
        let mut acc = xp
            .narrow(1, 0, t)?
            .broadcast_mul(&w.narrow(1, 0, 1)?.reshape(cd)?)?;
        for q in 1..k {
            acc = (acc
                + xp.narrow(1, q, t)?
                    .broadcast_mul(&w.narrow(1, q, 1)?.reshape(cd)?)?)?;
        }
        if let Some(cb) = conv_b {
            acc = acc.broadcast_add(self.p(*cb))?;
        }
        let xbc = acc.silu()?.reshape((b * t, cd))?;
        let mut xs = xbc.narrow(1, 0, di)?;
        if let Some(im) = &lm.inner {
            xs = xs.broadcast_mul(im)?;
        }
        let bm = xbc.narrow(1, di, g * n)?;
        let cm = xbc.narrow(1, di + g * n, g * n)?;
        let dt = softplus(&dt.broadcast_add(self.p(*dt_bias))?)?
            .clamp(*dt_min as f64, (*dt_max as f64).min(1e30))?;
        let a = self.p(*a_log).exp()?.neg()?;
        let y = ssd(&xs, &dt, &a, &bm, &cm, b, t, nh, p, g, n, *chunk)?; // [b·t, di]
        let y = (y + xs.broadcast_mul(
            &self
                .p(*d)
                .reshape((nh, 1))?
                .broadcast_as((nh, p))?
                .reshape(di)?,
        )?)?;
        // Gated grouped RMSNorm over the active channels of each group (spec §2.3.8, doc §3.2).
        let y = (y * z.silu()?)?;
        let gs = di / g;
        let yg = y.reshape((b * t, g, gs))?;
        let (num, cnt) = match &lm.inner {
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
            .broadcast_mul(&(ms + *eps as f64)?.sqrt()?.recip()?)?
            .reshape((b * t, di))?;
        let mut wn = self.p(*norm).clone();
        if let Some(im) = &lm.inner {
            wn = (wn * im)?;
        }
        let yn = yn.broadcast_mul(&wn)?;
        self.linear(&yn, *out_proj, None)
    }

    fn moe(&self, mx: &NMixer, x: &CT, lm: &LayerMasks) -> Result<CT> {
        let NMixer::Moe {
            router,
            bias,
            up,
            down,
            shared,
            topk,
            n_group,
            topk_group,
            norm_topk,
            scale,
        } = mx
        else {
            unreachable!()
        };
        let e = up.len();
        let nt = x.dim(0)?;
        let logits = x.matmul(&self.p(*router).t()?)?;
        let scores = logits.neg()?.exp()?.affine(1.0, 1.0)?.recip()?; // sigmoid
        // Expert choice (not differentiable, as in the engine): biased scores, group pruning,
        // top-k over the active experts.
        let sv: Vec<f32> = scores.to_dtype(CD::F32)?.flatten_all()?.to_vec1()?;
        let k = (*topk).min(lm.expert_on.iter().filter(|&&o| o).count());
        let mut lists: Vec<Vec<(u32, u32)>> = vec![vec![]; e]; // per expert: (token, slot)
        let mut choice = vec![0f32; e];
        for ti in 0..nt {
            for j in 0..e {
                choice[j] = if lm.expert_on[j] {
                    sv[ti * e + j] + bias[j]
                } else {
                    f32::NEG_INFINITY
                };
            }
            if *n_group > 1 {
                let per = e / n_group;
                let mut gs: Vec<(f32, usize)> = (0..*n_group)
                    .map(|gi| {
                        let mut v: Vec<f32> = choice[gi * per..(gi + 1) * per].to_vec();
                        v.sort_by(|a, b| b.total_cmp(a));
                        let s = if v.len() > 1 && v[1] > f32::NEG_INFINITY {
                            v[0] + v[1]
                        } else {
                            v[0]
                        };
                        (s, gi)
                    })
                    .collect();
                gs.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
                for &(_, gi) in &gs[(*topk_group).min(*n_group)..] {
                    choice[gi * per..(gi + 1) * per].fill(f32::NEG_INFINITY);
                }
            }
            for slot in 0..k {
                let mut best = usize::MAX;
                for (j, &v) in choice.iter().enumerate() {
                    if v > f32::NEG_INFINITY && (best == usize::MAX || v > choice[best]) {
                        best = j;
                    }
                }
                if best == usize::MAX {
                    break;
                }
                lists[best].push((ti as u32, slot as u32));
                choice[best] = f32::NEG_INFINITY;
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
        if *norm_topk {
            w = w.broadcast_div(&(w.sum_keepdim(1)? + 1e-20)?)?;
        }
        w = (w * *scale as f64)?;
        if let Some(em) = &lm.experts {
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
            let mut h = xs.matmul(&self.p(up[j]).t()?)?.relu()?.sqr()?;
            if let Some(fm) = &lm.moe_ffn {
                h = h.broadcast_mul(fm)?;
            }
            let y = h.matmul(&self.p(down[j]).t()?)?;
            let y = y.broadcast_mul(&wf.index_select(&pos, 0)?.unsqueeze(1)?)?;
            out = out.index_add(&toks, &y, 0)?;
        }
        if let Some(s) = shared {
            out = (out + self.mlp(s, x, lm.shared_ffn.as_ref())?)?;
        }
        Ok(out)
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
