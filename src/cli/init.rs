//! `elastica init`: a new checkpoint with random weights, to train from scratch
//! (`elastica train --objective lm`).

use crate::error::{Error, Result};
use crate::formats::OutTensor;
use crate::formats::temp::{self, Temp};
use crate::rng::Rng;
use crate::tensor::DType;
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct Args {
    /// The model's config.json (architecture and sizes; `initializer_range` and Mamba's
    /// `time_step_*` set the initial values).
    #[arg(long)]
    pub config: PathBuf,
    /// Folder with tokenizer.json (and tokenizer_config.json, chat_template.jinja,
    /// generation_config.json when present), copied beside the weights.
    #[arg(long)]
    pub tokenizer: PathBuf,
    /// Output folder (HF layout).
    #[arg(short, long)]
    pub out: PathBuf,
    /// Seed of the initial values.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Replace an existing output.
    #[arg(long)]
    pub force: bool,
}

pub fn run(a: Args) -> Result<()> {
    if a.out.exists() && !a.force {
        return Err(Error::Input(format!(
            "{} exists (use --force to replace it)",
            a.out.display()
        )));
    }
    let (cfg, layout) = crate::models::layout(&a.config)?;
    let tj = a.tokenizer.join("tokenizer.json");
    if !tj.exists() {
        return Err(Error::Tokenizer(format!("{} is missing", tj.display())));
    }
    if let Some(p) = a.out.parent().filter(|p| !p.as_os_str().is_empty()) {
        temp::create_dir_all(p)?;
    }
    let dir = Temp::new(&a.out)?;
    temp::create_dir_all(&dir)?;
    let tensors: Vec<OutTensor> = layout
        .iter()
        .map(|t| OutTensor::new(t.name.clone(), DType::F32, t.shape.clone()))
        .collect();
    // One stream per tensor, so a tensor's values do not depend on the ones before it.
    crate::formats::safetensors::write(&dir.join("model.safetensors"), &tensors, |i| {
        let mut rng = Rng::new(a.seed ^ (i as u64 + 1).wrapping_mul(0x2545_F491_4F6C_DD1D));
        Ok(layout[i]
            .values(&mut rng)
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect())
    })?;
    let text = serde_json::to_string_pretty(&cfg).unwrap();
    temp::write(&dir.join("config.json"), text)?;
    for f in [
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
        "generation_config.json",
    ] {
        let src = a.tokenizer.join(f);
        if src.exists() {
            let b = std::fs::read(&src).map_err(|e| Error::io(&src, e))?;
            temp::write(&dir.join(f), b)?;
        }
    }
    // The new checkpoint loads: every tensor the architecture reads is there, shaped right.
    let m = crate::models::load(&dir)?;
    let params = m.params(&m.full_budget()).0;
    let tok = crate::generate::tokenizer::Tokenizer::for_model(&m)?;
    let need = tok.inner.get_vocab_size(true);
    if need > m.vocab {
        return Err(Error::config(
            format!("{}: vocab_size", a.config.display()),
            format!(
                "{} is smaller than the tokenizer's {need} tokens ({})",
                m.vocab,
                tj.display()
            ),
        ));
    }
    temp::commit([dir])?;
    println!(
        "{}",
        serde_json::json!({
            "model": a.out,
            "arch": m.meta.arch,
            "params": params,
            "tensors": layout.len(),
            "seed": a.seed,
        })
    );
    Ok(())
}
