use crate::elastic::importance::{Importance, random_order};
use crate::elastic::{IndexMap, logit_diff, parse_float_dtype, probe_tokens, rewrite, solver};
use crate::error::{Error, Result};
use crate::progress::{Progress, Unit};
use std::path::PathBuf;

/// A lossy (re-quantized, f16, bf16) output is refused only when clearly broken: its logits' RMS
/// change beyond this fraction of their RMS, or the same top token at fewer positions than this.
const LOSSY_RMS: f32 = 1.0;
const LOSSY_TOP1: f32 = 0.1;

/// The calibration text `rank` recorded in the importance file (the measured solver's default).
fn recorded_calib(imp: &Importance, path: &std::path::Path) -> Result<Vec<PathBuf>> {
    let files: Vec<PathBuf> = imp
        .calibration
        .get("files")
        .and_then(|f| f.as_array())
        .map(|f| {
            f.iter()
                .filter_map(|x| x.as_str())
                .map(PathBuf::from)
                .collect()
        })
        .unwrap_or_default();
    if files.is_empty() {
        return Err(Error::Input(format!(
            "{}: records no calibration text; the measured budget search needs some: pass --calib FILE (or --objective mass)",
            path.display()
        )));
    }
    if let Some(f) = files.iter().find(|f| !f.is_file()) {
        return Err(Error::Input(format!(
            "{} records the calibration text {}, which is not there: pass --calib FILE (or --objective mass)",
            path.display(),
            f.display()
        )));
    }
    Ok(files)
}

#[derive(clap::Args)]
pub struct Args {
    /// The model to make elastic (HF folder or .gguf).
    model: PathBuf,
    /// Importance file from `elastica rank`.
    #[arg(long)]
    importance: PathBuf,
    /// Budget targets: `full,0.75,0.5` (fractions of total parameters), or named with counts or
    /// active parameters: `big=1.0,mid=params:90e6,small=active:0.4`.
    #[arg(long)]
    budgets: String,
    /// Output folder (HF input) or .gguf file (GGUF input).
    #[arg(short, long)]
    out: PathBuf,
    /// Axes the budgets may shrink (default: every width axis; add `depth` to drop layers).
    #[arg(long, value_delimiter = ',')]
    axes: Option<Vec<solver::Knob>>,
    /// Component order: `importance` (default), or the `natural` / `random` baselines.
    #[arg(long, default_value = "importance")]
    order: String,
    /// Seed for --order random.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Float format of re-ordered matrices (default: kept; quantized ones become f32, exactly).
    #[arg(long)]
    dtype: Option<String>,
    /// What the budget search minimises: `logits` (default), the measured normalised MSE of each
    /// candidate budget's logits on calibration text, or `mass`, the importance mass lost (no
    /// model runs; mass is not comparable across axes, so it trades them badly).
    #[arg(long, default_value = "logits")]
    objective: String,
    /// Calibration text for the measured search and the function check (default: the files
    /// `rank` recorded in the importance file).
    #[arg(long, num_args = 1..)]
    calib: Vec<PathBuf>,
    /// Sequences of calibration text the measured search runs.
    #[arg(long, default_value_t = 4, value_parser = super::at_least_one::<usize>)]
    solve_samples: usize,
    /// Tokens per sequence of the measured search (2 to 512).
    #[arg(long, default_value_t = 128)]
    solve_seq: usize,
    /// Replace an existing output.
    #[arg(long)]
    force: bool,
    /// Print one JSON report instead of text.
    #[arg(long)]
    json: bool,
}

pub fn run(a: Args) -> Result<()> {
    let ck = crate::models::open(&a.model)?;
    let m = &ck.model;
    let imp = Importance::load(&a.importance)?;
    imp.check(m, &a.importance)?;
    let map = match a.order.as_str() {
        "importance" => imp.reorder(&m.shape),
        "natural" => IndexMap::identity(&m.shape),
        "random" => random_order(&m.shape, a.seed),
        other => {
            return Err(Error::Input(format!(
                "--order {other:?}: use importance, natural or random"
            )));
        }
    };
    let targets = solver::parse_targets(&a.budgets)?;
    let (pt, pa) = m.params(&m.full_budget());
    for t in targets.iter().filter(|t| t.value > 1.0) {
        let have = if t.active { pa } else { pt };
        if t.value > have as f64 {
            return Err(Error::Budget(format!(
                "target {:?} asks for {:.4e} parameters, more than the parent's {have}",
                t.name, t.value
            )));
        }
    }
    if !(2..=crate::model::UBATCH).contains(&a.solve_seq) {
        return Err(Error::Input(format!(
            "--solve-seq {} must be within 2..={}",
            a.solve_seq,
            crate::model::UBATCH
        )));
    }
    let axes = a.axes.clone().unwrap_or_else(solver::Knob::widths);
    let sorted = imp.permuted(&map);
    let convert = a.dtype.as_deref().map(parse_float_dtype).transpose()?;
    // Quantized matrices are re-quantized after re-ordering unless --dtype says otherwise.
    let requant = convert.is_none() && m.matrices().iter().any(|t| t.dtype.is_quantized());
    let lossy = requant || convert.is_some_and(|c| c != crate::tensor::DType::F32);
    let measured = match a.objective.as_str() {
        "logits" => true,
        "mass" => false,
        other => {
            return Err(Error::Input(format!(
                "--objective {other:?}: use logits or mass"
            )));
        }
    };
    let calib = if a.calib.is_empty() && measured {
        recorded_calib(&imp, &a.importance)?
    } else {
        a.calib.clone()
    };
    // Calibration sequences (when given) drive the measured search and the function check;
    // otherwise fixed pseudo-random probes check the function.
    let cal_seqs = if calib.is_empty() {
        None
    } else {
        let tok = crate::generate::tokenizer::Tokenizer::for_model(m)?;
        let ids = crate::data::tokenize_all(&tok, &crate::data::read_texts(&calib)?)?;
        let bos = if tok.add_bos { tok.bos } else { None };
        Some(crate::elastic::importance::samples(
            &ids,
            a.solve_samples,
            a.solve_seq,
            bos,
        )?)
    };
    // Re-quantized matrices minimise the error weighted by their inputs' moments on that text.
    let quantizes = requant || convert.is_some_and(|c| c.is_quantized());
    let imx = match &cal_seqs {
        Some(s) if quantizes => Some(crate::elastic::imatrix::collect(m, s)?),
        _ => None,
    };
    let pb = Progress::new("elastify", a.json);
    let probes = cal_seqs
        .clone()
        .unwrap_or_else(|| probe_tokens(m.vocab, 3, 32));
    let diff = std::cell::Cell::new(crate::elastic::LogitDiff::default());
    // The re-ordered parent must compute the same function: checked before the output is kept.
    // Exactly for float outputs; a re-quantized one (or --dtype f16/bf16) only has to be sane,
    // and its measured change is reported.
    let check = |p: &std::path::Path| -> Result<()> {
        pb.stage("check", 0, Unit::Count(""));
        let new = crate::models::load(p)?;
        let d = logit_diff(m, &m.full_budget(), &new, &new.full_budget(), &probes)?;
        diff.set(d);
        pb.finish();
        let broken = if lossy {
            !d.max_rel.is_finite() || d.rms_rel > LOSSY_RMS || d.top1 < LOSSY_TOP1
        } else {
            d.max_rel > 1e-4
        };
        if broken {
            return Err(Error::Input(format!(
                "the re-ordered model's logits differ from the original by {:.2e} of the largest logit (RMS {:.2e} of the logits' RMS, same top token at {:.0}% of positions; limit {}); nothing written",
                d.max_rel,
                d.rms_rel,
                100.0 * d.top1,
                if lossy {
                    format!("RMS {LOSSY_RMS}, top token {:.0}%", 100.0 * LOSSY_TOP1)
                } else {
                    "1e-4 of the largest logit".into()
                }
            )));
        }
        Ok(())
    };
    if a.out.exists() && !a.force {
        return Err(Error::Input(format!(
            "{} exists (use --force to replace it)",
            a.out.display()
        )));
    }
    let solve_secs = std::cell::Cell::new(0f64);
    let (w, manifest) = if !measured {
        let manifest = solver::solve(m, &sorted, &targets, &axes, solver::Objective::Mass, &pb)?;
        let out = rewrite::Output {
            values: None,
            path: &a.out,
            convert,
            manifest: Some(&manifest),
            force: a.force,
            progress: &pb,
            check: Some(&check),
            format: None,
            imatrix: imx.as_ref(),
            quant: None,
        };
        (rewrite::write(&ck, &map, &out)?, manifest)
    } else {
        // The measured search runs budgets on the re-ordered model: write it first (checked),
        // solve on it, then write the final checkpoint with its manifest.
        let stage = crate::formats::temp::Temp::stage(&a.out)?;
        let result = (|| -> crate::Result<_> {
            let first = rewrite::Output {
                values: None,
                path: &stage,
                convert,
                manifest: None,
                force: true,
                progress: &pb,
                check: Some(&check),
                format: None,
                imatrix: imx.as_ref(),
                quant: None,
            };
            rewrite::write(&ck, &map, &first)?;
            let staged = crate::models::open(&stage)?;
            let seqs = cal_seqs.clone().expect("calibration given");
            let t0 = std::time::Instant::now();
            let manifest = solver::solve(
                &staged.model,
                &sorted,
                &targets,
                &axes,
                solver::Objective::Logits(seqs),
                &pb,
            )?;
            solve_secs.set(t0.elapsed().as_secs_f64());
            let identity = IndexMap::identity(&staged.model.shape);
            let last = rewrite::Output {
                values: None,
                path: &a.out,
                convert: None,
                manifest: Some(&manifest),
                force: a.force,
                progress: &pb,
                check: None,
                format: None,
                imatrix: None,
                quant: None,
            };
            Ok((rewrite::write(&staged, &identity, &last)?, manifest))
        })();
        drop(stage);
        result?
    };
    let out = crate::models::load(&a.out)?;
    let mut budgets = vec![];
    for nb in &manifest.budgets {
        let b = out.budget(&nb.name)?;
        let (t, act) = out.params(&b);
        budgets.push(serde_json::json!({"name": nb.name, "spec": nb.spec, "target": nb.target, "params_total": t, "params_active": act}));
    }
    let report = serde_json::json!({
        "out": a.out.display().to_string(), "order": a.order, "max_logit_diff": diff.get().max_rel,
        "logit_diff": diff.get(), "requantized": requant,
        "objective": a.objective, "calib": calib.iter().map(|p| p.display().to_string()).collect::<Vec<_>>(),
        "solve_seconds": solve_secs.get(),
        "tensors": w.tensors, "bytes": w.bytes, "seconds": w.seconds, "budgets": budgets,
    });
    if a.json {
        println!("{report}");
    } else {
        let d = diff.get();
        eprintln!(
            "wrote {} ({} tensors, {:.1} MiB); re-ordered logits {} the original's: max {:.2e} of the largest logit, RMS {:.2e} of theirs, same top token at {:.1}% of positions",
            a.out.display(),
            w.tensors,
            w.bytes as f64 / (1 << 20) as f64,
            if requant {
                "(re-quantized) against"
            } else {
                "match"
            },
            d.max_rel,
            d.rms_rel,
            100.0 * d.top1
        );
        for b in &budgets {
            eprintln!(
                "  {:<8} {:>8.2}M params {:>8.2}M active  [{}]",
                b["name"].as_str().unwrap(),
                b["params_total"].as_u64().unwrap() as f64 / 1e6,
                b["params_active"].as_u64().unwrap() as f64 / 1e6,
                b["spec"].as_str().unwrap()
            );
        }
    }
    Ok(())
}
