//! Writes a checkpoint through an [`IndexMap`](super::IndexMap): elastify (a permutation of
//! every axis) and slice (kept prefixes, dropped layers) are the same streaming pass. Tensors are
//! gathered one at a time (peak memory ≈ the largest tensor), written to a temporary path that is
//! renamed into place only when everything succeeded.

use super::{GatherPlan, IndexMap, Role, SliceDims};
use crate::error::{Error, Result};
use crate::formats::{OutTensor, gguf, safetensors, temp_path};
use crate::manifest::Manifest;
use crate::models::{Checkpoint, Raw};
use crate::tensor::DType;
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
    pub progress: bool,
    /// Called on the finished temporary output before it is renamed into place; an error
    /// discards it.
    pub check: Option<&'a Check<'a>>,
}

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

struct Planned {
    src: String,
    out: OutTensor,
    plan: Option<GatherPlan>,
}

/// Output name of a tensor: its layer renumbered, its expert renumbered (hub layout).
fn rename(name: &str, role: Option<&Role>, map: &IndexMap) -> Option<String> {
    let layer = role
        .and_then(|r| r.layer)
        .or_else(|| crate::models::split_layer(name).map(|x| x.0));
    let mut out = name.to_string();
    if let Some(l) = layer {
        let nl = map.new_layer(l)?;
        for pre in ["layers.", "blk."] {
            let from = format!("{pre}{l}.");
            if let Some(p) = out.find(&from)
                && (p == 0 || out.as_bytes()[p - 1] == b'.')
            {
                out.replace_range(p..p + from.len(), &format!("{pre}{nl}."));
                break;
            }
        }
        if let Some(e) = role.and_then(|r| r.expert) {
            let lm = map.layers[l].as_ref()?;
            let pos = lm.experts.iter().position(|&x| x == e)?;
            let from = format!("experts.{e}.");
            let p = out.find(&from)?;
            out.replace_range(p..p + from.len(), &format!("experts.{pos}."));
        }
    }
    Some(out)
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
    let arch = m.arch().to_string();
    let tensors = ck.raw.tensors();
    let names: Vec<String> = match &ck.raw {
        Raw::Gguf(g) => g.order.clone(),
        Raw::Hf { .. } => tensors.tensors.keys().cloned().collect(),
    };
    let mut planned = vec![];
    for name in &names {
        let t = tensors.get(name)?;
        let role = crate::models::role(&arch, name);
        let Some(new_name) = rename(name, role.as_ref(), map) else {
            continue;
        };
        let (plan, shape, dtype) = match &role {
            Some(r) => {
                let p = GatherPlan::new(t, r, map, &m.shape, out.convert)?;
                let (s, d) = (p.shape.clone(), p.dtype);
                (Some(p), s, d)
            }
            None => (None, t.shape.clone(), t.dtype),
        };
        planned.push(Planned {
            src: name.clone(),
            out: OutTensor {
                name: new_name,
                dtype,
                shape,
            },
            plan,
        });
    }
    if let Some(pos) = planned
        .iter()
        .position(|p| planned.iter().filter(|q| q.out.name == p.out.name).count() > 1)
    {
        return Err(Error::Input(format!(
            "two tensors would be written as {}",
            planned[pos].out.name
        )));
    }
    let dims = SliceDims::new(&m.shape, map);
    let kept = crate::models::kept_layers(map);
    let outs: Vec<OutTensor> = planned.iter().map(|p| p.out.clone()).collect();
    let total: u64 = outs.iter().map(|o| o.nbytes() as u64).sum();
    let pb = if out.progress {
        let pb = indicatif::ProgressBar::new(total);
        pb.set_style(
            indicatif::ProgressStyle::with_template("{bar:30} {bytes}/{total_bytes} {binary_bytes_per_sec} [{elapsed_precise}<{eta_precise}] {msg}").unwrap(),
        );
        pb
    } else {
        indicatif::ProgressBar::hidden()
    };
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
        let t = tensors.get(&p.src)?;
        let b = match &p.plan {
            Some(plan) => plan.run(t),
            None => t.bytes().to_vec(),
        };
        t.release();
        pb.inc(b.len() as u64);
        pb.set_message(p.out.name.clone());
        Ok(b)
    };
    let tmp = temp_path(out.path);
    let _ = std::fs::remove_dir_all(&tmp);
    let _ = std::fs::remove_file(&tmp);
    let result = (|| -> Result<()> {
        match &ck.raw {
            Raw::Hf { config, .. } => {
                std::fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
                let mut cfg = match arch.as_str() {
                    "llama" => crate::models::llama::hf_config(config, &dims)?,
                    _ => crate::models::nemotron_h::hf_config(config, &dims)?,
                };
                let o = cfg
                    .as_object_mut()
                    .ok_or_else(|| Error::config("config.json", "is not an object"))?;
                o.remove("elastic");
                if let Some(man) = out.manifest {
                    o.insert("elastic".into(), serde_json::to_value(man).unwrap());
                }
                let cp = tmp.join("config.json");
                std::fs::write(&cp, serde_json::to_string_pretty(&cfg).unwrap())
                    .map_err(|e| Error::io(&cp, e))?;
                for f in HF_SIDE_FILES {
                    let src = m.meta.path.join(f);
                    if src.exists() {
                        std::fs::copy(&src, tmp.join(f)).map_err(|e| Error::io(&src, e))?;
                    }
                }
                safetensors::write(&tmp.join("model.safetensors"), &outs, data)
            }
            Raw::Gguf(g) => {
                let mut meta = match arch.as_str() {
                    "llama" => crate::models::llama::gguf_meta(g, &dims, &kept)?,
                    _ => crate::models::nemotron_h::gguf_meta(g, &dims, &kept)?,
                };
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
    pb.finish_and_clear();
    let result = result.and_then(|()| out.check.map_or(Ok(()), |c| c(&tmp)));
    if let Err(e) = result {
        let _ = std::fs::remove_dir_all(&tmp);
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    if out.path.exists() {
        let r = if out.path.is_dir() {
            std::fs::remove_dir_all(out.path)
        } else {
            std::fs::remove_file(out.path)
        };
        r.map_err(|e| Error::io(out.path, e))?;
    }
    std::fs::rename(&tmp, out.path).map_err(|e| Error::io(out.path, e))?;
    Ok(Written {
        tensors: outs.len(),
        bytes: total,
        seconds: t0.elapsed().as_secs_f64(),
    })
}
