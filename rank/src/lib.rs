//! What runs inside one tprun rank: a Hugging Face Qwen2 checkpoint, split across the ranks of a
//! tensor-parallel world, and the text around it. No command line and no printing here: the
//! programs crate does that.
//!
//! Where to start reading:
//!
//! - [`ModelDir`] ([`checkpoint`]): the one owner of a checkpoint directory. It opens
//!   config.json, generation_config.json, the tokenizer, the chat template and the weights, each
//!   error naming the file.
//! - [`hub`]: `--model ORG/NAME` found offline in the local Hugging Face cache.
//! - [`model`]: [`Config`] (config.json), [`ShardPlan`] (which slice of every weight this rank
//!   owns), the safetensors [`model::loader`], the parallel layers ([`model::layers`]) and the
//!   blocks [`model::Attention`], [`model::Mlp`], [`model::DecoderLayer`] that make up
//!   [`Qwen2`], whose `forward` runs one step for this rank.
//! - [`text`]: the [`text::Tokenizer`], the chat template ([`text::chat`]) and sampling
//!   ([`text::sampling`]).
//! - [`testing`]: running a world of ranks in threads, for tests.
//!
//! The layout and why it is so: docs/DESIGN.md, sections "Parts", "On disk" and
//! "Tensor-parallel layout".

#![deny(unsafe_op_in_unsafe_fn)]

pub mod checkpoint;
pub mod hub;
pub mod model;
pub mod testing;
pub mod text;

pub use checkpoint::ModelDir;
pub use model::config::Config;
pub use model::plan::ShardPlan;
pub use model::Qwen2;

#[cfg(test)]
mod fixture_tests;
#[cfg(test)]
mod tests;
