//! Matrices re-laid in column panels (`Model::panel`, what `run`, `serve` and `bench` do by
//! default) give the logits of the checkpoint's row layout, on every fixture architecture and
//! format: for the budgets the panels were cut for, for one cut through them, in prefill and in
//! token-by-token decode, where a batch of decode tokens stays bit-identical to each token alone.
//!
//! With f32 activations (`ELASTICA_EXACT`): with int8 ones, any change of f32 rounding moves
//! some activations by one quantization step, which the layers amplify (SmolLM2 Q4_1's own
//! decode and prefill logits differ by 4e-2 relative). Each product of the int8 path is checked
//! against the row layout in `layers::tests::panels_match_the_row_layout`.

mod common;
use common::*;
use elastica::{BatchItem, Cache, Logits, Model, SeqState, Work};

fn decode_logits(m: &Model, tokens: &[u32], budget: &str) -> Vec<Vec<f32>> {
    let b = m.budget(budget).unwrap();
    let mut c = Cache::new(m, tokens.len());
    tokens
        .iter()
        .map(|&t| m.forward(&[t], &b, &mut c, Logits::Last).unwrap().to_vec())
        .collect()
}

#[test]
fn paneled_models_match_the_row_layout() {
    // Safety: this binary's only test sets it before any kernel runs (the value is cached).
    unsafe { std::env::set_var("ELASTICA_EXACT", "1") };
    for (name, plain, sub) in fixtures_and_smollm2() {
        let mut pan = load(&plain.meta.path);
        let budgets = [pan.budget(&sub).unwrap(), pan.full_budget()];
        let (count, bytes) = pan.panel(&budgets).unwrap();
        println!("{name}: {count} matrices re-laid ({bytes} bytes)");
        assert!(count > 0, "{name}: no matrix re-laid for [{sub}]");
        let tokens: Vec<u32> = (0..12).map(|i| (i * 37 + 5) % plain.vocab as u32).collect();
        // A budget between the two: its columns cut through the panels.
        let g = plain.width_granule();
        let mid = (plain.budget(&sub).unwrap().hidden + plain.shape.hidden) / 2 / g * g;
        let mid = format!("hidden={mid}");
        for spec in [sub.as_str(), "full", mid.as_str()] {
            let a = logits_all(&plain, &tokens, spec);
            let b = logits_all(&pan, &tokens, spec);
            let (da, db) = (
                decode_logits(&plain, &tokens, spec),
                decode_logits(&pan, &tokens, spec),
            );
            let (d, dd) = (rel_diff(&b, &a), rel_diff(&db, &da));
            println!("{name} [{spec}]: prefill {d:.2e}, decode {dd:.2e}");
            assert!(d < 1e-5, "{name} [{spec}]: paneled prefill differs by {d}");
            assert!(dd < 1e-5, "{name} [{spec}]: paneled decode differs by {dd}");
            // Three decode tokens in one batch, each with its own sequence: bit for bit alone.
            let bud = pan.budget(spec).unwrap();
            let mut seqs: Vec<SeqState> = (0..3)
                .map(|_| SeqState::try_new(&pan, 4, 0).unwrap())
                .collect();
            let mut work = Work::try_new(&pan, 4).unwrap();
            let mut items: Vec<BatchItem> = seqs
                .iter_mut()
                .zip(&tokens)
                .map(|(seq, t)| BatchItem {
                    seq,
                    tokens: std::slice::from_ref(t),
                    logits: Logits::Last,
                    stepwise: false,
                })
                .collect();
            let out = pan.forward_batch(&mut items, &bud, &mut work).unwrap();
            for (i, t) in tokens[..3].iter().enumerate() {
                let alone = decode_logits(&pan, std::slice::from_ref(t), spec);
                assert_eq!(out.item(i), &alone[0][..], "{name} [{spec}]: batch row {i}");
            }
        }
    }
}
