//! Budgets: the per-axis active sizes of a nested sub-model.
//!
//! A [`BudgetSpec`] is what users write (`hidden=384,ffn=1024,heads=6,skip=3+7`, per layer
//! `ffn.12=512`); resolving it against a model's [`Shape`] gives a [`Budget`], the small value
//! every forward pass takes. Each axis keeps a *prefix* of the parent's importance-ordered
//! components (method doc §3): hidden channels, FFN/expert/shared-expert channels, routed experts
//! (per routing group), query heads (the same count in every KV group), Mamba heads (the same
//! count in every B/C group) and Mamba head channels (the same set in every head). B/C, K/V heads
//! and the head size of attention are never cut. A budget equal to the parent is the parent.

use crate::error::{Error, Result};
pub use crate::shape::{Axis, AxisMap, LayerKind, Shape};
use std::collections::{BTreeMap, BTreeSet};
use std::ops::Range;
use std::sync::Arc;

/// Sizes along each axis; `None` means "the parent's".
pub type Axes = AxisMap<Option<usize>>;

/// A budget as written by a user or a manifest.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BudgetSpec {
    /// Sizes for every layer (and `hidden`, which is global only).
    pub global: Axes,
    pub per_layer: BTreeMap<usize, Axes>,
    pub skip: BTreeSet<usize>,
}

impl std::str::FromStr for BudgetSpec {
    type Err = Error;
    /// `key=value` pairs separated by commas; `AXIS.LAYER=N` for one layer; `skip=3+7+9` drops layers.
    /// `full` is the parent; an empty string is refused.
    fn from_str(s: &str) -> Result<BudgetSpec> {
        let mut spec = BudgetSpec::default();
        let s = s.trim();
        if s.is_empty() {
            return Err(Error::Budget(
                "the budget is empty: give `full`, a manifest name or sizes like hidden=384".into(),
            ));
        }
        if s == "full" {
            return Ok(spec);
        }
        for part in s.split(',') {
            let part = part.trim();
            let (k, v) = part.split_once('=').ok_or_else(|| {
                Error::Budget(format!("{part:?} is not key=value (e.g. hidden=384)"))
            })?;
            let (k, v) = (k.trim(), v.trim());
            if k == "skip" {
                for l in v.split('+').filter(|x| !x.is_empty()) {
                    let l: usize = l
                        .parse()
                        .map_err(|_| Error::Budget(format!("skip: {l:?} is not a layer index")))?;
                    spec.skip.insert(l);
                }
                continue;
            }
            let n: usize = v
                .parse()
                .map_err(|_| Error::Budget(format!("{k}: {v:?} is not a positive integer")))?;
            if n == 0 {
                return Err(Error::Budget(format!(
                    "{k}=0: sizes must be positive (drop layers with skip=)"
                )));
            }
            let (axis, layer) = match k.split_once('.') {
                Some((a, l)) => {
                    let l: usize = l
                        .parse()
                        .map_err(|_| Error::Budget(format!("{k}: {l:?} is not a layer index")))?;
                    (a, Some(l))
                }
                None => (k, None),
            };
            let axis: Axis = axis.parse().map_err(|_| {
                Error::Budget(format!(
                    "unknown axis {axis:?} (known: {}, skip)",
                    Axis::names()
                ))
            })?;
            let target = match layer {
                Some(_) if axis == Axis::Hidden => {
                    return Err(Error::Budget("hidden is global (channels are indexed across all layers); no per-layer value".into()));
                }
                Some(l) => spec.per_layer.entry(l).or_default(),
                None => &mut spec.global,
            };
            target[axis] = Some(n);
        }
        Ok(spec)
    }
}

/// A resolved budget: the active size of every axis in every layer, and the index segments the
/// kernels read. Cheap to clone; built once per budget, not per token.
#[derive(Clone, Debug)]
pub struct Budget {
    pub hidden: usize,
    pub layers: Arc<[LayerBudget]>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct LayerBudget {
    pub keep: bool,
    /// Active size along every axis (0 where the layer lacks it; `Hidden`: the global width).
    pub sizes: AxisMap<usize>,
    /// Attention: rows of q_proj (= columns of o_proj) of the active query heads.
    pub q_rows: Vec<Range<usize>>,
    /// Mamba: active (head, channel) indices of d_inner, as segments.
    pub inner: Vec<Range<usize>>,
    /// Mamba: active heads (parent indices), as segments.
    pub mheads: Vec<Range<usize>>,
    /// Mamba: rows of in_proj read: z and x of the active channels, all of B/C, dt of active heads.
    pub in_rows: Vec<Range<usize>>,
    /// MoE: active routed experts (parent indices), as segments (one per routing group).
    pub expert_ids: Vec<Range<usize>>,
}

impl LayerBudget {
    /// The active size along an axis (0 where the layer lacks it).
    pub fn size(&self, a: Axis) -> usize {
        self.sizes[a]
    }
}

impl Budget {
    /// The active size along an axis in layer `l`.
    pub fn size(&self, a: Axis, l: usize) -> usize {
        self.layers[l].size(a)
    }
    pub fn full(shape: &Shape) -> Budget {
        BudgetSpec::default()
            .resolve(shape)
            .expect("the parent is a valid budget")
    }
    pub fn layer(&self, i: usize) -> &LayerBudget {
        &self.layers[i]
    }
    /// The explicit spec string (usable as `--budget` on any model of the same shape): global
    /// values are the most common per-layer value; other layers get `AXIS.LAYER=N`.
    pub fn spec(&self, shape: &Shape) -> String {
        let mut parts = vec![format!("hidden={}", self.hidden)];
        for axis in Axis::LAYER {
            let vals: Vec<(usize, usize)> = shape
                .layers
                .iter()
                .enumerate()
                .filter(|(_, k)| axis.applies(**k))
                .map(|(i, _)| (i, self.size(axis, i)))
                .collect();
            if vals.is_empty() || shape.size(axis) == 0 {
                continue;
            }
            let mut counts: BTreeMap<usize, usize> = BTreeMap::new();
            for (_, v) in &vals {
                *counts.entry(*v).or_default() += 1;
            }
            // Most common value; ties go to the larger.
            let global = counts
                .iter()
                .max_by_key(|(v, c)| (**c, **v))
                .map(|(v, _)| *v)
                .unwrap();
            parts.push(format!("{axis}={global}"));
            for (i, v) in vals {
                if v != global {
                    parts.push(format!("{axis}.{i}={v}"));
                }
            }
        }
        let skip: Vec<String> = self
            .layers
            .iter()
            .enumerate()
            .filter(|(_, l)| !l.keep)
            .map(|(i, _)| i.to_string())
            .collect();
        if !skip.is_empty() {
            parts.push(format!("skip={}", skip.join("+")));
        }
        parts.join(",")
    }
    pub fn is_full(&self, shape: &Shape) -> bool {
        let f = Budget::full(shape);
        self.hidden == f.hidden && self.layers == f.layers
    }
    /// True if every axis of `self` is at most that of `other` (nesting).
    pub fn nested_in(&self, other: &Budget) -> bool {
        self.hidden <= other.hidden
            && self.layers.iter().zip(other.layers.iter()).all(|(a, b)| {
                (!a.keep || b.keep) && Axis::ALL.iter().all(|&x| a.size(x) <= b.size(x))
            })
    }
}

fn check(axis: Axis, layer: Option<usize>, v: usize, parent: usize) -> Result<()> {
    if v > parent {
        let at = layer.map_or(String::new(), |l| format!(" in layer {l}"));
        return Err(Error::Budget(format!(
            "{axis}={v}{at} exceeds the parent's {parent}"
        )));
    }
    Ok(())
}

impl BudgetSpec {
    pub fn resolve(&self, shape: &Shape) -> Result<Budget> {
        let n = shape.layers.len();
        let hidden = self.global[Axis::Hidden].unwrap_or(shape.hidden);
        check(Axis::Hidden, None, hidden, shape.hidden)?;
        for &l in self.per_layer.keys().chain(self.skip.iter()) {
            if l >= n {
                return Err(Error::Budget(format!(
                    "layer {l} does not exist (the model has {n} layers)"
                )));
            }
        }
        if self.skip.len() == n {
            return Err(Error::Budget("skip= drops every layer".into()));
        }
        let mut layers = Vec::with_capacity(n);
        for (i, kind) in shape.layers.iter().enumerate() {
            let own = self.per_layer.get(&i);
            let sizes = AxisMap::from_fn(|a| match a {
                Axis::Hidden => hidden,
                _ if !a.applies(*kind) => 0,
                _ => own
                    .and_then(|o| o[a])
                    .or(self.global[a])
                    .unwrap_or(shape.size(a)),
            });
            for a in Axis::LAYER.into_iter().filter(|a| a.applies(*kind)) {
                let v = sizes[a];
                check(a, own.map(|_| i), v, shape.size(a))?;
                let g = shape.groups(a);
                if !v.is_multiple_of(g) {
                    return Err(Error::Budget(format!(
                        "{a}={v} breaks the group structure: it must be a multiple of the {g} {} (the same number kept in each)",
                        a.groups_name()
                    )));
                }
            }
            let experts = sizes[Axis::Experts];
            if *kind == LayerKind::Moe && experts < shape.experts_per_tok {
                return Err(Error::Budget(format!(
                    "experts={experts} is fewer than the {} experts each token is routed to",
                    shape.experts_per_tok
                )));
            }
            let kept = |a: Axis| shape.kept(a, sizes[a]);
            let (d, p) = (shape.head_dim, shape.mamba_head_dim);
            let q_rows = merge(kept(Axis::Heads).into_iter().map(|h| h * d..(h + 1) * d));
            let mheads = merge(kept(Axis::MambaHeads).into_iter().map(|h| h..h + 1));
            let pa = sizes[Axis::MambaHeadDim];
            let inner = merge(
                kept(Axis::MambaHeads)
                    .into_iter()
                    .map(|h| h * p..h * p + pa),
            );
            let expert_ids = merge(kept(Axis::Experts).into_iter().map(|e| e..e + 1));
            let mut in_rows = vec![];
            if *kind == LayerKind::Mamba {
                // z and x of the active channels, all of B/C, dt of the active heads.
                let di = shape.mamba_heads * p;
                let gn = shape.mamba_groups * shape.ssm_state;
                let off = |o: usize| move |s: &Range<usize>| s.start + o..s.end + o;
                in_rows = merge(
                    inner
                        .iter()
                        .map(off(0))
                        .chain(inner.iter().map(off(di)))
                        .chain([2 * di..2 * di + 2 * gn])
                        .chain(mheads.iter().map(off(2 * di + 2 * gn))),
                );
            }
            layers.push(LayerBudget {
                keep: !self.skip.contains(&i),
                sizes,
                q_rows,
                inner,
                mheads,
                in_rows,
                expert_ids,
            });
        }
        Ok(Budget {
            hidden,
            layers: layers.into(),
        })
    }
}

/// Joins touching ranges (a full budget becomes one segment); drops empty ones.
fn merge(v: impl IntoIterator<Item = Range<usize>>) -> Vec<Range<usize>> {
    let mut out: Vec<Range<usize>> = vec![];
    for r in v.into_iter().filter(|r| !r.is_empty()) {
        match out.last_mut() {
            Some(last) if last.end == r.start => last.end = r.end,
            _ => out.push(r),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape() -> Shape {
        Shape {
            hidden: 64,
            layers: vec![
                LayerKind::Mamba,
                LayerKind::Attention,
                LayerKind::Mlp,
                LayerKind::Moe,
            ],
            heads: 4,
            kv_heads: 2,
            head_dim: 16,
            ffn: 96,
            moe_ffn: 32,
            experts: 8,
            experts_per_tok: 2,
            expert_groups: 2,
            shared_ffn: 48,
            mamba_heads: 8,
            mamba_head_dim: 16,
            mamba_groups: 2,
            ssm_state: 16,
        }
    }

    #[test]
    fn parses_and_roundtrips() {
        let s = shape();
        let spec: BudgetSpec =
            "hidden=32,ffn=48,heads=2,mamba_heads=4,mamba_head_dim=8,experts=4,ffn.2=64,skip=1"
                .parse()
                .unwrap();
        let b = spec.resolve(&s).unwrap();
        assert_eq!(b.layer(2).size(Axis::Ffn), 64);
        assert!(!b.layer(1).keep);
        assert_eq!(b.layer(1).q_rows, vec![0..16, 32..48]);
        assert_eq!(b.layer(0).mheads, vec![0..2, 4..6]);
        assert_eq!(b.layer(0).inner, vec![0..8, 16..24, 64..72, 80..88]);
        assert_eq!(b.layer(3).expert_ids, vec![0..2, 4..6]);
        let again: BudgetSpec = b.spec(&s).parse().unwrap();
        let b2 = again.resolve(&s).unwrap();
        assert_eq!(b2.layers, b.layers);
        assert_eq!(b2.hidden, 32);
        assert!(Budget::full(&s).is_full(&s));
        assert!(b.nested_in(&Budget::full(&s)));
        assert!(!Budget::full(&s).nested_in(&b));
    }

    #[test]
    fn refuses_bad_budgets() {
        let s = shape();
        for (spec, needle) in [
            ("hidden=65", "exceeds"),
            ("heads=3", "group structure"),
            ("mamba_heads=3", "group structure"),
            ("experts=3", "group structure"),
            ("experts=1", "group structure"),
            ("ffn.9=10", "does not exist"),
            ("bogus=3", "unknown axis"),
            ("hidden=x", "not a positive integer"),
            ("hidden=0", "positive"),
            ("skip=0+1+2+3", "every layer"),
            ("hidden", "key=value"),
            ("", "empty"),
            (" ", "empty"),
        ] {
            let e = spec
                .parse::<BudgetSpec>()
                .and_then(|p| p.resolve(&s))
                .unwrap_err()
                .to_string();
            assert!(e.contains(needle), "{spec}: {e}");
        }
        let s1 = Shape {
            expert_groups: 1,
            ..shape()
        };
        let e = "experts=1"
            .parse::<BudgetSpec>()
            .unwrap()
            .resolve(&s1)
            .unwrap_err()
            .to_string();
        assert!(e.contains("fewer than"), "{e}");
    }
}
