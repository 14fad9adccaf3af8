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
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Axes {
    pub ffn: Option<usize>,
    pub moe_ffn: Option<usize>,
    pub experts: Option<usize>,
    pub shared_ffn: Option<usize>,
    pub heads: Option<usize>,
    pub mamba_heads: Option<usize>,
    pub mamba_head_dim: Option<usize>,
}

pub const AXES: [&str; 8] = [
    "hidden",
    "ffn",
    "moe_ffn",
    "experts",
    "shared_ffn",
    "heads",
    "mamba_heads",
    "mamba_head_dim",
];

impl Axes {
    fn slot(&mut self, axis: &str) -> Option<&mut Option<usize>> {
        Some(match axis {
            "ffn" => &mut self.ffn,
            "moe_ffn" => &mut self.moe_ffn,
            "experts" => &mut self.experts,
            "shared_ffn" => &mut self.shared_ffn,
            "heads" => &mut self.heads,
            "mamba_heads" => &mut self.mamba_heads,
            "mamba_head_dim" => &mut self.mamba_head_dim,
            _ => return None,
        })
    }
    fn over(self, base: Axes) -> Axes {
        Axes {
            ffn: self.ffn.or(base.ffn),
            moe_ffn: self.moe_ffn.or(base.moe_ffn),
            experts: self.experts.or(base.experts),
            shared_ffn: self.shared_ffn.or(base.shared_ffn),
            heads: self.heads.or(base.heads),
            mamba_heads: self.mamba_heads.or(base.mamba_heads),
            mamba_head_dim: self.mamba_head_dim.or(base.mamba_head_dim),
        }
    }
}

/// A budget as written by a user or a manifest.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BudgetSpec {
    pub hidden: Option<usize>,
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
            if axis == "hidden" {
                if layer.is_some() {
                    return Err(Error::Budget("hidden is global (channels are indexed across all layers); no per-layer value".into()));
                }
                spec.hidden = Some(n);
                continue;
            }
            let target = match layer {
                Some(l) => spec.per_layer.entry(l).or_default(),
                None => &mut spec.global,
            };
            *target.slot(axis).ok_or_else(|| {
                Error::Budget(format!(
                    "unknown axis {axis:?} (known: {}, skip)",
                    AXES.join(", ")
                ))
            })? = Some(n);
        }
        Ok(spec)
    }
}

/// (name, per-layer getter, which layer kinds have the axis, parent size) for spec printing.
type AxisView<'a> = (
    &'a str,
    fn(&LayerBudget) -> usize,
    fn(LayerKind) -> bool,
    usize,
);

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
    pub ffn: usize,
    pub moe_ffn: usize,
    pub experts: usize,
    pub shared_ffn: usize,
    pub heads: usize,
    pub mamba_heads: usize,
    pub mamba_head_dim: usize,
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
    /// The active size along a per-layer axis (0 where the layer lacks it).
    pub fn size(&self, a: Axis) -> usize {
        match a {
            Axis::Hidden => panic!("hidden is global: read Budget::hidden"),
            Axis::Ffn => self.ffn,
            Axis::MoeFfn => self.moe_ffn,
            Axis::Experts => self.experts,
            Axis::SharedFfn => self.shared_ffn,
            Axis::Heads => self.heads,
            Axis::MambaHeads => self.mamba_heads,
            Axis::MambaHeadDim => self.mamba_head_dim,
        }
    }
}

impl Budget {
    /// The active size along an axis in layer `l`.
    pub fn size(&self, a: Axis, l: usize) -> usize {
        match a {
            Axis::Hidden => self.hidden,
            _ => self.layers[l].size(a),
        }
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
        let axes: [AxisView; 7] = [
            ("ffn", |l| l.ffn, LayerKind::has_mlp, shape.ffn),
            (
                "moe_ffn",
                |l| l.moe_ffn,
                |k| k == LayerKind::Moe,
                shape.moe_ffn,
            ),
            (
                "experts",
                |l| l.experts,
                |k| k == LayerKind::Moe,
                shape.experts,
            ),
            (
                "shared_ffn",
                |l| l.shared_ffn,
                |k| k == LayerKind::Moe,
                shape.shared_ffn,
            ),
            ("heads", |l| l.heads, LayerKind::has_attention, shape.heads),
            (
                "mamba_heads",
                |l| l.mamba_heads,
                |k| k == LayerKind::Mamba,
                shape.mamba_heads,
            ),
            (
                "mamba_head_dim",
                |l| l.mamba_head_dim,
                |k| k == LayerKind::Mamba,
                shape.mamba_head_dim,
            ),
        ];
        for (name, get, applies, parent) in axes {
            let vals: Vec<(usize, usize)> = shape
                .layers
                .iter()
                .enumerate()
                .filter(|(_, k)| applies(**k))
                .map(|(i, _)| (i, get(&self.layers[i])))
                .collect();
            if vals.is_empty() || parent == 0 {
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
            parts.push(format!("{name}={global}"));
            for (i, v) in vals {
                if v != global {
                    parts.push(format!("{name}.{i}={v}"));
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
                (!a.keep || b.keep)
                    && a.ffn <= b.ffn
                    && a.moe_ffn <= b.moe_ffn
                    && a.experts <= b.experts
                    && a.shared_ffn <= b.shared_ffn
                    && a.heads <= b.heads
                    && a.mamba_heads <= b.mamba_heads
                    && a.mamba_head_dim <= b.mamba_head_dim
            })
    }
}

fn check(name: &str, layer: Option<usize>, v: usize, parent: usize) -> Result<()> {
    if v > parent {
        let at = layer.map_or(String::new(), |l| format!(" in layer {l}"));
        return Err(Error::Budget(format!(
            "{name}={v}{at} exceeds the parent's {parent}"
        )));
    }
    Ok(())
}

fn check_group(name: &str, v: usize, groups: usize, what: &str) -> Result<()> {
    if groups > 0 && !v.is_multiple_of(groups) {
        return Err(Error::Budget(format!(
            "{name}={v} breaks the group structure: it must be a multiple of the {groups} {what} (the same number kept in each)"
        )));
    }
    Ok(())
}

impl BudgetSpec {
    pub fn resolve(&self, shape: &Shape) -> Result<Budget> {
        let n = shape.layers.len();
        let hidden = self.hidden.unwrap_or(shape.hidden);
        check("hidden", None, hidden, shape.hidden)?;
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
            let a = self
                .per_layer
                .get(&i)
                .copied()
                .unwrap_or_default()
                .over(self.global);
            let lay = if self.per_layer.contains_key(&i) {
                Some(i)
            } else {
                None
            };
            let ffn = a.ffn.unwrap_or(shape.ffn);
            let moe_ffn = a.moe_ffn.unwrap_or(shape.moe_ffn);
            let experts = a.experts.unwrap_or(shape.experts);
            let shared_ffn = a.shared_ffn.unwrap_or(shape.shared_ffn);
            let heads = a.heads.unwrap_or(shape.heads);
            let mamba_heads = a.mamba_heads.unwrap_or(shape.mamba_heads);
            let mamba_head_dim = a.mamba_head_dim.unwrap_or(shape.mamba_head_dim);
            if kind.has_mlp() {
                check("ffn", lay, ffn, shape.ffn)?;
            }
            let mut q_rows = vec![];
            if kind.has_attention() {
                check("heads", lay, heads, shape.heads)?;
                check_group("heads", heads, shape.kv_heads, "KV groups")?;
                let per = shape.heads / shape.kv_heads;
                let keep = heads / shape.kv_heads;
                let d = shape.head_dim;
                q_rows = (0..shape.kv_heads)
                    .map(|g| g * per * d..(g * per + keep) * d)
                    .collect();
                merge(&mut q_rows);
            }
            let (mut inner, mut mheads) = (vec![], vec![]);
            if *kind == LayerKind::Mamba {
                check("mamba_heads", lay, mamba_heads, shape.mamba_heads)?;
                check("mamba_head_dim", lay, mamba_head_dim, shape.mamba_head_dim)?;
                check_group(
                    "mamba_heads",
                    mamba_heads,
                    shape.mamba_groups,
                    "Mamba groups",
                )?;
                let per = shape.mamba_heads / shape.mamba_groups;
                let keep = mamba_heads / shape.mamba_groups;
                let p = shape.mamba_head_dim;
                for g in 0..shape.mamba_groups {
                    for h in g * per..g * per + keep {
                        inner.push(h * p..h * p + mamba_head_dim);
                    }
                    mheads.push(g * per..g * per + keep);
                }
                merge(&mut inner);
                merge(&mut mheads);
            }
            let mut in_rows = vec![];
            if *kind == LayerKind::Mamba {
                let di = shape.mamba_heads * shape.mamba_head_dim;
                let gn = shape.mamba_groups * shape.ssm_state;
                in_rows.extend(inner.iter().cloned());
                in_rows.extend(inner.iter().map(|s| s.start + di..s.end + di));
                in_rows.push(2 * di..2 * di + 2 * gn);
                in_rows.extend(
                    mheads
                        .iter()
                        .map(|s| s.start + 2 * di + 2 * gn..s.end + 2 * di + 2 * gn),
                );
                merge(&mut in_rows);
            }
            let mut expert_ids = vec![];
            if *kind == LayerKind::Moe {
                check("moe_ffn", lay, moe_ffn, shape.moe_ffn)?;
                check("experts", lay, experts, shape.experts)?;
                check("shared_ffn", lay, shared_ffn, shape.shared_ffn)?;
                check_group("experts", experts, shape.expert_groups, "routing groups")?;
                if experts < shape.experts_per_tok {
                    return Err(Error::Budget(format!(
                        "experts={experts} is fewer than the {} experts each token is routed to",
                        shape.experts_per_tok
                    )));
                }
                let g = shape.expert_groups.max(1);
                let per = shape.experts / g;
                let keep = experts / g;
                expert_ids = (0..g).map(|i| i * per..i * per + keep).collect();
                merge(&mut expert_ids);
            }
            layers.push(LayerBudget {
                keep: !self.skip.contains(&i),
                ffn: if kind.has_mlp() { ffn } else { 0 },
                moe_ffn: if *kind == LayerKind::Moe { moe_ffn } else { 0 },
                experts: if *kind == LayerKind::Moe { experts } else { 0 },
                shared_ffn: if *kind == LayerKind::Moe {
                    shared_ffn
                } else {
                    0
                },
                heads: if kind.has_attention() { heads } else { 0 },
                mamba_heads: if *kind == LayerKind::Mamba {
                    mamba_heads
                } else {
                    0
                },
                mamba_head_dim: if *kind == LayerKind::Mamba {
                    mamba_head_dim
                } else {
                    0
                },
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

/// Joins touching ranges (a full budget becomes one segment).
fn merge(v: &mut Vec<Range<usize>>) {
    let mut out: Vec<Range<usize>> = Vec::with_capacity(v.len());
    for r in v.drain(..) {
        if r.is_empty() {
            continue;
        }
        match out.last_mut() {
            Some(last) if last.end == r.start => last.end = r.end,
            _ => out.push(r),
        }
    }
    *v = out;
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
        assert_eq!(b.layer(2).ffn, 64);
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
