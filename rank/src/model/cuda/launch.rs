//! Kernel loading and launching for [`super::CudaQwen2`]: every launch goes through a
//! [`cuda_plan::Launch`] (grid, block, shared bytes, argument kinds, unit-tested against the .cu
//! signatures) with the device addresses of its buffers in the plan's order.

use std::collections::HashMap;
use std::sync::Arc;

use anyhow::{anyhow, ensure, Result};
use collectives::cuda::cudarc;
use cudarc::driver::{sys, CudaContext, CudaFunction, CudaSlice, DevicePtr, LaunchConfig};
use cudarc::driver::{CudaStream, PushKernelArg};
use kernels::cuda::blas::{self, Operand};
use kernels::cuda::{nvrtc, sources};

use super::{CudaQwen2, Mat};
use crate::model::cuda_plan::{self as plan, Arg, Launch};

/// Compiles model.cu and attention.cu to PTX for this GPU (NVRTC, cached per process) and loads
/// every kernel.
pub(super) fn load_kernels(
    ctx: &Arc<CudaContext>,
) -> std::result::Result<HashMap<&'static str, CudaFunction>, String> {
    use sys::CUdevice_attribute::*;
    let attr = |a| ctx.attribute(a).map_err(|e| format!("{e:?}"));
    let cc = attr(CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)? * 10
        + attr(CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)?;
    let mut out = HashMap::new();
    for m in [sources::MODEL, sources::ATTENTION] {
        let ptx = nvrtc::compile(&m, nvrtc::Target::Ptx(cc as u32))?;
        let text = String::from_utf8_lossy(&ptx)
            .trim_end_matches('\0')
            .to_string();
        let module = ctx
            .load_module(cudarc::nvrtc::Ptx::from_src(text))
            .map_err(|e| format!("loading {} PTX for compute_{cc}: {e:?}", m.name))?;
        for &name in m.entries {
            let f = module
                .load_function(name)
                .map_err(|e| format!("{name}: {e:?}"))?;
            out.insert(name, f);
        }
    }
    Ok(out)
}

/// The device address of `s` plus `offset` elements.
pub(super) fn ptr<T>(stream: &CudaStream, s: &CudaSlice<T>, offset: usize) -> u64 {
    let (p, _sync) = s.device_ptr(stream);
    p + (offset * std::mem::size_of::<T>()) as u64
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
        let f = self
            .funcs
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
        let mut b = self.stream.launch_builder(f);
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

    /// Row-major `y[tokens, out] = x[tokens, inp] · wᵀ` with f32 `x` and `y`; a bf16 `w` gets
    /// `x` rounded to bf16 in `xb` first.
    ///
    /// # Safety
    /// `x` holds `tokens * inp` f32, `y` `tokens * out` f32, `xb` (bf16 only) `tokens * inp`
    /// u16, all live device memory of this context until the stream has run the product; `w` is
    /// `[out, inp]`.
    pub(super) unsafe fn linear(
        &self,
        w: &Mat,
        (tokens, out, inp): (usize, usize, usize),
        x: u64,
        xb: u64,
        y: u64,
    ) -> Result<()> {
        let g = plan::linear(tokens, out, inp);
        let dims = (g.n, g.m, g.k);
        let s = &self.stream;
        // SAFETY (both arms): sizes as the caller guarantees; `w` is borrowed for the call and
        // the model outlives the stream's work (the forward synchronises before returning).
        let r = match w {
            Mat::F32(w) => unsafe {
                blas::linear(&self.blas, Operand::F32, dims, ptr(s, w, 0), x, y)
            },
            Mat::Bf16(w) => {
                unsafe { self.launch(&plan::f32_to_bf16(tokens * inp), &[x, xb])? };
                unsafe { blas::linear(&self.blas, Operand::Bf16, dims, ptr(s, w, 0), xb, y) }
            }
        };
        r.map_err(|e| anyhow!("cublasGemmEx [{tokens}x{inp}]·[{out}x{inp}]ᵀ: {e:?}"))
    }
}
