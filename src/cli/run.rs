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
#[command(group(clap::ArgGroup::new("input").required(true).args(["prompt", "file", "prompts"])))]
pub struct Args {
    #[command(flatten)]
    m: ModelArgs,
    #[command(flatten)]
    layout: super::LayoutArgs,
    /// The prompt (or the user message with --chat).
    #[arg(short, long)]
    prompt: Option<String>,
    /// Read the prompt (or the user message with --chat) from this UTF-8 file.
    #[arg(short, long)]
    file: Option<PathBuf>,
    /// Many prompts, one model load: a JSONL file with one object per line, {"prompt": TEXT}
    /// and optionally "id" and "system"; prints one JSON line per prompt (implies --json).
    #[arg(long, value_name = "FILE.jsonl")]
    prompts: Option<PathBuf>,
    /// Wrap the prompt in the model's chat template.
    #[arg(long)]
    chat: bool,
    /// With --chat: render the template with `enable_thinking` false (a reasoning model then
    /// answers without thinking).
    #[arg(long, requires = "chat")]
    no_thinking: bool,
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

/// One prompt of a run: its id (with --prompts), system message and text.
struct Prompt {
    id: Option<serde_json::Value>,
    system: Option<String>,
    text: String,
}

/// The prompts of --prompts FILE.jsonl.
fn read_prompts(f: &std::path::Path) -> Result<Vec<Prompt>> {
    let text = crate::data::read_text(f)?;
    let mut out = vec![];
    for (i, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let at = format!("{}:{}", f.display(), i + 1);
        let v: serde_json::Value =
            serde_json::from_str(line).map_err(|e| Error::Input(format!("{at}: not JSON: {e}")))?;
        let field = |k: &str| -> Result<Option<String>> {
            match v.get(k) {
                None | Some(serde_json::Value::Null) => Ok(None),
                Some(serde_json::Value::String(s)) => Ok(Some(s.clone())),
                Some(x) => Err(Error::Input(format!("{at}: \"{k}\" is {x}, not a string"))),
            }
        };
        let text =
            field("prompt")?.ok_or_else(|| Error::Input(format!("{at}: no \"prompt\" string")))?;
        out.push(Prompt {
            id: v.get("id").cloned(),
            system: field("system")?,
            text,
        });
    }
    if out.is_empty() {
        return Err(Error::Input(format!("{}: no prompts", f.display())));
    }
    Ok(out)
}

pub fn run(a: Args) -> Result<()> {
    let prompts = match (&a.prompt, &a.file, &a.prompts) {
        (Some(p), _, _) => vec![Prompt {
            id: None,
            system: a.system.clone(),
            text: p.clone(),
        }],
        (None, Some(f), _) => vec![Prompt {
            id: None,
            system: a.system.clone(),
            text: crate::data::read_text(f)?,
        }],
        (None, None, Some(f)) => read_prompts(f)?,
        _ => {
            return Err(Error::Input(
                "give --prompt TEXT, --file FILE or --prompts FILE.jsonl".into(),
            ));
        }
    };
    let json = a.json || a.prompts.is_some();
    let template = match &a.chat_template {
        Some(f) => Some(super::chat_template(f)?),
        None => None,
    };
    let (mut m, b) = super::load(&a.m)?;
    a.layout.apply(&mut m)?;
    if let Some(t) = template {
        m.meta.chat_template = Some(t);
    }
    let ctx = a.ctx.unwrap_or(m.meta.context.min(4096));
    super::check_ctx(&m, &format!("--ctx {ctx}"), ctx, a.force_ctx)?;
    let tok = Tokenizer::for_model(&m)?;
    let mut kwargs = serde_json::Map::new();
    if a.no_thinking {
        kwargs.insert("enable_thinking".into(), false.into());
    }
    let encode = |p: &Prompt| -> Result<Vec<u32>> {
        if a.chat {
            let text = chat::prompt_text_with(
                m.meta.chat_template.as_deref(),
                &tok,
                p.system.as_deref(),
                &p.text,
                &kwargs,
            )?;
            chat::encode(&tok, &text)
        } else {
            tok.encode(&p.text, true)
        }
    };
    // Every prompt is checked before the first is run.
    let encoded: Vec<Vec<u32>> = prompts.iter().map(&encode).collect::<Result<_>>()?;
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
    let mut stream = |t: &str| {
        if !json {
            let _ = stdout.write_all(t.as_bytes());
            let _ = stdout.flush();
        }
    };
    // Budget control: think at --think-budget, answer at --answer-budget (default --budget).
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
    for (p, prompt) in prompts.iter().zip(&encoded) {
        let t0 = std::time::Instant::now();
        let mut controlled = None;
        let mut spec = None;
        let g = match (&a.spec.speculate, &budget_control) {
            (_, Some(bc)) => {
                let mut cache = Cache::try_new(&m, ctx)?;
                let c = controlled.insert(control::generate(
                    &m,
                    &tok,
                    bc,
                    &mut cache,
                    prompt,
                    &cfg,
                    &mut stream,
                )?);
                c.generation.clone()
            }
            (None, None) => generate(
                &m,
                &tok,
                &b,
                &mut Cache::try_new(&m, ctx)?,
                prompt,
                &cfg,
                &mut stream,
            )?,
            (Some(d), None) => {
                let s = spec.insert(Speculator::new(&m, m.budget(d)?, &b, a.spec.draft)?);
                let mut cache = Cache {
                    seq: SeqState::try_new(&m, ctx, a.spec.draft)?,
                    work: Work::try_new(&m, ctx)?,
                };
                speculative::generate(&m, &tok, s, &mut cache, prompt, &cfg, &mut stream)?
            }
        };
        // With budget control, the budget the sequence ended at (the answer's).
        let ended = budget_control.as_ref().map_or(&b, |c| &c.answer);
        if json {
            let mut v = serde_json::to_value(&g).unwrap();
            if let Some(id) = &p.id {
                v["id"] = id.clone();
            }
            v["budget"] = ended.spec(&m.shape).into();
            v["seconds"] = t0.elapsed().as_secs_f64().into();
            if let Some(s) = &spec {
                v["speculative"] = s.report(&m.shape);
            }
            if let Some(c) = &controlled {
                v["phases"] = c.phases_json();
            }
            // A closed pipe (`| head`) ends the run quietly.
            if let Err(e) = writeln!(std::io::stdout(), "{v}") {
                if e.kind() == std::io::ErrorKind::BrokenPipe {
                    return Ok(());
                }
                return Err(Error::io("stdout", e));
            }
        } else {
            println!();
            eprintln!(
                "[{} prompt tokens at {:.1} tok/s, {} generated at {:.1} tok/s, stop: {}, budget {}]",
                g.prompt_tokens,
                g.prompt_tokens as f64 / g.prefill_seconds.max(1e-9),
                g.tokens.len(),
                g.tokens.len().saturating_sub(1) as f64 / g.decode_seconds.max(1e-9),
                g.stop_reason.describe(),
                ended.spec(&m.shape)
            );
            if let Some(s) = &spec {
                eprintln!("[{}]", s.summary(&m.shape));
            }
            if let Some(c) = &controlled {
                eprintln!("[{}]", c.summary());
            }
        }
    }
    Ok(())
}
