//! `elastica serve`: an OpenAI-compatible HTTP server (axum) over the runtime's
//! [`Service`], which owns the engine on its own thread; handlers talk to it over channels, as
//! mistral.rs's server does. One loaded copy serves every budget: a request picks its budget by
//! model id (`NAME:BUDGET`) or by field, may think at one budget and answer at another, and may
//! speculate with a nested draft (serving-and-quant-conventions.md for the peers' conventions).
//!
//! Endpoints: `POST /v1/chat/completions`, `POST /v1/completions`, `GET /v1/models`,
//! `GET /health` (503 while loading), `GET /metrics` (Prometheus), and
//! `POST /v1/chat/completions/control` (`end_reasoning`, `set_budget` on a running request).
//!
//! Layering: server → runtime → core; nothing below imports it.

pub mod api;
pub mod error;
mod metrics;
pub mod reasoning;
pub mod respond;
pub mod state;

use crate::api::Kind;
use crate::error::ApiError;
use crate::respond::{Flight, Outcome};
use crate::state::{App, Ready};
use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use elastica_core::error::{Error, Result};
use elastica_core::generate::think;
use elastica_core::generate::tokenizer::Tokenizer;
use elastica_core::model::Model;
use elastica_runtime::service::{Action, Service, ServiceConfig, Submitted, Update};
use serde_json::json;
use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

/// Whether each request logs its line (stderr).
pub(crate) static LOG: AtomicBool = AtomicBool::new(true);

/// `elastica serve`'s settings.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    pub host: String,
    pub port: u16,
    /// The model id (default: the model file's stem).
    pub name: String,
    /// The budget of requests that name none.
    pub budget: String,
    pub api_key: Option<String>,
    /// Request bodies larger than this are refused (413).
    pub max_body: usize,
    /// Output tokens per request at most.
    pub max_tokens: usize,
    pub service: ServiceConfig,
    /// The default draft budget of speculative decoding (`--speculate`).
    pub speculate: Option<String>,
    /// In-flight requests may finish for this long after SIGTERM; then they are cancelled.
    pub shutdown_grace: Duration,
    pub log: bool,
}

/// What `serve` loads: the model, its tokenizer, and the config completed from the model
/// (such as a context that defaults to the model's).
pub type Loaded = (Model, Tokenizer, ServerConfig);

/// Serves until SIGTERM or SIGINT: binds first (so `/health` answers 503 while loading), loads
/// the model with `load` on its own thread, then serves. Returns after a graceful shutdown;
/// errors: the address cannot be bound, or the model cannot be loaded.
pub fn serve(
    cfg: ServerConfig,
    load: impl FnOnce(ServerConfig) -> Result<Loaded> + Send + 'static,
) -> Result<()> {
    LOG.store(cfg.log, Ordering::Relaxed);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .thread_name("elastica-http")
        .build()
        .map_err(|e| Error::Input(format!("cannot start the HTTP runtime: {e}")))?;
    rt.block_on(run(cfg, load))
}

async fn run(
    cfg: ServerConfig,
    load: impl FnOnce(ServerConfig) -> Result<Loaded> + Send + 'static,
) -> Result<()> {
    let addr = format!("{}:{}", cfg.host, cfg.port);
    let listener = tokio::net::TcpListener::bind(&addr)
        .await
        .map_err(|e| Error::Input(format!("--host/--port: cannot listen on {addr}: {e}")))?;
    let local = listener
        .local_addr()
        .map_err(|e| Error::Input(format!("{addr}: {e}")))?;
    eprintln!("listening on http://{local} (loading the model)");
    let app = Arc::new(App {
        ready: OnceLock::new(),
        api_key: cfg.api_key.clone(),
        stopping: AtomicBool::new(false),
        log: cfg.log,
    });
    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);

    // Load on a thread of its own; a failure ends the server with the error.
    let loaded: Arc<Mutex<Option<Service>>> = Arc::new(Mutex::new(None));
    let (app2, loaded2, cfg2) = (app.clone(), loaded.clone(), cfg.clone());
    let loader = tokio::task::spawn_blocking(move || -> Result<()> {
        let (model, tok, cfg2) = load(cfg2)?;
        let ready = start(model, tok, &cfg2)?;
        let (ready, service) = ready;
        *loaded2.lock().unwrap_or_else(|e| e.into_inner()) = Some(service);
        let _ = app2.ready.set(Arc::new(ready));
        Ok(())
    });

    let router = router(app.clone(), cfg.max_body);
    let app3 = app.clone();
    let shutdown = async move {
        let _ = stop_rx.wait_for(|s| *s).await;
        app3.stopping.store(true, Ordering::SeqCst);
    };
    let server = axum::serve(listener, router).with_graceful_shutdown(shutdown);
    let server = tokio::spawn(async move { server.await });

    // Wait for loading, then for a signal.
    let load_result = match loader.await {
        Ok(r) => r,
        Err(e) => Err(Error::Input(format!("loading failed: {e}"))),
    };
    if let Err(e) = load_result {
        let _ = stop_tx.send(true);
        let _ = server.await;
        return Err(e);
    }
    if let Some(r) = app.ready.get() {
        eprintln!(
            "ready: model {} ({} budgets), http://{local}/v1",
            r.name,
            1 + r.budget_names().len()
        );
    }
    let sig = wait_signal().await;
    eprintln!(
        "{sig}: shutting down (in-flight requests get {:.0} s to finish)",
        cfg.shutdown_grace.as_secs_f64()
    );
    app.stopping.store(true, Ordering::SeqCst);
    if let Some(r) = app.ready.get() {
        // Waiting requests are refused from now on; running ones finish.
        r.handle.stop(false);
    }
    let _ = stop_tx.send(true);
    let grace = tokio::time::sleep(cfg.shutdown_grace);
    tokio::pin!(grace);
    let mut server = server;
    tokio::select! {
        _ = &mut server => {}
        _ = &mut grace => {
            eprintln!("cancelling the requests still running");
            if let Some(r) = app.ready.get() {
                r.handle.stop(true);
            }
            let _ = server.await;
        }
    }
    let service = loaded.lock().unwrap_or_else(|e| e.into_inner()).take();
    if let Some(s) = service {
        tokio::task::spawn_blocking(move || s.shutdown(true))
            .await
            .ok();
    }
    eprintln!("stopped");
    Ok(())
}

async fn wait_signal() -> &'static str {
    use tokio::signal::unix::{SignalKind, signal};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut t), Ok(mut i)) => tokio::select! {
            _ = t.recv() => "SIGTERM",
            _ = i.recv() => "SIGINT",
        },
        _ => {
            let _ = tokio::signal::ctrl_c().await;
            "SIGINT"
        }
    }
}

/// The service over the loaded model and what the handlers need of it.
fn start(model: Model, tok: Tokenizer, cfg: &ServerConfig) -> Result<(Ready, Service)> {
    let model = Arc::new(model);
    let tok = Arc::new(tok);
    model
        .budget(&cfg.budget)
        .map_err(|e| Error::Input(format!("--budget {}: {e}", cfg.budget)))?;
    let speculate = match &cfg.speculate {
        Some(d) => {
            let b = model
                .budget(d)
                .map_err(|e| Error::Input(format!("--speculate {d}: {e}")))?;
            Some((b, cfg.service.engine.draft_max))
        }
        None => None,
    };
    let template = model.meta.chat_template.clone();
    let think_end = template
        .as_deref()
        .and_then(|t| think::think_end(Some(t), &tok, None).ok());
    let service = Service::start(model.clone(), tok.clone(), cfg.service)?;
    let created = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let ready = Ready {
        handle: service.handle(),
        model,
        tok,
        name: cfg.name.clone(),
        default_budget: cfg.budget.clone(),
        template,
        think_end,
        ctx: cfg.service.engine.ctx,
        max_tokens: cfg.max_tokens,
        speculate,
        draft: cfg.service.engine.draft_max,
        created,
        running: Mutex::new(HashMap::new()),
    };
    Ok((ready, service))
}

/// The routes over `app`; bodies above `max_body` bytes are refused (413).
pub fn router(app: Arc<App>, max_body: usize) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route("/v1/models", get(models))
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions/control", post(control))
        .fallback(|| async { ApiError::not_found("no such endpoint", "not_found").into_response() })
        .layer(DefaultBodyLimit::max(max_body))
        .with_state(app)
}

/// The loaded server, or 503 while loading / shutting down; 401 without the API key.
fn ready(app: &App, headers: &HeaderMap) -> std::result::Result<Arc<Ready>, ApiError> {
    if let Some(key) = &app.api_key {
        let given = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if given != Some(key.as_str()) {
            return Err(ApiError::unauthorized());
        }
    }
    if app.stopping.load(Ordering::SeqCst) {
        return Err(ApiError::unavailable("the server is shutting down"));
    }
    app.ready
        .get()
        .cloned()
        .ok_or_else(|| ApiError::unavailable("the model is loading"))
}

async fn health(State(app): State<Arc<App>>) -> Response {
    match app.ready.get() {
        Some(_) if !app.stopping.load(Ordering::SeqCst) => {
            axum::Json(json!({"status": "ok"})).into_response()
        }
        Some(_) => ApiError::unavailable("the server is shutting down").into_response(),
        None => ApiError::unavailable("the model is loading").into_response(),
    }
}

async fn metrics(State(app): State<Arc<App>>) -> Response {
    match app.ready.get() {
        Some(r) => (
            [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
            metrics::render(&r.handle.metrics()),
        )
            .into_response(),
        None => ApiError::unavailable("the model is loading").into_response(),
    }
}

async fn models(State(app): State<Arc<App>>, headers: HeaderMap) -> Response {
    let r = match ready(&app, &headers) {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    let entry = |id: String, budget: &str| {
        let spec = r
            .model
            .budget(budget)
            .map(|b| (b.spec(&r.model.shape), r.model.params(&b).0))
            .ok();
        json!({
            "id": id, "object": "model", "created": r.created, "owned_by": "elastica",
            "budget": budget, "spec": spec.as_ref().map(|s| &s.0),
            "params": spec.as_ref().map(|s| s.1), "max_model_len": r.ctx,
        })
    };
    let mut data = vec![entry(r.name.clone(), &r.default_budget)];
    for b in r.budget_names() {
        data.push(entry(format!("{}:{b}", r.name), &b));
    }
    axum::Json(json!({"object": "list", "data": data})).into_response()
}

/// A request body, or 413/400 as an OpenAI error.
fn body(b: std::result::Result<Bytes, BytesRejection>) -> std::result::Result<Bytes, ApiError> {
    b.map_err(|e| {
        let status = e.status();
        let mut err = ApiError::bad(None, format!("cannot read the body: {}", e.body_text()));
        if status == StatusCode::PAYLOAD_TOO_LARGE {
            err.status = status;
            err.message = "the request body is larger than this server's limit (--max-body)".into();
        }
        err
    })
}

async fn chat(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    b: std::result::Result<Bytes, BytesRejection>,
) -> Response {
    generate(app, headers, b, Kind::Chat)
        .await
        .unwrap_or_else(|e| e.into_response())
}

async fn completions(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    b: std::result::Result<Bytes, BytesRejection>,
) -> Response {
    generate(app, headers, b, Kind::Completion)
        .await
        .unwrap_or_else(|e| e.into_response())
}

/// A fresh response id.
fn response_id(kind: Kind) -> String {
    use std::sync::atomic::AtomicU64;
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let pid = std::process::id();
    match kind {
        Kind::Chat => format!("chatcmpl-{pid:x}-{n}"),
        Kind::Completion => format!("cmpl-{pid:x}-{n}"),
    }
}

async fn generate(
    app: Arc<App>,
    headers: HeaderMap,
    b: std::result::Result<Bytes, BytesRejection>,
    kind: Kind,
) -> std::result::Result<Response, ApiError> {
    let r = ready(&app, &headers)?;
    let b = body(b)?;
    let job = api::parse(&r, kind, &b)?;
    let id = job.request_id.clone().unwrap_or_else(|| response_id(kind));
    {
        let mut running = r.running.lock().unwrap_or_else(|e| e.into_inner());
        if running.contains_key(&id) {
            return Err(ApiError::bad(
                "request_id".to_string(),
                format!("request_id: {id:?} is already running"),
            ));
        }
        running.insert(id.clone(), vec![]);
    }
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let mut flight = Flight::new(r.clone(), id.clone(), &job, rx);
    let mut ids = vec![];
    for (i, req) in job.choices.into_iter().enumerate() {
        let tx = tx.clone();
        let sink = Box::new(move |u: Update| tx.send((i, u)).is_ok());
        match r.handle.submit_to(req, job.labels.clone(), sink) {
            Submitted::Accepted { id, .. } => ids.push(id),
            // Dropping `flight` cancels the choices already queued.
            Submitted::QueueFull => {
                return Err(ApiError::unavailable(
                    "the server is busy: the request queue is full (--queue); retry later",
                ));
            }
            Submitted::Refused(e) => return Err(ApiError::bad(None, e.to_string())),
        }
    }
    drop(tx);
    if let Some(v) = r
        .running
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get_mut(&id)
    {
        *v = ids;
    }
    if job.stream {
        return Ok(stream(flight).into_response());
    }
    while flight.open > 0 && flight.outcome != Outcome::Failed {
        match flight.rx.recv().await {
            Some((i, u)) => {
                flight.update(i, u, false);
            }
            None => {
                flight.outcome = Outcome::Failed;
                flight.error = Some("the engine stopped".into());
            }
        }
    }
    if flight.outcome == Outcome::Failed {
        let e = flight.error.clone().unwrap_or_default();
        return Err(match e.contains("shutting down") {
            true => ApiError::unavailable(e),
            false => ApiError::internal(e),
        });
    }
    Ok(axum::Json(flight.response()).into_response())
}

/// Server-sent events as OpenAI streams them: chunks, the usage chunk
/// (`stream_options.include_usage`), then `data: [DONE]`.
fn stream(
    flight: Flight,
) -> Sse<impl futures_util::Stream<Item = std::result::Result<Event, Infallible>>> {
    let s = futures_util::stream::unfold(
        (flight, VecDeque::<Event>::new(), false),
        |(mut f, mut q, done)| async move {
            loop {
                if let Some(e) = q.pop_front() {
                    return Some((Ok(e), (f, q, done)));
                }
                if done {
                    return None;
                }
                let end = match f.rx.recv().await {
                    Some((i, u)) => {
                        for c in f.update(i, u, true) {
                            q.push_back(Event::default().data(c.to_string()));
                        }
                        f.open == 0 || f.outcome == Outcome::Failed
                    }
                    None => {
                        f.outcome = Outcome::Failed;
                        f.error = Some("the engine stopped".into());
                        true
                    }
                };
                if end {
                    if f.outcome == Outcome::Failed {
                        let msg = f.error.clone().unwrap_or_default();
                        let e = match msg.contains("shutting down") {
                            true => ApiError::unavailable(msg),
                            false => ApiError::internal(msg),
                        };
                        q.push_back(Event::default().data(e.body().to_string()));
                    } else if f.include_usage {
                        q.push_back(Event::default().data(f.usage_chunk().to_string()));
                    }
                    q.push_back(Event::default().data("[DONE]"));
                    return q.pop_front().map(|e| (Ok(e), (f, q, true)));
                }
            }
        },
    );
    Sse::new(s)
}

#[derive(serde::Deserialize)]
struct ControlBody {
    id: String,
    action: String,
    budget: Option<String>,
}

/// `POST /v1/chat/completions/control`: `end_reasoning` or `set_budget` on a running request.
async fn control(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    b: std::result::Result<Bytes, BytesRejection>,
) -> Response {
    let go = async {
        let r = ready(&app, &headers)?;
        let b = body(b)?;
        let v: serde_json::Value = serde_json::from_slice(&b)
            .map_err(|e| ApiError::bad(None, format!("the body is not valid JSON: {e}")))?;
        let c: ControlBody = serde_path_to_error::deserialize(&v).map_err(ApiError::from_serde)?;
        let (action, label) = match (c.action.as_str(), &c.budget) {
            ("end_reasoning", None) => (Action::EndReasoning, None),
            ("end_reasoning", Some(_)) => {
                return Err(ApiError::bad(
                    "budget".to_string(),
                    "budget: end_reasoning takes no budget",
                ));
            }
            ("set_budget", Some(s)) => {
                let b = r
                    .model
                    .budget(s)
                    .map_err(|e| ApiError::bad("budget".to_string(), format!("budget: {e}")))?;
                let label = r.label(s, &b);
                (Action::SetBudget(b, label.clone()), Some(label))
            }
            ("set_budget", None) => {
                return Err(ApiError::bad(
                    "budget".to_string(),
                    "budget: set_budget needs a budget",
                ));
            }
            (a, _) => {
                return Err(ApiError::bad(
                    "action".to_string(),
                    format!("action: {a:?} is not \"end_reasoning\" or \"set_budget\""),
                ));
            }
        };
        let ids = r
            .running
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&c.id)
            .cloned()
            .ok_or_else(|| {
                ApiError::not_found(
                    format!("no running request {:?}", c.id),
                    "request_not_found",
                )
            })?;
        let handle = r.handle.clone();
        let result = tokio::task::spawn_blocking(move || {
            ids.iter()
                .map(|&i| handle.control(i, action.clone()))
                .collect::<Vec<_>>()
        })
        .await
        .map_err(|e| ApiError::internal(e.to_string()))?;
        let applied = result.iter().filter(|x| x.is_ok()).count();
        if applied == 0 {
            let why = result
                .into_iter()
                .find_map(|x| x.err())
                .map_or_else(|| "no choice is running".into(), |e| e.to_string());
            let err = match why.contains("is not running") {
                true => {
                    ApiError::not_found(format!("request {:?}: {why}", c.id), "request_not_found")
                }
                false => ApiError::bad(None, format!("request {:?}: {why}", c.id)),
            };
            return Err(err);
        }
        Ok(axum::Json(json!({
            "id": c.id, "action": c.action, "budget": label, "applied": applied,
        }))
        .into_response())
    };
    go.await.unwrap_or_else(|e: ApiError| e.into_response())
}
