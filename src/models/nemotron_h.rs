//! Nemotron-H hybrids (spec §1–§3): one block per pattern character — `M` Mamba-2, `*` attention
//! (no RoPE), `-` relu² MLP, `E` sigmoid-routed MoE with a shared expert. HF checkpoints in the
//! hub layout (`backbone.*`, one tensor per expert) or the newest transformers layout (`model.*`,
//! stacked experts); GGUF `nemotron_h` / `nemotron_h_moe` as llama.cpp's converter writes them.

use super::{Cfg, matrix, opt_vec_f32, parse_float, vec_f32};
use crate::budget::{LayerKind, Shape};
use crate::error::{Error, Result};
use crate::formats::TensorMap;
use crate::formats::gguf::Gguf;
use crate::layers::Vector;
use crate::layers::attention::Attention;
use crate::layers::mamba2::Mamba2;
use crate::layers::mlp::{Act, Mlp};
use crate::layers::moe::{MAX_TOPK, Moe};
use crate::model::{Block, Meta, Mixer, Model};

#[derive(Debug)]
struct Dims {
    vocab: usize,
    hidden: usize,
    kinds: Vec<LayerKind>,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    ffn: usize,
    mamba_heads: usize,
    mamba_head_dim: usize,
    groups: usize,
    state: usize,
    conv_k: usize,
    chunk: usize,
    dt_min: f32,
    dt_max: f32,
    experts: usize,
    topk: usize,
    moe_ffn: usize,
    shared_ffn: usize,
    n_group: usize,
    topk_group: usize,
    norm_topk: bool,
    scale: f32,
    eps: f32,
}

impl Dims {
    fn shape(&self) -> Shape {
        Shape {
            hidden: self.hidden,
            layers: self.kinds.clone(),
            heads: self.heads,
            kv_heads: self.kv_heads,
            head_dim: self.head_dim,
            ffn: self.ffn,
            moe_ffn: self.moe_ffn,
            experts: self.experts,
            experts_per_tok: self.topk,
            expert_groups: self.n_group.max(1),
            shared_ffn: self.shared_ffn,
            mamba_heads: self.mamba_heads,
            mamba_head_dim: self.mamba_head_dim,
            mamba_groups: self.groups,
            ssm_state: self.state,
        }
    }
    fn validate(&self, src: &str) -> Result<()> {
        let has = |k: LayerKind| self.kinds.contains(&k);
        let bad = |f: &str, m: String| Err(Error::config(format!("{src} {f}"), m));
        if has(LayerKind::Attention)
            && (self.kv_heads == 0 || !self.heads.is_multiple_of(self.kv_heads))
        {
            return bad(
                "num_key_value_heads",
                format!(
                    "{} query heads do not split into {} KV groups",
                    self.heads, self.kv_heads
                ),
            );
        }
        if has(LayerKind::Mamba)
            && (self.groups == 0 || !self.mamba_heads.is_multiple_of(self.groups))
        {
            return bad(
                "n_groups",
                format!(
                    "{} Mamba heads do not split into {} groups",
                    self.mamba_heads, self.groups
                ),
            );
        }
        if has(LayerKind::Mamba) && self.conv_k < 2 {
            return bad(
                "conv_kernel",
                format!("{} (must be at least 2)", self.conv_k),
            );
        }
        if has(LayerKind::Moe) {
            if self.topk == 0 || self.topk > self.experts || self.topk > MAX_TOPK {
                return bad(
                    "num_experts_per_tok",
                    format!("{} with {} experts", self.topk, self.experts),
                );
            }
            if self.n_group == 0
                || !self.experts.is_multiple_of(self.n_group)
                || self.n_group > 64
                || self.topk_group > self.n_group
            {
                return bad(
                    "n_group",
                    format!(
                        "{} groups (topk_group {}) for {} experts",
                        self.n_group, self.topk_group, self.experts
                    ),
                );
            }
        }
        if self.hidden == 0 || self.vocab == 0 || self.kinds.is_empty() {
            return bad(
                "hidden_size",
                "hidden size, vocabulary and layer count must be positive".into(),
            );
        }
        Ok(())
    }
}

fn kind_from_char(c: char) -> Option<LayerKind> {
    Some(match c {
        'M' => LayerKind::Mamba,
        '*' => LayerKind::Attention,
        '-' => LayerKind::Mlp,
        'E' => LayerKind::Moe,
        _ => return None,
    })
}

fn kind_from_name(s: &str) -> Option<LayerKind> {
    Some(match s {
        "mamba" | "linear_attention" | "mamba2" => LayerKind::Mamba,
        "attention" | "full_attention" => LayerKind::Attention,
        "mlp" => LayerKind::Mlp,
        "moe" => LayerKind::Moe,
        _ => return None,
    })
}

pub fn from_hf(cfg: &Cfg, t: &TensorMap, mut meta: Meta) -> Result<Model> {
    let kinds: Vec<LayerKind> = if let Some(p) = cfg.get(&["hybrid_override_pattern"]) {
        let s = p
            .as_str()
            .ok_or_else(|| cfg.err("hybrid_override_pattern", "is not a string"))?;
        s.chars()
            .map(|c| {
                kind_from_char(c).ok_or_else(|| {
                    cfg.err(
                        "hybrid_override_pattern",
                        format!("unknown layer character {c:?} (M, *, -, E)"),
                    )
                })
            })
            .collect::<Result<_>>()?
    } else if let Some(l) = cfg.get(&["layers_block_type"]) {
        let a = l
            .as_array()
            .ok_or_else(|| cfg.err("layers_block_type", "is not a list"))?;
        a.iter()
            .map(|x| {
                x.as_str().and_then(kind_from_name).ok_or_else(|| {
                    cfg.err("layers_block_type", format!("unknown layer type {x} (mamba/attention/mlp/moe or linear_attention/full_attention/mlp/moe)"))
                })
            })
            .collect::<Result<_>>()?
    } else {
        return Err(cfg.err(
            "hybrid_override_pattern",
            "missing (neither hybrid_override_pattern nor layers_block_type is given)",
        ));
    };
    if let Some(n) = cfg.get(&["num_hidden_layers"])
        && n.as_u64() != Some(kinds.len() as u64)
    {
        return Err(cfg.err(
            "num_hidden_layers",
            format!(
                "{n} does not match the {} layers of the pattern",
                kinds.len()
            ),
        ));
    }
    let hidden = cfg.usize(&["hidden_size"])?;
    let has = |k| kinds.contains(&k);
    let heads = if has(LayerKind::Attention) {
        cfg.usize(&["num_attention_heads"])?
    } else {
        cfg.usize_or(&["num_attention_heads"], 0)?
    };
    let (dt_min, dt_max) = match cfg.get(&["time_step_limit", "mamba_dt_limit"]) {
        None => (0.0, f64::INFINITY),
        Some(x) => {
            let a = x
                .as_array()
                .filter(|a| a.len() == 2)
                .ok_or_else(|| cfg.err("time_step_limit", format!("{x} is not a pair")))?;
            let lo = parse_float(&a[0])
                .ok_or_else(|| cfg.err("time_step_limit", format!("{} is not a number", a[0])))?;
            let hi = parse_float(&a[1])
                .ok_or_else(|| cfg.err("time_step_limit", format!("{} is not a number", a[1])))?;
            (lo, hi)
        }
    };
    for (k, want) in [("mamba_hidden_act", "silu"), ("mlp_hidden_act", "relu2")] {
        let v = cfg.str_or(&[k], want)?;
        if v != want {
            return Err(cfg.err(k, format!("{v:?} is not supported (only {want:?})")));
        }
    }
    if cfg.get(&["moe_latent_size"]).is_some() {
        return Err(cfg.err(
            "moe_latent_size",
            "latent MoE (Nemotron 3 Super) is not supported yet",
        ));
    }
    let moe = has(LayerKind::Moe);
    let d = Dims {
        vocab: cfg.usize(&["vocab_size"])?,
        hidden,
        heads,
        kv_heads: cfg.usize_or(&["num_key_value_heads"], heads)?,
        head_dim: cfg.usize_or(
            &["head_dim", "attention_head_dim"],
            hidden.checked_div(heads).unwrap_or(0),
        )?,
        ffn: if has(LayerKind::Mlp) {
            cfg.usize(&["intermediate_size"])?
        } else {
            0
        },
        mamba_heads: if has(LayerKind::Mamba) {
            cfg.usize(&["mamba_num_heads"])?
        } else {
            0
        },
        mamba_head_dim: if has(LayerKind::Mamba) {
            cfg.usize(&["mamba_head_dim"])?
        } else {
            0
        },
        groups: cfg.usize_or(&["n_groups", "mamba_n_groups"], 1)?,
        state: if has(LayerKind::Mamba) {
            cfg.usize(&["ssm_state_size", "mamba_d_state"])?
        } else {
            0
        },
        conv_k: cfg.usize_or(&["conv_kernel", "mamba_d_conv"], 4)?,
        chunk: cfg.usize_or(&["chunk_size", "mamba_chunk_size"], 128)?,
        dt_min: dt_min as f32,
        dt_max: dt_max as f32,
        experts: if moe {
            cfg.usize(&["n_routed_experts", "num_local_experts", "num_experts"])?
        } else {
            0
        },
        topk: if moe {
            cfg.usize(&["num_experts_per_tok"])?
        } else {
            0
        },
        moe_ffn: if moe {
            cfg.usize(&["moe_intermediate_size"])?
        } else {
            0
        },
        shared_ffn: if moe && cfg.usize_or(&["n_shared_experts"], 1)? > 0 {
            cfg.usize_or(&["moe_shared_expert_intermediate_size"], 0)?
        } else {
            0
        },
        n_group: cfg.usize_or(&["n_group"], 1)?,
        topk_group: cfg.usize_or(&["topk_group"], 1)?,
        norm_topk: cfg.bool_or(&["norm_topk_prob"], true)?,
        scale: cfg.f64_or(&["routed_scaling_factor"], 1.0)? as f32,
        eps: cfg.f64_or(&["layer_norm_epsilon", "rms_norm_eps", "norm_eps"], 1e-5)? as f32,
        kinds,
    };
    d.validate(&cfg.path.display().to_string())?;
    let pre = if t.has("backbone.norm_f.weight")
        || t.has("backbone.embeddings.weight")
        || t.has("backbone.embedding.weight")
    {
        "backbone"
    } else {
        "model"
    };
    let embed = t
        .get_any(&[
            &format!("{pre}.embeddings.weight"),
            &format!("{pre}.embedding.weight"),
            &format!("{pre}.embed_tokens.weight"),
        ])?
        .clone();
    embed.expect_shape(&[d.vocab, d.hidden])?;
    let tied = cfg.bool_or(&["tie_word_embeddings"], false)?;
    let lm_head = if tied {
        None
    } else {
        Some(matrix(t, "lm_head.weight", d.vocab, d.hidden)?)
    };
    let names = |i: usize, s: &str| format!("{pre}.layers.{i}.{s}");
    let mut blocks = vec![];
    let (mut na, mut nm) = (0, 0);
    for (i, &k) in d.kinds.iter().enumerate() {
        let norm = vec_f32(t, &names(i, "norm.weight"), d.hidden)?;
        let m = |s: &str| names(i, &format!("mixer.{s}"));
        let (mixer, slot) = match k {
            LayerKind::Mamba => {
                let di = d.mamba_heads * d.mamba_head_dim;
                let cd = di + 2 * d.groups * d.state;
                let conv = t.get(&m("conv1d.weight"))?;
                if conv.numel() != cd * d.conv_k {
                    return Err(Error::Tensor {
                        name: conv.name.clone(),
                        msg: format!(
                            "shape {:?}, the config implies [{cd}, 1, {}]",
                            conv.shape, d.conv_k
                        ),
                    });
                }
                let a_log = vec_f32(t, &m("A_log"), d.mamba_heads)?;
                nm += 1;
                (
                    Mixer::Mamba(Mamba2 {
                        in_proj: matrix(
                            t,
                            &m("in_proj.weight"),
                            2 * di + 2 * d.groups * d.state + d.mamba_heads,
                            d.hidden,
                        )?,
                        out_proj: matrix(t, &m("out_proj.weight"), d.hidden, di)?,
                        conv_w: Vector::of(conv),
                        conv_b: opt_vec_f32(t, &m("conv1d.bias"), cd)?
                            .unwrap_or_else(|| Vector::zeros(cd)),
                        dt_bias: vec_f32(t, &m("dt_bias"), d.mamba_heads)?,
                        a: a_log.map(|v| -v.exp()),
                        d: vec_f32(t, &m("D"), d.mamba_heads)?,
                        norm: vec_f32(t, &m("norm.weight"), di)?,
                        heads: d.mamba_heads,
                        head_dim: d.mamba_head_dim,
                        groups: d.groups,
                        state: d.state,
                        conv_k: d.conv_k,
                        chunk: d.chunk,
                        dt_min: d.dt_min,
                        dt_max: d.dt_max,
                        eps: d.eps,
                    }),
                    nm - 1,
                )
            }
            LayerKind::Attention => {
                let (qd, kvd) = (d.heads * d.head_dim, d.kv_heads * d.head_dim);
                na += 1;
                (
                    Mixer::Attention(Attention {
                        q: matrix(t, &m("q_proj.weight"), qd, d.hidden)?,
                        k: matrix(t, &m("k_proj.weight"), kvd, d.hidden)?,
                        v: matrix(t, &m("v_proj.weight"), kvd, d.hidden)?,
                        o: matrix(t, &m("o_proj.weight"), d.hidden, qd)?,
                        q_bias: opt_vec_f32(t, &m("q_proj.bias"), qd)?,
                        k_bias: opt_vec_f32(t, &m("k_proj.bias"), kvd)?,
                        v_bias: opt_vec_f32(t, &m("v_proj.bias"), kvd)?,
                        o_bias: opt_vec_f32(t, &m("o_proj.bias"), d.hidden)?,
                        heads: d.heads,
                        kv_heads: d.kv_heads,
                        head_dim: d.head_dim,
                        rope: None,
                    }),
                    na - 1,
                )
            }
            LayerKind::Mlp => (
                Mixer::Mlp(relu2_mlp(
                    t,
                    &m("up_proj"),
                    &m("down_proj"),
                    d.ffn,
                    d.hidden,
                )?),
                0,
            ),
            LayerKind::Moe => {
                let (mut up, mut down) = (vec![], vec![]);
                let stacked_up = [m("experts.up_proj"), m("experts.up_proj.weight")];
                if let Ok(su) = t.get_any(&[&stacked_up[0], &stacked_up[1]]) {
                    su.expect_shape(&[d.experts, d.moe_ffn, d.hidden])?;
                    let sd =
                        t.get_any(&[&m("experts.down_proj"), &m("experts.down_proj.weight")])?;
                    sd.expect_shape(&[d.experts, d.hidden, d.moe_ffn])?;
                    for e in 0..d.experts {
                        up.push(su.index(e));
                        down.push(sd.index(e));
                    }
                } else {
                    for e in 0..d.experts {
                        up.push(matrix(
                            t,
                            &m(&format!("experts.{e}.up_proj.weight")),
                            d.moe_ffn,
                            d.hidden,
                        )?);
                        down.push(matrix(
                            t,
                            &m(&format!("experts.{e}.down_proj.weight")),
                            d.hidden,
                            d.moe_ffn,
                        )?);
                    }
                }
                let shared = if d.shared_ffn > 0 {
                    Some(relu2_mlp(
                        t,
                        &m("shared_experts.up_proj"),
                        &m("shared_experts.down_proj"),
                        d.shared_ffn,
                        d.hidden,
                    )?)
                } else {
                    None
                };
                let router = t.get(&m("gate.weight"))?;
                router.expect_shape(&[d.experts, d.hidden])?;
                (
                    Mixer::Moe(Moe {
                        router: Vector::of(router),
                        bias: opt_vec_f32(t, &m("gate.e_score_correction_bias"), d.experts)?
                            .unwrap_or_else(|| Vector::zeros(d.experts)),
                        up,
                        down,
                        shared,
                        experts: d.experts,
                        hidden: d.hidden,
                        topk: d.topk,
                        n_group: d.n_group,
                        topk_group: d.topk_group,
                        norm_topk: d.norm_topk,
                        scale: d.scale,
                    }),
                    0,
                )
            }
            LayerKind::Transformer => unreachable!(),
        };
        blocks.push(Block {
            layer: i,
            norm,
            mixer,
            slot,
        });
    }
    meta.arch = if moe {
        "nemotron_h_moe".into()
    } else {
        "nemotron_h".into()
    };
    Ok(Model {
        meta,
        shape: d.shape(),
        vocab: d.vocab,
        embed,
        lm_head,
        norm_f: vec_f32(t, &format!("{pre}.norm_f.weight"), d.hidden)?,
        eps: d.eps,
        blocks,
    })
}

fn relu2_mlp(t: &TensorMap, up: &str, down: &str, ffn: usize, hidden: usize) -> Result<Mlp> {
    Ok(Mlp {
        up: matrix(t, &format!("{up}.weight"), ffn, hidden)?,
        gate: None,
        down: matrix(t, &format!("{down}.weight"), hidden, ffn)?,
        act: Act::Relu2,
        up_bias: opt_vec_f32(t, &format!("{up}.bias"), ffn)?,
        gate_bias: None,
        down_bias: opt_vec_f32(t, &format!("{down}.bias"), hidden)?,
    })
}

pub fn from_gguf(g: &Gguf, meta: Meta) -> Result<Model> {
    let arch = meta.arch.clone();
    let key = |k: &str| format!("{arch}.{k}");
    let u = |k: &str| g.u64(&key(k)).map(|v| v as usize);
    let uo = |k: &str, d: usize| {
        g.get(&key(k))
            .and_then(|v| v.as_u64())
            .map_or(d, |v| v as usize)
    };
    let t = &g.tensors;
    let n_layers = u("block_count")?;
    let hidden = u("embedding_length")?;
    // Layer kinds from the tensors present (cross-checked by the shapes below).
    let mut kinds = vec![];
    for i in 0..n_layers {
        let has = |s: &str| t.has(&format!("blk.{i}.{s}"));
        kinds.push(if has("ssm_in.weight") {
            LayerKind::Mamba
        } else if has("attn_q.weight") {
            LayerKind::Attention
        } else if has("ffn_up_exps.weight") {
            LayerKind::Moe
        } else if has("ffn_up.weight") {
            LayerKind::Mlp
        } else {
            return Err(Error::format(
                &g.path,
                format!("layer {i} has none of ssm_in, attn_q, ffn_up, ffn_up_exps"),
            ));
        });
    }
    let heads_arr = g
        .per_layer(&key("attention.head_count"), n_layers)
        .unwrap_or_else(|_| vec![0; n_layers]);
    let kv_arr = g
        .per_layer(&key("attention.head_count_kv"), n_layers)
        .unwrap_or_else(|_| vec![0; n_layers]);
    let ff_arr = g
        .per_layer(&key("feed_forward_length"), n_layers)
        .unwrap_or_else(|_| vec![0; n_layers]);
    let first = |k: LayerKind, a: &[u64]| {
        kinds
            .iter()
            .zip(a)
            .find(|(x, _)| **x == k)
            .map_or(0, |(_, v)| *v as usize)
    };
    // head_count may be one value or a per-layer array (zero on non-attention layers).
    let heads = match first(LayerKind::Attention, &heads_arr) {
        0 => heads_arr.iter().copied().max().unwrap_or(0) as usize,
        h => h,
    };
    let inner = uo("ssm.inner_size", 0);
    let mheads = uo("ssm.time_step_rank", 0);
    let experts = uo("expert_count", 0);
    let d = Dims {
        vocab: t.get("token_embd.weight")?.shape[0],
        hidden,
        heads,
        kv_heads: first(LayerKind::Attention, &kv_arr),
        head_dim: uo(
            "attention.key_length",
            hidden.checked_div(heads).unwrap_or(0),
        ),
        ffn: first(LayerKind::Mlp, &ff_arr),
        mamba_heads: mheads,
        mamba_head_dim: inner.checked_div(mheads).unwrap_or(0),
        groups: uo("ssm.group_count", 1),
        state: uo("ssm.state_size", 0),
        conv_k: uo("ssm.conv_kernel", 4),
        chunk: 128,
        dt_min: 0.0,
        dt_max: f32::INFINITY,
        experts,
        topk: uo("expert_used_count", 0),
        moe_ffn: uo("expert_feed_forward_length", 0),
        shared_ffn: if uo("expert_shared_count", 1) > 0 {
            uo("expert_shared_feed_forward_length", 0)
        } else {
            0
        },
        n_group: uo("expert_group_count", 1).max(1),
        topk_group: uo("expert_group_used_count", 1).max(1),
        norm_topk: g
            .get(&key("expert_weights_norm"))
            .and_then(|v| v.as_bool())
            .unwrap_or(true),
        scale: g
            .get(&key("expert_weights_scale"))
            .and_then(|v| v.as_f64())
            .unwrap_or(1.0) as f32,
        eps: g
            .get(&key("attention.layer_norm_rms_epsilon"))
            .or(g.get(&key("attention.layer_norm_epsilon")))
            .and_then(|v| v.as_f64())
            .unwrap_or(1e-5) as f32,
        kinds,
    };
    d.validate(&format!("{} metadata", g.path.display()))?;
    let embed = matrix(t, "token_embd.weight", d.vocab, d.hidden)?;
    let lm_head = if t.has("output.weight") {
        Some(matrix(t, "output.weight", d.vocab, d.hidden)?)
    } else {
        None
    };
    let mut blocks = vec![];
    let (mut na, mut nm) = (0, 0);
    for (i, &k) in d.kinds.iter().enumerate() {
        let b = |s: &str| format!("blk.{i}.{s}");
        let norm = vec_f32(t, &b("attn_norm.weight"), d.hidden)?;
        let (mixer, slot) = match k {
            LayerKind::Mamba => {
                let di = d.mamba_heads * d.mamba_head_dim;
                let cd = di + 2 * d.groups * d.state;
                nm += 1;
                (
                    Mixer::Mamba(Mamba2 {
                        in_proj: matrix(
                            t,
                            &b("ssm_in.weight"),
                            2 * di + 2 * d.groups * d.state + d.mamba_heads,
                            d.hidden,
                        )?,
                        out_proj: matrix(t, &b("ssm_out.weight"), d.hidden, di)?,
                        conv_w: vec_f32(t, &b("ssm_conv1d.weight"), cd * d.conv_k)?,
                        conv_b: opt_vec_f32(t, &b("ssm_conv1d.bias"), cd)?
                            .unwrap_or_else(|| Vector::zeros(cd)),
                        dt_bias: vec_f32(t, &b("ssm_dt.bias"), d.mamba_heads)?,
                        // GGUF stores A = −exp(A_log) directly.
                        a: vec_f32(t, &b("ssm_a"), d.mamba_heads)?,
                        d: vec_f32(t, &b("ssm_d"), d.mamba_heads)?,
                        norm: vec_f32(t, &b("ssm_norm.weight"), di)?,
                        heads: d.mamba_heads,
                        head_dim: d.mamba_head_dim,
                        groups: d.groups,
                        state: d.state,
                        conv_k: d.conv_k,
                        chunk: d.chunk,
                        dt_min: d.dt_min,
                        dt_max: d.dt_max,
                        eps: d.eps,
                    }),
                    nm - 1,
                )
            }
            LayerKind::Attention => {
                let (qd, kvd) = (d.heads * d.head_dim, d.kv_heads * d.head_dim);
                na += 1;
                (
                    Mixer::Attention(Attention {
                        q: matrix(t, &b("attn_q.weight"), qd, d.hidden)?,
                        k: matrix(t, &b("attn_k.weight"), kvd, d.hidden)?,
                        v: matrix(t, &b("attn_v.weight"), kvd, d.hidden)?,
                        o: matrix(t, &b("attn_output.weight"), d.hidden, qd)?,
                        q_bias: None,
                        k_bias: None,
                        v_bias: None,
                        o_bias: None,
                        heads: d.heads,
                        kv_heads: d.kv_heads,
                        head_dim: d.head_dim,
                        rope: None,
                    }),
                    na - 1,
                )
            }
            LayerKind::Mlp => (
                Mixer::Mlp(Mlp {
                    up: matrix(t, &b("ffn_up.weight"), d.ffn, d.hidden)?,
                    gate: None,
                    down: matrix(t, &b("ffn_down.weight"), d.hidden, d.ffn)?,
                    act: Act::Relu2,
                    up_bias: None,
                    gate_bias: None,
                    down_bias: None,
                }),
                0,
            ),
            LayerKind::Moe => {
                let su = t.get(&b("ffn_up_exps.weight"))?;
                su.expect_shape(&[d.experts, d.moe_ffn, d.hidden])?;
                let sd = t.get(&b("ffn_down_exps.weight"))?;
                sd.expect_shape(&[d.experts, d.hidden, d.moe_ffn])?;
                let shared = if d.shared_ffn > 0 && t.has(&b("ffn_up_shexp.weight")) {
                    Some(Mlp {
                        up: matrix(t, &b("ffn_up_shexp.weight"), d.shared_ffn, d.hidden)?,
                        gate: None,
                        down: matrix(t, &b("ffn_down_shexp.weight"), d.hidden, d.shared_ffn)?,
                        act: Act::Relu2,
                        up_bias: None,
                        gate_bias: None,
                        down_bias: None,
                    })
                } else {
                    None
                };
                let router = matrix(t, &b("ffn_gate_inp.weight"), d.experts, d.hidden)?;
                (
                    Mixer::Moe(Moe {
                        router: Vector::of(&router),
                        bias: opt_vec_f32(t, &b("exp_probs_b.bias"), d.experts)?
                            .unwrap_or_else(|| Vector::zeros(d.experts)),
                        up: (0..d.experts).map(|e| su.index(e)).collect(),
                        down: (0..d.experts).map(|e| sd.index(e)).collect(),
                        shared,
                        experts: d.experts,
                        hidden: d.hidden,
                        topk: d.topk,
                        n_group: d.n_group,
                        topk_group: d.topk_group,
                        norm_topk: d.norm_topk,
                        scale: d.scale,
                    }),
                    0,
                )
            }
            LayerKind::Transformer => unreachable!(),
        };
        blocks.push(Block {
            layer: i,
            norm,
            mixer,
            slot,
        });
    }
    let shape = d.shape();
    Ok(Model {
        meta,
        shape,
        vocab: d.vocab,
        embed,
        lm_head,
        norm_f: vec_f32(t, "output_norm.weight", d.hidden)?,
        eps: d.eps,
        blocks,
    })
}

/// The elastic axes of each Nemotron-H tensor (hub, newest-transformers and GGUF names).
pub fn role(name: &str) -> Option<crate::elastic::Role> {
    use crate::elastic::{Dim::*, Role};
    let g = |dims| Some(Role::new(None, dims));
    match name {
        "backbone.embeddings.weight"
        | "backbone.embedding.weight"
        | "model.embeddings.weight"
        | "model.embed_tokens.weight"
        | "lm_head.weight"
        | "token_embd.weight"
        | "output.weight" => return g(vec![Whole, Hidden]),
        "backbone.norm_f.weight" | "model.norm_f.weight" | "output_norm.weight" => {
            return g(vec![Hidden]);
        }
        _ => {}
    }
    let (l, rest) = super::split_layer(name)?;
    let r = |dims| Some(Role::new(Some(l), dims));
    let rest = rest.strip_prefix("mixer.").unwrap_or(rest);
    if let Some(e) = rest.strip_prefix("experts.") {
        // Hub layout: experts.{e}.up_proj.weight / experts.{e}.down_proj.weight
        if let Some((num, tail)) = e.split_once('.')
            && let Ok(e) = num.parse::<usize>()
        {
            let dims = match tail {
                "up_proj.weight" => vec![MoeFfn(l), Hidden],
                "down_proj.weight" => vec![Hidden, MoeFfn(l)],
                _ => return None,
            };
            return Some(Role {
                layer: Some(l),
                expert: Some(e),
                dims,
                flat: false,
            });
        }
    }
    match rest {
        "norm.weight" if !name.contains("mixer.") => r(vec![Hidden]),
        "attn_norm.weight" => r(vec![Hidden]),
        "in_proj.weight" | "ssm_in.weight" => r(vec![MambaInProj(l), Hidden]),
        "in_proj.bias" => r(vec![MambaInProj(l)]),
        "conv1d.weight" => r(vec![MambaConv(l), Whole, Whole]),
        "ssm_conv1d.weight" => r(vec![MambaConv(l), Whole]),
        "conv1d.bias" | "ssm_conv1d.bias" => r(vec![MambaConv(l)]),
        "dt_bias" | "A_log" | "D" | "ssm_dt.bias" => r(vec![MambaHeads(l)]),
        "ssm_a" | "ssm_d" => r(vec![MambaHeads(l), Whole]),
        "norm.weight" => r(vec![MambaInner(l)]),
        "ssm_norm.weight" => Some(Role {
            layer: Some(l),
            expert: None,
            dims: vec![MambaInner(l)],
            flat: true,
        }),
        "out_proj.weight" | "ssm_out.weight" => r(vec![Hidden, MambaInner(l)]),
        "out_proj.bias" => r(vec![Hidden]),
        "q_proj.weight" | "attn_q.weight" => r(vec![QHeads(l), Hidden]),
        "k_proj.weight" | "v_proj.weight" | "attn_k.weight" | "attn_v.weight" => {
            r(vec![Whole, Hidden])
        }
        "o_proj.weight" | "attn_output.weight" => r(vec![Hidden, QHeads(l)]),
        "up_proj.weight" | "ffn_up.weight" => r(vec![Ffn(l), Hidden]),
        "down_proj.weight" | "ffn_down.weight" => r(vec![Hidden, Ffn(l)]),
        "gate.weight" | "ffn_gate_inp.weight" => r(vec![Experts(l), Hidden]),
        "gate.e_score_correction_bias" | "exp_probs_b.bias" => r(vec![Experts(l)]),
        "experts.up_proj" | "experts.up_proj.weight" | "ffn_up_exps.weight" => {
            r(vec![Experts(l), MoeFfn(l), Hidden])
        }
        "experts.down_proj" | "experts.down_proj.weight" | "ffn_down_exps.weight" => {
            r(vec![Experts(l), Hidden, MoeFfn(l)])
        }
        "shared_experts.up_proj.weight" | "ffn_up_shexp.weight" => r(vec![SharedFfn(l), Hidden]),
        "shared_experts.down_proj.weight" | "ffn_down_shexp.weight" => {
            r(vec![Hidden, SharedFfn(l)])
        }
        _ => None,
    }
}

/// config.json of a rewritten Nemotron-H checkpoint (pattern in the spelling the input used).
pub fn hf_config(
    cfg: &serde_json::Value,
    d: &crate::elastic::SliceDims,
) -> Result<serde_json::Value> {
    let mut c = cfg.clone();
    let o = c
        .as_object_mut()
        .ok_or_else(|| Error::config("config.json", "is not an object"))?;
    let num = |o: &serde_json::Map<String, serde_json::Value>, k: &str| {
        o.get(k).and_then(|v| v.as_u64()).unwrap_or(0) as usize
    };
    let heads = d.uniform(
        "heads",
        |s| s.heads,
        |k| k == LayerKind::Attention,
        num(o, "num_attention_heads"),
    )?;
    let ffn = d.uniform(
        "ffn",
        |s| s.ffn,
        |k| k == LayerKind::Mlp,
        num(o, "intermediate_size"),
    )?;
    let mh = d.uniform(
        "mamba_heads",
        |s| s.mamba_heads,
        |k| k == LayerKind::Mamba,
        num(o, "mamba_num_heads"),
    )?;
    let mp = d.uniform(
        "mamba_head_dim",
        |s| s.mamba_head_dim,
        |k| k == LayerKind::Mamba,
        num(o, "mamba_head_dim"),
    )?;
    let moe = |k| k == LayerKind::Moe;
    o.insert("hidden_size".into(), d.hidden.into());
    o.insert("num_attention_heads".into(), heads.into());
    o.insert("head_dim".into(), d.head_dim.into());
    o.insert("intermediate_size".into(), ffn.into());
    o.insert("mamba_num_heads".into(), mh.into());
    o.insert("mamba_head_dim".into(), mp.into());
    if d.layers.iter().any(|(k, _)| *k == LayerKind::Moe) {
        let e = d.uniform("experts", |s| s.experts, moe, 0)?;
        let key = ["n_routed_experts", "num_local_experts", "num_experts"]
            .into_iter()
            .find(|k| o.contains_key(*k))
            .unwrap_or("n_routed_experts");
        o.insert(key.into(), e.into());
        o.insert(
            "moe_intermediate_size".into(),
            d.uniform("moe_ffn", |s| s.moe_ffn, moe, 0)?.into(),
        );
        o.insert(
            "moe_shared_expert_intermediate_size".into(),
            d.uniform("shared_ffn", |s| s.shared_ffn, moe, 0)?.into(),
        );
    }
    let kinds: Vec<LayerKind> = d.layers.iter().map(|(k, _)| *k).collect();
    if o.contains_key("hybrid_override_pattern") {
        o.insert(
            "hybrid_override_pattern".into(),
            kinds
                .iter()
                .map(|k| k.pattern_char())
                .collect::<String>()
                .into(),
        );
    }
    if let Some(old) = o
        .get("layers_block_type")
        .and_then(|v| v.as_array())
        .cloned()
    {
        let new_vocab = old
            .iter()
            .any(|x| matches!(x.as_str(), Some("linear_attention" | "full_attention")));
        let names: Vec<&str> = kinds
            .iter()
            .map(|k| match (k, new_vocab) {
                (LayerKind::Mamba, true) => "linear_attention",
                (LayerKind::Mamba, false) => "mamba",
                (LayerKind::Attention, true) => "full_attention",
                (LayerKind::Attention, false) => "attention",
                (LayerKind::Mlp, _) => "mlp",
                _ => "moe",
            })
            .collect();
        o.insert("layers_block_type".into(), serde_json::json!(names));
    }
    if o.contains_key("num_hidden_layers") {
        o.insert("num_hidden_layers".into(), kinds.len().into());
    }
    Ok(c)
}

/// GGUF metadata of a rewritten Nemotron-H checkpoint.
pub fn gguf_meta(
    g: &Gguf,
    d: &crate::elastic::SliceDims,
    kept: &[usize],
) -> Result<Vec<(String, crate::formats::gguf::Value)>> {
    use crate::formats::gguf::Value;
    let arch = g.str("general.architecture")?.to_string();
    let k = |s: &str| format!("{arch}.{s}");
    let is = |kind: LayerKind| move |x: LayerKind| x == kind;
    let ff: Vec<usize> = d
        .layers
        .iter()
        .map(|(kind, s)| match kind {
            LayerKind::Mlp => s.ffn,
            LayerKind::Moe => s.moe_ffn,
            _ => 0,
        })
        .collect();
    let mh = d.uniform("mamba_heads", |s| s.mamba_heads, is(LayerKind::Mamba), 0)?;
    let mp = d.uniform(
        "mamba_head_dim",
        |s| s.mamba_head_dim,
        is(LayerKind::Mamba),
        0,
    )?;
    let heads = d.uniform(
        "heads",
        |s| s.heads,
        is(LayerKind::Attention),
        g.get(&k("attention.head_count"))
            .and_then(|v| v.as_u64())
            .unwrap_or(0) as usize,
    )?;
    let mut set = vec![
        (k("embedding_length"), Value::U32(d.hidden as u32)),
        (k("block_count"), Value::U32(d.layers.len() as u32)),
        (
            k("feed_forward_length"),
            Value::Array(ff.iter().map(|&x| Value::U32(x as u32)).collect()),
        ),
        (k("attention.head_count"), Value::U32(heads as u32)),
        (k("attention.key_length"), Value::U32(d.head_dim as u32)),
        (k("attention.value_length"), Value::U32(d.head_dim as u32)),
    ];
    if mh > 0 {
        set.push((k("ssm.inner_size"), Value::U32((mh * mp) as u32)));
        set.push((k("ssm.time_step_rank"), Value::U32(mh as u32)));
    }
    if d.layers.iter().any(|(kind, _)| *kind == LayerKind::Moe) {
        let moe = is(LayerKind::Moe);
        set.push((
            k("expert_count"),
            Value::U32(d.uniform("experts", |s| s.experts, moe, 0)? as u32),
        ));
        set.push((
            k("expert_feed_forward_length"),
            Value::U32(d.uniform("moe_ffn", |s| s.moe_ffn, moe, 0)? as u32),
        ));
        set.push((
            k("expert_shared_feed_forward_length"),
            Value::U32(d.uniform("shared_ffn", |s| s.shared_ffn, moe, 0)? as u32),
        ));
    }
    Ok(super::gguf_meta_with(g, kept, set))
}

/// HF (hub layout) name ↔ GGUF name of Nemotron-H tensors (suffixes after the layer prefix).
/// Stacked experts (`mixer.experts.up_proj`) map to `ffn_up_exps`; the hub layout's per-expert
/// tensors are stacked and unstacked by the writer.
pub const NAMES: [(&str, &str); 24] = [
    ("backbone.embeddings.weight", "token_embd.weight"),
    ("lm_head.weight", "output.weight"),
    ("backbone.norm_f.weight", "output_norm.weight"),
    ("norm.weight", "attn_norm.weight"),
    ("mixer.in_proj.weight", "ssm_in.weight"),
    ("mixer.conv1d.weight", "ssm_conv1d.weight"),
    ("mixer.conv1d.bias", "ssm_conv1d.bias"),
    ("mixer.dt_bias", "ssm_dt.bias"),
    ("mixer.A_log", "ssm_a"),
    ("mixer.D", "ssm_d"),
    ("mixer.norm.weight", "ssm_norm.weight"),
    ("mixer.out_proj.weight", "ssm_out.weight"),
    ("mixer.q_proj.weight", "attn_q.weight"),
    ("mixer.k_proj.weight", "attn_k.weight"),
    ("mixer.v_proj.weight", "attn_v.weight"),
    ("mixer.o_proj.weight", "attn_output.weight"),
    ("mixer.up_proj.weight", "ffn_up.weight"),
    ("mixer.down_proj.weight", "ffn_down.weight"),
    ("mixer.gate.weight", "ffn_gate_inp.weight"),
    ("mixer.gate.e_score_correction_bias", "exp_probs_b.bias"),
    ("mixer.experts.up_proj", "ffn_up_exps.weight"),
    ("mixer.experts.down_proj", "ffn_down_exps.weight"),
    ("mixer.shared_experts.up_proj.weight", "ffn_up_shexp.weight"),
    (
        "mixer.shared_experts.down_proj.weight",
        "ffn_down_shexp.weight",
    ),
];

fn moe_params(m: &Model) -> Option<&crate::layers::moe::Moe> {
    m.blocks.iter().find_map(|b| match &b.mixer {
        Mixer::Moe(x) => Some(x),
        _ => None,
    })
}

fn mamba_params(m: &Model) -> Option<&Mamba2> {
    m.blocks.iter().find_map(|b| match &b.mixer {
        Mixer::Mamba(x) => Some(x),
        _ => None,
    })
}

/// GGUF metadata for a Nemotron-H model written from an HF checkpoint (llama.cpp's converter keys).
pub fn gguf_meta_from_hf(
    d: &crate::elastic::SliceDims,
    m: &Model,
) -> Result<Vec<(String, crate::formats::gguf::Value)>> {
    use crate::formats::gguf::Value;
    let moe = d.layers.iter().any(|(k, _)| *k == LayerKind::Moe);
    let arch = if moe { "nemotron_h_moe" } else { "nemotron_h" };
    let k = |s: &str| format!("{arch}.{s}");
    let is = |kind: LayerKind| move |x: LayerKind| x == kind;
    let s = &m.shape;
    let ff: Vec<Value> = d
        .layers
        .iter()
        .map(|(kind, z)| {
            Value::U32(match kind {
                LayerKind::Mlp => z.ffn,
                LayerKind::Moe => z.moe_ffn,
                _ => 0,
            } as u32)
        })
        .collect();
    let kv: Vec<Value> = d
        .layers
        .iter()
        .map(|(kind, _)| {
            Value::U32(if *kind == LayerKind::Attention {
                s.kv_heads as u32
            } else {
                0
            })
        })
        .collect();
    let mh = d.uniform(
        "mamba_heads",
        |z| z.mamba_heads,
        is(LayerKind::Mamba),
        s.mamba_heads,
    )?;
    let mp = d.uniform(
        "mamba_head_dim",
        |z| z.mamba_head_dim,
        is(LayerKind::Mamba),
        s.mamba_head_dim,
    )?;
    let mut v = vec![
        ("general.architecture".into(), Value::Str(arch.into())),
        ("general.name".into(), super::gguf_name(m)),
        (k("block_count"), Value::U32(d.layers.len() as u32)),
        (k("context_length"), Value::U32(m.meta.context as u32)),
        (k("embedding_length"), Value::U32(d.hidden as u32)),
        (k("feed_forward_length"), Value::Array(ff)),
        (
            k("attention.head_count"),
            Value::U32(d.uniform("heads", |z| z.heads, is(LayerKind::Attention), s.heads)? as u32),
        ),
        (k("attention.head_count_kv"), Value::Array(kv)),
        (k("attention.layer_norm_epsilon"), Value::F32(m.eps)),
        (k("attention.key_length"), Value::U32(d.head_dim as u32)),
        (k("attention.value_length"), Value::U32(d.head_dim as u32)),
        (k("rope.dimension_count"), Value::U32(d.head_dim as u32)),
        (k("vocab_size"), Value::U32(m.vocab as u32)),
    ];
    if let Some(mb) = mamba_params(m) {
        v.extend([
            (k("ssm.conv_kernel"), Value::U32(mb.conv_k as u32)),
            (k("ssm.state_size"), Value::U32(mb.state as u32)),
            (k("ssm.group_count"), Value::U32(mb.groups as u32)),
            (k("ssm.inner_size"), Value::U32((mh * mp) as u32)),
            (k("ssm.time_step_rank"), Value::U32(mh as u32)),
        ]);
    }
    if let Some(e) = moe_params(m) {
        let moe = is(LayerKind::Moe);
        v.extend([
            (
                k("expert_count"),
                Value::U32(d.uniform("experts", |z| z.experts, moe, 0)? as u32),
            ),
            (k("expert_used_count"), Value::U32(e.topk as u32)),
            (k("expert_group_count"), Value::U32(e.n_group as u32)),
            (
                k("expert_group_used_count"),
                Value::U32(e.topk_group as u32),
            ),
            (
                k("expert_feed_forward_length"),
                Value::U32(d.uniform("moe_ffn", |z| z.moe_ffn, moe, 0)? as u32),
            ),
            (
                k("expert_shared_feed_forward_length"),
                Value::U32(d.uniform("shared_ffn", |z| z.shared_ffn, moe, 0)? as u32),
            ),
            (
                k("expert_shared_count"),
                Value::U32(e.shared.is_some() as u32),
            ),
            (k("expert_weights_norm"), Value::Bool(e.norm_topk)),
            (k("expert_weights_scale"), Value::F32(e.scale)),
        ]);
    }
    Ok(v)
}

/// config.json (hub spelling) for a Nemotron-H model written from a GGUF file.
pub fn hf_config_from_gguf(d: &crate::elastic::SliceDims, m: &Model) -> Result<serde_json::Value> {
    let s = &m.shape;
    let is = |kind: LayerKind| move |x: LayerKind| x == kind;
    let pattern: String = d.layers.iter().map(|(k, _)| k.pattern_char()).collect();
    let mb = mamba_params(m);
    let mut c = serde_json::json!({
        "architectures": ["NemotronHForCausalLM"],
        "model_type": "nemotron_h",
        "hybrid_override_pattern": pattern,
        "num_hidden_layers": d.layers.len(),
        "hidden_size": d.hidden,
        "vocab_size": m.vocab,
        "num_attention_heads": d.uniform("heads", |z| z.heads, is(LayerKind::Attention), s.heads)?,
        "num_key_value_heads": s.kv_heads,
        "head_dim": d.head_dim,
        "intermediate_size": d.uniform("ffn", |z| z.ffn, is(LayerKind::Mlp), s.ffn)?,
        "mlp_hidden_act": "relu2",
        "mamba_num_heads": d.uniform("mamba_heads", |z| z.mamba_heads, is(LayerKind::Mamba), s.mamba_heads)?,
        "mamba_head_dim": d.uniform("mamba_head_dim", |z| z.mamba_head_dim, is(LayerKind::Mamba), s.mamba_head_dim)?,
        "n_groups": s.mamba_groups,
        "ssm_state_size": s.ssm_state,
        "conv_kernel": mb.map_or(4, |x| x.conv_k),
        "chunk_size": mb.map_or(128, |x| x.chunk),
        "use_conv_bias": true,
        "mamba_hidden_act": "silu",
        "use_bias": false,
        "mlp_bias": false,
        "attention_bias": false,
        "residual_in_fp32": false,
        "layer_norm_epsilon": m.eps,
        "time_step_limit": [0.0, {"__float__": "Infinity"}],
        "tie_word_embeddings": m.lm_head.is_none(),
        "max_position_embeddings": m.meta.context,
        "bos_token_id": m.meta.bos,
        "eos_token_id": m.meta.eos.first(),
        "torch_dtype": "float32",
    });
    if let Some(e) = moe_params(m) {
        let moe = is(LayerKind::Moe);
        let o = c.as_object_mut().unwrap();
        o.insert(
            "n_routed_experts".into(),
            d.uniform("experts", |z| z.experts, moe, 0)?.into(),
        );
        o.insert("num_experts_per_tok".into(), e.topk.into());
        o.insert(
            "moe_intermediate_size".into(),
            d.uniform("moe_ffn", |z| z.moe_ffn, moe, 0)?.into(),
        );
        o.insert(
            "moe_shared_expert_intermediate_size".into(),
            d.uniform("shared_ffn", |z| z.shared_ffn, moe, 0)?.into(),
        );
        o.insert(
            "n_shared_experts".into(),
            (e.shared.is_some() as usize).into(),
        );
        o.insert("n_group".into(), e.n_group.into());
        o.insert("topk_group".into(), e.topk_group.into());
        o.insert("norm_topk_prob".into(), e.norm_topk.into());
        o.insert("routed_scaling_factor".into(), e.scale.into());
    }
    Ok(c)
}
