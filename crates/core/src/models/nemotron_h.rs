//! Nemotron-H hybrids (spec §1–§3): one block per pattern character — `M` Mamba-2, `*` attention
//! (no RoPE), `-` relu² MLP, `E` sigmoid-routed MoE with a shared expert. HF checkpoints in the
//! hub layout (`backbone.*`, one tensor per expert) or the newest transformers layout (`model.*`,
//! stacked experts); GGUF `nemotron_h` / `nemotron_h_moe` as llama.cpp's converter writes them.

use super::init::{Init, InitTensor};
use super::role::{Dim, TensorName, t};
use super::{Arch, HParams, Role, lenient, matrix, opt_vec_f32, parse_config, vec_f32};
use crate::error::{Error, Result};
use crate::formats::TensorMap;
use crate::formats::gguf::Gguf;
use crate::layers::Vector;
use crate::layers::attention::Attention;
use crate::layers::mamba2::Mamba2;
use crate::layers::mlp::{Act, Mlp};
use crate::layers::moe::{MAX_TOPK, Moe};
use crate::model::{Block, Format, Meta, Mixer, Model};
use crate::shape::{Axis, AxisMap, LayerKind};
use serde::{Deserialize, Serialize};
use serde_json::Value as Json;
use std::path::Path;

pub struct NemotronH;

/// config.json (NemotronHConfig) with its legacy spellings; the fields where two spellings may
/// both be present are read in order of preference.
#[derive(Debug, Default, Deserialize, Serialize)]
struct Config {
    hybrid_override_pattern: Option<Json>,
    layers_block_type: Option<Json>,
    num_hidden_layers: Option<Json>,
    hidden_size: Option<usize>,
    vocab_size: Option<usize>,
    num_attention_heads: Option<usize>,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    #[serde(skip_serializing)]
    attention_head_dim: Option<usize>,
    intermediate_size: Option<usize>,
    mamba_num_heads: Option<usize>,
    mamba_head_dim: Option<usize>,
    #[serde(alias = "mamba_n_groups")]
    n_groups: Option<usize>,
    #[serde(alias = "mamba_d_state")]
    ssm_state_size: Option<usize>,
    #[serde(alias = "mamba_d_conv")]
    conv_kernel: Option<usize>,
    #[serde(alias = "mamba_chunk_size")]
    chunk_size: Option<usize>,
    #[serde(alias = "mamba_dt_limit", default, skip_serializing)]
    time_step_limit: Option<Json>,
    mamba_hidden_act: Option<String>,
    mlp_hidden_act: Option<String>,
    #[serde(skip_serializing)]
    moe_latent_size: Option<Json>,
    n_routed_experts: Option<usize>,
    #[serde(skip_serializing)]
    num_local_experts: Option<usize>,
    #[serde(skip_serializing)]
    num_experts: Option<usize>,
    num_experts_per_tok: Option<usize>,
    moe_intermediate_size: Option<usize>,
    moe_shared_expert_intermediate_size: Option<usize>,
    n_shared_experts: Option<usize>,
    n_group: Option<usize>,
    topk_group: Option<usize>,
    norm_topk_prob: Option<bool>,
    #[serde(default, deserialize_with = "lenient")]
    routed_scaling_factor: Option<f64>,
    #[serde(default, deserialize_with = "lenient")]
    layer_norm_epsilon: Option<f64>,
    #[serde(default, deserialize_with = "lenient", skip_serializing)]
    rms_norm_eps: Option<f64>,
    #[serde(default, deserialize_with = "lenient", skip_serializing)]
    norm_eps: Option<f64>,
    tie_word_embeddings: Option<bool>,
    max_position_embeddings: Option<usize>,
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

/// Checks the sizes the layers need (spec §1).
fn validate(hp: &HParams, src: &str) -> Result<()> {
    let s = &hp.size;
    let (heads, experts, mh) = (s[Axis::Heads], s[Axis::Experts], s[Axis::MambaHeads]);
    let bad = |f: &str, m: String| Err(Error::config(format!("{src} {f}"), m));
    if hp.has(LayerKind::Attention) && (hp.kv_heads == 0 || !heads.is_multiple_of(hp.kv_heads)) {
        let kv = hp.kv_heads;
        return bad(
            "num_key_value_heads",
            format!("{heads} query heads do not split into {kv} KV groups"),
        );
    }
    if hp.has(LayerKind::Mamba) && (hp.mamba_groups == 0 || !mh.is_multiple_of(hp.mamba_groups)) {
        let g = hp.mamba_groups;
        return bad(
            "n_groups",
            format!("{mh} Mamba heads do not split into {g} groups"),
        );
    }
    if hp.has(LayerKind::Mamba) && hp.conv_k < 2 {
        return bad("conv_kernel", format!("{} (must be at least 2)", hp.conv_k));
    }
    if hp.has(LayerKind::Moe) {
        let k = hp.experts_per_tok;
        if k == 0 || k > experts || k > MAX_TOPK {
            return bad("num_experts_per_tok", format!("{k} with {experts} experts"));
        }
        let (g, tg) = (hp.expert_groups, hp.expert_groups_used);
        if g == 0 || !experts.is_multiple_of(g) || g > 64 || tg > g {
            return bad(
                "n_group",
                format!("{g} groups (topk_group {tg}) for {experts} experts"),
            );
        }
    }
    if hp.hidden() == 0 || hp.vocab == 0 || hp.layers.is_empty() {
        return bad(
            "hidden_size",
            "hidden size, vocabulary and layer count must be positive".into(),
        );
    }
    Ok(())
}

fn layer_kinds(c: &Config, err: impl Fn(&str, String) -> Error) -> Result<Vec<LayerKind>> {
    if let Some(p) = &c.hybrid_override_pattern {
        let s = p
            .as_str()
            .ok_or_else(|| err("hybrid_override_pattern", "is not a string".into()))?;
        s.chars()
            .map(|c| {
                kind_from_char(c).ok_or_else(|| {
                    err(
                        "hybrid_override_pattern",
                        format!("unknown layer character {c:?} (M, *, -, E)"),
                    )
                })
            })
            .collect()
    } else if let Some(l) = &c.layers_block_type {
        let a = l
            .as_array()
            .ok_or_else(|| err("layers_block_type", "is not a list".into()))?;
        a.iter()
            .map(|x| {
                x.as_str().and_then(kind_from_name).ok_or_else(|| {
                    err("layers_block_type", format!("unknown layer type {x} (mamba/attention/mlp/moe or linear_attention/full_attention/mlp/moe)"))
                })
            })
            .collect()
    } else {
        Err(err(
            "hybrid_override_pattern",
            "missing (neither hybrid_override_pattern nor layers_block_type is given)".into(),
        ))
    }
}

/// The config.json fields a rewrite replaces (besides the layer pattern and the MoE sizes).
const SIZES: [&str; 7] = [
    "layers_block_type",
    "hidden_size",
    "num_attention_heads",
    "head_dim",
    "intermediate_size",
    "mamba_num_heads",
    "mamba_head_dim",
];

impl Arch for NemotronH {
    fn name(&self) -> &'static str {
        "nemotron_h"
    }
    fn hf_names(&self) -> &'static [&'static str] {
        &["nemotron_h", "NemotronHForCausalLM"]
    }
    fn gguf_names(&self) -> &'static [&'static str] {
        &["nemotron_h", "nemotron_h_moe"]
    }
    fn arch_name(&self, hp: &HParams) -> &'static str {
        if hp.has(LayerKind::Moe) {
            "nemotron_h_moe"
        } else {
            "nemotron_h"
        }
    }

    fn read_hf(&self, v: &Json, path: &Path) -> Result<HParams> {
        let c: Config = parse_config(v, path)?;
        let err = |k: &str, m: String| Error::config(format!("{}: {k}", path.display()), m);
        let kinds = layer_kinds(&c, err)?;
        if let Some(n) = &c.num_hidden_layers
            && n.as_u64() != Some(kinds.len() as u64)
        {
            let m = format!(
                "{n} does not match the {} layers of the pattern",
                kinds.len()
            );
            return Err(err("num_hidden_layers", m));
        }
        let has = |k| kinds.contains(&k);
        let need = |x: Option<usize>, k: &str, when: bool| match (x, when) {
            (Some(x), true) => Ok(x),
            (None, true) => Err(err(k, "missing".into())),
            (_, false) => Ok(0),
        };
        for (k, v, want) in [
            ("mamba_hidden_act", &c.mamba_hidden_act, "silu"),
            ("mlp_hidden_act", &c.mlp_hidden_act, "relu2"),
        ] {
            if let Some(v) = v.as_deref().filter(|v| *v != want) {
                return Err(err(k, format!("{v:?} is not supported (only {want:?})")));
            }
        }
        if c.moe_latent_size.is_some() {
            return Err(err(
                "moe_latent_size",
                "latent MoE (Nemotron 3 Super) is not supported yet".into(),
            ));
        }
        let hidden = need(c.hidden_size, "hidden_size", true)?;
        let moe = has(LayerKind::Moe);
        let heads = need(
            c.num_attention_heads,
            "num_attention_heads",
            has(LayerKind::Attention),
        )?;
        let heads = c.num_attention_heads.unwrap_or(heads);
        let mamba = has(LayerKind::Mamba);
        let mut size = AxisMap::default();
        size[Axis::Hidden] = hidden;
        size[Axis::Heads] = heads;
        size[Axis::Ffn] = need(
            c.intermediate_size,
            "intermediate_size",
            has(LayerKind::Mlp),
        )?;
        size[Axis::MambaHeads] = need(c.mamba_num_heads, "mamba_num_heads", mamba)?;
        size[Axis::MambaHeadDim] = need(c.mamba_head_dim, "mamba_head_dim", mamba)?;
        let experts = c.n_routed_experts.or(c.num_local_experts).or(c.num_experts);
        size[Axis::Experts] = need(experts, "n_routed_experts", moe)?;
        size[Axis::MoeFfn] = need(c.moe_intermediate_size, "moe_intermediate_size", moe)?;
        size[Axis::SharedFfn] = if moe && c.n_shared_experts.unwrap_or(1) > 0 {
            c.moe_shared_expert_intermediate_size.unwrap_or(0)
        } else {
            0
        };
        let mut hp = HParams::new(&kinds, size);
        hp.vocab = need(c.vocab_size, "vocab_size", true)?;
        hp.kv_heads = c.num_key_value_heads.unwrap_or(heads);
        hp.head_dim = c
            .head_dim
            .or(c.attention_head_dim)
            .unwrap_or(hidden.checked_div(heads).unwrap_or(0));
        hp.mamba_groups = c.n_groups.unwrap_or(1);
        hp.ssm_state = need(c.ssm_state_size, "ssm_state_size", mamba)?;
        hp.conv_k = c.conv_kernel.unwrap_or(4);
        hp.chunk = c.chunk_size.unwrap_or(128);
        if let Some(x) = &c.time_step_limit {
            let a = x
                .as_array()
                .filter(|a| a.len() == 2)
                .ok_or_else(|| err("time_step_limit", format!("{x} is not a pair")))?;
            for (slot, v) in hp.dt_limit.iter_mut().zip(a) {
                *slot = super::parse_float(v)
                    .ok_or_else(|| err("time_step_limit", format!("{v} is not a number")))?
                    as f32;
            }
        }
        hp.experts_per_tok = need(c.num_experts_per_tok, "num_experts_per_tok", moe)?;
        hp.expert_groups = c.n_group.unwrap_or(1);
        hp.expert_groups_used = c.topk_group.unwrap_or(1);
        hp.norm_topk = c.norm_topk_prob.unwrap_or(true);
        hp.routed_scale = c.routed_scaling_factor.unwrap_or(1.0) as f32;
        hp.eps = c
            .layer_norm_epsilon
            .or(c.rms_norm_eps)
            .or(c.norm_eps)
            .unwrap_or(1e-5) as f32;
        hp.tied = Some(c.tie_word_embeddings.unwrap_or(false));
        validate(&hp, &path.display().to_string())?;
        Ok(hp)
    }

    fn read_gguf(&self, g: &Gguf) -> Result<HParams> {
        let arch = g.str("general.architecture")?;
        let n = g.u64(&format!("{arch}.block_count"))? as usize;
        // Layer kinds from the tensors present (cross-checked by the shapes when building).
        let kinds = (0..n)
            .map(|i| {
                let has = |s: &str| g.tensors.has(&format!("blk.{i}.{s}"));
                Ok(if has("ssm_in.weight") {
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
                })
            })
            .collect::<Result<_>>()?;
        let hp = HParams::from_gguf(g, kinds, &["embedding_length"])?;
        validate(&hp, &format!("{} metadata", g.path.display()))?;
        Ok(hp)
    }

    fn hf_config(&self, hp: &HParams, base: Option<&Json>, m: &Model) -> Result<Json> {
        let u = |a| hp.uniform(a);
        // A rewrite keeps the input's value of an axis no layer has any more.
        let o = |a: Axis| match base {
            Some(_) if !hp.layers.iter().any(|l| a.applies(l.kind)) => Ok(None),
            _ => hp.uniform(a).map(Some),
        };
        let kinds = hp.kinds();
        let moe = hp.has(LayerKind::Moe);
        let mut c = Config {
            hybrid_override_pattern: Some(
                kinds
                    .iter()
                    .map(|k| k.pattern_char())
                    .collect::<String>()
                    .into(),
            ),
            num_hidden_layers: Some(kinds.len().into()),
            hidden_size: Some(hp.hidden()),
            vocab_size: Some(hp.vocab),
            num_attention_heads: o(Axis::Heads)?,
            num_key_value_heads: Some(hp.kv_heads),
            head_dim: Some(hp.head_dim),
            intermediate_size: o(Axis::Ffn)?,
            mamba_num_heads: o(Axis::MambaHeads)?,
            mamba_head_dim: o(Axis::MambaHeadDim)?,
            n_groups: Some(hp.mamba_groups),
            ssm_state_size: Some(hp.ssm_state),
            conv_kernel: Some(hp.conv_k),
            chunk_size: Some(hp.chunk),
            mamba_hidden_act: Some("silu".into()),
            mlp_hidden_act: Some("relu2".into()),
            layer_norm_epsilon: Some(hp.eps as f64),
            tie_word_embeddings: Some(m.lm_head.is_none()),
            max_position_embeddings: Some(hp.context),
            ..Default::default()
        };
        if moe {
            let shared = u(Axis::SharedFfn)?;
            c.n_routed_experts = Some(u(Axis::Experts)?);
            c.num_experts_per_tok = Some(hp.experts_per_tok);
            c.moe_intermediate_size = Some(u(Axis::MoeFfn)?);
            c.moe_shared_expert_intermediate_size = Some(shared);
            c.n_shared_experts = Some((shared > 0) as usize);
            c.n_group = Some(hp.expert_groups);
            c.topk_group = Some(hp.expert_groups_used);
            c.norm_topk_prob = Some(hp.norm_topk);
            c.routed_scaling_factor = Some(hp.routed_scale as f64);
        }
        let mut sizes = super::to_object(&c);
        let Some(base) = base else {
            let mut v = serde_json::json!({
                "architectures": ["NemotronHForCausalLM"],
                "model_type": "nemotron_h",
                "use_conv_bias": true,
                "use_bias": false,
                "mlp_bias": false,
                "attention_bias": false,
                "residual_in_fp32": false,
                "time_step_limit": [0.0, {"__float__": "Infinity"}],
                "bos_token_id": m.meta.bos,
                "eos_token_id": m.meta.eos.first(),
                "torch_dtype": "float32",
            });
            v.as_object_mut().unwrap().extend(sizes);
            return Ok(v);
        };
        // A rewrite keeps the input's config and its spellings, replacing only the sizes.
        let mut v = base.clone();
        let o = v
            .as_object_mut()
            .ok_or_else(|| Error::config("config.json", "is not an object"))?;
        let had = |k: &str| o.contains_key(k);
        let experts = ["n_routed_experts", "num_local_experts", "num_experts"]
            .into_iter()
            .find(|k| had(k))
            .unwrap_or("n_routed_experts");
        let (pattern, layers) = (had("hybrid_override_pattern"), had("num_hidden_layers"));
        if let Some(old) = o.get("layers_block_type").and_then(|v| v.as_array()) {
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
            sizes.insert("layers_block_type".into(), names.into());
        }
        if let Some(e) = sizes.remove("n_routed_experts") {
            sizes.insert(experts.into(), e);
        }
        sizes.retain(|k, _| match k.as_str() {
            "hybrid_override_pattern" => pattern,
            "num_hidden_layers" => layers,
            "moe_intermediate_size" | "moe_shared_expert_intermediate_size" => true,
            k => k == experts || SIZES.contains(&k),
        });
        o.extend(sizes);
        Ok(v)
    }

    fn build(&self, hp: &HParams, t: &TensorMap, format: Format, mut meta: Meta) -> Result<Model> {
        let gguf = format == Format::Gguf;
        let pre = if t.has("backbone.norm_f.weight")
            || t.has("backbone.embeddings.weight")
            || t.has("backbone.embedding.weight")
        {
            "backbone"
        } else {
            "model"
        };
        // A tensor by its hub name (after `layers.{i}.` for layer tensors) in this layout.
        let name = |hf: &str, l: Option<usize>| -> String {
            let gg = || TensorName::gguf_of(&TENSORS, hf);
            match (l, gguf) {
                (Some(i), true) => format!("blk.{i}.{}", gg()),
                (Some(i), false) => format!("{pre}.layers.{i}.{hf}"),
                (None, true) => gg().to_string(),
                (None, false) => hf.replace("backbone.", &format!("{pre}.")),
            }
        };
        let (hidden, vocab) = (hp.hidden(), hp.vocab);
        let s = |a| hp.size[a];
        let embed = if gguf {
            matrix(t, "token_embd.weight", vocab, hidden)?
        } else {
            let e = t.get_any(&[
                &format!("{pre}.embeddings.weight"),
                &format!("{pre}.embedding.weight"),
                &format!("{pre}.embed_tokens.weight"),
            ])?;
            e.expect_shape(&[vocab, hidden])?;
            e.clone()
        };
        let head = name("lm_head.weight", None);
        let lm_head = match hp.tied {
            Some(true) => None,
            None if !t.has(&head) => None,
            _ => Some(matrix(t, &head, vocab, hidden)?),
        };
        let mut blocks = vec![];
        let (mut na, mut nm) = (0, 0);
        for (i, layer) in hp.layers.iter().enumerate() {
            let n = |s: &str| name(s, Some(i));
            let m = |s: &str| n(&format!("mixer.{s}"));
            // Optional tensors (biases) that only the hub layout names.
            let opt = |s: &str, len| {
                if gguf {
                    Ok(None)
                } else {
                    opt_vec_f32(t, &m(s), len)
                }
            };
            let mlp = |up: &str, down: &str, ffn| -> Result<Mlp> {
                Ok(Mlp {
                    up: matrix(t, &m(&format!("{up}.weight")), ffn, hidden)?,
                    gate: None,
                    down: matrix(t, &m(&format!("{down}.weight")), hidden, ffn)?,
                    act: Act::Relu2,
                    up_bias: opt(&format!("{up}.bias"), ffn)?,
                    gate_bias: None,
                    down_bias: opt(&format!("{down}.bias"), hidden)?,
                })
            };
            let (mixer, slot) = match layer.kind {
                LayerKind::Mamba => {
                    let (mh, groups, state) = (s(Axis::MambaHeads), hp.mamba_groups, hp.ssm_state);
                    let di = mh * s(Axis::MambaHeadDim);
                    let cd = di + 2 * groups * state;
                    let a = vec_f32(t, &m("A_log"), mh)?;
                    nm += 1;
                    let mamba = Mamba2 {
                        in_proj: matrix(
                            t,
                            &m("in_proj.weight"),
                            2 * di + 2 * groups * state + mh,
                            hidden,
                        )?,
                        out_proj: matrix(t, &m("out_proj.weight"), hidden, di)?,
                        conv_w: vec_f32(t, &m("conv1d.weight"), cd * hp.conv_k)?,
                        conv_b: opt_vec_f32(t, &m("conv1d.bias"), cd)?
                            .unwrap_or_else(|| Vector::zeros(cd)),
                        dt_bias: vec_f32(t, &m("dt_bias"), mh)?,
                        // GGUF stores A = −exp(A_log) directly.
                        a: if gguf { a } else { a.map(|v| -v.exp()) },
                        d: vec_f32(t, &m("D"), mh)?,
                        norm: vec_f32(t, &m("norm.weight"), di)?,
                        heads: mh,
                        head_dim: s(Axis::MambaHeadDim),
                        groups,
                        state,
                        conv_k: hp.conv_k,
                        chunk: hp.chunk,
                        dt_min: hp.dt_limit[0],
                        dt_max: hp.dt_limit[1],
                        eps: hp.eps,
                    };
                    (Mixer::Mamba(mamba), nm - 1)
                }
                LayerKind::Attention => {
                    let (qd, kvd) = (s(Axis::Heads) * hp.head_dim, hp.kv_heads * hp.head_dim);
                    na += 1;
                    let attn = Attention {
                        q: matrix(t, &m("q_proj.weight"), qd, hidden)?,
                        k: matrix(t, &m("k_proj.weight"), kvd, hidden)?,
                        v: matrix(t, &m("v_proj.weight"), kvd, hidden)?,
                        o: matrix(t, &m("o_proj.weight"), hidden, qd)?,
                        q_bias: opt("q_proj.bias", qd)?,
                        k_bias: opt("k_proj.bias", kvd)?,
                        v_bias: opt("v_proj.bias", kvd)?,
                        o_bias: opt("o_proj.bias", hidden)?,
                        heads: s(Axis::Heads),
                        kv_heads: hp.kv_heads,
                        head_dim: hp.head_dim,
                        rope: None,
                    };
                    (Mixer::Attention(attn), na - 1)
                }
                LayerKind::Mlp => (Mixer::Mlp(mlp("up_proj", "down_proj", s(Axis::Ffn))?), 0),
                LayerKind::Moe => {
                    let (experts, moe_ffn) = (s(Axis::Experts), s(Axis::MoeFfn));
                    let (mut up, mut down) = (vec![], vec![]);
                    let (su, sd) = (m("experts.up_proj"), m("experts.down_proj"));
                    let stacked = |n: &str| {
                        if gguf {
                            t.get(n)
                        } else {
                            t.get_any(&[n, &format!("{n}.weight")])
                        }
                    };
                    if gguf || stacked(&su).is_ok() {
                        let (su, sd) = (stacked(&su)?, stacked(&sd)?);
                        su.expect_shape(&[experts, moe_ffn, hidden])?;
                        sd.expect_shape(&[experts, hidden, moe_ffn])?;
                        up = (0..experts).map(|e| su.index(e)).collect();
                        down = (0..experts).map(|e| sd.index(e)).collect();
                    } else {
                        for e in 0..experts {
                            let x = |p: &str| m(&format!("experts.{e}.{p}.weight"));
                            up.push(matrix(t, &x("up_proj"), moe_ffn, hidden)?);
                            down.push(matrix(t, &x("down_proj"), hidden, moe_ffn)?);
                        }
                    }
                    let shared_ffn = s(Axis::SharedFfn);
                    let shared = (shared_ffn > 0
                        && (!gguf || t.has(&m("shared_experts.up_proj.weight"))))
                    .then(|| {
                        mlp(
                            "shared_experts.up_proj",
                            "shared_experts.down_proj",
                            shared_ffn,
                        )
                    })
                    .transpose()?;
                    let moe = Moe {
                        router: Vector::of(&matrix(t, &m("gate.weight"), experts, hidden)?),
                        bias: opt_vec_f32(t, &m("gate.e_score_correction_bias"), experts)?
                            .unwrap_or_else(|| Vector::zeros(experts)),
                        up,
                        down,
                        shared,
                        experts,
                        hidden,
                        topk: hp.experts_per_tok,
                        n_group: hp.expert_groups,
                        topk_group: hp.expert_groups_used,
                        norm_topk: hp.norm_topk,
                        scale: hp.routed_scale,
                    };
                    (Mixer::Moe(moe), 0)
                }
                LayerKind::Transformer => unreachable!(),
            };
            blocks.push(Block {
                layer: i,
                norm: vec_f32(t, &n("norm.weight"), hidden)?,
                mixer,
                slot,
            });
        }
        if format == Format::Hf {
            meta.arch = self.arch_name(hp).into();
        }
        Ok(Model {
            meta,
            shape: hp.shape(),
            vocab,
            embed,
            lm_head,
            norm_f: vec_f32(t, &name("backbone.norm_f.weight", None), hidden)?,
            eps: hp.eps,
            blocks,
        })
    }

    fn tensors(&self) -> &'static [TensorName] {
        &TENSORS
    }
    fn role(&self, name: &str) -> Option<Role> {
        // Hub layout: `mixer.experts.{e}.up_proj.weight` / `...down_proj.weight`.
        let expert = super::split_layer(name).and_then(|(l, rest)| {
            let (e, proj) = rest.strip_prefix("mixer.experts.")?.split_once('.')?;
            Some((l, e.parse::<usize>().ok()?, proj))
        });
        if let Some((l, e, proj)) = expert {
            let dims = match proj {
                "up_proj.weight" => vec![Dim::MoeFfn(l), Dim::Hidden],
                "down_proj.weight" => vec![Dim::Hidden, Dim::MoeFfn(l)],
                _ => return None,
            };
            let (layer, expert) = (Some(l), Some(e));
            return Some(Role {
                layer,
                expert,
                dims,
                flat: false,
            });
        }
        TensorName::role(&TENSORS, name)
    }
    fn gguf_unused(&self) -> &'static [&'static str] {
        &["attention.layer_norm_rms_epsilon", "rope.freq_base"]
    }
    /// The hub layout, initialised like transformers' NemotronH: linears and embeddings
    /// N(0, initializer_range²), residual-branch outputs scaled by 1/√layers
    /// (`rescale_prenorm_residual`), norms and D at one, Mamba A and Δt as in Mamba-2.
    fn layout(&self, hp: &HParams, cfg: &Json) -> Result<Vec<InitTensor>> {
        let f = |k: &str, d: f64| -> Result<f32> {
            match cfg.get(k) {
                None | Some(Json::Null) => Ok(d as f32),
                Some(v) => super::parse_float(v).map(|x| x as f32).ok_or_else(|| {
                    Error::config(format!("config.json: {k}"), format!("{v} is not a number"))
                }),
            }
        };
        let std = f("initializer_range", 0.02)?;
        let dt = Init::DtBias {
            min: f("time_step_min", 0.001)?,
            max: f("time_step_max", 0.1)?,
            floor: f("time_step_floor", 1e-4)?,
        };
        let out = Init::Normal(std / (hp.layers.len() as f32).sqrt());
        let (hidden, vocab) = (hp.hidden(), hp.vocab);
        let mut v = vec![InitTensor::new(
            "backbone.embeddings.weight",
            vec![vocab, hidden],
            Init::Normal(std),
        )];
        for (i, l) in hp.layers.iter().enumerate() {
            let s = |a| l.size[a];
            let t = |n: &str, shape: Vec<usize>, init: Init| {
                InitTensor::new(format!("backbone.layers.{i}.{n}"), shape, init)
            };
            v.push(t("norm.weight", vec![hidden], Init::Ones));
            let w = Init::Normal(std);
            match l.kind {
                LayerKind::Mamba => {
                    let (mh, g, n) = (s(Axis::MambaHeads), hp.mamba_groups, hp.ssm_state);
                    let di = mh * s(Axis::MambaHeadDim);
                    let cd = di + 2 * g * n;
                    let k = hp.conv_k;
                    v.extend([
                        t(
                            "mixer.in_proj.weight",
                            vec![2 * di + 2 * g * n + mh, hidden],
                            w,
                        ),
                        // nn.Conv1d's default: U(±1/√fan_in), fan_in = kernel (depthwise).
                        t(
                            "mixer.conv1d.weight",
                            vec![cd, 1, k],
                            Init::Uniform(1.0 / (k as f32).sqrt()),
                        ),
                        t("mixer.conv1d.bias", vec![cd], Init::Zeros),
                        t("mixer.dt_bias", vec![mh], dt.clone()),
                        t("mixer.A_log", vec![mh], Init::ALog),
                        t("mixer.D", vec![mh], Init::Ones),
                        t("mixer.norm.weight", vec![di], Init::Ones),
                        t("mixer.out_proj.weight", vec![hidden, di], out.clone()),
                    ]);
                }
                LayerKind::Attention => {
                    let (qd, kvd) = (s(Axis::Heads) * hp.head_dim, hp.kv_heads * hp.head_dim);
                    v.extend([
                        t("mixer.q_proj.weight", vec![qd, hidden], w.clone()),
                        t("mixer.k_proj.weight", vec![kvd, hidden], w.clone()),
                        t("mixer.v_proj.weight", vec![kvd, hidden], w),
                        t("mixer.o_proj.weight", vec![hidden, qd], out.clone()),
                    ]);
                }
                LayerKind::Mlp => v.extend([
                    t("mixer.up_proj.weight", vec![s(Axis::Ffn), hidden], w),
                    t(
                        "mixer.down_proj.weight",
                        vec![hidden, s(Axis::Ffn)],
                        out.clone(),
                    ),
                ]),
                LayerKind::Moe => {
                    let (e, ffn, sh) = (s(Axis::Experts), s(Axis::MoeFfn), s(Axis::SharedFfn));
                    v.push(t("mixer.gate.weight", vec![e, hidden], w.clone()));
                    v.push(t(
                        "mixer.gate.e_score_correction_bias",
                        vec![e],
                        Init::Zeros,
                    ));
                    for x in 0..e {
                        let p = format!("mixer.experts.{x}");
                        v.push(t(
                            &format!("{p}.up_proj.weight"),
                            vec![ffn, hidden],
                            w.clone(),
                        ));
                        v.push(t(
                            &format!("{p}.down_proj.weight"),
                            vec![hidden, ffn],
                            out.clone(),
                        ));
                    }
                    if sh > 0 {
                        v.push(t(
                            "mixer.shared_experts.up_proj.weight",
                            vec![sh, hidden],
                            w,
                        ));
                        v.push(t(
                            "mixer.shared_experts.down_proj.weight",
                            vec![hidden, sh],
                            out.clone(),
                        ));
                    }
                }
                LayerKind::Transformer => unreachable!("Nemotron-H has no transformer blocks"),
            }
        }
        v.push(InitTensor::new(
            "backbone.norm_f.weight",
            vec![hidden],
            Init::Ones,
        ));
        if hp.tied != Some(true) {
            v.push(InitTensor::new(
                "lm_head.weight",
                vec![vocab, hidden],
                Init::Normal(std),
            ));
        }
        Ok(v)
    }
    fn hf_layer(&self, l: usize) -> String {
        format!("backbone.layers.{l}.")
    }
}

/// Every Nemotron-H tensor: hub names (then the newest transformers spellings), GGUF names,
/// elastic axes. The hub layout's per-expert tensors are matched in [`NemotronH::role`] and
/// stacked and unstacked by the rewrite.
pub const TENSORS: [TensorName; 26] = {
    use super::Dim::*;
    const Q: Dim = QHeads(0);
    const F: Dim = Ffn(0);
    const E: Dim = Experts(0);
    const MH: Dim = MambaHeads(0);
    const MI: Dim = MambaInner(0);
    const MC: Dim = MambaConv(0);
    const MP: Dim = MambaInProj(0);
    const EMBED: &[&str] = &[
        "backbone.embeddings.weight",
        "backbone.embedding.weight",
        "model.embeddings.weight",
        "model.embed_tokens.weight",
    ];
    let mut ssm_norm = t(&["mixer.norm.weight"], "ssm_norm.weight", &[MI]);
    ssm_norm.gguf_flat = true;
    let mut conv = t(
        &["mixer.conv1d.weight"],
        "ssm_conv1d.weight",
        &[MC, Whole, Whole],
    );
    conv.gguf_dims = &[MC, Whole];
    let mut a_log = t(&["mixer.A_log"], "ssm_a", &[MH]);
    a_log.gguf_dims = &[MH, Whole];
    let mut d = t(&["mixer.D"], "ssm_d", &[MH]);
    d.gguf_dims = &[MH, Whole];
    let up = &["mixer.experts.up_proj", "mixer.experts.up_proj.weight"];
    let down = &["mixer.experts.down_proj", "mixer.experts.down_proj.weight"];
    [
        t(EMBED, "token_embd.weight", &[Whole, Hidden]),
        t(&["lm_head.weight"], "output.weight", &[Whole, Hidden]),
        t(
            &["backbone.norm_f.weight", "model.norm_f.weight"],
            "output_norm.weight",
            &[Hidden],
        ),
        t(&["norm.weight"], "attn_norm.weight", &[Hidden]),
        t(&["mixer.in_proj.weight"], "ssm_in.weight", &[MP, Hidden]),
        t(&["mixer.in_proj.bias"], "", &[MP]),
        conv,
        t(&["mixer.conv1d.bias"], "ssm_conv1d.bias", &[MC]),
        t(&["mixer.dt_bias"], "ssm_dt.bias", &[MH]),
        a_log,
        d,
        ssm_norm,
        t(&["mixer.out_proj.weight"], "ssm_out.weight", &[Hidden, MI]),
        t(&["mixer.out_proj.bias"], "", &[Hidden]),
        t(&["mixer.q_proj.weight"], "attn_q.weight", &[Q, Hidden]),
        t(&["mixer.k_proj.weight"], "attn_k.weight", &[Whole, Hidden]),
        t(&["mixer.v_proj.weight"], "attn_v.weight", &[Whole, Hidden]),
        t(&["mixer.o_proj.weight"], "attn_output.weight", &[Hidden, Q]),
        t(&["mixer.up_proj.weight"], "ffn_up.weight", &[F, Hidden]),
        t(&["mixer.down_proj.weight"], "ffn_down.weight", &[Hidden, F]),
        t(&["mixer.gate.weight"], "ffn_gate_inp.weight", &[E, Hidden]),
        t(
            &["mixer.gate.e_score_correction_bias"],
            "exp_probs_b.bias",
            &[E],
        ),
        t(up, "ffn_up_exps.weight", &[E, MoeFfn(0), Hidden]),
        t(down, "ffn_down_exps.weight", &[E, Hidden, MoeFfn(0)]),
        t(
            &["mixer.shared_experts.up_proj.weight"],
            "ffn_up_shexp.weight",
            &[SharedFfn(0), Hidden],
        ),
        t(
            &["mixer.shared_experts.down_proj.weight"],
            "ffn_down_shexp.weight",
            &[Hidden, SharedFfn(0)],
        ),
    ]
};

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::Dim::*;

    #[test]
    fn roles_from_the_table_in_both_layouts() {
        let r = |n: &str| {
            NemotronH
                .role(n)
                .map(|r| (r.layer, r.expert, r.dims, r.flat))
        };
        assert_eq!(
            r("backbone.layers.3.mixer.A_log"),
            Some((Some(3), None, vec![MambaHeads(3)], false))
        );
        assert_eq!(
            r("blk.3.ssm_a"),
            Some((Some(3), None, vec![MambaHeads(3), Whole], false))
        );
        assert_eq!(
            r("blk.2.ssm_norm.weight"),
            Some((Some(2), None, vec![MambaInner(2)], true))
        );
        assert_eq!(
            r("backbone.layers.2.norm.weight"),
            Some((Some(2), None, vec![Hidden], false))
        );
        assert_eq!(
            r("model.embed_tokens.weight"),
            Some((None, None, vec![Whole, Hidden], false))
        );
        assert_eq!(
            r("backbone.layers.1.mixer.experts.5.down_proj.weight"),
            Some((Some(1), Some(5), vec![Hidden, MoeFfn(1)], false))
        );
        assert_eq!(
            r("model.layers.1.mixer.experts.up_proj"),
            r("blk.1.ffn_up_exps.weight")
        );
        assert_eq!(r("backbone.layers.0.mixer.unknown"), None);
    }
}
