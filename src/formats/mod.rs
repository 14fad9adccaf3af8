//! Checkpoint formats: HF folders (config.json + safetensors, sharded or not) and GGUF files.
//! Both yield a [`TensorMap`] of memory-mapped tensors plus the metadata a model reads.

pub mod gguf;
pub mod safetensors;

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
