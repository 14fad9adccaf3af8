//! Checkpoint formats: HF folders (config.json + safetensors, sharded or not) and GGUF files.
//! Both yield a [`TensorMap`] of memory-mapped tensors plus the metadata a model reads.

pub mod gguf;
pub mod json;
pub mod modelopt;
pub mod safetensors;
pub mod temp;
pub mod tokenizer;

use crate::error::{Error, Result};
use crate::tensor::Tensor;
use std::collections::BTreeMap;
use std::path::PathBuf;

/// Named tensors of one checkpoint; `take` names the tensor and the file when one is missing.
pub struct TensorMap {
    pub source: PathBuf,
    pub tensors: BTreeMap<String, Tensor>,
}

impl TensorMap {
    pub fn get(&self, name: &str) -> Result<&Tensor> {
        self.tensors.get(name).ok_or_else(|| Error::Tensor {
            name: name.into(),
            msg: format!("missing from {}", self.source.display()),
        })
    }
    pub fn has(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }
    /// The first of several alternative names that is present.
    pub fn get_any(&self, names: &[&str]) -> Result<&Tensor> {
        for n in names {
            if let Some(t) = self.tensors.get(*n) {
                return Ok(t);
            }
        }
        self.get(names[0])
    }
}

/// A tensor to be written: name, format and torch-order shape; the bytes come later, one tensor
/// at a time, so writers stream and never hold a whole model.
#[derive(Clone, Debug)]
pub struct OutTensor {
    pub name: String,
    pub dtype: crate::tensor::DType,
    pub shape: Vec<usize>,
    /// Per-tensor scale of FP8/NVFP4 values (1 otherwise); written as ModelOpt's
    /// `weight_scale`/`weight_scale_2` or llama.cpp's `.scale`.
    pub scale: f32,
    /// ModelOpt's `input_scale`, written next to the weight when present.
    pub input_scale: Option<f32>,
}

impl OutTensor {
    pub fn new(
        name: impl Into<String>,
        dtype: crate::tensor::DType,
        shape: Vec<usize>,
    ) -> OutTensor {
        OutTensor {
            name: name.into(),
            dtype,
            shape,
            scale: 1.0,
            input_scale: None,
        }
    }
    /// The name with `.weight` replaced by `suffix` (a companion scale's name).
    pub fn companion(&self, suffix: &str) -> String {
        let base = self.name.strip_suffix(".weight").unwrap_or(&self.name);
        format!("{base}{suffix}")
    }
    pub fn cols(&self) -> usize {
        *self.shape.last().unwrap_or(&1)
    }
    pub fn rows(&self) -> usize {
        self.shape.iter().rev().skip(1).product()
    }
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
    pub fn nbytes(&self) -> usize {
        let cols = *self.shape.last().unwrap_or(&1);
        let rows: usize = self.shape.iter().rev().skip(1).product();
        self.dtype.row_bytes(cols).expect("whole blocks") * rows
    }
}

/// Writes `header`, then each tensor's bytes from `data(i)` (checked against its size) in the
/// pieces `split` makes of them (the tensor and its companions; `vec![b]` for most formats),
/// padded to `align`, and syncs: the body writer of both formats.
pub(crate) fn write_body(
    path: &std::path::Path,
    header: &[u8],
    tensors: &[OutTensor],
    align: usize,
    mut data: impl FnMut(usize) -> Result<Vec<u8>>,
    split: impl Fn(&OutTensor, Vec<u8>) -> Vec<Vec<u8>>,
) -> Result<()> {
    use std::io::Write;
    let f = temp::create_file(path)?;
    let mut w = std::io::BufWriter::with_capacity(1 << 20, f);
    let io = |e| Error::io(path, e);
    w.write_all(header).map_err(io)?;
    for (i, t) in tensors.iter().enumerate() {
        let b = data(i)?;
        if b.len() != t.nbytes() {
            return Err(Error::Tensor {
                name: t.name.clone(),
                msg: format!("produced {} bytes, expected {}", b.len(), t.nbytes()),
            });
        }
        let n = b.len();
        for piece in split(t, b) {
            w.write_all(&piece).map_err(io)?;
        }
        let pad = n.next_multiple_of(align) - n;
        w.write_all(&[0u8; 64][..pad]).map_err(io)?; // align <= 64
    }
    w.into_inner()
        .map_err(|e| Error::io(path, e.into_error()))?
        .sync_all()
        .map_err(io)
}
