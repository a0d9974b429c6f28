//! Finding the CUDA libraries where CUDA 12 and 13 put them: `$TPRUN_CUDA_LIB_PATH` first, then
//! the NVIDIA pip wheels' folders (`nvidia/cu13/lib`, `nvidia/*/lib` under every site-packages
//! we can name without running Python), then the toolkit folders, then the loader's own search
//! (`LD_LIBRARY_PATH`, ldconfig). Every library opened is recorded so a program can say which
//! files it loaded ([`loaded`]).
//!
//! libcuda is the only library cudarc opens itself; NVRTC and cuBLAS are tprun's own loaders
//! ([`super::nvrtc`], [`super::blas`]) over the files found here, so a pip wheel's library
//! serves without `LD_LIBRARY_PATH`, and a missing one is an error, not cudarc's panic.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// (library, what was opened) for every successful [`open`], in order.
static LOADED: Mutex<Vec<(String, String)>> = Mutex::new(Vec::new());

/// File names tried for `lib` ("nvrtc", "cublas", ...) on this machine's driver
/// ([`file_names_for`] with the driver's CUDA major version, when there is a driver).
pub fn file_names(lib: &str) -> Vec<String> {
    file_names_for(lib, super::driver_version().ok().map(|v| v / 1000))
}

/// File names tried for `lib` under a driver of CUDA major version `driver` (`None`: unknown).
///
/// Newest major first, but none newer than the driver: it cannot load the PTX or CUBIN of a
/// newer NVRTC, and a newer cuBLAS refuses to start on it.
pub fn file_names_for(lib: &str, driver: Option<i32>) -> Vec<String> {
    [13, 12]
        .iter()
        .filter(|&&m| driver.is_none_or(|d| m <= d))
        .map(|m| format!("lib{lib}.so.{m}"))
        .chain([format!("lib{lib}.so")])
        .collect()
}

/// Folders searched before the loader's default search, in order, existing ones only, each
/// once.
pub fn search_dirs() -> Vec<PathBuf> {
    search_dirs_with(&std::env::var("TPRUN_CUDA_LIB_PATH").unwrap_or_default())
}

/// [`search_dirs`] with `lib_path` in place of `$TPRUN_CUDA_LIB_PATH`.
fn search_dirs_with(lib_path: &str) -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = lib_path
        .split(':')
        .filter(|s| !s.is_empty())
        .map(PathBuf::from)
        .collect();
    // The emulator's folder goes first, as if it led TPRUN_CUDA_LIB_PATH.
    #[cfg(feature = "cuda-emulator")]
    if let Some(d) = super::emulator::dir() {
        dirs.insert(0, d.to_path_buf());
    }
    for site in site_packages() {
        dirs.push(site.join("nvidia/cu13/lib"));
        dirs.extend(
            subdirs(&site.join("nvidia"))
                .into_iter()
                .map(|d| d.join("lib")),
        );
    }
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Ok(root) = std::env::var(var) {
            dirs.push(Path::new(&root).join("lib64"));
            dirs.push(Path::new(&root).join("lib"));
        }
    }
    dirs.push("/usr/local/cuda/lib64".into());
    let mut versioned: Vec<PathBuf> = subdirs(Path::new("/usr/local"))
        .into_iter()
        .filter(|d| {
            d.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("cuda-"))
        })
        .map(|d| d.join("lib64"))
        .collect();
    versioned.sort();
    dirs.extend(versioned.into_iter().rev());
    let mut seen = std::collections::HashSet::new();
    dirs.retain(|d| d.is_dir() && seen.insert(d.clone()));
    dirs
}

/// site-packages folders of the active venv/conda env, the user's and the system's Pythons.
fn site_packages() -> Vec<PathBuf> {
    let mut roots: Vec<PathBuf> = Vec::new();
    for var in ["VIRTUAL_ENV", "CONDA_PREFIX"] {
        if let Ok(p) = std::env::var(var) {
            roots.push(Path::new(&p).join("lib"));
        }
    }
    if let Ok(home) = std::env::var("HOME") {
        roots.push(Path::new(&home).join(".local/lib"));
    }
    roots.extend(["/usr/local/lib".into(), "/usr/lib".into()]);
    let mut out: Vec<PathBuf> = std::env::var("PYTHONPATH")
        .unwrap_or_default()
        .split(':')
        .filter(|s| !s.is_empty())
        .map(PathBuf::from)
        .collect();
    for root in roots {
        for py in subdirs(&root) {
            if py
                .file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("python3"))
            {
                out.push(py.join("site-packages"));
                out.push(py.join("dist-packages"));
            }
        }
    }
    out
}

fn subdirs(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.path())
                .filter(|p| p.is_dir())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// Every existing file that could be `lib`, in search order.
pub fn candidates(lib: &str) -> Vec<PathBuf> {
    let names = file_names(lib);
    search_dirs()
        .iter()
        .flat_map(|d| names.iter().map(move |n| d.join(n)))
        .filter(|p| p.is_file())
        .collect()
}

/// Opens `lib`: the first candidate file that loads, else the loader's own search by name.
/// The error lists what was tried, on one line.
pub fn open(lib: &str) -> Result<libloading::Library, String> {
    let mut tried = Vec::new();
    let by_path = candidates(lib).into_iter().map(|p| p.display().to_string());
    for what in by_path.chain(file_names(lib)) {
        // SAFETY: loading a CUDA library runs only its initialisers, which are safe to run in
        // any process; the file is one of NVIDIA's, found by name.
        match unsafe { libloading::Library::new(&what) } {
            Ok(l) => {
                LOADED.lock().unwrap().push((lib.to_string(), what));
                return Ok(l);
            }
            Err(e) => tried.push(format!("{what} ({e})")),
        }
    }
    if tried.is_empty() {
        return Err(format!("lib{lib} not found"));
    }
    Err(format!(
        "lib{lib} could not be loaded; tried {}",
        tried.join(", ")
    ))
}

/// `(library, file)` for every library opened so far.
pub fn loaded() -> Vec<(String, String)> {
    LOADED.lock().unwrap().clone()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_cover_cuda_12_and_13_but_never_newer_than_the_driver() {
        let nvrtc = |d| file_names_for("nvrtc", d);
        assert_eq!(
            nvrtc(None),
            ["libnvrtc.so.13", "libnvrtc.so.12", "libnvrtc.so"]
        );
        assert_eq!(nvrtc(Some(13)), nvrtc(None));
        assert_eq!(nvrtc(Some(12)), ["libnvrtc.so.12", "libnvrtc.so"]);
        assert_eq!(
            file_names_for("cublas", Some(12)),
            ["libcublas.so.12", "libcublas.so"]
        );
    }

    /// `$TPRUN_CUDA_LIB_PATH` with repeats, an empty entry, a missing folder and a file: its
    /// folders come first, in order, once each; the rest is dropped; no folder appears twice.
    #[test]
    fn search_dirs_exist_and_are_unique() {
        let tmp = std::env::temp_dir().join(format!("tprun-libs-{}", std::process::id()));
        let (a, b, file) = (tmp.join("a"), tmp.join("b"), tmp.join("f"));
        std::fs::create_dir_all(&a).unwrap();
        std::fs::create_dir_all(&b).unwrap();
        std::fs::write(&file, "").unwrap();
        let s = |p: &Path| p.display().to_string();
        let path = [
            s(&a),
            s(&b),
            s(&a),
            String::new(),
            s(&tmp.join("missing")),
            s(&file),
        ];
        let d = search_dirs_with(&format!("{}:{}", path.join(":"), s(&b)));
        std::fs::remove_dir_all(&tmp).unwrap();
        assert_eq!(d[..2], [a, b], "{d:?}");
        assert!(d[2..].iter().all(|p| !p.starts_with(&tmp)), "{d:?}");
        let unique: std::collections::HashSet<_> = d.iter().collect();
        assert_eq!(unique.len(), d.len(), "a folder twice: {d:?}");
        println!("CUDA library search path: {:?}", search_dirs());
    }
}
