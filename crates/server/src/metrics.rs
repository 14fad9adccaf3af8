//! `/metrics` in Prometheus' text format, under an `elastica:` prefix with vLLM's metric names
//! (`num_requests_running`, `prompt_tokens_total`, `spec_decode_num_drafts_total`, …), plus a
//! `budget` label on the token counters.

use elastica_runtime::service::Metrics;
use std::fmt::Write;

/// Escapes a label value.
fn label(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

pub fn render(m: &Metrics) -> String {
    let mut o = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, rows: &[(String, u64)]| {
        let _ = writeln!(o, "# HELP elastica:{name} {help}");
        let _ = writeln!(o, "# TYPE elastica:{name} {kind}");
        for (labels, v) in rows {
            let _ = writeln!(o, "elastica:{name}{labels} {v}");
        }
    };
    let one = |v: u64| vec![(String::new(), v)];
    let per_budget = |f: &dyn Fn(&elastica_runtime::service::BudgetCounts) -> u64| {
        m.budgets
            .iter()
            .map(|(b, c)| (format!("{{budget=\"{}\"}}", label(b)), f(c)))
            .collect::<Vec<_>>()
    };
    metric(
        "num_requests_running",
        "gauge",
        "Requests running in the engine.",
        &one(m.running as u64),
    );
    metric(
        "num_requests_waiting",
        "gauge",
        "Requests waiting for a slot.",
        &one(m.waiting as u64),
    );
    metric(
        "prompt_tokens_total",
        "counter",
        "Prompt tokens processed, by budget.",
        &per_budget(&|c| c.prompt_tokens),
    );
    metric(
        "generation_tokens_total",
        "counter",
        "Tokens generated, by the budget they were generated at.",
        &per_budget(&|c| c.generated_tokens),
    );
    metric(
        "request_budget_total",
        "counter",
        "Requests started, by budget.",
        &per_budget(&|c| c.requests),
    );
    metric(
        "request_success_total",
        "counter",
        "Requests finished, cancelled (client gone or shutdown) and failed.",
        &[
            ("{outcome=\"finished\"}".into(), m.finished),
            ("{outcome=\"cancelled\"}".into(), m.cancelled),
            ("{outcome=\"failed\"}".into(), m.failed),
        ],
    );
    metric(
        "spec_decode_num_drafts_total",
        "counter",
        "Speculative rounds (drafts verified).",
        &one(m.spec.drafts),
    );
    metric(
        "spec_decode_num_draft_tokens_total",
        "counter",
        "Draft tokens proposed.",
        &one(m.spec.draft_tokens),
    );
    metric(
        "spec_decode_num_accepted_tokens_total",
        "counter",
        "Draft tokens accepted.",
        &one(m.spec.accepted_tokens),
    );
    let per_pos: Vec<(String, u64)> = m
        .spec
        .accepted_per_pos
        .iter()
        .enumerate()
        .map(|(i, &v)| (format!("{{position=\"{i}\"}}"), v))
        .collect();
    metric(
        "spec_decode_num_accepted_tokens_per_pos",
        "counter",
        "Draft tokens accepted, by position in the draft.",
        &per_pos,
    );
    o
}
