//! `elastica batched-bench`: aggregate throughput of N sequences at once through the
//! continuous-batching scheduler, in the shape of llama.cpp's `llama-batched-bench`.

use super::ModelArgs;
use crate::Result;
use crate::runtime::scheduler::batched_bench;

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    m: ModelArgs,
    #[command(flatten)]
    layout: super::LayoutArgs,
    /// Prompt tokens per sequence (random ids).
    #[arg(long, default_value_t = 128, value_parser = super::at_least_one::<usize>)]
    npp: usize,
    /// Decode steps per sequence (greedy, EOS ignored).
    #[arg(long, default_value_t = 128)]
    ntg: usize,
    /// Numbers of parallel sequences, one measurement each.
    #[arg(long, value_delimiter = ',', default_value = "1,4,16,64", value_parser = super::at_least_one::<usize>)]
    npl: Vec<usize>,
    /// Prompt tokens per scheduler step [default: N × npp, the whole prefill in one step].
    #[arg(long, value_parser = super::at_least_one::<usize>)]
    chunk: Option<usize>,
    /// Allow npp + ntg above the model's trained context (with a warning).
    #[arg(long)]
    force_ctx: bool,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
}

pub fn run(a: Args) -> Result<()> {
    let (mut m, b) = super::load(&a.m)?;
    a.layout.apply(&mut m)?;
    let what = format!("--npp {} + --ntg {}", a.npp, a.ntg);
    super::check_ctx(&m, &what, a.npp + a.ntg + 1, a.force_ctx)?;
    let tok = crate::generate::tokenizer::Tokenizer::for_model(&m)?;
    let threads = crate::kernels::pool::pool().threads();
    if !a.json {
        println!(
            "model {}  [{}]  threads {threads}",
            a.m.model.display(),
            b.spec(&m.shape)
        );
        println!();
        println!(
            "|    PP |     TG |    B |   N_KV |   T_PP s | S_PP t/s |   T_TG s | S_TG t/s |      T s |    S t/s |"
        );
        println!(
            "|-------|--------|------|--------|----------|----------|----------|----------|----------|----------|"
        );
    }
    let mut rows = vec![];
    for &n in &a.npl {
        let r = batched_bench(&m, &tok, &b, a.npp, a.ntg, n, a.chunk)?;
        if !a.json {
            println!(
                "| {:5} | {:6} | {:4} | {:6} | {:8.3} | {:8.2} | {:8.3} | {:8.2} | {:8.3} | {:8.2} |",
                r.pp, r.tg, r.n, r.n_kv, r.t_pp, r.s_pp, r.t_tg, r.s_tg, r.t, r.s
            );
        }
        rows.push(r);
    }
    if a.json {
        let v = serde_json::json!({
            "model": a.m.model.display().to_string(),
            "budget": b.spec(&m.shape),
            "threads": threads,
            "rows": rows,
        });
        println!("{v}");
    }
    Ok(())
}
