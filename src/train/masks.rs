//! Prefix masks: the training-time form of a budget. A hard mask is 1 on the kept prefix of an
//! axis and 0 elsewhere (what a slice keeps, method doc §3.1); a soft mask is the router-weighted
//! sum of the candidate prefixes (§4.1, mode 2). Grouped axes (query heads per KV group, Mamba heads
//! per B/C group, experts per routing group) repeat one per-group prefix in every group.

use crate::budget::{Budget, LayerKind, Shape};
use crate::error::Result;
use candle_core::{DType as CD, Tensor as CT};

use super::net::dev;

pub struct LayerMasks {
    pub keep: bool,
    /// Dense-MLP channels [ffn].
    pub ffn: Option<CT>,
    /// Query heads [heads].
    pub heads: Option<CT>,
    /// Mamba inner channels [heads·head_dim] (active heads × active head channels).
    pub inner: Option<CT>,
    pub moe_ffn: Option<CT>,
    /// Weight of each routed expert [experts] (1/0 under a hard mask).
    pub experts: Option<CT>,
    /// Experts the top-k choice may pick (routing itself is discrete).
    pub expert_on: Vec<bool>,
    pub shared_ffn: Option<CT>,
}

pub struct Masks {
    pub hidden: CT,
    pub layers: Vec<LayerMasks>,
}

/// 1 for i < k, else 0, over n.
pub fn prefix(n: usize, k: usize) -> Vec<f32> {
    (0..n).map(|i| if i < k { 1.0 } else { 0.0 }).collect()
}

/// A per-group prefix repeated over `groups` groups of `per`.
pub fn grouped(per_group: &[f32], groups: usize) -> Vec<f32> {
    let mut v = Vec::with_capacity(per_group.len() * groups);
    for _ in 0..groups {
        v.extend_from_slice(per_group);
    }
    v
}

pub fn vec_t(v: Vec<f32>, dt: CD) -> Result<CT> {
    let n = v.len();
    Ok(CT::from_vec(v, n, &dev())?.to_dtype(dt)?)
}

impl Masks {
    /// The hard masks of a resolved budget.
    pub fn hard(shape: &Shape, b: &Budget, dt: CD) -> Result<Masks> {
        let s = shape;
        let mut layers = vec![];
        for (i, kind) in s.layers.iter().enumerate() {
            let lb = b.layer(i);
            let mut lm = LayerMasks {
                keep: lb.keep,
                ffn: None,
                heads: None,
                inner: None,
                moe_ffn: None,
                experts: None,
                expert_on: vec![],
                shared_ffn: None,
            };
            if kind.has_mlp() {
                lm.ffn = Some(vec_t(prefix(s.ffn, lb.ffn), dt)?);
            }
            if kind.has_attention() {
                let per = s.heads / s.kv_heads;
                let g = grouped(&prefix(per, lb.heads / s.kv_heads), s.kv_heads);
                lm.heads = Some(vec_t(g, dt)?);
            }
            if *kind == LayerKind::Mamba {
                let per = s.mamba_heads / s.mamba_groups;
                let hm = grouped(
                    &prefix(per, lb.mamba_heads / s.mamba_groups),
                    s.mamba_groups,
                );
                let dm = prefix(s.mamba_head_dim, lb.mamba_head_dim);
                lm.inner = Some(vec_t(outer(&hm, &dm), dt)?);
            }
            if *kind == LayerKind::Moe {
                lm.moe_ffn = Some(vec_t(prefix(s.moe_ffn, lb.moe_ffn), dt)?);
                let mut on = vec![false; s.experts];
                for r in &lb.expert_ids {
                    for e in r.clone() {
                        on[e] = true;
                    }
                }
                lm.experts = Some(vec_t(on.iter().map(|&o| o as u8 as f32).collect(), dt)?);
                lm.expert_on = on;
                if s.shared_ffn > 0 {
                    lm.shared_ffn = Some(vec_t(prefix(s.shared_ffn, lb.shared_ffn), dt)?);
                }
            }
            layers.push(lm);
        }
        Ok(Masks {
            hidden: vec_t(prefix(s.hidden, b.hidden), dt)?,
            layers,
        })
    }
}

/// Flattened outer product a ⊗ b.
fn outer(a: &[f32], b: &[f32]) -> Vec<f32> {
    a.iter()
        .flat_map(|x| b.iter().map(move |y| x * y))
        .collect()
}
