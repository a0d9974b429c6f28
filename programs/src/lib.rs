//! tprun's built-in rank programs: each file is one program with its clap `Args` and a `run`
//! that prints its results. The libraries they use carry no command line and print nothing:
//! [`rank`] (the Qwen2 model, its checkpoint and text), [`collectives`] and [`kernels`].
//!
//! - [`generate`]: text generation (greedy or sampled), streamed by rank 0.
//! - [`logits`]: every prompt position's logits to a safetensors file.
//! - [`bench`]: prefill/decode throughput, collective time, weight bytes per rank.
//! - [`perf`]: the nccl-tests-style table of the collectives (and [`plot`] for its SVG).
//! - [`analyze`]: stragglers, skew and per-layer waits of a `--trace` (no ranks).
//! - [`compare`]: per-tensor diff of two safetensors files (no ranks).
//! - [`runtime`]: what the model programs share (`--model`, loading with progress); with the
//!   `cuda` feature, `runtime_cuda` for `--device cuda`.

#![deny(unsafe_op_in_unsafe_fn)]

pub mod analyze;
pub mod bench;
pub mod compare;
pub mod device;
pub mod generate;
pub mod logits;
pub mod perf;
pub mod plot;
pub mod runtime;
#[cfg(feature = "cuda")]
pub mod runtime_cuda;
