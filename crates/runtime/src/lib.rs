//! elastica-runtime: many sequences over one loaded model, each at its own budget. Sits on
//! `elastica-core` only; the CLI and the server use it.

pub mod control;
pub mod scheduler;
pub mod service;
pub mod speculative;
