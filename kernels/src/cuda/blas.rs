//! The device model's products through cuBLAS, opened by tprun itself (as NVRTC is, [`super::nvrtc`])
//! so that CUDA 12's and CUDA 13's libcublas both serve: row-major `y = x · Wᵀ` as one
//! `cublasGemmEx` with f32 accumulation (`CUBLAS_COMPUTE_32F`, no TF32) and an f32 output; the
//! operands are both bf16 (`CUDA_R_16BF`) or both f32. The five functions used have kept their
//! C prototypes and enum values from CUDA 11 to 13. The argument mapping is
//! `rank::model::cuda_plan::linear`, unit-tested there. Not run on a GPU.

use std::ffi::{c_int, c_void};

/// The operands' element type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Operand {
    Bf16,
    F32,
}

// cublas_api.h / library_types.h values.
const CUBLAS_OP_N: c_int = 0;
const CUBLAS_OP_T: c_int = 1;
const CUDA_R_32F: c_int = 0;
const CUDA_R_16BF: c_int = 14;
const CUBLAS_COMPUTE_32F: c_int = 68;
const CUBLAS_GEMM_DEFAULT: c_int = -1;

impl Operand {
    fn data_type(self) -> c_int {
        match self {
            Operand::Bf16 => CUDA_R_16BF,
            Operand::F32 => CUDA_R_32F,
        }
    }
}

type Handle = *mut c_void;
type Create = unsafe extern "C" fn(*mut Handle) -> c_int;
type Destroy = unsafe extern "C" fn(Handle) -> c_int;
type SetStream = unsafe extern "C" fn(Handle, *mut c_void) -> c_int;
#[rustfmt::skip]
type GemmEx = unsafe extern "C" fn(
    Handle, c_int, c_int, c_int, c_int, c_int,
    *const c_void, *const c_void, c_int, c_int,
    *const c_void, c_int, c_int,
    *const c_void, *mut c_void, c_int, c_int,
    c_int, c_int,
) -> c_int;

/// A cuBLAS handle bound to one stream, with the library it came from.
pub struct Blas {
    handle: Handle,
    destroy: Destroy,
    gemm_ex: GemmEx,
    /// Keeps the function pointers valid.
    _lib: libloading::Library,
}

// SAFETY: a cuBLAS handle may be used from any thread as long as calls do not overlap; `Blas`
// is only reached through `&self` of one model, whose forward runs on one thread at a time.
unsafe impl Send for Blas {}

fn check(what: &str, status: c_int) -> Result<(), String> {
    match status {
        0 => Ok(()),
        s => Err(format!("{what} failed (cublasStatus_t {s})")),
    }
}

impl Blas {
    /// Opens libcublas ([`super::libs::open`]) and creates a handle, in `stream`'s context, whose
    /// work goes to `stream`.
    pub fn new(stream: &cudarc::driver::CudaStream) -> Result<Blas, String> {
        stream
            .context()
            .bind_to_thread()
            .map_err(|e| format!("binding the context: {e:?}"))?;
        // cublasLt is cuBLAS's own dependency; opening it by path first lets a wheel's copy be
        // found without LD_LIBRARY_PATH. cuBLAS reports it if it is missing.
        let _ = super::libs::open("cublasLt").map(std::mem::forget);
        let lib = super::libs::open("cublas")?;
        fn sym<T: Copy>(lib: &libloading::Library, name: &str) -> Result<T, String> {
            // SAFETY: each symbol is stored as its C prototype from cublas_api.h; the library
            // outlives the copies (both live in `Blas`).
            unsafe { lib.get::<T>(name.as_bytes()) }
                .map(|s| *s)
                .map_err(|e| format!("libcublas has no {name}: {e}"))
        }
        let create: Create = sym(&lib, "cublasCreate_v2")?;
        let set_stream: SetStream = sym(&lib, "cublasSetStream_v2")?;
        let mut handle: Handle = std::ptr::null_mut();
        // SAFETY: `handle` is writable; the current context is the caller's.
        check("cublasCreate", unsafe { create(&mut handle) })?;
        let blas = Blas {
            handle,
            destroy: sym(&lib, "cublasDestroy_v2")?,
            gemm_ex: sym(&lib, "cublasGemmEx")?,
            _lib: lib,
        };
        let raw = stream.cu_stream().cast::<c_void>();
        // SAFETY: a live handle and a live stream of the current context.
        check("cublasSetStream", unsafe { set_stream(blas.handle, raw) })?;
        Ok(blas)
    }

    /// Row-major `y[tokens, out] (f32) = x[tokens, inp] · w[out, inp]ᵀ`, i.e. column-major
    /// `yᵀ = op_T(w) · xᵀ` with `m = out, n = tokens, k = inp`, `lda = ldb = inp`, `ldc = out`.
    ///
    /// # Safety
    /// `w`, `x` and `y` are device pointers of the handle's context, holding at least
    /// `out * inp`, `tokens * inp` (both of type `operand`) and `tokens * out` f32 elements, and
    /// they stay alive until the stream has run the product.
    pub unsafe fn linear(
        &self,
        operand: Operand,
        (tokens, out, inp): (i32, i32, i32),
        w: u64,
        x: u64,
        y: u64,
    ) -> Result<(), String> {
        let (alpha, beta) = (1.0f32, 0.0f32);
        let t = operand.data_type();
        // SAFETY: the caller guarantees the buffers' sizes and lifetimes; alpha and beta are
        // host f32 (the handle's default pointer mode) as CUBLAS_COMPUTE_32F requires.
        let status = unsafe {
            (self.gemm_ex)(
                self.handle,
                CUBLAS_OP_T,
                CUBLAS_OP_N,
                out,
                tokens,
                inp,
                (&alpha as *const f32).cast(),
                w as *const c_void,
                t,
                inp,
                x as *const c_void,
                t,
                inp,
                (&beta as *const f32).cast(),
                y as *mut c_void,
                CUDA_R_32F,
                out,
                CUBLAS_COMPUTE_32F,
                CUBLAS_GEMM_DEFAULT,
            )
        };
        check("cublasGemmEx", status)
    }
}

impl Drop for Blas {
    fn drop(&mut self) {
        // SAFETY: the handle was created by `new` and is destroyed once.
        let _ = unsafe { (self.destroy)(self.handle) };
    }
}
