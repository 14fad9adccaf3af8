//! elastica: one checkpoint, many models. A CPU inference engine for nested ("many-in-one")
//! language models: every forward pass runs at a [`Budget`](budget::Budget) — per-axis active
//! sizes — using prefixes of the one loaded copy of the weights.
//!
//! Layout: `formats` (safetensors, GGUF) → `tensor` → `kernels` (SIMD products, thread pool) →
//! `layers` (attention, Mamba-2, MLP, MoE) → `model` (the shared block list) → `models`
//! (architecture mappings) → `generate` (tokenizer, chat, sampling) → `cli`.

// Segment lists are slices of ranges; a single full range is the common case.
#![allow(clippy::single_range_in_vec_init)]
// Kernels index several register arrays with one loop variable; kernel signatures are wide.
#![allow(clippy::needless_range_loop, clippy::too_many_arguments)]

pub mod budget;
pub mod cli;
pub mod data;
pub mod elastic;
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
pub mod tensor;
pub mod train;

pub use budget::{Budget, BudgetSpec};
pub use error::{Error, Result};
pub use model::{Cache, Logits, Model};
