use super::ModelArgs;
use crate::generate::tokenizer::Tokenizer;
use crate::runtime::scheduler::{EngineConfig, PREFILL_CHUNK};
use crate::runtime::service::ServiceConfig;
use crate::server::{ServerConfig, serve};
use crate::{Error, Result};
use std::path::PathBuf;
use std::time::Duration;

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    m: ModelArgs,
    #[command(flatten)]
    layout: super::LayoutArgs,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Port to listen on (0: any free port; the log line says which).
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// Requests decoded at once (continuous batching); more wait in the queue.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=1024))]
    parallel: u32,
    /// Tokens per request, prompt and output (default: the model's, at most 4096).
    #[arg(long, value_parser = super::at_least_one::<usize>)]
    ctx: Option<usize>,
    /// Allow a --ctx above the model's trained context (with a warning).
    #[arg(long)]
    force_ctx: bool,
    /// Requests that may wait for a slot; more are refused with 503.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    queue: u32,
    /// Require `Authorization: Bearer KEY` on /v1 (default: the ELASTICA_API_KEY variable, if set).
    #[arg(long, env = "ELASTICA_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// The model id clients use (default: the model's file or folder name).
    #[arg(long)]
    alias: Option<String>,
    /// Draft at this nested budget by default (nested self-speculative decoding); a request
    /// may choose another draft or turn it off with its `speculate` field.
    #[arg(long)]
    speculate: Option<String>,
    /// Draft tokens per round at most (1 to 16; requests may ask for fewer).
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=16))]
    draft: u32,
    /// Request bodies above this many bytes are refused with 413.
    #[arg(long, default_value_t = 8 << 20, value_parser = clap::value_parser!(u64).range(64..=1 << 30))]
    max_body: u64,
    /// Output tokens per request at most (default: --ctx).
    #[arg(long, value_parser = super::at_least_one::<usize>)]
    max_tokens: Option<usize>,
    /// Prompt tokens run per engine step over all requests.
    #[arg(long, default_value_t = PREFILL_CHUNK as u32, value_parser = clap::value_parser!(u32).range(1..=65536))]
    prefill_chunk: u32,
    /// A Jinja chat template file to use instead of the model's.
    #[arg(long, value_name = "FILE")]
    chat_template: Option<PathBuf>,
    /// After SIGTERM, seconds in-flight requests may take to finish before they are cancelled.
    #[arg(long, default_value_t = 10.0, value_parser = super::non_negative)]
    shutdown_grace: f64,
    /// No log line per request.
    #[arg(long)]
    quiet: bool,
}

pub fn run(a: Args) -> Result<()> {
    let name = a.alias.clone().unwrap_or_else(|| {
        let p = a.m.model.as_path();
        let stem = if p.is_dir() {
            p.file_name()
        } else {
            p.file_stem()
        };
        stem.map_or("model".into(), |s| s.to_string_lossy().into_owned())
    });
    if name.is_empty() || name.contains(':') {
        return Err(Error::Input(format!(
            "--alias {name:?}: a model id must be non-empty and have no ':' (it separates NAME:BUDGET)"
        )));
    }
    let template = match &a.chat_template {
        Some(f) => Some(super::chat_template(f)?),
        None => None,
    };
    if a.shutdown_grace > 86_400.0 {
        return Err(Error::Input(
            "--shutdown-grace: at most 86400 seconds".into(),
        ));
    }
    // Checked before the port opens: the model file is there.
    if !a.m.model.exists() {
        return Err(Error::Input(format!(
            "{}: no such file or folder",
            a.m.model.display()
        )));
    }
    let (m, force, ctx, max_tokens) = (a.m.clone(), a.force_ctx, a.ctx, a.max_tokens);
    let cfg = ServerConfig {
        host: a.host.clone(),
        port: a.port,
        name,
        budget: a.m.budget.clone(),
        api_key: a.api_key.clone(),
        max_body: a.max_body as usize,
        max_tokens: max_tokens.unwrap_or(usize::MAX),
        service: ServiceConfig {
            engine: EngineConfig {
                parallel: a.parallel as usize,
                ctx: ctx.unwrap_or(0),
                prefill_chunk: a.prefill_chunk as usize,
                draft_max: a.draft as usize,
            },
            queue: a.queue as usize,
        },
        speculate: a.speculate.clone(),
        shutdown_grace: Duration::from_secs_f64(a.shutdown_grace),
        log: !a.quiet,
    };
    let layout = a.layout.clone();
    serve(cfg, move |mut cfg: ServerConfig| {
        let mut model = crate::models::load(&m.model)?;
        let panels = layout.apply(&mut model)?;
        if cfg.log && panels > 0 {
            eprintln!(
                "column panels: {panels} matrices re-laid for the manifest's budgets and --panel-budget"
            );
        }
        if let Some(t) = template {
            model.meta.chat_template = Some(t);
        }
        let ctx = ctx.unwrap_or(model.meta.context.min(4096));
        super::check_ctx(&model, &format!("--ctx {ctx}"), ctx, force)?;
        cfg.service.engine.ctx = ctx;
        cfg.max_tokens = max_tokens.unwrap_or(ctx);
        let tok = Tokenizer::for_model(&model)?;
        Ok((model, tok, cfg))
    })
}
