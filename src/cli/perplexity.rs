use super::ModelArgs;
use crate::generate::tokenizer::Tokenizer;
use crate::{Error, Result};
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    m: ModelArgs,
    /// UTF-8 text file.
    #[arg(short, long)]
    file: PathBuf,
    /// Tokens per chunk (llama-perplexity's -c).
    #[arg(short, long, default_value_t = 512)]
    ctx: usize,
    /// Evaluate at most this many chunks.
    #[arg(long)]
    chunks: Option<usize>,
    #[arg(long)]
    json: bool,
}

pub fn run(a: Args) -> Result<()> {
    let (m, b) = super::load(&a.m)?;
    let bytes = std::fs::read(&a.file).map_err(|e| Error::io(&a.file, e))?;
    let text = String::from_utf8(bytes).map_err(|e| {
        Error::format(
            &a.file,
            format!("not UTF-8 text (byte {})", e.utf8_error().valid_up_to()),
        )
    })?;
    let tok = Tokenizer::for_model(&m)?;
    let tokens = tok.encode(&text, true)?;
    let bos = if tok.add_bos { tok.bos } else { None };
    let pb = crate::progress::Progress::new("perplexity", a.json);
    pb.stage("score", 0, crate::progress::Unit::Count("chunks"));
    let r = crate::eval::perplexity(&m, &b, &tokens, a.ctx, bos, a.chunks, |done, total, ppl| {
        pb.status(done as u64, total as u64, format!("ppl {ppl:.4}"));
    })?;
    pb.finish();
    if a.json {
        let mut v = serde_json::to_value(&r).unwrap();
        v["budget"] = b.spec(&m.shape).into();
        let (pt, pa) = m.params(&b);
        v["params_total"] = pt.into();
        v["params_active"] = pa.into();
        println!("{v}");
    } else {
        println!(
            "PPL = {:.4} +/- {:.5}  ({} chunks of {}, {} tokens scored, {:.1}s)",
            r.ppl, r.stderr, r.chunks, r.ctx, r.tokens, r.seconds
        );
    }
    Ok(())
}
