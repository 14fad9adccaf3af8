//! elastica: one checkpoint, many models. A CPU inference engine for nested ("many-in-one")
//! language models: every forward pass runs at a [`Budget`](budget::Budget) — per-axis active
//! sizes — using prefixes of the one loaded copy of the weights.
//!
//! Layout: `formats` (safetensors, GGUF) → `tensor` → `kernels` (SIMD products, thread pool) →
//! `layers` (attention, Mamba-2, MLP, MoE) → `model` (the shared block list) → `models`
//! (architecture mappings) → `generate` (tokenizer, chat, sampling) → `cli`.

pub mod budget;
pub mod cli;
pub mod error;
pub mod eval;
pub mod formats;
pub mod generate;
pub mod kernels;
pub mod layers;
pub mod manifest;
pub mod model;
pub mod models;
pub mod tensor;

pub use budget::{Budget, BudgetSpec};
pub use error::{Error, Result};
pub use model::{Cache, Logits, Model};
