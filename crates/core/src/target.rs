//! Any budget, not only the manifest's: a target such as `0.6` (a fraction of the parent's
//! parameters), `params:80e6` (a count) or `active:0.4` (active parameters) resolved to a spec
//! that nests between the manifest's neighbouring budgets (issue 11, point 7).
//!
//! The rule is the budget solver's (`elastica-elastic`'s `solver`, method doc §3), restricted to
//! the box between the two neighbours: start from the larger neighbour and repeatedly take the
//! one-granule shrink of one knob (a width axis, or depth) with the smallest loss increase per
//! parameter removed, never below the smaller neighbour, until the target holds. The path from
//! the upper to the lower neighbour does not depend on the target, so a smaller target only walks
//! further along it: the result is monotone in every axis as the target grows and nests in both
//! neighbours. There is no grow-back (the solver's refinement), which would break that; the last
//! step removes one granule, so the count is at most one granule below the target.
//!
//! The loss is the solver's `mass` objective, the importance fraction the kept prefixes lose,
//! read from the manifest's `mass` curves that elastify stores with the checkpoint (the kept
//! importance fraction at every size, averaged over the layers as the solver does). The
//! `logits` objective (elastify's default) needs model runs on calibration text per candidate and
//! is too slow at load or request time; the neighbours it chose still bound every axis. Without
//! stored curves (a checkpoint made before them) every component counts the same (`uniform`).
//! A walk costs a few parameter counts per step, no model run: cheap enough per request.

use crate::budget::{Axis, Budget, BudgetSpec};
use crate::error::{Error, Result};
use crate::manifest::Manifest;
use crate::model::Model;
use serde::Serialize;

/// A parameter target as written on the command line or in a request.
#[derive(Clone, Debug, PartialEq)]
pub struct Target {
    /// Count against active (per-token) parameters instead of total.
    pub active: bool,
    /// A fraction of the parent (at most 1) or a count (above 1).
    pub value: f64,
}

impl Target {
    /// `0.6`, `params:80e6`, `active:0.4`; `None` when `s` is not written as a target (a name).
    pub fn parse(s: &str) -> Option<Result<Target>> {
        let s = s.trim();
        let (active, num, prefixed) = if let Some(x) = s.strip_prefix("active:") {
            (true, x, true)
        } else if let Some(x) = s.strip_prefix("params:") {
            (false, x, true)
        } else {
            (false, s, false)
        };
        match num.trim().parse::<f64>() {
            Ok(value) => Some(Ok(Target { active, value })),
            Err(_) if prefixed => Some(Err(Error::Budget(format!(
                "budget target {s:?}: {num:?} is not a fraction or a parameter count"
            )))),
            Err(_) => None,
        }
    }

    /// The parameter count asked for, given the parent's (total, active) counts.
    pub fn goal(&self, text: &str, parent: (u64, u64)) -> Result<f64> {
        let (base, what) = if self.active {
            (parent.1, "active parameters")
        } else {
            (parent.0, "parameters")
        };
        let v = self.value;
        if !v.is_finite() || v <= 0.0 {
            return Err(Error::Budget(format!(
                "budget target {text:?}: {v} is outside (0, 1] (a fraction of the parent) and is not a parameter count"
            )));
        }
        if v > base as f64 {
            return Err(Error::Budget(format!(
                "budget target {text:?} asks for {v:.4e} {what}, more than the parent's {base}"
            )));
        }
        Ok(if v <= 1.0 { v * base as f64 } else { v })
    }
}

/// What a target resolved to, and between which manifest budgets.
#[derive(Clone, Debug, Serialize)]
pub struct Resolved {
    #[serde(skip)]
    pub budget: Budget,
    /// The neighbours it nests between (`full` for the parent when the manifest lacks it);
    /// equal when the target is a manifest budget's own.
    pub upper: String,
    pub lower: String,
    /// The parameter count asked for and the one reached (on the target's measure).
    pub goal: f64,
    pub count: u64,
    /// `mass` (stored importance curves) or `uniform` (none stored).
    pub rule: &'static str,
}

/// Knobs in the solver's order (`solver::KNOBS`), so that equally good steps break ties alike;
/// `None` is depth.
const KNOBS: [Option<Axis>; 9] = [
    Some(Axis::Hidden),
    Some(Axis::Ffn),
    Some(Axis::MoeFfn),
    Some(Axis::SharedFfn),
    Some(Axis::Experts),
    Some(Axis::Heads),
    Some(Axis::MambaHeads),
    Some(Axis::MambaHeadDim),
    None,
];

fn knob_name(k: Option<Axis>) -> &'static str {
    k.map_or("depth", Axis::name)
}

/// Resolves `t` (written `text`) on a model with an elastic manifest.
pub fn resolve(model: &Model, man: &Manifest, t: &Target, text: &str) -> Result<Resolved> {
    let s = &model.shape;
    let parent = model.params(&model.full_budget());
    let goal = t.goal(text, parent)?;
    let measure = |b: &Budget| {
        let (tot, act) = model.params(b);
        if t.active { act } else { tot }
    };
    // The manifest's budgets, largest first, with the parent on top when it is not one of them.
    let mut known: Vec<(String, Budget)> = vec![];
    for nb in &man.budgets {
        known.push((nb.name.clone(), model.budget(&nb.spec)?));
    }
    if !known.iter().any(|(_, b)| b.is_full(s)) {
        known.insert(0, ("full".into(), model.full_budget()));
    }
    let rule = if man.mass.is_some() {
        "mass"
    } else {
        "uniform"
    };
    let done = |name: &str, b: &Budget| Resolved {
        budget: b.clone(),
        upper: name.into(),
        lower: name.into(),
        goal,
        count: measure(b),
        rule,
    };
    // A manifest budget's own target gives that budget back.
    for nb in &man.budgets {
        let own = nb.target.as_deref().and_then(Target::parse);
        if let Some(Ok(o)) = own
            && o.active == t.active
            && o.goal("", parent).ok() == Some(goal)
        {
            let (name, b) = known.iter().find(|(n, _)| *n == nb.name).unwrap();
            return Ok(done(name, b));
        }
    }
    let names = || {
        man.budgets
            .iter()
            .map(|b| b.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let Some(li) = known.iter().position(|(_, b)| measure(b) as f64 <= goal) else {
        let (name, b) = known.last().unwrap();
        return Err(Error::Budget(format!(
            "budget target {text:?} ({goal:.4e} parameters) is below the smallest budget {name:?} ({} parameters): any budget is resolved between the manifest's (it has: {})",
            measure(b),
            names()
        )));
    };
    let (lo_name, lo) = &known[li];
    if li == 0 || measure(lo) as f64 == goal {
        return Ok(done(lo_name, lo));
    }
    let (hi_name, hi) = &known[li - 1];
    let walk = Walk::new(model, man, hi, lo);
    let budget = walk.run(|b| measure(b) as f64, goal)?;
    Ok(Resolved {
        count: measure(&budget),
        budget,
        upper: hi_name.clone(),
        lower: lo_name.clone(),
        goal,
        rule,
    })
}

/// The solver's greedy shrink path inside the box between two nested budgets.
struct Walk<'a> {
    model: &'a Model,
    hi: &'a Budget,
    lo: &'a Budget,
    /// Knob values of the upper and lower ends (depth: optional layers kept).
    top: [usize; 9],
    bottom: [usize; 9],
    /// Granule of each knob (0: fixed between these neighbours).
    step: [usize; 9],
    /// Layers kept above but dropped below, least important first (dropped in this order).
    optional: Vec<usize>,
    mass: Option<&'a std::collections::BTreeMap<String, Vec<f32>>>,
}

impl<'a> Walk<'a> {
    fn new(model: &'a Model, man: &'a Manifest, hi: &'a Budget, lo: &'a Budget) -> Walk<'a> {
        let s = &model.shape;
        let n = s.layers.len();
        // Granules as the solver's: whole blocks of the widest quantized format (and 16),
        // whole groups of grouped axes.
        let g16 = model.width_granule();
        let ext = |b: &Budget, a: Axis, f: fn(usize, usize) -> usize| match a {
            Axis::Hidden => b.hidden,
            _ => (0..n)
                .filter(|&l| a.applies(s.layers[l]))
                .map(|l| b.size(a, l))
                .reduce(f)
                .unwrap_or(0),
        };
        let order = man.layer_order.clone().unwrap_or_else(|| (0..n).collect());
        let optional: Vec<usize> = order
            .iter()
            .rev()
            .copied()
            .filter(|&l| hi.layer(l).keep && !lo.layer(l).keep)
            .collect();
        let mut w = Walk {
            model,
            hi,
            lo,
            top: [0; 9],
            bottom: [0; 9],
            step: [0; 9],
            optional,
            mass: man.mass.as_ref(),
        };
        for (i, k) in KNOBS.into_iter().enumerate() {
            let Some(a) = k else {
                w.top[i] = w.optional.len();
                w.step[i] = 1;
                continue;
            };
            w.top[i] = ext(hi, a, usize::max);
            w.bottom[i] = ext(lo, a, usize::min);
            w.step[i] = match a {
                Axis::Heads | Axis::MambaHeads | Axis::Experts => s.groups(a),
                Axis::MambaHeadDim => g16.min(s.mamba_head_dim.max(1)),
                _ => g16,
            };
        }
        w
    }

    /// The budget of knob values `v`: every layer's size clamped between the neighbours'.
    fn budget(&self, v: &[usize; 9]) -> Result<Budget> {
        let s = &self.model.shape;
        let mut sp = BudgetSpec::default();
        for (i, k) in KNOBS.into_iter().enumerate() {
            match k {
                Some(Axis::Hidden) => sp.global[Axis::Hidden] = Some(v[i].max(1)),
                Some(a) => {
                    for (l, kind) in s.layers.iter().enumerate() {
                        if a.applies(*kind) && s.size(a) > 0 {
                            let x = v[i].clamp(self.lo.size(a, l), self.hi.size(a, l));
                            sp.per_layer.entry(l).or_default()[a] = Some(x.max(1));
                        }
                    }
                }
                None => {
                    let gone = &self.optional[..self.optional.len() - v[i]];
                    sp.skip
                        .extend((0..s.layers.len()).filter(|&l| !self.hi.layer(l).keep));
                    sp.skip.extend(gone.iter().copied());
                }
            }
        }
        let b = sp.resolve(s)?;
        self.model.check_alignment(&b)?;
        Ok(b)
    }

    /// Importance fraction kept along a knob at size `k` of `n` (the stored curve, or k / n).
    fn kept(&self, knob: Option<Axis>, k: usize, n: usize) -> f64 {
        match self.mass.and_then(|m| m.get(knob_name(knob))) {
            Some(c) if !c.is_empty() => c[k.min(c.len() - 1)] as f64,
            _ => k as f64 / n.max(1) as f64,
        }
    }

    /// The solver's `mass` loss: Σ over knobs of the importance fraction lost.
    fn loss(&self, b: &Budget) -> f64 {
        let s = &self.model.shape;
        let n = s.layers.len();
        let mut lost = 0.0;
        for k in KNOBS {
            lost += 1.0
                - match k {
                    Some(Axis::Hidden) => self.kept(k, b.hidden, s.hidden),
                    Some(a) => {
                        let ls: Vec<usize> = (0..n).filter(|&l| a.applies(s.layers[l])).collect();
                        if ls.is_empty() || s.size(a) == 0 {
                            continue;
                        }
                        ls.iter()
                            .map(|&l| self.kept(k, b.size(a, l), s.size(a)))
                            .sum::<f64>()
                            / ls.len() as f64
                    }
                    None => self.kept(k, b.layers.iter().filter(|l| l.keep).count(), n),
                };
        }
        lost
    }

    /// Walks down from the upper neighbour until `params` (the target's measure) is at most
    /// `goal` (at the latest at the lower neighbour).
    fn run(&self, params: impl Fn(&Budget) -> f64, goal: f64) -> Result<Budget> {
        let mut cur = self.top;
        let mut b = self.budget(&cur)?;
        while params(&b) > goal {
            let (base_loss, base_n) = (self.loss(&b), params(&b));
            let mut best: Option<(f64, [usize; 9], Budget)> = None;
            for i in 0..9 {
                if cur[i] <= self.bottom[i] || self.step[i] == 0 {
                    continue;
                }
                let channels = matches!(
                    KNOBS[i],
                    Some(Axis::Hidden | Axis::Ffn | Axis::MoeFfn | Axis::SharedFfn)
                );
                // One granule, or more where a quantized block or a group needs it.
                let mut c = cur;
                let cand = loop {
                    let mut x = c[i].saturating_sub(self.step[i]);
                    if channels {
                        x = x / self.step[i] * self.step[i];
                    }
                    c[i] = x.max(self.bottom[i]);
                    if let Ok(nb) = self.budget(&c) {
                        break Some(nb);
                    }
                    if c[i] <= self.bottom[i] {
                        break None;
                    }
                };
                let Some(nb) = cand else { continue };
                let saved = base_n - params(&nb);
                if saved <= 0.0 {
                    continue;
                }
                let ratio = (self.loss(&nb) - base_loss) / saved;
                if best.as_ref().is_none_or(|(r, ..)| ratio < *r) {
                    best = Some((ratio, c, nb));
                }
            }
            match best {
                Some((_, c, nb)) => (cur, b) = (c, nb),
                // Nothing left to remove: the lower neighbour itself.
                None => return Ok(self.lo.clone()),
            }
        }
        Ok(b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_targets_and_leaves_names() {
        let t = |s: &str| Target::parse(s).map(|r| r.map(|t| (t.active, t.value)).ok());
        assert_eq!(t("0.6"), Some(Some((false, 0.6))));
        assert_eq!(t("params:80e6"), Some(Some((false, 80e6))));
        assert_eq!(t(" active:0.4 "), Some(Some((true, 0.4))));
        assert_eq!(t("params:x"), Some(None));
        assert_eq!(t("small"), None);
        let goal = |s: &str| Target::parse(s).unwrap().unwrap().goal(s, (1000, 500));
        assert_eq!(goal("0.5").unwrap(), 500.0);
        assert_eq!(goal("active:0.5").unwrap(), 250.0);
        assert_eq!(goal("params:800").unwrap(), 800.0);
        assert_eq!(goal("1").unwrap(), 1000.0);
        for bad in ["0", "-1", "inf", "params:2000", "active:600"] {
            assert!(goal(bad).is_err(), "{bad}");
        }
    }
}
