//! The CUDA C++ sources of every device kernel, as strings compiled at run time by NVRTC
//! ([`super::nvrtc`]). Each module is the shared prelude (bf16 bits, block reductions) plus one
//! `.cu` file; `entries` lists its `extern "C"` kernels, which the NVRTC tests look for in the
//! CUBIN so a renamed or dropped kernel fails offline, not on a GPU.

/// One NVRTC compilation unit.
#[derive(Clone, Copy, Debug)]
pub struct Module {
    pub name: &'static str,
    /// The module's own file; [`Module::source`] prepends the prelude.
    pub body: &'static str,
    pub entries: &'static [&'static str],
}

const PRELUDE: &str = include_str!("prelude.cuh");

impl Module {
    /// The full text NVRTC compiles (no include path is given, so nothing is `#include`d).
    pub fn source(&self) -> String {
        format!("{PRELUDE}\n#line 1 \"{}.cu\"\n{}", self.name, self.body)
    }
}

/// Embedding gather, RMSNorm, RoPE, SiLU-gate, bias add, residual add, the two-term bf16 split
/// of activations and the sum of its products, argmax, sampling.
pub const MODEL: Module = Module {
    name: "model",
    body: include_str!("model.cu"),
    entries: &[
        "embedding_gather",
        "rms_norm",
        "rope",
        "silu_gate",
        "bias_add",
        "add_inplace",
        "f32_to_bf16_split",
        "sum_halves",
        "argmax",
        "softmax_temperature",
        "sample_inverse_cdf",
    ],
};

/// Most static shared memory the attention kernels declare (their block reductions); the dynamic
/// score array gets the rest of a block's shared memory. The NVRTC tests check the CUBIN's
/// figure against it.
pub const ATTENTION_STATIC_SHARED_MAX: u32 = 4096;

/// KV-cache append and attention for prefill and decode.
pub const ATTENTION: Module = Module {
    name: "attention",
    body: include_str!("attention.cu"),
    entries: &["kv_append", "attention_prefill", "attention_decode"],
};

/// The CUDA IPC collectives (slab layout: collectives::cuda_plan).
pub const COMM: Module = Module {
    name: "comm",
    body: include_str!("comm.cu"),
    entries: &[
        "all_reduce_oneshot_f32",
        "all_reduce_oneshot_bf16",
        "all_reduce_twoshot_f32",
        "all_reduce_twoshot_bf16",
        "reduce_scatter_f32",
        "reduce_scatter_bf16",
        "all_gather",
        "broadcast",
        "barrier",
    ],
};

/// Every module, in the order the runtime compiles them.
pub const MODULES: [Module; 3] = [MODEL, ATTENTION, COMM];

pub use crate::cu_params::kernel_params;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn comm_kernels_take_the_slab_parameters_then_their_own() {
        let p = kernel_params(COMM.body, "broadcast").unwrap();
        let names: Vec<&str> = p.iter().map(|(_, n)| n.as_str()).collect();
        assert_eq!(
            names,
            [
                "slabs",
                "flags_off",
                "data_off",
                "rank",
                "world",
                "max_blocks",
                "seq",
                "timeout_ns",
                "buf",
                "bytes",
                "root"
            ]
        );
        assert_eq!(p[0].0, "const u64 *");
        assert_eq!(p[10].0, "int");
        // The SLABS_PARAMS text in comm.cu is what kernel_params expands.
        assert!(COMM.body.contains(
            "const u64 *slabs, u64 flags_off, u64 data_off, int rank, int world, int max_blocks, u64 seq, \\\n        u64 timeout_ns"
        ));
        for k in COMM.entries {
            assert!(kernel_params(COMM.body, k).is_some(), "{k}");
        }
        assert!(kernel_params(COMM.body, "no_such_kernel").is_none());
    }
}
