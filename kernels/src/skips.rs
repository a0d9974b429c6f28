//! How a test that cannot check what it is named after on this machine says so, in a way a CI
//! log shows: cargo captures a passing test's output, so besides stderr the line goes to the
//! file named by [`ENV_LOG`], which `.ci/run` prints at its end. Used by the tests of every
//! crate of the workspace (this is the one crate they all reach).
//!
//! Two kinds of line:
//! - `SKIPPED: <test>: <why>`: a prerequisite CI provides (`unshare`, `mknod`, a pid namespace,
//!   a pseudo-terminal, NVRTC) is missing. Under `CI=true` that is a failure instead ([`skip`]
//!   panics), so on CI this list is empty.
//! - `NOT ON THIS MACHINE: <test>: <why>`: hardware the machine lacks (a GPU, an AVX-512 CPU);
//!   the test checked the fallback instead where there is one.

use std::io::Write;

/// The file the lines are appended to (`.ci/run` sets it).
pub const ENV_LOG: &str = "TPRUN_SKIP_LOG";

/// Whether this runs on CI (`CI=true`, as GitHub Actions and most CI services set it).
pub fn on_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v.eq_ignore_ascii_case("true") || v == "1")
}

fn record(line: &str) {
    eprintln!("{line}");
    if let Some(path) = std::env::var_os(ENV_LOG).filter(|p| !p.is_empty()) {
        // One write(2) of the whole line with O_APPEND: lines of concurrent tests never mix.
        let res = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .and_then(|mut f| f.write_all(format!("{line}\n").as_bytes()));
        if let Err(e) = res {
            panic!("cannot append to {ENV_LOG}={}: {e}", path.to_string_lossy());
        }
    }
}

/// `test` cannot run here for want of `why`, a prerequisite CI provides: a failure under
/// `CI=true`, else a `SKIPPED` line.
pub fn skip(test: &str, why: &str) {
    assert!(
        !on_ci(),
        "{test}: CI=true but {why} (CI provides it: the test must run there, not skip)"
    );
    record(&format!("SKIPPED: {test}: {why}"));
}

/// `test` (or part of it) cannot run here for want of hardware (`why`): a `NOT ON THIS
/// MACHINE` line, on CI too.
pub fn no_hardware(test: &str, why: &str) {
    record(&format!("NOT ON THIS MACHINE: {test}: {why}"));
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs this test binary again, for `test` alone, with `env`; returns (success, log text).
    fn rerun(test: &str, env: &[(&str, &str)]) -> (bool, String) {
        let log =
            std::env::temp_dir().join(format!("tprun-skips-{}-{test}.log", std::process::id()));
        let _ = std::fs::remove_file(&log);
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args([test, "--exact", "--include-ignored", "--test-threads", "1"])
            .env(ENV_LOG, &log)
            .env_remove("CI")
            .envs(env.iter().copied())
            .output()
            .unwrap();
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let _ = std::fs::remove_file(&log);
        (out.status.success(), text)
    }

    /// Only run by [`a_skip_is_logged_and_fails_on_ci`], in a child process.
    #[test]
    #[ignore = "run by a_skip_is_logged_and_fails_on_ci"]
    fn planted_skip() {
        skip("planted", "no frobnicator");
        no_hardware("planted", "no quantum unit");
    }

    #[test]
    fn a_skip_is_logged_and_fails_on_ci() {
        let name = "skips::tests::planted_skip";
        let (ok, log) = rerun(name, &[]);
        assert!(ok);
        assert_eq!(
            log,
            "SKIPPED: planted: no frobnicator\nNOT ON THIS MACHINE: planted: no quantum unit\n"
        );
        let (ok, log) = rerun(name, &[("CI", "true")]);
        assert!(!ok, "under CI=true a skip must fail the test");
        assert_eq!(log, "");
    }
}
