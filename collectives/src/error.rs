//! Errors a collective can return. Each names the operation, its sequence number and, where
//! known, the rank that did not arrive, so a user can tell which peer hung or died.

#[derive(Debug, thiserror::Error)]
pub enum CommError {
    #[error("{op} #{seq}: rank {missing} did not arrive within {waited_s:.1} s (deadline)")]
    Timeout {
        op: &'static str,
        seq: u64,
        missing: usize,
        waited_s: f64,
    },
    #[error("{op} #{seq}: job aborted by the launcher (rank {failed} failed) while waiting for rank {missing}")]
    Aborted {
        op: &'static str,
        seq: u64,
        failed: usize,
        missing: usize,
    },
    #[error("{op}: invalid arguments: {msg}")]
    Invalid { op: &'static str, msg: String },
    #[error("collectives setup: {0}")]
    Setup(String),
}
