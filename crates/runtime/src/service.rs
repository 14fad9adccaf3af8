//! The engine on its own thread, for callers on other threads (the server's HTTP handlers): they
//! submit a [`Request`] and receive its tokens and text as [`Update`]s over a channel, as
//! mistral.rs's server talks to its engine. The thread owns the [`Engine`]; nothing else touches
//! the model's sequences.
//!
//! - Requests beyond `--parallel` wait in a queue of at most `queue` requests, oldest first; a
//!   submit to a full queue is refused at once ([`Submitted::QueueFull`]).
//! - A caller that drops its receiver cancels its request: the next update that cannot be
//!   delivered removes the sequence and frees its slot (a client that disconnects).
//! - [`Handle::control`] acts on a running request ([`Action`]); [`Handle::metrics`] is a snapshot
//!   of the counters; [`Service::shutdown`] lets running requests finish (or cancels them), then
//!   joins the thread.

use crate::scheduler::{Engine, EngineConfig, Finished, Request, SeqId, SpecTotals};
use elastica_core::budget::Budget;
use elastica_core::error::{Error, Result};
use elastica_core::generate::tokenizer::Tokenizer;
use elastica_core::model::Model;
use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, Sender, SyncSender, TryRecvError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

/// What a request's receiver gets: its output in order, then exactly one `Finished` or `Failed`.
#[derive(Clone, Debug, PartialEq)]
pub enum Update {
    /// The request left the queue and its prompt started running.
    Started,
    /// Tokens output in one step and their text (the text may lag the tokens: stop strings and
    /// incomplete UTF-8 are held back). `switched`: the request moved to its answer budget.
    Tokens {
        tokens: Vec<u32>,
        text: String,
        switched: bool,
    },
    Finished(Finished),
    /// The engine refused the request or failed while running it.
    Failed(String),
}

/// An action on a running request (the control endpoint).
#[derive(Clone, Debug)]
pub enum Action {
    /// Force the end-of-thinking marker now.
    EndReasoning,
    /// Run at this budget from the next step on.
    SetBudget(Budget),
}

/// The outcome of [`Handle::submit`].
pub enum Submitted {
    /// Accepted: its id (for [`Handle::control`]) and its updates.
    Accepted { id: u64, updates: Receiver<Update> },
    /// `queue` requests are waiting already.
    QueueFull,
}

/// Counters of the service (the server's /metrics).
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Metrics {
    pub running: usize,
    pub waiting: usize,
    pub prompt_tokens: u64,
    pub generated_tokens: u64,
    /// Requests finished, cancelled and failed.
    pub finished: u64,
    pub cancelled: u64,
    pub failed: u64,
    pub spec: SpecTotals,
}

/// Sizes fixed at start.
#[derive(Clone, Copy, Debug)]
pub struct ServiceConfig {
    pub engine: EngineConfig,
    /// Requests that may wait for a slot at most.
    pub queue: usize,
}

enum Command {
    Submit {
        id: u64,
        req: Box<Request>,
        updates: Sender<Update>,
    },
    Control {
        id: u64,
        action: Action,
        reply: Sender<Result<()>>,
    },
    Shutdown {
        cancel: bool,
    },
}

/// The caller's side of the service; clone it for every handler.
#[derive(Clone)]
pub struct Handle {
    tx: SyncSender<Command>,
    next_id: Arc<AtomicU64>,
    waiting: Arc<AtomicUsize>,
    metrics: Arc<Mutex<Metrics>>,
    queue: usize,
}

/// The engine thread; [`Service::handle`] gives callers their side.
pub struct Service {
    handle: Handle,
    thread: Option<JoinHandle<()>>,
}

impl Service {
    /// Starts the engine thread over `model`. Errors (bad sizes, memory) come from
    /// [`Engine::new`], which runs on that thread before this returns.
    pub fn start(model: Arc<Model>, tok: Arc<Tokenizer>, cfg: ServiceConfig) -> Result<Service> {
        let (tx, rx) = mpsc::sync_channel(cfg.queue.max(1) + cfg.engine.parallel + 16);
        let metrics = Arc::new(Mutex::new(Metrics::default()));
        let waiting = Arc::new(AtomicUsize::new(0));
        let (m, w) = (metrics.clone(), waiting.clone());
        let (ready_tx, ready) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("elastica-engine".into())
            .spawn(move || match Engine::new(&model, &tok, cfg.engine) {
                Ok(eng) => {
                    let _ = ready_tx.send(Ok(()));
                    run(eng, rx, &m, &w)
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                }
            })
            .map_err(|e| Error::Input(format!("cannot start the engine thread: {e}")))?;
        match ready.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                let _ = thread.join();
                return Err(e);
            }
            Err(_) => {
                let _ = thread.join();
                return Err(Error::Input(
                    "the engine thread ended while starting".into(),
                ));
            }
        }
        Ok(Service {
            handle: Handle {
                tx,
                next_id: Arc::new(AtomicU64::new(0)),
                waiting,
                metrics,
                queue: cfg.queue,
            },
            thread: Some(thread),
        })
    }

    pub fn handle(&self) -> Handle {
        self.handle.clone()
    }

    /// Stops taking requests; running and waiting ones finish (`cancel`: are cancelled, and
    /// their receivers get `Failed`); returns when the engine thread has ended.
    pub fn shutdown(mut self, cancel: bool) {
        let _ = self.handle.tx.send(Command::Shutdown { cancel });
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        if let Some(t) = self.thread.take() {
            let _ = self.handle.tx.send(Command::Shutdown { cancel: true });
            let _ = t.join();
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Handle {
    /// Queues `req`; refused when `queue` requests already wait.
    pub fn submit(&self, req: Request) -> Submitted {
        let queued = self
            .waiting
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |w| {
                (w < self.queue).then_some(w + 1)
            });
        if queued.is_err() {
            return Submitted::QueueFull;
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        let (tx, rx) = mpsc::channel();
        if self
            .tx
            .send(Command::Submit {
                id,
                req: Box::new(req),
                updates: tx,
            })
            .is_err()
        {
            self.waiting.fetch_sub(1, Ordering::SeqCst);
            let (tx, rx) = mpsc::channel();
            let _ = tx.send(Update::Failed("the engine has stopped".into()));
            return Submitted::Accepted { id, updates: rx };
        }
        Submitted::Accepted { id, updates: rx }
    }

    /// Acts on running request `id`; errors when it is not running or the action does not apply.
    pub fn control(&self, id: u64, action: Action) -> Result<()> {
        let (tx, rx) = mpsc::channel();
        self.tx
            .send(Command::Control {
                id,
                action,
                reply: tx,
            })
            .map_err(|_| Error::Input("the engine has stopped".into()))?;
        rx.recv()
            .map_err(|_| Error::Input("the engine has stopped".into()))?
    }

    pub fn metrics(&self) -> Metrics {
        lock(&self.metrics).clone()
    }
}

/// A request waiting for a slot.
struct Waiting {
    id: u64,
    req: Request,
    updates: Sender<Update>,
}

/// The engine loop: take commands (blocking only when idle), fill free slots from the queue,
/// step, deliver updates.
fn run(mut eng: Engine, rx: Receiver<Command>, metrics: &Mutex<Metrics>, waiting: &AtomicUsize) {
    let unqueue = || waiting.fetch_sub(1, Ordering::SeqCst);
    let mut queue: VecDeque<Waiting> = VecDeque::new();
    // Running requests by sequence, and sequences by request id.
    let mut running: BTreeMap<SeqId, (u64, Sender<Update>)> = BTreeMap::new();
    let mut seq_of: BTreeMap<u64, SeqId> = BTreeMap::new();
    let mut stopping: Option<bool> = None;
    loop {
        // Commands: wait for one when there is nothing to run.
        loop {
            let c = if eng.is_idle() && queue.is_empty() && stopping.is_none() {
                match rx.recv() {
                    Ok(c) => c,
                    Err(_) => return,
                }
            } else {
                match rx.try_recv() {
                    Ok(c) => c,
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => {
                        stopping.get_or_insert(true);
                        break;
                    }
                }
            };
            match c {
                Command::Submit { id, req, updates } => match stopping {
                    Some(_) => {
                        unqueue();
                        let _ = updates.send(Update::Failed("the server is shutting down".into()));
                    }
                    None => queue.push_back(Waiting {
                        id,
                        req: *req,
                        updates,
                    }),
                },
                Command::Control { id, action, reply } => {
                    let r = match seq_of.get(&id) {
                        None => Err(Error::Input(format!("request {id} is not running"))),
                        Some(&s) => match action {
                            Action::EndReasoning => eng.end_reasoning(s),
                            Action::SetBudget(b) => eng.set_budget(s, b),
                        },
                    };
                    let _ = reply.send(r);
                }
                Command::Shutdown { cancel } => {
                    stopping = Some(cancel);
                }
            }
        }
        if stopping == Some(true) {
            let mut m = lock(metrics);
            for w in queue.drain(..) {
                unqueue();
                let _ = w.updates.send(Update::Failed(
                    "cancelled: the server is shutting down".into(),
                ));
                m.cancelled += 1;
            }
            for (s, (_, tx)) in std::mem::take(&mut running) {
                let _ = eng.remove(s);
                let _ = tx.send(Update::Failed(
                    "cancelled: the server is shutting down".into(),
                ));
                m.cancelled += 1;
            }
            seq_of.clear();
        }
        // Free slots to the oldest waiting requests.
        while eng.active() < eng.config().parallel {
            let Some(w) = queue.pop_front() else { break };
            unqueue();
            let prompt = w.req.prompt.len() as u64;
            match eng.add(w.req) {
                Ok(s) => {
                    lock(metrics).prompt_tokens += prompt;
                    if w.updates.send(Update::Started).is_ok() {
                        running.insert(s, (w.id, w.updates));
                        seq_of.insert(w.id, s);
                    } else {
                        let _ = eng.remove(s);
                        lock(metrics).cancelled += 1;
                    }
                }
                Err(e) => {
                    lock(metrics).failed += 1;
                    let _ = w.updates.send(Update::Failed(e.to_string()));
                }
            }
        }
        if eng.is_idle() {
            {
                let mut m = lock(metrics);
                (m.running, m.waiting) = (0, queue.len());
            }
            if stopping.is_some() && queue.is_empty() {
                return;
            }
            continue;
        }
        let mut gone: Vec<SeqId> = vec![];
        match eng.step() {
            Ok(ev) => {
                let mut m = lock(metrics);
                for (e, toks, text) in ev.iter() {
                    let Some((id, tx)) = running.get(&e.seq) else {
                        continue;
                    };
                    m.generated_tokens += toks.len() as u64;
                    let mut ok = true;
                    if !toks.is_empty() || !text.is_empty() || e.switched {
                        ok = tx
                            .send(Update::Tokens {
                                tokens: toks.to_vec(),
                                text: text.to_string(),
                                switched: e.switched,
                            })
                            .is_ok();
                    }
                    if let Some(f) = e.finished {
                        let _ = tx.send(Update::Finished(f));
                        m.finished += 1;
                        seq_of.remove(id);
                        gone.push(e.seq);
                    } else if !ok {
                        // The caller dropped its receiver: cancel.
                        m.cancelled += 1;
                        seq_of.remove(id);
                        gone.push(e.seq);
                    }
                }
            }
            Err(err) => {
                // The engine's sequences are in an unknown state: fail them all.
                let mut m = lock(metrics);
                for (s, (_, tx)) in std::mem::take(&mut running) {
                    let _ = eng.remove(s);
                    let _ = tx.send(Update::Failed(err.to_string()));
                    m.failed += 1;
                }
                seq_of.clear();
            }
        }
        for s in gone {
            running.remove(&s);
            if eng.is_active(s) {
                let _ = eng.remove(s);
            }
        }
        let mut m = lock(metrics);
        (m.running, m.waiting) = (running.len(), queue.len());
        m.spec = eng.spec_totals().clone();
    }
}
