use super::ModelArgs;
use crate::generate::chat;
use crate::generate::sampler::SamplerConfig;
use crate::generate::tokenizer::Tokenizer;
use crate::generate::{GenConfig, generate};
use crate::generate::{ThinkControl, think};
use crate::runtime::control::{self, BudgetControl, Handoff};
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
    /// A Jinja chat template file to use instead of the model's.
    #[arg(long, value_name = "FILE")]
    chat_template: Option<PathBuf>,
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
    #[command(flatten)]
    spec: super::SpeculateArgs,
    /// Elastic budget control: think at this budget until the model ends its reasoning (the
    /// end-of-thinking marker of its chat template), then answer at --answer-budget.
    #[arg(long, conflicts_with = "speculate")]
    think_budget: Option<String>,
    /// The budget of the answer, after thinking (default: --budget).
    #[arg(long, requires = "think_budget", conflicts_with = "budget")]
    answer_budget: Option<String>,
    /// How the answer budget takes over: `shared` continues on the thinking budget's cache,
    /// `reprefill` recomputes prompt and thinking at the answer budget first.
    #[arg(long, default_value = "shared", requires = "think_budget",
          value_parser = clap::builder::PossibleValuesParser::new(["shared", "reprefill"]))]
    handoff: String,
    /// Thinking tokens at most: then the end-of-thinking marker is forced.
    #[arg(long, value_name = "N", requires = "think_budget", value_parser = thinking_cap)]
    thinking_tokens: Option<usize>,
    /// After the thinking cap, wait up to G tokens for a newline before forcing the marker.
    #[arg(
        long,
        value_name = "G",
        default_value_t = 0,
        requires = "thinking_tokens"
    )]
    think_grace: usize,
    /// The end-of-thinking text (default: the chat template's marker, such as </think>).
    #[arg(long, value_name = "TEXT", requires = "think_budget")]
    think_end: Option<String>,
    /// Print one JSON object instead of streaming text.
    #[arg(long)]
    json: bool,
}

/// A thinking-token cap: at least 1.
fn thinking_cap(s: &str) -> std::result::Result<usize, String> {
    match s.trim().parse::<i64>() {
        Ok(n) if n >= 1 => Ok(n as usize),
        Ok(_) => Err("the thinking-token cap must be at least 1".into()),
        Err(_) => Err("not an integer".into()),
    }
}

pub fn run(a: Args) -> Result<()> {
    let prompt = match (&a.prompt, &a.file) {
        (Some(p), _) => p.clone(),
        (None, Some(f)) => crate::data::read_text(f)?,
        (None, None) => return Err(Error::Input("give --prompt TEXT or --file FILE".into())),
    };
    let template = match &a.chat_template {
        Some(f) => Some(super::chat_template(f)?),
        None => None,
    };
    let (mut m, b) = super::load(&a.m)?;
    if let Some(t) = template {
        m.meta.chat_template = Some(t);
    }
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
        logprobs: None,
    };
    let mut stdout = std::io::stdout().lock();
    let stream = |t: &str| {
        if !a.json {
            let _ = stdout.write_all(t.as_bytes());
            let _ = stdout.flush();
        }
    };
    // Budget control: think at --think-budget, answer at --answer-budget (default --budget).
    let mut controlled = None;
    let budget_control = match &a.think_budget {
        Some(s) => Some(BudgetControl {
            think: m.budget(s)?,
            answer: match &a.answer_budget {
                Some(l) => m.budget(l)?,
                None => b.clone(),
            },
            handoff: a.handoff.parse::<Handoff>()?,
            ctl: ThinkControl {
                end: think::think_end(
                    m.meta.chat_template.as_deref(),
                    &tok,
                    a.think_end.as_deref(),
                )?,
                cap: a.thinking_tokens,
                grace: a.think_grace,
            },
        }),
        None => None,
    };
    let mut spec = None;
    let g = match (&a.spec.speculate, &budget_control) {
        (_, Some(bc)) => {
            let mut cache = Cache::try_new(&m, ctx)?;
            let c = controlled.insert(control::generate(
                &m, &tok, bc, &mut cache, &prompt, &cfg, stream,
            )?);
            c.generation.clone()
        }
        (None, None) => generate(
            &m,
            &tok,
            &b,
            &mut Cache::try_new(&m, ctx)?,
            &prompt,
            &cfg,
            stream,
        )?,
        (Some(d), None) => {
            let s = spec.insert(Speculator::new(&m, m.budget(d)?, &b, a.spec.draft)?);
            let mut cache = Cache {
                seq: SeqState::try_new(&m, ctx, a.spec.draft)?,
                work: Work::try_new(&m, ctx)?,
            };
            speculative::generate(&m, &tok, s, &mut cache, &prompt, &cfg, stream)?
        }
    };
    // With budget control, the budget the sequence ended at (the answer's).
    let b = budget_control.as_ref().map_or(&b, |c| &c.answer);
    if a.json {
        let mut v = serde_json::to_value(&g).unwrap();
        v["budget"] = b.spec(&m.shape).into();
        if let Some(s) = &spec {
            v["speculative"] = s.report(&m.shape);
        }
        if let Some(c) = &controlled {
            v["phases"] = c.phases_json();
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
        if let Some(c) = &controlled {
            eprintln!("[{}]", c.summary());
        }
    }
    Ok(())
}
