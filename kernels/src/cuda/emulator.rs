//! tprun's CUDA emulator (feature `cuda-emulator`, switched on by `TPRUN_CUDA_EMULATE=1`): one
//! host library (src/cuda/emu, built by build.rs and embedded here) that stands in for libcuda,
//! libnvrtc and libcublas. [`activate`] writes it out once per user and build, names it as each
//! library, and opens it as `libcuda.so` before anything else does: the loader then hands the
//! same object to cudarc's and [`super::driver_version`]'s `dlopen("libcuda.so")` (a loaded
//! object answers to its soname), and [`super::libs::search_dirs`] puts its folder first, so
//! NVRTC and cuBLAS come from it too. Everything above the libraries (cudarc, collectives::cuda,
//! rank::model::cuda) runs unchanged. `TPRUN_CUDA_EMULATE_GPUS` sets the GPU count (default 2).

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// The emulator library built for this build of tprun.
static LIBRARY: &[u8] = include_bytes!(env!("TPRUN_CUDA_EMU_LIB"));

/// The names the library is opened under: the driver's (cudarc tries `libcuda.so` first), and
/// NVRTC's and cuBLAS's for the CUDA 12 driver the emulator reports.
const NAMES: [&str; 4] = [
    "libcuda.so",
    "libcuda.so.1",
    "libnvrtc.so.12",
    "libcublas.so.12",
];

/// Whether `TPRUN_CUDA_EMULATE=1` asks for the emulator.
pub fn requested() -> bool {
    std::env::var("TPRUN_CUDA_EMULATE").as_deref() == Ok("1")
}

/// The folder holding the library under every name, once [`activate`] succeeded.
pub fn dir() -> Option<&'static Path> {
    STATE.get().and_then(|r| r.as_deref().ok())
}

static STATE: OnceLock<Result<PathBuf, String>> = OnceLock::new();

/// Writes the library out (once per process; the file is shared by every process of this
/// build) and opens it as the process's libcuda. The error names the file and what failed.
pub fn activate() -> Result<&'static Path, String> {
    STATE.get_or_init(install).as_deref().map_err(Clone::clone)
}

fn fnv(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf29ce484222325u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x100000001b3)
    })
}

fn install() -> Result<PathBuf, String> {
    let tmp = std::env::var_os("TMPDIR")
        .filter(|t| !t.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| "/tmp".into());
    // SAFETY: getuid has no preconditions.
    let uid = unsafe { libc::getuid() };
    let dir = tmp.join(format!("tprun-cuda-emu-{uid}/lib-{:016x}", fnv(LIBRARY)));
    let err = |what: &str, p: &Path, e: std::io::Error| format!("{what} {}: {e}", p.display());
    std::fs::create_dir_all(&dir).map_err(|e| err("creating", &dir, e))?;
    let main = dir.join(NAMES[0]);
    if std::fs::read(&main).ok().as_deref() != Some(LIBRARY) {
        let part = dir.join(format!("{}.{}.part", NAMES[0], std::process::id()));
        std::fs::write(&part, LIBRARY).map_err(|e| err("writing", &part, e))?;
        std::fs::rename(&part, &main).map_err(|e| err("renaming to", &main, e))?;
    }
    for name in &NAMES[1..] {
        let link = dir.join(name);
        if std::fs::read_link(&link).is_err() {
            let part = dir.join(format!("{name}.{}.part", std::process::id()));
            std::os::unix::fs::symlink(NAMES[0], &part).map_err(|e| err("linking", &part, e))?;
            std::fs::rename(&part, &link).map_err(|e| err("renaming to", &link, e))?;
        }
    }
    let path = std::ffi::CString::new(main.to_string_lossy().as_bytes())
        .map_err(|_| format!("{}: NUL in path", main.display()))?;
    // SAFETY: dlopen of our own library, which runs no initialisers beyond C++ statics; the
    // handle is kept for the process's life (RTLD_NODELETE), so the symbols cudarc takes from
    // it stay valid.
    let handle = unsafe {
        libc::dlopen(
            path.as_ptr(),
            libc::RTLD_NOW | libc::RTLD_GLOBAL | libc::RTLD_NODELETE,
        )
    };
    if handle.is_null() {
        // SAFETY: dlerror returns a NUL-terminated string or NULL.
        let why = unsafe { libc::dlerror() };
        let why = if why.is_null() {
            "unknown error".into()
        } else {
            // SAFETY: non-null, NUL-terminated (above).
            unsafe { std::ffi::CStr::from_ptr(why) }
                .to_string_lossy()
                .into_owned()
        };
        return Err(format!(
            "loading the CUDA emulator {}: {why}",
            main.display()
        ));
    }
    Ok(dir)
}
