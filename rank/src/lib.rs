//! What runs inside one tprun rank: config, sharding plan, sharded loading, TP model, programs.

pub mod bench;
pub mod chat;
pub mod compare;
pub mod config;
pub mod device;
pub mod generate;
pub mod loader;
pub mod logits;
pub mod model;
pub mod plan;
pub mod runtime;
pub mod sampling;
pub mod testing;
pub mod tokenize;

#[cfg(test)]
mod fixture_tests;
#[cfg(test)]
mod tests;
