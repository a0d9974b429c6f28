//! CUDA (feature `cuda`): device discovery (here), the libraries' search path ([`libs`]), NVRTC
//! ([`nvrtc`]), the kernels' sources ([`sources`]), loading them into a context ([`module`]) and
//! the CUBIN resource reader ([`cubin`]).
//!
//! cudarc opens libcuda lazily on its first call and panics if the library is missing or lacks a
//! symbol of the API version it was built against (`cuda-12020`, see the root Cargo.toml). So
//! [`cuda_available`] first opens libcuda itself and asks the driver's version, and only then lets
//! cudarc initialise the driver: on a machine without a GPU, or with a too-old driver, the caller
//! gets an error string instead of a panic.

pub mod blas;
pub mod cubin;
#[cfg(feature = "cuda-emulator")]
pub mod emulator;
pub mod libs;
pub mod module;
pub mod nvrtc;
#[cfg(test)]
mod nvrtc_tests;
pub mod sources;

use std::ffi::c_int;

use cudarc::driver::{result::DriverError, CudaContext};

/// Names the driver library is installed under on Linux: the unversioned link comes with the
/// development package only, `.so.1` with every driver. cudarc tries both as well.
const LIBCUDA: [&str; 2] = ["libcuda.so", "libcuda.so.1"];

/// The CUDA API version cudarc's bindings were generated for, as `cuDriverGetVersion` encodes it
/// (1000 * major + 10 * minor). Must match the `cuda-*` feature in the root Cargo.toml.
pub const BOUND_API_VERSION: i32 = 12020;

/// Number of CUDA devices this process can use, or one line saying why there are none: no driver
/// library, a driver older than [`BOUND_API_VERSION`], `cuInit` failing, or zero devices (e.g.
/// `CUDA_VISIBLE_DEVICES=""`). Never panics, and never lets cudarc load libcuda if it would panic.
pub fn cuda_available() -> Result<usize, String> {
    let version = driver_version()?;
    if version < BOUND_API_VERSION {
        return Err(format!(
            "the CUDA driver supports CUDA {} but this build needs {} or newer (update the driver, \
             or rebuild with an older cudarc `cuda-*` feature)",
            fmt_version(version),
            fmt_version(BOUND_API_VERSION)
        ));
    }
    let n = CudaContext::device_count().map_err(|e| format!("cuInit failed: {}", describe(e)))?;
    match usize::try_from(n) {
        Ok(0) | Err(_) => Err("the CUDA driver sees no device (check CUDA_VISIBLE_DEVICES)".into()),
        Ok(n) => Ok(n),
    }
}

/// For GPU tests: whether a CUDA device is usable here. Without one the test logs a `NOT ON
/// THIS MACHINE` line ([`crate::skips::no_hardware`]), or, under `TPRUN_REQUIRE_GPU=1` (the GPU
/// acceptance machine, the emulator's CI job), fails with the reason: a machine whose discovery
/// fails cannot pass by skipping.
pub fn gpu_or_skip(test: &str) -> bool {
    match cuda_available() {
        Ok(_) => true,
        Err(why) => {
            require_gpu_unless(test, &why);
            crate::skips::no_hardware(test, &why);
            false
        }
    }
}

/// Panics naming `test` and `why` under `TPRUN_REQUIRE_GPU=1`.
pub fn require_gpu_unless(test: &str, why: &str) {
    if std::env::var("TPRUN_REQUIRE_GPU").as_deref() == Ok("1") {
        panic!("{test}: TPRUN_REQUIRE_GPU=1 but no usable CUDA device: {why}");
    }
}

/// Opens libcuda with libloading (not through cudarc) and returns `cuDriverGetVersion`, which the
/// driver answers without `cuInit`.
pub(crate) fn driver_version() -> Result<i32, String> {
    #[cfg(feature = "cuda-emulator")]
    if emulator::requested() {
        emulator::activate()?;
    }
    // SAFETY: loading libcuda runs only its initialisers, which are safe to run in any process;
    // we load the same file cudarc would.
    let lib = LIBCUDA
        .iter()
        .find_map(|name| unsafe { libloading::Library::new(name) }.ok())
        .ok_or("no CUDA driver found (libcuda.so could not be loaded)")?;
    type GetVersion = unsafe extern "C" fn(*mut c_int) -> c_int;
    // SAFETY: `cuDriverGetVersion(int*)` has had this C signature since CUDA 2.2.
    let get: libloading::Symbol<GetVersion> = unsafe { lib.get(b"cuDriverGetVersion\0") }
        .map_err(|e| format!("libcuda has no cuDriverGetVersion: {e}"))?;
    let mut v: c_int = 0;
    // SAFETY: `v` is a valid, writable int for the duration of the call; `lib` outlives `get`.
    let rc = unsafe { get(&mut v) };
    if rc != 0 {
        return Err(format!("cuDriverGetVersion failed with CUresult {rc}"));
    }
    Ok(v)
}

/// Whether the CUDA path runs on tprun's emulator (feature `cuda-emulator` and
/// `TPRUN_CUDA_EMULATE=1`); always false in a build without the feature.
pub fn emulated() -> bool {
    #[cfg(feature = "cuda-emulator")]
    return emulator::requested() || emulator::dir().is_some();
    #[cfg(not(feature = "cuda-emulator"))]
    false
}

fn fmt_version(v: i32) -> String {
    format!("{}.{}", v / 1000, v % 1000 / 10)
}

/// `CUDA_ERROR_NO_DEVICE (no CUDA-capable device is detected)`.
fn describe(e: DriverError) -> String {
    match e.error_string() {
        Ok(s) => format!("{:?} ({})", e.0, s.to_string_lossy()),
        Err(_) => format!("{:?}", e.0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs on every machine: with a GPU it counts devices, without one it checks the reason is
    /// one of the documented ones, on one line, and logs why the GPU half did not run.
    #[test]
    fn discovery_counts_devices_or_says_why_not() {
        match cuda_available() {
            Ok(n) => {
                assert!(n >= 1);
                println!("found {n} CUDA device(s)");
            }
            Err(why) => {
                let known = [
                    "no CUDA driver found (libcuda.so could not be loaded)",
                    "libcuda has no cuDriverGetVersion: ",
                    "cuDriverGetVersion failed with CUresult ",
                    "the CUDA driver supports CUDA ",
                    "cuInit failed: ",
                    "the CUDA driver sees no device (check CUDA_VISIBLE_DEVICES)",
                ];
                assert!(known.iter().any(|k| why.starts_with(k)), "{why:?}");
                assert!(!why.contains('\n'), "{why:?}");
                require_gpu_unless("kernels::cuda discovery", &why);
                crate::skips::no_hardware("kernels::cuda discovery", &why);
            }
        }
    }

    #[test]
    fn versions_print_as_major_minor() {
        assert_eq!(fmt_version(12020), "12.2");
        assert_eq!(fmt_version(12080), "12.8");
        assert_eq!(fmt_version(11040), "11.4");
    }
}
