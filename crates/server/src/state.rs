//! What the handlers share: the loaded model and the service's handle once loading is done,
//! the model ids, and the requests in flight (for the control endpoint).

use crate::error::ApiError;
use elastica_core::budget::Budget;
use elastica_core::generate::think::ThinkMarker;
use elastica_core::generate::tokenizer::Tokenizer;
use elastica_core::model::Model;
use elastica_runtime::service::Handle;
use std::collections::HashMap;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex, OnceLock};

/// The server once the model is loaded.
pub struct Ready {
    pub model: Arc<Model>,
    pub tok: Arc<Tokenizer>,
    pub handle: Handle,
    /// The model id; `NAME:BUDGET` ids pick a budget.
    pub name: String,
    /// The budget of requests that name none (`--budget`).
    pub default_budget: String,
    pub template: Option<String>,
    /// The end-of-thinking marker of the chat template, when it has thinking markers.
    pub think_end: Option<ThinkMarker>,
    /// Tokens per request, prompt and output (`--ctx`).
    pub ctx: usize,
    /// Output tokens per request at most (`--max-tokens`).
    pub max_tokens: usize,
    /// The default draft budget and draft length (`--speculate B --draft K`).
    pub speculate: Option<(Budget, usize)>,
    /// Draft tokens per round a request may ask for at most.
    pub draft: usize,
    /// Seconds since the epoch at load (the models' `created`).
    pub created: u64,
    /// Requests in flight: response id → service request ids (one per choice).
    pub running: Mutex<HashMap<String, Vec<u64>>>,
}

/// The handlers' state.
pub struct App {
    pub ready: OnceLock<Arc<Ready>>,
    pub api_key: Option<String>,
    /// Set on SIGTERM/SIGINT: new requests are refused.
    pub stopping: AtomicBool,
    /// The log line per request.
    pub log: bool,
}

impl Ready {
    /// The manifest's budget names, in its order.
    pub fn budget_names(&self) -> Vec<String> {
        let m = self.model.meta.manifest.as_ref();
        m.map(|m| m.budgets.iter().map(|b| b.name.clone()).collect())
            .unwrap_or_default()
    }

    /// The budget a model id names: None for `NAME`, `B` for `NAME:B` (a manifest name, `full`
    /// or any budget the model resolves). 404 for other ids.
    pub fn budget_of_id<'a>(&self, id: &'a str) -> Result<Option<&'a str>, ApiError> {
        if id == self.name {
            return Ok(None);
        }
        if let Some(b) = id
            .strip_prefix(self.name.as_str())
            .and_then(|r| r.strip_prefix(':'))
            && self.model.budget(b).is_ok()
        {
            return Ok(Some(b));
        }
        let ids: Vec<String> = std::iter::once(self.name.clone())
            .chain(
                self.budget_names()
                    .iter()
                    .map(|b| format!("{}:{b}", self.name)),
            )
            .collect();
        Err(ApiError::not_found(
            format!(
                "the model {id:?} does not exist: this server has {} (or {name}:BUDGET for any budget, such as {name}:0.6)",
                ids.join(", "),
                name = self.name
            ),
            "model_not_found",
        ))
    }

    /// The metrics label of budget `b`, given as `given`: the manifest name or `full` as given,
    /// else its explicit sizes.
    pub fn label(&self, given: &str, b: &Budget) -> String {
        let g = given.trim();
        if g == "full" || self.budget_names().iter().any(|n| n == g) {
            g.to_string()
        } else {
            b.spec(&self.model.shape)
        }
    }
}
