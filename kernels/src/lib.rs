//! Compute kernels for the Qwen2 runtime. f32 activations and accumulation throughout.
