//! Loading a kernel module into a CUDA context: NVRTC's CUBIN for the GPU's own architecture
//! first, because a CUBIN loads on any driver that knows the GPU, while PTX from an NVRTC newer
//! than the driver is refused (CUDA_ERROR_UNSUPPORTED_PTX_VERSION); PTX for the same compute
//! capability as the fallback (the driver compiles it, e.g. for a GPU newer than NVRTC knows).

use std::collections::HashMap;
use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::Arc;

use cudarc::driver::{sys, CudaContext, CudaFunction, CudaModule};
use cudarc::nvrtc::Ptx;

use super::nvrtc::{self, Target};
use super::sources::Module;

/// The GPU's compute capability as NVRTC spells it (`90` for sm_90).
pub fn compute_capability(ctx: &CudaContext) -> Result<u32, String> {
    use sys::CUdevice_attribute::*;
    let attr = |a| ctx.attribute(a).map_err(|e| format!("{e:?}"));
    let cc = attr(CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)? * 10
        + attr(CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)?;
    u32::try_from(cc).map_err(|_| format!("compute capability {cc}"))
}

/// Compiles `module` for `ctx`'s GPU (NVRTC, cached per process), loads it and returns every
/// entry of it by name. The error names the module and what each form failed with.
pub fn load(
    ctx: &Arc<CudaContext>,
    module: &Module,
) -> Result<HashMap<&'static str, CudaFunction>, String> {
    let cc = compute_capability(ctx)?;
    let loaded = nvrtc::compile(module, Target::Cubin(cc))
        .and_then(|image| load_cubin(ctx, &image))
        .or_else(|cubin| {
            nvrtc::compile(module, Target::Ptx(cc))
                .and_then(|ptx| load_ptx(ctx, &ptx))
                .map_err(|ptx| {
                    format!(
                        "loading {}.cu: as CUBIN for sm_{cc}: {cubin}; as PTX for compute_{cc}: {ptx}",
                        module.name
                    )
                })
        })?;
    module
        .entries
        .iter()
        .map(|&name| {
            loaded
                .load_function(name)
                .map(|f| (name, f))
                .map_err(|e| format!("{}.cu has no kernel {name}: {e:?}", module.name))
        })
        .collect()
}

/// cudarc loads PTX text or a file; a CUBIN goes in through a memfd's /proc path, so nothing is
/// written to disk and nothing outlives the process.
fn load_cubin(ctx: &Arc<CudaContext>, image: &[u8]) -> Result<Arc<CudaModule>, String> {
    // SAFETY: memfd_create reads a NUL-terminated name and returns a new fd or -1.
    let fd = unsafe { libc::memfd_create(c"tprun-cubin".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(format!("memfd_create: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: `fd` is a new descriptor owned by nothing else; the File closes it.
    let mut file = unsafe { std::fs::File::from_raw_fd(fd) };
    file.write_all(image).map_err(|e| format!("memfd: {e}"))?;
    let path = format!("/proc/self/fd/{}", file.as_raw_fd());
    ctx.load_module(Ptx::from_file(path))
        .map_err(|e| format!("{e:?}"))
}

fn load_ptx(ctx: &Arc<CudaContext>, ptx: &[u8]) -> Result<Arc<CudaModule>, String> {
    let text = String::from_utf8_lossy(ptx)
        .trim_end_matches('\0')
        .to_string();
    ctx.load_module(Ptx::from_src(text))
        .map_err(|e| format!("{e:?}"))
}
