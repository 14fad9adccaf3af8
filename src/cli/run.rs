use super::ModelArgs;
use crate::generate::chat;
use crate::generate::sampler::SamplerConfig;
use crate::generate::tokenizer::Tokenizer;
use crate::generate::{GenConfig, generate};
use crate::runtime::speculative::{self, Speculator};
use crate::{Cache, Error, Result, SeqState, Work};
use std::io::Write;
use std::path::PathBuf;

#[derive(clap::Args)]
#[command(group(clap::ArgGroup::new("input").required(true).args(["prompt", "file"])))]
pub struct Args {
    #[command(flatten)]
    m: ModelArgs,
    /// The prompt (or the user message with --chat).
    #[arg(short, long)]
    prompt: Option<String>,
    /// Read the prompt (or the user message with --chat) from this UTF-8 file.
    #[arg(short, long)]
    file: Option<PathBuf>,
    /// Wrap the prompt in the model's chat template.
    #[arg(long)]
    chat: bool,
    /// System message (with --chat).
    #[arg(long)]
    system: Option<String>,
    /// Tokens to generate at most (0 = only process the prompt).
    #[arg(short = 'n', long, default_value_t = 128)]
    n: usize,
    /// Sampling temperature (0 = greedy).
    #[arg(long, default_value_t = 0.0, value_parser = super::non_negative)]
    temp: f64,
    /// Sample only among the K most likely tokens (0 = all).
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    /// Sample only from the smallest set of tokens whose probability reaches P (1 = all).
    #[arg(long, default_value_t = 1.0, value_parser = super::unit)]
    top_p: f64,
    /// Random seed of the sampler.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Stop when this string is generated (repeatable).
    #[arg(long)]
    stop: Vec<String>,
    /// Keep generating past end-of-sequence tokens.
    #[arg(long)]
    ignore_eos: bool,
    /// Context size (default: the model's, at most 4096).
    #[arg(long, value_parser = super::at_least_one::<usize>)]
    ctx: Option<usize>,
    /// Allow a --ctx above the model's trained context (with a warning).
    #[arg(long)]
    force_ctx: bool,
    /// Nested self-speculative decoding: draft at this budget (nested inside --budget) from the
    /// same weights and cache, verify at --budget. Greedy output is identical to plain decoding.
    #[arg(long)]
    speculate: Option<String>,
    /// Draft tokens per round with --speculate (1 to 16).
    #[arg(long, default_value_t = 4, requires = "speculate")]
    draft: usize,
    /// Print one JSON object instead of streaming text.
    #[arg(long)]
    json: bool,
}

pub fn run(a: Args) -> Result<()> {
    let prompt = match (&a.prompt, &a.file) {
        (Some(p), _) => p.clone(),
        (None, Some(f)) => crate::data::read_text(f)?,
        (None, None) => return Err(Error::Input("give --prompt TEXT or --file FILE".into())),
    };
    let (m, b) = super::load(&a.m)?;
    let ctx = a.ctx.unwrap_or(m.meta.context.min(4096));
    super::check_ctx(&m, &format!("--ctx {ctx}"), ctx, a.force_ctx)?;
    let tok = Tokenizer::for_model(&m)?;
    let prompt = if a.chat {
        chat::prompt(
            m.meta.chat_template.as_deref(),
            &tok,
            a.system.as_deref(),
            &prompt,
        )?
    } else {
        tok.encode(&prompt, true)?
    };
    let cfg = GenConfig {
        max_tokens: a.n,
        sampler: SamplerConfig {
            temperature: a.temp as f32,
            top_k: a.top_k,
            top_p: a.top_p as f32,
            seed: a.seed,
        },
        stop: a.stop.clone(),
        ignore_eos: a.ignore_eos,
    };
    let mut stdout = std::io::stdout().lock();
    let stream = |t: &str| {
        if !a.json {
            let _ = stdout.write_all(t.as_bytes());
            let _ = stdout.flush();
        }
    };
    let mut spec = None;
    let g = match &a.speculate {
        None => generate(
            &m,
            &tok,
            &b,
            &mut Cache::try_new(&m, ctx)?,
            &prompt,
            &cfg,
            stream,
        )?,
        Some(d) => {
            let s = spec.insert(Speculator::new(&m, m.budget(d)?, &b, a.draft)?);
            let mut cache = Cache {
                seq: SeqState::try_new(&m, ctx, a.draft)?,
                work: Work::try_new(&m, ctx)?,
            };
            speculative::generate(&m, &tok, s, &mut cache, &prompt, &cfg, stream)?
        }
    };
    if a.json {
        let mut v = serde_json::to_value(&g).unwrap();
        v["budget"] = b.spec(&m.shape).into();
        if let Some(s) = &spec {
            v["speculative"] = s.report(&m.shape);
        }
        println!("{v}");
    } else {
        println!();
        eprintln!(
            "[{} prompt tokens at {:.1} tok/s, {} generated at {:.1} tok/s, stop: {}, budget {}]",
            g.prompt_tokens,
            g.prompt_tokens as f64 / g.prefill_seconds.max(1e-9),
            g.tokens.len(),
            g.tokens.len().saturating_sub(1) as f64 / g.decode_seconds.max(1e-9),
            g.stop_reason.describe(),
            b.spec(&m.shape)
        );
        if let Some(s) = &spec {
            eprintln!("[{}]", s.summary(&m.shape));
        }
    }
    Ok(())
}
