//! Post-training quantization (PTQ) of an elastic checkpoint to FP8 or NVFP4 in NVIDIA
//! ModelOpt's layout (method doc §6; serving-and-quant-conventions §4). Each matrix gets a
//! per-tensor scale from its absolute maximum (routed experts of one layer and projection share
//! theirs, so GGUF can stack them) and a static `input_scale` from calibration text. NVIDIA's
//! Nano NVFP4 recipe picks the matrices left in BF16. The output is written by the writer
//! `slice` uses ([`super::rewrite`]), manifest included, so every budget still slices from it.

use elastica_core::error::{Error, Result};
use elastica_core::kernels::fp;
use elastica_core::kernels::quant::ToF32;
use elastica_core::layers::Observer;
use elastica_core::model::{Cache, Logits, Mixer, Model};
use elastica_core::models::Checkpoint;
use elastica_core::tensor::{DType, Tensor};
use serde_json::{Value, json};
use std::collections::{BTreeMap, HashMap};

/// The per-tensor scales of one quantized matrix.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Scales {
    /// FP8 `weight_scale` or NVFP4 `weight_scale_2`.
    pub scale: f32,
    pub input_scale: Option<f32>,
}

/// What `quantize` writes: the format, and the scales of every matrix it quantizes (by source
/// tensor name); the others keep their format.
#[derive(Debug)]
pub struct Plan {
    pub to: DType,
    pub tensors: BTreeMap<String, Scales>,
    /// Modules left unquantized (ModelOpt's `exclude_modules`).
    pub excluded: Vec<String>,
}

/// `--to`: `fp8` or `nvfp4`.
pub fn parse_to(s: &str) -> Result<DType> {
    match s.to_ascii_lowercase().as_str() {
        "fp8" => Ok(DType::F8E4M3),
        "nvfp4" => Ok(DType::Nvfp4),
        other => Err(Error::Input(format!("--to {other:?}: use fp8 or nvfp4"))),
    }
}

impl Plan {
    /// ModelOpt's `quant_algo`.
    pub fn algo(&self) -> &'static str {
        if self.to == DType::Nvfp4 {
            "NVFP4"
        } else {
            "FP8"
        }
    }

    /// The content of `hf_quant_config.json`.
    pub fn hf_quant_config(&self) -> Value {
        let mut q = json!({
            "quant_algo": self.algo(),
            "kv_cache_quant_algo": Value::Null,
            "exclude_modules": self.excluded,
        });
        if self.to == DType::Nvfp4 {
            q["group_size"] = json!(fp::NVFP4_BLOCK);
        }
        json!({
            "producer": {"name": "modelopt", "version": concat!("elastica ", env!("CARGO_PKG_VERSION"))},
            "quantization": q,
        })
    }
}

/// config.json's `quantization_config` for an `hf_quant_config.json` (vLLM and llama.cpp read
/// either; `ignore` is the older name of `exclude_modules`).
pub fn config_json_entry(h: &Value) -> Value {
    let q = &h["quantization"];
    let mut c = json!({
        "quant_method": "modelopt",
        "quant_algo": q["quant_algo"],
        "kv_cache_quant_algo": q["kv_cache_quant_algo"],
        "exclude_modules": q["exclude_modules"],
        "ignore": q["exclude_modules"],
    });
    if let Some(g) = q.get("group_size") {
        c["group_size"] = g.clone();
    }
    c
}

/// A matrix `quantize` may quantize: its source tensor name, module name (the name without
/// `.weight`, what exclusion globs match) and whether NVIDIA's recipe keeps it in BF16.
#[derive(Clone, Debug)]
pub struct Candidate {
    pub name: String,
    pub module: String,
    pub kept_by_default: bool,
}

/// Source name of a model tensor (a stacked expert's view `NAME[e]` is `NAME`).
fn source_name(t: &Tensor) -> String {
    match t.name.rfind('[') {
        Some(p) if t.name.ends_with(']') => t.name[..p].to_string(),
        _ => t.name.clone(),
    }
}

/// The matrices of `model` in block order. Kept in BF16 by default (NVIDIA's Nano NVFP4
/// recipe): the LM head, the attention projections, and the Mamba in/out projections of the
/// blocks next to attention; the embedding table is never quantized.
pub fn candidates(model: &Model) -> Vec<Candidate> {
    let mut out: Vec<Candidate> = vec![];
    let mut push = |t: &Tensor, kept: bool| {
        let name = source_name(t);
        if out.iter().any(|c| c.name == name) {
            return;
        }
        let module = name.strip_suffix(".weight").unwrap_or(&name).to_string();
        out.push(Candidate {
            name,
            module,
            kept_by_default: kept,
        });
    };
    if let Some(h) = &model.lm_head {
        push(h, true);
    }
    let blocks = &model.blocks;
    let is_attn = |i: usize| matches!(blocks.get(i).map(|b| &b.mixer), Some(Mixer::Attention(_)));
    for (i, b) in blocks.iter().enumerate() {
        match &b.mixer {
            Mixer::Attention(a) => [&a.q, &a.k, &a.v, &a.o]
                .into_iter()
                .for_each(|t| push(t, true)),
            Mixer::Mamba(m) => {
                let near = (i > 0 && is_attn(i - 1)) || is_attn(i + 1);
                push(&m.in_proj, near);
                push(&m.out_proj, near);
            }
            Mixer::Mlp(m) => {
                push(&m.up, false);
                if let Some(g) = &m.gate {
                    push(g, false);
                }
                push(&m.down, false);
            }
            Mixer::Moe(m) => {
                m.up.iter()
                    .chain(m.down.iter())
                    .for_each(|t| push(t, false));
                if let Some(s) = &m.shared {
                    push(&s.up, false);
                    push(&s.down, false);
                }
            }
        }
    }
    out
}

/// Largest |x| of the input of every matrix over the calibration sequences (by source name).
struct InputAmax(HashMap<String, f32>);

impl Observer for InputAmax {
    fn weight_input(&mut self, w: &Tensor, _cols: &[std::ops::Range<usize>], x: &[f32]) {
        let a = x.iter().fold(0f32, |m, v| m.max(v.abs()));
        let e = self.0.entry(source_name(w)).or_insert(0.0);
        *e = e.max(a);
    }
}

/// Runs the full model on `seqs` and returns each matrix's input absolute maximum.
pub fn input_amax(model: &Model, seqs: &[Vec<u32>]) -> Result<HashMap<String, f32>> {
    let mut obs = InputAmax(HashMap::new());
    let full = model.full_budget();
    let mut cache = Cache::new(model, seqs.iter().map(|s| s.len()).max().unwrap_or(1));
    for s in seqs {
        cache.reset();
        model.forward_observed(s, &full, &mut cache, Logits::None, &mut obs)?;
    }
    Ok(obs.0)
}

/// Routed experts of one layer and projection share a scale: their names with the expert
/// number replaced.
pub fn scale_group(name: &str) -> String {
    match name.find("experts.") {
        Some(p) => {
            let rest = &name[p + 8..];
            let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
            if digits > 0 && rest[digits..].starts_with('.') {
                format!("{}experts.*{}", &name[..p], &rest[digits..])
            } else {
                name.to_string()
            }
        }
        None => name.to_string(),
    }
}

/// The matrices to quantize (`exclude`: ModelOpt-style globs over module or tensor names,
/// replacing the default recipe) and the modules left out (ModelOpt's `exclude_modules`).
pub fn selection(
    model: &Model,
    exclude: Option<&[String]>,
) -> Result<(Vec<Candidate>, Vec<String>)> {
    let patterns = match exclude {
        Some(globs) => Some(
            globs
                .iter()
                .map(|g| {
                    glob::Pattern::new(g).map_err(|e| Error::Input(format!("--exclude {g:?}: {e}")))
                })
                .collect::<Result<Vec<_>>>()?,
        ),
        None => None,
    };
    let mut excluded = vec!["lm_head".to_string()];
    let mut chosen = vec![];
    for c in candidates(model) {
        let keep = match &patterns {
            Some(p) => p.iter().any(|p| p.matches(&c.module) || p.matches(&c.name)),
            None => c.kept_by_default,
        };
        if keep {
            if !excluded.contains(&c.module) {
                excluded.push(c.module.clone());
            }
        } else {
            chosen.push(c);
        }
    }
    // conv1d is never a matrix product here; listed as NVIDIA's recipe lists it.
    excluded.push("*conv1d*".into());
    Ok((chosen, excluded))
}

/// Plans the quantization of `ck` to `to`: picks the matrices (`exclude`: ModelOpt-style globs
/// over module names replacing the default recipe), checks them (float source, finite values,
/// whole NVFP4 blocks), and computes their scales; `amax` holds the calibrated input maxima.
pub fn plan(
    ck: &Checkpoint,
    to: DType,
    exclude: Option<&[String]>,
    amax: &HashMap<String, f32>,
) -> Result<Plan> {
    let tensors = ck.raw.tensors();
    let (chosen, excluded) = selection(&ck.model, exclude)?;
    // Per-tensor amax, shared within expert groups; every value checked.
    let mut group_amax: HashMap<String, f32> = HashMap::new();
    for c in &chosen {
        let t = tensors.get(&c.name)?;
        if !matches!(t.dtype, DType::F32 | DType::F16 | DType::BF16) {
            return Err(Error::Tensor {
                name: c.name.clone(),
                msg: format!(
                    "is already quantized ({}); quantize from a float (F32/F16/BF16) checkpoint",
                    t.dtype
                ),
            });
        }
        if to == DType::Nvfp4 && t.cols() % fp::NVFP4_BLOCK != 0 {
            return Err(Error::Tensor {
                name: c.name.clone(),
                msg: format!(
                    "has {} inputs per row, not whole 16-value NVFP4 blocks (leave it out with --exclude)",
                    t.cols()
                ),
            });
        }
        let v = t.to_f32();
        if let Some(i) = v.iter().position(|x| !x.is_finite()) {
            return Err(Error::Tensor {
                name: c.name.clone(),
                msg: format!(
                    "holds {} at row {}, column {}; nothing written",
                    v[i],
                    i / t.cols(),
                    i % t.cols()
                ),
            });
        }
        t.release();
        let a = v.iter().fold(0f32, |m, x| m.max(x.abs()));
        let g = group_amax.entry(scale_group(&c.name)).or_insert(0.0);
        *g = g.max(a);
    }
    let mut out = BTreeMap::new();
    for c in &chosen {
        let a = group_amax[&scale_group(&c.name)];
        let (scale, input) = match to {
            DType::F8E4M3 => (
                fp::fp8_scale(a),
                amax.get(&c.name).map(|&x| fp::fp8_scale(x)),
            ),
            _ => (
                fp::nvfp4_scale(a),
                amax.get(&c.name).map(|&x| fp::nvfp4_scale(x)),
            ),
        };
        out.insert(
            c.name.clone(),
            Scales {
                scale,
                input_scale: input,
            },
        );
    }
    Ok(Plan {
        to,
        tensors: out,
        excluded,
    })
}

/// What [`write`] produced.
pub struct Quantized {
    pub plan: Plan,
    pub written: super::rewrite::Written,
    /// The manifest budgets checked on the written file.
    pub budgets: Vec<String>,
}

/// Quantizes `ck` to `to` and writes it at `out` (the input's format, manifest kept): input
/// scales calibrated on `seqs`, matrices chosen by `exclude` (default: NVIDIA's recipe). Every
/// manifest budget must still resolve on the written file, its cuts on whole blocks; a file
/// that fails is not kept.
pub fn write(
    ck: &Checkpoint,
    to: DType,
    exclude: Option<&[String]>,
    seqs: &[Vec<u32>],
    out: &std::path::Path,
    force: bool,
    progress: &elastica_core::progress::Progress,
) -> Result<Quantized> {
    let m = &ck.model;
    progress.stage(
        "calibrate",
        seqs.len() as u64,
        elastica_core::progress::Unit::Count("sequences"),
    );
    let amax = input_amax(m, seqs)?;
    progress.inc(seqs.len() as u64);
    let plan = plan(ck, to, exclude, &amax)?;
    let budgets: Vec<String> = m
        .meta
        .manifest
        .as_ref()
        .map(|man| man.budgets.iter().map(|b| b.name.clone()).collect())
        .unwrap_or_default();
    let check = |p: &std::path::Path| -> Result<()> {
        let q = elastica_core::models::load(p)?;
        for name in &budgets {
            let b = q.budget(name).map_err(|e| {
                Error::Budget(format!(
                    "budget {name:?} does not fit the {} blocks: {e}",
                    plan.algo()
                ))
            })?;
            q.check_alignment(&b)
                .map_err(|e| Error::Budget(format!("budget {name:?}: {e}")))?;
        }
        Ok(())
    };
    let map = super::IndexMap::identity(&m.shape);
    let written = super::rewrite::write(
        ck,
        &map,
        &super::rewrite::Output {
            values: None,
            path: out,
            convert: None,
            manifest: m.meta.manifest.as_ref(),
            force,
            progress,
            check: Some(&check),
            format: None,
            imatrix: None,
            quant: Some(&plan),
        },
    )?;
    Ok(Quantized {
        plan,
        written,
        budgets,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn experts_of_one_projection_share_a_scale_group() {
        assert_eq!(
            scale_group("backbone.layers.3.mixer.experts.17.up_proj.weight"),
            "backbone.layers.3.mixer.experts.*.up_proj.weight"
        );
        assert_eq!(
            scale_group("backbone.layers.3.mixer.shared_experts.up_proj.weight"),
            "backbone.layers.3.mixer.shared_experts.up_proj.weight"
        );
        assert_eq!(
            scale_group("blk.3.ffn_up_exps.weight"),
            "blk.3.ffn_up_exps.weight"
        );
    }

    #[test]
    fn unknown_formats_are_refused() {
        assert!(parse_to("fp8").is_ok() && parse_to("NVFP4").is_ok());
        let e = parse_to("int4").unwrap_err().to_string();
        assert!(e.contains("--to") && e.contains("int4"), "{e}");
    }
}
