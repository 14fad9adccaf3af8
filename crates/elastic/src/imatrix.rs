//! Input second moments of each matrix on calibration text (llama.cpp's imatrix): the weights of
//! the error a re-quantized row minimises, so that channels carrying large activations keep their
//! values best.

use elastica_core::error::Result;
use elastica_core::layers::{Ffn, Observer};
use elastica_core::model::{Cache, Logits, Model};
use std::collections::HashMap;

/// Source tensor name → mean square of each input column (in the source's column order).
pub type Imatrix = HashMap<String, Vec<f32>>;

/// Σ x² per channel and the token count.
#[derive(Default)]
struct Moment {
    sum: Vec<f64>,
    n: usize,
}

impl Moment {
    fn add(&mut self, x: &[f32], width: usize) {
        if self.sum.len() != width {
            self.sum = vec![0.0; width];
        }
        for row in x.chunks(width) {
            for (s, v) in self.sum.iter_mut().zip(row) {
                *s += (*v as f64) * (*v as f64);
            }
            self.n += 1;
        }
    }
    fn mean(&self) -> Vec<f32> {
        self.sum
            .iter()
            .map(|s| (s / self.n.max(1) as f64) as f32)
            .collect()
    }
}

/// Per layer: the pre-block norms' outputs (in call order), o_proj's and the dense down
/// projection's inputs.
#[derive(Default)]
struct Layer {
    norms: Vec<Moment>,
    calls: usize,
    attn: Moment,
    down: Moment,
}

struct Moments(Vec<Layer>);

impl Observer for Moments {
    fn norm(&mut self, layer: usize, x: &[f32], hidden: usize) {
        let l = &mut self.0[layer];
        if l.norms.len() <= l.calls {
            l.norms.push(Moment::default());
        }
        l.norms[l.calls].add(x, hidden);
        l.calls += 1;
    }
    fn attention(&mut self, layer: usize, x: &[f32], heads: usize, head_dim: usize) {
        self.0[layer].attn.add(x, heads * head_dim);
    }
    fn down_input(&mut self, layer: usize, which: Ffn, x: &[f32], width: usize) {
        if which == Ffn::Dense {
            self.0[layer].down.add(x, width);
        }
    }
}

/// Runs the full model on `seqs` and returns the input moments of Llama's attention and MLP
/// matrices (GGUF and HF names); other architectures get none (plain error).
pub fn collect(model: &Model, seqs: &[Vec<u32>]) -> Result<Imatrix> {
    let mut out = Imatrix::new();
    let arch = elastica_core::models::arch(model.arch())?;
    if arch.imatrix_matrices(0).is_empty() || seqs.is_empty() {
        return Ok(out);
    }
    let n = model.shape.layers.len();
    let mut obs = Moments((0..n).map(|_| Layer::default()).collect());
    let full = model.full_budget();
    let mut cache = Cache::new(model, seqs.iter().map(|s| s.len()).max().unwrap_or(1));
    for s in seqs {
        cache.reset();
        obs.0.iter_mut().for_each(|l| l.calls = 0);
        model.forward_observed(s, &full, &mut cache, Logits::None, &mut obs)?;
    }
    for (i, l) in obs.0.iter().enumerate() {
        let norm = |k: usize| l.norms.get(k).map(Moment::mean);
        let inputs = [norm(0), norm(1), Some(l.attn.mean()), Some(l.down.mean())];
        for (names, k) in arch.imatrix_matrices(i) {
            if let Some(w) = inputs[k].as_ref().filter(|w| !w.is_empty()) {
                for name in names {
                    out.insert(name, w.clone());
                }
            }
        }
    }
    Ok(out)
}
