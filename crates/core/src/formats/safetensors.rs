//! HF safetensors, single file or sharded via `model.safetensors.index.json`, memory-mapped.
//! Header validation (lengths, offsets, dtype × shape = bytes) is the safetensors crate's; its
//! errors are reported with the file name.

use super::TensorMap;
use crate::error::{Error, Result};
use crate::tensor::{Buf, DType, Tensor};
use memmap2::Mmap;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

pub fn mmap(path: &Path) -> Result<Arc<Mmap>> {
    let f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    // Safety: the file is opened read-only; like every mmap-based loader we assume nobody
    // truncates the checkpoint while it is being served.
    let m = unsafe { Mmap::map(&f) }.map_err(|e| Error::io(path, e))?;
    Ok(Arc::new(m))
}

/// Loads every tensor of one .safetensors file into `out`.
pub fn load_file(path: &Path, out: &mut BTreeMap<String, Tensor>) -> Result<()> {
    let map = mmap(path)?;
    let st = safetensors::SafeTensors::deserialize(&map[..])
        .map_err(|e| Error::format(path, format!("invalid safetensors: {e}")))?;
    let base = map.as_ptr() as usize;
    for (name, view) in st.tensors() {
        let dtype = match view.dtype() {
            safetensors::Dtype::F32 => DType::F32,
            safetensors::Dtype::F16 => DType::F16,
            safetensors::Dtype::BF16 => DType::BF16,
            other => {
                return Err(Error::format(
                    path,
                    format!("tensor {name}: unsupported dtype {other:?}"),
                ));
            }
        };
        let data = view.data();
        let off = data.as_ptr() as usize - base;
        let mut shape = view.shape().to_vec();
        if shape.is_empty() {
            shape.push(1);
        }
        let t = Tensor::new(
            &name,
            dtype,
            shape,
            Buf::Mapped {
                map: map.clone(),
                off,
                len: data.len(),
            },
        )
        .map_err(|e| Error::format(path, e.to_string()))?;
        out.insert(name, t);
    }
    Ok(())
}

/// Loads `model.safetensors`, or the shards listed in `model.safetensors.index.json`.
pub fn load_dir(dir: &Path) -> Result<TensorMap> {
    let mut tensors = BTreeMap::new();
    let single = dir.join("model.safetensors");
    let index = dir.join("model.safetensors.index.json");
    if single.exists() {
        load_file(&single, &mut tensors)?;
        return Ok(TensorMap {
            source: single,
            tensors,
        });
    }
    if index.exists() {
        let v: serde_json::Value = super::json::read(&index)?;
        let map = v
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| Error::format(&index, "no \"weight_map\" object"))?;
        let mut files: Vec<&str> = map.values().filter_map(|f| f.as_str()).collect();
        files.sort();
        files.dedup();
        for f in files {
            if f.contains('/') || f.contains("..") {
                return Err(Error::format(
                    &index,
                    format!("shard name {f:?} points outside the folder"),
                ));
            }
            load_file(&dir.join(f), &mut tensors)?;
        }
        for name in map.keys() {
            if !tensors.contains_key(name) {
                return Err(Error::format(
                    &index,
                    format!("tensor {name} is listed but missing from its shard"),
                ));
            }
        }
        return Ok(TensorMap {
            source: index,
            tensors,
        });
    }
    // Any *.safetensors in the folder.
    let mut found = vec![];
    for e in std::fs::read_dir(dir)
        .map_err(|e| Error::io(dir, e))?
        .flatten()
    {
        let p = e.path();
        if p.extension().is_some_and(|x| x == "safetensors") {
            found.push(p);
        }
    }
    found.sort();
    if found.is_empty() {
        return Err(Error::format(
            dir,
            "no model.safetensors, model.safetensors.index.json or *.safetensors found",
        ));
    }
    for p in &found {
        load_file(p, &mut tensors)?;
    }
    Ok(TensorMap {
        source: dir.to_path_buf(),
        tensors,
    })
}

/// Writes a .safetensors file: header first (shapes are known up front), then each tensor's
/// bytes from `data(i)` in order. Only float formats exist in safetensors.
pub fn write(
    path: &Path,
    tensors: &[super::OutTensor],
    data: impl FnMut(usize) -> Result<Vec<u8>>,
) -> Result<()> {
    let mut header = serde_json::Map::new();
    let mut off = 0usize;
    for t in tensors {
        let dt = match t.dtype {
            DType::F32 => "F32",
            DType::F16 => "F16",
            DType::BF16 => "BF16",
            other => {
                return Err(Error::format(
                    path,
                    format!(
                        "tensor {}: {other} cannot be stored in safetensors (use f32, f16 or bf16)",
                        t.name
                    ),
                ));
            }
        };
        let n = t.nbytes();
        header.insert(
            t.name.clone(),
            serde_json::json!({"dtype": dt, "shape": t.shape, "data_offsets": [off, off + n]}),
        );
        off += n;
    }
    header.insert("__metadata__".into(), serde_json::json!({"format": "pt"}));
    let mut h = serde_json::to_vec(&serde_json::Value::Object(header)).unwrap();
    while !h.len().is_multiple_of(8) {
        h.push(b' ');
    }
    let mut head = (h.len() as u64).to_le_bytes().to_vec();
    head.extend_from_slice(&h);
    super::write_body(path, &head, tensors, 1, data)
}
