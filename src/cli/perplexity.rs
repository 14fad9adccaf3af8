use super::ModelArgs;
use crate::Result;
use crate::generate::tokenizer::Tokenizer;
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    m: ModelArgs,
    /// UTF-8 text file.
    #[arg(short, long)]
    file: PathBuf,
    /// Tokens per chunk (llama-perplexity's -c; at least 3) [default: 512, or the model's trained
    /// context if smaller].
    #[arg(short, long)]
    ctx: Option<usize>,
    /// Allow a --ctx above the model's trained context (with a warning).
    #[arg(long)]
    force_ctx: bool,
    /// Evaluate at most this many chunks.
    #[arg(long, value_parser = super::at_least_one::<usize>)]
    chunks: Option<usize>,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

pub fn run(a: Args) -> Result<()> {
    let (m, b) = super::load(&a.m)?;
    let ctx = a.ctx.unwrap_or(m.meta.context.min(512));
    super::check_ctx(&m, &format!("--ctx {ctx}"), ctx, a.force_ctx)?;
    let text = crate::data::read_text(&a.file)?;
    let tok = Tokenizer::for_model(&m)?;
    let tokens = tok.encode(&text, true)?;
    let bos = if tok.add_bos { tok.bos } else { None };
    let pb = crate::progress::Progress::new("perplexity", a.json);
    pb.stage("score", 0, crate::progress::Unit::Count("chunks"));
    let r = crate::eval::perplexity(&m, &b, &tokens, ctx, bos, a.chunks, |done, total, ppl| {
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
