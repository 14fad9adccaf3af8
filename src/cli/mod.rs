//! The `elastica` command line: info, run, logits, perplexity, bench. Every command prints a
//! clear error naming the file, tensor or field and exits non-zero on bad input.

mod bench;
mod elastify;
mod gen_data;
mod info;
mod logits;
mod perplexity;
mod rank;
mod run;
mod slice;
mod train;

use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "elastica",
    version,
    about = "One checkpoint, many models: nested-budget inference for Nemotron-H and Llama"
)]
struct Cli {
    /// Worker threads for the kernels (default: the physical cores; at most the logical CPUs).
    #[arg(short = 't', long, global = true)]
    threads: Option<usize>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(clap::Args, Clone)]
pub struct ModelArgs {
    /// An HF checkpoint folder (config.json + safetensors) or a .gguf file.
    pub model: PathBuf,
    /// Budget: a manifest name, `full`, or explicit sizes like `hidden=384,ffn=1024,heads=6,skip=3+7`.
    #[arg(short, long, default_value = "full")]
    pub budget: String,
}

#[derive(Subcommand)]
enum Cmd {
    /// Architecture, dimensions, parameter counts of the parent and of each manifest budget.
    Info {
        model: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Generate text from a prompt.
    Run(run::Args),
    /// Logits for every position of a token sequence.
    Logits(logits::Args),
    /// Perplexity of a text file, scored like llama-perplexity.
    Perplexity(perplexity::Args),
    /// Prompt-processing and generation throughput, like llama-bench.
    Bench(bench::Args),
    /// Rank every component by importance on calibration text.
    Rank(rank::Args),
    /// Re-order a model by importance and write it as an elastic checkpoint with named budgets.
    Elastify(elastify::Args),
    /// Sample self-distillation text from a teacher model (JSONL).
    GenData(gen_data::Args),
    /// Cut a budget out of an elastic checkpoint as a standalone model.
    Slice(slice::Args),
    /// Train every budget at once: learned router + distillation from the frozen parent.
    Train(train::Args),
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(t) = cli.threads {
        if t == 0 {
            eprintln!("error: --threads must be at least 1");
            return ExitCode::from(2);
        }
        let cpus = crate::kernels::pool::logical_cpus();
        let t = if t > cpus {
            eprintln!(
                "warning: --threads {t} is more than the {cpus} logical CPUs this process may use; using {cpus}"
            );
            cpus
        } else {
            t
        };
        crate::kernels::pool::init(t);
    }
    let r = match cli.cmd {
        Cmd::Info { model, json } => info::run(&model, json),
        Cmd::Run(a) => run::run(a),
        Cmd::Logits(a) => logits::run(a),
        Cmd::Perplexity(a) => perplexity::run(a),
        Cmd::Bench(a) => bench::run(a),
        Cmd::Slice(a) => slice::run(a),
        Cmd::GenData(a) => gen_data::run(a),
        Cmd::Rank(a) => rank::run(a),
        Cmd::Elastify(a) => elastify::run(a),
        Cmd::Train(a) => train::run(a),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

pub(crate) fn load(a: &ModelArgs) -> crate::Result<(crate::Model, crate::Budget)> {
    let m = crate::models::load(&a.model)?;
    let b = m.budget(&a.budget)?;
    Ok((m, b))
}
