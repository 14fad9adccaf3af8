//! Prefix masks: the training-time form of a budget. A hard mask is 1 on the kept prefix of an
//! axis and 0 elsewhere (what a slice keeps, method doc §3.1); a soft mask is the router-weighted
//! sum of the candidate prefixes (§4.1, mode 2). Grouped axes (query heads per KV group, Mamba heads
//! per B/C group, experts per routing group) repeat one per-group prefix in every group.

use crate::error::Result;
use candle_core::{DType as CD, Tensor as CT};
use elastica_core::budget::{Axis, AxisMap, Budget, Shape};

use super::net::dev;

pub struct LayerMasks {
    pub keep: bool,
    /// Per axis the layer has: its mask over the parent's components [size] (a prefix per
    /// group; for experts, the weight of each routed expert, 1/0 under a hard mask).
    pub axes: AxisMap<Option<CT>>,
    /// Experts the top-k choice may pick (routing itself is discrete).
    pub expert_on: Vec<bool>,
}

impl LayerMasks {
    /// Mamba inner channels [heads·head_dim]: active heads ⊗ active head channels.
    pub fn inner(&self) -> Result<Option<CT>> {
        let (Some(h), Some(d)) = (&self.axes[Axis::MambaHeads], &self.axes[Axis::MambaHeadDim])
        else {
            return Ok(None);
        };
        Ok(Some(
            h.unsqueeze(1)?
                .broadcast_mul(&d.unsqueeze(0)?)?
                .flatten_all()?,
        ))
    }
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
            let mut axes = AxisMap::default();
            for a in Axis::LAYER {
                if a.applies(*kind) && s.size(a) > 0 {
                    let g = s.groups(a);
                    axes[a] = Some(vec_t(
                        grouped(&prefix(s.size(a) / g, lb.size(a) / g), g),
                        dt,
                    )?);
                }
            }
            let mut expert_on = vec![false; s.experts];
            for e in s.kept(Axis::Experts, lb.size(Axis::Experts)) {
                expert_on[e] = true;
            }
            layers.push(LayerMasks {
                keep: lb.keep,
                axes,
                expert_on,
            });
        }
        Ok(Masks {
            hidden: vec_t(prefix(s.hidden, b.hidden), dt)?,
            layers,
        })
    }
}
