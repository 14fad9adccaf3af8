use super::ModelArgs;
use crate::Result;
use crate::runtime::speculative::{self, Speculator};

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    m: ModelArgs,
    #[command(flatten)]
    layout: super::LayoutArgs,
    /// Prompt tokens for the prefill test (pp) [default: 512, or the model's trained context if
    /// smaller].
    #[arg(short = 'p', long = "n-prompt")]
    n_prompt: Option<usize>,
    /// Generated tokens for the decode test (tg) [default: 128, or the model's trained context if
    /// smaller].
    #[arg(short = 'n', long = "n-gen")]
    n_gen: Option<usize>,
    /// Repetitions (after one warm-up), 1..=1000; medians are reported.
    #[arg(short = 'r', long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=1000))]
    reps: u32,
    /// Allow -p or -n above the model's trained context (with a warning).
    #[arg(long)]
    force_ctx: bool,
    /// With --speculate: greedy decoding of -n tokens after the -p prompt (or --file), plain
    /// against speculative (acceptance per draft position, tokens per round, tok/s).
    #[command(flatten)]
    spec: super::SpeculateArgs,
    /// With --speculate, the prompt from this UTF-8 file (default: -p random tokens).
    #[arg(short, long, requires = "speculate")]
    file: Option<std::path::PathBuf>,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

pub fn run(a: Args) -> Result<()> {
    let (mut m, b) = super::load(&a.m)?;
    let panels = a.layout.apply(&mut m)?;
    let n_prompt = a.n_prompt.unwrap_or(m.meta.context.min(512));
    let n_gen = a.n_gen.unwrap_or(m.meta.context.min(128));
    // pp and tg each start from an empty cache: the longer of the two must fit.
    super::check_ctx(
        &m,
        &format!("-p {n_prompt} / -n {n_gen}"),
        n_prompt.max(n_gen),
        a.force_ctx,
    )?;
    let r = crate::eval::bench(&m, &b, n_prompt, n_gen, a.reps as usize, 42)?;
    let spec = match &a.spec.speculate {
        Some(d) => {
            let prompt = match &a.file {
                Some(f) => {
                    let tok = crate::generate::tokenizer::Tokenizer::for_model(&m)?;
                    tok.encode(&crate::data::read_text(f)?, true)?
                }
                None => crate::eval::bench_tokens(&m, n_prompt.max(1), 42),
            };
            let ctx = prompt.len() + n_gen + a.spec.draft + 1;
            super::check_ctx(&m, "the --speculate prompt and -n", ctx, a.force_ctx)?;
            let s = Speculator::new(&m, m.budget(d)?, &b, a.spec.draft)?;
            Some(speculative::bench(&m, s, &prompt, n_gen, a.reps as usize)?)
        }
        None => None,
    };
    let threads = crate::kernels::pool::pool().threads();
    let bytes = m.bytes_per_token(&b);
    let (pt, pa) = m.params(&b);
    if a.json {
        let mut v = serde_json::to_value(&r).unwrap();
        v["model"] = a.m.model.display().to_string().into();
        v["budget"] = b.spec(&m.shape).into();
        v["threads"] = threads.into();
        v["isa"] = format!("{:?}", crate::kernels::isa()).into();
        v["bytes_per_token"] = bytes.into();
        v["params_total"] = pt.into();
        v["params_active"] = pa.into();
        v["panels"] = panels.into();
        if let Some(s) = &spec {
            v["speculative"] = s.report(&m.shape);
        }
        println!("{v}");
    } else {
        println!("model   {}  [{}]", a.m.model.display(), b.spec(&m.shape));
        println!(
            "threads {threads}  isa {:?}  weights read per token {:.1} MiB  matrices in column panels {panels}",
            crate::kernels::isa(),
            bytes as f64 / (1 << 20) as f64
        );
        if n_prompt > 0 {
            println!("pp{:<5} {:8.1} tok/s", n_prompt, r.pp);
        }
        if n_gen > 0 {
            println!(
                "tg{:<5} {:8.1} tok/s  ({:.1} GB/s of weights)",
                n_gen,
                r.tg,
                r.tg * bytes as f64 / 1e9
            );
        }
        if let Some(s) = &spec {
            println!(
                "greedy {} tokens: plain {:.1} tok/s, speculative {:.1} tok/s = {:.2}x{}",
                s.tokens,
                s.plain_tps,
                s.spec_tps,
                s.spec_tps / s.plain_tps,
                if s.identical {
                    ""
                } else {
                    "  (OUTPUTS DIFFER)"
                }
            );
            println!("{}", s.speculator.summary(&m.shape));
        }
    }
    Ok(())
}
