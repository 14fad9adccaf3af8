use super::ModelArgs;
use crate::generate::tokenizer::Tokenizer;
use crate::{Cache, Error, Logits, Result};

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    m: ModelArgs,
    /// Comma-separated token ids.
    #[arg(long, conflicts_with = "prompt")]
    tokens: Option<String>,
    /// Text to tokenize instead of --tokens.
    #[arg(short, long)]
    prompt: Option<String>,
    /// Print {"tokens": [...], "logits": [[...] per position]}.
    #[arg(long)]
    json: bool,
    /// Allow more tokens than the model's trained context (with a warning).
    #[arg(long)]
    force_ctx: bool,
}

pub fn run(a: Args) -> Result<()> {
    let (m, b) = super::load(&a.m)?;
    let tokens: Vec<u32> = match (&a.tokens, &a.prompt) {
        (Some(t), _) => t
            .split(',')
            .map(|x| {
                x.trim()
                    .parse::<u32>()
                    .map_err(|_| Error::Input(format!("--tokens: {x:?} is not a token id")))
            })
            .collect::<Result<_>>()?,
        (None, Some(p)) => Tokenizer::for_model(&m)?.encode(p, true)?,
        (None, None) => return Err(Error::Input("give --tokens 1,2,3 or --prompt TEXT".into())),
    };
    if tokens.is_empty() {
        return Err(Error::Input("no tokens given".into()));
    }
    super::check_ctx(
        &m,
        &format!("the input of {} tokens", tokens.len()),
        tokens.len(),
        a.force_ctx,
    )?;
    let mut cache = Cache::try_new(&m, tokens.len())?;
    let logits = m.forward(&tokens, &b, &mut cache, Logits::All)?;
    if a.json {
        use std::io::Write;
        let mut out = std::io::BufWriter::new(std::io::stdout().lock());
        write!(
            out,
            "{{\"tokens\":{},\"logits\":[",
            serde_json::to_string(&tokens).unwrap()
        )
        .ok();
        for (i, row) in logits.chunks(m.vocab).enumerate() {
            if i > 0 {
                write!(out, ",").ok();
            }
            write!(out, "[").ok();
            for (j, v) in row.iter().enumerate() {
                if j > 0 {
                    write!(out, ",").ok();
                }
                if v.is_finite() {
                    write!(out, "{v}")
                } else {
                    write!(out, "null")
                }
                .ok();
            }
            write!(out, "]").ok();
        }
        writeln!(out, "]}}").ok();
        return Ok(());
    }
    for (i, row) in logits.chunks(m.vocab).enumerate() {
        let mut idx: Vec<usize> = (0..row.len()).collect();
        idx.sort_by(|&x, &y| row[y].total_cmp(&row[x]));
        let top: Vec<String> = idx[..5.min(idx.len())]
            .iter()
            .map(|&j| format!("{j}:{:.3}", row[j]))
            .collect();
        println!("pos {i:4} token {:6}  top {}", tokens[i], top.join(" "));
    }
    Ok(())
}
