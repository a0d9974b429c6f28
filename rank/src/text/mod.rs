//! The text side of a checkpoint: tokenizer.json, the chat template and token sampling.

pub mod chat;
pub mod sampling;
pub mod tokenizer;

pub use tokenizer::{StreamDecoder, Tokenizer};
