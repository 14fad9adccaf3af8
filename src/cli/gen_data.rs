use crate::error::{Error, Result};
use crate::generate::chat::{Message, render};
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
    #[arg(short = 'n', long, default_value_t = 16)]
    samples: usize,
    /// Tokens per sample at most.
    #[arg(long, default_value_t = 256)]
    max_tokens: usize,
    #[arg(long, default_value_t = 0.8)]
    temp: f32,
    #[arg(long, default_value_t = 0.95)]
    top_p: f32,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Wrap prompts in the chat template (the text is then the assistant's answer).
    #[arg(long)]
    chat: bool,
    #[arg(short, long)]
    out: PathBuf,
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
    if !(a.temp >= 0.0 && a.temp.is_finite() && (0.0..=1.0).contains(&a.top_p)) {
        return Err(Error::Input(
            "--temp must be >= 0 and --top-p within [0, 1]".into(),
        ));
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
    let m = crate::models::load(&a.model)?;
    let tok = Tokenizer::for_model(&m)?;
    let b = m.full_budget();
    let mut cache = Cache::new(&m, m.meta.context.min(4096));
    let tmp = crate::formats::temp_path(&a.out);
    let result = (|| -> Result<()> {
        let f = std::fs::File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
        let mut w = std::io::BufWriter::new(f);
        let pb = crate::progress::Progress::new("gen-data", false);
        pb.stage(
            "sample",
            a.samples as u64,
            crate::progress::Unit::Count("samples"),
        );
        for i in 0..a.samples {
            let p = &prompts[i % prompts.len()];
            let text = if a.chat {
                let tpl =
                    m.meta.chat_template.as_deref().ok_or_else(|| {
                        Error::Input("--chat: the model has no chat template".into())
                    })?;
                let bos = m
                    .meta
                    .bos
                    .and_then(|x| tok.inner.id_to_token(x))
                    .unwrap_or_default();
                render(
                    tpl,
                    &[Message {
                        role: "user".into(),
                        content: p.clone(),
                    }],
                    true,
                    &bos,
                    "",
                )?
            } else {
                p.clone()
            };
            let ids = tok.encode(&text, true)?;
            cache.reset();
            let cfg = GenConfig {
                max_tokens: a.max_tokens,
                sampler: SamplerConfig {
                    temperature: a.temp,
                    top_k: 0,
                    top_p: a.top_p,
                    seed: a.seed.wrapping_add(i as u64),
                },
                stop: vec![],
                ignore_eos: false,
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
            .map_err(|e| Error::io(&tmp, e))
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    std::fs::rename(&tmp, &a.out).map_err(|e| Error::io(&a.out, e))?;
    eprintln!("wrote {} samples to {}", a.samples, a.out.display());
    Ok(())
}
