//! The Qwen2 model for one rank: [`config`] (config.json), [`plan`] (this rank's slices), the
//! safetensors [`loader`], the parallel [`layers`], and the blocks [`Attention`], [`Mlp`] and
//! [`DecoderLayer`] that [`Qwen2`] stacks. The math follows transformers' `modeling_qwen2.py`;
//! the layout is docs/DESIGN.md's "Tensor-parallel layout".

pub mod attention;
pub mod config;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod cuda_plan;
pub mod cuda_weights;
pub mod layers;
pub mod loader;
pub mod mlp;
pub mod plan;
pub mod qwen2;
mod scratch;

pub use attention::{Attention, KvCache, Rope};
pub use layers::{
    ColumnParallelLinear, ParallelLmHead, Prefixed, RowParallelLinear, VocabParallelEmbedding,
    WeightSource,
};
pub use mlp::Mlp;
pub use qwen2::{DecoderLayer, ForwardOptions, ForwardOutput, Logits, Qwen2};
pub use scratch::PARTS;
