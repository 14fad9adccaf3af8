use crate::elastic::{IndexMap, parse_float_dtype, rewrite};
use crate::error::{Error, Result};
use crate::model::Format;
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct Args {
    /// The elastic checkpoint (HF folder or .gguf).
    model: PathBuf,
    /// Budget to cut out: a manifest name or an explicit spec.
    #[arg(short, long)]
    budget: String,
    /// Output folder (HF) or file (GGUF).
    #[arg(short, long)]
    out: PathBuf,
    /// Output format: the input's (hf for folders, gguf for files).
    #[arg(long)]
    format: Option<String>,
    /// Convert every matrix to this float format (f32, bf16, f16); default keeps the input's.
    #[arg(long)]
    dtype: Option<String>,
    /// Check the slice's logits against the budget view of the parent.
    #[arg(long)]
    verify: bool,
    /// Replace an existing output.
    #[arg(long)]
    force: bool,
    /// Print one JSON report instead of text.
    #[arg(long)]
    json: bool,
}

pub fn run(a: Args) -> Result<()> {
    let ck = crate::models::open(&a.model)?;
    let m = &ck.model;
    let format = match a.format.as_deref() {
        None => None,
        Some("hf") => Some(Format::Hf),
        Some("gguf") => Some(Format::Gguf),
        Some(other) => return Err(Error::Input(format!("--format {other:?}: use hf or gguf"))),
    };
    let convert = a.dtype.as_deref().map(parse_float_dtype).transpose()?;
    let b = m.budget(&a.budget)?;
    let map = IndexMap::from_budget(&m.shape, &b);
    // --verify runs on the finished temporary: a slice that fails it is not kept.
    let tol = if convert.is_some_and(|c| c != crate::tensor::DType::F32) {
        3e-2
    } else {
        1e-4
    };
    let diff = std::cell::Cell::new(None);
    let verify = |p: &std::path::Path| -> Result<()> {
        let d = crate::elastic::verify_slice(m, &b, p)?;
        diff.set(Some(d));
        if d > tol {
            return Err(Error::Input(format!(
                "--verify: the slice's logits differ from the budget view by {d:.2e} (relative to the largest logit; limit {tol:.0e}); nothing written"
            )));
        }
        Ok(())
    };
    let w = rewrite::write(
        &ck,
        &map,
        &rewrite::Output {
            values: None,
            path: &a.out,
            convert,
            // The full budget cuts nothing: the copy (another format or float type) is the same
            // elastic checkpoint, so its budgets stay; any smaller budget is a standalone model.
            manifest: if b.spec(&m.shape) == m.full_budget().spec(&m.shape) {
                m.meta.manifest.as_ref()
            } else {
                None
            },
            force: a.force,
            progress: &crate::progress::Progress::new("slice", a.json),
            check: if a.verify { Some(&verify) } else { None },
            format,
            imatrix: None,
            quant: None,
        },
    )?;
    let mut report = serde_json::json!({
        "out": a.out.display().to_string(),
        "budget": b.spec(&m.shape),
        "tensors": w.tensors,
        "bytes": w.bytes,
        "seconds": w.seconds,
        "gb_per_s": w.bytes as f64 / w.seconds.max(1e-9) / 1e9,
    });
    if let Some(d) = diff.get() {
        report["verify_max_rel_diff"] = d.into();
    }
    if a.json {
        println!("{report}");
    } else {
        eprintln!(
            "wrote {} ({} tensors, {:.1} MiB in {:.2}s, {:.2} GB/s) [{}]{}",
            a.out.display(),
            w.tensors,
            w.bytes as f64 / (1 << 20) as f64,
            w.seconds,
            report["gb_per_s"].as_f64().unwrap(),
            report["budget"].as_str().unwrap(),
            report
                .get("verify_max_rel_diff")
                .map_or(String::new(), |d| format!(
                    "; verified, max diff {:.2e}",
                    d.as_f64().unwrap()
                ))
        );
    }
    Ok(())
}
