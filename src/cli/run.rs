use super::ModelArgs;
use crate::generate::chat::{Message, render};
use crate::generate::sampler::SamplerConfig;
use crate::generate::tokenizer::Tokenizer;
use crate::generate::{GenConfig, generate};
use crate::{Cache, Error, Result};
use std::io::Write;

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    m: ModelArgs,
    /// The prompt (or the user message with --chat).
    #[arg(short, long)]
    prompt: String,
    /// Wrap the prompt in the model's chat template.
    #[arg(long)]
    chat: bool,
    /// System message (with --chat).
    #[arg(long)]
    system: Option<String>,
    /// Tokens to generate at most.
    #[arg(short = 'n', long, default_value_t = 128)]
    n: usize,
    /// Sampling temperature (0 = greedy).
    #[arg(long, default_value_t = 0.0)]
    temp: f32,
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Stop when this string is generated (repeatable).
    #[arg(long)]
    stop: Vec<String>,
    /// Keep generating past end-of-sequence tokens.
    #[arg(long)]
    ignore_eos: bool,
    /// Context size (default: the model's, at most 4096).
    #[arg(long)]
    ctx: Option<usize>,
    /// Print one JSON object instead of streaming text.
    #[arg(long)]
    json: bool,
}

pub fn run(a: Args) -> Result<()> {
    let (m, b) = super::load(&a.m)?;
    if !(0.0..=1.0).contains(&a.top_p) || a.temp < 0.0 || !a.temp.is_finite() {
        return Err(Error::Input(
            "--temp must be >= 0 and --top-p within [0, 1]".into(),
        ));
    }
    let tok = Tokenizer::for_model(&m)?;
    let text = if a.chat {
        let tpl = m
            .meta
            .chat_template
            .as_deref()
            .ok_or_else(|| Error::Input("--chat: the model has no chat template".into()))?;
        let mut msgs = vec![];
        if let Some(s) = &a.system {
            msgs.push(Message {
                role: "system".into(),
                content: s.clone(),
            });
        }
        msgs.push(Message {
            role: "user".into(),
            content: a.prompt.clone(),
        });
        let bos = m
            .meta
            .bos
            .and_then(|b| tok.inner.id_to_token(b))
            .unwrap_or_default();
        let eos = m
            .meta
            .eos
            .first()
            .and_then(|&e| tok.inner.id_to_token(e))
            .unwrap_or_default();
        render(tpl, &msgs, true, &bos, &eos)?
    } else {
        a.prompt.clone()
    };
    let prompt = tok.encode(&text, true)?;
    let ctx = a.ctx.unwrap_or(m.meta.context.min(4096));
    let mut cache = Cache::new(&m, ctx);
    let cfg = GenConfig {
        max_tokens: a.n,
        sampler: SamplerConfig {
            temperature: a.temp,
            top_k: a.top_k,
            top_p: a.top_p,
            seed: a.seed,
        },
        stop: a.stop.clone(),
        ignore_eos: a.ignore_eos,
    };
    let mut stdout = std::io::stdout().lock();
    let g = generate(&m, &tok, &b, &mut cache, &prompt, &cfg, |t| {
        if !a.json {
            let _ = stdout.write_all(t.as_bytes());
            let _ = stdout.flush();
        }
    })?;
    if a.json {
        let mut v = serde_json::to_value(&g).unwrap();
        v["budget"] = b.spec(&m.shape).into();
        println!("{v}");
    } else {
        println!();
        eprintln!(
            "[{} prompt tokens at {:.1} tok/s, {} generated at {:.1} tok/s, stop: {:?}, budget {}]",
            g.prompt_tokens,
            g.prompt_tokens as f64 / g.prefill_seconds.max(1e-9),
            g.tokens.len(),
            g.tokens.len().saturating_sub(1) as f64 / g.decode_seconds.max(1e-9),
            g.stop_reason,
            b.spec(&m.shape)
        );
    }
    Ok(())
}
