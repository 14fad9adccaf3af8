//! Architectures: each file maps one family's checkpoints (HF config + tensor names, or GGUF
//! metadata + tensor names) onto the shared block-list [`Model`](crate::model::Model).
//!
//! - `llama.rs`: Llama family (RoPE, GQA, SwiGLU, tied embeddings) — SmolLM2.
//! - `nemotron_h.rs`: Nemotron-H hybrids (Mamba-2, attention, relu² MLP, MoE).

pub mod hparams;
pub mod init;
pub mod llama;
pub mod nemotron_h;
pub mod role;

pub use hparams::HParams;
pub use role::{Dim, Role};

use crate::error::{Error, Result};
use crate::formats::gguf::Gguf;
pub use crate::formats::json::parse_float;
use crate::formats::{TensorMap, json, safetensors};
use crate::layers::Vector;
use crate::manifest::Manifest;
use crate::model::{Format, Meta, Model};
use serde_json::Value as Json;
use std::path::{Path, PathBuf};

/// Everything the rest of elastica asks about an architecture. A trait over unit structs rather
/// than an enum, so that adding an architecture is one module plus one line in [`ARCHS`] and
/// nothing else matches on it.
pub trait Arch: Sync {
    /// elastica's name (the `arch` of HF checkpoints and importance files).
    fn name(&self) -> &'static str;
    /// HF `model_type` values and `architectures` classes read as this architecture.
    fn hf_names(&self) -> &'static [&'static str];
    /// GGUF `general.architecture` values read as this architecture.
    fn gguf_names(&self) -> &'static [&'static str];
    /// `Meta::arch` of a checkpoint with these hyper-parameters (and GGUF's
    /// `general.architecture` written for it).
    fn arch_name(&self, hp: &HParams) -> &'static str {
        let _ = hp;
        self.name()
    }
    /// config.json (its path for errors) into hyper-parameters.
    fn read_hf(&self, cfg: &Json, path: &Path) -> Result<HParams>;
    /// GGUF metadata (and the tensors present) into hyper-parameters.
    fn read_gguf(&self, g: &Gguf) -> Result<HParams>;
    /// config.json for `hp`: `base` (the input's config.json) with the sizes replaced, or a new
    /// one; `m` gives the special tokens.
    fn hf_config(&self, hp: &HParams, base: Option<&Json>, m: &Model) -> Result<Json>;
    /// The model from its tensors in either layout.
    fn build(&self, hp: &HParams, t: &TensorMap, format: Format, meta: Meta) -> Result<Model>;
    /// Every tensor: HF and GGUF names and elastic axes.
    fn tensors(&self) -> &'static [role::TensorName];
    /// The elastic role of a tensor (HF or GGUF name); None for tensors kept as they are.
    fn role(&self, name: &str) -> Option<Role> {
        role::TensorName::role(self.tensors(), name)
    }
    /// Keys of [`HParams::gguf_meta`] (after `{arch}.`) this architecture does not write.
    fn gguf_unused(&self) -> &'static [&'static str] {
        &[]
    }
    /// HF per-layer name prefix written for layer `l`.
    fn hf_layer(&self, l: usize) -> String;
    /// GGUF stores q/k rows with RoPE pairs adjacent (llama.cpp's converter permutes them).
    fn gguf_rope_permuted(&self) -> bool {
        false
    }
    /// Layer `l`'s matrices whose input moments an importance matrix records, each by its
    /// (GGUF, HF) names, with which input reads it: 0/1 the first/second block's norm output,
    /// 2 the attention output, 3 the MLP activation. Empty: no importance matrix.
    fn imatrix_matrices(&self, l: usize) -> Vec<([String; 2], usize)> {
        let _ = l;
        vec![]
    }
    /// Every tensor of a new checkpoint with these hyper-parameters (HF names, torch shapes) and
    /// how it starts (`cfg`: config.json, for initialisation fields such as
    /// `initializer_range`); `elastica init`.
    fn layout(&self, hp: &HParams, cfg: &Json) -> Result<Vec<init::InitTensor>> {
        let _ = (hp, cfg);
        Err(Error::Input(format!(
            "initialising a new {} checkpoint is not supported",
            self.name()
        )))
    }
}

/// The known architectures.
pub static ARCHS: &[&dyn Arch] = &[&llama::Llama, &nemotron_h::NemotronH];

fn known() -> String {
    ARCHS
        .iter()
        .map(|a| a.name())
        .collect::<Vec<_>>()
        .join(", ")
}

/// The architecture of a checkpoint by elastica's name or a GGUF `general.architecture`.
pub fn arch(name: &str) -> Result<&'static dyn Arch> {
    ARCHS
        .iter()
        .find(|a| a.name() == name || a.gguf_names().contains(&name))
        .copied()
        .ok_or_else(|| {
            Error::Input(format!(
                "unknown architecture {name:?} (supported: {})",
                known()
            ))
        })
}

/// The architecture an HF config names (`model_type`, else `architectures`).
fn hf_arch(v: &Json, path: &Path) -> Result<&'static dyn Arch> {
    let model_type = v.get("model_type").and_then(|x| x.as_str()).unwrap_or("");
    let classes: Vec<&str> = v
        .get("architectures")
        .and_then(|a| a.as_array())
        .map(|a| a.iter().filter_map(|x| x.as_str()).collect())
        .unwrap_or_default();
    let find = |n: &str| ARCHS.iter().find(|a| a.hf_names().contains(&n)).copied();
    find(model_type)
        .or_else(|| classes.iter().find_map(|c| find(c)))
        .ok_or_else(|| {
            Error::config(
                format!("{}: model_type", path.display()),
                format!(
                    "unknown architecture {model_type:?} {classes:?} (supported: {})",
                    known()
                ),
            )
        })
}

/// A new checkpoint's tensors for the config.json at `path` (`elastica init`), and the config.
pub fn layout(path: &Path) -> Result<(Json, Vec<init::InitTensor>)> {
    let v: Json = json::read(path)?;
    let arch = hf_arch(&v, path)?;
    let hp = arch.read_hf(&v, path)?;
    let t = arch.layout(&hp, &v)?;
    Ok((v, t))
}

/// A loaded model together with everything its checkpoint holds (config or metadata and every
/// tensor by name), for tools that rewrite checkpoints (elastify, slice).
pub struct Checkpoint {
    pub model: Model,
    pub arch: &'static dyn Arch,
    pub hp: HParams,
    pub raw: Raw,
}

pub enum Raw {
    Hf { config: Json, tensors: TensorMap },
    Gguf(Gguf),
}

impl Raw {
    pub fn tensors(&self) -> &TensorMap {
        match self {
            Raw::Hf { tensors, .. } => tensors,
            Raw::Gguf(g) => &g.tensors,
        }
    }
}

/// Loads a model from an HF checkpoint folder or a .gguf file.
pub fn load(path: &Path) -> Result<Model> {
    open(path).map(|c| c.model)
}

/// Loads a model and keeps its checkpoint's raw contents.
pub fn open(path: &Path) -> Result<Checkpoint> {
    if !path.exists() {
        return Err(Error::Input(format!(
            "{}: no such file or folder",
            path.display()
        )));
    }
    let ck = if path.is_dir() {
        load_hf(path)?
    } else {
        load_gguf(path)?
    };
    if let Some(m) = &ck.model.meta.manifest {
        m.validate(&ck.model.shape)?;
    }
    Ok(ck)
}

fn load_hf(dir: &Path) -> Result<Checkpoint> {
    let cfg_path = dir.join("config.json");
    let v: Json = json::read(&cfg_path)?;
    let tensors = safetensors::load_dir(dir)?;
    let arch = hf_arch(&v, &cfg_path)?;
    let mut meta = hf_meta(dir, &v)?;
    let mut hp = arch.read_hf(&v, &cfg_path)?;
    hp.context = meta.context;
    meta.arch = arch.arch_name(&hp).into();
    let model = arch.build(&hp, &tensors, Format::Hf, meta)?;
    Ok(Checkpoint {
        model,
        arch,
        hp,
        raw: Raw::Hf { config: v, tensors },
    })
}

fn load_gguf(path: &Path) -> Result<Checkpoint> {
    let g = Gguf::open(path)?;
    let arch = g.str("general.architecture")?.to_string();
    let manifest = match g.get("elastica.manifest").and_then(|v| v.as_str()) {
        Some(s) => {
            let j: Json = json::from_str(s)
                .map_err(|e| Error::format(path, format!("elastica.manifest is not JSON: {e}")))?;
            Some(Manifest::from_json(
                &j,
                &format!("{} (elastica.manifest)", path.display()),
            )?)
        }
        None => side_manifest(&PathBuf::from(format!("{}.elastic.json", path.display())))?,
    };
    let eos: Vec<u32> = g
        .get("tokenizer.ggml.eos_token_id")
        .and_then(|v| v.as_u64())
        .map(|e| vec![e as u32])
        .unwrap_or_default();
    let mut eos = eos;
    if let Some(e) = g
        .get("tokenizer.ggml.eot_token_id")
        .and_then(|v| v.as_u64())
        && !eos.contains(&(e as u32))
    {
        eos.push(e as u32);
    }
    let meta = Meta {
        path: path.to_path_buf(),
        format: Format::Gguf,
        arch: arch.clone(),
        bos: g
            .get("tokenizer.ggml.bos_token_id")
            .and_then(|v| v.as_u64())
            .map(|v| v as u32),
        eos,
        add_bos: g
            .get("tokenizer.ggml.add_bos_token")
            .and_then(|v| v.as_bool())
            .unwrap_or(false),
        chat_template: g
            .get("tokenizer.chat_template")
            .and_then(|v| v.as_str())
            .map(String::from),
        context: g
            .get(&format!("{arch}.context_length"))
            .and_then(|v| v.as_u64())
            .unwrap_or(4096) as usize,
        manifest,
        gguf: None,
    };
    let a = ARCHS
        .iter()
        .find(|a| a.gguf_names().contains(&arch.as_str()))
        .copied()
        .ok_or_else(|| {
            let names: Vec<_> = ARCHS.iter().flat_map(|a| a.gguf_names()).copied().collect();
            Error::format(
                path,
                format!(
                    "unknown architecture {arch:?} in general.architecture (supported: {})",
                    names.join(", ")
                ),
            )
        })?;
    let hp = a.read_gguf(&g)?;
    let mut model = a.build(&hp, &g.tensors, Format::Gguf, meta)?;
    model.meta.gguf = Some(g.meta.clone());
    Ok(Checkpoint {
        model,
        arch: a,
        hp,
        raw: Raw::Gguf(g),
    })
}

fn side_manifest(p: &Path) -> Result<Option<Manifest>> {
    json::read_opt(p)?
        .map(|j| Manifest::from_json(&j, &p.display().to_string()))
        .transpose()
}

fn ids(v: Option<&Json>) -> Vec<u32> {
    match v {
        Some(Json::Number(n)) => n.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
        Some(Json::Array(a)) => a
            .iter()
            .filter_map(|x| x.as_u64())
            .map(|x| x as u32)
            .collect(),
        _ => vec![],
    }
}

/// Metadata of an HF folder: special ids, chat template, manifest, context.
fn hf_meta(dir: &Path, cfg: &Json) -> Result<Meta> {
    let gen_cfg = json::read_opt::<Json>(&dir.join("generation_config.json"))?;
    let tok_cfg = json::read_opt::<Json>(&dir.join("tokenizer_config.json"))?;
    let mut eos = ids(cfg.get("eos_token_id"));
    if let Some(g) = &gen_cfg {
        for e in ids(g.get("eos_token_id")) {
            if !eos.contains(&e) {
                eos.push(e);
            }
        }
    }
    let bos = ids(cfg.get("bos_token_id")).first().copied();
    let mut chat_template = None;
    let jinja = dir.join("chat_template.jinja");
    if jinja.exists() {
        chat_template = Some(std::fs::read_to_string(&jinja).map_err(|e| Error::io(&jinja, e))?);
    } else if let Some(t) = tok_cfg.as_ref().and_then(|t| t.get("chat_template")) {
        chat_template = match t {
            Json::String(s) => Some(s.clone()),
            Json::Array(a) => a
                .iter()
                .find(|e| e.get("name").and_then(|n| n.as_str()) == Some("default"))
                .or(a.first())
                .and_then(|e| e.get("template"))
                .and_then(|t| t.as_str())
                .map(String::from),
            _ => None,
        };
    }
    let add_bos = tok_cfg
        .as_ref()
        .and_then(|t| t.get("add_bos_token"))
        .and_then(|b| b.as_bool())
        .unwrap_or(false);
    let manifest = match cfg.get("elastic") {
        Some(m) => Some(Manifest::from_json(
            m,
            &format!("{} (\"elastic\")", dir.join("config.json").display()),
        )?),
        None => side_manifest(&dir.join("elastic.json"))?,
    };
    Ok(Meta {
        path: dir.to_path_buf(),
        format: Format::Hf,
        arch: String::new(),
        bos,
        eos,
        add_bos,
        chat_template,
        context: cfg
            .get("max_position_embeddings")
            .and_then(|x| x.as_u64())
            .unwrap_or(4096) as usize,
        manifest,
        gguf: None,
    })
}

/// config.json into an architecture's serde config; errors name the file and field.
pub(crate) fn parse_config<T: serde::de::DeserializeOwned>(v: &Json, path: &Path) -> Result<T> {
    serde_path_to_error::deserialize(v).map_err(|e| {
        let field = e.path().to_string();
        let field = if field == "." {
            String::new()
        } else {
            format!(": {field}")
        };
        Error::config(
            format!("{}{field}", path.display()),
            e.into_inner().to_string(),
        )
    })
}

/// A serde config as a JSON object, without its unset fields.
pub(crate) fn to_object<T: serde::Serialize>(c: &T) -> serde_json::Map<String, Json> {
    match serde_json::to_value(c) {
        Ok(Json::Object(mut o)) => {
            o.retain(|_, v| !v.is_null());
            o
        }
        _ => Default::default(),
    }
}

/// A config number read leniently ([`parse_float`]): `#[serde(deserialize_with = "lenient")]`.
pub(crate) fn lenient<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> std::result::Result<Option<f64>, D::Error> {
    use serde::Deserialize;
    match Option::<Json>::deserialize(d)? {
        None => Ok(None),
        Some(x) => parse_float(&x)
            .map(Some)
            .ok_or_else(|| serde::de::Error::custom(format!("{x} is not a number"))),
    }
}

/// Small helpers shared by the architecture files.
pub(crate) fn vec_f32(t: &TensorMap, name: &str, len: usize) -> Result<Vector> {
    let x = t.get(name)?;
    if x.numel() != len {
        return Err(Error::Tensor {
            name: name.into(),
            msg: format!("has {} values, the config implies {len}", x.numel()),
        });
    }
    Ok(Vector::of(x))
}

pub(crate) fn opt_vec_f32(t: &TensorMap, name: &str, len: usize) -> Result<Option<Vector>> {
    if t.has(name) {
        vec_f32(t, name, len).map(Some)
    } else {
        Ok(None)
    }
}

pub(crate) fn matrix(
    t: &TensorMap,
    name: &str,
    rows: usize,
    cols: usize,
) -> Result<crate::tensor::Tensor> {
    let x = t.get(name)?;
    x.expect_shape(&[rows, cols])?;
    Ok(x.clone())
}

/// Splits `...layers.{i}.rest` or `blk.{i}.rest` into (i, rest).
pub fn split_layer(name: &str) -> Option<(usize, &str)> {
    for pre in ["layers.", "blk."] {
        if let Some(p) = name.find(pre)
            && (p == 0 || name.as_bytes()[p - 1] == b'.')
        {
            let rest = &name[p + pre.len()..];
            let (num, tail) = rest.split_once('.')?;
            return Some((num.parse().ok()?, tail));
        }
    }
    None
}

/// GGUF metadata for a rewritten checkpoint: per-layer arrays filtered to the kept layers, then
/// `set` applied (keys added at the end when new).
pub fn gguf_meta_with(
    g: &Gguf,
    kept: &[usize],
    set: Vec<(String, crate::formats::gguf::Value)>,
) -> Vec<(String, crate::formats::gguf::Value)> {
    use crate::formats::gguf::Value;
    let arch = g
        .meta
        .get("general.architecture")
        .and_then(|v| v.as_str())
        .unwrap_or("")
        .to_string();
    let n = g
        .meta
        .get(&format!("{arch}.block_count"))
        .and_then(|v| v.as_u64())
        .unwrap_or(0) as usize;
    let mut out: Vec<(String, Value)> = g
        .kv_order
        .iter()
        .map(|k| {
            let v = &g.meta[k];
            let v = match v {
                Value::Array(a) if n > 0 && a.len() == n && k.starts_with(&format!("{arch}.")) => {
                    Value::Array(kept.iter().map(|&i| a[i].clone()).collect())
                }
                _ => v.clone(),
            };
            (k.clone(), v)
        })
        .collect();
    for (k, v) in set {
        match out.iter_mut().find(|(x, _)| *x == k) {
            Some(slot) => slot.1 = v,
            None => out.push((k, v)),
        }
    }
    out
}

/// `general.name` for a GGUF written from a checkpoint: its file or folder name.
pub fn gguf_name(m: &Model) -> crate::formats::gguf::Value {
    crate::formats::gguf::Value::Str(
        m.meta
            .path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_architectures_are_refused_by_name() {
        let e = arch("falcon").err().unwrap().to_string();
        assert!(
            e.contains("\"falcon\"") && e.contains("llama, nemotron_h"),
            "{e}"
        );
        let cfg =
            serde_json::json!({"model_type": "gpt_neox", "architectures": ["GPTNeoXForCausalLM"]});
        let e = hf_arch(&cfg, Path::new("m/config.json"))
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("m/config.json: model_type")
                && e.contains("gpt_neox")
                && e.contains("llama, nemotron_h"),
            "{e}"
        );
        // The aliases: a Mistral config reads as Llama, a GGUF nemotron_h_moe as Nemotron-H.
        let cfg = serde_json::json!({"model_type": "mistral"});
        assert_eq!(hf_arch(&cfg, Path::new("c")).unwrap().name(), "llama");
        let cfg = serde_json::json!({"architectures": ["NemotronHForCausalLM"]});
        assert_eq!(hf_arch(&cfg, Path::new("c")).unwrap().name(), "nemotron_h");
        assert_eq!(arch("nemotron_h_moe").unwrap().name(), "nemotron_h");
    }

    #[test]
    fn each_name_belongs_to_one_architecture() {
        for a in ARCHS {
            for n in a.hf_names() {
                assert_eq!(
                    ARCHS.iter().filter(|b| b.hf_names().contains(n)).count(),
                    1,
                    "{n}"
                );
            }
            for n in a.gguf_names() {
                assert_eq!(arch(n).unwrap().name(), a.name(), "{n}");
            }
        }
    }
}
