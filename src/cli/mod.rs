//! The `elastica` command line: info, run, logits, perplexity, bench. Every command prints a
//! clear error naming the file, tensor or field and exits non-zero on bad input.

mod batched_bench;
mod bench;
mod elastify;
mod gen_data;
mod info;
mod init;
mod logits;
mod perplexity;
mod quantize;
mod rank;
mod run;
mod serve;
mod slice;
mod train;

use crate::{Error, Model, Result};
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
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
    #[arg(short = 't', long, global = true, allow_negative_numbers = true)]
    threads: Option<usize>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(clap::Args, Clone)]
pub struct ModelArgs {
    /// An HF checkpoint folder (config.json + safetensors) or a .gguf file (default: the tiny
    /// elastic reasoning model shipped in models/).
    #[arg(default_value_os_t = default_model())]
    pub model: PathBuf,
    /// Budget: a manifest name, `full`, explicit sizes like `hidden=384,ffn=1024,heads=6,skip=3+7`,
    /// or a target like `0.6` or `params:80e6` (resolved between the manifest's budgets).
    #[arg(short, long, default_value = "full")]
    pub budget: String,
}

/// The weight layout of commands that run budgets (`run`, `serve`, `bench`, `batched-bench`).
#[derive(clap::Args, Clone)]
pub struct LayoutArgs {
    /// Keep the checkpoint's row layout. By default the matrices that the manifest's budgets
    /// (and --panel-budget) cut by columns are re-laid at load in column panels, one per nested
    /// budget, so that each of those budgets reads contiguous bytes; a budget spanning several
    /// panels runs each row through them (f32 rounding differs from the row layout, which
    /// `logits` and `perplexity` always use).
    #[arg(long)]
    pub no_panels: bool,
    /// Also cut the panels at this budget (repeatable): a budget outside the manifest that will
    /// be run, such as an explicit `hidden=...` on a model without a manifest.
    #[arg(long, value_name = "BUDGET", conflicts_with = "no_panels")]
    pub panel_budget: Vec<String>,
}

impl LayoutArgs {
    /// Re-lays `m` in column panels for the manifest's budgets and --panel-budget (see
    /// [`Model::panel`]); nothing with --no-panels. The layout depends on the model and these
    /// flags only, so `run`, `serve` and `bench` compute a budget the same way. Returns the
    /// matrices re-laid.
    pub fn apply(&self, m: &mut Model) -> Result<usize> {
        if self.no_panels {
            return Ok(0);
        }
        let mut budgets = vec![];
        for b in &self.panel_budget {
            let e = |e: Error| Error::Input(format!("--panel-budget {b}: {e}"));
            budgets.push(m.budget(b).map_err(e)?);
        }
        if let Some(mf) = &m.meta.manifest {
            for nb in &mf.budgets {
                let e = |e: Error| Error::Input(format!("manifest budget {:?}: {e}", nb.name));
                budgets.push(m.budget(&nb.name).map_err(e)?);
            }
        }
        if budgets.is_empty() {
            return Ok(0);
        }
        budgets.push(m.full_budget());
        Ok(m.panel(&budgets)?.0)
    }
}

/// Nested self-speculative decoding (`run`, `bench`).
#[derive(clap::Args, Clone)]
pub struct SpeculateArgs {
    /// Nested self-speculative decoding: draft at this budget (nested inside --budget) from the
    /// same weights and cache, verify at --budget. Greedy output is identical to plain decoding.
    #[arg(long)]
    pub speculate: Option<String>,
    /// Draft tokens per round with --speculate (1 to 16).
    #[arg(long, default_value_t = 4, requires = "speculate")]
    pub draft: usize,
}

#[derive(Subcommand)]
enum Cmd {
    /// Architecture, dimensions, parameter counts of the parent and of each manifest budget.
    Info {
        /// An HF checkpoint folder (config.json + safetensors) or a .gguf file (default: the
        /// shipped tiny elastic reasoning model).
        #[arg(default_value_os_t = default_model())]
        model: PathBuf,
        /// Also show what these budgets resolve to: targets such as `0.6` or `params:80e6`
        /// (between the manifest's budgets), names or explicit sizes.
        #[arg(short, long)]
        budget: Vec<String>,
        /// Print one JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Generate text from a prompt.
    Run(run::Args),
    /// An OpenAI-compatible HTTP server for every budget of one loaded model.
    Serve(serve::Args),
    /// Logits for every position of a token sequence.
    Logits(logits::Args),
    /// Perplexity of a text file, scored like llama-perplexity.
    Perplexity(perplexity::Args),
    /// Prompt-processing and generation throughput, like llama-bench.
    Bench(bench::Args),
    /// Aggregate throughput of N sequences at once through the scheduler, like llama-batched-bench.
    BatchedBench(batched_bench::Args),
    /// Rank every component by importance on calibration text.
    Rank(rank::Args),
    /// Re-order a model by importance and write it as an elastic checkpoint with named budgets.
    Elastify(elastify::Args),
    /// Sample self-distillation text from a teacher model (JSONL).
    GenData(gen_data::Args),
    /// Cut a budget out of an elastic checkpoint as a standalone model.
    Slice(slice::Args),
    /// Quantize a checkpoint to FP8 or NVFP4 (ModelOpt layout; budgets still slice).
    Quantize(quantize::Args),
    /// Train every budget at once: learned router + distillation from the frozen parent.
    Train(train::Args),
    /// A new checkpoint with random weights from a config.json, to train from scratch.
    Init(init::Args),
}

/// The command line. Values that look like negative numbers parse as values (`--temp -1`), so
/// each flag's own check refuses them by name instead of clap calling them unknown arguments.
pub fn command() -> clap::Command {
    Cli::command().mut_subcommands(|c| {
        c.mut_args(|a| {
            if a.get_action().takes_values() {
                a.allow_negative_numbers(true)
            } else {
                a
            }
        })
    })
}

pub fn main() -> ExitCode {
    let cli = Cli::from_arg_matches(&command().get_matches()).unwrap_or_else(|e| e.exit());
    // SIGINT/SIGTERM remove the temporaries of unfinished outputs; the server handles them
    // itself (a graceful shutdown that exits 0).
    if !matches!(cli.cmd, Cmd::Serve(_))
        && let Err(e) = crate::formats::temp::remove_on_signals()
    {
        eprintln!("warning: {e}");
    }
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
        Cmd::Info {
            model,
            budget,
            json,
        } => info::run(&model, &budget, json),
        Cmd::Run(a) => run::run(a),
        Cmd::Serve(a) => serve::run(a),
        Cmd::Logits(a) => logits::run(a),
        Cmd::Perplexity(a) => perplexity::run(a),
        Cmd::Bench(a) => bench::run(a),
        Cmd::BatchedBench(a) => batched_bench::run(a),
        Cmd::Slice(a) => slice::run(a),
        Cmd::Quantize(a) => quantize::run(a),
        Cmd::GenData(a) => gen_data::run(a),
        Cmd::Rank(a) => rank::run(a),
        Cmd::Elastify(a) => elastify::run(a),
        Cmd::Train(a) => train::run(a),
        Cmd::Init(a) => init::run(a),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// A chat template file (`--chat-template`).
pub(crate) fn chat_template(f: &std::path::Path) -> Result<String> {
    let t = crate::data::read_text(f)?;
    if t.trim().is_empty() {
        return Err(Error::Input(format!(
            "--chat-template {}: the file is empty",
            f.display()
        )));
    }
    Ok(t)
}

/// The model shipped in the repository (tools/reasoning/reproduce.sh): `models/` under the
/// working directory, else under the source tree this binary was built from.
pub const DEFAULT_MODEL: &str = "models/nemotron-h-elastic-tiny";

fn default_model() -> PathBuf {
    let here = PathBuf::from(DEFAULT_MODEL);
    if here.exists() {
        return here;
    }
    let built = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(DEFAULT_MODEL);
    if built.exists() { built } else { here }
}

pub(crate) fn load(a: &ModelArgs) -> Result<(Model, crate::Budget)> {
    let m = crate::models::load(&a.model)?;
    let b = m.budget(&a.budget)?;
    Ok((m, b))
}

/// Refuses a context (`what`, e.g. "--ctx 9000") above the model's trained one unless `force`,
/// which warns instead.
pub(crate) fn check_ctx(m: &Model, what: &str, ctx: usize, force: bool) -> Result<()> {
    let trained = m.meta.context;
    if ctx <= trained {
        return Ok(());
    }
    if !force {
        return Err(Error::Input(format!(
            "{what} exceeds the model's trained context of {trained} tokens (--force-ctx allows it)"
        )));
    }
    eprintln!(
        "warning: {what} exceeds the model's trained context of {trained} tokens; output past it may degrade"
    );
    Ok(())
}

// Value parsers: each refuses out-of-range values with the flag named by clap.

fn float(s: &str) -> std::result::Result<f64, String> {
    let v: f64 = s.trim().parse().map_err(|_| "not a number".to_string())?;
    if !v.is_finite() {
        return Err("must be a finite number".into());
    }
    Ok(v)
}

/// A finite number >= 0.
pub(crate) fn non_negative(s: &str) -> std::result::Result<f64, String> {
    let v = float(s)?;
    if v < 0.0 {
        return Err("must be >= 0".into());
    }
    Ok(v)
}

/// A finite number > 0.
pub(crate) fn positive(s: &str) -> std::result::Result<f64, String> {
    let v = float(s)?;
    if v <= 0.0 {
        return Err("must be > 0".into());
    }
    Ok(v)
}

/// A number within [0, 1].
pub(crate) fn unit(s: &str) -> std::result::Result<f64, String> {
    let v = float(s)?;
    if !(0.0..=1.0).contains(&v) {
        return Err("must be within [0, 1]".into());
    }
    Ok(v)
}

/// A count of at least 1.
pub(crate) fn at_least_one<T: std::str::FromStr + Default + PartialEq>(
    s: &str,
) -> std::result::Result<T, String> {
    let v: T = s
        .trim()
        .parse()
        .map_err(|_| "not a non-negative integer".to_string())?;
    if v == T::default() {
        return Err("must be at least 1".into());
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_argument_has_help() {
        let mut blank = vec![];
        for sub in super::command().get_subcommands() {
            for a in sub.get_arguments() {
                let id = a.get_id().as_str();
                if id != "help" && a.get_help().is_none() {
                    blank.push(format!("{} {id}", sub.get_name()));
                }
            }
        }
        assert!(blank.is_empty(), "arguments without --help text: {blank:?}");
    }
}
