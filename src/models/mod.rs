//! Architectures: each file maps one family's checkpoints (HF config + tensor names, or GGUF
//! metadata + tensor names) onto the shared block-list [`Model`](crate::model::Model).
//!
//! - `llama.rs`: Llama family (RoPE, GQA, SwiGLU, tied embeddings) — SmolLM2.
//! - `nemotron_h.rs`: Nemotron-H hybrids (Mamba-2, attention, relu² MLP, MoE).

pub mod llama;
pub mod nemotron_h;

use crate::error::{Error, Result};
use crate::formats::gguf::Gguf;
pub use crate::formats::json::parse_float;
use crate::formats::{TensorMap, json, safetensors};
use crate::layers::Vector;
use crate::manifest::Manifest;
use crate::model::{Format, Meta, Model};
use serde_json::Value as Json;
use std::path::{Path, PathBuf};

/// A loaded model together with everything its checkpoint holds (config or metadata and every
/// tensor by name), for tools that rewrite checkpoints (elastify, slice).
pub struct Checkpoint {
    pub model: Model,
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
    let cfg = Cfg {
        v: &v,
        path: &cfg_path,
    };
    let tensors = safetensors::load_dir(dir)?;
    let model_type = v.get("model_type").and_then(|x| x.as_str()).unwrap_or("");
    let archs: Vec<&str> = v
        .get("architectures")
        .and_then(|a| a.as_array())
        .map(|a| a.iter().filter_map(|x| x.as_str()).collect())
        .unwrap_or_default();
    let mut meta = hf_meta(dir, &v)?;
    let model = match model_type {
        "llama" | "mistral" => {
            meta.arch = "llama".into();
            llama::from_hf(&cfg, &tensors, meta)?
        }
        "nemotron_h" => nemotron_h::from_hf(&cfg, &tensors, meta)?,
        _ if archs.contains(&"LlamaForCausalLM") => {
            meta.arch = "llama".into();
            llama::from_hf(&cfg, &tensors, meta)?
        }
        _ if archs.contains(&"NemotronHForCausalLM") => nemotron_h::from_hf(&cfg, &tensors, meta)?,
        other => {
            return Err(Error::config(
                format!("{}: model_type", cfg_path.display()),
                format!("unknown architecture {other:?} {archs:?} (supported: llama, nemotron_h)"),
            ));
        }
    };
    Ok(Checkpoint {
        model,
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
    let mut model = match arch.as_str() {
        "llama" => llama::from_gguf(&g, meta)?,
        "nemotron_h" | "nemotron_h_moe" => nemotron_h::from_gguf(&g, meta)?,
        other => {
            return Err(Error::format(
                path,
                format!(
                    "unknown architecture {other:?} in general.architecture (supported: llama, nemotron_h, nemotron_h_moe)"
                ),
            ));
        }
    };
    model.meta.gguf = Some(g.meta.clone());
    Ok(Checkpoint {
        model,
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

/// config.json accessor whose errors name the file and field.
pub struct Cfg<'a> {
    pub v: &'a Json,
    pub path: &'a Path,
}

impl Cfg<'_> {
    fn field(&self, k: &str) -> String {
        format!("{}: {k}", self.path.display())
    }
    /// The first present of several spellings.
    pub fn get(&self, keys: &[&str]) -> Option<&Json> {
        keys.iter()
            .find_map(|k| self.v.get(*k).filter(|x| !x.is_null()))
    }
    pub fn usize(&self, keys: &[&str]) -> Result<usize> {
        match self.get(keys) {
            Some(x) => x.as_u64().map(|n| n as usize).ok_or_else(|| {
                Error::config(
                    self.field(keys[0]),
                    format!("{x} is not a non-negative integer"),
                )
            }),
            None => Err(Error::config(self.field(keys[0]), "missing")),
        }
    }
    pub fn usize_or(&self, keys: &[&str], d: usize) -> Result<usize> {
        if self.get(keys).is_none() {
            Ok(d)
        } else {
            self.usize(keys)
        }
    }
    pub fn f64_or(&self, keys: &[&str], d: f64) -> Result<f64> {
        match self.get(keys) {
            None => Ok(d),
            Some(x) => parse_float(x)
                .ok_or_else(|| Error::config(self.field(keys[0]), format!("{x} is not a number"))),
        }
    }
    pub fn bool_or(&self, keys: &[&str], d: bool) -> Result<bool> {
        match self.get(keys) {
            None => Ok(d),
            Some(x) => x.as_bool().ok_or_else(|| {
                Error::config(self.field(keys[0]), format!("{x} is not true/false"))
            }),
        }
    }
    pub fn str_or<'b>(&'b self, keys: &[&str], d: &'b str) -> Result<&'b str> {
        match self.get(keys) {
            None => Ok(d),
            Some(x) => x
                .as_str()
                .ok_or_else(|| Error::config(self.field(keys[0]), format!("{x} is not a string"))),
        }
    }
    pub fn err(&self, k: &str, msg: impl Into<String>) -> Error {
        Error::config(self.field(k), msg)
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

pub(crate) fn gguf_meta_u(g: &Gguf, key: &str) -> Result<usize> {
    g.u64(key).map(|v| v as usize)
}

/// Splits `...layers.{i}.rest` or `blk.{i}.rest` into (i, rest).
pub(crate) fn split_layer(name: &str) -> Option<(usize, &str)> {
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

/// The elastic role of a checkpoint tensor, by architecture.
pub fn role(arch: &str, name: &str) -> Option<crate::elastic::Role> {
    match arch {
        "llama" => llama::role(name),
        _ => nemotron_h::role(name),
    }
}

/// GGUF metadata for a rewritten checkpoint: per-layer arrays filtered to the kept layers, then
/// `set` applied (keys added at the end when new).
pub(crate) fn gguf_meta_with(
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

/// One u32, or an array of them when the layers differ.
pub(crate) fn u32_or_array(v: &[usize]) -> crate::formats::gguf::Value {
    use crate::formats::gguf::Value;
    if v.windows(2).all(|w| w[0] == w[1]) && !v.is_empty() {
        Value::U32(v[0] as u32)
    } else {
        Value::Array(v.iter().map(|&x| Value::U32(x as u32)).collect())
    }
}

pub(crate) fn kept_layers(map: &crate::elastic::IndexMap) -> Vec<usize> {
    map.layers
        .iter()
        .enumerate()
        .filter(|(_, l)| l.is_some())
        .map(|(i, _)| i)
        .collect()
}

/// `general.name` for a GGUF written from a checkpoint: its file or folder name.
pub(crate) fn gguf_name(m: &Model) -> crate::formats::gguf::Value {
    crate::formats::gguf::Value::Str(
        m.meta
            .path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
    )
}
