//! Errors a collective can return. Each names the operation, its sequence number and, where
//! known, the rank that did not arrive, so a user can tell which peer hung or died.

#[derive(Debug, thiserror::Error)]
pub enum CommError {
    #[error("{op} #{seq}: rank {missing} did not arrive within {waited_s:.1} s (deadline; TPRUN_COMM_TIMEOUT_S sets it)")]
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
    /// The peer's process is gone (or it dropped its communicator) before it joined the operation.
    #[error("{op} #{seq}: rank {missing} {how} while this rank waited for it")]
    PeerDied {
        op: &'static str,
        seq: u64,
        missing: usize,
        how: String,
    },
    /// Ranks called different collectives (or the same one with different sizes) at the same point.
    #[error("{op} #{seq}: ranks disagree: {msg}")]
    Mismatch {
        op: &'static str,
        seq: u64,
        msg: String,
    },
    #[error("{op}: invalid arguments: {msg}")]
    Invalid { op: &'static str, msg: String },
    #[error("collectives setup: {0}")]
    Setup(String),
    /// An error inside a group made by `split`: the peer numbers in `source` are world ranks.
    #[error("{source} (in group {group})")]
    InGroup {
        group: String,
        source: Box<CommError>,
    },
}
