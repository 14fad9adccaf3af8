use super::ModelArgs;
use crate::Result;

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    m: ModelArgs,
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
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

pub fn run(a: Args) -> Result<()> {
    let (m, b) = super::load(&a.m)?;
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
        println!("{v}");
    } else {
        println!("model   {}  [{}]", a.m.model.display(), b.spec(&m.shape));
        println!(
            "threads {threads}  isa {:?}  weights read per token {:.1} MiB",
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
    }
    Ok(())
}
