//! The device model's products through cuBLAS (cudarc's `cublas`): row-major `y = x · Wᵀ` as one
//! `cublasGemmEx` with f32 accumulation (`CUBLAS_COMPUTE_32F`) and an f32 output; the operands
//! are both bf16 (`CUDA_R_16BF`, activations rounded by `f32_to_bf16_kernel`) or both f32. The
//! argument mapping is `rank::model::cuda_plan::linear`, unit-tested there. Not run on a GPU.

use std::ffi::c_void;

use cudarc::cublas::{result, sys, CudaBlas};

/// The operands' element type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Operand {
    Bf16,
    F32,
}

impl Operand {
    fn data_type(self) -> sys::cudaDataType {
        match self {
            Operand::Bf16 => sys::cudaDataType::CUDA_R_16BF,
            Operand::F32 => sys::cudaDataType::CUDA_R_32F,
        }
    }
}

/// Row-major `y[tokens, out] (f32) = x[tokens, inp] · w[out, inp]ᵀ`, i.e. column-major
/// `yᵀ = op_T(w) · xᵀ` with `m = out, n = tokens, k = inp`, `lda = ldb = inp`, `ldc = out`.
///
/// # Safety
/// `w`, `x` and `y` are device pointers on the stream `blas` is bound to, holding at least
/// `out * inp`, `tokens * inp` (both of type `operand`) and `tokens * out` f32 elements, and
/// they stay alive until the stream has run the product.
pub unsafe fn linear(
    blas: &CudaBlas,
    operand: Operand,
    (tokens, out, inp): (i32, i32, i32),
    w: u64,
    x: u64,
    y: u64,
) -> Result<(), result::CublasError> {
    let (alpha, beta) = (1.0f32, 0.0f32);
    let t = operand.data_type();
    // SAFETY: the caller guarantees the buffers' sizes and lifetimes; alpha and beta are host
    // f32 (the handle's default pointer mode) as CUBLAS_COMPUTE_32F requires.
    unsafe {
        result::gemm_ex(
            *blas.handle(),
            sys::cublasOperation_t::CUBLAS_OP_T,
            sys::cublasOperation_t::CUBLAS_OP_N,
            out,
            tokens,
            inp,
            (&alpha as *const f32).cast::<c_void>(),
            w as *const c_void,
            t,
            inp,
            x as *const c_void,
            t,
            inp,
            (&beta as *const f32).cast::<c_void>(),
            y as *mut c_void,
            sys::cudaDataType::CUDA_R_32F,
            out,
            sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
        )
    }
}
