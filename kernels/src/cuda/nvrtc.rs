//! NVRTC, bound by hand through libloading (ten functions), not through cudarc: cudarc opens
//! libnvrtc by name only, looks for the `.so.12` of the API it was built for, and panics when it
//! is missing; this finds CUDA 12's or 13's NVRTC wherever [`super::libs`] finds it, wheels
//! included, and reports a missing library as an error.
//!
//! [`compile`] caches per process by (module, target), so each kernel module is compiled once.

use std::collections::HashMap;
use std::ffi::{c_char, c_int, c_void, CString};
use std::sync::{Arc, Mutex, OnceLock};

use super::sources::Module;

type Prog = *mut c_void;

/// What NVRTC produces: PTX for a virtual architecture (`compute_90`) or a CUBIN for a real one
/// (`sm_90`). The number is the compute capability times ten.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Target {
    Ptx(u32),
    Cubin(u32),
}

impl Target {
    fn arch_option(self) -> String {
        match self {
            Target::Ptx(cc) => format!("--gpu-architecture=compute_{cc}"),
            Target::Cubin(cc) => format!("--gpu-architecture=sm_{cc}"),
        }
    }
}

/// The loaded library and the entry points we use.
pub struct Nvrtc {
    _lib: libloading::Library,
    pub version: (i32, i32),
    create: unsafe extern "C" fn(
        *mut Prog,
        *const c_char,
        *const c_char,
        c_int,
        *const *const c_char,
        *const *const c_char,
    ) -> c_int,
    compile: unsafe extern "C" fn(Prog, c_int, *const *const c_char) -> c_int,
    destroy: unsafe extern "C" fn(*mut Prog) -> c_int,
    log_size: unsafe extern "C" fn(Prog, *mut usize) -> c_int,
    log: unsafe extern "C" fn(Prog, *mut c_char) -> c_int,
    ptx_size: unsafe extern "C" fn(Prog, *mut usize) -> c_int,
    ptx: unsafe extern "C" fn(Prog, *mut c_char) -> c_int,
    cubin_size: unsafe extern "C" fn(Prog, *mut usize) -> c_int,
    cubin: unsafe extern "C" fn(Prog, *mut c_char) -> c_int,
}

/// Loads NVRTC once per process; the error is one line naming what was tried.
pub fn nvrtc() -> Result<&'static Nvrtc, String> {
    static NVRTC: OnceLock<Result<Nvrtc, String>> = OnceLock::new();
    NVRTC.get_or_init(load).as_ref().map_err(Clone::clone)
}

fn load() -> Result<Nvrtc, String> {
    let lib = super::libs::open("nvrtc")?;
    /// Looks up `name` as the function type the field it is stored in declares.
    fn sym<T: Copy>(lib: &libloading::Library, name: &str) -> Result<T, String> {
        // SAFETY: each symbol is stored in a field whose type is its C prototype from nvrtc.h
        // (stable since CUDA 11.1); the library outlives the copies (both live in `Nvrtc`).
        unsafe { lib.get::<T>(name.as_bytes()) }
            .map(|s| *s)
            .map_err(|e| format!("libnvrtc has no {name}: {e}"))
    }
    let version_fn: unsafe extern "C" fn(*mut c_int, *mut c_int) -> c_int =
        sym(&lib, "nvrtcVersion")?;
    let (mut major, mut minor) = (0, 0);
    // SAFETY: two valid, writable ints.
    unsafe { version_fn(&mut major, &mut minor) };
    Ok(Nvrtc {
        version: (major, minor),
        create: sym(&lib, "nvrtcCreateProgram")?,
        compile: sym(&lib, "nvrtcCompileProgram")?,
        destroy: sym(&lib, "nvrtcDestroyProgram")?,
        log_size: sym(&lib, "nvrtcGetProgramLogSize")?,
        log: sym(&lib, "nvrtcGetProgramLog")?,
        ptx_size: sym(&lib, "nvrtcGetPTXSize")?,
        ptx: sym(&lib, "nvrtcGetPTX")?,
        cubin_size: sym(&lib, "nvrtcGetCUBINSize")?,
        cubin: sym(&lib, "nvrtcGetCUBIN")?,
        _lib: lib,
    })
}

/// Options for every module: C++17, line info for profilers. No fast math: the collectives and
/// the comparisons with the CPU path depend on IEEE results.
const OPTIONS: [&str; 2] = ["--std=c++17", "-lineinfo"];

impl Nvrtc {
    /// Compiles `src` (named `name` in diagnostics) for `target`. The error carries NVRTC's log.
    pub fn compile_source(&self, name: &str, src: &str, target: Target) -> Result<Vec<u8>, String> {
        let csrc = CString::new(src).map_err(|_| format!("{name}: NUL in source"))?;
        let cname = CString::new(format!("{name}.cu")).expect("module names have no NUL");
        let opts: Vec<CString> = OPTIONS
            .iter()
            .map(|o| o.to_string())
            .chain([target.arch_option()])
            .map(|o| CString::new(o).expect("options have no NUL"))
            .collect();
        let opt_ptrs: Vec<*const c_char> = opts.iter().map(|o| o.as_ptr()).collect();
        let mut prog: Prog = std::ptr::null_mut();
        // SAFETY: valid NUL-terminated strings that outlive the call; no headers (count 0).
        let rc = unsafe {
            (self.create)(
                &mut prog,
                csrc.as_ptr(),
                cname.as_ptr(),
                0,
                std::ptr::null(),
                std::ptr::null(),
            )
        };
        if rc != 0 {
            return Err(format!("{name}: nvrtcCreateProgram failed ({rc})"));
        }
        let n = opt_ptrs.len() as c_int;
        // SAFETY: `prog` was created above; the option pointers are valid for the call.
        let rc = unsafe { (self.compile)(prog, n, opt_ptrs.as_ptr()) };
        let out = if rc != 0 {
            Err(format!(
                "{name} ({target:?}): NVRTC error {rc}:\n{}",
                self.program_log(prog)
            ))
        } else {
            let (size_fn, get_fn) = match target {
                Target::Ptx(_) => (self.ptx_size, self.ptx),
                Target::Cubin(_) => (self.cubin_size, self.cubin),
            };
            Ok(self.read(prog, size_fn, get_fn))
        };
        // SAFETY: `prog` is a live program, destroyed once.
        unsafe { (self.destroy)(&mut prog) };
        out
    }

    fn program_log(&self, prog: Prog) -> String {
        let bytes = self.read(prog, self.log_size, self.log);
        String::from_utf8_lossy(&bytes)
            .trim_end_matches('\0')
            .to_string()
    }

    /// Size-then-copy for the log, PTX and CUBIN getters.
    fn read(
        &self,
        prog: Prog,
        size_fn: unsafe extern "C" fn(Prog, *mut usize) -> c_int,
        get_fn: unsafe extern "C" fn(Prog, *mut c_char) -> c_int,
    ) -> Vec<u8> {
        let mut size = 0usize;
        // SAFETY: `prog` is live; `size` is writable.
        unsafe { size_fn(prog, &mut size) };
        let mut buf = vec![0u8; size];
        // SAFETY: `buf` has the `size` bytes NVRTC just asked for.
        unsafe { get_fn(prog, buf.as_mut_ptr().cast()) };
        buf
    }
}

/// Compiles `module` for `target` once per process and returns the PTX or CUBIN.
pub fn compile(module: &Module, target: Target) -> Result<Arc<Vec<u8>>, String> {
    type Images = HashMap<(&'static str, Target), Arc<Vec<u8>>>;
    static CACHE: OnceLock<Mutex<Images>> = OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    if let Some(hit) = cache.lock().unwrap().get(&(module.name, target)) {
        return Ok(hit.clone());
    }
    let image = Arc::new(nvrtc()?.compile_source(module.name, &module.source(), target)?);
    cache
        .lock()
        .unwrap()
        .insert((module.name, target), image.clone());
    Ok(image)
}
