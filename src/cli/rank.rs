use crate::elastic::importance::{DepthMethod, RankOptions, rank, samples};
use crate::error::{Error, Result};
use crate::formats::temp::{self, Temp};
use crate::generate::tokenizer::Tokenizer;
use clap::ValueEnum;
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct Args {
    /// The model to rank (HF folder or .gguf).
    model: PathBuf,
    /// Calibration text: .txt files, or .jsonl with a "text" field per line.
    #[arg(long, required = true, num_args = 1..)]
    calib: Vec<PathBuf>,
    /// Calibration sequences (windows spread evenly over the text).
    #[arg(long, default_value_t = 64, value_parser = super::at_least_one::<usize>)]
    samples: usize,
    /// Tokens per sequence (at most 512).
    #[arg(long, default_value_t = 256)]
    seq: usize,
    /// Rank layers for the depth axis (needed only by budgets that drop layers): `oneshot`
    /// removes each layer alone (one forward per layer), `iterative` removes the least important
    /// layer and re-scores the rest (layers² / 2 forwards).
    #[arg(long, value_enum, default_value_t = Depth::None)]
    depth: Depth,
    /// Sequences used for the depth ranking (at most --samples are used).
    #[arg(long, default_value_t = 2, value_parser = super::at_least_one::<usize>)]
    depth_samples: usize,
    /// Tokens per depth sequence (at least 2; at most --seq are used).
    #[arg(long, default_value_t = 128)]
    depth_seq: usize,
    /// Where to write the importance JSON.
    #[arg(short, long)]
    out: PathBuf,
    /// Also draw the scores per axis (PNG).
    #[arg(long)]
    plot: Option<PathBuf>,
    /// Replace existing outputs.
    #[arg(long)]
    force: bool,
    /// Progress as JSON lines on stderr.
    #[arg(long)]
    json: bool,
}

#[derive(Clone, Copy, PartialEq, clap::ValueEnum)]
enum Depth {
    None,
    Oneshot,
    Iterative,
}

pub fn run(a: Args) -> Result<()> {
    for p in std::iter::once(&a.out).chain(a.plot.iter()) {
        if p.exists() && !a.force {
            return Err(Error::Input(format!(
                "{} exists (use --force to replace it)",
                p.display()
            )));
        }
    }
    if a.seq > crate::model::UBATCH || a.seq < 2 {
        return Err(Error::Input(format!(
            "--seq {} must be within 2..={}",
            a.seq,
            crate::model::UBATCH
        )));
    }
    let depth = match a.depth {
        Depth::None => None,
        Depth::Oneshot => Some(DepthMethod::OneShot),
        Depth::Iterative => Some(DepthMethod::Iterative),
    };
    if a.depth_seq < 2 {
        return Err(Error::Input(format!(
            "--depth-seq {} must be at least 2",
            a.depth_seq
        )));
    }
    // Both outputs go to temporaries, renamed into place together at the end: all or none.
    let out_tmp = Temp::new(&a.out)?;
    let plot_tmp = a.plot.as_deref().map(Temp::with_ext).transpose()?;
    let m = crate::models::load(&a.model)?;
    let tok = Tokenizer::for_model(&m)?;
    let texts = crate::data::read_texts(&a.calib)?;
    let ids = crate::data::tokenize_all(&tok, &texts)?;
    let bos = if tok.add_bos { tok.bos } else { None };
    let cal = samples(&ids, a.samples, a.seq, bos)?;
    // Absolute paths, so that `elastify` finds the same text from another folder.
    let files: Vec<String> = a
        .calib
        .iter()
        .map(|p| std::path::absolute(p).unwrap_or_else(|_| p.clone()))
        .map(|p| p.display().to_string())
        .collect();
    let info = serde_json::json!({
        "files": files,
        "samples": a.samples, "seq": a.seq, "tokens_available": ids.len(),
        "depth": a.depth.to_possible_value().map(|v| v.get_name().to_string()),
        "depth_samples": a.depth_samples, "depth_seq": a.depth_seq,
    });
    let pb = crate::progress::Progress::new("rank", a.json);
    let stage = std::cell::RefCell::new(String::new());
    let imp = rank(
        &m,
        &cal,
        &RankOptions {
            depth,
            depth_samples: a.depth_samples,
            depth_seq: a.depth_seq,
        },
        info,
        |d, t, s| {
            if *stage.borrow() != s {
                pb.stage(s, t as u64, crate::progress::Unit::Count("forwards"));
                *stage.borrow_mut() = s.to_string();
            }
            pb.status(d as u64, t as u64, "");
        },
    )?;
    pb.finish();
    temp::write(&out_tmp, serde_json::to_string_pretty(&imp).unwrap())?;
    if let Some(t) = &plot_tmp {
        // The plotting library creates the file itself.
        let _g = temp::creating();
        crate::elastic::plot::plot(&imp, t)?;
    }
    temp::commit(std::iter::once(out_tmp).chain(plot_tmp))?;
    eprintln!(
        "ranked {} ({} samples x {} tokens{}) -> {}",
        a.model.display(),
        a.samples,
        a.seq,
        match a.depth {
            Depth::None => "",
            Depth::Oneshot => ", depth by one-shot layer removal",
            Depth::Iterative => ", depth by iterative layer removal",
        },
        a.out.display()
    );
    Ok(())
}
