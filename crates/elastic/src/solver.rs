//! Budget solver: picks, for each parameter target, sizes of the allowed axes on a discrete grid.
//!
//! The rule: starting from the parent, repeatedly take the one-granule shrink of one axis with the
//! smallest loss increase per parameter removed, until the target is met; then grow back (one
//! granule at a time, best loss decrease per parameter) while the target still holds. The next,
//! smaller target continues from there, so budgets nest by construction. Two losses:
//! - `Logits` (elastify's default): the measured normalised MSE of the logits of the candidate
//!   budget against the parent on calibration text. Within an axis the importance order still
//!   decides what is kept; this only trades axes against each other, which importance mass cannot
//!   do well (mass is not comparable across axes: SmolLM2's results in docs/results show it).
//!   Each configuration is measured once (memoised), and a shrink step removes at least
//!   `COARSE` (4%) of the parent's parameters (several granules of a cheap axis); the grow-back
//!   then refines by single granules. On SmolLM2 that is ~45 evaluations of 4 × 128 tokens.
//! - `Mass` (`--objective mass`): Σ over axes of the importance fraction the kept prefixes lose
//!   (importance of the kept components over the total, averaged over the layers with the axis).
//!
//! Granules keep the structure: hidden and FFN/expert widths in multiples of 16 (NVFP4 blocks; 32
//! or 256 where a quantized tensor needs it), query heads per KV group, Mamba heads per group,
//! experts per routing group (never fewer than a token's top-k), depth by whole layers in the
//! importance order. A candidate whose cut inputs would split a quantized block is skipped (or
//! taken further to the next block boundary).

use super::importance::Importance;
use elastica_core::budget::{Axis, BudgetSpec};
use elastica_core::error::{Error, Result};
use elastica_core::manifest::{self, Manifest, NamedBudget};
use elastica_core::model::Model;
use elastica_core::progress::Progress;

/// What the solver may shrink: one width axis, or the depth (layers kept in importance order).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Knob {
    Width(Axis),
    Depth,
}

/// Every knob, in search order: ties between equally good steps go to the earlier knob, so this
/// order is part of the solver's results (it predates [`Axis::ALL`], hence shared_ffn before experts).
pub const KNOBS: [Knob; 9] = [
    Knob::Width(Axis::Hidden),
    Knob::Width(Axis::Ffn),
    Knob::Width(Axis::MoeFfn),
    Knob::Width(Axis::SharedFfn),
    Knob::Width(Axis::Experts),
    Knob::Width(Axis::Heads),
    Knob::Width(Axis::MambaHeads),
    Knob::Width(Axis::MambaHeadDim),
    Knob::Depth,
];

impl Knob {
    /// Every width axis (the default of `--axes`).
    pub fn widths() -> Vec<Knob> {
        Axis::ALL.map(Knob::Width).to_vec()
    }
}

impl std::fmt::Display for Knob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Knob::Width(a) => a.fmt(f),
            Knob::Depth => f.write_str("depth"),
        }
    }
}

impl std::str::FromStr for Knob {
    type Err = Error;
    fn from_str(s: &str) -> Result<Knob> {
        match s {
            "depth" => Ok(Knob::Depth),
            _ => s.parse().map(Knob::Width).map_err(|_| {
                Error::Budget(format!(
                    "unknown axis {s:?} (known: {}, depth)",
                    Axis::names()
                ))
            }),
        }
    }
}

/// A parameter target.
#[derive(Clone, Debug, PartialEq)]
pub struct Target {
    pub name: String,
    /// Count against active (per-token) parameters instead of total.
    pub active: bool,
    /// Fraction of the parent (<= 1) or an absolute count (> 1).
    pub value: f64,
    pub text: String,
}

/// Parses `full,0.75,0.5` or `big=1.0,mid=params:90e6,small=active:0.4`.
pub fn parse_targets(s: &str) -> Result<Vec<Target>> {
    let mut out = vec![];
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (name, val) = match part.split_once('=') {
            Some((n, v)) => (n.trim().to_string(), v.trim()),
            None => (part.to_string(), part),
        };
        let parsed = match val {
            "full" => Some(Ok(elastica_core::target::Target {
                active: false,
                value: 1.0,
            })),
            v => elastica_core::target::Target::parse(v),
        };
        let t = parsed.unwrap_or_else(|| {
            Err(Error::Budget(format!(
                "target {part:?}: {val:?} is not a fraction or a count"
            )))
        })?;
        let (active, value) = (t.active, t.value);
        if value.is_nan() || value <= 0.0 || !value.is_finite() {
            return Err(Error::Budget(format!("target {part:?} must be positive")));
        }
        if name.is_empty() || name.contains(|c: char| c == ',' || c == '=' || c.is_whitespace()) {
            return Err(Error::Budget(format!("target name {name:?} is not usable")));
        }
        out.push(Target {
            name,
            active,
            value,
            text: val.to_string(),
        });
    }
    if out.is_empty() {
        return Err(Error::Budget("no targets given".into()));
    }
    Ok(out)
}

/// Homogeneous sizes along every axis plus the number of layers kept, in [`KNOBS`] order.
#[derive(Clone, Debug, PartialEq)]
struct Config {
    v: [usize; 9],
}

/// Calibration sequences, the parent's logits on them, and their energy Σ M².
type Measured = (Vec<Vec<u32>>, Vec<Vec<f32>>, f64);

struct Problem<'a> {
    model: &'a Model,
    imp: Importance,
    /// Step and minimum of each axis; 0 step = not shrinkable here.
    step: [usize; 9],
    min: [usize; 9],
    layer_order: Vec<usize>,
    /// Measured objective: calibration sequences and the parent's logits on them.
    measured: Option<Measured>,
    /// Losses already measured, by configuration.
    memo: std::cell::RefCell<std::collections::HashMap<[usize; 9], f64>>,
    progress: &'a Progress,
    /// Parameters of the parent, and of the smallest goal (the solve's progress runs between).
    span: (f64, f64),
    /// The target being solved and the parameters of the configuration reached (progress).
    current: std::cell::RefCell<(String, f64)>,
    /// Granules per shrink step, per axis (measured search: each step removes about
    /// `COARSE` of the parent; the grow-back refines by single granules).
    coarse: [usize; 9],
}

/// Share of the parent's parameters one shrink step of the measured search removes at least.
const COARSE: f64 = 0.04;

/// What the solver minimises when it trades one axis against another.
pub enum Objective {
    /// Σ over axes of the importance fraction lost (no model runs).
    Mass,
    /// Normalised MSE of the logits on these calibration sequences, Σ(M − M_b)² / Σ M²
    /// (the depth-ranking measure of method doc §2.4 applied to whole budgets).
    Logits(Vec<Vec<u32>>),
}

impl<'a> Problem<'a> {
    fn parent(&self) -> Config {
        let s = &self.model.shape;
        Config {
            v: KNOBS.map(|k| match k {
                Knob::Width(a) => s.size(a),
                Knob::Depth => s.layers.len(),
            }),
        }
    }

    /// The budget of a configuration (axes the model lacks left at the parent's).
    fn resolve(&self, c: &Config) -> Result<elastica_core::budget::Budget> {
        let s = &self.model.shape;
        let mut sp = BudgetSpec::default();
        for (k, &v) in KNOBS.iter().zip(&c.v) {
            match *k {
                Knob::Width(a) if s.size(a) > 0 => sp.global[a] = Some(v.max(1)),
                Knob::Width(_) => {}
                Knob::Depth => sp.skip.extend(self.layer_order[v..].iter().copied()),
            }
        }
        let b = sp.resolve(s)?;
        self.model.check_alignment(&b)?;
        Ok(b)
    }

    fn params(&self, c: &Config) -> Result<(u64, u64)> {
        Ok(self.model.params(&self.resolve(c)?))
    }

    /// Importance fraction kept by a prefix, averaged over the layers with the axis.
    fn retained(&self, knob: Knob, k: usize) -> f64 {
        let frac = |scores: &[f32], k: usize, groups: usize| -> f64 {
            let per = scores.len() / groups.max(1);
            let keep = k / groups.max(1);
            let total: f64 = scores.iter().map(|&x| x.max(0.0) as f64).sum();
            if total <= 0.0 {
                return k as f64 / scores.len().max(1) as f64;
            }
            let kept: f64 = (0..groups.max(1))
                .map(|g| {
                    scores[g * per..g * per + keep]
                        .iter()
                        .map(|&x| x.max(0.0) as f64)
                        .sum::<f64>()
                })
                .sum();
            kept / total
        };
        let s = &self.model.shape;
        let avg = |xs: Vec<f64>| {
            if xs.is_empty() {
                1.0
            } else {
                xs.iter().sum::<f64>() / xs.len() as f64
            }
        };
        match knob {
            Knob::Width(Axis::Hidden) => frac(&self.imp.hidden.scores, k, 1),
            // The axis' kept fraction averaged over the layers that have it.
            Knob::Width(a) => avg(self
                .imp
                .layers
                .iter()
                .filter_map(|l| l.axes[a].as_ref())
                .map(|x| frac(&x.scores, k, s.groups(a)))
                .collect()),
            Knob::Depth => match &self.imp.depth {
                Some(d) => {
                    let total: f64 = d.scores.iter().map(|&x| x.max(0.0) as f64).sum();
                    let kept: f64 = self.layer_order[..k]
                        .iter()
                        .map(|&l| d.scores[l].max(0.0) as f64)
                        .sum();
                    if total > 0.0 {
                        kept / total
                    } else {
                        k as f64 / d.scores.len() as f64
                    }
                }
                None => k as f64 / s.layers.len() as f64,
            },
        }
    }

    /// Shrinks from `start` until `t` holds, then grows back (at most to `cap`) while it still does.
    fn fit(
        &self,
        start: &Config,
        cap: &Config,
        t: &Target,
        want: f64,
        axes: &[Knob],
    ) -> Result<Config> {
        let count = |c: &Config| -> Result<f64> {
            let (tot, act) = self.params(c)?;
            Ok(if t.active { act } else { tot } as f64)
        };
        let mut cur = start.clone();
        *self.current.borrow_mut() = (t.name.clone(), self.params(&cur)?.0 as f64);
        while count(&cur)? > want {
            let base_loss = self.loss(&cur);
            let base_n = count(&cur)?;
            let mut best: Option<(f64, Config)> = None;
            for a in 0..9 {
                if self.step[a] == 0 || cur.v[a] <= self.min[a] {
                    continue;
                }
                // One granule, or more where quantized blocks need it (heads of a K-quant o_proj).
                let mut c = cur.clone();
                let mut k = self.coarse[a];
                let ok = loop {
                    c.v[a] = c.v[a].saturating_sub(k * self.step[a]).max(self.min[a]);
                    k = 1;
                    // Channel widths snap to whole granules.
                    if let Knob::Width(Axis::Hidden | Axis::Ffn | Axis::MoeFfn | Axis::SharedFfn) =
                        KNOBS[a]
                    {
                        c.v[a] = c.v[a] / self.step[a] * self.step[a];
                    }
                    if self.resolve(&c).is_ok() {
                        break true;
                    }
                    if c.v[a] <= self.min[a] {
                        break false;
                    }
                };
                if !ok {
                    continue;
                }
                let saved = base_n - count(&c)?;
                if saved <= 0.0 {
                    continue;
                }
                let ratio = (self.loss(&c) - base_loss) / saved;
                if best.as_ref().is_none_or(|(r, _)| ratio < *r) {
                    best = Some((ratio, c));
                }
            }
            cur = match best {
                Some((_, c)) => {
                    self.current.borrow_mut().1 = self.params(&c)?.0 as f64;
                    c
                }
                None => {
                    return Err(Error::Budget(format!(
                        "target {}={} ({:.4e} {}parameters) cannot be met with axes [{}]: the smallest configuration has {:.4e}",
                        t.name,
                        t.text,
                        want,
                        if t.active { "active " } else { "" },
                        axes.iter()
                            .map(Knob::to_string)
                            .collect::<Vec<_>>()
                            .join(","),
                        base_n
                    )));
                }
            };
        }
        // Fill the slack the last (coarse) step left, staying within `cap` (nesting).
        loop {
            let base_loss = self.loss(&cur);
            let base_n = count(&cur)?;
            let mut best: Option<(f64, Config)> = None;
            for a in 0..9 {
                if self.step[a] == 0 || cur.v[a] >= cap.v[a] {
                    continue;
                }
                let mut c = cur.clone();
                c.v[a] = (cur.v[a] + self.step[a]).min(cap.v[a]);
                let Ok(n) = count(&c) else {
                    continue;
                };
                if n > want || n <= base_n {
                    continue;
                }
                let gain = (base_loss - self.loss(&c)) / (n - base_n);
                if best.as_ref().is_none_or(|(g, _)| gain > *g) {
                    best = Some((gain, c));
                }
            }
            match best {
                Some((_, c)) => {
                    self.current.borrow_mut().1 = self.params(&c)?.0 as f64;
                    cur = c
                }
                None => return Ok(cur),
            }
        }
    }

    fn loss(&self, c: &Config) -> f64 {
        if let Some(&l) = self.memo.borrow().get(&c.v) {
            return l;
        }
        let l = self.measure(c);
        let n = {
            let mut m = self.memo.borrow_mut();
            m.insert(c.v, l);
            m.len()
        };
        if self.measured.is_some() {
            self.report(n);
        }
        l
    }

    /// One progress update: parameters removed so far, evaluations, the target.
    fn report(&self, evals: usize) {
        let (name, n) = self.current.borrow().clone();
        let (top, low) = self.span;
        self.progress.status(
            (top - n).clamp(0.0, top - low) as u64,
            (top - low).max(0.0) as u64,
            format!("target {name}, {evals} evaluations"),
        );
    }

    fn measure(&self, c: &Config) -> f64 {
        if let Some((seqs, refs, energy)) = &self.measured {
            let Ok(b) = self.resolve(c) else {
                return f64::INFINITY;
            };
            let mut cache = elastica_core::model::Cache::new(
                self.model,
                seqs.iter().map(|s| s.len()).max().unwrap_or(1),
            );
            let mut err = 0f64;
            for (s, r) in seqs.iter().zip(refs) {
                cache.reset();
                let Ok(l) =
                    self.model
                        .forward(s, &b, &mut cache, elastica_core::model::Logits::All)
                else {
                    return f64::INFINITY;
                };
                err += l
                    .iter()
                    .zip(r)
                    .map(|(a, b)| ((a - b) as f64).powi(2))
                    .sum::<f64>();
            }
            return err / energy.max(f64::MIN_POSITIVE);
        }
        (0..9)
            .filter(|&a| self.step[a] > 0)
            .map(|a| 1.0 - self.retained(KNOBS[a], c.v[a]))
            .sum()
    }
}

/// Solves `targets` on an elastified model (importance orders are the identity there, so
/// `imp` is the sorted importance file) and returns the manifest.
pub fn solve(
    model: &Model,
    imp: &Importance,
    targets: &[Target],
    axes: &[Knob],
    objective: Objective,
    progress: &Progress,
) -> Result<Manifest> {
    let s = &model.shape;
    if axes.contains(&Knob::Depth) && imp.depth.is_none() {
        return Err(Error::Budget(
            "the depth axis needs a depth ranking (run `elastica rank --depth oneshot` or `--depth iterative`)".into(),
        ));
    }
    let layer_order: Vec<usize> = imp
        .depth
        .as_ref()
        .map_or_else(|| (0..s.layers.len()).collect(), |d| d.order.clone());
    // Quantized tensors fix the smallest block a cut input dimension may take.
    let g16 = model.width_granule();
    let pd = g16.min(s.mamba_head_dim.max(1));
    let mut step = [0usize; 9];
    let mut min = [0usize; 9];
    for (i, knob) in KNOBS.into_iter().enumerate() {
        let (st, mn, ok) = match knob {
            Knob::Depth => (1, 1, s.layers.len() > 1),
            Knob::Width(a) => {
                // Granules: whole groups, Mamba head channels in blocks, other widths in g16.
                let st = match a {
                    Axis::Heads | Axis::MambaHeads | Axis::Experts => s.groups(a),
                    Axis::MambaHeadDim => pd,
                    _ => g16,
                };
                let mn = match a {
                    Axis::Experts => s.experts_per_tok.next_multiple_of(st),
                    _ => st,
                };
                let has = s.layers.iter().any(|&k| a.applies(k));
                (st, mn, s.size(a) > mn && has)
            }
        };
        if ok && axes.contains(&knob) {
            step[i] = st;
            min[i] = mn;
        }
    }
    let mut p = Problem {
        model,
        imp: imp.clone(),
        step,
        min,
        layer_order,
        measured: None,
        memo: Default::default(),
        progress,
        span: (0.0, 0.0),
        current: Default::default(),
        coarse: [1; 9],
    };
    let parent = p.parent();
    let (pt, pa) = p.params(&parent)?;
    if let Objective::Logits(seqs) = objective {
        let full = model.full_budget();
        let mut cache = elastica_core::model::Cache::new(
            model,
            seqs.iter().map(|s| s.len()).max().unwrap_or(1),
        );
        let (mut refs, mut energy) = (vec![], 0f64);
        for sq in &seqs {
            cache.reset();
            let l = model
                .forward(sq, &full, &mut cache, elastica_core::model::Logits::All)?
                .to_vec();
            energy += l.iter().map(|v| (*v as f64).powi(2)).sum::<f64>();
            refs.push(l);
        }
        p.measured = Some((seqs, refs, energy));
    }
    if p.measured.is_some() {
        for a in 0..9 {
            if p.step[a] == 0 {
                continue;
            }
            let mut c = parent.clone();
            c.v[a] = c.v[a].saturating_sub(p.step[a]).max(p.min[a]);
            if let Ok((n, _)) = p.params(&c)
                && n < pt
            {
                p.coarse[a] = ((COARSE * pt as f64 / (pt - n) as f64) as usize).max(1);
            }
        }
        let low = targets
            .iter()
            .map(|t| {
                if t.value <= 1.0 {
                    t.value * pt as f64
                } else {
                    t.value
                }
            })
            .fold(pt as f64, f64::min);
        p.span = (pt as f64, low);
        progress.stage(
            "solve",
            (pt as f64 - low) as u64,
            elastica_core::progress::Unit::Params,
        );
    }
    if p.step.iter().all(|&x| x == 0) {
        return Err(Error::Budget(
            "no allowed axis can shrink on this model".into(),
        ));
    }
    let goal = |t: &Target| -> f64 {
        let base = if t.active { pa } else { pt } as f64;
        if t.value <= 1.0 {
            t.value * base
        } else {
            t.value
        }
    };
    // Largest budget first; each continues from (and stays within) the previous one. With targets
    // on one measure the goals order them; mixed total/active targets are ordered by the total
    // size each reaches when solved alone.
    let mut order: Vec<usize> = (0..targets.len()).collect();
    if targets.iter().all(|t| t.active == targets[0].active) {
        order.sort_by(|&a, &b| goal(&targets[b]).total_cmp(&goal(&targets[a])));
    } else {
        let mut alone = vec![];
        for t in targets {
            let c = p.fit(&parent, &parent, t, goal(t), axes)?;
            alone.push(p.params(&c)?.0);
        }
        order.sort_by_key(|&i| std::cmp::Reverse(alone[i]));
    }
    let mut cur = parent.clone();
    let mut solved: Vec<(usize, Config)> = vec![];
    for &ti in &order {
        let cap = solved
            .last()
            .map_or_else(|| parent.clone(), |(_, c)| c.clone());
        cur = p.fit(&cur, &cap, &targets[ti], goal(&targets[ti]), axes)?;
        solved.push((ti, cur.clone()));
    }
    progress.finish();
    solved.sort_by_key(|(ti, _)| order.iter().position(|x| x == ti).unwrap());
    let mut budgets = vec![];
    for (ti, c) in &solved {
        let resolved = p.resolve(c)?;
        budgets.push(NamedBudget {
            name: targets[*ti].name.clone(),
            spec: resolved.spec(s),
            target: Some(targets[*ti].text.clone()),
        });
    }
    // The importance each knob's prefixes keep (the mass objective), stored so that any budget
    // can be resolved between these at load time without the importance file (core's `target`).
    let mass = KNOBS
        .into_iter()
        .filter_map(|k| {
            let n = match k {
                Knob::Width(a) if s.layers.iter().any(|&l| a.applies(l)) => s.size(a),
                Knob::Width(_) => 0,
                Knob::Depth => imp.depth.as_ref().map_or(0, |_| s.layers.len()),
            };
            let curve = (0..=n).map(|i| ((p.retained(k, i) * 1e4).round() / 1e4 + 0.0) as f32);
            (n > 0).then(|| (k.to_string(), curve.collect()))
        })
        .collect();
    Ok(Manifest {
        format: manifest::FORMAT.into(),
        parent: model.full_budget().spec(s),
        budgets,
        layer_order: imp.depth.as_ref().map(|d| d.order.clone()),
        mass: Some(mass),
    })
}
