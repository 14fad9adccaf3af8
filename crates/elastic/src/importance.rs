//! Activation-based importance (method doc §2): one forward pass over calibration text with hooks,
//! Minitron aggregation (per-sample mean of |activation| over the sequence, L2 over samples), and
//! the orders that sort every axis by decreasing importance (within groups where the structure
//! needs it). Depth: normalised MSE of the logits with a layer skipped, removed iteratively.

use super::IndexMap;
use elastica_core::budget::{Axis, AxisMap, BudgetSpec, LayerKind, Shape};
use elastica_core::error::{Error, Result};
use elastica_core::layers::{Ffn, Observer};
use elastica_core::model::{Cache, Logits, Model, UBATCH};
use serde::{Deserialize, Serialize};

pub const FORMAT: &str = "elastica.importance/1";

/// Scores of one axis and the order (parent indices, most important first) they give.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Scores {
    pub scores: Vec<f32>,
    pub order: Vec<usize>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct LayerImportance {
    pub layer: usize,
    pub kind: char,
    /// The axes the layer has, keyed by name. Grouped axes (experts: REAP saliency; query
    /// heads; Mamba heads) are ordered within each group; Mamba head channels share one order.
    #[serde(flatten)]
    pub axes: AxisMap<Option<Scores>>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Importance {
    pub format: String,
    /// Architecture, vocabulary, layer pattern and explicit spec of the ranked model.
    pub arch: String,
    pub vocab: usize,
    pub pattern: String,
    pub parent: String,
    pub calibration: serde_json::Value,
    pub hidden: Scores,
    pub layers: Vec<LayerImportance>,
    /// Per layer: NMSE of the logits when it is removed (one-shot: alone; iterative: on top of
    /// the layers removed before it); order = most important first. Absent unless asked for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub depth: Option<Scores>,
}

/// Sum of |x| per channel and a token count, for the per-sample mean.
#[derive(Clone, Default)]
struct Running {
    sum: Vec<f64>,
    n: usize,
    /// Σ over samples of (per-sample mean)².
    acc: Vec<f64>,
}

impl Running {
    fn add_rows(&mut self, x: &[f32], width: usize) {
        if self.sum.len() != width {
            self.sum = vec![0.0; width];
            self.acc = vec![0.0; width];
        }
        for row in x.chunks(width) {
            for (s, v) in self.sum.iter_mut().zip(row) {
                *s += v.abs() as f64;
            }
            self.n += 1;
        }
    }
    fn end_sample(&mut self) {
        if self.n > 0 {
            for (a, s) in self.acc.iter_mut().zip(&self.sum) {
                let m = s / self.n as f64;
                *a += m * m;
            }
        }
        self.sum.iter_mut().for_each(|s| *s = 0.0);
        self.n = 0;
    }
    /// L2 over samples of the per-sample means.
    fn l2(&self) -> Vec<f32> {
        self.acc.iter().map(|a| a.sqrt() as f32).collect()
    }
}

#[derive(Default)]
struct LayerAcc {
    norms: Vec<Running>,
    attn: Running,
    mamba: Running,
    dense: Running,
    shared: Running,
    experts: Running,
    reap_sum: Vec<f64>,
    reap_n: Vec<usize>,
}

/// The observer collecting activation statistics over calibration samples.
struct Collector {
    layers: Vec<LayerAcc>,
    norm_calls: Vec<usize>,
}

impl Observer for Collector {
    fn norm(&mut self, layer: usize, x: &[f32], hidden: usize) {
        let k = self.norm_calls[layer];
        self.norm_calls[layer] += 1;
        let l = &mut self.layers[layer];
        if l.norms.len() <= k {
            l.norms.resize(k + 1, Running::default());
        }
        l.norms[k].add_rows(x, hidden);
    }
    fn attention(&mut self, layer: usize, x: &[f32], heads: usize, head_dim: usize) {
        self.layers[layer].attn.add_rows(x, heads * head_dim);
    }
    fn mamba_x(&mut self, layer: usize, x: &[f32], width: usize) {
        self.layers[layer].mamba.add_rows(x, width);
    }
    fn down_input(&mut self, layer: usize, which: Ffn, x: &[f32], width: usize) {
        let l = &mut self.layers[layer];
        match which {
            Ffn::Dense => l.dense.add_rows(x, width),
            Ffn::Shared => l.shared.add_rows(x, width),
            Ffn::Expert(_) => l.experts.add_rows(x, width),
        }
    }
    fn expert_output(&mut self, layer: usize, expert: usize, weight: f32, y: &[f32]) {
        let l = &mut self.layers[layer];
        if l.reap_sum.len() <= expert {
            l.reap_sum.resize(expert + 1, 0.0);
            l.reap_n.resize(expert + 1, 0);
        }
        let norm = y
            .iter()
            .map(|v| (*v as f64) * (*v as f64))
            .sum::<f64>()
            .sqrt();
        l.reap_sum[expert] += weight as f64 * norm;
        l.reap_n[expert] += 1;
    }
}

impl Collector {
    fn end_sample(&mut self) {
        self.norm_calls.iter_mut().for_each(|c| *c = 0);
        for l in &mut self.layers {
            for r in l.norms.iter_mut().chain([
                &mut l.attn,
                &mut l.mamba,
                &mut l.dense,
                &mut l.shared,
                &mut l.experts,
            ]) {
                r.end_sample();
            }
        }
    }
}

/// Indices sorted by decreasing score (ties by index, so the order is deterministic).
pub fn argsort_desc(s: &[f32]) -> Vec<usize> {
    let mut i: Vec<usize> = (0..s.len()).collect();
    i.sort_by(|&a, &b| s[b].total_cmp(&s[a]).then(a.cmp(&b)));
    i
}

/// Sorts within each of `groups` contiguous groups: a permutation that keeps group membership.
pub fn argsort_grouped(s: &[f32], groups: usize) -> Vec<usize> {
    let per = s.len() / groups.max(1);
    (0..groups.max(1))
        .flat_map(|g| {
            argsort_desc(&s[g * per..(g + 1) * per])
                .into_iter()
                .map(move |i| g * per + i)
        })
        .collect()
}

fn axis(scores: Vec<f32>, groups: usize) -> Scores {
    let order = if groups > 1 {
        argsort_grouped(&scores, groups)
    } else {
        argsort_desc(&scores)
    };
    Scores { scores, order }
}

/// Calibration samples: `n` windows of `len` tokens spread evenly over the token stream (BOS
/// first when the model adds one).
pub fn samples(tokens: &[u32], n: usize, len: usize, bos: Option<u32>) -> Result<Vec<Vec<u32>>> {
    if n == 0 || len < 2 {
        return Err(Error::Input(format!(
            "{n} samples of {len} tokens: need at least 1 sample of at least 2 tokens"
        )));
    }
    let body = len - bos.is_some() as usize;
    if tokens.len() < body {
        return Err(Error::Input(format!(
            "the calibration text has {} tokens; {n} samples of {len} need at least {body}",
            tokens.len()
        )));
    }
    let span = tokens.len() - body;
    // More samples than start positions would only repeat windows.
    if n > span + 1 {
        return Err(Error::Input(format!(
            "the calibration text has {} tokens, only {} distinct samples of {len}; {n} asked",
            tokens.len(),
            span + 1
        )));
    }
    Ok((0..n)
        .map(|i| {
            let start = if n == 1 { 0 } else { span * i / (n - 1) };
            let mut s = Vec::with_capacity(len);
            s.extend(bos);
            s.extend_from_slice(&tokens[start..start + body]);
            s
        })
        .collect())
}

/// How `rank` scores layers for the depth axis (method doc §2.4).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DepthMethod {
    /// Each layer removed alone: one forward per layer, O(layers).
    OneShot,
    /// Remove the least important layer, re-score the rest, repeat: O(layers²) forwards.
    Iterative,
}

pub struct RankOptions {
    /// The depth ranking, if any, with its samples (sequences) and their length.
    pub depth: Option<DepthMethod>,
    pub depth_samples: usize,
    pub depth_seq: usize,
}

impl RankOptions {
    /// Forwards per depth sample for an `n`-layer model.
    fn depth_forwards(&self, n: usize) -> usize {
        match self.depth {
            None => 0,
            Some(DepthMethod::OneShot) => n,
            Some(DepthMethod::Iterative) => n * (n + 1) / 2,
        }
    }
}

/// Ranks every axis of `model` on the calibration samples. `progress(done, total, stage)`.
pub fn rank(
    model: &Model,
    cal: &[Vec<u32>],
    opts: &RankOptions,
    calibration: serde_json::Value,
    mut progress: impl FnMut(usize, usize, &str),
) -> Result<Importance> {
    let shape = &model.shape;
    let n = shape.layers.len();
    if let Some(s) = cal.iter().find(|s| s.len() > UBATCH) {
        return Err(Error::Input(format!(
            "calibration samples are limited to {UBATCH} tokens (got {})",
            s.len()
        )));
    }
    let full = model.full_budget();
    let mut col = Collector {
        layers: (0..n).map(|_| LayerAcc::default()).collect(),
        norm_calls: vec![0; n],
    };
    let max_len = cal.iter().map(|s| s.len()).max().unwrap_or(1);
    let mut cache = Cache::new(model, max_len);
    if opts.depth.is_some() && opts.depth_samples == 0 {
        return Err(Error::Input(
            "a depth ranking needs at least one depth sample".into(),
        ));
    }
    let total = cal.len() + opts.depth_forwards(n);
    for (i, s) in cal.iter().enumerate() {
        cache.reset();
        model.forward_observed(s, &full, &mut cache, Logits::None, &mut col)?;
        col.end_sample();
        progress(i + 1, total, "activations");
    }
    // Hidden: every pre-block norm, L2 over samples, summed over hooks and layers.
    let mut hidden = vec![0f32; shape.hidden];
    for l in &col.layers {
        for r in &l.norms {
            for (h, v) in hidden.iter_mut().zip(r.l2()) {
                *h += v;
            }
        }
    }
    let mut layers = vec![];
    for (i, (kind, acc)) in shape.layers.iter().zip(&col.layers).enumerate() {
        let mut li = LayerImportance {
            layer: i,
            kind: kind.pattern_char(),
            ..Default::default()
        };
        if kind.has_mlp() {
            li.axes[Axis::Ffn] = Some(axis(acc.dense.l2(), 1));
        }
        if kind.has_attention() {
            let a = acc.attn.l2();
            let d = shape.head_dim;
            let scores: Vec<f32> = a
                .chunks(d)
                .map(|h| h.iter().map(|v| v * v).sum::<f32>().sqrt())
                .collect();
            li.axes[Axis::Heads] = Some(axis(scores, shape.kv_heads));
        }
        if *kind == LayerKind::Mamba {
            // a[h][p]: channels ranked by the L2 across heads; heads by the L2 over the top half
            // of the channels, within their group (method doc §2.1).
            let a = acc.mamba.l2();
            let (nh, p) = (shape.mamba_heads, shape.mamba_head_dim);
            let ch: Vec<f32> = (0..p)
                .map(|c| {
                    (0..nh)
                        .map(|h| a[h * p + c] * a[h * p + c])
                        .sum::<f32>()
                        .sqrt()
                })
                .collect();
            let ch_axis = axis(ch, 1);
            let top = &ch_axis.order[..p.div_ceil(2)];
            let hs: Vec<f32> = (0..nh)
                .map(|h| {
                    top.iter()
                        .map(|&c| a[h * p + c] * a[h * p + c])
                        .sum::<f32>()
                        .sqrt()
                })
                .collect();
            li.axes[Axis::MambaHeads] = Some(axis(hs, shape.mamba_groups));
            li.axes[Axis::MambaHeadDim] = Some(ch_axis);
        }
        if *kind == LayerKind::Moe {
            li.axes[Axis::MoeFfn] = Some(axis(acc.experts.l2(), 1));
            if shape.shared_ffn > 0 {
                li.axes[Axis::SharedFfn] = Some(axis(acc.shared.l2(), 1));
            }
            let reap: Vec<f32> = (0..shape.experts)
                .map(|e| match (acc.reap_sum.get(e), acc.reap_n.get(e)) {
                    (Some(s), Some(&c)) if c > 0 => (s / c as f64) as f32,
                    _ => 0.0,
                })
                .collect();
            li.axes[Axis::Experts] = Some(axis(reap, shape.expert_groups));
        }
        layers.push(li);
    }
    let depth = match opts.depth {
        Some(method) => {
            let ds: Vec<Vec<u32>> = cal
                .iter()
                .take(opts.depth_samples)
                .map(|s| s[..s.len().min(opts.depth_seq.max(2))].to_vec())
                .collect();
            let mut p = |k| progress(cal.len() + k, total, "depth");
            Some(match method {
                DepthMethod::OneShot => depth_one_shot(model, &ds, &mut p)?,
                DepthMethod::Iterative => depth_order(model, &ds, &mut p)?,
            })
        }
        None => None,
    };
    Ok(Importance {
        format: FORMAT.into(),
        arch: model.arch().into(),
        vocab: model.vocab,
        pattern: model.kind_pattern(),
        parent: full.spec(shape),
        calibration,
        hidden: axis(hidden, 1),
        layers,
        depth,
    })
}

/// The full model's logits on `seqs`, to score layer removals against:
/// s = Σ(M − M′)² / Σ M² (method doc §2.4).
struct DepthRef<'a> {
    model: &'a Model,
    seqs: &'a [Vec<u32>],
    refs: Vec<Vec<f32>>,
    energy: f64,
    cache: Cache,
}

impl<'a> DepthRef<'a> {
    fn new(model: &'a Model, seqs: &'a [Vec<u32>]) -> Result<Self> {
        let max_len = seqs.iter().map(|s| s.len()).max().unwrap_or(1);
        let mut cache = Cache::new(model, max_len);
        let full = model.full_budget();
        let (mut refs, mut energy) = (vec![], 0f64);
        for s in seqs {
            cache.reset();
            let l = model.forward(s, &full, &mut cache, Logits::All)?.to_vec();
            energy += l.iter().map(|v| (*v as f64) * (*v as f64)).sum::<f64>();
            refs.push(l);
        }
        Ok(DepthRef {
            model,
            seqs,
            refs,
            energy,
            cache,
        })
    }

    /// NMSE of the logits with the layers `skip` removed.
    fn nmse(&mut self, skip: impl IntoIterator<Item = usize>) -> Result<f64> {
        let mut spec = BudgetSpec::default();
        spec.skip.extend(skip);
        let b = spec.resolve(&self.model.shape)?;
        let mut err = 0f64;
        for (s, r) in self.seqs.iter().zip(&self.refs) {
            self.cache.reset();
            let l = self.model.forward(s, &b, &mut self.cache, Logits::All)?;
            err += l
                .iter()
                .zip(r)
                .map(|(a, b)| ((a - b) as f64).powi(2))
                .sum::<f64>();
        }
        Ok(err / self.energy.max(f64::MIN_POSITIVE))
    }
}

/// One-shot layer removal (method doc §2.4): every layer scored by removing it alone; the
/// order is by score, most important first.
fn depth_one_shot(
    model: &Model,
    seqs: &[Vec<u32>],
    mut progress: impl FnMut(usize),
) -> Result<Scores> {
    let n = model.shape.layers.len();
    let mut r = DepthRef::new(model, seqs)?;
    let mut scores = Vec::with_capacity(n);
    for j in 0..n {
        scores.push(r.nmse([j])? as f32);
        progress(j + 1);
    }
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
    Ok(Scores { scores, order })
}

/// Iterative layer removal (method doc §2.4): at each step drop the layer whose removal (on top
/// of those already dropped) changes the logits least.
fn depth_order(
    model: &Model,
    seqs: &[Vec<u32>],
    mut progress: impl FnMut(usize),
) -> Result<Scores> {
    let n = model.shape.layers.len();
    let mut r = DepthRef::new(model, seqs)?;
    let mut removed: Vec<usize> = vec![];
    let mut score = vec![0f32; n];
    let mut done = 0;
    while removed.len() + 1 < n {
        let mut best: Option<(usize, f64)> = None;
        for j in (0..n).filter(|j| !removed.contains(j)) {
            let s = r.nmse(removed.iter().copied().chain([j]))?;
            if best.is_none_or(|(_, bs)| s < bs) {
                best = Some((j, s));
            }
            done += 1;
            progress(done);
        }
        let (j, s) = best.unwrap();
        score[j] = s as f32;
        removed.push(j);
    }
    let last = (0..n).find(|j| !removed.contains(j)).unwrap();
    score[last] = f32::INFINITY;
    removed.push(last);
    let order: Vec<usize> = removed.into_iter().rev().collect();
    // JSON has no infinity: the last survivor gets twice the largest finite score.
    let maxf = score
        .iter()
        .filter(|v| v.is_finite())
        .fold(0f32, |a, &b| a.max(b));
    score[last] = 2.0 * maxf.max(1e-12);
    Ok(Scores {
        scores: score,
        order,
    })
}

impl Importance {
    pub fn load(path: &std::path::Path) -> Result<Importance> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let imp: Importance = elastica_core::formats::json::from_str(&text)
            .map_err(|e| Error::format(path, format!("not an importance file: {e}")))?;
        if imp.format != FORMAT {
            return Err(Error::format(
                path,
                format!("format {:?} is not {FORMAT:?}", imp.format),
            ));
        }
        Ok(imp)
    }

    /// Refuses an importance file made for another model or shape.
    pub fn check(&self, model: &Model, path: &std::path::Path) -> Result<()> {
        let want = model.full_budget().spec(&model.shape);
        if self.arch != model.arch()
            || self.vocab != model.vocab
            || self.pattern != model.kind_pattern()
            || self.parent != want
        {
            return Err(Error::format(
                path,
                format!(
                    "made for another model ({} {} [{}], vocab {}); this one is {} {} [{}], vocab {}",
                    self.arch,
                    self.parent,
                    self.pattern,
                    self.vocab,
                    model.arch(),
                    want,
                    model.kind_pattern(),
                    model.vocab
                ),
            ));
        }
        let s = &model.shape;
        let perm = |a: &Scores, n: usize, what: &str| -> Result<()> {
            let mut seen = vec![false; n];
            if a.order.len() != n
                || a.scores.len() != n
                || a.order
                    .iter()
                    .any(|&i| i >= n || std::mem::replace(&mut seen[i], true))
            {
                return Err(Error::format(
                    path,
                    format!("{what}: order is not a permutation of {n} components"),
                ));
            }
            Ok(())
        };
        perm(&self.hidden, s.hidden, Axis::Hidden.name())?;
        if self.layers.len() != s.layers.len() {
            return Err(Error::format(path, "layer count differs from the model"));
        }
        for (l, li) in self.layers.iter().enumerate() {
            for a in Axis::LAYER {
                let n = s.size(a);
                let Some(x) = &li.axes[a] else {
                    if a.applies(s.layers[l]) && n > 0 {
                        return Err(Error::format(path, format!("layer {l}: {a} is missing")));
                    }
                    continue;
                };
                perm(x, n, &format!("layer {l} {a}"))?;
                // Grouped orders must keep every component in its group.
                let per = n / s.groups(a);
                if x.order
                    .iter()
                    .enumerate()
                    .any(|(pos, &i)| pos / per != i / per)
                {
                    return Err(Error::format(
                        path,
                        format!("layer {l} {a}: the order moves components between groups"),
                    ));
                }
            }
        }
        if let Some(d) = &self.depth {
            perm(d, s.layers.len(), "depth")?;
        }
        Ok(())
    }

    /// The permutation that sorts every axis by importance.
    pub fn reorder(&self, shape: &Shape) -> IndexMap {
        IndexMap {
            hidden: self.hidden.order.clone(),
            layers: self
                .layers
                .iter()
                .map(|li| {
                    Some(li.axes.map(|a, x| {
                        x.as_ref()
                            .map_or_else(|| (0..shape.size(a)).collect(), |x| x.order.clone())
                    }))
                })
                .collect(),
        }
    }

    /// The scores as seen by a model re-ordered with `map` (position i holds parent component
    /// map[i]); orders become the identity. With `reorder()` this sorts every axis.
    pub fn permuted(&self, map: &IndexMap) -> Importance {
        let p = |a: &Scores, ix: &[usize]| Scores {
            scores: ix.iter().map(|&i| a.scores[i]).collect(),
            order: (0..ix.len()).collect(),
        };
        Importance {
            hidden: p(&self.hidden, &map.hidden),
            layers: self
                .layers
                .iter()
                .zip(&map.layers)
                .map(|(l, m)| {
                    let m = m.as_ref().expect("a re-ordering keeps every layer");
                    LayerImportance {
                        layer: l.layer,
                        kind: l.kind,
                        axes: l.axes.map(|a, x| x.as_ref().map(|x| p(x, &m[a]))),
                    }
                })
                .collect(),
            ..self.clone()
        }
    }
}

/// Random group-preserving permutations of every axis (the "random order" baseline).
pub fn random_order(shape: &Shape, seed: u64) -> IndexMap {
    let mut rng = elastica_core::rng::Rng::new(seed);
    let mut perm = |n: usize, groups: usize| -> Vec<usize> {
        let per = n / groups.max(1);
        let mut v: Vec<usize> = (0..n).collect();
        for g in 0..groups.max(1) {
            let s = &mut v[g * per..(g + 1) * per];
            for i in (1..s.len()).rev() {
                let j = (rng.next_u64() % (i as u64 + 1)) as usize;
                s.swap(i, j);
            }
        }
        v
    };
    let hidden = perm(shape.hidden, 1);
    let layers = shape
        .layers
        .iter()
        .map(|_| {
            Some(AxisMap::from_fn(|a| match a {
                Axis::Hidden => hidden.clone(),
                _ => perm(shape.size(a), shape.groups(a)),
            }))
        })
        .collect();
    IndexMap { hidden, layers }
}
