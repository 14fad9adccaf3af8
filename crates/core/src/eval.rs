//! Evaluation: perplexity scored exactly like llama.cpp's `llama-perplexity` (each ctx-sized chunk
//! evaluated from an empty cache, BOS substituted for its first token when the model adds one, the
//! second half of every chunk scored), and llama-bench style throughput.

use crate::budget::Budget;
use crate::error::{Error, Result};
use crate::model::{Cache, Logits, Model};
use std::time::Instant;

#[derive(Clone, Debug, serde::Serialize)]
pub struct Perplexity {
    pub ppl: f64,
    /// Standard error of the perplexity estimate, as llama-perplexity prints it.
    pub stderr: f64,
    /// Tokens scored.
    pub tokens: usize,
    pub chunks: usize,
    pub ctx: usize,
    pub seconds: f64,
}

/// `tokens` is the whole tokenized text (with BOS prepended if the model adds one).
pub fn perplexity(
    model: &Model,
    budget: &Budget,
    tokens: &[u32],
    ctx: usize,
    bos: Option<u32>,
    max_chunks: Option<usize>,
    mut progress: impl FnMut(usize, usize, f64),
) -> Result<Perplexity> {
    // The second half of a chunk is scored: ctx - 1 - ctx/2 tokens, none below 3.
    if ctx < 3 {
        return Err(Error::Input(format!(
            "--ctx {ctx} scores no token: perplexity needs a context of at least 3"
        )));
    }
    if max_chunks == Some(0) {
        return Err(Error::Input("--chunks 0 scores no token".into()));
    }
    if tokens.len() < ctx.saturating_mul(2) {
        return Err(Error::Input(format!(
            "the text has {} tokens; perplexity with a context of {ctx} needs at least {}",
            tokens.len(),
            ctx.saturating_mul(2)
        )));
    }
    let n_chunk = (tokens.len() / ctx).min(max_chunks.unwrap_or(usize::MAX));
    let first = ctx / 2;
    let mut cache = Cache::try_new(model, ctx)?;
    let (mut nll, mut nll2, mut count) = (0f64, 0f64, 0usize);
    let t0 = Instant::now();
    let mut chunk = vec![0u32; ctx];
    for c in 0..n_chunk {
        chunk.copy_from_slice(&tokens[c * ctx..(c + 1) * ctx]);
        if let Some(b) = bos {
            chunk[0] = b;
        }
        cache.reset();
        let logits = model.forward(&chunk, budget, &mut cache, Logits::From(first))?;
        let v = model.vocab;
        for (j, row) in logits.chunks(v).take(ctx - 1 - first).enumerate() {
            let target = tokens[c * ctx + first + j + 1] as usize;
            let m = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
            let lse = row.iter().map(|&x| (x as f64 - m).exp()).sum::<f64>().ln() + m;
            let lp = -(row[target] as f64 - lse);
            nll += lp;
            nll2 += lp * lp;
            count += 1;
        }
        progress(c + 1, n_chunk, (nll / count as f64).exp());
    }
    let mean = nll / count as f64;
    let ppl = mean.exp();
    let var = nll2 / count as f64 - mean * mean;
    let stderr = if var > 0.0 && count > 1 {
        (var / (count - 1) as f64).sqrt() * ppl
    } else {
        0.0
    };
    Ok(Perplexity {
        ppl,
        stderr,
        tokens: count,
        chunks: n_chunk,
        ctx,
        seconds: t0.elapsed().as_secs_f64(),
    })
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct Bench {
    /// Prompt processing, tokens/s (median).
    pub pp: f64,
    /// Token generation, tokens/s (median).
    pub tg: f64,
    pub pp_samples: Vec<f64>,
    pub tg_samples: Vec<f64>,
    pub n_prompt: usize,
    pub n_gen: usize,
    pub repetitions: usize,
}

pub fn median(v: &[f64]) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    let n = s.len();
    if n % 2 == 1 {
        s[n / 2]
    } else {
        0.5 * (s[n / 2 - 1] + s[n / 2])
    }
}

/// llama-bench style: random tokens; pp = one forward of `n_prompt` tokens on an empty cache;
/// `n` pseudo-random token ids (xorshift from `seed`): the bench's synthetic text.
pub fn bench_tokens(model: &Model, n: usize, seed: u64) -> Vec<u32> {
    let mut s = seed.wrapping_add(1);
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s % model.vocab as u64) as u32
        })
        .collect()
}

/// tg = `n_gen` single-token forwards from an empty cache; a warm-up run of each, then `reps`.
pub fn bench(
    model: &Model,
    budget: &Budget,
    n_prompt: usize,
    n_gen: usize,
    reps: usize,
    seed: u64,
) -> Result<Bench> {
    if n_prompt == 0 && n_gen == 0 {
        return Err(Error::Input(
            "nothing to measure: -p and -n are both 0".into(),
        ));
    }
    let mut cache = Cache::try_new(model, n_prompt.max(n_gen))?;
    let toks = bench_tokens(model, n_prompt + n_gen, seed);
    let (prompt, gen_tokens) = toks.split_at(n_prompt);
    let (mut pp, mut tg) = (vec![], vec![]);
    for r in 0..reps + 1 {
        if n_prompt > 0 {
            cache.reset();
            let t = Instant::now();
            model.forward(prompt, budget, &mut cache, Logits::Last)?;
            if r > 0 {
                pp.push(n_prompt as f64 / t.elapsed().as_secs_f64());
            }
        }
        if n_gen > 0 {
            cache.reset();
            let t = Instant::now();
            for &g in gen_tokens {
                model.forward(&[g], budget, &mut cache, Logits::Last)?;
            }
            if r > 0 {
                tg.push(n_gen as f64 / t.elapsed().as_secs_f64());
            }
        }
    }
    Ok(Bench {
        pp: median(&pp),
        tg: median(&tg),
        pp_samples: pp,
        tg_samples: tg,
        n_prompt,
        n_gen,
        repetitions: reps,
    })
}
