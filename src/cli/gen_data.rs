use crate::error::{Error, Result};
use crate::formats::temp::{self, Temp};
use crate::generate::chat;
use crate::generate::sampler::SamplerConfig;
use crate::generate::tokenizer::Tokenizer;
use crate::generate::{GenConfig, generate};
use crate::model::Cache;
use std::io::Write;
use std::path::PathBuf;

/// Self-distillation data: text sampled from the teacher with the engine, written as JSONL
/// (`{"prompt": ..., "text": ...}` per line), the input `train --data` reads.
#[derive(clap::Args)]
pub struct Args {
    /// The teacher (HF folder or .gguf).
    model: PathBuf,
    /// Prompts: a .txt file (one per line) or .jsonl (a "text" field per line).
    #[arg(long)]
    prompts: PathBuf,
    /// Samples to write (prompts are cycled).
    #[arg(short = 'n', long, default_value_t = 16, value_parser = super::at_least_one::<usize>)]
    samples: usize,
    /// Tokens per sample at most.
    #[arg(long, default_value_t = 256, value_parser = super::at_least_one::<usize>)]
    max_tokens: usize,
    /// Sampling temperature (0 = greedy).
    #[arg(long, default_value_t = 0.8, value_parser = super::non_negative)]
    temp: f64,
    /// Sample only from the smallest set of tokens whose probability reaches P (1 = all).
    #[arg(long, default_value_t = 0.95, value_parser = super::unit)]
    top_p: f64,
    /// Random seed (sample i uses seed + i).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Context size per sample, prompt included (default: the model's, at most 4096).
    #[arg(long, value_parser = super::at_least_one::<usize>)]
    ctx: Option<usize>,
    /// Allow a --ctx above the model's trained context (with a warning).
    #[arg(long)]
    force_ctx: bool,
    /// Wrap prompts in the chat template (the text is then the assistant's answer).
    #[arg(long)]
    chat: bool,
    /// Output JSONL file.
    #[arg(short, long)]
    out: PathBuf,
    /// Replace an existing output.
    #[arg(long)]
    force: bool,
}

pub fn run(a: Args) -> Result<()> {
    if a.out.exists() && !a.force {
        return Err(Error::Input(format!(
            "{} exists (use --force to replace it)",
            a.out.display()
        )));
    }
    let prompts: Vec<String> = if a.prompts.extension().is_some_and(|e| e == "jsonl") {
        crate::data::read_texts(std::slice::from_ref(&a.prompts))?
    } else {
        let text = crate::data::read_texts(std::slice::from_ref(&a.prompts))?.remove(0);
        text.lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(String::from)
            .collect()
    };
    let tmp = Temp::new(&a.out)?;
    let m = crate::models::load(&a.model)?;
    let tok = Tokenizer::for_model(&m)?;
    let b = m.full_budget();
    let ctx = a.ctx.unwrap_or(m.meta.context.min(4096));
    super::check_ctx(&m, &format!("--ctx {ctx}"), ctx, a.force_ctx)?;
    let mut cache = Cache::try_new(&m, ctx)?;
    {
        let f = temp::create_file(&tmp)?;
        let mut w = std::io::BufWriter::new(f);
        let pb = crate::progress::Progress::new("gen-data", false);
        pb.stage(
            "sample",
            a.samples as u64,
            crate::progress::Unit::Count("samples"),
        );
        for i in 0..a.samples {
            let p = &prompts[i % prompts.len()];
            let ids = if a.chat {
                chat::prompt(m.meta.chat_template.as_deref(), &tok, None, p)?
            } else {
                tok.encode(p, true)?
            };
            cache.reset();
            let cfg = GenConfig {
                max_tokens: a.max_tokens,
                sampler: SamplerConfig {
                    temperature: a.temp as f32,
                    top_k: 0,
                    top_p: a.top_p as f32,
                    seed: a.seed.wrapping_add(i as u64),
                },
                stop: vec![],
                ignore_eos: false,
                logprobs: None,
            };
            let g = generate(&m, &tok, &b, &mut cache, &ids, &cfg, |_| {})?;
            let full = if a.chat {
                g.text.clone()
            } else {
                format!("{p}{}", g.text)
            };
            let line = serde_json::json!({"prompt": p, "text": full});
            writeln!(w, "{line}").map_err(|e| Error::io(&tmp, e))?;
            pb.inc(1);
        }
        pb.finish();
        w.into_inner()
            .map_err(|e| Error::io(&tmp, e.into_error()))?
            .sync_all()
            .map_err(|e| Error::io(&tmp, e))?;
    }
    temp::commit([tmp])?;
    eprintln!("wrote {} samples to {}", a.samples, a.out.display());
    Ok(())
}
