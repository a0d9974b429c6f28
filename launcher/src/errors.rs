//! torchrun's error files: each rank gets its own TORCHELASTIC_ERROR_FILE path in a temporary
//! directory, where torch's `@record` writes the exception of a failing rank as JSON; after a
//! failure tprun shows that error's message and the frame it came from.

use std::path::{Path, PathBuf};

/// The job's temporary directory of error files, removed (with whatever the ranks wrote there)
/// when the job ends, whether it succeeded, failed or was stopped by a signal.
pub(crate) struct ErrorDir(PathBuf);

impl ErrorDir {
    /// A new private directory (mode 0700, created exclusively, so nobody else's) in $TMPDIR.
    pub fn create() -> anyhow::Result<ErrorDir> {
        use std::os::unix::fs::DirBuilderExt;
        let base = std::env::temp_dir();
        let mut last = None;
        for i in 0..100u32 {
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos());
            let dir = base.join(format!("tprun-errors-{}-{t:x}-{i}", std::process::id()));
            match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
                Ok(()) => return Ok(ErrorDir(dir)),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => last = Some(e),
                Err(e) => {
                    last = Some(e);
                    break;
                }
            }
        }
        let e = last.map_or_else(|| "unknown error".into(), |e| e.to_string());
        anyhow::bail!(
            "cannot create a directory for the ranks' error files in {}: {e}",
            base.display()
        )
    }

    /// Rank `rank`'s error file in restart `attempt` (not created: the rank writes it or not).
    pub fn file(&self, attempt: u32, rank: usize) -> PathBuf {
        self.0.join(format!("attempt{attempt}-rank{rank}.json"))
    }
}

impl Drop for ErrorDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
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
        let d = ErrorDir::create().unwrap();
        let f = d.file(0, 1);
        let stack = "Traceback (most recent call last):\n  File \"a.py\", line 9, in <module>\n    main()\n  File \"a.py\", line 3, in main\n    raise ValueError(\"boom\")\nValueError: boom\n";
        let j = serde_json::json!({"message": {"message": "ValueError: boom",
            "extraInfo": {"py_callstack": stack, "timestamp": "1700000000"}}});
        std::fs::write(&f, j.to_string()).unwrap();
        let e = read_error_file(&f).unwrap();
        assert_eq!(e.message, "ValueError: boom");
        assert_eq!(e.frame.as_deref(), Some("File \"a.py\", line 3, in main"));
        std::fs::write(&f, "not json").unwrap();
        assert!(read_error_file(&f).is_none());
        assert!(read_error_file(&d.file(0, 7)).is_none());
        let path = d.0.clone();
        drop(d);
        assert!(!path.exists(), "the error directory is removed on drop");
    }
}
