//! x86-64 SIMD kernels over [`PackedWeight`] panels: AVX-512 (F+BW+VL, optionally BF16) and
//! AVX2+FMA.
//!
//! Every function here is `unsafe` because it is compiled for CPU features the baseline target
//! lacks: callers must have checked them (see `crate::Isa::detect`). The safe wrappers in
//! `lib.rs` assert the lengths; the raw-pointer arithmetic below stays inside them: panel `p`
//! has `row_words` steps of `panel_width(p)` words (loads past the width are masked off), `x`
//! is `[m, k]`, and `y` is written at `i * ldy + c` for the panel's output rows only.
//!
//! Each output row is one SIMD lane, summed over `k` in order; bf16 words are widened exactly
//! (the even element by a 16-bit shift, the odd one by masking off the low half).
//!
//! By what they hold: [`matmul_avx512`] and [`matmul_avx2`] (GEMV and GEMM), [`activations`]
//! (exp, SiLU, softmax, attention), [`vnni`] (the LM-head screen's int8 dots) and [`probes`]
//! (the roofline measurements). Callers name the kernels through this module.

mod activations;
mod matmul_avx2;
mod matmul_avx512;
mod probes;
mod vnni;

#[cfg(test)]
pub(crate) use activations::exp16;
pub(crate) use activations::{attend_avx512, silu_mul_avx512, softmax_avx512};
pub(crate) use matmul_avx2::{gemm_avx2, gemv_avx2};
pub(crate) use matmul_avx512::{gemm_avx512, gemv_avx512, to_bf16_words, Activations};
pub(crate) use probes::{
    dpbf16_chains_avx512, fma_chains_avx2, fma_chains_avx512, read_sum_avx512,
};
pub(crate) use vnni::dot_u8_rows_vnni;
