//! Errors a collective can return. Each names the operation, its sequence number and, where
//! known, the rank that did not arrive, so a user can tell which peer hung or died.

/// Why a collective failed; the message names the operation, its sequence number and the rank
/// to look at, so a user can tell which peer hung or died without a debugger.
#[derive(Debug, thiserror::Error)]
pub enum CommError {
    /// A peer did not arrive before the deadline (`TPRUN_COMM_TIMEOUT_S`): a hang, not a crash.
    #[error("{op} #{seq}: rank {missing} did not arrive within {waited_s:.1} s (deadline; TPRUN_COMM_TIMEOUT_S sets it)")]
    Timeout {
        /// The operation that waited (`all_reduce`, `send_recv`, ...).
        op: &'static str,
        /// Its sequence number in this group (every rank counts the same calls).
        seq: u64,
        /// The rank that was waited for.
        missing: usize,
        /// How long this rank waited.
        waited_s: f64,
    },
    /// Another rank failed and the launcher (or a test's [`crate::thread::ThreadComm::abort`])
    /// aborted the job, so this wait ends instead of running into the deadline.
    #[error("{op} #{seq}: job aborted by the launcher (rank {failed} failed) while waiting for rank {missing}")]
    Aborted {
        /// The operation that waited.
        op: &'static str,
        /// Its sequence number in this group.
        seq: u64,
        /// The rank whose failure aborted the job.
        failed: usize,
        /// The rank this one was waiting for when the abort came.
        missing: usize,
    },
    /// The peer's process is gone (or it dropped its communicator) before it joined the operation.
    #[error("{op} #{seq}: rank {missing} {how} while this rank waited for it")]
    PeerDied {
        /// The operation that waited.
        op: &'static str,
        /// Its sequence number in this group.
        seq: u64,
        /// The rank that is gone.
        missing: usize,
        /// How it went ("died (process 123 is gone)", "left the job (dropped its communicator)").
        how: String,
    },
    /// Ranks called different collectives (or the same one with different sizes) at the same point.
    #[error("{op} #{seq}: ranks disagree: {msg}")]
    Mismatch {
        /// The operation this rank called.
        op: &'static str,
        /// Its sequence number in this group.
        seq: u64,
        /// What differed, with both sides' values.
        msg: String,
    },
    /// This rank's own arguments are wrong (a root or peer out of range, sizes that do not fit,
    /// an operator the dtype has no meaning for); nothing was sent.
    #[error("{op}: invalid arguments: {msg}")]
    Invalid {
        /// The operation called.
        op: &'static str,
        /// Which argument, its value and what was expected.
        msg: String,
    },
    /// The communicator could not be made (no segment, a bad environment variable, ...).
    #[error("collectives setup: {0}")]
    Setup(String),
    /// An error inside a group made by `split`: the peer numbers in `source` are world ranks.
    #[error("{inner} (in group {group})")]
    InGroup {
        /// The group's name and its world ranks, as the message shows them.
        group: String,
        /// The error as the group saw it.
        inner: Box<CommError>,
    },
}
