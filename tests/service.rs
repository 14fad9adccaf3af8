//! The engine on its own thread (`runtime::service`, for the server): requests submitted from
//! many threads each get the tokens they get alone, in order, with one final update; a full queue
//! is refused; a dropped receiver cancels its request and frees the slot; control actions reach a
//! running request; shutdown finishes or cancels what runs.

mod common;
use common::*;
use elastica::generate::sampler::SamplerConfig;
use elastica::generate::think::think_end;
use elastica::generate::tokenizer::Tokenizer;
use elastica::generate::{GenConfig, ThinkControl, generate};
use elastica::runtime::scheduler::{EngineConfig, Request};
use elastica::runtime::service::{Action, Handle, Service, ServiceConfig, Submitted, Update};
use elastica::{Budget, Cache, Model};
use std::sync::Arc;
use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant};

fn req(m: &Model, b: &Budget, n: usize, seed: u32, max_tokens: usize) -> Request {
    Request {
        prompt: (0..n as u32)
            .map(|i| (i * 37 + seed * 11 + 5) % m.vocab.min(256) as u32)
            .collect(),
        budget: b.clone(),
        config: GenConfig {
            max_tokens,
            sampler: SamplerConfig::default(),
            stop: vec![],
            ignore_eos: true,
            logprobs: None,
        },
        think: None,
        answer: None,
        speculate: None,
    }
}

fn start(
    m: &Arc<Model>,
    tok: &Arc<Tokenizer>,
    parallel: usize,
    queue: usize,
    ctx: usize,
) -> Service {
    let engine = EngineConfig {
        parallel,
        ctx,
        prefill_chunk: 64,
        draft_max: 0,
    };
    Service::start(m.clone(), tok.clone(), ServiceConfig { engine, queue }).unwrap()
}

fn accepted(h: &Handle, r: Request) -> (u64, Receiver<Update>) {
    match h.submit(r) {
        Submitted::Accepted { id, updates } => (id, updates),
        Submitted::QueueFull => panic!("queue full"),
        Submitted::Refused(e) => panic!("refused: {e}"),
    }
}

/// All updates until the final one: (tokens, text, final update).
fn drain(rx: &Receiver<Update>) -> (Vec<u32>, String, Update) {
    let (mut toks, mut text) = (vec![], String::new());
    assert_eq!(rx.recv().unwrap(), Update::Started);
    loop {
        match rx.recv().unwrap() {
            Update::Tokens {
                tokens, text: t, ..
            } => {
                toks.extend(tokens);
                text.push_str(&t);
            }
            Update::Started => panic!("started twice"),
            last => return (toks, text, last),
        }
    }
}

fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Eight requests from eight threads over three slots, at two budgets: each gets exactly what
/// `generate()` gives it alone; the counters add up.
#[test]
fn requests_from_many_threads_get_their_tokens() {
    for (name, m, sub) in fixtures() {
        let tok = Arc::new(Tokenizer::for_model(&m).unwrap());
        let m = Arc::new(m);
        let svc = start(&m, &tok, 3, 16, 256);
        let budgets = [m.full_budget(), m.budget(sub).unwrap()];
        let reqs: Vec<Request> = (0..8)
            .map(|i| req(&m, &budgets[i % 2], 3 + i, i as u32, 6 + i))
            .collect();
        let outs: Vec<_> = std::thread::scope(|s| {
            let hs: Vec<_> = reqs
                .iter()
                .map(|r| {
                    let h = svc.handle();
                    let r = r.clone();
                    s.spawn(move || drain(&accepted(&h, r).1))
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for (i, (r, (toks, text, last))) in reqs.iter().zip(outs).enumerate() {
            let mut c = Cache::new(&m, 256);
            let g = generate(&m, &tok, &r.budget, &mut c, &r.prompt, &r.config, |_| {}).unwrap();
            assert_eq!(toks, g.tokens, "{name}: request {i}");
            assert_eq!(text, g.text, "{name}: request {i}");
            let Update::Finished(f) = last else {
                panic!("{name}: request {i} ended with {last:?}")
            };
            assert_eq!(
                (f.prompt_tokens, f.tokens),
                (r.prompt.len(), g.tokens.len())
            );
        }
        wait_for("the counters to settle", || {
            svc.handle().metrics().running == 0
        });
        let mt = svc.handle().metrics();
        assert_eq!(mt.finished, 8, "{name}: {mt:?}");
        let prompt: usize = reqs.iter().map(|r| r.prompt.len()).sum();
        assert_eq!(mt.prompt_tokens, prompt as u64);
        assert_eq!(mt.generated_tokens, (6..14).sum::<u64>());
        svc.shutdown(false);
    }
}

/// One slot and a queue of one: a third request is refused; dropping the running request's
/// receiver cancels it and the waiting one runs; control reaches running requests only; a
/// shutdown that cancels fails what runs. The long requests ask for more tokens than they can
/// make in a minute (a context of 32 768), so none ends before the test acts on it, however
/// loaded the machine.
#[test]
fn queue_cancellation_control_and_shutdown() {
    let (_, m, sub) = fixtures().swap_remove(0);
    let tok = Arc::new(Tokenizer::for_model(&m).unwrap());
    let m = Arc::new(m);
    let small = m.budget(sub).unwrap();
    let full = m.full_budget();
    const LONG: usize = 32_000;
    let svc = start(&m, &tok, 1, 1, 32_768);
    let h = svc.handle();
    let (a, rx_a) = accepted(&h, req(&m, &full, 4, 1, LONG));
    assert_eq!(rx_a.recv().unwrap(), Update::Started);
    let (b, rx_b) = accepted(&h, req(&m, &full, 4, 2, 5));
    assert!(matches!(
        h.submit(req(&m, &full, 4, 3, 5)),
        Submitted::QueueFull
    ));
    // A request that cannot run is refused at once, even with the queue full.
    let mut bad = req(&m, &full, 4, 3, 5);
    bad.prompt = vec![u32::MAX];
    assert!(matches!(
        h.submit(bad),
        Submitted::Refused(e) if e.to_string().contains("outside the vocabulary")
    ));
    // Control: the waiting request is not running; the running one takes a budget change and
    // refuses to end a reasoning it does not have.
    let e = h.control(b, Action::EndReasoning).unwrap_err().to_string();
    assert!(e.contains("not running"), "{e}");
    h.control(a, Action::SetBudget(small.clone(), "small".into()))
        .unwrap();
    let e = h.control(a, Action::EndReasoning).unwrap_err().to_string();
    assert!(e.contains("is not thinking"), "{e}");
    // Cancel a by dropping its receiver: b runs and finishes.
    drop(rx_a);
    let (toks, _, last) = drain(&rx_b);
    assert!(matches!(last, Update::Finished(_)), "{last:?}");
    assert_eq!(toks.len(), 5);
    wait_for("the counters to settle", || {
        let mt = h.metrics();
        (mt.running, mt.waiting, mt.finished, mt.cancelled) == (0, 0, 1, 1)
    });
    // End reasoning on a thinking request.
    let end = think_end(None, &tok, Some("</think>")).unwrap();
    let mut r = req(&m, &full, 4, 4, LONG);
    r.think = Some(ThinkControl {
        end: end.clone(),
        cap: None,
        grace: 0,
    });
    let (c, rx_c) = accepted(&h, r);
    assert_eq!(rx_c.recv().unwrap(), Update::Started);
    h.control(c, Action::EndReasoning).unwrap();
    // The engine keeps stepping while the action travels, so the marker comes some tokens
    // later; a random fixture never writes it by itself. Then drop the request.
    let mut toks = vec![];
    while !toks.windows(end.tokens.len()).any(|w| w == &end.tokens[..]) {
        match rx_c.recv().unwrap() {
            Update::Tokens { tokens, .. } => toks.extend(tokens),
            u => panic!("ended without the marker: {u:?} after {toks:?}"),
        }
    }
    drop(rx_c);
    wait_for("the second cancellation", || h.metrics().cancelled == 2);
    // A shutdown that cancels fails the running request.
    let (_, rx_d) = accepted(&h, req(&m, &full, 4, 5, LONG));
    assert_eq!(rx_d.recv().unwrap(), Update::Started);
    svc.shutdown(true);
    let last = loop {
        match rx_d.recv().unwrap() {
            Update::Tokens { .. } => {}
            u => break u,
        }
    };
    assert!(
        matches!(last, Update::Failed(ref e) if e.contains("shutting down")),
        "{last:?}"
    );
    // After the shutdown, a submit fails at once.
    match h.submit(req(&m, &full, 4, 6, 5)) {
        Submitted::Accepted { updates, .. } => {
            assert!(matches!(updates.recv().unwrap(), Update::Failed(_)))
        }
        Submitted::QueueFull => {}
        Submitted::Refused(e) => panic!("refused: {e}"),
    }
}
