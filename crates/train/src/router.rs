//! The learned router (method doc §4.1): one small network per elastic axis maps the budget's
//! one-hot to logits over the axis's allowed sizes (one set per layer when heterogeneous);
//! Gumbel-softmax turns them into a distribution π, and the mask is Σ_k π_k · prefix_k (soft), or
//! the argmax prefix with π's gradient (hard, straight-through). The expected sizes Σ_k π_k c_k
//! give the expected parameter count for the budget loss (§4.2).

use super::masks::{LayerMasks, Masks, grouped, prefix};
use super::net::dev;
use super::rng::Rng;
use crate::error::{Error, Result};
use candle_core::{D, DType as CD, Tensor as CT, Var};
use elastica_core::budget::{Axis, Budget, Shape};

pub const HIDDEN: usize = 256;

/// The router of one elastic axis: its allowed sizes and the layers it applies to.
pub struct AxisRouter {
    pub axis: Axis,
    /// Allowed sizes, ascending, in the axis's own unit (channels, heads, experts).
    pub choices: Vec<usize>,
    /// Layers the axis applies to (empty for `hidden`).
    pub layers: Vec<usize>,
    /// One choice per layer (heterogeneous) instead of one for all.
    pub per_layer: bool,
    /// Parent size and group count (masks repeat a per-group prefix).
    pub parent: usize,
    pub groups: usize,
    /// Router weights: w1 [HIDDEN, n_budgets], b1, w2 [slots·K, HIDDEN], b2.
    pub vars: [Var; 4],
}

impl AxisRouter {
    pub fn slots(&self) -> usize {
        if self.per_layer { self.layers.len() } else { 1 }
    }
    fn slot(&self, layer: usize) -> usize {
        if self.per_layer {
            self.layers.iter().position(|&l| l == layer).unwrap()
        } else {
            0
        }
    }
}

pub struct Router {
    pub axes: Vec<AxisRouter>,
    pub n_budgets: usize,
}

/// What the router decided for one budget in one step.
pub struct Decision {
    /// Per axis: π [slots, K] as used by the masks (one-hot rows when hard).
    pub pi: Vec<CT>,
}

/// Sizes per axis for the parameter count: a scalar tensor per (axis, slot).
impl Router {
    /// Axes that vary across `budgets` (the others stay at the parent's size); allowed sizes are
    /// eighths of the parent (rounded to whole groups) plus every size a budget names.
    pub fn new(
        shape: &Shape,
        budgets: &[Budget],
        per_layer: bool,
        rng: &mut Rng,
        dt: CD,
    ) -> Result<Router> {
        let mut axes = vec![];
        for axis in Axis::ALL {
            let hidden = axis == Axis::Hidden;
            let layers: Vec<usize> = (0..shape.layers.len())
                .filter(|&l| !hidden && axis.applies(shape.layers[l]))
                .collect();
            let (parent, groups) = (shape.size(axis), shape.groups(axis));
            if parent == 0 || (!hidden && layers.is_empty()) {
                continue;
            }
            let probe: Vec<usize> = if hidden { vec![0] } else { layers.clone() };
            let mut sizes = std::collections::BTreeSet::new();
            for b in budgets {
                for &l in &probe {
                    sizes.insert(b.size(axis, l));
                }
            }
            if sizes.len() < 2 {
                continue;
            }
            for k in 1..=8 {
                let v = (parent * k / 8) / groups * groups;
                if v >= groups && v > 0 {
                    sizes.insert(v);
                }
            }
            let choices: Vec<usize> = sizes.into_iter().collect();
            let per = per_layer && !hidden;
            let slots = if per { layers.len() } else { 1 };
            let nb = budgets.len();
            let k = choices.len();
            let lin = |rng: &mut Rng, o: usize, i: usize| -> Result<Var> {
                let bound = 1.0 / (i as f32).sqrt();
                let v: Vec<f32> = (0..o * i)
                    .map(|_| (rng.uniform() as f32 * 2.0 - 1.0) * bound)
                    .collect();
                Ok(Var::from_tensor(
                    &CT::from_vec(v, (o, i), &dev())?.to_dtype(dt)?,
                )?)
            };
            let w1 = lin(rng, HIDDEN, nb)?;
            let b1 = Var::from_tensor(&CT::zeros((1, HIDDEN), dt, &dev())?)?;
            let w2 = lin(rng, slots * k, HIDDEN)?;
            let b2 = Var::from_tensor(&CT::zeros((1, slots * k), dt, &dev())?)?;
            axes.push(AxisRouter {
                axis,
                choices,
                layers,
                per_layer: per,
                parent,
                groups,
                vars: [w1, b1, w2, b2],
            });
        }
        Ok(Router {
            axes,
            n_budgets: budgets.len(),
        })
    }

    pub fn vars(&self) -> Vec<&Var> {
        self.axes.iter().flat_map(|a| a.vars.iter()).collect()
    }

    /// Router logits of budget `bi` for one axis, [slots, K].
    pub fn logits(&self, ax: &AxisRouter, bi: usize) -> Result<CT> {
        let dt = ax.vars[0].dtype();
        let mut oh = vec![0f32; self.n_budgets];
        oh[bi] = 1.0;
        let x = CT::from_vec(oh, (1, self.n_budgets), &dev())?.to_dtype(dt)?;
        let h = x
            .matmul(&ax.vars[0].as_tensor().t()?)?
            .broadcast_add(ax.vars[1].as_tensor())?;
        let h = h.maximum(&(&h * 0.01)?)?; // LeakyReLU
        let z = h
            .matmul(&ax.vars[2].as_tensor().t()?)?
            .broadcast_add(ax.vars[3].as_tensor())?;
        Ok(z.reshape((ax.slots(), ax.choices.len()))?)
    }

    /// Gumbel-softmax at temperature `tau` (noise from `rng`; `None` = no noise); `hard` uses the
    /// argmax one-hot forward with the soft gradient (straight-through).
    pub fn decide(
        &self,
        bi: usize,
        tau: f64,
        rng: Option<&mut Rng>,
        hard: bool,
    ) -> Result<Decision> {
        let mut pi = vec![];
        let mut rng = rng;
        for ax in &self.axes {
            let z = self.logits(ax, bi)?;
            let (s, k) = z.dims2()?;
            let z = match rng.as_deref_mut() {
                Some(r) => {
                    let g: Vec<f32> = (0..s * k).map(|_| r.gumbel() as f32).collect();
                    {
                        let dt = z.dtype();
                        (z + CT::from_vec(g, (s, k), &dev())?.to_dtype(dt)?)?
                    }
                }
                None => z,
            };
            let p = super::net::softmax_last(&(z / tau)?)?;
            let p = if hard {
                let am: Vec<u32> = p.argmax_keepdim(D::Minus1)?.flatten_all()?.to_vec1()?;
                let mut oh = vec![0f32; s * k];
                for (i, &a) in am.iter().enumerate() {
                    oh[i * k + a as usize] = 1.0;
                }
                let oh = CT::from_vec(oh, (s, k), &dev())?.to_dtype(p.dtype())?;
                ((oh - &p)?.detach() + &p)?
            } else {
                p
            };
            pi.push(p);
        }
        Ok(Decision { pi })
    }

    /// The argmax architecture of budget `bi` (no noise), as sizes applied over `base`.
    pub fn argmax_spec(&self, bi: usize, base: &Budget, shape: &Shape) -> Result<String> {
        let mut spec: elastica_core::BudgetSpec = base.spec(shape).parse()?;
        for ax in &self.axes {
            let z = self.logits(ax, bi)?;
            let am: Vec<u32> = z.argmax_keepdim(D::Minus1)?.flatten_all()?.to_vec1()?;
            let pick = |slot: usize| ax.choices[am[slot] as usize];
            if ax.axis == Axis::Hidden {
                spec.global[Axis::Hidden] = Some(pick(0));
                continue;
            }
            for (si, &l) in ax.layers.iter().enumerate() {
                let v = pick(if ax.per_layer { si } else { 0 });
                spec.per_layer.entry(l).or_default()[ax.axis] = Some(v);
            }
        }
        let b = spec.resolve(shape)?;
        Ok(b.spec(shape))
    }

    /// Masks for a decision over `base` (the budget's fixed parts: skipped layers, axes the router
    /// does not own).
    pub fn masks(&self, d: &Decision, base: &Budget, shape: &Shape, dt: CD) -> Result<Masks> {
        let mut m = Masks::hard(shape, base, dt)?;
        for (i, (ax, pi)) in self.axes.iter().zip(&d.pi).enumerate() {
            if ax.axis == Axis::Hidden {
                m.hidden = self.row(i, pi, 0, dt)?;
                continue;
            }
            for &l in &ax.layers {
                let lm: &mut LayerMasks = &mut m.layers[l];
                if ax.axis == Axis::Experts {
                    // Routing picks among the argmax choice's experts; their outputs carry the
                    // soft weight.
                    let k = pi
                        .narrow(0, ax.slot(l), 1)?
                        .argmax_keepdim(D::Minus1)?
                        .flatten_all()?
                        .to_vec1::<u32>()?[0] as usize;
                    let per = ax.parent / ax.groups;
                    let on = grouped(&prefix(per, ax.choices[k] / ax.groups), ax.groups);
                    lm.expert_on = on.iter().map(|&v| v > 0.0).collect();
                }
                lm.axes[ax.axis] = Some(self.row(i, pi, l, dt)?);
            }
        }
        Ok(m)
    }

    /// The soft mask of axis `i` at layer `l`: π_slot · P with P[k, j] = 1 if j < c_k (per group),
    /// repeated over the groups.
    fn row(&self, i: usize, pi: &CT, l: usize, dt: CD) -> Result<CT> {
        let ax = &self.axes[i];
        let per = ax.parent / ax.groups;
        let mut pm = vec![];
        for &c in &ax.choices {
            pm.extend(prefix(per, c / ax.groups));
        }
        let pmat = CT::from_vec(pm, (ax.choices.len(), per), &dev())?.to_dtype(dt)?;
        let r = pi.narrow(0, ax.slot(l), 1)?.matmul(&pmat)?.squeeze(0)?;
        if ax.groups == 1 {
            return Ok(r);
        }
        Ok(r.unsqueeze(0)?
            .broadcast_as((ax.groups, per))?
            .flatten_all()?)
    }

    /// Expected size of an axis at a layer: Σ_k π_k c_k (a scalar tensor), or None if the router
    /// does not own the axis.
    pub fn expected(&self, d: &Decision, axis: Axis, layer: usize) -> Result<Option<CT>> {
        let Some(i) = self.axes.iter().position(|a| a.axis == axis) else {
            return Ok(None);
        };
        let ax = &self.axes[i];
        let c: Vec<f32> = ax.choices.iter().map(|&c| c as f32).collect();
        let c = CT::from_vec(c, ax.choices.len(), &dev())?.to_dtype(d.pi[i].dtype())?;
        let row = d.pi[i].narrow(0, ax.slot(layer), 1)?.squeeze(0)?;
        Ok(Some((row * c)?.sum_all()?))
    }

    /// Supervised warm start: fits every budget's logits to its manifest sizes (cross-entropy), so
    /// training starts from the elastify solution instead of a random architecture. It stops at
    /// p ≥ `p_min` for every target, so Gumbel noise still explores the neighbouring sizes.
    pub fn warm_start(&self, budgets: &[Budget], steps: usize, lr: f64, p_min: f64) -> Result<()> {
        let vars: Vec<Var> = self.vars().into_iter().cloned().collect();
        let mut opt = super::adamw::AdamW::new(&vars, 0.0)?;
        for _ in 0..steps {
            let mut loss: Option<CT> = None;
            for (bi, b) in budgets.iter().enumerate() {
                for ax in &self.axes {
                    let z = self.logits(ax, bi)?;
                    let lsm = log_softmax(&z)?;
                    let mut tgt = vec![];
                    for s in 0..ax.slots() {
                        let l = if ax.axis == Axis::Hidden {
                            0
                        } else if ax.per_layer {
                            ax.layers[s]
                        } else {
                            ax.layers[0]
                        };
                        let want = b.size(ax.axis, l);
                        let k = ax.choices.iter().position(|&c| c == want).ok_or_else(|| {
                            Error::Train(format!(
                                "{} size {want} is not an allowed choice",
                                ax.axis
                            ))
                        })?;
                        tgt.push(k as u32);
                    }
                    let n = tgt.len();
                    let idx = CT::from_vec(tgt, (n, 1), &dev())?;
                    let lp = lsm.gather(&idx, 1)?;
                    let worst: f32 = lp
                        .min_keepdim(0)?
                        .to_dtype(CD::F32)?
                        .flatten_all()?
                        .to_vec1()?[0];
                    if worst as f64 >= p_min.ln() {
                        continue; // this slot already gives its manifest size p ≥ p_min
                    }
                    let l = lp.sum_all()?.neg()?;
                    loss = Some(match loss {
                        Some(x) => (x + l)?,
                        None => l,
                    });
                }
            }
            let Some(loss) = loss else { return Ok(()) };
            let g = loss.backward()?;
            opt.step(&vars, &g, lr, None)?;
        }
        Ok(())
    }
}

pub fn log_softmax(z: &CT) -> Result<CT> {
    let m = z.max_keepdim(D::Minus1)?.detach();
    let s = z.broadcast_sub(&m)?;
    let lse = s.exp()?.sum_keepdim(D::Minus1)?.log()?;
    Ok(s.broadcast_sub(&lse)?)
}
