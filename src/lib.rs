//! elastica: one checkpoint, many models. The workspace, lowest layer first; a crate imports only
//! the crates before it:
//!
//! - `elastica-core` (`crates/core`): formats, tensors, kernels, the elastic axes and budgets,
//!   layers, the model, one module per architecture, generation.
//! - `elastica-elastic` (`crates/elastic`): the elastic pipeline — rank, elastify, slice.
//! - `elastica-runtime` (`crates/runtime`): sequences, scheduling, self-speculative decoding
//!   (on core only).
//! - `elastica-server` (`crates/server`): the OpenAI-compatible HTTP server over the runtime's
//!   service (axum/tokio; on runtime and core).
//! - `elastica-train` (`crates/train`): nested training over candle.
//! - `elastica` (this crate): the command line; re-exports the five under one path.

pub use elastica_core::*;
pub use elastica_elastic as elastic;
pub use elastica_runtime as runtime;
pub use elastica_server as server;
pub use elastica_train as train;

pub mod cli;
