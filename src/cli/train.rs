//! `elastica train`: nested training of every budget of an elastic checkpoint (method doc §4).

use crate::elastic::parse_float_dtype;
use crate::error::{Error, Result};
use crate::formats::temp::{self, Temp};
use crate::manifest::{FORMAT, Manifest, NamedBudget};
use crate::model::Format;
use crate::train::{Config, Objective, RunDir, Trainer};
use std::path::PathBuf;
use std::time::Instant;

#[derive(clap::Args)]
pub struct Args {
    /// The elastic checkpoint (HF folder or GGUF with a manifest): the student's starting weights.
    pub model: PathBuf,
    /// Training text: .txt, or .jsonl with a "text" field per line.
    #[arg(long, num_args = 1.., required = true)]
    pub data: Vec<PathBuf>,
    /// Held-out text for evaluation (default: the last 5% of the training tokens).
    #[arg(long, num_args = 1..)]
    pub eval_data: Vec<PathBuf>,
    /// Budgets to train, manifest names, comma-separated (default: all).
    #[arg(long)]
    pub budgets: Option<String>,
    /// Output directory: model, log.jsonl, checkpoint/, summary.json.
    #[arg(long)]
    pub out: PathBuf,
    /// Teacher (default: the input itself at its full budget, i.e. the frozen parent).
    #[arg(long)]
    pub teacher: Option<PathBuf>,
    /// Training tokens in all.
    #[arg(long, default_value_t = 1_000_000, value_parser = super::at_least_one::<u64>)]
    pub tokens: u64,
    /// Stage 1: sequence length and batch (uniform budget sampling).
    #[arg(long, default_value_t = 256)]
    pub seq: usize,
    /// Stage 1: sequences per step.
    #[arg(long, default_value_t = 4)]
    pub batch: usize,
    /// Stage 2: sequence length and batch (budget probabilities from --probs).
    #[arg(long, default_value_t = 512)]
    pub seq2: usize,
    /// Stage 2: sequences per step.
    #[arg(long, default_value_t = 2)]
    pub batch2: usize,
    /// Fraction of the tokens spent in stage 1.
    #[arg(long, default_value_t = 0.6, value_parser = super::unit)]
    pub stage1: f64,
    /// Stage-2 budget probabilities, largest budget first.
    #[arg(long, default_value = "0.5,0.3,0.2")]
    pub probs: String,
    /// Peak learning rate of the model (AdamW).
    #[arg(long, default_value_t = 9e-5, value_parser = super::non_negative)]
    pub lr: f64,
    /// Peak learning rate of the router (AdamW).
    #[arg(long, default_value_t = 1e-2, value_parser = super::non_negative)]
    pub router_lr: f64,
    /// Linear warm-up steps.
    #[arg(long, default_value_t = 60)]
    pub warmup: u64,
    /// After warm-up: cosine (to 10%) or constant.
    #[arg(long, default_value = "cosine")]
    pub schedule: String,
    /// AdamW weight decay of the model.
    #[arg(long, default_value_t = 0.0, value_parser = super::non_negative)]
    pub weight_decay: f64,
    /// Distillation temperature.
    #[arg(long, default_value_t = 1.0, value_parser = super::positive)]
    pub kd_temp: f64,
    /// Weight λ of the budget loss. The method doc's λ = 1 let the KD term pull small budgets up to
    /// the full model in our runs (its normalisation is unstated); 20 holds them near target.
    #[arg(long, default_value_t = 20.0, value_parser = super::non_negative)]
    pub budget_weight: f64,
    /// Gradient clipping (global L2 norm; 0 = off).
    #[arg(long, default_value_t = 1.0, value_parser = super::non_negative)]
    pub clip: f64,
    /// Gumbel-softmax temperature, annealed from --tau to --tau-end.
    #[arg(long, default_value_t = 1.0, value_parser = super::positive)]
    pub tau: f64,
    /// Gumbel-softmax temperature at the end of the run.
    #[arg(long, default_value_t = 0.05, value_parser = super::positive)]
    pub tau_end: f64,
    /// Hard (straight-through) masks instead of soft router-weighted ones.
    #[arg(long)]
    pub hard: bool,
    /// One router choice per layer (heterogeneous) for every axis but hidden.
    #[arg(long)]
    pub per_layer: bool,
    /// Router warm start: each budget's manifest sizes get at least this probability (0 = off).
    #[arg(long, default_value_t = 0.9, value_parser = super::unit)]
    pub router_init_p: f64,
    /// Random seed (data order, Gumbel noise, router initialisation).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Evaluate held-out perplexity of every budget every K steps (0 = at the start and end only).
    #[arg(long, default_value_t = 50)]
    pub eval_every: u64,
    /// Held-out windows per evaluation (0 = no evaluation).
    #[arg(long, default_value_t = 8)]
    pub eval_seqs: usize,
    /// Checkpoint every K steps (0 = at the end only).
    #[arg(long, default_value_t = 50)]
    pub ckpt_every: u64,
    /// Continue from OUT/checkpoint.
    #[arg(long)]
    pub resume: bool,
    /// Stop after this many steps (checkpointed, no export), as if the run were interrupted.
    #[arg(long, value_parser = super::at_least_one::<u64>)]
    pub stop_after: Option<u64>,
    /// Float format of the written model (of its unquantized tensors with --quant).
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    /// Quantization-aware distillation (method doc §6): train with `fp8` or `nvfp4` fake
    /// quantization (straight-through) of the matrices `quantize` quantizes, against the
    /// unquantized teacher, and write the quantized elastic checkpoint.
    #[arg(long)]
    pub quant: Option<String>,
    /// With --quant: matrices kept unquantized, as `quantize --exclude` (comma-separated globs).
    #[arg(long, value_delimiter = ',', requires = "quant")]
    pub quant_exclude: Option<Vec<String>>,
    /// Training signal: `kd` (distillation from the teacher, every budget) or `lm` (next-token
    /// cross-entropy of the full model: training from scratch, e.g. after `elastica init`).
    #[arg(long, default_value = "kd")]
    pub objective: String,
    /// Replace an existing run in OUT.
    #[arg(long)]
    pub force: bool,
    /// No progress bar.
    #[arg(long)]
    pub no_progress: bool,
}

fn fnv(ids: &[u32]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &x in ids {
        for b in x.to_le_bytes() {
            h ^= b as u64;
            h = h.wrapping_mul(0x100_0000_01b3);
        }
    }
    format!("{h:016x}")
}

/// The manifest budgets `--budgets` names (default: all), largest first, checked to nest.
fn kd_budgets(
    m: &crate::Model,
    man: &Manifest,
    names: Option<&str>,
) -> Result<(Vec<NamedBudget>, Vec<crate::Budget>)> {
    let names: Vec<String> = match names {
        Some(s) => s
            .split(',')
            .map(|x| x.trim().to_string())
            .filter(|x| !x.is_empty())
            .collect(),
        None => man.budgets.iter().map(|b| b.name.clone()).collect(),
    };
    let mut chosen: Vec<&NamedBudget> = vec![];
    for n in &names {
        let nb = man.budgets.iter().find(|b| &b.name == n).ok_or_else(|| {
            let have: Vec<&str> = man.budgets.iter().map(|b| b.name.as_str()).collect();
            Error::Budget(format!(
                "no budget named {n:?} in the manifest (it has: {})",
                have.join(", ")
            ))
        })?;
        chosen.push(nb);
    }
    if chosen.is_empty() {
        return Err(Error::Budget("--budgets names no budget".into()));
    }
    let mut pairs = vec![];
    for nb in chosen {
        pairs.push((nb.clone(), m.budget(&nb.name)?));
    }
    pairs.sort_by_key(|(_, b)| std::cmp::Reverse(m.params(b).0));
    for w in pairs.windows(2) {
        if !w[1].1.nested_in(&w[0].1) {
            return Err(Error::Budget(format!(
                "budgets {:?} and {:?} are not nested (every axis of the smaller must be at most the larger's)",
                w[0].0.name, w[1].0.name
            )));
        }
    }
    Ok(pairs.into_iter().unzip())
}

pub fn run(a: Args) -> Result<()> {
    let dtype = parse_float_dtype(&a.dtype)?;
    let ck = crate::models::open(&a.model)?;
    let m = &ck.model;
    let objective = match a.objective.as_str() {
        "kd" => Objective::Kd,
        "lm" => Objective::Lm,
        o => return Err(Error::Input(format!("--objective {o:?}: use kd or lm"))),
    };
    let objective_name = a.objective.as_str();
    let man = m.meta.manifest.clone();
    let (chosen, budgets): (Vec<NamedBudget>, Vec<crate::Budget>) = match (objective, &man) {
        (Objective::Lm, _) => {
            if a.budgets.is_some() || a.teacher.is_some() || a.quant.is_some() {
                return Err(Error::Input(
                    "--objective lm trains the full model on the data: --budgets, --teacher and --quant do not apply".into(),
                ));
            }
            let full = m.full_budget();
            let nb = NamedBudget {
                name: "full".into(),
                spec: full.spec(&m.shape),
                target: None,
            };
            (vec![nb], vec![full])
        }
        (Objective::Kd, None) => {
            return Err(Error::Input(format!(
                "{} has no elastic manifest; make one with `elastica elastify` (or train from scratch with --objective lm)",
                a.model.display()
            )));
        }
        (Objective::Kd, Some(man)) => kd_budgets(m, man, a.budgets.as_deref())?,
    };
    let probs: Vec<f64> = a
        .probs
        .split(',')
        .map(|x| {
            x.trim()
                .parse::<f64>()
                .map_err(|_| Error::Input(format!("--probs: {x:?} is not a number")))
        })
        .collect::<Result<_>>()?;
    if probs.iter().any(|p| !p.is_finite() || *p < 0.0) || probs.iter().sum::<f64>() <= 0.0 {
        return Err(Error::Input(
            "--probs must be finite, non-negative and with a positive sum".into(),
        ));
    }
    for (name, v) in [
        ("--seq", a.seq),
        ("--batch", a.batch),
        ("--seq2", a.seq2),
        ("--batch2", a.batch2),
    ] {
        if v == 0 {
            return Err(Error::Input(format!("{name} must be at least 1")));
        }
    }
    if a.schedule != "cosine" && a.schedule != "constant" {
        return Err(Error::Input(format!(
            "--schedule {:?}: use cosine or constant",
            a.schedule
        )));
    }
    for (name, v) in [("--seq", a.seq), ("--seq2", a.seq2)] {
        if v > m.meta.context {
            return Err(Error::Input(format!(
                "{name} {v} exceeds the model's trained context of {} tokens",
                m.meta.context
            )));
        }
    }

    // Data: tokenized with the student's tokenizer, packed.
    let tok = crate::generate::tokenizer::Tokenizer::for_model(m)?;
    let texts = crate::data::read_texts(&a.data)?;
    let mut ids = crate::data::tokenize_all(&tok, &texts)?;
    let eval = if a.eval_data.is_empty() {
        let n = ids.len() / 20;
        ids.split_off(ids.len() - n)
    } else {
        crate::data::tokenize_all(&tok, &crate::data::read_texts(&a.eval_data)?)?
    };
    let teacher_model;
    let teacher = match (&a.teacher, objective) {
        (_, Objective::Lm) => None,
        (Some(p), _) => {
            teacher_model = crate::models::load(p)?;
            Some(&teacher_model)
        }
        (None, _) => Some(&ck.model),
    };
    let cfg = Config {
        model: format!(
            "{} {} vocab {} params {}",
            m.arch(),
            m.full_budget().spec(&m.shape),
            m.vocab,
            m.params(&m.full_budget()).0
        ),
        budgets: chosen.iter().map(|b| b.name.clone()).collect(),
        specs: budgets.iter().map(|b| b.spec(&m.shape)).collect(),
        data: format!("{} tokens, fnv {}", ids.len(), fnv(&ids)),
        tokens: a.tokens,
        seq: a.seq,
        batch: a.batch,
        seq2: a.seq2,
        batch2: a.batch2,
        stage1: a.stage1,
        probs2: probs,
        lr: a.lr,
        router_lr: a.router_lr,
        warmup: a.warmup,
        schedule: a.schedule.clone(),
        weight_decay: a.weight_decay,
        kd_temp: a.kd_temp,
        budget_weight: a.budget_weight,
        clip: a.clip,
        tau: (a.tau, a.tau_end),
        hard: a.hard,
        per_layer: a.per_layer,
        router_init_p: a.router_init_p,
        seed: a.seed,
        eval_every: a.eval_every,
        eval_seqs: a.eval_seqs,
        ckpt_every: a.ckpt_every,
        quant: a
            .quant
            .as_deref()
            .map(|q| crate::elastic::quantize::parse_to(q).map(|_| q.to_ascii_lowercase()))
            .transpose()?,
        quant_exclude: a.quant_exclude.clone(),
        objective,
    };
    let dir = RunDir {
        root: a.out.clone(),
    };
    if !a.resume && dir.checkpoint().exists() && !a.force {
        return Err(Error::Input(format!(
            "{} holds a run (use --resume to continue it or --force to start over)",
            a.out.display()
        )));
    }
    std::fs::create_dir_all(&a.out).map_err(|e| Error::io(&a.out, e))?;
    // Temporaries that a killed run left in RUN.
    for f in [
        "checkpoint",
        "model",
        "model.gguf",
        "curves.png",
        "summary.json",
        "log.jsonl",
        "float-export",
    ] {
        temp::sweep(&a.out.join(f));
    }
    let mut tr = Trainer::new(cfg, &ck, teacher, budgets, ids, eval)?;
    if a.resume {
        let cp = dir.checkpoint();
        if !cp.exists() {
            return Err(Error::Input(format!(
                "--resume: {} does not exist",
                cp.display()
            )));
        }
        tr.load(&cp)?;
        dir.truncate_log(tr.state.log_lines)?;
        eprintln!("resumed at step {}", tr.state.step);
    } else {
        let _ = std::fs::remove_file(dir.log());
        let ev = tr.evaluate()?;
        dir.log_line(&serde_json::json!({"step": 0, "eval_ppl": ev.iter().cloned().collect::<std::collections::BTreeMap<_, _>>()}))?;
        tr.state.log_lines += 1;
    }
    let total = tr.total_steps();
    let pb = crate::progress::Progress::new_if(!a.no_progress, "train", false);
    pb.stage("train", total, crate::progress::Unit::Count("steps"));
    pb.set(tr.state.step);
    let mut last_loss: std::collections::BTreeMap<String, f64> = Default::default();
    let t0 = Instant::now();
    let start_tokens = tr.state.tokens_seen;
    while tr.state.step < total {
        if a.stop_after.is_some_and(|s| tr.state.step >= s) {
            pb.finish();
            eprintln!(
                "stopped after step {} (checkpoint in {})",
                tr.state.step,
                dir.checkpoint().display()
            );
            return Ok(());
        }
        let log = tr.step()?;
        last_loss.insert(log.budget.clone(), log.loss);
        dir.log_line(&serde_json::to_value(&log).unwrap())?;
        tr.state.log_lines += 1;
        let s = tr.state.step;
        if a.eval_every > 0 && s % a.eval_every == 0 && s < total {
            let ev = tr.evaluate()?;
            dir.log_line(&serde_json::json!({"step": s, "eval_ppl": ev.iter().cloned().collect::<std::collections::BTreeMap<_, _>>()}))?;
            tr.state.log_lines += 1;
        }
        if a.ckpt_every > 0 && s % a.ckpt_every == 0 {
            tr.save(&dir.checkpoint())?;
        }
        let tps = (tr.state.tokens_seen - start_tokens) as f64 / t0.elapsed().as_secs_f64();
        let losses: Vec<String> = last_loss
            .iter()
            .map(|(k, v)| format!("{k} {v:.3}"))
            .collect();
        pb.status(
            s,
            total,
            format!("{tps:.0} tok/s, {}: {}", objective_name, losses.join(", ")),
        );
    }
    pb.finish();
    let ev = tr.evaluate()?;
    dir.log_line(&serde_json::json!({"step": tr.state.step, "eval_ppl": ev.iter().cloned().collect::<std::collections::BTreeMap<_, _>>()}))?;
    tr.state.log_lines += 1;
    tr.save(&dir.checkpoint())?;

    // The learned architectures into the manifest (a model trained from scratch keeps what it
    // had, usually none); the model in the input's format.
    let mut dropped = vec![];
    let manifest = match (&man, objective) {
        (Some(man), Objective::Kd) => {
            let archs = tr.architectures()?;
            let mut manifest = Manifest {
                format: FORMAT.into(),
                parent: man.parent.clone(),
                budgets: man.budgets.clone(),
                layer_order: man.layer_order.clone(),
                mass: man.mass.clone(),
            };
            for (nb, b) in chosen.iter().zip(&archs) {
                if let Some(x) = manifest.budgets.iter_mut().find(|x| x.name == nb.name) {
                    x.spec = b.spec(&m.shape);
                }
            }
            // Budgets not trained keep their specs; keep the list nested by dropping any that no
            // longer fit.
            let mut kept: Vec<NamedBudget> = vec![];
            let mut prev: Option<crate::Budget> = None;
            for nb in &manifest.budgets {
                let b = nb.spec.parse::<crate::BudgetSpec>()?.resolve(&m.shape)?;
                if prev.as_ref().is_none_or(|p| b.nested_in(p)) {
                    prev = Some(b);
                    kept.push(nb.clone());
                } else {
                    dropped.push(nb.name.clone());
                }
            }
            manifest.budgets = kept;
            manifest.validate(&m.shape)?;
            Some(manifest)
        }
        (man, _) => man.clone(),
    };
    let out_path = match m.meta.format {
        Format::Gguf => a.out.join("model.gguf"),
        Format::Hf => a.out.join("model"),
    };
    // The model, curves and summary are renamed into place together.
    let model_tmp = Temp::new(&out_path)?;
    let w = match &tr.cfg.quant {
        None => crate::train::export::write(
            &ck,
            &tr.net,
            manifest.as_ref(),
            &model_tmp,
            dtype,
            true,
            !a.no_progress,
        )?,
        Some(q) => {
            // QAD: the trained weights in float, then quantized exactly as they were trained
            // (per-tensor scales from their absolute maxima), input scales calibrated on the
            // training text.
            let float_tmp = Temp::new(&a.out.join("float-export"))?;
            crate::train::export::write(
                &ck,
                &tr.net,
                manifest.as_ref(),
                &float_tmp,
                dtype,
                true,
                !a.no_progress,
            )?;
            let fck = crate::models::open(&float_tmp)?;
            let sp = fck.model.meta.specials();
            let bos = if sp.add_bos { sp.bos } else { None };
            let seqs = crate::elastic::importance::samples(&tr.train, 16, a.seq.min(256), bos)?;
            let progress = crate::progress::Progress::new_if(!a.no_progress, "train", false);
            let out = crate::elastic::quantize::write(
                &fck,
                crate::elastic::quantize::parse_to(q)?,
                tr.cfg.quant_exclude.as_deref(),
                &seqs,
                &model_tmp,
                true,
                &progress,
            )?;
            drop(fck);
            out.written
        }
    };
    let summary = serde_json::json!({
        "model": out_path,
        "steps": tr.state.step,
        "tokens": tr.state.tokens_seen,
        "seconds": t0.elapsed().as_secs_f64(),
        "tok_per_s": (tr.state.tokens_seen - start_tokens) as f64 / t0.elapsed().as_secs_f64(),
        "objective": objective_name,
        "budgets": manifest.as_ref().map(|m| &m.budgets),
        "dropped_untrained_budgets": dropped,
        "eval_ppl": ev.iter().cloned().collect::<std::collections::BTreeMap<_, _>>(),
        "written": w,
    });
    let curves = Temp::with_ext(&a.out.join("curves.png"))?;
    let plotted = {
        // The plotting library creates the file itself.
        let _g = temp::creating();
        crate::train::plot_log(&dir.log(), &curves)
    };
    let curves = match plotted {
        Ok(()) => Some(curves),
        Err(e) => {
            eprintln!("warning: no curves.png: {e}");
            None
        }
    };
    let sp = Temp::new(&a.out.join("summary.json"))?;
    temp::write(&sp, serde_json::to_string_pretty(&summary).unwrap())?;
    temp::commit([model_tmp, sp].into_iter().chain(curves))?;
    println!("{}", serde_json::to_string_pretty(&summary).unwrap());
    Ok(())
}
