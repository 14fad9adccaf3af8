//! elastica-core: one checkpoint, many models. A CPU inference engine for nested ("many-in-one")
//! language models: every forward pass runs at a [`Budget`](budget::Budget) — per-axis active
//! sizes — using prefixes of the one loaded copy of the weights.
//!
//! Modules, lowest first (each imports only those before it): `error`, `tensor`; `formats`
//! (safetensors, GGUF, JSON, tokenizer metadata, temp files); `kernels` (SIMD products,
//! quantization, thread pool); `shape` (the elastic axes), `budget`, `manifest`; `layers`
//! (attention, Mamba-2, MLP, MoE); `model` (the shared block list, the one parameter count), `target` (any budget between the
//! manifest's);
//! `models` (one module per architecture); `generate` (tokenizer, chat, sampling), `eval`, `data`.

// Segment lists are slices of ranges; a single full range is the common case.
#![allow(clippy::single_range_in_vec_init)]
// Kernels index several register arrays with one loop variable; kernel signatures are wide.
#![allow(clippy::needless_range_loop, clippy::too_many_arguments)]

pub mod budget;
pub mod data;
pub mod error;
pub mod eval;
pub mod formats;
pub mod generate;
pub mod kernels;
pub mod layers;
pub mod manifest;
pub mod model;
pub mod models;
pub mod progress;
pub mod rng;
pub mod shape;
pub mod target;
pub mod tensor;

pub use budget::{Budget, BudgetSpec};
pub use error::{Error, Result};
pub use model::{BatchItem, Cache, Logits, Model, SeqPool, SeqState, Work};
