//! The decode hot path (one forward step + sampling) allocates nothing per token, on every
//! architecture and weight format the fixtures cover, across a budget switch too.
//!
//! Counted are the allocations of the decoding thread and of the kernel pool's threads (marked
//! by a broadcast), not those of other threads: libtest's own thread allocates to print its
//! "has been running for over 60 seconds" note when a loaded machine slows the test down.

mod common;
use common::*;
use elastica::generate::sampler::{Sampler, SamplerConfig};
use elastica::kernels::pool::pool;
use elastica::{Cache, Logits};
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
    }
}
