//! Llama family: pre-norm decoder layers of attention (RoPE, GQA) and SwiGLU MLP, each layer
//! mapped to two blocks of the shared model. HF layout (`model.layers.N.self_attn.q_proj`, RoPE on
//! halves) and GGUF layout (`blk.N.attn_q`, q/k permuted so RoPE pairs are adjacent).

use super::{Cfg, matrix, opt_vec_f32, vec_f32};
use crate::budget::{LayerKind, Shape};
use crate::error::{Error, Result};
use crate::formats::TensorMap;
use crate::formats::gguf::Gguf;
use crate::layers::attention::{Attention, Rope};
use crate::layers::mlp::{Act, Mlp};
use crate::model::{Block, Meta, Mixer, Model};

struct Dims {
    vocab: usize,
    hidden: usize,
    layers: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    ffn: usize,
    eps: f32,
    theta: f32,
}

fn shape(d: &Dims) -> Shape {
    Shape {
        hidden: d.hidden,
        layers: vec![LayerKind::Transformer; d.layers],
        heads: d.heads,
        kv_heads: d.kv_heads,
        head_dim: d.head_dim,
        ffn: d.ffn,
        moe_ffn: 0,
        experts: 0,
        experts_per_tok: 0,
        expert_groups: 1,
        shared_ffn: 0,
        mamba_heads: 0,
        mamba_head_dim: 0,
        mamba_groups: 1,
        ssm_state: 0,
    }
}

fn check_dims(d: &Dims, src: &str) -> Result<()> {
    if d.heads == 0 || d.kv_heads == 0 || !d.heads.is_multiple_of(d.kv_heads) {
        return Err(Error::config(
            format!("{src} heads"),
            format!(
                "{} query heads do not split into {} KV groups",
                d.heads, d.kv_heads
            ),
        ));
    }
    if !d.head_dim.is_multiple_of(2) {
        return Err(Error::config(
            format!("{src} head_dim"),
            "RoPE needs an even head size",
        ));
    }
    if d.layers == 0 || d.hidden == 0 || d.vocab == 0 {
        return Err(Error::config(
            src,
            "hidden size, layer count and vocabulary must be positive",
        ));
    }
    Ok(())
}

struct Names {
    embed: &'static str,
    norm_f: &'static str,
    head: &'static str,
    attn_norm: &'static str,
    q: &'static str,
    k: &'static str,
    v: &'static str,
    o: &'static str,
    ffn_norm: &'static str,
    gate: &'static str,
    up: &'static str,
    down: &'static str,
}

const HF: Names = Names {
    embed: "model.embed_tokens.weight",
    norm_f: "model.norm.weight",
    head: "lm_head.weight",
    attn_norm: "model.layers.{}.input_layernorm.weight",
    q: "model.layers.{}.self_attn.q_proj",
    k: "model.layers.{}.self_attn.k_proj",
    v: "model.layers.{}.self_attn.v_proj",
    o: "model.layers.{}.self_attn.o_proj",
    ffn_norm: "model.layers.{}.post_attention_layernorm.weight",
    gate: "model.layers.{}.mlp.gate_proj",
    up: "model.layers.{}.mlp.up_proj",
    down: "model.layers.{}.mlp.down_proj",
};

const GGUF: Names = Names {
    embed: "token_embd.weight",
    norm_f: "output_norm.weight",
    head: "output.weight",
    attn_norm: "blk.{}.attn_norm.weight",
    q: "blk.{}.attn_q",
    k: "blk.{}.attn_k",
    v: "blk.{}.attn_v",
    o: "blk.{}.attn_output",
    ffn_norm: "blk.{}.ffn_norm.weight",
    gate: "blk.{}.ffn_gate",
    up: "blk.{}.ffn_up",
    down: "blk.{}.ffn_down",
};

/// Layer `i`'s matrix weights in both layouts (GGUF, HF), in the order q, k, v, o, gate, up, down.
pub fn matrix_names(i: usize) -> [[String; 2]; 7] {
    let w = |f: fn(&Names) -> &'static str| [GGUF, HF].map(|t| format!("{}.weight", n(f(&t), i)));
    [
        w(|t| t.q),
        w(|t| t.k),
        w(|t| t.v),
        w(|t| t.o),
        w(|t| t.gate),
        w(|t| t.up),
        w(|t| t.down),
    ]
}

fn n(pat: &str, i: usize) -> String {
    pat.replace("{}", &i.to_string())
}

fn build(
    d: &Dims,
    t: &TensorMap,
    names: &Names,
    tied: Option<bool>,
    interleaved: bool,
    meta: Meta,
) -> Result<Model> {
    let embed = matrix(t, names.embed, d.vocab, d.hidden)?;
    let lm_head = match tied {
        Some(true) => None,
        Some(false) => Some(matrix(t, names.head, d.vocab, d.hidden)?),
        None => {
            if t.has(names.head) {
                Some(matrix(t, names.head, d.vocab, d.hidden)?)
            } else {
                None
            }
        }
    };
    let (qd, kvd) = (d.heads * d.head_dim, d.kv_heads * d.head_dim);
    let mut blocks = Vec::with_capacity(2 * d.layers);
    for i in 0..d.layers {
        let w = |p: &str| format!("{}.weight", n(p, i));
        let b = |p: &str| format!("{}.bias", n(p, i));
        blocks.push(Block {
            layer: i,
            norm: vec_f32(t, &n(names.attn_norm, i), d.hidden)?,
            slot: i,
            mixer: Mixer::Attention(Attention {
                q: matrix(t, &w(names.q), qd, d.hidden)?,
                k: matrix(t, &w(names.k), kvd, d.hidden)?,
                v: matrix(t, &w(names.v), kvd, d.hidden)?,
                o: matrix(t, &w(names.o), d.hidden, qd)?,
                q_bias: opt_vec_f32(t, &b(names.q), qd)?,
                k_bias: opt_vec_f32(t, &b(names.k), kvd)?,
                v_bias: opt_vec_f32(t, &b(names.v), kvd)?,
                o_bias: opt_vec_f32(t, &b(names.o), d.hidden)?,
                heads: d.heads,
                kv_heads: d.kv_heads,
                head_dim: d.head_dim,
                rope: Some(Rope::new(d.head_dim, d.theta, interleaved)),
            }),
        });
        blocks.push(Block {
            layer: i,
            norm: vec_f32(t, &n(names.ffn_norm, i), d.hidden)?,
            slot: 0,
            mixer: Mixer::Mlp(Mlp {
                up: matrix(t, &w(names.up), d.ffn, d.hidden)?,
                gate: Some(matrix(t, &w(names.gate), d.ffn, d.hidden)?),
                down: matrix(t, &w(names.down), d.hidden, d.ffn)?,
                act: Act::SwiGlu,
                up_bias: opt_vec_f32(t, &b(names.up), d.ffn)?,
                gate_bias: opt_vec_f32(t, &b(names.gate), d.ffn)?,
                down_bias: opt_vec_f32(t, &b(names.down), d.hidden)?,
            }),
        });
    }
    Ok(Model {
        meta,
        shape: shape(d),
        vocab: d.vocab,
        embed,
        lm_head,
        norm_f: vec_f32(t, names.norm_f, d.hidden)?,
        eps: d.eps,
        blocks,
    })
}

pub fn from_hf(cfg: &Cfg, t: &TensorMap, meta: Meta) -> Result<Model> {
    let hidden = cfg.usize(&["hidden_size"])?;
    let heads = cfg.usize(&["num_attention_heads"])?;
    let d = Dims {
        vocab: cfg.usize(&["vocab_size"])?,
        hidden,
        layers: cfg.usize(&["num_hidden_layers"])?,
        heads,
        kv_heads: cfg.usize_or(&["num_key_value_heads"], heads)?,
        head_dim: cfg.usize_or(&["head_dim"], hidden.checked_div(heads).unwrap_or(0))?,
        ffn: cfg.usize(&["intermediate_size"])?,
        eps: cfg.f64_or(&["rms_norm_eps"], 1e-6)? as f32,
        theta: match cfg
            .get(&["rope_parameters"])
            .and_then(|r| r.get("rope_theta"))
        {
            Some(x) => super::parse_float(x)
                .ok_or_else(|| cfg.err("rope_parameters.rope_theta", "is not a number"))?
                as f32,
            None => cfg.f64_or(&["rope_theta"], 10000.0)? as f32,
        },
    };
    if let Some(rs) = cfg.get(&["rope_scaling", "rope_parameters"]) {
        let ty = rs
            .get("rope_type")
            .or(rs.get("type"))
            .and_then(|x| x.as_str())
            .unwrap_or("");
        if ty != "default" {
            return Err(cfg.err(
                "rope_scaling",
                format!("rope scaling {ty:?} is not supported yet"),
            ));
        }
    }
    check_dims(&d, &cfg.path.display().to_string())?;
    let tied = cfg.bool_or(&["tie_word_embeddings"], false)?;
    build(&d, t, &HF, Some(tied), false, meta)
}

pub fn from_gguf(g: &Gguf, meta: Meta) -> Result<Model> {
    let a = "llama";
    let u = |k: &str| super::gguf_meta_u(g, &format!("{a}.{k}"));
    let hidden = u("embedding_length")?;
    let heads = u("attention.head_count")?;
    let embed = g.tensors.get("token_embd.weight")?;
    let d = Dims {
        vocab: embed.shape[0],
        hidden,
        layers: u("block_count")?,
        heads,
        kv_heads: u("attention.head_count_kv").unwrap_or(heads),
        head_dim: u("attention.key_length").unwrap_or(hidden.checked_div(heads).unwrap_or(0)),
        ffn: u("feed_forward_length")?,
        eps: g
            .f64(&format!("{a}.attention.layer_norm_rms_epsilon"))
            .unwrap_or(1e-5) as f32,
        theta: g.f64(&format!("{a}.rope.freq_base")).unwrap_or(10000.0) as f32,
    };
    if let Some(ty) = g
        .get(&format!("{a}.rope.scaling.type"))
        .and_then(|v| v.as_str())
        && ty != "none"
    {
        return Err(Error::format(
            &g.path,
            format!("rope scaling {ty:?} is not supported yet"),
        ));
    }
    check_dims(&d, &format!("{} metadata", g.path.display()))?;
    build(&d, &g.tensors, &GGUF, None, true, meta)
}

/// The elastic axes of each Llama tensor (HF and GGUF names); None for tensors kept as they are.
pub fn role(name: &str) -> Option<crate::elastic::Role> {
    use crate::elastic::{Dim::*, Role};
    let g = |dims| Some(Role::new(None, dims));
    match name {
        "model.embed_tokens.weight" | "lm_head.weight" | "token_embd.weight" | "output.weight" => {
            return g(vec![Whole, Hidden]);
        }
        "model.norm.weight" | "output_norm.weight" => return g(vec![Hidden]),
        _ => {}
    }
    let (l, rest) = super::split_layer(name)?;
    let r = |dims| Some(Role::new(Some(l), dims));
    match rest {
        "input_layernorm.weight"
        | "post_attention_layernorm.weight"
        | "attn_norm.weight"
        | "ffn_norm.weight" => r(vec![Hidden]),
        "self_attn.q_proj.weight" | "attn_q.weight" => r(vec![QHeads(l), Hidden]),
        "self_attn.q_proj.bias" | "attn_q.bias" => r(vec![QHeads(l)]),
        "self_attn.k_proj.weight"
        | "self_attn.v_proj.weight"
        | "attn_k.weight"
        | "attn_v.weight" => r(vec![Whole, Hidden]),
        "self_attn.k_proj.bias" | "self_attn.v_proj.bias" | "attn_k.bias" | "attn_v.bias" => {
            r(vec![Whole])
        }
        "self_attn.o_proj.weight" | "attn_output.weight" => r(vec![Hidden, QHeads(l)]),
        "self_attn.o_proj.bias" | "attn_output.bias" | "mlp.down_proj.bias" | "ffn_down.bias" => {
            r(vec![Hidden])
        }
        "mlp.gate_proj.weight" | "mlp.up_proj.weight" | "ffn_gate.weight" | "ffn_up.weight" => {
            r(vec![Ffn(l), Hidden])
        }
        "mlp.gate_proj.bias" | "mlp.up_proj.bias" | "ffn_gate.bias" | "ffn_up.bias" => {
            r(vec![Ffn(l)])
        }
        "mlp.down_proj.weight" | "ffn_down.weight" => r(vec![Hidden, Ffn(l)]),
        _ => None,
    }
}

/// config.json of a rewritten (sliced or re-ordered) Llama checkpoint.
pub fn hf_config(
    cfg: &serde_json::Value,
    d: &crate::elastic::SliceDims,
) -> Result<serde_json::Value> {
    warn_heads(d);
    let mut c = cfg.clone();
    let all = |_| true;
    let o = c
        .as_object_mut()
        .ok_or_else(|| Error::config("config.json", "is not an object"))?;
    let ffn = d.uniform("ffn", |s| s.ffn, all, 0)?;
    let heads = d.uniform("heads", |s| s.heads, all, 0)?;
    o.insert("hidden_size".into(), d.hidden.into());
    o.insert("intermediate_size".into(), ffn.into());
    o.insert("num_attention_heads".into(), heads.into());
    o.insert("num_hidden_layers".into(), d.layers.len().into());
    o.insert("head_dim".into(), d.head_dim.into());
    Ok(c)
}

/// GGUF metadata of a rewritten Llama checkpoint.
pub fn gguf_meta(
    g: &Gguf,
    d: &crate::elastic::SliceDims,
    kept: &[usize],
) -> Result<Vec<(String, crate::formats::gguf::Value)>> {
    use crate::formats::gguf::Value;
    let ffn: Vec<usize> = d.layers.iter().map(|(_, s)| s.ffn).collect();
    let heads: Vec<usize> = d.layers.iter().map(|(_, s)| s.heads).collect();
    let set = vec![
        (
            "llama.embedding_length".to_string(),
            Value::U32(d.hidden as u32),
        ),
        (
            "llama.block_count".to_string(),
            Value::U32(d.layers.len() as u32),
        ),
        (
            "llama.feed_forward_length".to_string(),
            super::u32_or_array(&ffn),
        ),
        (
            "llama.attention.head_count".to_string(),
            super::u32_or_array(&heads),
        ),
        (
            "llama.attention.key_length".to_string(),
            Value::U32(d.head_dim as u32),
        ),
        (
            "llama.attention.value_length".to_string(),
            Value::U32(d.head_dim as u32),
        ),
    ];
    Ok(super::gguf_meta_with(g, kept, set))
}

/// HF name ↔ GGUF name of Llama tensors (suffixes after the layer prefix; biases included).
pub const NAMES: [(&str, &str); 19] = [
    ("model.embed_tokens.weight", "token_embd.weight"),
    ("lm_head.weight", "output.weight"),
    ("model.norm.weight", "output_norm.weight"),
    ("input_layernorm.weight", "attn_norm.weight"),
    ("post_attention_layernorm.weight", "ffn_norm.weight"),
    ("self_attn.q_proj.weight", "attn_q.weight"),
    ("self_attn.k_proj.weight", "attn_k.weight"),
    ("self_attn.v_proj.weight", "attn_v.weight"),
    ("self_attn.o_proj.weight", "attn_output.weight"),
    ("self_attn.q_proj.bias", "attn_q.bias"),
    ("self_attn.k_proj.bias", "attn_k.bias"),
    ("self_attn.v_proj.bias", "attn_v.bias"),
    ("self_attn.o_proj.bias", "attn_output.bias"),
    ("mlp.gate_proj.weight", "ffn_gate.weight"),
    ("mlp.up_proj.weight", "ffn_up.weight"),
    ("mlp.down_proj.weight", "ffn_down.weight"),
    ("mlp.gate_proj.bias", "ffn_gate.bias"),
    ("mlp.up_proj.bias", "ffn_up.bias"),
    ("mlp.down_proj.bias", "ffn_down.bias"),
];

/// GGUF metadata for a Llama model written from an HF checkpoint (llama.cpp's converter keys).
pub fn gguf_meta_from_hf(
    cfg: &serde_json::Value,
    d: &crate::elastic::SliceDims,
    m: &Model,
) -> Vec<(String, crate::formats::gguf::Value)> {
    use crate::formats::gguf::Value;
    let f = |k: &str, def: f64| cfg.get(k).and_then(|v| v.as_f64()).unwrap_or(def);
    let theta = cfg
        .get("rope_parameters")
        .and_then(|r| r.get("rope_theta"))
        .and_then(|v| v.as_f64())
        .unwrap_or_else(|| f("rope_theta", 10000.0));
    let ffn: Vec<usize> = d.layers.iter().map(|(_, s)| s.ffn).collect();
    let heads: Vec<usize> = d.layers.iter().map(|(_, s)| s.heads).collect();
    let a = |k: &str| format!("llama.{k}");
    vec![
        ("general.architecture".into(), Value::Str("llama".into())),
        ("general.name".into(), super::gguf_name(m)),
        (a("block_count"), Value::U32(d.layers.len() as u32)),
        (a("context_length"), Value::U32(m.meta.context as u32)),
        (a("embedding_length"), Value::U32(d.hidden as u32)),
        (a("feed_forward_length"), super::u32_or_array(&ffn)),
        (a("attention.head_count"), super::u32_or_array(&heads)),
        (
            a("attention.head_count_kv"),
            Value::U32(m.shape.kv_heads as u32),
        ),
        (a("rope.freq_base"), Value::F32(theta as f32)),
        (a("attention.layer_norm_rms_epsilon"), Value::F32(m.eps)),
        (a("rope.dimension_count"), Value::U32(d.head_dim as u32)),
        (a("attention.key_length"), Value::U32(d.head_dim as u32)),
        (a("attention.value_length"), Value::U32(d.head_dim as u32)),
        (a("vocab_size"), Value::U32(m.vocab as u32)),
    ]
}

/// config.json for a Llama model written from a GGUF file.
pub fn hf_config_from_gguf(
    g: &Gguf,
    d: &crate::elastic::SliceDims,
    m: &Model,
) -> Result<serde_json::Value> {
    warn_heads(d);
    let all = |_| true;
    Ok(serde_json::json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": d.hidden,
        "intermediate_size": d.uniform("ffn", |s| s.ffn, all, 0)?,
        "num_attention_heads": d.uniform("heads", |s| s.heads, all, 0)?,
        "num_key_value_heads": m.shape.kv_heads,
        "head_dim": d.head_dim,
        "num_hidden_layers": d.layers.len(),
        "rms_norm_eps": m.eps,
        "rope_theta": g.f64("llama.rope.freq_base").unwrap_or(10000.0),
        "max_position_embeddings": m.meta.context,
        "vocab_size": m.vocab,
        "tie_word_embeddings": m.lm_head.is_none(),
        "hidden_act": "silu",
        "attention_bias": false,
        "mlp_bias": false,
        "bos_token_id": m.meta.bos,
        "eos_token_id": m.meta.eos.first(),
        "torch_dtype": "float32",
    }))
}

/// transformers' LlamaConfig refuses a hidden size that the head count does not divide (even
/// with an explicit head_dim); elastica and llama.cpp do not care.
fn warn_heads(d: &crate::elastic::SliceDims) {
    if let Some((_, s)) = d
        .layers
        .iter()
        .find(|(_, s)| s.heads > 0 && !d.hidden.is_multiple_of(s.heads))
    {
        eprintln!(
            "warning: hidden size {} is not a multiple of the {} attention heads; transformers will refuse this config.json (elastica and llama.cpp load it)",
            d.hidden, s.heads
        );
    }
}
