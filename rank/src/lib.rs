//! What runs inside one tprun rank: config, sharding plan, sharded loading, TP model, programs.

pub mod bench;
pub mod chat;
pub mod generate;
pub mod logits;
pub mod sampling;
pub mod tokenize;
