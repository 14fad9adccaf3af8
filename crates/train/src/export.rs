//! Writes a trained student as an elastic checkpoint in its input's format: every trained weight
//! replaces its source tensor (stacked experts are re-stacked, GGUF's A = −exp(A_log) restored)
//! and the manifest carries each budget's learned architecture.

use super::net::{Export, Net};
use crate::error::Result;
use elastica_core::manifest::Manifest;
use elastica_core::models::Checkpoint;
use elastica_core::tensor::DType;
use elastica_elastic::{IndexMap, rewrite};
use std::collections::HashMap;
use std::path::Path;

/// Source tensor name → trained values (full source shape, flattened).
pub fn values(net: &Net) -> Result<HashMap<String, Vec<f32>>> {
    let mut out: HashMap<String, Vec<f32>> = HashMap::new();
    let mut stacks: HashMap<String, Vec<(usize, Vec<f32>)>> = HashMap::new();
    for p in &net.params {
        let Some(src) = &p.source else { continue };
        let mut v: Vec<f32> = p
            .var
            .as_tensor()
            .to_dtype(candle_core::DType::F32)?
            .flatten_all()?
            .to_vec1()?;
        if p.export == Export::NegExp {
            v.iter_mut().for_each(|x| *x = -x.exp());
        }
        match src.strip_suffix(']').and_then(|s| s.rsplit_once('[')) {
            Some((base, e)) => stacks
                .entry(base.to_string())
                .or_default()
                .push((e.parse().unwrap_or(0), v)),
            None => {
                out.insert(src.clone(), v);
            }
        }
    }
    for (name, mut parts) in stacks {
        parts.sort_by_key(|p| p.0);
        out.insert(name, parts.into_iter().flat_map(|p| p.1).collect());
    }
    Ok(out)
}

pub fn write(
    ck: &Checkpoint,
    net: &Net,
    manifest: Option<&Manifest>,
    path: &Path,
    dtype: DType,
    force: bool,
    progress: bool,
) -> Result<rewrite::Written> {
    let vals = values(net)?;
    let get = |name: &str| vals.get(name).cloned();
    let map = IndexMap::identity(&ck.model.shape);
    Ok(rewrite::write(
        ck,
        &map,
        &rewrite::Output {
            path,
            convert: Some(dtype),
            manifest,
            force,
            progress: &elastica_core::progress::Progress::new_if(progress, "train", false),
            check: None,
            format: None,
            imatrix: None,
            quant: None,
            values: Some(&get),
        },
    )?)
}
