//! Writes a checkpoint through an [`IndexMap`](super::IndexMap): elastify (a permutation of
//! every axis) and slice (kept prefixes, dropped layers) are the same streaming pass, in the
//! input's format or converted between HF and GGUF. Tensors are gathered one at a time (peak
//! memory ≈ the largest tensor), written to a temporary path that is renamed into place only when
//! everything succeeded.

use super::{GatherPlan, IndexMap, Role, encode};
use elastica_core::error::{Error, Result};
use elastica_core::formats::{OutTensor, gguf, safetensors, temp, tokenizer};
use elastica_core::kernels::quant::{self, ToF32};
use elastica_core::manifest::Manifest;
use elastica_core::model::Format;
use elastica_core::models::hparams::{HParams, Layer};
use elastica_core::models::{Checkpoint, Raw};
use elastica_core::shape::Axis;
use elastica_core::tensor::DType;
use std::path::Path;
use std::time::Instant;

/// A check run on the finished output before it is kept.
pub type Check<'a> = dyn Fn(&Path) -> Result<()> + 'a;

pub struct Output<'a> {
    pub path: &'a Path,
    /// Float format for every matrix (default: keep; dequantized tensors become F32).
    pub convert: Option<DType>,
    /// Manifest to embed (`None` writes none).
    pub manifest: Option<&'a Manifest>,
    /// Replace an existing output.
    pub force: bool,
    pub progress: &'a elastica_core::progress::Progress,
    /// Called on the finished temporary output before it is renamed into place; an error
    /// discards it.
    pub check: Option<&'a Check<'a>>,
    /// Output format (default: the input's).
    pub format: Option<Format>,
    /// Replacement values for source tensors (by source name, full source shape), e.g. trained
    /// weights; the others are read from the input.
    pub values: Option<&'a Values<'a>>,
    /// Input moments weighting the error of re-quantized matrices (by source name).
    pub imatrix: Option<&'a super::imatrix::Imatrix>,
    /// FP8/NVFP4 quantization of the listed matrices (`elastica quantize`).
    pub quant: Option<&'a super::quantize::Plan>,
}

/// Source tensor name → replacement f32 values.
pub type Values<'a> = dyn Fn(&str) -> Option<Vec<f32>> + Sync + 'a;

#[derive(Debug, Clone, serde::Serialize)]
pub struct Written {
    pub tensors: usize,
    pub bytes: u64,
    pub seconds: f64,
}

/// HF files carried over unchanged besides config.json and the weights.
const HF_SIDE_FILES: [&str; 8] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "chat_template.jinja",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
];

/// Value transforms between the HF and GGUF layouts.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Xform {
    None,
    /// A_log → A = −exp(A_log) (GGUF stores A).
    NegExp,
    /// A → A_log = ln(−A).
    LogNeg,
    /// Llama q/k rows: HF rotates halves, GGUF adjacent pairs (llama.cpp's converter permutes).
    RopeToGguf(usize),
    RopeToHf(usize),
}

/// One source tensor (or one expert of a stacked one) gathered through a plan.
struct Piece {
    src: String,
    sub: Option<usize>,
    plan: Option<GatherPlan>,
}

struct Planned {
    out: OutTensor,
    pieces: Vec<Piece>,
    xform: Xform,
}

/// A tensor in the input's layout after the index map: its new name (layers and hub experts
/// renumbered), role, and gather plan.
struct Gathered {
    name: String,
    src: String,
    role: Option<Role>,
    plan: Option<GatherPlan>,
    shape: Vec<usize>,
    dtype: DType,
    /// Per-tensor scale and input scale of an FP8/NVFP4 output.
    scale: f32,
    input_scale: Option<f32>,
}

/// Output name of a tensor: its layer renumbered, its expert renumbered (hub layout).
fn rename(name: &str, role: Option<&Role>, map: &IndexMap) -> Option<String> {
    let layer = role
        .and_then(|r| r.layer)
        .or_else(|| elastica_core::models::split_layer(name).map(|x| x.0));
    let mut out = name.to_string();
    if let Some(l) = layer {
        let nl = map.new_layer(l)?;
        for pre in ["layers.", "blk."] {
            let from = format!("{pre}{l}.");
            if let Some(p) = out
                .find(&from)
                .filter(|&p| p == 0 || out.as_bytes()[p - 1] == b'.')
            {
                out.replace_range(p..p + from.len(), &format!("{pre}{nl}."));
                break;
            }
        }
        if let Some(e) = role.and_then(|r| r.expert) {
            let lm = map.layers[l].as_ref()?;
            let pos = lm[Axis::Experts].iter().position(|&x| x == e)?;
            let from = format!("experts.{e}.");
            let p = out.find(&from)?;
            out.replace_range(p..p + from.len(), &format!("experts.{pos}."));
        }
    }
    Some(out)
}

/// Splits a name into (layer, suffix after the layer prefix) or (None, whole name).
fn split(name: &str) -> (Option<usize>, &str) {
    match elastica_core::models::split_layer(name) {
        Some((l, rest)) => (Some(l), rest),
        None => (None, name),
    }
}

pub fn write(ck: &Checkpoint, map: &IndexMap, out: &Output) -> Result<Written> {
    let t0 = Instant::now();
    let m = &ck.model;
    if out.path.exists() && !out.force {
        return Err(Error::Input(format!(
            "{} exists (use --force to replace it)",
            out.path.display()
        )));
    }
    let arch = ck.arch;
    let tensors = ck.raw.tensors();
    let from = m.meta.format;
    let to = out.format.unwrap_or(from);
    // Converting layouts needs float values (GGUF's quantized blocks cannot go to safetensors,
    // and some tensors are transformed): matrices become F32 unless a format is given.
    let convert = if to != from {
        Some(out.convert.unwrap_or(DType::F32))
    } else {
        out.convert
    };
    let names: Vec<String> = match &ck.raw {
        Raw::Gguf(g) => g.order.clone(),
        Raw::Hf { .. } => tensors.tensors.keys().cloned().collect(),
    };
    let mut gathered = vec![];
    for name in &names {
        let t = tensors.get(name)?;
        let role = arch.role(name);
        let Some(new_name) = rename(name, role.as_ref(), map) else {
            continue;
        };
        let q = out
            .quant
            .and_then(|q| q.tensors.get(name).map(|s| (q.to, *s)));
        let (plan, shape, dtype) = match &role {
            Some(r) => {
                let mut p = GatherPlan::new(t, r, map, &m.shape, q.map(|q| q.0).or(convert))?;
                if let Some((_, s)) = q {
                    p.scale = s.scale;
                }
                let (s, d) = (p.shape.clone(), p.dtype);
                (Some(p), s, d)
            }
            None if q.is_some() => {
                return Err(Error::Tensor {
                    name: name.clone(),
                    msg: "has no elastic role; elastica quantizes the model's matrices only".into(),
                });
            }
            None => (None, t.shape.clone(), t.dtype),
        };
        // The per-tensor scales: the plan's for a newly quantized tensor, the source's when an
        // FP8/NVFP4 tensor is copied as it is (slicing never changes them, method doc §6).
        let (scale, input_scale) = match q {
            Some((_, s)) => (s.scale, s.input_scale),
            None if dtype == t.dtype && dtype.is_scaled() => (t.scale, t.input_scale),
            None => (1.0, None),
        };
        gathered.push(Gathered {
            name: new_name,
            src: name.clone(),
            role,
            plan,
            shape,
            dtype,
            scale,
            input_scale,
        });
    }
    let hp = sliced(&ck.hp, map);
    let planned = if to == from {
        gathered
            .into_iter()
            .map(|g| Planned {
                out: OutTensor {
                    name: g.name,
                    dtype: g.dtype,
                    shape: g.shape,
                    scale: g.scale,
                    input_scale: g.input_scale,
                },
                pieces: vec![Piece {
                    src: g.src,
                    sub: None,
                    plan: g.plan,
                }],
                xform: Xform::None,
            })
            .collect()
    } else {
        convert_layout(ck, gathered, map, &hp, to == Format::Gguf, convert)?
    };
    if let Some(pos) = planned
        .iter()
        .position(|p| planned.iter().filter(|q| q.out.name == p.out.name).count() > 1)
    {
        return Err(Error::Input(format!(
            "two tensors would be written as {}",
            planned[pos].out.name
        )));
    }
    if to == Format::Hf
        && let Some(p) = planned.iter().find(|p| {
            !matches!(
                p.out.dtype,
                DType::F32 | DType::F16 | DType::BF16 | DType::F8E4M3 | DType::Nvfp4
            )
        })
    {
        return Err(Error::Input(format!(
            "tensor {} is {}; safetensors holds float formats, FP8 and NVFP4 only",
            p.out.name, p.out.dtype
        )));
    }
    let kept: Vec<usize> = (0..map.layers.len())
        .filter(|&l| map.layers[l].is_some())
        .collect();
    let outs: Vec<OutTensor> = planned.iter().map(|p| p.out.clone()).collect();
    let total: u64 = outs.iter().map(|o| o.nbytes() as u64).sum();
    let pb = out.progress;
    pb.stage("write", total, elastica_core::progress::Unit::Bytes);
    // Test hook: fail while writing tensor N, to check that nothing partial is left behind.
    let fail_at: Option<usize> = std::env::var("ELASTICA_FAIL_AT_TENSOR")
        .ok()
        .and_then(|v| v.parse().ok());
    let data = |i: usize| -> Result<Vec<u8>> {
        if fail_at == Some(i) {
            return Err(Error::Input(format!(
                "injected failure while writing tensor {i} (ELASTICA_FAIL_AT_TENSOR)"
            )));
        }
        let p = &planned[i];
        let mut b = Vec::with_capacity(p.out.nbytes());
        for piece in &p.pieces {
            let t = tensors.get(&piece.src)?;
            let replaced;
            let t = match out.values.and_then(|f| f(&piece.src)) {
                Some(v) => {
                    replaced =
                        elastica_core::tensor::Tensor::from_f32(&piece.src, t.shape.clone(), &v);
                    &replaced
                }
                None => t,
            };
            let view;
            let t = match piece.sub {
                Some(e) => {
                    view = t.index(e);
                    &view
                }
                None => t,
            };
            match &piece.plan {
                Some(plan) => {
                    let w = out.imatrix.filter(|_| piece.sub.is_none());
                    b.extend(plan.run(t, w.and_then(|m| m.get(&piece.src)).map(Vec::as_slice)))
                }
                // A replaced tensor without an elastic role keeps its format (floats only).
                None if t.dtype != p.out.dtype && !p.out.dtype.is_quantized() => {
                    super::encode(&t.to_f32(), p.out.dtype, &mut b)
                }
                None => b.extend_from_slice(t.bytes()),
            }
        }
        if let Some(piece) = p.pieces.last() {
            tensors.get(&piece.src)?.release();
        }
        let b = transform(b, p.out.dtype, p.xform, &p.out.shape);
        pb.message(p.out.name.clone());
        pb.inc(b.len() as u64);
        Ok(b)
    };
    let tmp = temp::Temp::new(out.path)?;
    let result = (|| -> Result<()> {
        match to {
            Format::Hf => {
                temp::create_dir_all(&tmp)?;
                let base = match &ck.raw {
                    Raw::Hf { config, .. } => Some(config),
                    Raw::Gguf(_) => None,
                };
                let mut cfg = arch.hf_config(&hp, base, m)?;
                let o = cfg
                    .as_object_mut()
                    .ok_or_else(|| Error::config("config.json", "is not an object"))?;
                o.remove("elastic");
                // ModelOpt's two descriptions of the quantization: config.json's
                // `quantization_config` and hf_quant_config.json (kept from a quantized input).
                let hq = match out.quant {
                    Some(q) => Some(q.hf_quant_config()),
                    None => {
                        let f = m.meta.path.join("hf_quant_config.json");
                        if from == Format::Hf && f.exists() {
                            Some(elastica_core::formats::json::read(&f)?)
                        } else {
                            None
                        }
                    }
                };
                match &hq {
                    Some(h) => {
                        o.insert(
                            "quantization_config".into(),
                            super::quantize::config_json_entry(h),
                        );
                        let hp = tmp.join("hf_quant_config.json");
                        std::fs::write(&hp, serde_json::to_string_pretty(h).unwrap())
                            .map_err(|e| Error::io(&hp, e))?;
                    }
                    None => {
                        o.remove("quantization_config");
                    }
                }
                if let Some(man) = out.manifest {
                    o.insert("elastic".into(), serde_json::to_value(man).unwrap());
                }
                let cp = tmp.join("config.json");
                std::fs::write(&cp, serde_json::to_string_pretty(&cfg).unwrap())
                    .map_err(|e| Error::io(&cp, e))?;
                if from == Format::Hf {
                    for f in HF_SIDE_FILES {
                        let src = m.meta.path.join(f);
                        if src.exists() {
                            std::fs::copy(&src, tmp.join(f)).map_err(|e| Error::io(&src, e))?;
                        }
                    }
                } else {
                    for (f, text) in
                        tokenizer::hf_files_from_gguf(m.meta.gguf()?, &m.meta.specials())?
                    {
                        std::fs::write(tmp.join(f), text).map_err(|e| Error::io(tmp.join(f), e))?;
                    }
                }
                safetensors::write(&tmp.join("model.safetensors"), &outs, data)
            }
            Format::Gguf => {
                let mut meta = match &ck.raw {
                    Raw::Gguf(g) => {
                        let a = g.str("general.architecture")?;
                        elastica_core::models::gguf_meta_with(
                            g,
                            &kept,
                            hp.gguf_meta(a, arch.gguf_unused())?,
                        )
                    }
                    Raw::Hf { .. } => {
                        let a = arch.arch_name(&hp);
                        let mut v = vec![
                            ("general.architecture".into(), gguf::Value::Str(a.into())),
                            ("general.name".into(), elastica_core::models::gguf_name(m)),
                        ];
                        v.extend(hp.gguf_meta(a, arch.gguf_unused())?);
                        v
                    }
                };
                if from == Format::Hf {
                    meta.extend(tokenizer::gguf_meta_from_hf(
                        &m.meta.path,
                        m.vocab,
                        &m.meta.specials(),
                    )?);
                }
                meta.retain(|(k, _)| k != "elastica.manifest");
                if let Some(man) = out.manifest {
                    meta.push((
                        "elastica.manifest".into(),
                        gguf::Value::Str(serde_json::to_string(man).unwrap()),
                    ));
                }
                gguf::write(&tmp, &meta, &outs, data)
            }
        }
    })();
    pb.finish();
    result.and_then(|()| out.check.map_or(Ok(()), |c| c(&tmp)))?;
    temp::commit([tmp])?;
    Ok(Written {
        tensors: outs.len(),
        bytes: total,
        seconds: t0.elapsed().as_secs_f64(),
    })
}

/// Hyper-parameters after an index map: the kept layers, with the kept count along every axis.
fn sliced(hp: &HParams, map: &IndexMap) -> HParams {
    let mut out = hp.clone();
    out.layers = (hp.layers.iter().zip(&map.layers))
        .filter_map(|(l, lm)| {
            let lm = lm.as_ref()?;
            let n = |a: Axis| match a {
                Axis::Hidden => map.hidden.len(),
                _ => lm[a].len(),
            };
            let size = l.size.map(|a, _| if a.applies(l.kind) { n(a) } else { 0 });
            Some(Layer { kind: l.kind, size })
        })
        .collect();
    let first = |a: Axis| {
        out.layers
            .iter()
            .find(|l| a.applies(l.kind))
            .map(|l| l.size[a])
    };
    out.size = hp.size.map(|a, &v| first(a).unwrap_or(v));
    out.size[Axis::Hidden] = map.hidden.len();
    out
}

/// Applies a layout transform to the gathered bytes of one output tensor.
fn transform(b: Vec<u8>, dt: DType, x: Xform, shape: &[usize]) -> Vec<u8> {
    if x == Xform::None {
        return b;
    }
    let n = shape.iter().product::<usize>();
    let mut v = vec![0f32; n];
    quant::dequant_row(dt, &b, 0, &mut v);
    let v = match x {
        Xform::NegExp => v.iter().map(|a| -a.exp()).collect(),
        Xform::LogNeg => v.iter().map(|a| (-a).ln()).collect(),
        Xform::RopeToGguf(heads) | Xform::RopeToHf(heads) => {
            // Rows of one head: HF order [half][i] <-> GGUF order [i][half].
            let cols = *shape.last().unwrap();
            let rows = n / cols;
            let d = rows / heads;
            let mut out = vec![0f32; n];
            for h in 0..heads {
                for half in 0..2 {
                    for i in 0..d / 2 {
                        let hf = h * d + half * (d / 2) + i;
                        let gg = h * d + 2 * i + half;
                        let (src, dst) = if matches!(x, Xform::RopeToGguf(_)) {
                            (hf, gg)
                        } else {
                            (gg, hf)
                        };
                        out[dst * cols..(dst + 1) * cols]
                            .copy_from_slice(&v[src * cols..(src + 1) * cols]);
                    }
                }
            }
            out
        }
        Xform::None => unreachable!(),
    };
    let mut out = Vec::with_capacity(b.len());
    encode(&v, dt, &mut out);
    out
}

/// Maps tensors between the HF and GGUF layouts (names, shapes, value transforms, expert stacking).
fn convert_layout(
    ck: &Checkpoint,
    gathered: Vec<Gathered>,
    map: &IndexMap,
    hp: &HParams,
    to_gguf: bool,
    convert: Option<DType>,
) -> Result<Vec<Planned>> {
    let m = &ck.model;
    let arch = ck.arch;
    let rope = arch.gguf_rope_permuted();
    let tensors = ck.raw.tensors();
    let heads_of = |layer: Option<usize>, kv: bool| -> usize {
        if kv {
            m.shape.kv_heads
        } else {
            layer
                .and_then(|l| hp.layers.get(l))
                .map_or(m.shape.heads, |x| x.size[Axis::Heads])
        }
    };
    let mut out = vec![];
    // Hub per-expert tensors become one stacked tensor per layer and projection.
    let mut stacks: std::collections::BTreeMap<(usize, &'static str), Vec<Gathered>> =
        Default::default();
    for g in gathered {
        let (layer, suffix) = split(&g.name);
        let layer_pre = |l: usize| {
            if to_gguf {
                format!("blk.{l}.")
            } else {
                arch.hf_layer(l)
            }
        };
        if to_gguf
            && suffix.starts_with("mixer.experts.")
            && g.role.as_ref().is_some_and(|r| r.expert.is_some())
        {
            let proj = if suffix.ends_with("up_proj.weight") {
                "ffn_up_exps.weight"
            } else {
                "ffn_down_exps.weight"
            };
            stacks.entry((layer.unwrap(), proj)).or_default().push(g);
            continue;
        }
        let target = elastica_core::models::role::TensorName::find(arch.tensors(), suffix)
            .map(|(t, _)| if to_gguf { t.gguf } else { t.hf[0] })
            .filter(|t| !t.is_empty());
        let Some(target) = target else {
            return Err(Error::Input(format!(
                "tensor {}: no {} name for it",
                g.src,
                if to_gguf { "GGUF" } else { "HF" }
            )));
        };
        let name = match layer {
            Some(l) => format!("{}{target}", layer_pre(l)),
            None => target.to_string(),
        };
        // GGUF → hub layout: unstack experts.
        if !to_gguf && target.starts_with("mixer.experts.") {
            let l = layer.unwrap();
            let lm = map
                .layers
                .iter()
                .flatten()
                .nth(l)
                .ok_or_else(|| Error::Input("expert layer missing".into()))?;
            let src_t = tensors.get(&g.src)?;
            let role = g.role.clone().unwrap();
            let sub_role = Role {
                dims: role.dims[1..].to_vec(),
                ..role
            };
            let proj = if target.contains("up_proj") {
                "up_proj"
            } else {
                "down_proj"
            };
            for (p, &e) in lm[Axis::Experts].iter().enumerate() {
                let view = src_t.index(e);
                let plan = GatherPlan::new(&view, &sub_role, map, &m.shape, convert)?;
                out.push(Planned {
                    out: OutTensor::new(
                        format!("{}mixer.experts.{p}.{proj}.weight", layer_pre(l)),
                        plan.dtype,
                        plan.shape.clone(),
                    ),
                    pieces: vec![Piece {
                        src: g.src.clone(),
                        sub: Some(e),
                        plan: Some(plan),
                    }],
                    xform: Xform::None,
                });
            }
            continue;
        }
        let n: usize = g.shape.iter().product();
        let (shape, xform) = match target {
            "ssm_conv1d.weight" => (vec![g.shape[0], *g.shape.last().unwrap()], Xform::None),
            "mixer.conv1d.weight" => (vec![g.shape[0], 1, g.shape[1]], Xform::None),
            "ssm_a" => (vec![n, 1], Xform::NegExp),
            "ssm_d" => (vec![n, 1], Xform::None),
            "mixer.A_log" => (vec![n], Xform::LogNeg),
            "mixer.D" | "mixer.norm.weight" => (vec![n], Xform::None),
            "ssm_norm.weight" => {
                let gr = m.shape.mamba_groups.max(1);
                (vec![gr, n / gr], Xform::None)
            }
            "attn_q.weight" | "attn_q.bias" if rope => {
                (g.shape.clone(), Xform::RopeToGguf(heads_of(layer, false)))
            }
            "attn_k.weight" | "attn_k.bias" if rope => {
                (g.shape.clone(), Xform::RopeToGguf(heads_of(layer, true)))
            }
            "self_attn.q_proj.weight" | "self_attn.q_proj.bias" if rope => {
                (g.shape.clone(), Xform::RopeToHf(heads_of(layer, false)))
            }
            "self_attn.k_proj.weight" | "self_attn.k_proj.bias" if rope => {
                (g.shape.clone(), Xform::RopeToHf(heads_of(layer, true)))
            }
            _ => (g.shape.clone(), Xform::None),
        };
        if xform != Xform::None && g.dtype.is_quantized() {
            return Err(Error::Tensor {
                name: g.src.clone(),
                msg: "needs a float format to convert between layouts".into(),
            });
        }
        out.push(Planned {
            out: OutTensor {
                name,
                dtype: g.dtype,
                shape,
                scale: g.scale,
                input_scale: g.input_scale,
            },
            pieces: vec![Piece {
                src: g.src,
                sub: None,
                plan: g.plan,
            }],
            xform,
        });
    }
    for ((l, proj), mut parts) in stacks {
        parts.sort_by_key(|g| {
            let s = split(&g.name).1;
            s.trim_start_matches("mixer.experts.")
                .split('.')
                .next()
                .and_then(|x| x.parse::<usize>().ok())
                .unwrap_or(0)
        });
        let dt = parts[0].dtype;
        let mut shape = vec![parts.len()];
        shape.extend(parts[0].shape.iter().copied());
        out.push(Planned {
            out: OutTensor::new(format!("blk.{l}.{proj}"), dt, shape),
            pieces: parts
                .into_iter()
                .map(|g| Piece {
                    src: g.src,
                    sub: None,
                    plan: g.plan,
                })
                .collect(),
            xform: Xform::None,
        });
    }
    Ok(out)
}
