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

/// A tensor as stored: safetensors dtype, shape and bytes (before ModelOpt's weights are
/// assembled with their scales).
struct Stored {
    dtype: safetensors::Dtype,
    shape: Vec<usize>,
    buf: Buf,
    file: std::path::PathBuf,
}

/// Reads the directory of one .safetensors file into `out`.
fn load_file(path: &Path, out: &mut BTreeMap<String, Stored>) -> Result<()> {
    let map = mmap(path)?;
    let st = safetensors::SafeTensors::deserialize(&map[..])
        .map_err(|e| Error::format(path, format!("invalid safetensors: {e}")))?;
    let base = map.as_ptr() as usize;
    for (name, view) in st.tensors() {
        let data = view.data();
        let off = data.as_ptr() as usize - base;
        let buf = Buf::Mapped {
            map: map.clone(),
            off,
            len: data.len(),
        };
        let stored = Stored {
            dtype: view.dtype(),
            shape: view.shape().to_vec(),
            buf,
            file: path.to_path_buf(),
        };
        out.insert(name, stored);
    }
    Ok(())
}

/// All elements of a small float tensor (a ModelOpt scale) as f32.
fn scalars(name: &str, s: &Stored) -> Result<Vec<f32>> {
    let b = s.buf.bytes();
    Ok(match s.dtype {
        safetensors::Dtype::F32 => b
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect(),
        safetensors::Dtype::BF16 => b
            .chunks_exact(2)
            .map(|c| crate::kernels::quant::bf16_to_f32(u16::from_le_bytes([c[0], c[1]])))
            .collect(),
        safetensors::Dtype::F16 => b
            .chunks_exact(2)
            .map(|c| crate::kernels::quant::f16_at(c, 0))
            .collect(),
        other => {
            return Err(Error::format(
                &s.file,
                format!("scale {name}: dtype {other:?}, expected F32"),
            ));
        }
    })
}

/// One per-tensor scale: a tensor of one element, finite and positive.
fn scalar(name: &str, s: &Stored) -> Result<f32> {
    let v = scalars(name, s)?;
    match v[..] {
        [x] if x.is_finite() && x > 0.0 => Ok(x),
        [x] => Err(Error::format(
            &s.file,
            format!("scale {name} is {x}, expected a positive finite value"),
        )),
        _ => Err(Error::format(
            &s.file,
            format!(
                "scale {name} has shape {:?}; elastica reads per-tensor scales (one value)",
                s.shape
            ),
        )),
    }
}

/// Builds tensors from the stored ones: floats as they are; ModelOpt FP8 (`weight` F8_E4M3 +
/// `weight_scale`) and NVFP4 (`weight` U8 + `weight_scale` F8_E4M3 + `weight_scale_2`) weights
/// as one [`Tensor`] each, their scales and `input_scale` folded in.
fn assemble(mut stored: BTreeMap<String, Stored>) -> Result<BTreeMap<String, Tensor>> {
    use safetensors::Dtype as S;
    let mut out = BTreeMap::new();
    let names: Vec<String> = stored.keys().cloned().collect();
    for name in &names {
        let Some(base) = name.strip_suffix(".weight") else {
            continue;
        };
        let dt = stored[name].dtype;
        if !matches!(dt, S::F8_E4M3 | S::U8) {
            continue;
        }
        let w = stored.remove(name).unwrap();
        let file = w.file.clone();
        let bad = |msg: String| Error::format(&file, format!("tensor {name}: {msg}"));
        let ws_name = format!("{base}.weight_scale");
        let ws = stored.remove(&ws_name).ok_or_else(|| {
            bad(format!(
                "is {dt:?} (ModelOpt {}) but {ws_name} is missing",
                if dt == S::U8 { "NVFP4" } else { "FP8" }
            ))
        })?;
        let input_scale = match stored.remove(&format!("{base}.input_scale")) {
            Some(s) => Some(scalar(&format!("{base}.input_scale"), &s)?),
            None => None,
        };
        if w.shape.len() != 2 {
            return Err(bad(format!("shape {:?}, expected a matrix", w.shape)));
        }
        let (rows, c) = (w.shape[0], w.shape[1]);
        let t = if dt == S::F8_E4M3 {
            let scale = scalar(&ws_name, &ws)?;
            Tensor::new(name, DType::F8E4M3, w.shape.clone(), w.buf)
                .map_err(|e| Error::format(&file, e.to_string()))?
                .with_scale(scale)
        } else {
            let cols = 2 * c;
            if ws.dtype != S::F8_E4M3 || ws.shape != [rows, cols / 16] || cols % 16 != 0 {
                return Err(bad(format!(
                    "NVFP4 weight [{rows}, {c}] (= {cols} values per row) needs {ws_name} F8_E4M3 [{rows}, {}], found {:?} {:?}",
                    cols / 16,
                    ws.dtype,
                    ws.shape
                )));
            }
            let s2_name = format!("{base}.weight_scale_2");
            let s2 = stored
                .remove(&s2_name)
                .ok_or_else(|| bad(format!("is NVFP4 but {s2_name} is missing")))?;
            let scale = scalar(&s2_name, &s2)?;
            let blocks = super::modelopt::from_modelopt(w.buf.bytes(), ws.buf.bytes(), rows, cols);
            Tensor::new(
                name,
                DType::Nvfp4,
                vec![rows, cols],
                Buf::Owned(Arc::new(blocks)),
            )
            .map_err(|e| Error::format(&file, e.to_string()))?
            .with_scale(scale)
        };
        let mut t = t;
        t.input_scale = input_scale;
        out.insert(name.clone(), t);
    }
    for (name, s) in stored {
        let dtype = match s.dtype {
            S::F32 => DType::F32,
            S::F16 => DType::F16,
            S::BF16 => DType::BF16,
            other => {
                let why = if name.ends_with("_scale") || name.ends_with("_scale_2") {
                    " (a scale without its ModelOpt weight)"
                } else {
                    ""
                };
                return Err(Error::format(
                    &s.file,
                    format!("tensor {name}: unsupported dtype {other:?}{why}"),
                ));
            }
        };
        let mut shape = s.shape;
        if shape.is_empty() {
            shape.push(1);
        }
        let t = Tensor::new(&name, dtype, shape, s.buf)
            .map_err(|e| Error::format(&s.file, e.to_string()))?;
        out.insert(name, t);
    }
    Ok(out)
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
            tensors: assemble(tensors)?,
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
            tensors: assemble(tensors)?,
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
        tensors: assemble(tensors)?,
    })
}

/// Writes a .safetensors file: header first (shapes are known up front), then each tensor's
/// bytes from `data(i)` in order. FP8 and NVFP4 tensors are written in ModelOpt's layout:
/// `weight` (F8_E4M3, or U8 `[out, in/2]`), `weight_scale` (F32 scalar, or F8_E4M3
/// `[out, in/16]`), `weight_scale_2` (NVFP4, F32 scalar) and `input_scale` when known.
pub fn write(
    path: &Path,
    tensors: &[super::OutTensor],
    data: impl FnMut(usize) -> Result<Vec<u8>>,
) -> Result<()> {
    let mut header = serde_json::Map::new();
    let mut off = 0usize;
    let mut put = |name: String, dt: &str, shape: Vec<usize>, n: usize| {
        header.insert(
            name,
            serde_json::json!({"dtype": dt, "shape": shape, "data_offsets": [off, off + n]}),
        );
        off += n;
    };
    for t in tensors {
        let n = t.nbytes();
        match t.dtype {
            DType::F32 => put(t.name.clone(), "F32", t.shape.clone(), n),
            DType::F16 => put(t.name.clone(), "F16", t.shape.clone(), n),
            DType::BF16 => put(t.name.clone(), "BF16", t.shape.clone(), n),
            DType::F8E4M3 => {
                put(t.name.clone(), "F8_E4M3", t.shape.clone(), n);
                put(t.companion(".weight_scale"), "F32", vec![], 4);
            }
            DType::Nvfp4 => {
                let (rows, cols) = (
                    t.shape[..t.shape.len() - 1].iter().product::<usize>(),
                    t.shape[t.shape.len() - 1],
                );
                let lead = &t.shape[..t.shape.len() - 1];
                put(
                    t.name.clone(),
                    "U8",
                    [lead, &[cols / 2]].concat(),
                    rows * cols / 2,
                );
                put(
                    t.companion(".weight_scale"),
                    "F8_E4M3",
                    [lead, &[cols / 16]].concat(),
                    rows * cols / 16,
                );
                put(t.companion(".weight_scale_2"), "F32", vec![], 4);
            }
            other => {
                return Err(Error::format(
                    path,
                    format!(
                        "tensor {}: {other} cannot be stored in safetensors (use f32, f16, bf16, FP8 or NVFP4)",
                        t.name
                    ),
                ));
            }
        }
        if t.input_scale.is_some() {
            put(t.companion(".input_scale"), "F32", vec![], 4);
        }
    }
    header.insert("__metadata__".into(), serde_json::json!({"format": "pt"}));
    let mut h = serde_json::to_vec(&serde_json::Value::Object(header)).unwrap();
    while !h.len().is_multiple_of(8) {
        h.push(b' ');
    }
    let mut head = (h.len() as u64).to_le_bytes().to_vec();
    head.extend_from_slice(&h);
    super::write_body(path, &head, tensors, 1, data, |t, b| {
        // ModelOpt's tensors of one FP8/NVFP4 weight, in the header's order.
        let mut pieces = match t.dtype {
            DType::Nvfp4 => {
                let (packed, scales) = super::modelopt::to_modelopt(&b, t.rows(), t.cols());
                vec![packed, scales, t.scale.to_le_bytes().to_vec()]
            }
            DType::F8E4M3 => vec![b, t.scale.to_le_bytes().to_vec()],
            _ => vec![b],
        };
        if let Some(s) = t.input_scale {
            pieces.push(s.to_le_bytes().to_vec());
        }
        pieces
    })
}
