//! Llama family: pre-norm decoder layers of attention (RoPE, GQA) and SwiGLU MLP, each layer
//! mapped to two blocks of the shared model. HF layout (`model.layers.N.self_attn.q_proj`, RoPE on
//! halves) and GGUF layout (`blk.N.attn_q`, q/k permuted so RoPE pairs are adjacent).

use super::role::{Dim, TensorName, t};
use super::{Arch, HParams, lenient, matrix, opt_vec_f32, parse_config, vec_f32};
use crate::error::{Error, Result};
use crate::formats::TensorMap;
use crate::formats::gguf::Gguf;
use crate::layers::attention::{Attention, Rope};
use crate::layers::mlp::{Act, Mlp};
use crate::model::{Block, Format, Meta, Mixer, Model};
use crate::shape::{Axis, AxisMap, LayerKind};
use serde::{Deserialize, Serialize};
use serde_json::Value as Json;
use std::path::Path;

pub struct Llama;

/// config.json (LlamaConfig).
#[derive(Debug, Default, Deserialize, Serialize)]
struct Config {
    vocab_size: Option<usize>,
    hidden_size: Option<usize>,
    num_hidden_layers: Option<usize>,
    num_attention_heads: Option<usize>,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    intermediate_size: Option<usize>,
    #[serde(default, deserialize_with = "lenient")]
    rms_norm_eps: Option<f64>,
    #[serde(default, deserialize_with = "lenient")]
    rope_theta: Option<f64>,
    #[serde(skip_serializing)]
    rope_scaling: Option<Json>,
    #[serde(skip_serializing)]
    rope_parameters: Option<Json>,
    tie_word_embeddings: Option<bool>,
    max_position_embeddings: Option<usize>,
}

/// The config.json fields a rewrite replaces.
const SIZES: [&str; 5] = [
    "hidden_size",
    "intermediate_size",
    "num_attention_heads",
    "num_hidden_layers",
    "head_dim",
];

fn check(hp: &HParams, src: &str) -> Result<()> {
    let (heads, kv) = (hp.size[Axis::Heads], hp.kv_heads);
    if heads == 0 || kv == 0 || !heads.is_multiple_of(kv) {
        let m = format!("{heads} query heads do not split into {kv} KV groups");
        return Err(Error::config(format!("{src} heads"), m));
    }
    if !hp.head_dim.is_multiple_of(2) {
        return Err(Error::config(
            format!("{src} head_dim"),
            "RoPE needs an even head size",
        ));
    }
    if hp.layers.is_empty() || hp.hidden() == 0 || hp.vocab == 0 {
        let m = "hidden size, layer count and vocabulary must be positive";
        return Err(Error::config(src, m));
    }
    Ok(())
}

fn hparams(vocab: usize, hidden: usize, layers: usize, heads: usize, ffn: usize) -> HParams {
    let mut size = AxisMap::default();
    size[Axis::Hidden] = hidden;
    size[Axis::Heads] = heads;
    size[Axis::Ffn] = ffn;
    let mut hp = HParams::new(&vec![LayerKind::Transformer; layers], size);
    hp.vocab = vocab;
    hp
}

/// transformers' LlamaConfig refuses a hidden size that the head count does not divide (even
/// with an explicit head_dim); elastica and llama.cpp do not care.
fn warn_heads(hp: &HParams) {
    let hidden = hp.hidden();
    if let Some(h) = hp
        .layers
        .iter()
        .map(|l| l.size[Axis::Heads])
        .find(|&h| h > 0 && !hidden.is_multiple_of(h))
    {
        eprintln!(
            "warning: hidden size {hidden} is not a multiple of the {h} attention heads; transformers will refuse this config.json (elastica and llama.cpp load it)"
        );
    }
}

impl Arch for Llama {
    fn name(&self) -> &'static str {
        "llama"
    }
    fn hf_names(&self) -> &'static [&'static str] {
        &["llama", "mistral", "LlamaForCausalLM"]
    }
    fn gguf_names(&self) -> &'static [&'static str] {
        &["llama"]
    }

    fn read_hf(&self, v: &Json, path: &Path) -> Result<HParams> {
        let c: Config = parse_config(v, path)?;
        let err = |k: &str, m: String| Error::config(format!("{}: {k}", path.display()), m);
        let need = |x: Option<usize>, k: &str| x.ok_or_else(|| err(k, "missing".into()));
        let hidden = need(c.hidden_size, "hidden_size")?;
        let heads = need(c.num_attention_heads, "num_attention_heads")?;
        let (vocab, layers) = (
            need(c.vocab_size, "vocab_size")?,
            need(c.num_hidden_layers, "num_hidden_layers")?,
        );
        let mut hp = hparams(
            vocab,
            hidden,
            layers,
            heads,
            need(c.intermediate_size, "intermediate_size")?,
        );
        hp.kv_heads = c.num_key_value_heads.unwrap_or(heads);
        hp.head_dim = c.head_dim.unwrap_or(hidden.checked_div(heads).unwrap_or(0));
        hp.eps = c.rms_norm_eps.unwrap_or(1e-6) as f32;
        hp.rope_theta = c.rope_theta.unwrap_or(10000.0) as f32;
        if let Some(x) = c.rope_parameters.as_ref().and_then(|r| r.get("rope_theta")) {
            hp.rope_theta = super::parse_float(x)
                .ok_or_else(|| err("rope_parameters.rope_theta", "is not a number".into()))?
                as f32;
        }
        if let Some(rs) = c.rope_scaling.as_ref().or(c.rope_parameters.as_ref()) {
            let ty = rs
                .get("rope_type")
                .or(rs.get("type"))
                .and_then(|x| x.as_str())
                .unwrap_or("");
            if ty != "default" {
                return Err(err(
                    "rope_scaling",
                    format!("rope scaling {ty:?} is not supported yet"),
                ));
            }
        }
        hp.tied = Some(c.tie_word_embeddings.unwrap_or(false));
        check(&hp, &path.display().to_string())?;
        Ok(hp)
    }

    fn read_gguf(&self, g: &Gguf) -> Result<HParams> {
        let req = [
            "embedding_length",
            "attention.head_count",
            "block_count",
            "feed_forward_length",
        ];
        let n = g.u64("llama.block_count").unwrap_or(0) as usize;
        let hp = HParams::from_gguf(g, vec![LayerKind::Transformer; n], &req)?;
        if let Some(ty) = g.get("llama.rope.scaling.type").and_then(|v| v.as_str())
            && ty != "none"
        {
            return Err(Error::format(
                &g.path,
                format!("rope scaling {ty:?} is not supported yet"),
            ));
        }
        check(&hp, &format!("{} metadata", g.path.display()))?;
        Ok(hp)
    }

    fn hf_config(&self, hp: &HParams, base: Option<&Json>, m: &Model) -> Result<Json> {
        warn_heads(hp);
        let c = Config {
            vocab_size: Some(hp.vocab),
            hidden_size: Some(hp.hidden()),
            num_hidden_layers: Some(hp.layers.len()),
            num_attention_heads: Some(hp.uniform(Axis::Heads)?),
            num_key_value_heads: Some(hp.kv_heads),
            head_dim: Some(hp.head_dim),
            intermediate_size: Some(hp.uniform(Axis::Ffn)?),
            rms_norm_eps: Some(hp.eps as f64),
            rope_theta: Some(hp.rope_theta as f64),
            rope_scaling: None,
            rope_parameters: None,
            tie_word_embeddings: Some(m.lm_head.is_none()),
            max_position_embeddings: Some(hp.context),
        };
        let mut sizes = super::to_object(&c);
        let mut v = match base {
            Some(b) => {
                sizes.retain(|k, _| SIZES.contains(&k.as_str()));
                b.clone()
            }
            None => serde_json::json!({
                "architectures": ["LlamaForCausalLM"],
                "model_type": "llama",
                "hidden_act": "silu",
                "attention_bias": false,
                "mlp_bias": false,
                "bos_token_id": m.meta.bos,
                "eos_token_id": m.meta.eos.first(),
                "torch_dtype": "float32",
            }),
        };
        v.as_object_mut()
            .ok_or_else(|| Error::config("config.json", "is not an object"))?
            .extend(sizes);
        Ok(v)
    }

    fn build(&self, hp: &HParams, t: &TensorMap, format: Format, meta: Meta) -> Result<Model> {
        let gguf = format == Format::Gguf;
        // A tensor by its HF name (after `model.layers.{i}.` for layer tensors) in this layout.
        let name = |hf: &str, l: Option<usize>| -> String {
            let gg = || TensorName::gguf_of(&TENSORS, hf);
            match (l, gguf) {
                (Some(i), true) => format!("blk.{i}.{}", gg()),
                (Some(i), false) => format!("{}{hf}", self.hf_layer(i)),
                (None, true) => gg().to_string(),
                (None, false) => hf.to_string(),
            }
        };
        let (vocab, hidden, s) = (hp.vocab, hp.hidden(), |a| hp.size[a]);
        let embed = matrix(t, &name("model.embed_tokens.weight", None), vocab, hidden)?;
        let head = name("lm_head.weight", None);
        let lm_head = match hp.tied {
            Some(true) => None,
            None if !t.has(&head) => None,
            _ => Some(matrix(t, &head, vocab, hidden)?),
        };
        let (hd, kv) = (hp.head_dim, hp.kv_heads);
        let (qd, kvd, ffn) = (s(Axis::Heads) * hd, kv * hd, s(Axis::Ffn));
        let mut blocks = Vec::with_capacity(2 * hp.layers.len());
        for i in 0..hp.layers.len() {
            let n = |s: &str| name(s, Some(i));
            let w = |p: &str, r, c| matrix(t, &n(&format!("{p}.weight")), r, c);
            let b = |p: &str, len| opt_vec_f32(t, &n(&format!("{p}.bias")), len);
            let (q, k, v, o) = (
                "self_attn.q_proj",
                "self_attn.k_proj",
                "self_attn.v_proj",
                "self_attn.o_proj",
            );
            let (gate, up, down) = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj");
            blocks.push(Block {
                layer: i,
                norm: vec_f32(t, &n("input_layernorm.weight"), hidden)?,
                slot: i,
                mixer: Mixer::Attention(Attention {
                    q: w(q, qd, hidden)?,
                    k: w(k, kvd, hidden)?,
                    v: w(v, kvd, hidden)?,
                    o: w(o, hidden, qd)?,
                    q_bias: b(q, qd)?,
                    k_bias: b(k, kvd)?,
                    v_bias: b(v, kvd)?,
                    o_bias: b(o, hidden)?,
                    heads: s(Axis::Heads),
                    kv_heads: kv,
                    head_dim: hd,
                    rope: Some(Rope::new(hd, hp.rope_theta, gguf)),
                }),
            });
            blocks.push(Block {
                layer: i,
                norm: vec_f32(t, &n("post_attention_layernorm.weight"), hidden)?,
                slot: 0,
                mixer: Mixer::Mlp(Mlp {
                    up: w(up, ffn, hidden)?,
                    gate: Some(w(gate, ffn, hidden)?),
                    down: w(down, hidden, ffn)?,
                    act: Act::SwiGlu,
                    up_bias: b(up, ffn)?,
                    gate_bias: b(gate, ffn)?,
                    down_bias: b(down, hidden)?,
                }),
            });
        }
        Ok(Model {
            meta,
            shape: hp.shape(),
            vocab,
            embed,
            lm_head,
            norm_f: vec_f32(t, &name("model.norm.weight", None), hidden)?,
            eps: hp.eps,
            blocks,
        })
    }

    fn tensors(&self) -> &'static [TensorName] {
        &TENSORS
    }
    fn gguf_unused(&self) -> &'static [&'static str] {
        &["attention.layer_norm_epsilon"]
    }
    fn hf_layer(&self, l: usize) -> String {
        format!("model.layers.{l}.")
    }
    fn gguf_rope_permuted(&self) -> bool {
        true
    }
    fn imatrix_matrices(&self, l: usize) -> Vec<([String; 2], usize)> {
        // q, k, v read the attention norm's output; o the attention output; gate, up the MLP
        // norm's output; down the activation.
        [("q_proj", 0), ("k_proj", 0), ("v_proj", 0), ("o_proj", 2)]
            .map(|(p, i)| (format!("self_attn.{p}.weight"), i))
            .into_iter()
            .chain(
                [("gate_proj", 1), ("up_proj", 1), ("down_proj", 3)]
                    .map(|(p, i)| (format!("mlp.{p}.weight"), i)),
            )
            .map(|(hf, i)| {
                let gg = TensorName::gguf_of(&TENSORS, &hf);
                (
                    [format!("blk.{l}.{gg}"), format!("{}{hf}", self.hf_layer(l))],
                    i,
                )
            })
            .collect()
    }
}

/// Every Llama tensor: HF and GGUF names, elastic axes (biases included).
pub const TENSORS: [TensorName; 19] = {
    use super::Dim::*;
    const Q: Dim = QHeads(0);
    const F: Dim = Ffn(0);
    [
        t(
            &["model.embed_tokens.weight"],
            "token_embd.weight",
            &[Whole, Hidden],
        ),
        t(&["lm_head.weight"], "output.weight", &[Whole, Hidden]),
        t(&["model.norm.weight"], "output_norm.weight", &[Hidden]),
        t(&["input_layernorm.weight"], "attn_norm.weight", &[Hidden]),
        t(
            &["post_attention_layernorm.weight"],
            "ffn_norm.weight",
            &[Hidden],
        ),
        t(&["self_attn.q_proj.weight"], "attn_q.weight", &[Q, Hidden]),
        t(
            &["self_attn.k_proj.weight"],
            "attn_k.weight",
            &[Whole, Hidden],
        ),
        t(
            &["self_attn.v_proj.weight"],
            "attn_v.weight",
            &[Whole, Hidden],
        ),
        t(
            &["self_attn.o_proj.weight"],
            "attn_output.weight",
            &[Hidden, Q],
        ),
        t(&["self_attn.q_proj.bias"], "attn_q.bias", &[Q]),
        t(&["self_attn.k_proj.bias"], "attn_k.bias", &[Whole]),
        t(&["self_attn.v_proj.bias"], "attn_v.bias", &[Whole]),
        t(&["self_attn.o_proj.bias"], "attn_output.bias", &[Hidden]),
        t(&["mlp.gate_proj.weight"], "ffn_gate.weight", &[F, Hidden]),
        t(&["mlp.up_proj.weight"], "ffn_up.weight", &[F, Hidden]),
        t(&["mlp.down_proj.weight"], "ffn_down.weight", &[Hidden, F]),
        t(&["mlp.gate_proj.bias"], "ffn_gate.bias", &[F]),
        t(&["mlp.up_proj.bias"], "ffn_up.bias", &[F]),
        t(&["mlp.down_proj.bias"], "ffn_down.bias", &[Hidden]),
    ]
};
