//! Kernel loading and launching for [`super::CudaQwen2`]: every launch goes through a
//! [`cuda_plan::Launch`] (grid, block, shared bytes, argument kinds, unit-tested against the .cu
//! signatures) with the device addresses of its buffers in the plan's order.

use std::collections::HashMap;
use std::sync::Arc;

use anyhow::{anyhow, ensure, Result};
use collectives::cuda::cudarc;
use cudarc::driver::{sys, CudaContext, CudaFunction, CudaSlice, DevicePtr, LaunchConfig};
use cudarc::driver::{CudaStream, PushKernelArg};
use kernels::cuda::blas::Operand;
use kernels::cuda::sources;

use super::{CudaQwen2, Mat};
use crate::model::cuda_plan::{self as plan, Arg, Launch};

/// The loaded kernels and how many positions one attention launch can hold.
pub(super) struct Kernels {
    pub funcs: HashMap<&'static str, CudaFunction>,
    pub max_positions: usize,
}

/// Compiles model.cu and attention.cu for this GPU (NVRTC, cached per process), loads every
/// kernel, and lets the attention kernels use the GPU's opt-in shared memory (one f32 score per
/// position: 227 KiB is about 58,000 positions on an H100, where the 48 KiB default is 12,000).
pub(super) fn load_kernels(ctx: &Arc<CudaContext>) -> std::result::Result<Kernels, String> {
    use sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN as OPTIN;
    use sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES as DYNAMIC;
    let mut funcs = HashMap::new();
    for m in [sources::MODEL, sources::ATTENTION] {
        funcs.extend(kernels::cuda::module::load(ctx, &m)?);
    }
    let optin = ctx.attribute(OPTIN).map_err(|e| format!("{e:?}"))?;
    let dynamic = plan::attention_dynamic_bytes(optin);
    for name in ["attention_prefill", "attention_decode"] {
        funcs[name]
            .set_attribute(DYNAMIC, dynamic)
            .map_err(|e| format!("{name}: {dynamic} bytes of dynamic shared memory: {e:?}"))?;
    }
    Ok(Kernels {
        funcs,
        max_positions: dynamic as usize / 4,
    })
}

/// The device address of `s` plus `offset` elements.
pub(super) fn ptr<T>(stream: &CudaStream, s: &CudaSlice<T>, offset: usize) -> u64 {
    let (p, _sync) = s.device_ptr(stream);
    p + (offset * std::mem::size_of::<T>()) as u64
}

/// The bf16 path's scratch for [`CudaQwen2::linear`] (unused with f32 weights): the activations
/// split into two bf16 terms, and the two products.
#[derive(Clone, Copy)]
pub(super) struct Split {
    pub xb: u64,
    pub halves: u64,
}

enum Val {
    P(u64),
    I(i32),
    F(f32),
}

impl CudaQwen2 {
    /// Launches `l` on the model's stream with `bufs` as its buffer arguments, in order.
    ///
    /// # Safety
    /// Each address in `bufs` points into a live device allocation of this context holding at
    /// least the elements the kernel reads or writes for `l`'s sizes, and stays alive until the
    /// stream has run the kernel.
    pub(super) unsafe fn launch(&self, l: &Launch, bufs: &[u64]) -> Result<()> {
        // SAFETY: forwarded from this function's contract.
        unsafe { launch_on(&self.stream, &self.funcs, l, bufs) }
    }

    /// Row-major `y[tokens, out] = x[tokens, inp] · wᵀ` with f32 `x` and `y`. A bf16 `w`
    /// multiplies `x` split into two bf16 terms (`hi` rows then `lo` rows in `sp.xb`, one GEMM
    /// of `2 * tokens` rows into `sp.halves`, then `y = hi product + lo product`): activations
    /// keep about 16 bits, so the result is within f32 rounding of the CPU's f32 activations ×
    /// widened bf16 weights, and `w` is read once.
    ///
    /// # Safety
    /// `x` holds `tokens * inp` f32, `y` `tokens * out` f32; for bf16 `sp.xb` holds
    /// `2 * tokens * inp` u16 and `sp.halves` `2 * tokens * out` f32; all live device memory of
    /// this context until the stream has run the product; `w` is `[out, inp]`.
    pub(super) unsafe fn linear(
        &self,
        w: &Mat,
        (tokens, out, inp): (usize, usize, usize),
        x: u64,
        sp: Split,
        y: u64,
    ) -> Result<()> {
        let s = &self.stream;
        let gemm = |operand, rows: usize, w: u64, x: u64, y: u64| {
            let g = plan::linear(rows, out, inp);
            // SAFETY: sizes as the caller guarantees; `w` is borrowed for the call and the model
            // outlives the stream's work (the forward synchronises before returning).
            unsafe { self.blas.linear(operand, (g.n, g.m, g.k), w, x, y) }
                .map_err(|e| anyhow!("[{rows}x{inp}]·[{out}x{inp}]ᵀ: {e}"))
        };
        match w {
            Mat::F32(w) => gemm(Operand::F32, tokens, ptr(s, w, 0), x, y),
            Mat::Bf16(w) => {
                // SAFETY: x is tokens * inp f32, sp.xb 2 * tokens * inp u16.
                unsafe { self.launch(&plan::f32_to_bf16_split(tokens * inp), &[x, sp.xb])? };
                gemm(Operand::Bf16, 2 * tokens, ptr(s, w, 0), sp.xb, sp.halves)?;
                // SAFETY: sp.halves is 2 * tokens * out f32, y tokens * out.
                unsafe { self.launch(&plan::sum_halves(tokens * out), &[sp.halves, y]) }
            }
        }
    }
}

/// Launches `l` from `funcs` on `stream` with `bufs` as its buffer arguments, in order.
///
/// # Safety
/// As [`CudaQwen2::launch`].
pub(super) unsafe fn launch_on(
    stream: &CudaStream,
    funcs: &HashMap<&'static str, CudaFunction>,
    l: &Launch,
    bufs: &[u64],
) -> Result<()> {
    let f = funcs
        .get(l.kernel)
        .ok_or_else(|| anyhow!("kernel {} not loaded", l.kernel))?;
    let mut it = bufs.iter();
    let vals: Vec<Val> = l
        .args
        .iter()
        .map(|a| match a {
            Arg::Buf(_) => it.next().map(|&p| Val::P(p)),
            Arg::I32(v) => Some(Val::I(*v)),
            Arg::F32(v) => Some(Val::F(*v)),
        })
        .collect::<Option<_>>()
        .ok_or_else(|| anyhow!("{}: too few buffers", l.kernel))?;
    ensure!(it.next().is_none(), "{}: too many buffers", l.kernel);
    let mut b = stream.launch_builder(f);
    for v in &vals {
        match v {
            Val::P(p) => b.arg(p),
            Val::I(i) => b.arg(i),
            Val::F(x) => b.arg(x),
        };
    }
    let cfg = LaunchConfig {
        grid_dim: l.grid,
        block_dim: l.block,
        shared_mem_bytes: l.shared_bytes,
    };
    // SAFETY: the arguments follow the kernel's signature (cuda_plan's tests) and the caller
    // guarantees the buffers.
    unsafe { b.launch(cfg) }
        .map(|_| ())
        .map_err(|e| anyhow!("launching {}: {e:?}", l.kernel))
}
