//! The engine on its own thread, for callers on other threads (the server's HTTP handlers): they
//! submit a [`Request`] and receive its tokens and text as [`Update`]s over a channel, as
//! mistral.rs's server talks to its engine. The thread owns the [`Engine`]; nothing else touches
//! the model's sequences.
//!
//! - Requests beyond `--parallel` wait in a queue of at most `queue` requests, oldest first; a
//!   submit to a full queue is refused at once ([`Submitted::QueueFull`]).
//! - A request is checked ([`check`]) before it is queued: a bad one is refused at once.
//! - A caller that drops its receiver cancels its request: the next update that cannot be
//!   delivered removes the sequence and frees its slot (a client that disconnects). Async
//!   callers pass their own [`Sink`] ([`Handle::submit_to`]).
//! - [`Handle::control`] acts on a running request ([`Action`]); [`Handle::metrics`] is a snapshot
//!   of the counters; [`Service::shutdown`] lets running requests finish (or cancels them), then
//!   joins the thread.

use crate::scheduler::{Engine, EngineConfig, Finished, Request, SeqId, SpecTotals, check};
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
        /// With [`GenConfig::logprobs`](elastica_core::generate::GenConfig::logprobs):
        /// `1 + top` records per token (see [`Decoder::logprobs`](elastica_core::generate::Decoder::logprobs)).
        logprobs: Vec<(u32, f32)>,
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
    /// Run at this budget from the next step on; its metrics label.
    SetBudget(Budget, String),
}

/// Where a request's updates go: returns false once nobody listens (the request is cancelled).
pub type Sink = Box<dyn FnMut(Update) -> bool + Send>;

/// The metrics labels of a request's budgets: the one it starts at, and its answer budget's.
#[derive(Clone, Debug, Default)]
pub struct Labels {
    pub budget: String,
    pub answer: Option<String>,
}

/// Token counts of one budget label.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct BudgetCounts {
    /// Requests started at the budget.
    pub requests: u64,
    pub prompt_tokens: u64,
    /// Tokens generated while running at the budget.
    pub generated_tokens: u64,
}

/// The outcome of [`Handle::submit`] (`R`: the updates' receiver) or [`Handle::submit_to`].
pub enum Submitted<R = Receiver<Update>> {
    /// Accepted: its id (for [`Handle::control`]) and its updates.
    Accepted { id: u64, updates: R },
    /// `queue` requests are waiting already.
    QueueFull,
    /// The request cannot run on this engine ([`check`]).
    Refused(Error),
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
    /// Tokens by budget label ([`Labels`]).
    pub budgets: BTreeMap<String, BudgetCounts>,
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
        labels: Labels,
        updates: Sink,
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
    cfg: ServiceConfig,
    model: Arc<Model>,
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
        let engine_model = model.clone();
        let thread = std::thread::Builder::new()
            .name("elastica-engine".into())
            .spawn(move || match Engine::new(&engine_model, &tok, cfg.engine) {
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
                cfg,
                model,
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
    /// Queues `req`, its updates to a channel; refused when it cannot run or when `queue`
    /// requests already wait.
    pub fn submit(&self, req: Request) -> Submitted {
        let (tx, rx) = mpsc::channel();
        let labels = Labels {
            budget: "default".into(),
            answer: req.answer.as_ref().map(|_| "answer".into()),
        };
        match self.submit_to(req, labels, Box::new(move |u| tx.send(u).is_ok())) {
            Submitted::Accepted { id, .. } => Submitted::Accepted { id, updates: rx },
            Submitted::QueueFull => Submitted::QueueFull,
            Submitted::Refused(e) => Submitted::Refused(e),
        }
    }

    /// Queues `req`, its updates to `sink`, its tokens counted under `labels`.
    pub fn submit_to(&self, req: Request, labels: Labels, mut sink: Sink) -> Submitted<()> {
        if let Err(e) = check(&self.model, &self.cfg.engine, &req) {
            return Submitted::Refused(e);
        }
        let queue = self.cfg.queue;
        let queued = self
            .waiting
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |w| {
                (w < queue).then_some(w + 1)
            });
        if queued.is_err() {
            return Submitted::QueueFull;
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        let cmd = Command::Submit {
            id,
            req: Box::new(req),
            labels,
            updates: sink,
        };
        if let Err(mpsc::SendError(Command::Submit { updates, .. })) = self.tx.send(cmd) {
            self.waiting.fetch_sub(1, Ordering::SeqCst);
            sink = updates;
            sink(Update::Failed("the engine has stopped".into()));
        }
        Submitted::Accepted { id, updates: () }
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

    /// Stops taking requests (they fail with "shutting down"); running and waiting ones
    /// finish, or with `cancel` are cancelled. The thread ends once nothing is left; join it
    /// with [`Service::shutdown`].
    pub fn stop(&self, cancel: bool) {
        let _ = self.tx.send(Command::Shutdown { cancel });
    }

    pub fn metrics(&self) -> Metrics {
        lock(&self.metrics).clone()
    }
}

/// A request waiting for a slot.
struct Waiting {
    id: u64,
    req: Request,
    labels: Labels,
    updates: Sink,
}

/// A running request: its id, updates, and the label its tokens count under now.
struct Running {
    id: u64,
    updates: Sink,
    labels: Labels,
}

/// The engine loop: take commands (blocking only when idle), fill free slots from the queue,
/// step, deliver updates.
fn run(mut eng: Engine, rx: Receiver<Command>, metrics: &Mutex<Metrics>, waiting: &AtomicUsize) {
    let unqueue = || waiting.fetch_sub(1, Ordering::SeqCst);
    let mut queue: VecDeque<Waiting> = VecDeque::new();
    // Running requests by sequence, and sequences by request id.
    let mut running: BTreeMap<SeqId, Running> = BTreeMap::new();
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
                Command::Submit {
                    id,
                    req,
                    labels,
                    mut updates,
                } => match stopping {
                    Some(_) => {
                        unqueue();
                        updates(Update::Failed("the server is shutting down".into()));
                    }
                    None => queue.push_back(Waiting {
                        id,
                        req: *req,
                        labels,
                        updates,
                    }),
                },
                Command::Control { id, action, reply } => {
                    let r = match seq_of.get(&id) {
                        None => Err(Error::Input(format!("request {id} is not running"))),
                        Some(&s) => match action {
                            Action::EndReasoning => eng.end_reasoning(s),
                            Action::SetBudget(b, label) => eng.set_budget(s, b).map(|()| {
                                if let Some(r) = running.get_mut(&s) {
                                    r.labels.budget = label;
                                }
                            }),
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
            let why = || Update::Failed("cancelled: the server is shutting down".into());
            for mut w in queue.drain(..) {
                unqueue();
                (w.updates)(why());
                m.cancelled += 1;
            }
            for (s, mut r) in std::mem::take(&mut running) {
                let _ = eng.remove(s);
                (r.updates)(why());
                m.cancelled += 1;
            }
            seq_of.clear();
        }
        // Free slots to the oldest waiting requests.
        while eng.active() < eng.config().parallel {
            let Some(mut w) = queue.pop_front() else {
                break;
            };
            unqueue();
            let prompt = w.req.prompt.len() as u64;
            match eng.add(w.req) {
                Ok(s) => {
                    {
                        let mut m = lock(metrics);
                        m.prompt_tokens += prompt;
                        let b = m.budgets.entry(w.labels.budget.clone()).or_default();
                        b.requests += 1;
                        b.prompt_tokens += prompt;
                    }
                    if (w.updates)(Update::Started) {
                        running.insert(
                            s,
                            Running {
                                id: w.id,
                                updates: w.updates,
                                labels: w.labels,
                            },
                        );
                        seq_of.insert(w.id, s);
                    } else {
                        let _ = eng.remove(s);
                        lock(metrics).cancelled += 1;
                    }
                }
                Err(e) => {
                    lock(metrics).failed += 1;
                    (w.updates)(Update::Failed(e.to_string()));
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
                    let Some(r) = running.get_mut(&e.seq) else {
                        continue;
                    };
                    m.generated_tokens += toks.len() as u64;
                    let label = r.labels.budget.clone();
                    m.budgets.entry(label).or_default().generated_tokens += toks.len() as u64;
                    if e.switched
                        && let Some(a) = r.labels.answer.take()
                    {
                        r.labels.budget = a;
                    }
                    let mut ok = true;
                    if !toks.is_empty() || !text.is_empty() || e.switched {
                        ok = (r.updates)(Update::Tokens {
                            tokens: toks.to_vec(),
                            text: text.to_string(),
                            switched: e.switched,
                            logprobs: ev.logprobs(e).to_vec(),
                        });
                    }
                    if let Some(f) = e.finished {
                        (r.updates)(Update::Finished(f));
                        m.finished += 1;
                        seq_of.remove(&r.id);
                        gone.push(e.seq);
                    } else if !ok {
                        // The caller stopped listening: cancel.
                        m.cancelled += 1;
                        seq_of.remove(&r.id);
                        gone.push(e.seq);
                    }
                }
            }
            Err(err) => {
                // The engine's sequences are in an unknown state: fail them all.
                let mut m = lock(metrics);
                for (s, mut r) in std::mem::take(&mut running) {
                    let _ = eng.remove(s);
                    (r.updates)(Update::Failed(err.to_string()));
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
