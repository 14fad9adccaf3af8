//! `elastica quantize`: FP8 or NVFP4 post-training quantization of an elastic checkpoint, in
//! NVIDIA ModelOpt's HF layout or llama.cpp's GGUF NVFP4; every budget still slices from it.

use crate::elastic::quantize;
use crate::error::{Error, Result};
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct Args {
    /// The (elastic) checkpoint: an HF folder or a .gguf file, in F32/F16/BF16.
    model: PathBuf,
    /// Target format: fp8 (E4M3, per-tensor scale) or nvfp4 (E2M1, E4M3 scale per 16 values).
    #[arg(long)]
    to: String,
    /// Matrices to keep unquantized: ModelOpt-style globs over module names (the tensor name
    /// without `.weight`), comma-separated; replaces the default (NVIDIA's Nano NVFP4 recipe:
    /// the LM head, attention projections, Mamba in/out projections next to attention).
    #[arg(long, value_delimiter = ',')]
    exclude: Option<Vec<String>>,
    /// Calibration text for the static input scales (`input_scale`).
    #[arg(long, required = true)]
    calib: Vec<PathBuf>,
    /// Calibration sequences.
    #[arg(long, default_value_t = 16)]
    samples: usize,
    /// Tokens per calibration sequence.
    #[arg(long, default_value_t = 256)]
    seq: usize,
    /// Output folder (HF) or file (GGUF); the input's format.
    #[arg(short, long)]
    out: PathBuf,
    /// Replace an existing output.
    #[arg(long)]
    force: bool,
    /// Print one JSON report instead of text.
    #[arg(long)]
    json: bool,
}

pub fn run(a: Args) -> Result<()> {
    let to = quantize::parse_to(&a.to)?;
    if a.samples == 0 || a.seq < 2 {
        return Err(Error::Input(
            "--samples must be at least 1 and --seq at least 2".into(),
        ));
    }
    if a.out.exists() && !a.force {
        return Err(Error::Input(format!(
            "{} exists (use --force to replace it)",
            a.out.display()
        )));
    }
    let ck = crate::models::open(&a.model)?;
    let m = &ck.model;
    let progress = crate::progress::Progress::new("quantize", a.json);
    // Input scales: the largest input of each matrix on the calibration text.
    let tok = crate::generate::tokenizer::Tokenizer::for_model(m)?;
    let ids = crate::data::tokenize_all(&tok, &crate::data::read_texts(&a.calib)?)?;
    let bos = if tok.add_bos { tok.bos } else { None };
    let seqs = crate::elastic::importance::samples(&ids, a.samples, a.seq, bos)?;
    let quantize::Quantized {
        plan,
        written: w,
        budgets,
    } = quantize::write(
        &ck,
        to,
        a.exclude.as_deref(),
        &seqs,
        &a.out,
        a.force,
        &progress,
    )?;
    let quantized: Vec<&String> = plan.tensors.keys().collect();
    let report = serde_json::json!({
        "out": a.out.display().to_string(),
        "to": plan.algo(),
        "quantized": quantized.len(),
        "excluded": plan.excluded,
        "tensors": w.tensors,
        "bytes": w.bytes,
        "seconds": w.seconds,
        "budgets": budgets,
    });
    if a.json {
        println!("{report}");
    } else {
        eprintln!(
            "wrote {} ({} matrices {}, {} kept; {:.1} MiB in {:.2}s; budgets: {})",
            a.out.display(),
            quantized.len(),
            plan.algo(),
            plan.excluded.len(),
            w.bytes as f64 / (1 << 20) as f64,
            w.seconds,
            if budgets.is_empty() {
                "none".into()
            } else {
                budgets.join(", ")
            }
        );
    }
    Ok(())
}
