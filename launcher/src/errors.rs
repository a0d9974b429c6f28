//! torchrun's error files: each rank gets its own TORCHELASTIC_ERROR_FILE, where torch's
//! `@record` writes the exception of a failing rank as JSON; after a failure tprun shows that
//! error's message and the frame it came from.
//!
//! The files are memfds of tprun's, named to the ranks as `/proc/<tprun pid>/fd/<fd>`: they have
//! no path on disk, so nothing is left behind on any exit of tprun, kill -9 included.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::path::{Path, PathBuf};

/// One attempt's error files, one per rank; closed (and gone) when dropped.
pub(crate) struct ErrorFiles(Vec<File>);

impl ErrorFiles {
    pub fn create(world_size: usize) -> anyhow::Result<ErrorFiles> {
        let mut files = Vec::with_capacity(world_size);
        for _ in 0..world_size {
            // SAFETY: memfd_create reads a NUL-terminated name and returns a new fd or -1.
            let fd = unsafe { libc::memfd_create(c"tprun-error-file".as_ptr(), libc::MFD_CLOEXEC) };
            if fd < 0 {
                let e = std::io::Error::last_os_error();
                anyhow::bail!("cannot create the ranks' error files (memfd_create): {e}");
            }
            // SAFETY: `fd` was just created and is owned by nothing else.
            files.push(unsafe { File::from_raw_fd(fd) });
        }
        Ok(ErrorFiles(files))
    }

    /// Rank `rank`'s TORCHELASTIC_ERROR_FILE: opening it opens the memfd (O_CLOEXEC keeps the
    /// fd itself out of the ranks).
    pub fn path(&self, rank: usize) -> PathBuf {
        PathBuf::from(format!(
            "/proc/{}/fd/{}",
            std::process::id(),
            self.0[rank].as_raw_fd()
        ))
    }
}

/// What a rank's error file says: the message (`ValueError: boom`) and the innermost frame of
/// its traceback (`File "train.py", line 3, in main`), if it has one.
#[derive(Debug, PartialEq)]
pub(crate) struct RankError {
    pub message: String,
    pub frame: Option<String>,
}

/// Reads the error file torch's `@record` writes: `{"message": {"message": "...", "extraInfo":
/// {"py_callstack": "...", "timestamp": "..."}}}` (or, from other writers, `{"message": "..."}`).
/// None when the rank wrote none or it is not in that form.
pub(crate) fn read_error_file(path: &Path) -> Option<RankError> {
    let text = std::fs::read_to_string(path).ok()?;
    if text.is_empty() {
        return None;
    }
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    let m = v.get("message")?;
    let (message, stack) = match m {
        serde_json::Value::String(s) => (s.clone(), None),
        _ => (
            m.get("message")?.as_str()?.to_string(),
            m.pointer("/extraInfo/py_callstack")
                .and_then(|s| s.as_str()),
        ),
    };
    let frame = stack.and_then(|s| {
        s.lines()
            .rev()
            .map(str::trim)
            .find(|l| l.starts_with("File \""))
            .map(String::from)
    });
    Some(RankError {
        message: message.trim().to_string(),
        frame,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_records_json_and_refuses_other_files() {
        let files = ErrorFiles::create(2).unwrap();
        let f = files.path(1);
        let stack = "Traceback (most recent call last):\n  File \"a.py\", line 9, in <module>\n    main()\n  File \"a.py\", line 3, in main\n    raise ValueError(\"boom\")\nValueError: boom\n";
        let j = serde_json::json!({"message": {"message": "ValueError: boom",
            "extraInfo": {"py_callstack": stack, "timestamp": "1700000000"}}});
        std::fs::write(&f, j.to_string()).unwrap();
        let e = read_error_file(&f).unwrap();
        assert_eq!(e.message, "ValueError: boom");
        assert_eq!(e.frame.as_deref(), Some("File \"a.py\", line 3, in main"));
        std::fs::write(&f, "not json").unwrap();
        assert!(read_error_file(&f).is_none());
        assert!(
            read_error_file(&files.path(0)).is_none(),
            "an empty file is no error"
        );
    }
}
