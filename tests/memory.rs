//! Sequence state apart from scratch (issue 11, point 1), and the batched forward (point 3):
//! rolling a sequence back and running the same tokens again gives bit-identical logits, a
//! copied sequence continues as its source, bad positions are errors, and a batch of sequences
//! gives each one what it gets alone.
//!
//! Batch invariance: decode rows (single tokens, stepwise items) take the decode product for
//! all rows in one read of the weights, bit-identical per row to a token alone; prefill chunks
//! take the GEMM, whose rows do not depend on the other rows. The one kernel that is not batch
//! invariant is the routed-expert choice of the MoE under prefill: an expert that gets one row
//! alone (decode product) can get several in a batch (GEMM), so MoE prefill logits agree within
//! 1e-5 rather than bit for bit.

mod common;
use common::*;
use elastica::{BatchItem, Budget, Logits, Model, SeqPool, SeqState, Work};

fn tokens(n: usize, seed: u32, vocab: usize) -> Vec<u32> {
    (0..n as u32)
        .map(|i| (i * 37 + seed * 11 + 5) % vocab.min(256) as u32)
        .collect()
}

/// Runs `tokens` on one sequence; the logits of the wanted rows.
fn run(
    m: &Model,
    b: &Budget,
    s: &mut SeqState,
    w: &mut Work,
    tokens: &[u32],
    want: Logits,
) -> Vec<f32> {
    run_as(m, b, s, w, tokens, want, false)
}

fn run_as(
    m: &Model,
    b: &Budget,
    s: &mut SeqState,
    w: &mut Work,
    tokens: &[u32],
    logits: Logits,
    stepwise: bool,
) -> Vec<f32> {
    let mut items = [BatchItem {
        seq: s,
        tokens,
        logits,
        stepwise,
    }];
    m.forward_batch(&mut items, b, w).unwrap().all().to_vec()
}

fn argmax(l: &[f32]) -> u32 {
    (0..l.len()).fold(0, |b, i| if l[i] > l[b] { i } else { b }) as u32
}

/// Prefill, decode, roll back, decode the same tokens again: bit-identical logits, also after a
/// draft at a smaller budget and for a stepwise (verify) pass.
#[test]
fn rollback_then_rerun_is_bit_identical() {
    for (name, m, sub) in fixtures() {
        let budgets = [m.full_budget(), m.budget(sub).unwrap()];
        for (bi, b) in budgets.iter().enumerate() {
            let other = &budgets[1 - bi];
            let toks = tokens(24, 3, m.vocab);
            let mut w = Work::new();
            // Reference: prefill 10, then one token at a time.
            let mut r = SeqState::try_new(&m, 64, 0).unwrap();
            run(&m, b, &mut r, &mut w, &toks[..10], Logits::None);
            let fresh: Vec<Vec<f32>> = (10..22)
                .map(|i| run(&m, b, &mut r, &mut w, &toks[i..i + 1], Logits::Last))
                .collect();
            let at = |i: usize| &fresh[i - 10];

            // K = 4 checkpoints for drafts of 4 tokens.
            let mut s = SeqState::try_new(&m, 64, 4).unwrap();
            run(&m, b, &mut s, &mut w, &toks[..10], Logits::None);
            for i in 10..16 {
                assert_eq!(
                    &run(&m, b, &mut s, &mut w, &toks[i..i + 1], Logits::Last),
                    at(i)
                );
            }
            // Back 3 tokens and again.
            s.truncate(13).unwrap();
            assert_eq!(s.pos, 13);
            for i in 13..16 {
                let l = run(&m, b, &mut s, &mut w, &toks[i..i + 1], Logits::Last);
                assert_eq!(
                    &l,
                    at(i),
                    "{name} budget {bi}: after rollback, position {i}"
                );
            }
            // A draft of 4 tokens at the other budget, rolled back: the state is this budget's.
            for i in 16..20 {
                run(&m, other, &mut s, &mut w, &toks[i..i + 1], Logits::Last);
            }
            s.truncate(16).unwrap();
            // Verify 5 at once, stepwise: each row equals its single decode step.
            let v = run_as(&m, b, &mut s, &mut w, &toks[16..21], Logits::All, true);
            for (j, row) in v.chunks(m.vocab).enumerate() {
                assert_eq!(row, at(16 + j), "{name} budget {bi}: stepwise row {j}");
            }
            // Accept none (back to 17, the earliest an acceptance ends at) and continue.
            s.truncate(17).unwrap();
            let l = run(&m, b, &mut s, &mut w, &toks[17..18], Logits::Last);
            assert_eq!(&l, at(17), "{name} budget {bi}: after a partial accept");
            // To the empty sequence, and the whole run again.
            s.truncate(0).unwrap();
            run(&m, b, &mut s, &mut w, &toks[..10], Logits::None);
            let l = run(&m, b, &mut s, &mut w, &toks[10..11], Logits::Last);
            assert_eq!(&l, at(10), "{name} budget {bi}: after truncate(0)");
        }
    }
}

/// seq_cp: a copy (whole or a checkpointed prefix) continues exactly as its source.
#[test]
fn copied_sequence_continues_like_its_source() {
    for (name, m, _) in fixtures() {
        let b = m.full_budget();
        let toks = tokens(20, 5, m.vocab);
        let mut w = Work::new();
        let mut pool = SeqPool::try_new(&m, 3, 32, 4).unwrap();
        let s = &mut pool.states_mut()[0];
        run(&m, &b, s, &mut w, &toks[..8], Logits::None);
        for i in 8..11 {
            run(&m, &b, s, &mut w, &toks[i..i + 1], Logits::Last);
        }
        // Whole sequence into 1, the prefix of 9 (a checkpoint) into 2.
        pool.seq_cp(0, 1, 11).unwrap();
        pool.seq_cp(0, 2, 9).unwrap();
        assert_eq!(
            (pool.get(1).unwrap().pos, pool.get(2).unwrap().pos),
            (11, 9)
        );
        let seqs = pool.states_mut();
        let (a, rest) = seqs.split_at_mut(1);
        let l2 = run(&m, &b, &mut rest[1], &mut w, &toks[9..11], Logits::None);
        assert!(l2.is_empty());
        for i in 11..15 {
            let la = run(&m, &b, &mut a[0], &mut w, &toks[i..i + 1], Logits::Last);
            let lb = run(&m, &b, &mut rest[0], &mut w, &toks[i..i + 1], Logits::Last);
            let lc = run(&m, &b, &mut rest[1], &mut w, &toks[i..i + 1], Logits::Last);
            assert_eq!(la, lb, "{name}: the copy differs at {i}");
            // The prefix copy re-ran 9..11 as one chunk: equal up to chunking.
            let d = la
                .iter()
                .zip(&lc)
                .fold(0f32, |d, (x, y)| d.max((x - y).abs()));
            assert!(d < 1e-4, "{name}: the prefix copy differs by {d} at {i}");
        }
    }
}

#[test]
fn bad_positions_are_errors() {
    let fx = fixtures();
    let (_, dense, _) = &fx[0];
    let (_, llama, _) = &fx[3];
    let b = dense.full_budget();
    let mut w = Work::new();
    let mut s = SeqState::try_new(dense, 32, 2).unwrap();
    run(dense, &b, &mut s, &mut w, &[1, 2, 3, 4, 5], Logits::None);
    for i in 0..4 {
        run(dense, &b, &mut s, &mut w, &[6 + i], Logits::Last);
    }
    let e = s.truncate(10).unwrap_err().to_string();
    assert!(
        e.contains("position 10") && e.contains("holds 9 tokens"),
        "{e}"
    );
    // Checkpoints hold 7 and 8 (K = 2); 6 is gone.
    let e = s.truncate(6).unwrap_err().to_string();
    assert!(e.contains("position 6") && e.contains("[7, 8]"), "{e}");
    assert!(s.can_truncate(7) && !s.can_truncate(6) && s.can_truncate(0));
    assert_eq!(s.pos, 9, "a failed rollback leaves the sequence as it was");
    // Without checkpoints a Mamba model cannot roll back; an attention-only one can.
    let mut s0 = SeqState::try_new(dense, 32, 0).unwrap();
    run(dense, &b, &mut s0, &mut w, &[1, 2, 3], Logits::None);
    let e = s0.truncate(2).unwrap_err().to_string();
    assert!(e.contains("keeps no checkpoints"), "{e}");
    let mut l = SeqState::try_new(llama, 32, 0).unwrap();
    run(
        llama,
        &llama.full_budget(),
        &mut l,
        &mut w,
        &[1, 2, 3],
        Logits::None,
    );
    l.truncate(1).unwrap();
    // Copies: beyond the source, beyond the destination, another model.
    let mut d = SeqState::try_new(dense, 4, 0).unwrap();
    let e = d.copy_from(&s, 12).unwrap_err().to_string();
    assert!(e.contains("holds 9"), "{e}");
    let e = d.copy_from(&s, 9).unwrap_err().to_string();
    assert!(e.contains("sequence of 4 tokens"), "{e}");
    assert!(
        d.copy_from(&l, 1)
            .unwrap_err()
            .to_string()
            .contains("another model")
    );
    // The pool: sequence ids and sizes.
    let mut pool = SeqPool::try_new(dense, 2, 16, 0).unwrap();
    let e = pool.seq_rm(2, 0).unwrap_err().to_string();
    assert!(e.contains("sequence 2 is outside the pool of 2"), "{e}");
    assert!(pool.seq_cp(0, 5, 0).is_err());
    let e = SeqPool::try_new(dense, 1 << 20, 1 << 40, 4)
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("1048576 sequences of 1099511627776 tokens"),
        "{e}"
    );
    // Past the context.
    let mut items = [BatchItem {
        seq: &mut d,
        tokens: &[1; 5],
        logits: Logits::Last,
        stepwise: false,
    }];
    let e = dense
        .forward_batch(&mut items, &b, &mut w)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("exceed the context of 4 tokens"), "{e}");
}

/// One sequence's greedy run alone: the prompt, then `n` decode steps; every step's logits.
fn alone(m: &Model, b: &Budget, prompt: &[u32], n: usize) -> Vec<Vec<f32>> {
    let mut s = SeqState::try_new(m, 64, 0).unwrap();
    let mut w = Work::new();
    let mut out = vec![run(m, b, &mut s, &mut w, prompt, Logits::Last)];
    for _ in 0..n {
        let t = argmax(out.last().unwrap());
        out.push(run(m, b, &mut s, &mut w, &[t], Logits::Last));
    }
    out
}

/// Sequences of different prompt lengths joining a batch at different steps (so prefill chunks
/// and decode tokens mix), at one budget per group: each gets its greedy tokens alone, and its
/// logits bit for bit (MoE: within 1e-5, see the file's doc).
fn check_batch(name: &str, m: &Model, groups: &[(Budget, Vec<Vec<u32>>)], exact: bool) {
    let steps = 6;
    let n: usize = groups.iter().map(|g| g.1.len()).sum();
    let mut pool = SeqPool::try_new(m, n, 64, 0).unwrap();
    let mut w = Work::new();
    let mut gseqs = pool.states_mut();
    for (b, prompts) in groups {
        let (seqs, rest) = std::mem::take(&mut gseqs).split_at_mut(prompts.len());
        gseqs = rest;
        let want: Vec<_> = prompts.iter().map(|p| alone(m, b, p, steps)).collect();
        // Sequence i joins at step join[i] (its prompt runs then; two prompts share step 0),
        // and decodes afterwards.
        let join = [0, 1, 0, 2];
        let mut next: Vec<Vec<u32>> = prompts.clone();
        let mut got: Vec<Vec<Vec<f32>>> = vec![vec![]; prompts.len()];
        for step in 0..steps + 3 {
            let mut items: Vec<BatchItem> = vec![];
            let mut who = vec![];
            for (i, (s, toks)) in seqs.iter_mut().zip(&next).enumerate() {
                if join[i] <= step && got[i].len() <= steps {
                    items.push(BatchItem {
                        seq: s,
                        tokens: toks,
                        logits: Logits::Last,
                        stepwise: false,
                    });
                    who.push(i);
                }
            }
            let out = m.forward_batch(&mut items, b, &mut w).unwrap();
            for (k, &i) in who.iter().enumerate() {
                got[i].push(out.item(k).to_vec());
            }
            drop(items);
            for &i in &who {
                next[i] = vec![argmax(got[i].last().unwrap())];
            }
        }
        for (i, (g, a)) in got.iter().zip(&want).enumerate() {
            let gt: Vec<u32> = g.iter().map(|l| argmax(l)).collect();
            let at: Vec<u32> = a.iter().map(|l| argmax(l)).collect();
            assert_eq!(gt, at, "{name}: sequence {i} greedy tokens");
            let (mut d, mut mx) = (0f32, 0f32);
            for (x, y) in g.iter().flatten().zip(a.iter().flatten()) {
                d = d.max((x - y).abs());
                mx = mx.max(y.abs());
            }
            println!(
                "{name}: sequence {i}: max |Δ| / max |logit| = {:.2e}",
                d / mx
            );
            if exact {
                assert_eq!(g, a, "{name}: sequence {i} logits differ from alone");
            } else {
                assert!(
                    d / mx <= 1e-5,
                    "{name}: sequence {i} logits differ by {}",
                    d / mx
                );
            }
        }
    }
}

#[test]
fn batch_equals_each_sequence_alone() {
    let models = fixtures_and_smollm2();
    for (name, m, sub) in &models {
        let exact = !name.contains("moe");
        let prompts: Vec<Vec<u32>> = [7, 1, 12, 3]
            .iter()
            .enumerate()
            .map(|(i, &n)| tokens(n, i as u32, m.vocab))
            .collect();
        // One group at the full budget.
        check_batch(name, m, &[(m.full_budget(), prompts.clone())], exact);
        // Two groups at different budgets, one batch each.
        let groups = [
            (m.full_budget(), prompts[..2].to_vec()),
            (m.budget(sub).unwrap(), prompts[2..].to_vec()),
        ];
        check_batch(&format!("{name} mixed budgets"), m, &groups, exact);
    }
}
