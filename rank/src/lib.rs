//! What runs inside one tprun rank: config, sharding plan, sharded loading, TP model, programs.

pub mod bench;
pub mod compare;
pub mod generate;
pub mod logits;
