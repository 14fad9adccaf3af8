//! Nested training (method doc §4): every budget of an elastic checkpoint trained at once by
//! distillation from the frozen parent, with a learned router choosing each budget's sizes.
//!
//! One step: draw a budget (stage 1 uniform at a short context, stage 2 skewed to the largest at
//! a longer one) → the router's Gumbel-softmax decision → masks → student logits (candle graph,
//! [`net`]) → teacher logits (the engine, full budget) → KD + budget loss → AdamW on the model
//! (lr 9e-5) and the router (1e-2). Checkpoints hold everything needed to resume bit for bit.

// Kernels and solvers index several arrays with one loop variable; signatures are wide.
#![allow(clippy::needless_range_loop, clippy::too_many_arguments)]

pub mod adamw;
pub mod denormal;
pub mod error;
pub mod export;
pub mod loss;
pub mod masks;
pub mod net;
pub use elastica_core::rng;
pub mod router;

use crate::error::{Error, Result};
use adamw::AdamW;
use candle_core::{DType as CD, Tensor as CT, Var};
use elastica_core::budget::{Axis, Budget};
use elastica_core::formats::temp::{self, Temp};
use elastica_core::model::{BatchItem, Logits, Model, SeqState, Work};
use elastica_core::models::Checkpoint;
use net::Net;
use rng::Rng;
use router::Router;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Everything that defines a run; a resumed run must match it exactly.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Config {
    /// Identity of the model: architecture, parent spec, vocabulary, parameter count.
    pub model: String,
    pub budgets: Vec<String>,
    pub specs: Vec<String>,
    pub data: String,
    pub tokens: u64,
    pub seq: usize,
    pub batch: usize,
    pub seq2: usize,
    pub batch2: usize,
    /// Fraction of the tokens in stage 1.
    pub stage1: f64,
    /// Stage-2 budget probabilities, largest budget first.
    pub probs2: Vec<f64>,
    pub lr: f64,
    pub router_lr: f64,
    pub warmup: u64,
    /// `cosine` (to 10% of lr) or `constant` after warm-up.
    pub schedule: String,
    pub weight_decay: f64,
    pub kd_temp: f64,
    pub budget_weight: f64,
    pub clip: f64,
    pub tau: (f64, f64),
    pub hard: bool,
    pub per_layer: bool,
    /// Warm start: the router gives each budget its manifest sizes with at least this probability.
    pub router_init_p: f64,
    pub seed: u64,
    pub eval_every: u64,
    pub eval_seqs: usize,
    pub ckpt_every: u64,
    /// Quantization-aware distillation: `fp8` or `nvfp4` fake quantization of the matrices
    /// `quantize` would quantize (`quant_exclude`: its globs; none = NVIDIA's recipe).
    #[serde(default)]
    pub quant: Option<String>,
    #[serde(default)]
    pub quant_exclude: Option<Vec<String>>,
    /// What the student learns from: the teacher's distribution, or the next token.
    #[serde(default)]
    pub objective: Objective,
}

/// The training signal.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Objective {
    /// Distillation from the frozen teacher, every budget at once (method doc §4).
    #[default]
    Kd,
    /// Next-token cross-entropy of the full model on the data: training from scratch.
    Lm,
}

impl Config {
    pub fn steps(&self) -> (u64, u64) {
        let s1 =
            ((self.tokens as f64 * self.stage1) / (self.seq * self.batch) as f64).ceil() as u64;
        let s2 = ((self.tokens as f64 * (1.0 - self.stage1)) / (self.seq2 * self.batch2) as f64)
            .ceil() as u64;
        (s1, s2)
    }
}

/// Resumable state besides the tensors.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct State {
    pub config: Config,
    pub step: u64,
    pub rng: Rng,
    pub tokens_seen: u64,
    pub opt_t: (u64, u64),
    /// Lines of log.jsonl written up to this checkpoint (a resume truncates the rest).
    pub log_lines: u64,
}

pub struct Trainer<'a> {
    pub cfg: Config,
    pub net: Net<'a>,
    pub router: Router,
    /// None with [`Objective::Lm`].
    pub teacher: Option<&'a Model>,
    pub budgets: Vec<Budget>,
    pub targets: Vec<f64>,
    pub train: Vec<u32>,
    pub eval: Vec<u32>,
    pub state: State,
    model_vars: Vec<Var>,
    router_vars: Vec<Var>,
    opt_model: AdamW,
    opt_router: AdamW,
    /// The teacher's sequences (one per batch row) and scratch: one batched pass per step.
    teacher_seqs: Vec<SeqState>,
    teacher_work: Work,
}

/// Per-step record (one JSONL line).
#[derive(Clone, Debug, Serialize)]
pub struct StepLog {
    pub step: u64,
    pub stage: u8,
    pub budget: String,
    pub tokens: u64,
    pub objective: Objective,
    /// The step's training loss: KD, or next-token cross-entropy.
    pub loss: f64,
    pub budget_loss: f64,
    pub expected_params: f64,
    pub target_params: f64,
    pub lr: f64,
    pub tau: f64,
    pub grad_norm: f64,
    pub tok_per_s: f64,
}

impl<'a> Trainer<'a> {
    pub fn new(
        cfg: Config,
        student: &'a Checkpoint,
        teacher: Option<&'a Model>,
        budgets: Vec<Budget>,
        train: Vec<u32>,
        eval: Vec<u32>,
    ) -> Result<Trainer<'a>> {
        denormal::flush_everywhere();
        let m = &student.model;
        match (cfg.objective, teacher) {
            (Objective::Kd, None) => {
                return Err(Error::Input("distillation needs a teacher".into()));
            }
            (Objective::Lm, _)
                if budgets.len() != 1
                    || budgets[0].spec(&m.shape) != m.full_budget().spec(&m.shape) =>
            {
                return Err(Error::Input(
                    "the next-token objective trains the full model only (no --budgets)".into(),
                ));
            }
            _ => {}
        }
        if let Some(teacher) = teacher
            && teacher.vocab != m.vocab
        {
            return Err(Error::Input(format!(
                "the teacher's vocabulary ({}) differs from the student's ({}); distillation needs the same tokens",
                teacher.vocab, m.vocab
            )));
        }
        let need = cfg.seq.max(cfg.seq2) + 1;
        if train.len() < need * cfg.batch.max(cfg.batch2) {
            return Err(Error::Input(format!(
                "the training data has {} tokens; one batch needs {}",
                train.len(),
                need * cfg.batch.max(cfg.batch2)
            )));
        }
        let mut net = Net::from_model(m, &student.raw, CD::F32)?;
        if let Some(q) = &cfg.quant {
            let to = elastica_elastic::quantize::parse_to(q)?;
            let (chosen, _) =
                elastica_elastic::quantize::selection(m, cfg.quant_exclude.as_deref())?;
            let names: Vec<(String, String)> = chosen
                .into_iter()
                .map(|c| {
                    let g = elastica_elastic::quantize::scale_group(&c.name);
                    (c.name, g)
                })
                .collect();
            net.set_fake(to, &names)?;
        }
        let mut rng = Rng::new(cfg.seed);
        let router = Router::new(&m.shape, &budgets, cfg.per_layer, &mut rng, CD::F32)?;
        router.warm_start(&budgets, 500, 0.002, cfg.router_init_p)?;
        let targets = budgets.iter().map(|b| m.params(b).0 as f64).collect();
        let model_vars: Vec<Var> = net
            .params
            .iter()
            .filter(|p| p.trainable())
            .map(|p| p.var.clone())
            .collect();
        let router_vars: Vec<Var> = router.vars().into_iter().cloned().collect();
        let opt_model = AdamW::new(&model_vars, cfg.weight_decay)?;
        let opt_router = AdamW::new(&router_vars, 0.0)?;
        let state = State {
            config: cfg.clone(),
            step: 0,
            rng,
            tokens_seen: 0,
            opt_t: (0, 0),
            log_lines: 0,
        };
        Ok(Trainer {
            cfg,
            net,
            router,
            teacher,
            budgets,
            targets,
            train,
            eval,
            state,
            model_vars,
            router_vars,
            opt_model,
            opt_router,
            teacher_seqs: vec![],
            teacher_work: Work::new(),
        })
    }

    pub fn total_steps(&self) -> u64 {
        let (a, b) = self.cfg.steps();
        a + b
    }

    /// (stage, seq, batch) of a step.
    fn stage(&self, step: u64) -> (u8, usize, usize) {
        let (s1, _) = self.cfg.steps();
        if step < s1 {
            (1, self.cfg.seq, self.cfg.batch)
        } else {
            (2, self.cfg.seq2, self.cfg.batch2)
        }
    }

    fn lr(&self, step: u64, base: f64) -> f64 {
        let w = self.cfg.warmup;
        if step < w {
            return base * (step + 1) as f64 / w as f64;
        }
        match self.cfg.schedule.as_str() {
            "cosine" => {
                let total = self.total_steps().max(w + 1);
                let p = (step - w) as f64 / (total - w) as f64;
                base * (0.1 + 0.9 * 0.5 * (1.0 + (std::f64::consts::PI * p).cos()))
            }
            _ => base,
        }
    }

    fn tau(&self, step: u64) -> f64 {
        let (t0, t1) = self.cfg.tau;
        let p = step as f64 / self.total_steps().max(1) as f64;
        t0 * (t1 / t0).powf(p)
    }

    /// Token windows of a step: deterministic from the seed, the stage and the step, so a resumed
    /// run reads the same data.
    /// With [`Objective::Lm`] each window has one more token: the last position's target.
    fn batch_tokens(&self, step: u64, seq: usize, batch: usize) -> Vec<u32> {
        let take = seq + (self.cfg.objective == Objective::Lm) as usize;
        let windows = (self.train.len() - 1) / seq;
        let per_epoch = (windows / batch).max(1) as u64;
        let epoch = step / per_epoch;
        let mut r =
            Rng::new(self.cfg.seed ^ (epoch.wrapping_mul(0x1000_0000_01B3)) ^ ((seq as u64) << 40));
        let order = r.permutation(windows);
        let i0 = ((step % per_epoch) as usize) * batch;
        let mut out = Vec::with_capacity(take * batch);
        for j in 0..batch {
            let w = order[(i0 + j) % windows];
            out.extend_from_slice(&self.train[w * seq..w * seq + take]);
        }
        out
    }

    fn teacher_logits(&mut self, tokens: &[u32], seq: usize) -> Result<Vec<f32>> {
        let teacher = self.teacher.expect("distillation has a teacher");
        let v = teacher.vocab;
        let full = teacher.full_budget();
        let rows = tokens.len() / seq.max(1);
        if self.teacher_seqs.len() != rows || self.teacher_seqs.iter().any(|s| s.capacity() < seq) {
            self.teacher_seqs = (0..rows)
                .map(|_| SeqState::try_new(teacher, seq, 0))
                .collect::<elastica_core::Result<_>>()?;
            self.teacher_work = Work::try_new(teacher, seq)?;
        }
        // All rows in one pass: each weight is read (and packed for the GEMM) once per step,
        // not once per row; each row's logits are those it gets alone (Model::forward_batch).
        let mut items: Vec<BatchItem> = self
            .teacher_seqs
            .iter_mut()
            .zip(tokens.chunks(seq))
            .map(|(s, t)| {
                s.reset();
                BatchItem {
                    seq: s,
                    tokens: t,
                    logits: Logits::All,
                    stepwise: false,
                }
            })
            .collect();
        let out = teacher
            .forward_batch(&mut items, &full, &mut self.teacher_work)?
            .all()
            .to_vec();
        debug_assert_eq!(out.len(), tokens.len() * v);
        Ok(out)
    }

    /// The model's AdamW step from `grads` (clipped to the global norm `--clip`), fake
    /// quantization refreshed: (gradient norm, learning rate). `what` names the step's budget in
    /// the error.
    fn update_model(
        &mut self,
        grads: &candle_core::backprop::GradStore,
        step: u64,
        what: &str,
    ) -> Result<(f64, f64)> {
        let gn = adamw::grad_norm(&self.model_vars, grads)?;
        if !gn.is_finite() {
            return Err(Error::Train(format!(
                "gradient norm is not finite at step {step}{what}; the last good checkpoint is kept"
            )));
        }
        let scale = (gn > self.cfg.clip && self.cfg.clip > 0.0).then(|| self.cfg.clip / gn);
        let lr = self.lr(step, self.cfg.lr);
        self.opt_model.step(&self.model_vars, grads, lr, scale)?;
        self.net.refresh_fake()?;
        Ok((gn, lr))
    }

    /// One next-token step of the full model: cross-entropy, AdamW, no router.
    fn step_lm(
        &mut self,
        t0: Instant,
        step: u64,
        stage: u8,
        seq: usize,
        batch: usize,
    ) -> Result<StepLog> {
        let win = self.batch_tokens(step, seq, batch);
        let (mut inputs, mut targets) = (
            Vec::with_capacity(seq * batch),
            Vec::with_capacity(seq * batch),
        );
        for w in win.chunks(seq + 1) {
            inputs.extend_from_slice(&w[..seq]);
            targets.extend_from_slice(&w[1..]);
        }
        let full = &self.budgets[0];
        let masks = masks::Masks::hard(&self.net.model.shape, full, CD::F32)?;
        let (logits, tape) = self.net.tape(&inputs, batch, seq, &masks)?;
        let mut z: Vec<f32> = logits.flatten_all()?.to_vec1()?;
        drop(logits);
        let ce = loss::ce_in_place(&mut z, &targets, self.net.model.vocab);
        if !ce.is_finite() {
            return Err(Error::Train(format!(
                "loss is not finite at step {step}: cross-entropy {ce}; the last good checkpoint is kept"
            )));
        }
        let g = loss::grad_tensor(z, inputs.len(), self.net.dtype)?;
        let grads = tape.backward(&g, None, &self.model_vars)?;
        let (gn, lr) = self.update_model(&grads, step, "")?;
        self.state.step += 1;
        self.state.tokens_seen += inputs.len() as u64;
        self.state.opt_t = (self.opt_model.t, self.opt_router.t);
        let p = self.targets[0];
        Ok(StepLog {
            step,
            stage,
            budget: self.cfg.budgets[0].clone(),
            tokens: self.state.tokens_seen,
            objective: Objective::Lm,
            loss: ce,
            budget_loss: 0.0,
            expected_params: p,
            target_params: p,
            lr,
            tau: 0.0,
            grad_norm: gn,
            tok_per_s: inputs.len() as f64 / t0.elapsed().as_secs_f64(),
        })
    }

    /// Budget drawn for a step: uniform in stage 1, `probs2` in stage 2.
    fn draw_budget(&mut self, stage: u8) -> usize {
        let n = self.budgets.len();
        if stage == 1 || n == 1 {
            return self.state.rng.pick(&vec![1.0; n]);
        }
        let p: Vec<f64> = (0..n)
            .map(|i| self.cfg.probs2.get(i).copied().unwrap_or(0.0))
            .collect();
        self.state.rng.pick(&p)
    }

    /// One training step.
    pub fn step(&mut self) -> Result<StepLog> {
        let t0 = Instant::now();
        let step = self.state.step;
        let (stage, seq, batch) = self.stage(step);
        if self.cfg.objective == Objective::Lm {
            return self.step_lm(t0, step, stage, seq, batch);
        }
        let bi = self.draw_budget(stage);
        let tau = self.tau(step);
        let dec = self
            .router
            .decide(bi, tau, Some(&mut self.state.rng), self.cfg.hard)?;
        let shape = self.net.model.shape.clone();
        let masks = self
            .router
            .masks(&dec, &self.budgets[bi], &shape, CD::F32)?;
        let tokens = self.batch_tokens(step, seq, batch);
        let (logits, tape) = self.net.tape(&tokens, batch, seq, &masks)?;
        // One [B·T, vocab] buffer: the student's logits, then their gradient.
        let mut z: Vec<f32> = logits.flatten_all()?.to_vec1()?;
        drop(logits);
        let teacher = self.teacher_logits(&tokens, seq)?;
        let kd = loss::kd_in_place(&mut z, &teacher, self.net.model.vocab, self.cfg.kd_temp);
        drop(teacher);
        let g = loss::grad_tensor(z, tokens.len(), self.net.dtype)?;
        let base = &self.budgets[bi];
        let expected = self.net.param_count(
            &|axis, l| match self.router.expected(&dec, axis, l)? {
                Some(t) => Ok(t),
                None => Ok(CT::new(base.size(axis, l) as f32, &net::dev())?),
            },
            &|l| base.layer(l).keep,
        )?;
        let target = self.targets[bi];
        let bl = loss::budget_loss(&expected, target)?;
        let blv: f64 = bl.to_dtype(CD::F64)?.to_scalar()?;
        let name = self.cfg.budgets[bi].clone();
        if !kd.is_finite() || !blv.is_finite() {
            return Err(Error::Train(format!(
                "loss is not finite at step {step} (budget {name}): kd {kd}, budget loss {blv}; the last good checkpoint is kept"
            )));
        }
        let bl = (bl * self.cfg.budget_weight)?;
        let vars: Vec<Var> = (self.model_vars.iter())
            .chain(&self.router_vars)
            .cloned()
            .collect();
        let grads = tape.backward(&g, Some(&bl), &vars)?;
        let (gn, lr) = self.update_model(&grads, step, &format!(" (budget {name})"))?;
        let rlr = self.lr(step, self.cfg.router_lr);
        self.opt_router.step(&self.router_vars, &grads, rlr, None)?;
        self.state.step += 1;
        self.state.tokens_seen += tokens.len() as u64;
        self.state.opt_t = (self.opt_model.t, self.opt_router.t);
        let ev: f64 = expected.to_dtype(CD::F64)?.to_scalar()?;
        Ok(StepLog {
            step,
            stage,
            budget: name,
            tokens: self.state.tokens_seen,
            objective: Objective::Kd,
            loss: kd,
            budget_loss: blv,
            expected_params: ev,
            target_params: target,
            lr,
            tau,
            grad_norm: gn,
            tok_per_s: tokens.len() as f64 / t0.elapsed().as_secs_f64(),
        })
    }

    /// The current argmax architecture of every budget, made nested (each axis clipped to the
    /// next larger budget's size; budgets are listed largest first).
    pub fn architectures(&self) -> Result<Vec<Budget>> {
        if self.cfg.objective == Objective::Lm {
            return Ok(self.budgets.clone());
        }
        let shape = &self.net.model.shape;
        let mut out: Vec<Budget> = vec![];
        for (bi, base) in self.budgets.iter().enumerate() {
            let spec = self.router.argmax_spec(bi, base, shape)?;
            let mut b = spec.parse::<elastica_core::BudgetSpec>()?.resolve(shape)?;
            if let Some(prev) = out.last()
                && !b.nested_in(prev)
            {
                b = clip_to(&b, prev, shape)?;
            }
            out.push(b);
        }
        Ok(out)
    }

    /// Held-out perplexity of every budget at its current argmax architecture (hard masks).
    pub fn evaluate(&self) -> Result<Vec<(String, f64)>> {
        let seq = self.cfg.seq;
        let n = (self.eval.len().saturating_sub(1) / seq).min(self.cfg.eval_seqs);
        let mut out = vec![];
        if n == 0 {
            return Ok(out);
        }
        let archs = self.architectures()?;
        for (bi, b) in archs.iter().enumerate() {
            let masks = masks::Masks::hard(&self.net.model.shape, b, CD::F32)?;
            let mut nll = 0f64;
            let mut count = 0usize;
            for s in 0..n {
                let toks = &self.eval[s * seq..(s + 1) * seq + 1];
                let logits = self.net.forward(&toks[..seq], 1, seq, &masks)?.detach();
                let lsm = router::log_softmax(&logits)?;
                let tgt = CT::from_vec(toks[1..].to_vec(), (seq, 1), &net::dev())?;
                let lp: Vec<f32> = lsm.gather(&tgt, 1)?.flatten_all()?.to_vec1()?;
                // Score the second half of each window, like perplexity (llama.cpp style).
                for v in &lp[seq / 2..] {
                    nll -= *v as f64;
                    count += 1;
                }
            }
            out.push((self.cfg.budgets[bi].clone(), (nll / count as f64).exp()));
        }
        Ok(out)
    }

    // ---- checkpoints ----

    pub fn save(&self, dir: &Path) -> Result<()> {
        let mut t: HashMap<String, CT> = HashMap::new();
        for (i, p) in self.net.params.iter().enumerate() {
            t.insert(format!("p.{i}"), p.var.as_tensor().clone());
        }
        for (i, v) in self.router_vars.iter().enumerate() {
            t.insert(format!("r.{i}"), v.as_tensor().clone());
        }
        for (pre, o) in [("om", &self.opt_model), ("or", &self.opt_router)] {
            for (i, (m, v)) in o.m.iter().zip(&o.v).enumerate() {
                t.insert(format!("{pre}.m.{i}"), m.clone());
                t.insert(format!("{pre}.v.{i}"), v.clone());
            }
        }
        let tmp = Temp::new(dir)?;
        temp::create_dir_all(&tmp)?;
        candle_core::safetensors::save(&t, tmp.join("state.safetensors"))?;
        let js = serde_json::to_string_pretty(&self.state).unwrap();
        std::fs::write(tmp.join("state.json"), js)
            .map_err(|e| Error::io(tmp.join("state.json"), e))?;
        // Swapped in whole: the old checkpoint goes only once the new one is complete.
        Ok(temp::commit([tmp])?)
    }

    pub fn load(&mut self, dir: &Path) -> Result<()> {
        let sp = dir.join("state.json");
        let text = std::fs::read_to_string(&sp).map_err(|e| Error::io(&sp, e))?;
        let st: State = serde_json::from_str(&text)
            .map_err(|e| Error::format(&sp, format!("not a training state: {e}")))?;
        if st.config != self.cfg {
            return Err(Error::Input(format!(
                "{}: the checkpoint is from another run configuration (model, data, budgets or options differ): checkpoint {} vs now {}",
                sp.display(),
                diff(&st.config, &self.cfg),
                diff(&self.cfg, &st.config)
            )));
        }
        let tp = dir.join("state.safetensors");
        let t = candle_core::safetensors::load(&tp, &net::dev())
            .map_err(|e| Error::format(&tp, e.to_string()))?;
        let get = |k: &str, like: &CT| -> Result<CT> {
            let x = t
                .get(k)
                .ok_or_else(|| Error::format(&tp, format!("tensor {k} is missing")))?;
            if x.shape() != like.shape() {
                return Err(Error::format(
                    &tp,
                    format!(
                        "tensor {k} has shape {:?}, expected {:?}",
                        x.dims(),
                        like.dims()
                    ),
                ));
            }
            Ok(x.clone())
        };
        for (i, p) in self.net.params.iter().enumerate() {
            p.var.set(&get(&format!("p.{i}"), p.var.as_tensor())?)?;
        }
        for (i, v) in self.router_vars.iter().enumerate() {
            v.set(&get(&format!("r.{i}"), v.as_tensor())?)?;
        }
        for (pre, o) in [("om", &mut self.opt_model), ("or", &mut self.opt_router)] {
            for i in 0..o.m.len() {
                o.m[i] = get(&format!("{pre}.m.{i}"), &o.m[i])?;
                o.v[i] = get(&format!("{pre}.v.{i}"), &o.v[i])?;
            }
        }
        self.opt_model.t = st.opt_t.0;
        self.opt_router.t = st.opt_t.1;
        self.state = st;
        self.net.refresh_fake()?;
        Ok(())
    }
}

/// First differing field of two configs, for the refusal message.
fn diff(a: &Config, b: &Config) -> String {
    let (x, y) = (
        serde_json::to_value(a).unwrap(),
        serde_json::to_value(b).unwrap(),
    );
    if let (Some(x), Some(y)) = (x.as_object(), y.as_object()) {
        for (k, v) in x {
            if y.get(k) != Some(v) {
                return format!("{k}={v}");
            }
        }
    }
    String::new()
}

/// `b` with every axis clipped to `prev` (keeps budgets nested).
fn clip_to(b: &Budget, prev: &Budget, shape: &elastica_core::budget::Shape) -> Result<Budget> {
    let mut spec = elastica_core::BudgetSpec::default();
    spec.global[Axis::Hidden] = Some(b.hidden.min(prev.hidden));
    for (i, (x, p)) in b.layers.iter().zip(prev.layers.iter()).enumerate() {
        let a = spec.per_layer.entry(i).or_default();
        for axis in Axis::LAYER {
            a[axis] = Some(x.size(axis).min(p.size(axis)).max(1));
        }
        if !x.keep || !p.keep {
            spec.skip.insert(i);
        }
    }
    Ok(spec.resolve(shape)?)
}

/// Files of a run's output directory.
pub struct RunDir {
    pub root: PathBuf,
}

impl RunDir {
    pub fn checkpoint(&self) -> PathBuf {
        self.root.join("checkpoint")
    }
    pub fn log(&self) -> PathBuf {
        self.root.join("log.jsonl")
    }
    /// Appends one JSON line.
    pub fn log_line(&self, v: &serde_json::Value) -> Result<()> {
        let p = self.log();
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&p)
            .map_err(|e| Error::io(&p, e))?;
        writeln!(f, "{v}").map_err(|e| Error::io(&p, e))
    }
    /// Keeps the first `n` lines of the log (a resume continues from its checkpoint).
    pub fn truncate_log(&self, n: u64) -> Result<()> {
        let p = self.log();
        let text = std::fs::read_to_string(&p).unwrap_or_default();
        let kept: Vec<&str> = text.lines().take(n as usize).collect();
        let mut s = kept.join("\n");
        if !s.is_empty() {
            s.push('\n');
        }
        let tmp = Temp::new(&p)?;
        temp::write(&tmp, s)?;
        Ok(temp::commit([tmp])?)
    }
}

/// Training curves from a run's log: the loss (KD or cross-entropy) per budget (moving average over 8 of its steps)
/// and held-out perplexity per budget (log10), as one PNG.
pub fn plot_log(log: &Path, png: &Path) -> Result<()> {
    use std::collections::BTreeMap;
    let text = std::fs::read_to_string(log).map_err(|e| Error::io(log, e))?;
    let mut kd: BTreeMap<String, Vec<(f32, f32)>> = BTreeMap::new();
    let mut title = "KD loss";
    let mut ppl: BTreeMap<String, Vec<(f32, f32)>> = BTreeMap::new();
    for line in text.lines() {
        let v: serde_json::Value =
            serde_json::from_str(line).map_err(|e| Error::format(log, e.to_string()))?;
        let step = v["step"].as_f64().unwrap_or(0.0) as f32;
        if let Some(ev) = v["eval_ppl"].as_object() {
            for (k, x) in ev {
                if let Some(x) = x.as_f64() {
                    ppl.entry(k.clone())
                        .or_default()
                        .push((step, x.log10() as f32));
                }
            }
        } else if let (Some(b), Some(x)) = (v["budget"].as_str(), v["loss"].as_f64()) {
            if v["objective"] == "lm" {
                title = "cross-entropy";
            }
            kd.entry(b.to_string()).or_default().push((step, x as f32));
        }
    }
    let smooth = |s: &Vec<(f32, f32)>| -> Vec<(f32, f32)> {
        (0..s.len())
            .map(|i| {
                let lo = i.saturating_sub(7);
                let w = &s[lo..=i];
                (s[i].0, w.iter().map(|p| p.1).sum::<f32>() / w.len() as f32)
            })
            .collect()
    };
    let kd: elastica_elastic::plot::Series =
        kd.iter().map(|(k, s)| (k.clone(), smooth(s))).collect();
    let ppl: elastica_elastic::plot::Series = ppl.into_iter().collect();
    Ok(elastica_elastic::plot::curves(
        png,
        &[
            (format!("{title} (moving avg of 8)"), "step".into(), kd),
            ("held-out log10 perplexity".into(), "step".into(), ppl),
        ],
    )?)
}
