//! The decode hot path (one forward step + sampling) allocates nothing per token, on every
//! architecture and weight format the fixtures cover, across a budget switch too; nor do a
//! batched decode step over several sequences, a stepwise (speculative verify) pass, or a
//! rollback (`truncate`, Mamba states from their checkpoints); with the matrices in the row layout
//! and in column panels.
//!
//! Counted are the allocations of the decoding thread and of the kernel pool's threads (marked
//! by a broadcast), not those of other threads: libtest's own thread allocates to print its
//! "has been running for over 60 seconds" note when a loaded machine slows the test down.

mod common;
use common::*;
use elastica::generate::sampler::{Sampler, SamplerConfig};
use elastica::kernels::pool::pool;
use elastica::runtime::speculative::Speculator;
use elastica::{BatchItem, Cache, Logits, SeqPool, SeqState, Work};
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicUsize, Ordering};

struct Counting;
static ALLOCS: AtomicUsize = AtomicUsize::new(0);
thread_local! {
    static TRACKED: Cell<bool> = const { Cell::new(false) };
}

fn count() {
    if TRACKED.try_with(|t| t.get()).unwrap_or(false) {
        ALLOCS.fetch_add(1, Ordering::SeqCst);
    }
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        count();
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, n: usize) -> *mut u8 {
        count();
        unsafe { System.realloc(p, l, n) }
    }
}

#[global_allocator]
static A: Counting = Counting;

// One test function, so no other test allocates concurrently.
#[test]
fn decode_allocates_nothing() {
    TRACKED.set(true);
    pool().broadcast(|_| TRACKED.set(true));
    // The counter sees allocations on the pool's threads, and not on other threads.
    let before = ALLOCS.load(Ordering::SeqCst);
    pool().broadcast(|_| drop(std::hint::black_box(vec![0u8; 64])));
    assert_eq!(
        ALLOCS.load(Ordering::SeqCst) - before,
        pool().threads(),
        "the counter misses allocations on the kernel pool's threads"
    );
    let before = ALLOCS.load(Ordering::SeqCst);
    std::thread::spawn(|| drop(std::hint::black_box(vec![0u8; 64])))
        .join()
        .unwrap();
    // Spawning allocates on this thread (counted); the new thread's vector is not counted.
    let spawn_cost = ALLOCS.load(Ordering::SeqCst) - before;
    let before = ALLOCS.load(Ordering::SeqCst);
    std::thread::spawn(|| {
        for _ in 0..10 {
            drop(std::hint::black_box(vec![0u8; 64]));
        }
    })
    .join()
    .unwrap();
    assert_eq!(ALLOCS.load(Ordering::SeqCst) - before, spawn_cost);

    let mut models = vec![];
    for name in ["nemotron_h_dense", "nemotron_h_moe", "llama_tiny"] {
        models.push((name.to_string(), load(&fixture(name))));
    }
    models.push((
        "nemotron_h_moe gguf".into(),
        load(&fixture("nemotron_h_moe").join("model-f32.gguf")),
    ));
    let smol = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    if smol.exists() {
        models.push(("smollm2 q4_1".into(), load(&smol)));
    }
    // The same models re-laid in column panels for the two budgets (what run/serve/bench do).
    let paneled: Vec<(String, elastica::Model)> = models
        .iter()
        .map(|(name, m)| {
            let mut p = load(&m.meta.path);
            let small = p.budget(&format!("hidden={}", p.shape.hidden / 2)).unwrap();
            assert!(
                p.panel(&[p.full_budget(), small]).unwrap().0 > 0,
                "{name}: no panels"
            );
            (format!("{name} paneled"), p)
        })
        .collect();
    models.extend(paneled);
    for (name, m) in &models {
        let full = m.full_budget();
        let small = m.budget(&format!("hidden={}", m.shape.hidden / 2)).unwrap();
        let mut cache = Cache::new(m, 200);
        let mut s = Sampler::new(SamplerConfig {
            temperature: 0.8,
            top_k: 40,
            top_p: 0.9,
            seed: 1,
        });
        m.forward(&[1, 2, 3, 4, 5, 6, 7, 8], &full, &mut cache, Logits::Last)
            .unwrap();
        let mut tok = 9u32;
        // Warm-up: first decode steps may size buffers.
        for b in [&full, &small, &full] {
            let l = m.forward(&[tok], b, &mut cache, Logits::Last).unwrap();
            tok = s.sample(l);
        }
        let before = ALLOCS.load(Ordering::SeqCst);
        for i in 0..100 {
            let b = if i % 10 < 5 { &full } else { &small };
            let l = m.forward(&[tok], b, &mut cache, Logits::Last).unwrap();
            tok = s.sample(l);
        }
        let n = ALLOCS.load(Ordering::SeqCst) - before;
        println!("{name}: {n} allocations in 100 decode steps");
        assert_eq!(n, 0, "{name}: the decode loop allocated {n} times");

        // Four sequences decoding as one batch; every third step sequence 1 verifies three
        // tokens stepwise and rolls two of them back, sequence 0 rolls one back.
        let mut pool = SeqPool::try_new(m, 4, 200, 4).unwrap();
        let mut work = Work::try_new(m, 200).unwrap();
        let mut next = [[0u32; 3]; 4];
        for (i, s) in pool.states_mut().iter_mut().enumerate() {
            let prompt = [1, 2, 3, 4 + i as u32];
            let mut items = [BatchItem {
                seq: s,
                tokens: &prompt,
                logits: Logits::Last,
                stepwise: false,
            }];
            m.forward_batch(&mut items, &full, &mut work).unwrap();
        }
        let mut step = |i: usize, next: &mut [[u32; 3]; 4], pool: &mut SeqPool| {
            let b = if i % 10 < 5 { &full } else { &small };
            let verify = i.is_multiple_of(3);
            let [s0, s1, s2, s3] = pool.states_mut() else {
                unreachable!()
            };
            let n1 = if verify { 3 } else { 1 };
            let mut items = [
                BatchItem {
                    seq: s0,
                    tokens: &next[0][..1],
                    logits: Logits::Last,
                    stepwise: false,
                },
                BatchItem {
                    seq: s1,
                    tokens: &next[1][..n1],
                    logits: Logits::All,
                    stepwise: true,
                },
                BatchItem {
                    seq: s2,
                    tokens: &next[2][..1],
                    logits: Logits::Last,
                    stepwise: false,
                },
                BatchItem {
                    seq: s3,
                    tokens: &next[3][..1],
                    logits: Logits::Last,
                    stepwise: false,
                },
            ];
            let out = m.forward_batch(&mut items, b, &mut work).unwrap();
            for (k, nx) in next.iter_mut().enumerate() {
                let l = out.item(k);
                for (j, t) in nx.iter_mut().enumerate() {
                    let row = &l[(j % (l.len() / m.vocab)) * m.vocab..][..m.vocab];
                    let best = (0..m.vocab).fold(0, |b, v| if row[v] > row[b] { v } else { b });
                    *t = ((best + j) % m.vocab) as u32;
                }
            }
            if verify {
                pool.seq_rm(1, pool.get(1).unwrap().pos - 2).unwrap();
                pool.seq_rm(0, pool.get(0).unwrap().pos - 1).unwrap();
            }
        };
        // Warm-up: the first batches size the scratch.
        for i in 0..3 {
            step(i, &mut next, &mut pool);
        }
        let before = ALLOCS.load(Ordering::SeqCst);
        for i in 3..60 {
            step(i, &mut next, &mut pool);
        }
        let n = ALLOCS.load(Ordering::SeqCst) - before;
        println!("{name}: {n} allocations in 57 batched steps with rollbacks");
        assert_eq!(
            n, 0,
            "{name}: batched decode and rollback allocated {n} times"
        );

        // Speculative rounds: drafts of 4 at the small budget, stepwise verify, rollback.
        let mut seq = SeqState::try_new(m, 400, 4).unwrap();
        let mut spec = Speculator::new(m, small.clone(), &full, 4).unwrap();
        let mut out = Vec::with_capacity(400);
        let mut items = [BatchItem {
            seq: &mut seq,
            tokens: &[1, 2, 3, 4],
            logits: Logits::Last,
            stepwise: false,
        }];
        let t0 = s.sample(
            m.forward_batch(&mut items, &full, &mut work)
                .unwrap()
                .item(0),
        );
        out.push(t0);
        let mut round = |out: &mut Vec<u32>| {
            let t0 = *out.last().unwrap();
            spec.round(m, &mut seq, &mut work, t0, &mut s, out).unwrap();
        };
        round(&mut out);
        let before = ALLOCS.load(Ordering::SeqCst);
        for _ in 0..40 {
            round(&mut out);
        }
        let n = ALLOCS.load(Ordering::SeqCst) - before;
        println!("{name}: {n} allocations in 40 speculative rounds");
        assert_eq!(n, 0, "{name}: speculative decoding allocated {n} times");
    }
}
