//! Writing an output file the user named (`--trace`, `logits --out`, `perf --plot`) without
//! damaging what is there: a regular file is replaced atomically, so a full disk or a crash never
//! leaves a partial file under the final name; a device, pipe or terminal (`/dev/null`,
//! `/dev/stdout`, a FIFO) is written in place instead of being replaced by a regular file; the
//! temporary file can never be a symlink planted by someone else.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Writes `bytes` to `path`. See the module documentation for what happens to what is there.
pub fn write_output(path: &Path, bytes: &[u8]) -> io::Result<()> {
    // Follows symlinks: `/dev/stdout` is a link to the real stream.
    match std::fs::metadata(path) {
        Ok(m) if m.is_dir() => Err(io::Error::new(
            io::ErrorKind::IsADirectory,
            "is a directory, give a file name",
        )),
        Ok(m) if m.is_file() => {
            // A link to a regular file: replace the file it names, keep the link.
            let target = std::fs::canonicalize(path)?;
            replace_atomically(&target, bytes, Some(m.permissions().mode()))
        }
        Ok(m) => {
            let t = m.file_type();
            if t.is_char_device() || t.is_fifo() || t.is_block_device() || t.is_socket() {
                write_in_place(path, bytes)
            } else {
                Err(io::Error::other("not a regular file, device or pipe"))
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            if std::fs::symlink_metadata(path).is_ok() {
                return Err(io::Error::other(
                    "is a dangling symbolic link; remove it or name another file",
                ));
            }
            replace_atomically(path, bytes, None)
        }
        Err(e) => Err(e),
    }
}

/// Writes into what `path` already is (no create, no rename): the device or pipe gets the bytes.
fn write_in_place(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let mut f = OpenOptions::new().write(true).open(path)?;
    f.write_all(bytes)?;
    f.flush()
}

/// Writes a fresh temporary file next to `path` (`O_EXCL|O_NOFOLLOW`, so nothing planted there
/// is followed or reused), syncs it and renames it over `path`. On any error the temporary file is
/// removed and `path` is untouched.
fn replace_atomically(path: &Path, bytes: &[u8], mode: Option<u32>) -> io::Result<()> {
    let (tmp, mut f) = create_temp(path)?;
    let res = (|| {
        if let Some(mode) = mode {
            f.set_permissions(std::fs::Permissions::from_mode(mode & 0o7777))?;
        }
        f.write_all(bytes)?;
        // Space is only certain once the data is on disk (delayed allocation, NFS).
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if res.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    res
}

/// `.NAME.PID.N.tmp` in `path`'s directory, created exclusively.
fn create_temp(path: &Path) -> io::Result<(PathBuf, File)> {
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no file name"))?;
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let mut last = None;
    for n in 0..100u32 {
        let mut t = std::ffi::OsString::from(".");
        t.push(name);
        t.push(format!(".{}.{n}.tmp", std::process::id()));
        let tmp = dir.join(t);
        match OpenOptions::new()
            .write(true)
            .create_new(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .mode(0o666)
            .open(&tmp)
        {
            Ok(f) => return Ok((tmp, f)),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => last = Some(e),
            Err(e) => return Err(e),
        }
    }
    Err(last.unwrap_or_else(|| io::Error::other("no free temporary name")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn scratch(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("tprun-files-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn replaces_regular_files_and_keeps_their_mode() {
        let d = scratch("regular");
        let p = d.join("out.json");
        write_output(&p, b"one").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        write_output(&p, b"two").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        let mode = std::fs::metadata(&p).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(
            std::fs::read_dir(&d).unwrap().count(),
            1,
            "no temp file left"
        );
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn devices_and_links_to_them_are_written_in_place() {
        write_output(Path::new("/dev/null"), b"x").unwrap();
        assert!(std::fs::metadata("/dev/null")
            .unwrap()
            .file_type()
            .is_char_device());
        let d = scratch("dev");
        let link = d.join("null");
        symlink("/dev/null", &link).unwrap();
        write_output(&link, b"x").unwrap();
        assert!(std::fs::symlink_metadata(&link).unwrap().is_symlink());
        // A full device reports the error, as a full disk would.
        assert!(write_output(Path::new("/dev/full"), b"x").is_err());
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn a_planted_temp_link_is_not_followed() {
        let d = scratch("planted");
        let victim = d.join("victim");
        std::fs::write(&victim, b"keep").unwrap();
        let out = d.join("out.json");
        for n in 0..100 {
            let t = d.join(format!(".out.json.{}.{n}.tmp", std::process::id()));
            symlink(&victim, t).unwrap();
        }
        assert!(write_output(&out, b"data").is_err());
        assert_eq!(std::fs::read(&victim).unwrap(), b"keep");
        assert!(!out.exists());
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn a_link_to_a_regular_file_replaces_the_target_and_keeps_the_link() {
        let d = scratch("link");
        let target = d.join("target");
        std::fs::write(&target, b"old").unwrap();
        let link = d.join("link");
        symlink(&target, &link).unwrap();
        write_output(&link, b"new").unwrap();
        assert!(std::fs::symlink_metadata(&link).unwrap().is_symlink());
        assert_eq!(std::fs::read(&target).unwrap(), b"new");
        assert!(write_output(&d, b"x").is_err(), "a directory is refused");
        let _ = std::fs::remove_dir_all(&d);
    }
}
