//! What runs inside one tprun rank: config, sharding plan, sharded loading, TP model, programs.

pub mod chat;
pub mod config;
pub mod loader;
pub mod model;
pub mod plan;
pub mod sampling;
pub mod testing;
pub mod tokenize;

#[cfg(test)]
mod fixture_tests;
#[cfg(test)]
mod tests;
